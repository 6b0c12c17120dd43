"""DDP training with compressed gradients: launches torchrun with N ranks on this machine.

Runs ``python -m torch.distributed.run --standalone --nproc_per_node N -m
gradpress.train.worker ...`` (gloo on CPU, NCCL when CUDA is there) and trains a small
CNN on scikit-learn's digits and an MLP on breast_cancer (bundled data, no download),
reporting test accuracy, bytes sent and wall time per epoch, with a progress bar on rank 0;
rank 0 writes train.json and train.png under --out. --compare also trains plain DDP (fp32
all-reduce) with the same seed (under --out/ddp), prints the accuracy gap and the byte ratio
and draws both runs on the same axes in compare.png.

--bits B maps to the compressor: ecq, qsgd and natural_dithering get s = 2^(B-1)-1
levels (2s+1 signed levels in B bits; B=2 is ternary); ecq scales each 512 coordinates by
their l-inf norm unless --compressor-args sets norm/bucket_size. Other arguments of a
compressor go in --compressor-args "key=value;key=value". --compressor also takes ddp,
torch-fp16 and torch-powersgd (PyTorch's own hooks) as baselines.

--experiment ecq-resnet runs ECQ-SGD's CNN comparison instead (gradpress.train.ecq_resnet):
fp32 vs QSGD vs ECQ-SGD on a ResNet-20-style network (--task resnet: residual blocks, batch
norm, 0.27M parameters) on digits, --nproc ranks, one process group; it writes
results/train/resnet-digits/ecq_resnet.json (or under --out) for `gradpress reproduce`.
With --quick: a few steps a method, a smoke test of the pipeline, not the paper's number.
(The paper trains ResNet-20 on CIFAR-10, which is not available offline.)

Examples:
  gradpress train --nproc 2 --compressor ecq --bits 2
  gradpress train --nproc 2 --task resnet --epochs 30 --compressor ecq --bits 2 --unbounded \\
      --compressor-args "norm='l2';bucket_size=512;entropy='best'" --alpha 0.05 --beta 1
  gradpress train --experiment ecq-resnet            # fp32 vs QSGD vs ECQ-SGD, ResNet-20
  gradpress train --nproc 2 --compressor qsgd --bits 3 --unbounded --compare
  gradpress train --nproc 2 --compressor topk --compressor-args "ratio=0.01" --feedback ef
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HELP = "DDP training (torchrun) with a gradpress comm hook: accuracy, bytes, time per epoch"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from gradpress.train.worker import add_training_arguments

    p.add_argument("--nproc", type=int, default=2, help="ranks on this machine (default 2)")
    p.add_argument("--compare", action="store_true",
                   help="also run plain DDP (fp32 all-reduce) and print the differences")
    p.add_argument("--experiment", choices=("ecq-resnet",), default=None,
                   help="ecq-resnet: fp32 vs QSGD vs ECQ-SGD on ResNet-20 (digits), writes "
                        "ecq_resnet.json for `gradpress reproduce` (default --out: "
                        "results/train/resnet-digits); other training arguments are ignored "
                        "but --epochs, --lr, --max-steps")
    p.add_argument("--quick", action="store_true",
                   help="with --experiment: a few steps a method (pipeline smoke test, not "
                        "the paper's number)")
    p.add_argument("--seeds", default=None,
                   help="with --experiment: comma-separated seeds (default 0,1; --quick: 0)")
    add_training_arguments(p)
    # None: not given. The worker then uses its defaults; --experiment uses its own.
    p.set_defaults(epochs=None, lr=None)


def worker_argv(args: argparse.Namespace, **override) -> list[str]:
    """Command-line arguments for gradpress.train.worker from parsed ``args``."""
    from gradpress.train.worker import add_training_arguments

    probe = argparse.ArgumentParser()
    add_training_arguments(probe)
    out: list[str] = []
    for action in probe._actions:
        if not action.option_strings:
            continue
        dest = action.dest
        val = override.get(dest, getattr(args, dest, None))
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            out += [flag] if val else []
        elif val is not None and val != "" and dest != "help":
            out += [flag, str(val)]
    return out


def worker_defaults(**override) -> argparse.Namespace:
    """The worker's arguments at their defaults, with ``override`` (dest names) applied."""
    from gradpress.train.worker import add_training_arguments

    probe = argparse.ArgumentParser()
    add_training_arguments(probe)
    ns = probe.parse_args([])
    unknown = set(override) - set(vars(ns))
    if unknown:
        raise ValueError(f"not training arguments: {sorted(unknown)}")
    for k, v in override.items():
        setattr(ns, k, v)
    return ns


def launch(nproc: int, argv: list[str], module: str = "gradpress.train.worker") -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", module, *argv]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def plot_compare(ours: dict, base: dict, path: Path) -> None:
    """One row per task: test accuracy against epochs and against MB sent by rank 0, the
    compressed run and plain DDP on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(ours), 2, figsize=(9, 3.2 * len(ours)), squeeze=False)
    for row, (task, r) in zip(axes, ours.items()):
        for run, label, style in ((r, r["method"], "-"), (base[task], "plain DDP (fp32)", "--")):
            rec = run["records"]
            acc = [q["test_acc"] for q in rec]
            row[0].plot([q["epoch"] for q in rec], acc, style, marker=".", label=label)
            row[1].plot([q["payload_bytes"] / 1e6 for q in rec], acc, style, marker=".")
        row[0].set(xlabel="epoch", ylabel="test accuracy", title=f"{task}: accuracy against epochs")
        row[1].set(xlabel="MB sent by rank 0 (log)", ylabel="test accuracy", xscale="log",
                   title=f"{task}: accuracy against bytes")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.title.set_fontsize(10)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise SystemExit(f"--nproc must be >= 1, got {args.nproc}")
    if args.experiment:
        return run_experiment(args)
    rc = launch(args.nproc, worker_argv(args))
    if rc or not args.compare:
        return rc
    base_out = Path(args.out) / "ddp"
    rc = launch(args.nproc, worker_argv(args, compressor="ddp", bits=None, out=base_out,
                                        compressor_args=""))
    if rc:
        return rc
    ours = json.loads((Path(args.out) / "train.json").read_text())["runs"]
    base = json.loads((base_out / "train.json").read_text())["runs"]
    print(f"\n{'task':<15}{'acc ' + args.compressor:>12}{'acc ddp':>10}{'gap (pts)':>11}"
          f"{'bytes vs ddp':>14}")
    for task, r in ours.items():
        b = base[task]
        gap = 100 * (r["final_test_acc"] - b["final_test_acc"])
        print(f"{task:<15}{r['final_test_acc']:>12.4f}{b['final_test_acc']:>10.4f}{gap:>+11.2f}"
              f"{r['payload_bytes'] / b['payload_bytes']:>14.4f}")
    if not args.no_plot:
        plot_compare(ours, base, Path(args.out) / "compare.png")
        print(f"wrote {Path(args.out) / 'compare.png'}")
    return 0


def run_experiment(args: argparse.Namespace) -> int:
    """``--experiment ecq-resnet``: :mod:`gradpress.train.ecq_resnet` under torchrun."""
    argv, cmd = [], ["gradpress", "train", "--experiment", args.experiment]
    if args.epochs is not None:
        argv += ["--epochs", str(args.epochs)]
    if args.lr is not None:
        argv += ["--lr", str(args.lr)]
    if args.max_steps:
        argv += ["--max-steps", str(args.max_steps)]
    if args.seeds:
        argv += ["--seeds", args.seeds]
    if args.quick:
        argv.append("--quick")
    if args.nproc != 2:
        cmd += ["--nproc", str(args.nproc)]
    out = Path(args.out)
    if out == Path("results/train"):
        out = out / "resnet-digits"
    else:
        cmd += ["--out", str(args.out)]
    return launch(args.nproc, [*argv, "--out", str(out), "--command", " ".join(cmd + argv)],
                  module="gradpress.train.ecq_resnet")
