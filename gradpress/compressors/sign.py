"""Scaled sign (1-bit SGD style).

**Scaled sign** (Seide et al. 2014, "1-bit SGD"; the scaled form of Karimireddy et al. 2019,
"Error Feedback Fixes SignSGD", Sec. 3). Per bucket ``v`` of ``n`` coordinates,

    C(v) = (||v||_1 / n) * sgn(v)       (sgn(0) = +1),

which is deterministic and contractive: ``||C(v) - v||^2 = ||v||^2 - ||v||_1^2 / n
<= (1 - 1/n) ||v||^2``, so ``alpha = 1 / min(bucket_size, d)``. Bits: ``32`` per bucket
(the float32 scale) plus ``1`` per coordinate: ``32*#buckets + d``. Off the CPU (or under
``GRADPRESS_TORCH_CODES=1``) the bits are packed and read by torch ops on the tensor's
device (:mod:`gradpress.kernels.torch_codes`), the same bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gradpress.codec import BitReader, BitWriter
from gradpress.compressors._uniform import _check_bucket
from gradpress.compressors.base import Compressor
from gradpress.compressors.registry import register
from gradpress.errors import PayloadError
from gradpress.kernels import fused as fk
from gradpress.kernels import quantize as fc
from gradpress.kernels import torch_codes as tc


@register
class ScaledSign(Compressor):
    """Scaled sign: one bit per coordinate plus the mean ``|x|`` of each bucket.

    Deterministic and contractive with ``alpha = 1/min(bucket_size, d)``.
    """

    name = "sign"
    compressor_id = 26

    def __init__(self, bucket_size: int | None = 512) -> None:
        self.bucket_size = _check_bucket(bucket_size)

    def config(self) -> dict[str, Any]:
        return {"bucket_size": self.bucket_size}

    def alpha(self, d: int) -> float:
        return 1.0 / max(1, min(self.bucket_size or d, d))

    def body_bits(self, d: int) -> float:
        return float(32 * fc.n_buckets(d, self.bucket_size) + d)

    def _encode(self, flat: torch.Tensor, gen: torch.Generator, seed: int) -> bytes:
        scale = fc.bucket_reduce(flat, self.bucket_size, "mean_abs")
        fc.check_scales(scale, "bucket mean")
        if tc.use_torch_codes(flat.device):
            return tc.to_host_bytes([tc.float32_be(scale), tc.pack_signs(flat)])
        w = BitWriter()
        w.write_float32(scale.cpu().numpy())
        w.write_bytes(fc.sign_bits(flat))
        return w.getvalue()

    def _prepare_body(self, body: np.ndarray, numel: int):
        """Checked writer of ``out_i (+)= (bit_i - 1/2)(-2 m_j)`` (the decoder's values)."""
        nb = fc.n_buckets(numel, self.bucket_size)
        scale = fc.read_scales(body[:4 * nb].view(">f4"), "bucket mean")
        if fk._max_symbol(body, 4 * nb, numel, 1) == 256:
            raise PayloadError("sign payload extended past its last field")
        neg2m = -2.0 * scale
        b = min(self.bucket_size or numel, numel)
        return lambda out, add: fk._unpack_dequantize(body, 4 * nb, numel, 1, b, neg2m,
                                                      np.float32(0.5), add, out)

    def _decode(self, body: bytes, numel: int, seed: int, device: torch.device) -> torch.Tensor:
        r = BitReader(body)
        scale = fc.read_scales(r.read_float32(fc.n_buckets(numel, self.bucket_size)),
                               "bucket mean")
        if tc.use_torch_codes(device):
            start = r.pos // 8
            r.skip(numel)
            r.expect_end()
            bits = tc.unpack(tc.from_host_bytes(body, start, len(body) - start, device),
                             numel, 1)
        else:  # bit 0 -> +m, bit 1 -> -m, in one compiled pass over the packed bits
            start = r.pos // 8
            r.skip(numel)
            r.expect_end()
            return fc.signs_times(np.frombuffer(body, np.uint8, offset=start), numel,
                                  self.bucket_size, scale)
        # (bit - 1/2) * (-2 m): bit 0 -> +m, bit 1 -> -m, exactly (the kernel's values).
        neg2m = torch.from_numpy(-2.0 * scale).to(device)
        return fc.affine_dequantize(bits.to(device), self.bucket_size, neg2m, 0.5)
