"""The main job: every headline result of gradpress in one run, as one HTML report.

Steps (each a ``gradpress`` subcommand in its own process, outputs under --out):

1. ``bounds``    rate-distortion lower bounds and every compressor measured on real payloads;
2. ``simulate``  ECQ-SGD vs QSGD vs 1-bit SGD vs full precision on least squares;
3. ``train``     DDP training on scikit-learn's digits with 2 torchrun ranks (gloo), with
                 ECQ compression and plain DDP side by side;
4. ``netmodel``  the cost model's speedup predictions;
5. ``federated`` Flower clients sending compressed updates (skipped if flwr is missing).

Writes ``<out>/report.html`` (plots embedded) and ``<out>/demo.json``; a step that fails is
reported in both and makes the exit status non-zero. About 3 minutes on 2 idle cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HELP = "run the main job and write gradpress-demo/report.html"

STEPS: list[tuple[str, str, list[str]]] = [
    ("bounds", "Lower bounds on bits against measured compressors",
     ["bounds"]),
    ("ecq_linear", "ECQ-SGD on least squares (Wu et al. 2018, Sec. 6.1)",
     ["simulate", "ecq-linear", "--dims", "256,1024", "--iters", "800"]),
    ("train_digits", "DDP training on digits, 2 gloo ranks: ECQ 2-bit vs plain DDP",
     ["train", "--nproc", "2", "--task", "digits", "--compressor", "ecq", "--bits", "2",
      "--compare", "--epochs", "8"]),
    ("netmodel", "Performance model: predicted speedup of compression at scale",
     ["netmodel", "--compressors", "fp16,qsgd,ecq,sign"]),
    ("federated", "Federated learning with Flower on non-iid digits",
     ["federated", "--clients", "10", "--rounds", "15",
      "--compressors", "fp32,qsgd,sparse_dithering"]),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="gradpress-demo", help="output folder (default: %(default)s)")
    p.add_argument("--only", default="", help="comma-separated step names to run "
                   f"(default: all of {', '.join(s[0] for s in STEPS)})")


def _run_step(name: str, argv: list[str], out: Path) -> dict:
    step_out = out / name
    step_out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "gradpress", *argv, "--out", str(step_out)]
    t0 = time.time()
    log = step_out / "log.txt"
    with open(log, "w") as f:
        # Output goes to the console (progress bars) and to the log for the report.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        rc = proc.wait()
    return {"name": name, "command": "gradpress " + " ".join(argv), "returncode": rc,
            "seconds": round(time.time() - t0, 1), "out": str(step_out)}


def _section(step: dict, title: str):
    from gradpress.report import Figure, Section

    out = Path(step["out"])
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    return Section(title=title, failed=bool(step["returncode"]),
                   run=f"`{step['command']}`: {step['seconds']} s, exit {step['returncode']}",
                   figures=[Figure(p) for p in sorted(out.glob("*.png"))],
                   markdown=[p.read_text() for p in sorted(out.glob("*.md"))], log=log)


def run(args: argparse.Namespace) -> int:
    from gradpress.report import write_report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = {s for s in args.only.split(",") if s}
    steps = [s for s in STEPS if not only or s[0] in only]
    results, sections = [], []
    t0 = time.time()
    for i, (name, title, argv) in enumerate(steps, 1):
        print(f"\n=== [{i}/{len(steps)}] {title} ===", flush=True)
        step = _run_step(name, argv, out)
        results.append(step)
        sections.append(_section(step, title))
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
            "python": platform.python_version(), "seconds": round(time.time() - t0, 1)}
    report = write_report(out / "report.html", "gradpress demo", sections, meta)
    (out / "demo.json").write_text(json.dumps({"meta": meta, "steps": results}, indent=2))
    print(f"\nreport: {report}  ({meta['seconds']} s)")
    failed = [s["name"] for s in results if s["returncode"]]
    if failed:
        print(f"failed steps: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
