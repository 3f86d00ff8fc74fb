"""Alert rules, their evaluation in event time and the alert lifecycle (see docs/alerts.md)."""
