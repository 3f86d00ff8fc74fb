"""Kafka administration: wait for a broker, create topics idempotently (kafka-python admin client)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from schemas.errors import InfraError

log = logging.getLogger(__name__)
# kafka-python narrates every connection at INFO; keep it for warnings unless configured otherwise.
if logging.getLogger("kafka").level == logging.NOTSET:
    logging.getLogger("kafka").setLevel(logging.WARNING)


def _admin(bootstrap: str, timeout: float) -> KafkaAdminClient:
    return KafkaAdminClient(
        bootstrap_servers=[b.strip() for b in bootstrap.split(",") if b.strip()],
        client_id="arus-admin",
        request_timeout_ms=max(1000, int(timeout * 1000)),
    )


def wait_kafka(bootstrap: str, timeout: float = 60.0) -> None:
    """Wait until the cluster answers metadata requests; InfraError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin = _admin(bootstrap, min(10.0, max(1.0, deadline - time.monotonic())))
            try:
                if admin.describe_cluster().get("brokers"):
                    return
            finally:
                admin.close()
        except (KafkaError, OSError, ValueError) as e:  # NoBrokersAvailable, timeouts, refused
            last = e
        time.sleep(0.2)
    raise InfraError(f"Kafka at {bootstrap} not reachable after {timeout:.0f}s: {last}")


def _ready(admin: KafkaAdminClient, names: list[str]) -> set[str]:
    """Topics among `names` whose every partition has a leader."""
    ready = set()
    for t in admin.describe_topics(names):
        parts = t.get("partitions") or []
        if t.get("error_code", 0) == 0 and parts and all(p.get("leader_id", -1) >= 0 for p in parts):
            ready.add(t["name"])
    return ready


def ensure_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int,
    *,
    replication_factor: int | None = None,
    timeout: float = 60.0,
) -> None:
    """Create the missing topics (existing ones are left as they are) and wait until all have leaders.

    Idempotent and safe to call from several processes at once. The replication factor defaults to
    min(3, number of brokers): 1 on the embedded broker, 3 on a production cluster.
    """
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return
    deadline = time.monotonic() + timeout
    wait_kafka(bootstrap, timeout)
    admin = _admin(bootstrap, min(30.0, timeout))
    try:
        rf = replication_factor or max(1, min(3, len(admin.describe_cluster().get("brokers") or [])))
        while True:
            existing = set(admin.list_topics())
            missing = [n for n in wanted if n not in existing]
            if missing:
                log.info("creating topics %s (%d partitions, rf %d)", missing, partitions, rf)
                for name in missing:  # one by one: an error on one must not hide the others
                    try:
                        admin.create_topics([NewTopic(name, partitions, rf)])
                    except TopicAlreadyExistsError:
                        pass  # created by a concurrent caller
            else:
                ready = _ready(admin, wanted)
                if len(ready) == len(wanted):
                    return
                missing = [n for n in wanted if n not in ready]
            if time.monotonic() > deadline:
                raise InfraError(f"topics not ready after {timeout:.0f}s: {missing}")
            time.sleep(0.05)
    except KafkaError as e:
        raise InfraError(f"cannot create topics on {bootstrap}: {e}") from e
    finally:
        admin.close()
