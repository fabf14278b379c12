"""The report's document model (headings, paragraphs, tables, code, figures), rendered
to Markdown and to one self-contained HTML file from the same content, and written."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from barlow.report.claims import HELD, NOT_HELD
from barlow.report.inputs import NOT_RUN

# Claim statuses → CSS colour in the HTML (the Markdown prints the word only).
_STATUS_COLOUR = {HELD: "#1a7f37", NOT_HELD: "#cf222e", NOT_RUN: "#6e7781"}


@dataclass
class Figure:
    name: str
    png: bytes
    caption: str


@dataclass
class Document:
    """Headings, paragraphs, tables, code and figures, rendered to Markdown and to one
    self-contained HTML file from the same content."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def bullets(self, items: Sequence[str]) -> None:
        self.blocks.append(("bullets", list(items)))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.blocks.append(("table", (list(header), [list(map(str, r)) for r in rows])))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def figure(self, figure: Figure) -> None:
        self.blocks.append(("figure", figure))

    def figures(self) -> list[Figure]:
        return [b for kind, b in self.blocks if kind == "figure"]

    def markdown(self, figure_dir: str) -> str:
        out = [f"# {self.title}", ""]
        for kind, body in self.blocks:
            if kind == "heading":
                out += [f"{'#' * body[0]} {body[1]}", ""]
            elif kind == "para":
                out += [body, ""]
            elif kind == "bullets":
                out += [f"- {item}" for item in body] + [""]
            elif kind == "table":
                header, rows = body
                cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
                out.append("| " + " | ".join(map(cell, header)) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
                out.append("")
            elif kind == "code":
                out += ["```", body, "```", ""]
            elif kind == "figure":
                out += [f"![{body.caption}]({figure_dir}/{body.name}.png)", "",
                        f"*{body.caption}*", ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self) -> str:
        esc = html.escape
        parts = [
            "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
            f"<title>{esc(self.title)}</title>",
            # Inline style only: the file must render with no network at all.
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
            "line-height:1.4}table{border-collapse:collapse;margin:1em 0;font-size:0.92em}"
            "th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}"
            "th{background:#f6f8fa}pre{background:#f6f8fa;padding:0.8em;overflow-x:auto}"
            "figure{margin:1em 0}img{max-width:100%}figcaption{color:#57606a;font-size:0.9em}"
            "</style>", "</head>", "<body>", f"<h1>{esc(self.title)}</h1>"]
        for kind, body in self.blocks:
            if kind == "heading":
                parts.append(f"<h{body[0]}>{esc(body[1])}</h{body[0]}>")
            elif kind == "para":
                parts.append(f"<p>{esc(body)}</p>")
            elif kind == "bullets":
                parts.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in body) + "</ul>")
            elif kind == "table":
                header, rows = body
                parts.append("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header)
                             + "</tr></thead><tbody>")
                for row in rows:
                    cells = []
                    for value in row:
                        colour = _STATUS_COLOUR.get(value)
                        style = f' style="color:{colour};font-weight:bold"' if colour else ""
                        cells.append(f"<td{style}>{esc(value)}</td>")
                    parts.append("<tr>" + "".join(cells) + "</tr>")
                parts.append("</tbody></table>")
            elif kind == "code":
                parts.append(f"<pre><code>{esc(body)}</code></pre>")
            elif kind == "figure":
                data = base64.b64encode(body.png).decode("ascii")
                parts.append(f'<figure><img alt="{esc(body.caption)}" '
                             f'src="data:image/png;base64,{data}">'
                             f"<figcaption>{esc(body.caption)}</figcaption></figure>")
        parts += ["</body>", "</html>"]
        return "\n".join(parts) + "\n"


def write_report(doc: Document, out_dir: Path, figure_subdir: str = "figures") -> None:
    """reports/report.md (+ PNGs in reports/figures/) and one self-contained report.html."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / figure_subdir
    fig_dir.mkdir(parents=True, exist_ok=True)
    keep = {f"{f.name}.png" for f in doc.figures()}
    for stale in fig_dir.glob("*.png"):
        if stale.name not in keep:
            stale.unlink()  # a figure no longer drawn must not linger in git
    for fig in doc.figures():
        (fig_dir / f"{fig.name}.png").write_bytes(fig.png)
    (out_dir / "report.md").write_text(doc.markdown(figure_subdir))
    (out_dir / "report.html").write_text(doc.html())
