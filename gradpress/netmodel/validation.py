"""Predicted against measured: the slow-network benchmark's step times beside the model's.
"""

from __future__ import annotations

import math
from typing import Any

from gradpress.netmodel.calibration import CompressorProfile
from gradpress.netmodel.collectives import GBIT, TCP_EFFICIENCY, Network, _comm_s, parse_rate


# -- validation against measurements ------------------------------------------------------
def validate(measured: list[dict[str, Any]], *, latency_s: float = 1e-4,
             efficiency: float = TCP_EFFICIENCY,
             profiles: dict[str, CompressorProfile] | None = None,
             tolerance: float = 0.25) -> list[dict[str, Any]]:
    """Predicted vs measured step time for each record of the slow-network benchmark.

    Each record needs ``compressor``, ``nproc``, ``bandwidth_bps``, ``step_time_s`` and
    ``bytes_per_step`` (the bytes one rank puts into the collective per step: its padded
    payloads, or its fp32 gradient for plain all-reduce). The local (non-network) part of a
    step comes from either

    * ``compute_s`` (forward+backward+step) plus ``encode_s``/``decode_s`` (per step; or
      ``numel`` with a matching entry in ``profiles``, then ``p`` decodes are charged), or
    * ``reference_step_time_s`` measured for the same method over a fast link of
      ``reference_bandwidth_bps``: local = reference - predicted communication at that
      bandwidth. This calibrates everything the hook does on the CPU (codec, feedback,
      copies) under the same load, so only the network part is predicted.

    Optional: ``latency_s`` (per message), ``messages`` (collectives per step) and
    ``collective`` (``allreduce``, ``allgather`` or ``two_phase``; default all-reduce for
    fp32/plain DDP and PyTorch's own hooks, two-phase for labels holding ``[two_phase]``,
    all-gather otherwise). Returns one row per record with
    ``predicted_s``, ``measured_s``, ``rel_error`` and ``within`` (|error| <= tolerance).
    """
    rows = []
    for rec in measured:
        missing = [k for k in ("compressor", "nproc", "bandwidth_bps", "step_time_s",
                               "bytes_per_step") if k not in rec]
        if "compute_s" not in rec and "reference_step_time_s" not in rec:
            missing.append("compute_s (or reference_step_time_s)")
        if missing:
            raise ValueError(f"measured record lacks {', '.join(missing)}: {rec}")
        name, p = str(rec["compressor"]), int(rec["nproc"])
        lat = float(rec.get("latency_s", latency_s))
        msgs = int(rec.get("messages", 1))
        collective = rec.get("collective") or _default_collective(name)
        nbytes = float(rec["bytes_per_step"])
        comm = _comm_s(collective, nbytes, p, Network(float(rec["bandwidth_bps"]), lat,
                                                        efficiency), msgs)
        if "reference_step_time_s" in rec:
            ref_net = Network(float(rec["reference_bandwidth_bps"]), lat, efficiency)
            local = float(rec["reference_step_time_s"]) - _comm_s(collective, nbytes, p,
                                                                   ref_net, msgs)
            compute, codec = local, 0.0
        else:
            enc, dec = rec.get("encode_s"), rec.get("decode_s")
            prof = (profiles or {}).get(name)
            if prof is not None and "numel" in rec:
                enc = prof.encode_time(rec["numel"]) if enc is None else enc
                dec = p * prof.decode_time(rec["numel"]) if dec is None else dec
            compute, codec = float(rec["compute_s"]), float(enc or 0.0) + float(dec or 0.0)
        pred = compute + codec + comm
        meas = float(rec["step_time_s"])
        err = pred / meas - 1.0 if meas > 0 else math.inf
        rows.append({"compressor": name, "nproc": p, "bandwidth_bps": float(rec["bandwidth_bps"]),
                     "collective": collective, "bytes_per_step": nbytes, "compute_s": compute,
                     "codec_s": codec, "comm_s": comm, "predicted_s": pred, "measured_s": meas,
                     "rel_error": err, "within": abs(err) <= tolerance})
    return rows


def _default_collective(name: str) -> str:
    low = name.lower()
    if "[two_phase]" in low:
        return "two_phase"
    if low in ("fp32", "none", "ddp", "allreduce", "plain") or low.startswith("torch-"):
        return "allreduce"
    return "allgather"


def records_from_slow_network(result: dict[str, Any], *,
                              reference: dict[str, Any] | None = None,
                              compute_s: float | None = None, nproc: int | None = None
                              ) -> list[dict[str, Any]]:
    """Validation records from ``benchmarks/slow_network.py``'s JSON (``rate``, ``rows``).

    Per method: ``step_time_s`` = its ``step_s``, ``bytes_per_step`` = ``wire_bytes /
    steps`` (training stops at the target, so both count the same steps; for two-phase,
    ``wire_bytes`` is what the rank sent, about one payload C a step); ``nproc`` is the
    result's ``ranks`` (2 for runs of the 2-rank benchmark). The local part
    comes from ``reference`` (the same benchmark run at a fast rate, matched by label) or,
    failing that, from ``compute_s``. Failed methods and ones absent from ``reference`` are
    left out when no ``compute_s`` is given.
    """
    bw = parse_rate(result["rate"])
    nproc = int(result.get("ranks", 2)) if nproc is None else nproc
    ref_rows = {r["label"]: r for r in (reference or {}).get("rows", []) if not r.get("failed")}
    out = []
    for row in result["rows"]:
        if row.get("failed") or not row.get("steps") or not row.get("wire_bytes"):
            continue  # failed, or sent nothing (the compute-only floor): nothing to predict
        rec: dict[str, Any] = {"compressor": row["label"], "nproc": nproc,
                               "bandwidth_bps": bw, "step_time_s": float(row["step_s"]),
                               "bytes_per_step": row["wire_bytes"] / row["steps"]}
        ref = ref_rows.get(row["label"])
        if ref is not None and ref.get("steps"):
            rec["reference_step_time_s"] = float(ref["step_s"])
            rec["reference_bandwidth_bps"] = parse_rate(reference["rate"])  # type: ignore[index]
        elif compute_s is not None:
            rec["compute_s"] = compute_s
        else:
            continue
        out.append(rec)
    return out


def validation_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`validate` as a Markdown pipe table."""
    lines = ["| compressor | ranks | link | bytes/step | predicted s | measured s | error |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['compressor']} | {r['nproc']} | {_fmt_bw(r['bandwidth_bps'])} | "
                     f"{r['bytes_per_step']:,.0f} | {r['predicted_s']:.4f} | "
                     f"{r['measured_s']:.4f} | {100 * r['rel_error']:+.1f}% |")
    return "\n".join(lines)


def _fmt_bw(bps: float) -> str:
    return f"{bps / GBIT:g} Gbit/s" if bps >= GBIT else f"{bps / 1e6:g} Mbit/s"
