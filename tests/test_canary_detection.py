"""An audit's canaries against their held-out twins: TPR at an FPR set by the held-out canaries with its exact
(Clopper-Pearson) interval, by copies, checked against hand computations; and the audit report's canary section."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from memlens.attacks.canary_metrics import ALL, canary_columns, canary_detection, detection_rate, realised_fpr
from memlens.attacks.registry import configure
from memlens.config import AuditConfig, ExtractionConfig, MIAConfig, ModelConfig, audit_study
from memlens.data.user_canaries import HELD_OUT
from memlens.report.audit import NOT_A_RATE, canaries_section
from memlens.report.inputs import Environment, StudyResults
from memlens.report.section import Table, Text
from memlens.store import StudyFile
from memlens.store.records import AuditRecord


def _tail_at_least(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed by hand."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


def _scores() -> pd.DataFrame:
    """100 held-out canaries scoring 0..99; inserted ones with 1 copy at 99.5, 50, 10 and with 4 at 100, 200, 98;
    two attacks, `loss` the negated `ref_ratio`."""
    held = np.arange(100.0)
    inserted = {"copies1": [99.5, 50.0, 10.0], "copies4": [100.0, 200.0, 98.0]}
    frame = pd.DataFrame({"run_id": "adapter", "canary_id": [f"c{i}" for i in range(106)],
                          "family": [HELD_OUT] * 100 + ["copies4"] * 3 + ["copies1"] * 3,
                          "is_member": [False] * 100 + [True] * 6,
                          "ref_ratio": np.r_[held, inserted["copies4"], inserted["copies1"]]})
    return frame.assign(loss=-frame.ref_ratio)


def test_detection_rate_is_k_of_n_above_the_held_out_threshold_with_clopper_pearson():
    # 1% of 100 held-out canaries: j = floor(0.01 * 101) = 1, the threshold is the largest held-out score (99); 99.5
    # and 120 are above it, 98 and 50 are not: k = 2 of 4
    row = detection_rate(np.array([99.5, 98.0, 50.0, 120.0]), np.arange(100.0), 0.01)
    assert row["threshold"] == 99.0 and row["threshold_rank"] == 1 and row["k"] == 2 and row["tpr"] == 0.5
    assert row["note"] is None
    # Clopper-Pearson: P(X >= 2 | 4, low) = 0.025 and P(X <= 2 | 4, high) = 0.025
    assert _tail_at_least(2, 4, row["tpr_low"]) == pytest.approx(0.025, abs=1e-9)
    assert 1 - _tail_at_least(3, 4, row["tpr_high"]) == pytest.approx(0.025, abs=1e-9)
    assert (round(row["tpr_low"], 4), round(row["tpr_high"], 4)) == (0.0676, 0.9324)
    # all detected: the interval's upper end is 1 and its lower end solves p^n = (1 - level) / 2
    row = detection_rate(np.array([200.0, 300.0, 400.0]), np.arange(100.0), 0.01, level=0.9)
    assert row["k"] == 3 and row["tpr_high"] == 1.0 and row["tpr_low"] == pytest.approx(0.05 ** (1 / 3))
    # 40 held-out canaries cannot set a 1% threshold (its expected FPR would be above 1%): null, with the number
    row = detection_rate(np.array([1.0, 2.0]), np.arange(40.0), 0.01)
    assert np.isnan(row["tpr"]) and row["note"] == "needs >= 99 held-out canaries, has 40"
    assert np.isnan(detection_rate(np.array([1.0]), np.arange(98.0), 0.01)["tpr"])
    assert detection_rate(np.array([1.0]), np.arange(99.0), 0.01)["threshold_rank"] == 1  # 1 / 100: exactly 1%


def _beta_cdf_by_hand(x: float, j: int, n: int) -> float:
    """P(Beta(j, n - j + 1) <= x) = P(Binomial(n, x) >= j): at least j of n uniforms are below x."""
    return _tail_at_least(j, n, x)


@pytest.mark.parametrize(("n", "fpr", "rank", "expected", "upper"), [
    (100, 0.01, 1, 1 / 101, 0.0295), (200, 0.01, 2, 2 / 201, 0.0235), (99, 0.01, 1, 0.01, 0.0298),
    (1000, 0.01, 10, 10 / 1001, 0.0157), (100, 0.1, 10, 10 / 101, 0.1518)])
def test_the_threshold_rules_realised_fpr_is_stated_with_its_order_statistic_bound(n, fpr, rank, expected, upper):
    row = detection_rate(np.array([1e9]), np.arange(float(n)), fpr)
    assert row["threshold_rank"] == rank and row["threshold"] == n - rank  # the rank-th highest of 0..n-1
    assert row["fpr_expected"] == pytest.approx(expected) and row["fpr_expected"] <= fpr + 1e-12
    assert row["fpr_upper"] == pytest.approx(upper, abs=1e-4)
    assert _beta_cdf_by_hand(row["fpr_upper"], rank, n) == pytest.approx(0.95, abs=1e-9)  # a one-sided 95% bound
    # the measurement of the rule it replaces: the 2nd highest of 100 is 2/101 = 1.98% expected, 4.7% bound
    assert realised_fpr(2, 100)[0] == pytest.approx(2 / 101) and realised_fpr(2, 100)[1] == pytest.approx(0.0466,
                                                                                                           abs=1e-4)


def test_the_realised_fpr_holds_on_fresh_twins():
    # Monte Carlo of the rule: draw 100 held-out twins, set the threshold, measure the FPR on a fresh twin pool;
    # over 4,000 draws the mean is 1/101 and 95% of them are below the stated bound
    rng = np.random.default_rng(0)
    held = rng.standard_normal((4000, 100))
    threshold = np.sort(held, axis=1)[:, -1]
    from scipy import stats
    realised = stats.norm.sf(threshold)
    row = detection_rate(np.array([10.0]), held[0], 0.01)
    assert realised.mean() == pytest.approx(row["fpr_expected"], rel=0.05)
    assert (realised <= row["fpr_upper"]).mean() == pytest.approx(0.95, abs=0.01)


def test_canary_detection_by_copies_against_one_held_out_pool():
    found = canary_detection(_scores(), ["ref_ratio", "loss", "lira"])  # lira did not score canaries: skipped
    assert set(found.attack) == {"ref_ratio", "loss"}
    rows = found[found.attack == "ref_ratio"].set_index(["family", "fpr"])
    assert list(dict.fromkeys(rows.index.get_level_values(0))) == ["copies1", "copies4", ALL]  # by copies
    assert (rows.n_held_out == 100).all() and rows.loc[("copies4", 0.01), "n_inserted"] == 3
    # 1% FPR: threshold 99 -> copies1: 99.5 only (1/3); copies4: 100, 200, not 98 (2/3); all: 3/6
    assert [rows.loc[(f, 0.01), "k"] for f in ("copies1", "copies4", ALL)] == [1, 2, 3]
    assert rows.loc[("copies1", 0.01), "tpr_low"] == pytest.approx(1 - 0.975 ** (1 / 3))
    assert rows.loc[("copies4", 0.01), "tpr_high"] == pytest.approx(0.975 ** (1 / 3))
    assert _tail_at_least(3, 6, rows.loc[(ALL, 0.01), "tpr_low"]) == pytest.approx(0.025, abs=1e-9)
    # 10% FPR: j = 10, threshold 90 -> copies1 1/3, copies4 3/3, all 4/6; 0.1% needs 999 held-out canaries
    assert [rows.loc[(f, 0.1), "k"] for f in ("copies1", "copies4", ALL)] == [1, 3, 4]
    assert np.isnan(rows.loc[(ALL, 0.001), "tpr"]) and "needs >= 999 held-out" in rows.loc[(ALL, 0.001), "note"]
    # AUC, ties counting 1/2: copies1 (1 + 50.5/100 + 10.5/100) / 3, copies4 (1 + 1 + 98.5/100) / 3
    assert rows.loc[("copies1", 0.01), "auc"] == pytest.approx((1 + 0.505 + 0.105) / 3)
    assert rows.loc[("copies4", 0.01), "auc"] == pytest.approx((2 + 0.985) / 3)
    assert rows.loc[("copies4", 0.01), "copies"] == 4 and pd.isna(rows.loc[(ALL, 0.01), "copies"])
    loss = found[(found.attack == "loss") & (found.family == ALL) & (found.fpr == 0.01)]
    assert loss.k.iloc[0] == 0 and loss.tpr_low.iloc[0] == 0.0  # negated: no inserted canary above -1
    assert canary_detection(_scores()[lambda f: f.is_member], ["ref_ratio"]).empty  # no held-out: no rate


def test_the_studys_canary_columns_compare_each_copies_with_the_held_out_pool():
    mia = MIAConfig(bootstrap=0)
    columns = canary_columns(_scores(), [configure("ref_ratio")], mia)["ref_ratio"]
    assert not any(HELD_OUT in c for c in columns)  # the pool is no family of its own
    assert columns["canary_copies4_n_members"] == 3 and columns["canary_copies4_n_non_members"] == 100
    assert columns["canary_copies4_tpr_at_1pct_fpr"] == pytest.approx(2 / 3)
    assert columns["canary_copies1_auc"] == pytest.approx((1 + 0.505 + 0.105) / 3)
    # the same rule and interval as the report's, and the rule's realised FPR beside the TPR: one interval a number
    assert columns["canary_copies4_tpr_at_1pct_fpr_high"] == pytest.approx(0.975 ** (1 / 3))  # Clopper-Pearson
    assert columns["canary_copies4_tpr_at_1pct_fpr_fpr_expected"] == pytest.approx(1 / 101)
    assert columns["canary_copies4_tpr_at_1pct_fpr_fpr_upper"] == pytest.approx(1 - 0.05 ** (1 / 100))
    assert not any("boot" in c for c in columns) and "Clopper-Pearson" in columns["canary_intervals"]
    assert columns["canary_copies1_auc_ci_low"] < columns["canary_copies1_auc"] < columns["canary_copies1_auc_ci_high"]


def _audit_folder(root, scores: pd.DataFrame | None, attacks=("ref_ratio", "loss")):
    """What the canary section reads of an audit folder: its canary scores file, its study view and its record."""
    root.mkdir(parents=True, exist_ok=True)
    if scores is not None:
        scores.to_parquet(root / StudyFile.CANARY_SCORES)
    cfg = AuditConfig(target="adapter", members="m.jsonl", non_members="n.jsonl", canaries="c.jsonl")
    study = audit_study(cfg, ModelConfig(name_or_path="base"), MIAConfig(bootstrap=0), ExtractionConfig())
    data = StudyResults(root=root, study=study, results=pd.DataFrame(), mia_scores=pd.DataFrame(),
                        extraction=pd.DataFrame(), environment=Environment())
    record = AuditRecord(name="audit", target="adapter", kind="adapter", run_id="adapter", base={}, method="lora",
                         target_modules=["q"], rank=8, sources={}, n_members=24, n_non_members=24, n_canaries=6,
                         attacks=list(attacks), study=study.model_dump(mode="json"))
    return data, record


def test_the_report_shows_the_rate_by_copies_for_the_headline_and_the_best_attack(tmp_path):
    data, record = _audit_folder(tmp_path / "audit", _scores())
    section = canaries_section(data, record)
    assert (section.headline, section.best) == ("ref_ratio", "ref_ratio")  # ref_ratio heads HEADLINE_ORDER
    flipped = _scores().assign(ref_ratio=lambda f: -f.ref_ratio, loss=lambda f: -f.ref_ratio)
    data, record = _audit_folder(tmp_path / "flipped", flipped)
    section = canaries_section(data, record)
    assert (section.headline, section.best) == ("ref_ratio", "loss")
    table = section.by_copies
    assert list(table.columns) == ["copies", "inserted", "held out", "realised FPR at 1% (bound)",
                                   "TPR at 1% FPR (ref_ratio)", "TPR at 1% FPR (loss)"]
    assert table["realised FPR at 1% (bound)"].tolist() == ["0.99% (<= 2.95%)"] * 3
    assert table.copies.tolist() == [1, 4, ALL] and table.inserted.tolist() == [3, 3, 6]
    assert table["held out"].tolist() == [100, 100, 100]
    low, high = 1 - 0.975 ** (1 / 3), 0.975 ** (1 / 3)  # 2/3's upper end; 1/3's lower end
    assert table["TPR at 1% FPR (loss)"].tolist()[:2] == [f"0.333 (1/3) [{low:.3f}, 0.906]",
                                                          f"0.667 (2/3) [0.094, {high:.3f}]"]
    assert table["TPR at 1% FPR (ref_ratio)"].tolist()[0] == "0.000 (0/3) [0.000, 0.708]"
    texts = [b.text for b in section.blocks() if isinstance(b, Text)]
    assert "100 held-out canaries" in texts[0] and "`loss` scored best of the 2 attacks" in texts[0]
    assert "1st highest held-out score" in texts[1] and "0.99% on average, and at most 2.95% (95% one-sided" in texts[1]
    assert set(section.tables()) >= {"canary_detection"} and len(section.tables()["canary_detection"]) == 18


def test_the_report_says_plainly_when_no_held_out_canary_was_given(tmp_path):
    inserted_only = _scores()[lambda f: f.is_member]
    for scores in (inserted_only, None):
        data, record = _audit_folder(tmp_path / f"audit-{scores is None}", scores)
        section = canaries_section(data, record)
        assert section.detection.empty and section.by_copies.empty
        first = section.blocks()[0]
        assert isinstance(first, Text) and first.text == NOT_A_RATE and first.style == "warn"
        assert "not a detection rate" in first.text and not any(isinstance(b, Table) and b.name == "canary_detection"
                                                                 for b in section.blocks())


def test_few_held_out_canaries_show_ten_percent_too(tmp_path):
    few = _scores()[lambda f: ~f.is_member & (f.ref_ratio < 40) | f.is_member]  # 40 held-out canaries
    data, record = _audit_folder(tmp_path / "few", few, attacks=("ref_ratio",))
    section = canaries_section(data, record)
    assert list(section.by_copies.columns)[3:] == ["realised FPR at 1% (bound)", "realised FPR at 10% (bound)",
                                                   "TPR at 1% FPR (ref_ratio)", "TPR at 10% FPR (ref_ratio)"]
    assert section.by_copies["TPR at 1% FPR (ref_ratio)"].isna().all()
    # 10% of 40: j = floor(4.1) = 4, threshold = 4th largest held-out score (36): every inserted canary but 10 is
    assert section.by_copies["TPR at 10% FPR (ref_ratio)"].str.split(" ").str[1].tolist() == ["(2/3)", "(3/3)",
                                                                                              "(5/6)"]
    assert any("needs at least 99 held-out canaries; this audit has 40" in b.text
               for b in section.blocks() if isinstance(b, Text))
