"""Alert rules as data: the YAML file of PRODUCT.md (`ARUS_RULES_FILE`, infra/rules/default.yaml otherwise),
validated once at load. A bad file never reaches the stream: `load_rules` raises `RuleError` naming the
rule id and the field (`arus rules check FILE` prints the same).

    rules:
      - id: river-siaga
        kind: water_level          # scope: kind, device, region (Kemendagri code prefix) - any combination
        metric: waterLevel
        type: threshold            # threshold | rate | absence | sla | aggregate
        levels:                    # ascending severity; each level has its own hysteresis
          - {severity: warning,  above: 2.0, clear_below: 1.8}
          - {severity: critical, above: 3.0, clear_below: 2.8}
        for: 2                     # consecutive readings, or a duration such as 2m
    defaults: {reopen_window: 15m, max_reopens: 3, flap_window: 1h}   # lifecycle, per rule overridable

Durations: an integer number of seconds or a string `500ms`, `90s`, `10m`, `2h`, `3d`.
Single-level rules may skip `levels` and write `severity` + `above`/`below` (+ `clear_below`/`clear_above`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from schemas.alerts import SEVERITIES
from schemas.errors import ConfigError
from schemas.sensors import SENSOR_KINDS

DEFAULT_RULES_FILE = Path(__file__).resolve().parents[2] / "infra" / "rules" / "default.yaml"

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_REGION = re.compile(r"^\d{2}(\.\d{2}(\.\d{2}(\.\d{4})?)?)?$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PREFIX = re.compile(r"^(\w+): ")
_METRICS = {m for k in SENSOR_KINDS.values() for m in k.metrics}


class RuleError(ConfigError):
    """A rule file that cannot be used: names the rule id (or `rules`) and the field."""

    def __init__(self, rule_id: str, field: str, message: str, source: str = "") -> None:
        self.rule_id, self.field, self.detail = rule_id, field, message
        where = f"{source}: " if source else ""
        super().__init__(f"{where}rule {rule_id!r}, field {field!r}: {message}")


def fill(template: str, entity: str, value: float | None) -> str:
    return template.replace("{entity}", entity).replace("{value}", "" if value is None else f"{value:.4g}")


def parse_duration(value: Any) -> int:
    """Milliseconds from `90s`/`10m`/`2h`/`3d`/`500ms` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string such as 10m")
    if isinstance(value, int | float):
        ms = int(value * 1000)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        ms = int(float(m.group(1)) * _UNITS_MS[m.group(2)])
    else:
        raise ValueError(f"{value!r} is not a duration (use e.g. 90s, 10m, 2h, 3d or seconds)")
    if ms <= 0:
        raise ValueError("a duration must be positive")
    return ms


def format_duration(ms: int) -> str:
    for unit in ("d", "h", "m", "s"):
        if ms % _UNITS_MS[unit] == 0:
            return f"{ms // _UNITS_MS[unit]}{unit}"
    return f"{ms}ms"


DurationMs = Annotated[int, BeforeValidator(parse_duration)]
Severity = Literal["info", "warning", "major", "critical"]


class Level(BaseModel):
    """One severity level: enter when the value goes `above` (or `below`) its bound, leave when it falls
    back past `clear_below` (`clear_above`); the band between is the level's hysteresis."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    severity: Severity
    above: float | None = None
    below: float | None = None
    clear_below: float | None = None
    clear_above: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> Level:
        if (self.above is None) == (self.below is None):
            raise ValueError("above: give exactly one of `above` or `below`")
        if self.above is not None:
            if self.clear_above is not None:
                raise ValueError("clear_above: an `above` level clears with `clear_below`")
            if self.clear_below is not None and self.clear_below > self.above:
                raise ValueError(f"clear_below: {self.clear_below} must not exceed above ({self.above})")
        if self.below is not None:
            if self.clear_below is not None:
                raise ValueError("clear_below: a `below` level clears with `clear_above`")
            if self.clear_above is not None and self.clear_above < self.below:
                raise ValueError(f"clear_above: {self.clear_above} must not be under below ({self.below})")
        return self

    @property
    def direction(self) -> int:  # +1 above, -1 below
        return 1 if self.above is not None else -1

    @property
    def enter(self) -> float:
        return self.above if self.above is not None else self.below  # type: ignore[return-value]

    @property
    def clear(self) -> float:
        if self.above is not None:
            return self.clear_below if self.clear_below is not None else self.above
        return self.clear_above if self.clear_above is not None else self.below  # type: ignore[return-value]


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    id: str
    description: str = ""
    message: str = ""  # shown with each alert; {value}, {severity}, {entity} are substituted
    enabled: bool = True
    kind: str | None = None
    device: str | None = None
    region: str | None = None  # Kemendagri code prefix: 35.09 (kabupaten), 35.09.19 (kecamatan), ...
    # lifecycle (defaults from the file's `defaults:`)
    reopen_window: DurationMs = parse_duration("15m")  # a re-trigger this soon after auto-resolve re-opens
    max_reopens: int = Field(3, ge=0)  # more re-opens than this within flap_window = flapping
    flap_window: DurationMs = parse_duration("1h")

    @model_validator(mode="after")
    def _scope(self) -> _Rule:
        if not _ID.match(self.id):
            raise ValueError("id: 1-64 of letters, digits, `_`, `.`, `-` (no `:`)")
        if self.kind is not None and self.kind not in SENSOR_KINDS:
            raise ValueError(f"kind: {self.kind!r} is not one of {', '.join(SENSOR_KINDS)}")
        if self.region is not None and not _REGION.match(self.region):
            raise ValueError(f"region: {self.region!r} is not a Kemendagri code prefix such as 35.09.19")
        metric = getattr(self, "metric", None)
        if metric is not None:
            if self.kind is not None and metric not in SENSOR_KINDS[self.kind].metrics:
                raise ValueError(f"metric: {metric!r} is not a metric of kind {self.kind} "
                                 f"({', '.join(SENSOR_KINDS[self.kind].metrics)})")
            if metric not in _METRICS:
                raise ValueError(f"metric: {metric!r} is not a known metric")
        return self

    def matches_region(self, code: str | None) -> bool:
        r = self.region
        return r is None or (code is not None and (code == r or code.startswith(r + ".")))

    def matches_device(self, device_id: str, kind: str, region: str | None) -> bool:
        return ((self.kind is None or self.kind == kind) and (self.device is None or self.device == device_id)
                and self.matches_region(region))

    def template(self, severity: str) -> str:
        """The alert message with {entity} and {value} left to fill: the rule's `message` or a default."""
        return (self.message or self.default_message("{entity}", severity, "{value}")).replace("{severity}", severity)

    def describe(self, entity: str, severity: str, value: float | None) -> str:
        return fill(self.template(severity), entity, value)

    def default_message(self, entity: str, severity: str, value: str) -> str:
        return f"{self.id} ({severity}) on {entity}"


class _Leveled(_Rule):
    levels: list[Level] = Field(default_factory=list)
    # single-level shorthand
    severity: Severity | None = None
    above: float | None = None
    below: float | None = None
    clear_below: float | None = None
    clear_above: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "levels" not in data and "severity" in data:
            data = dict(data)
            data["levels"] = [{k: data.pop(k) for k in ("severity", "above", "below", "clear_below", "clear_above")
                               if k in data}]
        return data

    @model_validator(mode="after")
    def _ordered(self) -> _Leveled:
        if not self.levels:
            raise ValueError("levels: needs `levels` (or `severity` with `above`/`below`)")
        if len({lv.direction for lv in self.levels}) > 1:
            raise ValueError("levels: all levels of one rule go the same way (all `above` or all `below`)")
        ranks = [SEVERITIES.index(lv.severity) for lv in self.levels]
        if ranks != sorted(set(ranks)):
            raise ValueError("levels: severities must be strictly ascending (info < warning < major < critical)")
        d = self.levels[0].direction
        bounds = [lv.enter * d for lv in self.levels]
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ValueError("levels: each level's bound must be beyond the previous one's "
                             "(`above` ascending, `below` descending)")
        return self


class _Sustained(_Leveled):
    """Rules whose levels are entered only after `for`: N consecutive readings (int) or a duration (str)."""

    for_: int | str = Field(1, alias="for")

    @model_validator(mode="after")
    def _for(self) -> _Sustained:
        if isinstance(self.for_, int):
            if self.for_ < 1:
                raise ValueError("for: at least 1 reading")
        else:
            try:
                parse_duration(self.for_)
            except ValueError as exc:
                raise ValueError(f"for: {exc}") from None
        return self

    @property
    def for_readings(self) -> int:
        return self.for_ if isinstance(self.for_, int) else 1

    @property
    def for_ms(self) -> int:
        return 0 if isinstance(self.for_, int) else parse_duration(self.for_)


class ThresholdRule(_Sustained):
    type: Literal["threshold"]
    metric: str

    def default_message(self, entity: str, severity: str, value: str) -> str:
        lv = next((lv for lv in self.levels if lv.severity == severity), self.levels[0])
        way = "above" if lv.above is not None else "below"
        return f"{self.metric} {value} on {entity}: {way} {lv.enter:g} ({severity})"


class RateRule(_Sustained):
    """The change of `metric` over the last `over` (latest value minus the oldest within `over`)."""

    type: Literal["rate"]
    metric: str
    over: DurationMs

    def default_message(self, entity: str, severity: str, value: str) -> str:
        return f"{self.metric} on {entity} changed by {value} within {format_duration(self.over)} ({severity})"


class AbsenceRule(_Rule):
    """No reading from a device in scope for `after` (event time; see docs/alerts.md for the clock)."""

    type: Literal["absence"]
    after: DurationMs
    severity: Severity = "warning"

    def default_message(self, entity: str, severity: str, value: str) -> str:
        return f"{entity} silent for more than {format_duration(self.after)}"


class SlaRule(_Rule):
    """An entity of event type `event` reached a `start` status and no `end` status within `within`."""

    type: Literal["sla"]
    event: str
    start: str | list[str]
    end: str | list[str]
    within: DurationMs
    severity: Severity = "warning"

    @model_validator(mode="after")
    def _sla_scope(self) -> SlaRule:
        if self.kind is not None or self.device is not None:
            raise ValueError("kind: sla rules are scoped by `event` and `region`, not kind/device")
        if not self.event.startswith("jember."):
            raise ValueError(f"event: {self.event!r} is not an event type such as jember.complaint.v1")
        if set(self.starts) & set(self.ends):
            raise ValueError("end: a status cannot both start and end the SLA")
        return self

    @property
    def starts(self) -> tuple[str, ...]:
        return (self.start,) if isinstance(self.start, str) else tuple(self.start)

    @property
    def ends(self) -> tuple[str, ...]:
        return (self.end,) if isinstance(self.end, str) else tuple(self.end)

    def default_message(self, entity: str, severity: str, value: str) -> str:
        return (f"{entity}: {'/'.join(self.starts)} and not {'/'.join(self.ends)} within "
                f"{format_duration(self.within)}")


class AggregateRule(_Leveled):
    """`agg` of `metric` over the last `over` per kecamatan (from the merged kecamatan windows)."""

    type: Literal["aggregate"]
    metric: str
    agg: Literal["mean", "min", "max", "sum", "count"] = "mean"
    over: DurationMs

    @model_validator(mode="after")
    def _agg_scope(self) -> AggregateRule:
        if self.device is not None:
            raise ValueError("device: aggregate rules are per kecamatan: scope them by `region`, not `device`")
        return self

    def default_message(self, entity: str, severity: str, value: str) -> str:
        return f"{self.agg} {self.metric} over {format_duration(self.over)} in {entity}: {value} ({severity})"


class IndicatorRule(_Rule):
    """A program indicator (infra/indicators catalogue) missing its target in a region: the newest
    period's cell is off_track (or, with `when: at_risk`, at risk or worse). Evaluated by the
    indicator stage as it emits the cell; suppressed cells (too few persons) never alert."""

    type: Literal["indicator"]
    indicator: str  # an indicator id of the catalogue (or a series id such as complaints_sla.pct)
    when: Literal["off_track", "at_risk"] = "off_track"
    period: Literal["hour", "day", "week", "month"] | None = None
    severity: Severity = "warning"

    @model_validator(mode="after")
    def _indicator_scope(self) -> IndicatorRule:
        if self.kind is not None or self.device is not None:
            raise ValueError("kind: indicator rules are scoped by `indicator` and `region`, not kind/device")
        return self

    def matches(self, indicator_id: str, region: str, period: str) -> bool:
        return ((indicator_id == self.indicator or indicator_id.startswith(self.indicator + "."))
                and self.matches_region(region) and (self.period is None or self.period == period))

    def breached(self, standing: str | None) -> bool:
        return standing == "off_track" or (self.when == "at_risk" and standing == "at_risk")

    def default_message(self, entity: str, severity: str, value: str) -> str:
        return f"indicator {entity} below its target: {value} ({self.when.replace('_', ' ')} or worse)"


Rule = ThresholdRule | RateRule | AbsenceRule | SlaRule | AggregateRule | IndicatorRule
RULE_TYPES: dict[str, type[BaseModel]] = {
    "threshold": ThresholdRule, "rate": RateRule, "absence": AbsenceRule, "sla": SlaRule, "aggregate": AggregateRule,
    "indicator": IndicatorRule,
}
_LIFECYCLE = ("reopen_window", "max_reopens", "flap_window")


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_id", {r.id: r for r in self.rules})

    def get(self, rule_id: str) -> Rule | None:
        return self.by_id.get(rule_id)  # type: ignore[attr-defined, no-any-return]

    def of_type(self, cls: type[Any]) -> list[Any]:
        return [r for r in self.rules if isinstance(r, cls) and r.enabled]


def _field(loc: Iterable[Any]) -> str:
    parts = [str(p) for p in loc]
    return ".".join(parts) or "(rule)"


def parse_rules(doc: Any, source: str = "") -> RuleSet:
    if doc is None:
        doc = {"rules": []}
    if not isinstance(doc, dict):
        raise RuleError("rules", "(file)", "the file must be a mapping with a `rules:` list", source)
    unknown = set(doc) - {"rules", "defaults"}
    if unknown:
        raise RuleError("rules", ", ".join(sorted(unknown)), "unknown top-level key (expected rules, defaults)", source)
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict) or set(defaults) - set(_LIFECYCLE):
        raise RuleError("defaults", ", ".join(sorted(set(defaults) - set(_LIFECYCLE))) if isinstance(defaults, dict)
                        else "defaults", f"defaults may set only {', '.join(_LIFECYCLE)}", source)
    items = doc.get("rules") or []
    if not isinstance(items, list):
        raise RuleError("rules", "rules", "must be a list of rules", source)
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RuleError(f"#{i + 1}", "(rule)", "each rule is a mapping", source)
        rule_id = str(item.get("id") or f"#{i + 1}")
        if "id" not in item:
            raise RuleError(rule_id, "id", "every rule needs an id", source)
        kind = item.get("type")
        model = RULE_TYPES.get(kind) if isinstance(kind, str) else None
        if model is None:
            raise RuleError(rule_id, "type", f"{kind!r} is not one of {', '.join(RULE_TYPES)}", source)
        if rule_id in seen:
            raise RuleError(rule_id, "id", "duplicate rule id", source)
        seen.add(rule_id)
        try:
            rule = model.model_validate({**{k: v for k, v in defaults.items()}, **item})
        except ValidationError as exc:
            err = exc.errors()[0]
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            field = _field(err.get("loc", ()))
            if (m := _PREFIX.match(msg)) is not None:  # a check across fields names its field first
                field = ".".join(p for p in (field if field != "(rule)" else "", m.group(1)) if p)
                msg = msg[m.end():]
            raise RuleError(rule_id, field, msg, source) from None
        rules.append(rule)  # type: ignore[arg-type]
    return RuleSet(tuple(rules), source)


def load_rules(path: Path | str | None = None) -> RuleSet:
    """The rules of `path` (ARUS_RULES_FILE), or the shipped default."""
    p = Path(path) if path is not None else DEFAULT_RULES_FILE
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleError("rules", "(file)", f"cannot read {p}: {exc.strerror or exc}", str(p)) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleError("rules", "(file)", f"not valid YAML: {exc}", str(p)) from None
    return parse_rules(doc, str(p))


def summarize(rule: Rule) -> str:
    """One line per rule for `arus rules check`."""
    scope = ", ".join(f"{k}={v}" for k, v in (("kind", rule.kind), ("device", rule.device), ("region", rule.region))
                      if v) or "everything"
    if isinstance(rule, SlaRule):
        what = (f"{rule.event}: {'/'.join(rule.starts)} -> {'/'.join(rule.ends)} within "
                f"{format_duration(rule.within)} -> {rule.severity}")
    elif isinstance(rule, AbsenceRule):
        what = f"silent for {format_duration(rule.after)} -> {rule.severity}"
    elif isinstance(rule, IndicatorRule):
        what = f"indicator {rule.indicator} {rule.when} or worse" + (f" ({rule.period})" if rule.period else "") + (
            f" -> {rule.severity}")
    else:
        levels = "; ".join(
            f"{lv.severity} {'>' if lv.direction > 0 else '<'} {lv.enter:g} (clear {lv.clear:g})" for lv in rule.levels)
        if isinstance(rule, ThresholdRule):
            what = f"{rule.metric}: {levels}" + (f", for {rule.for_}" if rule.for_ != 1 else "")
        elif isinstance(rule, RateRule):
            what = f"change of {rule.metric} over {format_duration(rule.over)}: {levels}" + (
                f", for {rule.for_}" if rule.for_ != 1 else "")
        else:
            what = f"{rule.agg} {rule.metric} over {format_duration(rule.over)} per kecamatan: {levels}"
    off = "" if rule.enabled else " [disabled]"
    return f"{rule.id:<24} {rule.type:<9} [{scope}] {what}{off}"


def check_main(path: str | None) -> int:
    """`arus rules check [FILE]`: validate and print; exit 1 with the error otherwise."""
    import sys

    try:
        ruleset = load_rules(path)
    except RuleError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    print(f"{ruleset.source}: {len(ruleset.rules)} rules, valid")
    for rule in ruleset.rules:
        print("  " + summarize(rule))
    return 0
