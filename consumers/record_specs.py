"""The registry of record tables (see consumers.records). Each feature keeps its converters in its own
module and lists them here."""

from __future__ import annotations

from .records import TableSpec


def all_specs() -> list[TableSpec]:
    specs: list[TableSpec] = []
    # Features append their specs below (one line each), e.g.:
    #   from .device_status_rows import SPECS as device_status; specs += device_status
    from .device_status_rows import SPECS as device_status; specs += device_status  # noqa: E702, I001
    from .service_rows import SPECS as service_rows; specs += service_rows  # noqa: E702, I001
    from .alert_rows import SPECS as alert_rows; specs += alert_rows  # noqa: E702, I001
    from .indicator_rows import SPECS as indicator_rows; specs += indicator_rows  # noqa: E702, I001
    return specs
