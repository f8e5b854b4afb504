"""Documentation generated from the code: the study-file reference comes from the config objects."""

from __future__ import annotations

import json
import re

from pydantic import BaseModel

from memlens.attacks.registry import ATTACKS
from memlens.config import AuditConfig, StudyConfig


def _type_name(annotation) -> str:
    text = str(annotation).replace("typing.", "")
    if isinstance(annotation, type):
        text = annotation.__name__
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", text).replace("NoneType", "null")  # `memlens.config.X` -> `X`


def _default_cell(field) -> str:
    """A field's default as the reference shows it: `required` for fields without one."""
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    if isinstance(default, list) and default and isinstance(default[0], BaseModel):
        default = [d.model_dump(exclude_defaults=True) for d in default]
    return f"`{json.dumps(default)}`"


def _field_rows(fields: dict) -> list[str]:
    """A table of fields: key, type, default, description."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, sub in fields.items():
        typ = _type_name(sub.annotation).replace("|", "\\|")
        desc = (sub.description or "").replace("|", "\\|")
        lines.append(f"| `{key}` | `{typ}` | {_default_cell(sub)} | {desc} |")
    return lines


def _audit_reference() -> list[str]:
    """The `audit:` file (and `memlens audit` options): its own fields, then its `mia` and `extraction` sections,
    the study's."""
    own = {k: f for k, f in AuditConfig.model_fields.items() if k not in ("mia", "extraction", "model")}
    own |= {f"model.{k}": f for k, f in AuditConfig.model_fields["model"].annotation.model_fields.items()}
    return ["### The audit file (`audit:`)", "", "`memlens audit [FILE]` reads these fields from the file's `audit:` "
            "section, and `memlens.audit(...)` takes them as keywords; the first ones are also command-line options "
            "(`--non-members` for `non_members`), and `--set key=value` sets any (`--set mia.bootstrap=200`). "
            "`mia` and `extraction` are the study's sections above; `mia.attacks` defaults to "
            "every attack the audit's inputs allow.", "", *_field_rows(own), ""]


def config_reference_markdown() -> str:
    """One table per section of the study file (key, type, default, description), the attacks, and the audit
    file's fields."""
    top, lines = [], []
    for section, field in StudyConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines += [f"### `{section}`", "", annotation.__doc__.strip().splitlines()[0], "",
                      *_field_rows(annotation.model_fields)]
            lines.append("")
        else:
            desc = field.description or ""
            top.append(f"- `{section}` ({_type_name(annotation)}, default `{field.default}`): {desc}")
    lines += ["### Membership attacks", "", "The attacks `mia.attacks` accepts (higher score = more likely a member), "
              "each with its own settings (`{type: min_k, params: {fraction: 0.1}}`, or `min_k@0.1` for an attack "
              "with one setting):", "", "| attack | needs | settings (default) | what it scores |", "|---|---|---|---|"]
    for name, attack in ATTACKS.items():
        needs = ", ".join(sorted(attack.needs)) or "-"
        settings = "; ".join(f"`{key}` ({_default_cell(field)}): {field.description}"
                             for key, field in attack.settings.model_fields.items()) or "-"
        description = " ".join(attack.description.split())
        cells = (f"`{name}`", needs, settings, description)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join([*top, "", *lines, "", *_audit_reference()]).rstrip("\n")


__all__ = ["config_reference_markdown"]
