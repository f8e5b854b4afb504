"""Typed records of the JSON files memlens writes into a study folder and reads back.

Every JSON file of a study has a pydantic model here, written with :meth:`Record.save` (atomically) and
read with :meth:`Record.load`, so no module reads them by string keys. The models accept fields they do
not declare (`extra="allow"`): a folder written by a newer memlens still reads, and a record keeps every
field it was given. Only the fields that were set are written, so the files stay as they were.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, RootModel, ValidationError

from memlens.config import CellConfig
from memlens.store.layout import atomic_write_json, atomic_write_text

# `pending`: some stages were left for later (e.g. `memlens finetune` runs only the first)
CellState = Literal["running", "done", "failed", "pending"]


class Record(BaseModel):
    """A JSON record of the study folder."""

    model_config = ConfigDict(extra="allow")

    @classmethod
    def load(cls, path: Path):
        """The record in `path`; a missing or damaged file raises (OSError / ValueError) naming it."""
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_bytes())
        except ValidationError as exc:  # said in one line: the first problem (e.g. invalid JSON, a missing field)
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            more = f"; {exc.error_count() - 1} more" if exc.error_count() > 1 else ""
            raise ValueError(f"{path}: not a valid {cls.__name__} ({first['msg']}{f' at {where}' if where else ''}"
                             f"{more})") from None
        except ValueError as exc:
            raise ValueError(f"{path}: not a valid {cls.__name__} ({exc})") from None

    @classmethod
    def read(cls, path: Path):
        """The record in `path`, or None when it is missing or unreadable (e.g. a status being replaced)."""
        try:
            return cls.load(path)
        except (OSError, ValueError):
            return None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())


class CellRecord(Record):
    """`runs/<run_id>/cell.json`: the cell and every setting its run_id hashes (`CellConfig.determinants`)."""

    run_id: str
    cell: CellConfig
    model: dict[str, Any]
    data: dict[str, Any]
    canary: dict[str, Any]
    train: dict[str, Any]
    lora: dict[str, Any] | None = None
    dp: dict[str, Any] | None = None


class TrainRecord(Record):
    """`runs/<run_id>/train.json`: what fine-tuning did (counts, loss curve, wall time, canary, DP)."""

    run_id: str
    seed: int
    trainable_params: int
    total_params: int
    trainable_pct: float
    canary: dict[str, Any]
    data_hash: str | None = None
    device: str | None = None
    n_train_records: int | None = None
    loss_curve: list[dict[str, Any]] = []
    final_loss: float | None = None
    wall_time_s: float | None = None
    dp: dict[str, Any] | None = None
    artifacts: dict[str, str] | None = None  # `adapter/<file>` or `model/<file>` -> SHA-256 (None: older runs)


class ReferenceRecord(Record):
    """`references/runs/<ref_run_id>/reference.json`: a reference adapter of LiRA / RMIA (written last: the
    reference is complete when it exists). Its IN records are its `members.parquet`."""

    run_id: str
    index: int                  # k: the k-th reference of its recipe
    seed: int                   # training seed and coin seed (REF_SEED + k)
    unit: str                   # what one coin assigned: `record` or `group`
    n_in: int                   # records trained on (IN)
    n_population: int           # records of the membership experiment the coins were flipped over
    population_hash: str        # hash of those records' texts
    wall_time_s: float | None = None  # training wall time (train.json's)
    # what it depends on (records with their coin keys, coin unit, recipe, base weights): attacks.references'
    # reference_identity; None in references trained before it existed (trained again)
    identity: str | None = None


class AuditRecord(Record):
    """`audit.json` of an audit folder: what `memlens audit` resolved and measured, written with its results (the
    report and the model card read it)."""

    name: str
    target: str                  # as given
    kind: str                    # adapter | model | run
    run_id: str                  # the target's run_id in the results
    base: dict[str, Any]         # the base model's ModelConfig
    method: str                  # lora | full
    target_modules: list[str]
    rank: int
    sources: dict[str, str]      # members / non_members / canaries -> where the records came from
    n_members: int               # counted in the membership metrics (inserted canaries are not)
    n_non_members: int
    n_canaries: int
    attacks: list[str]           # result names of the membership attacks run
    references: int = 0
    group: str | None = None
    study: dict[str, Any]        # the audit as the one-run study it ran (StudyConfig): what its report reads
    dataset_inference: dict[str, Any] | None = None  # was the suspect (member) set used: DatasetInference
    usage_share: dict[str, Any] | None = None        # what share of it: UsageShare (with reference models)
    notes: list[str] = []        # what the audit could not run, and why
    wall_time_s: float | None = None
    written: str | None = None


class StatusRecord(Record):
    """`status/<run_id>.json`: a cell's state, its stage and, when it failed, the error and traceback."""

    run_id: str
    state: CellState
    stage: str | None = None
    stages_done: list[str] = []
    cell: dict[str, Any] | None = None
    error: str | None = None
    traceback: str | None = None
    pid: int | None = None
    host: str | None = None
    updated: str | None = None


class StageTiming(BaseModel):
    """Wall time of one completed stage of a run (a stage batched over cells: the per-cell share)."""

    model_config = ConfigDict(extra="allow")

    wall_s: float
    batch_wall_s: float | None = None
    batch_cells: int | None = None
    finished: str | None = None


class TimingsRecord(RootModel[dict[str, StageTiming]]):
    """`runs/<run_id>/timings.json`: stage name -> :class:`StageTiming`."""

    @classmethod
    def read(cls, path: Path) -> "TimingsRecord":
        """The timings in `path`, empty when there are none yet (or the file is unreadable)."""
        try:
            return cls.model_validate_json(Path(path).read_bytes())
        except (OSError, ValueError):
            return cls({})

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.model_dump(mode="json", exclude_unset=True))


class HistoryEntry(Record):
    """One line of `<out>/history.jsonl`: a `memlens run` (or `run_study`) invocation."""

    command: str
    started: str
    ended: str
    wall_s: float
    cells_total: int | None = None
    cells_run: int = 0
    cells_done: int = 0
    cells_failed: int = 0
    report: bool = False
    error: str | None = None
    executor: str | None = None
    git_commit: str | None = None
    hardware: dict[str, Any] | None = None


def read_history(path: Path) -> list[HistoryEntry]:
    """The entries of a history file, oldest first (a line that does not parse is skipped: it can only be
    a line of a foreign tool, since memlens rewrites the file atomically)."""
    path = Path(path)
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(HistoryEntry.model_validate(json.loads(line)))
        except ValueError:
            continue
    return entries


def append_history_line(path: Path, entry: HistoryEntry) -> None:
    """Rewrite the history file atomically with `entry` appended (the caller holds the write lock)."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + json.dumps(entry.to_json(), sort_keys=True, default=str) + "\n")


__all__ = ["CellRecord", "CellState", "HistoryEntry", "Record", "ReferenceRecord", "StageTiming", "StatusRecord",
           "TimingsRecord", "TrainRecord", "append_history_line", "read_history"]
