"""Kemendagri region codes of Kabupaten Jember, loaded from the shipped reference CSV."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

KABUPATEN_CODE = "35.09"


@dataclass(frozen=True, slots=True)
class Region:
    code: str
    name: str
    level: str  # kabupaten | kecamatan | desa | kelurahan
    parent_code: str


@lru_cache(maxsize=1)
def load_regions() -> dict[str, Region]:
    text = resources.files("schemas").joinpath("reference/jember_wilayah.csv").read_text("utf-8")
    regions: dict[str, Region] = {}
    for row in csv.DictReader(text.splitlines()):
        code = row["code"].strip()
        level = row["level"].strip()
        if level == "desa" and code.rsplit(".", 1)[-1].startswith("1"):
            level = "kelurahan"  # Kemendagri: village codes starting with 1 are kelurahan
        regions[code] = Region(code, row["name"].strip(), level, row["parent_code"].strip())
    return regions


def kecamatan_codes() -> list[str]:
    return sorted(c for c, r in load_regions().items() if r.level == "kecamatan")


def kecamatan_of(code: str) -> str | None:
    """The kecamatan (PP.KK.CC) a region code belongs to, or None for the kabupaten/unknown."""
    parts = code.split(".")
    if len(parts) < 3:
        return None
    kec = ".".join(parts[:3])
    return kec if kec in load_regions() else None


def is_known_region(code: str) -> bool:
    return code in load_regions()
