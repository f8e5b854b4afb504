"""Read a text dataset from the hub, a folder of split files, or one file with a split column."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from memlens.config import ConfigError, DataConfig, stable_hash

log = logging.getLogger(__name__)

_READERS = {
    ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
    ".json": lambda p: pd.read_json(p, lines=True, dtype=False),
    ".csv": lambda p: pd.read_csv(p, dtype=str, keep_default_na=False),
    ".parquet": pd.read_parquet,
}


@dataclass
class StudyData:
    """The splits of a study as frames with columns `sample_id`, `text`."""

    members: pd.DataFrame
    non_members: pd.DataFrame
    utility: pd.DataFrame | None
    report: list[str] = field(default_factory=list)  # validation findings, for the run log and the report

    @property
    def data_hash(self) -> str:
        parts = [self.members.text.tolist(), self.non_members.text.tolist()]
        return stable_hash(parts)[:16]


def _read_file(path: Path) -> pd.DataFrame:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(f"data.source: cannot read {path}; supported: {sorted(_READERS)}")
    return reader(path)


def _load_raw_splits(cfg: DataConfig, wanted: list[str]) -> dict[str, pd.DataFrame]:
    source = Path(cfg.source)
    fmt = cfg.format
    if fmt == "auto":
        fmt = "folder" if source.is_dir() else "file" if source.is_file() else "hub"
    if fmt == "folder":
        if not source.is_dir():
            raise ConfigError(f"data.source: folder {source} does not exist")
        splits = {}
        for name in wanted:
            files = [source / f"{name}{ext}" for ext in _READERS if (source / f"{name}{ext}").exists()]
            if not files:
                present = sorted({p.stem for p in source.iterdir() if p.suffix in _READERS})
                raise ConfigError(f"data: split {name!r} not found in {source}; splits present: {present}")
            splits[name] = _read_file(files[0])
        return splits
    if fmt == "file":
        if not source.is_file():
            raise ConfigError(f"data.source: file {source} does not exist")
        frame = _read_file(source)
        if cfg.split_field not in frame.columns:
            raise ConfigError(f"data.split_field: column {cfg.split_field!r} not in {source}; "
                              f"columns: {list(frame.columns)}")
        present = sorted(frame[cfg.split_field].astype(str).unique())
        out = {}
        for name in wanted:
            if name not in present:
                raise ConfigError(f"data: split {name!r} not in column {cfg.split_field!r}; values: {present}")
            out[name] = frame[frame[cfg.split_field].astype(str) == name].reset_index(drop=True)
        return out
    # hub: `datasets` honours HF_HUB_OFFLINE and HF_TOKEN from the environment (never logged here).
    import datasets

    try:
        dd = datasets.load_dataset(cfg.source, revision=cfg.revision)
    except Exception as exc:  # the hub error is kept as the cause
        raise ConfigError(f"data.source: could not load {cfg.source!r} from the hub or as a path ({exc})") from exc
    missing = [n for n in wanted if n not in dd]
    if missing:
        raise ConfigError(f"data: split(s) {missing} not in {cfg.source}; splits: {sorted(dd)}")
    return {n: dd[n].to_pandas() for n in wanted}


def _normalise(frame: pd.DataFrame, cfg: DataConfig, split: str) -> pd.DataFrame:
    if cfg.text_field not in frame.columns:
        raise ConfigError(f"data.text_field: column {cfg.text_field!r} not in split {split!r}; "
                          f"columns: {list(frame.columns)}")
    if cfg.id_field is not None and cfg.id_field not in frame.columns:
        raise ConfigError(f"data.id_field: column {cfg.id_field!r} not in split {split!r}; "
                          f"columns: {list(frame.columns)} (set id_field: null to number records)")
    ids = (frame[cfg.id_field].astype(str) if cfg.id_field else pd.Series([f"{split}-{i}" for i in range(len(frame))]))
    out = pd.DataFrame({"sample_id": ids.values, "text": frame[cfg.text_field].astype(str).values})
    if out.sample_id.duplicated().any():
        dup = out.sample_id[out.sample_id.duplicated()].iloc[0]
        raise ConfigError(f"data.id_field: id {dup!r} occurs twice in split {split!r}; ids must be unique")
    return out


def _clean(frame: pd.DataFrame, split: str, report: list[str]) -> pd.DataFrame:
    blank = frame.text.str.strip() == ""
    if blank.any():
        report.append(f"{split}: dropped {int(blank.sum())} empty or whitespace-only texts")
    frame = frame[~blank]
    dup = frame.text.duplicated()
    if dup.any():
        report.append(f"{split}: dropped {int(dup.sum())} exact duplicate texts (first occurrence kept)")
    return frame[~dup].reset_index(drop=True)


def _subset(frame: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    if n is None or n >= len(frame):
        return frame
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(frame), size=n, replace=False))
    return frame.iloc[keep].reset_index(drop=True)


def load_study_data(cfg: DataConfig) -> StudyData:
    """Load, clean and validate the member, non-member and (optional) utility splits."""
    names = [cfg.member_split, cfg.non_member_split] + ([cfg.utility_split] if cfg.utility_split else [])
    if cfg.member_split == cfg.non_member_split:
        raise ConfigError("data.non_member_split must differ from data.member_split")
    raw = _load_raw_splits(cfg, names)
    report: list[str] = []
    frames = {n: _clean(_normalise(raw[n], cfg, n), n, report) for n in names}
    members, non_members = frames[cfg.member_split], frames[cfg.non_member_split]
    shared = set(members.text) & set(non_members.text)
    if shared:
        example = next(iter(shared))[:80]
        if not cfg.allow_shared_texts:
            raise ConfigError(
                f"data: {len(shared)} text(s) occur in both {cfg.member_split!r} and {cfg.non_member_split!r} "
                f"(e.g. {example!r}); a shared text is both member and non-member, which corrupts the "
                "experiment. Deduplicate the data, or set data.allow_shared_texts: true to drop them "
                "from the non-members."
            )
        non_members = non_members[~non_members.text.isin(shared)].reset_index(drop=True)
        report.append(f"dropped {len(shared)} non-member texts also present among members")
    seed = cfg.subset_seed
    members = _subset(members, cfg.subset, seed)
    non_members = _subset(non_members, cfg.subset, seed + 1)
    utility = _subset(frames[cfg.utility_split], cfg.subset, seed + 2) if cfg.utility_split else None
    for name, frame in ((cfg.member_split, members), (cfg.non_member_split, non_members)):
        if frame.empty:
            raise ConfigError(f"data: split {name!r} has no usable records")
    for line in report:
        log.warning(line)
    return StudyData(members=members, non_members=non_members, utility=utility, report=report)
