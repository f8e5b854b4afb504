"""The parts every section of the analysis shares: what was omitted and why, and the figure it supports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Omission:
    """Something the study's data cannot support, and why."""

    what: str
    reason: str


@dataclass(frozen=True)
class FigureSpec:
    """A figure the data supports: written as `figures/<name>.png` by the HTML renderer."""

    name: str
    caption: str


@dataclass(kw_only=True)
class Section:
    """One section of the report: its data (in subclasses), or why it is omitted."""

    anchor: ClassVar[str]
    title: ClassVar[str]
    omitted: Omission | None = None
    figure: FigureSpec | None = None

    def omissions(self) -> list[Omission]:
        """Everything of this section that could not be computed, in order."""
        return [self.omitted] if self.omitted else []
