"""The seed-level and per-run statistics behind the findings' verdicts, on hand-made rows with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from memlens.report.findings import (
    alpha_scope,
    finding_perplexity,
    finding_rank,
    finding_value_output,
    member_excess,
    per_run_correlations,
)
from memlens.report.inference import MeanTest, block_f_test, bonferroni, holm, partial_correlation, steiger_z
from memlens.report.matched_fit import finding_matched_fit, matched_differences, nearest_pairs, utility_gain
from memlens.report.member_gain import member_specific_gain, outcome_of
from memlens.report.repetition import exposure_gain, finding_copies, slopes
from memlens.report.replicates import per_unit, unit_of


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


def test_mean_test_tells_a_reversal_from_a_null():
    assert MeanTest.of(np.array([0.03, 0.04, 0.05, 0.035])).verdict() == "holds"
    assert MeanTest.of(np.array([-0.03, -0.04, -0.05, -0.035])).verdict() == "reversed"
    assert MeanTest.of(np.array([0.001, -0.002, 0.0015, -0.001, 0.0005])).verdict() == "does not hold"  # within 0.01
    assert MeanTest.of(np.array([0.001, -0.002, 0.0015, -0.001, 0.0005])).verdict(negligible=None) == "inconclusive"
    assert MeanTest.of(np.array([0.05, -0.06, 0.08, -0.02])).verdict() == "inconclusive"


def test_bonferroni_p_and_interval_agree_by_hand():
    """diffs 1, 2, 3, 4 (mean 2.5, sd 1.291, n 4): t = 2.5 / (1.291 / 2) = 3.873, two-sided p = 0.0305 (df 3). Over
    2 tests the adjusted p is 0.061 (not significant) and the 97.5% interval, 2.5 -+ t_{0.9875, 3} x 0.6455 =
    2.5 -+ 2.4286, just includes 0... no: t_{0.9875,3} = 4.1765 gives [-0.196, 5.196], which includes 0; alone the
    95% interval [0.446, 4.554] excludes it: verdict and interval agree at each level."""
    test = MeanTest.of(np.array([1.0, 2.0, 3.0, 4.0]))
    assert test.p_value == pytest.approx(0.0305, abs=2e-4) and test.df == 3
    assert bonferroni(test.p_value, 2) == pytest.approx(2 * test.p_value)
    assert test.interval(0.975) == pytest.approx((2.5 - 4.1765 * 0.64550, 2.5 + 4.1765 * 0.64550), abs=1e-3)
    assert test.verdict(negligible=None) == "holds" and test.verdict(tests=2, negligible=None) == "inconclusive"
    assert "Bonferroni 97.5% interval, 2 tests" in test.effect(tests=2) and "[-0.196, +5.196]" in test.effect(tests=2)
    for seed in range(200):  # on random data the two never disagree
        t = MeanTest.of(np.random.default_rng(seed).normal(0.5, 1, 5))
        low, high = t.interval(1 - 0.05 / 3)
        assert (t.verdict(tests=3, negligible=None) in ("holds", "reversed")) == (low > 0 or high < 0)


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
    assert holds[0].correction == "Bonferroni over 3 rank(s)" and "3 seeds (df 2), one record draw" in holds[0].test
    assert "Bonferroni 98.3% interval, 3 tests" in holds[0].effect
    assert all(f.verdict == "reversed" for f in finding_value_output(_grid(-0.05, 0.005), no_delong))
    # absent: the difference's interval (at 1 - 0.05/3 for three ranks) lies within +-0.01 AUC; per rank that takes
    # more replicates than pooling over ranks did
    absent = finding_value_output(_grid(0.0, 0.002, seeds=range(6)), no_delong)
    assert all(f.verdict == "does not hold" for f in absent), [f.reason for f in absent]
    assert all(f.verdict == "inconclusive" for f in finding_value_output(_grid(0.01, 0.08), no_delong))


def test_an_effect_that_changes_sign_with_rank_is_not_pooled_away():
    """v/o below q/k at rank 1, above at ranks 8 and 64 (the calibrated llama-tiny regime's pattern): pooled over
    ranks it would read as a weak positive; per rank it is a reversal at rank 1 and holds at the others, and the
    rank x difference test says the difference depends on rank. Record draws are the replicates."""
    found = finding_value_output(_grid({1: -0.033, 8: 0.039, 64: 0.08}, 0.01, ranks=(1, 8, 64), draws=range(5)),
                                 pd.DataFrame())
    verdicts = {f.scope: f.verdict for f in found}
    assert verdicts == {"rank 1": "reversed", "rank 8": "holds", "rank 64": "holds"}, [f.reason for f in found]
    assert "reversed: q/k" in found[0].reason and "depends on rank" in found[0].reason
    # seeds 0-2 in each of 5 draws: the draw is the unit, seeds averaged within it
    assert "5 record draws (df 4), up to 3 seeds averaged within each draw" in found[0].test
    two = finding_value_output(_grid({1: -0.033}, 0.01, ranks=(1,), draws=(0, 1)), pd.DataFrame())
    assert "2 record draws (df 1)" in two[0].test  # the older studies' 2 draws: read, with their df


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
    assert "3 seeds (df 2)" in found.test
    flat = finding_rank(_grid(0.0, 0.002, ranks=(1, 4, 16, 64)))
    assert flat.verdict == "does not hold", flat.reason
    falling = _grid(0.0, 0.002, ranks=(1, 4, 16, 64), rank_slope=-0.05)
    assert finding_rank(falling).verdict == "reversed"
    assert finding_rank(falling, alpha_scope(16, None)).scope == "alpha 16 fixed"
    assert alpha_scope(16, 2) == "alpha = 2 x rank"
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


def _ladder(fit_of_vo: float, draws=range(5), rates=(1e-3, 3e-3, 1e-2)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Primary rows and utility rows of q/k and v/o runs at 3 learning rates, one seed per record draw. AUC is one
    function of the held-out perplexity gain for both sides; v/o runs reach `fit_of_vo` times the gain of q/k runs
    at the same rate."""
    rng = np.random.default_rng(7)
    primary, utility = [], []
    for draw in draws:
        for targets, scale in (("q", 1.0), ("k", 1.0), ("v", fit_of_vo), ("o", fit_of_vo)):
            for lr in rates:
                gain = scale * 10 * lr + rng.normal(0, 0.002)
                run = f"{targets}-{lr}-{draw}"
                primary.append({"run_id": run, "method": "lora", "target_modules": targets, "rank": 4, "seed": 0,
                                "draw": draw, "learning_rate": lr, "auc": 0.5 + 2.0 * gain + rng.normal(0, 0.003)})
                utility.append({"run_id": run, "utility_ppl": 100 * (1 - gain), "base_utility_ppl": 100.0})
    return pd.DataFrame(primary), pd.DataFrame(utility)


def test_matched_fit_separates_what_is_learned_from_what_is_memorized():
    """v/o learn twice as much at each learning rate, and AUC follows what was learned: at equal rank v/o memorize
    more, at matched fit they do not (the two comparisons test two claims), both at AUC at equal gain and at gain at
    equal AUC, each tested over record draws."""
    primary, utility = _ladder(2.0)
    per_rank = finding_value_output(primary, pd.DataFrame())
    assert [f.verdict for f in per_rank[:-1]] == ["holds"] * 3  # equal rank: v/o above q/k at each rate
    at_gain, at_auc = finding_matched_fit(primary, utility)
    assert at_gain.scope == "matched fit, AUC at equal gain" and at_gain.verdict == "does not hold", at_gain.reason
    assert abs(float(at_gain.effect.split()[0])) < 0.01 and "for what they learn" in at_gain.reason
    assert "5 record draws (df 4), one seed per draw" in at_gain.test and "Bonferroni over the 2" in at_gain.correction
    assert "(ranks: 4 (5 record draws))" in at_gain.reason
    assert at_auc.scope == "matched fit, gain at equal AUC" and abs(float(at_auc.effect.split()[0])) < 0.005
    shifted = primary.assign(auc=primary.auc + 0.05 * primary.target_modules.isin(["v", "o"]))
    assert [f.verdict for f in finding_matched_fit(shifted, utility)] == ["holds", "holds"]  # v/o above at every gain
    lowered = primary.assign(auc=primary.auc - 0.05 * primary.target_modules.isin(["v", "o"]))
    assert [f.verdict for f in finding_matched_fit(lowered, utility)] == ["reversed", "reversed"]
    assert [f.verdict for f in finding_matched_fit(primary.drop(columns="learning_rate"), utility)] == ["inconclusive"]


def test_matched_fit_without_overlap_prints_the_nearest_pairs():
    """Rates 1e-3 and 3e-3 give q/k gains 0.01-0.03 and v/o 0.08-0.24: no common gain, so AUC at equal gain is
    untested and the nearest pairs are printed. With v/o's AUC lowered by 0.2, the nearest pair has q/k at a higher
    AUC with less gain: q/k memorize more per unit of fit. Their AUCs overlap, so gain at equal AUC is tested."""
    primary, utility = _ladder(8.0, rates=(1e-3, 3e-3))
    primary = primary.assign(auc=primary.auc - 0.2 * primary.target_modules.isin(["v", "o"]))
    apart = finding_matched_fit(primary, utility)
    assert apart[0].verdict == "inconclusive" and apart[0].test is None
    assert apart[1].scope == "matched fit, gain at equal AUC" and apart[1].verdict == "reversed", apart[1].reason
    reason = apart[0].reason
    assert "cannot be compared" in reason and "v/o 0.0" in reason and "nearest pairs" in reason
    assert "[v] r4 lr0.001 gain 0.08" in reason and "vs [q] r4 lr0.003 gain 0.03" in reason
    assert "q/k memorize more per unit of fit" in reason and apart[0].effect.startswith("untested; nearest pairs")
    said, suggests = nearest_pairs(utility_gain(primary, utility).assign(
        side=lambda f: np.where(f.target_modules.isin(["v", "o"]), "vo", "qk")), n=1)
    assert len(said) == 1 and "every nearest pair q/k" in suggests


def test_matched_differences_by_hand():
    """v/o: gains 0.1, 0.3 with AUC 0.6, 0.8; q/k: gains 0.2, 0.4 with AUC 0.6, 0.7. Common gains 0.2-0.3: v/o's
    AUC 0.7-0.8 (slope 1), q/k's 0.6-0.65 (slope 0.5): mean difference over the evenly spaced grid 0.125. Common
    AUCs 0.6-0.7: v/o's gain 0.1-0.2, q/k's 0.2-0.4: gain(q/k) - gain(v/o) from 0.1 to 0.2, mean 0.15."""
    curves = {"vo": pd.DataFrame({"gain": [0.1, 0.3], "auc": [0.6, 0.8]}),
              "qk": pd.DataFrame({"gain": [0.2, 0.4], "auc": [0.6, 0.7]})}
    auc_at_gain, gain_at_auc = matched_differences(curves)
    assert auc_at_gain == pytest.approx(0.125) and gain_at_auc == pytest.approx(0.15)
    assert matched_differences({"vo": curves["vo"], "qk": curves["qk"].assign(gain=[0.5, 0.6])})[0] is None


def test_finding_one_across_rates_says_where_it_holds_reverses_or_is_inconclusive():
    """v/o - q/k is -0.05 at lr 1e-3, 0 +- noise at 3e-3 and +0.05 at 1e-2, at ranks 1 and 4, over 5 record draws (one
    seed each); an extension trains q/k alone at 3e-2, which is left out of the rate x matrices comparison."""
    rows = []
    for lr, effect in ((1e-3, -0.05), (3e-3, 0.0), (1e-2, 0.05)):
        grid = _grid(effect, 0.004, seeds=(0,), ranks=(1, 4), draws=range(5), seed=int(lr * 1e4))
        rows.append(grid.assign(learning_rate=lr))
    extension = _grid(0.0, 0.004, seeds=(0,), ranks=(4,), draws=range(5))
    rows.append(extension[extension.target_modules.isin(["q", "k"])].assign(learning_rate=3e-2))
    found = finding_value_output(pd.concat(rows, ignore_index=True), pd.DataFrame())
    cells = {f.scope: f.verdict for f in found[:-1]}
    assert set(cells) == {f"rank {r}, lr {lr:g}" for r in (1, 4) for lr in (1e-3, 3e-3, 1e-2)}
    assert cells["rank 1, lr 0.001"] == cells["rank 4, lr 0.001"] == "reversed"
    assert cells["rank 1, lr 0.01"] == cells["rank 4, lr 0.01"] == "holds"
    assert found[0].correction == "Bonferroni over 6 (learning rate, rank) cell(s)"
    assert "5 record draws (df 4), one seed per draw" in found[0].test
    rate_row = found[-1]
    assert rate_row.scope == "rate x matrices" and "3 learning rates common to every matrix set" in rate_row.reason
    assert rate_row.verdict.startswith("reversed at lr 0.001") and "holds at lr 0.01" in rate_row.verdict
    assert "depends on learning rate" in rate_row.reason and "F(2, " in rate_row.reason
    assert "lr 0.03 " not in rate_row.effect and "lr 0.01 +0.04" in rate_row.effect


def test_the_draw_is_the_unit_and_keeps_its_level_where_seeds_would_not():
    """Simulated null (v/o = q/k): each record draw shifts v/o - q/k by its own amount (which records were drawn
    favours one side: sd 0.02), each seed adds little (sd 0.005), 5 draws x 4 seeds. Treating the 20 fine-tunes as
    replicates rejects far more often than 5%; with the draw as the unit (seeds averaged within it) the rejection
    rate stays near 5%."""
    unit_rejects = naive_rejects = 0
    sims = 300
    for sim in range(sims):
        rng = np.random.default_rng(sim)
        rows = []
        for draw in range(5):
            tilt = rng.normal(0, 0.02)
            for seed in range(4):
                for targets, side in (("q", 0), ("v", 1)):
                    rows.append({"method": "lora", "target_modules": targets, "rank": 4, "seed": seed, "draw": draw,
                                 "auc": 0.7 + side * tilt + rng.normal(0, 0.005)})
        frame = pd.DataFrame(rows)
        unit_rejects += finding_value_output(frame, pd.DataFrame())[0].verdict in ("holds", "reversed")
        naive = frame.assign(seed=frame.seed + 10 * frame.draw, draw=0)  # every fine-tune its own replicate
        naive_rejects += finding_value_output(naive, pd.DataFrame())[0].verdict in ("holds", "reversed")
    assert 0.02 <= unit_rejects / sims <= 0.09 and naive_rejects / sims > 0.3


def test_record_level_error_is_inside_the_spread_of_the_draws():
    """Members and non-members drawn anew in each draw (60 a side), scores with a per-record memorability shared by
    both runs of the draw, and no v/o - q/k difference: the AUC difference per draw carries the record-level error
    (what DeLong estimates within a run), and the t over 5 draws keeps its level without adding it again."""
    from sklearn.metrics import roc_auc_score

    rejects, sims = 0, 300
    for sim in range(sims):
        rng = np.random.default_rng(1000 + sim)
        rows = []
        for draw in range(5):
            labels = np.repeat([1, 0], 60)
            memorability = rng.normal(0, 1, 120)
            for targets in ("q", "v"):
                scores = labels * (0.6 + 0.5 * memorability) + rng.normal(0, 1, 120)
                rows.append({"method": "lora", "target_modules": targets, "rank": 4, "seed": 0, "draw": draw,
                             "auc": roc_auc_score(labels, scores)})
        rejects += finding_value_output(pd.DataFrame(rows), pd.DataFrame())[0].verdict in ("holds", "reversed")
    assert 0.02 <= rejects / sims <= 0.09


def test_replicate_units_and_their_nesting():
    one_seed = pd.DataFrame({"draw": [0, 1, 2, 0, 1, 2], "seed": 0, "rank": [1, 1, 1, 4, 4, 4], "auc": range(6)})
    unit = unit_of(one_seed, ["rank"])
    assert unit.name == "record draw" and unit.describe(3) == "3 record draws (df 2), one seed per draw"
    nested = pd.DataFrame({"draw": [0, 0, 1, 1], "seed": [0, 1, 2, 3], "rank": 1, "auc": [0.6, 0.8, 0.5, 0.7]})
    unit = unit_of(nested, ["rank"])
    assert unit.seeds_per_draw == 2 and "seeds nested in draws" in unit.describe(2)
    assert per_unit(nested, ["rank"], ["auc"], unit).auc.tolist() == pytest.approx([0.7, 0.6])
    assert unit_of(nested.assign(draw=0), ["rank"]).name == "seed"
    assert unit_of(nested.assign(draw=0, seed=0), ["rank"]).column is None


def test_members_are_matched_to_the_nearest_non_members_by_base_share_and_length():
    """One run, k = 1: member a (base share 0.1, 20 tokens) matches non-member x (0.1, 21), member b (0.5, 30) matches
    y (0.45, 30), not z (0.9, 10); the member-specific gain is the member's minus its match's. A run with too few
    non-members gets an explicit NaN."""
    members = pd.DataFrame({"run_id": "r", "sample_id": ["a", "b"], "ngram_gain": [0.30, 0.10],
                            "ngram_share_base": [0.1, 0.5], "suffix_len": [20, 30]})
    others = pd.DataFrame({"run_id": "r", "sample_id": ["x", "y", "z"], "ngram_gain": [0.05, 0.20, -0.1],
                           "ngram_share_base": [0.1, 0.45, 0.9], "suffix_len": [21, 30, 10]})
    out = member_specific_gain(members, others, k=1)
    assert out.ngram_gain_matched.tolist() == pytest.approx([0.05, 0.20])
    assert out.ngram_gain_specific.tolist() == pytest.approx([0.25, -0.10])
    two = member_specific_gain(members, others, k=2)  # a: x and y; b: y and x
    assert two.ngram_gain_matched.tolist() == pytest.approx([0.125, 0.125])
    assert member_specific_gain(members, others.iloc[:1], k=2).ngram_gain_specific.isna().all()
    assert outcome_of(out) == "ngram_gain_specific" and outcome_of(out.drop(columns="ngram_gain_specific")) == \
        "ngram_gain"


def test_finding_two_on_the_member_specific_outcome_names_runs_and_draws():
    """2 configurations x 5 record draws: the member-specific gain follows the fine-tuned perplexity's own part; the
    verdict's outcome, its runs (configurations x draws) and the members' excess over matched non-members (a t over
    draws) are in the reason."""
    members = _members(10, 0.0, 0.3)
    members["ngram_gain_specific"] = members.ngram_share - 0.4
    runs = pd.DataFrame({"run_id": [f"r{i}" for i in range(10)], "target_modules": ["v"] * 5 + ["q"] * 5,
                         "rank": 16, "learning_rate": 3e-3, "seed": 0, "draw": list(range(5)) * 2})
    found = finding_perplexity(members, runs=runs)
    assert found.verdict == "holds", found.reason
    assert "n-gram gain over that of non-members matched on base share and length" in found.reason
    assert "(2 configuration(s) x 5 record draw(s))" in found.test and "unit: the run" in found.test
    assert "Members' mean excess gain" in found.reason and "5 record draws (df 4)" in found.reason
    positive = members.assign(ngram_gain_specific=-members.ngram_gain_specific)
    assert finding_perplexity(positive, runs=runs).verdict == "reversed"


def _copies_study(slope: float, draws=range(5)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Exposure rows (fine-tuned and base per run) and canary n-gram shares of [v] r8 at copies 1..32, one seed per
    draw; the fine-tuned exposure and share rise by `slope` per doubling of the copies (plus noise)."""
    rng = np.random.default_rng(3)
    exposure, shares = [], []
    for draw in draws:
        for copies in (1, 2, 4, 8, 16, 32):
            run = f"v-c{copies}-d{draw}"
            ids = {"run_id": run, "target_modules": "v", "rank": 8, "learning_rate": 3e-3, "canary_copies": copies,
                   "seed": 0, "draw": draw}
            base = rng.normal(3, 0.3)
            tuned = base + 1 + slope * np.log2(copies) + rng.normal(0, 0.3)
            exposure += [{**ids, "model": "base", "exposure": base}, {**ids, "model": "finetuned", "exposure": tuned}]
            shares.append({**ids, "ngram_share": float(np.clip(0.2 + slope / 10 * np.log2(copies)
                                                              + rng.normal(0, 0.02), 0, 1))})
    return pd.DataFrame(exposure), pd.DataFrame(shares)


def test_canary_repetition_is_a_verdict_over_record_draws():
    found = finding_copies(*_copies_study(1.5))
    assert found.verdict == "holds" and found.number == 3 and found.scope == "canary copies 1, 2, 4, 8, 16, 32"
    assert "5 record draws (df 4), one seed per draw" in found.test and "exposure" in found.effect
    assert "exposure gained over the base model per doubling" in found.reason
    assert finding_copies(*_copies_study(-1.5)).verdict == "reversed"
    exposure, shares = _copies_study(1.5)
    assert finding_copies(exposure, shares.iloc[0:0]).verdict == "inconclusive"  # extraction not measured
    one = exposure[exposure.canary_copies == 1]
    assert finding_copies(one, shares[shares.canary_copies == 1]) is None  # not a copies study: no row


def test_a_slope_per_draw_by_hand():
    """Values 1, 2, 3 at copies 1, 2, 4 (log2: 0, 1, 2): slope 1 per doubling; two seeds of a draw averaged first."""
    frame = pd.DataFrame({"target_modules": "v", "rank": 8, "learning_rate": 3e-3, "canary_copies": [1, 2, 4, 1, 2, 4],
                          "seed": 0, "draw": [0, 0, 0, 1, 1, 1], "value": [1, 2, 3, 0, 0, 3]})
    assert slopes(frame, "value").slope.tolist() == pytest.approx([1.0, 1.5])


def test_members_excess_and_exposure_gain_by_hand():
    """Excess gains per run: draw 0 runs 0.02 and 0.04 (configurations averaged: 0.03), draw 1 runs 0.01 and 0.03
    (0.02): mean 0.025 over 2 draws. Exposure gain: fine-tuned 7 bits minus base 3 bits = 4."""
    members = pd.DataFrame({"run_id": ["a", "a", "b", "c", "d"], "sample_id": list("vwxyz"),
                            "ngram_gain_specific": [0.01, 0.03, 0.04, 0.01, 0.03]})
    runs = pd.DataFrame({"run_id": list("abcd"), "target_modules": ["v", "q", "v", "q"], "rank": 16,
                         "seed": 0, "draw": [0, 0, 1, 1]})
    said = member_excess(members, runs)
    assert "mean +0.0250" in said and "over 2 record draws (df 1)" in said
    exposure = pd.DataFrame({"run_id": ["r", "r"], "model": ["finetuned", "base"], "exposure": [7.0, 3.0],
                             "canary_copies": 4, "draw": 0})
    assert exposure_gain(exposure).exposure_gain.tolist() == [4.0]


def test_the_run_design_counts_canary_copies_as_configurations():
    """A copies study's runs are configurations (copies) x record draws, not one configuration."""
    from memlens.report.findings import _run_design

    runs = pd.DataFrame({"run_id": [f"r{c}-{d}" for c in (1, 2, 4) for d in range(5)],
                         "target_modules": ["['v']"] * 15, "rank": 8, "learning_rate": 3e-3,
                         "canary_copies": [c for c in (1, 2, 4) for _ in range(5)], "draw": list(range(5)) * 3})
    assert _run_design(runs.run_id, runs) == " (3 configuration(s) x 5 record draw(s))"
