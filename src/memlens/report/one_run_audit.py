"""The designed canaries and the one-run audit (`dp.audit_canaries`): how much more the canaries leak than the
records under each attack, and both one-run epsilon lower bounds (Steinke et al. and the Gaussian-DP one) of the
records and of the canaries against the accountant's epsilon.

Reads `results.parquet`: the `mia` rows' records metrics (`tpr_at_1pct_fpr`...) and canary columns
(`canary_<family>_tpr_at_1pct_fpr`..., :mod:`memlens.attacks.canary_metrics`), and the `privacy` rows of attacks
`dp_audit` (records) and `dp_audit_canaries` (:mod:`memlens.attacks.privacy_audit`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from memlens.report.inputs import StudyResults
from memlens.report.section import Block, Omission, Section, Table, Text

POINTS = {"1pct": "1%", "0_1pct": "0.1%"}
_FAMILY = re.compile(r"^canary_(.+)_tpr_at_1pct_fpr$")


def canary_families(mia: pd.DataFrame) -> list[str]:
    """The canary families with columns in these `mia` rows, in column order."""
    return [m.group(1) for c in mia.columns if (m := _FAMILY.match(c))]


def _mean_interval(rows: pd.DataFrame, col: str) -> str:
    """`value [low, high]` of a column's mean over runs (and of its interval's ends), `n/a` when it is null."""
    if col not in rows or rows[col].isna().all():
        return "n/a"
    value = rows[col].mean()
    low, high = rows.get(f"{col}_low", pd.Series(np.nan)).mean(), rows.get(f"{col}_high", pd.Series(np.nan)).mean()
    return f"{value:.3f}" if pd.isna(low) or pd.isna(high) else f"{value:.3f} [{low:.3f}, {high:.3f}]"


def records_vs_canaries(mia: pd.DataFrame, families: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table shown, table as data): per attack, the mean over runs of the records' and each family's TPR at 1%
    and 0.1% FPR with their intervals, and the best family's TPR at 1% FPR over the records'."""
    shown, data = [], []
    for attack, rows in mia.groupby("attack", sort=True):
        line = {"attack": attack, "runs": rows.run_id.nunique()}
        values = {"attack": attack, "n_runs": rows.run_id.nunique()}
        for point, label in POINTS.items():
            line[f"records TPR at {label}"] = _mean_interval(rows, f"tpr_at_{point}_fpr")
            values[f"records_tpr_at_{point}_fpr"] = rows.get(f"tpr_at_{point}_fpr", pd.Series(np.nan)).mean()
            for family in families:
                col = f"canary_{family}_tpr_at_{point}_fpr"
                line[f"{family} TPR at {label}"] = _mean_interval(rows, col)
                values[col] = rows.get(col, pd.Series(np.nan)).mean()
        best = max((values[f"canary_{f}_tpr_at_1pct_fpr"] for f in families), default=np.nan,
                   key=lambda v: -np.inf if pd.isna(v) else v)
        base = values["records_tpr_at_1pct_fpr"]
        values["best_canary_over_records_1pct"] = best / base if base and not pd.isna(base) and not pd.isna(best) \
            else np.nan
        line["best family / records at 1%"] = ("n/a" if pd.isna(values["best_canary_over_records_1pct"])
                                              else f"{values['best_canary_over_records_1pct']:.1f}x")
        shown.append(line)
        data.append(values)
    return pd.DataFrame(shown), pd.DataFrame(data)


BOUND_COLUMNS = ["eps_lower", "eps_lower_gdp"]


def bounds_table(privacy: pd.DataFrame) -> pd.DataFrame:
    """One row per run: the accountant's epsilon, the records' and the canaries' two lower bounds, the canaries'
    guesses, and whether a bound exceeds the accountant's epsilon (`above_epsilon`: a bug when true)."""
    keys = ["run_id", "noise_multiplier", "epsilon", "audit_attack"]
    if privacy.empty:
        privacy = pd.DataFrame(columns=[*keys, "attack"])
    records = privacy[privacy.attack == "dp_audit"]
    canaries = privacy[privacy.attack == "dp_audit_canaries"]
    table = canaries.reindex(columns=keys).copy()
    for col in BOUND_COLUMNS:
        table[f"canaries_{col}"] = canaries[col].to_numpy() if col in canaries else np.nan
        table[f"records_{col}"] = table.run_id.map(records.set_index("run_id")[col]) if col in records else np.nan
    for col in ("n_audited", "n_guesses", "n_correct", "confidence", "delta"):
        table[f"canaries_{col}"] = canaries[col].to_numpy() if col in canaries else np.nan
    bounds = table[[f"{w}_{c}" for w in ("canaries", "records") for c in BOUND_COLUMNS]]
    table["above_epsilon"] = bounds.astype(float).max(axis=1).gt(table.epsilon.astype(float))
    return table.reset_index(drop=True)


def _bounds_display(table: pd.DataFrame) -> pd.DataFrame:
    def fmt(v: float) -> str:
        return "n/a" if pd.isna(v) else f"{v:.2f}"

    return pd.DataFrame({
        "run": table.run_id,
        "accountant ε": [fmt(v) for v in table.epsilon],
        "canaries ε_lo (Steinke)": [fmt(v) for v in table.canaries_eps_lower],
        "canaries ε_lo (GDP)": [fmt(v) for v in table.canaries_eps_lower_gdp],
        "records ε_lo (Steinke)": [fmt(v) for v in table.records_eps_lower],
        "records ε_lo (GDP)": [fmt(v) for v in table.records_eps_lower_gdp],
        "canary guesses (correct)": [f"{int(g)} ({int(c)})" if not pd.isna(g) else "n/a"
                                     for g, c in zip(table.canaries_n_guesses, table.canaries_n_correct)],
    })


@dataclass(kw_only=True)
class CanaryAudit(Section):
    anchor = "canary-audit"
    title = "Designed canaries and the one-run audit"
    families: list[str] = field(default_factory=list)
    tprs: pd.DataFrame = field(default_factory=pd.DataFrame)      # shown
    tpr_data: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/canary_tpr.csv
    bounds: pd.DataFrame = field(default_factory=pd.DataFrame)    # tables/audit_bounds.csv
    notes: list[str] = field(default_factory=list)
    applicable: bool = True  # False when the study asked for no canaries: nothing it failed to show

    def omissions(self) -> list[Omission]:
        return super().omissions() if self.applicable else []

    def blocks(self) -> list[Block]:
        blocks: list[Block] = [
            Text(f"Designed canaries ({', '.join(f'`{f}`' for f in self.families)}) were each inserted into training "
                 "by a fair coin and the rest held out; each family's TPR is its inserted canaries' against its "
                 "held-out ones, next to the records' (members against non-members), mean over runs with the mean "
                 "interval: the records' a bootstrap interval, the canaries' Clopper-Pearson's over the inserted "
                 "canaries at the threshold the held-out ones set (the j-th highest held-out score, j = floor(FPR x "
                 "(held out + 1)), so that its realised FPR is at most the stated one on average; its upper bound is "
                 "below)."),
            Table("canary_tpr", self.tprs, data=self.tpr_data),
            *(Text(n) for n in self.notes),
            Text("One-run epsilon lower bounds at the audit's confidence: Steinke, Nasr & Jagielski 2023 and the "
                 "Gaussian-DP analysis of Mahloujifar, Melis & Chaudhuri 2024 from the same guesses, for the canaries "
                 "and for the records (the records' are n/a unless their membership was a coin per record), against "
                 "the accountant's epsilon (DP runs)."),
            Table("audit_bounds", _bounds_display(self.bounds), data=self.bounds),
        ]
        above = self.bounds[self.bounds.above_epsilon.astype(bool)] if len(self.bounds) else self.bounds
        if len(above):
            blocks.append(Text(f"Warning: in {len(above)} run(s) ({', '.join(above.run_id[:5])}) a lower bound "
                               "exceeds the accountant's epsilon: the training, the accountant or the audit is wrong.",
                               "warn"))
        return blocks


def canary_audit(data: StudyResults) -> CanaryAudit:
    """The section from a study's results; omitted when no run was trained with designed canaries."""
    mia, privacy = data.mia, data.stage("privacy")
    families = canary_families(mia) if len(mia) else []
    if not families:
        asked = data.study.dp.audit_canaries
        reason = (f"dp.audit_canaries is {asked}, and no run has canary results yet" if asked else
                  "no run was trained with designed canaries (dp.audit_canaries is 0)")
        return CanaryAudit(applicable=bool(asked), omitted=Omission("designed canaries", reason))
    shown, values = records_vs_canaries(mia, families)
    notes = []
    for family in families:
        for point, label in POINTS.items():
            col = f"canary_{family}_tpr_at_{point}_fpr_note"
            if col in mia and mia[col].notna().any():
                notes.append(f"`{family}` TPR at {label} FPR: {mia[col].dropna().iloc[0]}.")
            upper = f"canary_{family}_tpr_at_{point}_fpr_fpr_upper"
            if upper in mia and mia[upper].notna().any():
                expected = mia[f"canary_{family}_tpr_at_{point}_fpr_fpr_expected"].mean()
                notes.append(f"`{family}` at {label} FPR: the threshold rule's realised FPR is {expected:.2%} on "
                             f"average, at most {mia[upper].mean():.2%} (one-sided upper bound at the study's level, "
                             "order statistics of the held-out canaries).")
    if "canary_note" in mia:
        unscored = mia.dropna(subset=["canary_note"]).drop_duplicates("attack")
        notes += [f"`{a}`: {n}." for a, n in zip(unscored.attack, unscored.canary_note)]
    return CanaryAudit(families=families, tprs=shown, tpr_data=values, bounds=bounds_table(privacy), notes=notes)


__all__ = ["CanaryAudit", "bounds_table", "canary_audit", "canary_families", "records_vs_canaries"]
