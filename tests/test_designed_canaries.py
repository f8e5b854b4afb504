"""Designed canaries (dp.audit_canaries): reproducible from the seed, each family what it says, inserted into
training exactly where the coin says, scored and audited through a study, written for a user's training script."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from memlens.attacks.registry import check_attacks
from memlens.config import ConfigError
from memlens.data.designed_canaries import (
    CANARY_TOKENS,
    design_canaries,
    insert_canaries,
    read_canary_file,
    write_canary_file,
)
from memlens.report import analyse
from memlens.store import RunFile, StudyFile, StudyLayout, read_results

from .conftest import LLAMA_TINY, PHEE, make_study

FAMILIES = ["rare_unigram", "rare_bigram", "random"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(LLAMA_TINY)


@pytest.fixture(scope="module")
def texts():
    return pd.read_json(PHEE / "train.jsonl", lines=True).context.tolist()[:300]


def test_canaries_are_reproducible_from_the_seed_and_each_family_is_what_it_says(tokenizer, texts):
    canaries = design_canaries(tokenizer, texts, 60, FAMILIES, seed=7)
    pd.testing.assert_frame_equal(canaries, design_canaries(tokenizer, texts, 60, FAMILIES, seed=7))
    other = design_canaries(tokenizer, texts, 60, FAMILIES, seed=8)
    assert not set(canaries.text) & set(other.text) and (canaries.is_member != other.is_member).any()
    assert list(canaries.family[:6]) == FAMILIES * 2  # dealt in turn
    assert canaries.text.is_unique and canaries.canary_id.is_unique and 15 <= canaries.is_member.sum() <= 45
    records = tokenizer(texts, add_special_tokens=False)["input_ids"]
    used = {t for r in records for t in r}
    pairs = {(a, b) for r in records for a, b in zip(r, r[1:])}
    for row in canaries.itertuples():
        ids = tokenizer(row.text, add_special_tokens=False)["input_ids"]
        assert len(ids) == CANARY_TOKENS == row.n_tokens  # the text is its tokens
        if row.family == "rare_unigram":
            assert not set(ids) & used  # tokens these records never use
        if row.family == "rare_bigram":
            assert set(ids) <= used and not set(zip(ids, ids[1:])) & pairs  # used tokens, unused pairs
    rare = [t for text in canaries.text[canaries.family == "rare_unigram"]
            for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert len(set(rare)) == len(rare)  # dealt: no token shared while unused ones remain


def test_new_token_family_needs_a_tokenizer_with_unused_tokens(tokenizer, texts):
    with pytest.raises(ConfigError, match="new_token"):
        design_canaries(tokenizer, texts, 4, ["new_token"], seed=0)
    reserved = AutoTokenizer.from_pretrained(LLAMA_TINY)
    reserved.add_tokens([f"<|reserved_{i}|>" for i in range(8)], special_tokens=True)
    canaries = design_canaries(reserved, texts, 4, ["new_token"], seed=0)
    new_ids = set(range(len(tokenizer), len(reserved)))
    for text in canaries.text:
        assert set(reserved(text, add_special_tokens=False)["input_ids"]) <= new_ids


def test_insertion_follows_the_coin_and_the_user_file_round_trips(tokenizer, texts, tmp_path):
    canaries = design_canaries(tokenizer, texts, 30, FAMILIES, seed=0)
    planted = insert_canaries(texts[:5], canaries, copies=3)
    counts = pd.Series(planted).value_counts()
    for row in canaries.itertuples():
        assert counts.get(row.text, 0) == (3 if row.is_member else 0)
    assert planted[:5] == texts[:5] and len(planted) == 5 + 3 * canaries.is_member.sum()
    path = write_canary_file(tmp_path / "canaries.jsonl", canaries, copies=3)
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"canary_id", "family", "text", "insert", "copies"} and first["copies"] == 3
    back = read_canary_file(path)
    pd.testing.assert_frame_equal(back.drop(columns="copies"), canaries[["canary_id", "family", "text", "is_member"]])
    path.write_text('{"canary_id": "x"}\n')
    with pytest.raises(ConfigError, match="line 1"):
        read_canary_file(path)


def test_a_study_trains_scores_and_audits_its_canaries(tmp_path, monkeypatch):
    """Through run_study: the fine-tune trains exactly the canaries whose coin came up (2 copies each), the membership
    stage scores every canary with the run's adapter and adds per-family columns, the audit row bounds epsilon."""
    import memlens
    from memlens.train import finetune

    trained: list[list[str]] = []
    tokenize = finetune.tokenize_records
    monkeypatch.setattr(finetune, "tokenize_records", lambda texts, *a, **k: trained.append(texts) or tokenize(
        texts, *a, **k))
    study = make_study(tmp_path / "study", data={"subset": 32, "membership": ["random"]},
                       dp={"audit_canaries": 24, "audit_copies": 2},
                       mia={"bootstrap": 20, "attacks": ["ref_ratio", "ez_mia", "wbc"], "bag_of_words_baseline": False},
                       extraction={"enabled": False})
    summary = memlens.run_study(study, show_progress=False, report=False)
    assert summary.ok, [o.error for o in summary.failed]
    layout = StudyLayout(study.out_dir)
    (run_id,) = layout.finished_runs()
    canaries = pd.read_parquet(layout.run_file(run_id, RunFile.AUDIT_CANARIES))
    assert len(canaries) == 24
    counts = pd.Series(trained[-1]).value_counts()  # the first call is the pre-run length check
    assert all(counts.get(t, 0) == (2 if m else 0) for t, m in zip(canaries.text, canaries.is_member))
    study_level = pd.read_parquet(layout.study_level(StudyFile.AUDIT_CANARIES))
    assert list(study_level.membership.unique()) == ["random"] and len(study_level) == 24

    scores = pd.read_parquet(layout.run_file(run_id, RunFile.CANARY_SCORES))
    assert list(scores.canary_id) == list(canaries.canary_id) and np.isfinite(scores[["ez_mia", "wbc"]]).all().all()
    results = read_results(layout)
    row = results[(results.stage == "mia") & (results.attack == "ez_mia")].iloc[0]
    assert 0 <= row.canary_rare_unigram_auc <= 1 and row.canary_rare_unigram_n_members + \
        row.canary_rare_unigram_n_non_members == 8
    assert np.isnan(row.canary_rare_unigram_tpr_at_1pct_fpr)  # 100 held-out canaries needed: null, with why
    assert "held-out canaries" in row.canary_rare_unigram_tpr_at_1pct_fpr_note
    audit = results[(results.stage == "privacy") & (results.attack == "dp_audit_canaries")].iloc[0]
    assert audit.n_audited == 24 and audit.eps_lower >= 0 and audit.eps_lower_gdp >= 0
    assert "group privacy" in audit.note  # 2 copies
    section = analyse(layout.root).canary_audit  # the report's records-vs-canaries and bounds tables
    assert section.omitted is None and section.families == ["random", "rare_bigram", "rare_unigram"]
    assert set(section.tprs.attack) == {"ez_mia", "ref_ratio", "wbc"} and section.tpr_data.n_runs.eq(1).all()
    assert len(section.bounds) == 1 and not section.bounds.above_epsilon.any()
    said = section.blocks()[0].text  # which interval each TPR has: one per number
    assert "the records' a bootstrap interval, the canaries' Clopper-Pearson's" in said


def test_the_audit_attack_must_score_canaries():
    study = make_study("/nonexistent", mia={"attacks": ["ref_ratio", "lira"], "references": 2},
                       dp={"audit_attack": "lira", "audit_canaries": 10})
    with pytest.raises(ConfigError, match="cannot score the designed canaries"):
        check_attacks(study)
    check_attacks(study.model_copy(update={"dp": study.dp.model_copy(update={"audit_canaries": 0})}))
