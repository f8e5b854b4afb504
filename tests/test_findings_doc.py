"""The findings document end to end: a 2-cell miniature of the study ([q] vs [v] at rank 1 on llama-tiny and
a PHEE subset), `memlens report <out> --markdown`, and verdicts that follow the data: rewriting the
membership scores so one run separates members and the other does not flips finding (1)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from memlens.cli import app
from memlens.metrics.roc import membership_metrics
from memlens.report.mdtable import seconds
from memlens.runner import run_study
from memlens.study import normalise_study
from tests.conftest import make_study

# One xdist worker builds the study once for the whole module.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("findings_doc")]

VERDICTS = ("holds", "reversed", "does not hold", "inconclusive")


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("findings") / "out"
    study = normalise_study(make_study(
        out, grid={"target_modules": [["q"], ["v"]], "rank": [1]}, data={"subset": 40}, model={"device": "cpu"},
        train={"epochs": 2, "learning_rate": 3e-3}, mia={"bootstrap": 50},
        extraction={"members": 8, "non_members": 8}))
    summary = run_study(study, show_progress=False, report=False)
    assert summary.ok, [o.error for o in summary.failed]
    return out


def _report(out: Path, md: Path) -> str:
    result = CliRunner().invoke(app, ["report", str(out), "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    assert f"findings: {md}" in result.output
    return md.read_text()


def _verdicts(doc: str) -> dict[int, str]:
    """{finding number: its first verdict} as the document states them (finding 1 has one per rank)."""
    found = re.findall(r"^## Finding (\d): [^\n]+\n\n\*\*Verdict(?: at [^:]+)?: ([a-z ]+)\.\*\*", doc, re.M)
    return {int(n): v for n, v in found}


def _primary(out: Path) -> pd.DataFrame:
    results = pd.read_parquet(out / "results.parquet")
    return results[(results.stage == "mia") & (results.attack == "ref_ratio")]


def _rig(out: Path, strong: str) -> None:
    """Make the run adapting `strong` separate members from non-members (score shifted by 3 sd) and the other
    run score noise, then recompute their `ref_ratio` result rows from those scores with memlens' metrics."""
    scores = pd.read_parquet(out / "mia_scores.parquet")
    results = pd.read_parquet(out / "results.parquet")
    targets = results.drop_duplicates("run_id").set_index("run_id").target_modules
    rng = np.random.default_rng(0)
    for run_id in scores.run_id.unique():
        rows = scores.run_id == run_id
        labels = scores.loc[rows, "is_member"].to_numpy(bool)
        values = rng.normal(size=len(labels)) + (3.0 * labels if targets[run_id] == strong else 0.0)
        scores.loc[rows, "ref_ratio"] = values
        target = (results.run_id == run_id) & (results.stage == "mia") & (results.attack == "ref_ratio")
        for key, value in membership_metrics(labels, values, n_bootstrap=50).items():
            if key in results and isinstance(value, (int, float)) and not isinstance(value, bool):
                results.loc[target, key] = value
    scores.to_parquet(out / "mia_scores.parquet", index=False)
    results.to_parquet(out / "results.parquet", index=False)


def test_run_records_its_history_and_stage_wall_times(mini):
    history = [json.loads(line) for line in (mini / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1
    entry = history[0]
    assert entry["command"] == "python API" and entry["error"] is None
    assert entry["cells_total"] == entry["cells_run"] == entry["cells_done"] == 2 and entry["cells_failed"] == 0
    assert entry["wall_s"] > 0 and entry["started"] <= entry["ended"]
    hardware = entry["hardware"]
    assert hardware["cpu_cores"] == os.cpu_count() and hardware["device"] == "cpu" and hardware["gpu"] is None
    assert "host" not in hardware  # hostname-free
    for run_dir in (mini / "runs").iterdir():
        timings = json.loads((run_dir / "timings.json").read_text())
        assert set(timings) == {"finetune", "mia", "extraction"}, run_dir
        assert all(t["wall_s"] > 0 and t["batch_cells"] in (1, 2) for t in timings.values())
        assert timings["mia"]["wall_s"] * timings["mia"]["batch_cells"] == pytest.approx(timings["mia"]["batch_wall_s"])


def test_findings_document_is_generated_from_the_data(mini, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(mini, out)
    md = tmp_path / "docs" / "findings.md"
    doc = _report(out, md)

    verdicts = _verdicts(doc)
    assert set(verdicts) == {1, 2, 3} and set(verdicts.values()) <= set(VERDICTS), verdicts
    written = pd.read_csv(out / "report" / "tables" / "findings.csv")
    assert list(written.drop_duplicates("number").verdict) == [verdicts[n] for n in (1, 2, 3)]  # the report's
    # The AUC table holds the runs' numbers (one run per cell: mean = the run's AUC, ± half its interval).
    for row in _primary(out).itertuples():
        assert f"{row.auc:.3f} ± {(row.auc_ci_high - row.auc_ci_low) / 2:.3f}" in doc, row.target_modules
    assert "| rank | [q] | [v] |" in doc
    # DeLong [v] vs [q] at rank 1 (seed, draw, lr)
    assert re.search(r"\| 1 \| 1 \| 0 \| 0 \| 0.003 \| \[v\] \| \[q\] \|", doc)
    # One rank: the saturation fit is not computed, and the document says why instead of inventing a number.
    assert "Saturation fit not computed: the grid has one LoRA rank (1)" in doc
    assert "not measured here" in doc  # the paper's numbers are labelled as the paper's
    for heading in ("## Beyond the study", "### Attack comparison", "### Extraction rates", "### Utility",
                    "## How to regenerate"):
        assert heading in doc
    assert "needs >= 1000 non-members, has 40" in doc  # TPR at 0.1% FPR: null with its reason
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", doc)
    assert links and all(link.startswith("findings/") for link in links)
    assert all((md.parent / link).is_file() for link in links)
    assert {p.name for p in (md.parent / "findings").iterdir()} == {Path(link).name for link in links}
    # How to regenerate: the recorded invocation, its wall time, the report command, per-stage times.
    history = json.loads((out / "history.jsonl").read_text().splitlines()[0])
    assert f"| 1 | `python API` | {history['started']} | {seconds(history['wall_s'])} | 2 / 2 |" in doc
    assert f"`memlens report {out} --markdown {md}`" in doc
    assert re.search(r"^\| finetune \| 2 \| ", doc, re.M) and re.search(r"^\| mia \| 2 \| ", doc, re.M)

    _rig(out, strong="v")
    doc = _report(out, md)
    assert _verdicts(doc)[1] == "holds", doc
    strong = _primary(out).set_index("target_modules").loc["v"]
    assert strong.auc > 0.9 and f"{strong.auc:.3f} ± " in doc

    _rig(out, strong="q")
    doc = _report(out, md)
    assert _verdicts(doc)[1] == "reversed", doc  # significant the other way: not the null "does not hold"
    assert f"{_primary(out).set_index('target_modules').loc['q'].auc:.3f} ± " in doc


def test_markdown_target_must_be_a_md_file(mini, tmp_path):
    result = CliRunner().invoke(app, ["report", str(mini), "--markdown", str(tmp_path / "findings.txt")])
    assert result.exit_code == 2 and "must be a .md file" in result.output
    assert not (tmp_path / "findings.txt").exists()


def test_operator_note_is_shown_as_the_operators_words(mini, tmp_path):
    md = tmp_path / "noted.md"
    result = CliRunner().invoke(app, ["report", str(mini), "--markdown", str(md), "--note", "paused 5 min"])
    assert result.exit_code == 0, result.output
    doc = md.read_text()
    assert "> **Operator's note** (written by the person who ran the study, not computed): paused 5 min" in doc
    assert "--note 'paused 5 min'" in doc  # the regenerating command includes it
    # a note of several lines: one quote, each line a paragraph of it
    result = CliRunner().invoke(app, ["report", str(mini), "--markdown", str(md), "--note", "first\nsecond"])
    assert result.exit_code == 0, result.output
    assert "computed): first\n>\n> second\n" in md.read_text()


def test_companion_studies_open_the_document_with_every_verdict(mini, tmp_path):
    """--with: another study folder's verdicts join this one's in the opening table (here the same folder copied
    under another name stands in for another model's study), each row from its own folder."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(mini, other)
    (other / "study.yaml").write_text((other / "study.yaml").read_text().replace("name: test", "name: other-model"))
    md = tmp_path / "together.md"
    result = CliRunner().invoke(app, ["report", str(mini), "--markdown", str(md), "--with", str(other)])
    assert result.exit_code == 0, result.output
    doc = md.read_text()
    table = doc.split("## Verdicts across studies", 1)[1].split("\n## ", 1)[0]
    own = re.findall(r"^\*\*Verdict(?: at ([^:]+))?: ([a-z ]+)\.\*\*", doc, re.M)
    full = table.split("| finding | model | study | verdict |", 1)[1]  # the full table, after the at-a-glance one
    rows = [line for line in full.splitlines() if line.startswith("| (")]
    assert len(rows) == 2 * len(own) and sum("| other-model |" in r for r in rows) == len(own)
    assert doc.index("## Verdicts across studies") < doc.index("## The study run here")  # it opens the document
    assert f"--with {other}" in doc  # the regenerating command names the companions
    bad = CliRunner().invoke(app, ["report", str(mini), "--markdown", str(md), "--with", str(tmp_path)])
    assert bad.exit_code == 2 and "--with" in bad.output and "not a memlens study folder" in bad.output


def _grid_results(rng: np.random.Generator) -> pd.DataFrame:
    """results.parquet rows (mia ref_ratio and utility) of a third-round grid: [q], [k], [v], [o] x ranks 1, 4 x rates
    1e-3, 3e-3, 1e-2 x 5 record draws (seed 0 each), v/o below q/k at 1e-3 and above at 1e-2 beyond what their
    gain gives, plus the matched-fit extension at rank 4 (q/k at 3e-2, v/o at 3e-4)."""
    rows = []
    cells = [(t, r, lr) for t in "qkvo" for r in (1, 4) for lr in (1e-3, 3e-3, 1e-2)]
    cells += [(t, 4, 3e-2) for t in "qk"] + [(t, 4, 3e-4) for t in "vo"]
    for targets, rank, lr in cells:
        for draw in range(5):
            vo = targets in "vo"
            gain = (3 if vo else 1) * 8 * lr + rng.normal(0, 0.002)
            tilt = {3e-4: -0.05, 1e-3: -0.05, 3e-3: 0.0, 1e-2: 0.05}[lr] if vo else 0.0
            auc = 0.55 + 0.5 * gain + tilt + rng.normal(0, 0.004)
            ids = {"run_id": f"{targets}-r{rank}-lr{lr:g}-d{draw}", "model": "llama-tiny", "method": "lora",
                   "target_modules": targets, "rank": rank, "canary_copies": 1, "seed": 0, "membership": "random",
                   "noise_multiplier": np.nan, "learning_rate": lr, "draw": draw}
            rows.append({**ids, "stage": "mia", "attack": "ref_ratio", "auc": auc})
            rows.append({**ids, "stage": "utility", "attack": "utility", "utility_ppl": 100 * (1 - gain),
                         "base_utility_ppl": 100.0})
    return pd.DataFrame(rows)


def _extraction(rng: np.random.Generator, run_ids: list[str]) -> pd.DataFrame:
    """Greedy extraction rows of the fine-tuned and the base model on 40 members and 40 non-members per run; a
    member's gain falls with the fine-tuned perplexity's own part, a non-member's does not."""
    rows = []
    for run_id in run_ids:
        for i in range(80):
            member = i < 40
            base_share, own = rng.uniform(0, 0.3), rng.normal(0, 1)
            ppl_base = float(np.exp(rng.normal(2, 0.3)))
            share = float(np.clip(base_share + 0.05 + (0.1 - 0.08 * own if member else 0) + rng.normal(0, .02), 0, 1))
            common = {"run_id": run_id, "sample_id": f"s{i}", "is_member": member, "is_canary": False,
                      "decoding": "greedy", "suffix_len": int(rng.integers(10, 30)), "ppl_base": ppl_base,
                      "ppl_ft": ppl_base * 0.5 * np.exp(0.3 * own)}
            rows += [{**common, "model": "finetuned", "ngram_share": share},
                     {**common, "model": "base", "ngram_share": base_share}]
    return pd.DataFrame(rows)


def test_third_round_verdicts_open_with_draws_rates_matched_fit_and_member_specific_finding_two(tmp_path):
    """The findings the analysis makes of a third-round grid (no training: result rows as memlens writes them): per
    (rate, rank) verdicts over 5 record draws (df 4), the rate x matrices row with `reversed` where the effect
    reverses, both matched-fit rows tested, finding 2 on members against matched non-members over 2 configurations x
    5 draws, and finding 3 labelled with its LoRA scaling; the verdict table carries each row."""
    from memlens.report.analysis import findings
    from memlens.report.findings import per_run_correlations
    from memlens.report.inputs import Environment, StudyResults
    from memlens.report.memorization import ngram_perplexity

    rng = np.random.default_rng(0)
    study = make_study(tmp_path / "out", data={"subset": 40, "membership": ["random"], "pool": ["train", "test"]},
                       grid={"draw": [0, 1, 2, 3, 4], "learning_rate": [1e-3, 3e-3, 1e-2]})
    results = _grid_results(rng)
    recall = results[(results["rank"] == 4) & results.target_modules.isin(["v", "q"]) & (results.learning_rate == 3e-3)]
    data = StudyResults(root=tmp_path, study=study, results=results, mia_scores=pd.DataFrame(),
                        extraction=_extraction(rng, sorted(recall.run_id.unique())), environment=Environment())
    perplexity = ngram_perplexity(data)
    perplexity.per_run = per_run_correlations(perplexity.members)
    assert perplexity.outcome == "ngram_gain_specific" and len(perplexity.per_run) == 10
    found = findings(data, pd.DataFrame(), perplexity)
    scopes = {f.scope: f for f in found}
    cells = [f for f in found if f.scope and ", lr " in f.scope]
    assert len(cells) == 6 and all("5 record draws (df 4), one seed per draw" in f.test for f in cells)
    rates = scopes["rate x matrices"]
    assert rates.verdict == "reversed at lr 0.001; holds at lr 0.003, 0.01", rates.reason
    assert "lr 0.03 " not in rates.effect and "lr 0.0003 " not in rates.effect  # the extension's one-sided rates
    for scope in ("matched fit, AUC at equal gain", "matched fit, gain at equal AUC"):
        assert scopes[scope].test and "5 record draws (df 4)" in scopes[scope].test, scopes[scope].reason
    two = next(f for f in found if f.number == 2)
    assert "matched on base share and length" in two.reason and "(2 configuration(s) x 5 record draw(s))" in two.test
    assert two.verdict == "holds", two.reason
    assert scopes["alpha 16 fixed"].number == 3


def test_at_a_glance_folds_cells_and_names_studies():
    """The opening summary: one row per finding and scope family, one column per model; per-cell verdicts counted
    with the cells that were not inconclusive named; untested rows left out; the study named where a model has
    several; a model that does not test a finding says so."""
    from memlens.report.markdown import at_a_glance

    t1 = "(1) v/o over q/k"
    rows = pd.DataFrame([
        (t1, "rank 1, lr 0.001", "tiny", "grid", "**inconclusive**", True),
        (t1, "rank 16, lr 0.003", "tiny", "grid", "**holds**", True),
        (t1, "rank 2, lr 0.01", "tiny", "grid", "**reversed**", True),
        (t1, "rank 16", "tiny", "alpha", "**holds**", True),
        (t1, "matched fit, gain at equal AUC", "tiny", "grid", "**reversed**", True),
        (t1, "matched fit", "tiny", "alpha", "**inconclusive**", False),  # untested: left out
        (t1, "rank 4, lr 0.003", "small", "grid-small", "**inconclusive**", True),
        (t1, "rank 16, lr 0.003", "small", "grid-small", "**inconclusive**", True),
    ], columns=["title", "scope", "model", "study", "verdict", "tested"])
    glance = at_a_glance(rows).set_index("finding")
    assert list(glance.columns) == ["tiny", "small"]
    assert glance.loc[t1, "tiny"] == ("holds 1/3 (rank 16, lr 0.003); reversed 1/3 (rank 2, lr 0.01); "
                                      "inconclusive 1/3 [grid]; holds (rank 16) [alpha]")
    assert glance.loc[t1, "small"] == "inconclusive 2/2"
    matched = f"{t1}, matched fit, gain at equal AUC"
    assert glance.loc[matched, "tiny"] == "reversed" and glance.loc[matched, "small"] == "not tested"
    assert f"{t1}, matched fit" not in glance.index
    assert at_a_glance(rows.assign(tested=False)).empty
