"""The DDP hook against a single-process reference, bit for bit.

Each gloo rank records every bucket gradient that enters the hook and the tensor the hook
hands back to DDP. The parent then replays the algorithm exactly as the docstrings of
``gradpress.ddp.hook`` (all-gather) and ``gradpress.collectives.two_phase`` state it, with
its own seed formula, its own rank-order averaging and the feedback recursions called
directly, and requires the hook's output to equal the replay's on every rank, every step and
every bucket. Agreement between ranks alone would pass a hook that computes the same wrong
thing everywhere (e.g. averaging only the first two ranks, or one dither for all ranks);
this cannot.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_harness import run_ranks, small_model

import gradpress
from gradpress.collectives.two_phase import shard_bounds
from gradpress.ddp.state import _mix_seed

STEPS = 20
SEED = 3
CASES = {  # label: (compressor, kwargs, feedback)
    "ecq+ECQ": ("ecq", {"bits": 2}, "ecq"),
    "topk+EF": ("topk", {"ratio": 0.1}, "ef"),
    "topk+EF21": ("topk", {"ratio": 0.1}, "ef21"),
}


def _record_all(rank: int, collective: str) -> dict:
    return {label: _record(rank, label, collective) for label in CASES}


def _record(rank: int, label: str, collective: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradpress.ddp import CompressionState, compression_hook

    name, kwargs, fb = CASES[label]
    # find_unused_parameters=True: DDP keeps one bucket layout from the first step on
    model = DDP(small_model(), bucket_cap_mb=0.0004, find_unused_parameters=True)
    state = CompressionState(None, compressor=name, compressor_kwargs=kwargs,
                             feedback=gradpress.feedback.get(fb), seed=SEED,
                             collective=collective)
    log: list[tuple[int, int, bytes, bytes]] = []

    def hook(st, bucket):
        it, index = st.iter, bucket.index()
        grad = bucket.buffer().detach().clone().numpy().tobytes()
        return compression_hook(st, bucket).then(
            lambda f: _keep(log, it, index, grad, f.value()))

    model.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(50 + rank)
    for _ in range(STEPS):
        opt.zero_grad()
        x, y = torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {"log": log}


def _keep(log: list, it: int, index: int, grad: bytes, out: torch.Tensor) -> torch.Tensor:
    log.append((it, index, grad, out.detach().clone().numpy().tobytes()))
    return out


def _tensor(raw: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy())


def _mean_in_rank_order(parts: list[torch.Tensor]) -> torch.Tensor:
    acc = parts[0].float().clone()
    for p in parts[1:]:
        acc.add_(p.float())
    return acc.div_(len(parts))


def _replay_allgather(comp, fbs, key: str, grads: list[torch.Tensor], it: int, index: int
                      ) -> list[torch.Tensor]:
    world = len(grads)
    payloads = []
    for r in range(world):
        v = fbs[r].to_send(key, grads[r])
        payload, _ = comp.encode_decoded(v, seed=_mix_seed(SEED, it, index, r))
        sent = comp.decode(payload.to_bytes())
        fbs[r].commit(key, grads[r], sent)
        payloads.append(sent)
    mean = _mean_in_rank_order(payloads)
    return [fbs[r].apply(key, mean) for r in range(world)]


def _replay_two_phase(comp, fbs, servers, key: str, grads: list[torch.Tensor], it: int,
                      index: int) -> list[torch.Tensor]:
    world, d = len(grads), grads[0].numel()
    bounds = shard_bounds(d, world)
    shards = [[None] * world for _ in range(world)]  # shards[j][r]: rank r's shard j, decoded
    for r in range(world):
        v = fbs[r].to_send(key, grads[r])
        sent = []
        for j, (s, e) in enumerate(bounds):
            payload = comp.encode(v[s:e], seed=_mix_seed(SEED, it, index, r, j, 0))
            shards[j][r] = comp.decode(payload.to_bytes())
            sent.append(shards[j][r])
        fbs[r].commit(key, grads[r], torch.cat(sent))
    owned = []
    for j in range(world):  # owner j: mean, owner feedback, re-encode
        m = _mean_in_rank_order(shards[j])
        u = servers[j].to_send(f"{key}/owner", m)
        payload = comp.encode(u, seed=_mix_seed(SEED, it, index, j, j, 1))
        dec = comp.decode(payload.to_bytes())
        servers[j].commit(f"{key}/owner", m, dec)
        owned.append(dec)
    full = torch.cat(owned)
    return [fbs[r].apply(key, servers[r].apply(key, full)) for r in range(world)]


@pytest.fixture(scope="module", params=[(2, "allgather"), (3, "allgather"), (4, "allgather"),
                                        (3, "two_phase"), (4, "two_phase")],
                ids=lambda p: f"{p[0]}ranks-{p[1]}")
def recorded(request) -> tuple[int, str, dict[int, dict]]:
    world, collective = request.param
    res, _ = run_ranks(_record_all, world, collective, deadline=180)
    for r in res.values():
        assert "error" not in r, r.get("trace")
    return world, collective, res


@pytest.mark.parametrize("label", list(CASES))
def test_hook_equals_single_process_reference(recorded, label):
    world, collective, res = recorded
    logs = [sorted(res[r][label]["log"]) for r in range(world)]
    assert len(logs[0]) >= 3 * STEPS, "the model must span several buckets"
    name, kwargs, fb = CASES[label]
    comp = gradpress.get(name, **kwargs)
    fbs = [gradpress.feedback.get(fb) for _ in range(world)]
    servers = [gradpress.feedback.get(fb) for _ in range(world)]
    for entries in zip(*logs):
        it, index = entries[0][0], entries[0][1]
        grads = [_tensor(e[2]) for e in entries]
        if collective == "allgather":
            want = _replay_allgather(comp, fbs, str(index), grads, it, index)
        else:
            want = _replay_two_phase(comp, fbs, servers, str(index), grads, it, index)
        for r, e in enumerate(entries):
            assert torch.equal(_tensor(e[3]), want[r]), (
                f"rank {r}, step {it}, bucket {index}: the hook's update differs from the "
                "reference")


def test_every_rank_and_step_draws_its_own_seed():
    seeds = {_mix_seed(SEED, it, index, r) for it in range(20) for index in range(5)
             for r in range(8)}
    assert len(seeds) == 20 * 5 * 8
    shard_seeds = {_mix_seed(SEED, 0, 0, r, j, side) for r in range(8) for j in range(8)
                   for side in (0, 1)}
    assert len(shard_seeds) == 8 * 8 * 2
    # and they reach the payloads: the same vector, two ranks' seeds, different bytes
    comp = gradpress.get("qsgd", s=2)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    a, b = (comp.encode(x, seed=_mix_seed(SEED, 0, 0, r)).to_bytes() for r in (0, 1))
    assert a != b
