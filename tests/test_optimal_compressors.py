"""Sparse Dithering and Spherical Compression (Albasyoni et al. 2020) on real payloads: the
paper's bit bounds, the distortion guarantees, the codec, and the distance to the bounds.

Accounting: the paper counts the message (norm + code). Our ``Payload.body`` is that message;
the payload header (18 bytes for a 1-D tensor, +8 for a seed) is framing that the paper's
setting (``d`` known to both sides) does not send, so bounds are checked on ``8*len(body)``
and the header is added explicitly where the total is checked.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradpress
from gradpress import bounds as B
from gradpress.commands.bounds import gradient_vectors
from gradpress.compressors import sparse_dithering as sdm
from gradpress.compressors.base import generator_for
from gradpress.kernels import level_codec as lvl
from gradpress.payload import Payload, header_size


def _paper_deterministic(d: int) -> float:
    return 30 + math.log2(d) + 3.35 * d


def _paper_randomized(d: int, omega: float) -> float:
    return 30 + math.log2(d) + (math.log2(3) + 1 / (2 * math.sqrt(omega))) * d


def _real_vectors(d: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(d)
    gauss = torch.randn(d, generator=g)
    spiky = torch.randn(d, generator=g) * 0.01
    spiky[d // 3] = 10.0
    sparse = torch.where(torch.rand(d, generator=g) < 0.9, 0.0, torch.randn(d, generator=g))
    heavy = torch.distributions.StudentT(2.0).sample((d,))
    return [gauss, spiky, sparse, heavy, *gradient_vectors(d, 2, seed=0)]


def _adversarial(d: int, nu: float) -> list[torch.Tensor]:
    """Two-level vectors on the r = 1 grid with fractions just past 1/2 (every coordinate
    rounds up at nearest rounding): the regime of the worst case of ``sum k``."""
    out, g = [], torch.Generator().manual_seed(7)
    target = 1.0 / (4.0 * nu)  # mean u^2 on the grid delta = 2 ||x|| sqrt(nu/d)
    for u1 in (0.51, 1.02, 1.51, 2.01):
        for u2 in (0.51, 1.51, 2.51, 3.51, 5.51):
            if not min(u1, u2) ** 2 <= target <= max(u1, u2) ** 2 or u1 == u2:
                continue
            p = (u2**2 - target) / (u2**2 - u1**2)
            n1 = int(round(p * d))
            u = torch.cat([torch.full((n1,), u1), torch.full((d - n1,), u2)])
            sign = torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
            out.append(u[torch.randperm(d, generator=g)] * sign)
    out.append(torch.ones(d))  # equal magnitudes
    return out


def _err(c, x: torch.Tensor, seed: int = 0) -> float:
    y = c.decode(Payload.from_bytes(c.encode(x, seed=seed).to_bytes()))
    return float(((y.double() - x.double()) ** 2).sum())


# -- Sparse Dithering, deterministic ---------------------------------------------------------
@pytest.mark.parametrize("d", [100, 1000, 10_000])
def test_deterministic_sparse_dithering_meets_paper_bit_bound_on_real_payloads(d):
    c = gradpress.get("sparse_dithering", nu=0.1)
    for x in _real_vectors(d) + _adversarial(d, 0.1):
        p = c.encode(x)
        body = 8 * len(p.body)
        assert body <= _paper_deterministic(d), (body, _paper_deterministic(d))
        assert body <= c.body_bits(d)  # our own worst case, 40 + trit_bits + W(nu) d
        assert 8 * len(p.to_bytes()) == body + 8 * header_size(1)


def test_worst_case_level_sum_sits_inside_the_paper_constant():
    w = sdm.worst_case_levels(0.1)
    assert 1.55 <= w <= 1.57  # LP value 1.56
    assert 46 / 29 + w <= 3.35 - 0.2
    # monotone: less distortion needs more levels
    assert sdm.worst_case_levels(0.3) < w < sdm.worst_case_levels(0.03)
    # no adversarial vector beats the LP at r = 1 (nearest-rounding grid, budgeted)
    d = 4000
    for x in _adversarial(d, 0.1):
        a = x.abs()
        base = 2.0 * float(x.norm()) * math.sqrt(0.1 / d)
        k = sdm._budget_round(a / base, 0.1 * float((x * x).sum()) / base**2)
        assert k is not None and float(k.sum()) / d <= w


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), nu=st.sampled_from([0.01, 0.1, 0.3, 0.7]),
       d=st.integers(1, 3000), kind=st.integers(0, 3))
def test_deterministic_sparse_dithering_error_never_exceeds_nu(seed, nu, d, kind):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(d, generator=g), torch.rand(d, generator=g),
         torch.distributions.StudentT(1.5).sample((d,)),
         torch.where(torch.rand(d, generator=g) < 0.95, 0.0, 1.0)][kind]
    c = gradpress.get("sparse_dithering", nu=nu, entropy=bool(seed % 2))
    assert _err(c, x) <= nu * float((x.double() ** 2).sum()) * (1 + 1e-6) + 1e-30


def test_levels_mode_meets_its_declared_alpha():
    c = gradpress.get("sparse_dithering", levels=64)
    d = 1000
    assert c.alpha(d) == pytest.approx(1 - d / (4 * 64**2))
    for x in _real_vectors(d):
        assert _err(c, x) <= (1 - c.alpha(d)) * float((x.double() ** 2).sum()) * (1 + 1e-6)
    with pytest.raises(ValueError):
        gradpress.get("sparse_dithering", nu=0.1, levels=4)
    with pytest.raises(ValueError):
        gradpress.get("sparse_dithering", nu=1.5)


def test_entropy_coding_is_never_longer_and_reaches_within_a_bit_of_the_bound():
    d = 10_000
    x = torch.randn(d, generator=torch.Generator().manual_seed(3))
    plain = gradpress.get("sparse_dithering", nu=0.1)
    ent = gradpress.get("sparse_dithering", nu=0.1, entropy=True)
    assert len(ent.encode(x).body) <= len(plain.encode(x).body)
    m = B.measure(ent, [x])
    gap = B.gap_to_bound(m)
    # Goal of the issue: within 1.0 bit/coordinate of the worst-case bound at the same
    # distortion (the paper's Sparse Dithering: 1.69). Measured ~0.3.
    assert 0.0 < gap < 1.0, gap
    assert B.gap_to_bound(B.measure(plain, [x])) < 1.69


# -- Sparse Dithering, randomized -------------------------------------------------------
@pytest.mark.parametrize("omega", [1.0 / 9, 1.0, 4.0])
def test_randomized_sparse_dithering_meets_paper_bound_in_expectation(omega):
    d, seeds = 2000, range(12)
    c = gradpress.get("sparse_dithering_rand", omega=omega)
    for x in _real_vectors(d):
        mean = np.mean([8 * len(c.encode(x, seed=s).body) for s in seeds])
        assert mean <= _paper_randomized(d, omega), (mean, _paper_randomized(d, omega))
    # Equal magnitudes make ||x||_1 = sqrt(d)||x||_2, the Cauchy-Schwarz worst case: E sum k
    # hits d/(2 sqrt omega) exactly, and our framing (float32 + mode bit + padding, 46 bits
    # per 29 trits) is what separates us from the paper's constant: the body stays within our
    # stated bound 40 + trit_bits(d) + d/(2 sqrt omega), up to sampling noise.
    x = torch.ones(d)
    bits = [8 * len(c.encode(x, seed=s).body) for s in range(40)]
    noise = 4 * math.sqrt(d / 4 / 40)
    assert np.mean(bits) <= c.body_bits(d) + noise


def test_randomized_unary_length_is_l1_over_delta():
    d, omega = 5000, 0.5
    x = torch.randn(d, generator=torch.Generator().manual_seed(5))
    c = gradpress.get("sparse_dithering_rand", omega=omega)
    delta = 2 * float(x.norm()) * math.sqrt(omega / d)
    sums = []
    for s in range(30):
        y = c.decode(c.encode(x, seed=s))
        sums.append(float((y.abs() / delta).round().sum()))
    assert np.mean(sums) == pytest.approx(float(x.abs().sum()) / delta, rel=0.01)


@settings(max_examples=40, deadline=None)
@given(levels=st.lists(st.integers(-40, 40), min_size=1, max_size=300),
       entropy=st.booleans(), scale=st.floats(0, 1e6))
def test_level_codec_round_trips(levels, entropy, scale):
    k = torch.tensor(levels, dtype=torch.int64)
    body = sdm.encode_levels(scale, k, entropy)
    s2, k2 = sdm.decode_levels(body, len(levels), "test")
    assert s2 == pytest.approx(float(np.float32(scale)))
    assert k2.tolist() == levels
    if not entropy:
        nz = int((k != 0).sum())
        assert 8 * len(body) - (33 + sdm.trit_bits(len(levels)) + int(k.abs().sum())) in range(8)
        assert nz <= len(levels)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), nu=st.sampled_from([0.01, 0.1, 0.3]),
       d=st.integers(1, 700), kind=st.integers(0, 2))
def test_sparse_dithering_streaming_search_equals_the_one_shot_reference(seed, nu, d, kind):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(d, generator=g), torch.rand(d, generator=g) + 0.01,
         torch.randn(d, generator=g) ** 3][kind]
    c = gradpress.get("sparse_dithering", nu=nu)
    with pytest.MonkeyPatch.context() as mp:  # many chunks on a small vector
        mp.setattr(sdm, "CHUNK", 29 * 3)
        mp.setattr(lvl, "CHUNK", 29 * 2)
        streamed = c._encode_streaming(x)
        assert streamed == sdm.encode_levels(*c._levels(x), False)
        assert torch.equal(c.decode(c.encode(x)), c._decode(streamed, d, 0, x.device))


def test_sparse_dithering_rand_chunked_encoder_equals_one_shot_rounding():
    d, omega, seed = 1000, 0.5, 3
    x = torch.randn(d, generator=torch.Generator().manual_seed(9)) * 3
    c = gradpress.get("sparse_dithering_rand", omega=omega)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sdm, "CHUNK", 29 * 4)
        mp.setattr(lvl, "CHUNK", 29 * 5)
        body = c.encode(x, seed=seed).body
        y = c.decode(c.encode(x, seed=seed))
    a = x.double().abs()
    delta = float(np.float32(2 * float(a.norm()) * math.sqrt(omega / d)))
    u = a / delta
    k = torch.floor(u)
    k = (k + (torch.rand(d, generator=generator_for(seed), dtype=torch.float64) < u - k)).long()
    k = torch.where(x < 0, -k, k)
    assert body == sdm.encode_levels(delta, k, False)
    assert torch.equal(y, (k.double() * delta).float())


# -- Spherical Compression ------------------------------------------------------------------
def test_spherical_index_bits_sit_within_a_bit_of_the_average_case_bound():
    n, bits, d = 16, 10, 16 * 2000
    c = gradpress.get("spherical", block_size=n, bits=bits, mag_step=1 / 64)
    xs = [torch.randn(d, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    m = B.measure(c, xs, seeds=(11,))
    eps2 = (2 ** (1 / 128) - 1) ** 2
    alpha_dir = (1 - m.distortion) / (1 - eps2 / 2)
    gap = bits - B.average_case_bits(alpha_dir, n)
    assert -0.15 <= gap <= 1.0, gap  # random code ~0.7 bits per block above the bound
    assert alpha_dir == pytest.approx(B.random_code_alpha(bits, n), abs=0.01)


@pytest.mark.parametrize("n,bits", [(16, 10), (8, 8)])
def test_spherical_total_bits_per_block_within_a_few_bits_of_the_average_case_bound(n, bits):
    # The average case is x uniform on the sphere: Gaussian vectors (real gradients have
    # structured blocks and a wider spread of block gains; see the CLI table).
    d = n * 1000
    c = gradpress.get("spherical", block_size=n, bits=bits)
    for s in range(2):
        x = torch.randn(d, generator=torch.Generator().manual_seed(s))
        m = B.measure(c, [x], seeds=(2,))
        per_block = m.body_bits / (d // n)
        bound = B.average_case_bits(1 - m.distortion, n)
        assert per_block - bound <= 4.0, (per_block, bound)  # index gap + gain + framing
    assert m.distortion <= 1 - c.alpha(d) + 0.05


def test_spherical_uses_the_seed_as_shared_randomness():
    c = gradpress.get("spherical")
    x = torch.randn(512, generator=torch.Generator().manual_seed(4))
    p = c.encode(x, seed=123)
    assert p.seed == 123 and len(p.to_bytes()) == header_size(1, seed=True) + len(p.body)
    y = c.decode(p)
    z = c.decode(dataclasses.replace(p, seed=124))
    assert not torch.allclose(y, z)
    assert _err(c, x, seed=123) < float((x * x).sum())


def test_spherical_rejects_bad_parameters():
    for kw in [{"block_size": 0}, {"bits": 0}, {"bits": 25}, {"mag_step": 5.0}]:
        with pytest.raises(ValueError):
            gradpress.get("spherical", **kw)
