"""Spawned gloo ranks for the distributed tests: each group starts from a FileStore in a
fresh temp dir (no ports to collide), with a short process-group timeout, and the parent
kills children past a hard deadline, so no test can hang CI."""

from __future__ import annotations

import datetime as dt
import hashlib
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback

import pytest
import torch

PG_TIMEOUT_S = 5
#: A hang guard, not a performance budget: spawning 3-4 ranks that import torch and compile
#: numba kernels on a cold cache of a busy 2-core machine took 28 s once.
HARD_DEADLINE_S = 120


_WARM = False


def warm_serial_kernels() -> None:
    """Compile (or load from numba's on-disk cache) every compressor's *serial* kernel builds
    once in this process before the first ranks are spawned. The ranks run one torch thread,
    so they use the serial builds, which the 2-thread test process never touches; on a fresh
    clone the first 3-4 spawned ranks would otherwise all compile the same kernels at once,
    on 2 cores, while their peers wait inside a collective."""
    global _WARM
    if _WARM:
        return
    _WARM = True
    import gradpress

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(3000, generator=torch.Generator().manual_seed(0))
        for name in gradpress.available():
            try:
                comp = gradpress.get(name)
                comp.decode(comp.encode(x, seed=1))
                buf = torch.zeros(comp.max_payload_bytes(x.numel()) + 4, dtype=torch.uint8)
                comp.decode_into(torch.empty_like(x), comp.encode_into(buf, x, seed=1))
            except Exception:  # noqa: BLE001 - a warm-up only; the tests report real errors
                continue
        _warm_fused(x)
    finally:
        torch.set_num_threads(threads)


def _warm_fused(x: torch.Tensor) -> None:
    """The hook's fused feedback passes (serial builds), for the codes that have them."""
    import gradpress
    from gradpress.feedback.fused import encode_with_feedback

    for name, kw in (("ecq", {"entropy": False, "sparse": False}), ("sign", {}),
                     ("qsgd", {"sparse": False}), ("terngrad", {})):
        for fb in ("ecq", "ef", "none"):
            try:
                comp, state = gradpress.get(name, **kw), gradpress.feedback.get(fb)
                buf = torch.zeros(comp.max_payload_bytes(x.numel()) + 4, dtype=torch.uint8)
                for _ in range(2):  # the second step has a residual
                    view = encode_with_feedback(comp, state, "0", x, buf, seed=1)
                    if view is not None:
                        comp.decode_into(torch.empty_like(x), view, add=True)
            except Exception:  # noqa: BLE001 - a warm-up only
                continue


def run_ranks(target, world: int, *args, expect: list[int] | None = None,
              deadline: float = HARD_DEADLINE_S, pg_timeout: float = PG_TIMEOUT_S,
              ) -> tuple[dict[int, dict], dict[int, int]]:
    """Run ``target(rank, *args) -> dict`` on ``world`` spawned gloo ranks.

    Returns ``(results by rank, exit codes by rank)``. Waits only for the ranks in
    ``expect`` (default: all) to report; any child still alive after that, or at
    ``deadline``, is killed (so a hang fails the test instead of blocking it)."""
    expect = list(range(world)) if expect is None else expect
    warm_serial_kernels()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_child, args=(q, r, world, store, pg_timeout, target, args))
                 for r in range(world)]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline
        try:
            while not set(expect) <= set(results) and time.monotonic() < end:
                try:
                    rank, res = q.get(timeout=max(0.1, min(1.0, end - time.monotonic())))
                    results[rank] = res
                except queue.Empty:
                    if all(not p.is_alive() for p in procs) and q.empty():
                        break
        finally:
            for p in procs:
                p.join(timeout=max(0.1, min(1.0, end - time.monotonic())))
                if p.is_alive():
                    p.kill()
                    p.join()
        codes = {r: p.exitcode for r, p in enumerate(procs)}
    missing = sorted(set(expect) - set(results))
    if missing:
        pytest.fail(f"ranks {missing} reported nothing within {deadline} s (hung or "
                    f"crashed); got {results}, exit codes {codes}")
    return results, codes


def _child(q, rank, world, store, pg_timeout, target, args):
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world, timeout=dt.timedelta(seconds=pg_timeout))
        res = target(rank, *args)
    except BaseException as e:  # report, never hang the parent
        res = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    q.put((rank, res))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def small_model() -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(20, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32),
                               torch.nn.ReLU(), torch.nn.Linear(32, 5))


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()
