"""`memlens run` end to end: resumable after kill -9, study lock, incompatible folders, failures, status."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from memlens.attacks.references import is_trained
from memlens.cli import app
from memlens.config import load_study
from memlens.context import StudyContext
from memlens.executors import get_executor
from memlens.report import analyse
from memlens.runner import run_study
from memlens.store import StudyLayout, read_results
from memlens.store.lock import StudyLock, StudyLockedError
from memlens.study import (
    CellOutcome,
    IncompatibleStudyError,
    check_compatible,
    enabled_stages,
    normalise_study,
    read_status,
    study_status,
)
from memlens.study.cell import study_problems
from tests.conftest import make_study
from tests.test_runner_shared import GRID, shared_study, shared_study_raw


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return shared_study(tmp_path_factory)


def _study(out):
    return normalise_study(load_study(raw=shared_study_raw(out)))  # as the runner sees it (same run_ids)


def test_killed_mid_stage_then_resumed_completes_every_cell_once(shared):
    out, facts = shared
    assert facts["killed_in"] == "mia" and facts["rc"] == -9, facts
    after_kill = pd.DataFrame(facts["status_after_kill"])
    assert (after_kill.mia == "interrupted").any(), after_kill  # a dead run's stage is not shown as running
    assert facts["resume_rc"] == 0, facts["resume_stderr"]
    study = _study(out)
    layout = StudyLayout(out)
    cells = study.cells()
    assert len(cells) == 8 and sorted(layout.finished_runs()) == sorted(c.run_id(study) for c in cells)
    assert not [p for p in layout.runs.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    ctx = StudyContext(study)
    for cell in cells:
        for stage in enabled_stages(study):
            assert stage.done(ctx, cell.run_id(study))
    results = pd.read_parquet(out / "results.parquet")
    assert not results.duplicated(["run_id", "stage", "attack"]).any()
    per_run = pd.concat([pd.read_parquet(layout.run_dir(r) / "mia_results.parquet") for r in layout.finished_runs()])
    assert len(results[results.stage.isin(["mia", "utility", "dataset"])]) == len(per_run)  # each per-run row once
    assert set(results[results.stage == "mia"].run_id) == set(layout.finished_runs())
    scores = pd.read_parquet(out / "mia_scores.parquet")
    assert not scores.duplicated(["run_id", "sample_id"]).any()
    assert set(scores.run_id) == set(layout.finished_runs())
    status = study_status(out)
    assert (status[["finetune", "mia", "extraction"]] == "done").all().all() and status.error.isna().all()


def test_outputs_readable_without_memlens(shared):
    out, _ = shared
    con = duckdb.connect()
    n_runs, n_attacks = con.execute(
        f"select count(distinct run_id), count(distinct attack) from '{out}/results.parquet' where stage = 'mia'"
    ).fetchone()
    assert n_runs == 8 and n_attacks >= 2
    row = con.execute(f"select min(auc), max(auc) from '{out}/results.parquet' where stage = 'mia'").fetchone()
    assert 0 <= row[0] <= row[1] <= 1
    members = con.execute(f"select count(*) from '{out}/mia_scores.parquet' where is_member").fetchone()[0]
    assert members > 0
    assert con.execute(f"select count(*) from '{out}/extraction.parquet'").fetchone()[0] > 0
    assert con.execute(f"select count(*) from '{out}/exposure.parquet'").fetchone()[0] == 16  # ft + base per run
    stored = yaml.safe_load((out / "study.yaml").read_text())
    assert stored["grid"]["rank"] == GRID["rank"]
    env = json.loads((out / "environment.json").read_text())
    assert env["packages"]["torch"] and env["device"] == "cpu" and env["python"]
    assert "git_commit" in env


def test_rerun_does_nothing_and_keeps_files(shared):
    out, _ = shared
    layout = StudyLayout(out)
    before = {p: p.stat().st_mtime_ns for p in layout.runs.rglob("*.parquet")}
    results_before = (out / "results.parquet").stat().st_mtime_ns
    events = []
    summary = run_study(_study(out), on_event=events.append, show_progress=False)
    assert summary.ok and not events  # nothing to run
    assert all(o.state == "done" for o in summary.outcomes) and len(summary.outcomes) == 8
    assert {p: p.stat().st_mtime_ns for p in layout.runs.rglob("*.parquet")} == before
    assert (out / "results.parquet").stat().st_mtime_ns == results_before


def test_second_process_is_refused_while_locked(tmp_path):
    study = make_study(tmp_path / "out")
    with StudyLock(study.out_dir):
        with pytest.raises(StudyLockedError, match="being written by pid"):
            run_study(study, show_progress=False)
        assert StudyLock(study.out_dir).is_held()
        result = CliRunner().invoke(app, ["run", "--out", str(study.out_dir), str(_write(study, tmp_path))])
        assert result.exit_code == 2 and "being written by pid" in result.output
    assert not StudyLock(study.out_dir).is_held()
    assert not (study.out_dir / "runs").exists()  # refused before any work


def _write(study, folder):
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study.model_dump(mode="json")))
    return path


def test_incompatible_config_is_refused_naming_the_fields(shared):
    out, _ = shared
    layout = StudyLayout(out)
    raw = shared_study_raw(out)
    raw["data"]["subset"] = 30
    raw["lora"] = {"alpha": 8}
    with pytest.raises(IncompatibleStudyError) as err:  # (run_study calls check_compatible under the lock)
        check_compatible(normalise_study(load_study(raw=raw)), layout, force=[])
    assert "data.subset" in str(err.value) and "lora.alpha" in str(err.value)
    assert "model.name_or_path" not in str(err.value)
    grown = shared_study_raw(out)
    grown["grid"]["rank"] = [1, 2, 8]  # adding grid values is allowed
    grown["executor"] = {"kind": "local"}
    check_compatible(load_study(raw=grown), layout, force=[])
    changed_mia = shared_study_raw(out)
    changed_mia["mia"]["attacks"] = ["loss", "min_k@0.5"]
    with pytest.raises(IncompatibleStudyError, match="mia.attacks"):
        check_compatible(load_study(raw=changed_mia), layout, force=[])
    check_compatible(load_study(raw=changed_mia), layout, force=["mia"])


def test_cli_run_reports_a_failed_cell_and_keeps_going(tmp_path):
    """One cell names a matrix llama has not got: it fails with its traceback, the other cell completes,
    the exit code is 1, and status and report name the failure."""
    study = normalise_study(make_study(tmp_path / "out", grid={"target_modules": [["q"], ["c_attn"]]},
                                       data={"subset": 24}, extraction={"members": 4, "non_members": 4}))
    study_file = _write(study, tmp_path)
    result = CliRunner().invoke(app, ["run", str(study_file), "--no-progress"])
    assert result.exit_code == 1, result.output
    layout = StudyLayout(study.out_dir)
    good, bad = (c.run_id(study) for c in study.cells())
    assert all(s.done(StudyContext(study), good) for s in enabled_stages(study))
    record = read_status(layout, bad)
    assert record.state == "failed" and record.stage == "finetune"
    assert "c_attn" in record.error and "Traceback" in record.traceback
    assert bad in result.output and result.output.count(f"failed {bad}") == 1  # said once
    status = CliRunner().invoke(app, ["status", str(study.out_dir)])
    assert status.exit_code == 0 and "failed" in status.output
    frame = study_status(study.out_dir).set_index("run_id")
    assert frame.loc[bad, "finetune"] == "failed" and frame.loc[good, "mia"] == "done"
    page = (layout.report / "index.html").read_text()
    assert bad in page and "1 failure(s)" in page


def test_force_mia_recomputes_only_that_stage(tmp_path):
    study = normalise_study(make_study(tmp_path / "out", data={"subset": 24}, extraction={"enabled": False}))
    assert run_study(study, show_progress=False, report=False).ok
    layout = StudyLayout(study.out_dir)
    run_id = study.cells()[0].run_id(study)
    adapter = layout.run_dir(run_id) / "train.json"
    mia_file = layout.run_dir(run_id) / "mia_results.parquet"
    train_mtime, mia_mtime = adapter.stat().st_mtime_ns, mia_file.stat().st_mtime_ns
    summary = run_study(study, force=["mia"], show_progress=False, report=False)
    assert summary.ok
    assert adapter.stat().st_mtime_ns == train_mtime and mia_file.stat().st_mtime_ns > mia_mtime
    results = pd.read_parquet(study.out_dir / "results.parquet")
    assert not results.duplicated(["run_id", "stage", "attack"]).any()
    with pytest.raises(Exception, match="unknown stage"):
        run_study(study, force=["mia-typo"], show_progress=False)


def test_executor_registry():
    assert type(get_executor(make_study(Path("unused")).executor)).__name__ == "LocalExecutor"
    outcome = CellOutcome.from_dict({"run_id": "r", "state": "failed", "error": "x", "stages_done": ["finetune"]})
    assert outcome.to_dict() == {"run_id": "r", "state": "failed", "error": "x", "stages_done": ["finetune"]}


# ------------------------------------------------------------------------------- damaged files (issue 28)
def _tiny(out: Path):
    """One cell (fine-tune, mia, extraction with an inserted secret) on 16 records, two training steps."""
    return normalise_study(make_study(out, data={"subset": 16}, train={"max_steps": 2}, canary={"mode": "insert"},
                                      extraction={"members": 2, "non_members": 2, "exposure_candidates": 20,
                                                  "max_new_tokens": 8, "decodings": [{"name": "greedy"}]}))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A small finished study folder that each damaged-file test copies."""
    out = tmp_path_factory.mktemp("finished") / "out"
    assert run_study(_tiny(out), show_progress=False, report=False).ok
    return out


def _copy(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    layout = StudyLayout(out)
    (run_id,) = layout.finished_runs()
    return _tiny(out), layout, run_id


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in ("run_id", "stage", "attack", "sample_id", "model", "decoding") if c in frame]
    return frame.sort_values(keys).reset_index(drop=True)[sorted(frame.columns)]


MERGED = ("results.parquet", "mia_scores.parquet", "extraction.parquet", "exposure.parquet")


def test_truncated_merged_files_are_flagged_then_rebuilt_from_the_runs(finished, tmp_path):
    study, layout, _ = _copy(finished, tmp_path)
    before = {name: pd.read_parquet(layout.root / name) for name in MERGED}
    for name in MERGED:
        _truncate(layout.root / name)
    problems = study_problems(layout.root)
    assert len(problems) == len(MERGED) and all("memlens run" in p for p in problems)
    assert {name for name in MERGED if any(str(layout.root / name) in p for p in problems)} == set(MERGED)
    shown = CliRunner().invoke(app, ["status", str(layout.root)], env={"COLUMNS": "400"})
    assert shown.exit_code == 0 and "damaged: " in shown.output and "results.parquet" in shown.output
    report = CliRunner().invoke(app, ["report", str(layout.root)])  # read, never guessed: one line saying how
    assert report.exit_code == 2 and "results.parquet cannot be read" in report.output
    assert "Traceback" not in report.output and "memlens run" in report.output

    assert run_study(study, show_progress=False, report=False).ok
    for name, frame in before.items():
        pd.testing.assert_frame_equal(_sorted(pd.read_parquet(layout.root / name)), _sorted(frame))
    assert study_problems(layout.root) == []


def test_damaged_caches_are_computed_again_with_the_same_results(finished, tmp_path, caplog):
    """The base-model scores, the bag-of-words check and the extraction control are caches: truncated, each is
    named in a warning, removed and computed again; the results do not change."""
    study, layout, _ = _copy(finished, tmp_path)
    caches = sorted(p for p in layout.cache.iterdir() if p.is_file())
    assert {p.suffix for p in caches} >= {".npz", ".json", ".parquet"}, caches
    before = read_results(layout)
    for path in caches:
        _truncate(path)
    assert run_study(study, force=["mia", "extraction"], show_progress=False, report=False).ok
    assert all(f"{path}: unreadable cache file" in caplog.text for path in caches)
    measured = [c for c in before.columns if c not in ("mia_wall_time_s",)]
    pd.testing.assert_frame_equal(_sorted(read_results(layout)[measured]), _sorted(before[measured]))


@pytest.mark.parametrize("name, stage", [("mia_scores.parquet", "mia"), ("extraction_results.parquet", "extraction")])
def test_a_truncated_per_run_file_makes_its_stage_damaged_and_run_redoes_it(finished, tmp_path, name, stage):
    study, layout, run_id = _copy(finished, tmp_path)
    rows = read_results(layout)
    _truncate(layout.run_file(run_id, name))
    row = study_status(layout.root).set_index("run_id").loc[run_id]
    assert row[stage] == "damaged" and row.finetune == "done"
    assert str(layout.run_file(run_id, name)) in row.error and f"redoes the {stage} stage" in row.error

    assert run_study(study, show_progress=False, report=False).ok
    assert pd.read_parquet(layout.run_file(run_id, name)).shape[0] > 0
    assert (study_status(layout.root)[["finetune", "mia", "extraction"]] == "done").all().all()
    again = read_results(layout)
    assert again.groupby("stage").size().to_dict() == rows.groupby("stage").size().to_dict()


def _garbage(path: Path) -> None:
    path.write_text("garbage\n")


@pytest.mark.parametrize("name, damage", [("cell.json", _garbage), ("train.json", _garbage),
                                          ("members.parquet", _truncate),
                                          ("adapter/adapter_model.safetensors", Path.unlink)])
def test_a_damaged_fine_tune_is_named_with_the_one_command_that_redoes_it(finished, tmp_path, name, damage):
    study, layout, run_id = _copy(finished, tmp_path)
    run_dir = layout.run_dir(run_id)
    damage(run_dir / name)
    row = study_status(layout.root).set_index("run_id").loc[run_id]
    assert row.finetune == "damaged" and name in row.error and f"rm -r {run_dir}" in row.error

    summary = run_study(study, show_progress=False, report=False)
    (outcome,) = summary.failed  # one error naming the file and how to redo the cell; nothing deleted unasked
    last = outcome.error.strip().splitlines()[-1]
    assert "CorruptArtifactError" in last and name in last and f"rm -r {run_dir}" in last
    assert (run_dir / "mia_results.parquet").exists() and (layout.root / "results.parquet").exists()
    assert any(f.run_id == run_id and name in f.error for f in analyse(layout.root).failures)  # in the report
    if name.startswith("adapter/"):  # the command it names repairs it
        shutil.rmtree(run_dir)
        assert run_study(study, show_progress=False, report=False).ok
        assert (study_status(layout.root)[["finetune", "mia", "extraction"]] == "done").all().all()


def test_garbage_status_environment_and_reference_records_do_not_mislead(finished, tmp_path):
    study, layout, run_id = _copy(finished, tmp_path)
    _garbage(layout.status_file(run_id))
    _garbage(layout.environment_file)
    status = study_status(layout.root)
    assert (status[["finetune", "mia", "extraction"]] == "done").all().all() and status.error.isna().all()
    assert analyse(layout.root).environment.device is None  # not recorded, not a crash
    assert run_study(study, show_progress=False, report=False).ok
    assert json.loads(layout.environment_file.read_text())["device"] == "cpu"
    stray = layout.runs / "q-r9-c1-s0-of-another-grid"  # a run outside the grid: its cell.json says which cell
    shutil.copytree(layout.run_dir(run_id), stray)
    _garbage(stray / "cell.json")
    (problem,) = study_problems(layout.root)
    assert str(stray / "cell.json") in problem and f"rm -r {stray}" in problem
    reference = layout.references.run_file("ref-x", "reference.json")
    reference.parent.mkdir(parents=True)
    _garbage(reference)
    assert not is_trained(layout, "ref-x")  # trained (its reference.json written) again by the next run


def test_a_study_whose_every_cell_failed_still_gets_its_report(tmp_path):
    study = normalise_study(make_study(tmp_path / "out", grid={"target_modules": [["c_attn"]]}, data={"subset": 16}))
    result = CliRunner().invoke(app, ["run", str(_write(study, tmp_path)), "--no-progress"])
    assert result.exit_code == 1 and "report failed" not in result.output, result.output
    (run_id,) = (c.run_id(study) for c in study.cells())
    assert result.output.count(f"failed {run_id}") == 1  # said once
    page = (study.out_dir / "report" / "index.html").read_text()
    assert "Nothing to report yet" in page and 'id="failures"' in page and run_id in page
    assert 'id="table"' not in page  # no section of empty omissions
