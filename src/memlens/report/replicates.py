"""The replicate unit of the findings' tests: what one independent observation is.

A fine-tune varies its training seed and, with `grid.draw`, its record draw (which records are members and
non-members). Two fine-tunes of one draw share their records, so their AUCs share the records' sampling error:
they are not independent replicates of the record sample, and the earlier rounds' t-tests over seed x draw
pseudo-replicated (the draw's mean square was 6-114x the seed's). The unit is therefore:

- the record draw, when the grid has 2 or more draws: with one seed per draw each draw is one replicate; with
  several seeds in a draw (seeds nested in draws) the seeds are averaged within their draw first, which is the
  test of a fixed effect in the balanced nested model (its error term is the draw-within-configuration mean
  square, df = draws - 1); seeds crossed with draws (the same seeds in every draw) are treated the same way, which
  can only widen the interval;
- the seed, when there is one draw (older studies): the record sample is then fixed and the verdict is about
  these records;
- none (one fine-tune per configuration): the record-level tests (DeLong) of :mod:`memlens.report.findings`.

Record-level sampling error (what Hanley-McNeil or DeLong estimate within one run) is not added on top: each draw
scores other records, so the spread of the per-draw values already contains it; a test checks the level of the
resulting t over draws on simulated data with both sources of variation.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

DRAW, SEED = "draw", "seed"


@dataclass(frozen=True)
class Unit:
    """The replicate unit of a frame of runs."""

    column: str | None      # "draw", "seed", or None (one fine-tune per configuration)
    seeds_per_draw: int = 1  # with draws as the unit: the most seeds in one (configuration, draw)

    @property
    def name(self) -> str:
        return {DRAW: "record draw", SEED: "seed", None: "fine-tune"}[self.column]

    def plural(self, n: int) -> str:
        return f"{n} {self.name}{'s' if n != 1 else ''}"

    def describe(self, n: int) -> str:
        """`5 record draws (df 4), one seed per draw`: the unit, how many, the t-test's df and the nesting."""
        nesting = ""
        if self.column == DRAW:
            nesting = (", one seed per draw" if self.seeds_per_draw == 1 else
                       f", up to {self.seeds_per_draw} seeds averaged within each draw (seeds nested in draws)")
        elif self.column == SEED:
            nesting = ", one record draw: the verdict is about these records"
        return f"{self.plural(n)} (df {max(n - 1, 0)}){nesting}"


def _distinct(frame: pd.DataFrame, column: str) -> int:
    return int(frame[column].nunique()) if column in frame and frame[column].notna().any() else 0


def unit_of(frame: pd.DataFrame, config: list[str] | tuple[str, ...] = ()) -> Unit:
    """The replicate unit of `frame` (runs, one row or more per run) whose configurations are the `config`
    columns: the record draw with 2 or more draws, else the seed with 2 or more seeds, else none."""
    if _distinct(frame, DRAW) >= 2:
        keys = [c for c in config if c in frame] + [DRAW]
        seeds = int(frame.groupby(keys, dropna=False)[SEED].nunique().max()) if SEED in frame else 1
        return Unit(DRAW, max(seeds, 1))
    if _distinct(frame, SEED) >= 2:
        return Unit(SEED)
    return Unit(None)


def per_unit(frame: pd.DataFrame, keys: list[str], values: list[str], unit: Unit) -> pd.DataFrame:
    """`values` averaged per (`keys`, unit): seeds within their draw when the draw is the unit. Columns: keys,
    the unit's column (when it has one), values."""
    by = [k for k in keys if k in frame] + ([unit.column] if unit.column else [])
    return frame.groupby(by, dropna=False)[values].mean().reset_index()
