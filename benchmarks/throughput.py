"""Encode/decode throughput of every registered compressor, against ``x.clone()``.

For each compressor on one float32 tensor (``--numel``, default 2^24 elements, standard
normal, seed 0) we time ``encode(x)`` and ``decode(payload)`` (median of ``--repeat`` runs
after one warm-up) and a plain ``x.clone()`` of the same tensor right before each
compressor, so every ratio compares timings taken in the same run and minute. Reported:

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


def _median_time(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(spec: str, x: torch.Tensor, repeat: int) -> dict:
    name, kwargs = parse_spec(spec)
    c = gradpress.get(name, **kwargs)
    payload = c.encode(x, seed=1)  # warm-up
    c.decode(payload)
    t_clone, _ = _median_time(x.clone, repeat)
    t_enc, payload = _median_time(lambda: c.encode(x, seed=1), repeat)
    wire = payload.to_bytes()
    t_dec, _ = _median_time(lambda: c.decode(wire), repeat)
    gb = 4 * x.numel() / 1e9
    return {
        "compressor": spec, "t_clone_s": t_clone, "t_encode_s": t_enc, "t_decode_s": t_dec,
        "encode_GBps": gb / t_enc, "decode_GBps": gb / t_dec, "clone_GBps": gb / t_clone,
        "encode_ratio": t_clone / t_enc, "decode_ratio": t_clone / t_dec,
        "roundtrip_ratio": t_clone / (t_enc + t_dec),
        "bits_per_coord": 8 * len(wire) / x.numel(),
    }


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
    clone = statistics.median(r["clone_GBps"] for r in rows) if rows else float("nan")
    lines += ["", f"x.clone(): median {clone:.2f} GB/s over the rows above."]
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
    print(table(rows, args.numel, args.repeat))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"numel": args.numel, "repeat": args.repeat, "machine": machine(),
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
