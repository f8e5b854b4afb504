"""Each cell's state on disk (`<out>/status/<run_id>.json`) and the progress events executors send."""

from __future__ import annotations

import os
import socket
import traceback
from dataclasses import asdict, dataclass, field

from memlens.config import CellConfig
from memlens.store import StudyLayout
from memlens.store.records import CellState, StatusRecord
from memlens.study.provenance import now

REPORT_FAILURE = "_report"  # status/_report.json: the last report build failed


@dataclass
class CellEvent:
    """A change in a cell's state, sent to the progress display."""

    run_id: str
    state: CellState
    error: str | None = None  # traceback text when failed
    stages_done: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CellOutcome(CellEvent):
    """The final state of a cell after an executor ran it."""

    @classmethod
    def from_dict(cls, data: dict) -> "CellOutcome":
        return cls(run_id=data["run_id"], state=data["state"], error=data.get("error"),
                   stages_done=list(data.get("stages_done") or []))


def read_status(layout: StudyLayout, run_id: str) -> StatusRecord | None:
    return StatusRecord.read(layout.status_file(run_id))


def write_status(layout: StudyLayout, run_id: str, state: str, *, cell: CellConfig | None = None,
                 stage: str | None = None, stages_done: list[str] | None = None,
                 error: BaseException | None = None) -> StatusRecord:
    """Record a cell's state atomically (`running` with its stage, `done`, or `failed` with the traceback)."""
    previous = read_status(layout, run_id) if cell is None else None
    record = StatusRecord(
        run_id=run_id, state=state, stage=stage, stages_done=stages_done or [],
        cell=cell.model_dump() if cell is not None else (previous.cell if previous else None),
        error=f"{type(error).__name__}: {error}" if error is not None else None,
        traceback="".join(traceback.format_exception(error)) if error is not None else None,
        pid=os.getpid(), host=socket.gethostname(), updated=now(),
    )
    record.save(layout.status_file(run_id))
    return record


def remove_status(layout: StudyLayout, run_id: str) -> None:
    layout.status_file(run_id).unlink(missing_ok=True)


__all__ = ["REPORT_FAILURE", "CellEvent", "CellOutcome", "CellState", "read_status", "remove_status",
           "write_status"]
