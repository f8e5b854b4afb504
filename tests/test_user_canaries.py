"""An audit's canary files (`--canaries`): inserted canaries and their held-out twins, from a file of records with an
`inserted` column or from memaudit's manifest, and how the audit's records hold them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest

from memlens.auditing.records import load_audit_records
from memlens.config import AuditConfig, ConfigError
from memlens.data.user_canaries import HELD_OUT, MANIFEST_NAME, read_canaries

MEMBERS = [f"member record number {i} about a drug and its effect" for i in range(6)]
NON_MEMBERS = [f"non-member record number {i} about another drug" for i in range(6)]


def _jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _memaudit_entry(i: int, included: bool, repetitions: int, role: str = "candidate", secret: str | None = None):
    """A canary of memaudit 0.2.0's inject() manifest, with every field inject() writes (memaudit.types.Canary's
    fields, then its coin `included`, the record format `fmt` and the secret's token span)."""
    secret = secret or f" zq{i}vex plorth{i} mab{i}uk"
    return {"id": f"c-high_ppl-{i:04d}", "family": "high_ppl", "secret": secret, "secret_token_ids": [5, 6, 7],
            "prefix": secret[:6], "prefix_token_ids": [5], "secret_span": [7, 10], "repetitions": repetitions,
            "role": role, "generation_notes": "uniform-from-vocab", "metadata": {"source": "uniform_vocab"},
            "requested_family": "high_ppl", "actual_generator": "uniform_vocab", "included": included, "fmt": "text"}


def _manifest(entries: list[dict], fmt: str = "text") -> dict:
    """memaudit 0.2.0's inject() manifest around `entries` (schema 1.0.0, as memaudit.injection.inject builds it)."""
    return {"schema_version": "1.0.0", "seed": 0, "include_prob": 0.5, "fmt": fmt,
            "n_candidates": sum(e["role"] != "control" for e in entries),
            "n_controls": sum(e["role"] == "control" for e in entries),
            "n_inserted_canaries": sum(e.get("included") is True for e in entries),
            "n_inserted_records": sum(e["repetitions"] for e in entries if e.get("included") is True),
            "placement": {"strategy": "standalone_records", "secret_side": "text body", "note": "..."},
            "canaries": entries, "warnings": [], "manifest_hash": "0" * 64}


MANIFEST = _manifest([_memaudit_entry(0, True, 4), _memaudit_entry(1, True, 16), _memaudit_entry(2, False, 4),
                      _memaudit_entry(3, False, 1, "control"), _memaudit_entry(4, False, 1, "control")])


def test_a_record_file_with_inserted_and_held_out_canaries(tmp_path):
    path = _jsonl(tmp_path / "canaries.jsonl", [
        {"id": "a", "text": "Patient MRN 4812093377 had a rash.", "inserted": True, "copies": 4,
         "secret": "4812093377"},
        {"id": "b", "text": "Patient MRN 1111111111 had a rash.", "inserted": False, "copies": 4},
        {"id": "c", "text": "Patient MRN 2222222222 had a cough.", "inserted": 1},
        {"id": "d", "text": "Patient MRN 3333333333 had a cough.", "inserted": "false"}])
    found = read_canaries(str(path))
    frame = found.frame.set_index("canary_id")
    assert list(frame.inserted) == [True, False, True, False] and (found.n_inserted, found.n_held_out) == (2, 2)
    assert list(frame.copies) == [4, 0, 1, 0]  # a held-out canary is in the training set 0 times
    assert frame.loc["a", "secret"] == "4812093377" and pd.isna(frame.loc["c", "secret"])
    csv = tmp_path / "canaries.csv"
    csv.write_text("id,text,inserted\nx,first canary text,TRUE\ny,second canary text,0\n")
    assert list(read_canaries(str(csv)).frame.inserted) == [True, False]
    plain = _jsonl(tmp_path / "plain.jsonl", [{"text": "a canary"}, {"text": "another canary"}])
    assert list(read_canaries(str(plain)).frame.inserted) == [True, True]  # no column: every canary inserted


def test_bad_record_files_are_refused_naming_file_line_and_field(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"text": "one", "inserted": True}, {"text": "two", "inserted": "yes"}])
    with pytest.raises(ConfigError, match=rf"audit.canaries: {path} line 2: "
                                          r"`inserted` is 'yes'; write true or false"):
        read_canaries(str(path))
    path = _jsonl(tmp_path / "n.jsonl", [{"text": "one", "inserted": True}, {"text": "two", "inserted": None}])
    with pytest.raises(ConfigError, match=r"n.jsonl line 2: `inserted` is missing"):
        read_canaries(str(path))
    csv = tmp_path / "c.csv"
    csv.write_text("text,inserted\none,true\ntwo,2\n")
    with pytest.raises(ConfigError, match=r"c.csv data row 2 \(after the header\): `inserted` is '2'"):
        read_canaries(str(csv))
    path = _jsonl(tmp_path / "i.jsonl", [{"text": "one", "included": True}, {"text": "two", "included": False}])
    with pytest.raises(ConfigError, match=r"has a column 'included' but no `inserted`.*rename 'included'"):
        read_canaries(str(path))
    path = _jsonl(tmp_path / "h.jsonl", [{"text": "one", "inserted": False}, {"text": "two", "inserted": 0}])
    with pytest.raises(ConfigError, match=r"no canary is inserted \(every one is held out\)"):
        read_canaries(str(path))
    path = _jsonl(tmp_path / "k.jsonl", [{"text": "one", "inserted": True, "copies": 0}])
    with pytest.raises(ConfigError, match=r"k.jsonl line 1: `copies` is 0; an inserted canary is in the training "
                                          r"set 1 or more times"):
        read_canaries(str(path))


def test_memaudits_manifest_as_inject_wrote_it(tmp_path):
    folder = tmp_path / "trainer-out"
    folder.mkdir()
    (folder / MANIFEST_NAME).write_text(json.dumps(MANIFEST))
    for source in (folder, folder / MANIFEST_NAME):  # the folder memaudit's callback wrote it in, or the file
        found = read_canaries(str(source))
        assert found.kind == "memaudit" and found.source == str(folder / MANIFEST_NAME)
        frame = found.frame
        assert list(frame.canary_id) == [f"c-high_ppl-{i:04d}" for i in range(5)]
        assert list(frame.inserted) == [True, True, False, False, False]
        assert list(frame.copies) == [4, 16, 0, 0, 0]  # the candidate that lost its coin was never inserted
        assert frame.text[0] == "MEMAUDIT RECOVERY PHRASE:  zq0vex plorth0 mab0uk"  # its record format's text
        assert frame.secret.isna().all() and "no exposure" in found.notes[0]
    renamed = tmp_path / "coins.json"  # any JSON object with memaudit's canaries list
    renamed.write_text(json.dumps(_manifest([_memaudit_entry(0, True, 1)], fmt="prompt_completion") |
                                  {"canaries": [{**_memaudit_entry(0, True, 1), "fmt": "prompt_completion"}]}))
    assert read_canaries(str(renamed)).frame.text[0] == ("Please store my account recovery phrase.Your recovery "
                                                         "phrase is  zq0vex plorth0 mab0uk")
    chat = {**_memaudit_entry(0, True, 2), "fmt": "messages"}
    renamed.write_text(json.dumps(_manifest([chat], fmt="messages")))
    found = read_canaries(str(renamed))
    assert found.frame.text[0].startswith("Please store my account recovery phrase.\nYour recovery phrase is ")
    assert any("chat template" in n for n in found.notes)


def test_damaged_manifests_are_refused(tmp_path):
    path = tmp_path / MANIFEST_NAME
    entry = _memaudit_entry(0, True, 4)
    for change, message in (({"included": "true"}, r"canaries\[0\] \(id 'c-high_ppl-0000'\): `included` is 'true'"),
                            ({"fmt": "sharegpt"}, r"record format `fmt` is 'sharegpt'"),
                            ({"repetitions": 0}, r"`repetitions` is 0"),
                            ({"role": "control"}, r"a `control` canary marked included")):
        path.write_text(json.dumps(_manifest([{**entry, **change}])))
        with pytest.raises(ConfigError, match=message):
            read_canaries(str(path))
    path.write_text(json.dumps(_manifest([{k: v for k, v in entry.items() if k != "included"}])))
    with pytest.raises(ConfigError, match=r"`included` is missing; memaudit's inject\(\) writes true or false"):
        read_canaries(str(path))
    path.write_text(json.dumps([entry]))  # generate_canaries()' list has no coins
    with pytest.raises(ConfigError, match=r"not a memaudit manifest with canaries .* each with its `included` coin"):
        read_canaries(str(path))
    path.write_text(json.dumps(_manifest([entry, {**entry, "id": "other"}])))
    with pytest.raises(ConfigError, match="two canaries have the same secret"):
        read_canaries(str(path))
    with pytest.raises(ConfigError, match=f"{MANIFEST_NAME} is not found"):
        read_canaries(str(tmp_path / "elsewhere" / MANIFEST_NAME))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=f"is a folder without {MANIFEST_NAME}"):
        read_canaries(str(empty))


@pytest.fixture
def files(tmp_path):
    members = _jsonl(tmp_path / "members.jsonl", [{"id": f"m{i}", "text": t} for i, t in enumerate(MEMBERS)])
    non_members = _jsonl(tmp_path / "non.jsonl", [{"id": f"n{i}", "text": t} for i, t in enumerate(NON_MEMBERS)])
    return tmp_path, str(members), str(non_members)


def _records(files, canaries):
    _, members, non_members = files
    cfg = AuditConfig(target="adapter", members=members, non_members=non_members, canaries=str(canaries))
    return load_audit_records(cfg, SimpleNamespace(kind="adapter"))


def test_audit_records_add_only_inserted_canaries_to_the_members(files):
    root = files[0]
    canaries = _jsonl(root / "canaries.jsonl", [
        {"id": "canary-a", "text": "Patient MRN 4812093377 had a rash.", "inserted": True, "copies": 4,
         "secret": "4812093377"},
        {"id": "b", "text": "Patient MRN 1111111111 had a rash.", "inserted": False},
        {"id": "c", "text": "Patient MRN 2222222222 had a cough.", "inserted": True, "copies": 16},
        {"id": "d", "text": "Patient MRN 3333333333 had a cough.", "inserted": False}])
    records = _records(files, canaries)
    assert records.inserted == {"canary:a", "canary:c"} and records.held_out == {"canary:b", "canary:d"}
    flagged = records.members[records.members.is_canary]
    assert set(flagged.sample_id) == {"canary:a", "canary:c"} and len(records.members) == 8
    assert not records.members.text.str.contains("1111111111|3333333333").any()  # held out: never trained on
    assert records.in_metrics().sum() == 12  # 6 members and 6 non-members; the canaries are apart
    assert [(c.sample_id, c.copies, c.secret, c.secret_format) for c in records.canaries] == [
        ("canary:a", 4, "4812093377", "digits:10"), ("canary:c", 16, None, None)]
    frame = records.canary_frame
    assert list(frame.columns) == ["canary_id", "family", "text", "is_member", "copies"]
    assert frame[["canary_id", "family", "is_member", "copies"]].values.tolist() == [
        ["canary:a", "copies4", True, 4], ["canary:b", HELD_OUT, False, 0], ["canary:c", "copies16", True, 16],
        ["canary:d", HELD_OUT, False, 0]]
    assert frame.text.tolist() == records.canary_file.text.tolist()


def test_audit_records_from_a_manifest_and_the_refusals(files):
    root = files[0]
    (root / MANIFEST_NAME).write_text(json.dumps(MANIFEST))
    records = _records(files, root / MANIFEST_NAME)
    assert records.inserted == {"canary:c-high_ppl-0000", "canary:c-high_ppl-0001"} and len(records.held_out) == 3
    assert records.canary_frame.family.tolist() == ["copies4", "copies16", HELD_OUT, HELD_OUT, HELD_OUT]
    assert [c.secret for c in records.canaries] == [None, None] and "no exposure" in records.notes[0]
    assert records.sources["canaries"] == str(root / MANIFEST_NAME)
    trained = _jsonl(root / "trained.jsonl", [{"text": "a canary text", "inserted": True},
                                              {"text": MEMBERS[2], "inserted": False}])
    with pytest.raises(ConfigError, match=r"1 text\(s\) occur in both the held-out canaries .* and the members"):
        _records(files, trained)
    leaked = _jsonl(root / "leaked.jsonl", [{"text": NON_MEMBERS[0], "inserted": True}])
    with pytest.raises(ConfigError, match=r"1 text\(s\) occur in both the canaries .* and the non-members"):
        _records(files, leaked)


def test_without_a_canary_file_the_frame_is_empty(files):
    _, members, non_members = files
    records = load_audit_records(AuditConfig(target="adapter", members=members, non_members=non_members),
                                 SimpleNamespace(kind="adapter"))
    assert records.canary_frame.empty and list(records.canary_frame.columns) == ["canary_id", "family", "text",
                                                                                 "is_member", "copies"]
    assert records.held_out == frozenset() and isinstance(records.canary_frame, pd.DataFrame)
