"""The demo's HTML report: Markdown rendered to real HTML, metadata as a table, logs folded and
free of tables, the papers' numbers beside ours computed from the step outputs."""

import base64
import re

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
    assert "Closest" not in text


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
