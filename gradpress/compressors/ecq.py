"""**ECQ-SGD quantizer** (Wu, Huang, Huang, Zhang, ICML 2018, arXiv 1806.08054, Sec. 3).

For a vector (or bucket) ``g`` of ``n`` coordinates, ``s`` non-zero levels and scale ``M``,

    Q(g)_i = M * sgn(g_i) * xi_i,   xi_i in {0, 1/s, ..., 1},
    xi_i = (l + Bernoulli(s|g_i|/M - l)) / s,   l = floor(s|g_i|/M),

unbiased stochastic rounding of ``|g_i|/M`` onto ``2s+1`` values ``{-M, ..., -M/s, 0, M/s,
..., M}``. The paper tries two scales: ``M = ||g||_2`` (QSGD's ``Q_s``, Alistarh et al.
2017) and ``M = ||g||_inf``. It is QSGD's grid with a choice of scale, so :class:`ECQ` is
:class:`~gradpress.compressors.qsgd.QSGD` with a ``norm`` option and the paper's defaults
(one scale for the whole tensor, ``bucket_size=None``; ``s=4``, ``norm="l2"``).

Variance, ``E||Q(g) - g||^2 <= omega ||g||^2``:

* ``l2``: ``omega = min(n/s^2, sqrt(n)/s)`` (QSGD Lemma 3.1);
* ``linf``: ``omega = (sqrt(1 + (n-1)/s^2) - 1) / 2``. Proof: with ``u_i = s|g_i|/M``
  and ``theta_i = frac(u_i)``, the error is ``(M/s)^2 sum_i theta_i(1-theta_i)`` and
  ``||g||^2 = (M/s)^2 (s^2 + sum_{i != max} u_i^2)``. For any ``lam > 0``,
  ``theta(1-theta) <= lam u^2 + 1/(4(1+lam))`` (for ``u < 1``, ``theta = u``; for ``u >= 1``,
  ``1/4 - lam`` is smaller), so the ratio is at most ``R`` once ``R(1+R) >= (n-1)/(4s^2)``.
  The bound is attained by one coordinate ``M`` and ``n-1`` coordinates
  ``theta* M/s``, ``theta* = (sqrt(1+a)-1)/a``, ``a = (n-1)/s^2`` (tested). Gaussian
  vectors sit far below it (a worst case, not a typical one).

Bits (``w = ceil(log2(2s+1))``). The paper's fixed-width code is ``32 + d*w`` bits (the
float32 scale, then a signed level per coordinate); ours adds a mode byte and one scale per
bucket: ``8 + 32*#buckets + d*w``. With Huffman coding the paper counts
``sum_k d_k log2(d/d_k)`` bits (``d_k`` coordinates at level ``k``: the empirical entropy),
which a per-payload Huffman code attains within one bit per letter and the range coder
within its model (``codec.entropy``). By default (``entropy="best"``) every payload is the
smallest of the dense code, QSGD's Elias-coded sparse code, the Huffman code (``s <= 7``)
and the range code. High-dimensional ``l2`` messages are sparse (``E nnz <= s(s+sqrt n)``,
QSGD Lemma 3.1): a 20,000-d Gaussian with ``s=4`` has ~2% non-zeros and costs ~0.19 bits a
coordinate, range coded. ``expected_bits`` is QSGD's Theorem 3.2 bound for ``l2`` (or the
dense size when smaller) and the dense size for ``linf``.

``bits=b`` (a convenience) means the largest grid whose dense code takes ``b`` bits a
coordinate: ``2s+1 <= 2^b``, so ``s = 2^(b-1) - 1`` (``b=2``: ternary ``s=1``; ``b=3``:
``s=3``; ``b=4``: ``s=7``; ``b`` in 2..8).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradpress.compressors.qsgd import QSGD
from gradpress.compressors.registry import register

NORMS = ("l2", "linf")


def s_for_bits(bits: int) -> int:
    """Levels ``s`` of the largest grid ``2s+1 <= 2^bits``: ``2^(bits-1) - 1``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"ecq bits must be an int in 2..8 (2s+1 <= 2^bits levels), "
                         f"got {bits!r}")
    return (1 << (bits - 1)) - 1


def linf_omega(n: int, s: int) -> float:
    """Tight variance bound of the l-inf-scaled grid on ``n`` coordinates (module doc)."""
    return (math.sqrt(1.0 + (n - 1) / s**2) - 1.0) / 2.0 if n > 1 else 0.0


@register
class ECQ(QSGD):
    """ECQ-SGD's quantizer (Wu et al. 2018): ``2s+1`` levels ``{-M, ..., 0, ..., M}``,
    ``M`` the l2 (default) or l-inf norm of the tensor (or of each bucket), unbiased
    stochastic rounding; the smallest of its codes per payload.

    Args:
        s: non-zero levels per sign (default 4, the paper's).
        norm: ``"l2"`` or ``"linf"``, the scale ``M``.
        bucket_size: coordinates per scale; ``None`` (default) scales the whole tensor.
        entropy: codes tried besides the dense and sparse ones: ``"best"`` (default: range
            and Huffman), ``"range"``/``True``, ``"huffman"`` or ``False``.
        sparse: try QSGD's Elias-coded sparse code.
        bits: instead of ``s``: ``s = 2^(bits-1) - 1`` (module docstring).
    """

    name = "ecq"
    compressor_id = 11

    def __init__(self, s: int | None = None, norm: str = "l2",
                 bucket_size: int | None = None, entropy: bool | str = "best",
                 sparse: bool = True, bits: int | None = None) -> None:
        if bits is not None:
            from_bits = s_for_bits(bits)
            if s is not None and s != from_bits:
                raise ValueError(f"ecq got bits={bits} (s={from_bits}) and s={s}; give one")
            s = from_bits
        s = 4 if s is None else s
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 127:
            raise ValueError(f"ecq needs an integer number of levels s in 1..127, got {s!r}")
        if norm not in NORMS:
            raise ValueError(f"ecq norm must be 'l2' or 'linf', got {norm!r}")
        super().__init__(s=s, bucket_size=bucket_size, entropy=entropy, sparse=sparse)
        self.norm = norm

    def config(self) -> dict[str, Any]:
        return {"s": self.s, "norm": self.norm, "bucket_size": self.bucket_size,
                "entropy": self.entropy, "sparse": self.sparse}

    def omega(self, d: int) -> float:
        if self.norm == "l2":
            return super().omega(d)
        return linf_omega(self._bucket_len(d), self.s)

    def body_bits(self, d: int) -> float:
        if self.norm == "l2":
            return super().body_bits(d)
        return float(self._header_bits(d) + d * self.width) if d else 0.0

    def grid(self, scale: float = 1.0) -> np.ndarray:
        """The ``2s+1`` values ``{-M, ..., -M/s, 0, M/s, ..., M}`` for scale ``M``."""
        return scale * np.arange(-self.s, self.s + 1) / self.s
