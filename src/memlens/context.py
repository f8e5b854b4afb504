"""What the stages of a study share in one process: the study, its folder, its cells, the records of each
membership design and the tokenizer, each loaded once, on first use, and handed to every stage.

A stage takes everything it needs from here: nothing the process already holds is read back from disk
(the study file, a cell's record, a design's records). Built by the runner (or a Ray worker, or `memlens
status`) with :meth:`StudyContext.of_folder` or from a :class:`StudyConfig`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from memlens.config import CellConfig, ConfigError, Design, StudyConfig
from memlens.data import StudyData, load_study_data
from memlens.models import load_tokenizer
from memlens.store import RunFile, StudyLayout
from memlens.store.records import CellRecord


@dataclass
class StudyContext:
    """One study in one process. `cells` are the grid's cells plus those of finished runs already in the
    folder (an earlier, other grid of the same study), by run id."""

    study: StudyConfig
    show_progress: bool = False
    _data: dict[tuple[Design, int], StudyData] = field(default_factory=dict, repr=False)
    _tokenizer: object | None = field(default=None, repr=False)
    _cells: dict[str, CellConfig] | None = field(default=None, repr=False)

    @classmethod
    def of_folder(cls, out: str | Path, show_progress: bool = False) -> StudyContext:
        """The context of the study a folder holds (its `study.yaml`), in that folder even when the study was
        written elsewhere (a moved or copied folder: its `out` names where it was made)."""
        study = StudyLayout(Path(out)).read_study()
        return cls(study.model_copy(update={"out": str(out)}), show_progress=show_progress)

    @property
    def layout(self) -> StudyLayout:
        return StudyLayout(self.study.out_dir)

    # ----------------------------------------------------------------------------------- records
    def data(self, design: Design, draw: int = 0) -> StudyData:
        """The records of a membership design in record draw `draw` (grid.draw; loaded once per process)."""
        if (design, draw) not in self._data:
            self._data[(design, draw)] = load_study_data(self.study.data.for_draw(draw), design)
        return self._data[(design, draw)]

    def use_records(self, cell: CellConfig, data: StudyData) -> None:
        """Make `data` the records of `cell`'s design and draw instead of what the study's data section loads: an
        audit is a one-cell study whose records are the user's files."""
        self._data[(cell.membership, cell.draw)] = data

    def cell_data(self, cell: CellConfig) -> StudyData:
        """The records a cell trains on and is attacked on: its design in its record draw."""
        return self.data(cell.membership, cell.draw)

    def designs(self) -> dict[tuple[Design, int], StudyData]:
        """The records of every membership design of the study in each of its record draws, by (design, draw)."""
        return {(design, draw): self.data(design, draw) for design in self.study.data.membership
                for draw in self.study.grid.draw}

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.study.model)
        return self._tokenizer

    # ----------------------------------------------------------------------------------- cells
    @property
    def cells(self) -> dict[str, CellConfig]:
        """run id -> cell: the grid's cells, then the finished runs of the folder that belong to this study
        (their cell.json names a cell whose run id, under this study, is the folder's: same determinants)."""
        if self._cells is None:
            cells = {c.run_id(self.study): c for c in self.study.cells()}
            layout = self.layout
            for run_id in layout.finished_runs():
                if run_id in cells:
                    continue
                record = CellRecord.read(layout.run_file(run_id, RunFile.CELL))
                if record is not None and record.cell.run_id(self.study) == run_id:
                    cells[run_id] = record.cell
            self._cells = cells
        return self._cells

    def cell(self, run_id: str) -> CellConfig:
        """The cell of a run of this study; an unknown run id is a ConfigError naming the known ones."""
        try:
            return self.cells[run_id]
        except KeyError:
            raise ConfigError(f"run_ids: {run_id!r} is not a run of this study; its runs: {sorted(self.cells)}") \
                from None

    def cells_of(self, run_ids: Iterable[str]) -> list[CellConfig]:
        """The cells of `run_ids`, in that order."""
        return [self.cell(r) for r in run_ids]

    def runs(self, cells: Sequence[CellConfig] | None = None) -> list[tuple[str, CellConfig]]:
        """(run id, cell) of the finished runs of `cells` (default: every run of the study in the folder). A given
        cell whose run is not finished is a ConfigError naming it (its fine-tune must come first)."""
        finished = set(self.layout.finished_runs())
        if cells is None:
            return [(r, c) for r, c in self.cells.items() if r in finished]
        pairs = [(c.run_id(self.study), c) for c in cells]
        missing = [r for r, _ in pairs if r not in finished]
        if missing:
            raise ConfigError(f"no finished run {missing} in {self.layout.runs} (fine-tune them first: memlens "
                              f"finetune); finished: {sorted(finished)}")
        return pairs

    def pending(self, marker: str, cells: Sequence[CellConfig] | None = None, force: bool = False
                ) -> list[tuple[str, CellConfig]]:
        """The finished runs of `cells` (:meth:`runs`) whose per-run file `marker` is missing, or all with `force`."""
        return [(r, c) for r, c in self.runs(cells) if force or not self.layout.run_file(r, marker).exists()]


__all__ = ["StudyContext"]
