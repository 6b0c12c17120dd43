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

The report reads like a paper: run metadata (date, command, duration, machine, versions) in
a table, then a table of the papers' numbers beside ours, then one section per step with its
own paper-vs-ours table, figures and tables (``_demo_sections`` reads each step's JSON and
Markdown back; ours is always computed from those files) and its console log, folded.
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
     ["netmodel", "--compressors", "fp16,qsgd,ecq,sign", "--flops", "1.25e14"]),
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


def _cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "cpu"
    return next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                 if ln.startswith("model name")), platform.processor() or "cpu")


def _meta(args: argparse.Namespace, seconds: float, results: list[dict]) -> dict[str, str]:
    """Run metadata for the report's opening table and demo.json."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    failed = [s["name"] for s in results if s["returncode"]]
    command = f"gradpress demo --out {args.out}" + (f" --only {args.only}" if args.only else "")
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command,
            "duration": f"{seconds:.1f} s ({len(results)} steps, "
                        f"{len(failed)} failed{': ' + ', '.join(failed) if failed else ''})",
            "machine": f"{platform.machine()} {platform.system()} ({_cpu_name()}), "
                       f"{os.cpu_count()} cores",
            "python": platform.python_version(), "torch": ver("torch"),
            "numpy": ver("numpy"), "flwr": ver("flwr")}


ABSTRACT = """This report reruns the headline experiments of two papers with gradpress:
ECQ-SGD (Wu et al., ICML 2018) and Optimal Gradient Compression (Albasyoni, Safaryan, Condat,
Richtarik 2020). Every size is the length of a real payload and every number of *ours* is
computed from this run's output files; the papers' numbers are their claims, on their
hardware and settings. The table below collects each section's paper-versus-ours
comparisons; the sections give the details, figures and full tables."""


def run(args: argparse.Namespace) -> int:
    from gradpress.commands._demo_sections import build
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
        sections.append(build(step, title))
    seconds = time.time() - t0
    meta = _meta(args, seconds, results)
    report = write_report(out / "report.html", "gradpress demo: gradient compression, "
                          "paper claims and this run", sections, meta, ABSTRACT)
    (out / "demo.json").write_text(json.dumps({"meta": meta, "seconds": round(seconds, 1),
                                               "steps": results}, indent=2))
    print(f"\nreport: {report}  ({seconds:.1f} s)")
    failed = [s["name"] for s in results if s["returncode"]]
    if failed:
        print(f"failed steps: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
