"""A quiet console: `memlens run` prints its progress (stderr, only when asked) and its results, and nothing a
user would have to learn to ignore: no library warnings, memlens' own warnings once, no bar with
--no-progress, nothing at all on stderr with -q."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import GPT2_SMALL, LLAMA_TINY, PHEE, REPO

pytestmark = pytest.mark.xdist_group("console")

# a warning printed by Python's warnings module ("FutureWarning: ...", "  warnings.warn(") or by a library
WARNING_TEXT = re.compile(r"Warning|warn")
# rich's and tqdm's bars, and the carriage returns that redraw them
BAR_TEXT = re.compile(r"[━█▏▎▍▌▋▊▉]|\r|\d+%\|| it/s|it/s\]")


def _study_file(tmp_path: Path, model: Path = LLAMA_TINY) -> Path:
    """One LoRA cell of llama-tiny on 24 PHEE records, 2 training steps: every stage runs, in seconds. PHEE's
    train and dev splits each hold a duplicate text, so data loading has something to warn about."""
    study = {
        "name": "console",
        "out": str(tmp_path / "unused"),
        "data": {"source": str(PHEE), "subset": 24, "max_length": 128},
        "model": {"name_or_path": str(model)},
        "grid": {"target_modules": [["q"]], "rank": [2], "canary_copies": [1], "seed": [0]},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 8, "grad_accum": 1, "warmup_steps": 0,
                  "logging_steps": 1},
        "mia": {"bootstrap": 20},
        "extraction": {"members": 4, "non_members": 4, "exposure_candidates": 50,
                       "decodings": [{"name": "greedy"}]},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _memlens(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": ""}
    return subprocess.run([sys.executable, "-m", "memlens.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def test_run_without_progress_prints_results_and_each_memlens_warning_once(tmp_path):
    out = tmp_path / "out"
    proc = _memlens("run", str(_study_file(tmp_path)), "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"report: {out / 'report' / 'index.html'}" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert not [line for line in lines if WARNING_TEXT.search(line)], proc.stderr
    assert not BAR_TEXT.search(proc.stderr), proc.stderr
    assert len(lines) == len(set(lines)), proc.stderr  # each line once: not once per stage
    # memlens' own data warnings are said, once each
    dropped = [line for line in lines if "exact duplicate texts" in line]
    assert len(dropped) == 2 and any("train:" in line for line in dropped) and any("dev:" in line for line in dropped)


@pytest.mark.parametrize("model", [LLAMA_TINY, GPT2_SMALL], ids=["llama-tiny", "gpt2-small"])
def test_quiet_run_prints_nothing_on_stderr(tmp_path, model):
    """Nothing on stderr, the libraries' notices included (GPT-2's fused Conv1D attention has its own)."""
    out = tmp_path / "out"
    proc = _memlens("-q", "run", str(_study_file(tmp_path, model)), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"report: {out / 'report' / 'index.html'}" in proc.stdout
    assert proc.stderr == ""
