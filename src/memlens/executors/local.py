"""Run the cells in this process.

By default stages are batched across cells: every cell is fine-tuned first, then each attack stage
runs once for all of them, so the base model is loaded once per stage and its reference scores are
shared (much faster than one cell at a time on one machine). A batched stage that fails is rerun one
cell at a time, so each failure is attributed to its own cell with its own traceback.
`batch_stages=False` runs :func:`memlens.study.cell.run_cell` per cell, exactly as a Ray task would.
"""

from __future__ import annotations

from collections.abc import Callable

from memlens.config import CellConfig
from memlens.context import StudyContext
from memlens.study.cell import run_cell
from memlens.study.stage import Stage, enabled_stages, execute
from memlens.study.status import CellEvent, CellOutcome, write_status


class LocalExecutor:
    def __init__(self, batch_stages: bool = True):
        self.batch_stages = batch_stages

    def run(self, ctx: StudyContext, cells: list[CellConfig], on_event: Callable[[CellEvent], None],
            only: list[str] | None = None) -> list[CellOutcome]:
        if not self.batch_stages:
            return self._one_by_one(ctx, cells, on_event, only)
        return _BatchedRun(ctx, cells, on_event, only).run()

    def _one_by_one(self, ctx: StudyContext, cells, on_event, only) -> list[CellOutcome]:
        study = ctx.study
        study_dict = study.model_dump(mode="json")
        outcomes = []
        for cell in cells:
            on_event(CellEvent(cell.run_id(study), "running"))
            outcome = CellOutcome.from_dict(run_cell(study_dict, cell.model_dump(mode="json"), only))
            on_event(outcome)
            outcomes.append(outcome)
        return outcomes


class _BatchedRun:
    """One batched pass over the stages: each stage for every cell still needing it."""

    def __init__(self, ctx: StudyContext, cells: list[CellConfig], on_event: Callable[[CellEvent], None],
                 only: list[str] | None):
        self.ctx = ctx
        self.cells = {cell.run_id(ctx.study): cell for cell in cells}
        self.on_event, self.only = on_event, only
        self.done: dict[str, list[str]] = {r: [] for r in self.cells}
        self.failed: dict[str, str] = {}
        self.blocked: set[str] = set()  # a stage left undone (outside `only`): later stages cannot run

    def run(self) -> list[CellOutcome]:
        for stage in enabled_stages(self.ctx.study):
            pending = []
            for run_id in self.cells:
                if run_id in self.failed or run_id in self.blocked:
                    continue
                if stage.done(self.ctx, run_id):
                    self.done[run_id].append(stage.name)
                elif self.only is not None and stage.name not in self.only:
                    self.blocked.add(run_id)
                else:
                    pending.append(run_id)
            for group in stage.groups(self.ctx, pending):
                self._run_group(stage, group)
        return [self._outcome(run_id) for run_id in self.cells]

    def _run_group(self, stage: Stage, run_ids: list[str]) -> None:
        for run_id in run_ids:
            write_status(self.ctx.layout, run_id, "running", cell=self.cells[run_id], stage=stage.name,
                         stages_done=self.done[run_id])
            self.on_event(CellEvent(run_id, "running", None, list(self.done[run_id])))
        try:
            execute(stage, self.ctx, [self.cells[r] for r in run_ids])
            for run_id in run_ids:
                self.done[run_id].append(stage.name)
        except Exception as group_error:
            for run_id in run_ids:
                if stage.done(self.ctx, run_id):  # finished before the group failed
                    self.done[run_id].append(stage.name)
                elif len(run_ids) == 1:
                    self._fail(run_id, stage, group_error)
                else:  # rerun alone, so the failure is attributed to its own cell
                    self._run_group(stage, [run_id])

    def _fail(self, run_id: str, stage: Stage, exc: Exception) -> None:
        record = write_status(self.ctx.layout, run_id, "failed", cell=self.cells[run_id], stage=stage.name,
                              stages_done=self.done[run_id], error=exc)
        self.failed[run_id] = record.traceback
        self.on_event(CellOutcome(run_id, "failed", record.traceback, list(self.done[run_id])))

    def _outcome(self, run_id: str) -> CellOutcome:
        if run_id in self.failed:
            return CellOutcome(run_id, "failed", self.failed[run_id], self.done[run_id])
        state = "pending" if run_id in self.blocked else "done"
        write_status(self.ctx.layout, run_id, state, cell=self.cells[run_id], stages_done=self.done[run_id])
        outcome = CellOutcome(run_id, state, None, self.done[run_id])
        self.on_event(outcome)
        return outcome


__all__ = ["LocalExecutor"]
