"""The per-run stages of a study, each one object: what it needs, the files it writes, its result rows,
its config section, and how to run, merge and invalidate it.

A stage is *done* for a run when its marker file exists in `runs/<run_id>/` (written last and atomically),
so a rerun after a kill redoes only what was not finished. A per-run file that no longer reads (truncated,
overwritten: :meth:`Stage.damage`) makes its stage `damaged` in `memlens status` and pending for `memlens run`,
which redoes it; a damaged fine-tune fails its cell instead, naming the file and how to redo that cell.
Adding a stage is one :class:`Stage` subclass appended to :data:`STAGES`; the runner, the executors,
`memlens status` and `--force` read it from there.

    finetune    runs/<run_id>/ (the folder appears complete, by rename; marker train.json)
    references  references/runs/<ref_run_id>/ of the run's recipe (mia.references > 0; done when every one
                has its reference.json: shared by the cells of a recipe, so there is no per-run marker)
    mia         runs/<run_id>/mia_results.parquet (+ the one-run privacy audit rows)
    extraction  runs/<run_id>/extraction_results.parquet
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from functools import reduce
from typing import ClassVar

from memlens.attacks.dataset_inference import DATASET_STAGE
from memlens.attacks.extraction import merge_study as merge_extraction
from memlens.attacks.extraction import run_extraction
from memlens.attacks.mia import check_membership_records, prepare_base_cache, run_mia
from memlens.attacks.mia import merge_study as merge_mia
from memlens.attacks.privacy_audit import AUDIT_STAGE, run_privacy_audit
from memlens.attacks.references import (
    is_trained,
    population,
    reference_identities,
    remove_references,
    train_references,
)
from memlens.attacks.registry import check_attacks
from memlens.config import CellConfig, ConfigError, StudyConfig
from memlens.context import StudyContext
from memlens.models import check_quantized
from memlens.store import RunFile, atomic_write_parquet, read_results
from memlens.store.integrity import CorruptArtifactError, missing_files, redo_cell_advice, unreadable
from memlens.store.lock import write_lock
from memlens.store.records import CellRecord, TrainRecord
from memlens.study.provenance import record_stage_time
from memlens.train import check_training_records, merge_audit_canaries, tokenize_records
from memlens.train.progress import training_progress
from memlens.train.together import finetune_group, training_groups

log = logging.getLogger(__name__)


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
    redo_damaged: ClassVar[bool] = True            # `memlens run` redoes it where its per-run files are damaged
    switches: ClassVar[tuple[str, ...]] = ()       # the study fields that turn it on (enabled reads them)

    def enabled(self, study: StudyConfig) -> bool:
        return True

    def check(self, ctx: StudyContext) -> None:
        """Refuse settings this stage cannot run with (ConfigError), before any work starts."""

    def prepare(self, ctx: StudyContext, cells: list[CellConfig]) -> None:
        """Work shared by `cells` that a distributed driver does once before handing cells out (e.g. the base
        model's scores); a process that runs the stage for many cells at once needs no call."""

    def done(self, ctx: StudyContext, run_id: str) -> bool:
        """Its marker exists and none of its per-run files is damaged."""
        return ctx.layout.run_file(run_id, self.marker).exists() and self.damage(ctx, run_id) is None

    def damage(self, ctx: StudyContext, run_id: str) -> str | None:
        """What is wrong with the per-run files this stage wrote for `run_id` (a truncated or overwritten file),
        with what repairs it; None when they read (or are not there yet)."""
        names = dict.fromkeys((self.marker, *self.files))
        found = [(path, why) for path in (ctx.layout.run_file(run_id, n) for n in names) if (why := unreadable(path))]
        if not found:
            return None
        said = "; ".join(f"{path} cannot be read ({why})" for path, why in found)
        return f"{said}. `memlens run` redoes the {self.name} stage of this run (its other stages are kept)"

    def groups(self, ctx: StudyContext, run_ids: list[str]) -> list[list[str]]:
        """How a process runs this stage for `run_ids`: each list is one call of :meth:`run` (all at once when
        batched, else one by one; the stages that train adapters group them by `train.together`)."""
        return [list(run_ids)] if self.batched and run_ids else [[r] for r in run_ids]

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
    batched = False  # one cell at a time (each run's wall time its own), or groups of `train.together`
    redo_damaged = False  # a damaged run is named with how to redo it, never deleted unasked (see damage)

    def check(self, ctx: StudyContext) -> None:
        """An 8-bit base (LoRA only, no DP); every design's records load and check (data.group, the random
        design's coins...); each cell's canary copies fit and its training records fit data.max_length."""
        check_quantized(ctx.study)
        check_training_records(ctx.study, ctx.study.cells(), ctx.cell_data, ctx.tokenizer())

    def damage(self, ctx: StudyContext, run_id: str) -> str | None:
        """A finished run whose cell.json, train.json or members.parquet cannot be read, or that lacks a file
        of its adapter (model) listed in train.json; with how to redo that cell. Its files are what every
        later stage reads, so this run is not repaired in place: its folder goes only when the user says so."""
        layout = ctx.layout
        run_dir = layout.run_dir(run_id)
        if not run_dir.is_dir():
            return None
        problems, records = [], {}
        for record, name in ((CellRecord, RunFile.CELL), (TrainRecord, RunFile.TRAIN)):
            try:
                records[name] = record.load(layout.run_file(run_id, name))
            except (OSError, ValueError) as exc:
                problems.append(str(exc))
        if why := unreadable(layout.run_file(run_id, RunFile.MEMBERS)):
            problems.append(f"{layout.run_file(run_id, RunFile.MEMBERS)} cannot be read ({why})")
        artifacts = records[RunFile.TRAIN].artifacts if RunFile.TRAIN in records else None
        if artifacts and (missing := missing_files(run_dir, artifacts)):
            problems.append(f"{run_dir}: {', '.join(missing)} missing (listed in train.json)")
        return f"{'; '.join(problems)}. {redo_cell_advice(run_dir)}" if problems else None

    def groups(self, ctx: StudyContext, run_ids: list[str]) -> list[list[str]]:
        """Cells sharing model and matrices, up to `train.together` per group (one per group when 1); the cells
        that train one at a time although `train.together` > 1 are named in the log, with why."""
        cells = [ctx.cells[r] for r in run_ids]
        return [[c.run_id(ctx.study) for c in group] for group in training_groups(ctx.study, cells, announce=True)]

    def run(self, ctx: StudyContext, cells: list[CellConfig]) -> None:
        progress = None if ctx.show_progress else training_progress(disable=True)
        for cell in cells:
            if damage := self.damage(ctx, cell.run_id(ctx.study)):
                raise CorruptArtifactError(damage)
        finetune_group(ctx.study, [(c, ctx.cell_data(c)) for c in cells], ctx.layout, ctx.tokenizer(),
                       progress=progress)

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
    done at once). Runs per cell like `finetune` (with `train.together` > 1, for all its cells at once: their
    recipes' references train `train.together` at a time); two Ray workers with cells of one recipe split its
    references between them (a lock per reference) rather than train one twice. Its cost: each reference's
    train.json, and this stage's time in the runs' timings.json."""

    name = "references"
    needs = ("finetune",)
    marker = "references/runs/<ref_run_id>/reference.json"  # shared by a recipe's runs: see done()
    batched = False
    switches = ("mia.enabled", "mia.references")

    def enabled(self, study: StudyConfig) -> bool:
        return study.mia.enabled and study.mia.references > 0

    def check(self, ctx: StudyContext) -> None:
        """A reference trains on half of its design's members and non-members: each must fit data.max_length."""
        for data in ctx.designs().values():
            records = population(data)
            tokenize_records(records.text.tolist(), ctx.tokenizer(), ctx.study.data.max_length,
                             records.sample_id.tolist())

    def damage(self, ctx: StudyContext, run_id: str) -> str | None:
        return None  # a reference whose reference.json is unreadable is not trained (is_trained): trained again

    def done(self, ctx: StudyContext, run_id: str) -> bool:
        """Every reference of the run's recipe is trained, on its records."""
        cell = ctx.cells.get(run_id)
        if cell is None:
            return False
        return all(is_trained(ctx.layout, ref_id, identity)
                   for ref_id, identity in reference_identities(ctx.study, cell, ctx.cell_data(cell)).items())

    def groups(self, ctx: StudyContext, run_ids: list[str]) -> list[list[str]]:
        """With `train.together` > 1, every cell at once: the references of all their recipes are grouped."""
        return [list(run_ids)] if ctx.study.train.together > 1 and run_ids else super().groups(ctx, run_ids)

    def run(self, ctx: StudyContext, cells: list[CellConfig]) -> None:
        progress = None if ctx.show_progress else training_progress(disable=True)
        train_references(ctx.study, cells, ctx.cell_data, ctx.layout, ctx.tokenizer(), progress=progress)

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
    result_stages = ("mia", "utility", AUDIT_STAGE, DATASET_STAGE)
    section = "mia"
    switches = ("mia.enabled",)
    brings = ("references",)  # `memlens attack mia` trains the references first when the study has them

    def enabled(self, study: StudyConfig) -> bool:
        return study.mia.enabled

    def check(self, ctx: StudyContext) -> None:
        check_attacks(ctx.study)
        check_membership_records(ctx)  # the bag-of-words check's folds

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
    switches = ("extraction.enabled",)

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
    """The enabled stages of `only` (all when None), with the stages each of them brings along, in order. A
    disabled stage asked for is said (a warning); when no stage asked for is enabled, a ConfigError."""
    if only is None:
        return enabled_stages(study)
    wanted = set(only) | {b for s in STAGES if s.name in only for b in s.brings}
    chosen = [s for s in enabled_stages(study) if s.name in wanted]
    for stage in (s for s in STAGES if s.name in only and not s.enabled(study)):
        switches = f" ({_settings(study, stage.switches)})" if stage.switches else ""
        said = f"{stage.name} is disabled in this study{switches}"
        if not any(s.name in only for s in chosen):
            raise ConfigError(f"{said}: nothing to run; turn it on in the study file or run another stage: "
                              f"{[s.name for s in enabled_stages(study)]}")
        log.warning("%s: not run", said)
    return chosen


def _settings(study: StudyConfig, fields: tuple[str, ...]) -> str:
    """`mia.enabled: True, mia.references: 0`: the values of these study fields."""
    return ", ".join(f"{path}: {reduce(getattr, path.split('.'), study)}" for path in fields)


def check_needs(ctx: StudyContext, stages: list[Stage], force: list[str] | tuple[str, ...] = ()) -> None:
    """Refuse a request (`--only`, `memlens attack mia`) that cannot run anywhere: a stage of it needs a stage
    left out of it that no cell has done (or that `force` redoes). Cells that have it done run; others wait."""
    chosen = {s.name for s in stages}
    for stage in stages:
        for need in (n for n in stage.needs if n not in chosen):
            needed = get_stage(need)
            if need in force or not any(needed.done(ctx, run_id) for run_id in ctx.cells):
                command = "memlens finetune STUDY" if need == "finetune" else f"memlens run STUDY --only {need}"
                raise ConfigError(f"{stage.name} needs {need}, which no cell of {ctx.layout.root} has done: run "
                                  f"`{command}` first (or `memlens run STUDY` for every stage)")


def repair_damaged(ctx: StudyContext, run_ids: list[str]) -> list[str]:
    """Make a stage pending again for the runs whose files of it are damaged (truncated, overwritten), so this
    run redoes it as after a kill; returns what was found. A damaged fine-tune is left alone (`redo_damaged`):
    its cell then fails, naming the files and how to redo it."""
    found = []
    for stage in enabled_stages(ctx.study):
        if not stage.redo_damaged:
            continue
        for run_id in run_ids:
            if damage := stage.damage(ctx, run_id):
                log.warning("%s", damage)
                stage.invalidate(ctx, [run_id])
                found.append(damage)
    return found


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
           "check_needs", "enabled_stages", "execute", "get_stage", "preparing", "repair_damaged", "selected_stages"]
