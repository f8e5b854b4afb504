"""One-run empirical epsilon lower bound (Steinke, Nasr & Jagielski 2023)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import special, stats

from memlens.attacks.privacy_audit import run_privacy_audit
from memlens.context import StudyContext
from memlens.metrics.privacy import epsilon_lower_bound, one_run_epsilon_lower_bound, p_value_dp_audit
from memlens.store import RunFile, StudyLayout, read_results
from memlens.store.records import CellRecord, TrainRecord
from tests.conftest import make_study


def test_p_value_is_the_binomial_tail_without_delta_and_grows_with_eps_and_delta():
    assert p_value_dp_audit(100, 40, 30, 1.0, 0.0) == pytest.approx(stats.binom.sf(29, 40, special.expit(1.0)))
    values = [p_value_dp_audit(100, 40, 30, e, 1e-4) for e in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values)
    assert p_value_dp_audit(100, 40, 30, 0.5, 1e-3) > p_value_dp_audit(100, 40, 30, 0.5, 0.0)
    with pytest.raises(ValueError):
        p_value_dp_audit(10, 20, 5, 1.0, 0.0)


def test_all_correct_guesses_give_the_closed_form_bound():
    # delta = 0 and v = r: P[Bin(r, q) >= r] = q^r = alpha  <=>  eps = logit(alpha^(1/r))
    r, alpha = 50, 0.05
    assert epsilon_lower_bound(1000, r, r, 0.0, alpha) == pytest.approx(special.logit(alpha ** (1 / r)), abs=1e-5)
    assert epsilon_lower_bound(1000, r, r // 2, 0.0, alpha) == 0.0  # chance-level guessing proves nothing


def test_bound_holds_for_an_eps_dp_mechanism():
    """Randomized response is exactly eps-DP: each guess is right with probability e^eps / (1 + e^eps). The
    95% lower bound may exceed the true eps in at most ~5% of audits."""
    eps, m, trials = 1.0, 400, 100
    rng = np.random.default_rng(0)
    over, bounds = 0, []
    for _ in range(trials):
        is_member = rng.random(m) < 0.5
        right = rng.random(m) < special.expit(eps)
        guess_member = np.where(right, is_member, ~is_member)
        scores = guess_member + rng.random(m) * 0.01  # the auditor ranks records by its guess
        out = one_run_epsilon_lower_bound(scores, is_member, delta=0.0, random_split=True, guesses=[(50, 50)])
        over += out["eps_lower"] > eps
        bounds.append(out["eps_lower"])
    assert over / trials <= 0.1
    assert np.mean(bounds) > 0.3  # not vacuous: the audit does detect most of the leakage


def test_random_split_is_required_and_bonferroni_applies():
    rng = np.random.default_rng(1)
    is_member = rng.random(200) < 0.5
    scores = is_member + rng.normal(0, 0.3, 200)
    one = one_run_epsilon_lower_bound(scores, is_member, delta=1e-5, random_split=True, guesses=[(20, 20)])
    assert one["valid"] and one["eps_lower"] > 0.5 and one["n_guesses"] == 40
    assert 0 <= one["n_correct"] <= 40 and one["guess_accuracy"] == one["n_correct"] / 40
    many = one_run_epsilon_lower_bound(scores, is_member, delta=1e-5, random_split=True,
                                       guesses=[(20, 20), (21, 21), (22, 22), (19, 19)])
    assert many["n_options"] == 4 and many["confidence"] == 0.95
    not_random = one_run_epsilon_lower_bound(scores, is_member, delta=1e-5, random_split=False)
    assert not not_random["valid"] and math.isnan(not_random["eps_lower"]) and "coin flip" in not_random["note"]
    with pytest.raises(ValueError, match="guesses"):
        one_run_epsilon_lower_bound(scores, is_member, delta=1e-5, random_split=True, guesses=[(150, 100)])


def _fake_run(study, cell, dp: dict | None, scores: pd.DataFrame) -> str:
    """A finished run of `cell` (its records, not its model: the audit reads scores and train.json)."""
    layout, run_id = StudyLayout(study.out_dir), cell.run_id(study)
    run_dir = layout.run_dir(run_id)
    run_dir.mkdir(parents=True)
    CellRecord.model_validate({"run_id": run_id, **cell.determinants(study)}).save(
        layout.run_file(run_id, RunFile.CELL))
    train = {"run_id": run_id, "seed": 0, "canary": {}, "trainable_params": 10, "total_params": 100,
             "trainable_pct": 10.0, "n_train_records": 100}
    if dp:
        train["dp"] = dp
    TrainRecord.model_validate(train).save(layout.run_file(run_id, RunFile.TRAIN))
    scores.assign(run_id=run_id).to_parquet(run_dir / "mia_scores.parquet")
    return run_id


def test_privacy_stage_writes_epsilon_and_bound_rows(tmp_path):
    rng = np.random.default_rng(2)
    is_member = rng.random(200) < 0.5
    scores = pd.DataFrame({"sample_id": [str(i) for i in range(200)], "is_member": is_member,
                           "ref_ratio": is_member * 2.0 + rng.normal(0, 0.5, 200), "loss": rng.normal(size=200)})
    # the audit's delta: the DP run's own, else dp.delta. (The default 1/n^1.1 would make the bound vacuous
    # here: its 2 m delta term is > 1 when the audited records are about as many as the training records.)
    grid = {"noise_multiplier": [None, 1.1]}
    study = make_study(tmp_path, grid=grid, dp={"audit_random_split": True, "delta": 1e-6})
    layout = StudyLayout(study.out_dir)
    dp = {"epsilon": 3.2, "delta": 1e-5, "noise_multiplier": 1.1, "accountant": "prv"}
    plain_cell, dp_cell = study.cells()
    dp_run, plain_run = _fake_run(study, dp_cell, dp, scores), _fake_run(study, plain_cell, None, scores)
    rows = run_privacy_audit(StudyContext(study)).set_index("run_id")
    assert rows.loc[dp_run, "epsilon"] == 3.2 and rows.loc[dp_run, "delta"] == 1e-5
    assert math.isnan(rows.loc[plain_run, "epsilon"]) and rows.loc[plain_run, "epsilon_note"]
    assert rows.loc[plain_run, "eps_lower"] > 1.0  # well separated scores on a declared random split
    assert rows.loc[plain_run, "delta"] == 1e-6
    stored = read_results(layout)
    assert set(stored[stored.stage == "privacy"].run_id) == {dp_run, plain_run}
    # a study that does not declare a random split gets no bound, and an unknown score is an error
    # (the audit settings are not part of the run ids: the same runs)
    strict = StudyContext(make_study(tmp_path, grid=grid))
    strict_rows = run_privacy_audit(strict).set_index("run_id")
    assert strict_rows.eps_lower.isna().all()
    assert strict_rows.loc[plain_run, "delta"] == pytest.approx(1 / 100 ** 1.1)  # default 1/n^1.1
    with pytest.raises(ValueError, match="zlib"):
        run_privacy_audit(strict, attack="zlib")


# ------------------------------------------------------------------- Gaussian DP (Mahloujifar et al. 2024)
def _gdp_margin_by_hand(mu: float, m: int, r: int, v: int, alpha: float) -> float:
    """The f-DP audit's recursion written out again with scipy.stats.norm (PrivacyGuard's formulation)."""
    tau = alpha * r / m
    rr, hh = [0.0] * (v + 1), [0.0] * (v + 1)
    rr[v], hh[v] = tau * v / r, tau * (r - v) / r
    for i in range(v - 1, -1, -1):
        inverse = stats.norm.cdf(stats.norm.ppf(min(rr[i + 1], 1.0)) - mu)
        hh[i] = max(hh[i + 1], inverse)
        rr[i] = rr[i + 1] + i / (r - i) * (hh[i] - hh[i + 1])
    return rr[0] + hh[0] - r / m


@pytest.mark.parametrize("m,r,v", [(1000, 100, 100), (1000, 100, 80), (400, 60, 45), (200, 200, 150)])
def test_gdp_lower_bound_against_a_grid_search(m, r, v):
    """mu_lower is where the audit stops rejecting mu-GDP: the recursion written out again rejects every mu on a
    grid below it and none above it, and is 0 at it."""
    from memlens.metrics.privacy import gdp_lower_bound

    mu = gdp_lower_bound(m, r, v, 0.05)
    assert 0 < mu < 4
    offsets = np.array([0.3, 0.05, 0.003])
    assert all(_gdp_margin_by_hand(g, m, r, v, 0.05) > 0 for g in np.r_[0.0, mu - offsets] if g >= 0)
    assert all(_gdp_margin_by_hand(g, m, r, v, 0.05) <= 0 for g in mu + offsets)
    assert _gdp_margin_by_hand(mu, m, r, v, 0.05) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("mu,delta", [(0.5, 1e-5), (1.0, 1e-5), (2.0, 1e-6), (3.0, 1e-3)])
def test_gdp_epsilon_against_a_direct_root_find(mu, delta):
    """eps(mu, delta) of mu-GDP: the root of Dong, Roth & Su's delta(eps) = delta, found by scipy's bisection."""
    from scipy import optimize

    from memlens.metrics.privacy import gdp_epsilon

    def delta_of(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)

    root = optimize.root_scalar(lambda e: delta_of(e) - delta, bracket=[0, 100], method="bisect", xtol=1e-12).root
    assert gdp_epsilon(mu, delta) == pytest.approx(root, abs=1e-6)
    assert gdp_epsilon(0.0, delta) == 0.0


def _audit(scores, members, guesses=((50, 50),)):
    return one_run_epsilon_lower_bound(scores, members, delta=1e-5, random_split=True, guesses=list(guesses))


def test_both_bounds_on_a_perfectly_private_and_a_perfectly_leaky_run():
    rng = np.random.default_rng(3)
    private, leaky = [], []
    for _ in range(20):
        members = rng.random(1000) < 0.5
        private.append(_audit(rng.normal(size=1000), members))  # scores independent of membership
        leaky.append(_audit(members + rng.random(1000) * 0.01, members))  # scores are membership
    for key in ("eps_lower", "eps_lower_gdp"):
        values = np.array([a[key] for a in private])
        assert (values <= 0.3).mean() >= 0.9 and np.median(values) == 0.0  # near 0, 0 in most runs
        assert min(a[key] for a in leaky) > 3.0
    assert all(a["n_correct"] == 100 for a in leaky)
    assert all(a["eps_lower_gdp"] >= a["eps_lower"] for a in leaky)


def test_gdp_bound_holds_for_a_gdp_mechanism_and_is_at_least_steinkes_at_equal_guesses():
    """Scores mu * membership + N(0, 1) make each record's audit exactly mu-GDP: mu_lower exceeds mu in at most
    ~5% of audits, and from the same guesses the GDP bound is the tighter of the two."""
    rng = np.random.default_rng(4)
    for mu in (1.0, 2.0):
        audits = []
        for _ in range(20):
            members = rng.random(1000) < 0.5
            audits.append(_audit(mu * members + rng.normal(size=1000), members))
        assert np.mean([a["mu_lower_gdp"] > mu for a in audits]) <= 0.1
        assert all(a["eps_lower_gdp"] >= a["eps_lower"] > 0 for a in audits)
        assert all((a["gdp_k_plus"], a["gdp_k_minus"]) == (a["k_plus"], a["k_minus"]) for a in audits)


def test_privacy_stage_audits_the_designed_canaries_of_a_run(tmp_path):
    rng = np.random.default_rng(5)
    records = pd.DataFrame({"sample_id": [str(i) for i in range(100)], "is_member": rng.random(100) < 0.5,
                            "ref_ratio": rng.normal(size=100)})
    study = make_study(tmp_path, grid={"noise_multiplier": [1.1]}, dp={"audit_canaries": 300, "delta": 1e-6})
    (cell,) = study.cells()
    dp = {"epsilon": 8.0, "delta": 1e-6, "noise_multiplier": 1.1, "accountant": "prv"}
    run_id = _fake_run(study, cell, dp, records)
    layout = StudyLayout(study.out_dir)
    inserted = rng.random(300) < 0.5
    canaries = pd.DataFrame({"canary_id": [f"c{i}" for i in range(300)], "is_member": inserted,
                             "family": np.where(np.arange(300) % 2, "random", "rare_unigram"),
                             "ref_ratio": inserted * 3.0 + rng.normal(size=300)})  # canaries that leak
    canaries.to_parquet(layout.run_file(run_id, RunFile.CANARY_SCORES))
    train = TrainRecord.load(layout.run_file(run_id, RunFile.TRAIN))
    train.audit_canaries = {"copies": 2}
    train.save(layout.run_file(run_id, RunFile.TRAIN))
    rows = run_privacy_audit(StudyContext(study)).set_index("attack")
    assert rows.loc["dp_audit", "n_audited"] == 100 and rows.loc["dp_audit_canaries", "n_audited"] == 300
    canary = rows.loc["dp_audit_canaries"]
    assert canary.epsilon == 8.0 and canary.audit_design == "rare_unigram,random" and canary.audit_copies == 2
    assert 0 < canary.eps_lower <= canary.eps_lower_gdp < 8.0  # valid by construction: memlens flipped the coins
    assert "2-record group privacy" in canary.note
