"""The demo report's sections: each step's outputs read back, the papers' numbers beside ours.

A builder per step reads what the step wrote (its JSON first, the Markdown it wrote for
tables people read) and fills a :class:`gradpress.report.Section`: prose, a paper-vs-ours
table, figures, tables. The papers' numbers are constants below, cited as their claims;
ours are always computed from this run's files, never written down here.

Papers: Wu, Huang, Huang, Zhang, "Error Compensated Quantized SGD and its Applications to
Large-scale Distributed Optimization", ICML 2018 (ECQ-SGD); Albasyoni, Safaryan, Condat,
Richtarik, "Optimal Gradient Compression for Distributed and Federated Learning", 2020
(arXiv 2010.03246).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradpress.report import Claim, Figure, Section, Table

ECQ = "Wu et al., ICML 2018"
OPT = "Albasyoni et al. 2020"
#: The papers' claims, as they state them (``{}``: filled with the value at our setting).
PAPER = {
    "ecq_least_squares": f"> 80x at accuracy comparable to full precision ({ECQ})",
    "ecq_overall": f"~100x (up to two orders of magnitude) without performance degradation; "
                   f"> 80x on ResNet-20, CIFAR-10 ({ECQ})",
    "ecq_speedup": f"+143.5%, performance model ({ECQ})",
    "sd_bits": "<= {} bits/coord: 30 + log2 d + 3.35 d bits, near the worst-case bound "
               f"({OPT})",
    "spherical_bits": "< {} bits/block: expected bits below -log2 P(alpha, n) + 3, at our "
                      f"alpha ({OPT})",
    "logistic_bytes": "5.0-5.1x: fp32 ~13.5k B vs Sparse Dithering ~2.65-2.7k B to 1e-4 "
                      f"relative error, logistic regression ({OPT})",
}


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _x(v: float) -> str:
    return f"{v:.1f}x"


# -- 1. bounds ---------------------------------------------------------------------------------
def bounds(out: Path, s: Section) -> None:
    from gradpress import bounds as B

    data = _json(out / "bounds.json")
    rows = [r for r in data["rows"] if "skipped" not in r and r["vectors"] == "gaussian"]
    s.text = ("Every registered compressor encodes seeded Gaussian vectors and real gradients "
              "(an MLP on digits); bits are counted from the real payload bodies and the "
              "distortion from the decoded vectors. The curves are the rate-distortion lower "
              "bounds of the optimal-compression paper: no compressor without shared "
              "randomness sits below the solid curve on every vector.")
    top = max(data["dims"])
    for r in rows:
        cfg = r.get("config") or {}
        if r["name"] == "sparse_dithering" and cfg.get("nu") == 0.1 and not cfg.get("entropy"):
            d = r["d"]
            paper = (30 + math.log2(d) + 3.35 * d) / d
            s.claims.append(Claim(
                "Sparse Dithering bits per coordinate", f"nu = 1/10, Gaussian x, d = {d:,}",
                PAPER["sd_bits"].format(f"{paper:.2f}"),
                f"{r['bits_per_coord']:.2f} bits/coord at distortion {r['distortion']:.3f} "
                f"({r['over_worst']:.2f} over the worst-case bound)", headline=d == top))
        if r["compressor"] == "spherical" and cfg.get("block_size"):
            n = int(cfg["block_size"])
            paper = B.worst_case_bits(1.0 - r["distortion"], n) + 3
            s.claims.append(Claim(
                "Spherical Compression bits per block", f"blocks of n = {n}, {cfg.get('bits')} "
                f"index bits, Gaussian x, d = {r['d']:,}",
                PAPER["spherical_bits"].format(f"{paper:.1f}"),
                f"{r['bits_per_coord'] * n:.1f} bits/block at distortion "
                f"{r['distortion']:.3f}", headline=r["d"] == top))
    s.figures.append(Figure(out / "bounds.png", "Bits per coordinate against distortion, "
                            "one column per dimension d. Colour: compressor family; filled: "
                            "Gaussian vectors, hollow: real gradients. Bottom row: zoom on "
                            "the useful range."))
    s.markdown.append((out / "bounds.md").read_text())


# -- 2. ECQ-SGD on least squares ---------------------------------------------------------------
def ecq_linear(out: Path, s: Section) -> None:
    data = _json(out / "ecq_linear.json")
    st = data["settings"]
    tol = st["match_tol"]
    s.text = (f"Distributed least squares on the paper's synthetic Syn-d problems: {st['workers']}"
              f" simulated workers, {st['iters']} iterations, batch {st['batch_size']} per "
              f"worker, step {st['lr']}, ECQ alpha = {st['alpha']}, beta = {st['beta']}. Every "
              "message is a real payload; the compression ratio is fp32 bytes over the "
              f"method's bytes. A run *matches* full precision when its final loss is within "
              f"{tol:.0%} of full precision's.")
    for ds in data["datasets"]:
        m = ds["match"]
        if m:
            ours = f"{_x(m['compression_ratio'])} ({m['label']}, final loss gap " \
                   f"{m['rel_loss_gap']:+.2%})"
        else:
            ecq = [r for r in ds["summary"] if r["label"].startswith("ECQ")]
            near = min(ecq, key=lambda r: r.get("rel_loss_gap") or math.inf, default=None)
            ours = "no ECQ-SGD run within the tolerance" + (
                f" (closest: {near['label']}, {_x(near['compression_ratio'])}, gap "
                f"{near['rel_loss_gap']:+.2%})" if near and near.get("rel_loss_gap") is not None
                else "")
        s.claims.append(Claim("compression at full-precision loss",
                              f"{ds['name']}, loss within {tol:.0%} of fp32",
                              PAPER["ecq_least_squares"], ours))
        s.figures.append(Figure(out / f"ecq_linear_{ds['name']}.png",
                                f"{ds['name']}: loss and distance to the optimum against "
                                "iterations, and loss against bits sent per worker."))
        s.tables.append(Table(
            ["method", "bytes/step/worker", "ratio vs fp32", "final loss", "gap vs fp32",
             "||w - w*||"],
            [[r["label"], f"{r['bytes_per_step']:.1f}", _x(r["compression_ratio"]),
              f"{r['final_loss']:.5f}" if r.get("final_loss") is not None else "diverged",
              f"{r['rel_loss_gap']:+.2%}" if r.get("rel_loss_gap") is not None else "-",
              f"{r['final_dist']:.3f}" if r.get("final_dist") is not None else "-"]
             for r in ds["summary"]],
            f"{ds['name']} (d = {ds['d']}, f* = {ds['f_star']:.5f})"))


# -- 3. DDP training ---------------------------------------------------------------------------
def train(out: Path, s: Section) -> None:
    ours = _json(out / "train.json")["runs"]
    base_path = out / "ddp" / "train.json"
    base = _json(base_path)["runs"] if base_path.exists() else {}
    s.text = ("Data-parallel training with `torchrun` and gloo on this machine; gradients "
              "pass through the gradpress DDP comm hook, and bytes are what rank 0 sent "
              "(payloads). Plain DDP (fp32 all-reduce) runs with the same seed as the "
              "baseline.")
    rows = []
    for task, r in ours.items():
        b = base.get(task)
        rows.append([task, r["method"], f"{r['final_test_acc']:.4f}",
                     f"{b['final_test_acc']:.4f}" if b else "-",
                     f"{r['payload_bytes']:,}", f"{b['payload_bytes']:,}" if b else "-",
                     _x(b["payload_bytes"] / r["payload_bytes"]) if b else "-"])
        if b:
            gap = 100 * (r["final_test_acc"] - b["final_test_acc"])
            s.claims.append(Claim(
                "compression at full-precision accuracy", f"{task}, {r['params']:,} "
                f"parameters, {r['world_size']} ranks, {r['method']}", PAPER["ecq_overall"],
                f"{_x(b['payload_bytes'] / r['payload_bytes'])} fewer bytes than plain DDP, "
                f"test accuracy {gap:+.1f} points"))
        s.tables.append(_epochs_table(task, r, b))
    s.tables.insert(0, Table(["task", "method", "test acc", "test acc, plain DDP",
                              "bytes sent", "bytes sent, plain DDP", "fewer bytes"],
                             rows, "Final test accuracy and bytes sent by rank 0"))
    if (out / "compare.png").exists():
        s.figures.append(Figure(out / "compare.png", "Test accuracy against epochs and against "
                                "megabytes sent by rank 0: compressed (solid) and plain DDP "
                                "(dashed)."))
    else:
        s.figures += [Figure(out / "train.png", "Compressed run: test accuracy against epochs "
                             "and against megabytes sent by rank 0."),
                      Figure(out / "ddp" / "train.png", "Plain DDP, the same axes.")]


def _epochs_table(task: str, r: dict[str, Any], b: dict[str, Any] | None) -> Table:
    base = {round(q["epoch"], 2): q for q in (b or {}).get("records", [])}
    rows = []
    for q in r["records"]:
        p = base.get(round(q["epoch"], 2))
        rows.append([f"{q['epoch']:.2f}", f"{q['test_acc']:.4f}",
                     f"{p['test_acc']:.4f}" if p else "-", f"{q['payload_bytes'] / 1e6:.3f}",
                     f"{p['payload_bytes'] / 1e6:.3f}" if p else "-"])
    return Table(["epoch", "test acc", "test acc, plain DDP", "MB sent", "MB sent, plain DDP"],
                 rows, f"{task}: per epoch")


# -- 4. performance model ----------------------------------------------------------------------
def netmodel(out: Path, s: Section) -> None:
    data = _json(out / "netmodel.json")
    comp = data["compute"]
    s.text = ("The latency-bandwidth model of ECQ-SGD's Sec. 5, calibrated on this machine: "
              f"compute at {comp['flops_per_s'] / 1e9:.1f} GFLOP/s ({data['machine']['device']}),"
              " each compressor's encode and decode time and its real payload size. A "
              "prediction, not a measurement: the calibration machine sets the codec speed.")
    s.tables.append(Table(
        ["compressor", "bits/element", "encode ms", "decode ms"],
        [[p["label"], f"{p['bits_per_element']:.3f}", f"{p['encode_s'] * 1e3:.2f}",
          f"{p['decode_s'] * 1e3:.2f}"] for p in data["compressors"]],
        f"Calibration: per {data['compressors'][0]['chunk']:,} elements"
        if data["compressors"] else "Calibration"))
    preds = data["predictions"]
    for bw in dict.fromkeys(r["bandwidth_bps"] for r in preds):
        sel = [r for r in preds if r["model"] == "resnet50" and r["workers"] == 512
               and r["bandwidth_bps"] == bw]
        fp32 = min((r for r in sel if r["compressor"] == "fp32"), key=lambda r: r["step_s"],
                   default=None)
        ecq = min((r for r in sel if r["compressor"].startswith("ecq")),
                  key=lambda r: r["step_s"], default=None)
        if fp32 and ecq:
            gain = fp32["step_s"] / ecq["step_s"] - 1
            s.claims.append(Claim(
                "ECQ-SGD speed-up over full precision", f"ResNet-50, 512 workers, "
                f"{bw / 1e9:g} Gbit/s", PAPER["ecq_speedup"],
                f"{gain:+.1%}: ECQ {ecq['scheme']} {ecq['step_s']:.2f} s/step vs fp32 "
                f"{fp32['scheme']} {fp32['step_s']:.2f} s/step", headline=bw == 10e9))
    s.figures += [Figure(out / "speedup.png", "Predicted speedup over one worker, per model "
                         "(rows) and link (columns)."),
                  Figure(out / "breakdown.png", "Where the time of one iteration goes.")]
    s.markdown.append("Per model and link: the speedups of fp32 and fp16 ring all-reduce at the "
                      "largest worker count, the best compressed scheme there, the worker "
                      "counts at which the best two-phase compressor beats fp32 and fp16 ring "
                      "all-reduce, and the largest at which an all-gather still beats fp32 "
                      "ring. Compute is a V100's 125 TFLOP/s; the codecs' times are measured "
                      "on this machine's CPU.\n\n"
                      + (out / "summary.md").read_text())


# -- 5. federated ------------------------------------------------------------------------------
def federated(out: Path, s: Section) -> None:
    data = _json(out / "federated.json")
    a = data["args"]
    s.text = (f"FedAvg on digits split non-iid (Dirichlet({a['alpha']})) over {a['clients']} "
              f"clients, {a['rounds']} rounds, engine: {data['engine']}. Each client sends its "
              "update as a gradpress payload; the uplink is the sum of the real payload bytes.")
    runs = {r["compressor"]: r for r in data["runs"]}
    if "fp32" in runs and "sparse_dithering" in runs:
        target = runs["fp32"]["final_accuracy"] - 0.01
        fp, sd = (_bytes_to(runs[k], target) for k in ("fp32", "sparse_dithering"))
        ours = (f"{_x(fp / sd)} (fp32 {fp:,} B / SD {sd:,} B)" if fp and sd
                else "Sparse Dithering never reaches it")
        s.claims.append(Claim("fp32 bytes / Sparse Dithering bytes to the same target",
                              f"ours: FedAvg MLP, uplink to test accuracy {target:.3f} "
                              "(fp32's final - 1 point); paper: logistic regression",
                              PAPER["logistic_bytes"], ours))
    s.figures.append(Figure(out / "federated.png", "Test accuracy against cumulative uplink "
                            "bytes (left) and against rounds (right)."))
    s.markdown.append("Final test accuracy and total uplink per compressor.\n\n"
                      + (out / "federated.md").read_text())


def _bytes_to(run: dict[str, Any], accuracy: float) -> int | None:
    """Cumulative uplink bytes at the first round whose test accuracy reaches ``accuracy``."""
    return next((r["cumulative_uplink_bytes"] for r in run["rounds"]
                 if r["round"] > 0 and r["test_accuracy"] >= accuracy), None)


# -- any other step ----------------------------------------------------------------------------
def generic(out: Path, s: Section) -> None:
    s.figures += [Figure(p) for p in sorted(out.glob("*.png"))]
    s.markdown += [p.read_text() for p in sorted(out.glob("*.md"))]


BUILDERS: dict[str, Callable[[Path, Section], None]] = {
    "bounds": bounds, "ecq_linear": ecq_linear, "train_digits": train,
    "netmodel": netmodel, "federated": federated,
}


def build(step: dict[str, Any], title: str) -> Section:
    """The report section of one demo step (``step``: as ``demo._run_step`` returns it)."""
    out = Path(step["out"])
    log = out / "log.txt"
    s = Section(title=title, failed=bool(step["returncode"]),
                run=f"`{step['command']}`: {step['seconds']} s, exit {step['returncode']}",
                log=log.read_text(errors="replace") if log.exists() else "")
    try:
        BUILDERS.get(step["name"], generic)(out, s)
    except (OSError, KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        s.text += (f"\n\n**Outputs incomplete** ({type(e).__name__}: {e}); "
                   "see the log below.")
    return s
