"""The paper's Spherical Compression (``spherical_cap``): the index of the first shared-seed
point inside the cap, Golomb-Rice coded, and the norm (Albasyoni et al. 2020, Sec. 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradpress
from gradpress.bounds import log2_cap_measure
from gradpress.compressors import spherical_cap as scm
from gradpress.errors import PayloadError
from gradpress.payload import Payload, header_size


def _vectors(d: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(d, generator=g) * 10.0 ** float(torch.randint(-6, 6, (1,), generator=g))
        if i % 3 == 1:
            x[i % d] *= 100.0  # spiky
        out.append(x)
    return out


def _rice_bits(c, t: int, d: int) -> int:
    k = c.rice_k(d)
    return ((t - 1) >> k) + 1 + k


@pytest.mark.parametrize("d,nu", [(1, 0.15), (3, 0.3), (7, 0.2), (10, 0.2)])
def test_decode_is_the_shared_point_times_the_norm_from_bytes_alone(d, nu):
    enc = gradpress.get("spherical_cap", nu=nu)
    for i, x in enumerate(_vectors(d, 4, seed=d)):
        raw = enc.encode(x, seed=100 + i).to_bytes()
        p = Payload.from_bytes(raw)
        assert p.seed == 100 + i
        dec = gradpress.get("spherical_cap", **enc.config())  # a fresh decoder: bytes only
        t = dec.read_index(p.body, d)
        norm = float(np.float32(float(x.double().norm())))
        want = (dec.point(100 + i, t, d) * (norm * math.sqrt(1 - nu))).float()
        assert torch.equal(dec.decode(raw), want)


@pytest.mark.parametrize("d,nu", [(2, 0.15), (5, 0.3), (10, 0.2)])
def test_bits_are_norm_plus_the_golomb_rice_length_of_t_plus_the_header(d, nu):
    c = gradpress.get("spherical_cap", nu=nu)
    for i, x in enumerate(_vectors(d, 6, seed=1)):
        p = c.encode(x, seed=i)
        t = c.read_index(p.body, d)
        assert len(p.body) == math.ceil((32 + _rice_bits(c, t, d)) / 8)
        assert len(p.to_bytes()) == header_size(1, seed=True) + len(p.body)


@pytest.mark.parametrize("d,nu", [(1, 0.15), (4, 0.5), (8, 0.25), (10, 0.15)])
def test_distortion_never_exceeds_nu(d, nu):
    c = gradpress.get("spherical_cap", nu=nu)
    for i, x in enumerate(_vectors(d, 12 if d < 10 else 4, seed=7)):
        p = c.encode(x, seed=i)
        xd = x.double()
        u = xd / xd.norm()
        pt = c.point(i, c.read_index(p.body, d), d) * math.sqrt(1 - nu)
        assert float(((pt - u) ** 2).sum()) <= nu
        y = c.decode(Payload.from_bytes(p.to_bytes())).double()
        assert float(((y - xd) ** 2).sum()) <= nu * float((xd**2).sum())
        assert abs(float(pt.norm()) ** 2 - (1 - nu)) < 1e-12


def test_expected_index_is_one_over_the_cap_measure_and_bits_sit_under_the_paper_bound():
    """T is geometric with p = P(cap): a wrong cap or a points' radius other than
    sqrt(1 - nu) (e.g. unit points, cap cos >= 1 - nu/2: E[T] 17% larger) moves the mean
    by > 5 standard errors here."""
    d, nu, n = 5, 0.3, 1500
    c = gradpress.get("spherical_cap", nu=nu)
    g = torch.Generator().manual_seed(3)
    ts = np.array([c.search((v := torch.randn(d, generator=g, dtype=torch.float64)) / v.norm(),
                            seed=s) for s in range(n)], dtype=float)
    p = 2.0 ** log2_cap_measure((math.sqrt(1 - nu) + scm.MARGIN) ** 2, d)
    z = (ts.mean() - 1 / p) / (math.sqrt(1 - p) / p / math.sqrt(n))
    assert abs(z) < 4, (ts.mean(), 1 / p, z)
    bits = np.array([_rice_bits(c, int(t), d) for t in ts])
    assert bits.mean() < -log2_cap_measure(1 - nu, d) + 3
    assert abs(bits.mean() - scm.rice_expected_bits(c.rice_k(d), p)) < 0.15


def test_rice_length_formula_and_parameter_are_exact_for_a_geometric_law():
    for p in (0.5, 0.1, 1e-3, 3e-5):
        t = np.arange(1, int(60 / p))
        pmf = p * np.exp((t - 1) * math.log1p(-p))
        lengths = {k: float((pmf * (((t - 1) >> k) + 1 + k)).sum()) for k in range(22)}
        for k in (0, 3, 10):
            assert abs(lengths[k] - scm.rice_expected_bits(k, p)) < 1e-6 * lengths[k]
        assert scm.rice_parameter(p) == min(lengths, key=lengths.get)


def test_truncated_and_forged_bodies_raise():
    d = 10
    c = gradpress.get("spherical_cap", nu=0.2)
    p = c.encode(torch.randn(d), seed=4)
    for n in range(len(p.body)):
        with pytest.raises(PayloadError):
            c.decode(Payload(p.compressor_id, p.dtype, p.shape, p.body[:n], p.seed,
                             config_digest=p.config_digest))
    q = c.max_quotient(d)
    norm = np.array([1.0], dtype=">f4").tobytes()
    # A lying T (a run of ones as long as the body allows) is read only up to Q bits:
    # at Q ones it is the escape, whose d raw floats are missing here.
    for ones in (q - 1, q, q + 100):
        body = norm + np.packbits(np.ones(ones, dtype=np.uint8)).tobytes()
        with pytest.raises(PayloadError):
            c.decode(Payload(p.compressor_id, p.dtype, p.shape, body, p.seed,
                             config_digest=p.config_digest))
    neg = np.array([-1.0], dtype=">f4").tobytes() + p.body[4:]
    with pytest.raises(PayloadError, match="norm"):
        c.decode(Payload(p.compressor_id, p.dtype, p.shape, neg, p.seed,
                         config_digest=p.config_digest))


def test_escape_sends_x_exactly_when_the_search_gives_up(monkeypatch):
    """With Q = 1 the encoder stops after 2^k points (a miss in ~e^-0.7 of seeds): those
    payloads carry x in float32 and decode to it exactly."""
    d = 6
    c = gradpress.get("spherical_cap", nu=0.2)
    monkeypatch.setattr(c, "max_quotient", lambda d: 1)
    x = torch.randn(d)
    escapes = 0
    for s in range(12):
        p = c.encode(x, seed=s)
        if c.read_index(p.body, d) is None:
            escapes += 1
            assert len(p.body) == math.ceil((32 + 1 + 32 * d) / 8)
            assert torch.equal(c.decode(Payload.from_bytes(p.to_bytes())), x)
        else:
            assert c.read_index(p.body, d) <= 1 << c.rice_k(d)
    assert 0 < escapes < 12
    lo, hi = c.body_len_bounds(d)
    assert hi == math.ceil((32 + 1 + 32 * d) / 8) and lo == math.ceil((33 + c.rice_k(d)) / 8)


def test_same_seed_same_bytes_other_seed_other_point():
    c = gradpress.get("spherical_cap", nu=0.2)
    x = torch.randn(10)
    a, b = c.encode(x, seed=8).to_bytes(), c.encode(x, seed=8).to_bytes()
    assert a == b
    assert len({c.encode(x, seed=s).body for s in range(5)}) > 1


def test_large_d_is_the_blockwise_code_and_the_cut_off_is_where_the_search_explodes():
    c = gradpress.get("spherical_cap")  # nu = 0.15, max_search_bits = 20
    cut = max(d for d in range(1, 40) if c.uses_cap(d))
    assert cut == 13 and -math.log2(c.cap_probability(14)) > 20
    assert all(not c.uses_cap(d) for d in range(14, 80))
    x = torch.randn(30)
    blockwise = gradpress.get("spherical", **{k: c.config()[k] for k in
                                             ("block_size", "bits", "mag_step")})
    assert c.encode(x, seed=2).body == blockwise.encode(x, seed=2).body
    assert c.alpha(30) == blockwise.alpha(30) and c.alpha(10) == 1 - 0.15
    assert c.max_payload_bytes(30) is None and c.max_payload_bytes(10) is not None


@pytest.mark.parametrize("kw", [{"nu": 0.0}, {"nu": 1.0}, {"nu": "0.1"},
                                {"max_search_bits": 40}, {"block_size": 0}])
def test_bad_parameters_raise(kw):
    with pytest.raises(ValueError):
        gradpress.get("spherical_cap", **kw)


def test_every_single_bit_flip_is_rejected_or_decodes_finite():
    d = 10
    c = gradpress.get("spherical_cap", nu=0.2)
    p = c.encode(torch.randn(d), seed=6)
    for i in range(8 * len(p.body)):
        body = bytearray(p.body)
        body[i // 8] ^= 1 << (i % 8)
        try:
            y = c.decode(Payload(p.compressor_id, p.dtype, p.shape, bytes(body), p.seed,
                                 config_digest=p.config_digest))
        except PayloadError:
            continue
        assert y.shape == (d,) and bool(torch.isfinite(y).all())
