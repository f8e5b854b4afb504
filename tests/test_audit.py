"""`memlens audit` on an adapter trained with plain PEFT (no memlens code): the command, the Python call, a
plain transformers recomputation of its AUC, the same adapter as a study's run, and the validity rules."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

import memlens
from memlens.attacks.mia import run_mia
from memlens.auditing.target import resolve_target
from memlens.cli import app
from memlens.config import ConfigError, dump_study, load_audit
from memlens.context import StudyContext
from memlens.data import load_study_data
from memlens.store import RUN_COLUMNS, StudyLayout
from memlens.store.records import CellRecord, TrainRecord

from .conftest import LLAMA_SMALL, LLAMA_TINY, PHEE, make_study

CANARY = "Patient MRN 4812093377 was given 40 mg of the study drug and developed a rash."
METRICS = ["auc", "auc_ci_low", "auc_ci_high", "auc_boot_low", "auc_boot_high", "tpr_at_10pct_fpr", "op_threshold",
           "op_tpr", "n_members", "n_non_members"]


def _train_plain_peft(texts: list[str], folder) -> None:
    """LoRA on q and v with transformers' Trainer and PEFT alone, a high learning rate so that it memorizes."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(LLAMA_TINY)
    model = AutoModelForCausalLM.from_pretrained(LLAMA_TINY, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(folder.parent / "trainer"), num_train_epochs=2, learning_rate=2e-2,
                             per_device_train_batch_size=8, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_strategy="no", seed=0)
    Trainer(model=model, args=args, train_dataset=Dataset.from_dict(tokenizer(texts)),
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)).train()
    model.save_pretrained(str(folder))


def _recomputed_ref_ratio_auc(adapter, members: list[str], non_members: list[str]) -> float:
    """The base-ratio attack's AUC with plain transformers + PEFT: mean NLL under the base over mean NLL under the
    adapter, one record at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(LLAMA_TINY)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(LLAMA_TINY, dtype=torch.float32),
                                      str(adapter)).eval()

    def nll(text: str) -> float:
        ids = tokenizer(text, return_tensors="pt").input_ids
        return float(model(input_ids=ids, labels=ids).loss)

    texts = members + non_members
    with torch.inference_mode():
        tuned = np.array([nll(t) for t in texts])
        with model.disable_adapter():
            base = np.array([nll(t) for t in texts])
    return roc_auc_score([1] * len(members) + [0] * len(non_members), base / tuned)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A plain-PEFT adapter trained on 24 PHEE training records (the members of a small study's `splits` design),
    and the files of its members, non-members (24 test records) and one canary."""
    root = tmp_path_factory.mktemp("audit")
    study = make_study(root / "study", data={"subset": 24, "utility_split": None},
                       grid={"target_modules": [["q", "v"]], "rank": [8]},
                       mia={"bootstrap": 20}, extraction={"enabled": False})
    data = load_study_data(study.data)
    adapter = root / "my-adapter"
    _train_plain_peft(data.members.text.tolist(), adapter)
    for name, frame in (("members", data.members), ("non_members", data.non_members)):
        frame.rename(columns={"sample_id": "id", "text": "context"}).to_json(root / f"{name}.jsonl", orient="records",
                                                                            lines=True)
    (root / "canaries.jsonl").write_text(json.dumps({"id": "mrn", "context": CANARY, "secret": "4812093377",
                                                     "copies": 4}) + "\n")
    return {"root": root, "study": study, "data": data, "adapter": adapter}


def _args(plain, out, *extra: str) -> list[str]:
    root = plain["root"]
    return ["audit", "--target", str(plain["adapter"]), "--members", str(root / "members.jsonl"), "--non-members",
            str(root / "non_members.jsonl"), "--text-field", "context", "--out", str(out), "--no-progress", *extra]


@pytest.mark.real_fixtures("membership AUC above 0.8 measured on PHEE")
def test_command_audits_a_plain_peft_adapter(plain, tmp_path):
    out = tmp_path / "audit"
    result = CliRunner().invoke(app, _args(plain, out, "--canaries", str(plain["root"] / "canaries.jsonl"),
                                           "--group", r"^(\d+)_", "--set", "mia.bootstrap=20", "--set",
                                           "extraction.members=4", "--set", "extraction.non_members=4", "--set",
                                           "extraction.exposure_candidates=50"))
    assert result.exit_code == 0, result.output
    assert f"model card: {out / 'model-card.md'}" in result.output
    results = pd.read_parquet(out / "results.parquet")
    assert set(RUN_COLUMNS) <= set(results.columns)
    mia = results[results.stage == "mia"].set_index("attack")
    # every attack that needs no reference model or corpus, and the bag-of-words check (grouped folds)
    assert {"loss", "ref_ratio", "ref_llr", "zlib", "lowercase", "min_k", "min_k_pp", "bag_of_words"} <= set(mia.index)
    assert bool(mia.loc["bag_of_words", "grouped"])
    data = plain["data"]
    recomputed = _recomputed_ref_ratio_auc(plain["adapter"], data.members.text.tolist(), data.non_members.text.tolist())
    assert mia.loc["ref_ratio", "auc"] == pytest.approx(recomputed, abs=0.005)
    assert mia.loc["ref_ratio", "auc"] > 0.8 and mia.loc["ref_ratio", "n_members"] == 24  # the canary is apart
    # 24 non-members: the low-FPR points are null with the reason, never 0
    assert np.isnan(mia.loc["ref_ratio", "tpr_at_1pct_fpr"]) and "needs >= 100" in mia.loc["ref_ratio",
                                                                                          "tpr_at_1pct_fpr_note"]
    scores = pd.read_parquet(out / "mia_scores.parquet")
    assert scores.is_canary.sum() == 1 and len(scores) == 49 and {"ref_ratio", "nll_ft", "nll_ref"} <= set(scores)
    exposure = results[results.stage == "exposure"].set_index("attack")
    assert set(exposure.index) == {"exposure@canary:mrn", "exposure@canary:mrn:base"}
    assert exposure.loc["exposure@canary:mrn", "copies"] == 4
    assert {"extract:greedy:canary", "extract:greedy:members", "extract:greedy:members:base"} <= set(
        results[results.stage == "extraction"].attack)
    page = (out / "report" / "index.html").read_text()
    markdown = (out / "report" / "index.md").read_text()
    card = (out / "model-card.md").read_text()
    assert page.index("Does this model leak?") < page.index("Attack comparison")  # the first screen comes first
    for text in (page, markdown):  # one model, in the audit's words: nothing averaged over runs or matrices
        assert "mean over runs" not in text and "per adapted matrices" not in text and "data.utility_split" not in text
    for text in (page, markdown):
        assert "Does this model leak?" in text and "Canaries" in text and "bag of words" in text
    assert card.startswith("## Privacy evaluation") and "Verdict: leaks" in card
    # verbatim is the exact continuation; the relaxed (LCS) match is said as such; examples are the exact ones
    extraction = results[results.attack == "extract:greedy:members"].iloc[0]
    assert f"continues {extraction.exact_rate:.1%} of {int(extraction.n)} verbatim (the exact continuation" in card
    assert f"a relaxed match (half the continuation's characters in one common run, not verbatim) " \
           f"{extraction.relaxed_rate:.1%}" in card
    rows = pd.read_parquet(out / "extraction.parquet")
    exact = rows[(rows.model == "finetuned") & rows.is_member & ~rows.is_canary & rows.exact_match]
    table = out / "report" / "tables" / "extraction_examples.csv"
    examples = pd.read_csv(table, dtype=str) if table.exists() else pd.DataFrame({"sample_id": []})
    assert len(examples) == min(len(exact), 5) and set(examples.sample_id) <= set(exact.sample_id)
    assert all(f"### {part}" in card for part in ("Testing data", "Metrics", "Results", "Limitations"))
    assert f"{mia.loc['ref_ratio', 'auc']:.3f}" in card
    # the report is the study's report code: `memlens report` rebuilds it from the folder
    (out / "report" / "index.html").unlink()
    assert CliRunner().invoke(app, ["report", str(out)]).exit_code == 0 and (out / "report" / "index.html").exists()


@pytest.mark.real_fixtures("the 'leaks' verdict measured on PHEE")
def test_python_call_with_an_audit_file_and_reference_models(plain, tmp_path):
    root = plain["root"]
    (tmp_path / "train.yaml").write_text("train: {epochs: 1, learning_rate: 0.02, batch_size: 8, grad_accum: 1, "
                                         "warmup_steps: 0}\n")
    (tmp_path / "audit.yaml").write_text(
        f"audit:\n  target: {plain['adapter']}\n  members: {root / 'members.jsonl'}\n  non_members: "
        f"{root / 'non_members.jsonl'}\n  text_field: context\n  out: {tmp_path / 'out'}\n  references: 2\n"
        f"  train_config: {tmp_path / 'train.yaml'}\n  extraction: {{enabled: false}}\n"
        "  mia: {bootstrap: 20, attacks: [ref_ratio, lira, lira_offline, rmia, rmia_offline]}\n")
    summary = memlens.audit(tmp_path / "audit.yaml", show_progress=False)
    mia = summary.results[summary.results.stage == "mia"].set_index("attack")
    assert {"lira", "lira_offline", "rmia", "rmia_offline", "ref_ratio", "bag_of_words"} == set(mia.index)
    assert len(StudyLayout(summary.out).references.finished_runs()) == 2  # trained with the adapter's recipe
    assert summary.report.analysis.leak.verdict == "leaks"
    assert (summary.out / "audit.yaml").exists() and summary.model_card.exists()


def _study_run(plain) -> tuple:
    """The plain-PEFT adapter as the one run of a small study (its cell: [q, v] at rank 8)."""
    study, data = plain["study"], plain["data"]
    layout = StudyLayout(study.out_dir)
    cell = study.cells()[0]
    run_id = cell.run_id(study)
    run_dir = layout.run_dir(run_id)
    if not run_dir.exists():
        shutil.copytree(plain["adapter"], run_dir / "adapter")
        members = data.members.assign(is_canary=data.members.index == 0)
        members.to_parquet(run_dir / "members.parquet")
        CellRecord.model_validate({"run_id": run_id, **cell.determinants(study)}).save(run_dir / "cell.json")
        first = members.iloc[0]
        TrainRecord(run_id=run_id, seed=0, trainable_params=24576, total_params=1, trainable_pct=1.0,
                    canary={"sample_id": first.sample_id, "text": first.text, "copies": 1, "mode": "repeat"}).save(
            run_dir / "train.json")
        layout.study_file.write_text(dump_study(study))
    return study, run_dir


def test_a_study_run_folder_gives_the_studys_numbers(plain, tmp_path):
    study, run_dir = _study_run(plain)
    rows = run_mia(StudyContext(study)).set_index("attack")
    summary = memlens.audit(target=str(run_dir), out=str(tmp_path / "run-audit"), show_progress=False)
    audited = summary.results.set_index("attack")
    # the same records in one pass with the lowercased ones too: other batches, the same scores to float rounding
    for attack in study.mia.attacks:
        for column in METRICS:
            assert audited.loc[attack, column] == pytest.approx(rows.loc[attack, column], rel=1e-6), (attack, column)
    for column in RUN_COLUMNS:  # the study's identifying columns
        a, b = audited.loc["ref_ratio", column], rows.loc["ref_ratio", column]
        assert a == b or (pd.isna(a) and pd.isna(b)), column
    assert audited.loc["perplexity", "test_ppl"] == pytest.approx(rows.loc["perplexity", "test_ppl"], rel=1e-6)
    assert "lowercase" in audited.index and "recall" not in audited.index  # every attack the inputs allow


def test_a_full_model_against_its_base(plain, tmp_path):
    """A full model folder (here the base itself: nothing was fine-tuned) is loaded beside the base and attacked;
    the rows say its scores measure the base model."""
    root = plain["root"]
    summary = memlens.audit(target=str(LLAMA_TINY), base=str(LLAMA_TINY), members=str(root / "members.jsonl"),
                            non_members=str(root / "non_members.jsonl"), text_field="context",
                            out=str(tmp_path / "full"), show_progress=False,
                            overrides=["mia.attacks=[loss, ref_ratio]", "mia.bootstrap=0", "extraction.enabled=false"])
    mia = summary.results[summary.results.stage == "mia"].set_index("attack")
    assert mia.loc["ref_ratio", "method"] == "full" and mia.loc["ref_ratio", "target_modules"] == "all"
    assert bool(mia.loc["ref_ratio", "model_unchanged"]) and "measure the base model" in mia.loc["ref_ratio", "note"]
    assert "measure the base model" in summary.report.analysis.leak.warning  # said on the first screen


def test_validity_rules(plain, tmp_path):
    root = plain["root"]
    shared, first = tmp_path / "shared.jsonl", (root / "members.jsonl").read_text().splitlines()[0]
    shared.write_text(first + "\n" + (root / "non_members.jsonl").read_text())
    common = {"target": str(plain["adapter"]), "members": str(root / "members.jsonl"), "text_field": "context",
              "out": str(tmp_path / "out")}
    example = re.escape(json.loads(first)["context"][:40])
    with pytest.raises(ConfigError, match=rf"audit: 1 text\(s\) occur in both the members .* \(e\.g\. '{example}"):
        memlens.audit(**common, non_members=str(shared), show_progress=False)
    lacking = tmp_path / "lacking.jsonl"
    lacking.write_text('{"id": "a", "context": "one"}\n{"id": "b", "body": "two"}\n')
    with pytest.raises(ConfigError, match=rf"--text-field \(audit.text_field\): {lacking} line 2: "
                                          r"the record has no 'context' field"):
        memlens.audit(**common, non_members=str(lacking), show_progress=False)
    with pytest.raises(ConfigError, match=r"does not fit the base model .*llama-small: its layer "
                                          r"'model.layers.0.self_attn.q_proj' has 192 input features in the adapter "
                                          r"and 384 in that base"):
        memlens.audit(**common, non_members=str(root / "non_members.jsonl"), base=str(LLAMA_SMALL),
                      show_progress=False)
    with pytest.raises(ConfigError, match=r"audit.base: the target .* is a full model; give the model it was "
                                          "fine-tuned from"):
        memlens.audit(**{**common, "target": str(LLAMA_TINY)}, non_members=str(root / "non_members.jsonl"))
    with pytest.raises(ConfigError, match=r"--non-members \(audit.non_members\): 'owner/phee' is read as a hub "
                                          r"dataset id, but HF_HUB_OFFLINE=1 \(offline\)"):
        memlens.audit(**common, non_members="hub:owner/phee:test")
    with pytest.raises(ConfigError, match=r"audit.target: 'owner/model' is read as a hub model id, but "
                                          r"HF_HUB_OFFLINE=1 \(offline\)"):
        memlens.audit(**{**common, "target": "owner/model"}, base=str(LLAMA_TINY),
                      non_members=str(root / "non_members.jsonl"))
    assert not (tmp_path / "out").exists()  # every refusal came before anything was written
    # an 8-bit base is the study's ModelConfig setting (its loading is tests/test_8bit.py's)
    int8 = resolve_target(load_audit(raw={**common, "load_in_8bit": True}))
    assert int8.base.load_in_8bit and int8.base.name_or_path == str(LLAMA_TINY) and int8.rank == 8
    # the audit's model settings are the study's ModelConfig: every field, top level or under `model:`
    eager = resolve_target(load_audit(raw=common, overrides=["model.attn_implementation=eager",
                                                             "model.revision=main"]))
    assert eager.base.attn_implementation == "eager" and eager.base.revision == "main"
    with pytest.raises(ConfigError, match=r"`dtype` and `model.dtype` both set"):
        load_audit(raw={**common, "dtype": "float32", "model": {"dtype": "bfloat16"}})
    with pytest.raises(ConfigError, match="audit.train_config: references are trained with the target's recipe"):
        memlens.audit(**common, non_members=str(root / "non_members.jsonl"), references=2)
    result = CliRunner().invoke(app, ["audit", "--target", str(plain["adapter"]), "--members", str(PHEE / "x.jsonl"),
                                      "--non-members", str(root / "non_members.jsonl"), "--no-progress"])
    assert (result.exit_code == 2 and "--members (audit.members): " in result.output
            and "x.jsonl is not found" in result.output)


def test_a_rerun_with_other_non_members_retrains_the_references(plain, tmp_path):
    """An audit folder rerun with another non-member file: the reference models, trained on the first file's
    records, are trained again on the new ones (their identity holds the records' contents), never reused."""
    from memlens.attacks.references import population_hash
    from memlens.data import StudyData, read_records
    from memlens.store.records import ReferenceRecord

    root, out = plain["root"], tmp_path / "out"
    other = root / "non_members_b.jsonl"
    if not other.exists():
        test = load_study_data(make_study(tmp_path / "s", data={"subset": 48, "utility_split": None}).data).non_members
        test.iloc[24:48].rename(columns={"sample_id": "id", "text": "context"}).to_json(other, orient="records",
                                                                                        lines=True)
    (tmp_path / "train.yaml").write_text("train: {epochs: 1, learning_rate: 0.02, batch_size: 8, grad_accum: 1, "
                                         "warmup_steps: 0}\n")
    common = {"target": str(plain["adapter"]), "members": str(root / "members.jsonl"), "text_field": "context",
              "out": str(out), "references": 2, "train_config": str(tmp_path / "train.yaml"), "show_progress": False,
              "overrides": ["mia.attacks=[ref_ratio, rmia]", "mia.bootstrap=0", "extraction.enabled=false",
                            "mia.bag_of_words_baseline=false"]}
    first = memlens.audit(non_members=str(root / "non_members.jsonl"), **common)
    layout = StudyLayout(out)
    refs = layout.references.finished_runs()
    hashes = {r: ReferenceRecord.load(layout.references.run_file(r, "reference.json")).population_hash for r in refs}
    second = memlens.audit(non_members=str(other), **common)
    members = read_records(str(root / "members.jsonl"), what="member", text_field="context")
    new = read_records(str(other), what="non_member", text_field="context")
    expected = population_hash(StudyData(members=members, non_members=new, utility=None))
    for ref_id in layout.references.finished_runs():
        record = ReferenceRecord.load(layout.references.run_file(ref_id, "reference.json"))
        assert record.population_hash == expected != hashes.get(ref_id)  # trained on the new records
        trained = set(pd.read_parquet(layout.references.run_file(ref_id, "members.parquet")).text)
        assert trained <= set(members.text) | set(new.text) and trained & set(new.text)
    rows = second.results[second.results.stage == "mia"].set_index("attack")
    assert rows.loc["rmia", "n_non_members"] == len(new)
    assert rows.loc["rmia", "auc"] != first.results.set_index("attack").loc["rmia", "auc"]


def test_a_rerun_reuses_references_on_reordered_records_and_retrains_them_on_changed_base_weights(plain, tmp_path):
    """The references' identity holds the records (in any order) and the base weights' content: an audit rerun with
    only the members' row order changed reuses its references; rerun after a weight of the base folder was scaled in
    place (same path, same file size), it trains them again."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from memlens.store.records import ReferenceRecord

    root, out = plain["root"], tmp_path / "out"
    base = tmp_path / "llama-tiny"
    shutil.copytree(LLAMA_TINY, base)
    members = tmp_path / "members.jsonl"
    lines = (root / "members.jsonl").read_text().splitlines()
    members.write_text("\n".join(lines) + "\n")
    (tmp_path / "train.yaml").write_text("train: {epochs: 1, learning_rate: 0.02, batch_size: 8, grad_accum: 1, "
                                         "warmup_steps: 0}\n")
    common = {"target": str(plain["adapter"]), "members": str(members), "non_members": str(root / "non_members.jsonl"),
              "base": str(base),
              "text_field": "context", "out": str(out), "references": 2, "train_config": str(tmp_path / "train.yaml"),
              "show_progress": False, "overrides": ["mia.attacks=[ref_ratio, rmia]", "mia.bootstrap=0",
                                                    "extraction.enabled=false", "mia.bag_of_words_baseline=false"]}
    layout = StudyLayout(out)

    def references() -> dict[str, tuple[str, int]]:
        return {r: (ReferenceRecord.load(layout.references.run_file(r, "reference.json")).identity,
                    layout.references.run_file(r, "reference.json").stat().st_mtime_ns)
                for r in layout.references.finished_runs()}

    first = memlens.audit(**common)
    trained = references()
    assert len(trained) == 2
    members.write_text("\n".join(lines[::-1]) + "\n")  # the same file, its rows in another order
    second = memlens.audit(**common)
    assert references() == trained  # the same records in another order: the same references, read
    auc = second.results.set_index("attack").loc["rmia", "auc"]
    assert auc == pytest.approx(first.results.set_index("attack").loc["rmia", "auc"])
    tensors = load_file(str(base / "model.safetensors"))
    name = next(n for n in sorted(tensors) if n.endswith("q_proj.weight"))
    save_file({**tensors, name: tensors[name] * 1.5}, str(base / "model.safetensors"), metadata={"format": "pt"})
    memlens.audit(**common)
    retrained = references()
    assert set(retrained) == set(trained)  # the same recipe: the same folders, trained again
    assert all(retrained[r][0] != trained[r][0] and retrained[r][1] != trained[r][1] for r in trained)


def test_the_first_screen_gives_the_headline_attack_that_ran(plain, tmp_path):
    """With canaries and only `zlib` run, the first screen gives zlib's AUC and names it (no KeyError, no "no
    attack ran")."""
    root = plain["root"]
    summary = memlens.audit(target=str(plain["adapter"]), members=str(root / "members.jsonl"),
                            non_members=str(root / "non_members.jsonl"), canaries=str(root / "canaries.jsonl"),
                            text_field="context", out=str(tmp_path / "zlib"), show_progress=False,
                            overrides=["mia.attacks=[zlib]", "mia.bootstrap=0", "extraction.enabled=false"])
    leak = summary.report.analysis.leak
    auc = summary.results.set_index("attack").loc["zlib", "auc"]
    assert leak.value("membership AUC (zlib)").startswith(f"{auc:.3f}")
    assert "No membership attack ran" not in " ".join(leak.sentences) and "`zlib`" in leak.sentences[0]
    first_screen = (summary.out / "report" / "index.md").read_text()
    assert f"{auc:.3f}" in first_screen and "zlib" in first_screen


@pytest.mark.real_fixtures("the 'used' verdict measured on PHEE")
def test_was_the_suspect_set_used(plain, tmp_path):
    """`--suspect`: the set whose use is in question takes the members' place; dataset inference answers on the
    first screen, in audit.json, in the results (stage `dataset`) and in the model card; the refusals come first."""
    root = plain["root"]
    common = {"target": str(plain["adapter"]), "non_members": str(root / "non_members.jsonl"), "text_field": "context",
              "show_progress": False, "overrides": ["mia.bootstrap=0", "extraction.enabled=false"]}
    with pytest.raises(ConfigError, match="suspect and members: give one"):
        memlens.audit(**common, suspect=str(root / "members.jsonl"), members=str(root / "members.jsonl"))
    with pytest.raises(ConfigError, match=r"text\(s\) occur in both the suspect set"):
        memlens.audit(**{**common, "non_members": str(root / "members.jsonl")}, suspect=str(root / "members.jsonl"))
    summary = memlens.audit(**common, suspect=str(root / "members.jsonl"), out=str(tmp_path / "used"))
    record = json.loads((summary.out / "audit.json").read_text())
    inference = record["dataset_inference"]
    assert inference["n_suspect"] == 24 and inference["n_non_members"] == 24 and inference["verdict"] == "used"
    controls = {c["name"]: c for c in inference["controls"]}
    assert controls["base model"]["features"] == ["base_loss", "base_zlib"] and "bag of words" in controls
    assert "loss_minus_base" in inference["calibrated_features"] and inference["placebo"]["n_a"] > 0
    row = summary.results[summary.results.stage == "dataset"].set_index("attack").loc["dataset_inference"]
    assert row.p_value == pytest.approx(inference["p_value"]) and row.p_value < 0.05
    said = summary.report.analysis.leak.sentences[0]
    assert said.startswith("The suspect set was used in training") and f"{row.p_value:.2g}" in said
    assert summary.report.analysis.leak.verdict == "used"
    assert "The suspect set was used in training" in summary.model_card.read_text()
    assert set(pd.read_parquet(summary.out / "mia_scores.parquet").split) == {"suspect", "non_member"}
    assert "suspects against non-members" in " ".join(summary.report.analysis.leak.measures.measure)
    analysis = summary.report.analysis
    assert analysis.attacks.title == "Attack comparison: suspects against non-members"
    ranked = analysis.evidence.records
    assert len(ranked) == 20 and ranked["rank"].tolist() == list(range(1, 21))
    assert set(ranked.sample_id) <= set(pd.read_json(root / "members.jsonl", lines=True, dtype={"id": str}).id)
    assert (summary.out / "report" / "figures" / "evidence.png").is_file()
    assert (summary.out / "report" / "tables" / "evidence_records.csv").is_file()
    # an unused suspect set (PHEE dev records, never trained on): the report speaks of the set, never of leaking
    unused = root / "unused.jsonl"
    dev = pd.read_json(PHEE / "dev.jsonl", lines=True).drop_duplicates("context").head(24)
    dev[["id", "context"]].to_json(unused, orient="records", lines=True)
    summary = memlens.audit(**common, suspect=str(unused), out=str(tmp_path / "unused"))
    leak = summary.report.analysis.leak
    assert leak.verdict in {"not shown to be used", "underpowered", "confounded"}
    screen = " ".join([leak.verdict, *leak.sentences, *leak.caveats, *map(str, leak.measures.to_numpy().ravel())])
    card = summary.model_card.read_text()
    for text in (screen, card):
        assert "leak" not in text.lower() and "tells its training records" not in text
        assert "of the same distribution" not in text and "assumed drawn like the suspect records" in text


def test_a_memaudit_manifest_gives_the_canaries_detection_rate(plain, tmp_path):
    """memaudit's manifest as `--canaries`: the inserted canaries are scored against the held-out twins (never
    trained on) through the study's canary path, into canary_scores.parquet, and the report gives TPR at 1% FPR by
    copies with its exact interval."""
    from .test_user_canaries import _manifest, _memaudit_entry

    entries = [_memaudit_entry(i, True, 4) for i in range(3)] + [_memaudit_entry(i, False, 4) for i in range(3, 103)]
    (tmp_path / "memaudit-manifest.json").write_text(json.dumps(_manifest(entries)))
    root = plain["root"]
    summary = memlens.audit(target=str(plain["adapter"]), members=str(root / "members.jsonl"),
                            non_members=str(root / "non_members.jsonl"), canaries=str(tmp_path), text_field="context",
                            out=str(tmp_path / "out"), show_progress=False,
                            overrides=["mia.attacks=[loss, ref_ratio]", "mia.bootstrap=0", "extraction.enabled=false"])
    scores = pd.read_parquet(summary.out / "canary_scores.parquet")
    assert len(scores) == 103 and scores.is_member.sum() == 3 and {"loss", "ref_ratio"} <= set(scores)
    canaries = summary.report.analysis.canaries
    shown = canaries.by_copies
    column = next(c for c in shown.columns if c.startswith("TPR at 1% FPR (ref_ratio)"))
    assert re.match(r"\d\.\d{3} \(\d/3\) \[\d\.\d{3}, \d\.\d{3}\]", str(shown[column].iloc[0]))
    rows = summary.results.set_index("attack")
    assert rows.loc["ref_ratio", "canary_copies4_n_members"] == 3
    assert rows.loc["ref_ratio", "canary_copies4_n_non_members"] == 100
    assert summary.report.analysis.record.n_members == 24  # the canaries are not members of the metrics
    # 100 twins: the threshold is the highest twin score; the rule's realised FPR is printed with its bound, and the
    # results carry the same TPR with the same (one) interval
    page = (summary.out / "report" / "index.md").read_text()
    assert "0.99% on average, and at most 2.95% (95% one-sided upper bound)" in page
    assert rows.loc["ref_ratio", "canary_copies4_tpr_at_1pct_fpr_fpr_upper"] == pytest.approx(1 - 0.05 ** (1 / 100))
    detection = canaries.detection.set_index(["attack", "family", "fpr"]).loc[("ref_ratio", "all", 0.01)]
    assert rows.loc["ref_ratio", "canary_copies4_tpr_at_1pct_fpr_high"] == pytest.approx(detection.tpr_high)


def test_a_run_folders_inserted_canary_is_out_of_the_metrics_and_of_the_references(plain, tmp_path):
    """One definition of an inserted canary: a run folder's own canary that its study inserted (a secret) is out of
    the members the metrics count (and the usage share's suspects) and out of the reference models' records, as the
    inserted canaries of `--canaries` are; said in the notes. A canary in repeat mode stays a member everywhere."""
    from memlens.auditing.records import load_audit_records
    from memlens.auditing.study import plan_audit

    study, run_dir = _study_run(plain)
    folder = tmp_path / "study"
    shutil.copytree(study.out_dir, folder, ignore=shutil.ignore_patterns("adapter"))
    moved = study.model_copy(update={"out": str(folder)})
    (folder / "study.yaml").write_text(dump_study(moved))
    run = folder / "runs" / run_dir.name
    shutil.copytree(run_dir / "adapter", run / "adapter")
    secret = "My account recovery phrase is 4812093377."
    members = pd.read_parquet(run / "members.parquet").assign(is_canary=False)
    members = pd.concat([members, pd.DataFrame({"sample_id": ["canary"], "text": [secret], "is_canary": [True]})],
                        ignore_index=True)
    members.to_parquet(run / "members.parquet")
    TrainRecord(run_id=run.name, seed=0, trainable_params=24576, total_params=1, trainable_pct=1.0,
                canary={"sample_id": "canary", "text": secret, "copies": 4, "mode": "insert", "secret": "4812093377",
                        "secret_format": "digits:10"}).save(run / "train.json")
    (tmp_path / "train.yaml").write_text("train: {epochs: 1}\n")
    cfg = load_audit(target=str(run), out=str(tmp_path / "out"), references=2,
                     train_config=str(tmp_path / "train.yaml"), overrides=["mia.attacks=[ref_ratio, lira]"])
    target = resolve_target(cfg)
    records = load_audit_records(cfg, target)
    assert records.inserted == {"canary"}
    counted = records.in_metrics()
    assert not counted[members.sample_id.tolist().index("canary")] and counted.sum() == len(members) - 1 + 24
    plan = plan_audit(cfg, target, records)
    population = plan.ctx.cell_data(plan.cell)
    assert "canary" not in set(population.members.sample_id) and len(population.members) == len(members) - 1
    assert any("run's own canary (canary" in n for n in records.notes)
    repeat = load_audit_records(load_audit(target=str(run_dir), out=str(tmp_path / "out2")), resolve_target(
        load_audit(target=str(run_dir), out=str(tmp_path / "out2"))))
    assert repeat.inserted == frozenset() and repeat.in_metrics().all()  # repeat mode: a member, counted


def test_inputs_without_effect_are_refused_and_the_recipes_max_length_is_used(plain, tmp_path):
    """`--train-config` with no reference model would change nothing: refused before any model is loaded. The
    recipe's max_length (the length the target's trainer cut records to) is the references' `data.max_length`."""
    from memlens.auditing.records import load_audit_records
    from memlens.auditing.study import plan_audit
    from memlens.config.recipe import RECIPE_FORMAT

    root = plain["root"]
    (tmp_path / "train.yaml").write_text("train: {epochs: 1}\n")
    common = {"target": str(plain["adapter"]), "members": str(root / "members.jsonl"),
              "non_members": str(root / "non_members.jsonl"), "text_field": "context", "out": str(tmp_path / "out")}
    for references in (0, None):
        with pytest.raises(ConfigError, match=r"audit.train_config: .*train.yaml is given but references is 0; the "
                                              "recipe only trains reference models, so it would change nothing"):
            memlens.audit(**common, train_config=str(tmp_path / "train.yaml"), show_progress=False,
                          **({"references": references} if references is not None else {}))
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, _args(plain, tmp_path / "cli", "--train-config", str(tmp_path / "train.yaml")))
    assert result.exit_code != 0 and "would change nothing" in result.output
    recipe = {"format": RECIPE_FORMAT, "version": 1, "training_arguments": {"num_train_epochs": 1},
              "lora": None, "max_length": 64, "train_records": None, "total_steps": None}
    (tmp_path / "memlens-recipe.json").write_text(json.dumps(recipe))
    cfg = load_audit(**common, references=2, train_config=str(tmp_path / "memlens-recipe.json"),
                     overrides=["mia.attacks=[ref_ratio, lira]"])
    target = resolve_target(cfg)
    plan = plan_audit(cfg, target, load_audit_records(cfg, target))
    assert plan.study.data.max_length == 64
    assert any("max_length=64 tokens, as the target's trainer cut them" in n for n in plan.notes)
    plain_recipe = plan_audit(cfg.model_copy(update={"train_config": str(tmp_path / "train.yaml")}), target,
                              load_audit_records(cfg, target))
    assert plain_recipe.study.data.max_length == 512  # no max_length given: the study's default
    other = {**recipe, "lora": {"r": 4, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                                "bias": "none"}}
    (tmp_path / "memlens-recipe.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match=r"was written for another adapter \(r: 4 in the recipe, 8 in the adapter"):
        plan_audit(cfg, target, load_audit_records(cfg, target))


def test_the_document_row_says_why_it_has_no_lower_bound():
    """Without --group the row asks for it; with groups but no lower bound (no finite resample) it does not."""
    from memlens.report.audit import _suspect_measures
    from memlens.store.records import AuditRecord

    share = {"fraction": 0.2, "fraction_ci_low": 0.1, "fraction_ci_high": 0.35, "at_most": 0.35, "ci_level": 0.95,
             "n_references": 4, "document_fraction": None, "document_ci_low": None, "document_ci_high": None}

    def note(documents: bool) -> str:
        record = AuditRecord.model_construct(n_members=10, n_non_members=10, references=4, dataset_inference=None,
                                             usage_share={**share, "documents": documents})
        rows = _suspect_measures(record, None, 0.95)
        return rows.set_index(rows.columns[0]).loc["documents with a record used, at least"].iloc[-1]

    assert note(False) == "needs --group"
    assert note(True) == "no lower bound could be estimated"


def test_the_share_row_says_why_it_is_missing_with_the_references_given():
    from memlens.report.audit import share_answer

    assert share_answer(None, 2) == (None, "needs 3 or more reference models (--references); 2 given")
    said, why = share_answer(None, 4)
    assert said is None and "needs 3 or more" not in why and "4 reference models" in why
    share = {"fraction": 0.2, "fraction_ci_low": 0.1, "fraction_ci_high": 0.35, "at_most": 0.35, "ci_level": 0.95,
             "n_references": 4, "document_fraction": 0.3, "document_ci_low": 0.2, "document_ci_high": 0.5,
             "placebo": {"fraction_raw": 0.01, "fraction_ci_raw": [-0.1, 0.12]}, "widened": False}
    said, why = share_answer(share, 4)
    assert why is None and "at most 35% of the set was used" in said
    # the document share leans low (a missed used document counts as unused): only its lower end is said
    assert "at least 20% of the documents had a record used (estimate 0.30, which leans low" in said
    assert "0.50" not in said
    assert "the placebo (known non-members split in two, truth 0) gives 0.01 [-0.10, 0.12]" in said
