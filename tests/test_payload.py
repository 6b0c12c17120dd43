"""Payload wire format: exact layout, and every malformed input rejected."""

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradpress.errors import PayloadError
from gradpress.payload import FORMAT_VERSION, MAX_NUMEL, Payload, header_size

shapes = st.lists(st.integers(0, 50), min_size=0, max_size=4).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])


@settings(max_examples=80, deadline=None)
@given(shapes, dtypes, st.binary(max_size=64), st.one_of(st.none(), st.integers(0, 2**64 - 1)),
       st.booleans())
def test_payload_round_trips(shape, dtype, body, seed, crc):
    p = Payload(7, dtype, shape, body, seed, crc)
    raw = p.to_bytes()
    assert len(raw) == len(p) == header_size(len(shape), seed=seed is not None, crc=crc) + len(
        body)
    assert Payload.from_bytes(raw) == p


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=80))
def test_random_bytes_raise_payload_error_or_parse(raw):
    try:
        p = Payload.from_bytes(raw)
    except PayloadError:
        return
    assert p.to_bytes() == raw


def _sample(crc=False) -> bytes:
    return Payload(5, torch.float32, (3, 4), b"abcdefgh", seed=42, crc=crc).to_bytes()


def test_every_truncation_raises():
    raw = _sample()
    for n in range(len(raw)):
        with pytest.raises(PayloadError):
            Payload.from_bytes(raw[:n])


def test_extended_payload_raises():
    with pytest.raises(PayloadError, match="extended"):
        Payload.from_bytes(_sample() + b"\x00")


def test_crc_detects_every_single_bit_flip():
    raw = _sample(crc=True)
    for i in range(8 * len(raw)):
        flipped = bytearray(raw)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(PayloadError):
            Payload.from_bytes(bytes(flipped))


def test_header_declaring_huge_tensor_is_rejected_before_allocating():
    head = b"GP" + struct.pack("<BBHHBB", FORMAT_VERSION, 0, 5, 0, 0, 2)
    head += struct.pack("<II", 2**31, 2**31)
    raw = head + struct.pack("<I", 0)
    with pytest.raises(PayloadError, match="limit"):
        Payload.from_bytes(raw)
    assert 2**62 > MAX_NUMEL


@pytest.mark.parametrize("field,value,match", [(0, b"XX", "magic"), (2, b"\x09", "version"),
                                               (3, b"\x80", "flags"), (8, b"\x09", "dtype"),
                                               (9, b"\x09", "dimensions")])
def test_bad_header_fields_are_named(field, value, match):
    raw = bytearray(_sample())
    raw[field:field + len(value)] = value
    with pytest.raises(PayloadError, match=match):
        Payload.from_bytes(bytes(raw))


def test_read_header_needs_no_body_and_declares_the_size():
    from gradpress.payload import read_header

    raw = _sample(crc=True)
    head = read_header(raw[:header_size(2, seed=True, crc=True)])  # header only, body absent
    assert (head.compressor_id, head.dtype, head.shape, head.seed, head.crc) == (
        5, torch.float32, (3, 4), 42, True)
    assert head.size == len(raw) and head.numel == 12
    with pytest.raises(PayloadError, match="magic"):
        read_header(b"\x00" * 20)


def test_header_layout_is_pinned_byte_for_byte():
    """Format version 2: the 2-byte config digest sits after the compressor id."""
    p = Payload(5, torch.float16, (3, 4), b"xy", seed=None, crc=False, config_digest=0xBEEF)
    raw = p.to_bytes()
    assert raw == (b"GP" + bytes([FORMAT_VERSION, 0]) + struct.pack("<HHBB", 5, 0xBEEF, 1, 2)
                   + struct.pack("<III", 3, 4, 2) + b"xy")
    assert header_size(2) == 14 + 4 * 2 == len(raw) - 2
    assert header_size(1, seed=True, crc=True) == 14 + 4 + 8 + 4
    assert Payload.from_bytes(raw).config_digest == 0xBEEF


def test_version_1_payload_is_rejected_naming_both_versions():
    raw = bytearray(_sample())
    raw[2] = 1
    with pytest.raises(PayloadError, match=f"version 1.*reads {FORMAT_VERSION}"):
        Payload.from_bytes(bytes(raw))
