"""Where grid cells run: in this process (`local`) or as Ray tasks (`ray`, optional extra).

An executor takes the study's context (:class:`~memlens.context.StudyContext`), the cells still to do and
the stages to run (`only`: all enabled stages when None), runs each cell's stages and reports progress as
:class:`~memlens.study.status.CellEvent` s. The unit of work is :func:`memlens.study.cell.run_cell`, which
records its own failure instead of raising.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from memlens.config import CellConfig, ConfigError, ExecutorConfig
from memlens.context import StudyContext
from memlens.study.status import CellEvent, CellOutcome


class Executor(Protocol):
    def run(self, ctx: StudyContext, cells: list[CellConfig], on_event: Callable[[CellEvent], None],
            only: list[str] | None = None) -> list[CellOutcome]: ...


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


__all__ = ["Executor", "get_executor"]
