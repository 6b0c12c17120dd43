"""Latency-bandwidth (alpha-beta) costs of the collectives that carry gradients: ring and tree
all-reduce, all-gather of compressed payloads, the two-phase compressed all-reduce,
parameter server (formulas in
:mod:`gradpress.netmodel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

GBIT = 1e9


#: Payload share of a 1514-byte Ethernet frame carrying 1448 TCP bytes (TCP/IP + Ethernet
#: headers over a 1500-byte MTU): what a link shaped with ``tc`` delivers to gloo.
TCP_EFFICIENCY = 1448 / 1514


# -- the network ------------------------------------------------------------------------
@dataclass(frozen=True)
class Network:
    """A homogeneous full-duplex network: every worker has one link of this bandwidth."""

    bandwidth_bps: float
    latency_s: float = 5e-6
    efficiency: float = 1.0

    def __post_init__(self) -> None:
        if not self.bandwidth_bps > 0:
            raise ValueError(f"bandwidth_bps must be > 0, got {self.bandwidth_bps}")
        if self.latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {self.latency_s}")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency must be in (0, 1], got {self.efficiency}")

    def transfer_s(self, nbytes: Any) -> Any:
        """Seconds to push ``nbytes`` through one link (bandwidth term only)."""
        return 8.0 * np.asarray(nbytes, dtype=float) / (self.bandwidth_bps * self.efficiency)


def _workers(p: Any) -> np.ndarray:
    arr = np.asarray(p, dtype=float)
    if np.any(arr < 1):
        raise ValueError("the number of workers must be >= 1")
    return arr


def ring_allreduce_s(nbytes: float, p: Any, net: Network, messages: int = 1) -> Any:
    """Ring all-reduce of ``nbytes`` per worker: ``2(p-1) a + 2(p-1)/p n beta``."""
    p = _workers(p)
    return 2 * (p - 1) * net.latency_s * messages + 2 * (p - 1) / p * net.transfer_s(nbytes)


def tree_allreduce_s(nbytes: float, p: Any, net: Network, messages: int = 1) -> Any:
    """Binary-tree reduce + broadcast: ``2 ceil(log2 p) (a + n beta)``."""
    p = _workers(p)
    depth = np.ceil(np.log2(p))
    return 2 * depth * (net.latency_s * messages + net.transfer_s(nbytes))


def allgather_s(nbytes: float, p: Any, net: Network, messages: int = 1) -> Any:
    """Ring all-gather of one ``nbytes`` payload per worker: ``(p-1)(a + n beta)``."""
    p = _workers(p)
    return (p - 1) * (net.latency_s * messages + net.transfer_s(nbytes))


def two_phase_s(nbytes: float, p: Any, net: Network, messages: int = 1) -> Any:
    """Two-phase compressed all-reduce of one ``nbytes`` payload per worker: an all-to-all
    of ``p`` shards of ``n/p`` (each link carries ``(p-1)/p n`` each way, full duplex),
    then a ring all-gather of the owners' ``n/p``: ``2(p-1) a + 2(p-1)/p n beta``."""
    p = _workers(p)
    return 2 * (p - 1) * net.latency_s * messages + 2 * (p - 1) / p * net.transfer_s(nbytes)


def parameter_server_s(up_bytes: float, down_bytes: float, p: Any, net: Network,
                       servers: int = 1, messages: int = 1) -> Any:
    """Push ``up_bytes`` from each worker to ``servers`` shards, pull ``down_bytes`` back."""
    if servers < 1:
        raise ValueError(f"servers must be >= 1, got {servers}")
    p = _workers(p)
    t = 2 * net.latency_s * messages + p * net.transfer_s(up_bytes + down_bytes) / servers
    return np.where(p > 1, t, 0.0)


def _comm_s(collective: str, nbytes: float, p: int, net: Network, msgs: int) -> float:
    if collective == "allreduce":
        return float(ring_allreduce_s(nbytes, p, net, msgs))
    if collective == "allgather":
        return float(allgather_s(nbytes, p, net, msgs))
    if collective == "two_phase":
        return float(two_phase_s(nbytes, p, net, msgs))
    raise ValueError(f"collective must be 'allreduce', 'allgather' or 'two_phase', got "
                     f"{collective!r}")


def parse_rate(rate: str | float) -> float:
    """A ``tc`` rate (``"100mbit"``, ``"1gbit"``, ``"500kbit"``, ``"10mbps"``) in bit/s."""
    if isinstance(rate, (int, float)):
        return float(rate)
    text = rate.strip().lower()
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "gbps": 8e9, "mbps": 8e6, "kbps": 8e3,
             "bit": 1.0, "bps": 8.0}
    for unit, scale in units.items():
        if text.endswith(unit):
            try:
                return float(text[: -len(unit)]) * scale
            except ValueError:
                break
    raise ValueError(f"cannot read the rate {rate!r}; use e.g. 100mbit or 1gbit")
