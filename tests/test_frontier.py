"""Privacy / utility frontier table and figure from results.parquet rows: the primary attack and the one
definition of exposure, as in every other section of the report."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from memlens.report.figures import frontier_figure
from memlens.report.frontier import frontier_table, pareto_front, strongest_attack
from memlens.store import RunFile, StudyLayout
from memlens.store.records import TrainRecord


def _meta(run_id, method="lora", targets="q", rank=4, copies=1, seed=0, noise=None):
    return {"run_id": run_id, "model": "/models/llama-tiny", "method": method, "target_modules": targets,
            "rank": rank, "canary_copies": copies, "seed": seed, "membership": "splits", "noise_multiplier": noise,
            "trainable_params": 10, "total_params": 100, "trainable_pct": 10.0}


def _results(with_privacy=True) -> pd.DataFrame:
    # (run, config metrics): q and v LoRA over two seeds, one DP run, all with MIA + utility rows
    # exposure: (rank-based, skew-normal, enumerated); the skew-normal value counts unless the space was enumerated
    runs = [
        (_meta("q-s0"), 0.70, 0.10, 30.0, (5.0, 5.5, True)),
        (_meta("q-s1", seed=1), 0.72, 0.12, 32.0, (6.6, 7.0, False)),
        (_meta("v-s0", targets="v"), 0.60, 0.05, 28.0, (2.0, 3.0, False)),
        (_meta("q-dp", noise=1.0), 0.52, 0.01, 40.0, (0.5, 0.7, True)),
    ]
    rows = []
    for meta, auc, tpr, ppl, (rank, skew, enumerated) in runs:
        rows.append({**meta, "stage": "mia", "attack": "ref_ratio", "auc": auc, "tpr_at_1pct_fpr": tpr})
        rows.append({**meta, "stage": "mia", "attack": "loss", "auc": auc - 0.1, "tpr_at_1pct_fpr": tpr / 2})
        rows.append({**meta, "stage": "mia", "attack": "min_k", "auc": auc + 0.1, "tpr_at_1pct_fpr": tpr})
        rows.append({**meta, "stage": "utility", "attack": "perplexity", "test_ppl": ppl, "utility_ppl": ppl + 1})
        rows.append({**meta, "stage": "exposure", "attack": "exposure", "exposure_rank": rank,
                     "exposure_skewnorm": skew, "enumerated": enumerated})
        rows.append({**meta, "stage": "exposure", "attack": "exposure:base", "exposure_rank": 0.1,
                     "exposure_skewnorm": 0.2, "enumerated": enumerated})
        if with_privacy:
            dp = meta["noise_multiplier"] is not None
            rows.append({**meta, "stage": "privacy", "attack": "dp_audit", "epsilon": 2.5 if dp else math.nan,
                         "dp_noise_multiplier": 1.0 if dp else math.nan, "eps_lower": 0.1 if dp else 1.5})
    rows.append({**_meta("no-utility"), "stage": "mia", "attack": "ref_ratio", "auc": 0.9, "tpr_at_1pct_fpr": 0.5})
    return pd.DataFrame(rows)


def test_table_averages_seeds_and_joins_every_stage():
    results = _results()
    assert strongest_attack(results) == "min_k"  # median AUC over runs; the frontier still uses the primary attack
    table = frontier_table(results).set_index("config")
    assert list(table.index) == ["llama-tiny v r4 c1", "llama-tiny q r4 c1", "llama-tiny q r4 c1 dp1.0"]  # by ppl
    q = table.loc["llama-tiny q r4 c1"]
    assert q.n_runs == 2 and q.auc == pytest.approx(0.71) and q.test_ppl == pytest.approx(31.0)
    assert q.exposure == pytest.approx((5.0 + 7.0) / 2) and q.utility_ppl == pytest.approx(32.0)
    assert table.loc["llama-tiny v r4 c1", "exposure"] == pytest.approx(3.0)  # not enumerated: skew-normal
    assert math.isnan(q.epsilon) and q.eps_lower == pytest.approx(1.5) and q.dp == "none"
    dp = table.loc["llama-tiny q r4 c1 dp1.0"]
    assert dp.epsilon == 2.5 and dp.noise_multiplier == 1.0 and dp.eps_lower == 0.1 and dp.n_runs == 1
    assert (table.attack == "ref_ratio").all() and (table.strongest_attack == "min_k").all()
    assert q.strongest_attack_auc == pytest.approx(0.81)  # the additional, labelled view
    assert frontier_table(results, attack="loss").auc.max() == pytest.approx(0.61)
    front = pareto_front(frontier_table(results), "auc")
    assert list(front.config) == ["llama-tiny v r4 c1", "llama-tiny q r4 c1 dp1.0"]


def test_epsilon_falls_back_to_train_json(tmp_path):
    TrainRecord(run_id="q-dp", seed=0, trainable_params=10, total_params=100, trainable_pct=10.0, canary={},
                dp={"epsilon": 4.25, "noise_multiplier": 1.0}
                ).save(StudyLayout(tmp_path).run_file("q-dp", RunFile.TRAIN))
    table = frontier_table(_results(with_privacy=False), root=tmp_path).set_index("config")
    assert table.loc["llama-tiny q r4 c1 dp1.0", "epsilon"] == 4.25
    assert table.eps_lower.isna().all()
    assert frontier_table(_results(with_privacy=False)).epsilon.isna().all()  # no root: unknown, not made up


def test_figure_is_written_for_each_leak_metric(tmp_path):
    table = frontier_table(_results())
    for leak in ("auc", "tpr_at_1pct_fpr", "exposure"):
        path = frontier_figure(table, tmp_path / f"frontier-{leak}.png", leak=leak)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="leak must be one of"):
        frontier_figure(table, tmp_path / "x.png", leak="bleu")


def test_empty_without_utility_rows(tmp_path):
    only_mia = _results()
    only_mia = only_mia[only_mia.stage == "mia"]
    assert frontier_table(only_mia).empty
    assert frontier_table(pd.DataFrame(columns=["run_id", "stage", "attack"])).empty
    with pytest.raises(ValueError, match="no configuration"):
        frontier_figure(frontier_table(only_mia), tmp_path / "x.png")
