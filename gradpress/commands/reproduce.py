"""Print the papers' claims beside our measured numbers and the command that made each.

Reads every ecq_linear.json that `gradpress simulate ecq-linear` wrote in a folder under
--results (default results/simulate/; the default run writes results/simulate/ecq-linear/,
give other runs --out results/simulate/<name>), each row naming the command that made it.
With --quick and no default results, the --quick form runs first (small data, few
iterations: a smoke test of the pipeline, not the paper's numbers).

Also reads optimal_real.json (`gradpress simulate optimal-real`, the "Optimal Gradient
Compression" poster's setting): per data set, bytes to relative error 1e-4 of fp32, the best
top-k, Spherical Compression and Sparse Dithering, the poster's number beside ours.

Rows so far (ECQ-SGD, Wu, Huang, Huang, Zhang, ICML 2018; the claims paraphrased from the
paper's abstract and Sec. 6.1):
  * per Syn-d data set: ECQ-SGD (l2 scale) reaches 32Bit-FP's loss;
  * QSGD, the same quantizer without compensation, ends worse than ECQ-SGD;
  * compression "by a factor of up to two magnitudes without performance degradation":
    the largest ratio (payload bodies, the paper's count) at which an ECQ-SGD run ends
    within --match-tol of 32Bit-FP;
  * ResNet-20 (Sec. 6.2): ">80x less communication at comparable accuracy", from the
    ecq_resnet.json of `gradpress train --experiment ecq-resnet` (digits, not CIFAR-10)
    in a folder beside --results (results/train/*/ by default).

Examples:
  gradpress simulate ecq-linear && gradpress reproduce
  gradpress reproduce --quick          # runs the --quick forms that are missing
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

HELP = "the papers' claims, their numbers, ours, and the command that made ours"

ECQ_JSON = ("ecq-linear", "ecq_linear.json")
RESNET_JSON = ("resnet-digits", "ecq_resnet.json")
OPT_JSON = ("optimal-real", "optimal_real.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=Path("results/simulate"),
                   help="folder of the experiments' outputs (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="run the --quick form of experiments whose results are missing")


def run(args: argparse.Namespace) -> int:
    for folder, name in (ECQ_JSON, OPT_JSON):
        default = args.results / folder / name
        if not default.exists() and args.quick:
            from gradpress.cli import main

            main(["simulate", folder, "--quick", "--no-progress", "--out",
                  str(default.parent)])
    found = sorted(args.results.glob(f"*/{ECQ_JSON[1]}"))
    opt = sorted(args.results.glob(f"*/{OPT_JSON[1]}"))
    resnet = list((args.results.parent / "train").glob(f"*/{RESNET_JSON[1]}"))
    if not found and not opt and not resnet:
        print(f"no results under {args.results}: run `gradpress simulate ecq-linear`, "
              "`gradpress simulate optimal-real` and `gradpress train --experiment "
              "ecq-resnet` (or add --quick)")
        return 1
    rows = [r for path in found for r in ecq_rows(json.loads(path.read_text()))]
    rows += [r for path in opt for r in optimal_rows(json.loads(path.read_text()))]
    rows += resnet_rows_under(args.results.parent / "train", args.quick)
    print(table(rows))
    return 0


def _kb(v: float | None) -> str:
    return "not reached" if v is None else f"{v / 1000:.2f}k"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def optimal_rows(res: dict[str, Any]) -> list[dict[str, str]]:
    """The poster's rows from ``optimal_real.json``: bytes to the target per method
    (message = payload bodies, the paper's count; whole payloads beside them)."""
    cmd = res.get("command", "gradpress simulate optimal-real")
    target = res.get("settings", {}).get("target", 1e-4)
    quick = " (--quick)" if res.get("settings", {}).get("quick") else ""
    rows = []
    for ds in res.get("datasets", []):
        for t in ds.get("table", []):
            ours = (f"{_kb(t['message_bytes'])} message bytes, {_kb(t['payload_bytes'])} "
                    f"payload; {_x(t['message_vs_fp32'])} under fp32, "
                    f"{_x(t['message_vs_topk'])} under best top-k (message)")
            if "goal" in t:
                ours += f"; goal {t['goal']}"
            rows.append({"claim": f"{ds['name']} (d={ds['d']}, {ds['kind']}){quick}: "
                                  f"bytes to {target:g} rel. error, {t['method']}",
                         "paper": t.get("paper_bytes") or "-", "ours": ours,
                         "command": cmd})
    return rows


def _pct(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "diverged"
    return f"{v:+.2%}"


def _ecq(summary: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first ECQ-SGD run (ECQ feedback): the paper's l2 one in the default table."""
    return next((r for r in summary if r.get("feedback") == "ecq"), None)


def _qsgd(summary: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The same quantizer without compensation (QSGD), if the run has it."""
    return next((r for r in summary if r.get("compressor") in ("qsgd", "ecq")
                 and r.get("feedback") == "none"), None)


def _ours(r: dict[str, Any] | None) -> str:
    if r is None:
        return "not run"
    if r.get("diverged"):
        return f"diverged ({r['label']})"
    return (f"{_pct(r.get('rel_loss_gap'))} at {r['body_ratio']:.1f}x body "
            f"({r['compression_ratio']:.1f}x payload), {r['label']}")


def ecq_rows(res: dict[str, Any]) -> list[dict[str, str]]:
    """The ECQ-SGD rows of the table from ``ecq_linear.json``."""
    cmd = res.get("command", "gradpress simulate ecq-linear")
    tol = res.get("settings", {}).get("match_tol", 0.01)
    rows = []
    for ds in res["datasets"]:
        summ = ds["summary"]
        ecq, qsgd = _ecq(summ), _qsgd(summ)
        name = f"{ds['name']} ({ds.get('samples', '?')} samples)"
        rows.append({"claim": f"{name}: ECQ-SGD reaches 32Bit-FP's loss",
                     "paper": "same loss as 32Bit-FP (Fig. 2)", "ours": _ours(ecq),
                     "command": cmd})
        if qsgd is not None:
            rows.append({"claim": f"{name}: QSGD ends worse than ECQ-SGD at equal bits",
                         "paper": "QSGD above ECQ-SGD (Fig. 2)", "ours": _ours(qsgd),
                         "command": cmd})
    if res["datasets"]:
        big = max(res["datasets"], key=lambda ds: ds["d"])
        m = big.get("match")
        fed = [r for r in big["summary"] if r.get("feedback") == "ecq"
               and not r.get("diverged")]
        best = min(fed, key=lambda r: r.get("rel_loss_gap", math.inf), default=None)
        ours = (f"{m['body_ratio']:.1f}x body ({m['compression_ratio']:.1f}x payload) at "
                f"{_pct(m['rel_loss_gap'])} ({m['label']})" if m else
                f"none within {tol:.0%}; closest: " + _ours(best))
        rows.append({"claim": f"{big['name']}: compression by up to ~100x without "
                              "degradation", "paper": ">= 100x at 32Bit-FP's loss",
                     "ours": ours, "command": cmd})
    return rows


def resnet_rows_under(root: Path, quick: bool) -> list[dict[str, str]]:
    """The ResNet-20 rows from every ``ecq_resnet.json`` under ``root/*/``; with ``quick``
    and none there, runs ``gradpress train --experiment ecq-resnet --quick`` first."""
    default = root / RESNET_JSON[0] / RESNET_JSON[1]
    if quick and not list(root.glob(f"*/{RESNET_JSON[1]}")):
        from gradpress.cli import main

        main(["train", "--experiment", "ecq-resnet", "--quick", "--out", str(default.parent)])
    return [r for path in sorted(root.glob(f"*/{RESNET_JSON[1]}"))
            for r in resnet_rows(json.loads(path.read_text()))]


def resnet_rows(res: dict[str, Any]) -> list[dict[str, str]]:
    """ECQ-SGD's ResNet-20 row from ``ecq_resnet.json``: the highest-ratio compressed method
    within the accuracy tolerance of fp32, else the best (ratio, gap) of each method."""
    tol = res.get("settings", {}).get("gap_tol_pts", 0.5)
    m = res.get("match")

    def one(s: dict[str, Any]) -> str:
        worst = s.get("worst_gap_pts")
        spread = f" (worst seed {worst:+.2f})" if worst is not None and len(
            s.get("seeds", [])) > 1 else ""
        return (f"{s['ratio']:.1f}x payload ({s['body_ratio']:.1f}x body) at "
                f"{s['acc_gap_pts']:+.2f} pts vs fp32{spread}, {s['label']}")

    if m:
        ours = one(m)
    else:
        comp = [s for s in res["summary"] if s["label"] != "fp32"]
        ours = f"none within {tol} pts; " + "; ".join(one(s) for s in comp)
    n = len(res.get("settings", {}).get("seeds", "0").split(","))
    ours += f" ({n} seed{'s' if n > 1 else ''}, digits 8x8 not CIFAR-10)"
    if res.get("quick"):
        ours += " [--quick: a pipeline smoke test, not the paper's number]"
    cmd = res.get("command", "gradpress train --experiment ecq-resnet")
    rows = [{"claim": "ResNet-20, 2 DDP ranks: >80x less communication at comparable "
                      "accuracy (paper: CIFAR-10)",
             "paper": ">80x, accuracy comparable to 32-bit (Sec. 6.2)", "ours": ours,
             "command": cmd}]
    qsgd = next((s for s in res["summary"] if s["label"].startswith("QSGD")), None)
    if qsgd is not None:
        rows.append({"claim": "ResNet-20: QSGD (no compensation) ends below ECQ-SGD",
                     "paper": "QSGD below ECQ-SGD", "ours": one(qsgd), "command": cmd})
    return rows


def table(rows: list[dict[str, str]]) -> str:
    cols = [("claim", "claim"), ("paper", "paper"), ("ours", "ours"),
            ("command", "command that made ours")]
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(r[k] for k, _ in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])
