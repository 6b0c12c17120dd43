"""The compressed downlink: every node trains from the server's copy of the model, bit for
bit, whichever rounds it skipped; the server's model is unaffected by what the downlink
dropped (error feedback keeps it in the next step); a node that lost its copy gets it whole."""

from __future__ import annotations

import random

import numpy as np
import pytest

from gradpress import flower as fl

flower_harness = pytest.importorskip("flower_harness")
from flower_harness import LoopbackGrid, server_identity, step_app  # noqa: E402, F401
from flwr.app import Array, ArrayRecord  # noqa: E402

from gradpress.flower.downlink import MODEL_STATE_KEY  # noqa: E402

SHAPES = {"w": (40, 50), "b": (50,)}
RAW_BYTES = sum(4 * int(np.prod(s)) for s in SHAPES.values())


def _initial() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({k: Array(rng.normal(size=s).astype(np.float32))
                        for k, s in SHAPES.items()})


class _Watch:
    """Records what each node was sent: whole model (-1) or steps after version ``base``."""

    def __init__(self, grid: LoopbackGrid) -> None:
        self.bases: list[tuple[int, int]] = []  # (node, base) per train message
        self.chains: list[int] = []  # steps sent per message that was not the whole model
        real = grid.send_and_receive

        def send_and_receive(messages, *, timeout=None):
            messages = list(messages)
            for m in messages:
                if m.metadata.message_type == "train":
                    cfg = m.content["config"]
                    base = int(cfg["gradpress-downlink-base"])
                    self.bases.append((m.metadata.dst_node_id, base))
                    if base >= 0:
                        self.chains.append(int(cfg["gradpress-downlink-version"]) - base)
            return real(messages, timeout=timeout)

        grid.send_and_receive = send_and_receive


def _run(grid, rounds, **kwargs):
    strategy = fl.CompressedFedAvg("fp32", fraction_evaluate=0.0,
                                   min_available_nodes=len(grid.contexts), **kwargs)
    result = strategy.start(grid=grid, initial_arrays=_initial(), num_rounds=rounds)
    return strategy, {k: a.numpy() for k, a in result.arrays.items()}


def _expected(grid) -> dict[str, np.ndarray]:
    """The step app's model: the initial arrays plus each round's weighted mean step."""
    out = {k: a.numpy().astype(np.float64) for k, a in _initial().items()}
    for nodes in grid.sent:
        weights = [n - 100 for n in nodes]
        for k in out:
            out[k] += sum(w * w for w in weights) / sum(weights)
    return out


def test_downlink_never_costs_more_than_the_model_whole(server_identity):  # noqa: F811
    plain_grid, grid = LoopbackGrid(step_app(), 3), LoopbackGrid(step_app(), 3)
    _, plain = _run(plain_grid, 3)
    strategy, model = _run(grid, 3, downlink="fp32")
    for k in SHAPES:
        np.testing.assert_allclose(model[k], plain[k], rtol=1e-6)
    # fp32 steps are the raw bytes plus headers: the model whole is cheaper, every round
    step_bytes = sum(a.numpy().nbytes for a in strategy.downlink.steps[3].values())
    assert step_bytes > RAW_BYTES
    assert [h["downlink_bytes"] for h in strategy.history] == [3 * RAW_BYTES] * 3


def test_lossy_downlink_keeps_every_node_on_the_servers_copy(server_identity):  # noqa: F811
    random.seed(3)
    grid = LoopbackGrid(step_app(), 6)
    watch = _Watch(grid)
    strategy, model = _run(grid, 6, downlink="topk", downlink_kwargs={"ratio": 0.1},
                           fraction_train=0.5, min_train_nodes=1)
    expected = _expected(grid)
    for k in SHAPES:  # the server's model got every update in full: only x is compressed
        np.testing.assert_allclose(model[k], expected[k], rtol=1e-6)
    last = grid.sent[-1]
    server_copy = strategy.downlink.model
    for node in last:  # each node of the last round holds the server's copy exactly
        held = grid.contexts[node].state[MODEL_STATE_KEY]
        for k in SHAPES:
            np.testing.assert_array_equal(held[k].numpy(), server_copy[k])
    assert max(watch.chains) >= 2  # some node skipped rounds and was sent the missed steps
    assert all(h["dropped"] == [] for h in strategy.history)
    assert all(h["downlink_bytes"] <= 3 * RAW_BYTES for h in strategy.history)
    assert strategy.history[-1]["downlink_bytes"] < RAW_BYTES


def test_node_that_lost_its_copy_is_dropped_once_then_sent_the_model_whole(
        server_identity):  # noqa: F811
    grid = LoopbackGrid(step_app(), 3)
    watch = _Watch(grid)

    def wipe(node, reply):
        if node == 102 and len(grid.sent) == 1:  # after its round-2 reply
            del grid.contexts[102].state[MODEL_STATE_KEY]
        return reply

    grid.tamper = wipe
    strategy, _ = _run(grid, 4, downlink="topk", downlink_kwargs={"ratio": 0.5})
    assert [h["dropped"] for h in strategy.history] == [[], [], ["client node 102"], []]
    assert [b for n, b in watch.bases if n == 102] == [-1, 1, 2, -1]
    held = grid.contexts[102].state[MODEL_STATE_KEY]
    for k in SHAPES:
        np.testing.assert_array_equal(held[k].numpy(), strategy.downlink.model[k])
