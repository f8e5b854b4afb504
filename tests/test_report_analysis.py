"""The report's analysis on its own: one primary attack and one exposure everywhere, computed without writing
a file, and consumed by both renderers. A synthetic study folder (written with memlens' own records and
metrics, no model) keeps these tests fast and independent of the runner."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from memlens.config import dump_study
from memlens.metrics.roc import membership_metrics
from memlens.report import analyse, build_report, report_is_current
from memlens.report.html import write_html
from memlens.report.inputs import PRIMARY_ATTACK
from memlens.report.markdown import render, write_findings
from memlens.store import StudyFile, StudyLayout, atomic_write_json
from memlens.store.records import StatusRecord
from tests.conftest import make_study

TARGETS, RANKS, COPIES = ("q", "v"), (1, 2, 4), (1, 8)
N = 60  # members and non-members per run


def _meta(run_id: str, targets: str, rank: int, copies: int, design: str) -> dict:
    return {"run_id": run_id, "model": "/models/llama-tiny", "method": "lora", "target_modules": targets,
            "rank": rank, "canary_copies": copies, "seed": 0, "membership": design, "noise_multiplier": None,
            "trainable_params": 1000 * rank, "total_params": 10**6, "trainable_pct": 0.1 * rank}


def synthetic_study(root: Path, designs: tuple[str, ...] = ("splits",), splits_bonus: float = 0.0) -> Path:
    """A study folder as memlens writes it: [q] and [v] at ranks 1, 2, 4 with 1 and 8 canary copies (once per
    membership design), an insert-mode canary whose secret space was enumerated at rank 1 only, and one
    failed cell. `splits_bonus` adds to the members' score shift of `splits` runs (what a named split adds)."""
    layout, rng = StudyLayout(root), np.random.default_rng(0)
    study = make_study(root, grid={"target_modules": [[t] for t in TARGETS], "rank": list(RANKS),
                                   "canary_copies": list(COPIES)}, canary={"mode": "insert"}, mia={"bootstrap": 20},
                       data={"membership": list(designs)})
    root.mkdir(parents=True)
    layout.study_file.write_text(dump_study(study))
    atomic_write_json(layout.environment_file, {"python": "3.11", "device": "cpu", "packages": {"memlens": "0.1"}})
    rows, scores, extraction = [], [], []
    labels = np.r_[np.ones(N, bool), np.zeros(N, bool)]
    for design, targets, rank, copies in itertools.product(designs, TARGETS, RANKS, COPIES):
        run_id = f"{targets}-r{rank}-c{copies}-s0{'-rand' if design == 'random' else ''}-synthetic"
        meta = _meta(run_id, targets, rank, copies, design)
        shift = (0.4 if targets == "q" else 0.9) + 0.1 * np.log2(rank) + (splits_bonus if design == "splits" else 0)
        attack_scores = {"ref_ratio": rng.normal(size=2 * N) + shift * labels,
                         "loss": rng.normal(size=2 * N) + 0.3 * shift * labels}
        scores.append(pd.DataFrame({"run_id": run_id, "sample_id": [f"s{i}" for i in range(2 * N)],
                                    "split": np.where(labels, "train", "test"), "is_member": labels,
                                    "is_canary": np.arange(2 * N) == 0, **attack_scores}))
        for attack, values in attack_scores.items():
            rows.append({**meta, "stage": "mia", "attack": attack,
                         **membership_metrics(labels, values, n_bootstrap=20)})
        rows.append({**meta, "stage": "mia", "attack": "bag_of_words", "auc": 0.52, "auc_ci_low": 0.42,
                     "auc_ci_high": 0.62, "auc_random_folds": 0.52, "auc_grouped_folds": np.nan,
                     "grouped": False, "n_groups": None, "n_members": N, "n_non_members": N,
                     "biased_split": False, "note": "bag-of-words AUC 0.520 (random folds): no split bias"})
        rows.append({**meta, "stage": "utility", "attack": "perplexity", "test_ppl": 30 - rank,
                     "base_test_ppl": 40.0, "utility_ppl": 31 - rank, "base_utility_ppl": 41.0})
        for model, suffix in (("finetuned", ""), ("base", ":base")):
            gain = 0.0 if suffix else copies * shift
            rows.append({**meta, "stage": "exposure", "attack": f"exposure{suffix}", "enumerated": rank == 1,
                         "exposure_rank": 1 + gain, "exposure_skewnorm": 1.5 + 2 * gain})
            rows.append({**meta, "stage": "extraction", "attack": f"extract:greedy:canary{suffix}",
                         "decoding": "greedy", "group": "canary", "n": 1, "exact_rate": 0.0,
                         "relaxed_rate": 0.0, "bleu_rate": 0.0, "mean_ngram_share": 0.1 * copies})
            share = rng.uniform(0, 1, 12)
            extraction.append(pd.DataFrame({
                "run_id": run_id, "model": model, "sample_id": [f"s{i}" for i in range(12)],
                "group": ["canary"] + ["members"] * 11, "is_canary": np.arange(12) == 0, "is_member": True,
                "decoding": "greedy", "ngram_share": share, "exact_match": share > 0.9,
                "ppl_ft": np.exp(3 - 2 * share + rng.normal(0, 0.1, 12)), "ppl_base": rng.uniform(20, 40, 12)}))
        StatusRecord(run_id=run_id, state="done", stages_done=["finetune", "mia", "extraction"]).save(
            layout.status_file(run_id))
    StatusRecord(run_id="v-r8-c1-s0-failed", state="failed", stage="mia", error="RuntimeError: boom",
                 traceback="Traceback: boom").save(layout.status_file("v-r8-c1-s0-failed"))
    pd.DataFrame(rows).to_parquet(layout.results_file, index=False)
    pd.concat(scores).to_parquet(layout.study_level(StudyFile.MIA_SCORES), index=False)
    pd.concat(extraction).to_parquet(layout.study_level(StudyFile.EXTRACTION), index=False)
    return root


@pytest.fixture
def study(tmp_path) -> Path:
    return synthetic_study(tmp_path / "out")


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_frontier_and_study_table_use_the_same_primary_attack(study):
    a = analyse(study)
    results = pd.read_parquet(StudyLayout(study).results_file)
    primary = results[(results.stage == "mia") & (results.attack == PRIMARY_ATTACK)].set_index(
        ["target_modules", "rank", "canary_copies"])
    frontier = a.frontier.table.set_index(["target_modules", "rank", "canary_copies"])
    table = a.study_table.frame.set_index(["target_modules", "rank", "canary_copies"])
    headline = a.headline.configs.set_index(["target_modules", "rank", "canary_copies"])
    assert (a.frontier.table.attack == PRIMARY_ATTACK).all() and a.primary_attack == PRIMARY_ATTACK
    assert len(frontier) == len(table) == len(primary) == 12
    for key, row in primary.iterrows():
        assert table.loc[key, "auc"] == pytest.approx(row.auc)
        assert frontier.loc[key, "auc"] == pytest.approx(row.auc)
        assert headline.loc[key, "auc"] == pytest.approx(row.auc)
    # the strongest attack stays a separate, labelled column: here ref_ratio, the loss attack is weaker
    assert (frontier.strongest_attack == PRIMARY_ATTACK).all()
    assert a.roc.figure.caption.startswith(f"ROC of the {PRIMARY_ATTACK} attack")


def test_exposure_section_and_frontier_report_the_same_exposure(study):
    a = analyse(study)
    results = pd.read_parquet(StudyLayout(study).results_file)
    rows = results[(results.stage == "exposure") & (results.attack == "exposure")].set_index("run_id")
    per_run = a.exposure.per_run[a.exposure.per_run.model == "finetuned"].set_index("run_id")
    frontier = a.frontier.table.set_index(["target_modules", "rank", "canary_copies"])
    section = a.exposure.table[a.exposure.table.model == "finetuned"].set_index(
        ["target_modules", "rank", "canary_copies"])
    assert set(per_run.index) == set(rows.index) and len(rows) == 12
    for run_id, row in rows.iterrows():
        expected = row.exposure_rank if row.enumerated else row.exposure_skewnorm  # exact rank only if enumerated
        key = (row.target_modules, row["rank"], row.canary_copies)
        assert per_run.loc[run_id, "exposure"] == pytest.approx(expected)
        assert section.loc[key, "exposure"] == pytest.approx(expected)
        assert frontier.loc[key, "exposure"] == pytest.approx(expected)
    assert rows.enumerated.any() and not rows.enumerated.all()  # both branches of the definition are exercised


def test_analysis_writes_nothing_and_both_renderers_consume_it(study, tmp_path):
    before = _files(study)
    a = analyse(study)
    assert _files(study) == before and not StudyLayout(study).report.exists()
    tables = a.tables()
    assert {"headline", "study_table", "auc_vs_rank", "auc_rank_fit", "exposure_vs_copies", "attacks", "delong",
            "frontier", "findings", "failures", "canary_extraction_vs_copies"} <= set(tables)
    assert [o.what for o in a.omitted] == ["wall times"]  # no timings or history in this folder
    assert a.findings[0].verdict in ("holds", "inconclusive") and len(a.failures) == 1

    rendered = write_html(a)
    page = rendered.index.read_text()
    specs = {s.figure.name for s in (a.headline, *a.sections) if s.figure}
    assert set(rendered.figures) == specs and all(p.exists() for p in rendered.figures.values())
    assert page.index('id="headline"') < page.index('id="findings"') < page.index('id="table"')
    for name, frame in tables.items():
        written = pd.read_csv(StudyLayout(study).report / "tables" / f"{name}.csv")
        assert list(written.columns) == list(frame.columns) and len(written) == len(frame), name
    assert report_is_current(study)

    doc = "\n".join(render(a, rendered.figures, "findings", "memlens report out --markdown findings.md").lines)
    for finding in a.findings:
        assert f"**Verdict{f' at {finding.scope}' if finding.scope else ''}: {finding.verdict}.**" in doc
    cell = a.study_table.frame.iloc[0]
    assert f"{cell.auc:.3f} ± {(cell.auc_ci_high - cell.auc_ci_low) / 2:.3f}" in doc
    assert f"{cell.auc:.3f} ± " in page
    assert "failed cell** `v-r8-c1-s0-failed`" in doc and "v-r8-c1-s0-failed" in page
    for name in re.findall(r"!\[[^\]]*\]\(findings/([^)]+)\.png\)", doc):
        assert name in rendered.figures

    md = write_findings(study, tmp_path / "docs" / "findings.md")
    assert md.exists() and (tmp_path / "docs" / "findings").is_dir()


def test_runs_whose_model_is_unchanged_are_named_above_the_table(tmp_path):
    root = synthetic_study(tmp_path / "out")
    results_file = StudyLayout(root).results_file
    results = pd.read_parquet(results_file)
    unchanged = "q-r1-c1-s0-synthetic"
    results["model_unchanged"] = (results.run_id == unchanged) & (results.stage == "mia")
    results.to_parquet(results_file, index=False)
    a = analyse(root)
    assert a.study_table.unchanged_runs == [unchanged]
    doc = "\n".join(render(a, {}, "findings", "memlens report").lines)
    page = write_html(a).index.read_text()
    for text in (doc, page):
        assert "Warning: 1 run(s) (q-r1-c1-s0-synthetic) predict what the base model does" in text
    assert analyse(synthetic_study(tmp_path / "clean")).study_table.warning is None


def test_headline_names_the_highest_and_lowest_configuration_and_how_sure(study):
    h = analyse(study).headline
    assert len(h.sentences) == 3 and h.figure.name == "headline"
    configs = h.configs
    assert h.highest.auc == configs.auc.max() and h.lowest.auc == configs.auc.min()
    assert h.sentences[0].startswith(f"{h.highest.config} (LoRA on [{h.highest.target_modules}] at rank ")
    assert f"{h.highest.auc:.3f}" in h.sentences[0] and f"{h.lowest.auc:.3f}" in h.sentences[1]
    assert f"{h.highest.auc - h.lowest.auc:.3f} lower" in h.sentences[1]
    assert h.overlap == bool(h.highest.auc_ci_low <= h.lowest.auc_ci_high)
    assert ("do not overlap" in h.sentences[2]) == (not h.overlap)


def test_without_the_primary_attack_its_sections_are_omitted_not_replaced(study):
    layout = StudyLayout(study)
    results = pd.read_parquet(layout.results_file)
    results[results.attack != PRIMARY_ATTACK].to_parquet(layout.results_file, index=False)
    a = analyse(study)
    for section in (a.study_table, a.auc_vs_rank, a.copies, a.delong, a.headline):
        assert section.omitted and f"`{PRIMARY_ATTACK}` was not run" in section.omitted.reason, section.title
    assert a.frontier.omitted
    assert not a.attacks.omitted and set(a.attacks.table.attack) == {"loss"}
    assert build_report(study).exists()


def test_membership_designs_are_kept_apart(tmp_path):
    """With both designs every cell ran twice: each design is its own configuration, never averaged together."""
    a = analyse(synthetic_study(tmp_path / "out", designs=("splits", "random")))
    assert len(a.frontier.table) == 24 and set(a.frontier.table.membership) == {"splits", "random"}
    assert "membership" in a.study_table.matrix and (a.study_table.frame.n_runs == 1).all()
    assert (a.delong.tests.run_a.str.contains("-rand-") == a.delong.tests.run_b.str.contains("-rand-")).all()
    # the headline is the verdicts' design, never a named-split run beside random-design verdicts, and says so
    assert len(a.headline.configs) == 12 and a.headline.configs.config.str.endswith(" random").all()
    for sentence in a.headline.sentences[:2]:
        assert "random membership design" in sentence, sentence
    assert "The headline, findings" in a.design_note


def test_design_comparison_measures_what_the_named_splits_add(tmp_path):
    a = analyse(synthetic_study(tmp_path / "out", designs=("splits", "random"), splits_bonus=0.8))
    table = a.design_comparison.table
    assert len(table) == 12 and (table.difference > 0).mean() > 0.8  # the named splits add AUC here
    assert ("paired t-test over 12 configurations" in a.design_comparison.summary
            and "verdicts use the random" in a.design_comparison.summary)
    assert a.verdict_design == "random" and "`random` membership design" in a.design_note
    assert set(a.auc_vs_rank.curve.membership) == {"random"} if "membership" in a.auc_vs_rank.curve else True
    assert "designs" in a.tables()
    same = analyse(synthetic_study(tmp_path / "one"))
    assert same.design_comparison.omitted and same.design_note == "" and same.verdict_design == "splits"


def test_without_results_the_report_shows_the_failures_or_that_there_is_nothing_yet(study):
    """Every cell failed, nothing ran yet, or the merged files were deleted: `memlens report` writes a page with
    the Failures section when there are failures, else says there is nothing to report yet (was a KeyError)."""
    from typer.testing import CliRunner

    from memlens.cli import app

    layout = StudyLayout(study)
    for name in (StudyFile.RESULTS, StudyFile.MIA_SCORES, StudyFile.EXTRACTION):
        layout.study_level(name).unlink()
    result = CliRunner().invoke(app, ["report", str(study)])
    assert result.exit_code == 0, result.output
    page = (layout.report / "index.html").read_text()
    assert "Nothing to report yet: no run has results, and 1 cell(s) failed (below)." in page
    assert 'id="failures"' in page and "v-r8-c1-s0-failed" in page and "RuntimeError: boom" in page
    assert 'id="table"' not in page and 'id="findings"' not in page  # no wall of empty sections
    for record in layout.status_dir.glob("*.json"):
        record.unlink()
    assert CliRunner().invoke(app, ["report", str(study)]).exit_code == 0
    page = (layout.report / "index.html").read_text()
    assert "Nothing to report yet: no run has results in results.parquet." in page and 'id="failures"' not in page
