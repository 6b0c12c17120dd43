"""Name -> compressor class registry: ``gradpress.get("qsgd", s=4)``."""

from __future__ import annotations

import ast
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


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """A compressor spec as the CLIs take it: ``"qsgd:s=4;entropy=True"`` ->
    ``("qsgd", {"s": 4, "entropy": True})``; values are Python literals, else strings."""
    name, _, rest = spec.strip().partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(";"))):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"bad compressor option {item!r} in {spec!r}; use key=value")
        try:
            kwargs[key.strip()] = ast.literal_eval(val.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = val.strip()
    return name.strip(), kwargs
