"""Membership designs: which records are members (trained on) and which are non-members (held out).

- `splits`: the named splits, member_split vs non_member_split (the 2024 study's design). Whatever
  differs between the splits (sources, dates, documents) adds to every attack's AUC.
- `random`: a fair coin, seeded by `data.membership_seed`, puts each record (or each document group) of
  the pool on one side. Members and non-members are then exchangeable except for training, so the AUC
  measures memorization of the records. The coin of a record is a hash of (seed, record id or group):
  the same in every cell of a study, whatever the file order or the other records, so paired tests
  between cells stay paired; a record-level coin also meets the one-run privacy audit's assumption.

Document groups (`data.group`) name the document a record belongs to: a column, or a regular expression
over the record id whose first group is the document (PHEE: `^(\\d+)_`, the PubMed id).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pandas as pd

from memlens.config import ConfigError, DataConfig


def group_column(frame: pd.DataFrame, raw: pd.DataFrame, cfg: DataConfig, where: str) -> pd.Series | None:
    """The document group of each record of `frame` (normalised rows of `raw`), or None without `data.group`."""
    if cfg.group is None:
        return None
    if cfg.group in raw.columns:
        return raw[cfg.group].astype(str).reset_index(drop=True)
    try:
        pattern = re.compile(cfg.group)
    except re.error as exc:
        raise ConfigError(f"data.group: {cfg.group!r} is neither a column of {where} ({list(raw.columns)}) nor a "
                          f"valid regular expression ({exc})") from None
    if pattern.groups < 1:
        raise ConfigError(f"data.group: {cfg.group!r} is not a column of {where} ({list(raw.columns)}); as a "
                          r"regular expression over the id it needs a capturing group, e.g. ^(\d+)_")
    groups = []
    for sample_id in frame.sample_id:
        match = pattern.search(sample_id)
        if match is None or match.group(1) is None:
            raise ConfigError(f"data.group: the id {sample_id!r} of {where} does not match {cfg.group!r}; every id "
                              "must name its document (or set data.group to a column)")
        groups.append(match.group(1))
    return pd.Series(groups, dtype=str)


def coin(seed: int, keys: pd.Series) -> np.ndarray:
    """A fair coin per key (True = member): bit 0 of SHA-256 of `<seed>:<key>` (independent of order)."""
    return np.array([hashlib.sha256(f"{seed}:{key}".encode()).digest()[0] & 1 == 1 for key in keys], dtype=bool)


def random_split(pool: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(members, non-members, assignment) of the random design over `pool` (sample_id, text[, group]).
    The assignment lists every pool record with its unit key and side."""
    unit = cfg.coin_unit
    keys = pool["group"] if unit == "group" else pool["sample_id"]
    heads = coin(cfg.membership_seed, keys)
    assignment = pd.DataFrame({"sample_id": pool.sample_id.values, "unit_key": keys.astype(str).values,
                               "is_member": heads})
    if "group" in pool:
        assignment["group"] = pool["group"].values
    members = pool[heads].reset_index(drop=True)
    non_members = pool[~heads].reset_index(drop=True)
    if members.empty or non_members.empty:
        raise ConfigError(f"data.membership: the random design's coin put all {len(pool)} pool record(s) "
                          f"({assignment.unit_key.nunique()} {unit}s) on one side; the pool needs more "
                          f"{unit}s (data.pool, data.subset)")
    return members, non_members, assignment


__all__ = ["coin", "group_column", "random_split"]
