"""Compressed gradients under Hugging Face Accelerate (DDP): 2-bit ECQ-SGD on digits.

    python examples/accelerate_ddp.py                 # relaunches itself, 2 CPU ranks
    accelerate launch --cpu --num_processes 2 examples/accelerate_ddp.py
    torchrun --nproc_per_node 2 examples/accelerate_ddp.py --steps 20

Accelerate's ``DistributedDataParallelKwargs(comm_hook=...)`` takes only PyTorch's own
hooks (an enum: fp16, bf16, PowerSGD, ...), so a gradpress hook is registered on the model
that ``accelerator.prepare`` returns, which is the ``DistributedDataParallel`` wrapper
when more than one process runs::

    model, opt, loader = accelerator.prepare(model, opt, loader)
    model.register_comm_hook(state, compression_hook)

Register it before the first backward pass. Accelerate's ``no_sync`` for gradient
accumulation still works: DDP calls no hook on the steps it skips.
"""

import argparse
import json
import os
import sys

import torch
from accelerate import Accelerator
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

import gradpress
from gradpress.ddp import CompressionState, compression_hook

if "RANK" not in os.environ:  # not under a launcher: start 2 ranks of this script
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node=2", __file__, *sys.argv[1:]])

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200, help="optimizer steps in all")
args = parser.parse_args()

torch.set_num_threads(1)
accelerator = Accelerator(cpu=True)  # on GPUs drop cpu=True; the hook is the same

x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
loader = DataLoader(TensorDataset(x[:1500], y[:1500]), batch_size=32, shuffle=True,
                    generator=torch.Generator().manual_seed(0))

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
model, opt, loader = accelerator.prepare(model, opt, loader)

state = CompressionState(None, compressor=gradpress.get("ecq", bits=2, norm="linf",
                                                         bucket_size=512),
                         feedback=gradpress.ECQFeedback(alpha=0.5, beta=0.9))
if isinstance(model, DDP):  # a single process has no DDP wrapper and nothing to send
    model.register_comm_hook(state, compression_hook)

losses, step = [], 0
while step < args.steps:
    for xb, yb in loader:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        accelerator.backward(loss)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step == args.steps:
            break

with torch.no_grad():
    acc = (model(x[1500:]).argmax(1) == y[1500:]).float().mean().item()
n_params = sum(p.numel() for p in model.parameters())
if accelerator.is_main_process:
    print(json.dumps({"processes": accelerator.num_processes, "steps": step,
                      "first_loss": losses[0], "last_loss": losses[-1], "test_accuracy": acc,
                      "payload_bytes_per_step": state.total_payload_bytes / max(state.iter, 1),
                      "fp32_bytes_per_step": 4 * n_params}), flush=True)
accelerator.end_training()
