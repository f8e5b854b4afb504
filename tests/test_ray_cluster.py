"""A real two-node Ray cluster on this machine losing its worker node mid-study, and the shared-folder check.

`test_cluster_losing_a_node_finishes_like_local` starts a head (`ray start --head`) and a worker node
(`ray start --address ...`) as two separate process trees with one CPU each, runs a 2-cell study through
`run_study` with `executor.address` set to the head, kills (SIGKILL) every process of the worker node
while it runs a cell, and checks that Ray retried that cell on the head and that every file the study
computed is identical to the local executor's (adapter tensors bit for bit, results, MIA scores,
extraction; the adapter's config compared as data, see comparable_run). The cluster is stopped by killing its own
processes (not `ray stop`, which would also stop any other Ray on the machine), also when the test fails.

The other tests check, without a cluster, what a task does on a node that does not see the driver's
study folder (see docs/cluster.md): it fails its cell with a message and writes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

try:
    import psutil  # comes with ray[default]
except ImportError:  # only the cluster test needs it (and skips without it)
    psutil = None

from memlens.executors.ray import (
    SHARED_CHECK_FILE,
    StudyFolderNotShared,
    cell_task,
    prepare_task,
)
from memlens.store import StudyLayout
from memlens.study import normalise_study
from tests.conftest import make_study

pytestmark = pytest.mark.xdist_group("ray")  # with tests/test_ray.py: one xdist worker runs every Ray test

REPO = Path(__file__).resolve().parents[1]
STARTUP_S = 90  # for a node to come up on a busy 2-core machine


# ------------------------------------------------------------------------------------ the cluster
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_auth_mode() -> str:
    """The token-authentication mode this process's `ray.init(address=...)` will use (Ray 2.60: the
    RAY_AUTH_MODE variable, else `token` when a token exists), so the cluster is started with the same."""
    if os.environ.get("RAY_AUTH_MODE"):
        return os.environ["RAY_AUTH_MODE"]
    has_token = (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                 or (Path.home() / ".ray" / "auth_token").exists())
    return "token" if has_token else "disabled"


class RayNode:
    """One Ray node: a `ray start --block` process, in a session of its own, and every process it starts
    (GCS, raylet, agents, and the raylet's workers)."""

    def __init__(self, name: str, args: list[str], env: dict, temp_dir: Path):
        self.name = name
        self.log = temp_dir / f"{name}.log"
        # Every port explicit: two nodes on one machine must not both take Ray's fixed defaults.
        ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
        command = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--num-cpus", "1",
                   "--temp-dir", str(temp_dir / name), "--object-store-memory", str(100 * 2**20),
                   "--disable-usage-stats", *[a for p in ports for a in (p, str(free_port()))], *args]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.seen: set[int] = {self.proc.pid}  # every pid of this node ever listed, for the final check

    def processes(self) -> list:
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self.seen.update(p.pid for p in procs)
        return procs

    def pids(self) -> set[int]:
        return {p.pid for p in self.processes()}

    def kill(self) -> None:
        """SIGKILL every process of the node: stop them all first (a stopped raylet starts no new worker and a
        stopped parent keeps its children in the tree), then kill them."""
        stopped: dict[int, object] = {}
        for _ in range(20):
            new = [p for p in self.processes() if p.pid not in stopped]
            if not new:
                break
            for proc in new:
                try:
                    proc.suspend()
                except psutil.NoSuchProcess:
                    pass
                stopped[proc.pid] = proc
        for proc in stopped.values():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        psutil.wait_procs(list(stopped.values()), timeout=30)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


class TwoNodeCluster:
    """A head and one worker node on this machine, one CPU each. `address` is the head's GCS on 127.0.0.1.

    Ray 2.60 advertises this machine's own address instead of a loopback one (`ray start` replaces
    `--node-ip-address 127.0.0.1` by it) and binds its servers on every interface, as the local Ray of
    tests/test_ray.py does; all traffic stays on this machine."""

    def __init__(self):
        self.temp_dir = Path(tempfile.mkdtemp(prefix="mlray", dir="/tmp"))  # short: Ray's socket paths
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                    "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": ray_auth_mode()}
        self.nodes: list[RayNode] = []
        self.head: RayNode | None = None
        self.worker: RayNode | None = None

    def start(self) -> None:
        self.head = self._start("head", ["--head", "--port", str(self.port), "--include-dashboard", "false",
                                         "--dashboard-port", str(free_port()),
                                         "--ray-client-server-port", str(free_port())])
        self._wait_for(1)
        self.worker = self._start("worker", ["--address", self.address])
        self._wait_for(2)

    def _start(self, name: str, args: list[str]) -> RayNode:
        node = RayNode(name, args, self.env, self.temp_dir)
        self.nodes.append(node)
        return node

    def _wait_for(self, count: int) -> None:
        """Until `count` nodes are alive, asked through `ray status` (the driver must not connect yet:
        memlens connects and disconnects by itself)."""
        deadline = time.monotonic() + STARTUP_S
        while True:
            for node in self.nodes:
                assert node.alive(), f"the {node.name} node exited:\n{node.tail()}"
            status = subprocess.run([str(Path(sys.executable).with_name("ray")), "status", "--address",
                                     self.address], env=self.env, capture_output=True, text=True, check=False)
            active = status.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
            if status.returncode == 0 and active.count("node_") >= count:
                return
            assert time.monotonic() < deadline, f"{count} node(s) not up after {STARTUP_S}s:\n" + \
                "\n".join(n.tail() for n in self.nodes) + status.stdout + status.stderr
            time.sleep(1)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.kill()
        left = [p for node in self.nodes for p in node.seen if psutil.pid_exists(p) and not _zombie(p)]
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        assert not left, f"Ray processes still running after the cluster was stopped: {left}"


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class NodeKiller(threading.Thread):
    """Kills every process of `node` once it runs a cell task of this study (after `delay` seconds in it)."""

    def __init__(self, node: RayNode, titles: dict[str, str], delay: float = 1.0):
        super().__init__(daemon=True)
        self.node, self.titles, self.delay = node, titles, delay
        self.killed: str | None = None  # run_id of the cell that was running on the node
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for proc in self.node.processes():
                try:
                    title = " ".join(proc.cmdline())
                except psutil.Error:
                    continue
                run_id = next((r for t, r in self.titles.items() if title.startswith(t)), None)
                if run_id is not None:
                    time.sleep(self.delay)  # into the cell's work (loading, training)
                    self.node.kill()
                    self.killed = run_id
                    return
            time.sleep(0.05)


class NodeWatcher(threading.Thread):
    """Lists the processes of `node` until stopped (they land in `node.seen`): Ray ends idle workers, so
    which node a finished task ran on is only known from a listing made while it ran."""

    def __init__(self, node: RayNode):
        super().__init__(daemon=True)
        self.node = node
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.node.processes()
            time.sleep(0.1)


def comparable_run(layout: StudyLayout, run_id: str) -> dict:
    """tests/test_ray.py's run_files, with the adapter's config read as data: PEFT keeps target_modules
    as a set and saves it in the process's string-hash order (PYTHONHASHSEED), so adapter_config.json,
    and its digest in train.json, differ between two processes that trained the same adapter."""
    from tests.test_ray import run_files

    files = run_files(layout, run_id)
    config = json.loads((layout.run_dir(run_id) / "adapter" / "adapter_config.json").read_text())
    config["target_modules"] = sorted(config["target_modules"])
    files["adapter_config"] = config
    files["train"]["artifacts"].pop("adapter/adapter_config.json")
    return files


# ------------------------------------------------------------------------------------ the test
@pytest.mark.slow
def test_cluster_losing_a_node_finishes_like_local(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'memlens[ray]'); CI installs it")
    pytest.importorskip("psutil", reason="psutil comes with ray[default]")
    from memlens.context import StudyContext
    from memlens.executors.local import LocalExecutor
    from memlens.executors.ray import TASK_PREFIX
    from memlens.runner import merge_study_files, run_study
    from memlens.study import read_status
    from tests.test_ray import (
        assert_each_cell_once,
        assert_same_run,
        comparable_results,
        tiny_study,
    )

    assert not ray.is_initialized(), "this process is connected to another Ray; memlens would use that one"
    started = time.monotonic()

    # The reference, with the local executor into another folder, one cell at a time and one torch thread,
    # as a Ray task runs a cell (its default batches a stage across cells; extraction's base-model
    # perplexities then differ in the last float bits). Seed 0 only: both cells have the same extraction
    # targets, so which one the cluster finishes first does not show.
    local = tiny_study(tmp_path / "local", seed=[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local_ctx = StudyContext(local)
        local_outcomes = LocalExecutor(batch_stages=False).run(local_ctx, local.cells(), lambda event: None)
        merge_study_files(local_ctx)  # as run_study does after every executor
    finally:
        torch.set_num_threads(threads)
    assert [o.state for o in local_outcomes] == ["done", "done"], [o.error for o in local_outcomes]
    local_s = time.monotonic() - started

    cluster = TwoNodeCluster()
    threads_started: list[threading.Thread] = []
    try:
        cluster.start()
        cluster_s = time.monotonic() - started - local_s
        study = tiny_study(tmp_path / "ray", executor={"address": cluster.address, "max_retries": 3}, seed=[0])
        run_ids = [c.run_id(study) for c in study.cells()]
        assert run_ids == [c.run_id(local) for c in local.cells()]
        killer = NodeKiller(cluster.worker, {f"ray::{TASK_PREFIX}{r}": r for r in run_ids})
        watcher = NodeWatcher(cluster.head)
        for thread in (killer, watcher):
            thread.start()
            threads_started.append(thread)
        summary = run_study(study, report=False, show_progress=False)  # the public path, as `memlens run`
        run_s = time.monotonic() - started - local_s - cluster_s
        killer.stop.set()
        killer.join()
        assert killer.killed, "the worker node never ran a cell of the study, so it was not killed"
        assert not cluster.worker.alive() and not cluster.worker.processes()
        assert summary.ok, [o.error for o in summary.failed]
    finally:
        for thread in threads_started:
            thread.stop.set()
            thread.join()
        cluster.stop()
    print(f"local reference {local_s:.0f}s, cluster up {cluster_s:.0f}s, study on the cluster {run_s:.0f}s, "
          f"killed the worker node in {killer.killed}")
    assert not ray.is_initialized()  # memlens disconnected from the cluster

    layout, local_layout = StudyLayout(study.out_dir), StudyLayout(local.out_dir)
    # the killed cell was retried on the head: its last status was written by a worker of the head node
    assert read_status(layout, killer.killed).state == "done"
    retried_by = read_status(layout, killer.killed).pid
    assert retried_by in cluster.head.seen and retried_by not in cluster.worker.seen
    assert layout.finished_runs() == local_layout.finished_runs() == sorted(run_ids)
    assert not list(layout.runs.glob(".*"))  # the killed attempt's temp folder was cleaned up
    assert not (layout.root / SHARED_CHECK_FILE).exists()
    assert_each_cell_once(layout, run_ids)
    for run_id in run_ids:  # train.json, adapter tensors, per-run MIA scores and results, extraction
        assert_same_run(comparable_run(layout, run_id), comparable_run(local_layout, run_id))
    pd.testing.assert_frame_equal(comparable_results(layout, run_ids), comparable_results(local_layout, run_ids),
                                  check_exact=True)
    merged = pd.read_parquet(layout.root / "mia_scores.parquet")
    local_scores = pd.concat([pd.read_parquet(local_layout.run_dir(r) / "mia_scores.parquet") for r in run_ids])
    key = ["run_id", "sample_id"]
    pd.testing.assert_frame_equal(merged.sort_values(key).reset_index(drop=True)[sorted(local_scores.columns)],
                                  local_scores.sort_values(key).reset_index(drop=True)[sorted(local_scores.columns)],
                                  check_exact=True)


# ------------------------------------------------------------------------------------ shared-folder check
@pytest.fixture
def unshared(tmp_path, monkeypatch):
    """A study and one of its cells as a task receives them, and a short wait for the driver's token."""
    monkeypatch.setattr("memlens.executors.ray.SHARED_CHECK_WAIT_S", 0.2)
    study = normalise_study(make_study(tmp_path / "study", executor={"kind": "ray"}))
    return study.model_dump(mode="json"), study.cells()[0].model_dump(mode="json"), study.out_dir


def test_task_on_a_node_without_the_study_folder_fails_and_writes_nothing(unshared):
    study_dict, cell_dict, out = unshared  # the driver's folder is not on this "node"
    for task in (lambda: cell_task(study_dict, cell_dict, None, None, "token"),
                 lambda: prepare_task(study_dict, [cell_dict], ["mia"], None, "token")):
        with pytest.raises(StudyFolderNotShared) as info:
            task()
        message = str(info.value)
        assert f"{out} does not exist here" in message
        assert "every Ray node see at the same path" in message and "docs/cluster.md" in message
    assert not out.exists()  # nothing written on the node


def test_task_seeing_another_folder_at_the_same_path_fails(unshared):
    study_dict, cell_dict, out = unshared
    out.mkdir(parents=True)  # this node's own folder at that path, without the driver's marker
    with pytest.raises(StudyFolderNotShared, match=rf"{SHARED_CHECK_FILE} does not exist here"):
        cell_task(study_dict, cell_dict, None, None, "driver-token")
    (out / SHARED_CHECK_FILE).write_text("token-of-an-earlier-run\n")  # e.g. a stale local copy
    with pytest.raises(StudyFolderNotShared, match="another run's token"):
        cell_task(study_dict, cell_dict, None, None, "driver-token")
    assert sorted(p.name for p in out.iterdir()) == [SHARED_CHECK_FILE]  # no runs/, status/ or cache/


def test_task_seeing_the_driver_folder_runs(unshared, monkeypatch):
    study_dict, cell_dict, out = unshared
    out.mkdir(parents=True)
    (out / SHARED_CHECK_FILE).write_text("driver-token\n")
    ran = []
    monkeypatch.setattr("memlens.executors.ray.run_cell", lambda *args: ran.append(args) or {"ok": True})
    assert cell_task(study_dict, cell_dict, None, None, "driver-token") == {"ok": True}
    assert ran == [(study_dict, cell_dict, None)]
