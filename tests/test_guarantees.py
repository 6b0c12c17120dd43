"""Declared guarantees on realistic inputs, with tolerances derived from the declarations.

* Unbiasedness and the variance bound of every registered unbiased compressor, at ``d`` not
  divisible by the bucket size and at magnitudes ``1e-8`` to ``1e3``. With ``n`` draws the
  mean's error obeys ``E||mean - x||^2 = tr(Var)/n <= omega ||x||^2 / n``; a per-coordinate
  chi-square statistic against the measured variance catches a bias far below that.
* Each declared ``omega`` / ``alpha`` is within 2x of what is measured: on Gaussians, or,
  where the declaration is a true worst case that Gaussians do not approach, on the input
  that attains it (``TIGHT_INPUT``: e.g. QSGD's flat vector, sign's one-hot bucket, fp16's
  rounding midpoints). A loose declaration fails.
* fp16/bf16 meet their contraction for Gaussian gradients of magnitude ``1e-8`` to ``1e3``
  (fp16 with ``scaled=True``); plain fp16 meets it in its declared range and warns below.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import gradpress
from gradpress.payload import Payload

NAMES = gradpress.available()
UNBIASED = [n for n in NAMES if gradpress.get(n).unbiased]
#: (d, magnitude): 700 and 1500 are not multiples of the 512-element buckets.
SIZES = [(48, 1e-8), (700, 1.0), (1500, 1e3)]
DRAWS = 160


def _round_trip(c, x, seed):
    return c.decode(Payload.from_bytes(c.encode(x, seed=seed).to_bytes()))


def _draws(c, x, n):
    return torch.stack([_round_trip(c, x, seed=s).double() for s in range(n)])


def _bucket(c, d: int) -> int:
    b = getattr(c, "bucket_size", None) or getattr(c, "block_size", None) or d
    return min(b, d)


def _input(kind: str, c, d: int, mag: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
    if kind == "gauss":
        return torch.randn(d, generator=g) * mag
    if kind == "flat":
        return signs * mag
    if kind == "one_hot":  # one non-zero per bucket
        x = torch.zeros(d)
        x[::_bucket(c, d)] = mag
        return x * signs
    if kind == "midpoint":  # halfway between two representable values: error u|x|
        return signs * (1 + c.unit_roundoff) * mag
    if kind == "terngrad":  # one entry at the scale M, the rest at t* M, t* = (sqrt(n)-1)/(n-1)
        n = _bucket(c, d)
        x = torch.full((d,), (math.sqrt(n) - 1) / (n - 1)) * mag
        x[::n] = mag
        return x * signs
    raise ValueError(kind)


#: The input on which each declaration is (nearly) attained, where Gaussians fall short:
#: QSGD's, ECQ-SGD's (the same grid, l2 scale by default) and natural dithering's worst
#: cases are flat vectors, sign's a single non-zero per bucket, top-k's and rand-k's flat
#: vectors (alpha = k/d, omega = d/k - 1 exactly), the casts' values halfway between two
#: representable numbers.
TIGHT_INPUT = {"qsgd": "flat", "natural_dithering": "flat", "randk": "flat", "ecq": "flat",
               "terngrad": "terngrad", "sign": "one_hot", "topk": "flat", "fp16": "midpoint",
               "bf16": "midpoint", "sparse_dithering_rand": "flat"}
#: TernGrad declares omega = sqrt(n) - 1; its true worst case max_x M||x||_1/||x||^2 - 1 is
#: (sqrt(n) - 1)/2 (one entry at M, the rest at M (sqrt(n)-1)/(n-1)): exactly 2x, the edge
#: of this test. Declarations known loose by more go here as strict xfails.
LOOSE_XFAIL: dict[str, str] = {}


@pytest.mark.parametrize("d,mag", SIZES)
@pytest.mark.parametrize("name", UNBIASED)
def test_unbiased_compressor_is_unbiased_and_meets_omega_at_every_size_and_scale(name, d, mag):
    """Caught bug: any systematic rounding (floor instead of stochastic rounding, a scale
    off by one ulp, a last partial bucket scaled as a full one) fails the chi-square."""
    _check_unbiased(gradpress.get(name), d, mag)


class _ScaledUp:
    """A planted bias: QSGD's decoded values times 1.1, inside omega's variance (the
    z-test along x gives z ~ 10 at 10%, so biases above ~5% fail it; the chi-square alone
    would need ~15%)."""

    def __init__(self):
        self._c = gradpress.get("qsgd")
        self.unbiased = True

    def omega(self, d):
        return self._c.omega(d)

    def encode(self, x, seed=0):
        return self._c.encode(x, seed=seed)

    def decode(self, p):
        return self._c.decode(p) * 1.1


def test_the_unbiasedness_check_rejects_a_planted_ten_percent_bias():
    with pytest.raises(AssertionError, match="bias along x"):
        _check_unbiased(_ScaledUp(), 700, 1.0)


def _check_unbiased(c, d: int, mag: float) -> None:
    omega = c.omega(d)
    x = _input("gauss", c, d, mag, seed=d)
    xd = x.double()
    ys = _draws(c, x, DRAWS)
    mean, var = ys.mean(0), ys.var(0)
    nx2 = float((xd**2).sum())
    # The declared omega bounds the mean's error: E||mean - x||^2 <= omega ||x||^2 / n;
    # ||mean - x||^2 sums d independent terms, so 4x its bound is many sigma away.
    bias2 = float(((mean - xd) ** 2).sum())
    assert bias2 <= 4 * omega * nx2 / DRAWS + 1e-12 * nx2, (bias2, omega * nx2 / DRAWS)
    noisy = var > 1e-12 * nx2 / d
    k = int(noisy.sum())
    if k:  # chi-square with k degrees of freedom against the measured variance
        t = float(((mean[noisy] - xd[noisy]) ** 2 / (var[noisy] / DRAWS)).sum())
        assert t < k + 6 * math.sqrt(2 * k) + 10, f"bias statistic {t:.1f} over {k} dof"
    # A scale error (the commonest bias) moves the mean along x: project on it, a 1-d
    # Gaussian statistic with the measured variance, far more powerful than the chi-square.
    z = float(((mean - xd) * xd).sum()) / math.sqrt(float((xd**2 * var).sum()) / DRAWS + 1e-300)
    assert abs(z) < 5, f"bias along x: z = {z:.1f}"
    # Never-varying coordinates round the other way with probability p <~ 10/n at most.
    rare = 10 / DRAWS * math.sqrt(omega * nx2)
    assert torch.allclose(mean[~noisy], xd[~noisy], rtol=1e-5, atol=1e-7 * mag + rare)
    err = float(((ys - xd) ** 2).sum(1).mean())
    assert err <= omega * nx2 * (1 + 4 / math.sqrt(DRAWS)) + 1e-12 * nx2, (err / nx2, omega)


def _measured(c, x: torch.Tensor, draws: int) -> float:
    xd = x.double()
    seeds = range(draws) if (c.unbiased or c.contractive_in_expectation) else range(1)
    err = sum(float(((_round_trip(c, x, s).double() - xd) ** 2).sum()) for s in seeds)
    return err / len(seeds) / float((xd**2).sum())


def _tight_cases():
    out = []
    for n in NAMES:
        c = gradpress.get(n)
        if c.omega(700) is None and c.alpha(700) is None:
            continue
        marks = [pytest.mark.xfail(reason=LOOSE_XFAIL[n], strict=True)] if n in LOOSE_XFAIL else []
        out.append(pytest.param(n, {}, marks=marks, id=n))
    out.append(pytest.param("fp16", {"scaled": True}, id="fp16-scaled"))
    return out


@pytest.mark.parametrize("name,kw", _tight_cases())
@pytest.mark.parametrize("d", [700, 1024])
def test_declared_omega_or_alpha_is_within_2x_of_the_measured(name, kw, d):
    """Caught bug: a declaration looser than 2x (natural dithering's Thm 7 form was) or
    one the compressor breaks."""
    c = gradpress.get(name, **kw)
    kind = TIGHT_INPUT.get(name, "gauss")
    x = _input(kind, c, d, seed=d)
    got = _measured(c, x, draws=48)
    if c.unbiased:
        omega = c.omega(d)
        if omega == 0:
            assert got == 0
            return
        assert got <= omega * 1.15, f"{name}: measured omega {got:.4g} > declared {omega:.4g}"
        assert omega <= 2 * got, f"{name}: omega {omega:.4g} > 2x measured {got:.4g} ({kind})"
    else:
        alpha = c.alpha(d)
        slack = 1.1 if c.contractive_in_expectation else 1 + 1e-6
        assert got <= slack * (1 - alpha), f"{name}: 1-alpha measured {got:.4g} > {1 - alpha:.4g}"
        assert 1 - alpha <= 2 * got, f"{name}: 1-alpha {1 - alpha:.4g} > 2x measured {got:.4g}"
        assert alpha <= 2 * (1 - got), f"{name}: alpha {alpha:.4g} > 2x measured {1 - got:.4g}"


@pytest.mark.parametrize("mag", [1e-8, 1e-6, 1e-4, 1e-2, 1.0, 1e3])
@pytest.mark.parametrize("name,kw", [("fp16", {"scaled": True}), ("bf16", {}),
                                     ("fp16", {})], ids=["fp16-scaled", "bf16", "fp16"])
def test_casts_meet_their_contraction_from_1e_minus_8_to_1e3(name, kw, mag):
    """Caught bug: a plain fp16 cast of a 1e-8 gradient sends zeros (||C(x)-x|| = ||x||)
    while declaring alpha = 1 - 2^-22. Plain fp16 must either meet it or warn."""
    c = gradpress.get(name, **kw)
    for d in (1, 700, 1500):
        x = _input("gauss", c, d, mag, seed=d)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            err = _measured(c, x, 1)
        if caught:
            assert name == "fp16" and not kw and float(x.abs().max()) < 2.0**-14, caught[0]
            continue
        assert err <= (1 - c.alpha(d)) * (1 + 1e-6), (d, mag, err, 1 - c.alpha(d))


def test_plain_fp16_warns_exactly_below_its_normal_range():
    c = gradpress.get("fp16")
    with pytest.warns(RuntimeWarning, match="normal range"):
        c.encode(torch.full((10,), 2.0**-15))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c.encode(torch.full((10,), 2.0**-14))


def test_scaled_fp16_sends_one_exponent_byte_per_bucket_and_any_float32_magnitude():
    c = gradpress.get("fp16", scaled=True)
    x = torch.randn(1100) * 1e30  # beyond fp16's range: the plain cast raises
    p = c.encode(x)
    assert len(p.body) == 2 * 1100 + 3
    y = c.decode(p)
    xd = x.double()
    assert float(((y.double() - xd) ** 2).sum() / (xd**2).sum()) <= 1 - c.alpha(1100)
    with pytest.raises(ValueError, match="range"):
        gradpress.get("fp16").encode(x)


def test_sign_of_a_flat_vector_is_exact_in_the_last_partial_bucket():
    """Caught bug: the last bucket's l1 scale divided by the full bucket size, not its own
    length (700 = 512 + 188)."""
    c = gradpress.get("sign")
    x = _input("flat", c, 700) * 3.0
    assert torch.equal(_round_trip(c, x, 0), x)


@pytest.mark.parametrize("exponent_range", [False, True])
def test_natural_compression_encodes_every_gaussian_to_neighbouring_powers_of_two(
        exponent_range):
    """Every coordinate decodes to 0 (for 0) or to sign(x) * 2^floor(log2|x|) or twice that,
    on many Gaussian vectors and scales: an exponent field one bit too narrow fails here
    (its encoder raises on the vectors whose exponents span a power of two)."""
    c = gradpress.get("natural", exponent_range=exponent_range)
    gen = torch.Generator().manual_seed(11)
    for trial in range(120):
        x = torch.randn(257, generator=gen) * 10.0 ** (trial % 9 - 4)
        y = c.decode(c.encode(x, seed=trial).to_bytes())
        lo = torch.exp2(torch.floor(torch.log2(x.abs())))
        ok = ((y.abs() == lo) | (y.abs() == 2 * lo)) & (torch.sign(y) == torch.sign(x))
        assert bool(ok.all()), (trial, x[~ok][:4], y[~ok][:4])
