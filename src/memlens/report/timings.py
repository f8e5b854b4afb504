"""Wall times of a study, read from the files the runner writes.

- `<out>/history.jsonl`: one line per `memlens run` (or `run_study`) invocation: command, start/end,
  wall seconds, cells, hardware.
- `runs/<run_id>/timings.json`: wall seconds of each completed stage of the run (a stage batched over
  several cells records the batch's time and the per-cell share), and `train.json`'s `wall_time_s`
  (the training loop alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from memlens.report.section import Block, Omission, Section, Table, Text
from memlens.store import RunFile, StudyLayout
from memlens.store.records import HistoryEntry, TimingsRecord, TrainRecord
from memlens.store.records import read_history as read_history_file

STAGE_ORDER = ("finetune", "train loop", "mia", "extraction")


def read_history(root: Path) -> list[HistoryEntry]:
    """The invocations recorded in `<root>/history.jsonl`, oldest first."""
    return read_history_file(StudyLayout(Path(root)).history_file)


def describe_hardware(hardware: dict | None) -> str:
    """One line naming what a wall time was measured on."""
    if not hardware:
        return "hardware not recorded"
    cpu = hardware.get("cpu") or "unknown CPU"
    parts = [f"{cpu} ({hardware.get('cpu_cores')} cores, {hardware.get('torch_threads')} torch threads)"]
    if hardware.get("gpu"):
        count = hardware.get("gpu_count") or 1
        parts.append(f"{count} x {hardware['gpu']}" if count > 1 else hardware["gpu"])
    else:
        parts.append("no GPU")
    if hardware.get("device"):
        parts.append(f"device {hardware['device']}")
    if hardware.get("os"):
        parts.append(hardware["os"])
    return ", ".join(parts)


def history_table(history: list[HistoryEntry]) -> pd.DataFrame:
    """The history as a table: command, start, wall seconds, cells run / done / failed, hardware."""
    rows = [{"command": h.command, "started": h.started, "wall_s": h.wall_s, "cells_total": h.cells_total,
             "cells_run": h.cells_run, "cells_done": h.cells_done, "cells_failed": h.cells_failed, "error": h.error,
             "hardware": describe_hardware(h.hardware)} for h in history]
    return pd.DataFrame(rows)


def stage_times(root: Path) -> pd.DataFrame:
    """One row per (run, stage) with a recorded wall time: run_id, stage, wall_s, batch_cells."""
    layout = StudyLayout(Path(root))
    rows = []
    for run_id in layout.finished_runs():
        timings = TimingsRecord.read(layout.run_file(run_id, RunFile.TIMINGS))
        rows += [{"run_id": run_id, "stage": stage, "wall_s": t.wall_s, "batch_cells": t.batch_cells}
                 for stage, t in timings.root.items()]
        train = TrainRecord.read(layout.run_file(run_id, RunFile.TRAIN))
        if train is not None and train.wall_time_s is not None:
            rows.append({"run_id": run_id, "stage": "train loop", "wall_s": train.wall_time_s, "batch_cells": 1})
    return pd.DataFrame(rows, columns=["run_id", "stage", "wall_s", "batch_cells"])


def stage_summary(per_run: pd.DataFrame) -> pd.DataFrame:
    """Per stage: cells timed, median and total seconds per cell, and whether times are shares of batches."""
    if per_run.empty:
        return pd.DataFrame(columns=["stage", "n_cells", "median_s_per_cell", "total_s", "batched"])
    grouped = per_run.groupby("stage")
    table = pd.DataFrame({"n_cells": grouped.run_id.nunique(), "median_s_per_cell": grouped.wall_s.median(),
                          "total_s": grouped.wall_s.sum(), "batched": grouped.batch_cells.max() > 1}).reset_index()
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return table.sort_values("stage", key=lambda s: s.map(lambda v: order.get(v, len(order)))).reset_index(drop=True)


@dataclass(kw_only=True)
class WallTimes(Section):
    anchor = "walltimes"
    title = "Wall times"
    history: list[HistoryEntry] = field(default_factory=list)  # every invocation, oldest first
    history_table: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/history.csv
    per_run: pd.DataFrame = field(default_factory=pd.DataFrame)  # run_id, stage, wall_s, batch_cells
    stages: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/stage_wall_times.csv
    in_document = False  # the findings document's "How to regenerate"

    def blocks(self) -> list[Block]:
        history = [Text("Each `memlens run` on this folder (history.jsonl; a run is recorded when it ends, after the "
                        "report it builds: `memlens report` shows it):"),
                   Table("history", self.history_table)] if self.history else []
        stages = [Text("Per-cell stage wall times (runs/<run_id>/timings.json, train.json):"),
                  Table("stage_wall_times", self.stages)] if len(self.stages) else []
        return history + stages


def wall_times(root: Path) -> WallTimes:
    per_run, history = stage_times(root), read_history(root)
    if per_run.empty and not history:
        return WallTimes(omitted=Omission("wall times", "no runs/<run_id>/timings.json, train.json wall times or "
                                          "history.jsonl in the study folder"))
    return WallTimes(history=history, history_table=history_table(history) if history else pd.DataFrame(),
                     per_run=per_run, stages=stage_summary(per_run) if len(per_run) else pd.DataFrame())
