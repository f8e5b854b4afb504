"""The audit as a one-cell study: its settings (which attacks its inputs can feed), its recipe (for reference
models), a :class:`~memlens.context.StudyContext` whose records are the user's files, and the target as the
:class:`~memlens.attacks.subject.Subject` that the study's membership and extraction units measure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import Progress

from memlens.attacks.references import load_references, population, train_references
from memlens.attacks.registry import ATTACKS, ConfiguredAttack, check_attack_inputs, configure
from memlens.attacks.subject import Subject
from memlens.auditing.records import AuditRecords
from memlens.auditing.target import Target
from memlens.config import (
    SPLITS,
    AuditConfig,
    CellConfig,
    ConfigError,
    MIAConfig,
    StudyConfig,
    TrainConfig,
    audit_study,
    find_recipe,
    read_recipe,
    renamed_fields,
)
from memlens.context import StudyContext
from memlens.data import StudyData
from memlens.models import count_parameters
from memlens.store import run_metadata

# inputs the audit always has (the target's and the base model's statistics, the lowercased texts)
ALWAYS = frozenset({"ref", "ref_moments", "lower", "moments"})
AUDIT_NAMES = {"mia.references": "audit.references", "mia.attacks": "audit.mia.attacks",
               "mia.reference_corpus": "audit.mia.reference_corpus"}


@dataclass
class AuditStudy:
    """What an audit runs: the one-cell study (`ctx`: its settings, folder and records), the target as that cell,
    the attacks (checked once) and notes on what could not run."""

    ctx: StudyContext
    cell: CellConfig
    attacks: list[ConfiguredAttack]
    notes: list[str]

    @property
    def study(self) -> StudyConfig:
        return self.ctx.study


def _available(cfg: AuditConfig, mia: MIAConfig, records: AuditRecords) -> set[str]:
    """The inputs the audit can give attacks (registry needs)."""
    have = set(ALWAYS)
    if mia.reference_corpus is not None:
        have.add("token_freq")
    if cfg.references:
        have.add("references")
    if records.utility is not None and len(records.utility):
        have |= {"nonmember_prefix", "member_prefix"}
    return have


def resolve_mia(cfg: AuditConfig, target: Target, records: AuditRecords) -> tuple[MIAConfig, list[str]]:
    """The membership settings the audit runs with (a run folder's study's unless `mia` is given) and, in
    `mia.attacks`, every registered attack its inputs allow unless the attacks are given (a run folder's study's
    attacks first, so its numbers are reproduced); plus notes on attacks it could not run."""
    own = target.kind == "run" and "mia" not in cfg.model_fields_set
    settings = (target.study.mia if own else cfg.mia).model_dump(exclude={"attacks", "references"})
    mia = MIAConfig(**settings, references=cfg.references)
    have = _available(cfg, mia, records)
    if cfg.mia.attacks is not None:
        return mia.model_copy(update={"attacks": list(cfg.mia.attacks)}), []
    entries = list(target.study.mia.attacks) if own else []
    entries += [name for name, attack in ATTACKS.items() if attack.needs <= have]
    chosen, names = [], set()
    for entry in entries:
        attack = configure(entry)
        if attack.needs <= have and attack.name not in names:
            chosen.append(entry)
            names.add(attack.name)
    skipped = sorted(name for name, attack in ATTACKS.items() if not attack.needs <= have)
    notes = [f"Not run: {', '.join(skipped)} (they need inputs this audit does not have: reference models "
             "(`--references` with `--train-config`), a reference corpus (`mia.reference_corpus`), or known "
             "non-members outside the scored ones for a prefix (a memlens run folder's "
             "utility split)."] if skipped else []
    return mia.model_copy(update={"attacks": chosen}), notes


def _train_settings(cfg: AuditConfig, target: Target, records: AuditRecords, notes: list[str]
                    ) -> tuple[TrainConfig | None, int | None]:
    """The target's optimiser settings for its reference models and the record length its trainer cut records to
    (the recipe's `max_length`, None when not given): `--train-config` (the Trainer's names or the study's), else
    the `memlens-recipe.json` MemlensCallback wrote beside the adapter; what they came from is said in `notes`. A
    ratio warm-up is converted for a reference's training half of the records. A recipe without reference models
    would change nothing: refused."""
    path = cfg.train_config
    if path is not None and not cfg.references:
        raise ConfigError(f"audit.train_config: {path} is given but references is 0; the recipe only trains reference "
                          "models, so it would change nothing: set --references (2 or more, for LiRA and RMIA) or "
                          "drop --train-config")
    if path is None and cfg.references and target.kind == "adapter":
        path = find_recipe(target.source)
        if path is not None:
            notes.append(f"The reference models' recipe is the one MemlensCallback wrote beside the adapter: {path}.")
    if path is None:
        return None, None
    recipe = read_recipe(path)
    mismatch = recipe.lora_mismatch(target.peft or {}) if target.kind == "adapter" else None
    if mismatch:
        raise ConfigError(f"audit.train_config: {path} was written for another adapter ({mismatch}); give the "
                          "recipe of the audited adapter's training")
    half = (len(records.members) + len(records.non_members)) // 2  # a reference trains on about half the records
    size = recipe.train_records
    train = recipe.train_config(records=size or half)
    notes.append(f"Reference models: {recipe.describe(size or half)}.")
    if size is None:
        notes.append(f"The target's train size is not in the recipe (`train_records`): the references train for "
                     f"the recipe's epochs on their {half} records, a default; a target trained on more records "
                     "took more steps, and its non-members then score like the references' members.")
    elif train.max_steps is None:
        train = train.model_copy(update={"max_steps": recipe.steps(size)})
        notes.append(f"Reference models take the target's {train.max_steps} optimizer steps (its train_records="
                     f"{size} for {train.epochs:g} epochs) on their {half} records.")
    return train, recipe.max_length


def _recipe(cfg: AuditConfig, target: Target, mia: MIAConfig, records: AuditRecords, notes: list[str]
            ) -> StudyConfig:
    """The audit as a one-run study: a run folder's own study (its recipe, with the audit's settings), or the
    adapter's LoRA settings with the optimiser settings of `train_config`; the recipe's `max_length` is the
    references' `data.max_length`."""
    extraction = target.study.extraction if target.kind == "run" and "extraction" not in cfg.model_fields_set \
        else cfg.extraction
    train, max_length = _train_settings(cfg, target, records, notes)
    if target.kind == "run":
        update = {"mia": mia, "extraction": extraction, "model": target.base, "out": str(cfg.out_dir)}
        study = target.study.model_copy(update=update | ({"train": train} if train is not None else {}))
    else:
        if cfg.references:
            problem = target.recipe_problem()
            if problem:
                raise ConfigError(f"audit.references: reference models repeat the target's training recipe, and "
                                  f"{problem}; set references: 0")
            if train is None:
                raise ConfigError("audit.train_config: references are trained with the target's recipe: give the "
                                  "optimiser settings it was trained with (--train-config: a YAML file of its training "
                                  "settings: epochs, learning_rate, batch_size...)")
        study = audit_study(cfg, target.base, mia, extraction, lora=target.lora, train=train)
    if max_length is None:
        return study
    return study.model_copy(update={"data": study.data.model_copy(update={"max_length": max_length})})


def audit_cell(target: Target) -> CellConfig:
    """The target as a grid cell (its recipe: method, matrices, rank)."""
    if target.cell is not None:
        return target.cell
    return CellConfig(method=target.method, target_modules=target.target_modules, rank=target.rank, canary_copies=1,
                      seed=0, membership=SPLITS)


def plan_audit(cfg: AuditConfig, target: Target, records: AuditRecords) -> AuditStudy:
    """The audit as a one-cell study whose records are the user's files, its attacks checked once (in the audit's
    words) before any model is loaded."""
    mia, notes = resolve_mia(cfg, target, records)
    study = _recipe(cfg, target, mia, records, notes)
    try:
        attacks = check_attack_inputs(mia.attacks, mia.reference_corpus, references=cfg.references,
                                      utility=records.utility is not None)
    except ConfigError as exc:
        raise renamed_fields(exc, AUDIT_NAMES) from None
    # the references' population: the records the metrics count (no inserted canary: records.inserted, the one
    # definition; a repeated training record is one of them)
    keep = ["sample_id", "text", *(["group"] if "group" in records.members and "group" in records.non_members else [])]
    counted = records.members[~records.members.sample_id.isin(records.inserted)]
    data = StudyData(members=counted[keep].reset_index(drop=True),
                     non_members=records.non_members[keep], utility=None)
    cell = audit_cell(target)
    ctx = StudyContext(study)
    ctx.use_records(cell, data)
    return AuditStudy(ctx, cell, attacks, notes)


def _adapter_parameters(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        return int(sum(np.prod(handle.get_slice(k).get_shape()) for k in handle.keys()))


def target_meta(target: Target, records: AuditRecords, base) -> dict:
    """The identifying columns of the target's rows (a run folder's are its study's); `base` the loaded base."""
    if target.kind == "run":
        return run_metadata(target.layout, target.name, target.cell, target.study)
    _, base_total = count_parameters(base)
    trainable = _adapter_parameters(Path(target.source)) if target.kind == "adapter" else base_total
    total = base_total + (trainable if target.kind == "adapter" else 0)
    copies = max((c.copies for c in records.canaries), default=0)
    return {"run_id": target.name, "model": target.base.name_or_path, "method": target.method,
            "target_modules": "+".join(target.target_modules), "rank": target.rank, "canary_copies": copies,
            "seed": None, "membership": SPLITS, "noise_multiplier": None, "epsilon": None,
            "learning_rate": None, "draw": None,  # trained elsewhere: its recipe and records are unknown here
            "trainable_params": trainable, "total_params": total, "trainable_pct": 100 * trainable / total}


def audit_subject(plan: AuditStudy, target: Target, records: AuditRecords, meta: dict, tokenizer,
                  progress: Progress | None) -> Subject:
    """The target as the subject the study's units measure; its reference models trained first (with the cell's
    recipe, on the audit's records: a reference trained on other records is trained again)."""
    ctx, cell = plan.ctx, plan.cell
    references = None
    data = ctx.cell_data(cell)
    if plan.study.mia.references:
        try:  # a record over the recipe's max_length: in the words of the audit
            train_references(plan.study, [cell], ctx.cell_data, ctx.layout, tokenizer, progress)
        except ConfigError as exc:
            raise renamed_fields(exc, {"data.max_length": "the recipe's max_length (audit.train_config)"}) from None
        references = load_references(plan.study, cell, ctx.layout, data, target.name)
    splits = (plan.study.data.member_split, plan.study.data.non_member_split) if target.kind == "run" \
        else ("suspect" if "suspect" in records.sources else "member", "non_member")
    canaries = records.canary_frame
    return Subject(name=target.name, members=records.members, non_members=records.non_members, meta=meta,
                   utility=records.utility, counted=records.in_metrics(), secrets=list(records.canaries),
                   canaries=canaries if len(canaries) else None,
                   name_canaries=records.canary_file is not None, references=references,
                   population=population(data).text.tolist() if references else [], split_names=splits)


__all__ = ["AuditStudy", "audit_cell", "audit_subject", "plan_audit", "resolve_mia", "target_meta"]
