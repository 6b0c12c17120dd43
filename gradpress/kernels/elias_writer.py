"""Compiled encoder of QSGD's Elias-coded sparse body (numba kernels).

QSGD (Alistarh et al., NeurIPS 2017, Sec. 3.1) sends, per nonzero symbol, the gap ``g >= 1``
to the previous nonzero position in Elias gamma (or delta, whichever is smaller over the
whole payload), its level ``l = |sym - s| >= 1`` in Elias gamma and one sign bit. With
``Lg = floor(log2 g)``, ``Ll = floor(log2 l)`` and, for delta, ``P = floor(log2(Lg + 1))``,
the body is, bit for bit (MSB first, byte-aligned start, last byte zero-padded)::

    gap flag (1 bit: 1 = delta), gamma(nnz + 1),
    unary stream:  per nonzero  0^pre 1 0^Ll 1    with pre = Lg (gamma) or P (delta)
    delta stream:  per nonzero  the P low bits of Lg + 1          (delta only)
    field stream:  per nonzero  [Lg low bits of g | Ll low bits of l | sign]

which is ``2 Lg + 1`` (gamma) or ``Lg + 2 P + 1`` (delta) bits per gap, ``2 Ll + 1`` per
level and one per sign: exactly the textbook code lengths, reordered so that every stream
can be cut into independent pieces.

Encoder: a parallel pass over tiles of ``TILE`` symbols compacts each tile's nonzero
offsets (8 symbols per step, branch-free) and sums ``Lg``, ``P``, ``Ll`` (a tile's first gap
is fixed up afterwards, once the previous tile's last nonzero is known); prefix sums give
every tile its bit offset in each stream; a second parallel pass writes the bits. Each byte
is written by the one segment (tile and stream) that holds its last bit, whole 64-bit words
at a time (a segment's first byte with zeros where the previous segment's bits go); a
segment's trailing partial byte goes to a small edge table and is OR-ed in afterwards. The
bytes do not depend on the thread count.

The decoder is :mod:`gradpress.kernels.elias_reader`.
"""

from __future__ import annotations

import sys

import numpy as np
from numba import prange

from gradpress.kernels.jit import kernel, serial
from gradpress.kernels.words import _clz, _load64, _store64, _store_be64

if sys.byteorder != "little":  # _compact reads 8 symbols as one native word
    raise ImportError("gradpress' Elias kernels assume a little-endian machine")

#: Symbols per encoder tile (a parallel work item; a multiple of 8).
TILE = 1 << 14
#: Nonzeros per decoder block (a parallel work item).
BLOCK = 1 << 13
#: 64-bit words per chunk when counting the unary stream's ones.
COUNT_WORDS = 1 << 7
#: Longest gap prefix ``Lg`` the format allows (gaps below 2^41).
MAX_LG = 40
#: Longest level prefix ``Ll`` (levels up to 255; QSGD's ``s <= 127`` needs 6).
MAX_LL = 7

_LOG8 = np.array([0] + [i.bit_length() - 1 for i in range(1, 256)], dtype=np.int64)
_ONES = np.uint64(0x0101010101010101)




def _log2_np(v: np.ndarray) -> np.ndarray:
    """``floor(log2 v)`` of positive int64 values below 2^53."""
    return (np.frexp(v.astype(np.float64))[1] - 1).astype(np.int64)


@serial
def _log2(v):  # pragma: no cover - compiled
    # floor(log2 v), 0 < v < 2^63
    return 63 - _clz(np.uint64(v))


@serial
def _put(out, acc, nacc, k, v, w):  # pragma: no cover - compiled
    # Append the w <= 57 low bits of v to a writer holding nacc < 64 pending bits in acc
    # (exactly those, no garbage above); every full 64 bits go to out[k:k+8] at once.
    if nacc + w < 64:
        return (acc << np.uint64(w)) | np.uint64(v), nacc + w, k
    spill = nacc + w - 64  # < w, and nacc >= 7, so no shift reaches 64
    _store_be64(out, k, (acc << np.uint64(64 - nacc)) | (np.uint64(v) >> np.uint64(spill)))
    return np.uint64(v) & ((np.uint64(1) << np.uint64(spill)) - np.uint64(1)), spill, k + 8


@serial
def _flush(out, acc, nacc, k):  # pragma: no cover - compiled
    # Write the writer's whole pending bytes; return (index, value) of the trailing partial
    # byte (its low bits zero), index -1 if none.
    nfull = nacc >> 3
    for b in range(nfull):
        out[k + b] = np.uint8((acc >> np.uint64(nacc - 8 * b - 8)) & np.uint64(255))
    rem = nacc & 7
    if rem == 0:
        return -1, 0
    return k + nfull, np.int64((acc << np.uint64(8 - rem)) & np.uint64(255))


def _lane_table() -> np.ndarray:
    # For each byte m: the indices of its set bits (ascending) as 16-bit lanes, 4 per word.
    out = np.zeros((256, 2), dtype=np.uint64)
    for m in range(256):
        bits = [b for b in range(8) if m >> b & 1] + [0] * 8
        for lane in range(8):
            out[m, lane // 4] |= np.uint64(bits[lane] << (16 * (lane % 4)))
    return out


_LANES = _lane_table()
_POP8 = np.array([bin(m).count("1") for m in range(256)], dtype=np.int64)
_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_HIGH = np.uint64(0x8080808080808080)
_GATHER = np.uint64(0x0102040810204080)  # (bytes' bit 0) * this: byte b's bit at 56 + b
_LANE1 = np.uint64(0x0001000100010001)


@serial
def _compact(sym, s, a, e, idx):  # pragma: no cover - compiled
    # Offsets (from a) of the nonzero symbols of sym[a:e] into idx[a:], in order; returns
    # their count. Branch-free: 8 symbols at a time, their nonzero bytes as a bit mask m,
    # whose set-bit indices come from a table and are stored 8 lanes at once (lanes past
    # the count are overwritten later or ignored; they never pass index e - 1).
    pat = np.uint64(s) * _ONES
    c = 0
    i = a
    while i + 8 <= e:
        x = _load64(sym, i) ^ pat  # native order: symbol i + b in byte b
        hb = (((x & _LOW7) + _LOW7) | x) & _HIGH  # top bit of each nonzero byte
        m = ((hb >> np.uint64(7)) * _GATHER) >> np.uint64(56)
        off = np.uint64(i - a) * _LANE1
        _store64(idx, a + c, _LANES[m, 0] + off)
        _store64(idx, a + c + 4, _LANES[m, 1] + off)
        c += _POP8[m]
        i += 8
    while i < e:
        idx[a + c] = i - a
        c += 1 if np.int64(sym[i]) != s else 0
        i += 1
    return c


@kernel
def _tile_stats(sym, s, idx, stats):  # pragma: no cover - compiled
    # Per tile: its nonzeros' offsets into idx; their count, first and last position, and
    # the sums of Lg, P = log2(Lg+1) over gaps inside the tile, and of Ll over its levels.
    n = sym.size
    for t in prange(stats.shape[0]):
        a = t * TILE
        cnt = _compact(sym, s, a, min(n, a + TILE), idx)
        first = a + np.int64(idx[a]) if cnt else -1
        last = first
        slg = 0
        sdl = 0
        sll = 0
        for j in range(cnt):
            k = a + np.int64(idx[a + j])
            sll += _LOG8[abs(np.int64(sym[k]) - s)]
            if j:
                lg = _log2(k - last)
                slg += lg
                sdl += _LOG8[lg + 1]
            last = k
        stats[t, 0] = cnt
        stats[t, 1] = first
        stats[t, 2] = last
        stats[t, 3] = slg
        stats[t, 4] = sdl
        stats[t, 5] = sll


@kernel
def _write_tiles(sym, s, idx, cnt, prev, offs, use_delta, out, edges
                 ):  # pragma: no cover - compiled
    # Tile t writes its nonzeros' bits into the unary, delta and field streams from bit
    # offsets offs[j, t] (j = stream): whole bytes straight to out (the first one with zeros
    # where an earlier segment's bits go), the trailing partial byte to edges[j, t].
    for t in prange(prev.size):
        # three writers: pending bits, their count, next byte
        acc0 = np.uint64(0)
        n0 = offs[0, t] & 7
        k0 = offs[0, t] >> 3
        acc1 = np.uint64(0)
        n1 = offs[1, t] & 7
        k1 = offs[1, t] >> 3
        acc2 = np.uint64(0)
        n2 = offs[2, t] & 7
        k2 = offs[2, t] >> 3
        a = t * TILE
        last = prev[t]
        for j in range(cnt[t]):
            k = a + np.int64(idx[a + j])
            v = np.int64(sym[k])
            g = k - last
            last = k
            lg = _log2(g)
            lev = abs(v - s)
            ll = _LOG8[lev]
            if use_delta:
                pre = _LOG8[lg + 1]
                acc1, n1, k1 = _put(out, acc1, n1, k1, (lg + 1) & ((1 << pre) - 1), pre)
            else:
                pre = lg
            acc0, n0, k0 = _put(out, acc0, n0, k0, (1 << (ll + 1)) | 1, pre + ll + 2)
            low = (((g & ((1 << lg) - 1)) << ll) | (lev & ((1 << ll) - 1))) << 1
            acc2, n2, k2 = _put(out, acc2, n2, k2, low | (1 if v < s else 0), lg + ll + 1)
        if cnt[t]:
            edges[0, t, 0], edges[0, t, 1] = _flush(out, acc0, n0, k0)
            edges[1, t, 0], edges[1, t, 1] = _flush(out, acc1, n1, k1)
            edges[2, t, 0], edges[2, t, 1] = _flush(out, acc2, n2, k2)
        else:
            edges[0, t, 0] = edges[1, t, 0] = edges[2, t, 0] = -1


def encode(sym: np.ndarray, s: int, limit_bits: int) -> np.ndarray | None:
    """QSGD's sparse body (layout in the module docstring) of ``uint8`` symbols ``sym``
    (zero at ``s``), or ``None`` when it would take ``>= limit_bits`` bits (or the tensor is
    too long for the format's gaps)."""
    n = sym.size
    if n == 0 or n >= 1 << (MAX_LG + 1):
        return None
    sym = np.ascontiguousarray(sym, dtype=np.uint8)
    ntiles = -(-n // TILE)
    stats = np.empty((ntiles, 6), dtype=np.int64)
    # nonzero offsets per tile (only the used part of each tile's slot is ever touched)
    idx = np.empty(n, dtype=np.uint16)
    _tile_stats(sym, int(s), idx, stats)
    cnt, first, last, slg, sdl, sll = (stats[:, j].copy() for j in range(6))
    nnz = int(cnt.sum())
    if 3 * nnz >= limit_bits:  # each nonzero costs >= 3 bits: the sparse code cannot win
        return None
    # each tile's first gap starts at the previous tile's last nonzero
    prev = np.full(ntiles, -1, dtype=np.int64)
    live = cnt > 0
    if nnz:
        prev[live] = np.concatenate([np.array([-1], dtype=np.int64), last[live][:-1]])
        lg0 = _log2_np(first[live] - prev[live])
        slg[live] += lg0
        sdl[live] += _LOG8[lg0 + 1]
    sum_lg, sum_dl = int(slg.sum()), int(sdl.sum())
    use_delta = sum_lg + 2 * sum_dl < 2 * sum_lg  # delta bits < gamma bits
    L = (nnz + 1).bit_length() - 1
    head = 2 + 2 * L  # gap flag and gamma(nnz + 1)
    sizes = np.stack([(sdl if use_delta else slg) + sll + 2 * cnt,
                      sdl if use_delta else np.zeros_like(sdl),
                      slg + sll + cnt])
    total = head + int(sizes.sum())
    if total >= limit_bits:
        return None
    # stream j, tile t starts at bit offs[j, t]; offs[j, ntiles] is the stream's end
    offs = np.zeros((3, ntiles + 1), dtype=np.int64)
    np.cumsum(sizes, axis=1, out=offs[:, 1:])
    offs += (head + np.concatenate([[0], np.cumsum(sizes.sum(axis=1))[:-1]]))[:, None]
    nbytes = (total + 7) // 8
    out = np.empty(nbytes, dtype=np.uint8)
    # No writer emits the bytes that end inside the header or the final padding.
    hb = (head + 7) // 8
    out[:hb] = 0
    out[-1] = 0
    edges = np.empty((3, ntiles, 2), dtype=np.int64)
    _write_tiles(sym, int(s), idx, cnt, prev, offs, use_delta, out, edges)
    e = edges.reshape(-1, 2)
    e = e[e[:, 0] >= 0]
    np.bitwise_or.at(out, e[:, 0], e[:, 1].astype(np.uint8))
    word = ((int(use_delta) << (2 * L + 1)) | (nnz + 1)) << (8 * hb - head)
    out[:hb] |= np.frombuffer(word.to_bytes(hb, "big"), dtype=np.uint8)
    return out
