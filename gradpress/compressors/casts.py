"""Identity compressors: raw float32, float16 and bfloat16 values.

No paper needed: ``C(x) = x`` rounded to the wire dtype. Bits: ``32 d``, ``16 d``, ``16 d``.
fp32 is exact (``omega = 0``); fp16/bf16 round to nearest, a deterministic (biased, but
with relative error ``<= 2^-11`` resp. ``2^-8`` per coordinate) map that we declare
contractive with ``alpha = 1 - u^2`` for unit roundoff ``u``. fp16 overflows to Inf beyond
65504: such inputs raise ``ValueError`` rather than sending Inf.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from gradpress.compressors.base import Compressor
from gradpress.compressors.registry import register
from gradpress.errors import PayloadError


class _Cast(Compressor):
    wire_dtype: ClassVar[torch.dtype]
    unit_roundoff: ClassVar[float]

    def body_bits(self, d: int) -> float:
        return float(d * torch.finfo(self.wire_dtype).bits)

    def alpha(self, d: int) -> float:
        return 1.0 - self.unit_roundoff**2

    def _encode(self, flat: torch.Tensor, gen: torch.Generator, seed: int) -> bytes:
        y = flat.to(self.wire_dtype)
        if not bool(torch.isfinite(torch.stack(torch.aminmax(y))).all()):  # one pass, no temp
            raise ValueError(f"values exceed the {self.wire_dtype} range; scale the gradient "
                             "or use fp32/bf16")
        # Little-endian raw bytes of the wire dtype (bf16 through its int16 bit pattern).
        return y.view(torch.int16 if y.element_size() == 2 else torch.int32).cpu().numpy(
        ).tobytes()

    def _decode(self, body: bytes, numel: int, seed: int, device: torch.device) -> torch.Tensor:
        size = torch.finfo(self.wire_dtype).bits // 8
        if len(body) != numel * size:
            raise PayloadError(f"{self.name} body has {len(body)} bytes, expected "
                               f"{numel * size}")
        raw = np.frombuffer(body, dtype=np.int16 if size == 2 else np.int32)
        y = torch.from_numpy(raw.copy()).view(self.wire_dtype).to(device).float()
        if not bool(torch.isfinite(torch.stack(torch.aminmax(y))).all()):  # one pass, no temp
            raise PayloadError(f"{self.name} payload holds non-finite values")
        return y


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
    """IEEE half precision: 16 bits per coordinate, round to nearest (u = 2^-11)."""

    name = "fp16"
    compressor_id = 2
    wire_dtype = torch.float16
    unit_roundoff = 2.0**-11


@register
class BFloat16(_Cast):
    """bfloat16: 16 bits per coordinate, float32's range, round to nearest (u = 2^-8)."""

    name = "bf16"
    compressor_id = 3
    wire_dtype = torch.bfloat16
    unit_roundoff = 2.0**-8
