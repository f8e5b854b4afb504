"""Run a whole study: fine-tune -> membership inference -> extraction -> report, resumably.

Each per-run stage is *done* when its per-run file exists (written atomically by the stage):

    finetune    runs/<run_id>/            (the folder appears complete, by rename)
    mia         runs/<run_id>/mia_results.parquet
    extraction  runs/<run_id>/extraction_results.parquet

so a rerun after a kill -9 redoes only what was not finished. The study lock keeps a second process
out; `<out>/status/<run_id>.json` records each cell's state, and the traceback of a failure, which
does not stop the other cells. Nothing is skipped silently: a cell either completes every enabled
stage or is reported failed (exit code 1, failures section of the report).

Wall times: each stage that completes writes its time to `runs/<run_id>/timings.json`, and every
`run_study` invocation appends one line to `<out>/history.jsonl` (command, start/end, wall seconds,
cells, hardware), from which the findings document states how long each command took and where.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from memlens.config import CellConfig, ConfigError, StudyConfig, dump_study
from memlens.executors import CellEvent, CellOutcome, get_executor
from memlens.store import StudyLayout, atomic_write_json, atomic_write_parquet, atomic_write_text, read_results
from memlens.store.lock import StudyLock, write_lock

STAGES = ("finetune", "mia", "extraction", "report")
RUN_STAGES = STAGES[:-1]
STAGE_MARKER = {"finetune": "train.json", "mia": "mia_results.parquet", "extraction": "extraction_results.parquet"}
# Per-run files a stage writes (removed by --force so a killed forced rerun cannot keep stale ones).
STAGE_FILES = {
    "mia": ("mia_scores.parquet", "mia_results.parquet"),
    "extraction": ("extraction.parquet", "extraction_results.parquet", "exposure.parquet"),
}
# results.parquet `stage` values each stage writes.
STAGE_RESULT_ROWS = {"mia": ("mia", "utility"), "extraction": ("extraction", "exposure")}
# Config sections a stage depends on beyond the fine-tuned model: changing them is allowed only with
# --force of that stage (which recomputes it for every run of the folder).
STAGE_SECTIONS = {"mia": "mia", "extraction": "extraction"}
# Fields that may change between runs of one study folder: the grid may grow, the executor and
# device may change; `name`/`out` only label it.
FREE_FIELDS = {"name", "out", "grid", "executor", "model.device", "train.logging_steps", "mia.enabled",
               "extraction.enabled"}

STATUS_DIR = "status"
REPORT_FAILURE = "_report"
TIMINGS_FILE = "timings.json"  # runs/<run_id>/timings.json: wall seconds of each completed stage
HISTORY_FILE = "history.jsonl"  # <out>/history.jsonl: one line per run_study invocation


class IncompatibleStudyError(ConfigError):
    """The output folder holds a study made with a configuration that its results depend on."""


# --------------------------------------------------------------------------------------- stages
def enabled_stages(study: StudyConfig) -> list[str]:
    """Per-run stages this study runs, in order."""
    return ["finetune"] + [s for s in ("mia", "extraction") if getattr(study, s).enabled]


def stage_done(layout: StudyLayout, run_id: str, stage: str) -> bool:
    run_dir = layout.run_dir(run_id)
    return run_dir.is_dir() and (run_dir / STAGE_MARKER[stage]).exists()


def record_stage_time(layout: StudyLayout, run_ids: list[str], stage: str, wall_s: float) -> None:
    """Record a completed stage's wall time in `runs/<run_id>/timings.json` of each of `run_ids`.

    A stage run for several cells at once (the local executor batches them, sharing the base model)
    has one wall time: each cell records the batch's time, its size and the per-cell share (`wall_s`)."""
    finished = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for run_id in run_ids:
        path = layout.run_dir(run_id) / TIMINGS_FILE
        if not path.parent.is_dir():  # e.g. a run discarded meanwhile: nothing to annotate
            continue
        try:
            timings = json.loads(path.read_text())
        except (OSError, ValueError):
            timings = {}
        timings[stage] = {"wall_s": wall_s / len(run_ids), "batch_wall_s": wall_s, "batch_cells": len(run_ids),
                          "finished": finished}
        atomic_write_json(path, timings)


def _run_stage(stage: str, study: StudyConfig, run_ids: list[str]) -> None:
    """Run one per-run attack stage for `run_ids`, check it left its per-run files, and record its wall time."""
    start = time.perf_counter()
    if stage == "mia":
        from memlens.attacks.mia import run_mia

        run_mia(study, run_ids)
        from memlens.metrics.privacy import run_privacy_audit

        run_privacy_audit(study, run_ids)  # accountant epsilon and empirical lower bound (stage "privacy")
    elif stage == "extraction":
        from memlens.attacks.extraction import run_extraction

        run_extraction(study, run_ids)
    else:  # pragma: no cover - programming error
        raise ValueError(stage)
    layout = StudyLayout(study.out_dir)
    missing = [r for r in run_ids if not stage_done(layout, r, stage)]
    if missing:
        raise RuntimeError(f"stage {stage} finished without writing runs/<run_id>/{STAGE_MARKER[stage]} "
                           f"for {missing}")
    record_stage_time(layout, run_ids, stage, time.perf_counter() - start)


def merge_study_files(study: StudyConfig) -> None:
    """Rebuild the study-level files of each enabled attack stage from every run's per-run files, and
    upsert their rows into results.parquet.

    Each stage merges as it goes, but a process killed between writing a run's per-run files (which mark
    the stage done, so no rerun redoes it) and merging would leave that run's rows out; merging once
    more after the executor (and on a rerun with nothing left to do) closes that gap. Idempotent."""
    layout = StudyLayout(study.out_dir)
    if study.mia.enabled:
        from memlens.attacks import mia

        mia.merge_study(layout)
        from memlens.metrics.privacy import run_privacy_audit

        run_privacy_audit(study)  # idempotent: rows missing after a kill are added, others unchanged
    if study.extraction.enabled:
        from memlens.attacks import extraction

        extraction.merge_study(layout)


def _finetune(study: StudyConfig, cell: CellConfig, data=None, tokenizer=None) -> None:
    from memlens.data import load_study_data
    from memlens.train import finetune_cell

    start = time.perf_counter()
    data = data if data is not None else load_study_data(study.data)
    layout = StudyLayout(study.out_dir)
    finetune_cell(study, cell, data, layout, tokenizer)
    # Loading, training and saving, as the runner saw it (train.json's wall_time_s is the training loop).
    record_stage_time(layout, [cell.run_id(study)], "finetune", time.perf_counter() - start)


# --------------------------------------------------------------------------------------- status files
def status_path(layout: StudyLayout, run_id: str) -> Path:
    return layout.root / STATUS_DIR / f"{run_id}.json"


def read_status(layout: StudyLayout, run_id: str) -> dict | None:
    try:
        return json.loads(status_path(layout, run_id).read_text())
    except (OSError, ValueError):
        return None


def write_status(layout: StudyLayout, run_id: str, state: str, *, cell: CellConfig | None = None,
                 stage: str | None = None, stages_done: list[str] | None = None,
                 error: BaseException | None = None) -> dict:
    """Record a cell's state atomically (`running` with its stage, `done`, or `failed` with the traceback)."""
    record = {
        "run_id": run_id, "state": state, "stage": stage, "stages_done": stages_done or [],
        "cell": cell.model_dump() if cell is not None else (read_status(layout, run_id) or {}).get("cell"),
        "error": None, "traceback": None,
        "pid": os.getpid(), "host": socket.gethostname(), "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if error is not None:
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = "".join(traceback.format_exception(error))
    atomic_write_json(status_path(layout, run_id), record)
    return record


def normalise_study(study: StudyConfig) -> StudyConfig:
    """The study as it reads back from its JSON/YAML dump (what workers and `status` see)."""
    return StudyConfig.model_validate(study.model_dump(mode="json"))


def run_cell(study_dict: dict, cell_dict: dict) -> dict:
    """Fine-tune one cell and run its enabled per-run stages, skipping those already done.

    The unit of work of every executor (importable, plain-dict arguments so it pickles). A failure is
    recorded in `<out>/status/<run_id>.json` with its traceback and returned, never raised.
    Returns a :class:`CellOutcome` as a dict.
    """
    study = normalise_study(StudyConfig.model_validate(study_dict))
    cell = CellConfig.model_validate(cell_dict)
    layout = StudyLayout(study.out_dir)
    run_id = cell.run_id(study)
    done: list[str] = []
    stage = None
    try:
        for stage in enabled_stages(study):
            if not stage_done(layout, run_id, stage):
                write_status(layout, run_id, "running", cell=cell, stage=stage, stages_done=done)
                if stage == "finetune":
                    _finetune(study, cell)
                else:
                    _run_stage(stage, study, [run_id])
            done.append(stage)
    except Exception as exc:  # recorded, reported, and turned into a non-zero exit by the driver
        record = write_status(layout, run_id, "failed", cell=cell, stage=stage, stages_done=done, error=exc)
        return CellOutcome(run_id, "failed", record["traceback"], done).to_dict()
    write_status(layout, run_id, "done", cell=cell, stages_done=done)
    return CellOutcome(run_id, "done", None, done).to_dict()


# --------------------------------------------------------------------------------------- compatibility
def _flatten(obj, prefix: str = "") -> dict[str, object]:
    if isinstance(obj, dict):
        out: dict[str, object] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def config_differences(stored: dict, current: dict) -> list[tuple[str, object, object]]:
    """(field, stored value, current value) for every field that determines results and differs."""
    old, new = _flatten(stored), _flatten(current)
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key in FREE_FIELDS or key.split(".")[0] in FREE_FIELDS:
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            diffs.append((key, old.get(key, "<absent>"), new.get(key, "<absent>")))
    return diffs


def check_compatible(study: StudyConfig, layout: StudyLayout, force: list[str]) -> None:
    """Refuse an output folder whose stored study.yaml differs in a field its results depend on.
    Growing the grid is fine; changing `mia` or `extraction` settings is allowed with --force of that stage."""
    stored_path = layout.root / "study.yaml"
    if not stored_path.exists():
        return
    stored = yaml.safe_load(stored_path.read_text()) or {}
    current = study.model_dump(mode="json")
    # Fill fields added to the config since the folder was written with their defaults.
    stored = StudyConfig.model_validate(stored).model_dump(mode="json") if stored else stored
    diffs = [d for d in config_differences(stored, current)
             if not any(d[0].split(".")[0] == STAGE_SECTIONS.get(s) for s in force)]
    if diffs:
        lines = "\n".join(f"  {k}: {old!r} (stored) != {new!r} (now)" for k, old, new in diffs)
        raise IncompatibleStudyError(
            f"{layout.root} holds a study made with a different configuration:\n{lines}\n"
            "Its runs and results would mix with this one's. Use another --out, or restore these fields "
            "(adding grid values is allowed; `mia`/`extraction` settings may change with --force mia/extraction)."
        )


# --------------------------------------------------------------------------------------- environment
PACKAGES = ("memlens", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "numpy",
            "pandas", "pyarrow", "scikit-learn", "scipy", "matplotlib", "opacus", "sacrebleu", "rouge-score",
            "rapidfuzz", "pydantic", "ray", "bitsandbytes")


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment_info(study: StudyConfig) -> dict:
    """Package versions, Python, platform, torch device and the memlens git commit (if a checkout)."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    from memlens.models import resolve_device

    try:
        device = str(resolve_device(study.model.device))
    except ConfigError as exc:
        device = f"unavailable: {exc}"
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
        "packages": versions, "device": device,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(), "git_commit": _git_commit(),
        "hardware": hardware_info(device),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _cpu_model() -> str | None:
    """The CPU's marketing name (Linux /proc/cpuinfo, else what platform knows), None when unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def hardware_info(device: str | None = None) -> dict:
    """What a wall time was measured on, without the host name: CPU model and cores, torch threads,
    GPU name and count (None without CUDA), the torch device the study used, OS and architecture."""
    import torch

    cuda = torch.cuda.is_available()
    return {"cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "gpu_count": torch.cuda.device_count() if cuda else 0,
            "device": device, "os": f"{platform.system()} {platform.machine()}"}


def _invocation() -> str:
    """The command line when memlens runs from its CLI (`memlens ...` or `python -m memlens.cli ...`),
    else "python API" (run_study called from Python code, whose arguments are not a command)."""
    argv0 = (sys.argv[0] if sys.argv else "").replace(os.sep, "/")
    if argv0.rsplit("/", 1)[-1] == "memlens" or argv0.endswith("memlens/cli.py"):
        return shlex.join(["memlens", *sys.argv[1:]])
    return "python API"


def append_history(root: Path, entry: dict) -> None:
    """Append one JSON line to `<root>/history.jsonl`. The file is rewritten atomically under the
    study's write lock, so a kill leaves the old file or the new one, never a torn line."""
    path = Path(root) / HISTORY_FILE
    with write_lock(root):
        old = path.read_text() if path.exists() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        atomic_write_text(path, old + json.dumps(entry, sort_keys=True, default=str) + "\n")


# --------------------------------------------------------------------------------------- run
@dataclass
class StudySummary:
    """What `run_study` did: outcomes per cell and whether the report was written."""

    out: Path
    outcomes: list[CellOutcome] = field(default_factory=list)
    report: Path | None = None
    report_error: str | None = None

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.state != "done"]

    @property
    def ok(self) -> bool:
        return not self.failed and self.report_error is None


def study_cells(study: StudyConfig, layout: StudyLayout) -> list[tuple[str, CellConfig]]:
    """The grid's cells plus cells of finished runs already in the folder (from an earlier, other grid)."""
    cells = {c.run_id(study): c for c in study.cells()}
    for run_id in layout.finished_runs():
        if run_id not in cells and (layout.run_dir(run_id) / "cell.json").exists():
            spec = json.loads((layout.run_dir(run_id) / "cell.json").read_text())["cell"]
            cell = CellConfig.model_validate(spec)
            if cell.run_id(study) == run_id:  # same determinants: part of this study
                cells[run_id] = cell
    return list(cells.items())


def _discard_run(layout: StudyLayout, run_id: str) -> None:
    """Remove a finished run folder safely: rename it to a temp name first (atomic), then delete."""
    final = layout.run_dir(run_id)
    if final.is_dir():
        trash = final.parent / f".{run_id}.tmp-forced"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _invalidate(layout: StudyLayout, run_ids: list[str], stage: str) -> None:
    """Make `stage` pending again for `run_ids` (per-run files, then their results rows)."""
    if stage == "finetune":
        for run_id in run_ids:
            _discard_run(layout, run_id)
        return
    for run_id in run_ids:
        for name in STAGE_FILES[stage]:
            (layout.run_dir(run_id) / name).unlink(missing_ok=True)
    with write_lock(layout.root):
        results = read_results(layout)
        if len(results):
            stale = results.run_id.isin(run_ids) & results.stage.isin(STAGE_RESULT_ROWS[stage])
            if stale.any():
                atomic_write_parquet(layout.root / "results.parquet", results[~stale].reset_index(drop=True))


def run_study(study: StudyConfig, *, force: list[str] | None = None, report: bool = True,
              on_event: Callable[[CellEvent], None] | None = None, show_progress: bool = True) -> StudySummary:
    """Run every stage of every cell of `study` not yet done, under the study lock, then write the report.

    `force`: stages to redo (`finetune` redoes everything downstream of it too; `report` rebuilds it).
    Raises StudyLockedError / IncompatibleStudyError / ConfigError before doing any work.
    """
    # Round trip through JSON, as every worker and `memlens status` see the study: int defaults of float
    # fields (e.g. lora.alpha 16) become floats, so run_ids hash the same everywhere.
    study = normalise_study(study)
    force = list(force or [])
    unknown = [s for s in force if s not in STAGES]
    if unknown:
        raise ConfigError(f"--force: unknown stage(s) {unknown}; valid choices: {list(STAGES)}")
    layout = StudyLayout(study.out_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    executor = get_executor(study.executor)  # fails early (e.g. Ray missing) before taking the lock
    summary = StudySummary(out=layout.root)
    with StudyLock(layout.root):
        check_compatible(study, layout, force)
        started, start = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
        environment, error, tally = environment_info(study), None, {"cells_total": None, "cells_run": 0}
        try:
            _run_locked(study, layout, force, executor, summary, tally, on_event, show_progress, report, environment)
        except BaseException as exc:  # recorded in the history, then raised as before
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            append_history(layout.root, {
                "command": _invocation(), "started": started, "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "wall_s": time.perf_counter() - start, **tally,
                "cells_done": sum(o.state == "done" for o in summary.outcomes),
                "cells_failed": len(summary.failed), "report": summary.report is not None, "error": error,
                "executor": study.executor.kind, "git_commit": environment.get("git_commit"),
                "hardware": environment.get("hardware")})
    return summary


def _run_locked(study: StudyConfig, layout: StudyLayout, force: list[str], executor, summary: StudySummary,
                tally: dict, on_event, show_progress: bool, report: bool, environment: dict) -> None:
    """The body of :func:`run_study`, under the study lock; fills `summary`, and `tally` with the number of
    cells in the study and of cells that had something left to run."""
    resolved = dump_study(study)
    stored = layout.root / "study.yaml"
    if not stored.exists() or stored.read_text() != resolved:  # unchanged: keep it (the report's input)
        atomic_write_text(stored, resolved)
    atomic_write_json(layout.root / "environment.json", environment)
    cells = study_cells(study, layout)
    run_ids = [r for r, _ in cells]
    for stage in ("finetune", "mia", "extraction"):
        if stage in force:
            _invalidate(layout, run_ids, stage)
    stages = enabled_stages(study)
    todo = [c for r, c in cells if not all(stage_done(layout, r, s) for s in stages)]
    tally.update(cells_total=len(cells), cells_run=len(todo))
    for run_id, cell in cells:  # cells already complete: refresh a stale status (e.g. after a kill)
        if all(stage_done(layout, run_id, s) for s in stages):
            summary.outcomes.append(CellOutcome(run_id, "done", None, stages))
            status = read_status(layout, run_id)
            if status is None or status.get("state") != "done":
                write_status(layout, run_id, "done", cell=cell, stages_done=stages)
    if todo:
        with _Progress(len(cells), len(cells) - len(todo), show_progress, on_event) as progress:
            summary.outcomes += executor.run(study, todo, progress.event)
    merge_study_files(study)
    if report:
        summary.report, summary.report_error = _write_report(layout, force="report" in force or bool(todo))


def _write_report(layout: StudyLayout, force: bool) -> tuple[Path | None, str | None]:
    """Build the report; a failure is recorded in status/_report.json and returned, not raised."""
    from memlens.report import build_report, report_is_current

    try:
        if not force and report_is_current(layout.root):
            path = layout.report / "index.html"
        else:
            path = build_report(layout.root)
    except Exception as exc:
        record = write_status(layout, REPORT_FAILURE, "failed", stage="report", error=exc)
        return None, record["traceback"]
    status_path(layout, REPORT_FAILURE).unlink(missing_ok=True)
    return path, None


class _Progress:
    """Rich progress bar of cells (done / failed), with the running cell and stage as description."""

    def __init__(self, total: int, already: int, show: bool, forward: Callable[[CellEvent], None] | None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.forward = forward
        self.failed = 0
        self.progress = Progress(TextColumn("[bold]cells"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("[red]{task.fields[failed]} failed"), TimeElapsedColumn(),
                                 TextColumn("{task.description}"), console=Console(stderr=True),
                                 disable=not show, transient=False)
        self.task = self.progress.add_task("", total=total, completed=already, failed=0)

    def __enter__(self) -> "_Progress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def event(self, event: CellEvent) -> None:
        if event.state == "running":
            stage = next((s for s in RUN_STAGES if s not in event.stages_done), "")
            self.progress.update(self.task, description=f"{stage} {event.run_id}")
        else:
            self.failed += event.state == "failed"
            self.progress.update(self.task, advance=1, failed=self.failed)
            if event.state == "failed":
                last = (event.error or "").strip().splitlines()[-1:] or [""]
                self.progress.console.print(f"[red]failed[/] {event.run_id}: {last[0]}", highlight=False)
        if self.forward:
            self.forward(event)


# --------------------------------------------------------------------------------------- status
def study_status(out: Path) -> pd.DataFrame:
    """One row per cell: run_id, one column per stage (done / running / failed / pending / interrupted /
    disabled) and the error of a failed stage. Reads only files: works while a run (local or Ray) is going on."""
    layout = StudyLayout(Path(out))
    stored = layout.root / "study.yaml"
    if not stored.exists():
        raise ConfigError(f"{out}: not a memlens study folder (no study.yaml)")
    study = normalise_study(StudyConfig.model_validate(yaml.safe_load(stored.read_text())))
    live = StudyLock(layout.root).is_held()
    stages = enabled_stages(study)
    rows = []
    status_ids = sorted(p.stem for p in (layout.root / STATUS_DIR).glob("*.json") if p.stem != REPORT_FAILURE)
    cells = dict(study_cells(study, layout))
    for run_id in list(cells) + [r for r in status_ids if r not in cells]:
        record = read_status(layout, run_id) or {}
        row = {"run_id": run_id}
        for stage in RUN_STAGES:
            if stage not in stages:
                row[stage] = "disabled"
            elif stage_done(layout, run_id, stage):
                row[stage] = "done"
            elif record.get("stage") == stage and record.get("state") == "failed":
                row[stage] = "failed"
            elif record.get("stage") == stage and record.get("state") == "running":
                row[stage] = "running" if live else "interrupted"
            else:
                row[stage] = "pending"
        row["error"] = record.get("error") if record.get("state") == "failed" else None
        rows.append(row)
    return pd.DataFrame(rows, columns=["run_id", *RUN_STAGES, "error"])


__all__ = ["IncompatibleStudyError", "StudySummary", "check_compatible", "config_differences",
           "append_history", "enabled_stages", "environment_info", "hardware_info", "merge_study_files", "read_status",
           "record_stage_time", "run_cell", "run_study", "stage_done", "study_status", "write_status"]
