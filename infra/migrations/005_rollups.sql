-- 005: hourly and daily rollups of the 1-minute aggregates, the rollup job's watermark, and the
-- index the job scans by. Plain PostgreSQL: rollup_hourly / rollup_daily are tables kept by the
-- rollup job inside `arus sink` (consumers/rollups.py), which recomputes exactly the buckets whose
-- 1-minute aggregates changed (aggregates.updated_at > its watermark), so late data corrects only
-- the buckets it touches. 005_rollups.timescale.sql replaces both tables with continuous aggregates
-- of the same name and columns, and adds compression and retention policies.
--
-- Buckets are aligned to Asia/Jakarta (WIB, UTC+7, no DST): an hour is an hour, a day runs from
-- 00:00 WIB (17:00 UTC the day before). In SQL: date_bin(interval, t, TIMESTAMPTZ '2000-01-01 00:00+07').

CREATE TABLE IF NOT EXISTS rollup_hourly (
    bucket      timestamptz NOT NULL,
    scope       text COLLATE "C" NOT NULL,
    key         text COLLATE "C" NOT NULL,
    region_code text COLLATE "C" NOT NULL,
    metric      text COLLATE "C" NOT NULL,
    count       bigint NOT NULL,
    min         double precision NOT NULL,
    max         double precision NOT NULL,
    sum         double precision NOT NULL,
    mean        double precision NOT NULL,
    last        double precision NOT NULL,
    last_time   timestamptz NOT NULL,
    PRIMARY KEY (scope, key, metric, bucket)
);
CREATE INDEX IF NOT EXISTS rollup_hourly_scope_metric_region ON rollup_hourly (scope, metric, region_code, bucket);

CREATE TABLE IF NOT EXISTS rollup_daily (
    bucket      timestamptz NOT NULL,
    scope       text COLLATE "C" NOT NULL,
    key         text COLLATE "C" NOT NULL,
    region_code text COLLATE "C" NOT NULL,
    metric      text COLLATE "C" NOT NULL,
    count       bigint NOT NULL,
    min         double precision NOT NULL,
    max         double precision NOT NULL,
    sum         double precision NOT NULL,
    mean        double precision NOT NULL,
    last        double precision NOT NULL,
    last_time   timestamptz NOT NULL,
    PRIMARY KEY (scope, key, metric, bucket)
);
CREATE INDEX IF NOT EXISTS rollup_daily_scope_metric_region ON rollup_daily (scope, metric, region_code, bucket);

-- One row per periodic job (rollups, retention): how far it got.
CREATE TABLE IF NOT EXISTS rollup_state (
    name        text PRIMARY KEY,
    watermark   timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The rollup job finds changed 1-minute windows by updated_at (a btree: it is read every minute).
CREATE INDEX IF NOT EXISTS aggregates_updated_at ON aggregates (updated_at);
-- The retention job deletes by time. BRIN: a few pages, and since the bucket of a row never changes,
-- the sink's upserts stay HOT-eligible with respect to it.
CREATE INDEX IF NOT EXISTS aggregates_bucket_brin ON aggregates USING brin (bucket);
CREATE INDEX IF NOT EXISTS rollup_hourly_bucket_brin ON rollup_hourly USING brin (bucket);
CREATE INDEX IF NOT EXISTS rollup_daily_bucket_brin ON rollup_daily USING brin (bucket);

-- Upgrade: roll up what is already there, once (plain path only; TimescaleDB refreshes its
-- continuous aggregates instead), and start the watermark at this transaction's start.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM rollup_state WHERE name = 'rollups') THEN
        INSERT INTO rollup_hourly (bucket, scope, key, region_code, metric, count, min, max, sum, mean, last, last_time)
        SELECT date_bin('1 hour', a.bucket, TIMESTAMPTZ '2000-01-01 00:00:00+07') AS b, a.scope, a.key,
               (array_agg(a.region_code ORDER BY a.last_time DESC))[1], a.metric,
               sum(a.count), min(a.min), max(a.max), sum(a.sum), sum(a.sum) / sum(a.count),
               (array_agg(a.last ORDER BY a.last_time DESC))[1], max(a.last_time)
        FROM aggregates a
        GROUP BY a.scope, a.key, a.metric, b
        ON CONFLICT (scope, key, metric, bucket) DO NOTHING;
        INSERT INTO rollup_daily (bucket, scope, key, region_code, metric, count, min, max, sum, mean, last, last_time)
        SELECT date_bin('1 day', h.bucket, TIMESTAMPTZ '2000-01-01 00:00:00+07') AS b, h.scope, h.key,
               (array_agg(h.region_code ORDER BY h.last_time DESC))[1], h.metric,
               sum(h.count), min(h.min), max(h.max), sum(h.sum), sum(h.sum) / sum(h.count),
               (array_agg(h.last ORDER BY h.last_time DESC))[1], max(h.last_time)
        FROM rollup_hourly h
        GROUP BY h.scope, h.key, h.metric, b
        ON CONFLICT (scope, key, metric, bucket) DO NOTHING;
        -- a margin for sink transactions in flight right now (recomputing a bucket twice is harmless)
        INSERT INTO rollup_state (name, watermark) VALUES ('rollups', now() - interval '5 minutes');
    END IF;
END $$;
