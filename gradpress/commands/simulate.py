"""Reproduce the papers' convergence experiments with P simulated workers in one process.

Every message goes through a real payload (encode -> to_bytes -> from_bytes -> decode) and
every bit count is len(payload.to_bytes()). Each experiment writes PNG plots and a JSON of
every curve under --out (default results/simulate/<experiment>) and prints a summary.

Experiments:
  ecq-linear    ECQ-SGD paper (Wu et al., ICML 2018) Sec. 6.1: Syn-256/512/1024 (10k
                samples) and Syn-20K (50k samples of 20k features, 4 GB as float32)
                least squares: full precision, QSGD, ECQ-SGD with the l2 and the l-inf
                scale (s levels), 1-bit SGD with error feedback. Prints per data set the
                compression ratio from the real payloads (body bits, the paper's count, and
                whole payloads), final loss, gap to full precision and the paper's
                statement, and the largest ratio at which ECQ-SGD's final loss is within
                --match-tol of full precision's.
  alpha-beta    ECQ-SGD's final loss over a grid of alpha (compensation coefficient) and
                beta (time-decaying factor), as a heat map.
  optimal-real  Albasyoni et al. 2020 Sec. 7, the poster's setting: compressed gradient
                descent (one node), relative error ||x_t - x*||^2/||x_0 - x*||^2 against
                bytes, and bytes to 1e-4 (message = payload body, the paper's count, and
                whole payloads) for fp32, the best top-k, Spherical Compression (the
                paper's cap code, spherical_cap), biased and unbiased Sparse Dithering:
                ridge on diabetes (d=10), logistic on breast_cancer's 10 mean features
                and on all 30. With --compressors: any methods, P workers, loss vs bits.
Compressors not registered yet are skipped with a note.

Examples:
  gradpress simulate ecq-linear                       # ~14 min on 2 busy cores, 5 GB
  gradpress simulate ecq-linear --dims 20000 --samples 25000 --iters 200   # a quicker 20K
  gradpress simulate ecq-linear --dims 20000 --batch-size 0 --lr 0.01 \
      --methods "fp32,ecq:s=8+ecq:alpha=0.06;beta=1.0"  # full local gradients: ~100x
  gradpress simulate alpha-beta --iters 300
  gradpress simulate optimal-real                     # the poster's table, ~10 min
  gradpress simulate optimal-real --quick             # breast_cancer_mean only, ~30 s
  gradpress simulate optimal-real --compressors "fp32,sparse_dithering+ef21" --workers 8
  gradpress simulate ecq-linear --quick               # ~1 min: a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

HELP = "convergence experiments of both papers on P simulated workers (real payloads)"

EXPERIMENTS = ("ecq-linear", "alpha-beta", "optimal-real")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _common(p: argparse.ArgumentParser, iters: int) -> None:
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: results/simulate/<experiment>)")
    p.add_argument("--workers", type=int, default=8, help="simulated workers P (default 8)")
    p.add_argument("--iters", type=int, default=None,
                   help=f"iterations per run (default {iters}; --quick: a few dozen)")
    p.add_argument("--split", choices=("iid", "noniid", "blocks"), default="iid",
                   help="how rows are dealt to workers (noniid: sorted by label/target; "
                        "blocks: consecutive rows, ecq-linear's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="a small, fast run (fewer workers, iterations, data sets)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    p = sub.add_parser("ecq-linear", help="ECQ-SGD paper, Syn-d least squares")
    _common(p, 1000)
    p.set_defaults(split="blocks")  # Syn-d rows are i.i.d.: mini-batch windows are views
    p.add_argument("--dims", default="256,512,1024,20000", help="Syn-d dimensions (default: "
                   "%(default)s, the paper's)")
    p.add_argument("--samples", type=int, default=None,
                   help="rows of every data set (default: the paper's, 10k; 50k for Syn-20K; "
                        "--quick: 2000)")
    p.add_argument("--s", type=int, default=4, help="quantization levels (paper: 4)")
    p.add_argument("--noise", type=float, default=1.0, help="std of the label noise")
    p.add_argument("--batch-size", type=int, default=32,
                   help="rows per worker per step (0: each worker's whole shard, i.e. "
                        "distributed gradient descent)")
    p.add_argument("--lr", type=float, default=0.02, help="learning rate (paper: 0.02)")
    p.add_argument("--alpha", type=float, default=0.2,
                   help="ECQ compensation coefficient (default: ECQFeedback's)")
    p.add_argument("--beta", type=float, default=0.95,
                   help="ECQ time-decaying factor (default: ECQFeedback's)")
    p.add_argument("--match-tol", type=float, default=0.01,
                   help="relative final-loss gap counted as matching full precision")
    p.add_argument("--methods", default=None,
                   help="comma-separated name[:k=v;...][+feedback[:k=v;...]] specs instead "
                        "of the default five, fp32 first (e.g. a frontier: "
                        "'fp32,ecq:s=8+ecq:alpha=0.05;beta=1')")
    p = sub.add_parser("alpha-beta", help="ECQ-SGD alpha/beta sensitivity heat map")
    _common(p, 300)
    p.add_argument("--alphas", default="0,0.1,0.2,0.3,0.5,0.7,1", help="alpha grid")
    p.add_argument("--betas", default="0,0.5,0.9,0.95,1", help="beta grid")
    p.add_argument("--dim", type=int, default=256, help="Syn-d dimension")
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--compressor", default="qsgd:s=4;bucket_size=None",
                   help="quantizer spec name[:k=v;...] (default: %(default)s)")
    p = sub.add_parser("optimal-real", help="second paper's poster: relative error vs bytes, "
                       "bytes to 1e-4 (compressed GD, real data)")
    _common(p, 20_000)
    p.set_defaults(workers=1)  # the poster's compressed gradient descent: one node
    p.add_argument("--datasets", default=None,
                   help="scikit-learn data sets (diabetes: ridge; others: logistic; "
                        "default: diabetes,breast_cancer_mean,breast_cancer, without a bias "
                        "column; with --compressors: diabetes,breast_cancer,digits)")
    p.add_argument("--compressors", default=None,
                   help="instead of the poster's methods: comma-separated "
                        "name[:k=v;...][+feedback] specs, first is the reference, loss "
                        "against bits (e.g. fp32, QSGD s=1, natural, sparse dithering, "
                        "spherical, top-k+EF/EF21, sign+EF)")
    p.add_argument("--topk", default=None,
                   help="k values of the top-k sweep (default: 1..d-1 for d <= 10, "
                        "1,2,3,5,8,12,20 above)")
    p.add_argument("--lam", type=float, default=1e-2, help="l2 regularization")
    p.add_argument("--lr", type=float, default=None,
                   help="with --compressors: one step size for all (default: theory)")
    p.add_argument("--lr-scale", type=float, default=1.0,
                   help="multiply every theory step by this (default 1)")
    p.add_argument("--target", type=float, default=1e-4,
                   help="relative error (poster) / suboptimality (--compressors) target")


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(max(1, args.threads))
    args.out = args.out or Path("results/simulate") / args.experiment
    args.out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    if args.experiment == "ecq-linear":
        return _ecq_linear(args, progress)
    if args.experiment == "alpha-beta":
        return _alpha_beta(args, progress)
    return _optimal_real(args, progress)


def _write(args: argparse.Namespace, name: str, res: dict[str, Any]) -> Path:
    """``<out>/<name>.json`` with the command line that made it (``res["command"]``)."""
    import shlex

    res["command"] = "gradpress " + shlex.join(getattr(args, "_argv", ["simulate", name]))
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(_clean(res), indent=1, default=str, allow_nan=False))
    return path


def _clean(o: Any) -> Any:
    """Strict JSON: non-finite floats become null."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def _table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k), f) for k, _, f in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


ECQ_COLS = [("label", "method", "s"), ("body_bytes_per_step", "body bytes/step", ".1f"),
            ("body_ratio", "ratio (body)", ".1f"), ("compression_ratio", "ratio (payload)", ".1f"),
            ("final_loss", "final loss", ".5g"), ("rel_loss_gap", "gap vs fp32", "+.2%"),
            ("paper", "the paper says", "s")]


def _ecq_linear(args: argparse.Namespace, progress: bool) -> int:
    from gradpress.sim.experiments import ecq_linear, paper_samples, parse_method
    from gradpress.sim.plots import linear_figure

    dims = [int(x) for x in args.dims.split(",") if x.strip()]
    workers, iters, samples = args.workers, args.iters or 1000, args.samples
    if args.quick:  # Syn-256/512/1024 shrunk: 2000 rows, 4 workers, 60 iterations
        small = [d for d in dims if d <= 1024] or dims[:1]
        if len(small) < len(dims):
            print(f"--quick skips Syn-{', Syn-'.join(str(d) for d in dims if d > 1024)} "
                  "(2000 rows of 20k features are not a least-squares problem worth a "
                  "smoke run; try --dims 20000 --samples 25000 --iters 200)")
        dims, workers, iters = small, min(workers, 4), args.iters or 60
        samples = samples or 2000
    res = ecq_linear(dims, samples=samples, noise=args.noise, workers=workers,
                     batch_size=args.batch_size or None, lr=args.lr, iters=iters, alpha=args.alpha,
                     beta=args.beta, s=args.s, how=args.split, seed=args.seed,
                     match_tol=args.match_tol, progress=progress,
                     methods=[parse_method(m) for m in args.methods.split(",") if m.strip()]
                     if args.methods else None)
    for ds in res["datasets"]:
        linear_figure(ds, args.out / f"ecq_linear_{ds['name']}.png")
        star = f"f* = {ds['f_star']:.5f}" if ds["f_star"] is not None else "f* not solved"
        paper = " (the paper's)" if ds["samples"] == paper_samples(ds["d"]) else ""
        print(f"\n{ds['name']} ({ds['samples']} samples{paper}, {star}, P={workers}, "
              f"{iters} iterations, {ds['seconds']:.0f} s)")
        print(_table(ds["summary"], ECQ_COLS))
        m = ds["match"]
        print(f"ECQ-SGD within {args.match_tol:.0%} of full precision's final loss at "
              + (f"{m['body_ratio']:.1f}x fewer body bits, {m['compression_ratio']:.1f}x "
                 f"fewer payload bits ({m['label']})" if m else "no tested compression ratio"))
    path = _write(args, "ecq_linear", res)
    print(f"wrote {args.out}/ecq_linear_*.png and {path}")
    return 0


def _alpha_beta(args: argparse.Namespace, progress: bool) -> int:
    from gradpress.sim.experiments import alpha_beta, parse_method
    from gradpress.sim.plots import heatmap_figure

    alphas, betas = _floats(args.alphas), _floats(args.betas)
    workers, iters, samples = args.workers, args.iters or 300, args.samples
    if args.quick:
        alphas, betas = alphas[:3], betas[:3]
        workers, iters, samples = min(workers, 4), args.iters or 40, 2000
    spec = parse_method(args.compressor)
    res = alpha_beta(alphas, betas, d=args.dim, samples=samples, noise=args.noise,
                     workers=workers, batch_size=args.batch_size, lr=args.lr, iters=iters,
                     compressor=str(spec.compressor), compressor_kw=spec.compressor_kw,
                     how=args.split, seed=args.seed, progress=progress)
    heatmap_figure(res, args.out / "alpha_beta.png")
    print(f"final loss (full precision {res['full_precision_final_loss']:.5f}, "
          f"f* {res['f_star']:.5f}); rows alpha, columns beta:")
    print("alpha\\beta " + " ".join(f"{b:>9g}" for b in betas))
    for a, row in zip(alphas, res["final_loss"]):
        print(f"{a:>10g} " + " ".join(f"{v:9.5f}" if v is not None else "     div."
                                       for v in row))
    path = _write(args, "alpha_beta", res)
    print(f"wrote {args.out}/alpha_beta.png and {path}")
    return 0


def _optimal_real(args: argparse.Namespace, progress: bool) -> int:
    if args.compressors is None:
        return _poster(args, progress)
    from gradpress.sim.experiments import optimal_real, parse_method
    from gradpress.sim.plots import real_figure

    specs = [s for s in args.compressors.split(",") if s.strip()]
    datasets = [s.strip() for s in (args.datasets or "diabetes,breast_cancer,digits"
                                    ).split(",") if s.strip()]
    workers, iters = args.workers, args.iters or 1000
    if args.quick:
        datasets, workers, iters = datasets[:1], min(workers, 4), args.iters or 60
    res = optimal_real(datasets, [parse_method(s) for s in specs], workers=workers,
                       iters=iters, lam=args.lam, how=args.split, seed=args.seed, lr=args.lr,
                       lr_scale=args.lr_scale, target=args.target, progress=progress)
    cols = [("label", "method", "s"), ("lr", "step", ".3g"),
            ("bytes_per_step", "bytes/step/worker", ".1f"),
            ("compression_ratio", "ratio vs fp32", ".1f"),
            ("excess_loss", "final f - f*", ".3e"),
            ("bits_to_target", f"bits to {args.target:g} rel. gap", ".4g")]
    for ds in res["datasets"]:
        real_figure(ds, args.out / f"optimal_real_{ds['name']}.png")
        print(f"\n{ds['name']} ({ds['kind']}, n={ds['n']}, d={ds['d']}, L={ds['L']:.3g}, "
              f"P={workers}, {iters} iterations, f* = {ds['f_star']:.6f})")
        print(_table(ds["summary"], cols))
    path = _write(args, "optimal_real", res)
    print(f"wrote {args.out}/optimal_real_*.png and {path}")
    return 0


POSTER_COLS = [("method", "method", "s"), ("paper_bytes", "poster: bytes to 1e-4", "s"),
               ("iters", "iterations", "d"), ("message_bytes", "message bytes", ".0f"),
               ("payload_bytes", "payload bytes", ".0f"),
               ("message_vs_fp32", "fp32 / this (message)", ".2f"),
               ("message_vs_topk", "best top-k / this (message)", ".2f"),
               ("payload_vs_fp32", "fp32 / this (payload)", ".2f"),
               ("goal", "goal >=5x fp32, >=4x top-k", "s")]


def _poster(args: argparse.Namespace, progress: bool) -> int:
    """The poster's setting (``gradpress.sim.poster``); ``--quick``: breast_cancer_mean
    only, top-k with k in {1, 5}, at most 2000 iterations."""
    from gradpress.sim.plots import poster_figure
    from gradpress.sim.poster import DATASETS, optimal_poster

    datasets = [s.strip() for s in (args.datasets or ",".join(DATASETS)).split(",")
                if s.strip()]
    ks = {d: [int(k) for k in args.topk.split(",")] for d in range(1, 10_000)
          } if args.topk else {30: [1, 2, 3, 5, 8, 12, 20]}
    max_iters = args.iters or 20_000
    if args.quick:
        datasets = [d for d in datasets if d == "breast_cancer_mean"] or datasets[:1]
        ks = {d: [1, 5] for d in range(1, 10_000)} if not args.topk else ks
        max_iters = args.iters or 2000
    res = optimal_poster(datasets, workers=args.workers, max_iters=max_iters, lam=args.lam,
                         target=args.target, lr_scale=args.lr_scale, ks=ks, seed=args.seed,
                         progress=progress)
    res["settings"]["quick"] = bool(args.quick)
    for ds in res["datasets"]:
        poster_figure(ds, args.out / f"optimal_real_{ds['name']}.png", args.target)
        print(f"\n{ds['name']} ({ds['kind']}, n={ds['n']}, d={ds['d']}, L={ds['L']:.3g}, "
              f"P={args.workers}, bytes per worker to relative error {args.target:g}; "
              f"{ds['seconds']:.0f} s)")
        print(_table(ds["table"], POSTER_COLS))
    path = _write(args, "optimal_real", res)
    print(f"wrote {args.out}/optimal_real_*.png and {path}")
    return 0
