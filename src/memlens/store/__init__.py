"""Store stage: the experiment folder, atomic writes, result tables."""

from memlens.store.results import read_results, run_metadata, upsert_results
from memlens.store.layout import (
    RunFile,
    StudyFile,
    StudyLayout,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_text,
)

__all__ = [
    "read_results",
    "run_metadata",
    "upsert_results",
    "RunFile",
    "StudyFile",
    "StudyLayout",
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_parquet",
    "atomic_write_text",
]
