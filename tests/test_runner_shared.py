"""One small study shared by the runner, report and browser tests (built once per test session, also
across pytest-xdist workers): `memlens run` in a subprocess is killed with SIGKILL in the middle of the
membership stage, its status is read while it is dead, and a second `memlens run` finishes it."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import LLAMA_TINY, PHEE

GRID = {"target_modules": [["q"], ["v"]], "rank": [1, 2], "canary_copies": [1, 8], "seed": [0]}


def shared_study_raw(out: Path) -> dict:
    return {
        "name": "shared-test",
        "out": str(out),
        "data": {"source": str(PHEE), "subset": 40},
        "model": {"name_or_path": str(LLAMA_TINY), "device": "cpu"},
        "grid": GRID,
        "canary": {"mode": "insert"},
        "train": {"epochs": 2, "batch_size": 16, "grad_accum": 1, "warmup_steps": 0, "learning_rate": 3e-3,
                  "logging_steps": 1},
        "mia": {"bootstrap": 50},
        "extraction": {"members": 8, "non_members": 8, "exposure_candidates": 100},
    }


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def memlens_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "memlens.cli", *args]


def _kill_mid_stage(study_file: Path, out: Path, stage: str) -> dict:
    """Start `memlens run`, SIGKILL it once a cell is in `stage`, and report what was seen."""
    proc = subprocess.Popen(memlens_cmd("run", str(study_file), "--no-progress"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = None
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        for path in (out / "status").glob("*.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if record.get("state") == "running" and record.get("stage") == stage:
                seen = record
                break
        if seen:
            time.sleep(0.5)  # well inside the stage
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.1)
    proc.wait()
    return {"killed_in": seen and seen["stage"], "rc": proc.returncode,
            "stderr": proc.stderr.read()[-3000:] if proc.stderr else ""}


def shared_study(tmp_path_factory) -> tuple[Path, dict]:
    """(output folder, facts about the kill and the resume) of the shared study."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this session
    root = base / "memlens-shared-study"
    root.mkdir(exist_ok=True)
    out, facts_file = root / "out", root / "facts.json"
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not facts_file.exists():
            study_file = root / "study.yaml"
            study_file.write_text(yaml.safe_dump(shared_study_raw(out)))
            facts = _kill_mid_stage(study_file, out, "mia")
            from memlens.study import study_status

            facts["status_after_kill"] = study_status(out).to_dict("records")
            resumed = subprocess.run(memlens_cmd("run", str(study_file), "--no-progress"), env=_env(),
                                     capture_output=True, text=True)
            facts.update(resume_rc=resumed.returncode, resume_stdout=resumed.stdout,
                         resume_stderr=resumed.stderr[-3000:])
            facts_file.write_text(json.dumps(facts, default=str))
    return out, json.loads(facts_file.read_text())
