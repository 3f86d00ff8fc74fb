-- 010: service_daily as the sum of per-ingest-partition parts.
-- Each worker partition aggregates the service events it receives (entities are keyed by id, so one
-- entity's lifecycle is on one partition) and owns one part of each (day, kecamatan, type, measure)
-- cell: its full state replaces that part (only by a newer version: the input offset it reflects),
-- and service_daily holds the sum of the parts, recomputed by the record sink in the same
-- transaction. A backfill recount (events behind the worker's horizon) rebuilds one partition's part
-- from the stored events of that partition: service_events.ingest_partition.
ALTER TABLE service_events ADD COLUMN IF NOT EXISTS ingest_partition integer;

CREATE TABLE IF NOT EXISTS service_daily_parts (
    day           date NOT NULL,
    kecamatan     text COLLATE "C" NOT NULL,
    type          text COLLATE "C" NOT NULL,
    measure       text COLLATE "C" NOT NULL,
    part          integer NOT NULL,            -- the jember.ingest partition that counted it
    count         bigint NOT NULL,
    sum           double precision NOT NULL DEFAULT 0,
    min           double precision,
    max           double precision,
    version       bigint NOT NULL,             -- input offset of that partition the state reflects
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (day, kecamatan, type, measure, part)
);
