"""Prometheus metrics of the MQTT gateway, registered on an injected registry (tests use their own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.received = Counter(
            "arus_gateway_messages_received", "MQTT messages received", ["kind"], registry=registry
        )
        self.produced = Counter(
            "arus_gateway_records_produced", "Kafka records confirmed by the broker", ["topic"], registry=registry
        )
        self.rejected = Counter(
            "arus_gateway_rejected", "Readings refused by the gateway, by reason", ["reason"], registry=registry
        )
        self.produce_latency = Histogram(
            "arus_gateway_produce_latency_seconds",
            "From MQTT receipt to Kafka delivery confirmation",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=registry,
        )
        self.batch_size = Histogram(
            "arus_gateway_batch_messages", "MQTT messages handed to Kafka per batch",
            buckets=(1, 5, 10, 50, 100, 500, 1000, 5000, 20000), registry=registry,
        )
        self.inflight = Gauge(
            "arus_gateway_inflight_unacked", "MQTT messages received but not yet acknowledged", registry=registry
        )
        self.mqtt_connected = Gauge(
            "arus_gateway_mqtt_connected", "1 while connected to the MQTT broker", registry=registry
        )
        self.kafka_errors = Counter(
            "arus_gateway_kafka_errors", "Failed Kafka deliveries (retried)", registry=registry
        )
        self.mqtt_disconnects = Counter(
            "arus_gateway_mqtt_disconnects", "Lost MQTT connections", registry=registry
        )
