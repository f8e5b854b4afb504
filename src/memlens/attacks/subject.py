"""The unit of work of every measurement: one model measured on one set of records.

A study's run, each adapter of :func:`memlens.attacks.mia.attack_models` and the model of `memlens audit` are each
a :class:`Subject`; membership inference (:func:`memlens.attacks.mia.measure_membership`) and prompted-prefix
extraction with canary exposure (:func:`memlens.attacks.extraction.extract_subjects`) take subjects and nothing
else of their caller, so the three callers measure in one way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from memlens.attacks.references import Reference, load_references, population
from memlens.config import SPLITS, CellConfig, Design, StudyConfig
from memlens.context import StudyContext
from memlens.data import Canary, StudyData
from memlens.store import RunFile, run_metadata
from memlens.train import read_members, read_train_info


@dataclass
class Subject:
    """One model (attached to the scorer's :class:`~memlens.models.AdapterBank` as `name`) and its records.

    `members` (sample_id, text, is_canary[, group]) and `non_members` (sample_id, text[, group]) are scored in one
    pass; `counted` (members + non-members,) says which count in the membership metrics (None: all; an audit's
    inserted canaries do not). `canaries` (canary_id, family, text, is_member): canaries scored beside the records,
    inserted ones against held-out twins, with metrics of their own. `secrets`: the canaries whose exposure is
    measured; `name_canaries`: whether their exposure rows carry the canary's id (an audit's several canaries) or
    not (a study run's one canary). `references`: the LiRA / RMIA reference adapters of its recipe, which score
    the records and, in the same pass, every text of `population` (the records of their experiment)."""

    name: str
    members: pd.DataFrame
    non_members: pd.DataFrame
    meta: dict                                   # the identifying columns of its result rows
    utility: pd.DataFrame | None = None
    counted: np.ndarray | None = None
    canaries: pd.DataFrame | None = None
    secrets: list[Canary] = field(default_factory=list)
    name_canaries: bool = False
    references: list[Reference] | None = None
    population: list[str] = field(default_factory=list)
    split_names: tuple[str, str] = ("member", "non_member")

    @property
    def texts(self) -> list[str]:
        """The members' texts, then the non-members'."""
        return self.members.text.tolist() + self.non_members.text.tolist()


def with_groups(members: pd.DataFrame, data: StudyData) -> pd.DataFrame:
    """A run's members with their document group: from the data when members.parquet predates groups; a record
    with none (the inserted canary, written with a null group) is a document of its own, `canary:<sample_id>`."""
    if "group" not in data.members:
        return members
    groups = members.group if "group" in members else members.sample_id.map(
        dict(zip(data.members.sample_id, data.members.group)))
    return members.assign(group=[g if isinstance(g, str) else f"canary:{s}"
                                 for g, s in zip(groups, members.sample_id)])


def split_names(study: StudyConfig, design: Design) -> tuple[str, str]:
    """The `split` column's values for members and non-members of a design."""
    if design == SPLITS:
        return study.data.member_split, study.data.non_member_split
    return f"{design}:member", f"{design}:non_member"


def study_subject(ctx: StudyContext, run_id: str, cell: CellConfig, *, references: bool = False) -> Subject:
    """A study's finished run as a :class:`Subject`: its members.parquet (with their document groups), its design's
    non-members and utility split, its designed canaries (`audit_canaries.parquet`), its canary (exposure) and, with
    `references`, its recipe's reference adapters."""
    study, layout = ctx.study, ctx.layout
    data = ctx.cell_data(cell)
    run_dir = layout.run_dir(run_id)
    designed = run_dir / RunFile.AUDIT_CANARIES
    canaries = pd.read_parquet(designed) if designed.exists() else None
    return Subject(
        name=run_id, members=with_groups(read_members(run_dir), data), non_members=data.non_members,
        meta=run_metadata(layout, run_id, cell, study), utility=data.utility,
        canaries=canaries if canaries is not None and len(canaries) else None,
        secrets=[Canary(**read_train_info(run_dir).canary)],
        references=load_references(study, cell, layout, data, run_id) if references else None,
        population=population(data).text.tolist() if references else [],
        split_names=split_names(study, cell.membership))


__all__ = ["Subject", "split_names", "study_subject", "with_groups"]
