"""Membership designs (named splits vs a seeded coin), document groups, and a blind check that sees
documents sharing words for what they are."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from memlens.attacks.bow import bag_of_words_baseline
from memlens.config import ConfigError, load_study
from memlens.data import load_study_data
from memlens.report.markdown import write_findings
from memlens.runner import run_study
from memlens.store import StudyLayout, read_results
from memlens.study import normalise_study
from tests.conftest import PHEE, make_study

GROUPS = r"^(\d+)_"


def _clustered_corpus(seed: int = 0, clusters: int = 80, per_cluster: int = 5):
    """Near-duplicate records of `clusters` documents: each document has words of its own, every document
    draws the rest from one shared vocabulary. Documents alternate between the two sides."""
    rng = np.random.default_rng(seed)
    shared = [f"w{i}" for i in range(300)]
    texts, groups, side = [], [], []
    for c in range(clusters):
        own = [f"doc{c}x{j}" for j in range(6)]
        for _ in range(per_cluster):
            words = list(rng.choice(own, 4)) + list(rng.choice(shared, 8))
            texts.append(" ".join(rng.permutation(words)))
            groups.append(str(c))
            side.append(c % 2 == 0)
    frame = pd.DataFrame({"text": texts, "group": groups, "member": side})
    return frame[frame.member], frame[~frame.member]


def test_grouped_folds_do_not_cry_wolf_on_clustered_records():
    members, non_members = _clustered_corpus()
    ungrouped = bag_of_words_baseline(members.text, non_members.text)
    assert ungrouped["biased_split"] and ungrouped["auc"] > 0.7  # random folds: documents recognised
    assert "set data.group" in ungrouped["note"]
    grouped = bag_of_words_baseline(members.text, non_members.text, member_groups=members.group,
                                    non_member_groups=non_members.group)
    assert not grouped["biased_split"] and abs(grouped["auc_grouped_folds"] - 0.5) < 0.12, grouped
    assert grouped["auc"] == grouped["auc_grouped_folds"] and grouped["auc_random_folds"] > 0.7
    assert grouped["grouped"] and grouped["n_groups"] == 80


def test_both_checks_flag_splits_that_really_differ():
    rng = np.random.default_rng(1)
    members, non_members = _clustered_corpus()
    non_members = non_members.assign(text=[t + " " + " ".join(rng.choice(["rash", "dose", "mg"], 3))
                                           for t in non_members.text])  # a shift the splits really have
    for kwargs in ({}, {"member_groups": members.group, "non_member_groups": non_members.group}):
        row = bag_of_words_baseline(members.text, non_members.text, **kwargs)
        assert row["biased_split"] and row["auc"] > 0.9, row


def _random_cfg(**data):
    return load_study(raw={"data": {"source": str(PHEE), "membership": "random", "group": GROUPS, **data},
                           "model": {"name_or_path": "m"}}).data


def test_random_membership_is_seeded_disjoint_fair_and_keeps_documents_whole():
    cfg = _random_cfg()
    first, again = load_study_data(cfg, "random"), load_study_data(cfg, "random")
    pd.testing.assert_frame_equal(first.assignment, again.assignment)
    members, non_members = set(first.members.sample_id), set(first.non_members.sample_id)
    assert not members & non_members and len(members | non_members) == len(first.assignment)
    share = len(members) / (len(members) + len(non_members))
    assert 0.45 < share < 0.55  # a fair coin over ~1,100 abstracts
    sides = first.assignment.groupby("unit_key").is_member.nunique()
    assert (sides == 1).all()  # group-level coin: an abstract is wholly member or wholly non-member
    other = load_study_data(_random_cfg(membership_seed=1), "random")
    assert not other.assignment.is_member.equals(first.assignment.is_member)
    per_record = load_study_data(_random_cfg(membership_unit="record"), "random").assignment
    assert (per_record.groupby("unit_key").size() == 1).all()
    assert (per_record.groupby("group").is_member.nunique() == 2).any()  # abstracts split between sides


def test_membership_config_is_checked():
    with pytest.raises(ConfigError, match="membership_unit: group needs data.group"):
        load_study(raw={"data": {"source": "d", "membership_unit": "group"}, "model": {"name_or_path": "m"}})
    with pytest.raises(ConfigError, match="utility split 'dev' cannot also be in the pool"):
        load_study(raw={"data": {"source": "d", "pool": ["train", "dev"]}, "model": {"name_or_path": "m"}})
    with pytest.raises(ConfigError, match="capturing group"):
        load_study_data(_random_cfg(group=r"^\d+_"), "random")


def test_both_designs_side_by_side_and_the_audit_runs_without_a_declaration(tmp_path):
    study = normalise_study(make_study(
        tmp_path / "out", data={"subset": 24, "membership": ["random", "splits"], "group": GROUPS,
                                "membership_unit": "record"},
        train={"max_steps": 1}, extraction={"enabled": False}))
    cells = study.cells()
    assert [c.membership for c in cells] == ["random", "splits"]
    assert cells[0].run_id(study).split("-")[:5] == ["q", "r2", "c1", "s0", "rand"]
    summary = run_study(study, show_progress=False, report=False)
    assert summary.ok, [o.error for o in summary.failed]
    layout = StudyLayout(study.out_dir)
    results = read_results(layout)
    mia = results[(results.stage == "mia") & (results.attack == "ref_ratio")].set_index("membership")
    assert set(mia.index) == {"random", "splits"}
    bow = results[results.attack == "bag_of_words"].set_index("membership")
    assert bow.grouped.all() and bow.auc_grouped_folds.notna().all()
    audit = results[results.stage == "privacy"].set_index("membership")
    assert audit.loc["random", "valid"] and np.isfinite(audit.loc["random", "eps_lower"])  # memlens' own coins
    assert not audit.loc["splits", "valid"] and np.isnan(audit.loc["splits", "eps_lower"])  # named splits
    coins = pd.read_parquet(layout.membership_file)
    assert set(coins.columns) >= {"sample_id", "is_member", "seed", "unit", "design"}
    members = pd.read_parquet(layout.run_file(cells[0].run_id(study), "members.parquet"))
    assert set(members.sample_id) - {"canary"} <= set(coins[coins.is_member].sample_id)
    # the findings document's setup names where each design's members come from, not only the named splits
    document = write_findings(layout.root, tmp_path / "findings.md").read_text()
    data_row = next(line for line in document.splitlines() if line.startswith("| Data |"))
    assert "(`splits` design)" in data_row and "drawn from `train` (`random` design)" in data_row
