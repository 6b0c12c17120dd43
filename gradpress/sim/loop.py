"""The simulator: ``P`` workers of distributed (stochastic) gradient descent in one process.

Per iteration ``t`` (Wu et al. 2018, Algorithm 1; with ``batch_size=None`` it is distributed
gradient descent as in Albasyoni et al. 2020, Sec. 7)::

    g_p   = grad f_p(w)  on a seeded mini-batch of worker p's shard   (one (P, d) op)
            (batches="random": b rows drawn with replacement; "window": b consecutive
             rows of the shard from a uniform start, wrapping around: each row is in a
             window with probability b/m, so g_p is unbiased; on "blocks" shards a
             window is a view of X, no gather)
    v_p   = feedback.to_send(g_p)                                      (one (P, d) op)
    b_p   = encode(v_p, seed=s(t, p)).to_bytes()                       (P real payloads)
    c_p   = decode(from_bytes(b_p))                 what every peer sees from worker p
    feedback.commit(g_p, c_p);   u = feedback.apply(mean_p c_p)
    w    <- w - lr * u

Worker state lives in one ``(P, d)`` block under the feedback key ``"w"``, so the feedback
is vectorized over workers; only encode/decode loop over the ``P`` workers (one call each:
the compressors are vectorized inside). The data is held once, as one float32 ``(n, d)``
tensor (shared with a float32 problem, not copied); a mini-batch gathers its ``P * b`` rows.
Recorded per iteration: ``loss`` ``f(w)`` (float64), ``dist`` ``||w - w*||`` (when the
optimum is known), and the exact bytes each worker sent, ``len(payload.to_bytes())``, with
the body (the compressor's bits, without the payload header) beside them. Bits per worker
are ``8 *`` those bytes; nothing is estimated.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

import gradpress
from gradpress.errors import NonFiniteGradientError
from gradpress.feedback import Feedback
from gradpress.feedback import get as get_feedback
from gradpress.payload import Payload
from gradpress.sim.problems import Problem


@dataclass
class Method:
    """One curve's recipe: a compressor (registry name, or an instance), a feedback (name),
    and optionally a step size overriding the run's."""

    label: str
    compressor: str | gradpress.Compressor
    compressor_kw: dict[str, Any] = field(default_factory=dict)
    feedback: str = "none"
    feedback_kw: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None

    def build(self) -> tuple[gradpress.Compressor, Feedback]:
        comp = self.compressor
        if isinstance(comp, str):
            comp = gradpress.get(comp, **self.compressor_kw)
        return comp, get_feedback(self.feedback, **self.feedback_kw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (an instance compressor is named with its config)."""
        comp = self.compressor
        name, kw = (comp, self.compressor_kw) if isinstance(comp, str) else (comp.name,
                                                                              comp.config())
        return {"label": self.label, "compressor": name, "compressor_kw": dict(kw),
                "feedback": self.feedback, "feedback_kw": dict(self.feedback_kw),
                "lr": self.lr}


@dataclass
class Curve:
    """What one run recorded. ``bits_per_worker[i]`` is the mean over workers of the bits
    sent up to and including iteration ``iters[i]`` (0 at iteration 0)."""

    label: str
    method: dict[str, Any]
    lr: float
    iters: list[int]
    loss: list[float]
    dist: list[float] | None
    bits_per_worker: list[float]
    bytes_per_worker_total: list[int]
    bytes_per_step_mean: float
    f_star: float | None
    diverged: bool = False
    seconds: float = 0.0
    #: mean body bytes (payload minus its header) per worker per step
    body_bytes_per_step_mean: float = 0.0
    #: like ``bits_per_worker``, counting the bodies only (the papers' message bits)
    body_bits_per_worker: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def final_loss(self, frac: float = 0.1) -> float:
        """Mean loss over the last ``frac`` of the recorded points (inf if diverged)."""
        if self.diverged:
            return math.inf
        k = max(1, int(round(frac * len(self.loss))))
        return float(np.mean(self.loss[-k:]))


class Simulation:
    """``P`` workers holding the rows ``shards`` (``(P, m)``) of ``problem``.

    Args:
        problem: the full data set; the objective is restricted to the rows in ``shards``.
        shards: ``(P, m)`` row indices (see :func:`gradpress.sim.data.split`).
        batch_size: rows per worker per step, sampled with replacement; ``None`` means each
            worker's full local gradient (distributed gradient descent).
        seed: seeds the mini-batches and every payload's randomness.
        device: torch device of the workers' data and state.
        optimum: record ``||w - w*||`` and ``f*`` (solves the problem exactly once; off
            for problems too large for that, see ``Problem.optimum_fits``).
        batches: ``"random"`` (rows with replacement) or ``"window"`` (module docstring).
    """

    def __init__(self, problem: Problem, shards: np.ndarray, *, batch_size: int | None = None,
                 seed: int = 0, device: str | torch.device = "cpu",
                 optimum: bool = True, batches: str = "random") -> None:
        shards = np.asarray(shards)
        if shards.ndim != 2 or shards.size == 0:
            raise ValueError(f"shards must be a non-empty (P, m) array, got {shards.shape}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if batches not in ("random", "window"):
            raise ValueError(f"batches must be 'random' or 'window', got {batches!r}")
        if batches == "window" and batch_size is not None and batch_size > shards.shape[1]:
            raise ValueError(f"a window of {batch_size} rows does not fit a shard of "
                             f"{shards.shape[1]}")
        self.batches = batches
        # shards of consecutive rows: windows are views of X
        self._blocks = bool((shards == shards[:, :1] + np.arange(shards.shape[1])).all())
        self.problem = problem.subset(shards)  # the objective over the rows actually held
        # the workers' rows within self.problem (subset() keeps the order of shards, or
        # returns problem itself when the shards hold every row)
        self._local_rows = (shards if self.problem is problem
                            else np.arange(shards.size).reshape(shards.shape))
        self.shards = shards
        self.P, self.m = shards.shape
        self.batch_size = batch_size
        self.seed = int(seed)
        self.device = torch.device(device)
        self.use_optimum = bool(optimum)
        X = problem.X if problem.X.dtype == np.float32 else problem.X.astype(np.float32)
        self.X = torch.from_numpy(X).to(self.device)  # (n, d), shared when already float32
        self.y = torch.from_numpy(problem.y.astype(np.float32)).to(self.device)
        self.shards_t = torch.from_numpy(shards.astype(np.int64)).to(self.device)
        self._full: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lam = float(problem.lam)
        self.logistic = problem.kind == "logistic"

    @property
    def d(self) -> int:
        return self.problem.d

    def optimum(self) -> tuple[np.ndarray, float]:
        return self.problem.optimum()

    def _reference(self) -> tuple[np.ndarray | None, float | None]:
        return self.optimum() if self.use_optimum else (None, None)

    def smoothness(self) -> tuple[float, float]:
        """``(L, max_p L_p)`` of the global and the workers' local objectives."""
        local = self.problem.worker_smoothness(self._local_rows)
        return self.problem.smoothness(), local

    def worker_grads(self, w: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """``(P, d)`` float32 local (mini-batch) gradients at ``w``."""
        if idx is None and self._blocks and not self.logistic:  # views of X, no copy
            return self.window_grads(w, torch.zeros(self.P, dtype=torch.int64), self.m)
        if idx is None:  # every worker's whole shard: gathered once, kept
            if self._full is None:
                self._full = (self.X[self.shards_t], self.y[self.shards_t])
            Xb, yb = self._full
        else:
            rows = self.shards_t.gather(1, idx)
            Xb, yb = self.X[rows], self.y[rows]
        z = torch.einsum("pbd,d->pb", Xb, w)
        coef = -yb * torch.sigmoid(-yb * z) if self.logistic else z - yb
        g = torch.einsum("pbd,pb->pd", Xb, coef) / Xb.shape[1]
        return g + self.lam * w if self.lam else g

    def window_grads(self, w: torch.Tensor, starts: torch.Tensor, size: int | None = None
                     ) -> torch.Tensor:
        """``(P, d)`` mini-batch gradients on each worker's window of ``size`` (default
        ``batch_size``) rows from ``starts[p]``, wrapping around its shard."""
        b, m = size or self.batch_size, self.m
        if not self._blocks or self.logistic:
            idx = (starts[:, None] + torch.arange(b, device=starts.device)) % m
            return self.worker_grads(w, idx)
        out = torch.empty(self.P, self.d, device=self.device)
        for p in range(self.P):
            lo, s = int(self.shards[p, 0]), int(starts[p])
            parts = [(lo + s, lo + min(m, s + b))] + ([(lo, lo + s + b - m)] if s + b > m
                                                      else [])
            acc = None
            for a, e in parts:
                Xw = self.X[a:e]
                part = (Xw @ w - self.y[a:e]) @ Xw
                acc = part if acc is None else acc.add_(part)
            out[p] = acc.div_(b)
        if self.lam:
            out += self.lam * w
        return out

    def run(self, method: Method, *, iters: int, lr: float, record_every: int | None = None,
            progress: bool = True, w0: np.ndarray | None = None,
            until_dist: float | None = None) -> Curve:
        """Run ``iters`` iterations of ``method`` and return its :class:`Curve`; with
        ``until_dist``, stop at the first recorded ``||w - w*|| <= until_dist``."""
        from tqdm.auto import tqdm

        if iters < 0:
            raise ValueError(f"iters must be >= 0, got {iters}")
        lr = float(method.lr if method.lr is not None else lr)
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"learning rate must be positive, got {lr}")
        comp, fb = method.build()
        every = record_every or max(1, iters // 200)
        w_star, f_star = self._reference()
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        w = (torch.zeros(self.d) if w0 is None else torch.as_tensor(w0, dtype=torch.float32)
             ).to(self.device)
        loss0 = self.problem.loss(w)
        rec_it, rec_loss, rec_dist, rec_bits = [0], [loss0], [_dist(w, w_star)], [0.0]
        rec_body = [0.0]
        total = np.zeros(self.P, dtype=np.int64)
        body = np.zeros(self.P, dtype=np.int64)
        diverged = False
        t0 = time.perf_counter()
        bar = tqdm(range(1, iters + 1), desc=method.label, disable=not progress, leave=False)
        for t in bar:
            idx = None
            if self.batch_size is not None and self.batches == "random":
                idx = torch.randint(self.m, (self.P, self.batch_size), generator=gen
                                    ).to(self.device)
            elif self.batch_size is not None:
                idx = torch.randint(self.m, (self.P,), generator=gen).to(self.device)
            try:
                g = (self.window_grads(w, idx) if self.batches == "window" and idx is not None
                     else self.worker_grads(w, idx))
                v = fb.to_send("w", g)
                sent, nbytes, nbody = self._exchange(comp, v, t)
                fb.commit("w", g, sent)
                u = fb.apply("w", sent.mean(dim=0))
            except NonFiniteGradientError:
                diverged = True
                break
            total += nbytes
            body += nbody
            w = w - lr * u
            if t % every == 0 or t == iters:
                f = self.problem.loss(w)
                if not math.isfinite(f) or f > 1e12 * (abs(loss0) + 1.0):
                    diverged = True
                    break
                rec_it.append(t)
                rec_loss.append(f)
                rec_dist.append(_dist(w, w_star))
                rec_bits.append(8.0 * float(total.mean()))
                rec_body.append(8.0 * float(body.mean()))
                if until_dist is not None and rec_dist[-1] is not None and (
                        rec_dist[-1] <= until_dist):
                    break
        bar.close()
        steps = rec_it[-1] if not diverged else max(1, t - 1)
        return Curve(
            label=method.label, method=method.to_dict(), lr=lr, iters=rec_it, loss=rec_loss,
            dist=rec_dist if w_star is not None else None, bits_per_worker=rec_bits,
            bytes_per_worker_total=[int(b) for b in total],
            bytes_per_step_mean=float(total.mean()) / max(1, steps), f_star=f_star,
            diverged=diverged, seconds=time.perf_counter() - t0,
            body_bytes_per_step_mean=float(body.mean()) / max(1, steps),
            body_bits_per_worker=rec_body,
        )

    def _exchange(self, comp: gradpress.Compressor, v: torch.Tensor, t: int
                  ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Each worker's real payload: encode, serialize, parse, decode. Returns the decoded
        ``(P, d)`` messages, the bytes each worker sent and the bytes of their bodies."""
        sent = torch.empty_like(v, dtype=torch.float32)
        nbytes = np.empty(self.P, dtype=np.int64)
        nbody = np.empty(self.P, dtype=np.int64)
        for p in range(self.P):
            raw = comp.encode(v[p], seed=_payload_seed(self.seed, t, p, self.P)).to_bytes()
            got = Payload.from_bytes(raw)
            nbytes[p], nbody[p] = len(raw), len(got.body)
            sent[p] = comp.decode(got, device=v.device)
        return sent, nbytes, nbody


def _payload_seed(seed: int, t: int, p: int, P: int) -> int:
    return (seed * 1_000_003 + t * P + p) & 0x7FFFFFFFFFFFFFFF


def _dist(w: torch.Tensor, w_star: np.ndarray | None) -> float | None:
    if w_star is None:
        return None
    return float(np.linalg.norm(w.detach().cpu().double().numpy() - w_star))
