"""The client side: error feedback kept across rounds, an update encoded into a gradpress
payload, and the demo's Flower ``ClientApp``.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

import numpy as np
import torch

from gradpress.compressors import Compressor, get
from gradpress.flower.compat import (
    FLWR_MISSING,
    HAVE_FLWR,
    ArrayRecord,
    ClientApp,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from gradpress.flower.task import FederatedData, local_train

FEEDBACKS = ("none", "ef", "ecq")


_PAYLOAD_KEY = "gradpress"


_STATE_KEY = "gradpress-feedback"


# -- client-side compression with error feedback -----------------------------------------
class _LocalFeedback:
    """Fallback with the gradpress.feedback interface, used when that module is absent:
    ``ef`` (e <- v - C(v), v = g + e) and ``ecq`` (h <- beta h + g - C(v), v = g + alpha h)."""

    def __init__(self, kind: str, alpha: float = 1.0, beta: float = 1.0) -> None:
        self.kind, self.alpha, self.beta = kind, alpha, beta
        self.mem: dict[str, torch.Tensor] = {}

    def to_send(self, key: str, g: torch.Tensor) -> torch.Tensor:
        m = self.mem.get(key)
        if m is None or self.kind == "none":
            return g.clone()
        return g + (m if self.kind == "ef" else self.alpha * m)

    def commit(self, key: str, g: torch.Tensor, sent: torch.Tensor) -> None:
        if self.kind == "ef":
            self.mem[key] = self.to_send(key, g) - sent
        elif self.kind == "ecq":
            prev = self.mem.get(key, torch.zeros_like(g))
            self.mem[key] = self.beta * prev + (g - sent)

    def state_dict(self) -> dict[str, Any]:
        return {k: v.clone() for k, v in self.mem.items()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.mem = {k: v.clone() for k, v in sd.items()}


def make_feedback(kind: str, **kwargs: Any) -> Any:
    """A client feedback object: :mod:`gradpress.feedback` when present, else a local one."""
    if kind not in FEEDBACKS:
        raise ValueError(f"feedback must be one of {', '.join(FEEDBACKS)}, got {kind!r}")
    try:
        from gradpress import feedback as gp_feedback

        return gp_feedback.get(kind, **kwargs)
    except (ImportError, AttributeError):
        return _LocalFeedback(kind, **kwargs)


def _state_to_array(fb: Any) -> np.ndarray:
    buf = io.BytesIO()
    torch.save(fb.state_dict(), buf)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()


def _state_from_array(fb: Any, arr: np.ndarray) -> None:
    fb.load_state_dict(torch.load(io.BytesIO(arr.tobytes()), weights_only=True))


def encode_update(delta: torch.Tensor, compressor: Compressor, feedback: Any | None = None,
                  *, seed: int = 0, crc: bool = True) -> bytes:
    """The client's message: ``delta`` through ``feedback`` and ``compressor`` to bytes."""
    if feedback is None:
        return dataclasses.replace(compressor.encode(delta, seed=seed), crc=crc).to_bytes()
    v = feedback.to_send("model", delta)
    payload = dataclasses.replace(compressor.encode(v, seed=seed), crc=crc)
    raw = payload.to_bytes()
    feedback.commit("model", delta, compressor.decode(payload, device=delta.device))
    return raw


def round_seed(seed: int, server_round: int, client: int) -> int:
    """Per-client, per-round encoder seed (shared randomness travels in the header)."""
    return (seed * 1_000_003 + server_round * 10_007 + client) & 0xFFFFFFFFFFFF


# -- Flower apps -----------------------------------------------------------------------------
def make_client_app(data: FederatedData) -> ClientApp:
    """A Flower ClientApp: local SGD on partition ``partition-id``, compressed update back."""
    if not HAVE_FLWR:
        raise ImportError(FLWR_MISSING)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        pid = int(context.node_config["partition-id"])
        cfg = msg.content["config"]
        (w,) = msg.content["arrays"].to_numpy_ndarrays()
        x, y = data.clients[pid]
        w_new, loss = local_train(w, x, y, epochs=int(cfg["local-epochs"]), lr=float(cfg["lr"]),
                                  batch_size=int(cfg["batch-size"]),
                                  seed=round_seed(int(cfg["seed"]), int(cfg["server-round"]), pid))
        compressor = get(str(cfg["compressor"]), **json.loads(str(cfg["compressor-kwargs"])))
        fb = None
        if cfg["feedback"] != "none":
            fb = make_feedback(str(cfg["feedback"]))
            if _STATE_KEY in context.state:
                (arr,) = context.state[_STATE_KEY].to_numpy_ndarrays()
                _state_from_array(fb, arr)
        delta = torch.tensor(w_new - w)
        raw = encode_update(delta, compressor, fb, crc=bool(cfg["crc"]),
                            seed=round_seed(int(cfg["seed"]), int(cfg["server-round"]), pid))
        if fb is not None:
            context.state[_STATE_KEY] = ArrayRecord([_state_to_array(fb)])
        content = RecordDict({
            _PAYLOAD_KEY: ArrayRecord([np.frombuffer(raw, dtype=np.uint8).copy()]),
            "metrics": MetricRecord({"num-examples": len(y), "train-loss": loss,
                                     "partition-id": pid}),
        })
        return Message(content=content, reply_to=msg)

    return app
