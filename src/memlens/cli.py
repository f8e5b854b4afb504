"""The `memlens` command line: a thin layer over the stage functions."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from memlens.config import ConfigError, StudyConfig, load_study

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Measure what fine-tuned LMs memorize.")
attack_app = typer.Typer(no_args_is_help=True, help="Run one attack stage on a study's finished runs.")
app.add_typer(attack_app, name="attack")
console = Console(stderr=True)

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


@app.command("config-reference")
def config_reference() -> None:
    """Print the study-file reference (Markdown) generated from the config objects."""
    from memlens.docs import config_reference_markdown

    typer.echo(config_reference_markdown())


if __name__ == "__main__":  # pragma: no cover
    app()
