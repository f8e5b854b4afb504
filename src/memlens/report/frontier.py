"""Utility and the privacy / utility frontier: how much each configuration leaks against how good it is.

Reads `results.parquet` rows (see memlens.store.results):

- stage `mia`, the primary attack (:data:`PRIMARY_ATTACK`, as in every section): `auc`, `tpr_at_1pct_fpr`;
  the strongest attack (highest median AUC) is added as the clearly labelled `strongest_attack`,
  `strongest_attack_auc`;
- stage `utility` (attack `perplexity`): `test_ppl` (held-out non-members), `utility_ppl` (third split);
- stage `exposure` (attack `exposure`, the fine-tuned model): exposure in bits, :func:`exposure_bits`;
- stage `privacy` (attack `dp_audit`): `epsilon` (the accountant's), `eps_lower` (one-run empirical lower
  bound), `dp_noise_multiplier`; when absent, epsilon and the noise multiplier come from the run's
  :class:`TrainRecord` (`runs/<run_id>/train.json`) if `root` is given.

A configuration is a cell without its seed: its metrics are averaged over seeds (`n_runs` says how many).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from memlens.attacks.bow import BOW_ATTACK
from memlens.report.inputs import (
    DEFAULT_DESIGN,
    PRIMARY_ATTACK,
    StudyResults,
    exposure_bits,
    rate_suffixes,
    with_run_defaults,
)
from memlens.report.section import Block, Figure, FigureSpec, Omission, Section, Table, Text
from memlens.store import RUN_COLUMNS, RunFile, StudyLayout
from memlens.store.records import TrainRecord

CONFIG_KEYS = ["model", "method", "target_modules", "rank", "canary_copies", "membership", "dp", "learning_rate"]
METRICS = ["auc", "tpr_at_1pct_fpr", "exposure", "test_ppl", "utility_ppl", "epsilon", "eps_lower"]
LEAK_LABELS = {"auc": "MIA AUC", "tpr_at_1pct_fpr": "MIA TPR at 1% FPR", "exposure": "canary exposure (bits)"}
UTILITY_PPL = ("test_ppl", "base_test_ppl", "utility_ppl", "base_utility_ppl")


def _stage(results: pd.DataFrame, stage: str, attack: str | None = None) -> pd.DataFrame:
    if results.empty:
        return results.iloc[0:0]
    rows = results[results.stage == stage]
    return rows[rows.attack == attack] if attack is not None else rows


def strongest_attack(results: pd.DataFrame) -> str | None:
    """The MIA attack with the highest median AUC over runs (the bag-of-words baseline excluded)."""
    mia = _stage(results, "mia")
    mia = mia[mia.attack != BOW_ATTACK] if len(mia) else mia
    if mia.empty:
        return None
    return str(mia.groupby("attack").auc.median().idxmax())


def _train_dp(root: Path | None, run_id: str) -> dict:
    record = TrainRecord.read(StudyLayout(Path(root)).run_file(run_id, RunFile.TRAIN)) if root is not None else None
    return (record.dp or {}) if record is not None else {}


def run_table(results: pd.DataFrame, attack: str = PRIMARY_ATTACK, root: str | Path | None = None) -> pd.DataFrame:
    """One row per run: identifying columns, `attack`, and METRICS (NaN where a stage has not run)."""
    mia = _stage(results, "mia", attack)
    utility = _stage(results, "utility", "perplexity")
    if mia.empty or utility.empty:
        return pd.DataFrame(columns=["run_id", *CONFIG_KEYS, "seed", "draw", "attack", *METRICS])
    mia = with_run_defaults(mia)  # results written before runs recorded a rate and a draw
    table = mia[RUN_COLUMNS + ["auc", "tpr_at_1pct_fpr"]].merge(utility[["run_id", "test_ppl", "utility_ppl"]],
                                                              on="run_id", how="inner")
    exposure = _stage(results, "exposure", "exposure")
    if len(exposure):
        table = table.merge(exposure[["run_id"]].assign(exposure=exposure_bits(exposure)), on="run_id", how="left")
    privacy = _stage(results, "privacy", "dp_audit")
    if len(privacy):
        table = table.merge(privacy[["run_id", "epsilon", "eps_lower", "dp_noise_multiplier"]], on="run_id",
                            how="left")
    for col in METRICS + ["dp_noise_multiplier"]:
        if col not in table:
            table[col] = np.nan
    for i, row in table.iterrows():  # runs the privacy stage has not seen: the DP record of the run itself
        if pd.isna(row.epsilon) and not pd.isna(row.noise_multiplier):
            dp = _train_dp(root, row.run_id)
            table.loc[i, "epsilon"] = dp.get("epsilon", math.nan)
            table.loc[i, "dp_noise_multiplier"] = dp.get("noise_multiplier", math.nan)
    table["dp"] = table.noise_multiplier.map(lambda v: "none" if pd.isna(v) else str(v))
    table["attack"] = attack
    return table.astype({"rank": int, "canary_copies": int, "seed": int, "draw": int})


def frontier_table(results: pd.DataFrame, attack: str = PRIMARY_ATTACK, root: str | Path | None = None
                   ) -> pd.DataFrame:
    """One row per configuration (cell without seed) with its leakage and utility metrics averaged over
    seeds: config, model, method, target_modules, rank, canary_copies, membership (design), dp (the grid's noise
    multiplier, `none`, or `auto`), noise_multiplier (the one used), n_runs, attack, auc, tpr_at_1pct_fpr, exposure,
    test_ppl, utility_ppl, epsilon (accountant, upper bound), eps_lower (empirical lower bound; NaN unless
    the audit's random-split assumption was declared), strongest_attack and strongest_attack_auc (its mean
    AUC). Empty when no run has both MIA and utility rows."""
    runs = run_table(results, attack, root)
    columns = ["config", *CONFIG_KEYS, "noise_multiplier", "n_runs", "attack", *METRICS, "strongest_attack",
               "strongest_attack_auc"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    strongest = strongest_attack(results)
    best = _stage(results, "mia", strongest)[["run_id", "auc"]].rename(columns={"auc": "strongest_attack_auc"})
    runs = runs.assign(model=runs.model.map(lambda p: Path(str(p)).name)).merge(best, on="run_id", how="left")
    grouped = runs.groupby(CONFIG_KEYS, sort=True, dropna=False)
    table = grouped[[*METRICS, "strongest_attack_auc"]].mean().reset_index()
    table["noise_multiplier"] = grouped.dp_noise_multiplier.mean().to_numpy()
    table["n_runs"] = grouped.size().to_numpy()
    table["attack"] = attack
    table["strongest_attack"] = strongest
    table["config"] = table.apply(_label, axis=1) + rate_suffixes(table.learning_rate)
    return table[columns].sort_values(["test_ppl", "config"]).reset_index(drop=True)


def _label(row) -> str:
    what = "full" if row.method == "full" else f"{row.target_modules} r{row['rank']}"
    label = (f"{row.model} {what} c{row.canary_copies}"
             + ("" if row.membership == DEFAULT_DESIGN else f" {row.membership}"))
    return label if row.dp == "none" else f"{label} dp{row.dp}"


def pareto_front(table: pd.DataFrame, leak: str) -> pd.DataFrame:
    """Configurations no other one beats on both lower test perplexity and lower leakage."""
    ordered = table.dropna(subset=["test_ppl", leak]).sort_values(["test_ppl", leak])
    keep, best = [], math.inf
    for i, value in ordered[leak].items():
        if value < best:
            keep.append(i)
            best = value
    return ordered.loc[keep]


def frontier_points(table: pd.DataFrame, leak: str = "auc") -> pd.DataFrame:
    """The configurations of a frontier table that have both `leak` and test perplexity."""
    if leak not in LEAK_LABELS:
        raise ValueError(f"leak must be one of {list(LEAK_LABELS)}, got {leak!r}")
    points = table.dropna(subset=["test_ppl", leak])
    if points.empty:
        raise ValueError(f"no configuration has both {leak} and test_ppl; run the attack and utility stages")
    return points


@dataclass(kw_only=True)
class Frontier(Section):
    anchor = "frontier"
    title = "Privacy / utility frontier"
    table: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/frontier.csv
    leak: str = "auc"

    def blocks(self) -> list[Block]:
        return [Figure(), Table("frontier", self.table)]


def frontier(data: StudyResults) -> Frontier:
    table = frontier_table(data.results, root=data.root)
    if table.empty:
        return Frontier(omitted=Omission("frontier", "no run has both a primary-attack metric and a utility metric"))
    caption = "Leakage against held-out perplexity, one point per configuration."
    return Frontier(table=table, figure=FigureSpec("frontier", caption))


@dataclass(kw_only=True)
class Utility(Section):
    anchor = "utility"
    title = "Utility"
    per_run: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/utility.csv
    by_config: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/utility_by_config.csv

    def blocks(self) -> list[Block]:
        by_config = [Text("Per configuration (mean over its runs): perplexity of the held-out splits under the "
                          "fine-tuned model and under the base model."),
                     Table("utility_by_config", self.by_config, formats={c: ".2f" for c in UTILITY_PPL})] \
            if len(self.by_config) else []
        return [Table("utility", self.per_run), *by_config]


def utility(data: StudyResults) -> Utility:
    util = data.stage("utility")
    if util.empty:
        return Utility(omitted=Omission("utility", "no utility rows in results.parquet"))
    keep = [c for c in util.columns if not util[c].isna().all() and c not in ("stage", "model", "total_params")]
    return Utility(per_run=util[keep], by_config=utility_by_config(util))


def utility_by_config(util: pd.DataFrame) -> pd.DataFrame:
    """Mean test / utility-split perplexity (fine-tuned and base) per configuration, over seeds."""
    values = [c for c in UTILITY_PPL if not util[c].isna().all()]
    if not values:
        return pd.DataFrame()
    keys = ["method", "target_modules", "rank", "canary_copies", "membership", "noise_multiplier"]
    agg = util.groupby(keys, dropna=False)[values].mean()
    agg.insert(0, "n_runs", util.groupby(keys, dropna=False).run_id.nunique())
    return agg.reset_index()
