"""Topic suffixes; the full name is ARUS_TOPIC_PREFIX + suffix (default prefix `jember.`)."""

INGEST = "ingest"
TELEMETRY = "telemetry"
SERVICE_EVENTS = "service-events"
DLQ = "dlq"
AGGREGATES = "aggregates"
ALERTS = "alerts"
INDICATORS = "indicators"
DEVICE_STATUS = "device-status"  # extension: online/offline of devices, keyed by device id
SERVICE_DAILY = "service-daily"  # extension: per kecamatan per WIB day service counts/durations (full cell state)
# internal: state checkpoints of the processors and per-partition kecamatan partial aggregates
WINDOW_STATE = "internal.window-state"
REGION_PARTIALS = "internal.region-partials"
REGION_STATE = "internal.region-state"
# internal: the indicator stage (service events and kecamatan aggregates re-keyed by kabupaten) and its checkpoints
INDICATOR_INPUT = "internal.indicator-input"
INDICATOR_ROUTE_STATE = "internal.indicator-route-state"
INDICATOR_SENSOR_ROUTE_STATE = "internal.indicator-sensor-route-state"
INDICATOR_STATE = "internal.indicator-state"

PUBLIC = [INGEST, TELEMETRY, SERVICE_EVENTS, DLQ, AGGREGATES, ALERTS, INDICATORS, DEVICE_STATUS, SERVICE_DAILY]
INTERNAL = [WINDOW_STATE, REGION_PARTIALS, REGION_STATE, INDICATOR_INPUT, INDICATOR_ROUTE_STATE, INDICATOR_SENSOR_ROUTE_STATE,
            INDICATOR_STATE]
