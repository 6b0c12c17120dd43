"""A self-contained HTML report: sections of text, Markdown tables and embedded PNG plots.

Used by ``gradpress demo``; every image is inlined as base64, so the single file can be
mailed or attached to a CI run.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}
td,th{border:1px solid #bbb;padding:.25em .6em;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
.meta{color:#666;font-size:.85em}
"""


@dataclass
class Section:
    """One part of the report."""

    title: str
    text: str = ""
    tables: list[str] = field(default_factory=list)  # Markdown: pipe tables and text
    images: list[Path] = field(default_factory=list)
    preformatted: str = ""


def _table_html(rows: list[str]) -> str:
    def cells(row: str) -> list[str]:
        return [html.escape(c.strip()) for c in row.strip().strip("|").split("|")]

    head = "".join(f"<th>{c}</th>" for c in cells(rows[0]))
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in cells(r)) + "</tr>"
                   for r in rows[2:])
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if len(rows) > 27:  # long tables fold away so the plots stay in view
        return f"<details><summary>table of {len(rows) - 2} rows</summary>{table}</details>"
    return table


def markdown_to_html(md: str) -> str:
    """Render Markdown made of pipe tables and plain paragraphs (what our commands write):
    each run of ``|``-lines is one table (header, separator, rows), other lines are text."""
    parts: list[str] = []
    block: list[str] = []
    kind = ""

    def flush() -> None:
        if block and kind == "table" and len(block) >= 2:
            parts.append(_table_html(block))
        elif block:
            parts.append("<p>" + html.escape(" ".join(block)) + "</p>")
        block.clear()

    for line in md.strip().splitlines():
        line = line.strip()
        this = "table" if line.startswith("|") else ("text" if line else "")
        if this != kind:
            flush()
            kind = this
        if line:
            block.append(line)
    flush()
    return "\n".join(parts)


def _image(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<figure><img alt="{html.escape(Path(path).name)}" ' \
           f'src="data:image/png;base64,{data}"></figure>'


def write_report(path: Path, title: str, sections: list[Section], meta: dict) -> Path:
    """Write the HTML report to ``path`` and return it."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style><h1>{html.escape(title)}</h1>",
             f"<p class='meta'>{html.escape(json.dumps(meta))}</p>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.extend(f"<p>{html.escape(p)}</p>" for p in s.text.split("\n\n"))
        parts.extend(_image(p) for p in s.images if Path(p).exists())
        parts.extend(markdown_to_html(t) for t in s.tables)
        if s.preformatted:
            parts.append(f"<pre>{html.escape(s.preformatted)}</pre>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
