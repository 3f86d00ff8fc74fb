"""Kafka topic names of the public contract (the prefix is configurable, default `jember.`)."""

from __future__ import annotations

from schemas import topics as _t

from .settings import Settings


def all_topics(settings: Settings) -> dict[str, str]:
    return {name: settings.topic(name) for name in _t.PUBLIC + _t.INTERNAL}
