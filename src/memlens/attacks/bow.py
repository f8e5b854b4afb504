"""Model-free bag-of-words baseline: can members be told from non-members by their words alone?

A cross-validated logistic regression on word counts (scikit-learn). Its AUC should be near 0.5 when
members and non-members come from the same distribution; well above it, the split itself is biased
(e.g. different sources or dates) and every attack's AUC is inflated by that bias, not by memorization
(Das et al. 2024, "Blind Baselines Beat Membership Inference Attacks for Foundation Models").

Records that cluster (sentences of one abstract, turns of one conversation) share words. With random
folds, a record's siblings sit in the training folds and the classifier recognises the document, not
the split: PHEE's train vs test reaches AUC 0.72 with random folds and 0.49 with folds grouped by
abstract. So with document groups known (`data.group`), folds keep each group whole
(StratifiedGroupKFold) and only the grouped AUC decides whether the split is biased; the random-fold AUC
is reported beside it. Without groups, the note says that clustered records can inflate the AUC.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from threadpoolctl import threadpool_limits

from memlens.metrics.roc import auc, hanley_mcneil_ci

# An AUC whose interval excludes 0.5 and that exceeds this is reported as a biased split.
BIASED_AUC = 0.6

BOW_ATTACK = "bag_of_words"  # the `attack` of the baseline's rows in results.parquet


def _cv_auc(texts: list[str], labels: np.ndarray, cv, groups: np.ndarray | None) -> float:
    """The cross-validated AUC of word counts for `labels` (records,) (folds by `cv`, grouped by `groups`
    (records,) when given)."""
    model = make_pipeline(CountVectorizer(lowercase=True, min_df=2, ngram_range=(1, 1)),
                          LogisticRegression(max_iter=2000, class_weight="balanced"))
    # One BLAS thread: this small problem runs 2-10x slower when its threads contend with the scoring
    # pass's (measured on 2 cores); the result does not depend on the thread count.
    with threadpool_limits(1):
        scores = cross_val_predict(model, texts, labels, groups=groups, method="decision_function", cv=cv)
    return auc(labels, scores)


def baseline_folds(n_members: int, n_non_members: int, member_groups: Sequence[str] | None = None,
                   non_member_groups: Sequence[str] | None = None, folds: int = 5) -> tuple[int, int | None]:
    """(random folds, grouped folds: None without groups) of the baseline's cross-validation over these records;
    a ValueError when a side has fewer than 2 records (or, grouped, 2 documents): checked before any work."""
    folds = min(folds, n_members, n_non_members)
    if folds < 2:
        raise ValueError(f"the bag-of-words baseline needs at least 2 members and 2 non-members (it has "
                         f"{n_members} and {n_non_members})")
    if member_groups is None or non_member_groups is None:
        return folds, None
    sides = len(set(member_groups)), len(set(non_member_groups))
    if min(folds, *sides) < 2:
        raise ValueError(f"the grouped bag-of-words baseline needs at least 2 groups on each side (it has {sides[0]} "
                         f"and {sides[1]})")
    return folds, min(folds, *sides)


def bag_of_words_baseline(members: Sequence[str], non_members: Sequence[str], *,
                          member_groups: Sequence[str] | None = None, non_member_groups: Sequence[str] | None = None,
                          folds: int = 5, seed: int = 0, level: float = 0.95) -> dict:
    """Cross-validated AUC of a bag-of-words classifier separating members from non-members.

    Returns `auc` (the grouped-fold AUC when groups are given, else the random-fold one) with its
    Hanley-McNeil interval, `auc_random_folds`, `auc_grouped_folds` (NaN without groups), `grouped`,
    `n_groups`, `biased_split` (True when `auc` is clearly above chance) and a `note` in words."""
    texts = list(members) + list(non_members)
    labels = np.r_[np.ones(len(members), dtype=int), np.zeros(len(non_members), dtype=int)]
    folds, group_folds = baseline_folds(len(members), len(non_members), member_groups, non_member_groups, folds)
    random_auc = _cv_auc(texts, labels, StratifiedKFold(folds, shuffle=True, random_state=seed), None)
    grouped = group_folds is not None
    grouped_auc, n_groups = float("nan"), None
    if grouped:
        # A group on both sides (a document split by a record-level coin) gets one label per record: keep the
        # records' own labels, and group ids distinct per side so no fold needs both halves of one group.
        groups = np.array([f"m:{g}" for g in member_groups] + [f"n:{g}" for g in non_member_groups])
        n_groups = len(set(groups))
        grouped_auc = _cv_auc(texts, labels, StratifiedGroupKFold(group_folds, shuffle=True, random_state=seed),
                              groups)
    value = grouped_auc if grouped else random_auc
    low, high = hanley_mcneil_ci(value, len(members), len(non_members), level)
    biased = bool(low > 0.5 and value > BIASED_AUC)
    shown = f"bag-of-words AUC {value:.3f} [{low:.3f}, {high:.3f}]"
    if grouped:
        folds_said = f"folds grouped by document ({n_groups} groups; random folds: {random_auc:.3f})"
        note = (f"biased split: {shown} with {folds_said} separates members from non-members without any model; "
                "attack AUCs are inflated by this bias" if biased else
                f"{shown} with {folds_said}: no split bias beyond documents sharing words")
    else:
        caveat = ("; records of one document share words, so if records cluster (sentences, paragraphs, turns) "
                  "random folds inflate this: set data.group to check with grouped folds")
        note = (f"biased split: {shown} (random folds) separates members from non-members without any model; "
                f"attack AUCs may be inflated by this bias{caveat}" if biased else
                f"{shown} (random folds): no strong split bias")
    return {"auc": value, "auc_ci_low": low, "auc_ci_high": high, "auc_random_folds": random_auc,
            "auc_grouped_folds": grouped_auc, "grouped": grouped, "n_groups": n_groups,
            "n_members": len(members), "n_non_members": len(non_members), "biased_split": biased, "note": note}


__all__ = ["BIASED_AUC", "bag_of_words_baseline", "baseline_folds"]
