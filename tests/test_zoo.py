"""Compressor-specific properties of the zoo (QSGD, ECQ, natural, sign, TernGrad, top-k,
rand-k, PowerSGD) and of the fast bit paths they use."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradpress
from gradpress.codec import bits as cbits
from gradpress.codec import elias
from gradpress.codec import huffman as hf
from gradpress.compressors.powersgd import matrix_shape
from gradpress.compressors.sparsify import shared_indices
from gradpress.errors import PayloadError
from gradpress.kernels import fields as kfields
from gradpress.kernels import quantize as fc
from gradpress.payload import Payload, header_size


def _gauss(d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _rt(c, x, seed=0):
    return c.decode(Payload.from_bytes(c.encode(x, seed=seed).to_bytes()))


# -- fast bit paths ----------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 8), n=st.integers(0, 70), data=st.data())
def test_pack_uint8_equals_the_generic_bit_matrix(width, n, data):
    v = np.array(data.draw(st.lists(st.integers(0, (1 << width) - 1), min_size=n, max_size=n)),
                 dtype=np.int64)
    ref = np.packbits(cbits.uint_to_bits(v, width)) if n else np.zeros(0, np.uint8)
    packed = cbits.pack_uint8(v, width)
    assert np.array_equal(packed, ref)
    assert np.array_equal(cbits.unpack_uint8(packed, n, width), v)
    w = cbits.BitWriter()
    w.write_uint(v, width)
    w.write_uint(np.array([3]), 2)
    r = cbits.BitReader(w.getvalue())
    assert np.array_equal(r.read_uint(n, width), v) and int(r.read_uint(1, 2)[0]) == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 2**40), min_size=1, max_size=200))
def test_split_gamma_stream_round_trips_at_textbook_lengths(values):
    v = np.array(values, dtype=np.int64)
    fields = kfields.gamma_fields(v)
    packed, nbits = kfields.pack_fields(np.concatenate(fields[0]), np.concatenate(fields[1]))
    assert nbits == int(elias.gamma_lengths(v).sum()) == kfields.gamma_bits(v)
    r = kfields.FieldReader(packed.tobytes())
    out = r.gamma(v.size)
    assert np.array_equal(out.astype(np.int64), v) and r.pos == nbits
    r.expect_end()


def test_split_gamma_reader_rejects_truncated_streams():
    v = np.arange(1, 50)
    packed, nbits = kfields.pack_fields(*(np.concatenate(f) for f in kfields.gamma_fields(v)))
    for cut in (0, 1, len(packed) // 2, len(packed) - 1):
        with pytest.raises(PayloadError):
            kfields.FieldReader(packed[:cut].tobytes()).gamma(v.size)


# -- unbiased ones: a pooled test that does not need every coordinate to move ------------
UNBIASED = [("qsgd", {}), ("ecq", {}), ("ecq", {"norm": "linf"}), ("natural", {}),
            ("natural_dithering", {}), ("terngrad", {"clip": None}), ("randk", {})]


@pytest.mark.parametrize("name,kw", UNBIASED)
def test_unbiased_compressors_pass_a_pooled_bias_test_and_omega(name, kw):
    """E||mean_n - x||^2 = E||C(x) - x||^2 / n for an unbiased C; a bias b adds ||b||^2."""
    c = gradpress.get(name, **kw)
    x = _gauss(40, 3)
    x[5] = 6.0
    n = 300
    ys = torch.stack([_rt(c, x, s).double() for s in range(n)])
    xd = x.double()
    err = float(((ys - xd) ** 2).sum(1).mean())
    stat = n * float(((ys.mean(0) - xd) ** 2).sum()) / err
    assert stat < 12, f"pooled bias statistic {stat:.2f} (expected about 1)"
    assert err <= 1.15 * c.omega(40) * float((xd**2).sum())


def test_deterministic_rounding_fails_the_pooled_bias_test():
    # The statistic above can fail: rounding to nearest on QSGD's grid is biased.
    x = _gauss(40, 3)
    s, norm = 7, float(x.norm())
    y = torch.round(x / norm * s) * norm / s
    noise = torch.randn(300, 40, generator=torch.Generator().manual_seed(1)) * 1e-3
    ys = (y + noise).double()
    err = float(((ys - x.double()) ** 2).sum(1).mean())
    assert 300 * float(((ys.mean(0) - x.double()) ** 2).sum()) / err > 12


# -- QSGD --------------------------------------------------------------------------------
@pytest.mark.parametrize("s,n", [(1, 256), (2, 1024), (4, 4096), (7, 512), (16, 4096)])
def test_qsgd_elias_code_stays_under_theorem_3_2(s, n):
    c = gradpress.get("qsgd", s=s, bucket_size=None)
    p = c.encode(_gauss(n, s), seed=1)
    assert p.body[0] == 1, "the sparse Elias code should win on a Gaussian bucket"
    measured = 8 * len(p.body) - 8 - 32  # minus mode byte and norm
    assert measured <= c.sparse_bound_bits(n) + 8


def test_qsgd_picks_the_smaller_code_and_both_decode_alike():
    for kw, x in [({"s": 127, "bucket_size": 4}, _gauss(4000)),  # dense wins
                  ({"s": 4, "bucket_size": 512}, _gauss(4000))]:  # sparse wins
        auto = gradpress.get("qsgd", **kw)
        dense = gradpress.get("qsgd", **kw, sparse=False)
        pa, pd = auto.encode(x, seed=5), dense.encode(x, seed=5)
        assert len(pa) <= len(pd)
        assert (pa.body[0] == 1) == (len(pa) < len(pd))
        assert torch.equal(auto.decode(pa), dense.decode(pd))


def test_qsgd_entropy_mode_is_used_only_when_smaller():
    x = _gauss(5000)
    c = gradpress.get("qsgd", s=7, bucket_size=512, entropy=True, sparse=False)
    p = c.encode(x, seed=2)
    dense = gradpress.get("qsgd", s=7, bucket_size=512, sparse=False).encode(x, seed=2)
    assert p.body[0] == 2 and len(p) < len(dense)
    assert torch.equal(c.decode(p), gradpress.get("qsgd", s=7, sparse=False).decode(dense))


def test_qsgd_outputs_are_norm_times_level_over_s():
    c = gradpress.get("qsgd", s=4, bucket_size=None)
    x = _gauss(300)
    y = _rt(c, x, 1)
    levels = y / x.norm() * 4
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert bool((levels.abs() <= 4 + 1e-4).all())
    assert bool((torch.sign(y) * torch.sign(x) >= 0).all())


def test_qsgd_omega_is_the_lemma_3_1_bound():
    c = gradpress.get("qsgd", s=4, bucket_size=256)
    assert c.omega(10_000) == min(256 / 16, 16 / 4)
    assert c.omega(10) == min(10 / 16, math.sqrt(10) / 4)


def test_qsgd_sparse_body_with_out_of_range_position_is_rejected():
    c = gradpress.get("qsgd", s=1, bucket_size=None)
    x = torch.zeros(1000)
    x[999] = 1.0
    p = c.encode(x, seed=0)
    assert p.body[0] == 1
    bad = dataclasses.replace(p, shape=(500,))
    with pytest.raises(PayloadError):
        c.decode(bad)


# -- ECQ (its own properties are in test_ecq.py) -----------------------------------------
def test_ecq_is_qsgd_with_a_choice_of_scale():
    x = _gauss(3000, 2)
    q = gradpress.get("qsgd", s=4, bucket_size=None, entropy="best")
    e = gradpress.get("ecq", s=4, norm="l2")
    assert e.encode(x, seed=3).body == q.encode(x, seed=3).body
    assert e.compressor_id == 11 and q.compressor_id == 10


# -- sign and TernGrad --------------------------------------------------------------------
def test_scaled_sign_error_is_norm_minus_l1_squared_over_n():
    c = gradpress.get("sign", bucket_size=100)
    x = _gauss(1000)
    y = _rt(c, x)
    xb = x.double().view(10, 100)
    expect = float(((xb**2).sum(1) - xb.abs().sum(1) ** 2 / 100).sum())
    assert math.isclose(float(((y.double() - x.double()) ** 2).sum()), expect, rel_tol=1e-5)
    assert len(c.encode(x).body) == 4 * 10 + 1000 // 8


@pytest.mark.parametrize("clip", [None, 2.5, 1.0])
def test_terngrad_sends_three_values_per_bucket(clip):
    c = gradpress.get("terngrad", bucket_size=50, clip=clip)
    x = _gauss(530)  # ten whole buckets and a short one
    y = _rt(c, x, 3)
    for lo in range(0, 530, 50):
        src, row = x[lo:lo + 50].double(), y[lo:lo + 50]
        m = float(src.abs().max())
        if clip is not None:  # the scale is max |clipped|: at most clip * std
            m = min(m, clip * float(src.std(correction=0)))
        vals = torch.unique(row.abs()).tolist()
        assert all(v == 0.0 or math.isclose(v, m, rel_tol=1e-6) for v in vals), (vals, m)


def test_terngrad_clipping_cuts_the_error_on_heavy_tails():
    """Wen et al. Sec. 3.3: clipping at 2.5 standard deviations shrinks the scale, so on a
    heavy-tailed vector the (biased) clipped scheme is closer to ``x`` than the unbiased
    unclipped one; on a Gaussian the two are alike."""
    g = torch.Generator().manual_seed(4)
    # a Gaussian over a uniform power: tails like |x|^-2.4 (Pareto index 1/0.7)
    heavy = torch.randn(4000, generator=g) / torch.rand(4000, generator=g).pow(0.7)
    clipped, plain = gradpress.get("terngrad"), gradpress.get("terngrad", clip=None)
    assert not clipped.unbiased and plain.unbiased and clipped.omega(10) is None

    def rel_err(c, x):
        ys = torch.stack([_rt(c, x, s).double() for s in range(50)])
        return float(((ys - x.double()) ** 2).sum(1).mean() / (x.double() ** 2).sum())

    assert rel_err(clipped, heavy) < 0.5 * rel_err(plain, heavy)
    x = _gauss(4000, 5)
    assert rel_err(clipped, x) < 1.2 * rel_err(plain, x)


# -- natural ------------------------------------------------------------------------------
def test_natural_rounds_to_neighbouring_powers_of_two():
    c = gradpress.get("natural")
    x = torch.cat([_gauss(500), torch.zeros(3), torch.tensor([1.0, -0.25, 3e-39])])
    y = _rt(c, x, 7)
    nz = x != 0
    lo = torch.exp2(torch.floor(torch.log2(x[nz].abs())))
    lo = torch.clamp(lo, min=0.0)
    ok = (y[nz].abs() == lo) | (y[nz].abs() == 2 * lo) | (y[nz] == 0)
    assert bool(ok.all()) and bool((y[~nz] == 0).all())
    assert bool((torch.sign(y[nz]) * torch.sign(x[nz]) >= 0).all())
    assert y[-3] == 1.0 and y[-2] == -0.25
    assert 8 * len(c.encode(x).body) == 9 * x.numel() + (-9 * x.numel()) % 8


def test_natural_exponent_range_decodes_the_same_in_fewer_bits():
    x = _gauss(1000)
    a, b = gradpress.get("natural"), gradpress.get("natural", exponent_range=True)
    pa, pb = a.encode(x, seed=3), b.encode(x, seed=3)
    assert len(pb) < len(pa)
    assert torch.equal(a.decode(pa), b.decode(pb))


def test_natural_rejects_values_that_would_round_to_infinity():
    with pytest.raises(ValueError):
        gradpress.get("natural").encode(torch.tensor([3.0e38]))


def test_natural_dithering_outputs_powers_of_two_of_the_norm():
    c = gradpress.get("natural_dithering", s=5, bucket_size=None)
    x = _gauss(300)
    y = _rt(c, x, 2)
    r = (y.abs() / x.norm())[y != 0]
    k = torch.log2(r)
    assert torch.allclose(k, k.round(), atol=1e-4) and float(k.min()) >= -4 - 1e-4


# -- top-k and rand-k ---------------------------------------------------------------------
@pytest.mark.parametrize("d,k", [(1000, 10), (200_000, 1000), (50, 50)])
def test_topk_keeps_exactly_the_k_largest(d, k):
    c = gradpress.get("topk", k=k)
    x = _gauss(d, 9)
    y = _rt(c, x)
    keep = torch.topk(x.abs(), k).indices
    assert torch.equal(y[keep], x[keep]) and int((y != 0).sum()) == k


def test_topk_codes_clustered_indices_as_gaps_and_spread_ones_fixed_width():
    c = gradpress.get("topk", k=100)
    clustered = torch.zeros(100_000)
    clustered[500:600] = 1 + _gauss(100).abs()
    pc = c.encode(clustered)
    assert 8 * len(pc.body) < 32 * 100 + 1 + 100 * 17  # gaps of 1: one bit each
    assert torch.equal(c.decode(pc), clustered)
    spread = torch.zeros(1 << 10)
    spread[torch.arange(0, 1 << 10, 1 << 10 >> 7)[:100]] = 1.0 + _gauss(100).abs()
    ps = c.encode(spread)
    assert 8 * len(ps.body) <= 32 * 100 + 1 + 100 * 10 + 7
    assert torch.equal(c.decode(ps), spread)


def test_randk_sends_only_values_and_indices_follow_the_seed():
    c = gradpress.get("randk", k=30)
    x = _gauss(10_000)
    p = c.encode(x, seed=123)
    assert len(p.body) == 4 * 30 and p.seed == 123
    y = c.decode(p)
    idx = torch.nonzero(y).squeeze(1)
    assert torch.equal(torch.sort(idx).values, torch.sort(shared_indices(10_000, 30, 123)).values)
    assert torch.allclose(y[idx], x[idx] * (10_000 / 30))
    assert not torch.equal(shared_indices(10_000, 30, 124), shared_indices(10_000, 30, 123))


@pytest.mark.parametrize("n,k", [(50, 5), (50, 40)])
def test_shared_indices_are_distinct_and_uniform(n, k):
    counts = np.zeros(n)
    trials = 2000
    for seed in range(trials):
        idx = shared_indices(n, k, seed).numpy()
        assert len(set(idx.tolist())) == k
        counts[idx] += 1
    expect = trials * k / n
    chi2 = float(((counts - expect) ** 2 / expect).sum()) * (1 - k / n) ** -1
    assert chi2 < n + 6 * math.sqrt(2 * n), chi2


# -- PowerSGD ------------------------------------------------------------------------------
def test_powersgd_reshape_rule():
    assert matrix_shape((100,)) == (10, 10)
    assert matrix_shape((12,)) == (3, 4)
    assert matrix_shape((13,)) == (1, 13)
    assert matrix_shape(()) == (1, 1)
    assert matrix_shape((4, 3, 5)) == (4, 15)
    assert matrix_shape((6, 0)) == (6, 0)


def test_powersgd_sends_raw_float32_when_factors_are_not_smaller():
    c = gradpress.get("powersgd", rank=1)
    x = _gauss(13)  # (1, 13): 1*(1+13) >= 13
    p = c.encode(x)
    assert len(p.body) == 4 * 13 and torch.equal(c.decode(p), x)
    y = _gauss(64).view(8, 8)
    assert len(c.encode(y).body) == 4 * (8 + 8)
    assert 8 * len(c.encode(y)) == c.expected_bits(64, (8, 8)) == 8 * header_size(2) + 512


def test_powersgd_recovers_a_low_rank_matrix_without_the_seed():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(30, 2, generator=g) @ torch.randn(2, 20, generator=g)
    c = gradpress.get("powersgd", rank=2, power_iterations=2)
    p = c.encode(m, seed=9)
    assert p.seed is None
    assert torch.allclose(c.decode(p.to_bytes()), m, atol=1e-4)
    assert c.encode(m, seed=9).to_bytes() == p.to_bytes()
    assert c.alpha(600) is None


def test_powersgd_never_increases_the_error_beyond_the_norm():
    c = gradpress.get("powersgd", rank=1)
    for seed in range(5):
        m = _gauss(600, seed).view(20, 30)
        assert float((_rt(c, m, seed) - m).norm()) <= float(m.norm()) * (1 + 1e-6)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("n,b", [(10, 3), (1 << 18, 512), (300_000, 200_000), (5, 5), (7, 100)])
def test_row_blocks_cover_every_element_once_with_its_bucket(device, n, b):
    b = min(b, n)
    seen = np.zeros(n, dtype=np.int64)
    for start, bucket, rows, width in fc._row_blocks(n, b, torch.device(device)):
        span = np.arange(start, start + rows * width)
        seen[span] += 1
        if rows > 1:
            assert width == b and start == bucket * b
        assert bucket == start // b and (start + rows * width - 1) // b == bucket + rows - 1
    assert (seen == 1).all()


VARIANTS = [("qsgd", {"entropy": True, "sparse": False}), ("qsgd", {"s": 1, "bucket_size": None}),
            ("ecq", {"entropy": True}), ("ecq", {"s": 1, "norm": "linf", "entropy": "huffman"}),
            ("qsgd", {"s": 7, "entropy": "huffman", "sparse": False}),
            ("natural", {"exponent_range": True}),
            ("topk", {"ratio": 0.3, "values": "fp16"}), ("randk", {"values": "fp16"})]


@pytest.mark.parametrize("name,kw", VARIANTS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_non_default_variants_reject_or_survive_corrupt_bodies(name, kw, data):
    c = gradpress.get(name, **kw)
    p = c.encode(_gauss(300, 5), seed=4)
    body = bytearray(p.body)
    if data.draw(st.booleans()):
        body = body[:data.draw(st.integers(0, len(body)))]
    else:
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, 8 * len(body) - 1))
            body[i // 8] ^= 1 << (i % 8)
    try:
        y = c.decode(dataclasses.replace(p, body=bytes(body)))
    except PayloadError:
        return
    assert y.shape == (300,) and bool(torch.isfinite(y).all())


@pytest.mark.parametrize("name,kw", [("ecq", {"s": 3, "entropy": False, "sparse": False}),
                                     ("ecq", {"bits": 2, "norm": "linf", "entropy": False,
                                              "sparse": False}),
                                     ("qsgd", {"s": 1, "sparse": False}), ("terngrad", {})])
def test_huffman_mode_is_exact_smaller_and_decodes_the_same(name, kw):
    x = _gauss(20_000, 9)
    plain = gradpress.get(name, **kw)
    huff = gradpress.get(name, **(kw | {"entropy": "huffman"}))
    p, q = plain.encode(x, seed=2), huff.encode(x, seed=2)
    assert q.body[0] == 3 and len(q.body) < len(p.body)  # mode HUFFMAN, smaller
    assert torch.equal(plain.decode(p), huff.decode(q))
    sym = plain._quantize(x, None, 2)[1].numpy().astype(np.int64)  # (TernGrad clips first)
    size = plain.levels
    if plain.levels <= 4:  # letters are pairs levels*a + b (x has an even length here)
        sym, size = sym[0::2] * plain.levels + sym[1::2], plain.levels ** 2
    counts = np.bincount(sym, minlength=size)
    bits = int((counts * hf.code_lengths(counts).astype(np.int64)).sum())
    head = 8 + 32 * fc.n_buckets(x.numel(), plain.bucket_size) + 4 * size
    assert len(q.body) == (head + 7) // 8 + (bits + 7) // 8


@pytest.mark.parametrize("n", [1, 2, 3, 513, 1001])
def test_huffman_pairs_round_trip_odd_lengths_and_reject_a_bad_pad(n):
    ternary = {"s": 1, "norm": "linf", "bucket_size": 512, "sparse": False}
    c = gradpress.get("ecq", **ternary, entropy="huffman")
    x = _gauss(n, 3)
    p = c.encode(x, seed=1)
    plain = gradpress.get("ecq", **ternary, entropy=False)
    assert torch.equal(c.decode(p), plain.decode(plain.encode(x, seed=1)))
    if n % 2 and p.body[0] == 3:
        # rewrite the body with the last pair's pad half set to 1 (letter +1)
        w = cbits.BitReader(p.body)
        w.read_uint(1, 8)
        scales = w.read_float32(fc.n_buckets(n, c.bucket_size))
        from gradpress.compressors._uniform import HUFFMAN
        sym = fc.scaled_quantize(x, c.bucket_size, c.norm, c.gain, c.offset, 3, 1, None)[1]
        s = np.append(sym.numpy(), np.uint8(1))
        letters = s[0::2] * 3 + s[1::2]
        lengths = hf.code_lengths(np.bincount(letters, minlength=9) + 1)
        bw = cbits.BitWriter()
        bw.write_uint(HUFFMAN, 8)
        bw.write_float32(scales)
        bw.write_uint(lengths, 4)
        data, _ = hf.encode(letters.astype(np.uint8), lengths)
        bw.align()
        bw.write_bytes(data)
        bad = dataclasses.replace(p, body=bw.getvalue())
        with pytest.raises(PayloadError, match="pads its last pair"):
            c.decode(bad)
