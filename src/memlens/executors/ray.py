"""Run a study's grid cells as Ray tasks: one task per cell, on this machine or on a Ray cluster.

Each task calls :func:`memlens.study.cell.run_cell` (fine-tune, then the cell's attacks), which writes
the cell's run folder and per-run stage files atomically into the study folder. On a cluster that
folder must be on storage every node sees (NFS, Lustre...; see docs/cluster.md). The driver:

1. connects to Ray (`executor.address`: `auto`, `ray://host:10001`, or null for a local Ray);
2. runs the stages' shared preparation once (:meth:`~memlens.study.stage.Stage.prepare`, e.g. the membership
   stage's base-model scores; itself one Ray task with a cell's resources, so it runs where the GPUs are), so
   no cell recomputes it;
3. keeps at most `executor.max_concurrent` tasks in flight, each with `num_cpus` / `num_gpus` / `memory_gb`: a
   task is one cell, or with `train.together` > 1 a group of cells whose adapters train together in one pass
   (:func:`group_task`: the group's stages run batched in the worker); a task whose worker dies (killed, OOM,
   node lost) is retried by Ray up to `executor.max_retries` times and resumes from the files already written;
4. returns the outcomes; the runner then rebuilds the study-level files from the per-run files (the
   driver sees the shared study folder too, and merging needs no model).

Before the fan-out the driver writes a fresh random token into `<out>/.memlens-ray-check`; every task
reads it back before it touches the study folder, so a node that does not see the driver's folder (not
mounted, or another folder at the same path) fails its cell with a message instead of writing elsewhere.

A rerun after the driver or a worker was killed redoes only the unfinished stages of unfinished
cells (the runner skips finished ones), so each cell appears exactly once in the results.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path

from memlens.config import CellConfig, ConfigError, ExecutorConfig, StudyConfig
from memlens.context import StudyContext
from memlens.executors.local import LocalExecutor
from memlens.store import StudyFile, StudyLayout, atomic_write_text
from memlens.study.cell import normalise_study, run_cell
from memlens.study.stage import get_stage, preparing, selected_stages
from memlens.study.status import CellEvent, CellOutcome, read_status, write_status
from memlens.train.together import training_groups

INSTALL_HINT = "executor.kind: ray needs Ray, which is not installed: pip install 'memlens[ray]'"
# Ray task name of a cell; Ray also titles the worker process `ray::memlens-cell:<run_id>` while it runs.
TASK_PREFIX = "memlens-cell:"
PREPARE_TASK = "memlens-prepare"
# Written by the driver into the study folder with a fresh random token, read back by every task.
SHARED_CHECK_FILE = StudyFile.SHARED_CHECK
# How long a task waits for the driver's token to show (NFS may serve a stale directory listing briefly).
SHARED_CHECK_WAIT_S = 10.0


def import_ray():
    """The `ray` module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} ({exc})") from exc
    return ray


# --------------------------------------------------------------------------------------- remote side
def _enter_workdir(workdir: str | None) -> None:
    """Resolve the study's relative paths (out, data, model) as the driver does: from its folder."""
    if workdir is None:
        return
    if not os.path.isdir(workdir):
        raise RuntimeError(
            f"the study uses relative paths and the driver's folder {workdir} does not exist on this node; "
            "start the driver from a folder on the shared filesystem or make `out`, `data.source` and "
            "`model.name_or_path` absolute paths that every node sees (see docs/cluster.md)"
        )
    os.chdir(workdir)


class StudyFolderNotShared(RuntimeError):
    """A Ray node does not see the study folder the driver writes (see docs/cluster.md)."""


def _check_shared_folder(study_dict: dict, token: str | None) -> None:
    """Refuse to run on a node whose `<out>` is not the driver's: the driver's token must be in
    `<out>/.memlens-ray-check` (waiting up to SHARED_CHECK_WAIT_S for it). Writes nothing."""
    if token is None:
        return
    out = StudyConfig.model_validate(study_dict).out_dir.absolute()
    marker = out / SHARED_CHECK_FILE
    deadline = time.monotonic() + SHARED_CHECK_WAIT_S
    while True:
        try:
            if marker.read_text().strip() == token:
                return
            seen = f"{marker} holds another run's token: a different folder at the same path"
        except FileNotFoundError:
            seen = f"{marker} does not exist here" if out.is_dir() else f"{out} does not exist here"
        except OSError as exc:  # permission denied, stale NFS handle...
            seen = f"{marker} cannot be read here: {exc}"
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(0.5, left))
    raise StudyFolderNotShared(
        f"Ray node {socket.gethostname()} does not see the study folder the driver writes ({seen}): "
        f"`out` ({out}) must be one folder that the driver and every Ray node see at the same path, "
        "e.g. an NFS or Lustre mount; nothing was written on this node (see docs/cluster.md)")


def cell_task(study_dict: dict, cell_dict: dict, workdir: str | None, only: list[str] | None = None,
              token: str | None = None) -> dict:
    """Body of one cell's Ray task: :func:`memlens.study.cell.run_cell` (which records its own failure),
    once the study folder is known to be the driver's (`token`, see :func:`_check_shared_folder`)."""
    _enter_workdir(workdir)
    _check_shared_folder(study_dict, token)
    return run_cell(study_dict, cell_dict, only)


def group_task(study_dict: dict, cell_dicts: list[dict], workdir: str | None, only: list[str] | None = None,
               token: str | None = None) -> list[dict]:
    """Body of a group's Ray task (`train.together` > 1: cells whose adapters train together): the group's cells
    through the local executor's batched run in this worker (each stage once for the group, the adapters in one
    pass; a stage that fails for the group is rerun cell by cell, so each failure is the cell's own); one outcome
    per cell, as :func:`cell_task` returns for one."""
    _enter_workdir(workdir)
    _check_shared_folder(study_dict, token)
    ctx = StudyContext(normalise_study(StudyConfig.model_validate(study_dict)))
    cells = [CellConfig.model_validate(c) for c in cell_dicts]
    return [outcome.to_dict() for outcome in LocalExecutor().run(ctx, cells, lambda event: None, only)]


def prepare_task(study_dict: dict, cell_dicts: list[dict], stages: list[str], workdir: str | None,
                 token: str | None = None) -> None:
    """Body of the one task that runs the stages' shared preparation (:meth:`Stage.prepare`) for the cells."""
    _enter_workdir(workdir)
    _check_shared_folder(study_dict, token)
    ctx = StudyContext(normalise_study(StudyConfig.model_validate(study_dict)))
    cells = [CellConfig.model_validate(c) for c in cell_dicts]
    for name in stages:
        get_stage(name).prepare(ctx, cells)


# --------------------------------------------------------------------------------------- driver side
def _relative_paths(study: StudyConfig) -> bool:
    """Does any path the workers open depend on the current folder?"""
    paths = [str(study.out_dir)]
    for value in (study.data.source, study.model.name_or_path, study.mia.reference_corpus):
        if value and Path(value).exists():  # an existing local path (not a hub id)
            paths.append(value)
    return any(not Path(p).is_absolute() for p in paths)


class RayExecutor:
    """Executor running each cell as one Ray task (see the module docstring)."""

    def __init__(self, cfg: ExecutorConfig):
        self.cfg = cfg
        self.ray = import_ray()

    # ----------------------------------------------------------------------------------- connection
    def _connect(self) -> bool:
        """Connect to Ray; True when this call started it (and so must shut it down)."""
        ray = self.ray
        if ray.is_initialized():  # e.g. a notebook or a test that called ray.init() itself
            return False
        # Worker output (Trainer logs) stays in Ray's log files; failures reach the driver as outcomes.
        if self.cfg.address is None:
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=self.cfg.address, log_to_driver=False)
        return True

    def task_options(self) -> dict:
        """Ray resources and retry policy of one cell's task."""
        opts = {"num_cpus": self.cfg.num_cpus, "num_gpus": self.cfg.num_gpus,
                # retry when the worker dies (system failure); a Python error in a cell is recorded by
                # run_cell and must not be retried (it would fail the same way)
                "max_retries": self.cfg.max_retries, "retry_exceptions": False}
        if self.cfg.memory_gb is not None:
            opts["memory"] = int(self.cfg.memory_gb * 2**30)
        return opts

    def _check_feasible(self) -> None:
        """Refuse a per-cell request no node of a fixed local Ray can satisfy (its tasks would wait forever).
        A remote cluster may autoscale, so it is not checked."""
        if self.cfg.address is not None:
            return
        nodes = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
        wants = {"CPU": ("num_cpus", self.cfg.num_cpus), "GPU": ("num_gpus", self.cfg.num_gpus)}
        if self.cfg.memory_gb is not None:
            wants["memory"] = ("memory_gb", self.cfg.memory_gb * 2**30)
        for resource, (field, amount) in wants.items():
            if amount and not any(n.get(resource, 0) >= amount for n in nodes):
                best = max((n.get(resource, 0) for n in nodes), default=0)
                shown = f"{best / 2**30:.1f} GiB" if resource == "memory" else f"{best:g}"
                raise ConfigError(f"executor.{field}: each cell asks for more {resource} than any node of "
                                  f"the local Ray has ({shown}); lower it or connect to a cluster "
                                  "(executor.address)")

    # ----------------------------------------------------------------------------------- run
    def run(self, ctx: StudyContext, cells: list[CellConfig], on_event: Callable[[CellEvent], None],
            only: list[str] | None = None) -> list[CellOutcome]:
        """Run `cells` as Ray tasks (their stages of `only`, or all); returns one outcome per cell, in the
        order of `cells`. Workers show no progress bars (their output stays in Ray's logs)."""
        started = self._connect()
        try:
            self._check_feasible()
            return self._run(ctx.study, cells, on_event, only)
        finally:
            if started:
                self.ray.shutdown()

    def _run(self, study: StudyConfig, cells: list[CellConfig], on_event: Callable[[CellEvent], None],
             only: list[str] | None) -> list[CellOutcome]:
        if not cells:
            return []
        study_dict = study.model_dump(mode="json")
        workdir = os.getcwd() if _relative_paths(study) else None
        marker = StudyLayout(study.out_dir).root / SHARED_CHECK_FILE
        token = secrets.token_hex(16)  # fresh per run: a stale copy of the folder elsewhere has another
        atomic_write_text(marker, token + "\n")
        try:
            return self._fan_out(study, cells, on_event, only, study_dict, workdir, token)
        finally:
            marker.unlink(missing_ok=True)

    def _fan_out(self, study: StudyConfig, cells: list[CellConfig], on_event: Callable[[CellEvent], None],
                 only: list[str] | None, study_dict: dict, workdir: str | None, token: str) -> list[CellOutcome]:
        ray = self.ray
        opts = self.task_options()
        prepare = [s.name for s in preparing(selected_stages(study, only))]
        if prepare:  # once, before the fan-out; a failure here would fail every cell: raise it
            ray.get(ray.remote(prepare_task).options(name=PREPARE_TASK, **opts).remote(
                study_dict, [c.model_dump(mode="json") for c in cells], prepare, workdir, token))

        remote_cell, remote_group = ray.remote(cell_task), ray.remote(group_task)
        pending = _units(study, cells)
        limit = self.cfg.max_concurrent or len(pending)
        in_flight: dict = {}  # ObjectRef -> the cells of its task
        outcomes: dict[str, CellOutcome] = {}
        try:
            while pending or in_flight:
                while pending and len(in_flight) < limit:
                    unit = pending.pop(0)
                    run_ids = [c.run_id(study) for c in unit]
                    if len(unit) == 1:
                        ref = remote_cell.options(name=TASK_PREFIX + run_ids[0], **opts).remote(
                            study_dict, unit[0].model_dump(mode="json"), workdir, only, token)
                    else:
                        ref = remote_group.options(name=f"{TASK_PREFIX}{run_ids[0]}+{len(unit) - 1}", **opts).remote(
                            study_dict, [c.model_dump(mode="json") for c in unit], workdir, only, token)
                    in_flight[ref] = unit
                    for run_id in run_ids:  # handed to Ray (it may queue it for resources)
                        on_event(CellEvent(run_id, "running"))
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in ready:
                    for outcome in self._collect(study, in_flight.pop(ref), ref):
                        outcomes[outcome.run_id] = outcome
                        on_event(outcome)
        except BaseException:  # Ctrl-C or a failing callback: stop the cells still running, then raise
            for ref in in_flight:
                ray.cancel(ref, force=True)
            raise
        return [outcomes[c.run_id(study)] for c in cells]

    def _collect(self, study: StudyConfig, cells: list[CellConfig], ref) -> list[CellOutcome]:
        """The outcomes of a task's cells; a task Ray could not complete (worker died more than max_retries times,
        node lost, cancelled, unpicklable result) fails each of its cells, recorded in the cell's status file."""
        ray = self.ray
        layout = StudyLayout(study.out_dir)
        run_ids = [c.run_id(study) for c in cells]
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as exc:
            return [_task_failed(layout, cell, run_id, exc) for cell, run_id in zip(cells, run_ids)]
        outcomes = [CellOutcome.from_dict(r) for r in (result if isinstance(result, list) else [result])]
        if [o.run_id for o in outcomes] != run_ids:  # the worker hashed the cells differently: another version?
            raise RuntimeError(f"a Ray worker ran cells {run_ids} as {[o.run_id for o in outcomes]}: the driver and "
                               "the workers must run the same memlens version (see docs/cluster.md)")
        return outcomes


def _task_failed(layout: StudyLayout, cell: CellConfig, run_id: str, exc: Exception) -> CellOutcome:
    last = read_status(layout, run_id)
    stage, done = (last.stage, list(last.stages_done)) if last is not None else (None, [])
    record = write_status(layout, run_id, "failed", cell=cell, stage=stage, stages_done=done, error=exc)
    return CellOutcome(run_id, "failed", record.traceback, done)


def _units(study: StudyConfig, cells: list[CellConfig]) -> list[list[CellConfig]]:
    """The cells of each task: one, or a training group (`train.together` > 1, cells sharing their matrices)."""
    if study.train.together <= 1:
        return [[cell] for cell in cells]
    return training_groups(study, cells, announce=True)


__all__ = ["INSTALL_HINT", "SHARED_CHECK_FILE", "TASK_PREFIX", "RayExecutor", "StudyFolderNotShared", "import_ray"]
