"""Bad data files and bad model locations fail with a ConfigError that names the file, the line or record,
the config field and what to do (issue #18), instead of a parser's or the hub client's own message."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from memlens.config import ConfigError, DataConfig, ModelConfig
from memlens.data import load_study_data
from memlens.models import (
    check_max_length,
    load_base_model,
    load_tokenizer,
    model_context_length,
)
from memlens.models.loading import load_model_config
from tests.conftest import GPT2_SMALL, LLAMA_TINY

GOOD = b'{"id": "a1", "context": "alpha one"}\n{"id": "a2", "context": "beta two"}\n'
TEST = b'{"id": "b1", "context": "gamma three"}\n'


def _folder(tmp_path: Path, train: bytes, test: bytes = TEST, ext: str = "jsonl") -> Path:
    (tmp_path / f"train.{ext}").write_bytes(train)
    (tmp_path / f"test.{ext}").write_bytes(test)
    return tmp_path


def _load(folder: Path, **fields):
    return load_study_data(DataConfig(source=str(folder), utility_split=None, **fields))


# --------------------------------------------------------------------------------------- data
def test_a_bad_json_line_names_the_file_and_line(tmp_path):
    # was pandas' "Unexpected character found when decoding object value at position 87"
    folder = _folder(tmp_path, GOOD + b"\n" + b'{"id": "a3", "context": "delta four"\n')
    with pytest.raises(ConfigError) as err:
        _load(folder)
    msg = str(err.value)
    assert msg.startswith(f"data.source: {folder / 'train.jsonl'} line 4: not valid JSON (")
    assert "column 37" in msg and "each line must be one JSON object" in msg and "position" not in msg


def test_a_line_that_is_not_an_object_names_its_line(tmp_path):
    with pytest.raises(ConfigError, match=r"train.jsonl line 3: a JSON list, not an object"):
        _load(_folder(tmp_path, GOOD + b'["a3", "delta four"]\n'))


def test_a_record_without_the_text_field_names_its_line_and_the_field(tmp_path):
    # was a tokenizer TypeError much later (or the text "nan")
    folder = _folder(tmp_path, GOOD + b'{"id": "a3", "body": "delta four"}\n')
    with pytest.raises(ConfigError) as err:
        _load(folder)
    msg = str(err.value)
    assert msg.startswith(f"data.text_field: {folder / 'train.jsonl'} line 3: the record has no 'context' field "
                          "(its fields: ['body', 'id'])")
    assert "set data.text_field" in msg


@pytest.mark.parametrize("value, said", [(b"null", "'context' is null"),
                                         (b"42", "'context' is a number (42), not text"),
                                         (b'["x"]', "'context' is a list")])
def test_a_null_or_non_string_text_names_its_record(tmp_path, value, said):
    folder = _folder(tmp_path, GOOD + b'{"id": "a3", "context": ' + value + b"}\n")
    with pytest.raises(ConfigError, match=f"data.text_field: .*train.jsonl line 3: {said}".replace("(", r"\(")
                       .replace(")", r"\)").replace("[", r"\[")):
        _load(folder)


def test_a_null_text_in_a_parquet_file_and_in_a_single_file_names_its_record(tmp_path):
    frame = pd.DataFrame({"id": ["a1", "a2", "a3"], "context": ["alpha", None, "gamma"]})
    frame.to_parquet(tmp_path / "train.parquet")
    pd.DataFrame({"id": ["b1"], "context": ["delta"]}).to_parquet(tmp_path / "test.parquet")
    with pytest.raises(ConfigError, match=r"train.parquet record 1 \(counting from 0\): 'context' is null"):
        _load(tmp_path)
    both = pd.concat([frame.assign(split="test"), pd.DataFrame({"id": ["t"], "context": ["x"], "split": "train"})])
    both.to_json(tmp_path / "all.jsonl", orient="records", lines=True)
    with pytest.raises(ConfigError, match=r"all.jsonl line 2: 'context' is null"):  # its line in the whole file
        load_study_data(DataConfig(source=str(tmp_path / "all.jsonl"), utility_split=None))


def test_a_record_without_an_id_names_its_line(tmp_path):
    with pytest.raises(ConfigError,
                       match=r"data.id_field: .*train.jsonl line 3: the record has no 'id'.*id_field: null"):
        _load(_folder(tmp_path, GOOD + b'{"context": "delta four"}\n'))


@pytest.mark.parametrize("ext, empty", [("jsonl", b""), ("csv", b""), ("csv", b"id,context\n")])
def test_an_empty_split_names_the_file_and_the_split_field(tmp_path, ext, empty):
    # was "column 'context' not in split 'test'; columns: []"
    train = GOOD if ext == "jsonl" else b"id,context\na1,alpha one\n"
    folder = _folder(tmp_path, train, empty, ext)
    with pytest.raises(ConfigError) as err:
        _load(folder)
    assert str(err.value) == (f"data.non_member_split: split 'test' has no records: {folder / f'test.{ext}'} is "
                              "empty; add records to it or set data.non_member_split to another split")


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_a_byte_that_is_not_utf8_names_the_line(tmp_path, ext):
    # was "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9 in position 98"
    if ext == "jsonl":
        train = GOOD + '{"id": "a3", "context": "café"}\n'.encode("latin-1")
        column = 29
    else:
        train = "id,context\na1,alpha\na2,café\n".encode("latin-1")
        column = 7
    folder = _folder(tmp_path, train, b'id,context\nb1,x\n' if ext == "csv" else TEST, ext)
    with pytest.raises(ConfigError) as err:
        _load(folder)
    msg = str(err.value)
    assert msg.startswith(f"data.source: {folder / f'train.{ext}'} line 3, column {column}: byte 0xe9 is not "
                          "UTF-8 text")
    assert "iconv" in msg


def test_a_missing_data_folder_is_not_read_as_a_hub_id(tmp_path):
    with pytest.raises(ConfigError, match=r"data.source: \.\./no-such-folder/phee does not exist \(looked for "):
        load_study_data(DataConfig(source="../no-such-folder/phee"))


def test_an_offline_hub_dataset_says_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="data.source: 'memlens-test/no-such-dataset' is read as a hub dataset id, "
                                          "but HF_HUB_OFFLINE=1 \\(offline\\)"):
        load_study_data(DataConfig(source="memlens-test/no-such-dataset"))


# --------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("name", ["../no-such-folder/llama-tiny", "./models/nope", "~/no-such-model-folder",
                                  "models/tiny/nope"])
@pytest.mark.parametrize("load", [load_tokenizer, load_base_model, load_model_config])
def test_a_missing_model_folder_is_not_read_as_a_hub_id(name, load):
    # was "Repo id must be in the form 'repo_name' or 'namespace/repo_name': '../no-such-folder/llama-tiny'"
    with pytest.raises(ConfigError) as err:
        load(ModelConfig(name_or_path=name))
    msg = str(err.value)
    assert msg.startswith(f"model.name_or_path: folder {name} does not exist (looked for /")
    assert "Repo id" not in msg


def _partial_copy(src: Path, dst: Path, names: list[str]) -> Path:
    dst.mkdir()
    for name in names:
        shutil.copy(src / name, dst / name)
    return dst


def test_a_folder_without_tokenizer_files_says_which_files_are_missing(tmp_path):
    # was "Couldn't instantiate the backend tokenizer ... You need to have sentencepiece or tiktoken installed"
    folder = _partial_copy(LLAMA_TINY, tmp_path / "m", ["config.json", "tokenizer_config.json"])
    with pytest.raises(ConfigError) as err:
        load_tokenizer(ModelConfig(name_or_path=str(folder)))
    msg = str(err.value)
    assert msg.startswith(f"model.name_or_path: folder {folder} has no tokenizer files (none of tokenizer.json, "
                          "tokenizer.model, vocab.json + merges.txt")
    assert "it has: config.json, tokenizer_config.json" in msg and "sentencepiece or tiktoken" not in msg
    (folder / "vocab.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"it has vocab.json but not merges.txt"):
        load_tokenizer(ModelConfig(name_or_path=str(folder)))


def test_a_folder_without_weights_or_config_says_so(tmp_path):
    folder = _partial_copy(LLAMA_TINY, tmp_path / "m", ["config.json", "tokenizer.json"])
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        load_base_model(ModelConfig(name_or_path=str(folder), device="cpu"))
    msg = str(err.value)
    assert msg.startswith(f"model.name_or_path: folder {folder} has no safetensors weights (model.safetensors or "
                          "model.safetensors.index.json)")
    assert "not pytorch_model.bin" in msg and "safe_serialization=True" in msg
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match=f"folder {folder} has no config.json"):
        load_base_model(ModelConfig(name_or_path=str(folder), device="cpu"))
    with pytest.raises(ConfigError, match=f"folder {folder} has no config.json"):
        load_model_config(ModelConfig(name_or_path=str(folder)))


@pytest.mark.parametrize("load, what", [(load_tokenizer, "tokenizer"), (load_base_model, "safetensors weights"),
                                        (load_model_config, "config.json")])
def test_an_uncached_hub_id_offline_names_the_field_and_says_offline(monkeypatch, load, what):
    # was "We couldn't connect to 'https://huggingface.co' to load the files ... Check your internet connection"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        load(ModelConfig(name_or_path="memlens-test/no-such-model", device="cpu"))
    assert str(err.value) == (
        "model.name_or_path: 'memlens-test/no-such-model' is read as a hub model id, but HF_HUB_OFFLINE=1 "
        f"(offline) and it is not in the local hub cache (no {what}); download it once with the hub on (unset "
        "HF_HUB_OFFLINE), or set model.name_or_path to a local folder")


# --------------------------------------------------------------------------------------- max_length
def test_max_length_beyond_the_models_context_is_refused():
    gpt2 = ModelConfig(name_or_path=str(GPT2_SMALL))
    assert model_context_length(gpt2) == (512, "n_positions")
    with pytest.raises(ConfigError) as err:
        check_max_length(gpt2, 2048)
    assert str(err.value) == (
        f"data.max_length: 2048 tokens is more than the context of model {GPT2_SMALL} (512 tokens, n_positions "
        "in its config.json); set data.max_length to 512 or less")
    check_max_length(gpt2, 512)
    llama = ModelConfig(name_or_path=str(LLAMA_TINY))
    check_max_length(llama, 512)
    with pytest.raises(ConfigError, match=r"data.max_length: 513 tokens .* \(512 tokens, max_position_embeddings"):
        check_max_length(llama, 513)
