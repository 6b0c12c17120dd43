"""ECQ-SGD's error compensation (Wu, Huang, Huang, Zhang, ICML 2018, arXiv 1806.08054, Sec. 4).

Worker ``p`` at iteration ``t`` keeps the accumulated quantization error

    h_p^(t) = sum_{t'<t} beta^(t-1-t') (g_p^(t') - g~_p^(t'))          (paper, Eq. for h)
            = beta h_p^(t-1) + (g_p^(t-1) - g~_p^(t-1)),   h_p^(0) = 0,

with ``beta`` the time-decaying factor, and sends the quantized *compensated* gradient

    g~_p^(t) = Q(g_p^(t) + alpha h_p^(t)),

with ``alpha`` the compensation coefficient. Note that the error is ``g - g~`` (the raw
gradient minus what was sent), not ``(g + alpha h) - g~``. The model update is plain SGD on
the average of what was sent, ``w^(t+1) = w^(t) - (eta / P) sum_p g~_p^(t)``, so ``apply``
is the identity.

Special cases (tested): ``alpha = 0`` is plain quantized SGD (QSGD) whatever ``beta``;
``alpha = beta = 1`` is classic error feedback (:class:`~gradpress.feedback.ErrorFeedback`:
``e <- (g + e) - C(g + e)``). The paper's quantizer ``Q`` is QSGD's ``Q_s`` with an l2 (or
l-inf) scaling factor; any registered compressor can play ``Q`` here.

Bits: none of its own; each message costs what the compressor's payload costs (the paper's
``32 + d ceil(log2(2s+1))`` for its fixed-width code).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gradpress.feedback.base import Feedback


def _coef(name: str, v: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"ECQ {name} must be a finite number >= 0, got {v!r}")
    return float(v)


class ECQFeedback(Feedback):
    """ECQ-SGD: send ``Q(g + alpha*h)``, then ``h <- beta*h + (g - sent)``.

    Args:
        alpha: compensation coefficient (``0`` turns compensation off).
        beta: time-decaying factor of the accumulated error (``0`` keeps only the last
            step's error, ``1`` never forgets).
    """

    name = "ecq"
    state_names = ("h",)

    def __init__(self, alpha: float = 0.5, beta: float = 0.9) -> None:
        super().__init__()
        self.alpha = _coef("alpha", alpha)
        self.beta = _coef("beta", beta)

    def config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta}

    def _to_send(self, g: torch.Tensor, st: dict[str, torch.Tensor]) -> torch.Tensor:
        h = st.get("h")
        if h is None or self.alpha == 0.0:
            return g.clone()
        # alpha h + g (the same float sum as g + alpha h) with one temporary, not two.
        return torch.mul(h, self.alpha).add_(g)

    def _commit(self, g: torch.Tensor, sent: torch.Tensor, st: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        h = st.get("h")
        if h is None or self.beta == 0.0:
            return {"h": g - sent}
        # (beta h + g) - sent: the same sum as beta h + (g - sent), ordered so that
        # alpha = beta = 1 is classic error feedback bit for bit. One new tensor, updated in
        # place (the old h is never written: a skipped step may put it back).
        new = h.clone() if self.beta == 1.0 else torch.mul(h, self.beta)
        return {"h": new.add_(g).sub_(sent)}
