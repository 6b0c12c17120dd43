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
* two-phase compressed all-reduce (all-to-all of compressed shards, owner re-encode,
  all-gather of the owners' shards; :mod:`gradpress.collectives.two_phase`):
  ``2 (p-1) a + 2 (p-1)/p n beta``, then ``2 (p-1)`` decodes of ``d/p`` elements;
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

from gradpress.netmodel.calibration import (
    CompressorProfile,
    ComputeProfile,
    calibrate,
    calibrate_compute,
    profile_dict,
)
from gradpress.netmodel.collectives import (
    GBIT,
    TCP_EFFICIENCY,
    Network,
    allgather_s,
    parameter_server_s,
    parse_rate,
    ring_allreduce_s,
    tree_allreduce_s,
    two_phase_s,
)
from gradpress.netmodel.predict import (
    DDP_BUCKET_BYTES,
    MODELS,
    SCHEMES,
    ModelSpec,
    StepBreakdown,
    predict,
    step_time,
)
from gradpress.netmodel.validation import records_from_slow_network, validate, validation_markdown

__all__ = [
    "DDP_BUCKET_BYTES", "GBIT", "MODELS", "SCHEMES", "TCP_EFFICIENCY", "CompressorProfile",
    "ComputeProfile", "ModelSpec", "Network", "StepBreakdown", "allgather_s", "calibrate",
    "calibrate_compute", "parameter_server_s", "parse_rate", "predict", "profile_dict",
    "records_from_slow_network", "ring_allreduce_s", "step_time", "tree_allreduce_s",
    "two_phase_s", "validate", "validation_markdown",
]
