"""Matplotlib drawings of the analysis' figure data (no computation beyond laying out what it holds).

One drawer per section type that has a figure, registered with :func:`draws`; :func:`draw` looks it up."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from memlens.report import membership as mb
from memlens.report import memorization as mz
from memlens.report.frontier import LEAK_LABELS, Frontier, frontier_points, pareto_front
from memlens.report.headline import Headline
from memlens.report.inputs import PRIMARY_ATTACK
from memlens.report.saturation import saturating
from memlens.report.section import Section
from memlens.report.suspect import SuspectEvidence

DRAWERS: dict[type, tuple[Callable[[Section], plt.Figure], int]] = {}  # section type -> (drawer, dpi)


def draws(section_type: type, dpi: int = 110):
    """Decorator registering the drawer of a section type's figure (at `dpi`)."""
    def wrap(fn: Callable) -> Callable:
        DRAWERS[section_type] = (fn, dpi)
        return fn
    return wrap


def _colours(names) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(sorted(names))}


@draws(Headline)
def headline(h: Headline) -> plt.Figure:
    configs = h.configs
    fig, ax = plt.subplots(figsize=(7, max(2.2, 0.32 * len(configs) + 1.2)))
    top = configs.iloc[0]
    if not (pd.isna(top.auc_ci_low) or pd.isna(top.auc_ci_high)):  # what overlaps the highest's interval
        ax.axvspan(top.auc_ci_low, top.auc_ci_high, color="tab:red", alpha=0.07, lw=0)
    y = np.arange(len(configs))
    for i, row in enumerate(configs.itertuples()):
        colour = "tab:red" if i == 0 else "tab:blue" if i == len(configs) - 1 else "0.45"
        err = np.nan_to_num([[row.auc - row.auc_ci_low], [row.auc_ci_high - row.auc]])
        ax.errorbar([row.auc], [i], xerr=err, fmt="o", color=colour, capsize=3)
    ax.axvline(0.5, color="k", ls=":", lw=0.8)
    ax.set_yticks(y, configs.config, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"membership ROC AUC ({PRIMARY_ATTACK})")
    return fig


@draws(mb.RocCurves)
def roc(s: mb.RocCurves) -> plt.Figure:
    colours = _colours(s.curves)
    fig, (lin, log) = plt.subplots(1, 2, figsize=(10, 4.2))
    for targets, runs in s.curves.items():
        for i, (fpr, tpr) in enumerate(runs):
            label = f"[{targets}]" if i == 0 else None
            lin.plot(fpr, tpr, color=colours[targets], alpha=0.8, lw=1.2, label=label)
            keep = (fpr > 0) & (tpr > 0)
            log.plot(fpr[keep], tpr[keep], color=colours[targets], alpha=0.8, lw=1.2, label=label)
    lin.plot([0, 1], [0, 1], "k:", lw=0.8)
    log.plot([s.min_fpr, 1], [s.min_fpr, 1], "k:", lw=0.8)
    log.set_xscale("log"), log.set_yscale("log")
    for ax, name in ((lin, "linear"), (log, "log-log")):
        ax.set_xlabel("false positive rate"), ax.set_ylabel("true positive rate"), ax.set_title(name)
        ax.legend(fontsize=8)
    return fig


@draws(mb.AucVsRank)
def auc_vs_rank(s: mb.AucVsRank) -> plt.Figure:
    colours = _colours(s.curve.target_modules.unique())
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for targets, g in s.curve.groupby("target_modules"):
        g = g.sort_values("rank")
        err = np.vstack([g.auc - g.low, g.high - g.auc])
        ax.errorbar(g["rank"], g.auc, yerr=np.nan_to_num(err), marker="o", capsize=3, label=f"[{targets}]",
                    color=colours[targets])
    for fit in s.fits:
        if fit.ok:
            grid = np.geomspace(min(fit.ranks), max(fit.ranks), 100)
            ax.plot(grid, saturating(grid, fit.plateau, fit.auc0, fit.scale), ls="--", lw=1,
                    color=colours[fit.target_modules], label=f"[{fit.target_modules}] fit, plateau {fit.plateau:.3f}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank"), ax.set_ylabel(f"ROC AUC ({PRIMARY_ATTACK})"), ax.legend(fontsize=8)
    return fig


@draws(mz.Copies)
def copies(s: mz.Copies) -> plt.Figure:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    colours = _colours(s.auc.target_modules.unique())
    for targets, g in s.auc.groupby("target_modules"):
        left.plot(g.canary_copies, g.auc, marker="o", label=f"[{targets}]", color=colours[targets])
    left.set_xscale("log", base=2), left.set_xlabel("canary copies"), left.set_ylabel("membership AUC (all records)")
    left.legend(fontsize=8)
    if s.canary.empty:
        right.set_axis_off()
        right.text(0.5, 0.5, "no extraction of the canary", ha="center", va="center")
        return fig
    for (targets, decoding), g in s.canary.groupby(["target_modules", "decoding"]):
        right.plot(g.canary_copies, g.ngram_share, marker="o", label=f"[{targets}] {decoding}",
                   color=colours.get(targets), ls="-" if decoding == "greedy" else "--")
    right.set_xscale("log", base=2), right.set_ylim(-0.02, 1.02)
    right.set_xlabel("canary copies"), right.set_ylabel("canary suffix n-gram share"), right.legend(fontsize=7)
    return fig


@draws(mz.NgramPerplexity)
def perplexity(s: mz.NgramPerplexity) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, (column, label) in zip(axes, mz.PERPLEXITIES):
        ax.scatter(s.points[column], s.points[s.outcome], s=8, alpha=0.5)
        ax.set_xscale("log"), ax.set_xlabel(f"perplexity under the {label}")
        row = s.correlation(column)
        ax.set_title("too few varied points for a correlation" if row is None else
                     f"Spearman r = {row.spearman_r:.2f} (p = {row.spearman_p:.2g}); "
                     f"Pearson r = {row.pearson_r_log_ppl:.2f} (p = {row.pearson_p:.2g})", fontsize=9)
    axes[0].set_ylabel(mz.OUTCOMES[s.outcome])
    return fig


@draws(mz.Exposure)
def exposure(s: mz.Exposure) -> plt.Figure:
    table = s.table
    colours = _colours(table.target_modules.unique())
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (targets, rank), g in table[table.model == "finetuned"].groupby(["target_modules", "rank"]):
        ax.plot(g.canary_copies, g.exposure, marker="o", label=f"[{targets}] r{rank}", color=colours[targets])
    if len(s.base):
        ax.plot(s.base.index, s.base.values, "k:", marker="x", label="base model (control)")
    ax.set_xscale("log", base=2), ax.set_xlabel("canary copies"), ax.set_ylabel("exposure (bits)")
    ax.legend(fontsize=8)
    return fig


@draws(mb.AttackComparison)
def attacks(s: mb.AttackComparison) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, column, label in ((axes[0], "auc", "ROC AUC"), (axes[1], "tpr_at_1pct_fpr", "TPR at 1% FPR")):
        if column in s.notes:
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{label}: n/a\n{s.notes[column]}", ha="center", va="center", wrap=True)
            continue
        ax.barh(s.table.attack, s.table[column].fillna(0), color="tab:blue")
        ax.invert_yaxis(), ax.set_xlabel(f"{label} (mean over runs)")
    axes[0].axvline(0.5, color="k", ls=":", lw=0.8)
    return fig


def frontier(table: pd.DataFrame, leak: str = "auc") -> plt.Figure:
    """Scatter of `leak` (auc, tpr_at_1pct_fpr or exposure) against test perplexity, one point per
    configuration of a frontier table; DP configurations are stars labelled with their epsilon; the Pareto
    front is the dashed line."""
    points = frontier_points(table, leak)
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
    return fig


@draws(Frontier, dpi=120)
def frontier_section(s: Frontier) -> plt.Figure:
    return frontier(s.table, s.leak)


def frontier_figure(table: pd.DataFrame, path: str | Path, leak: str = "auc") -> Path:
    """:func:`frontier` of a frontier table written as a PNG to `path`."""
    return save(frontier(table, leak), Path(path), dpi=120)


def save(fig: plt.Figure, path: Path, dpi: int = 110) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def draw(section: Section) -> tuple[plt.Figure, int]:
    """The figure of a section of the analysis and its resolution (dpi)."""
    try:
        drawer, dpi = DRAWERS[type(section)]
    except KeyError:
        raise TypeError(f"{type(section).__name__} has a figure but no drawer: register one with @draws") from None
    return drawer(section), dpi


@draws(SuspectEvidence)
def suspect_scores(e: SuspectEvidence) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 3))
    suspects, non = e.test_scores.get("suspect_b", []), e.test_scores.get("non_members_b", [])
    bins = np.histogram_bin_edges(np.r_[suspects, non], bins=20) if len(suspects) + len(non) else 10
    ax.hist(non, bins=bins, alpha=0.55, color="tab:blue", label=f"known non-members ({len(non)})")
    ax.hist(suspects, bins=bins, alpha=0.55, color="tab:red", label=f"suspects ({len(suspects)})")
    ax.set_xlabel(f"aggregated score per {e.unit} (higher: more like a training record)")
    ax.set_ylabel(f"{e.unit}s")
    ax.legend(fontsize=8)
    return fig
