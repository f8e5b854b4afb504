"""The evidence a data owner can cite about a suspect set (`memlens audit --suspect`): the suspect records and
documents with the strongest evidence, ranked, and the test half's scores, suspects against non-members (the
figure). Computed by :func:`memlens.attacks.dataset_inference.dataset_inference`; this module only lays it out."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from memlens.report.section import Block, Figure, FigureSpec, Omission, Section, Table, Text


@dataclass(kw_only=True)
class SuspectEvidence(Section):
    """Ranked evidence about the suspect set, and the test half's scores (its figure)."""

    anchor = "evidence"
    title = "Evidence about the suspect set"
    records: pd.DataFrame = field(default_factory=pd.DataFrame)     # tables/evidence_records.csv
    documents: pd.DataFrame = field(default_factory=pd.DataFrame)   # tables/evidence_documents.csv
    test_scores: dict[str, list[float]] = field(default_factory=dict)  # suspect_b, non_members_b
    unit: str = "record"
    features: list[str] = field(default_factory=list)

    def blocks(self) -> list[Block]:
        said = (f"The suspect {self.unit}s with the strongest evidence, strongest first: each one's score combines "
                f"the attack scores ({', '.join(f'`{f}`' for f in self.features)}) with the weights dataset "
                "inference learned; `non_members_as_high` is the share of the known non-members scoring at least as "
                "high (small: the record stands out). Records of the learning half helped fit the weights, so this "
                "ranks evidence; the test is the p-value above.")
        blocks: list[Block] = [Text(said), Figure(), Table("evidence_records", self.records)]
        if len(self.documents):
            blocks.append(Table("evidence_documents", self.documents))
        return blocks


def suspect_evidence(dataset_inference: dict | None) -> SuspectEvidence:
    """The section from audit.json's `dataset_inference`, or omitted with the reason."""
    if not dataset_inference:
        return SuspectEvidence(omitted=Omission("the ranked evidence", "dataset inference did not run (too few "
                                                                         "records or documents)"))
    unit = dataset_inference.get("unit", "record")
    return SuspectEvidence(
        records=pd.DataFrame(dataset_inference.get("ranked_records", [])),
        documents=pd.DataFrame(dataset_inference.get("ranked_documents", [])),
        test_scores=dataset_inference.get("test_scores", {}), unit=unit,
        features=list(dataset_inference.get("features", [])),
        figure=FigureSpec("evidence", f"Dataset inference's test half: each {unit}'s aggregated score, suspects "
                                      "against non-members (the split whose p-value is the median)."))


__all__ = ["SuspectEvidence", "suspect_evidence"]
