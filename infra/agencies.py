"""Agency API keys (POST /v1/events): add, list, revoke; keys are stored only as a hash.

A key is `arus_ak_<43 url-safe chars>` (256 random bits). Because it is random and long, a plain
SHA-256 is a sufficient one-way hash (no password stretching needed) and allows a direct lookup by hash
on every request. `arus agencies add NAME` prints the key once, alone on its last line.
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sys
import threading
import time
from typing import Any

import psycopg

from infra import principals

KEY_PREFIX = "arus_ak_"
NAME_RE = principals.NAME_RE


Agency = principals.Principal


def hash_key(key: str) -> str:
    return "sha256$" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def add_agency(conn: psycopg.Connection[Any], name: str) -> str:
    """Create an agency (or give a revoked/existing one a new key); returns the key, shown once."""
    principals.check_name(name, "agency")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    principals.issue(conn, "agencies", name, hash_key(key))
    return key


def revoke_agency(conn: psycopg.Connection[Any], name: str) -> bool:
    return principals.revoke(conn, "agencies", name)


def list_agencies(conn: psycopg.Connection[Any]) -> list[Agency]:
    return principals.list_all(conn, "agencies")


def agency_for_key(conn: psycopg.Connection[Any], key: str) -> str | None:
    """The name of the active agency holding `key`, or None."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    row = conn.execute(
        "SELECT name FROM agencies WHERE key_hash = %s AND revoked_at IS NULL", (hash_key(key),)
    ).fetchone()
    return str(row[0]) if row else None


class KeyCache:
    """Key-hash -> agency lookups cached for `ttl` seconds (a revocation takes effect within ttl)."""

    def __init__(self, dsn: str, ttl: float = 5.0, max_entries: int = 10_000) -> None:
        self.dsn = dsn
        self.ttl = ttl
        self.max_entries = max_entries
        self._cache: dict[str, tuple[float, str | None]] = {}
        self._lock = threading.Lock()

    def lookup(self, key: str) -> str | None:
        h = hash_key(key)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(h)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        from infra.db import connect

        with connect(self.dsn, autocommit=True) as conn:
            name = agency_for_key(conn, key)
        with self._lock:
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
            self._cache[h] = (now, name)
        return name


# --------------------------------------------------------------------------- CLI `arus agencies`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("add", help="create an agency; prints its API key alone on the last line").add_argument("name")
    sub.add_parser("revoke", help="revoke an agency's key").add_argument("name")
    sub.add_parser("list", help="list agencies")


def main(dsn: str, args: argparse.Namespace) -> int:
    from infra.db import connect

    with connect(dsn, autocommit=True) as conn:
        if args.action == "add":
            key = add_agency(conn, args.name)
            print(f"agency {args.name} can now POST /v1/events with 'Authorization: Bearer <key>'; its key, shown once:")
            print(key)
        elif args.action == "revoke":
            if not revoke_agency(conn, args.name):
                print(f"no active agency {args.name}", file=sys.stderr)
                return 1
            print(f"agency {args.name} revoked")
        else:
            print("\n".join(principals.format_list(list_agencies(conn), "agency")))
    return 0
