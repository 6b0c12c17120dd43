"""Bit format of Sparse Dithering's signed integer levels (see ``sparse_dithering``'s docstring
for the paper and the bit-cost formula), written and read by compiled kernels
(``sd_writer``) block by block.

    scale   32    float32 (big-endian bits)
    mode     1    0 = trits + unary, 1 = range-coded levels (``entropy=True`` only)
    trits   46 floor(d/29) + ceil(log2 3^(d mod 29))   (29 trits in 46 bits, trit j worth 3^j)
    unary   sum_i |k_i|    (|k_i| - 1 ones and a zero per non-zero, in coordinate order)
    pad     0..7

Writing: the per-block level sums give each block its unary offset, so blocks write their
bits in parallel (:func:`body_layout`, :func:`finish_body`). Reading: a block's trits tell
how many non-zeros come before it, and a table of zero bits per 4 KiB of the unary section
finds where its codes start (the ``z``-th zero ends the ``z``-th code), so blocks decode in
parallel too. Every length is checked before a kernel reads: a short or corrupt body raises
:class:`PayloadError`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gradpress.codec import BitReader, BitWriter, read_categorical, write_categorical
from gradpress.codec.entropy import MAX_ALPHABET
from gradpress.errors import PayloadError
from gradpress.kernels import sd_reader as R
from gradpress.kernels import sd_writer as K
from gradpress.kernels.fields import FieldReader

UNARY, ENTROPY = 0, 1
#: Least coordinates per block of the kernels: a multiple of 29 (blocks grow with ``d``,
#: ``sd_writer.block_len``).
CHUNK = K.TRITS * 1100


def trit_bits(d: int) -> int:
    """Bits of ``d`` trits packed 29 per 46 bits (the tail in ``ceil(log2 3^r)`` bits)."""
    full, r = divmod(int(d), K.TRITS)
    return full * K.TRIT_BITS + ((3**r - 1).bit_length() if r else 0)


def blocks(d: int) -> tuple[int, int]:
    """``(block length, number of blocks)`` of the codec's kernels for ``d`` coordinates."""
    b = K.block_len(d, CHUNK)
    return b, -(-d // b)


class BodyLayout:
    """Output buffer and side tables of a unary-mode body of ``d`` coordinates whose blocks
    hold ``ksum[b]`` unary bits each (block ``b``'s codes start at bit ``ubase[b]``)."""

    def __init__(self, d: int, ksum: np.ndarray) -> None:
        self.ksum = np.asarray(ksum, dtype=np.int64)
        u0 = K.HEAD + trit_bits(d)
        self.ubase = u0 + np.cumsum(self.ksum) - self.ksum
        self.total = u0 + int(self.ksum.sum())
        self.out = np.zeros((self.total + 7) // 8, dtype=np.uint8)
        n = self.ksum.size
        self.ev = np.zeros((n, 2), dtype=np.uint8)  # last partly filled byte of each range
        self.ei = np.full((n, 2), -1, dtype=np.int64)
        self.ends = np.zeros(n, dtype=np.int64)

    def finish(self, scale: float) -> bytes:
        """OR in the shared bytes, write the scale; the body bytes."""
        if not np.array_equal(self.ends, self.ubase + self.ksum):
            raise RuntimeError("sparse dithering writer overran its block")  # a bug, never data
        live = self.ei >= 0
        np.bitwise_or.at(self.out, self.ei[live], self.ev[live])
        self.out[:4] = np.frombuffer(np.array([scale], dtype=">f4").tobytes(), dtype=np.uint8)
        return self.out.tobytes()


def write_levels(scale: float, k: np.ndarray, neg: np.ndarray, entropy: bool = False,
                 sums: tuple[np.ndarray, np.ndarray] | None = None) -> bytes:
    """Body of magnitudes ``k >= 0`` (any integer dtype) with signs from ``neg`` (coordinate
    ``i`` is negative where ``neg[i] < 0``) and a float32 ``scale``; with ``entropy`` the
    range-coded levels instead where shorter. ``sums``: the per-block sums and maxima of
    ``k`` over :func:`blocks` if the caller has them."""
    d = k.size
    block, n = blocks(d)
    if sums is None:
        sums = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        K._level_sums(k, block, *sums)
    ksum, kmax = sums
    lay = BodyLayout(d, ksum)
    K._emit_levels(k, neg, block, lay.ubase, K.GROUP_WIDTH, lay.out, lay.ev, lay.ei,
           lay.ends)
    body = lay.finish(scale)
    top = int(kmax.max()) if n else 0
    if entropy and 2 * top + 1 <= MAX_ALPHABET:
        kk = k.astype(np.int64)
        we = BitWriter()
        we.write_float32(np.float32(scale))
        we.write_uint(ENTROPY, 1)
        we.write_gamma(np.array([top + 1]))
        write_categorical(we, np.where(neg < 0, -kk, kk) + top, 2 * top + 1)
        alt = we.getvalue()
        if len(alt) < len(body):
            body = alt
    return body


def encode_levels(scale: float, k: torch.Tensor, entropy: bool) -> bytes:
    """Body for signed integer levels ``k`` (any device) and a float32 ``scale``."""
    kk = np.ascontiguousarray(k.to("cpu", torch.int64).reshape(-1).numpy())
    return write_levels(scale, np.abs(kk), kk, entropy)


def _check_range(name: str, scale: float, kmax: int) -> None:
    if scale * float(kmax) > 3.0e38:
        raise PayloadError(f"{name} payload decodes beyond float32's range")


def _read_unary_body(body: bytes, d: int, name: str, scale: float, want_levels: bool
                     ) -> np.ndarray:
    """Levels (``int64``) or values (``float32``) of a unary-mode body of ``d`` coords."""
    u0 = K.HEAD + trit_bits(d)
    nbytes = len(body)
    if u0 > 8 * nbytes:
        raise PayloadError("payload truncated while reading sparse dithering trits")
    buf = np.zeros(nbytes + 8, dtype=np.uint8)  # 8 zero bytes: whole-word reads stay inside
    buf[:nbytes] = np.frombuffer(body, dtype=np.uint8)
    block, n = blocks(d)
    nnz = np.zeros(n, dtype=np.int64)
    bad = np.zeros(n, dtype=np.uint8)
    trits = np.empty(d, dtype=np.uint8)
    R._read_trits(buf, d, block, K.GROUP_WIDTH, R.LUT10, trits, nnz, bad)
    if bad.any():
        raise PayloadError("sparse dithering payload has an invalid trit group")
    zc = np.zeros(max(1, -(-(nbytes - (u0 >> 3)) // R.ZBLOCK)), dtype=np.int64)
    R._zero_counts(buf, u0, nbytes, zc)
    zpre = np.concatenate([[0], np.cumsum(zc)])
    total = int(nnz.sum())
    if int(zpre[-1]) < total:
        raise PayloadError("sparse dithering payload truncated in the unary levels")
    end = u0 if total == 0 else int(R._nth_zero(buf, u0, zpre, total)) + 1
    rest = 8 * nbytes - end
    if rest >= 8 or (rest and int(buf[nbytes - 1]) & ((1 << rest) - 1)):
        raise PayloadError(f"{name} payload body extended past its last field")
    outk = np.empty(d if want_levels else 0, dtype=np.int64)
    outf = np.empty(0 if want_levels else d, dtype=np.float32)
    kmax = np.zeros(n, dtype=np.int64)
    R._decode_blocks(buf, nbytes, trits, block, u0, zpre, np.cumsum(nnz) - nnz,
           float(scale), want_levels, outf, outk, kmax, bad)
    if bad.any():
        raise PayloadError("sparse dithering payload truncated in the unary levels")
    if n:
        _check_range(name, scale, int(kmax.max()))
    return outk if want_levels else outf


def _decode(body: bytes, numel: int, name: str, want_levels: bool) -> tuple[float, np.ndarray]:
    fr = FieldReader(body)
    scale = float(fr.fixed(1, 32, f"{name} scale").astype(np.uint32).view("<f4")[0])
    if not math.isfinite(scale) or scale < 0:
        raise PayloadError(f"{name} payload has a bad scale {scale}")
    if int(fr.fixed(1, 1, f"{name} mode")[0]) != ENTROPY:
        return scale, _read_unary_body(body, numel, name, scale, want_levels)
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
    if want_levels:
        return scale, k
    return scale, (k * scale).astype(np.float32)


def decode_values(body: bytes, numel: int, name: str) -> torch.Tensor:
    """``scale * k`` (float32, CPU) of a body written by :func:`encode_levels`: products in
    float64, rounded once."""
    return torch.from_numpy(_decode(body, numel, name, False)[1])


def decode_levels(body: bytes, numel: int, name: str) -> tuple[float, np.ndarray]:
    """``(scale, signed levels)`` of a body written by :func:`encode_levels`."""
    return _decode(body, numel, name, True)
