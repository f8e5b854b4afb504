"""Model-free bag-of-words baseline: can members be told from non-members by their words alone?

A cross-validated logistic regression on word counts (scikit-learn). Its AUC should be near 0.5 when
the member and non-member splits come from the same distribution; well above it, the split itself is
biased (e.g. different sources or dates) and every attack's AUC is inflated by that bias, not by
memorization (Das et al. 2024, "Blind Baselines Beat Membership Inference Attacks for Foundation Models").
"""

from __future__ import annotations

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline

from memlens.metrics.roc import auc, hanley_mcneil_ci

# An AUC whose interval excludes 0.5 and that exceeds this is reported as a biased split.
BIASED_AUC = 0.6


def bag_of_words_baseline(members: list[str], non_members: list[str], *, folds: int = 5, seed: int = 0,
                          level: float = 0.95) -> dict:
    """Cross-validated AUC of a bag-of-words classifier separating members from non-members, its
    Hanley-McNeil interval, and `biased_split` (True when the AUC is clearly above chance)."""
    texts = list(members) + list(non_members)
    labels = np.r_[np.ones(len(members), dtype=int), np.zeros(len(non_members), dtype=int)]
    folds = min(folds, len(members), len(non_members))
    if folds < 2:
        raise ValueError("the bag-of-words baseline needs at least 2 members and 2 non-members")
    model = make_pipeline(CountVectorizer(lowercase=True, min_df=2, ngram_range=(1, 1)),
                          LogisticRegression(max_iter=2000, class_weight="balanced"))
    scores = cross_val_predict(model, texts, labels, method="decision_function",
                               cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    value = auc(labels, scores)
    low, high = hanley_mcneil_ci(value, len(members), len(non_members), level)
    biased = bool(low > 0.5 and value > BIASED_AUC)
    note = (f"biased split: bag-of-words AUC {value:.3f} [{low:.3f}, {high:.3f}] separates members from "
            "non-members without any model; attack AUCs are inflated by this bias" if biased else
            f"bag-of-words AUC {value:.3f} [{low:.3f}, {high:.3f}]: no strong split bias")
    return {"auc": value, "auc_ci_low": low, "auc_ci_high": high, "n_members": len(members),
            "n_non_members": len(non_members), "biased_split": biased, "note": note}
