"""The rate-distortion bounds of Albasyoni et al. 2020 (gradpress.bounds): closed forms in low
dimension, exact vs asymptotic agreement, monotonicity, the paper's numbers, Monte Carlo checks
of the average-case and random-code formulas, and the measurement helpers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special

import gradpress
from gradpress import bounds as B
from gradpress.payload import header_size

alphas = st.floats(0.01, 0.99)
log_dims = st.floats(0.5, 9.0)


def test_cap_measure_matches_closed_forms_on_circle_and_sphere():
    for a in (0.05, 0.3, 0.5, 0.9, 0.999):
        # S^1: the arc of half-angle arccos(sqrt a) out of 2 pi.
        assert B.log2_cap_measure(a, 2) == pytest.approx(
            math.log2(math.acos(math.sqrt(a)) / math.pi), abs=1e-12)
        # S^2 (Archimedes): area fraction (1 - cos theta) / 2.
        assert B.log2_cap_measure(a, 3) == pytest.approx(
            math.log2((1 - math.sqrt(a)) / 2), abs=1e-12)
    assert B.log2_cap_measure(0.7, 1) == -1.0
    assert B.log2_cap_measure(1.0, 5) == -math.inf


def test_log_space_continued_fraction_matches_scipy_where_both_work():
    # Regions where I_x(a, b) is tiny but still representable: the CF branch must agree.
    for a, b, x in [(50.0, 0.5, 0.1), (400.0, 0.5, 0.5), (1000.0, 1.5, 0.7), (30.0, 0.5, 0.01)]:
        ref = math.log(special.betainc(a, b, x))
        log_front = a * math.log(x) + b * math.log1p(-x) - special.betaln(a, b) - math.log(a)
        assert log_front + B._log_betacf(a, b, x) == pytest.approx(ref, rel=1e-10, abs=1e-10)


@settings(max_examples=60, deadline=None)
@given(a=alphas, logd=st.floats(2.0, 9.0))
def test_exact_and_asymptotic_cap_measure_agree_for_large_d(a, logd):
    d = int(10**logd)
    exact, asym = B.log2_cap_measure(a, d), B.log2_cap_measure_asymptotic(a, d)
    # The Laplace form drops an O(1/(a d)) relative term: a few hundredths of a bit at most.
    assert abs(exact - asym) <= 5.0 / (a * d) + 1e-9 * abs(exact)
    assert math.isfinite(exact) and exact < 0


@settings(max_examples=60, deadline=None)
@given(a1=alphas, a2=alphas, l1=log_dims, l2=log_dims)
def test_worst_case_bound_is_monotone_in_alpha_and_d(a1, a2, l1, l2):
    lo, hi = sorted((a1, a2))
    d1, d2 = sorted((max(2, int(10**l1)), max(2, int(10**l2))))
    assert B.worst_case_bits(lo, d1) <= B.worst_case_bits(hi, d1) + 1e-9
    assert B.worst_case_bits(lo, d1) <= B.worst_case_bits(lo, d2) + 1e-9


def test_bound_per_coordinate_tends_to_half_log_of_inverse_distortion_at_d_1e9():
    d = 10**9
    for a in (0.1, 0.5, 0.9, 0.99):
        # b/d = 1/2 log2(1/(1-a)) + O(log(d)/d): within 1e-7 bits/coordinate at d = 1e9.
        assert B.worst_case_bits(a, d) / d == pytest.approx(0.5 * math.log2(1 / (1 - a)),
                                                             abs=1e-7)


def test_paper_gap_of_deterministic_sparse_dithering_is_1_69_bits():
    # Sparse Dithering with nu = 1/10 costs 3.35 d bits; the bound at alpha = 0.9 is
    # 1/2 log2(10) = 1.661 bits/coordinate, so the paper's gap is 1.69.
    for d in (10**4, 10**6, 10**9):
        gap = 3.35 - B.worst_case_bits(0.9, d) / d
        assert gap == pytest.approx(1.69, abs=0.005)


def test_asymptotic_optimum_adds_log_d_and_half_log_log_d():
    for d in (100, 10**6):
        extra = B.optimal_bits_asymptotic(0.5, d) - B.worst_case_bits(0.5, d)
        assert extra == pytest.approx(math.log2(d) + 0.5 * math.log2(math.log2(d)))


@settings(max_examples=25, deadline=None)
@given(a=st.floats(0.05, 0.95), logd=st.floats(0.5, 6.0))
def test_average_case_bound_is_below_worst_case_and_inverts(a, logd):
    d = max(2, int(10**logd))
    if a <= 1.0 / d:
        return
    b = B.average_case_bits(a, d)
    assert 0 <= b <= B.worst_case_bits(a, d) + 1e-9
    assert B.average_case_alpha(b, d) == pytest.approx(a, rel=1e-6)
    assert B.worst_case_alpha(B.worst_case_bits(a, d), d) == pytest.approx(a, rel=1e-6)


def test_cap_mean_alpha_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    for d, a0 in [(3, 0.5), (8, 0.3)]:
        x = torch.randn(400_000, d, generator=g, dtype=torch.float64)
        t = x[:, 0] / x.norm(dim=1)
        inside = t >= math.sqrt(a0)
        assert float(inside.double().mean()) == pytest.approx(
            2.0 ** B.log2_cap_measure(a0, d), rel=0.03)
        assert float((t[inside] ** 2).mean()) == pytest.approx(B.cap_mean_alpha(a0, d),
                                                               rel=0.01)


def test_random_code_alpha_matches_monte_carlo():
    g = torch.Generator().manual_seed(1)
    n, bits, trials = 8, 6, 4000
    v = torch.randn(trials, 1 << (bits - 1), n, generator=g, dtype=torch.float64)
    v = v / v.norm(dim=2, keepdim=True)
    x = torch.randn(trials, n, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    best = (torch.einsum("tmn,tn->tm", v, x) ** 2).max(dim=1).values
    assert float(best.mean()) == pytest.approx(B.random_code_alpha(bits, n), abs=0.01)


@pytest.mark.parametrize("n,bits", [(4, 4), (8, 8), (16, 10), (16, 12), (32, 16)])
def test_random_code_sits_within_a_bit_of_the_average_case_bound(n, bits):
    alpha = B.random_code_alpha(bits, n)
    gap = bits - B.average_case_bits(alpha, n)
    assert 0.0 <= gap <= 1.0, gap


def test_bounds_reject_bad_arguments():
    for bad in [(0.0, 10), (1.5, 10), (0.5, 0), (0.5, 2.5)]:
        with pytest.raises(ValueError):
            B.worst_case_bits(*bad)


def test_measure_reports_real_payload_bits_and_distortion():
    x = [torch.randn(100, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    m = B.measure(gradpress.get("fp32"), x)
    assert m.payload_bits == 8 * (header_size(1) + 400) == 8 * (18 + 400) and m.body_bits == 3200
    assert m.distortion == 0.0 and m.bits_per_coord == pytest.approx(8 * 418 / 100)
    m16 = B.measure(gradpress.get("fp16"), x)
    assert 0 < m16.distortion < 1e-6 and m16.scaled_distortion == m16.distortion
    sd = gradpress.get("sparse_dithering_rand", omega=1.0)
    mr = B.measure(sd, x, seeds=range(20))
    assert mr.unbiased and mr.scaled_distortion == pytest.approx(
        mr.distortion / (1 + mr.distortion))
    assert B.empirical_omega(sd, x[0], range(20)) <= 1.2
    assert B.gap_to_bound(mr) > 0


def test_bound_curves_are_ordered():
    c = B.bound_curves(1000, [0.01, 0.1, 0.5])
    assert c["worst_case"] == sorted(c["worst_case"], reverse=True)
    assert all(a <= w + 1e-9 for a, w in zip(c["average_case"], c["worst_case"]))


def test_bounds_command_writes_plot_json_and_table(tmp_path):
    import json

    from gradpress.cli import main

    out = tmp_path / "b"
    assert main(["bounds", "--dims", "64", "--samples", "1", "--no-real", "--no-sweep",
                 "--compressors", "sparse_dithering,spherical,fp32", "--out", str(out)]) == 0
    rows = json.loads((out / "bounds.json").read_text())["rows"]
    assert {r["compressor"] for r in rows} == {"sparse_dithering", "spherical", "fp32"}
    sd = next(r for r in rows if r["compressor"] == "sparse_dithering")
    assert sd["over_worst"] > 0 and sd["distortion"] <= 0.1 + 1e-6
    assert (out / "bounds.png").stat().st_size > 10_000
    assert "| 64 | gaussian | sparse_dithering |" in (out / "bounds.md").read_text()
