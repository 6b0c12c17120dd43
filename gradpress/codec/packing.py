"""Fixed-width packing of small unsigned fields (1..8 bits) as compiled kernels.

``n`` values of ``w`` bits are laid out MSB first, back to back, the last byte zero-padded:
exactly ``np.packbits`` of their bits. Eight values make ``w`` whole bytes, so the kernels
work on independent groups of eight (one ``uint64`` word each), in parallel.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from gradpress.kernels.jit import kernel


@kernel
def _pack(v, width, out):  # pragma: no cover - compiled
    n = v.size
    nbytes = out.size
    for g in prange((n + 7) // 8):
        acc = np.uint64(0)
        for t in range(8):
            i = 8 * g + t
            x = np.uint64(v[i]) if i < n else np.uint64(0)
            acc = (acc << np.uint64(width)) | x
        for k in range(width):
            b = g * width + k
            if b < nbytes:
                out[b] = np.uint8((acc >> np.uint64(8 * (width - 1 - k))) & np.uint64(255))


@kernel
def _unpack(d, n, width, out):  # pragma: no cover - compiled
    nbytes = d.size
    mask = np.uint64((1 << width) - 1)
    for g in prange((n + 7) // 8):
        acc = np.uint64(0)
        for k in range(width):
            b = g * width + k
            x = np.uint64(d[b]) if b < nbytes else np.uint64(0)
            acc = (acc << np.uint64(8)) | x
        for t in range(8):
            i = 8 * g + t
            if i < n:
                out[i] = np.uint8((acc >> np.uint64(width * (7 - t))) & mask)


def pack_uint8(values: np.ndarray, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """Packed bytes (MSB first, last byte zero-padded) of ``values`` in ``width`` bits each,
    ``width`` in 1..8, equal to ``np.packbits(uint_to_bits(values, width))``. Values must
    already fit in ``width`` bits (unchecked: higher bits would spill into the neighbours).
    ``out``: a contiguous ``uint8`` array of exactly ``ceil(n*width/8)`` bytes to write
    into (returned), instead of a new one."""
    if not 1 <= width <= 8:
        raise ValueError(f"pack_uint8 takes widths 1..8, got {width}")
    v = np.ascontiguousarray(values).reshape(-1).astype(np.uint8, copy=False)
    nbytes = (v.size * width + 7) // 8
    if out is None:
        out = np.empty(nbytes, dtype=np.uint8)
    elif out.shape != (nbytes,) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous uint8 array of {nbytes} bytes")
    if width == 8:
        out[:] = v
    elif width == 1:
        out[:] = np.packbits(v)
    else:
        _pack(v, width, out)
    return out


def unpack_uint8(data: np.ndarray, n: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_uint8`: ``n`` values (``uint8``) from packed bytes ``data``
    (at least ``ceil(n*width/8)`` of them; extra bytes are ignored)."""
    if not 1 <= width <= 8:
        raise ValueError(f"unpack_uint8 takes widths 1..8, got {width}")
    nbytes = (n * width + 7) // 8
    d = np.asarray(data, dtype=np.uint8).reshape(-1)
    if d.size < nbytes:
        raise ValueError(f"{d.size} bytes cannot hold {n} fields of {width} bits")
    d = np.ascontiguousarray(d[:nbytes])
    if width == 8:
        return d.copy()
    if width == 1:
        return np.unpackbits(d, count=n)
    out = np.empty(n, dtype=np.uint8)
    _unpack(d, n, width, out)
    return out
