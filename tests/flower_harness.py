"""Flower without a network, for tests: messages built as the SuperLink would build them,
and a Grid that delivers each one to an in-process ClientApp.

:class:`LoopbackGrid` runs a real ``Strategy.start`` loop (sampling, configure, aggregate,
evaluate) against a real ``ClientApp`` with its mods, each node with its own persistent
``Context``; messages are deep-copied each way, so nothing is shared by reference that a
network would have copied. ``tamper(node_id, reply)`` may rewrite a reply on its way back
(a lying client); an exception in the app becomes an error reply, as Flower's runtime makes
it.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest

flwr_app = pytest.importorskip("flwr.app")
from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from gradpress import flower as fl  # noqa: E402
from gradpress.flower import UPDATE_KEY  # noqa: E402

_ids = itertools.count(1)


@pytest.fixture
def server_identity(monkeypatch):
    """The process identity Flower reads when a strategy creates messages."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def metadata(*, src: int, dst: int, message_type: str = MessageType.TRAIN,
             reply_to: str = "") -> Metadata:
    return Metadata(run_id=1, message_id=f"m{next(_ids)}", src_node_id=src, dst_node_id=dst,
                    reply_to_message_id=reply_to, group_id="1", created_at=time.time(),
                    ttl=600.0, message_type=message_type)


def train_message(arrays: dict[str, np.ndarray] | list[np.ndarray], *, node: int = 5,
                  server_round: int = 1, config: dict[str, Any] | None = None,
                  message_type: str = MessageType.TRAIN) -> Message:
    """What a FedAvg server sends node ``node``: the arrays and a config with the round."""
    if isinstance(arrays, dict):
        arrays = {k: Array(v) for k, v in arrays.items()}
    content = RecordDict({"arrays": ArrayRecord(arrays),
                          "config": ConfigRecord({"server-round": server_round,
                                                  **(config or {})})})
    return Message(content, metadata=metadata(src=0, dst=node, message_type=message_type))


def context(node: int = 5, partition: int = 0) -> Context:
    return Context(run_id=1, node_id=node, node_config={"partition-id": partition},
                   state=RecordDict(), run_config={})


def reply(node: int, payloads: dict[str, bytes] | list[bytes], n: Any = 10, *,
          pid: int | None = None, metrics: dict[str, Any] | None = None) -> Message:
    """A client's train reply as compression_mod writes it (``n=None``: no num-examples)."""
    if isinstance(payloads, list):
        payloads = {str(i): p for i, p in enumerate(payloads)}
    m = dict(metrics or {"train-loss": 1.0})
    if n is not None:
        m["num-examples"] = n
    if pid is not None:
        m["partition-id"] = pid
    content = RecordDict({
        UPDATE_KEY: ArrayRecord({k: Array(np.frombuffer(p, dtype=np.uint8).copy())
                                 for k, p in payloads.items()}),
        "metrics": MetricRecord(m)})
    return Message(content, metadata=metadata(src=node, dst=0, reply_to="x"))


def error_reply(node: int, reason: str = "boom") -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                   reply_to=Message(RecordDict(), metadata=metadata(src=0, dst=node)))


def step_app(crash_node: int | None = None) -> ClientApp:
    """Each node's update is (partition + 1) everywhere, weighted by partition + 1; node
    ``crash_node`` raises."""
    app = ClientApp(mods=[fl.compression_mod("fp32")])

    @app.train()
    def train(msg, context):
        if context.node_id == crash_node:
            raise RuntimeError("disk full")
        pid = int(context.node_config["partition-id"])
        arrays = {k: a.numpy() + (pid + 1) for k, a in msg.content["arrays"].items()}
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in
                                                          arrays.items()}),
                                   "metrics": MetricRecord({"num-examples": pid + 1})}),
                       reply_to=msg)

    return app


class LoopbackGrid(Grid):
    """Delivers messages to ``client_app`` on ``num_nodes`` in-process nodes (ids 101...)."""

    def __init__(self, client_app: Any, num_nodes: int, *,
                 tamper: Callable[[int, Message], Message] | None = None,
                 run_config: dict[str, Any] | None = None) -> None:
        self.app, self.tamper = client_app, tamper
        self.contexts = {
            100 + i + 1: Context(run_id=1, node_id=100 + i + 1,
                                 node_config={"partition-id": i, "num-partitions": num_nodes},
                                 state=RecordDict(), run_config=dict(run_config or {}))
            for i in range(num_nodes)}
        self.sent: list[list[int]] = []  # node ids of each non-empty send_and_receive
        self._run: Any = None

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LoopbackGrid only does send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LoopbackGrid only does send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        out, nodes = [], []
        for msg in messages:
            node = msg.metadata.dst_node_id
            nodes.append(node)
            delivered = Message(copy.deepcopy(msg.content), metadata=metadata(
                src=0, dst=node, message_type=msg.metadata.message_type))
            try:
                answer = self.app(delivered, self.contexts[node])
            except Exception as exc:  # Flower's runtime turns this into an error reply
                answer = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                       reason=f"{type(exc).__name__}: {exc}"),
                                 reply_to=delivered)
            if self.tamper is not None:
                answer = self.tamper(node, answer)
            content = None if answer.has_error() else copy.deepcopy(answer.content)
            out.append(answer if content is None else Message(
                content, metadata=answer.metadata))
        if nodes:
            self.sent.append(nodes)
        return out
