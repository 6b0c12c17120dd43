"""The ResNet-20 task and ECQ-SGD's CNN experiment (``gradpress train --experiment ecq-resnet``)."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from gradpress.train.ecq_resnet import GAP_TOL_PTS, compare, summarize
from gradpress.train.resnet import RESNET20_PARAMS, BasicBlock, build_resnet20


def test_resnet20_has_nine_residual_blocks_batch_norm_and_the_claimed_parameters():
    m = build_resnet20()
    blocks = [b for b in m.modules() if isinstance(b, BasicBlock)]
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    linears = [c for c in m.modules() if isinstance(c, nn.Linear)]
    assert len(blocks) == 9
    assert len(convs) + len(linears) == 20  # 6n + 2 weighted layers, n = 3
    assert sum(isinstance(b, nn.BatchNorm2d) for b in m.modules()) == len(convs)
    assert sum(p.numel() for p in m.parameters()) == RESNET20_PARAMS == 269_434
    assert m(torch.zeros(4, 1, 8, 8)).shape == (4, 10)


@pytest.mark.parametrize("c_in,c_out,stride", [(16, 16, 1), (16, 32, 2)])
def test_block_with_zero_weights_passes_its_input_through_the_shortcut(c_in, c_out, stride):
    block = BasicBlock(c_in, c_out, stride)
    for conv in (block.conv1, block.conv2):
        nn.init.zeros_(conv.weight)
    x = torch.randn(2, c_in, 8, 8, generator=torch.Generator().manual_seed(0))
    want = x[:, :, ::stride, ::stride]
    pad = c_out - c_in
    want = torch.cat([torch.zeros(2, pad // 2, *want.shape[2:]), want,
                      torch.zeros(2, pad - pad // 2, *want.shape[2:])], dim=1)
    torch.testing.assert_close(block(x), torch.relu(want))


def _run(payload_steps, params=1000, acc=0.9):
    return {"steps": len(payload_steps), "params": params, "final_test_acc": acc,
            "per_step": {"payload_bytes": payload_steps, "header_bytes": [18] * len(
                payload_steps)}, "method": "m", "hook": "h", "train_time_s": 1.0}


def test_ratio_is_fp32_bytes_over_the_measured_payload_bytes_of_every_rank():
    steps = [500, 300, 100, 100]  # entropy-coded sizes vary step to step
    r = summarize(_run(steps), rank_payload=[1000, 1400], rank_headers=[72, 72],
                  rank_sent=[1100, 1500])
    assert r["payload_bytes_per_step"] == (1000 + 1400) / 2 / 4
    assert r["ratio"] == 4000 / 300
    assert r["body_ratio"] == 4000 / ((2400 - 144) / 8)
    assert r["sent_ratio"] == 4000 / 325
    r2 = summarize(_run(steps), rank_payload=[2000, 2800], rank_headers=[72, 72],
                   rank_sent=[1100, 1500])
    assert r2["ratio"] == r["ratio"] / 2  # twice the bytes measured: half the ratio
    with pytest.raises(ValueError, match="no bytes measured"):
        summarize(_run([]), rank_payload=[0, 0], rank_headers=[0, 0], rank_sent=[0, 0])


def test_gap_is_against_fp32_of_the_same_seed_and_match_respects_the_tolerance():
    def row(label, seed, acc, payload):
        return {"label": label, "seed": seed, "final_test_acc": acc, "steps": 10,
                "fp32_bytes_per_step": 4000, "payload_bytes_per_step": payload,
                "body_bytes_per_step": payload - 18, "sent_bytes_per_step": payload + 8}

    runs = [row("fp32", 0, 0.99, 4000), row("fp32", 1, 0.98, 4000),
            row("a", 0, 0.99, 40), row("a", 1, 0.97, 40),          # mean gap -0.5: ok
            row("b", 0, 0.99, 10), row("b", 1, 0.9699, 10)]        # -0.505: out
    res = compare(runs)
    s = {x["label"]: x for x in res["summary"]}
    assert s["a"]["acc_gap_pts"] == pytest.approx(-0.5)
    assert s["a"]["worst_gap_pts"] == pytest.approx(-1.0)
    assert s["b"]["acc_gap_pts"] < -GAP_TOL_PTS
    assert res["match"]["label"] == "a" and res["match"]["ratio"] == 100.0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("resnet")
    cmd = [sys.executable, "-m", "gradpress", "train", "--experiment", "ecq-resnet",
           "--quick", "--out", str(out)]
    # torchrun and two ranks; three methods of a few steps each (~20 s alone, more on
    # busy cores)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "ecq_resnet.json").read_text()), out


def test_quick_experiment_writes_every_method_with_measured_bytes(quick):
    res, _ = quick
    assert res["quick"] is True and "--quick" in res["command"]
    labels = [s["label"] for s in res["summary"]]
    assert labels[0] == "fp32" and any("QSGD" in x for x in labels)
    assert any("ECQ" in x for x in labels)
    for r in res["runs"]:
        assert r["params"] == RESNET20_PARAMS and len(r["rank_payload_bytes"]) == 2
        # rank 0's per-step payloads add up to its total: the bytes the hook measured
        assert sum(r["step_payload_bytes"]) == r["rank_payload_bytes"][0]
        assert r["ratio"] == pytest.approx(4 * r["params"] * r["steps"] * 2
                                           / sum(r["rank_payload_bytes"]))
        if r["label"] == "fp32":
            assert r["ratio"] == 1.0
        else:  # entropy-coded payloads: sizes differ step to step (no formula does that)
            assert len(set(r["step_payload_bytes"])) > 1 and r["ratio"] > 10
            assert r["body_bytes_per_step"] < r["payload_bytes_per_step"]


def test_reproduce_prints_the_resnet_row_from_the_quick_json(quick, tmp_path, capsys):
    from gradpress.cli import main

    res, out = quick
    results = tmp_path / "results"
    (results / "train" / "resnet-digits").mkdir(parents=True)
    (results / "train" / "resnet-digits" / "ecq_resnet.json").write_text(json.dumps(res))
    (results / "simulate").mkdir()
    capsys.readouterr()
    assert main(["reproduce", "--results", str(results / "simulate")]) == 0
    table = capsys.readouterr().out
    assert "ResNet-20" in table and ">80x" in table and res["command"] in table
    ecq = next(s for s in res["summary"] if "ECQ" in s["label"])
    assert f"{ecq['ratio']:.1f}x" in table and "not the paper's number" in table
