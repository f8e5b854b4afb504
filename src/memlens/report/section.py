"""What a section of the report is: its data (in subclasses), what it shows as a few blocks (text, tables,
its figure), its tables by CSV name, and what it could not compute and why.

The writers (:mod:`memlens.report.html`, :mod:`memlens.report.markdown`) format blocks, never sections by
type: a new section is a subclass with its :meth:`Section.blocks` (and a drawer in
:mod:`memlens.report.figures` when it has a figure). Text uses backticks for code (`ref_ratio`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import pandas as pd


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


@dataclass(frozen=True)
class Text:
    """A paragraph; `style` marks a warning, a reassurance or a source note."""

    text: str
    style: Literal["warn", "ok", "src"] | None = None


@dataclass(frozen=True, eq=False)
class Table:
    """A table shown as `shown` (its `columns`, all when None) and written as `tables/<name>.csv` from `data`
    (the shown frame itself when None). `empty` is what a missing value shows as."""

    name: str
    shown: pd.DataFrame
    data: pd.DataFrame | None = None
    columns: list[str] | None = None
    formats: dict | None = None  # column -> format spec or function (the Markdown writer's)
    empty: str = "n/a"

    @property
    def csv(self) -> pd.DataFrame:
        return self.shown if self.data is None else self.data


@dataclass(frozen=True)
class Figure:
    """The section's figure (:attr:`Section.figure`), where it stands among the blocks."""


@dataclass(frozen=True)
class Omitted:
    """A part of the section that could not be computed, with why."""

    omission: Omission


Block = Text | Table | Figure | Omitted


@dataclass(kw_only=True)
class Section:
    """One section of the report: its data (in subclasses), or why it is omitted."""

    anchor: ClassVar[str]
    title: ClassVar[str]
    # listed under "Beyond the study" in the findings document (the findings' own evidence is not)
    in_document: ClassVar[bool] = True
    omitted: Omission | None = None
    figure: FigureSpec | None = None

    def omissions(self) -> list[Omission]:
        """Everything of this section that could not be computed, in order."""
        return [self.omitted] if self.omitted else []

    def blocks(self) -> list[Block]:
        """What the section shows, in order (when it is not omitted): by default its figure."""
        return [Figure()] if self.figure else []

    def tables(self) -> dict[str, pd.DataFrame]:
        """Its tables by CSV name (`tables/<name>.csv`), those with rows."""
        if self.omitted:
            return {}
        return {b.name: b.csv for b in self.blocks() if isinstance(b, Table) and len(b.csv)}


__all__ = ["Block", "Figure", "FigureSpec", "Omission", "Omitted", "Section", "Table", "Text"]
