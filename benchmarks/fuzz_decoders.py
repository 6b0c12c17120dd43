"""Coverage-guided fuzzing of the wire path with atheris (not part of ``make test``).

    .venv/bin/pip install atheris
    .venv/bin/python benchmarks/fuzz_decoders.py -atheris_runs=200000

Feeds arbitrary bytes to ``Payload.from_bytes`` and, when a header parses, to the decoder of
the compressor it names (falling back to every registered compressor). Any exception other
than ``PayloadError``, or a decoded tensor that is non-finite or of the wrong shape, is a
crash that atheris reports with the input that caused it.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

import gradpress
from gradpress.compressors import class_for_id
from gradpress.errors import PayloadError
from gradpress.payload import Payload

COMPRESSORS = {gradpress.get(n).compressor_id: gradpress.get(n) for n in gradpress.available()}
# Keep fuzz inputs small: the header limit allows 2^31 elements, which is legal but slow.
MAX_FUZZ_NUMEL = 1 << 16


def test_one_input(data: bytes) -> None:
    try:
        p = Payload.from_bytes(data)
    except PayloadError:
        return
    if p.numel > MAX_FUZZ_NUMEL:
        return
    c = COMPRESSORS.get(p.compressor_id)
    if c is None:
        try:
            class_for_id(p.compressor_id)
        except KeyError:
            return
    # Past the config digest (random bytes match it once in 2^16), so the fuzzer reaches the
    # body decoders, which must stand on their own.
    p = dataclasses.replace(p, config_digest=c.config_digest(p.shape))
    try:
        y = c.decode(p)
    except PayloadError:
        return
    assert y.shape == torch.Size(p.shape), "decoded shape differs from the header"
    assert bool(torch.isfinite(y).all()), "decoded non-finite values"


def main() -> None:
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
