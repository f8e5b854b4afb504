"""Greedy suffix generation throughput: memlens's batched generation vs the study's one-prompt loop.

CPU (default): midpoint prefixes of 500 PHEE training records on llama-small with 3 LoRA adapters on one
base model (switched as in the extraction stage; adapters randomly initialised: same cost as trained
ones). Both arms generate exactly each suffix's length with the same code (`generate_continuations`);
the baseline calls it one prompt at a time, as the study's loop did. Prints medians of `--repeats` and
the ratio.

GPU: `--device cuda --shape llama2-7b` builds a randomly initialised Llama-2-7B-shaped model (no
download) and reports sequences/s for 32 new tokens at batch 64 with the dynamic KV cache and with the
static cache (optionally `--compile`).

    python benchmarks/generation_throughput.py [--quick]
    python benchmarks/generation_throughput.py --device cuda --shape llama2-7b [--compile]
    python benchmarks/generation_throughput.py --smoke    # seconds: llama-tiny, 4 prompts, 1 adapter (tests)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from memlens.attacks.generate import generate_continuations, resolve_decoding, split_tokens
from memlens.config import DecodingConfig, ModelConfig
from memlens.models import AdapterBank, load_base_model, load_tokenizer, save_adapter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES, random_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEMLENS_SHARED", ROOT.parent / "shared"))
GREEDY = resolve_decoding(DecodingConfig(name="greedy"))


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _make_adapters(model_cfg: ModelConfig, folder: Path, n: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    dirs = []
    for i in range(n):
        torch.manual_seed(i)
        peft_model = get_peft_model(load_base_model(model_cfg, torch.device("cpu")), LoraConfig(
            r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
        run_dir = folder / f"run{i}"
        save_adapter(peft_model, run_dir / "adapter", [])
        dirs.append(run_dir)
    return dirs


def cpu_benchmark(args) -> None:
    n_prompts = 48 if args.quick else args.prompts
    model_cfg = ModelConfig(name_or_path=str(SHARED / "models" / args.model), device="cpu")
    tok = load_tokenizer(model_cfg)
    texts = pd.read_json(SHARED / "data" / "phee" / "train.jsonl", lines=True).context.tolist()[:n_prompts]
    splits = [split_tokens(ids, "midpoint", 0, tok.bos_token_id) for ids in tok(texts)["input_ids"]]
    prefixes, n_new = [s.prefix for s in splits], [len(s.suffix) for s in splits]
    n_adapters = 1 if args.quick else args.adapters
    bank = AdapterBank(load_base_model(model_cfg, torch.device("cpu")))
    with tempfile.TemporaryDirectory() as tmp:
        for i, run_dir in enumerate(_make_adapters(model_cfg, Path(tmp), n_adapters)):
            bank.add(f"run{i}", run_dir)
    kw = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, seed=0)

    def run(batch_size: int):
        outputs = []
        for name in bank.names:
            with bank.use(name) as model:
                outputs.append(generate_continuations(model, prefixes, n_new, GREEDY, batch_size=batch_size, **kw))
        return outputs

    tokens = sum(n_new) * n_adapters
    print(f"{args.model}, {n_prompts} PHEE prefixes x {n_adapters} adapter(s), {tokens} new tokens, "
          f"torch threads {torch.get_num_threads()}, repeats {args.repeats}")
    batched_s, batched = _timed(lambda: run(args.batch_size), args.repeats)
    print(f"batched (batch {args.batch_size}):  {batched_s:8.2f} s  {tokens / batched_s:8.0f} new tok/s", flush=True)
    single_s, single = _timed(lambda: run(1), args.repeats)
    print(f"one prompt at a time:  {single_s:8.2f} s  {tokens / single_s:8.0f} new tok/s")
    same = sum(a == b for x, y in zip(batched, single) for a, b in zip(x, y))
    print(f"ratio: {single_s / batched_s:.1f}x  (identical greedy outputs: {same}/{n_prompts * n_adapters})")


def gpu_benchmark(args) -> None:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_llama(args.shape, dtype, device)
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    batch, new, prompt_len = args.batch_size, 32, 18
    gen = torch.Generator().manual_seed(0)
    prefixes = [[1] + torch.randint(3, config.vocab_size, (prompt_len - 1 - i % 5,), generator=gen).tolist()
                for i in range(batch)]  # ragged prompts: left padding is exercised
    kw = dict(pad_token_id=0, eos_token_id=2, seed=0, batch_size=batch)
    print(f"{args.shape} random weights ({n_params / 1e9:.2f}B params, {dtype}) on "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
          f"batch {batch}, {new} new tokens, prompts ~{prompt_len} tokens")
    modes = [("dynamic cache", None), ("static cache", "static")]
    for label, cache in modes:
        def run():
            return generate_continuations(model, prefixes, [new] * batch, GREEDY, cache_implementation=cache, **kw)
        run()  # warm-up (kernels, allocator, compilation when it happens)
        seconds, _ = _timed(run, args.repeats)
        print(f"{label:14s}: {seconds:7.3f} s/batch  {batch / seconds:8.1f} sequences/s  "
              f"{batch * new / seconds:9.0f} new tok/s", flush=True)
    if args.compile:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)

        def run_compiled():
            return generate_continuations(model, prefixes, [new] * batch, GREEDY, cache_implementation="static", **kw)
        for _ in range(2):
            run_compiled()
        seconds, _ = _timed(run_compiled, args.repeats)
        print(f"{'static+compile':14s}: {seconds:7.3f} s/batch  {batch / seconds:8.1f} sequences/s  "
              f"{batch * new / seconds:9.0f} new tok/s")
    if device.type == "cuda":
        weights_gb = n_params * 2 / 1e9
        bw = args.bandwidth_tbs
        bound = batch / (new * weights_gb / (bw * 1e3))
        print(f"decode bound (weights {weights_gb:.1f} GB read per step at {bw} TB/s): ~{bound:.0f} sequences/s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="48 prompts, 1 adapter")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="random-weights model shape (GPU mode); default: llama-small with adapters (CPU mode)")
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (CPU: 64)")
    parser.add_argument("--repeats", type=int, default=None, help="default 1 (CPU full), 3 otherwise")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the forward (static cache)")
    parser.add_argument("--bandwidth-tbs", type=float, default=3.35, help="GPU memory bandwidth for the bound")
    parser.add_argument("--model", default="llama-small", help="shared model of the CPU mode (default llama-small)")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes, seconds (the test suite runs it): "
                        "llama-tiny, 4 prompts, 1 adapter, batch 4, 1 repeat; figures meaningless")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.prompts, args.adapters, args.batch_size, args.repeats = "llama-tiny", 4, 1, 4, 1
    args.batch_size = args.batch_size or 64
    if args.shape:
        args.repeats = args.repeats or 3
        gpu_benchmark(args)
    else:
        args.repeats = args.repeats or (3 if args.quick else 1)
        cpu_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
