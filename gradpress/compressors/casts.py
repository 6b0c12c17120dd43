"""Identity compressors: raw float32, float16 and bfloat16 values.

No paper needed: ``C(x) = x`` rounded to the wire dtype. Bits: ``32 d``, ``16 d``, ``16 d``.
fp32 is exact (``omega = 0``); fp16/bf16 round to nearest, a deterministic (biased, but
with relative error ``<= 2^-11`` resp. ``2^-8`` per coordinate) map that we declare
contractive with ``alpha = 1 - u^2`` for unit roundoff ``u``. fp16 overflows to Inf beyond
65504: such inputs raise ``ValueError`` rather than sending Inf.

**Where the declared alpha holds.** bf16 has float32's exponent range, so ``1 - 2^-16``
holds for every finite input. Plain fp16 (``scaled=False``, the default, the DDP hook's
all-reduce fast path) has ``1 - 2^-22`` only for inputs whose non-zero entries lie in its
normal range ``[2^-14, 65504]``: below ``2^-14`` the spacing is a fixed ``2^-24``, and a
gradient of magnitude ``1e-8`` rounds to zero (``||C(x) - x|| = ||x||``). ``encode`` warns
(``RuntimeWarning``) when the largest entry is below ``2^-14``. ``scaled=True`` divides each
bucket by a power of two ``2^k <= max|v| < 2^(k+1)`` (exact) before the cast and sends ``k``
in one byte per bucket: ``16 d + 8 #buckets`` bits, any float32 magnitude, and
``alpha = 1 - u^2 - n 2^-50`` (an entry that lands in fp16's subnormals errs by at most
``2^-25 * 2^k <= 2^-25 ||v||``, at most ``n`` of them in a bucket of ``n``).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import numpy as np
import torch

from gradpress.compressors.base import Compressor
from gradpress.compressors.registry import register
from gradpress.errors import PayloadError
from gradpress.kernels import quantize as fc
from gradpress.kernels import torch_codes as tc

#: Smallest normal float16: below it plain fp16 loses relative precision.
FP16_MIN_NORMAL = 2.0**-14


def _fresh_float32(n: int, device: torch.device) -> torch.Tensor:
    """An uninitialized float32 tensor of ``n`` elements. On CPU through numpy, which asks
    the kernel for transparent huge pages on large arrays (``madvise``); torch's CPU
    allocator does not, and faulting in 64 MiB of 4 KiB pages cost 39 ms of CPU against
    numpy's 10 ms on this project's machine (2^24 elements, min of 7)."""
    if device.type != "cpu":
        return torch.empty(n, dtype=torch.float32, device=device)
    return torch.from_numpy(np.empty(n, dtype=np.float32))


class _Cast(Compressor):
    wire_dtype: ClassVar[torch.dtype]
    unit_roundoff: ClassVar[float]

    def body_bits(self, d: int) -> float:
        return float(d * torch.finfo(self.wire_dtype).bits)

    def alpha(self, d: int) -> float:
        return 1.0 - self.unit_roundoff**2

    def _encode(self, flat: torch.Tensor, gen: torch.Generator, seed: int) -> bytes:
        return self._cast_body(flat)[0]

    def _cast_body(self, flat: torch.Tensor) -> tuple[bytes, float]:
        """Little-endian raw bytes of ``flat`` in the wire dtype (bf16 through its int16 bit
        pattern) and ``max |y|`` of the cast values. On CPU the cast writes straight into
        the numpy array that becomes the body (one temporary, no second scan of the
        input); the range check reads the half-size cast."""
        bits = torch.int16 if torch.finfo(self.wire_dtype).bits == 16 else torch.int32
        if flat.device.type == "cpu":
            host = np.empty(flat.numel(), dtype=np.int16 if bits == torch.int16 else np.int32)
            y = torch.from_numpy(host).view(self.wire_dtype)
            y.copy_(flat)
        else:
            y = flat.to(self.wire_dtype)
        ends = torch.stack(torch.aminmax(y)).float()  # one pass, no temporary
        if not bool(torch.isfinite(ends).all()):
            raise ValueError(f"values exceed the {self.wire_dtype} range; scale the gradient "
                             "or use fp32/bf16")
        top = max(-float(ends[0]), float(ends[1]))
        if flat.device.type == "cpu":
            return host.tobytes(), top
        return y.view(bits).cpu().numpy().tobytes(), top

    def _decode(self, body: bytes, numel: int, seed: int, device: torch.device) -> torch.Tensor:
        size = torch.finfo(self.wire_dtype).bits // 8
        if len(body) != numel * size:
            raise PayloadError(f"{self.name} body has {len(body)} bytes, expected "
                               f"{numel * size}")
        raw = tc.from_host_bytes(body, 0, len(body), device)  # read-only view on CPU
        y = raw.view(torch.int16 if size == 2 else torch.int32).view(self.wire_dtype)
        if not bool(torch.isfinite(torch.stack(torch.aminmax(y))).all()):  # one pass, no temp
            raise PayloadError(f"{self.name} payload holds non-finite values")
        return _fresh_float32(numel, device).copy_(y)


@register
class Float32(_Cast):
    """Uncompressed float32: 32 bits per coordinate, exact."""

    name = "fp32"
    compressor_id = 1
    unbiased = True
    wire_dtype = torch.float32
    unit_roundoff = 0.0

    def omega(self, d: int) -> float:
        return 0.0


@register
class Float16(_Cast):
    """IEEE half precision: 16 bits per coordinate, round to nearest (u = 2^-11);
    ``scaled=True``: per-bucket power-of-two scale first, for any magnitude (module doc)."""

    name = "fp16"
    compressor_id = 2
    wire_dtype = torch.float16
    unit_roundoff = 2.0**-11

    def __init__(self, scaled: bool = False, bucket_size: int = 512) -> None:
        if not isinstance(bucket_size, int) or bucket_size < 1:
            raise ValueError(f"fp16 bucket_size must be a positive int, got {bucket_size!r}")
        self.scaled = bool(scaled)
        self.bucket_size = bucket_size

    def config(self) -> dict[str, Any]:
        return {"scaled": self.scaled, "bucket_size": self.bucket_size} if self.scaled else {}

    def alpha(self, d: int) -> float:
        if not self.scaled:
            return super().alpha(d)
        return 1.0 - self.unit_roundoff**2 - min(self.bucket_size, max(d, 1)) * 2.0**-50

    def body_bits(self, d: int) -> float:
        return 16.0 * d + (8.0 * fc.n_buckets(d, self.bucket_size) if self.scaled else 0.0)

    def _encode(self, flat: torch.Tensor, gen: torch.Generator, seed: int) -> bytes:
        if not self.scaled:
            body, top = self._cast_body(flat)
            # Rounding is monotone and 2^-14 is a float16: max|y| > 2^-14 means max|x| is at
            # least 2^-14 (no warning); at or below it (rare) the input decides.
            if top <= FP16_MIN_NORMAL:
                lo, hi = torch.aminmax(flat)  # one pass, no temporary
                top = max(-float(lo), float(hi))
            if 0 < top < FP16_MIN_NORMAL:
                warnings.warn(f"fp16: the largest entry {top:.3g} is below fp16's normal range "
                              f"(2^-14); alpha = 1 - 2^-22 does not hold; use "
                              "get('fp16', scaled=True) or bf16", RuntimeWarning, stacklevel=3)
            return body
        exps = self._exponents(flat)
        k = torch.where(exps > 0, exps.to(torch.int32) - 127, 0)
        inv = torch.ldexp(torch.ones_like(flat), -self._per_element(k, flat.numel()))
        y = (flat * inv).to(torch.float16)
        return exps.cpu().numpy().tobytes() + y.view(torch.int16).cpu().numpy().tobytes()

    def _exponents(self, flat: torch.Tensor) -> torch.Tensor:
        """Per bucket ``k + 127`` (uint8) with ``2^k <= max|v| < 2^(k+1)``; 0 for a zero
        bucket. ``k`` is clamped to float32's normal exponents ``-126..127``."""
        top = fc.bucket_reduce(flat, self.bucket_size, "linf")
        k = torch.frexp(top).exponent.to(torch.int32) - 1
        return torch.where(top > 0, k.clamp(-126, 127) + 127, 0).to(torch.uint8)

    def _per_element(self, k: torch.Tensor, n: int) -> torch.Tensor:
        return k.repeat_interleave(self.bucket_size)[:n]

    def _decode(self, body: bytes, numel: int, seed: int, device: torch.device) -> torch.Tensor:
        if not self.scaled:
            return super()._decode(body, numel, seed, device)
        nb = fc.n_buckets(numel, self.bucket_size)
        exps = torch.from_numpy(np.frombuffer(body[:nb], dtype=np.uint8).copy())
        if bool((exps == 255).any()):
            raise PayloadError("fp16 payload holds an invalid bucket exponent 255")
        y = super()._decode(body[nb:], numel, seed, device)
        k = torch.where(exps > 0, exps.to(torch.int32) - 127, 0).to(device)
        zero = self._per_element(exps == 0, numel).to(device)
        if bool((y[zero] != 0).any()):
            raise PayloadError("fp16 payload has non-zero values in a bucket marked zero")
        return torch.ldexp(y, self._per_element(k, numel).float())


@register
class BFloat16(_Cast):
    """bfloat16: 16 bits per coordinate, float32's range, round to nearest (u = 2^-8)."""

    name = "bf16"
    compressor_id = 3
    wire_dtype = torch.bfloat16
    unit_roundoff = 2.0**-8
