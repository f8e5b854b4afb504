"""Without Ray installed, `executor.kind: ray` fails early and says how to install it (runs without Ray)."""

from __future__ import annotations

import sys

import pytest

from memlens.config import ConfigError, ExecutorConfig
from memlens.executors import get_executor
from memlens.runner import run_study
from tests.conftest import make_study


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError


def test_ray_executor_without_ray_says_how_to_install(no_ray):
    with pytest.raises(ConfigError, match=r"pip install 'memlens\[ray\]'"):
        get_executor(ExecutorConfig(kind="ray"))


def test_run_study_with_ray_missing_fails_before_any_work(no_ray, tmp_path):
    study = make_study(tmp_path / "study", executor={"kind": "ray"})
    with pytest.raises(ConfigError, match=r"executor\.kind: ray.*pip install 'memlens\[ray\]'"):
        run_study(study, report=False, show_progress=False)
    assert not (tmp_path / "study" / "runs").exists()
