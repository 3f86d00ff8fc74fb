"""Operators of the command centre: the people who acknowledge and resolve alerts.

`arus operators add NAME` prints a new token alone on its last line; only a salted hash of it is
stored (table operators, salted PBKDF2, the same scheme as device secrets). A token reads `NAME.SECRET`: the name
before the last dot says whose hash to check (names may contain dots, secrets never do), so a
request costs one hash, not one per operator. Adding an existing (or revoked) name issues a new
token and makes the old one invalid.
"""

from __future__ import annotations

import hashlib
import secrets
import sys
from enum import Enum
from typing import Any

import psycopg

from infra import principals
from infra.devices import hash_secret, verify_secret

NAME_RE = principals.NAME_RE


Operator = principals.Principal


class Auth(Enum):
    OK = "ok"
    INVALID = "invalid"  # missing, malformed, unknown operator or wrong secret -> 401
    REVOKED = "revoked"  # the right token of a revoked operator -> 403


def add_operator(conn: psycopg.Connection[Any], name: str) -> str:
    """Create (or re-issue) an operator; returns the token, shown once."""
    principals.check_name(name, "operator")
    token = f"{name}.{secrets.token_urlsafe(24)}"
    principals.issue(conn, "operators", name, hash_secret(token))
    return token


def revoke_operator(conn: psycopg.Connection[Any], name: str) -> bool:
    return principals.revoke(conn, "operators", name)


def list_operators(conn: psycopg.Connection[Any]) -> list[Operator]:
    return principals.list_all(conn, "operators")


def token_name(token: str) -> str | None:
    """The operator name a token claims (before its last dot), or None when malformed."""
    name, dot, secret = token.rpartition(".")
    if not dot or not secret or not NAME_RE.match(name):
        return None
    return name


# Verified (hash, sha256(token)) pairs: a salted PBKDF2 per request adds up, an operator clicks often.
_verified: dict[tuple[str, str], bool] = {}


def check_token(token: str, stored_hash: str | None, revoked: bool) -> Auth:
    """Check a token against its operator's row (stored hash, revoked flag). CPU-bound: run it in
    a thread from async code."""
    if not stored_hash:
        return Auth.INVALID
    key = (stored_hash, hashlib.sha256(token.encode()).hexdigest())
    ok = _verified.get(key)
    if ok is None:
        ok = verify_secret(token, stored_hash)
        if ok:
            if len(_verified) > 1000:
                _verified.clear()
            _verified[key] = True
    if not ok:
        return Auth.INVALID
    return Auth.REVOKED if revoked else Auth.OK


def authenticate(conn: psycopg.Connection[Any], token: str) -> tuple[Auth, str | None]:
    """(result, operator name) of a bearer token, with a synchronous connection."""
    name = token_name(token)
    if name is None:
        return Auth.INVALID, None
    row = conn.execute("SELECT token_hash, revoked_at IS NOT NULL FROM operators WHERE name = %s",
                       (name,)).fetchone()
    if row is None:
        return Auth.INVALID, None
    return check_token(token, row[0], bool(row[1])), name


def main(dsn: str, action: str, name: str | None) -> int:
    """Body of `arus operators add NAME | list | revoke NAME`."""
    from infra.db import connect

    with connect(dsn, autocommit=True) as conn:
        if action == "add":
            assert name is not None
            token = add_operator(conn, name)
            print(f"operator {name} added; use the token below as `Authorization: Bearer <token>` "
                  "or paste it in the console. Shown once:")
            print(token)
        elif action == "revoke":
            assert name is not None
            if not revoke_operator(conn, name):
                print(f"no active operator {name}", file=sys.stderr)
                return 1
            print(f"operator {name} revoked")
        else:
            print("\n".join(principals.format_list(list_operators(conn), "operator")))
    return 0
