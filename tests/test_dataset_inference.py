"""Dataset inference (Maini et al. 2024) and the usage share (DUCI, Tong et al. 2025), against hand computations."""

from __future__ import annotations

import functools
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


@functools.cache
def _benchmark():
    """benchmarks/dataset_inference.py as a module (its simulators are the tests' too)."""
    spec = importlib.util.spec_from_file_location("dataset_inference_benchmark",
                                                  REPO / "benchmarks" / "dataset_inference.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_smoke_mode(tmp_path, capsys):
    bench = _benchmark()
    bench.main(["--smoke", "--threads", "1", "--out", str(tmp_path / "bench")])
    out = capsys.readouterr().out
    assert "detection rate" in out and "false-positive rate" in out and "mean |estimate - p|" in out
    for row in ("grouped null, real scores", "grouped null, simulated", "shifted null, real scores",
                "shifted null, simulated", "mixed sets with siblings", "real sets with siblings"):
        assert row in out
    assert "(target <= 0.05:" in out and "coverage >= 0.9:" in out


# ------------------------------------------------------------------------------------- issue 38: the owner's answer
def _documents(rng: np.random.Generator, n_docs: int = 20, chunks: int = 10, rho: float = 0.6,
               shift: float = 0.0) -> pd.DataFrame:
    """Documents of `chunks` records a side, a shared document effect of variance `rho` on every feature (a, b),
    nothing trained; S's feature `a` shifted by `shift` standard deviations."""
    rows = []
    for side in (True, False):
        for d in range(n_docs):
            effect = rng.normal(size=2) * math.sqrt(rho)
            for c in range(chunks):
                x = effect + rng.normal(size=2) * math.sqrt(1 - rho)
                rows.append({"sample_id": f"{'s' if side else 'n'}{d}_{c}", "text": f"{side} {d} {c}",
                             "is_member": side, "group": f"{'s' if side else 'n'}{d}", "a": x[0] + shift * side,
                             "b": x[1]})
    return pd.DataFrame(rows)


def test_grouped_test_counts_documents_and_keeps_its_level():
    rng = np.random.default_rng(5)
    frame = _documents(rng)
    result = dataset_inference(frame, ["a", "b"], word_control=False, placebo=False)
    assert result.unit == "document" and result.grouped and result.n_suspect_units == 20
    # the shown split by hand: each document's mean aggregated score, Welch on the document means
    by_id = frame.set_index("sample_id")

    def doc_means(key: str) -> pd.Series:
        ids = result.halves[key]
        total = np.full(len(ids), result.intercept)
        for f in result.features:
            x = np.clip(by_id.loc[ids, f].to_numpy(), result.clip_low[f], result.clip_high[f])
            total += result.weights[f] * (x - result.feature_mean[f]) / result.feature_scale[f]
        return pd.Series(total).groupby(by_id.loc[ids, "group"].to_numpy()).mean()

    s, n = doc_means("suspect_b"), doc_means("non_members_b")
    assert result.test_units["suspect_b"] == s.index.tolist()
    np.testing.assert_allclose(result.test_scores["suspect_b"], s.to_numpy())
    assert float(np.median(result.split_p_values)) == pytest.approx(stats.ttest_ind(
        s, n, equal_var=False, alternative="greater").pvalue)
    assert len(result.test_scores["suspect_b"]) == 10  # documents, not the 100 records
    # 100 null trials with within-document correlation 0.6: the level holds by document, not by record
    grouped = [dataset_inference(_documents(rng), ["a", "b"], word_control=False, placebo=False, seed=i).p_value
               for i in range(100)]
    records = [dataset_inference(_documents(rng).drop(columns="group"), ["a", "b"], word_control=False,
                                 placebo=False, seed=i).p_value for i in range(40)]
    assert np.mean(np.array(grouped) < 0.05) <= 0.06
    assert np.mean(np.array(records) < 0.05) > 0.3  # what the issue measured without --group


def test_without_groups_the_answer_says_records_are_independent_and_names_group():
    frame = _documents(np.random.default_rng(1), n_docs=12, chunks=4, rho=0.0).drop(columns="group")
    result = dataset_inference(frame, ["a", "b"], word_control=False, placebo=False)
    assert result.unit == "record" and "taken as an independent document" in result.independence
    assert "give --group" in result.document_warning and "'s0'" in result.document_warning
    plain = frame.assign(sample_id=[f"id{i:03d}x" for i in range(len(frame))])
    assert dataset_inference(plain, ["a", "b"], word_control=False, placebo=False).document_warning is None
    chunks = plain.assign(text=[f"part {i} of a sentence cut and" if i % 2 == 0 else f"continued here {i}."
                                for i in range(len(plain))])
    assert "continue one another" in dataset_inference(chunks, ["a", "b"], word_control=False,
                                                       placebo=False).document_warning


def test_a_shifted_but_unused_set_is_confounded_not_used():
    """S never trained on but easier for the base model: the target's loss is the base's loss plus noise. The base
    model's control separates S from N, so the verdict is `confounded`, with the calibrated features' p."""
    rng = np.random.default_rng(2)
    n = 150
    base = rng.normal(size=2 * n) + np.r_[np.full(n, 0.5), np.zeros(n)]  # S easier by half a standard deviation
    loss = base + 0.1 * rng.normal(size=2 * n)
    frame = pd.DataFrame({"sample_id": [f"r{i}" for i in range(2 * n)], "text": [f"t {i}" for i in range(2 * n)],
                          "is_member": np.r_[np.ones(n, bool), np.zeros(n, bool)], "loss": loss, "base_loss": base,
                          "loss_minus_base": loss - base})
    result = dataset_inference(frame, ["loss"], base_features=["base_loss"], calibrated_features=["loss_minus_base"],
                               word_control=False)
    assert result.p_value < 0.05  # the raw test alone would say "used"
    assert result.verdict == "confounded" and not result.used
    base_control = next(c for c in result.controls if c.name == "base model")
    assert base_control.separates and base_control.p_value < 0.05
    assert result.calibrated_p_value is not None and result.calibrated_p_value > 0.05
    assert "calibrated features only (loss_minus_base)" in result.decision
    assert f"base model p = {base_control.p_value:.2g}" in result.note and f"p = {result.p_value:.2g}" in result.note
    # the same set drawn like N: the control is quiet and the test decides
    frame.loc[:n - 1, ["loss", "base_loss"]] -= 0.5
    assert dataset_inference(frame, ["loss"], base_features=["base_loss"], word_control=False).verdict != "confounded"


def _siblings(rng: np.random.Generator, used_docs: float = 0.5, used_within: float = 0.6, target_shift: float = 0.0
              ) -> tuple[dict, float, float]:
    """The benchmark's simulated mixed set (documents with a shared effect, used documents partly trained, K
    references IN on random halves) at fixed shares: usage_share's inputs, the share of records used, of documents."""
    return _benchmark().sibling_inputs(rng, used_docs=used_docs, used_within=used_within, target_shift=target_shift)


def test_sibling_share_interval_holds_the_truth_on_records_and_documents():
    inputs, truth, doc_truth = _siblings(np.random.default_rng(3))
    result = usage_share(**inputs, n_bootstrap=300)
    assert result.fpr_source == "target" and result.documents and result.n_suspect_documents == 60
    assert result.fraction_ci_low <= truth <= result.fraction_ci_high
    assert result.document_ci_low <= doc_truth <= result.document_ci_high
    assert abs(result.fraction - truth) <= 0.1 and abs(result.document_fraction - doc_truth) <= 0.15
    assert result.at_most == result.fraction_ci_high


def test_placebo_share_interval_holds_zero_and_the_target_fpr_is_the_targets():
    """Nothing used, and the target trained so that its non-members score like the references' members (a target
    trained longer): the references' FPR would give a share far from 0; the target's own FPR does not."""
    inputs, truth, _ = _siblings(np.random.default_rng(4), used_docs=0.0, target_shift=1.5)
    assert truth == 0
    result = usage_share(**inputs, n_bootstrap=300)
    assert result.placebo is not None and result.placebo.fraction_ci_raw[0] <= 0 <= result.placebo.fraction_ci_raw[1]
    assert result.fraction_ci_low <= 0.0 + 1e-12 and not result.widened
    assert result.fpr_target > result.fpr_references + 0.2 and result.fpr_disagree
    assert f"{result.fpr_references:.1%}" in result.note and f"{result.fpr_target:.1%}" in result.note
    # the references' FPR alone (no known non-members given): the share the issue saw, well away from 0
    alone = usage_share(inputs["target_scores"], inputs["reference_scores"], inputs["reference_in"], n_bootstrap=0)
    assert alone.fpr_source == "references" and alone.fraction_raw > 0.3


def test_a_record_without_a_document_is_a_document_of_its_own():
    """Groups with missing entries (an inserted canary has none): each such record its own document, and the share
    of records unchanged by the grouping."""
    target, non = np.array([0.95, 0.62, 0.55, 0.3, 0.61]), np.array([0.7, 0.1, 0.2, 0.59])
    result = usage_share(target, REF_SCORES, REF_IN, non_member_scores=non, n_bootstrap=50, placebo=False,
                         suspect_groups=["a", "a", None, "b", np.nan], non_member_groups=["c", "c", "d", None],
                         reference_groups=["a", None, "b", "b"])
    plain = usage_share(target, REF_SCORES, REF_IN, non_member_scores=non, n_bootstrap=0, placebo=False)
    assert result.documents and result.n_suspect_documents == 4  # a, b, and the two records without one
    assert result.fraction == pytest.approx(plain.fraction)


def test_target_fpr_is_the_share_of_its_non_members_called_members_by_hand():
    # threshold 0.6 (see test_usage_share_debiases_the_mean_guess_by_hand); 1 of 4 non-members scores >= 0.6
    result = usage_share(np.array([0.95, 0.62, 0.55, 0.3, 0.61]), REF_SCORES, REF_IN,
                         non_member_scores=np.array([0.7, 0.1, 0.2, 0.59]), n_bootstrap=0, placebo=False)
    assert result.fpr_target == pytest.approx(1 / 4) and result.fpr_references == pytest.approx(1 / 6)
    assert result.fraction == pytest.approx((3 / 5 - 1 / 4) / (5 / 6 - 1 / 4))


def test_ranked_evidence_orders_suspects_by_the_aggregated_score():
    frame = _documents(np.random.default_rng(6), n_docs=12, chunks=3, rho=0.2, shift=1.0)
    result = dataset_inference(frame, ["a", "b"], word_control=False, placebo=False)
    by_id = frame.set_index("sample_id")

    def score(ids) -> np.ndarray:
        total = np.full(len(ids), result.intercept)
        for f in result.features:
            x = np.clip(by_id.loc[ids, f].to_numpy(), result.clip_low[f], result.clip_high[f])
            total += result.weights[f] * (x - result.feature_mean[f]) / result.feature_scale[f]
        return total

    suspects = frame.sample_id[frame.is_member].tolist()
    non = score(frame.sample_id[~frame.is_member].tolist())
    best = suspects[int(np.argmax(score(suspects)))]
    top = result.ranked_records[0]
    assert top["rank"] == 1 and top["sample_id"] == best and top["document"] == by_id.loc[best, "group"]
    assert top["score"] == pytest.approx(score([best])[0])
    assert top["non_members_as_high"] == pytest.approx((non >= top["score"]).mean())
    assert [r["score"] for r in result.ranked_records] == sorted((r["score"] for r in result.ranked_records),
                                                                 reverse=True)
    doc = result.ranked_documents[0]
    members = frame[frame.group == doc["document"]].sample_id.tolist()
    assert doc["records"] == 3 and doc["score"] == pytest.approx(score(members).mean())


def test_a_refused_test_keeps_the_share():
    """8 suspects and 8 non-members: too few for dataset inference (10 a side), yet 4 references give a share,
    calibrated on the target's own non-members."""
    from memlens.attacks.mia import _dataset_level
    from memlens.attacks.registry import configure
    from memlens.attacks.subject import Subject

    rng = np.random.default_rng(9)
    n = 8
    members = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "text": [f"suspect {i}" for i in range(n)]})
    non = pd.DataFrame({"sample_id": [f"n{i}" for i in range(n)], "text": [f"other {i}" for i in range(n)]})
    counted = pd.DataFrame({"sample_id": members.sample_id.tolist() + non.sample_id.tolist(),
                            "loss": rng.normal(size=2 * n), "nll_ft": rng.random(2 * n) + 1,
                            "nll_ref": rng.random(2 * n) + 1.2})
    is_in = np.tile([True, False], (2 * n, 2))
    statistics = -counted.nll_ft.to_numpy()[:, None] + 0.5 * is_in + 0.1 * rng.normal(size=is_in.shape)
    subject = Subject("t", members, non, {"run_id": "t"})
    inference, share = _dataset_level(subject, counted, members, [configure("loss")], None, (statistics, is_in))
    assert inference is None
    assert share is not None and share.n_suspect == n and share.n_non_members == n and share.fpr_source == "target"
