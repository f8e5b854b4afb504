"""The designed canaries' own membership metrics (:mod:`memlens.data.audit_canaries`): per attack and per family,
the canaries trained on (their coin came up) against the held-out ones, with the same metrics as the records
(:func:`memlens.metrics.roc.membership_metrics`), carried on the records' `mia` rows as `canary_<family>_<metric>`
columns (e.g. `canary_rare_unigram_tpr_at_1pct_fpr` next to the records' `tpr_at_1pct_fpr`).

A TPR at an FPR needs 1 / FPR held-out canaries of the family (100 for 1%, 1,000 for 0.1%): below that it is
null with the reason, as for the records. Attacks that read reference adapters or the run's own member prefix
(LiRA, RMIA, Con-ReCall) are not computed on canaries: the reference adapters are trained without the designed
canaries, and a member prefix would be drawn from the canaries themselves; their rows say so (`canary_note`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from memlens.attacks.registry import CANARY_UNSUPPORTED, ConfiguredAttack
from memlens.config import MIAConfig
from memlens.metrics.roc import FPR_POINTS, membership_metrics

METRICS = ["auc", "auc_ci_low", "auc_ci_high",
           *(f"tpr_at_{name}_fpr{suffix}" for name in FPR_POINTS for suffix in ("", "_low", "_high", "_note")),
           "n_members", "n_non_members"]


def canary_attacks(attacks: Sequence[ConfiguredAttack]) -> list[ConfiguredAttack]:
    """The attacks that can score the designed canaries (none of :data:`CANARY_UNSUPPORTED`'s needs)."""
    return [a for a in attacks if not a.needs & set(CANARY_UNSUPPORTED)]


def unsupported_note(attack: ConfiguredAttack) -> str | None:
    """Why `attack` has no canary metrics, or None when it has them."""
    missing = [CANARY_UNSUPPORTED[n] for n in sorted(attack.needs & set(CANARY_UNSUPPORTED))]
    return f"no canary metrics: {attack.name!r} needs {' and '.join(missing)}" if missing else None


def family_metrics(labels: np.ndarray, scores: np.ndarray, mia: MIAConfig) -> dict:
    """The membership metrics (:data:`METRICS`) of one family's canaries, `labels` (canaries,) True = trained on,
    `scores` (canaries,); all null with a note when a side has fewer than two canaries (no interval, and a TPR
    over one held-out canary would be a coin toss)."""
    n_in, n_out = int(labels.sum()), int((~labels).sum())
    if min(n_in, n_out) < 2:
        note = f"needs 2 or more canaries on each side, has {n_in} inserted and {n_out} held out"
        return {**{m: np.nan for m in METRICS if not m.endswith("_note")},
                **{m: note for m in METRICS if m.endswith("_note")}, "n_members": n_in, "n_non_members": n_out}
    row = membership_metrics(labels, scores, n_bootstrap=mia.bootstrap, level=mia.ci_level,
                             max_fpr=mia.max_fpr_operating_point)
    out = {m: row[m] for m in METRICS}
    for m in METRICS:  # the records' wording, said of canaries
        if m.endswith("_note") and out[m]:
            out[m] = out[m].replace("non-members", "held-out canaries")
    return out


def canary_columns(scores: pd.DataFrame, attacks: Sequence[ConfiguredAttack], mia: MIAConfig) -> dict[str, dict]:
    """Result name -> the `canary_<family>_<metric>` columns of its `mia` row, from the canaries' scores (one row
    per canary: family, is_member, one column per attack that scored them); attacks without canary metrics get
    their `canary_note` only."""
    out: dict[str, dict] = {}
    labels_all = scores.is_member.to_numpy(bool)
    for attack in attacks:
        note = unsupported_note(attack)
        if note is not None:
            out[attack.name] = {"canary_note": note}
            continue
        columns: dict = {}
        for family in dict.fromkeys(scores.family):
            mask = (scores.family == family).to_numpy()
            metrics = family_metrics(labels_all[mask], scores[attack.name].to_numpy(float)[mask], mia)
            columns.update({f"canary_{family}_{k}": v for k, v in metrics.items()})
        out[attack.name] = columns
    return out


__all__ = ["METRICS", "canary_attacks", "canary_columns", "family_metrics", "unsupported_note"]
