"""Name -> compressor class registry: ``gradpress.get("qsgd", s=4)``."""

from __future__ import annotations

from typing import Any, TypeVar

from gradpress.compressors.base import Compressor

_BY_NAME: dict[str, type[Compressor]] = {}
_BY_ID: dict[int, type[Compressor]] = {}

C = TypeVar("C", bound=type[Compressor])


def register(cls: C) -> C:
    """Class decorator: make ``cls`` available under ``cls.name`` and ``cls.compressor_id``."""
    if cls.name in _BY_NAME and _BY_NAME[cls.name] is not cls:
        raise ValueError(f"compressor name {cls.name!r} registered twice")
    if cls.compressor_id in _BY_ID and _BY_ID[cls.compressor_id] is not cls:
        raise ValueError(f"compressor id {cls.compressor_id} registered twice")
    _BY_NAME[cls.name] = cls
    _BY_ID[cls.compressor_id] = cls
    return cls


def get(name: str, **kwargs: Any) -> Compressor:
    """Build the registered compressor ``name`` with ``kwargs``."""
    try:
        cls = _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown compressor {name!r}; available: {', '.join(available())}"
                         ) from None
    return cls(**kwargs)


def available() -> list[str]:
    """Registered compressor names, sorted."""
    return sorted(_BY_NAME)


def class_for_id(compressor_id: int) -> type[Compressor]:
    return _BY_ID[compressor_id]

