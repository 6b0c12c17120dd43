"""CompressedFedAvg against lying and broken clients: every bad reply is dropped with a log
line naming the client, the rest are averaged to the value computed by hand, and no header
makes the server decode (or allocate) more than the model."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch

import gradpress
from gradpress import flower as fl
from gradpress.errors import PeerError
from gradpress.payload import Payload

flower_harness = pytest.importorskip("flower_harness")
from flower_harness import (  # noqa: E402
    LoopbackGrid,
    error_reply,
    metadata,
    reply,
    server_identity,  # noqa: F401 (fixture)
    step_app,
)
from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)

FP32 = gradpress.get("fp32")
SHAPES = {"w": (2, 3), "b": (4,)}


def _strategy(**kwargs) -> fl.CompressedFedAvg:
    strategy = fl.CompressedFedAvg("fp32", **kwargs)
    strategy.global_arrays = {k: np.full(s, 0.5, dtype=np.float32) for k, s in SHAPES.items()}
    return strategy


def _update(value: float) -> dict[str, bytes]:
    """Payloads of an update equal to ``value`` everywhere, for both arrays."""
    return {k: fl.encode_update(torch.full(s, value), FP32) for k, s in SHAPES.items()}


def _honest() -> list[Message]:
    return [reply(1, _update(1.0), 30), reply(2, _update(4.0), 10)]


HONEST_MEAN = (30 * 1.0 + 10 * 4.0) / 40  # 1.75


def _assert_model(arrays: ArrayRecord, value: float) -> None:
    got = {k: a.numpy() for k, a in arrays.items()}
    assert list(got) == list(SHAPES)
    for k, s in SHAPES.items():
        assert got[k].dtype == np.float32 and got[k].shape == s
        np.testing.assert_allclose(got[k], np.full(s, value), rtol=1e-7)


def test_aggregate_is_the_weighted_mean_of_every_array_update():
    arrays, metrics = _strategy().aggregate_train(1, _honest())
    _assert_model(arrays, 0.5 + HONEST_MEAN)
    assert metrics["gradpress-updates"] == 2 and metrics["gradpress-dropped"] == 0
    assert metrics["train-loss"] == pytest.approx(1.0)


def test_server_lr_scales_the_averaged_update():
    arrays, _ = _strategy(server_lr=0.5).aggregate_train(1, _honest())
    _assert_model(arrays, 0.5 + 0.5 * HONEST_MEAN)  # 1.375, not 2.25


@pytest.mark.parametrize("claim", [10**9, -5, 0, float("nan"), 12.0, 2.5, None],
                         ids=["1e9", "-5", "0", "nan", "float", "fraction", "missing"])
def test_lying_example_count_drops_that_client_only(claim, caplog):
    strategy = _strategy(max_examples=1000)
    liar = reply(666, _update(-100.0), claim, pid=7)
    with caplog.at_level(logging.WARNING, logger="flwr.gradpress"):
        arrays, metrics = strategy.aggregate_train(1, [*_honest(), liar])
    _assert_model(arrays, 0.5 + HONEST_MEAN)
    assert strategy.history[-1]["dropped"] == ["client node 666 (partition 7)"]
    assert metrics["gradpress-dropped"] == 1
    assert "client node 666 (partition 7)" in caplog.text and "num-examples" in caplog.text


def test_default_cap_is_ten_times_the_first_rounds_median_claim_then_frozen():
    strategy = _strategy()
    replies = [*_honest(), reply(3, _update(1.0), 20), reply(666, _update(-100.0), 10**9)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.examples_cap == 200  # 10 x median_low(10, 20, 30, 1e9)
    _assert_model(arrays, 0.5 + (30 * 1 + 10 * 4 + 20 * 1) / 60)
    arrays, _ = strategy.aggregate_train(2, [reply(1, _update(1.0), 200),
                                             reply(2, _update(4.0), 201)])
    assert strategy.examples_cap == 200
    _assert_model(arrays, 0.5 + 1.0)
    assert strategy.history[-1]["dropped"] == ["client node 2"]


def _as_config(msg: Message) -> Message:
    msg.content[fl.UPDATE_KEY] = ConfigRecord({"0": b"GP"})
    return msg


def _float_arrays(msg: Message) -> Message:
    msg.content[fl.UPDATE_KEY] = ArrayRecord({k: Array(np.zeros(s, np.float32))
                                              for k, s in SHAPES.items()})
    return msg


def _drop_key(key: str):
    def edit(msg: Message) -> Message:
        del msg.content[key]
        return msg
    return edit


def _missing_array(msg: Message) -> Message:
    rec = msg.content[fl.UPDATE_KEY]
    msg.content[fl.UPDATE_KEY] = ArrayRecord({"w": rec["w"]})
    return msg


def _extra_array(msg: Message) -> Message:
    msg.content[fl.UPDATE_KEY]["extra"] = Array(np.zeros(3, np.uint8))
    return msg


def _two_metric_records(msg: Message) -> Message:
    msg.content["more"] = MetricRecord({"num-examples": 5})
    return msg


@pytest.mark.parametrize("edit", [
    _drop_key(fl.UPDATE_KEY), _as_config, _float_arrays, _missing_array, _extra_array,
    _drop_key("metrics"), _two_metric_records,
], ids=["no-payload-key", "config-record", "float-arrays", "missing-array", "extra-array",
        "no-metrics", "two-metric-records"])
def test_malformed_reply_is_dropped_without_key_error(edit, caplog):
    strategy = _strategy()
    bad = edit(reply(666, _update(-100.0), 10))
    with caplog.at_level(logging.WARNING, logger="flwr.gradpress"):
        arrays, _ = strategy.aggregate_train(1, [*_honest(), bad])
    _assert_model(arrays, 0.5 + HONEST_MEAN)
    assert strategy.history[-1]["dropped"] == ["client node 666"]
    assert "client node 666" in caplog.text


def test_failed_client_is_dropped_and_named():
    strategy = _strategy()
    arrays, _ = strategy.aggregate_train(1, [*_honest(), error_reply(9, "out of memory")])
    _assert_model(arrays, 0.5 + HONEST_MEAN)
    assert strategy.history[-1]["dropped"] == ["client node 9"]
    with pytest.raises(PeerError, match="client node 9 failed: out of memory"):
        _strategy(strict=True).aggregate_train(1, [*_honest(), error_reply(9, "out of memory")])


def _npy_claiming(n: int) -> Array:
    """A Flower Array whose .npy header claims ``n`` uint8 elements but holds 16 bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False,
                                               "shape": (n,)})
    return Array(dtype="uint8", shape=(n,), stype="numpy.ndarray",
                 data=buf.getvalue() + b"\0" * 16)


HUGE = Payload(FP32.compressor_id, torch.float32, (1 << 30,), b"", crc=True).to_bytes()
GOOD_W = fl.encode_update(torch.ones(2, 3), FP32)
HOSTILE = {
    "2^30-elements": HUGE,
    "wrong-shape": fl.encode_update(torch.ones(6), FP32),
    "wrong-dtype": fl.encode_update(torch.ones(2, 3, dtype=torch.float16), FP32),
    "other-compressor": fl.encode_update(torch.ones(2, 3), gradpress.get("fp16")),
    "no-crc": fl.encode_update(torch.ones(2, 3), FP32, crc=False),
    "garbage": bytes(range(40)),
    "truncated": GOOD_W[:-3],
    "extended": GOOD_W + b"\0",
    "empty": b"",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_header_is_refused_before_anything_is_decoded(name, monkeypatch, caplog):
    strategy = _strategy()
    decoded_shapes = []
    real_decode = type(FP32).decode

    def spy(self, payload, **kw):
        out = real_decode(self, payload, **kw)
        decoded_shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(type(FP32), "decode", spy)
    bad = reply(666, {**_update(-100.0), "w": HOSTILE[name]}, 10)
    with caplog.at_level(logging.WARNING, logger="flwr.gradpress"):
        arrays, _ = strategy.aggregate_train(1, [*_honest(), bad])
    _assert_model(arrays, 0.5 + HONEST_MEAN)
    assert strategy.history[-1]["dropped"] == ["client node 666"]
    assert "corrupt update from client node 666" in caplog.text
    assert sorted(decoded_shapes) == sorted([(2, 3), (4,)] * 2)  # only the honest payloads


def test_npy_header_claiming_2_to_the_40_bytes_is_refused_unread():
    strategy = _strategy()
    bad = reply(666, _update(-100.0), 10)
    bad.content[fl.UPDATE_KEY]["w"] = _npy_claiming(1 << 40)
    arrays, _ = strategy.aggregate_train(1, [*_honest(), bad])
    _assert_model(arrays, 0.5 + HONEST_MEAN)
    assert strategy.history[-1]["dropped"] == ["client node 666"]


def test_round_without_a_valid_update_keeps_the_model_and_says_so(caplog):
    strategy = _strategy()
    with caplog.at_level(logging.WARNING, logger="flwr.gradpress"):
        arrays, metrics = strategy.aggregate_train(
            3, [reply(1, _update(1.0), -5), error_reply(2)])
    assert arrays is None  # Strategy.start keeps the previous global arrays
    assert metrics["gradpress-model-unchanged"] == 1 and metrics["gradpress-updates"] == 0
    assert metrics["gradpress-dropped"] == 2
    assert "round 3: no valid client update" in caplog.text


def test_integer_buffers_are_averaged_and_stay_integers():
    strategy = fl.CompressedFedAvg("fp32")
    strategy.global_arrays = {"w": np.zeros(3, np.float32), "steps": np.array([10], np.int64)}

    def r(node, value, steps, n):
        msg = reply(node, {"w": fl.encode_update(torch.full((3,), value), FP32)}, n)
        msg.content[fl.UPDATE_KEY]["steps"] = Array(np.array([steps], np.int64))
        return msg

    arrays, _ = strategy.aggregate_train(1, [r(1, 1.0, 13, 30), r(2, 2.0, 17, 10)])
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 1.25))
    steps = arrays["steps"].numpy()
    assert steps.dtype == np.int64 and steps.tolist() == [14]  # rint(0.75*13 + 0.25*17)


def test_evaluate_ignores_lying_counts():
    strategy = _strategy(max_examples=100)

    def ev(node, n, acc):
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": n, "acc": acc})}),
                       metadata=metadata(src=node, dst=0, reply_to="x"))

    metrics = strategy.aggregate_evaluate(1, [ev(1, 30, 0.9), ev(2, 10, 0.5),
                                              ev(3, 10**9, 0.0), ev(4, -1, 0.0)])
    assert metrics["acc"] == pytest.approx((30 * 0.9 + 10 * 0.5) / 40)
    assert strategy.aggregate_evaluate(2, [ev(3, 10**9, 0.0)]) is None


# -- whole rounds through Flower's Strategy.start ----------------------------------------------
def _start(strategy, grid, rounds=2):
    initial = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    return strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)


def test_fraction_train_averages_exactly_the_sampled_clients(server_identity):  # noqa: F811
    grid = LoopbackGrid(step_app(), 10)
    strategy = fl.CompressedFedAvg("fp32", fraction_train=0.3, fraction_evaluate=0.0,
                                   min_train_nodes=1, min_available_nodes=10)
    result = _start(strategy, grid, rounds=3)
    assert [len(nodes) for nodes in grid.sent] == [3, 3, 3]
    expected = 0.0
    for nodes in grid.sent:
        weights = [n - 100 for n in nodes]  # partition + 1
        expected += sum(w * w for w in weights) / sum(weights)
    _assert_model(result.arrays, expected)
    assert [h["clients"] for h in strategy.history] == [3, 3, 3]


def test_failed_and_lying_clients_leave_the_others_in_control(server_identity):  # noqa: F811
    def tamper(node, msg):
        if node == 101:  # partition 0 claims a billion examples
            msg.content["metrics"]["num-examples"] = 10**9
        return msg

    grid = LoopbackGrid(step_app(crash_node=102), 4, tamper=tamper)
    strategy = fl.CompressedFedAvg("fp32", fraction_evaluate=0.0, min_available_nodes=4,
                                   max_examples=100)
    result = _start(strategy, grid, rounds=2)
    per_round = (3 * 3 + 4 * 4) / (3 + 4)  # partitions 2 and 3 only
    _assert_model(result.arrays, 2 * per_round)
    assert sorted(strategy.history[0]["dropped"]) == ["client node 101", "client node 102"]
