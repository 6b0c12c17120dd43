"""ECQ-SGD's quantizer (Wu et al. 2018): the 2s+1 grid, unbiasedness, the variance bounds
(QSGD Lemma 3.1 for l2, the derived l-inf bound), exact round trips, bit counts of every
code, the smallest-code default and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradpress
from gradpress.codec import elias
from gradpress.codec import huffman as hf
from gradpress.compressors.ecq import linf_omega, s_for_bits
from gradpress.kernels import quantize as fc
from gradpress.payload import Payload, header_size


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Serial kernel builds: thousands of small round trips, no thread-pool wake-ups.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _gauss(d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _rt(c, x, seed=0):
    return c.decode(Payload.from_bytes(c.encode(x, seed=seed).to_bytes()))


def _draws(c, x, n):
    return torch.stack([_rt(c, x, s).double() for s in range(n)]).numpy()


def _rounding(c, x):
    """Per coordinate: grid step ``M/s`` (float64, from the float32 scales the encoder
    sends) and ``theta = frac(s|x_i|/M)``, the probability of rounding up."""
    d = x.numel()
    scales = fc.bucket_scales(x.float(), c.bucket_size, c.norm).double().numpy()
    m = np.repeat(scales, c._bucket_len(d))[:d]
    u = np.divide(c.s * np.abs(x.double().numpy()), m, out=np.zeros(d), where=m > 0)
    return m / c.s, u - np.floor(u)


def _exact_error(c, x) -> float:
    """``E||Q(x) - x||^2 = sum_i (M/s)^2 theta_i (1 - theta_i)``."""
    step, th = _rounding(c, x)
    return float((step**2 * th * (1 - th)).sum())


def _threshold(step, th, n):
    """Mean and standard deviation of ``||mean_n - x||^2`` for unbiased rounding, from the
    binomial's second and fourth central moments."""
    p = th * (1 - th)
    m2 = step**2 * p / n
    m4 = step**4 * n * p * (1 + 3 * (n - 2) * p) / n**4
    return float(m2.sum()), float(np.sqrt(np.maximum(m4 - m2**2, 0).sum()))


# -- the grid ------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("s", [1, 2, 4, 7])
def test_ecq_grid_has_exactly_the_2s_plus_1_levels(norm, s):
    c = gradpress.get("ecq", s=s, norm=norm)
    assert c.levels == 2 * s + 1 and c.width == math.ceil(math.log2(2 * s + 1))
    assert np.allclose(c.grid(2.0), 2.0 * np.arange(-s, s + 1) / s)
    seen = set()
    gen = torch.Generator().manual_seed(s)
    for k in range(s + 1):  # x_0 / M = k/s exactly; the rest spread over the grid
        a = k / s
        tail = 2 * torch.rand(16, generator=gen) - 1
        if norm == "l2":  # ||x||_2 = 1: the tail carries the rest of the norm
            tail *= math.sqrt(max(0.0, 1 - a * a)) / float(tail.norm())
        else:  # ||x||_inf = 1
            tail[0] = 1.0
        x = torch.cat([torch.tensor([a]), tail])
        for sign in (1.0, -1.0):
            for seed in range(10):
                v = sign * x
                y = _rt(c, v, seed).double()
                m = float(v.norm() if norm == "l2" else v.abs().max())
                lev = (y / m * s).numpy()
                assert np.allclose(lev, np.round(lev), atol=1e-5)
                assert np.abs(lev).max() <= s + 1e-5
                assert (np.sign(lev) * np.sign(v.numpy()) >= 0).all()
                seen |= set(np.round(lev).astype(int).tolist())
    assert seen == set(range(-s, s + 1))


def test_ecq_bits_map_to_the_largest_grid_that_fits():
    for b, s in [(2, 1), (3, 3), (4, 7), (8, 127)]:
        c = gradpress.get("ecq", bits=b)
        assert s_for_bits(b) == s and c.s == s and c.width == b and 2 * s + 1 <= 2**b
    assert gradpress.get("ecq").s == 4 and gradpress.get("ecq", s=3, bits=3).s == 3
    for bad in ({"bits": 1}, {"bits": 9}, {"bits": 2, "s": 4}, {"s": 0}, {"norm": "l1"},
                {"entropy": "zip"}):
        with pytest.raises(ValueError):
            gradpress.get("ecq", **bad)


# -- unbiasedness and variance ----------------------------------------------------------
CASES = [("l2", 4, None, 7, 1.0), ("l2", 4, None, 1000, 1e-3), ("l2", 4, 64, 1000, 1e3),
         ("l2", 1, 64, 100, 1.0), ("l2", 7, None, 100, 1e3), ("linf", 4, None, 100, 1.0),
         ("linf", 4, 64, 1000, 1e-3), ("linf", 1, 64, 100, 1e3), ("linf", 7, None, 1000, 1.0),
         ("linf", 2, 64, 7, 1.0)]


@pytest.mark.parametrize("norm,s,bucket,d,mag", CASES)
def test_ecq_is_unbiased_where_a_biased_variant_fails(norm, s, bucket, d, mag):
    """``||mean of n draws - x||^2`` against its exact mean and spread under unbiased
    rounding (buckets that do not divide ``d``, magnitudes 1e-3..1e3); a variant that rounds
    up with probability ``theta + 0.05`` fails the same test."""
    c = gradpress.get("ecq", s=s, norm=norm, bucket_size=bucket)
    x = _gauss(d, d + s) * mag
    n = 400
    ys = _draws(c, x, n)
    xd = x.double().numpy()
    step, th = _rounding(c, x)
    mean, sd = _threshold(step, th, n)
    stat = float(((ys.mean(0) - xd) ** 2).sum())
    assert stat <= mean + 6 * sd + 1e-12 * mag**2, (stat, mean, sd)
    exact = th * (1 - th) == 0  # on the grid (the l-inf maximum): no randomness at all
    assert np.allclose(ys[:, exact], xd[exact], rtol=1e-6, atol=0)
    err = float(((ys - xd) ** 2).sum(1).mean())
    assert err <= 1.2 * _exact_error(c, x) + 1e-12 * mag**2
    assert _exact_error(c, x) <= c.omega(d) * float((x.double() ** 2).sum())
    if d >= 100:  # the test has the power to see a small bias
        rng = np.random.default_rng(d)
        up = rng.binomial(n, np.minimum(1.0, th + 0.05)) / n
        biased = float(((step * (up - th)) ** 2).sum())
        assert biased > mean + 6 * sd


def test_ecq_l2_omega_is_qsgd_lemma_3_1_and_within_2x_on_gaussians():
    for n, s in [(10, 4), (256, 4), (4096, 4), (20_000, 4), (4096, 1)]:
        c = gradpress.get("ecq", s=s, norm="l2")
        assert c.omega(n) == min(n / s**2, math.sqrt(n) / s)
        x = _gauss(n, n)
        ratio = _exact_error(c, x) / float((x.double() ** 2).sum())
        assert ratio <= c.omega(n)
        if n >= s**2 * 16:  # the sqrt(n)/s regime: about sqrt(2/pi) of the bound
            assert c.omega(n) <= 2 * ratio, (n, s, ratio)
    c = gradpress.get("ecq", s=4, norm="l2", bucket_size=256)
    assert c.omega(10_000) == 4.0 and c.omega(100) == min(100 / 16, 10 / 4)


@pytest.mark.parametrize("n,s", [(2, 1), (16, 4), (100, 4), (1000, 1), (4096, 7)])
def test_ecq_linf_omega_is_attained_by_one_spike_and_small_coordinates(n, s):
    """The derived bound (module docstring) is tight: one coordinate at ``M``, ``n-1`` at
    ``theta* M/s``; the compressor's measured error there matches it."""
    c = gradpress.get("ecq", s=s, norm="linf")
    a = (n - 1) / s**2
    theta = (math.sqrt(1 + a) - 1) / a
    x = torch.full((n,), theta / s, dtype=torch.float64)
    x[0] = 1.0
    norm2 = float((x**2).sum())
    assert math.isclose(_exact_error(c, x.float()) / norm2, linf_omega(n, s), rel_tol=1e-4)
    draws = 2000 if n <= 100 else 300
    ys = _draws(c, x.float(), draws)
    err = float(((ys - x.float().double().numpy()) ** 2).sum(1).mean())
    assert math.isclose(err / norm2, c.omega(n), rel_tol=0.15)
    for v in (_gauss(n, 1), _gauss(n, 2) ** 3, torch.rand(n)):  # never above it
        assert _exact_error(c, v) <= c.omega(n) * float((v.double() ** 2).sum()) * (1 + 1e-9)


def test_ecq_linf_gaussian_error_is_far_below_the_worst_case():
    # Why no "within 2x on Gaussians" for l-inf: the worst case needs a spike; a Gaussian's
    # error is about (2 ln n / s^2) E[theta(1-theta)] ||x||^2, so the gap grows like sqrt(n).
    c = gradpress.get("ecq", s=4, norm="linf")
    ratios = []
    for n in (100, 10_000):
        x = _gauss(n, 3)
        ratios.append(c.omega(n) * float((x.double() ** 2).sum()) / _exact_error(c, x))
    assert 2 < ratios[0] < ratios[1]


# -- round trips, bits, the default code ------------------------------------------------
ONLY = {"dense": {"entropy": False, "sparse": False},
        "sparse": {"entropy": False, "sparse": True},
        "huffman": {"entropy": "huffman", "sparse": False},
        "range": {"entropy": "range", "sparse": False}}


@pytest.mark.parametrize("norm,s,k", [("l2", 4, [-2, 2, 2, -2]), ("l2", 7, [2, -3, 6]),
                                      ("l2", 1, [-1]), ("linf", 4, [4, -3, 1, 0, -4]),
                                      ("linf", 7, [7, -7, 5, 0, 1])])
def test_ecq_grid_points_round_trip_exactly_in_every_code(norm, s, k):
    for scale in (2.0**-10, 1.0, 2.0**10):
        x = torch.zeros(200)
        x[3:3 + len(k)] = torch.tensor(k, dtype=torch.float32) * scale  # M/s = scale
        for kw in ONLY.values():
            c = gradpress.get("ecq", s=s, norm=norm, **kw)
            for seed in range(5):
                assert torch.equal(_rt(c, x, seed), x), (kw, seed)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_every_code_decodes_the_same_symbols(norm):
    x = _gauss(3001, 7)
    ref = None
    for kw in list(ONLY.values()) + [{}]:
        c = gradpress.get("ecq", norm=norm, bucket_size=512, **kw)
        payload, dec = c.encode_decoded(x, seed=3)
        y = c.decode(Payload.from_bytes(payload.to_bytes()))
        assert torch.equal(y, dec)
        ref = y if ref is None else ref
        assert torch.equal(y, ref)


@pytest.mark.parametrize("s,bucket,d", [(1, None, 1000), (4, None, 999), (4, 64, 1000),
                                        (7, 100, 250), (127, None, 33)])
def test_ecq_dense_code_is_header_plus_d_times_ceil_log2_levels(s, bucket, d):
    c = gradpress.get("ecq", s=s, bucket_size=bucket, **ONLY["dense"])
    p = c.encode(_gauss(d, 1), seed=0)
    w = math.ceil(math.log2(2 * s + 1))
    nb = fc.n_buckets(d, bucket)
    assert p.body[0] == 0
    assert len(p.body) == math.ceil((8 + 32 * nb + d * w) / 8)  # mode byte + paper's count
    assert len(p.to_bytes()) == header_size(1) + len(p.body)


def _paper_entropy_bits(letters: np.ndarray, size: int) -> float:
    """``sum_k d_k log2(d / d_k)`` over the letters' histogram."""
    counts = np.bincount(letters, minlength=size).astype(np.float64)
    nz = counts[counts > 0]
    return float((nz * np.log2(counts.sum() / nz)).sum())


@pytest.mark.parametrize("norm,s,d", [("l2", 4, 20_000), ("linf", 4, 5000), ("linf", 1, 4001),
                                      ("l2", 7, 3000)])
def test_entropy_codes_are_within_the_papers_entropy_count(norm, s, d):
    x = _gauss(d, 2)
    huff = gradpress.get("ecq", s=s, norm=norm, **ONLY["huffman"])
    rng = gradpress.get("ecq", s=s, norm=norm, **ONLY["range"])
    sym = fc.scaled_quantize(x, None, norm, huff.gain, huff.offset, huff.levels, 5, None)[1]
    sym = sym.numpy().astype(np.int64)
    paper = _paper_entropy_bits(sym, huff.levels)  # the paper's Huffman count
    per, size = huff._huffman_alphabet
    letters = sym
    if per == 2:  # pairs levels*a + b, an odd tail paired with 0
        padded = np.append(sym, [0] * (sym.size % 2))
        letters = padded[0::2] * huff.levels + padded[1::2]
    head = 8 + 32  # mode byte, one scale
    hb = 8 * len(huff.encode(x, seed=5).body)
    if hb < 8 * math.ceil((head + d * huff.width) / 8):  # Huffman won over dense
        # within one bit per letter of the letters' entropy (<= the symbols' for pairs)
        assert hb <= head + 4 * size + _paper_entropy_bits(letters, size) + letters.size + 16
    counts = np.bincount(sym, minlength=rng.levels)
    model = int(elias.gamma_lengths(np.append(counts + 1, [rng.levels, 1])).sum())
    rb = 8 * len(rng.encode(x, seed=5).body)
    # the model, the word count, the coder's flush and word rounding, byte padding
    assert rb <= head + model + 32 + paper + 64 + 32 + 8, (rb, paper)


def test_ecq_default_code_for_a_20k_gaussian_is_under_0_2_bits_a_coordinate():
    d = 20_000
    c = gradpress.get("ecq")  # s=4, l2, one scale
    bits, nnz = [], []
    for seed in range(5):
        x = _gauss(d, seed)
        p = c.encode(x, seed=1)
        bits.append(8 * len(p.body) / d)
        nnz.append(int((c.decode(p) != 0).sum()))
    assert np.mean(bits) < 0.2 and max(bits) < 0.21, bits  # range coded, ~2% non-zeros
    assert all(0.01 * d < k <= 4 * (4 + math.sqrt(d)) for k in nnz)  # QSGD Lemma 3.1


def _sparse_vector(d: int) -> torch.Tensor:
    x = torch.zeros(d)
    x[::97] = _gauss(len(range(0, d, 97)), 4)
    return x


@pytest.mark.parametrize("norm,s,bucket,x", [
    ("l2", 4, None, _gauss(20_000, 1)), ("linf", 1, None, _gauss(300, 2)),
    ("linf", 7, None, torch.rand(2000) * 2 - 1), ("linf", 4, 64, _sparse_vector(5000)),
    ("l2", 1, None, _gauss(50, 3)), ("linf", 2, None, _gauss(4, 3))])
def test_ecq_default_sends_the_smallest_of_its_codes(norm, s, bucket, x):
    c = gradpress.get("ecq", s=s, norm=norm, bucket_size=bucket)
    default = c.encode(x, seed=2)
    sizes = {name: len(gradpress.get("ecq", s=s, norm=norm, bucket_size=bucket, **kw)
                       .encode(x, seed=2).body) for name, kw in ONLY.items()}
    assert len(default.body) == min(sizes.values()), sizes
    assert torch.equal(c.decode(default), gradpress.get(
        "ecq", s=s, norm=norm, bucket_size=bucket, **ONLY["dense"]).decode(
        gradpress.get("ecq", s=s, norm=norm, bucket_size=bucket, **ONLY["dense"])
        .encode(x, seed=2)))


def test_ecq_bytes_are_a_function_of_the_seed():
    x = _gauss(5000, 8)
    for norm in ("l2", "linf"):
        c = gradpress.get("ecq", norm=norm)
        a = c.encode(x, seed=9).to_bytes()
        assert a == c.encode(x, seed=9).to_bytes()
        assert a == gradpress.get("ecq", **c.config()).encode(x, seed=9).to_bytes()
        assert a != c.encode(x, seed=10).to_bytes()


def test_huffman_letters_of_the_ternary_grid_are_pairs():
    c = gradpress.get("ecq", s=1)
    assert c._huffman_alphabet == (2, 9) and hf.MAX_SYMBOLS == 16
    assert gradpress.get("ecq", s=7)._huffman_alphabet == (1, 15)
