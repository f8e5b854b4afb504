"""Wall times of a study, read from the files the runner writes.

- `<out>/history.jsonl`: one line per `memlens run` (or `run_study`) invocation: command, start/end,
  wall seconds, cells, hardware.
- `runs/<run_id>/timings.json`: wall seconds of each completed stage of the run (a stage batched over
  several cells records the batch's time and the per-cell share), and `train.json`'s `wall_time_s`
  (the training loop alone).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from memlens.runner import HISTORY_FILE, TIMINGS_FILE

STAGE_ORDER = ("finetune", "train loop", "mia", "extraction")


def read_history(root: Path) -> list[dict]:
    """The invocations recorded in `<root>/history.jsonl`, oldest first (unreadable lines are skipped)."""
    path = Path(root) / HISTORY_FILE
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


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


def history_table(history: list[dict]) -> pd.DataFrame:
    """The history as a table: command, start, wall seconds, cells run / done / failed, hardware."""
    rows = [{"command": h.get("command"), "started": h.get("started"), "wall_s": h.get("wall_s"),
             "cells_total": h.get("cells_total"), "cells_run": h.get("cells_run"), "cells_done": h.get("cells_done"),
             "cells_failed": h.get("cells_failed"), "error": h.get("error"),
             "hardware": describe_hardware(h.get("hardware"))} for h in history]
    return pd.DataFrame(rows)


def stage_times(root: Path) -> pd.DataFrame:
    """One row per (run, stage) with a recorded wall time: run_id, stage, wall_s, batch_cells."""
    runs = Path(root) / "runs"
    run_dirs = sorted(p for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".")) if runs.is_dir() else []
    rows = []
    for run_dir in run_dirs:
        for name, read in ((TIMINGS_FILE, _stages_from_timings), ("train.json", _stage_from_train)):
            try:
                record = json.loads((run_dir / name).read_text())
            except (OSError, ValueError):
                continue
            rows += [{"run_id": run_dir.name, **row} for row in read(record)]
    return pd.DataFrame(rows, columns=["run_id", "stage", "wall_s", "batch_cells"])


def _stages_from_timings(record: dict) -> list[dict]:
    return [{"stage": stage, "wall_s": value.get("wall_s"), "batch_cells": value.get("batch_cells")}
            for stage, value in record.items() if isinstance(value, dict) and value.get("wall_s") is not None]


def _stage_from_train(record: dict) -> list[dict]:
    wall = record.get("wall_time_s")
    return [] if wall is None else [{"stage": "train loop", "wall_s": wall, "batch_cells": 1}]


def stage_summary(per_run: pd.DataFrame) -> pd.DataFrame:
    """Per stage: cells timed, median and total seconds per cell, and whether times are shares of batches."""
    if per_run.empty:
        return pd.DataFrame(columns=["stage", "n_cells", "median_s_per_cell", "total_s", "batched"])
    grouped = per_run.groupby("stage")
    table = pd.DataFrame({"n_cells": grouped.run_id.nunique(), "median_s_per_cell": grouped.wall_s.median(),
                          "total_s": grouped.wall_s.sum(), "batched": grouped.batch_cells.max() > 1}).reset_index()
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return table.sort_values("stage", key=lambda s: s.map(lambda v: order.get(v, len(order)))).reset_index(drop=True)
