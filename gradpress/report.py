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
    tables: list[str] = field(default_factory=list)  # Markdown pipe tables
    images: list[Path] = field(default_factory=list)
    preformatted: str = ""


def markdown_table_to_html(md: str) -> str:
    """Render a Markdown pipe table (header, separator, rows) as an HTML table."""
    rows = [r.strip() for r in md.strip().splitlines() if r.strip().startswith("|")]
    if len(rows) < 2:
        return f"<pre>{html.escape(md)}</pre>"

    def cells(row: str) -> list[str]:
        return [html.escape(c.strip()) for c in row.strip("|").split("|")]

    head = "".join(f"<th>{c}</th>" for c in cells(rows[0]))
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in cells(r)) + "</tr>"
                   for r in rows[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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
        parts.extend(markdown_table_to_html(t) for t in s.tables)
        parts.extend(_image(p) for p in s.images if Path(p).exists())
        if s.preformatted:
            parts.append(f"<pre>{html.escape(s.preformatted)}</pre>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
