"""An in-memory snapshot of the device registry, refreshed periodically and on a miss."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg

from infra.devices import Device, registry_snapshot

log = logging.getLogger("arus.registry")


class DeviceRegistry(Mapping[str, Device]):
    def __init__(self, dsn: str | None, refresh_s: float = 10.0, miss_refresh_s: float = 0.25) -> None:
        self.dsn = dsn
        self.refresh_s = refresh_s
        self.miss_refresh_s = miss_refresh_s
        self.devices: dict[str, Device] = {}
        self._conn: psycopg.Connection[Any] | None = None
        self._loaded_at = 0.0
        self._loaded_wall_ms = 0  # wall clock when the snapshot's query started

    def refresh(self) -> None:
        if self.dsn is None:
            return
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
            started = time.time_ns() // 1_000_000
            self.devices = registry_snapshot(self._conn)
            self._loaded_wall_ms = started
        except psycopg.Error as exc:  # keep serving the last snapshot; try again later
            log.warning("device registry refresh failed: %s", exc)
            self._conn = None
        self._loaded_at = time.monotonic()

    def maybe_refresh(self) -> None:
        if time.monotonic() - self._loaded_at >= self.refresh_s:
            self.refresh()

    def refresh_if_older_than(self, received_ms: int) -> bool:
        """For an unknown device: refresh when the snapshot predates the gateway's receipt of the message
        (the device may have been registered just before it sent), whatever the miss rate limit; True if
        that refresh happened. A snapshot newer than the receipt already answered: the device is unknown."""
        if self.dsn is None or self._loaded_wall_ms >= received_ms:
            return False
        self.refresh()
        return True

    def __getitem__(self, device_id: str) -> Device:
        device = self.devices.get(device_id)
        if device is None and time.monotonic() - self._loaded_at >= self.miss_refresh_s:
            self.refresh()  # a device registered a moment ago must not be refused
            device = self.devices.get(device_id)
        if device is None:
            raise KeyError(device_id)
        return device

    def get(self, device_id: str, default: Any = None) -> Any:
        try:
            return self[device_id]
        except KeyError:
            return default

    def __iter__(self) -> Iterator[str]:
        return iter(self.devices)

    def __len__(self) -> int:
        return len(self.devices)
