"""The demo's HTML report: tables split correctly, images embedded, text escaped."""

import base64

from gradpress.report import Section, markdown_to_html, write_report


def test_two_markdown_tables_become_two_html_tables_and_text_stays_text():
    md = "Intro <b>x</b>\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n| c |\n|---|\n| 3 |\n"
    out = markdown_to_html(md)
    assert out.count("<table>") == 2
    assert "<p>Intro &lt;b&gt;x&lt;/b&gt;</p>" in out
    assert "<th>c</th>" in out and "<td>3</td>" in out


def test_long_tables_fold_into_details():
    md = "| a |\n|---|\n" + "".join(f"| {i} |\n" for i in range(40))
    assert "<details>" in markdown_to_html(md)


def test_report_embeds_png_bytes(tmp_path):
    png = tmp_path / "p.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    out = write_report(tmp_path / "r.html", "t", [Section("s", images=[png])], {"k": 1})
    text = out.read_text()
    assert base64.b64encode(png.read_bytes()).decode() in text
