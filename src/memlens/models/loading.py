"""Load the base model and tokenizer: safetensors only, no remote code unless asked."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from memlens.config import CellConfig, ConfigError, ModelConfig, StudyConfig, hub_offline, looks_like_local_path

log = logging.getLogger(__name__)


class _DropMessages(logging.Filter):
    """Drops the records of one library logger whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextlib.contextmanager
def quiet_bitsandbytes_import() -> Iterator[None]:
    """Import PEFT (which imports bitsandbytes when it is installed) or bitsandbytes inside this. On a CPU with
    AVX-512 bf16, bitsandbytes asks the optional `kernels` package for a 4-bit CPU kernel at import: it logs a
    warning when it cannot load it, and offline `kernels` itself warns that it skipped the publisher check of
    that kernel (transformers >= 5.25 installs `kernels`). memlens never uses 4-bit weights, so the user has
    nothing to act on. Only those messages of those loggers are dropped, and only while the import runs."""
    drops = {"bitsandbytes.backends.cpu.ops": _DropMessages("Failed to load CPU gemm_4bit_forward"),
             "kernels._internals.hf_hub": _DropMessages(
                 "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'")}
    for name, drop in drops.items():
        logging.getLogger(name).addFilter(drop)
    try:
        yield
    finally:
        for name, drop in drops.items():
            logging.getLogger(name).removeFilter(drop)


# bitsandbytes logs "MatMul8bitLt: inputs will be cast from <dtype> to float16 during quantization" at every
# forward of every 8-bit layer whose input is not float16 (memlens keeps the rest of the model in float32 on
# the CPU, bfloat16 on most GPUs): LLM.int8() quantizes its inputs from float16 by design, so the line says
# nothing wrong, once per layer and batch. The filter is on that one logger and matches that one message; it
# is installed when an 8-bit model is loaded, since the forwards run later, all over memlens.
_INT8_CAST = _DropMessages("MatMul8bitLt: inputs will be cast")


def _quiet_int8_matmul() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _INT8_CAST not in logger.filters:
        logger.addFilter(_INT8_CAST)


@contextlib.contextmanager
def no_hf_progress_bars() -> Iterator[None]:
    """transformers' own bars (the "Loading weights" bar of from_pretrained) off while this runs: memlens
    shows its own progress, and only when asked."""
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"model.device: {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device: cuda requested but no CUDA device is available; use cpu or auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: float32 on CPU (half precision is slow and lossy there), bfloat16 on GPUs that support it."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# files any one of which lets AutoTokenizer build a tokenizer (with its partner where it needs one)
_TOKENIZER_FILES = {
    "tokenizer.json": (),
    "tokenizer.model": (),
    "spiece.model": (),
    "sentencepiece.bpe.model": (),
    "tokenizer.tiktoken": (),
    "vocab.json": ("merges.txt",),
    "vocab.txt": (),
}


def _listing(folder: Path, limit: int = 15) -> str:
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return "it is empty"
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return f"it has: {shown}"


def local_model_folder(cfg: ModelConfig) -> Path | None:
    """The local folder `model.name_or_path` names, or None for a hub id. A name that looks like a path
    (`./m`, `../m`, `/m`, `~/m`, `a/b/c`) but does not exist is an error, not a hub id."""
    name = cfg.name_or_path
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"model.name_or_path: {name} is a file; it must be a model folder (config.json, "
                          "safetensors weights, tokenizer files) or a hub model id")
    if looks_like_local_path(name):
        absolute = Path(os.path.abspath(path))
        parent = next((p for p in absolute.parents if p.is_dir()), None)
        near = f"; the nearest existing folder is {parent}" if parent is not None and parent != absolute.parent else ""
        raise ConfigError(f"model.name_or_path: folder {name} does not exist (looked for {absolute}{near}); "
                          "fix the path, or give a hub model id such as gpt2")
    return None


def _hub_error(cfg: ModelConfig, what: str, exc: Exception) -> ConfigError:
    """A failed hub load as a ConfigError naming the field; offline mode is said as such."""
    offline = hub_offline("model")
    if offline:
        return ConfigError(
            f"model.name_or_path: {cfg.name_or_path!r} is read as a hub model id, but {offline}=1 (offline) and it "
            f"is not in the local hub cache (no {what}); download it once with the hub on (unset {offline}), or "
            "set model.name_or_path to a local folder")
    return ConfigError(f"model.name_or_path: cannot load the {what} of hub model {cfg.name_or_path!r}"
                       f"{f' at revision {cfg.revision!r}' if cfg.revision else ''} ({exc})")


def _check_tokenizer_files(folder: Path) -> None:
    present = {p.name for p in folder.iterdir()}
    if any(p.endswith(".tiktoken") for p in present):
        return
    for main, partners in _TOKENIZER_FILES.items():
        if main in present:
            missing = [p for p in partners if p not in present]
            if missing:
                raise ConfigError(f"model.name_or_path: the tokenizer in {folder} is incomplete: it has {main} but "
                                  f"not {', '.join(missing)}; copy the tokenizer's files saved with "
                                  "tokenizer.save_pretrained() into that folder")
            return
    raise ConfigError(
        f"model.name_or_path: folder {folder} has no tokenizer files (none of tokenizer.json, tokenizer.model, "
        f"vocab.json + merges.txt, vocab.txt, spiece.model); {_listing(folder)}. Copy the files written by "
        "tokenizer.save_pretrained() into it")


def _check_model_files(folder: Path) -> None:
    present = {p.name for p in folder.iterdir()}
    if "config.json" not in present:
        raise ConfigError(f"model.name_or_path: folder {folder} has no config.json; {_listing(folder)}. A model "
                          "folder is what model.save_pretrained() writes")
    if not any(p.endswith((".safetensors", ".safetensors.index.json")) for p in present):
        legacy = sorted(p for p in present if p.endswith((".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")))
        hint = (f" memlens loads only safetensors weights, not {', '.join(legacy)}: convert them with "
                "model.save_pretrained(folder, safe_serialization=True)." if legacy else "")
        raise ConfigError(f"model.name_or_path: folder {folder} has no safetensors weights (model.safetensors or "
                          f"model.safetensors.index.json); {_listing(folder)}.{hint}")


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer, given a pad token when it has none (reusing eos/unk: the vocabulary is not resized)."""
    folder = local_model_folder(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder) if folder is not None else cfg.name_or_path,
                                            revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        if folder is None:
            raise _hub_error(cfg, "tokenizer", exc) from exc
        _check_tokenizer_files(folder)  # after the failure: a tokenizer without the usual files still loads
        raise ConfigError(f"model.name_or_path: cannot load the tokenizer in {folder} ({exc})") from exc
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise ConfigError(f"model.name_or_path: the tokenizer of {cfg.name_or_path} has no pad, eos or unk "
                              "token to pad with")
        tok.pad_token = fallback
    return tok


def load_model_config(cfg: ModelConfig) -> PretrainedConfig:
    """The model's configuration (config.json only: no weights are read or downloaded)."""
    folder = local_model_folder(cfg)
    if folder is not None and not (folder / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: folder {folder} has no config.json; {_listing(folder)}")
    try:
        return AutoConfig.from_pretrained(str(folder) if folder is not None else cfg.name_or_path,
                                          revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        if folder is None:
            raise _hub_error(cfg, "config.json", exc) from exc
        raise ConfigError(f"model.name_or_path: cannot read {folder / 'config.json'} ({exc})") from exc


# config attributes that hold a model's context length, by architecture family
_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def model_context_length(cfg: ModelConfig) -> tuple[int, str] | None:
    """The model's context length in tokens and the config attribute it came from, or None if its config
    names none (e.g. a model without learned or bounded positions)."""
    config = load_model_config(cfg)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    written = text_config.to_dict()  # the keys as config.json spells them (GPT-2: n_positions)
    for attr in sorted(_CONTEXT_ATTRS, key=lambda a: a not in written):
        value = written.get(attr, getattr(text_config, attr, None))
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, attr
    return None


def check_max_length(model_cfg: ModelConfig, max_length: int) -> None:
    """Refuse a `data.max_length` longer than the model's context (read from its config.json, no weights):
    records that long could not be trained on or scored in one window."""
    context = model_context_length(model_cfg)
    if context is None:
        log.debug("%s: no context length in its config; data.max_length %d not checked",
                  model_cfg.name_or_path, max_length)
        return
    tokens, attr = context
    if max_length > tokens:
        raise ConfigError(
            f"data.max_length: {max_length} tokens is more than the context of model {model_cfg.name_or_path} "
            f"({tokens} tokens, {attr} in its config.json); set data.max_length to {tokens} or less")


def check_quantized(study: StudyConfig, cell: CellConfig | None = None) -> None:
    """Refuse what cannot train on an 8-bit base (`model.load_in_8bit: true`), before any work: full
    fine-tuning (int8 weights have no gradients: only LoRA adapters on top of them train) and DP-SGD (Opacus'
    per-sample gradients are not supported through bitsandbytes layers). `cell`: check that cell only, not
    the whole grid."""
    if not study.model.load_in_8bit:
        return
    methods = [cell.method] if cell is not None else study.grid.method
    noises = [cell.noise_multiplier] if cell is not None else study.grid.noise_multiplier
    if "full" in methods:
        raise ConfigError("grid.method: full fine-tuning cannot train an 8-bit base model (model.load_in_8bit: "
                          "true): its int8 weights have no gradients. Use grid.method: [lora], or set "
                          "model.load_in_8bit: false to fine-tune the whole model in 16/32 bits")
    dp = [str(noise) for noise in noises if noise is not None]
    if dp:
        raise ConfigError(f"grid.noise_multiplier: DP-SGD (noise_multiplier {', '.join(dp)}) is not supported on "
                          "an 8-bit base model (model.load_in_8bit: true); set grid.noise_multiplier: [null], or "
                          "model.load_in_8bit: false")


def load_base_model(cfg: ModelConfig, device: torch.device | None = None) -> PreTrainedModel:
    """The pretrained model in eval mode on `device` (default: `cfg.device`)."""
    folder = local_model_folder(cfg)
    if folder is not None:
        _check_model_files(folder)
    source = str(folder) if folder is not None else cfg.name_or_path
    device = device or resolve_device(cfg.device)
    kwargs: dict = {
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "use_safetensors": True,
        "dtype": resolve_dtype(cfg.dtype, device),
    }
    if cfg.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.load_in_8bit:
        try:
            with quiet_bitsandbytes_import():
                import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ConfigError("model.load_in_8bit needs bitsandbytes: pip install 'memlens[int8]' (or "
                              "pip install bitsandbytes)") from exc
        from transformers import BitsAndBytesConfig

        _quiet_int8_matmul()

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    try:
        with no_hf_progress_bars():  # no "Loading weights" bar per cell
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        if folder is None:
            raise _hub_error(cfg, "safetensors weights", exc) from exc
        raise ConfigError(f"model.name_or_path: cannot load {cfg.name_or_path!r} with safetensors weights "
                          f"({exc})") from exc
    if not cfg.load_in_8bit:
        model.to(device)
    model.eval()
    return model
