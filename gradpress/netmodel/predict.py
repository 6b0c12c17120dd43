"""Step-time prediction: a model (parameters, FLOPs), a compressor profile and a network give
``T(p) = T_compute + T_encode + T_comm(p) + T_decode(p)`` for each collective scheme."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradpress.netmodel.calibration import CompressorProfile, ComputeProfile
from gradpress.netmodel.collectives import (
    Network,
    _workers,
    allgather_s,
    parameter_server_s,
    ring_allreduce_s,
    tree_allreduce_s,
)

DDP_BUCKET_BYTES = 25 * 2**20


# -- models and predictions -------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A model size for the predictions: parameters, training FLOPs per sample, batch."""

    name: str
    params: int
    train_flops_per_sample: float
    batch: int

    @property
    def grad_bytes(self) -> int:
        return 4 * self.params


#: ResNet-20 (CIFAR-10, 0.27M weights, ~41M multiply-adds per 32x32 image), ResNet-50
#: (ImageNet, 25.6M weights, ~4.1G multiply-adds per 224x224 image), a 1B-parameter
#: transformer (6 FLOPs per weight per token, 512-token samples). Training = 3x forward.
MODELS: dict[str, ModelSpec] = {
    "resnet20": ModelSpec("ResNet-20", 270_000, 3 * 2 * 40.8e6, 128),
    "resnet50": ModelSpec("ResNet-50", 25_557_032, 3 * 2 * 4.1e9, 32),
    "1b": ModelSpec("1B transformer", 1_000_000_000, 6 * 1e9 * 512, 8),
}

SCHEMES = ("ring", "tree", "allgather", "ps")


@dataclass
class StepBreakdown:
    """Seconds per iteration by part, arrays over the worker counts."""

    compute: np.ndarray
    encode: np.ndarray
    comm: np.ndarray
    decode: np.ndarray
    bytes_per_worker: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> np.ndarray:
        return self.compute + self.encode + self.comm + self.decode


def step_time(model: ModelSpec, p: Any, net: Network, scheme: str, compute_s: float,
              profile: CompressorProfile | None = None, *, servers: int = 1,
              bucket_bytes: int = DDP_BUCKET_BYTES) -> StepBreakdown:
    """Predicted iteration time of ``model`` on ``p`` workers with ``scheme``.

    ``ring``/``tree`` all-reduce fp32 gradients (no profile needed); ``allgather``/``ps``
    send ``profile``'s payloads (``ps`` pulls the fp32 update back). ``p == 1`` costs
    ``compute_s`` alone.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    p = _workers(p)
    multi = (p > 1).astype(float)
    d = model.params
    msgs = max(1, math.ceil(model.grad_bytes / bucket_bytes))
    zeros = np.zeros_like(p)
    compute = np.full_like(p, compute_s)
    if scheme in ("ring", "tree"):
        fn = ring_allreduce_s if scheme == "ring" else tree_allreduce_s
        comm = fn(model.grad_bytes, p, net, msgs)
        return StepBreakdown(compute, zeros, comm, zeros, float(model.grad_bytes))
    if profile is None:
        raise ValueError(f"scheme {scheme!r} needs a CompressorProfile from calibrate()")
    nbytes = profile.bytes_for(d)
    encode = multi * profile.encode_time(d)
    if scheme == "allgather":
        comm = allgather_s(nbytes, p, net, msgs)
    else:
        comm = parameter_server_s(nbytes, model.grad_bytes, p, net, servers, msgs)
    # all-gather: every worker decodes p payloads; PS: each shard decodes p payload shards.
    decode = multi * p * profile.decode_time(d) / (servers if scheme == "ps" else 1)
    return StepBreakdown(compute, encode, comm, decode, nbytes)


def predict(models: dict[str, ModelSpec], profiles: list[CompressorProfile],
            compute: ComputeProfile, bandwidths_bps: list[float], workers: list[int], *,
            latency_s: float = 5e-6, servers: int = 1) -> list[dict[str, Any]]:
    """Throughput and speedup for every model x bandwidth x scheme x worker count."""
    p = np.asarray(workers, dtype=float)
    rows: list[dict[str, Any]] = []
    for key, model in models.items():
        compute_s = compute.step_time(model.train_flops_per_sample * model.batch)
        for bw in bandwidths_bps:
            net = Network(bw, latency_s)
            combos: list[tuple[str, CompressorProfile | None]] = [("ring", None),
                                                                  ("tree", None)]
            combos += [(s, prof) for prof in profiles for s in ("allgather", "ps")]
            for scheme, prof in combos:
                br = step_time(model, p, net, scheme, compute_s, prof, servers=servers)
                total = br.total
                for i, w in enumerate(workers):
                    rows.append({
                        "model": key, "params": model.params, "bandwidth_bps": bw,
                        "scheme": scheme, "compressor": prof.display_name if prof else "fp32",
                        "bits_per_element": prof.bits_per_element if prof else 32.0,
                        "workers": int(w), "compute_s": float(br.compute[i]),
                        "encode_s": float(br.encode[i]), "comm_s": float(br.comm[i]),
                        "decode_s": float(br.decode[i]), "step_s": float(total[i]),
                        "bytes_per_worker": br.bytes_per_worker,
                        "throughput": float(w * model.batch / total[i]),
                        "speedup": float(w * compute_s / total[i]),
                    })
    return rows


