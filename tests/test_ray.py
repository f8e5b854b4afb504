"""The Ray executor on a real local Ray instance (one per module: Ray takes seconds to start).

A 4-cell llama-tiny study run on Ray must give what the local executor gives, bit for bit; a worker
killed in the middle of a cell is retried by Ray and the study completes; a cell whose worker died
with no retries left is reported failed and a rerun finishes it, each cell once in the results.
"""

from __future__ import annotations

import json
import threading
import time

import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'memlens[ray]'); CI installs it")
psutil = pytest.importorskip("psutil", reason="psutil comes with ray[default]")

from safetensors.numpy import load_file  # noqa: E402

from memlens.executors.local import LocalExecutor  # noqa: E402
from memlens.executors.ray import TASK_PREFIX  # noqa: E402
from memlens.runner import normalise_study, read_status, run_study  # noqa: E402
from memlens.store import StudyLayout, read_results  # noqa: E402
from tests.conftest import make_study  # noqa: E402

GRID = {"target_modules": [["q"], ["v"]], "rank": [2], "canary_copies": [1], "seed": [0, 1]}


def tiny_study(out, executor: dict | None = None, **grid):
    """A study as `run_study` sees it (normalised: the run_ids of its cells are the real ones)."""
    return normalise_study(make_study(
        out,
        data={"subset": 16},
        grid={**GRID, **grid},
        train={"max_steps": 2, "batch_size": 8},
        mia={"bootstrap": 10, "bag_of_words_baseline": False},
        extraction={"members": 2, "non_members": 2, "max_new_tokens": 8},
        executor={"kind": "ray", "num_cpus": 1, **(executor or {})} if executor is not None else {"kind": "local"},
    ))


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The reference: the same 4 cells with the local executor, one cell at a time as a Ray task runs
    them (its default batches a stage across cells, and extraction's base-model perplexities then
    depend on the batch's other prompts in the last float bits)."""
    study = tiny_study(tmp_path_factory.mktemp("local"))
    outcomes = LocalExecutor(batch_stages=False).run(study, study.cells(), lambda event: None)
    assert [o.state for o in outcomes] == ["done"] * 4, [o.error for o in outcomes]
    return study


def run_files(layout: StudyLayout, run_id: str) -> dict:
    """Everything a run computed (wall times excluded), to compare two runs exactly."""
    run_dir = layout.run_dir(run_id)
    train = json.loads((run_dir / "train.json").read_text())
    files = {"train": {k: v for k, v in train.items() if k not in ("wall_time_s", "train_tokens_per_s")}}
    files["adapter"] = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    for name in sorted(p.name for p in run_dir.glob("*.parquet")):
        files[name] = without_timings(pd.read_parquet(run_dir / name))
    return files


def without_timings(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in frame.columns if "time" in c])


def assert_same_run(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert a["train"] == b["train"]
    assert a["adapter"].keys() == b["adapter"].keys()
    for name, tensor in a["adapter"].items():
        assert (tensor == b["adapter"][name]).all(), name
    for name in a:
        if name.endswith(".parquet"):
            pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)


def comparable_results(layout: StudyLayout, run_ids) -> pd.DataFrame:
    results = read_results(layout)
    return without_timings(results[results.run_id.isin(run_ids)]).reset_index(drop=True)


def assert_each_cell_once(layout: StudyLayout, run_ids) -> None:
    results = read_results(layout)
    assert set(results.run_id) == set(run_ids)
    assert not results.duplicated(["run_id", "stage", "attack"]).any()
    assert {"mia", "extraction"} <= set(results.stage)
    for stage in ("mia", "extraction"):  # every cell has rows of every stage
        assert set(results[results.stage == stage].run_id) == set(run_ids), stage


def test_ray_matches_local_bit_for_bit(ray_instance, local_run, tmp_path):
    study = tiny_study(tmp_path / "ray", executor={"max_concurrent": 2})
    events = []
    summary = run_study(study, report=False, show_progress=False, on_event=events.append)

    assert summary.ok, [o.error for o in summary.failed]
    run_ids = [c.run_id(study) for c in study.cells()]
    assert len(run_ids) == 4 and [c.run_id(local_run) for c in local_run.cells()] == run_ids
    assert [o.run_id for o in summary.outcomes] == run_ids
    assert {(e.run_id, e.state) for e in events} == {(r, s) for r in run_ids for s in ("running", "done")}

    ray_layout, local_layout = StudyLayout(study.out_dir), StudyLayout(local_run.out_dir)
    assert ray_layout.finished_runs() == local_layout.finished_runs() == sorted(run_ids)
    for run_id in run_ids:
        assert_same_run(run_files(ray_layout, run_id), run_files(local_layout, run_id))
        assert read_status(ray_layout, run_id)["state"] == "done"
    pd.testing.assert_frame_equal(comparable_results(ray_layout, run_ids),
                                  comparable_results(local_layout, run_ids), check_exact=True)
    assert_each_cell_once(ray_layout, run_ids)
    for merged in ("mia_scores.parquet", "extraction.parquet"):  # study-level merges hold every run
        frame = pd.read_parquet(study.out_dir / merged)
        assert set(frame.run_id) == set(run_ids), merged


class WorkerKiller(threading.Thread):
    """Kills (SIGKILL) the first Ray worker seen running a memlens cell task, once."""

    def __init__(self):
        super().__init__(daemon=True)
        self.killed: list[str] = []  # process titles of the killed workers
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and not self.killed:
            for proc in psutil.process_iter(["cmdline"]):
                title = " ".join(proc.info["cmdline"] or [])
                if title.startswith("ray::" + TASK_PREFIX):
                    time.sleep(0.5)  # let it get into the cell's work
                    proc.kill()
                    self.killed.append(title)
                    return
            time.sleep(0.05)


def run_with_killer(study):
    killer = WorkerKiller()
    killer.start()
    try:
        summary = run_study(study, report=False, show_progress=False)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed, "no cell task was seen running, so none was killed"
    return summary, killer


def test_killed_worker_is_retried_and_study_completes(ray_instance, local_run, tmp_path):
    study = tiny_study(tmp_path / "ray", executor={"max_retries": 2}, seed=[0])  # 2 of the 4 cells
    summary, killer = run_with_killer(study)

    assert summary.ok, [o.error for o in summary.failed]
    run_ids = [c.run_id(study) for c in study.cells()]
    layout, local_layout = StudyLayout(study.out_dir), StudyLayout(local_run.out_dir)
    assert layout.finished_runs() == sorted(run_ids)
    assert not list(layout.runs.glob(".*"))  # the killed attempt's temp folder was cleaned up
    assert_each_cell_once(layout, run_ids)
    for run_id in run_ids:  # the retried cell computed exactly what the local executor did
        assert_same_run(run_files(layout, run_id), run_files(local_layout, run_id))


def test_worker_death_without_retries_fails_the_cell_then_a_rerun_finishes(ray_instance, tmp_path):
    study = tiny_study(tmp_path / "ray", executor={"max_retries": 0}, target_modules=[["q"]], seed=[0])
    (run_id,) = [c.run_id(study) for c in study.cells()]
    summary, killer = run_with_killer(study)

    assert [o.state for o in summary.outcomes] == ["failed"]
    assert "Worker" in summary.outcomes[0].error  # Ray's WorkerCrashedError, with its traceback
    status = read_status(StudyLayout(study.out_dir), run_id)
    assert status["state"] == "failed" and status["traceback"]

    again = run_study(study, report=False, show_progress=False)
    assert again.ok, [o.error for o in again.failed]
    assert read_status(StudyLayout(study.out_dir), run_id)["state"] == "done"
    assert_each_cell_once(StudyLayout(study.out_dir), [run_id])
