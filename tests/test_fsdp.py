"""FSDP2 with gradpress's compressed reduce-scatter, on real gloo groups of 2 and 3 ranks.

The model is a small MLP: two Linear layers that are FSDP units of their own and a third
Linear held by the root unit, so three reduce-scatters per backward pass.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

import gradpress
import gradpress.fsdp

STEPS = 5


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(12, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.l2(torch.relu(self.l1(x)))))


def _sharded(force_sum: bool = False, reduce_dtype: torch.dtype | None = None) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = MLP()
    mp = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
    fully_shard(model.l1, mp_policy=mp)
    fully_shard(model.l2, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    if force_sum:
        model.set_force_sum_reduction_for_comms(True)
        model.l1.set_force_sum_reduction_for_comms(True)
        model.l2.set_force_sum_reduction_for_comms(True)
    return model


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's mini-batch of ``step``: a noisy linear teacher, seeded by rank and step."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 12, generator=g)
    w = torch.linspace(-1, 1, 48).reshape(12, 4)
    return x, x @ w + 0.05 * torch.randn(16, 4, generator=g)


def _train(model: nn.Module, opt: torch.optim.Optimizer, rank: int, steps: range
           ) -> list[float]:
    losses = []
    for t in steps:
        x, y = _batch(rank, t)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for p in _full(model):
        h.update(p.numpy().tobytes())
    return h.hexdigest()


def _chunk_numel(module: nn.Module, world: int) -> int:
    """Elements of one rank's chunk of the unit's reduce-scatter: FSDP pads dim 0 of every
    parameter to a multiple of the world size."""
    return sum(-(-p.shape[0] // world) * p[0].numel() for p in module.parameters())


def _max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / x.abs().max()) for x, y in zip(a, b))


# --- a lossless code is FSDP's reduce-scatter ---------------------------------------------

def _lossless_rank(rank: int) -> dict:
    """Parameters after STEPS steps of FSDP's default and of the fp32 comm (AVG, and SUM with
    FSDP's post-divide); gradients with a bf16 and an fp16 reduce dtype; the comm's bytes;
    ops called directly, sync and async."""
    import torch.distributed as dist

    world = dist.get_world_size()
    out: dict = {}
    for force_sum in (False, True):  # AVG; SUM with FSDP's own post-divide
        ref, ours = _sharded(force_sum), _sharded(force_sum)
        comms = gradpress.fsdp.register(ours, compressor="fp32")
        opt_r = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        opt_o = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
        _train(ref, opt_r, rank, range(STEPS))
        _train(ours, opt_o, rank, range(STEPS))
        out[f"diff_force_sum={force_sum}"] = _max_rel_diff(_full(ref), _full(ours))
    for dtype in (torch.bfloat16, torch.float16):  # AVG; SUM between FSDP's pre/post divide
        ref, ours = _sharded(reduce_dtype=dtype), _sharded(reduce_dtype=dtype)
        gradpress.fsdp.register(ours, compressor="fp32")
        for m in (ref, ours):
            x, y = _batch(rank, 0)
            nn.functional.mse_loss(m(x), y).backward()
        grads = [[p.grad.full_tensor() for p in m.parameters()] for m in (ref, ours)]
        out[f"grad_diff_{dtype}"] = _max_rel_diff(*grads)
    comp = gradpress.get("fp32")
    out["calls"] = {k: c.calls for k, c in comms.items()}
    out["sent"] = {k: c.last.sent_bytes for k, c in comms.items()}
    out["received"] = {k: c.last.received_bytes for k, c in comms.items()}
    units = {"l1": ours.l1, "l2": ours.l2, "": ours.head}
    out["bound"] = {k: comp.max_payload_bytes(_chunk_numel(m, world)) for k, m in units.items()}
    # ops as FSDP passes them, called directly, sync and async, against gloo's SUM
    comm = gradpress.fsdp.CompressedReduceScatter("fp32", key="direct")
    x = torch.randn(world * 10, generator=torch.Generator().manual_seed(rank))
    total = torch.empty(10)
    dist.reduce_scatter_single(total, x.clone(), op=dist.ReduceOp.SUM)
    for name, op, scale in (("sum", dist.ReduceOp.SUM, 1.0), ("avg", dist.ReduceOp.AVG,
                            1 / world), ("premul", dist.ReduceOp.PREMUL_SUM(0.25), 0.25)):
        for async_op in (False, True):
            got = torch.empty(10)
            work = comm(got, x, None, op, async_op=async_op)
            assert (work is not None) == async_op
            if work is not None:
                work.wait()
            out[f"op_{name}_{async_op}"] = float((got - total * scale).abs().max())
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_fp32_reduce_scatter_equals_fsdp_default(world):
    res, _ = run_ranks(_lossless_rank, world, deadline=60, pg_timeout=20)
    for r in range(world):
        assert "error" not in res[r], res[r].get("trace")
        got = res[r]
        assert got["diff_force_sum=False"] < 1e-5
        assert got["diff_force_sum=True"] < 1e-5
        assert got["grad_diff_torch.bfloat16"] < 1e-2  # the reduce dtype's rounding
        assert got["grad_diff_torch.float16"] < 1e-3
        assert got["calls"] == {"": STEPS, "l1": STEPS, "l2": STEPS}
        for k in got["bound"]:  # one frame per other rank, padded to the bound
            assert got["sent"][k] == got["received"][k] == (world - 1) * (4 + got["bound"][k])
        for k, v in got.items():
            if k.startswith("op_"):
                assert v < 1e-6, (k, v)


# --- QSGD trains ----------------------------------------------------------------------------

def _qsgd_rank(rank: int) -> dict:
    model = _sharded()
    comms = gradpress.fsdp.register(model, compressor=gradpress.get("qsgd", s=4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = _train(model, opt, rank, range(40))
    return {"losses": losses, "sent": sum(c.last.sent_bytes for c in comms.values())}


def test_qsgd_under_fsdp_trains():
    res, _ = run_ranks(_qsgd_rank, 3, deadline=60, pg_timeout=20)
    assert "error" not in res[0], res[0].get("trace")
    losses = res[0]["losses"]
    assert sum(losses[-5:]) < 0.3 * sum(losses[:5]), losses


# --- exact resume ---------------------------------------------------------------------------

def _setup_ecq():
    model = _sharded()
    comms = gradpress.fsdp.register(model, compressor=gradpress.get("ecq", bits=2),
                                    feedback=gradpress.ECQFeedback(alpha=0.5, beta=0.9))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), comms


def _resume_rank(rank: int, ckpt: str, stop: int, total: int, resume: bool) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt, comms = _setup_ecq()
    start = 0
    if resume:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=ckpt)
        set_state_dict(model, opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        saved = torch.load(os.path.join(ckpt, f"rs-rank{rank}.pt"))
        for name, comm in comms.items():
            comm.load_state_dict(saved[name])
        start = stop
    else:
        _train(model, opt, rank, range(stop))
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
        torch.save({name: c.state_dict() for name, c in comms.items()},
                   os.path.join(ckpt, f"rs-rank{rank}.pt"))
        start = stop
    _train(model, opt, rank, range(start, total))
    residual = float(sum(c.feedback.state(c.key)["h"].abs().sum() for c in comms.values()))
    return {"digest": _digest(model), "residual": residual}


def test_checkpoint_resume_is_bit_identical(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    straight, _ = run_ranks(_resume_rank, 2, ckpt, 3, 6, False, deadline=60, pg_timeout=20)
    resumed, _ = run_ranks(_resume_rank, 2, ckpt, 3, 6, True, deadline=60, pg_timeout=20)
    for r in range(2):
        assert "error" not in straight[r], straight[r].get("trace")
        assert "error" not in resumed[r], resumed[r].get("trace")
        assert straight[r]["residual"] > 0
        assert resumed[r] == straight[r]


# --- a payload of the wrong shard size ------------------------------------------------------

def _wrong_shard_rank(rank: int) -> dict:
    model = _sharded()
    comp = gradpress.get("fp32")
    gradpress.fsdp.register(model, compressor=comp)
    if rank == 1:  # encodes one element too few of every chunk
        encode = comp.encode_decoded
        comp.encode_decoded = lambda x, seed=0: encode(x[:-1], seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train(model, opt, rank, range(1))
    return {"ok": True}


def test_wrong_shard_size_raises_peer_error_naming_sender():
    res, _ = run_ranks(_wrong_shard_rank, 2, deadline=40, pg_timeout=5)
    assert "PeerError" in res[0]["error"], res[0]
    assert "from rank 1" in res[0]["error"]
    assert "error" in res[1]


# --- arguments and state, no process group --------------------------------------------------

def test_reductions_other_than_sums_raise():
    import torch.distributed as dist

    from gradpress.fsdp.reduce_scatter import _sum_factor

    assert _sum_factor(dist.ReduceOp.SUM, 4) is None
    assert _sum_factor(dist.ReduceOp.AVG, 4) == 0.25
    assert _sum_factor(dist.ReduceOp.PREMUL_SUM(0.5), 4) == 0.5
    with pytest.raises(ValueError, match="SUM, AVG or PREMUL_SUM"):
        _sum_factor(dist.ReduceOp.MAX, 4)


def test_state_dict_of_another_unit_is_rejected():
    a = gradpress.fsdp.CompressedReduceScatter("qsgd", gradpress.ECQFeedback(), key="l1")
    b = gradpress.fsdp.CompressedReduceScatter("qsgd", gradpress.ECQFeedback(), key="l2")
    with pytest.raises(ValueError, match="FSDP unit 'l1'"):
        b.load_state_dict(a.state_dict())
    c = gradpress.fsdp.CompressedReduceScatter("qsgd", key="l1")
    with pytest.raises(ValueError, match="feedback"):
        c.load_state_dict(a.state_dict())
