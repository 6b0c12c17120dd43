"""All-to-all of variable-length byte strings over ``torch.distributed`` (gloo and NCCL).

Rank ``r`` holds one payload per destination, ``payloads[j]`` for rank ``j``, and receives
the payload every rank addressed to it, in rank order. The framing is the all-gather's
(:mod:`gradpress.collectives.allgather`): ``[len (4 B, little-endian uint32) | payload]``,
a ``STATUS_*`` value in the length field when a rank has nothing valid to send, so every
receiver learns of it at the same step instead of hanging.

* **bounded, one collective** (``capacity`` given, known on every rank without
  communication): every frame is ``4 + capacity`` bytes, one ``all_to_all_single`` with
  equal splits. Wire cost per rank: ``(P - 1)(4 + capacity)`` bytes each way.
* **two collectives** (``capacity=None``): an all-to-all of the lengths (one int64 per
  pair), waited for, then an ``all_to_all_single`` with uneven splits of exactly
  ``4 + len`` bytes per frame. Wire cost per rank: ``sum_j (8 + 4 + len_j)`` over the
  other ranks ``j``, each way.

Both are issued from the calling thread, in order (never from a future's callback: see
DESIGN.md, "Collective order is the trap"). The frame addressed to oneself is copied
locally by the collective and counted in neither direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from gradpress.collectives.allgather import (
    _FIRST_STATUS,
    STATUS_OVERFLOW,
    Entry,
    _group,
    comm_device,
)
from gradpress.errors import PeerError


@dataclass
class Traffic:
    """Bytes of frames one rank put into a collective for other ranks (``sent``) and took
    out of it from other ranks (``received``), framing and padding included."""

    sent: int = 0
    received: int = 0

    def add(self, other: Traffic) -> None:
        self.sent += other.sent
        self.received += other.received


def _head(payload: bytes | int, capacity: int | None) -> int:
    if isinstance(payload, int):
        return payload
    if capacity is not None and len(payload) > capacity:
        return STATUS_OVERFLOW
    return len(payload)


def _frames(payloads: list[bytes | int], sizes: list[int]) -> np.ndarray:
    """Concatenated frames ``[head | payload | zeros]``, frame ``j`` of ``sizes[j]`` bytes."""
    out = np.zeros(sum(sizes), dtype=np.uint8)
    pos = 0
    for p, size in zip(payloads, sizes):
        head = _head(p, size - 4)
        out[pos:pos + 4] = np.frombuffer(np.uint32(head).tobytes(), dtype=np.uint8)
        if head < _FIRST_STATUS:
            out[pos + 4:pos + 4 + head] = np.frombuffer(p, dtype=np.uint8)
        pos += size
    return out


def split_frames(buf: np.ndarray, sizes: list[int], copy: bool = True) -> list[Entry]:
    """Frames of ``sizes[i]`` bytes back into payloads (``bytes``, or views into ``buf``
    without ``copy``) or statuses, in rank order."""
    out: list[Entry] = []
    pos = 0
    for r, size in enumerate(sizes):
        n = int(buf[pos:pos + 4].copy().view("<u4")[0])
        if n >= _FIRST_STATUS:
            out.append(n)
        elif n > size - 4:
            raise PeerError(f"rank {r} sent a frame declaring {n} bytes in a frame of "
                            f"{size - 4}: ranks disagree on the compressor or bucket layout")
        else:
            out.append(buf[pos + 4:pos + 4 + n].tobytes() if copy else buf[pos + 4:pos + 4 + n])
        pos += size
    return out


class FrameAllToAll:
    """The bounded all-to-all over reused buffers: ``send`` and ``recv`` are
    ``(world, 4 + capacity)`` uint8 tensors, row ``j`` of ``send`` the frame for rank ``j``
    (filled with :func:`~gradpress.collectives.allgather.write_frame`). One
    ``all_to_all_single``; :meth:`wait` returns views into ``recv``. Same wire cost as
    :class:`AllToAll` with a ``capacity``."""

    def __init__(self, send: torch.Tensor, recv: torch.Tensor,
                 group: dist.ProcessGroup | None = None) -> None:
        g = _group(group)
        world = dist.get_world_size(g)
        self._recv, self._size = recv, send.shape[1]
        self._work = dist.all_to_all_single(recv.view(-1), send.view(-1), group=group,
                                            async_op=True)
        self.traffic = Traffic(sent=(world - 1) * self._size, received=(world - 1) * self._size)

    def wait(self) -> list[Entry]:
        """Every rank's payload (a view, valid until ``recv`` is reused) or status."""
        try:
            self._work.wait()
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise PeerError(f"gradpress all-to-all failed: a peer crashed, stalled past the "
                            f"process group timeout, or left ({type(e).__name__}: {e})") from e
        return split_frames(self._recv.numpy().reshape(-1), [self._size] * self._recv.shape[0],
                            copy=False)


class AllToAll:
    """One byte all-to-all in flight: :meth:`wait` returns what every rank sent this one."""

    def __init__(self, payloads: list[bytes | int], group: dist.ProcessGroup | None = None,
                 *, capacity: int | None = None) -> None:
        g = _group(group)
        world, rank = dist.get_world_size(g), dist.get_rank(g)
        if len(payloads) != world:
            raise ValueError(f"all-to-all needs one payload per rank ({world}), got "
                             f"{len(payloads)}")
        device = comm_device(group)
        if capacity is not None:
            if capacity < 0:
                raise ValueError(f"capacity must be >= 0, got {capacity}")
            send_sizes = recv_sizes = [4 + capacity] * world
            extra = 0
        else:
            mine = [_head(p, None) for p in payloads]
            heads = torch.tensor(mine, dtype=torch.int64, device=device)
            theirs = torch.empty_like(heads)
            dist.all_to_all_single(theirs, heads, group=group)
            send_sizes = [4 + (h if h < _FIRST_STATUS else 0) for h in mine]
            recv_sizes = [4 + (h if h < _FIRST_STATUS else 0) for h in theirs.tolist()]
            extra = 8
        send = torch.from_numpy(_frames(payloads, send_sizes)).to(device)
        self._recv = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=device)
        self._recv_sizes = recv_sizes
        self._work = dist.all_to_all_single(
            self._recv, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes,
            group=group, async_op=True)
        others = [j for j in range(world) if j != rank]
        self.traffic = Traffic(sent=sum(send_sizes[j] + extra for j in others),
                               received=sum(recv_sizes[j] + extra for j in others))

    def wait(self) -> list[Entry]:
        """Every rank's payload (or status) for this rank, in rank order."""
        try:
            self._work.wait()
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise PeerError(f"gradpress all-to-all failed: a peer crashed, stalled past the "
                            f"process group timeout, or left ({type(e).__name__}: {e})") from e
        return split_frames(self._recv.cpu().numpy(), self._recv_sizes)


def alltoall_bytes(payloads: list[bytes], group: dist.ProcessGroup | None = None, *,
                   capacity: int | None = None) -> list[bytes]:
    """Send ``payloads[j]`` to rank ``j``; return what every rank sent this one, in rank
    order. Raises :class:`~gradpress.errors.PeerError` on every receiver of a payload over
    ``capacity`` and when a peer fails."""
    for p in payloads:
        if not isinstance(p, (bytes, bytearray)):
            raise TypeError(f"payloads must be bytes, got {type(p).__name__}")
    entries = AllToAll([bytes(p) for p in payloads], group, capacity=capacity).wait()
    bad = [r for r, e in enumerate(entries) if isinstance(e, int)]
    if bad:
        raise PeerError(f"ranks {bad} sent payloads longer than the agreed capacity "
                        f"{capacity} bytes; raise capacity or pass capacity=None")
    return entries
