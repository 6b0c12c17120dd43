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
    two_phase_s,
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

#: ring/tree: fp32 all-reduce; ring-fp16: all-reduce in fp16 (PyTorch's fp16 hook);
#: allgather / two_phase / ps: a compressor's payloads.
SCHEMES = ("ring", "ring-fp16", "tree", "allgather", "two_phase", "ps")


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

    ``ring``/``tree`` all-reduce fp32 gradients and ``ring-fp16`` fp16 ones (no profile
    needed); ``allgather``/``two_phase``/``ps`` send ``profile``'s payloads (``ps`` pulls
    the fp32 update back). ``p == 1`` costs ``compute_s`` alone. Codec work per worker:
    all-gather encodes ``d`` and decodes ``p`` payloads of ``d``; two-phase encodes ``d``
    (its shards) and ``d/p`` (its owner shard) and decodes ``2(p-1)`` shards of ``d/p``.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    p = _workers(p)
    multi = (p > 1).astype(float)
    d = model.params
    msgs = max(1, math.ceil(model.grad_bytes / bucket_bytes))
    zeros = np.zeros_like(p)
    compute = np.full_like(p, compute_s)
    if scheme in ("ring", "ring-fp16", "tree"):
        nbytes = model.grad_bytes // (2 if scheme == "ring-fp16" else 1)
        fn = tree_allreduce_s if scheme == "tree" else ring_allreduce_s
        comm = fn(nbytes, p, net, msgs)
        return StepBreakdown(compute, zeros, comm, zeros, float(nbytes))
    if profile is None:
        raise ValueError(f"scheme {scheme!r} needs a CompressorProfile from calibrate()")
    nbytes = profile.bytes_for(d)
    encode = multi * profile.encode_time(d)
    if scheme == "allgather":
        comm = allgather_s(nbytes, p, net, msgs)
        decode = multi * p * profile.decode_time(d)  # every worker decodes p payloads
    elif scheme == "two_phase":
        comm = two_phase_s(nbytes, p, net, msgs)
        encode = encode + multi * profile.encode_time(d) / p  # the owner's shard
        decode = multi * 2 * (p - 1) / p * profile.decode_time(d)
    else:
        comm = parameter_server_s(nbytes, model.grad_bytes, p, net, servers, msgs)
        decode = multi * p * profile.decode_time(d) / servers  # each shard decodes p shards
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
            combos: list[tuple[str, CompressorProfile | None]] = [
                ("ring", None), ("ring-fp16", None), ("tree", None)]
            combos += [(s, prof) for prof in profiles for s in ("allgather", "two_phase", "ps")]
            for scheme, prof in combos:
                br = step_time(model, p, net, scheme, compute_s, prof, servers=servers)
                total = br.total
                for i, w in enumerate(workers):
                    rows.append({
                        "model": key, "params": model.params, "bandwidth_bps": bw,
                        "scheme": scheme,
                        "compressor": prof.display_name if prof else (
                            "fp16" if scheme == "ring-fp16" else "fp32"),
                        "bits_per_element": prof.bits_per_element if prof else (
                            16.0 if scheme == "ring-fp16" else 32.0),
                        "workers": int(w), "compute_s": float(br.compute[i]),
                        "encode_s": float(br.encode[i]), "comm_s": float(br.comm[i]),
                        "decode_s": float(br.decode[i]), "step_s": float(total[i]),
                        "bytes_per_worker": br.bytes_per_worker,
                        "throughput": float(w * model.batch / total[i]),
                        "speedup": float(w * compute_s / total[i]),
                    })
    return rows


