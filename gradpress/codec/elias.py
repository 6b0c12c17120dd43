"""Elias gamma, delta and omega codes for arrays of positive integers, fully vectorized.

Code lengths (Elias 1975), with ``L = floor(log2 n)``:

* gamma: ``2L + 1`` bits — ``L`` zeros, then ``n`` in ``L+1`` bits;
* delta: ``L + 2*floor(log2(L+1)) + 1`` bits — gamma(``L+1``), then the ``L`` low bits of n;
* omega: ``1 + sum`` of the recursive groups — ``bin(n)`` preceded by omega of
  ``bitlen(n)-1``, down to 1, then a terminating ``0``.

Encoding writes every code word at once from computed offsets. Decoding is a pointer chase
(each code's end is the next one's start); we compute the "next start" of *every* bit
position with array ops and then follow the chain with a square-root decomposition: a
coarse table ``next^(2^m)`` walked ``count/2^m`` times, then ``2^m`` vectorized steps from
all coarse points at once. That is ``O(N log count)`` array work and ``O(sqrt(count))``
interpreter steps, never one per element.
"""

from __future__ import annotations

import numpy as np

from gradpress.errors import PayloadError

_MAX_VALUE_BITS = 63


def bit_length(values: np.ndarray) -> np.ndarray:
    """Vectorized ``int.bit_length`` for non-negative integers (``int64`` result)."""
    v = np.asarray(values, dtype=np.uint64).copy()
    n = np.zeros(v.shape, dtype=np.int64)
    for s in (32, 16, 8, 4, 2, 1):
        hi = (v >> np.uint64(s)) != 0
        n += hi * s
        v = np.where(hi, v >> np.uint64(s), v)
    return n + (v != 0)


def _check_positive(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values)
    if v.size and (v.dtype.kind not in "iu"):
        raise ValueError(f"Elias codes take integers, got dtype {v.dtype}")
    if v.size and int(v.min()) < 1:
        raise ValueError(f"Elias codes take positive integers, got {int(v.min())}")
    return v.astype(np.uint64).reshape(-1)


def _write_fields(total: int, offsets: np.ndarray, values: np.ndarray,
                  widths: np.ndarray) -> np.ndarray:
    """A zero bit array of length ``total`` with ``values[i]`` written MSB-first in
    ``widths[i]`` bits at ``offsets[i]``."""
    out = np.zeros(total, dtype=np.uint8)
    widths = widths.astype(np.int64)
    n = int(widths.sum())
    if n == 0:
        return out
    idx = np.repeat(np.arange(values.size), widths)
    j = np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(widths) - widths, widths)
    shift = (widths[idx] - 1 - j).astype(np.uint64)
    out[np.repeat(offsets.astype(np.int64), widths) + j] = (
        (values[idx] >> shift) & np.uint64(1)).astype(np.uint8)
    return out


def _read_fields(bits: np.ndarray, offsets: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """``uint64`` values of ``widths[i]`` bits at ``offsets[i]`` (MSB first); width 0 -> 0."""
    widths = widths.astype(np.int64)
    out = np.zeros(widths.size, dtype=np.uint64)
    nz = widths > 0
    if not nz.any():
        return out
    w, off = widths[nz], offsets[nz].astype(np.int64)
    n = int(w.sum())
    starts = np.cumsum(w) - w
    j = np.arange(n, dtype=np.int64) - np.repeat(starts, w)
    idx = np.repeat(np.arange(w.size), w)
    contrib = bits[np.repeat(off, w) + j].astype(np.uint64) << (w[idx] - 1 - j).astype(np.uint64)
    out[nz] = np.add.reduceat(contrib, starts)
    return out


def _follow_chain(nxt: np.ndarray, count: int, what: str) -> np.ndarray:
    """Positions ``p_0=0, p_i = nxt[p_{i-1}]`` for ``i < count``.

    ``nxt`` has length ``N+1``; entry ``N`` is the sink (``nxt[N] == N``) and every value is
    clipped to ``N``. A chain that reaches the sink before ``count`` codes is truncated.
    """
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    sink = nxt.size - 1
    m = max(0, (int(np.sqrt(count)) - 1).bit_length())  # 2^m ~ sqrt(count)
    jump = nxt
    for _ in range(m):
        jump = jump[jump]
    n_coarse = -(-count // (1 << m))
    coarse = np.empty(n_coarse, dtype=np.int64)
    p = 0
    for i in range(n_coarse):
        coarse[i] = p
        p = int(jump[p])
    fine = np.empty((1 << m, n_coarse), dtype=np.int64)
    cur = coarse
    for k in range(1 << m):
        fine[k] = cur
        cur = nxt[cur]
    starts = fine.T.reshape(-1)[:count]
    if starts[-1] >= sink:
        raise PayloadError(f"{what} stream truncated: fewer than {count} codes")
    return starts


def _first_one_at_or_after(bits: np.ndarray) -> np.ndarray:
    """For each position p (and p = N), the index of the first 1 at or after p, else N."""
    n = bits.size
    ones = np.flatnonzero(bits)
    ones = np.append(ones, n)
    return ones[np.searchsorted(ones, np.arange(n + 1), side="left")]


def gamma_lengths(values: np.ndarray) -> np.ndarray:
    """Bits of each gamma code word: ``2*floor(log2 n) + 1``."""
    return 2 * bit_length(_check_positive(values)) - 1


def gamma_encode(values: np.ndarray) -> np.ndarray:
    """Gamma code words of positive integers, concatenated, as a 0/1 ``uint8`` array."""
    v = _check_positive(values)
    bl = bit_length(v)
    lens = 2 * bl - 1
    starts = np.cumsum(lens) - lens
    return _write_fields(int(lens.sum()), starts + bl - 1, v, bl)


def gamma_decode(bits: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """Decode ``count`` gamma codes from the start of ``bits``; return (values, bits used)."""
    bits = np.asarray(bits, dtype=np.uint8)
    n = bits.size
    z = _first_one_at_or_after(bits)
    pos = np.arange(n + 1, dtype=np.int64)
    nxt = np.minimum(2 * z - pos + 1, n)
    nxt[n] = n
    starts = _follow_chain(nxt, count, "Elias gamma")
    if count == 0:
        return np.zeros(0, dtype=np.uint64), 0
    L = z[starts] - starts
    if L.max() > _MAX_VALUE_BITS:
        raise PayloadError("Elias gamma code longer than 64 bits: corrupted stream")
    end = int(z[starts[-1]] * 2 - starts[-1] + 1)
    if end > n:
        raise PayloadError("Elias gamma stream truncated inside the last code")
    return _read_fields(bits, z[starts], L + 1), end


def delta_lengths(values: np.ndarray) -> np.ndarray:
    """Bits of each delta code word: ``L + 2*floor(log2(L+1)) + 1`` with ``L = floor(log2 n)``."""
    L = bit_length(_check_positive(values)) - 1
    return L + 2 * bit_length(L + 1) - 1


def delta_encode(values: np.ndarray) -> np.ndarray:
    """Delta code words of positive integers, concatenated, as a 0/1 ``uint8`` array."""
    v = _check_positive(values)
    L = bit_length(v) - 1
    g = (L + 1).astype(np.uint64)
    gbl = bit_length(g)
    glen = 2 * gbl - 1
    lens = glen + L
    starts = np.cumsum(lens) - lens
    total = int(lens.sum())
    head = _write_fields(total, starts + gbl - 1, g, gbl)
    low = v & ((np.uint64(1) << L.astype(np.uint64)) - np.uint64(1))
    tail = _write_fields(total, starts + glen, low, L)
    return head | tail


def delta_decode(bits: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """Decode ``count`` delta codes from the start of ``bits``; return (values, bits used)."""
    bits = np.asarray(bits, dtype=np.uint8)
    n = bits.size
    if count == 0:
        return np.zeros(0, dtype=np.uint64), 0
    z = _first_one_at_or_after(bits)
    pos = np.arange(n + 1, dtype=np.int64)
    lg = np.minimum(z - pos, 7)  # gamma part encodes L+1 <= 64, so at most 6 leading zeros
    # 7-bit window at each position (zero past the end) gives the gamma value cheaply.
    padded = np.concatenate([bits, np.zeros(8, dtype=np.uint8)]).astype(np.int64)
    win = np.zeros(n + 1, dtype=np.int64)
    for j in range(7):
        win = (win << 1) | padded[j:j + n + 1]
    zc = np.minimum(z, n)
    g = win[zc] >> np.maximum(6 - lg, 0)
    nxt = zc + lg + 1 + (g - 1)  # gamma part ends at z+lg+1, then L = g-1 bits
    bad = (lg > 6) | (z >= n)
    nxt = np.where(bad, n, np.minimum(nxt, n))
    nxt[n] = n
    starts = _follow_chain(nxt, count, "Elias delta")
    if bad[starts].any():
        raise PayloadError("Elias delta stream corrupted: bad length prefix")
    L = g[starts] - 1
    tail_at = zc[starts] + lg[starts] + 1
    end = int(tail_at[-1] + L[-1])
    if end > n:
        raise PayloadError("Elias delta stream truncated inside the last code")
    low = _read_fields(bits, tail_at, L)
    return (np.uint64(1) << L.astype(np.uint64)) | low, end


def _omega_groups(v: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per recursion level: group values and widths (0 where the recursion has ended)."""
    vals, widths = [], []
    cur = v.copy()
    while True:
        active = cur > 1
        if not active.any():
            break
        bl = bit_length(cur)
        vals.append(np.where(active, cur, 0).astype(np.uint64))
        widths.append(np.where(active, bl, 0))
        cur = np.where(active, (bl - 1).astype(np.uint64), np.uint64(1))
    return vals, widths


def omega_lengths(values: np.ndarray) -> np.ndarray:
    """Bits of each omega code word."""
    v = _check_positive(values)
    _, widths = _omega_groups(v)
    return 1 + sum(widths, np.zeros(v.size, dtype=np.int64))


def omega_encode(values: np.ndarray) -> np.ndarray:
    """Omega code words of positive integers, concatenated, as a 0/1 ``uint8`` array."""
    v = _check_positive(values)
    vals, widths = _omega_groups(v)
    lens = 1 + sum(widths, np.zeros(v.size, dtype=np.int64))
    starts = np.cumsum(lens) - lens
    total = int(np.sum(lens))
    out = np.zeros(total, dtype=np.uint8)
    offset = starts.copy()
    for val, w in zip(reversed(vals), reversed(widths)):  # deepest group first
        out |= _write_fields(total, offset, val, w)
        offset = offset + w
    return out


def omega_decode(bits: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """Decode ``count`` omega codes from the start of ``bits``; return (values, bits used)."""
    bits = np.asarray(bits, dtype=np.uint8)
    n = bits.size
    if count == 0:
        return np.zeros(0, dtype=np.uint64), 0

    def run(start: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = start.astype(np.int64).copy()
        val = np.ones(p.size, dtype=np.uint64)
        done = np.zeros(p.size, dtype=bool)
        bad = np.zeros(p.size, dtype=bool)
        for _ in range(8):  # values < 2^64 need at most 6 groups
            live = ~done & ~bad
            if not live.any():
                break
            past = live & (p >= n)
            bad |= past
            live &= ~past
            stop = live & (bits[np.minimum(p, n - 1)] == 0)
            done |= stop
            p[stop] += 1
            grow = live & ~stop
            gi = np.flatnonzero(grow)
            too_wide = val[gi] >= np.uint64(_MAX_VALUE_BITS)
            w = np.where(too_wide, 0, val[gi].astype(np.int64)) + 1
            over = too_wide | (p[gi] + w > n)
            bad[gi[over]] = True
            gi, w = gi[~over], w[~over]
            val[gi] = _read_fields(bits, p[gi], w)
            p[gi] += w
        bad |= ~done
        return np.where(bad, n, p), val, bad

    nxt, _, _ = run(np.arange(n + 1))
    nxt[n] = n
    starts = _follow_chain(nxt, count, "Elias omega")
    end_pos, vals, bad = run(starts)
    if bad.any():
        raise PayloadError("Elias omega stream corrupted or truncated")
    return vals, int(end_pos[-1])
