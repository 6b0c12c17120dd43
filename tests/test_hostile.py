"""Hostile bytes: every decoder, fed truncated, extended, bit-flipped or random bodies,
raises PayloadError or returns a finite tensor of the declared shape; never anything else."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradpress
from gradpress.errors import PayloadError
from gradpress.payload import Payload

NAMES = gradpress.available()
SHAPE = (20, 10)


def _valid(name: str) -> Payload:
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    return gradpress.get(name).encode(x, seed=9)


def _decode_or_reject(name: str, p: Payload, shape=SHAPE) -> None:
    try:
        y = gradpress.get(name).decode(Payload.from_bytes(p.to_bytes()))
    except PayloadError:
        return
    assert y.shape == torch.Size(shape)
    assert bool(torch.isfinite(y).all()), "decoded a non-finite tensor from corrupt bytes"


def _with_body(p: Payload, body: bytes, shape=None) -> Payload:
    return Payload(p.compressor_id, p.dtype, shape or p.shape, body, p.seed, p.crc)


@pytest.mark.parametrize("name", NAMES)
def test_every_truncated_body_is_rejected_or_finite(name):
    p = _valid(name)
    for n in range(len(p.body)):
        _decode_or_reject(name, _with_body(p, p.body[:n]))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("extra", [b"\x00", b"\xff" * 3, b"\x00" * 64])
def test_extended_body_raises(name, extra):
    p = _valid(name)
    with pytest.raises(PayloadError):
        gradpress.get(name).decode(_with_body(p, p.body + extra))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_bit_flipped_body_is_rejected_or_finite(name, data):
    p = _valid(name)
    if not p.body:
        return
    body = bytearray(p.body)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, 8 * len(body) - 1))
        body[i // 8] ^= 1 << (i % 8)
    _decode_or_reject(name, _with_body(p, bytes(body)))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=600))
def test_random_body_is_rejected_or_finite(name, body):
    _decode_or_reject(name, _with_body(_valid(name), body))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1,), (2000,), (3, 7, 11)])
def test_body_under_a_lying_shape_is_rejected_or_finite(name, shape):
    p = _valid(name)
    _decode_or_reject(name, _with_body(p, p.body, shape), shape)


def test_no_pickle_or_eval_on_the_wire_path():
    import pathlib

    root = pathlib.Path(gradpress.__file__).parent
    for f in list((root / "codec").glob("*.py")) + list((root / "compressors").glob("*.py")) + [
            root / "payload.py"]:
        text = f.read_text()
        for banned in ("pickle", "eval(", "exec(", "torch.load"):
            assert banned not in text, f"{banned} in {f.name}"
