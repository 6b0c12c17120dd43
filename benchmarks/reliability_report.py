"""Write RELIABILITY.md: every fault and bad input tried, how many cases, and the outcome.

    python benchmarks/reliability_report.py            # writes RELIABILITY.md
    python benchmarks/reliability_report.py --quick    # fewer random cases

Outcomes are counted, never assumed. Faults the format can detect (a truncated or extended
body, a shape that lies, a truncated payload, a decoder configured differently, any flip
under the CRC) pass only with ``PayloadError``: a finite tensor is a failure. Bit flips and
random bytes inside a body pass with ``PayloadError`` or a finite tensor of the declared
shape (corruption that is undetectable without a CRC; ``tests/test_hostile.py`` names the
fields). Anything else is a failure and is listed. Distributed faults
(dead peer, non-finite skip, exact resume) are run as their pytest tests and reported with
their pass/fail counts. A summary table (one row per fault or input, cases summed over the
compressors; one row per distributed fault test) opens the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import gradpress
from gradpress.errors import NonFiniteGradientError, PayloadError
from gradpress.payload import FORMAT_VERSION, Payload

ROOT = Path(__file__).resolve().parent.parent


#: Faults the format detects: a finite tensor is a failure there.
STRICT = ("truncated body (every length)", "extended body", "body under a lying shape",
          "truncated whole payload", "decoded by another config", "2^30 elements, tiny body",
          "1-bit flip anywhere, CRC on")
#: A differently configured decoder per compressor (the payload carries a config digest).
OTHER_CONFIG = {"qsgd": {"s": 2}, "ecq": {"s": 8}, "terngrad": {"bucket_size": 64},
                "natural_dithering": {"s": 3}, "natural": {"exponent_range": True},
                "sign": {"bucket_size": 128}, "topk": {"ratio": 0.02},
                "randk": {"ratio": 0.02}, "powersgd": {"rank": 2}, "spherical": {"bits": 8},
                "sparse_dithering": {"nu": 0.2}, "sparse_dithering_rand": {"omega": 0.25},
                "fp16": {"scaled": True}}


def _outcome(fn, strict: bool = False) -> str:
    try:
        y, shape = fn()
    except PayloadError:
        return "PayloadError"
    except Exception as e:  # noqa: BLE001 - the report counts every other exception
        return f"FAIL {type(e).__name__}: {e}"[:160]
    if strict:
        return "FAIL decoded a detectable fault"
    if y.shape != torch.Size(shape):
        return f"FAIL wrong shape {tuple(y.shape)}"
    if not bool(torch.isfinite(y).all()):
        return "FAIL non-finite output"
    return "finite tensor"


def _decode_case(name: str, p: Payload, body: bytes, shape=None, kw: dict | None = None):
    q = dataclasses.replace(p, body=body, shape=shape or p.shape)

    def run():
        return gradpress.get(name, **(kw or {})).decode(Payload.from_bytes(q.to_bytes())), q.shape
    return run


def corrupt_bytes_cases(name: str, n_random: int, rng: np.random.Generator) -> dict[str, Counter]:
    x = torch.randn(40, 25, generator=torch.Generator().manual_seed(0))
    p = gradpress.get(name).encode(x, seed=3)
    body = p.body
    out: dict[str, Counter] = {}
    out["truncated body (every length)"] = Counter(
        _outcome(_decode_case(name, p, body[:n]), True) for n in range(len(body)))
    out["extended body"] = Counter(
        _outcome(_decode_case(name, p, body + bytes(rng.integers(0, 256, k, dtype=np.uint8))),
                 True)
        for k in (1, 2, 7, 64))
    flips = Counter()
    for _ in range(n_random):
        b = bytearray(body)
        for i in rng.integers(0, 8 * max(1, len(b)), size=int(rng.integers(1, 5))):
            if b:
                b[i // 8] ^= 1 << (i % 8)
        flips[_outcome(_decode_case(name, p, bytes(b)))] += 1
    out["bit-flipped body (1-4 flips)"] = flips
    out["random body"] = Counter(
        _outcome(_decode_case(name, p, rng.integers(0, 256, int(rng.integers(0, 2 * len(body)
                                                                               + 2)),
                                                    dtype=np.uint8).tobytes()))
        for _ in range(n_random))
    out["body under a lying shape"] = Counter(
        _outcome(_decode_case(name, p, body, s), True)
        for s in [(1,), (5000,), (3, 7, 11), (0,), (999,), (1001,), (25, 40)])
    big = (1 << 15, 1 << 15) if name == "powersgd" else (1 << 30,)
    out["2^30 elements, tiny body"] = Counter([_outcome(_decode_case(name, p, body, big), True)])
    if name in OTHER_CONFIG:
        out["decoded by another config"] = Counter(
            [_outcome(_decode_case(name, p, body, kw=OTHER_CONFIG[name]), True)])
    raw = p.to_bytes()
    out["truncated whole payload"] = Counter(
        _outcome(lambda n=n: (gradpress.get(name).decode(raw[:n]), p.shape), True)
        for n in range(0, len(raw), max(1, len(raw) // 64)))
    return out


def crc_cases(name: str, n: int, rng: np.random.Generator) -> Counter:
    """``n`` single-bit flips anywhere in a payload sent with ``crc=True`` (header included):
    every one must raise ``PayloadError``."""
    x = torch.randn(40, 25, generator=torch.Generator().manual_seed(1))
    raw = dataclasses.replace(gradpress.get(name).encode(x, seed=3), crc=True).to_bytes()
    out = Counter()
    for bit in rng.choice(8 * len(raw), size=min(n, 8 * len(raw)), replace=False):
        b = bytearray(raw)
        b[bit // 8] ^= 1 << (bit % 8)
        out[_outcome(lambda b=bytes(b): (gradpress.get(name).decode(Payload.from_bytes(b)),
                                         x.shape), True)] += 1
    return out


def input_cases(name: str) -> dict[str, str]:
    c = gradpress.get(name)
    res = {}
    for label, bad in [("NaN", float("nan")), ("+Inf", float("inf")), ("-Inf", -float("inf"))]:
        x = torch.randn(100)
        x[7] = bad
        before = x.clone()
        try:
            c.encode(x)
            res[label] = "FAIL accepted"
        except NonFiniteGradientError:
            same = torch.equal(torch.nan_to_num(x), torch.nan_to_num(before))
            res[label] = "NonFiniteGradientError" + ("" if same else " FAIL input mutated")
    shapes = {"empty": torch.zeros(0), "0-d": torch.tensor(1.5), "1-element": torch.ones(1),
              "non-contiguous": torch.randn(30, 20).t(), "fp16": torch.randn(300).half(),
              "bf16": torch.randn(300).bfloat16()}
    for label, x in shapes.items():
        try:
            y = c.compress(x, seed=1)
            ok = y.shape == x.shape and y.dtype == x.dtype and bool(torch.isfinite(y).all())
            res[label] = "round trip" if ok else "FAIL shape/dtype"
        except Exception as e:  # noqa: BLE001
            res[label] = f"FAIL {type(e).__name__}"
    try:
        c.encode(torch.arange(5))
        res["int64 tensor"] = "FAIL accepted"
    except ValueError:
        res["int64 tensor"] = "ValueError"
    return res


def huge_header_case() -> str:
    import struct

    raw = b"GP" + struct.pack("<BBHHBB", FORMAT_VERSION, 0, 1, 0, 0, 2) + struct.pack(
        "<III", 2**20, 2**20, 0)
    try:
        Payload.from_bytes(raw)
    except PayloadError:
        return "PayloadError (no allocation)"
    return "FAIL accepted"


def pytest_cases(selectors: list[str]) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """Run each test file; return ``(file, summary line, [(test, PASSED|FAILED|...)])``."""
    rows = []
    for sel in selectors:
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p",
                            "no:cacheprovider", sel], cwd=ROOT, capture_output=True, text=True)
        tests = []
        for ln in r.stdout.splitlines():
            word, _, rest = ln.partition(" ")
            if word in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL") and "::" in rest:
                tests.append((rest.split("::", 1)[1].split(" - ")[0], word))
        words = Counter(w for _, w in tests)
        summary = ", ".join(f"{v} {k.lower()}" for k, v in sorted(words.items()))
        rows.append((sel, f"{summary or 'no tests'}, exit code {r.returncode} "
                          f"({time.time() - t0:.0f} s)", tests))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="50 random cases instead of 300")
    ap.add_argument("--out", default=str(ROOT / "RELIABILITY.md"))
    args = ap.parse_args()
    n_random = 50 if args.quick else 300
    rng = np.random.default_rng(0)
    lines = ["# Reliability report", "",
             f"Made by `python benchmarks/reliability_report.py` on {datetime.date.today()} "
             f"({platform.machine()}, {platform.system()}, torch {torch.__version__}).", "",
             "## Corrupt bytes, per compressor", "",
             "Faults the format can detect (" + ", ".join(STRICT) + ") pass only with "
             "`PayloadError`. Bit flips and random bytes inside a body pass with "
             "`PayloadError` or a finite tensor of the declared shape (a flip the format "
             "cannot detect without its optional CRC). Every other outcome is a failure and "
             "is named.", "",
             "| compressor | fault | cases | PayloadError | finite tensor | failures |",
             "|---|---|---:|---:|---:|---|"]
    failures = 0
    summary: dict[str, Counter] = {}
    outcome_text: dict[str, str] = {}
    for name in gradpress.available():
        cases = corrupt_bytes_cases(name, n_random, rng)
        cases["1-bit flip anywhere, CRC on"] = crc_cases(name, n_random, rng)
        for fault, counts in cases.items():
            bad = {k: v for k, v in counts.items() if k.startswith("FAIL")}
            failures += sum(bad.values())
            summary.setdefault(fault, Counter()).update(
                {"cases": sum(counts.values()), "PayloadError": counts["PayloadError"],
                 "finite tensor": counts["finite tensor"], "failures": sum(bad.values())})
            lines.append(f"| {name} | {fault} | {sum(counts.values())} | "
                         f"{counts['PayloadError']} | {counts['finite tensor']} | "
                         f"{'; '.join(f'{v}x {k}' for k, v in bad.items()) or 0} |")
    lines += ["", "## Bad and edge inputs, per compressor", ""]
    names = gradpress.available()
    table = {n: input_cases(n) for n in names}
    cols = list(next(iter(table.values())))
    lines.append("| compressor | " + " | ".join(cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for n in names:
        failures += sum(v.startswith("FAIL") for v in table[n].values())
        lines.append(f"| {n} | " + " | ".join(table[n][c] for c in cols) + " |")
    for c in cols:
        outs = Counter(table[n][c] for n in names)
        summary[f"input: {c}"] = Counter({"cases": len(names), "failures": sum(
            v for k, v in outs.items() if k.startswith("FAIL"))})
        outcome_text[f"input: {c}"] = ", ".join(f"{v}x {k}" for k, v in outs.items())
    lines += ["", f"Header declaring 2^40 elements: {huge_header_case()}.", "",
              "## Tests: hostile payloads, distributed faults, exact resume", "",
              "pytest, run by this command; the distributed ones on real gloo process "
              "groups (spawned ranks, FileStore, 5-8 s process-group timeout).", "",
              "| test | result |", "|---|---|"]
    dist_tests = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py"))
                  if p.stem in ("test_hostile", "test_payload", "test_config_on_the_wire",
                                "test_dist", "test_faults", "test_resume", "test_feedback")]
    dist_failures = 0
    for sel, result, tests in pytest_cases(dist_tests):
        lines.append(f"| `{sel}` | {result} |")
        for name, word in tests:
            lines.append(f"| &nbsp;&nbsp;{name} | {word} |")
            dist_failures += word in ("FAILED", "ERROR")
            if Path(sel).stem in ("test_faults", "test_resume"):  # the rest: see the rows
                summary[f"distributed: {name}"] = Counter(
                    {"cases": 1, "failures": int(word != "PASSED")})
                outcome_text[f"distributed: {name}"] = word
    lines += ["", f"Failures in the compressor cases above: **{failures}**; "
              f"in the tests: **{dist_failures}**.", ""]
    head = ["## Summary", "",
            "| fault or input | cases | outcome | failures |", "|---|---:|---|---:|"]
    for fault, c in summary.items():
        outcome = outcome_text.get(fault) or (
            f"{c['PayloadError']} PayloadError, {c['finite tensor']} finite tensor "
            "of the declared shape")
        head.append(f"| {fault} | {c['cases']} | {outcome} | {c['failures']} |")
    at = lines.index("## Corrupt bytes, per compressor")
    lines[at:at] = head + [""]
    failures += dist_failures
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
