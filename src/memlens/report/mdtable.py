"""GitHub-flavoured Markdown tables and number formats for the findings document.

A helper of our own rather than `DataFrame.to_markdown`: that needs `tabulate`, which memlens does not
declare (it only arrives with sacrebleu), and the document needs exact control of number formats, of
nulls (written `n/a`, never a made-up value) and of `|` inside cells.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

NA = "n/a"
Format = str | Callable[[object], str]


def is_null(value: object) -> bool:
    """True for None, NaN and pandas' missing markers (not for strings or containers)."""
    if value is None:
        return True
    try:
        return bool(pd.api.types.is_scalar(value) and pd.isna(value))
    except (TypeError, ValueError):
        return False


def fmt(value: object, spec: Format | None = None) -> str:
    """`value` as table text: `spec` is a format spec (".3f") or a function; floats default to 4 significant
    digits; nulls are `n/a`."""
    if is_null(value):
        return NA
    if callable(spec):
        return spec(value)
    if spec:
        return format(value, spec)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def pm(mean: object, low: object, high: object, digits: int = 3) -> str:
    """`mean ± half-width` of an interval; the mean alone when the interval is missing; `n/a` without a mean."""
    if is_null(mean):
        return NA
    if is_null(low) or is_null(high):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(float(high) - float(low)) / 2:.{digits}f}"


def interval(value: object, low: object, high: object, digits: int = 3) -> str:
    """`value [low, high]`, `value` without bounds, `n/a` without a value."""
    if is_null(value):
        return NA
    if is_null(low) or is_null(high):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def seconds(value: object) -> str:
    """A duration for people: `12.3 s`, `4 min 05 s`, `2 h 03 min`."""
    if is_null(value):
        return NA
    total = float(value)
    if total < 60:
        return f"{total:.1f} s"
    minutes, secs = divmod(int(round(total)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def md_table(frame: pd.DataFrame, formats: dict[str, Format] | None = None) -> str:
    """`frame` as a Markdown table (no index); `formats` maps a column to a format spec or function."""
    formats = formats or {}

    def cell(column: str, value: object) -> str:
        return fmt(value, formats.get(column)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(str(c).replace("|", "\\|") for c in frame.columns) + " |",
             "|" + "---|" * len(frame.columns)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(cell(c, v) for c, v in zip(frame.columns, row)) + " |")
    return "\n".join(lines)

