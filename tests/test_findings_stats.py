"""The seed-level and per-run statistics behind the findings' verdicts, on hand-made rows with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from memlens.report.findings import (
    at_rate,
    finding_perplexity,
    finding_rank,
    finding_value_output,
    per_run_correlations,
)
from memlens.report.inference import MeanTest, block_f_test, holm, partial_correlation, steiger_z


def test_steiger_z_is_standard_normal_under_the_null_and_signed():
    """Equal dependent correlations r(x,y) = r(x,z) = 0.4 with r(y,z) = 0.5: over many samples the statistic
    is ~N(0, 1) (a wrong covariance term would change its spread); a larger r(x,y) gives a positive z."""
    rng = np.random.default_rng(0)
    cov = np.array([[1, 0.4, 0.4], [0.4, 1, 0.5], [0.4, 0.5, 1]])
    n, zs = 150, []
    for _ in range(1500):
        x, y, z = rng.multivariate_normal(np.zeros(3), cov, size=n).T
        zs.append(steiger_z(np.corrcoef(x, y)[0, 1], np.corrcoef(x, z)[0, 1], np.corrcoef(y, z)[0, 1], n))
    zs = np.asarray(zs)
    assert abs(zs.mean()) < 0.1 and 0.9 < zs.std() < 1.1
    assert np.mean(np.abs(zs) > 1.96) == pytest.approx(0.05, abs=0.02)
    assert steiger_z(0.6, 0.2, 0.3, 100) > 2.5 and steiger_z(0.2, 0.6, 0.3, 100) < -2.5


def test_partial_correlation_matches_residual_regression():
    rng = np.random.default_rng(1)
    z = rng.normal(size=2000)
    x, y = z + rng.normal(size=2000), 0.5 * z + 0.3 * rng.normal(size=2000)
    y = y + 0.2 * x
    r = np.corrcoef([x, y, z])
    rx = x - np.polyval(np.polyfit(z, x, 1), z)
    ry = y - np.polyval(np.polyfit(z, y, 1), z)
    assert partial_correlation(r[0, 1], r[0, 2], r[1, 2]) == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-9)


def test_mean_test_calls_a_negligible_difference_absent():
    assert MeanTest.of(np.array([0.03, 0.04, 0.05, 0.035])).verdict() == "holds"
    assert MeanTest.of(np.array([-0.03, -0.04, -0.05, -0.035])).verdict() == "does not hold"
    assert MeanTest.of(np.array([0.001, -0.002, 0.0015, -0.001, 0.0005])).verdict() == "does not hold"  # within 0.01
    assert MeanTest.of(np.array([0.05, -0.06, 0.08, -0.02])).verdict() == "inconclusive"


def _grid(effect, noise: float, seeds=(0, 1, 2), ranks=(1, 4, 16), rank_slope=0.0, seed=0, draws=None) -> pd.DataFrame:
    """AUCs of q/k runs at 0.6 and v/o runs `effect` higher (a number, or rank -> effect), plus noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in seeds:
        for draw in draws or [None]:
            for targets, side in (("q", 0.0), ("k", 0.0), ("v", 1.0), ("o", 1.0)):
                for rank in ranks:
                    shift = side * (effect[rank] if isinstance(effect, dict) else effect)
                    auc = 0.6 + shift + rank_slope * np.log2(rank) ** 0.5 + rng.normal(0, noise)
                    rows.append({"method": "lora", "target_modules": targets, "rank": rank, "seed": s, "auc": auc,
                                 "canary_copies": 1, "membership": "random", **({"draw": draw} if draws else {})})
    return pd.DataFrame(rows)


def test_finding_one_is_tested_per_rank_over_replicates():
    no_delong = pd.DataFrame()
    holds = finding_value_output(_grid(0.05, 0.005), no_delong)
    assert [f.scope for f in holds] == ["rank 1", "rank 4", "rank 16"] and all(f.number == 1 for f in holds)
    assert all(f.verdict == "holds" for f in holds), [f.reason for f in holds]
    assert holds[0].correction == "Holm over 3 rank(s)" and "3 replicates (seeds)" in holds[0].test
    assert all(f.verdict == "does not hold" for f in finding_value_output(_grid(-0.05, 0.005), no_delong))
    # absent: the difference's interval (at 1 - 0.05/3 for three ranks) lies within +-0.01 AUC; per rank that takes
    # more replicates than pooling over ranks did
    absent = finding_value_output(_grid(0.0, 0.002, seeds=range(6)), no_delong)
    assert all(f.verdict == "does not hold" for f in absent), [f.reason for f in absent]
    assert all(f.verdict == "inconclusive" for f in finding_value_output(_grid(0.01, 0.08), no_delong))


def test_an_effect_that_changes_sign_with_rank_is_not_pooled_away():
    """v/o below q/k at rank 1, above at ranks 8 and 64 (the calibrated llama-tiny regime's pattern): pooled over
    ranks it would read as a weak positive; per rank it is a reversal at rank 1 and holds at the others, and the
    rank x difference test says the difference depends on rank. Seeds x record draws are the replicates."""
    found = finding_value_output(_grid({1: -0.033, 8: 0.039, 64: 0.08}, 0.01, ranks=(1, 8, 64), draws=(0, 1)),
                                 pd.DataFrame())
    verdicts = {f.scope: f.verdict for f in found}
    assert verdicts == {"rank 1": "does not hold", "rank 8": "holds", "rank 64": "holds"}, [f.reason for f in found]
    assert "reversed" in found[0].reason and "depends on rank" in found[0].reason
    assert "6 replicates (seeds x record draws)" in found[0].test


def test_holm_and_the_block_f_test_by_hand():
    # Holm: sorted p 0.01, 0.02, 0.04 times 3, 2, 1 -> 0.03, 0.04, 0.04 (monotone), back in the original order
    assert holm([0.04, 0.01, 0.02]).tolist() == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.6]).tolist() == pytest.approx([1.0, 1.0])  # capped at 1
    # Randomized block design, 3 levels (rows) x 2 blocks (columns)
    y = np.array([[1.0, 2.0], [2.0, 4.0], [6.0, 7.0]])
    grand = y.mean()  # 11/3
    ss_level = 2 * ((y.mean(axis=1) - grand) ** 2).sum()
    ss_block = 3 * ((y.mean(axis=0) - grand) ** 2).sum()
    ss_error = ((y - grand) ** 2).sum() - ss_level - ss_block
    f = (ss_level / 2) / (ss_error / 2)
    test = block_f_test(y)
    assert (test.df_factor, test.df_error) == (2, 2) and test.f == pytest.approx(f)
    assert test.f == pytest.approx(79.0)  # (79/3) / (1/3): the numbers once, as a check of the check
    assert test.p_value == pytest.approx(1 / 80)  # F(2, 2) survival: 1 / (1 + F)
    assert block_f_test(np.array([[1.0, 2.0]])) is None  # one level: nothing to test


def test_one_replicate_uses_holm_corrected_delong_tests():
    one = _grid({1: 0.05, 4: 0.05}, 0.0, seeds=(0,), ranks=(1, 4))
    delong = pd.DataFrame({"set_a": ["v", "q", "o", "v"], "set_b": ["q", "o", "k", "k"], "rank": [1, 1, 4, 4],
                           "auc_diff": [0.05, -0.05, 0.05, 0.01], "p_value": [0.001, 0.002, 0.04, 0.5]})
    found = finding_value_output(one, delong)
    # Holm over the 4 tests: 0.004, 0.006, 0.08, 0.5: rank 1 has 2 of 2 for v/o, rank 4 none significant
    assert [f.verdict for f in found] == ["holds", "inconclusive"], [f.reason for f in found]
    assert "after Holm over 4" in found[0].reason and "leave out the variation between fine-tunes" in found[0].reason


def test_finding_three_tests_rise_and_slowing_over_seeds():
    # AUC ~ sqrt(log2 rank): rises, with smaller gains per doubling at higher ranks
    found = finding_rank(_grid(0.0, 0.002, ranks=(1, 4, 16, 64), rank_slope=0.05))
    assert found.verdict == "holds" and "replicate level" in found.reason and found.number == 3
    flat = finding_rank(_grid(0.0, 0.002, ranks=(1, 4, 16, 64)))
    assert flat.verdict == "does not hold", flat.reason
    # linear in log2 rank: it rises without diminishing returns
    linear = _grid(0.0, 0.001, ranks=(1, 4, 16, 64))
    linear["auc"] += 0.02 * np.log2(linear["rank"])
    assert finding_rank(linear).verdict == "does not hold"
    assert "without diminishing returns" in finding_rank(linear).reason


def _members(n_runs: int, base_weight: float, ft_weight: float, n: int = 60, seed: int = 0) -> pd.DataFrame:
    """Per run, n member records: base ppl random; fine-tuned ppl partly the base's; the n-gram share falls
    with `ft_weight` x the fine-tuned-only part of the perplexity and `base_weight` x the base perplexity."""
    rng = np.random.default_rng(seed)
    rows = []
    for run in range(n_runs):
        base = rng.lognormal(2.0, 0.4, n)
        own = rng.normal(0, 1, n)
        ft = base * 0.5 * np.exp(0.3 * own)
        share = np.clip(0.5 - ft_weight * own - base_weight * np.log(base) + rng.normal(0, 0.2, n), 0, 1)
        rows.append(pd.DataFrame({"run_id": f"r{run}", "sample_id": [f"s{i}" for i in range(n)], "ngram_share": share,
                                  "ppl_ft": ft, "ppl_base": base}))
    return pd.concat(rows, ignore_index=True)


def test_finding_two_combines_per_run_correlations_and_tests_both_halves():
    runs = per_run_correlations(_members(6, 0.0, 0.3))
    assert len(runs) == 6 and (runs.r_ft < 0).all()
    holds = finding_perplexity(_members(6, 0.0, 0.3))
    assert holds.verdict == "holds" and "over 6 runs" in holds.reason and "Steiger" in holds.reason
    # the share follows the base perplexity only: the fine-tuned link is the base link seen through ft ppl
    base_only = finding_perplexity(_members(6, 0.6, 0.0))
    assert base_only.verdict == "does not hold", base_only.reason
    assert "second half does not" in base_only.reason
    # one run: the pooled correlations, said to be pooled
    single = finding_perplexity(_members(1, 0.0, 0.3))
    assert "pooled" in single.reason


def test_finding_two_uses_the_share_gained_over_the_base_and_says_when_it_cannot_be_tested():
    """The outcome is what fine-tuning added on the same prompt (share under the fine-tuned model minus under the
    base model): a record the base model also reproduces gains nothing. With no link and too few records, the
    verdict is inconclusive and says the finding cannot be tested at this scale; the runs-only bootstrap's verdict
    is disclosed."""
    members = _members(4, 0.0, 0.3, n=40)
    # the base model reproduces exactly what the fine-tuned one does, plus noise: nothing was gained by fine-tuning
    rng = np.random.default_rng(5)
    same = members.assign(ngram_share_base=members.ngram_share)
    same = same.assign(ngram_gain=rng.normal(0, 0.01, len(same)))
    runs = per_run_correlations(same)
    assert (runs.outcome == "ngram_gain").all()
    found = finding_perplexity(same)
    assert found.verdict == "inconclusive", found.reason
    assert "share gained over the base model" in found.reason
    assert "cannot be tested at this scale" in found.reason and "about 1600 distinct member records" in found.reason
    assert "bootstrap over runs only" in found.reason and found.effect.startswith("r_ft = ")
    # with the gain following the fine-tuned perplexity, the relative outcome carries the finding
    gained = members.assign(ngram_share_base=0.0, ngram_gain=members.ngram_share)
    assert finding_perplexity(gained).verdict == "holds"


def _ladder(fit_of_vo: float, seeds=(0, 1, 2)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Primary rows and utility rows of q/k and v/o runs at 3 learning rates. AUC is one function of the held-out
    perplexity gain for both sides; v/o runs reach `fit_of_vo` times the gain of q/k runs at the same rate."""
    rng = np.random.default_rng(7)
    primary, utility = [], []
    for seed in seeds:
        for targets, scale in (("q", 1.0), ("k", 1.0), ("v", fit_of_vo), ("o", fit_of_vo)):
            for lr in (1e-3, 3e-3, 1e-2):
                gain = scale * {1e-3: 0.02, 3e-3: 0.05, 1e-2: 0.10}[lr] + rng.normal(0, 0.002)
                run = f"{targets}-{lr}-{seed}"
                primary.append({"run_id": run, "method": "lora", "target_modules": targets, "rank": 4, "seed": seed,
                                "learning_rate": lr, "auc": 0.5 + 2.0 * gain + rng.normal(0, 0.003)})
                utility.append({"run_id": run, "utility_ppl": 100 * (1 - gain), "base_utility_ppl": 100.0})
    return pd.DataFrame(primary), pd.DataFrame(utility)


def test_matched_fit_separates_what_is_learned_from_what_is_memorized():
    """v/o learn twice as much at each learning rate, and AUC follows what was learned: at equal rank v/o memorize
    more, at matched fit they do not (the two comparisons test two claims)."""
    from memlens.report.findings import finding_matched_fit

    primary, utility = _ladder(2.0)
    per_rank = finding_value_output(primary, pd.DataFrame())
    assert [f.verdict for f in per_rank] == ["holds"]  # equal rank: v/o above q/k
    matched = finding_matched_fit(primary, utility)
    assert matched.scope == "matched fit" and matched.verdict == "does not hold", matched.reason
    assert abs(float(matched.effect.split()[0])) < 0.01 and "for what is learned" in matched.reason
    shifted = primary.assign(auc=primary.auc + 0.05 * primary.target_modules.isin(["v", "o"]))
    assert finding_matched_fit(shifted, utility).verdict == "holds"  # v/o above at every gain
    assert finding_matched_fit(primary.drop(columns="learning_rate"), utility).verdict == "inconclusive"
    apart = finding_matched_fit(*_ladder(8.0))  # v/o's least fit (0.16) above q/k's most (0.10): no common range
    assert apart.verdict == "inconclusive" and "cannot be compared" in apart.reason and "v/o 0.1" in apart.reason
    # the per-rank verdicts read the recipe's rate only: the ladder's other rates are the matched fit's
    recipe = at_rate(primary, 3e-3)
    assert set(recipe.learning_rate) == {3e-3} and len(recipe) == len(primary) // 3
    assert at_rate(primary[primary.learning_rate == 1e-2], 3e-3).equals(primary[primary.learning_rate == 1e-2])
