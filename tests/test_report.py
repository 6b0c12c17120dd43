"""The demo's HTML report: Markdown rendered to real HTML, metadata as a table, logs folded and
free of tables, the papers' numbers beside ours computed from the step outputs."""

import argparse
import base64
import json
import re

import pytest

from gradpress.commands import _demo_sections as sections
from gradpress.commands import demo
from gradpress.report import (
    Claim,
    Figure,
    Section,
    Table,
    inline,
    log_text,
    markdown_to_html,
    render,
    write_report,
)

#: What ``gradpress bounds`` writes to bounds.md (shape of it), and prints to its log.
BOUNDS_MD = """Measured 2026-01-01 on x86_64, torch 2.x: `gradpress bounds --dims 100`. bits/coord
= body bits / d.

**Closest to the worst-case bound** on Gaussian vectors; the *useful* range.

| d | regime | best compressor | bits/coord |
|---|---|---|---|
| 100 | distortion 0.05-0.15 | sparse_dithering | 2.587 |

| model | link | speedup |
| --- | ---: | ---: |
| resnet50 | 10 Gbit/s | 997.3 |
"""
LOG = ("calibrating ...\n"
       "measuring:  50%|#####     | 1/2 [00:01<00:01,  1.0run/s]\r"
       "measuring: 100%|##########| 2/2 [00:02<00:00,  1.0run/s]\n"
       + BOUNDS_MD +
       "  epoch  test acc  payload MB\n   1.00    0.4944      0.2175\n   2.00    0.79  0.21\n"
       "task      acc ecq   acc ddp\ndigits     0.9694    0.9694\n"
       "*****************************************\n"
       "\x1b[36m(ClientAppActor pid=1)\x1b[0m done\nwrote bounds.png\n")


def _pre_blocks(page: str) -> list[str]:
    return re.findall(r"<pre>(.*?)</pre>", page, flags=re.S)


def _assert_no_markdown(page: str) -> None:
    assert "|---" not in page and "| ---" not in page and "---:" not in page
    assert "**" not in page
    assert "`" not in page
    for pre in _pre_blocks(page):
        assert not any(ln.lstrip().startswith("|") for ln in pre.splitlines()), pre
        assert "0.4944" not in pre and "0.9694" not in pre, pre  # aligned text tables
        assert "Closest to the worst-case bound" not in pre, pre  # prose shown above


def test_inline_markdown_becomes_html_and_html_is_escaped():
    out = inline("**bold** and *it* and `x < y` and <b>raw</b>, f* and ||w-w*||")
    assert "<strong>bold</strong>" in out and "<em>it</em>" in out
    assert "<code>x &lt; y</code>" in out and "&lt;b&gt;raw&lt;/b&gt;" in out
    assert "f* and ||w-w*||" in out  # a lone star is not emphasis


def test_two_markdown_tables_become_two_html_tables_and_text_stays_text():
    md = "Intro <b>x</b>\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n| c |\n|---|\n| 3 |\n"
    out = markdown_to_html(md)
    assert out.count("<table") == 2
    assert "<p>Intro &lt;b&gt;x&lt;/b&gt;</p>" in out
    assert '<th class="num">c</th>' in out and '<td class="num">3</td>' in out


def test_aligned_separator_and_bold_cells_render():
    out = markdown_to_html("| model | **speedup** |\n| --- | ---: |\n| r50 | 9.5x |\n")
    assert "<strong>speedup</strong>" in out and '<td class="num">9.5x</td>' in out
    assert "---" not in out


def test_text_columns_stay_left_and_number_columns_align_right():
    out = markdown_to_html("| name | bits |\n|---|---|\n| qsgd | 1.034 |\n| fp16 | - |\n")
    assert "<td>qsgd</td>" in out and '<td class="num">1.034</td>' in out


def test_long_tables_fold_into_details():
    md = "| a |\n|---|\n" + "".join(f"| {i} |\n" for i in range(40))
    assert "<details>" in markdown_to_html(md)


def test_log_drops_progress_bars_tables_colour_codes_and_shown_lines():
    shown = frozenset(ln.strip() for ln in BOUNDS_MD.splitlines()) - {""}
    text = log_text(LOG, shown)
    assert "calibrating ..." in text and "wrote bounds.png" in text
    assert "(ClientAppActor pid=1) done" in text and "\x1b" not in text
    assert "%|" not in text and "|" not in text
    assert "0.4944" not in text and "payload MB" not in text and "acc ddp" not in text
    assert "Closest" not in text and "***" not in text


def test_report_embeds_png_bytes(tmp_path):
    png = tmp_path / "p.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    out = write_report(tmp_path / "r.html", "t", [Section("s", figures=[Figure(png, "c")])],
                       {"k": 1})
    text = out.read_text()
    assert base64.b64encode(png.read_bytes()).decode() in text
    assert "<figcaption>c</figcaption>" in text


def test_report_of_representative_sections_has_real_tables_and_no_markdown():
    meta = {"date": "2026-01-01T00:00:00+00:00", "command": "`gradpress demo`",
            "python": "3.11.7", "torch": "2.5.0"}
    s = Section("Bounds", text="Prose with **bold**.", run="`gradpress bounds`: 1 s, exit 0",
                claims=[Claim("bits", "d = 100", "<= 3.7 bits/coord (paper)", "2.6 bits/coord")],
                tables=[Table(["method", "ratio"], [["ECQ-SGD s=4", "16.8x"]], "*syn-256*")],
                markdown=[BOUNDS_MD], log=LOG)
    page = render("gradpress demo", [s], meta, abstract="An *abstract*.")
    _assert_no_markdown(page)
    assert page.count("<table") == 6  # meta, summary, section claims, data table, two md
    assert re.search(r'<table class="meta">.*<td>date</td><td>2026-01-01', page, re.S)
    assert "<td>torch</td><td>2.5.0</td>" in page
    assert "<strong>Closest to the worst-case bound</strong>" in page
    assert "<details><summary>console log" in page and len(_pre_blocks(page)) == 1
    assert page.index("Paper versus this run") < page.index("1. Bounds")


# -- the demo's sections, from step outputs ---------------------------------------------------
def _step(tmp_path, name, files):
    out = tmp_path / name
    for rel, content in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(content if isinstance(content, str) else json.dumps(content))
    return {"name": name, "command": f"gradpress {name}", "returncode": 0, "seconds": 1.0,
            "out": str(out)}


def _ecq_linear(ratio):
    row = {"label": "ECQ-SGD s=4", "bytes_per_step": 61.8, "compression_ratio": ratio,
           "final_loss": 0.49, "rel_loss_gap": 0.004, "final_dist": 0.13, "diverged": False}
    fp = {"label": "32Bit-FP", "bytes_per_step": 1040.0, "compression_ratio": 1.0,
          "final_loss": 0.488, "rel_loss_gap": 0.0, "final_dist": 0.1, "diverged": False}
    return {"settings": {"workers": 8, "iters": 800, "batch_size": 32, "lr": 0.02,
                         "alpha": 0.2, "beta": 0.95, "match_tol": 0.01},
            "datasets": [{"name": "syn-256", "d": 256, "f_star": 0.48, "summary": [fp, row],
                          "match": row}]}


def _train(payload, acc):
    rec = [{"epoch": 1.0, "test_acc": acc, "payload_bytes": payload}]
    return {"runs": {"digits": {"method": "ecq", "params": 38282, "world_size": 2,
                                "final_test_acc": acc, "payload_bytes": payload,
                                "records": rec}}}


def _netmodel(ecq_step):
    def row(scheme, comp, step):
        return {"model": "resnet50", "workers": 512, "bandwidth_bps": 10e9, "scheme": scheme,
                "compressor": comp, "step_s": step}

    return {"compute": {"flops_per_s": 1e11}, "machine": {"device": "cpu"},
            "compressors": [{"label": "ecq", "bits_per_element": 2.06, "encode_s": 0.002,
                             "decode_s": 0.001, "chunk": 1 << 20}],
            "predictions": [row("ring", "fp32", 10.0), row("allgather", "ecq", ecq_step)]}


def _federated(sd_bytes):
    def run(comp, per_round):
        rounds = [{"round": 0, "test_accuracy": 0.1, "cumulative_uplink_bytes": 0}]
        rounds += [{"round": i, "test_accuracy": 0.5 + 0.2 * i,
                    "cumulative_uplink_bytes": i * per_round} for i in (1, 2)]
        return {"compressor": comp, "final_accuracy": 0.9, "rounds": rounds}

    return {"args": {"alpha": "0.5", "clients": "10", "rounds": "2"}, "engine": "local",
            "runs": [run("fp32", 1000), run("sparse_dithering", sd_bytes)]}


def _demo_steps(tmp_path, k):
    """Outputs of four demo steps whose numbers all scale with ``k``."""
    md = "| compressor | bytes |\n| --- | ---: |\n| fp32 | 1 |\n"
    return [
        _step(tmp_path / str(k), "ecq_linear", {"ecq_linear.json": _ecq_linear(40.0 * k)}),
        _step(tmp_path / str(k), "train_digits", {"train.json": _train(1000, 0.97),
                                                  "ddp/train.json": _train(1000 * k, 0.96)}),
        _step(tmp_path / str(k), "netmodel", {"netmodel.json": _netmodel(10.0 / k),
                                              "summary.md": md}),
        _step(tmp_path / str(k), "federated", {"federated.json": _federated(1000 / k),
                                               "federated.md": md}),
    ]


@pytest.mark.parametrize("k", [2, 5])
def test_ours_is_computed_from_the_step_outputs(tmp_path, k):
    built = [sections.build(step, step["name"]) for step in _demo_steps(tmp_path, k)]
    ours = [c.ours for s in built for c in s.claims]
    assert len(ours) == 4, [s.text for s in built]
    assert ours[0].startswith(f"{40.0 * k:.1f}x")  # ECQ-SGD ratio at fp32 loss
    assert ours[1].startswith(f"{k:.1f}x fewer bytes") and "+1.0 points" in ours[1]
    assert ours[2].startswith(f"{k - 1:+.1%}")  # speed-up over fp32 ring
    assert ours[3].startswith(f"{k:.1f}x")  # fp32 / SD bytes to the same accuracy
    assert all("paper" not in c.ours for s in built for c in s.claims)
    _assert_no_markdown(render("t", built, {"date": "today"}))


def test_a_step_with_missing_outputs_says_so_instead_of_failing(tmp_path):
    step = _step(tmp_path, "netmodel", {"log.txt": "Traceback: boom\n"})
    step["returncode"] = 1
    s = sections.build(step, "Performance model")
    page = render("t", [s], {})
    assert s.failed and "<strong>Outputs incomplete</strong>" in page and "boom" in page


def test_tiny_real_demo_run_writes_a_report_without_markdown(tmp_path, monkeypatch):
    """A real ``gradpress demo --only bounds``, with the bounds step made tiny."""
    argv = ["bounds", "--dims", "100", "--samples", "1", "--no-sweep", "--no-real",
            "--compressors", "fp16,qsgd,sparse_dithering,spherical"]
    monkeypatch.setattr(demo, "STEPS", [("bounds", "Lower bounds", argv)])
    rc = demo.run(argparse.Namespace(out=str(tmp_path), only="bounds"))
    page = (tmp_path / "report.html").read_text()
    assert rc == 0, page[-2000:]
    _assert_no_markdown(page)
    assert '<table class="meta">' in page and "<td>torch</td>" in page
    assert page.count("<table") >= 5 and "data:image/png;base64," in page
    assert "Sparse Dithering bits per coordinate" in page
    assert "Spherical Compression bits per block" in page
    bounds = json.loads((tmp_path / "bounds" / "bounds.json").read_text())
    sd = next(r for r in bounds["rows"] if r["compressor"] == "sparse_dithering")
    assert f"{sd['bits_per_coord']:.2f} bits/coord at distortion" in page
