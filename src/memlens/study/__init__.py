"""The study layer: stages as objects (:mod:`~memlens.study.stage`), cells as units of work
(:mod:`~memlens.study.cell`), their status on disk (:mod:`~memlens.study.status`), where and how long
they ran (:mod:`~memlens.study.provenance`) and whether a folder accepts a study (:mod:`~memlens.study.compat`).
Executors and the runner build on it; it knows nothing of them."""

from memlens.study.cell import normalise_study, run_cell, study_status
from memlens.study.compat import IncompatibleStudyError, check_compatible, config_differences
from memlens.study.stage import STAGE_NAMES, STAGES, Stage, enabled_stages, execute, get_stage, selected_stages
from memlens.study.status import CellEvent, CellOutcome, read_status, write_status

__all__ = ["STAGES", "STAGE_NAMES", "CellEvent", "CellOutcome", "IncompatibleStudyError", "Stage",
           "check_compatible", "config_differences", "enabled_stages", "execute", "get_stage", "normalise_study",
           "read_status", "run_cell", "selected_stages", "study_status", "write_status"]
