"""The report of the shared study: figures, tables and findings come from the study's own files."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from memlens.cli import app
from memlens.metrics.roc import delong_test
from memlens.report import build_report, report_is_current
from memlens.report.findings import finding_rank, finding_value_output
from memlens.report.mdtable import md_table, pm
from memlens.report.saturation import fit_saturation, saturating
from tests.test_runner_shared import shared_study


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out, facts = shared_study(tmp_path_factory)
    assert facts["resume_rc"] == 0, facts["resume_stderr"]
    return out, (out / "report" / "index.html").read_text()


def test_report_is_self_contained_with_every_figure(report):
    out, page = report
    figures = {p.stem for p in (out / "report" / "figures").glob("*.png")}
    # rank x2, copies x2, insert-mode canary: every figure can be made from this grid
    assert {"roc", "auc_vs_rank", "copies", "ngram_share_vs_perplexity", "exposure_vs_copies", "attacks"} <= figures
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == len(figures) and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing fetched from the network
    assert "<script" not in page
    for name in ("study_table", "attacks", "delong", "bag_of_words", "findings", "auc_vs_rank", "exposure_vs_copies",
                 "auc_rank_fit", "extraction_rates", "utility_by_config", "stage_wall_times"):
        assert (out / "report" / "tables" / f"{name}.csv").exists(), name
        if name != "findings":
            assert f'data-name="{name}"' in page


def test_study_table_matches_results(report):
    out, page = report
    results = pd.read_parquet(out / "results.parquet")
    primary = results[(results.stage == "mia") & (results.attack == "ref_ratio")]
    table = pd.read_csv(out / "report" / "tables" / "study_table.csv")
    assert len(table) == len(primary)  # one run per (matrices, rank, copies) here
    for row in table.itertuples():
        match = primary[(primary.target_modules == row.target_modules) & (primary["rank"] == row.rank)
                        & (primary.canary_copies == row.canary_copies)]
        assert row.auc == pytest.approx(match.auc.iloc[0])
        assert row.trainable_params == match.trainable_params.iloc[0]
        assert f"{match.auc.iloc[0]:.3f} ± " in page


def test_delong_table_equals_an_independent_computation(report):
    out, _ = report
    tests = pd.read_csv(out / "report" / "tables" / "delong.csv")
    assert set(tests.set_a) | set(tests.set_b) == {"q", "v"} and len(tests) == 4  # 2 ranks x 2 copies
    scores = pd.read_parquet(out / "mia_scores.parquet")
    row = tests.iloc[0]
    a = scores[scores.run_id == row.run_a].set_index("sample_id")
    b = scores[scores.run_id == row.run_b].set_index("sample_id")
    shared = a.index.intersection(b.index)
    expected = delong_test(a.loc[shared, "is_member"].to_numpy(), a.loc[shared, "ref_ratio"].to_numpy(),
                           b.loc[shared, "ref_ratio"].to_numpy())
    assert row.p_value == pytest.approx(expected["p_value"]) and row.auc_a == pytest.approx(expected["auc_a"])


def test_findings_state_a_verdict_with_reasons(report):
    out, page = report
    findings = pd.read_csv(out / "report" / "tables" / "findings.csv")
    ranks = pd.read_parquet(out / "results.parquet")["rank"].nunique()
    # finding 1 per rank, and at matched fit
    assert len(findings) == ranks + 3 and findings.number.tolist() == [1] * (ranks + 1) + [2, 3]
    assert findings[findings.number == 1].scope.tolist() == [f"rank {r}" for r in sorted(
        pd.read_parquet(out / "results.parquet")["rank"].unique())] + ["matched fit"]
    assert set(findings.verdict) <= {"holds", "reversed", "does not hold", "inconclusive"}
    # two ranks only: the rank finding cannot be judged, and says why
    rank = findings[findings.title.str.startswith("(3)")].iloc[0]
    assert rank.verdict == "inconclusive" and "at least 3 ranks" in rank.reason
    verdicts = re.findall(r'<span class="verdict">([^<]+)</span>', page)
    assert verdicts == list(findings.verdict)


def test_finding_verdicts_follow_the_numbers():
    """The verdict logic on hand-made result rows (not a metric: it checks the rules applied to them)."""
    rows = []
    for targets, aucs in (("q", [0.60, 0.65, 0.67, 0.68]), ("v", [0.70, 0.75, 0.77, 0.775])):
        for rank, auc in zip([1, 2, 4, 8], aucs):
            rows.append({"method": "lora", "target_modules": targets, "rank": rank, "auc": auc})
    frame = pd.DataFrame(rows)
    assert finding_rank(frame).verdict == "holds"
    assert finding_rank(frame.assign(auc=frame.auc[::-1].to_numpy())).verdict == "reversed"  # falls with rank
    delong = pd.DataFrame({"set_a": ["q"] * 4, "set_b": ["v"] * 4, "rank": [1, 2, 4, 8],
                           "auc_diff": [-0.1] * 4, "p_value": [0.001] * 4})
    def verdicts(found) -> set[str]:
        return {f.verdict for f in found}

    assert verdicts(finding_value_output(frame, delong)) == {"holds"}  # at each of the 4 ranks
    assert verdicts(finding_value_output(frame, delong.assign(p_value=0.5))) == {"inconclusive"}
    swapped = frame.assign(target_modules=frame.target_modules.map({"q": "v", "v": "q"}))
    assert verdicts(finding_value_output(swapped, delong.assign(auc_diff=0.1))) == {"reversed"}
    assert verdicts(finding_value_output(frame[frame.target_modules == "q"], delong)) == {"inconclusive"}


def test_missing_data_is_omitted_with_a_reason(tmp_path, report):
    """A study with one rank and one copies value: those figures are omitted, with the reason stated."""
    out, _ = report
    import shutil

    import yaml

    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("runs", "report", "cache"))
    results = pd.read_parquet(copy / "results.parquet")
    keep = results[(results["rank"] == 1) & (results.canary_copies == 8)]
    keep.to_parquet(copy / "results.parquet", index=False)
    study = yaml.safe_load((copy / "study.yaml").read_text())
    study["grid"].update(rank=[1], canary_copies=[8])
    (copy / "study.yaml").write_text(yaml.safe_dump(study))
    page = build_report(copy).read_text()
    assert "AUC vs rank</b> omitted: the grid has one LoRA rank (1)" in page
    assert "AUC and extraction vs copies</b> omitted" in page
    assert not (copy / "report" / "figures" / "auc_vs_rank.png").exists()
    assert report_is_current(copy)
    result = CliRunner().invoke(app, ["report", str(copy)])
    assert result.exit_code == 0 and "index.html" in result.output
    assert not np.isnan(pd.read_csv(copy / "report" / "tables" / "attacks.csv").auc).any()


def test_auc_rank_fit_is_null_with_its_reason_on_two_ranks(report):
    out, _ = report
    fits = pd.read_csv(out / "report" / "tables" / "auc_rank_fit.csv")
    assert set(fits.target_modules) == {"q", "v"} and fits.plateau.isna().all() and fits.rank_90.isna().all()
    assert fits.reason.str.contains("needs at least 4 ranks").all()


def test_saturation_fit_recovers_a_known_curve_and_refuses_what_it_cannot_fit():
    ranks = np.array([1, 2, 4, 8, 16, 32, 64])
    noisy = saturating(ranks, 0.85, 0.6, 10) + np.random.default_rng(0).normal(0, 0.002, len(ranks))
    fit = fit_saturation("v", ranks, noisy)
    assert fit.ok and fit.reason is None
    assert fit.plateau == pytest.approx(0.85, abs=0.01) and fit.scale == pytest.approx(10, rel=0.15)
    assert fit.rank_90 == pytest.approx(fit.scale * np.log(10))
    few = fit_saturation("q", [1, 2, 4], [0.70, 0.72, 0.73])
    assert not few.ok and few.rank_90 is None and "needs at least 4 ranks" in few.reason
    flat = fit_saturation("q", [1, 2, 4, 8], [0.6] * 4)
    assert flat.rank_90 is None and "not distinguishable from zero" in flat.reason
    falling = fit_saturation("q", [1, 2, 4, 8], [0.68, 0.67, 0.65, 0.60])
    assert falling.rank_90 is None and "does not rise" in falling.reason


def test_markdown_table_writes_nulls_and_escapes_pipes():
    frame = pd.DataFrame({"a": ["x|y", None], "b": [0.123456, np.nan]})
    assert md_table(frame, {"b": ".2f"}).splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 0.12 |",
                                                          "| n/a | n/a |"]
    assert pm(0.8, 0.7, 0.9) == "0.800 ± 0.100" and pm(0.8, np.nan, 0.9) == "0.800" and pm(np.nan, 0, 1) == "n/a"
