"""Documentation generated from the code: the study-file reference comes from the config objects."""

from __future__ import annotations

import json

from pydantic import BaseModel

from memlens.attacks.registry import ATTACKS
from memlens.config import StudyConfig


def _type_name(annotation) -> str:
    text = str(annotation).replace("typing.", "")
    if isinstance(annotation, type):
        text = annotation.__name__
    return text.replace("NoneType", "null")


def _default_cell(field) -> str:
    """A field's default as the reference shows it: `required` for fields without one."""
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    if isinstance(default, list) and default and isinstance(default[0], BaseModel):
        default = [d.model_dump(exclude_defaults=True) for d in default]
    return f"`{json.dumps(default)}`"


def config_reference_markdown() -> str:
    """One table per section of the study file: key, type, default, description."""
    lines = ["# Study file reference", ""]
    for section, field in StudyConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines += [f"## `{section}`", "", annotation.__doc__.strip().splitlines()[0], "",
                      "| key | type | default | description |", "|---|---|---|---|"]
            for key, sub in annotation.model_fields.items():
                typ = _type_name(sub.annotation).replace("|", "\\|")
                desc = (sub.description or "").replace("|", "\\|")
                lines.append(f"| `{key}` | `{typ}` | {_default_cell(sub)} | {desc} |")
            lines.append("")
        else:
            desc = field.description or ""
            lines.insert(2, f"- `{section}` ({_type_name(annotation)}, default `{field.default}`): {desc}")
    lines += ["## Membership attacks", "", "The names `mia.attacks` accepts (higher score = more likely a member):", "",
              "| attack | needs | what it scores |", "|---|---|---|"]
    for name, attack in ATTACKS.items():
        needs = ", ".join(sorted(attack.needs)) or "-"
        description = " ".join(attack.description.split()).replace("|", "\\|")
        lines.append(f"| `{name}` | {needs} | {description} |")
    return "\n".join(lines)


__all__ = ["config_reference_markdown"]
