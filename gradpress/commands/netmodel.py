"""Predict data-parallel SGD speed with and without gradient compression (ECQ-SGD's model).

Calibrates on this machine (compute FLOP rate of an MLP step; each compressor's encode and
decode time and its real payload size on a seeded Gaussian chunk), then predicts step time,
throughput and speedup for ResNet-20, ResNet-50 and a 1B-parameter model on 1..1024 workers
over 1, 10, 40 and 100 Gbit/s links, for fp32 ring/tree and fp16 ring all-reduce and each
compressor over all-gather, the two-phase compressed all-reduce and a parameter server.
Writes speedup.png, throughput.png, breakdown.png, summary.md and netmodel.json under --out.
With --measured (records, or benchmarks/slow_network.py's JSON, with --reference for a
fast-link run of the same methods), also compares predicted to measured step times:
validation.json/.md.

The predictions use the CPU or GPU they are calibrated on: on a busy or slow CPU the codecs
look slow next to a fast link, which is a finding about that machine, not the method.

Example:
  gradpress netmodel --compressors fp16,qsgd --flops 4e14 --out results/netmodel
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
from pathlib import Path
from typing import Any

from gradpress.specs import parse_spec

HELP = "performance model: predicted speedup vs workers and bandwidth, calibrated here"

DEFAULT_COMPRESSORS = "fp16,qsgd,ecq,sparse_dithering,spherical,sign"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("results/netmodel"),
                   help="output folder (default: results/netmodel)")
    p.add_argument("--compressors", default=DEFAULT_COMPRESSORS,
                   help="comma-separated names, each optionally name:key=value;key=value "
                        "(unregistered names are skipped with a note; default: %(default)s)")
    p.add_argument("--bandwidths", default="1,10,40,100", help="link speeds in Gbit/s")
    p.add_argument("--max-workers", type=int, default=1024, help="largest worker count (2^k)")
    p.add_argument("--latency-us", type=float, default=5.0, help="per-message latency (us)")
    p.add_argument("--servers", type=int, default=1, help="parameter-server shards")
    p.add_argument("--chunk", type=int, default=1 << 20,
                   help="elements of the calibration vector (rates scale per element)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timings per calibration; the best is kept (robust to a busy machine)")
    p.add_argument("--flops", type=float, default=None,
                   help="override the measured FLOP/s (e.g. 4e14 for an H100 in bf16)")
    p.add_argument("--codec-gbps", type=float, default=None,
                   help="assume every codec encodes and decodes at this many GB/s of float32 "
                        "input instead of the measured times (payload sizes stay measured), "
                        "e.g. 1000 for a GPU codec at ~0.2 of an H200's 4.8 TB/s; an "
                        "assumption the output labels, not a measurement")
    p.add_argument("--breakdown-workers", type=int, default=64,
                   help="worker count of the time-breakdown plot")
    p.add_argument("--measured", type=Path, default=None,
                   help="measured step times to validate against: a JSON list of records "
                        "(see gradpress.netmodel.validate) or benchmarks/slow_network.py's "
                        "slow_network.json")
    p.add_argument("--reference", type=Path, default=None,
                   help="slow_network.json of the same benchmark at a fast rate (e.g. 10gbit):"
                        " calibrates each method's local (CPU) time per step")
    p.add_argument("--compute-s", type=float, default=None,
                   help="local time per step for slow_network methods without a reference")
    p.add_argument("--device", default=None,
                   help="where to calibrate compute and codecs (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)


def _load_measured(args: argparse.Namespace) -> list[dict[str, Any]]:
    from gradpress import netmodel as nm

    data = json.loads(args.measured.read_text())
    if isinstance(data, dict) and "rows" in data and "rate" in data:  # slow_network.json
        ref = json.loads(args.reference.read_text()) if args.reference else None
        return nm.records_from_slow_network(data, reference=ref, compute_s=args.compute_s)
    if isinstance(data, dict):
        data = data.get("records") or []
    return [r for r in data if isinstance(r, dict)]


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import torch
    from tqdm import tqdm

    import gradpress
    from gradpress import netmodel as nm

    torch.manual_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    workers = [2**k for k in range(args.max_workers.bit_length()) if 2**k <= args.max_workers]
    bandwidths = [float(b) * nm.GBIT for b in args.bandwidths.split(",") if b.strip()]

    print(f"calibrating compute (MLP forward+backward+step) on {device} ...")
    compute = nm.calibrate_compute(seed=args.seed, device=device,
                                   steps=max(10, 2 * args.repeats))
    measured_flops = compute.flops_per_s
    if args.flops:
        compute = nm.ComputeProfile(args.flops, compute.step_s, compute.params, compute.batch,
                                    f"override ({args.flops:.3g} FLOP/s)")
    print(f"  {measured_flops / 1e9:.1f} GFLOP/s measured; using {compute.flops_per_s / 1e9:.1f}")

    profiles, skipped = [], []
    specs = [(s.strip(), *parse_spec(s)) for s in args.compressors.split(",") if s.strip()]
    for label, name, kwargs in tqdm(specs, desc="calibrating compressors", unit="comp"):
        if name not in gradpress.available():
            skipped.append(name)
            continue
        try:
            profiles.append(nm.calibrate(gradpress.get(name, **kwargs), args.chunk,
                                         repeats=args.repeats, seed=args.seed, device=device,
                                         label=label))
        except (ValueError, TypeError, RuntimeError) as exc:  # bad options or a codec bug
            skipped.append(f"{label} ({type(exc).__name__}: {exc})")
    if skipped:
        print(f"note: skipped (not registered, or failed): {'; '.join(skipped)}")
    if args.codec_gbps:
        profiles = [assume_codec_rate(p, args.codec_gbps) for p in profiles]
        print(f"  ASSUMED codec rate: {args.codec_gbps:g} GB/s of float32 input each way "
              "(times below are the assumption, not measured; sizes are measured)")
    for prof in profiles:
        print(f"  {prof.display_name:18s} {prof.bits_per_element:7.3f} bits/elem  "
              f"encode {prof.encode_s * 1e3:8.2f} ms  decode {prof.decode_s * 1e3:8.2f} ms "
              f"per {prof.chunk:,} elements")

    rows = nm.predict(nm.MODELS, profiles, compute, bandwidths, workers,
                      latency_s=args.latency_us * 1e-6, servers=args.servers)
    _plot_grid(rows, "speedup", args.out / "speedup.png", workers, bandwidths)
    _plot_grid(rows, "throughput", args.out / "throughput.png", workers, bandwidths)
    _plot_breakdown(rows, args.out / "breakdown.png", args.breakdown_workers,
                    10 * nm.GBIT if 10 * nm.GBIT in bandwidths else bandwidths[0])
    summary = _summary(rows, max(workers))
    print(summary)

    result: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads(), "device": device},
        "compute": nm.profile_dict(compute), "measured_flops_per_s": measured_flops,
        "compressors": [nm.profile_dict(p) for p in profiles], "skipped": skipped,
        "models": {k: vars(m) for k, m in nm.MODELS.items()},
        "assumed_codec_gbps": args.codec_gbps,
        "latency_s": args.latency_us * 1e-6, "servers": args.servers, "predictions": rows,
        "summary_markdown": summary,
    }
    if args.measured:
        val = nm.validate(_load_measured(args),
                          profiles={p.display_name: p for p in profiles})
        table = nm.validation_markdown(val)
        print(table)
        (args.out / "validation.md").write_text(table + "\n")
        (args.out / "validation.json").write_text(json.dumps(val, indent=1))
        result["validation"] = val
    (args.out / "netmodel.json").write_text(json.dumps(result, indent=1))
    (args.out / "summary.md").write_text(summary + "\n")
    print(f"wrote {args.out}/speedup.png, throughput.png, breakdown.png, summary.md, "
          "netmodel.json")
    return 0


def assume_codec_rate(prof: Any, gbps: float) -> Any:
    """``prof`` with encode and decode each taking ``4 * chunk / (gbps * 1e9)`` seconds (a
    stated assumption: a codec reading float32 at ``gbps`` GB/s); payload bytes unchanged."""
    import dataclasses

    t = 4.0 * prof.chunk / (gbps * 1e9)
    return dataclasses.replace(prof, encode_s=t, decode_s=t)


_SCHEME_NAMES = {"allgather": "all-gather", "two_phase": "two-phase", "ps": "PS"}


def _label(row: dict[str, Any]) -> str:
    if row["scheme"] in ("ring", "tree"):
        return f"fp32 {row['scheme']} all-reduce"
    if row["scheme"] == "ring-fp16":
        return "fp16 ring all-reduce"
    return f"{row['compressor']} {_SCHEME_NAMES[row['scheme']]}"


def _plot_grid(rows: list[dict[str, Any]], key: str, path: Path, workers: list[int],
               bandwidths: list[float]) -> None:
    import matplotlib.pyplot as plt

    from gradpress.netmodel import MODELS

    fig, axes = plt.subplots(len(MODELS), len(bandwidths), figsize=(4.2 * len(bandwidths),
                             3.4 * len(MODELS)), squeeze=False, sharex=True)
    for i, (mkey, model) in enumerate(MODELS.items()):
        for j, bw in enumerate(bandwidths):
            ax = axes[i][j]
            sel = [r for r in rows if r["model"] == mkey and r["bandwidth_bps"] == bw]
            for label in dict.fromkeys(_label(r) for r in sel):
                pts = [r for r in sel if _label(r) == label]
                style = "--" if label.endswith("PS") else "-"
                ax.plot([r["workers"] for r in pts], [r[key] for r in pts], style,
                        marker=".", label=label)
            if key == "speedup":
                ax.plot(workers, workers, ":", color="grey", label="linear")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{model.name}, {bw / 1e9:g} Gbit/s", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(MODELS) - 1:
                ax.set_xlabel("workers")
            if j == 0:
                ax.set_ylabel("speedup vs 1 worker" if key == "speedup" else "samples / s")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.suptitle(f"Predicted {key} (alpha-beta model, calibrated on this machine)")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_breakdown(rows: list[dict[str, Any]], path: Path, p: int, bw: float) -> None:
    import matplotlib.pyplot as plt

    from gradpress.netmodel import MODELS

    fig, axes = plt.subplots(1, len(MODELS), figsize=(5 * len(MODELS), 4), squeeze=False)
    for ax, (mkey, model) in zip(axes[0], MODELS.items()):
        sel = [r for r in rows if r["model"] == mkey and r["bandwidth_bps"] == bw
               and r["workers"] == p]
        labels = [_label(r) for r in sel]
        bottom = [0.0] * len(sel)
        for part in ("compute_s", "encode_s", "comm_s", "decode_s"):
            vals = [r[part] for r in sel]
            ax.barh(labels, vals, left=bottom, label=part[:-2])
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(f"{model.name}: {p} workers, {bw / 1e9:g} Gbit/s", fontsize=9)
        ax.set_xlabel("seconds per iteration")
        ax.tick_params(axis="y", labelsize=7)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(rows: list[dict[str, Any]], p: int) -> str:
    """Per model and link: fp32 and fp16 ring speedups at ``p``, the best compressed scheme
    there, and the worker counts at which the best two-phase compressor beats fp32 and fp16
    ring all-reduce (and the largest at which an all-gather still beats fp32 ring)."""
    lines = [f"| model | link | fp32 ring @{p} | fp16 ring @{p} | best compressed @{p} | "
             "its speedup | two-phase beats fp32 ring at P | beats fp16 ring at P | "
             "all-gather beats fp32 ring up to |",
             "| --- | ---: | ---: | ---: | --- | ---: | --- | --- | ---: |"]
    for model, bw in dict.fromkeys((r["model"], r["bandwidth_bps"]) for r in rows):
        sel = [r for r in rows if r["model"] == model and r["bandwidth_bps"] == bw]
        ring = {r["workers"]: r["step_s"] for r in sel if r["scheme"] == "ring"}
        fp16 = {r["workers"]: r["step_s"] for r in sel if r["scheme"] == "ring-fp16"}
        comp = [r for r in sel if r["scheme"] in ("allgather", "two_phase", "ps")]
        head = f"| {model} | {bw / 1e9:g} Gbit/s | {p * ring[1] / ring[p]:.1f} | " + (
            f"{p * fp16[1] / fp16[p]:.1f} | " if fp16 else "- | ")
        if not comp:
            lines.append(head + "- | - | - | - | - |")
            continue
        best = max((r for r in comp if r["workers"] == p), key=lambda r: r["speedup"])
        two = [r for r in comp if r["scheme"] == "two_phase" and r["workers"] > 1]
        tp = max(two, key=lambda r: r["speedup"] if r["workers"] == p else -1, default=None)
        mine = [r for r in two if tp and r["compressor"] == tp["compressor"]]
        gather = [r["workers"] for r in comp if r["scheme"] == "allgather" and r["workers"] > 1
                  and r["step_s"] < ring[r["workers"]]]
        beat32 = _ranges([r["workers"] for r in mine if r["step_s"] < ring[r["workers"]]])
        beat16 = _ranges([r["workers"] for r in mine if fp16 and r["step_s"] < fp16[r["workers"]]])
        who = f" ({tp['compressor']})" if tp else ""
        lines.append(head + f"{_label(best)} | {best['speedup']:.1f} | {beat32}{who} | "
                     f"{beat16} | {max(gather) if gather else 'never'} |")
    return "\n".join(lines)


def _ranges(ps: list[int]) -> str:
    """Worker counts (powers of two) as ``2-1024`` runs, or ``never``."""
    if not ps:
        return "never"
    ps = sorted(ps)
    runs, start = [], ps[0]
    for a, b in zip(ps, ps[1:] + [None]):
        if b != 2 * a:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(runs)
