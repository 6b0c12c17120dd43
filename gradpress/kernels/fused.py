"""CPU kernels of the allocation-free paths: feedback, scale, rounding, packing and the
residual update of a uniform quantizer (or scaled sign) in two passes over a bucket, and
the matching unpack-into-a-caller's-tensor decoder.

Per bucket ``j`` of ``b`` coordinates (the last may be short), with ``v_i = alpha h_i +
g_i`` (``v = g`` without state) computed in float32 exactly as the feedback does
(``float32(h_i * alpha) + g_i``):

* pass 1 (:func:`_fb_norms`): ``M_j = ||v_j||_2`` (float64 sum of squares, as
  :func:`gradpress.kernels.quantize._bucket_norms`) or ``||v_j||_inf``, no temporary;
  or (:func:`_fb_write_v`) ``v`` into a reused scratch buffer where the compressor's
  scale is a torch reduction whose order a kernel cannot reproduce;
* pass 2 (:func:`_fb_quantize`, :func:`_fb_sign`): the symbol ``floor(a_j v_i + c + r_i)``
  with the counter-based dither ``r_i`` of :mod:`gradpress.kernels.quantize`, packed MSB
  first in ``width`` bits (or stored as a ``uint8`` symbol for an entropy coder), its decoded
  value ``sent_i = (sym_i - c) inv_j`` and the residual ``h_i <- (beta h_i + g_i) - sent_i``
  (``g_i - sent_i`` without state), written in place.

The float operations are the unfused path's, one by one, so bytes and residuals match it
bit for bit. Tiles of :data:`TILE` elements start on byte boundaries (``TILE * width`` is a
multiple of 8), so the parallel build packs without sharing a byte between threads. These
are CPU kernels; a torch version for other devices slots in at
:func:`gradpress.feedback.fused.fused_plan`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import prange

from gradpress.kernels.jit import Kernel, kernel
from gradpress.kernels.quantize import TILE, _dither

#: Residual update modes of pass 2: none (no feedback state), ``g - sent``,
#: ``(beta h + g) - sent``.
H_NONE, H_FRESH, H_DECAY = 0, 1, 2
_FMAX = np.float32(3.4028234663852886e38)


@kernel
def _fb_norms(g, h, alpha, use_h, b, l2, out):  # pragma: no cover - compiled
    """Per-bucket norm of ``v`` into ``out``; returns the count of non-finite ``v_i``."""
    n = g.size
    bad = 0
    for j in prange(out.size):
        nb = 0
        acc = 0.0
        m = np.float32(0.0)
        for i in range(j * b, min(n, (j + 1) * b)):
            v = np.float32(h[i] * alpha) + g[i] if use_h else g[i]
            if not abs(v) <= _FMAX:
                nb += 1
            if l2:
                acc += np.float64(v) * np.float64(v)
            else:
                m = max(m, abs(v))
        out[j] = np.float32(np.sqrt(acc)) if l2 else m
        bad += nb
    return bad


@kernel
def _fb_write_v(g, h, alpha, use_h, v):  # pragma: no cover - compiled
    """``v_i`` into the scratch ``v``; returns the count of non-finite ``v_i``."""
    n = g.size
    bad = 0
    for t in prange((n + TILE - 1) // TILE):
        nb = 0
        for i in range(t * TILE, min(n, (t + 1) * TILE)):
            x = np.float32(h[i] * alpha) + g[i] if use_h else g[i]
            v[i] = x
            if not abs(x) <= _FMAX:
                nb += 1
        bad += nb
    return bad


def _specialized(make: Callable[..., Callable]) -> Callable[..., Kernel]:
    """``get(*flags)``: the kernel ``make(*flags)`` compiled once per value of the flags.
    Inside, the flags are closure constants, so numba folds every branch on them out of
    the inner loop, which then vectorizes (a runtime flag tested per element kept pass 2 of
    ECQ at 3x the unfused quantizer's time)."""
    made: dict[tuple, Kernel] = {}

    def get(*flags: Any) -> Kernel:
        k = made.get(flags)
        if k is None:
            k = made[flags] = kernel(make(*flags))
        return k
    return get


@_specialized
def _fb_quantize_for(use_h: bool, h_mode: int, pack: bool) -> Callable:
    def _fb_quantize(g, h, alpha, beta, b, a, inv, c, top, k0, k1, width, out, off, hout
                     ):  # pragma: no cover - compiled
        n = g.size
        for t in prange((n + TILE - 1) // TILE):
            s = t * TILE
            e = min(n, s + TILE)
            pos = off + (s * width) // 8
            acc = np.uint64(0)
            nacc = 0
            while s < e:  # one bucket's part of the tile at a time
                j = s // b
                stop = min(e, (j + 1) * b)
                aj = a[j]
                mj = inv[j]
                for i in range(s, stop):
                    gi = g[i]
                    hi = h[i]
                    v = np.float32(hi * alpha) + gi if use_h else gi
                    u = v * aj + c
                    f = np.float32(np.int32(u))  # u >= 0 up to rounding: truncation is floor
                    if _dither(i, k0, k1) < u - f:
                        f += np.float32(1.0)
                    sym = np.uint8(min(max(f, np.float32(0.0)), top))
                    if pack:
                        acc = (acc << np.uint64(width)) | np.uint64(sym)
                        nacc += width
                        if nacc >= 8:
                            nacc -= 8
                            out[pos] = np.uint8((acc >> np.uint64(nacc)) & np.uint64(255))
                            pos += 1
                    else:
                        out[off + i] = sym
                    if h_mode != 0:
                        sent = (np.float32(sym) - c) * mj
                        if h_mode == 2:
                            hout[i] = (np.float32(hi * beta) + gi) - sent
                        else:
                            hout[i] = gi - sent
                s = stop
            if pack and nacc > 0:
                out[pos] = np.uint8((acc << np.uint64(8 - nacc)) & np.uint64(255))
    return _fb_quantize


def _fb_quantize(g, h, alpha, use_h, beta, h_mode, b, a, inv, c, top, k0, k1, width,
                 pack, out, off, hout) -> None:
    """Pass 2 of a uniform quantizer: symbols packed into ``out[off:]`` (``pack``) or one
    per byte, and the residual into ``hout`` (may be ``h``: in place)."""
    _fb_quantize_for(bool(use_h), int(h_mode), bool(pack))(
        g, h, alpha, beta, b, a, inv, c, top, k0, k1, width, out, off, hout)


@_specialized
def _fb_sign_for(use_h: bool, h_mode: int) -> Callable:
    def _fb_sign(g, h, alpha, beta, b, m, out, off, hout):  # pragma: no cover - compiled
        n = g.size
        for t in prange((n + TILE - 1) // TILE):
            s = t * TILE
            e = min(n, s + TILE)
            pos = off + s // 8
            acc = 0
            nacc = 0
            while s < e:
                j = s // b
                stop = min(e, (j + 1) * b)
                mj = m[j]
                for i in range(s, stop):
                    gi = g[i]
                    v = np.float32(h[i] * alpha) + gi if use_h else gi
                    neg = v < np.float32(0.0)
                    acc = (acc << 1) | (1 if neg else 0)
                    nacc += 1
                    if nacc == 8:
                        out[pos] = np.uint8(acc & 255)
                        pos += 1
                        acc = 0
                        nacc = 0
                    if h_mode != 0:
                        sent = -mj if neg else mj
                        if h_mode == 2:
                            hout[i] = (np.float32(h[i] * beta) + gi) - sent
                        else:
                            hout[i] = gi - sent
                s = stop
            if nacc > 0:
                out[pos] = np.uint8((acc << (8 - nacc)) & 255)
    return _fb_sign


def _fb_sign(g, h, alpha, use_h, beta, h_mode, b, m, out, off, hout) -> None:
    """Pass 2 of scaled sign: bit ``v_i < 0`` packed MSB first into ``out[off:]``, decoded
    ``-m_j`` or ``+m_j``, the residual into ``hout``."""
    _fb_sign_for(bool(use_h), int(h_mode))(g, h, alpha, beta, b, m, out, off, hout)


@kernel
def _max_symbol(data, off, n, width):  # pragma: no cover - compiled
    """Largest of ``n`` MSB-first ``width``-bit fields from byte ``off``, or 256 when the
    padding bits after the last field are not zero."""
    total = n * width
    nbytes = (total + 7) // 8
    best = 0
    mask = (1 << width) - 1
    for t in prange((n + TILE - 1) // TILE):
        s = t * TILE
        e = min(n, s + TILE)
        mx = 0
        pos = off + (s * width) // 8
        acc = 0
        nacc = 0
        for _ in range(s, e):
            if nacc < width:
                acc = ((acc & 0xFF) << 8) | np.int64(data[pos])
                pos += 1
                nacc += 8
            nacc -= width
            mx = max(mx, (acc >> nacc) & mask)
        best = max(best, mx)
    rest = 8 * nbytes - total
    if rest and np.int64(data[off + nbytes - 1]) & ((1 << rest) - 1):
        best = 256
    return best


@_specialized
def _unpack_dequantize_for(add: bool) -> Callable:
    def _unpack_dequantize(data, off, n, width, b, inv, c, out):  # pragma: no cover
        mask = (1 << width) - 1
        for t in prange((n + TILE - 1) // TILE):
            s = t * TILE
            e = min(n, s + TILE)
            pos = off + (s * width) // 8
            acc = 0
            nacc = 0
            while s < e:
                j = s // b
                stop = min(e, (j + 1) * b)
                mj = inv[j]
                for i in range(s, stop):
                    if nacc < width:
                        acc = ((acc & 0xFF) << 8) | np.int64(data[pos])
                        pos += 1
                        nacc += 8
                    nacc -= width
                    val = (np.float32((acc >> nacc) & mask) - c) * mj
                    if add:
                        out[i] += val
                    else:
                        out[i] = val
                s = stop
    return _unpack_dequantize


def _unpack_dequantize(data, off, n, width, b, inv, c, add, out) -> None:
    """``out_i (+)= (sym_i - c) inv_j`` for the ``n`` packed fields from byte ``off``."""
    _unpack_dequantize_for(bool(add))(data, off, n, width, b, inv, c, out)
