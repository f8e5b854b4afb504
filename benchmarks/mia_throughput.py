"""Membership-inference scoring throughput: memlens vs the study's method, same machine, same run.

Workload: PHEE members (train) and non-members (test) on llama-small with 5 LoRA adapters (randomly
initialised: they cost exactly what trained ones cost to score).
- study's method: for each adapter, reload the base model and the adapter, then one sample at a time
  compute the fine-tuned NLL and, with a reference model also loaded per adapter, the reference NLL.
- memlens: one base model, adapters switched on it; one batched length-bucketed pass per adapter and
  one reference pass (adapters disabled) for all adapters; all attacks but lowercase (which needs an
  extra pass the study does not do) computed from the shared statistics.
Prints medians over repeats, the speed-up, and achieved GFLOP/s as a fraction of this machine's fp32
matmul throughput (large square matmuls, measured in the same run).

    python benchmarks/mia_throughput.py            # 300 + 300 records, 3 repeats
    python benchmarks/mia_throughput.py --quick    # 64 + 64 records, 2 repeats
    python benchmarks/mia_throughput.py --smoke    # seconds: llama-tiny, 8 + 8 records, 1 adapter (the tests')

GPU: `--device cuda --shape llama2-7b` scores PHEE members + non-members (all of train and test unless
`--records`) with a randomly initialised Llama-2-7B-shaped model in bf16 (nothing downloaded) and reports
the scoring pass's achieved FLOP/s as a fraction of the bf16 matmul peak measured in the same run, next
to the textbook batched forward with a full fp32 log-softmax (the issue measured 37% for it on an H100).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from memlens.attacks.mia import attack_models  # noqa: E402
from memlens.config import MIAConfig  # noqa: E402
from memlens.models import save_adapter  # noqa: E402
from memlens.score import token_stats  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES, matmul_peak_gflops, random_llama, synchronize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEMLENS_SHARED", REPO.parent / "shared"))
MODEL = SHARED / "models" / "llama-small"
PHEE = SHARED / "data" / "phee"
ATTACKS = ["loss", "ref_ratio", "ref_llr", "zlib", "min_k", "min_k_pp"]


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_adapters(root: Path, n: int, base: Path = MODEL) -> list[Path]:
    dirs = []
    for i in range(n):
        torch.manual_seed(i)
        model = get_peft_model(load(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
        save_adapter(model, root / f"adapter{i}" / "adapter", [])
        dirs.append(root / f"adapter{i}")
    return dirs


@torch.inference_mode()
def study_method(adapters: list[Path], ids: list[list[int]], base: Path = MODEL) -> dict[str, np.ndarray]:
    """One sample at a time; base model (and reference) reloaded for every adapter."""
    out = {}
    for adapter in adapters:
        model = PeftModel.from_pretrained(load(base), str(adapter / "adapter")).eval()
        reference = load(base)
        ft, ref = [], []
        for seq in ids:
            x = torch.tensor([seq])
            ft.append(model(x, labels=x).loss.item())
            ref.append(reference(x, labels=x).loss.item())
        out[adapter.name] = np.array(ref) / np.array(ft)
        del model, reference
    return out


def memlens_method(adapters: list[Path], members: list[str], non_members: list[str], batch: dict,
                   base: Path = MODEL):
    scores, _ = attack_models(base, {a.name: a for a in adapters}, members, non_members,
                              mia={"attacks": ATTACKS, "bootstrap": 0, "bag_of_words_baseline": False, **batch},
                              show_progress=False)
    return scores


def forward_flops(model: torch.nn.Module, lengths: list[int]) -> float:
    """Matmul FLOPs of scoring these sequences once (real tokens only; padding not counted): linear
    layers including the output layer, plus attention scores and values (causal: ~n^2/2 pairs)."""
    cfg = model.config
    linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    tokens = sum(lengths)
    attn = sum(2 * 2 * cfg.num_hidden_layers * cfg.hidden_size * n * (n + 1) / 2 for n in lengths)
    return 2 * linear * tokens + attn


def median_time(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 + 64 records, 2 repeats")
    parser.add_argument("--records", type=int, default=None,
                        help="members and non-members each (default 300; with --shape: every record)")
    parser.add_argument("--adapters", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (--quick: 2)")
    parser.add_argument("--batch-size", type=int, default=None, help="mia.batch_size (default: memlens')")
    parser.add_argument("--batch-tokens", type=int, default=None, help="mia.batch_tokens (default: memlens' auto)")
    parser.add_argument("--device", default="cpu", help="with --shape: where the random model runs")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="random-weight model (GPU mode)")
    parser.add_argument("--model", type=Path, default=MODEL, help="the CPU mode's model (default llama-small)")
    parser.add_argument("--peak-size", type=int, default=None, help="n of the n^3 matmul peak (default: shapes')")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes, seconds (the test suite runs it): "
                        "llama-tiny, 8 + 8 records, 1 adapter, 1 repeat, a 256^3 peak; figures meaningless")
    args = parser.parse_args(argv)
    if args.quick:
        args.records = 64
    if args.smoke:
        args.model, args.records, args.adapters, args.repeats = SHARED / "models" / "llama-tiny", 8, 1, 1
        args.peak_size = 256
    if args.shape:
        return shape_benchmark(args)
    args.records = args.records or 300
    args.repeats = args.repeats or (2 if args.quick else 3)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    members = pd.read_json(PHEE / "train.jsonl", lines=True).context.head(args.records).tolist()
    non_members = pd.read_json(PHEE / "test.jsonl", lines=True).context.head(args.records).tolist()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(members + non_members)["input_ids"]
    lengths = [len(s) for s in ids]
    print(f"{args.model.name}, {len(members)} members + {len(non_members)} non-members ({sum(lengths)} tokens), "
          f"{args.adapters} adapters, torch threads {torch.get_num_threads()}, repeats {args.repeats}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(tmp), args.adapters, args.model)
        peak = matmul_peak_gflops("cpu", torch.float32, args.peak_size)
        batch = {k: v for k, v in (("batch_size", args.batch_size), ("batch_tokens", args.batch_tokens)) if v}
        mia_cfg = MIAConfig(**batch)
        t_ours, scores = median_time(lambda: memlens_method(adapters, members, non_members, batch, args.model),
                                     args.repeats)
        t_study, study = median_time(lambda: study_method(adapters, ids, args.model), args.repeats)
        # measured before and after: the machine's best
        peak = max(peak, matmul_peak_gflops("cpu", torch.float32, args.peak_size))

        # the same numbers: the study's ratio (ref/ft mean NLL) per record and adapter
        worst = max(np.abs(scores[scores.run_id == a.name].ref_ratio.to_numpy() - study[a.name]).max()
                    for a in adapters)

        # engine alone: one batched pass over all records, matmul FLOPs / time
        model = load(args.model)
        flops = forward_flops(model, lengths)
        t_pass, _ = median_time(lambda: token_stats(model, ids, batch_size=mia_cfg.batch_size,
                                                    max_batch_tokens=mia_cfg.batch_token_budget("cpu"),
                                                    pad_token_id=tokenizer.pad_token_id), args.repeats)
        t_plain, _ = median_time(lambda: _plain_forward(model, ids, 64, tokenizer.pad_token_id),
                                 args.repeats)

    passes = args.adapters + 1
    print(f"study's method:  {t_study:8.2f} s  ({2 * args.adapters} passes, one sample at a time, reloads)")
    print(f"memlens:         {t_ours:8.2f} s  ({passes} batched passes, {len(ATTACKS)} attacks)")
    print(f"speed-up:        {t_study / t_ours:8.2f} x   (target >= 3x); max |ref_ratio difference| {worst:.2e}")
    print(f"fp32 matmul peak ({args.peak_size or 2048}^3, same run): {peak:8.1f} GFLOP/s")
    print(f"scoring pass:    {t_pass:8.2f} s = {flops / t_pass / 1e9:6.1f} GFLOP/s = "
          f"{flops / t_pass / 1e9 / peak:5.1%} of peak (target >= 60%)")
    print(f"end to end:      {passes * flops / t_ours / 1e9:6.1f} GFLOP/s = "
          f"{passes * flops / t_ours / 1e9 / peak:5.1%} of peak (model loading and attacks included)")
    print(f"plain batched HF forward with full-vocabulary log-softmax, sorted batches of 64: {t_plain:.2f} s "
          f"({flops / t_plain / 1e9 / peak:5.1%} of peak)")


def shape_benchmark(args) -> None:
    """Scoring pass of a random-weight model of `args.shape` (bf16 on a GPU) vs the matmul peak."""
    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    repeats = args.repeats or 3
    texts = [t for split in ("train", "test") for t in  # records None: every record
             pd.read_json(PHEE / f"{split}.jsonl", lines=True).context.head(args.records).tolist()]
    tokenizer = AutoTokenizer.from_pretrained(MODEL)  # ids < 8192 fit the random model's vocabulary
    ids = tokenizer(texts)["input_ids"]
    model = random_llama(args.shape, dtype, device)
    mia_cfg = MIAConfig(**{k: v for k, v in (("batch_size", args.batch_size), ("batch_tokens", args.batch_tokens))
                           if v})
    budget = mia_cfg.batch_token_budget(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.shape} random weights, {dtype}, on {name}: {len(ids)} records ({sum(map(len, ids))} tokens), "
          f"batch_tokens {budget}, repeats {repeats}", flush=True)
    peak = matmul_peak_gflops(device, dtype, args.peak_size)
    flops = forward_flops(model, [len(x) for x in ids])

    def timed(fn) -> float:
        fn()  # warm-up: kernels, allocator
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    t_pass = timed(lambda: token_stats(model, ids, batch_size=mia_cfg.batch_size, max_batch_tokens=budget,
                                       pad_token_id=tokenizer.pad_token_id))
    t_plain = timed(lambda: _plain_forward(model, ids, 64, tokenizer.pad_token_id))
    peak = max(peak, matmul_peak_gflops(device, dtype, args.peak_size))
    print(f"{dtype} matmul peak (same run): {peak:9.1f} GFLOP/s")
    print(f"scoring pass (memlens): {t_pass:8.2f} s = {flops / t_pass / 1e9:8.1f} GFLOP/s = "
          f"{flops / t_pass / 1e9 / peak:5.1%} of peak (target >= 60%)")
    print(f"plain batched HF forward + full fp32 log-softmax, sorted batches of 64: {t_plain:.2f} s = "
          f"{flops / t_plain / 1e9 / peak:5.1%} of peak; ratio {t_plain / t_pass:.2f}x")


@torch.inference_mode()
def _plain_forward(model, ids, batch_size, pad):
    """Reference point: the textbook batched scorer (sorted batches, full fp32 log-softmax of the logits)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for b in range(0, len(order), batch_size):
        rows = [ids[i] for i in order[b:b + batch_size]]
        width = max(map(len, rows))
        x = torch.full((len(rows), width), pad, device=model.device)
        mask = torch.zeros_like(x)
        for r, seq in enumerate(rows):
            x[r, :len(seq)], mask[r, :len(seq)] = torch.tensor(seq, device=model.device), 1
        logp = torch.log_softmax(model(input_ids=x, attention_mask=mask).logits.float(), -1)
        logp[:, :-1].gather(-1, x[:, 1:, None])


if __name__ == "__main__":
    sys.exit(main())
