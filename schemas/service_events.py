"""Agency service events: versioned pydantic models per CloudEvents type, lifecycles, validation.

Types (CloudEvents `type`, `data` is the model; extra `data` fields are allowed and kept):

  jember.welfare.case.v1        Dinas Sosial: a welfare case (PMKS) through its lifecycle
  jember.complaint.v1           the complaint desk: a citizen complaint through its lifecycle
  jember.health.visit.v1        Dinas Kesehatan: a puskesmas visit
  jember.emergency.dispatch.v1  ambulance / emergency service: dispatch -> arrival
  jember.adminduk.request.v1    Dispendukcapil: a civil-registration request (KTP, KK, akta, ...)

`validate_service_event` checks a structured-mode CloudEvent (a dict) and returns `Ok(ServiceEvent)`
or `Rejected(reason, message)`; it never raises. NIK values are checked here too (16 digits, a
province/kabupaten prefix that exists, for Jember an existing kecamatan, a plausible birth date);
values already pseudonymised (`hmac:<32 hex>`) pass. Rejection messages never quote personal
values. Personal fields are left untouched: hashing them is infra/privacy.py's job.

`python -m schemas.service_events --export` writes schemas/jsonschema/<type>.json.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from schemas import reasons
from schemas.envelope import REGION_PATTERN, TYPE_PATTERN, parse_event_time
from schemas.regions import Region
from schemas.results import Ok, Rejected

WELFARE_CASE = "jember.welfare.case.v1"
COMPLAINT = "jember.complaint.v1"
HEALTH_VISIT = "jember.health.visit.v1"
EMERGENCY_DISPATCH = "jember.emergency.dispatch.v1"
ADMINDUK_REQUEST = "jember.adminduk.request.v1"

HMAC_PATTERN = r"^hmac:[0-9a-f]{32}$"
NIK_PATTERN = r"^(\d{16}|hmac:[0-9a-f]{32})$"
PHONE_PATTERN = r"^(\+?[0-9][0-9 ().-]{5,24}|hmac:[0-9a-f]{32})$"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/#-]{0,127}$"
SEALED_PREFIX = "sealed:"

# Event-time policy of service events (agency records are often entered days or months late: a
# spreadsheet of last year's cases is still valid input). Used by HTTP/CSV ingest and the worker.
SERVICE_MAX_AGE_MS = 400 * 86_400_000
SERVICE_MAX_FUTURE_MS = 300_000

# Kemendagri province codes (2023: incl. the new Papua provinces 93..96).
PROVINCE_CODES = frozenset(
    ["11", "12", "13", "14", "15", "16", "17", "18", "19", "21", "31", "32", "33", "34", "35", "36",
     "51", "52", "53", "61", "62", "63", "64", "65", "71", "72", "73", "74", "75", "76", "81", "82",
     "91", "92", "93", "94", "95", "96"]
)
JEMBER_NIK_PREFIX = "3509"


@lru_cache(maxsize=1)
def load_pmks_categories() -> dict[str, str]:
    """PMKS code -> name, from schemas/reference/pmks_categories.csv (PMKS01..PMKS26)."""
    text = resources.files("schemas").joinpath("reference/pmks_categories.csv").read_text("utf-8")
    return {row["code"].strip(): row["name"].strip() for row in csv.DictReader(text.splitlines())}


# --------------------------------------------------------------------------- models


class Person(BaseModel):
    """A citizen. Every field is personal data (UU 27/2022): hashed at ingest (`hmac:...`)."""

    model_config = ConfigDict(extra="allow")

    nik: str | None = Field(None, pattern=NIK_PATTERN, description="16-digit NIK, or its keyed hash")
    name: str | None = Field(None, min_length=1, max_length=200)
    phone: str | None = Field(None, pattern=PHONE_PATTERN)


class _Data(BaseModel):
    model_config = ConfigDict(extra="allow", str_strip_whitespace=True)


class WelfareCaseV1(_Data):
    """jember.welfare.case.v1: registered -> verified -> assisted -> closed."""

    case_id: str = Field(pattern=ID_PATTERN)
    status: Literal["registered", "verified", "assisted", "closed"]
    pmks_category: str | None = Field(
        None, description="PMKS01..PMKS26 (reference/pmks_categories.csv); required when registered"
    )
    person: Person | None = None
    program: str | None = Field(None, max_length=100, description="e.g. PKH, BPNT, KIS")

    @field_validator("pmks_category")
    @classmethod
    def _known_pmks(cls, v: str | None) -> str | None:
        if v is not None and v not in load_pmks_categories():
            raise ValueError("unknown PMKS category (expected PMKS01..PMKS26)")
        return v

    @model_validator(mode="after")
    def _required_when_opening(self) -> Any:
        if self.status == "registered" and self.pmks_category is None:
            raise ValueError("pmks_category is required when status is registered")
        return self


class ComplaintV1(_Data):
    """jember.complaint.v1: opened -> assigned -> resolved."""

    complaint_id: str = Field(pattern=ID_PATTERN)
    status: Literal["opened", "assigned", "resolved"]
    category: str | None = Field(None, min_length=1, max_length=100, description="required when opened")
    agency: str | None = Field(None, min_length=1, max_length=100, description="the responsible OPD")
    channel: str | None = Field(None, min_length=1, max_length=50, description="web, wa, phone, walk_in, ...")
    reporter: Person | None = None

    @model_validator(mode="after")
    def _required_when_opening(self) -> Any:
        if self.status == "opened" and self.category is None:
            raise ValueError("category is required when status is opened")
        return self


class HealthVisitV1(_Data):
    """jember.health.visit.v1: one visit to a puskesmas (status is always `visited`)."""

    visit_id: str = Field(pattern=ID_PATTERN)
    status: Literal["visited"] = "visited"
    puskesmas: str = Field(min_length=1, max_length=100, description="puskesmas code or name")
    service: str | None = Field(None, min_length=1, max_length=100, description="e.g. umum, kia, gigi, imunisasi")
    diagnosis_category: str | None = Field(None, min_length=1, max_length=100, description="e.g. ICD-10 chapter")
    patient: Person | None = None


class EmergencyDispatchV1(_Data):
    """jember.emergency.dispatch.v1: dispatched -> arrived."""

    dispatch_id: str = Field(pattern=ID_PATTERN)
    status: Literal["dispatched", "arrived"]
    unit: str | None = Field(None, min_length=1, max_length=100, description="ambulance/vehicle id")
    incident_category: str | None = Field(None, min_length=1, max_length=100, description="e.g. medical, fire, accident")
    patient: Person | None = None


class AdmindukRequestV1(_Data):
    """jember.adminduk.request.v1: submitted -> completed."""

    request_id: str = Field(pattern=ID_PATTERN)
    status: Literal["submitted", "completed"]
    service: str | None = Field(
        None, min_length=1, max_length=100, description="KTP, KK, akta_kelahiran, ...; required when submitted"
    )
    channel: str | None = Field(None, min_length=1, max_length=50)
    applicant: Person | None = None

    @model_validator(mode="after")
    def _required_when_opening(self) -> Any:
        if self.status == "submitted" and self.service is None:
            raise ValueError("service is required when status is submitted")
        return self


SERVICE_TYPES: dict[str, type[BaseModel]] = {
    WELFARE_CASE: WelfareCaseV1,
    COMPLAINT: ComplaintV1,
    HEALTH_VISIT: HealthVisitV1,
    EMERGENCY_DISPATCH: EmergencyDispatchV1,
    ADMINDUK_REQUEST: AdmindukRequestV1,
}


@dataclass(frozen=True, slots=True)
class Lifecycle:
    entity_field: str
    statuses: tuple[str, ...]  # in lifecycle order
    durations: tuple[tuple[str, str, str], ...]  # (name, from_status, to_status)
    category_field: str | None = None  # data field copied to ServiceEvent.category


LIFECYCLES: dict[str, Lifecycle] = {
    WELFARE_CASE: Lifecycle(
        "case_id",
        ("registered", "verified", "assisted", "closed"),
        (
            ("time_to_verify_s", "registered", "verified"),
            ("time_to_assist_s", "registered", "assisted"),
            ("time_to_close_s", "registered", "closed"),
        ),
        "pmks_category",
    ),
    COMPLAINT: Lifecycle(
        "complaint_id",
        ("opened", "assigned", "resolved"),
        (("time_to_assign_s", "opened", "assigned"), ("time_to_resolve_s", "opened", "resolved")),
        "category",
    ),
    HEALTH_VISIT: Lifecycle("visit_id", ("visited",), (), "service"),
    EMERGENCY_DISPATCH: Lifecycle(
        "dispatch_id", ("dispatched", "arrived"), (("response_time_s", "dispatched", "arrived"),), "incident_category"
    ),
    ADMINDUK_REQUEST: Lifecycle(
        "request_id", ("submitted", "completed"), (("service_time_s", "submitted", "completed"),), "service"
    ),
}


# --------------------------------------------------------------------------- the validated event


@dataclass(slots=True)
class ServiceEvent:
    id: str
    source: str
    type: str
    time_ms: int  # event time, UTC epoch ms
    region: str  # Kemendagri code (kabupaten, kecamatan or desa)
    kecamatan: str | None  # PP.KK.CC, None for a kabupaten-level event
    entity_id: str
    status: str | None
    category: str | None
    agency: str | None
    data: dict[str, Any] = field(default_factory=dict)
    subject: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ServiceEvent:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__ if k in d})  # type: ignore[arg-type]

    def natural_key(self) -> tuple[str, str, str | None, int]:
        """The same event pushed over HTTP, CSV and Kafka has this key (table service_events_natural)."""
        return (self.type, self.entity_id, self.status, self.time_ms)


# --------------------------------------------------------------------------- NIK


def nik_problem(nik: Any, region_codes: Iterable[str] | Mapping[str, Any]) -> str | None:
    """Why `nik` is not a valid NIK (no personal value quoted), or None when it is valid.

    Structure: PPKKCC DDMMYY SSSS. PP must be a province code, KK and CC non-zero; for Jember
    (3509) CC must be a kecamatan of the reference file (35.09.CC). DD is 01..31, or 41..71 for women;
    MM 01..12; the serial SSSS is non-zero.
    """
    if not isinstance(nik, str):
        return "NIK must be a string of 16 digits"
    if not re.fullmatch(r"\d{16}", nik):
        return "NIK must be exactly 16 digits"
    prov, kab, kec = nik[0:2], nik[2:4], nik[4:6]
    if prov not in PROVINCE_CODES:
        return "NIK province code does not exist"
    if kab == "00" or kec == "00":
        return "NIK kabupaten/kecamatan code does not exist"
    if prov + kab == JEMBER_NIK_PREFIX and f"35.09.{kec}" not in region_codes:
        return "NIK kecamatan code does not exist in Kabupaten Jember"
    day, month = int(nik[6:8]), int(nik[8:10])
    if day > 40:
        day -= 40
    if not (1 <= day <= 31) or not (1 <= month <= 12):
        return "NIK birth date part is not a date"
    if nik[12:16] == "0000":
        return "NIK serial number must not be 0000"
    return None


def synthetic_nik(kecamatan_code: str, day: int, month: int, year: int, serial: int, female: bool = False) -> str:
    """A structurally valid (fake) NIK for tests and the simulator, e.g. ("35.09.19", 17, 8, 1985, 7)."""
    parts = kecamatan_code.split(".")
    prefix = "".join(parts[:3])
    return f"{prefix}{day + (40 if female else 0):02d}{month:02d}{year % 100:02d}{serial % 10000 or 1:04d}"


def _walk_key(obj: Any, key: str, path: str = "data") -> Iterable[tuple[str, Any]]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            p = f"{path}.{k}"
            if isinstance(k, str) and k.casefold() == key:
                yield p, v
            yield from _walk_key(v, key, p)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk_key(v, key, f"{path}[{i}]")


def check_niks(data: Any, region_codes: Iterable[str] | Mapping[str, Any]) -> Rejected | None:
    """Every `nik` at any depth of `data` is a valid NIK, a keyed hash, a sealed value, or null."""
    for path, value in _walk_key(data, "nik"):
        if value is None:
            continue
        if isinstance(value, str) and (re.fullmatch(HMAC_PATTERN, value) or value.startswith(SEALED_PREFIX)):
            continue
        problem = nik_problem(value, region_codes)
        if problem:
            return Rejected(reasons.INVALID_NIK, f"{path}: {problem}")
    return None


# --------------------------------------------------------------------------- validation


def _error_message(err: ValidationError) -> tuple[str, str]:
    """(reason, message) from a pydantic error, never quoting input values (they may be personal)."""
    reason = reasons.INVALID_PAYLOAD
    parts = []
    for e in err.errors(include_url=False, include_input=False)[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()))
        msg = str(e.get("msg", "invalid"))
        if "pmks" in loc or "PMKS" in msg:
            reason = reasons.INVALID_PMKS_CATEGORY
        elif loc.endswith("nik") and reason == reasons.INVALID_PAYLOAD:
            reason = reasons.INVALID_NIK
        elif loc == "status" and reason == reasons.INVALID_PAYLOAD:
            reason = reasons.INVALID_STATUS
        parts.append(f"data.{loc}: {msg}" if loc else f"data: {msg}")
    return reason, "; ".join(parts)


def _rej(reason: str, message: str, env: Any) -> Rejected:
    return Rejected(reason, message, raw=env)


def validate_service_event(
    env: Mapping[str, Any],
    regions: Mapping[str, Region],
    now_ms: int,
    max_age_ms: int,
    max_future_ms: int,
) -> Ok[ServiceEvent] | Rejected:
    """Check a CloudEvents 1.0 structured-mode service event. Never raises. A rejection's message
    never quotes a NIK-shaped value, whatever field it was found in (the message travels in clear)."""
    try:
        result = _validate(env, regions, now_ms, max_age_ms, max_future_ms)
    except Exception as exc:  # noqa: BLE001 - the contract: validation never raises
        return _rej(reasons.INVALID_ENVELOPE, f"unexpected input: {type(exc).__name__}", env)
    if isinstance(result, Rejected) and _DIGIT_RUN.search(result.message):
        return Rejected(result.reason, _DIGIT_RUN.sub("***", result.message), result.raw, result.position)
    return result


_DIGIT_RUN = re.compile(r"\d{16}")  # a NIK, or 16+ digits that may hide one


def _validate(
    env: Mapping[str, Any], regions: Mapping[str, Region], now_ms: int, max_age_ms: int, max_future_ms: int
) -> Ok[ServiceEvent] | Rejected:
    if not isinstance(env, Mapping):
        return _rej(reasons.INVALID_ENVELOPE, "an event must be a JSON object", env)
    if env.get("specversion") != "1.0":
        return _rej(reasons.INVALID_ENVELOPE, "specversion must be \"1.0\"", env)
    for attr, limit in (("id", 200), ("source", 300)):
        value = env.get(attr)
        if not isinstance(value, str) or not value.strip() or len(value) > limit:
            return _rej(reasons.INVALID_ENVELOPE, f"{attr} must be a non-empty string of at most {limit} chars", env)
    etype = env.get("type")
    if not isinstance(etype, str) or not TYPE_PATTERN.match(etype):
        return _rej(reasons.INVALID_ENVELOPE, "type must look like jember.<family>.<name>.v<N>", env)
    model = SERVICE_TYPES.get(etype)
    if model is None:
        return _rej(reasons.UNKNOWN_TYPE, f"unknown service event type {etype!r}; known: {sorted(SERVICE_TYPES)}", env)
    subject = env.get("subject")
    if subject is not None and (not isinstance(subject, str) or len(subject) > 200):
        return _rej(reasons.INVALID_ENVELOPE, "subject must be a string of at most 200 chars", env)
    dct = env.get("datacontenttype")
    if dct is not None and (not isinstance(dct, str) or not dct.startswith("application/json")):
        return _rej(reasons.INVALID_ENVELOPE, "datacontenttype must be application/json", env)

    raw_time = env.get("time")
    parsed = parse_event_time(raw_time) if isinstance(raw_time, str) else None
    if parsed is None:
        return _rej(reasons.INVALID_TIMESTAMP, "time must be RFC 3339 with an offset, e.g. 2026-11-28T08:00:00+07:00", env)
    time_ms = int(parsed.timestamp() * 1000)
    if time_ms < now_ms - max_age_ms:
        return _rej(reasons.TOO_OLD, f"time is older than {max_age_ms // 1000} s", env)
    if time_ms > now_ms + max_future_ms:
        return _rej(reasons.TOO_FAR_IN_FUTURE, f"time is more than {max_future_ms // 1000} s in the future", env)

    region = env.get("region")
    if region is None:
        return _rej(reasons.INVALID_ENVELOPE, "the extension attribute region (Kemendagri code) is required", env)
    if not isinstance(region, str) or not REGION_PATTERN.match(region) or region not in regions:
        return _rej(reasons.UNKNOWN_REGION, f"region {str(region)[:40]!r} is not a region of Kabupaten Jember", env)
    parts = region.split(".")
    kecamatan = ".".join(parts[:3]) if len(parts) >= 3 and ".".join(parts[:3]) in regions else None

    data = env.get("data")
    if not isinstance(data, Mapping):
        return _rej(reasons.INVALID_PAYLOAD, "data must be a JSON object", env)
    try:
        validated = model.model_validate(dict(data))
    except ValidationError as err:
        reason, message = _error_message(err)
        return _rej(reason, message, env)
    nik_rejected = check_niks(data, regions)
    if nik_rejected is not None:
        return _rej(nik_rejected.reason, nik_rejected.message, env)

    life = LIFECYCLES[etype]
    out = validated.model_dump(mode="json", exclude_unset=True)
    status = getattr(validated, "status", None)
    out["status"] = status
    category = getattr(validated, life.category_field, None) if life.category_field else None
    agency = getattr(validated, "agency", None)
    if agency is None and isinstance(env.get("arusagency"), str):
        agency = env["arusagency"]
    return Ok(
        ServiceEvent(
            id=str(env["id"]),
            source=str(env["source"]),
            type=etype,
            time_ms=time_ms,
            region=region,
            kecamatan=kecamatan,
            entity_id=str(getattr(validated, life.entity_field)),
            status=status,
            category=category,
            agency=agency,
            data=out,
            subject=subject,
        )
    )


# --------------------------------------------------------------------------- JSON Schema export

JSONSCHEMA_DIR = Path(__file__).resolve().parent / "jsonschema"


def json_schemas() -> dict[str, dict[str, Any]]:
    """type -> JSON Schema of the whole CloudEvent (envelope + the type's data model)."""
    out: dict[str, dict[str, Any]] = {}
    for etype, model in SERVICE_TYPES.items():
        fields: dict[str, Any] = {
            "specversion": (Literal["1.0"], ...),
            "id": (str, Field(min_length=1, max_length=200, description="unique per source")),
            "source": (str, Field(min_length=1, max_length=300)),
            "type": (Literal[etype], ...),
            "time": (str, Field(description="event time, RFC 3339 with offset", json_schema_extra={"format": "date-time"})),
            "subject": (str | None, Field(None, max_length=200)),
            "datacontenttype": (str, "application/json"),
            "region": (str, Field(pattern=REGION_PATTERN.pattern, description="Kemendagri code, e.g. 35.09.19")),
            "data": (model, ...),
        }
        envelope = create_model("CloudEvent_" + model.__name__, __config__=ConfigDict(extra="allow"), **fields)
        schema = envelope.model_json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://arus.jemberkab.go.id/schemas/{etype}.json"
        schema["title"] = etype
        schema["description"] = (model.__doc__ or "").strip()
        out[etype] = schema
    return out


def render_json_schemas() -> dict[str, str]:
    return {f"{t}.json": json.dumps(s, indent=2, sort_keys=True, ensure_ascii=False) + "\n" for t, s in json_schemas().items()}


def export(directory: Path = JSONSCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_json_schemas().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    if "--export" in sys.argv[1:]:
        for p in export():
            print(p)
    else:
        print("usage: python -m schemas.service_events --export", file=sys.stderr)
        sys.exit(2)
