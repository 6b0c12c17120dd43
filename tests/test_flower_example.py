"""examples/flower_app end to end: its own ServerApp and ClientApp (mod included), its own
run config, three rounds over an in-process Grid of ten nodes. It must learn, and the uplink
it logs must be the payload bytes the clients sent."""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
flower_harness = pytest.importorskip("flower_harness")
from flower_harness import LoopbackGrid, server_identity  # noqa: E402, F401
from flwr.app import Context, RecordDict  # noqa: E402

import gradpress.flower as fl  # noqa: E402

APP_DIR = Path(__file__).resolve().parents[1] / "examples" / "flower_app"


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(str(APP_DIR))
    from digits_app import client_app, server_app

    config = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    return client_app, server_app, config["tool"]["flwr"]["app"]["config"]


def test_example_app_learns_and_logs_the_payload_bytes_sent(example, server_identity,  # noqa: F811
                                                            caplog):
    client_app, server_app, run_config = example
    random.seed(0)  # FedAvg samples nodes with the random module
    run_config = {**run_config, "num-server-rounds": 3}
    sent: list[int] = []

    def count(node, reply):
        if not reply.has_error() and fl.UPDATE_KEY in reply.content:
            sent.append(sum(len(a.numpy()) for a in reply.content[fl.UPDATE_KEY].values()))
        return reply

    grid = LoopbackGrid(client_app.app, 10, run_config=run_config, tamper=count)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                  run_config=run_config)
    with caplog.at_level(logging.INFO, logger="flwr"):
        server_app.app(grid, ctx)
    rounds = [tuple(map(float, m.groups())) for m in re.finditer(
        r"round (\d+): accuracy ([\d.]+), (\d+) clients, uplink (\d+) payload bytes "
        r"\(fp32: (\d+)", caplog.text)]
    assert [int(r[0]) for r in rounds] == [1, 2, 3]
    assert all(int(r[2]) == 5 for r in rounds)  # fraction-train 0.5 of 10 nodes
    assert len(sent) == 15
    assert [int(r[3]) for r in rounds] == [sum(sent[i:i + 5]) for i in (0, 5, 10)]
    assert all(r[4] / r[3] > 20 for r in rounds)  # QSGD s=4: ~31x fewer bytes than fp32
    accuracy = [r[1] for r in rounds]
    assert accuracy[-1] > 0.5 and accuracy[-1] > accuracy[0]
    assert "Aggregated MetricRecord: {'eval_acc'" in caplog.text  # client evaluate ran too
    assert np.isfinite(accuracy).all() and "dropped none" in caplog.text
