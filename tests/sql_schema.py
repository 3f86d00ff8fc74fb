"""The tables and columns the migrations define, read from the SQL text (no database): CREATE TABLE
statements and ALTER TABLE ... ADD COLUMN. Used by the static checks of the data catalogue and of
the Grafana dashboards (tests/unit)."""

from __future__ import annotations

import re
from importlib import resources

_COMMENT = re.compile(r"--[^\n]*")
_CREATE = re.compile(r"CREATE\s+(?:UNLOGGED\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?\"?(\w+)\"?\s*\(", re.I)
_ADD = re.compile(
    r"ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?\"?(\w+)\"?\s+((?:ADD\s+COLUMN\s+[^;]*?)(?:;|$))", re.I | re.S
)
_ADD_ONE = re.compile(r"ADD\s+COLUMN\s+(?:IF\s+NOT\s+EXISTS\s+)?\"?(\w+)\"?", re.I)
_DROP_COL = re.compile(r"ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?\"?(\w+)\"?\s+DROP\s+COLUMN\s+(?:IF\s+EXISTS\s+)?\"?(\w+)\"?",
                       re.I)
_CONSTRAINT_WORDS = {"primary", "unique", "check", "constraint", "foreign", "exclude", "like"}


def _body(text: str, start: int) -> str:
    """The text between the parenthesis opened just before `start` and its match."""
    depth, i = 1, start
    while depth:
        c = text[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "'":  # skip string literals (may hold parentheses)
            i = text.index("'", i + 1)
        i += 1
    return text[start:i - 1]


def _split_top(body: str) -> list[str]:
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for c in body:
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_tables(sql_text: str, tables: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    tables = {} if tables is None else tables
    text = _COMMENT.sub("", sql_text)
    for m in _CREATE.finditer(text):
        cols = tables.setdefault(m.group(1).lower(), [])
        for item in _split_top(_body(text, m.end())):
            first = item.split()[0].strip('"')
            if first.lower() in _CONSTRAINT_WORDS:
                continue
            if first not in cols:
                cols.append(first)
    for m in _ADD.finditer(text):
        cols = tables.setdefault(m.group(1).lower(), [])
        for col in _ADD_ONE.findall(m.group(2)):
            if col not in cols:
                cols.append(col)
    for table, col in _DROP_COL.findall(text):
        if col in tables.get(table.lower(), []):
            tables[table.lower()].remove(col)
    return tables


def migration_tables() -> dict[str, list[str]]:
    """Every table of the shipped plain-PostgreSQL migrations (in order) with its columns."""
    root = resources.files("infra").joinpath("migrations")
    tables: dict[str, list[str]] = {}
    names = sorted(e.name for e in root.iterdir() if e.name.endswith(".sql") and not e.name.endswith(".timescale.sql"))
    for name in names:
        parse_tables(root.joinpath(name).read_text("utf-8"), tables)
    return tables


# --------------------------------------------------------------------------- Grafana dashboards

GRAFANA_MACROS = {
    r"\$__timeFilter\(([^)]+)\)": r"(\1 BETWEEN '2026-03-01T00:00:00Z' AND '2026-03-02T00:00:00Z')",
    r"\$__timeFrom\(\)": "'2026-03-01T00:00:00Z'",
    r"\$__timeTo\(\)": "'2026-03-02T00:00:00Z'",
    r"\$__interval_ms": "60000",
}
GRAFANA_VARIABLES = {"kecamatan": "35.09.19", "metric": "waterLevel", "indicator": "sample-indicator"}


def grafana_sql(raw: str, long_range: bool = False) -> str:
    """A dashboard query as PostgreSQL receives it from Grafana (macros and variables substituted)."""
    text = raw
    for pattern, repl in GRAFANA_MACROS.items():
        if long_range and "timeFrom" in pattern:
            repl = "'2025-03-01T00:00:00Z'"
        text = re.sub(pattern, repl, text)
    for name, value in GRAFANA_VARIABLES.items():
        text = text.replace(f"${name}", value)
    return text
