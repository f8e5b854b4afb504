"""The training recipe of a model fine-tuned elsewhere, which an audit's reference models repeat
(`audit.train_config`): read in memlens' own `train` names, in the Hugging Face Trainer's (`TrainingArguments`
field names), or from the `memlens-recipe.json` that `MemlensCallback` writes next to the Trainer's output.

A setting the file does not give takes the Trainer's default (:data:`TRAINER_DEFAULTS`), not the study's: the
model was trained by a Trainer, and a study's defaults (`grad_accum: 4`, `warmup_steps: 100`) would give the
references another recipe than the target's. So a file holding only `epochs`, `learning_rate` and `batch_size`
means the same as the full recipe with `grad_accum: 1`, `warmup_steps: 0`, `lr_scheduler: linear` and
`weight_decay: 0`, whichever names it uses. The settings of memlens' own trainer that change no update
(`packing`, `precision`, `gradient_checkpointing`...) keep memlens' defaults unless the file sets them.

A warm-up given as a fraction of the optimizer steps (`warmup_ratio`, or `warmup_steps` below 1 as transformers 5
reads it) becomes a number of steps only once the number of training records is known
(:meth:`TrainRecipe.train_config`), as the Trainer converts it:
`ceil(ratio * total)`, `total = max_steps`, else `ceil(epochs * max(1, ceil(ceil(records / batch_size) /
grad_accum)))`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from memlens.config.errors import ConfigError
from memlens.config.loading import read_yaml_file
from memlens.config.schema import TrainConfig

RECIPE_FILE = "memlens-recipe.json"
RECIPE_FORMAT = "memlens-recipe"
WHERE = "audit.train_config"

# transformers.TrainingArguments field -> the TrainConfig field it sets (`warmup_ratio` is read apart)
TRAINING_ARGUMENTS = {"num_train_epochs": "epochs", "max_steps": "max_steps",
                      "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
                      "warmup_steps": "warmup_steps", "learning_rate": "learning_rate",
                      "weight_decay": "weight_decay", "lr_scheduler_type": "lr_scheduler"}
WARMUP_RATIO = "warmup_ratio"
# The Trainer's defaults of those settings (transformers.TrainingArguments()), in TrainConfig's names
TRAINER_DEFAULTS: dict[str, Any] = {"epochs": 3.0, "max_steps": None, "batch_size": 8, "grad_accum": 1,
                                    "warmup_steps": 0, "learning_rate": 5e-5, "weight_decay": 0.0,
                                    "lr_scheduler": "linear"}
# The PEFT LoRA settings a recipe file records
LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias")


@dataclass(frozen=True)
class TrainRecipe:
    """A recipe file, read: `given` holds the TrainConfig settings it sets (in memlens' names; `named` the key the
    file used for each), `warmup_ratio` a warm-up given as a fraction of the optimizer steps; from a
    `memlens-recipe.json`, also the adapter's LoRA settings (`lora`: r, lora_alpha, lora_dropout, target_modules,
    bias), the longest record length the trainer was told (`max_length`) and its number of training records."""

    source: Path
    given: dict[str, Any]
    named: dict[str, str]
    warmup_ratio: float | None = None
    lora: dict[str, Any] | None = None
    max_length: int | None = None
    train_records: int | None = None
    total_steps: int | None = None  # the optimizer steps the target's training took (the Trainer's max_steps)
    extra: dict[str, Any] = field(default_factory=dict)  # the recipe file's other entries, as written

    @property
    def from_defaults(self) -> dict[str, Any]:
        """The settings the file leaves out, with the Trainer's defaults they take."""
        left = {k: v for k, v in TRAINER_DEFAULTS.items() if k not in self.given}
        if self.warmup_ratio is not None:
            left.pop("warmup_steps", None)
        if self.given.get("max_steps") is not None:
            left.pop("epochs", None)  # the Trainer ignores the epochs when max_steps is set
        return left

    def warmup_steps(self, records: int | None) -> int | None:
        """The warm-up in optimizer steps for a training on `records` records (None without a ratio)."""
        if self.warmup_ratio is None:
            return None
        if records is None:
            raise ConfigError(f"{WHERE}: {self.source} gives the warm-up as a fraction of the optimizer steps "
                              f"({self.named.get('warmup_steps', WARMUP_RATIO)}: {self.warmup_ratio}); converting it "
                              "to steps needs the number of training records, which was not given")
        return math.ceil(self.steps(records) * self.warmup_ratio)

    def steps(self, records: int) -> int:
        """The optimizer steps of a training on `records` records on one device, as the Trainer counts them:
        `max_steps`, else ceil(epochs * max(1, ceil(ceil(records / batch_size) / grad_accum)))."""
        settings = {**TRAINER_DEFAULTS, **self.given}
        per_epoch = max(1, math.ceil(math.ceil(records / settings["batch_size"]) / settings["grad_accum"]))
        return settings["max_steps"] or math.ceil(settings["epochs"] * per_epoch)

    def check_total_steps(self) -> None:
        """Refuse a recipe whose `total_steps` (the steps the target's training took) is not what its settings give
        for its `train_records` records: the target then trained with another effective batch (several devices,
        records packed or dropped) than the settings say, and reference models trained with them would not repeat
        its recipe. Nothing to check without both numbers."""
        if self.total_steps is None or self.train_records is None:
            return
        expected = self.steps(self.train_records)
        if expected != self.total_steps:
            settings = {**TRAINER_DEFAULTS, **self.given}
            raise ConfigError(
                f"{WHERE}: {self.source}: the target's training took total_steps={self.total_steps} optimizer steps, "
                f"but its settings (batch_size={settings['batch_size']}, grad_accum={settings['grad_accum']}, "
                f"epochs={settings['epochs']}, max_steps={settings['max_steps']}) give {expected} for its "
                f"train_records={self.train_records} records on one device: it trained with another effective batch "
                "(several devices, or packed or dropped records), so reference models would not repeat its recipe; "
                "give the settings it ran with (batch_size: the per-device batch times the devices) in a recipe file "
                "of your own (--train-config)")

    def train_config(self, records: int | None = None) -> TrainConfig:
        """The TrainConfig of the recipe: the file's settings, the Trainer's defaults for the others; `records`
        (the number of records each reference model trains on) converts a warm-up ratio to steps."""
        settings = {**TRAINER_DEFAULTS, **self.given}
        if self.warmup_ratio is not None:
            settings["warmup_steps"] = self.warmup_steps(records)
        try:
            return TrainConfig.model_validate(settings)
        except ValidationError as err:
            lines = [f"  {self._key(str(e['loc'][0]))}: {e['msg']}" for e in err.errors()]
            raise ConfigError("\n".join([f"{WHERE}: {self.source}: invalid training settings", *lines])) from None

    def lora_mismatch(self, peft: dict[str, Any]) -> str | None:
        """What of the recipe's LoRA settings (MemlensCallback's copy of the trained adapter's) differs from the
        audited adapter's `adapter_config.json` (`peft`), or None: a recipe written for another adapter would give
        its reference models another training."""
        if not self.lora:
            return None
        differ = []
        for name in LORA_FIELDS:
            mine, theirs = self.lora.get(name), peft.get(name)
            if name == "target_modules" and isinstance(mine, list) and isinstance(theirs, (list, tuple, set)):
                mine, theirs = sorted(mine), sorted(theirs)
            if name in self.lora and name in peft and mine != theirs:
                differ.append(f"{name}: {mine!r} in the recipe, {theirs!r} in the adapter")
        return "; ".join(differ) or None

    def _key(self, name: str) -> str:
        return self.named.get(name, name)

    def describe(self, records: int | None = None) -> str:
        """One line for a report: `references trained with epochs=1, ... (train.yaml); from the Trainer's defaults:
        grad_accum=1, ...`."""
        given = dict(self.given)
        if self.warmup_ratio is not None:
            steps = self.warmup_steps(records) if records is not None else None
            given["warmup_steps"] = f"{self.warmup_ratio:g} of the steps" + (f" ({steps})" if steps is not None else "")
        said = ", ".join(f"{k}={v}" for k, v in given.items()) or "no settings"
        text = f"references trained with {said} (from {self.source.name})"
        left = self.from_defaults
        if left:
            text += "; from the Trainer's defaults: " + ", ".join(f"{k}={v}" for k, v in left.items())
        if self.max_length is not None:
            text += f"; records of at most max_length={self.max_length} tokens, as the target's trainer cut them"
        if self.total_steps is not None and self.train_records is not None:
            text += (f"; the target took total_steps={self.total_steps} on train_records={self.train_records} records, "
                     "as these settings give")
        return text

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: what was read, and what came from the defaults."""
        return {"source": str(self.source), "given": self.given, "named": self.named,
                "warmup_ratio": self.warmup_ratio, "from_defaults": self.from_defaults, "lora": self.lora,
                "max_length": self.max_length, "train_records": self.train_records, "total_steps": self.total_steps}


def _settings(raw: dict[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, str], float | None]:
    """The TrainConfig settings of a mapping in either vocabulary, the key each came from, and a warm-up ratio."""
    ours = set(TrainConfig.model_fields)
    unknown = sorted(k for k in raw if k not in ours and k not in TRAINING_ARGUMENTS and k != WARMUP_RATIO)
    if unknown:
        raise ConfigError(f"{WHERE}: {path}: unknown setting(s) {unknown}; give the Hugging Face Trainer's names "
                          f"({sorted([*TRAINING_ARGUMENTS, WARMUP_RATIO])}) or memlens' own train fields "
                          f"({sorted(ours)})")
    given: dict[str, Any] = {}
    named: dict[str, str] = {}
    for key, value in raw.items():
        name = TRAINING_ARGUMENTS.get(key, key)
        if key == WARMUP_RATIO:
            name = "warmup_steps"
        if name in named:
            raise ConfigError(f"{WHERE}: {path} sets {name} twice, as {named[name]!r} and as {key!r}; keep one")
        named[name] = key
        given[name] = value
    ratio = _warmup_ratio(given, named, path)
    if "max_steps" in given and isinstance(given["max_steps"], (int, float)) and given["max_steps"] <= 0:
        given["max_steps"] = None  # the Trainer's -1: train for num_train_epochs
    return given, named, ratio


def _warmup_ratio(given: dict[str, Any], named: dict[str, str], path: Path) -> float | None:
    """Take a warm-up fraction out of `given` (`warmup_ratio`, or `warmup_steps` in (0, 1) as transformers 5 reads
    it); a whole number of steps stays."""
    value = given.get("warmup_steps")
    key = named.get("warmup_steps")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if key == WARMUP_RATIO or 0 < value < 1:
        if not 0 <= value <= 1:
            raise ConfigError(f"{WHERE}: {path}: {key}: {value} is not a fraction of the steps in [0, 1]")
        del given["warmup_steps"]
        return float(value)
    if value >= 1 and value != int(value):
        given["warmup_steps"] = int(value)  # as the Trainer reads a number of steps
    return None


def _document(path: Path) -> Any:
    return read_yaml_file(path, WHERE, f"; give the recipe file (YAML or JSON; a {RECIPE_FILE} written by "
                                       "MemlensCallback)") or {}


def read_recipe(path: str | Path) -> TrainRecipe:
    """The recipe of `audit.train_config`: a YAML or JSON mapping of training settings, at the top level or under
    `train:`, in memlens' names (`epochs`, `batch_size`, `grad_accum`...) or the Trainer's
    (`num_train_epochs`, `per_device_train_batch_size`, `gradient_accumulation_steps`...), or a
    `memlens-recipe.json`; errors name the file and the setting."""
    path = Path(path)
    raw = _document(path)
    extra: dict[str, Any] = {}
    lora = max_length = train_records = total_steps = None
    if isinstance(raw, dict) and raw.get("format") == RECIPE_FORMAT:
        extra = {k: v for k, v in raw.items() if k not in ("training_arguments", "lora", "max_length",
                                                           "train_records", "total_steps")}
        lora, max_length, train_records = raw.get("lora"), raw.get("max_length"), raw.get("train_records")
        total_steps = raw.get("total_steps")
        raw = raw.get("training_arguments") or {}
    elif isinstance(raw, dict) and set(raw) == {"train"}:
        raw = raw["train"] or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{WHERE}: {path} must be a mapping of training settings (num_train_epochs or epochs, "
                          "learning_rate, per_device_train_batch_size or batch_size...)")
    given, named, ratio = _settings(raw, path)
    recipe = TrainRecipe(source=path, given=given, named=named, warmup_ratio=ratio, lora=lora,
                         max_length=max_length, train_records=train_records, total_steps=total_steps, extra=extra)
    if ratio is None:
        recipe.train_config()  # refuse a bad value now, naming the file's key
    else:
        recipe.train_config(records=1)
    recipe.check_total_steps()
    return recipe


def find_recipe(folder: str | Path) -> Path | None:
    """The `memlens-recipe.json` of an adapter or model folder: in it, or in its parent (a Trainer's output_dir,
    where `MemlensCallback` writes it and the adapter is usually saved in a subfolder); None when neither has one."""
    folder = Path(folder).expanduser()
    for candidate in (folder / RECIPE_FILE, folder.parent / RECIPE_FILE):
        if candidate.is_file():
            return candidate
    return None


def recipe_document(arguments: Any, *, lora: dict[str, Any] | None = None, max_length: int | None = None,
                    train_records: int | None = None, total_steps: int | None = None) -> dict[str, Any]:
    """What `memlens-recipe.json` holds (JSON types only): the training settings of a
    `transformers.TrainingArguments` (or any object with those attributes) under their own names, the LoRA settings
    (`lora`, :data:`LORA_FIELDS`), the records' longest length, the number of training records and the optimizer
    steps the Trainer planned."""
    values = {}
    for name in TRAINING_ARGUMENTS:
        value = getattr(arguments, name)
        values[name] = getattr(value, "value", value)  # lr_scheduler_type is an enum
    return {"format": RECIPE_FORMAT, "version": 1, "written_by": "memlens.integrations.MemlensCallback",
            "training_arguments": values, "lora": lora, "max_length": max_length, "train_records": train_records,
            "total_steps": total_steps}


__all__ = ["LORA_FIELDS", "RECIPE_FILE", "TRAINER_DEFAULTS", "TRAINING_ARGUMENTS", "TrainRecipe", "find_recipe",
           "read_recipe", "recipe_document"]
