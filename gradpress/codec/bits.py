"""Vectorized bit I/O over numpy ``uint8``: fixed-width packing, bit writer and reader.

Bits are MSB-first within a byte and within a code word, the order ``np.packbits`` uses.
A fixed-width field of ``n`` values of ``w`` bits costs exactly ``n*w`` bits; a stream is
padded to a whole byte only once, at the end (``BitWriter.getvalue``).

Nothing here loops over elements in Python: values become an ``(n, w)`` bit matrix with
shifts and masks, and ``np.packbits``/``np.unpackbits`` do the rest; fixed widths 1..8 go
through the compiled kernels of :mod:`gradpress.codec.packing`. Widths 8, 16 and 32 at a byte
boundary take a direct byte-copy path.
"""

from __future__ import annotations

import numpy as np

from gradpress.codec import elias
from gradpress.codec.packing import pack_uint8, unpack_uint8
from gradpress.errors import PayloadError

_BYTE_WIDTHS = {8: ">u1", 16: ">u2", 32: ">u4"}
#: Longest Elias gamma/delta/omega code word of a value below 2^64 (gamma: 2*63+1 bits).
_MAX_ELIAS_BITS = 129


def uint_to_bits(values: np.ndarray, width: int) -> np.ndarray:
    """Return the ``len(values)*width`` bits (0/1 ``uint8``) of ``values``, MSB first."""
    if not 1 <= width <= 64:
        raise ValueError(f"width must be in 1..64, got {width}")
    v = np.ascontiguousarray(values, dtype=np.uint64).reshape(-1)
    if width < 64 and v.size and int(v.max()) >> width:
        raise ValueError(f"value {int(v.max())} does not fit in {width} bits")
    if width <= 8:
        # Shift in uint8: 8x less memory traffic than the generic uint64 path.
        v8 = v.astype(np.uint8)
        shifts = np.arange(width - 1, -1, -1, dtype=np.uint8)
        return ((v8[:, None] >> shifts) & 1).reshape(-1)
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    return ((v[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(-1)


def bits_to_uint(bits: np.ndarray, width: int) -> np.ndarray:
    """Inverse of :func:`uint_to_bits`: ``uint64`` values from ``n*width`` bits."""
    if bits.size % width:
        raise ValueError(f"{bits.size} bits is not a multiple of width {width}")
    m = bits.reshape(-1, width)
    if width <= 8:
        weights = (1 << np.arange(width - 1, -1, -1)).astype(np.uint8)
        return (m * weights).sum(axis=1, dtype=np.uint64)
    weights = np.uint64(1) << np.arange(width - 1, -1, -1, dtype=np.uint64)
    return (m.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)


def width_for(max_value: int) -> int:
    """Smallest width (>= 1) whose fields hold ``max_value``."""
    return max(1, int(max_value).bit_length())


class BitWriter:
    """Append-only bit stream. Fields are written MSB first; ``getvalue`` pads to a byte.

    Chunks are kept as unpacked bits until a byte-aligned raw write (or the end) packs
    them, so writers never touch individual bits in Python.
    """

    def __init__(self) -> None:
        self._packed: list[bytes] = []
        self._bits: list[np.ndarray] = []
        self._nbits_pending = 0
        self.nbits = 0

    def _flush_aligned(self) -> None:
        if self._bits:
            self._packed.append(np.packbits(np.concatenate(self._bits)).tobytes())
            self._bits = []
            self._nbits_pending = 0

    def write_bits(self, bits: np.ndarray) -> None:
        """Append raw bits (any integer array of 0/1)."""
        b = np.asarray(bits, dtype=np.uint8).reshape(-1)
        self._bits.append(b)
        self._nbits_pending += b.size
        self.nbits += b.size

    def write_bytes(self, data: bytes | np.ndarray) -> None:
        """Append whole bytes; a direct copy when the stream sits at a byte boundary."""
        raw = np.frombuffer(bytes(data), dtype=np.uint8) if isinstance(data, bytes) else (
            np.ascontiguousarray(data).view(np.uint8).reshape(-1))
        if self.nbits % 8 == 0:
            self._flush_aligned()
            self._packed.append(raw.tobytes())
            self.nbits += 8 * raw.size
        else:
            self.write_bits(np.unpackbits(raw))

    def write_uint(self, values: np.ndarray | int, width: int) -> None:
        """Append each value as an unsigned ``width``-bit field."""
        v = np.asarray(values).reshape(-1)
        if width in _BYTE_WIDTHS and self.nbits % 8 == 0:
            if v.size and (int(v.max()) >> width or int(v.min()) < 0):
                raise ValueError(f"value does not fit in {width} bits")
            self.write_bytes(v.astype(_BYTE_WIDTHS[width]))
        elif width < 8 and self.nbits % 8 == 0 and v.size >= 8:
            # Fast path: pack straight to bytes (no 8x unpacked bit matrix).
            if int(v.max()) >> width or (v.dtype.kind == "i" and int(v.min()) < 0):
                raise ValueError(f"value does not fit in {width} bits")
            packed = pack_uint8(v, width)
            whole, rest = divmod(v.size * width, 8)
            self.write_bytes(packed[:whole])
            if rest:
                self.write_bits(np.unpackbits(packed[whole:whole + 1])[:rest])
        else:
            self.write_bits(uint_to_bits(v, width))

    def write_float32(self, values: np.ndarray | float) -> None:
        """Append IEEE float32 values (32 bits each, big-endian)."""
        self.write_bytes(np.asarray(values, dtype=">f4").reshape(-1))

    def write_float16(self, values: np.ndarray | float) -> None:
        """Append IEEE float16 values (16 bits each, big-endian)."""
        self.write_bytes(np.asarray(values, dtype=">f2").reshape(-1))

    def write_gamma(self, values: np.ndarray) -> None:
        """Append Elias gamma codes of positive integers."""
        self.write_bits(elias.gamma_encode(values))

    def write_delta(self, values: np.ndarray) -> None:
        """Append Elias delta codes of positive integers."""
        self.write_bits(elias.delta_encode(values))

    def write_omega(self, values: np.ndarray) -> None:
        """Append Elias omega codes of positive integers."""
        self.write_bits(elias.omega_encode(values))

    def align(self) -> None:
        """Pad with zero bits to the next byte boundary."""
        if self.nbits % 8:
            self.write_bits(np.zeros(8 - self.nbits % 8, dtype=np.uint8))

    def getvalue(self) -> bytes:
        self.align()
        self._flush_aligned()
        return b"".join(self._packed)


class BitReader:
    """Reads fields written by :class:`BitWriter`; raises ``PayloadError`` past the end."""

    def __init__(self, data: bytes) -> None:
        self._data = np.frombuffer(bytes(data), dtype=np.uint8)
        self.pos = 0  # in bits
        self.total = 8 * self._data.size
        self._unpacked: np.ndarray | None = None

    @property
    def remaining(self) -> int:
        return self.total - self.pos

    def align(self) -> None:
        """Skip to the next byte boundary over zero padding (non-zero padding is corrupt)."""
        pad = -self.pos % 8
        if pad and self.read_bits(pad).any():
            raise PayloadError("payload has non-zero padding bits")

    def _need(self, nbits: int, what: str) -> None:
        if nbits < 0 or self.pos + nbits > self.total:
            raise PayloadError(f"payload truncated while reading {what}: need {nbits} bits at "
                               f"bit {self.pos}, only {self.total - self.pos} remain")

    def bits_view(self) -> np.ndarray:
        """All remaining bits, unpacked (cached); used by the variable-length decoders."""
        if self._unpacked is None:
            self._unpacked = np.unpackbits(self._data)
        return self._unpacked[self.pos:]

    def read_bits(self, n: int) -> np.ndarray:
        self._need(n, "bits")
        if self._unpacked is not None:
            out = self._unpacked[self.pos:self.pos + n]
        else:
            start, stop = self.pos // 8, (self.pos + n + 7) // 8
            off = self.pos - 8 * start
            out = np.unpackbits(self._data[start:stop])[off:off + n]
        self.pos += n
        return out

    def skip(self, n: int) -> None:
        self._need(n, "bits")
        self.pos += n

    def read_bytes(self, n: int) -> np.ndarray:
        """``n`` whole bytes; zero-copy when aligned."""
        self._need(8 * n, "bytes")
        if self.pos % 8 == 0:
            out = self._data[self.pos // 8:self.pos // 8 + n]
            self.pos += 8 * n
            return out
        return np.packbits(self.read_bits(8 * n))

    def read_uint(self, n: int, width: int) -> np.ndarray:
        """``n`` unsigned ``width``-bit fields as ``uint64`` (or the narrow dtype when aligned)."""
        if n < 0:
            raise PayloadError(f"negative field count {n}")
        self._need(n * width, f"{n} fields of {width} bits")
        if width in _BYTE_WIDTHS and self.pos % 8 == 0:
            return self.read_bytes(n * width // 8).view(_BYTE_WIDTHS[width])
        if width < 8 and self.pos % 8 == 0 and n >= 8:
            return self.read_uint8(n, width).astype(np.uint64)
        return bits_to_uint(self.read_bits(n * width), width)

    def read_uint8(self, n: int, width: int) -> np.ndarray:
        """``n`` unsigned fields of ``width <= 8`` bits as ``uint8`` (fast when aligned)."""
        if n < 0 or not 1 <= width <= 8:
            raise PayloadError(f"bad uint8 field request: {n} fields of {width} bits")
        self._need(n * width, f"{n} fields of {width} bits")
        if self.pos % 8:
            return bits_to_uint(self.read_bits(n * width), width).astype(np.uint8)
        start = self.pos // 8
        out = unpack_uint8(self._data[start:start + (n * width + 7) // 8], n, width)
        self.pos += n * width
        return out

    def read_float32(self, n: int = 1) -> np.ndarray:
        return self.read_bytes(4 * n).view(">f4").astype(np.float32)

    def read_float16(self, n: int = 1) -> np.ndarray:
        return self.read_bytes(2 * n).view(">f2").astype(np.float16)

    def _read_elias(self, decode, n: int) -> np.ndarray:
        if n < 0 or n > self.remaining:  # every code word has at least one bit
            raise PayloadError(f"cannot read {n} Elias codes from {self.remaining} bits")
        # A code word of a value < 2^64 spans at most _MAX_ELIAS_BITS bits, so the decoder
        # only needs that window: reading a few counts before a long stream stays O(n).
        span = min(self.remaining, _MAX_ELIAS_BITS * n)
        if self._unpacked is not None:
            window = self._unpacked[self.pos:self.pos + span]
        else:
            start = self.pos // 8
            off = self.pos - 8 * start
            window = np.unpackbits(self._data[start:(self.pos + span + 7) // 8])[off:off + span]
        values, used = decode(window, n)
        self.pos += used
        return values

    def read_gamma(self, n: int) -> np.ndarray:
        return self._read_elias(elias.gamma_decode, n)

    def read_delta(self, n: int) -> np.ndarray:
        return self._read_elias(elias.delta_decode, n)

    def read_omega(self, n: int) -> np.ndarray:
        return self._read_elias(elias.omega_decode, n)

    def expect_end(self) -> None:
        """Only zero padding (< 8 bits) may remain; anything else means extended bytes."""
        rest = self.total - self.pos
        if rest >= 8:
            raise PayloadError(f"payload body extended: {rest} unread bits after the last field")
        if rest and self.read_bits(rest).any():
            raise PayloadError("payload body has non-zero padding bits")
