"""The `memlens` command line: a thin layer over the stage functions."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from memlens.config import ConfigError, StudyConfig, load_study

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Measure what fine-tuned LMs memorize.")
attack_app = typer.Typer(no_args_is_help=True, help="Run one attack stage on a study's finished runs.")
app.add_typer(attack_app, name="attack")
console = Console(stderr=True, soft_wrap=True)  # long paths and errors stay on one line

StudyArg = Annotated[Path, typer.Argument(help="Study YAML file.", exists=True, dir_okay=False)]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Output folder (overrides `out:`).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a field: --set train.epochs=1")]


def _study(path: Path | None, out: Path | None, overrides: list[str] | None) -> StudyConfig:
    extra = list(overrides or [])
    if out is not None:
        extra.append(f"out={out}")
    return load_study(path, extra)


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
    raise typer.Exit(2)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


@app.command()
def finetune(study: StudyArg, out: OutOpt = None, set_: SetOpt = None) -> None:
    """Fine-tune every grid cell (finished cells are skipped)."""
    from memlens.train.sweep import finetune_study

    try:
        cfg = _study(study, out, set_)
        runs = finetune_study(cfg)
    except ConfigError as exc:
        _fail(exc)
    console.print(f"{len(runs)} run(s) in {cfg.out_dir / 'runs'}")


@attack_app.command("mia")
def attack_mia(study: StudyArg, out: OutOpt = None, set_: SetOpt = None) -> None:
    """Membership inference on the study's finished runs."""
    from memlens.attacks.mia import run_mia

    try:
        cfg = _study(study, out, set_)
        results = run_mia(cfg)
    except ConfigError as exc:
        _fail(exc)
    console.print(f"{len(results)} result row(s) in {cfg.out_dir / 'results.parquet'}")


@attack_app.command("extract")
def attack_extract(study: StudyArg, out: OutOpt = None, set_: SetOpt = None) -> None:
    """Prompted-prefix extraction and canary exposure on the study's finished runs."""
    from memlens.attacks.extraction import run_extraction

    try:
        cfg = _study(study, out, set_)
        results = run_extraction(cfg)
    except ConfigError as exc:
        _fail(exc)
    console.print(f"{len(results)} result row(s) in {cfg.out_dir / 'results.parquet'}")


@app.command()
def run(
    study: StudyArg,
    out: OutOpt = None,
    set_: SetOpt = None,
    force: Annotated[Optional[list[str]], typer.Option(
        "--force", help="Redo a stage: finetune (and all after it), mia, extraction or report.")] = None,
    executor: Annotated[Optional[str], typer.Option("--executor", help="local or ray (overrides executor.kind).")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
) -> None:
    """Run the whole study: fine-tune every cell, attack it, write the report. Resumable; exit 1 if a cell failed."""
    from memlens.runner import run_study
    from memlens.store.lock import StudyLockedError

    overrides = list(set_ or []) + ([f"executor.kind={executor}"] if executor else [])
    try:
        cfg = _study(study, out, overrides)
        summary = run_study(cfg, force=force, show_progress=not no_progress)
    except (ConfigError, StudyLockedError) as exc:
        _fail(exc)
    _print_summary(summary)
    if not summary.ok:
        raise typer.Exit(1)


def _print_summary(summary) -> None:
    done = sum(o.state == "done" for o in summary.outcomes)
    console.print(f"{done}/{len(summary.outcomes)} cell(s) complete in {summary.out}")
    for outcome in summary.failed:
        last = (outcome.error or "").strip().splitlines()[-1:] or ["(no error recorded)"]
        console.print(f"[red]failed[/] {outcome.run_id}: {last[0]}", highlight=False)
    if summary.report_error:
        console.print(f"[red]report failed:[/] {summary.report_error.strip().splitlines()[-1]}", highlight=False)
    if summary.report:
        typer.echo(f"report: {summary.report}")


@app.command()
def status(out: Annotated[Path, typer.Argument(help="Study output folder.", exists=True, file_okay=False)]) -> None:
    """Which cells and stages are done, running, failed (with the error) or pending."""
    from rich.table import Table

    from memlens.runner import REPORT_FAILURE, read_status, study_status
    from memlens.store import StudyLayout

    try:
        frame = study_status(out)
    except ConfigError as exc:
        _fail(exc)
    colours = {"done": "green", "running": "cyan", "failed": "red", "interrupted": "yellow", "pending": "white",
               "disabled": "dim"}
    table = Table(title=f"memlens study {out}")
    for column in ["run_id", "finetune", "mia", "extraction", "error"]:
        table.add_column(column, overflow="fold")
    for row in frame.itertuples(index=False):
        states = [f"[{colours[s]}]{s}[/]" for s in (row.finetune, row.mia, row.extraction)]
        table.add_row(row.run_id, *states, row.error if isinstance(row.error, str) else "")
    out_console = Console()
    out_console.print(table)
    layout = StudyLayout(out)
    report_failure = read_status(layout, REPORT_FAILURE)
    index = layout.report / "index.html"
    if report_failure:
        out_console.print(f"report: [red]failed[/] {report_failure.get('error')}", highlight=False)
    else:
        out_console.print(f"report: {index if index.exists() else 'pending'}", highlight=False)
    counts = frame[["finetune", "mia", "extraction"]].stack().value_counts().to_dict()
    out_console.print("stages: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), highlight=False)


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="Study output folder.", exists=True, file_okay=False)],
    markdown: Annotated[Optional[Path], typer.Option(
        "--markdown", dir_okay=False,
        help="Also write the findings document (Markdown) here, e.g. docs/findings.md; its figures are copied "
             "into the folder named after it (docs/findings/, whose PNGs are replaced).")] = None,
    note: Annotated[Optional[str], typer.Option(
        "--note", help="With --markdown: a remark shown verbatim as the operator's note (e.g. what else ran on "
                       "the machine during the study).")] = None,
) -> None:
    """(Re)write the study's HTML report from its results; with --markdown, also the findings document."""
    from memlens.report import build_report

    try:
        if markdown is None:
            path = build_report(out)
        else:
            from memlens.report.markdown import write_findings

            command = shlex.join(["memlens", "report", str(out), "--markdown", str(markdown),
                                  *(["--note", note] if note else [])])
            written = write_findings(out, markdown, command=command, note=note)
            path = out / "report" / "index.html"
    except ConfigError as exc:
        _fail(exc)
    typer.echo(f"report: {path}")
    if markdown is not None:
        typer.echo(f"findings: {written}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("memlens-out/demo"),
    set_: SetOpt = None,
    synthetic: Annotated[bool, typer.Option(
        "--synthetic", help="Build the synthetic data and tiny model even when ../shared exists.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
) -> None:
    """A complete small study with nothing downloaded (shared fixtures if present, else built here)."""
    from memlens.demo import run_demo
    from memlens.store.lock import StudyLockedError

    try:
        summary = run_demo(out, show_progress=not no_progress, synthetic=synthetic, overrides=set_)
    except (ConfigError, StudyLockedError) as exc:
        _fail(exc)
    _print_summary(summary)
    if not summary.ok:
        raise typer.Exit(1)


@app.command("config-reference")
def config_reference() -> None:
    """Print the study-file reference (Markdown) generated from the config objects."""
    from memlens.docs import config_reference_markdown

    typer.echo(config_reference_markdown())


if __name__ == "__main__":  # pragma: no cover
    app()
