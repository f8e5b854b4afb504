"""Dataset inference (Maini et al. 2024) and the usage share (DUCI, Tong et al. 2025), against hand computations."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from memlens.attacks.dataset_inference import (
    DATASET_STAGE,
    DI_ATTACK,
    MIN_PER_HALF,
    SHARE_ATTACK,
    dataset_inference,
    dataset_rows,
    records_for_power,
    reference_guess_scores,
    t_test_power,
    usage_share,
    welch_greater,
)
from memlens.attacks.lira_rmia import lira_fit
from memlens.config import ConfigError
from memlens.store.results import KEY

from .conftest import REPO


def _frame(rng: np.random.Generator, n_s: int = 40, n_n: int = 40, shift: float = 0.0, groups: int | None = None):
    """A scores frame: features `a` (suspect records shifted by `shift`), `b`, `c` (noise)."""
    x = rng.normal(size=(n_s + n_n, 3))
    x[:n_s, 0] += shift
    frame = pd.DataFrame({"sample_id": [f"r{i}" for i in range(n_s + n_n)],
                          "text": [f"text {i}" for i in range(n_s + n_n)],
                          "is_member": np.r_[np.ones(n_s, bool), np.zeros(n_n, bool)],
                          "a": x[:, 0], "b": x[:, 1], "c": x[:, 2]})
    if groups:
        frame["group"] = [f"doc{i % groups}" for i in range(n_s + n_n)]
    return frame


# ------------------------------------------------------------------------------------- the test and its power
def test_welch_one_sided_matches_the_hand_formula():
    # a: mean 4, variance 1; b: mean 2, variance 2/3. se^2 = 1/3 + (2/3)/4 = 1/2, t = 2 / sqrt(1/2) = 2 sqrt 2;
    # df = (1/2)^2 / ((1/3)^2 / 2 + (1/6)^2 / 3) = 27/7; p = P(T_df > t).
    t, df, p = welch_greater(np.array([3.0, 4, 5]), np.array([1.0, 2, 2, 3]))
    assert t == pytest.approx(2 * math.sqrt(2))
    assert df == pytest.approx(27 / 7)
    assert p == pytest.approx(stats.t.sf(2 * math.sqrt(2), 27 / 7))
    assert 0.02 < p < 0.03  # one-sided: half the two-sided p
    _, _, p_reversed = welch_greater(np.array([1.0, 2, 2, 3]), np.array([3.0, 4, 5]))
    assert p_reversed == pytest.approx(1 - p)


def test_records_for_power_matches_cohens_table_and_the_normal_approximation():
    # Cohen (1988) / G*Power: one-sided two-sample t-test, d = 0.5, alpha 0.05, power 0.8: 51 per group
    assert records_for_power(0.5, 0.05, 0.8) == 51
    assert t_test_power(0.5, 50, 50, 0.05) < 0.8 <= t_test_power(0.5, 51, 51, 0.05)
    # large n: the normal approximation Phi(d sqrt(n/2) - z_(1-alpha))
    approx = stats.norm.cdf(0.3 * math.sqrt(400 / 2) - stats.norm.ppf(0.95))
    assert t_test_power(0.3, 400, 400, 0.05) == pytest.approx(approx, abs=0.005)
    with pytest.raises(ConfigError, match="effect_size"):
        records_for_power(0.0, 0.05, 0.8)


# ------------------------------------------------------------------------------------- dataset inference
def test_learned_weights_aggregate_the_test_half_as_reported():
    """A tiny separable example: feature `a` tells S from N, `b` is noise. The reported weights, clipping and
    standardization, applied by hand to the B halves, give the reported scores and the Welch test's p-value."""
    rng = np.random.default_rng(1)
    n = 12
    frame = pd.DataFrame({"sample_id": [f"r{i}" for i in range(2 * n)], "text": [f"t{i}" for i in range(2 * n)],
                          "is_member": np.r_[np.ones(n, bool), np.zeros(n, bool)],
                          "a": np.r_[np.linspace(3, 5, n), np.linspace(0, 2, n)], "b": rng.normal(size=2 * n)})
    result = dataset_inference(frame, ["a", "b"], seed=3)
    assert result.weights["a"] > 0 and abs(result.weights["a"]) > abs(result.weights["b"])
    assert result.p_value < 1e-4 and result.verdict == "used" and result.used
    by_id = frame.set_index("sample_id")

    def by_hand(ids: list[str]) -> np.ndarray:
        total = np.full(len(ids), result.intercept)
        for f in result.features:
            x = np.clip(by_id.loc[ids, f].to_numpy(), result.clip_low[f], result.clip_high[f])
            total += result.weights[f] * (x - result.feature_mean[f]) / result.feature_scale[f]
        return total

    s_b, n_b = by_hand(result.halves["suspect_b"]), by_hand(result.halves["non_members_b"])
    np.testing.assert_allclose(s_b, result.test_scores["suspect_b"])
    np.testing.assert_allclose(n_b, result.test_scores["non_members_b"])
    se = math.sqrt(s_b.var(ddof=1) / len(s_b) + n_b.var(ddof=1) / len(n_b))
    t = (s_b.mean() - n_b.mean()) / se
    df = se ** 4 / ((s_b.var(ddof=1) / len(s_b)) ** 2 / (len(s_b) - 1)
                    + (n_b.var(ddof=1) / len(n_b)) ** 2 / (len(n_b) - 1))
    assert result.statistic == pytest.approx(t) and result.df == pytest.approx(df)
    # the shown split is the median one; the splits combine as min(1, 2 x median)
    assert float(np.median(result.split_p_values)) == pytest.approx(stats.t.sf(t, df))
    assert len(result.split_p_values) == result.n_splits == 11
    assert result.p_value == pytest.approx(min(1.0, 2 * stats.t.sf(t, df)))
    # standardization and clipping come from the learning half only
    a_ids = result.halves["suspect_a"] + result.halves["non_members_a"]
    clipped = np.clip(by_id.loc[a_ids, "a"].to_numpy(), result.clip_low["a"], result.clip_high["a"])
    assert result.feature_mean["a"] == pytest.approx(clipped.mean())
    assert result.clip_low["a"] == pytest.approx(np.quantile(by_id.loc[a_ids, "a"], 0.025))
    # the halves partition each side
    halves = result.halves
    assert sorted(halves["suspect_a"] + halves["suspect_b"]) == sorted(frame.sample_id[:n])
    assert sorted(halves["non_members_a"] + halves["non_members_b"]) == sorted(frame.sample_id[n:])
    assert len(halves["suspect_a"]) == n // 2


def test_refuses_a_text_on_both_sides_and_too_few_records():
    frame = _frame(np.random.default_rng(0))
    frame.loc[45, "text"] = frame.loc[3, "text"]  # a non-member's text is also a suspect record's
    with pytest.raises(ConfigError, match="both in the suspect set and among the known non-members"):
        dataset_inference(frame)
    small = _frame(np.random.default_rng(0), n_s=2 * MIN_PER_HALF - 1, n_n=40)
    with pytest.raises(ConfigError, match=rf"at least {2 * MIN_PER_HALF} to run at all, and 102 for power 0.8"):
        dataset_inference(small)
    with pytest.raises(ConfigError, match="needs a 'text' column"):
        dataset_inference(frame.drop(columns="text"))
    with pytest.raises(ConfigError, match=r"feature\(s\) \['zlib'\] are not columns"):
        dataset_inference(_frame(np.random.default_rng(0)), ["a", "zlib"])


def test_few_records_without_signal_are_underpowered_not_unused():
    result = dataset_inference(_frame(np.random.default_rng(2), n_s=20, n_n=20), seed=0)
    assert result.p_value >= 0.05
    assert result.verdict == "underpowered" and not result.used
    assert result.min_units_per_side == 102 and result.power_at_n < 0.8 and result.unit == "record"
    assert "needs 102 records per side" in result.note


def test_nan_features_are_dropped_and_said():
    frame = _frame(np.random.default_rng(0), shift=1.5)
    frame.loc[5, "b"] = np.nan   # a partial attack: one record unscored
    frame["c"] = np.inf * np.sign(frame.c)
    result = dataset_inference(frame)
    assert result.features == ["a"]
    assert set(result.dropped_features) == {"b", "c"}
    assert "1 of 80 records have no finite score" in result.dropped_features["b"]
    assert "features not used: b" in result.note
    with pytest.raises(ConfigError, match="no usable feature"):
        dataset_inference(frame, ["b", "c"])


def test_same_seed_same_answer_and_groups_stay_whole():
    frame = _frame(np.random.default_rng(4), shift=0.5, groups=16)
    first, again, other = (dataset_inference(frame, seed=s) for s in (7, 7, 8))
    assert first.model_dump() == again.model_dump()
    assert first.halves != other.halves
    assert first.grouped
    group = frame.set_index("sample_id").group
    in_a = {group[i] for i in first.halves["suspect_a"] + first.halves["non_members_a"]}
    in_b = {group[i] for i in first.halves["suspect_b"] + first.halves["non_members_b"]}
    # a document's records stay in one half per side (a group holds records of both sides here)
    for side in ("suspect", "non_members"):
        a = {group[i] for i in first.halves[f"{side}_a"]}
        b = {group[i] for i in first.halves[f"{side}_b"]}
        assert not a & b
    assert in_a and in_b


def test_bag_of_words_bias_heads_the_answer():
    frame = _frame(np.random.default_rng(0), shift=2.0)
    result = dataset_inference(frame, bag_of_words={"biased_split": True, "auc": 0.81})
    assert result.verdict == "confounded" and not result.used and result.confounded
    assert result.note.startswith("words alone separate the suspect set from the non-members (bag-of-words AUC 0.810)")
    assert dataset_inference(frame, bag_of_words={"biased_split": False, "auc": 0.52}).verdict == "used"


def test_null_p_values_are_uniform():
    """S drawn like N: over 200 simulated draws the test rejects at 0.05 about 5% of the time."""
    rng = np.random.default_rng(11)
    runs = [dataset_inference(_frame(rng, n_s=30, n_n=30), seed=i, word_control=False, placebo=False)
            for i in range(200)]
    p = np.array([r.p_value for r in runs])
    assert (p < 0.05).mean() <= 0.06
    # each split's own p-value is uniform; their combination min(1, 2 median) is conservative
    first = np.array([r.split_p_values[0] for r in runs])
    assert (first < 0.5).mean() == pytest.approx(0.5, abs=0.1)
    assert (p < 0.5).mean() < (first < 0.5).mean()
    # and a real shift is found
    assert dataset_inference(_frame(rng, n_s=60, n_n=60, shift=1.0)).p_value < 0.01


# ------------------------------------------------------------------------------------- usage share
# 4 records x 3 references: IN pairs score 0.9, 0.8, 0.75, 0.65, 0.6, 0.3; OUT pairs 0.7, 0.5, 0.4, 0.2, 0.15, 0.1.
REF_SCORES = np.array([[0.9, 0.7, 0.1], [0.8, 0.5, 0.15], [0.75, 0.65, 0.4], [0.6, 0.3, 0.2]])
REF_IN = np.array([[True, False, False], [True, False, False], [True, True, False], [True, True, False]])


def test_usage_share_debiases_the_mean_guess_by_hand():
    # TPR - FPR over thresholds (score >= t): 0.75 -> 3/6 - 0; 0.65 -> 4/6 - 1/6; 0.6 -> 5/6 - 1/6 = 2/3 (best);
    # 0.5 -> 5/6 - 2/6; 0.3 -> 6/6 - 3/6. Target: 3 of 5 suspect records score >= 0.6: mean guess 3/5, so
    # p_hat = (3/5 - 1/6) / (5/6 - 1/6) = 13/20.
    result = usage_share(np.array([0.95, 0.62, 0.55, 0.3, 0.61]), REF_SCORES, REF_IN, n_bootstrap=200)
    assert result.threshold == pytest.approx(0.6)
    assert result.tpr == pytest.approx(5 / 6) and result.fpr == pytest.approx(1 / 6)
    assert result.mean_guess == pytest.approx(3 / 5)
    assert result.fraction == pytest.approx(13 / 20) and result.fraction_raw == pytest.approx(13 / 20)
    assert 0 <= result.fraction_ci_low <= result.fraction <= result.fraction_ci_high <= 1
    # (suspect, R) scores: each record's guesses are averaged over its R scorings
    two = usage_share(np.array([[0.95, 0.1], [0.62, 0.62]]), REF_SCORES, REF_IN, n_bootstrap=0)
    assert two.mean_guess == pytest.approx(3 / 4) and two.fraction == pytest.approx((3 / 4 - 1 / 6) / (2 / 3))
    assert two.fraction_ci_low is None


def test_usage_share_clips_and_says_so_and_refuses_a_useless_rule():
    result = usage_share(np.array([0.1, 0.2, 0.3]), REF_SCORES, REF_IN, n_bootstrap=100)
    assert result.fraction_raw == pytest.approx((0 - 1 / 6) / (2 / 3))
    assert result.fraction == 0.0 and result.clipped and "clipped to [0, 1] (unclipped: -0.250" in result.note
    same = usage_share(np.array([0.5]), np.array([[0.5, 0.5], [0.5, 0.5]]), np.array([[True, False], [False, True]]))
    assert same.fraction is None
    assert "does not tell the references' IN records from the target's non-members" in same.note
    with pytest.raises(ConfigError, match=r"must both be \(records, references\)"):
        usage_share(np.array([0.5]), REF_SCORES, REF_IN[:, :2])
    with pytest.raises(ConfigError, match="finite"):
        usage_share(np.array([np.nan]), REF_SCORES, REF_IN)


def test_usage_share_is_unbiased_on_a_simulation():
    """Gaussian guess scores (IN ~ N(1, 1), OUT ~ N(0, 1)): 30% of 2,000 suspect records used."""
    rng = np.random.default_rng(0)
    is_in = rng.random((2000, 4)) < 0.5
    ref = rng.normal(size=is_in.shape) + is_in
    used = rng.random(2000) < 0.3
    result = usage_share(rng.normal(size=2000) + used, ref, is_in, n_bootstrap=300)
    assert result.fraction == pytest.approx(used.mean(), abs=0.05)
    assert result.fraction_ci_low <= used.mean() <= result.fraction_ci_high
    assert result.fraction_ci_high - result.fraction_ci_low < 0.15


def test_reference_guess_scores_leave_one_reference_out():
    rng = np.random.default_rng(3)
    is_in = rng.random((30, 4)) < 0.5
    values = -2.0 + 0.3 * is_in + 0.1 * rng.normal(size=is_in.shape)
    statistic = -2.0 + 0.3 * (rng.random(30) < 0.5)
    target, refs = reference_guess_scores(statistic, values, is_in)
    assert target.shape == refs.shape == (30, 4)
    for k in range(4):
        others = np.arange(4) != k
        fit = lira_fit(values[:, others], is_in[:, others])
        # one shared sigma below 64 references: log Lambda = (mu_in - mu_out)(s - (mu_in + mu_out) / 2) / sigma^2
        by_hand = ((fit["mu_in"] - fit["mu_out"]) * (statistic - (fit["mu_in"] + fit["mu_out"]) / 2)
                   / fit["sigma_in"] ** 2)
        np.testing.assert_allclose(target[:, k], by_hand, rtol=1e-9, atol=1e-9)
    # reference k is scored as the target is, from the references other than k
    np.testing.assert_allclose(reference_guess_scores(values[:, 2], values, is_in)[0][:, 2], refs[:, 2])
    changed = values.copy()
    changed[:, 1] += 5
    np.testing.assert_allclose(reference_guess_scores(statistic, changed, is_in)[0][:, 1], target[:, 1])
    with pytest.raises(ConfigError, match="give 3 or more references"):
        reference_guess_scores(statistic, values[:, :2], is_in[:, :2])
    with pytest.raises(ConfigError, match="unknown guess rule 'rmia'"):
        reference_guess_scores(statistic, values, is_in, rule="rmia")


# ------------------------------------------------------------------------------------- rows and the benchmark
def test_rows_follow_the_results_schema():
    inference = dataset_inference(_frame(np.random.default_rng(0), shift=1.0))
    share = usage_share(np.array([0.95, 0.62, 0.55, 0.3, 0.61]), REF_SCORES, REF_IN, n_bootstrap=50)
    rows = dataset_rows({"run_id": "target", "model": "m"}, inference, share)
    assert list(rows.attack) == [DI_ATTACK, SHARE_ATTACK] and set(rows.stage) == {DATASET_STAGE}
    assert set(KEY) <= set(rows.columns) and not rows.duplicated(KEY).any()
    di, us = rows.iloc[0], rows.iloc[1]
    assert di.p_value == inference.p_value and di.verdict == "used" and di.n_non_members == 40
    assert us.fraction == pytest.approx(0.65) and us.fraction_ci_low <= us.fraction <= us.fraction_ci_high
    assert np.isnan(us.p_value) and us.n_suspect == 5
    assert dataset_rows({"run_id": "x"}).empty


def test_benchmark_smoke_mode(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("dataset_inference_benchmark",
                                                  REPO / "benchmarks" / "dataset_inference.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--threads", "1", "--out", str(tmp_path / "bench")])
    out = capsys.readouterr().out
    assert "detection rate" in out and "false-positive rate" in out and "mean |estimate - p|" in out
