"""Running a federated experiment: through Flower's simulation engine, or the same algorithm
in an in-repo loop when ``flwr`` is not installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from gradpress.compressors import Compressor, get
from gradpress.errors import PeerError
from gradpress.flower.client import make_client_app
from gradpress.flower.compat import (
    FLWR_MISSING,
    HAVE_FLWR,
    ArrayRecord,
    ConfigRecord,
    Context,
    Grid,
    MetricRecord,
    ServerApp,
)
from gradpress.flower.strategy import CompressedFedAvg
from gradpress.flower.task import FederatedData, evaluate, init_params, local_train, num_params
from gradpress.flower.update import decode_update, encode_update, make_feedback, round_seed


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

    The demo ClientApp (:func:`make_client_app`, with :func:`compression_mod`) and a
    :class:`CompressedFedAvg` (``strict``: a dropped client ends the run) run through
    ``flwr.simulation.run_simulation``: deprecated in Flower 1.42 in favour of ``flwr run``,
    which needs a packaged app and a SuperLink and cannot take this function's in-memory
    data; ``examples/flower_app`` shows the ``flwr run`` way.

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
            compressor, compressor_kwargs, require_crc=crc, strict=strict,
            fraction_train=fraction, fraction_evaluate=0.0,
            min_train_nodes=max(1, int(fraction * n)), min_available_nodes=n)
    train_config = ConfigRecord({"local-epochs": local_epochs, "lr": lr,
                                 "batch-size": batch_size, "seed": seed})
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
                       num_rounds=rounds, evaluate_fn=evaluate_fn, train_config=train_config)

    t0 = time.perf_counter()
    with _quiet_flower():
        client = make_client_app(data, strategy.compressor, feedback, seed=seed, crc=crc)
        run_simulation(server_app=server, client_app=client, num_supernodes=n,
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
            raw = encode_update(torch.from_numpy(w_new - w), comp, fb, key="0", seed=s, crc=crc)
            uplink += len(raw)
            update = decode_update(raw, comp, w.shape, client=f"client {pid}",
                                   dtype=torch.float32, require_crc=crc)
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
