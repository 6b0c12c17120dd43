"""Decode the payloads every rank sent and average them in rank order.

Shared by the all-gather hook (every rank averages whole buckets) and the two-phase
all-reduce (each shard owner averages its shard). The mean is
``(sum_r decode(payload_r)) / n`` in float32, summed in rank order, so every rank that
averages the same bytes gets the same floats. A payload that cannot be used (bad bytes, a
header whose shape is not the expected one) raises :class:`~gradpress.errors.PeerError`
naming the rank that sent it; nothing is allocated from a header's claims before its shape
is checked against ``numel``.
"""

from __future__ import annotations

import torch

from gradpress.collectives.allgather import (
    STATUS_ERROR,
    STATUS_NONFINITE,
    STATUS_OVERFLOW,
    Entry,
)
from gradpress.compressors import Compressor
from gradpress.errors import NonFiniteGradientError, PayloadError, PeerError
from gradpress.payload import Payload


def decode_entry(comp: Compressor, entry: bytes, numel: int, sender: int, where: str,
                 device: torch.device | str) -> torch.Tensor:
    """``comp.decode`` of one rank's payload, checked to hold ``numel`` elements (flat)."""
    try:
        p = Payload.from_bytes(entry)
        if p.shape != (numel,):
            raise PayloadError(f"shape {p.shape}, expected ({numel},)")
        return comp.decode(p, device=device).reshape(-1)
    except PayloadError as err:
        raise PeerError(f"{where}: the payload from rank {sender} is unusable ({err}); "
                        "corrupted in transit, or do all ranks use the same compressor?"
                        ) from err


def _is(entry: Entry, status: int) -> bool:
    return isinstance(entry, int) and entry == status


def prepare_entry(comp: Compressor, entry: Entry, out: torch.Tensor, sender: int, where: str):
    """``comp.prepare_decode`` of one rank's payload for ``out`` (checked, nothing written
    yet): the writer ``write(out, add)``; a bad payload raises :class:`PeerError`."""
    try:
        return comp.prepare_decode(entry, out)
    except PayloadError as err:
        raise PeerError(f"{where}: the payload from rank {sender} is unusable ({err}); "
                        "corrupted in transit, or do all ranks use the same compressor?"
                        ) from err


def check_statuses(comp: Compressor, entries: list[Entry], where: str) -> None:
    """Raise the same error on every rank that sees these entries: a rank that failed to
    compress, a NaN/Inf gradient, a payload over the declared bound."""
    failed = [r for r, e in enumerate(entries) if _is(e, STATUS_ERROR)]
    if failed:
        raise PeerError(f"{where}: rank(s) {failed} failed to compress their gradient (their "
                        "own logs say why); this rank stops with them")
    nonfinite = [r for r, e in enumerate(entries) if _is(e, STATUS_NONFINITE)]
    if nonfinite:
        raise NonFiniteGradientError(
            f"{where}: rank(s) {nonfinite} had NaN/Inf gradients; fix the loss or clip, or "
            "use CompressionState(on_nonfinite='skip')")
    over = [r for r, e in enumerate(entries) if _is(e, STATUS_OVERFLOW)]
    if over:
        raise PeerError(f"{where}: rank(s) {over} produced payloads larger than "
                        f"{comp.name}'s declared bound; report this as a bug")


def mean_of_payloads(comp: Compressor, entries: list[Entry], rank: int,
                     own: torch.Tensor | None, numel: int, device: torch.device | str,
                     where: str, into: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the decoded payloads in rank order, as a flat float32 tensor.

    ``own`` is this rank's own message, already decoded from the same bytes (not decoded
    again); entries that are statuses are checked first (:func:`check_statuses`) and any
    left are skipped. ``into`` (float32, ``numel`` elements) may receive the sum when
    exactly two payloads are averaged: both are decoded before the first add, so a failed
    decode leaves it untouched.
    """
    check_statuses(comp, entries, where)
    valid = [r for r, e in enumerate(entries) if not isinstance(e, int)]
    if not valid:
        return torch.zeros(numel, dtype=torch.float32, device=device)
    if len(valid) != 2:
        into = None
    first: torch.Tensor | None = None  # the first decoded payload, until a second comes
    acc: torch.Tensor | None = None
    for n, r in enumerate(valid, start=1):
        if r == rank and own is not None:
            dec = own.reshape(-1)
        else:
            dec = decode_entry(comp, entries[r], numel, r, where, device)
        dec = dec.float()
        if n == 1:
            first = dec
        elif n == 2:  # d0 + d1, no clone of d0 first
            acc, first = torch.add(first, dec, out=into), None
        else:
            acc.add_(dec)
    acc = first.clone() if acc is None else acc
    return acc.div_(len(valid))


def mean_into(comp: Compressor, entries: list[Entry], rank: int, own: torch.Tensor | None,
              out: torch.Tensor, where: str) -> torch.Tensor:
    """:func:`mean_of_payloads` written into ``out`` (flat float32, reused across steps)
    with no new full-size tensor: every payload is checked first
    (:meth:`~gradpress.compressors.Compressor.prepare_decode`), so a bad one raises
    :class:`PeerError` with ``out`` untouched; then ``out = dec_0``, ``out += dec_r`` in
    rank order, ``out /= n``: the same float operations as :func:`mean_of_payloads`.
    ``own`` is this rank's decoded message where it is at hand (else its bytes are
    decoded like the others')."""
    check_statuses(comp, entries, where)
    valid = [r for r, e in enumerate(entries) if not isinstance(e, int)]
    if not valid:
        return out.zero_()
    writers = []
    for r in valid:
        if r == rank and own is not None:
            src = own.reshape(-1)
            writers.append(lambda o, add, src=src: o.add_(src) if add else o.copy_(src))
            continue
        writers.append(prepare_entry(comp, entries[r], out, r, where))
    for n, write in enumerate(writers):
        write(out, n > 0)
    return out.div_(len(valid))
