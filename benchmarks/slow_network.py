"""Time to a target accuracy over slow links: plain DDP vs PyTorch's hooks vs gradpress.

Needs root (``ip netns``, ``tc``). Builds one network namespace per rank (``--ranks P``),
each joined by a veth pair to a Linux bridge in one more namespace (10.77.0.1..P/24, MTU
1500, private addresses inside namespaces this script creates), and shapes both directions
of every rank's link with a token bucket (``tc qdisc ... tbf rate R burst 32kb latency
100ms``): each rank has its own NIC of rate R, as a cluster behind one switch. Then it
runs the ranks, one per namespace, training the same model (``--task``: the 4.1M-parameter
MLP on scikit-learn's digits, or the 3.3M-parameter byte-level transformer on the standard
library's sources; ``gradpress.train.worker``, same seed, same data order) until the test
accuracy reaches ``--target``, once per method:

* ``compute-only``: 40 steps with a hook that communicates nothing (forward, backward,
  DDP's bucketing, optimizer step): the floor of a step on this CPU. Every other method's
  ``s / step`` is shown as a multiple of ``compute-only + max(sent, received) bytes per step
  / link rate``, the step at the physical limit of its traffic;
* ``ddp``: plain DDP, fp32 all-reduce (the baseline every speedup divides by);
* ``torch-fp16``: PyTorch's ``fp16_compress_hook``;
* ``torch-powersgd``: PyTorch's ``powerSGD_hook`` (rank ``--powersgd-rank``, error feedback,
  warm start), run with ONE bucket (``bucket_cap_mb=1000``): on gloo with several buckets it
  launches its second all-reduce from a future's callback and ranks can disagree on the
  collective order. ``--powersgd-multibucket`` also runs it with 4 MB buckets and records
  what happens;
* gradpress through ``compression_hook``: ECQ (2 and 4 bits, and a ternary codebook ``s=3``
  in a per-payload Huffman code, all with ECQ error compensation), QSGD (3 bits), scaled
  sign with error feedback, and sparse dithering when it is registered, each with the
  all-gather collective and (3+ ranks) the two-phase one. Variable-length codes (Huffman,
  QSGD's Elias code) exchange lengths first (``--unbounded``), so their savings reach the
  wire instead of padding to the bound.

Time to target is the training time (forward, backward with the hook's communication,
optimizer step; evaluations excluded) until the first evaluation at or above the target;
bytes are rank 0's until then: payload = ``len(payload)`` of its compressed gradient (C),
sent / received = the frames it put into / took out of the collectives for / from other
ranks (framing and padding included; for all-reduce, the ring's ``2 (P-1)/P`` of the
tensor each way). The two-phase collective should receive about ``2 C (P-1)/P``. Ratios are to
plain DDP measured in the same run. Namespaces are removed on exit, on error and on Ctrl-C.
No delay is emulated: this machine's kernel has no ``netem`` (``--delay-ms`` tries it and
says if it fails). ``--only ddp,ecq`` runs a subset (label substrings).

On a 2-core machine the compressed runs are CPU-bound (encode, decode, feedback over the
16 MB gradient on one thread per rank), not link-bound, and with 4 or 8 ranks every run
is: ``s / step`` in the table shows it.

    sudo .venv/bin/python benchmarks/slow_network.py                 # 2 ranks, ~10 min
    sudo .venv/bin/python benchmarks/slow_network.py --ranks 4       # the headline
    sudo .venv/bin/python benchmarks/slow_network.py --quick         # ~3 min
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Netns:
    """``P`` rank namespaces, each joined by a veth pair to a Linux bridge in one more
    namespace (a cluster behind one switch), every rank's link shaped in both directions
    (``tbf`` on the rank's end: upload; on the bridge's end: download); ``close()``
    removes everything."""

    def __init__(self, rate: str, ranks: int = 2, delay_ms: float = 0.0) -> None:
        tag = f"{os.getpid() % 100000}"
        self.ranks = ranks
        self.bridge_ns = f"gpbr-{tag}"
        self.ns = tuple(f"gpddp{i}-{tag}" for i in range(ranks))
        self.dev = tuple(f"gpv{i}-{tag}" for i in range(ranks))  # the rank's end
        self.port = tuple(f"gpb{i}-{tag}" for i in range(ranks))  # the bridge's end
        self.addr = tuple(f"10.77.0.{i + 1}" for i in range(ranks))
        self.rate, self.delay_ms, self.notes = rate, delay_ms, []
        self._made: list[str] = []

    def _ip(self, *args: str, ns: str | None = None) -> None:
        cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
        subprocess.run(cmd, check=True, capture_output=True, text=True)

    def open(self) -> Netns:
        for n in (self.bridge_ns, *self.ns):
            self._ip("ip", "netns", "add", n)
            self._made.append(n)
        br = self.bridge_ns
        self._ip("ip", "link", "add", "br0", "type", "bridge", ns=br)
        self._ip("ip", "link", "set", "br0", "up", ns=br)
        for i in range(self.ranks):
            ns, dev, port = self.ns[i], self.dev[i], self.port[i]
            self._ip("ip", "link", "add", dev, "type", "veth", "peer", "name", port)
            self._ip("ip", "link", "set", dev, "netns", ns)
            self._ip("ip", "link", "set", port, "netns", br)
            self._ip("ip", "link", "set", "lo", "up", ns=ns)
            self._ip("ip", "addr", "add", f"{self.addr[i]}/24", "dev", dev, ns=ns)
            self._ip("ip", "link", "set", dev, "mtu", "1500", "up", ns=ns)
            self._ip("ip", "link", "set", port, "mtu", "1500", "master", "br0", "up", ns=br)
            self.shape(ns, dev)
            self.shape(br, port)
        return self

    def shape(self, ns: str, dev: str) -> None:
        tbf = ["tbf", "rate", self.rate, "burst", "32kb", "latency", "100ms"]
        if self.delay_ms:
            try:
                self._ip("tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem",
                         "delay", f"{self.delay_ms}ms", ns=ns)
                self._ip("tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:",
                         *tbf, ns=ns)
                return
            except subprocess.CalledProcessError as e:
                msg = f"netem unavailable ({e.stderr.strip()}); no delay emulated"
                if msg not in self.notes:
                    self.notes.append(msg)
                    print("note:", msg)
        self._ip("tc", "qdisc", "add", "dev", dev, "root", *tbf, ns=ns)

    def close(self) -> None:
        while self._made:
            n = self._made.pop()
            subprocess.run(["ip", "netns", "del", n], capture_output=True)

    def env(self, rank: int, port: int) -> dict[str, str]:
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(self.ranks),
                   LOCAL_WORLD_SIZE="1", MASTER_ADDR=self.addr[0], MASTER_PORT=str(port),
                   GLOO_SOCKET_IFNAME=self.dev[rank], OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        return env


COMPUTE_ONLY = "compute-only (no communication, no hook work)"


def methods(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    ecq2 = ["--compressor", "ecq", "--bits", "2"]
    ternary = ["--compressor", "ecq", "--compressor-args", "s=1;entropy=huffman", "--unbounded"]
    out = [(COMPUTE_ONLY, ["--compressor", "compute-only", "--max-steps", "40",
                           "--target-acc", "2"]),
           ("ddp", ["--compressor", "ddp"]),
           ("torch-fp16", ["--compressor", "torch-fp16"]),
           (f"torch-powersgd r={args.powersgd_rank} (1 bucket)",
            ["--compressor", "torch-powersgd", "--rank-r", str(args.powersgd_rank),
             "--bucket-cap-mb", "1000"])]
    collectives = ["allgather", "two_phase"] if args.ranks > 2 else ["allgather"]
    for coll in collectives:
        out += [(f"gradpress ecq 2 bits + ECQ [{coll}]", [*ecq2, "--collective", coll]),
                (f"gradpress ecq ternary Huffman + ECQ, lengths first [{coll}]",
                 [*ternary, "--collective", coll])]
    if not args.quick:
        out += _more(args, collectives)
    if args.only:
        out = [m for m in out if m[0] == COMPUTE_ONLY
               or any(k in m[0] for k in args.only.split(","))]
    for spec in args.method:
        label, _, rest = spec.partition("=")
        out.append((label.strip(), shlex.split(rest)))
    return out


def _more(args: argparse.Namespace, collectives: list[str]) -> list[tuple[str, list[str]]]:
    import gradpress

    out = []
    if args.powersgd_multibucket:
        out.append((f"torch-powersgd r={args.powersgd_rank} (4 MB buckets)",
                    ["--compressor", "torch-powersgd", "--rank-r", str(args.powersgd_rank),
                     "--bucket-cap-mb", "4", "--pg-timeout", "60", "--max-time", "30"]))
    for coll in collectives:
        c = ["--collective", coll]
        out += [(f"gradpress ecq 4 bits + ECQ [{coll}]", ["--compressor", "ecq", "--bits", "4",
                                                        *c]),
                (f"gradpress qsgd 3 bits, lengths first [{coll}]",
                 ["--compressor", "qsgd", "--bits", "3", "--unbounded", *c]),
                (f"gradpress sign + EF [{coll}]", ["--compressor", "sign", "--feedback", "ef",
                                                  *c])]
        if "sparse_dithering" in gradpress.available():
            out.append((f"gradpress sparse_dithering [{coll}]",
                        ["--compressor", "sparse_dithering", "--unbounded", *c]))
    return out


def run_one(net: Netns, label: str, extra: list[str], args: argparse.Namespace, port: int,
            outdir: Path) -> dict:
    js = outdir / f"run-{port}.json"
    common = ["--task", args.task, "--target-acc", str(args.target), "--eval-every",
              str(args.eval_every), "--max-time", str(args.max_time), "--epochs", "100",
              "--lr", str(args.lr), "--seed", str(args.seed), "--no-plot",
              "--pg-timeout", "120", "--bucket-cap-mb", str(args.bucket_cap_mb),
              "--out", str(outdir / f"run-{port}"), "--json", str(js)]
    procs = []
    t0 = time.monotonic()
    for rank in range(net.ranks):
        cmd = ["ip", "netns", "exec", net.ns[rank], sys.executable, "-m",
               "gradpress.train.worker", *common, *extra]
        log = open(outdir / f"run-{port}-rank{rank}.log", "w")  # noqa: SIM115
        procs.append((subprocess.Popen(cmd, env=net.env(rank, port), stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True), log))
    max_time = float(extra[extra.index("--max-time") + 1]) if "--max-time" in extra \
        else args.max_time
    deadline = t0 + max_time * 1.5 + 60
    rcs = []
    try:
        for p, _ in procs:
            try:
                rcs.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                rcs.append(None)
    finally:  # on timeout, error or Ctrl-C: end the two sessions this call started
        for p, log in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            log.close()
    wall = time.monotonic() - t0
    if None in rcs:
        log0 = (outdir / f"run-{port}-rank0.log").read_text()
        steps = [ln.rsplit("|", 1)[-1].split("[")[0].strip() for ln in log0.split("\r")
                 if "it/s" in ln or "s/it" in ln]
        return {"label": label, "failed": True, "returncodes": rcs, "wall_s": wall,
                "error": f"hung: killed after {wall:.0f} s, progress {steps[-1] if steps else '?'}"}
    if any(rcs) or not js.exists():
        tail = (outdir / f"run-{port}-rank0.log").read_text()[-600:]
        err = [ln for ln in tail.splitlines() if "Error" in ln or "error" in ln]
        return {"label": label, "failed": True, "returncodes": rcs, "wall_s": wall,
                "error": (err[-1] if err else tail.splitlines()[-1:] or ["?"])[-1][:300]}
    run = json.loads(js.read_text())["runs"][args.task]
    hit = run["reached_target"]
    return {"label": label, "failed": False, "wall_s": wall, "hook": run["hook"],
            "steps": run["steps"], "step_s": run["train_time_s"] / max(1, run["steps"]),
            "reached": hit is not None,
            "time_to_target_s": hit["train_time_s"] if hit else None,
            "acc_at_target": hit["test_acc"] if hit else None,
            "payload_bytes": (hit or run)["payload_bytes"],
            "wire_bytes": (hit or run)["wire_bytes"],
            "sent_bytes": (hit or run)["sent_bytes"],
            "received_bytes": (hit or run)["received_bytes"],
            "ranks": net.ranks,
            "final_acc": run["final_test_acc"], "train_time_s": run["train_time_s"]}


def ideal_step_s(row: dict, compute_s: float, rate_bps: float) -> float:
    """The step at the physical limit: compute-only plus the larger of this rank's sent and
    received bytes per step through its link (full duplex)."""
    per_step = max(row["sent_bytes"], row["received_bytes"]) / max(1, row["steps"])
    return compute_s + 8 * per_step / rate_bps


def table(rows: list[dict], rate: str, target: float, ranks: int) -> str:
    """One row per method; bytes are rank 0's until the target (or the end)."""
    from gradpress.netmodel import parse_rate

    base = next((r for r in rows if r["label"] == "ddp" and not r["failed"]), None)
    comp = next((r for r in rows if r["label"] == COMPUTE_ONLY and not r["failed"]), None)
    head = (f"| method ({ranks} ranks, {rate} per rank, target {target:.2f}) | time to target s "
            "| speedup vs DDP | s / step | × (compute + bytes/link) | MB payload | MB sent | "
            "MB received | received / (2C(P-1)/P) | acc at target |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if r["failed"]:
            lines.append(f"| {r['label']} | failed: {r['error']} | | | | | | | | |")
            continue
        if r["label"] == COMPUTE_ONLY:
            lines.append(f"| {r['label']} | - | - | {r['step_s']:.3f} | 1.00 | | | | | |")
            continue
        ideal = (f"{r['step_s'] / ideal_step_s(r, comp['step_s'], parse_rate(rate)):.2f}"
                 if comp and r["sent_bytes"] else "-")
        t = r["time_to_target_s"]
        sp = (f"{base['time_to_target_s'] / t:.2f}x" if base and base["reached"] and t
              else "-")
        ts = f"{t:.1f}" if t else f"not reached in {r['train_time_s']:.0f}"
        acc = f"{r['acc_at_target']:.3f}" if r["reached"] else f"{r['final_acc']:.3f} (final)"
        two_c = 2 * r["payload_bytes"] * (ranks - 1) / ranks
        rel = f"{r['received_bytes'] / two_c:.2f}" if two_c and ranks > 1 else "-"
        lines.append(f"| {r['label']} | {ts} | {sp} | {r['step_s']:.3f} | {ideal} | "
                     f"{r['payload_bytes'] / 1e6:.1f} | {r['sent_bytes'] / 1e6:.1f} | "
                     f"{r['received_bytes'] / 1e6:.1f} | {rel} | {acc} |")
    return "\n".join(lines)


def text_chart(rows: list[dict], width: int = 40) -> str:
    """Time to target as a text bar chart (the README shows it; plots are not committed)."""
    ok = [r for r in rows if not r["failed"] and r["reached"] and r["label"] != COMPUTE_ONLY]
    if not ok:
        return ""
    top = max(r["time_to_target_s"] for r in ok)
    pad = max(len(r["label"]) for r in ok)
    lines = []
    for r in sorted(ok, key=lambda r: r["time_to_target_s"]):
        bar = "█" * max(1, round(width * r["time_to_target_s"] / top))
        lines.append(f"{r['label']:<{pad}}  {bar:<{width}}  {r['time_to_target_s']:5.1f} s")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in rows if not r["failed"] and r["reached"]]
    fig, ax = plt.subplots(1, 2, figsize=(12, 0.5 * len(ok) + 2))
    ax[0].barh([r["label"] for r in ok], [r["time_to_target_s"] for r in ok])
    ax[0].set(xlabel="training time to target accuracy (s)")
    ax[1].barh([r["label"] for r in ok], [r["payload_bytes"] / 1e6 for r in ok])
    ax[1].set(xlabel="MB sent by rank 0 until target", xscale="log")
    ax[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax[1].set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", default="100mbit",
                   help="tc tbf rate of every rank's link, each way (e.g. 100mbit, 1gbit)")
    p.add_argument("--ranks", type=int, default=2,
                   help="DDP ranks, one network namespace each, behind one bridge (2..8; "
                        "on 2 cores 4+ ranks are CPU-bound)")
    p.add_argument("--task", default="digits-mlp4m", choices=("digits-mlp4m", "lm"),
                   help="the 4.1M-parameter MLP on digits, or the 3.3M-parameter byte-level "
                        "transformer on the standard library's sources")
    p.add_argument("--target", type=float, default=0.94, help="test accuracy to reach")
    p.add_argument("--eval-every", type=int, default=5, help="steps between evaluations")
    p.add_argument("--max-time", type=float, default=240.0,
                   help="give up on a method after this much training time (s)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--powersgd-rank", type=int, default=2)
    p.add_argument("--bucket-cap-mb", type=float, default=25.0,
                   help="DDP bucket size of every method but PowerSGD (one bucket)")
    p.add_argument("--only", default="", help="comma-separated substrings of method labels")
    p.add_argument("--method", action="append", default=[], metavar="LABEL=ARGS",
                   help="an extra method: a label, '=', then train_worker arguments, e.g. "
                        "'ecq s=3=--compressor ecq --compressor-args s=3' (repeatable)")
    p.add_argument("--powersgd-multibucket", action="store_true",
                   help="also run PyTorch's PowerSGD with several buckets (may abort)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="netem delay (if available)")
    p.add_argument("--quick", action="store_true",
                   help="ddp, fp16, PowerSGD and ECQ 2 bits to 0.90 (about 3 minutes)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "slow_network")
    args = p.parse_args()
    if args.quick:
        args.target, args.max_time = min(args.target, 0.90), min(args.max_time, 120.0)
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        print("slow_network.py needs root and the `ip` and `tc` tools (iproute2) to build "
              "network namespaces; not available here.", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if not 2 <= args.ranks <= 8:
        print("--ranks must be in 2..8", file=sys.stderr)
        return 2
    net = Netns(args.rate, args.ranks, args.delay_ms)
    atexit.register(net.close)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        net.open()
    except subprocess.CalledProcessError as e:
        net.close()
        print(f"could not build the namespaces/veth/tc ({' '.join(e.cmd)}: "
              f"{e.stderr.strip()})", file=sys.stderr)
        return 2
    rows = []
    try:
        for i, (label, extra) in enumerate(methods(args)):
            print(f"[{i + 1}] {label} ...", flush=True)
            r = run_one(net, label, extra, args, 29600 + i, args.out)
            rows.append(r)
            print("    " + ("FAILED: " + r["error"] if r["failed"] else
                           f"{r['steps']} steps, {r['step_s']:.3f} s/step, time to target "
                           f"{r['time_to_target_s']}, acc {r['final_acc']:.3f}"), flush=True)
    finally:
        net.close()
    md = table(rows, args.rate, args.target, args.ranks) + "\n\n```\n" + text_chart(rows) + "\n```"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"\n{stamp}, {os.cpu_count()} CPUs, {args.ranks} gloo ranks over veth + bridge, "
          f"tc tbf {args.rate} per link and direction\n\n{md}")
    res = {"date": stamp, "rate": args.rate, "ranks": args.ranks, "task": args.task,
           "target": args.target, "notes": net.notes,
           "config": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
           "table_md": md}
    (args.out / "slow_network.json").write_text(json.dumps(res, indent=1))
    plot(rows, args.out / "slow_network.png")
    print(f"\nwrote {args.out / 'slow_network.json'} and {args.out / 'slow_network.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
