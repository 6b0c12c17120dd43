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

Allocation-free path (bounded frames on CPU, ``on_nonfinite="raise"``): each bucket index
keeps its frame, gathered frames and scratch (:class:`~gradpress.ddp.state.BucketBuffers`);
steps 1-2 write the payload straight into the frame and, for ECQ-SGD/EF/no feedback with a
dense fixed-width uniform code or sign, run as one fused pass pair that updates the residual
in place (:mod:`gradpress.feedback.fused`, same bytes and residual as steps 1-2 above); step
4 checks every payload, then decodes them into the bucket in rank order
(:func:`~gradpress.collectives.average.mean_into`). No ``bytes`` object and no new
full-size tensor per bucket after the first step (``tests/test_fused.py``).

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

import numpy as np
import torch
import torch.distributed as dist

from gradpress.collectives.allgather import (
    STATUS_ERROR,
    STATUS_NONFINITE,
    STATUS_SKIP,
    Entry,
    allgather_bytes_async,
    allgather_frame_async,
    comm_device,
    write_frame,
)
from gradpress.collectives.average import mean_into, mean_of_payloads
from gradpress.collectives.two_phase import TwoPhaseBucket, shard_capacity
from gradpress.compressors import Compressor
from gradpress.ddp.state import (
    BucketBuffers,
    CompressionState,
    StepBytes,
    _mix_seed,
    payload_bound,
)
from gradpress.errors import NonFiniteGradientError, PeerError
from gradpress.feedback import Feedback
from gradpress.feedback.fused import encode_with_feedback, supports
from gradpress.payload import PayloadView


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
    world = dist.get_world_size(state.group)
    cap = (shard_capacity(state.compressor, buffer.numel(), world, state.crc)
           if state.bounded in (True, "auto") else None)
    reuse = (cap is not None and state.on_nonfinite == "raise"
             and comm_device(state.group).type == "cpu")
    bufs = state._shard_buffers_for(index, world, cap, buffer.numel()) if reuse else None
    out = (buffer if reuse and buffer.dtype == torch.float32 and buffer.is_contiguous()
           and buffer.dim() == 1 else None)
    bucket = TwoPhaseBucket(
        state.compressor, state.feedback, state.server_feedback, key, buffer,
        seed_of=lambda j, side: _mix_seed(state.seed, it, index, rank, j, side),
        group=state.group, bounded=state.bounded in (True, "auto"), crc=state.crc,
        on_nonfinite=state.on_nonfinite, where=f"step {it}, bucket {index}",
        undo=step.undo if state.on_nonfinite == "skip" else None, buffers=bufs, out=out)
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
                update = (reduced if _identity_apply(state.feedback)
                          else state.feedback.apply(key, reduced))
                if not _same_memory(update, buffer):  # it may have been decoded into it
                    buffer.copy_(update)
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
    bound = payload_bound(comp, buffer.numel()) if state.bounded in (True, "auto") else None
    bound = bound + 4 if bound is not None and state.crc else bound  # the CRC32
    if state.bounded is True and bound is None:
        raise ValueError(f"compressor {comp.name!r} declares no payload bound; use "
                         "bounded='auto' or False")
    bufs = (state._buffers_for(index, world, bound)
            if bound is not None and comm_device(state.group).type == "cpu" else None)
    try:
        if bufs is not None:  # the reusable frame: no bytes object on the fast path
            mine, sent = _compress_into(state, bufs, comp, fb, key, buffer.detach(), seed)
        else:
            mine, sent = _compress_own(comp, fb, key, buffer.detach(), seed, state.crc)
    except NonFiniteGradientError:
        mine = STATUS_SKIP if state.on_nonfinite == "skip" else STATUS_NONFINITE
    except Exception as e:  # noqa: BLE001 - still take part, so peers fail too, not hang
        mine, local_error = STATUS_ERROR, e
    if not isinstance(mine, int):
        step.payload_bytes += len(mine)
        step.payload_lengths[index] = len(mine)
    step.buckets += 1
    if bufs is not None:
        write_frame(bufs.frame_np, None if isinstance(mine, PayloadView) else mine,
                    len(mine) if isinstance(mine, PayloadView) else 0)
        fut, wire = allgather_frame_async(bufs.frame, bufs.frames, state.group)
    else:
        fut, wire = allgather_bytes_async(mine, state.group, capacity=bound)
    step.wire_bytes += wire()
    step.sent_bytes += wire()
    step.received_bytes += (world - 1) * wire()
    it = step.step

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        entries: list[Entry] = fut.value()
        if local_error is not None:
            raise local_error
        if isinstance(mine, PayloadView) and not isinstance(entries[rank], int):
            own_wire = entries[rank]  # checked against mine below (crc)
            entries = [*entries[:rank], mine.array, *entries[rank + 1:]]  # own local bytes
        else:
            own_wire = entries[rank]
        step.gathered_payload_bytes += sum(len(e) for e in entries if not isinstance(e, int))
        if state.crc and not isinstance(mine, int) and not _same_bytes(own_wire, mine):
            raise PeerError(f"step {it}, bucket {index}: the payload from rank {rank} (this "
                            "rank) came back corrupted from the all-gather")
        if any(isinstance(e, int) and e == STATUS_SKIP for e in entries):  # all ranks skip
            step.skipped += 1
            _undo_step(step)
            buffer.zero_()
            return buffer
        into = (buffer if buffer.dtype == torch.float32 and buffer.is_contiguous()
                and buffer.dim() == 1 else None)
        where = f"step {it}, bucket {index}"
        if into is not None and bufs is not None:  # every payload checked, then summed in
            mean = mean_into(comp, entries, rank, sent, into, where)
        else:
            mean = mean_of_payloads(comp, entries, rank, sent, buffer.numel(), buffer.device,
                                    where, into=into).to(buffer.dtype)
        update = mean if _identity_apply(fb) else fb.apply(key, mean)
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


def _compress_into(state: CompressionState, bufs: BucketBuffers, comp: Compressor,
                   fb: Feedback, key: str, grad: torch.Tensor, seed: int
                   ) -> tuple[PayloadView | bytes, torch.Tensor | None]:
    """Steps 1-2 into this bucket's reusable frame: the fused pass
    (:func:`gradpress.feedback.fused.encode_with_feedback`: payload written at
    ``frame[4:]``, residual updated in place, ``sent`` not materialized) where the pair has
    one (dense fixed-width or sign bodies) and no step may need undoing; else
    :func:`_compress_own`'s bytes."""
    if state.on_nonfinite == "raise" and supports(comp, fb, grad, dense=True):
        view = encode_with_feedback(comp, fb, key, grad, bufs.frame_np[4:], seed=seed,
                                    crc=state.crc, ws=bufs.ws)
        if view is not None:
            return view, None
    return _compress_own(comp, fb, key, grad, seed, state.crc)


def _identity_apply(fb: Feedback) -> bool:
    """Whether ``fb.apply`` is the identity (it then only re-scans the decoded mean)."""
    return type(fb)._apply is Feedback._apply


def _same_bytes(a: Entry, b: PayloadView | bytes) -> bool:
    b_arr = b.array if isinstance(b, PayloadView) else np.frombuffer(b, dtype=np.uint8)
    a_arr = a if isinstance(a, np.ndarray) else np.frombuffer(a, dtype=np.uint8)
    return bool(np.array_equal(a_arr, b_arr))


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same elements of the same storage (copy is a no-op)."""
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride() and a.device == b.device)
