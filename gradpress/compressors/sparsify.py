"""Sparsifiers: top-k and rand-k.

**top-k** (Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018, Def. 2.1;
Alistarh et al. 2018): keep the ``k`` largest-magnitude coordinates. Deterministic and
contractive, ``||C(x) - x||^2 <= (1 - k/d) ||x||^2``, so ``alpha = k/d`` (times ``1 - u^2``,
``u = 2^-11``, with float16 values). Bits: the values (``32k`` or ``16k``), one flag bit, then
the sorted indices either in fixed width ``ceil(log2 d)`` each or as Elias-gamma gaps
(``sum(2 floor(log2 gap) + 1)``), whichever is smaller for this payload.
``expected_bits`` uses ``k * min(ceil(log2 d), 2 log2(d/k) + 1)`` for the indices, the gamma
cost of evenly spread gaps; the measured size is within ``bits_rtol`` of it on Gaussian
vectors.

**rand-k** (Stich et al. 2018; Beznosikov et al. 2020, "On Biased Compression", Def. 3): keep
``k`` coordinates chosen uniformly at random, scaled by ``d/k``. Unbiased with ``omega = d/k
- 1``. The indices come from the shared seed (``shared_randomness``: the 8-byte seed in the
header replaces ``k log2 d`` index bits), so the body is the ``k`` values only: ``32k`` bits.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from gradpress.codec import BitReader, BitWriter
from gradpress.compressors.base import Compressor, generator_for
from gradpress.compressors.registry import register
from gradpress.errors import PayloadError
from gradpress.kernels import fields
from gradpress.kernels import quantize as fc
from gradpress.payload import header_size

_FP16_U = 2.0**-11


class _Sparsifier(Compressor):
    def __init__(self, k: int | None, ratio: float | None, values: str) -> None:
        if k is None and ratio is None:
            ratio = 0.01
        if k is not None and ratio is not None:
            raise ValueError(f"{self.name}: give k or ratio, not both")
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ValueError(f"{self.name}: k must be a positive int, got {k!r}")
        if ratio is not None and not 0 < ratio <= 1:
            raise ValueError(f"{self.name}: ratio must be in (0, 1], got {ratio!r}")
        if values not in ("fp32", "fp16"):
            raise ValueError(f"{self.name}: values must be 'fp32' or 'fp16', got {values!r}")
        self.k, self.ratio, self.values = k, ratio, values
        self.value_bits = 32 if values == "fp32" else 16

    def k_for(self, d: int) -> int:
        """Coordinates kept in dimension ``d``: ``min(k, d)`` or ``max(1, ceil(ratio d))``."""
        if d == 0:
            return 0
        return min(self.k, d) if self.k is not None else min(d, max(1, math.ceil(self.ratio * d)))

    def config(self) -> dict[str, Any]:
        return {"k": self.k, "ratio": self.ratio, "values": self.values}

    def _write_values(self, w: BitWriter, v: torch.Tensor) -> None:
        arr = v.cpu().numpy()
        if self.values == "fp16":
            if arr.size and float(np.abs(arr).max()) > 65504:
                raise ValueError("top-k/rand-k values exceed the float16 range; use "
                                 "values='fp32'")
            w.write_float16(arr)
        else:
            w.write_float32(arr)

    def _read_values(self, r: BitReader, k: int) -> np.ndarray:
        v = (r.read_float16(k) if self.values == "fp16" else r.read_float32(k)).astype(
            np.float32)
        if not np.isfinite(v).all():
            raise PayloadError(f"{self.name} payload holds non-finite values")
        return v


def _index_width(d: int) -> int:
    return max(1, (d - 1).bit_length())


def _top_indices(flat: torch.Tensor, k: int) -> np.ndarray:
    """Indices (ascending, ``int64`` numpy) of ``k`` largest ``|x|``. On CPU a threshold from
    a strided sample picks candidates chunk by chunk first; if fewer than ``k`` pass, a full
    ``topk`` decides."""
    n = flat.numel()
    if flat.device.type == "cpu" and k * 64 < n and n > 1 << 16:
        stride = max(1, n // (1 << 16))
        sample = flat[::stride].abs()
        q = max(0, sample.numel() - 1 - 2 * (k * sample.numel() // n) - 16)
        t = float(torch.kthvalue(sample, q + 1).values)
        step = fc.CHUNK
        buf, hit = torch.empty(step), torch.empty(step, dtype=torch.bool)
        parts = []
        for i in range(0, n, step):
            m = min(step, n - i)
            torch.abs(flat[i:i + m], out=buf[:m])
            torch.ge(buf[:m], t, out=hit[:m])
            parts.append(np.flatnonzero(hit[:m].numpy()) + i)
        cand = np.concatenate(parts)
        if cand.size >= k:
            c_t = torch.from_numpy(cand)
            sel = torch.topk(flat[c_t].abs(), k, sorted=False).indices.numpy()
            return np.sort(cand[sel])
    return np.sort(torch.topk(flat.abs(), k, sorted=False).indices.cpu().numpy())


@register
class TopK(_Sparsifier):
    """Top-k by magnitude; indices fixed-width or Elias-gamma gaps; ``alpha = k/d``."""

    name = "topk"
    compressor_id = 30
    bits_rtol = 0.15  # measured on Gaussians: 0-6% under (fp32 values), 0-9% (fp16)

    def __init__(self, k: int | None = None, ratio: float | None = None,
                 values: str = "fp32") -> None:
        super().__init__(k, ratio, values)

    def alpha(self, d: int) -> float:
        a = self.k_for(d) / d if d else 1.0
        return a * (1 - _FP16_U**2) if self.values == "fp16" else a

    def body_bits(self, d: int) -> float:
        k = self.k_for(d)
        if k == 0:
            return 0.0
        idx = k * min(_index_width(d), 2 * math.log2(d / k) + 1)
        return float(self.value_bits * k + 1 + idx)

    def _min_body_len(self, numel: int) -> int:
        """The ``k`` values, the index-code flag and at least one bit an index."""
        k = self.k_for(numel)
        return (self.value_bits * k + 1 + k) // 8 if k else 0

    def max_payload_bytes(self, numel: int) -> int:
        """The encoder sends the smaller of its two index codes, so the fixed-width one is
        the ceiling."""
        k = self.k_for(numel)
        body = self.value_bits * k + 1 + k * _index_width(numel) if k else 0
        return header_size(1) + math.ceil(body / 8)

    def _encode(self, flat: torch.Tensor, gen: torch.Generator, seed: int) -> bytes:
        n = flat.numel()
        k = self.k_for(n)
        idx_np = _top_indices(flat, k)
        w = BitWriter()
        self._write_values(w, flat[torch.from_numpy(idx_np).to(flat.device)])
        gaps = np.diff(idx_np, prepend=-1)
        width = _index_width(n)
        if fields.gamma_bits(gaps) < k * width:
            w.write_uint(1, 1)
            gv, gw = fields.gamma_fields(gaps)
            packed, nbits = fields.pack_fields(gv, gw)
            w.write_bits(np.unpackbits(packed)[:nbits])
        else:
            w.write_uint(0, 1)
            w.write_uint(idx_np, width)
        return w.getvalue()

    def _decode(self, body: bytes, numel: int, seed: int, device: torch.device) -> torch.Tensor:
        k = self.k_for(numel)
        r = BitReader(body)
        vals = self._read_values(r, k)
        (gamma,) = r.read_uint(1, 1)
        if gamma:
            fr = fields.FieldReader(body, r.pos)
            idx = np.cumsum(fr.gamma(k, "index gaps").astype(np.int64)) - 1
            fr.expect_end("topk payload body")
        else:
            idx = r.read_uint(k, _index_width(numel)).astype(np.int64)
            r.expect_end()
            if k > 1 and not (np.diff(idx) > 0).all():
                raise PayloadError("topk payload indices are not strictly increasing")
        if k and int(idx[-1]) >= numel:
            raise PayloadError(f"topk payload index {int(idx[-1])} out of range {numel}")
        out = torch.zeros(numel, device=device)
        out[torch.from_numpy(idx).to(device)] = torch.from_numpy(vals).to(device)
        return out


def shared_indices(n: int, k: int, seed: int) -> torch.Tensor:
    """``k`` distinct indices of ``range(n)``, a uniformly random subset, from ``seed`` alone
    (CPU generator, so every device agrees). For ``k << n``: the first ``k`` distinct values
    of an i.i.d. uniform stream, drawn in batches; otherwise a random permutation."""
    g = generator_for(seed, "cpu")
    if 8 * k > n:
        return torch.randperm(n, generator=g)[:k]
    chosen = np.zeros(0, dtype=np.int64)
    while chosen.size < k:
        need = k - chosen.size
        draw = torch.randint(0, n, (need + need // 8 + 16,), generator=g).numpy()
        vals, first = np.unique(draw, return_index=True)
        fresh = ~np.isin(vals, chosen)
        order = np.argsort(first[fresh], kind="stable")
        chosen = np.concatenate([chosen, vals[fresh][order][:need]])
    return torch.from_numpy(chosen)


@register
class RandK(_Sparsifier):
    """Rand-k scaled by ``d/k``: unbiased, ``omega = d/k - 1``; indices from the shared seed."""

    name = "randk"
    compressor_id = 31
    unbiased = True
    shared_randomness = True

    def __init__(self, k: int | None = None, ratio: float | None = None,
                 values: str = "fp32") -> None:
        super().__init__(k, ratio, values)

    def omega(self, d: int) -> float:
        return d / self.k_for(d) - 1 if d else 0.0

    def body_bits(self, d: int) -> float:
        return float(self.value_bits * self.k_for(d))

    def _encode(self, flat: torch.Tensor, gen: torch.Generator, seed: int) -> bytes:
        n = flat.numel()
        idx = shared_indices(n, self.k_for(n), seed).to(flat.device)
        w = BitWriter()
        self._write_values(w, flat[idx])
        return w.getvalue()

    def _decode(self, body: bytes, numel: int, seed: int, device: torch.device) -> torch.Tensor:
        k = self.k_for(numel)
        r = BitReader(body)
        vals = self._read_values(r, k).astype(np.float64) * (numel / k)
        r.expect_end()
        if vals.size and float(np.abs(vals).max()) > float(np.finfo(np.float32).max):
            raise PayloadError("randk payload values overflow when scaled by d/k")
        out = torch.zeros(numel, device=device)
        out[shared_indices(numel, k, seed).to(device)] = torch.from_numpy(
            vals.astype(np.float32)).to(device)
        return out
