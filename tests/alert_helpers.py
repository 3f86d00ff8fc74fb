"""Alert rows written straight into PostgreSQL (the tables the stream's sink writes) and a small SSE
client, for the API and browser tests of the operator side."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import psycopg

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def insert_alert(dsn: str, alert_id: str, *, severity: str = "warning", state: str = "open",
                 kind: str | None = "water_level", kecamatan: str = "35.09.19", region: str = "35.09.19.1004",
                 rule: str = "river-siaga", entity: str | None = None, value: float = 2.5,
                 metric: str = "waterLevel", message: str = "", updated_at: datetime | None = None,
                 transition: str = "opened") -> int:
    """An alert and its first alert_events row, in one transaction like the sink; returns the seq."""
    now = updated_at or datetime.now(UTC)
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.execute(
            "INSERT INTO alerts (id, rule_id, entity, kind, region_code, kecamatan, metric, severity, state, value,"
            " message, opened_at, updated_at, version) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 1)",
            (alert_id, rule, entity or f"dev-{alert_id}", kind, region, kecamatan, metric, severity, state, value,
             message or f"{metric} {value}", now, now))
        row = conn.execute(
            "INSERT INTO alert_events (dedup, alert_id, time, transition, severity, state, actor, value)"
            " VALUES (%s, %s, %s, %s, %s, %s, 'stream', %s) RETURNING seq",
            (f"{alert_id}:1", alert_id, now, transition, severity, state, value)).fetchone()
    assert row is not None
    return int(row[0])


def add_event(dsn: str, alert_id: str, transition: str, *, severity: str | None = None, state: str | None = None,
              value: float | None = None) -> int:
    """A stream transition of an existing alert (alerts row updated, alert_events row added)."""
    now = datetime.now(UTC)
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        cur = conn.execute(
            "UPDATE alerts SET severity = coalesce(%s, severity), state = coalesce(%s, state),"
            " value = coalesce(%s, value), updated_at = %s, version = version + 1 WHERE id = %s"
            " RETURNING severity, state, value, version",
            (severity, state, value, now, alert_id)).fetchone()
        assert cur is not None
        row = conn.execute(
            "INSERT INTO alert_events (dedup, alert_id, time, transition, severity, state, actor, value)"
            " VALUES (%s, %s, %s, %s, %s, %s, 'stream', %s) RETURNING seq",
            (f"{alert_id}:{cur[3]}", alert_id, now, transition, cur[0], cur[1], cur[2])).fetchone()
    assert row is not None
    return int(row[0])


def add_operator(env: dict[str, str], name: str) -> str:
    """`arus operators add NAME` as a user runs it; the token is the last line."""
    out = subprocess.run([sys.executable, "-m", "arus.cli", "operators", "add", name], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip().splitlines()[-1]


@dataclass
class SSEEvent:
    id: str | None
    event: str
    data: dict[str, Any] | None


@dataclass
class SSEReader:
    """Reads an SSE stream in a thread; events and comment lines are collected as they arrive."""

    url: str
    params: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    events: list[SSEEvent] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    status: int | None = None
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _response: httpx.Response | None = None

    def start(self) -> SSEReader:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with httpx.stream("GET", self.url, params=self.params, headers=self.headers,
                              timeout=httpx.Timeout(10, read=60)) as resp:
                self._response = resp
                self.status = resp.status_code
                fields: dict[str, str] = {}
                for line in resp.iter_lines():
                    if self._stop.is_set():
                        return
                    if line.startswith(":"):
                        self.comments.append(line[1:].strip())
                    elif line == "":
                        if "data" in fields or "event" in fields:
                            data = orjson.loads(fields["data"]) if "data" in fields else None
                            self.events.append(SSEEvent(fields.get("id"), fields.get("event", "message"), data))
                        fields = {}
                    else:
                        key, _, value = line.partition(":")
                        fields[key] = value[1:] if value.startswith(" ") else value
        except BaseException as exc:  # reported by the test
            if not self._stop.is_set():
                self.error = exc

    def seqs(self) -> list[int]:
        return [int(e.id) for e in self.events if e.id is not None]

    def wait_connected(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not any(c.startswith("connected") for c in self.comments):
            if self.error is not None:
                raise AssertionError(f"SSE stream failed: {self.error!r} (status {self.status})")
            if time.monotonic() > deadline:
                raise AssertionError(f"SSE stream not connected after {timeout}s (status {self.status})")
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        if self._response is not None:
            try:
                self._response.close()
            except Exception:  # closing from another thread may race with the reader
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
