"""`results.parquet`: one row per (run, stage, attack), merged from every stage.

Columns common to every row (see README "Output schema"): run_id, model, method, target_modules,
rank, canary_copies, seed, noise_multiplier, trainable_params, total_params, trainable_pct, stage,
attack. Each stage adds its metric columns (e.g. auc, tpr_at_1pct_fpr for `mia`).
"""

from __future__ import annotations

import pandas as pd

from memlens.config import CellConfig, StudyConfig
from memlens.store.integrity import read_study_parquet
from memlens.store.layout import RunFile, StudyFile, StudyLayout, atomic_write_parquet
from memlens.store.records import TrainRecord

RESULTS_FILE = StudyFile.RESULTS
KEY = ["run_id", "stage", "attack"]
# The identifying columns (run_metadata's, then the key) lead, in this order; measures follow by name, so the
# file's column order does not depend on which rows were merged first (e.g. after a killed run's recovery).
# What identifies a run (run_metadata's first columns; the report groups and labels runs by them).
RUN_COLUMNS = ["run_id", "model", "method", "target_modules", "rank", "canary_copies", "seed", "membership",
               "noise_multiplier", "learning_rate", "draw"]
ID_COLUMNS = [*RUN_COLUMNS, "epsilon", "trainable_params", "total_params", "trainable_pct", "stage", "attack"]
# `model_unchanged` (mia rows): the fine-tuned model's mean NLL is within this of the base model's on every record,
# so it predicts what the base model does (float noise from batching is ~1e-7 nats) and its scores measure the base.
UNCHANGED_NLL_TOL = 1e-5


def run_metadata(layout: StudyLayout, run_id: str, spec: CellConfig, study: StudyConfig) -> dict:
    """The identifying columns of a finished run of `study`'s cell `spec`; parameter counts and the DP noise actually
    used come from the run's `train.json` (what fine-tuning measured)."""
    train = TrainRecord.load(layout.run_file(run_id, RunFile.TRAIN))
    dp = train.dp or {}
    return {
        "run_id": run_id,
        "model": study.model.name_or_path,
        "method": spec.method,
        "target_modules": "+".join(spec.target_modules),
        "rank": spec.rank,
        "canary_copies": spec.canary_copies,
        "seed": spec.seed,
        "membership": spec.membership,
        # the sigma actually used (a calibrated "auto" cell records the number it reached)
        "noise_multiplier": dp.get("noise_multiplier", spec.noise_multiplier),
        "epsilon": dp.get("epsilon"),
        "learning_rate": spec.effective_learning_rate(study.train),
        "draw": spec.draw,
        "trainable_params": train.trainable_params,
        "total_params": train.total_params,
        "trainable_pct": train.trainable_pct,
    }


def with_current_names(results: pd.DataFrame) -> pd.DataFrame:
    """Results under today's column names. Results written before `relaxed_rate` existed called the relaxed match
    (character LCS ratio at or above the threshold) `verbatim_rate`: it is read as `relaxed_rate`, so no older
    number is shown as an exact continuation (`exact_rate`, which those results also carry)."""
    if "verbatim_rate" in results.columns and "relaxed_rate" not in results.columns:
        return results.rename(columns={"verbatim_rate": "relaxed_rate"})
    return results


def read_results(layout: StudyLayout) -> pd.DataFrame:
    """results.parquet (no rows when absent, today's column names); an unreadable file is a CorruptArtifactError
    saying how to rebuild it."""
    frame = read_study_parquet(layout, layout.results_file)
    return pd.DataFrame(columns=KEY) if frame is None else with_current_names(frame)


def upsert_results(layout: StudyLayout, rows: pd.DataFrame) -> pd.DataFrame:
    """Replace the rows with the same (run_id, stage, attack) and append the new ones, atomically.
    Callers hold the study lock when several processes may write (see memlens.runner)."""
    missing = [k for k in KEY if k not in rows.columns]
    if missing:
        raise ValueError(f"result rows lack key column(s) {missing}")
    if rows.duplicated(KEY).any():
        raise ValueError("result rows repeat a (run_id, stage, attack) key")
    original = current = read_results(layout)
    if len(current):
        keys = pd.MultiIndex.from_frame(rows[KEY].astype(str))
        stale = pd.MultiIndex.from_frame(current[KEY].astype(str)).isin(keys)
        current = current[~stale]
    merged = pd.concat([f for f in (current, rows) if len(f)], ignore_index=True) if len(current) else rows
    merged = merged.sort_values(KEY, kind="stable").reset_index(drop=True)
    merged = merged[[c for c in ID_COLUMNS if c in merged] + sorted(c for c in merged if c not in ID_COLUMNS)]
    if not _same(merged, original):  # a no-op merge leaves the file (and its mtime) alone
        atomic_write_parquet(layout.results_file, merged)
    return merged


def _same(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return False
    try:
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_dtype=False,
                                      check_exact=True)
    except AssertionError:
        return False
    return True
