"""What a cached reference adapter and the base model's extraction control are keyed on: every input that changes
them (the records with their coin keys, the coin unit and groups, the recipe, the base weights' content), and not
the order of the records."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from memlens.attacks import references as refs_module
from memlens.attacks.extraction import base_control_key, resolve_decodings
from memlens.attacks.references import reference_data, reference_identity, reference_ids, train_references
from memlens.config import ModelConfig
from memlens.data import StudyData, load_study_data
from memlens.models.fingerprint import safetensors_fingerprint, weights_fingerprint
from memlens.score.cache import model_fingerprint
from memlens.store import RunFile, StudyLayout
from memlens.store.records import ReferenceRecord

from .conftest import LLAMA_TINY, make_study


def _scale_in_place(folder, factor: float = 1.5) -> str:
    """Scale one weight matrix of `folder`'s model.safetensors in place (same file, same size); its name."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    name = next(n for n in sorted(tensors) if n.endswith("q_proj.weight"))
    tensors[name] = (tensors[name] * factor).astype(tensors[name].dtype)
    size = path.stat().st_size
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert path.stat().st_size == size  # the names and sizes of the files cannot tell
    return name


@pytest.fixture
def tiny_copy(tmp_path):
    folder = tmp_path / "llama-tiny"
    shutil.copytree(LLAMA_TINY, folder)
    return folder


def test_the_weights_fingerprint_sees_a_weight_scaled_in_place(tiny_copy):
    before = weights_fingerprint(tiny_copy)
    assert before == weights_fingerprint(LLAMA_TINY)  # a copy is the same model
    dtype = "torch.float32"
    config = ModelConfig(name_or_path=str(tiny_copy))
    fingerprint = model_fingerprint(config, dtype)
    _scale_in_place(tiny_copy)
    assert weights_fingerprint(tiny_copy) != before
    assert model_fingerprint(config, dtype) != fingerprint  # the base scores' cache key moves with it
    assert weights_fingerprint("not/a/folder") is None


def test_the_fingerprint_reads_three_windows_of_every_tensor(tmp_path):
    big = np.zeros(100_000, dtype=np.float32)
    save_file({"a": big, "b": np.ones(3, dtype=np.float32)}, str(tmp_path / "m.safetensors"))
    first = safetensors_fingerprint(tmp_path / "m.safetensors")
    for position in (0, 50_000, 99_999):  # first, middle and last window of `a`
        changed = big.copy()
        changed[position] = 1.0
        save_file({"a": changed, "b": np.ones(3, dtype=np.float32)}, str(tmp_path / f"m{position}.safetensors"))
        assert safetensors_fingerprint(tmp_path / f"m{position}.safetensors") != first, position


def _study(tmp_path, **data):
    return make_study(tmp_path / "study", data={"subset": 24, **data},
                      mia={"references": 2, "attacks": ["lira"], "bootstrap": 0})


def test_a_references_identity_holds_every_input_and_not_the_order(tmp_path, tiny_copy):
    study = _study(tmp_path)
    cell = study.cells()[0]
    data = load_study_data(study.data)
    identity = reference_identity(study, cell, data, 0)
    shuffled = StudyData(members=data.members.sample(frac=1, random_state=1), non_members=data.non_members[::-1],
                         utility=None)
    assert reference_identity(study, cell, shuffled, 0) == identity  # reordered: the same reference
    ref, _ = reference_data(study, data, 0)
    ref_shuffled, _ = reference_data(study, shuffled, 0)
    assert ref.members.text.tolist() == ref_shuffled.members.text.tolist()  # trained on the same records in order
    assert reference_identity(study, cell, data, 1) != identity
    fewer = StudyData(members=data.members.iloc[1:], non_members=data.non_members, utility=None)
    assert reference_identity(study, cell, fewer, 0) != identity  # other records
    renamed = StudyData(members=data.members.assign(sample_id=lambda f: "x" + f.sample_id),
                        non_members=data.non_members, utility=None)
    assert reference_identity(study, cell, renamed, 0) != identity  # other coin keys: other halves
    grouped = _study(tmp_path, group=r"^(\d+)_")
    grouped_data = load_study_data(grouped.data)
    by_group = reference_identity(grouped, grouped.cells()[0], grouped_data, 0)
    assert by_group != identity  # per document group, not per record
    regrouped = StudyData(members=grouped_data.members.assign(group=lambda f: f.group.iloc[::-1].to_numpy()),
                          non_members=grouped_data.non_members, utility=None)
    assert reference_identity(grouped, grouped.cells()[0], regrouped, 0) != by_group  # other groups
    other_recipe = study.model_copy(update={"train": study.train.model_copy(update={"learning_rate": 2e-3})})
    assert reference_identity(other_recipe, other_recipe.cells()[0], data, 0) != identity
    copied = study.model_copy(update={"model": study.model.model_copy(update={"name_or_path": str(tiny_copy)})})
    on_copy = reference_identity(copied, copied.cells()[0], data, 0)
    _scale_in_place(tiny_copy)
    assert reference_identity(copied, copied.cells()[0], data, 0) != on_copy  # base weights changed in place


def test_train_references_reuses_on_reordered_records_and_retrains_on_changed_ones(tmp_path, monkeypatch,
                                                                                   tiny_copy):
    study = _study(tmp_path)
    study = study.model_copy(update={"model": study.model.model_copy(update={"name_or_path": str(tiny_copy)})})
    cell, layout = study.cells()[0], StudyLayout(study.out_dir)
    data = load_study_data(study.data)
    trained = []

    def fake_group(ref_study, pairs, runs_layout, tokenizer, progress=None):
        folders = []
        for ref_cell, ref_data in pairs:
            folder = runs_layout.run_dir(ref_cell.run_id(ref_study))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / RunFile.TRAIN).write_text('{"run_id": "x", "wall_time_s": 0.0}')
            trained.append(ref_data.members.text.tolist())
            folders.append(folder)
        return folders

    monkeypatch.setattr(refs_module, "finetune_group", fake_group)
    monkeypatch.setattr(refs_module.TrainRecord, "load", classmethod(lambda cls, path: type("T", (), {
        "wall_time_s": 0.0})()))
    assert train_references(study, [cell], lambda c: data, layout) == reference_ids(study, cell)
    shuffled = StudyData(members=data.members[::-1], non_members=data.non_members.sample(frac=1, random_state=0),
                         utility=None)
    assert train_references(study, [cell], lambda c: shuffled, layout) == []  # reordered: reused
    _scale_in_place(tiny_copy)
    assert train_references(study, [cell], lambda c: shuffled, layout) == reference_ids(study, cell)  # new weights
    other = StudyData(members=data.members.iloc[2:], non_members=data.non_members, utility=None)
    assert train_references(study, [cell], lambda c: other, layout) == reference_ids(study, cell)  # other records
    record = ReferenceRecord.load(layout.references.run_file(reference_ids(study, cell)[0], RunFile.REFERENCE))
    assert record.identity == reference_identity(study, cell, other, 0)


def test_the_extraction_base_cache_is_keyed_on_the_weights(tmp_path, tiny_copy):
    from transformers import AutoTokenizer

    study = make_study(tmp_path / "study", model={"name_or_path": str(tiny_copy)})
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_copy))
    decodings = resolve_decodings(study.extraction)
    key = base_control_key(study, decodings, tokenizer)
    assert base_control_key(study, decodings, tokenizer) == key
    _scale_in_place(tiny_copy)
    assert base_control_key(study, decodings, tokenizer) != key
