"""Membership inference end to end on llama-tiny: a memorizing adapter, an untouched one (LoRA B = 0,
i.e. exactly the base model), saved scores, utility, the base-score cache and the direct API."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score

from memlens.attacks.bow import bag_of_words_baseline
from memlens.attacks.mia import Scorer, attack_models, run_mia
from memlens.attacks.registry import ATTACKS
from memlens.config import DEFAULT_MIA_ATTACKS, ConfigError, dump_study
from memlens.context import StudyContext
from memlens.data import load_study_data
from memlens.report import analyse
from memlens.runner import run_study
from memlens.store import StudyLayout, read_results
from memlens.store.integrity import digest_files
from memlens.store.records import CellRecord, TrainRecord
from memlens.train import finetune_cell, read_members

from .conftest import LLAMA_TINY, PHEE, make_study

REQUIRED = ["run_id", "model", "target_modules", "rank", "canary_copies", "seed", "trainable_params", "attack",
            "auc", "auc_ci_low", "auc_ci_high", "auc_boot_low", "auc_boot_high", "tpr_at_10pct_fpr",
            "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "tpr_at_1pct_fpr_note", "op_threshold", "op_tpr", "op_fpr",
            "n_members", "n_non_members"]


def _spy_base_passes(monkeypatch, moments_of: dict[str, bool] | None = None) -> list[str]:
    """The label of every scoring pass, in order (and, into `moments_of`, whether it computed the moments)."""
    labels: list[str] = []
    score = Scorer.score

    def spy(self, model, ids, label, moments=True):
        labels.append(label)
        if moments_of is not None:
            moments_of[label] = moments
        return score(self, model, ids, label, moments)

    monkeypatch.setattr(Scorer, "score", spy)
    return labels


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    """A LoRA adapter trained many epochs on 32 members (seed 0), and as the study's seed-1 run a copy of it
    with B zeroed (= the base model)."""
    study = make_study(tmp_path_factory.mktemp("mia") / "study", data={"subset": 32},
                       grid={"target_modules": [["q", "v"]], "rank": [8], "seed": [0, 1]},
                       train={"epochs": 20, "learning_rate": 1e-2, "batch_size": 8},
                       mia={"bootstrap": 100, "attacks": [*DEFAULT_MIA_ATTACKS, "lowercase"]})  # lowercase: opt-in
    layout = StudyLayout(study.out_dir)
    data = load_study_data(study.data)
    trained, untouched = study.cells()
    run_dir = finetune_cell(study, trained, data, layout)
    layout.study_file.write_text(dump_study(study))  # what run_study writes (the report reads it)
    zero = untouched.run_id(study)
    zero_dir = layout.run_dir(zero)
    shutil.copytree(run_dir, zero_dir)
    CellRecord.model_validate({"run_id": zero, **untouched.determinants(study)}).save(zero_dir / "cell.json")
    weights = zero_dir / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    assert any("lora_B" in k for k in tensors)
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()}, weights)
    record = TrainRecord.load(zero_dir / "train.json")  # a run of its own: its checksums are its weights'
    record.artifacts = digest_files(zero_dir, "adapter")
    record.save(zero_dir / "train.json")
    with pytest.MonkeyPatch.context() as mp:
        moments_of: dict[str, bool] = {}
        labels = _spy_base_passes(mp, moments_of)
        returned = run_mia(StudyContext(study))
    return {"study": study, "layout": layout, "run_id": run_dir.name, "returned": returned, "labels": labels,
            "moments_of": moments_of, "data": data, "zero": zero}


def _rows(study_run, run_id: str, stage: str = "mia") -> pd.DataFrame:
    results = read_results(study_run["layout"])
    return results[(results.run_id == run_id) & (results.stage == stage)].set_index("attack")


@pytest.mark.real_fixtures("AUCs above 0.95 measured on PHEE")
def test_memorizing_adapter_auc_near_one(study_run):
    rows = _rows(study_run, study_run["run_id"])
    for attack in ("loss", "ref_ratio", "ref_llr", "min_k"):
        assert rows.loc[attack, "auc"] > 0.95, (attack, rows.loc[attack, "auc"])
    assert set(rows.index) >= {"loss", "ref_ratio", "ref_llr", "zlib", "lowercase", "min_k", "min_k_pp",
                               "bag_of_words"}


def test_untouched_adapter_near_chance(study_run):
    ZERO = study_run["zero"]
    scores = pd.read_parquet(study_run["layout"].run_dir(ZERO) / "mia_scores.parquet")
    np.testing.assert_allclose(scores.nll_ft, scores.nll_ref, atol=1e-5)  # B = 0: exactly the base model
    assert np.abs(scores.ref_llr).max() < 1e-3
    # Only float noise separates ft from ref. Its AUC is not a statistic: the base pass and the adapter's
    # pass batch the records differently, and on some CPUs that noise differs between members and
    # non-members (on an Intel Xeon the AUC interval of ref_ratio ended at 0.43; on an AMD EPYC it held
    # 0.5), so only the scores' spread is asserted.
    np.testing.assert_allclose(scores.ref_ratio, 1.0, atol=1e-5)
    rows = _rows(study_run, ZERO)
    # The loss attack on the untouched model measures the base model alone (same AUC); it need not be
    # 0.5 (on this subset the base model finds the members harder): why reference attacks calibrate.
    base_auc = roc_auc_score(scores.is_member, -scores.nll_ref)
    assert rows.loc["loss", "auc"] == pytest.approx(base_auc, abs=1e-3)


def test_saved_scores_reproduce_results(study_run):
    ZERO = study_run["zero"]
    scores = pd.read_parquet(study_run["layout"].root / "mia_scores.parquet")
    assert set(scores.run_id) == {study_run["run_id"], ZERO}
    for run_id, frame in scores.groupby("run_id"):
        rows = _rows(study_run, run_id)
        for attack in ("loss", "ref_ratio", "ref_llr", "zlib", "lowercase", "min_k", "min_k_pp"):
            assert rows.loc[attack, "auc"] == pytest.approx(roc_auc_score(frame.is_member, frame[attack]), abs=1e-12)
        np.testing.assert_allclose(frame.loss, -frame.nll_ft)
        np.testing.assert_allclose(frame.ref_ratio, frame.nll_ref / frame.nll_ft)


def test_score_rows_count_canary_once(study_run):
    layout, run_id = study_run["layout"], study_run["run_id"]
    scores = pd.read_parquet(layout.run_dir(run_id) / "mia_scores.parquet")
    members = read_members(layout.run_dir(run_id))
    assert scores.is_member.sum() == len(members) and (~scores.is_member).sum() == len(study_run["data"].non_members)
    assert scores.is_canary.sum() == 1 and scores[scores.is_canary].is_member.all()
    assert not scores.sample_id.duplicated().any()
    assert set(scores.split) == {"train", "test"}
    assert (scores.n_tokens > 0).all()
    rows = _rows(study_run, run_id)
    assert 0 <= rows.loc["ref_ratio", "canary_nonmember_quantile"] <= 1


def test_an_unchanged_model_is_flagged(study_run):
    """The adapter with B zeroed predicts what the base model does: every attack row says its scores measure the
    base model (as a flag and a note), the trained adapter's rows do not, and the report warns above the table."""
    ZERO = study_run["zero"]
    zero, trained = (_rows(study_run, ZERO).drop("bag_of_words"),
                     _rows(study_run, study_run["run_id"]).drop("bag_of_words"))
    assert zero.model_unchanged.astype(bool).all() and not trained.model_unchanged.astype(bool).any()
    assert zero.note.str.contains("predicts what the base model does").all()
    assert not trained.note.fillna("").str.contains("base model does").any()
    table = analyse(study_run["layout"].root).study_table
    assert table.unchanged_runs == [ZERO] and ZERO in table.warning


def test_results_table(study_run):
    ZERO = study_run["zero"]
    rows = _rows(study_run, study_run["run_id"])
    missing = [c for c in REQUIRED if c not in rows.reset_index().columns]
    assert not missing
    assert (rows.drop("bag_of_words").n_members
            == len(read_members(study_run["layout"].run_dir(study_run["run_id"])))).all()
    assert rows.loc["loss", "tpr_at_1pct_fpr_note"].startswith("needs >= 100 non-members")
    assert np.isnan(rows.loc["loss", "tpr_at_1pct_fpr"])
    assert rows.loc["loss", "op_fpr"] <= 0.1
    bow = rows.loc["bag_of_words"]
    assert 0 <= bow.auc <= 1 and isinstance(bow.note, str)
    returned = study_run["returned"]
    assert set(returned.stage) == {"mia", "utility", "dataset"} and set(returned.run_id) == {study_run["run_id"], ZERO}
    # every run's member set against its non-members, as a data owner would test it (dataset inference)
    dataset = returned[returned.stage == "dataset"].set_index("run_id")
    assert set(dataset.attack) == {"dataset_inference"} and dataset.p_value.between(0, 1).all()
    assert (dataset.n_suspect == rows.loc["loss", "n_members"] - 1).all()  # the canary is left out


def test_utility_perplexities(study_run):
    ZERO = study_run["zero"]
    layout = study_run["layout"]
    for run_id in (study_run["run_id"], ZERO):
        util = _rows(study_run, run_id, "utility").loc["perplexity"]
        scores = pd.read_parquet(layout.run_dir(run_id) / "mia_scores.parquet")
        test = scores[~scores.is_member]
        n = test.n_tokens.to_numpy()
        assert util.test_ppl == pytest.approx(np.exp((test.nll_ft * n).sum() / n.sum()), rel=1e-6)
        assert util.base_test_ppl == pytest.approx(np.exp((test.nll_ref * n).sum() / n.sum()), rel=1e-6)
        assert np.isfinite(util.utility_ppl) and util.n_utility == 32
    mem = _rows(study_run, study_run["run_id"], "utility").loc["perplexity"]
    zero = _rows(study_run, ZERO, "utility").loc["perplexity"]
    assert mem.member_ppl < mem.base_member_ppl  # memorized its members
    assert zero.test_ppl == pytest.approx(zero.base_test_ppl, rel=1e-4)
    assert zero.utility_ppl == pytest.approx(zero.base_utility_ppl, rel=1e-4)


def test_rerun_uses_cache_and_skips_done_runs(study_run, monkeypatch):
    ctx, ZERO = StudyContext(study_run["study"]), study_run["zero"]
    assert any(label.startswith("base") for label in study_run["labels"])  # the first run computed them
    labels = _spy_base_passes(monkeypatch)
    assert run_mia(ctx).empty  # nothing pending
    assert labels == []
    again = run_mia(ctx, ctx.cells_of([ZERO]), force=True)
    assert set(again.run_id) == {ZERO}
    assert labels == [ZERO, f"{ZERO} utility"]  # the adapter's passes (records, utility split), no base pass
    # Min-K%++ (a default attack) reads the target's moments, never the base model's nor the utility split's
    moments_of = study_run["moments_of"]
    assert moments_of[ZERO] and not moments_of[f"{ZERO} utility"]
    assert not any(m for label, m in moments_of.items() if label.startswith("base"))
    with pytest.raises(ConfigError, match="not a run of this study"):
        ctx.cells_of(["nope"])
    unfinished = study_run["study"].model_copy(
        update={"grid": study_run["study"].grid.model_copy(update={"seed": [2]})})
    with pytest.raises(ConfigError, match="no finished run"):
        run_mia(ctx, unfinished.cells())


@pytest.mark.real_fixtures("AUC above 0.7 measured on PHEE")
def test_attack_models_direct_api(study_run, tmp_path):
    layout, run_id, data = study_run["layout"], study_run["run_id"], study_run["data"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(pd.read_json(PHEE / "dev.jsonl", lines=True).context.tolist()[:300]))
    members = read_members(layout.run_dir(run_id))
    scores, results = attack_models(
        LLAMA_TINY, {"mem": layout.run_dir(run_id) / "adapter"}, members, data.non_members, data.utility.text.tolist(),
        mia={"attacks": ["loss", "ref_ratio", "dc_pdd"], "reference_corpus": str(corpus), "bootstrap": 0},
        show_progress=False)
    mia = results[results.stage == "mia"].set_index("attack")
    assert mia.loc["loss", "auc"] == pytest.approx(_rows(study_run, run_id).loc["loss", "auc"], abs=1e-9)
    assert np.isfinite(scores.dc_pdd).all() and mia.loc["dc_pdd", "auc"] > 0.7
    assert np.isnan(mia.loc["loss", "auc_boot_low"])  # bootstrap: 0 -> no bootstrap interval, said as NaN
    assert results[results.stage == "utility"].utility_ppl.notna().all()


def test_dc_pdd_needs_reference_corpus(tmp_path):
    with pytest.raises(ConfigError, match="reference_corpus"):
        run_study(make_study(tmp_path, mia={"attacks": ["loss", "dc_pdd"]}), show_progress=False)
    with pytest.raises(ConfigError, match=r"unknown attack 'lira_typo'; valid choices: \[.*'ref_ratio'"):
        run_study(make_study(tmp_path, mia={"attacks": ["loss", "lira_typo"]}), show_progress=False)
    with pytest.raises(ConfigError, match="dp.audit_attack: 'zlib' is not among mia.attacks"):
        run_study(make_study(tmp_path, mia={"attacks": ["ref_ratio"]}, dp={"audit_attack": "zlib"}),
                  show_progress=False)
    assert not (tmp_path / "runs").exists()  # refused before any work
    with pytest.raises(ConfigError, match="mia.attacks"):
        attack_models(LLAMA_TINY, [], ["a b"], ["c d"], mia={"attacks": ["dc_pdd"]}, show_progress=False)
    assert set(DEFAULT_MIA_ATTACKS) <= set(ATTACKS)  # the defaults are registered attacks


def test_bag_of_words_flags_a_biased_split():
    texts = pd.read_json(PHEE / "train.jsonl", lines=True).context
    fair = texts.sample(400, random_state=0).tolist()
    row = bag_of_words_baseline(fair[:200], fair[200:])
    assert not row["biased_split"] and row["auc_ci_low"] < 0.5 < row["auc_ci_high"]
    topical = texts.str.contains("patient", case=False)
    biased = bag_of_words_baseline(texts[topical].head(200).tolist(), texts[~topical].head(200).tolist())
    assert biased["biased_split"] and biased["auc"] > 0.8 and "biased" in biased["note"]
