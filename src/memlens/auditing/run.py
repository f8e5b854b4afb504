"""`memlens audit`: measure a model someone already fine-tuned, with the study's engine.

One base model is loaded; the target (a PEFT adapter, a full model, or a memlens run) is attached to it
(:class:`~memlens.models.AdapterBank`), so the base model is the reference of the ratio attacks through PEFT's
`disable_adapter` (no second copy of the base for an adapter). Then, as a study does for one run:

1. membership inference (:func:`memlens.attacks.mia.attack_run`): one batched pass over members, canaries and
   non-members under the target, the base model's scores (cached), every attack the inputs allow; LiRA and RMIA
   when `references` reference models are trained with the target's recipe (:mod:`memlens.attacks.references`);
   the bag-of-words check between the member and non-member files (document-grouped folds with `group`);
2. prompted-prefix extraction (:mod:`memlens.attacks.extraction`) of the canaries, a sample of members and of
   non-members, under the target and the base model; exposure of each canary that has a secret;
3. the files, in the study schema (one run): `results.parquet`, `mia_scores.parquet`, `extraction.parquet`,
   `exposure.parquet`, with `audit.yaml` and `audit.json`; then the report (`report/index.html`,
   `report/index.md`) and `model-card.md` (:mod:`memlens.report.audit`).

The folder is written under its lock; the base model's scores and trained reference models are kept, so a rerun
redoes the rest only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from memlens.attacks.extraction import (
    aggregate,
    attackable,
    base_control,
    build_prompts,
    exposed_canaries,
    extract_model,
    extraction_result_rows,
    resolve_decodings,
    select_targets,
)
from memlens.attacks.mia import BaseScores, RunData, Scorer, attack_run, bow_row, scoring_progress, token_log_freq
from memlens.attacks.references import in_matrix, load_references, train_references
from memlens.attacks.registry import ATTACKS, check_attack_inputs, configure
from memlens.auditing.records import AuditRecords, load_audit_records
from memlens.auditing.target import Target, resolve_target
from memlens.config import (
    SPLITS,
    AuditConfig,
    CellConfig,
    ConfigError,
    MIAConfig,
    StudyConfig,
    audit_study,
    load_audit,
    read_train_config,
    renamed_fields,
)
from memlens.data import StudyData
from memlens.models import count_parameters
from memlens.report.audit import AuditReport, write_audit_report
from memlens.store import StudyFile, StudyLayout, atomic_write_json, atomic_write_parquet, atomic_write_text
from memlens.store.lock import StudyLock
from memlens.store.records import AuditRecord
from memlens.store.results import run_metadata, upsert_results
from memlens.study.provenance import environment_info, now

# inputs the audit always has (the target's and the base model's statistics, the lowercased texts)
ALWAYS = frozenset({"ref", "lower", "moments"})


@dataclass
class AuditSummary:
    """What an audit wrote: its folder, the report (HTML and Markdown), the model card and the results rows."""

    out: Path
    report: AuditReport
    results: pd.DataFrame

    @property
    def model_card(self) -> Path:
        return self.report.model_card


# ------------------------------------------------------------------------------------- settings
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
    chosen, names, notes = [], set(), []
    for entry in entries:
        attack = configure(entry)
        if attack.needs <= have and attack.name not in names:
            chosen.append(entry)
            names.add(attack.name)
    skipped = sorted(name for name, attack in ATTACKS.items() if not attack.needs <= have)
    if skipped:
        notes.append(f"Not run: {', '.join(skipped)} (they need inputs this audit does not have: reference models "
                     "(`references` with `train_config`), a reference corpus (`mia.reference_corpus`), or a utility "
                     "split of known non-members outside the scored ones).")
    return mia.model_copy(update={"attacks": chosen}), notes


def _extraction(cfg: AuditConfig, target: Target):
    if target.kind == "run" and "extraction" not in cfg.model_fields_set:
        return target.study.extraction
    return cfg.extraction


def _recipe(cfg: AuditConfig, target: Target, mia: MIAConfig) -> StudyConfig:
    """The audit as a one-run study: a run folder's own study (its recipe, with the audit's settings), or the
    adapter's LoRA settings with the optimiser settings of `train_config`."""
    extraction = _extraction(cfg, target)
    train = read_train_config(cfg.train_config) if cfg.train_config else None
    if target.kind == "run":
        update = {"mia": mia, "extraction": extraction, "model": target.base, "out": str(cfg.out_dir)}
        return target.study.model_copy(update=update | ({"train": train} if train is not None else {}))
    if cfg.references:
        problem = target.recipe_problem()
        if problem:
            raise ConfigError(f"audit.references: reference models repeat the target's training recipe, and {problem}; "
                              "set references: 0")
        if train is None:
            raise ConfigError("audit.train_config: references are trained with the target's recipe: give the "
                              "optimiser settings it was trained with (a YAML file of the study's train fields: "
                              "epochs, learning_rate, batch_size...)")
    return audit_study(cfg, target.base, mia, extraction, lora=target.lora, train=train)


def _cell(target: Target) -> CellConfig:
    """The target as a grid cell (its recipe: method, matrices, rank)."""
    if target.cell is not None:
        return target.cell
    return CellConfig(method=target.method, target_modules=target.target_modules, rank=target.rank, canary_copies=1,
                      seed=0, membership=SPLITS)


# ------------------------------------------------------------------------------------- the target
def _attach(scorer: Scorer, target: Target) -> None:
    if target.kind == "run":
        scorer.bank.add(target.name, target.run_dir)
    elif target.kind == "adapter":
        scorer.bank.add_adapter(target.name, Path(target.source), base_label=target.base.name_or_path)
    else:
        scorer.bank.add_model(target.name, target.source)


def _adapter_parameters(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        return int(sum(np.prod(handle.get_slice(k).get_shape()) for k in handle.keys()))


def _meta(target: Target, records: AuditRecords, scorer: Scorer) -> dict:
    """The identifying columns of the target's rows (a run folder's are its study's)."""
    if target.kind == "run":
        return run_metadata(target.layout, target.name, target.cell, target.study)
    _, base_total = count_parameters(scorer.base)
    trainable = _adapter_parameters(Path(target.source)) if target.kind == "adapter" else base_total
    total = base_total + (trainable if target.kind == "adapter" else 0)
    copies = max((c.copies for c in records.canaries), default=0)
    return {"run_id": target.name, "model": target.base.name_or_path, "method": target.method,
            "target_modules": "+".join(target.target_modules), "rank": target.rank, "canary_copies": copies,
            "seed": None, "membership": SPLITS, "noise_multiplier": None, "epsilon": None,
            "learning_rate": None, "draw": None,  # trained elsewhere: its recipe and records are unknown here
            "trainable_params": trainable, "total_params": total, "trainable_pct": 100 * trainable / total}


def _references(cfg: AuditConfig, study: StudyConfig, target: Target, records: AuditRecords, scorer: Scorer,
                layout: StudyLayout, progress) -> tuple[np.ndarray, np.ndarray]:
    """(records, references) mean token log-likelihoods under `cfg.references` reference models and whether each
    record was in each one's training half, training the missing ones (kept in `<out>/references/`)."""
    keep = ["sample_id", "text", *(["group"] if "group" in records.members and "group" in records.non_members else [])]
    # the population: members and non-members, without inserted canaries (as a study's references: a repeated
    # training record is one of them, an inserted secret is not)
    inserted = {c.sample_id for c in records.canaries if c.mode == "insert"} | set(records.inserted)
    population = StudyData(members=records.members[~records.members.sample_id.isin(inserted)][keep]
                           .reset_index(drop=True), non_members=records.non_members[keep], utility=None)
    cell = _cell(target)
    train_references(study, [cell], lambda cell: population, layout, scorer.tokenizer, progress)
    refs = load_references(study, cell, layout, target.name)
    texts = records.members.text.tolist() + records.non_members.text.tolist()
    everyone = population.members.text.tolist() + population.non_members.text.tolist()
    return scorer.reference_statistics().matrix(refs, texts, also=everyone), in_matrix(refs, texts)


# ------------------------------------------------------------------------------------- the stages
def _membership(cfg, study, target, records, scorer, layout, progress, meta) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Membership inference on the target: (per-record scores, result rows); references trained first."""
    mia = study.mia
    attacks = check_attack_inputs(mia.attacks, mia.reference_corpus, references=cfg.references,
                                  utility=records.utility is not None)
    data = RunData(records.members, records.non_members, records.utility)
    if cfg.references:
        data.ref_models, data.ref_in = _references(cfg, study, target, records, scorer, layout, progress)
    datasets = {"members": data.members.text.tolist(), "non_members": data.non_members.text.tolist()}
    if data.utility is not None:
        datasets["utility"] = data.utility.text.tolist()
    base = BaseScores(scorer, datasets)
    counted = records.members[~records.members.sample_id.isin(records.inserted)]
    bow = bow_row(counted, records.non_members, mia, layout.cache) if mia.bag_of_words_baseline else None
    splits = (study.data.member_split, study.data.non_member_split) if target.kind == "run" else ("member",
                                                                                                  "non_member")
    return attack_run(scorer, target.name, data, base, attacks, meta,
                      token_log_freq=token_log_freq(scorer), bow=bow, split_names=splits,
                      scored_in_metrics=records.in_metrics())


def _extract(study, target, records, scorer, layout, progress, meta) -> tuple[pd.DataFrame, pd.DataFrame | None,
                                                                               pd.DataFrame]:
    """Extraction of canaries, sampled members and non-members, and canary exposure: (rows, exposure, result
    rows)."""
    cfg = study.extraction
    decodings = resolve_decodings(cfg)
    targets = select_targets(records.members, records.non_members, cfg)
    prompts = build_prompts(sorted(set(targets.text)), scorer.tokenizer, cfg)
    attacked = attackable(prompts, cfg)
    ppl_base, base_generations = base_control(layout, study, scorer.bank, attacked, decodings, scorer.tokenizer,
                                              progress)
    rows, exposure_rows = extract_model(target.name, scorer.bank, targets, prompts, decodings, cfg, scorer.tokenizer,
                                        ppl_base, base_generations, progress, records.canaries)
    exposure = pd.DataFrame(exposure_rows) if exposure_rows else None
    if exposure is not None and records.inserted:  # several canaries: each its own exposure rows
        exposure["canary_id"] = [c.sample_id for c in exposed_canaries(records.canaries, cfg) for _ in ("ft", "base")]
    results = aggregate(rows, targets, prompts, cfg)
    return rows, exposure, extraction_result_rows(meta, results, exposure)


def _write_results(layout: StudyLayout, parts: list[pd.DataFrame]) -> pd.DataFrame:
    """results.parquet holding exactly `parts` (an audit folder holds one audit)."""
    layout.results_file.unlink(missing_ok=True)
    return upsert_results(layout, pd.concat([p for p in parts if len(p)], ignore_index=True))


def _record(cfg, target, records, study, notes, wall) -> AuditRecord:
    counted = records.in_metrics()
    return AuditRecord(
        name=cfg.name, target=cfg.target, kind=target.kind, run_id=target.name,
        base=target.base.model_dump(mode="json"), method=target.method, target_modules=target.target_modules,
        rank=target.rank, sources=records.sources, n_members=int(counted[:len(records.members)].sum()),
        n_non_members=len(records.non_members), n_canaries=len(records.canaries),
        attacks=[configure(a).name for a in study.mia.attacks], references=cfg.references, group=cfg.group,
        mia=study.mia.model_dump(mode="json"), extraction=study.extraction.model_dump(mode="json"), notes=notes,
        wall_time_s=wall, written=now())


def _check_folder(layout: StudyLayout) -> None:
    if layout.study_file.exists():
        raise ConfigError(f"audit.out: {layout.root} holds a study ({layout.study_file.name}); an audit writes a "
                          "folder of its own: give another --out")


def audit(config: AuditConfig | str | Path | None = None, *, overrides: list[str] | None = None,
          show_progress: bool = True, **fields) -> AuditSummary:
    """Audit a fine-tuned model (what `memlens audit` does): `config` is an AuditConfig, the path of a YAML file
    whose `audit:` section holds the fields, or None; `fields` are the fields themselves (`target=`, `members=`,
    `non_members=`, `canaries=`, `base=`, `out=`, `references=`...), over the file's; `overrides` are `--set`
    items (`mia.bootstrap=200`). Returns what it wrote (:class:`AuditSummary`)."""
    start = time.perf_counter()
    if isinstance(config, AuditConfig):
        cfg = load_audit(raw=config.model_dump(exclude_unset=True), overrides=overrides, **fields)
    else:
        cfg = load_audit(config, overrides, **fields)
    target = resolve_target(cfg)
    records = load_audit_records(cfg, target)
    mia, notes = resolve_mia(cfg, target, records)
    study = _recipe(cfg, target, mia)
    try:  # bad settings refused before any model is loaded, in the audit's words
        check_attack_inputs(mia.attacks, mia.reference_corpus, references=cfg.references,
                            utility=records.utility is not None)
    except ConfigError as exc:
        raise renamed_fields(exc, {"mia.references": "audit.references", "mia.attacks": "audit.mia.attacks",
                                   "mia.reference_corpus": "audit.mia.reference_corpus"}) from None
    layout = StudyLayout(cfg.out_dir)
    _check_folder(layout)
    with scoring_progress(show_progress) as progress:
        try:  # the base model and the target first: one that does not fit is refused before anything is written
            scorer = Scorer(target.base, mia, layout.cache, progress)
        except ConfigError as exc:
            raise renamed_fields(exc, {"model.name_or_path": "audit.base"}) from None
        _attach(scorer, target)
        with StudyLock(layout.root):
            atomic_write_text(layout.audit_file, yaml.safe_dump(
                {"audit": cfg.model_dump(mode="json", exclude_unset=True)}, sort_keys=False))
            atomic_write_json(layout.environment_file, environment_info(study))
            meta = _meta(target, records, scorer)
            scores, rows = _membership(cfg, study, target, records, scorer, layout, progress, meta)
            parts = [rows]
            atomic_write_parquet(layout.study_level(StudyFile.MIA_SCORES), scores)
            for name in (StudyFile.EXTRACTION, StudyFile.EXPOSURE):
                layout.study_level(name).unlink(missing_ok=True)
            if study.extraction.enabled:
                extraction, exposure, extraction_rows = _extract(study, target, records, scorer, layout, progress,
                                                                 meta)
                atomic_write_parquet(layout.study_level(StudyFile.EXTRACTION), extraction)
                if exposure is not None:
                    atomic_write_parquet(layout.study_level(StudyFile.EXPOSURE), exposure)
                parts.append(extraction_rows)
            results = _write_results(layout, parts)
            _record(cfg, target, records, study, notes, time.perf_counter() - start).save(
                layout.root / StudyFile.AUDIT_RECORD)
            report = write_audit_report(layout.root)
    return AuditSummary(out=layout.root, report=report, results=results)


__all__ = ["AuditSummary", "audit", "resolve_mia"]
