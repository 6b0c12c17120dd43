"""One fused step of worker feedback and compressor: ``to_send``, ``encode`` into a
reusable buffer and ``commit``, with the residual updated in place.

For a supported pair (:func:`fused_coefs`: ECQ-SGD's ``ECQFeedback(alpha, beta)``, classic
``ErrorFeedback`` = ``alpha = beta = 1`` or ``NoFeedback``; a compressor that
:func:`gradpress.compressors.fused.plan_for` accepts) :func:`encode_with_feedback` gives the
same payload bytes as ``comp.encode(fb.to_send(k, g), seed)`` and leaves the same residual
as ``fb.commit(k, g, decode(payload))`` (Wu et al. 2018, Sec. 4:
``h <- beta h + g - Q(g + alpha h)``), bit for bit, in two passes over ``g`` and no new
full-size tensor after the first step (which allocates ``h``). Other pairs return ``None``
and the caller takes the generic path.

The residual is written in place, so a caller that must be able to undo a step (the DDP
hook with ``on_nonfinite="skip"``) uses the generic path, whose ``commit`` replaces it.
Bits: the compressor's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from gradpress.compressors import Compressor
from gradpress.compressors.fused import Workspace, plan_for, prepare_fused
from gradpress.feedback.base import Feedback, NoFeedback
from gradpress.feedback.ecq import ECQFeedback
from gradpress.feedback.ef import ErrorFeedback
from gradpress.payload import PayloadView


def fused_coefs(fb: Feedback) -> tuple[float, float | None, str | None] | None:
    """``(alpha, beta, state name)`` of ``v = g + alpha h``, ``h <- (beta h + g) - sent``
    for the feedbacks the fused kernels implement (``beta``/name ``None``: no state), else
    ``None``. Exact types only: a subclass may change the recursion."""
    if type(fb) is ECQFeedback:
        return fb.alpha, fb.beta, "h"
    if type(fb) is ErrorFeedback:
        return 1.0, 1.0, "e"
    if type(fb) is NoFeedback:
        return 0.0, None, None
    return None


def supports(comp: Compressor, fb: Feedback, g: torch.Tensor, *, dense: bool = False
             ) -> bool:
    """Whether :func:`encode_with_feedback` takes the fused path for this pair and bucket
    (``dense``: and the body is always the fixed-width code, so the receiver's decoder is
    allocation-free too; the collectives fuse only then: an entropy-coded body would be
    decoded again through the generic decoder where the unfused path has it at hand)."""
    plan = plan_for(comp, g)
    return fused_coefs(fb) is not None and plan is not None and (plan.dense or not dense)


def encode_with_feedback(comp: Compressor, fb: Feedback, key: str, g: torch.Tensor,
                         out: torch.Tensor | np.ndarray, *, seed: int = 0, crc: bool = False,
                         ws: Workspace | None = None) -> PayloadView | None:
    """Steps 1-2 of the hook for this rank's bucket ``g``: the payload of
    ``fb.to_send(key, g)`` written into ``out`` and ``fb``'s state for ``key`` committed in
    place; ``None`` (nothing touched) where the pair or ``g`` has no fused path. Raises
    :class:`~gradpress.errors.NonFiniteGradientError` / ``ValueError`` before any state
    changes."""
    pieces = prepare_shards(comp, fb, key, g, [(0, g.numel(), out, seed)], crc=crc, ws=ws)
    return None if pieces is None else pieces()[0]


def prepare_shards(comp: Compressor, fb: Feedback, key: str, g: torch.Tensor,
                   shards: list[tuple[int, int, torch.Tensor | np.ndarray, int]], *,
                   crc: bool = False, ws: Workspace | None = None
                   ) -> Callable[[], list[PayloadView]] | None:
    """:func:`encode_with_feedback` for pieces ``g[start:end]`` of a flat ``g``, each
    encoded on its own into its own buffer with its own seed (``shards``: ``(start, end,
    out, seed)``; the two-phase worker step). Every piece is checked first (pass 1); the
    returned function runs the passes 2, commits the state and returns the views; ``None``
    where the pair has no fused path."""
    coefs = fused_coefs(fb)
    if coefs is None or not isinstance(key, str) or plan_for(comp, g) is None:
        return None
    alpha, beta, name = coefs
    st = fb._state.get(key, {})
    h = st.get(name) if name else None
    if h is not None and (h.shape != g.shape or plan_for(comp, h) is None):
        return None  # the generic path raises the shape error or converts the state
    fresh = name is not None and h is None
    hout = torch.empty(g.shape, dtype=torch.float32) if fresh else h
    flat_g, flat_h = g.reshape(-1), None if h is None else h.reshape(-1)
    flat_out = None if hout is None else hout.reshape(-1)
    runs = []
    for j, (s, e, out, seed) in enumerate(shards):
        if e == s:
            runs.append(None)
            continue
        run = prepare_fused(comp, flat_g[s:e] if len(shards) > 1 else g, out, seed=seed,
                            crc=crc, ws=ws, h=None if h is None else (
                                flat_h[s:e] if len(shards) > 1 else h),
                            alpha=alpha, beta=beta,
                            hout=None if hout is None else (
                                flat_out[s:e] if len(shards) > 1 else hout),
                            what=f"gradient for key {key!r}", tag=str(j))
        if run is None:
            return None
        runs.append(run)

    def finish() -> list[PayloadView]:
        views = [None if r is None else r() for r in runs]
        if fresh:
            fb._state[key] = {**st, name: hout}
        else:  # as commit does: even a stateless feedback lists the key it has seen
            fb._state.setdefault(key, {})
        return views
    return finish
