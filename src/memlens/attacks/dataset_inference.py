"""Was a set of records used to fine-tune a model, and what share of it?

Membership inference decides per record, and at a low false-positive rate it is weak on most fine-tunes. A data
owner asks about a *set*: the suspect records S, beside records N known not to have been used, assumed drawn like
S (the answer says so rather than asserting it). Two statistics answer it from the attacks' per-record scores:

- **Dataset inference** (Maini et al. 2024, "LLM Dataset Inference: Did you train on my dataset?", arXiv
  2406.06443, Sec. 5 and Fig. 1): the per-record scores of several attacks are the features of a record; S and N
  are each split into halves A and B (:func:`split_halves`); a linear model learns on the A halves which features
  tell S from N (stage 2); on the B halves it aggregates each record's features into one score, and a one-sided
  t-test asks whether S's scores exceed N's (stage 3). Learning and testing on disjoint halves keeps the test
  valid whatever the model learned. Here: documents are the unit when groups are known (:data:`GROUPED_TEST`),
  11 random splits are combined (:data:`COMBINE_METHOD`), the same procedure on the base model's scores and on the
  words is the shift control (`confounded`), and N split in two is the placebo. :func:`dataset_inference`.
- **Usage share** (Tong et al., ICLR 2025, "How Much of My Dataset Did You Use? Quantitative Data Usage Inference
  in Machine Learning", DUCI): a membership guess m_i per suspect record is biased (its TPR < 1, FPR > 0), but
  E[m_i] = FPR + p_i (TPR - FPR), so p_i_hat = (m_i - FPR) / (TPR - FPR) is unbiased for the record's use p_i, and
  the share is their mean, with TPR measured on reference models whose members are known and FPR on the target's
  own known non-members (:func:`usage_share`; :func:`reference_guess_scores` makes LiRA guesses of the target and
  of every reference from memlens' reference adapters), per record and per document.

Both return typed results (pydantic models, ready for ``audit.json``) and :func:`dataset_rows` turns them into rows
of the study's results schema (stage ``dataset``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel
from scipy import stats
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
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
N_SPLITS = 11                           # random splits into halves whose p-values are combined
COMBINE_METHOD = ("the p-values of the random splits into halves combined as min(1, 2 x median) (Meinshausen, "
                  "Meier & Buhlmann 2009, 'p-values for high-dimensional regression', quantile aggregation at "
                  "gamma = 1/2): valid at the level whatever the dependence between splits (each split's p is valid, "
                  "and P(median <= a/2) <= a by Markov's inequality on the count of splits below a/2), so the answer "
                  "does not hinge on one random split; the null benchmark checks the level")
GROUPED_TEST = ("documents as the unit: each document's records on the test half averaged into one score, then "
                "the one-sided Welch t-test on those document means (scipy.stats.ttest_ind, equal_var=False, "
                "alternative='greater'). Documents are independent under the null, records of one document are not "
                "(shared words, shared memorization); a mean per document removes any within-document correlation "
                "exactly, where a cluster-robust (sandwich) t-test is anti-conservative with the few dozen documents "
                "a data owner has")
INDEPENDENCE = ("no document groups were given (--group): each record is taken as an independent document. If "
                "records are pieces of documents (sentences of an abstract, chunks of an article), pieces of one "
                "document score alike and the test counts them as separate evidence: its p-value is too small and "
                "'used' can come from nothing (two times in three for chunked documents in the issue's simulation)")
ASSUMPTION = ("the known non-members N are assumed drawn like the suspect records S (same source, period and "
              "processing); the shift controls check what the base model and the words alone see, and the placebo "
              "(N split in two) checks the procedure on data known unused")
ControlName = Literal["base model", "bag of words"]


class ControlTest(BaseModel):
    """The dataset-inference procedure run on what does not depend on training: the base model's scores or the
    texts' words. When it separates S from N at the test's level, S and N differ before any training."""

    name: ControlName
    features: list[str]
    p_value: float
    split_p_values: list[float]
    separates: bool


class Placebo(BaseModel):
    """The same test on data known unused: N split in two (by document when grouped), N_a as suspects against N_b."""

    p_value: float | None               # None when it could not run (said in `note`)
    verdict: str
    n_a: int
    n_b: int
    note: str | None = None


class DatasetInference(BaseModel):
    """The answer of :func:`dataset_inference`. Aggregated score of a record in the shown split: sum_f weights[f] *
    (clip(x_f) - feature_mean[f]) / feature_scale[f] + intercept, clip to [clip_low[f], clip_high[f]]; grouped, a
    document's score on the test half is the mean of its records'."""

    test: str
    level: float
    p_value: float                      # the combined p-value of the splits (`combine`) of the deciding features
    combine: str
    split_p_values: list[float]         # one per random split, the deciding features
    statistic: float                    # Welch's t on the B halves of the shown split (the median one)
    df: float                           # Welch-Satterthwaite degrees of freedom
    verdict: Verdict
    used: bool                          # verdict == "used"
    decision: str                       # which features carried the verdict
    features: list[str]                 # the features the model learned on, in the order of `weights`
    weights: dict[str, float]           # per standardized feature
    intercept: float
    feature_mean: dict[str, float]      # standardization of each feature, from the learning half
    feature_scale: dict[str, float]
    clip_low: dict[str, float]          # outlier clipping of each feature, from the learning half
    clip_high: dict[str, float]
    dropped_features: dict[str, str]    # feature -> why it was not used
    halves: dict[str, list[str]]        # suspect_a, suspect_b, non_members_a, non_members_b: sample ids
    unit: Literal["record", "document"]  # what the test, its power and its minimum size count
    test_units: dict[str, list[str]]    # suspect_b, non_members_b: the tested units (sample ids or documents)
    test_scores: dict[str, list[float]]  # suspect_b, non_members_b: their aggregated scores, in that order
    grouped: bool                       # halves keep each document group whole and the test counts documents
    n_suspect: int                      # records
    n_non_members: int
    n_suspect_units: int                # records, or documents when grouped
    n_non_member_units: int
    observed_effect: float              # (mean S_B - mean N_B) / pooled standard deviation, over units
    effect_size: float                  # the standardized shift the power statement is for
    power: float                        # the power asked for
    power_at_n: float                   # the test's power at effect_size with the B halves' units
    min_units_per_side: int             # units per side (both halves) the stated power needs
    power_method: str
    seed: int
    n_splits: int
    confounded: bool = False            # S and N differ before training (a control, or the bag-of-words check)
    bag_of_words_auc: float | None = None
    controls: list[ControlTest] = []
    calibrated_features: list[str] = []  # target minus base (and reference attacks): immune to a shift of texts
    calibrated_p_value: float | None = None
    independence: str | None = None     # what the test assumes of records without groups
    document_warning: str | None = None  # ids or texts show documents but no --group was given
    assumption: str = ASSUMPTION
    placebo: Placebo | None = None
    ranked_records: list[dict] = []     # the suspect records with the strongest evidence (:func:`ranked_evidence`)
    ranked_documents: list[dict] = []   # the same per document (grouped)
    note: str | None = None


def welch_greater(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(t, degrees of freedom, p) of the one-sided Welch test that mean(a) > mean(b); `a`, `b`: (n_a,), (n_b,).
    t = (mean a - mean b) / sqrt(s_a^2 / n_a + s_b^2 / n_b), df by Welch-Satterthwaite, p = P(T_df > t)."""
    result = stats.ttest_ind(np.asarray(a, float), np.asarray(b, float), equal_var=False, alternative="greater")
    return float(result.statistic), float(result.df), float(result.pvalue)


def combine_split_p_values(p_values: Sequence[float]) -> float:
    """min(1, 2 x median(p)) of the splits' p-values (:data:`COMBINE_METHOD`); a single split's p as it is."""
    p = np.asarray(p_values, float)
    return float(p[0]) if len(p) == 1 else float(min(1.0, 2 * np.median(p)))


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
    """The smallest n per side of a one-sided two-sample t-test (n units each side) whose power at `level`
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
    """(n,) bool: True for the records of half A (the learning half), drawn by `rng`: half the records, or with
    `groups` (n,) half the groups, each whole (a document's records share words and memorization, and the test
    counts documents)."""
    if groups is None:
        in_a = np.zeros(n, bool)
        in_a[rng.permutation(n)[: n // 2]] = True
        return in_a
    keys = pd.Series(list(groups), dtype=str)
    unique = keys.unique()
    return keys.isin(set(unique[rng.permutation(len(unique))[: len(unique) // 2]])).to_numpy()


_ID_PIECE = re.compile(r"^(.+?)[_\-.:/#](\d+)$")


def document_hint(sample_ids: Sequence[str], texts: Sequence[str]) -> str | None:
    """A warning when records look like pieces of documents but no groups were given: ids sharing a prefix before
    a trailing number (`123_4`, `doc-7`), or consecutive texts that continue one another (a chunk ending mid-sentence
    followed by one starting in lower case, or overlapping chunks). None when neither shows."""
    ids = [str(s) for s in sample_ids]
    matches = [_ID_PIECE.match(i) for i in ids]
    prefixes = pd.Series([m.group(1) for m in matches if m])
    if len(prefixes) >= 0.5 * len(ids) and len(prefixes) and prefixes.duplicated().mean() >= 0.2:
        example = prefixes[prefixes.duplicated(keep=False)].iloc[0]
        return (f"sample ids share prefixes before a number (e.g. {example!r} in {prefixes.duplicated().sum()} "
                "repeats): records look like pieces of documents; give --group with the document of each record, "
                r"e.g. --group '^(.+?)[_\-.:/#]\d+$' (the id before its last number) or a column of the files")
    texts = [str(t) for t in texts]
    pairs = list(zip(texts[:-1], texts[1:]))
    if not pairs:
        return None
    cut = sum(1 for a, b in pairs if a.rstrip()[-1:] not in ".!?\"')]" and b.lstrip()[:1].islower())
    overlap = sum(1 for a, b in pairs if len(b) >= 30 and b[:30] in a)
    if (cut + overlap) >= 0.2 * len(pairs):
        return (f"{cut + overlap} of {len(pairs)} consecutive records continue one another (cut mid-sentence or "
                "overlapping): they look like chunks of documents; give --group with each record's document (a "
                "column of the files, or a regular expression over the id)")
    return None


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


def _word_fitter(texts: np.ndarray):
    """A fitter for the bag-of-words control over `texts` (records,): TF-IDF of words and a logistic regression
    learned on half A."""
    def fit(idx_a: np.ndarray, y_a: np.ndarray, dropped: dict[str, str]):
        """Learns on the records `idx_a` (a,) with labels `y_a` (a,); returns the model and its scorer."""
        vectorizer = TfidfVectorizer(lowercase=True, min_df=1, sublinear_tf=True)
        model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000)
        with threadpool_limits(1):
            model.fit(vectorizer.fit_transform(texts[idx_a]), y_a)
        return {"names": ["words"]}, lambda idx: model.decision_function(vectorizer.transform(texts[idx]))
    return fit


def _feature_fitter(x: np.ndarray, names: list[str]):
    """A fitter over the numeric features `x` (records, features): Maini et al.'s clipped, standardized linear model."""
    def fit(idx_a: np.ndarray, y_a: np.ndarray, dropped: dict[str, str]):
        """Learns on the records `idx_a` (a,) with labels `y_a` (a,); returns the model and its scorer."""
        model = _fit_aggregate(x[idx_a], y_a, names, dropped)
        return model, lambda idx: _aggregate(x[idx], model)
    return fit


def _pooled_effect(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's d of `a` (n_a,) over `b` (n_b,): the difference of means over the pooled standard deviation."""
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else float("nan")


def _units(scores: np.ndarray, ids: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(units,) scores and their ids: the records' own, or with `groups` each document's mean over its records."""
    if groups is None:
        return scores, ids
    means = pd.Series(scores).groupby(pd.Series(groups), sort=True).mean()
    return means.to_numpy(float), means.index.to_numpy(str)


def _draw_halves(suspect: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The four halves (suspect_a, suspect_b, non_members_a, non_members_b), each a (records,) mask, of `suspect`
    (records,) split side by side (by the documents `groups` (records,) when given)."""
    in_a = np.zeros(len(suspect), bool)
    for side in (suspect, ~suspect):
        idx = np.flatnonzero(side)
        in_a[idx] = split_halves(len(idx), None if groups is None else groups[idx], rng)
    return {"suspect_a": suspect & in_a, "suspect_b": suspect & ~in_a,
            "non_members_a": ~suspect & in_a, "non_members_b": ~suspect & ~in_a}


def _check_halves(halves: dict[str, np.ndarray], groups: np.ndarray | None) -> None:
    """Refuses halves (masks (records,)) with fewer than MIN_PER_HALF units (documents of `groups` (records,))."""
    counts = {k: int(v.sum()) if groups is None else len(set(groups[v])) for k, v in halves.items()}
    small = {k: c for k, c in counts.items() if c < MIN_PER_HALF}
    if small:
        unit = "records" if groups is None else "documents"
        raise ConfigError(f"dataset inference: half {small} has fewer than {MIN_PER_HALF} {unit} (document groups are "
                          "kept whole and counted, so a side with few documents cannot be tested); give more records "
                          "or documents")


def _splits(suspect: np.ndarray, ids: np.ndarray, groups: np.ndarray | None, fitter, seed: int, n_splits: int,
            dropped: dict[str, str]) -> list[dict]:
    """The procedure over `n_splits` random splits (seeded) of the records of `suspect`, `ids`, `groups` (records,):
    per split the halves, the fitted model, the units' scores on the test halves and the one-sided Welch test."""
    out = []
    for rng in (np.random.default_rng([seed, i]) for i in range(n_splits)):
        halves = _draw_halves(suspect, groups, rng)
        _check_halves(halves, groups)
        in_a = halves["suspect_a"] | halves["non_members_a"]
        model, score = fitter(np.flatnonzero(in_a), suspect[in_a].astype(int), dropped)
        sides = {}
        for key in ("suspect_b", "non_members_b"):
            idx = np.flatnonzero(halves[key])
            sides[key] = _units(score(idx), ids[idx], None if groups is None else groups[idx])
        t, df, p = welch_greater(sides["suspect_b"][0], sides["non_members_b"][0])
        p = p if np.isfinite(p) else 1.0  # both sides' scores constant: no evidence of a difference
        out.append({"halves": halves, "model": model, "sides": sides, "t": t, "df": df, "p": p})
    return out


def _procedure(suspect, ids, groups, fitter, seed, n_splits, dropped) -> tuple[float, list[float], dict]:
    """(combined p, the splits' p-values, the median split) of the procedure."""
    runs = _splits(suspect, ids, groups, fitter, seed, n_splits, dropped)
    p_values = [r["p"] for r in runs]
    shown = runs[int(np.argsort(p_values)[len(p_values) // 2])]
    return combine_split_p_values(p_values), p_values, shown


def _controls(frame: pd.DataFrame, suspect, ids, groups, base_features, word_control, seed, n_splits, level
              ) -> list[ControlTest]:
    """The shift controls: the procedure on the base model's features and on the texts' words."""
    controls = []
    if base_features:
        names, _ = _usable_features(frame, base_features)
        if names:
            p, ps, _ = _procedure(suspect, ids, groups, _feature_fitter(frame[names].to_numpy(float), names), seed,
                                  n_splits, {})
            controls.append(ControlTest(name="base model", features=names, p_value=p, split_p_values=ps,
                                        separates=p < level))
    if word_control:
        p, ps, _ = _procedure(suspect, ids, groups, _word_fitter(frame.text.astype(str).to_numpy()), seed, n_splits,
                              {})
        controls.append(ControlTest(name="bag of words", features=["words (TF-IDF)"], p_value=p, split_p_values=ps,
                                    separates=p < level))
    return controls


def dataset_inference(scores: pd.DataFrame, features: Sequence[str] | None = None, *,
                      suspect_column: str = "is_member", level: float = 0.05, seed: int = 0,
                      effect_size: float = DEFAULT_EFFECT_SIZE, power: float = DEFAULT_POWER,
                      bag_of_words: dict | None = None, base_features: Sequence[str] | None = None,
                      calibrated_features: Sequence[str] | None = None, word_control: bool = True,
                      n_splits: int = N_SPLITS, placebo: bool = True) -> DatasetInference:
    """Was the suspect set used? Maini et al. 2024's dataset inference over per-record attack scores.

    `scores`: one row per record (a mia_scores.parquet-like frame): `sample_id`, `text`, `suspect_column` (True: a
    record of the suspect set S, False: a known non-member of N), one column per attack score (higher = member),
    optionally `group` (the record's document) and `is_canary` (canary rows are left out). `features`: the attack
    columns to use (default: every numeric column but the frame's bookkeeping ones); reference attacks are valid
    features (the references train on random halves of S and N, whatever S's label). A feature with a NaN or
    infinite score on any record is dropped and said in `dropped_features`.

    Steps (Maini et al. Sec. 5): S and N are each split into halves A and B (grouped by document); on S_A and N_A
    each feature is clipped to its 2.5% and 97.5% quantiles, standardized, and a logistic regression (S = 1, N = 0,
    balanced) learns the weights; S_B and N_B are aggregated with them, and a one-sided Welch t-test asks whether
    S_B's scores exceed N_B's (the authors use Student's t; Welch's does not assume equal variances). This is done
    over `n_splits` seeded random splits and the p-values combined (:data:`COMBINE_METHOD`).

    The unit: with a `group` column the test counts documents (:data:`GROUPED_TEST`), and so do its power, its
    minimum size and the halves' minimum. Without one, records are taken as independent (:data:`INDEPENDENCE`, in
    `independence`), and :func:`document_hint` warns when ids or texts show documents.

    Shift controls (:func:`_controls`): the same procedure on `base_features` (the base model's scores of the
    records) and, with `word_control`, on the texts' TF-IDF words; when either separates S from N at `level`
    (or the `bag_of_words` check of :func:`memlens.attacks.bow.bag_of_words_baseline` finds a biased split), the
    verdict is `confounded`, and the model's own evidence is the procedure on `calibrated_features` only (the target
    minus the base, reference attacks): `calibrated_p_value`. Otherwise `used` when p < `level`; with fewer units
    than the power needs, a p at or above `level` is `underpowered`. `placebo`: the test also run on N split in two
    (N_a as suspects against N_b; by document when grouped), whose p should be uniform (`placebo`)."""
    frame = _check_frame(scores, suspect_column)
    suspect = frame[suspect_column].astype(bool).to_numpy()
    n_s, n_n = int(suspect.sum()), int((~suspect).sum())
    min_side = 2 * records_for_power(effect_size, level, power)
    groups = frame.group.astype(str).to_numpy() if "group" in frame else None
    unit = "record" if groups is None else "document"
    ids = frame.sample_id.astype(str).to_numpy()
    units = (n_s, n_n) if groups is None else (len(set(groups[suspect])), len(set(groups[~suspect])))
    if min(units) < 2 * MIN_PER_HALF:
        raise ConfigError(f"dataset inference: {units[0]} suspect {unit}s and {units[1]} known non-member {unit}s; "
                          f"each side needs at least {2 * MIN_PER_HALF} to run at all, and {min_side} for power "
                          f"{power} to detect a shift of {effect_size} standard deviations at level {level}")
    names, dropped = _usable_features(frame, features)
    if not names:
        raise ConfigError(f"dataset inference: no usable feature (dropped: {dropped})")
    x = frame[names].to_numpy(float)
    p, p_values, shown = _procedure(suspect, ids, groups, _feature_fitter(x, names), seed, n_splits, dropped)
    controls = _controls(frame, suspect, ids, groups, base_features, word_control, seed, n_splits, level)
    calibrated, _ = _usable_features(frame, calibrated_features or [])
    calibrated_p = calibrated_shown = None
    if calibrated:
        calibrated_p, calibrated_ps, calibrated_shown = _procedure(
            suspect, ids, groups, _feature_fitter(frame[calibrated].to_numpy(float), calibrated), seed, n_splits, {})
    s_b, n_b = shown["sides"]["suspect_b"][0], shown["sides"]["non_members_b"][0]
    power_at_n = t_test_power(effect_size, len(s_b), len(n_b), level)
    notes = []
    biased_words = bool(bag_of_words and bag_of_words.get("biased_split"))
    confounded = biased_words or any(c.separates for c in controls)
    decision = f"all {len(names)} features ({', '.join(names)})"
    if confounded:
        verdict: Verdict = "confounded"
        said = [f"{c.name} p = {c.p_value:.2g}" for c in controls if c.separates]
        if biased_words:
            said.append(f"bag-of-words AUC {bag_of_words['auc']:.3f}")
            notes.append(f"words alone separate the suspect set from the non-members (bag-of-words AUC "
                         f"{bag_of_words['auc']:.3f})")
        notes.append(f"what does not depend on training already separates the suspect set from the non-members "
                     f"({'; '.join(said)}; the test's p = {p:.2g}): the non-members are not drawn like the suspect "
                     "records, so the test measures how the two files differ, not whether the model was trained on "
                     "the suspect set")
        if calibrated_p is not None:
            decision = f"calibrated features only ({', '.join(calibrated)}): p = {calibrated_p:.2g}"
            notes.append(f"the model's own evidence, in calibrated features (target minus base model, reference "
                         f"attacks: {', '.join(calibrated)}): p = {calibrated_p:.2g}")
        else:
            decision = "none: no calibrated feature (target minus base) to test"
    elif p < level:
        verdict = "used"
    elif power_at_n < power:
        verdict = "underpowered"
        notes.append(f"too few {unit}s for the stated power: detecting a shift of {effect_size} standard deviations "
                     f"with probability {power} at level {level} needs {min_side} {unit}s per side (half to learn "
                     f"the weights, half to test), the test half has {len(s_b)} suspect and {len(n_b)} non-member "
                     f"{unit}s (power {power_at_n:.2f}): p >= {level} is not evidence that the set was unused")
    else:
        verdict = "not_shown"
    if dropped:
        notes.append("features not used: " + "; ".join(f"{k} ({v})" for k, v in dropped.items()))
    fit = shown["model"]
    halves, sides = shown["halves"], shown["sides"]
    placebo_result = _placebo(frame, suspect, names, groups, seed, level, n_splits) if placebo else None
    ranked_records, ranked_documents = ranked_evidence(frame, suspect, x, fit, groups)
    return DatasetInference(
        test=TEST_NAME if groups is None else GROUPED_TEST, level=level, p_value=p, combine=COMBINE_METHOD,
        split_p_values=p_values, statistic=shown["t"], df=shown["df"], verdict=verdict, used=verdict == "used",
        decision=decision, features=fit["names"], weights=dict(zip(fit["names"], fit["weights"].tolist())),
        intercept=fit["intercept"], feature_mean=dict(zip(fit["names"], fit["mean"].tolist())),
        feature_scale=dict(zip(fit["names"], fit["scale"].tolist())),
        clip_low=dict(zip(fit["names"], fit["low"].tolist())), clip_high=dict(zip(fit["names"], fit["high"].tolist())),
        dropped_features=dropped, halves={k: ids[v].tolist() for k, v in halves.items()}, unit=unit,
        test_units={k: v[1].tolist() for k, v in sides.items()},
        test_scores={k: v[0].tolist() for k, v in sides.items()},
        grouped=groups is not None, n_suspect=n_s, n_non_members=n_n, n_suspect_units=units[0],
        n_non_member_units=units[1], observed_effect=_pooled_effect(s_b, n_b), effect_size=effect_size, power=power,
        power_at_n=power_at_n, min_units_per_side=min_side, power_method=POWER_METHOD, seed=seed, n_splits=n_splits,
        confounded=confounded, bag_of_words_auc=float(bag_of_words["auc"]) if bag_of_words else None,
        controls=controls, calibrated_features=calibrated, calibrated_p_value=calibrated_p,
        independence=INDEPENDENCE if groups is None else None,
        document_warning=document_hint(ids, frame.text.tolist()) if groups is None else None,
        placebo=placebo_result, ranked_records=ranked_records, ranked_documents=ranked_documents,
        note="; ".join(notes) or None)


RANKED = 20  # rows of each ranked table


def ranked_evidence(frame: pd.DataFrame, suspect: np.ndarray, x: np.ndarray, fit: dict,
                    groups: np.ndarray | None) -> tuple[list[dict], list[dict]]:
    """The suspect records (and documents) with the strongest evidence, strongest first: each record's aggregated
    score under the shown split's model (`x` (records, features), `fit`), and the share of the known non-members
    scoring at least as high (by document: a document's mean score against the non-members' documents' means).
    The records of the learning half helped fit the weights: a ranking, not a test."""
    score = _aggregate(x, fit)
    n_scores = np.sort(score[~suspect])
    above = lambda v, pool: float((len(pool) - np.searchsorted(pool, v, side="left")) / max(len(pool), 1))  # noqa: E731
    idx = np.flatnonzero(suspect)
    order = idx[np.argsort(-score[idx], kind="stable")][:RANKED]
    texts, ids = frame.text.astype(str).to_numpy(), frame.sample_id.astype(str).to_numpy()
    records = [{"rank": r + 1, "sample_id": ids[i], "document": None if groups is None else groups[i],
                "score": float(score[i]), "non_members_as_high": above(score[i], n_scores), "text": texts[i][:200]}
               for r, i in enumerate(order)]
    documents: list[dict] = []
    if groups is not None:
        table = pd.DataFrame({"g": groups, "s": score, "suspect": suspect, "text": texts})
        means = table.groupby(["suspect", "g"], sort=False).agg(score=("s", "mean"), records=("s", "size"),
                                                                  text=("text", "first"))
        null = np.sort(means.loc[False].score.to_numpy()) if False in means.index.get_level_values(0) else np.array([])
        top = means.loc[True].sort_values("score", ascending=False).head(RANKED)
        documents = [{"rank": r + 1, "document": g, "records": int(row.records), "score": float(row.score),
                      "non_member_documents_as_high": above(row.score, null), "text": str(row.text)[:200]}
                     for r, (g, row) in enumerate(top.iterrows())]
    return records, documents


def placebo_split(n: int, groups: Sequence | None, seed: int) -> np.ndarray:
    """(n,) bool: the records of N_a when the known non-members are split in two for the placebo (by document with
    `groups`), seeded apart from the test's splits."""
    return split_halves(n, groups, np.random.default_rng([seed, 9_999]))


def _placebo(frame: pd.DataFrame, suspect: np.ndarray, names: list[str], groups: np.ndarray | None, seed: int,
             level: float, n_splits: int) -> Placebo | None:
    """The placebo (:class:`Placebo`): the test on N_a against N_b, the non-members of `suspect` (records,) split
    in two (by the documents `groups` (records,) when given); not run (said) when too small."""
    non = frame[~suspect].reset_index(drop=True)
    in_a = placebo_split(len(non), None if groups is None else groups[~suspect], seed)
    try:
        result = dataset_inference(non.assign(_placebo_a=in_a), names, suspect_column="_placebo_a", level=level,
                                   seed=seed, word_control=False, n_splits=n_splits, placebo=False)
    except ConfigError as exc:
        return Placebo(p_value=None, verdict="not run", n_a=int(in_a.sum()), n_b=int((~in_a).sum()),
                       note=f"the placebo could not run: {exc}")
    return Placebo(p_value=result.p_value, verdict=result.verdict, n_a=int(in_a.sum()), n_b=int((~in_a).sum()))


# ------------------------------------------------------------------------------------- usage share (DUCI)
class UsageShare(BaseModel):
    """The answer of :func:`usage_share`: the estimated share of the suspect set used in training."""

    method: str
    fraction: float | None              # the estimate clipped to [0, 1]; None when it cannot be computed
    fraction_raw: float | None          # (mean_guess - fpr) / (tpr - fpr) before clipping
    fraction_ci_low: float | None       # bootstrap percentile interval, clipped to [0, 1] (widened: see `widened`)
    fraction_ci_high: float | None
    fraction_ci_raw: list[float] | None = None  # the interval before clipping (and before any widening)
    at_most: float | None               # the interval's upper end: "at most this share of the set was used"
    ci_level: float
    ci_method: str
    clipped: bool                       # the estimate or an end of its interval was outside [0, 1]
    mean_guess: float                   # share of suspect records the guess rule calls members (target model)
    tpr: float                          # the guess rule on the references: IN records called members
    fpr: float                          # the FPR the estimate uses (`fpr_source`)
    fpr_source: Literal["target", "references"]
    fpr_references: float               # OUT records of the references called members
    fpr_references_ci: list[float] | None = None
    fpr_target: float | None = None     # the target's known non-members called members (observable)
    fpr_target_ci: list[float] | None = None
    fpr_disagree: bool = False          # the interval of fpr_target - fpr_references (paired draws) excludes 0
    threshold: float                    # guess: score >= threshold
    n_suspect: int
    n_non_members: int = 0
    n_references: int
    n_reference_records: int
    n_bootstrap: int
    documents: bool = False             # the share of documents was estimated (groups given)
    n_suspect_documents: int | None = None
    document_fraction: float | None = None  # share of suspect documents with any record used
    document_ci_low: float | None = None
    document_ci_high: float | None = None
    document_method: str | None = None
    placebo: UsageShare | None = None   # the same estimate on N_a as suspects against N_b (truth 0)
    widened: bool = False               # the interval was widened because the placebo's share is away from 0
    note: str | None = None


SHARE_METHOD = ("DUCI (Tong et al. 2025): p_hat = (mean guess - FPR) / (TPR - FPR), the mean over suspect records "
                "of p_i_hat = (m_i - FPR) / (TPR - FPR); TPR of the guess rule score >= threshold pooled over the "
                "reference models' (record, reference) pairs, the threshold maximizing TPR - FPR on them; FPR measured "
                "on the target's own known non-members (the references' when none are given)")
CI_METHOD = ("percentile bootstrap over what varies: the reference models (columns drawn with replacement), the "
             "references' records, the suspect records and the known non-members (each by document when grouped), "
             "the threshold chosen again inside each resample")
DOCUMENT_METHOD = ("share of suspect documents with any record used: 1 - pi0, pi0 = the share of suspect documents "
                   "whose p-value (P(Binomial(n_d, FPR) >= hits_d), continuous in hits_d: the regularized incomplete "
                   "beta) exceeds 1/2, over the same share among the known non-members' documents (Storey's "
                   "estimator with the null's share above 1/2 measured on N rather than assumed 1/2); a used document "
                   "whose records the rule misses counts as unused, so it leans low")
PLACEBO_WIDEN = ("the placebo's share (N_a against N_b, truth 0) has an interval that excludes 0: the estimator is off "
                 "on data known unused, so the answer's interval is widened by the placebo's |share| on each side")


def _youden(scores: np.ndarray, is_in: np.ndarray) -> tuple[float, float, float]:
    """(threshold, TPR, FPR) of the guess `score >= threshold` that maximizes TPR - FPR over the pairs `scores`,
    `is_in` (any shape, same); the highest such threshold on ties (sklearn's roc_curve order, without its input
    checks, which cost more than the curve inside a bootstrap)."""
    values, inside = np.asarray(scores, float).ravel(), np.asarray(is_in, bool).ravel()
    order = np.argsort(-values, kind="mergesort")
    values, inside = values[order], inside[order]
    last = np.r_[np.flatnonzero(np.diff(values)), len(values) - 1]  # the last pair at each distinct threshold
    tpr = np.r_[0.0, np.cumsum(inside)[last] / max(int(inside.sum()), 1)]  # first: the guess that calls no one
    fpr = np.r_[0.0, np.cumsum(~inside)[last] / max(int((~inside).sum()), 1)]
    thresholds = np.r_[np.inf, values[last]]
    best = int(np.argmax(tpr - fpr))
    return float(thresholds[best]), float(tpr[best]), float(fpr[best])


def _share(mean_guess: np.ndarray, tpr: np.ndarray, fpr: np.ndarray) -> np.ndarray:
    """(draws,) (mean_guess - fpr) / (tpr - fpr) of arrays (draws,) (or scalars), NaN where tpr <= fpr."""
    gap = tpr - fpr
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(gap > 0, (mean_guess - fpr) / gap, np.nan)


def _codes(groups: Sequence | None, n: int) -> np.ndarray:
    """(n,) integer document codes: the groups', or one per record; a record whose group is missing (None, NaN) is
    a document of its own."""
    if groups is None:
        return np.arange(n)
    labels = [str(g) if isinstance(g, str) or not pd.isna(g) else f"\x00record:{i}" for i, g in enumerate(groups)]
    return pd.factorize(pd.Series(labels, dtype=str))[0]


def _document_p(hits: np.ndarray, sizes: np.ndarray, fpr: float) -> np.ndarray:
    """(documents,) P(Binomial(size, fpr) >= hits), continuous in hits (I_fpr(hits, size - hits + 1)); 1 at 0 hits."""
    hits = np.clip(hits, 0, sizes)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = stats.beta.cdf(np.clip(fpr, 1e-9, 1 - 1e-9), np.maximum(hits, 1e-12), sizes - hits + 1)
    return np.where(hits <= 0, 1.0, p)


def _document_share(s_hits, s_sizes, n_hits, n_sizes, fpr: float) -> float:
    """1 - pi0 of the suspect documents (:data:`DOCUMENT_METHOD`); NaN when no non-member document is above 1/2."""
    null_above = float((_document_p(n_hits, n_sizes, fpr) > 0.5).mean())
    if null_above <= 0:
        return float("nan")
    return 1 - float((_document_p(s_hits, s_sizes, fpr) > 0.5).mean()) / null_above


class _Draw:
    """One estimate from (possibly resampled) inputs: threshold from the references' pairs, TPR and the
    references' FPR there, the target's guesses of S and N, the shares of records and of documents."""

    def __init__(self, target, non_members, values, is_in, s_codes, n_codes):
        self.threshold, self.tpr, self.fpr_references = _youden(values, is_in)
        guesses = (target >= self.threshold).mean(axis=1)
        self.mean_guess = float(guesses.mean())
        self.fpr_target = None if non_members is None else float((non_members >= self.threshold).mean())
        fpr = self.fpr_references if self.fpr_target is None else self.fpr_target
        self.fpr = fpr
        self.share = float(_share(np.array(self.mean_guess), np.array(self.tpr), np.array(fpr)))
        self.document_share = None
        if s_codes is not None and n_codes is not None and non_members is not None:
            n_guesses = (non_members >= self.threshold).mean(axis=1)
            self.document_share = _document_share(np.bincount(s_codes, guesses), np.bincount(s_codes),
                                                  np.bincount(n_codes, n_guesses), np.bincount(n_codes), fpr)


def _documents(codes: np.ndarray) -> list[np.ndarray]:
    """The record indices of each document of `codes` (n,), by code."""
    order = np.argsort(codes, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(codes[order])) + 1)


def _by_document(documents: list[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(record indices, their document codes in the resample) of `documents` drawn with replacement, each with all
    its records; a document drawn twice counts as two."""
    docs = rng.integers(0, len(documents), len(documents))
    rows = [documents[d] for d in docs]
    return np.concatenate(rows), np.repeat(np.arange(len(rows)), [len(r) for r in rows])


def _bootstrap(target, non_members, values, is_in, codes: dict, n_bootstrap: int, rng) -> dict[str, np.ndarray]:
    """(n_bootstrap,) draws of every quantity of :class:`_Draw` under :data:`CI_METHOD`."""
    k_refs = values.shape[1]
    docs = {k: _documents(codes[k]) for k in ("s", "n", "ref") if codes[k] is not None}
    out = {"share": [], "document_share": [], "fpr_references": [], "fpr_target": []}
    for _ in range(n_bootstrap):
        cols = rng.integers(0, k_refs, k_refs)
        ref_rows, _ = _by_document(docs["ref"], rng)
        s_rows, s_codes = _by_document(docs["s"], rng)
        n_rows, n_codes = (None, None) if non_members is None else _by_document(docs["n"], rng)
        sub_in = is_in[ref_rows][:, cols]
        if sub_in.all() or not sub_in.any():
            continue
        if not codes["grouped"]:
            s_codes = n_codes = None
        t_cols = cols if target.shape[1] == k_refs else slice(None)  # a leave-one-out scoring per reference: paired
        draw = _Draw(target[s_rows][:, t_cols], None if n_rows is None else non_members[n_rows][:, t_cols],
                     values[ref_rows][:, cols], sub_in, s_codes, n_codes)
        out["share"].append(draw.share)
        out["document_share"].append(np.nan if draw.document_share is None else draw.document_share)
        out["fpr_references"].append(draw.fpr_references)
        out["fpr_target"].append(np.nan if draw.fpr_target is None else draw.fpr_target)
    return {k: np.asarray(v, float) for k, v in out.items()}


def _interval(draws: np.ndarray, level: float) -> list[float] | None:
    """The percentile interval at `level` of the finite `draws` (n_bootstrap,); None when none is finite."""
    finite = draws[np.isfinite(draws)]
    if not len(finite):
        return None
    alpha = 1 - level
    return [float(q) for q in np.quantile(finite, [alpha / 2, 1 - alpha / 2])]


def usage_share(target_scores: np.ndarray, reference_scores: np.ndarray, reference_in: np.ndarray, *,
                non_member_scores: np.ndarray | None = None, suspect_groups: Sequence | None = None,
                non_member_groups: Sequence | None = None, reference_groups: Sequence | None = None,
                level: float = 0.95, n_bootstrap: int = 1000, seed: int = 0, placebo: bool = True) -> UsageShare:
    """What share of the suspect set did the target train on? DUCI's debiased membership guesses.

    `target_scores`: (suspect,) the guess rule's score of each suspect record under the target model (higher =
    member), or (suspect, R) for R scorings of each record (e.g. :func:`reference_guess_scores`, one per set of
    K - 1 references), whose guesses are averaged. `reference_scores`, `reference_in`: (records, references): the
    same rule's score of each record under each reference model, scored as the target is (against the other
    references), and whether the record was in that reference's training set. `non_member_scores`: (non-members,
    R) the target's scores of its known non-members N, the same R scorings: the guess rule's FPR on the target
    itself. `*_groups`: the documents of the suspect records, the non-members and the references' records.

    Tong et al.: a guess m_i in {0, 1} with TPR = P(m = 1 | member) and FPR = P(m = 1 | non-member) has E[m_i] = FPR
    + p_i (TPR - FPR), so p_i_hat = (m_i - FPR) / (TPR - FPR) is unbiased for p_i and p_hat = mean_i p_i_hat
    estimates the share (their Sec. 3, as ML Privacy Meter's DUCI implements it). TPR is pooled over the
    references' (record, reference) pairs at the threshold maximizing TPR - FPR there. FPR is the target's own
    on N when N is given: observable, and right for the target's recipe whatever the references' (references
    trained on fewer records than the target call fewer OUT records members); the references' FPR is given beside
    it, and `fpr_disagree` says when the two intervals are disjoint. The interval: :data:`CI_METHOD`. With groups,
    the share of documents used (:data:`DOCUMENT_METHOD`). With N and `placebo`, the same estimate on N split in two
    (N_a as suspects, N_b as non-members; truth 0): when its interval excludes 0 the answer's interval is widened
    (:data:`PLACEBO_WIDEN`). Estimate and interval are clipped to [0, 1] (`clipped`). TPR <= FPR leaves
    `fraction` None with the reason."""
    target = _as_matrix(target_scores)
    values, is_in = np.asarray(reference_scores, float), np.asarray(reference_in, bool)
    non = None if non_member_scores is None else _as_matrix(non_member_scores)
    _check_share_inputs(target, non, values, is_in, target_scores)
    grouped = suspect_groups is not None and non_member_groups is not None
    codes = {"s": _codes(suspect_groups, len(target)),
             "n": None if non is None else _codes(non_member_groups, len(non)),
             "ref": _codes(reference_groups, len(values)), "grouped": grouped}
    point = _Draw(target, non, values, is_in, codes["s"] if grouped else None, codes["n"] if grouped else None)
    common = {"method": SHARE_METHOD, "ci_level": level, "ci_method": CI_METHOD, "mean_guess": point.mean_guess,
              "tpr": point.tpr, "fpr": point.fpr, "fpr_source": "references" if non is None else "target",
              "fpr_references": point.fpr_references, "fpr_target": point.fpr_target, "threshold": point.threshold,
              "n_suspect": len(target), "n_non_members": 0 if non is None else len(non),
              "n_references": values.shape[1], "n_reference_records": len(values), "n_bootstrap": n_bootstrap,
              "documents": grouped, "n_suspect_documents": int(codes["s"].max() + 1) if grouped else None,
              "document_method": DOCUMENT_METHOD if grouped else None}
    raw = point.share
    if not np.isfinite(raw):
        return UsageShare(**common, fraction=None, fraction_raw=None, fraction_ci_low=None, fraction_ci_high=None,
                          at_most=None, clipped=False, note=f"the guess rule does not tell the references' IN records "
                          f"from the target's non-members (TPR {point.tpr:.3f} <= FPR {point.fpr:.3f}): no share can "
                          "be estimated")
    notes = []
    draws = _bootstrap(target, non, values, is_in, codes, n_bootstrap, np.random.default_rng(seed)) \
        if n_bootstrap else None
    ci = None if draws is None else _interval(draws["share"], level)
    if draws is not None:
        common["fpr_references_ci"] = _interval(draws["fpr_references"], level)
        if non is not None:
            common["fpr_target_ci"] = _interval(draws["fpr_target"], level)
            gap = _interval(draws["fpr_target"] - draws["fpr_references"], level)  # paired: one threshold per draw
            common["fpr_disagree"] = bool(gap and not gap[0] <= 0 <= gap[1])
        left = int((~np.isfinite(draws["share"])).sum()) + n_bootstrap - len(draws["share"])
        if left:
            notes.append(f"{left} of {n_bootstrap} resamples had TPR <= FPR (or no IN or OUT pair) and were left out")
    if common.get("fpr_disagree"):
        notes.append(f"the references do not reproduce the target's recipe: they call {point.fpr_references:.1%} of "
                     f"their OUT records members, the target {point.fpr_target:.1%} of its known non-members; the "
                     "share uses the target's FPR, and the references' TPR may be off as much")
    if grouped and point.document_share is not None and np.isfinite(point.document_share):
        doc_ci = None if draws is None else _interval(draws["document_share"], level)
        common.update(document_fraction=float(np.clip(point.document_share, 0, 1)),
                      document_ci_low=None if doc_ci is None else float(np.clip(doc_ci[0], 0, 1)),
                      document_ci_high=None if doc_ci is None else float(np.clip(doc_ci[1], 0, 1)))
    raw_ci = ci
    placebo_share, widened = None, False
    if placebo and non is not None and len(non) >= 4:
        in_a = placebo_split(len(non), non_member_groups, seed)
        groups = None if non_member_groups is None else np.asarray(list(non_member_groups), str)
        placebo_share = usage_share(non[in_a], values, is_in, non_member_scores=non[~in_a],
                                    suspect_groups=None if groups is None else groups[in_a],
                                    non_member_groups=None if groups is None else groups[~in_a],
                                    reference_groups=reference_groups, level=level, n_bootstrap=n_bootstrap,
                                    seed=seed + 1, placebo=False)
        if (ci is not None and placebo_share.fraction_raw is not None and placebo_share.fraction_ci_low is not None
                and placebo_share.fraction_ci_raw is not None
                and not placebo_share.fraction_ci_raw[0] <= 0 <= placebo_share.fraction_ci_raw[1]):
            widened = True
            pad = abs(placebo_share.fraction_raw)
            ci = [ci[0] - pad, ci[1] + pad]
            notes.append(PLACEBO_WIDEN + f" (placebo share {placebo_share.fraction_raw:.3f})")
    clipped = any(v is not None and not 0 <= v <= 1 for v in (raw, *(ci or [])))
    if clipped:
        shown = f"{raw:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        notes.append(f"clipped to [0, 1] (unclipped: {shown}): a share outside [0, 1] is the estimator's noise")
    if point.tpr - point.fpr < 0.2:
        notes.append(f"the guess rule barely tells IN from OUT (TPR {point.tpr:.3f}, FPR {point.fpr:.3f}): the "
                     "estimate is noisy")
    low, high = (None, None) if ci is None else (float(np.clip(ci[0], 0, 1)), float(np.clip(ci[1], 0, 1)))
    return UsageShare(**common, fraction=float(np.clip(raw, 0, 1)), fraction_raw=raw, fraction_ci_low=low,
                      fraction_ci_high=high, fraction_ci_raw=raw_ci, at_most=high, clipped=clipped,
                      placebo=placebo_share, widened=widened,
                      note="; ".join(notes) or None)


def _as_matrix(scores) -> np.ndarray:
    m = np.asarray(scores, float)
    return m[:, None] if m.ndim == 1 else m


def _check_share_inputs(target, non, values, is_in, given) -> None:
    if target.ndim != 2 or not len(target):
        raise ConfigError(f"usage share: target scores must be (suspect,) or (suspect, R) with records; got shape "
                          f"{np.shape(given)}")
    if values.ndim != 2 or values.shape != is_in.shape or values.shape[1] < 1:
        raise ConfigError(f"usage share: reference scores {values.shape} and IN flags {is_in.shape} must both be "
                          "(records, references)")
    if non is not None and non.shape[1] != target.shape[1]:
        raise ConfigError(f"usage share: the non-members' scores {non.shape} need the suspects' {target.shape[1]} "
                          "scorings per record")
    if not (np.isfinite(values).all() and np.isfinite(target).all() and (non is None or np.isfinite(non).all())):
        raise ConfigError("usage share: the guess rule's scores must be finite (NaN or infinite scores found)")
    if is_in.all() or not is_in.any():
        raise ConfigError("usage share: the references' IN flags are all " + ("True" if is_in.all() else "False") +
                          "; TPR and FPR need both IN and OUT (record, reference) pairs")


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
                     "unit": inference.unit, "min_units_per_side": inference.min_units_per_side,
                     "power_at_n": inference.power_at_n, "calibrated_p_value": inference.calibrated_p_value,
                     "features": "+".join(inference.features), "note": inference.note})
    if share is not None:
        rows.append({**meta, "stage": DATASET_STAGE, "attack": SHARE_ATTACK, "fraction": share.fraction,
                     "fraction_ci_low": share.fraction_ci_low, "fraction_ci_high": share.fraction_ci_high,
                     "fraction_raw": share.fraction_raw, "ci_level": share.ci_level, "tpr": share.tpr,
                     "fpr": share.fpr, "fpr_references": share.fpr_references,
                     "document_fraction": share.document_fraction, "document_ci_low": share.document_ci_low,
                     "document_ci_high": share.document_ci_high, "mean_guess": share.mean_guess,
                     "n_suspect": share.n_suspect,
                     "n_references": share.n_references, "note": share.note})
    return pd.DataFrame(rows)


__all__ = ["DATASET_STAGE", "DEFAULT_EFFECT_SIZE", "DEFAULT_POWER", "DI_ATTACK", "GUESS_RULES", "MIN_PER_HALF",
           "SHARE_ATTACK", "DatasetInference", "UsageShare", "dataset_inference", "dataset_rows", "records_for_power",
           "reference_guess_scores", "split_halves", "t_test_power", "usage_share", "welch_greater"]
