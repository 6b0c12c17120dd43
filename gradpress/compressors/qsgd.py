"""Uniform stochastic quantizers: QSGD / standard dithering and the ECQ-SGD quantizer.

**QSGD** (Alistarh, Grubic, Li, Tomioka, Vojnovic, NeurIPS 2017, Sec. 3). For each bucket
``v`` of ``n`` coordinates (the last bucket may be shorter) with ``s`` levels,

    Q_s(v_i) = ||v||_2 * sgn(v_i) * xi_i / s,   xi_i = l + Bernoulli(s|v_i|/||v|| - l),
    l = floor(s|v_i|/||v||),

which is unbiased with ``E||Q(v)-v||^2 <= min(n/s^2, sqrt(n)/s) ||v||^2`` (Lemma 3.1), so
``omega = min(n/s^2, sqrt(n)/s)`` with ``n = min(bucket_size, d)``. We round ``s v_i/||v||``
stochastically on the signed integer grid ``-s..s``; that has the same distribution.

Bits. A mode byte, ``32`` bits of float32 norm per bucket, then the cheaper of

* dense: the signed level ``s + sgn*xi`` in ``w = ceil(log2(2s+1))`` bits
  (``= 1 + ceil(log2(s+1))``: sign and level), ``d*w`` bits;
* sparse (QSGD's "Elias coding", Sec. 3.1/Thm 3.2): gap flag, ``nnz``, the gaps between
  nonzero positions in Elias gamma or delta (whichever is smaller), one sign bit and the
  level in Elias gamma per nonzero. Codes are written in split streams at exactly the
  textbook lengths, by compiled parallel kernels (layout in ``kernels.elias_writer``);
* with ``entropy=True`` (or ``"range"``), the dense symbols range-coded (``codec.entropy``);
* with ``entropy="huffman"``, the dense symbols in a canonical Huffman code fitted to this
  payload (``codec.huffman``): letters are pairs of symbols ``levels*a + b`` when
  ``levels <= 4`` (a trailing odd symbol paired with 0), single symbols otherwise; then
  ``4`` bits of code length per letter of the alphabet and ``sum count_k L_k`` bits,
  within one bit per letter of the empirical entropy. Much faster than range coding; for
  ``levels <= 16``.

``expected_bits`` uses the paper's Theorem 3.2 bound per bucket of ``n`` elements,
``(3 + 1.5 log2(2(s^2+n)/(s(s+sqrt n)))) * s(s+sqrt n)`` (the ``o(1)`` dropped), or the dense
size when that is smaller; it is a worst-case bound, so ``bits_rtol`` is wide (measured on
Gaussian vectors with the defaults ``s=4, bucket_size=512``: 29-42% under it; with ``s=7``,
25-50%).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from gradpress.compressors._uniform import SPARSE, UniformQuantizer
from gradpress.compressors.registry import register
from gradpress.kernels import elias_reader, elias_writer


@register
class QSGD(UniformQuantizer):
    """QSGD / standard dithering with ``s`` levels per bucket, l2 norm (Alistarh et al. 2017).

    Picks per payload the smallest of the dense fixed-width code, QSGD's Elias-coded sparse
    code and (``entropy=True``) range coding; ``omega = min(n/s^2, sqrt(n)/s)``.
    """

    name = "qsgd"
    compressor_id = 10
    bits_rtol = 0.6  # expected_bits is Thm 3.2's worst case; Gaussians land 25-50% under it
    norm = "l2"

    def __init__(self, s: int = 4, bucket_size: int | None = 512, entropy: bool = False,
                 sparse: bool = True):
        if not isinstance(s, int) or not 1 <= s <= 127:
            raise ValueError(f"qsgd needs an integer number of levels s in 1..127, got {s!r}")
        super().__init__(bucket_size, entropy)
        self.s = s
        self.sparse = bool(sparse)
        self.levels = 2 * s + 1
        self.gain = float(s)
        self.offset = float(s)

    def config(self) -> dict[str, Any]:
        return {"s": self.s, "bucket_size": self.bucket_size, "entropy": self.entropy,
                "sparse": self.sparse}

    def omega(self, d: int) -> float:
        n = self._bucket_len(d)
        return min(n / self.s**2, math.sqrt(n) / self.s)

    def sparse_bound_bits(self, n: int) -> float:
        """QSGD Theorem 3.2: expected bits of the Elias code of one bucket of ``n`` (without
        its 32-bit norm), ``(3 + 1.5 log2(2(s^2+n)/(s(s+sqrt n)))) s(s+sqrt n)``."""
        s = self.s
        k = s * (s + math.sqrt(n))
        return (3 + 1.5 * math.log2(2 * (s * s + n) / k)) * k

    def body_bits(self, d: int) -> float:
        if d == 0:
            return 0.0
        b = self._bucket_len(d)
        nfull, tail = divmod(d, b)
        sparse = nfull * self.sparse_bound_bits(b) + (self.sparse_bound_bits(tail) if tail
                                                      else 0.0)
        return float(self._header_bits(d) + min(d * self.width, sparse))

    def _sparse_body(self, scale: torch.Tensor, sym_np: np.ndarray) -> bytes | None:
        if not self.sparse:
            return None
        # Compiled split-stream Elias code (layout in ``kernels.elias_writer``); None unless it is
        # smaller than the dense code.
        packed = elias_writer.encode(sym_np, self.s, sym_np.size * self.width)
        if packed is None:
            return None
        w = self._start(SPARSE, scale)
        w.write_bytes(packed)
        return w.getvalue()

    def _decode_sparse(self, body: bytes, pos: int, numel: int, inv: torch.Tensor,
                       device: torch.device) -> torch.Tensor:
        data = np.frombuffer(body, dtype=np.uint8)
        out = elias_reader.decode(data, pos, numel, self.s, inv.cpu().numpy(),
                                  self._bucket_len(numel))
        return torch.from_numpy(out).to(device)
