"""Was a set of records used to fine-tune a model, and what share of it?

Membership inference decides per record, and at a low false-positive rate it is weak on most fine-tunes. A data
owner asks about a *set*: the suspect records S, beside records N of the same distribution known not to have been
used. Two statistics answer it from the attacks' per-record scores:

- **Dataset inference** (Maini et al. 2024, "LLM Dataset Inference: Did you train on my dataset?", arXiv
  2406.06443, Sec. 5 and Fig. 1): the per-record scores of several attacks are the features of a record; S and N
  are each split into halves A and B (:func:`split_halves`); a linear model learns on the A halves which features
  tell S from N (stage 2); on the B halves it aggregates each record's features into one score, and a one-sided
  t-test asks whether S's scores exceed N's (stage 3). Learning and testing on disjoint halves keeps the test
  valid whatever the model learned: under the null (S unused, so S and N exchangeable) the B scores of both sides
  come from one distribution. :func:`dataset_inference`.
- **Usage share** (Tong et al., ICLR 2025, "How Much of My Dataset Did You Use? Quantitative Data Usage Inference
  in Machine Learning", DUCI): a membership guess m_i per suspect record is biased (its TPR < 1, FPR > 0), but
  E[m_i] = FPR + p_i (TPR - FPR), so p_i_hat = (m_i - FPR) / (TPR - FPR) is unbiased for the record's use p_i, and
  the share is their mean, with TPR and FPR measured on reference models whose members are known
  (:func:`usage_share`; :func:`reference_guess_scores` makes LiRA guesses of the target and of every reference
  from memlens' reference adapters).

Both return typed results (pydantic models, ready for ``audit.json``) and :func:`dataset_rows` turns them into rows
of the study's results schema (stage ``dataset``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_curve
from threadpoolctl import threadpool_limits

from memlens.attacks.lira_rmia import lira_fit
from memlens.config import ConfigError

DATASET_STAGE = "dataset"               # the `stage` of the rows in results.parquet
DI_ATTACK = "dataset_inference"         # the `attack` of the dataset-inference row
SHARE_ATTACK = "usage_share"            # the `attack` of the usage-share row
DEFAULT_EFFECT_SIZE = 0.5               # the shift (in standard deviations) the test is sized to detect
DEFAULT_POWER = 0.8
MIN_PER_HALF = 5                        # fewest records of each side in each half; fewer is refused
OUTLIER_QUANTILE = 0.025                # each feature is clipped to these quantiles of the learning half
# Columns of a mia_scores.parquet-like frame that are not attack scores (never used as features by default).
NON_FEATURE_COLUMNS = frozenset({"run_id", "sample_id", "split", "is_member", "is_canary", "n_tokens", "nll_ft",
                                 "nll_ref", "text", "group", "family", "canary_id"})
TEST_NAME = "one-sided Welch t-test (scipy.stats.ttest_ind, equal_var=False, alternative='greater')"
POWER_METHOD = ("smallest n per side of the test half with P(T > t_(1-level, 2n-2)) >= power for T noncentral t "
                "(df 2n - 2, noncentrality d sqrt(n / 2)), the one-sided two-sample t-test at equal variances; "
                "doubled for the learning half")

Verdict = Literal["used", "not_shown", "underpowered", "confounded"]


# ------------------------------------------------------------------------------------- dataset inference
class DatasetInference(BaseModel):
    """The answer of :func:`dataset_inference`. Aggregated score of a record: sum_f weights[f] * (clip(x_f) -
    feature_mean[f]) / feature_scale[f] + intercept, clip to [clip_low[f], clip_high[f]]."""

    test: str
    level: float
    p_value: float
    statistic: float                    # Welch's t on the B halves
    df: float                           # Welch-Satterthwaite degrees of freedom
    verdict: Verdict
    used: bool                          # p_value < level and not confounded
    features: list[str]                 # the features the model learned on, in the order of `weights`
    weights: dict[str, float]           # per standardized feature
    intercept: float
    feature_mean: dict[str, float]      # standardization of each feature, from the learning half
    feature_scale: dict[str, float]
    clip_low: dict[str, float]          # outlier clipping of each feature, from the learning half
    clip_high: dict[str, float]
    dropped_features: dict[str, str]    # feature -> why it was not used
    halves: dict[str, list[str]]        # suspect_a, suspect_b, non_members_a, non_members_b: sample ids
    test_scores: dict[str, list[float]]  # suspect_b, non_members_b: aggregated scores, in the order of `halves`
    grouped: bool                       # halves keep each document group whole
    n_suspect: int
    n_non_members: int
    observed_effect: float              # (mean S_B - mean N_B) / pooled standard deviation
    effect_size: float                  # the standardized shift the power statement is for
    power: float                        # the power asked for
    power_at_n: float                   # the test's power at effect_size with the B halves' sizes
    min_records_per_side: int           # records per side (both halves) the stated power needs
    power_method: str
    seed: int
    confounded: bool = False            # words alone separate S from N (the bag-of-words check)
    bag_of_words_auc: float | None = None
    note: str | None = None


def welch_greater(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(t, degrees of freedom, p) of the one-sided Welch test that mean(a) > mean(b); `a`, `b`: (n_a,), (n_b,).
    t = (mean a - mean b) / sqrt(s_a^2 / n_a + s_b^2 / n_b), df by Welch-Satterthwaite, p = P(T_df > t)."""
    result = stats.ttest_ind(np.asarray(a, float), np.asarray(b, float), equal_var=False, alternative="greater")
    return float(result.statistic), float(result.df), float(result.pvalue)


def t_test_power(effect_size: float, n_a: int, n_b: int, level: float) -> float:
    """Power of the one-sided two-sample t-test at `level` with n_a and n_b records to detect a shift of
    `effect_size` standard deviations (equal variances): P(T > t_(1-level, df)), T noncentral t with df = n_a + n_b
    - 2 and noncentrality effect_size / sqrt(1/n_a + 1/n_b)."""
    df = n_a + n_b - 2
    if df < 1:
        return 0.0
    critical = stats.t.ppf(1 - level, df)
    return float(stats.nct.sf(critical, df, effect_size / np.sqrt(1 / n_a + 1 / n_b)))


def records_for_power(effect_size: float, level: float, power: float) -> int:
    """The smallest n per side of a one-sided two-sample t-test (n records each side) whose power at `level`
    reaches `power` for a shift of `effect_size` standard deviations (:func:`t_test_power`); 51 for d = 0.5 at
    level 0.05 and power 0.8, as in Cohen's tables."""
    if effect_size <= 0 or not 0 < level < 1 or not 0 < power < 1:
        raise ConfigError(f"dataset inference: effect_size must be > 0 (got {effect_size}), level and power in "
                          f"(0, 1) (got {level}, {power})")
    n = 2
    while t_test_power(effect_size, n, n, level) < power:
        n += 1
    return n


def split_halves(n: int, groups: Sequence | None, rng: np.random.Generator) -> np.ndarray:
    """(n,) bool: True for the records of half A (the learning half), about half of them, drawn by `rng`. With
    `groups` (n,), whole groups go to one half (a document's records share words and memorization): groups in a
    random order join A until it holds half the records."""
    if groups is None:
        in_a = np.zeros(n, bool)
        in_a[rng.permutation(n)[: n // 2]] = True
        return in_a
    keys = pd.Series(list(groups), dtype=str)
    unique = keys.unique()
    sizes = keys.value_counts()
    in_a_groups, count = set(), 0
    for g in unique[rng.permutation(len(unique))]:
        if count >= n / 2:
            break
        in_a_groups.add(g)
        count += int(sizes[g])
    return keys.isin(in_a_groups).to_numpy()


def _check_frame(scores: pd.DataFrame, suspect_column: str) -> pd.DataFrame:
    """The frame's records, checked (columns present, no text on both sides); canary rows left out."""
    for column in ("sample_id", "text", suspect_column):
        if column not in scores:
            raise ConfigError(f"dataset inference: the scores frame needs a {column!r} column (sample_id, text, "
                              f"{suspect_column} (True: suspect record, False: known non-member), one column per "
                              f"attack); it has {list(scores.columns)}")
    frame = scores
    if "is_canary" in frame and frame.is_canary.astype(bool).any():
        frame = frame[~frame.is_canary.astype(bool)]
    suspect = frame[suspect_column].astype(bool).to_numpy()
    shared = set(frame.text[suspect]) & set(frame.text[~suspect])
    if shared:
        example = next(iter(shared))
        raise ConfigError(f"dataset inference: {len(shared)} text(s) are both in the suspect set and among the known "
                          f"non-members (e.g. {example[:80]!r}); a record cannot be both: remove it from one file")
    return frame.reset_index(drop=True)


def _usable_features(frame: pd.DataFrame, features: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """The features to learn on and, for each left out, why (missing, not numeric, NaN or infinite values)."""
    if features is None:
        features = [c for c in frame.columns if c not in NON_FEATURE_COLUMNS and pd.api.types.is_numeric_dtype(frame[c])
                    and not pd.api.types.is_bool_dtype(frame[c])]
    missing = [f for f in features if f not in frame]
    if missing:
        raise ConfigError(f"dataset inference: feature(s) {missing} are not columns of the scores frame; it has "
                          f"{sorted(c for c in frame.columns if c not in NON_FEATURE_COLUMNS)}")
    kept, dropped = [], {}
    for name in features:
        values = pd.to_numeric(frame[name], errors="coerce").to_numpy(float)
        bad = int((~np.isfinite(values)).sum())
        if bad:
            dropped[name] = (f"{bad} of {len(values)} records have no finite score (a partial attack, or an infinite "
                             "score): dropped rather than imputed")
        else:
            kept.append(name)
    return kept, dropped


def _fit_aggregate(x_a: np.ndarray, y_a: np.ndarray, names: list[str], dropped: dict[str, str]) -> dict:
    """Clip, standardize and fit the linear model on half A (`x_a` (records, features), `y_a` (records,) 1 for
    suspect); features constant on A are dropped (said in `dropped`). Returns the fitted transform and weights."""
    low = np.quantile(x_a, OUTLIER_QUANTILE, axis=0)
    high = np.quantile(x_a, 1 - OUTLIER_QUANTILE, axis=0)
    clipped = np.clip(x_a, low, high)
    mean, scale = clipped.mean(axis=0), clipped.std(axis=0)
    constant = scale <= 1e-12 * np.maximum(1.0, np.abs(mean))
    for j in np.flatnonzero(constant):
        dropped[names[j]] = "constant on the learning half: carries no signal"
    keep = ~constant
    if not keep.any():
        raise ConfigError("dataset inference: no feature varies across the learning half's records; give attacks whose "
                          f"scores differ between records (dropped: {dropped})")
    z = (clipped[:, keep] - mean[keep]) / scale[keep]
    model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000)
    with threadpool_limits(1):  # a small fit; threads would only contend with scoring passes
        model.fit(z, y_a)
    return {"names": [n for n, k in zip(names, keep) if k], "keep": keep, "low": low[keep], "high": high[keep],
            "mean": mean[keep], "scale": scale[keep], "weights": model.coef_[0].astype(float),
            "intercept": float(model.intercept_[0])}


def _aggregate(x: np.ndarray, fit: dict) -> np.ndarray:
    """(records,) aggregated scores of `x` (records, features) under the fitted transform and weights."""
    z = (np.clip(x[:, fit["keep"]], fit["low"], fit["high"]) - fit["mean"]) / fit["scale"]
    return z @ fit["weights"] + fit["intercept"]


def _pooled_effect(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's d of `a` (n_a,) over `b` (n_b,): the difference of means over the pooled standard deviation."""
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else float("nan")


def dataset_inference(scores: pd.DataFrame, features: Sequence[str] | None = None, *,
                      suspect_column: str = "is_member", level: float = 0.05, seed: int = 0,
                      effect_size: float = DEFAULT_EFFECT_SIZE, power: float = DEFAULT_POWER,
                      bag_of_words: dict | None = None) -> DatasetInference:
    """Was the suspect set used? Maini et al. 2024's dataset inference over per-record attack scores.

    `scores`: one row per record (a mia_scores.parquet-like frame): `sample_id`, `text`, `suspect_column` (True: a
    record of the suspect set S, False: a known non-member of N), one column per attack score (higher = member),
    optionally `group` (the record's document: halves keep groups whole) and `is_canary` (canary rows are left out).
    `features`: the attack columns to use (default: every numeric column but the frame's bookkeeping ones). A
    feature with a NaN or infinite score on any record (a partial attack) is dropped, and said in
    `dropped_features`. `bag_of_words`: the result of :func:`memlens.attacks.bow.bag_of_words_baseline` with S as
    members and N as non-members; when it finds that words alone separate them the verdict is `confounded`.

    Steps (Maini et al. Sec. 5): S and N are each split into halves A and B (seeded by `seed`, grouped by
    document); on S_A and N_A each feature is clipped to its 2.5% and 97.5% quantiles (the authors' outlier
    clipping), standardized, and a logistic regression (their linear model on a binary label, here S = 1, N = 0;
    balanced classes) learns the weights; S_B and N_B are aggregated with them, and the one-sided Welch t-test
    that S_B's scores exceed N_B's gives the p-value (the authors use Student's t; Welch's does not assume equal
    variances, which a partly used S need not have). `used` when p < `level`.

    Power: the test needs `min_records_per_side` records per side to detect a shift of `effect_size` standard
    deviations of the aggregated score with probability `power` (:data:`POWER_METHOD`). With fewer, a p-value at
    or above `level` is `underpowered` (not evidence of non-use), and the note says the minimum. Fewer than
    2 * MIN_PER_HALF records on a side (or a half with fewer than MIN_PER_HALF after grouping), or S and N sharing
    a text, is refused (ConfigError)."""
    frame = _check_frame(scores, suspect_column)
    suspect = frame[suspect_column].astype(bool).to_numpy()
    n_s, n_n = int(suspect.sum()), int((~suspect).sum())
    min_side = 2 * records_for_power(effect_size, level, power)
    if min(n_s, n_n) < 2 * MIN_PER_HALF:
        raise ConfigError(f"dataset inference: {n_s} suspect records and {n_n} known non-members; each side needs at "
                          f"least {2 * MIN_PER_HALF} to run at all, and {min_side} for power {power} to detect a shift "
                          f"of {effect_size} standard deviations at level {level}")
    names, dropped = _usable_features(frame, features)
    if not names:
        raise ConfigError(f"dataset inference: no usable feature (dropped: {dropped})")
    rng = np.random.default_rng(seed)
    groups = frame.group.astype(str).to_numpy() if "group" in frame else None
    in_a = np.zeros(len(frame), bool)
    for side in (suspect, ~suspect):
        idx = np.flatnonzero(side)
        in_a[idx] = split_halves(len(idx), None if groups is None else groups[idx], rng)
    halves = {"suspect_a": suspect & in_a, "suspect_b": suspect & ~in_a,
              "non_members_a": ~suspect & in_a, "non_members_b": ~suspect & ~in_a}
    small = {k: int(v.sum()) for k, v in halves.items() if v.sum() < MIN_PER_HALF}
    if small:
        raise ConfigError(f"dataset inference: half {small} has fewer than {MIN_PER_HALF} records (document groups "
                          "are kept whole, so a side with few large groups splits unevenly); give more records or "
                          "documents")
    x = frame[names].to_numpy(float)
    fit = _fit_aggregate(x[in_a], suspect[in_a].astype(int), names, dropped)
    s_b, n_b = _aggregate(x[halves["suspect_b"]], fit), _aggregate(x[halves["non_members_b"]], fit)
    t, df, p = welch_greater(s_b, n_b)
    power_at_n = t_test_power(effect_size, len(s_b), len(n_b), level)
    notes = []
    confounded = bool(bag_of_words and bag_of_words.get("biased_split"))
    if confounded:
        verdict: Verdict = "confounded"
        notes.append(f"words alone separate the suspect set from the non-members (bag-of-words AUC "
                     f"{bag_of_words['auc']:.3f}): the non-members are not drawn like the suspect records, so the "
                     "p-value measures how the two files differ, not whether the model was trained on the suspect set")
    elif p < level:
        verdict = "used"
    elif power_at_n < power:
        verdict = "underpowered"
        notes.append(f"too few records for the stated power: detecting a shift of {effect_size} standard deviations "
                     f"with probability {power} at level {level} needs {min_side} records per side (half to learn the "
                     f"weights, half to test), the test half has {len(s_b)} suspect and {len(n_b)} non-member "
                     f"records (power {power_at_n:.2f}): p >= {level} is not evidence that the set was unused")
    else:
        verdict = "not_shown"
    if dropped:
        notes.append("features not used: " + "; ".join(f"{k} ({v})" for k, v in dropped.items()))
    ids = frame.sample_id.astype(str).to_numpy()
    return DatasetInference(
        test=TEST_NAME, level=level, p_value=p, statistic=t, df=df, verdict=verdict,
        used=verdict == "used", features=fit["names"], weights=dict(zip(fit["names"], fit["weights"].tolist())),
        intercept=fit["intercept"], feature_mean=dict(zip(fit["names"], fit["mean"].tolist())),
        feature_scale=dict(zip(fit["names"], fit["scale"].tolist())),
        clip_low=dict(zip(fit["names"], fit["low"].tolist())), clip_high=dict(zip(fit["names"], fit["high"].tolist())),
        dropped_features=dropped, halves={k: ids[v].tolist() for k, v in halves.items()},
        test_scores={"suspect_b": s_b.tolist(), "non_members_b": n_b.tolist()}, grouped=groups is not None,
        n_suspect=n_s, n_non_members=n_n, observed_effect=_pooled_effect(s_b, n_b), effect_size=effect_size,
        power=power, power_at_n=power_at_n, min_records_per_side=min_side, power_method=POWER_METHOD, seed=seed,
        confounded=confounded, bag_of_words_auc=float(bag_of_words["auc"]) if bag_of_words else None,
        note="; ".join(notes) or None)


# ------------------------------------------------------------------------------------- usage share (DUCI)
class UsageShare(BaseModel):
    """The answer of :func:`usage_share`: the estimated share of the suspect set used in training."""

    method: str
    fraction: float | None              # the estimate clipped to [0, 1]; None when it cannot be computed
    fraction_raw: float | None          # (mean_guess - fpr) / (tpr - fpr) before clipping
    fraction_ci_low: float | None       # bootstrap percentile interval, clipped to [0, 1]
    fraction_ci_high: float | None
    ci_level: float
    ci_method: str
    clipped: bool                       # the estimate or an end of its interval was outside [0, 1]
    mean_guess: float                   # share of suspect records the guess rule calls members (target model)
    tpr: float                          # the guess rule on the references: IN records called members
    fpr: float                          # OUT records called members
    threshold: float                    # guess: score >= threshold
    n_suspect: int
    n_references: int
    n_reference_records: int
    n_bootstrap: int
    note: str | None = None


SHARE_METHOD = ("DUCI (Tong et al. 2025): p_hat = (mean guess - FPR) / (TPR - FPR), the mean over suspect records "
                "of p_i_hat = (m_i - FPR) / (TPR - FPR); TPR and FPR of the guess rule score >= threshold pooled over "
                "the reference models' (record, reference) pairs, the threshold maximizing TPR - FPR on them")
CI_METHOD = ("percentile bootstrap: suspect records (the target's guesses) and reference records (rows of the "
             "reference matrices: TPR, FPR at the same threshold) resampled independently, with replacement")


def _youden(scores: np.ndarray, is_in: np.ndarray) -> tuple[float, float, float]:
    """(threshold, TPR, FPR) of the guess `score >= threshold` that maximizes TPR - FPR over the pairs `scores`,
    `is_in` (any shape, same)."""
    fpr, tpr, thresholds = roc_curve(is_in.ravel().astype(int), scores.ravel())
    best = int(np.argmax(tpr - fpr))
    return float(thresholds[best]), float(tpr[best]), float(fpr[best])


def _share(mean_guess: np.ndarray, tpr: np.ndarray, fpr: np.ndarray) -> np.ndarray:
    """(draws,) (mean_guess - fpr) / (tpr - fpr) of arrays (draws,) (or scalars), NaN where tpr <= fpr."""
    gap = tpr - fpr
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(gap > 0, (mean_guess - fpr) / gap, np.nan)


def usage_share(target_scores: np.ndarray, reference_scores: np.ndarray, reference_in: np.ndarray, *,
                level: float = 0.95, n_bootstrap: int = 1000, seed: int = 0) -> UsageShare:
    """What share of the suspect set did the target train on? DUCI's debiased membership guesses.

    `target_scores`: (suspect,) the guess rule's score of each suspect record under the target model (higher =
    member), or (suspect, R) for R scorings of each record (e.g. :func:`reference_guess_scores`, one per set of
    K - 1 references), whose guesses are averaged. `reference_scores`, `reference_in`: (records, references): the
    same rule's score of each record under each reference model, scored as the target is (against the other
    references), and whether the record was in that reference's training set; `records` is any population whose
    membership in the references is known (S and N when the references trained on random halves of S and N).

    Tong et al.: a guess m_i in {0, 1} with TPR = P(m = 1 | member) and FPR = P(m = 1 | non-member) has E[m_i] = FPR
    + p_i (TPR - FPR), so p_i_hat = (m_i - FPR) / (TPR - FPR) is unbiased for p_i and p_hat = mean_i p_i_hat
    estimates the share (the debiasing equation of their Sec. 3, as ML Privacy Meter's DUCI implements it; we could
    not check its number in the paper). The paper's TPR and FPR may differ per record; with a few references each
    record is IN for about half of them, too few to estimate its own rates, so they are pooled over the (record,
    reference) pairs, as ML Privacy Meter does, at the threshold maximizing TPR - FPR (the estimator's variance
    grows as 1 / (TPR - FPR)^2). The interval: :data:`CI_METHOD`, at `level`; estimate and interval are clipped to
    [0, 1] and `clipped` says when that changed them. TPR <= FPR (the rule does not tell IN from OUT on the
    references) leaves `fraction` None with the reason."""
    target = np.asarray(target_scores, float)
    target = target[:, None] if target.ndim == 1 else target
    values, is_in = np.asarray(reference_scores, float), np.asarray(reference_in, bool)
    if target.ndim != 2 or not len(target):
        raise ConfigError(f"usage share: target scores must be (suspect,) or (suspect, R) with records; got shape "
                          f"{np.shape(target_scores)}")
    if values.ndim != 2 or values.shape != is_in.shape or values.shape[1] < 1:
        raise ConfigError(f"usage share: reference scores {values.shape} and IN flags {is_in.shape} must both be "
                          "(records, references)")
    if not (np.isfinite(values).all() and np.isfinite(target).all()):
        raise ConfigError("usage share: the guess rule's scores must be finite (NaN or infinite scores found)")
    if is_in.all() or not is_in.any():
        raise ConfigError("usage share: the references' IN flags are all " + ("True" if is_in.all() else "False") +
                          "; TPR and FPR need both IN and OUT (record, reference) pairs")
    threshold, tpr, fpr = _youden(values, is_in)
    guesses = (target >= threshold).mean(axis=1)  # (suspect,) each record's guess, averaged over its R scorings
    mean_guess = float(guesses.mean())
    raw = float(_share(np.array(mean_guess), np.array(tpr), np.array(fpr)))
    common = {"method": SHARE_METHOD, "ci_level": level, "ci_method": CI_METHOD, "mean_guess": mean_guess, "tpr": tpr,
              "fpr": fpr, "threshold": threshold, "n_suspect": len(target), "n_references": values.shape[1],
              "n_reference_records": len(values), "n_bootstrap": n_bootstrap}
    if not np.isfinite(raw):
        return UsageShare(**common, fraction=None, fraction_raw=None, fraction_ci_low=None, fraction_ci_high=None,
                          clipped=False, note=f"the guess rule does not tell the references' IN records from their OUT "
                          f"records (TPR {tpr:.3f} <= FPR {fpr:.3f}): no share can be estimated")
    low = high = None
    notes = []
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        hit = values >= threshold
        in_hits, in_n = (hit & is_in).sum(axis=1), is_in.sum(axis=1)
        out_hits, out_n = (hit & ~is_in).sum(axis=1), (~is_in).sum(axis=1)
        rows = rng.integers(0, len(values), (n_bootstrap, len(values)))
        picks = rng.integers(0, len(guesses), (n_bootstrap, len(guesses)))
        with np.errstate(invalid="ignore", divide="ignore"):
            tpr_b = in_hits[rows].sum(axis=1) / in_n[rows].sum(axis=1)
            fpr_b = out_hits[rows].sum(axis=1) / out_n[rows].sum(axis=1)
        draws = _share(guesses[picks].mean(axis=1), tpr_b, fpr_b)
        finite = draws[np.isfinite(draws)]
        if len(finite) < n_bootstrap:
            notes.append(f"{n_bootstrap - len(finite)} of {n_bootstrap} resamples had TPR <= FPR and were left out")
        alpha = 1 - level
        low, high = (float(q) for q in np.quantile(finite, [alpha / 2, 1 - alpha / 2]))
    clip = lambda v: None if v is None else float(np.clip(v, 0.0, 1.0))  # noqa: E731
    clipped = any(v is not None and not 0 <= v <= 1 for v in (raw, low, high))
    if clipped:
        shown = f"{raw:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")
        notes.append(f"clipped to [0, 1] (unclipped: {shown}): a share outside [0, 1] is the estimator's noise")
    if tpr - fpr < 0.2:
        notes.append(f"the guess rule barely tells IN from OUT on the references (TPR {tpr:.3f}, FPR {fpr:.3f}): "
                     "the estimate is noisy")
    return UsageShare(**common, fraction=clip(raw), fraction_raw=raw, fraction_ci_low=clip(low),
                      fraction_ci_high=clip(high), clipped=clipped, note="; ".join(notes) or None)


def _lira_online(statistic: np.ndarray, fit: dict[str, np.ndarray]) -> np.ndarray:
    """(records,) LiRA online's log Lambda of `statistic` (records,) under the Gaussians of `fit` (lira_fit's)."""
    return (stats.norm.logpdf(statistic, fit["mu_in"], fit["sigma_in"])
            - stats.norm.logpdf(statistic, fit["mu_out"], fit["sigma_out"]))


def _lira_offline(statistic: np.ndarray, fit: dict[str, np.ndarray]) -> np.ndarray:
    """(records,) LiRA offline's log Phi((s - mu_out) / sigma) of `statistic` (records,) under `fit` (lira_fit's)."""
    return stats.norm.logcdf((statistic - fit["mu_out"]) / fit["sigma_offline"])


GUESS_RULES = {"lira": _lira_online, "lira_offline": _lira_offline}


def reference_guess_scores(statistic: np.ndarray, reference_statistics: np.ndarray, reference_in: np.ndarray,
                           rule: str = "lira") -> tuple[np.ndarray, np.ndarray]:
    """The guess rule's scores of the target and of every reference, each against K - 1 references, for
    :func:`usage_share`.

    `statistic`: (records,) the target's mean token log-likelihood of each record (minus `nll_ft` of
    mia_scores.parquet); `reference_statistics`, `reference_in`: (records, K) the same statistic under each of the
    K reference adapters (:meth:`memlens.attacks.references.ReferenceStatistics.matrix`) and whether the record was
    in its training half (:func:`memlens.attacks.references.in_matrix`). `rule`: `lira` (online: log N(s; mu_in,
    sigma^2) - log N(s; mu_out, sigma^2)) or `lira_offline` (log Phi((s - mu_out) / sigma)), Carlini et al.'s
    Gaussians fitted by :func:`memlens.attacks.lira_rmia.lira_fit`.

    Returns (target_scores, reference_scores), both (records, K): column k scores with the references other than k
    (the target's statistic, and reference k's own). So the target and each reference are scored by the same rule
    from the same number of references, and TPR and FPR measured on the references hold for the target's guesses
    (a target scored from all K references would guess better than the references measured it). Select the
    suspect rows of target_scores for :func:`usage_share`."""
    if rule not in GUESS_RULES:
        raise ConfigError(f"usage share: unknown guess rule {rule!r}; valid choices: {sorted(GUESS_RULES)}")
    values, is_in = np.asarray(reference_statistics, float), np.asarray(reference_in, bool)
    s = np.asarray(statistic, float)
    if values.ndim != 2 or values.shape != is_in.shape or values.shape[0] != len(s):
        raise ConfigError(f"usage share: reference statistics {values.shape} and IN flags {is_in.shape} must both be "
                          f"(records, references) with the target's {len(s)} records")
    k_refs = values.shape[1]
    if k_refs < 3:
        raise ConfigError(f"usage share: {k_refs} reference model(s); the guesses of each reference are made from the "
                          "others, and LiRA needs at least 2 of them: give 3 or more references")
    score = GUESS_RULES[rule]
    target, refs = np.empty_like(values), np.empty_like(values)
    for k in range(k_refs):
        others = np.arange(k_refs) != k
        try:
            fit = lira_fit(values[:, others], is_in[:, others])
        except ValueError as err:
            raise ConfigError(f"usage share: references other than {k}: {err}") from None
        target[:, k], refs[:, k] = score(s, fit), score(values[:, k], fit)
    return target, refs


# ------------------------------------------------------------------------------------- results rows
def dataset_rows(meta: dict, inference: DatasetInference | None = None,
                 share: UsageShare | None = None) -> pd.DataFrame:
    """Rows of the study's results schema (stage `dataset`): attack `dataset_inference` (p_value, verdict, ...) and
    attack `usage_share` (fraction with fraction_ci_low/high, tpr, fpr, ...), each present when given. `meta`: the
    rows' identifying columns (e.g. :func:`memlens.store.run_metadata`, or the audit's run_id and model)."""
    rows = []
    if inference is not None:
        rows.append({**meta, "stage": DATASET_STAGE, "attack": DI_ATTACK, "p_value": inference.p_value,
                     "verdict": inference.verdict, "level": inference.level, "statistic": inference.statistic,
                     "observed_effect": inference.observed_effect, "n_suspect": inference.n_suspect,
                     "n_non_members": inference.n_non_members,
                     "min_records_per_side": inference.min_records_per_side, "power_at_n": inference.power_at_n,
                     "features": "+".join(inference.features), "note": inference.note})
    if share is not None:
        rows.append({**meta, "stage": DATASET_STAGE, "attack": SHARE_ATTACK, "fraction": share.fraction,
                     "fraction_ci_low": share.fraction_ci_low, "fraction_ci_high": share.fraction_ci_high,
                     "fraction_raw": share.fraction_raw, "ci_level": share.ci_level, "tpr": share.tpr,
                     "fpr": share.fpr, "mean_guess": share.mean_guess, "n_suspect": share.n_suspect,
                     "n_references": share.n_references, "note": share.note})
    return pd.DataFrame(rows)


__all__ = ["DATASET_STAGE", "DEFAULT_EFFECT_SIZE", "DEFAULT_POWER", "DI_ATTACK", "GUESS_RULES", "MIN_PER_HALF",
           "SHARE_ATTACK", "DatasetInference", "UsageShare", "dataset_inference", "dataset_rows", "records_for_power",
           "reference_guess_scores", "split_halves", "t_test_power", "usage_share", "welch_greater"]
