"""The findings document's sections: the evidence of each finding and what lies beyond the study, formatted
from a :class:`StudyAnalysis` (Markdown that renders on GitHub)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from memlens.report.analysis import StudyAnalysis
from memlens.report.mdtable import fmt, is_null, md_table, pm
from memlens.report.member_gain import OUTCOMES
from memlens.report.membership import AucCell
from memlens.report.section import Block, Figure, Section, Table, Text

# Quoted from the 2024 study (Savine, Atif, Cappe; ../shared/docs/study.md), never computed here.
PAPER_TABLE = """\
| rank | [q] | [k] | [v] | [o] | [q,k] |
|---|---|---|---|---|---|
| 1 | 0.68 ± 0.02 | 0.68 ± 0.02 | 0.80 ± 0.01 | 0.77 ± 0.02 | 0.76 ± 0.02 |
| 2 | 0.70 ± 0.02 | 0.71 ± 0.02 | 0.82 ± 0.01 | 0.79 ± 0.01 | 0.77 ± 0.02 |
| 4 | 0.72 ± 0.02 | 0.71 ± 0.02 | 0.83 ± 0.01 | 0.80 ± 0.01 | 0.79 ± 0.01 |"""
PAPER_NOTE = ("*For comparison only, not measured here: the 2024 study (Savine et al.) reported these MIA ROC AUCs "
              "± CI for Llama-2-7B (8-bit) fine-tuned 3 epochs on PHEE (the paper's numbers):*")


class Document:
    """Markdown lines plus the figures they link (copied next to the document when it is written)."""

    def __init__(self, analysis: StudyAnalysis, folder_name: str, figures: dict[str, Path]):
        self.a, self.folder_name, self.figures = analysis, folder_name, figures
        self.lines: list[str] = []
        self.linked: dict[str, Path] = {}

    def add(self, *blocks: str) -> None:
        for block in blocks:
            self.lines += [block, ""]

    def figure(self, section: Section, what: str) -> None:
        """Link the section's figure, or say why the report could not draw it."""
        spec = section.figure
        if spec is not None and spec.name in self.figures:
            path = self.figures[spec.name]
            self.linked[spec.name] = path
            self.add(f"![{spec.caption}]({self.folder_name}/{path.name})", f"*{spec.caption}*")
        else:
            reason = section.omitted.reason if section.omitted else "not drawn for this study"
            self.add(f"*{what}: no figure ({reason}).*")


def _why(section: Section, fallback: str) -> str:
    return section.omitted.reason if section.omitted else fallback


def _auc_cell(cell: object) -> object:
    if not isinstance(cell, AucCell):
        return cell
    return pm(cell.auc, cell.low, cell.high) + (f" (n={cell.n_runs})" if cell.n_runs > 1 else "")


def _params_cell(cell: object) -> object:
    return f"{cell.trainable_params:,} ({cell.trainable_pct:.2g}%)" if isinstance(cell, AucCell) else cell


# --------------------------------------------------------------------------------------- findings
def finding_1(doc: Document) -> None:
    a = doc.a
    table = a.study_table
    if table.omitted:
        doc.add(f"No AUC table: {table.omitted.reason}.")
    else:
        if table.warning:
            doc.add(table.warning)
        matrix = table.matrix.astype(object)
        doc.add(f"Membership-inference ROC AUC of the `{a.primary_attack}` attack (the study's P_ref / P_ft), ± half "
                f"the {table.ci_level:.0%} Hanley-McNeil interval; mean over runs where a cell has several (n):",
                md_table(matrix.map(_auc_cell)), "Trainable parameters (share of the model):",
                md_table(matrix.map(_params_cell)))
    delong = a.delong
    if delong.omitted:
        doc.add(f"No paired DeLong test: {delong.omitted.reason}.")
    elif delong.vo_qk.empty:
        doc.add(f"No paired DeLong test between [v]/[o] and [q]/[k]: the tested pairs are {delong.pairs}.")
    else:
        tests = delong.vo_qk[delong.vo_qk.membership == a.verdict_design]
        doc.add(f"Paired DeLong tests (same records scored by both runs, `{a.primary_attack}` attack) between [v]/[o] "
                f"and [q]/[k] at equal rank, canary copies and seed, in the `{a.verdict_design}` membership design "
                f"({len(tests)} tests; `p (Holm)` corrects over every DeLong test of the design, "
                f"{int((delong.tests.membership == a.verdict_design).sum())}):",
                md_table(tests.drop(columns="membership"), {"AUC v/o": ".3f", "AUC q/k": ".3f", "v/o - q/k": "+.3f",
                                                            "z": ".2f", "p": ".3g", "p (Holm)": ".3g"}))
    doc.add(PAPER_NOTE, PAPER_TABLE)


def finding_2(doc: Document) -> None:
    section = doc.a.perplexity
    if len(section.correlations):
        frame = section.correlations.rename(columns={"perplexity": "perplexity under"})
        frame["perplexity under"] = frame["perplexity under"].map({"ppl_ft": "fine-tuned model",
                                                                   "ppl_base": "base model"})
        doc.add(f"Correlation of each member record's {OUTCOMES[section.outcome]} (finding 2's outcome; the share "
                "of a suffix reproduced is the longest common n-gram / suffix length) with the record's perplexity, "
                "pooled over runs (the same records recur in every run, so these p-values overstate the evidence; "
                "the verdict uses the correlations computed per run, `tables/ngram_share_vs_perplexity_per_run.csv`, "
                "when at least two runs have enough records):",
                md_table(frame, {"spearman_r": ".3f", "spearman_p": ".3g", "pearson_r_log_ppl": ".3f",
                                 "pearson_p": ".3g"}))
    else:
        doc.add("No correlation computed: too few member records with varied n-gram share and perplexity, or no "
                "extraction results.")
    doc.figure(section, "n-gram share vs perplexity")


def finding_3(doc: Document) -> None:
    section = doc.a.auc_vs_rank
    doc.figure(section, "AUC vs rank")
    if section.omitted:
        doc.add(f"Saturation fit not computed: {section.omitted.reason}.")
        return
    fits = section.fits_frame
    frame = pd.DataFrame({
        "matrices": "[" + fits.target_modules + "]", "ranks": fits.ranks,
        "plateau": [pm(p, p - s, p + s) if not is_null(s) else fmt(p, ".3f")
                    for p, s in zip(fits.plateau, fits.plateau_se)],
        "AUC at rank 0": fits.auc0, "scale": fits.scale, "rank reaching 90% of gain": fits.rank_90, "RMSE": fits.rmse,
        "why null / caveat": ["; ".join(str(v) for v in (r, n) if not is_null(v))
                              for r, n in zip(fits.reason, fits.note)]})
    doc.add("Fitted saturation auc(r) = plateau - (plateau - auc0) exp(-r / scale), least squares on the mean AUC "
            "per rank (plateau ± its standard error); the rank reaching 90% of the gain from rank 0 is "
            "scale x ln 10. A fit that cannot be made is left empty with the reason:",
            md_table(frame, {"AUC at rank 0": ".3f", "scale": ".3g", "rank reaching 90% of gain": ".3g",
                             "RMSE": ".2g"}))


FINDINGS = (finding_1, finding_2, finding_3)


# --------------------------------------------------------------------------------------- beyond
def block(doc: Document, section: Section, item: Block) -> None:
    """One block of a section as Markdown."""
    if isinstance(item, Text):
        doc.add(f"**{item.text}**" if item.style == "warn" else item.text)
    elif isinstance(item, Table):
        frame = item.shown[item.columns] if item.columns else item.shown
        doc.add(md_table(frame.map(_auc_cell), item.formats))
    elif isinstance(item, Figure):
        doc.figure(section, section.title)
    else:
        doc.add(f"*{item.omission.what}: {item.omission.reason}.*")


def section(doc: Document, part: Section) -> None:
    """A section of the report under its own heading: its blocks, or why it was not measured. A section that
    does not apply to this study (e.g. a design comparison with one design) is left out."""
    if part.omitted and not part.omissions():
        return
    doc.add(f"### {part.title}")
    if part.omitted:
        doc.add(f"Not measured: {part.omitted.reason}.")
        return
    for item in part.blocks():
        block(doc, part, item)


def not_shown(doc: Document) -> None:
    items = [f"- **{o.what}**: {o.reason}" for o in doc.a.omitted]
    failures = [f"- **failed cell** `{r.run_id}` (stage {r.stage}): {r.error}" for r in doc.a.failures]
    doc.add("### What this study could not show")
    doc.add("\n".join(items + failures) if items or failures else "Every section of the report could be computed.")
