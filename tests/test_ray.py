"""The Ray executor on a real local Ray instance (one per module: Ray takes seconds to start).

A 4-cell llama-tiny study run on Ray must give what the local executor gives, bit for bit; a worker
killed in the middle of a cell is retried by Ray and the study completes; a cell whose worker died
with no retries left is reported failed and a rerun finishes it; a driver killed mid-sweep and run
again finishes the sweep without redoing finished cells. Each cell appears once in the results.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'memlens[ray]'); CI installs it")
psutil = pytest.importorskip("psutil", reason="psutil comes with ray[default]")

from safetensors.numpy import load_file  # noqa: E402

from memlens.config import ConfigError, ExecutorConfig  # noqa: E402
from memlens.context import StudyContext  # noqa: E402
from memlens.executors.local import LocalExecutor  # noqa: E402
from memlens.executors.ray import TASK_PREFIX, RayExecutor  # noqa: E402
from memlens.runner import (
    merge_study_files,  # noqa: E402
    run_study,  # noqa: E402
)
from memlens.store import StudyLayout, read_results  # noqa: E402
from memlens.study import normalise_study, read_status, study_status  # noqa: E402
from tests.conftest import make_study  # noqa: E402

# One Ray instance and one local reference run for the whole module: keep its tests on one xdist
# worker (effective with `pytest -n 2 --dist loadgroup`).
pytestmark = pytest.mark.xdist_group("ray")

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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray workers (num_cpus 1); 2x faster on a busy 2-core machine
    try:
        ctx = StudyContext(study)
        outcomes = LocalExecutor(batch_stages=False).run(ctx, study.cells(), lambda event: None)
        merge_study_files(ctx)  # as run_study does after every executor
    finally:
        torch.set_num_threads(threads)
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
    # One cell at a time, in the local order: extraction caches the base model's generations and
    # perplexities across runs, computed in the batch of the first run that needed them, so which run
    # came first shows in the last float bits of ppl_base / ppl_generated. (Concurrency: next test.)
    study = tiny_study(tmp_path / "ray", executor={"max_concurrent": 1})
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
        assert read_status(ray_layout, run_id).state == "done"
    pd.testing.assert_frame_equal(comparable_results(ray_layout, run_ids),
                                  comparable_results(local_layout, run_ids), check_exact=True)
    assert_each_cell_once(ray_layout, run_ids)
    for merged in ("mia_scores.parquet", "extraction.parquet"):  # study-level merges hold every run
        frame = pd.read_parquet(study.out_dir / merged)
        assert set(frame.run_id) == set(run_ids), merged
    status = study_status(study.out_dir)  # `memlens status` on a Ray-run study
    assert set(status.run_id) == set(run_ids)
    assert (status[["finetune", "mia", "extraction"]] == "done").all().all()


def test_request_no_node_can_satisfy_is_refused(ray_instance, tmp_path):
    study = tiny_study(tmp_path / "ray", executor={}, target_modules=[["q"]], seed=[0])
    executor = RayExecutor(ExecutorConfig(kind="ray", num_gpus=1))  # the local Ray has no GPU
    with pytest.raises(ConfigError, match=r"executor\.num_gpus"):
        executor.run(StudyContext(study), study.cells(), lambda event: None)
    assert not StudyLayout(study.out_dir).runs.exists()


class WorkerKiller(threading.Thread):
    """Kills (SIGKILL) the first Ray worker seen running a cell task of this study, once. Matching the
    study's run_ids (not any cell task) keeps a worker of an earlier test, still titled with its last
    task, from being mistaken for this study's."""

    def __init__(self, run_ids: list[str]):
        super().__init__(daemon=True)
        self.titles = tuple(f"ray::{TASK_PREFIX}{run_id}" for run_id in run_ids)
        self.killed: list[str] = []  # process titles of the killed workers
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and not self.killed:
            for proc in psutil.process_iter(["cmdline"]):
                title = " ".join(proc.info["cmdline"] or [])
                if title.startswith(self.titles):
                    time.sleep(0.5)  # let it get into the cell's work
                    proc.kill()
                    self.killed.append(title)
                    return
            time.sleep(0.05)


def run_with_killer(study):
    killer = WorkerKiller([c.run_id(study) for c in study.cells()])
    killer.start()
    try:
        summary = run_study(study, report=False, show_progress=False)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed, "no cell task was seen running, so none was killed"
    return summary, killer


def test_killed_worker_is_retried_and_study_completes(ray_instance, local_run, tmp_path):
    # two cells at once; same seed, hence the same extraction targets, so their order does not matter
    study = tiny_study(tmp_path / "ray", executor={"max_retries": 2, "max_concurrent": 2}, seed=[0])
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
    assert status.state == "failed" and status.traceback

    again = run_study(study, report=False, show_progress=False)
    assert again.ok, [o.error for o in again.failed]
    assert read_status(StudyLayout(study.out_dir), run_id).state == "done"
    assert_each_cell_once(StudyLayout(study.out_dir), [run_id])


DRIVER = """
import json, sys
from memlens.config import load_study
from memlens.runner import run_study
run_study(load_study(raw=json.loads(sys.argv[1])), report=False, show_progress=False)
"""


def cell_running(run_id: str) -> bool:
    return any(" ".join(p.info["cmdline"] or []).startswith(f"ray::{TASK_PREFIX}{run_id}")
               for p in psutil.process_iter(["cmdline"]))


def test_killed_driver_then_rerun_finishes_each_cell_once(ray_instance, tmp_path):
    study = tiny_study(tmp_path / "ray", executor={"max_concurrent": 1}, seed=[1])  # 2 cells, one at a time
    first, second = [c.run_id(study) for c in study.cells()]
    layout = StudyLayout(study.out_dir)
    raw = study.model_dump(mode="json")
    raw["executor"]["address"] = ray.get_runtime_context().gcs_address  # a second driver on this Ray
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(raw)],
                              cwd=Path(__file__).resolve().parents[1])
    try:  # kill -9 the driver once the first cell is done and the second is running
        deadline = time.monotonic() + 600
        while getattr(read_status(layout, first), "state", None) != "done" or not cell_running(second):
            assert driver.poll() is None, "the driver ended before it could be killed"
            assert time.monotonic() < deadline, "the first cell never finished"
            time.sleep(0.05)
    finally:
        driver.kill()
        driver.wait()
    assert not (layout.run_dir(second) / "extraction_results.parquet").exists()  # killed mid-cell
    first_trained = (layout.run_dir(first) / "train.json").stat().st_mtime_ns

    summary = run_study(study, report=False, show_progress=False)  # the rerun, on the same Ray

    assert summary.ok, [o.error for o in summary.failed]
    assert (layout.run_dir(first) / "train.json").stat().st_mtime_ns == first_trained  # not redone
    assert_each_cell_once(layout, [first, second])
    for run_id in (first, second):
        assert read_status(layout, run_id).state == "done"


def test_a_worker_trains_a_group_as_the_local_executor_does(ray_instance, tmp_path):
    """`train.together: 2`: a Ray task gets a training group ([q] seeds 0 and 1), its adapters trained in one pass,
    bit for bit what the local executor's group trains."""
    def together(out, executor):
        study = tiny_study(out, executor=executor, target_modules=[["q"]])
        return study.model_copy(update={"train": study.train.model_copy(update={"together": 2})})

    local, remote = together(tmp_path / "local", None), together(tmp_path / "ray", {"max_concurrent": 2})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray workers
    try:
        assert run_study(local, only=["finetune"], report=False, show_progress=False).ok
    finally:
        torch.set_num_threads(threads)
    summary = run_study(remote, only=["finetune"], report=False, show_progress=False)
    assert summary.ok and {o.state for o in summary.outcomes} == {"pending"}  # mia and extraction left
    run_ids = [c.run_id(remote) for c in remote.cells()]
    for run_id in run_ids:
        a, b = run_files(StudyLayout(local.out_dir), run_id), run_files(StudyLayout(remote.out_dir), run_id)
        assert a["train"]["together"] == b["train"]["together"] and a["train"]["together"]["size"] == 2
        assert_same_run(a, b)
