-- 002: agency service events, entity lifecycles, alerts and their history, API principals, indicators.
-- Plain PostgreSQL; 002_services_alerts.timescale.sql turns the time-series tables into hypertables.

-- One row per accepted service event (CloudEvents id unique per source: the de-duplication key).
-- Personal fields inside `data` are already keyed hashes (HMAC) when they reach this table.
CREATE TABLE IF NOT EXISTS service_events (
    time         timestamptz NOT NULL,
    source       text COLLATE "C" NOT NULL,
    event_id     text COLLATE "C" NOT NULL,
    type         text COLLATE "C" NOT NULL,
    entity_id    text COLLATE "C" NOT NULL,   -- case_id, complaint_id, visit/dispatch/request id
    status       text,
    region_code  text COLLATE "C" NOT NULL,
    kecamatan    text COLLATE "C",
    agency       text,
    data         jsonb NOT NULL,
    ingested_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (time, source, event_id)
);
-- the same event pushed over HTTP, CSV and Kafka is one event (type + entity + status + time)
CREATE UNIQUE INDEX IF NOT EXISTS service_events_natural ON service_events (type, entity_id, status, time);
CREATE INDEX IF NOT EXISTS service_events_region_time ON service_events (region_code, time DESC);
CREATE INDEX IF NOT EXISTS service_events_type_time ON service_events (type, time DESC);

-- The current state of each tracked entity (welfare case, complaint, dispatch, adminduk request)
-- and the durations computed in the stream as closing events arrive.
CREATE TABLE IF NOT EXISTS service_entities (
    type          text COLLATE "C" NOT NULL,
    entity_id     text COLLATE "C" NOT NULL,
    status        text NOT NULL,
    region_code   text COLLATE "C" NOT NULL,
    kecamatan     text COLLATE "C",
    category      text,
    opened_at     timestamptz,
    updated_at    timestamptz NOT NULL,
    durations     jsonb NOT NULL DEFAULT '{}',  -- e.g. {"time_to_verify_s": 86400}
    PRIMARY KEY (type, entity_id)
);

-- Per kecamatan per WIB day: counts per type/status and duration statistics, full state per key.
CREATE TABLE IF NOT EXISTS service_daily (
    day           date NOT NULL,                 -- calendar day in Asia/Jakarta
    kecamatan     text COLLATE "C" NOT NULL,
    type          text COLLATE "C" NOT NULL,
    measure       text COLLATE "C" NOT NULL,     -- 'status:opened', 'time_to_resolve_s', ...
    count         bigint NOT NULL,
    sum           double precision NOT NULL DEFAULT 0,
    min           double precision,
    max           double precision,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (day, kecamatan, type, measure)
);

-- API principals: agency keys (POST /v1/events) and operator tokens (ack/resolve). Hash only.
CREATE TABLE IF NOT EXISTS agencies (
    name        text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    key_hash    text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE TABLE IF NOT EXISTS operators (
    name        text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    token_hash  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- At most one open alert per (rule, entity): the stream keys alerts by a deterministic id.
CREATE TABLE IF NOT EXISTS alerts (
    id            text PRIMARY KEY,
    rule_id       text NOT NULL,
    entity        text NOT NULL,          -- device id, kecamatan code or service entity
    kind          text,
    region_code   text COLLATE "C",
    kecamatan     text COLLATE "C",
    metric        text,
    severity      text NOT NULL CHECK (severity IN ('info', 'warning', 'major', 'critical')),
    state         text NOT NULL CHECK (state IN ('open', 'acknowledged', 'resolved')),
    value         double precision,
    message       text NOT NULL DEFAULT '',
    opened_at     timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    acknowledged_at timestamptz,
    acknowledged_by text,
    resolved_at   timestamptz,
    resolved_by   text,
    trigger_event text,                   -- id of the reading/event that last changed it
    version       bigint NOT NULL DEFAULT 0 -- the stream's transition counter (ordering of upserts)
);
CREATE INDEX IF NOT EXISTS alerts_state_severity ON alerts (state, severity, updated_at DESC);
CREATE INDEX IF NOT EXISTS alerts_rule_entity ON alerts (rule_id, entity, opened_at DESC);

-- Every transition: opened, escalated, deescalated, acknowledged, resolved, reopened. `seq` is the
-- SSE event id (Last-Event-ID replays seq > n); `dedup` makes replays of the stream idempotent.
CREATE TABLE IF NOT EXISTS alert_events (
    seq           bigserial PRIMARY KEY,
    dedup         text NOT NULL UNIQUE,
    alert_id      text NOT NULL,
    time          timestamptz NOT NULL,
    transition    text NOT NULL,
    severity      text NOT NULL,
    state         text NOT NULL,
    actor         text NOT NULL,          -- 'stream' or the operator's name
    value         double precision,
    note          text
);
CREATE INDEX IF NOT EXISTS alert_events_alert ON alert_events (alert_id, seq);

-- The API streams new alert events over SSE: LISTEN arus_alert_events (payload = seq).
CREATE OR REPLACE FUNCTION arus_notify_alert_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('arus_alert_events', NEW.seq::text);
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS alert_events_notify ON alert_events;
CREATE TRIGGER alert_events_notify AFTER INSERT ON alert_events
    FOR EACH ROW EXECUTE FUNCTION arus_notify_alert_event();

-- Program indicators (the regent's 22 work promises) per region and period.
CREATE TABLE IF NOT EXISTS indicator_values (
    indicator_id  text COLLATE "C" NOT NULL,
    region_code   text COLLATE "C" NOT NULL,  -- kabupaten or kecamatan code
    period_start  timestamptz NOT NULL,
    period        text NOT NULL,              -- 'day' | 'month' | 'year'
    value         double precision,           -- NULL when suppressed (small cell)
    numerator     double precision,
    denominator   double precision,
    target        double precision,
    suppressed    boolean NOT NULL DEFAULT false,
    computed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (indicator_id, region_code, period, period_start)
);
