"""One typed analysis of a study folder: every table, every figure's data, the findings, what could not be
computed and why, the failures, the environment and the wall times. The renderers
(:mod:`memlens.report.html`, :mod:`memlens.report.markdown`) only format a :class:`StudyAnalysis`.

Two definitions hold throughout: the primary attack (:data:`PRIMARY_ATTACK`, in every section including
the frontier and the headline) and the exposure of a secret (:func:`exposure_bits`, in the exposure
section and the frontier).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from memlens.config import StudyConfig
from memlens.report import membership as mb
from memlens.report import memorization as mz
from memlens.report.data import PRIMARY_ATTACK, Environment, StudyResults, exposure_bits, inputs_fingerprint
from memlens.report.findings import (
    Finding,
    finding_perplexity,
    finding_rank,
    finding_value_output,
    per_run_correlations,
)
from memlens.report.frontier import Frontier, Utility, frontier, utility
from memlens.report.headline import Headline, headline
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
    delong: mb.DelongTests
    bag_of_words: mb.BagOfWords
    designs: mb.DesignComparison
    extraction: mz.ExtractionRates
    utility: Utility
    frontier: Frontier
    wall_times: WallTimes
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the analysis
    primary_attack: str = PRIMARY_ATTACK
    verdict_design: str = "splits"  # the membership design of the findings and the per-design sections

    @property
    def design_note(self) -> str:
        """Which design the findings and the curves come from, when the study has several."""
        others = sorted(set(self.runs.membership) - {self.verdict_design}) if len(self.runs) else []
        return (f"Findings, ROC, AUC vs rank, copies, perplexity and exposure use the `{self.verdict_design}` "
                f"membership design; its runs only ({', '.join(others)} runs: study table, attacks, design "
                "comparison)." if others else "")

    @property
    def sections(self) -> list[Section]:
        """The sections after the headline and the findings, in the report's order."""
        return [self.study_table, self.roc, self.auc_vs_rank, self.copies, self.perplexity, self.exposure,
                self.attacks, self.delong, self.bag_of_words, self.designs, self.extraction, self.utility, self.frontier,
                self.wall_times]

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
    def failures_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"run_id": r.run_id, "stage": r.stage, "error": r.error, "updated": r.updated}
                             for r in self.failures], columns=["run_id", "stage", "error", "updated"])

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table of the report by its CSV name (`tables/<name>.csv`); absent when it has no data."""
        candidates = {
            "headline": self.headline.configs, "study_table": self.study_table.frame,
            "auc_vs_rank": self.auc_vs_rank.curve, "auc_rank_fit": self.auc_vs_rank.fits_frame,
            "canary_extraction_vs_copies": self.copies.canary,
            "ngram_share_vs_perplexity": self.perplexity.correlations,
            "ngram_share_vs_perplexity_per_run": self.perplexity.per_run, "exposure_vs_copies": self.exposure.table,
            "attacks": self.attacks.table, "delong": self.delong.tests, "bag_of_words": self.bag_of_words.frame,
            "designs": self.designs.table,
            "extraction_rates": self.extraction.rates, "utility": self.utility.per_run,
            "utility_by_config": self.utility.by_config, "frontier": self.frontier.table,
            "history": self.wall_times.history_table, "stage_wall_times": self.wall_times.stages,
            "findings": pd.DataFrame([f.__dict__ for f in self.findings]), "failures": self.failures_frame,
        }
        return {name: frame for name, frame in candidates.items() if len(frame)}


def analyse(root: Path) -> StudyAnalysis:
    """The analysis of the study folder `root` (reads its files; writes nothing)."""
    start = time.perf_counter()
    layout = StudyLayout(Path(root))
    inputs = inputs_fingerprint(layout)
    every = StudyResults.load(layout.root)
    # Verdicts come from one design: memlens' random coin when the study has it (it measures record
    # memorization), else the named splits; the study table, attacks and the design comparison keep both.
    design = every.designs[0] if every.designs else "splits"
    data = every.only_design(design) if len(every.designs) > 1 else every
    # DeLong pairs stay within a design: one computation serves the section (every design) and the findings
    delong, perplexity = mb.delong_tests(every), mz.ngram_perplexity(data)
    if len(perplexity.members):
        perplexity.per_run = per_run_correlations(perplexity.members)
    tests = delong.tests
    verdict_tests = tests[tests.membership == design] if "membership" in tests else tests
    analysis = StudyAnalysis(
        root=layout.root, study=every.study, environment=every.environment, runs=every.runs,
        failures=every.failures, inputs=inputs, headline=headline(every), study_table=mb.study_table(every),
        roc=mb.roc_curves(data), auc_vs_rank=mb.auc_vs_rank(data), copies=mz.copies(data), perplexity=perplexity,
        exposure=mz.exposure(data), attacks=mb.attack_comparison(every), delong=delong,
        bag_of_words=mb.bag_of_words(every), designs=mb.design_comparison(every),
        extraction=mz.extraction_rates(data), utility=utility(every), frontier=frontier(every),
        wall_times=wall_times(layout.root),
        findings=[finding_value_output(data.primary(), verdict_tests),
                  finding_perplexity(perplexity.members, perplexity.per_run),
                  finding_rank(data.primary())],
        verdict_design=design)
    analysis.seconds = time.perf_counter() - start
    return analysis
