"""What a processor emits: (topic suffix, key, value) records the runtime produces in batches."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field

import orjson

from schemas import topics
from schemas.results import Rejected


@dataclass(slots=True)
class Outputs:
    records: list[tuple[str, bytes | None, bytes]] = field(default_factory=list)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)

    def emit(self, topic: str, key: str | None, value: dict | list) -> None:
        self.records.append((topic, key.encode() if key is not None else None, orjson.dumps(value)))

    def dead_letter(
        self, rejected: Rejected, raw: bytes, source_topic: str, partition: int, offset: int,
        now_ms: int, device_id: str | None = None, source: str = "worker",
    ) -> None:
        metric = rejected.position.get("metric", "")
        dl_id = hashlib.sha1(  # noqa: S324 - an id, not a security measure
            f"{source_topic}:{partition}:{offset}:{metric}:{rejected.reason}".encode()
        ).hexdigest()
        try:
            text, encoding = raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(raw).decode(), "base64"
        self.emit(topics.DLQ, dl_id, {
            "id": dl_id, "reason": rejected.reason, "message": rejected.message, "source": source,
            "device_id": device_id, "topic": source_topic, "partition": partition, "offset": offset,
            "raw": text, "raw_encoding": encoding, "time": now_ms,
        })
        self.rejected_by_reason[rejected.reason] = self.rejected_by_reason.get(rejected.reason, 0) + 1

    def clear(self) -> None:
        self.records.clear()
        self.rejected_by_reason.clear()
