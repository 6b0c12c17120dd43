"""PowerSGD-style rank-r compression (Vogels, Karimireddy, Jaggi, "PowerSGD: Practical
Low-Rank Gradient Compression for Distributed Optimization", NeurIPS 2019, Alg. 1).

Reshape rule. A tensor of ``n`` elements becomes a matrix ``M`` of shape

* ``(shape[0], n / shape[0])`` when it has two or more dimensions (conv kernels
  ``(out, in, kh, kw)`` -> ``(out, in*kh*kw)``, as in the paper);
* ``(m, n / m)`` for 0-d and 1-d tensors, ``m`` the largest divisor of ``n`` with
  ``m <= sqrt(n)`` (the most square factorization; a prime ``n`` gives ``(1, n)``).

If ``r (rows + cols) >= n`` the low-rank factors would not be smaller, and the tensor is sent
as raw float32 (``32 n`` bits) instead.

Compression (single worker view of Alg. 1): ``Q ~ N(0, 1)^(cols x r)`` from the seed, then
``power_iterations`` times ``P = orth(M Q)``, ``Q = M^T P``; the payload is ``P`` and ``Q`` as
float32, and ``C(M) = P Q^T``. Bits: ``32 r (rows + cols)``. Both factors travel, so the
decoder needs no seed (``shared_randomness = False``); the seed only makes ``Q``'s start
deterministic. The paper warm-starts ``Q`` from the previous step; a stateless compressor
cannot, so each call starts fresh.

Contraction: ``P P^T M`` is an orthogonal projection, so ``||C(M) - M|| <= ||M||`` always,
but there is **no worst-case** ``alpha > 0``: a start ``Q`` nearly orthogonal to ``M``'s top
right singular vectors captures an arbitrarily small share of ``||M||^2``. ``alpha``
returns ``None``; for a rank-``r`` input the result is exact (up to float rounding) whenever
the random start spans its row space, which happens with probability 1.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from gradpress.codec import BitReader, BitWriter
from gradpress.compressors.base import Compressor, check_decoded, check_gradient, generator_for
from gradpress.compressors.registry import register
from gradpress.errors import PayloadError
from gradpress.payload import Payload


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``(rows, cols)`` view PowerSGD compresses (see the module docstring)."""
    n = math.prod(shape)
    if len(shape) >= 2:
        return (shape[0], n // shape[0]) if shape[0] else (0, 0)
    if n == 0:
        return (0, 0)
    m = math.isqrt(n)
    while n % m:
        m -= 1
    return (m, n // m)


@register
class PowerSGD(Compressor):
    """Rank-``r`` approximation ``P Q^T`` by ``power_iterations`` of subspace iteration."""

    name = "powersgd"
    compressor_id = 35
    unbiased = False

    def __init__(self, rank: int = 1, power_iterations: int = 1) -> None:
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"powersgd rank must be a positive int, got {rank!r}")
        if not isinstance(power_iterations, int) or power_iterations < 1:
            raise ValueError(f"powersgd power_iterations must be >= 1, got {power_iterations!r}")
        self.rank = rank
        self.power_iterations = power_iterations

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank, "power_iterations": self.power_iterations}

    def alpha(self, d: int) -> float | None:
        return None  # no worst-case contraction guarantee (module docstring)

    def is_raw(self, shape: tuple[int, ...]) -> bool:
        rows, cols = matrix_shape(shape)
        return self.rank * (rows + cols) >= rows * cols

    def body_bits(self, d: int, shape: tuple[int, ...] | None = None) -> float:
        shape = (d,) if shape is None else shape
        if self.is_raw(shape):
            return 32.0 * d
        rows, cols = matrix_shape(shape)
        return 32.0 * self.rank * (rows + cols)

    def expected_bits(self, d: int, shape: tuple[int, ...] | None = None) -> float:
        return super().expected_bits(d, shape) - self.body_bits(d) + self.body_bits(d, shape)

    # The reshape needs the shape, which the base class's flat hooks do not see.
    def encode(self, x: torch.Tensor, *, seed: int = 0) -> Payload:
        flat = check_gradient(x)
        shape = tuple(x.shape)
        body = b""
        if flat.numel():
            w = BitWriter()
            if self.is_raw(shape):
                w.write_float32(flat.cpu().numpy())
            else:
                p, q = self._factors(flat.view(matrix_shape(shape)), seed)
                w.write_float32(p.cpu().numpy())
                w.write_float32(q.cpu().numpy())
            body = w.getvalue()
        return Payload(self.compressor_id, x.dtype, shape, body,
                       config_digest=self.config_digest(shape))

    def _factors(self, m: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = generator_for(seed, "cpu")
        q = torch.randn(m.shape[1], self.rank, generator=g).to(m.device)
        for _ in range(self.power_iterations):
            p = torch.linalg.qr(m @ q).Q
            q = m.T @ p
        if not bool(torch.isfinite(q).all()):
            raise ValueError("powersgd factors overflow float32; scale the gradient down")
        return p, q

    def decode(self, payload: Payload | bytes, *, device: torch.device | str = "cpu"
               ) -> torch.Tensor:
        payload = self._own_payload(payload)
        n, shape = payload.numel, payload.shape
        if n == 0:
            if payload.body:
                raise PayloadError("payload of an empty tensor has a non-empty body")
            return torch.zeros(shape, device=device, dtype=payload.dtype)
        want = math.ceil(self.body_bits(n, shape) / 8)
        if len(payload.body) != want:
            raise PayloadError(f"powersgd body has {len(payload.body)} bytes, a {shape} "
                               f"payload has {want}: truncated, extended, or a lying shape")
        r = BitReader(payload.body)
        if self.is_raw(shape):
            out = torch.from_numpy(self._finite(r.read_float32(n))).to(device)
        else:
            rows, cols = matrix_shape(shape)
            p = torch.from_numpy(self._finite(r.read_float32(rows * self.rank)))
            q = torch.from_numpy(self._finite(r.read_float32(cols * self.rank)))
            out = (p.view(rows, self.rank).to(device) @ q.view(cols, self.rank).to(device).T)
        r.expect_end()
        # Rejects factors that multiply to non-finite values; saturates to fp16's range.
        return check_decoded(out.reshape(-1), payload.dtype).reshape(shape).to(payload.dtype)

    @staticmethod
    def _finite(v: np.ndarray) -> np.ndarray:
        if not np.isfinite(v).all():
            raise PayloadError("powersgd payload holds non-finite values")
        return v

    def _encode(self, flat: torch.Tensor, gen: torch.Generator, seed: int) -> bytes:
        raise NotImplementedError("PowerSGD overrides encode (it needs the shape)")

    def _decode(self, body: bytes, numel: int, seed: int, device: torch.device) -> torch.Tensor:
        raise NotImplementedError("PowerSGD overrides decode (it needs the shape)")
