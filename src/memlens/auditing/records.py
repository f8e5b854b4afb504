"""The records of an audit: members, non-members, canaries (and, for a memlens run folder, its study's utility
split and its own canary), loaded and checked before any model is."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from memlens.auditing.target import Target
from memlens.config import AuditConfig, ConfigError
from memlens.data import Canary, canary_from_record, load_study_data, read_records
from memlens.train import read_members, read_train_info

SIDES = {"members": "member", "non_members": "non_member", "canaries": "canary"}  # field -> id prefix
CANARY_COLUMNS = ("copies", "secret", "secret_format")
RUN_MEMBERS = "members.parquet"


@dataclass
class AuditRecords:
    """members (sample_id, text, is_canary[, group]): the member file's records, then the canaries (flagged); a run
    folder's members.parquet as it is. non_members (sample_id, text[, group]); utility or None; canaries: the
    inserted records (with their secret when they have one)."""

    members: pd.DataFrame
    non_members: pd.DataFrame
    utility: pd.DataFrame | None
    canaries: list[Canary]
    sources: dict[str, str]  # field -> where its records came from (for the report and the model card)
    inserted: frozenset[str] = frozenset()  # sample ids of the canaries of `audit.canaries`

    def in_metrics(self) -> np.ndarray:
        """(members + non-members,) whether each record counts in the membership metrics: every record but the
        canaries of `audit.canaries` (records of the user's choosing, often repeated: not a sample of the
        members). A run folder's own canary is one of its members, as its study counts it."""
        return np.r_[~self.members.sample_id.isin(self.inserted).to_numpy(), np.ones(len(self.non_members), bool)]


def _names(field: str) -> dict[str, str]:
    """The study fields data loading names, as the audit's."""
    return {"data.source": f"audit.{field}", "data.text_field": "audit.text_field", "data.id_field": "audit.id_field",
            "data.group": "audit.group"}


def _read(cfg: AuditConfig, field: str, keep: tuple[str, ...] = ()) -> pd.DataFrame:
    """The records of one file; the canaries have no document groups (each is its own)."""
    return read_records(getattr(cfg, field), what=SIDES[field], text_field=cfg.text_field, id_field=cfg.id_field,
                        group=cfg.group if field != "canaries" else None, keep=keep, names=_names(field))


def _shared(a: pd.DataFrame, b: pd.DataFrame, a_name: str, b_name: str) -> None:
    shared = sorted(set(a.text) & set(b.text))
    if shared:
        raise ConfigError(f"audit: {len(shared)} text(s) occur in both the {a_name} and the {b_name} (e.g. "
                          f"{shared[0][:80]!r}); a record cannot be both, it would corrupt the measurement: remove "
                          f"them from one of the files")


def _distinct_ids(frames: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The frames with ids prefixed by their side (`member:3`) when two files use the same ids."""
    ids = [set(f.sample_id) for f in frames.values()]
    if sum(map(len, ids)) == len(set().union(*ids)):
        return frames
    return {side: f.assign(sample_id=f"{SIDES[side]}:" + f.sample_id.astype(str)) for side, f in frames.items()}


def _run_records(cfg: AuditConfig, target: Target) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None,
                                                           list[Canary]]:
    """A run folder's own records: its members.parquet (canary included), its study's non-members and utility."""
    data = load_study_data(target.cell.data_config(target.study), target.cell.membership)
    members = read_members(target.run_dir)
    canary = Canary(**read_train_info(target.run_dir).canary)
    if "group" in data.members and "group" not in members:
        groups = dict(zip(data.members.sample_id, data.members.group))
        members = members.assign(group=[groups.get(s, f"canary:{s}") for s in members.sample_id])
    return members, data.non_members, data.utility, [canary]


def load_audit_records(cfg: AuditConfig, target: Target) -> AuditRecords:
    """Members, non-members and canaries of the audit, checked: a text in two of the files is refused naming the
    count and an example; a record without its text names its file, line and field."""
    if target.kind == "run" and cfg.members is None and cfg.non_members is None:
        members, non_members, utility, canaries = _run_records(cfg, target)
        source = f"the non-members of its study's {target.study.data.source} ({target.cell.membership} design)"
        records = AuditRecords(members, non_members, utility, canaries,
                               {"members": str(target.run_dir / RUN_MEMBERS), "non_members": source})
        return _with_canary_file(cfg, records)
    missing = [f"audit.{f}" for f in ("members", "non_members") if getattr(cfg, f) is None]
    if missing:
        raise ConfigError(f"{' and '.join(missing)}: required (a file of records, or hub:NAME:SPLIT); only a memlens "
                          "run folder brings its own members and non-members")
    frames = _distinct_ids({"members": _read(cfg, "members"), "non_members": _read(cfg, "non_members")})
    _shared(frames["members"], frames["non_members"], f"members ({cfg.members})", f"non-members ({cfg.non_members})")
    records = AuditRecords(frames["members"].assign(is_canary=False), frames["non_members"], None, [],
                           {"members": cfg.members, "non_members": cfg.non_members})
    return _with_canary_file(cfg, records)


def _with_canary_file(cfg: AuditConfig, records: AuditRecords) -> AuditRecords:
    """`records` with the canaries of `audit.canaries` added to the members (flagged, out of the metrics)."""
    if cfg.canaries is None:
        return records
    frame = _read(cfg, "canaries", keep=CANARY_COLUMNS)
    _shared(frame, records.non_members, f"canaries ({cfg.canaries})", "non-members")
    frame = frame.assign(sample_id="canary:" + frame.sample_id.astype(str).str.replace(r"^canary-", "", regex=True))
    canaries = [canary_from_record(row, f"canary {row.sample_id!r}") for _, row in frame.iterrows()]
    members = records.members[~records.members.text.isin(frame.text)]  # a canary also listed among members is one
    added = pd.DataFrame({"sample_id": frame.sample_id, "text": frame.text, "is_canary": True})
    if "group" in members:
        added["group"] = frame.sample_id
    records.members = pd.concat([members, added], ignore_index=True)
    records.canaries = records.canaries + canaries
    records.inserted = frozenset(added.sample_id)
    records.sources["canaries"] = cfg.canaries
    return records


__all__ = ["AuditRecords", "load_audit_records"]
