"""Random-weight Llama shapes for the GPU benchmarks (nothing downloaded), shared by every script here.

Token ids come from the shared byte-level tokenizer (8,192 ids), which fit any of these vocabularies.
"""

from __future__ import annotations

import statistics
import time

import torch

SHAPES = {  # LlamaConfig kwargs
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=8192, max_position_embeddings=512),
}


def random_llama(shape: str, dtype: torch.dtype, device: str | torch.device) -> torch.nn.Module:
    """A seeded, randomly initialised LlamaForCausalLM of `shape`, built directly on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], bos_token_id=0, eos_token_id=1, pad_token_id=2)  # the shared tokenizer's
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the target dtype: a 7B model never exists in fp32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_gflops(device: str | torch.device, dtype: torch.dtype, n: int | None = None,
                       repeats: int = 5) -> float:
    """n x n x n matmul throughput (GFLOP/s) in `dtype`, median of `repeats`: the machine's practical peak
    (callers measure it before and after their workload and keep the larger)."""
    n = n or (8192 if torch.device(device).type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e9
