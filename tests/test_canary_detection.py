"""An audit's canaries against their held-out twins: TPR at an FPR set by the held-out canaries with its exact
(Clopper-Pearson) interval, by copies, checked against hand computations; and the audit report's canary section."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from memlens.attacks.canary_metrics import ALL, canary_columns, canary_detection, detection_rate
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
    # 1% of 100 held-out canaries: m = 1, the threshold is the 2nd largest held-out score (98); 99.5 and 120 are
    # above it, 98 is not (a canary must score above the threshold), 50 is not: k = 2 of 4
    row = detection_rate(np.array([99.5, 98.0, 50.0, 120.0]), np.arange(100.0), 0.01)
    assert row["threshold"] == 98.0 and row["k"] == 2 and row["tpr"] == 0.5 and row["note"] is None
    # Clopper-Pearson: P(X >= 2 | 4, low) = 0.025 and P(X <= 2 | 4, high) = 0.025
    assert _tail_at_least(2, 4, row["tpr_low"]) == pytest.approx(0.025, abs=1e-9)
    assert 1 - _tail_at_least(3, 4, row["tpr_high"]) == pytest.approx(0.025, abs=1e-9)
    assert (round(row["tpr_low"], 4), round(row["tpr_high"], 4)) == (0.0676, 0.9324)
    # all detected: the interval's upper end is 1 and its lower end solves p^n = (1 - level) / 2
    row = detection_rate(np.array([200.0, 300.0, 400.0]), np.arange(100.0), 0.01, level=0.9)
    assert row["k"] == 3 and row["tpr_high"] == 1.0 and row["tpr_low"] == pytest.approx(0.05 ** (1 / 3))
    # 40 held-out canaries cannot set a 1% threshold (it would be FPR 0): null, said
    row = detection_rate(np.array([1.0, 2.0]), np.arange(40.0), 0.01)
    assert np.isnan(row["tpr"]) and row["note"] == "needs >= 100 held-out canaries, has 40"


def test_canary_detection_by_copies_against_one_held_out_pool():
    found = canary_detection(_scores(), ["ref_ratio", "loss", "lira"])  # lira did not score canaries: skipped
    assert set(found.attack) == {"ref_ratio", "loss"}
    rows = found[found.attack == "ref_ratio"].set_index(["family", "fpr"])
    assert list(dict.fromkeys(rows.index.get_level_values(0))) == ["copies1", "copies4", ALL]  # by copies
    assert (rows.n_held_out == 100).all() and rows.loc[("copies4", 0.01), "n_inserted"] == 3
    # 1% FPR: threshold 98 -> copies1: 99.5 only (1/3); copies4: 100, 200, not 98 (2/3); all: 3/6
    assert [rows.loc[(f, 0.01), "k"] for f in ("copies1", "copies4", ALL)] == [1, 2, 3]
    assert rows.loc[("copies1", 0.01), "tpr_low"] == pytest.approx(1 - 0.975 ** (1 / 3))
    assert rows.loc[("copies4", 0.01), "tpr_high"] == pytest.approx(0.975 ** (1 / 3))
    assert _tail_at_least(3, 6, rows.loc[(ALL, 0.01), "tpr_low"]) == pytest.approx(0.025, abs=1e-9)
    # 10% FPR: m = 10, threshold 89 -> copies1 1/3, copies4 3/3, all 4/6; 0.1% needs 1,000 held-out canaries
    assert [rows.loc[(f, 0.1), "k"] for f in ("copies1", "copies4", ALL)] == [1, 3, 4]
    assert np.isnan(rows.loc[(ALL, 0.001), "tpr"]) and "needs >= 1000 held-out" in rows.loc[(ALL, 0.001), "note"]
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
    assert list(table.columns) == ["copies", "inserted", "held out", "TPR at 1% FPR (ref_ratio)",
                                   "TPR at 1% FPR (loss)"]
    assert table.copies.tolist() == [1, 4, ALL] and table.inserted.tolist() == [3, 3, 6]
    assert table["held out"].tolist() == [100, 100, 100]
    low, high = 1 - 0.975 ** (1 / 3), 0.975 ** (1 / 3)  # 2/3's upper end; 1/3's lower end
    assert table["TPR at 1% FPR (loss)"].tolist()[:2] == [f"0.333 (1/3) [{low:.3f}, 0.906]",
                                                          f"0.667 (2/3) [0.094, {high:.3f}]"]
    assert table["TPR at 1% FPR (ref_ratio)"].tolist()[0] == "0.000 (0/3) [0.000, 0.708]"
    texts = [b.text for b in section.blocks() if isinstance(b, Text)]
    assert "100 held-out canaries" in texts[0] and "`loss` scored best of the 2 attacks" in texts[0]
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
    assert list(section.by_copies.columns)[3:] == ["TPR at 1% FPR (ref_ratio)", "TPR at 10% FPR (ref_ratio)"]
    assert section.by_copies["TPR at 1% FPR (ref_ratio)"].isna().all()
    # 10% of 40: m = 4, threshold = 5th largest held-out score (35): every inserted canary but 10 is above
    assert section.by_copies["TPR at 10% FPR (ref_ratio)"].str.split(" ").str[1].tolist() == ["(2/3)", "(3/3)",
                                                                                              "(5/6)"]
    assert any("needs at least 100 held-out canaries; this audit has 40" in b.text
               for b in section.blocks() if isinstance(b, Text))
