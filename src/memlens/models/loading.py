"""Load the base model and tokenizer: safetensors only, no remote code unless asked."""

from __future__ import annotations

import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from memlens.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

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


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer, given a pad token when it has none (reusing eos/unk: the vocabulary is not resized)."""
    tok = AutoTokenizer.from_pretrained(cfg.name_or_path, revision=cfg.revision,
                                        trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise ConfigError(f"model.name_or_path: the tokenizer of {cfg.name_or_path} has no pad, eos or unk "
                              "token to pad with")
        tok.pad_token = fallback
    return tok


def load_base_model(cfg: ModelConfig, device: torch.device | None = None) -> PreTrainedModel:
    """The pretrained model in eval mode on `device` (default: `cfg.device`)."""
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
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ConfigError("model.load_in_8bit needs bitsandbytes: pip install bitsandbytes") from exc
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar per cell: memlens shows its own progress
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    except OSError as exc:
        raise ConfigError(f"model.name_or_path: cannot load {cfg.name_or_path!r} with safetensors weights "
                          f"({exc})") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if not cfg.load_in_8bit:
        model.to(device)
    model.eval()
    return model
