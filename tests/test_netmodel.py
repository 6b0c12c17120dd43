"""The performance model: alpha-beta collective costs, calibration from real payloads,
predictions and validation against measured step times."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradpress
from gradpress import netmodel as nm

MB = 1e6


def test_collectives_cost_nothing_on_one_worker():
    net = nm.Network(1e9, latency_s=1e-3)
    assert nm.ring_allreduce_s(MB, 1, net) == 0
    assert nm.tree_allreduce_s(MB, 1, net) == 0
    assert nm.allgather_s(MB, 1, net) == 0
    assert nm.parameter_server_s(MB, MB, 1, net) == 0


def test_ring_allreduce_matches_alpha_beta_formula():
    a, bw, n = 2e-5, 8e9, 4e6  # 8 Gbit/s = 1 GB/s: beta = 1 ns per byte
    net = nm.Network(bw, latency_s=a)
    for p in (2, 3, 16, 1000):
        expected = 2 * (p - 1) * a + 2 * (p - 1) / p * n * 1e-9
        assert math.isclose(float(nm.ring_allreduce_s(n, p, net)), expected, rel_tol=1e-12)


def test_ring_allreduce_bandwidth_term_tends_to_twice_the_message():
    net = nm.Network(8e9, latency_s=0.0)
    t = nm.ring_allreduce_s(1e6, np.array([2, 1024, 2**20]), net)
    assert t[0] == pytest.approx(1e-3)
    assert t[-1] == pytest.approx(2e-3, rel=1e-5)
    assert np.all(np.diff(t) > 0)


def test_tree_allreduce_pays_two_log_p_full_messages():
    net = nm.Network(8e9, latency_s=1e-6)
    assert float(nm.tree_allreduce_s(1e6, 1024, net)) == pytest.approx(2 * 10 * (1e-6 + 1e-3))
    assert float(nm.tree_allreduce_s(1e6, 5, net)) == pytest.approx(2 * 3 * (1e-6 + 1e-3))


def test_allgather_grows_linearly_with_workers():
    net = nm.Network(8e9, latency_s=0.0)
    t = nm.allgather_s(1e3, np.array([2, 3, 5, 9]), net)
    np.testing.assert_allclose(t, np.array([1, 2, 4, 8]) * 1e-6)


def test_parameter_server_load_splits_over_shards():
    net = nm.Network(8e9, latency_s=0.0)
    one = float(nm.parameter_server_s(1e3, 4e3, 100, net))
    four = float(nm.parameter_server_s(1e3, 4e3, 100, net, servers=4))
    assert one == pytest.approx(100 * 5e3 * 1e-9)
    assert four == pytest.approx(one / 4)


def test_efficiency_below_one_slows_transfers():
    fast = nm.Network(1e8)
    slow = nm.Network(1e8, efficiency=nm.TCP_EFFICIENCY)
    assert float(slow.transfer_s(1e6)) == pytest.approx(float(fast.transfer_s(1e6)) * 1514 / 1448)


@pytest.mark.parametrize("kwargs", [{"bandwidth_bps": 0}, {"bandwidth_bps": 1e9, "latency_s": -1},
                                    {"bandwidth_bps": 1e9, "efficiency": 1.5}])
def test_bad_network_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        nm.Network(**kwargs)


def test_zero_workers_raise():
    with pytest.raises(ValueError, match="workers"):
        nm.ring_allreduce_s(1.0, 0, nm.Network(1e9))


def test_calibrate_measures_real_payload_bytes():
    n = 4096
    for name in ("fp32", "fp16"):
        comp = gradpress.get(name)
        prof = nm.calibrate(comp, n, repeats=1, seed=3)
        x = torch.randn(n, generator=torch.Generator().manual_seed(3))
        assert prof.payload_bytes == len(comp.encode(x, seed=3).to_bytes())
        assert prof.encode_s > 0 and prof.decode_s > 0
    fp32, fp16 = (nm.calibrate(gradpress.get(c), n, repeats=1) for c in ("fp32", "fp16"))
    assert fp32.payload_bytes - fp16.payload_bytes == 2 * n
    assert fp32.bits_per_element == pytest.approx(32, rel=0.01)
    assert fp32.bytes_for(10 * n) == 10 * fp32.payload_bytes


def test_calibrate_rejects_empty_sizes():
    with pytest.raises(ValueError, match="numel"):
        nm.calibrate(gradpress.get("fp32"), 0)


def test_calibrate_compute_reports_a_positive_flop_rate():
    prof = nm.calibrate_compute(hidden=32, batch=16, steps=2)
    assert prof.flops_per_s > 0
    assert prof.step_time(6 * prof.params * prof.batch) == pytest.approx(prof.step_s)


def _profile(bits: float, enc: float = 1e-3, dec: float = 1e-3) -> nm.CompressorProfile:
    chunk = 1 << 20
    return nm.CompressorProfile("fake", {}, chunk, int(bits * chunk / 8), enc, dec)


def test_one_worker_step_is_pure_compute_for_every_scheme():
    model = nm.MODELS["resnet50"]
    net = nm.Network(1e9)
    for scheme in nm.SCHEMES:
        br = nm.step_time(model, 1, net, scheme, 0.25, _profile(2.0))
        assert float(br.total) == pytest.approx(0.25)


def test_compressed_allgather_beats_fp32_ring_only_while_workers_are_few():
    model = nm.MODELS["resnet50"]
    net = nm.Network(1e9, latency_s=0.0)
    p = np.array([2, 4096])
    ring = nm.step_time(model, p, net, "ring", 0.1).total
    gather = nm.step_time(model, p, net, "allgather", 0.1, _profile(2.0, 0.0, 0.0)).total
    assert gather[0] < ring[0]  # 16x fewer bytes, one peer
    assert gather[1] > ring[1]  # (p-1) payloads of 1/16 the size vs 2 messages


def test_compressed_schemes_need_a_profile():
    with pytest.raises(ValueError, match="CompressorProfile"):
        nm.step_time(nm.MODELS["resnet20"], 4, nm.Network(1e9), "allgather", 0.1)
    with pytest.raises(ValueError, match="scheme"):
        nm.step_time(nm.MODELS["resnet20"], 4, nm.Network(1e9), "gossip", 0.1)


def test_predict_speedup_is_one_on_one_worker_and_grows_with_bandwidth():
    compute = nm.ComputeProfile(1e12, 0.0, 0, 0, "test")
    rows = nm.predict({"resnet50": nm.MODELS["resnet50"]}, [_profile(4.0)], compute,
                      [1e9, 1e11], [1, 8, 64])
    assert {r["speedup"] for r in rows if r["workers"] == 1} == {1.0}
    for scheme in ("ring", "allgather"):
        slow, fast = ([r["throughput"] for r in rows if r["scheme"] == scheme
                       and r["workers"] == 64 and r["bandwidth_bps"] == bw] for bw in (1e9, 1e11))
        assert fast[0] > slow[0]


def test_validate_recovers_records_built_from_the_model():
    net = nm.Network(1e8, latency_s=1e-3, efficiency=nm.TCP_EFFICIENCY)
    comm = float(nm.allgather_s(2e5, 2, net, 3))
    rec = {"compressor": "qsgd", "nproc": 2, "bandwidth_bps": 1e8, "step_time_s": 0.05 + comm,
           "bytes_per_step": 2e5, "compute_s": 0.05, "latency_s": 1e-3, "messages": 3}
    fp32 = dict(rec, compressor="fp32", bytes_per_step=4e6,
                step_time_s=0.05 + float(nm.ring_allreduce_s(4e6, 2, net, 3)))
    rows = nm.validate([rec, fp32, dict(rec, step_time_s=2 * rec["step_time_s"])])
    assert rows[0]["rel_error"] == pytest.approx(0.0, abs=1e-12) and rows[0]["within"]
    assert rows[1]["collective"] == "allreduce" and rows[1]["within"]
    assert rows[2]["rel_error"] == pytest.approx(-0.5) and not rows[2]["within"]
    table = nm.validation_markdown(rows)
    assert table.count("\n") == 4 and "100 Mbit/s" in table


def test_validate_uses_profiles_for_missing_codec_times():
    prof = _profile(2.0, enc=0.01, dec=0.02)
    rec = {"compressor": "fake", "nproc": 2, "bandwidth_bps": 1e9, "step_time_s": 1.0,
           "bytes_per_step": 0, "compute_s": 0.5, "numel": prof.chunk, "latency_s": 0.0}
    row = nm.validate([rec], profiles={"fake": prof})[0]
    assert row["codec_s"] == pytest.approx(0.01 + 2 * 0.02)


def test_validate_names_missing_fields():
    with pytest.raises(ValueError, match="step_time_s"):
        nm.validate([{"compressor": "fp32", "nproc": 2, "bandwidth_bps": 1e8,
                      "bytes_per_step": 1, "compute_s": 0.1}])


def test_netmodel_cli_writes_plots_json_and_validation(tmp_path):
    import json

    from gradpress.cli import main

    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps({"records": [
        {"compressor": "fp32", "nproc": 2, "bandwidth_bps": 1e8, "step_time_s": 0.4,
         "bytes_per_step": 4e6, "compute_s": 0.05}]}))
    out = tmp_path / "nm"
    assert main(["netmodel", "--out", str(out), "--compressors", "fp16,nope", "--chunk", "4096",
                 "--max-workers", "8", "--bandwidths", "1,10", "--measured", str(measured),
                 "--device", "cpu"]) == 0
    for name in ("speedup.png", "throughput.png", "breakdown.png", "validation.md"):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "netmodel.json").read_text())
    assert res["skipped"] == ["nope"]
    assert res["compressors"][0]["payload_bytes"] == len(
        gradpress.get("fp16").encode(torch.zeros(4096)).to_bytes())
    # 3 models x 2 links x (ring, fp16 ring, tree, fp16 all-gather, two-phase, PS) x 4 counts
    assert len(res["predictions"]) == 3 * 2 * 6 * 4
    assert res["validation"][0]["measured_s"] == 0.4


def test_parse_spec_reads_typed_options():
    from gradpress.specs import parse_spec

    assert parse_spec("qsgd:s=4;entropy=True;norm=linf") == (
        "qsgd", {"s": 4, "entropy": True, "norm": "linf"})
    assert parse_spec(" fp32 ") == ("fp32", {})
    with pytest.raises(ValueError, match="key=value"):
        parse_spec("qsgd:s")


def test_reference_run_calibrates_the_local_time():
    # Local time 0.3 s at both rates; only the network part changes.
    ref_net, slow_net = nm.Network(1e10, 0.0, nm.TCP_EFFICIENCY), nm.Network(1e8, 0.0,
                                                                             nm.TCP_EFFICIENCY)
    nbytes = 1e6
    rec = {"compressor": "ecq", "nproc": 2, "bandwidth_bps": 1e8, "bytes_per_step": nbytes,
           "step_time_s": 0.3 + float(nm.allgather_s(nbytes, 2, slow_net)),
           "reference_step_time_s": 0.3 + float(nm.allgather_s(nbytes, 2, ref_net)),
           "reference_bandwidth_bps": 1e10, "latency_s": 0.0}
    row = nm.validate([rec])[0]
    assert row["compute_s"] == pytest.approx(0.3)
    assert row["rel_error"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("text,bps", [("100mbit", 1e8), ("1gbit", 1e9), ("500kbit", 5e5),
                                      ("10mbps", 8e7), (2.5e6, 2.5e6)])
def test_parse_rate_reads_tc_units(text, bps):
    assert nm.parse_rate(text) == bps


def test_parse_rate_rejects_nonsense():
    with pytest.raises(ValueError, match="rate"):
        nm.parse_rate("fast")


def test_records_from_slow_network_match_rows_to_the_reference_by_label():
    def rows(step_ddp: float, step_ecq: float) -> list[dict]:
        return [{"label": "ddp", "failed": False, "steps": 10, "step_s": step_ddp,
                 "wire_bytes": 10 * 4e6},
                {"label": "gradpress ecq", "failed": False, "steps": 5, "step_s": step_ecq,
                 "wire_bytes": 5 * 2.5e5},
                {"label": "broken", "failed": True, "error": "x"}]

    slow = {"rate": "100mbit", "rows": rows(0.4, 0.1)}
    fast = {"rate": "10gbit", "rows": rows(0.06, 0.05)}
    recs = nm.records_from_slow_network(slow, reference=fast)
    assert [r["compressor"] for r in recs] == ["ddp", "gradpress ecq"]
    assert recs[1]["bytes_per_step"] == 2.5e5 and recs[1]["reference_bandwidth_bps"] == 1e10
    rows_out = nm.validate(recs)
    assert [r["collective"] for r in rows_out] == ["allreduce", "allgather"]
    assert nm.records_from_slow_network(slow) == []
    assert len(nm.records_from_slow_network(slow, compute_s=0.01)) == 2


# --- hand-computed costs (numbers worked out on paper, P > 1) -----------------------------
# 8 Mbit/s link, efficiency 1: beta = 1 us per byte; latency a = 1 ms; n = 1000 bytes.
HAND = nm.Network(8e6, latency_s=1e-3)


def test_ring_allreduce_cost_by_hand():
    # 2(p-1) a + 2(p-1)/p n beta, p = 4: 6 ms + 1.5 * 1 ms = 7.5 ms
    assert nm.ring_allreduce_s(1000, 4, HAND) == pytest.approx(7.5e-3)


def test_tree_allreduce_cost_by_hand():
    # 2 ceil(log2 p) (a + n beta), p = 5: 2 * 3 * (1 + 1) ms = 12 ms
    assert nm.tree_allreduce_s(1000, 5, HAND) == pytest.approx(12e-3)


def test_allgather_cost_by_hand():
    # (p-1)(a + n beta), p = 4, 2 messages: 3 * (2 + 1) ms = 9 ms
    assert nm.allgather_s(1000, 4, HAND, messages=2) == pytest.approx(9e-3)


def test_two_phase_cost_by_hand():
    # all-to-all + all-gather of n/p shards: 2(p-1) a + 2(p-1)/p n beta, p = 8:
    # 14 ms + 1.75 ms = 15.75 ms (the all-gather alone would be 7 * 2 ms = 14 ms more)
    assert nm.two_phase_s(1000, 8, HAND) == pytest.approx(15.75e-3)


def test_parameter_server_cost_by_hand():
    # 2a + p (n_up + n_down) beta / S, p = 4, 500 up, 1000 down, S = 2: 2 + 3 ms = 5 ms
    assert nm.parameter_server_s(500, 1000, 4, HAND, servers=2) == pytest.approx(5e-3)


def test_decode_work_is_charged_per_payload():
    # all-gather decodes p payloads, two-phase 2(p-1)/p of one: with 1 s per decode of d,
    # p = 4, no network time to speak of
    prof = nm.CompressorProfile("x", {}, chunk=1000, payload_bytes=100, encode_s=0.0,
                                decode_s=1.0)
    model = nm.ModelSpec("m", 1000, 0.0, 1)
    fast = nm.Network(1e15, latency_s=0.0)
    gather = nm.step_time(model, [4], fast, "allgather", 0.0, prof)
    two = nm.step_time(model, [4], fast, "two_phase", 0.0, prof)
    assert float(gather.decode[0]) == pytest.approx(4.0)
    assert float(two.decode[0]) == pytest.approx(1.5)


def test_assumed_codec_rate_replaces_times_but_keeps_measured_bytes():
    from gradpress.commands.netmodel import assume_codec_rate

    prof = nm.CompressorProfile("x", {}, chunk=1 << 20, payload_bytes=12345, encode_s=0.5,
                                decode_s=0.7)
    fast = assume_codec_rate(prof, 1000.0)  # 4 MiB of float32 at 1000 GB/s
    assert fast.encode_s == fast.decode_s == 4 * (1 << 20) / 1e12
    assert fast.payload_bytes == 12345 and prof.encode_s == 0.5  # the original is untouched
