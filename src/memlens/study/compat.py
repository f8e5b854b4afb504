"""Whether a study may write into a folder that already holds one: the fields its results depend on
must match the stored `study.yaml`. Growing the grid is allowed; a stage's own settings may change only
when that stage is redone (`--force <stage>`)."""

from __future__ import annotations

from memlens.config import ConfigError, StudyConfig
from memlens.store import StudyLayout
from memlens.study.stage import STAGES

# Fields that may change between runs of one study folder: the grid (and the list of membership designs)
# may grow, the executor and device may change; `name`/`out` only label it.
FREE_FIELDS = {"name", "out", "grid", "executor", "model.device", "train.logging_steps", "train.together",
               "mia.enabled", "extraction.enabled", "data.membership"}


class IncompatibleStudyError(ConfigError):
    """The output folder holds a study made with a configuration that its results depend on."""


def _flatten(obj, prefix: str = "") -> dict[str, object]:
    if isinstance(obj, dict):
        out: dict[str, object] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def config_differences(stored: dict, current: dict) -> list[tuple[str, object, object]]:
    """(field, stored value, current value) for every field that determines results and differs."""
    old, new = _flatten(stored), _flatten(current)
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key in FREE_FIELDS or key.split(".")[0] in FREE_FIELDS:
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            diffs.append((key, old.get(key, "<absent>"), new.get(key, "<absent>")))
    return diffs


def check_compatible(study: StudyConfig, layout: StudyLayout, force: list[str]) -> None:
    """Refuse an output folder whose stored study.yaml differs in a field its results depend on, naming
    the fields. Sections of the stages in `force` may differ (those stages are redone for every run)."""
    if not layout.study_file.exists():
        return
    # Read back through the schema: fields added since the folder was written get their defaults.
    stored = layout.read_study().model_dump(mode="json")
    current = study.model_dump(mode="json")
    redone = {s.section for s in STAGES if s.name in force and s.section}
    diffs = [d for d in config_differences(stored, current) if d[0].split(".")[0] not in redone]
    if diffs:
        lines = "\n".join(f"  {k}: {old!r} (stored) != {new!r} (now)" for k, old, new in diffs)
        sections = ", ".join(f"`{s.section}` with --force {s.name}" for s in STAGES if s.section)
        raise IncompatibleStudyError(
            f"{layout.root} holds a study made with a different configuration:\n{lines}\n"
            "Its runs and results would mix with this one's. Use another --out, or restore these fields "
            f"(adding grid values is allowed; settings may change for a redone stage: {sections})."
        )


__all__ = ["FREE_FIELDS", "IncompatibleStudyError", "check_compatible", "config_differences"]
