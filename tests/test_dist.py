"""Real 2-rank gloo process groups: the DDP hook, the byte gather, and failures that must
fail fast. Every group starts from a FileStore in a fresh temp dir (no ports to collide),
with a short process-group timeout, and the parent kills children past a hard deadline."""

from __future__ import annotations

import time

import pytest
import torch
from dist_harness import digest, run_ranks, small_model

import gradpress
from gradpress.ddp import CompressionState, payload_bound
from gradpress.payload import header_size

WORLD = 2
PG_TIMEOUT_S = 30  # a rank may compile numba kernels cold while its peer waits
HARD_DEADLINE_S = 120  # a hang guard (see dist_harness), not a time budget


def _run_ranks(target, *args, deadline: float = HARD_DEADLINE_S) -> list[dict]:
    """Run ``target(rank, *args) -> dict`` on 2 spawned ranks; return the dicts in rank order
    (children still alive at ``deadline`` are killed and the test fails, never hangs)."""
    results, _ = run_ranks(target, WORLD, *args, deadline=deadline, pg_timeout=PG_TIMEOUT_S)
    return [results[r] for r in range(WORLD)]


# --- what the ranks run --------------------------------------------------------------------

def _train(rank: int, configs: list[dict], steps: int = 4) -> dict:
    """Train one small DDP model per config (several buckets); report digests and bytes."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradpress.ddp import compression_hook

    out = {}
    for cfg in configs:
        model = DDP(small_model(), bucket_cap_mb=0.0004)  # 100 floats a bucket: one per layer
        fb = gradpress.feedback.get(cfg.get("feedback", "none"))
        state = CompressionState(None, compressor=cfg["compressor"], feedback=fb,
                                 compressor_kwargs=cfg.get("kwargs"),
                                 bounded=cfg.get("bounded", "auto"), seed=7)
        model.register_comm_hook(state, compression_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(100 + rank)
        steps_bytes = []
        for _ in range(steps):
            x = torch.randn(16, 20, generator=gen)
            y = torch.randint(0, 5, (16,), generator=gen)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            s = state.last_step
            steps_bytes.append({"payload": s.payload_bytes, "wire": s.wire_bytes,
                                "gathered": s.gathered_payload_bytes, "buckets": s.buckets,
                                "lengths": dict(s.payload_lengths)})
        out[cfg["label"]] = {
            "digest": digest(model.module), "steps": steps_bytes,
            "bucket_numel": dict(state.bucket_numel), "iter": state.iter,
            "total_payload": state.total_payload_bytes, "fb_keys": fb.keys(),
        }
    return out


CONFIGS = [
    {"label": "ecq2+ecqfb", "compressor": "ecq", "kwargs": {"bits": 2}, "feedback": "ecq"},
    {"label": "qsgd-unbounded", "compressor": "qsgd", "kwargs": {"s": 1}, "bounded": False},
    {"label": "fp32", "compressor": "fp32"},
    {"label": "fp16-allreduce", "compressor": "fp16"},
]


@pytest.fixture(scope="module")
def trained() -> list[dict]:
    res = _run_ranks(_train, CONFIGS)
    for r in res:
        assert "error" not in r, r.get("trace")
    return res


@pytest.mark.parametrize("label", [c["label"] for c in CONFIGS])
def test_hook_keeps_ranks_bit_identical_over_several_buckets(trained, label):
    r0, r1 = trained[0][label], trained[1][label]
    assert r0["steps"][-1]["buckets"] >= 3, "the model must span several buckets"
    assert r0["digest"] == r1["digest"]
    assert r0["iter"] == 4


def test_training_moves_the_parameters(trained):
    # A hook that returned the input untouched on one rank would also be "identical" only
    # by accident; different configs must reach different parameters.
    digests = {trained[0][c["label"]]["digest"] for c in CONFIGS}
    assert len(digests) == len(CONFIGS)


def test_fp32_bytes_counted_equal_payload_sizes(trained):
    r0 = trained[0]["fp32"]
    numels = r0["bucket_numel"]
    expect = sum(header_size(1) + 4 * n for n in numels.values())
    last = r0["steps"][-1]
    assert last["payload"] == expect
    assert last["wire"] == expect + 4 * len(numels)  # the 4-byte length per frame
    assert last["gathered"] == WORLD * expect


def test_ecq_bytes_counted_equal_payload_sizes(trained):
    comp = gradpress.get("ecq", bits=2)
    for rank in range(WORLD):
        last = trained[rank]["ecq2+ecqfb"]["steps"][-1]
        numels = trained[rank]["ecq2+ecqfb"]["bucket_numel"]
        # ecq sends the smallest of its codes: every payload within the dense code's bound
        lengths = {str(i): n for i, n in last["lengths"].items()}
        assert lengths.keys() == {str(i) for i in numels}
        assert all(0 < lengths[str(i)] <= payload_bound(comp, n) for i, n in numels.items())
        assert last["payload"] == sum(last["lengths"].values())


def test_unbounded_gather_counts_real_lengths(trained):
    a, b = (trained[r]["qsgd-unbounded"]["steps"][-1] for r in range(WORLD))
    assert a["payload"] == sum(a["lengths"].values())
    assert a["gathered"] == b["gathered"] == a["payload"] + b["payload"]
    # qsgd s=1 picks its sparse code here, well under the dense bound
    comp = gradpress.get("qsgd", s=1)
    numels = trained[0]["qsgd-unbounded"]["bucket_numel"]
    assert a["payload"] < sum(payload_bound(comp, n) for n in numels.values())


def test_fp16_fast_path_counts_two_bytes_per_coordinate(trained):
    r0 = trained[0]["fp16-allreduce"]
    numel = sum(p.numel() for p in small_model().parameters())
    assert r0["steps"][-1]["payload"] == r0["steps"][-1]["wire"] == 2 * numel


def test_feedback_state_is_keyed_by_bucket(trained):
    r0 = trained[0]["ecq2+ecqfb"]
    assert sorted(r0["fb_keys"]) == sorted(str(k) for k in r0["bucket_numel"])


# --- failures ------------------------------------------------------------------------------

def _crash_or_train(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradpress.ddp import compression_hook

    model = DDP(small_model(), bucket_cap_mb=0.0004)
    state = CompressionState(None, compressor="ecq", compressor_kwargs={"bits": 2})
    model.register_comm_hook(state, compression_hook)
    try:
        for step in range(5):
            if rank == 1 and step == 2:
                raise ValueError("rank 1 fails in its training loop")
            model(torch.randn(8, 20)).sum().backward()
    except Exception as e:  # CLOCK_MONOTONIC is one clock for every process on the host
        return {"caught": f"{type(e).__name__}: {e}", "at": time.monotonic()}
    return {"caught": None}


def test_a_rank_that_raises_makes_the_other_fail_within_the_timeout():
    survivor, failed = _run_ranks(_crash_or_train)
    assert failed["caught"].startswith("ValueError: rank 1 fails")
    assert survivor["caught"] is not None, "the survivor trained on as if nothing happened"
    assert "PeerError" in survivor["caught"] and "peer" in survivor["caught"]
    # after the failure, and within two timeouts of it (not counting start-up and JIT time)
    assert 0 <= survivor["at"] - failed["at"] < 2 * PG_TIMEOUT_S, (survivor, failed)


def _nan_on_rank1(rank: int, mode: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradpress.ddp import compression_hook

    model = DDP(small_model(), bucket_cap_mb=0.0004)
    state = CompressionState(None, compressor="ecq", compressor_kwargs={"bits": 2},
                             feedback=gradpress.ErrorFeedback(), on_nonfinite=mode)
    model.register_comm_hook(state, compression_hook)
    caught = None
    for step in range(3):
        x = torch.randn(8, 20)
        if rank == 1 and step == 1:
            x[0, 0] = float("nan")
        try:
            model.zero_grad()
            model(x).sum().backward()
        except Exception as e:
            caught = f"{type(e).__name__}: {e}"
            break
    return {"caught": caught, "digest": digest(model.module),
            "skipped": [s.skipped for s in state.history]}


def _fp16_overflow_on_rank1(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradpress.ddp import compression_hook

    model = DDP(small_model(), bucket_cap_mb=0.0004)
    state = CompressionState(None, compressor="fp16", allreduce_fast_path=False)
    model.register_comm_hook(state, compression_hook)
    x = torch.randn(8, 20) * (1e7 if rank == 1 else 1.0)  # rank 1's gradient exceeds fp16
    try:
        model(x).sum().backward()
    except Exception as e:
        return {"caught": f"{type(e).__name__}: {e}", "at": time.monotonic()}
    return {"caught": None}


def _nan_both_modes(rank: int) -> dict:
    out = {mode: _nan_on_rank1(rank, mode) for mode in ("raise", "skip")}
    out["encode_error"] = _fp16_overflow_on_rank1(rank)
    return out


@pytest.fixture(scope="module")
def nan_runs() -> list[dict]:
    return _run_ranks(_nan_both_modes)


def test_nan_on_one_rank_raises_on_every_rank_instead_of_hanging(nan_runs):
    for r in nan_runs:
        assert "error" not in r, r.get("trace")
        assert r["raise"]["caught"] and "rank(s) [1]" in r["raise"]["caught"], r
        assert "NonFiniteGradientError" in r["raise"]["caught"]


def test_nan_on_one_rank_is_skipped_consistently(nan_runs):
    a, b = (r["skip"] for r in nan_runs)
    assert a["caught"] is None and b["caught"] is None, (a, b)
    assert a["digest"] == b["digest"]
    assert a["skipped"][1] > 0 and a["skipped"][0] == 0


def test_a_rank_whose_encoder_raises_fails_every_rank_at_once(nan_runs):
    mine, peer = nan_runs[1]["encode_error"], nan_runs[0]["encode_error"]
    assert mine["caught"] and "float16 range" in mine["caught"], mine
    assert peer["caught"] and "PeerError" in peer["caught"] and "[1]" in peer["caught"], peer
    # at once: the status exchange, long before a timeout could have fired
    assert abs(peer["at"] - mine["at"]) < PG_TIMEOUT_S / 2, (peer, mine)


def _gather_bytes(rank: int) -> dict:
    from gradpress.collectives import allgather_bytes

    mine = bytes([rank + 1]) * (3 + 5 * rank)
    out = {"bounded": allgather_bytes(mine, capacity=16),
           "unbounded": allgather_bytes(mine),
           "empty": allgather_bytes(b"" if rank == 0 else b"x"), "caught": None}
    try:  # rank 1 overflows the agreed capacity: every rank must raise, none may hang
        allgather_bytes(b"y" * (4 if rank == 0 else 40), capacity=16)
    except Exception as e:
        out["caught"] = f"{type(e).__name__}: {e}"
    return out


@pytest.fixture(scope="module")
def gathered() -> list[dict]:
    return _run_ranks(_gather_bytes)


def test_allgather_bytes_returns_every_rank_payload_in_rank_order(gathered):
    want = [b"\x01" * 3, b"\x02" * 8]
    for r in gathered:
        assert "error" not in r, r.get("trace")
        assert r["bounded"] == want and r["unbounded"] == want
        assert r["empty"] == [b"", b"x"]


def test_payload_over_capacity_fails_on_every_rank(gathered):
    for r in gathered:
        assert r["caught"] and "PeerError" in r["caught"] and "[1]" in r["caught"]


def test_state_dict_round_trip_restores_feedback_exactly():
    fb = gradpress.ECQFeedback(alpha=0.5, beta=0.9)
    st = CompressionState(None, compressor="ecq", compressor_kwargs={"bits": 3}, feedback=fb)
    fb.commit("0", torch.ones(5), torch.zeros(5))
    st.iter, st.bucket_numel = 12, {0: 5}
    sd = st.state_dict()
    other = CompressionState(None, compressor="ecq", compressor_kwargs={"bits": 3},
                             feedback=gradpress.ECQFeedback(alpha=0.5, beta=0.9))
    other.load_state_dict(sd)
    assert other.iter == 12 and other.bucket_numel == {0: 5}
    assert torch.equal(other.feedback.state("0")["h"], torch.ones(5))
    wrong = CompressionState(None, compressor="ecq", compressor_kwargs={"bits": 2})
    with pytest.raises(ValueError, match="compressor"):
        wrong.load_state_dict(sd)


def test_bad_state_arguments_raise_value_error():
    with pytest.raises(ValueError):
        CompressionState(None, compressor="ecq", on_nonfinite="ignore")
    with pytest.raises(ValueError):
        CompressionState(None, compressor="no-such-compressor")
    with pytest.raises(TypeError):
        CompressionState(None, compressor="fp32", feedback="ecq")


@pytest.mark.parametrize("name", gradpress.available())
def test_payload_bound_holds_for_every_registered_compressor(name):
    comp = gradpress.get(name)
    gen = torch.Generator().manual_seed(5)
    for d in (1, 3, 64, 515, 2049):
        bound = payload_bound(comp, d)
        if bound is None:
            continue
        for x in (torch.randn(d, generator=gen), torch.zeros(d), torch.arange(d) - d / 3.0,
                  torch.randn(d, generator=gen) * (torch.rand(d, generator=gen) < 0.05),
                  torch.randn(d, generator=gen) ** 3):
            assert len(comp.encode(x, seed=d).to_bytes()) <= bound, (name, d)


def test_bits_map_to_compressor_kwargs():
    from gradpress.train.worker import compressor_kwargs

    assert compressor_kwargs("ecq", 2, "") == {"s": 1, "norm": "linf", "bucket_size": 512,
                                               "entropy": "huffman"}
    assert compressor_kwargs("ecq", 4, "norm='l2';bucket_size=None;entropy='best'") == {
        "s": 7, "norm": "l2", "bucket_size": None, "entropy": "best"}
    assert compressor_kwargs("qsgd", 3, "bucket_size=128") == {"s": 3, "bucket_size": 128}
    assert compressor_kwargs("topk", None, "ratio=0.01") == {"ratio": 0.01}
    with pytest.raises(SystemExit):
        compressor_kwargs("sign", 2, "")


def test_gradpress_train_runs_two_ranks_and_writes_json(tmp_path):
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "gradpress", "train", "--nproc", "2", "--task",
           "breast_cancer", "--compressor", "ecq", "--bits", "3", "--max-steps", "6",
           "--eval-every", "3", "--no-plot", "--out", str(tmp_path)]
    # torchrun starts three interpreters: 28 s flaked on busy cores.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads((tmp_path / "train.json").read_text())["runs"]["breast_cancer"]
    assert run["steps"] == 6 and len(run["records"]) == 2
    assert run["payload_bytes"] > 0 and run["wire_bytes"] >= run["payload_bytes"]
