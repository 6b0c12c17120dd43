"""Error feedback as a small state machine around any compressor.

One worker, one tensor key ``k`` (a parameter name, a bucket index, or in the simulator one
``(P, d)`` block holding every simulated worker), one step::

    v = fb.to_send(k, g)                  # pure: what to compress (ECQ: g + alpha*h)
    sent = comp.decode(comp.encode(v))    # what every receiver will see from this worker
    fb.commit(k, g, sent)                 # update this worker's state from what was sent
    m = mean over workers of their `sent` # all-gather + decode, or the simulator's mean
    u = fb.apply(k, m)                    # the update direction (EF21 keeps a server copy)

Every method validates before it touches state: a NaN/Inf gradient or message raises
:class:`~gradpress.errors.NonFiniteGradientError`, a shape mismatch ``ValueError``; state is
never partly written. State is kept per key in float32 (float64 for float64 gradients), on
the gradient's device, whatever the dtype of ``g`` (fp16/bf16 buckets keep a float32
residual); ``to_send`` returns ``g``'s dtype so the compressor sees the usual tensor.
``state_dict()`` clones every tensor, so a resumed run continues bit-for-bit.

This module implements no paper itself; the subclasses do (see ``ecq.py``, ``ef.py``,
``ef21.py``). No bits are sent by feedback: the bit cost is the compressor's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from gradpress.compressors.base import check_gradient

#: Version of the ``state_dict`` layout.
STATE_VERSION = 1


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def checked(key: str, x: torch.Tensor, what: str) -> torch.Tensor:
    """Validate ``x`` (finite float tensor) and return it in the state dtype, same shape."""
    if not isinstance(key, str):
        raise TypeError(f"feedback key must be a str, got {type(key).__name__}")
    check_gradient(x, f"{what} for key {key!r}")
    return x.detach().to(_state_dtype(x.dtype))


class Feedback(ABC):
    """Base class: per-key state, ``to_send`` / ``commit`` / ``apply``, exact checkpoints.

    Subclasses name their per-key state tensors in ``state_names`` and implement
    ``_to_send``, ``_commit`` and (if not the identity) ``_apply`` on validated tensors in
    the state dtype. ``self._state[key][name]`` holds the tensors; a missing name means
    zero (nothing accumulated yet).
    """

    name: ClassVar[str]
    #: Names of the per-worker tensors shaped like ``g`` (e.g. ``("h",)`` for ECQ).
    state_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._state: dict[str, dict[str, torch.Tensor]] = {}

    # -- the protocol --------------------------------------------------------------------
    def to_send(self, key: str, g: torch.Tensor) -> torch.Tensor:
        """The vector this worker compresses this step. Pure: no state changes."""
        g32 = checked(key, g, "gradient")
        st = self._slot(key, g32, create=False)
        return self._to_send(g32, st).to(g.dtype)

    def commit(self, key: str, g: torch.Tensor, sent: torch.Tensor) -> None:
        """Update this worker's state after encoding; ``sent = decode(encode(to_send(g)))``."""
        g32 = checked(key, g, "gradient")
        s32 = checked(key, sent, "decoded message")
        if s32.shape != g32.shape:
            raise ValueError(f"decoded message for key {key!r} has shape {tuple(s32.shape)}, "
                             f"gradient has {tuple(g32.shape)}")
        self._commit_checked(key, g32, s32)

    def _commit_checked(self, key: str, g: torch.Tensor, sent: torch.Tensor) -> None:
        """:meth:`commit` without the finiteness scans, for callers that have just checked
        both (the DDP hook: ``g`` passed :meth:`to_send`, ``sent`` came out of a decoder,
        which never returns NaN/Inf); shapes must match."""
        g32 = g.detach().to(_state_dtype(g.dtype))
        s32 = sent.detach().to(_state_dtype(sent.dtype))
        st = self._slot(key, g32, create=False)
        new = self._commit(g32, s32.to(g32.device), st)  # computed fully before storing
        self._state[key] = {**st, **new}

    def apply(self, key: str, mean_received: torch.Tensor) -> torch.Tensor:
        """The update direction from the workers' average decoded message (identity here)."""
        m32 = checked(key, mean_received, "mean of received messages")
        st = dict(self._state.get(key, {}))
        out, new = self._apply(m32, st)
        if new:
            self._state[key] = {**st, **new}
        return out.to(mean_received.dtype)

    # -- what subclasses write -------------------------------------------------------------
    @abstractmethod
    def _to_send(self, g: torch.Tensor, st: dict[str, torch.Tensor]) -> torch.Tensor: ...

    @abstractmethod
    def _commit(self, g: torch.Tensor, sent: torch.Tensor, st: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        """Return the new state tensors (never mutate ``st``'s tensors in place)."""

    def _apply(self, m: torch.Tensor, st: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return m, {}

    # -- state ---------------------------------------------------------------------------
    def _slot(self, key: str, g: torch.Tensor, *, create: bool) -> dict[str, torch.Tensor]:
        """The key's state (a shallow copy) moved to ``g``'s device and dtype; shape checked."""
        st = dict(self._state.get(key, {}))
        for n, t in st.items():
            if n in self.state_names and t.shape != g.shape:
                raise ValueError(f"feedback state {n!r} for key {key!r} has shape "
                                 f"{tuple(t.shape)}, gradient has {tuple(g.shape)}; use one "
                                 "key per tensor or reset()")
            if t.device != g.device or t.dtype != g.dtype:
                st[n] = t.to(device=g.device, dtype=g.dtype)
        return st

    def state(self, key: str) -> dict[str, torch.Tensor]:
        """A copy of the state tensors of ``key`` (empty before the first commit)."""
        return {n: t.clone() for n, t in self._state.get(key, {}).items()}

    def keys(self) -> list[str]:
        return sorted(self._state)

    def reset(self) -> None:
        """Forget all state (every worker starts from zero error again)."""
        self._state.clear()

    def config(self) -> dict[str, Any]:
        """Constructor arguments: ``gradpress.feedback.get(name, **config())`` rebuilds it."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: name, config and cloned tensors per key."""
        return {
            "version": STATE_VERSION,
            "name": self.name,
            "config": self.config(),
            "state": {k: {n: t.detach().clone() for n, t in v.items()}
                      for k, v in self._state.items()},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; validates fully before replacing anything."""
        if not isinstance(sd, dict) or sd.get("version") != STATE_VERSION:
            raise ValueError(f"not a gradpress feedback state_dict of version {STATE_VERSION}")
        if sd.get("name") != self.name:
            raise ValueError(f"state_dict is for feedback {sd.get('name')!r}, this is "
                             f"{self.name!r}")
        if sd.get("config") != self.config():
            raise ValueError(f"state_dict config {sd.get('config')} differs from this "
                             f"feedback's {self.config()}")
        state = sd.get("state")
        if not isinstance(state, dict):
            raise ValueError("state_dict['state'] must be a dict of key -> tensors")
        new: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in state.items():
            if not isinstance(k, str) or not isinstance(v, dict):
                raise ValueError(f"bad state entry for key {k!r}")
            for n, t in v.items():
                if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                    raise ValueError(f"state {n!r} of key {k!r} must be a float tensor")
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"state {n!r} of key {k!r} holds NaN/Inf")
            new[k] = {n: t.detach().clone() for n, t in v.items()}
        self._state = new

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class NoFeedback(Feedback):
    """Plain compressed SGD: send ``g``, keep nothing, the update is the received mean."""

    name = "none"

    def _to_send(self, g: torch.Tensor, st: dict[str, torch.Tensor]) -> torch.Tensor:
        return g.clone()

    def _commit(self, g: torch.Tensor, sent: torch.Tensor, st: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        return {}
