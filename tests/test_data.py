"""Data loading, validation and canary planting (no model needed)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from memlens.config import CanaryConfig, ConfigError, DataConfig
from memlens.data import build_training_set, check_record_source, load_study_data, refuse_shared_texts
from tests.conftest import PHEE


def _frames():
    train = pd.DataFrame({"id": [f"a{i}" for i in range(6)],
                          "context": ["alpha one", "beta two", "gamma three", "  ", "beta two", "delta four"]})
    test = pd.DataFrame({"id": [f"b{i}" for i in range(3)], "context": ["eps five", "zeta six", "eta seven"]})
    return train, test


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_folder_of_split_files_with_empties_and_duplicates_reported(tmp_path, ext):
    train, test = _frames()
    for name, frame in (("train", train), ("test", test)):
        path = tmp_path / f"{name}.{ext}"
        if ext == "jsonl":
            frame.to_json(path, orient="records", lines=True)
        elif ext == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path)
    data = load_study_data(DataConfig(source=str(tmp_path), utility_split=None))
    assert data.members.text.tolist() == ["alpha one", "beta two", "gamma three", "delta four"]
    assert list(data.members.columns) == ["sample_id", "text"] and len(data.non_members) == 3
    assert any("1 empty" in line for line in data.report) and any("1 exact duplicate" in line for line in data.report)


def test_single_file_with_split_column(tmp_path):
    train, test = _frames()
    frame = pd.concat([train.assign(part="train"), test.assign(part="test")])
    frame.to_csv(tmp_path / "all.csv", index=False)
    data = load_study_data(DataConfig(source=str(tmp_path / "all.csv"), split_field="part", utility_split=None))
    assert len(data.members) == 4 and data.non_members.sample_id.tolist() == ["b0", "b1", "b2"]
    with pytest.raises(ConfigError, match="data.split_field: column 'split' not in"):
        load_study_data(DataConfig(source=str(tmp_path / "all.csv"), utility_split=None))
    with pytest.raises(ConfigError, match=r"split 'dev' not in column 'part'; values: \['test', 'train'\]"):
        load_study_data(DataConfig(source=str(tmp_path / "all.csv"), split_field="part"))


def test_shared_member_and_non_member_texts_refused_unless_allowed(tmp_path):
    train, test = _frames()
    test.loc[0, "context"] = "alpha one"  # also a member
    train.to_json(tmp_path / "train.jsonl", orient="records", lines=True)
    test.to_json(tmp_path / "test.jsonl", orient="records", lines=True)
    with pytest.raises(ConfigError, match="1 text.* occur in both 'train' and 'test'.*allow_shared_texts"):
        load_study_data(DataConfig(source=str(tmp_path), utility_split=None))
    data = load_study_data(DataConfig(source=str(tmp_path), utility_split=None, allow_shared_texts=True))
    assert "alpha one" not in set(data.non_members.text) and "alpha one" in set(data.members.text)


def test_bad_fields_name_the_columns(tmp_path):
    with pytest.raises(ConfigError, match=r"data.text_field: column 'body' not in split 'train'"):
        load_study_data(DataConfig(source=str(PHEE), text_field="body"))
    with pytest.raises(ConfigError, match="folder .* does not exist|could not load"):
        load_study_data(DataConfig(source=str(tmp_path / "nope"), format="folder"))


def test_seeded_subset_of_phee():
    a = load_study_data(DataConfig(source=str(PHEE), subset=50, subset_seed=3))
    b = load_study_data(DataConfig(source=str(PHEE), subset=50, subset_seed=3))
    c = load_study_data(DataConfig(source=str(PHEE), subset=50, subset_seed=4))
    assert len(a.members) == len(a.non_members) == len(a.utility) == 50
    assert a.members.sample_id.tolist() == b.members.sample_id.tolist()
    assert a.members.sample_id.tolist() != c.members.sample_id.tolist()
    assert a.data_hash == b.data_hash != c.data_hash


@pytest.fixture(scope="module")
def members():
    return load_study_data(DataConfig(source=str(PHEE), subset=40)).members


def test_repeat_canary_keeps_size_and_records_identity(members):
    ts = build_training_set(members, CanaryConfig(mode="repeat"), copies=8, seed=1)
    assert len(ts.texts) == len(members)  # n-1 records displaced by the copies
    assert ts.texts.count(ts.canary.text) == 8 and ts.canary.copies == 8
    assert ts.canary.sample_id in set(members.sample_id)
    assert len(ts.members) == len(members) - 7 and ts.members.is_canary.sum() == 1  # displaced are not members
    assert set(ts.texts) == set(ts.members.text)
    again = build_training_set(members, CanaryConfig(mode="repeat"), copies=8, seed=1)
    other = build_training_set(members, CanaryConfig(mode="repeat"), copies=8, seed=2)
    assert again.canary == ts.canary and other.canary.sample_id != ts.canary.sample_id
    with pytest.raises(ValueError, match="grid.canary_copies: 41 copies exceed the 40 training records"):
        build_training_set(members, CanaryConfig(mode="repeat"), copies=41, seed=1)


def test_insert_canary_adds_copies_of_a_secret_record(members):
    ts = build_training_set(members, CanaryConfig(mode="insert", secret_format="hex:6"), copies=5, seed=0)
    assert len(ts.texts) == len(members) + 5 and ts.texts.count(ts.canary.text) == 5
    assert len(ts.canary.secret) == 6 and set(ts.canary.secret) <= set("0123456789abcdef")
    assert ts.canary.text == ts.canary.prefix + ts.canary.secret + ts.canary.text[len(ts.canary.prefix) + 6:]
    assert ts.members.is_canary.sum() == 1 and len(ts.members) == len(members) + 1
    given = build_training_set(members, CanaryConfig(mode="insert", text="My secret is 1234."), copies=2, seed=0)
    assert given.canary.secret is None and given.texts.count("My secret is 1234.") == 2


def test_a_record_without_its_document_is_refused_in_both_forms_of_data_group(tmp_path):
    """A null or missing group would put every such record in one document (one coin): refused, as an id that
    names no document is in the regular-expression form."""
    train = [{"id": "1_a", "context": "alpha", "doc": "1"}, {"id": "2_b", "context": "beta", "doc": None},
             {"id": "x", "context": "gamma"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "test.jsonl").write_text(json.dumps({"id": "3_c", "context": "delta", "doc": "3"}) + "\n")
    with pytest.raises(ConfigError, match=r"data.group: .*train.jsonl line 2: the record has no 'doc' \(missing or "
                                          r"null; 2 record\(s\) of split 'train' in all\)"):
        load_study_data(DataConfig(source=str(tmp_path), utility_split=None, group="doc"))
    with pytest.raises(ConfigError, match=r"data.group: the id 'x' of split 'train' .* does not match"):
        load_study_data(DataConfig(source=str(tmp_path), utility_split=None, group=r"^(\d+)_"))
    train[1]["doc"], train[2]["doc"], train[2]["id"] = "2", "2", "2_c"
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    for group in ("doc", r"^(\d+)_"):
        data = load_study_data(DataConfig(source=str(tmp_path), utility_split=None, group=group))
        assert data.members.group.tolist() == ["1", "2", "2"]


def test_one_rule_for_texts_on_both_sides_and_a_cheap_check_of_a_source(tmp_path):
    refuse_shared_texts(["a", "b"], ["c"], "members", "non-members")  # nothing shared: nothing said
    with pytest.raises(ConfigError, match=r"^MemlensCallback: 2 text\(s\) occur in both the members and the "
                                          r"non-members \(e\.g\. 'a'\); a record cannot be both"):
        refuse_shared_texts(["b", "a", "x"], ["a", "b"], "members", "non-members", where="MemlensCallback")
    check_record_source("hub:owner/name:train")  # a hub split is only parsed, not looked up
    (tmp_path / "m.jsonl").write_text("{}\n")
    check_record_source(str(tmp_path / "m.jsonl"))
    with pytest.raises(ConfigError, match=rf"^audit.members: {tmp_path}/x.jsonl is not found \(looked for "):
        check_record_source(str(tmp_path / "x.jsonl"), {"data.source": "audit.members"})
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        check_record_source(str(tmp_path))
    with pytest.raises(ConfigError, match="a hub split is written hub:NAME:SPLIT"):
        check_record_source("hub:phee")
