"""API principals kept by name with only a hash of their secret: agencies (POST /v1/events keys) and
operators (console tokens). One place for what both tables share: the name rule, issuing a new secret
(which also un-revokes), revocation, and the listing `arus agencies|operators list` prints."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg import sql

from schemas.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # the CHECK of agencies.name, operators.name
WIB = ZoneInfo("Asia/Jakarta")
HASH_COLUMN = {"agencies": "key_hash", "operators": "token_hash"}


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    created_at: datetime
    revoked_at: datetime | None


def check_name(name: str, what: str) -> None:
    if not NAME_RE.match(name):
        raise ConfigError(f"invalid {what} name {name!r}: letters, digits, _ . - (at most 64)")


def issue(conn: psycopg.Connection[Any], table: str, name: str, secret_hash: str) -> None:
    """Store a principal's new secret hash (creating it, or re-issuing and un-revoking it)."""
    conn.execute(sql.SQL(
        "INSERT INTO {t} (name, {h}) VALUES (%s, %s)"
        " ON CONFLICT (name) DO UPDATE SET {h} = EXCLUDED.{h}, revoked_at = NULL"
    ).format(t=sql.Identifier(table), h=sql.Identifier(HASH_COLUMN[table])), (name, secret_hash))


def revoke(conn: psycopg.Connection[Any], table: str, name: str) -> bool:
    cur = conn.execute(sql.SQL("UPDATE {} SET revoked_at = now() WHERE name = %s AND revoked_at IS NULL")
                       .format(sql.Identifier(table)), (name,))
    return cur.rowcount == 1


def list_all(conn: psycopg.Connection[Any], table: str) -> list[Principal]:
    rows = conn.execute(sql.SQL("SELECT name, created_at, revoked_at FROM {} ORDER BY name")
                        .format(sql.Identifier(table))).fetchall()
    return [Principal(*row) for row in rows]


def format_list(rows: list[Principal], what: str) -> list[str]:
    """The lines of `arus agencies|operators list`, times in WIB."""
    lines = [f"{what:<32} {'created (WIB)':<19}  status"]
    for p in rows:
        created = p.created_at.astimezone(WIB).strftime("%Y-%m-%d %H:%M:%S")
        status = "revoked " + p.revoked_at.astimezone(WIB).strftime("%Y-%m-%d %H:%M") if p.revoked_at else "active"
        lines.append(f"{p.name:<32} {created:<19}  {status}")
    return lines
