"""The compiled CPU kernels: the dither stream, the rounding step against its torch twin,
thread-count independence and concurrent callers."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradpress
from gradpress.kernels import quantize as fc

M32 = 0xFFFFFFFF


def lowbias32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x7FEB352D) & M32
    h ^= h >> 15
    h = (h * 0x846CA68B) & M32
    return h ^ (h >> 16)


@given(st.integers(0, 2**31 - 1), st.integers(0, 2**64 - 1))
@settings(max_examples=200, deadline=None)
def test_dither_equals_the_textbook_hash(i, seed):
    k0, k1 = fc.stream_keys(seed)
    want = (lowbias32(lowbias32(i ^ int(k0)) ^ int(k1)) >> 8) * 2.0**-24
    assert fc._dither(i, k0, k1) == want


def test_dither_stream_is_uniform_and_seed_dependent():
    x = torch.full((1 << 16,), 0.5)  # one bucket, u = 0.5 * 1 + 0: frac 0.5 everywhere
    _, a = fc.scaled_quantize(x, None, "linf", 1.0, 0.0, 2, seed=1, gen=None)
    _, b = fc.scaled_quantize(x, None, "linf", 1.0, 0.0, 2, seed=2, gen=None)
    # frac(u) = 1 everywhere (u = 1.0 exactly): nothing rounds, every symbol is 1
    assert int(a.sum()) == x.numel() and int(b.sum()) == x.numel()
    y = torch.full((1 << 16,), 0.25)
    y[0] = 1.0  # linf scale 1: u = 0.25, rounds up with probability 1/4
    _, a = fc.scaled_quantize(y, None, "linf", 1.0, 0.0, 2, seed=1, gen=None)
    _, b = fc.scaled_quantize(y, None, "linf", 1.0, 0.0, 2, seed=2, gen=None)
    n = y.numel() - 1
    for s in (a, b):
        p = float(s[1:].float().mean())
        assert abs(p - 0.25) < 5 * (0.25 * 0.75 / n) ** 0.5
    assert not torch.equal(a, b)


@pytest.mark.parametrize("norm,gain,c,levels", [("l2", 4.0, 4.0, 9), ("linf", 1.5, 1.5, 4)])
def test_kernel_rounding_is_unbiased(norm, gain, c, levels):
    """The CPU kernel's rounding is unbiased (the torch path on other devices sends the
    same bytes: ``test_torch_codes.py``)."""
    torch.manual_seed(0)
    x = torch.randn(3000)
    b = 256
    runs = 400
    acc_k = torch.zeros_like(x)
    for seed in range(runs):
        scale, sym = fc.scaled_quantize(x, b, norm, gain, c, levels, seed, gen=None)
        inv = scale / gain
        acc_k += fc.affine_dequantize(sym, b, inv, c)
    step = float(fc.bucket_reduce(x, b, norm).max()) / gain  # grid step, an upper bound
    tol = 5 * step / 2 / runs**0.5
    assert float((acc_k / runs - x).abs().max()) < tol


def test_bytes_do_not_depend_on_the_thread_count():
    x = torch.randn(200_000)
    old = torch.get_num_threads()
    out = []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            out.append([gradpress.get(name).encode(x, seed=3).to_bytes()
                        for name in ("qsgd", "ecq", "terngrad")])
        finally:
            torch.set_num_threads(old)
    assert out[0] == out[1]


def test_concurrent_callers_take_turns_and_get_the_same_bytes():
    x = torch.randn(100_000)
    c = gradpress.get("ecq")
    want = c.encode(x, seed=5).to_bytes()
    got: list[bytes] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                got.append(c.encode(x, seed=5).to_bytes())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 20 and all(g == want for g in got)


@given(st.integers(1, 8), st.integers(0, 5000), st.data())
@settings(max_examples=60, deadline=None)
def test_dequantize_kernel_matches_the_formula(width, n, data):
    b = data.draw(st.integers(1, 600))
    sym = np.random.default_rng(n).integers(0, 1 << width, n).astype(np.uint8)
    inv = np.random.default_rng(b).standard_normal(fc.n_buckets(n, b)).astype(np.float32)
    got = fc.affine_dequantize(torch.from_numpy(sym), b, torch.from_numpy(inv), 1.5).numpy()
    want = ((sym.astype(np.float32) - np.float32(1.5)) *
            np.repeat(inv, b)[:n]) if n else np.zeros(0, np.float32)
    assert np.array_equal(got, want)


def test_one_torch_thread_runs_the_serial_build_and_never_wakes_the_pool(monkeypatch):
    from gradpress.kernels import jit as _jit

    def forbidden(*args):
        raise AssertionError("parallel build called with one torch thread")

    x = torch.randn(50_000)
    want = gradpress.get("ecq").encode(x, seed=1).to_bytes()
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k in (fc._quantize, fc._dequantize, fc._bucket_norms):
            monkeypatch.setattr(k, "parallel", forbidden)
        c = gradpress.get("ecq")
        p = c.encode(x, seed=1)
        c.decode(p)
        assert p.to_bytes() == want
    finally:
        torch.set_num_threads(old)
    assert isinstance(fc._quantize, _jit.Kernel)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 70001])
def test_sign_kernels_are_packbits_and_plus_minus_the_bucket_mean(n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    x[::3] = 0.0  # sgn(0) = +1: bit 0
    bits = fc.sign_bits(x)
    assert np.array_equal(bits, np.packbits((x < 0).numpy()))
    for b in (1, 7, 512, None):
        m = np.random.default_rng(n).random(fc.n_buckets(n, b)).astype(np.float32)
        want = np.where((x < 0).numpy(), -1.0, 1.0).astype(np.float32) * np.repeat(
            m, b or n)[:n]
        assert np.array_equal(fc.signs_times(bits, n, b, m).numpy(), want)


@pytest.mark.parametrize("width", range(1, 9))
def test_pack_into_a_given_buffer_writes_the_same_bytes(width):
    from gradpress.codec.packing import pack_uint8

    v = np.random.default_rng(width).integers(0, 1 << width, 1003).astype(np.uint8)
    want = pack_uint8(v, width)
    buf = np.full(want.size + 3, 0xAB, dtype=np.uint8)
    assert pack_uint8(v, width, out=buf[2:-1]) is not None
    assert np.array_equal(buf[2:-1], want) and (buf[:2] == 0xAB).all() and buf[-1] == 0xAB
    with pytest.raises(ValueError, match="out must be"):
        pack_uint8(v, width, out=buf)


# -- the on-disk cache across processes (numba issues #4807, #10128) ----------------------
_KMOD = '''
from gradpress.kernels.jit import compiled

@compiled
def triple(x):
    return 3 * x
'''


def _fresh_kernel(tmp_path, name: str, monkeypatch):
    import importlib
    import sys

    (tmp_path / f"{name}.py").write_text(_KMOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)  # removed again afterwards
    mod = importlib.import_module(name)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod.triple


def test_cache_load_and_save_wait_for_another_process_lock(tmp_path, monkeypatch):
    """A kernel's first call loads (and, after compiling, saves) its cache entry only under
    the exclusive lock beside numba's index: while another process holds that lock, the
    call waits at the lock and writes nothing; it finishes once the lock is free."""
    import fcntl
    import os
    import subprocess
    import sys

    from gradpress.kernels import jit

    disp = _fresh_kernel(tmp_path, "kmod_lock", monkeypatch)
    index = disp._cache._cache_file._index_path
    os.makedirs(os.path.dirname(index), exist_ok=True)
    held = os.open(index + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)  # "another process" (flock: per open file)
    at_lock = threading.Event()

    class Spy:
        LOCK_EX = fcntl.LOCK_EX

        @staticmethod
        def flock(fd, op):
            at_lock.set()
            fcntl.flock(fd, op)

    monkeypatch.setattr(jit, "fcntl", Spy)
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(disp(7)), daemon=True)
    t.start()
    try:
        assert at_lock.wait(30), "the first call never asked for the cache lock"
        t.join(0.5)
        assert t.is_alive() and not out and not os.path.exists(index)
    finally:
        os.close(held)
    t.join(60)
    assert out == [21] and os.path.exists(index)  # compiled, then saved under the lock
    # still a cache: a fresh interpreter loads that entry instead of compiling again
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import kmod_lock as m; "
            "assert m.triple(5) == 15; print(sum(m.triple.stats.cache_hits.values()))")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-800:]
    assert run.stdout.split()[-1] == "1"
