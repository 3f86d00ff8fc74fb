-- TimescaleDB path of 005 (runs only when the timescaledb extension is available; 001's part has
-- already made readings and aggregates hypertables). The plain rollup tables of 005_rollups.sql are
-- replaced by continuous aggregates with the same names and columns, so every query (API, Grafana,
-- docs/queries.md) reads them the same way on both paths.
--
-- Created WITH NO DATA: a migration runs in a transaction, where a continuous aggregate cannot be
-- materialised. Real-time aggregation (materialized_only = false) answers from the 1-minute
-- aggregates for what is not materialised yet; the refresh policies materialise recent buckets, and
-- consumers/rollups.py runs one full refresh_continuous_aggregate() outside any transaction the
-- first time `arus sink` starts on this database (history of an upgraded database).
--
-- The ages below are the defaults of infra/settings.py (retention_*_days, compress_after_days);
-- consumers/rollups.py re-applies the configured ones at sink start when they differ.

DROP TABLE IF EXISTS rollup_hourly;
DROP TABLE IF EXISTS rollup_daily;
-- the plain job's index on updated_at is not needed (continuous aggregates track invalidations)
DROP INDEX IF EXISTS aggregates_updated_at;
DROP INDEX IF EXISTS aggregates_bucket_brin;  -- chunks are dropped whole by the retention policy

CREATE MATERIALIZED VIEW IF NOT EXISTS rollup_hourly
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 hour', a.bucket) AS bucket,
       a.scope,
       a.key,
       a.region_code,
       a.metric,
       sum(a.count)::bigint AS count,
       min(a.min) AS min,
       max(a.max) AS max,
       sum(a.sum) AS sum,
       sum(a.sum) / sum(a.count) AS mean,
       last(a.last, a.last_time) AS last,
       max(a.last_time) AS last_time
FROM aggregates a
GROUP BY time_bucket(INTERVAL '1 hour', a.bucket), a.scope, a.key, a.region_code, a.metric
WITH NO DATA;

-- Days start at 00:00 Asia/Jakarta, like the plain path's date_bin origin.
CREATE MATERIALIZED VIEW IF NOT EXISTS rollup_daily
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 day', a.bucket, 'Asia/Jakarta') AS bucket,
       a.scope,
       a.key,
       a.region_code,
       a.metric,
       sum(a.count)::bigint AS count,
       min(a.min) AS min,
       max(a.max) AS max,
       sum(a.sum) AS sum,
       sum(a.sum) / sum(a.count) AS mean,
       last(a.last, a.last_time) AS last,
       max(a.last_time) AS last_time
FROM aggregates a
GROUP BY time_bucket(INTERVAL '1 day', a.bucket, 'Asia/Jakarta'), a.scope, a.key, a.region_code, a.metric
WITH NO DATA;

CREATE INDEX IF NOT EXISTS rollup_hourly_scope_metric_region ON rollup_hourly (scope, metric, region_code, bucket);
CREATE INDEX IF NOT EXISTS rollup_daily_scope_metric_region ON rollup_daily (scope, metric, region_code, bucket);

-- Refresh: readings up to 7 days old are accepted (max_age_s), so the windows reach back 8/9 days;
-- a refresh only recomputes buckets whose source rows changed (invalidation log), so the wide
-- window costs little. The newest buckets come from real-time aggregation meanwhile.
SELECT add_continuous_aggregate_policy('rollup_hourly', start_offset => INTERVAL '8 days',
                                       end_offset => INTERVAL '1 hour', schedule_interval => INTERVAL '5 minutes',
                                       if_not_exists => TRUE);
SELECT add_continuous_aggregate_policy('rollup_daily', start_offset => INTERVAL '9 days',
                                       end_offset => INTERVAL '1 hour', schedule_interval => INTERVAL '30 minutes',
                                       if_not_exists => TRUE);

-- Compression: segmented by series, ordered by time, after compress_after_days (default 7).
ALTER TABLE readings SET (timescaledb.compress, timescaledb.compress_segmentby = 'device_id, metric',
                          timescaledb.compress_orderby = 'time DESC');
SELECT add_compression_policy('readings', compress_after => INTERVAL '7 days', if_not_exists => TRUE);
ALTER TABLE aggregates SET (timescaledb.compress, timescaledb.compress_segmentby = 'scope, key, metric',
                            timescaledb.compress_orderby = 'bucket DESC');
SELECT add_compression_policy('aggregates', compress_after => INTERVAL '7 days', if_not_exists => TRUE);
ALTER MATERIALIZED VIEW rollup_hourly SET (timescaledb.compress = true);
SELECT add_compression_policy('rollup_hourly', compress_after => INTERVAL '30 days', if_not_exists => TRUE);

-- Retention (drop whole chunks): readings 400 days, 1-minute aggregates 5 years, hourly rollups
-- 5 years; daily rollups are kept.
SELECT add_retention_policy('readings', drop_after => INTERVAL '400 days', if_not_exists => TRUE);
SELECT add_retention_policy('aggregates', drop_after => INTERVAL '1825 days', if_not_exists => TRUE);
SELECT add_retention_policy('rollup_hourly', drop_after => INTERVAL '1825 days', if_not_exists => TRUE);

-- The plain job's watermark is not used on this path; the row records the one full refresh.
DELETE FROM rollup_state WHERE name = 'rollups';
