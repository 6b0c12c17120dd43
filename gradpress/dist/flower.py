"""Federated learning with Flower: compressed client updates decoded inside a Strategy.

Albasyoni, Safaryan, Condat and Richtarik (2020, "Optimal Gradient Compression for
Distributed and Federated Learning", arXiv 2010.03246) target the federated uplink, where
each client's model update is the message. One round of FedAvg (McMahan et al. 2017) with
gradpress on the uplink:

1. The server broadcasts the global weights ``w`` (a flat float32 vector, Flower
   ``ArrayRecord``) and the compressor's name and arguments (``ConfigRecord``).
2. Client ``i`` trains ``E`` local epochs of SGD on its data from ``w`` and forms the update
   ``delta_i = w_i - w``.
3. Optional client error feedback (``ef``: classic EF, ``ecq``: ECQ-SGD's
   ``delta + alpha h``): ``v_i = fb.to_send(delta_i)``; ``payload = C.encode(v_i, seed)``
   with a CRC32 in the header; ``fb.commit(delta_i, C(v_i))``. The feedback state lives in
   Flower's ``context.state`` so it survives between rounds on any simulation actor.
4. The payload's bytes travel as a ``uint8`` array in the reply's ``ArrayRecord``.
5. The server strategy (:class:`CompressedFedAvg`, a subclass of Flower's message-API
   ``FedAvg``) parses each payload (CRC checked; a corrupt one raises a
   :class:`~gradpress.errors.PayloadError` naming the client), decodes it, and sets
   ``w <- w + server_lr * sum_i n_i C(v_i) / sum_i n_i``.

Bits: the uplink of a round is ``sum_i len(payload_i.to_bytes())``, counted on the server
from the bytes it received; Flower's own framing (the numpy array header in its
``ArrayRecord``) is reported separately. The downlink is the uncompressed fp32 model.

The data, model and local training below are plain functions, so :func:`run_local` runs
the same algorithm without Flower (an in-repo loop used when ``flwr`` is not installed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from gradpress.compressors import Compressor, get
from gradpress.errors import PayloadError, PeerError
from gradpress.payload import Payload

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no calls home from a library
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

try:
    from flwr.app import (
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    HAVE_FLWR = True
except ImportError:  # pragma: no cover - exercised only without the extra
    FedAvg = object  # type: ignore[assignment,misc]
    HAVE_FLWR = False

FLWR_MISSING = "Flower is not installed: pip install 'gradpress[flower]' (flwr[simulation])"
FEEDBACKS = ("none", "ef", "ecq")
_PAYLOAD_KEY = "gradpress"
_STATE_KEY = "gradpress-feedback"


# -- data -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FederatedData:
    """Client partitions and a held-out test set of scikit-learn's digits (8x8, 10 classes)."""

    clients: list[tuple[np.ndarray, np.ndarray]]
    test: tuple[np.ndarray, np.ndarray]


def digits_partitions(num_clients: int, *, alpha: float = 0.5, test_fraction: float = 0.25,
                      min_size: int = 10, seed: int = 0) -> FederatedData:
    """Split digits non-iid: for every label, client shares drawn from ``Dirichlet(alpha)``.

    Small ``alpha`` gives each client few labels. Draws are repeated (seeded) until every
    client holds at least ``min_size`` training samples.
    """
    from sklearn.datasets import load_digits

    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    if len(train_idx) < num_clients * min_size:
        raise ValueError(f"{len(train_idx)} training samples cannot give {num_clients} "
                         f"clients {min_size} each; use fewer clients or a smaller min_size")
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label in range(10):
            idx = train_idx[y[train_idx] == label]
            idx = idx[rng.permutation(len(idx))]
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * len(idx))
            for i, chunk in enumerate(np.split(idx, cuts.astype(int))):
                parts[i].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        raise ValueError(f"no Dirichlet({alpha}) split gave every client {min_size} samples;"
                         " raise alpha or lower min_size")
    clients = [(x[np.sort(p)], y[np.sort(p)]) for p in parts]
    return FederatedData(clients, (x[test_idx], y[test_idx]))


# -- model: an MLP (or softmax regression) on a flat parameter vector -----------------------
def _shapes(hidden: int) -> list[tuple[int, ...]]:
    if hidden == 0:
        return [(64, 10), (10,)]
    return [(64, hidden), (hidden,), (hidden, 10), (10,)]


def num_params(hidden: int) -> int:
    """Length of the flat parameter vector of the 64-hidden-10 MLP (hidden=0: softmax)."""
    return sum(int(np.prod(s)) for s in _shapes(hidden))


def init_params(hidden: int, seed: int = 0) -> np.ndarray:
    """He-initialized weights, zero biases, as one float32 vector."""
    if hidden < 0:
        raise ValueError(f"hidden must be >= 0, got {hidden}")
    rng = np.random.default_rng(seed)
    parts = [rng.normal(0.0, np.sqrt(2.0 / s[0]), s).ravel() if len(s) == 2 else np.zeros(s)
             for s in _shapes(hidden)]
    return np.concatenate(parts).astype(np.float32)


def _logits(w: torch.Tensor, x: torch.Tensor, hidden: int) -> torch.Tensor:
    tensors, pos = [], 0
    for s in _shapes(hidden):
        n = int(np.prod(s))
        tensors.append(w[pos:pos + n].reshape(s))
        pos += n
    if hidden == 0:
        return x @ tensors[0] + tensors[1]
    h = torch.relu(x @ tensors[0] + tensors[1])
    return h @ tensors[2] + tensors[3]


def _hidden_of(w: np.ndarray | torch.Tensor) -> int:
    n = int(w.shape[0])
    if n == num_params(0):
        return 0
    hidden = (n - 10) // 75  # 64h + h + 10h + 10
    if num_params(hidden) != n:
        raise ValueError(f"{n} parameters is no 64-hidden-10 MLP")
    return hidden


def evaluate(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(cross-entropy, accuracy) of weights ``w`` on ``(x, y)``."""
    with torch.no_grad():
        yt = torch.tensor(y)
        logits = _logits(torch.tensor(w, dtype=torch.float32), torch.tensor(x), _hidden_of(w))
        loss = float(torch.nn.functional.cross_entropy(logits, yt))
        acc = float((logits.argmax(1) == yt).float().mean())
    return loss, acc


def local_train(w: np.ndarray, x: np.ndarray, y: np.ndarray, *, epochs: int = 1,
                lr: float = 0.1, batch_size: int = 16, seed: int = 0) -> tuple[np.ndarray, float]:
    """``epochs`` of minibatch SGD from ``w``; returns the new weights and the mean loss."""
    hidden = _hidden_of(w)
    wt = torch.tensor(np.asarray(w, np.float32), requires_grad=True)
    xt, yt = torch.tensor(x), torch.tensor(y)  # copies: arrays from Flower are read-only
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        for idx in torch.randperm(len(yt), generator=gen).split(batch_size):
            loss = torch.nn.functional.cross_entropy(_logits(wt, xt[idx], hidden), yt[idx])
            (grad,) = torch.autograd.grad(loss, wt)
            with torch.no_grad():
                wt -= lr * grad
            losses.append(float(loss.detach()))
    return wt.detach().numpy().copy(), float(np.mean(losses)) if losses else 0.0


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


@contextlib.contextmanager
def _quiet_flower() -> Iterator[None]:
    """Silence Flower's per-round INFO log and deprecation notes (errors still show)."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_flower(data: FederatedData, *, rounds: int = 20, hidden: int = 32,
               compressor: str = "fp32", compressor_kwargs: dict[str, Any] | None = None,
               feedback: str = "none", fraction: float = 1.0, local_epochs: int = 1,
               lr: float = 0.1, batch_size: int = 16, seed: int = 0, crc: bool = True,
               strict: bool = True, on_round: Callable[[dict[str, Any]], None] | None = None,
               client_cpus: float = 1.0) -> dict[str, Any]:
    """Run FedAvg with compressed uplink in Flower's simulation engine (Ray backend).

    Returns ``{"rounds": [...], "final_accuracy", ...}``; each round has the test accuracy
    of the global model and the cumulative real uplink bytes.
    """
    if not HAVE_FLWR:
        raise ImportError(FLWR_MISSING)
    if importlib.util.find_spec("ray") is None:
        raise ImportError("Flower's simulation engine needs Ray: pip install 'flwr[simulation]'"
                          " (or use run_local)")
    from flwr.simulation import run_simulation

    n = len(data.clients)
    with _quiet_flower():
        strategy = CompressedFedAvg(
            compressor, compressor_kwargs, feedback=feedback, local_epochs=local_epochs, lr=lr,
            batch_size=batch_size, seed=seed, crc=crc, strict=strict, fraction_train=fraction,
            min_train_nodes=max(1, int(fraction * n)), min_available_nodes=n)
    rounds_out: list[dict[str, Any]] = []
    cumulative = [0]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        (w,) = arrays.to_numpy_ndarrays()
        loss, acc = evaluate(w, *data.test)
        rec = {"round": server_round, "test_loss": loss, "test_accuracy": acc}
        if server_round > 0 and strategy.history:
            h = strategy.history[-1]
            cumulative[0] += h["uplink_bytes"]
            rec.update(uplink_bytes=h["uplink_bytes"], clients=h["clients"],
                       flower_array_bytes=h["flower_array_bytes"], dropped=h["dropped"])
        rec["cumulative_uplink_bytes"] = cumulative[0]
        rounds_out.append(rec)
        if on_round is not None:
            on_round(rec)
        return MetricRecord({"accuracy": acc, "loss": loss})

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy.start(grid=grid, initial_arrays=ArrayRecord([init_params(hidden, seed)]),
                       num_rounds=rounds, evaluate_fn=evaluate_fn)

    t0 = time.perf_counter()
    with _quiet_flower():
        run_simulation(server_app=server, client_app=make_client_app(data), num_supernodes=n,
                       backend_config={"client_resources": {"num_cpus": client_cpus,
                                                            "num_gpus": 0.0},
                                       "init_args": {"include_dashboard": False}})
    if len(rounds_out) != rounds + 1:
        raise PeerError(f"the Flower run ended after {len(rounds_out) - 1} of {rounds} rounds;"
                        " see the log above")
    return _result(rounds_out, strategy.compressor, hidden, time.perf_counter() - t0,
                   "flower-simulation (ray)")


def run_local(data: FederatedData, *, rounds: int = 20, hidden: int = 32,
              compressor: str = "fp32", compressor_kwargs: dict[str, Any] | None = None,
              feedback: str = "none", local_epochs: int = 1, lr: float = 0.1,
              batch_size: int = 16, seed: int = 0, crc: bool = True,
              on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The same FedAvg with every client each round, in one process, without Flower."""
    comp = get(compressor, **(compressor_kwargs or {}))
    w = init_params(hidden, seed)
    fbs = [make_feedback(feedback) if feedback != "none" else None for _ in data.clients]
    loss, acc = evaluate(w, *data.test)
    out = [{"round": 0, "test_loss": loss, "test_accuracy": acc, "cumulative_uplink_bytes": 0}]
    cumulative, t0 = 0, time.perf_counter()
    for r in range(1, rounds + 1):
        total, n_total, uplink = torch.zeros(w.shape[0], dtype=torch.float64), 0, 0
        for pid, ((x, y), fb) in enumerate(zip(data.clients, fbs)):
            s = round_seed(seed, r, pid)
            w_new, _ = local_train(w, x, y, epochs=local_epochs, lr=lr, batch_size=batch_size,
                                   seed=s)
            raw = encode_update(torch.from_numpy(w_new - w), comp, fb, seed=s, crc=crc)
            uplink += len(raw)
            update = decode_update(raw, comp, w.shape[0], client=f"client {pid}")
            total += len(y) * update.double()
            n_total += len(y)
        w = w + (total / n_total).float().numpy()
        cumulative += uplink
        loss, acc = evaluate(w, *data.test)
        rec = {"round": r, "test_loss": loss, "test_accuracy": acc, "uplink_bytes": uplink,
               "clients": len(data.clients), "cumulative_uplink_bytes": cumulative}
        out.append(rec)
        if on_round is not None:
            on_round(rec)
    return _result(out, comp, hidden, time.perf_counter() - t0, "local loop (no Flower)")


def _result(rounds: list[dict[str, Any]], comp: Compressor, hidden: int, wall: float,
            engine: str) -> dict[str, Any]:
    d = num_params(hidden)
    sent = sum(r.get("clients", 0) for r in rounds)
    total = rounds[-1]["cumulative_uplink_bytes"]
    return {"compressor": comp.name, "config": comp.config(), "engine": engine,
            "params": d, "rounds": rounds, "final_accuracy": rounds[-1]["test_accuracy"],
            "uplink_bytes": total,
            "bits_per_coordinate": 8.0 * total / (sent * d) if sent else 0.0,
            "wall_s": wall}
