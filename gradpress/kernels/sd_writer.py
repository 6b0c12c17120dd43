"""Compiled kernels of Sparse Dithering (Albasyoni et al. 2020, arXiv 2010.03246, Sec. 3):
the grid-search passes of the deterministic encoder and the writer of the level body
(``level_codec`` states the bit format: 33 header bits, 29 trits per 46 bits, then
``sum |k_i|`` unary bits, ``|k|-1`` ones and a zero per non-zero; ``sd_reader`` reads it).

Every kernel works on *blocks* of coordinates: a multiple of 29 (trit groups never straddle
blocks) fixed by ``d`` and a chunk length only (:func:`block_len`), never by the thread
count, and every float sum is taken block by block in coordinate order and then over blocks
in order, so the bytes do not depend on the number of threads.

Exactness. On the grid ``c`` (float32) the encoder's ``u = |x| / c`` is a float32 division
and ``f = u - trunc(u)``; a gain ``g = 2 f - 1 > 0`` needs ``f > 1/2`` and is then a multiple
of ``2^-23`` (``f`` has at most 24 bits below the point), so ``G = 2^23 g`` is an integer and
the histogram masses are exact int64 sums: any summation order gives the same bins, tails
and threshold. Only ``sum frac^2`` (a float64 sum of float32 squares) and the scale's sums
depend on the order, at the last bit.

Writing in parallel: block ``b`` owns the bit ranges of its trit groups and of its unary
codes (offsets from a prefix sum of the per-block level sums). A byte that two ranges share
is written by the one that completes it (its bits before the range are zeros); the range
that ends inside it leaves that partly filled byte in a small per-block side table, OR-ed in
afterwards. So no two threads write one byte.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from gradpress.kernels.jit import kernel, serial

TRITS = 29
TRIT_BITS = 46  # 3^29 < 2^46
HEAD = 33  # float32 scale + mode bit
NBINS = 4096  # gain histogram: bin floor(4096 g) = G >> 11
#: Blocks per vector at most (enough to share out, few enough to keep side tables small).
MAX_BLOCKS = 32
#: Bits of the trit group of ``r`` coordinates: ``ceil(log2 3^r)``.
GROUP_WIDTH = np.array([(3**r - 1).bit_length() for r in range(TRITS + 1)], dtype=np.int64)
POW3 = np.array([3**r for r in range(TRITS + 1)], dtype=np.int64)


def block_len(d: int, chunk: int) -> int:
    """Coordinates per block: a multiple of ``chunk`` (itself a multiple of 29), at most
    :data:`MAX_BLOCKS` blocks."""
    return chunk * max(1, -(-d // (chunk * MAX_BLOCKS)))


# -- shared helpers ---------------------------------------------------------------------
# Loops index slices from 0 (``xs = x[sb:sb + m]; xs[t]``): numba's negative-index check on
# ``x[sb + t]`` keeps LLVM from vectorizing (measured 5x slower here).

#: Coordinates staged per step inside a block (a multiple of 29 and of 4): the arithmetic
#: runs as straight-line (vectorizable) loops over the stage, the branches after it.
SUB = TRITS * 32


@serial
def _grid_levels(xs, c, fbuf, gbuf):  # pragma: no cover - compiled
    # u = |x| / c in float32 (u < 2^26 checked by the caller): fbuf = frac(u), gbuf = the
    # gain G = 2^23 (2 frac - 1) (exact; G <= 0 where frac <= 1/2); returns sum trunc(u).
    fl = np.int64(0)
    for t in range(xs.size):
        u = abs(xs[t]) / c
        ti = np.int32(u)
        f = u - np.float32(ti)
        fl += np.int64(ti)
        fbuf[t] = f
        gbuf[t] = np.int64(f * np.float32(16777216.0)) - 8388608
    return fl


@serial
def _put(out, acc, nb, cur, v, w):  # pragma: no cover - compiled
    # Append the w low bits of v (nb + w <= 64) MSB first; the nb pending bits start at byte
    # cur, and each byte they complete goes out.
    acc = (acc << np.uint64(w)) | np.uint64(v)
    nb += w
    while nb >= 8:
        nb -= 8
        if cur < out.size:
            out[cur] = np.uint8((acc >> np.uint64(nb)) & np.uint64(255))
        cur += 1
    return acc, nb, cur


@serial
def _flush32(out, acc, nb, cur):  # pragma: no cover - compiled
    # Write the first 32 of nb >= 32 pending bits (four whole bytes).
    nb -= 32
    word = acc >> np.uint64(nb)
    if cur + 4 <= out.size:
        out[cur] = np.uint8((word >> np.uint64(24)) & np.uint64(255))
        out[cur + 1] = np.uint8((word >> np.uint64(16)) & np.uint64(255))
        out[cur + 2] = np.uint8((word >> np.uint64(8)) & np.uint64(255))
        out[cur + 3] = np.uint8(word & np.uint64(255))
    return acc, nb, cur + 4


@serial
def _close(ev, ei, slot, acc, nb, cur):  # pragma: no cover - compiled
    # The last, partly filled byte goes to the side table; returns the end bit.
    if nb > 0:
        ev[slot] = np.uint8((acc << np.uint64(8 - nb)) & np.uint64(255))
        ei[slot] = cur
    return 8 * cur + nb


@serial
def _stage_codes(ks, neg, kbuf, tbuf):  # pragma: no cover - compiled
    # kbuf = k, tbuf = trit (0; 1 positive; 2 negative where neg < 0) of a stage.
    for t in range(ks.size):
        kv = np.int64(ks[t])
        kbuf[t] = kv
        tbuf[t] = np.int64(kv > 0) * (np.int64(1) + np.int64(neg[t] < 0))


@serial
def _write_codes(kbuf, tbuf, m, widths, out, ta, tn, tc, ua, un,
                 uc):  # pragma: no cover - compiled
    # Trit groups (tbuf) and unary codes (kbuf) of m staged coordinates (whole groups of 29
    # but for the vector's last one); ta, tn, tc / ua, un, uc: the two writers' states.
    for g0 in range(0, m, TRITS):
        r = min(TRITS, m - g0)
        tg = tbuf[g0:g0 + r]
        v = np.int64(0)
        for t in range(r):  # trit j worth 3^j
            v += tg[t] * POW3[t]
        ta, tn, tc = _put(out, ta, tn, tc, v, widths[r])
    for t in range(m):
        k = kbuf[t]
        while k > 32:  # 32 ones at a time (long codes are rare)
            ua = (ua << np.uint64(32)) | np.uint64(0xFFFFFFFF)
            un += 32
            ua, un, uc = _flush32(out, ua, un, uc)
            k -= 32
        # k - 1 ones and a zero (nothing for k = 0)
        ua = (ua << np.uint64(k)) | np.uint64(((1 << k) - 2) & ((1 << k) - 1))
        un += k
        if un >= 32:
            ua, un, uc = _flush32(out, ua, un, uc)
    return ta, tn, tc, ua, un, uc


# -- encoder: statistics ----------------------------------------------------------------
@kernel
def _sumsq(x, xbits, B, part, amax):  # pragma: no cover - compiled
    # Per block: sum x^2 in float64 (eight interleaved sums, a fixed order) and max |x| as
    # the largest sign-cleared bit pattern of x (xbits: x viewed as int32; integer max
    # vectorizes, and it orders non-negative floats as their values).
    n = x.size
    for b in prange(part.size):
        xb = x[b * B:min(n, (b + 1) * B)]
        ib = xbits[b * B:min(n, (b + 1) * B)]
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
        t = 0
        while t + 8 <= xb.size:
            s0 += np.float64(xb[t]) * np.float64(xb[t])
            s1 += np.float64(xb[t + 1]) * np.float64(xb[t + 1])
            s2 += np.float64(xb[t + 2]) * np.float64(xb[t + 2])
            s3 += np.float64(xb[t + 3]) * np.float64(xb[t + 3])
            s4 += np.float64(xb[t + 4]) * np.float64(xb[t + 4])
            s5 += np.float64(xb[t + 5]) * np.float64(xb[t + 5])
            s6 += np.float64(xb[t + 6]) * np.float64(xb[t + 6])
            s7 += np.float64(xb[t + 7]) * np.float64(xb[t + 7])
            t += 8
        while t < xb.size:
            s0 += np.float64(xb[t]) * np.float64(xb[t])
            t += 1
        m = np.int32(0)
        for t in range(ib.size):
            m = max(m, ib[t] & np.int32(0x7FFFFFFF))
        part[b] = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
        amax[b] = m


@kernel
def _scan(x, c, B, hist, floor_part, sq_part):  # pragma: no cover - compiled
    # Pass 1 of grid c: per block sum trunc(u), sum frac^2 (float32 squares in float64, four
    # interleaved sums) and the histogram (count, sum G) of the gains by bin G >> 11.
    n = x.size
    for b in prange(floor_part.size):
        h = hist[b]
        h[:, :] = 0
        fbuf = np.empty(SUB, dtype=np.float32)
        gbuf = np.empty(SUB, dtype=np.int64)
        fl = np.int64(0)
        s0 = s1 = s2 = s3 = 0.0
        e = min(n, (b + 1) * B)
        for sb in range(b * B, e, SUB):
            m = min(SUB, e - sb)
            fl += _grid_levels(x[sb:sb + m], c, fbuf, gbuf)
            t = 0
            while t + 4 <= m:
                s0 += np.float64(fbuf[t] * fbuf[t])
                s1 += np.float64(fbuf[t + 1] * fbuf[t + 1])
                s2 += np.float64(fbuf[t + 2] * fbuf[t + 2])
                s3 += np.float64(fbuf[t + 3] * fbuf[t + 3])
                t += 4
            while t < m:
                s0 += np.float64(fbuf[t] * fbuf[t])
                t += 1
            live = 0
            for t in range(m):  # keep the positive gains (no branch to mispredict)
                g = gbuf[t]
                gbuf[live] = g
                live += np.int64(g > 0)
            for t in range(live):
                g = gbuf[t]
                j = g >> 11
                h[j, 0] += 1
                h[j, 1] += g
        floor_part[b] = fl
        sq_part[b] = (s0 + s1) + (s2 + s3)


@kernel
def _gather(x, c, B, j, offs, pos, gains):  # pragma: no cover - compiled
    # Pass 2: positions and gains G of the threshold bin j, in coordinate order.
    n = x.size
    for b in prange(offs.size - 1):
        fbuf = np.empty(SUB, dtype=np.float32)
        gbuf = np.empty(SUB, dtype=np.int64)
        o = offs[b]
        end = offs[b + 1]
        e = min(n, (b + 1) * B)
        for sb in range(b * B, e, SUB):
            m = min(SUB, e - sb)
            _grid_levels(x[sb:sb + m], c, fbuf, gbuf)
            hits = 0
            for t in range(m):
                g = gbuf[t]
                hits += np.int64((g >> 11) == j) * np.int64(g > 0)
            if hits:  # rare: one bin of 4096
                for t in range(m):
                    g = gbuf[t]
                    if (g >> 11) == j and g > 0 and o < end:
                        pos[o] = sb + t
                        gains[o] = g
                        o += 1


# -- encoder: the body ------------------------------------------------------------------
@kernel
def _emit_grid(x, c, jbin, chosen, cstart, B, ubase, widths, out, ev, ei, ends, sak,
               skk):  # pragma: no cover - compiled
    # The body of grid c: k = trunc(u) + [bin > jbin] + [i in chosen] (jbin = NBINS: none
    # above); per block the sums sum |x| k and sum k^2 for the least-squares scale.
    n = x.size
    nc = chosen.size
    for b in prange(ubase.size):
        s = b * B
        e = min(n, s + B)
        tp = HEAD + (s // TRITS) * TRIT_BITS
        ta, tn, tc = np.uint64(0), tp & 7, tp >> 3
        up_ = ubase[b]
        ua, un, uc = np.uint64(0), up_ & 7, up_ >> 3
        kbuf = np.empty(SUB, dtype=np.int64)
        tbuf = np.empty(SUB, dtype=np.int64)
        p = cstart[b]
        a0 = a1 = a2 = a3 = 0.0
        kk = 0.0
        for sb in range(s, e, SUB):
            m = min(SUB, e - sb)
            xs = x[sb:sb + m]
            for t in range(m):  # as _grid_levels, plus the rounding up above the bin
                u = abs(xs[t]) / c
                ti = np.int32(u)
                g = np.int64((u - np.float32(ti)) * np.float32(16777216.0)) - 8388608
                kbuf[t] = np.int64(ti) + np.int64((g >> 11) > jbin)
            while p < nc and chosen[p] < sb + m:
                kbuf[chosen[p] - sb] += 1
                p += 1
            t = 0
            while t + 4 <= m:  # four interleaved float64 sums (a fixed order)
                a0 += np.float64(abs(xs[t])) * np.float64(kbuf[t])
                a1 += np.float64(abs(xs[t + 1])) * np.float64(kbuf[t + 1])
                a2 += np.float64(abs(xs[t + 2])) * np.float64(kbuf[t + 2])
                a3 += np.float64(abs(xs[t + 3])) * np.float64(kbuf[t + 3])
                t += 4
            while t < m:
                a0 += np.float64(abs(xs[t])) * np.float64(kbuf[t])
                t += 1
            k2 = np.int64(0)  # exact: k < 2^26, so a stage's sum stays below 2^62
            for t in range(m):
                k2 += kbuf[t] * kbuf[t]
            kk += np.float64(k2)
            _stage_codes(kbuf[:m], xs, kbuf, tbuf)
            ta, tn, tc, ua, un, uc = _write_codes(kbuf, tbuf, m, widths, out, ta, tn, tc, ua,
                                                  un, uc)
        ua, un, uc = _put(out, ua, un, uc, 0, 0)
        _close(ev[b], ei[b], 0, ta, tn, tc)
        ends[b] = _close(ev[b], ei[b], 1, ua, un, uc)
        sak[b] = (a0 + a1) + (a2 + a3)
        skk[b] = kk


@kernel
def _level_sums(k, B, ksum, kmax):  # pragma: no cover - compiled
    n = k.size
    for b in prange(ksum.size):
        kb = k[b * B:min(n, (b + 1) * B)]
        acc = np.int64(0)
        m = np.int64(0)
        for t in range(kb.size):
            v = np.int64(kb[t])
            acc += v
            m = max(m, v)
        ksum[b] = acc
        kmax[b] = m


@kernel
def _emit_levels(k, neg, B, ubase, widths, out, ev, ei, ends):  # pragma: no cover - compiled
    # The body of given magnitudes k >= 0; coordinate i is negative where neg[i] < 0.
    n = k.size
    for b in prange(ubase.size):
        s = b * B
        e = min(n, s + B)
        tp = HEAD + (s // TRITS) * TRIT_BITS
        ta, tn, tc = np.uint64(0), tp & 7, tp >> 3
        up_ = ubase[b]
        ua, un, uc = np.uint64(0), up_ & 7, up_ >> 3
        kbuf = np.empty(SUB, dtype=np.int64)
        tbuf = np.empty(SUB, dtype=np.int64)
        for sb in range(s, e, SUB):
            m = min(SUB, e - sb)
            _stage_codes(k[sb:sb + m], neg[sb:sb + m], kbuf, tbuf)
            ta, tn, tc, ua, un, uc = _write_codes(kbuf, tbuf, m, widths, out, ta, tn, tc, ua,
                                                  un, uc)
        ua, un, uc = _put(out, ua, un, uc, 0, 0)
        _close(ev[b], ei[b], 0, ta, tn, tc)
        ends[b] = _close(ev[b], ei[b], 1, ua, un, uc)


@serial
def _rand_levels(x, rnd, delta, k):  # pragma: no cover - compiled
    # k_i = trunc(u) + [r_i < frac(u)], u = |x_i| / delta in float64, on one block (x, rnd
    # and k its slices); returns (sum k, max k). Serial: the caller draws rnd block by block.
    acc = np.int64(0)
    m = np.int64(0)
    for t in range(x.size):
        u = np.float64(abs(x[t])) / delta
        tr = np.int64(u)
        kv = tr + np.int64(rnd[t] < u - np.float64(tr))
        k[t] = kv
        acc += kv
        m = max(m, kv)
    return acc, m
