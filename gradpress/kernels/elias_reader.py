"""Compiled decoder of QSGD's Elias-coded sparse body (layout in
:mod:`gradpress.kernels.elias_writer`).

Decoder: the ones from the unary stream's start on are counted per chunk of 64-bit words,
so a block of ``BLOCK`` nonzeros finds where its codes start by a prefix sum and a short
scan. Then one parallel pass per stream over blocks: unary lengths (several per 64-bit
window), delta prefixes, then the fields twice (gap sums per block for the positions, then
the scatter, which also writes the zeros). numba does no bounds checks, so before a pass
reads a stream its end is checked against the payload, every decoded length against the
format's limits (``Lg <= 40``, ``Ll <= 7``, ``l <= s``) and the positions against ``numel``;
the 2*nnz ones the unary pass relies on are counted before it starts; readers keep 8 zero
bytes of padding ahead. Anything malformed raises :class:`PayloadError`.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from gradpress.errors import PayloadError
from gradpress.kernels.elias_writer import BLOCK, COUNT_WORDS, MAX_LG, MAX_LL
from gradpress.kernels.jit import kernel, serial
from gradpress.kernels.words import _clz, _load_be64, _popcount


@serial
def _field(buf, pos, w):  # pragma: no cover - compiled
    # The w <= 57 bits at bit pos (0 for w = 0); buf has 8 readable bytes from pos >> 3.
    x = _load_be64(buf, pos >> 3) << np.uint64(pos & 7)
    return np.int64((x >> np.uint64(1)) >> np.uint64(63 - w))


@serial
def _unary(buf, pos):  # pragma: no cover - compiled
    # (zeros before the next one, bit after that one); the caller guarantees the one.
    z = 0
    while True:
        r = pos & 7
        x = _load_be64(buf, pos >> 3) << np.uint64(r)
        if x != 0:
            break
        z += 64 - r
        pos += 64 - r
    c = _clz(x)
    return z + c, pos + c + 1


@serial
def _next_unary(buf, pos, y):  # pragma: no cover - compiled
    # Like _unary, from a window y of the bits from pos (left-aligned, zero-filled past its
    # valid bits, 0 when used up): several codes per load. Returns (zeros, pos, window).
    if y == 0:
        y = _load_be64(buf, pos >> 3) << np.uint64(pos & 7)
        if y == 0:  # >= 57 zeros: only in corrupt payloads
            z, pos = _unary(buf, pos)
            return z, pos, np.uint64(0)
    c = _clz(y)
    return c, pos + c + 1, (y << np.uint64(c)) << np.uint64(1)


# -- encoder ------------------------------------------------------------------------------
# -- decoder ------------------------------------------------------------------------------
@serial
def _count_ones(words, counts):  # pragma: no cover - compiled
    # counts[c]: ones in words [c*COUNT_WORDS, ...). One thread: a popcount per 8 bytes is
    # cheaper than waking the pool.
    n = words.size
    for c in range(counts.size):
        acc = 0
        for j in range(c * COUNT_WORDS, min(n, (c + 1) * COUNT_WORDS)):
            acc += _popcount(words[j])
        counts[c] = acc


@serial
def _nth_one(buf, cum, m):  # pragma: no cover - compiled
    # Bit position of the m-th one (m >= 1) in buf; cum[c] = ones before word chunk c, and
    # cum[-1] >= m.
    lo = 0
    hi = cum.size - 1
    while hi - lo > 1:  # last chunk c with cum[c] < m
        mid = (lo + hi) >> 1
        if cum[mid] < m:
            lo = mid
        else:
            hi = mid
    r = m - cum[lo]
    j = lo * COUNT_WORDS
    while True:
        x = _load_be64(buf, 8 * j)
        p = _popcount(x)
        if p >= r:
            break
        r -= p
        j += 1
    for _ in range(r - 1):  # drop the word's first r - 1 ones
        x &= ~(np.uint64(1 << 63) >> np.uint64(_clz(x)))
    return 64 * j + _clz(x)


@kernel
def _read_prefixes(buf, start, cum, nnz, use_delta, lg, ll, pbits, fbits, ends, bad
                   ):  # pragma: no cover - compiled
    # Block q decodes the unary lengths of nonzeros [q*BLOCK, ...): lg[i] (Lg, or P for
    # delta) and ll[i]; pbits[q] = its delta-stream bits, fbits[q] = its field bits (gamma
    # only), ends[q] = bit after its last code. Over-long codes set bad[q].
    top = 5 if use_delta else MAX_LG
    for q in prange(pbits.size):
        i0 = q * BLOCK
        pos = start if q == 0 else _nth_one(buf, cum, 2 * i0) + 1
        y = np.uint64(0)
        sa = 0
        sb = 0
        err = False
        for i in range(i0, min(nnz, i0 + BLOCK)):
            a, pos, y = _next_unary(buf, pos, y)
            b, pos, y = _next_unary(buf, pos, y)
            if a > top or b > MAX_LL:
                err = True
                a = 0
                b = 0
            lg[i] = a
            ll[i] = b
            sa += a
            sb += b + 1
        pbits[q] = sa if use_delta else 0
        fbits[q] = sa + sb
        ends[q] = pos
        bad[q] = err


@kernel
def _read_delta(buf, doff, lg, ll, fbits, bad):  # pragma: no cover - compiled
    # Block q turns its delta prefixes P into Lg = (2^P | low P bits) - 1 and recounts its
    # field bits.
    n = lg.size
    for q in prange(doff.size):
        pos = doff[q]
        sf = 0
        err = False
        for i in range(q * BLOCK, min(n, (q + 1) * BLOCK)):
            p = np.int64(lg[i])
            g = ((1 << p) | _field(buf, pos, p)) - 1
            pos += p
            if g > MAX_LG:
                err = True
                g = 0
            lg[i] = g
            sf += g + ll[i] + 1
        fbits[q] = sf
        bad[q] = err


@kernel
def _gap_sums(buf, foff, lg, ll, s, numel, gaps, bad):  # pragma: no cover - compiled
    # Block q's sum of gaps (capped at numel + 1); a level above s sets bad[q].
    n = lg.size
    for q in prange(foff.size):
        pos = foff[q]
        tot = 0
        err = False
        for i in range(q * BLOCK, min(n, (q + 1) * BLOCK)):
            a = np.int64(lg[i])
            b = np.int64(ll[i])
            f = _field(buf, pos, a + b + 1)
            pos += a + b + 1
            err |= ((1 << b) | ((f >> 1) & ((1 << b) - 1))) > s
            tot = min(tot + ((1 << a) | (f >> (b + 1))), numel + 1)
        gaps[q] = tot
        bad[q] = err


@kernel
def _scatter(buf, foff, lg, ll, base, inv, bucket, out):  # pragma: no cover - compiled
    # Block q owns out[base[q] .. base[q+1]) (the last block: to the end): zeros, then
    # level * sign * inv[bucket of the position] at each of its nonzeros.
    n = lg.size
    nblk = foff.size
    for q in prange(nblk):
        stop = base[q + 1] if q + 1 < nblk else out.size
        out[base[q]:stop] = 0
        pos = foff[q]
        p = base[q] - 1
        for i in range(q * BLOCK, min(n, (q + 1) * BLOCK)):
            a = np.int64(lg[i])
            b = np.int64(ll[i])
            f = _field(buf, pos, a + b + 1)
            pos += a + b + 1
            p += (1 << a) | (f >> (b + 1))
            lev = np.float32((1 << b) | ((f >> 1) & ((1 << b) - 1)))
            out[p] = (-lev if f & 1 else lev) * inv[p // bucket]


def _header(data: np.ndarray, start: int) -> tuple[bool, int, int]:
    """Gap flag, ``nnz + 1`` and the bit after them, read from bit ``start``."""
    chunk = data[start >> 3:(start >> 3) + 16]
    nbits = 8 * chunk.size
    word = int.from_bytes(chunk.tobytes(), "big")
    r = start & 7
    if nbits - r < 2:
        raise PayloadError("payload truncated while reading the gap flag and nonzero count")
    flag = (word >> (nbits - r - 1)) & 1
    rest = nbits - r - 1  # bits after the flag
    body = word & ((1 << rest) - 1)
    L = rest - body.bit_length()  # leading zeros of gamma(nnz + 1)
    if body == 0 or L > 60 or 2 * L + 1 > rest:
        raise PayloadError("payload truncated or corrupt while reading the nonzero count")
    value = body >> (rest - 2 * L - 1)
    return bool(flag), int(value), start + 2 * L + 2


def decode(data: np.ndarray, start: int, numel: int, s: int, inv: np.ndarray,
           bucket: int) -> np.ndarray:
    """``float32`` tensor of ``numel`` elements from the sparse body in ``data`` (``uint8``)
    from bit ``start``: ``sign * level * inv[i // bucket]`` at each nonzero, 0 elsewhere."""
    use_delta, count, pos = _header(data, start)
    nnz = count - 1
    if nnz > numel:
        raise PayloadError(f"qsgd payload claims {nnz} nonzeros in {numel} elements")
    nbytes = data.size
    total = 8 * nbytes
    # whole words, and 8 zero bytes past the data: readers load 8 bytes at a time
    buf = np.zeros(8 * ((nbytes + 7) // 8 + 1), dtype=np.uint8)
    buf[:nbytes] = data
    if nnz == 0:
        _expect_end(buf, pos, total)
        return np.zeros(numel, dtype=np.float32)
    # count only the ones from the unary stream's start on
    buf[:pos >> 3] = 0
    buf[pos >> 3] &= 255 >> (pos & 7)
    words = buf.view(np.uint64)
    counts = np.empty(-(-words.size // COUNT_WORDS), dtype=np.int64)
    _count_ones(words, counts)
    cum = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=cum[1:])
    if int(cum[-1]) < 2 * nnz:
        raise PayloadError("payload truncated while reading length prefixes")
    nblk = -(-nnz // BLOCK)
    lg = np.empty(nnz, dtype=np.uint8)
    ll = np.empty(nnz, dtype=np.uint8)
    pbits, fbits, ends = (np.empty(nblk, dtype=np.int64) for _ in range(3))
    bad = np.empty(nblk, dtype=np.bool_)
    _read_prefixes(buf, pos, cum, nnz, use_delta, lg, ll, pbits, fbits, ends, bad)
    if bad.any():
        raise PayloadError("qsgd payload has an over-long gap or level code")
    pos = int(ends[-1])  # end of the unary stream
    if use_delta:
        doff = _offsets(pos, pbits, total, "delta prefixes")
        pos += int(pbits.sum())
        _read_delta(buf, doff, lg, ll, fbits, bad)
        if bad.any():
            raise PayloadError("qsgd payload has an over-long gap code")
    foff = _offsets(pos, fbits, total, "gaps, levels and signs")
    _expect_end(buf, pos + int(fbits.sum()), total)
    gaps = np.empty(nblk, dtype=np.int64)
    _gap_sums(buf, foff, lg, ll, int(s), numel, gaps, bad)
    if bad.any():
        raise PayloadError("qsgd payload has a level out of range")
    # gaps[q] <= numel + 1 and nblk <= numel, so the sum cannot overflow
    base = np.zeros(nblk, dtype=np.int64)
    np.cumsum(gaps[:-1], out=base[1:])
    if int(base[-1]) + int(gaps[-1]) > numel:  # the last nonzero sits at the sum - 1
        raise PayloadError("qsgd payload has a position out of range")
    out = np.empty(numel, dtype=np.float32)
    _scatter(buf, foff, lg, ll, base, inv, bucket, out)
    return out


def _offsets(start: int, bits: np.ndarray, total: int, what: str) -> np.ndarray:
    """Start bit of each block's part of a stream; the stream must end by bit ``total``."""
    off = np.empty(bits.size, dtype=np.int64)
    off[0] = start
    np.cumsum(bits[:-1], out=off[1:])
    off[1:] += start
    if start + int(bits.sum()) > total:
        raise PayloadError(f"payload truncated while reading {what}")
    return off


def _expect_end(buf: np.ndarray, pos: int, total: int) -> None:
    """Only zero padding (< 8 bits) may follow bit ``pos``."""
    rest = total - pos
    if rest < 0:
        raise PayloadError("payload truncated in its sparse body")
    if rest >= 8 or (rest and int(buf[pos >> 3]) & ((1 << rest) - 1)):
        raise PayloadError("qsgd payload body extended past its last field")
