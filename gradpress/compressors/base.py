"""The compressor contract: an encoder to real bytes and a decoder from those bytes alone.

Every compressor ``C`` is a pair (encode, decode) in the sense of Albasyoni et al. 2020,
"Optimal Gradient Compression for Distributed and Federated Learning", Sec. 2: the encoder
maps ``x in R^d`` to a finite bit string, the decoder maps it back to ``C(x)``. Classes of
operators we declare (and test):

* unbiased ``U(omega)``: ``E[C(x)] = x`` and ``E||C(x) - x||^2 <= omega ||x||^2``;
* contractive ``B(alpha)``: ``||C(x) - x||^2 <= (1 - alpha) ||x||^2`` (deterministic or in
  expectation, see ``contractive_in_expectation``).

Subclasses implement ``_encode(flat, gen) -> bytes`` on a flat float32 tensor and
``_decode(body, numel, seed, device) -> flat float32 tensor``; the base class does input
checks, dtype/shape bookkeeping and the :class:`~gradpress.payload.Payload` header.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from gradpress.errors import NonFiniteGradientError, PayloadError
from gradpress.payload import (
    DTYPE_CODES,
    Payload,
    PayloadHeader,
    PayloadView,
    config_digest,
    header_size,
    read_header,
)

#: What ``decode_into`` reads: a parsed payload, its bytes, or a uint8 array/tensor view.
PayloadLike = Payload | PayloadView | bytes | bytearray | memoryview | np.ndarray | torch.Tensor


def body_of(payload: PayloadLike) -> np.ndarray:
    """The serialized payload as a ``uint8`` numpy view (no copy)."""
    if isinstance(payload, PayloadView):
        return payload.array
    if isinstance(payload, torch.Tensor):
        if payload.dtype != torch.uint8 or payload.device.type != "cpu":
            raise ValueError("a payload tensor must be uint8 on the CPU")
        return payload.reshape(-1).numpy()
    if isinstance(payload, np.ndarray):
        return payload.reshape(-1).view(np.uint8)
    return np.frombuffer(payload, dtype=np.uint8)


def _parse(payload: PayloadLike) -> tuple[Payload | PayloadHeader, np.ndarray]:
    """Header and body view of ``payload``, length and CRC checked (no body copy)."""
    if isinstance(payload, Payload):
        return payload, np.frombuffer(payload.body, dtype=np.uint8)
    data = body_of(payload)
    head = read_header(data)
    if data.size != head.size:
        kind = "truncated" if data.size < head.size else "extended"
        raise PayloadError(f"payload {kind}: header declares {head.size} bytes, "
                           f"got {data.size}")
    body = data[head.header_size:]
    if head.crc:
        pos = head.header_size - 4
        want = int(data[pos:pos + 4].view("<u4")[0])
        if zlib.crc32(body, zlib.crc32(data[:pos])) != want:
            raise PayloadError("payload CRC32 mismatch: the bytes were corrupted in transit")
    return head, body

FLOAT_DTYPES = tuple(DTYPE_CODES)


def check_gradient(x: torch.Tensor, what: str = "gradient") -> torch.Tensor:
    """Validate ``x`` and return it flat as float32 on its own device (never mutates ``x``).

    Raises ``TypeError``/``ValueError`` for non-tensors and non-float dtypes, and
    :class:`NonFiniteGradientError` for NaN/Inf entries.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what} has dtype {x.dtype}; gradpress compresses "
                         f"float32, float16, bfloat16 and float64 tensors")
    if x.is_sparse or x.is_complex():
        raise ValueError(f"{what} must be a dense real tensor")
    flat = x.detach().reshape(-1)
    # One reduction pass (NaN propagates through min/max) instead of a bool temporary:
    # isfinite(flat).all() costs 3-4x a clone of flat on CPU.
    if flat.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(flat))).all()):
        n_bad = int((~torch.isfinite(flat)).sum())
        raise NonFiniteGradientError(
            f"{what} has {n_bad} non-finite (NaN/Inf) entries of {flat.numel()}; "
            "fix the loss or clip, or use on_nonfinite='skip' in the DDP hook")
    return flat.float()


def check_decoded(flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reject non-finite decoded values (corrupt bytes) and saturate values beyond the range
    of a narrow output dtype (e.g. a QSGD level equal to a fp16 tensor's norm > 65504), so
    a decoder never hands the caller NaN or Inf."""
    lo, hi = torch.aminmax(flat)
    if not bool(torch.isfinite(torch.stack([lo, hi])).all()):
        raise PayloadError("payload decodes to non-finite values: corrupted bytes")
    big = torch.finfo(dtype).max
    if float(hi) > big or float(lo) < -big:
        return flat.clamp(-big, big)
    return flat


def generator_for(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded with ``seed`` on ``device`` (the per-call randomness)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)
    return g


class Compressor(ABC):
    """Base class: ``encode(x, seed=...) -> Payload`` and ``decode(payload) -> Tensor``.

    Class attributes every compressor declares:

    * ``name``: registry name (``gradpress.get(name, **kwargs)``);
    * ``compressor_id``: the 16-bit id written in the payload header;
    * ``unbiased``: whether ``E[C(x)] = x``;
    * ``shared_randomness``: whether the decoder needs the encoder's seed (then the seed
      travels in the header and counts in the bits).
    """

    name: ClassVar[str]
    compressor_id: ClassVar[int]
    unbiased: ClassVar[bool] = False
    shared_randomness: ClassVar[bool] = False
    #: ``True`` where the contraction ``||C(x)-x||^2 <= (1-alpha)||x||^2`` holds only in
    #: expectation (randomized biased schemes).
    contractive_in_expectation: ClassVar[bool] = False
    #: Relative tolerance of ``expected_bits`` against measured ``8*len(payload)`` on a
    #: Gaussian vector (0 = exact up to the final byte's padding, for fixed-length codes).
    bits_rtol: ClassVar[float] = 0.0

    # -- the contract -------------------------------------------------------------------
    def encode(self, x: torch.Tensor, *, seed: int = 0) -> Payload:
        """Compress ``x`` into a :class:`Payload`; ``x`` is never modified."""
        flat = check_gradient(x)
        body = b""
        if flat.numel():
            gen = generator_for(seed, flat.device)
            body = self._encode(flat, gen, seed)
        return Payload(self.compressor_id, x.dtype, tuple(x.shape), body,
                       seed=seed if self.shared_randomness else None,
                       config_digest=self.config_digest(tuple(x.shape)))

    def encode_decoded(self, x: torch.Tensor, *, seed: int = 0
                       ) -> tuple[Payload, torch.Tensor]:
        """``(encode(x), decode(encode(x)))`` on ``x``'s device, bit for bit, without parsing
        the bytes back where the compressor knows its decoded value (the quantizers: their
        symbols times the scales). The DDP hook uses it for the feedback's ``C(v)``."""
        flat = check_gradient(x)
        if flat.numel():
            known = self._encode_decoded(flat, generator_for(seed, flat.device), seed)
            if known is not None:
                body, dec = known
                payload = Payload(self.compressor_id, x.dtype, tuple(x.shape), body,
                                  seed=seed if self.shared_randomness else None,
                                  config_digest=self.config_digest(tuple(x.shape)))
                return payload, check_decoded(dec, x.dtype).reshape(x.shape).to(x.dtype)
        payload = self.encode(x, seed=seed)
        return payload, self.decode(payload, device=x.device)

    def decode(self, payload: Payload | bytes, *, device: torch.device | str = "cpu"
               ) -> torch.Tensor:
        """Reconstruct ``C(x)`` from the payload alone, with ``x``'s shape and dtype."""
        payload = self._own_payload(payload)
        n = payload.numel
        if n == 0:
            if payload.body:
                raise PayloadError("payload of an empty tensor has a non-empty body")
            flat = torch.zeros(0, device=device)
        else:
            self._check_body_len(len(payload.body), n)
            flat = self._decode(payload.body, n, payload.seed or 0, torch.device(device))
            if flat.shape != (n,):
                raise PayloadError(f"decoded {tuple(flat.shape)} values, header declares {n}")
            flat = check_decoded(flat, payload.dtype)
        return flat.reshape(payload.shape).to(payload.dtype)

    def encode_into(self, out: torch.Tensor | np.ndarray, x: torch.Tensor, *, seed: int = 0,
                    crc: bool = False) -> PayloadView:
        """``encode(x, seed=seed)`` serialized into the reusable ``uint8`` buffer ``out``
        (from byte 0; at least :meth:`max_payload_bytes` plus the CRC's 4 bytes): the same
        bytes as ``encode(x).to_bytes()``, as a :class:`~gradpress.payload.PayloadView`.
        Allocation-free for the uniform quantizers' dense code and scaled sign on CPU
        float32 (:mod:`gradpress.compressors.fused`); otherwise encode, then copy."""
        from gradpress.compressors.fused import _u8, fused_encode

        buf = _u8(out)
        if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.layout == torch.strided:
            view = fused_encode(self, x.detach(), buf, seed=seed, crc=crc)
            if view is not None:
                return view
        raw = dataclasses.replace(self.encode(x, seed=seed), crc=crc).to_bytes()
        if len(raw) > buf.size:
            raise ValueError(f"payload buffer holds {buf.size} bytes, the payload has "
                             f"{len(raw)}")
        buf[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        return PayloadView(buf[:len(raw)], len(raw))

    def decode_into(self, out: torch.Tensor, payload: PayloadLike, *, add: bool = False
                    ) -> torch.Tensor:
        """``out = decode(payload)`` (``add=False``) or ``out += decode(payload)``, with
        ``out`` any tensor of the payload's element count (written flat, in its dtype).
        Every check runs before ``out`` is written: a bad payload raises
        :class:`PayloadError` and leaves ``out`` untouched. Allocation-free for the
        uniform quantizers' dense code and scaled sign into a contiguous CPU float32
        ``out`` from a float32 payload; otherwise decode, then copy (or add)."""
        self.prepare_decode(payload, out)(out, add)
        return out

    def prepare_decode(self, payload: PayloadLike, out: torch.Tensor
                       ) -> Callable[[torch.Tensor, bool], None]:
        """Check ``payload`` fully for a decode into ``out``; return ``write(out, add)``,
        which cannot fail. Callers that combine several payloads (a mean) check them all
        before writing any."""
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise ValueError("decode_into needs a floating-point tensor to write into")
        head, body = _parse(payload)
        self._check_own(head)
        n = head.numel
        if n != out.numel():
            raise PayloadError(f"payload holds {n} elements, the output tensor has "
                               f"{out.numel()}")
        write = None
        if (n and head.dtype == torch.float32 and out.dtype == torch.float32
                and out.device.type == "cpu" and out.is_contiguous()):
            self._check_body_len(body.size, n)
            write = self._prepare_body(body, n)
        if write is None:
            full = payload if isinstance(payload, Payload) else Payload.from_bytes(body_of(
                payload))
            dec = self.decode(full, device=out.device).reshape(-1)

            def write(o: torch.Tensor, add: bool) -> None:  # any layout of ``out``
                src = dec.reshape(o.shape)
                o.add_(src) if add else o.copy_(src)
            return write
        return lambda o, add: write(o.view(-1).numpy(), add)

    def _prepare_body(self, body: np.ndarray, numel: int
                      ) -> Callable[[np.ndarray, bool], None] | None:
        """A checked writer of the body's values into a float32 numpy array, or ``None``
        (the default) where this compressor (or this body's mode) has no fast decoder."""
        return None

    def _own_payload(self, payload: Payload | bytes) -> Payload:
        """Parse bytes if needed and check the payload was made by this compressor."""
        if not isinstance(payload, Payload):
            payload = Payload.from_bytes(payload)
        self._check_own(payload)
        return payload

    def _check_own(self, payload: Payload | PayloadHeader) -> None:
        """Raise :class:`PayloadError` unless this compressor, so configured, made it."""
        if payload.compressor_id != self.compressor_id:
            raise PayloadError(f"payload was made by compressor id {payload.compressor_id}, "
                               f"this is {self.name!r} (id {self.compressor_id})")
        mine = self.config_digest(payload.shape)
        if payload.config_digest != mine:
            guess = self._guess_config(payload.config_digest, payload.shape)
            seen = (f" (it matches {self.name}({', '.join(f'{k}={v!r}' for k, v in guess.items())})"
                    ", a one-parameter change; a 2-byte digest can match by chance)"
                    if guess is not None else "")
            raise PayloadError(
                f"payload's config digest 0x{payload.config_digest:04x} is not this "
                f"decoder's 0x{mine:04x} for shape {payload.shape}: it was encoded by a "
                f"{self.name} other than {self!r}{seen}; build the decoder with the "
                "encoder's config(), or the header's shape was altered")

    def _guess_config(self, digest: int, shape: tuple[int, ...]) -> dict[str, Any] | None:
        """The encoder's config when it differs from ours in one parameter with a common
        value (error path only: ~200 digests, ~2 ms), else ``None``."""
        common: list[Any] = [None, False, True, *range(1, 17), *(1 << k for k in range(5, 17)),
                             0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 1.0 / 9.0, "l2",
                             "linf", "fp16", "fp32", "range", "huffman"]
        mine = self.config()
        hits = []
        for k, old in mine.items():
            for v in common:
                cfg = {**mine, k: v}
                if (v != old or type(v) is not type(old)) and config_digest(
                        self.name, cfg, shape) == digest:
                    hits.append(cfg)
        return hits[0] if len(hits) == 1 else None

    def config_digest(self, shape: tuple[int, ...]) -> int:
        """16-bit digest of ``name``, ``config()`` and ``shape``, written in every header."""
        return config_digest(self.name, self.config(), shape)

    def body_len_bounds(self, numel: int) -> tuple[int, int | None]:
        """Smallest and largest body (bytes) a valid payload of ``numel`` elements has;
        ``None``: no upper bound known. Fixed-length codes (``bits_rtol == 0``) have exactly
        ``ceil(body_bits / 8)``; variable-length ones override :meth:`_min_body_len`."""
        if self.bits_rtol == 0.0:
            exact = math.ceil(self.body_bits(numel) / 8)
            return exact, exact
        hi = self.max_payload_bytes(numel)
        return self._min_body_len(numel), None if hi is None else hi - header_size(1)

    def _min_body_len(self, numel: int) -> int:
        """A lower bound on the body of any valid ``numel``-element payload (variable-length
        codes); 0 unless the subclass knows better."""
        return 0

    def _check_body_len(self, body_len: int, numel: int) -> None:
        """Reject a body whose length no valid payload of ``numel`` elements has, before the
        decoder allocates anything (a truncated body, extra bytes, or a header whose shape
        lies, e.g. 2^30 elements over a few bytes)."""
        lo, hi = self.body_len_bounds(numel)
        if body_len < lo or (hi is not None and body_len > hi):
            want = f"{lo}" if lo == hi else f"{lo}..{'' if hi is None else hi}"
            raise PayloadError(f"{self.name} body has {body_len} bytes; a payload of {numel} "
                               f"elements has {want}: truncated, extended, or a lying shape")

    def compress(self, x: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
        """``decode(encode(x))`` through real bytes, on ``x``'s device."""
        return self.decode(Payload.from_bytes(self.encode(x, seed=seed).to_bytes()),
                           device=x.device)

    # -- declared properties ------------------------------------------------------------
    def omega(self, d: int) -> float | None:
        """Variance bound ``omega`` of an unbiased compressor in dimension ``d``."""
        return None

    def alpha(self, d: int) -> float | None:
        """Contraction ``alpha`` of a biased compressor in dimension ``d``."""
        return None

    def expected_bits(self, d: int, shape: tuple[int, ...] | None = None) -> float:
        """Bits of the whole payload (header included) for a ``d``-element tensor,
        from the paper's formula; for variable-length codes, the expected (or worst) size
        stated in the subclass docstring."""
        ndim = 1 if shape is None else len(shape)
        return 8.0 * header_size(ndim, seed=self.shared_randomness) + self.body_bits(d)

    def max_payload_bytes(self, numel: int) -> int | None:
        """Worst-case ``len(payload.to_bytes())`` for a 1-D tensor of ``numel`` elements over
        all inputs, or ``None`` when no bound is known. Fixed-length codes
        (``bits_rtol == 0``) have it from ``expected_bits``; variable-length ones override
        this where their encoder caps the size (e.g. "the smallest of several codes"). The
        DDP hook pads every rank's frame to it, so one collective per bucket suffices."""
        if self.bits_rtol == 0.0:
            return math.ceil(self.expected_bits(numel) / 8)
        return None

    @abstractmethod
    def body_bits(self, d: int) -> float:
        """Formula for the body's bits (before byte padding) in dimension ``d``."""

    def config(self) -> dict[str, Any]:
        """Constructor arguments, so ``get(name, **config())`` rebuilds this compressor."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # -- what subclasses write ----------------------------------------------------------
    @abstractmethod
    def _encode(self, flat: torch.Tensor, gen: torch.Generator, seed: int) -> bytes:
        """Body bytes for a non-empty flat float32 tensor."""

    def _encode_decoded(self, flat: torch.Tensor, gen: torch.Generator, seed: int
                        ) -> tuple[bytes, torch.Tensor] | None:
        """Body bytes and the flat float32 tensor ``_decode`` would return from them, where
        a compressor knows it without decoding; ``None`` (the default): encode, then decode."""
        return None

    @abstractmethod
    def _decode(self, body: bytes, numel: int, seed: int, device: torch.device
                ) -> torch.Tensor:
        """Flat float32 tensor of ``numel`` values on ``device`` from the body bytes.
        Must raise :class:`PayloadError` on malformed bodies."""
