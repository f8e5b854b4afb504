"""Checksums of the artifacts a run saves (adapter or model weights), checked before they are used.

A finished run records the SHA-256 of every file of its `adapter/` or `model/` folder in train.json; a
file that was truncated or changed afterwards (a full disk, a bad copy, an interrupted rsync) is then
named instead of failing deep inside safetensors."""

from __future__ import annotations

import hashlib
from pathlib import Path

from memlens.config import ConfigError


class CorruptArtifactError(ConfigError):
    """A saved artifact does not match the checksum recorded when it was written."""


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


def verify_files(root: Path, digests: dict[str, str]) -> None:
    """Raise :class:`CorruptArtifactError` naming each file under `root` that is missing or differs."""
    root = Path(root)
    damaged = [name for name, expected in digests.items()
               if not (root / name).is_file() or _sha256(root / name) != expected]
    if damaged:
        raise CorruptArtifactError(
            f"{root}: {', '.join(damaged)} changed since the run was saved (checksum in train.json differs or the "
            f"file is missing). Redo this cell's fine-tune: remove {root} and run the same command again (only "
            "that cell is retrained), or `memlens run STUDY --force finetune` to redo every cell.")


__all__ = ["CorruptArtifactError", "digest_files", "verify_files"]
