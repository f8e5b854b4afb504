"""`memlens finetune` end to end in a subprocess: --out/--set, a kill -9 mid-sweep, and the resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml
from safetensors.torch import load_file

from memlens.store import StudyLayout
from tests.conftest import LLAMA_TINY, PHEE, REPO


def _memlens(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, "-m", "memlens.cli", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _write_study(tmp_path):
    study = {
        "name": "cli", "data": {"source": str(PHEE), "subset": 64},
        "model": {"name_or_path": str(LLAMA_TINY)},
        "grid": {"target_modules": [["q"], ["v"]], "rank": [2], "canary_copies": [4], "seed": [0]},
        "train": {"max_steps": 1, "batch_size": 16, "grad_accum": 1, "warmup_steps": 0},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_killed_sweep_resumes_without_retraining_finished_cells(tmp_path):
    study, out = _write_study(tmp_path), tmp_path / "out"
    # Long enough cells that the kill lands inside the second one (max_steps overridden on the CLI).
    proc = _memlens("finetune", study, "--out", out, "--set", "train.max_steps=6")
    runs = out / "runs"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        finished = StudyLayout(out).finished_runs()
        if len(finished) == 1 and list(runs.glob(".*.tmp-*")):
            break  # the first cell is done and the second is being trained
        time.sleep(0.05)
    assert proc.poll() is None, f"sweep ended before it could be killed: {proc.communicate()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = StudyLayout(out).finished_runs()
    assert len(first) == 1 and list(runs.glob(".*.tmp-*"))  # a killed cell leaves only a hidden temp dir
    first_stamp = (runs / first[0] / "train.json").stat().st_mtime_ns

    rerun = _memlens("finetune", study, "--out", out, "--set", "train.max_steps=6")
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    assert "2 cell(s) have stages left" in stderr  # fine-tuned, attacks left for later
    done = StudyLayout(out).finished_runs()
    assert len(done) == 2 and first[0] in done
    assert not list(runs.glob(".*")), "temp dirs left behind"
    assert (runs / first[0] / "train.json").stat().st_mtime_ns == first_stamp  # not retrained
    for run in done:  # every file of every cell is complete and readable
        info = json.loads((runs / run / "train.json").read_text())
        assert info["steps"] == 6 and info["canary"]["copies"] == 4
        assert load_file(runs / run / "adapter" / "adapter_model.safetensors")
    assert "{'loss'" not in stdout and "'train_runtime'" not in stdout  # no Trainer dict spam
    resolved = yaml.safe_load((out / "study.yaml").read_text())
    assert resolved["train"]["max_steps"] == 6 and resolved["out"] == str(out)


def test_bad_override_fails_with_the_field_and_choices(tmp_path):
    study = _write_study(tmp_path)
    proc = _memlens("finetune", study, "--out", tmp_path / "out", "--set", "train.packing=tight")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "train.packing" in stderr and "'packed'" in stderr and "Traceback" not in stderr
