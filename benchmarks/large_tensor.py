"""Edge-size benchmark: encode and decode one 10^8-element tensor with each compressor.

    python benchmarks/large_tensor.py                     # every compressor, 10^8 float32
    python benchmarks/large_tensor.py --numel 30000000 --compressors sign,qsgd

Each compressor runs in its own process so its peak resident memory (``ru_maxrss``) is its
own; the table gives encode/decode seconds, bits per coordinate from ``len(payload)``, the
max error relative to ``||x||``, and peak memory as a multiple of the input's size.
Not part of ``make test`` (it needs minutes and several GiB).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys

import torch

import gradpress

_CHILD = r"""
import json, resource, sys, time, torch, gradpress
from gradpress.payload import Payload
name, numel = sys.argv[1], int(sys.argv[2])
x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
c = gradpress.get(name)
t0 = time.perf_counter(); raw = c.encode(x, seed=1).to_bytes(); t1 = time.perf_counter()
y = c.decode(Payload.from_bytes(raw)); t2 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ok = y.shape == x.shape and bool(torch.isfinite(y).all())
print(json.dumps({"name": name, "encode_s": t1 - t0, "decode_s": t2 - t1,
                  "bits_per_coord": 8 * len(raw) / numel, "ok": ok,
                  "rel_err": float((y - x).norm() / x.norm()),
                  "peak_over_input": (peak - base) * 1024 / (4 * numel)}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=100_000_000)
    ap.add_argument("--compressors", default=",".join(gradpress.available()))
    args = ap.parse_args()
    print(f"# {args.numel:,} float32 elements, {datetime.date.today()}, "
          f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| compressor | encode s | decode s | bits/coord | ||C(x)-x||/||x|| | "
          "extra peak memory / input | result |")
    print("|---|---:|---:|---:|---:|---:|---|")
    failures = 0
    for name in args.compressors.split(","):
        r = subprocess.run([sys.executable, "-c", _CHILD, name, str(args.numel)],
                           capture_output=True, text=True)
        if r.returncode:
            failures += 1
            why = (r.stderr.strip().splitlines() or ["killed"])[-1][:80]
            print(f"| {name} | | | | | | FAILED: {why} |", flush=True)
            continue
        m = json.loads(r.stdout.strip().splitlines()[-1])
        failures += not m["ok"]
        print(f"| {name} | {m['encode_s']:.2f} | {m['decode_s']:.2f} | "
              f"{m['bits_per_coord']:.3f} | {m['rel_err']:.3f} | {m['peak_over_input']:.1f}x | "
              f"{'ok' if m['ok'] else 'WRONG OUTPUT'} |", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
