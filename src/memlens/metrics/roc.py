"""How well a score separates members (label 1) from non-members (label 0).

Convention everywhere: a higher score means "more likely a member".
AUC and ROC curves come from scikit-learn. Bootstrap intervals are stratified percentile intervals
(members and non-members are resampled separately, so every resample has both); `membership_metrics`
computes them for the AUC and every TPR from one set of resamples, vectorised over the resamples, with the
draws and the estimator of `scipy.stats.bootstrap` (`bootstrap_ci`): the same numbers, a small fraction of
the time.
Hanley-McNeil's interval (the study's) and DeLong's test are a few lines of formulas that neither
scikit-learn nor SciPy provides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

FPR_POINTS = {"10pct": 0.1, "1pct": 0.01, "0_1pct": 0.001}


def _split(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The members' and the non-members' scores: (members,), (non-members,) from `labels` and `scores` (records,)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} score(s) are NaN or infinite")
    return scores[labels], scores[~labels]


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (scikit-learn) of `scores` (records,) for `labels` (records,), True = member."""
    return float(roc_auc_score(np.asarray(labels).astype(int), scores))


def hanley_mcneil_se(auc_value: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC (Hanley & McNeil 1982, eq. 2), the study's interval."""
    a = auc_value
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def hanley_mcneil_ci(auc_value: float, n_pos: int, n_neg: int, level: float = 0.95) -> tuple[float, float]:
    """Normal-approximation interval auc +- z * SE, clipped to [0, 1]."""
    z = stats.norm.ppf(0.5 + level / 2)
    se = hanley_mcneil_se(auc_value, n_pos, n_neg)
    return max(0.0, auc_value - z * se), min(1.0, auc_value + z * se)


def _auc_statistic(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
    """The AUC of members' scores `pos` (..., members) over non-members' `neg` (..., non-members) along `axis`:
    Mann-Whitney U / (n_pos n_neg), ties counting 1/2."""
    u = stats.mannwhitneyu(pos, neg, axis=axis, method="asymptotic", use_continuity=False).statistic
    return u / (pos.shape[axis] * neg.shape[axis])


def tpr_at_fpr_sorted(pos: np.ndarray, neg: np.ndarray, fpr: float, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Best TPR with FPR <= `fpr`, and its threshold, along `axis` (vectorised for the bootstrap): `pos`
    (..., members) and `neg` (..., non-members) give (...,) each.

    The rule "member if score > t" with t the (k+1)-th largest non-member score, k = floor(fpr * n_neg),
    flags at most k non-members; any lower threshold would flag k+1. Same point as the ROC curve's."""
    neg_desc = -np.sort(-neg, axis=axis)
    k = math.floor(fpr * neg.shape[axis] + 1e-9)
    threshold = np.take(neg_desc, min(k, neg.shape[axis] - 1), axis=axis)
    tpr = (pos > np.expand_dims(threshold, axis)).mean(axis=axis)
    return tpr, threshold


def bootstrap_ci(statistic, pos: np.ndarray, neg: np.ndarray, n_resamples: int, level: float,
                 seed: int = 0) -> tuple[float, float]:
    """Stratified percentile bootstrap interval of `statistic(pos, neg, axis)`, `pos` (members,) and `neg`
    (non-members,) resampled separately; NaNs when n_resamples=0."""
    if n_resamples <= 0:
        return float("nan"), float("nan")
    res = stats.bootstrap((pos, neg), statistic, n_resamples=n_resamples, confidence_level=level,
                          method="percentile", vectorized=True, paired=False,
                          batch=_bootstrap_batch(len(pos), len(neg)),
                          rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _bootstrap_batch(n_pos: int, n_neg: int) -> int:
    # Resamples per batch (bounds memory: ~2e6 drawn indices a batch). The batch also fixes the order of
    # the random draws, so bootstrap_ci and bootstrap_intervals must agree on it.
    return max(1, 2_000_000 // (n_pos + n_neg))


def _percentile_interval(distribution: np.ndarray, level: float) -> tuple[float, float]:
    """The percentile interval of `distribution` (resamples,) exactly as `scipy.stats.bootstrap(method="percentile")`
    computes it."""
    alpha = np.asarray((1 - float(level)) / 2, dtype=distribution.dtype)
    ci = stats.quantile(distribution, np.stack((alpha, 1 - alpha), axis=-1), axis=-1)
    return float(ci[0]), float(ci[1])


def bootstrap_intervals(pos: np.ndarray, neg: np.ndarray, fprs: tuple[float, ...] | list[float],
                        n_resamples: int, level: float, seed: int = 0) -> dict:
    """Bootstrap intervals of the AUC and of the TPR at each FPR in `fprs`, all from one set of resamples.

    Identical to `bootstrap_ci(_auc_statistic, ...)` and `bootstrap_ci(tpr_at_fpr_sorted...)` with the
    same seed (same draws: `scipy.stats.bootstrap`'s, batch by batch; same statistics; same percentile
    estimator), but each resample is reduced to counts over the sorted non-member scores instead of being
    materialised and ranked or sorted: with `lo[i]` / `hi[i]` the number of non-members below / at most
    member i's score and `cum[b, j]` the number of draws of resample b among the j lowest non-members,
    the resample's Mann-Whitney U is sum over its drawn members of (cum[b, lo] + cum[b, hi]) / 2 (exact
    in integers), its (k+1)-th largest non-member is the sorted non-member at the first j where
    cum[b, j + 1] passes n_neg - 1 - k, and a member exceeds it when lo[i] > j.

    Returns {"auc": (low, high), fpr: (low, high) for each fpr}; NaNs when `n_resamples` <= 0."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    keys = ["auc", *fprs]
    if n_resamples <= 0:
        return {key: (float("nan"), float("nan")) for key in keys}
    n_pos, n_neg = len(pos), len(neg)
    if n_pos <= 1 or n_neg <= 1:  # as scipy.stats.bootstrap refuses it
        raise ValueError("each sample in `data` must contain two or more observations along `axis`.")
    order = np.argsort(neg, kind="stable")
    neg_sorted = neg[order]
    sorted_position = np.empty(n_neg, dtype=np.int64)
    sorted_position[order] = np.arange(n_neg)
    lo = np.searchsorted(neg_sorted, pos, side="left")   # non-members strictly below each member
    hi = np.searchsorted(neg_sorted, pos, side="right")  # ... at or below
    ks = [min(math.floor(fpr * n_neg + 1e-9), n_neg - 1) for fpr in fprs]  # as tpr_at_fpr_sorted
    rng = np.random.default_rng(seed)
    batch = _bootstrap_batch(n_pos, n_neg)
    auc_parts: list[np.ndarray] = []
    tpr_parts: list[list[np.ndarray]] = [[] for _ in fprs]
    for start in range(0, n_resamples, batch):
        b = min(batch, n_resamples - start)
        # scipy.stats.bootstrap's draws, in its order: each sample's (b, n) index matrix, per batch
        pos_idx = rng.integers(0, n_pos, (b, n_pos))
        neg_idx = rng.integers(0, n_neg, (b, n_neg))
        rows = np.arange(b)[:, None] * n_neg
        counts = np.bincount((sorted_position[neg_idx] + rows).ravel(), minlength=b * n_neg).reshape(b, n_neg)
        cum = np.zeros((b, n_neg + 1), dtype=np.int64)
        np.cumsum(counts, axis=1, out=cum[:, 1:])
        below = lo[pos_idx]  # (b, n_pos)
        flat, row_start = cum.ravel(), np.arange(b)[:, None] * (n_neg + 1)  # flat gathers: 1.5x take_along_axis
        twice_u = (flat[below + row_start] + flat[hi[pos_idx] + row_start]).sum(axis=1)
        auc_parts.append((twice_u / 2) / (n_pos * n_neg))
        for parts, k in zip(tpr_parts, ks):
            j = (cum[:, 1:] <= n_neg - 1 - k).sum(axis=1)  # sorted index of the (k+1)-th largest draw
            parts.append((below > j[:, None]).mean(axis=1))
    out = {"auc": _percentile_interval(np.concatenate(auc_parts), level)}
    for fpr, parts in zip(fprs, tpr_parts):
        out[fpr] = _percentile_interval(np.concatenate(parts), level)
    return out


@dataclass
class OperatingPoint:
    threshold: float
    tpr: float
    fpr: float


def operating_point(labels: np.ndarray, scores: np.ndarray, max_fpr: float = 0.1) -> OperatingPoint:
    """The study's operating point: the threshold fixed on the non-members so that at most `max_fpr`
    of them score above it, applied to the members (member if score > threshold). `labels`, `scores`: (records,)."""
    pos, neg = _split(labels, scores)
    tpr, threshold = tpr_at_fpr_sorted(pos, neg, max_fpr)
    return OperatingPoint(float(threshold), float(tpr), float((neg > threshold).mean()))


def roc_points(labels: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """ROC curve (scikit-learn) of `scores` (records,) for `labels` (records,) as a frame of fpr, tpr, threshold:
    plot it on linear or log-log axes."""
    fpr, tpr, thresholds = roc_curve(np.asarray(labels).astype(int), np.asarray(scores, dtype=np.float64))
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thresholds})


def membership_metrics(labels: np.ndarray, scores: np.ndarray, *, n_bootstrap: int = 1000,
                       level: float = 0.95, max_fpr: float = 0.1, seed: int = 0) -> dict:
    """Every membership metric of one score (`labels`, `scores`: (records,), True = member): AUC with
    Hanley-McNeil and bootstrap intervals, TPR at
    10%, 1%, 0.1% FPR with bootstrap intervals (NaN plus a `*_note` when there are fewer than 1/fpr
    non-members: the point would really be TPR at FPR 0), and the study's operating point."""
    pos, neg = _split(labels, scores)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"need members and non-members, got {len(pos)} and {len(neg)}")
    value = auc(labels, scores)
    low, high = hanley_mcneil_ci(value, len(pos), len(neg), level)
    fprs = [fpr for fpr in FPR_POINTS.values() if len(neg) >= round(1 / fpr)]
    boot = bootstrap_intervals(pos, neg, fprs, n_bootstrap, level, seed)
    row = {"auc": value, "auc_ci_low": low, "auc_ci_high": high, "auc_boot_low": boot["auc"][0],
           "auc_boot_high": boot["auc"][1], "n_members": len(pos), "n_non_members": len(neg)}
    for name, fpr in FPR_POINTS.items():
        col = f"tpr_at_{name}_fpr"
        if fpr not in fprs:
            row.update({col: np.nan, f"{col}_low": np.nan, f"{col}_high": np.nan,
                        f"{col}_note": f"needs >= {round(1 / fpr)} non-members, has {len(neg)}"})
            continue
        row[col] = float(tpr_at_fpr_sorted(pos, neg, fpr)[0])
        row[f"{col}_low"], row[f"{col}_high"] = boot[fpr]
        row[f"{col}_note"] = None
    op = operating_point(labels, scores, max_fpr)
    row.update({"op_max_fpr": max_fpr, "op_threshold": op.threshold, "op_tpr": op.tpr, "op_fpr": op.fpr})
    return row


# ------------------------------------------------------------------------------------------ DeLong
def _midranks(x: np.ndarray) -> np.ndarray:
    """Midranks (1-based, ties averaged) along the last axis."""
    return stats.rankdata(x, axis=-1, method="average")


def delong_covariance(labels: np.ndarray, *score_sets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (k,) of k scores (each (records,)) of the same records and their (k, k) covariance matrix (DeLong et
    al. 1988), with
    the fast midrank algorithm (Sun & Xu 2014). Written here because neither scikit-learn nor SciPy
    implements DeLong's test."""
    labels = np.asarray(labels).astype(bool)
    scores = np.vstack([np.asarray(s, dtype=np.float64) for s in score_sets])  # (k, n)
    pos, neg = scores[:, labels], scores[:, ~labels]
    m, n = pos.shape[1], neg.shape[1]
    tx, ty, tz = _midranks(pos), _midranks(neg), _midranks(np.hstack([pos, neg]))
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    v01 = (tz[:, :m] - tx) / n          # structural components of the members
    v10 = 1.0 - (tz[:, m:] - ty) / m    # ... and of the non-members
    sx = np.atleast_2d(np.cov(v01))
    sy = np.atleast_2d(np.cov(v10))
    return aucs, sx / m + sy / n


def delong_test(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> dict:
    """DeLong's test of AUC(a) == AUC(b) for two correlated scores (records,) of the same records.
    Returns auc_a, auc_b, diff (a - b), se, z and the two-sided p-value."""
    aucs, cov = delong_covariance(labels, scores_a, scores_b)
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = float(aucs[0] - aucs[1])
    se = math.sqrt(max(var, 0.0))
    if se == 0:
        z, p = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    else:
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff, "se": se, "z": z, "p_value": p}
