"""Train with compressed gradients under PyTorch FSDP2: QSGD reduce-scatter on digits.

    python examples/fsdp_train.py                       # relaunches itself, 2 CPU ranks
    python examples/fsdp_train.py --compressor fp32     # the lossless baseline
    torchrun --nproc_per_node 3 examples/fsdp_train.py --compressor ecq --feedback

Every hidden layer is an FSDP unit of its own (``fully_shard``), the root holds the rest;
``gradpress.fsdp.register`` puts a :class:`~gradpress.fsdp.CompressedReduceScatter` on each
unit. Printed per epoch: the mean loss, the test accuracy, and the bytes rank 0 sent per
step in all reduce-scatters, next to what FSDP's default fp32 reduce-scatter sends
(``(P - 1)`` chunks of 4-byte floats per unit, ring algorithm).
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.distributed.fsdp import fully_shard

import gradpress
import gradpress.fsdp

if "RANK" not in os.environ:  # not under torchrun: start 2 ranks of this script
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node=2", __file__, *sys.argv[1:]])

parser = argparse.ArgumentParser()
parser.add_argument("--compressor", default="qsgd", help="a gradpress registry name")
parser.add_argument("--feedback", action="store_true", help="ECQ-SGD worker feedback")
parser.add_argument("--epochs", type=int, default=5)
args = parser.parse_args()

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()

x, y = load_digits(return_X_y=True)
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # same on all ranks
x, y = torch.tensor(x / 16.0, dtype=torch.float32)[perm], torch.tensor(y)[perm]
x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
x_mine, y_mine = x_train[rank::world], y_train[rank::world]  # this rank's shard

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                      nn.Linear(256, 10))
for layer in (model[0], model[2]):
    fully_shard(layer)
fully_shard(model)
kw = {"bits": 2, "norm": "linf", "bucket_size": 512} if args.compressor == "ecq" else {}
comms = gradpress.fsdp.register(
    model, compressor=gradpress.get(args.compressor, **kw),
    feedback=gradpress.ECQFeedback(alpha=0.5, beta=0.9) if args.feedback else None)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
units = {"0": model[0], "2": model[2], "": model[4]}  # each unit's own parameters
fp32_bytes = sum((world - 1) * 4 * sum(-(-p.shape[0] // world) * p[0].numel()
                                       for p in m.parameters()) for m in units.values())

for epoch in range(args.epochs):
    sent0, losses = sum(c.total_sent_bytes for c in comms.values()), []
    for i in range(0, len(x_mine), 32):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x_mine[i:i + 32]), y_mine[i:i + 32])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    sent = (sum(c.total_sent_bytes for c in comms.values()) - sent0) / len(losses)
    if rank == 0:
        print(json.dumps({"epoch": epoch, "loss": round(sum(losses) / len(losses), 4),
                          "test_accuracy": round(acc, 4), "sent_bytes_per_step": sent,
                          "fp32_reduce_scatter_bytes_per_step": fp32_bytes}), flush=True)

dist.destroy_process_group()
