"""Where grid cells run: in this process (`local`) or as Ray tasks (`ray`, optional extra).

An executor takes a study and the cells still to do, runs each cell's stages (fine-tune, then the
per-run attacks) and reports progress as :class:`CellEvent` s. The unit of work is the importable
function :func:`memlens.runner.run_cell`, which records its own failure instead of raising.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

from memlens.config import CellConfig, ConfigError, ExecutorConfig, StudyConfig

CellState = Literal["running", "done", "failed"]


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


class Executor(Protocol):
    def run(self, study: StudyConfig, cells: list[CellConfig],
            on_event: Callable[[CellEvent], None]) -> list[CellOutcome]: ...


def get_executor(cfg: ExecutorConfig) -> Executor:
    """The executor named by `executor.kind`; Ray is imported only when asked for."""
    if cfg.kind == "local":
        from memlens.executors.local import LocalExecutor

        return LocalExecutor()
    if cfg.kind == "ray":
        try:
            from memlens.executors.ray import RayExecutor
        except ImportError as exc:
            raise ConfigError(f"executor.kind: ray needs Ray: pip install 'memlens[ray]' ({exc})") from exc
        return RayExecutor(cfg)
    raise ConfigError(f"executor.kind: unknown {cfg.kind!r}; valid choices: ['local', 'ray']")


__all__ = ["CellEvent", "CellOutcome", "CellState", "Executor", "get_executor"]
