"""The one rule that keeps a measurement's two sides apart: a text cannot be both a member and a non-member (nor an
inserted canary and a non-member). `memlens audit` and `MemlensCallback` both refuse it, in the same words."""

from __future__ import annotations

from collections.abc import Iterable

from memlens.config import ConfigError


def refuse_shared_texts(a: Iterable[str], b: Iterable[str], a_name: str, b_name: str, where: str = "audit") -> None:
    """Raise a ConfigError, naming `where` (the caller: `audit`, `MemlensCallback`), both sides (`a_name`,
    `b_name`, e.g. `members (train.jsonl)`), the number of shared texts and the first of them in sorted order,
    when a text of `a` is also in `b`."""
    shared = sorted(set(a) & set(b))
    if shared:
        raise ConfigError(f"{where}: {len(shared)} text(s) occur in both the {a_name} and the {b_name} (e.g. "
                          f"{shared[0][:80]!r}); a record cannot be both, it would corrupt the measurement: remove "
                          "them from one of the two")


__all__ = ["refuse_shared_texts"]
