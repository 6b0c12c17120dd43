"""Encode/decode throughput of every registered compressor, against a copy at memory speed.

The baseline is the physical limit of touching the tensor: ``y.copy_(x)`` into a tensor
allocated once before the run (read ``4 numel`` bytes, write ``4 numel``), not
``x.clone()``, whose fresh pages fault in and made our old ratios look about 5x better
than they were (on this project's machine a 64 MiB clone runs at 0.9-1.1 GB/s, the copy
at 4.3-5.9 GB/s, a read, ``x.sum()``, at 9.1 GB/s). For each compressor on one float32
tensor (``--numel``, default 2^24 elements, standard normal, seed 0) we time ``copy_``,
``x.sum()``, ``encode(x)`` and ``decode(payload)`` in turn, ``--repeat`` times after one
warm-up, and take medians; every ratio divides by the median of all ``copy_`` timings of
the run (interleaved with every compressor's, so all see the same load). Reported:

* encode / decode throughput in GB/s of input (``4 * numel`` bytes per call);
* each as a ratio to the copy (``t_copy / t_encode``; 1.0 = as fast as a copy);
* the encode+decode ratio ``t_copy / (t_encode + t_decode)``;
* peak extra memory of encode+decode as a multiple of the input (``--memory``: the growth
  of the peak resident set of a fresh process over one encode+decode, Linux only);
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


def measure(spec: str, x: torch.Tensor, y: torch.Tensor, repeat: int, into: bool = False
            ) -> dict:
    """Median times of copy_, sum, encode and decode, interleaved run by run so that all
    see the same machine load. ``into``: ``encode_into`` a buffer and ``decode_into`` a
    tensor, both allocated once (the allocation-free paths) instead."""
    name, kwargs = parse_spec(spec)
    c = gradpress.get(name, **kwargs)
    wire = c.encode(x, seed=1).to_bytes()  # warm-up
    c.decode(wire)
    buf = torch.zeros(len(wire) if c.max_payload_bytes(x.numel()) is None
                      else c.max_payload_bytes(x.numel()), dtype=torch.uint8)
    out = torch.zeros_like(x)
    if into:
        c.decode_into(out, c.encode_into(buf, x, seed=1))
    t_copy, t_read, t_enc, t_dec = [], [], [], []
    for _ in range(repeat):
        t_copy.append(_timed(functools.partial(y.copy_, x))[0])
        t_read.append(_timed(x.sum)[0])
        if into:
            t, view = _timed(lambda: c.encode_into(buf, x, seed=1))
            t_enc.append(t)
            wire = view.to_bytes()
            t_dec.append(_timed(functools.partial(c.decode_into, out, view))[0])
            continue
        t, payload = _timed(lambda: c.encode(x, seed=1))
        t_enc.append(t)
        wire = payload.to_bytes()
        t_dec.append(_timed(functools.partial(c.decode, wire))[0])
    te, td = statistics.median(t_enc), statistics.median(t_dec)
    gb = 4 * x.numel() / 1e9
    return {
        "compressor": spec, "t_copy_runs_s": t_copy, "t_read_runs_s": t_read,
        "t_encode_s": te, "t_decode_s": td,
        "encode_GBps": gb / te, "decode_GBps": gb / td,
        "bits_per_coord": 8 * len(wire) / x.numel(),
    }


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_child(spec: str, numel: int) -> None:
    """In a fresh process: reset the peak RSS (``/proc/self/clear_refs``), run one
    encode+decode of the benchmark tensor, print the peak growth in bytes."""
    name, kwargs = parse_spec(spec)
    c = gradpress.get(name, **kwargs)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    c.decode(c.encode(x[:4096].clone(), seed=1).to_bytes())  # compile/load kernels first
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _rss_kib("VmRSS")
    c.decode(c.encode(x, seed=1).to_bytes())
    print(1024 * (_rss_kib("VmHWM") - base))


def peak_extra(spec: str, numel: int) -> float | None:
    """Peak resident memory one encode+decode adds, as a multiple of the input's bytes
    (Linux only; a fresh process, so freed blocks of earlier rows do not hide growth)."""
    import subprocess

    proc = subprocess.run([sys.executable, __file__, "--_peak", spec, "--numel", str(numel)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return int(proc.stdout.split()[-1]) / (4 * numel)


def add_ratios(rows: list[dict], numel: int) -> float:
    """Ratios of every row to the run's median copy time; returns that copy rate (GB/s)."""
    tc = statistics.median(t for r in rows for t in r["t_copy_runs_s"])
    tr = statistics.median(t for r in rows for t in r["t_read_runs_s"])
    for r in rows:
        r.update(t_copy_s=tc, t_read_s=tr, encode_ratio=tc / r["t_encode_s"],
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
        "| compressor | encode GB/s | ×copy | decode GB/s | ×copy | enc+dec ×copy "
        "| peak extra mem ×input | bits/coord |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        mem = f"{r['peak_extra']:.2f}" if r.get("peak_extra") is not None else "-"
        lines.append(
            f"| {r['compressor']} | {r['encode_GBps']:.2f} | {r['encode_ratio']:.3f} "
            f"| {r['decode_GBps']:.2f} | {r['decode_ratio']:.3f} | {r['roundtrip_ratio']:.3f} "
            f"| {mem} | {r['bits_per_coord']:.3f} |")
    gb = 4 * numel / 1e9
    copy = gb / rows[0]["t_copy_s"] if rows else float("nan")
    read = gb / rows[0]["t_read_s"] if rows else float("nan")
    lines += ["", f"Baseline y.copy_(x) into a preallocated tensor: {copy:.2f} GB/s of input, "
              f"the median of all {repeat * len(rows)} copy timings of this run (every "
              f"ratio's baseline); read bandwidth x.sum(): {read:.2f} GB/s."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Compressor specs are registry names, optionally with constructor arguments: "
               "'qsgd:s=4,bucket_size=256'. Ratios are t_copy / t_op: 0.2 means the "
               "operation moves the tensor at a fifth of the speed of copying it. Fresh "
               "allocations (the body bytes, the decoded tensor) page-fault: to measure "
               "with transparent huge pages for malloc, run under "
               "GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc >= 2.35) and say so.")
    ap.add_argument("--numel", type=int, default=1 << 24, help="elements (default 2^24)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per operation (median)")
    ap.add_argument("--compressors", nargs="+", default=None, metavar="SPEC",
                    help="compressor specs (default: every registered compressor)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's own choice)")
    ap.add_argument("--memory", action="store_true",
                    help="also measure peak extra memory of one encode+decode (slower)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--into", action="store_true",
                    help="time encode_into/decode_into with buffers allocated once")
    ap.add_argument("--_peak", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._peak:
        _peak_child(args._peak, args.numel)
        return 0
    if args.numel < 1 or args.repeat < 1:
        ap.error("--numel and --repeat must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = args.compressors or gradpress.available()
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    y = torch.empty_like(x)
    y.copy_(x)  # the baseline's output exists, its pages touched, before any timing
    rows = [measure(s, x, y, args.repeat, args.into)
            for s in tqdm(specs, desc="compressors", file=sys.stderr)]
    if args.memory:
        for r in tqdm(rows, desc="memory", file=sys.stderr):
            r["peak_extra"] = peak_extra(r["compressor"], args.numel)
    add_ratios(rows, args.numel)
    print(table(rows, args.numel, args.repeat))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"numel": args.numel, "repeat": args.repeat, "machine": machine(),
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
