"""The report's first screen: which configuration memorizes most, by how much, and how sure we are.

Per configuration (a cell without its seed), the primary attack's AUC and interval (means over seeds, as in
the study table); the highest against the lowest, and whether their intervals overlap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from memlens.report.inputs import DEFAULT_DESIGN, PRIMARY_ATTACK, StudyResults, rate_suffixes
from memlens.report.section import Block, Figure, FigureSpec, Omission, Section, Table, Text

KEYS = ["method", "target_modules", "rank", "canary_copies", "membership", "noise_multiplier", "learning_rate"]


def config_label(row) -> str:
    """`[v] r2 c8` (LoRA), `full c8` (full fine-tuning), with the design unless `splits` and ` dp<sigma>`."""
    what = "full" if row.method == "full" else f"[{row.target_modules}] r{int(row['rank'])}"
    label = f"{what} c{int(row.canary_copies)}" + ("" if row.membership == DEFAULT_DESIGN else f" {row.membership}")
    return label if pd.isna(row.noise_multiplier) else f"{label} dp{row.noise_multiplier:g}"


def describe(row, several_designs: bool = False) -> str:
    """A configuration in words: `LoRA on [v] at rank 2, 8 canary copies`; with its membership design unless it
    is `splits` in a study that has no other."""
    what = "full fine-tuning" if row.method == "full" else f"LoRA on [{row.target_modules}] at rank {int(row['rank'])}"
    copies = int(row.canary_copies)
    text = f"{what}, {copies} canary cop{'y' if copies == 1 else 'ies'}"
    if row.membership != DEFAULT_DESIGN:
        text += f", {row.membership} membership design"
    elif several_designs:
        text += ", named-split membership design"
    return text if pd.isna(row.noise_multiplier) else f"{text}, DP-SGD noise {row.noise_multiplier:g}"


@dataclass(kw_only=True)
class Headline(Section):
    anchor = "headline"
    title = "Which configuration memorizes most"
    configs: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/headline.csv, highest AUC first
    sentences: list[str] = field(default_factory=list)
    overlap: bool | None = None  # the highest and lowest intervals overlap (None: fewer than two configurations)

    def blocks(self) -> list[Block]:
        return [Text(" ".join(self.sentences)), Figure(), Table("headline", self.configs)]

    @property
    def highest(self) -> pd.Series | None:
        return self.configs.iloc[0] if len(self.configs) else None

    @property
    def lowest(self) -> pd.Series | None:
        return self.configs.iloc[-1] if len(self.configs) > 1 else None


def _auc(row, level: float) -> str:
    runs = f", mean over {int(row.n_runs)} runs" if row.n_runs > 1 else ""
    return f"AUC {row.auc:.3f} ({level:.0%} CI {row.auc_ci_low:.3f}-{row.auc_ci_high:.3f}{runs})"


def headline(data: StudyResults) -> Headline:
    primary, level = data.primary(), data.study.mia.ci_level
    if primary.empty:
        return Headline(omitted=Omission("headline", data.primary_missing()))
    grouped = primary.groupby(KEYS, dropna=False)  # the replicates (seed, record draw) of a configuration averaged
    configs = grouped[["auc", "auc_ci_low", "auc_ci_high"]].mean()
    configs.insert(0, "n_runs", grouped.run_id.nunique())
    configs = configs.reset_index()
    configs.insert(0, "config", configs.apply(config_label, axis=1) + rate_suffixes(configs.learning_rate))
    configs = configs.sort_values(["auc", "config"], ascending=[False, True]).reset_index(drop=True)
    top = configs.iloc[0]
    several = configs.membership.nunique() > 1
    sentences = [f"{top.config} ({describe(top, several)}) memorizes most: membership {_auc(top, level)} "
                 f"under the primary attack {PRIMARY_ATTACK}, where 0.5 is chance."]
    figure = FigureSpec("headline", f"Membership AUC ({PRIMARY_ATTACK}) of every configuration with its "
                        f"{level:.0%} interval, highest first; red: the highest (shaded: its interval), "
                        "blue: the lowest; dotted: chance.")
    if len(configs) < 2:
        sentences.append("It is the only configuration with results: there is nothing to compare it with.")
        return Headline(configs=configs, sentences=sentences, figure=figure)
    low = configs.iloc[-1]
    sentences.append(f"The least is {low.config} ({describe(low, several)}), {_auc(low, level)}: "
                     f"{top.auc - low.auc:.3f} lower, over {len(configs)} configurations.")
    overlap = bool(top.auc_ci_low <= low.auc_ci_high)
    if pd.isna(top.auc_ci_low) or pd.isna(low.auc_ci_high):
        sentences.append("Their intervals are not known, so how sure the difference is cannot be said.")
        overlap = None
    elif overlap:
        sentences.append(f"Their {level:.0%} intervals overlap: these runs do not establish that the difference is "
                         "real; more records or seeds would.")
    else:
        sentences.append(f"Their {level:.0%} intervals do not overlap: the difference is larger than the "
                         "sampling error of these records.")
    return Headline(configs=configs, sentences=sentences, overlap=overlap, figure=figure)
