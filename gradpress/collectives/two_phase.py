"""Two-phase compressed all-reduce: an all-to-all of compressed shards, owner-side decode,
feedback and re-encode, then an all-gather of the owners' payloads.

The pattern of DeepSpeed's compressed all-reduce for 1-bit Adam (Tang et al. 2021), Bagua's
ByteGrad and CGX, for any gradpress compressor and feedback. Per bucket ``g`` of ``d``
elements on rank ``p`` of ``P``; shard ``j`` is ``[start_j, end_j)`` of :func:`shard_bounds`
(every rank computes it alone from ``d`` and ``P``):

1. ``v = worker_fb.to_send(k, g)`` (ECQ-SGD: ``g + alpha h``);
2. encode each shard ``v_j`` into its own payload (seed mixed from the base seed, step,
   bucket, rank and shard); ``worker_fb.commit(k, g, concat_j decode(payload_j))``;
3. one all-to-all: rank ``p`` receives every rank's payload of shard ``p``;
4. decode them and average in rank order: ``m_p``;
5. owner feedback: ``u = server_fb.to_send(k/owner, m_p)``, encode ``u``,
   ``server_fb.commit(k/owner, m_p, decode(payload))``; its state holds ``d/P`` elements;
6. one all-gather of the owners' payloads; every rank decodes all ``P`` shards from the
   same bytes into the bucket, then ``server_fb.apply(k, ...)`` (identity for none, EF and
   ECQ-SGD; EF21 keeps its server estimate there), so every rank holds the same floats.

Traffic per rank with a payload of ``C`` bytes for the whole bucket (``C/P`` per shard,
frames padded to the compressor's bound of a shard when ``bounded``): the all-to-all sends
and receives ``(P-1)`` shard frames, the all-gather sends this rank's owner frame once and
receives ``P-1``: ``sent ~ C``, ``received ~ 2 C (P-1)/P``; a ring all-gather forwards
each frame, so on the links each rank moves about ``2 C (P-1)/P`` in each direction.
Decode work per rank: ``2 (P-1)`` shard decodes of ``d/P`` elements, ``O(d)``.

Failure is the same on every rank: a status in the length field of a frame says that a
rank skips the step (``on_nonfinite="skip"``), had NaN/Inf, or failed to compress; every
owner sees every rank's status, so all raise (or skip) together before phase 2. A shard
payload that only its owner can find bad (corrupt bytes, over the bound) makes the owner
send a status in phase 2 and raise the error naming the sender; the others raise a
:class:`~gradpress.errors.PeerError` naming the owner.

Pairs measured to converge (DDP on digits, 3-4 ranks, ``tests/test_two_phase.py`` and
``benchmarks/slow_network.py``): ECQ-SGD on both sides, EF on both sides with scaled sign,
none on both sides with QSGD.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from gradpress.collectives.allgather import (
    STATUS_ERROR,
    STATUS_NONFINITE,
    STATUS_OVERFLOW,
    STATUS_SKIP,
    Entry,
    _group,
    allgather_bytes_async,
    allgather_frame_async,
    write_frame,
)
from gradpress.collectives.alltoall import AllToAll, FrameAllToAll, Traffic
from gradpress.collectives.average import (
    check_statuses,
    decode_entry,
    mean_into,
    mean_of_payloads,
    prepare_entry,
)
from gradpress.compressors import Compressor
from gradpress.compressors.fused import Workspace
from gradpress.errors import NonFiniteGradientError, PeerError
from gradpress.feedback import Feedback
from gradpress.feedback.fused import (
    encode_with_feedback,
    fused_coefs,
    prepare_shards,
    supports,
)
from gradpress.payload import PayloadView

#: Seed sides: a worker's shard payloads and an owner's re-encoded shard.
WORKER, OWNER = 0, 1


def shard_bounds(d: int, world: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each rank's shard of ``d`` elements: the first ``d % world``
    shards hold one element more (shards may be empty when ``d < world``)."""
    q, rem = divmod(d, world)
    out, start = [], 0
    for p in range(world):
        end = start + q + (1 if p < rem else 0)
        out.append((start, end))
        start = end
    return out


def _is(entry: Entry, status: int) -> bool:
    return isinstance(entry, int) and entry == status


def owner_key(key: str) -> str:
    """The server feedback's key for this rank's shard of bucket ``key``."""
    return f"{key}/owner"


def shard_capacity(comp: Compressor, d: int, world: int, crc: bool) -> int | None:
    """Frame capacity every rank computes alone: the bound of the largest shard's payload
    (plus the CRC32), or ``None`` when the compressor declares no bound."""
    bound = comp.max_payload_bytes(-(-d // world)) if d else 0
    return None if bound is None else bound + (4 if crc else 0)


def _encode(comp: Compressor, x: torch.Tensor, seed: int, crc: bool
            ) -> tuple[bytes, torch.Tensor]:
    if x.numel() == 0:  # an empty shard (d < P) travels as an empty frame
        return b"", x.float()
    payload, dec = comp.encode_decoded(x, seed=seed)  # dec == decode(payload), bit for bit
    if crc:
        payload = dataclasses.replace(payload, crc=True)
    return payload.to_bytes(), dec.reshape(-1)


class ShardBuffers:
    """Memory one bucket reuses every step on the fused path (allocated at its first step,
    again only if its size changes): the ``(world, 4 + capacity)`` all-to-all send and
    receive frames, the owner's frame and the all-gather's frames, the owner's mean
    (``ceil(d/P)`` floats) and the worker's and owner's encoder scratch."""

    def __init__(self, world: int, capacity: int, numel: int) -> None:
        def frames(rows: int) -> torch.Tensor:
            return torch.zeros(rows, 4 + capacity, dtype=torch.uint8)
        self.send, self.recv, self.gathered = frames(world), frames(world), frames(world)
        self.owner = torch.zeros(4 + capacity, dtype=torch.uint8)
        self.mean = torch.empty(-(-numel // world), dtype=torch.float32)
        self.worker_ws, self.owner_ws = Workspace(), Workspace()
        self.key = (world, capacity, numel)

    def data_ptrs(self) -> dict[str, int]:
        """Addresses of every buffer (tests check they stay put across steps)."""
        return {"send": self.send.data_ptr(), "recv": self.recv.data_ptr(),
                "gathered": self.gathered.data_ptr(), "owner": self.owner.data_ptr(),
                "mean": self.mean.data_ptr(),
                **{f"worker {k}": v for k, v in self.worker_ws.data_ptrs().items()},
                **{f"owner {k}": v for k, v in self.owner_ws.data_ptrs().items()}}


class TwoPhaseBucket:
    """One bucket through the two-phase all-reduce.

    Construction runs steps 1-3 (the all-to-all is left in flight); :meth:`gather` waits
    for it, runs steps 4-5 and starts step 6, returning a future whose value is the
    reduced bucket (flat float32, after ``server_fb.apply``) or ``None`` when the step is
    skipped. Both collectives are issued from the caller's thread, so a caller that
    constructs and gathers buckets in the same order on every rank keeps gloo's collective
    order (the DDP hook pipelines: bucket ``k+1``'s all-to-all, then bucket ``k``'s
    all-gather).

    Args:
        seed_of: ``seed_of(shard, side)`` -> the payload seed (``side``: :data:`WORKER` or
            :data:`OWNER`); the caller mixes in step, bucket and rank.
        undo: a dict that receives ``(id(fb), key) -> (fb, state before this step)`` for
            both feedbacks, so a skipped step can be rolled back.
        buffers: :class:`ShardBuffers` of this bucket (bounded, CPU, no ``undo``): the
            frames are reused and supported (compressor, feedback) pairs take the fused
            path (:mod:`gradpress.feedback.fused`) on the worker and the owner side.
        out: a flat float32 tensor of ``d`` elements that receives the reduced bucket
            (e.g. the DDP bucket itself, read only before the all-to-all).
    """

    def __init__(self, comp: Compressor, worker_fb: Feedback, server_fb: Feedback, key: str,
                 grad: torch.Tensor, *, seed_of: Callable[[int, int], int],
                 group: dist.ProcessGroup | None = None, bounded: bool = True,
                 crc: bool = False, on_nonfinite: str = "raise", where: str = "",
                 undo: dict[tuple[int, str], tuple[Feedback, Any]] | None = None,
                 buffers: ShardBuffers | None = None, out: torch.Tensor | None = None
                 ) -> None:
        g = _group(group)
        self.world, self.rank = dist.get_world_size(g), dist.get_rank(g)
        self.comp, self.server_fb, self.key, self.group = comp, server_fb, key, group
        self.crc, self.seed_of, self.where = crc, seed_of, where or f"bucket {key}"
        self.numel, self.device = grad.numel(), grad.device
        self.bounds = shard_bounds(self.numel, self.world)
        self.capacity = shard_capacity(comp, self.numel, self.world, crc) if bounded else None
        if undo is not None:
            for fb, k in ((worker_fb, key), (server_fb, owner_key(key)), (server_fb, key)):
                undo.setdefault((id(fb), k), (fb, fb._state.get(k)))
        self.local_error: Exception | None = None
        self.owner_error: PeerError | None = None
        self.own: torch.Tensor | None = None
        self.bufs = buffers if (buffers is not None and self.capacity is not None
                                and undo is None
                                and supports(comp, worker_fb, grad, dense=True)
                                and fused_coefs(server_fb) is not None) else None
        self.out = out
        parts: list[bytes | PayloadView | int]
        try:
            parts = self._compress_shards(worker_fb, grad.detach().reshape(-1))
        except NonFiniteGradientError:
            parts = [STATUS_SKIP if on_nonfinite == "skip" else STATUS_NONFINITE] * self.world
        except Exception as e:  # noqa: BLE001 - still take part, so peers fail too, not hang
            parts, self.local_error = [STATUS_ERROR] * self.world, e
        self.payload_bytes = sum(len(p) for p in parts if not isinstance(p, int))
        self.owner_payload_bytes = 0
        self.payload_lengths = [len(p) if not isinstance(p, int) else 0 for p in parts]
        #: this rank's own shard payload (fused path): decoded from the local bytes, as the
        #: generic path uses its own decoded shard, not the wire's copy
        self.own_view = parts[self.rank] if isinstance(parts[self.rank], PayloadView) else None
        self.owner_view: PayloadView | None = None
        if self.bufs is not None:
            send = self.bufs.send.numpy()
            for j, p in enumerate(parts):
                write_frame(send[j], None if isinstance(p, PayloadView) else p,
                            len(p) if isinstance(p, PayloadView) else 0)
            self.exchange = FrameAllToAll(self.bufs.send, self.bufs.recv, group)
        else:
            self.exchange = AllToAll(parts, group, capacity=self.capacity)
        self.traffic = Traffic()
        self.traffic.add(self.exchange.traffic)

    def _compress_shards(self, worker_fb: Feedback, flat: torch.Tensor
                         ) -> list[bytes | PayloadView]:
        """Steps 1-2: this rank's shard payloads; the worker feedback commits only after
        every shard encoded (fused: every shard checked before any residual is written)."""
        if self.bufs is not None:
            send = self.bufs.send.numpy()
            shards = [(s, e, send[j, 4:], self.seed_of(j, WORKER))
                      for j, (s, e) in enumerate(self.bounds)]
            run = prepare_shards(self.comp, worker_fb, self.key, flat, shards, crc=self.crc,
                                 ws=self.bufs.worker_ws)
            if run is not None:
                return [b"" if v is None else v for v in run()]
        v = worker_fb.to_send(self.key, flat)
        parts, decoded = [], []
        for j, (s, e) in enumerate(self.bounds):
            raw, dec = _encode(self.comp, v[s:e], self.seed_of(j, WORKER), self.crc)
            parts.append(raw)
            decoded.append(dec)
        worker_fb._commit_checked(self.key, flat, torch.cat(decoded).reshape(flat.shape))
        self.own = decoded[self.rank]
        return parts

    def gather(self) -> torch.futures.Future:
        """Steps 4-6 (see the class docstring)."""
        entries = self.exchange.wait()
        if self.own_view is not None and not isinstance(entries[self.rank], int):
            entries[self.rank] = self.own_view.array
        if self.local_error is not None:
            raise self.local_error
        s, e = self.bounds[self.rank]
        mine: bytes | int
        self.own_out: torch.Tensor | None = None
        if any(_is(x, STATUS_SKIP) for x in entries):
            mine = STATUS_SKIP
        elif e == s:
            check_statuses(self.comp, entries, self.where)
            mine = b""
            self.own_out = torch.zeros(0, dtype=torch.float32, device=self.device)
        else:
            mine = self._reduce_own_shard(entries, e - s)
        if self.bufs is not None:
            owner = self.bufs.owner.numpy()
            write_frame(owner, None if isinstance(mine, PayloadView) else mine,
                        len(mine) if isinstance(mine, PayloadView) else 0)
            fut, wire = allgather_frame_async(self.bufs.owner, self.bufs.gathered, self.group)
        else:
            fut, wire = allgather_bytes_async(mine, self.group, capacity=self.capacity)
        self.traffic.add(Traffic(sent=wire(), received=(self.world - 1) * wire()))
        self.owner_payload_bytes = len(mine) if not isinstance(mine, int) else 0
        return fut.then(self._finish)

    def _reduce_own_shard(self, entries: list[Entry], n: int) -> bytes | int:
        """Steps 4-5: mean of shard ``rank``, owner feedback, the owner's payload (or
        :data:`STATUS_ERROR` after a payload only this owner could find bad)."""
        where = f"{self.where}, shard {self.rank}"
        try:
            if self.bufs is not None:
                m = mean_into(self.comp, entries, self.rank, self.own, self.bufs.mean[:n],
                              where)
            else:
                m = mean_of_payloads(self.comp, entries, self.rank, self.own, n, self.device,
                                     where)
        except PeerError as err:
            if any(_is(x, STATUS_ERROR) or _is(x, STATUS_NONFINITE) for x in entries):
                raise  # every owner sees these statuses: all raise here, together
            self.owner_error = err
            return STATUS_ERROR
        okey = owner_key(self.key)
        if self.bufs is not None:
            view = encode_with_feedback(self.comp, self.server_fb, okey, m,
                                        self.bufs.owner.numpy()[4:],
                                        seed=self.seed_of(self.rank, OWNER), crc=self.crc,
                                        ws=self.bufs.owner_ws)
            if view is not None:
                self.owner_view = view
                return view  # own_out stays None: decoded from these local bytes
        u = self.server_fb.to_send(okey, m)
        raw, dec = _encode(self.comp, u, self.seed_of(self.rank, OWNER), self.crc)
        self.server_fb._commit_checked(okey, m, dec.reshape(m.shape))
        self.own_out = dec
        return raw

    def _finish(self, fut: torch.futures.Future) -> torch.Tensor | None:
        """Step 6 after the all-gather: the reduced bucket, or ``None`` when skipped."""
        entries: list[Entry] = fut.value()
        if self.owner_view is not None and not isinstance(entries[self.rank], int):
            entries[self.rank] = self.owner_view.array  # the owner's own local bytes
        if self.owner_error is not None:
            raise self.owner_error
        if any(_is(x, STATUS_SKIP) for x in entries):
            return None
        rejected = [r for r, x in enumerate(entries) if _is(x, STATUS_ERROR)]
        if rejected:
            raise PeerError(f"{self.where}: shard owner(s) {rejected} rejected a shard payload "
                            "they received (their error names the rank that sent it)")
        if any(_is(x, STATUS_OVERFLOW) for x in entries):
            raise PeerError(f"{self.where}: an owner's payload exceeded {self.comp.name}'s "
                            "declared bound; report this as a bug")
        if self.bufs is not None and self.out is not None:
            return self._finish_into(entries, self.out)
        out = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        for j, (s, e) in enumerate(self.bounds):
            if e == s:
                continue
            if j == self.rank and self.own_out is not None:
                out[s:e] = self.own_out
            else:
                out[s:e] = decode_entry(self.comp, entries[j], e - s, j,
                                        f"{self.where}, shard {j} (all-gather)", self.device)
        return self.server_fb.apply(self.key, out)

    def _finish_into(self, entries: list[Entry], out: torch.Tensor) -> torch.Tensor:
        """Step 6 into ``out``: every shard payload checked before any is written."""
        writers = []
        for j, (s, e) in enumerate(self.bounds):
            if e == s:
                continue
            if j == self.rank and self.own_out is not None:
                src = self.own_out
                writers.append((s, e, lambda o, add, src=src: o.copy_(src)))
                continue
            writers.append((s, e, prepare_entry(self.comp, entries[j], out[s:e], j,
                                                f"{self.where}, shard {j} (all-gather)")))
        for s, e, write in writers:
            write(out[s:e], False)
        if type(self.server_fb)._apply is Feedback._apply:
            return out  # the identity: no re-scan of the decoded floats
        return self.server_fb.apply(self.key, out)
