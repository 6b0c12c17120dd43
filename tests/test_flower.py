"""Federated learning: non-iid digits split, client compression with feedback, the Flower
strategy's decoding and byte counting, and one real Flower simulation. (Hostile replies:
test_flower_strategy.py; the client mod: test_flower_mod.py; the example app:
test_flower_example.py.)"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import gradpress
from gradpress import flower as fl
from gradpress.cli import main as cli_main
from gradpress.errors import PayloadError
from gradpress.flower.mod import state_from_array, state_to_array

needs_flwr = pytest.mark.skipif(not fl.HAVE_FLWR, reason=fl.FLWR_MISSING)
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Flower's simulation engine needs ray (flwr[simulation])")


@pytest.fixture(scope="module")
def data() -> fl.FederatedData:
    return fl.digits_partitions(4, alpha=0.5, seed=1)


def test_partition_uses_every_training_sample_once(data):
    n_train = sum(len(y) for _, y in data.clients)
    assert n_train + len(data.test[1]) == 1797
    labels = np.concatenate([y for _, y in data.clients] + [data.test[1]])
    np.testing.assert_array_equal(np.bincount(labels), np.bincount(load_digits().target))
    assert min(len(y) for _, y in data.clients) >= 10


def test_small_dirichlet_alpha_gives_skewed_label_mixes():
    skewed = fl.digits_partitions(10, alpha=0.1, seed=0)
    mixed = fl.digits_partitions(10, alpha=100.0, seed=0)

    def top_share(d: fl.FederatedData) -> float:
        return float(np.mean([np.bincount(y, minlength=10).max() / len(y) for _, y in d.clients]))

    assert top_share(skewed) > 0.4 > top_share(mixed)


def test_partition_is_deterministic_per_seed():
    a, b = fl.digits_partitions(5, seed=3), fl.digits_partitions(5, seed=3)
    for (xa, ya), (xb, yb) in zip(a.clients, b.clients):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


@pytest.mark.parametrize("kwargs", [{"num_clients": 0}, {"num_clients": 4, "alpha": 0.0},
                                    {"num_clients": 500}])
def test_bad_partition_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        fl.digits_partitions(**kwargs)


@pytest.mark.parametrize("hidden", [0, 32])
def test_local_training_lowers_the_loss(data, hidden):
    x, y = data.clients[0]
    w = fl.init_params(hidden, seed=0)
    assert w.shape == (fl.num_params(hidden),)
    before, _ = fl.evaluate(w, x, y)
    w2, _ = fl.local_train(w, x, y, epochs=3, lr=0.2)
    assert fl.evaluate(w2, x, y)[0] < before
    assert not np.array_equal(w, w2)


def test_update_round_trips_through_crc_payload():
    delta = torch.randn(300, generator=torch.Generator().manual_seed(0))
    comp = gradpress.get("fp32")
    raw = fl.encode_update(delta, comp)
    assert gradpress.Payload.from_bytes(raw).crc
    torch.testing.assert_close(fl.decode_update(raw, comp, 300, client="c"), delta,
                               rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
def test_corrupt_update_raises_naming_the_client(damage):
    comp = gradpress.get("fp16")
    raw = bytearray(fl.encode_update(torch.ones(50), comp))
    if damage == "flip":
        raw[-3] ^= 0x10
    elif damage == "truncate":
        raw = raw[:-1]
    else:
        raw += b"\0"
    with pytest.raises(PayloadError, match="client node 9"):
        fl.decode_update(bytes(raw), comp, 50, client="client node 9")


def test_server_rejects_updates_without_crc_or_of_the_wrong_size():
    comp = gradpress.get("fp32")
    no_crc = fl.encode_update(torch.ones(8), comp, crc=False)
    with pytest.raises(PayloadError, match="CRC"):
        fl.decode_update(no_crc, comp, 8, client="a")
    assert fl.decode_update(no_crc, comp, 8, client="a", require_crc=False).shape == (8,)
    with pytest.raises(PayloadError, match="shape"):
        fl.decode_update(fl.encode_update(torch.ones(9), comp), comp, 8, client="a")


def test_error_feedback_sends_the_running_sum_of_updates():
    # EF telescopes: sum of what was sent + the residual = sum of the true updates.
    comp = gradpress.get("bf16")
    fb = fl.make_feedback("ef")
    gen = torch.Generator().manual_seed(0)
    total, sent_total = torch.zeros(100), torch.zeros(100)
    for r in range(5):
        delta = torch.randn(100, generator=gen) * (1 + r)
        sent_total += comp.decode(fl.encode_update(delta, comp, fb, seed=r))
        total += delta
    residual = total - sent_total
    assert 0 < float(residual.abs().max()) < 0.05  # bf16 rounding carried, not lost
    restored = fl.make_feedback("ef")
    state_from_array(restored, state_to_array(fb))
    probe = torch.zeros(100)
    torch.testing.assert_close(restored.to_send("model", probe), fb.to_send("model", probe))


def test_unknown_feedback_raises():
    with pytest.raises(ValueError, match="feedback"):
        fl.make_feedback("ef99")


def test_local_loop_learns_and_counts_real_bytes(data):
    res = fl.run_local(data, rounds=3, hidden=0, compressor="fp16", lr=0.2)
    d = fl.num_params(0)
    payload = len(fl.encode_update(torch.zeros(d), gradpress.get("fp16")))
    assert res["uplink_bytes"] == 3 * len(data.clients) * payload
    assert res["final_accuracy"] > res["rounds"][0]["test_accuracy"] + 0.2


# -- the Flower strategy -------------------------------------------------------------------
def _strategy(*args, **kwargs):
    strategy = fl.CompressedFedAvg(*args, **kwargs)
    strategy.global_arrays = {"0": np.zeros(6, dtype=np.float32)}  # as configure_train sets
    return strategy


@needs_flwr
def test_strategy_averages_decoded_updates_by_examples_and_counts_bytes():
    from flower_harness import reply

    strategy = _strategy("fp32")
    comp = gradpress.get("fp32")
    raws = [fl.encode_update(torch.full((6,), v), comp) for v in (1.0, 4.0)]
    arrays, metrics = strategy.aggregate_train(1, [reply(5, [raws[0]], 30),
                                                   reply(6, [raws[1]], 10)])
    (w,) = arrays.to_numpy_ndarrays()
    np.testing.assert_allclose(w, np.full(6, (30 * 1 + 10 * 4) / 40))
    assert strategy.history[-1]["uplink_bytes"] == sum(len(r) for r in raws)
    assert metrics["gradpress-uplink-bytes"] == sum(len(r) for r in raws)


@needs_flwr
def test_strategy_names_the_client_with_a_corrupt_payload():
    from flower_harness import reply

    good = fl.encode_update(torch.ones(6), gradpress.get("fp32"))
    bad = bytearray(good)
    bad[-1] ^= 1
    replies = [reply(5, [good], 10, pid=0), reply(77, [bytes(bad)], 10, pid=3)]
    with pytest.raises(PayloadError, match=r"client node 77 \(partition 3\).*CRC"):
        _strategy("fp32", strict=True).aggregate_train(1, replies)
    lenient = _strategy("fp32")  # the default: drop the client, keep the round
    arrays, _ = lenient.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.ones(6))
    assert lenient.history[-1]["dropped"] == ["client node 77 (partition 3)"]


@needs_flwr
def test_strategy_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown compressor"):
        fl.CompressedFedAvg("no-such-compressor")
    for bad in ({"server_lr": 0.0}, {"server_lr": float("nan")}, {"max_examples": 0},
                {"max_examples": 2.5}, {"examples_cap_factor": 0.5}):
        with pytest.raises(ValueError):
            fl.CompressedFedAvg("fp32", **bad)
    with pytest.raises(ValueError, match="feedback"):
        fl.compression_mod("fp32", feedback="magic")


@pytest.mark.slow  # Ray's start-up alone is ~40 s of the 10-minute CI budget
@needs_flwr
@needs_ray
def test_flower_simulation_matches_the_local_loop(data):
    # top-k with error feedback: the result depends on every client's residual surviving
    # between rounds (Flower keeps it in context.state), so a lost state would show.
    kwargs = dict(rounds=3, hidden=0, compressor="topk", compressor_kwargs={"ratio": 0.1},
                  feedback="ef", lr=0.2, seed=4)
    flower = fl.run_flower(data, **kwargs)
    local = fl.run_local(data, **kwargs)
    no_ef = fl.run_local(data, **{**kwargs, "feedback": "none"})
    assert flower["engine"].startswith("flower")
    assert flower["uplink_bytes"] == local["uplink_bytes"] > 0
    for a, b in zip(flower["rounds"], local["rounds"]):
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)
    assert abs(no_ef["rounds"][-1]["test_loss"] - local["rounds"][-1]["test_loss"]) > 1e-3
    assert flower["rounds"][-1]["flower_array_bytes"] > flower["rounds"][-1]["uplink_bytes"]


def test_federated_cli_skips_unregistered_compressors(tmp_path, capsys):
    rc = cli_main(["federated", "--engine", "local", "--clients", "10", "--rounds", "2",
                   "--hidden", "0", "--compressors", "fp32,bf16,not_a_compressor",
                   "--out", str(tmp_path)])
    assert rc == 0
    assert "not_a_compressor" in capsys.readouterr().out
    out = json.loads((tmp_path / "federated.json").read_text())
    assert [r["compressor"] for r in out["runs"]] == ["fp32", "bf16"]
    assert out["skipped"] == ["not_a_compressor"]
    assert (tmp_path / "federated.png").stat().st_size > 0
