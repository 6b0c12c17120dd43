"""`gradpress simulate optimal-real` (the "Optimal Gradient Compression" poster's setting):
bytes to the target are sums of real payload lengths; ratios are ratios of those sums."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradpress.payload import header_size
from gradpress.sim.problems import real_dataset


def test_poster_problems_have_d_features_and_no_bias_column():
    assert real_dataset("diabetes", bias=False).d == 10
    bc = real_dataset("breast_cancer_mean", bias=False)
    assert bc.d == 10 and bc.kind == "logistic"
    np.testing.assert_allclose(bc.X, real_dataset("breast_cancer", bias=False).X[:, :10])
    assert real_dataset("breast_cancer").d == 31


def test_optimal_real_quick_bytes_to_target_are_real_payload_sums(tmp_path, capsys):
    from gradpress.cli import main

    target = 1e-3
    assert main(["simulate", "optimal-real", "--quick", "--topk", "5", "--target", str(target),
                 "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "optimal_real.json").read_text())
    assert res["command"].startswith("gradpress simulate optimal-real --quick")
    (ds,) = res["datasets"]
    assert (ds["name"], ds["d"]) == ("breast_cancer_mean", 10)
    rows = {r["method"]: r for r in ds["table"]}
    fp = rows["fp32"]
    assert fp["message_bytes"] == 4 * 10 * fp["iters"]
    assert fp["payload_bytes"] == (header_size(1) + 4 * 10) * fp["iters"]
    curves = {c["label"]: c for c in ds["curves"]}
    sph = curves["Spherical nu=0.2"]
    assert rows["Spherical nu=0.2"]["payload_bytes"] - rows["Spherical nu=0.2"][
        "message_bytes"] == header_size(1, seed=True) * rows["Spherical nu=0.2"]["iters"]
    # one float32 norm + about -log2 P(0.8, 10) + 1.5 bits of index per step
    per_step = sph["message_bytes"][-1] / sph["iters"][-1]
    assert 5.5 <= per_step <= 7.0
    for name, r in rows.items():
        c = curves[name]
        assert c["rel_error"][-1] <= target < c["rel_error"][-2]  # stopped at the first hit
        assert r["message_bytes"] == c["message_bytes"][-1]
        assert r["message_vs_fp32"] == pytest.approx(fp["message_bytes"] / r["message_bytes"])
        assert r["payload_vs_fp32"] == pytest.approx(fp["payload_bytes"] / r["payload_bytes"])
        assert f"{r['message_vs_fp32']:.2f}" in out
    assert rows["top-k k=5"]["message_vs_topk"] == 1.0
    assert (tmp_path / "optimal_real_breast_cancer_mean.png").stat().st_size > 0

    results = tmp_path / "results"
    (results / "optimal-real").mkdir(parents=True)
    (results / "optimal-real" / "optimal_real.json").write_text(json.dumps(res))
    assert main(["reproduce", "--results", str(results)]) == 0
    table = capsys.readouterr().out
    assert "breast_cancer_mean (d=10, logistic) (--quick)" in table
    assert "2.35k (alpha 0.2)" in table and res["command"] in table
