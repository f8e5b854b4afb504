"""`memlens run` end to end: resumable after kill -9, study lock, incompatible folders, failures, status."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from memlens.cli import app
from memlens.config import load_study
from memlens.context import StudyContext
from memlens.executors import get_executor
from memlens.runner import run_study
from memlens.store import StudyLayout
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
    assert len(results[results.stage.isin(["mia", "utility"])]) == len(per_run)  # each per-run row exactly once
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
    assert bad in result.output
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
