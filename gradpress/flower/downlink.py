"""The optional compressed downlink (server -> clients), with error feedback on the server.

Off by default (``CompressedFedAvg(downlink=None)``); on, the clients train from a copy
``x`` of the model that every node holds bit for bit, kept in step by compressed messages:

1. Round ``t`` (version ``t``): the server moves the copy towards its model ``w_t``,
   ``s_t = C(w_t - x_(t-1))``, ``x_t = x_(t-1) + s_t`` (version 1: ``x_1 = w_1``, sent
   whole). What ``C`` drops, ``w_t - x_t``, stays in the next difference: error feedback
   without a separate residual (Seide et al. 2014; the downlink half of DoubleSqueeze,
   Tang et al. 2019).
2. Node ``i`` last confirmed version ``v_i`` (its last accepted train reply). It gets the
   steps ``s_(v_i+1) .. s_t`` (each array's payload under ``"<version>/<key>"`` in the
   ``ArrayRecord`` :data:`DOWNLINK_KEY`), or ``x_t`` whole when ``v_i`` is unknown, older
   than the ``max_chain`` steps the server keeps, or the steps would cost more bytes. The
   train config says which (``gradpress-downlink-base``: ``v_i``, or -1 for whole) and
   names the compressor.
3. :func:`receive` (called by ``compression_mod``) applies the steps past the node's own
   version to its stored copy (``context.state``), stores ``x_t``, and hands the app the
   usual ``ArrayRecord`` of arrays: the app is unchanged. A node that cannot (its copy is
   gone or older than ``v_i``) replies an error; the server forgets ``v_i`` and sends
   ``x`` whole the next time.
4. The clients' updates are relative to ``x_t``; the server adds their average to ``w_t``
   (``w_(t+1) = w_t + server_lr * mean``) as without downlink compression.

Non-float arrays travel raw in each step. Federated evaluation messages carry ``w`` as
Flower sends it (uncompressed). Bits: ``sum len(payload)`` over the steps a node is sent
(at most the arrays' raw bytes, which ``x`` whole costs), Flower's ``.npy`` framing apart.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import torch

from gradpress.compressors import Compressor, get
from gradpress.flower.compat import Array, ArrayRecord, ConfigRecord, RecordDict
from gradpress.flower.update import check_header, round_seed, torch_dtype
from gradpress.payload import Payload

#: Key of the ``ArrayRecord`` of downlink steps in a train message.
DOWNLINK_KEY = "gradpress-downlink"
#: Keys in ``context.state`` of a node's copy of the model and its version.
MODEL_STATE_KEY, VERSION_STATE_KEY = "gradpress-downlink-model", "gradpress-downlink-version"
_CFG = "gradpress-downlink-"
_SEED_CLIENT = 0xFFFF  # round_seed's client slot for the server's encoder


class DownlinkOutOfSync(ValueError):
    """The node's copy of the model cannot take the steps it was sent."""


class DownlinkServer:
    """Server state of step 1-2: the shared copy ``x``, recent steps, each node's version."""

    def __init__(self, compressor: Compressor, *, max_chain: int = 8, seed: int = 0,
                 kwargs: dict[str, Any] | None = None) -> None:
        if type(max_chain) is not int or max_chain < 1:
            raise ValueError(f"max_chain must be an int >= 1, got {max_chain!r}")
        self.compressor, self.max_chain, self.seed = compressor, max_chain, seed
        self.spec = {"compressor": compressor.name,
                     "kwargs": json.dumps(kwargs if kwargs is not None else compressor.config())}
        #: ``x``: what every in-sync node trains from (``None`` before round 1).
        self.model: dict[str, np.ndarray] | None = None
        self.version = 0
        self.steps: dict[int, dict[str, Array]] = {}
        #: Node id -> the version its last accepted reply confirmed.
        self.nodes: dict[int, int] = {}

    def advance(self, w: dict[str, np.ndarray]) -> None:
        """Step 1: ``x <- x + C(w - x)``, one version more."""
        self.version += 1
        if self.model is None:
            self.model = {k: np.array(v, copy=True) for k, v in w.items()}
            return
        step: dict[str, Array] = {}
        for index, (key, target) in enumerate(w.items()):
            old = self.model[key]
            if torch_dtype(old.dtype) is None:
                self.model[key] = np.array(target, copy=True)
                step[key] = Array(self.model[key])
                continue
            delta = torch.from_numpy(np.ascontiguousarray(target - old))
            payload = dataclasses.replace(self.compressor.encode(
                delta, seed=round_seed(self.seed, self.version, _SEED_CLIENT, index)), crc=True)
            sent = self.compressor.decode(payload).numpy()
            self.model[key] = (old + sent).astype(old.dtype)
            step[key] = Array(np.frombuffer(payload.to_bytes(), dtype=np.uint8).copy())
        self.steps[self.version] = step
        self.steps.pop(self.version - self.max_chain, None)

    def content_for(self, node_id: int, content: RecordDict, arrays_key: str,
                    config_key: str) -> tuple[RecordDict, int]:
        """Step 2: node ``node_id``'s train content and its downlink bytes."""
        assert self.model is not None, "advance() first"
        config = ConfigRecord(dict(content[config_key]))
        config[_CFG + "compressor"] = self.spec["compressor"]
        config[_CFG + "kwargs"] = self.spec["kwargs"]
        config[_CFG + "version"] = self.version
        config[_CFG + "arrays-key"] = arrays_key
        have = self.nodes.get(node_id)
        whole = sum(v.nbytes for v in self.model.values())
        if have is not None and have >= self.version - self.max_chain:
            steps = {f"{v}/{k}": a for v in range(have + 1, self.version + 1)
                     for k, a in self.steps[v].items()}
            cost = sum(a.numpy().nbytes for a in steps.values())
            if cost < whole:
                config[_CFG + "base"] = have
                return RecordDict({DOWNLINK_KEY: ArrayRecord(steps), config_key: config}), cost
        config[_CFG + "base"] = -1
        return (RecordDict({arrays_key: ArrayRecord({k: Array(v) for k, v in
                                                     self.model.items()}),
                            config_key: config}), whole)

    def confirm(self, node_id: int) -> None:
        """The node replied: it holds this version."""
        self.nodes[node_id] = self.version

    def forget(self, node_id: int) -> None:
        """The node failed: send it ``x`` whole next time."""
        self.nodes.pop(node_id, None)


def receive(msg: Any, context: Any) -> None:
    """Step 3 on a train message (no-op without downlink config): rewrite ``msg.content``
    to hold ``x`` as the app expects and store ``x`` in ``context.state``; raises
    :class:`DownlinkOutOfSync` (or ``PayloadError`` for bad steps)."""
    configs = list(msg.content.config_records.items())
    if len(configs) != 1 or _CFG + "version" not in configs[0][1]:
        return
    config_key, config = configs[0]
    version, base = int(config[_CFG + "version"]), int(config[_CFG + "base"])
    arrays_key = str(config[_CFG + "arrays-key"])
    if base < 0:
        model = {k: a.numpy() for k, a in msg.content[arrays_key].items()}
    else:
        model = _apply_steps(msg.content[DOWNLINK_KEY], context, base, version,
                             get(str(config[_CFG + "compressor"]),
                                 **json.loads(str(config[_CFG + "kwargs"]))))
        del msg.content[DOWNLINK_KEY]
    context.state[MODEL_STATE_KEY] = ArrayRecord({k: Array(v) for k, v in model.items()})
    context.state[VERSION_STATE_KEY] = ConfigRecord({"version": version})
    msg.content[arrays_key] = ArrayRecord({k: Array(v) for k, v in model.items()})
    msg.content[config_key] = ConfigRecord({k: v for k, v in config.items()
                                            if not k.startswith(_CFG)})


def _apply_steps(steps: Any, context: Any, base: int, version: int,
                 comp: Compressor) -> dict[str, np.ndarray]:
    if MODEL_STATE_KEY not in context.state:
        raise DownlinkOutOfSync("this node holds no copy of the model; the server will send "
                                "it whole next time")
    have = int(context.state[VERSION_STATE_KEY]["version"])
    if have < base:
        raise DownlinkOutOfSync(f"this node holds version {have}, the steps start after "
                                f"{base}")
    model = {k: np.array(a.numpy(), copy=True)
             for k, a in context.state[MODEL_STATE_KEY].items()}
    for v in range(have + 1, version + 1):
        for key, old in model.items():
            array = steps.get(f"{v}/{key}")
            if array is None:
                raise DownlinkOutOfSync(f"the message lacks step {v} of array {key!r}")
            if torch_dtype(old.dtype) is None:
                model[key] = np.array(array.numpy(), copy=True)
                continue
            raw = array.numpy().tobytes()
            check_header(raw, comp, old.shape, torch_dtype(old.dtype))
            model[key] = (old + comp.decode(Payload.from_bytes(raw)).numpy()).astype(old.dtype)
    return model
