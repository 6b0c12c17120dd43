"""All-gather of variable-length byte strings over ``torch.distributed`` (gloo and NCCL).

Collectives move tensors of one size on every rank, but compressed payloads differ in
length per rank. Two ways to gather them, both strictly ordered (gloo needs every rank to
issue the same collectives in the same order; see DESIGN.md, "Distributed"):

* **bounded, one collective** (``capacity`` given): every rank sends a fixed-size uint8
  frame of ``4 + capacity`` bytes, the first 4 holding the real length (little-endian
  uint32), then the payload and zero padding. ``capacity`` must be known on every rank
  without communication (for a compressor: the worst-case payload size of a tensor of that
  many elements, :func:`gradpress.ddp.hook.payload_bound`). Wire cost per rank:
  ``4 + capacity`` bytes.
* **two collectives** (``capacity=None``): all-gather the lengths (one int64 per rank),
  wait, then all-gather the bytes padded to the longest. Wire cost per rank:
  ``8 + max_r len_r`` bytes, and one more round trip.

A rank that has nothing valid to send (a non-finite gradient, a payload over the bound)
still takes part, with a *status* in the length field instead of a length, so every rank
learns of it at the same step and fails (or skips) the same way instead of hanging. No
compression happens here: bits are the caller's payload bytes; the frame overhead is
the 4-byte length and the padding, counted separately by the DDP hook.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from gradpress.errors import PeerError

#: Length-field values that are not lengths (payloads are shorter than 2^32 - 16 bytes).
STATUS_OVERFLOW = 0xFFFFFFFF  # the payload did not fit the agreed capacity
STATUS_NONFINITE = 0xFFFFFFFE  # the rank's gradient had NaN/Inf (the hook raises)
STATUS_SKIP = 0xFFFFFFFD  # the rank skips this bucket (non-finite, on_nonfinite="skip")
STATUS_ERROR = 0xFFFFFFFC  # the rank failed to compress (its own error says why)
_FIRST_STATUS = 0xFFFFFFF0

#: One gathered entry: the payload bytes (or a ``uint8`` numpy view of them in a reused
#: frame buffer), or an ``int`` status (``STATUS_*``).
Entry = bytes | np.ndarray | int


def _group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return group if group is not None else dist.group.WORLD


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device collectives of ``group`` run on: the current CUDA device for NCCL, else
    the CPU."""
    if dist.get_backend(_group(group)) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_flat(t: torch.Tensor, group: dist.ProcessGroup | None, async_op: bool):
    """All-gather equal-sized 1-D ``t`` into a ``(world, len)`` tensor (concatenated form)."""
    world = dist.get_world_size(_group(group))
    out = torch.empty(world * t.numel(), dtype=t.dtype, device=t.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = gather(out, t, group=group, async_op=async_op)
    return out.view(world, t.numel()), work


def encode_frame(payload: bytes | int, capacity: int, device: torch.device | str = "cpu"
                 ) -> torch.Tensor:
    """The fixed-size uint8 frame ``[len (4 B) | payload | zeros]`` of ``4 + capacity`` bytes.

    ``payload`` may be a ``STATUS_*`` int instead of bytes; a payload longer than
    ``capacity`` becomes :data:`STATUS_OVERFLOW` (never truncated)."""
    frame = np.zeros(4 + capacity, dtype=np.uint8)
    if isinstance(payload, int):
        head = payload
    elif len(payload) > capacity:
        head = STATUS_OVERFLOW
    else:
        head = len(payload)
        frame[4:4 + head] = np.frombuffer(payload, dtype=np.uint8)
    frame[:4] = np.frombuffer(np.uint32(head).tobytes(), dtype=np.uint8)
    return torch.from_numpy(frame).to(device)


def write_frame(frame: np.ndarray, payload: bytes | int | None, length: int = 0) -> None:
    """Fill the reusable frame ``[len | payload | zeros]`` in place: ``payload`` bytes are
    copied after the length field, a status int goes in it, and ``None`` means the payload
    (``length`` bytes) is already at ``frame[4:]`` (encoded there, see
    :meth:`~gradpress.compressors.Compressor.encode_into`)."""
    capacity = frame.size - 4
    if isinstance(payload, int):
        head, length = payload, 0
    elif payload is not None and len(payload) > capacity:
        head, length = STATUS_OVERFLOW, 0
    else:
        if payload is not None:
            length = len(payload)
            frame[4:4 + length] = np.frombuffer(payload, dtype=np.uint8)
        head = length
    frame[:4].view("<u4")[0] = head
    frame[4 + length:] = 0


def allgather_frame_async(frame: torch.Tensor, frames: torch.Tensor,
                          group: dist.ProcessGroup | None = None
                          ) -> tuple[torch.futures.Future, Callable[[], int]]:
    """All-gather this rank's filled frame (``4 + capacity`` uint8, see :func:`write_frame`)
    into the preallocated ``(world, 4 + capacity)`` ``frames``, in one collective; returns
    ``(future, wire_bytes)`` like :func:`allgather_bytes_async`. The future's value is every
    rank's entry, as views into ``frames`` (valid until it is reused). Nothing is allocated
    per call beyond the entries' small views."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = gather(frames.view(-1), frame, group=group, async_op=True)
    size = frame.numel()
    return work.get_future().then(lambda fut: _finish(fut, frames, copy=False)), lambda: size


def decode_frames(frames: torch.Tensor, copy: bool = True) -> list[Entry]:
    """Split gathered ``(world, 4 + capacity)`` frames back into payloads (``bytes``, or
    views into ``frames`` without ``copy``) or statuses."""
    arr = frames.cpu().numpy()
    heads = arr[:, :4].copy().view("<u4").reshape(-1)
    out: list[Entry] = []
    for r, n in enumerate(heads.tolist()):
        if n >= _FIRST_STATUS:
            out.append(int(n))
        elif n > arr.shape[1] - 4:
            raise PeerError(f"rank {r} sent a frame declaring {n} bytes, more than the agreed "
                            f"capacity {arr.shape[1] - 4}: ranks disagree on the compressor "
                            "or bucket layout")
        else:
            out.append(arr[r, 4:4 + n].tobytes() if copy else arr[r, 4:4 + n])
    return out


def allgather_bytes_async(payload: bytes | int, group: dist.ProcessGroup | None = None, *,
                          capacity: int | None = None
                          ) -> tuple[torch.futures.Future, Callable[[], int]]:
    """Start gathering ``payload`` from every rank; return ``(future, wire_bytes)``.

    The future's value (after ``then``) is the list of every rank's entry in rank order.
    With ``capacity`` this issues exactly one collective, asynchronously. Without, it
    gathers the lengths *synchronously* (this call blocks for one small round trip), then
    starts the byte gather; both collectives are issued from this call, in order, so
    several buckets never interleave. ``wire_bytes()`` is what this rank put on the wire.
    """
    device = comm_device(group)
    if capacity is not None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        frames, work = _gather_flat(encode_frame(payload, capacity, device), group, True)
        return work.get_future().then(lambda fut: _finish(fut, frames)), lambda: 4 + capacity
    head = payload if isinstance(payload, int) else len(payload)
    lens, _ = _gather_flat(torch.tensor([head], dtype=torch.int64, device=device), group,
                           False)
    lens_l = lens.reshape(-1).tolist()
    cap = max([n for n in lens_l if n < _FIRST_STATUS], default=0)
    frames, work = _gather_flat(encode_frame(payload, cap, device), group, True)
    return work.get_future().then(lambda fut: _finish(fut, frames)), lambda: 8 + 4 + cap


def _finish(fut: torch.futures.Future, frames: torch.Tensor, copy: bool = True
            ) -> list[Entry]:
    try:
        fut.value()
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise PeerError(f"gradpress all-gather failed: a peer crashed, stalled past the "
                        f"process group timeout, or left ({type(e).__name__}: {e})") from e
    return decode_frames(frames, copy)


def allgather_bytes(payload: bytes, group: dist.ProcessGroup | None = None, *,
                    capacity: int | None = None) -> list[bytes]:
    """All-gather variable-length ``payload`` bytes; every rank gets all of them in rank order.

    Works on gloo and NCCL (frames travel on the backend's device). With ``capacity`` (an
    upper bound on every rank's length, known everywhere) one collective of ``4 + capacity``
    bytes per rank; without, lengths first, then the bytes padded to the longest.
    Raises :class:`~gradpress.errors.PeerError` on every rank if any payload exceeds
    ``capacity`` or a peer fails.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    fut, _ = allgather_bytes_async(bytes(payload), group, capacity=capacity)
    entries = fut.wait()
    bad = [r for r, e in enumerate(entries) if isinstance(e, int)]
    if bad:
        raise PeerError(f"ranks {bad} sent payloads longer than the agreed capacity "
                        f"{capacity} bytes; raise capacity or pass capacity=None")
    return entries
