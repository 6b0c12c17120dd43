"""The gradpress wire format: a small fixed header and the compressor's body bytes.

Layout (little-endian, all sizes in bytes)::

    magic     2   b"GP"
    version   1   FORMAT_VERSION
    flags     1   bit 0: CRC32 present, bit 1: seed present
    comp_id   2   compressor id (see ``gradpress.compressors``)
    config    2   digest of the compressor's ``config()`` (:func:`config_digest`)
    dtype     1   0=float32 1=float16 2=bfloat16 3=float64
    ndim      1   number of dimensions (0..8)
    shape     4*ndim  each dimension, uint32
    body_len  4   uint32
    seed      8   uint64, only with flag bit 1 (shared randomness)
    crc32     4   CRC32 of header-so-far + body, only with flag bit 0
    body      body_len

Header size is ``14 + 4*ndim`` bytes, plus 8 with a seed and 4 with a CRC. Every size
gradpress reports is ``len(payload.to_bytes())``.

Version 2 added the 2-byte config digest (version 1 had none): the decoding parameters
(levels, bucket size, norm, mode, ...) travel with the payload, so a decoder configured
differently from the encoder raises :class:`PayloadError` instead of silently decoding
garbage. The digest also covers the shape, so a header whose shape lies is caught even
where the body cannot show it. Two different configs (or shapes) of one compressor share
a digest with probability about 2^-16 (1.5e-5: a 2-byte BLAKE2s, whose output bits are
uniform for any inputs, structured or not); the compressor id is checked separately, so
e.g. top-k against rand-k never relies on the digest. Decoding cost: one 8-us hash.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from gradpress.errors import PayloadError

MAGIC = b"GP"
FORMAT_VERSION = 2
MAX_NDIM = 8
#: Largest element count a header may declare (2^31, 8 GiB of float32): a larger claim is
#: rejected before anything is allocated.
MAX_NUMEL = 1 << 31

_FLAG_CRC = 1
_FLAG_SEED = 2

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


#: Header bytes before the shape: magic, version, flags, comp_id, config digest, dtype, ndim.
_FIXED = 10


def header_size(ndim: int, *, seed: bool = False, crc: bool = False) -> int:
    """Bytes of header for a tensor of ``ndim`` dimensions."""
    return _FIXED + 4 + 4 * ndim + (8 if seed else 0) + (4 if crc else 0)


@dataclass(frozen=True)
class Payload:
    """One compressed tensor: what travels on the wire.

    ``body`` is the compressor's own bit stream; ``seed`` is set only by compressors
    whose decoder needs the encoder's shared randomness.
    """

    compressor_id: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    body: bytes
    seed: int | None = None
    crc: bool = False
    #: 16-bit digest of the encoder's ``config()`` (:func:`config_digest`).
    config_digest: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def __len__(self) -> int:
        """Size in bytes of the serialized payload (the only size gradpress reports)."""
        return header_size(len(self.shape), seed=self.seed is not None, crc=self.crc) + len(
            self.body
        )

    @property
    def nbits(self) -> int:
        return 8 * len(self)

    def to_bytes(self) -> bytes:
        if self.dtype not in DTYPE_CODES:
            raise PayloadError(f"dtype {self.dtype} cannot be serialized; use float32/16/bf16/64")
        if len(self.shape) > MAX_NDIM:
            raise PayloadError(f"at most {MAX_NDIM} dimensions, got {len(self.shape)}")
        flags = (_FLAG_CRC if self.crc else 0) | (_FLAG_SEED if self.seed is not None else 0)
        head = bytearray(MAGIC)
        head += struct.pack(
            "<BBHHBB", FORMAT_VERSION, flags, self.compressor_id,
            self.config_digest & 0xFFFF, DTYPE_CODES[self.dtype], len(self.shape),
        )
        head += struct.pack(f"<{len(self.shape)}I", *self.shape)
        head += struct.pack("<I", len(self.body))
        if self.seed is not None:
            head += struct.pack("<Q", self.seed & 0xFFFFFFFFFFFFFFFF)
        if self.crc:
            head += struct.pack("<I", zlib.crc32(self.body, zlib.crc32(bytes(head))))
        return bytes(head) + bytes(self.body)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Payload:
        """Parse bytes; raise :class:`PayloadError` on anything malformed."""
        data = bytes(data)
        head = read_header(data)
        if len(data) != head.size:
            kind = "truncated" if len(data) < head.size else "extended"
            raise PayloadError(f"payload {kind}: header declares {head.size} bytes, "
                               f"got {len(data)}")
        body = data[head.header_size:]
        if head.crc:
            pos = head.header_size - 4
            (crc,) = struct.unpack_from("<I", data, pos)
            if zlib.crc32(body, zlib.crc32(data[:pos])) != crc:
                raise PayloadError("payload CRC32 mismatch: the bytes were corrupted in transit")
        return cls(head.compressor_id, head.dtype, head.shape, body, head.seed, head.crc,
                   head.config_digest)


@dataclass(frozen=True)
class PayloadHeader:
    """The header fields of a payload, read without touching (or copying) its body.

    ``size`` is the whole payload's length the header declares (``header_size + body_len``);
    a receiver compares it, the shape and the dtype with what it expects before it decodes
    anything, so a hostile header never makes it allocate more than it planned to.
    """

    compressor_id: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    body_len: int
    seed: int | None
    crc: bool
    header_size: int
    config_digest: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def size(self) -> int:
        return self.header_size + self.body_len


def read_header(data: bytes | bytearray | memoryview) -> PayloadHeader:
    """Parse only the header of ``data`` (no body copy, no CRC check: that needs the body).

    Raises :class:`PayloadError` for a short, foreign or malformed header, or one declaring
    more than :data:`MAX_NUMEL` elements. It does not check that ``data`` holds the whole
    body: compare :attr:`PayloadHeader.size` with ``len(data)`` (``Payload.from_bytes``
    does).
    """
    view = memoryview(data).cast("B")
    if len(view) < header_size(0):
        raise PayloadError(f"payload truncated: {len(view)} bytes, header needs at least "
                           f"{header_size(0)}")
    if bytes(view[:2]) != MAGIC:
        raise PayloadError(f"bad magic {bytes(view[:2])!r}: not a gradpress payload")
    version, flags, comp_id, digest, dcode, ndim = struct.unpack_from("<BBHHBB", view, 2)
    if version != FORMAT_VERSION:
        raise PayloadError(f"payload format version {version}, this gradpress reads "
                           f"{FORMAT_VERSION}")
    if flags & ~(_FLAG_CRC | _FLAG_SEED):
        raise PayloadError(f"unknown header flags 0x{flags:02x}")
    if dcode not in CODE_DTYPES:
        raise PayloadError(f"unknown dtype code {dcode}")
    if ndim > MAX_NDIM:
        raise PayloadError(f"header declares {ndim} dimensions, at most {MAX_NDIM}")
    has_seed, has_crc = bool(flags & _FLAG_SEED), bool(flags & _FLAG_CRC)
    hsize = header_size(ndim, seed=has_seed, crc=has_crc)
    if len(view) < hsize:
        raise PayloadError(f"payload truncated: {len(view)} bytes, header needs {hsize}")
    pos = _FIXED
    shape = struct.unpack_from(f"<{ndim}I", view, pos)
    pos += 4 * ndim
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise PayloadError(f"header declares {numel} elements, more than the limit "
                           f"{MAX_NUMEL}")
    (body_len,) = struct.unpack_from("<I", view, pos)
    pos += 4
    seed = None
    if has_seed:
        (seed,) = struct.unpack_from("<Q", view, pos)
    return PayloadHeader(comp_id, CODE_DTYPES[dcode], tuple(shape), body_len, seed, has_crc,
                         hsize, digest)


def config_digest(name: str, config: dict[str, Any], shape: tuple[int, ...]) -> int:
    """16-bit digest of a compressor's name, its ``config()`` and the tensor's shape: a
    2-byte BLAKE2s of ``name(k1=v1, k2=v2, ...)`` (keys sorted, values as ``repr``) followed
    by the shape as uint32s. (Not a truncated CRC32: CRCs are linear, so configs that differ
    in a few bits collide far above 2^-16; a test measures the rate.) Binding the shape
    makes a header whose shape field was altered fail the check even where the body alone
    cannot tell (a sparse code whose last nonzero index fits under both shapes)."""
    text = f"{name}(" + ", ".join(f"{k}={config[k]!r}" for k in sorted(config)) + ")"
    h = hashlib.blake2s(text.encode(), digest_size=2)
    h.update(struct.pack(f"<{len(shape)}I", *shape))
    return int.from_bytes(h.digest(), "little")


def write_header_into(buf: memoryview, compressor_id: int, dtype: torch.dtype,
                      shape: tuple[int, ...], body_len: int, *, seed: int | None = None,
                      crc: bool = False, digest: int = 0) -> int:
    """Write the header of a payload into ``buf`` (a writable byte view) without allocating
    ``bytes``; returns its size. With ``crc`` the CRC32 field is left for
    :func:`finish_crc_into` to fill once the body follows the header."""
    if dtype not in DTYPE_CODES:
        raise PayloadError(f"dtype {dtype} cannot be serialized; use float32/16/bf16/64")
    if len(shape) > MAX_NDIM:
        raise PayloadError(f"at most {MAX_NDIM} dimensions, got {len(shape)}")
    flags = (_FLAG_CRC if crc else 0) | (_FLAG_SEED if seed is not None else 0)
    buf[:2] = MAGIC
    struct.pack_into("<BBHHBB", buf, 2, FORMAT_VERSION, flags, compressor_id,
                     digest & 0xFFFF, DTYPE_CODES[dtype], len(shape))
    pos = _FIXED
    for n in shape:
        struct.pack_into("<I", buf, pos, n)
        pos += 4
    struct.pack_into("<I", buf, pos, body_len)
    pos += 4
    if seed is not None:
        struct.pack_into("<Q", buf, pos, seed & 0xFFFFFFFFFFFFFFFF)
        pos += 8
    return pos + (4 if crc else 0)


def finish_crc_into(buf: memoryview, header_len: int, body_len: int) -> None:
    """Fill the CRC32 field (the header's last 4 bytes) of the payload in ``buf``: the same
    ``crc32(header-so-far + body)`` as :meth:`Payload.to_bytes`."""
    pos = header_len - 4
    crc = zlib.crc32(buf[header_len:header_len + body_len], zlib.crc32(buf[:pos]))
    struct.pack_into("<I", buf, pos, crc)


class PayloadView:
    """A serialized payload (header + body, the bytes :meth:`Payload.to_bytes` would give)
    living in a caller's reusable ``uint8`` buffer: ``len()`` is its size in bytes,
    :meth:`to_bytes` copies it out only where real ``bytes`` are needed. Valid until the
    buffer is written again."""

    __slots__ = ("array", "nbytes")

    def __init__(self, array, nbytes: int) -> None:
        self.array = array  #: the ``uint8`` numpy view of the payload's bytes
        self.nbytes = int(nbytes)

    def __len__(self) -> int:
        return self.nbytes

    def to_bytes(self) -> bytes:
        return self.array.tobytes()

    def to_payload(self) -> Payload:
        """Parsed (copies the body; for tests and slow paths)."""
        return Payload.from_bytes(self.array)
