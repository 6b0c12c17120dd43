"""The server side: :class:`CompressedFedAvg`, Flower's message-API ``FedAvg`` fed with
gradpress payloads decoded from the bytes each client sent (algorithm in
:mod:`gradpress.flower`)."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch

from gradpress.compressors import Compressor, get
from gradpress.errors import PayloadError, PeerError
from gradpress.flower.client import _PAYLOAD_KEY, FEEDBACKS
from gradpress.flower.compat import (
    FLWR_MISSING,
    HAVE_FLWR,
    ArrayRecord,
    ConfigRecord,
    FedAvg,
    MetricRecord,
)
from gradpress.kernels.sd_search import Grid
from gradpress.payload import Payload


def decode_update(raw: bytes, compressor: Compressor, numel: int, *, client: str,
                  require_crc: bool = True) -> torch.Tensor:
    """Parse and decode a client's payload; any defect raises PayloadError naming ``client``."""
    try:
        payload = Payload.from_bytes(raw)
        if require_crc and not payload.crc:
            raise PayloadError("payload has no CRC32 but this server requires one "
                               "(clients must encode with crc=True)")
        if payload.shape != (numel,):
            raise PayloadError(f"payload shape {payload.shape}, the model has ({numel},)")
        update = compressor.decode(payload)
        if not bool(torch.isfinite(update).all()):
            raise PayloadError("decoded update holds NaN/Inf")
        return update.float()
    except PayloadError as exc:
        raise PayloadError(f"corrupt update from {client}: {exc}") from exc


class CompressedFedAvg(FedAvg):  # type: ignore[misc,valid-type]
    """FedAvg whose clients send gradpress payloads of their model updates.

    ``compressor``/``compressor_kwargs`` name a registered compressor (the clients get the
    same spec in their train config). ``feedback`` is the clients' error feedback (``none``,
    ``ef``, ``ecq``). ``require_crc`` rejects payloads without a CRC32; ``strict`` makes a
    corrupt payload or a failed client end the run with an error naming the client (else the
    client is dropped from the round and counted in ``history``). ``history`` holds one dict
    per round: uplink bytes (real payload bytes received), clients, dropped.
    ``global_weights`` is the flat weight vector broadcast this round (set by
    ``configure_train``; updates are decoded against its length).
    """

    def __init__(self, compressor: str = "fp32", compressor_kwargs: dict[str, Any] | None = None,
                 *, feedback: str = "none", local_epochs: int = 1, lr: float = 0.1,
                 batch_size: int = 16, server_lr: float = 1.0, seed: int = 0, crc: bool = True,
                 require_crc: bool = True, strict: bool = True, **fedavg_kwargs: Any) -> None:
        if not HAVE_FLWR:
            raise ImportError(FLWR_MISSING)
        fedavg_kwargs.setdefault("fraction_evaluate", 0.0)
        super().__init__(**fedavg_kwargs)
        self.compressor_kwargs = dict(compressor_kwargs or {})
        self.compressor = get(compressor, **self.compressor_kwargs)
        if feedback not in FEEDBACKS:
            raise ValueError(f"feedback must be one of {', '.join(FEEDBACKS)}, got {feedback!r}")
        self.client_config = {
            "compressor": compressor, "compressor-kwargs": json.dumps(self.compressor_kwargs),
            "feedback": feedback, "local-epochs": local_epochs, "lr": lr,
            "batch-size": batch_size, "seed": seed, "crc": crc}
        self.server_lr, self.require_crc, self.strict = server_lr, require_crc, strict
        self.history: list[dict[str, Any]] = []
        self.global_weights: np.ndarray | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Any:
        (self.global_weights,) = arrays.to_numpy_ndarrays()
        for key, value in self.client_config.items():
            config[key] = value
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Any
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.global_weights is None:
            raise RuntimeError("aggregate_train before configure_train")
        replies = list(replies)
        total = torch.zeros(self.global_weights.shape[0], dtype=torch.float64)
        n_total, uplink, framing, losses, dropped = 0, 0, 0, [], []
        for msg in replies:
            node = f"client node {msg.metadata.src_node_id}"
            if msg.has_error():
                self._fail(PeerError(f"{node} failed: {msg.error.reason}"), dropped, node)
                continue
            metrics = msg.content["metrics"]
            node += f" (partition {int(metrics['partition-id'])})"
            array = next(iter(msg.content[_PAYLOAD_KEY].values()))
            raw = array.numpy().tobytes()
            uplink += len(raw)
            framing += len(array.data)
            try:
                update = decode_update(raw, self.compressor, self.global_weights.shape[0],
                                       client=node, require_crc=self.require_crc)
            except PayloadError as exc:
                self._fail(exc, dropped, node)
                continue
            n = int(metrics["num-examples"])
            total += n * update.double()
            n_total += n
            losses.append((n, float(metrics["train-loss"])))
        record = {"round": server_round, "clients": len(replies) - len(dropped),
                  "dropped": dropped, "uplink_bytes": uplink, "flower_array_bytes": framing,
                  "downlink_bytes": 4 * self.global_weights.size * len(replies)}
        self.history.append(record)
        if n_total == 0:
            return None, None
        new = self.global_weights + self.server_lr * (total / n_total).float().numpy()
        loss = sum(n * v for n, v in losses) / n_total
        return ArrayRecord([new.astype(np.float32)]), MetricRecord(
            {"train-loss": loss, "uplink-bytes": uplink})

    def _fail(self, exc: Exception, dropped: list[str], node: str) -> None:
        if self.strict:
            raise exc
        logging.getLogger(__name__).warning("dropping %s this round: %s", node, exc)
        dropped.append(node)


