"""Exact resume: a run saved mid-way and resumed from its checkpoint ends with parameters
bit-identical to the uninterrupted run, in the simulator and in 2-rank DDP.

What a checkpoint must hold:

* simulator: the parameters ``w``, the feedback's ``state_dict()``, the mini-batch
  generator's ``get_state()`` and the iteration count ``t`` (payload seeds are a function of
  ``(seed, t, worker)``, so nothing else is random);
* DDP: per rank, the model's and the optimizer's ``state_dict()`` and the
  ``CompressionState.state_dict()`` (feedback residuals, which are per rank, and ``iter``,
  from which the hook mixes every payload seed). Mini-batches must come from the loop's
  own seeded stream (here: seeded by rank and step). The residuals are keyed by bucket, so
  the resumed process must have the checkpoint's bucket layout from its first step: by
  default DDP (torch 2.13) puts every parameter in one bucket for the first step and
  rebuilds after it; ``find_unused_parameters=True`` keeps one layout throughout (at the
  cost of one autograd-graph traversal per step). With another layout the state warns and
  drops the mismatched residual rather than silently resuming inexactly.
"""

from __future__ import annotations

import hashlib
import os
import warnings

import pytest
import torch
from dist_harness import run_ranks

import gradpress
from gradpress.ddp import CompressionState
from gradpress.sim import Method, Simulation, split, synthetic_linear

# --- simulator -----------------------------------------------------------------------------

METHOD = Method("ecq2+ecq", "ecq", {"bits": 2}, "ecq", {"alpha": 0.5, "beta": 0.9})
LR = 0.05


def _sim() -> Simulation:
    prob = synthetic_linear(n=256, d=24, seed=1)
    return Simulation(prob, split(prob.n, 4, seed=2), batch_size=8, seed=3)


def _steps(sim: Simulation, comp, fb, w: torch.Tensor, gen: torch.Generator, t0: int,
           n: int) -> torch.Tensor:
    """Iterations ``t0 + 1 .. t0 + n`` of ``Simulation.run``'s loop body, step by step."""
    for t in range(t0 + 1, t0 + n + 1):
        idx = torch.randint(sim.m, (sim.P, sim.batch_size), generator=gen)
        g = sim.worker_grads(w, idx)
        v = fb.to_send("w", g)
        sent, *_ = sim._exchange(comp, v, t)
        fb.commit("w", g, sent)
        w = w - LR * fb.apply("w", sent.mean(dim=0))
    return w


def _fresh(sim: Simulation):
    comp, fb = METHOD.build()
    return comp, fb, torch.zeros(sim.d), torch.Generator().manual_seed(sim.seed)


def test_simulator_step_loop_is_simulation_run():
    # ties the step-by-step loop below to the library's own loop: same final loss, exactly
    sim = _sim()
    curve = sim.run(METHOD, iters=12, lr=LR, progress=False)
    comp, fb, w, gen = _fresh(sim)
    assert sim.problem.loss(_steps(sim, comp, fb, w, gen, 0, 12)) == curve.loss[-1]


def test_simulator_resume_from_checkpoint_is_bit_identical(tmp_path):
    sim, n, m = _sim(), 7, 9
    comp, fb, w, gen = _fresh(sim)
    straight = _steps(sim, comp, fb, w, gen, 0, n + m)

    comp, fb, w, gen = _fresh(sim)
    w = _steps(sim, comp, fb, w, gen, 0, n)
    path = tmp_path / "sim.pt"
    torch.save({"w": w, "feedback": fb.state_dict(), "gen": gen.get_state(), "t": n}, path)
    del comp, fb, w, gen

    ck = torch.load(path)
    comp, fb, _, gen = _fresh(_sim())
    fb.load_state_dict(ck["feedback"])
    gen.set_state(ck["gen"])
    resumed = _steps(sim, comp, fb, ck["w"], gen, ck["t"], m)
    assert torch.equal(resumed, straight)

    # the checkpoint matters: dropping the ECQ residual changes the result
    comp, fb, _, gen = _fresh(sim)
    gen.set_state(ck["gen"])
    assert not torch.equal(_steps(sim, comp, fb, ck["w"], gen, ck["t"], m), straight)


# --- DDP, 2 ranks --------------------------------------------------------------------------

K, M = 3, 3


def _setup(collective: str, stable_buckets: bool = True):
    from dist_harness import small_model
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradpress.ddp import compression_hook

    inner = small_model()
    state = CompressionState(None, compressor="ecq", compressor_kwargs={"bits": 2},
                             feedback=gradpress.ECQFeedback(alpha=0.5, beta=0.9), seed=11,
                             collective=collective)
    # find_unused_parameters=True: DDP never rebuilds its buckets, so a fresh process has
    # from its first step the bucket layout the checkpoint's residuals were keyed by
    model = DDP(inner, bucket_cap_mb=0.0004, find_unused_parameters=stable_buckets)
    model.register_comm_hook(state, compression_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    return inner, model, opt, state


def _train(model, opt, rank: int, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(1000 * rank + step)  # the loop's own data stream
        x, y = torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _params(inner) -> list[bytes]:
    return [p.detach().numpy().tobytes() for p in inner.parameters()]


def _first_run(rank: int, ckpt_dir: str, collective: str) -> dict:
    inner, model, opt, state = _setup(collective)
    _train(model, opt, rank, range(K))
    torch.save({"model": inner.state_dict(), "opt": opt.state_dict(),
                "compression": state.state_dict()},
               os.path.join(ckpt_dir, f"rank{rank}.pt"))  # one file per rank
    at_k = _params(inner)
    _train(model, opt, rank, range(K, K + M))
    return {"params": _params(inner), "at_k": at_k, "iter": state.iter,
            "fb_keys": state.feedback.keys(), "server_keys": state.server_feedback.keys()}


def _resumed_run(rank: int, ckpt_dir: str, collective: str, load_feedback: bool,
                 stable: bool = True, drop_server: bool = False) -> dict:
    inner, model, opt, state = _setup(collective, stable)
    ck = torch.load(os.path.join(ckpt_dir, f"rank{rank}.pt"))
    inner.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    if load_feedback:
        state.load_state_dict(ck["compression"])
        if drop_server:  # the control: the owners' residuals lost
            state.server_feedback.reset()
    else:  # the control: only the step counter, no residuals
        state.iter = ck["compression"]["iter"]
    loaded = _params(inner)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, opt, rank, range(K, K + M))
    return {"params": _params(inner), "loaded": loaded, "iter": state.iter,
            "warnings": [str(w.message) for w in caught if "checkpoint" in str(w.message)]}


def _resumed_all(rank: int, ckpt_dir: str, collective: str) -> dict:
    return {"full": _resumed_run(rank, ckpt_dir, collective, True),
            "no_feedback": _resumed_run(rank, ckpt_dir, collective, False),
            "rebuilt": _resumed_run(rank, ckpt_dir, collective, True, stable=False),
            **({"no_server": _resumed_run(rank, ckpt_dir, collective, True, drop_server=True)}
               if collective == "two_phase" else {})}


@pytest.fixture(scope="module", params=[(2, "allgather"), (3, "two_phase")],
                ids=["2ranks-allgather", "3ranks-two_phase"])
def ddp_runs(request, tmp_path_factory) -> tuple[dict, dict]:
    world, collective = request.param
    ckpt = str(tmp_path_factory.mktemp("ckpt"))
    first, _ = run_ranks(_first_run, world, ckpt, collective)
    for r in first.values():
        assert "error" not in r, r.get("trace")
    resumed, _ = run_ranks(_resumed_all, world, ckpt, collective)  # fresh processes
    for r in resumed.values():
        assert "error" not in r, r.get("trace")
    return first, resumed


def test_ddp_resume_from_per_rank_checkpoints_is_bit_identical(ddp_runs):
    first, resumed = ddp_runs
    for rank in first:
        a, b = first[rank], resumed[rank]["full"]
        assert b["loaded"] == a["at_k"]
        assert a["params"] != a["at_k"], "training did not move the parameters"
        assert b["params"] == a["params"], f"rank {rank}: resumed run differs"
        assert a["iter"] == b["iter"] == K + M
        assert a["fb_keys"], "ECQ feedback kept no residual"
    digest = {hashlib.sha256(b"".join(first[r]["params"])).hexdigest() for r in first}
    assert len(digest) == 1  # and every rank agrees


def test_ddp_resume_without_feedback_state_diverges(ddp_runs):
    # the residuals are part of the state: leaving them out gives other parameters
    first, resumed = ddp_runs
    assert resumed[0]["no_feedback"]["params"] != first[0]["params"]
    if len(first) > 2:  # two_phase: the shard owners' residuals are state too
        assert first[0]["server_keys"], "two_phase kept no owner residual"
        assert resumed[0]["no_server"]["params"] != first[0]["params"]


def test_resume_loads_into_fresh_state_only_with_the_same_compressor():
    st = CompressionState(None, compressor="ecq", compressor_kwargs={"bits": 2},
                          feedback=gradpress.ECQFeedback())
    st.iter = 5
    sd = st.state_dict()
    other = CompressionState(None, compressor="ecq", compressor_kwargs={"bits": 3},
                             feedback=gradpress.ECQFeedback())
    with pytest.raises(ValueError, match="compressor"):
        other.load_state_dict(sd)
    assert other.iter == 0  # nothing was changed by the refused load
    with pytest.raises(ValueError, match="version"):
        CompressionState(None, compressor="ecq", compressor_kwargs={"bits": 2},
                         feedback=gradpress.ECQFeedback()).load_state_dict(dict(sd, version=9))
    same = CompressionState(None, compressor="ecq", compressor_kwargs={"bits": 2},
                            feedback=gradpress.ECQFeedback())
    same.load_state_dict(sd)
    assert same.iter == 5


def test_ddp_resume_into_another_bucket_layout_warns_instead_of_silently_differing(ddp_runs):
    # default DDP (one bucket for the first step, then rebuilt) cannot map the residuals
    first, resumed = ddp_runs
    for rank in (0, 1):
        full, rebuilt = resumed[rank]["full"], resumed[rank]["rebuilt"]
        assert full["warnings"] == []
        assert rebuilt["warnings"] and "find_unused_parameters=True" in rebuilt["warnings"][0]
        assert rebuilt["params"] != first[rank]["params"]
