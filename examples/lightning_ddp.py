"""Compressed gradients under PyTorch Lightning (DDP): 2-bit ECQ-SGD on digits.

    python examples/lightning_ddp.py             # 2 CPU processes (Lightning spawns them)
    python examples/lightning_ddp.py --steps 20

On GPUs Lightning takes the hook and its state directly::

    strategy = DDPStrategy(ddp_comm_state=state, ddp_comm_hook=compression_hook)
    trainer = L.Trainer(accelerator="gpu", devices=2, strategy=strategy)

But ``DDPStrategy`` registers comm hooks only when the root device is CUDA
(``DDPStrategy._register_ddp_hooks``, Lightning 2.6): on CPU the two arguments are
silently ignored and DDP all-reduces fp32. The CPU alternative is the small callback
below, which registers the hook on the wrapped ``DistributedDataParallel`` model at
``on_fit_start`` (after the strategy wrapped it, before the first backward pass). It works
on GPUs as well, so one script serves both; do not pass the hook to ``DDPStrategy`` too
(DDP accepts one comm hook per model).
"""

import argparse
import json

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

import gradpress
from gradpress.ddp import CompressionState, compression_hook


class CompressedDDPHook(L.Callback):
    """Registers ``compression_hook`` with ``state`` on the strategy's DDP model at
    ``on_fit_start``, on any device (Lightning's own registration is CUDA-only)."""

    def __init__(self, state: CompressionState) -> None:
        self.state = state

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = trainer.strategy.model
        if isinstance(model, DDP):
            model.register_comm_hook(self.state, compression_hook)


class Digits(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32)[:1500],
                         torch.tensor(y)[:1500])
    state = CompressionState(None, compressor=gradpress.get("ecq", bits=2, norm="linf",
                                                         bucket_size=512),
                             feedback=gradpress.ECQFeedback(alpha=0.5, beta=0.9))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(
        process_group_backend="gloo", start_method="popen"), max_steps=args.steps,
        callbacks=[CompressedDDPHook(state)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False)
    module = Digits()
    trainer.fit(module, DataLoader(data, batch_size=32, shuffle=True))
    if trainer.is_global_zero:
        print(json.dumps({"steps": state.iter, "loss": float(trainer.callback_metrics["loss"]),
                          "payload_bytes_per_step": state.total_payload_bytes /
                          max(state.iter, 1),
                          "fp32_bytes_per_step": 4 * sum(p.numel()
                                                         for p in module.parameters())}),
              flush=True)


if __name__ == "__main__":
    main()
