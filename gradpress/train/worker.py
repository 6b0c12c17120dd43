"""One rank of DDP training with compressed gradients; run it under ``torchrun``.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        -m gradpress.train.worker --compressor ecq --bits 2 --out results/train

(``gradpress train`` builds that command.) Tasks, on scikit-learn's bundled data (no
download): ``digits`` (8x8 images, a small CNN), ``breast_cancer`` (30 features, an MLP),
``digits-mlp4m`` (a 4.2M-parameter MLP on digits, big enough that communication dominates:
the slow-network benchmark's model), ``resnet`` (ResNet-20, residual blocks and batch norm,
on digits at 8x8: :mod:`gradpress.train.resnet`; batch norm's running statistics stay per
rank, so no bytes move outside the hook). Each rank trains on its own shard of the training set;
every rank evaluates the same held-out 20%.

``--compressor`` is a gradpress compressor name (through :func:`compression_hook`), or one
of PyTorch's own: ``ddp`` (plain fp32 all-reduce, no hook), ``torch-fp16``
(``fp16_compress_hook``), ``torch-powersgd`` (``powerSGD_hook``, rank ``--rank-r``, error
feedback and warm start on, compression from step 2). ``--bits B`` sets the compressor's
precision: ``ecq``, ``qsgd`` and ``natural_dithering`` get ``s = 2^(B-1) - 1`` levels, so
the signed level (``2s+1`` values) fits ``B`` bits (``B=2``: ternary). ``ecq`` trains with
``norm="linf", bucket_size=512`` unless ``--compressor-args`` says otherwise.
``--compressor-args "k=v;k=v"`` passes any other constructor argument.

Bytes per step are this rank's contribution: ``len(payload.to_bytes())`` of its payloads
(``payload_bytes``) and what it put into the collectives with frame and padding
(``wire_bytes``); for PyTorch's hooks, the tensor bytes all-reduced (``4`` or ``2`` bytes a
coordinate; PowerSGD: ``4 *`` the elements of P, Q and uncompressed tensors, from its own
stats). Rank 0 writes ``train.json`` and ``train.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradpress.train.hooks import ByteCounter, compressor_kwargs  # noqa: F401 (re-export)


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by the worker and ``gradpress train``."""
    p.add_argument("--task", default="all",
                   choices=("all", "digits", "breast_cancer", "digits-mlp4m", "lm", "resnet"),
                   help="all = digits (CNN) then breast_cancer (MLP); digits-mlp4m: a "
                        "4.1M-parameter MLP; lm: a 3.3M-parameter byte-level transformer on "
                        "the standard library's sources (accuracy = next-byte accuracy); "
                        "resnet: ResNet-20 (residual blocks, batch norm, 0.27M parameters) "
                        "on digits at their native 8x8 (ECQ-SGD's CIFAR-10 network; "
                        "CIFAR-10 itself is not available offline)")
    p.add_argument("--compressor", default="ecq",
                   help="gradpress compressor name, or ddp / torch-fp16 / torch-powersgd / "
                        "compute-only (a hook that communicates nothing: each rank keeps its "
                        "own gradient; for timing the step without the network)")
    p.add_argument("--bits", type=int, default=None,
                   help="bits per coordinate of the dense code: ecq/qsgd/natural_dithering "
                        "s=2^(B-1)-1 (2s+1 levels)")
    p.add_argument("--compressor-args", default="", help='extra kwargs, e.g. "ratio=0.01"')
    p.add_argument("--feedback", default="auto", choices=("auto", "none", "ecq", "ef", "ef21"),
                   help="error feedback (auto: ecq for ecq; ef for sign/topk/powersgd)")
    p.add_argument("--alpha", type=float, default=0.5, help="ECQ compensation coefficient")
    p.add_argument("--beta", type=float, default=0.9, help="ECQ error decay")
    p.add_argument("--unbounded", action="store_true",
                   help="gather lengths first instead of padding to the payload bound")
    p.add_argument("--collective", default="auto", choices=("auto", "allgather", "two_phase"),
                   help="gradpress collective (auto: two_phase from 3 ranks up)")
    p.add_argument("--rank-r", type=int, default=1, help="rank of torch-powersgd")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP bucket size")
    p.add_argument("--target-acc", type=float, default=None,
                   help="stop once test accuracy reaches this (evaluated every --eval-every)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations "
                   "(0: once per epoch)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps")
    p.add_argument("--max-time", type=float, default=0.0, help="stop after this many s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"))
    p.add_argument("--pg-timeout", type=float, default=300.0,
                   help="seconds a collective may wait for a peer before failing")
    p.add_argument("--out", type=Path, default=Path("results/train"))
    p.add_argument("--no-plot", action="store_true")


# -- data and models -----------------------------------------------------------------------

def load_task(task: str, seed: int) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) as float32 / int64 tensors, standardized (lm:
    int64 byte windows and their next bytes)."""
    if task == "lm":
        from gradpress.train.lm import lm_windows

        return lm_windows(seed)
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split

    if task.startswith("digits") or task == "resnet":
        x, y = load_digits(return_X_y=True)
        x = x / 16.0
    else:
        x, y = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    if task == "breast_cancer":
        mu, sd = xtr.mean(0), xtr.std(0) + 1e-8
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    if task in ("digits", "resnet"):
        xtr, xte = xtr.reshape(-1, 1, 8, 8), xte.reshape(-1, 1, 8, 8)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    g = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return f(xtr), g(ytr), f(xte), g(yte)


def build_model(task: str) -> nn.Module:
    if task == "lm":
        from gradpress.train.lm import build_lm

        return build_lm()
    if task == "resnet":
        from gradpress.train.resnet import build_resnet20

        return build_resnet20()
    if task == "digits":
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
                             nn.Linear(64, 10))
    if task == "breast_cancer":
        return nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                             nn.Linear(32, 2))
    return nn.Sequential(nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 1920), nn.ReLU(),
                         nn.Linear(1920, 10))


# -- training ---------------------------------------------------------------------------------

def train_task(task: str, args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = load_task(task, args.seed)
    model = build_model(task)
    numel = sum(p.numel() for p in model.parameters())
    # Batch norm's running statistics stay per rank: DDP's default would broadcast them from
    # rank 0 every step, fp32 bytes outside the comm hook that no byte count here sees.
    ddp = DDP(model, bucket_cap_mb=args.bucket_cap_mb, broadcast_buffers=task != "resnet")
    counter = ByteCounter(args, ddp, numel)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=args.momentum)
    loss_fn = nn.CrossEntropyLoss()
    shard = len(xtr) // world
    steps_per_epoch = max(1, shard // args.batch_size)
    total = steps_per_epoch * args.epochs
    if args.max_steps:
        total = min(total, args.max_steps)
    eval_every = args.eval_every or steps_per_epoch
    records: list[dict[str, Any]] = []
    train_time, step, reached = 0.0, 0, None
    bar = tqdm(total=total, desc=f"{task} {args.compressor}", disable=rank != 0,
               dynamic_ncols=True)
    gen = torch.Generator().manual_seed(args.seed)
    epoch_loss = 0.0
    while step < total:
        epoch = step // steps_per_epoch
        perm = torch.randperm(len(xtr), generator=gen)  # same on every rank
        mine = perm[rank * shard:(rank + 1) * shard]
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = mine[b * args.batch_size:(b + 1) * args.batch_size]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = ddp(xtr[idx])
            loss = loss_fn(out.reshape(-1, out.shape[-1]), ytr[idx].reshape(-1))
            loss.backward()
            opt.step()
            train_time += time.perf_counter() - t0
            counter.after_step()
            epoch_loss += loss.item()
            step += 1
            bar.update(1)
            if step % eval_every == 0 or step == total:
                acc = evaluate(model, xte, yte)
                records.append({"epoch": epoch + (b + 1) / steps_per_epoch, "step": step,
                                "train_time_s": train_time, "test_acc": acc,
                                "train_loss": epoch_loss / (b + 1),
                                "payload_bytes": counter.payload, "wire_bytes": counter.wire,
                                "sent_bytes": counter.sent,
                                "received_bytes": counter.received})
                bar.set_postfix(acc=f"{acc:.3f}", MB=f"{counter.payload / 1e6:.2f}")
                if args.target_acc is not None and acc >= args.target_acc and reached is None:
                    reached = records[-1]
            if reached is not None or (args.max_time and train_time >= args.max_time):
                total = step
        epoch_loss = 0.0
    bar.close()
    return {"task": task, "params": numel, "world_size": world, "hook": counter.describe(),
            "method": counter.short(),
            "steps": step, "records": records, "reached_target": reached,
            "final_test_acc": records[-1]["test_acc"] if records else None,
            "payload_bytes": counter.payload, "wire_bytes": counter.wire,
            "sent_bytes": counter.sent, "received_bytes": counter.received,
            "train_time_s": train_time, "per_step": counter.per_step(),
            "params_digest": _digest(model)}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = 0.0
    for i in range(0, len(x), 1024):  # chunks: the lm's logits are (N, T, 256)
        acc += float((model(x[i:i + 1024]).argmax(-1) == y[i:i + 1024]).float().sum())
    acc /= y.numel()
    model.train()
    return acc


def _digest(model: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def print_epochs(task: str, r: dict[str, Any]) -> None:
    """The per-evaluation table: accuracy, bytes and wall time of each epoch."""
    print(f"\n{task} ({r['params']} parameters, {r['world_size']} ranks): {r['hook']}")
    print(f"{'epoch':>7}{'test acc':>10}{'payload MB':>12}{'wire MB':>10}{'time s':>9}")
    prev = {"payload_bytes": 0, "wire_bytes": 0, "train_time_s": 0.0}
    for q in r["records"]:
        print(f"{q['epoch']:>7.2f}{q['test_acc']:>10.4f}"
              f"{(q['payload_bytes'] - prev['payload_bytes']) / 1e6:>12.4f}"
              f"{(q['wire_bytes'] - prev['wire_bytes']) / 1e6:>10.4f}"
              f"{q['train_time_s'] - prev['train_time_s']:>9.2f}")
        prev = q


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 3.6 * len(runs)), squeeze=False)
    for row, (task, r) in zip(axes, runs.items()):
        rec = r["records"]
        row[0].plot([q["epoch"] for q in rec], [q["test_acc"] for q in rec], marker=".")
        row[0].set(xlabel="epoch", ylabel="test accuracy", title=f"{task}: {r['method']}")
        row[0].title.set_fontsize(9)
        row[1].plot([q["payload_bytes"] / 1e6 for q in rec], [q["test_acc"] for q in rec],
                    marker=".", label="payload")
        row[1].plot([q["wire_bytes"] / 1e6 for q in rec], [q["test_acc"] for q in rec],
                    ls="--", label="wire (frames, padding)")
        row[1].set(xlabel="MB sent by rank 0", ylabel="test accuracy")
        row[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(p)
    p.add_argument("--json", type=Path, default=None, help="write the result JSON here too")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.pg_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    tasks = ["digits", "breast_cancer"] if args.task == "all" else [args.task]
    try:
        runs = {t: train_task(t, args, rank, world) for t in tasks}
        # Every rank's collectives done before any rank tears its process group down (once,
        # in ~15 runs, a rank aborted in gloo's teardown: "terminate called without an
        # active exception"). Not on the error path: a peer may be gone.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        result = {"config": cfg, "backend": backend, "runs": runs,
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        args.out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(result, indent=1)
        (args.out / "train.json").write_text(text)
        if args.json:
            args.json.write_text(text)
        if not args.no_plot:
            plot(result, args.out / "train.png")
        for t, r in runs.items():
            print_epochs(t, r)
            mb = r["payload_bytes"] / 1e6
            print(f"{t}: test acc {r['final_test_acc']:.4f} after {r['steps']} steps, "
                  f"{r['train_time_s']:.1f} s training, rank 0 sent {mb:.2f} MB payload "
                  f"({r['wire_bytes'] / 1e6:.2f} MB on the wire)")
        print(f"wrote {args.out / 'train.json'}" + ("" if args.no_plot else
                                                    f" and {args.out / 'train.png'}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
