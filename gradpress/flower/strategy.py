"""The server side: :class:`CompressedFedAvg`, Flower's message-API ``FedAvg`` fed with
gradpress payloads that it checks before it decodes, so a lying client cannot steer it.

One round, global arrays ``w_k`` (any ``ArrayRecord``: one flat vector, or a torch
``state_dict`` as several arrays):

1. ``configure_train`` keeps ``w`` and samples clients as ``FedAvg`` does
   (``fraction_train``, ``min_train_nodes``); their ``compression_mod`` sends payloads of
   ``w'_k - w_k``.
2. Every reply is read as untrusted input (:mod:`gradpress.flower.replies`: error replies,
   record types, ``num-examples`` an int >= 1, array keys, each payload's header against
   ``w_k``'s shape and dtype); a reply failing any check is dropped with a log line naming
   the client.
3. ``num-examples`` above the cap is dropped too. The cap is ``max_examples`` when given;
   else ``examples_cap_factor`` (10) times the median claim of the first round with any
   valid claim, then frozen. (The median, not the largest claim as a first guess might
   have it: a single round-1 liar would set the largest, and thereby its own cap.) A
   federation whose honest clients differ by more than that factor sets ``max_examples``.
4. The accepted payloads are decoded (CRC checked; a corrupt body drops the client) and
   ``w_k <- w_k + server_lr * sum_i n_i C_i,k / sum_i n_i``, computed in float64 and cast
   back to ``w_k``'s dtype. A non-float array (an integer buffer) is the weighted mean of
   the clients' values, rounded (booleans: the weighted majority); ``server_lr`` does not
   apply to it.
5. A round with no accepted reply keeps ``w`` (``aggregate_train`` returns no arrays) and
   says so: a warning in the log and ``gradpress-model-unchanged = 1`` in the metrics.

``strict=True`` turns every drop into an exception naming the client (``PayloadError`` for
bad bytes, ``PeerError`` otherwise), for experiments where a drop is a bug. Evaluate
replies get checks 1-3 before their metrics are averaged. Client metrics are averaged by
:func:`~gradpress.flower.replies.average_metrics` (scalar, finite, shared keys only) unless
``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn`` are given.

``downlink`` (a compressor, off by default) compresses the train messages too, with error
feedback on the server (:mod:`gradpress.flower.downlink`): clients then train from a copy
``x`` of ``w`` that every node holds exactly, and their updates are added to ``w``.

Bits: ``history[r]["uplink_bytes"]`` is the sum of ``len(payload)`` the server received in
round ``r`` from replies that passed step 2 (plus the raw bytes of non-float arrays);
``flower_array_bytes`` adds Flower's ``.npy`` framing. ``downlink_bytes`` is what the
train messages carried: the arrays' raw bytes times the clients sampled, or with
``downlink`` the payload bytes of the steps each node was sent.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from gradpress.compressors import Compressor, get
from gradpress.errors import PayloadError, PeerError
from gradpress.flower.compat import (
    FLWR_MISSING,
    HAVE_FLWR,
    Array,
    ArrayRecord,
    ConfigRecord,
    FedAvg,
    Grid,
    Message,
    MetricRecord,
)
from gradpress.flower.downlink import DownlinkServer
from gradpress.flower.replies import (
    RejectedReply,
    TrainReply,
    average_metrics,
    examples_of,
    node_name,
    read_train_reply,
)
from gradpress.flower.update import decode_update, torch_dtype

_LOG = logging.getLogger("flwr.gradpress")  # shown with Flower's own round log


class CompressedFedAvg(FedAvg):  # type: ignore[misc,valid-type]
    """FedAvg whose clients send gradpress payloads of their model updates (module doc).

    ``compressor`` (a :class:`~gradpress.compressors.Compressor` or a registered name with
    ``compressor_kwargs``) must be the one the clients' ``compression_mod`` encodes with.
    ``server_lr`` scales the averaged update. ``max_examples`` caps a client's
    ``num-examples`` (default: ``examples_cap_factor`` times the first round's median
    claim). ``require_crc`` drops payloads without a CRC32. ``strict`` raises instead of
    dropping. ``downlink`` (a compressor or a name with ``downlink_kwargs``; ``None``: off)
    compresses the train messages, ``downlink_chain`` steps kept for nodes that skip
    rounds. Other keyword arguments go to Flower's ``FedAvg`` (``fraction_train``,
    ``min_train_nodes``, ``weighted_by_key``, ...).

    ``history`` holds one dict per round: ``clients`` (accepted), ``dropped`` (client
    names), ``uplink_bytes``, ``flower_array_bytes``, ``downlink_bytes``.
    ``examples_cap`` is the cap in force (``None`` before the first round sets it).
    """

    def __init__(self, compressor: Compressor | str = "fp32",
                 compressor_kwargs: dict[str, Any] | None = None, *, server_lr: float = 1.0,
                 max_examples: int | None = None, examples_cap_factor: float = 10.0,
                 require_crc: bool = True, strict: bool = False,
                 downlink: Compressor | str | None = None,
                 downlink_kwargs: dict[str, Any] | None = None, downlink_chain: int = 8,
                 **fedavg_kwargs: Any) -> None:
        if not HAVE_FLWR:
            raise ImportError(FLWR_MISSING)
        if not (isinstance(server_lr, int | float) and math.isfinite(server_lr)
                and server_lr > 0):
            raise ValueError(f"server_lr must be a finite number > 0, got {server_lr!r}")
        if max_examples is not None and (type(max_examples) is not int or max_examples < 1):
            raise ValueError(f"max_examples must be an int >= 1 or None, got {max_examples!r}")
        if not examples_cap_factor >= 1:
            raise ValueError(f"examples_cap_factor must be >= 1, got {examples_cap_factor!r}")
        fedavg_kwargs.setdefault("train_metrics_aggr_fn", average_metrics)
        fedavg_kwargs.setdefault("evaluate_metrics_aggr_fn", average_metrics)
        super().__init__(**fedavg_kwargs)
        self.compressor = get(compressor, **(compressor_kwargs or {})) \
            if isinstance(compressor, str) else compressor
        if not isinstance(self.compressor, Compressor):
            raise TypeError("compressor must be a gradpress Compressor or a registered name")
        self.server_lr, self.require_crc, self.strict = float(server_lr), require_crc, strict
        self.max_examples, self.examples_cap_factor = max_examples, float(examples_cap_factor)
        self.examples_cap: int | None = max_examples
        self.history: list[dict[str, Any]] = []
        self.global_arrays: dict[str, np.ndarray] | None = None
        self.downlink: DownlinkServer | None = None
        if downlink is not None:
            comp = get(downlink, **(downlink_kwargs or {})) if isinstance(downlink, str) \
                else downlink
            self.downlink = DownlinkServer(comp, max_chain=downlink_chain,
                                           kwargs=downlink_kwargs)
        self._downlink_bytes = 0

    def summary(self) -> None:
        super().summary()
        cap = self.examples_cap if self.examples_cap is not None else \
            f"{self.examples_cap_factor:g} x the first round's median"
        _LOG.info("\t└──> gradpress: decoding %r, server_lr %g, num-examples cap: %s",
                  self.compressor, self.server_lr, cap)

    # -- training ---------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_arrays = {k: a.numpy() for k, a in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._downlink_bytes = len(messages) * sum(a.nbytes for a in self.global_arrays.values())
        if self.downlink is not None and messages:
            self.downlink.advance(self.global_arrays)
            self._downlink_bytes = 0
            for msg in messages:
                msg.content, sent = self.downlink.content_for(
                    msg.metadata.dst_node_id, msg.content, self.arrayrecord_key,
                    self.configrecord_key)
                self._downlink_bytes += sent
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.global_arrays is None:
            raise RuntimeError("aggregate_train before configure_train")
        replies = list(replies)
        dropped: list[str] = []
        read: list[TrainReply] = []
        for msg in replies:
            try:
                read.append(read_train_reply(msg, self.global_arrays, self.compressor,
                                             weight_key=self.weighted_by_key,
                                             require_crc=self.require_crc))
            except RejectedReply as exc:
                self._reject(server_round, exc, dropped)
        cap = self._cap([r.examples for r in read], server_round)
        accepted: list[tuple[TrainReply, dict[str, torch.Tensor]]] = []
        for r in read:
            try:
                accepted.append((r, self._decode(r, cap)))
            except RejectedReply as exc:
                self._reject(server_round, exc, dropped)
        record = {"round": server_round, "clients": len(accepted), "dropped": dropped,
                  "uplink_bytes": sum(r.uplink_bytes for r in read),
                  "flower_array_bytes": sum(r.framing_bytes for r in read),
                  "downlink_bytes": self._downlink_bytes}
        self.history.append(record)
        if self.downlink is not None:
            for msg in replies:
                self.downlink.forget(msg.metadata.src_node_id)
            for r, _ in accepted:
                self.downlink.confirm(r.node_id)
        metrics = {"gradpress-uplink-bytes": record["uplink_bytes"],
                   "gradpress-updates": len(accepted), "gradpress-dropped": len(dropped),
                   "gradpress-model-unchanged": int(not accepted)}
        _LOG.info("round %d: %d updates accepted, %d dropped, %d payload bytes received",
                  server_round, len(accepted), len(dropped), record["uplink_bytes"])
        if not accepted:
            _LOG.warning("round %d: no valid client update (%d replies, %d dropped); the "
                         "global model is unchanged", server_round, len(replies), len(dropped))
            return None, MetricRecord(metrics)
        new = self._average(accepted)
        client_metrics = self._client_metrics(self.train_metrics_aggr_fn,
                                              [r.content for r, _ in accepted])
        return ArrayRecord({k: Array(v) for k, v in new.items()}), MetricRecord(
            {**client_metrics, **metrics})

    def _decode(self, r: TrainReply, cap: int) -> dict[str, torch.Tensor]:
        """Step 3's cap, then step 4's decoding of one reply's payloads."""
        if r.examples > cap:
            raise RejectedReply(r.node, f"{r.node}: {self.weighted_by_key!r} = {r.examples} is "
                                        f"above the cap {cap} (max_examples)")
        assert self.global_arrays is not None
        out = {}
        for key, raw in r.payloads.items():
            g = self.global_arrays[key]
            try:
                out[key] = decode_update(raw, self.compressor, tuple(g.shape), client=r.node,
                                         dtype=torch_dtype(g.dtype),
                                         require_crc=self.require_crc)
            except PayloadError as exc:
                raise RejectedReply(r.node, f"{exc} (array {key!r})", payload=True) from exc
        return out

    def _average(self, accepted: list[tuple[TrainReply, dict[str, torch.Tensor]]]
                 ) -> dict[str, np.ndarray]:
        """Step 4: the new global arrays from the accepted, decoded updates."""
        assert self.global_arrays is not None
        n_total = float(sum(r.examples for r, _ in accepted))
        weights = [r.examples / n_total for r, _ in accepted]
        new = {}
        for key, g in self.global_arrays.items():
            if torch_dtype(g.dtype) is not None:
                mean = sum(w * upd[key].double() for w, (_, upd) in zip(weights, accepted))
                step = self.server_lr * mean.numpy()  # type: ignore[union-attr]
                new[key] = (g.astype(np.float64) + step).astype(g.dtype)
            else:
                mean = sum(w * r.raw[key].astype(np.float64) for w, (r, _) in
                           zip(weights, accepted))
                new[key] = (np.asarray(mean) >= 0.5) if g.dtype == np.bool_ else \
                    np.rint(mean).astype(g.dtype)
        return new

    def _cap(self, counts: list[int], server_round: int) -> int:
        """Step 3: the cap in force, set from the first round with any valid claim."""
        if self.examples_cap is None and counts:
            self.examples_cap = max(1, int(self.examples_cap_factor
                                           * statistics.median_low(counts)))
            _LOG.info("round %d: num-examples cap set to %d (%g x the median claim of %d "
                      "clients); pass max_examples to choose it", server_round,
                      self.examples_cap, self.examples_cap_factor, len(counts))
        return self.examples_cap if self.examples_cap is not None else 0

    # -- evaluation -------------------------------------------------------------------------
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        dropped: list[str] = []
        ok: list[Any] = []
        for msg in replies:
            node = node_name(msg)
            try:
                n = examples_of(msg, self.weighted_by_key, node)
                if self.examples_cap is not None and n > self.examples_cap:
                    raise RejectedReply(node, f"{node}: {self.weighted_by_key!r} = {n} is "
                                              f"above the cap {self.examples_cap}")
                ok.append(msg.content)
            except RejectedReply as exc:
                self._reject(server_round, exc, dropped)
        if not ok:
            return None
        return MetricRecord(self._client_metrics(self.evaluate_metrics_aggr_fn, ok))

    # -- shared -----------------------------------------------------------------------------
    def _client_metrics(self, fn: Any, contents: list[Any]) -> dict[str, Any]:
        try:
            return dict(fn(contents, self.weighted_by_key))
        except Exception as exc:  # a user aggregator failing on odd metrics: keep the round
            _LOG.warning("client metrics not aggregated: %s: %s", type(exc).__name__, exc)
            return {}

    def _reject(self, server_round: int, exc: RejectedReply, dropped: list[str]) -> None:
        if self.strict:
            raise (PayloadError if exc.payload else PeerError)(str(exc)) from exc
        _LOG.warning("round %d: update dropped: %s", server_round, exc)
        dropped.append(exc.node)
