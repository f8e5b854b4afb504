"""The designed canaries' own membership metrics (:mod:`memlens.data.designed_canaries`): per attack and per family,
the canaries trained on (their coin came up) against the held-out ones, with the same metrics as the records
(:func:`memlens.metrics.roc.membership_metrics`), carried on the records' `mia` rows as `canary_<family>_<metric>`
columns (e.g. `canary_rare_unigram_tpr_at_1pct_fpr` next to the records' `tpr_at_1pct_fpr`).

A TPR at an FPR is the rule of :func:`detection_rate` (one rule for the study's designed canaries and an audit's):
the threshold is the j-th highest held-out canary score, j = floor(FPR * (held out + 1)), so that a canary never
trained on scores above it with probability j / (held out + 1) <= FPR on average (its realised FPR, which the
held-out canaries' draw moves, is Beta(j, held out - j + 1)); the columns carry that expected FPR and its one-sided
upper bound next to the TPR. It needs 1 / FPR - 1 held-out canaries of the family (99 for 1%, 999 for 0.1%): below
that it is null with the number needed. One interval per number: the AUC's is Hanley & McNeil's, the TPR's Clopper &
Pearson's over the inserted canaries at that threshold, the FPR's the order-statistic bound (`canary_intervals`
says so on every row). Attacks that read reference adapters or the run's own member prefix
(LiRA, RMIA, Con-ReCall) are not computed on canaries: the reference adapters are trained without the designed
canaries, and a member prefix would be drawn from the canaries themselves; their rows say so (`canary_note`).

An audit's canaries (`memlens audit --canaries`, :mod:`memlens.data.user_canaries`) come as families of inserted
canaries by copies (`copies4`) and one pool of held-out ones (family :data:`HELD_OUT`), the comparison of every
family: a canary never trained on has no copies. :func:`canary_columns` compares each family with that pool;
:func:`canary_detection` gives the audit's report its detection rates: of the inserted canaries, how many score
above the threshold the held-out ones set at an FPR, with an exact interval and the rule's realised FPR.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from memlens.attacks.registry import CANARY_UNSUPPORTED, ConfiguredAttack
from memlens.config import MIAConfig
from memlens.data.user_canaries import HELD_OUT
from memlens.metrics.roc import FPR_POINTS, auc, hanley_mcneil_ci

METRICS = ["auc", "auc_ci_low", "auc_ci_high",
           *(f"tpr_at_{name}_fpr{suffix}" for name in FPR_POINTS
             for suffix in ("", "_low", "_high", "_fpr_expected", "_fpr_upper", "_note")),
           "n_members", "n_non_members"]
# what each interval of the canary columns is (one per number), on every row that has them
INTERVALS = ("auc_ci: Hanley-McNeil; tpr_at_*_low/high: Clopper-Pearson over the inserted canaries at the threshold; "
             "tpr_at_*_fpr_expected/upper: the threshold rule's realised FPR, mean and one-sided upper bound (order "
             "statistics of the held-out canaries)")


def canary_attacks(attacks: Sequence[ConfiguredAttack]) -> list[ConfiguredAttack]:
    """The attacks that can score the designed canaries (none of :data:`CANARY_UNSUPPORTED`'s needs)."""
    return [a for a in attacks if not a.needs & set(CANARY_UNSUPPORTED)]


def unsupported_note(attack: ConfiguredAttack) -> str | None:
    """Why `attack` has no canary metrics, or None when it has them."""
    missing = [CANARY_UNSUPPORTED[n] for n in sorted(attack.needs & set(CANARY_UNSUPPORTED))]
    return f"no canary metrics: {attack.name!r} needs {' and '.join(missing)}" if missing else None


def family_metrics(labels: np.ndarray, scores: np.ndarray, mia: MIAConfig) -> dict:
    """The membership metrics (:data:`METRICS`) of one family's canaries, `labels` (canaries,) True = trained on,
    `scores` (canaries,): the AUC with its Hanley-McNeil interval, and at each FPR the :func:`detection_rate` of the
    inserted canaries against the held-out ones (its Clopper-Pearson interval, its realised FPR); all null with a
    note when a side has fewer than two canaries."""
    n_in, n_out = int(labels.sum()), int((~labels).sum())
    if min(n_in, n_out) < 2:
        note = f"needs 2 or more canaries on each side, has {n_in} inserted and {n_out} held out"
        return {**{m: np.nan for m in METRICS if not m.endswith("_note")},
                **{m: note for m in METRICS if m.endswith("_note")}, "n_members": n_in, "n_non_members": n_out}
    value = auc(labels, scores)
    low, high = hanley_mcneil_ci(value, n_in, n_out, mia.ci_level)
    out: dict = {"auc": value, "auc_ci_low": low, "auc_ci_high": high, "n_members": n_in, "n_non_members": n_out}
    for name, fpr in FPR_POINTS.items():
        rate = detection_rate(scores[labels], scores[~labels], fpr, mia.ci_level)
        column = f"tpr_at_{name}_fpr"
        out.update({column: rate["tpr"], f"{column}_low": rate["tpr_low"], f"{column}_high": rate["tpr_high"],
                    f"{column}_fpr_expected": rate["fpr_expected"], f"{column}_fpr_upper": rate["fpr_upper"],
                    f"{column}_note": rate["note"]})
    return {m: out[m] for m in METRICS}


def canary_columns(scores: pd.DataFrame, attacks: Sequence[ConfiguredAttack], mia: MIAConfig) -> dict[str, dict]:
    """Result name -> the `canary_<family>_<metric>` columns of its `mia` row, from the canaries' scores (one row
    per canary: family, is_member, one column per attack that scored them); attacks without canary metrics get
    their `canary_note` only."""
    out: dict[str, dict] = {}
    labels_all = scores.is_member.to_numpy(bool)
    pooled = (scores.family == HELD_OUT).to_numpy()  # an audit's held-out canaries: compared with every family
    for attack in attacks:
        note = unsupported_note(attack)
        if note is not None:
            out[attack.name] = {"canary_note": note}
            continue
        columns: dict = {}
        for family in dict.fromkeys(scores.family[~pooled]):
            mask = (scores.family == family).to_numpy() | pooled
            metrics = family_metrics(labels_all[mask], scores[attack.name].to_numpy(float)[mask], mia)
            columns.update({f"canary_{family}_{k}": v for k, v in metrics.items()})
        out[attack.name] = {**columns, "canary_intervals": INTERVALS} if columns else columns
    return out


# ------------------------------------------------------------------------------------- an audit's canaries
ALL = "all"  # the family of canary_detection's rows over every inserted canary
DETECTION_COLUMNS = ["attack", "family", "copies", "fpr", "n_inserted", "n_held_out", "threshold", "threshold_rank",
                     "fpr_expected", "fpr_upper", "k", "tpr", "tpr_low", "tpr_high", "auc", "note"]


def held_out_needed(fpr: float) -> int:
    """The fewest held-out canaries that set a threshold whose expected FPR is at most `fpr`: n with
    floor(fpr * (n + 1)) >= 1, i.e. 1 / fpr - 1 (99 for 1%)."""
    return max(1, math.ceil(1 / fpr - 1 - 1e-9))


def threshold_rank(fpr: float, n_held_out: int) -> int:
    """j: the rule's threshold is the j-th highest of `n_held_out` held-out scores, the largest j whose expected
    realised FPR j / (n + 1) is at most `fpr` (0: no such threshold)."""
    return math.floor(fpr * (n_held_out + 1) + 1e-9)


def realised_fpr(rank: int, n_held_out: int, level: float = 0.95) -> tuple[float, float]:
    """The realised FPR of "detected when the score is above the `rank`-th highest of `n_held_out` held-out scores":
    for a canary never trained on, drawn like the held-out ones (continuous scores), P(score > t) = 1 - F(t), and
    F(t) of the (n - rank + 1)-th order statistic of n uniforms is Beta(n - rank + 1, rank), so the FPR is
    Beta(rank, n - rank + 1) over draws of the held-out canaries (David & Nagaraja 2003, ch. 2): its mean
    rank / (n + 1) and its one-sided `level` upper bound (the Beta's `level` quantile). 100 held-out canaries at
    rank 1: 0.99% and 2.95%; at rank 2: 1.98% and 4.66%."""
    return rank / (n_held_out + 1), float(stats.beta.ppf(level, rank, n_held_out - rank + 1))


def detection_rate(inserted: np.ndarray, held_out: np.ndarray, fpr: float, level: float = 0.95) -> dict:
    """TPR at `fpr` of the inserted canaries' scores `inserted` (inserted,) against the held-out canaries' `held_out`
    (held out,), with its exact interval and the rule's realised FPR.

    The threshold t is the j-th highest held-out score, j = :func:`threshold_rank` (floor(fpr * (n + 1)) of n held-out
    canaries), and a canary is detected when its score is above t: a canary never trained on is, with probability
    j / (n + 1) <= fpr on average, at most `fpr_upper` with confidence `level` (:func:`realised_fpr`). k of the
    inserted are detected, TPR = k / inserted, and its interval is Clopper & Pearson's (1934): the p with
    P(X >= k | inserted, p) = (1 - level) / 2 and the p with P(X <= k | inserted, p) = (1 - level) / 2
    (`scipy.stats.binomtest(k, n).proportion_ci(method="exact")`), over the inserted canaries given t (the held-out
    canaries' draw moves t: that is the realised FPR's uncertainty, stated beside it, not a second interval of the
    TPR). Returns threshold, threshold_rank, fpr_expected, fpr_upper, k, tpr, tpr_low, tpr_high and note: all null
    with the note naming the number needed when there are fewer than :func:`held_out_needed` held-out canaries, or
    when no canary is inserted."""
    held_out = np.asarray(held_out, dtype=np.float64)
    inserted = np.asarray(inserted, dtype=np.float64)
    rank = threshold_rank(fpr, len(held_out))
    if rank < 1 or not len(inserted):
        note = (f"needs >= {held_out_needed(fpr)} held-out canaries, has {len(held_out)}" if len(inserted) else
                "no inserted canary")
        return {"threshold": np.nan, "threshold_rank": np.nan, "fpr_expected": np.nan, "fpr_upper": np.nan,
                "k": np.nan, "tpr": np.nan, "tpr_low": np.nan, "tpr_high": np.nan, "note": note}
    threshold = float(np.sort(held_out)[::-1][rank - 1])
    expected, upper = realised_fpr(rank, len(held_out), level)
    k = int((inserted > threshold).sum())
    interval = stats.binomtest(k, len(inserted)).proportion_ci(confidence_level=level, method="exact")
    return {"threshold": threshold, "threshold_rank": rank, "fpr_expected": expected, "fpr_upper": upper, "k": k,
            "tpr": k / len(inserted), "tpr_low": float(interval.low), "tpr_high": float(interval.high), "note": None}


def family_copies(family: str) -> int | None:
    """The copies a `copies<N>` family names (None for another family)."""
    found = re.fullmatch(r"copies(\d+)", str(family))
    return int(found.group(1)) if found else None


def canary_detection(scores: pd.DataFrame, attacks: Sequence[str], fprs: dict[str, float] | None = None,
                     level: float = 0.95) -> pd.DataFrame:
    """Detection rates of one model's canaries from their scores (`canary_scores.parquet`'s rows of one run: family,
    is_member, one column per attack): for each attack of `attacks` the frame has, each family of inserted canaries
    (in order of copies, then of appearance) and `all` of them, and each FPR of `fprs` (:data:`FPR_POINTS`'s
    values by default), the :func:`detection_rate` of its inserted canaries against every held-out canary (any
    family: never trained on, they are one pool) and the AUC of the two (NaN without both). Columns:
    :data:`DETECTION_COLUMNS`; empty without held-out canaries (there is then no detection rate)."""
    if "run_id" in scores and scores.run_id.nunique() > 1:
        raise ValueError(f"canary_detection: scores of {scores.run_id.nunique()} runs; give one run's")
    fprs = dict(FPR_POINTS) if fprs is None else fprs
    members = scores.is_member.to_numpy(bool)
    if members.all():
        return pd.DataFrame(columns=DETECTION_COLUMNS)
    families = sorted(dict.fromkeys(scores.family[members]), key=lambda f: (family_copies(f) is None,
                                                                             family_copies(f) or 0))
    groups = {**{f: members & (scores.family == f).to_numpy() for f in families}, ALL: members}
    rows = []
    for attack in (a for a in attacks if a in scores):
        values = scores[attack].to_numpy(np.float64)
        bad = int((~np.isfinite(values)).sum())
        held_out = values[~members]
        for family, mask in groups.items():
            inserted = values[mask]
            for fpr in fprs.values():
                row = {"attack": attack, "family": family, "copies": family_copies(family), "fpr": fpr,
                       "n_inserted": len(inserted), "n_held_out": len(held_out)}
                if bad:
                    rows.append({**row, "note": f"{bad} canary score(s) are NaN or infinite"})
                    continue
                rows.append({**row, **detection_rate(inserted, held_out, fpr, level),
                             "auc": auc(np.r_[np.ones(len(inserted)), np.zeros(len(held_out))],
                                        np.r_[inserted, held_out])})
    return pd.DataFrame(rows, columns=DETECTION_COLUMNS)


__all__ = ["ALL", "DETECTION_COLUMNS", "INTERVALS", "METRICS", "canary_attacks", "canary_columns", "canary_detection",
           "detection_rate", "family_copies", "family_metrics", "held_out_needed", "realised_fpr", "threshold_rank",
           "unsupported_note"]
