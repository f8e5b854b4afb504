"""Per-sample membership scores for the report: ROC curves and paired DeLong tests between runs.

Reads `mia_scores.parquet` (one row per run and record; higher score = more likely a member, see
:mod:`memlens.metrics.roc`) and uses that module's ROC and DeLong code.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from memlens.metrics.roc import delong_test, roc_points
from memlens.report.inputs import StudyResults

# runs compared record by record: same records (design, record draw) and the same recipe but the matrices
PAIR_KEYS = ["rank", "canary_copies", "seed", "membership", "noise_multiplier", "learning_rate", "draw"]


def _run_scores(data: StudyResults, attack: str) -> pd.DataFrame:
    """mia_scores (`is_member`, one column per attack) joined with each run's grid metadata; empty when
    the attack has no scores."""
    scores = data.mia_scores
    if scores.empty or attack not in scores or data.results.empty:
        return pd.DataFrame()
    meta = data.runs[["run_id", "method", "target_modules", *PAIR_KEYS]]
    frame = scores[["run_id", "sample_id", "is_member", attack]].rename(columns={"is_member": "label",
                                                                                 attack: "score"})
    return frame.merge(meta, on="run_id", how="inner")


def roc_by_targets(data: StudyResults, attack: str) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """{adapted matrices: [(fpr, tpr) per run]} for `attack`."""
    frame = _run_scores(data, attack)
    curves: dict[str, list] = {}
    if frame.empty:  # no scores, or no run with results to join them to
        return curves
    for (targets, _run), g in frame.groupby(["target_modules", "run_id"]):
        if g.label.nunique() < 2 or not np.isfinite(g.score).all():
            continue
        points = roc_points(g.label.astype(bool).to_numpy(), g.score.to_numpy())
        curves.setdefault(targets, []).append((points.fpr.to_numpy(), points.tpr.to_numpy()))
    return curves


def delong_pairs(data: StudyResults, attack: str) -> tuple[pd.DataFrame, str]:
    """DeLong tests between every pair of adapted-matrix sets (or the pairs in `mia.pairs`) at equal rank,
    canary copies, seed, membership design and noise, on the records both runs scored. Returns (tests, reason if
    empty)."""
    frame = _run_scores(data, attack)
    if frame.empty:
        return pd.DataFrame(), "no per-sample membership scores (mia_scores.parquet)"
    frame = frame[frame.method == "lora"]
    wanted = {tuple(sorted(("+".join(a) if isinstance(a, list) else a, "+".join(b) if isinstance(b, list) else b)))
              for a, b in data.study.mia.pairs}
    rows = []
    for keys, g in frame.groupby(PAIR_KEYS, dropna=False):
        runs = g.groupby("target_modules").run_id.first()
        for a, b in itertools.combinations(sorted(runs.index), 2):
            if wanted and tuple(sorted((a, b))) not in wanted:
                continue
            left = g[g.run_id == runs[a]][["sample_id", "label", "score"]]
            right = g[g.run_id == runs[b]][["sample_id", "label", "score"]]
            # Runs of different canary draws can have different member sets: compare on shared records.
            both = left.merge(right, on=["sample_id", "label"], suffixes=("_a", "_b"))
            if both.label.nunique() < 2:
                continue
            test = delong_test(both.label.astype(bool).to_numpy(), both.score_a.to_numpy(), both.score_b.to_numpy())
            rows.append({"set_a": a, "set_b": b, **dict(zip(PAIR_KEYS, keys)), "run_a": runs[a], "run_b": runs[b],
                         "n_records": len(both), "auc_a": test["auc_a"], "auc_b": test["auc_b"],
                         "auc_diff": test["diff"], "z": test["z"], "p_value": test["p_value"]})
    if not rows:
        return pd.DataFrame(), ("needs at least two adapted-matrix sets at the same rank, canary copies and seed"
                                + (f" among the pairs in mia.pairs {data.study.mia.pairs}" if wanted else ""))
    return pd.DataFrame(rows), ""
