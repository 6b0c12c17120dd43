"""The two-phase compressed all-reduce on real gloo groups of 3 and 4 ranks: lossless equals
plain DDP, lossy keeps ranks bit-identical, bytes follow the formulas, faults fail fast."""

from __future__ import annotations

import pytest
import torch
from dist_harness import digest, run_ranks, small_model

import gradpress
from gradpress.collectives.two_phase import shard_bounds, shard_capacity
from gradpress.ddp import CompressionState, payload_bound

PG_TIMEOUT_S = 30  # a rank may compile numba kernels cold while its peer waits
STEPS = 4


def test_shard_bounds_cover_the_bucket_in_order():
    for d in (0, 1, 2, 5, 100, 1001):
        for world in (1, 2, 3, 4, 8):
            b = shard_bounds(d, world)
            assert len(b) == world and b[0][0] == 0 and b[-1][1] == d
            assert all(e0 == s1 for (_, e0), (s1, _) in zip(b, b[1:]))
            sizes = [e - s for s, e in b]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def _batches(rank: int, steps: int):
    gen = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen))
            for _ in range(steps)]


def _train(rank: int, cfg: dict, steps: int = STEPS) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradpress.ddp import compression_hook

    model = DDP(small_model(), bucket_cap_mb=0.0004)  # ~100 floats a bucket: one per layer
    state = None
    if cfg.get("compressor"):
        state = CompressionState(
            None, compressor=cfg["compressor"], compressor_kwargs=cfg.get("kwargs"),
            feedback=gradpress.feedback.get(cfg.get("feedback", "none")), seed=7,
            collective=cfg.get("collective", "two_phase"), bounded=cfg.get("bounded", "auto"),
            crc=cfg.get("crc", False))
        model.register_comm_hook(state, compression_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in _batches(rank, steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    out = {"digest": digest(model.module),
           "params": torch.cat([p.detach().reshape(-1) for p in model.module.parameters()]
                               ).tolist()}  # plain floats: tensors would share memory
    if state is not None:
        s = state.last_step
        out.update(sent=s.sent_bytes, received=s.received_bytes, payload=s.payload_bytes,
                   buckets=s.buckets, numel=dict(state.bucket_numel),
                   server_keys=state.server_feedback.keys(), iter=state.iter)
    return out


CONFIGS = {
    "ddp": {},
    "fp32": {"compressor": "fp32"},
    "fp32-unbounded": {"compressor": "fp32", "bounded": False},
    "ecq+ecq": {"compressor": "ecq", "kwargs": {"bits": 2}, "feedback": "ecq"},
    "sign+ef": {"compressor": "sign", "feedback": "ef"},
    "fp32-allgather": {"compressor": "fp32", "collective": "allgather"},
    "qsgd-auto": {"compressor": "qsgd", "kwargs": {"s": 2}, "collective": "auto"},
}


def _all_configs(rank: int) -> dict:
    return {label: _train(rank, cfg) for label, cfg in CONFIGS.items()}


@pytest.fixture(scope="module", params=[3, 4], ids=["3ranks", "4ranks"])
def runs(request) -> tuple[int, list[dict]]:
    world = request.param
    res, _ = run_ranks(_all_configs, world, deadline=180, pg_timeout=PG_TIMEOUT_S)
    out = [res[r] for r in range(world)]
    for r in out:
        assert "error" not in r, r.get("trace")
    return world, out


def test_lossless_two_phase_equals_plain_ddp(runs):
    world, res = runs
    ref = torch.tensor(res[0]["ddp"]["params"])
    for label in ("fp32", "fp32-unbounded", "fp32-allgather"):
        got = torch.tensor(res[0][label]["params"])
        rel = float((got - ref).abs().max() / ref.abs().max())
        assert rel < 1e-5, (label, rel)
        assert not torch.equal(got, small_model_params()), "training moved nothing"


def small_model_params() -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in small_model().parameters()])


@pytest.mark.parametrize("label", [k for k in CONFIGS if k != "ddp"])
def test_every_rank_ends_with_identical_parameters(runs, label):
    world, res = runs
    assert len({r[label]["digest"] for r in res}) == 1
    assert res[0][label]["buckets"] >= 3, "the model must span several buckets"


def test_lossy_two_phase_trains_differently_from_lossless(runs):
    _, res = runs
    assert res[0]["ecq+ecq"]["digest"] != res[0]["fp32"]["digest"]
    assert res[0]["sign+ef"]["digest"] != res[0]["fp32"]["digest"]


def test_auto_picks_two_phase_from_three_ranks(runs):
    world, res = runs
    # the owners' feedback state exists only on the two-phase path
    assert res[0]["qsgd-auto"]["server_keys"] == sorted(
        f"{i}/owner" for i in res[0]["qsgd-auto"]["numel"])


def test_owner_feedback_holds_one_shard_per_bucket(runs):
    world, res = runs
    for r in res:
        keys = r["ecq+ecq"]["server_keys"]
        assert sorted(keys) == sorted(f"{i}/owner" for i in r["ecq+ecq"]["numel"]), keys


def test_two_phase_bytes_follow_the_frame_formulas(runs):
    world, res = runs
    comp = gradpress.get("fp32")
    for r in res:
        got = r["fp32"]
        sent = received = 0
        for d in got["numel"].values():
            frame = 4 + shard_capacity(comp, d, world, crc=False)
            sent += (world - 1) * frame + frame  # all-to-all: one per peer; all-gather: own
            received += 2 * (world - 1) * frame  # all-to-all + all-gather, from each peer
        assert (got["sent"], got["received"]) == (sent, received)


def test_two_phase_moves_about_two_c_per_rank_whatever_p(runs):
    world, res = runs
    comp = gradpress.get("fp32")
    for r in res:
        c = sum(payload_bound(comp, d) for d in r["fp32"]["numel"].values())  # whole payloads
        want = 2 * c * (world - 1) / world
        assert abs(r["fp32-unbounded"]["received"] - want) / want < 0.25
        allgather = r["fp32-allgather"]
        frames = sum(4 + payload_bound(comp, d) for d in allgather["numel"].values())
        assert (allgather["sent"], allgather["received"]) == (frames, (world - 1) * frames)


def test_unbounded_two_phase_counts_real_lengths(runs):
    world, res = runs
    comp = gradpress.get("fp32")
    for rank, r in enumerate(res):
        got = r["fp32-unbounded"]
        sent = received = 0
        for d in got["numel"].values():
            sizes = [e - s for s, e in shard_bounds(d, world)]
            frame = [4 + payload_bound(comp, n) for n in sizes]
            sent += sum(8 + frame[j] for j in range(world) if j != rank)  # lengths + frames
            received += (world - 1) * (8 + frame[rank])
            sent += 8 + 4 + max(frame) - 4  # all-gather: lengths, then frames padded to the
            received += (world - 1) * (8 + max(frame))  # longest
        assert (got["sent"], got["received"]) == (sent, received)


# --- faults at 3 ranks -----------------------------------------------------------------------

def _nan_run(rank: int, mode: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradpress.ddp import compression_hook

    model = DDP(small_model(), bucket_cap_mb=0.0004)
    state = CompressionState(None, compressor="ecq", compressor_kwargs={"bits": 2},
                             feedback=gradpress.ECQFeedback(), on_nonfinite=mode,
                             collective="two_phase")
    model.register_comm_hook(state, compression_hook)
    caught, fb_before = None, None
    for step, (x, _) in enumerate(_batches(rank, 4)):  # step 2: after DDP's bucket rebuild
        if step == 2:
            fb_before = (state.feedback.state_dict()["state"],
                         state.server_feedback.state_dict()["state"])
            if rank == 1:
                x[0, 0] = float("nan")
        try:
            model.zero_grad()
            model(x).sum().backward()
        except Exception as e:  # noqa: BLE001 - what each rank sees is the result
            caught = f"{type(e).__name__}: {e}"
            break
        if step == 2:
            after = (state.feedback.state_dict()["state"],
                     state.server_feedback.state_dict()["state"])
            same = all(torch.equal(a[k][n], b[k][n]) for a, b in zip(fb_before, after)
                       for k in a for n in a[k]) and all(
                           a.keys() == b.keys() for a, b in zip(fb_before, after))
    out = {"caught": caught, "skipped": [s.skipped for s in state.history]}
    if mode == "skip":
        out["feedback_restored"] = same
        out["digest"] = digest(model.module)
    return out


def _crc_run(rank: int) -> dict:
    """Rank 1 flips a byte of every shard payload after its CRC was computed."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradpress.collectives import two_phase
    from gradpress.ddp import compression_hook

    if rank == 1:
        encode = two_phase._encode

        def corrupt(comp, x, seed, crc):
            raw, dec = encode(comp, x, seed, crc)
            if raw:  # a byte of the body, before the 4-byte CRC
                raw = raw[:-5] + bytes([raw[-5] ^ 0x10]) + raw[-4:]
            return raw, dec
        two_phase._encode = corrupt
    model = DDP(small_model(), bucket_cap_mb=0.0004)
    state = CompressionState(None, compressor="qsgd", compressor_kwargs={"s": 4},
                             collective="two_phase", crc=True)
    model.register_comm_hook(state, compression_hook)
    try:
        model(torch.randn(8, 20)).sum().backward()
    except Exception as e:  # noqa: BLE001
        return {"caught": f"{type(e).__name__}: {e}"}
    return {"caught": None}


def _fault_cases(rank: int) -> dict:
    return {"raise": _nan_run(rank, "raise"), "skip": _nan_run(rank, "skip"),
            "crc": _crc_run(rank)}


@pytest.fixture(scope="module")
def faults() -> list[dict]:
    res, _ = run_ranks(_fault_cases, 3, deadline=180, pg_timeout=PG_TIMEOUT_S)
    for r in res.values():
        assert "error" not in r, r.get("trace")
    return [res[r] for r in range(3)]


def test_nan_on_one_rank_raises_on_every_rank(faults):
    for r in faults:
        assert r["raise"]["caught"] and "NonFiniteGradientError" in r["raise"]["caught"]
        assert "rank(s) [1]" in r["raise"]["caught"], r["raise"]


def test_nan_on_one_rank_skips_the_step_everywhere_and_restores_both_feedbacks(faults):
    for r in faults:
        got = r["skip"]
        assert got["caught"] is None and got["skipped"][2] > 0
        assert got["skipped"][:2] == [0, 0] and got["skipped"][3] == 0
        assert got["feedback_restored"], "a skipped step left worker or owner state changed"
    assert len({r["skip"]["digest"] for r in faults}) == 1


def test_crc_names_the_rank_that_sent_a_corrupt_shard(faults):
    owners, sender = (faults[0], faults[2]), faults[1]
    for r in owners:  # each owner checks rank 1's shard frame and names it
        assert r["crc"]["caught"] and "PeerError" in r["crc"]["caught"]
        assert "from rank 1" in r["crc"]["caught"] and "CRC" in r["crc"]["caught"], r
    # rank 1 itself learns which owners rejected its frames
    assert "PeerError" in sender["crc"]["caught"] and "[0, 2]" in sender["crc"]["caught"]


# --- the smallest and the largest group -----------------------------------------------------

def _edge_configs(rank: int, world: int) -> dict:
    labels = ("ddp", "fp32", "ecq+ecq") if world < 8 else ("ddp", "fp32")  # 8 ranks: 2 cores
    return {label: _train(rank, CONFIGS[label], steps=3) for label in labels}


@pytest.mark.parametrize("world", [2, 8])
def test_two_phase_runs_from_two_to_eight_ranks(world):
    res, _ = run_ranks(_edge_configs, world, world, deadline=120, pg_timeout=30)
    out = [res[r] for r in range(world)]
    for r in out:
        assert "error" not in r, r.get("trace")
    ref = torch.tensor(out[0]["ddp"]["params"])
    got = torch.tensor(out[0]["fp32"]["params"])
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
    for label in out[0]:
        assert len({r[label]["digest"] for r in out}) == 1, label


def _decoded_elements(rank: int, collective: str) -> dict:
    """Elements this rank decodes from peers' payloads in one step."""
    from gradpress.collectives import average, two_phase

    count = {"n": 0}
    real = average.decode_entry
    real_prepare = average.prepare_entry  # the decode-into-a-buffer path

    def counting(comp, entry, numel, sender, where, device):
        count["n"] += numel
        return real(comp, entry, numel, sender, where, device)

    def counting_prepare(comp, entry, out, sender, where):
        count["n"] += out.numel()
        return real_prepare(comp, entry, out, sender, where)

    average.decode_entry = two_phase.decode_entry = counting
    average.prepare_entry = two_phase.prepare_entry = counting_prepare
    cfg = {"compressor": "qsgd", "kwargs": {"s": 4}, "collective": collective}
    out = _train(rank, cfg, steps=1)
    return {"decoded": count["n"], "numel": sum(out["numel"].values())}


@pytest.mark.parametrize("collective", ["allgather", "two_phase"])
def test_decode_work_per_rank_is_linear_in_d_not_p_d(collective):
    world = 4
    res, _ = run_ranks(_decoded_elements, world, collective, deadline=60)
    for r in res.values():
        assert "error" not in r, r.get("trace")
        d = r["numel"]
        if collective == "allgather":
            assert r["decoded"] == (world - 1) * d  # every peer's whole bucket
        else:  # P-1 peers' shards of d/P, then P-1 owners' shards of d/P
            assert r["decoded"] <= 2 * (world - 1) * (d + world) // world < 2 * d
