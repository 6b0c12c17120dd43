"""Federated learning on scikit-learn's digits with compressed client updates (Flower).

Splits digits non-iid over --clients clients (Dirichlet(--alpha) label shares), trains a
64-32-10 MLP with FedAvg in Flower's simulation engine (Ray backend), each client sending
its model update as a gradpress payload (CRC32 on) that the server strategy decodes; the
uplink is counted from the real payload bytes. Runs once per compressor (unregistered
names are skipped with a note) and writes federated.png (test accuracy vs cumulative uplink
bytes, and vs round), federated.md (the table) and federated.json under --out.

--engine local runs the same algorithm in an in-repo loop without Flower (the fallback
when flwr is not installed; --engine auto picks it then and says so).

Example:
  gradpress federated --clients 20 --rounds 30 --compressors fp32,qsgd,sparse_dithering
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from pathlib import Path
from typing import Any

HELP = "federated learning (Flower) on digits: accuracy vs real uplink bytes per compressor"

DEFAULT_COMPRESSORS = "fp32,qsgd,sparse_dithering,spherical"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("results/federated"),
                   help="output folder (default: results/federated)")
    p.add_argument("--compressors", default=DEFAULT_COMPRESSORS,
                   help="comma-separated names, each optionally name:key=value;key=value "
                        "(default: %(default)s)")
    p.add_argument("--clients", type=int, default=20, help="number of clients (10-50)")
    p.add_argument("--rounds", type=int, default=30, help="FedAvg rounds")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="Dirichlet concentration of the label split (smaller: less iid)")
    p.add_argument("--fraction", type=float, default=1.0, help="clients sampled per round")
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.2, help="client SGD step size")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--hidden", type=int, default=32, help="MLP hidden units (0: softmax)")
    p.add_argument("--feedback", choices=("none", "ef", "ecq"), default="none",
                   help="client-side error feedback on the update")
    p.add_argument("--no-crc", action="store_true", help="send payloads without CRC32")
    p.add_argument("--engine", choices=("auto", "flower", "local"), default="auto",
                   help="flower: Flower simulation; local: in-repo loop; auto: flower if "
                        "installed")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from tqdm import tqdm

    import gradpress
    from gradpress import flower as fl
    from gradpress.specs import parse_spec

    engine = args.engine
    if engine == "auto":
        engine = "flower" if fl.HAVE_FLWR else "local"
        if engine == "local":
            print(f"note: {fl.FLWR_MISSING}; running the in-repo loop instead (no Flower)")
    elif engine == "flower" and not fl.HAVE_FLWR:
        raise SystemExit(fl.FLWR_MISSING)
    if not 1 <= args.clients <= 200:
        raise SystemExit(f"--clients must be in 1..200, got {args.clients}")

    labelled = [(s.strip(), *parse_spec(s)) for s in args.compressors.split(",") if s.strip()]
    skipped = [name for _, name, _ in labelled if name not in gradpress.available()]
    specs = [(lab, name, kw) for lab, name, kw in labelled if name in gradpress.available()]
    if skipped:
        print(f"note: not registered (skipped): {', '.join(skipped)}")
    if not specs:
        raise SystemExit("no registered compressor to run; see gradpress.available()")
    data = fl.digits_partitions(args.clients, alpha=args.alpha, seed=args.seed)
    print(f"{args.clients} clients, samples per client {min(len(y) for _, y in data.clients)}"
          f"..{max(len(y) for _, y in data.clients)}, {fl.num_params(args.hidden)} parameters, "
          f"engine: {engine}")

    common: dict[str, Any] = dict(rounds=args.rounds, hidden=args.hidden, feedback=args.feedback,
                                  local_epochs=args.local_epochs, lr=args.lr,
                                  batch_size=args.batch_size, seed=args.seed,
                                  crc=not args.no_crc)
    runs = []
    bar = tqdm(total=args.rounds * len(specs), desc="federated rounds", unit="round")
    for label, name, kwargs in specs:
        bar.set_postfix_str(label)

        def tick(rec: dict[str, Any]) -> None:
            if rec["round"] > 0:
                bar.update(1)

        if engine == "flower":
            res = fl.run_flower(data, compressor=name, compressor_kwargs=kwargs,
                                fraction=args.fraction, on_round=tick, **common)
        else:
            res = fl.run_local(data, compressor=name, compressor_kwargs=kwargs, on_round=tick,
                               **common)
        runs.append({"label": label, **res})
    bar.close()

    table = _table(runs)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    _plot(runs, args.out / "federated.png", args)
    out = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "engine": engine, "args": {k: str(v) for k, v in vars(args).items() if k != "_run"},
           "skipped": skipped, "runs": runs, "table_markdown": table}
    (args.out / "federated.json").write_text(json.dumps(out, indent=1))
    (args.out / "federated.md").write_text(table + "\n")
    print(f"wrote {args.out}/federated.png, federated.md and federated.json")
    return 0


def _table(runs: list[dict[str, Any]]) -> str:
    base = next((r["uplink_bytes"] for r in runs if r["compressor"] == "fp32"), None)
    lines = ["| compressor | final accuracy | uplink bytes | bits/coord | fp32 bytes / these |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in runs:
        ratio = f"{base / r['uplink_bytes']:.1f}x" if base and r["uplink_bytes"] else "-"
        lines.append(f"| {r['label']} | {r['final_accuracy']:.3f} | "
                     f"{r['uplink_bytes']:,} | {r['bits_per_coordinate']:.3f} | {ratio} |")
    return "\n".join(lines)


def _plot(runs: list[dict[str, Any]], path: Path, args: argparse.Namespace) -> None:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        rounds = r["rounds"][1:]
        ax1.plot([x["cumulative_uplink_bytes"] for x in rounds],
                 [x["test_accuracy"] for x in rounds], marker=".", label=r["label"])
        ax2.plot([x["round"] for x in r["rounds"]], [x["test_accuracy"] for x in r["rounds"]],
                 label=r["label"])
    ax1.set_xscale("log")
    ax1.set_xlabel("cumulative uplink bytes (real payloads, all clients)")
    ax2.set_xlabel("round")
    for ax in (ax1, ax2):
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"FedAvg on digits: {args.clients} clients, Dirichlet({args.alpha}) split, "
                 f"feedback={args.feedback}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
