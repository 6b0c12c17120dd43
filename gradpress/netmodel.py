"""Communication cost model: how fast data-parallel SGD runs with and without compression.

ECQ-SGD (Wu, Huang, Huang, Zhang, ICML 2018, arXiv 1806.08054) predicts the speedup of
quantized SGD on large GPU clusters with a performance model in which one iteration costs
computation + encoding + communication. We implement that model with the standard
latency-bandwidth ("alpha-beta") costs of the collectives that actually carry gradients
(Thakur, Rabenseifner and Gropp 2005; Patarasuk and Yuan 2009). For ``p`` workers, a
message of ``n`` bytes per worker, link bandwidth ``B`` bit/s, per-message latency ``a``
and ``beta = 8 / (B * efficiency)`` seconds per byte:

* ring all-reduce (uncompressed fp32, PyTorch DDP's default): ``2 (p-1) a + 2 (p-1)/p n beta``;
* tree all-reduce (binary tree reduce then broadcast, not pipelined):
  ``2 ceil(log2 p) (a + n beta)``;
* all-gather of compressed payloads (non-linear codes cannot be summed on the wire, so every
  worker receives every other worker's payload, ring algorithm): ``(p-1)(a + n beta)``, then
  ``p`` decodes;
* parameter server with ``S`` shards: workers push ``n_up`` (compressed) bytes, the servers
  decode ``p`` payloads, and push back ``n_down`` bytes (fp32 model update by default); the
  servers' links are the bottleneck: ``2 a + p (n_up + n_down) beta / S``.

Step time ``T(p) = T_compute + T_encode + T_comm(p) + T_decode(p)``; ``T(1) = T_compute``
(one worker neither compresses nor communicates). Throughput is ``p * batch / T(p)`` samples
per second and the speedup is ``p T(1) / T(p)``. Latency terms are paid once per DDP bucket
(``ceil(4 d / bucket_bytes)`` buckets, 25 MiB by default) since every bucket is its own
collective.

Calibration is measured, never assumed: :func:`calibrate` times a compressor's encode and
decode on a seeded Gaussian vector (the model's size, or a representative chunk whose
per-element rate is scaled to the model's size) and takes the bits per coordinate from
``len(payload.to_bytes())``; :func:`calibrate_compute` times forward + backward + SGD step of
a small MLP on this machine to get a FLOP rate that turns a model's FLOPs per sample into
compute time. :func:`validate` compares predicted and measured step times from the
slow-network benchmark.

Bit cost: the model consumes measured bytes; it has no bit formula of its own.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from gradpress.compressors import Compressor
from gradpress.payload import Payload

GBIT = 1e9
#: Payload share of a 1514-byte Ethernet frame carrying 1448 TCP bytes (TCP/IP + Ethernet
#: headers over a 1500-byte MTU): what a link shaped with ``tc`` delivers to gloo.
TCP_EFFICIENCY = 1448 / 1514
DDP_BUCKET_BYTES = 25 * 2**20


# -- the network ------------------------------------------------------------------------
@dataclass(frozen=True)
class Network:
    """A homogeneous full-duplex network: every worker has one link of this bandwidth."""

    bandwidth_bps: float
    latency_s: float = 5e-6
    efficiency: float = 1.0

    def __post_init__(self) -> None:
        if not self.bandwidth_bps > 0:
            raise ValueError(f"bandwidth_bps must be > 0, got {self.bandwidth_bps}")
        if self.latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {self.latency_s}")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency must be in (0, 1], got {self.efficiency}")

    def transfer_s(self, nbytes: Any) -> Any:
        """Seconds to push ``nbytes`` through one link (bandwidth term only)."""
        return 8.0 * np.asarray(nbytes, dtype=float) / (self.bandwidth_bps * self.efficiency)


def _workers(p: Any) -> np.ndarray:
    arr = np.asarray(p, dtype=float)
    if np.any(arr < 1):
        raise ValueError("the number of workers must be >= 1")
    return arr


def ring_allreduce_s(nbytes: float, p: Any, net: Network, messages: int = 1) -> Any:
    """Ring all-reduce of ``nbytes`` per worker: ``2(p-1) a + 2(p-1)/p n beta``."""
    p = _workers(p)
    return 2 * (p - 1) * net.latency_s * messages + 2 * (p - 1) / p * net.transfer_s(nbytes)


def tree_allreduce_s(nbytes: float, p: Any, net: Network, messages: int = 1) -> Any:
    """Binary-tree reduce + broadcast: ``2 ceil(log2 p) (a + n beta)``."""
    p = _workers(p)
    depth = np.ceil(np.log2(p))
    return 2 * depth * (net.latency_s * messages + net.transfer_s(nbytes))


def allgather_s(nbytes: float, p: Any, net: Network, messages: int = 1) -> Any:
    """Ring all-gather of one ``nbytes`` payload per worker: ``(p-1)(a + n beta)``."""
    p = _workers(p)
    return (p - 1) * (net.latency_s * messages + net.transfer_s(nbytes))


def parameter_server_s(up_bytes: float, down_bytes: float, p: Any, net: Network,
                       servers: int = 1, messages: int = 1) -> Any:
    """Push ``up_bytes`` from each worker to ``servers`` shards, pull ``down_bytes`` back."""
    if servers < 1:
        raise ValueError(f"servers must be >= 1, got {servers}")
    p = _workers(p)
    t = 2 * net.latency_s * messages + p * net.transfer_s(up_bytes + down_bytes) / servers
    return np.where(p > 1, t, 0.0)


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


# -- validation against measurements ------------------------------------------------------
def validate(measured: list[dict[str, Any]], *, latency_s: float = 1e-4,
             efficiency: float = TCP_EFFICIENCY,
             profiles: dict[str, CompressorProfile] | None = None,
             tolerance: float = 0.25) -> list[dict[str, Any]]:
    """Predicted vs measured step time for each record of the slow-network benchmark.

    Each record needs ``compressor``, ``nproc``, ``bandwidth_bps``, ``step_time_s`` and
    ``bytes_per_step`` (the bytes one rank puts into the collective per step: its padded
    payloads, or its fp32 gradient for plain all-reduce). The local (non-network) part of a
    step comes from either

    * ``compute_s`` (forward+backward+step) plus ``encode_s``/``decode_s`` (per step; or
      ``numel`` with a matching entry in ``profiles``, then ``p`` decodes are charged), or
    * ``reference_step_time_s`` measured for the same method over a fast link of
      ``reference_bandwidth_bps``: local = reference - predicted communication at that
      bandwidth. This calibrates everything the hook does on the CPU (codec, feedback,
      copies) under the same load, so only the network part is predicted.

    Optional: ``latency_s`` (per message), ``messages`` (collectives per step) and
    ``collective`` (``allreduce`` or ``allgather``; default all-reduce for fp32/plain DDP
    and PyTorch's own hooks, all-gather otherwise). Returns one row per record with
    ``predicted_s``, ``measured_s``, ``rel_error`` and ``within`` (|error| <= tolerance).
    """
    rows = []
    for rec in measured:
        missing = [k for k in ("compressor", "nproc", "bandwidth_bps", "step_time_s",
                               "bytes_per_step") if k not in rec]
        if "compute_s" not in rec and "reference_step_time_s" not in rec:
            missing.append("compute_s (or reference_step_time_s)")
        if missing:
            raise ValueError(f"measured record lacks {', '.join(missing)}: {rec}")
        name, p = str(rec["compressor"]), int(rec["nproc"])
        lat = float(rec.get("latency_s", latency_s))
        msgs = int(rec.get("messages", 1))
        collective = rec.get("collective") or _default_collective(name)
        nbytes = float(rec["bytes_per_step"])
        comm = _comm_s(collective, nbytes, p, Network(float(rec["bandwidth_bps"]), lat,
                                                        efficiency), msgs)
        if "reference_step_time_s" in rec:
            ref_net = Network(float(rec["reference_bandwidth_bps"]), lat, efficiency)
            local = float(rec["reference_step_time_s"]) - _comm_s(collective, nbytes, p,
                                                                   ref_net, msgs)
            compute, codec = local, 0.0
        else:
            enc, dec = rec.get("encode_s"), rec.get("decode_s")
            prof = (profiles or {}).get(name)
            if prof is not None and "numel" in rec:
                enc = prof.encode_time(rec["numel"]) if enc is None else enc
                dec = p * prof.decode_time(rec["numel"]) if dec is None else dec
            compute, codec = float(rec["compute_s"]), float(enc or 0.0) + float(dec or 0.0)
        pred = compute + codec + comm
        meas = float(rec["step_time_s"])
        err = pred / meas - 1.0 if meas > 0 else math.inf
        rows.append({"compressor": name, "nproc": p, "bandwidth_bps": float(rec["bandwidth_bps"]),
                     "collective": collective, "bytes_per_step": nbytes, "compute_s": compute,
                     "codec_s": codec, "comm_s": comm, "predicted_s": pred, "measured_s": meas,
                     "rel_error": err, "within": abs(err) <= tolerance})
    return rows


def _default_collective(name: str) -> str:
    low = name.lower()
    if low in ("fp32", "none", "ddp", "allreduce", "plain") or low.startswith("torch-"):
        return "allreduce"
    return "allgather"


def _comm_s(collective: str, nbytes: float, p: int, net: Network, msgs: int) -> float:
    if collective == "allreduce":
        return float(ring_allreduce_s(nbytes, p, net, msgs))
    if collective == "allgather":
        return float(allgather_s(nbytes, p, net, msgs))
    raise ValueError(f"collective must be 'allreduce' or 'allgather', got {collective!r}")


def parse_rate(rate: str | float) -> float:
    """A ``tc`` rate (``"100mbit"``, ``"1gbit"``, ``"500kbit"``, ``"10mbps"``) in bit/s."""
    if isinstance(rate, (int, float)):
        return float(rate)
    text = rate.strip().lower()
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "gbps": 8e9, "mbps": 8e6, "kbps": 8e3,
             "bit": 1.0, "bps": 8.0}
    for unit, scale in units.items():
        if text.endswith(unit):
            try:
                return float(text[: -len(unit)]) * scale
            except ValueError:
                break
    raise ValueError(f"cannot read the rate {rate!r}; use e.g. 100mbit or 1gbit")


def records_from_slow_network(result: dict[str, Any], *,
                              reference: dict[str, Any] | None = None,
                              compute_s: float | None = None, nproc: int = 2
                              ) -> list[dict[str, Any]]:
    """Validation records from ``benchmarks/slow_network.py``'s JSON (``rate``, ``rows``).

    Per method: ``step_time_s`` = its ``step_s``, ``bytes_per_step`` = ``wire_bytes /
    steps`` (training stops at the target, so both count the same steps). The local part
    comes from ``reference`` (the same benchmark run at a fast rate, matched by label) or,
    failing that, from ``compute_s``. Failed methods and ones absent from ``reference`` are
    left out when no ``compute_s`` is given.
    """
    bw = parse_rate(result["rate"])
    ref_rows = {r["label"]: r for r in (reference or {}).get("rows", []) if not r.get("failed")}
    out = []
    for row in result["rows"]:
        if row.get("failed") or not row.get("steps"):
            continue
        rec: dict[str, Any] = {"compressor": row["label"], "nproc": nproc,
                               "bandwidth_bps": bw, "step_time_s": float(row["step_s"]),
                               "bytes_per_step": row["wire_bytes"] / row["steps"]}
        ref = ref_rows.get(row["label"])
        if ref is not None and ref.get("steps"):
            rec["reference_step_time_s"] = float(ref["step_s"])
            rec["reference_bandwidth_bps"] = parse_rate(reference["rate"])  # type: ignore[index]
        elif compute_s is not None:
            rec["compute_s"] = compute_s
        else:
            continue
        out.append(rec)
    return out


def validation_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`validate` as a Markdown pipe table."""
    lines = ["| compressor | ranks | link | bytes/step | predicted s | measured s | error |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['compressor']} | {r['nproc']} | {_fmt_bw(r['bandwidth_bps'])} | "
                     f"{r['bytes_per_step']:,.0f} | {r['predicted_s']:.4f} | "
                     f"{r['measured_s']:.4f} | {100 * r['rel_error']:+.1f}% |")
    return "\n".join(lines)


def _fmt_bw(bps: float) -> str:
    return f"{bps / GBIT:g} Gbit/s" if bps >= GBIT else f"{bps / 1e6:g} Mbit/s"


def profile_dict(profile: CompressorProfile | ComputeProfile) -> dict[str, Any]:
    """JSON-ready view of a profile."""
    out = asdict(profile)
    if isinstance(profile, CompressorProfile):
        out["bits_per_element"] = profile.bits_per_element
    return out
