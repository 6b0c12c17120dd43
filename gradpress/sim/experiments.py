"""The papers' convergence experiments on the simulator (``gradpress simulate ...``).

1. ``ecq_linear``: ECQ-SGD (Wu, Huang, Huang, Zhang, ICML 2018, Sec. 6.1, Fig. 2). Syn-d
   least squares (``y = w*^T x + eps``): Syn-256/512/1024 with 10k samples and Syn-20K with
   50k samples of 20k features (float32, 4 GB; its exact optimum is not solved), learning
   rate 0.02, 1000 iterations, ``s = 4`` (the paper's settings). Methods: full precision;
   QSGD (the ECQ quantizer with the l2 scale and the same codes, no compensation); ECQ-SGD
   with the l2 and with the l-inf scale (``ecq`` compressor, one scale per vector, the
   smallest of its codes) and ECQ feedback; 1-bit SGD (scaled sign, error feedback). The
   paper does not state its worker count, mini-batch size, noise level or ``(alpha,
   beta)`` for these runs; ours are options (defaults: 8 workers, windows of 32 rows per
   worker per step on contiguous shards of the i.i.d. rows, unit noise, ``ECQFeedback``'s
   ``alpha = 0.2, beta = 0.95``). Per data set: compression ratios from the real payloads
   (bodies, the paper's count, and whole payloads), final loss (mean of the last 10% of
   recorded points), gap to full precision, the paper's statement.
2. ``alpha_beta``: final loss of ECQ-SGD over a grid of ``alpha`` (compensation
   coefficient) and ``beta`` (time-decaying factor); ``alpha = 0`` is QSGD.
3. ``optimal_real``: Albasyoni, Safaryan, Condat, Richtarik 2020 (Sec. 7): distributed
   compressed gradient descent on real data bundled with scikit-learn (ridge on diabetes,
   logistic on breast_cancer and digits 0-4 vs 5-9), Sparse Dithering, Spherical
   Compression, QSGD, natural (dithering), top-k with EF/EF21, ...; loss against bits.
   Step sizes from theory: DCGD ``1/(L + 2 omega L_max / P)`` for unbiased compressors
   (Khirirat et al. 2018; Gorbunov et al. 2020), EF21's ``1/(L + L_max sqrt(b/t))`` with
   ``t = 1 - sqrt(1 - a)``, ``b = (1 - a)/t`` for contractive ones (Richtarik et al. 2021,
   Thm 1), ``1/L`` otherwise. (``gradpress simulate optimal-real --compressors ...``; without
   ``--compressors`` the command runs the poster's setting, :mod:`gradpress.sim.poster`.)

Compressors are built by registry name; a name not (yet) registered, or whose options it
does not take, is skipped with a printed note. Every size is ``len(payload.to_bytes())``.
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import gradpress
from gradpress.sim.data import split
from gradpress.sim.loop import Curve, Method, Simulation
from gradpress.sim.problems import Problem, real_dataset, synthetic_linear
from gradpress.specs import parse_spec

Note = Callable[[str], None]


def parse_method(spec: str) -> Method:
    """``"name[:k=v;k=v][+feedback[:k=v;...]]"`` -> :class:`Method` (label = the spec)."""
    spec = spec.strip()
    comp_part, _, fb_part = spec.partition("+")
    name, kw = parse_spec(comp_part)
    fb_name, fb_kw = parse_spec(fb_part) if fb_part else ("none", {})
    return Method(spec, name, kw, fb_name, fb_kw)


def usable(methods: list[Method], note: Note = print) -> list[Method]:
    """The methods whose compressor is registered and accepts its options; notes the rest."""
    out = []
    for m in methods:
        name = m.compressor if isinstance(m.compressor, str) else m.compressor.name
        if isinstance(m.compressor, str) and name not in gradpress.available():
            note(f"note: skipping {m.label!r}: compressor {name!r} is not registered yet")
            continue
        try:
            m.build()
        except (TypeError, ValueError) as e:
            note(f"note: skipping {m.label!r}: {e}")
            continue
        out.append(m)
    return out


def machine() -> dict[str, Any]:
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "processor": platform.processor(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gradpress": gradpress.__version__, "compressors": gradpress.available()}


def _summary_row(c: Curve, ref: Curve | None) -> dict[str, Any]:
    """Final loss and bytes of one curve; against ``ref`` (full precision): the compression
    ratio of whole payloads (``compression_ratio``) and of their bodies (``body_ratio``,
    the paper's count: no header), both from the bytes actually sent."""
    fin = c.final_loss()
    row = {"label": c.label, "compressor": c.method["compressor"],
           "feedback": c.method["feedback"], "bytes_per_step": c.bytes_per_step_mean,
           "body_bytes_per_step": c.body_bytes_per_step_mean,
           "final_loss": fin, "excess_loss": fin - c.f_star if c.f_star is not None else None,
           "final_dist": (c.dist[-1] if c.dist and not c.diverged else math.inf)
           if c.dist is not None else None,
           "diverged": c.diverged, "lr": c.lr, "seconds": c.seconds}
    if ref is not None:
        row["compression_ratio"] = ref.bytes_per_step_mean / c.bytes_per_step_mean
        row["body_ratio"] = ref.body_bytes_per_step_mean / c.body_bytes_per_step_mean
        rf = ref.final_loss()
        row["rel_loss_gap"] = (fin - rf) / abs(rf) if math.isfinite(fin) else math.inf
    return row


# -- 1. ECQ-SGD on Syn-d ------------------------------------------------------------------
#: The paper's sample counts: 10k rows for Syn-256/512/1024, 50k for Syn-20K.
def paper_samples(d: int) -> int:
    return 50_000 if d >= 20_000 else 10_000


#: What the paper says of each method (Wu et al. 2018; paraphrased: abstract and Sec. 6.1).
PAPER_SAYS = {
    "32Bit-FP": "the baseline: 32 bits a coordinate",
    "QSGD": "unbiased but no compensation: slower convergence than ECQ-SGD at equal bits",
    "ECQ-SGD": "matches 32Bit-FP's loss; compresses gradients by up to ~100x (abstract)",
    "1Bit-SGD": "error feedback with 1-bit codes: ~32x, compared against",
}


def paper_says(label: str) -> str:
    return next((v for k, v in PAPER_SAYS.items() if label.startswith(k)), "")


def linear_methods(alpha: float, beta: float, s: int = 4) -> list[Method]:
    """fp32, QSGD (ECQ's quantizer and codes without compensation), ECQ-SGD with the l2 and
    the l-inf scale (the paper's quantizer, one scale per vector), 1-bit SGD."""
    ecq = {"alpha": alpha, "beta": beta}
    return [Method("32Bit-FP", "fp32"),
            Method(f"QSGD s={s} l2", "qsgd", {"s": s, "bucket_size": None, "entropy": "best"}),
            Method(f"ECQ-SGD s={s} l2", "ecq", {"s": s, "norm": "l2"}, "ecq", ecq),
            Method(f"ECQ-SGD s={s} l-inf", "ecq", {"s": s, "norm": "linf"}, "ecq", ecq),
            Method("1Bit-SGD (sign + EF)", "sign", {}, "ef")]


def ecq_linear(datasets: list[int], *, samples: int | None = None, noise: float = 1.0,
               workers: int = 8, batch_size: int | None = 32, lr: float = 0.02,
               iters: int = 1000, alpha: float = 0.2, beta: float = 0.95, s: int = 4,
               how: str = "blocks", seed: int = 0, match_tol: float = 0.01,
               points: int | None = None, methods: list[Method] | None = None,
               progress: bool = True, note: Note = print) -> dict[str, Any]:
    """Experiment 1; returns ``{"settings", "datasets": [{"name", "curves", "summary",
    "match"}]}`` (see the module docstring). ``samples=None``: the paper's count per
    ``d``; data is float32 (Syn-20K: 4 GB); ``points`` recorded losses per run (default
    200, or 50 where the exact optimum is out of reach: each costs a pass over ``X``)."""
    methods = usable(methods or linear_methods(alpha, beta, s), note)
    out = []
    for d in datasets:
        t0 = time.perf_counter()
        n = samples or paper_samples(d)
        pr = synthetic_linear(n, d, noise=noise, seed=seed, dtype=np.float32)
        exact = pr.optimum_fits
        sim = Simulation(pr, split(pr.n, workers, how, key=pr.y, seed=seed),
                         batch_size=batch_size, seed=seed, optimum=exact, batches="window")
        f_star = sim.optimum()[1] if exact else None
        npts = points or (200 if exact else 50)
        curves = _run_all(sim, methods, iters, lr, progress, note,
                          record_every=max(1, iters // npts))
        ref = curves[0] if methods and methods[0].compressor == "fp32" else None
        rows = [_summary_row(c, ref) | {"paper": paper_says(c.label)} for c in curves]
        out.append({"name": pr.name, "d": d, "samples": n, "f_star": f_star,
                    "curves": [c.to_dict() for c in curves], "summary": rows,
                    "match": _best_match(rows, match_tol),
                    "seconds": time.perf_counter() - t0})
        del sim, pr
    return {"settings": {"samples": samples, "noise": noise, "workers": workers,
                         "batch_size": batch_size, "lr": lr, "iters": iters, "alpha": alpha,
                         "beta": beta, "s": s, "split": how, "seed": seed,
                         "match_tol": match_tol, "points": points,
                         "methods": [m.to_dict() for m in methods]},
            "machine": machine(), "datasets": out}


def _best_match(rows: list[dict[str, Any]], tol: float) -> dict[str, Any] | None:
    """The ECQ-SGD run (ECQ feedback) with the largest compression ratio whose final loss
    is within ``tol`` (relative) of full precision's."""
    ok = [r for r in rows if r.get("feedback") == "ecq" and not r["diverged"]
          and r.get("rel_loss_gap", math.inf) <= tol]
    return max(ok, key=lambda r: r["compression_ratio"]) if ok else None


# -- 2. alpha/beta grid ---------------------------------------------------------------------
def alpha_beta(alphas: list[float], betas: list[float], *, d: int = 256,
               samples: int = 10_000, noise: float = 1.0, workers: int = 8,
               batch_size: int | None = 32, lr: float = 0.02, iters: int = 400,
               compressor: str = "qsgd", compressor_kw: dict[str, Any] | None = None,
               how: str = "iid", seed: int = 0, progress: bool = True,
               note: Note = print) -> dict[str, Any]:
    """Experiment 2: final loss (and ``||w - w*||``) of ECQ-SGD over ``alphas x betas``."""
    from tqdm.auto import tqdm

    kw = {"s": 4, "bucket_size": None} if compressor_kw is None else compressor_kw
    pr = synthetic_linear(samples, d, noise=noise, seed=seed)
    sim = Simulation(pr, split(pr.n, workers, how, key=pr.y, seed=seed),
                     batch_size=batch_size, seed=seed)
    base = usable([Method("32Bit-FP", "fp32"), Method("probe", compressor, kw)], note)
    if len(base) < 2:
        raise ValueError(f"compressor {compressor!r} with {kw} is not usable here")
    ref = sim.run(base[0], iters=iters, lr=lr, progress=False)
    loss = np.full((len(alphas), len(betas)), np.inf)
    dist = np.full_like(loss, np.inf)
    curves = []
    bar = tqdm(total=len(alphas) * len(betas), desc="alpha/beta grid", disable=not progress)
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            m = Method(f"ECQ a={a:g} b={b:g}", compressor, kw, "ecq", {"alpha": a, "beta": b})
            c = sim.run(m, iters=iters, lr=lr, progress=False)
            loss[i, j] = c.final_loss()
            dist[i, j] = c.dist[-1] if not c.diverged else np.inf
            curves.append(c.to_dict())
            bar.update()
    bar.close()
    return {"settings": {"d": d, "samples": samples, "noise": noise, "workers": workers,
                         "batch_size": batch_size, "lr": lr, "iters": iters,
                         "compressor": compressor, "compressor_kw": kw, "split": how,
                         "seed": seed},
            "machine": machine(), "alphas": list(alphas), "betas": list(betas),
            "final_loss": _jsonable(loss), "final_dist": _jsonable(dist),
            "f_star": sim.optimum()[1], "full_precision": ref.to_dict(),
            "full_precision_final_loss": ref.final_loss(), "curves": curves}


def _jsonable(a: np.ndarray) -> list[list[float | None]]:
    return [[float(v) if math.isfinite(v) else None for v in row] for row in a]


# -- 3. second paper on real data -------------------------------------------------------
REAL_DEFAULT = ("fp32,qsgd:s=1,natural,natural_dithering,terngrad,sparse_dithering,"
                "sparse_dithering+ef21,sparse_dithering_rand,spherical,spherical+ef21,"
                "topk:ratio=0.1+ef,topk:ratio=0.1+ef21,sign+ef")


def theory_step(sim: Simulation, comp: gradpress.Compressor, feedback: str) -> float:
    """The step size rule of the module docstring."""
    L, Lmax = sim.smoothness()
    d = sim.d
    omega = comp.omega(d) if comp.unbiased else None
    if feedback == "none" and omega is not None:
        return 1.0 / (L + 2.0 * omega * Lmax / sim.P)
    a = comp.alpha(d)
    if feedback in ("ef", "ef21") and a is not None and 0 < a < 1:
        t = 1.0 - math.sqrt(1.0 - a)
        return 1.0 / (L + Lmax * math.sqrt((1.0 - a) / t / t))
    return 1.0 / L


def optimal_real(datasets: list[str], methods: list[Method], *, workers: int = 8,
                 iters: int = 1000, lam: float = 1e-2, how: str = "iid", seed: int = 0,
                 lr: float | None = None, lr_scale: float = 1.0, target: float = 1e-4,
                 progress: bool = True,
                 note: Note = print) -> dict[str, Any]:
    """Experiment 3: distributed compressed GD (full local gradients) on real data."""
    methods = usable(methods, note)
    out = []
    for name in datasets:
        pr: Problem = real_dataset(name, lam=lam)
        sim = Simulation(pr, split(pr.n, workers, how, key=pr.y, seed=seed), batch_size=None,
                         seed=seed)
        runs = []
        for m in methods:
            step = lr if lr is not None else lr_scale * theory_step(sim, m.build()[0],
                                                                    m.feedback)
            runs.append(Method(m.label, m.compressor, m.compressor_kw, m.feedback,
                               m.feedback_kw, m.lr if m.lr is not None else step))
        curves = _run_all(sim, runs, iters, 1.0, progress, note)
        ref = curves[0] if runs and runs[0].compressor == "fp32" else None
        rows = [_summary_row(c, ref) | {"bits_to_target": _bits_to(c, target)}
                for c in curves]
        L, Lmax = sim.smoothness()
        out.append({"name": name, "kind": pr.kind, "n": sim.problem.n, "d": sim.d, "L": L,
                    "L_max": Lmax, "f_star": sim.optimum()[1],
                    "curves": [c.to_dict() for c in curves], "summary": rows})
    return {"settings": {"workers": workers, "iters": iters, "lam": lam, "split": how,
                         "seed": seed, "lr": lr, "lr_scale": lr_scale, "target": target,
                         "methods": [m.to_dict() for m in methods]},
            "machine": machine(), "datasets": out}


def _bits_to(c: Curve, target: float) -> float | None:
    """Bits per worker until ``(f - f*) <= target (f_0 - f*)`` (None if never)."""
    if c.f_star is None:
        return None
    gap0 = c.loss[0] - c.f_star
    for f, b in zip(c.loss, c.bits_per_worker):
        if f - c.f_star <= target * gap0:
            return b
    return None


def _run_all(sim: Simulation, methods: list[Method], iters: int, lr: float, progress: bool,
             note: Note, record_every: int | None = None) -> list[Curve]:
    from tqdm.auto import tqdm

    curves = []
    for m in tqdm(methods, desc=f"{sim.problem.name} (P={sim.P})", disable=not progress):
        c = sim.run(m, iters=iters, lr=lr, progress=progress, record_every=record_every)
        if c.diverged:
            note(f"note: {m.label!r} diverged on {sim.problem.name} (lr={c.lr:g})")
        curves.append(c)
    return curves
