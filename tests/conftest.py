"""Shared fixtures: models and data from ../shared (or $MEMLENS_SHARED), never the hub; synthetic stand-ins
built once (tests/synthetic_fixtures.py) where that folder lacks them. Every test reads the paths from here."""

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
from tests import synthetic_fixtures  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# the shared fixtures folder: $MEMLENS_SHARED when set (an empty folder is a fresh machine), else ../shared; kept
# as first asked for the xdist workers, which inherit the MEMLENS_SHARED set below
SHARED = Path(os.environ.setdefault("MEMLENS_TESTS_SHARED_ASKED", os.environ.get("MEMLENS_SHARED")
                                    or str(REPO.parent / "shared"))).resolve()
MISSING = synthetic_fixtures.missing(SHARED)
# PHEE and the pretrained models: tests marked `real_fixtures` need them
REAL_FIXTURES = not MISSING and not synthetic_fixtures.is_synthetic(SHARED)
FIXTURES = SHARED if not MISSING else synthetic_fixtures.folder_for(REPO / ".pytest_cache")
PHEE = FIXTURES / "data" / "phee"
LLAMA_TINY = FIXTURES / "models" / "llama-tiny"
LLAMA_SMALL = FIXTURES / "models" / "llama-small"
GPT2_SMALL = FIXTURES / "models" / "gpt2-small"
# what this process and its subprocesses read as the shared folder (the benchmarks, `memlens demo`)
os.environ["MEMLENS_SHARED"] = str(FIXTURES)


@pytest.fixture(scope="session", autouse=True)
def fixtures_present():
    """The fixture folder, complete: the synthetic one is built here on first use (once per cache key)."""
    return synthetic_fixtures.ensure(FIXTURES) if MISSING else FIXTURES


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked `real_fixtures` (`@pytest.mark.real_fixtures("what they measured there")`) when the
    real fixtures are absent, saying why."""
    if REAL_FIXTURES:
        return
    lacks = f"lacks {MISSING[0]}{f' and {len(MISSING) - 1} more' if len(MISSING) > 1 else ''}" if MISSING \
        else "holds synthetic stand-ins"
    for item in items:
        marker = item.get_closest_marker("real_fixtures")
        if marker:
            why = f" ({marker.args[0]})" if marker.args else ""
            item.add_marker(pytest.mark.skip(reason=f"needs the real fixtures{why}: {SHARED} {lacks}; set "
                                                    "MEMLENS_SHARED to a folder that has PHEE and the pretrained "
                                                    "models"))


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
