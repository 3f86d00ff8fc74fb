"""The device registry in PostgreSQL: add, list, revoke, rotate, and a snapshot for the hot path."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from infra import mqtt_auth
from schemas.errors import ConfigError
from schemas.regions import is_known_region
from schemas.sensors import SENSOR_KINDS

_LEGACY_PREFIX = "pbkdf2_sha256"
RESERVED_PREFIX = "arus-"  # broker accounts of Arus itself (mqtt_auth.GATEWAY_USER)


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    kind: str
    region_code: str
    revoked: bool
    last_seen: datetime | None = None
    status: str = "unknown"


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    """Salted PBKDF2-SHA512 in mosquitto 2's `$7$iterations$salt$hash` form (the secret is never
    stored): the broker's password file is generated from these hashes as they are (infra/mqtt_auth)."""
    return mqtt_auth.hash_secret(secret, salt)


def verify_secret(secret: str, stored: str | None) -> bool:
    """Checks both the current `$7$` hashes and the older `pbkdf2_sha256$iterations$salt$hash` ones."""
    if not stored:
        return False
    if stored.startswith(mqtt_auth.HASH_PREFIX):
        return mqtt_auth.verify_broker_hash(secret, stored)
    try:
        algo, iterations, salt_hex, digest_hex = stored.split("$")
        if algo != _LEGACY_PREFIX:
            return False
        digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), bytes.fromhex(salt_hex), int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(digest.hex(), digest_hex)


def add_device(conn: psycopg.Connection[Any], device_id: str, kind: str, region_code: str) -> str:
    """Register (or re-register) a device; returns its new secret, shown once."""
    if kind not in SENSOR_KINDS:
        raise ConfigError(f"unknown kind {kind!r}; one of {', '.join(sorted(SENSOR_KINDS))}")
    if not is_known_region(region_code):
        raise ConfigError(f"unknown region code {region_code!r}")
    if device_id.startswith(RESERVED_PREFIX):
        raise ConfigError(f"device ids starting with {RESERVED_PREFIX!r} are reserved for Arus's own "
                          "broker accounts (the gateway's)")
    secret = secrets.token_urlsafe(24)
    conn.execute(
        """INSERT INTO devices (device_id, kind, region_code, secret_hash)
           VALUES (%s, %s, %s, %s)
           ON CONFLICT (device_id) DO UPDATE
             SET kind = EXCLUDED.kind, region_code = EXCLUDED.region_code,
                 secret_hash = EXCLUDED.secret_hash, revoked_at = NULL""",
        (device_id, kind, region_code, hash_secret(secret)),
    )
    return secret


def rotate_secret(conn: psycopg.Connection[Any], device_id: str) -> str:
    secret = secrets.token_urlsafe(24)
    cur = conn.execute(
        "UPDATE devices SET secret_hash = %s WHERE device_id = %s AND revoked_at IS NULL",
        (hash_secret(secret), device_id),
    )
    if cur.rowcount != 1:
        raise ConfigError(f"no active device {device_id!r}")
    return secret


def revoke_device(conn: psycopg.Connection[Any], device_id: str) -> bool:
    cur = conn.execute(
        "UPDATE devices SET revoked_at = now() WHERE device_id = %s AND revoked_at IS NULL", (device_id,)
    )
    return cur.rowcount == 1


def list_devices(conn: psycopg.Connection[Any]) -> list[Device]:
    rows = conn.execute(
        "SELECT device_id, kind, region_code, revoked_at IS NOT NULL, last_seen, status"
        " FROM devices ORDER BY device_id"
    ).fetchall()
    return [Device(*row) for row in rows]


def registry_snapshot(conn: psycopg.Connection[Any]) -> dict[str, Device]:
    """All devices by id, for in-memory lookups on the hot path (refreshed periodically)."""
    return {d.device_id: d for d in list_devices(conn)}
