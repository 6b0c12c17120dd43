"""Spherical Compression as the paper defines it (Albasyoni, Safaryan, Condat, Richtarik 2020,
arXiv 2010.03246, Sec. 4): the index of the first shared-seed point inside a cap, Golomb-Rice
coded, and the norm.

**The code.** Encoder and decoder share i.i.d. points ``x^1, x^2, ...`` uniform on the sphere
of radius ``sqrt(1 - nu)`` in ``R^d`` (drawn from the payload's seed). For ``u = x / ||x||``
the encoder sends ``||x||`` (float32) and the first index ``T`` with

    ||x^T - u||^2 <= nu     <=>     <x^T / ||x^T||, u> >= sqrt(1 - nu),

and the decoder outputs ``C(x) = ||x|| x^T``, so ``||C(x) - x||^2 <= nu ||x||^2`` for every
``x`` and seed: ``C in B(1 - nu)`` deterministically. (The paper calls the distortion
``alpha``; here it is ``nu`` as in ``sparse_dithering``, and ``alpha(d) = 1 - nu`` is the
contraction, as everywhere in gradpress.) The encoder tests against ``sqrt(1 - nu) + 1e-6``,
which keeps the float32 rounding of the norm and of the output inside the budget.

**Bits.** ``T`` is geometric with success probability ``p = P(c^2, d)`` (the cap measure of
:func:`gradpress.bounds.log2_cap_measure`, ``c = sqrt(1 - nu) + 1e-6``; note that the cap of
distortion ``nu`` is ``bounds``' ``P(1 - nu, d)``), so ``E[T] = 1/p``. ``T - 1`` is sent in a
Golomb-Rice code of parameter ``k``: ``q = (T - 1) >> k`` in unary (``q`` ones and a zero),
then the low ``k`` bits. ``k`` minimizes the exact expected length

    E bits(k) = k + 1 + s / (1 - s),      s = (1 - p)^(2^k),

which is within a few tenths of a bit of the geometric law's entropy ``~ -log2 p + log2 e``;
the body is ``32 + q + 1 + k`` bits plus padding, below the paper's ``-log2 P + 3`` for the
index. The seed (64 bits) travels in the header; the header is not part of the paper's count.

**Capped search.** The encoder tries at most ``T_max = Q 2^k`` points,
``Q = ceil(40 / (p 2^k))`` (every point misses with probability ``(1-p)^T_max <= e^-40``).
If all miss, or the norm overflows float32, it sends the escape: ``Q`` ones (no zero) and the
``d`` float32 values of ``x`` (exact). A decoder reads at most ``Q`` unary bits, so a forged
run of ones cannot make it search for ever; it regenerates only the block holding ``T``.

**Points.** Point ``t`` is row ``(t-1) mod B`` of block ``(t-1) // B``, a ``B x d`` float32
Gaussian drawn from a generator seeded with a hash of ``(seed, block)``, normalized in
float64. ``B = clamp(2^round(log2(1/(4p))), 64, 2^13)``: the encoder draws ``~1/p`` points
(``E[T]``) block by block, the decoder only the ``B`` of ``T``'s block.

**Large d.** ``E[T] = 1/p`` grows like ``(1 - nu)^(-d/2)``: at ``nu = 0.15``, ``-log2 p`` is
15.2 bits at ``d = 10``, 20.9 at 14, 43 at 30, 92 at 65. Where ``-log2 p > max_search_bits``
(default 20: ``~10^6`` points, ``~0.1 s`` of CPU per encode at ``d = 13``) the search is out of
reach and the blockwise code of :class:`~gradpress.compressors.spherical.SphericalCompression`
(``block_size``, ``bits``, ``mag_step``) is used instead, contractive in expectation over
the seed; its body layout and bit formula are that module's.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Any

import numpy as np
import torch

from gradpress.codec import BitReader, BitWriter
from gradpress.compressors.base import Compressor
from gradpress.compressors.registry import register
from gradpress.compressors.spherical import SphericalCompression
from gradpress.errors import PayloadError

#: Added to the cap's cosine so float32 rounding of the norm and output stays in budget.
MARGIN = 1e-6
#: The encoder gives up (escape code) after ``T_max`` points: miss probability ``e^-MISS_EXP``.
MISS_EXP = 40.0


@functools.lru_cache(maxsize=256)
def _log2_cap(nu: float, d: int) -> float:
    """``log2 p``: the measure of ``<v, u> >= sqrt(1 - nu) + MARGIN`` on ``S^(d-1)``."""
    from gradpress.bounds import log2_cap_measure

    c = math.sqrt(1.0 - nu) + MARGIN
    return log2_cap_measure(min(1.0, c * c), d)


def rice_expected_bits(k: int, p: float) -> float:
    """``k + 1 + s/(1-s)``, ``s = (1-p)^(2^k)``: expected Golomb-Rice bits of ``T - 1`` for
    ``T`` geometric with success probability ``p``."""
    s = math.exp((1 << k) * math.log1p(-p)) if p < 1.0 else 0.0
    return k + 1 + s / (1.0 - s)


def rice_parameter(p: float) -> int:
    """The ``k`` minimizing :func:`rice_expected_bits`."""
    return min(range(64), key=lambda k: rice_expected_bits(k, p))


@register
class SphericalCapCompression(Compressor):
    """The paper's Spherical Compression: ``||x||`` and the Golomb-Rice coded index ``T`` of
    the first shared-seed point of radius ``sqrt(1 - nu)`` within ``sqrt(nu)`` of
    ``x/||x||``; blockwise ``spherical`` where ``-log2 P > max_search_bits``."""

    name = "spherical_cap"
    compressor_id = 51
    unbiased = False
    shared_randomness = True
    #: the cap code is contractive for every seed; the large-d blockwise code in expectation
    contractive_in_expectation = True
    bits_rtol = 0.3

    def __init__(self, nu: float = 0.15, max_search_bits: float = 20.0, block_size: int = 16,
                 bits: int = 10, mag_step: float = 0.5) -> None:
        if not isinstance(nu, (int, float)) or not 1e-6 <= nu <= 0.99:
            raise ValueError(f"spherical_cap nu (distortion) must be in [1e-6, 0.99], got {nu!r}")
        if not isinstance(max_search_bits, (int, float)) or not 0 <= max_search_bits <= 30:
            raise ValueError("spherical_cap max_search_bits must be in [0, 30] (expected "
                             f"search 2^bits points), got {max_search_bits!r}")
        self.nu = float(nu)
        self.max_search_bits = float(max_search_bits)
        self.blockwise = SphericalCompression(block_size, bits, mag_step)

    def config(self) -> dict[str, Any]:
        return {"nu": self.nu, "max_search_bits": self.max_search_bits,
                **self.blockwise.config()}

    # -- which code for which d ---------------------------------------------------------
    def uses_cap(self, d: int) -> bool:
        """Whether ``d`` gets the exact cap code (``-log2 p <= max_search_bits``)."""
        return d >= 1 and -_log2_cap(self.nu, d) <= self.max_search_bits

    def cap_probability(self, d: int) -> float:
        """``p``, the chance that one shared point is inside the cap (``E[T] = 1/p``)."""
        return 2.0 ** _log2_cap(self.nu, d)

    def rice_k(self, d: int) -> int:
        return rice_parameter(self.cap_probability(d))

    def max_quotient(self, d: int) -> int:
        """``Q``: the unary part never exceeds it (``T <= Q 2^k``; ``Q`` ones: escape)."""
        p, k = self.cap_probability(d), self.rice_k(d)
        return max(1, math.ceil(MISS_EXP / (p * (1 << k))))

    def block_points(self, d: int) -> int:
        """``B``, points per shared-seed block (about ``1/(4p)``: a decoder draws ``B``)."""
        want = round(math.log2(0.25 / self.cap_probability(d)))
        return 1 << min(13, max(6, want))

    # -- declared properties ------------------------------------------------------------
    def alpha(self, d: int) -> float:
        return 1.0 - self.nu if self.uses_cap(d) else self.blockwise.alpha(d)

    def body_bits(self, d: int) -> float:
        """Cap code: ``32 + E bits(k)`` (module docstring); blockwise: ``spherical``'s."""
        if d == 0:
            return 0.0
        if not self.uses_cap(d):
            return self.blockwise.body_bits(d)
        return 32.0 + rice_expected_bits(self.rice_k(d), self.cap_probability(d))

    def paper_bound_bits(self, d: int) -> float:
        """The paper's ``32 + (-log2 P) + 3``: norm plus its bound on the index's bits."""
        return 32.0 - _log2_cap(self.nu, d) + 3.0

    def body_len_bounds(self, numel: int) -> tuple[int, int | None]:
        if not self.uses_cap(numel):
            return self.blockwise.body_len_bounds(numel)
        k, q = self.rice_k(numel), self.max_quotient(numel)
        return (33 + k + 7) // 8, (32 + q + 32 * numel + 7) // 8

    def max_payload_bytes(self, numel: int) -> int | None:
        if not self.uses_cap(numel):
            return None
        from gradpress.payload import header_size

        return header_size(1, seed=True) + self.body_len_bounds(numel)[1]

    # -- shared points ------------------------------------------------------------------
    def block(self, seed: int, block: int, d: int) -> torch.Tensor:
        """Block ``block`` of the shared Gaussians: ``(B, d)`` float32 from a generator seeded
        with a hash of ``(seed, block)``; point ``t`` is row ``(t-1) mod B`` of block
        ``(t-1) // B``, normalized (:meth:`point`)."""
        h = hashlib.blake2b(f"{int(seed)}:{int(block)}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(h, "little"))
        return torch.randn(self.block_points(d), d, generator=gen)

    def point(self, seed: int, t: int, d: int) -> torch.Tensor:
        """The unit direction of shared point ``t >= 1`` (float64; the point is it times
        ``sqrt(1 - nu)``)."""
        B = self.block_points(d)
        v = self.block(seed, (t - 1) // B, d)[(t - 1) % B].double()
        return v / v.norm().clamp_min(1e-300)

    def search(self, u: torch.Tensor, seed: int) -> int | None:
        """The first ``T`` whose point is in the cap around unit ``u`` (float64), or ``None``
        past ``T_max``. Candidates are screened in float32 (cosine within ``1e-4`` of the
        threshold), then decided in float64 in index order."""
        d = u.numel()
        B, k = self.block_points(d), self.rice_k(d)
        t_max = self.max_quotient(d) << k
        thr = math.sqrt(1.0 - self.nu) + MARGIN
        u32 = u.float()
        for b in range(-(-t_max // B)):
            v = self.block(seed, b, d)
            cand = torch.nonzero(v @ u32 >= (thr - 1e-4) * v.norm(dim=1)).reshape(-1)
            if cand.numel():
                vc = v[cand].double()
                ok = torch.nonzero(vc @ u >= thr * vc.norm(dim=1)).reshape(-1)
                if ok.numel():
                    t = b * B + int(cand[ok[0]]) + 1
                    return t if t <= t_max else None
        return None

    def read_index(self, body: bytes, d: int) -> int | None:
        """``T`` from a cap-code body (``None``: the escape code)."""
        return self._parse(body, d)[1]

    # -- the code -----------------------------------------------------------------------
    def _encode(self, flat: torch.Tensor, gen: torch.Generator, seed: int) -> bytes:
        d = flat.numel()
        if not self.uses_cap(d):
            return self.blockwise._encode(flat, gen, seed)
        x = flat.detach().to("cpu", torch.float64)
        nx = float(x.norm())
        norm = np.float32(nx) if nx <= float(np.finfo(np.float32).max) else np.float32(np.inf)
        k, q = self.rice_k(d), self.max_quotient(d)
        t = 1 if nx == 0.0 else (self.search(x / nx, seed) if np.isfinite(norm) else None)
        w = BitWriter()
        w.write_float32(norm if t is not None else np.float32(0.0))
        if t is None:  # escape: Q ones, then x exactly
            w.write_bits(np.ones(q, dtype=np.uint8))
            w.write_float32(x.float().numpy())
        else:
            w.write_bits(np.r_[np.ones((t - 1) >> k, dtype=np.uint8), np.uint8(0)])
            if k:
                w.write_uint(np.array([(t - 1) & ((1 << k) - 1)], dtype=np.uint64), k)
        return w.getvalue()

    def _parse(self, body: bytes, d: int) -> tuple[float, int | None, BitReader]:
        r = BitReader(body)
        norm = float(r.read_float32(1)[0])
        k, q = self.rice_k(d), self.max_quotient(d)
        window = r.bits_view()[:q]
        zeros = np.flatnonzero(window == 0)
        if zeros.size == 0 and window.size < q:
            raise PayloadError("spherical_cap payload truncated inside the index's unary part")
        if zeros.size == 0:
            r.skip(q)
            return norm, None, r
        r.skip(int(zeros[0]) + 1)
        low = int(r.read_uint(1, k)[0]) if k else 0
        return norm, (int(zeros[0]) << k) + low + 1, r

    def _decode(self, body: bytes, numel: int, seed: int, device: torch.device) -> torch.Tensor:
        if not self.uses_cap(numel):
            return self.blockwise._decode(body, numel, seed, device)
        norm, t, r = self._parse(body, numel)
        if t is None:
            out = torch.from_numpy(r.read_float32(numel).copy())
            r.expect_end()
            return out.to(device)
        r.expect_end()
        if not (np.isfinite(norm) and norm >= 0.0):
            raise PayloadError(f"spherical_cap payload has norm {norm}: corrupted bytes")
        v = self.point(seed, t, numel)
        return (v * (norm * math.sqrt(1.0 - self.nu))).float().to(device)
