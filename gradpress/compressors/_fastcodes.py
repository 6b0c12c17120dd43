"""Shared hot paths of the quantizers: bucketing, stochastic rounding as compiled kernels,
and variable-length fields (Elias gamma in split-stream layout).

Stochastic rounding. Every uniform quantizer of the zoo (QSGD, ECQ, TernGrad) maps a bucket
``x_j`` with per-bucket multiplier ``a_j`` and offset ``c`` to integer symbols

    u_i = a_j x_i + c,  sym_i = floor(u_i) + [r_i < frac(u_i)],  r_i ~ U[0, 1),
    decoded as  (sym_i - c) / a_j,

so ``E[decoded] = x`` (rounding to the two neighbouring grid points with probabilities given by
the distance). On CPU it is one kernel pass (:func:`scaled_quantize`) with a counter-based
``r_i``; elsewhere whole-tensor torch ops. Other compressors' torch loops still walk the
tensor in cache-sized chunks (:data:`CHUNK`): on CPU a fresh 64 MB temporary costs as much
in page faults as ``x.clone()`` itself.

Split-stream Elias codes. An Elias gamma word of ``n`` (``L = floor(log2 n)``) is ``L``
zeros, a one, then the ``L`` low bits of ``n``: ``2L + 1`` bits. We write the unary parts of
all words first, then all the low-bit parts. Every word keeps its length, so a stream costs
exactly the textbook ``sum(2L_i + 1)`` bits, but decoding is vectorized: the unary lengths are
the gaps between ones, and the low parts sit at offsets given by a cumulative sum.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import prange

from gradpress import _jit
from gradpress._jit import kernel, serial
from gradpress.errors import PayloadError

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


#: Longest field the window reader handles (a value's bits plus its offset fit 64 bits).
MAX_FIELD = 57


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
    chunk = chunk_len()
    if b <= chunk:
        per = chunk // b
        for j in range(0, nfull, per):
            yield j * b, j, min(per, nfull - j), b
        if tail:
            yield nfull * b, nfull, 1, tail
        return
    for j in range(nfull + (1 if tail else 0)):
        end = min(n, (j + 1) * b)
        for i in range(j * b, end, chunk):
            yield i, j, 1, min(chunk, end - i)


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


def bucket_scales(flat: torch.Tensor, bucket_size: int | None, norm: str) -> torch.Tensor:
    """Per-bucket ``l2`` or ``linf`` norm (float32, on ``flat``'s device); a compiled kernel
    on CPU when there are enough buckets to share out, torch's reductions otherwise."""
    n = flat.numel()
    b = min(bucket_size or n, n)
    nb = n_buckets(n, b)
    if flat.device.type != "cpu" or nb < 4 * _jit.threads() or norm not in ("l2", "linf"):
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
    ``ceil(2^24 frac)/2^24``: unbiased to within ``2^-24`` of a grid step. Other devices use
    ``gen`` (torch's generator for ``seed``), so their bytes differ from the CPU's.
    """
    n = flat.numel()
    b = min(bucket_size or n, n)
    scale = bucket_scales(flat, b, norm)
    check_scales(scale)
    a = torch.where(scale > 0, gain / scale, torch.zeros_like(scale))
    if flat.device.type == "cpu":
        out = np.empty(n, dtype=np.uint8)
        k0, k1 = stream_keys(seed)
        _quantize(flat.numpy(), b, a.numpy(), np.float32(c), np.float32(levels - 1),
               k0, k1, out)
        return scale, torch.from_numpy(out)
    return scale, quantize_torch(flat, b, a, c, levels, gen)


def quantize_torch(flat: torch.Tensor, b: int, a: torch.Tensor, c: float, levels: int,
                   gen: torch.Generator) -> torch.Tensor:
    """Whole-tensor torch version of the rounding step (any device; ``gen`` on it)."""
    u = _per_bucket(flat, b, a).add_(c)
    fl = torch.floor(u)
    r = torch.rand(u.shape, generator=gen, device=u.device)
    return (fl + (r < u - fl)).clamp_(0, levels - 1).to(torch.uint8)


def _per_bucket(v: torch.Tensor, b: int, m: torch.Tensor) -> torch.Tensor:
    """``v_i * m_{i // b}`` as a new float32 tensor (the last bucket may be short)."""
    n = v.numel()
    idx = torch.arange(n, device=v.device) // b
    return v.float() * m[idx]


def affine_dequantize(sym: torch.Tensor, bucket_size: int | None, inv_a: torch.Tensor,
                      c: float) -> torch.Tensor:
    """``(sym_i - c) * inv_a_j`` as float32 (a compiled kernel on CPU)."""
    n = sym.numel()
    b = min(bucket_size or n, n)
    if sym.device.type != "cpu":
        return _per_bucket(sym.float().sub_(c), b, inv_a.float())
    out = np.empty(n, dtype=np.float32)
    _dequantize(sym.numpy(), b, inv_a.float().numpy(), np.float32(c), out)
    return torch.from_numpy(out)


# -- variable-length fields -------------------------------------------------------------
_LOG2_LUT = np.array([0] + [i.bit_length() - 1 for i in range(1, 256)], dtype=np.int64)


def floor_log2(v: np.ndarray) -> np.ndarray:
    """``floor(log2 v)`` of positive integers below 2^53 (``int64``)."""
    v = np.asarray(v)
    if v.size and v.dtype.kind in "iu" and int(v.max()) < 256:
        return _LOG2_LUT[v]
    return (np.frexp(v.astype(np.float64))[1] - 1).astype(np.int64)


def pack_fields(values: np.ndarray | list[np.ndarray], widths: np.ndarray | list[np.ndarray]
                ) -> tuple[np.ndarray, int]:
    """Concatenate ``values[i]`` in ``widths[i] <= 57`` bits each (MSB first); ``values`` and
    ``widths`` may be lists of arrays (streams written one after another, not copied).
    Returns the packed bytes (last byte zero-padded) and the exact bit count."""
    vs = values if isinstance(values, list) else [values]
    ws = [np.asarray(w, dtype=np.int64).reshape(-1)
          for w in (widths if isinstance(widths, list) else [widths])]
    total = sum(int(w.sum()) for w in ws)
    step = 1 << 18
    chunks = ((np.asarray(v).reshape(-1)[i:i + step], w[i:i + step])
              for v, w in zip(vs, ws) for i in range(0, w.size, step))
    return pack_chunks(chunks, total), total


def pack_chunks(chunks, total: int) -> np.ndarray:
    """Packed bytes of the fields in ``chunks`` (an iterable of ``(values, widths)`` array
    pairs, each at most a few hundred thousand fields) totalling ``total`` bits.

    Each field is shifted into the 64-bit window at its byte offset; windows never overlap in
    bits, so the bytes are the sums of their windows' bytes (``np.bincount``), per byte lane.
    Chunks keep every temporary small (no page faults on CPU).
    """
    nbytes = (total + 7) // 8
    acc = np.zeros(nbytes + 8, dtype=np.float64)
    pos = 0
    for v, w in chunks:
        if not w.size:
            continue
        # int64 throughout: numpy's uint64-with-scalar ops are ~10x slower; bit 63 may be
        # set (negative), which the masked byte extraction below does not mind.
        v = v.astype(np.int64, copy=False)
        w = w.astype(np.int64, copy=False)
        if int(w.max()) > MAX_FIELD:
            raise ValueError(f"field wider than {MAX_FIELD} bits")
        off = np.cumsum(w)
        chunk_bits = int(off[-1])
        off += pos - w
        pos += chunk_bits
        if pos > total:
            raise ValueError("fields exceed the declared total")
        r = off & 7
        base = off >> 3
        b0 = int(base[0])
        base -= b0
        win = v << (64 - w - r)
        win[w == 0] = 0
        span = int(base[-1]) + 1
        lanes = (int((r + w).max()) + 7) // 8
        for k in range(lanes):
            byte = ((win >> (56 - 8 * k)) & 255).astype(np.float64)
            acc[b0 + k:b0 + k + span] += np.bincount(base, weights=byte, minlength=span)[:span]
    if pos != total:
        raise ValueError(f"fields hold {pos} bits, declared {total}")
    return acc[:nbytes].astype(np.uint8)


class FieldReader:
    """Reads fixed and split-Elias fields from packed bytes, starting at bit ``start``."""

    def __init__(self, data: bytes | np.ndarray, start: int = 0) -> None:
        raw = np.frombuffer(bytes(data), dtype=np.uint8) if isinstance(data, bytes) else data
        self.total = 8 * raw.size
        self._padded = np.concatenate([raw, np.zeros(8, dtype=np.uint8)])
        self._bits: np.ndarray | None = None
        self._rate = 8.0  # bits per unary code expected by the next scan
        self.pos = start

    def _need(self, nbits: int, what: str) -> None:
        if nbits < 0 or self.pos + nbits > self.total:
            raise PayloadError(f"payload truncated while reading {what}")

    def fields(self, widths: np.ndarray, what: str = "fields") -> np.ndarray:
        """Values (``uint64``) of consecutive fields of the given widths (each <= 57)."""
        w = np.asarray(widths, dtype=np.int64)
        if w.size and int(w.max()) > MAX_FIELD:
            raise PayloadError(f"{what}: field wider than {MAX_FIELD} bits")
        total = int(w.sum())
        self._need(total, what)
        off = self.pos + np.cumsum(w) - w
        windows = np.ndarray(shape=(self._padded.size - 7,), dtype=">u8",
                             buffer=self._padded, strides=(1,))
        win = windows[off >> 3].astype(np.uint64) << (off & 7).astype(np.uint64)
        live = w > 0
        out = np.where(live, win >> np.where(live, 64 - w, 1).astype(np.uint64), 0)
        self.pos += total
        return out.astype(np.uint64)

    def expect_end(self, what: str = "payload body") -> None:
        """Only zero padding (< 8 bits) may remain."""
        rest = self.total - self.pos
        if rest >= 8 or (rest and self.fixed(rest, 1).any()):
            raise PayloadError(f"{what} extended past its last field")

    def fixed(self, n: int, width: int, what: str = "fixed fields") -> np.ndarray:
        return self.fields(np.full(n, width, dtype=np.int64), what)

    def unary(self, n: int, what: str = "unary lengths") -> np.ndarray:
        """``n`` unary numbers (zeros then a one): their counts of zeros."""
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        if self._bits is None:
            self._bits = np.unpackbits(self._padded[:self.total // 8])
        # Scan only about as far as the n-th one: the window follows the bits per code seen
        # in the previous call (grown 4x whenever it falls short).
        window = int(self._rate * n) + 64
        while True:
            ones = np.flatnonzero(self._bits[self.pos:self.pos + window])
            if ones.size >= n or self.pos + window >= self.total:
                break
            window *= 4
        if ones.size < n:
            raise PayloadError(f"payload truncated while reading {what}")
        ends = ones[:n]
        self._rate = 1.1 * (int(ends[-1]) + 1) / n
        lengths = np.diff(ends, prepend=-1) - 1
        self.pos += int(ends[-1]) + 1
        return lengths

    def gamma(self, n: int, what: str = "gamma codes") -> np.ndarray:
        """``n`` split-stream Elias gamma codes (positive ``uint64``)."""
        L = self.unary(n, what)
        if n and int(L.max()) > MAX_FIELD:
            raise PayloadError(f"{what}: code longer than the format allows")
        low = self.fields(L, what)
        return ((1 << L) | low.astype(np.int64)).astype(np.uint64)


def gamma_fields(v: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(values, widths) chunks of the split gamma stream of positive integers ``v``."""
    v = np.asarray(v).astype(np.int64, copy=False)
    L = floor_log2(v)
    return [np.ones(v.size, dtype=np.int64), v & ((1 << L) - 1)], [L + 1, L]


def gamma_bits(v: np.ndarray, L: np.ndarray | None = None) -> int:
    """Total gamma bits of ``v`` (``L = floor_log2(v)`` if already known)."""
    L = floor_log2(v) if L is None else L
    return 2 * int(L.sum()) + L.size
