"""The HTML renderer: `report/index.html` (self-contained: figures inlined as PNG, no script, no network),
`report/figures/*.png` and `report/tables/*.csv`, all from a :class:`StudyAnalysis`."""

from __future__ import annotations

import base64
import html
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from memlens.report import figures
from memlens.report import membership as mb
from memlens.report.analysis import StudyAnalysis
from memlens.report.headline import Headline
from memlens.report.mdtable import pm
from memlens.report.section import Block, Figure, Omission, Section, Table, Text
from memlens.store import StudyLayout, atomic_write_json, atomic_write_text

INPUTS_STAMP = ".inputs.json"  # the analysis' input fingerprint, next to index.html
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{margin-bottom:0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table.data{border-collapse:collapse;font-size:.85em;margin:.5em 0}
table.data th,table.data td{border:1px solid #ccc;padding:.25em .5em;text-align:right;vertical-align:top}
table.data th{background:#f3f3f3}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.omitted{color:#666;font-style:italic}.warn{background:#fff3cd;padding:.5em;border-left:4px solid #e0a800}
.ok{color:#1b6e2d}.src{font-size:.75em;color:#888;margin:0}.headline{font-size:1.1em}
.finding{margin:.6em 0}.holds .verdict{color:#1b6e2d;font-weight:bold}
.does-not-hold .verdict{color:#555;font-weight:bold}.reversed .verdict{color:#b00020;font-weight:bold}
.inconclusive .verdict,.per-rate .verdict{color:#8a6d00;font-weight:bold}
nav a{margin-right:1em;font-size:.9em}pre{white-space:pre-wrap;font-size:.8em;background:#f7f7f7;padding:.5em}
"""


@dataclass
class RenderedReport:
    index: Path  # report/index.html
    figures: dict[str, Path]  # figure name -> its PNG


def inline_html(text: str) -> str:
    """Text as HTML: escaped, `code` spans in <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def _figure(section: Section, paths: dict[str, Path]) -> str:
    spec = section.figure
    encoded = base64.b64encode(paths[spec.name].read_bytes()).decode()
    caption = html.escape(spec.caption)
    return (f'<figure><img src="data:image/png;base64,{encoded}" alt="{caption}" data-name="{spec.name}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _value(value: object) -> str:
    """One cell of a table whose values are not all plain (the study table's AUC cells)."""
    if isinstance(value, mb.AucCell):
        return (f"{pm(value.auc, value.low, value.high)}<br><small>{value.trainable_params:,} params "
                f"({value.trainable_pct:.2g}%)</small>")
    return html.escape(str(value))


def _table(table: Table) -> str:
    frame = table.shown[table.columns] if table.columns else table.shown
    if any(isinstance(v, mb.AucCell) for v in frame.to_numpy().ravel()):
        body = frame.astype(object).map(lambda v: v if pd.isna(v) else _value(v)).to_html(
            index=False, border=0, escape=False, classes="data", na_rep=table.empty)
    else:
        body = frame.to_html(index=False, border=0, classes="data", na_rep=table.empty,
                             float_format=lambda v: f"{v:.4g}")
    return f'<div class="table" data-name="{table.name}">{body}<p class="src">tables/{table.name}.csv</p></div>'


def _omit(omission: Omission) -> str:
    return f'<p class="omitted"><b>{html.escape(omission.what)}</b> omitted: {html.escape(omission.reason)}</p>'


def _block(block: Block, section: Section, paths: dict[str, Path]) -> str:
    if isinstance(block, Text):
        style = f' class="{block.style}"' if block.style else ""
        return f"<p{style}>{inline_html(block.text)}</p>"
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Figure):
        return _figure(section, paths)
    return _omit(block.omission)


def section_html(section: Section, paths: dict[str, Path]) -> str:
    """One section as HTML: its blocks (its figure inlined from `paths`), or why it is omitted."""
    body = _omit(section.omitted) if section.omitted else "".join(_block(b, section, paths) for b in section.blocks())
    return f'<section id="{section.anchor}"><h2>{html.escape(section.title)}</h2>{body}</section>'


def _headline(h: Headline, paths: dict[str, Path]) -> str:
    if h.omitted:
        return section_html(h, paths)
    text = " ".join(html.escape(s) for s in h.sentences)
    body = (f'<p class="headline">{text}</p>{_figure(h, paths)}<details><summary>Every configuration</summary>'
            f'{_table(Table("headline", h.configs))}</details>')
    return f'<section id="{h.anchor}"><h2>{html.escape(h.title)}</h2>{body}</section>'


def _findings(a: StudyAnalysis) -> str:
    items = "".join(
        f'<li class="finding {"per-rate" if " at lr " in f.verdict else f.verdict.replace(" ", "-")}">'
        f'<b>{html.escape(f.title)}'
        f'{html.escape(", " + f.scope) if f.scope else ""}</b>: '
        f'<span class="verdict">{f.verdict}</span>. {html.escape(f.reason)}</li>' for f in a.findings)
    return (f'<section id="findings"><h2>Findings</h2><p>Whether each finding of the 2024 study (Savine et al.) '
            f"holds in this study's data:</p>{_design_note(a)}<ul class=\"findings\">{items}</ul></section>")


def _design_note(a: StudyAnalysis) -> str:
    return f'<p class="src">{html.escape(a.design_note)}</p>' if a.design_note else ""


def _failures(a: StudyAnalysis) -> str:
    if not a.failures:
        return '<section id="failures"><h2>Failures</h2><p class="ok">No cell failed.</p></section>'
    missing = "" if a.nothing_yet else "; their results are missing from every figure and table above"
    parts = [f'<p class="warn">{len(a.failures)} failure(s){missing}. Fix the cause and rerun <code>memlens run</code> '
             "(finished stages are kept).</p>"]
    for record in a.failures:
        parts.append(f'<details class="failure"><summary><code>{html.escape(record.run_id)}</code>, stage '
                     f"<b>{html.escape(str(record.stage))}</b>: {html.escape(str(record.error))}</summary>"
                     f"<pre>{html.escape(record.traceback or '')}</pre></details>")
    return f'<section id="failures"><h2>Failures</h2>{"".join(parts)}</section>'


def _overview(a: StudyAnalysis) -> str:
    study, env, grid = a.study, a.environment, a.study.grid
    data = study.data
    return (f"<p>Model <code>{html.escape(study.model.name_or_path)}</code>, data "
            f"<code>{html.escape(data.source)}</code> (membership design: "
            f"{'; '.join(inline_html(d) for d in a.describe_designs())}). Grid: matrices "
            f"{', '.join('[' + ', '.join(t) + ']' for t in grid.target_modules)}, "
            f"ranks {grid.rank}, canary copies {grid.canary_copies} ({study.canary.mode} mode), seeds {grid.seed}, "
            f"record draws {grid.draw}, learning rates {grid.learning_rate or [study.train.learning_rate]}. "
            f"{len(a.runs)} run(s) with results; {len(a.failures)} failure(s).</p>"
            f"<p class=\"src\">Device {html.escape(str(env.device))}; {html.escape(env.versions(file_order=True))}; "
            f"git {html.escape(str(env.git_commit))}; Python {env.python}.</p>")


def page(a: StudyAnalysis, paths: dict[str, Path]) -> str:
    """The whole page; `paths` are the written figures (name -> PNG), inlined. With no run's results: the
    overview, why there is nothing to report yet, and the failures when there are."""
    name = html.escape(a.study.name)
    head = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>memlens report: {name}</title>"
            f"<style>{CSS}</style></head><body><h1>memlens report: {name}</h1>"
            f"<p class=\"src\">generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}</p>")
    if a.nothing_yet:
        failures = _failures(a) if a.failures else ""
        return (f'{head}{_overview(a)}<section id="nothing">'
                f'<p class="omitted">{inline_html(a.nothing_yet)}</p></section>'
                f"{failures}</body></html>")
    nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in a.sections)
    body = "".join(section_html(s, paths) for s in a.sections)
    return (f'{head}{_headline(a.headline, paths)}{_overview(a)}<nav><a href="#headline">Headline</a><a '
            f'href="#findings">Findings</a>{nav}<a href="#failures">Failures</a></nav>{_findings(a)}{body}'
            f"{_failures(a)}</body></html>")


def write_sections(out: Path, sections: list[Section], tables: dict[str, pd.DataFrame]) -> dict[str, Path]:
    """Write `out/tables/<name>.csv` (`tables`) and `out/figures/<name>.png` (the figures of `sections`), removing
    those of an earlier build; returns the figures' paths by name."""
    for folder in (out / "figures", out / "tables"):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():  # a figure or table that can no longer be made must not linger
            stale.unlink()
    for name, frame in tables.items():
        frame.to_csv(out / "tables" / f"{name}.csv", index=False)
    paths = {}
    for section in sections:
        if section.figure and not section.omitted:
            fig, dpi = figures.draw(section)
            paths[section.figure.name] = figures.save(fig, out / "figures" / f"{section.figure.name}.png", dpi)
    return paths


def write_index(out: Path, html_page: str, inputs: dict) -> Path:
    """`out/index.html` and the fingerprint of the inputs it was built from (report_is_current compares it)."""
    index = out / "index.html"
    atomic_write_text(index, html_page)
    atomic_write_json(out / INPUTS_STAMP, inputs)
    os.utime(index)
    return index


def write_html(a: StudyAnalysis) -> RenderedReport:
    """Write `<root>/report/` (index.html, figures/, tables/) from the analysis."""
    out = StudyLayout(a.root).report
    paths = write_sections(out, [a.headline, *a.sections], a.tables())
    return RenderedReport(index=write_index(out, page(a, paths), a.inputs), figures=paths)
