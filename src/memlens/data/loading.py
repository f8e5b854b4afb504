"""Read a text dataset from the hub, a folder of split files, or one file with a split column."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from memlens.config import (
    DESIGNS,
    RANDOM,
    SPLITS,
    ConfigError,
    DataConfig,
    Design,
    hub_offline,
    looks_like_local_path,
    renamed_fields,
    stable_hash,
)
from memlens.data.designs import group_column, random_split

log = logging.getLogger(__name__)

# What data loading dropped, said once per process and data source: every stage (and every design) loads
# the data again, and the same lines each time would be noise.
_WARNED: set[tuple[str, str]] = set()


def _warn_once(cfg: DataConfig, report: list[str]) -> None:
    for line in report:
        if (cfg.source, line) not in _WARNED:
            _WARNED.add((cfg.source, line))
            log.warning(line)


_READERS = {
    ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
    ".json": lambda p: pd.read_json(p, lines=True, dtype=False),
    ".csv": lambda p: pd.read_csv(p, dtype=str, keep_default_na=False),
    ".parquet": pd.read_parquet,
}


@dataclass
class StudyData:
    """The records of a study as frames with columns `sample_id`, `text` (and `group` with `data.group`)."""

    members: pd.DataFrame
    non_members: pd.DataFrame
    utility: pd.DataFrame | None
    report: list[str] = field(default_factory=list)  # validation findings, for the run log and the report
    design: Design = SPLITS  # the membership design (memlens.data.designs)
    assignment: pd.DataFrame | None = None  # random design: every pool record's coin (sample_id, unit_key, is_member)

    @property
    def data_hash(self) -> str:
        parts = [self.members.text.tolist(), self.non_members.text.tolist()]
        return stable_hash(parts)[:16]


@dataclass
class _Origin:
    """Where a split's rows were read from, to name a bad record: `<file> line 12` (JSON lines), `<file> data
    row 3` (CSV), `<file> record 7` (parquet), `hub dataset 'x' split 'train' record 7`. A frame's index holds
    each row's position in its file (a single file with a split column keeps its rows' positions)."""

    label: str
    path: Path | None = None
    _lines: list[int] | None = field(default=None, repr=False)

    def where(self, position: int) -> str:
        suffix = self.path.suffix.lower() if self.path is not None else ""
        if suffix in (".jsonl", ".json"):
            return f"{self.label} line {self.line_of(position)}"
        if suffix == ".txt":  # one record a line: the frame's index is the line's position
            return f"{self.label} line {position + 1}"
        if suffix == ".csv":
            return f"{self.label} data row {position + 1} (after the header)"
        return f"{self.label} record {position} (counting from 0)"

    def line_of(self, position: int) -> int:
        """The 1-based line of the `position`-th record of a JSON-lines file (blank lines hold no record)."""
        if self._lines is None:
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                self._lines = [n for n, line in enumerate(handle, 1) if line.strip()]
        return self._lines[position] if position < len(self._lines) else position + 1

    def record(self, position: int) -> dict | None:
        """The raw JSON object of a JSON-lines record (None when it is not one)."""
        if self.path is None or self.path.suffix.lower() not in (".jsonl", ".json"):
            return None
        target = self.line_of(position)
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            for n, line in enumerate(handle, 1):
                if n == target:
                    try:
                        value = json.loads(line)
                    except ValueError:
                        return None
                    return value if isinstance(value, dict) else None
        return None


def _read_file(path: Path) -> pd.DataFrame:
    """One data file as a frame; a file that cannot be read names the file, the line and the fix."""
    suffix = path.suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        raise ConfigError(f"data.source: cannot read {path}; supported: {sorted(_READERS)}")
    if suffix != ".parquet" and path.stat().st_size == 0:
        return pd.DataFrame()
    try:
        return reader(path)
    except UnicodeDecodeError as exc:
        raise ConfigError(_utf8_problem(path, exc)) from None
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except pd.errors.ParserError as exc:
        raise ConfigError(f"data.source: {path} is not a valid CSV file ({exc}); every row needs the header's "
                          "columns, and text with commas, quotes or newlines must be quoted") from None
    except (ValueError, TypeError, OSError) as exc:  # TypeError: pandas on a line that is not an object
        if suffix in (".jsonl", ".json"):
            raise ConfigError(_jsonl_problem(path, exc)) from None
        raise ConfigError(f"data.source: cannot read {path} ({type(exc).__name__}: {exc}); is it a "
                          f"{suffix[1:]} file?") from None


def _utf8_problem(path: Path, exc: UnicodeDecodeError) -> str:
    """`<file> line 3, column 12: byte 0xff is not UTF-8 ...`."""
    data = path.read_bytes()
    line, column, byte = 1, 1, None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:  # the decoder's offset in the whole file, not pandas' chunk
        before = data[:err.start]
        line = before.count(b"\n") + 1
        column = err.start - (before.rfind(b"\n") + 1) + 1
        byte = data[err.start]
    where = f"line {line}, column {column}" if byte is not None else "somewhere"
    what = f"byte 0x{byte:02x}" if byte is not None else f"a byte ({exc.reason})"
    return (f"data.source: {path} {where}: {what} is not UTF-8 text; memlens reads data files as UTF-8. "
            f"Re-encode the file (e.g. iconv -f latin1 -t utf-8 {path.name} > fixed-{path.name}) or fix that line")


def _jsonl_problem(path: Path, exc: Exception) -> str:
    """The first line of a JSON-lines file that is not one JSON object, or pandas' own error."""
    with open(path, encoding="utf-8") as handle:
        for n, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                return (f"data.source: {path} line {n}: not valid JSON ({err.msg} at column {err.colno}); "
                        'each line must be one JSON object, e.g. {"id": "a1", "context": "..."}. '
                        "Fix or delete that line")
            if not isinstance(value, dict):
                return (f"data.source: {path} line {n}: a JSON {type(value).__name__}, not an object; each line "
                        'must be one JSON object, e.g. {"id": "a1", "context": "..."}'
                        + (" (a .json file is read as JSON lines: one record per line, not one array)"
                           if path.suffix.lower() == ".json" else ""))
    return f"data.source: cannot read {path} as JSON lines ({exc})"


def _split_field(cfg: DataConfig, split: str) -> str:
    """`data.member_split` etc.: the config field that names `split`."""
    for key in ("member_split", "non_member_split", "utility_split"):
        if getattr(cfg, key) == split:
            return f"data.{key}"
    return "data.member_split"


Splits = dict[str, tuple[pd.DataFrame, "_Origin"]]


def _load_raw_splits(cfg: DataConfig, wanted: list[str]) -> Splits:
    """The raw frames of the `wanted` splits and where each came from, from the source `data.format` names."""
    source = Path(cfg.source).expanduser()
    fmt = cfg.format
    if fmt == "auto":
        fmt = "folder" if source.is_dir() else "file" if source.is_file() else "hub"
        if fmt == "hub" and looks_like_local_path(cfg.source):
            raise ConfigError(f"data.source: {cfg.source} does not exist (looked for {os.path.abspath(source)}); "
                              "data.source is a folder of <split>.jsonl|.csv|.parquet files, a single file "
                              "with a split column, or a hub dataset id (owner/name)")
    readers = {"folder": _folder_splits, "file": _file_splits, "hub": _hub_splits}
    return readers[fmt](cfg, source, wanted)


def _folder_splits(cfg: DataConfig, source: Path, wanted: list[str]) -> Splits:
    """A folder of `<split>.jsonl|.csv|.parquet` files."""
    if not source.is_dir():
        raise ConfigError(f"data.source: folder {source} does not exist")
    splits = {}
    for name in wanted:
        files = [source / f"{name}{ext}" for ext in _READERS if (source / f"{name}{ext}").exists()]
        if not files:
            present = sorted({p.stem for p in source.iterdir() if p.suffix in _READERS})
            raise ConfigError(f"data: split {name!r} not found in {source}; splits present: {present}")
        splits[name] = (_read_file(files[0]), _Origin(str(files[0]), files[0]))
    return splits


def _file_splits(cfg: DataConfig, source: Path, wanted: list[str]) -> Splits:
    """One file whose `data.split_field` column names each record's split."""
    if not source.is_file():
        raise ConfigError(f"data.source: file {source} does not exist")
    frame = _read_file(source)
    if cfg.split_field not in frame.columns:
        empty = " (the file has no records)" if frame.empty else ""
        raise ConfigError(f"data.split_field: column {cfg.split_field!r} not in {source}{empty}; "
                          f"columns: {list(frame.columns)}")
    present = sorted(frame[cfg.split_field].astype(str).unique())
    out = {}
    for name in wanted:
        if name not in present:
            raise ConfigError(f"data: split {name!r} not in column {cfg.split_field!r}; values: {present}")
        # the index keeps each row's position in the file, to name a bad record
        out[name] = (frame[frame[cfg.split_field].astype(str) == name], _Origin(str(source), source))
    return out


def _hub_splits(cfg: DataConfig, source: Path, wanted: list[str]) -> Splits:
    """A hub dataset; `datasets` honours HF_HUB_OFFLINE and HF_TOKEN from the environment (never logged here)."""
    import datasets

    try:
        dd = datasets.load_dataset(cfg.source, revision=cfg.revision)
    except Exception as exc:  # the hub error is kept as the cause
        offline = hub_offline("dataset")
        if offline:
            raise ConfigError(f"data.source: {cfg.source!r} is read as a hub dataset id, but {offline}=1 (offline) "
                              "and it is not in the local datasets cache; download it once with the hub on, "
                              f"or set data.source to a local folder or file ({exc})") from exc
        raise ConfigError(f"data.source: could not load {cfg.source!r} from the hub or as a path ({exc})") from exc
    missing = [n for n in wanted if n not in dd]
    if missing:
        raise ConfigError(f"data: split(s) {missing} not in {cfg.source}; splits: {sorted(dd)}")
    return {n: (dd[n].to_pandas(), _Origin(f"hub dataset {cfg.source!r} split {n!r}")) for n in wanted}


def _is_null(value) -> bool:
    """None, NaN or pd.NA: a missing or null value (pandas' reading of an absent JSON key too)."""
    if value is None or value is pd.NA:
        return True
    return isinstance(value, (float, np.floating)) and bool(np.isnan(value))


def _normalise(frame: pd.DataFrame, cfg: DataConfig, split: str, origin: _Origin) -> pd.DataFrame:
    if frame.empty:
        field_name = _split_field(cfg, split)
        extra = " or null for none" if field_name == "data.utility_split" else ""
        raise ConfigError(f"{field_name}: split {split!r} has no records: {origin.label} is empty; add records "
                          f"to it or set {field_name} to another split{extra}")
    if cfg.text_field not in frame.columns:
        raise ConfigError(f"data.text_field: column {cfg.text_field!r} not in split {split!r} ({origin.label}); "
                          f"columns: {list(frame.columns)}")
    if cfg.id_field is not None and cfg.id_field not in frame.columns:
        raise ConfigError(f"data.id_field: column {cfg.id_field!r} not in split {split!r} ({origin.label}); "
                          f"columns: {list(frame.columns)} (set id_field: null to number records)")
    _check_texts(frame, cfg, split, origin)
    if cfg.id_field is not None:
        _check_ids(frame, cfg, origin)
    ids = (frame[cfg.id_field].astype(str) if cfg.id_field else pd.Series([f"{split}-{i}" for i in range(len(frame))]))
    out = pd.DataFrame({"sample_id": ids.values, "text": frame[cfg.text_field].astype(str).values})
    if out.sample_id.duplicated().any():
        dup = out.sample_id[out.sample_id.duplicated()].iloc[0]
        raise ConfigError(f"data.id_field: id {dup!r} occurs twice in split {split!r} ({origin.label}); ids must "
                          "be unique (set id_field: null to number records)")
    if cfg.group is not None and cfg.group in frame.columns:
        _check_groups(frame, cfg, split, origin)
    groups = group_column(out, frame, cfg, f"split {split!r} ({origin.label})")
    if groups is not None:
        out["group"] = groups.values
    return out


def _check_texts(frame: pd.DataFrame, cfg: DataConfig, split: str, origin: _Origin) -> None:
    """Every record's text is a string: a missing, null or non-text value names its record and the fix."""
    column = frame[cfg.text_field]
    bad = [i for i, value in enumerate(column.tolist()) if not isinstance(value, str)]
    if not bad:
        return
    first = bad[0]
    position = int(frame.index[first])
    value = column.iloc[first]
    where = origin.where(position)
    more = f" ({len(bad) - 1} more record(s) of split {split!r} have the same problem)" if len(bad) > 1 else ""
    raw = origin.record(position)
    if raw is not None and cfg.text_field not in raw:
        raise ConfigError(
            f"data.text_field: {where}: the record has no {cfg.text_field!r} field (its fields: {sorted(raw)}); "
            f"add the text to it or delete it, or set data.text_field to the field that holds the text{more}")
    if _is_null(value):
        raise ConfigError(f"data.text_field: {where}: {cfg.text_field!r} is null; every record needs a text: "
                          f"fill it in or delete the record{more}")
    kind = _kind(value)
    raise ConfigError(f"data.text_field: {where}: {cfg.text_field!r} is {kind} ({str(value)[:60]}), not text; "
                      f"write it as a string or set data.text_field to the field that holds the text{more}")


def _kind(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "true/false"
    if isinstance(value, (int, float, np.number)):
        return "a number"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _check_ids(frame: pd.DataFrame, cfg: DataConfig, origin: _Origin) -> None:
    column = frame[cfg.id_field]
    bad = [i for i, value in enumerate(column.tolist()) if _is_null(value)]
    if bad:
        where = origin.where(int(frame.index[bad[0]]))
        raise ConfigError(f"data.id_field: {where}: the record has no {cfg.id_field!r} (missing or null; "
                          f"{len(bad)} record(s) in all); give every record an id, or set data.id_field: null to "
                          "number records")


def _check_groups(frame: pd.DataFrame, cfg: DataConfig, split: str, origin: _Origin) -> None:
    """Every record names its document in the `data.group` column, as the regex form requires of every id: a null
    one would put all such records into one document (one coin) without a word."""
    bad = [i for i, value in enumerate(frame[cfg.group].tolist()) if _is_null(value)]
    if bad:
        where = origin.where(int(frame.index[bad[0]]))
        raise ConfigError(f"data.group: {where}: the record has no {cfg.group!r} (missing or null; "
                          f"{len(bad)} record(s) of split {split!r} in all); every record must name its document: "
                          "fill it in, or set "
                          "data.group to another column or a regular expression over the id")


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


def load_study_data(cfg: DataConfig, design: Design = SPLITS) -> StudyData:
    """Load, clean and validate the members, non-members and (optional) utility records of a membership
    design (:mod:`memlens.data.designs`): the named splits, or the random design's coin over the pool."""
    if design == RANDOM:
        return _random_design(cfg)
    if design != SPLITS:
        raise ConfigError(f"data.membership: unknown design {design!r}; valid choices: {list(DESIGNS)}")
    names = [cfg.member_split, cfg.non_member_split] + ([cfg.utility_split] if cfg.utility_split else [])
    if cfg.member_split == cfg.non_member_split:
        raise ConfigError("data.non_member_split must differ from data.member_split")
    raw = _load_raw_splits(cfg, names)
    report: list[str] = []
    frames = {n: _clean(_normalise(raw[n][0], cfg, n, raw[n][1]), n, report) for n in names}
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
    _warn_once(cfg, report)
    return StudyData(members=members, non_members=non_members, utility=utility, report=report)


def _random_design(cfg: DataConfig) -> StudyData:
    """The random design: the pool splits' records, a seeded coin per record or group (subset: 2 x subset
    pool records, so each side holds about `subset`)."""
    pool_names = cfg.pool_splits
    names = pool_names + ([cfg.utility_split] if cfg.utility_split else [])
    raw = _load_raw_splits(cfg, names)
    report: list[str] = []
    frames = {n: _clean(_normalise(raw[n][0], cfg, n, raw[n][1]), n, report) for n in names}
    pool = pd.concat([frames[n] for n in pool_names], ignore_index=True)
    repeated = pool.text.duplicated()
    if repeated.any():
        report.append(f"pool: dropped {int(repeated.sum())} texts repeated across {pool_names} (first kept)")
        pool = pool[~repeated].reset_index(drop=True)
    if pool.sample_id.duplicated().any():
        dup = pool.sample_id[pool.sample_id.duplicated()].iloc[0]
        raise ConfigError(f"data.pool: id {dup!r} occurs in more than one of the pool splits {pool_names}; ids "
                          "must be unique across the pool (set data.id_field: null to number records by split)")
    pool = _subset(pool, 2 * cfg.subset if cfg.subset else None, cfg.subset_seed)
    members, non_members, assignment = random_split(pool, cfg)
    utility = _subset(frames[cfg.utility_split], cfg.subset, cfg.subset_seed + 2) if cfg.utility_split else None
    _warn_once(cfg, report)
    return StudyData(members=members, non_members=non_members, utility=utility, report=report, design=RANDOM,
                     assignment=assignment)


def membership_assignments(cfg: DataConfig, data: StudyData) -> pd.DataFrame:
    """Every coin of the random design's records `data` (design, seed, unit, sample_id, unit_key, is_member[,
    group]): saved in the study folder, so who was a member stays on record."""
    if data.assignment is None:
        raise ValueError(f"the {data.design!r} design has no coins")
    return data.assignment.assign(design=RANDOM, seed=cfg.membership_seed, unit=cfg.coin_unit)


# ------------------------------------------------------------------------------------- one file of records
HUB_PREFIX = "hub:"


def _text_lines(path: Path, text_field: str) -> pd.DataFrame:
    """A text file, one record a line (blank lines hold none): the frame's index is each line's position."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ConfigError(_utf8_problem(path, exc)) from None
    kept = [(n, line) for n, line in enumerate(lines) if line.strip()]
    return pd.DataFrame({text_field: [line for _, line in kept]}, index=[n for n, _ in kept])


def check_record_source(source: str, names: dict[str, str] | None = None) -> None:
    """Refuse, without reading it, a records source :func:`read_records` would refuse before reading: a
    `hub:` source not written `hub:NAME:SPLIT`, a path that is not a file. Same messages, `names` rewording the
    study fields they name (e.g. `data.source` -> `audit.members`); cheap enough to run before any heavy import."""
    try:
        _locate_source(source)
    except ConfigError as exc:
        raise renamed_fields(exc, names) if names else exc from None


def _locate_source(source: str) -> tuple[str, str] | Path:
    """A hub source's (name, split), or a local file's path; a ConfigError for any other."""
    if source.startswith(HUB_PREFIX):
        name, _, split = source[len(HUB_PREFIX):].rpartition(":")
        if not name or not split:
            raise ConfigError(f"data.source: {source!r}: a hub split is written hub:NAME:SPLIT, e.g. "
                              "hub:sarus-tech/phee:train")
        return name, split
    path = Path(source).expanduser()
    if not path.is_file():
        kind = "a folder, not a file" if path.is_dir() else "not found"
        raise ConfigError(f"data.source: {source} is {kind} (looked for {os.path.abspath(path)}); give a .jsonl, "
                          ".csv, .parquet or .txt file (one record a line), or hub:NAME:SPLIT")
    return path


def _one_source(source: str, cfg: DataConfig) -> tuple[pd.DataFrame, _Origin]:
    """The raw frame of a file or a `hub:NAME:SPLIT` split, and where it came from."""
    where = _locate_source(source)
    if isinstance(where, tuple):
        name, split = where
        return _hub_splits(cfg.model_copy(update={"source": name}), Path(name), [split])[split]
    path = where
    if path.suffix.lower() == ".txt":
        return _text_lines(path, cfg.text_field), _Origin(str(path), path)
    return _read_file(path), _Origin(str(path), path)


def _missing_text_field(frame: pd.DataFrame, cfg: DataConfig, origin: _Origin) -> str:
    """No record has the text field: the first record's place and fields, or the file's columns."""
    raw = origin.record(0) if len(frame) else None
    if raw is not None:
        return (f"data.text_field: {origin.where(0)}: the record has no {cfg.text_field!r} field (its fields: "
                f"{sorted(raw)}), nor does any other; set data.text_field to the field that holds the text")
    return (f"data.text_field: {origin.label}: no column {cfg.text_field!r}; its columns: {list(frame.columns)}; "
            "set data.text_field to the column that holds the text")


def read_records(source: str, *, what: str, text_field: str = "text", id_field: str | None = "id",
                 group: str | None = None, keep: tuple[str, ...] = (),
                 names: dict[str, str] | None = None, places: bool = False) -> pd.DataFrame:
    """The records of one file (JSON lines, CSV, parquet, or text with one record a line) or hub split
    (`hub:NAME:SPLIT`, through `datasets`, which honours HF_HUB_OFFLINE), checked as a study's splits are: a
    record without a text names its file, line and field. Ids come from `id_field` where the file has that
    column (else `<what>-<row>`), groups from `group` (a column or a regex over the id); blank and repeated
    texts are dropped (said once). Returns sample_id, text[, group] and the `keep` columns the file has (and, with
    `places`, `place`: where each record is in its source, `<file> line 12`, for the caller's own messages).
    `names` rewords the study fields the messages name (`data.text_field` -> the caller's own field)."""
    try:
        cfg = DataConfig(source=source, text_field=text_field, id_field=id_field, group=group, utility_split=None)
        frame, origin = _one_source(source, cfg)
        if frame.empty:
            raise ConfigError(f"data.source: {origin.label} holds no records")
        if text_field not in frame.columns:
            raise ConfigError(_missing_text_field(frame, cfg, origin))
        if id_field is not None and id_field not in frame.columns:
            cfg = cfg.model_copy(update={"id_field": None})
        out = _normalise(frame, cfg, what, origin)
        if places:
            out["place"] = [origin.where(int(position)) for position in frame.index]
    except ConfigError as exc:
        raise renamed_fields(exc, names) if names else exc from None
    for column in keep:
        if column in frame.columns:
            out[column] = frame[column].to_numpy()
    report: list[str] = []
    out = _clean(out, what, report)
    _warn_once(cfg, report)
    return out
