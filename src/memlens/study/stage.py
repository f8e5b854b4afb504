"""The per-run stages of a study, each one object: what it needs, the files it writes, its result rows,
its config section, and how to run, merge and invalidate it.

A stage is *done* for a run when its marker file exists in `runs/<run_id>/` (written last and atomically),
so a rerun after a kill redoes only what was not finished. Adding a stage is one :class:`Stage` subclass
appended to :data:`STAGES`; the runner, the executors, `memlens status` and `--force` read it from there.

    finetune    runs/<run_id>/ (the folder appears complete, by rename; marker train.json)
    references  references/runs/<ref_run_id>/ of the run's recipe (mia.references > 0; done when every one
                has its reference.json: shared by the cells of a recipe, so there is no per-run marker)
    mia         runs/<run_id>/mia_results.parquet (+ the one-run privacy audit rows)
    extraction  runs/<run_id>/extraction_results.parquet
"""

from __future__ import annotations

import os
import shutil
import time
from typing import ClassVar

from memlens.attacks.extraction import merge_study as merge_extraction
from memlens.attacks.extraction import run_extraction
from memlens.attacks.mia import merge_study as merge_mia
from memlens.attacks.mia import prepare_base_cache, run_mia
from memlens.attacks.privacy_audit import AUDIT_STAGE, run_privacy_audit
from memlens.attacks.references import is_trained, reference_ids, remove_references, train_references
from memlens.attacks.registry import check_attacks
from memlens.config import CellConfig, StudyConfig
from memlens.context import StudyContext
from memlens.models import check_quantized
from memlens.store import RunFile, atomic_write_parquet, read_results
from memlens.store.lock import write_lock
from memlens.study.provenance import record_stage_time
from memlens.train import finetune_cell, merge_audit_canaries
from memlens.train.progress import training_progress


class Stage:
    """One per-run stage. Subclasses set the class attributes and implement :meth:`run`; every method gets the
    :class:`~memlens.context.StudyContext`, whose study, cells and records it reads instead of the disk."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()          # stages that must be done first
    brings: ClassVar[tuple[str, ...]] = ()         # stages run with it when it is asked for alone (`--only`)
    marker: ClassVar[str]                          # per-run file whose presence means "done"
    files: ClassVar[tuple[str, ...]] = ()          # per-run files it writes (removed when invalidated)
    result_stages: ClassVar[tuple[str, ...]] = ()  # `stage` values of its rows in results.parquet
    section: ClassVar[str | None] = None           # config section it reads beyond the fine-tuned model
    batched: ClassVar[bool] = True                 # runs once for many cells (sharing a loaded base model)

    def enabled(self, study: StudyConfig) -> bool:
        return True

    def check(self, ctx: StudyContext) -> None:
        """Refuse settings this stage cannot run with (ConfigError), before any work starts."""

    def prepare(self, ctx: StudyContext, cells: list[CellConfig]) -> None:
        """Work shared by `cells` that a distributed driver does once before handing cells out (e.g. the base
        model's scores); a process that runs the stage for many cells at once needs no call."""

    def done(self, ctx: StudyContext, run_id: str) -> bool:
        return ctx.layout.run_file(run_id, self.marker).exists()

    def run(self, ctx: StudyContext, cells: list[CellConfig]) -> None:
        raise NotImplementedError

    def merge(self, ctx: StudyContext) -> None:
        """Rebuild the study-level files of this stage from the per-run files (idempotent)."""

    def invalidate(self, ctx: StudyContext, run_ids: list[str]) -> None:
        """Make the stage pending again for `run_ids`: its per-run files, then its results rows."""
        layout = ctx.layout
        for run_id in run_ids:
            for name in self.files:
                layout.run_file(run_id, name).unlink(missing_ok=True)
        with write_lock(layout.root):
            results = read_results(layout)
            if len(results):
                stale = results.run_id.isin(run_ids) & results.stage.isin(self.result_stages)
                if stale.any():
                    atomic_write_parquet(layout.results_file, results[~stale].reset_index(drop=True))

    def __repr__(self) -> str:
        return f"<stage {self.name}>"


class FinetuneStage(Stage):
    name = "finetune"
    marker = RunFile.TRAIN
    batched = False  # one cell at a time: each run's wall time is its own

    def check(self, ctx: StudyContext) -> None:
        check_quantized(ctx.study)  # an 8-bit base: LoRA only, no DP

    def run(self, ctx: StudyContext, cells: list[CellConfig]) -> None:
        progress = None if ctx.show_progress else training_progress(disable=True)
        for cell in cells:
            finetune_cell(ctx.study, cell, ctx.data(cell.membership), ctx.layout, ctx.tokenizer(), progress=progress)

    def merge(self, ctx: StudyContext) -> None:
        merge_audit_canaries(ctx.layout, {r: c.membership for r, c in ctx.runs()})  # dp.audit_canaries' coins

    def invalidate(self, ctx: StudyContext, run_ids: list[str]) -> None:
        """Remove the runs: renamed to a temp name first (atomic), then deleted."""
        layout = ctx.layout
        for run_id in run_ids:
            final = layout.run_dir(run_id)
            if final.is_dir():
                trash = final.parent / f".{run_id}.tmp-forced"
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)


class ReferencesStage(Stage):
    """The reference adapters of LiRA / RMIA (:mod:`memlens.attacks.references`): `mia.references` fine-tunes per
    recipe, trained the first time a cell of that recipe gets here and shared by the others (their stage is then
    done at once). Runs per cell like `finetune`, so the local and Ray executors need nothing else; two Ray
    workers with cells of one recipe split its references between them (a lock per reference) rather than train
    one twice. Its cost: each reference's train.json, and this stage's time in the runs' timings.json."""

    name = "references"
    needs = ("finetune",)
    marker = "references/runs/<ref_run_id>/reference.json"  # shared by a recipe's runs: see done()
    batched = False

    def enabled(self, study: StudyConfig) -> bool:
        return study.mia.enabled and study.mia.references > 0

    def done(self, ctx: StudyContext, run_id: str) -> bool:
        """Every reference of the run's recipe is trained."""
        cell = ctx.cells.get(run_id)
        return cell is not None and all(is_trained(ctx.layout, ref_id) for ref_id in reference_ids(ctx.study, cell))

    def run(self, ctx: StudyContext, cells: list[CellConfig]) -> None:
        progress = None if ctx.show_progress else training_progress(disable=True)
        train_references(ctx.study, cells, ctx.data, ctx.layout, ctx.tokenizer(), progress=progress)

    def invalidate(self, ctx: StudyContext, run_ids: list[str]) -> None:
        """Delete the references of these runs' recipes (retrained next), and the runs' membership results,
        which were computed with them."""
        cells = [ctx.cells[r] for r in run_ids if r in ctx.cells]
        if not cells or ctx.study.mia.references == 0:
            return
        remove_references(ctx.study, cells, ctx.layout)
        MIAStage().invalidate(ctx, run_ids)


class MIAStage(Stage):
    name = "mia"
    needs = ("finetune",)
    marker = RunFile.MIA_RESULTS
    files = (RunFile.MIA_SCORES, RunFile.CANARY_SCORES, RunFile.MIA_RESULTS)
    result_stages = ("mia", "utility", AUDIT_STAGE)
    section = "mia"
    brings = ("references",)  # `memlens attack mia` trains the references first when the study has them

    def enabled(self, study: StudyConfig) -> bool:
        return study.mia.enabled

    def check(self, ctx: StudyContext) -> None:
        check_attacks(ctx.study)

    def prepare(self, ctx: StudyContext, cells: list[CellConfig]) -> None:
        if not all(self.done(ctx, c.run_id(ctx.study)) for c in cells):
            prepare_base_cache(ctx)  # the base model's scores, read by every cell

    def run(self, ctx: StudyContext, cells: list[CellConfig]) -> None:
        run_mia(ctx, cells, merge=False)
        run_privacy_audit(ctx, cells)  # accountant epsilon and empirical lower bound

    def merge(self, ctx: StudyContext) -> None:
        merge_mia(ctx.layout)
        run_privacy_audit(ctx)  # idempotent: rows missing after a kill are added, others unchanged


class ExtractionStage(Stage):
    name = "extraction"
    needs = ("finetune",)
    marker = RunFile.EXTRACTION_RESULTS
    files = (RunFile.EXTRACTION, RunFile.EXTRACTION_RESULTS, RunFile.EXPOSURE)
    result_stages = ("extraction", "exposure")
    section = "extraction"

    def enabled(self, study: StudyConfig) -> bool:
        return study.extraction.enabled

    def run(self, ctx: StudyContext, cells: list[CellConfig]) -> None:
        run_extraction(ctx, cells)

    def merge(self, ctx: StudyContext) -> None:
        merge_extraction(ctx)


STAGES: tuple[Stage, ...] = (FinetuneStage(), ReferencesStage(), MIAStage(), ExtractionStage())
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(name)


def enabled_stages(study: StudyConfig) -> list[Stage]:
    """The per-run stages this study runs, in order."""
    return [s for s in STAGES if s.enabled(study)]


def selected_stages(study: StudyConfig, only: list[str] | None) -> list[Stage]:
    """The enabled stages of `only` (all when None), with the stages each of them brings along, in order."""
    if only is None:
        return enabled_stages(study)
    wanted = set(only) | {b for s in STAGES if s.name in only for b in s.brings}
    return [s for s in enabled_stages(study) if s.name in wanted]


def preparing(stages: list[Stage]) -> list[Stage]:
    """The stages among `stages` that have work to prepare before cells fan out (they override prepare)."""
    return [s for s in stages if type(s).prepare is not Stage.prepare]


def execute(stage: Stage, ctx: StudyContext, cells: list[CellConfig]) -> None:
    """Run `stage` for `cells`, check that it left its marker for each, and record its wall time."""
    start = time.perf_counter()
    stage.run(ctx, cells)
    layout = ctx.layout
    run_ids = [c.run_id(ctx.study) for c in cells]
    missing = [r for r in run_ids if not stage.done(ctx, r)]
    if missing:
        raise RuntimeError(f"stage {stage.name} finished without writing runs/<run_id>/{stage.marker} for {missing}")
    record_stage_time(layout, run_ids, stage.name, time.perf_counter() - start)


__all__ = ["STAGES", "STAGE_NAMES", "ExtractionStage", "FinetuneStage", "MIAStage", "ReferencesStage", "Stage",
           "enabled_stages", "execute", "get_stage", "preparing", "selected_stages"]
