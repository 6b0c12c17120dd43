"""Compressor specs as the command lines write them: ``name:key=value;key=value``.

Kept out of ``compressors/`` (the wire path), since it parses user text with
``ast.literal_eval``.
"""

from __future__ import annotations

import ast
from typing import Any


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
