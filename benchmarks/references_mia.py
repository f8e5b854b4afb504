"""LiRA and RMIA with 4 and 8 reference adapters next to the study's reference ratio, and what the references cost.

A small PHEE study on llama-tiny with the random membership design (one coin per record over PHEE train,
documents named by `^(\\d+)_`), a few target seeds sharing one recipe:

  A  references 0: fine-tune the targets; attacks without references (cold base-model cache)
  B  references 8 (`--references`): the `references` stage trains 8 adapters (once, for every target); `mia`
     scores them
  C  references 8 again (`--force mia`): the reference statistics now come from their cache
  D  references 4 (half, `--force mia`): the first 4 of the same adapters (same run ids), TPRs with 4

Prints TPR at 1% / 0.1% FPR and AUC per attack (mean over the targets, and each target's), and the wall times:
one target fine-tune, the references stage, and the membership stage with and without reference scoring.

    python benchmarks/references_mia.py --out /tmp/refbench            # ~300 + 300 records, 3 targets
    python benchmarks/references_mia.py --quick --out /tmp/refbench-q  # a short run
    python benchmarks/references_mia.py --smoke --out /tmp/refbench-s  # seconds (the test suite's)
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from memlens.config import load_study  # noqa: E402
from memlens.runner import run_study  # noqa: E402
from memlens.store import RunFile, StudyLayout, read_results  # noqa: E402
from memlens.store.records import TimingsRecord, TrainRecord  # noqa: E402

SHARED = Path(os.environ.get("MEMLENS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REFERENCE_ATTACKS = ["lira", "lira_offline", "rmia", "rmia_offline"]
OTHER_ATTACKS = ["loss", "ref_ratio", "min_k_pp", "recall", "con_recall"]


def study(out: Path, references: int, attacks: list[str], args) -> object:
    return load_study(raw={
        "name": "references-benchmark", "out": str(out),
        "data": {"source": str(SHARED / "data" / "phee"), "subset": args.subset, "membership": "random",
                 "group": r"^(\d+)_", "membership_unit": "record"},
        "model": {"name_or_path": str(SHARED / "models" / "llama-tiny")},
        "grid": {"target_modules": [["q", "v"]], "rank": [8], "seed": list(range(args.targets))},
        "train": {"epochs": args.epochs, "batch_size": 16, "grad_accum": 1, "warmup_steps": 0,
                  "learning_rate": args.lr, **({"max_steps": args.max_steps} if args.max_steps else {})},
        "mia": {"references": references, "attacks": attacks, "bootstrap": 0, "bag_of_words_baseline": False},
        "extraction": {"enabled": False},
    })


def stage_batch(layout: StudyLayout, stage: str) -> float:
    """Wall seconds of a stage over every run (a batched stage: its batch time, counted once)."""
    batches, total = set(), 0.0
    for run_id in layout.finished_runs():
        timing = TimingsRecord.read(layout.run_file(run_id, RunFile.TIMINGS)).root.get(stage)
        if timing is None:
            continue
        if (timing.batch_cells or 1) > 1:
            batches.add((timing.finished, timing.batch_wall_s))
        else:
            total += timing.wall_s
    return total + sum(b for _, b in batches)


def mia_rows(layout: StudyLayout) -> pd.DataFrame:
    results = read_results(layout)
    return results[results.stage == "mia"][["run_id", "attack", "auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr"]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("memlens-out/references-benchmark"))
    parser.add_argument("--subset", type=int, default=300, help="about this many members and non-members")
    parser.add_argument("--targets", type=int, default=3, help="target fine-tunes (seeds) sharing the references")
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps per fine-tune (default: epochs)")
    parser.add_argument("--references", type=int, default=8, help="reference adapters of B and C (D: half of them)")
    parser.add_argument("--quick", action="store_true", help="subset 60, 1 target, 1 epoch")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes, seconds (the test suite runs it): "
                        "subset 16, 1 target, 4 references, 1 step each; figures meaningless")
    args = parser.parse_args(argv)
    if args.quick:
        args.subset, args.targets, args.epochs = 60, 1, 1
    if args.smoke:
        args.subset, args.targets, args.max_steps, args.references = 16, 1, 1, 4
    full, half = args.references, args.references // 2
    if half < 2:
        parser.error("--references must be at least 4 (D uses half of them, and LiRA needs 2)")
    shutil.rmtree(args.out, ignore_errors=True)
    layout = StudyLayout(args.out)
    walls = {}

    def step(name: str, references: int, attacks: list[str], force=None) -> None:
        start = time.perf_counter()
        summary = run_study(study(args.out, references, attacks, args), force=force, report=False, show_progress=False)
        assert summary.ok, [o.error for o in summary.failed]
        walls[name] = {"total": time.perf_counter() - start, "mia": stage_batch(layout, "mia"),
                       "references": stage_batch(layout, "references")}

    step("A", 0, OTHER_ATTACKS)
    train = [TrainRecord.load(layout.run_file(r, RunFile.TRAIN)) for r in layout.finished_runs()]
    step("B", full, OTHER_ATTACKS + REFERENCE_ATTACKS, force=["mia"])
    with_full = mia_rows(layout)
    step("C", full, OTHER_ATTACKS + REFERENCE_ATTACKS, force=["mia"])
    step("D", half, OTHER_ATTACKS + REFERENCE_ATTACKS, force=["mia"])
    with_half = mia_rows(layout)
    refs = [TrainRecord.load(layout.references.run_file(r, RunFile.TRAIN)) for r in layout.references.finished_runs()]

    table = pd.concat([with_full.assign(references=full), with_half.assign(references=half)])
    table = table[(table.references == full) | table.attack.isin(REFERENCE_ATTACKS)]
    table.loc[~table.attack.isin(REFERENCE_ATTACKS), "references"] = 0
    summary = (table.groupby(["attack", "references"])
               .agg(tpr_1pct=("tpr_at_1pct_fpr", "mean"), tpr_0_1pct=("tpr_at_0_1pct_fpr", "mean"), auc=("auc", "mean"),
                    tpr_1pct_each=("tpr_at_1pct_fpr", lambda v: " / ".join(f"{x:.3f}" for x in v)))
               .reset_index().sort_values(["references", "tpr_1pct"]))
    n_members = len(pd.read_parquet(layout.run_file(layout.finished_runs()[0], RunFile.MEMBERS)))
    training = f"max_steps {args.max_steps}" if args.max_steps else f"{args.epochs:g} epochs"
    print(f"\n{args.targets} target(s), ~{n_members} members, {training}, lr {args.lr:g}; "
          "mean over targets (each target's TPR@1%FPR after)\n")
    print(summary.to_markdown(index=False, floatfmt=".3f"))
    print("\nwall seconds:")
    print(f"  target fine-tune (train loop, mean of {len(train)}): "
          f"{sum(t.wall_time_s for t in train) / len(train):.1f}")
    print(f"  reference fine-tune (train loop, mean of {len(refs)}): "
          f"{sum(t.wall_time_s for t in refs) / len(refs):.1f}")
    print(f"  references stage ({full} adapters, once for all targets): {walls['B']['references']:.1f}")
    print(f"  mia stage, {args.targets} targets: no references (A, cold base cache) {walls['A']['mia']:.1f}; "
          f"{full} references scored (B) {walls['B']['mia']:.1f}; {full} references cached (C) "
          f"{walls['C']['mia']:.1f}; {half} cached (D) {walls['D']['mia']:.1f}")
    print(f"  whole steps: A {walls['A']['total']:.1f}, B {walls['B']['total']:.1f}, C {walls['C']['total']:.1f}, "
          f"D {walls['D']['total']:.1f}")


if __name__ == "__main__":
    main()
