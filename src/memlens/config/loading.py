"""Reading a study: a YAML file or a dict, `--set` overrides, validation; and writing it back (`study.yaml`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from memlens.config.errors import ConfigError, format_validation_error, yaml_problem
from memlens.config.schema import StudyConfig


def looks_like_local_path(value: str) -> bool:
    """Whether `data.source` / `model.name_or_path` is meant as a local path rather than a hub id: it starts
    with `.`, `/` or `~`, contains the OS's own separator (when that is not `/`), or has more than one `/`
    (a hub id is `name` or `owner/name`)."""
    if value.startswith((".", "/", "~")) or value.endswith("/"):
        return True
    if any(sep and sep != "/" and sep in value for sep in (os.sep, os.altsep)):
        return True
    return value.count("/") > 1


def hub_offline(kind: Literal["model", "dataset"] = "model") -> str | None:
    """The environment variable that switches the Hugging Face hub off for models (HF_HUB_OFFLINE,
    TRANSFORMERS_OFFLINE) or datasets (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE), or None when it is on."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE" if kind == "model" else "HF_DATASETS_OFFLINE")
    for name in names:
        if os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return name
    return None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a raw config dict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.epochs=1")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"--set {item!r}: the value {value!r} is not valid YAML ({yaml_problem(exc)}). Write lists as "
                f"[2, 4] with both brackets, and quote text that contains : # [ ] {{ }}, e.g. "
                f"--set 'name=\"a: b\"'") from None
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = parsed
    return raw


def read_yaml_file(path: str | Path, what: str = "file", hint: str = "") -> Any:
    """The document of a YAML (or JSON) file: the one reader of memlens' files (study, audit, recipe, study.yaml);
    a missing file, a folder or bad YAML is a ConfigError naming `what` and the path, followed by `hint` (what to do
    about it, where the caller knows)."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path} does not exist{hint}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what}: {path} is a folder, not a file{hint}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}{hint}") from None


def load_study(path: str | Path | None = None, overrides: list[str] | None = None,
               raw: dict[str, Any] | None = None) -> StudyConfig:
    """Read a study from a YAML file (or a dict), apply `--set` overrides and validate it."""
    source = str(path) if path else "<config>"
    if raw is None:
        raw = {}
        if path is not None:
            raw = read_yaml_file(path, "study file") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    raw = apply_overrides(json.loads(json.dumps(raw)), overrides or [])
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, overrides)) from None


def dump_study(study: StudyConfig) -> str:
    """The fully resolved config as YAML (written next to the results)."""
    return yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False)
