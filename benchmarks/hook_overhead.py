"""CPU cost of the DDP compression hook's local work per bucket, with no network.

Times what :func:`gradpress.ddp.hook.compression_hook` does on one rank for one bucket,
outside of the collective (the all-gather path, bounded frames): feedback ``to_send``,
``encode`` into the bucket's reused frame, feedback ``commit`` (the hook's
``_compress_into``: one fused pass pair for supported pairs, see
:mod:`gradpress.feedback.fused`), then decoding the ``P`` ranks' payloads from the gathered
frames and averaging them in rank order into the bucket (``collectives.average.mean_into``;
the peers' payloads are this rank's bytes, which costs the same to decode). ``--generic``
times the generic path instead (the hook before the fused path: ``_compress_own`` to
``bytes``, ``mean_of_payloads``), in the same run as the floor. The buckets are
restored, untimed, before every timed call (the hook overwrites a float32 bucket with the
mean). The gradient
is a seeded Gaussian of ``--params`` elements (default 4.1M, the ``digits-mlp4m`` MLP)
split into buckets of ``--bucket-mb`` (DDP's default 25 MB: one bucket here). Each method
runs a few warm-up steps first, so feedback state exists, as in training.

Every time is the median over ``--reps`` steps; the ratio column divides by the median of
``y.copy_(g)`` of the same buckets into buffers allocated once, measured in the same run
(the memory-bound floor: any pipeline reads the gradient at least once and writes the
update once; ``g.clone()`` would add fresh page faults and flatter every ratio).
``--threads`` sets ``torch.set_num_threads`` (the training worker uses 1 thread per rank).

    .venv/bin/python benchmarks/hook_overhead.py
    .venv/bin/python benchmarks/hook_overhead.py --threads 2 --reps 20
    .venv/bin/python benchmarks/hook_overhead.py --generic
    .venv/bin/python benchmarks/hook_overhead.py --both   # before/after, one run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import gradpress
from gradpress.collectives.allgather import decode_frames, write_frame
from gradpress.collectives.average import mean_into, mean_of_payloads
from gradpress.ddp import CompressionState, hook
from gradpress.ddp.state import BucketBuffers
from gradpress.feedback import ECQFeedback, ErrorFeedback, NoFeedback
from gradpress.payload import PayloadView

TRAIN_ECQ = {"norm": "linf", "bucket_size": 512}
METHODS = {
    # ecq as `gradpress train` runs it: l-inf scale per 512 coordinates
    "ecq 2 bits + ECQ": (lambda: gradpress.get("ecq", bits=2, **TRAIN_ECQ),
                         lambda: ECQFeedback(0.5, 0.9)),
    "ecq 4 bits + ECQ": (lambda: gradpress.get("ecq", bits=4, **TRAIN_ECQ),
                         lambda: ECQFeedback(0.5, 0.9)),
    "ecq ternary Huffman + ECQ": (lambda: gradpress.get("ecq", s=1, entropy="huffman",
                                                        **TRAIN_ECQ),
                                  lambda: ECQFeedback(0.5, 0.9)),
    "ecq 2 bits dense + ECQ": (lambda: gradpress.get("ecq", bits=2, entropy=False,
                                                     sparse=False, **TRAIN_ECQ),
                               lambda: ECQFeedback(0.5, 0.9)),
    "ecq 4 bits dense + ECQ": (lambda: gradpress.get("ecq", bits=4, entropy=False,
                                                     sparse=False, **TRAIN_ECQ),
                               lambda: ECQFeedback(0.5, 0.9)),
    "sign + EF": (lambda: gradpress.get("sign"), ErrorFeedback),
    "qsgd s=3": (lambda: gradpress.get("qsgd", s=3), NoFeedback),
    "qsgd s=3 dense": (lambda: gradpress.get("qsgd", s=3, sparse=False), NoFeedback),
}


def _median_ms(fn, reps: int, before=None) -> float:
    """Median wall time of ``fn()`` in ms; ``before()`` runs untimed ahead of each call."""
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _buckets(params: int, bucket_mb: float, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(params, generator=gen) * 1e-2
    cap = max(1, int(bucket_mb * 2**20) // 4)
    return [g[i:i + cap].clone() for i in range(0, params, cap)]


def _time_method(comp, fb, buckets: list[torch.Tensor], restore, args: argparse.Namespace
                 ) -> dict:
    step = 0
    last: list = []
    state = CompressionState(None, compressor=comp, feedback=fb)
    bufs = [BucketBuffers(args.world, comp.max_payload_bytes(b.numel())) for b in buckets]

    def local() -> None:
        nonlocal step
        last.clear()
        for k, b in enumerate(buckets):
            seed = hook._mix_seed(0, step, k, 0)
            if args.generic:
                last.append(hook._compress_own(comp, fb, str(k), b, seed))
                continue
            mine, sent = hook._compress_into(state, bufs[k], comp, fb, str(k), b, seed)
            view = isinstance(mine, PayloadView)
            write_frame(bufs[k].frame_np, None if view else mine, len(mine) if view else 0)
            last.append((len(mine), sent))
        step += 1

    def average() -> None:
        for k, b in enumerate(buckets):
            mine, sent = last[k]
            if args.generic:
                mean_of_payloads(comp, [mine] * args.world, 0, sent, b.numel(), b.device,
                                 f"bucket {k}", into=b)
                continue
            mean_into(comp, decode_frames(bufs[k].frames, copy=False), 0, sent, b,
                      f"bucket {k}")

    def gather() -> None:  # untimed: every rank's frame is this rank's
        for k in range(len(buckets)):
            bufs[k].frames.copy_(bufs[k].frame.expand(args.world, -1))

    for _ in range(args.warmup):
        restore()
        local()
    local_ms = _median_ms(local, args.reps, restore)
    gather()
    average_ms = _median_ms(average, args.reps, restore)
    return {"local_ms": local_ms, "average_ms": average_ms, "total_ms": local_ms + average_ms,
            "bytes": sum(m if isinstance(m, int) else len(m) for m, _ in last)}


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    buckets = _buckets(args.params, args.bucket_mb, args.seed)
    pristine = [b.clone() for b in buckets]

    def restore() -> None:  # the hook writes the mean into a float32 bucket: start afresh
        for b, p in zip(buckets, pristine):
            b.copy_(p)

    outs = [torch.empty_like(b) for b in buckets]
    for o, b in zip(outs, buckets):
        o.copy_(b)  # pages touched before timing
    copy_ms = _median_ms(lambda: [o.copy_(b) for o, b in zip(outs, buckets)], args.reps)
    rows = [{"method": "y.copy_(g) (floor)", "local_ms": copy_ms, "average_ms": 0.0,
             "total_ms": copy_ms, "bytes": 4 * args.params}]
    for name, (make_comp, make_fb) in METHODS.items():
        if args.only and not any(k in name for k in args.only.split(",")):
            continue
        for generic in ((True, False) if args.both else (args.generic,)):
            run_args = argparse.Namespace(**{**vars(args), "generic": generic})
            label = name + ((" (generic)" if generic else " (hook)") if args.both else "")
            rows.append({"method": label, **_time_method(make_comp(), make_fb(), buckets,
                                                         restore, run_args)})
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    floor = rows[0]["total_ms"]
    nb = -(-args.params // max(1, int(args.bucket_mb * 2**20) // 4))
    lines = [f"hook CPU work per step: {args.params:,} params in {nb} bucket(s) of <= "
             f"{args.bucket_mb} MB, P={args.world}, torch threads={args.threads}, "
             f"median of {args.reps}, "
             f"{'both' if args.both else 'generic' if args.generic else 'hook'} path(s)",
             f"{'method':<36} {'local ms':>9} {'avg(P) ms':>10} {'total ms':>9} "
             f"{'x copy':>8} {'payload B':>11}",
             "-" * 88]
    for r in rows:
        lines.append(f"{r['method']:<36} {r['local_ms']:9.1f} {r['average_ms']:10.1f} "
                     f"{r['total_ms']:9.1f} {r['total_ms'] / floor:8.1f} {r['bytes']:11,}")
    lines.append("local = to_send + encode + commit (generic: + to_bytes + decode(own)); "
                 "avg(P) = decode P payloads (generic: P-1) + rank-order mean")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=4_100_000)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--world", type=int, default=2, help="ranks P whose payloads are averaged")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated substrings of method names")
    p.add_argument("--generic", action="store_true",
                   help="time the generic path (encode to bytes, decode to new tensors)")
    p.add_argument("--both", action="store_true",
                   help="time the generic path and the hook's, method by method, in one run")
    args = p.parse_args()
    print(table(run(args), args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
