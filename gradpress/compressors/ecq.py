"""**ECQ-SGD quantizer** (Wu, Huang, Huang, Zhang, ICML 2018, Sec. 3). Our reading: each bucket
``v`` is scaled by ``M = ||v||_inf`` (default) or ``||v||_2`` and quantized onto a codebook
of ``s`` uniformly spaced points ``{-M + 2Mk/(s-1)}_{k=0..s-1}`` spanning ``[-M, M]``, with
stochastic rounding to the two neighbouring points (unbiased). Bits: ``8 + 32*#buckets +
d*ceil(log2 s)``; with ``entropy=True``/``"huffman"`` the codes are range-/Huffman-coded when
that is smaller (a ternary ``s=3`` codebook on gradients, pairs Huffman-coded: ~1.13 bits
per coordinate). The
rounding variance is at most ``(M/(s-1))^2`` per coordinate and ``M <= ||v||_2``, so
``omega = n/(s-1)^2``. (The paper's text was not available offline while writing this; the
codebook and scaling follow its Sec. 3 description of uniformly distributed quantization
points with a per-bucket scaling factor.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradpress.compressors._uniform import UniformQuantizer
from gradpress.compressors.registry import register


@register
class ECQ(UniformQuantizer):
    """ECQ-SGD's quantizer (Wu et al. 2018): ``s`` uniform codebook points in ``[-M, M]`` per
    bucket, ``M`` the bucket's l-inf (default) or l2 norm; unbiased, ``omega = n/(s-1)^2``."""

    name = "ecq"
    compressor_id = 11

    def __init__(self, bits: int | None = None, s: int | None = None,
                 bucket_size: int | None = 512, norm: str = "linf", entropy: bool = False):
        if bits is None and s is None:
            bits = 2
        if bits is not None:
            if not isinstance(bits, int) or not 1 <= bits <= 8:
                raise ValueError(f"ecq bits must be in 1..8, got {bits!r}")
            if s is not None and s != 1 << bits:
                raise ValueError(f"ecq got bits={bits} and s={s}; give one of them")
            s = 1 << bits
        if not isinstance(s, int) or not 2 <= s <= 256:
            raise ValueError(f"ecq needs s in 2..256 codebook points, got {s!r}")
        if norm not in ("linf", "l2"):
            raise ValueError(f"ecq norm must be 'linf' or 'l2', got {norm!r}")
        super().__init__(bucket_size, entropy)
        self.s = s
        self.norm = norm
        self.levels = s
        self.gain = (s - 1) / 2.0
        self.offset = (s - 1) / 2.0

    def config(self) -> dict[str, Any]:
        return {"s": self.s, "bucket_size": self.bucket_size, "norm": self.norm,
                "entropy": self.entropy}

    def omega(self, d: int) -> float:
        return self._bucket_len(d) / (self.s - 1) ** 2

    def codebook(self, scale: float = 1.0) -> np.ndarray:
        """The ``s`` codebook points for a bucket of scale ``M = scale``."""
        return scale * (-1.0 + 2.0 * np.arange(self.s) / (self.s - 1))
