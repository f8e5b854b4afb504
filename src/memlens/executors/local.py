"""Run the cells in this process.

By default stages are batched across cells: every cell is fine-tuned first, then each attack stage
runs once for all of them, so the base model is loaded once per stage and its reference scores are
shared (much faster than one cell at a time on one machine). A batched stage that fails is rerun one
cell at a time, so each failure is attributed to its own cell with its own traceback.
`batch_stages=False` runs :func:`memlens.runner.run_cell` per cell, exactly as a Ray task would.
"""

from __future__ import annotations

from collections.abc import Callable

from memlens.config import CellConfig, StudyConfig
from memlens.executors import CellEvent, CellOutcome


class LocalExecutor:
    def __init__(self, batch_stages: bool = True):
        self.batch_stages = batch_stages

    def run(self, study: StudyConfig, cells: list[CellConfig],
            on_event: Callable[[CellEvent], None]) -> list[CellOutcome]:
        if not self.batch_stages:
            return self._one_by_one(study, cells, on_event)
        return self._batched(study, cells, on_event)

    def _one_by_one(self, study, cells, on_event) -> list[CellOutcome]:
        from memlens.runner import run_cell

        study_dict = study.model_dump(mode="json")
        outcomes = []
        for cell in cells:
            on_event(CellEvent(cell.run_id(study), "running"))
            outcome = CellOutcome.from_dict(run_cell(study_dict, cell.model_dump(mode="json")))
            on_event(outcome)
            outcomes.append(outcome)
        return outcomes

    def _batched(self, study, cells, on_event) -> list[CellOutcome]:
        from memlens.runner import _finetune, _run_stage, enabled_stages, stage_done, write_status
        from memlens.store import StudyLayout

        layout = StudyLayout(study.out_dir)
        ids = {cell.run_id(study): cell for cell in cells}
        done: dict[str, list[str]] = {r: [] for r in ids}
        failed: dict[str, str] = {}

        def fail(run_id: str, stage: str, exc: Exception) -> None:
            record = write_status(layout, run_id, "failed", cell=ids[run_id], stage=stage,
                                  stages_done=done[run_id], error=exc)
            failed[run_id] = record["traceback"]
            on_event(CellOutcome(run_id, "failed", record["traceback"], list(done[run_id])))

        data = tokenizer = None
        for stage in enabled_stages(study):
            pending = []
            for run_id in ids:
                if run_id in failed:
                    continue
                if stage_done(layout, run_id, stage):
                    done[run_id].append(stage)
                else:
                    pending.append(run_id)
            if not pending:
                continue
            if stage == "finetune":
                for run_id in pending:
                    write_status(layout, run_id, "running", cell=ids[run_id], stage=stage, stages_done=done[run_id])
                    on_event(CellEvent(run_id, "running", None, list(done[run_id])))
                    try:
                        if data is None:  # loaded once for all cells (a bad data config fails every cell)
                            from memlens.data import load_study_data
                            from memlens.models import load_tokenizer

                            data, tokenizer = load_study_data(study.data), load_tokenizer(study.model)
                        _finetune(study, ids[run_id], data, tokenizer)
                        done[run_id].append(stage)
                    except Exception as exc:
                        fail(run_id, stage, exc)
                continue
            for run_id in pending:
                write_status(layout, run_id, "running", cell=ids[run_id], stage=stage, stages_done=done[run_id])
                on_event(CellEvent(run_id, "running", None, list(done[run_id])))
            try:
                _run_stage(stage, study, pending)
                for run_id in pending:
                    done[run_id].append(stage)
            except Exception as batch_error:
                for run_id in pending:
                    if stage_done(layout, run_id, stage):  # finished before the batch failed
                        done[run_id].append(stage)
                        continue
                    if len(pending) == 1:
                        fail(run_id, stage, batch_error)
                        continue
                    try:
                        _run_stage(stage, study, [run_id])
                        done[run_id].append(stage)
                    except Exception as exc:
                        fail(run_id, stage, exc)

        outcomes = []
        for run_id in ids:
            if run_id in failed:
                outcomes.append(CellOutcome(run_id, "failed", failed[run_id], done[run_id]))
            else:
                write_status(layout, run_id, "done", cell=ids[run_id], stages_done=done[run_id])
                outcome = CellOutcome(run_id, "done", None, done[run_id])
                on_event(outcome)
                outcomes.append(outcome)
        return outcomes


__all__ = ["LocalExecutor"]
