"""Stream processors: validation, de-duplication, event-time windows, (later) rules and indicators.

Pure logic lives in plain modules (windows, validation, telemetry, region_merge) testable without Kafka;
runtime.py is the thin Kafka adapter and app.py assembles the Faust worker.
"""
