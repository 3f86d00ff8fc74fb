-- 001: devices, regions, readings, aggregates, dead letters.
-- Plain PostgreSQL; the TimescaleDB step (hypertables) runs in 001_core.timescale.sql when the extension exists.

CREATE TABLE IF NOT EXISTS regions (
    code        text PRIMARY KEY,
    name        text NOT NULL,
    level       text NOT NULL CHECK (level IN ('provinsi', 'kabupaten', 'kecamatan', 'desa', 'kelurahan')),
    parent_code text
);

CREATE TABLE IF NOT EXISTS devices (
    device_id   text PRIMARY KEY CHECK (device_id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    kind        text NOT NULL,
    region_code text NOT NULL REFERENCES regions(code),
    secret_hash text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    last_seen   timestamptz,
    status      text NOT NULL DEFAULT 'unknown'
);

-- Codes and ids use the "C" collation: byte order is right for them, comparisons are memcmp (the
-- sink inserts ~10^5 rows/s into these indexes), and a plain btree then serves region prefix
-- queries (region_code LIKE '35.09.01%').
-- The primary key leads with time: inserts land at the right edge of the btree (PostgreSQL's
-- rightmost-leaf fast path) instead of all over it, which measured ~1.5x faster than
-- (device_id, metric, time) at the same idempotency (ON CONFLICT works on the column set).
-- It also serves time-range scans, so no separate time index is needed.
CREATE TABLE IF NOT EXISTS readings (
    time        timestamptz NOT NULL,
    device_id   text COLLATE "C" NOT NULL,
    region_code text COLLATE "C" NOT NULL,
    metric      text COLLATE "C" NOT NULL,
    value       double precision NOT NULL,
    event_id    text NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (time, device_id, metric)
);
CREATE INDEX IF NOT EXISTS readings_metric_region_time ON readings (metric, region_code, time DESC);

CREATE TABLE IF NOT EXISTS aggregates (
    bucket      timestamptz NOT NULL,
    scope       text COLLATE "C" NOT NULL CHECK (scope IN ('device', 'kecamatan')),
    key         text COLLATE "C" NOT NULL,
    region_code text COLLATE "C" NOT NULL,
    metric      text COLLATE "C" NOT NULL,
    bucket_end  timestamptz NOT NULL,
    count       bigint NOT NULL,
    min         double precision NOT NULL,
    max         double precision NOT NULL,
    sum         double precision NOT NULL,
    mean        double precision NOT NULL,
    last        double precision NOT NULL,
    last_time   timestamptz NOT NULL,
    final       boolean NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key, metric, bucket)
);
CREATE INDEX IF NOT EXISTS aggregates_metric_region_bucket ON aggregates (metric, region_code, bucket DESC);

CREATE TABLE IF NOT EXISTS dead_letters (
    id           text PRIMARY KEY,
    time         timestamptz NOT NULL,
    reason       text NOT NULL,
    message      text NOT NULL,
    source       text NOT NULL,
    device_id    text,
    topic        text,
    "partition"  integer,
    "offset"     bigint,
    raw          text NOT NULL,
    raw_encoding text NOT NULL DEFAULT 'utf-8',
    replayed_at  timestamptz
);
CREATE INDEX IF NOT EXISTS dead_letters_reason_time ON dead_letters (reason, time DESC);
CREATE INDEX IF NOT EXISTS dead_letters_device_time ON dead_letters (device_id, time DESC);
