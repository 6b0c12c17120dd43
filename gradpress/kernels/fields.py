"""Variable-length bit fields: Elias gamma words in split-stream layout, packed and read
by vectorized numpy.

Split-stream Elias codes. An Elias gamma word of ``n`` (``L = floor(log2 n)``) is ``L``
zeros, a one, then the ``L`` low bits of ``n``: ``2L + 1`` bits. We write the unary parts of
all words first, then all the low-bit parts. Every word keeps its length, so a stream costs
exactly the textbook ``sum(2L_i + 1)`` bits, but decoding is vectorized: the unary lengths are
the gaps between ones, and the low parts sit at offsets given by a cumulative sum.
"""

from __future__ import annotations

import numpy as np

from gradpress.errors import PayloadError

#: Longest field the window reader handles (a value's bits plus its offset fit 64 bits).
MAX_FIELD = 57

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
