"""Encode/decode throughput of every registered compressor, against ``x.clone()``.

For each compressor on one float32 tensor (``--numel``, default 2^24 elements, standard
normal, seed 0) we time ``x.clone()``, ``encode(x)`` and ``decode(payload)`` in turn,
``--repeat`` times after one warm-up, and take each median. ``x.clone()`` of 64 MiB is
bimodal (glibc hands out either fresh pages, which fault in, or a block just freed): one
row's clone may read 4 GB/s and the next 30 GB/s. So every ratio divides by one baseline,
the median of all clone timings of the run (interleaved with every compressor's). Reported:

* encode / decode throughput in GB/s of input (``4 * numel`` bytes per call);
* each as a ratio to the clone rate (``t_clone / t_encode``; 1.0 = as fast as a copy);
* the encode+decode ratio ``t_clone / (t_encode + t_decode)``;
* bits per coordinate, ``8 * len(payload.to_bytes()) / numel``.

Prints a Markdown table headed by the date, machine, torch version and thread count.

    python benchmarks/throughput.py                      # every compressor, 2^24 elements
    python benchmarks/throughput.py --numel 1048576 --repeat 3 \\
        --compressors sign fp16 qsgd qsgd:sparse=False ecq:bits=4,norm=l2
"""

from __future__ import annotations

import argparse
import ast
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time

import torch
from tqdm import tqdm

import gradpress


def parse_spec(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value,key=value`` (values as Python literals)."""
    name, _, rest = spec.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return name, kwargs


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(spec: str, x: torch.Tensor, repeat: int) -> dict:
    """Median times of clone, encode and decode, interleaved run by run so that all three
    see the same machine load."""
    name, kwargs = parse_spec(spec)
    c = gradpress.get(name, **kwargs)
    wire = c.encode(x, seed=1).to_bytes()  # warm-up
    c.decode(wire)
    t_clone, t_enc, t_dec = [], [], []
    for _ in range(repeat):
        t_clone.append(_timed(x.clone)[0])
        t, payload = _timed(lambda: c.encode(x, seed=1))
        t_enc.append(t)
        wire = payload.to_bytes()
        t_dec.append(_timed(functools.partial(c.decode, wire))[0])
    te, td = statistics.median(t_enc), statistics.median(t_dec)
    gb = 4 * x.numel() / 1e9
    return {
        "compressor": spec, "t_clone_runs_s": t_clone, "t_encode_s": te, "t_decode_s": td,
        "encode_GBps": gb / te, "decode_GBps": gb / td,
        "bits_per_coord": 8 * len(wire) / x.numel(),
    }


def add_ratios(rows: list[dict], numel: int) -> float:
    """Ratios of every row to the run's median clone time; returns that clone rate (GB/s)."""
    tc = statistics.median(t for r in rows for t in r["t_clone_runs_s"])
    for r in rows:
        r.update(t_clone_s=tc, encode_ratio=tc / r["t_encode_s"],
                 decode_ratio=tc / r["t_decode_s"],
                 roundtrip_ratio=tc / (r["t_encode_s"] + r["t_decode_s"]))
    return 4 * numel / 1e9 / tc


def machine() -> str:
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} torch threads")


def table(rows: list[dict], numel: int, repeat: int) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Throughput on {numel} float32 elements ({4 * numel / 2**20:.0f} MiB), median of "
        f"{repeat}; {now}; {machine()}.",
        "",
        "| compressor | encode GB/s | ×clone | decode GB/s | ×clone | enc+dec ×clone "
        "| bits/coord |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['compressor']} | {r['encode_GBps']:.2f} | {r['encode_ratio']:.3f} "
            f"| {r['decode_GBps']:.2f} | {r['decode_ratio']:.3f} | {r['roundtrip_ratio']:.3f} "
            f"| {r['bits_per_coord']:.3f} |")
    clone = 4 * numel / 1e9 / rows[0]["t_clone_s"] if rows else float("nan")
    lines += ["", f"x.clone(): {clone:.2f} GB/s, the median of all {repeat * len(rows)} "
              "clone timings of this run (every ratio's baseline)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Compressor specs are registry names, optionally with constructor arguments: "
               "'qsgd:s=4,bucket_size=256'. Ratios are t_clone / t_op: 0.2 means the "
               "operation moves the tensor at a fifth of the speed of copying it.")
    ap.add_argument("--numel", type=int, default=1 << 24, help="elements (default 2^24)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per operation (median)")
    ap.add_argument("--compressors", nargs="+", default=None, metavar="SPEC",
                    help="compressor specs (default: every registered compressor)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's own choice)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if args.numel < 1 or args.repeat < 1:
        ap.error("--numel and --repeat must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = args.compressors or gradpress.available()
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    rows = [measure(s, x, args.repeat) for s in tqdm(specs, desc="compressors", file=sys.stderr)]
    add_ratios(rows, args.numel)
    print(table(rows, args.numel, args.repeat))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"numel": args.numel, "repeat": args.repeat, "machine": machine(),
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
