"""Build the study report from the files of a study folder.

Each section adds its HTML to a :class:`Report`, which also keeps every table it computed
(`rep.frames`), every figure it wrote (`rep.figure_files`) and every omission with its reason, so other
renderings (the Markdown findings document, :mod:`memlens.report.markdown`) reuse the same numbers. A
section whose data is missing says why it is omitted instead of drawing something made up. The HTML
inlines every figure (base64 PNG) and needs no network and no JavaScript.
"""

from __future__ import annotations

import base64
import html
import importlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from memlens.report.data import REPORT_INPUTS, StudyResults  # noqa: E402
from memlens.report.findings import Finding, finding_perplexity, finding_rank, finding_value_output  # noqa: E402
from memlens.report.mdtable import pm  # noqa: E402
from memlens.report import scores, timings  # noqa: E402
from memlens.report.saturation import fit_table, saturating  # noqa: E402
from memlens.store import atomic_write_json, atomic_write_text  # noqa: E402

BOW_WARN_DISTANCE = 0.1  # bag-of-words AUC this far from 0.5 means the split is separable without a model


class Report:
    """Collects sections; writes figures/ and tables/ as it goes."""

    def __init__(self, data: StudyResults, out: Path):
        self.data = data
        self.out = out
        self.figures = out / "figures"
        self.tables = out / "tables"
        for folder in (self.figures, self.tables):
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.iterdir():  # a figure that can no longer be made must not linger
                stale.unlink()
        self.sections: list[tuple[str, str, str]] = []  # (anchor, title, html)
        self.omitted: list[tuple[str, str]] = []  # (what, reason)
        self.frames: dict[str, pd.DataFrame] = {}  # every table written to tables/, by name
        self.figure_files: dict[str, tuple[Path, str]] = {}  # figure name -> (png path, caption)
        self.findings: list[Finding] = []
        self.correlations: list[dict] = []  # n-gram share vs perplexity (finding 2)
        self.bow_verdict: tuple[bool, str] | None = None  # (split separable by words alone, in words)
        self.build_seconds: float | None = None  # wall time of build(), set when it finishes

    def omitted_reason(self, what: str) -> str | None:
        """Why `what` was omitted, or None when it was not."""
        return next((reason for w, reason in self.omitted if w == what), None)

    # -- building blocks
    def figure(self, fig: plt.Figure, name: str, caption: str) -> str:
        path = self.figures / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        self.figure_files[name] = (path, caption)
        encoded = base64.b64encode(path.read_bytes()).decode()
        return (f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(caption)}" '
                f'data-name="{name}"><figcaption>{html.escape(caption)}</figcaption></figure>')

    def table(self, frame: pd.DataFrame, name: str, html_frame: pd.DataFrame | None = None) -> str:
        frame.to_csv(self.tables / f"{name}.csv", index=False)
        self.frames[name] = frame
        shown = frame if html_frame is None else html_frame
        body = shown.to_html(index=False, border=0, classes="data", na_rep="n/a",
                             float_format=lambda v: f"{v:.4g}")
        return f'<div class="table" data-name="{name}">{body}<p class="src">tables/{name}.csv</p></div>'

    def omit(self, what: str, reason: str) -> str:
        self.omitted.append((what, reason))
        return f'<p class="omitted"><b>{html.escape(what)}</b> omitted: {html.escape(reason)}</p>'

    def add(self, anchor: str, title: str, body: str) -> None:
        self.sections.append((anchor, title, body))


# --------------------------------------------------------------------------------------- sections
def _group_extra(frame: pd.DataFrame) -> list[str]:
    """Grid axes besides rank and matrices that vary in this study (tables are split by them)."""
    extra = []
    for column in ("canary_copies", "noise_multiplier", "method"):
        if column in frame and frame[column].nunique(dropna=False) > 1:
            extra.append(column)
    return extra


def section_study_table(rep: Report) -> None:
    primary = rep.data.primary()
    if primary.empty:
        rep.add("table", "Rank × adapted matrices", rep.omit("study table", "no membership-inference results"))
        return
    keys = ["target_modules", "rank", *_group_extra(primary)]
    agg = primary.groupby(keys, dropna=False).agg(
        n_runs=("run_id", "nunique"), auc=("auc", "mean"), auc_sd_runs=("auc", "std"),
        auc_ci_low=("auc_ci_low", "mean"), auc_ci_high=("auc_ci_high", "mean"),
        trainable_params=("trainable_params", "first"), trainable_pct=("trainable_pct", "first"),
    ).reset_index()
    cell = agg.apply(lambda r: f"{pm(r.auc, r.auc_ci_low, r.auc_ci_high)}<br><small>{int(r.trainable_params):,}"
                     f" params ({r.trainable_pct:.2g}%)</small>", axis=1)
    pivot = agg.assign(cell=cell).pivot_table(index=["rank", *keys[2:]], columns="target_modules",
                                                values="cell", aggfunc="first").reset_index()
    pivot.columns = [f"[{c}]" if c in set(agg.target_modules) else c for c in pivot.columns]
    body = (f"<p>Membership inference ROC AUC of the <code>{rep.data.primary_attack}</code> attack, ± half the "
            f"{rep.data.study.mia.ci_level:.0%} confidence interval (mean over seeds/runs where there are several), "
            "with the number and share of trainable parameters.</p>")
    table_html = pivot.to_html(index=False, border=0, escape=False, classes="data", na_rep="—")
    agg.to_csv(rep.tables / "study_table.csv", index=False)
    rep.frames["study_table"] = agg
    body += f'<div class="table" data-name="study_table">{table_html}<p class="src">tables/study_table.csv</p></div>'
    rep.add("table", "Rank × adapted matrices", body)


def _colours(names: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(sorted(names))}


def section_roc(rep: Report) -> None:
    attack = rep.data.primary_attack
    title = "ROC curves per adapted matrices"
    curves = scores.roc_by_targets(rep.data, attack) if attack else None
    if not curves:
        rep.add("roc", title, rep.omit("ROC curves", "no per-sample membership scores (mia_scores.parquet)"))
        return
    colours = _colours(list(curves))
    fig, (lin, log) = plt.subplots(1, 2, figsize=(10, 4.2))
    for targets, runs in curves.items():
        for i, (fpr, tpr) in enumerate(runs):
            label = f"[{targets}]" if i == 0 else None
            lin.plot(fpr, tpr, color=colours[targets], alpha=0.8, lw=1.2, label=label)
            keep = (fpr > 0) & (tpr > 0)
            log.plot(fpr[keep], tpr[keep], color=colours[targets], alpha=0.8, lw=1.2, label=label)
    lin.plot([0, 1], [0, 1], "k:", lw=0.8)
    lo = 1.0 / max(len(rep.data.mia_scores), 2)
    log.plot([lo, 1], [lo, 1], "k:", lw=0.8)
    log.set_xscale("log"), log.set_yscale("log")
    for ax, name in ((lin, "linear"), (log, "log-log")):
        ax.set_xlabel("false positive rate"), ax.set_ylabel("true positive rate"), ax.set_title(name)
        ax.legend(fontsize=8)
    caption = f"ROC of the {attack} attack, one curve per run, coloured by adapted matrices (linear and log-log)."
    rep.add("roc", title, rep.figure(fig, "roc", caption))


def section_auc_vs_rank(rep: Report) -> None:
    primary = rep.data.primary()
    title = "AUC vs LoRA rank"
    lora = primary[primary.method == "lora"] if len(primary) else primary
    if lora.empty:
        rep.add("rank", title, rep.omit("AUC vs rank", "no LoRA membership-inference results"))
        return
    if lora["rank"].nunique() < 2:
        rep.add("rank", title, rep.omit("AUC vs rank", f"the grid has one LoRA rank ({lora['rank'].iloc[0]}); "
                                        "add ranks to grid.rank"))
        return
    curve = lora.groupby(["target_modules", "rank"]).agg(auc=("auc", "mean"), low=("auc_ci_low", "mean"),
                                                          high=("auc_ci_high", "mean"),
                                                          n_runs=("run_id", "nunique")).reset_index()
    fits_frame, fits = fit_table(curve)
    colours = _colours(list(curve.target_modules.unique()))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for targets, g in curve.groupby("target_modules"):
        g = g.sort_values("rank")
        err = np.vstack([g.auc - g.low, g.high - g.auc])
        ax.errorbar(g["rank"], g.auc, yerr=np.nan_to_num(err), marker="o", capsize=3, label=f"[{targets}]",
                    color=colours[targets])
    for fit in fits:
        if fit.ok:
            grid = np.geomspace(min(fit.ranks), max(fit.ranks), 100)
            ax.plot(grid, saturating(grid, fit.plateau, fit.auc0, fit.scale), ls="--", lw=1,
                    color=colours[fit.target_modules], label=f"[{fit.target_modules}] fit, plateau {fit.plateau:.3f}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank"), ax.set_ylabel(f"ROC AUC ({rep.data.primary_attack})"), ax.legend(fontsize=8)
    fitted = sum(f.ok for f in fits)
    caption = ("Membership AUC against LoRA rank per adapted-matrix set (mean, CI); dashed: fitted saturation "
               f"auc(r) = plateau - (plateau - auc0) exp(-r / scale) ({fitted} of {len(fits)} set(s) fitted).")
    body = rep.figure(fig, "auc_vs_rank", caption)
    body += rep.table(curve, "auc_vs_rank")
    body += ("<p>Saturation fit per matrix set: the plateau (± its standard error), the extrapolated AUC at "
             "rank 0, and <code>rank_90</code>, the rank reaching 90% of the gain; a fit that cannot be made "
             "has empty values and the reason.</p>") + rep.table(fits_frame, "auc_rank_fit")
    rep.add("rank", title, body)


def section_copies(rep: Report) -> None:
    title = "AUC and extraction vs canary copies"
    primary, ext = rep.data.primary(), _finetuned_rows(rep.data.extraction)
    copies = sorted(set(primary.canary_copies) if len(primary) else set())
    if len(copies) < 2:
        rep.add("copies", title, rep.omit("AUC and extraction vs copies",
                                          f"the grid has {len(copies)} canary-copies value(s) {copies}; "
                                          "add values to grid.canary_copies"))
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    auc = primary.groupby(["target_modules", "canary_copies"]).auc.mean().reset_index()
    colours = _colours(list(auc.target_modules.unique()))
    for targets, g in auc.groupby("target_modules"):
        left.plot(g.canary_copies, g.auc, marker="o", label=f"[{targets}]", color=colours[targets])
    left.set_xscale("log", base=2), left.set_xlabel("canary copies"), left.set_ylabel("membership AUC (all records)")
    left.legend(fontsize=8)
    body_tables = ""
    canary = ext[ext.is_canary.astype(bool)] if len(ext) and "is_canary" in ext else pd.DataFrame()
    if canary.empty:
        right.set_axis_off()
        right.text(0.5, 0.5, "no extraction of the canary", ha="center", va="center")
        note = rep.omit("canary extraction vs copies", "no extraction rows for the canary (extraction.parquet)")
    else:
        meta = rep.data.results.drop_duplicates("run_id")[["run_id", "canary_copies", "target_modules"]]
        canary = canary.merge(meta, on="run_id", how="left")
        table = canary.groupby(["target_modules", "decoding", "canary_copies"]).agg(
            ngram_share=("ngram_share", "mean"), exact_match=("exact_match", "mean"),
            n_runs=("run_id", "nunique")).reset_index()
        for (targets, decoding), g in table.groupby(["target_modules", "decoding"]):
            right.plot(g.canary_copies, g.ngram_share, marker="o", label=f"[{targets}] {decoding}",
                       color=colours.get(targets), ls="-" if decoding == "greedy" else "--")
        right.set_xscale("log", base=2), right.set_ylim(-0.02, 1.02)
        right.set_xlabel("canary copies"), right.set_ylabel("canary suffix n-gram share"), right.legend(fontsize=7)
        body_tables = rep.table(table, "canary_extraction_vs_copies")
        note = ""
    body = rep.figure(fig, "copies", "Left: membership AUC; right: share of the canary's suffix reproduced "
                      "(longest common n-gram / suffix length), against canary copies.") + note + body_tables
    rep.add("copies", title, body)


def _decoding_choice(ext: pd.DataFrame) -> str:
    decodings = list(ext.decoding.unique())
    return "greedy" if "greedy" in decodings else sorted(decodings)[0]


def _finetuned_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of the fine-tuned models (the extraction stage also runs the base model as a control)."""
    return frame[frame.model == "finetuned"] if "model" in frame and len(frame) else frame


def _member_extraction(data: StudyResults) -> pd.DataFrame:
    ext = _finetuned_rows(data.extraction)
    if ext.empty or "is_member" not in ext:
        return pd.DataFrame()
    members = ext[ext.is_member.astype(bool) & ~ext.get("is_canary", False).astype(bool)]
    return members[members.decoding == _decoding_choice(ext)] if len(members) else members


def section_perplexity(rep: Report) -> list[dict]:
    title = "Verbatim reproduction vs perplexity"
    members = _member_extraction(rep.data)
    needed = {"ngram_share", "ppl_ft", "ppl_base"}
    if members.empty or not needed <= set(members.columns):
        rep.add("perplexity", title, rep.omit("n-gram share vs perplexity", "no extraction rows on member records"))
        return []
    frame = members.dropna(subset=list(needed))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    rows = []
    for ax, column, label in ((axes[0], "ppl_ft", "fine-tuned model"), (axes[1], "ppl_base", "base model")):
        ax.scatter(frame[column], frame.ngram_share, s=8, alpha=0.5)
        ax.set_xscale("log"), ax.set_xlabel(f"perplexity under the {label}")
        if len(frame) >= 3 and frame.ngram_share.nunique() > 1 and frame[column].nunique() > 1:
            sp = stats.spearmanr(frame[column], frame.ngram_share)
            pe = stats.pearsonr(np.log(frame[column]), frame.ngram_share)
            rows.append({"perplexity": column, "n": len(frame), "spearman_r": sp.statistic, "spearman_p": sp.pvalue,
                         "pearson_r_log_ppl": pe.statistic, "pearson_p": pe.pvalue})
            ax.set_title(f"Spearman r = {sp.statistic:.2f} (p = {sp.pvalue:.2g}); "
                         f"Pearson r = {pe.statistic:.2f} (p = {pe.pvalue:.2g})", fontsize=9)
        else:
            ax.set_title("too few varied points for a correlation", fontsize=9)
    axes[0].set_ylabel("suffix n-gram share")
    caption = (f"Each point is a member record ({_decoding_choice(rep.data.extraction)} decoding, pooled over "
               f"{frame.run_id.nunique()} run(s)): share of its suffix reproduced against its perplexity.")
    body = rep.figure(fig, "ngram_share_vs_perplexity", caption)
    if rows:
        body += rep.table(pd.DataFrame(rows), "ngram_share_vs_perplexity")
    rep.correlations = rows
    rep.add("perplexity", title, body)
    return rows


def section_exposure(rep: Report) -> None:
    title = "Canary exposure vs copies"
    exp = rep.data.exposure
    if exp.empty or not {"exposure_rank", "exposure_skewnorm"} & set(exp.columns) and "exposure" not in exp:
        reason = ("the canary has no secret to rank (canary.mode: repeat); use canary.mode: insert"
                  if rep.data.study.canary.mode == "repeat" else "no exposure rows (exposure.parquet)")
        rep.add("exposure", title, rep.omit("exposure vs copies", reason))
        return
    if "exposure" not in exp:
        # Exact rank when the whole secret space was enumerated, else the skew-normal extrapolation.
        enumerated = exp["enumerated"].astype(bool) if "enumerated" in exp else False
        exp = exp.assign(exposure=np.where(enumerated, exp.get("exposure_rank"), exp.get("exposure_skewnorm")))
    meta = rep.data.results.drop_duplicates("run_id")[["run_id", "canary_copies", "target_modules", "rank"]]
    frame = exp.drop(columns=[c for c in ("canary_copies", "target_modules", "rank") if c in exp]).merge(
        meta, on="run_id", how="left")
    if "model" not in frame:
        frame["model"] = "finetuned"
    table = frame.groupby(["model", "target_modules", "rank", "canary_copies"]).agg(
        exposure=("exposure", "mean"), n_runs=("run_id", "nunique")).reset_index()
    colours = _colours(list(table.target_modules.unique()))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (model, targets, rank), g in table.groupby(["model", "target_modules", "rank"]):
        if model == "finetuned":
            ax.plot(g.canary_copies, g.exposure, marker="o", label=f"[{targets}] r{rank}", color=colours[targets])
    base = table[table.model != "finetuned"].groupby("canary_copies").exposure.mean()
    if len(base):
        ax.plot(base.index, base.values, "k:", marker="x", label="base model (control)")
    ax.set_xscale("log", base=2), ax.set_xlabel("canary copies"), ax.set_ylabel("exposure (bits)")
    ax.legend(fontsize=8)
    body = rep.figure(fig, "exposure_vs_copies", "Exposure of the inserted secret, log2|R| - log2 rank (exact "
                      "rank when the secret space was enumerated, else the skew-normal extrapolation), under each "
                      "fine-tuned model and under the base model.")
    rep.add("exposure", title, body + rep.table(table, "exposure_vs_copies"))


def section_attacks(rep: Report) -> None:
    title = "Attack comparison"
    mia = rep.data.mia
    if mia.empty:
        rep.add("attacks", title, rep.omit("attack comparison", "no membership-inference results"))
        return
    table = attack_table(mia)
    cols = [c for c in ("attack", "n_runs", "auc", "tpr_at_10pct_fpr", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr")
            if c in table]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, column, label in ((axes[0], "auc", "ROC AUC"), (axes[1], "tpr_at_1pct_fpr", "TPR at 1% FPR")):
        if column not in table or table[column].isna().all():
            note = mia.get(f"{column}_note", pd.Series(dtype=object)).dropna()
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{label}: n/a\n{note.iloc[0] if len(note) else 'not computed'}", ha="center",
                    va="center", wrap=True)
            continue
        ax.barh(table.attack, table[column].fillna(0), color="tab:blue")
        ax.invert_yaxis(), ax.set_xlabel(f"{label} (mean over runs)")
    axes[0].axvline(0.5, color="k", ls=":", lw=0.8)
    body = rep.figure(fig, "attacks", "Every membership attack, averaged over runs (n/a TPR drawn as 0).")
    rep.add("attacks", title, body + rep.table(table, "attacks", html_frame=table[cols]))


TPR_POINTS = ("10pct", "1pct", "0_1pct")


def attack_table(mia: pd.DataFrame) -> pd.DataFrame:
    """Per attack, the mean over runs of the AUC, its interval, and the TPR at 10%, 1% and 0.1% FPR with
    their bootstrap intervals; `tpr_at_*_note` says why a TPR is null (e.g. too few non-members)."""
    metrics = ["auc", "auc_ci_low", "auc_ci_high"] + [f"tpr_at_{p}_fpr{s}" for p in TPR_POINTS
                                                       for s in ("", "_low", "_high")]
    cols = [c for c in metrics if c in mia]
    table = mia.groupby("attack")[cols].mean().reset_index().sort_values("auc", ascending=False)
    table.insert(1, "n_runs", mia.groupby("attack").run_id.nunique().reindex(table.attack).values)
    for point in TPR_POINTS:
        note = f"tpr_at_{point}_fpr_note"
        if note in mia:
            first = mia.dropna(subset=[note]).groupby("attack")[note].first()
            table[note] = table.attack.map(first)
    return table.reset_index(drop=True)


def section_delong(rep: Report) -> pd.DataFrame:
    title = "Paired tests between configurations (DeLong)"
    attack = rep.data.primary_attack
    tests, reason = scores.delong_pairs(rep.data, attack) if attack else (pd.DataFrame(), "no MIA results")
    if tests.empty:
        rep.add("delong", title, rep.omit("DeLong tests", reason))
        return tests
    body = (f"<p>DeLong's test for the difference of two runs' AUCs ({attack} attack) on the same records, for "
            "adapted-matrix sets at equal rank, canary copies and seed.</p>")
    rep.add("delong", title, body + rep.table(tests, "delong"))
    return tests


def section_bag_of_words(rep: Report) -> None:
    title = "Model-free sanity baseline (bag of words)"
    bow = rep.data.bag_of_words
    if bow.empty:
        enabled = rep.data.study.mia.bag_of_words_baseline
        rep.add("bow", title, rep.omit("bag-of-words baseline", "no baseline rows in results.parquet" if enabled
                                       else "mia.bag_of_words_baseline is false"))
        return
    cols = [c for c in ("run_id", "attack", "auc", "auc_ci_low", "auc_ci_high", "n_members", "n_non_members") if c in bow]
    rep.bow_verdict = far, text = bow_verdict(bow)
    verdict = f'<p class="{"warn" if far else "ok"}">{html.escape(text)}</p>'
    rep.add("bow", title, verdict + rep.table(bow[cols], "bag_of_words"))


def bow_verdict(bow: pd.DataFrame) -> tuple[bool, str]:
    """(whether words alone separate members from non-members, the verdict in words) for baseline rows."""
    auc = bow.auc.mean()
    far = abs(auc - 0.5) > BOW_WARN_DISTANCE or (
        "auc_ci_low" in bow and (bow.auc_ci_low > 0.5).any() or "auc_ci_high" in bow and (bow.auc_ci_high < 0.5).any())
    if far:
        return True, (f"Warning: a classifier on word counts alone separates members from non-members with AUC "
                      f"{auc:.3f}: the member/non-member split is biased, and part of every attack's AUC may come "
                      "from the split rather than from memorization.")
    return False, (f"Words alone do not separate members from non-members (AUC {auc:.3f}, its interval covers "
                   "0.5): the split looks unbiased.")


def section_utility(rep: Report) -> None:
    title = "Utility"
    util = rep.data.stage("utility")
    if util.empty:
        rep.add("utility", title, rep.omit("utility", "no utility rows in results.parquet"))
        return
    keep = [c for c in util.columns if not util[c].isna().all() and c not in ("stage", "model", "total_params")]
    body = rep.table(util[keep], "utility")
    by_config = utility_by_config(util)
    if len(by_config):
        body += ("<p>Per configuration (mean over its runs): perplexity of the held-out splits under the "
                 "fine-tuned model and under the base model.</p>") + rep.table(by_config, "utility_by_config")
    rep.add("utility", title, body)


UTILITY_PPL = ("test_ppl", "base_test_ppl", "utility_ppl", "base_utility_ppl")


def utility_by_config(util: pd.DataFrame) -> pd.DataFrame:
    """Mean test / utility-split perplexity (fine-tuned and base) per configuration, over seeds."""
    values = [c for c in UTILITY_PPL if c in util and not util[c].isna().all()]
    if not values:
        return pd.DataFrame()
    keys = [c for c in ("method", "target_modules", "rank", "canary_copies", "noise_multiplier") if c in util]
    agg = util.groupby(keys, dropna=False)[values].mean()
    agg.insert(0, "n_runs", util.groupby(keys, dropna=False).run_id.nunique())
    return agg.reset_index()


def section_extraction(rep: Report) -> None:
    title = "Extraction rates"
    rows = rep.data.stage("extraction")
    if rows.empty:
        reason = ("extraction.enabled is false" if not rep.data.study.extraction.enabled
                  else "no extraction rows in results.parquet")
        rep.add("extraction", title, rep.omit("extraction rates", reason))
        return
    table = extraction_rates(rows)
    body = ("<p>Share of prompted records whose suffix was reproduced exactly, verbatim (longest common substring "
            "ratio above <code>extraction.verbatim_threshold</code>) or with a BLEU above "
            "<code>extraction.bleu_threshold</code>, and the mean n-gram share, per decoding, record group, model "
            "(fine-tuned, or the base model on the same prompts as a control) and canary copies; mean over runs.</p>")
    rep.add("extraction", title, body + rep.table(table, "extraction_rates"))


def extraction_rates(rows: pd.DataFrame) -> pd.DataFrame:
    """Extraction rows of results.parquet averaged over runs per decoding, group, model and canary copies."""
    frame = rows.assign(model=np.where(rows.attack.str.endswith(":base"), "base", "finetuned"))
    metrics = [c for c in ("exact_rate", "verbatim_rate", "bleu_rate", "mean_ngram_share") if c in frame]
    keys = [c for c in ("decoding", "group", "model", "canary_copies") if c in frame]
    agg = frame.groupby(keys, dropna=False)[metrics].mean()
    agg.insert(0, "n_runs", frame.groupby(keys, dropna=False).run_id.nunique())
    if "n" in frame:
        agg.insert(1, "n_records", frame.groupby(keys, dropna=False)["n"].sum())
    return agg.reset_index()


def section_wall_times(rep: Report) -> None:
    title = "Wall times"
    per_run = timings.stage_times(rep.data.root)
    history = timings.read_history(rep.data.root)
    if per_run.empty and not history:
        rep.add("walltimes", title, rep.omit("wall times", "no runs/<run_id>/timings.json, train.json wall times or "
                                             "history.jsonl in the study folder"))
        return
    body = ""
    if history:
        body += ("<p>Each <code>memlens run</code> on this folder (history.jsonl; a run is recorded when it ends, "
                 "after the report it builds: <code>memlens report</code> shows it):</p>") + rep.table(
            timings.history_table(history), "history")
    if len(per_run):
        body += "<p>Per-cell stage wall times (runs/&lt;run_id&gt;/timings.json, train.json):</p>" + rep.table(
            timings.stage_summary(per_run), "stage_wall_times")
    rep.add("walltimes", title, body)


def section_frontier(rep: Report) -> None:
    title = "Privacy / utility frontier"
    try:
        frontier = importlib.import_module("memlens.report.frontier")
    except ImportError as exc:
        rep.add("frontier", title, rep.omit("frontier", f"memlens.report.frontier is not available ({exc})"))
        return
    path = rep.figures / "frontier.png"
    table = frontier.frontier_table(rep.data.results, root=rep.data.root)
    if table is None or len(table) == 0:
        rep.add("frontier", title, rep.omit("frontier", "no run has both an attack metric and a utility metric"))
        return
    frontier.frontier_figure(rep.data.results, path, root=rep.data.root)
    rep.figure_files["frontier"] = (path, "Leakage against held-out perplexity, one point per configuration.")
    encoded = base64.b64encode(path.read_bytes()).decode()
    body = (f'<figure><img src="data:image/png;base64,{encoded}" alt="privacy/utility frontier" data-name="frontier">'
            "<figcaption>Leakage against held-out perplexity, one point per configuration.</figcaption></figure>")
    rep.add("frontier", title, body + rep.table(pd.DataFrame(table), "frontier"))


def section_findings(rep: Report, findings: list[Finding]) -> str:
    items = "".join(
        f'<li class="finding {f.verdict.replace(" ", "-")}"><b>{html.escape(f.title)}</b>: '
        f'<span class="verdict">{f.verdict}</span>. {html.escape(f.reason)}</li>' for f in findings)
    pd.DataFrame([f.__dict__ for f in findings]).to_csv(rep.tables / "findings.csv", index=False)
    return f'<ul class="findings">{items}</ul>'


def section_failures(rep: Report) -> str:
    if not rep.data.failures:
        return '<p class="ok">No cell failed.</p>'
    parts = [f'<p class="warn">{len(rep.data.failures)} failure(s); their results are missing from every '
             "figure and table above. Fix the cause and rerun <code>memlens run</code> (finished stages are kept).</p>"]
    for record in rep.data.failures:
        parts.append(f'<details class="failure"><summary><code>{html.escape(record["run_id"])}</code>, stage '
                     f'<b>{html.escape(str(record.get("stage")))}</b>: {html.escape(str(record.get("error")))}'
                     f'</summary><pre>{html.escape(record.get("traceback") or "")}</pre></details>')
    pd.DataFrame([{k: r.get(k) for k in ("run_id", "stage", "error", "updated")} for r in rep.data.failures]).to_csv(
        rep.tables / "failures.csv", index=False)
    return "".join(parts)


# --------------------------------------------------------------------------------------- page
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{margin-bottom:0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table.data{border-collapse:collapse;font-size:.85em;margin:.5em 0}
table.data th,table.data td{border:1px solid #ccc;padding:.25em .5em;text-align:right;vertical-align:top}
table.data th{background:#f3f3f3}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.omitted{color:#666;font-style:italic}.warn{background:#fff3cd;padding:.5em;border-left:4px solid #e0a800}
.ok{color:#1b6e2d}.src{font-size:.75em;color:#888;margin:0}
.finding{margin:.6em 0}.holds .verdict{color:#1b6e2d;font-weight:bold}
.does-not-hold .verdict{color:#b00020;font-weight:bold}.inconclusive .verdict{color:#8a6d00;font-weight:bold}
nav a{margin-right:1em;font-size:.9em}pre{white-space:pre-wrap;font-size:.8em;background:#f7f7f7;padding:.5em}
"""


def _overview(data: StudyResults) -> str:
    study = data.study
    runs = data.results.run_id.nunique() if len(data.results) else 0
    env = data.environment
    packages = env.get("packages", {})
    versions = ", ".join(f"{k} {v}" for k, v in packages.items() if v and k in ("memlens", "torch", "transformers",
                                                                                "peft"))
    grid = study.grid
    return (f"<p>Model <code>{html.escape(study.model.name_or_path)}</code>, data "
            f"<code>{html.escape(study.data.source)}</code> (members: <code>{study.data.member_split}</code>, "
            f"non-members: <code>{study.data.non_member_split}</code>). Grid: matrices "
            f"{', '.join('[' + ', '.join(t) + ']' for t in grid.target_modules)}, "
            f"ranks {grid.rank}, canary copies {grid.canary_copies} ({study.canary.mode} mode), seeds {grid.seed}. "
            f"{runs} run(s) with results; {len(data.failures)} failure(s).</p>"
            f"<p class=\"src\">Device {html.escape(str(env.get('device')))}; {html.escape(versions)}; git "
            f"{html.escape(str(env.get('git_commit')))}; Python {env.get('python')}.</p>")


def render_html(rep: Report, findings_html: str, failures_html: str) -> str:
    study = rep.data.study
    nav = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t, _ in rep.sections)
    body = "".join(f'<section id="{a}"><h2>{html.escape(t)}</h2>{b}</section>' for a, t, b in rep.sections)
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>memlens report: "
            f"{html.escape(study.name)}</title><style>{CSS}</style></head><body>"
            f"<h1>memlens report: {html.escape(study.name)}</h1>"
            f"<p class=\"src\">generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}</p>{_overview(rep.data)}"
            f'<nav><a href="#findings">Findings</a>{nav}<a href="#failures">Failures</a></nav>'
            f'<section id="findings"><h2>Findings</h2><p>Whether each finding of the 2024 study '
            f"(Savine et al.) holds in this study's data:</p>{findings_html}</section>{body}"
            f'<section id="failures"><h2>Failures</h2>{failures_html}</section></body></html>')


SECTIONS: list[Callable[[Report], object]] = [
    section_study_table, section_roc, section_auc_vs_rank, section_copies, section_perplexity, section_exposure,
    section_attacks, section_delong, section_bag_of_words, section_extraction, section_utility, section_frontier,
    section_wall_times,
]


def _inputs_fingerprint(root: Path) -> dict:
    fingerprint = {}
    for name in REPORT_INPUTS:
        path = root / name
        fingerprint[name] = [path.stat().st_mtime_ns, path.stat().st_size] if path.exists() else None
    fingerprint["status"] = sorted((p.name, p.stat().st_mtime_ns) for p in (root / "status").glob("*.json")
                                   if not p.name.startswith("_"))
    return fingerprint


def report_is_current(root: Path) -> bool:
    """True when report/index.html was built from the study's current files."""
    root = Path(root)
    stamp = root / "report" / ".inputs.json"
    if not (root / "report" / "index.html").exists() or not stamp.exists():
        return False
    return json.loads(stamp.read_text()) == json.loads(json.dumps(_inputs_fingerprint(root)))


def build(root: Path) -> Report:
    """Write `<root>/report/` (index.html, figures/, tables/) from the study folder's files and return the
    :class:`Report`, which holds every table, figure and finding it computed."""
    start = time.perf_counter()
    root = Path(root)
    data = StudyResults.load(root)
    fingerprint = _inputs_fingerprint(root)
    out = root / "report"
    rep = Report(data, out)
    for section in SECTIONS:
        section(rep)
    primary = data.primary()
    rep.findings = [finding_value_output(primary, rep.frames.get("delong", pd.DataFrame())),
                    finding_perplexity(_member_extraction(data)), finding_rank(primary)]
    page = render_html(rep, section_findings(rep, rep.findings), section_failures(rep))
    atomic_write_text(out / "index.html", page)
    atomic_write_json(out / ".inputs.json", fingerprint)
    os.utime(out / "index.html")
    rep.build_seconds = time.perf_counter() - start
    return rep


def build_report(root: Path) -> Path:
    """Write `<root>/report/` from the study folder's files; returns the path of index.html."""
    return build(root).out / "index.html"
