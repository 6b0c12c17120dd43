"""Matplotlib (Agg) figures for the simulator's experiments. No bits here: every axis of
bits plots the measured ``8 * len(payload.to_bytes())`` per worker, summed over steps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(label: str, colors: dict[str, Any]) -> dict[str, Any]:
    """Full precision in black; a method and its error-compensated twin (``QSGD s=4`` and
    ``ECQ-SGD s=4``, ``topk`` and ``topk+ef``) share a colour: dashed without feedback,
    solid with ECQ/EF, dash-dot with EF21."""
    if label.startswith("32Bit") or label == "fp32":
        return {"color": "black", "lw": 2.0}
    fed = label.startswith("ECQ") or "+" in label
    key = label.split("+")[0].replace("ECQ-SGD", "").replace("QSGD", "").strip() or label
    if key not in colors:
        colors[key] = f"C{len(colors) % 10}"
    return {"ls": "-." if label.endswith("ef21") else "-" if fed else "--",
            "color": colors[key]}


def linear_figure(ds: dict[str, Any], path: Path) -> None:
    """Loss and distance to the optimum vs iterations (the paper's Fig. 2), and loss vs
    bits sent per worker."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12.5, 3.9))
    colors: dict[str, Any] = {}
    for c in ds["curves"]:
        kw = _style(c["label"], colors)
        lab = c["label"] + (" (diverged)" if c["diverged"] else "")
        axes[0].plot(c["iters"], c["loss"], label=lab, **kw)
        if c["dist"] is not None:
            axes[1].plot(c["iters"], c["dist"], **kw)
        axes[2].plot(np.maximum(c["bits_per_worker"], 1.0), c["loss"], **kw)
    f_star = ds["f_star"]  # None where the exact optimum was not solved (Syn-20K)
    floor = f_star if f_star is not None else min(min(c["loss"]) for c in ds["curves"])
    for ax in (axes[0], axes[2]):
        if f_star is not None:
            ax.axhline(f_star, color="grey", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_ylabel("loss f(w)" + ("  (dotted: f*)" if f_star is not None else ""))
        hi = max(c["loss"][0] for c in ds["curves"]) * 1.5
        ax.set_ylim(floor * 0.98, hi)
    if f_star is not None:
        axes[1].set_yscale("log")
    else:
        axes[1].text(0.5, 0.5, "exact optimum not solved\nat this size", ha="center",
                     va="center", transform=axes[1].transAxes)
    axes[1].set_ylabel("||w - w*||")
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("iteration")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("bits sent per worker (measured payloads)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{ds['name']}: distributed least squares, ECQ-SGD vs QSGD vs 1-bit SGD")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heatmap_figure(res: dict[str, Any], path: Path) -> None:
    """Final loss over the (alpha, beta) grid; colour log10(final loss - f*)."""
    plt = _plt()
    loss = np.array([[math.inf if v is None else v for v in row] for row in res["final_loss"]])
    f_star = res["f_star"]
    excess = np.log10(np.maximum(loss - f_star, 1e-12))
    fin = np.isfinite(excess)
    shown = np.where(fin, excess, np.nan)
    fig, ax = plt.subplots(figsize=(1.2 * len(res["betas"]) + 3, 0.8 * len(res["alphas"]) + 2))
    vmin = np.nanmin(shown) if fin.any() else 0.0
    vmax = np.nanmax(shown) if fin.any() else 1.0
    if 0.0 in res["alphas"] and np.isfinite(shown[res["alphas"].index(0.0)]).any():
        # Colour up to 10x the excess loss of QSGD (alpha = 0); worse cells saturate.
        vmax = min(vmax, np.nanmax(shown[res["alphas"].index(0.0)]) + 1.0)
    vmax = max(vmax, vmin + 1e-3)
    im = ax.imshow(np.minimum(shown, vmax), cmap="viridis_r", vmin=vmin, vmax=vmax,
                   aspect="auto")
    for i in range(loss.shape[0]):
        for j in range(loss.shape[1]):
            txt = f"{loss[i, j]:.4f}" if fin[i, j] else "div."
            ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                    color="white" if fin[i, j] and shown[i, j] > (vmin + vmax) / 2 else "black")
    ax.set_facecolor("lightgrey")
    ax.set_xticks(range(len(res["betas"])), [f"{b:g}" for b in res["betas"]])
    ax.set_yticks(range(len(res["alphas"])), [f"{a:g}" for a in res["alphas"]])
    ax.set_xlabel("beta (time-decaying factor)")
    ax.set_ylabel("alpha (compensation coefficient)")
    fig.colorbar(im, label="log10(final loss - f*)  (grey: diverged)")
    s = res["settings"]
    ax.set_title(f"ECQ-SGD final loss, syn-{s['d']}, {s['compressor']} {s['compressor_kw']}\n"
                 f"full precision: {res['full_precision_final_loss']:.4f}, f* = {f_star:.4f}; "
                 "row alpha=0 is QSGD", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def real_figure(ds: dict[str, Any], path: Path) -> None:
    """Suboptimality ``f - f*`` against bits per worker and against iterations."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    f_star = ds["f_star"]
    colors: dict[str, Any] = {}
    for c in ds["curves"]:
        kw = _style(c["label"], colors)
        gap = np.maximum(np.asarray(c["loss"]) - f_star, 1e-16)
        lab = c["label"] + (" (diverged)" if c["diverged"] else "")
        axes[0].plot(np.maximum(c["bits_per_worker"], 1.0), gap, label=lab, **kw)
        axes[1].plot(c["iters"], gap, **kw)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("bits sent per worker (measured payloads)")
    axes[1].set_xlabel("iteration")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_ylabel("f(w) - f*")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{ds['name']} ({ds['kind']}, n={ds['n']}, d={ds['d']}): distributed "
                 "compressed gradient descent")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def poster_figure(ds: dict[str, Any], path: Path, target: float) -> None:
    """The poster's plot: relative error ``||x_t - x*||^2 / ||x_0 - x*||^2`` against
    message bytes (left) and whole-payload bytes (right); top-k: the best ``k`` only."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    best = ds.get("best_topk")
    colors: dict[str, Any] = {}
    for c in ds["curves"]:
        if c["role"] == "topk" and c["label"] != best:
            continue
        kw = _style(c["label"], colors)
        err = np.maximum(np.asarray([e if e is not None else np.nan for e in c["rel_error"]]),
                         1e-16)
        for ax, key in zip(axes, ("message_bytes", "payload_bytes")):
            ax.plot(c[key], err, label=c["label"], **kw)
    for ax, what in zip(axes, ("message bytes (body: norm/scale + code)",
                               "payload bytes (header included)")):
        ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel(what + " per worker")
        ax.set_ylabel("||x_t - x*||^2 / ||x_0 - x*||^2")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{ds['name']} ({ds['kind']}, n={ds['n']}, d={ds['d']}): compressed GD")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
