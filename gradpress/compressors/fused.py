"""Allocation-free encode of the uniform quantizers (QSGD, ECQ-SGD, TernGrad without
clipping) and scaled sign, optionally fused with an error-feedback residual.

:func:`fused_encode` writes the serialized payload (header + body, the bytes
``encode(v).to_bytes()`` gives) into a caller's reusable ``uint8`` buffer and returns a
:class:`~gradpress.payload.PayloadView` over it, where

    v = g + alpha h          (ECQ-SGD, Wu et al. 2018, Sec. 4; EF: alpha = 1; none: v = g)
    h <- (beta h + g) - C(v)  (in place; ``g - C(v)`` without a previous ``h``)

in two passes over the bucket (:mod:`gradpress.kernels.fused`): per-bucket scales, then
rounding + packing + decoded value + residual. The bits are the compressor's own
(``8 + 32 #buckets + d ceil(log2 levels)`` for the dense uniform code, ``32 #buckets + d``
for sign), byte for byte, and the residual is the unfused ``commit``'s, bit for bit.
Entropy-coded and sparse modes run the same kernel to ``uint8`` symbols in a reused buffer
and hand them to the compressor's body selection (``UniformQuantizer._body``), which
allocates its own code bytes.

Everything that can fail (non-finite values, an overflowing scale, a buffer too small) is
checked before anything is written: the caller's residual stays untouched. CPU and
float32 only; other devices and dtypes get ``None`` (use the generic path): the dispatch
point for a torch version is :func:`plan_for`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gradpress.compressors._uniform import DENSE, UniformQuantizer
from gradpress.compressors.base import Compressor
from gradpress.compressors.sign import ScaledSign
from gradpress.compressors.terngrad import TernGrad
from gradpress.errors import NonFiniteGradientError
from gradpress.kernels import fused as fk
from gradpress.kernels import quantize as fc
from gradpress.payload import PayloadView, finish_crc_into, header_size, write_header_into


@dataclass(frozen=True)
class Plan:
    """How :func:`fused_encode` runs a compressor: ``kind`` ``"uniform"`` or ``"sign"``;
    ``dense``: the body is always the dense fixed-width code (no other code to try)."""

    kind: str
    dense: bool


class Workspace:
    """Scratch arrays reused across steps (one per bucket): allocated on first use and
    again only when a size grows."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str, n: int, dtype: type) -> np.ndarray:
        a = self._arrays.get(name)
        if a is None or a.size < n or a.dtype != dtype:
            a = np.empty(max(n, 1), dtype=dtype)
            self._arrays[name] = a
        return a[:n]

    def data_ptrs(self) -> dict[str, int]:
        """Address of every scratch array (tests check they stay put)."""
        return {k: a.ctypes.data for k, a in self._arrays.items()}


def plan_for(comp: Compressor, g: torch.Tensor) -> Plan | None:
    """The fused plan for ``comp`` on ``g``, or ``None`` where only the generic path runs
    (non-CPU device, non-float32 or non-contiguous ``g``, an empty tensor, TernGrad with
    clipping, any other compressor)."""
    if (g.device.type != "cpu" or g.dtype != torch.float32 or not g.is_contiguous()
            or g.numel() == 0):
        return None
    if type(comp) is ScaledSign:
        return Plan("sign", True)
    if isinstance(comp, TernGrad):
        return Plan("uniform", not comp.entropy) if comp.clip is None else None
    if type(comp).__name__ in ("QSGD", "ECQ") and isinstance(comp, UniformQuantizer):
        return Plan("uniform", not comp.entropy and not comp.sparse)
    return None


def _u8(out: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = out.numpy() if isinstance(out, torch.Tensor) else out
    if arr.dtype != np.uint8 or arr.ndim != 1 or not arr.flags.c_contiguous:
        raise ValueError("the payload buffer must be a contiguous 1-D uint8 array or tensor")
    return arr


def fused_encode(comp: Compressor, g: torch.Tensor, out: torch.Tensor | np.ndarray, *,
                 seed: int = 0, crc: bool = False, ws: Workspace | None = None,
                 h: torch.Tensor | None = None, alpha: float = 0.0,
                 beta: float | None = None, hout: torch.Tensor | None = None,
                 what: str = "gradient") -> PayloadView | None:
    """``comp.encode(v, seed=seed)`` with ``v = alpha h + g`` serialized into ``out`` from
    byte 0, and (``beta`` given) the residual ``(beta h + g) - C(v)`` into ``hout`` (may
    be ``h`` itself); ``None`` when :func:`plan_for` has no plan (nothing is touched).

    Raises :class:`NonFiniteGradientError` for NaN/Inf in ``v`` and ``ValueError`` for an
    overflowing scale or a buffer smaller than the compressor's bound, before writing."""
    run = prepare_fused(comp, g, out, seed=seed, crc=crc, ws=ws, h=h, alpha=alpha,
                        beta=beta, hout=hout, what=what)
    return None if run is None else run()


def prepare_fused(comp: Compressor, g: torch.Tensor, out: torch.Tensor | np.ndarray, *,
                  seed: int = 0, crc: bool = False, ws: Workspace | None = None,
                  h: torch.Tensor | None = None, alpha: float = 0.0,
                  beta: float | None = None, hout: torch.Tensor | None = None,
                  what: str = "gradient", tag: str = ""
                  ) -> Callable[[], PayloadView] | None:
    """Pass 1 and every check of :func:`fused_encode`; returns pass 2 (which cannot fail)
    as a function, so a caller encoding several pieces (the two-phase shards) can check
    them all before writing any residual. ``tag`` names this piece's scratch in ``ws``."""
    plan = plan_for(comp, g)
    if plan is None or (h is not None and plan_for(comp, h) is None):
        return None
    buf = _u8(out)
    ws = ws or Workspace()
    gn = g.detach().reshape(-1).numpy()
    n = gn.size
    hn = gn if h is None else h.detach().reshape(-1).numpy()
    if hn.size != n:
        raise ValueError(f"residual has {hn.size} elements, gradient has {n}")
    use_h = h is not None and alpha != 0.0
    a32 = np.float32(alpha)
    bsz = min(comp.bucket_size or n, n)
    nb = fc.n_buckets(n, bsz)
    scale = ws.array("scale" + tag, nb, np.float32)
    norm = "mean_abs" if plan.kind == "sign" else comp.norm
    if fc.uses_norm_kernel(nb, norm):  # pass 1 without a temporary
        bad = fk._fb_norms(gn, hn, a32, use_h, bsz, norm == "l2", scale)
    else:  # the scale is a torch reduction: the same function on the same floats
        v = ws.array("v" + tag, n, np.float32)
        bad = fk._fb_write_v(gn, hn, a32, use_h, v)
        if not bad:
            scale[:] = fc.bucket_reduce(torch.from_numpy(v), bsz, norm).numpy()
    if bad:
        raise NonFiniteGradientError(f"{what} has {bad} non-finite (NaN/Inf) entries of "
                                     f"{n} (after feedback); fix the loss or clip, or use "
                                     "on_nonfinite='skip' in the DDP hook")
    fc.check_scales(torch.from_numpy(scale), "bucket mean" if plan.kind == "sign"
                    else "bucket norm")
    shape = tuple(g.shape)
    hsize = header_size(len(shape), crc=crc)
    cap = comp.max_payload_bytes(n) - header_size(1) + hsize
    if buf.size < cap:
        raise ValueError(f"payload buffer holds {buf.size} bytes, {comp.name} needs up to "
                         f"{cap} for {n} elements")
    h_mode = fk.H_NONE if beta is None else (
        fk.H_FRESH if h is None or beta == 0.0 else fk.H_DECAY)
    hw = gn if hout is None else hout.detach().reshape(-1).numpy()
    if h_mode != fk.H_NONE and (hw.size != n or hw.dtype != np.float32):
        raise ValueError("hout must be a float32 tensor shaped like the gradient")
    b32 = np.float32(beta or 0.0)

    def run() -> PayloadView:
        body_len = _pass2(comp, plan, ws, gn, hn, a32, use_h, b32, h_mode, bsz, nb, scale,
                          seed, buf[hsize:], hw)
        view = memoryview(buf)
        write_header_into(view, comp.compressor_id, torch.float32, shape, body_len, crc=crc,
                          digest=comp.config_digest(shape))
        if crc:
            finish_crc_into(view, hsize, body_len)
        return PayloadView(buf[:hsize + body_len], hsize + body_len)
    return run


def _pass2(comp, plan: Plan, ws: Workspace, gn, hn, a32, use_h, b32, h_mode, bsz, nb, scale,
           seed, body, hw) -> int:
    """Symbols, packing, decoded values and residual; returns the body's length."""
    n = gn.size
    if plan.kind == "sign":
        body[:4 * nb] = scale.astype(">f4").view(np.uint8)
        fk._fb_sign(gn, hn, a32, use_h, b32, h_mode, bsz, scale, body, 4 * nb, hw)
        body_len = 4 * nb + (n + 7) // 8
    else:
        a = ws.array("a", nb, np.float32)
        a[:] = 0.0  # torch's `gain / scale` is `reciprocal(scale) * gain`; 0 where M = 0
        np.reciprocal(scale, out=a, where=scale > 0)
        a *= np.float32(comp.gain)
        inv = (scale.astype(np.float64) / comp.gain).astype(np.float32)
        k0, k1 = fc.stream_keys(seed)
        c, top = np.float32(comp.offset), np.float32(comp.levels - 1)
        if plan.dense:
            body[0] = DENSE
            body[1:1 + 4 * nb] = scale.astype(">f4").view(np.uint8)
            fk._fb_quantize(gn, hn, a32, use_h, b32, h_mode, bsz, a, inv, c, top, k0, k1,
                            comp.width, True, body, 1 + 4 * nb, hw)
            body_len = 1 + 4 * nb + math.ceil(n * comp.width / 8)
        else:
            sym = ws.array("sym", n, np.uint8)
            fk._fb_quantize(gn, hn, a32, use_h, b32, h_mode, bsz, a, inv, c, top, k0, k1,
                            comp.width, False, sym, 0, hw)
            raw = comp._body(torch.from_numpy(scale.copy()), torch.from_numpy(sym))
            body_len = len(raw)
            body[:body_len] = np.frombuffer(raw, dtype=np.uint8)
    return body_len
