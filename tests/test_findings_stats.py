"""The seed-level and per-run statistics behind the findings' verdicts, on hand-made rows with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from memlens.report.findings import (
    MeanTest,
    finding_perplexity,
    finding_rank,
    finding_value_output,
    partial_correlation,
    per_run_correlations,
    steiger_z,
)


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


def _grid(effect: float, noise: float, seeds=(0, 1, 2), ranks=(1, 4, 16), rank_slope=0.0, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in seeds:
        for targets, shift in (("q", 0.0), ("k", 0.0), ("v", effect), ("o", effect)):
            for rank in ranks:
                auc = 0.6 + shift + rank_slope * np.log2(rank) ** 0.5 + rng.normal(0, noise)
                rows.append({"method": "lora", "target_modules": targets, "rank": rank, "seed": s, "auc": auc,
                             "canary_copies": 1, "membership": "random"})
    return pd.DataFrame(rows)


def test_finding_one_uses_seed_to_seed_variation():
    no_delong = pd.DataFrame()
    holds = finding_value_output(_grid(0.05, 0.005), no_delong)
    assert holds.verdict == "holds" and "seed level" in holds.reason and "per seed 0:" in holds.reason
    assert finding_value_output(_grid(-0.05, 0.005), no_delong).verdict == "does not hold"
    absent = finding_value_output(_grid(0.0, 0.002), no_delong)
    assert absent.verdict == "does not hold", absent.reason
    assert finding_value_output(_grid(0.01, 0.08), no_delong).verdict == "inconclusive"


def test_finding_three_tests_rise_and_slowing_over_seeds():
    # AUC ~ sqrt(log2 rank): rises, with smaller gains per doubling at higher ranks
    found = finding_rank(_grid(0.0, 0.002, ranks=(1, 4, 16, 64), rank_slope=0.05))
    assert found.verdict == "holds" and "seed level" in found.reason
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
