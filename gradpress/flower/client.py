"""The demo's Flower ``ClientApp``: plain local SGD on one digits partition, replying with
its trained weights as any Flower app does; :func:`~gradpress.flower.compression_mod` in
its ``mods`` turns the reply into gradpress payloads of the update.
"""

from __future__ import annotations

from typing import Any

import torch

from gradpress.compressors import Compressor
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
from gradpress.flower.mod import FeedbackSpec, compression_mod
from gradpress.flower.task import FederatedData, local_train
from gradpress.flower.update import round_seed


def make_client_app(data: FederatedData, compressor: Compressor | str = "fp32",
                    feedback: FeedbackSpec = None, *, seed: int = 0, crc: bool = True,
                    compressor_kwargs: dict[str, Any] | None = None) -> ClientApp:
    """The demo ClientApp on partition ``partition-id`` of ``data``, with the compression mod.

    The train config (``local-epochs``, ``lr``, ``batch-size``, ``seed``) comes from the
    server's ``train_config``; local SGD is seeded like :func:`~gradpress.flower.run_local`.
    """
    if not HAVE_FLWR:
        raise ImportError(FLWR_MISSING)
    app = ClientApp(mods=[compression_mod(compressor, feedback, seed=seed, crc=crc,
                                          compressor_kwargs=compressor_kwargs)])

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
        content = RecordDict({
            "arrays": ArrayRecord([w_new]),
            "metrics": MetricRecord({"num-examples": len(y), "train-loss": loss,
                                     "partition-id": pid}),
        })
        return Message(content=content, reply_to=msg)

    return app
