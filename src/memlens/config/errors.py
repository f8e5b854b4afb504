"""Error messages of study configurations: :class:`ConfigError` and the wording of pydantic's validation
errors (one line per problem naming the field path, what is wrong and the valid choices)."""

from __future__ import annotations

import re
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from memlens.config.schema import StudyConfig


class ConfigError(ValueError):
    """A study file or override that cannot be used; the message names the field and the fix."""


def format_validation_error(err: ValidationError, source: str, overrides: list[str] | None = None, *,
                            model: type[BaseModel] = StudyConfig, what: str = "study") -> str:
    """One line per problem: `<file>: <field.path>: <what is wrong>`. `overrides` (the `--set key=value`
    items that were applied) lets a problem in an overridden field name the override and its fix; `model` is
    the validated model (a study, or an audit: `what`)."""
    set_by = {}
    for item in overrides or []:
        key, _, value = item.partition("=")
        set_by[key.strip()] = value
    lines = [f"{source}: invalid {what} configuration"]
    for problem in err.errors():
        loc = tuple(problem["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        msg = problem["msg"]
        if problem["type"] == "extra_forbidden":
            msg = f"unknown key; valid keys here: {_valid_keys(loc, model)}"
        elif problem["type"] == "missing":
            msg = _missing_message(loc, model)
        elif problem["type"] == "list_type":
            msg = _list_message(loc, problem.get("input"), set_by, model)
        elif problem["type"] == "value_error":  # our own validators' text, without pydantic's label
            msg = msg.removeprefix("Value error, ")
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def _field_at(loc: tuple, model: type[BaseModel] = StudyConfig) -> FieldInfo | None:
    """The field a validation error's location points at (None inside lists or dicts)."""
    field = None
    for i, part in enumerate(loc):
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        if i < len(loc) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return None
            model = annotation
    return field


def _description(field: FieldInfo | None) -> str:
    """A field's description without a `Required section:` label, starting lowercase (it follows `required; `)."""
    text = (field.description or "").removeprefix("Required section: ") if field else ""
    return text[:1].lower() + text[1:]


# the field a required section cannot do without
_REQUIRED_IN_SECTION = {"data": "source", "model": "name_or_path"}


def _missing_message(loc: tuple, model: type[BaseModel] = StudyConfig) -> str:
    field = _field_at(loc, model)
    if model is StudyConfig and len(loc) == 1 and str(loc[0]) in _REQUIRED_IN_SECTION:
        section = str(loc[0])
        key = _REQUIRED_IN_SECTION[section]
        inner = _field_at((section, key))
        return f"required; add the section with at least {section}.{key}: {_description(inner)}"
    description = _description(field)
    return f"required; {description}" if description else "required"


def _list_message(loc: tuple, value: Any, set_by: dict[str, str], model: type[BaseModel] = StudyConfig) -> str:
    msg = f"expected a list, got {value!r}"
    field_loc = loc
    while field_loc and isinstance(field_loc[-1], int):  # an item of a list of lists: its field
        field_loc = field_loc[:-1]
    path = ".".join(str(p) for p in field_loc)
    if path in set_by:
        try:
            whole = yaml.safe_load(set_by[path])
        except yaml.YAMLError:
            whole = set_by[path]
        suggestion = (_as_list(field_loc, whole, model=model) if field_loc == loc
                      else _as_list(field_loc, whole, wrap=False, model=model))
        if suggestion is not None:
            return f"{msg} (from --set {path}={set_by[path]}); write: --set '{path}={suggestion}'"
        return msg
    if field_loc != loc:
        return f"{msg}; every item of {path} is a list itself, e.g. {_flow([value])}"
    suggestion = _as_list(loc, value, model=model)
    return f"{msg}; write a list, e.g. {path.rsplit('.', 1)[-1]}: {suggestion}" if suggestion else msg


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip()


def _as_list(loc: tuple, value: Any, wrap: bool = True, model: type[BaseModel] = StudyConfig) -> str | None:
    """The value turned into the list the field takes, as YAML flow text (`4` -> `[4]`, `q` -> `[[q]]`,
    `[q]` -> `[[q]]`), if one fits."""
    field = _field_at(loc, model)
    if field is None:
        return None
    candidates = [[value], [[value]]] if wrap else []
    if isinstance(value, list):  # a list whose items should be lists
        candidates.append([v if isinstance(v, list) else [v] for v in value])
    if isinstance(value, str) and "," in value:  # `4,8` -> [4, 8]
        try:
            items = [yaml.safe_load(v) for v in value.split(",")]
        except yaml.YAMLError:
            items = value.split(",")
        candidates = [items, [items]] + candidates
    adapter = TypeAdapter(field.annotation)
    for candidate in candidates:
        try:
            adapter.validate_python(candidate)
        except ValidationError:
            continue
        return _flow(candidate)
    return None


def _valid_keys(loc: tuple, model: type[BaseModel] = StudyConfig) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            break
    return sorted(model.model_fields)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """`while parsing a flow sequence, expected ',' or ']', but got '<stream end>' at column 3` (one line)."""
    parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    text = ", ".join(p for p in parts if p) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{text} at column {mark.column + 1}" if mark is not None else text


def renamed_fields(err: ConfigError, names: dict[str, str]) -> ConfigError:
    """`err` with the study fields its message names replaced by another configuration's (`names`: study field ->
    its own, e.g. `data.text_field` -> `audit.text_field`): the study's checks, said in the words of the file the
    user wrote. Only whole field names are replaced."""
    pattern = re.compile(r"(?<![\w.])(" + "|".join(re.escape(k) for k in sorted(names, key=len, reverse=True))
                         + r")(?![\w])")
    return ConfigError(pattern.sub(lambda m: names[m.group(1)], str(err)))
