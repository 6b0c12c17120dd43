"""Canonical Huffman codes for small alphabets (at most 16 symbols), as compiled kernels.

The quantizers' symbols are skewed (a ternary quantizer sends mostly zeros), and a static
Huffman code per payload gets most of the entropy gain at a fraction of a range coder's
cost: each symbol becomes one prefix-free code word, written by a parallel kernel.

Code (Huffman 1952, canonical form as in DEFLATE, RFC 1951 Sec. 3.2.2): from the symbol
counts, Huffman's algorithm gives code lengths ``L_k`` (0 for an absent symbol); symbols
sorted by ``(L_k, k)`` take consecutive code words, so the ``levels`` lengths in 4 bits each
are the whole table on the wire. With ``levels <= 16`` every length is at most 15. A single
present symbol gets the 1-bit code ``0``. Expected size: ``sum_k count_k L_k`` bits, at most
one bit per symbol above the empirical entropy.

Decoding is serial (a code word's start depends on every earlier one), so it looks up a
12-bit window in a ``2^12``-entry table of the whole code words it starts with (a ternary
code emits ~9 symbols per lookup), and words that do not fit in a ``2^15``-entry table.
"""

from __future__ import annotations

import heapq

import numpy as np
from numba import prange

from gradpress.errors import PayloadError
from gradpress.kernels.jit import compiled, kernel

MAX_SYMBOLS = 16
MAX_LEN = 15
MULTI = 12  # bits of the multi-symbol decoding window
_TILE = 1 << 14


@kernel
def _tile_counts(sym, out):  # pragma: no cover - compiled
    n = sym.size
    for t in prange(out.shape[0]):
        for i in range(t * _TILE, min(n, (t + 1) * _TILE)):
            # four interleaved tables: a run of equal symbols is not one serial chain
            out[t, ((i & 3) << 8) | sym[i]] += 1


def symbol_counts(sym: np.ndarray, levels: int) -> np.ndarray:
    """``np.bincount(sym, minlength=levels)`` of ``uint8`` symbols below ``levels`` (<= 256),
    as a kernel (``np.bincount`` widens every symbol to 64 bits first: ~5x slower)."""
    sym = np.ascontiguousarray(sym, dtype=np.uint8).reshape(-1)
    part = np.zeros((-(-sym.size // _TILE), 1024), dtype=np.int64)
    _tile_counts(sym, part)
    counts = part.sum(axis=0).reshape(4, 256).sum(axis=0)
    if counts[levels:].any():
        raise ValueError(f"symbols must be below {levels}")
    return counts[:levels]


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths (``uint8``) for symbol ``counts``; 0 for absent symbols."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size > MAX_SYMBOLS:
        raise ValueError(f"Huffman codes here take at most {MAX_SYMBOLS} symbols")
    lengths = np.zeros(counts.size, dtype=np.uint8)
    present = [int(k) for k in np.flatnonzero(counts)]
    if len(present) == 1:
        lengths[present[0]] = 1
    if len(present) <= 1:
        return lengths
    # heap of (count, tie-break, symbols in the subtree); merging adds 1 to their lengths
    heap = [(int(counts[k]), k, [k]) for k in present]
    heapq.heapify(heap)
    tie = counts.size
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for k in s1 + s2:
            lengths[k] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code words (``uint32``) for code ``lengths`` (RFC 1951's construction)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.uint32)
    code, prev = 0, 0
    for k in sorted(np.flatnonzero(lengths), key=lambda k: (lengths[k], k)):
        code <<= int(lengths[k]) - prev
        prev = int(lengths[k])
        codes[k] = code
        code += 1
    return codes


def check_lengths(lengths: np.ndarray, n: int) -> None:
    """Reject a code table from the wire that no Huffman encoder writes: lengths over 15,
    an over-full code (Kraft sum above 1), or no symbol for a non-empty body."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and int(lengths.max()) > MAX_LEN:
        raise PayloadError("Huffman table has a code longer than 15 bits")
    if n and not lengths.any():
        raise PayloadError("Huffman table has no symbols")
    kraft = sum(1 << (MAX_LEN - int(x)) for x in lengths if x)
    if kraft > 1 << MAX_LEN:
        raise PayloadError("Huffman table is over-full (not a prefix code)")


@kernel
def _tile_bits(sym, lengths, out):  # pragma: no cover - compiled
    n = sym.size
    for t in prange(out.size):
        acc = 0
        for i in range(t * _TILE, min(n, (t + 1) * _TILE)):
            acc += lengths[sym[i]]
        out[t] = acc


@kernel
def _write(sym, lengths, codes, offsets, parity, out):  # pragma: no cover - compiled
    # Tiles of one parity at a time: neighbours share at most one byte, never concurrently.
    n = sym.size
    half = (offsets.size - 1 + 1 - parity) // 2
    for h in prange(half):
        t = 2 * h + parity
        off = offsets[t]
        bi = off >> 3
        nacc = off & 7
        acc = np.uint64(0)
        for i in range(t * _TILE, min(n, (t + 1) * _TILE)):
            s = sym[i]
            ln = lengths[s]
            acc = (acc << np.uint64(ln)) | np.uint64(codes[s])
            nacc += ln
            while nacc >= 8:
                nacc -= 8
                out[bi] |= np.uint8((acc >> np.uint64(nacc)) & np.uint64(255))
                bi += 1
            acc &= (np.uint64(1) << np.uint64(nacc)) - np.uint64(1)
        if nacc > 0:
            out[bi] |= np.uint8((acc << np.uint64(8 - nacc)) & np.uint64(255))


@compiled
def _multi_table(table_sym, table_len, msym, mcount, mbits):  # pragma: no cover - compiled
    # For each 12-bit window: the whole code words it starts with (up to 12 symbols, 4 bits
    # each in msym), their count and their total length.
    for v in range(1 << MULTI):
        pos = 0
        cnt = 0
        packed = np.uint64(0)
        while cnt < MULTI:
            peek = ((v << pos) & ((1 << MULTI) - 1)) << (MAX_LEN - MULTI)
            ln = table_len[peek]
            if ln == 0 or pos + ln > MULTI:
                break
            packed |= np.uint64(table_sym[peek]) << np.uint64(4 * cnt)
            cnt += 1
            pos += ln
        msym[v] = packed
        mcount[v] = cnt
        mbits[v] = pos


@compiled
def _read(data, total_bits, table_sym, table_len, msym, mcount, mbits,
          out):  # pragma: no cover - compiled
    # Serial, through a 64-bit bit buffer refilled a byte at a time (zeros past the end):
    # a 12-bit window emits every whole code word it holds at once, longer words go through
    # the 15-bit table. Returns the bits consumed, or -1 on an invalid code or a read past
    # the end.
    buf = np.uint64(0)
    nbuf = 0
    bi = 0
    size = data.size
    n = out.size
    i = 0
    while i < n:
        while nbuf <= 48:
            x = np.uint64(data[bi]) if bi < size else np.uint64(0)
            buf = (buf << np.uint64(8)) | x
            bi += 1
            nbuf += 8
        w = (buf >> np.uint64(nbuf - MULTI)) & np.uint64((1 << MULTI) - 1)
        cnt = mcount[w]
        if cnt > 0 and i + cnt <= n:
            packed = msym[w]
            for k in range(cnt):
                out[i + k] = np.uint8((packed >> np.uint64(4 * k)) & np.uint64(15))
            i += cnt
            nbuf -= mbits[w]
            continue
        peek = (buf >> np.uint64(nbuf - MAX_LEN)) & np.uint64((1 << MAX_LEN) - 1)
        ln = table_len[peek]
        if ln == 0:
            return -1
        nbuf -= ln
        out[i] = table_sym[peek]
        i += 1
    pos = 8 * bi - nbuf
    return pos if pos <= total_bits else -1


def encode(sym: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """Packed code words (MSB first, last byte zero-padded) of ``uint8`` symbols ``sym``
    under code ``lengths``, and the exact bit count. Every symbol must have a code."""
    sym = np.ascontiguousarray(sym, dtype=np.uint8).reshape(-1)
    ln = np.asarray(lengths, dtype=np.int64)
    codes = canonical_codes(ln).astype(np.uint64)
    tiles = np.zeros(-(-sym.size // _TILE), dtype=np.int64)
    _tile_bits(sym, ln, tiles)
    offsets = np.concatenate([[0], np.cumsum(tiles)]).astype(np.int64)
    total = int(offsets[-1])
    out = np.zeros((total + 7) // 8, dtype=np.uint8)
    for parity in (0, 1):
        _write(sym, ln, codes, offsets, parity, out)
    return out, total


def decode(data: np.ndarray, n: int, lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """``n`` symbols from packed code words ``data`` under code ``lengths`` (checked with
    :func:`check_lengths` first), and the bits consumed. Raises :class:`PayloadError` on a
    code word no symbol has or when ``data`` ends first."""
    check_lengths(lengths, n)
    ln = np.asarray(lengths, dtype=np.int64)
    codes = canonical_codes(ln)
    table_sym = np.zeros(1 << MAX_LEN, dtype=np.uint8)
    table_len = np.zeros(1 << MAX_LEN, dtype=np.int64)
    for k in np.flatnonzero(ln):
        lo = int(codes[k]) << (MAX_LEN - int(ln[k]))
        hi = (int(codes[k]) + 1) << (MAX_LEN - int(ln[k]))
        table_sym[lo:hi] = k
        table_len[lo:hi] = ln[k]
    msym = np.zeros(1 << MULTI, dtype=np.uint64)
    mcount = np.zeros(1 << MULTI, dtype=np.int64)
    mbits = np.zeros(1 << MULTI, dtype=np.int64)
    _multi_table(table_sym, table_len, msym, mcount, mbits)
    raw = np.asarray(data, dtype=np.uint8).reshape(-1)
    out = np.empty(n, dtype=np.uint8)
    used = int(_read(np.ascontiguousarray(raw), 8 * raw.size, table_sym, table_len,
                      msym, mcount, mbits, out)) if n else 0
    if used < 0:
        raise PayloadError("Huffman body is truncated or holds an invalid code word")
    return out, used
