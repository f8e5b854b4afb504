"""Run a study: every stage of every grid cell, resumably, under the study lock; then the report.

This is the main path of memlens, in order:

1. refuse a bad request before any work: unknown stages, a disabled stage asked for alone or one whose needed
   stage no cell has done (`--only`), the stages' checks (settings, and the data: records, groups, lengths,
   the bag-of-words folds), a folder written by another process (the study lock), a folder holding another
   configuration (:mod:`memlens.study.compat`), a model whose context is shorter than `data.max_length`;
2. write the resolved `study.yaml` and `environment.json`; remove damaged study-level files (rebuilt in 4)
   and make a stage pending where its per-run files are damaged (:func:`~memlens.study.stage.repair_damaged`);
3. hand the cells with stages left to do to the executor (local or Ray), which runs the
   :data:`~memlens.study.stage.STAGES` (fine-tune, reference adapters when `mia.references` > 0, membership
   inference, extraction) and records each cell's status (:mod:`memlens.study.status`) and stage wall times;
4. merge every stage's per-run files into the study-level files (idempotent: closes the gap left by a
   process killed between a run's files and their merge);
5. build the report (a failure is recorded in `status/_report.json`, not raised);
6. append the invocation to `history.jsonl`.

Every command that writes a study folder goes through here (`memlens run`, and `memlens finetune` /
`attack mia` / `attack extraction` as `run_study(only=[...])`; `memlens report` via :func:`write_report`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from memlens.config import RANDOM, ConfigError, StudyConfig, dump_study
from memlens.context import StudyContext
from memlens.data import membership_assignments
from memlens.executors import get_executor
from memlens.models import check_max_length
from memlens.report import build_report, report_is_current
from memlens.report.markdown import write_findings
from memlens.store import StudyLayout, atomic_write_json, atomic_write_parquet, atomic_write_text
from memlens.store.integrity import discard_damaged_study_files
from memlens.store.lock import StudyLock
from memlens.store.records import HistoryEntry
from memlens.study.cell import normalise_study
from memlens.study.compat import check_compatible
from memlens.study.provenance import append_history, environment_info, invocation, now
from memlens.study.stage import STAGE_NAMES, STAGES, check_needs, enabled_stages, repair_damaged, selected_stages
from memlens.study.status import REPORT_FAILURE, CellEvent, CellOutcome, read_status, remove_status, write_status

REPORT = "report"
FORCEABLE = (*STAGE_NAMES, REPORT)


@dataclass
class StudySummary:
    """What `run_study` did: outcomes per cell and whether the report was written."""

    out: Path
    outcomes: list[CellOutcome] = field(default_factory=list)
    report: Path | None = None
    report_error: str | None = None

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.state == "failed"]

    @property
    def pending(self) -> list[CellOutcome]:
        """Cells with stages left for later (a partial run: `only`)."""
        return [o for o in self.outcomes if o.state == "pending"]

    @property
    def ok(self) -> bool:
        return not self.failed and self.report_error is None


def _check_stage_names(names: list[str], option: str, valid: tuple[str, ...]) -> None:
    unknown = [s for s in names if s not in valid]
    if unknown:
        raise ConfigError(f"{option}: unknown stage(s) {unknown}; valid choices: {list(valid)}")


def run_study(study: StudyConfig, *, force: list[str] | None = None, only: list[str] | None = None,
              report: bool = True, on_event: Callable[[CellEvent], None] | None = None,
              show_progress: bool = True) -> StudySummary:
    """Run every stage of every cell of `study` not yet done, under the study lock, then write the report.

    `force`: stages to redo (`finetune` redoes everything downstream of it too; `report` rebuilds it).
    `only`: run just these stages (e.g. `["finetune"]`); the cells keep the others for later and the report
    is not written. Raises StudyLockedError / IncompatibleStudyError / ConfigError before doing any work.
    """
    study = normalise_study(study)
    force, only_list = list(force or []), (list(only) if only is not None else None)
    _check_stage_names(force, "--force", FORCEABLE)
    if only_list is not None:
        _check_stage_names(only_list, "--only", STAGE_NAMES)
    check_max_length(study.model, study.data.max_length)
    ctx = StudyContext(study, show_progress=show_progress)
    stages = selected_stages(study, only_list)
    for stage in enabled_stages(study):
        stage.check(ctx)  # the data too: nothing claims the folder before every check passed
    if only_list is not None:
        only_list = [s.name for s in stages]  # with the stages they bring along (mia: its references)
    layout = ctx.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    executor = get_executor(study.executor)  # fails early (e.g. Ray missing) before taking the lock
    summary = StudySummary(out=layout.root)
    with StudyLock(layout.root):
        check_compatible(study, layout, force)
        check_needs(ctx, stages, force)  # `--only mia` where no cell is fine-tuned: nothing could run
        started, start = now(), time.perf_counter()
        environment, error, tally = environment_info(study), None, {"cells_total": None, "cells_run": 0}
        try:
            discard_damaged_study_files(layout)  # rebuilt below by the merges
            atomic_write_json(layout.environment_file, environment)
            if not layout.study_file.exists() or layout.study_file.read_text() != dump_study(study):
                atomic_write_text(layout.study_file, dump_study(study))  # the report's and compat's input
            _record_membership(ctx)
            cells = list(ctx.cells.items())
            _invalidate(ctx, [r for r, _ in cells], force)
            repair_damaged(ctx, [r for r, _ in cells])
            todo = [c for r, c in cells if not all(s.done(ctx, r) for s in stages)]
            tally.update(cells_total=len(cells), cells_run=len(todo))
            summary.outcomes += _already_done(ctx, cells, stages, only_list)
            if todo:
                with _Progress(len(cells), len(cells) - len(todo), show_progress, on_event) as progress:
                    summary.outcomes += executor.run(ctx, todo, progress.event, only=only_list)
            merge_study_files(ctx)
            if report and only_list is None:
                summary.report, summary.report_error = _write_report(layout, REPORT in force or bool(todo))
        except BaseException as exc:  # recorded in the history, then raised as before
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            append_history(layout, HistoryEntry(
                command=invocation(), started=started, ended=now(), wall_s=time.perf_counter() - start, **tally,
                cells_done=sum(o.state == "done" for o in summary.outcomes), cells_failed=len(summary.failed),
                report=summary.report is not None, error=error, executor=study.executor.kind,
                git_commit=environment.get("git_commit"), hardware=environment.get("hardware")))
    return summary


def _record_membership(ctx: StudyContext) -> None:
    """Save the random design's coins of every record draw in the study folder (`membership.parquet`, a `draw`
    column), rewritten only when they change."""
    if RANDOM not in ctx.study.data.membership:
        return
    data = ctx.study.data
    assignment = pd.concat([membership_assignments(data.for_draw(d), ctx.data(RANDOM, d)).assign(draw=d)
                            for d in ctx.study.grid.draw], ignore_index=True)
    path = ctx.layout.membership_file
    if path.exists() and pd.read_parquet(path).equals(assignment):
        return
    atomic_write_parquet(path, assignment)


def _invalidate(ctx: StudyContext, run_ids: list[str], force: list[str]) -> None:
    """Make the forced stages pending again (`finetune` removes the runs, so everything after it too)."""
    for stage in STAGES:
        if stage.name in force:
            stage.invalidate(ctx, run_ids)


def _already_done(ctx: StudyContext, cells, stages, only) -> list[CellOutcome]:
    """Outcomes of the cells with nothing left to do, refreshing a stale status (e.g. after a kill)."""
    outcomes = []
    every = enabled_stages(ctx.study)
    layout = ctx.layout
    for run_id, cell in cells:
        if not all(s.done(ctx, run_id) for s in stages):
            continue
        done = [s.name for s in every if s.done(ctx, run_id)]
        state = "done" if len(done) == len(every) else "pending"
        outcomes.append(CellOutcome(run_id, state, None, done))
        status = read_status(layout, run_id)
        if status is None or status.state != state or (only is None and status.stages_done != done):
            write_status(layout, run_id, state, cell=cell, stages_done=done)
    return outcomes


def merge_study_files(ctx: StudyContext) -> None:
    """Rebuild every enabled stage's study-level files from the runs' per-run files (idempotent)."""
    for stage in enabled_stages(ctx.study):
        stage.merge(ctx)


def _write_report(layout: StudyLayout, force: bool) -> tuple[Path | None, str | None]:
    """Build the report; a failure is recorded in status/_report.json and returned, not raised."""
    try:
        path = (layout.report / "index.html" if not force and report_is_current(layout.root)
                else build_report(layout.root))
    except Exception as exc:
        record = write_status(layout, REPORT_FAILURE, "failed", stage=REPORT, error=exc)
        return None, record.traceback
    remove_status(layout, REPORT_FAILURE)
    return path, None


def write_report(out: Path, markdown: Path | None = None, *, command: str | None = None,
                 note: str | None = None, companions: list[Path] | None = None) -> tuple[Path, Path | None]:
    """(Re)build the HTML report of the study in `out` under its lock, and with `markdown` also the
    findings document there (opening with the verdicts of the `companions` study folders too). Returns
    (index.html, findings document or None)."""
    layout = StudyLayout(Path(out))
    if not layout.study_file.exists() and not layout.is_audit:
        raise ConfigError(f"{out}: not a memlens study folder (no {layout.study_file.name})")
    if companions and markdown is None:
        raise ConfigError("--with: companion studies join the findings document; add --markdown PATH")
    for companion in companions or []:
        if not StudyLayout(Path(companion)).study_file.exists():
            raise ConfigError(f"--with {companion}: not a memlens study folder (no {layout.study_file.name})")
    if layout.is_audit and markdown is not None:
        raise ConfigError(f"--markdown: {out} is an audit folder, whose Markdown report is report/index.md "
                          "(rewritten with the HTML)")
    with StudyLock(layout.root):
        if markdown is None:
            return build_report(layout.root), None
        written = write_findings(layout.root, markdown, command=command, note=note, companions=companions)
        return layout.report / "index.html", written


class _Progress:
    """Rich progress bar of cells (done / failed), with the running cell and stage as description."""

    def __init__(self, total: int, already: int, show: bool, forward: Callable[[CellEvent], None] | None):
        self.forward = forward
        self.failed = 0
        self.progress = Progress(TextColumn("[bold]cells"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("[red]{task.fields[failed]} failed"), TimeElapsedColumn(),
                                 TextColumn("{task.description}", markup=False), console=Console(stderr=True),
                                 disable=not show, transient=False)
        self.task = self.progress.add_task("", total=total, completed=already, failed=0)

    def __enter__(self) -> "_Progress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def event(self, event: CellEvent) -> None:
        if event.state == "running":
            stage = next((s for s in STAGE_NAMES if s not in event.stages_done), "")
            self.progress.update(self.task, description=f"{stage} {event.run_id}")
        else:  # a failure is counted here and said once, by the summary (`memlens status` shows it meanwhile)
            self.failed += event.state == "failed"
            self.progress.update(self.task, advance=1, failed=self.failed)
        if self.forward:
            self.forward(event)


__all__ = ["FORCEABLE", "StudySummary", "merge_study_files", "run_study", "write_report"]
