"""`memlens demo` on a fresh machine: it builds its own data, tokenizer and model, then runs a study."""

from __future__ import annotations

import json
import warnings

import pandas as pd
from typer.testing import CliRunner

from memlens.cli import app
from memlens.data import load_study_data
from memlens.demo import demo_study, find_shared, synthetic_notes


def test_synthetic_notes_are_seeded_and_distinct():
    notes = synthetic_notes(500, seed=3)
    assert notes == synthetic_notes(500, seed=3) and len(set(notes)) == 500
    assert notes != synthetic_notes(500, seed=4)


def test_demo_uses_the_shared_fixtures_when_present(tmp_path):
    shared = find_shared()
    assert shared is not None  # this checkout has ../shared
    study = demo_study(tmp_path / "demo", shared)
    assert study.model.name_or_path.endswith("llama-tiny") and len(study.cells()) == 12


def test_synthetic_demo_runs_a_whole_study(tmp_path):
    out = tmp_path / "demo"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, [
            "demo", "--synthetic", "--out", str(out), "--no-progress",
            "--set", "grid.target_modules=[[q]]", "--set", "grid.rank=[4]", "--set", "grid.canary_copies=[16]",
            "--set", "extraction.members=4", "--set", "extraction.non_members=4",
            "--set", "extraction.exposure_candidates=100", "--set", "mia.bootstrap=20",
        ])
    assert result.exit_code == 0, result.output
    # a quiet console: no warning a user would have to learn to ignore (building the model included)
    shown = [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught
             if not issubclass(w.category, DeprecationWarning)]
    assert not shown, shown
    assets = tmp_path / "demo-assets"
    assert (assets / "model" / "model.safetensors").exists() and (assets / "model" / "tokenizer.json").exists()
    assert json.loads((assets / "model" / "pretraining.json").read_text())["steps"] > 0
    report = out / "report" / "index.html"
    assert f"report: {report}" in result.output and report.exists()
    study = demo_study(out)  # the assets now exist: same study, nothing rebuilt
    data = load_study_data(study.data)
    assert not set(data.members.text) & set(data.non_members.text)
    results = pd.read_parquet(out / "results.parquet")
    assert {"mia", "utility", "extraction", "exposure"} <= set(results.stage)
    assert results[results.stage == "mia"].auc.between(0, 1).all()
