"""What `audit.target` names when it names nothing here: a typo'd folder is said to be missing first (with the path
it was looked for at), then what a hub id would need; nothing heavy is loaded to say so."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from memlens.auditing.target import check_target, resolve_target
from memlens.config import ConfigError, load_audit

from .conftest import LLAMA_TINY


def _resolve(target: str, **fields):
    return resolve_target(load_audit(raw={"target": target, **fields}))


def test_a_typod_relative_target_is_a_missing_folder_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-lora-v2").mkdir()
    message = rf"^audit.target: there is no folder named 'my-lora' here \({re.escape(str(tmp_path / 'my-lora'))} " \
              r"does not exist\): check its name and the folder memlens runs from. Nor is it a hub model id: " \
              r"a hub model id is written owner/name, downloaded \(network on, HF_HUB_OFFLINE unset\), " \
              r"and needs --base"
    with pytest.raises(ConfigError, match=message):
        _resolve("my-lora")
    with pytest.raises(ConfigError, match=message):  # with --base too: the folder is what is missing
        _resolve("my-lora", base=str(LLAMA_TINY))
    with pytest.raises(ConfigError, match=rf"audit.target: there is no folder ./runs/x \({re.escape(str(tmp_path))}"
                                          r"/runs/x does not exist\)"):
        _resolve("./runs/x")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="notes.txt is a file"):
        check_target("notes.txt")
    check_target("my-lora-v2")  # a folder: its kind is resolve_target's to say
    check_target("owner/model")  # may be a hub id


def test_an_owner_name_target_without_base_says_there_is_no_such_folder_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError,
                       match=rf"^audit.base: there is no folder owner/model here \({re.escape(str(tmp_path))}"
                             r"/owner/model\), so the target is read as a hub model id, a full model: give "
                             r"the model it was fine-tuned from \(--base\)"):
        _resolve("owner/model")


def test_checking_a_target_imports_no_torch():
    code = ("import sys; from memlens.auditing.target import check_target; from memlens.config import load_audit; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
