"""What `audit.target` names: a PEFT adapter folder, a full fine-tuned model (folder or hub id) or a memlens run
folder; its base model (the reference of the ratio attacks) and its training recipe (for reference models).

Light to import (the models layer is imported when a model's files are read), so that `memlens audit` refuses a
target that names nothing (:func:`check_target`) before it loads torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from memlens.config import (
    AuditConfig,
    CellConfig,
    ConfigError,
    LoraConfig,
    ModelConfig,
    StudyConfig,
    looks_like_local_path,
    renamed_fields,
)
from memlens.store import RunFile, StudyLayout
from memlens.store.records import CellRecord

TargetKind = Literal["adapter", "model", "run"]
PEFT_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
# PEFT settings the references' recipe (memlens LoRA: rank, alpha, dropout, bias, target modules) cannot repeat
UNREPEATABLE = {"use_dora": False, "use_rslora": False, "modules_to_save": None, "rank_pattern": {},
                "alpha_pattern": {}, "layers_to_transform": None, "trainable_token_indices": None}


@dataclass
class Target:
    """The audited model, resolved: `source` is the adapter folder, the full model (folder or hub id) or the run
    folder; `name` its run_id in the results."""

    kind: TargetKind
    name: str
    source: Path | str
    base: ModelConfig
    method: Literal["lora", "full"]
    target_modules: list[str]       # the adapter's target modules (module names), ["all"] for a full model
    rank: int                       # LoRA rank, 0 for a full model
    lora: LoraConfig | None = None  # the adapter's alpha, dropout and bias (its recipe for reference models)
    peft: dict | None = None        # adapter_config.json
    study: StudyConfig | None = None  # a run folder's study
    cell: CellConfig | None = None
    layout: StudyLayout | None = None  # the run folder's study folder

    @property
    def run_dir(self) -> Path:
        return Path(self.source)

    def recipe_problem(self) -> str | None:
        """Why reference models cannot repeat this target's training recipe, or None."""
        if self.kind != "adapter":
            return None
        if str(self.peft.get("peft_type", "LORA")).upper() != "LORA":
            return f"the adapter is {self.peft.get('peft_type')}, not LoRA"
        unusual = [k for k, default in UNREPEATABLE.items() if self.peft.get(k, default) not in (default, None, {}, [])]
        if unusual:
            return f"its adapter_config.json sets {unusual}, which memlens' LoRA recipe does not repeat"
        if not isinstance(self.peft.get("target_modules"), list):
            return f"its target_modules {self.peft.get('target_modules')!r} is not a list of module names"
        return None


def _base_config(cfg: AuditConfig, name: str) -> ModelConfig:
    """The audit's model settings (`audit.model`) for the model `name`."""
    return ModelConfig(**cfg.model.model_dump(exclude={"name_or_path"}), name_or_path=name)


def _run_folder(path: Path) -> Path | None:
    """The run folder `path` is or is inside of (`<out>/runs/<run_id>` or its `adapter/`), or None."""
    for folder in (path, path.parent):
        if (folder / RunFile.CELL).is_file():
            return folder
    return None


def _from_run(cfg: AuditConfig, run_dir: Path) -> Target:
    layout = StudyLayout(run_dir.parent.parent)
    if not layout.study_file.exists():
        raise ConfigError(f"audit.target: {run_dir} looks like a memlens run folder (it has {RunFile.CELL}) but "
                          f"{layout.root} holds no {layout.study_file.name}; give a run folder of a study "
                          "(<out>/runs/<run_id>), its adapter/ folder, or the base with --base")
    study = layout.read_study()
    record = CellRecord.read(run_dir / RunFile.CELL)
    if record is None:
        raise ConfigError(f"audit.target: {run_dir / RunFile.CELL} cannot be read")
    cell = record.cell
    base = study.model.model_copy(update={"device": cfg.model.device,
                                          "load_in_8bit": study.model.load_in_8bit or cfg.model.load_in_8bit})
    if cfg.base is not None:
        base = base.model_copy(update={"name_or_path": cfg.base})
    return Target(kind="run", name=run_dir.name, source=run_dir, base=base, method=cell.method,
                  target_modules=list(cell.target_modules), rank=cell.rank,
                  lora=study.lora if cell.method == "lora" else None, study=study, cell=cell, layout=layout)


def _from_adapter(cfg: AuditConfig, folder: Path) -> Target:
    from memlens.models import read_peft_config

    peft = read_peft_config(folder)
    base = cfg.base or peft.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"audit.base: the adapter's {folder / PEFT_CONFIG} names no base_model_name_or_path; give "
                          "the base model it was trained on (--base)")
    modules = peft.get("target_modules")
    targets = sorted(modules) if isinstance(modules, list) else [str(modules)]
    lora = LoraConfig(alpha=float(peft.get("lora_alpha", 8)), dropout=float(peft.get("lora_dropout", 0.0)),
                      bias=peft.get("bias", "none"))
    # saved as `<training folder>/adapter` (a common layout): named by the folder that says which training it was
    name = folder.resolve().parent.name if folder.name == "adapter" and folder.resolve().parent.name else folder.name
    return Target(kind="adapter", name=name, source=folder, base=_base_config(cfg, base), method="lora",
                  target_modules=targets, rank=int(peft.get("r", 0)), lora=lora, peft=peft)


def _from_model(cfg: AuditConfig, source: Path | str) -> Target:
    from memlens.models import load_model_config

    if cfg.base is None and isinstance(source, str):
        raise ConfigError(f"audit.base: there is no folder {source} here ({Path(source).absolute()}), so the target "
                          "is read as a hub model id, a full model: give the model it was fine-tuned from (--base), "
                          "the reference of the ratio attacks; or, for a folder, check its name and where memlens "
                          "runs from")
    if cfg.base is None:
        raise ConfigError(f"audit.base: the target {source} is a full model; give the model it was fine-tuned from "
                          "(--base), the reference of the ratio attacks")
    target = _base_config(cfg, str(source))
    try:
        vocabulary = getattr(load_model_config(target), "vocab_size", None)
    except ConfigError as exc:
        raise renamed_fields(exc, {"model.name_or_path": "audit.target"}) from None
    base = _base_config(cfg, cfg.base)
    try:
        base_vocabulary = getattr(load_model_config(base), "vocab_size", None)
    except ConfigError as exc:
        raise renamed_fields(exc, {"model.name_or_path": "audit.base"}) from None
    if vocabulary is not None and base_vocabulary is not None and vocabulary != base_vocabulary:
        raise ConfigError(f"audit.base: the target {source} has a vocabulary of {vocabulary} tokens and the base "
                          f"{cfg.base} one of {base_vocabulary}: the base is not the model it was fine-tuned from; "
                          "give that one (--base)")
    name = Path(str(source).rstrip("/")).name if isinstance(source, Path) else str(source).replace("/", "_")
    return Target(kind="model", name=name, source=source, base=base, method="full", target_modules=["all"], rank=0)


def resolve_target(cfg: AuditConfig) -> Target:
    """The model `cfg.target` names and its base; a target that is none of the kinds is refused, naming what the
    folder holds."""
    path = Path(cfg.target).expanduser()
    if path.is_dir():
        run_dir = _run_folder(path)
        if run_dir is not None:
            return _from_run(cfg, run_dir)
        if (path / PEFT_CONFIG).is_file():
            return _from_adapter(cfg, path)
        if (path / MODEL_CONFIG).is_file():
            return _from_model(cfg, path)
        present = sorted(p.name for p in path.iterdir())[:15]
        raise ConfigError(f"audit.target: {path} is neither a PEFT adapter folder ({PEFT_CONFIG}), a model folder "
                          f"({MODEL_CONFIG} and safetensors weights) nor a memlens run folder ({RunFile.CELL}); it "
                          f"has: {present or 'nothing'}")
    check_target(cfg.target)
    return _from_model(cfg, cfg.target)


def check_target(target: str) -> None:
    """Refuse a target that names neither a folder here nor a possible hub model id (`owner/name`), saying first
    that no folder of that name exists (with the path it was looked for at), then what a hub id needs; a file is
    refused too. Reads no model: `memlens audit` calls it before anything heavy."""
    path = Path(target).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ConfigError(f"audit.target: {path} is a file; give the folder of an adapter, a model or a memlens run")
    hub = "a hub model id is written owner/name, downloaded (network on, HF_HUB_OFFLINE unset), and needs --base " \
          "(the model it was fine-tuned from) as a full model"
    if looks_like_local_path(target):
        raise ConfigError(f"audit.target: there is no folder {target} ({path.absolute()} does not exist); give the "
                          "folder of an adapter, a model or a memlens run")
    if "/" not in target:
        raise ConfigError(f"audit.target: there is no folder named {target!r} here ({path.absolute()} does not "
                          f"exist): check its name and the folder memlens runs from. Nor is it a hub model id: {hub}")


__all__ = ["Target", "TargetKind", "check_target", "resolve_target"]
