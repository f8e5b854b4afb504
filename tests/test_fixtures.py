"""The suite's fixtures on a fresh machine (issue #40): synthetic PHEE-shaped records, and the tests that need the
real fixtures skipped with their reason."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from memlens.demo import PHEE_SPLITS, write_phee_shaped
from tests import synthetic_fixtures
from tests.conftest import FIXTURES, GPT2_SMALL, LLAMA_SMALL, LLAMA_TINY, PHEE, REPO


def test_every_path_is_in_one_complete_folder():
    assert synthetic_fixtures.missing(FIXTURES) == []
    assert {p.parent for p in (LLAMA_TINY, LLAMA_SMALL, GPT2_SMALL)} == {FIXTURES / "models"}
    assert PHEE == FIXTURES / "data" / "phee"


def test_phee_shaped_records_have_document_ids_and_phee_splits(tmp_path):
    corpus = write_phee_shaped(tmp_path)
    splits = {name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
              for name in PHEE_SPLITS}
    assert {name: len(rows) for name, rows in splits.items()} == PHEE_SPLITS
    docs = {name: {r["id"].split("_")[0] for r in rows} for name, rows in splits.items()}
    assert all(re.fullmatch(r"\d+_[1-4]", r["id"]) for rows in splits.values() for r in rows)
    assert not docs["train"] & docs["test"] and not docs["train"] & docs["dev"] and not docs["test"] & docs["dev"]
    texts = {name: [r["context"] for r in rows] for name, rows in splits.items()}
    # as PHEE: one exact repeat in train and in dev, none in test; a share of the records mention a patient
    assert [len(t) - len(set(t)) for t in texts.values()] == [1, 0, 1]
    assert 0.2 < sum("patient" in t.lower() for t in texts["train"]) / len(texts["train"]) < 0.8
    assert not set(corpus) & {t for ts in texts.values() for t in ts}  # the base model never saw a record


def test_marked_tests_are_skipped_with_their_reason_without_the_real_fixtures(tmp_path):
    """A folder of synthetic stand-ins (here links to this run's fixtures, marked synthetic) runs every test but the
    marked ones, which say what they need."""
    stand_ins = tmp_path / "shared"
    stand_ins.mkdir()
    for name in ("data", "models"):
        (stand_ins / name).symlink_to(FIXTURES / name)
    (stand_ins / synthetic_fixtures.MARK).write_text("{}")
    env = {k: v for k, v in os.environ.items() if k != "MEMLENS_TESTS_SHARED_ASKED"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "tests/test_mia.py::test_attack_models_direct_api", "tests/test_fixtures.py::"
                           "test_every_path_is_in_one_complete_folder"],
                          cwd=REPO, env={**env, "MEMLENS_SHARED": str(stand_ins)}, capture_output=True, text=True,
                          timeout=300)
    assert "1 passed, 1 skipped" in proc.stdout, proc.stdout + proc.stderr
    assert f"needs the real fixtures (AUC above 0.7 measured on PHEE): {stand_ins} holds synthetic stand-ins" \
        in proc.stdout, proc.stdout


def test_concurrent_callers_build_the_synthetic_fixtures_once_and_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def fake_build(root):
        calls.append(root)
        time.sleep(0.3)  # long enough for the other caller to reach the lock
        if len(calls) == 1:
            (root / "partial").write_text("")
            raise RuntimeError("killed mid-build")
        for name in synthetic_fixtures.REQUIRED:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text("{}")

    monkeypatch.setattr(synthetic_fixtures, "build", fake_build)
    folder = tmp_path / "memlens-fixtures" / "key"
    with pytest.raises(RuntimeError, match="killed mid-build"):
        synthetic_fixtures.ensure(folder)
    assert not folder.exists()  # nothing a reader would take for a build
    stale = tmp_path / "memlens-fixtures" / "older-key"
    stale.mkdir()
    with ThreadPoolExecutor(2) as pool:  # two xdist workers asking at once
        done = list(pool.map(synthetic_fixtures.ensure, [folder, folder]))
    assert done == [folder, folder] and len(calls) == 2  # the failed build, then one build for both callers
    assert synthetic_fixtures.missing(folder) == [] and not stale.exists()
