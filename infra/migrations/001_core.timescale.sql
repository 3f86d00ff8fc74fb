-- TimescaleDB path of 001 (runs only when the timescaledb extension is available).
-- The primary key leads with time, so the default (time DESC) index would only duplicate it.
SELECT create_hypertable('readings', 'time', chunk_time_interval => INTERVAL '1 day', if_not_exists => TRUE,
                         migrate_data => TRUE, create_default_indexes => FALSE);
SELECT create_hypertable('aggregates', 'bucket', chunk_time_interval => INTERVAL '7 days', if_not_exists => TRUE, migrate_data => TRUE);
