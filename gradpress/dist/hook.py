"""A DDP communication hook that sends gradpress payloads: any compressor, any feedback.

Shaped like PyTorch's ``powerSGD_hook``: all mutable things live in one
:class:`CompressionState`, the hook is a plain function ``(state, bucket) -> Future``::

    state = CompressionState(None, compressor=gradpress.get("ecq", bits=2),
                             feedback=gradpress.ECQFeedback(alpha=0.5, beta=0.9))
    ddp_model.register_comm_hook(state, compression_hook)

Algorithm, per gradient bucket ``g`` (flat, ``d`` elements) on rank ``p`` of ``P``:

1. ``v = feedback.to_send(k, g)`` with ``k`` the bucket index (ECQ-SGD: ``g + alpha h``);
2. ``payload = compressor.encode(v, seed)``, seed mixed from (state seed, step, bucket,
   rank), so ranks and steps draw independent randomness; ``sent = decode(payload)``;
   ``feedback.commit(k, g, sent)`` (ECQ-SGD: ``h <- beta h + g - sent``);
3. all-gather every rank's payload bytes in **one collective** of fixed size: each rank
   sends ``[len | payload | padding]`` padded to :func:`payload_bound`, the compressor's
   worst-case size for ``d`` elements, which every rank computes alone. Compressors with
   no known bound fall back to two collectives issued in order from the hook (lengths,
   waited for, then bytes). Why not "lengths, then bytes from the callback": gloo needs
   every rank to issue collectives in the same order, and a collective launched from a
   future's callback interleaves with the next bucket's differently on each rank
   ("Received data size doesn't match expected size");
4. decode every rank's payload, sum them in rank order and divide by ``P`` (the same
   float operations on every rank, so every rank ends the step with bit-identical
   parameters), then ``feedback.apply(k, mean)`` (identity, or EF21's server estimate).

Fast path: ``fp16``/``bf16`` without feedback are codes that add linearly, so they
all-reduce ``g/P`` in the wire dtype exactly like PyTorch's ``fp16_compress_hook``.

Bits: each rank's payload costs ``len(payload.to_bytes())`` (the compressor's formula in
its module); the frame adds 4 bytes of length and the padding up to the bound. Both are
counted (``payload_bytes`` and ``wire_bytes``), per step and in total; counts are what
*this rank* contributes to the collective, not the collective algorithm's internal
traffic (a ring all-gather forwards each frame ``P - 1`` times).

Buckets: DDP rebuilds its buckets once after the first iteration, so bucket ``k``'s size
may change then; feedback state is keyed by bucket index and a bucket whose size changed
starts again from zero error (the residual of step 0 is dropped; afterwards buckets are
stable).
"""


import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from gradpress.compressors import Compressor, get
from gradpress.dist.allgather import (
    STATUS_ERROR,
    STATUS_NONFINITE,
    STATUS_OVERFLOW,
    STATUS_SKIP,
    Entry,
    allgather_bytes_async,
)
from gradpress.errors import NonFiniteGradientError, PayloadError, PeerError
from gradpress.feedback import Feedback, NoFeedback
from gradpress.payload import Payload, header_size

STATE_VERSION = 1
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


@dataclass
class StepBytes:
    """Bytes of one step on this rank (sums over buckets)."""

    step: int
    payload_bytes: int = 0  #: ``len(payload.to_bytes())`` of this rank's payloads
    wire_bytes: int = 0  #: what this rank put into the collectives (frames, padding)
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

    Fields (read them after ``loss.backward()``):
        iter: steps completed (incremented at the last bucket of a step).
        last_step: :class:`StepBytes` of the latest step; ``history`` has one per step
            (bounded by ``history_len``).
        total_payload_bytes, total_wire_bytes: sums over all steps so far.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None,
                 compressor: Compressor | str = "fp32", feedback: Feedback | None = None, *,
                 compressor_kwargs: dict[str, Any] | None = None, seed: int = 0,
                 bounded: bool | str = "auto", allreduce_fast_path: bool = True,
                 on_nonfinite: str = "raise", history_len: int = 100_000,
                 crc: bool = False) -> None:
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
        self.process_group = process_group
        self.compressor = compressor
        self.feedback = feedback
        self.seed = int(seed)
        self.bounded = bounded
        self.allreduce_fast_path = bool(allreduce_fast_path)
        self.on_nonfinite = on_nonfinite
        self.history_len = int(history_len)
        self.crc = bool(crc)
        self.iter = 0
        self.bucket_numel: dict[int, int] = {}
        self.last_step = StepBytes(0)
        self.history: list[StepBytes] = []
        self.total_payload_bytes = 0
        self.total_wire_bytes = 0
        self._current: StepBytes | None = None

    # -- helpers the hook uses -------------------------------------------------------------
    @property
    def group(self) -> dist.ProcessGroup:
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def uses_allreduce(self) -> bool:
        """Whether buckets are all-reduced in the wire dtype (fp16/bf16, no feedback)."""
        return (self.allreduce_fast_path and self.compressor.name in ("fp16", "bf16")
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
        self._current = None
        self.iter += 1

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
        self.bucket_numel[index] = numel
        return key

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's state (feedback residuals are per rank: save one file per rank)."""
        return {
            "version": STATE_VERSION,
            "compressor": {"name": self.compressor.name, "config": self.compressor.config()},
            "feedback": self.feedback.state_dict(),
            "seed": self.seed,
            "iter": self.iter,
            "bucket_numel": dict(self.bucket_numel),
            "total_payload_bytes": self.total_payload_bytes,
            "total_wire_bytes": self.total_wire_bytes,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; checks the compressor matches before changing anything."""
        if not isinstance(sd, dict) or sd.get("version") != STATE_VERSION:
            raise ValueError(f"not a CompressionState state_dict of version {STATE_VERSION}")
        want = {"name": self.compressor.name, "config": self.compressor.config()}
        if sd.get("compressor") != want:
            raise ValueError(f"state_dict was saved with compressor {sd.get('compressor')}, "
                             f"this state uses {want}")
        self.feedback.load_state_dict(sd["feedback"])
        self.seed = int(sd["seed"])
        self.iter = int(sd["iter"])
        self.bucket_numel = {int(k): int(v) for k, v in sd["bucket_numel"].items()}
        self.total_payload_bytes = int(sd["total_payload_bytes"])
        self.total_wire_bytes = int(sd["total_wire_bytes"])
        self._current = None
        self._restored = True  # a later bucket-layout change warns (see _key_for)

    def __repr__(self) -> str:
        return (f"CompressionState(compressor={self.compressor!r}, feedback={self.feedback!r},"
                f" iter={self.iter})")


def compression_hook(state: CompressionState, bucket: dist.GradBucket
                     ) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: compress this rank's bucket, gather every rank's payload, decode and
    average in rank order (see the module docstring for the numbered steps)."""
    buffer = bucket.buffer()
    index, is_last = bucket.index(), bucket.is_last()
    group = state.group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    step = state._step()
    if state.uses_allreduce():
        fut = _allreduce(state, buffer, world, step)
    else:
        fut = _gather(state, buffer, index, world, rank, step)
    if is_last:
        state._end_step()
    return fut


def _allreduce(state: CompressionState, buffer: torch.Tensor, world: int, step: StepBytes
               ) -> torch.futures.Future[torch.Tensor]:
    wire = torch.float16 if state.compressor.name == "fp16" else torch.bfloat16
    low = buffer.to(wire).div_(world)  # NaN/Inf or fp16 overflow travel and are caught below
    nbytes = low.numel() * low.element_size()
    step.payload_bytes += nbytes
    step.wire_bytes += nbytes
    step.gathered_payload_bytes += nbytes * world
    step.buckets += 1
    it = step.step

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        try:
            value = fut.value()[0]
        except Exception as e:  # noqa: BLE001
            raise PeerError(f"gradpress all-reduce failed at step {it}: a peer crashed, "
                            f"stalled or left ({type(e).__name__}: {e})") from e
        if not bool(torch.isfinite(value).all()):
            raise NonFiniteGradientError(
                f"step {it}: the {wire} all-reduce produced NaN/Inf (a rank's gradient was "
                "non-finite or exceeded the fp16 range); use bf16 or fix the loss")
        buffer.copy_(value)
        return buffer

    return dist.all_reduce(low, group=state.group, async_op=True).get_future().then(finish)


def _gather(state: CompressionState, buffer: torch.Tensor, index: int, world: int, rank: int,
            step: StepBytes) -> torch.futures.Future[torch.Tensor]:
    comp, fb = state.compressor, state.feedback
    key = state._key_for(index, buffer.numel())
    seed = _mix_seed(state.seed, step.step, index, rank)
    mine: bytes | int
    sent: torch.Tensor | None = None
    local_error: Exception | None = None
    if state.on_nonfinite == "skip":  # pre-step state (commit/apply never mutate it in place)
        step.undo.setdefault(key, fb._state.get(key))
    try:
        mine, sent = _compress_own(comp, fb, key, buffer.detach(), seed, state.crc)
    except NonFiniteGradientError:
        mine = STATUS_SKIP if state.on_nonfinite == "skip" else STATUS_NONFINITE
    except Exception as e:  # noqa: BLE001 - still take part, so peers fail too, not hang
        mine, local_error = STATUS_ERROR, e
    bound = payload_bound(comp, buffer.numel()) if state.bounded in (True, "auto") else None
    bound = bound + 4 if bound is not None and state.crc else bound  # the CRC32
    if state.bounded is True and bound is None:
        raise ValueError(f"compressor {comp.name!r} declares no payload bound; use "
                         "bounded='auto' or False")
    if isinstance(mine, bytes):
        step.payload_bytes += len(mine)
        step.payload_lengths[index] = len(mine)
    step.buckets += 1
    fut, wire = allgather_bytes_async(mine, state.group, capacity=bound)
    step.wire_bytes += wire()
    it = step.step

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        entries: list[Entry] = fut.value()
        if local_error is not None:
            raise local_error
        step.gathered_payload_bytes += sum(len(e) for e in entries if isinstance(e, bytes))
        if state.crc and isinstance(mine, bytes) and entries[rank] != mine:
            raise PeerError(f"step {it}, bucket {index}: the payload from rank {rank} (this "
                            "rank) came back corrupted from the all-gather")
        if any(e == STATUS_SKIP for e in entries):  # every rank skips the whole step
            step.skipped += 1
            _undo_step(fb, step)
            buffer.zero_()
            return buffer
        mean = _average(comp, entries, rank, sent, buffer, it, index)
        update = fb.apply(key, mean)
        if not _same_memory(update, buffer):  # _average may have written into the bucket
            buffer.copy_(update)
        if step.skipped:  # another bucket of this step was skipped after this one began
            _undo_step(fb, step)
        return buffer

    return fut.then(finish)


def _undo_step(fb: Feedback, step: StepBytes) -> None:
    """Put every bucket's feedback state of ``step`` back to its pre-step value."""
    for key, old in list(step.undo.items()):
        if old is None:
            fb._state.pop(key, None)
        else:
            fb._state[key] = old


def _compress_own(comp: Compressor, fb: Feedback, key: str, grad: torch.Tensor, seed: int,
                  crc: bool = False) -> tuple[bytes, torch.Tensor]:
    """Steps 1-2 on this rank: this rank's payload bytes and their decoded value ``sent``;
    feedback state is committed only after encoding succeeded. ``grad`` (the bucket) is not
    written before the collective finishes, so it needs no copy."""
    v = fb.to_send(key, grad)
    payload, sent = comp.encode_decoded(v, seed=seed)  # sent == decode(payload), bit for bit
    if crc:
        payload = dataclasses.replace(payload, crc=True)
    mine = payload.to_bytes()
    # grad passed to_send's check; a decoder never returns NaN/Inf: no third and fourth scan
    fb._commit_checked(key, grad, sent.reshape(grad.shape))
    return mine, sent


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same elements of the same storage (copy is a no-op)."""
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride() and a.device == b.device)


def _average(comp: Compressor, entries: list[Entry], rank: int, sent: torch.Tensor | None,
             buffer: torch.Tensor, it: int, index: int) -> torch.Tensor:
    """Mean of the decoded payloads in rank order (own payload: the ``sent`` already decoded
    from the same bytes); raises the same error on every rank for a bad peer."""
    failed = [r for r, e in enumerate(entries) if e == STATUS_ERROR]
    if failed:
        raise PeerError(f"step {it}, bucket {index}: rank(s) {failed} failed to compress their "
                        "gradient (their own logs say why); this rank stops with them")
    bad = {r: e for r, e in enumerate(entries) if e in (STATUS_NONFINITE, STATUS_OVERFLOW)}
    if any(e == STATUS_NONFINITE for e in bad.values()):
        ranks = sorted(r for r, e in bad.items() if e == STATUS_NONFINITE)
        raise NonFiniteGradientError(
            f"step {it}, bucket {index}: rank(s) {ranks} had NaN/Inf gradients; fix the loss "
            "or clip, or use CompressionState(on_nonfinite='skip')")
    if bad:
        raise PeerError(f"step {it}, bucket {index}: rank(s) {sorted(bad)} produced payloads "
                        f"larger than {comp.name}'s declared bound; report this as a bug")
    first: torch.Tensor | None = None  # the first decoded payload, until a second comes
    acc: torch.Tensor | None = None
    n = 0
    valid = sum(isinstance(e, bytes) for e in entries)
    # With exactly two payloads both are decoded before the first add, so the sum can go
    # straight into a float32 bucket (no longer needed: this rank's feedback has committed)
    # with nothing written if a decode fails; otherwise into a new accumulator.
    into = (buffer if valid == 2 and buffer.dtype == torch.float32 and buffer.is_contiguous()
            and buffer.dim() == 1 else None)
    for r, e in enumerate(entries):
        if isinstance(e, int):
            continue
        if r == rank and sent is not None:
            dec = sent
        else:
            try:
                p = Payload.from_bytes(e)
                if p.shape != (buffer.numel(),):
                    raise PayloadError(f"shape {p.shape}, bucket has {buffer.numel()}")
                dec = comp.decode(p, device=buffer.device)
            except PayloadError as err:
                raise PeerError(f"step {it}, bucket {index}: the payload from rank {r} is "
                                f"unusable ({err}); corrupted in transit, or do all ranks "
                                "use the same compressor?") from err
        dec = dec.reshape(-1).float()
        n += 1
        if n == 1:
            first = dec
        elif n == 2:  # d0 + d1, no clone of d0 first
            acc, first = torch.add(first, dec, out=into), None
        else:
            acc.add_(dec)
    if n == 0:  # every rank skipped this bucket
        return torch.zeros_like(buffer)
    acc = first.clone() if acc is None else acc
    return acc.div_(n).to(buffer.dtype)
