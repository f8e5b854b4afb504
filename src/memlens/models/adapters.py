"""Save fine-tuned runs and switch between them on one base model in memory.

A LoRA run is saved as a PEFT adapter folder (safetensors) plus ``memlens_adapter.json`` naming the
fused modules that must be split before loading it (see :mod:`memlens.models.targets`). A full
fine-tune is saved as a whole model folder (safetensors). :class:`AdapterBank` keeps the base model once
and yields it with the requested adapter active, or with every adapter disabled for reference scores.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from memlens.config import ConfigError
from memlens.models.loading import no_hf_progress_bars, quiet_bitsandbytes_import
from memlens.models.targets import split_fused_modules

with quiet_bitsandbytes_import():  # PEFT imports bitsandbytes when it is installed
    from peft import PeftModel
from memlens.store.integrity import verify_files
from memlens.store.layout import RunFile
from memlens.store.records import TrainRecord

ADAPTER_DIR = RunFile.ADAPTER
FULL_MODEL_DIR = RunFile.FULL_MODEL
ADAPTER_META = "memlens_adapter.json"
PEFT_CONFIG = "adapter_config.json"  # what PEFT writes next to an adapter's weights
PEFT_WEIGHTS = "adapter_model.safetensors"


@contextlib.contextmanager
def quiet_peft_wrap() -> Iterator[None]:
    """Wrap a model with PEFT (`get_peft_model`, `PeftModel.from_pretrained`, `load_adapter`) inside this. PEFT
    0.21's PeftModel reads transformers 5's deprecated `is_gradient_checkpointing` alias, which warns
    (FutureWarning) for every model wrapped; and on GPT-2's Conv1D layers PEFT warns that `fan_in_fan_out` is
    False, then sets it True itself (the layout those layers need). Both are PEFT details no memlens user can act
    on: only those two messages are ignored, and only around the wrapping."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False but the target module is `Conv1D`",
                                category=UserWarning)
        yield


def save_adapter(model: torch.nn.Module, path: Path, fused_suffixes: list[str],
                 adapter_name: str | None = None) -> None:
    """Save a PEFT model's adapter (safetensors) with the fused splits it needs: the model's only adapter, or
    `adapter_name` of a model holding several, in the same files as if it were the only one."""
    path.mkdir(parents=True, exist_ok=True)
    for config in getattr(model, "peft_config", {}).values():
        # PEFT keeps target_modules as a set and writes it in hash order, which changes with every process's
        # PYTHONHASHSEED: sorted, the same adapter is the same file (and checksum) in every process.
        if isinstance(config.target_modules, (set, frozenset)):
            config.target_modules = sorted(config.target_modules)
    if adapter_name is None:
        model.save_pretrained(str(path), safe_serialization=True)
    else:  # PEFT writes a named adapter to <dir>/<name>/ and the model card to <dir>/
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
            model.save_pretrained(tmp, safe_serialization=True, selected_adapters=[adapter_name])
            for file in (Path(tmp) / adapter_name).iterdir():
                os.replace(file, path / file.name)
            for file in Path(tmp).iterdir():
                if file.is_file():
                    os.replace(file, path / file.name)
    (path / ADAPTER_META).write_text(json.dumps({"fused_suffixes": fused_suffixes}, indent=2))


def read_adapter_meta(path: Path) -> dict:
    meta = path / ADAPTER_META
    return json.loads(meta.read_text()) if meta.exists() else {"fused_suffixes": []}


def read_peft_config(folder: Path) -> dict:
    """The adapter_config.json of a PEFT adapter folder (r, lora_alpha, target_modules, base_model_name_or_path...)."""
    return json.loads((Path(folder) / PEFT_CONFIG).read_text())


def _features(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear-like layer (Linear, 8-bit Linear, GPT-2's Conv1D, a fused slice)."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:  # weight (in, out)
        return int(weight.shape[0]), int(weight.shape[1])
    return None


def check_adapter_fits(model: torch.nn.Module, adapter: Path, base_label: str, peft: dict | None = None) -> None:
    """Refuse a LoRA adapter whose matrices do not fit `model`'s layers (another base model, another size),
    naming the layer, both shapes, the adapter and the base (`base_label`), before PEFT loads it. Reads only
    the tensors' shapes from the safetensors header. Shapes: lora_A (rank, in features), lora_B (out features,
    rank); embeddings' lora_embedding_A (rank, vocabulary), lora_embedding_B (width, rank). `peft`: its
    adapter_config.json when the caller has read it."""
    from safetensors import safe_open

    adapter = Path(adapter)
    weights = adapter / PEFT_WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"{adapter}: no {PEFT_WEIGHTS} (memlens loads only safetensors adapters; save it with "
                          "model.save_pretrained(folder, safe_serialization=True))")
    named = dict(model.named_modules())
    trained_on = (peft or read_peft_config(adapter)).get("base_model_name_or_path") or "a base it does not name"
    with safe_open(str(weights), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    for key, shape in sorted(shapes.items()):
        path, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
        if not path:
            continue
        module = named.get(path)
        if module is None:
            raise ConfigError(f"the adapter {adapter} does not fit the base model {base_label}: it adapts the layer "
                              f"{path!r}, which that base does not have (the adapter was trained on {trained_on}); "
                              "give the base it was trained on (--base)")
        mismatch = _mismatch(module, kind, shape)
        if mismatch:
            raise ConfigError(f"the adapter {adapter} does not fit the base model {base_label}: its layer {path!r} has "
                              f"{mismatch} (the adapter was trained on {trained_on}); give the base it was trained "
                              "on (--base)")


def _mismatch(module: torch.nn.Module, kind: str, shape: tuple[int, ...]) -> str | None:
    """How a LoRA tensor of `shape` and `kind` (`A.weight`, `B.weight`, `embedding_A`, `embedding_B`; others are
    not checked) fails to fit `module`, in words; None when it fits."""
    if kind.startswith("embedding_"):
        weight = getattr(module, "weight", None)
        if weight is None:
            return None
        vocabulary, width = weight.shape
        if kind.startswith("embedding_A") and shape[1] != vocabulary:
            return f"a vocabulary of {shape[1]} in the adapter and of {vocabulary} in that base"
        if kind.startswith("embedding_B") and shape[0] != width:
            return f"width {shape[0]} in the adapter and {width} in that base"
        return None
    features = _features(module)
    if features is None:
        return None
    if kind.startswith("A") and shape[1] != features[0]:
        return f"{shape[1]} input features in the adapter and {features[0]} in that base"
    if kind.startswith("B") and shape[0] != features[1]:
        return f"{shape[0]} output features in the adapter and {features[1]} in that base"
    return None


class AdapterBank:
    """One base model in memory with any number of fine-tuned runs attached to it.

    >>> bank = AdapterBank(base_model)
    >>> bank.add("run-a", Path("out/runs/run-a"))
    >>> with bank.use("run-a") as model: ...   # adapter active
    >>> with bank.use(None) as model: ...      # base model: every adapter disabled
    """

    def __init__(self, base: PreTrainedModel):
        self.base = base
        self.model: torch.nn.Module = base  # becomes a PeftModel once a LoRA run is added
        self._full: dict[str, Path | str] = {}
        self._lora: dict[str, str] = {}  # run name -> the adapter's name inside PEFT (which refuses a "." in it)

    @property
    def names(self) -> list[str]:
        return sorted(set(self._lora) | set(self._full))

    def add(self, name: str, run_dir: Path) -> None:
        """Attach the run saved in `run_dir` under `name` (a LoRA adapter or a full model)."""
        run_dir = Path(run_dir)
        record = TrainRecord.read(run_dir / RunFile.TRAIN)
        if record is not None and record.artifacts:  # runs saved before checksums were recorded have none
            verify_files(run_dir, record.artifacts)
        adapter, full = run_dir / ADAPTER_DIR, run_dir / FULL_MODEL_DIR
        if full.is_dir():
            self._full[name] = full
            return
        if not adapter.is_dir():
            raise FileNotFoundError(f"{run_dir} holds neither {ADAPTER_DIR}/ nor {FULL_MODEL_DIR}/: "
                                    "is its fine-tune finished?")
        self.add_adapter(name, adapter)

    def add_adapter(self, name: str, adapter: Path, base_label: str | None = None, peft: dict | None = None) -> None:
        """Attach a PEFT adapter folder (adapter_config.json and safetensors weights, saved by memlens or by plain
        PEFT) under `name`; one whose matrices do not fit the base is refused (:func:`check_adapter_fits`),
        naming the base as `base_label` (default: its name_or_path). `peft`: its adapter_config.json, when read."""
        adapter = Path(adapter)
        split_fused_modules(self.base, read_adapter_meta(adapter)["fused_suffixes"])
        check_adapter_fits(self.base, adapter, base_label or str(getattr(self.base, "name_or_path", "")), peft)
        peft_name = self._lora.get(name, f"run_{len(self._lora)}")  # a run id may hold a "." (lr0.01, dp0.5)
        if isinstance(self.model, PeftModel):
            with quiet_peft_wrap():
                self.model.load_adapter(str(adapter), adapter_name=peft_name)
        else:
            with quiet_peft_wrap():
                self.model = PeftModel.from_pretrained(self.base, str(adapter), adapter_name=peft_name)
        self.model.eval()
        self._lora[name] = peft_name

    def add_model(self, name: str, source: str | Path) -> None:
        """Register a full fine-tuned model (a folder of safetensors weights, or a hub id) under `name`: loaded
        by :meth:`use` while it is active, in the base model's dtype, on its device."""
        self._full[name] = source

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[torch.nn.Module]:
        """Yield the model with run `name` active; `None` yields the base model (adapters disabled)."""
        if name is None:
            if isinstance(self.model, PeftModel):
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model
        elif name in self._lora:
            self.model.set_adapter(self._lora[name])
            yield self.model
        elif name in self._full:
            with no_hf_progress_bars():
                model = AutoModelForCausalLM.from_pretrained(
                    str(self._full[name]), dtype=self.base.dtype, use_safetensors=True
                ).to(self.base.device).eval()
            try:
                yield model
            finally:
                del model
        else:
            raise KeyError(f"run {name!r} was not added; added: {self.names}")
