"""CSV import: header mapping, times, regions, deterministic ids, reject report (dry run, no Kafka)."""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from pathlib import Path

import pytest

from infra.settings import Settings
from producers import csv_import
from schemas.errors import ConfigError
from schemas.service_events import COMPLAINT, WELFARE_CASE, synthetic_nik

NIK = synthetic_nik("35.09.19", 17, 8, 1985, 7)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-11-28 08:00 WIB", datetime(2026, 11, 28, 1, 0, tzinfo=UTC)),
        ("2026-11-28 08:00", datetime(2026, 11, 28, 1, 0, tzinfo=UTC)),
        ("2026-11-28T08:00:30+08:00", datetime(2026, 11, 28, 0, 0, 30, tzinfo=UTC)),
        ("28/11/2026 08.00", datetime(2026, 11, 28, 1, 0, tzinfo=UTC)),
        ("2026-11-28 08:00Z", datetime(2026, 11, 28, 8, 0, tzinfo=UTC)),
        ("2026-11-28", datetime(2026, 11, 27, 17, 0, tzinfo=UTC)),
        ("2026-11-28 09:00 WITA", datetime(2026, 11, 28, 1, 0, tzinfo=UTC)),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    parsed = csv_import.parse_time(text)
    assert parsed is not None and parsed == expected


@pytest.mark.parametrize("text", ["kemarin", "2026-13-01 08:00", "31/02/2026", "08:00"])
def test_parse_time_rejects(text: str) -> None:
    assert csv_import.parse_time(text) is None


def test_region_lookup() -> None:
    resolve = csv_import._region_lookup()
    assert resolve("35.09.19") == "35.09.19"
    assert resolve("350919") == "35.09.19"
    assert resolve("3509191001") == "35.09.19.1001"
    assert resolve("Kaliwates") == "35.09.19"
    assert resolve("Kecamatan kaliwates") == "35.09.19"
    assert resolve("Atlantis") is None


def test_mapping_aliases_and_explicit_maps() -> None:
    header = ["\ufeffNo Pengaduan", "Status", "Kategori", "Kanal", "Tanggal", "Kecamatan", "Nama", "No HP", "Catatan"]
    m = csv_import.build_mapping(header, COMPLAINT, ["No Pengaduan=complaint_id"], None, keep_extra=False)
    assert m.targets == {
        0: ("data", "complaint_id"), 1: ("data", "status"), 2: ("data", "category"), 3: ("data", "channel"),
        4: ("time",), 5: ("region",), 6: ("data", "reporter", "name"), 7: ("data", "reporter", "phone"),
    }
    assert m.personal == {6, 7} and m.unmapped == ["Catatan"]
    with pytest.raises(ConfigError):
        csv_import.build_mapping(header, COMPLAINT, ["Nope=complaint_id"], None, keep_extra=False)


def test_personal_columns_by_header_words() -> None:
    header = ["request_id", "status", "layanan", "tanggal", "desa", "Nama Pemohon", "NIK Pemohon", "Alamat",
              "Nama Petugas", "Nama Desa"]
    m = csv_import.build_mapping(header, "jember.adminduk.request.v1", [], None, keep_extra=False)
    assert m.targets[5] == ("data", "applicant", "name") and m.targets[6] == ("data", "applicant", "nik")
    assert m.targets[4] == ("region",)
    assert m.personal == {5, 6, 7}
    assert m.unmapped == ["Alamat", "Nama Petugas", "Nama Desa"]


def test_deterministic_id_is_stable_across_spellings() -> None:
    resolve = csv_import._region_lookup()
    header = ["case_id", "status", "pmks_category", "time", "region"]
    m = csv_import.build_mapping(header, WELFARE_CASE, [], None, False)
    a = csv_import.row_to_event(["K1", "registered", "PMKS01", "2026-11-28 08:00 WIB", "35.09.19"], m,
                                WELFARE_CASE, "csv:a.csv", resolve)
    b = csv_import.row_to_event(["K1", "registered", "PMKS01", "2026-11-28T01:00:00Z", "Kaliwates"], m,
                                WELFARE_CASE, "csv:b.csv", resolve)
    c = csv_import.row_to_event(["K1", "verified", "PMKS01", "2026-11-28 08:00 WIB", "35.09.19"], m,
                                WELFARE_CASE, "csv:a.csv", resolve)
    assert a["id"] == b["id"] != c["id"] and a["id"].startswith("csv-")
    assert a["time"] == "2026-11-28T08:00:00+07:00" and b["region"] == "35.09.19"


def test_dry_run_reject_report_has_line_numbers_and_masks(tmp_path: Path) -> None:
    path = tmp_path / "kasus.csv"
    rows = [
        "id_kasus;status;kategori_pmks;tanggal;kode_wilayah;nik;nama;no_hp",
        f"K1;registered;PMKS01;2026-11-20 08:00 WIB;35.09.19;{NIK};Siti;0812345678",
        f"K2;registered;PMKS99;2026-11-20 09:00 WIB;35.09.19;{NIK};Budi;0812345679",
        '"K3";registered;PMKS02;"2026-11-20',
        '10:00 WIB";35.09.01;;;',  # a record spanning two lines (quoted newline): bad time
        f"K4;registered;PMKS03;2026-11-20 11:00 WIB;35.10.01;{NIK};Ani;",
        "K5;registered;PMKS03;2026-11-20 11:00 WIB;35.09.01;12345;Ana;",
        "K6;registered;PMKS03",
        "",
        "K7;registered;PMKS04;2026-11-21 07:30;Kaliwates;;;",
    ]
    path.write_bytes(("\ufeff" + "\n".join(rows) + "\n").encode())
    report = tmp_path / "rejects.csv"
    now = int(datetime(2026, 11, 28, tzinfo=UTC).timestamp() * 1000)
    res = csv_import.import_csv(Settings(pii_key="k"), path, WELFARE_CASE, maps=["id_kasus=case_id"],
                                dry_run=True, report_path=report, progress=False, now_ms=lambda: now)
    assert (res.rows, res.accepted, res.rejected) == (7, 2, 5)
    with report.open(encoding="utf-8") as f:
        got = list(csv.DictReader(f))
    assert [(r["line"], r["reason"]) for r in got] == [
        ("3", "invalid_pmks_category"), ("4", "invalid_timestamp"), ("6", "unknown_region"),
        ("7", "invalid_nik"), ("8", "invalid_payload")]
    text = report.read_text()
    assert NIK not in text and "Siti" not in text and "Budi" not in text and "12345;" not in text
    assert got[0]["nik"] == "***" and got[0]["nama"] == "***" and got[0]["id_kasus"] == "K2"
