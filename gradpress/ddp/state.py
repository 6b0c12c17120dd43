"""The DDP hook's state: every mutable thing :func:`gradpress.ddp.compression_hook` uses, in one
object (shaped like PyTorch's ``PowerSGDState``), with per-step byte counts and checkpoints.
"""

import collections
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from gradpress.collectives.two_phase import ShardBuffers, owner_key
from gradpress.compressors import Compressor, get
from gradpress.compressors.fused import Workspace
from gradpress.feedback import Feedback, NoFeedback

STATE_VERSION = 2
#: Collectives a :class:`CompressionState` can use.
COLLECTIVES = ("auto", "allgather", "two_phase")
#: ``collective="auto"`` uses two_phase from this many ranks up.
TWO_PHASE_FROM = 3


_MASK = (1 << 64) - 1


def payload_bound(compressor: Compressor, numel: int) -> int | None:
    """Worst-case ``len(payload.to_bytes())`` for a bucket of ``numel`` elements, or ``None``
    when none is known (the hook then gathers lengths first): the compressor's own
    :meth:`~gradpress.compressors.Compressor.max_payload_bytes`. ``tests/test_dist.py``
    checks every registered compressor against it."""
    return compressor.max_payload_bytes(numel)


def _mix_seed(*parts: int) -> int:
    """splitmix64 over ``parts``: a 64-bit seed that differs per (seed, step, bucket, rank)."""
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z ^ (int(p) & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        z = (z ^ (z >> 31)) * 0x94D049BB133111EB & _MASK
    return z ^ (z >> 29)


class BucketBuffers:
    """Memory one bucket index reuses every step (allocated at its first step, again only
    if the bucket's size changes): the all-gather frame this rank fills (``4 + capacity``
    bytes), the ``(world, 4 + capacity)`` frames every rank's arrive in, and the fused
    encoder's scratch (:class:`~gradpress.compressors.fused.Workspace`)."""

    def __init__(self, world: int, capacity: int) -> None:
        self.frame = torch.zeros(4 + capacity, dtype=torch.uint8)
        self.frame_np = self.frame.numpy()
        self.frames = torch.zeros(world, 4 + capacity, dtype=torch.uint8)
        self.ws = Workspace()

    def data_ptrs(self) -> dict[str, int]:
        """Addresses of every buffer (tests check they stay put across steps)."""
        return {"frame": self.frame.data_ptr(), "frames": self.frames.data_ptr(),
                **self.ws.data_ptrs()}


@dataclass
class StepBytes:
    """Bytes of one step on this rank (sums over buckets)."""

    step: int
    payload_bytes: int = 0  #: ``len(payload.to_bytes())`` of this rank's payloads
    #: two_phase: ``len`` of the payloads this rank re-encoded as a shard owner
    owner_payload_bytes: int = 0
    wire_bytes: int = 0  #: what this rank put into the collectives (frames, padding)
    #: bytes of frames this rank put into the step's collectives for other ranks (an
    #: all-gather frame counts once, an all-to-all frame once per destination; a ring
    #: all-reduce counts its reduce-scatter + all-gather traffic, ``2 (P-1)/P`` of the data)
    sent_bytes: int = 0
    #: bytes of other ranks' frames this rank took out of the step's collectives
    received_bytes: int = 0
    gathered_payload_bytes: int = 0  #: every rank's payload lengths, summed (received view)
    buckets: int = 0
    skipped: int = 0  #: buckets where some rank skipped a non-finite gradient
    payload_lengths: dict[int, int] = field(default_factory=dict)  #: bucket -> own length
    #: feedback key -> its state before this step (restored on every rank if it is skipped)
    undo: dict[str, Any] = field(default_factory=dict, repr=False)


class CompressionState:
    r"""Everything :func:`compression_hook` needs and keeps, for one DDP model.

    Args:
        process_group: the group to gather over (``None``: the default group).
        compressor: a :class:`~gradpress.compressors.Compressor` or a registry name
            (``"ecq"``); ``compressor_kwargs`` go to :func:`gradpress.get` with a name.
        feedback: a :class:`~gradpress.feedback.Feedback` (default ``NoFeedback()``);
            state is per rank, keyed by bucket index.
        seed: base seed of the compressors' randomness (mixed with step, bucket, rank).
        bounded: ``True``/``"auto"``: one fixed-size collective per bucket when the
            compressor has a :func:`payload_bound`; ``False``: always gather lengths first
            (no padding on the wire, one extra small synchronous round trip per bucket).
        allreduce_fast_path: all-reduce fp16/bf16 without feedback like PyTorch's
            ``fp16_compress_hook`` instead of all-gathering payloads.
        on_nonfinite: ``"raise"``: a NaN/Inf gradient on any rank raises
            :class:`~gradpress.errors.NonFiniteGradientError` on *every* rank at that
            step (no rank hangs); ``"skip"``: every rank skips the whole step: each rank
            puts its feedback state back as it was before the step, the gradients become
            zeros, and ``last_step.skipped > 0`` on every rank. The training loop must then
            not call ``optimizer.step()`` (momentum and weight decay would still move the
            parameters)::

                loss.backward()
                if state.last_step.skipped:   # same value on every rank
                    optimizer.zero_grad()
                    continue                  # parameters and optimizer state untouched
                optimizer.step()
        crc: append a CRC32 to every payload (4 bytes more each); a frame corrupted in
            transit raises :class:`~gradpress.errors.PeerError` on every rank naming the
            rank that sent it ("the payload from rank r"), instead of training on garbage.
        collective: ``"allgather"``: every rank gathers every rank's whole payload ((P-1)
            payloads in and P decodes per bucket); ``"two_phase"``: the two-phase
            compressed all-reduce of :mod:`gradpress.collectives.two_phase` (each rank
            sends ~C and receives ~2C(P-1)/P bytes per bucket whatever P is, O(d) decode);
            ``"auto"``: ``two_phase`` from :data:`TWO_PHASE_FROM` ranks up, else
            ``allgather`` (with 2 ranks both move the same bytes and two_phase adds a second
            quantization and a second round trip).
        server_feedback: the shard owners' feedback for ``two_phase`` (state: ``d/P``
            elements per rank and bucket); default: a fresh feedback of the same kind and
            configuration as ``feedback`` (ECQ-SGD on both sides, as DeepSpeed keeps a
            worker and a server error).

    Fields (read them after ``loss.backward()``):
        iter: steps completed (incremented at the last bucket of a step).
        last_step: :class:`StepBytes` of the latest step; ``history`` has one per step
            (bounded by ``history_len``).
        total_payload_bytes, total_wire_bytes, total_sent_bytes, total_received_bytes:
            sums over all steps so far.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None,
                 compressor: Compressor | str = "fp32", feedback: Feedback | None = None, *,
                 compressor_kwargs: dict[str, Any] | None = None, seed: int = 0,
                 bounded: bool | str = "auto", allreduce_fast_path: bool = True,
                 on_nonfinite: str = "raise", history_len: int = 100_000,
                 crc: bool = False, collective: str = "auto",
                 server_feedback: Feedback | None = None) -> None:
        if isinstance(compressor, str):
            compressor = get(compressor, **(compressor_kwargs or {}))
        elif compressor_kwargs:
            raise ValueError("compressor_kwargs only go with a compressor name")
        if not isinstance(compressor, Compressor):
            raise TypeError(f"compressor must be a gradpress Compressor or a name, got "
                            f"{type(compressor).__name__}")
        feedback = NoFeedback() if feedback is None else feedback
        if not isinstance(feedback, Feedback):
            raise TypeError(f"feedback must be a gradpress Feedback, got "
                            f"{type(feedback).__name__}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if bounded not in (True, False, "auto"):
            raise ValueError(f"bounded must be True, False or 'auto', got {bounded!r}")
        if collective not in COLLECTIVES:
            raise ValueError(f"collective must be one of {COLLECTIVES}, got {collective!r}")
        if server_feedback is None:
            server_feedback = type(feedback)(**feedback.config())
        if not isinstance(server_feedback, Feedback) or server_feedback is feedback:
            raise TypeError("server_feedback must be a gradpress Feedback other than feedback")
        self.process_group = process_group
        self.compressor = compressor
        self.feedback = feedback
        self.seed = int(seed)
        self.bounded = bounded
        self.allreduce_fast_path = bool(allreduce_fast_path)
        self.on_nonfinite = on_nonfinite
        self.history_len = int(history_len)
        self.crc = bool(crc)
        self.collective = collective
        self.server_feedback = server_feedback
        self.iter = 0
        self.bucket_numel: dict[int, int] = {}
        self.last_step = StepBytes(0)
        self.history: list[StepBytes] = []
        self.total_payload_bytes = 0
        self.total_wire_bytes = 0
        self.total_sent_bytes = 0
        self.total_received_bytes = 0
        self._current: StepBytes | None = None
        #: two_phase buckets whose all-gather is not issued yet (see ``ddp.hook``)
        self._pending: collections.deque = collections.deque()
        #: bucket index -> its reusable frames and scratch (:class:`BucketBuffers`)
        self._buffers: dict[int, BucketBuffers] = {}
        self._shard_buffers: dict[int, ShardBuffers] = {}  #: the same for two_phase

    # -- helpers the hook uses -------------------------------------------------------------
    @property
    def group(self) -> dist.ProcessGroup:
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def collective_for(self, world: int) -> str:
        """The collective used with ``world`` ranks (``"auto"`` resolved)."""
        if self.collective != "auto":
            return self.collective
        return "two_phase" if world >= TWO_PHASE_FROM else "allgather"

    def uses_allreduce(self) -> bool:
        """Whether buckets are all-reduced in the wire dtype (fp16/bf16, no feedback)."""
        return (self.allreduce_fast_path and self.compressor.name in ("fp16", "bf16")
                and not getattr(self.compressor, "scaled", False)  # a plain cast only
                and isinstance(self.feedback, NoFeedback) and self.on_nonfinite == "raise")

    def _step(self) -> StepBytes:
        if self._current is None:
            self.last_step.undo = {}  # its buckets have all finished: drop the references
            self._current = StepBytes(self.iter)
        return self._current

    def _end_step(self) -> None:
        cur = self._step()
        self.last_step = cur
        self.history.append(cur)
        del self.history[:-self.history_len]
        self.total_payload_bytes += cur.payload_bytes
        self.total_wire_bytes += cur.wire_bytes
        self.total_sent_bytes += cur.sent_bytes
        self.total_received_bytes += cur.received_bytes
        self._current = None
        self.iter += 1

    def _buffers_for(self, index: int, world: int, capacity: int) -> BucketBuffers:
        """Bucket ``index``'s :class:`BucketBuffers`, reallocated only when its size changed."""
        bufs = self._buffers.get(index)
        if bufs is None or bufs.frames.shape != (world, 4 + capacity):
            bufs = self._buffers[index] = BucketBuffers(world, capacity)
        return bufs

    def _shard_buffers_for(self, index: int, world: int, capacity: int, numel: int
                           ) -> ShardBuffers:
        """Bucket ``index``'s two-phase :class:`ShardBuffers`, reallocated only when its
        size changed."""
        bufs = self._shard_buffers.get(index)
        if bufs is None or bufs.key != (world, capacity, numel):
            bufs = self._shard_buffers[index] = ShardBuffers(world, capacity, numel)
        return bufs

    def _key_for(self, index: int, numel: int) -> str:
        """Feedback key of bucket ``index``; forgets its residual if the bucket was rebuilt."""
        key = str(index)
        if self.bucket_numel.get(index, numel) != numel and key in self.feedback.keys():
            if getattr(self, "_restored", False):
                import warnings

                warnings.warn(f"DDP bucket {index} has {numel} elements, the checkpoint's had "
                              f"{self.bucket_numel[index]}: its feedback residual is dropped, "
                              "so this resume is not exact. DDP builds one bucket for the first "
                              "step and rebuilds after it; construct it with "
                              "find_unused_parameters=True to keep one layout", stacklevel=2)
            sd = self.feedback.state_dict()
            del sd["state"][key]
            self.feedback.load_state_dict(sd)
        if self.bucket_numel.get(index, numel) != numel:  # the owners' shards changed too
            for k in (key, owner_key(key)):
                self.server_feedback._state.pop(k, None)
        self.bucket_numel[index] = numel
        return key

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's state (feedback residuals are per rank: save one file per rank)."""
        return {
            "version": STATE_VERSION,
            "compressor": {"name": self.compressor.name, "config": self.compressor.config()},
            "feedback": self.feedback.state_dict(),
            "server_feedback": self.server_feedback.state_dict(),
            "collective": self.collective,
            "seed": self.seed,
            "iter": self.iter,
            "bucket_numel": dict(self.bucket_numel),
            "total_payload_bytes": self.total_payload_bytes,
            "total_wire_bytes": self.total_wire_bytes,
            "total_sent_bytes": self.total_sent_bytes,
            "total_received_bytes": self.total_received_bytes,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; checks the compressor matches before changing anything."""
        if not isinstance(sd, dict) or sd.get("version") != STATE_VERSION:
            raise ValueError(f"not a CompressionState state_dict of version {STATE_VERSION}")
        want = {"name": self.compressor.name, "config": self.compressor.config()}
        if sd.get("compressor") != want:
            raise ValueError(f"state_dict was saved with compressor {sd.get('compressor')}, "
                             f"this state uses {want}")
        if sd.get("collective") != self.collective:
            raise ValueError(f"state_dict was saved with collective {sd.get('collective')!r}, "
                             f"this state uses {self.collective!r}")
        server = type(self.server_feedback)(**self.server_feedback.config())
        server.load_state_dict(sd["server_feedback"])  # validated before anything changes
        self.feedback.load_state_dict(sd["feedback"])
        self.server_feedback = server
        self.seed = int(sd["seed"])
        self.iter = int(sd["iter"])
        self.bucket_numel = {int(k): int(v) for k, v in sd["bucket_numel"].items()}
        self.total_payload_bytes = int(sd["total_payload_bytes"])
        self.total_wire_bytes = int(sd["total_wire_bytes"])
        self.total_sent_bytes = int(sd["total_sent_bytes"])
        self.total_received_bytes = int(sd["total_received_bytes"])
        self._current = None
        self._pending.clear()
        self._restored = True  # a later bucket-layout change warns (see _key_for)

    def __repr__(self) -> str:
        return (f"CompressionState(compressor={self.compressor!r}, feedback={self.feedback!r},"
                f" iter={self.iter})")
