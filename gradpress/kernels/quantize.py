"""Shared hot paths of the quantizers: bucketing, stochastic rounding as compiled kernels,


Stochastic rounding. Every uniform quantizer of the zoo (QSGD, ECQ, TernGrad) maps a bucket
``x_j`` with per-bucket multiplier ``a_j`` and offset ``c`` to integer symbols

    u_i = a_j x_i + c,  sym_i = floor(u_i) + [r_i < frac(u_i)],  r_i ~ U[0, 1),
    decoded as  (sym_i - c) / a_j,

so ``E[decoded] = x`` (rounding to the two neighbouring grid points with probabilities given by
the distance). On CPU it is one kernel pass (:func:`scaled_quantize`) with a counter-based
``r_i``; elsewhere the same hash and rounding in torch ops (:mod:`gradpress.kernels.torch_codes`,
the same bytes; ``GRADPRESS_TORCH_CODES=1`` forces that path on CPU). Other compressors' torch
loops still walk the
tensor in cache-sized chunks (:data:`CHUNK`): on CPU a fresh 64 MB temporary costs as much
in page faults as ``x.clone()`` itself.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import prange

from gradpress.errors import PayloadError
from gradpress.kernels import jit as _jit
from gradpress.kernels import torch_codes as tc
from gradpress.kernels.jit import kernel, serial

#: Elements per chunk on CPU: 125 KiB of float32 stays in cache across the pipeline's ops,
#: and staying under ATen's parallel grain size (32768) keeps every op on the calling
#: thread. Forking intra-op threads per chunk stalls by 10-30x when the cores are busy
#: (as they are while a backward pass runs); measured on this project's 2-core machine.
CHUNK = 32000
#: Elements per chunk on CPU when torch runs single-threaded (``torch.get_num_threads() ==
#: 1``, as in the DDP training worker): no op can fork, so larger chunks only cut the
#: per-op dispatch cost (measured at 4.1M elements: quantize 14%, dequantize 19% faster).
#: Same bytes either way (the random stream is consumed in element order).
SERIAL_CHUNK = 131072


def chunk_len() -> int:
    """Elements per CPU chunk: :data:`CHUNK`, or :data:`SERIAL_CHUNK` when single-threaded."""
    return SERIAL_CHUNK if torch.get_num_threads() == 1 else CHUNK



# -- buckets ----------------------------------------------------------------------------
def n_buckets(d: int, bucket_size: int | None) -> int:
    """Number of buckets of ``d`` elements (the last one may be short)."""
    b = d if not bucket_size else bucket_size
    return -(-d // b) if d else 0


def bucket_reduce(flat: torch.Tensor, bucket_size: int | None, norm: str) -> torch.Tensor:
    """Per-bucket ``l2`` norm, ``linf`` norm or ``mean_abs`` of ``flat`` (float32, on device)."""
    d = flat.numel()
    b = min(bucket_size or d, d)
    nfull, tail = divmod(d, b)
    parts = []
    for block in (flat[:nfull * b].view(nfull, b), flat[nfull * b:].view(1, tail) if tail
                  else None):
        if block is None or not block.numel():
            continue
        if norm == "mean_abs":
            parts.append(torch.linalg.vector_norm(block, ord=1, dim=1) / block.shape[1])
        else:
            parts.append(_row_norm(block, norm))
    return torch.cat(parts).float() if len(parts) > 1 else parts[0].float()


def check_scales(scales: torch.Tensor, what: str = "bucket norm") -> None:
    """Encoder side: every scale is finite and at most 2^126 (so decoding cannot overflow)."""
    if not bool(torch.isfinite(scales).all()) or float(scales.max()) > 2.0**126:
        raise ValueError(f"{what} overflows float32; scale the gradient down before "
                         "compressing")


def read_scales(raw: np.ndarray, what: str = "bucket norm") -> np.ndarray:
    """Decoder side: reject non-finite, negative or huge scales from the wire."""
    s = raw.astype(np.float32)
    if s.size and not (np.isfinite(s).all() and s.min() >= 0 and s.max() <= 2.0**126):
        raise PayloadError(f"payload holds an invalid {what}")
    return s


def _row_blocks(n: int, b: int, device: torch.device):
    """Yield ``(start, bucket, rows, width)`` blocks covering ``n`` elements in buckets of
    ``b``: ``rows`` whole buckets from bucket index ``bucket`` (``rows*width`` elements from
    ``start``), or, for buckets longer than a chunk, one piece of a single bucket."""
    nfull, tail = divmod(n, b)
    if device.type != "cpu":
        if nfull:
            yield 0, 0, nfull, b
        if tail:
            yield nfull * b, nfull, 1, tail
        return
    yield from tc.chunk_blocks(n, b, chunk_len())


def _row_norm(x: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "l2":
        return torch.linalg.vector_norm(x, dim=1)
    if norm == "linf":  # amax and amin apart: 2x faster than aminmax(dim=1) on CPU
        return torch.maximum(torch.amax(x, 1), -torch.amin(x, 1))
    raise ValueError(f"unknown norm {norm!r}")


def stream_keys(seed: int) -> tuple[np.uint32, np.uint32]:
    """Two 32-bit keys of the counter-based dither stream, from a 64-bit ``seed`` through
    splitmix64 (so nearby seeds give unrelated keys)."""
    z = (int(seed) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return np.uint32(z & 0xFFFFFFFF), np.uint32(z >> 32)


@serial
def _mix32(h):  # pragma: no cover - compiled
    # "lowbias32" (C. Wellons' hash prospector): a bijective 32-bit mixer. numba widens
    # uint32 products to 64 bits, so each product is cut back to 32.
    h = np.uint32(h ^ (h >> np.uint32(16)))
    h = np.uint32(h * np.uint32(0x7FEB352D))
    h = np.uint32(h ^ (h >> np.uint32(15)))
    h = np.uint32(h * np.uint32(0x846CA68B))
    return np.uint32(h ^ (h >> np.uint32(16)))


@serial
def _dither(i, k0, k1):  # pragma: no cover - compiled
    # 24 uniform bits for element i, scaled into [0, 1): exact in float32.
    h = _mix32(np.uint32(_mix32(np.uint32(np.uint32(i) ^ k0)) ^ k1))
    return np.float32(h >> np.uint32(8)) * np.float32(2.0**-24)


#: Elements per parallel work item of the CPU kernels.
TILE = 1 << 14


@kernel
def _bucket_norms(x, b, l2, out):  # pragma: no cover - compiled
    n = x.size
    for j in prange(out.size):
        if l2:
            acc = 0.0
            for i in range(j * b, min(n, (j + 1) * b)):
                acc += np.float64(x[i]) * np.float64(x[i])
            out[j] = np.float32(np.sqrt(acc))
        else:
            m = np.float32(0.0)
            for i in range(j * b, min(n, (j + 1) * b)):
                m = max(m, abs(x[i]))
            out[j] = m


@kernel
def _quantize(x, b, a, c, top, k0, k1, out):  # pragma: no cover - compiled
    n = x.size
    for t in prange((n + TILE - 1) // TILE):
        s = t * TILE
        e = min(n, s + TILE)
        while s < e:  # one bucket's part of the tile at a time
            j = s // b
            stop = min(e, (j + 1) * b)
            aj = a[j]
            for i in range(s, stop):
                u = x[i] * aj + c
                f = np.float32(np.int32(u))  # u >= 0 up to rounding: truncation is floor
                if _dither(i, k0, k1) < u - f:
                    f += np.float32(1.0)
                out[i] = np.uint8(min(max(f, np.float32(0.0)), top))
            s = stop


@kernel
def _dequantize(sym, b, inv, c, out):  # pragma: no cover - compiled
    n = sym.size
    for t in prange((n + TILE - 1) // TILE):
        s = t * TILE
        e = min(n, s + TILE)
        while s < e:
            j = s // b
            stop = min(e, (j + 1) * b)
            m = inv[j]
            for i in range(s, stop):
                out[i] = (np.float32(sym[i]) - c) * m
            s = stop


@kernel
def _pack_signs(x, out):  # pragma: no cover - compiled
    n = x.size
    for g in prange(out.size):
        acc = np.uint8(0)
        for t in range(8):
            i = 8 * g + t
            neg = i < n and x[i] < 0
            acc = np.uint8((acc << np.uint8(1)) | np.uint8(neg))
        out[g] = acc


@kernel
def _unpack_signs(bits, b, m, out):  # pragma: no cover - compiled
    n = out.size
    for t in prange((n + TILE - 1) // TILE):
        s = t * TILE
        e = min(n, s + TILE)
        while s < e:
            j = s // b
            stop = min(e, (j + 1) * b)
            mj = m[j]
            for i in range(s, stop):
                neg = (bits[i >> 3] >> np.uint8(7 - (i & 7))) & np.uint8(1)
                out[i] = -mj if neg else mj
            s = stop


def sign_bits(flat: torch.Tensor) -> np.ndarray:
    """``np.packbits(flat < 0)`` of a CPU float32 tensor in one compiled pass (no bool
    temporary): bit ``i`` is 1 where ``x_i < 0``, MSB first."""
    out = np.empty((flat.numel() + 7) // 8, dtype=np.uint8)
    _pack_signs(flat.numpy(), out)
    return out


def signs_times(bits: np.ndarray, n: int, bucket_size: int | None, m: np.ndarray
                ) -> torch.Tensor:
    """``-m_j`` where bit ``i`` of ``bits`` (MSB first) is 1, ``+m_j`` where it is 0, for
    ``n`` elements in buckets of ``bucket_size`` (float32, CPU, one compiled pass)."""
    b = min(bucket_size or n, n)
    out = np.empty(n, dtype=np.float32)
    _unpack_signs(np.ascontiguousarray(bits, dtype=np.uint8), b, m.astype(np.float32), out)
    return torch.from_numpy(out)


def uses_norm_kernel(nb: int, norm: str) -> bool:
    """Whether :func:`bucket_scales` takes its compiled kernel for ``nb`` buckets on CPU
    (else torch's reductions, whose summation order only torch reproduces)."""
    return nb >= 4 * _jit.threads() and norm in ("l2", "linf")


def bucket_scales(flat: torch.Tensor, bucket_size: int | None, norm: str) -> torch.Tensor:
    """Per-bucket ``l2`` or ``linf`` norm (float32, on ``flat``'s device); a compiled kernel
    on CPU when there are enough buckets to share out, torch's reductions otherwise."""
    n = flat.numel()
    b = min(bucket_size or n, n)
    nb = n_buckets(n, b)
    if flat.device.type != "cpu" or not uses_norm_kernel(nb, norm):
        return bucket_reduce(flat, b, norm)
    out = np.empty(nb, dtype=np.float32)
    _bucket_norms(flat.numpy(), b, norm == "l2", out)
    return torch.from_numpy(out)


def scaled_quantize(flat: torch.Tensor, bucket_size: int | None, norm: str, gain: float,
                    c: float, levels: int, seed: int, gen: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bucket scale ``M_j`` (``norm`` of the bucket) and ``uint8`` symbols of
    ``floor(a_j x_i + c + r_i)`` with ``a_j = gain / M_j`` (0 for an all-zero bucket),
    clipped to ``[0, levels-1]``.

    On CPU the dither ``r_i`` is counter-based: 24 bits of ``mix(mix(i ^ k0) ^ k1)`` with
    keys from ``seed`` (:func:`stream_keys`), so the kernel runs in parallel and the bytes do
    not depend on the thread count. Rounding up then happens with probability
    ``ceil(2^24 frac)/2^24``: unbiased to within ``2^-24`` of a grid step. Other devices (and
    CPU tensors under ``GRADPRESS_TORCH_CODES=1``) compute the same hash and rounding in
    torch ops on the tensor's device (:func:`gradpress.kernels.torch_codes.quantize`): the
    same symbols. ``gen`` is unused (kept for callers).
    """
    n = flat.numel()
    b = min(bucket_size or n, n)
    scale = bucket_scales(flat, b, norm)
    check_scales(scale)
    a = torch.where(scale > 0, gain / scale, torch.zeros_like(scale))
    k0, k1 = stream_keys(seed)
    if tc.use_torch_codes(flat.device):
        return scale, tc.quantize(flat, b, a, c, levels, int(k0), int(k1))
    out = np.empty(n, dtype=np.uint8)
    _quantize(flat.numpy(), b, a.numpy(), np.float32(c), np.float32(levels - 1), k0, k1, out)
    return scale, torch.from_numpy(out)


def affine_dequantize(sym: torch.Tensor, bucket_size: int | None, inv_a: torch.Tensor,
                      c: float) -> torch.Tensor:
    """``(sym_i - c) * inv_a_j`` as float32 (a compiled kernel on CPU, torch ops on other
    devices or under ``GRADPRESS_TORCH_CODES=1``: the same floats)."""
    n = sym.numel()
    b = min(bucket_size or n, n)
    if tc.use_torch_codes(sym.device):
        return tc.dequantize(sym, b, inv_a, c)
    out = np.empty(n, dtype=np.float32)
    _dequantize(sym.numpy(), b, inv_a.float().numpy(), np.float32(c), out)
    return torch.from_numpy(out)
