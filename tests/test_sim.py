"""The worker simulator: exact optima against scipy, splits, honest bytes, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import scipy.sparse.linalg
import torch

from gradpress.sim import Method, Problem, Simulation, real_dataset, split, synthetic_linear


def test_least_squares_optimum_matches_scipy_lstsq():
    pr = synthetic_linear(n=300, d=20, seed=3)
    w, f = pr.optimum()
    ref = scipy.linalg.lstsq(pr.X, pr.y)[0]
    np.testing.assert_allclose(w, ref, rtol=1e-9, atol=1e-10)
    assert f == pytest.approx(pr.loss(ref), rel=1e-12)
    np.testing.assert_allclose(pr.grad(w), 0.0, atol=1e-10)


def test_ridge_optimum_matches_scipy_lsqr_with_damping():
    pr = real_dataset("diabetes", lam=1e-2)
    w, _ = pr.optimum()
    ref = scipy.sparse.linalg.lsqr(pr.X, pr.y, damp=np.sqrt(pr.n * pr.lam), atol=1e-14,
                                   btol=1e-14, iter_lim=10_000)[0]
    np.testing.assert_allclose(w, ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["breast_cancer", "digits"])
def test_logistic_optimum_matches_scipy_minimize(name):
    pr = real_dataset(name, lam=1e-2)
    w, f = pr.optimum()
    res = scipy.optimize.minimize(pr.loss, np.zeros(pr.d), jac=pr.grad, method="BFGS",
                                  options={"gtol": 1e-10, "maxiter": 5000})
    assert f <= res.fun + 1e-12
    assert f == pytest.approx(res.fun, rel=1e-9)
    np.testing.assert_allclose(w, res.x, atol=1e-5)
    np.testing.assert_allclose(pr.grad(w), 0.0, atol=1e-9)


def test_gradient_matches_finite_differences():
    for pr in (real_dataset("wine", lam=0.1), synthetic_linear(n=50, d=4, kind="ridge",
                                                                lam=0.3)):
        w = np.random.default_rng(0).standard_normal(pr.d) * 0.3
        num = scipy.optimize.approx_fprime(w, pr.loss, 1e-7)
        np.testing.assert_allclose(pr.grad(w), num, rtol=1e-4, atol=1e-5)


def test_worker_gradients_average_to_the_global_gradient():
    pr = real_dataset("breast_cancer", lam=1e-2)
    sim = Simulation(pr, split(pr.n, 7, seed=1))
    w = torch.randn(pr.d) * 0.1
    g = sim.worker_grads(w, None).mean(dim=0).double().numpy()
    np.testing.assert_allclose(g, sim.problem.grad(w), rtol=1e-4, atol=1e-6)


def test_splits_are_disjoint_equal_shards_and_noniid_sorts_by_key():
    y = np.repeat(np.arange(5), 20)[np.random.default_rng(0).permutation(100)]
    iid = split(100, 8, "iid", seed=0)
    assert iid.shape == (8, 12) and len(np.unique(iid)) == 96
    non = split(100, 5, "noniid", key=y, seed=0)
    assert all(len(np.unique(y[r])) == 1 for r in non)
    assert len(set(y[non[:, 0]])) == 5
    with pytest.raises(ValueError):
        split(100, 5, "noniid")
    with pytest.raises(ValueError):
        split(3, 5)


def test_fixed_seed_gives_identical_curves_and_another_seed_does_not():
    pr = synthetic_linear(n=400, d=16, seed=0)
    m = Method("q", "fp16", feedback="ecq", feedback_kw={"alpha": 0.5, "beta": 0.9})

    def run(seed):
        sim = Simulation(pr, split(pr.n, 4, seed=0), batch_size=8, seed=seed)
        return sim.run(m, iters=50, lr=0.05, record_every=1, progress=False)

    a, b, c = run(7), run(7), run(8)
    assert a.loss == b.loss and a.dist == b.dist and a.bits_per_worker == b.bits_per_worker
    assert a.loss != c.loss


def test_bytes_are_the_real_payload_sizes():
    pr = synthetic_linear(n=200, d=10, seed=0)
    sim = Simulation(pr, split(pr.n, 4, seed=0))
    c = sim.run(Method("fp32", "fp32"), iters=5, lr=0.1, record_every=1, progress=False)
    one = len(__import__("gradpress").get("fp32").encode(torch.zeros(10)).to_bytes())
    assert one == 14 + 4 + 4 * 10  # header_size(1) + 4 bytes per value
    assert c.bytes_per_worker_total == [5 * one] * 4
    assert c.bits_per_worker == [8.0 * one * t for t in range(6)]
    assert c.bytes_per_step_mean == one


def test_full_precision_gradient_descent_reaches_the_optimum():
    pr = real_dataset("diabetes", lam=0.1)  # condition number ~40
    sim = Simulation(pr, split(pr.n, 4, seed=0))
    L, _ = sim.smoothness()
    c = sim.run(Method("gd", "fp32"), iters=300, lr=1.0 / L, progress=False)
    assert c.loss[-1] - c.f_star < 1e-5 * (c.loss[0] - c.f_star)
    assert c.dist[-1] < 1e-2 * c.dist[0]
    assert all(a >= b - 1e-12 for a, b in zip(c.loss, c.loss[1:]))  # GD with 1/L descends


def test_a_diverging_run_is_flagged_not_raised():
    pr = synthetic_linear(n=200, d=10, seed=0)
    sim = Simulation(pr, split(pr.n, 2, seed=0))
    c = sim.run(Method("gd", "fp32"), iters=500, lr=50.0, record_every=1, progress=False)
    assert c.diverged and c.final_loss() == float("inf")


def test_real_datasets_load_standardized_with_a_bias_column():
    for name, kind in [("diabetes", "ridge"), ("breast_cancer", "logistic"),
                       ("digits", "logistic"), ("wine", "logistic")]:
        pr = real_dataset(name)
        assert pr.kind == kind and np.all(pr.X[:, -1] == 1.0)
        np.testing.assert_allclose(pr.X[:, :-1].mean(axis=0), 0.0, atol=1e-9)
        if kind == "logistic":
            assert set(np.unique(pr.y)) == {-1.0, 1.0}


def test_bad_problems_raise_value_error():
    with pytest.raises(ValueError):
        Problem("x", "hinge", np.zeros((2, 2)), np.zeros(2))
    with pytest.raises(ValueError):
        Problem("x", "logistic", np.zeros((2, 2)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError):
        Problem("x", "least_squares", np.zeros((2, 2)), np.zeros(3))
    with pytest.raises(ValueError):
        real_dataset("mnist")
    pr = synthetic_linear(n=40, d=3)
    with pytest.raises(ValueError):
        Simulation(pr, split(40, 2), batch_size=0)
    with pytest.raises(ValueError):
        Simulation(pr, split(40, 2)).run(Method("a", "fp32"), iters=3, lr=-1.0,
                                         progress=False)


def test_simulate_commands_write_plots_and_json(tmp_path):
    import json

    from gradpress.cli import main

    base = ["--quick", "--iters", "6", "--no-progress", "--out"]
    assert main(["simulate", "ecq-linear", *base, str(tmp_path / "a"), "--dims", "24"]) == 0
    assert main(["simulate", "alpha-beta", *base, str(tmp_path / "b"), "--dim", "16"]) == 0
    assert main(["simulate", "optimal-real", *base, str(tmp_path / "c"), "--compressors",
                 "fp32,fp16+ecq:alpha=0.5;beta=0.9,not_a_compressor"]) == 0
    res = json.loads((tmp_path / "a" / "ecq_linear.json").read_text())
    curves = res["datasets"][0]["curves"]
    assert curves[0]["label"] == "32Bit-FP" and len(curves[0]["loss"]) == 7
    assert (tmp_path / "a" / "ecq_linear_syn-24.png").stat().st_size > 0
    ab = json.loads((tmp_path / "b" / "alpha_beta.json").read_text())
    assert len(ab["final_loss"]) == 3 and (tmp_path / "b" / "alpha_beta.png").exists()
    real = json.loads((tmp_path / "c" / "optimal_real.json").read_text())
    assert [c["label"] for c in real["datasets"][0]["curves"]] == [
        "fp32", "fp16+ecq:alpha=0.5;beta=0.9"]


def test_method_specs_parse_compressor_options_and_feedback():
    from gradpress.sim.experiments import parse_method

    m = parse_method("qsgd:s=4;bucket_size=None+ecq:alpha=0.2;beta=0.95")
    assert (m.compressor, m.compressor_kw) == ("qsgd", {"s": 4, "bucket_size": None})
    assert (m.feedback, m.feedback_kw) == ("ecq", {"alpha": 0.2, "beta": 0.95})
    assert parse_method("fp32").feedback == "none"
    with pytest.raises(ValueError):
        parse_method("qsgd:s")


def test_theory_step_shrinks_with_compressor_variance():
    from gradpress.sim.experiments import theory_step

    pr = real_dataset("wine")
    sim = Simulation(pr, split(pr.n, 4, seed=0))
    L, _ = sim.smoothness()
    import gradpress

    assert theory_step(sim, gradpress.get("fp32"), "none") == pytest.approx(1.0 / L)
    assert theory_step(sim, gradpress.get("qsgd", s=1), "none") < 1.0 / L


def test_window_batches_are_views_with_the_gathered_gradient():
    pr = synthetic_linear(n=120, d=6, seed=2, dtype=np.float32)
    blocks = Simulation(pr, split(pr.n, 4, "blocks"), batch_size=7, batches="window")
    scattered = Simulation(pr, split(pr.n, 4, seed=1), batch_size=7, batches="window")
    assert blocks._blocks and not scattered._blocks
    w = torch.randn(6)
    starts = torch.tensor([0, 10, 25, 28])  # 25 and 28 wrap around a shard of 30
    idx = (starts[:, None] + torch.arange(7)) % 30
    np.testing.assert_allclose(blocks.window_grads(w, starts).numpy(),
                               blocks.worker_grads(w, idx).numpy(), rtol=1e-5, atol=1e-5)
    # every row of a shard is in exactly b of its m windows: the window gradient is unbiased
    all_starts = torch.arange(30)
    mean = torch.stack([blocks.window_grads(w, torch.full((4,), int(s))) for s in all_starts])
    np.testing.assert_allclose(mean.mean(0).numpy(), blocks.worker_grads(w, None).numpy(),
                               rtol=1e-4, atol=1e-4)
    c = blocks.run(Method("fp32", "fp32"), iters=20, lr=0.05, progress=False)
    assert c.loss[-1] < c.loss[0]
    with pytest.raises(ValueError):
        Simulation(pr, split(pr.n, 4, "blocks"), batch_size=31, batches="window")


def test_ecq_linear_quick_table_ratios_are_payload_byte_ratios(tmp_path, capsys):
    """The quick form of `gradpress simulate ecq-linear` on Syn-256: every ratio in its table
    is full precision's bytes over the method's, both from real payload lengths."""
    import json

    from gradpress.cli import main
    from gradpress.payload import header_size

    iters = 20
    assert main(["simulate", "ecq-linear", "--quick", "--dims", "256", "--iters", str(iters),
                 "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "ecq_linear.json").read_text())
    assert res["command"].startswith("gradpress simulate ecq-linear --quick")
    ds = res["datasets"][0]
    curves = {c["label"]: c for c in ds["curves"]}
    rows = {r["label"]: r for r in ds["summary"]}
    assert list(rows) == ["32Bit-FP", "QSGD s=4 l2", "ECQ-SGD s=4 l2", "ECQ-SGD s=4 l-inf",
                          "1Bit-SGD (sign + EF)"]
    fp, fp_row = curves["32Bit-FP"], rows["32Bit-FP"]
    assert fp["body_bytes_per_step_mean"] == 4 * 256
    assert fp["bytes_per_step_mean"] == header_size(1) + 4 * 256
    for label, c in curves.items():
        r = rows[label]
        assert c["bytes_per_step_mean"] == pytest.approx(np.mean(c["bytes_per_worker_total"])
                                                         / iters)
        assert c["bytes_per_step_mean"] - c["body_bytes_per_step_mean"] == header_size(1)
        assert r["compression_ratio"] == pytest.approx(fp["bytes_per_step_mean"]
                                                       / c["bytes_per_step_mean"])
        assert r["body_ratio"] == pytest.approx(fp["body_bytes_per_step_mean"]
                                                / c["body_bytes_per_step_mean"])
        assert r["rel_loss_gap"] == pytest.approx(
            (r["final_loss"] - fp_row["final_loss"]) / fp_row["final_loss"])
        assert f"{r['body_ratio']:.1f}" in out and f"{r['compression_ratio']:.1f}" in out
    ecq = rows["ECQ-SGD s=4 l2"]
    assert ecq["body_bytes_per_step"] <= (8 + 32 + 256 * 4) / 8  # at most the dense code
    assert ecq["body_ratio"] > 8  # smaller than the dense code (8x) on a 256-d gradient

    results = tmp_path / "results"
    results.mkdir()
    assert main(["reproduce", "--results", str(results)]) == 1  # nothing there yet
    (results / "ecq-linear").mkdir()
    (results / "ecq-linear" / "ecq_linear.json").write_text(json.dumps(res))
    capsys.readouterr()
    assert main(["reproduce", "--results", str(results)]) == 0
    table = capsys.readouterr().out
    assert "syn-256" in table and res["command"] in table
    assert f"{ecq['body_ratio']:.1f}x body" in table
