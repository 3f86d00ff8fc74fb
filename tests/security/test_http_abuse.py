"""Injection and abuse against a running `arus api`: every parameter of every documented endpoint
(from its own OpenAPI) gets SQL-ish strings, path tricks, control characters and huge values; bodies
and headers are oversized; a slow client holds a connection. Each request gets a 4xx with a clear
message or a normal answer (never a 5xx), the database is unchanged, and the service keeps answering."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.helpers import pg_fetch, wait_until

ROOT = Path(__file__).resolve().parents[2]
NASTY = [
    "' OR '1'='1", "1; DROP TABLE readings;--", "35.09' UNION SELECT secret_hash FROM devices--",
    "../../../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%00", "\x00", "\r\nSet-Cookie: x=y",
    "<script>alert(1)</script>", "${jndi:ldap://x/a}", "{{7*7}}", "-1", "0", "9" * 400, "1e309", "NaN",
    "-Infinity", "2026-13-45T99:99:99Z", "ジェンベル", "A" * 5000, "",
]
SKIP_PATHS = {"/metrics"}  # text exposition; no parameters


def _snapshot(dsn: str) -> dict[str, int]:
    tables = [r[0] for r in pg_fetch(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    return {t: int(pg_fetch(dsn, f'SELECT count(*) FROM "{t}"')[0][0]) for t in tables}  # noqa: S608 - names from the catalog


def _calls(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, str], str]]:
    """(method, url path, query params, what) for every parameter of every operation and every value."""
    out = []
    for path, ops in spec["paths"].items():
        if path in SKIP_PATHS:
            continue
        for method, op in ops.items():
            params = op.get("parameters", [])
            for p in params:
                for value in NASTY:
                    url = path
                    query: dict[str, str] = {}
                    for other in params:  # the other path parameters get a plain value
                        if other["in"] == "path":
                            v = value if other is p else "x"
                            url = url.replace("{" + other["name"] + "}", quote(v, safe="") or "%20")
                    if p["in"] == "query":
                        query[p["name"]] = value
                    elif p["in"] == "header":
                        continue  # headers are abused below
                    out.append((method.upper(), url, query, f"{method.upper()} {path} {p['name']}={value[:20]!r}"))
            if not params:
                out.append((method.upper(), path, {}, f"{method.upper()} {path}"))
    return out


@pytest.fixture
def api(arus_env, spawn_arus, fresh_database_url):
    env = arus_env(database_url=fresh_database_url)
    spawn_arus("api", env=env)
    base = f"http://127.0.0.1:{env['ARUS_HTTP_PORT']}"
    wait_until(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 30, message="api answers")
    return base, env, fresh_database_url


def test_every_parameter_of_every_endpoint_resists_injection(api) -> None:
    base, env, dsn = api
    before = _snapshot(dsn)
    spec = httpx.get(f"{base}/openapi.json", timeout=10).json()
    calls = _calls(spec)
    assert len(calls) > 200, "the OpenAPI lists the endpoints and their parameters"
    failures = []
    with httpx.Client(base_url=base, timeout=15, headers={"Authorization": "Bearer ' OR 1=1 --"}) as client:
        for method, url, query, what in calls:
            try:
                if url.endswith("/stream"):
                    with client.stream(method, url, params=query, timeout=5) as r:
                        status = r.status_code
                        body = r.read().decode(errors="replace") if status != 200 else ""
                else:
                    r = client.request(method, url, params=query,
                                       json={"id": "' OR 1=1 --"} if method == "POST" else None)
                    status, body = r.status_code, r.text
            except httpx.HTTPError as exc:
                failures.append(f"{what}: {type(exc).__name__} {exc}")
                continue
            if status >= 500:
                failures.append(f"{what}: {status} {body[:200]}")
            elif 400 <= status < 500 and status != 404 and len(body) < 10:
                failures.append(f"{what}: {status} without a message")
    assert not failures, "\n".join(failures[:30])
    assert _snapshot(dsn) == before, "abuse changed the database"
    assert httpx.get(f"{base}/healthz", timeout=5).json()["status"] == "ok"


def _agency_key(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "arus.cli", "agencies", "add", "abuse-test"], env=env, cwd=ROOT,  # noqa: S603
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip().splitlines()[-1]


def test_oversized_bodies_and_headers_and_slow_clients(api) -> None:
    base, env, dsn = api
    key = _agency_key(env)
    before = _snapshot(dsn)
    host, port = "127.0.0.1", int(env["ARUS_HTTP_PORT"])
    # a body over the documented limit: refused with 413 and a message, nothing produced
    huge = b"[" + b",".join([b'{"specversion":"1.0"}'] * 400_000) + b"]"
    r = httpx.post(f"{base}/v1/events", content=huge, timeout=60,
                   headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert r.status_code == 413 and "payload_too_large" in r.text
    # a lying Content-Length is refused before the body is read
    r = httpx.post(f"{base}/v1/events", content=b"[]", timeout=10,
                   headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                            "X-Ignore": "x"})
    assert r.status_code < 500
    # oversized headers: the server refuses them (4xx or closes the connection), and keeps answering
    try:
        r = httpx.get(f"{base}/v1/regions", headers={"X-Big": "a" * 200_000}, timeout=10)
        assert 400 <= r.status_code < 500
    except httpx.HTTPError:
        pass  # h11 closes the connection on an over-long header block: refused all the same
    # slow clients: several connections trickle a request line byte by byte; others are still served
    slow = []
    for _ in range(20):
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"GET /v1/regions HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)
    try:
        t0 = time.monotonic()
        r = httpx.get(f"{base}/healthz", timeout=5)
        assert r.status_code == 200 and time.monotonic() - t0 < 5
        for s in slow:
            s.sendall(b"X-Slow: 1")  # still not a complete request
        r = httpx.get(f"{base}/v1/regions", params={"level": "kecamatan"}, timeout=5)
        assert r.status_code == 200
    finally:
        for s in slow:
            s.close()
    assert _snapshot(dsn) == {**before, "agencies": before.get("agencies", 0)}
    assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
