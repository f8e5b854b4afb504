"""The records of an audit: members, non-members, canaries (and, for a memlens run folder, its study's utility
split and its own canary), loaded and checked before any model is."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from memlens.attacks.subject import with_groups
from memlens.auditing.target import Target
from memlens.config import AuditConfig, ConfigError
from memlens.data import Canary, canary_from_record, load_study_data, read_records, refuse_shared_texts
from memlens.data.user_canaries import COLUMNS as CANARY_FILE_COLUMNS
from memlens.data.user_canaries import HELD_OUT, read_canaries
from memlens.train import read_members, read_train_info

SIDES = {"members": "member", "suspect": "suspect", "non_members": "non_member",
         "canaries": "canary"}  # field -> id prefix
RUN_MEMBERS = "members.parquet"
CANARY_FRAME_COLUMNS = ["canary_id", "family", "text", "is_member", "copies"]


@dataclass
class AuditRecords:
    """members (sample_id, text, is_canary[, group]): the member file's records, then the inserted canaries of
    `audit.canaries` (flagged); a run folder's members.parquet as it is. non_members (sample_id, text[, group]);
    utility or None; canaries: the inserted canaries (with their secret when they have one: exposure), a run
    folder's own included. canary_file: the canaries of `audit.canaries`, inserted and held out (canary_id: their
    sample id, text, inserted, copies, secret, secret_format: :mod:`memlens.data.user_canaries`), or None. The
    held-out canaries were never trained on: they are in no other frame."""

    members: pd.DataFrame
    non_members: pd.DataFrame
    utility: pd.DataFrame | None
    canaries: list[Canary]
    sources: dict[str, str]  # field -> where its records came from (for the report and the model card)
    inserted: frozenset[str] = frozenset()  # sample ids of the inserted canaries (:func:`inserted_canaries`)
    canary_file: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)  # what reading the records could not keep (for the report)

    @property
    def held_out(self) -> frozenset[str]:
        """Sample ids of the held-out canaries of `audit.canaries` (never trained on)."""
        if self.canary_file is None:
            return frozenset()
        return frozenset(self.canary_file.canary_id[~self.canary_file.inserted])

    @property
    def canary_frame(self) -> pd.DataFrame:
        """(canaries,) the canaries of `audit.canaries` in the designed canaries' schema (canary_id, family, text,
        is_member, copies), to be scored like them (into `canary_scores.parquet`): is_member is `inserted`; the
        family of an inserted canary is `copies<N>` by its copies (one family when all have the same), of a
        held-out one :data:`memlens.data.user_canaries.HELD_OUT`: one pool, the comparison of every copies (a
        canary never trained on has no copies). Empty without a canary file."""
        if self.canary_file is None:
            return pd.DataFrame(columns=CANARY_FRAME_COLUMNS)
        frame = self.canary_file
        family = np.where(frame.inserted, "copies" + frame.copies.astype(str), HELD_OUT)
        return pd.DataFrame({"canary_id": frame.canary_id.astype(str), "family": family, "text": frame.text,
                             "is_member": frame.inserted.astype(bool), "copies": frame.copies.astype(int)},
                            columns=CANARY_FRAME_COLUMNS).reset_index(drop=True)

    def in_metrics(self) -> np.ndarray:
        """(members + non-members,) whether each record counts in the membership metrics (and among the suspects of
        the usage share): every record but the inserted canaries (:func:`inserted_canaries`)."""
        return np.r_[~self.members.sample_id.isin(self.inserted).to_numpy(), np.ones(len(self.non_members), bool)]


def inserted_canaries(canaries: list[Canary], file_inserted: frozenset[str] = frozenset()) -> frozenset[str]:
    """The one definition of an audit's inserted canary: a record put in the training set by design, not drawn
    with the members: the canaries of `audit.canaries` marked inserted (`file_inserted`) and a run folder's own
    canary when its study inserted it (`mode: insert`, a secret repeated `copies` times). Their sample ids are out of
    the membership metrics, out of the suspects of the usage share and out of the reference models' records
    (the metrics and the share estimate a sample of the members, which an inserted secret is not, and a reference
    would have to insert it to be trained like the target); exposure and extraction measure them. A run folder's
    canary in `repeat` mode is one of its members, repeated: it stays a member everywhere."""
    return frozenset(file_inserted) | frozenset(c.sample_id for c in canaries if c.mode == "insert")


def _names(field: str) -> dict[str, str]:
    """The study fields data loading names, as the audit's user gives them: the command's flag, then the field of
    an audit file (`--text-field (audit.text_field)`)."""
    return {"data.source": f"--{field.replace('_', '-')} (audit.{field})",
            "data.text_field": "--text-field (audit.text_field)", "data.id_field": "audit.id_field",
            "data.group": "--group (audit.group)"}


def _read(cfg: AuditConfig, field: str) -> pd.DataFrame:
    """The records of the members' or the non-members' file (the canaries': :func:`read_canaries`)."""
    return read_records(getattr(cfg, field), what=SIDES[field], text_field=cfg.text_field, id_field=cfg.id_field,
                        group=cfg.group, names=_names(field))


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
    members = with_groups(read_members(target.run_dir), data)
    canary = Canary(**read_train_info(target.run_dir).canary)
    return members, data.non_members, data.utility, [canary]


def load_audit_records(cfg: AuditConfig, target: Target) -> AuditRecords:
    """Members, non-members and canaries of the audit, checked: a text in two of the files is refused naming the
    count and an example; a record without its text names its file, line and field."""
    if target.kind == "run" and cfg.members is None and cfg.non_members is None:
        members, non_members, utility, canaries = _run_records(cfg, target)
        source = f"the non-members of its study's {target.study.data.source} ({target.cell.membership} design)"
        records = AuditRecords(members, non_members, utility, canaries,
                               {"members": str(target.run_dir / RUN_MEMBERS), "non_members": source},
                               inserted=inserted_canaries(canaries))
        if records.inserted:
            records.notes.append(f"The run's own canary ({', '.join(sorted(records.inserted))}: a secret its study "
                                 "inserted) is measured by exposure and extraction, not counted among the members of "
                                 "the membership metrics, the usage share or the reference models' records (its study "
                                 "counts it among its members).")
        return _with_canary_file(cfg, records)
    side = "suspect" if cfg.suspect is not None else "members"  # the suspect set takes the members' place
    missing = [f"audit.{f}" for f in (side, "non_members") if getattr(cfg, f) is None]
    if missing:
        raise ConfigError(f"{' and '.join(missing)}: required (a file of records, or hub:NAME:SPLIT); only a memlens "
                          "run folder brings its own members and non-members")
    frames = _distinct_ids({side: _read(cfg, side), "non_members": _read(cfg, "non_members")})
    named = "suspect set" if side == "suspect" else "members"
    refuse_shared_texts(frames[side].text, frames["non_members"].text, f"{named} ({getattr(cfg, side)})",
                        f"non-members ({cfg.non_members})")
    records = AuditRecords(frames[side].assign(is_canary=False), frames["non_members"], None, [],
                           {side: getattr(cfg, side), "non_members": cfg.non_members})
    return _with_canary_file(cfg, records)


def _with_canary_file(cfg: AuditConfig, records: AuditRecords) -> AuditRecords:
    """`records` with the canaries of `audit.canaries`: the inserted ones added to the members (flagged, out of the
    metrics) and to `canaries`, every one in `canary_file`. An inserted canary among the non-members, or a held-out
    one among the members, is refused (one would be both trained on and not)."""
    if cfg.canaries is None:
        return records
    found = read_canaries(cfg.canaries, text_field=cfg.text_field, id_field=cfg.id_field, names=_names("canaries"))
    frame = found.frame.assign(
        canary_id="canary:" + found.frame.canary_id.astype(str).str.replace(r"^canary-", "", regex=True))
    inserted, held_out = frame[frame.inserted], frame[~frame.inserted]
    refuse_shared_texts(inserted.text, records.non_members.text, f"canaries ({cfg.canaries})", "non-members")
    refuse_shared_texts(held_out.text, records.members.text, f"held-out canaries ({cfg.canaries}: never trained on)",
                        "members")
    canaries = [canary_from_record(row, f"canary {row.sample_id!r}")
                for _, row in inserted.rename(columns={"canary_id": "sample_id"}).iterrows()]
    members = records.members[~records.members.text.isin(inserted.text)]  # a canary also listed among members is one
    added = pd.DataFrame({"sample_id": inserted.canary_id, "text": inserted.text, "is_canary": True})
    if "group" in members:
        added["group"] = inserted.canary_id
    records.members = pd.concat([members, added], ignore_index=True)
    records.canaries = records.canaries + canaries
    records.inserted = inserted_canaries(records.canaries, frozenset(added.sample_id))
    records.canary_file = frame[CANARY_FILE_COLUMNS].reset_index(drop=True)
    records.notes = records.notes + list(found.notes)
    records.sources["canaries"] = found.source
    return records


__all__ = ["AuditRecords", "inserted_canaries", "load_audit_records"]
