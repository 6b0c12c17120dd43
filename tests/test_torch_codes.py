"""The device-resident fixed-width codes (``kernels.torch_codes``), forced on CPU with
``GRADPRESS_TORCH_CODES=1``: the hash, the rounding and the packing give the numba kernels'
bytes exactly, and decoding through torch gives the numba decoder's floats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradpress
from gradpress.codec.packing import pack_uint8, unpack_uint8
from gradpress.errors import PayloadError
from gradpress.kernels import quantize as fc
from gradpress.kernels import torch_codes as tc

EDGE = [0, 1, 2, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0x80000001,
        0xFFFFFFFE, 0xFFFFFFFF, 0x12345678, 0x9E3779B9]
RANDOM = np.random.default_rng(0).integers(0, 1 << 32, 1000, dtype=np.uint64).tolist()

# (spec, kwargs): dense-only configs are device-resident end to end; the others also try
# the host-side codes but pack their dense code and quantize with torch ops.
CASES = [
    ("sign", {"bucket_size": 512}), ("sign", {"bucket_size": 7}), ("sign", {"bucket_size": None}),
    ("qsgd", {"s": 1, "bucket_size": 512, "sparse": False}),
    ("qsgd", {"s": 4, "bucket_size": 100, "sparse": False}),
    ("qsgd", {"s": 7, "bucket_size": None, "sparse": False}),
    ("qsgd", {"s": 15, "bucket_size": 33, "sparse": False}),
    ("qsgd", {"s": 127, "bucket_size": 512, "sparse": False}),
    ("qsgd", {"s": 4, "bucket_size": 512}),
    ("ecq", {"s": 1, "norm": "linf", "bucket_size": None, "entropy": False, "sparse": False}),
    ("ecq", {"s": 3, "norm": "l2", "bucket_size": 64, "entropy": False, "sparse": False}),
    ("ecq", {"s": 4, "norm": "linf", "bucket_size": 333, "entropy": False, "sparse": False}),
    ("ecq", {"s": 31, "norm": "l2", "bucket_size": None, "entropy": False, "sparse": False}),
    ("ecq", {"s": 63, "norm": "linf", "bucket_size": 1000, "entropy": False, "sparse": False}),
    ("ecq", {"s": 4, "norm": "linf"}),
    ("terngrad", {}), ("terngrad", {"bucket_size": 50, "clip": None}),
    ("natural_dithering", {"s": 7, "bucket_size": 512}),
]
LENGTHS = [1, 13, 1001, 4099]


def lowbias32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _as_i32(values: list[int]) -> torch.Tensor:
    return torch.tensor(np.array(values, dtype=np.uint64).astype(np.uint32).view(np.int32))


def _encode_both(spec, kwargs, x, seed, monkeypatch):
    c = gradpress.get(spec, **kwargs)
    monkeypatch.delenv(tc.ENV_VAR, raising=False)
    want = c.encode(x, seed=seed).to_bytes()
    monkeypatch.setenv(tc.ENV_VAR, "1")
    got = c.encode(x, seed=seed).to_bytes()
    return c, want, got


def test_hash_equals_the_kernels_lowbias32_on_edge_and_random_words():
    words = EDGE + RANDOM
    got = tc.mix32_(_as_i32(words)).numpy().view(np.uint32)
    want = np.array([fc._mix32(np.uint32(w)) for w in words], dtype=np.uint32)
    textbook = np.array([lowbias32(w) for w in words], dtype=np.uint32)
    assert np.array_equal(want, textbook)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("seed", [0, 1, 7, 2**63 + 5, 2**64 - 1])
def test_dither_equals_the_kernels_dither_at_every_index(seed):
    k0, k1 = fc.stream_keys(seed)
    for offset in (0, 2**31 - 300):  # the top of the index range too
        got = tc.dither(300, int(k0), int(k1), offset).numpy()
        want = np.array([fc._dither(offset + i, k0, k1) for i in range(300)], np.float32)
        assert got.dtype == np.float32 and np.array_equal(got, want)


@pytest.mark.parametrize("width", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1003, 70001])
def test_pack_equals_the_numba_packer_and_unpack_inverts_it(width, n):
    v = np.random.default_rng(width * n).integers(0, 1 << width, n).astype(np.uint8)
    want = pack_uint8(v, width)
    got = tc.pack(torch.from_numpy(v), width).numpy()
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    assert np.array_equal(tc.unpack(torch.from_numpy(want), n, width).numpy(),
                          unpack_uint8(want, n, width))
    assert np.array_equal(tc.unpack(torch.from_numpy(want), n, width).numpy(), v)


def test_sign_bits_are_numpys_packbits():
    x = torch.randn(10001)
    x[::5] = 0.0  # sgn(0) = +1: bit 0
    assert np.array_equal(tc.pack_signs(x).numpy(), np.packbits((x < 0).numpy()))


def test_float32_big_endian_bytes():
    v = torch.tensor([1.0, -2.5, 3.4e38, 1e-45, 0.0])
    assert tc.float32_be(v).numpy().tobytes() == v.numpy().astype(">f4").tobytes()


@pytest.mark.parametrize("spec,kwargs", CASES)
def test_forced_torch_path_sends_the_numba_bytes(spec, kwargs, monkeypatch):
    for n in LENGTHS:
        x = torch.randn(n, generator=torch.Generator().manual_seed(n))
        for seed in (0, 1, 2**64 - 1):
            c, want, got = _encode_both(spec, kwargs, x, seed, monkeypatch)
            assert got == want, (spec, kwargs, n, seed)


@pytest.mark.parametrize("spec,kwargs", CASES)
def test_forced_torch_path_decodes_to_the_numba_floats(spec, kwargs, monkeypatch):
    for n in LENGTHS:
        x = 3 * torch.randn(n, generator=torch.Generator().manual_seed(n + 1))
        c, wire, _ = _encode_both(spec, kwargs, x, 3, monkeypatch)
        monkeypatch.delenv(tc.ENV_VAR)
        want = c.decode(wire)
        want_pair = c.encode_decoded(x, seed=3)
        monkeypatch.setenv(tc.ENV_VAR, "1")
        got = c.decode(wire)
        got_pair = c.encode_decoded(x, seed=3)
        assert torch.equal(got, want), (spec, kwargs, n)
        assert got_pair[0].to_bytes() == want_pair[0].to_bytes() == wire
        assert torch.equal(got_pair[1], want_pair[1]) and torch.equal(got_pair[1], want)


@pytest.mark.parametrize("spec,kwargs", [CASES[1], CASES[4], CASES[11], CASES[15]])
def test_chunk_boundaries_do_not_change_the_bytes(spec, kwargs, monkeypatch):
    """Tiny chunks: every block split (pieces of a bucket, several buckets, a short tail)
    and every packing step boundary is exercised on a small tensor."""
    x = torch.randn(5003, generator=torch.Generator().manual_seed(9))
    c, want, _ = _encode_both(spec, kwargs, x, 11, monkeypatch)
    monkeypatch.delenv(tc.ENV_VAR)
    dec = c.decode(want)
    monkeypatch.setenv(tc.ENV_VAR, "1")
    for chunk in (8, 40, 1000):
        monkeypatch.setattr(tc, "_CPU_CHUNK", chunk)
        assert c.encode(x, seed=11).to_bytes() == want, chunk
        assert torch.equal(c.decode(want), dec), chunk


def test_forced_dense_path_never_calls_the_numba_kernels(monkeypatch):
    def forbidden(*args):
        raise AssertionError("numba kernel called on the torch path")

    x = torch.randn(2000)
    c = gradpress.get("ecq", bucket_size=128, entropy=False, sparse=False)
    want = c.encode(x, seed=2).to_bytes()
    monkeypatch.setenv(tc.ENV_VAR, "1")
    for k in (fc._quantize, fc._dequantize):
        monkeypatch.setattr(k, "parallel", forbidden)
        monkeypatch.setattr(k, "serial", forbidden)
    monkeypatch.setattr("gradpress.codec.bits.pack_uint8", forbidden)
    assert c.encode(x, seed=2).to_bytes() == want
    c.decode(want)


@pytest.mark.parametrize("spec,kwargs", [CASES[1], CASES[4], CASES[15]])
def test_forced_torch_decoder_rejects_bad_bodies_like_the_numba_one(spec, kwargs,
                                                                    monkeypatch):
    x = torch.randn(1001)
    c, wire, _ = _encode_both(spec, kwargs, x, 0, monkeypatch)
    p = gradpress.Payload.from_bytes(wire)
    bad = [p.body[:-1], p.body + b"\0"]
    if spec != "sign":  # a symbol past the grid: every field all ones
        bad.append(p.body[:1 + 4 * fc.n_buckets(1001, c.bucket_size)] +
                   b"\xff" * (len(p.body) - 1 - 4 * fc.n_buckets(1001, c.bucket_size)))
    if (1001 * getattr(c, "width", 1)) % 8:  # a set padding bit
        bad.append(p.body[:-1] + bytes([p.body[-1] | 1]))
    for env in ("0", "1"):
        monkeypatch.setenv(tc.ENV_VAR, env)
        for body in bad:
            forged = gradpress.Payload(p.compressor_id, p.dtype, p.shape, body, p.seed,
                                       p.crc, p.config_digest)
            with pytest.raises(PayloadError):
                c.decode(forged)


def test_environment_variable_is_read_at_call_time(monkeypatch):
    monkeypatch.delenv(tc.ENV_VAR, raising=False)
    assert not tc.use_torch_codes("cpu")
    monkeypatch.setenv(tc.ENV_VAR, "0")
    assert not tc.use_torch_codes(torch.device("cpu"))
    monkeypatch.setenv(tc.ENV_VAR, "1")
    assert tc.use_torch_codes("cpu")
    assert tc.use_torch_codes("meta")  # any non-CPU device
