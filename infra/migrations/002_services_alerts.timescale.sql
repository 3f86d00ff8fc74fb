-- TimescaleDB path of 002 (runs only when the timescaledb extension is available).
SELECT create_hypertable('service_events', 'time', chunk_time_interval => INTERVAL '30 days',
                         if_not_exists => TRUE, migrate_data => TRUE);
