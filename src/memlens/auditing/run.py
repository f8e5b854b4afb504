"""`memlens audit`: measure a model someone already fine-tuned, with the study's engine.

The audit resolves its target (a PEFT adapter, a full model, or a memlens run: :mod:`memlens.auditing.target`),
reads its records (:mod:`memlens.auditing.records`), builds the one-cell study it is
(:func:`memlens.auditing.study.plan_audit`: a :class:`~memlens.context.StudyContext` whose records are the user's
files), then runs the study's own units on the target as a :class:`~memlens.attacks.subject.Subject`:

1. membership inference (:func:`memlens.attacks.mia.measure_membership`): one batched pass over members, canaries and
   non-members under the target, the base model's scores (cached), every attack the inputs allow, LiRA and RMIA
   with `references` reference models of the target's recipe, the bag-of-words check between the two files;
2. prompted-prefix extraction and canary exposure (:func:`memlens.attacks.extraction.extract_subjects`);
3. the files, in the study schema (one run): `results.parquet`, `mia_scores.parquet`, `extraction.parquet`,
   `exposure.parquet`, with `audit.yaml` and `audit.json` (which holds the study it ran); then the report
   (`report/index.html`, `report/index.md`) and `model-card.md` (:mod:`memlens.report.audit`).

The base model is the reference of the ratio attacks: the target is attached to it (an adapter through PEFT's
`disable_adapter`, no second copy of the base). The folder is written under its lock. What a rerun finds there is
read only where its identity holds the records' contents (the base model's scores, the extraction control,
the bag-of-words check, reference models and their scores); everything else is computed again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from memlens.attacks.extraction import extract_subjects
from memlens.attacks.mia import (
    BaseScores,
    Membership,
    Scorer,
    measure_membership,
    record_datasets,
    scoring_progress,
    token_log_freq,
)
from memlens.attacks.registry import needs_of
from memlens.attacks.subject import Subject
from memlens.auditing.records import AuditRecords, load_audit_records
from memlens.auditing.study import AuditStudy, audit_subject, plan_audit, target_meta
from memlens.auditing.target import Target, resolve_target
from memlens.config import AuditConfig, ConfigError, load_audit, renamed_fields
from memlens.report.audit import AuditReport, write_audit_report
from memlens.store import StudyFile, StudyLayout, atomic_write_json, atomic_write_parquet, atomic_write_text
from memlens.store.lock import StudyLock
from memlens.store.records import AuditRecord
from memlens.store.results import upsert_results
from memlens.study.provenance import environment_info, now


@dataclass
class AuditSummary:
    """What an audit wrote: its folder, the report (HTML and Markdown), the model card and the results rows."""

    out: Path
    report: AuditReport
    results: pd.DataFrame

    @property
    def model_card(self) -> Path:
        return self.report.model_card


def _attach(scorer: Scorer, target: Target) -> None:
    if target.kind == "run":
        scorer.bank.add(target.name, target.run_dir)
    elif target.kind == "adapter":
        scorer.bank.add_adapter(target.name, Path(target.source), base_label=target.base.name_or_path,
                                peft=target.peft)
    else:
        scorer.bank.add_model(target.name, target.source)


def _measure(plan: AuditStudy, subject: Subject, scorer: Scorer, progress) -> tuple[list[pd.DataFrame], Membership]:
    """The study's units on the subject, their files written in the audit folder; returns the result rows and the
    membership measurement."""
    layout = plan.ctx.layout
    base = BaseScores(scorer, record_datasets(subject.members, subject.non_members, subject.utility),
                      "ref_moments" in needs_of(plan.attacks))
    measured = measure_membership(scorer, subject, base, plan.attacks, token_log_freq=token_log_freq(scorer))
    atomic_write_parquet(layout.study_level(StudyFile.MIA_SCORES), measured.scores)
    parts = [measured.rows]
    if measured.canary_scores is not None:  # inserted canaries against their held-out twins
        atomic_write_parquet(layout.study_level(StudyFile.CANARY_SCORES), measured.canary_scores)
    else:
        layout.study_level(StudyFile.CANARY_SCORES).unlink(missing_ok=True)
    for name in (StudyFile.EXTRACTION, StudyFile.EXPOSURE):
        layout.study_level(name).unlink(missing_ok=True)  # what an earlier audit of this folder wrote
    if plan.study.extraction.enabled:
        for _, extraction in extract_subjects(layout, plan.study, scorer.bank, [subject], scorer.tokenizer, progress):
            atomic_write_parquet(layout.study_level(StudyFile.EXTRACTION), extraction.rows)
            if extraction.exposure is not None:
                atomic_write_parquet(layout.study_level(StudyFile.EXPOSURE), extraction.exposure)
            parts.append(extraction.result_rows)
    return parts, measured


def _record(cfg: AuditConfig, plan: AuditStudy, target: Target, records: AuditRecords, measured: Membership,
            wall: float) -> AuditRecord:
    counted = records.in_metrics()
    return AuditRecord(
        name=cfg.name, target=cfg.target, kind=target.kind, run_id=target.name,
        base=target.base.model_dump(mode="json"), method=target.method, target_modules=target.target_modules,
        rank=target.rank, sources=records.sources, n_members=int(counted[:len(records.members)].sum()),
        n_non_members=len(records.non_members), n_canaries=len(records.canaries),
        attacks=[a.name for a in plan.attacks], references=cfg.references, group=cfg.group,
        study=plan.study.model_dump(mode="json"), notes=plan.notes + records.notes, wall_time_s=wall, written=now(),
        dataset_inference=_dump(measured.dataset_inference), usage_share=_dump(measured.usage_share))


def _dump(result) -> dict | None:
    return None if result is None else result.model_dump(mode="json")


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
    plan = plan_audit(cfg, target, records)  # bad settings refused before any model is loaded
    layout = plan.ctx.layout
    _check_folder(layout)
    with scoring_progress(show_progress) as progress:
        try:  # the base model and the target first: one that does not fit is refused before anything is written
            scorer = Scorer(target.base, plan.study.mia, layout.cache, progress)
        except ConfigError as exc:
            raise renamed_fields(exc, {"model.name_or_path": "audit.base"}) from None
        _attach(scorer, target)
        with StudyLock(layout.root):
            atomic_write_text(layout.audit_file, yaml.safe_dump(
                {"audit": cfg.model_dump(mode="json", exclude_unset=True)}, sort_keys=False))
            atomic_write_json(layout.environment_file, environment_info(plan.study))
            subject = audit_subject(plan, target, records, target_meta(target, records, scorer.base),
                                    scorer.tokenizer, progress)
            parts, measured = _measure(plan, subject, scorer, progress)
            layout.results_file.unlink(missing_ok=True)  # an audit folder holds one audit
            results = upsert_results(layout, pd.concat([p for p in parts if len(p)], ignore_index=True))
            _record(cfg, plan, target, records, measured, time.perf_counter() - start).save(
                layout.root / StudyFile.AUDIT_RECORD)
            report = write_audit_report(layout.root)
    return AuditSummary(out=layout.root, report=report, results=results)


__all__ = ["AuditSummary", "audit"]
