"""Sparse Dithering (Albasyoni, Safaryan, Condat, Richtarik 2020, arXiv 2010.03246, Sec. 3):
a uniform grid of step ``delta ~ ||x|| / sqrt(d)``, coded as one trit per coordinate (zero,
plus, minus) and the magnitudes of the non-zeros in unary.

**Randomized (unbiased, ``sparse_dithering_rand``).** With ``delta = 2 ||x|| sqrt(omega/d)``
and ``u_i = |x_i| / delta``, ``k_i = floor(u_i) + Bernoulli(frac(u_i))``,
``C(x)_i = sgn(x_i) delta k_i``. Unbiased, and
``E||C(x)-x||^2 = delta^2 sum frac(1-frac) <= d delta^2 / 4 = omega ||x||^2``, so
``C in U(omega)``. The expected unary length is ``sum E k_i = ||x||_1 / delta <= d/(2 sqrt
omega)`` (Cauchy-Schwarz), which gives the paper's bound

    E bits <= 30 + log2 d + (log2 3 + 1/(2 sqrt(omega))) d.

**Deterministic (biased, contractive, ``sparse_dithering``).** For a distortion target ``nu``
(``C in B(1 - nu)``) the encoder tries grids ``delta = r * 2 ||x|| sqrt(nu/d)``, ``r >= 1``,
rounds each with the least total level ``sum k_i`` whose squared error fits the budget
``nu ||x||^2`` (start from ``floor``; rounding ``i`` up costs one level and changes the error
by ``(1 - 2 frac_i) delta^2``, so round up the largest fractions first: an exact greedy), and
keeps the cheapest feasible grid. The decoder multiplies by the least-squares scale
``<|x|, k> / ||k||^2`` (sent instead of ``delta``), which only lowers the error. At ``r = 1``
nearest rounding already fits (``d delta^2 / 4 = nu ||x||^2``), so a feasible grid always
exists. With ``levels=L`` instead of ``nu``: the single grid ``delta = ||x|| / L`` with nearest
rounding, ``alpha = max(0, 1 - d/(4 L^2))``.

*Worst case (derivation).* At ``r = 1`` write ``v_i = u_i^2``: ``sum v_i = d/(4 nu)`` and the
budget is ``sum (u_i - k_i)^2 <= d/4``. The least total level is a linear program in the
empirical distribution of ``u``; by Lagrangian duality its worst case over all ``x`` is
``d * W(nu)`` with ``W(nu) = max_lambda [conc_v G_lambda(d/(4 nu) / d) - lambda/4]``,
``G_lambda(u) = min_k k + lambda (u - k)^2`` and ``conc`` the concave envelope in ``v = u^2``
(two-point distributions suffice; LP vs integer program: at most one level).
:func:`worst_case_levels` evaluates it: ``W(1/10) = 1.56``, so our deterministic code never
exceeds ``40 + 1.5862 d + 1.56 d`` body bits (3.15 d), inside the paper's
``30 + log2 d + 3.35 d`` for every ``d >= 30``.

**Bits (the body; the 18-byte payload header of a 1-D tensor comes on top and is not part of
the paper's count, which assumes ``d`` known).**

    scale   32    float32 (randomized: ``delta``; deterministic: the least-squares scale)
    mode     1    0 = trits + unary, 1 = range-coded levels (``entropy=True`` only)
    trits   46 floor(d/29) + ceil(log2 3^(d mod 29))   (29 trits in 46 bits: 1.5862 bits each)
    unary   sum_i k_i    (k_i - 1 ones and a zero per non-zero)
    pad     0..7

so ``body <= 40 + 1.5862 d + sum k_i``. The constant 30 of the paper vs our 40 and the
``1.5862`` vs ``log2 3 = 1.58496`` are our framing (a float32 and byte padding); they are
covered by the ``log2 d`` term and the slack of ``sum k_i`` on every real vector (tested).
With ``entropy=True`` the signed levels are also range-coded with their own histogram
(``codec.entropy``: ``n H + O(K log d)``) and the shorter body is sent.

**Implementation.** Compiled kernels (``sd_writer``), parallel over blocks of coordinates
and independent of the thread count. The bit format lives in ``level_codec``; the
deterministic unary-mode search is ``_sd_search`` (one histogram pass per grid, equal to
:func:`_budget_round` per grid up to float64 summation order); the randomized encoder draws
its uniforms block by block from the same stream as one ``torch.rand(d)`` call.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from gradpress.codec.entropy import entropy_bits
from gradpress.compressors.base import Compressor
from gradpress.compressors.registry import register
from gradpress.kernels import sd_search as _sd
from gradpress.kernels import sd_writer as K
from gradpress.kernels.level_codec import (
    CHUNK,
    blocks,
    decode_levels,  # noqa: F401 (re-export)
    decode_values,
    encode_levels,
    trit_bits,
    write_levels,
)

#: Grid multipliers ``r`` tried by the deterministic encoder (stops at the first infeasible).
_STEPS = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.3, 2.6, 3.0, 3.5, 4.0, 5.0)


def _min_body_len(d: int, entropy: bool) -> int:
    """Lower bound on a body: the float32 scale and the mode bit, then (unary mode, the only
    one without ``entropy``) the trits; a range-coded body can be a few bytes."""
    return 5 if entropy else (33 + trit_bits(d)) // 8


def _unary_cost(d: int, k: torch.Tensor) -> int:
    return 40 + trit_bits(d) + int(k.abs().sum())


def _entropy_cost(k: torch.Tensor) -> float:
    kk = k.to("cpu", torch.int64).numpy()
    kmax = int(np.abs(kk).max()) if kk.size else 0
    counts = np.bincount(kk + kmax, minlength=2 * kmax + 1)
    model = float((2 * np.floor(np.log2(counts + 1)) + 1).sum())
    return 40 + 2 * math.log2(kmax + 1) + model + entropy_bits(kk + kmax, 2 * kmax + 1) + 64


def _dual_values(s: float, npts: int, lams: np.ndarray) -> np.ndarray:
    """``conc_v G_lambda(s) - lambda/4`` for each lambda, on ``npts`` values of ``u``."""
    us = np.linspace(0.0, max(4.0, 3.0 * math.sqrt(s) + 2.0), npts)
    ks = np.arange(0, int(us[-1]) + 2)
    v = us**2
    lo, hi = v <= s, v >= s
    den = v[hi][None, :] - v[lo][:, None]
    p = np.where(den > 0, (v[hi][None, :] - s) / np.where(den > 0, den, 1.0), 1.0)
    out = np.empty(lams.size)
    for i, lam in enumerate(lams):  # concave envelope of G_lambda at mean s
        g = (ks[None, :] + lam * (us[:, None] - ks) ** 2).min(1)
        out[i] = (p * g[lo][:, None] + (1 - p) * g[hi][None, :]).max() - lam * 0.25
    return out


@functools.lru_cache(maxsize=64)
def worst_case_levels(nu: float) -> float:
    """``W(nu)``: the largest ``sum_i k_i / d`` of the budgeted rounding at ``r = 1`` over all
    ``x`` (the dual LP in the module docstring on a grid of 2401 values of ``u``, plus a
    0.005 margin for the grid and one level of integrality; converged to 1e-3 at nu = 1/10)."""
    s = 1.0 / (4.0 * nu)  # mean of u^2; budget mean (u - k)^2 <= 1/4
    lams = np.concatenate([np.linspace(0.0, 8.0, 161), np.geomspace(8.5, 400.0, 60)])
    coarse = _dual_values(s, 601, lams)  # locate the best lambda, then refine around it
    i = int(np.argmax(coarse))
    fine = np.linspace(lams[max(0, i - 3)], lams[min(lams.size - 1, i + 3)], 25)
    best = float(max(coarse.max(), _dual_values(s, 2401, fine).max()))
    return best + 0.005


def _budget_round(u: torch.Tensor, budget: float) -> torch.Tensor | None:
    """Least-total-level rounding of ``u >= 0`` (float32) with ``sum (u - k)^2 <= budget``;
    ``None`` if no rounding fits. Exact greedy: from ``floor``, round up the largest
    fractions; the threshold is found with a 4096-bin histogram, then a sort of one bin."""
    k = torch.floor(u)
    f = u - k
    need = float((f * f).sum(dtype=torch.float64)) - budget
    if need <= 0:
        return k
    up = torch.nonzero(f > 0.5).reshape(-1)
    g = (2 * f[up] - 1).double()  # error saved by rounding each up
    if not up.numel() or float(g.sum()) < need:
        return None
    nb = 4096
    idx = torch.clamp((g * nb).long(), 0, nb - 1)
    mass = torch.bincount(idx, weights=g, minlength=nb)
    tail = torch.flip(torch.cumsum(torch.flip(mass, [0]), 0), [0])  # tail[j] = sum bins >= j
    j = int(torch.nonzero(tail >= need).max())
    above = float(tail[j + 1]) if j + 1 < nb else 0.0
    k[up[idx > j]] += 1
    inbin = torch.nonzero(idx == j).reshape(-1)
    gs, order = torch.sort(g[inbin], descending=True)
    m = int((torch.cumsum(gs, 0) < need - above).sum())  # first index reaching the need
    k[up[inbin[order[:m + 1]]]] += 1
    return k


@register
class SparseDithering(Compressor):
    """Deterministic Sparse Dithering: ``||C(x)-x||^2 <= nu ||x||^2`` (``B(1-nu)``), trits +
    unary levels; ``entropy=True`` also tries range-coded levels."""

    name = "sparse_dithering"
    compressor_id = 40
    unbiased = False
    bits_rtol = 0.45

    def __init__(self, nu: float | None = None, levels: int | None = None,
                 entropy: bool = False, max_steps: int = 10) -> None:
        if nu is not None and levels is not None:
            raise ValueError("sparse_dithering takes nu (target distortion) or levels, not both")
        if levels is None and nu is None:
            nu = 0.1
        if nu is not None and not (isinstance(nu, (int, float)) and 0 < nu < 1):
            raise ValueError(f"sparse_dithering nu must be in (0, 1), got {nu!r}")
        if levels is not None and (not isinstance(levels, int) or levels < 1):
            raise ValueError(f"sparse_dithering levels must be a positive int, got {levels!r}")
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
        self.nu = None if nu is None else float(nu)
        self.levels = levels
        self.entropy = bool(entropy)
        self.max_steps = max_steps

    def config(self) -> dict[str, Any]:
        return {"nu": self.nu, "levels": self.levels, "entropy": self.entropy,
                "max_steps": self.max_steps}

    def alpha(self, d: int) -> float:
        if self.nu is not None:
            return 1.0 - self.nu
        return max(0.0, 1.0 - d / (4.0 * self.levels**2))

    def body_bits(self, d: int) -> float:
        """Worst case: ``40 + trit_bits(d) + W d`` (``W = worst_case_levels(nu)``; with
        ``levels=L``: ``L sqrt(d) + d/2``)."""
        if d == 0:
            return 0.0
        w = (worst_case_levels(self.nu) * d if self.nu is not None
             else self.levels * math.sqrt(d) + d / 2)
        return float(40 + trit_bits(d) + w)

    def _min_body_len(self, numel: int) -> int:
        return _min_body_len(numel, self.entropy)

    def paper_bound_bits(self, d: int) -> float:
        """The paper's worst-case statement for ``nu = 1/10``: ``30 + log2 d + 3.35 d``."""
        return 30 + math.log2(d) + 3.35 * d

    def _levels(self, flat: torch.Tensor) -> tuple[float, torch.Tensor]:
        d = flat.numel()
        a = flat.abs()
        nx2 = float((flat.double() ** 2).sum())
        if nx2 == 0.0:
            return 0.0, torch.zeros(d, dtype=torch.int64, device=flat.device)
        norm = math.sqrt(nx2)
        if self.levels is not None:
            return self._scaled(flat, torch.round(a.double() * (self.levels / norm)))
        base = 2.0 * norm * math.sqrt(self.nu / d) * (1 - 1e-6)
        safe = torch.round(a.double() / base)  # r = 1, nearest: error <= d base^2/4 < budget
        best, best_cost = safe, math.inf
        for r in _STEPS[:self.max_steps]:
            # Search in float32 (u in units of the grid step); verify in float64 below.
            k = _budget_round(a / float(base * r), self.nu * nx2 / (base * r) ** 2 * (1 - 1e-5))
            if k is None:
                break
            cost = _entropy_cost(k) if self.entropy else _unary_cost(d, k)
            cost = min(cost, _unary_cost(d, k))
            if cost < best_cost:
                best, best_cost = k, cost
        scale, k = self._scaled(flat, best.double())
        if self._error(flat, scale, k) > self.nu * nx2 * (1 - 1e-7):
            scale, k = self._scaled(flat, safe)  # float32 search rounding: take the safe grid
        return scale, k

    @staticmethod
    def _scaled(flat: torch.Tensor, k: torch.Tensor) -> tuple[float, torch.Tensor]:
        a = flat.double().abs()
        k2 = float((k * k).sum())
        scale = float(np.float32(float((a * k).sum()) / k2)) if k2 > 0 else 0.0
        kk = k.to(torch.int64)
        return scale, torch.where(flat < 0, -kk, kk)

    @staticmethod
    def _error(flat: torch.Tensor, scale: float, k: torch.Tensor) -> float:
        return float(((flat.double() - scale * k.double()) ** 2).sum())

    def _encode(self, flat: torch.Tensor, gen: torch.Generator, seed: int) -> bytes:
        body = None if self.entropy or self.levels is not None else self._encode_streaming(flat)
        if body is None:
            scale, k = self._levels(flat)
            body = encode_levels(scale, k, self.entropy)
        return body

    def _encode_streaming(self, flat: torch.Tensor) -> bytes | None:
        """The unary-mode search of :meth:`_levels` in compiled passes (``_sd_search``);
        ``None`` where :meth:`_levels` must decide (zero vector, no feasible grid, levels
        beyond the float32 kernels' range, or the float32 search missing the budget)."""
        x = np.ascontiguousarray(flat.detach().to("cpu", torch.float32).numpy())
        d = x.size
        block = K.block_len(d, CHUNK)
        nx2, amax = _sd.norm2(x, block)
        if nx2 == 0.0:
            return None
        base = 2.0 * math.sqrt(nx2) * math.sqrt(self.nu / d) * (1 - 1e-6)
        if not amax / float(np.float32(base)) < _sd.MAX_U:
            return None
        grids = []
        for r in _STEPS[:self.max_steps]:
            grid = _sd.scan(x, float(base * r), self.nu * nx2 / (base * r) ** 2 * (1 - 1e-5),
                            block)
            if grid is None:
                break
            grids.append(grid)
        if not grids:
            return None
        best = min(g.bounds()[1] for g in grids)
        for g in grids:  # exact level sums where the bounds do not separate the grids
            if g.bounds()[0] <= best:
                _sd.resolve(x, g, block)
        best = min(g.bounds()[0] for g in grids)
        grid = next(g for g in grids if g.bounds()[0] == best)  # the first cheapest
        body, s_ak, s_kk = _sd.emit(x, grid, block)
        scale = float(np.float32(s_ak / s_kk)) if s_kk > 0 else 0.0
        if nx2 - 2 * scale * s_ak + scale * scale * s_kk > self.nu * nx2 * (1 - 1e-7):
            return None
        return body.finish(scale)

    def _decode(self, body: bytes, numel: int, seed: int, device: torch.device) -> torch.Tensor:
        return decode_values(body, numel, self.name).to(device)


@register
class SparseDitheringRand(Compressor):
    """Randomized Sparse Dithering: unbiased, ``omega`` given, stochastic rounding on the grid
    ``delta = 2 ||x|| sqrt(omega/d)``; trits + unary levels (``entropy=True``: range coding
    when shorter)."""

    name = "sparse_dithering_rand"
    compressor_id = 41
    unbiased = True
    bits_rtol = 0.45

    def __init__(self, omega: float = 1.0 / 9.0, entropy: bool = False) -> None:
        if not isinstance(omega, (int, float)) or not 0 < omega < 1e6:
            raise ValueError(f"sparse_dithering_rand omega must be positive, got {omega!r}")
        self.omega_ = float(omega)
        self.entropy = bool(entropy)

    def config(self) -> dict[str, Any]:
        return {"omega": self.omega_, "entropy": self.entropy}

    def omega(self, d: int) -> float:
        return self.omega_

    def body_bits(self, d: int) -> float:
        """Expected-size bound: ``40 + trit_bits(d) + d / (2 sqrt(omega))``."""
        if d == 0:
            return 0.0
        return float(40 + trit_bits(d) + d / (2 * math.sqrt(self.omega_)))

    def _min_body_len(self, numel: int) -> int:
        return _min_body_len(numel, self.entropy)

    def paper_bound_bits(self, d: int) -> float:
        """The paper's ``30 + log2 d + (log2 3 + 1/(2 sqrt omega)) d`` (in expectation)."""
        return 30 + math.log2(d) + (math.log2(3) + 1 / (2 * math.sqrt(self.omega_))) * d

    def _encode(self, flat: torch.Tensor, gen: torch.Generator, seed: int) -> bytes:
        x = np.ascontiguousarray(flat.detach().to("cpu", torch.float32).numpy())
        d = x.size
        nx2, amax = _sd.norm2(x, K.block_len(d, CHUNK))
        delta = float(np.float32(2.0 * math.sqrt(nx2) * math.sqrt(self.omega_ / d)))
        if not (delta > 0 and math.isfinite(delta)):  # zero vector (or below float32's range)
            return encode_levels(0.0, torch.zeros(d, dtype=torch.int64), self.entropy)
        top = amax / delta + 1  # bound on every level
        if not top < 2.0**53:
            raise ValueError(f"sparse_dithering_rand omega={self.omega_} is too small for this "
                             "vector: its levels would exceed 2^53")
        k = np.empty(d, dtype=np.uint8 if top < 255 else np.uint16 if top < 65535 else np.int64)
        block, n = blocks(d)
        ksum = np.zeros(n, dtype=np.int64)
        kmax = np.zeros(n, dtype=np.int64)
        cpu = flat.device.type == "cpu"
        # Uniforms block by block into one buffer: the same stream as one torch.rand(d) call
        # (another device's generator draws all d at once on its device, as before).
        rnd = torch.empty(block if cpu else d, dtype=torch.float64, device=flat.device)
        if not cpu:
            whole = rnd.uniform_(0.0, 1.0, generator=gen).cpu().numpy()
        for b in range(n):
            s, e = b * block, min(d, (b + 1) * block)
            r = rnd[:e - s].uniform_(0.0, 1.0, generator=gen).numpy() if cpu else whole[s:e]
            ksum[b], kmax[b] = K._rand_levels(x[s:e], r, delta, k[s:e])
        return write_levels(delta, k, x, self.entropy, (ksum, kmax))

    def _decode(self, body: bytes, numel: int, seed: int, device: torch.device) -> torch.Tensor:
        return decode_values(body, numel, self.name).to(device)
