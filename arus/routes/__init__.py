"""HTTP routes of the query side (devices, regions, series, alerts, indicators, pages), one module each.
arus/api.py mounts them. Agency ingest (POST /v1/events) is a producer: producers/agency_http.py."""
