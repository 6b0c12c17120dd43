"""TernGrad, ternary gradients (Wen, Xu, Yan, Wu, Wang, Chen, Li, NeurIPS 2017, Eq. 2 and
Sec. 3.3). Per layer (the default ``bucket_size=None``: the whole tensor; or per bucket),

1. clip (Sec. 3.3): ``f(v_i) = v_i`` if ``|v_i| <= c*sigma``, else ``sgn(v_i) c*sigma``,
   with ``sigma`` the standard deviation of the bucket's entries and ``c = clip = 2.5``;
2. ternarize (Eq. 2): with ``s_t = ||f(v)||_inf``,

       C(v)_i = s_t * sgn(f(v_i)) * b_i,   b_i ~ Bernoulli(|f(v_i)| / s_t).

``C`` is unbiased for ``f(v)``, so the clipped scheme is **biased** for ``v`` (by
``f(v) - v``, the clipped-off tails): that is the paper's trade, a much smaller scale
``s_t`` and so a much smaller variance on heavy-tailed gradients. ``clip=None`` is the
unclipped, unbiased TernGrad with variance ``s_t ||v||_1 - ||v||^2 <= (sqrt(n) - 1)
||v||^2``, so ``omega = sqrt(n) - 1``. Each coordinate is one of three symbols in ``2``
bits: ``8 + 32*#buckets + 2d`` bits (the mode byte shared with the uniform quantizers);
``entropy="huffman"`` codes the trits in pairs with a per-payload Huffman code.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gradpress.compressors._uniform import UniformQuantizer
from gradpress.compressors.registry import register
from gradpress.kernels import quantize as fc


def clip_at_sigmas(flat: torch.Tensor, bucket_size: int | None, c: float) -> torch.Tensor:
    """A clipped copy of ``flat``: each bucket's entries clamped to ``+-c`` times the
    bucket's standard deviation (population, about its mean), as TernGrad Sec. 3.3."""
    d = flat.numel()
    b = min(bucket_size or d, d)
    nfull = d // b
    out = torch.empty_like(flat)
    for lo, rows, width in ((0, nfull, b), (nfull * b, 1, d - nfull * b)):
        if not rows or not width:
            continue
        block = flat[lo:lo + rows * width].view(rows, width)
        sd = block.double().std(dim=1, correction=0, keepdim=True).float()
        lim = c * sd
        torch.clamp(block, min=-lim, max=lim, out=out[lo:lo + rows * width].view(rows, width))
    return out


@register
class TernGrad(UniformQuantizer):
    """TernGrad (Wen et al. 2017): clip at ``clip`` standard deviations (default 2.5, the
    paper's; ``None``: no clipping), then ``{-s_t, 0, s_t}`` per bucket with ``s_t`` the
    clipped bucket's ``||.||_inf``. Biased when clipping; unbiased with ``omega =
    sqrt(n) - 1`` when not."""

    name = "terngrad"
    compressor_id = 25
    norm = "linf"

    def __init__(self, bucket_size: int | None = None, entropy: bool | str = False,
                 clip: float | None = 2.5) -> None:
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                                 or not math.isfinite(clip) or clip <= 0):
            raise ValueError(f"terngrad clip must be a positive number of standard "
                             f"deviations or None, got {clip!r}")
        super().__init__(bucket_size, entropy)
        self.clip = None if clip is None else float(clip)
        self.unbiased = self.clip is None
        self.levels = 3
        self.gain = 1.0
        self.offset = 1.0

    def config(self) -> dict[str, Any]:
        return {"bucket_size": self.bucket_size, "entropy": self.entropy, "clip": self.clip}

    def omega(self, d: int) -> float | None:
        return math.sqrt(self._bucket_len(d)) - 1.0 if self.clip is None else None

    def _quantize(self, flat: torch.Tensor, gen: torch.Generator, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.clip is not None:
            flat = clip_at_sigmas(flat, self.bucket_size, self.clip)
        return fc.scaled_quantize(flat, self.bucket_size, self.norm, self.gain, self.offset,
                                  self.levels, seed, gen)
