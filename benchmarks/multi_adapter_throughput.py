"""LoRA adapters trained together (`train.together`) against the same adapters trained one after another.

Three measurements, each arm run in the same process, back to back:

  adapters    N adapters of one recipe (LoRA on q,v, rank `--rank`, seeds 0..N-1: the grid cells of a seed axis) on a
              PHEE slice, the study's batches (16 x 4), 1 epoch: `finetune_cell` per cell as the finetune stage runs
              it with `train.together: 1` (the base model loaded per cell) against `finetune_group` of all N
              (`train.together: N`). Prints both wall times, the train loops' real tokens/s, the largest relative
              distance between the two arms' adapters, and `ratio: <one after another / together> x`.
  references  a recipe's 8 reference adapters (`--references`) as the references stage trains them
              (`train_references`), one at a time and 8 together, against one target fine-tune of the same recipe
              (the recipe of benchmarks/references_mia.py: random design over 300 PHEE train records, q,v rank 8,
              4 epochs).
  layouts     the LoRA update alone (forward + backward), N adapters of mixed ranks (1, 4, 16, 64) and of one
              rank on their own tokens: grouped (each adapter's own two matmuls, what memlens runs) against
              padded (ranks and token counts padded to the largest, one batched matmul for all).

CPU (default): llama-tiny and llama-small from ../shared/models, float32, torch's threads (`--threads`).
GPU: `--device cuda --shape llama2-7b` (random weights of the 7B shape, bf16; `adapters` only): tokens/s of N
rank-8 adapters together against one adapter alone (the same micro-batches).

    python benchmarks/multi_adapter_throughput.py --quick     # 64 records, 8 llama-tiny adapters; refs at 64
    python benchmarks/multi_adapter_throughput.py             # 300 records; llama-tiny and llama-small; refs
    python benchmarks/multi_adapter_throughput.py --device cuda --shape llama2-7b --parts adapters
    python benchmarks/multi_adapter_throughput.py --smoke     # seconds: 2 adapters, 2 references, 1 step each
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEMLENS_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import load_file  # noqa: E402

from memlens.attacks.references import train_references  # noqa: E402
from memlens.config import load_study  # noqa: E402
from memlens.context import StudyContext  # noqa: E402
from memlens.data import load_study_data  # noqa: E402
from memlens.models import load_tokenizer  # noqa: E402
from memlens.store import StudyLayout  # noqa: E402
from memlens.train import finetune_cell, read_train_info  # noqa: E402
from memlens.train.together import finetune_group  # noqa: E402
from shapes import SHAPES, matmul_peak_gflops, random_llama, synchronize  # noqa: E402


def study(out: Path, model: str, args, together: int, **sections):
    grid = {"target_modules": [["q", "v"]], "rank": [args.rank], "canary_copies": [1],
            "seed": list(range(args.adapters))}
    raw = {"name": "multi-adapter", "out": str(out),
           "data": {"source": str(SHARED / "data" / "phee"), "subset": args.records},
           "model": {"name_or_path": str(SHARED / "models" / model), "device": args.device},
           "grid": grid,
           "train": {"epochs": 1, "batch_size": 16, "grad_accum": 4, "warmup_steps": 0, "logging_steps": 10**6,
                     "together": together, **({"max_steps": args.max_steps} if args.max_steps else {})}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return load_study(raw=raw)


def _loop_figures(runs: list[Path]) -> tuple[int, float]:
    """(real tokens, train-loop seconds) of runs trained one after another (their loops add up)."""
    infos = [read_train_info(r) for r in runs]
    return sum(i.real_tokens for i in infos), sum(i.wall_time_s for i in infos)


def _distance(a: Path, b: Path) -> float:
    wa, wb = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (a, b))
    return max(float((wa[k] - wb[k]).norm() / wa[k].norm()) for k in wa)


def adapters(args, model: str, root: Path) -> float:
    """N adapters one after another vs together; returns the ratio."""
    gpu = args.device == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    base = (lambda: random_llama(args.shape, dtype, args.device)) if args.shape else (lambda: None)
    alone_study, group_study = study(root / "alone", model, args, 1), study(root / "together", model, args,
                                                                             args.adapters)
    data = load_study_data(alone_study.data)
    tokenizer = load_tokenizer(alone_study.model)
    cells = alone_study.cells()
    # On a GPU with a random 7B-shaped base: one adapter alone (the same micro-batches) stands for the N
    alone_cells = cells[:1] if args.shape else cells
    if gpu:
        matmul_peak_gflops(args.device, dtype, n=4096, repeats=1)  # CUDA context and cuBLAS warm before either arm
    synchronize(args.device)
    start = time.perf_counter()
    alone = [finetune_cell(alone_study, c, data, StudyLayout(alone_study.out_dir), tokenizer, base_model=base())
             for c in alone_cells]
    synchronize(args.device)
    alone_wall = time.perf_counter() - start
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    start = time.perf_counter()
    together = finetune_group(group_study, [(c, data) for c in cells], StudyLayout(group_study.out_dir), tokenizer,
                              base_model=base())
    synchronize(args.device)
    together_wall = time.perf_counter() - start
    tokens_alone, loop_alone = _loop_figures(alone)
    infos = [read_train_info(r) for r in together]
    tokens_together, loop_together = sum(i.real_tokens for i in infos), max(i.wall_time_s for i in infos)
    rate_alone, rate_together = tokens_alone / loop_alone, tokens_together / loop_together
    name = f"{args.shape} (random weights, {dtype})" if args.shape else model
    print(f"\n{name}: {len(cells)} adapters, q,v rank {args.rank}, {args.records or 'all'} PHEE records each, "
          f"batch 16 x 4; torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    if args.shape:
        print(f"  one adapter alone    : {rate_alone:9.0f} real tok/s (train loop {loop_alone:.1f} s)")
        print(f"  {len(cells)} adapters together: {rate_together:9.0f} real tok/s (train loop {loop_together:.1f} s, "
              f"{together_wall:.1f} s with setup)")
        ratio = rate_together / rate_alone
        print(f"ratio: {ratio:.2f} x (tokens/s together / alone)")
        return ratio
    print(f"  one after another: {alone_wall:7.1f} s ({loop_alone:.1f} s in train loops, {rate_alone:.0f} real tok/s)")
    print(f"  together         : {together_wall:7.1f} s ({loop_together:.1f} s in the train loop, "
          f"{rate_together:.0f} real tok/s)")
    distance = max(_distance(a, b) for a, b in zip(alone, together))
    print(f"  largest relative distance between the arms' adapters: {distance:.1e}")
    print(f"  train loops alone: {loop_alone / loop_together:.2f} x")
    ratio = alone_wall / together_wall
    print(f"ratio: {ratio:.2f} x")
    return ratio


def references(args, root: Path) -> None:
    """A recipe's N references (`--references`, default 8) one at a time, then N together, against one target
    fine-tune of the recipe."""
    n = args.references
    sections = dict(data={"subset": args.ref_records, "membership": "random", "group": r"^(\d+)_",
                          "membership_unit": "record"},
                    grid={"target_modules": [["q", "v"]], "rank": [8], "seed": [0]},
                    train={"epochs": args.ref_epochs, "batch_size": 16, "grad_accum": 1, "learning_rate": 2e-3},
                    mia={"references": n, "attacks": ["loss", "ref_ratio", "lira"]})
    walls = {}
    for together in (1, n):
        ctx = StudyContext(study(root / f"refs-{together}", "llama-tiny", args, together, **sections))
        cell = ctx.study.cells()[0]
        data, tokenizer = ctx.cell_data(cell), ctx.tokenizer()  # loaded before the clocks start
        if together == 1:
            start = time.perf_counter()
            finetune_cell(ctx.study, cell, data, ctx.layout, tokenizer)
            walls["target"] = time.perf_counter() - start
        start = time.perf_counter()
        train_references(ctx.study, [cell], ctx.cell_data, ctx.layout, tokenizer)  # as the references stage calls it
        walls[together] = time.perf_counter() - start
    training = f"max_steps {args.max_steps}" if args.max_steps else f"{args.ref_epochs:g} epochs"
    print(f"\nreferences (llama-tiny, random design over {args.ref_records} PHEE records, q,v rank 8, "
          f"{training}; load average {os.getloadavg()[0]:.1f}):")
    print(f"  one target fine-tune           : {walls['target']:6.1f} s")
    for together, label in ((1, f"{n} references one at a time"), (n, f"{n} references together     ")):
        print(f"  {label}: {walls[together]:6.1f} s = {walls[together] / walls['target']:.2f} target fine-tunes")
    print(f"ratio: {walls[1] / walls[n]:.2f} x (references one at a time / together)")


def _lora_time(x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor]], tokens: list[int], padded: bool,
               repeats: int) -> float:
    """Seconds of one forward + backward of the LoRA updates of `weights` ((A, B) per adapter) on their tokens."""
    def once() -> None:
        if padded:  # ranks and token counts padded to the largest: one batched matmul for all adapters
            rank, width = max(a.shape[0] for a, _ in weights), max(tokens)
            a = torch.stack([torch.nn.functional.pad(a, (0, 0, 0, rank - a.shape[0])) for a, _ in weights])
            b = torch.stack([torch.nn.functional.pad(b, (0, rank - b.shape[1])) for _, b in weights])
            chunks = torch.split(x, tokens)
            xs = torch.stack([torch.nn.functional.pad(c, (0, 0, 0, width - len(c))) for c in chunks])
            out = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
            out = torch.cat([out[i, :n] for i, n in enumerate(tokens)])
        else:  # grouped: each adapter's own matmuls on its own tokens
            out = torch.cat([c @ a.T @ b.T for c, (a, b) in zip(torch.split(x, tokens), weights)])
        out.sum().backward()

    once()
    synchronize(x.device)
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    synchronize(x.device)
    return (time.perf_counter() - start) / repeats


def layouts(args) -> None:
    hidden = SHAPES[args.shape]["hidden_size"] if args.shape else 192
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    tokens = [600 + 37 * i for i in range(args.adapters)]  # micro-batches of ~16 PHEE records, a little uneven
    print(f"\nLoRA layouts: {args.adapters} adapters on {hidden} -> {hidden}, {sum(tokens)} tokens, forward + backward "
          f"of the updates only ({args.device}, {dtype})")
    for label, ranks in (("mixed ranks 1/4/16/64", [(1, 4, 16, 64)[i % 4] for i in range(args.adapters)]),
                         (f"rank {args.rank} each", [args.rank] * args.adapters)):
        x = torch.randn(sum(tokens), hidden, device=args.device, dtype=dtype, requires_grad=True)
        weights = [(torch.randn(r, hidden, device=args.device, dtype=dtype, requires_grad=True),
                    torch.randn(hidden, r, device=args.device, dtype=dtype, requires_grad=True)) for r in ranks]
        grouped = _lora_time(x, weights, tokens, padded=False, repeats=args.layout_repeats)
        padded = _lora_time(x, weights, tokens, padded=True, repeats=args.layout_repeats)
        print(f"  {label:22s}: grouped {grouped * 1e3:7.2f} ms, padded {padded * 1e3:7.2f} ms "
              f"(padded / grouped {padded / grouped:.2f})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 records per adapter, llama-tiny only, refs at 64")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes, seconds (the test suite runs it): "
                        "2 adapters and 2 references of 16 records, 1 step each, llama-tiny; figures meaningless")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="random-weight base of this shape")
    parser.add_argument("--models", nargs="+", default=None, help="shared models (default llama-tiny llama-small)")
    parser.add_argument("--parts", nargs="+", default=["adapters", "references", "layouts"],
                        choices=["adapters", "references", "layouts"])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--references", type=int, default=8, help="reference adapters of the references part")
    parser.add_argument("--records", type=int, default=None, help="PHEE train records per adapter (default 300)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps per adapter (default: 1 epoch)")
    parser.add_argument("--ref-records", type=int, default=None, help="references' pool (default 300; quick 64)")
    parser.add_argument("--ref-epochs", type=float, default=None, help="references' epochs (default 4; quick 1)")
    parser.add_argument("--layout-repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.adapters, args.references, args.max_steps, args.layout_repeats = 2, 2, 1, 1
        args.records = args.ref_records = 16
        args.models = args.models or ["llama-tiny"]
    args.records = args.records or (64 if args.quick else 300)
    args.ref_records = args.ref_records or (64 if args.quick else 300)
    args.ref_epochs = args.ref_epochs or (1 if args.quick else 4)
    models = args.models or (["llama-tiny"] if args.quick or args.shape else ["llama-tiny", "llama-small"])
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("memlens").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {device}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="multi-adapter-") as tmp:
        if "adapters" in args.parts:
            for model in models:
                adapters(args, model, Path(tmp) / model)
        if "references" in args.parts and not args.shape:
            references(args, Path(tmp))
    if "layouts" in args.parts:
        layouts(args)


if __name__ == "__main__":
    main()
