"""Reading a client's train reply on the server as untrusted input.

A reply is accepted only when every one of these holds; the first that fails rejects it
with a reason naming the client (:class:`RejectedReply`):

1. it is no error message (the client's app did not fail);
2. it holds exactly one ``MetricRecord``, whose ``num-examples`` (the strategy's
   ``weighted_by_key``) is an ``int`` >= 1 (a float, NaN, 0, -5 or a missing key fail);
3. it holds the ``ArrayRecord`` :data:`UPDATE_KEY` (what :func:`compression_mod` writes),
   with exactly the keys of the global model's arrays;
4. each float array's entry is a 1-D ``uint8`` numpy array (its ``.npy`` header read
   without loading it) whose bytes are a gradpress payload whose header fits that array
   (:func:`~gradpress.flower.update.check_header`: compressor, shape, dtype, size, CRC);
   each non-float array (integer buffers such as BatchNorm's counters) travels as itself,
   with the global array's dtype and shape.

Nothing the client declares (an ``.npy`` shape, a payload shape) is allocated before it is
compared with the server's own model; a reply's arrays are read as views of the bytes that
arrived. The cap on ``num-examples`` and the decoding itself are the strategy's.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import numpy as np
import numpy.lib.format as npy_format

from gradpress.compressors import Compressor
from gradpress.errors import PayloadError
from gradpress.flower.compat import ArrayRecord, MetricRecord
from gradpress.flower.update import check_header, torch_dtype

#: Key of the ``ArrayRecord`` of payloads in a client's reply.
UPDATE_KEY = "gradpress-update"


class RejectedReply(Exception):
    """A reply the server does not aggregate: ``node`` names the client, ``str(exc)`` the
    client and the reason; ``payload`` is true where the defect is in a payload's bytes."""

    def __init__(self, node: str, reason: str, *, payload: bool = False) -> None:
        super().__init__(reason)
        self.node, self.payload = node, payload


@dataclasses.dataclass
class TrainReply:
    """A reply that passed checks 1-4: its weight, payload bytes and pass-through arrays."""

    node: str
    node_id: int
    examples: int
    payloads: dict[str, memoryview]
    raw: dict[str, np.ndarray]
    content: Any
    framing_bytes: int

    @property
    def uplink_bytes(self) -> int:
        """Payload bytes plus the raw bytes of pass-through arrays (no Flower framing)."""
        return sum(len(p) for p in self.payloads.values()) + sum(
            a.nbytes for a in self.raw.values())


def node_name(msg: Any) -> str:
    """``client node <id>``, plus the partition the client claims when it sent one."""
    name = f"client node {msg.metadata.src_node_id}"
    if msg.has_error():
        return name
    try:
        records = list(msg.content.metric_records.values())
        pid = records[0]["partition-id"] if len(records) == 1 else None
    except (KeyError, TypeError, AttributeError):
        pid = None
    return name + (f" (partition {pid})" if type(pid) is int else "")


def examples_of(msg: Any, weight_key: str, node: str) -> int:
    """Checks 1-2: the reply's example count, an int >= 1."""
    if msg.has_error():
        raise RejectedReply(node, f"{node} failed: {msg.error.reason}")
    records = list(msg.content.metric_records.values())
    if len(records) != 1:
        raise RejectedReply(node, f"{node}: reply holds {len(records)} MetricRecords, expected one")
    if weight_key not in records[0]:
        raise RejectedReply(node, f"{node}: reply has no {weight_key!r} in its MetricRecord")
    n = records[0][weight_key]
    if type(n) is not int or n < 1:
        raise RejectedReply(node, f"{node}: {weight_key!r} must be a positive integer, got {n!r}")
    return n


def read_train_reply(msg: Any, global_arrays: dict[str, np.ndarray], compressor: Compressor,
                     *, weight_key: str = "num-examples", require_crc: bool = True
                     ) -> TrainReply:
    """Checks 1-4 on one train reply; :class:`RejectedReply` names what failed."""
    node = node_name(msg)
    examples = examples_of(msg, weight_key, node)
    record = msg.content.get(UPDATE_KEY)
    if not isinstance(record, ArrayRecord):
        kind = "nothing" if record is None else type(record).__name__
        raise RejectedReply(node, f"{node}: reply has {kind} under {UPDATE_KEY!r}, expected an "
                            "ArrayRecord of payloads (is compression_mod in the ClientApp's "
                            "mods?)")
    if set(record.keys()) != set(global_arrays):
        missing = sorted(set(global_arrays) - set(record.keys()))
        extra = sorted(set(record.keys()) - set(global_arrays))
        raise RejectedReply(node, f"{node}: update arrays differ from the model's (missing "
                            f"{missing[:5]}, unexpected {extra[:5]})")
    payloads: dict[str, memoryview] = {}
    raw: dict[str, np.ndarray] = {}
    framing = 0
    for key, g in global_arrays.items():
        array = record[key]
        framing += len(getattr(array, "data", b""))
        dtype = torch_dtype(g.dtype)
        try:
            if dtype is None:
                raw[key] = npy_view(array, g.dtype, g.shape)
                continue
            view = npy_view(array, np.dtype(np.uint8), None)
            check_header(view.data, compressor, tuple(g.shape), dtype,
                         require_crc=require_crc)
            payloads[key] = view.data
        except PayloadError as exc:
            raise RejectedReply(node, f"corrupt update from {node}: array {key!r}: {exc}",
                                payload=True) from exc
    return TrainReply(node, msg.metadata.src_node_id, examples, payloads, raw, msg.content,
                      framing)


def npy_view(array: Any, dtype: np.dtype, shape: tuple[int, ...] | None) -> np.ndarray:
    """A read-only view of a Flower ``Array``'s ``.npy`` bytes, after checking its declared
    dtype and shape (``shape=None``: any 1-D) against the bytes there are."""
    if getattr(array, "stype", None) != "numpy.ndarray" or not isinstance(
            getattr(array, "data", None), bytes):
        raise PayloadError(f"not a numpy-serialized Flower Array: {type(array).__name__}")
    buf = io.BytesIO(array.data)
    try:
        version = npy_format.read_magic(buf)
        reader = {(1, 0): npy_format.read_array_header_1_0,
                  (2, 0): npy_format.read_array_header_2_0}.get(version)
        if reader is None:
            raise ValueError(f".npy version {version}")
        got_shape, fortran, got_dtype = reader(buf)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise PayloadError(f"malformed .npy array: {exc}") from exc
    if got_dtype != dtype or str(array.dtype) != str(dtype):
        raise PayloadError(f"array dtype {got_dtype}, expected {dtype}")
    if shape is None:
        if len(got_shape) != 1:
            raise PayloadError(f"array shape {got_shape}, expected 1-D bytes")
    elif tuple(got_shape) != tuple(shape) or tuple(array.shape) != tuple(got_shape):
        raise PayloadError(f"array shape {tuple(got_shape)}, expected {tuple(shape)}")
    count = math.prod(got_shape)
    offset = buf.tell()
    if len(array.data) - offset != count * dtype.itemsize:
        raise PayloadError(f"array declares {count} elements, holds "
                           f"{(len(array.data) - offset) // max(dtype.itemsize, 1)}")
    if count == 0:
        return np.zeros(got_shape, dtype=dtype)
    flat = np.frombuffer(array.data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(got_shape, order="F" if fortran else "C")


def average_metrics(contents: list[Any], weight_key: str) -> Any:
    """Weighted mean of the scalar, finite metrics every reply shares (weights: the checked
    ``weight_key``). Lists and keys some replies lack are left out, so no client can break
    the aggregation by sending odd metrics."""
    records = [next(iter(c.metric_records.values())) for c in contents]
    if not records:
        return MetricRecord()
    weights = [float(r[weight_key]) for r in records]
    total = sum(weights)
    keys = set(records[0].keys())
    for r in records[1:]:
        keys &= set(r.keys())
    out = {}
    for key in sorted(keys - {weight_key}):
        values = [r[key] for r in records]
        if all(type(v) in (int, float) and math.isfinite(v) for v in values):
            out[key] = sum(w * v for w, v in zip(weights, values)) / total
    return MetricRecord(out)
