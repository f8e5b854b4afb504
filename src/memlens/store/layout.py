"""The experiment folder and the write discipline that keeps it consistent after a kill.

Layout of `<out>/`:

    study.yaml                 fully resolved config
    environment.json           package versions, device, git commit
    runs/<run_id>/             one grid cell, present only when complete (built in a temp dir, renamed)
        cell.json              the cell's config and everything its run_id hashes
        adapter/ | model/      LoRA adapter (PEFT, safetensors) or full fine-tuned model
        train.json             parameter counts, loss curve, wall time, seed, data hash, canary
        members.parquet        distinct member records trained on (sample_id, text, is_canary)
        audit_canaries.parquet designed canaries and their coins (`dp.audit_canaries`; inserted where is_member)
    cache/                     per-(model, adapter, data) score caches
    references/                reference adapters of LiRA / RMIA (`mia.references`), a study folder of their own:
        runs/<ref_run_id>/     a fine-tuned run as above, plus reference.json and ref-scores-*.parquet
        .locks/                one lock file per reference (two workers never train the same one)
    audit_canaries.parquet     the designed canaries and coins of the study's runs, by design (`dp.audit_canaries`)
    mia_scores.parquet, extraction.parquet, exposure.parquet, results.parquet
    canary_scores.parquet      an audit folder (`memlens audit`): its canaries' scores, inserted and held out
    report/

Every file is written to a temporary name in the same folder and renamed: a reader sees the old
file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pydantic import ValidationError

from memlens.config import ConfigError, StudyConfig, format_validation_error
from memlens.config.loading import read_yaml_file

log = logging.getLogger(__name__)


class RunFile:
    """Names of the files and folders inside `runs/<run_id>/` (every module uses these, none spells them)."""

    CELL = "cell.json"                      # the cell and everything its run_id hashes
    TRAIN = "train.json"                    # parameter counts, loss curve, wall time, canary, DP
    MEMBERS = "members.parquet"             # distinct member records trained on
    STUDY = "study.yaml"                    # the study as the run saw it
    ADAPTER = "adapter"                     # LoRA adapter (PEFT, safetensors)
    FULL_MODEL = "model"                    # full fine-tuned model (safetensors)
    TIMINGS = "timings.json"                # wall seconds of each completed stage
    AUDIT_CANARIES = "audit_canaries.parquet"  # designed canaries trained with (is_member) or held out
    MIA_SCORES = "mia_scores.parquet"
    CANARY_SCORES = "canary_scores.parquet"    # the designed canaries' scores under every attack
    MIA_RESULTS = "mia_results.parquet"
    EXTRACTION = "extraction.parquet"
    EXTRACTION_RESULTS = "extraction_results.parquet"
    EXPOSURE = "exposure.parquet"
    REFERENCE = "reference.json"            # reference adapters only: index, seed and IN records of the draw

    @staticmethod
    def reference_scores(settings: str, texts: str = "*") -> str:
        """A reference adapter's cached per-record statistics: scoring settings' hash, then the texts' hash
        (`*`: a glob over every file of those settings)."""
        return f"ref-scores-{settings}-{texts}.parquet"


class StudyFile:
    """Names of the study-level files and folders of `<out>/`."""

    STUDY = "study.yaml"
    ENVIRONMENT = "environment.json"
    RESULTS = "results.parquet"
    HISTORY = "history.jsonl"
    MEMBERSHIP = "membership.parquet"  # the random design's coins: who is a member, by which coin
    AUDIT_CANARIES = "audit_canaries.parquet"  # the designed canaries and their coins (dp.audit_canaries)
    MIA_SCORES = "mia_scores.parquet"
    CANARY_SCORES = "canary_scores.parquet"  # designed canaries' (or an audit's canaries') scores under every attack
    EXTRACTION = "extraction.parquet"
    EXPOSURE = "exposure.parquet"
    RUNS = "runs"
    STATUS = "status"
    CACHE = "cache"
    REFERENCES = "references"  # reference adapters (LiRA / RMIA): a study folder of their own
    LOCKS = ".locks"
    REPORT = "report"
    LOCK = ".memlens.lock"
    WRITE_LOCK = ".write.lock"
    SHARED_CHECK = ".memlens-ray-check"  # a cluster driver's token: every node must read it (shared folder)
    # an audit folder (`memlens audit`): one measured model instead of a study's grid
    AUDIT = "audit.yaml"               # the audit's configuration, as given (`memlens audit audit.yaml` reruns it)
    AUDIT_RECORD = "audit.json"        # what the audit resolved and measured (target, base, records, settings)
    MODEL_CARD = "model-card.md"       # the "Privacy evaluation" section for the model's README


@dataclass(frozen=True)
class StudyLayout:
    """Where every file of a study folder lives: the one place that names them."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ----------------------------------------------------------------------------- study level
    @property
    def runs(self) -> Path:
        return self.root / StudyFile.RUNS

    @property
    def cache(self) -> Path:
        return self.root / StudyFile.CACHE

    @property
    def report(self) -> Path:
        return self.root / StudyFile.REPORT

    @property
    def status_dir(self) -> Path:
        return self.root / StudyFile.STATUS

    @property
    def study_file(self) -> Path:
        return self.root / StudyFile.STUDY

    @property
    def environment_file(self) -> Path:
        return self.root / StudyFile.ENVIRONMENT

    @property
    def results_file(self) -> Path:
        return self.root / StudyFile.RESULTS

    @property
    def history_file(self) -> Path:
        return self.root / StudyFile.HISTORY

    @property
    def membership_file(self) -> Path:
        return self.root / StudyFile.MEMBERSHIP

    @property
    def audit_file(self) -> Path:
        return self.root / StudyFile.AUDIT

    @property
    def is_audit(self) -> bool:
        """Whether the folder holds an audit (`memlens audit`) rather than a study."""
        return (self.root / StudyFile.AUDIT_RECORD).exists()

    def read_study(self) -> StudyConfig:
        """The study this folder holds (`study.yaml`, as written: floats stay floats, so run ids hash the same);
        a folder without one is a ConfigError saying so. The one reader of the study file."""
        if not self.study_file.exists():
            raise ConfigError(f"{self.root}: not a memlens study folder (no {StudyFile.STUDY})")
        document = read_yaml_file(self.study_file, StudyFile.STUDY, "; memlens writes this file itself: restore it "
                                  "from the study file you ran, or start a new --out")
        try:
            return StudyConfig.model_validate(document or {})
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, str(self.study_file))) from None

    def study_level(self, name: str) -> Path:
        """A study-level file by its :class:`StudyFile` name (e.g. the merged `mia_scores.parquet`)."""
        return self.root / name

    def status_file(self, run_id: str) -> Path:
        return self.status_dir / f"{run_id}.json"

    @property
    def references(self) -> StudyLayout:
        """The layout of the study's reference adapters (`<out>/references/`, runs in its `runs/`)."""
        return StudyLayout(self.root / StudyFile.REFERENCES)

    def lock_file(self, name: str) -> Path:
        """`.locks/<name>.lock`: a lock file for one unit of work (e.g. training one reference adapter)."""
        return self.root / StudyFile.LOCKS / f"{name}.lock"

    # ----------------------------------------------------------------------------- run level
    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id

    def run_file(self, run_id: str, name: str) -> Path:
        """A file of `runs/<run_id>/` by its :class:`RunFile` name."""
        return self.run_dir(run_id) / name

    def finished_runs(self) -> list[str]:
        """run_ids whose folder is complete (temp folders start with a dot and are ignored)."""
        if not self.runs.is_dir():
            return []
        return sorted(p.name for p in self.runs.iterdir() if p.is_dir() and not p.name.startswith("."))

    def runs_with(self, name: str) -> list[str]:
        """Finished runs that have the per-run file `name`."""
        return [r for r in self.finished_runs() if self.run_file(r, name).exists()]

    def pending_runs(self, marker: str, run_ids: list[str] | None = None, force: bool = False) -> list[str]:
        """Finished runs (all, or those of `run_ids`) whose per-run stage file `marker` is missing
        (every one of them when `force`). Unknown or unfinished `run_ids` are an error naming them."""
        finished = self.finished_runs()
        if run_ids is not None:
            unknown = [r for r in run_ids if r not in finished]
            if unknown:
                raise ConfigError(f"run_ids: no finished run {unknown} in {self.runs}; finished: {finished}")
            finished = list(run_ids)
        return [r for r in finished if force or not self.run_file(r, marker).exists()]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process umask (read by setting it, as POSIX offers no other way, and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _share_like_open(fd_or_path, directory: bool = False) -> None:
    """Give a temp file (0600) or folder (0700) the mode a plain open()/mkdir() would: 0666/0777 less the
    umask, so a study folder shared with a group (umask 002) is readable by the group."""
    mode = (0o777 if directory else 0o666) & ~_umask()
    if isinstance(fd_or_path, int):
        os.fchmod(fd_or_path, mode)
    else:
        os.chmod(fd_or_path, mode)


def read_cache(path: Path, reader):
    """`reader(path)` of a cache file (something memlens can always compute again), or None when it is missing or
    unreadable (a truncated copy, a full disk): an unreadable one is removed and named in a warning, and the
    caller computes it again."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return reader(path)
    except Exception as exc:  # any reader's failure on a damaged file: the cache is only ever a shortcut
        log.warning("%s: unreadable cache file (%s: %s); removed, computed again", path, type(exc).__name__, exc)
        path.unlink(missing_ok=True)
        return None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _share_like_open(fd)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _share_like_open(fd)
    finally:
        os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed to `final` (replacing nothing: a
    finished `final` must not exist). On failure or kill the temp folder is left as `.<name>.tmp-*`,
    ignored by readers and removed by the next attempt."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    _share_like_open(tmp, directory=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
