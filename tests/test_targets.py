"""Architecture-independent target names, checked on tiny random-weight models built from configs.

The fused-slice layouts are checked numerically against what each architecture's attention really
computes: a custom attention function records the query, key and value tensors the model passes to
attention, and adapting one slice of a fused projection must change that tensor only.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from memlens.config import ConfigError
from memlens.models import available_matrices, count_parameters, plan_targets, split_fused_modules

_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               bos_token_id=0, eos_token_id=1, pad_token_id=1)
CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**_COMMON, num_key_value_heads=2),
    "qwen2": lambda: Qwen2Config(**_COMMON, num_key_value_heads=2),
    "gpt2": lambda: GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=1),
    "gpt_neox": lambda: GPTNeoXConfig(**_COMMON),
    "opt": lambda: OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                             word_embed_proj_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1),
    "phi3": lambda: Phi3Config(**_COMMON, num_key_value_heads=2),
}
# Module names (layer 0) each abstract name must map to.
EXPECTED = {
    "llama": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    "gpt2": {"q": "attn.c_attn.q", "k": "attn.c_attn.k", "v": "attn.c_attn.v", "o": "attn.c_proj",
             "up": "mlp.c_fc", "down": "mlp.c_proj"},
    "gpt_neox": {"q": "attention.query_key_value.q", "k": "attention.query_key_value.k",
                 "v": "attention.query_key_value.v", "o": "attention.dense", "up": "mlp.dense_h_to_4h",
                 "down": "mlp.dense_4h_to_h"},
    "opt": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
            "up": "fc1", "down": "fc2"},
    "phi3": {"q": "self_attn.qkv_proj.q", "k": "self_attn.qkv_proj.k", "v": "self_attn.qkv_proj.v",
             "o": "self_attn.o_proj", "gate": "mlp.gate_up_proj.gate", "up": "mlp.gate_up_proj.up",
             "down": "mlp.down_proj"},
}
EXPECTED["mistral"] = EXPECTED["qwen2"] = EXPECTED["llama"]

_CAPTURED: list[dict[str, torch.Tensor]] = []


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    _CAPTURED.append({"q": query.detach().clone(), "k": key.detach().clone(), "v": value.detach().clone()})
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("memlens_capture", _capture_attention)


def _tiny(arch: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[arch](), dtype=torch.float32, attn_implementation=attn).eval()


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_every_abstract_name_maps_to_the_right_modules(arch):
    model = _tiny(arch)
    found = available_matrices(model)
    assert set(found) == set(EXPECTED[arch])
    for name, suffix in EXPECTED[arch].items():
        assert len(found[name]) == 2  # one per layer
        assert found[name][0].endswith(f"layers.0.{suffix}") or found[name][0].endswith(f"h.0.{suffix}"), found[name]


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_missing_matrix_is_an_error_listing_what_the_model_has(arch):
    model = _tiny(arch)
    with pytest.raises(ConfigError, match=r"has no 'gate' matrix; it has: \[.*'q'.*\]"):
        plan_targets(model, ["gate"])
    with pytest.raises(ConfigError, match="neither a matrix name"):
        plan_targets(model, ["no_such_proj"])


def _adapt(model, names: list[str], rank: int = 2):
    plan = plan_targets(model, names)
    split_fused_modules(model, plan.fused_suffixes)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=4, target_modules=plan.module_names))
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the update non-zero
            torch.nn.init.normal_(param, std=0.5)
    return peft_model


def _capture(model, ids) -> list[dict[str, torch.Tensor]]:
    _CAPTURED.clear()
    with torch.no_grad():
        model(input_ids=ids)
    return list(_CAPTURED)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "phi3"])
@pytest.mark.parametrize("part", ["q", "k", "v"])
def test_adapting_one_slice_changes_only_that_attention_input(arch, part):
    """In layer 0 (whose input the adapter cannot change) only the adapted q, k or v tensor differs."""
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    model = _adapt(_tiny(arch, "memlens_capture"), [part])
    adapted = _capture(model, ids)
    with model.disable_adapter():
        base = _capture(model, ids)
    layer0, base0 = adapted[0], base[0]
    for other in "qkv":
        same = torch.equal(layer0[other], base0[other])
        assert same == (other != part), f"{arch}: adapting {part} {'left' if same else 'changed'} {other}"


def test_phi3_gate_up_slices():
    """Phi-3's fused gate_up_proj: adapting `up` leaves the activation's input (the gate) unchanged."""
    x = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(0))
    for part, gate_changes in (("gate", True), ("up", False)):
        model = _adapt(_tiny("phi3"), [part])
        mlp = model.base_model.model.model.layers[0].mlp
        seen = []
        mlp.activation_fn.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
        with torch.no_grad():
            out = mlp(x)
            with model.disable_adapter():
                base_out = mlp(x)
        assert not torch.equal(out, base_out)
        assert torch.equal(seen[0], seen[1]) != gate_changes


@pytest.mark.parametrize("arch,width,fused_out", [("llama", 32, None), ("gpt2", 32, 96), ("gpt_neox", 32, 96)])
def test_trainable_parameters_follow_the_formula(arch, width, fused_out):
    rank = 3
    model = _adapt(_tiny(arch), ["q", "v"], rank=rank)
    trainable, total = count_parameters(model)
    q_out = v_out = width if arch != "llama" else None
    if arch == "llama":  # q: 4 heads x 8; v: 2 kv heads x 8
        q_out, v_out = 32, 16
    layers = 2
    assert trainable == layers * rank * ((width + q_out) + (width + v_out))
    base_total = sum(p.numel() for p in _tiny(arch).parameters())
    assert total == base_total + trainable  # the zero-memory slice stand-ins are not counted
