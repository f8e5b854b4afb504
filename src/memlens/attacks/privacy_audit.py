"""The one-run privacy audit of every attacked run (results stage `privacy`).

Reads a run's membership scores and its train record, and reports the accountant's epsilon (DP runs) next to
the empirical lower bounds of :func:`memlens.metrics.privacy.one_run_epsilon_lower_bound` (Steinke et al.'s
`eps_lower` and the Gaussian-DP `eps_lower_gdp` of Mahloujifar et al., from the same guesses): attack
`dp_audit` audits the records, attack `dp_audit_canaries` the designed canaries (`dp.audit_canaries`, whose
coins memlens flipped, so their bounds are always valid). Part of the membership stage: it runs after the
scores are written and again at every merge (idempotent).
"""

from __future__ import annotations

import math

import pandas as pd

from memlens.config import RANDOM, CellConfig, ConfigError, Design, StudyConfig
from memlens.context import StudyContext
from memlens.metrics.privacy import default_delta, one_run_epsilon_lower_bound
from memlens.store import RunFile, run_metadata, upsert_results
from memlens.store.lock import write_lock
from memlens.store.records import TrainRecord

AUDIT_STAGE = "privacy"
AUDIT_ATTACK = "dp_audit"
CANARY_AUDIT_ATTACK = "dp_audit_canaries"


def coin_per_record(study: StudyConfig, design: Design) -> tuple[bool, str | None]:
    """Whether the audit's assumption holds for a run of `design`: memlens flipped a fair coin per record (the
    random design with record-level coins), or the user declared it (`dp.audit_random_split`); with why not."""
    if design == RANDOM and study.data.coin_unit == "record":
        return True, None
    if design == RANDOM:
        return False, ("memlens flipped one coin per document group, not per record: records of a group are not "
                       "independent; set data.membership_unit: record for an audit")
    return study.dp.audit_random_split, None


def run_privacy_audit(ctx: StudyContext, cells: list[CellConfig] | None = None,
                      attack: str | None = None) -> pd.DataFrame:
    """For each finished run of `cells` (default: every run of the study) with membership scores, one results
    row (stage `privacy`, attack `dp_audit`) with the accountant's epsilon (DP runs; NaN otherwise) and the
    one-run empirical lower bound computed from the per-record scores of `attack` (default:
    `dp.audit_attack`). Upserts them into results.parquet and returns them."""
    study, layout = ctx.study, ctx.layout
    attack = attack or study.dp.audit_attack
    rows = []
    for run_id, cell in ctx.runs(cells):
        scores_path = layout.run_file(run_id, RunFile.MIA_SCORES)
        train = TrainRecord.read(layout.run_file(run_id, RunFile.TRAIN))
        if not scores_path.exists() or train is None:  # a damaged train.json fails its cell, naming it
            continue
        dp = train.dp or {}
        scores = pd.read_parquet(scores_path)
        if attack not in scores:
            raise ConfigError(f"dp.audit_attack: run {run_id} has no {attack!r} scores; it has "
                              f"{[c for c in scores.columns if c not in ('run_id', 'sample_id', 'split')]}")
        delta = dp.get("delta") or study.dp.delta or default_delta(train.n_train_records)
        random_split, why = coin_per_record(study, cell.membership)
        audit = one_run_epsilon_lower_bound(scores[attack].to_numpy(), scores.is_member.to_numpy(), delta=delta,
                                            random_split=random_split, confidence=study.dp.audit_confidence)
        if why:
            audit["note"] = f"{audit['note']} ({why})"
        common = {
            **run_metadata(layout, run_id, cell, study), "stage": AUDIT_STAGE,
            "epsilon": dp.get("epsilon", math.nan),
            "epsilon_note": None if dp else "not trained with DP-SGD",
            "dp_noise_multiplier": dp.get("noise_multiplier", math.nan),
            "accountant": dp.get("accountant"),
            "audit_attack": attack,
        }
        rows.append({**common, "attack": AUDIT_ATTACK, **audit})
        canaries = layout.run_file(run_id, RunFile.CANARY_SCORES)
        if canaries.exists():
            rows.append({**common, "attack": CANARY_AUDIT_ATTACK,
                         **canary_audit(pd.read_parquet(canaries), attack, train, delta, study.dp.audit_confidence)})
    frame = pd.DataFrame(rows)
    if len(frame):
        with write_lock(layout.root):
            upsert_results(layout, frame)
    return frame


def canary_audit(scores: pd.DataFrame, attack: str, train: TrainRecord, delta: float, confidence: float) -> dict:
    """Both one-run bounds from the designed canaries' scores (`canary_scores.parquet`) under `attack`: every canary
    of every family audited together, each made a member by memlens' own coin (the audit's assumption holds by
    construction). With k copies of each canary the bounds are on k-record group privacy, which the note says."""
    if attack not in scores:
        raise ConfigError(f"dp.audit_attack: the designed canaries have no {attack!r} scores; they have "
                          f"{[c for c in scores.columns if c not in ('run_id', 'canary_id', 'family', 'is_member')]}")
    audit = one_run_epsilon_lower_bound(scores[attack].to_numpy(), scores.is_member.to_numpy(), delta=delta,
                                        random_split=True, confidence=confidence)
    design = (train.model_extra or {}).get("audit_canaries") or {}
    copies = int(design.get("copies", 1))
    audit["note"] = (f"one-run audit of {len(scores)} designed canaries, each inserted into training by memlens' own "
                     "fair coin (dp.audit_seed), the rest held out")
    if copies > 1:
        audit["note"] = (f"{audit['note']}; each inserted canary occurs {copies} times, so the bounds are on "
                         f"{copies}-record group privacy: compare them with the group's epsilon, not the "
                         "accountant's per-record one")
    return {**audit, "audit_design": ",".join(dict.fromkeys(scores.family.astype(str))), "audit_copies": copies}


__all__ = ["AUDIT_ATTACK", "AUDIT_STAGE", "CANARY_AUDIT_ATTACK", "canary_audit", "run_privacy_audit"]
