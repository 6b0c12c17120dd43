"""Classic error feedback: 1-bit SGD (Seide, Fu, Droppo, Li, Yu, Interspeech 2014) and EF-SGD
(Karimireddy, Rebjock, Stich, Jaggi, ICML 2019, Algorithm 2).

Worker state ``e`` (the error not yet sent), ``e^(0) = 0``; each step

    p^(t) = g^(t) + e^(t),     send C(p^(t)),     e^(t+1) = p^(t) - C(p^(t)).

EF-SGD writes ``p = eta g + e`` (the error in model units); with a constant learning rate
the two forms are the same algorithm with ``e`` scaled by ``eta``, and we keep gradient
units so the feedback does not need to know the learning rate. This equals
:class:`~gradpress.feedback.ECQFeedback` with ``alpha = beta = 1``. Converges for
contractive compressors (``||C(x)-x||^2 <= (1-delta)||x||^2``), e.g. scaled sign, top-k.

Bits: none of its own; each message costs what the compressor's payload costs.
"""

from __future__ import annotations

import torch

from gradpress.feedback.base import Feedback


class ErrorFeedback(Feedback):
    """Classic error feedback: send ``C(g + e)``, then ``e <- (g + e) - sent``."""

    name = "ef"
    state_names = ("e",)

    def _to_send(self, g: torch.Tensor, st: dict[str, torch.Tensor]) -> torch.Tensor:
        e = st.get("e")
        return g.clone() if e is None else g + e

    def _commit(self, g: torch.Tensor, sent: torch.Tensor, st: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        # Recomputed in the state dtype, so rounding of to_send to a bf16 bucket is kept.
        e = st.get("e")
        if e is None:
            return {"e": g - sent}
        return {"e": torch.add(g, e).sub_(sent)}  # (g + e) - sent, one new tensor
