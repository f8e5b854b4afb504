"""Verbatim-memorization sections of the analysis: membership AUC and canary extraction against canary
copies, n-gram share against perplexity, exposure of the secret, extraction rates."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from memlens.report.inputs import StudyResults
from memlens.report.member_gain import OUTCOMES, member_specific_gain, outcome_of, with_base
from memlens.report.section import Block, Figure, FigureSpec, Omission, Omitted, Section, Table, Text


def finetuned_rows(extraction: pd.DataFrame) -> pd.DataFrame:
    """Rows of the fine-tuned models (the extraction stage also runs the base model as a control)."""
    return extraction[extraction.model == "finetuned"] if len(extraction) else extraction


def decoding_choice(extraction: pd.DataFrame) -> str:
    """The decoding the per-record figures use: greedy when it ran."""
    decodings = list(extraction.decoding.unique())
    return "greedy" if "greedy" in decodings else min(decodings)


def member_extraction(data: StudyResults) -> pd.DataFrame:
    """Extraction rows of the fine-tuned models on member records other than the canary, one decoding, with the
    base model's n-gram share on the same prompt (`ngram_share_base`), the difference (`ngram_gain`) and, where
    non-members were prompted, the gain over matched non-members' (`ngram_gain_specific`,
    :mod:`memlens.report.member_gain`)."""
    ext = finetuned_rows(data.extraction)
    if ext.empty:
        return pd.DataFrame()
    members = ext[ext.is_member.astype(bool) & ~ext.is_canary.astype(bool)]
    if members.empty:
        return members
    decoding = decoding_choice(ext)
    members = with_base(members[members.decoding == decoding], data.extraction)
    others = ext[~ext.is_member.astype(bool) & ~ext.is_canary.astype(bool) & (ext.decoding == decoding)]
    if others.empty:
        return members
    return member_specific_gain(members, with_base(others, data.extraction))


@dataclass(kw_only=True)
class Copies(Section):
    anchor = "copies"
    title = "AUC and extraction vs canary copies"
    auc: pd.DataFrame = field(default_factory=pd.DataFrame)  # target_modules, canary_copies, auc (primary attack)
    canary: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/canary_extraction_vs_copies.csv
    canary_omitted: Omission | None = None

    def omissions(self) -> list[Omission]:
        return super().omissions() + ([self.canary_omitted] if self.canary_omitted else [])

    def blocks(self) -> list[Block]:
        canary = Omitted(self.canary_omitted) if self.canary_omitted else Table("canary_extraction_vs_copies",
                                                                                  self.canary)
        return [Figure(), canary]


def copies(data: StudyResults) -> Copies:
    primary, ext = data.primary(), finetuned_rows(data.extraction)
    if primary.empty:
        return Copies(omitted=Omission("AUC and extraction vs copies", data.primary_missing()))
    values = sorted(set(primary.canary_copies))
    if len(values) < 2:
        return Copies(omitted=Omission("AUC and extraction vs copies", f"the grid has {len(values)} canary-copies "
                                       f"value(s) {values}; add values to grid.canary_copies"))
    auc = primary.groupby(["target_modules", "canary_copies"]).auc.mean().reset_index()
    figure = FigureSpec("copies", "Left: membership AUC; right: share of the canary's suffix reproduced (longest "
                        "common n-gram / suffix length), against canary copies.")
    canary = ext[ext.is_canary.astype(bool)] if len(ext) else pd.DataFrame()
    if canary.empty:
        return Copies(auc=auc, figure=figure, canary_omitted=Omission(
            "canary extraction vs copies", "no extraction rows for the canary (extraction.parquet)"))
    canary = canary.merge(data.runs[["run_id", "canary_copies", "target_modules"]], on="run_id", how="left")
    table = canary.groupby(["target_modules", "decoding", "canary_copies"]).agg(
        ngram_share=("ngram_share", "mean"), exact_match=("exact_match", "mean"),
        n_runs=("run_id", "nunique")).reset_index()
    return Copies(auc=auc, canary=table, figure=figure)


@dataclass(kw_only=True)
class NgramPerplexity(Section):
    anchor = "perplexity"
    title = "Verbatim reproduction vs perplexity"
    points: pd.DataFrame = field(default_factory=pd.DataFrame)  # member records: ngram_share, ppl_ft, ppl_base
    correlations: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/ngram_share_vs_perplexity.csv
    members: pd.DataFrame = field(default_factory=pd.DataFrame)  # the member rows (finding 2)
    per_run: pd.DataFrame = field(default_factory=pd.DataFrame)  # correlations per run (findings.per_run_correlations)
    outcome: str = "ngram_share"  # the per-record outcome of finding (2) (member_gain.outcome_of), pooled here too
    in_document = False  # finding 2's evidence

    def blocks(self) -> list[Block]:
        pooled = [Table("ngram_share_vs_perplexity", self.correlations)] if len(self.correlations) else []
        per_run = [Text(f"Per run (the unit of finding (2)'s test, whose outcome, as above, is the "
                        f"{OUTCOMES[self.outcome]}; pooled p-values above overstate the evidence, the same records "
                        "recur in every run):"),
                   Table("ngram_share_vs_perplexity_per_run", self.per_run)] if len(self.per_run) else []
        return [Figure(), *pooled, *per_run]

    def correlation(self, perplexity: str) -> pd.Series | None:
        """The correlation row of `ppl_ft` or `ppl_base`, None when there were too few varied points."""
        rows = self.correlations[self.correlations.perplexity == perplexity] if len(self.correlations) else []
        return rows.iloc[0] if len(rows) else None


PERPLEXITIES = (("ppl_ft", "fine-tuned model"), ("ppl_base", "base model"))


def ngram_perplexity(data: StudyResults) -> NgramPerplexity:
    members = member_extraction(data)
    if members.empty:
        return NgramPerplexity(omitted=Omission("n-gram share vs perplexity", "no extraction rows on member records"))
    outcome = outcome_of(members)
    frame = members.dropna(subset=[outcome, "ppl_ft", "ppl_base"])
    rows = []
    for column, _ in PERPLEXITIES:
        if len(frame) >= 3 and frame[outcome].nunique() > 1 and frame[column].nunique() > 1:
            sp = stats.spearmanr(frame[column], frame[outcome])
            pe = stats.pearsonr(np.log(frame[column]), frame[outcome])
            rows.append({"perplexity": column, "outcome": outcome, "n": len(frame), "spearman_r": sp.statistic,
                         "spearman_p": sp.pvalue, "pearson_r_log_ppl": pe.statistic, "pearson_p": pe.pvalue})
    caption = (f"Each point is a member record ({decoding_choice(data.extraction)} decoding, pooled over "
               f"{frame.run_id.nunique()} run(s)): its {OUTCOMES[outcome]} (finding 2's outcome) against its "
               "perplexity.")
    return NgramPerplexity(points=frame, correlations=pd.DataFrame(rows), members=members, outcome=outcome,
                           figure=FigureSpec("ngram_share_vs_perplexity", caption))


@dataclass(kw_only=True)
class Exposure(Section):
    anchor = "exposure"
    title = "Canary exposure vs copies"
    per_run: pd.DataFrame = field(default_factory=pd.DataFrame)  # run_id, model, ..., exposure (bits)
    table: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/exposure_vs_copies.csv
    base: pd.Series = field(default_factory=lambda: pd.Series(dtype=float))  # copies -> base model's exposure

    def blocks(self) -> list[Block]:
        return [Figure(), Table("exposure_vs_copies", self.table, formats={"exposure": ".2f"})]


def exposure(data: StudyResults) -> Exposure:
    per_run = data.exposure()
    if per_run.empty:
        study = data.study
        reason = ("the canary has no secret to rank (canary.mode: repeat); use canary.mode: insert"
                  if study.canary.mode == "repeat" else "extraction.exposure is false" if not study.extraction.exposure
                  else "no exposure rows in results.parquet")
        return Exposure(omitted=Omission("exposure vs copies", reason))
    table = per_run.groupby(["model", "target_modules", "rank", "canary_copies"]).agg(
        exposure=("exposure", "mean"), n_runs=("run_id", "nunique")).reset_index()
    base = table[table.model != "finetuned"].groupby("canary_copies").exposure.mean()
    caption = ("Exposure of the inserted secret, log2|R| - log2 rank (exact rank when the secret space was "
               "enumerated, else the skew-normal extrapolation), under each fine-tuned model and under the base "
               "model.")
    return Exposure(per_run=per_run, table=table, base=base, figure=FigureSpec("exposure_vs_copies", caption))


@dataclass(kw_only=True)
class ExtractionRates(Section):
    anchor = "extraction"
    title = "Extraction rates"
    rates: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/extraction_rates.csv
    one_run: bool = False  # an audit: one model, nothing averaged

    def blocks(self) -> list[Block]:
        over = "" if self.one_run else "; mean over runs"
        return [Text("Share of prompted records whose suffix was reproduced verbatim (exactly, token for token), "
                     "as a relaxed match (longest common substring ratio at or above "
                     "`extraction.verbatim_threshold`: not verbatim) or with a BLEU above "
                     "`extraction.bleu_threshold`, and the mean n-gram share, per decoding, record group, model "
                     f"(fine-tuned, or the base model on the same prompts as a control) and canary copies{over}."),
                Table("extraction_rates", self.rates, formats={c: ".3f" for c in RATES})]

    @property
    def canary(self) -> pd.DataFrame:
        return self.rates[self.rates.group == "canary"] if len(self.rates) else self.rates

    @property
    def others(self) -> pd.DataFrame:
        return self.rates[self.rates.group != "canary"] if len(self.rates) else self.rates


RATES = ("exact_rate", "relaxed_rate", "bleu_rate", "mean_ngram_share")


def extraction_rates(data: StudyResults) -> ExtractionRates:
    """Extraction rows of results.parquet averaged over runs per decoding, group, model and canary copies."""
    rows = data.stage("extraction")
    if rows.empty:
        reason = ("extraction.enabled is false" if not data.study.extraction.enabled
                  else "no extraction rows in results.parquet")
        return ExtractionRates(omitted=Omission("extraction rates", reason))
    frame = rows.assign(model=np.where(rows.attack.str.endswith(":base"), "base", "finetuned"))
    keys = ["decoding", "group", "model", "canary_copies"]
    grouped = frame.groupby(keys, dropna=False)
    agg = grouped[list(RATES)].mean()
    agg.insert(0, "n_runs", grouped.run_id.nunique())
    agg.insert(1, "n_records", grouped["n"].sum())
    return ExtractionRates(rates=agg.reset_index())
