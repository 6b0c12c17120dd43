"""compression_mod on constructed Flower messages: the reply's arrays become payloads of the
update, error feedback survives in context.state, and an ill-fitting reply becomes an error
reply instead of garbage on the wire."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradpress
from gradpress import flower as fl
from gradpress.payload import Payload

flower_harness = pytest.importorskip("flower_harness")
from flower_harness import context, train_message  # noqa: E402
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402

GLOBAL = {"fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
          "fc.bias": np.array([1.0, -1.0], dtype=np.float32)}


def _app(mod, step: dict[str, np.ndarray], *, keys=None) -> ClientApp:
    """An unchanged Flower app: adds ``step`` to the arrays it gets, replies with them."""
    app = ClientApp(mods=[mod])

    @app.train()
    def train(msg, ctx):
        arrays = {k: a.numpy() + step[k] for k, a in msg.content["arrays"].items()}
        if keys is not None:
            arrays = {keys.get(k, k): v for k, v in arrays.items()}
        return Message(RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": 12, "train-loss": 0.25})}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg, ctx):
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 3, "acc": 0.5})}),
                       reply_to=msg)

    return app


def _steps(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in GLOBAL.items()}


def test_mod_replaces_the_arrays_by_payloads_of_the_update():
    step = _steps(0)
    out = _app(fl.compression_mod("fp32"), step)(train_message(GLOBAL), context())
    assert not out.has_error()
    assert "arrays" not in out.content and list(out.content.array_records) == [fl.UPDATE_KEY]
    assert dict(out.content["metrics"]) == {"num-examples": 12, "train-loss": 0.25}
    record = out.content[fl.UPDATE_KEY]
    assert list(record.keys()) == list(GLOBAL)
    for k, g in GLOBAL.items():
        raw = record[k].numpy()
        assert raw.dtype == np.uint8 and raw.ndim == 1
        payload = Payload.from_bytes(raw.tobytes())
        assert payload.crc and payload.shape == g.shape and payload.dtype == torch.float32
        decoded = gradpress.get("fp32").decode(payload)
        np.testing.assert_array_equal(decoded.numpy(), (g + step[k]) - g)


def test_mod_leaves_evaluate_messages_alone():
    msg = train_message(GLOBAL, message_type=MessageType.EVALUATE)
    out = _app(fl.compression_mod("fp32"), _steps(0))(msg, context())
    assert dict(out.content["metrics"]) == {"num-examples": 3, "acc": 0.5}


def test_mod_keeps_error_feedback_in_context_state_across_rounds():
    comp = gradpress.get("topk", ratio=0.35)  # 2 of 6 weights, 1 of 2 biases
    ctx = context(node=5, partition=2)
    steps = [_steps(1), _steps(2)]
    mod = fl.compression_mod(comp, feedback="ef", seed=9)
    outs = [_app(mod, steps[r])(train_message(GLOBAL, server_round=r + 1), ctx)
            for r in range(2)]
    assert fl.STATE_KEY in ctx.state
    fb = fl.make_feedback("ef")  # the same two rounds by hand
    for r, out in enumerate(outs):
        for i, (k, g) in enumerate(GLOBAL.items()):
            want = fl.encode_update(torch.from_numpy((g + steps[r][k]) - g), comp, fb, key=k,
                                    seed=fl.round_seed(9, r + 1, 2, i))
            assert out.content[fl.UPDATE_KEY][k].numpy().tobytes() == want
    # round 2 carried round 1's residual: it differs from compressing round 2's step alone
    alone = fl.encode_update(torch.from_numpy(steps[1]["fc.weight"]), comp, key="fc.weight",
                             seed=fl.round_seed(9, 2, 2, 0))
    assert outs[1].content[fl.UPDATE_KEY]["fc.weight"].numpy().tobytes() != alone


def test_mod_turns_an_ill_fitting_reply_into_an_error_and_keeps_the_state():
    ctx = context()
    mod = fl.compression_mod("topk", feedback="ef", compressor_kwargs={"ratio": 0.5})
    _app(mod, _steps(0))(train_message(GLOBAL), ctx)
    before = ctx.state[fl.STATE_KEY]["0"].numpy().tobytes()
    renamed = _app(mod, _steps(1), keys={"fc.bias": "fc.b"})(train_message(GLOBAL), ctx)
    assert renamed.has_error()
    assert renamed.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert "compression_mod" in renamed.error.reason and "keys" in renamed.error.reason
    nan_step = {k: np.full(v.shape, np.nan, np.float32) for k, v in GLOBAL.items()}
    assert _app(mod, nan_step)(train_message(GLOBAL), ctx).has_error()
    assert ctx.state[fl.STATE_KEY]["0"].numpy().tobytes() == before


def test_mod_sends_integer_buffers_as_they_are():
    arrays = {**GLOBAL, "bn.num_batches_tracked": np.array([7], dtype=np.int64)}
    step = {**_steps(0), "bn.num_batches_tracked": np.array([3], dtype=np.int64)}
    out = _app(fl.compression_mod("fp32"), step)(train_message(arrays), context())
    np.testing.assert_array_equal(out.content[fl.UPDATE_KEY]["bn.num_batches_tracked"].numpy(),
                                  [10])
