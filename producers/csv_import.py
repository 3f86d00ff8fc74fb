"""`arus import-csv FILE --type TYPE`: spreadsheet exports of service events into Arus.

Each row becomes one CloudEvent of TYPE: columns are mapped to the event (`--map "Kolom=field"`,
field = `id`, `time`, `region`, `source`, `subject`, a data field such as `complaint_id`, or a dotted
path such as `person.nik`); columns named like a field (or a common Indonesian alias: `tanggal`,
`kode_wilayah`, `kategori`, `nama`, `no_hp`, ...) are mapped without options. Then the row is
validated exactly like `POST /v1/events`, its personal fields are replaced by keyed hashes, and it is
produced to `jember.ingest` in batches (each batch waits for Kafka's acknowledgement).

- Files: UTF-8 with or without BOM (`--encoding` otherwise), `,` `;` tab or `|` delimiters (sniffed,
  or `--delimiter`).
- Times: RFC 3339, `2026-11-28 08:00`, `2026-11-28 08:00 WIB` (WITA, WIT, Z, +07:00 accepted),
  `28/11/2026 08:00`, or a date alone; without an offset the time is Asia/Jakarta (WIB).
- Regions: a Kemendagri code (`35.09.19`, also without dots `350919`) or a kecamatan name (`Kaliwates`).
- The event id of a row is deterministic (`csv-` + hash of type, entity, status, time) unless an id
  column is mapped: importing the same file twice, or the same event over HTTP/Kafka, lands once.
- Rejected rows go to a reject report (CSV: line, reason, message, the row with personal columns
  masked; default FILE.rejects.csv) and to `jember.dlq`, the raw row sealed (AES-GCM).
- Exit status: 0 every row imported, 1 some rows rejected (the others imported), 2 error.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import io
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from infra.privacy import is_personal_key, looks_like_nik, pii_key_bytes
from infra.settings import Settings
from producers.service_ingest import IngestPublisher, Record, dead_letter, prepare
from schemas import reasons, topics
from schemas.errors import ConfigError
from schemas.messages import DeadLetterMsg
from schemas.regions import load_regions
from schemas.results import Ok, Rejected
from schemas.service_events import (
    ADMINDUK_REQUEST,
    COMPLAINT,
    EMERGENCY_DISPATCH,
    HEALTH_VISIT,
    LIFECYCLES,
    SERVICE_TYPES,
    WELFARE_CASE,
)

WIB = ZoneInfo("Asia/Jakarta")
ZONES = {"WIB": timezone(timedelta(hours=7)), "WITA": timezone(timedelta(hours=8)),
         "WIT": timezone(timedelta(hours=9)), "UTC": UTC, "Z": UTC, "GMT": UTC}
PERSON_FIELD = {WELFARE_CASE: "person", COMPLAINT: "reporter", HEALTH_VISIT: "patient",
                EMERGENCY_DISPATCH: "patient", ADMINDUK_REQUEST: "applicant"}
ENVELOPE_FIELDS = ("id", "time", "region", "source", "subject")
# normalised header -> field (in priority order where several could match)
ALIASES: dict[str, str] = {
    "event_id": "id", "id_event": "id",
    "waktu": "time", "tanggal": "time", "tanggal_waktu": "time", "timestamp": "time", "datetime": "time",
    "tgl": "time", "tanggal_kejadian": "time",
    "kode_wilayah": "region", "region_code": "region", "kode_region": "region", "kode_desa": "region",
    "kode_kelurahan": "region", "kode_kecamatan": "region", "wilayah": "region", "desa": "region",
    "kelurahan": "region", "kecamatan": "region",
    "kategori_pmks": "pmks_category", "pmks": "pmks_category", "kode_pmks": "pmks_category",
    "kategori": "category", "kanal": "channel", "saluran": "channel", "dinas": "agency", "opd": "agency",
    "layanan": "service", "jenis_layanan": "service", "unit_ambulans": "unit",
    "nik": "@nik", "no_ktp": "@nik", "nomor_ktp": "@nik",
    "nama": "@name", "name": "@name", "nama_lengkap": "@name",
    "phone": "@phone", "telepon": "@phone", "no_hp": "@phone", "hp": "@phone", "no_telp": "@phone",
    "nomor_hp": "@phone",
}
REGION_PRIORITY = ("region", "kode_wilayah", "region_code", "kode_region", "kode_desa", "kode_kelurahan",
                   "kode_kecamatan", "wilayah", "desa", "kelurahan", "kecamatan")
MASK = "***"
_NIK_RUN = re.compile(r"(?<!\d)\d{16}(?!\d)")  # a NIK quoted in a message is masked too
# header words that mark a personal column (masked in the reject report; mapped to the person when
# no other mapping applies, e.g. "Nama Pelapor" -> reporter.name, "NIK Pemohon" -> applicant.nik)
PERSONAL_TOKENS = {"nik": "nik", "ktp": "nik", "nama": "name", "name": "name", "hp": "phone",
                   "telp": "phone", "telepon": "phone", "phone": "phone", "wa": "phone", "whatsapp": "phone",
                   "email": None, "kk": None, "alamat": None, "address": None}
NOT_A_PERSON = {"puskesmas", "desa", "kecamatan", "kelurahan", "wilayah", "unit", "dinas", "opd", "petugas",
                "faskes", "kategori", "layanan", "program", "instansi", "agency", "file"}


def personal_token(norm: str) -> tuple[bool, str | None]:
    """(is the column personal, the person field it maps to) from its normalised header."""
    tokens = norm.split("_")
    if NOT_A_PERSON.intersection(tokens):
        return False, None
    for t in tokens:
        if t in PERSONAL_TOKENS:
            return True, PERSONAL_TOKENS[t]
    return False, None


def normalise_header(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lstrip("\ufeff").casefold()).strip("_")


# --------------------------------------------------------------------------- parsing of cells

_TIME_RE = re.compile(
    r"^\s*(?P<date>\d{4}-\d{2}-\d{2}|\d{1,2}/\d{1,2}/\d{4}|\d{1,2}-\d{1,2}-\d{4})"
    r"(?:[T ]+(?P<time>\d{1,2}[:.]\d{2}(?:[:.]\d{2}(?:\.\d+)?)?))?"
    r"\s*(?P<zone>Z|[+-]\d{2}:?\d{2}|WIB|WITA|WIT|UTC|GMT)?\s*$",
    re.IGNORECASE,
)


def parse_time(text: str, default_tz: Any = WIB) -> datetime | None:
    """A spreadsheet time: offset kept when given, else Asia/Jakarta. None when unparseable."""
    m = _TIME_RE.match(text)
    if not m:
        return None
    d = m.group("date")
    try:
        if "/" in d or re.match(r"^\d{1,2}-", d):
            day, month, year = (int(x) for x in re.split(r"[/-]", d))
        else:
            year, month, day = (int(x) for x in d.split("-"))
        hh = mm = ss = 0
        frac = 0.0
        if m.group("time"):
            parts = re.split(r"[:.]", m.group("time"), maxsplit=2)
            hh, mm = int(parts[0]), int(parts[1])
            if len(parts) > 2:
                sec = float(parts[2].replace(":", "."))
                ss, frac = int(sec), sec - int(sec)
        zone = (m.group("zone") or "").upper()
        if not zone:
            tz: Any = default_tz
        elif zone in ZONES:
            tz = ZONES[zone]
        else:
            sign = 1 if zone[0] == "+" else -1
            digits = zone[1:].replace(":", "")
            tz = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
        return datetime(year, month, day, hh, mm, ss, int(frac * 1_000_000), tzinfo=tz)
    except ValueError:
        return None


def _region_lookup() -> Callable[[str], str | None]:
    regions = load_regions()
    by_name: dict[str, list[str]] = {}
    for code, r in regions.items():
        by_name.setdefault(r.name.casefold(), []).append(code)

    def resolve(text: str) -> str | None:
        t = text.strip()
        if t in regions:
            return t
        digits = re.sub(r"\D", "", t)
        if digits and digits == t.replace(".", "") and len(digits) in (4, 6, 10):
            dotted = ".".join(x for x in (digits[:2], digits[2:4], digits[4:6], digits[6:]) if x)
            if dotted in regions:
                return dotted
        name = re.sub(r"^(kecamatan|kec\.?|desa|kelurahan|kel\.?)\s+", "", t, flags=re.IGNORECASE).casefold()
        codes = by_name.get(name, [])
        kec = [c for c in codes if regions[c].level == "kecamatan"]
        if len(kec) == 1:
            return kec[0]
        if len(codes) == 1:
            return codes[0]
        return None

    return resolve


# --------------------------------------------------------------------------- mapping


@dataclass
class ColumnMapping:
    """Column index -> target field path (("time",), ("data", "person", "nik"), ...)."""

    targets: dict[int, tuple[str, ...]] = field(default_factory=dict)
    personal: set[int] = field(default_factory=set)
    unmapped: list[str] = field(default_factory=list)


def build_mapping(
    header: list[str], etype: str, maps: list[str], region_column: str | None, keep_extra: bool
) -> ColumnMapping:
    model_fields = set(SERVICE_TYPES[etype].model_fields)
    person = PERSON_FIELD[etype]
    norm = [normalise_header(h) for h in header]
    result = ColumnMapping()

    def target_of(spec: str) -> tuple[str, ...]:
        spec = spec.strip()
        if spec in ENVELOPE_FIELDS:
            return (spec,)
        if spec.startswith("@"):
            return ("data", person, spec[1:])
        path = tuple(p for p in spec.split(".") if p)
        if path and path[0] == "data":
            path = path[1:]
        if not path:
            raise ConfigError(f"empty field in --map {spec!r}")
        return ("data", *path)

    explicit: dict[int, tuple[str, ...]] = {}
    for m in maps:
        col, sep, fld = m.partition("=")
        if not sep:
            raise ConfigError(f"--map expects COLUMN=FIELD, got {m!r}")
        idx = _find_column(header, norm, col)
        if idx is None:
            raise ConfigError(f"--map: no column {col!r} in the header ({', '.join(header)})")
        explicit[idx] = target_of(fld)
    if region_column:
        idx = _find_column(header, norm, region_column)
        if idx is None:
            raise ConfigError(f"--region-column: no column {region_column!r} in the header")
        explicit[idx] = ("region",)

    taken = {t for t in explicit.values()}
    auto: dict[int, tuple[str, ...]] = {}
    if ("region",) not in taken:
        for cand in REGION_PRIORITY:
            if cand in norm:
                auto[norm.index(cand)] = ("region",)
                taken.add(("region",))
                break
    for idx, n in enumerate(norm):
        if idx in explicit or idx in auto:
            continue
        target: tuple[str, ...] | None = None
        if n in ENVELOPE_FIELDS:
            target = (n,)
        elif n in model_fields and n != person:
            target = ("data", n)
        elif n in ALIASES and ALIASES[n] != "region":
            alias = ALIASES[n]
            if alias.startswith("@"):
                target = ("data", person, alias[1:])
            elif alias in ENVELOPE_FIELDS:
                target = (alias,)
            elif alias in model_fields:
                target = ("data", alias)
        if target is None:
            personal, person_field = personal_token(n)
            if personal and person_field is not None:
                target = ("data", person, person_field)
        if target is not None and target not in taken:
            auto[idx] = target
            taken.add(target)
        elif keep_extra and n and n not in ("region",) and ALIASES.get(n) != "region":
            auto[idx] = ("data", n)
        else:
            result.unmapped.append(header[idx])
    result.targets = {**auto, **explicit}
    for idx, tgt in result.targets.items():
        if is_personal_key(tgt[-1]) or is_personal_key(norm[idx]) or (len(tgt) > 2 and tgt[1] == person):
            result.personal.add(idx)
    for idx, n in enumerate(norm):
        if is_personal_key(n) or ALIASES.get(n, "").startswith("@") or personal_token(n)[0]:
            result.personal.add(idx)
    return result


def _find_column(header: list[str], norm: list[str], name: str) -> int | None:
    if name in header:
        return header.index(name)
    n = normalise_header(name)
    return norm.index(n) if n in norm else None


def row_to_event(
    row: list[str], mapping: ColumnMapping, etype: str, source: str, resolve_region: Callable[[str], str | None]
) -> dict[str, Any]:
    """The CloudEvent of one row (not yet validated; bad cells stay as they are for validation)."""
    env: dict[str, Any] = {"specversion": "1.0", "type": etype, "source": source,
                           "datacontenttype": "application/json", "data": {}}
    for idx, target in mapping.targets.items():
        if idx >= len(row):
            continue
        value = row[idx].strip()
        if value == "":
            continue
        if target == ("time",):
            parsed = parse_time(value)
            env["time"] = parsed.isoformat() if parsed else value
        elif target == ("region",):
            env["region"] = resolve_region(value) or value
        elif target[0] != "data":
            env[target[0]] = value
        else:
            node = env["data"]
            for part in target[1:-1]:
                node = node.setdefault(part, {})
            node[target[-1]] = value
    if "id" not in env:
        env["id"] = deterministic_id(env)
    return env


def deterministic_id(env: dict[str, Any]) -> str:
    """csv-<hash of type, entity id, status, event time (UTC ms)>: the same event always has this id."""
    etype = env.get("type", "")
    life = LIFECYCLES.get(etype)
    data_obj = env.get("data")
    data: dict[str, Any] = data_obj if isinstance(data_obj, dict) else {}
    entity = data.get(life.entity_field, "") if life else ""
    status = data.get("status") or (life.statuses[0] if life and len(life.statuses) == 1 else "")
    t = env.get("time")
    parsed = parse_time(t) if isinstance(t, str) else None
    when = str(int(parsed.timestamp() * 1000)) if parsed else str(t)
    digest = hashlib.sha256(f"{etype}\x00{entity}\x00{status}\x00{when}".encode()).hexdigest()
    return f"csv-{digest[:32]}"


# --------------------------------------------------------------------------- reading


def sniff_delimiter(sample: str, given: str | None) -> str:
    if given:
        return "\t" if given in ("\\t", "tab") else given
    first = sample.splitlines()[0] if sample else ""
    counts = {d: first.count(d) for d in (";", ",", "\t", "|")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] > 0 else ","


def iter_rows(f: TextIO, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(line number where the record starts, cells); line 1 is the header."""
    reader = csv.reader(f, delimiter=delimiter)
    prev = 0
    for row in reader:
        start = prev + 1
        prev = reader.line_num
        yield start, row


class Progress:
    """rich progress bar on a terminal, plain lines otherwise (one per ~10%)."""

    def __init__(self, total: int, enabled: bool, stream: TextIO) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.rich: Any = None
        self._task: Any = None
        self._next_pct = 10
        self.enabled = enabled
        if enabled and stream.isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn
                from rich.progress import Progress as RichProgress

                self.rich = RichProgress("[progress.description]{task.description}", BarColumn(),
                                         MofNCompleteColumn(), TimeRemainingColumn(),
                                         console=Console(file=stream), transient=False)
                self.rich.start()
                self._task = self.rich.add_task("importing", total=total)
            except ImportError:
                self.rich = None

    def update(self, done: int, accepted: int, rejected: int) -> None:
        if not self.enabled:
            return
        if self.rich is not None:
            self.rich.update(self._task, completed=done,
                             description=f"importing ({accepted} ok, {rejected} rejected)")
            return
        pct = done * 100 // self.total
        if pct >= self._next_pct or done == self.total:
            print(f"{done}/{self.total} rows ({pct}%): {accepted} accepted, {rejected} rejected",
                  file=self.stream, flush=True)
            self._next_pct = (pct // 10 + 1) * 10

    def close(self) -> None:
        if self.rich is not None:
            self.rich.stop()


@dataclass
class ImportResult:
    rows: int = 0
    accepted: int = 0
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    report: Path | None = None
    unmapped: list[str] = field(default_factory=list)


def import_csv(
    settings: Settings,
    path: Path,
    etype: str,
    *,
    maps: list[str] | None = None,
    region_column: str | None = None,
    delimiter: str | None = None,
    encoding: str = "utf-8-sig",
    source: str | None = None,
    agency: str | None = None,
    dry_run: bool = False,
    report_path: Path | None = None,
    batch_size: int = 1000,
    keep_extra: bool = False,
    progress: bool = True,
    progress_stream: TextIO | None = None,
    now_ms: Callable[[], int] | None = None,
) -> ImportResult:
    if etype not in SERVICE_TYPES:
        raise ConfigError(f"unknown --type {etype!r}; one of {', '.join(sorted(SERVICE_TYPES))}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not {encoding} (byte {exc.start}); use --encoding, e.g. cp1252") from None
    text = text.lstrip("\ufeff")
    delim = sniff_delimiter(text[:4096], delimiter)
    rows = iter_rows(io.StringIO(text, newline=""), delim)
    try:
        _, header = next(rows)
    except StopIteration:
        raise ConfigError(f"{path} is empty") from None
    mapping = build_mapping(header, etype, maps or [], region_column, keep_extra)
    if not any(t == ("region",) for t in mapping.targets.values()):
        raise ConfigError("no region column: name one with --region-column or --map COLUMN=region")
    resolve = _region_lookup()
    pii_key = pii_key_bytes(settings.pii_key)
    src = source or f"csv:{path.name}"
    clock = now_ms or (lambda: int(time.time() * 1000))
    regions = load_regions()
    ingest_topic = settings.topic(topics.INGEST)
    total = max(0, text.count("\n") - (0 if text.endswith("\n") else -1) - 1)
    result = ImportResult(unmapped=mapping.unmapped)
    result.report = report_path or path.with_name(path.name + ".rejects.csv")
    bar = Progress(total, progress, progress_stream or sys.stderr)

    report_file = result.report.open("w", encoding="utf-8", newline="")
    writer = csv.writer(report_file)
    writer.writerow(["line", "reason", "message", *header])

    async def run() -> None:
        publisher = None if dry_run else IngestPublisher(settings, client_id="arus-import-csv")
        if publisher is not None:
            await publisher.start()
        try:
            ingest: list[Record] = []
            dead: list[DeadLetterMsg] = []
            for line, row in rows:
                if not any(cell.strip() for cell in row):
                    continue
                result.rows += 1
                if len(row) != len(header):
                    outcome: Ok[Any] | Rejected = Rejected(
                        reasons.INVALID_PAYLOAD, f"{len(row)} columns, the header has {len(header)}")
                    env: dict[str, Any] | list[str] = row
                else:
                    env = row_to_event(row, mapping, etype, src, resolve)
                    outcome = prepare(env, pii_key, clock(), agency=agency, channel="csv", regions=regions)
                if isinstance(outcome, Rejected):
                    result.rejected += 1
                    result.reasons[outcome.reason] += 1
                    masked = [MASK if (i in mapping.personal and c.strip()) or looks_like_nik(c.strip()) else c
                              for i, c in enumerate(row)]
                    writer.writerow([line, outcome.reason, _NIK_RUN.sub(MASK, outcome.message), *masked])
                    dead.append(dead_letter(outcome, env, pii_key, src, clock(), topic=ingest_topic, line=line))
                else:
                    result.accepted += 1
                    ingest.append((outcome.value.key, outcome.value.value))
                if len(ingest) + len(dead) >= batch_size:
                    if publisher is not None:
                        await publisher.publish(ingest, dead)
                    ingest, dead = [], []
                    bar.update(result.rows, result.accepted, result.rejected)
            if publisher is not None and (ingest or dead):
                await publisher.publish(ingest, dead)
            bar.update(result.rows, result.accepted, result.rejected)
        finally:
            if publisher is not None:
                await publisher.stop()

    try:
        asyncio.run(run())
    finally:
        bar.close()
        report_file.close()
    return result


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="CSV file (UTF-8, with or without BOM)")
    p.add_argument("--type", required=True, dest="event_type", choices=sorted(SERVICE_TYPES),
                   help="service event type of every row")
    p.add_argument("--map", action="append", default=[], metavar="COLUMN=FIELD",
                   help="map a column to a field: id, time, region, source, subject, a data field, or a "
                        "dotted path such as person.nik (repeatable)")
    p.add_argument("--region-column", help="the column holding the region (code or kecamatan name)")
    p.add_argument("--delimiter", help="field delimiter (default: sniffed among , ; tab |)")
    p.add_argument("--encoding", default="utf-8-sig", help="file encoding (default UTF-8, BOM allowed)")
    p.add_argument("--source", help="CloudEvents source (default csv:<file name>)")
    p.add_argument("--agency", help="agency name recorded with each event (arusagency)")
    p.add_argument("--reject-report", type=Path, help="reject report path (default FILE.rejects.csv)")
    p.add_argument("--batch-size", type=int, default=1000, help="events per Kafka batch")
    p.add_argument("--keep-extra", action="store_true", help="keep unmapped columns as extra data fields")
    p.add_argument("--dry-run", action="store_true", help="validate and write the reject report only")
    p.add_argument("--no-progress", action="store_true", help="no progress output")


def main(settings: Settings, args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    res = import_csv(
        settings, args.file, args.event_type, maps=args.map, region_column=args.region_column,
        delimiter=args.delimiter, encoding=args.encoding, source=args.source, agency=args.agency,
        dry_run=args.dry_run, report_path=args.reject_report, batch_size=max(1, args.batch_size),
        keep_extra=args.keep_extra, progress=not args.no_progress,
    )
    took = time.monotonic() - t0
    verb = "validated (dry run, nothing produced)" if args.dry_run else f"produced to {settings.topic('ingest')}"
    print(f"{res.rows} rows in {took:.1f}s: {res.accepted} accepted and {verb}, {res.rejected} rejected")
    if res.unmapped:
        print(f"columns not imported (map them with --map or --keep-extra): {', '.join(res.unmapped)}")
    if res.rejected:
        by_reason = ", ".join(f"{r} {n}" for r, n in res.reasons.most_common())
        print(f"rejected by reason: {by_reason}")
        print(f"reject report (line numbers, reasons; personal columns masked): {res.report}")
    elif res.report is not None:
        res.report.unlink(missing_ok=True)
    return 1 if res.rejected else 0
