"""The store layer: the experiment folder, atomic writes, result tables."""

from memlens.store.layout import (
    RunFile,
    StudyFile,
    StudyLayout,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_text,
    read_cache,
)
from memlens.store.results import RUN_COLUMNS, read_results, run_metadata, upsert_results, with_current_names

__all__ = [
    "RUN_COLUMNS",
    "read_results",
    "run_metadata",
    "upsert_results",
    "with_current_names",
    "RunFile",
    "StudyFile",
    "StudyLayout",
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_parquet",
    "atomic_write_text",
    "read_cache",
]
