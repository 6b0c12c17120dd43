"""The compressor contract, checked for every registered compressor.

Round trip through real bytes (shapes, dtypes), determinism under a seed, no mutation of the
input, NaN/Inf rejection, unbiasedness and the variance bound ``omega`` (unbiased ones), the
contraction ``alpha`` (biased ones), and measured ``8*len(payload)`` against the paper's
``expected_bits(d)``.
"""

from __future__ import annotations

import math

import pytest
import torch

import gradpress
from gradpress.errors import NonFiniteGradientError, PayloadError
from gradpress.payload import Payload

NAMES = gradpress.available()
SHAPES = [(), (1,), (0,), (2, 0, 3), (7, 3), (4, 3, 5), (1000,)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _vectors(d: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(d)
    gauss = torch.randn(d, generator=g)
    spiky = torch.randn(d, generator=g) * 0.01
    spiky[d // 3] = 10.0
    sparse = torch.where(torch.rand(d, generator=g) < 0.7, 0.0, torch.randn(d, generator=g))
    sparse[0] = 1.0
    return [gauss, spiky, sparse]


def _round_trip(c: gradpress.Compressor, x: torch.Tensor, seed: int) -> torch.Tensor:
    return c.decode(Payload.from_bytes(c.encode(x, seed=seed).to_bytes()))


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_keeps_shape_and_dtype(name):
    c = gradpress.get(name)
    for shape in SHAPES:
        for dtype in DTYPES:
            x = torch.randn(shape).to(dtype)
            y = _round_trip(c, x, seed=3)
            assert y.shape == x.shape and y.dtype == x.dtype, (shape, dtype)
            assert bool(torch.isfinite(y).all())


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_of_a_million_elements(name):
    c = gradpress.get(name)
    x = torch.randn(1_000_000)
    y = _round_trip(c, x, seed=0)
    assert y.shape == x.shape and bool(torch.isfinite(y).all())


ENCODE_DECODED = [(n, {}) for n in NAMES] + [
    ("ecq", {"s": 3, "entropy": "huffman"}), ("qsgd", {"s": 1, "bucket_size": None}),
    ("qsgd", {"entropy": True, "sparse": False}), ("ecq", {"norm": "l2", "bits": 4})]


@pytest.mark.parametrize("name,kw", ENCODE_DECODED)
def test_encode_decoded_equals_decoding_the_bytes(name, kw):
    """The hook's shortcut: encode_decoded's tensor is decode(bytes), bit for bit."""
    c = gradpress.get(name, **kw)
    for x in _vectors(3000) + [torch.randn(5, 7).half(), torch.zeros(0), torch.tensor(2.5)]:
        payload, dec = c.encode_decoded(x, seed=11)
        assert payload.to_bytes() == c.encode(x, seed=11).to_bytes()
        ref = _round_trip(c, x, seed=11)
        assert dec.dtype == ref.dtype and dec.shape == ref.shape
        assert torch.equal(dec, ref), name


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_same_bytes_and_input_is_untouched(name):
    c = gradpress.get(name)
    x = torch.randn(257, 3)
    before = x.clone()
    a = c.encode(x, seed=11).to_bytes()
    b = c.encode(x, seed=11).to_bytes()
    assert a == b
    assert torch.equal(x, before)
    again = gradpress.get(name, **c.config())
    assert again.encode(x, seed=11).to_bytes() == a


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_raises(name, bad):
    x = torch.randn(50)
    x[17] = bad
    with pytest.raises(NonFiniteGradientError):
        gradpress.get(name).encode(x)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_dtype_and_wrong_compressor_are_rejected(name):
    c = gradpress.get(name)
    with pytest.raises(ValueError, match="dtype"):
        c.encode(torch.arange(10))
    other = "fp32" if name != "fp32" else "fp16"
    with pytest.raises(PayloadError, match="compressor id"):
        c.decode(gradpress.get(other).encode(torch.randn(5)))


def _empirical(c, x: torch.Tensor, n: int):
    ys = torch.stack([_round_trip(c, x, seed=s).double() for s in range(n)])
    return ys


@pytest.mark.parametrize("name", [n for n in NAMES if gradpress.get(n).unbiased])
def test_unbiased_compressor_is_unbiased_and_meets_omega(name):
    c = gradpress.get(name)
    n = 400
    for x in _vectors(48):
        ys = _empirical(c, x, n)
        xd = x.double()
        mean, var = ys.mean(0), ys.var(0)
        noisy = var > 1e-12
        omega = c.omega(x.numel())
        assert omega is not None, "unbiased compressors declare omega"
        # Coordinates that never varied in n draws may still round the other way with
        # probability p <~ 10/n (a rare event); their bias is then at most p times one
        # coordinate's error, which omega bounds by sqrt(omega)*||x||.
        rare = 10 / n * math.sqrt(omega) * float(xd.norm())
        assert torch.allclose(mean[~noisy], xd[~noisy], rtol=1e-5, atol=1e-6 + rare)
        k = int(noisy.sum())
        if k:
            t = float(((mean[noisy] - xd[noisy]) ** 2 / (var[noisy] / n)).sum())
            assert t < k + 8 * math.sqrt(2 * k) + 10, f"bias statistic {t:.1f} over {k} dof"
        err = float(((ys - xd) ** 2).sum(1).mean())
        assert err <= 1.2 * omega * float((xd**2).sum()) + 1e-9, (err, omega)


@pytest.mark.parametrize("name", [n for n in NAMES if not gradpress.get(n).unbiased])
def test_biased_compressor_meets_its_contraction(name):
    c = gradpress.get(name)
    for d in (48, 1000):
        alpha = c.alpha(d)
        if alpha is None:
            pytest.skip(f"{name} declares no contraction guarantee")
        for x in _vectors(d):
            xd = x.double()
            if c.contractive_in_expectation:
                err = float(((_empirical(c, x, 200) - xd) ** 2).sum(1).mean())
                slack = 1.1
            else:
                err = float(((_round_trip(c, x, seed=5).double() - xd) ** 2).sum())
                slack = 1 + 1e-5
            assert err <= slack * (1 - alpha) * float((xd**2).sum()) + 1e-9, (d, err, alpha)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("d", [100, 10_000])
def test_measured_bits_match_expected_bits(name, d):
    c = gradpress.get(name)
    x = torch.randn(d, generator=torch.Generator().manual_seed(1))
    measured = 8 * len(c.encode(x, seed=2).to_bytes())
    expected = c.expected_bits(d, (d,))
    if c.bits_rtol == 0:
        assert 0 <= measured - expected < 8, (measured, expected)
    else:
        assert abs(measured - expected) <= c.bits_rtol * expected, (measured, expected)


@pytest.mark.parametrize("name", NAMES)
def test_fp16_tensor_whose_norm_overflows_fp16_decodes_finite(name):
    x = torch.full((4096,), 60000.0, dtype=torch.float16)  # ||x|| ~ 3.8e6 > 65504
    y = _round_trip(gradpress.get(name), x, seed=0)
    assert y.dtype == torch.float16 and bool(torch.isfinite(y).all())
