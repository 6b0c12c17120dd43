"""A DDP communication hook that sends gradpress payloads: any compressor, any feedback.

Shaped like PyTorch's ``powerSGD_hook``: all mutable things live in one
:class:`CompressionState`, the hook is a plain function ``(state, bucket) -> Future``::

    state = CompressionState(None, compressor=gradpress.get("ecq", bits=2, norm="linf",
                                                             bucket_size=512),
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

import torch
import torch.distributed as dist

from gradpress.collectives.allgather import (
    STATUS_ERROR,
    STATUS_NONFINITE,
    STATUS_SKIP,
    Entry,
    allgather_bytes_async,
)
from gradpress.collectives.average import mean_of_payloads
from gradpress.collectives.two_phase import TwoPhaseBucket
from gradpress.compressors import Compressor
from gradpress.ddp.state import CompressionState, StepBytes, _mix_seed, payload_bound
from gradpress.errors import NonFiniteGradientError, PeerError
from gradpress.feedback import Feedback


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
    elif state.collective_for(world) == "two_phase":
        fut = _two_phase(state, buffer, index, rank, step, is_last)
    else:
        fut = _gather(state, buffer, index, world, rank, step)
    if is_last:
        state._end_step()
    return fut


def _two_phase(state: CompressionState, buffer: torch.Tensor, index: int, rank: int,
               step: StepBytes, is_last: bool) -> torch.futures.Future[torch.Tensor]:
    """Start this bucket's all-to-all, then run the previous bucket's owner step and
    all-gather (all of them at the last bucket): collectives leave every rank in the same
    order, and each bucket's all-to-all overlaps the backward pass of the next."""
    key = state._key_for(index, buffer.numel())
    it = step.step
    if state.bounded is True and payload_bound(state.compressor, 1) is None:
        raise ValueError(f"compressor {state.compressor.name!r} declares no payload bound; "
                         "use bounded='auto' or False")
    bucket = TwoPhaseBucket(
        state.compressor, state.feedback, state.server_feedback, key, buffer,
        seed_of=lambda j, side: _mix_seed(state.seed, it, index, rank, j, side),
        group=state.group, bounded=state.bounded in (True, "auto"), crc=state.crc,
        on_nonfinite=state.on_nonfinite, where=f"step {it}, bucket {index}",
        undo=step.undo if state.on_nonfinite == "skip" else None)
    result: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    state._pending.append((bucket, result, buffer, key, step))
    while len(state._pending) > (0 if is_last else 1):
        _gather_shards(state, *state._pending.popleft())
    return result


def _gather_shards(state: CompressionState, bucket: TwoPhaseBucket,
                   result: torch.futures.Future, buffer: torch.Tensor, key: str,
                   step: StepBytes) -> None:
    """Steps 4-6 of one bucket; ``result`` completes with the bucket."""
    try:
        fut = bucket.gather()
    except Exception as e:
        state._pending.clear()
        result.set_exception(e)
        raise
    step.payload_bytes += bucket.payload_bytes
    step.owner_payload_bytes += bucket.owner_payload_bytes
    step.payload_lengths[int(key)] = bucket.payload_bytes
    step.wire_bytes += bucket.traffic.sent
    step.sent_bytes += bucket.traffic.sent
    step.received_bytes += bucket.traffic.received
    step.buckets += 1

    def finish(f: torch.futures.Future) -> None:
        try:
            reduced = f.value()
            if reduced is None:  # every rank skips the whole step
                step.skipped += 1
                _undo_step(step)
                buffer.zero_()
            else:
                buffer.copy_(state.feedback.apply(key, reduced))
                if step.skipped:  # another bucket of this step was skipped
                    _undo_step(step)
        except Exception as e:  # noqa: BLE001 - handed to DDP through the future
            result.set_exception(e)
            return
        result.set_result(buffer)

    fut.then(finish)


def _allreduce(state: CompressionState, buffer: torch.Tensor, world: int, step: StepBytes
               ) -> torch.futures.Future[torch.Tensor]:
    wire = torch.float16 if state.compressor.name == "fp16" else torch.bfloat16
    low = buffer.to(wire).div_(world)  # NaN/Inf or fp16 overflow travel and are caught below
    nbytes = low.numel() * low.element_size()
    step.payload_bytes += nbytes
    step.wire_bytes += nbytes
    step.gathered_payload_bytes += nbytes * world
    step.sent_bytes += 2 * (world - 1) * nbytes // world  # ring all-reduce: reduce-scatter
    step.received_bytes += 2 * (world - 1) * nbytes // world  # + all-gather, each way
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
        step.undo.setdefault((id(fb), key), (fb, fb._state.get(key)))
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
    step.sent_bytes += wire()
    step.received_bytes += (world - 1) * wire()
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
            _undo_step(step)
            buffer.zero_()
            return buffer
        into = (buffer if buffer.dtype == torch.float32 and buffer.is_contiguous()
                and buffer.dim() == 1 else None)
        mean = mean_of_payloads(comp, entries, rank, sent, buffer.numel(), buffer.device,
                                f"step {it}, bucket {index}", into=into).to(buffer.dtype)
        update = fb.apply(key, mean)
        if not _same_memory(update, buffer):  # the mean may have been summed into the bucket
            buffer.copy_(update)
        if step.skipped:  # another bucket of this step was skipped after this one began
            _undo_step(step)
        return buffer

    return fut.then(finish)


def _undo_step(step: StepBytes) -> None:
    """Put every feedback state that ``step`` touched back to its pre-step value."""
    for (_, key), (fb, old) in list(step.undo.items()):
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
