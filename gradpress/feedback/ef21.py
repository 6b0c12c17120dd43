"""EF21 (Richtarik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically Better, and
Practically Faster Error Feedback", NeurIPS 2021, Algorithm 1).

Worker ``i`` keeps an estimate ``g_i`` of its gradient and the server (every rank, in DDP)
keeps ``g = mean_i g_i``; with ``g_i^(0) = 0`` each step

    c_i = C(grad f_i(x^t) - g_i^t),      g_i^(t+1) = g_i^t + c_i,
    g^(t+1) = g^t + mean_i c_i,          x^(t+1) = x^t - gamma g^(t+1).

So ``to_send = g - g_i``, ``commit: g_i += sent``, ``apply: g_srv += mean(sent)``, return
``g_srv``. (The paper's initialisation ``g_i^0 = C(grad f_i(x^0))`` is our first step.)
Works with contractive compressors (top-k, scaled sign); with the identity compressor it
is full-precision SGD up to float rounding of the telescoping sums.

Bits: none of its own; each message costs what the compressor's payload costs.
"""

from __future__ import annotations

import torch

from gradpress.feedback.base import Feedback


class EF21(Feedback):
    """EF21: send ``C(g - g_i)``; ``g_i += sent``; the server keeps ``g_srv += mean``."""

    name = "ef21"
    state_names = ("g_i",)  # shaped like g; the server's g_srv is shaped like the mean

    def _to_send(self, g: torch.Tensor, st: dict[str, torch.Tensor]) -> torch.Tensor:
        gi = st.get("g_i")
        return g.clone() if gi is None else g - gi

    def _commit(self, g: torch.Tensor, sent: torch.Tensor, st: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        gi = st.get("g_i")
        return {"g_i": sent.clone() if gi is None else gi + sent}

    def _apply(self, m: torch.Tensor, st: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        srv = st.get("g_srv")
        if srv is not None:
            if srv.shape != m.shape:
                raise ValueError(f"EF21 server state has shape {tuple(srv.shape)}, the mean "
                                 f"message has {tuple(m.shape)}")
            srv = srv.to(device=m.device, dtype=m.dtype)
        new = m.clone() if srv is None else srv + m
        return new.clone(), {"g_srv": new}
