"""Real (non-pad) training tokens/s of a PHEE epoch through memlens' own training path (finetune_cell).

Recipes, all LoRA r=8 on q,v, same records per optimizer step (batch 16 x grad_accum 4):
  study           the study's recipe: padded random batches of 16 (+ gradient checkpointing and fp16 on GPU)
  length_grouped  batches of similar lengths (padding mostly gone, steps see different records)
  packed          memlens' default: each step's records packed into rows, each record attending only to
                  itself through memlens' variable-length attention (per-record SDPA calls, no mask)
  packed_block_mask  the same rows isolated by transformers' block-diagonal mask over the whole row

CPU (default): llama-small from ../shared/models, float32.
GPU: `--device cuda --shape llama2-7b` builds a Llama-2-7B-shaped model with random weights (no download),
bf16 (the study recipe: fp16 weights + fp16 mixed precision + gradient checkpointing).

Prints the median of `--repeats` runs per recipe and its ratio to the study's recipe measured in the same run.
Tokens/s counts real tokens only (padding excluded), over the Trainer's train() wall time.

    python benchmarks/finetune_throughput.py                 # CPU, llama-small, full PHEE train epoch
    python benchmarks/finetune_throughput.py --quick         # a 320-record slice, 2 repeats
    python benchmarks/finetune_throughput.py --device cuda --shape llama2-7b
    python benchmarks/finetune_throughput.py --smoke         # seconds: llama-tiny, 16 records, 1 repeat (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEMLENS_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from memlens.config import load_study  # noqa: E402
from memlens.data import load_study_data  # noqa: E402
from memlens.models import load_tokenizer  # noqa: E402
from memlens.store import StudyLayout  # noqa: E402
from memlens.train import finetune_cell, read_train_info  # noqa: E402
from shapes import SHAPES, random_llama  # noqa: E402


def recipes(device: str, pack_tokens: int | None = None) -> dict[str, dict]:
    gpu = device == "cuda"
    study = {"packing": "padded"}
    if gpu:
        study.update(precision="fp16", gradient_checkpointing="on")
    # On a GPU a bigger forward pays: the step's 64 records in one packed micro-batch (the same records per
    # optimizer step as 16 x 4). On CPU 16-record micro-batches keep the logits in cache.
    packed = {"packing": "packed", **({"batch_size": 64, "grad_accum": 1} if gpu else {}),
              **({"pack_tokens": pack_tokens} if pack_tokens else {})}
    return {
        "study": study,
        "length_grouped": {"packing": "length_grouped"},
        "packed": packed,
        "packed_block_mask": {**packed, "packed_attention": "block_mask"},
    }


def run_once(args, name: str, train: dict, out: Path) -> dict:
    gpu = args.device == "cuda"
    model_dtype = "float16" if gpu and train.get("precision") == "fp16" else "auto"
    raw = {
        "name": f"bench-{name}", "out": str(out),
        "data": {"source": str(SHARED / "data" / "phee"), "subset": args.records},
        "model": {"name_or_path": str(SHARED / "models" / (args.model if args.shape is None else "llama-tiny")),
                  "device": args.device, "dtype": model_dtype},
        "grid": {"target_modules": [["q", "v"]], "rank": [8], "canary_copies": [1], "seed": [0]},
        "train": {"epochs": 1, "batch_size": 16, "grad_accum": 4, "warmup_steps": 0, "logging_steps": 10**6,
                  **train},
    }
    study = load_study(raw=raw)
    data = load_study_data(study.data)
    base = None
    if args.shape is not None:  # the tokenizer comes from llama-tiny; the weights are random, of the shape
        dtype = {"float16": torch.float16}.get(model_dtype, torch.bfloat16 if gpu else torch.float32)
        base = random_llama(args.shape, dtype, args.device)
    run = finetune_cell(study, study.cells()[0], data, StudyLayout(out), load_tokenizer(study.model),
                        base_model=base)
    info = read_train_info(run)
    del base
    if gpu:
        torch.cuda.empty_cache()
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="random-weight model shape")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--records", type=int, default=None, help="PHEE train records (default: all, one epoch)")
    parser.add_argument("--quick", action="store_true", help="320 records, 2 repeats")
    parser.add_argument("--pack-tokens", type=int, default=None, help="train.pack_tokens of the packed recipe")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--model", default="llama-small", help="shared model fine-tuned on CPU (default llama-small)")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes, seconds (the test suite runs it): "
                        "llama-tiny, 16 records (one step per recipe), 1 repeat; figures meaningless")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.records, args.repeats = "llama-tiny", 16, 1
    if args.quick:
        args.records, args.repeats = args.records or 320, min(args.repeats, 2)
    if args.device == "cpu":
        torch.set_num_threads(torch.get_num_threads())

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {device_name}, model {args.shape or args.model}, records {args.records or 'all'}, "
          f"repeats {args.repeats}", flush=True)
    results: dict[str, list[dict]] = {name: [] for name in recipes(args.device, args.pack_tokens)}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # interleaved, so drifting machine load hits every recipe alike
            for name, train in recipes(args.device, args.pack_tokens).items():
                start = time.perf_counter()
                info = run_once(args, name, train, Path(tmp) / f"{name}-{repeat}")
                results[name].append(info)
                print(f"  {name:17s} repeat {repeat}: {info.train_tokens_per_s:9.0f} real tok/s "
                      f"(padding {info.padding_fraction:.0%}, steps {info.steps}, "
                      f"ckpt {info.gradient_checkpointing}, {info.precision}, "
                      f"{time.perf_counter() - start:.0f}s with load)", flush=True)
    medians = {name: statistics.median(i.train_tokens_per_s for i in infos) for name, infos in results.items()}
    print(f"\n{'recipe':17s} {'median real tok/s':>18s} {'vs study':>9s}")
    for name, value in medians.items():
        print(f"{name:17s} {value:18.0f} {value / medians['study']:8.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "shape": args.shape or args.model,
                                         "records": args.records, "medians": medians,
                                         "runs": {k: [i.train_tokens_per_s for i in v] for k, v in results.items()}},
                                        indent=2))


if __name__ == "__main__":
    main()
