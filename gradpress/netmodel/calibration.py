"""Calibration, measured on this machine: a compressor's encode/decode time and bits per
coordinate (from ``len(payload.to_bytes())``), and a FLOP rate from a small MLP's step.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gradpress.compressors import Compressor
from gradpress.payload import Payload


# -- calibration ------------------------------------------------------------------------
@dataclass(frozen=True)
class CompressorProfile:
    """Measured cost of one compressor on a ``chunk``-element seeded Gaussian vector."""

    name: str
    config: dict[str, Any]
    chunk: int
    payload_bytes: int
    encode_s: float
    decode_s: float
    label: str = ""

    @property
    def display_name(self) -> str:
        """``label`` when given (e.g. ``qsgd:s=4``), else the compressor's name."""
        return self.label or self.name

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.payload_bytes / self.chunk

    def bytes_for(self, d: float) -> float:
        """Payload bytes for ``d`` elements, scaled from the measured chunk."""
        return self.payload_bytes * d / self.chunk

    def encode_time(self, d: float) -> float:
        return self.encode_s * d / self.chunk

    def decode_time(self, d: float) -> float:
        return self.decode_s * d / self.chunk


def _sync(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _best_time(fn: Any, repeats: int) -> tuple[float, Any]:
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def calibrate(compressor: Compressor, numel: int, *, repeats: int = 3, seed: int = 0,
              device: str | torch.device = "cpu", label: str = "") -> CompressorProfile:
    """Time ``compressor``'s encode (to bytes) and decode (from bytes) on ``numel`` elements.

    The payload size is ``len(payload.to_bytes())`` of a real encode of a seeded Gaussian
    vector; times are the best of ``repeats`` runs after one warm-up.
    """
    if numel < 1:
        raise ValueError(f"numel must be >= 1, got {numel}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen).to(device)
    raw = compressor.encode(x, seed=seed).to_bytes()  # warm-up
    compressor.decode(Payload.from_bytes(raw), device=device)
    enc_s, raw = _best_time(lambda: compressor.encode(x, seed=seed).to_bytes(), repeats)

    def decode() -> None:
        compressor.decode(Payload.from_bytes(raw), device=device)
        _sync(device)

    dec_s, _ = _best_time(decode, repeats)
    return CompressorProfile(compressor.name, compressor.config(), numel, len(raw), enc_s,
                             dec_s, label)


@dataclass(frozen=True)
class ComputeProfile:
    """Measured training speed of this machine: FLOP/s of an MLP's forward+backward+step."""

    flops_per_s: float
    step_s: float
    params: int
    batch: int
    device: str

    def step_time(self, flops_per_step: float) -> float:
        return flops_per_step / self.flops_per_s


def calibrate_compute(*, hidden: int = 512, batch: int = 256, steps: int = 10, seed: int = 0,
                      device: str | torch.device = "cpu") -> ComputeProfile:
    """Time a training step of a 64-hidden-hidden-10 MLP (digits-shaped input) on ``device``.

    An MLP's step costs ``6 * params * batch`` FLOPs (forward 2, backward 4 per weight and
    sample); dividing by the measured time gives the FLOP rate used for larger models.
    """
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(), torch.nn.Linear(hidden, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 64, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        _sync(device)

    step()
    step_s, _ = _best_time(step, steps)
    params = sum(p.numel() for p in model.parameters())
    return ComputeProfile(6.0 * params * batch / step_s, step_s, params, batch, str(device))


def profile_dict(profile: CompressorProfile | ComputeProfile) -> dict[str, Any]:
    """JSON-ready view of a profile."""
    out = asdict(profile)
    if isinstance(profile, CompressorProfile):
        out["bits_per_element"] = profile.bits_per_element
    return out
