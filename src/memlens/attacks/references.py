"""Reference adapters of LiRA and RMIA: trained once per recipe, shared by every cell with that recipe.

`mia.references: K` fine-tunes K reference adapters per distinct *recipe* (everything that determines a
fine-tune but the target's seed and canary copies: method, matrices, rank, training, LoRA and DP settings,
model, data and membership design). Reference k of the recipe of cell `c`:

- is `finetune_cell` unchanged, run for ``c.model_copy(update={"seed": REF_SEED + k, "canary_copies": 1})``
  under the study with a plain canary (``CanaryConfig(mode="repeat")``: one copy of a repeated record leaves
  the training set as it is, and no secret is inserted), so it trains with the cell's own recipe (with
  `train.together` > 1, up to that many references train together, each as it would alone:
  :mod:`memlens.train.together`);
- trains on its IN half of the *population*, the records of the cell's membership experiment (members and
  non-members of its design; an inserted canary is not among them): a fair coin per record, seeded by
  REF_SEED + k (:func:`memlens.data.designs.coin`), independent of the target's membership. Every
  record is IN for about half of the references and OUT for the rest. When the design's coins are per
  document group (`data.membership_unit`, or `data.group` set), so are the references': they are drawn as
  the target's members were;
- lives in ``<out>/references/runs/<ref run_id>/`` (``StudyLayout.references``), never among the targets,
  with ``reference.json`` (:class:`~memlens.store.records.ReferenceRecord`, written last) and its IN records
  in ``members.parquet``.

Its run_id hashes what the cell's does with the seed replaced by REF_SEED + k and the copies by 1, so two
cells that differ only in seed or canary copies share their references, and a change of recipe (rank,
matrices, epochs, DP...) gives new run_ids: new references. A folder is complete or absent (atomic rename),
so training resumes after a kill; its cost is its `train.json` (`wall_time_s`) and the `references` stage's
wall time in the runs' `timings.json`.

Concurrency: the references stage runs per cell (per group of cells with `train.together`), so two Ray workers
with cells of one recipe would train the same references. Training a reference holds its lock file
(``<out>/references/.locks/<id>.lock``, POSIX `flock`, released by the kernel if the worker dies; a group of
references holds each one's): a worker skips the references another one is training, trains the others, then
waits for the rest. Without the lock two workers would train the same adapter twice
and, worse, `atomic_dir` of the second would delete the first's temporary folder while it is being written.

Scoring (:class:`ReferenceStatistics`): each reference adapter is attached to the membership stage's base
model (adapter swap) and scores records once; the per-record mean token log-likelihoods are cached in its
folder (``ref-scores-<settings>-<texts>.parquet``, keyed by text hash), so cells sharing a recipe score
each reference once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import Progress

from memlens.config import CanaryConfig, CellConfig, ConfigError, StudyConfig, stable_hash
from memlens.data import StudyData
from memlens.data.designs import coin
from memlens.models.fingerprint import weights_fingerprint
from memlens.store import RunFile, StudyLayout, atomic_write_parquet, read_cache
from memlens.store.integrity import unreadable
from memlens.store.records import ReferenceRecord, TrainRecord
from memlens.train import read_members
from memlens.train.together import finetune_group, training_groups

log = logging.getLogger(__name__)

# Seed of reference k: REF_SEED + k, for its training and for its coins. Large, so that it is not a grid
# seed; the references live in their own folder anyway.
REF_SEED = 10_000
SCORES_VERSION = 1


# ------------------------------------------------------------------------------------- recipe
def reference_study(study: StudyConfig) -> StudyConfig:
    """The study a reference is trained under: the target's, with a plain canary (no secret inserted)."""
    return study.model_copy(update={"canary": CanaryConfig(mode="repeat")})


def reference_cell(cell: CellConfig, k: int) -> CellConfig:
    """The k-th reference of `cell`'s recipe: its seed REF_SEED + k, one canary copy (no repetition)."""
    return cell.model_copy(update={"seed": REF_SEED + k, "canary_copies": 1})


def reference_ids(study: StudyConfig, cell: CellConfig) -> list[str]:
    """The run_ids of the `mia.references` references of `cell`'s recipe (empty when off)."""
    ref_study = reference_study(study)
    return [reference_cell(cell, k).run_id(ref_study) for k in range(study.mia.references)]


def population(data: StudyData) -> pd.DataFrame:
    """The records of a membership experiment: its members and non-members (no canary)."""
    return pd.concat([data.members, data.non_members], ignore_index=True)


def coin_unit(study: StudyConfig, records: pd.DataFrame) -> str:
    """What one reference coin assigns: a document group when the study's coins are per group, else a record."""
    return "group" if study.data.coin_unit == "group" and "group" in records else "record"


def _coin_keys(records: pd.DataFrame, unit: str) -> pd.Series:
    """What each record's reference coin is flipped on: its document group, or its sample id."""
    return records["group"] if unit == "group" else records["sample_id"]


def reference_data(study: StudyConfig, data: StudyData, k: int) -> tuple[StudyData, ReferenceRecord]:
    """The k-th reference's records (members: its IN half; non-members: the OUT half), each side in the order of its
    texts (a reference is a function of its records, not of their order in the files), and its record (without run_id
    and wall time)."""
    records = population(data)
    unit = coin_unit(study, records)
    heads = coin(REF_SEED + k, _coin_keys(records, unit))
    if heads.all() or not heads.any():
        raise ConfigError(f"mia.references: reference {k}'s coin put all {len(records)} records on one side; the "
                          "membership experiment needs more records (data.subset)")

    def side(mask: np.ndarray) -> pd.DataFrame:
        """The records of `mask` (records,), sorted by text."""
        return records[mask].sort_values("text", kind="stable").reset_index(drop=True)

    ref = StudyData(members=side(heads), non_members=side(~heads), utility=data.utility, design=data.design)
    record = ReferenceRecord(run_id="", index=k, seed=REF_SEED + k, unit=unit, n_in=int(heads.sum()),
                             n_population=len(records), population_hash=population_hash(data))
    return ref, record


def population_hash(data: StudyData) -> str:
    """A hash of a membership experiment's texts, in any order (the reference's record keeps it)."""
    return stable_hash(sorted(population(data).text.tolist()))[:16]


def reference_identity(study: StudyConfig, cell: CellConfig, data: StudyData, k: int) -> str:
    """Everything the k-th reference of `cell`'s recipe on `data`'s records depends on: the records (each text with
    the key its coin is flipped on, in any order), the coin unit (per record or per document group), the recipe it is
    trained with (the determinants of its run id: model, data, training, LoRA and DP settings) and the base weights'
    content fingerprint (:func:`~memlens.models.fingerprint.weights_fingerprint`). A reference whose identity differs
    (other records, another `--group`, another recipe, a base model changed under the same path) is stale: trained
    again, never read. Records reordered give the same identity, and the same reference (:func:`reference_data`)."""
    records = population(data)
    unit = coin_unit(study, records)
    ref_study = reference_study(study)
    return stable_hash({"records": sorted(zip(records.text, _coin_keys(records, unit).astype(str))), "unit": unit,
                        "recipe": reference_cell(cell, k).determinants(ref_study),
                        "base": weights_fingerprint(study.model.name_or_path)})[:16]


def reference_identities(study: StudyConfig, cell: CellConfig, data: StudyData) -> dict[str, str]:
    """ref run_id -> :func:`reference_identity` of each reference of `cell`'s recipe on `data`'s records."""
    return {ref_id: reference_identity(study, cell, data, k) for k, ref_id in enumerate(reference_ids(study, cell))}


# ------------------------------------------------------------------------------------- training
def is_trained(layout: StudyLayout, ref_id: str, identity: str | None = None) -> bool:
    """Whether the reference `ref_id` is complete (its reference.json is written last, and reads: a damaged one is
    written again from the reference's train.json by the next `memlens run`) and, given `identity` (its
    :func:`reference_identity`), trained on those records with that recipe on those base weights."""
    path = layout.references.run_file(ref_id, RunFile.REFERENCE)
    if not path.exists() or unreadable(path) is not None:
        return False
    if identity is None:
        return True
    record = ReferenceRecord.read(path)
    return record is not None and record.identity == identity


def _remove(layout: StudyLayout, ref_id: str) -> None:
    """Delete a reference's folder (renamed to a temp name first: atomic); the caller holds its lock."""
    final = layout.references.run_dir(ref_id)
    if final.is_dir():
        trash = final.parent / f".{ref_id}.tmp-forced"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _lock(path: Path, blocking: bool) -> Iterator[bool]:
    """An exclusive flock on `path`; yields whether it was taken (always, when `blocking`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def train_reference(study: StudyConfig, cell: CellConfig, k: int, data: StudyData, layout: StudyLayout,
                    tokenizer=None, progress: Progress | None = None) -> Path:
    """Train the k-th reference of `cell`'s recipe (the caller holds its lock); returns its folder."""
    return train_reference_group(study, [(cell, k)], lambda cell: data, layout, tokenizer, progress)[0]


def train_reference_group(study: StudyConfig, members: Sequence[tuple[CellConfig, int]],
                          data_of: Callable[[CellConfig], StudyData], layout: StudyLayout, tokenizer=None,
                          progress: Progress | None = None) -> list[Path]:
    """Train the references `(cell, k)` of `members` together (`train.together`; the caller holds their locks);
    returns their folders, each with its reference.json."""
    ref_study = reference_study(study)
    drawn = [(reference_cell(cell, k), *reference_data(study, data_of(cell), k)) for cell, k in members]
    identities = [reference_identity(study, cell, data_of(cell), k) for cell, k in members]
    run_dirs = finetune_group(ref_study, [(ref_cell, ref_data) for ref_cell, ref_data, _ in drawn],
                              layout.references, tokenizer, progress=progress)
    for run_dir, (_, _, record), identity in zip(run_dirs, drawn, identities):
        train = TrainRecord.load(run_dir / RunFile.TRAIN)
        record = record.model_copy(update={"run_id": run_dir.name, "wall_time_s": train.wall_time_s,
                                           "identity": identity})
        ReferenceRecord.model_validate(record.model_dump()).save(run_dir / RunFile.REFERENCE)
    return run_dirs


def _claimable(study: StudyConfig, todo: dict[str, tuple[CellConfig, int]], announce: bool = False) -> list[list[str]]:
    """The references left, in the groups they train in (`train.together`; one by one when 1). `announce`: log
    those that train one at a time although `train.together` > 1."""
    ref_study = reference_study(study)
    ref_cells = [reference_cell(cell, k) for cell, k in todo.values()]
    return [[c.run_id(ref_study) for c in group] for group in training_groups(ref_study, ref_cells, announce=announce)]


def train_references(study: StudyConfig, cells: Sequence[CellConfig], data_of: Callable[[CellConfig], StudyData],
                     layout: StudyLayout, tokenizer=None, progress: Progress | None = None,
                     wait_s: float = 1.0) -> list[str]:
    """Train the missing references of `cells`' recipes; returns the run_ids of those this call trained.

    `data_of(cell)` gives a cell's records (its design in its record draw). References of recipes sharing the adapted
    matrices train together, `train.together` at a time. A reference another process is training (its lock is
    held) is skipped while others remain, then waited for."""
    todo: dict[str, tuple[CellConfig, int]] = {}
    wanted: dict[str, str] = {}  # ref_id -> the identity it must have (records, unit, recipe, base weights)
    for cell in cells:
        for k, (ref_id, expected) in enumerate(reference_identities(study, cell, data_of(cell)).items()):
            wanted[ref_id] = expected
            if not is_trained(layout, ref_id, expected):
                todo.setdefault(ref_id, (cell, k))
    trained: list[str] = []
    announce = True
    while todo:
        progressed = False
        for group in _claimable(study, todo, announce):
            with contextlib.ExitStack() as locks:
                claimed = [r for r in group
                           if locks.enter_context(_lock(layout.references.lock_file(r), blocking=False))]
                fresh = [r for r in claimed if not is_trained(layout, r, wanted[r])]
                for ref_id in fresh:
                    if is_trained(layout, ref_id):  # trained on other records or weights: never read, trained again
                        log.warning("reference %s was trained on other records, coin unit or base weights than this "
                                    "run's (identity %s): training it again", ref_id, wanted[ref_id])
                    _remove(layout, ref_id)
                if len(fresh) == 1:  # alone (train.together 1, DP, full fine-tuning...) or the last of a group
                    cell, k = todo[fresh[0]]
                    train_reference(study, cell, k, data_of(cell), layout, tokenizer, progress)
                elif fresh:
                    train_reference_group(study, [todo[r] for r in fresh], data_of, layout, tokenizer, progress)
                trained.extend(fresh)
                for ref_id in claimed:
                    del todo[ref_id]
                    progressed = True
        announce = False
        if todo and not progressed:  # every one left is being trained elsewhere: wait for one of them
            ref_id = next(iter(todo))
            log.info("waiting for reference %s, trained by another process", ref_id)
            with _lock(layout.references.lock_file(ref_id), blocking=True):
                pass
            time.sleep(0 if is_trained(layout, ref_id) else wait_s)
    return trained


def remove_references(study: StudyConfig, cells: Sequence[CellConfig], layout: StudyLayout) -> list[str]:
    """Delete the references of `cells`' recipes (`--force references`); returns the run_ids removed."""
    removed = []
    for ref_id in dict.fromkeys(r for c in cells for r in reference_ids(study, c)):
        if layout.references.run_dir(ref_id).is_dir():
            with _lock(layout.references.lock_file(ref_id), blocking=True):
                _remove(layout, ref_id)
            removed.append(ref_id)
    return removed


# ------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class Reference:
    """A trained reference adapter, as the membership stage uses it."""

    run_id: str
    run_dir: Path
    index: int
    in_texts: frozenset[str]  # the texts it was trained on (its members.parquet)
    artifacts: str            # hash of its adapter files' checksums (part of its scores' cache key)


def load_references(study: StudyConfig, cell: CellConfig, layout: StudyLayout, data: StudyData,
                    run_id: str = "") -> list[Reference]:
    """The trained references of `cell`'s recipe on `data`'s records; a missing one, or one trained on other
    records, is an error saying how to train it."""
    refs = []
    for ref_id, expected in reference_identities(study, cell, data).items():
        run_dir = layout.references.run_dir(ref_id)
        if not is_trained(layout, ref_id):
            raise RuntimeError(f"reference adapter {ref_id} of run {run_id or cell.run_id(study)} is not trained "
                               f"({run_dir}); the `references` stage trains it: memlens run (or --only references)")
        record = ReferenceRecord.load(run_dir / RunFile.REFERENCE)
        if record.identity != expected:
            raise RuntimeError(f"reference adapter {ref_id} of run {run_id or cell.run_id(study)} was trained on other "
                               f"records, coin unit or base weights (identity {record.identity}, these {expected}); "
                               "the `references` stage trains it again: memlens run (or --only references)")
        train = TrainRecord.load(run_dir / RunFile.TRAIN)
        refs.append(Reference(ref_id, run_dir, record.index, frozenset(read_members(run_dir).text),
                              stable_hash(train.artifacts or {})[:16]))
    return refs


def in_matrix(refs: Sequence[Reference], texts: Sequence[str]) -> np.ndarray:
    """(records, references): whether each record was in each reference's training half."""
    return np.array([[t in ref.in_texts for ref in refs] for t in texts], dtype=bool).reshape(len(texts), len(refs))


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class ReferenceStatistics:
    """Per reference adapter, the mean token log-likelihood of records, computed once and cached in its folder.

    `score(ref, texts)` computes the statistic of `texts` under `ref` (the membership stage attaches the
    adapter to its base model); `settings` (scoring settings, model fingerprint) are part of the cache key. Cache files
    hold (text_key, mean_ll) rows (text_key: SHA-256 of the text); every file of the same settings is read, and texts
    not found are scored together and written to a new file (atomic; concurrent workers at worst score the same texts
    twice)."""

    def __init__(self, score: Callable[[Reference, list[str]], np.ndarray], settings: dict):
        self.score = score
        self.settings = settings
        self.passes = 0  # reference passes computed (not read from the cache)
        self._known: dict[str, dict[str, float]] = {}

    def _settings_key(self, ref: Reference) -> str:
        return stable_hash({**self.settings, "artifacts": ref.artifacts, "version": SCORES_VERSION})[:16]

    def _load(self, ref: Reference) -> dict[str, float]:
        if ref.run_id not in self._known:
            known: dict[str, float] = {}
            for path in sorted(ref.run_dir.glob(RunFile.reference_scores(self._settings_key(ref)))):
                frame = read_cache(path, pd.read_parquet)
                if frame is None:
                    continue
                known.update(zip(frame.text_key, frame.mean_ll.astype(float)))
            self._known[ref.run_id] = known
        return self._known[ref.run_id]

    def values(self, ref: Reference, texts: Sequence[str], also: Sequence[str] = ()) -> np.ndarray:
        """The statistic of each of `texts` under `ref`; texts not cached yet are scored in one pass together
        with those of `also` not cached (e.g. the whole population, so later runs find them)."""
        known = self._load(ref)
        keys = [_text_key(t) for t in texts]
        missing = {k: t for k, t in zip(keys, texts) if k not in known}
        if missing:
            missing.update({k: t for k, t in ((_text_key(t), t) for t in also) if k not in known})
            batch = list(missing.values())
            values = np.asarray(self.score(ref, batch), dtype=np.float64)
            self.passes += 1
            frame = pd.DataFrame({"text_key": list(missing), "mean_ll": values})
            name = RunFile.reference_scores(self._settings_key(ref), stable_hash(sorted(missing))[:16])
            atomic_write_parquet(ref.run_dir / name, frame)
            known.update(zip(frame.text_key, values))
        return np.array([known[k] for k in keys], dtype=np.float64)

    def matrix(self, refs: Sequence[Reference], texts: Sequence[str], also: Sequence[str] = ()) -> np.ndarray:
        """(records, references) statistics of `texts`."""
        columns = [self.values(ref, texts, also) for ref in refs]
        return np.column_stack(columns) if columns else np.zeros((len(texts), 0))


__all__ = ["REF_SEED", "Reference", "ReferenceStatistics", "coin_unit", "in_matrix", "is_trained", "load_references",
           "population", "population_hash", "reference_cell", "reference_data", "reference_identities",
           "reference_identity", "reference_ids", "reference_study", "remove_references", "train_reference",
           "train_reference_group", "train_references"]
