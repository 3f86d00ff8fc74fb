"""Validation results: validation returns one of these, it never raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Ok(Generic[T]):
    value: T


@dataclass(frozen=True, slots=True)
class Rejected:
    """A refused input: a machine-readable reason code, a human message and the raw input."""

    reason: str
    message: str
    raw: Any = None
    position: dict[str, Any] = field(default_factory=dict)  # topic/partition/offset or line number

    def __bool__(self) -> bool:  # so `if result:` reads as "accepted"
        return False


Result = Ok[T] | Rejected
