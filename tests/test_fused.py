"""The allocation-free paths against the unfused ones, bit for bit.

* :func:`gradpress.feedback.fused.encode_with_feedback` gives the bytes of
  ``comp.encode(fb.to_send(k, g))`` and leaves the residual of ``fb.commit(k, g, sent)``
  over several steps (so the residual's recursion is exercised, not only its first step);
* ``encode_into`` equals ``encode(...).to_bytes()``; ``decode_into`` equals ``decode``,
  written or added; bad bytes raise ``PayloadError`` with ``out`` untouched;
* the DDP hook on a 2-rank gloo group: fused and generic paths hand DDP the same floats,
  and over 100 steps its buffers stay where they are and nothing grows.
"""

from __future__ import annotations

import dataclasses
import itertools
import os

import numpy as np
import pytest
import torch
from dist_harness import run_ranks

import gradpress
from gradpress.compressors.fused import Workspace
from gradpress.errors import NonFiniteGradientError, PayloadError
from gradpress.feedback import ECQFeedback, ErrorFeedback, NoFeedback
from gradpress.feedback.fused import encode_with_feedback, supports

FUSED = {  # label: (compressor name, kwargs)
    "qsgd dense": ("qsgd", {"s": 3, "sparse": False}),
    "qsgd elias": ("qsgd", {"s": 2, "bucket_size": 64}),
    "ecq l2 dense bucketed": ("ecq", {"bits": 3, "bucket_size": 100, "entropy": False,
                                      "sparse": False}),
    "ecq linf dense bucketed": ("ecq", {"bits": 2, "norm": "linf", "bucket_size": 512,
                                        "entropy": False, "sparse": False}),
    "ecq l2 whole dense": ("ecq", {"bits": 4, "entropy": False, "sparse": False}),
    "ecq linf best": ("ecq", {"bits": 2, "norm": "linf", "bucket_size": 512}),
    "ecq huffman": ("ecq", {"s": 1, "entropy": "huffman", "norm": "linf",
                            "bucket_size": 256}),
    "terngrad": ("terngrad", {"clip": None}),
    "terngrad bucketed": ("terngrad", {"clip": None, "bucket_size": 300}),
    "sign": ("sign", {}),
    "sign whole": ("sign", {"bucket_size": None}),
}
FEEDBACKS = {"ecq": lambda: ECQFeedback(0.5, 0.9), "ecq beta1": lambda: ECQFeedback(0.3, 1.0),
             "ecq beta0": lambda: ECQFeedback(0.2, 0.0), "ef": ErrorFeedback,
             "none": NoFeedback}


def _grads(n: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) * 1e-2 for _ in range(steps)]


@pytest.mark.parametrize("fb_name", list(FEEDBACKS))
@pytest.mark.parametrize("label", list(FUSED))
def test_fused_bytes_and_residual_equal_the_unfused_path(label, fb_name):
    name, kw = FUSED[label]
    comp = gradpress.get(name, **kw)
    ref, fused = FEEDBACKS[fb_name](), FEEDBACKS[fb_name]()
    n = 5003  # several tiles' worth of buckets, a short last bucket and a padded last byte
    buf = torch.zeros(comp.max_payload_bytes(n), dtype=torch.uint8)
    ws = Workspace()
    assert supports(comp, fused, torch.zeros(n))
    for step, g in enumerate(_grads(n, 4)):
        want = comp.encode(ref.to_send("k", g), seed=step).to_bytes()
        ref.commit("k", g, comp.decode(want))
        view = encode_with_feedback(comp, fused, "k", g, buf, seed=step, ws=ws)
        assert view is not None
        assert view.to_bytes() == want, f"step {step}: payload bytes differ"
        assert len(view) == len(want)
        assert fused.keys() == ref.keys()
        assert fused.state("k").keys() == ref.state("k").keys()
        for k, t in ref.state("k").items():
            assert torch.equal(fused.state("k")[k], t), f"step {step}: residual {k} differs"


def test_unsupported_pairs_take_the_generic_path():
    g = torch.randn(100)
    buf = np.zeros(4096, dtype=np.uint8)
    assert encode_with_feedback(gradpress.get("topk", k=3), ErrorFeedback(), "k", g, buf) is None
    assert encode_with_feedback(gradpress.get("terngrad"), NoFeedback(), "k", g, buf) is None
    assert encode_with_feedback(gradpress.get("qsgd"), gradpress.feedback.EF21(), "k", g,
                                buf) is None
    assert encode_with_feedback(gradpress.get("qsgd"), NoFeedback(), "k", g.double(),
                                buf) is None
    assert not buf.any()


@pytest.mark.parametrize("bad", ["nan", "overflow", "small buffer"])
def test_fused_errors_leave_the_residual_untouched(bad):
    comp = gradpress.get("ecq", bits=2, norm="linf", bucket_size=64, entropy=False,
                         sparse=False)
    fb = ECQFeedback(0.5, 0.9)
    n = 1000
    buf = torch.zeros(comp.max_payload_bytes(n), dtype=torch.uint8)
    encode_with_feedback(comp, fb, "k", torch.randn(n), buf, seed=1)
    before = fb.state("k")["h"]
    g = torch.randn(n)
    if bad == "nan":
        g[17] = float("nan")
        err = NonFiniteGradientError
    elif bad == "overflow":
        g[3] = 3e38  # finite, but the bucket's scale overflows the encoder's limit
        err = ValueError
    else:
        buf = buf[:-1]
        err = ValueError
    with pytest.raises(err):
        encode_with_feedback(comp, fb, "k", g, buf, seed=2)
    assert torch.equal(fb.state("k")["h"], before)


ZOO = {**FUSED, "fp16": ("fp16", {}), "topk": ("topk", {"k": 7}),
       "terngrad clipped": ("terngrad", {}), "natural": ("natural_dithering", {})}


@pytest.mark.parametrize("crc", [False, True])
@pytest.mark.parametrize("label", list(ZOO))
def test_encode_into_and_decode_into_equal_encode_and_decode(label, crc):
    name, kw = ZOO[label]
    comp = gradpress.get(name, **kw)
    x = torch.randn(3001, generator=torch.Generator().manual_seed(4))
    want = dataclasses.replace(comp.encode(x, seed=9), crc=crc).to_bytes()
    buf = torch.full((comp.max_payload_bytes(x.numel()) + 4,), 0xAA, dtype=torch.uint8)
    view = comp.encode_into(buf, x, seed=9, crc=crc)
    assert view.to_bytes() == want
    dec = comp.decode(want).float()
    out = torch.full_like(x, 7.0)
    assert comp.decode_into(out, view) is out
    assert torch.equal(out, dec)
    base = torch.randn(x.numel())
    out = base.clone()
    comp.decode_into(out, buf[:len(view)], add=True)
    assert torch.equal(out, base + dec)
    strided = torch.zeros(3001, 2)[:, 0]  # not contiguous: the generic writer
    assert torch.equal(comp.decode_into(strided, want), dec)
    with pytest.raises(PayloadError):
        comp.decode_into(torch.zeros(3, 1000), want)  # 3000 elements, the payload holds 3001


def _corruptions(comp, x: torch.Tensor) -> dict[str, bytes]:
    raw = comp.encode(x, seed=1).to_bytes()
    hs = len(raw) - len(comp.encode(x, seed=1).body)
    out = {"truncated": raw[:-1], "extended": raw + b"\0", "empty": b"",
           "other compressor": gradpress.get("fp16").encode(x).to_bytes()}
    if comp.name == "sign":
        nb = -(-x.numel() // comp.bucket_size)
        pad = bytearray(raw)
        pad[-1] |= 1  # 1001 bits: the last byte has 7 padding bits
        out["nonzero padding"] = bytes(pad)
        nan = bytearray(raw)
        nan[hs:hs + 4] = np.array([np.nan], dtype=">f4").tobytes()
        out["nan scale"] = bytes(nan)
        assert nb >= 1
    else:
        sym = bytearray(raw)
        nb = -(-x.numel() // (comp.bucket_size or x.numel()))
        sym[hs + 1 + 4 * nb] = 0xFF  # ternary: symbol 3 is outside 0..2
        out["symbol out of range"] = bytes(sym)
        neg = bytearray(raw)
        neg[hs + 1:hs + 5] = np.array([-1.0], dtype=">f4").tobytes()
        out["negative scale"] = bytes(neg)
    crc = bytearray(dataclasses.replace(comp.encode(x, seed=1), crc=True).to_bytes())
    crc[-1] ^= 1
    out["crc mismatch"] = bytes(crc)
    return out


@pytest.mark.parametrize("name,kw", [("ecq", {"s": 1, "entropy": False, "sparse": False,
                                              "bucket_size": 128}),
                                     ("terngrad", {"clip": None}), ("sign", {})])
def test_bad_payloads_raise_and_leave_out_untouched(name, kw):
    comp = gradpress.get(name, **kw)
    x = torch.randn(1001, generator=torch.Generator().manual_seed(2))
    for what, raw in _corruptions(comp, x).items():
        out = torch.arange(1001, dtype=torch.float32)
        for add in (False, True):
            with pytest.raises(PayloadError):
                comp.decode_into(out, raw, add=add)
            assert torch.equal(out, torch.arange(1001, dtype=torch.float32)), what


# -- the hook on a real 2-rank group ----------------------------------------------------
class _Bucket:
    """What the hook reads of a ``dist.GradBucket``."""

    def __init__(self, buf: torch.Tensor, index: int, last: bool) -> None:
        self._buf, self._index, self._last = buf, index, last

    def buffer(self) -> torch.Tensor:
        return self._buf

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last


HOOK_CASES = {"ecq dense + ECQ": ("ecq", {"bits": 2, "norm": "linf", "bucket_size": 512,
                                          "entropy": False, "sparse": False}, "ecq"),
              "sign + EF": ("sign", {}, "ef"),
              "qsgd dense": ("qsgd", {"s": 3, "sparse": False}, "none")}
SIZES = (20000, 7001)  # two buckets


def _rss_bytes() -> int:
    """This process's resident set now (``/proc/self/statm``, pages times the page size)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hook_run(rank: int, steps: int) -> dict:
    """Every case on the fused path (``on_nonfinite="raise"``), then on the generic path
    (``"skip"``). Growth is the resident set's, between step 3 and the last step: not
    tracemalloc, because a process tracing its allocations while gloo's threads run has
    crashed (SIGSEGV) on both paths; the single-process control below uses tracemalloc."""
    from gradpress.ddp import CompressionState, compression_hook

    out: dict = {label: {} for label in HOOK_CASES}
    for mode, (label, (name, kw, fb)), collective in itertools.product(
            ("raise", "skip"), HOOK_CASES.items(), ("allgather", "two_phase")):
        state = CompressionState(None, compressor=name, compressor_kwargs=kw,
                                 feedback=gradpress.feedback.get(fb), seed=5,
                                 on_nonfinite=mode, history_len=2, collective=collective)
        owned = state._buffers if collective == "allgather" else state._shard_buffers
        gen = torch.Generator().manual_seed(10 + rank)
        bufs = [torch.empty(n) for n in SIZES]
        noise = [torch.empty(n) for n in SIZES]
        ptrs, outs, grown, start = [], [], 0, 0
        for step in range(steps):
            for b, z in zip(bufs, noise):
                torch.randn(b.numel(), generator=gen, out=z)
                b.copy_(z).mul_(1e-2)
            if step == 3:
                start = _rss_bytes()
            futs = [compression_hook(state, _Bucket(b, i, i == len(bufs) - 1))
                    for i, b in enumerate(bufs)]
            for f in futs:
                f.wait()
            if step == steps - 1:  # before this test records anything
                grown = _rss_bytes() - start
            if step in (3, steps - 1):
                ptrs.append({i: b.data_ptrs() for i, b in owned.items()}
                            | {"h": [t.data_ptr() for f in (state.feedback,
                                                            state.server_feedback)
                                     for k in f.keys() for t in f._state[k].values()]})
            if step < 3 or step == steps - 1:
                outs.append(torch.cat(bufs).numpy().tobytes())
        out[label][collective, mode] = {"ptrs": ptrs, "outs": outs, "grown": grown,
                                        "payload": state.last_step.payload_bytes}
    return out


@pytest.fixture(scope="module")
def hook_runs() -> dict[int, dict]:
    res, _ = run_ranks(_hook_run, 2, 100, deadline=240, pg_timeout=30)
    for r in res.values():
        assert "error" not in r, r.get("trace")
    return res


COLLECTIVES = ("allgather", "two_phase")


@pytest.mark.parametrize("collective", COLLECTIVES)
@pytest.mark.parametrize("label", list(HOOK_CASES))
def test_fused_hook_hands_ddp_the_generic_paths_floats(hook_runs, label, collective):
    for r in (0, 1):
        fused = hook_runs[r][label][collective, "raise"]
        generic = hook_runs[r][label][collective, "skip"]
        assert fused["outs"] == generic["outs"], f"rank {r}"
        assert fused["payload"] == generic["payload"]
    assert (hook_runs[0][label][collective, "raise"]["outs"]
            == hook_runs[1][label][collective, "raise"]["outs"])


@pytest.mark.parametrize("collective", COLLECTIVES)
@pytest.mark.parametrize("label", list(HOOK_CASES))
def test_hook_buffers_stay_put_and_nothing_grows_over_100_steps(hook_runs, label,
                                                               collective):
    for r in (0, 1):
        run = hook_runs[r][label][collective, "raise"]
        first, last = run["ptrs"]
        assert first == last, f"rank {r}: a buffer moved between step 3 and step 99"
        assert first["h"] or label.startswith("qsgd")
        # 97 steps that each kept a bucket-sized temporary (80 KB) would grow it by ~8 MB
        assert run["grown"] < 1 << 20, f"rank {r}: resident set grew {run['grown']} bytes"


def test_the_allocation_measurement_sees_the_generic_paths_temporaries():
    """The control of the bound above: the same tracemalloc measure, on one bucket in this
    process, is far above it for the generic step and under it for the fused one."""
    import tracemalloc

    from gradpress.ddp import hook

    name, kw, _ = HOOK_CASES["ecq dense + ECQ"]
    comp = gradpress.get(name, **kw)
    g = torch.randn(SIZES[0]) * 1e-2
    buf = torch.zeros(comp.max_payload_bytes(g.numel()), dtype=torch.uint8)
    ws, peaks = Workspace(), {}
    for what in ("generic", "fused", "generic", "fused"):  # the second round counts
        fb = ECQFeedback(0.5, 0.9)
        tracemalloc.start()
        if what == "generic":
            hook._compress_own(comp, fb, "0", g, 1)
        else:
            encode_with_feedback(comp, fb, "0", g, buf, seed=1, ws=ws)
        peaks[what] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks["generic"] > 64 * 1024 > 32 * 1024 > peaks["fused"], peaks
