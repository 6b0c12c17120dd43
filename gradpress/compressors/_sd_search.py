"""Streaming grid search of deterministic Sparse Dithering (``sparse_dithering``'s docstring
states the math; ``sparse_dithering._budget_round`` is the one-shot reference it reproduces).

For each grid ``c = base * r`` the budgeted rounding of ``u = |x| / c`` keeps ``floor(u)`` and
rounds up the largest gains ``g = 2 frac(u) - 1`` until ``sum frac^2 - budget`` is met; the
threshold lies in one bin of a 4096-bin histogram of ``g`` (mass and count per bin), and only
that bin needs sorting. Pass 1 (one per ``r``, in chunks) collects the histogram, ``sum floor``
and ``sum frac^2``; the level sum of grid ``r`` is then known up to the count taken from the
threshold bin, bounded by the bin's edges. Only grids whose bounds reach the best one are
resolved exactly (pass 2: the threshold bin's gains in coordinate order, sorted as the
reference sorts them); pass 3 emits the chosen levels chunk by chunk with the sums for the
least-squares scale. Results equal the reference up to float64 summation order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_BINS = 4096


@dataclass
class Grid:
    """Pass-1 statistics of one grid; ``j``/``res``: threshold bin and the gain it supplies."""

    c: float
    floor_sum: float
    need: float
    j: int = -1
    above_count: int = 0
    res: float = 0.0
    bin_count: int = 0
    lo: float = 0.0
    hi: float = 0.0
    inbin: torch.Tensor | None = None  # chosen positions inside the threshold bin (sorted)

    def bounds(self) -> tuple[float, float]:
        """Least and largest possible level sum."""
        base = self.floor_sum + self.above_count
        if self.need <= 0:
            return base, base
        if self.inbin is not None:
            return base + self.inbin.numel(), base + self.inbin.numel()
        low = max(1, math.floor(self.res / self.hi) - 1)  # n gains of at most hi reach res
        high = min(self.bin_count, math.ceil(self.res / self.lo) + 1) if self.lo > 0 else (
            self.bin_count)
        return base + low, base + max(low, high)


def _frac(a: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``floor(u)`` and ``frac(u)`` of ``u = a / c >= 0``, exact (``torch.frac``: float32
    ``torch.floor`` forks threads from 2048 elements on, 100x slower on busy cores)."""
    u = a / c
    f = torch.frac(u)
    return u - f, f


def _bins(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gains ``g = 2 frac - 1`` (float64; 0 where ``frac <= 1/2``) and their bins: ``0`` for
    ``frac <= 1/2``, else ``1 + floor(4096 g)`` (no compaction: ``nonzero`` is slow)."""
    g = (2 * f - 1).double()
    b = torch.clamp((g * _BINS).long(), 0, _BINS - 1).add_(1).mul_(g > 0)
    return g.clamp_min_(0.0), b


def scan(chunks, c: float, budget: float) -> Grid | None:
    """Pass 1 for the grid ``c``; ``None`` if no rounding fits the budget."""
    mass = torch.zeros(_BINS, dtype=torch.float64)
    count = torch.zeros(_BINS, dtype=torch.int64)
    floor_sum = sq = 0.0
    for a in chunks():
        k, f = _frac(a, c)
        floor_sum += float(k.sum(dtype=torch.float64))
        sq += float((f * f).sum(dtype=torch.float64))
        g, b = _bins(f)
        mass += torch.bincount(b, weights=g, minlength=_BINS + 1)[1:]
        count += torch.bincount(b, minlength=_BINS + 1)[1:]
    grid = Grid(c, floor_sum, sq - budget)
    if grid.need <= 0:
        return grid
    if int(count.sum()) == 0 or float(mass.sum()) < grid.need:
        return None
    tail = torch.flip(torch.cumsum(torch.flip(mass, [0]), 0), [0])
    j = int(torch.nonzero(tail >= grid.need).max())
    above = float(tail[j + 1]) if j + 1 < _BINS else 0.0
    grid.j, grid.res = j, grid.need - above
    grid.above_count = int(count[j + 1:].sum())
    grid.bin_count = int(count[j])
    grid.lo, grid.hi = j / _BINS, (j + 1) / _BINS
    return grid


def resolve(chunks, grid: Grid, step: int) -> None:
    """Pass 2: the threshold bin's chosen positions (``grid.inbin``)."""
    if grid.need <= 0 or grid.inbin is not None:
        return
    pos, gains = [], []
    for n, a in enumerate(chunks()):
        _, f = _frac(a, grid.c)
        g, b = _bins(f)
        sel = torch.from_numpy(np.flatnonzero((b == grid.j + 1).numpy()))
        pos.append(sel + n * step)
        gains.append(g[sel])
    where, gs = torch.cat(pos), torch.cat(gains)
    gs, order = torch.sort(gs, descending=True)
    m = int((torch.cumsum(gs, 0) < grid.res).sum())  # first index reaching the need
    grid.inbin = torch.sort(where[order[:m + 1]]).values


def levels(chunks, grid: Grid, step: int):
    """Pass 3: yield the chosen unsigned levels (float64) chunk by chunk."""
    inbin = grid.inbin if grid.inbin is not None else torch.zeros(0, dtype=torch.int64)
    for n, a in enumerate(chunks()):
        k, f = _frac(a, grid.c)
        if grid.need > 0:
            k += _bins(f)[1] > grid.j + 1
            lo, hi = torch.searchsorted(inbin, torch.tensor([n * step, (n + 1) * step])).tolist()
            k[inbin[lo:hi] - n * step] += 1
        yield k.double()
