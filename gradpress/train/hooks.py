"""The training worker's comm hooks and the bytes each rank contributed through them.

:class:`ByteCounter` registers one hook on a DDP model (a gradpress
:func:`~gradpress.ddp.compression_hook`, or one of PyTorch's) and keeps cumulative byte
counts: for gradpress, :class:`~gradpress.ddp.CompressionState`'s own sums of
``len(payload)`` (headers included) and of frames put into the collectives; for PyTorch's
hooks, the tensor bytes all-reduced (``4`` or ``2`` bytes a coordinate; PowerSGD: ``4 *``
the elements of P, Q and uncompressed tensors, from its own stats).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

TORCH_HOOKS = ("ddp", "torch-fp16", "torch-powersgd", "compute-only")
AUTO_FEEDBACK = {"ecq": "ecq", "sign": "ef", "topk": "ef", "powersgd": "ef", "natural": "none"}


def compressor_kwargs(name: str, bits: int | None, extra: str) -> dict[str, Any]:
    """``--bits`` and ``--compressor-args`` as constructor kwargs of compressor ``name``."""
    from gradpress.specs import parse_spec

    kw = parse_spec(f"{name}:{extra}")[1] if extra else {}
    if name == "ecq":
        # A DDP bucket holds millions of coordinates: one l2 scale for all of them has
        # omega = sqrt(n)/s. Training scales each 512 coordinates by their l-inf norm
        # (the paper's other scale) unless --compressor-args says otherwise. The per-payload
        # Huffman code rather than ecq's default "best": range coding 4.1M symbols costs
        # about 1 s a step on this CPU (slow_network, 4 ranks: 1.70 vs 0.69 s/step).
        kw = {"norm": "linf", "bucket_size": 512, "entropy": "huffman"} | kw
    if bits is not None:
        if name in ("ecq", "qsgd", "natural_dithering"):
            if bits < 2:
                raise SystemExit(f"{name} needs --bits >= 2 (s = 2^(bits-1)-1 levels)")
            kw["s"] = 2 ** (bits - 1) - 1
        else:
            raise SystemExit(f"--bits applies to ecq, qsgd, natural_dithering; for {name} "
                             "use --compressor-args")
    return kw


def _no_communication(state, bucket):  # no annotations: DDP checks them as real types
    """A comm hook that sends nothing: the step's compute, DDP's bucketing included."""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


class ByteCounter:
    """Cumulative bytes this rank contributed, for any of the hooks."""

    def __init__(self, args: argparse.Namespace, ddp: nn.Module, numel: int) -> None:
        self.kind, self.numel = args.compressor, numel
        self.state: Any = None
        self.payload = self.wire = self.sent = self.received = 0
        #: per step: this rank's payload bytes and the header bytes among them
        self.step_payload: list[int] = []
        self.step_headers: list[int] = []
        self._header = 0  # header bytes of one bucket payload (0: PyTorch's hooks, no header)
        self.world = dist.get_world_size()
        if self.kind == "compute-only":
            ddp.register_comm_hook(None, _no_communication)
        elif self.kind == "torch-fp16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif self.kind == "torch-powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

            self.state = ps.PowerSGDState(None, matrix_approximation_rank=args.rank_r,
                                          start_powerSGD_iter=2, random_seed=args.seed)
            ddp.register_comm_hook(self.state, ps.powerSGD_hook)
        elif self.kind != "ddp":
            import gradpress
            from gradpress.ddp import CompressionState, compression_hook

            fb_name = args.feedback
            if fb_name == "auto":
                fb_name = AUTO_FEEDBACK.get(self.kind, "none")
            fb_kw = {"alpha": args.alpha, "beta": args.beta} if fb_name == "ecq" else {}
            comp = gradpress.get(self.kind, **compressor_kwargs(self.kind, args.bits,
                                                                 args.compressor_args))
            self.state = CompressionState(None, compressor=comp,
                                          feedback=gradpress.feedback.get(fb_name, **fb_kw),
                                          bounded=False if args.unbounded else "auto",
                                          seed=args.seed, collective=args.collective)
            ddp.register_comm_hook(self.state, compression_hook)
            from gradpress.payload import header_size

            probe = comp.encode(torch.zeros(8), seed=0)  # a bucket buffer is 1-D too
            self._header = header_size(1, seed=probe.seed is not None, crc=self.state.crc)
            if self.state.collective_for(self.world) == "two_phase":  # P shard payloads
                self._header *= self.world
        self._ps_seen = 0

    def after_step(self) -> None:
        """Add the step that just ended (call after ``loss.backward()``)."""
        before = self.payload
        self._count()
        self.step_payload.append(self.payload - before)
        buckets = self.state.last_step.buckets if self._header else 0
        self.step_headers.append(buckets * self._header)

    def per_step(self) -> dict[str, list[int]]:
        """``payload_bytes`` (``len(payload)`` summed over buckets, headers included) and
        ``header_bytes`` of every step so far, this rank."""
        return {"payload_bytes": list(self.step_payload),
                "header_bytes": list(self.step_headers)}

    def _count(self) -> None:
        if self.kind == "compute-only":
            return
        if self.kind in ("ddp", "torch-fp16", "torch-powersgd"):
            if self.kind == "torch-powersgd":
                after = self.state.total_numel_after_compression
                n = 4 * (after - self._ps_seen) if after > self._ps_seen else 4 * self.numel
                self._ps_seen = after
            else:
                n = (4 if self.kind == "ddp" else 2) * self.numel
            self.payload += n
            self.wire += n
            ring = 2 * (self.world - 1) * n // self.world  # ring all-reduce, each way
            self.sent += ring
            self.received += ring
        else:
            self.payload = self.state.total_payload_bytes
            self.wire = self.state.total_wire_bytes
            self.sent = self.state.total_sent_bytes
            self.received = self.state.total_received_bytes

    def short(self) -> str:
        """``name [kwargs] + feedback``, for plot titles."""
        if self.state is None or not hasattr(self.state, "compressor"):
            return self.kind
        c, fb = self.state.compressor, self.state.feedback
        kw = ", ".join(f"{k}={v}" for k, v in c.config().items() if v not in (None, False))
        return f"{c.name}({kw[:40]}) + {fb.name} feedback"

    def describe(self) -> str:
        return repr(self.state) if self.state is not None else self.kind
