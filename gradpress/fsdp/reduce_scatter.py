"""A compressed reduce-scatter for PyTorch FSDP2: FSDP's ``ReduceScatter`` comm over
gradpress payloads, any compressor, optional worker feedback.

FSDP2 (``torch.distributed.fsdp.fully_shard``) reduces each FSDP unit's gradients with one
reduce-scatter: ``input_tensor`` is the unit's unsharded gradient, flat, ``P`` contiguous
chunks of ``output_tensor.numel()`` elements (chunk ``j`` is rank ``j``'s shard, already
padded by FSDP), and rank ``p`` must end with the reduction of every rank's chunk ``p``
in ``output_tensor``. :meth:`FSDPModule.set_custom_reduce_scatter` accepts any object
with this interface (``torch/distributed/fsdp/_fully_shard/_fsdp_api.py``):
``allocate(size, *, dtype, device)`` and ``__call__(output_tensor, input_tensor, group,
op, async_op=False)``. :class:`CompressedReduceScatter` implements it, per call on rank
``p`` of ``P``, with ``n = output_tensor.numel()``:

1. ``v = feedback.to_send(key, g)`` for the flat unsharded gradient ``g`` (``P n``
   elements; ECQ-SGD: ``g + alpha h``), or ``v = g`` without feedback;
2. encode each chunk ``v[j n : (j+1) n]`` into its own payload (seed mixed from the base
   seed, the call count, the key, the rank and the chunk), then
   ``feedback.commit(key, g, concat_j decode(payload_j))``;
3. one all-to-all (:class:`~gradpress.collectives.alltoall.AllToAll`): rank ``p`` gets
   every rank's payload of chunk ``p``, frames padded to the compressor's bound of ``n``
   elements so it is one collective;
4. decode them, sum in rank order in float32 and reduce as ``op`` says: ``SUM``: the sum;
   ``AVG``: the sum divided by ``P``; ``PREMUL_SUM(f)``: ``f`` times the sum. FSDP's
   pre- and post-divide factors (fp16 reductions, ``set_force_sum_reduction_for_comms``)
   are applied by FSDP itself around the call, exactly as around its default
   reduce-scatter, so nothing is divided twice.

Bits: each rank sends ``P - 1`` frames of ``4 + max_payload_bytes(n)`` bytes (``+ 4`` with
``crc``) and receives as many; its own chunk stays local. FSDP's default reduce-scatter
moves ``(P - 1) n`` elements of the reduce dtype each way (a ring). Counts are per call
(:attr:`CompressedReduceScatter.last`) and in total.

Memory: worker feedback keeps a float32 residual of the **full unsharded** gradient of
the unit on every rank (``P n`` elements per FSDP unit per rank; summed over units: a
full fp32 copy of the model's gradients on every rank), which undoes FSDP's sharding of
gradient memory. Where memory is tight use an unbiased code without feedback (QSGD,
natural dithering, TernGrad): nothing is kept between steps.

Failure: a NaN/Inf gradient or a failed encode travels as a status in the frame, so every
rank raises at the same call. A payload of the wrong shape or with bad bytes is found
only by the rank that receives it, which raises :class:`~gradpress.errors.PeerError`
naming the sender; its peers then fail at their next collective, within the process
group's timeout.

What FSDP2's interface (torch 2.13) leaves out, and what follows from it:

* the call names neither the FSDP unit nor the step: one instance serves one unit (its
  ``key``), and payload seeds count calls (saved in :meth:`~CompressedReduceScatter.state_dict`);
* FSDP calls without ``async_op`` and ignores the return value, so the all-to-all is waited
  for inside the call: on the host, the next unit's backward is issued only after it;
* ``set_custom_reduce_scatter`` refuses modules with several parameter groups
  (``shard_placement_fn`` with per-parameter meshes), and a custom comm excludes
  ``set_symm_mem_for_comm`` and ``set_allocate_memory_from_process_group_for_comm``;
* HSDP's all-reduce across replicas is FSDP's own (``dist.all_reduce``), uncompressed; with
  one rank FSDP copies instead of calling the comm.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from gradpress.collectives.allgather import STATUS_ERROR, STATUS_NONFINITE, Entry, _group
from gradpress.collectives.alltoall import AllToAll
from gradpress.collectives.average import check_statuses, decode_entry
from gradpress.compressors import Compressor, get
from gradpress.ddp.state import _mix_seed
from gradpress.errors import NonFiniteGradientError
from gradpress.feedback import Feedback

STATE_VERSION = 1
#: What FSDP passes as ``op`` (``_fsdp_api._ReduceOp``).
ReduceOpArg = dist.ReduceOp | dist.ReduceOp.RedOpType


@dataclasses.dataclass
class CallBytes:
    """Bytes of one reduce-scatter call on this rank."""

    call: int  #: index of the call (0, 1, ...) on this comm
    payload_bytes: int = 0  #: ``len(payload.to_bytes())`` of the chunks this rank sent others
    sent_bytes: int = 0  #: frames this rank put into the all-to-all for other ranks
    received_bytes: int = 0  #: frames of other ranks this rank took out of it


def _sum_factor(op: ReduceOpArg, world: int) -> float | torch.Tensor | None:
    """The factor the rank-order sum is multiplied by for ``op`` (``None``: 1)."""
    kind = op if isinstance(op, dist.ReduceOp.RedOpType) else op.op
    if kind == dist.ReduceOp.SUM:
        return None
    if kind == dist.ReduceOp.AVG:
        return 1.0 / world
    if kind == dist.ReduceOp.PREMUL_SUM:
        return op.factor
    raise ValueError(f"a compressed reduce-scatter reduces by SUM, AVG or PREMUL_SUM (what "
                     f"FSDP passes), got {op}")


class _Pending(dist.Work):
    """``async_op=True``: the all-to-all is in flight; :meth:`wait` decodes and reduces."""

    def __init__(self, finish) -> None:
        super().__init__()
        self._finish, self._done = finish, False

    def wait(self, timeout: Any = None) -> bool:
        if not self._done:
            self._done = True
            self._finish()
        return True

    def is_completed(self) -> bool:
        return self._done


class CompressedReduceScatter(ReduceScatter):
    """FSDP2's ``ReduceScatter`` comm with gradpress payloads (numbered steps in the module
    docstring). One instance serves one FSDP unit: set it with
    ``module.set_custom_reduce_scatter(comm)``, or use :func:`gradpress.fsdp.register`.

    Args:
        compressor: a :class:`~gradpress.compressors.Compressor` or a registry name.
        feedback: worker feedback (state: ``P n`` float32 elements for the unit; see the
            module docstring on memory), or ``None`` to compress the gradient as it is.
        seed: base seed of the payloads' randomness (mixed with the call count, ``key``,
            the rank and the chunk).
        crc: append a CRC32 to every payload (4 bytes each), so bytes corrupted in transit
            raise :class:`~gradpress.errors.PeerError` naming the sender.
        key: the feedback key and a seed part; distinct per FSDP unit.

    Fields: ``calls`` (calls so far), ``last`` (:class:`CallBytes` of the latest call),
    ``total_payload_bytes``, ``total_sent_bytes``, ``total_received_bytes``.
    """

    def __init__(self, compressor: Compressor | str, feedback: Feedback | None = None, *,
                 seed: int = 0, crc: bool = False, key: str = "0") -> None:
        if isinstance(compressor, str):
            compressor = get(compressor)
        if not isinstance(compressor, Compressor):
            raise TypeError(f"compressor must be a gradpress Compressor or a name, got "
                            f"{type(compressor).__name__}")
        if feedback is not None and not isinstance(feedback, Feedback):
            raise TypeError(f"feedback must be a gradpress Feedback or None, got "
                            f"{type(feedback).__name__}")
        self.compressor, self.feedback = compressor, feedback
        self.seed, self.crc, self.key = int(seed), bool(crc), str(key)
        self.calls = 0
        self.last = CallBytes(0)
        self.total_payload_bytes = self.total_sent_bytes = self.total_received_bytes = 0

    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        """A plain ``torch.empty``: the payloads travel in buffers of their own."""
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, op: ReduceOpArg, async_op: bool = False
                 ) -> dist.Work | None:
        """Reduce-scatter ``input_tensor`` into ``output_tensor`` (steps 1-4); returns a
        ``Work`` whose ``wait()`` finishes the reduction when ``async_op``, else ``None``."""
        world, rank = dist.get_world_size(_group(group)), dist.get_rank(_group(group))
        n = output_tensor.numel()
        if input_tensor.numel() != world * n:
            raise ValueError(f"reduce-scatter input has {input_tensor.numel()} elements, "
                             f"expected world size {world} x output {n}")
        factor = _sum_factor(op, world)
        call, where = self.calls, f"FSDP unit {self.key!r}, reduce-scatter call {self.calls}"
        parts, own, local_error = self._compress(input_tensor.detach().reshape(-1), world,
                                                 rank, n, call)
        bound = self.compressor.max_payload_bytes(n) if n else 0
        capacity = None if bound is None else bound + (4 if self.crc else 0)
        exchange = AllToAll(parts, group, capacity=capacity)
        self.calls += 1
        self.last = CallBytes(call, sum(len(p) for j, p in enumerate(parts)
                                        if j != rank and isinstance(p, bytes)),
                              exchange.traffic.sent, exchange.traffic.received)
        self.total_payload_bytes += self.last.payload_bytes
        self.total_sent_bytes += self.last.sent_bytes
        self.total_received_bytes += self.last.received_bytes

        def finish() -> None:
            entries = exchange.wait()
            if local_error is not None:
                raise local_error
            self._reduce(output_tensor, entries, own, rank, factor, where)

        if async_op:
            return _Pending(finish)
        finish()
        return None

    def _compress(self, flat: torch.Tensor, world: int, rank: int, n: int, call: int
                  ) -> tuple[list[bytes | int], torch.Tensor | None, Exception | None]:
        """Steps 1-2: one payload per chunk (or a status for every rank), this rank's own
        chunk decoded, and the local error to raise after the exchange."""
        try:
            v = flat if self.feedback is None else self.feedback.to_send(self.key, flat)
            parts: list[bytes | int] = []
            decoded = []
            base = zlib.crc32(self.key.encode())
            for j, chunk in enumerate(v.view(world, n) if n else [v[:0]] * world):
                if n == 0:
                    parts.append(b"")
                    decoded.append(chunk.float())
                    continue
                payload, dec = self.compressor.encode_decoded(
                    chunk, seed=_mix_seed(self.seed, call, base, rank, j))
                if self.crc:
                    payload = dataclasses.replace(payload, crc=True)
                parts.append(payload.to_bytes())
                decoded.append(dec.reshape(-1))
            if self.feedback is not None:
                self.feedback._commit_checked(self.key, flat, torch.cat(decoded))
            return parts, decoded[rank], None
        except NonFiniteGradientError:
            return [STATUS_NONFINITE] * world, None, None
        except Exception as e:  # noqa: BLE001 - still take part, so peers fail too, not hang
            return [STATUS_ERROR] * world, None, e

    def _reduce(self, out: torch.Tensor, entries: list[Entry], own: torch.Tensor | None,
                rank: int, factor: float | torch.Tensor | None, where: str) -> None:
        """Step 4: decode every rank's chunk, sum in rank order, scale, write ``out``;
        ``out`` is untouched if any payload is unusable."""
        check_statuses(self.compressor, entries, where)
        n = out.numel()
        acc: torch.Tensor | None = None
        for r, entry in enumerate(entries):
            dec = own if r == rank else decode_entry(self.compressor, entry, n, r, where,
                                                     out.device)
            dec = dec.reshape(-1).float()
            acc = dec.clone() if acc is None else acc.add_(dec)
        if factor is not None:
            acc.mul_(factor)
        out.copy_(acc.view(out.shape))

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's state: the feedback residual and the call count (payload seeds
        depend on it). Save one per rank and FSDP unit."""
        return {
            "version": STATE_VERSION,
            "compressor": {"name": self.compressor.name, "config": self.compressor.config()},
            "feedback": None if self.feedback is None else self.feedback.state_dict(),
            "key": self.key, "seed": self.seed, "calls": self.calls,
            "total_payload_bytes": self.total_payload_bytes,
            "total_sent_bytes": self.total_sent_bytes,
            "total_received_bytes": self.total_received_bytes,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; checks compressor, feedback and key first."""
        if not isinstance(sd, dict) or sd.get("version") != STATE_VERSION:
            raise ValueError(f"not a CompressedReduceScatter state_dict of version "
                             f"{STATE_VERSION}")
        want = {"name": self.compressor.name, "config": self.compressor.config()}
        if sd.get("compressor") != want:
            raise ValueError(f"state_dict was saved with compressor {sd.get('compressor')}, "
                             f"this comm uses {want}")
        if sd.get("key") != self.key:
            raise ValueError(f"state_dict is for FSDP unit {sd.get('key')!r}, this comm "
                             f"serves {self.key!r}")
        if (sd.get("feedback") is None) != (self.feedback is None):
            raise ValueError("state_dict and this comm disagree on whether feedback is used")
        if self.feedback is not None:
            self.feedback.load_state_dict(sd["feedback"])
        self.seed, self.calls = int(sd["seed"]), int(sd["calls"])
        self.total_payload_bytes = int(sd["total_payload_bytes"])
        self.total_sent_bytes = int(sd["total_sent_bytes"])
        self.total_received_bytes = int(sd["total_received_bytes"])

    def __repr__(self) -> str:
        return (f"CompressedReduceScatter(compressor={self.compressor!r}, "
                f"feedback={self.feedback!r}, key={self.key!r}, calls={self.calls})")
