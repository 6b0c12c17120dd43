"""Grid search of deterministic Sparse Dithering in compiled passes (``sparse_dithering``'s
docstring states the math; ``sparse_dithering._budget_round`` is the one-shot reference it
reproduces).

For each grid ``c = base * r`` the budgeted rounding of ``u = |x| / c`` keeps ``floor(u)`` and
rounds up the largest gains ``g = 2 frac(u) - 1`` until ``sum frac^2 - budget`` is met; the
threshold lies in one bin of a 4096-bin histogram of ``g`` (count and mass per bin, exact:
``sd_writer`` explains why the gains are integers in units of ``2^-23``), and only that
bin needs sorting.

1. :func:`scan` (one pass per ``r``): the histogram, ``sum floor`` and ``sum frac^2``, per
   block. The level sum of grid ``r`` is then known up to the count taken from the
   threshold bin, bounded by the bin's edges (:meth:`Grid.bounds`).
2. :func:`resolve` (only grids whose bounds reach the best one): the threshold bin's gains
   in coordinate order, sorted by ``torch.sort`` exactly as the reference sorts them (its
   order among equal gains decides which coordinates round up).
3. :func:`emit`: the body of the chosen grid, with the sums for the least-squares scale.

Results equal the reference up to float64 summation order (of ``sum frac^2`` and the scale's
sums); every pass is parallel over blocks and independent of the thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from gradpress.kernels import sd_writer as K
from gradpress.kernels.level_codec import BodyLayout

_BINS = K.NBINS
#: Largest ``|x| / c`` the kernels take (``trunc`` through int32, ``k^2`` summed in int64);
#: beyond it (over 2^26 unary bits for one coordinate) the caller uses the reference.
MAX_U = float(2**26)


@dataclass
class Grid:
    """Pass-1 statistics of one grid; ``j``/``res``: threshold bin and the gain it supplies;
    per block: ``sum floor`` (``floors``), count above bin ``j`` and in bin ``j``."""

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
    floors: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    above: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    binj: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

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


def norm2(x: np.ndarray, block: int) -> tuple[float, float]:
    """``(||x||^2, max |x|)``: float64 sums per block, then over blocks in order."""
    n = -(-x.size // block)
    part = np.zeros(n, dtype=np.float64)
    amax = np.zeros(n, dtype=np.int32)
    K._sumsq(x, x.view(np.int32), block, part, amax)
    return float(sum(part.tolist())), float(amax.view(np.float32).max()) if n else 0.0


def scan(x: np.ndarray, c: float, budget: float, block: int) -> Grid | None:
    """Pass 1 for the grid ``c`` (float32 arithmetic) on float32 ``x``; ``None`` if no
    rounding fits the budget."""
    n = -(-x.size // block)
    hist = np.empty((n, _BINS, 2), dtype=np.int64)
    floors = np.zeros(n, dtype=np.int64)
    sq = np.zeros(n, dtype=np.float64)
    K._scan(x, np.float32(c), block, hist, floors, sq)
    grid = Grid(c, float(floors.sum()), float(sum(sq.tolist())) - budget, floors=floors)
    if grid.need <= 0:
        return grid
    count = hist[:, :, 0].sum(0)
    mass = hist[:, :, 1].sum(0)  # in units of 2^-23: exact, below 2^53
    if int(count.sum()) == 0 or float(mass.sum()) * 2.0**-23 < grid.need:
        return None
    tail = np.cumsum(mass[::-1])[::-1] * 2.0**-23  # tail[j] = sum of bins >= j, exact
    j = int(np.flatnonzero(tail >= grid.need).max())
    above = float(tail[j + 1]) if j + 1 < _BINS else 0.0
    grid.j, grid.res = j, grid.need - above
    grid.above_count = int(count[j + 1:].sum())
    grid.bin_count = int(count[j])
    grid.lo, grid.hi = j / _BINS, (j + 1) / _BINS
    grid.above = hist[:, j + 1:, 0].sum(1)
    grid.binj = hist[:, j, 0].copy()
    return grid


def resolve(x: np.ndarray, grid: Grid, block: int) -> None:
    """Pass 2: the threshold bin's chosen positions (``grid.inbin``)."""
    if grid.need <= 0 or grid.inbin is not None:
        return
    offs = np.concatenate([[0], np.cumsum(grid.binj)])
    pos = np.zeros(int(offs[-1]), dtype=np.int64)
    gains = np.zeros(int(offs[-1]), dtype=np.int64)
    K._gather(x, np.float32(grid.c), block, grid.j, offs, pos, gains)
    gs, order = torch.sort(torch.from_numpy(gains * 2.0**-23), descending=True)
    m = int((torch.cumsum(gs, 0) < grid.res).sum())  # first index reaching the need
    grid.inbin = torch.sort(torch.from_numpy(pos)[order[:m + 1]]).values


def emit(x: np.ndarray, grid: Grid, block: int) -> tuple[BodyLayout, float, float]:
    """Pass 3: the unary-mode body of ``grid`` (scale not yet written), ``sum |x| k`` and
    ``sum k^2``."""
    resolve(x, grid, block)
    n = grid.floors.size
    chosen = (grid.inbin.numpy() if grid.inbin is not None else np.zeros(0, dtype=np.int64))
    cstart = np.searchsorted(chosen, np.arange(n, dtype=np.int64) * block)
    ksum = grid.floors + np.diff(np.concatenate([cstart, [chosen.size]]))
    up = grid.need > 0
    if up:
        ksum = ksum + grid.above
    lay = BodyLayout(x.size, ksum)
    sak = np.zeros(n, dtype=np.float64)
    skk = np.zeros(n, dtype=np.float64)
    K._emit_grid(x, np.float32(grid.c), grid.j if up else K.NBINS, chosen, cstart,
           block, lay.ubase, K.GROUP_WIDTH, lay.out, lay.ev, lay.ei, lay.ends, sak, skk)
    return lay, float(sum(sak.tolist())), float(sum(skk.tolist()))
