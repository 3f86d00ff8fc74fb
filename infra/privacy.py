"""Personal data (UU 27/2022 tentang Pelindungan Data Pribadi) at the ingest step.

- `PERSONAL_KEYS` name the personal fields, found at any depth of an event's `data` (case-insensitive
  key match): NIK, names and phone numbers (plus a few common Indonesian spellings).
- `validate_nik` checks a NIK before it is hashed (16 digits, a region prefix that exists).
- `pseudonymise` replaces each personal value by `hmac:` + HMAC-SHA256(pii_key, normalised value)
  truncated to 32 hex chars: one person links across events and agencies (the same NIK always gives
  the same token) without being identifiable without the key. Idempotent.
- `seal`/`unseal`: AES-256-GCM with a key derived (HKDF-SHA256) from the pii key, for dead letters of
  personal events: `seal_personal` encrypts each personal value in place (`sealed:<token>`) so the dead
  letter stays inspectable and a replay can restore the clear values with `unseal_personal`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from schemas.service_events import HMAC_PATTERN, SEALED_PREFIX, nik_problem

PERSONAL_KEYS: tuple[str, ...] = (
    "nik", "name", "nama", "phone", "telepon", "no_hp",
    # common variants in agency exports
    "nama_lengkap", "full_name", "nomor_hp", "no_telp", "no_telepon", "phone_number", "hp", "email",
    "no_kk", "nomor_kk",
)
NAME_KEYS = frozenset({"name", "nama", "nama_lengkap", "full_name"})
PHONE_KEYS = frozenset({"phone", "telepon", "no_hp", "nomor_hp", "no_telp", "no_telepon", "phone_number", "hp"})
DIGIT_KEYS = frozenset({"nik", "no_kk", "nomor_kk"})
HMAC_PREFIX = "hmac:"
_PERSONAL = frozenset(PERSONAL_KEYS)
_HMAC_RE = re.compile(HMAC_PATTERN)
_SEAL_VERSION = "v1."


def is_personal_key(key: Any) -> bool:
    return isinstance(key, str) and (key in _PERSONAL or key.strip().casefold() in _PERSONAL)


def validate_nik(nik: str, region_codes: Iterable[str] | Mapping[str, Any]) -> str | None:
    """A problem message (never quoting the NIK) or None when the NIK is structurally valid.

    16 digits PPKKCC DDMMYY SSSS; PP an Indonesian province, KK/CC non-zero; for Jember (3509) the
    kecamatan 35.09.CC must exist in `region_codes`; DD 01..31 (41..71 for women), MM 01..12.
    NIKs of other kabupaten are accepted (a Jember resident may hold one) when structurally valid.
    """
    codes = region_codes if isinstance(region_codes, Mapping) else frozenset(region_codes)
    return nik_problem(nik, codes)


# --------------------------------------------------------------------------- keyed hash


def normalise(kind: str, value: Any) -> str:
    """The canonical form hashed for a personal field, so formatting differences link the same person."""
    text = str(value).strip()
    k = kind.strip().casefold()
    if k in NAME_KEYS:
        return " ".join(text.split()).casefold()
    if k in PHONE_KEYS:
        digits = re.sub(r"\D", "", text)
        if digits.startswith("0"):
            digits = "62" + digits[1:]
        elif digits.startswith("8"):
            digits = "62" + digits
        return digits
    if k in DIGIT_KEYS:
        return re.sub(r"\D", "", text)
    if k == "email":
        return text.casefold()
    return " ".join(text.split()).casefold()


@functools.lru_cache(maxsize=8)
def _hmac_base(key: bytes) -> Any:
    return hmac.new(key, digestmod=hashlib.sha256)


def keyed_hash(kind: str, value: Any, key: bytes) -> str:
    h = _hmac_base(key).copy()
    h.update(normalise(kind, value).encode("utf-8"))
    return HMAC_PREFIX + h.hexdigest()[:32]


def _is_hashed(value: Any) -> bool:
    return isinstance(value, str) and bool(_HMAC_RE.match(value))


def _hash_value(kind: str, value: Any, key: bytes) -> Any:
    if value is None or _is_hashed(value):
        return value
    if isinstance(value, Mapping):
        return {k: _hash_value(kind if not is_personal_key(k) else str(k), v, key) for k, v in value.items()}
    if isinstance(value, list):
        return [_hash_value(kind, v, key) for v in value]
    if isinstance(value, str) and value.startswith(SEALED_PREFIX):
        return value  # sealed values are encrypted already; unseal_personal first to hash them
    return keyed_hash(kind, value, key)


_NIK_SHAPE = re.compile(r"^(1[1-9]|[2-9][0-9])\d{4}([0-6]\d|7[01])(0[1-9]|1[0-2])\d{6}$")


def looks_like_nik(value: Any) -> bool:
    """16 digits shaped like a NIK (province, date of birth): personal whatever field it sits in."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    return isinstance(text, str) and len(text) == 16 and bool(_NIK_SHAPE.match(text))


def protect_identifier(value: Any, key: bytes) -> Any:
    """An identifier as it may leave ingest: its keyed hash when it is a NIK (an agency that uses the
    NIK as a case or request number), unchanged otherwise. Deterministic, so linkage is kept."""
    return keyed_hash("nik", value, key) if looks_like_nik(value) else value


def pseudonymise(data: Any, key: bytes) -> Any:
    """A copy of `data` with every personal value (any depth) replaced by its keyed hash, and any
    NIK-shaped value in other fields too (a NIK used as an id). Idempotent."""
    if isinstance(data, str | int) and not isinstance(data, bool) and looks_like_nik(data):
        return keyed_hash("nik", data, key)
    if isinstance(data, str | int | float | bool) or data is None:
        return data
    if isinstance(data, dict | Mapping):
        return {
            k: (_hash_value(str(k), v, key) if is_personal_key(k) else pseudonymise(v, key))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [pseudonymise(v, key) for v in data]
    return data


def _personal_values(data: Any) -> Iterable[Any]:
    if isinstance(data, Mapping):
        for k, v in data.items():
            if is_personal_key(k):
                yield from _leaves(v)
            else:
                yield from _personal_values(v)
    elif isinstance(data, list):
        for v in data:
            yield from _personal_values(v)


def _leaves(value: Any) -> Iterable[Any]:
    if isinstance(value, Mapping):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def is_pseudonymised(data: Any) -> bool:
    """True when no personal value (any depth) is in clear: each is null or a keyed hash."""
    return all(v is None or _is_hashed(v) for v in _personal_values(data))


def has_personal_data(data: Any) -> bool:
    """True when some personal value is in clear (neither null, hashed nor sealed)."""
    return any(
        not (v is None or _is_hashed(v) or (isinstance(v, str) and v.startswith(SEALED_PREFIX)))
        for v in _personal_values(data)
    )


# --------------------------------------------------------------------------- authenticated encryption


def _seal_key(key: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"arus-pii-seal", info=b"arus dead letters v1").derive(key)


def seal(plaintext: bytes, key: bytes) -> str:
    """AES-256-GCM (random 96-bit nonce), URL-safe base64 text `v1.<nonce+ciphertext+tag>`."""
    nonce = os.urandom(12)
    ct = AESGCM(_seal_key(key)).encrypt(nonce, plaintext, b"arus-seal-v1")
    return _SEAL_VERSION + base64.urlsafe_b64encode(nonce + ct).decode("ascii").rstrip("=")


def unseal(token: str, key: bytes) -> bytes:
    """The plaintext of `seal`; ValueError when the token is malformed, tampered with or the key differs."""
    if not isinstance(token, str) or not token.startswith(_SEAL_VERSION):
        raise ValueError("not a sealed token")
    body = token[len(_SEAL_VERSION):]
    try:
        blob = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError("sealed token is not base64") from exc
    if len(blob) < 12 + 16:
        raise ValueError("sealed token is too short")
    try:
        return AESGCM(_seal_key(key)).decrypt(blob[:12], blob[12:], b"arus-seal-v1")
    except InvalidTag as exc:
        raise ValueError("sealed token does not authenticate (wrong key or tampered)") from exc


def _seal_value(value: Any, key: bytes) -> Any:
    if value is None or _is_hashed(value) or (isinstance(value, str) and value.startswith(SEALED_PREFIX)):
        return value
    if isinstance(value, Mapping):
        return {k: _seal_value(v, key) for k, v in value.items()}
    if isinstance(value, list):
        return [_seal_value(v, key) for v in value]
    return SEALED_PREFIX + seal(json.dumps(value).encode("utf-8"), key)


def seal_personal(obj: Any, key: bytes) -> Any:
    """A copy with every personal value in clear (any depth) replaced by `sealed:<token>`."""
    if isinstance(obj, Mapping):
        return {k: (_seal_value(v, key) if is_personal_key(k) else seal_personal(v, key)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [seal_personal(v, key) for v in obj]
    return obj


def unseal_personal(obj: Any, key: bytes) -> Any:
    """Inverse of `seal_personal` (ValueError when a sealed value does not authenticate)."""
    if isinstance(obj, Mapping):
        return {k: unseal_personal(v, key) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unseal_personal(v, key) for v in obj]
    if isinstance(obj, str) and obj.startswith(SEALED_PREFIX):
        return json.loads(unseal(obj[len(SEALED_PREFIX):], key))
    return obj


def protect_raw(raw: Any, key: bytes) -> str:
    """Text safe to keep in a dead letter: a JSON object/array with its personal values sealed, or,
    when the input is not JSON (so its personal fields cannot be found), the whole input sealed as
    `sealed:<token>`. `restore_raw` gives back the original text (modulo JSON formatting)."""
    if isinstance(raw, bytes | bytearray):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return SEALED_PREFIX + seal(bytes(raw), key)
    elif isinstance(raw, str):
        text = raw
    else:
        return json.dumps(seal_personal(raw, key), ensure_ascii=False, default=str)
    try:
        parsed = json.loads(text)
    except ValueError:
        return SEALED_PREFIX + seal(text.encode("utf-8"), key)
    if not isinstance(parsed, dict | list):
        return SEALED_PREFIX + seal(text.encode("utf-8"), key)
    return json.dumps(seal_personal(parsed, key), ensure_ascii=False)


def restore_raw(text: str, key: bytes) -> str:
    """The clear text of `protect_raw` output (for a dead-letter replay)."""
    if text.startswith(SEALED_PREFIX):
        return unseal(text[len(SEALED_PREFIX):], key).decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    return json.dumps(unseal_personal(parsed, key), ensure_ascii=False)


def pii_key_bytes(secret: Any) -> bytes:
    """bytes of Settings.pii_key (a SecretStr) or of a plain str/bytes."""
    if hasattr(secret, "get_secret_value"):
        secret = secret.get_secret_value()
    return secret if isinstance(secret, bytes) else str(secret).encode("utf-8")
