"""One typed analysis of a study folder: every table, every figure's data, the findings, what could not be
computed and why, the failures, the environment and the wall times. The renderers
(:mod:`memlens.report.html`, :mod:`memlens.report.markdown`) only format a :class:`StudyAnalysis`.

Two definitions hold throughout: the primary attack (:data:`PRIMARY_ATTACK`, in every section including
the frontier and the headline) and the exposure of a secret (:func:`exposure_bits`, in the exposure
section and the frontier).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import pandas as pd

from memlens.config import RANDOM, SPLITS, Design, StudyConfig
from memlens.report import membership as mb
from memlens.report import memorization as mz
from memlens.report.findings import (
    Finding,
    alpha_scope,
    at_rate,
    finding_perplexity,
    finding_rank,
    finding_value_output,
    per_run_correlations,
)
from memlens.report.frontier import Frontier, Utility, frontier, utility
from memlens.report.headline import Headline, headline
from memlens.report.inputs import PRIMARY_ATTACK, Environment, StudyResults, exposure_bits, inputs_fingerprint
from memlens.report.matched_fit import finding_matched_fit
from memlens.report.one_run_audit import CanaryAudit, canary_audit
from memlens.report.repetition import finding_copies
from memlens.report.section import Omission, Section
from memlens.report.timings import WallTimes, wall_times
from memlens.store import StudyLayout
from memlens.store.records import StatusRecord

__all__ = ["PRIMARY_ATTACK", "StudyAnalysis", "analyse", "exposure_bits"]


@dataclass
class StudyAnalysis:
    """Everything the report says about a study folder, computed once; no file is written."""

    root: Path
    study: StudyConfig
    environment: Environment
    runs: pd.DataFrame  # one row per run with results: its identifying columns
    failures: list[StatusRecord]
    inputs: dict  # the fingerprint of the files read (report_is_current compares it)
    headline: Headline
    study_table: mb.StudyTable
    roc: mb.RocCurves
    auc_vs_rank: mb.AucVsRank
    copies: mz.Copies
    perplexity: mz.NgramPerplexity
    exposure: mz.Exposure
    attacks: mb.AttackComparison
    canary_audit: CanaryAudit
    delong: mb.DelongTests
    bag_of_words: mb.BagOfWords
    design_comparison: mb.DesignComparison
    extraction: mz.ExtractionRates
    utility: Utility
    frontier: Frontier
    wall_times: WallTimes
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the analysis
    primary_attack: str = PRIMARY_ATTACK
    verdict_design: Design = SPLITS  # the membership design of the findings and the per-design sections

    @property
    def designs(self) -> list[Design]:
        """The membership designs of the runs with results (the configured ones when none has results)."""
        return sorted(set(self.runs.membership)) if len(self.runs) else list(self.study.data.membership)

    def describe_designs(self) -> list[str]:
        """Each design of the study in words, `code` in backticks: the one description both writers format."""
        data = self.study.data
        if data.subset:
            splits_records = f"; a seeded subset of {data.subset} records of each split"
            random_records = (f"; {2 * data.subset} records drawn (seeded) from all of the pool's records, so about "
                              f"{data.subset} a side")
        else:
            splits_records = random_records = "; every record"
        said = {SPLITS: f"`{SPLITS}`: named splits, members `{data.member_split}` vs non-members "
                        f"`{data.non_member_split}`{splits_records}",
                RANDOM: f"`{RANDOM}`: a fair coin per {data.coin_unit} over `{', '.join(data.pool_splits)}` (seed "
                        f"{data.membership_seed}{f', groups `{data.group}`' if data.group else ''}){random_records}"}
        return [said[d] for d in self.designs]

    @property
    def design_note(self) -> str:
        """Which design the findings and the curves come from, when the study has several."""
        others = sorted(set(self.runs.membership) - {self.verdict_design}) if len(self.runs) else []
        return (f"The headline, findings, ROC, AUC vs rank, copies, perplexity and exposure use the "
                f"`{self.verdict_design}` membership design; its runs only ({', '.join(others)} runs: study table, "
                "attacks, DeLong tests, design comparison)." if others else "")

    @property
    def sections(self) -> list[Section]:
        """The sections after the headline and the findings, in the report's order: every Section field after
        the headline, in the order the fields are declared."""
        found = [getattr(self, f.name) for f in fields(self)]
        return [s for s in found if isinstance(s, Section) and s is not self.headline]

    @property
    def omitted(self) -> list[Omission]:
        """Everything the data could not support, with the reason, in the report's order."""
        return [o for s in (self.headline, *self.sections) for o in s.omissions()]

    @property
    def hardware(self) -> dict | None:
        """What the study ran on: environment.json's record, else the last invocation's."""
        history = self.wall_times.history
        return self.environment.hardware or (history[-1].hardware if history else None)

    @property
    def nothing_yet(self) -> str | None:
        """Why the report has nothing to show, said instead of its sections (no run has results); None when it has."""
        if len(self.runs):
            return None
        if self.failures:
            return f"Nothing to report yet: no run has results, and {len(self.failures)} cell(s) failed (below)."
        finished = len(StudyLayout(self.root).finished_runs())
        todo = (f"{finished} fine-tuned run(s) are in runs/: `memlens run` completes them and gathers their results."
                if finished else "`memlens run` on the study file runs it.")
        return f"Nothing to report yet: no run has results in results.parquet. {todo}"

    @property
    def failures_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"run_id": r.run_id, "stage": r.stage, "error": r.error, "updated": r.updated}
                             for r in self.failures], columns=["run_id", "stage", "error", "updated"])

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table of the report by its CSV name (`tables/<name>.csv`); absent when it has no data."""
        tables: dict[str, pd.DataFrame] = {}
        for section in (self.headline, *self.sections):
            tables.update(section.tables())
        extra = {"findings": pd.DataFrame([f.__dict__ for f in self.findings]), "failures": self.failures_frame}
        return tables | {name: frame for name, frame in extra.items() if len(frame)}


def canary_shares(data: StudyResults) -> pd.DataFrame:
    """One row per run: the canary's suffix n-gram share under the fine-tuned model (one decoding, greedy when it
    ran) with the run's identifying columns; empty without canary extraction rows."""
    ext = mz.finetuned_rows(data.extraction)
    canary = ext[ext.is_canary.astype(bool)] if len(ext) else ext
    if canary.empty:
        return pd.DataFrame()
    canary = canary[canary.decoding == mz.decoding_choice(ext)]
    shares = canary.groupby("run_id").ngram_share.mean().reset_index()
    return shares.merge(data.runs, on="run_id", how="inner")


def findings(data: StudyResults, verdict_tests: pd.DataFrame, perplexity: mz.NgramPerplexity) -> list[Finding]:
    """The verdicts, in the document's order: finding (1) per (rate, rank) and across rates, at matched fit;
    (2) on the member-specific outcome; (3) the rank curve (read under the study's LoRA scaling) and, in a
    canary-copies study, the repetition half."""
    rate, lora = data.study.train.learning_rate, data.study.lora
    copies = finding_copies(data.exposure(), canary_shares(data))
    return [*finding_value_output(data.primary(), verdict_tests, rate),
            *finding_matched_fit(data.primary(), data.stage("utility")),
            finding_perplexity(perplexity.members, perplexity.per_run, data.runs),
            finding_rank(at_rate(data.primary(), rate), alpha_scope(lora.alpha, lora.alpha_per_rank)),
            *([copies] if copies else [])]


def analyse(root: Path) -> StudyAnalysis:
    """The analysis of the study folder `root` (reads its files; writes nothing)."""
    start = time.perf_counter()
    layout = StudyLayout(Path(root))
    inputs = inputs_fingerprint(layout)
    every = StudyResults.load(layout.root)
    # Verdicts come from one design: memlens' random coin when the study has it (it measures record
    # memorization), else the named splits; the study table, attacks and the design comparison keep both.
    design = every.designs[0] if every.designs else SPLITS
    data = every.only_design(design) if len(every.designs) > 1 else every
    # DeLong pairs stay within a design: one computation serves the section (every design) and the findings
    delong, perplexity = mb.delong_tests(every), mz.ngram_perplexity(data)
    if len(perplexity.members):
        perplexity.per_run = per_run_correlations(perplexity.members)
    tests, rate = delong.tests, every.study.train.learning_rate
    verdict_tests = tests[tests.membership == design] if "membership" in tests else tests
    verdict_tests = at_rate(verdict_tests, rate)  # with a learning-rate ladder: the recipe's rate only
    analysis = StudyAnalysis(
        root=layout.root, study=every.study, environment=every.environment, runs=every.runs,
        failures=every.failures, inputs=inputs, headline=headline(data), study_table=mb.study_table(every),
        roc=mb.roc_curves(data), auc_vs_rank=mb.auc_vs_rank(data), copies=mz.copies(data), perplexity=perplexity,
        exposure=mz.exposure(data), attacks=mb.attack_comparison(every), canary_audit=canary_audit(every),
        delong=delong,
        bag_of_words=mb.bag_of_words(every), design_comparison=mb.design_comparison(every),
        extraction=mz.extraction_rates(data), utility=utility(every), frontier=frontier(every),
        wall_times=wall_times(layout.root),
        findings=findings(data, verdict_tests, perplexity),
        verdict_design=design)
    analysis.seconds = time.perf_counter() - start
    return analysis
