"""Damaged files of a study folder: named, with the one thing that repairs them.

A finished run records the SHA-256 of every file of its `adapter/` or `model/` folder in train.json; a
file that was truncated or changed afterwards (a full disk, a bad copy, an interrupted rsync) is then
named instead of failing deep inside safetensors. The other files memlens writes are checked for
readability only (:func:`unreadable`: a parquet footer, a JSON parse), cheap enough for every `status`:
the study-level merged files are rebuilt from the runs' own files (:func:`discard_damaged_study_files`),
a stage whose per-run file is unreadable is redone, and a damaged fine-tune names how to redo its cell
(:func:`redo_cell_advice`)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from memlens.config import ConfigError
from memlens.store.layout import StudyFile, StudyLayout

log = logging.getLogger(__name__)

# The study-level files rebuilt from the runs' own files (the stages' merges) or from the data
# (membership.parquet) at every `memlens run`: an unreadable one is removed and written again.
REBUILT_FILES = (StudyFile.RESULTS, StudyFile.MIA_SCORES, StudyFile.EXTRACTION, StudyFile.EXPOSURE,
                 StudyFile.MEMBERSHIP)


class CorruptArtifactError(ConfigError):
    """A file of a study folder is damaged: it does not match the checksum recorded when it was written,
    or it cannot be read at all."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digest_files(root: Path, folder: str) -> dict[str, str]:
    """`<folder>/<file>` -> SHA-256 for every file under `root/folder`."""
    root = Path(root)
    return {str(p.relative_to(root)): _sha256(p) for p in sorted((root / folder).rglob("*")) if p.is_file()}


def redo_cell_advice(run_dir: Path) -> str:
    """How to redo one fine-tuned run whose files are damaged (the one cell is retrained, nothing else)."""
    return (f"Redo this cell's fine-tune: remove it (`rm -r {run_dir}`) and run the same command again (only that "
            "cell is retrained), or `memlens run STUDY --force finetune` to redo every cell.")


def verify_files(root: Path, digests: dict[str, str]) -> None:
    """Raise :class:`CorruptArtifactError` naming each file under `root` that is missing or differs."""
    root = Path(root)
    damaged = [name for name, expected in digests.items()
               if not (root / name).is_file() or _sha256(root / name) != expected]
    if damaged:
        raise CorruptArtifactError(
            f"{root}: {', '.join(damaged)} changed since the run was saved (checksum in train.json differs or the "
            f"file is missing). {redo_cell_advice(root)}")


def missing_files(root: Path, digests: dict[str, str]) -> list[str]:
    """The files of `digests` (train.json's artifacts) absent under `root`: a check without hashing."""
    return [name for name in digests if not (Path(root) / name).is_file()]


def unreadable(path: Path) -> str | None:
    """Why the file `path` cannot be read as its suffix says, or None when it reads or does not exist.
    `.parquet`: its footer (metadata only, no data read), `.json`: the JSON text. It catches a truncated,
    emptied or overwritten file, not every flipped bit inside one."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        if path.suffix == ".parquet":
            pq.read_metadata(path)
        elif path.suffix == ".json":
            json.loads(path.read_bytes())
    except (OSError, ValueError, pa.ArrowException) as exc:
        reason = str(exc).split(f"'{path}': ", 1)[-1]  # pyarrow repeats the path
        return f"{type(exc).__name__}: {reason}"
    return None


def rebuilt_file_message(layout: StudyLayout, path: Path, reason: str) -> str:
    """What to say of an unreadable study-level file that `memlens run` rebuilds."""
    return (f"{path} cannot be read ({reason}); it only gathers the runs' own files, and `memlens run` on this "
            f"folder rebuilds it from them (`memlens run STUDY --out {layout.root}`, STUDY the study file you ran "
            f"or {layout.study_file})")


def damaged_study_files(layout: StudyLayout) -> dict[Path, str]:
    """The study-level files `memlens run` rebuilds (:data:`REBUILT_FILES`) that cannot be read, with why."""
    found = {}
    for name in REBUILT_FILES:
        path = layout.study_level(name)
        reason = unreadable(path)
        if reason:
            found[path] = reason
    return found


def read_study_parquet(layout: StudyLayout, path: Path) -> pd.DataFrame | None:
    """A study-level parquet file as a frame (None when absent); an unreadable one is a
    :class:`CorruptArtifactError` saying that `memlens run` rebuilds it."""
    if not path.exists():
        return None
    reason = unreadable(path)
    if reason:
        raise CorruptArtifactError(rebuilt_file_message(layout, path, reason))
    return pd.read_parquet(path)


def discard_damaged_study_files(layout: StudyLayout) -> list[Path]:
    """Remove the unreadable rebuilt study-level files (the caller holds the study lock), so the stages'
    merges write them again from the runs' own files; returns those removed."""
    removed = []
    for path, reason in damaged_study_files(layout).items():
        log.warning("%s cannot be read (%s): removed; it is rebuilt from the runs' own files", path, reason)
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


__all__ = ["REBUILT_FILES", "CorruptArtifactError", "damaged_study_files", "digest_files",
           "discard_damaged_study_files", "missing_files", "read_study_parquet", "rebuilt_file_message",
           "redo_cell_advice", "unreadable", "verify_files"]
