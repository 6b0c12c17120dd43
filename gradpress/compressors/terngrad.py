"""TernGrad, ternary gradients (Wen, Xu, Yan, Wu, Wang, Chen, Li, NeurIPS 2017, Eq. 2): with ``s_t =
||v||_inf`` per bucket (the paper's layer-wise scale: default ``bucket_size=None``),

    C(v)_i = s_t * sgn(v_i) * b_i,   b_i ~ Bernoulli(|v_i| / s_t),

unbiased with variance ``s_t ||v||_1 - ||v||^2 <= (sqrt(n) - 1) ||v||^2``, so ``omega =
sqrt(n) - 1``. Each coordinate is one of three symbols in ``2`` bits: ``8 + 32*#buckets +
2d`` bits (the mode byte shared with the uniform quantizers). The paper's optional gradient
clipping is not applied (it would make the scheme biased).
"""

from __future__ import annotations

import math
from typing import Any

from gradpress.compressors._uniform import UniformQuantizer
from gradpress.compressors.registry import register


@register
class TernGrad(UniformQuantizer):
    """TernGrad (Wen et al. 2017): ``{-s_t, 0, s_t}`` per bucket, ``s_t = ||v||_inf``;
    unbiased with ``omega = sqrt(n) - 1``. ``entropy="huffman"`` codes the trits in a
    per-payload Huffman code (see :class:`UniformQuantizer`)."""

    name = "terngrad"
    compressor_id = 25
    norm = "linf"

    def __init__(self, bucket_size: int | None = None, entropy: bool | str = False) -> None:
        super().__init__(bucket_size, entropy)
        self.levels = 3
        self.gain = 1.0
        self.offset = 1.0

    def config(self) -> dict[str, Any]:
        return {"bucket_size": self.bucket_size, "entropy": self.entropy}

    def omega(self, d: int) -> float:
        return math.sqrt(self._bucket_len(d)) - 1.0
