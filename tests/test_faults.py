"""Faults in the DDP hook on real gloo process groups: dead and stalled peers, frames
corrupted in transit (CRC), non-finite gradients skipped on every rank, and edge shapes and
dtypes through the buckets.

Every group starts from a FileStore in a fresh temp dir, with a short process-group
timeout; the parent kills children past a hard deadline, so no test can hang CI.

Edge cases through the hook (what holds, and what does not apply):

* 0-d, 1-element, empty and non-contiguous parameters: DDP copies each gradient into its
  flat 1-D bucket (an empty parameter adds nothing to it), so the hook only ever sees
  contiguous 1-D buckets; these train and match DDP's own all-reduce bit for bit with the
  lossless ``fp32`` code.
* fp16/bf16 parameters: the buckets are fp16/bf16, the compressors encode them, and the
  mean is taken in float32 and rounded back; this works on gloo because the hook moves
  uint8 frames, whatever the gradient dtype.
* 10^8-element tensors are measured in ``benchmarks/large_tensor.py``, not here.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from dist_harness import PG_TIMEOUT_S, digest, run_ranks, small_model

import gradpress
from gradpress.ddp import CompressionState


def _ddp(model: torch.nn.Module, state: CompressionState | None):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradpress.ddp import compression_hook

    ddp = DDP(model, bucket_cap_mb=0.0004)  # ~100 floats a bucket: several buckets
    if state is not None:
        ddp.register_comm_hook(state, compression_hook)
    return ddp


# --- 1. dead and stalled peers (3 ranks) --------------------------------------------------

FAULT_STEP = 2
#: The stalled peer sleeps 4 timeouts; survivors must fail while it still sleeps, with a
#: whole timeout of margin: an order, not a wall-clock budget of a cold, busy machine.
STALL_S = 4 * PG_TIMEOUT_S


def _train_with_fault(rank: int, fault: str, collective: str) -> dict:
    model = _ddp(small_model(), CompressionState(None, compressor="ecq",
                                            compressor_kwargs={"bits": 2},
                                            feedback=gradpress.ECQFeedback(),
                                            collective=collective))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    t_fault = None
    try:
        for step in range(6):
            if step == FAULT_STEP:
                t_fault = time.monotonic()
                if rank == 2 and fault == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if rank == 2 and fault == "stall":
                    time.sleep(STALL_S)  # far past the others' timeout
            opt.zero_grad()
            model(torch.randn(8, 20)).pow(2).mean().backward()
            opt.step()
    except Exception as e:  # noqa: BLE001 - what the survivors see is the result
        return {"caught": f"{type(e).__name__}: {e}", "step": step,
                "after_s": time.monotonic() - (t_fault or time.monotonic())}
    return {"caught": None}


@pytest.mark.parametrize("collective", ["allgather", "two_phase"])
@pytest.mark.parametrize("fault", ["kill", "stall"])
def test_dead_or_stalled_peer_fails_the_others_within_the_timeout(fault, collective):
    # two_phase: the survivors wait in the all-to-all of the step's first bucket
    res, codes = run_ranks(_train_with_fault, 3, fault, collective, expect=[0, 1])
    for r in (0, 1):
        got = res[r]
        assert "error" not in got, got.get("trace")
        assert got["caught"] is not None, f"rank {r} trained on past a {fault}ed peer"
        assert got["step"] == FAULT_STEP, got
        # a clear error: the hook's PeerError (wrapping gloo's), naming the cause
        assert "PeerError" in got["caught"] and "peer" in got["caught"], got["caught"]
        assert got["after_s"] < STALL_S - PG_TIMEOUT_S, got  # while the stalled peer sleeps
    if fault == "kill":
        assert codes[2] == -signal.SIGKILL
    # No wall-clock bound on the whole test (spawning 3 torch processes on a cold cache took
    # 28 s once): run_ranks' deadline is the hang guard.


# --- 2-rank group: skip, edge shapes, CRC ------------------------------------------------

def _snapshot(model, opt, state) -> dict:
    return {"params": [p.detach().clone() for p in model.parameters()],
            "opt": {k: v["momentum_buffer"].clone() for k, v in opt.state.items()},
            "fb": state.feedback.state_dict()["state"]}


def _same(a: dict, b: dict) -> bool:
    return (all(torch.equal(x, y) for x, y in zip(a["params"], b["params"], strict=True))
            and a["opt"].keys() == b["opt"].keys()
            and all(torch.equal(a["opt"][k], b["opt"][k]) for k in a["opt"])
            and a["fb"].keys() == b["fb"].keys()
            and all(torch.equal(a["fb"][k][n], b["fb"][k][n])
                    for k in a["fb"] for n in a["fb"][k]))


def _skip_run(rank: int) -> dict:
    """The documented loop: skip optimizer.step() when state.last_step.skipped. Step 2: NaN
    input on rank 1 (every bucket non-finite); step 4: Inf in the first layer's gradient
    only (the last bucket), after the other buckets already committed their feedback."""
    inner = small_model()
    state = CompressionState(None, compressor="ecq", compressor_kwargs={"bits": 2},
                             feedback=gradpress.ECQFeedback(alpha=0.5, beta=0.9),
                             on_nonfinite="skip")
    model = _ddp(inner, state)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    inf_once = {"armed": False}

    def poison(g):
        if inf_once["armed"]:
            inf_once["armed"] = False
            return g * float("inf")
        return g

    inner[0].weight.register_hook(poison)
    gen = torch.Generator().manual_seed(10 + rank)
    snaps, skipped = [], []
    for step in range(6):
        x = torch.randn(8, 20, generator=gen)
        if rank == 1 and step == 2:
            x[0, 0] = float("nan")
        if rank == 1 and step == 4:
            inf_once["armed"] = True
        snaps.append(_snapshot(inner, opt, state))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        skipped.append(state.last_step.skipped)
        if state.last_step.skipped:
            continue
        opt.step()
    snaps.append(_snapshot(inner, opt, state))
    return {"skipped": skipped, "buckets": state.last_step.buckets,
            "untouched": [_same(snaps[i], snaps[i + 1]) for i in range(6)],
            "digest": digest(inner), "fb_keys": state.feedback.keys()}


def _edge_model(dtype: torch.dtype) -> torch.nn.Module:
    class Edge(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(5)
            self.lin = torch.nn.Linear(6, 3)
            self.scalar = torch.nn.Parameter(torch.tensor(0.5))  # 0-d
            self.one = torch.nn.Parameter(torch.tensor([0.25]))  # 1 element
            self.empty = torch.nn.Parameter(torch.zeros(0))  # no elements
            self.nc = torch.nn.Parameter(torch.randn(3, 6).t())  # non-contiguous (6, 3)

        def forward(self, x):
            return (self.lin(x) + x @ self.nc) * self.scalar + self.one + self.empty.sum()

    m = Edge().to(dtype)
    assert not m.nc.is_contiguous()
    return m


def _edge_run(rank: int, dtype: torch.dtype, compressor: str | None) -> dict:
    inner = _edge_model(dtype)
    state = None if compressor is None else CompressionState(
        None, compressor=compressor, feedback=gradpress.ErrorFeedback(),
        allreduce_fast_path=False)
    model = _ddp(inner, state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(3 + rank)
    start = [p.detach().clone() for p in inner.parameters()]
    try:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 6, generator=gen).to(dtype)).float().pow(2).mean().backward()
            opt.step()
    except Exception as e:  # noqa: BLE001 - reported, the test decides
        return {"caught": f"{type(e).__name__}: {e}"}
    params = [p.detach().float() for p in inner.parameters()]
    return {"caught": None, "params": [p.numpy().tobytes() for p in params],  # no tensors
            "finite": all(bool(torch.isfinite(p).all()) for p in params),  # through queues
            "moved": [not torch.equal(p.detach(), s) for p, s in zip(inner.parameters(), start,
                                                                      strict=True)],
            "dtypes": sorted({str(p.dtype) for p in inner.parameters()})}


def _crc_run(rank: int, crc: bool) -> dict:
    """Rank 1's frame gets one byte flipped on receipt, on every rank, at step 1."""
    import gradpress.ddp.hook as hook

    real = hook.allgather_frame_async  # the bounded CPU path gathers reused frames
    calls = {"n": 0}

    def corrupting(frame, frames, group=None):
        fut, wire = real(frame, frames, group)
        calls["n"] += 1
        if calls["n"] != 5:  # step 2's first bucket (step 0: one bucket; then DDP rebuilds 3)
            return fut, wire

        def flip(f):
            entries = list(f.value())
            b = bytearray(entries[1])
            b[len(b) // 2] ^= 0x10
            entries[1] = bytes(b)
            return entries
        return fut.then(flip), wire

    hook.allgather_frame_async = corrupting
    try:
        inner = small_model()
        # the dense code: every flipped symbol bit is still a valid payload (an entropy or
        # sparse code would often reject the frame as malformed, CRC or not)
        state = CompressionState(None, compressor="ecq", crc=crc, compressor_kwargs={
            "bits": 2, "entropy": False, "sparse": False})
        model = _ddp(inner, state)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        buckets = None
        try:
            for _ in range(3):
                opt.zero_grad()
                model(torch.randn(8, 20)).pow(2).mean().backward()
                opt.step()
                buckets = buckets or state.last_step.buckets
        except Exception as e:  # noqa: BLE001
            return {"caught": f"{type(e).__name__}: {e}", "buckets": buckets}
        return {"caught": None, "digest": digest(inner), "buckets": buckets,
                "wire": state.last_step.wire_bytes, "payload": state.last_step.payload_bytes}
    finally:
        hook.allgather_frame_async = real


def _two_rank_cases(rank: int) -> dict:
    out = {"skip": _skip_run(rank)}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        # DDP's own all-reduce (None) only for float32: the reference of the lossless hook
        for comp in ((None, "fp32", "ecq") if dtype == torch.float32 else ("fp32", "ecq")):
            out[f"edge-{dtype}-{comp}"] = _edge_run(rank, dtype, comp)
    out["crc-off"] = _crc_run(rank, False)
    out["crc-on"] = _crc_run(rank, True)  # raises on every rank: run last
    return out


@pytest.fixture(scope="module")
def two_rank() -> dict[int, dict]:
    res, _ = run_ranks(_two_rank_cases, 2)
    for r in res.values():
        assert "error" not in r, r.get("trace")
    return res


def test_nan_on_one_rank_skips_the_step_on_every_rank(two_rank):
    a, b = two_rank[0]["skip"], two_rank[1]["skip"]
    assert a["skipped"] == b["skipped"]
    assert [bool(s) for s in a["skipped"]] == [False, False, True, False, True, False]
    assert a["skipped"][2] == a["buckets"]  # every bucket of the NaN step
    assert a["digest"] == b["digest"]


def test_skipped_step_leaves_params_optimizer_and_feedback_untouched(two_rank):
    for r in (0, 1):
        untouched = two_rank[r]["skip"]["untouched"]
        # steps 2 and 4 were skipped: nothing changed; the others did train (the check
        # can fail: momentum, weight decay and the ECQ residual all move on a real step)
        assert untouched == [False, False, True, False, True, False], (r, untouched)
        assert two_rank[r]["skip"]["fb_keys"], "feedback state was never written"


EDGE_DTYPES = ["torch.float32", "torch.float16", "torch.bfloat16"]


@pytest.mark.parametrize("dtype", EDGE_DTYPES)
def test_edge_shapes_train_through_the_hook(two_rank, dtype):
    for comp in ("fp32", "ecq"):
        a, b = two_rank[0][f"edge-{dtype}-{comp}"], two_rank[1][f"edge-{dtype}-{comp}"]
        assert a["caught"] is None and b["caught"] is None, (a, b)
        assert a["finite"] and a["dtypes"] == [dtype]
        assert a["params"] == b["params"]
        # every parameter with elements learned (the empty one has nothing to move)
        # order: scalar (0-d), one, empty, nc (non-contiguous), lin.weight, lin.bias
        assert a["moved"] == [True, True, False, True, True, True], a["moved"]


def test_lossless_hook_on_edge_shapes_equals_ddp_allreduce(two_rank):
    ref, ours = two_rank[0]["edge-torch.float32-None"], two_rank[0]["edge-torch.float32-fp32"]
    assert ref["caught"] is None, ref
    assert ref["params"] == ours["params"]


def test_crc_names_the_rank_whose_frame_was_corrupted(two_rank):
    for r in (0, 1):
        got = two_rank[r]["crc-on"]["caught"]
        assert got is not None, f"rank {r} trained on a corrupted frame"
        assert "PeerError" in got and "from rank 1" in got, got
    assert "CRC" in two_rank[0]["crc-on"]["caught"]


def test_without_crc_the_same_corruption_diverges_silently(two_rank):
    # why the option exists: the flipped byte decodes to other values on rank 0 only
    a, b = two_rank[0]["crc-off"], two_rank[1]["crc-off"]
    assert a["caught"] is None and b["caught"] is None, (a, b)
    assert a["digest"] != b["digest"]
