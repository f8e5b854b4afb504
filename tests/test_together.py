"""Training LoRA adapters together (`train.together`): each adapter of a group is the adapter trained alone.

Three llama-tiny cells (ranks 2 and 4, a secret inserted once or 9 times, seeds 0 and 1: different step counts, so
one adapter leaves the group before the others) are trained one at a time and as one group, without dropout and
with dropout (each adapter's masks come from its own random stream), and compared tensor by tensor. Adam divides
by each gradient element's own scale, so the float rounding of a different matmul shape reaches ~1e-4 on elements
whose gradient is near zero: tensors are compared by their relative Frobenius distance (1e-5 is typical).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from memlens.config import load_study
from memlens.context import StudyContext
from memlens.data import load_study_data
from memlens.models import AdapterBank, load_base_model, load_tokenizer
from memlens.store import RunFile, StudyLayout
from memlens.study.compat import config_differences
from memlens.study.stage import FinetuneStage
from memlens.train import finetune_cell, read_members, read_train_info, tokenize_records
from memlens.train.collate import CausalLMCollator
from memlens.train.lockstep import stack_micro_batches
from memlens.train.together import finetune_group, training_groups
from tests.conftest import GPT2_SMALL, make_study

TRAIN = {"epochs": 1, "batch_size": 4, "grad_accum": 2, "warmup_steps": 1, "learning_rate": 5e-3, "logging_steps": 1}


def _study(out, dropout: float, together: int = 1, **sections):
    sections.setdefault("grid", {"target_modules": [["q", "v"]], "rank": [2, 4], "canary_copies": [1, 9],
                                 "seed": [0, 1]})
    return make_study(out, data={"subset": 16}, canary={"mode": "insert"}, lora={"dropout": dropout},
                      train={**TRAIN, "together": together}, **sections)


def _picked(study):
    """Three cells: (rank, copies, seed) = (2, 1, 0), (4, 9, 0), (2, 9, 1): 17 or 25 records, 3 or 4 steps."""
    wanted = [(2, 1, 0), (4, 9, 0), (2, 9, 1)]
    cells = {(c.rank, c.canary_copies, c.seed): c for c in study.cells()}
    return [cells[w] for w in wanted]


def _pair(root, dropout: float):
    """The three cells trained alone (finetune_cell) and together (the finetune stage, train.together 3)."""
    alone, together = _study(root / "alone", dropout), _study(root / "together", dropout, together=3)
    data = load_study_data(alone.data)
    alone_runs = [finetune_cell(alone, c, data, StudyLayout(alone.out_dir)) for c in _picked(alone)]
    FinetuneStage().run(StudyContext(together), _picked(together))
    return alone, together, alone_runs, [StudyLayout(together.out_dir).run_dir(r.name) for r in alone_runs]


@pytest.fixture(scope="module")
def without_dropout(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("together0"), 0.0)


@pytest.fixture(scope="module")
def with_dropout(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("together1"), 0.1)


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def _assert_same_adapters(alone_runs, together_runs):
    for a, b in zip(alone_runs, together_runs, strict=True):
        wa, wb = _weights(a), _weights(b)
        assert wa.keys() == wb.keys()
        for key in wa:
            distance = float((wa[key] - wb[key]).norm() / wa[key].norm())
            assert distance < 1e-4, (a.name, key, distance)
        curve_a, curve_b = read_train_info(a).loss_curve, read_train_info(b).loss_curve
        assert [p["step"] for p in curve_a] == [p["step"] for p in curve_b]
        for p, q in zip(curve_a, curve_b):
            assert p["loss"] == pytest.approx(q["loss"], rel=1e-5)


def test_a_group_trains_each_adapter_as_alone_without_dropout(without_dropout):
    alone, together, alone_runs, together_runs = without_dropout
    assert all(run.is_dir() for run in together_runs)  # the same run ids
    steps = [read_train_info(r).steps for r in together_runs]
    assert steps == [read_train_info(r).steps for r in alone_runs] and len(set(steps)) == 2  # one left early
    _assert_same_adapters(alone_runs, together_runs)


def test_a_group_writes_the_files_and_records_of_runs_trained_alone(without_dropout):
    alone, together, alone_runs, together_runs = without_dropout
    run_ids = [r.name for r in together_runs]
    for a, b in zip(alone_runs, together_runs):
        assert sorted(p.name for p in (a / "adapter").iterdir()) == sorted(p.name for p in (b / "adapter").iterdir())
        for name in ("adapter_config.json", "memlens_adapter.json", "README.md"):
            assert (a / "adapter" / name).read_text() == (b / "adapter" / name).read_text(), name
        assert json.loads((a / RunFile.CELL).read_text()) == json.loads((b / RunFile.CELL).read_text())
        pd.testing.assert_frame_equal(pd.read_parquet(a / RunFile.MEMBERS), pd.read_parquet(b / RunFile.MEMBERS))
        info_a, info_b = read_train_info(a).to_json(), read_train_info(b).to_json()
        assert info_b.pop("together") == {"size": 3, "run_ids": run_ids}
        assert info_b.pop("attention") == info_a.pop("attention") == "varlen"
        assert info_a.keys() == info_b.keys()
        for key in ("seed", "trainable_params", "total_params", "n_train_records", "canary", "real_tokens", "steps"):
            assert info_a[key] == info_b[key], key
        files = json.loads((b / RunFile.TRAIN).read_text())["artifacts"]
        assert set(files) == {f"adapter/{p.name}" for p in (b / "adapter").iterdir()}  # its own checksums
    assert len({read_train_info(r).trainable_params for r in together_runs}) == 2  # ranks 2 and 4


def _member_aucs(study, runs) -> list[float]:
    """AUC of the loss attack under each run (members: the run's records; non-members: the test split's)."""
    tokenizer = load_tokenizer(study.model)
    non_members = load_study_data(study.data).non_members.text.tolist()
    bank = AdapterBank(load_base_model(study.model))
    aucs = []
    for run in runs:
        members = read_members(run).text.tolist()
        batch = CausalLMCollator(tokenizer.pad_token_id)(
            [{"input_ids": x} for x in tokenize_records(members + non_members, tokenizer, 512)])
        bank.add(run.name, run)
        with bank.use(run.name) as model, torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
        mean_nll = (nll.sum(1) / (labels != -100).sum(1)).numpy()
        aucs.append(roc_auc_score(np.r_[np.ones(len(members)), np.zeros(len(non_members))], -mean_nll))
    return aucs


def test_with_dropout_each_adapter_draws_its_own_masks(with_dropout, without_dropout):
    """Dropout 0.1: the masks come from each adapter's stream, so the adapters (and their membership AUCs, over the
    seeds and recipes) are the ones trained alone; without those streams they would only be comparable."""
    alone, together, alone_runs, together_runs = with_dropout
    _assert_same_adapters(alone_runs, together_runs)
    no_dropout = [read_train_info(r).loss_curve for r in without_dropout[2]]
    assert all(read_train_info(r).loss_curve != c for r, c in zip(together_runs, no_dropout))  # dropout did draw
    aucs_alone, aucs_together = _member_aucs(alone, alone_runs), _member_aucs(together, together_runs)
    assert np.mean(aucs_together) == pytest.approx(np.mean(aucs_alone), abs=0.01)
    assert max(abs(a - b) for a, b in zip(aucs_alone, aucs_together)) < 0.02


def test_groups_share_matrices_and_dp_and_full_cells_train_alone(tmp_path, caplog):
    study = make_study(tmp_path, grid={"target_modules": [["q"], ["v"]], "rank": [2, 4], "seed": [0, 1],
                                       "noise_multiplier": [None, 1.0], "method": ["lora", "full"]},
                       train={"together": 3})
    cells = study.cells()
    with caplog.at_level(logging.WARNING, logger="memlens.train.together"):
        groups = training_groups(study, cells, announce=True)
    shared = [g for g in groups if len(g) > 1]
    assert [len(g) for g in shared] == [3, 3]  # 4 LoRA cells without DP per matrix set: 3 + 1
    assert all(len({tuple(c.target_modules) for c in g}) == 1 for g in groups)
    alone = [g[0] for g in groups if len(g) == 1]
    assert {c.method for c in alone if c.noise_multiplier is None} == {"lora", "full"}
    assert sorted(c.run_id(study) for g in groups for c in g) == sorted(c.run_id(study) for c in cells)
    assert "DP-SGD" in caplog.text and "full fine-tuning" in caplog.text
    one = study.model_copy(update={"train": study.train.model_copy(update={"together": 1})})
    assert all(len(g) == 1 for g in training_groups(one, cells))


def test_together_changes_no_run_id_and_may_change_in_a_folder(tmp_path):
    one, eight = make_study(tmp_path), make_study(tmp_path, train={"together": 8})
    assert [c.run_id(one) for c in one.cells()] == [c.run_id(eight) for c in eight.cells()]
    assert config_differences(one.model_dump(mode="json"), eight.model_dump(mode="json")) == []
    with pytest.raises(ValueError, match="together"):
        load_study(raw={**one.model_dump(mode="json"), "train": {"together": 0}})


def test_stacked_micro_batches_keep_records_and_rows_apart():
    """A padded micro-batch becomes one segment per row (positions from 0); labels shift within each row, so the
    next row's first token is never a target; a packed one keeps its own positions."""
    padded = CausalLMCollator(2)([{"input_ids": [0, 5, 6, 7]}, {"input_ids": [0, 8]}])
    packed = {"input_ids": torch.tensor([[0, 9, 0, 3, 2]]), "position_ids": torch.tensor([[0, 1, 0, 1, 0]]),
              "labels": torch.tensor([[-100, 9, -100, 3, -100]])}
    inputs, sizes, shifted = stack_micro_batches([padded, packed])
    assert sizes == [8, 5] and inputs["input_ids"].shape == (1, 13)
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 0, 1, 0]]
    assert shifted[0].tolist() == [[5, 6, 7, -100, 8, -100, -100, -100]]
    assert shifted[1].tolist() == [[9, -100, 3, -100, -100]]
    with pytest.raises(ValueError, match="right-padded"):
        stack_micro_batches([{**padded, "attention_mask": padded["attention_mask"].flip(1)}])


def test_a_killed_group_keeps_its_finished_runs_and_trains_the_rest(tmp_path, monkeypatch):
    """The adapter with fewer steps finishes (its run written) while another fails: the group stops with that
    error; the next call leaves the finished run as it is and trains only the missing one."""
    from memlens.train import together as together_module

    study = _study(tmp_path, 0.0, together=2, grid={"target_modules": [["q"]], "rank": [2],
                                                    "canary_copies": [1, 9], "seed": [0]})
    cells, data, layout = study.cells(), load_study_data(study.data), StudyLayout(study.out_dir)
    real_save = together_module._Group._save

    def save_then_die(self, adapter):
        if adapter == self.names[1]:  # the 9-copy cell: more steps, finishes last
            raise KeyboardInterrupt("killed")
        real_save(self, adapter)

    monkeypatch.setattr(together_module._Group, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt, match="killed"):
        finetune_group(study, [(c, data) for c in cells], layout)
    first, second = (layout.run_dir(c.run_id(study)) for c in cells)
    assert first.is_dir() and not second.exists() and not list(layout.runs.glob(".*"))
    written = (first / RunFile.TRAIN).stat().st_mtime_ns
    monkeypatch.setattr(together_module._Group, "_save", real_save)
    finetune_group(study, [(c, data) for c in cells], layout)
    assert second.is_dir() and (first / RunFile.TRAIN).stat().st_mtime_ns == written
    assert "together" not in read_train_info(second).to_json()  # the one left trained alone


def test_gpt2_fused_slices_train_together(tmp_path):
    """GPT-2: q is a slice of the fused c_attn, and the base model has dropout of its own (drawn from the group's
    stream: comparable to alone, not identical): both adapters train, on the q third only."""
    study = make_study(tmp_path, model={"name_or_path": str(GPT2_SMALL)}, data={"subset": 16},
                       grid={"target_modules": [["q"]], "rank": [2], "seed": [0, 1]},
                       train={"max_steps": 2, "batch_size": 4, "together": 2})
    data = load_study_data(study.data)
    runs = finetune_group(study, [(c, data) for c in study.cells()], StudyLayout(study.out_dir))
    for run in runs:
        weights = _weights(run)
        assert weights and all(".attn.c_attn.q.lora_" in k for k in weights)
        assert read_train_info(run).to_json()["together"]["size"] == 2
        assert all(np.isfinite(p["loss"]) for p in read_train_info(run).loss_curve)


def test_references_train_in_groups_each_holding_its_lock(tmp_path, monkeypatch):
    """`train.together: 2` and 3 references: references 0 and 1 train together, each one's lock held meanwhile, then
    reference 2 alone."""
    import fcntl
    import os

    from memlens.attacks import references as refs_module

    study = make_study(tmp_path / "study", mia={"references": 3, "attacks": ["ref_ratio", "lira"]},
                       train={"together": 2})
    layout, cell = StudyLayout(study.out_dir), study.cells()[0]
    ids = refs_module.reference_ids(study, cell)
    groups = []

    def locked(ref_id) -> bool:
        fd = os.open(layout.references.lock_file(ref_id), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def fake_group(study, members, data_of, layout, tokenizer=None, progress=None):
        groups.append([k for _, k in members])
        assert all(locked(ids[k]) for _, k in members)
        for _, k in members:
            layout.references.run_dir(ids[k]).mkdir(parents=True)
            (layout.references.run_dir(ids[k]) / RunFile.REFERENCE).write_text("{}")

    monkeypatch.setattr(refs_module, "train_reference_group", fake_group)
    monkeypatch.setattr(refs_module, "train_reference",
                        lambda study, cell, k, data, layout, tokenizer=None, progress=None:
                        fake_group(study, [(cell, k)], None, layout))
    data = load_study_data(study.data)
    assert refs_module.train_references(study, [cell], lambda c: data, layout) == ids
    assert groups == [[0, 1], [2]]
