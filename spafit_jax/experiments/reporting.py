"""The work behind `python -m spafit_jax.report` (its command line and --help: `spafit_jax/report.py`).

Reads every run folder's results.json, config.yaml and metrics.jsonl: the experiment's cells
`EXP/runs/<task>/<method>/seed<k>` (named by their path), and any other run folders given (named
by their results: task, method, `@n1=..,n2=..` for spafit, `train.seed`). Writes to DIR (default
EXP/report): summary.csv (a row per run), table.md (the paper's layout), pictures as PNG and SVG
(matplotlib, no global backend state) and index.html showing them together; never over a file of
those names that no report wrote, or that changed since (DIR may hold the user's own files). The runs
are read and tabled by `tables`, the pictures drawn by `pictures`; this module writes the files and the page.

The score of a run is its task's main metric (results' best.metric) on the first eval split at the
end of training, shown x100 as mean ± sample std over seeds.
"""

from __future__ import annotations
__import__("spafit_jax.launch").launch.require_extra(__name__)  # the [train] extra, before its imports

import html
import sys
from collections.abc import Sequence
from pathlib import Path

from spafit_jax.after_training import outputs
from spafit_jax.experiments.pictures import PICTURES
from spafit_jax.experiments.tables import (
    Groups, ReportError, caption, collect, summary_rows, table, table_markdown, write_csv,
)


COMMAND = "report"  # its marker in --out: .spafit-report.json
_STYLE = ("<style>body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} "
          "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right} td:first-child{text-align:left} "
          "img{max-width:100%}</style>")


def write_html(groups: Groups, left_out: dict[str, str], pictures: list[str], path: Path, title: str) -> None:
    """index.html: the table, the cells left out (failed, unfinished, damaged) and every picture (SVG, linking to the PNG)."""
    header, rows = table(groups)
    esc = html.escape
    cells = "".join("<tr>" + "".join(f"<td>{'<b>' + esc(t) + '</b>' if best else esc(t)}</td>" for t, best in row)
                    + "</tr>\n" for row in rows)
    parts = [f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{esc(title)}</title>{_STYLE}</head>",
             f"<body><h1>{esc(title)}</h1><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>\n"
             + cells + f"</table><p>{esc(caption(groups))}</p>",
             "<p><a href='summary.csv'>summary.csv</a> · <a href='table.md'>table.md</a></p>"]
    if left_out:
        parts.append("<h2>Left out of the report</h2><ul>" + "".join(f"<li>{esc(k)}: {esc(v)}</li>"
                                                                     for k, v in left_out.items()) + "</ul>")
    for svg in (p for p in pictures if p.endswith(".svg")):
        png = svg[:-4] + ".png"
        parts.append(f"<h2>{esc(svg[:-4].replace('_', ' '))}</h2><a href='{png}'><img src='{svg}' alt='{esc(svg)}'></a>")
    path.write_text("\n".join(parts) + "\n</body></html>\n", encoding="utf-8")


FILES = ("summary.csv", "table.md", "index.html")  # and the pictures, named by what they show


def write_report(exp: str | Path | None, folders: Sequence[str | Path] = (), out: str | Path | None = None) -> dict[str, Path]:
    """Writes summary.csv, table.md, the pictures and index.html to `out` (default EXP/report); returns {file name: path}.

    `out` may be a new folder, or one that holds other files: a file of the same name is replaced only where an
    earlier report wrote it and nobody changed it since (`outputs.write_files`, the marker `.spafit-report.json`),
    else refused before any work."""
    out = Path(out) if out is not None else Path(exp if exp is not None else folders[0]) / "report"
    outputs.check_files_ours(out, FILES, COMMAND)
    runs, left_out = collect(exp, folders)
    for cell, why in left_out.items():
        print(f"left out {cell}: {why}", file=sys.stderr)
    if not runs:
        raise ReportError(f"no finished runs (results.json) in {exp}/runs or the folders given; run the experiment first")
    groups = Groups(runs)

    def build(folder: Path) -> None:
        write_csv(summary_rows(runs), folder / "summary.csv")
        (folder / "table.md").write_text(table_markdown(groups, left_out), encoding="utf-8")
        pictures = [name for plot in PICTURES.values() for name in plot(groups, folder)]
        write_html(groups, left_out, pictures, folder / "index.html", f"spafit_jax report: {Path(exp or out).name}")

    files = outputs.write_files(out, build, COMMAND)
    return {name: files[name] for name in ["summary.csv", "table.md", *sorted(set(files) - set(FILES)), "index.html"]}
