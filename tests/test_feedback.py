"""Error feedback (ECQ-SGD, classic EF, EF21): the paper's special cases, exactness with the
identity compressor, bounded error on a quadratic, exact resume, and no state change on bad
input."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

import gradpress
from gradpress.compressors.base import Compressor
from gradpress.errors import NonFiniteGradientError, PayloadError
from gradpress.feedback import EF21, ECQFeedback, ErrorFeedback, NoFeedback
from gradpress.feedback import get as get_feedback
from gradpress.payload import Payload
from gradpress.sim import Method, Simulation, split, synthetic_linear


class _Grid(Compressor):
    """Test-only lossy compressor (not registered): stochastic rounding of ``x / max|x|``
    onto ``2s+1`` levels, one int8 per coordinate plus a float32 scale."""

    name = "test_grid"
    compressor_id = 65001
    unbiased = True

    def __init__(self, s: int = 1) -> None:
        self.s = s

    def body_bits(self, d: int) -> float:
        return 32.0 + 8.0 * d

    def _encode(self, flat: torch.Tensor, gen: torch.Generator, seed: int) -> bytes:
        scale = flat.abs().max()
        if float(scale) == 0.0:
            q = torch.zeros_like(flat, dtype=torch.int8)
        else:
            u = torch.rand(flat.shape, generator=gen, device=flat.device)
            q = torch.floor(flat / scale * self.s + u).clamp(-self.s, self.s).to(torch.int8)
        return (np.float32(scale.item()).tobytes() + q.cpu().numpy().tobytes())

    def _decode(self, body: bytes, numel: int, seed: int, device: torch.device) -> torch.Tensor:
        if len(body) != 4 + numel:
            raise PayloadError("bad test_grid body")
        scale = float(np.frombuffer(body[:4], dtype=np.float32)[0])
        q = np.frombuffer(body[4:], dtype=np.int8).astype(np.float32)
        return torch.from_numpy(q * scale / self.s).to(device)


def _sent(comp: Compressor, v: torch.Tensor, seed: int) -> torch.Tensor:
    return comp.decode(Payload.from_bytes(comp.encode(v, seed=seed).to_bytes()))


def _drive(fb, comp, grads, key="k", seed0=0):
    """Run the protocol on a list of gradients; return the update directions."""
    out = []
    for t, g in enumerate(grads):
        v = fb.to_send(key, g)
        s = _sent(comp, v, seed0 + t)
        fb.commit(key, g, s)
        out.append(fb.apply(key, s))
    return out


def _grads(n=30, shape=(4, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


def _sim(batch_size=None, P=4, d=12, n=400, seed=0):
    pr = synthetic_linear(n=n, d=d, seed=seed)
    return Simulation(pr, split(pr.n, P, seed=seed), batch_size=batch_size, seed=seed)


def test_ecq_with_zero_alpha_and_beta_equals_plain_quantized_sgd():
    sim = _sim(batch_size=8)
    a = sim.run(Method("ecq00", _Grid(1), feedback="ecq",
                       feedback_kw={"alpha": 0.0, "beta": 0.0}),
                iters=60, lr=0.05, record_every=1, progress=False)
    b = sim.run(Method("plain", _Grid(1)), iters=60, lr=0.05, record_every=1, progress=False)
    assert a.loss == b.loss and a.dist == b.dist
    assert a.bytes_per_worker_total == b.bytes_per_worker_total
    # ... and the compensation really changes the run when switched on (the test can fail).
    c = sim.run(Method("ecq", _Grid(1), feedback="ecq", feedback_kw={"alpha": 0.5, "beta": 0.5}),
                iters=60, lr=0.05, record_every=1, progress=False)
    assert c.loss != b.loss


def test_ecq_zero_alpha_sends_the_raw_gradient_whatever_beta():
    comp = _Grid(2)
    grads = _grads()
    plain = _drive(NoFeedback(), comp, grads)
    for beta in (0.0, 0.7, 1.0):
        ecq = _drive(ECQFeedback(alpha=0.0, beta=beta), comp, grads)
        assert all(torch.equal(x, y) for x, y in zip(plain, ecq))


def test_ecq_with_alpha_one_beta_one_equals_classic_error_feedback():
    comp = _Grid(1)
    grads = _grads()
    ef = _drive(ErrorFeedback(), comp, grads)
    ecq = _drive(ECQFeedback(alpha=1.0, beta=1.0), comp, grads)
    assert all(torch.equal(x, y) for x, y in zip(ef, ecq))


def test_ecq_update_is_the_papers_recursion():
    """h^(t) = beta h^(t-1) + (g^(t-1) - Q(g^(t-1) + alpha h^(t-1))), written out by hand."""
    comp, alpha, beta = _Grid(1), 0.3, 0.8
    fb = ECQFeedback(alpha=alpha, beta=beta)
    h = torch.zeros(4, 7)
    for t, g in enumerate(_grads(n=15)):
        v = fb.to_send("k", g)
        assert torch.allclose(v, g + alpha * h, atol=1e-6)
        s = _sent(comp, v, t)
        fb.commit("k", g, s)
        h = beta * h + (g - s)
        assert torch.allclose(fb.state("k")["h"], h, atol=1e-5)


def _full_precision_losses(sim, lr: float, iters: int) -> list[float]:
    """Loss after each step of plain full-precision gradient descent (the reference)."""
    w = torch.zeros(sim.d)
    ref = [sim.problem.loss(w)]
    for _ in range(iters):
        w = w - lr * sim.worker_grads(w, None).mean(dim=0)
        ref.append(sim.problem.loss(w))
    return ref


@pytest.mark.parametrize("name,kw", [("none", {}), ("ecq", {"alpha": 0.5, "beta": 0.9}),
                                     ("ecq", {"alpha": 1.0, "beta": 0.3}), ("ef", {})])
def test_identity_compressor_makes_feedback_equal_full_precision_sgd_exactly(name, kw):
    sim, lr, iters = _sim(), 0.1, 40
    curve = sim.run(Method(name, "fp32", feedback=name, feedback_kw=kw), iters=iters, lr=lr,
                    record_every=1, progress=False)
    ref = _full_precision_losses(sim, lr, iters)
    assert curve.loss == ref


def test_identity_compressor_makes_ef21_equal_full_precision_sgd_up_to_rounding():
    # EF21 telescopes g_i + (g - g_i): equal in exact arithmetic, not bit for bit in float32.
    sim, lr, iters = _sim(), 0.1, 40
    curve = sim.run(Method("ef21", "fp32", feedback="ef21"), iters=iters, lr=lr,
                    record_every=1, progress=False)
    ref = _full_precision_losses(sim, lr, iters)
    np.testing.assert_allclose(curve.loss, ref, rtol=1e-5)


def test_ecq_error_state_stays_bounded_on_a_quadratic():
    """Distributed GD on f(w) = 1/2 w^T A w - b^T w with a 1-level quantizer: the error h
    obeys ||h_t|| <= max_s ||g_s - g~_s|| / (1 - beta) and stops growing."""
    gen = torch.Generator().manual_seed(1)
    d, P, beta = 20, 4, 0.9
    M = torch.randn(d, d, generator=gen)
    A = M @ M.T / d + 0.5 * torch.eye(d)
    B = torch.randn(P, d, generator=gen)
    lr = 1.0 / float(torch.linalg.eigvalsh(A)[-1])
    comp, fb = _Grid(1), ECQFeedback(alpha=0.5, beta=beta)
    w = torch.zeros(d)
    hnorm, errs = [], []
    for t in range(400):
        g = w @ A - B  # (P, d): each worker's gradient of 1/2 w^T A w - b_p^T w
        v = fb.to_send("q", g)
        s = torch.stack([_sent(comp, v[p], 1000 * t + p) for p in range(P)])
        fb.commit("q", g, s)
        w = w - lr * fb.apply("q", s.mean(0))
        errs.append(float((g - s).norm()))
        hnorm.append(float(fb.state("q")["h"].norm()))
    assert max(hnorm) <= max(errs) / (1 - beta) * (1 + 1e-5)
    assert np.mean(hnorm[-100:]) <= 2 * np.mean(hnorm[100:200])
    w_star = torch.linalg.solve(A, B.mean(0))
    assert float((w - w_star).norm()) < 0.5 * float(w_star.norm())


@pytest.mark.parametrize("name,kw", [("ecq", {"alpha": 0.4, "beta": 0.7}), ("ef", {}),
                                     ("ef21", {}), ("none", {})])
def test_state_dict_resume_is_bit_for_bit(name, kw):
    comp, grads = _Grid(1), _grads(n=20)
    fb = get_feedback(name, **kw)
    _drive(fb, comp, grads[:10])
    buf = io.BytesIO()
    torch.save(fb.state_dict(), buf)
    rest = _drive(fb, comp, grads[10:], seed0=10)
    fb2 = get_feedback(name, **kw)
    buf.seek(0)
    fb2.load_state_dict(torch.load(buf))
    rest2 = _drive(fb2, comp, grads[10:], seed0=10)
    assert all(torch.equal(x, y) for x, y in zip(rest, rest2))
    for k in fb.keys():
        for n, t in fb.state(k).items():
            assert torch.equal(t, fb2.state(k)[n])


def test_state_dict_is_a_copy():
    fb = ECQFeedback(0.5, 0.5)
    _drive(fb, _Grid(1), _grads(n=3))
    sd = fb.state_dict()
    before = sd["state"]["k"]["h"].clone()
    _drive(fb, _Grid(1), _grads(n=3, seed=5), seed0=3)
    assert torch.equal(sd["state"]["k"]["h"], before)


def test_load_state_dict_rejects_another_feedback_or_config():
    sd = ECQFeedback(0.5, 0.9).state_dict()
    with pytest.raises(ValueError):
        ErrorFeedback().load_state_dict(sd)
    with pytest.raises(ValueError):
        ECQFeedback(0.5, 0.8).load_state_dict(sd)
    bad = copy.deepcopy(sd)
    bad["state"] = {"k": {"h": torch.tensor([float("nan")])}}
    with pytest.raises(ValueError):
        ECQFeedback(0.5, 0.9).load_state_dict(bad)


@pytest.mark.parametrize("fb", [ECQFeedback(0.5, 0.9), ErrorFeedback(), EF21(), NoFeedback()])
def test_nan_input_raises_and_leaves_state_untouched(fb):
    comp = _Grid(1)
    _drive(fb, comp, _grads(n=3))
    before = fb.state_dict()
    bad = torch.randn(4, 7)
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteGradientError):
        fb.to_send("k", bad)
    with pytest.raises(NonFiniteGradientError):
        fb.commit("k", bad, torch.zeros(4, 7))
    inf_sent = torch.zeros(4, 7)
    inf_sent[0, 0] = float("inf")
    with pytest.raises(NonFiniteGradientError):
        fb.commit("k", torch.randn(4, 7), inf_sent)
    with pytest.raises(NonFiniteGradientError):
        fb.apply("k", inf_sent)
    with pytest.raises(ValueError):
        fb.commit("k", torch.randn(4, 7), torch.zeros(28))
    after = fb.state_dict()
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        for n, t in v.items():
            assert torch.equal(t, after["state"][k][n])


def test_to_send_is_pure_and_does_not_alias_the_gradient():
    for fb in (ECQFeedback(0.5, 0.9), ErrorFeedback(), EF21(), NoFeedback()):
        _drive(fb, _Grid(1), _grads(n=2))
        g = torch.randn(4, 7)
        g0 = g.clone()
        a, b = fb.to_send("k", g), fb.to_send("k", g)
        assert torch.equal(a, b) and torch.equal(g, g0)
        a.add_(1.0)
        assert torch.equal(g, g0)


def test_a_new_key_with_another_shape_is_independent_and_a_wrong_shape_raises():
    fb = ECQFeedback(0.5, 0.9)
    _drive(fb, _Grid(1), _grads(n=2), key="a")
    fb.to_send("b", torch.randn(3))
    with pytest.raises(ValueError):
        fb.to_send("a", torch.randn(3))


def test_low_precision_gradients_keep_a_float32_state():
    fb = ECQFeedback(0.5, 0.9)
    g = torch.randn(16).to(torch.bfloat16)
    v = fb.to_send("k", g)
    assert v.dtype == torch.bfloat16
    fb.commit("k", g, torch.zeros(16, dtype=torch.bfloat16))
    assert fb.state("k")["h"].dtype == torch.float32


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError):
        get_feedback("nope")
    with pytest.raises(ValueError):
        ECQFeedback(alpha=-1.0)
    with pytest.raises(ValueError):
        ECQFeedback(beta=float("nan"))
    with pytest.raises(TypeError):
        ECQFeedback().to_send(3, torch.zeros(2))  # type: ignore[arg-type]


@pytest.mark.parametrize("fb_name", ["none", "ecq", "ef", "ef21"])
def test_every_registered_compressor_works_with_every_feedback(fb_name):
    grads = _grads(n=3, shape=(6, 10))
    for name in gradpress.available():
        fb = get_feedback(fb_name)
        out = _drive(fb, gradpress.get(name), grads)
        assert all(o.shape == (6, 10) and bool(torch.isfinite(o).all()) for o in out), name


def test_feedback_classes_are_exported_from_gradpress():
    assert gradpress.ECQFeedback is ECQFeedback and gradpress.EF21 is EF21
    assert gradpress.feedback.available() == ["ecq", "ef", "ef21", "none"]
