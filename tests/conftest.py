"""Shared fixtures: real models and data from ../shared, never the hub."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per xdist worker: two workers with two threads each oversubscribe a 2-core
    # machine and run several times slower. Subprocesses (CLI tests) inherit it.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

import pytest  # noqa: E402

from memlens.config import StudyConfig, load_study  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEMLENS_SHARED", REPO.parent / "shared")).resolve()
PHEE = SHARED / "data" / "phee"
LLAMA_TINY = SHARED / "models" / "llama-tiny"
LLAMA_SMALL = SHARED / "models" / "llama-small"
GPT2_SMALL = SHARED / "models" / "gpt2-small"


def make_study(out: Path, **sections) -> StudyConfig:
    """A small, fast study on llama-tiny and a PHEE subset; `sections` override parts of it,
    e.g. make_study(tmp_path, grid={"rank": [2]}, model={"name_or_path": str(GPT2_SMALL)})."""
    raw = {
        "name": "test",
        "out": str(out),
        "data": {"source": str(PHEE), "subset": 64},
        "model": {"name_or_path": str(LLAMA_TINY)},
        "grid": {"target_modules": [["q"]], "rank": [2], "canary_copies": [1], "seed": [0]},
        "train": {"epochs": 1, "batch_size": 16, "grad_accum": 1, "warmup_steps": 0, "logging_steps": 1},
        "mia": {"bootstrap": 100},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return load_study(raw=raw)


@pytest.fixture
def study_factory(tmp_path):
    return lambda **sections: make_study(tmp_path / "study", **sections)
