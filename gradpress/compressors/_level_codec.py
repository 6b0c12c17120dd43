"""Bit format of Sparse Dithering's signed integer levels (see ``sparse_dithering``'s docstring
for the paper and the bit-cost formula), written and read in cache-sized chunks.

    scale   32    float32 (big-endian bits)
    mode     1    0 = trits + unary, 1 = range-coded levels (``entropy=True`` only)
    trits   46 floor(d/29) + ceil(log2 3^(d mod 29))   (29 trits in 46 bits, trit j worth 3^j)
    unary   sum_i |k_i|    (|k_i| - 1 ones and a zero per non-zero, in coordinate order)
    pad     0..7

The encoder consumes the levels chunk by chunk (:class:`LevelSink`, chunks of a multiple of 29
coordinates, so trit groups never straddle chunks); the decoder rebuilds ``scale * k`` in
float32 chunk by chunk (products in float64, rounded once), never holding a ``d``-sized int64.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gradpress.codec import (
    BitReader,
    BitWriter,
    read_categorical,
    write_categorical,
)
from gradpress.codec.entropy import MAX_ALPHABET
from gradpress.compressors._fastcodes import FieldReader, pack_fields
from gradpress.errors import PayloadError

_TRITS = 29
_TRIT_BITS = 46  # 3^29 < 2^46
UNARY, ENTROPY = 0, 1
#: Coordinates per chunk: a multiple of 29 under ATen's parallel grain size (32768).
CHUNK = _TRITS * 1100
_POW3 = torch.tensor([3.0**j for j in range(_TRITS)], dtype=torch.float64)
_LUT3 = np.array([[(i // 3**j) % 3 for j in range(5)] for i in range(243)], dtype=np.uint8)


def trit_bits(d: int) -> int:
    """Bits of ``d`` trits packed 29 per 46 bits (the tail in ``ceil(log2 3^r)`` bits)."""
    full, r = divmod(int(d), _TRITS)
    return full * _TRIT_BITS + ((3**r - 1).bit_length() if r else 0)


def _trit_groups(t: torch.Tensor) -> np.ndarray:
    """``sum_j t_j 3^j`` of each group of 29 trits (the last group may be short), int64: one
    float64 row sum (every partial sum is an integer below 3^29 < 2^53, hence exact)."""
    full, r = divmod(t.numel(), _TRITS)
    v = np.zeros(full + (1 if r else 0), dtype=np.int64)
    if full:
        g = t[:full * _TRITS].view(full, _TRITS).double().mul_(_POW3)
        v[:full] = g.sum(dim=1).long().numpy()
    if r:
        v[full] = int((t[full * _TRITS:].double() * _POW3[:r]).sum())
    return v


class LevelSink:
    """Collects signed levels chunk by chunk and writes the body (:meth:`body`)."""

    def __init__(self, keep_levels: bool = False) -> None:
        self.groups: list[np.ndarray] = []
        self.unary: list[np.ndarray] = []
        self.levels: list[np.ndarray] | None = [] if keep_levels else None
        self.kmax = 0
        self.d = 0

    def add(self, k: torch.Tensor, neg: torch.Tensor | None = None) -> None:
        """Append levels (int64, CPU; every chunk but the last a multiple of 29): signed
        ``k``, or magnitudes ``k >= 0`` with ``neg`` marking the negative coordinates."""
        if neg is None:
            neg = k < 0
            k = k.abs()
        live = k > 0
        trits = live.to(torch.uint8).add_(live & neg)  # 0, 1 (positive), 2 (negative)
        self.groups.append(_trit_groups(trits))
        kn = k.numpy()
        mags = kn[kn != 0]  # numpy: torch's boolean-mask select is 50x slower here
        if mags.size:
            ends = np.cumsum(mags)
            bits = np.ones(int(ends[-1]), dtype=np.uint8)
            bits[ends - 1] = 0
            self.unary.append(bits)
            self.kmax = max(self.kmax, int(mags.max()))
        if self.levels is not None:
            self.levels.append(np.where(neg.numpy(), -kn, kn))
        self.d += k.numel()

    def body(self, scale: float, entropy: bool) -> bytes:
        groups = np.concatenate(self.groups) if self.groups else np.zeros(0, dtype=np.int64)
        widths = np.full(groups.size, _TRIT_BITS, dtype=np.int64)
        if self.d % _TRITS:
            widths[-1] = (3 ** (self.d % _TRITS) - 1).bit_length()
        unary = np.packbits(np.concatenate(self.unary)) if self.unary else np.zeros(0, np.uint8)
        ubits = sum(u.size for u in self.unary)
        whole, rest = divmod(ubits, 8)
        tail = (unary[whole:whole + 1] >> (8 - rest)).astype(np.int64)[:1 if rest else 0]
        scale_bits = np.frombuffer(np.float32(scale).tobytes(), dtype="<u4").astype(np.int64)
        values = [scale_bits, np.array([UNARY]), groups, unary[:whole].astype(np.int64), tail]
        fw = [np.array([32]), np.array([1]), widths, np.full(whole, 8), np.full(tail.size, rest)]
        body = pack_fields(values, fw)[0].tobytes()
        if entropy and 2 * self.kmax + 1 <= MAX_ALPHABET:
            we = BitWriter()
            we.write_float32(np.float32(scale))
            we.write_uint(ENTROPY, 1)
            we.write_gamma(np.array([self.kmax + 1]))
            write_categorical(we, np.concatenate(self.levels) + self.kmax, 2 * self.kmax + 1)
            alt = we.getvalue()
            if len(alt) < len(body):
                body = alt
        return body


def encode_levels(scale: float, k: torch.Tensor, entropy: bool) -> bytes:
    """Body for signed integer levels ``k`` (any device) and a float32 ``scale``."""
    kk = k.to("cpu", torch.int64).reshape(-1)
    sink = LevelSink(keep_levels=entropy)
    for s in range(0, kk.numel(), CHUNK):
        sink.add(kk[s:s + CHUNK])
    return sink.body(scale, entropy)


def _read_trits(fr: FieldReader, d: int) -> np.ndarray:
    full, r = divmod(d, _TRITS)
    parts = []
    for n, width, count in ((full, _TRIT_BITS, _TRITS), (1 if r else 0,
                                                          (3**r - 1).bit_length(), r)):
        if not n:
            continue
        v = fr.fixed(n, width, "sparse dithering trits").astype(np.int64)
        if int(v.max()) >= 3**count:
            raise PayloadError("sparse dithering payload has an invalid trit group")
        digits = np.empty((n, 5 * (-(-count // 5))), dtype=np.uint8)
        for j in range(0, count, 5):  # five trits per table look-up
            digits[:, j:j + 5] = _LUT3[v % 243]
            v //= 243
        parts.append(digits[:, :count].reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)


def _check_range(name: str, scale: float, kmax: int) -> None:
    if scale * float(kmax) > 3.0e38:
        raise PayloadError(f"{name} payload decodes beyond float32's range")


def _decode(body: bytes, numel: int, name: str, emit) -> float:
    """Read a body; call ``emit(scale, start, trits, nonzero mask, magnitudes)`` per chunk of
    coordinates (``trits`` 0/1/2 as ``uint8``); return the scale."""
    fr = FieldReader(body)
    scale = float(fr.fixed(1, 32, f"{name} scale").astype(np.uint32).view("<f4")[0])
    if not math.isfinite(scale) or scale < 0:
        raise PayloadError(f"{name} payload has a bad scale {scale}")
    if int(fr.fixed(1, 1, f"{name} mode")[0]) == ENTROPY:
        rd = BitReader(body)
        rd.pos = fr.pos
        (kp1,) = rd.read_gamma(1)
        kmax = int(kp1) - 1
        if 2 * kmax + 1 > MAX_ALPHABET:
            raise PayloadError(f"{name} payload declares levels up to {kmax}")
        k = read_categorical(rd, numel) - kmax
        rd.expect_end()
        if k.size:
            _check_range(name, scale, int(np.abs(k).max()))
        t = np.where(k > 0, 1, np.where(k < 0, 2, 0)).astype(np.uint8)
        emit(scale, 0, t, k != 0, np.abs(k[k != 0]))
        return scale
    trits = _read_trits(fr, numel)
    start = fr.pos // 8
    view = np.unpackbits(np.frombuffer(body, dtype=np.uint8)[start:])[fr.pos - 8 * start:]
    p, rate, kmax = 0, 2.0, 0
    for s in range(0, numel, CHUNK):
        t = trits[s:s + CHUNK]
        nz = t != 0
        n = int(np.count_nonzero(nz))
        if not n:
            continue
        window = int(rate * n) + 64
        while True:  # scan about as far as the n-th zero (4x wider when short)
            zeros = np.flatnonzero(view[p:p + window] == 0)
            if zeros.size >= n or p + window >= view.size:
                break
            window *= 4
        if zeros.size < n:
            raise PayloadError("sparse dithering payload truncated in the unary levels")
        ends = zeros[:n]
        mags = np.diff(ends, prepend=-1)
        kmax = max(kmax, int(mags.max()))
        _check_range(name, scale, kmax)
        emit(scale, s, t, nz, mags)
        p += int(ends[-1]) + 1
        rate = 1.1 * (int(ends[-1]) + 1) / n
    fr.pos += p
    fr.expect_end(f"{name} payload body")
    return scale


def decode_values(body: bytes, numel: int, name: str) -> torch.Tensor:
    """``scale * k`` (float32, CPU) of a body written by :func:`encode_levels`: products in
    float64, rounded once."""
    out = np.zeros(numel, dtype=np.float32)

    def emit(scale: float, s: int, t: np.ndarray, nz: np.ndarray, mags: np.ndarray) -> None:
        vals = (mags * scale).astype(np.float32)
        np.negative(vals, out=vals, where=t[nz] == 2)
        out[s:s + t.size][nz] = vals

    _decode(body, numel, name, emit)
    return torch.from_numpy(out)


def decode_levels(body: bytes, numel: int, name: str) -> tuple[float, np.ndarray]:
    """``(scale, signed levels)`` of a body written by :func:`encode_levels`."""
    k = np.zeros(numel, dtype=np.int64)

    def emit(scale: float, s: int, t: np.ndarray, nz: np.ndarray, mags: np.ndarray) -> None:
        k[s:s + t.size][nz] = np.where(t[nz] == 2, -mags, mags)

    return _decode(body, numel, name, emit), k
