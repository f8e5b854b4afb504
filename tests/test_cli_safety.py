"""Every command that writes a study folder takes its lock and checks its configuration, and nothing a
user wrote (record texts, config values, errors) is read as Rich markup."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from memlens.cli import app
from memlens.config import dump_study
from memlens.store import StudyLayout
from memlens.store.lock import StudyLock
from memlens.study import normalise_study, write_status
from tests.conftest import make_study

WRITERS = [["finetune"], ["attack", "mia"], ["attack", "extraction"], ["run"]]


@pytest.fixture
def folder(tmp_path):
    """A study folder as `memlens run` leaves it (its resolved study.yaml), and the study file."""
    study = normalise_study(make_study(tmp_path / "out", data={"subset": 24}))
    layout = StudyLayout(study.out_dir)
    layout.root.mkdir(parents=True)
    layout.study_file.write_text(dump_study(study))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study.model_dump(mode="json")))
    return path, layout


@pytest.mark.parametrize("command", WRITERS)
def test_writing_commands_refuse_a_changed_configuration(folder, command):
    path, layout = folder
    before = layout.study_file.read_text()
    result = CliRunner().invoke(app, [*command, str(path), "--set", "train.learning_rate=0.01"])
    assert result.exit_code == 2, result.output
    assert "train.learning_rate" in result.output and "different configuration" in result.output
    assert layout.study_file.read_text() == before  # the folder's truth is not rewritten
    assert not layout.runs.exists()


@pytest.mark.parametrize("command", [*WRITERS, ["report"]])
def test_writing_commands_refuse_a_locked_folder(folder, command):
    path, layout = folder
    target = str(layout.root) if command == ["report"] else str(path)
    with StudyLock(layout.root):
        result = CliRunner().invoke(app, [*command, target])
    assert result.exit_code == 2 and "being written by pid" in result.output, result.output
    assert not layout.runs.exists()


def test_status_prints_errors_with_brackets_as_they_are(folder):
    _, layout = folder
    text = "record '[INST] take 5 mg [/INST]' is in both splits [/] [bold]"
    write_status(layout, "q-r2-c1-s0-x", "failed", stage="finetune", error=ValueError(text))
    result = CliRunner().invoke(app, ["status", str(layout.root)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "[INST] take 5 mg [/INST]" in result.output and "[/] [bold]" in result.output


def test_errors_with_brackets_are_printed_as_they_are(folder):
    path, _ = folder
    result = CliRunner().invoke(app, ["run", str(path), "--set", "train.x[/]=1"])
    assert result.exit_code == 2
    assert "MarkupError" not in result.output and "x[/]" in result.output


def test_run_refuses_max_length_beyond_the_model_context(tmp_path):
    from memlens.config import ConfigError
    from memlens.runner import run_study
    from tests.conftest import GPT2_SMALL

    study = make_study(tmp_path / "out", model={"name_or_path": str(GPT2_SMALL)}, data={"max_length": 2048})
    with pytest.raises(ConfigError, match=r"data.max_length: 2048 .* \(512 tokens"):
        run_study(study, show_progress=False)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_a_full_disk_is_one_clear_line(folder, monkeypatch):
    import errno

    import memlens.cli

    path, layout = folder

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(layout.results_file))

    monkeypatch.setattr(memlens.cli, "run_study", full)
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "no space left" in result.output and "results.parquet" in result.output and "resume" in result.output


def test_files_and_run_folders_follow_the_umask(tmp_path):
    import os
    import stat

    from memlens.store import atomic_dir, atomic_write_json, atomic_write_parquet

    old = os.umask(0o002)  # a group-shared study folder
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        atomic_write_parquet(tmp_path / "b.parquet", __import__("pandas").DataFrame({"x": [1]}))
        with atomic_dir(tmp_path / "run") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o664
    assert stat.S_IMODE((tmp_path / "b.parquet").stat().st_mode) == 0o664
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o775


def test_results_column_order_does_not_depend_on_merge_order(tmp_path):
    import pandas as pd

    from memlens.store import read_results, upsert_results

    a = pd.DataFrame([{"run_id": "r1", "stage": "mia", "attack": "loss", "auc": 0.6, "n_members": 3}])
    b = pd.DataFrame([{"run_id": "r2", "stage": "extraction", "attack": "x", "exact_rate": 0.1, "rank": 2}])
    one, two = StudyLayout(tmp_path / "one"), StudyLayout(tmp_path / "two")
    for layout, order in ((one, (a, b)), (two, (b, a))):
        for rows in order:
            upsert_results(layout, rows)
    assert list(read_results(one).columns) == list(read_results(two).columns)
    assert list(read_results(one).columns)[:4] == ["run_id", "rank", "stage", "attack"]


def test_a_truncated_adapter_is_named_with_how_to_redo_it(tmp_path):
    from memlens.runner import run_study
    from memlens.store.records import TrainRecord

    study = normalise_study(make_study(tmp_path / "out", data={"subset": 16}, train={"max_steps": 1},
                                       extraction={"enabled": False}, mia={"enabled": False}))
    assert run_study(study, show_progress=False, report=False).ok
    layout = StudyLayout(study.out_dir)
    (run_id,) = layout.finished_runs()
    record = TrainRecord.load(layout.run_file(run_id, "train.json"))
    weights = layout.run_dir(run_id) / "adapter" / "adapter_model.safetensors"
    assert "adapter/adapter_model.safetensors" in record.artifacts
    weights.write_bytes(weights.read_bytes()[:100])  # truncated after the run finished

    enabled = study.model_copy(update={"mia": study.mia.model_copy(update={"enabled": True})})
    summary = run_study(enabled, show_progress=False, report=False)
    (outcome,) = summary.failed
    assert "CorruptArtifactError" in outcome.error and "adapter/adapter_model.safetensors" in outcome.error
    assert "run the same command again" in outcome.error


def test_full_fine_tuning_of_an_8bit_base_is_refused_before_any_work(tmp_path):
    from memlens.config import ConfigError
    from memlens.runner import run_study

    study = make_study(tmp_path / "out", model={"load_in_8bit": True}, grid={"method": ["lora", "full"]})
    with pytest.raises(ConfigError, match="load_in_8bit"):
        run_study(study, show_progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ refused before the folder is claimed (issue 28)
def test_a_stage_that_cannot_run_says_why_and_exits_non_zero(tmp_path):
    study = normalise_study(make_study(tmp_path / "out", data={"subset": 16}, extraction={"enabled": False}))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study.model_dump(mode="json")))
    layout = StudyLayout(study.out_dir)
    for command, said in ((["attack", "mia"], "mia needs finetune, which no cell of"),
                          (["run", "--only", "references"], "references is disabled in this study (mia.enabled: "
                                                            "True, mia.references: 0)"),
                          (["attack", "extraction"], "extraction is disabled in this study (extraction.enabled: "
                                                     "False)")):
        result = CliRunner().invoke(app, [*command, str(path)], env={"COLUMNS": "400"})
        assert result.exit_code == 2 and said in result.output, result.output
        assert not layout.study_file.exists()  # nothing claimed the folder
    assert "run `memlens finetune STUDY` first" in CliRunner().invoke(app, ["attack", "mia", str(path)]).output


def test_data_a_cell_cannot_use_is_refused_once_before_any_fine_tune(tmp_path):
    from memlens.config import ConfigError
    from memlens.runner import run_study

    # data.group names a column the utility split lacks: refused before study.yaml is written
    for split, rows in (("train", 6), ("test", 6), ("dev", 3)):
        records = [{"id": f"{split}{i}", "context": f"{split} record number {i}", **({"doc": f"d{i // 2}"}
                    if split != "dev" else {})} for i in range(rows)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="data.group: 'doc' is not a column of split 'dev'"):
        run_study(make_study(out, data={"source": str(tmp_path), "group": "doc", "subset": None}), show_progress=False)
    assert not (out / "study.yaml").exists()  # so the corrected study is not refused as another configuration
    # one record per side: the bag-of-words check cannot fold them (was: a failed cell after fine-tuning)
    with pytest.raises(ConfigError, match=r"mia.bag_of_words_baseline: .*needs at least 2 members and 2 non-members "
                                          r"\(it has 1 and 1\)"):
        run_study(make_study(out, data={"subset": 1}), show_progress=False)
    assert not (out / "study.yaml").exists()
    # records over data.max_length: said once, naming the longest record, before any fine-tune
    study = normalise_study(make_study(out, data={"max_length": 16}))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["run", str(path), "--no-progress"], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and result.output.count("data.max_length:") == 1, result.output
    assert "training record(s) exceed 16 tokens (longest" in result.output and ", record '" in result.output
    assert not (out / "study.yaml").exists() and not (out / "runs").exists()
