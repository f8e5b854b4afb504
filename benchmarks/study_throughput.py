"""A whole study, end to end: memlens vs the study's own method on the same grid, same machine, same run.

Grid: LoRA on [q] and [v] x rank 1 and 4 (4 fine-tunes), llama-tiny, a seeded PHEE subset (`--records` per
split), 1 epoch, batch 16 x 4.
- memlens: `memlens.runner.run_study` on a study built with `load_study(raw=...)`: packed fine-tunes, then
  the membership stage (one base model, adapters switched on it, one batched pass per fine-tune and one
  reference pass for all; every default attack, bootstrap intervals, bag-of-words baseline, utility
  perplexities) and the extraction stage (batched greedy generation of the suffix from the midpoint
  prefix of the canary and `--extract` training records, under each fine-tune and the base model).
  The report is not built (the baseline has none).
- the study's method, implemented here: the padded fine-tune recipe (memlens `train.packing: padded`,
  the recipe of `finetune_throughput.py`'s `study` arm, same epochs and batches), then for each fine-tune
  the base model and a reference model reloaded and every member and non-member scored one sample at a
  time (plain transformers + peft forward passes, mean token NLL, ratio ref/ft: `mia_throughput.py`'s
  `study_method`), then the base model reloaded with the adapter and the same extraction records
  continued one prompt at a time with `generate` (greedy, exactly the suffix's length).
The baseline does less than memlens (one attack, no intervals, no utility split, no base-model extraction
control): its time is a lower bound of the study's.

Prints both wall times, the split by stage (fine-tune / MIA / extraction) and the speed-up (medians over
`--repeats`, the arms alternating). memlens' stage times are the ones its runner records per cell
(`runs/<id>/timings.json`, a batched stage's time shared among its cells).

    python benchmarks/study_throughput.py                 # 200 records per split, 20 extraction records
    python benchmarks/study_throughput.py --quick         # 64 records per split, 8 extraction records
    python benchmarks/study_throughput.py --records 300 --out /tmp/study-bench
    python benchmarks/study_throughput.py --together 2    # memlens trains [q] r1+r4 and [v] r1+r4 in pairs
    python benchmarks/study_throughput.py --smoke         # seconds: 16 records per split, 2 extraction records
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch
from transformers.utils import logging as hf_logging

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

# the other benchmarks' helpers: the study's fine-tune recipe and its one-sample-at-a-time scorer
import finetune_throughput
import mia_throughput
from memlens.attacks.extraction import select_targets
from memlens.attacks.generate import split_tokens
from memlens.config import load_study
from memlens.data import load_study_data
from memlens.models import load_tokenizer
from memlens.runner import run_study
from memlens.store import StudyLayout
from memlens.train import finetune_cell, read_members

SHARED = Path(os.environ.get("MEMLENS_SHARED", REPO.parent / "shared"))
MODEL = SHARED / "models" / "llama-tiny"
PHEE = SHARED / "data" / "phee"
STAGES = ("finetune", "mia", "extraction")


def study_raw(out: Path, records: int, extract: int, train: dict | None = None) -> dict:
    """The benchmark's study: 4 cells on llama-tiny; `train` overrides the training section."""
    return {
        "name": "study-throughput", "out": str(out),
        "data": {"source": str(PHEE), "subset": records},
        "model": {"name_or_path": str(MODEL)},
        "grid": {"target_modules": [["q"], ["v"]], "rank": [1, 4], "canary_copies": [1], "seed": [0]},
        "train": {"epochs": 1, "batch_size": 16, "grad_accum": 4, "warmup_steps": 0, "logging_steps": 10**6,
                  **(train or {})},
        "extraction": {"members": extract, "non_members": 0},
    }


# ------------------------------------------------------------------------------------------ memlens
def memlens_arm(out: Path, records: int, extract: int, together: int = 1) -> dict:
    study = load_study(raw=study_raw(out, records, extract, {"together": together}))
    start = time.perf_counter()
    summary = run_study(study, report=False, show_progress=False)
    total = time.perf_counter() - start
    if summary.failed:
        raise RuntimeError(f"memlens run failed: {summary.failed}")
    stages = dict.fromkeys(STAGES, 0.0)
    layout = StudyLayout(study.out_dir)
    for run_id in layout.finished_runs():  # per-cell stage times the runner recorded (batched stages: shares)
        timings = json.loads((layout.run_dir(run_id) / "timings.json").read_text())
        for stage in STAGES:
            stages[stage] += timings.get(stage, {}).get("wall_s", 0.0)
    return {"total_s": total, "stages_s": stages, "cells": len(layout.finished_runs())}


# ------------------------------------------------------------------------------------- study's method
def baseline_finetune(out: Path, records: int, extract: int) -> list[Path]:
    """The study's recipe, one cell after another, everything loaded per cell as its scripts did."""
    study = load_study(raw=study_raw(out, records, extract, finetune_throughput.recipes("cpu")["study"]))
    layout = StudyLayout(study.out_dir)
    runs = []
    for cell in study.cells():
        runs.append(finetune_cell(study, cell, load_study_data(study.data), layout, load_tokenizer(study.model)))
    return [Path(r) for r in runs]


def baseline_mia(runs: list[Path], non_members: list[str], tokenizer) -> dict[str, float]:
    """Per fine-tune: reload, score one sample at a time (ratio ref/ft of mean token NLL), AUC."""
    from sklearn.metrics import roc_auc_score

    aucs = {}
    for run in runs:
        members = read_members(run).text.tolist()
        ids = tokenizer(members + non_members)["input_ids"]
        ratio = mia_throughput.study_method([run], ids, MODEL)[run.name]  # reloads MODEL per fine-tune
        aucs[run.name] = float(roc_auc_score(np.r_[np.ones(len(members)), np.zeros(len(non_members))], ratio))
    return aucs


@torch.inference_mode()
def baseline_extraction(runs: list[Path], extraction_cfg, non_members: pd.DataFrame, tokenizer) -> int:
    """Per fine-tune: reload the base model with the adapter, then one prompt at a time, greedy, exactly
    the suffix's length, from the midpoint prefix of the records memlens attacks. Returns tokens made."""
    from peft import PeftModel

    made = 0
    for run in runs:
        targets = select_targets(read_members(run), non_members, extraction_cfg)
        model = PeftModel.from_pretrained(mia_throughput.load(MODEL), str(run / "adapter")).eval()
        for text in targets.text:
            split = split_tokens(tokenizer(text)["input_ids"], "midpoint", 0, tokenizer.bos_token_id)
            if split is None:
                continue
            x = torch.tensor([split.prefix])
            n = len(split.suffix)
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            made += out.shape[1] - x.shape[1]
        del model
    return made


def baseline_arm(out: Path, records: int, extract: int) -> dict:
    stages = {}
    start = time.perf_counter()
    runs = baseline_finetune(out, records, extract)
    stages["finetune"] = time.perf_counter() - start
    study = load_study(raw=study_raw(out, records, extract))
    data = load_study_data(study.data)
    tokenizer = load_tokenizer(study.model)
    t = time.perf_counter()
    aucs = baseline_mia(runs, data.non_members.text.tolist(), tokenizer)
    stages["mia"] = time.perf_counter() - t
    t = time.perf_counter()
    tokens = baseline_extraction(runs, study.extraction, data.non_members, tokenizer)
    stages["extraction"] = time.perf_counter() - t
    return {"total_s": time.perf_counter() - start, "stages_s": stages, "cells": len(runs), "aucs": aucs,
            "generated_tokens": tokens}


# -------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 records per split, 8 extraction records")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes, seconds (the test suite runs it): "
                        "16 records per split (one step per fine-tune), canary + 2 extraction records; figures "
                        "meaningless")
    parser.add_argument("--records", type=int, default=None, help="PHEE records per split (default 200)")
    parser.add_argument("--extract", type=int, default=None,
                        help="training records attacked by extraction besides the canary (default 20)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each arm, alternating (default 1)")
    parser.add_argument("--together", type=int, default=1,
                        help="memlens' train.together: its cells sharing matrices train in one pass (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of both arms (default: torch's, one per core). On a machine shared "
                        "with other work, 1 avoids the spinning of idle threads waiting for a busy core")
    parser.add_argument("--out", type=Path, default=None,
                        help="keep every run's study folder (DIR/<arm>-<repeat>; DIR must be new or empty) and "
                        "write DIR/study_throughput.json; default: a temporary folder, removed")
    args = parser.parse_args(argv)
    if args.smoke:
        args.records, args.extract = args.records or 16, 2
    records = args.records or (64 if args.quick else 200)
    if args.threads:
        torch.set_num_threads(args.threads)
    extract = args.extract if args.extract is not None else (8 if args.quick else 20)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("memlens").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)

    tmp = None
    if args.out is None:
        tmp = tempfile.mkdtemp(prefix="study-throughput-")
        root = Path(tmp)
    else:
        root = args.out
        if root.exists() and any(root.iterdir()):
            parser.error(f"{root} is not empty: give a new --out (study folders are never overwritten)")
    print(f"llama-tiny, PHEE {records} records per split, 4 cells ([q],[v] x r1,r4), 1 epoch, "
          f"extraction: canary + {extract} records; memlens train.together {args.together}; "
          f"torch threads {torch.get_num_threads()}, "
          f"{args.repeats} repeat(s), load average {os.getloadavg()[0]:.1f}", flush=True)
    runs: dict[str, list[dict]] = {"memlens": [], "baseline": []}
    try:
        for repeat in range(args.repeats):  # alternating (ABBA): a drifting machine load hits both arms alike
            order = ("memlens", "baseline") if repeat % 2 == 0 else ("baseline", "memlens")
            for arm in order:
                folder = root / f"{arm}-{repeat}"
                if arm == "memlens":
                    result = memlens_arm(folder, records, extract, args.together)
                else:
                    result = baseline_arm(folder, records, extract)
                result["load_average"] = os.getloadavg()[0]
                runs[arm].append(result)
                print(f"  {arm:8s} repeat {repeat}: {result['total_s']:6.1f} s  (" + ", ".join(
                    f"{k} {v:.1f}" for k, v in result["stages_s"].items()) + f"; load average "
                    f"{result['load_average']:.1f})", flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def median(arm: str, key: str, stage: str | None = None) -> float:
        return statistics.median(r["stages_s"][stage] if stage else r[key] for r in runs[arm])

    print(f"\nmedians of {args.repeats}: {'stage':12s} {'memlens s':>10s} {'study s':>10s} {'speed-up':>9s}")
    for stage in STAGES:
        a, b = median("memlens", "", stage), median("baseline", "", stage)
        print(f"{'':13s}{stage:12s} {a:10.1f} {b:10.1f} {b / a if a else float('nan'):8.2f}x")
    ours, base = median("memlens", "total_s"), median("baseline", "total_s")
    other = [ours - sum(median("memlens", "", s) for s in STAGES),
             base - sum(median("baseline", "", s) for s in STAGES)]
    print(f"{'':13s}{'other':12s} {other[0]:10.1f} {other[1]:10.1f}   (setup, locks, merges, data loading)")
    print(f"{'':13s}{'whole study':12s} {ours:10.1f} {base:10.1f} {base / ours:8.2f}x")
    print("baseline ref_ratio AUCs (sanity): "
          + ", ".join(f"{k}: {v:.3f}" for k, v in runs["baseline"][-1]["aucs"].items()))
    if args.out is not None:
        (root / "study_throughput.json").write_text(json.dumps(
            {"records": records, "extract": extract, "repeats": args.repeats, "runs": runs,
             "memlens_s": ours, "baseline_s": base, "speed_up": base / ours}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
