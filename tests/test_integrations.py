"""The Accelerate and Lightning examples run on 2 CPU processes with a gradpress DDP hook
(skipped when the optional package is not installed: ``pip install -e '.[accelerate]'``,
``'.[lightning]'``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1])


def test_accelerate_example_trains_with_compressed_hook():
    pytest.importorskip("accelerate", reason="accelerate not installed (extra 'accelerate')")
    out = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "examples/accelerate_ddp.py", "--steps", "12"], timeout=240)
    assert out["processes"] == 2 and out["steps"] == 12
    assert out["last_loss"] < out["first_loss"]
    # 2-bit ECQ: the payload is far below the fp32 gradient (the hook really ran)
    assert 0 < out["payload_bytes_per_step"] < out["fp32_bytes_per_step"] / 8


def test_lightning_example_registers_hook_on_cpu():
    pytest.importorskip("lightning", reason="lightning not installed (extra 'lightning')")
    out = _run(["examples/lightning_ddp.py", "--steps", "12"], timeout=240)
    assert out["steps"] == 12  # the callback's hook ran on every step, on CPU
    assert 0 < out["payload_bytes_per_step"] < out["fp32_bytes_per_step"] / 8
