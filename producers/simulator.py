"""A Jember sensor simulator: devices in all 31 kecamatan publishing realistic telemetry over MQTT.

The physics is a pure function of (device, time), `reading_for`, so tests can check ranges and
rhythm without a clock: a diurnal cycle in WIB, wet-season afternoon storms per kecamatan, rivers
that rise a few hours after the rain upstream and fall back to ~0.8-1.5 m, PM2.5 peaking at rush
hours and from dry-season evening burning, streetlights on at night, bins filling until collection.
Randomness is a hash of (device salt, time bucket), never global state.

`run_simulator` paces publishing to a total rate (1..20,000 msg/s) by sleeping until the next
message is due (bursts of a millisecond's worth, no busy loop).

With a registry (ARUS_DATABASE_URL), every simulated device is a registered device that logs in
with its own id and secret, over a connection of its own that carries its telemetry, its retained
`online` status and its `offline` last will (all connections driven by one I/O thread): the broker's
rules apply to it as to any device (it may publish only under its own `jember/v1/{id}/`). Its
secrets are kept in DATA_DIR/simulator/credentials.json (0600; the registry holds only hashes).
Without a registry, it publishes over a few shared connections with ARUS_MQTT_URL's login (a broker
without per-device auth), plus one idle connection per device for its status and will.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import multiprocessing
import os
import queue
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol

import orjson

from infra.settings import Settings
from schemas.regions import kecamatan_codes, load_regions
from schemas.sensors import SENSOR_KINDS

from .gateway import FastClient, MqttTarget, make_mqtt_client, parse_mqtt_url

log = logging.getLogger("arus.simulator")

WIB = timezone(timedelta(hours=7), "WIB")
KIND_ORDER = ("water_level", "rainfall", "air_quality", "traffic_flow", "streetlight", "waste_container", "noise")
KIND_PREFIX = {
    "water_level": "wl", "rainfall": "rf", "air_quality": "aq", "traffic_flow": "tf",
    "streetlight": "sl", "waste_container": "wc", "noise": "nl",
}
# Kecamatan on the slopes of Argopuro and Raung: cooler, more rain upstream.
HIGHLAND = {"35.09.14", "35.09.15", "35.09.22", "35.09.25", "35.09.28", "35.09.30", "35.09.31", "35.09.03"}
URBAN = {"35.09.19", "35.09.20", "35.09.21"}  # Kaliwates, Patrang, Sumbersari: the Bedadung's city reach
MAX_OUTSTANDING = 10_000  # unacknowledged publishes per connection (paho message ids wrap at 65535)


@dataclass(frozen=True, slots=True)
class SimDevice:
    device_id: str
    kind: str
    region_code: str  # a desa/kelurahan of the kecamatan
    kecamatan: str
    salt: int  # per-device randomness (phases, scales, noise)
    epoch_ts: bool  # publish `ts` as epoch ms (else RFC 3339 with +07:00)


# --------------------------------------------------------------------------- deterministic noise

_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64 finaliser: a well-spread 64-bit hash of an int."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _u(a: int, b: int, c: int = 0) -> float:
    """Uniform in [0, 1), a pure function of its arguments."""
    return _mix(_mix(a ^ (b * 0x100000001B3)) ^ c) / 18446744073709551616.0


def _smooth(salt: int, t: float, period: float) -> float:
    """Smooth value noise in [-1, 1) with features about `period` seconds long."""
    x = t / period
    i = math.floor(x)
    f = x - i
    f = f * f * (3 - 2 * f)
    return 2 * (_u(salt, i) * (1 - f) + _u(salt, i + 1) * f) - 1


def _salt(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _kec_salt(kecamatan: str) -> int:
    return int(kecamatan.replace(".", ""))


def _bell(x: float, centre: float, width: float) -> float:
    return math.exp(-0.5 * ((x - centre) / width) ** 2)


# --------------------------------------------------------------------------- climate of Jember


def _wetness(day: int) -> float:
    """0 (dry, mid-July) .. 1 (wet, late January), from the local day number."""
    doy = day % 365.2425  # day 0 = 1970-01-01, so this is the day of the year (0-based)
    return 0.5 + 0.5 * math.cos(2 * math.pi * (doy - 20) / 365.2425)


def _storm(kec: int, day: int) -> tuple[float, float, float] | None:
    """(start hour WIB, duration h, peak mm/h) of the afternoon storm of a kecamatan on a day."""
    w = _wetness(day)
    if _u(kec, day, 1) >= 0.06 + 0.74 * w:
        return None
    start = 13.0 + 4.0 * _u(kec, day, 2)
    duration = 0.75 + 2.5 * _u(kec, day, 3)
    peak = (3.0 + 45.0 * _u(kec, day, 4) ** 2) * (0.5 + 0.5 * w)
    return start, duration, peak


def _rain_rate(kec: int, epoch_s: float) -> float:
    """mm/h falling now over a kecamatan (storms end by ~20:15, so only today's can be falling)."""
    local = epoch_s + 7 * 3600
    day = int(local // 86400)
    storm = _storm(kec, day)
    if storm is None:
        return 0.0
    hour = (local % 86400) / 3600
    start, duration, peak = storm
    if not start <= hour <= start + duration:
        return 0.0
    return peak * math.sin(math.pi * (hour - start) / duration) ** 2


def _runoff(kec: int, epoch_s: float) -> float:
    """Water level rise (m) from the rain of the last two days: the river answers with a lag of
    about three hours and drains over about half a day."""
    local = epoch_s + 7 * 3600
    day = int(local // 86400)
    hour_now = (local % 86400) / 3600
    rise = 0.0
    for d in (day - 1, day):
        for source, gain in ((kec, 0.018), (0, 0.012)):  # 0: the upstream (highland) catchment
            storm = _storm(source, d)
            if storm is None:
                continue
            start, duration, peak = storm
            total_mm = peak * duration * 0.5
            x = hour_now + 24 * (day - d) - (start + duration / 2)  # hours since the storm's middle
            if x > 0:
                tau = 3.0
                rise += gain * total_mm * (x / tau) * math.exp(1 - x / tau)
    return rise


def _rush(hour: float) -> float:
    return _bell(hour, 7.0, 1.0) + 0.9 * _bell(hour, 16.8, 1.4) + 0.35 * _bell(hour, 12.0, 1.5)


# --------------------------------------------------------------------------- the readings


def reading_for(device: SimDevice, t: datetime | float) -> dict[str, float]:
    """The values `device` measures at `t` (aware datetime or epoch seconds): pure, deterministic,
    within the metric ranges of schemas.sensors."""
    epoch_s = t.timestamp() if isinstance(t, datetime) else float(t)
    local = epoch_s + 7 * 3600
    day = int(local // 86400)
    hour = (local % 86400) / 3600
    weekday = (day + 3) % 7  # 0 = Monday (1970-01-01 was a Thursday)
    w = _wetness(day)
    kec = _kec_salt(device.kecamatan)
    salt = device.salt
    rain = _rain_rate(kec, epoch_s)
    wet = min(1.0, rain / 10.0)
    sun = max(0.0, math.sin(math.pi * (hour - 5.7) / 12.2))
    temp = (
        27.0 + 4.5 * math.sin(2 * math.pi * (hour - 9.0) / 24) - 3.0 * wet - 1.5 * (1 - w) * (1 - sun)
        - (2.5 if device.kecamatan in HIGHLAND else 0.0) + 0.6 * _smooth(salt, epoch_s, 1800)
    )
    rh = 0.78 - 0.18 * math.sin(2 * math.pi * (hour - 9.0) / 24) + 0.06 * w + 0.12 * wet \
        + 0.03 * _smooth(salt + 1, epoch_s, 1200)
    kind = device.kind
    values: dict[str, float]
    if kind == "water_level":
        level = (0.85 + 0.35 * w) * (0.9 + 0.2 * _u(salt, 7)) + _runoff(kec, epoch_s) \
            + 0.03 * _smooth(salt, epoch_s, 900)
        flow = 18.0 * max(level - 0.3, 0.0) ** 1.6 * (0.97 + 0.03 * _smooth(salt + 2, epoch_s, 600))
        values = {"waterLevel": level, "flow": flow}
    elif kind == "rainfall":
        # mm in the 5 minutes before the observation; gauges tip in 0.2 mm steps
        mm = rain * 5 / 60 * (0.85 + 0.3 * _u(salt, int(epoch_s // 300)))
        values = {"precipitation": round(mm / 0.2) * 0.2, "temperature": temp, "relativeHumidity": rh}
    elif kind == "air_quality":
        urban = 1.6 if device.kecamatan in URBAN else 1.0
        traffic = _rush(hour) * (0.75 if weekday >= 5 else 1.0) * urban
        burning = 0.0
        if _u(kec, day, 11) < 0.03 + 0.35 * (1 - w):  # dry-season evening burning of harvest waste
            burning = (30 + 110 * _u(kec, day, 12)) * _bell(hour, 19.5, 1.4)
        washout = 1.0 - 0.6 * wet
        pm25 = (10 + 6 * (1 - w) + 24 * traffic + burning) * washout * (1 + 0.12 * _smooth(salt, epoch_s, 900))
        values = {
            "pm25": pm25,
            "pm10": pm25 * (1.5 + 0.25 * _u(salt, 3)) + 4,
            "no2": (12 + 38 * traffic) * (1 + 0.1 * _smooth(salt + 3, epoch_s, 900)),
            "o3": 12 + 75 * sun * (1 - 0.5 * wet) * (1 + 0.1 * _smooth(salt + 4, epoch_s, 1800)),
            "co": 0.3 + 1.1 * traffic + 0.015 * burning,
            "so2": 4 + 5 * traffic + 1.5 * _u(salt, int(epoch_s // 600)),
            "temperature": temp,
            "relativeHumidity": rh,
        }
    elif kind == "traffic_flow":
        scale = (0.6 + 1.2 * _u(salt, 5)) * (1.8 if device.kecamatan in URBAN else 1.0)
        daytime = _bell(hour, 13.0, 4.5)
        demand = (0.1 + 1.6 * _rush(hour) + 0.8 * daytime) * (0.8 if weekday >= 5 else 1.0)
        intensity = max(0.0, 60 * scale * demand * (1 + 0.08 * _smooth(salt, epoch_s, 300)))
        capacity = 160 * scale
        congestion = min(1.0, intensity / capacity)
        values = {
            "intensity": round(intensity),  # vehicles in the 5-minute observation period
            "averageVehicleSpeed": 58 * (1 - 0.55 * congestion ** 2) * (1 - 0.1 * wet),
            "occupancy": min(0.95, 0.04 + 0.55 * congestion),
        }
    elif kind == "streetlight":
        if 17.75 <= hour < 23 or 4.5 <= hour < 5.4:
            level = 1.0
        elif hour >= 23 or hour < 4.5:
            level = 0.6  # dimmed after 23:00 to save energy
        else:
            level = 0.0
        watts = (90 + 80 * _u(salt, 6)) * level + 2.5 + (1.5 * _smooth(salt, epoch_s, 600) if level else 0)
        values = {"illuminanceLevel": level, "powerConsumption": watts}
    elif kind == "waste_container":
        cycle = 2 + int(_u(salt, 8) * 2)  # collected every 2 or 3 days at 06:00 WIB
        phase = int(_u(salt, 9) * cycle)
        since = (day + phase) % cycle
        hours = since * 24 + hour - 6.0
        if hours < 0:
            hours += cycle * 24
        fill = hours / (cycle * 24) * (0.75 + 0.4 * _u(salt, 10, day))
        values = {"fillingLevel": min(1.0, fill), "temperature": temp + 2.0 + 5.0 * min(1.0, fill)}
    elif kind == "noise":
        traffic = _rush(hour) * (1.4 if device.kecamatan in URBAN else 1.0)
        night = 1.0 if (hour < 5 or hour >= 22) else 0.0
        laeq = 44 + 14 * traffic + 6 * (1 - night) + 2 * _smooth(salt, epoch_s, 300)
        values = {"LAeq": laeq, "LAmax": laeq + 9 + 12 * _u(salt, int(epoch_s // 60))}
    else:  # a kind added to the catalogue later: mid-range values
        values = {m.name: (m.min + m.max) / 2 for m in SENSOR_KINDS[kind].metrics.values()}
    metrics = SENSOR_KINDS[kind].metrics
    return {
        name: round(min(metrics[name].max, max(metrics[name].min, value)), 3) for name, value in values.items()
    }


# --------------------------------------------------------------------------- devices


def plan_devices(devices_per_kecamatan: int = 3, seed: int | None = None) -> list[SimDevice]:
    """Devices in every kecamatan: the first three are a river gauge, a rain gauge and an air quality
    station; more per kecamatan add the other kinds in turn. Ids look like `wl-350919-01`."""
    regions = load_regions()
    villages: dict[str, list[str]] = {}
    for code, region in regions.items():
        if region.level in ("desa", "kelurahan"):
            villages.setdefault(region.parent_code, []).append(code)
    out: list[SimDevice] = []
    serial = 0
    for kec in kecamatan_codes():
        desa = sorted(villages.get(kec, [])) or [kec]
        for j in range(devices_per_kecamatan):
            kind = KIND_ORDER[j % len(KIND_ORDER)]
            device_id = f"{KIND_PREFIX[kind]}-{kec.replace('.', '')}-{j // len(KIND_ORDER) + 1:02d}"
            salt = _salt(f"{seed if seed is not None else ''}:{device_id}")
            out.append(SimDevice(
                device_id, kind, desa[salt % len(desa)], kec, salt, epoch_ts=serial % 2 == 1,
            ))
            serial += 1
    return out


def register_devices(dsn: str, devices: list[SimDevice]) -> int:
    """Add the devices not yet in the registry (existing ones keep their secret); returns how many
    were added."""
    import psycopg

    from infra.devices import add_device

    ids = [d.device_id for d in devices]
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT device_id FROM devices WHERE device_id = ANY(%s)", (ids,)).fetchall()
        existing = {r[0] for r in rows}
        added = 0
        for device in devices:
            if device.device_id not in existing:
                add_device(conn, device.device_id, device.kind, device.region_code)
                added += 1
        conn.commit()
    return added


CREDENTIALS_FILE = "simulator/credentials.json"


def issue_credentials(dsn: str, devices: list[SimDevice], store: Path) -> tuple[dict[str, str], int]:
    """Each simulated device is a registered device with credentials of its own, kept in `store`
    (JSON, mode 0600) because the registry holds only hashes. Returns ({device id: secret}, how many
    were newly registered).

    - not in the registry: registered, its secret kept;
    - in the registry with a secret in `store` that matches: used as is (a re-run rotates nothing);
    - in the registry with a hash from before broker auth (`pbkdf2_sha256$`, cannot log in anyway):
      rotated, the new secret kept;
    - otherwise (revoked, or a secret the simulator does not hold: someone else's device, or one an
      operator rotated): left out, never rotated, so a real device is never locked out.
    """
    import json

    import psycopg

    from infra.devices import add_device, rotate_secret, verify_secret
    from infra.mqtt_auth import is_broker_hash

    try:
        kept: dict[str, str] = json.loads(store.read_text())
    except (FileNotFoundError, ValueError):
        kept = {}
    ids = [d.device_id for d in devices]
    out: dict[str, str] = {}
    added = 0
    skipped = []
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT device_id, secret_hash, revoked_at IS NOT NULL FROM devices"
                            " WHERE device_id = ANY(%s)", (ids,)).fetchall()
        known = {r[0]: (r[1], r[2]) for r in rows}
        for device in devices:
            if device.device_id not in known:
                out[device.device_id] = add_device(conn, device.device_id, device.kind, device.region_code)
                added += 1
                continue
            stored, revoked = known[device.device_id]
            secret = kept.get(device.device_id)
            if revoked:
                skipped.append(device.device_id)
            elif secret is not None and verify_secret(secret, stored):
                out[device.device_id] = secret
            elif not is_broker_hash(stored):
                out[device.device_id] = rotate_secret(conn, device.device_id)
            else:
                skipped.append(device.device_id)
        # Kept before the registry commits: a crash in between leaves secrets nobody uses, never
        # registered devices whose secrets are lost.
        store.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(store, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({**kept, **out}, f, indent=0, sort_keys=True)
        os.chmod(store, 0o600)
        conn.commit()
    if skipped:
        log.warning("%d simulated device id(s) left out: revoked, or registered with a secret the simulator "
                    "does not hold (%s): %s", len(skipped), store, ", ".join(skipped[:10]))
    return out, added


def telemetry_payload(device: SimDevice, now_ms: int, seq: int, values: dict[str, float]) -> bytes:
    if device.epoch_ts:
        ts: Any = now_ms
    else:
        ts = datetime.fromtimestamp(now_ms / 1000, WIB).isoformat(timespec="milliseconds")
    return orjson.dumps({"ts": ts, "seq": seq, "values": values})


# --------------------------------------------------------------------------- MQTT plumbing


class _Presence:
    """One idle connection per device, carrying its retained `online` status and `offline` will.

    All of them are driven by one thread (poll() over their sockets): hundreds of devices cost one
    thread and no busy loop.
    """

    def __init__(self, target: MqttTarget, devices: list[SimDevice], prefix: str) -> None:
        self.target = target
        self.clients: list[tuple[SimDevice, FastClient]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-presence", daemon=True)
        self._prefix = prefix
        self.devices = devices

    def start(self) -> None:
        for device in self.devices:
            client = make_mqtt_client(self.target, f"{self._prefix}-{device.device_id}"[:64], clean_session=True)
            topic = f"jember/v1/{device.device_id}/status"
            client.will_set(topic, "offline", qos=1, retain=True)
            client.on_connect = _announce(topic)
            try:
                client.connect(self.target.host, self.target.port, keepalive=60)
            except OSError as exc:
                log.warning("presence connection for %s failed: %s", device.device_id, exc)
            self.clients.append((device, client))
        self._thread.start()

    def _run(self) -> None:
        last_misc = 0.0
        last_retry = time.monotonic()
        while not self._stop.is_set():
            poller = select.poll()
            by_fd: dict[int, FastClient] = {}
            for _device, client in self.clients:
                sock = client.socket()
                if sock is None:
                    continue
                fd = sock.fileno()
                by_fd[fd] = client
                poller.register(fd, select.POLLIN | (select.POLLOUT if client.want_write() else 0))
            for fd, events in poller.poll(500):
                client = by_fd[fd]
                if events & (select.POLLIN | select.POLLERR | select.POLLHUP):
                    client.loop_read()
                if events & select.POLLOUT:
                    client.loop_write()
            now = time.monotonic()
            if now - last_misc >= 1.0:
                last_misc = now
                for _device, client in self.clients:
                    client.loop_misc()  # keepalive pings
            if now - last_retry >= 5.0:
                last_retry = now
                for _device, client in self.clients:
                    if client.socket() is None:
                        try:
                            client.reconnect()
                        except OSError:
                            pass

    def stop(self) -> None:
        """Say `offline` (retained) for every device and disconnect cleanly (no will then)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for device, client in self.clients:
            if client.socket() is None:
                continue
            client.publish(f"jember/v1/{device.device_id}/status", "offline", qos=1, retain=True)
            client.disconnect()
            client.loop_write()


def _announce(topic: str) -> Callable[..., None]:
    def on_connect(client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            client.publish(topic, "online", qos=1, retain=True)
    return on_connect


class _DeviceLinks:
    """One MQTT connection per device, logged in with the device's own id and secret: the broker
    lets a device publish only under its own topics. Each connection also carries the device's
    retained `online` status and `offline` last will.

    One thread does all network I/O for all of them (poll() over their sockets); `publish` only
    queues (paho's socket-register-write hook wakes the thread), so no socket is written by two
    threads. A refused or lost connection is retried every second (a rotated secret becomes valid
    when the broker reloads its password file).
    """

    RETRY_S = 1.0

    def __init__(
        self, target: MqttTarget, devices: list[SimDevice], secrets: dict[str, str], tag: str,
        presence: bool = True,
    ) -> None:
        self.devices = devices
        self.presence = presence
        self._status_mids: set[tuple[int, int]] = set()  # (client, mid): status acks are not telemetry acks
        self._refused: list[str] = []  # reported in summary: right after a rotation, until the broker reloads
        self.clients: list[FastClient] = []
        self.published = 0
        self.acked = 0
        self._connected: set[int] = set()
        self._pending: list[FastClient] = []  # clients with packets to send, named by paho's hook
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        for i, device in enumerate(devices):
            login = MqttTarget(target.host, target.port, device.device_id, secrets[device.device_id], target.tls)
            client = make_mqtt_client(login, f"{tag}-{device.device_id}"[:64], clean_session=True)
            client.max_inflight_messages_set(0)
            client.max_queued_messages_set(0)
            status = f"jember/v1/{device.device_id}/status"
            if presence:
                client.will_set(status, "offline", qos=1, retain=True)
            client.on_connect = self._on_connect_for(i, status)
            client.on_disconnect = self._on_disconnect_for(i)
            client.on_publish = self._on_publish
            client.on_socket_register_write = self._wake
            client.connect_async(target.host, target.port, keepalive=60)  # connects in start()
            self.clients.append(client)
        self._thread = threading.Thread(target=self._run, name="sim-devices", daemon=True)

    def _on_connect_for(self, i: int, status: str) -> Callable[..., None]:
        def on_connect(client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                self._refused.append(f"{self.devices[i].device_id} ({reason})")
                return
            # In the I/O thread: the ack of this status cannot be read before its mid is noted. (Not
            # under the lock: publishing calls the register-write hook, which takes it.)
            mid = client.publish(status, "online", qos=1, retain=True).mid if self.presence else None
            with self._lock:
                self._connected.add(i)
                if mid is not None:
                    self._status_mids.add((id(client), mid))
        return on_connect

    def _on_disconnect_for(self, i: int) -> Callable[..., None]:
        def on_disconnect(*_a: Any) -> None:
            with self._lock:
                self._connected.discard(i)
        return on_disconnect

    def _on_publish(self, client: Any, _u: Any, mid: int, *_args: Any) -> None:
        with self._lock:
            if (id(client), mid) in self._status_mids:
                self._status_mids.discard((id(client), mid))
                return
        self.acked += 1

    def _wake(self, client: Any, *_args: Any) -> None:
        """paho's register-write hook (any thread): `client` has packets queued."""
        with self._lock:
            self._pending.append(client)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def connected(self) -> int:
        with self._lock:
            return len(self._connected)

    @property
    def outstanding(self) -> int:
        return self.published - self.acked

    def start(self, wait_s: float = 30.0) -> None:
        for client in self.clients:
            self._connect(client)
        self._thread.start()
        deadline = time.monotonic() + wait_s
        while self.connected() < len(self.clients) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.connected() < len(self.clients):
            log.warning("%d of %d device connections are up after %.0fs; the others keep retrying",
                        self.connected(), len(self.clients), wait_s)

    @staticmethod
    def _connect(client: FastClient) -> None:
        try:
            client.reconnect()  # host, port and keepalive were set by connect_async
        except OSError as exc:
            log.debug("connection failed: %s", exc)

    def publish(self, i: int, topic: str, payload: bytes) -> None:
        self.clients[i].publish(topic, payload, qos=1)
        self.published += 1

    def _run(self) -> None:
        """The I/O loop. Kept O(1) per event: sockets stay registered in one poll object; a client
        with something to send is named by paho's register-write hook; a sweep every 50 ms catches
        a queue the hook could not announce (it fires once per idle-to-busy edge)."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        by_fd: dict[int, FastClient] = {}
        fd_of: dict[int, int] = {}  # id(client) -> its registered fd
        writing: set[int] = set()  # fds registered for POLLOUT too

        def sync_fd(client: FastClient) -> int | None:
            sock = client.socket()
            fd = sock.fileno() if sock is not None else None
            old = fd_of.get(id(client))
            if old == fd:
                return fd
            if old is not None:
                with contextlib.suppress(KeyError):
                    poller.unregister(old)
                by_fd.pop(old, None)
                writing.discard(old)
                del fd_of[id(client)]
            if fd is not None:
                poller.register(fd, select.POLLIN)
                by_fd[fd] = client
                fd_of[id(client)] = fd
            return fd

        def write(client: FastClient) -> None:
            if client.socket() is not None:
                client.loop_write()
            fd = sync_fd(client)
            if fd is None:
                return
            if client.want_write():
                if fd not in writing:
                    poller.modify(fd, select.POLLIN | select.POLLOUT)
                    writing.add(fd)
            elif fd in writing:
                poller.modify(fd, select.POLLIN)
                writing.discard(fd)

        for client in self.clients:
            sync_fd(client)
        last_misc = last_sweep = 0.0
        last_retry = time.monotonic()
        last_refused_log = 0.0
        while not self._stop.is_set():
            for fd, events in poller.poll(50):
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError, OSError):
                        os.read(self._wake_r, 65536)
                    continue
                found = by_fd.get(fd)
                if found is None:
                    continue
                client = found
                if events & (select.POLLIN | select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    client.loop_read()
                    sync_fd(client)
                if events & select.POLLOUT:
                    write(client)
            with self._lock:
                pending, self._pending = self._pending, []
            for client in pending:
                write(client)
            now = time.monotonic()
            if now - last_sweep >= 0.05:
                last_sweep = now
                for client in self.clients:
                    if client.want_write():
                        write(client)
            if now - last_misc >= 1.0:
                last_misc = now
                for client in self.clients:
                    client.loop_misc()  # keepalive pings
                    sync_fd(client)
            if now - last_retry >= self.RETRY_S:
                last_retry = now
                if self._refused and now - last_refused_log >= 30.0:
                    last_refused_log = now
                    refused, self._refused = self._refused, []
                    log.info("broker refused %d device login(s) since the last report, retrying every %.0fs "
                             "(new credentials are valid once the broker reloads its password file): %s",
                             len(refused), self.RETRY_S, ", ".join(sorted(set(refused))[:5]))
                for client in self.clients:
                    if client.socket() is None:
                        self._connect(client)
                        write(client)

    def close(self, timeout: float) -> None:
        """Wait for outstanding acks, say `offline` (retained) for every device, disconnect."""
        deadline = time.monotonic() + timeout
        while self.outstanding > 0 and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.01)
        acked = self.acked
        for device, client in zip(self.devices, self.clients, strict=True):
            if client.socket() is not None:
                if self.presence:
                    client.publish(f"jember/v1/{device.device_id}/status", "offline", qos=1, retain=True)
                client.disconnect()
        deadline = time.monotonic() + 2
        while any(c.socket() is not None and c.want_write() for c in self.clients) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.acked = acked  # telemetry only


class _Conn:
    """A shared telemetry connection with a count of unacknowledged publishes (backpressure)."""

    def __init__(self, target: MqttTarget, client_id: str) -> None:
        self.client = make_mqtt_client(target, client_id, clean_session=True)
        self.client.max_inflight_messages_set(0)  # unlimited: paho rescans its queue per ack otherwise
        self.client.max_queued_messages_set(0)
        self.published = 0
        self.acked = 0
        self.client.on_publish = self._on_publish
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.connect_async(target.host, target.port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("MQTT broker refused the simulator: %s", reason)
        else:
            self.connected.set()

    def _on_publish(self, *_args: Any) -> None:
        self.acked += 1

    @property
    def outstanding(self) -> int:
        return self.published - self.acked

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)
        self.published += 1

    def close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.outstanding > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.client.disconnect()
        self.client.loop_stop()


# --------------------------------------------------------------------------- the run


class Pacer:
    """Paces `total` messages at `rate`/s: `take()` sleeps until at least one message is due and
    returns how many are due now (at most 50 ms worth), or -1 when all were taken.

    The schedule is absolute (message k is due at start + k/rate), so sleep overshoot never
    accumulates into a lower rate; sleeps last at least a millisecond, so at high rates messages go
    in small bursts instead of the loop spinning.
    """

    def __init__(
        self, rate: float, total: float = math.inf,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], Any] = time.sleep,
        stopped: Callable[[], bool] = lambda: False,
    ) -> None:
        self.rate = rate
        self.total = total
        self.clock = clock
        self.sleep = sleep
        self.stopped = stopped
        self.burst_cap = max(1, int(rate * 0.05))
        self.taken = 0
        self.start = clock()

    def take(self) -> int:
        while self.taken < self.total and not self.stopped():
            now = self.clock()
            due = min(int((now - self.start) * self.rate) + 1, self.total) - self.taken
            if due > 0:
                n = int(min(due, self.burst_cap))
                self.taken += n
                return n
            self.sleep(max(0.001, self.start + self.taken / self.rate - now))
        return -1



class _StopLike(Protocol):
    def is_set(self) -> bool: ...
    def set(self) -> None: ...
    def wait(self, timeout: float | None = None) -> bool: ...


def _publish(
    target: MqttTarget, devices: list[SimDevice], rate: float, total: float, tag: str, stop: _StopLike,
    secrets: dict[str, str] | None = None, presence: bool = True,
) -> dict[str, Any]:
    """Publish telemetry of `devices`, round robin, `total` messages at `rate`/s (this process).

    With `secrets` (device id -> secret) every device publishes over its own logged-in connection
    (which also carries its status); without, over a few shared connections with the login of
    ARUS_MQTT_URL (a broker without per-device auth)."""
    conns: list[_Conn] = []
    links: _DeviceLinks | None = None
    if secrets is not None:
        links = _DeviceLinks(target, devices, secrets, tag, presence)
        links.start()
        n_conn = 1
    else:
        n_conn = max(1, min(4, math.ceil(rate / 5000)))
        conns = [_Conn(target, f"{tag}-{i}") for i in range(n_conn)]
        for conn in conns:
            if not conn.connected.wait(30):
                log.warning("MQTT %s:%d not reachable yet; messages queue until it is", target.host, target.port)
                break
    sources: list[_Conn | _DeviceLinks] = [links] if links is not None else list(conns)
    topics = [f"jember/v1/{d.device_id}/telemetry" for d in devices]
    seqs = [0] * len(devices)
    cache: list[tuple[int, dict[str, float]]] = [(-1, {})] * len(devices)
    published = 0
    throttled = 0.0
    pacer = Pacer(rate, total, sleep=stop.wait, stopped=stop.is_set)
    try:
        while True:
            n = pacer.take()
            if n < 0:
                break
            now_ms = time.time_ns() // 1_000_000
            second = now_ms // 1000
            for _ in range(n):
                i = published % len(devices)
                device = devices[i]
                cached_second, values = cache[i]
                if cached_second != second:  # values change by the second: one model run per device per s
                    values = reading_for(device, second)
                    cache[i] = (second, values)
                payload = telemetry_payload(device, now_ms, seqs[i], values)
                if links is not None:
                    links.publish(i, topics[i], payload)
                else:
                    conns[i % n_conn].publish(topics[i], payload)
                seqs[i] += 1
                published += 1
            while any(c.outstanding > MAX_OUTSTANDING for c in sources) and not stop.is_set():
                stop.wait(0.002)  # the broker is slower than the rate: wait rather than queue
                throttled += 0.002
    finally:
        elapsed = time.monotonic() - pacer.start
        for source in sources:
            source.close(timeout=10)
    return {"published": published, "acknowledged": sum(c.acked for c in sources),
            "elapsed_s": elapsed, "throttled_s": throttled}


def _worker_main(
    target: MqttTarget, devices: list[SimDevice], rate: float, total: float, tag: str,
    stop: _StopLike, results: Any, secrets: dict[str, str] | None = None, presence: bool = True,
) -> None:
    """Entry point of a publishing child process (rates beyond what one Python process sends)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    results.put(_publish(target, devices, rate, total, tag, stop, secrets, presence))


def run_simulator(
    settings: Settings,
    rate: float,
    duration: float,
    devices_per_kecamatan: int = 3,
    seed: int | None = None,
    *,
    presence: bool = True,
    processes: int | None = None,
    per_device_credentials: bool = True,
) -> dict[str, Any]:
    """Publish `rate` telemetry messages/s in total for `duration` s (0: until SIGINT/SIGTERM).

    One Python process publishes about 15,000 QoS 1 messages/s; higher rates are split over
    `processes` child processes (default: one per 10,000 msg/s, at most one per core).
    """
    if rate <= 0:
        raise ValueError("rate must be > 0")
    devices = plan_devices(devices_per_kecamatan, seed)
    registered = 0
    secrets: dict[str, str] | None = None
    if settings.database_url is not None and per_device_credentials:
        try:
            store = Path(settings.data_dir).absolute() / CREDENTIALS_FILE
            secrets, registered = issue_credentials(settings.database_dsn(), devices, store)
            planned = len(devices)
            devices = [d for d in devices if d.device_id in secrets]
            log.info("%d of %d simulated devices publish with their own credentials (%d newly registered)",
                     len(devices), planned, registered)
        except Exception as exc:  # noqa: BLE001 - a simulator still publishes without a registry
            log.warning("could not issue device credentials (%s); publishing with ARUS_MQTT_URL's login", exc)
    elif settings.database_url is not None:
        try:
            registered = register_devices(settings.database_dsn(), devices)
            log.info("registered %d new devices (%d planned)", registered, len(devices))
        except Exception as exc:  # noqa: BLE001 - a simulator still publishes without a registry
            log.warning("could not register devices (%s); publishing anyway", exc)
    if not devices:
        raise ValueError("every simulated device is revoked")
    target = parse_mqtt_url(settings.mqtt_url)
    if processes is None:
        processes = max(1, min(os.cpu_count() or 1, math.ceil(rate / 10_000)))
    processes = max(1, min(processes, len(devices)))
    total = math.inf if duration <= 0 else max(1, round(rate * duration))

    ctx = multiprocessing.get_context("spawn")  # no fork of a process that runs threads
    stop: _StopLike = ctx.Event() if processes > 1 else threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())

    tag = f"arus-sim-{_salt(str(time.time_ns())) % 100000:05d}"
    # With per-device logins each device's own connection carries its status (a will speaks only
    # for its own connection, and the broker lets a device write only its own topics).
    pres = _Presence(target, devices, tag) if presence and secrets is None else None
    started = time.monotonic()
    try:
        if pres is not None:
            pres.start()
        if processes == 1:
            parts = [_publish(target, devices, rate, total, tag, stop, secrets, presence)]
        else:
            results = ctx.Queue()
            children = [
                ctx.Process(
                    target=_worker_main, name=f"sim-publisher-{k}", daemon=True,
                    args=(target, devices[k::processes], rate / processes,
                          total / processes if total != math.inf else math.inf, f"{tag}-p{k}", stop, results,
                          {d.device_id: secrets[d.device_id] for d in devices[k::processes]} if secrets else None,
                          presence),
                )
                for k in range(processes)
            ]
            for child in children:
                child.start()
            parts = []
            while len(parts) < processes and (any(c.is_alive() for c in children) or not results.empty()):
                with contextlib.suppress(queue.Empty):
                    parts.append(results.get(timeout=0.5))
            for child in children:
                child.join(timeout=10)
    finally:
        stop.set()
        if pres is not None:
            pres.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    elapsed = max((p["elapsed_s"] for p in parts), default=time.monotonic() - started)
    published = sum(p["published"] for p in parts)
    result = {
        "devices": len(devices),
        "registered": registered,
        "processes": processes,
        "published": published,
        "acknowledged": sum(p["acknowledged"] for p in parts),
        "elapsed_s": round(elapsed, 3),
        "rate": round(published / elapsed, 1) if elapsed > 0 else 0.0,
        "throttled_s": round(sum(p["throttled_s"] for p in parts), 3),
    }
    log.info("simulator done: %s", result)
    return result
