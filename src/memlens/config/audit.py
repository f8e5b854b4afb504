"""The audit's configuration: what `memlens audit`, an `audit:` YAML file and `memlens.audit(...)` take.

An audit measures a model someone already fine-tuned (a PEFT adapter, a full model, or a memlens run folder)
on records known to be members and records known not to be. Its fields are the command's options; the
`mia` and `extraction` sections are the study's own (:class:`MIAConfig`, :class:`ExtractionConfig`), except
that `mia.attacks` defaults to every attack the audit's inputs can feed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from memlens.config.errors import ConfigError, format_validation_error
from memlens.config.loading import apply_overrides, read_yaml_file
from memlens.config.recipe import read_recipe
from memlens.config.schema import (
    AttackSpec,
    CanaryConfig,
    DataConfig,
    ExtractionConfig,
    LoraConfig,
    MIAConfig,
    ModelConfig,
    StudyConfig,
    TrainConfig,
)

AUDIT_SECTION = "audit"


class AuditMIAConfig(MIAConfig):
    """Membership inference of the audit: the study's `mia` settings, with every attack by default."""

    attacks: list[str | AttackSpec] | None = Field(
        None, description="Attacks to run (as `mia.attacks` of a study); `null`: every registered attack the audit "
        "can feed: those reading the target and the base model (`loss`, `ref_ratio`, `zlib`, `min_k`...), "
        "`dc_pdd` when `mia.reference_corpus` is set, ReCaLL when there is a utility split (a memlens run folder's), "
        "and LiRA / RMIA when `references` are trained.")


class AuditModelConfig(ModelConfig):
    """The base model of an audit (the study's `model` section): the reference of the ratio attacks and what the
    target is attached to."""

    name_or_path: str | None = Field(None, description="The base model (folder or hub id). `null`: the adapter's "
                                     "`base_model_name_or_path`, or a run folder's study model; required for a full "
                                     "model (`--base`).")


# top-level fields of earlier audit files (and the command's options) that are the base model's settings
MODEL_FIELDS = {"base": "name_or_path", "dtype": "dtype", "device": "device", "load_in_8bit": "load_in_8bit",
                "trust_remote_code": "trust_remote_code", "revision": "revision",
                "attn_implementation": "attn_implementation"}


class AuditConfig(BaseModel):
    """One audit of a fine-tuned model."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)

    name: str = Field("audit", description="Name shown in the report and the model card.")
    target: str = Field(..., description="The model audited: a PEFT adapter folder (its adapter_config.json names "
                        "the base), a full fine-tuned model folder or hub id (`base` is then required), or a memlens "
                        "run folder (`<out>/runs/<run_id>`: its study gives the base, the members and non-members).")
    model: AuditModelConfig = Field(default_factory=AuditModelConfig, description="The base model and how it is "
                                    "loaded (the study's `model` section: `name_or_path`, `revision`, `dtype`, "
                                    "`device`, `load_in_8bit`, `trust_remote_code`, `attn_implementation`); the "
                                    "options `--base`, `--dtype`, `--device`, `--load-in-8bit` set its fields (so do "
                                    "top-level `base:`, `dtype:`... in an audit file).")
    members: str | None = Field(None, description="Records known to be in the training set: a .jsonl, .csv, "
                                ".parquet or .txt file (one record a line), or `hub:NAME:SPLIT`. Optional for a "
                                "run folder (its members.parquet).")
    suspect: str | None = Field(None, description="Records whose use in training is in question (same formats), "
                                "instead of `members`: dataset inference (Maini et al. 2024) says whether the set was "
                                "used, with a p-value, and, with `references`, the share of it used (DUCI); its "
                                "records are scored like members.")
    non_members: str | None = Field(None, description="Records of the same distribution known not to be in it "
                                    "(same formats). Optional for a run folder (its study's non-members).")
    canaries: str | None = Field(None, description="Records the user inserted in the training set (same formats), "
                                 "with held-out twins where an `inserted` column is false (or memaudit's "
                                 "`memaudit-manifest.json`, or its folder): "
                                 "a `copies` column if repeated, and a `secret` column (the random part of the text, "
                                 "`secret_format` `digits:N` / `hex:N` or inferred from it) for exposure.")
    text_field: str = Field("text", description="Column (or JSON key) of each record's text.")
    id_field: str | None = Field("id", description="Column of each record's id, where the file has it; records "
                                 "are numbered `<file kind>-<row>` otherwise.")
    group: str | None = Field(None, description="Each record's document: a column, or a regular expression over "
                              "the id whose first group is the document. Dataset inference then counts documents "
                              "(halves, test, power, placebo), the usage share is given per document too, and the "
                              "bag-of-words check's folds keep documents whole.")
    out: str | None = Field(None, description="Output folder; `null`: `memlens-out/audit-<target folder name>`.")
    references: int = Field(0, ge=0, description="Reference models for LiRA and RMIA, each trained with the "
                            "target's recipe (its LoRA settings and `train_config`) on a seeded random half of "
                            "members + non-members (`0`: none; 2 or more).")
    train_config: str | None = Field(None, description="YAML or JSON recipe the target was trained with: the "
                                     "Trainer's `TrainingArguments` names or the study's `train` fields, or "
                                     "MemlensCallback's `memlens-recipe.json` (found by itself beside an adapter); "
                                     "what it leaves out takes the Trainer's defaults. Needed by `references` unless "
                                     "the target is a memlens run folder.")
    mia: AuditMIAConfig = Field(default_factory=AuditMIAConfig, description="Membership-inference settings (the "
                                "study's `mia` section; `references` is the field above).")
    extraction: ExtractionConfig = Field(default_factory=ExtractionConfig, description="Prompted-prefix "
                                         "extraction on a sample of members and exposure of the canaries (the "
                                         "study's `extraction` section).")

    @model_validator(mode="before")
    @classmethod
    def _model_fields_at_top(cls, raw: Any) -> Any:
        """`base: X`, `dtype: Y`... at the top level (the command's options, earlier audit files) into `model`; the
        same field in both places is refused."""
        if not isinstance(raw, dict) or not set(raw) & set(MODEL_FIELDS):
            return raw
        raw = dict(raw)
        model = dict(raw.get("model") or {})
        for flat, field in MODEL_FIELDS.items():
            if flat in raw:
                value = raw.pop(flat)
                if field in model and model[field] != value:
                    raise ValueError(f"`{flat}` and `model.{field}` both set ({value!r}, {model[field]!r}): set one")
                model[field] = value
        raw["model"] = model
        return raw

    @property
    def base(self) -> str | None:
        """The base model's name or path (`--base`), or None when the target names it."""
        return self.model.name_or_path

    @field_validator("references")
    @classmethod
    def _two_or_more(cls, value: int) -> int:
        if value == 1:
            raise ValueError("one reference gives every record only IN or only OUT statistics; use 0 (off) or >= 2")
        return value

    @model_validator(mode="after")
    def _suspect_or_members(self) -> AuditConfig:
        if self.suspect is not None and self.members is not None:
            raise ValueError("suspect and members: give one (--suspect: records whose use is in question; --members: "
                             "records known to be in the training set)")
        return self

    @model_validator(mode="after")
    def _references_in_one_place(self) -> AuditConfig:
        if self.mia.references:
            raise ValueError("mia.references: set the audit's top-level `references` instead")
        return self

    @property
    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        name = Path(self.target.rstrip("/")).name or "model"
        return Path("memlens-out") / f"audit-{name}"


def audit_study(cfg: AuditConfig, base: ModelConfig, mia: MIAConfig, extraction: ExtractionConfig, *,
                lora: LoraConfig | None = None, train: TrainConfig | None = None) -> StudyConfig:
    """The audit seen as a study of one run, in memory (nothing is written as a study): what the study's code it
    shares reads, the report's sections (mia, extraction settings), the base-model extraction cache (the model)
    and reference models (the recipe: `lora`, `train`, `data.max_length`, the document groups)."""
    data = DataConfig(source=cfg.members or cfg.target, text_field=cfg.text_field, id_field=cfg.id_field,
                      group=cfg.group, utility_split=None)
    return StudyConfig(name=cfg.name, out=str(cfg.out_dir), data=data, model=base, lora=lora or LoraConfig(),
                       train=train or TrainConfig(), canary=CanaryConfig(mode="insert"), mia=mia,
                       extraction=extraction)


def read_train_config(path: str | Path, records: int | None = None) -> TrainConfig:
    """The optimiser settings of `audit.train_config` (:func:`memlens.config.recipe.read_recipe`: memlens' `train`
    names or the Trainer's `TrainingArguments` names, YAML or JSON, or a `memlens-recipe.json`); what the file
    leaves out takes the Trainer's defaults. `records`, the number of records each reference trains on, converts a
    warm-up ratio to steps. :func:`~memlens.config.recipe.read_recipe` also says which settings came from where."""
    return read_recipe(path).train_config(records)


def load_audit(path: str | Path | None = None, overrides: list[str] | None = None,
               raw: dict[str, Any] | None = None, **fields: Any) -> AuditConfig:
    """An audit from a YAML file whose `audit:` section holds the fields (or a dict of them), `--set`-style
    `overrides` (`mia.bootstrap=100`) and `fields` given directly (the command's options, those not None),
    validated; every error names the file and the field."""
    source = str(path) if path else "<audit>"
    if raw is None:
        raw = {}
        if path is not None:
            document = read_yaml_file(path, "audit file") or {}
            if not isinstance(document, dict) or set(document) != {AUDIT_SECTION}:
                keys = sorted(document) if isinstance(document, dict) else type(document).__name__
                raise ConfigError(f"{path}: an audit file holds one section, `{AUDIT_SECTION}:`, with the audit's "
                                  f"fields; found {keys}")
            raw = document[AUDIT_SECTION] or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: `{AUDIT_SECTION}` must be a mapping of fields (target, members, ...)")
    raw = apply_overrides(dict(raw), overrides or [])
    raw.update({key: value for key, value in fields.items() if value is not None})
    try:
        return AuditConfig.model_validate(raw)
    except ValidationError as err:
        message = format_validation_error(err, source, overrides, model=AuditConfig, what="audit")
        raise ConfigError(message.replace("\n  ", f"\n  {AUDIT_SECTION}.")) from None


__all__ = ["AUDIT_SECTION", "AuditConfig", "AuditMIAConfig", "AuditModelConfig", "audit_study", "load_audit",
           "read_train_config"]
