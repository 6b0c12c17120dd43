"""Sparse Dithering's compiled kernels (``sd_writer``): the bytes do not depend on the block
split or the thread count, the parallel writer and reader agree with each other across block
boundaries (long unary codes included), and corrupt multi-block bodies are rejected."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradpress
from gradpress.compressors import sparse_dithering as sdm
from gradpress.errors import PayloadError
from gradpress.kernels import level_codec as lvl


def _vectors(d: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(d)
    return [torch.randn(d, generator=g),
            torch.round(torch.randn(d, generator=g) * 4) / 4,  # many equal gains: sort ties
            torch.where(torch.rand(d, generator=g) < 0.9, 0.0, torch.randn(d, generator=g)),
            torch.randn(d, generator=g) ** 3]


def _small_blocks(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(sdm, "CHUNK", 29 * 3)
    mp.setattr(lvl, "CHUNK", 29 * 2)


@pytest.mark.parametrize("name", ["sparse_dithering", "sparse_dithering_rand"])
def test_bytes_do_not_depend_on_blocks_or_threads(name):
    c = gradpress.get(name)
    xs = _vectors(3001)
    ref = [c.encode(x, seed=4).to_bytes() for x in xs]
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        _small_blocks(mp)
        try:
            for n in (1, max(2, threads)):
                torch.set_num_threads(n)
                for x, want in zip(xs, ref):
                    p = c.encode(x, seed=4).to_bytes()
                    assert p == want
                    assert torch.equal(c.decode(p), gradpress.get(name).decode(want))
        finally:
            torch.set_num_threads(threads)


def test_streaming_search_equals_the_reference_with_ties_across_blocks():
    c = gradpress.get("sparse_dithering", nu=0.1)
    with pytest.MonkeyPatch.context() as mp:
        _small_blocks(mp)
        for x in _vectors(2000):
            assert c._encode_streaming(x) == sdm.encode_levels(*c._levels(x), False)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int64])
def test_long_codes_round_trip_across_blocks(dtype):
    rng = np.random.default_rng(1)
    d = 1000
    k = rng.integers(0, 120, d) * (rng.random(d) < 0.5)
    k[::97] = 0
    k[5] = 300 if dtype != np.uint8 else 255  # longer than one 64-bit window
    neg = rng.standard_normal(d).astype(np.float32)
    with pytest.MonkeyPatch.context() as mp:
        _small_blocks(mp)
        body = lvl.write_levels(0.5, k.astype(dtype), neg)
        scale, levels = lvl.decode_levels(body, d, "test")
    assert scale == 0.5
    assert levels.tolist() == np.where(neg < 0, -k, k).tolist()
    assert 8 * len(body) - (33 + lvl.trit_bits(d) + int(k.sum())) in range(8)
    assert body == lvl.write_levels(0.5, k.astype(dtype), neg)  # default blocks: same bytes


def test_corrupt_multi_block_bodies_are_rejected_or_finite():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(2))
    c = gradpress.get("sparse_dithering")
    body = c.encode(x).body
    rng = np.random.default_rng(3)
    with pytest.MonkeyPatch.context() as mp:
        _small_blocks(mp)
        for n in range(0, len(body), 97):  # truncated
            with pytest.raises(PayloadError):
                lvl.decode_values(body[:n], 5000, "test")
        for _ in range(200):  # bit flips
            bad = bytearray(body)
            i = int(rng.integers(0, 8 * len(bad)))
            bad[i // 8] ^= 1 << (i % 8)
            try:
                y = lvl.decode_values(bytes(bad), 5000, "test")
            except PayloadError:
                continue
            assert y.shape == (5000,) and bool(torch.isfinite(y).all())
        with pytest.raises(PayloadError):
            lvl.decode_values(body, 50_000, "test")  # a lying length
