"""Compiled reader of Sparse Dithering's level body (``level_codec`` states the bit format:
33 header bits, 29 trits per 46 bits, then ``sum |k_i|`` unary bits, ``|k|-1`` ones and a
zero per non-zero; Albasyoni et al. 2020, Sec. 3).

Blocks of coordinates (as in ``sd_writer``) decode in parallel: :func:`_read_trits` gives
each block's trits and non-zero count; the ``z``-th zero of the unary section ends the
``z``-th code, so a table of zero bits per :data:`ZBLOCK` bytes (:func:`_zero_counts`) finds
where a block's codes start (:func:`_nth_zero`), and :func:`_decode_blocks` reads the
magnitudes as the gaps between consecutive zeros. The caller checks every length first
(``level_codec._read_unary_body``); numba does no bounds checks, so each kernel also stays
inside its buffers on any bytes (reads past the body see zeros).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from gradpress.kernels.jit import kernel, serial
from gradpress.kernels.sd_writer import HEAD, POW3, SUB, TRIT_BITS, TRITS
from gradpress.kernels.words import _clz

#: Bytes per block of the zero-count table.
ZBLOCK = 4096
#: Ten base-3 digits of each value below 3^10 (a kernel argument, not a compiled constant).
LUT10 = ((np.arange(3**10)[:, None] // 3 ** np.arange(10)) % 3).astype(np.uint8)
#: Zero bits of a byte.
ZEROS8 = np.array([8 - bin(i).count("1") for i in range(256)], dtype=np.int64)


@serial
def _read_bits(buf, pos, w):  # pragma: no cover - compiled
    # w <= 57 bits from bit pos, MSB first (buf padded with 8 zero bytes past the body).
    q = pos >> 3
    win = np.uint64(0)
    for t in range(8):
        win = (win << np.uint64(8)) | np.uint64(buf[q + t])
    win = win << np.uint64(pos & 7)
    return np.int64(win >> np.uint64(64 - w))


@kernel
def _read_trits(buf, d, B, widths, lut10, trits, nnz, bad):  # pragma: no cover - compiled
    # Per block: the trits, how many are non-zero, and whether a group value is out of
    # range. A group splits into three values below 3^10 (two divisions), ten digits each
    # from the table lut10 (fewer, shorter dependency chains than five digits at a time).
    p10 = np.int64(3**10)
    for b in prange(nnz.size):
        s = b * B
        e = min(d, s + B)
        for g0 in range(s, e, TRITS):
            r = min(TRITS, e - g0)
            v = _read_bits(buf, HEAD + (g0 // TRITS) * TRIT_BITS, widths[r])
            if v >= POW3[r]:
                bad[b] = 1
                v = np.int64(0)
            hi = v // (p10 * p10)
            mid = (v - hi * p10 * p10) // p10
            lo = v - hi * p10 * p10 - mid * p10
            tg = trits[g0:g0 + r]
            if r == TRITS:
                for t in range(10):
                    tg[t] = lut10[lo, t]
                for t in range(10):
                    tg[10 + t] = lut10[mid, t]
                for t in range(9):
                    tg[20 + t] = lut10[hi, t]
            else:  # the vector's last, short group
                for t in range(r):
                    part = lo if t < 10 else (mid if t < 20 else hi)
                    tg[t] = lut10[part, t % 10]
        tb = trits[s:e]
        cnt = np.int64(0)
        for t in range(tb.size):
            cnt += (np.int64(tb[t]) + 1) >> 1  # [trit != 0] (trits are 0..2)
        nnz[b] = cnt


@kernel
def _zero_counts(buf, u0, nbytes, out):  # pragma: no cover - compiled
    # Zero bits of the body from bit u0 on, per ZBLOCK bytes (out[0]: the block of u0).
    b0 = u0 >> 3
    for z in prange(out.size):
        lo = b0 + z * ZBLOCK
        bs = buf[lo:min(nbytes, lo + ZBLOCK)]
        cnt = np.int64(0)
        for t in range(bs.size):
            cnt += ZEROS8[np.int64(bs[t])]
        if z == 0:  # the bits of the first byte before u0 are not ours
            first = np.int64(buf[b0])
            cnt -= ZEROS8[first] - ZEROS8[first | (0xFF & ~(0xFF >> (u0 & 7)))]
        out[z] = cnt


@serial
def _nth_zero(buf, u0, zpre, z):  # pragma: no cover - compiled
    # Bit position of the z-th (1-based) zero at or after bit u0; zpre[m] counts the zeros
    # of the first m ZBLOCK-byte blocks (the caller checked 1 <= z <= zpre[-1]).
    blk = np.searchsorted(zpre, z) - 1
    b0 = u0 >> 3
    q = b0 + blk * ZBLOCK
    left = z - zpre[blk]
    while True:
        byte = np.int64(buf[q])
        if q == b0:
            byte |= 0xFF & ~(0xFF >> (u0 & 7))
        zb = ZEROS8[byte]
        if zb >= left:
            break
        left -= zb
        q += 1
    for t in range(8):
        if not (byte >> (7 - t)) & 1:
            left -= 1
            if left == 0:
                return 8 * q + t
    return -1


@serial
def _load64(buf, q):  # pragma: no cover - compiled
    # Eight bytes from q, big-endian (zeros past buf).
    word = np.uint64(0)
    if q + 8 <= buf.size:
        for t in range(8):
            word = (word << np.uint64(8)) | np.uint64(buf[q + t])
    else:
        for t in range(8):
            word = (word << np.uint64(8)) | np.uint64(buf[q + t] if q + t < buf.size else 0)
    return word


@kernel
def _decode_blocks(buf, nbytes, trits, B, u0, zpre, nnz_before, scale, want_levels, outf,
                   outk, kmax, bad):  # pragma: no cover - compiled
    # Per block: the magnitudes as the gaps between the zeros of the unary section (one zero
    # ends each code), handed to the non-zero trits in order; then outf = +-float32(k scale)
    # (float64 product, rounded once), or outk = signed levels.
    d = trits.size
    top = np.uint64(1) << np.uint64(63)
    for b in prange(kmax.size):
        s = b * B
        e = min(d, s + B)
        z = nnz_before[b]
        p = u0 if z == 0 else _nth_zero(buf, u0, zpre, z) + 1
        prev = p - 1  # bit of the previous code's zero
        q = p >> 3
        zw = ~_load64(buf, q) & (~np.uint64(0) >> np.uint64(p & 7))  # zeros from p on
        m = np.int64(0)
        mbuf = np.zeros(SUB + 1, dtype=np.int64)
        kbuf = np.empty(SUB, dtype=np.int64)
        for sb in range(s, e, SUB):
            ms = min(SUB, e - sb)
            tbuf = trits[sb:sb + ms]
            cnt = 0
            for t in range(ms):
                cnt += (np.int64(tbuf[t]) + 1) >> 1
            for j in range(cnt):  # the next cnt zeros of the unary section
                while zw == 0:
                    q += 8
                    if q >= nbytes:  # the caller counted enough zeros: corrupt only
                        bad[b] = 1
                        zw = top
                        break
                    zw = ~_load64(buf, q)
                lz = np.uint64(_clz(zw))  # leading zeros (64 for 0)
                pos = 8 * q + np.int64(lz)
                mbuf[j] = pos - prev
                prev = pos
                zw ^= top >> lz
            j = 0
            for t in range(ms):
                # live = [trit != 0] as arithmetic (trits are 0..2): written as a compare,
                # LLVM turns the product into a branch on random data (5x slower here).
                # mbuf[cnt] exists, so the load is always in bounds.
                live = (np.int64(tbuf[t]) + 1) >> 1
                kbuf[t] = mbuf[j] * live
                j += live
            for t in range(ms):
                m = max(m, kbuf[t])
            if want_levels:
                ok = outk[sb:sb + ms]
                for t in range(ms):
                    ok[t] = kbuf[t] if tbuf[t] == 1 else -kbuf[t]
            else:
                of = outf[sb:sb + ms]
                for t in range(ms):
                    val = np.float32(np.float64(kbuf[t]) * scale)
                    of[t] = -val if tbuf[t] == 2 else val
        kmax[b] = m
