"""One model array's update as a gradpress payload, without Flower: the client encodes it
(through optional error feedback), the server checks the header, then decodes.

Client, for the array ``k`` with global value ``w_k`` and locally trained value ``w'_k``:

1. ``delta = w'_k - w_k`` (in the array's own dtype);
2. ``v = fb.to_send(k, delta)`` (``delta`` itself without feedback);
3. ``payload = C.encode(v, seed)`` with a CRC32 in the header;
4. ``fb.commit(k, delta, C(v))``: the residual ``delta - C(v)`` (EF) or ECQ's ``h`` carries
   what the compressor dropped into the next round.

Server, before any decoding (:func:`check_header`): the header must parse, name the
compressor the server decodes with, declare exactly the shape and dtype of ``w_k`` and the
number of bytes received, and carry a CRC32 when one is required. Only then is the body
decoded, so the largest thing a client can make the server allocate is one copy of ``w_k``
(a header declaring 2^30 elements is refused from its first 20 bytes).

Bits: ``len(payload)`` per array, ``12 + 4*ndim + 4`` of them header (plus 8 with a
seed); the body is the compressor's (its ``expected_bits``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from gradpress.compressors import Compressor
from gradpress.errors import PayloadError
from gradpress.payload import DTYPE_CODES, Payload, PayloadHeader, read_header

#: Feedbacks a client may keep on its update: their server side is the identity, so
#: :class:`~gradpress.flower.CompressedFedAvg` needs no state of theirs. (EF21 keeps a
#: server copy of the mean and is not offered.)
FEEDBACKS = ("none", "ef", "ecq")

_SEED_MASK = 0xFFFFFFFFFFFF


def make_feedback(kind: str, **kwargs: Any) -> Any:
    """A client feedback object from :mod:`gradpress.feedback` (``none``, ``ef``, ``ecq``)."""
    if kind not in FEEDBACKS:
        raise ValueError(f"feedback must be one of {', '.join(FEEDBACKS)}, got {kind!r}")
    from gradpress import feedback as gp_feedback

    return gp_feedback.get(kind, **kwargs)


def round_seed(seed: int, server_round: int, client: int, index: int = 0) -> int:
    """Encoder seed for array ``index`` of ``client`` in ``server_round`` (shared randomness
    travels in the header, so the server needs no copy of it)."""
    base = seed * 1_000_003 + server_round * 10_007 + client
    return (base + index * 0x9E3779B1) & _SEED_MASK


def torch_dtype(dtype: np.dtype | torch.dtype) -> torch.dtype | None:
    """The torch dtype of a numpy (or torch) float dtype gradpress serializes, else None."""
    if isinstance(dtype, torch.dtype):
        return dtype if dtype in DTYPE_CODES else None
    if np.dtype(dtype).kind != "f":
        return None
    td = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    return td if td in DTYPE_CODES else None


def encode_update(delta: torch.Tensor, compressor: Compressor, feedback: Any | None = None,
                  *, key: str = "model", seed: int = 0, crc: bool = True) -> bytes:
    """The bytes a client sends for ``delta``: steps 2-4 above (``feedback`` under ``key``)."""
    if feedback is None:
        return dataclasses.replace(compressor.encode(delta, seed=seed), crc=crc).to_bytes()
    v = feedback.to_send(key, delta)
    payload = dataclasses.replace(compressor.encode(v, seed=seed), crc=crc)
    raw = payload.to_bytes()
    feedback.commit(key, delta, compressor.decode(payload, device=delta.device))
    return raw


def check_header(raw: bytes | memoryview, compressor: Compressor,
                 shape: int | tuple[int, ...], dtype: torch.dtype | None = None, *,
                 require_crc: bool = True) -> PayloadHeader:
    """The header of ``raw`` if it fits the array it updates, else :class:`PayloadError`.

    Reads the header only; nothing of the declared size is allocated.
    """
    want = (shape,) if isinstance(shape, int) else tuple(shape)
    head = read_header(raw)
    if head.compressor_id != compressor.compressor_id:
        raise PayloadError(f"payload made by compressor id {head.compressor_id}, the server "
                           f"decodes {compressor.name!r} (id {compressor.compressor_id})")
    if head.shape != want:
        raise PayloadError(f"payload shape {head.shape} ({head.numel} elements), the model "
                           f"array has {want}")
    if dtype is not None and head.dtype != dtype:
        raise PayloadError(f"payload dtype {head.dtype}, the model array is {dtype}")
    if head.size != len(raw):
        kind = "truncated" if len(raw) < head.size else "extended"
        raise PayloadError(f"payload {kind}: header declares {head.size} bytes, got {len(raw)}")
    if require_crc and not head.crc:
        raise PayloadError("payload has no CRC32 but this server requires one "
                           "(clients must encode with crc=True)")
    return head


def decode_update(raw: bytes | memoryview, compressor: Compressor,
                  shape: int | tuple[int, ...], *, client: str,
                  dtype: torch.dtype | None = None, require_crc: bool = True) -> torch.Tensor:
    """:func:`check_header`, then decode; any defect raises PayloadError naming ``client``.

    ``shape`` is the model array's shape (an int: a flat vector of that length); ``dtype``,
    when given, its dtype. Returns a tensor of that shape, finite.
    """
    try:
        check_header(raw, compressor, shape, dtype, require_crc=require_crc)
        update = compressor.decode(Payload.from_bytes(raw))
        if not bool(torch.isfinite(update).all()):
            raise PayloadError("decoded update holds NaN/Inf")
        return update
    except PayloadError as exc:
        raise PayloadError(f"corrupt update from {client}: {exc}") from exc
