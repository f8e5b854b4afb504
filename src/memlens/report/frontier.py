"""Privacy / utility frontier: how much each fine-tuning configuration leaks against how good it is.

Reads `results.parquet` (one row per run, stage and attack; see memlens.store.results):

- stage `mia`, one attack (default: the strongest by median AUC): `auc`, `tpr_at_1pct_fpr`;
- stage `utility` (attack `perplexity`): `test_ppl` (held-out non-members), `utility_ppl` (third split);
- stage `exposure` (attack `exposure`, the fine-tuned model): `exposure_rank`, when present;
- stage `privacy` (attack `dp_audit`, memlens.metrics.privacy.run_privacy_audit): `epsilon` (the
  accountant's), `eps_lower` (one-run empirical lower bound), `dp_noise_multiplier`; when absent,
  epsilon and the noise multiplier come from `<root>/runs/<run_id>/train.json["dp"]` if `root` is given;
- identifying columns of every row: run_id, model, method, target_modules, rank, canary_copies, seed,
  noise_multiplier.

A configuration is a cell without its seed: its metrics are averaged over seeds (`n_runs` says how many).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

CONFIG_KEYS = ["model", "method", "target_modules", "rank", "canary_copies", "dp"]
METRICS = ["auc", "tpr_at_1pct_fpr", "exposure", "test_ppl", "utility_ppl", "epsilon", "eps_lower"]
LEAK_LABELS = {"auc": "MIA AUC", "tpr_at_1pct_fpr": "MIA TPR at 1% FPR", "exposure": "canary exposure (bits)"}


def _stage(results: pd.DataFrame, stage: str, attack: str | None = None) -> pd.DataFrame:
    if results.empty or "stage" not in results:
        return results.iloc[0:0]
    rows = results[results.stage == stage]
    return rows[rows.attack == attack] if attack is not None else rows


def strongest_attack(results: pd.DataFrame) -> str | None:
    """The MIA attack with the highest median AUC over runs (the bag-of-words baseline excluded)."""
    mia = _stage(results, "mia")
    mia = mia[mia.attack != "bag_of_words"] if len(mia) else mia
    if mia.empty or "auc" not in mia:
        return None
    return str(mia.groupby("attack").auc.median().idxmax())


def _dp_from_train_json(root: Path | None, run_id: str) -> dict:
    path = Path(root) / "runs" / run_id / "train.json" if root is not None else None
    if path is None or not path.exists():
        return {}
    return json.loads(path.read_text()).get("dp") or {}


def run_table(results: pd.DataFrame, attack: str | None = None, root: str | Path | None = None) -> pd.DataFrame:
    """One row per run: identifying columns, `attack`, and METRICS (NaN where a stage has not run)."""
    attack = attack or strongest_attack(results)
    mia = _stage(results, "mia", attack)
    utility = _stage(results, "utility", "perplexity")
    if mia.empty or utility.empty:
        return pd.DataFrame(columns=["run_id", *CONFIG_KEYS, "seed", "attack", *METRICS])
    ident = ["run_id", "model", "method", "target_modules", "rank", "canary_copies", "seed", "noise_multiplier"]
    table = mia[ident + [c for c in ("auc", "tpr_at_1pct_fpr") if c in mia]].merge(
        utility[["run_id"] + [c for c in ("test_ppl", "utility_ppl") if c in utility]], on="run_id", how="inner")
    exposure = _stage(results, "exposure", "exposure")
    if len(exposure) and "exposure_rank" in exposure:
        table = table.merge(exposure[["run_id", "exposure_rank"]].rename(columns={"exposure_rank": "exposure"}),
                            on="run_id", how="left")
    privacy = _stage(results, "privacy", "dp_audit")
    if len(privacy):
        keep = [c for c in ("epsilon", "eps_lower", "dp_noise_multiplier") if c in privacy]
        table = table.merge(privacy[["run_id", *keep]], on="run_id", how="left")
    for col in METRICS + ["dp_noise_multiplier"]:
        if col not in table:
            table[col] = np.nan
    for i, row in table.iterrows():  # runs the privacy stage has not seen: the DP record of the run itself
        if pd.isna(row.epsilon) and row.noise_multiplier is not None and not pd.isna(row.noise_multiplier):
            dp = _dp_from_train_json(root, row.run_id)
            table.loc[i, "epsilon"] = dp.get("epsilon", math.nan)
            table.loc[i, "dp_noise_multiplier"] = dp.get("noise_multiplier", math.nan)
    table["dp"] = table.noise_multiplier.map(lambda v: "none" if v is None or pd.isna(v) else str(v))
    table["attack"] = attack
    return table.astype({"rank": int, "canary_copies": int, "seed": int})


def frontier_table(results: pd.DataFrame, attack: str | None = None, root: str | Path | None = None
                   ) -> pd.DataFrame:
    """One row per configuration (cell without seed) with its leakage and utility metrics averaged over
    seeds: config, model, method, target_modules, rank, canary_copies, dp (the grid's noise multiplier,
    `none`, or `auto`), noise_multiplier (the one used), n_runs, attack, auc, tpr_at_1pct_fpr, exposure,
    test_ppl, utility_ppl, epsilon (accountant, upper bound), eps_lower (empirical lower bound; NaN unless
    the audit's random-split assumption was declared). Empty when no run has both MIA and utility rows."""
    runs = run_table(results, attack, root)
    columns = ["config", *CONFIG_KEYS, "noise_multiplier", "n_runs", "attack", *METRICS]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    runs = runs.assign(model=runs.model.map(lambda p: Path(str(p)).name))
    grouped = runs.groupby(CONFIG_KEYS, sort=True, dropna=False)
    table = grouped[METRICS].mean().reset_index()
    table["noise_multiplier"] = grouped.dp_noise_multiplier.mean().to_numpy()
    table["n_runs"] = grouped.size().to_numpy()
    table["attack"] = runs.attack.iloc[0]
    table["config"] = table.apply(_label, axis=1)
    return table[columns].sort_values(["test_ppl", "config"]).reset_index(drop=True)


def _label(row) -> str:
    what = "full" if row.method == "full" else f"{row.target_modules} r{row['rank']}"
    label = f"{row.model} {what} c{row.canary_copies}"
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


def frontier_figure(results: pd.DataFrame, path: str | Path, leak: str = "auc", attack: str | None = None,
                    root: str | Path | None = None) -> Path:
    """Scatter of `leak` (auc, tpr_at_1pct_fpr or exposure) against test perplexity, one point per
    configuration; DP configurations are drawn as stars labelled with their epsilon; the Pareto front is
    the dashed line. Writes a PNG to `path` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if leak not in LEAK_LABELS:
        raise ValueError(f"leak must be one of {list(LEAK_LABELS)}, got {leak!r}")
    table = frontier_table(results, attack, root)
    points = table.dropna(subset=["test_ppl", leak])
    if points.empty:
        raise ValueError(f"no configuration has both {leak} and test_ppl; run the attack and utility stages")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plain, private = points[points.dp == "none"], points[points.dp != "none"]
    ax.scatter(plain.test_ppl, plain[leak], marker="o", s=40, label="no DP")
    ax.scatter(private.test_ppl, private[leak], marker="*", s=140, color="tab:red", label="DP-SGD")
    for _, row in private.iterrows():
        text = f"ε={row.epsilon:.2g}" if not pd.isna(row.epsilon) else "ε=?"
        ax.annotate(text, (row.test_ppl, row[leak]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    for _, row in plain.iterrows():
        ax.annotate(row.config.split(" ", 1)[1], (row.test_ppl, row[leak]), textcoords="offset points",
                    xytext=(6, -10), fontsize=7, color="0.35")
    front = pareto_front(points, leak)
    if len(front) > 1:
        ax.plot(front.test_ppl, front[leak], "--", color="0.5", lw=1, label="Pareto front")
    if leak == "auc":
        ax.axhline(0.5, color="0.8", lw=1, zorder=0)
    ax.set_xlabel("test perplexity (held-out non-members; lower is better)")
    ax.set_ylabel(f"{LEAK_LABELS[leak]} ({points.attack.iloc[0]})" if leak != "exposure" else LEAK_LABELS[leak])
    ax.set_title("Privacy / utility frontier")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
