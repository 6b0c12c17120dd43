"""Train with compressed gradients in PyTorch DDP: 2-bit ECQ-SGD on scikit-learn's digits.

    python examples/ddp_train.py            # relaunches itself under torchrun, 2 ranks
    torchrun --nproc_per_node 2 examples/ddp_train.py

Each rank compresses its gradient buckets with ECQ (2 bits a coordinate, error
compensation), all-gathers the payload bytes, decodes and averages them: every rank ends each
step with the same parameters. The bytes printed are len(payload) of what rank 0 sent.
"""

import os
import sys

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradpress
from gradpress.ddp import CompressionState, compression_hook

if "RANK" not in os.environ:  # not under torchrun: start 2 ranks of this script
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node=2", __file__])

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()

x, y = load_digits(return_X_y=True)
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # same on all ranks
x, y = torch.tensor(x / 16.0, dtype=torch.float32)[perm], torch.tensor(y)[perm]
x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
x_mine, y_mine = x_train[rank::world], y_train[rank::world]  # this rank's shard

torch.manual_seed(0)
model = DDP(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)))
# ternary ECQ-SGD quantizer, l-inf scale per 512 coordinates (as `gradpress train` runs it)
state = CompressionState(None, compressor=gradpress.get("ecq", bits=2, norm="linf",
                                                         bucket_size=512),
                         feedback=gradpress.ECQFeedback(alpha=0.5, beta=0.9))
model.register_comm_hook(state, compression_hook)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

for epoch in range(10):
    sent, steps = state.total_payload_bytes, 0
    for i in range(0, len(x_mine), 32):
        steps += 1
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_mine[i:i + 32]), y_mine[i:i + 32]).backward()
        opt.step()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    if rank == 0:
        print(f"epoch {epoch}: test accuracy {acc:.3f}, rank 0 sent "
              f"{state.total_payload_bytes - sent} bytes "
              f"(fp32 all-reduce: {4 * sum(p.numel() for p in model.parameters()) * steps})")

torch.save(state.state_dict(), f"/tmp/gradpress-ddp-state-rank{rank}.pt")  # one per rank
dist.destroy_process_group()
