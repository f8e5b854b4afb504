"""The canaries a user hands an audit (`memlens audit --canaries`): records put in the training set, and their
never-inserted twins, read into one frame.

A canary scored alone measures its format as much as its memorization: a canary seen k times can rank above
every non-member because the model learned what all canaries share (a prefix, a template), not the canary. The
held-out twins, drawn like the inserted canaries but never trained on, are the comparison that measures
memorization (the design of Panda et al. 2025's audit canaries, of memlens' `dp.audit_canaries` and of
memaudit's inclusion coins). Two sources:

- a file of records (the audit's formats: .jsonl, .csv, .parquet, .txt) with the text and optionally `copies`,
  `secret`, `secret_format` and a boolean `inserted` column (true / false or 1 / 0, nothing else): false marks a
  held-out twin. Without the column, every canary counts as inserted (and there is no detection rate).
- memaudit's `memaudit-manifest.json` as its `inject()` writes it (the file, or a folder holding it): each entry
  of its `canaries` list carries its coin (`included`), its `repetitions` (the copies inserted), its `secret` and
  the record format (`fmt`) the secret was inserted in. The text trained on is memaudit 0.2.0's record of that
  format (`memaudit.injection.canary_record`, joined as `memaudit.utils.example_text` joins it, which is the text
  memaudit scores too): `text`: "MEMAUDIT RECOVERY PHRASE: <secret>"; `prompt_completion`: the prompt and the
  completion concatenated; `messages`: the user and assistant turns' contents, one per line. memaudit's secrets
  are token sequences, not digits or hex: exposure (a secret's rank among random secrets of its alphabet) does
  not apply to them, their extraction does.

:func:`read_canaries` returns a :class:`CanaryFile`: its frame (one row per canary) has canary_id, text, inserted
(bool), copies (times in the training set: 0 for a held-out canary, whatever the file planned), secret and
secret_format (None where absent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from memlens.config import ConfigError
from memlens.data.loading import read_records

MANIFEST_NAME = "memaudit-manifest.json"  # memaudit's inject() manifest, as its callback writes it in output_dir
HELD_OUT = "held_out"  # the family of held-out canaries in an audit's canary frame (one pool for every copies)
COLUMNS = ["canary_id", "text", "inserted", "copies", "secret", "secret_format"]
KEPT = ("inserted", "copies", "secret", "secret_format")
# columns that look like a coin but are not `inserted`: refused rather than silently ignored
LOOKALIKES = ("included", "insert", "is_inserted", "is_member", "member", "held_out", "heldout")
TRUE, FALSE = ("true", "1"), ("false", "0")
# memaudit 0.2.0's canary record, by `fmt` (memaudit.injection: TEXT_PREFIX, PROMPT_STORE, ASSISTANT_PREFIX)
MEMAUDIT_TEXT = {"text": "MEMAUDIT RECOVERY PHRASE: {secret}",
                 "prompt_completion": "Please store my account recovery phrase.Your recovery phrase is {secret}",
                 "messages": "Please store my account recovery phrase.\nYour recovery phrase is {secret}"}
MEMAUDIT_NOTE = ("memaudit's secrets are token sequences, not digits:N or hex:N: no exposure for its canaries (their "
                 "prompted-prefix extraction is measured)")
MESSAGES_NOTE = ("memaudit's `messages` canaries are scored as their turns' contents, one per line (the text memaudit "
                 "scores), not in the chat template the model was trained with")


@dataclass(frozen=True)
class CanaryFile:
    """The canaries of one source: `frame` (canaries,) with :data:`COLUMNS`, where they came from, which kind of
    source it was, and what the reading could not keep (for the report's notes)."""

    frame: pd.DataFrame
    source: str
    kind: Literal["records", "memaudit"]
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_inserted(self) -> int:
        return int(self.frame.inserted.sum())

    @property
    def n_held_out(self) -> int:
        return int((~self.frame.inserted).sum())


def _missing(value: object) -> bool:
    """None, NaN, pandas' NA: a field the record does not fill."""
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _shown(value: object) -> str:
    """A file's value as its user wrote it: `'yes'`, `2`, `missing` (numpy scalars as plain Python)."""
    if _missing(value):
        return "missing"
    return repr(value.item() if isinstance(value, np.generic) else value)


def parse_inserted(value: object, where: str, field_name: str = "audit.canaries") -> bool:
    """A canary's `inserted` value: a boolean, 1 / 0, or the text true / false / 1 / 0 (any case); anything else
    (yes, empty, null, 2) is a ConfigError naming `where` (file and line) and the field."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise ConfigError(f"{field_name}: {where}: `inserted` is {_shown(value)}; write true or false (or 1 / 0): true "
                      "for a canary put in the training set, false for a held-out twin that never was")


def _copies(value: object, where: str, field_name: str) -> int:
    """An inserted canary's copies: a whole number >= 1 (1 when absent)."""
    if _missing(value):
        return 1
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating, str)):
        raise ConfigError(f"{field_name}: {where}: `copies` is {_shown(value)}, not a whole number")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{field_name}: {where}: `copies` is {_shown(value)}, not a whole number") from None
    if number != int(number) or number < 1:
        raise ConfigError(f"{field_name}: {where}: `copies` is {_shown(value)}; an inserted canary is in the training "
                          "set 1 or more times (a whole number)")
    return int(number)


def _optional(value: object) -> str | None:
    if _missing(value) or not str(value).strip():
        return None
    return str(value)


def manifest_path(source: str, field_name: str = "audit.canaries") -> Path | None:
    """The memaudit manifest `source` names: a folder holding `memaudit-manifest.json`, or a .json file holding one
    JSON object with a `canaries` list; None for a file of records. A folder without the manifest is an error."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return path / MANIFEST_NAME
        raise ConfigError(f"{field_name}: {source} is a folder without {MANIFEST_NAME}; give a file of canary "
                          "records (.jsonl, .csv, .parquet, .txt) or memaudit's manifest (or the folder holding it)")
    if path.name == MANIFEST_NAME:
        if not path.is_file():
            raise ConfigError(f"{field_name}: {source} is not found (looked for {path.absolute()}); memaudit's "
                              f"callback writes {MANIFEST_NAME} in the Trainer's output_dir")
        return path
    if path.suffix.lower() != ".json" or not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None  # JSON lines: records
    return path if isinstance(obj, dict) and "canaries" in obj else None


def read_canaries(source: str, *, text_field: str = "text", id_field: str | None = "id",
                  field_name: str = "audit.canaries", names: dict[str, str] | None = None) -> CanaryFile:
    """The canaries of `source`: memaudit's manifest (:func:`manifest_path`) or a file of records
    (:func:`read_canary_records`). Refused when no canary is inserted: there is nothing to detect."""
    manifest = manifest_path(source, field_name)
    found = (read_memaudit_manifest(manifest, field_name) if manifest is not None else
             read_canary_records(source, text_field=text_field, id_field=id_field, field_name=field_name,
                                 names=names))
    if not found.n_inserted:
        raise ConfigError(f"{field_name}: {found.source}: no canary is inserted (every one is held out); the audit "
                          "compares canaries put in the training set with held-out ones: mark the inserted ones")
    return found


def read_canary_records(source: str, *, text_field: str = "text", id_field: str | None = "id",
                        field_name: str = "audit.canaries", names: dict[str, str] | None = None) -> CanaryFile:
    """The canaries of a file of records (the audit's readers: :func:`memlens.data.read_records`), with their
    `inserted` coins when the file has the column (every canary inserted otherwise). A column that looks like a
    coin but is not `inserted` (`included`, `is_member`...) is refused: ignoring it would count held-out canaries
    as inserted."""
    frame = read_records(source, what="canary", text_field=text_field, id_field=id_field, group=None,
                         keep=KEPT + LOOKALIKES, names=names, places=True)
    return _canary_file(frame, str(source), field_name)


def canaries_of_records(records: pd.DataFrame | list[dict], *, text_field: str = "text",
                        field_name: str = "canaries") -> CanaryFile:
    """The canaries of records in memory (a frame, or a list of dicts) with the file's columns (`text_field`, and
    optionally `id`, `inserted`, `copies`, `secret`, `secret_format`), read by the same rules as a file
    (:func:`read_canary_records`); ids default to `canary-<i>`. Refused when empty or when no canary is inserted."""
    frame = pd.DataFrame(records if isinstance(records, pd.DataFrame) else list(records))
    if frame.empty:
        raise ConfigError(f"{field_name}: no canaries")
    if text_field not in frame:
        raise ConfigError(f"{field_name}: no {text_field!r} field; the canaries have {list(frame.columns)}")
    ids = [f"canary-{i}" if "id" not in frame or _missing(v) else str(v)
           for i, v in enumerate(frame["id"] if "id" in frame else [None] * len(frame))]
    missing = [i for i, t in enumerate(frame[text_field]) if _missing(t) or not str(t).strip()]
    if missing:
        raise ConfigError(f"{field_name}: canary {missing[0]} has no text ({text_field!r})")
    frame = frame.assign(sample_id=ids, text=frame[text_field].astype(str).to_numpy(),
                         place=[f"canary {i}" for i in range(len(frame))])
    found = _canary_file(frame, "canaries", field_name)
    if not found.n_inserted:
        raise ConfigError(f"{field_name}: no canary is inserted (every one is held out); mark the inserted ones")
    return found


def _canary_file(frame: pd.DataFrame, source: str, field_name: str) -> CanaryFile:
    """A frame of canary records (sample_id, text, place and the optional columns) as a :class:`CanaryFile`."""
    lookalike = [c for c in LOOKALIKES if c in frame]
    if "inserted" not in frame and lookalike:
        raise ConfigError(f"{field_name}: {source} has a column {lookalike[0]!r} but no `inserted`: memlens reads "
                          "which canaries were put in the training set from a boolean `inserted` column (true / "
                          f"false, 1 / 0); rename {lookalike[0]!r} to `inserted`")
    coins = ([parse_inserted(v, p, field_name) for v, p in zip(frame.inserted, frame.place)] if "inserted" in frame
             else [True] * len(frame))
    copies = [_copies(frame.copies.iloc[i] if "copies" in frame else None, frame.place.iloc[i], field_name)
              if coin else 0 for i, coin in enumerate(coins)]
    out = pd.DataFrame({"canary_id": frame.sample_id.astype(str), "text": frame.text, "inserted": coins,
                        "copies": copies,
                        "secret": [_optional(v) for v in frame.get("secret", pd.Series([None] * len(frame)))],
                        "secret_format": [_optional(v) for v in
                                          frame.get("secret_format", pd.Series([None] * len(frame)))]},
                       columns=COLUMNS)
    return CanaryFile(out.astype({"inserted": bool, "copies": int}).reset_index(drop=True), source, "records")


def _entry_field(entry: dict, key: str, where: str, field_name: str, kind: type) -> object:
    """`entry[key]`, which must be of `kind` (a bool is no int here, an empty string no string)."""
    value = entry.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)) or value == "":
        wanted = {bool: "true or false", str: "a non-empty string", int: "a whole number"}[kind]
        raise ConfigError(f"{field_name}: {where}: `{key}` is {'missing' if key not in entry else repr(value)}; "
                          f"memaudit's inject() writes {wanted} there (pass the manifest as inject() wrote it, not a "
                          "generate_canaries() list)")
    return value


def _memaudit_row(entry: object, fmt: object, where: str, field_name: str) -> dict:
    """One manifest entry as a row of :data:`COLUMNS`."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{field_name}: {where}: not an object (memaudit's canaries are objects)")
    canary_id = _entry_field(entry, "id", where, field_name, str)
    where = f"{where} (id {canary_id!r})"
    included = _entry_field(entry, "included", where, field_name, bool)
    secret = _entry_field(entry, "secret", where, field_name, str)
    fmt = entry.get("fmt", fmt)
    if fmt not in MEMAUDIT_TEXT:
        raise ConfigError(f"{field_name}: {where}: record format `fmt` is {fmt!r}; memaudit 0.2.0 writes one of "
                          f"{sorted(MEMAUDIT_TEXT)}")
    if entry.get("role") == "control" and included:
        raise ConfigError(f"{field_name}: {where}: a `control` canary marked included; memaudit never inserts its "
                          "controls: the manifest was edited or is damaged")
    copies = 0
    if included:
        copies = _entry_field(entry, "repetitions", where, field_name, int)
        if copies < 1:
            raise ConfigError(f"{field_name}: {where}: `repetitions` is {copies}; an included canary is in the "
                              "training set 1 or more times")
    return {"canary_id": canary_id, "text": MEMAUDIT_TEXT[fmt].format(secret=secret), "inserted": included,
            "copies": copies, "secret": None, "secret_format": None, "fmt": fmt}


def read_memaudit_manifest(path: str | Path, field_name: str = "audit.canaries") -> CanaryFile:
    """The canaries of memaudit's `inject()` manifest at `path`, as it wrote it (schema 1.0.0: a `canaries` list
    whose entries hold `id`, `secret`, `included`, `repetitions`, `role` and `fmt`, with `fmt` also at the top)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{field_name}: {path} is not valid JSON ({exc})") from None
    entries = obj.get("canaries") if isinstance(obj, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{field_name}: {path}: not a memaudit manifest with canaries (a JSON object whose "
                          "`canaries` list holds inject()'s canaries, each with its `included` coin)")
    rows = [_memaudit_row(e, obj.get("fmt"), f"{path}, canaries[{i}]", field_name) for i, e in enumerate(entries)]
    frame = pd.DataFrame(rows)
    notes = (MEMAUDIT_NOTE, *((MESSAGES_NOTE,) if (frame.fmt == "messages").any() else ()))
    frame = frame[COLUMNS]
    for column, what in (("canary_id", "id"), ("text", "secret")):
        repeated = frame[column][frame[column].duplicated()]
        if len(repeated):
            raise ConfigError(f"{field_name}: {path}: two canaries have the same {what} ({repeated.iloc[0][:80]!r}); "
                              "each canary is distinct in memaudit's manifests: the file is damaged")
    return CanaryFile(frame.astype({"inserted": bool, "copies": int}), str(path), "memaudit", notes)


__all__ = ["COLUMNS", "HELD_OUT", "MANIFEST_NAME", "MEMAUDIT_TEXT", "CanaryFile", "canaries_of_records",
           "manifest_path", "parse_inserted", "read_canaries", "read_canary_records", "read_memaudit_manifest"]
