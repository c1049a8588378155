"""Declaring a settings field once: its type and default in the core's dataclass, its bounds in the field's
metadata (``bounded``), so the settings file's schema is generated from the dataclass and repeats nothing."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def bounded(default: Any, **bounds: float) -> Any:
    """A dataclass field with ``default`` and the bounds a settings file must respect (pydantic's ``ge``, ``gt``,
    ``le``, ``lt``)."""
    return field(default=default, metadata={"bounds": bounds})
