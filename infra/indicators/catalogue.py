"""The indicator catalogue: pydantic models of catalogue.yaml, validated at load with clear errors.

Field mapping to FIWARE KeyPerformanceIndicator (smart-data-models dataModel.KeyPerformanceIndicator):

  catalogue / indicator_values        KeyPerformanceIndicator
  ---------------------------------   ----------------------------------------------
  id                                  id  (urn:ngsi-ld:KeyPerformanceIndicator:jember:<id>:<region>)
  name                                kpiName
  definition                          description
  promise, program                    process (the work promise / program it measures)
  owner_agency                        organization (the producing agency; the walidata publishes)
  frequency                           calculationFrequency (hourly | daily | weekly | monthly)
  target.value (+ direction)          businessTarget
  value (indicator_values)            kpiValue
  standing                            currentStanding (on_track -> good, at_risk -> fair, off_track -> bad)
  period_start / period_end           calculationPeriod {from, to}
  computed_at                         calculationDate / dateModified
  region_code                         area (the Kemendagri code of the kecamatan or kabupaten)
  formula.kind                        calculationMethod ("automatic"), category ("quantitative")
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.errors import ConfigError
from schemas.service_events import LIFECYCLES

from .periods import PERIOD_NAMES

ID_PATTERN = r"^[a-z0-9][a-z0-9-]{1,62}$"
FIWARE_STANDING = {"on_track": "good", "at_risk": "fair", "off_track": "bad"}
STANDINGS = ("on_track", "at_risk", "off_track")


class CatalogueError(ConfigError):
    """The catalogue file is missing, not YAML, or breaks the schema (the message names each problem)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Condition(_Model):
    """`field op value`. For service events the field is a duration of the entity's lifecycle
    (time_to_resolve_s, ...); for sensor indicators it is `value` (the hourly mean)."""

    field: str = Field(min_length=1)
    op: Literal["lt", "le", "gt", "ge", "eq", "ne"]
    value: float

    def holds(self, x: float) -> bool:
        v = self.value
        return {"lt": x < v, "le": x <= v, "gt": x > v, "ge": x >= v, "eq": x == v, "ne": x != v}[self.op]


class EventFilter(_Model):
    type: str = Field(description="CloudEvents type, e.g. jember.complaint.v1")
    status: str = Field(description="the lifecycle status whose (earliest) event is the observation")


class Formula(_Model):
    kind: Literal["count", "sum", "ratio", "mean", "percentile", "distinct"]
    event: EventFilter | None = None  # source service-events
    metric: str | None = None  # source aggregates: a kecamatan-scope metric (pm25, ...)
    categories: list[str] | None = Field(None, description="keep only observations of these categories")
    where: list[Condition] = Field(default_factory=list, description="observations that fail are left out")
    numerator_when: list[Condition] = Field(
        default_factory=list, description="ratio / count: the observations counted in the numerator")
    field: str | None = Field(None, description="sum / mean / percentile: the numeric field")
    q: float | None = Field(None, ge=0, le=100, description="percentile: 50 = median")
    multiply: float = 1.0  # value = raw * multiply / divide (ratio -> percent: multiply 100;
    divide: float = 1.0  # seconds -> hours: divide 3600)
    person_field: str = Field("person.nik", description="path in data of the pseudonymised person key")

    @model_validator(mode="after")
    def _consistent(self) -> Formula:
        if self.kind == "ratio" and not self.numerator_when:
            raise ValueError("a ratio needs `numerator_when` (the numerator's conditions)")
        if self.numerator_when and self.kind not in ("ratio", "count"):
            raise ValueError("`numerator_when` applies to ratio and count only")
        if self.kind in ("sum", "mean", "percentile") and not self.field:
            raise ValueError(f"`{self.kind}` needs `field`")
        if self.kind == "percentile" and self.q is None:
            raise ValueError("`percentile` needs `q` (0..100)")
        if self.divide == 0 or not math.isfinite(self.divide) or not math.isfinite(self.multiply):
            raise ValueError("`multiply` and `divide` must be finite and `divide` non-zero")
        return self

    def fields(self) -> set[str]:
        used = {c.field for c in (*self.where, *self.numerator_when)}
        if self.field:
            used.add(self.field)
        return used


class Target(_Model):
    value: float | None = Field(None, description="businessTarget; null = no target set yet")
    direction: Literal["higher", "lower"] = Field(description="which way is better")
    placeholder: bool = Field(True, description="true until the owner agency sets the official target")
    at_risk_margin_pct: float = Field(10.0, ge=0, description="within this % of the target: at risk")
    note: str = ""

    def standing(self, value: float | None) -> str | None:
        """on_track when the target is met; at_risk when missed by at most at_risk_margin_pct of the
        target (relative; absolute margin when the target is 0); off_track beyond; None without a
        target or a value."""
        if self.value is None or value is None:
            return None
        t = self.value
        margin = abs(t) * self.at_risk_margin_pct / 100.0 if t != 0 else self.at_risk_margin_pct / 100.0
        if self.direction == "higher":
            if value >= t:
                return "on_track"
            return "at_risk" if value >= t - margin else "off_track"
        if value <= t:
            return "on_track"
        return "at_risk" if value <= t + margin else "off_track"


class Indicator(_Model):
    id: str = Field(pattern=ID_PATTERN)
    name: str = Field(min_length=3, description="nama indikator (Bahasa Indonesia)")
    promise: str = Field(min_length=1, description="janji kerja this indicator belongs to")
    program: str | None = None
    owner_agency: str = Field(min_length=2, description="producing agency (produsen data)")
    walidata: str = Field("Dinas Komunikasi dan Informatika Kabupaten Jember", description="data custodian")
    definition: str = Field(min_length=10)
    source: Literal["service-events", "aggregates"]
    formula: Formula
    unit: str = Field(min_length=1)
    frequency: Literal["hourly", "daily", "weekly", "monthly"]
    target: Target
    region_levels: list[Literal["kecamatan", "kabupaten"]] = Field(
        default_factory=lambda: ["kecamatan", "kabupaten"])  # type: ignore[arg-type]
    breakdown: Literal["category"] | None = Field(None, description="one series per category: <id>.<category>")
    tags: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Indicator:
        f = self.formula
        if not self.region_levels:
            raise ValueError("region_levels must name at least one level")
        if self.source == "service-events":
            if f.event is None or f.metric is not None:
                raise ValueError("a service-events indicator needs formula.event {type, status} and no metric")
            life = LIFECYCLES.get(f.event.type)
            if life is None:
                raise ValueError(f"unknown event type {f.event.type!r} (known: {', '.join(sorted(LIFECYCLES))})")
            if f.event.status not in life.statuses:
                raise ValueError(f"status {f.event.status!r} is not in the lifecycle of {f.event.type} "
                                 f"({', '.join(life.statuses)})")
            durations = {name for name, _, _ in life.durations}
            bad = sorted(x for x in f.fields() if x not in durations)
            if bad:
                raise ValueError(f"unknown field(s) {', '.join(bad)} for {f.event.type}; durations are "
                                 f"{', '.join(sorted(durations)) or 'none'}")
        else:
            if f.metric is None or f.event is not None:
                raise ValueError("an aggregates indicator needs formula.metric and no event")
            if f.kind == "distinct" or self.breakdown is not None or f.categories:
                raise ValueError("sensor indicators have no persons or categories (no distinct/breakdown)")
            bad = sorted(x for x in f.fields() if x != "value")
            if bad:
                raise ValueError(f"sensor indicators know only the field `value` (hourly mean), not {bad}")
        return self

    @property
    def personal(self) -> bool:
        """Computed from personal data: small cells are suppressed (k persons)."""
        return self.source == "service-events"

    @property
    def period(self) -> str:
        return PERIOD_NAMES[self.frequency]

    def metadata(self) -> dict[str, Any]:
        """Satu Data metadata + the FIWARE KeyPerformanceIndicator view of the catalogue entry."""
        data = self.model_dump(mode="json")
        data["period"] = self.period
        data["personal"] = self.personal
        data["fiware"] = {
            "type": "KeyPerformanceIndicator", "kpiName": self.name, "description": self.definition,
            "process": self.promise, "organization": {"name": self.owner_agency},
            "calculationFrequency": self.frequency, "calculationMethod": "automatic",
            "category": ["quantitative"], "businessTarget": self.target.value,
        }
        return data


class Catalogue(_Model):
    version: Literal[1] = 1
    example: bool = Field(False, description="true: an example that officials edit, not official figures")
    notice: str = ""
    indicators: list[Indicator]

    @model_validator(mode="after")
    def _unique(self) -> Catalogue:
        seen: set[str] = set()
        for ind in self.indicators:
            if ind.id in seen:
                raise ValueError(f"indicator id {ind.id!r} appears twice")
            seen.add(ind.id)
        return self

    def get(self, indicator_id: str) -> Indicator | None:
        return next((i for i in self.indicators if i.id == indicator_id), None)

    def by_source(self, source: str) -> list[Indicator]:
        return [i for i in self.indicators if i.source == source]

    def series(self, series_id: str) -> tuple[Indicator, str | None] | None:
        """`id` or `id.CATEGORY` (a breakdown series) -> (indicator, category)."""
        base, _, category = series_id.partition(".")
        ind = self.get(base)
        if ind is None or (category and ind.breakdown is None):
            return None
        return ind, (category or None)


def _format_errors(exc: ValidationError, raw: Mapping[str, Any]) -> str:
    lines = []
    items = raw.get("indicators") if isinstance(raw, Mapping) else None
    for err in exc.errors():
        loc = list(err["loc"])
        where = ".".join(str(x) for x in loc)
        if len(loc) >= 2 and loc[0] == "indicators" and isinstance(loc[1], int) and isinstance(items, list):
            item = items[loc[1]] if loc[1] < len(items) else None
            ident = item.get("id") if isinstance(item, Mapping) else None
            where = f"indicator {ident or '#' + str(loc[1])}: " + ".".join(str(x) for x in loc[2:])
        lines.append(f"  - {where}: {err['msg']}")
    return "\n".join(lines)


def parse_catalogue(text: str, origin: str = "<catalogue>") -> Catalogue:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogueError(f"{origin}: not valid YAML: {exc}") from None
    if not isinstance(raw, Mapping):
        raise CatalogueError(f"{origin}: expected a mapping with `indicators:`")
    try:
        return Catalogue.model_validate(raw)
    except ValidationError as exc:
        raise CatalogueError(f"{origin}: invalid indicator catalogue:\n{_format_errors(exc, raw)}") from None


@lru_cache(maxsize=8)
def _load(path: str | None) -> Catalogue:
    if path is None:
        text = resources.files("infra.indicators").joinpath("catalogue.yaml").read_text("utf-8")
        return parse_catalogue(text, "infra/indicators/catalogue.yaml")
    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise CatalogueError(f"cannot read indicator catalogue {path}: {exc}") from None
    return parse_catalogue(text, path)


def load_catalogue(path: Path | str | None = None) -> Catalogue:
    """The catalogue at `path` (Settings.indicator_catalogue_file), else the shipped example."""
    return _load(str(path) if path is not None else None)
