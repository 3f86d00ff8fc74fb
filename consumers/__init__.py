"""Consumers of Arus's Kafka topics; `sink` writes telemetry, aggregates and dead letters to PostgreSQL."""
