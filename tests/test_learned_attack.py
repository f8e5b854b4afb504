"""The learned attack (LT-MIA, memlens.attacks.learned): its features against a hand computation, the classifier's
shapes, the shipped weights in a study and an audit, retraining from a study folder, and the flag on records the
weights were trained on."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import memlens
from memlens.attacks.learned import (
    DEFAULT_WEIGHTS,
    FEATURES,
    SequenceClassifier,
    card_path,
    load_weights,
    pad_features,
    save_weights,
    text_hash,
    token_features,
)
from memlens.attacks.learned_training import collect, train_weights
from memlens.attacks.mia import trained_on_column
from memlens.cli import app
from memlens.config import ConfigError
from memlens.data import load_study_data
from memlens.runner import run_study
from memlens.score import SequenceStats
from memlens.store import StudyLayout, read_results

from .conftest import make_study


def _stats(logprob, mu, sigma2, top1=None) -> SequenceStats:
    """Two records: the first two tokens, then the third."""
    f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
    return SequenceStats(np.array([0, 2, 3]), np.array([5, 6, 7]), f32(logprob), f32(mu), f32(sigma2),
                         None if top1 is None else np.asarray(top1, bool))


def test_features_by_hand():
    ft = _stats([-1.0, -2.0, -0.5], [-1.5, -3.0, -1.0], [0.25, 4.0, 1.0], [True, False, True])
    base = _stats([-2.0, -2.5, -0.5], [-2.0, -2.0, -2.0], [1.0, 1.0, 0.0])
    flat, offsets = token_features(ft, base)
    assert flat.shape == (3, len(FEATURES)) and offsets.tolist() == [0, 2, 3]
    # token 0: ft z = (-1 - -1.5) / sqrt(0.25) = 1; base z = (-2 - -2) / 1 = 0
    eps = 1e-6
    z_ft = [0.5 / math.sqrt(0.25 + eps), 1.0 / math.sqrt(4 + eps), 0.5 / math.sqrt(1 + eps)]
    z_base = [0.0, -0.5 / math.sqrt(1 + eps), 1.5 / math.sqrt(eps)]
    expected = {
        "logprob_ft": [-1.0, -2.0, -0.5], "logprob_base": [-2.0, -2.5, -0.5], "logprob_diff": [1.0, 0.5, 0.0],
        "z_ft": z_ft, "z_base": z_base, "z_diff": np.subtract(z_ft, z_base),
        "entropy_ft": [1.5, 3.0, 1.0], "entropy_base": [2.0, 2.0, 2.0], "entropy_diff": [-0.5, 1.0, -1.0],
        "sd_ft": [0.5, 2.0, 1.0], "sd_base": [1.0, 1.0, 0.0], "top1_ft": [1.0, 0.0, 1.0]}
    for name, values in expected.items():
        np.testing.assert_allclose(flat[:, FEATURES.index(name)], values, rtol=1e-5, err_msg=name)


def test_features_refuse_statistics_without_moments_or_other_tokens():
    ft = _stats([-1.0, -2.0, -0.5], [np.nan] * 3, [np.nan] * 3, [True, False, True])
    base = _stats([-2.0, -2.5, -0.5], [-2.0] * 3, [1.0] * 3)
    with pytest.raises(RuntimeError, match="moments"):
        token_features(ft, base)
    other = SequenceStats(np.array([0, 1, 3]), *(np.zeros(3, np.float32) for _ in range(4)))
    with pytest.raises(RuntimeError, match="same tokens"):
        token_features(_stats([-1.0] * 3, [-1.0] * 3, [1.0] * 3, [True] * 3), other)


def test_classifier_shapes_and_padding():
    torch.manual_seed(0)
    model = SequenceClassifier(len(FEATURES), hidden=8, kernel=3).eval()
    rng = np.random.default_rng(0)
    flat = rng.normal(size=(9, len(FEATURES))).astype(np.float32)
    offsets = np.array([0, 4, 9, 9])  # the last record has no token
    x, mask = pad_features(flat, offsets)
    assert x.shape == (3, 5, len(FEATURES)) and mask.shape == (3, 5) and mask.sum().item() == 9
    logits = model(x, mask)
    assert logits.shape == (3,)
    assert torch.isfinite(logits[:2]).all() and torch.isnan(logits[2])
    # more padding changes no record's logit
    wide = torch.cat([x, torch.randn(3, 4, len(FEATURES))], dim=1)
    wide_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model(wide, wide_mask)[:2], logits[:2])
    alone = model(*pad_features(flat, offsets, np.array([0])))
    torch.testing.assert_close(alone, logits[:1])


def test_weights_round_trip_and_a_card_that_does_not_match(tmp_path):
    model = SequenceClassifier(len(FEATURES), hidden=4, kernel=3)
    path = save_weights(model, tmp_path / "w.safetensors", {"record_sha256": [text_hash("a record")]})
    loaded = load_weights(path)
    assert loaded.trained_on == {text_hash("a record")} and loaded.model.hidden == 4
    card = json.loads(card_path(path).read_text())
    card["weights_sha256"] = "0" * 64
    card_path(path).write_text(json.dumps(card))
    with pytest.raises(ConfigError, match="does not match its card"):
        load_weights(path)
    card_path(path).unlink()
    with pytest.raises(ConfigError, match="no card"):
        load_weights(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_weights(tmp_path / "missing.safetensors")


def test_the_shipped_weights_load_offline_with_their_card():
    weights = load_weights()
    assert weights.path == DEFAULT_WEIGHTS and DEFAULT_WEIGHTS.stat().st_size < 4_000_000
    held_out = weights.card["holdout"]["evaluations"][0]
    assert weights.card["trained_on"]["runs"] > 0 and held_out["figures"]["learned (conv1d)"]["auc"] > 0.5
    assert len(weights.trained_on) > 0 and weights.label.startswith("default (sha256 ")


@pytest.fixture(scope="module")
def study_folder(tmp_path_factory):
    """A finished two-run llama-tiny study scored by the shipped weights (and loss)."""
    root = tmp_path_factory.mktemp("learned")
    study = make_study(root / "study", data={"subset": 24, "utility_split": None},
                       grid={"target_modules": [["q"], ["v"]], "rank": [4]},
                       train={"epochs": 2, "learning_rate": 0.01, "batch_size": 8},
                       mia={"bootstrap": 0, "attacks": ["loss", "ref_ratio", "learned"],
                            "bag_of_words_baseline": False},
                       extraction={"enabled": False})
    summary = run_study(study, report=False, show_progress=False)
    assert summary.ok, [o.error for o in summary.failed]
    return study


def test_the_shipped_weights_score_a_study(study_folder):
    layout = StudyLayout(study_folder.out_dir)
    rows = read_results(layout)
    rows = rows[(rows.stage == "mia") & (rows.attack == "learned")]
    assert len(rows) == 2 and rows.auc.between(0, 1).all()
    assert rows.attack_weights.str.startswith("default (sha256 ").all()
    scores = pd.read_parquet(layout.study_level("mia_scores.parquet"))
    assert np.isfinite(scores.learned).all()
    seen, texts = load_weights().trained_on, _texts_by_id(study_folder)
    expected = np.array([text_hash(texts[s]) in seen for s in scores.sample_id])
    np.testing.assert_array_equal(scores[trained_on_column("learned")].to_numpy(), expected)


def _texts_by_id(study) -> dict[str, str]:
    data = load_study_data(study.data)
    texts = dict(zip(data.members.sample_id.astype(str), data.members.text))
    texts.update(zip(data.non_members.sample_id.astype(str), data.non_members.text))
    for run_id in StudyLayout(study.out_dir).finished_runs():  # the inserted canary
        members = pd.read_parquet(StudyLayout(study.out_dir).run_file(run_id, "members.parquet"))
        texts.update(zip(members.sample_id.astype(str), members.text))
    return texts


def test_retraining_from_a_study_folder_and_the_flag_on_records_it_saw(study_folder, tmp_path):
    folder = study_folder.out_dir
    out = tmp_path / "mine.safetensors"
    result = CliRunner().invoke(app, ["learned-attack", "train", str(folder), "--out", str(out), "--epochs", "2"])
    assert result.exit_code == 0, result.output
    card = json.loads(card_path(out).read_text())
    parts = collect([folder])
    assert card["trained_on"]["runs"] == 2 and card["trained_on"]["records_scored"] == sum(len(p) for p in parts)
    assert set(card["record_sha256"]) == {h for p in parts for h in p.text_sha256}
    # a study of the same records scored by these weights flags every record and says which weights scored it
    again = study_folder.model_copy(update={"out": str(tmp_path / "again")})
    again = again.model_copy(update={"mia": again.mia.model_copy(update={"attacks": [
        "loss", "ref_ratio", {"type": "learned", "params": {"weights": str(out)}, "name": "mine"}]})})
    summary = run_study(again, report=False, show_progress=False)
    assert summary.ok, [o.error for o in summary.failed]
    rows = read_results(StudyLayout(again.out_dir))
    mine = rows[(rows.stage == "mia") & (rows.attack == "mine")]
    assert (mine.trained_on_records > 0).all() and mine.note.str.contains("not a held-out measurement").all()
    assert mine.attack_weights.str.contains(str(out)).all()
    scores = pd.read_parquet(StudyLayout(again.out_dir).study_level("mia_scores.parquet"))
    non_canary = ~scores.is_canary
    assert scores.loc[non_canary, trained_on_column("mine")].all()


def test_the_python_call_trains_the_same_way(study_folder, tmp_path):
    path = train_weights([study_folder.out_dir], tmp_path / "w.safetensors", epochs=1)
    assert load_weights(path).card["training"]["epochs"] == 1
    with pytest.raises(ConfigError, match="nothing to learn from"):
        train_weights([tmp_path / "empty"], tmp_path / "x.safetensors", parts=[])


def test_an_audit_says_which_weights_scored_it(study_folder, tmp_path):
    layout = StudyLayout(study_folder.out_dir)
    run_dir = layout.run_dir(layout.finished_runs()[0])
    members = pd.read_parquet(run_dir / "members.parquet")
    members = members[~members.is_canary]
    non_members = load_study_data(study_folder.data).non_members
    for name, frame in (("members", members), ("non_members", non_members)):
        frame[["sample_id", "text"]].rename(columns={"sample_id": "id"}).to_json(tmp_path / f"{name}.jsonl",
                                                                                 orient="records", lines=True)
    (tmp_path / "audit.yaml").write_text(
        f"audit:\n  target: {run_dir}\n  members: {tmp_path / 'members.jsonl'}\n  non_members: "
        f"{tmp_path / 'non_members.jsonl'}\n  out: {tmp_path / 'out'}\n  extraction: {{enabled: false}}\n"
        "  mia: {bootstrap: 0, attacks: [ref_ratio, learned]}\n")
    summary = memlens.audit(tmp_path / "audit.yaml", show_progress=False)
    row = summary.results[(summary.results.stage == "mia") & (summary.results.attack == "learned")].iloc[0]
    assert row.attack_weights.startswith("default (sha256 ") and 0 <= row.auc <= 1
    seen = load_weights().trained_on
    overlap = sum(text_hash(t) in seen for t in [*members.text, *non_members.text])
    assert row.trained_on_records == overlap
    if overlap:  # with the shared fixtures: the study's PHEE records are among those the shipped weights saw
        assert "not a held-out measurement" in row.note
    else:  # the synthetic stand-ins of a fresh machine: none of them
        assert "not a held-out measurement" not in str(row.note)


def test_the_callback_accepts_the_learned_attack():
    from memlens.integrations import callback_attacks

    assert [a.name for a in callback_attacks(["ref_ratio", "learned"])] == ["ref_ratio", "learned"]
