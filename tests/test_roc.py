"""Membership metrics against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from memlens.metrics.roc import (
    delong_covariance,
    delong_test,
    hanley_mcneil_ci,
    hanley_mcneil_se,
    membership_metrics,
    operating_point,
    roc_points,
    tpr_at_fpr_sorted,
)


def _binormal(n_pos: int, n_neg: int, shift: float, seed: int = 0, rounding: int | None = None):
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(shift, 1, n_pos), rng.normal(0, 1, n_neg)]
    if rounding is not None:  # ties
        scores = np.round(scores, rounding)
    return np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)], scores


def test_hanley_mcneil_published_example():
    # Hanley & McNeil (1982), the CT example: AUC 0.893 with 51 abnormal and 58 normal images, SE 0.032.
    assert hanley_mcneil_se(0.893, 51, 58) == pytest.approx(0.032, abs=6e-4)
    low, high = hanley_mcneil_ci(0.893, 51, 58, 0.95)
    assert (low, high) == pytest.approx((0.893 - 1.96 * 0.0325, 0.893 + 1.96 * 0.0325), abs=2e-3)


def test_hanley_mcneil_and_bootstrap_agree_with_resampling():
    labels, scores = _binormal(300, 200, 0.8)
    rng = np.random.default_rng(1)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    resampled = [roc_auc_score(labels[idx], scores[idx]) for idx in
                 (np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))] for _ in range(400))]
    row = membership_metrics(labels, scores, n_bootstrap=1000)
    assert row["auc"] == pytest.approx(roc_auc_score(labels, scores))
    se = hanley_mcneil_se(row["auc"], 300, 200)
    assert se == pytest.approx(np.std(resampled), rel=0.15)
    assert row["auc_boot_low"] == pytest.approx(np.percentile(resampled, 2.5), abs=0.01)
    assert row["auc_boot_high"] == pytest.approx(np.percentile(resampled, 97.5), abs=0.01)


@pytest.mark.parametrize("rounding", [None, 1])
def test_tpr_at_fpr_matches_roc_curve(rounding):
    labels, scores = _binormal(500, 1000, 1.0, seed=2, rounding=rounding)
    fpr, tpr, _ = roc_curve(labels, scores)
    for target in (0.1, 0.01, 0.001, 0.25):
        got, threshold = tpr_at_fpr_sorted(scores[labels], scores[~labels], target)
        assert got == pytest.approx(tpr[fpr <= target + 1e-12].max())
        assert (scores[~labels] > threshold).mean() <= target
    curve = roc_points(labels, scores)
    assert curve.fpr.iloc[-1] == 1 and curve.tpr.is_monotonic_increasing


def test_too_few_non_members_gives_nan_with_reason():
    labels, scores = _binormal(80, 60, 1.0)
    row = membership_metrics(labels, scores, n_bootstrap=50)
    assert math.isnan(row["tpr_at_1pct_fpr"]) and math.isnan(row["tpr_at_0_1pct_fpr"])
    assert "needs >= 100 non-members, has 60" in row["tpr_at_1pct_fpr_note"]
    assert row["tpr_at_10pct_fpr_note"] is None and 0 <= row["tpr_at_10pct_fpr"] <= 1
    assert row["tpr_at_10pct_fpr_low"] <= row["tpr_at_10pct_fpr"] <= row["tpr_at_10pct_fpr_high"]


def test_operating_point():
    labels, scores = _binormal(200, 150, 1.0, seed=3)
    op = operating_point(labels, scores, 0.1)
    assert op.fpr <= 0.1 and op.fpr == (scores[~labels] > op.threshold).mean()
    assert op.tpr == (scores[labels] > op.threshold).mean()
    # one notch lower would flag one more non-member and exceed 10%
    assert (scores[~labels] >= op.threshold).mean() > 0.1


def _delong_bruteforce(labels, a, b):
    """DeLong 1988 straight from the definition (O(m n) placements), independent of the midrank algorithm."""
    out = []
    for s in (a, b):
        x, y = s[labels], s[~labels]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        out.append((psi.mean(), psi.mean(1), psi.mean(0)))
    v10 = np.vstack([o[1] for o in out])
    v01 = np.vstack([o[2] for o in out])
    cov = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    return np.array([o[0] for o in out]), cov


def test_delong_against_definition_and_bootstrap():
    labels, a = _binormal(150, 120, 0.9, seed=4, rounding=1)
    b = a + np.random.default_rng(5).normal(0, 0.8, len(a))
    aucs, cov = delong_covariance(labels, a, b)
    ref_aucs, ref_cov = _delong_bruteforce(labels, a, b)
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(aucs, [roc_auc_score(labels, a), roc_auc_score(labels, b)], atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-9, atol=1e-12)
    test = delong_test(labels, a, b)
    rng = np.random.default_rng(6)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    diffs = []
    for _ in range(300):
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        diffs.append(roc_auc_score(labels[idx], a[idx]) - roc_auc_score(labels[idx], b[idx]))
    assert test["se"] == pytest.approx(np.std(diffs), rel=0.15)
    assert test["diff"] == pytest.approx(test["auc_a"] - test["auc_b"])
    assert 0 <= test["p_value"] <= 1 and test["auc_a"] > test["auc_b"]  # noise lowers b's AUC
    assert delong_test(labels, a, a.copy())["p_value"] == 1.0


# ------------------------------------------------------------------ vectorised bootstrap vs the old loop
def _reference_bootstrap_ci(statistic, pos, neg, n_resamples, level, seed=0, batch=None):
    """The bootstrap as membership_metrics computed it before it was vectorised: one
    `scipy.stats.bootstrap` per statistic, all with the same seed (kept as the reference)."""
    from scipy import stats

    if n_resamples <= 0:
        return float("nan"), float("nan")
    batch = batch or max(1, 2_000_000 // (len(pos) + len(neg)))
    res = stats.bootstrap((pos, neg), statistic, n_resamples=n_resamples, confidence_level=level,
                          method="percentile", vectorized=True, paired=False, batch=batch,
                          rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _reference_auc_statistic(pos, neg, axis=-1):
    from scipy import stats

    u = stats.mannwhitneyu(pos, neg, axis=axis, method="asymptotic", use_continuity=False).statistic
    return u / (pos.shape[axis] * neg.shape[axis])


def _reference_tpr_at_fpr(pos, neg, fpr, axis=-1):
    neg_desc = -np.sort(-neg, axis=axis)
    k = math.floor(fpr * neg.shape[axis] + 1e-9)
    threshold = np.take(neg_desc, min(k, neg.shape[axis] - 1), axis=axis)
    return (pos > np.expand_dims(threshold, axis)).mean(axis=axis)


def _reference_intervals(labels, scores, n_bootstrap, level, seed, batch=None):
    """Every bootstrap interval of the old membership_metrics, keyed by its row column."""
    pos, neg = scores[labels], scores[~labels]
    out = dict(zip(("auc_boot_low", "auc_boot_high"),
                   _reference_bootstrap_ci(_reference_auc_statistic, pos, neg, n_bootstrap, level, seed, batch)))
    for name, fpr in {"10pct": 0.1, "1pct": 0.01, "0_1pct": 0.001}.items():
        col = f"tpr_at_{name}_fpr"
        if len(neg) < round(1 / fpr):
            out[f"{col}_low"] = out[f"{col}_high"] = np.nan
            continue
        out[f"{col}_low"], out[f"{col}_high"] = _reference_bootstrap_ci(
            lambda p, n, axis=-1, f=fpr: _reference_tpr_at_fpr(p, n, f, axis), pos, neg, n_bootstrap, level, seed,
            batch)
    return out


def _tied_scores(n_pos, n_neg, seed, kind):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
    if kind == "continuous":
        scores = np.r_[rng.normal(0.7, 1, n_pos), rng.normal(0, 1, n_neg)]
    elif kind == "rounded":  # many ties within and across the classes
        scores = np.round(np.r_[rng.normal(0.5, 1, n_pos), rng.normal(0, 1, n_neg)], 1)
    else:  # "few": 4 distinct values, almost everything tied
        scores = np.r_[rng.integers(1, 5, n_pos), rng.integers(0, 4, n_neg)].astype(float)
    perm = rng.permutation(len(labels))  # members and non-members interleaved
    return labels[perm], scores[perm]


@pytest.mark.parametrize(("n_pos", "n_neg", "kind", "n_bootstrap", "level", "seed"), [
    (300, 300, "continuous", 1000, 0.95, 0),
    (300, 300, "rounded", 1000, 0.95, 0),
    (250, 1200, "rounded", 500, 0.9, 3),    # enough non-members for TPR at 0.1% FPR
    (90, 60, "few", 400, 0.95, 7),          # too few non-members for 1% and 0.1%: NaN
    (2, 2, "rounded", 50, 0.95, 1),         # smallest sizes the bootstrap accepts
    (40, 30, "continuous", 0, 0.95, 0),     # no bootstrap: NaN intervals
])
def test_vectorised_bootstrap_equals_the_scipy_loop(n_pos, n_neg, kind, n_bootstrap, level, seed):
    labels, scores = _tied_scores(n_pos, n_neg, seed, kind)
    row = membership_metrics(labels, scores, n_bootstrap=n_bootstrap, level=level, seed=seed)
    expected = _reference_intervals(labels, scores, n_bootstrap, level, seed)
    got = {col: row[col] for col in expected}
    np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=0, atol=0, equal_nan=True,
                               err_msg=str({"got": got, "expected": expected}))


def test_vectorised_bootstrap_draws_batch_by_batch_like_scipy(monkeypatch):
    # scipy draws members then non-members per batch: several batches (and a short last one) must give
    # the same resamples, hence the same intervals, as the loop with that batch size.
    from memlens.metrics import roc

    labels, scores = _tied_scores(120, 150, 11, "rounded")
    monkeypatch.setattr(roc, "_bootstrap_batch", lambda n_pos, n_neg: 37)
    row = roc.membership_metrics(labels, scores, n_bootstrap=200, seed=5)
    expected = _reference_intervals(labels, scores, 200, 0.95, 5, batch=37)
    np.testing.assert_allclose([row[c] for c in expected], list(expected.values()), rtol=0, atol=0, equal_nan=True)
    # and bootstrap_ci (the generic one, kept for other statistics) follows the same batches
    pos, neg = scores[labels], scores[~labels]
    assert roc.bootstrap_ci(roc._auc_statistic, pos, neg, 200, 0.95, 5) == (row["auc_boot_low"], row["auc_boot_high"])


def test_bootstrap_needs_two_of_each_as_before():
    labels = np.array([1, 0, 0, 0], bool)
    with pytest.raises(ValueError, match="two or more observations"):
        membership_metrics(labels, np.array([0.5, 0.1, 0.2, 0.3]), n_bootstrap=10)
    assert math.isnan(membership_metrics(labels, np.array([0.5, 0.1, 0.2, 0.3]), n_bootstrap=0)["auc_boot_low"])
