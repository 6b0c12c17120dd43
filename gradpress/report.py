"""A self-contained HTML report that reads like a paper: prose, real tables, figures, logs.

Used by ``gradpress demo``. The commands write Markdown (pipe tables, paragraphs with
``**bold**``, ``*italic*`` and backticks); :func:`markdown_to_html` turns that into HTML, so
no Markdown syntax reaches the page. Every image is inlined as base64, so the single file can
be mailed or attached to a CI run. Logs are the only preformatted text, folded in
``<details>``; table rows printed into a log are dropped there (the table is shown above).
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

_CSS = """
body{font-family:Georgia,'Times New Roman',serif;max-width:1000px;margin:2em auto;padding:0 1.5em;
color:#222;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:2.2em;
border-bottom:1px solid #999}h3{font-size:1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;margin:.8em 0;font-size:.85em;
font-family:system-ui,sans-serif;border-top:2px solid #222;border-bottom:2px solid #222}
th{border-bottom:1px solid #222;font-weight:600}td,th{padding:.2em .7em;text-align:left;
vertical-align:top}.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#f6f6f6}
caption{caption-side:top;text-align:left;font-size:.95em;padding:.3em 0;font-style:italic}
table.meta{border:none;font-size:.8em;color:#444}table.meta td{padding:.05em .8em .05em 0}
table.meta td:first-child{font-weight:600}table.meta tr{background:none}
table.claims{width:100%}table.claims td:last-child{font-weight:600}
table.claims tr.group td{font-weight:600;background:#e9e9e9;font-style:italic}
table.claims tr.group a{color:inherit;text-decoration:none}
figure{margin:1em 0;text-align:center}img{max-width:100%}
figcaption{font-size:.85em;color:#444;text-align:left;margin-top:.3em}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.75em;line-height:1.3}
code{font-size:.9em;background:#f3f3f3;padding:0 .2em}
details{margin:.6em 0}summary{cursor:pointer;color:#444;font-size:.9em}
.run{color:#666;font-size:.85em;font-family:system-ui,sans-serif}.fail{color:#b00}
"""

#: Tables longer than this many rows fold away so the figures stay in view.
FOLD_ROWS = 25


@dataclass
class Claim:
    """A paper's number beside ours for the same quantity."""

    quantity: str
    setting: str  # where the numbers come from (and how their setting differs from ours)
    paper: str  # the paper's claim, cited
    ours: str  # computed from this run's outputs
    headline: bool = True  # also listed in the report's opening table


@dataclass
class Table:
    """A table built from data (a command's JSON), not from Markdown."""

    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    """A PNG and its caption (inline Markdown)."""

    path: Path
    caption: str = ""


@dataclass
class Section:
    """One part of the report, rendered in this order: run line, prose, paper-vs-ours table,
    figures, tables, Markdown the command wrote, the log (folded)."""

    title: str
    text: str = ""  # Markdown prose
    run: str = ""  # one line: command, seconds, exit status
    failed: bool = False
    claims: list[Claim] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    markdown: list[str] = field(default_factory=list)  # pipe tables and paragraphs
    log: str = ""


_INLINE = re.compile(r"`([^`]+)`|\*\*(.+?)\*\*|(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])")


def inline(text: str) -> str:
    """Escape ``text`` and render its inline Markdown: backticks, ``**bold**``, ``*italic*``."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos:m.start()]))
        code, bold, ital = m.groups()
        if code is not None:
            out.append(f"<code>{html.escape(code)}</code>")
        elif bold is not None:
            out.append(f"<strong>{inline(bold)}</strong>")
        else:
            out.append(f"<em>{inline(ital)}</em>")
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def _is_separator(row: str) -> bool:
    return bool(re.fullmatch(r"\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?", row.strip()))


#: A cell that is a number: digits with separators, an optional sign, unit or suffix.
_NUMBER = re.compile(r"[-+<>=~ ]*[\d.,]+(e[-+]?\d+)?\s*(%|x|s|ms|MB|B|bits?)?|-|inf|nan")


def _numeric_columns(rows: list[list[str]]) -> list[bool]:
    """Columns whose every cell is a number (or ``-``): those are right-aligned."""
    width = max((len(r) for r in rows), default=0)
    return [any(i < len(r) and r[i] not in ("", "-") for r in rows)
            and all(_NUMBER.fullmatch(r[i].strip()) for r in rows if i < len(r))
            for i in range(width)]


def _cell(tag: str, text: str, num: bool) -> str:
    return f'<{tag} class="num">{inline(text)}</{tag}>' if num else f"<{tag}>{inline(text)}</{tag}>"


def table_html(header: list[str], rows: list[list[str]], caption: str = "",
               cls: str = "") -> str:
    """An HTML table; cells are inline Markdown, numeric columns right-aligned. Long tables
    fold into ``<details>``."""
    attr = f' class="{cls}"' if cls else ""
    cap = f"<caption>{inline(caption)}</caption>" if caption else ""
    num = _numeric_columns(rows)
    head = "".join(_cell("th", c, i < len(num) and num[i]) for i, c in enumerate(header))
    body = "".join("<tr>" + "".join(_cell("td", c, i < len(num) and num[i])
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    table = f"<table{attr}>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if len(rows) > FOLD_ROWS:
        what = inline(caption) if caption else "table"
        return f"<details><summary>{what}: {len(rows)} rows (click to show)</summary>" \
               f"{table}</details>"
    return table


def _block_html(kind: str, lines: list[str]) -> str:
    if kind == "table" and len(lines) >= 2 and _is_separator(lines[1]):
        return table_html(_cells(lines[0]), [_cells(r) for r in lines[2:]])
    if kind == "heading":
        return f"<h3>{inline(lines[0].lstrip('#').strip())}</h3>"
    if kind == "list":
        items = "".join(f"<li>{inline(ln[2:].strip())}</li>" for ln in lines)
        return f"<ul>{items}</ul>"
    return "<p>" + inline(" ".join(lines)) + "</p>"


def _kind(line: str) -> str:
    if not line:
        return ""
    if line.startswith("|"):
        return "table"
    if line.startswith("#"):
        return "heading"
    return "list" if line.startswith(("- ", "* ")) else "text"


def markdown_to_html(md: str) -> str:
    """Render the Markdown our commands write: pipe tables (header, separator, rows),
    ``#`` headings, ``-`` lists and paragraphs, each with inline emphasis and code."""
    parts: list[str] = []
    block: list[str] = []
    kind = ""
    for line in md.strip().splitlines() + [""]:
        line = line.strip()
        this = _kind(line)
        if (this != kind or this == "heading") and block:
            parts.append(_block_html(kind, block))
            block = []
        kind = this
        if line:
            block.append(line)
    return "\n".join(parts)


#: A progress-bar line (tqdm's ``NN%|####  | n/N [...]``), redrawn many times in a log.
_PROGRESS = re.compile(r"\d+%\|")
#: Terminal colour codes (Ray's and Flower's loggers).
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


#: A row of a table printed as aligned text: a label, then two or more numbers.
_TEXT_ROW = re.compile(r"\s*\S+(\s+[-+]?[\d.,]+(e[-+]?\d+)?[%x]?){2,}\s*")
#: A rule drawn with one repeated character (torchrun's banner of asterisks, ``=====``).
_RULE = re.compile(r"\s*([*=#_~-])\1{3,}\s*")
_NOTE = "[table or text: shown in the report above]"


def _is_text_header(line: str) -> bool:
    """Three or more labels separated by runs of spaces, no colon: a printed table's header."""
    return ":" not in line and len(re.split(r"\s{2,}", line.strip())) >= 3


def log_text(log: str, shown: frozenset[str] = frozenset(), tail: int = 40) -> str:
    """The last ``tail`` lines of a command's log, without progress bars, colour codes, rules
    or repeated blank lines. Tables (pipe rows; aligned text rows with their header) and lines
    in ``shown`` (what the report renders from the command's files) become one note each."""
    lines: list[str] = []
    for ln in _ANSI.sub("", log).replace("\r", "\n").splitlines():
        if _PROGRESS.search(ln) or _RULE.fullmatch(ln):
            continue
        if not ln.strip():
            if lines and lines[-1].strip() and lines[-1] != _NOTE:
                lines.append("")
            continue
        row = bool(_TEXT_ROW.fullmatch(ln))
        if ln.strip().startswith("|") or ln.strip() in shown or row:
            if row and lines and lines[-1] != _NOTE and _is_text_header(lines[-1]):
                lines.pop()
            if lines and lines[-1] != _NOTE and not lines[-1]:
                lines.pop()  # a note follows text without a blank line between
            if not lines or lines[-1] != _NOTE:
                lines.append(_NOTE)
            continue
        lines.append(ln.rstrip())
    return "\n".join(lines[-tail:]).strip("\n")


def _log_html(log: str, shown: frozenset[str]) -> str:
    text = log_text(log, shown)
    if not text:
        return ""
    n = text.count("\n") + 1
    return f"<details><summary>console log (last {n} lines)</summary>" \
           f"<pre>{html.escape(text)}</pre></details>"


def _figure_html(fig: Figure) -> str:
    path = Path(fig.path)
    data = base64.b64encode(path.read_bytes()).decode()
    cap = f"<figcaption>{inline(fig.caption)}</figcaption>" if fig.caption else ""
    return f'<figure><img alt="{html.escape(path.name)}" ' \
           f'src="data:image/png;base64,{data}">{cap}</figure>'


def claims_html(claims: list[Claim]) -> str:
    """The paper-vs-ours table of one section."""
    return table_html(["quantity", "setting", "paper (claim)", "ours (this run)"],
                      [[c.quantity, c.setting, c.paper, c.ours] for c in claims], cls="claims")


def _summary_html(sections: list[Section]) -> str:
    """Every section's headline claims in one table, a heading row per section."""
    body = []
    for i, s in enumerate(sections, 1):
        claims = [c for c in s.claims if c.headline]
        if claims:
            body.append(f'<tr class="group"><td colspan="4"><a href="#s{i}">{i}. '
                        f"{html.escape(s.title)}</a></td></tr>")
            body += ["<tr>" + "".join(f"<td>{inline(v)}</td>" for v in
                                      (c.quantity, c.setting, c.paper, c.ours)) + "</tr>"
                     for c in claims]
    if not body:
        return ""
    head = "".join(f"<th>{h}</th>" for h in ("quantity", "setting", "paper (claim)",
                                                 "ours (this run)"))
    return f'<table class="claims"><thead><tr>{head}</tr></thead>' \
           f'<tbody>{"".join(body)}</tbody></table>'


def section_html(s: Section, number: int) -> str:
    """One numbered section (anchor ``s<number>``)."""
    parts = [f'<h2 id="s{number}">{number}. {html.escape(s.title)}</h2>']
    if s.run:
        cls = "run fail" if s.failed else "run"
        parts.append(f'<p class="{cls}">{inline(s.run)}</p>')
    if s.text:
        parts.append(markdown_to_html(s.text))
    if s.claims:
        parts.append(claims_html(s.claims))
    parts.extend(_figure_html(f) for f in s.figures if Path(f.path).exists())
    parts.extend(table_html(t.header, t.rows, t.caption) for t in s.tables)
    parts.extend(markdown_to_html(md) for md in s.markdown)
    if s.log:
        shown = frozenset(ln.strip() for md in s.markdown for ln in md.splitlines())
        parts.append(_log_html(s.log, shown - {""}))
    return "\n".join(parts)


def _meta_html(meta: dict[str, object]) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{inline(str(v))}</td></tr>"
                   for k, v in meta.items())
    return f'<table class="meta"><tbody>{rows}</tbody></table>'


def render(title: str, sections: list[Section], meta: dict[str, object],
           abstract: str = "") -> str:
    """The whole HTML document: title, run metadata table, abstract, a table of every
    paper-vs-ours claim, then the sections."""
    parts = ["<!doctype html><html lang='en'><meta charset='utf-8'>",
             f"<title>{html.escape(title)}</title><style>{_CSS}</style>",
             f"<h1>{html.escape(title)}</h1>", _meta_html(meta)]
    if abstract:
        parts.append(markdown_to_html(abstract))
    summary = _summary_html(sections)
    if summary:
        parts += ["<h2>Paper versus this run</h2>", summary]
    parts.extend(section_html(s, i) for i, s in enumerate(sections, 1))
    return "\n".join(parts) + "\n</html>\n"


def write_report(path: Path, title: str, sections: list[Section], meta: dict[str, object],
                 abstract: str = "") -> Path:
    """Write the HTML report to ``path`` and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(title, sections, meta, abstract))
    return path
