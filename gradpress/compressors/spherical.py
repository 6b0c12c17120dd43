"""Spherical Compression (Albasyoni, Safaryan, Condat, Richtarik 2020, arXiv 2010.03246, Sec. 4):
send the index of the code word nearest to ``x`` in a random code book shared through the seed.

This is the blockwise form for large ``d``. The paper's own definition (the first shared-seed
point inside the cap around ``x/||x||``, Golomb-Rice coded, plus the norm) is
``spherical_cap`` (:mod:`gradpress.compressors.spherical_cap`), which uses this code where
its search is out of reach (``d >= 14`` at distortion 0.15).

For a code book of ``N = 2^b`` directions drawn uniformly on the sphere, the encoder sends the
index of ``argmax_j <x, u_j>`` and the decoder outputs ``<x, u_j> u_j``; for every ``x``,
``E||C(x) - x||^2 = (1 - alpha_rand(b, n)) ||x||^2`` with
``alpha_rand = E[max_j <e, u_j>_+^2]`` (:func:`gradpress.bounds.random_code_alpha`), within a
bit of the average-case bound ``b_avg(alpha, n)`` (random coding).

**Blockwise (derived for practicality).** A code book of ``2^b`` points in ``R^d`` is out of
reach, so ``x`` is cut into blocks of ``n`` coordinates (the last one zero-padded). All blocks
share one code book ``{+-v_j}`` of ``2^(b-1)`` i.i.d. Gaussian directions in ``R^n`` drawn from
the payload's seed. The code book's law is rotation invariant, so for every fixed block ``x_i``
(zero-padded or not) ``E||C(x)_i - x_i||^2 = (1 - alpha_rand(b, n)) ||x_i||^2`` and, by
linearity of expectation, the same holds for the whole vector even though the blocks share the
code book (their errors are correlated; the mean is exact). Cutting the padding only lowers the
error. The block's gain ``m_i = max_j |<R_i^T x_i, v_j>|`` is sent on
a log2 grid of step ``s`` (``mag_step``): ``m^ = 2^(s round(log2(m)/s))``, relative error at most
``eps = 2^(s/2) - 1``. Since ``||x_i - m^ u||^2 = ||x_i||^2 - m^2 + (m^ - m)^2``,

    E||C(x) - x||^2 <= (1 - (1 - eps^2) alpha_rand(b, n)) ||x||^2,

the declared ``alpha`` (in expectation over the shared seed). Blocks with ``||x_i||`` below
``2^-40 max ||x_i||`` are sent as zero.

**Bits.** ``32`` (int32 offset of the gain grid) + the gain symbols range-coded with their own
histogram (``codec.entropy``; zero blocks are symbol 0) + ``b`` bits (``b - 1`` index and one
sign) per non-zero block + padding; the seed (64 bits) travels in the header. ``body_bits``
uses ``GAIN_BITS = 1.5`` bits per block for the gains (measured 1.3-1.5 on Gaussian data at
``s = 1/2``). Against the bound: the ``b`` index bits per block sit within a bit of
``b_avg(alpha_rand, n)`` (tests), the gains add about ``1.5/n`` bits per coordinate.
Defaults: ``block_size=16, bits=10`` (``2^9 x 16`` code book: 32 multiply-adds per coordinate).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from gradpress.codec import BitReader, BitWriter, read_categorical, write_categorical
from gradpress.codec.entropy import MAX_ALPHABET
from gradpress.compressors.base import Compressor, generator_for
from gradpress.compressors.registry import register
from gradpress.errors import PayloadError
from gradpress.kernels.fields import FieldReader, pack_fields

#: Range of block gains kept (below ``2^-DYNAMIC_RANGE`` of the largest: zero).
DYNAMIC_RANGE = 40
#: Expected range-coded bits per block gain (formula for ``body_bits``).
GAIN_BITS = 1.5
#: Blocks scored per matmul (bounds the ``blocks x 2^(b-1)`` score matrix).
_CHUNK = 1024


@functools.lru_cache(maxsize=32)
def _random_code_alpha(bits: int, n: int) -> float:
    from gradpress.bounds import random_code_alpha

    return random_code_alpha(bits, n)


@register
class SphericalCompression(Compressor):
    """Blockwise Spherical Compression: per block of ``block_size`` coordinates, ``bits`` bits
    of code-word index (shared random code book) and a range-coded log-gain."""

    name = "spherical"
    compressor_id = 50
    unbiased = False
    shared_randomness = True
    contractive_in_expectation = True
    bits_rtol = 0.3

    def __init__(self, block_size: int = 16, bits: int = 10, mag_step: float = 0.5) -> None:
        if not isinstance(block_size, int) or not 1 <= block_size <= 256:
            raise ValueError(f"spherical block_size must be an int in 1..256, got {block_size!r}")
        if not isinstance(bits, int) or not 1 <= bits <= 20:
            raise ValueError(f"spherical bits must be an int in 1..20, got {bits!r}")
        if not isinstance(mag_step, (int, float)) or not 1 / 64 <= mag_step <= 2:
            raise ValueError(f"spherical mag_step must be in [1/64, 2], got {mag_step!r}")
        self.block_size = block_size
        self.bits = bits
        self.mag_step = float(mag_step)

    def config(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "bits": self.bits, "mag_step": self.mag_step}

    def alpha(self, d: int) -> float:
        eps = 2.0 ** (self.mag_step / 2) - 1.0
        return (1.0 - eps * eps) * _random_code_alpha(self.bits, self.block_size)

    def body_bits(self, d: int) -> float:
        if d == 0:
            return 0.0
        nb = -(-d // self.block_size)
        return float(32 + 40 + nb * (self.bits + GAIN_BITS))

    def _min_body_len(self, numel: int) -> int:
        """The 32-bit gain offset; the range-coded gains of all-zero blocks can be tiny."""
        return 4

    # -- shared randomness --------------------------------------------------------------
    def codebook(self, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The ``2^(b-1) x n`` unit directions ``v_j`` drawn from ``seed`` (float32)."""
        gen = generator_for(seed)
        v = torch.randn(1 << (self.bits - 1), self.block_size, generator=gen,
                        dtype=torch.float64)
        return (v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)).float().to(device)

    def _blocks(self, flat: torch.Tensor) -> torch.Tensor:
        n = self.block_size
        nb = -(-flat.numel() // n)
        pad = nb * n - flat.numel()
        return torch.nn.functional.pad(flat, (0, pad)).view(nb, n)

    def _encode(self, flat: torch.Tensor, gen: torch.Generator, seed: int) -> bytes:
        xb = self._blocks(flat)
        nb = xb.shape[0]
        v = self.codebook(seed, flat.device)
        vt = v.T.contiguous()
        norms = torch.empty(nb, dtype=torch.float64, device=flat.device)
        val = torch.empty(nb, dtype=torch.float64, device=flat.device)
        idx = torch.empty(nb, dtype=torch.int64, device=flat.device)
        step = _CHUNK if flat.device.type == "cpu" else nb
        for s in range(0, nb, step):
            # (chunk, 2^(b-1)) scores: the row-wise max is a contiguous reduction (argmax
            # along the other axis is strided, 2-4x slower); max() keeps the first maximum.
            xc = xb[s:s + step]
            j = torch.mm(xc, vt).abs_().max(dim=1).indices
            xd = xc.double()
            idx[s:s + step] = j
            norms[s:s + step] = xd.norm(dim=1)
            val[s:s + step] = (xd * v[j].double()).sum(dim=1)  # signed gain of the chosen pair
        top = float(norms.max())
        gain = val.abs()
        idx = idx * 2 + (val < 0).long()
        keep = (norms > top * 2.0**-DYNAMIC_RANGE) & (gain > 0)
        step = self.mag_step
        qlog = torch.zeros(nb, dtype=torch.int64, device=flat.device)
        qlog[keep] = torch.round(torch.log2(gain[keep]) / step).long()
        if bool(keep.any()):
            qmax = int(qlog[keep].max())
            keep &= qlog >= qmax - int(math.ceil(DYNAMIC_RANGE / step))
            qmin = int(qlog[keep].min())
        else:
            qmin = 0
        sym = torch.where(keep, qlog - qmin + 1, torch.zeros_like(qlog)).cpu().numpy()
        w = BitWriter()
        w.write_uint(np.array([qmin + (1 << 31)], dtype=np.uint64), 32)
        write_categorical(w, sym, int(sym.max()) + 1)
        head = w.nbits
        packed = np.frombuffer(w.getvalue(), dtype=np.uint8)
        ids = idx[keep].cpu().numpy()
        whole, rest = divmod(head, 8)
        values = [packed[:whole], packed[whole:whole + 1] >> (8 - rest), ids]
        widths = [np.full(whole, 8), np.full(1 if rest else 0, rest), np.full(ids.size, self.bits)]
        values[1] = values[1][:1 if rest else 0]
        return pack_fields(values, widths)[0].tobytes()

    def _decode(self, body: bytes, numel: int, seed: int, device: torch.device) -> torch.Tensor:
        n = self.block_size
        nb = -(-numel // n)
        r = BitReader(body)
        qmin = int(r.read_uint(1, 32)[0]) - (1 << 31)
        sym = read_categorical(r, nb)
        if sym.size and int(sym.max()) > min(MAX_ALPHABET, 2 + DYNAMIC_RANGE / self.mag_step):
            raise PayloadError("spherical payload has a gain outside the dynamic range")
        keep = sym > 0
        nk = int(keep.sum())
        fr = FieldReader(body, start=r.pos)
        idx = fr.fixed(nk, self.bits, "spherical code-word indices").astype(np.int64)
        fr.expect_end("spherical payload body")
        logm = (sym[keep] - 1 + qmin) * self.mag_step
        if keep.any() and (logm.max() > 128 or logm.min() < -160):
            raise PayloadError("spherical payload has a gain outside float32's range")
        v = self.codebook(seed).double()
        kept = torch.from_numpy(np.flatnonzero(keep))
        j = torch.from_numpy(idx)
        coef = torch.from_numpy(np.exp2(logm)) * (1.0 - 2.0 * (j % 2).double())
        j = j // 2
        blocks = torch.zeros(nb, n, dtype=torch.float32)
        step = _CHUNK * 4
        for s in range(0, nk, step):  # float64 products, rounded once, chunk by chunk
            blocks[kept[s:s + step]] = (v[j[s:s + step]] * coef[s:s + step, None]).float()
        return blocks.reshape(-1)[:numel].to(device)
