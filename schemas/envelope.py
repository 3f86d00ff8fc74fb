"""The CloudEvents 1.0 envelope (structured JSON mode) every Kafka message on jember.ingest carries."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

TYPE_PATTERN = re.compile(r"^jember\.[a-z0-9_]+(\.[a-z0-9_]+)*\.v[0-9]+$")
REGION_PATTERN = re.compile(r"^35(\.\d{2}(\.\d{2}(\.\d{4})?)?)?$")
TELEMETRY_TYPE = "jember.sensor.telemetry.v1"
STATUS_TYPE = "jember.sensor.status.v1"


class CloudEvent(BaseModel):
    """CloudEvents 1.0 with the Arus extension attribute `region` (Kemendagri code)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: str = Field("1.0", pattern=r"^1\.0$")
    id: str = Field(min_length=1, max_length=200)
    source: str = Field(min_length=1, max_length=300)
    type: str = Field(pattern=TYPE_PATTERN.pattern)
    time: AwareDatetime
    subject: str | None = Field(None, max_length=200)
    datacontenttype: str = "application/json"
    region: str | None = Field(None, pattern=REGION_PATTERN.pattern)
    data: Any = None


def parse_event_time(value: Any) -> datetime | None:
    """RFC 3339 with an offset, or epoch milliseconds; None when neither (naive times are refused)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        if not math.isfinite(value) or not (0 <= value < 1e14):
            return None
        return datetime.fromtimestamp(value / 1000.0, UTC)
    if isinstance(value, str) and 10 <= len(value) <= 40:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            return None
        return parsed.astimezone(UTC)
    return None


def epoch_ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def iso_utc_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000.0, UTC).isoformat(timespec="milliseconds")


class TelemetryPayload(BaseModel):
    """The compact payload a device publishes on jember/v1/{device_id}/telemetry."""

    model_config = ConfigDict(extra="forbid")

    ts: AwareDatetime | int = Field(description="RFC 3339 with offset, or epoch milliseconds")
    seq: int | None = Field(None, ge=0)
    values: dict[str, float] = Field(min_length=1, max_length=32)

    @field_validator("values")
    @classmethod
    def _finite(cls, v: dict[str, float]) -> dict[str, float]:
        for name, value in v.items():
            if not math.isfinite(value):
                raise ValueError(f"{name} is not a finite number")
        return v
