"""What a bench run stands on: the services (embedded unless ARUS_* URLs are set), the processes it
starts (systems under test and load generators, each in its own process group, all stopped on exit),
and the probes it watches them with (Kafka high watermarks, Prometheus counters, CPU time)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from infra import embedded

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    started: float = field(default_factory=time.monotonic)
    _ps: psutil.Process | None = None
    _last_cpu: float = 0.0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU of the process (its threads included); the last value once it exited."""
        try:
            if self._ps is None:
                self._ps = psutil.Process(self.popen.pid)
            t = self._ps.cpu_times()
            self._last_cpu = t.user + t.system + t.children_user + t.children_system
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
        return self._last_cpu

    def rss_bytes(self) -> int | None:
        try:
            if self._ps is None:
                self._ps = psutil.Process(self.popen.pid)
            return int(self._ps.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            return None

    def log_tail(self, lines: int = 25) -> str:
        return embedded.tail(self.log_path, lines)


class Procs:
    """Every process the bench started; `stop_all` stops them in reverse order of start."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[Proc] = []
        self._n = 0

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        self._n += 1
        log_path = self.logs / f"{self._n:02d}-{name}.log"
        # Own process group (Ctrl-C reaches the bench only, which then stops everything in order) and
        # a parent-death SIGKILL, so even a SIGKILLed bench leaves nothing running.
        popen = embedded.popen_in_group(argv, log_path, env=env, cwd=ROOT, deathsig=signal.SIGKILL)
        p = Proc(name, popen, log_path)
        self.procs.append(p)
        return p

    def python(self, name: str, module_args: list[str], env: dict[str, str]) -> Proc:
        return self.start(name, [sys.executable, *module_args], env)

    def stop(self, p: Proc, timeout: float = 15.0) -> int | None:
        p.cpu_seconds()  # keep the last CPU reading
        code = embedded.stop_process(p.popen, timeout=timeout)
        if p in self.procs:
            self.procs.remove(p)
        return code

    def stop_all(self) -> None:
        for p in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(p, timeout=10)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, its live descendants and its reaped children."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def wait_exit(p: Proc, timeout: float, should_stop: Callable[[], bool] | None = None) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = p.popen.poll()
        if code is not None:
            return code
        if should_stop is not None and should_stop():
            return None
        time.sleep(0.05)
    return None


# --------------------------------------------------------------------------- services


@dataclass
class Stack:
    """Kafka, PostgreSQL and MQTT: the ones named by ARUS_* or embedded ones under `base`."""

    base: Path
    kafka: str = ""
    dsn: str = ""
    mqtt_url: str = ""
    embedded: dict[str, embedded.EmbeddedService] = field(default_factory=dict)

    def start(self, say: Callable[[str], None]) -> None:
        given = {"kafka": os.environ.get("ARUS_KAFKA_BOOTSTRAP"),
                 "postgres": os.environ.get("ARUS_DATABASE_URL"),
                 "mqtt": os.environ.get("ARUS_MQTT_URL")}
        starters = {"kafka": embedded.start_tansu, "postgres": embedded.start_postgres,
                    "mqtt": embedded.start_mqtt}
        urls = {}
        for kind, url in given.items():
            if url:
                urls[kind] = url
                say(f"using {kind} at {url.split('@')[-1]}")
                continue
            last: Exception | None = None
            for _ in range(3):  # a free port can be taken between the pick and the bind
                try:
                    svc = starters[kind](embedded.free_port(), self.base / kind)
                    break
                except embedded.EmbeddedServiceError as exc:
                    last = exc
            else:
                raise RuntimeError(f"could not start embedded {kind}: {last}")
            self.embedded[kind] = svc
            urls[kind] = svc.url
            say(f"started embedded {svc.name} at {svc.url} in {svc.started_s:.1f}s")
        self.kafka, self.dsn, self.mqtt_url = urls["kafka"], urls["postgres"], urls["mqtt"]

    def stop(self) -> None:
        for kind in ("mqtt", "kafka", "postgres"):
            svc = self.embedded.pop(kind, None)
            if svc is not None:
                with contextlib.suppress(Exception):
                    svc.stop(timeout=20)

    def pids(self) -> dict[str, int]:
        return {k: s.pid for k, s in self.embedded.items()}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU of each embedded service with all its children (PostgreSQL's backends included)."""
        return {k: tree_cpu_seconds(s.pid) for k, s in self.embedded.items()}

    def env(self, prefix: str, **extra: str) -> dict[str, str]:
        """The environment of an `arus` process of one stage: the user's ARUS_* tuning is kept, the
        connections, topic prefix and consumer groups are the stage's own."""
        env = dict(os.environ)
        env.update({
            "ARUS_KAFKA_BOOTSTRAP": self.kafka,
            "ARUS_DATABASE_URL": self.dsn,
            "ARUS_MQTT_URL": self.mqtt_url,
            "ARUS_TOPIC_PREFIX": prefix,
            "ARUS_CONSUMER_GROUP_PREFIX": prefix.rstrip("."),
            "ARUS_GATEWAY_CLIENT_ID": f"{prefix.rstrip('.')}-gateway",
            "ARUS_DATA_DIR": str(self.base / "arus-data"),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra)
        return env


# --------------------------------------------------------------------------- probes


def scrape(port: int, timeout: float = 2.0) -> dict[str, float]:
    """A Prometheus text page as {'name{labels}': value} (empty when it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:  # noqa: S310
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\S+?)(\{.*\})?\s+(\S+)$", line)
        if m:
            with contextlib.suppress(ValueError):
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def metric(page: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the series of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in page.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


class KafkaWatch:
    """High watermarks of topics, read with a Fetch at the last known watermark (at most one record
    batch comes back). Not ListOffsets: the embedded Tansu answers ListOffsets(latest) with the base
    offset of the last record *batch* + 1, which undercounts every batched producer."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kafka-watch", daemon=True)
        self.thread.start()
        self.client: Any = None
        self.hw: dict[tuple[str, int], int] = {}
        self.partitions: dict[str, list[int]] = {}

    def _run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        from aiokafka.client import AIOKafkaClient

        self.client = AIOKafkaClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10000)
        await self.client.bootstrap()

    async def _highwater(self, topics: list[str]) -> dict[str, int]:
        from aiokafka.protocol.fetch import FetchRequest
        from aiokafka.structs import TopicPartition

        if self.client is None:
            await self._start()
        missing = [t for t in topics if t not in self.partitions]
        if missing:
            for t in missing:
                self.client.add_topic(t)
            await self.client.force_metadata_update()
            for t in missing:
                self.partitions[t] = sorted(self.client.cluster.partitions_for_topic(t) or [])
        by_node: dict[int, list[tuple[str, int]]] = {}
        for t in topics:
            for p in self.partitions[t]:
                node = self.client.cluster.leader_for_partition(TopicPartition(t, p))
                by_node.setdefault(node, []).append((t, p))
        for node, tps in by_node.items():
            req_topics: dict[str, list[tuple[int, int, int]]] = {}
            for t, p in tps:
                req_topics.setdefault(t, []).append((p, self.hw.get((t, p), 0), 1))
            # max_wait 1 ms: Tansu answers a zero-wait fetch with no topics at all
            resp = await self.client.send(node, FetchRequest(1, 1, 1, 0, list(req_topics.items())))
            obj = resp.to_object()
            for tdoc in obj["topics"]:
                for pdoc in tdoc["partitions"]:
                    if pdoc["error_code"] == 0 and pdoc["highwater_offset"] >= 0:
                        key = (tdoc["topics"], pdoc["partition"])
                        self.hw[key] = max(self.hw.get(key, 0), pdoc["highwater_offset"])
        return {t: sum(self.hw.get((t, p), 0) for p in self.partitions[t]) for t in topics}

    def highwater(self, *topics: str) -> dict[str, int]:
        return self._run(self._highwater(list(topics)))

    def total(self, *topics: str) -> int:
        return sum(self.highwater(*topics).values())

    def close(self) -> None:
        async def _close() -> None:
            if self.client is not None:
                await self.client.close()

        with contextlib.suppress(Exception):
            self._run(_close(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def drop_mqtt_session(mqtt_url: str, client_id: str) -> None:
    """End a persistent MQTT session (the gateway's), so the broker stops queueing for it."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from producers.gateway import parse_mqtt_url

    target = parse_mqtt_url(mqtt_url)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    if target.username:
        c.username_pw_set(target.username, target.password)
    with contextlib.suppress(OSError):
        c.connect(target.host, target.port, keepalive=10)
        c.loop_start()
        deadline = time.monotonic() + 5
        while not c.is_connected() and time.monotonic() < deadline:
            time.sleep(0.02)
        c.disconnect()
        c.loop_stop()


def machine_info() -> dict[str, Any]:
    import platform

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    vm = psutil.virtual_memory()
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(vm.total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
