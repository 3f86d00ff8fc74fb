"""Producers: the MQTT → Kafka gateway and the Jember telemetry simulator. Import schemas and infra only."""
