"""The `memlens` command line: a thin layer over :mod:`memlens.runner` (every command that writes a study
folder goes through it, so each takes the study lock and checks the folder's configuration).

Everything memlens prints that comes from a user (record texts, config values, paths, errors) is printed
as plain text, never interpreted as Rich markup.

The commands import what they run when they run it (the runner, the audit, torch, transformers, PEFT): `--help`,
`--version` and what is refused before any model is needed answer without them (`benchmarks/cli_startup.py`)."""

from __future__ import annotations

import errno
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from memlens import __version__
from memlens.config import ConfigError, load_audit, load_study

if TYPE_CHECKING:
    from memlens.config import AuditConfig, StudyConfig
    from memlens.runner import StudySummary

# The stages and what --force redoes, for the options' help (memlens.study.stage.STAGE_NAMES and
# memlens.runner.FORCEABLE, which import torch; tests/test_cli.py checks they are the same)
STAGE_NAMES = ("finetune", "references", "mia", "extraction")
FORCEABLE = (*STAGE_NAMES, "report")


def run_study(*args, **kwargs):
    """:func:`memlens.runner.run_study`, imported when a command runs a study."""
    from memlens.runner import run_study as run

    return run(*args, **kwargs)


def run_audit(*args, **kwargs):
    """:func:`memlens.auditing.audit`, imported when the audit's inputs passed the checks that need no model."""
    from memlens.auditing import audit

    return audit(*args, **kwargs)


def _locked_error() -> type[Exception]:
    from memlens.store.lock import StudyLockedError

    return StudyLockedError


app = typer.Typer(add_completion=False, no_args_is_help=True, help="Measure what fine-tuned LMs memorize.")
attack_app = typer.Typer(no_args_is_help=True, help="Run one attack stage on a study's fine-tuned runs.")
app.add_typer(attack_app, name="attack")
learned_app = typer.Typer(no_args_is_help=True, help="The learned attack (LT-MIA): train its classifier on studies.")
app.add_typer(learned_app, name="learned-attack")
console = Console(stderr=True, soft_wrap=True)  # long paths and errors stay on one line
STATE_COLOURS = {"done": "green", "running": "cyan", "failed": "red", "interrupted": "yellow", "pending": "white",
                 "disabled": "dim", "damaged": "red"}

StudyArg = Annotated[Path, typer.Argument(help="Study YAML file.", exists=True, dir_okay=False)]
FolderArg = Annotated[Path, typer.Argument(help="Study output folder.", exists=True, file_okay=False)]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Output folder (overrides `out:`).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a field: --set train.epochs=1")]
NoProgressOpt = Annotated[bool, typer.Option("--no-progress", help="No progress bars.")]
ExecutorOpt = Annotated[Optional[str], typer.Option("--executor", help="local or ray (overrides executor.kind).")]


class _State:
    quiet = False


def say(message: str, style: str | None = None) -> None:
    """Print a line on stderr as plain text (unless --quiet)."""
    if not _State.quiet:
        console.print(Text(message, style=style or ""), highlight=False)


def _fail(exc: Exception) -> None:
    console.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False)
    raise typer.Exit(2)


# Faults of the machine, not of memlens: said in one line (what, where, what to do), without a traceback.
DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}


def _fail_disk(exc: OSError) -> None:
    where = f" writing {exc.filename}" if exc.filename else ""
    console.print(Text.assemble(("error: ", "bold red"), f"{DISK_ERRORS[exc.errno]}{where}. Every file memlens "
                                "writes is replaced atomically, so nothing finished is lost or half-written: free "
                                "the space (or fix the permission) and run the same command again to resume."),
                  highlight=False)
    raise typer.Exit(2)


def _study(path: Path | None, out: Path | None, overrides: list[str] | None) -> StudyConfig:
    extra = list(overrides or [])
    if out is not None:
        extra.append(f"out={out}")
    return load_study(path, extra)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"memlens {__version__}")
        raise typer.Exit()


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
          quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and the final paths.")] = False,
          version: Annotated[bool, typer.Option("--version", help="Print memlens' version and exit.",
                                                callback=_version, is_eager=True)] = False,
          ) -> None:
    _State.quiet = quiet
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    # force: a library imported earlier (absl, via rouge-score) may already have configured the root logger
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s", force=True)
    if quiet:  # transformers logs through its own handler, which the root logger's level does not reach: it reads
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"  # this when imported, and is told directly if it already is
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()


def _run(study: Path, out: Path | None, overrides: list[str] | None, *, only: list[str] | None = None,
         force: list[str] | None = None, progress: bool = True) -> None:
    """Load the study, run it through the runner, print the summary; exit 2 on bad input, 1 on a failed cell."""
    try:
        cfg = _study(study, out, overrides)
        summary = run_study(cfg, force=force, only=only, show_progress=progress and not _State.quiet)
    except (ConfigError, _locked_error()) as exc:
        _fail(exc)
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        _fail_disk(exc)
    _print_summary(summary)
    if not summary.ok:
        raise typer.Exit(1)


@app.command()
def run(study: StudyArg, out: OutOpt = None, set_: SetOpt = None,
        force: Annotated[Optional[list[str]], typer.Option(
            "--force", help=f"Redo a stage: {', '.join(FORCEABLE)} (finetune redoes everything after it).")] = None,
        only: Annotated[Optional[list[str]], typer.Option(
            "--only", help=f"Run only these stages ({', '.join(STAGE_NAMES)}); no report.")] = None,
        executor: ExecutorOpt = None, no_progress: NoProgressOpt = False) -> None:
    """Run the whole study: fine-tune every cell, attack it, write the report. Resumable; exit 1 if a cell failed."""
    overrides = list(set_ or []) + ([f"executor.kind={executor}"] if executor else [])
    _run(study, out, overrides, only=only, force=force, progress=not no_progress)


@app.command()
def finetune(study: StudyArg, out: OutOpt = None, set_: SetOpt = None, executor: ExecutorOpt = None,
             no_progress: NoProgressOpt = False) -> None:
    """Fine-tune every grid cell (finished cells are skipped): `memlens run --only finetune`."""
    overrides = list(set_ or []) + ([f"executor.kind={executor}"] if executor else [])
    _run(study, out, overrides, only=["finetune"], progress=not no_progress)


@attack_app.command("mia")
def attack_mia(study: StudyArg, out: OutOpt = None, set_: SetOpt = None, no_progress: NoProgressOpt = False) -> None:
    """Membership inference on the study's fine-tuned runs (and their reference adapters, when the study has
    them): `memlens run --only mia`."""
    _run(study, out, set_, only=["mia"], progress=not no_progress)


@attack_app.command("extraction")
def attack_extraction(study: StudyArg, out: OutOpt = None, set_: SetOpt = None,
                      no_progress: NoProgressOpt = False) -> None:
    """Prompted-prefix extraction and canary exposure on the fine-tuned runs: `memlens run --only extraction`."""
    _run(study, out, set_, only=["extraction"], progress=not no_progress)


# `attack extract`: the command's name before it took its stage's name
attack_app.command("extract", hidden=True)(attack_extraction)


def _print_summary(summary: StudySummary) -> None:
    done = sum(o.state == "done" for o in summary.outcomes)
    say(f"{done}/{len(summary.outcomes)} cell(s) complete in {summary.out}")
    if summary.pending:
        say(f"{len(summary.pending)} cell(s) have stages left for `memlens run`")
    for outcome in summary.failed:
        last = (outcome.error or "").strip().splitlines()[-1:] or ["(no error recorded)"]
        console.print(Text.assemble(("failed ", "red"), f"{outcome.run_id}: {last[0]}"), highlight=False)
    if summary.report_error:
        last = summary.report_error.strip().splitlines()[-1]
        console.print(Text.assemble(("report failed: ", "red"), last), highlight=False)
    if summary.report:
        typer.echo(f"report: {summary.report}")


@app.command()
def status(out: FolderArg) -> None:
    """Which cells and stages are done, running, failed (with the error) or pending."""
    from rich.table import Table

    from memlens.store import StudyLayout
    from memlens.study.cell import study_problems, study_status
    from memlens.study.status import REPORT_FAILURE, read_status

    try:
        frame, problems = study_status(out), study_problems(out)
    except ConfigError as exc:
        _fail(exc)
    table = Table(title=Text(f"memlens study {out}"))
    for column in ["run_id", *STAGE_NAMES, "error"]:
        table.add_column(column, overflow="fold")
    for row in frame.to_dict("records"):
        states = [Text(row[s], style=STATE_COLOURS[row[s]]) for s in STAGE_NAMES]
        table.add_row(Text(row["run_id"]), *states, Text(row["error"] if isinstance(row["error"], str) else ""))
    out_console = Console()
    out_console.print(table)
    layout = StudyLayout(out)
    report_failure = read_status(layout, REPORT_FAILURE)
    index = layout.report / "index.html"
    if report_failure:
        out_console.print(Text.assemble("report: ", ("failed ", "red"), str(report_failure.error)), highlight=False)
    else:
        out_console.print(Text(f"report: {index if index.exists() else 'pending'}"), highlight=False)
    counts = frame[list(STAGE_NAMES)].stack().value_counts().to_dict()
    out_console.print(Text("stages: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))), highlight=False)
    for problem in problems:
        out_console.print(Text.assemble(("damaged: ", "red"), problem), highlight=False)


@app.command()
def report(
    out: FolderArg,
    markdown: Annotated[Optional[Path], typer.Option(
        "--markdown", dir_okay=False,
        help="Also write the findings document (Markdown) here, e.g. docs/findings.md; its figures are copied "
             "into the folder named after it (docs/findings/, whose PNGs are replaced).")] = None,
    note: Annotated[Optional[str], typer.Option(
        "--note", help="With --markdown: a remark shown verbatim as the operator's note (e.g. what else ran on "
                       "the machine during the study).")] = None,
    with_: Annotated[Optional[list[Path]], typer.Option(
        "--with", help="With --markdown: another study folder (another model or regime) whose verdicts join this "
                       "one's in the document's opening table; repeat for several.")] = None,
) -> None:
    """(Re)write the study's HTML report from its results; with --markdown, also the findings document."""
    command = shlex.join(["memlens", "report", str(out), *(["--markdown", str(markdown)] if markdown else []),
                          *(["--note", note] if note else []), *(a for c in with_ or [] for a in ("--with", str(c)))])
    from memlens.runner import write_report

    try:
        path, written = write_report(out, markdown, command=command, note=note, companions=with_)
    except (ConfigError, _locked_error()) as exc:
        _fail(exc)
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        _fail_disk(exc)
    typer.echo(f"report: {path}")
    if written is not None:
        typer.echo(f"findings: {written}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("memlens-out/demo"),
    set_: SetOpt = None,
    synthetic: Annotated[bool, typer.Option(
        "--synthetic", help="Build the synthetic data and tiny model even when ../shared exists.")] = False,
    no_progress: NoProgressOpt = False,
) -> None:
    """A complete small study with nothing downloaded (shared fixtures if present, else built here)."""
    from memlens.demo import run_demo

    try:
        summary = run_demo(out, show_progress=not no_progress and not _State.quiet, synthetic=synthetic,
                           overrides=set_)
    except (ConfigError, _locked_error()) as exc:
        _fail(exc)
    _print_summary(summary)
    if not summary.ok:
        raise typer.Exit(1)


def _check_audit(cfg: AuditConfig) -> None:
    """The audit's checks that read no model and import no torch: the target names a folder or a possible hub id,
    the record files exist, the recipe file reads."""
    from memlens.auditing.target import check_target
    from memlens.config import read_recipe
    from memlens.data import check_record_source

    check_target(cfg.target)
    for field in ("members", "suspect", "non_members", "canaries"):
        if getattr(cfg, field) is not None:
            check_record_source(getattr(cfg, field), {"data.source": f"--{field.replace('_', '-')} (audit.{field})"})
    if cfg.train_config is not None:
        read_recipe(cfg.train_config)


def _option(name: str, help_: str):
    return typer.Option(name, help=help_)


@app.command()
def audit(
    config: Annotated[Optional[Path], typer.Argument(
        help="YAML file whose `audit:` section holds the fields below (the options override it).", exists=True,
        dir_okay=False)] = None,
    target: Annotated[Optional[str], _option("--target", "PEFT adapter folder, full model folder or hub id, or a "
                                             "memlens run folder.")] = None,
    base: Annotated[Optional[str], _option("--base", "Base model (default: the adapter's base_model_name_or_path, a "
                                           "run folder's study model); required for a full model.")] = None,
    members: Annotated[Optional[str], _option("--members", "Records known to be in the training set: .jsonl, .csv, "
                                              ".parquet, .txt (one a line) or hub:NAME:SPLIT.")] = None,
    suspect: Annotated[Optional[str], _option("--suspect", "Instead of --members: records whose use is in question "
                                              "(same formats); answers whether the set was used (p-value) and, with "
                                              "--references, what share of it.")] = None,
    non_members: Annotated[Optional[str], _option("--non-members", "Records known not to be in it (same "
                                                  "formats).")] = None,
    canaries: Annotated[Optional[str], _option("--canaries", "Records inserted in the training set (a `copies` "
                                               "column if repeated, a `secret` column for exposure).")] = None,
    text_field: Annotated[Optional[str], _option("--text-field", "Column holding each record's text (default "
                                                 "text).")] = None,
    group: Annotated[Optional[str], _option("--group", "Each record's document (a column, or a regex over the id "
                                            "whose first group is the document, e.g. '^(\\d+)_'): dataset "
                                            "inference then counts documents (its halves, test, power and placebo), "
                                            "the share is also given per document, and the bag-of-words folds and "
                                            "the references' halves keep documents whole.")] = None,
    out: OutOpt = None,
    references: Annotated[Optional[int], _option("--references", "Reference models to train for LiRA and RMIA "
                                                 "(needs --train-config).")] = None,
    train_config: Annotated[Optional[str], _option("--train-config", "How the target was trained: YAML or JSON in the "
                                                   "Trainer's names (num_train_epochs, learning_rate...) or memlens' "
                                                   "train names, or MemlensCallback's memlens-recipe.json; what it "
                                                   "leaves out takes the Trainer's defaults.")] = None,
    load_in_8bit: Annotated[Optional[bool], typer.Option("--load-in-8bit/--no-8bit", help="Load the base model in "
                                                         "8 bits (bitsandbytes).")] = None,
    set_: SetOpt = None,
    no_progress: NoProgressOpt = False,
) -> None:
    """Audit a model you already fine-tuned: membership inference, extraction and canaries against records known
    to be in its training set and records known not to be; writes results, report and model-card.md."""
    fields = {"target": target, "base": base, "members": members, "suspect": suspect, "non_members": non_members,
              "canaries": canaries,
              "text_field": text_field, "group": group, "out": str(out) if out else None, "references": references,
              "train_config": train_config, "load_in_8bit": load_in_8bit}
    try:  # what needs no model is refused before the workflow (torch, transformers) is imported
        _check_audit(load_audit(config, set_, **{k: v for k, v in fields.items() if v is not None}))
        summary = run_audit(config, overrides=set_, show_progress=not no_progress and not _State.quiet, **fields)
    except (ConfigError, _locked_error()) as exc:
        _fail(exc)
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        _fail_disk(exc)
    leak = summary.report.analysis.leak
    if not leak.omitted:
        say(f"verdict: {leak.verdict}. {' '.join(leak.sentences)}")
    typer.echo(f"report: {summary.report.index}")
    typer.echo(f"markdown: {summary.report.markdown}")
    typer.echo(f"model card: {summary.model_card}")


@learned_app.command("train")
def learned_attack_train(
    folders: Annotated[list[Path], typer.Argument(help="Study output folders with finished runs.", exists=True,
                                                  file_okay=False)],
    out: Annotated[Path, typer.Option("--out", help="The weights file to write (.safetensors); its card is written "
                                      "beside it (.card.json).")],
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Training epochs (the best on 10% of the runs, held "
                                        "out, is kept).")] = 12,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the held-out runs and of training.")] = 0,
) -> None:
    """Train the learned attack on every finished run of the study folders (members known by construction); score
    with it through `{type: learned, params: {weights: FILE}}` in mia.attacks."""
    if not out.name.endswith(".safetensors"):
        _fail(ConfigError(f"--out: {out} must end in .safetensors (the weights; the card goes beside it)"))
    from memlens.attacks.learned import card_path
    from memlens.attacks.learned_training import train_weights

    try:
        path = train_weights(folders, out, epochs=epochs, seed=seed)
    except ConfigError as exc:
        _fail(exc)
    typer.echo(f"weights: {path}")
    typer.echo(f"card: {card_path(path)}")


@app.command("config-reference")
def config_reference() -> None:
    """Print the study-file reference (Markdown) generated from the config objects."""
    from memlens.docs import config_reference_markdown

    typer.echo(config_reference_markdown())


if __name__ == "__main__":  # pragma: no cover
    app()
