"""Every attack's TPR at 1% and 0.1% FPR on the records and on designed canaries, and the one-run audit of DP-SGD.

One random-design PHEE study on llama-tiny (one coin per record over a seeded subset of PHEE train, so the
records' membership is a fair coin and their audit is valid too), with `dp.audit_canaries` designed canaries
(rare_unigram, rare_bigram, random) in every fine-tune:

  plain  LoRA fine-tunes without DP, seeds 0 .. plain-1
  dp     DP-SGD fine-tunes calibrated to the accountant's epsilon 8 (`noise_multiplier: auto`, PRV accountant,
         delta 1e-5), seeds 0 .. dp-1 (the plain cells' seeds come with the first call, the rest after)

Prints, from `results.parquet`:
  1. per attack, on the plain runs: the records' TPR at 1% and 0.1% FPR and each canary family's, with their
     bootstrap intervals (mean over runs), and the best family's TPR at 1% over the records' under the same
     attack (target: >= 3x);
  2. `ez_mia` and `wbc` against `ref_ratio` at 1% FPR on the records (target: at or above);
  3. per DP run: the accountant's epsilon and both one-run lower bounds (Steinke et al.; Gaussian DP) of the
     canaries and of the records (targets: none above epsilon; GDP >= Steinke at equal guesses);
  4. wall times (fine-tune per cell, membership stage, total).

    nice -n 10 python benchmarks/attacks_low_fpr.py --out /tmp/lowfpr          # the README's figures
    python benchmarks/attacks_low_fpr.py --quick --out /tmp/lowfpr-q           # a short run (minutes)
    python benchmarks/attacks_low_fpr.py --smoke --out /tmp/lowfpr-s           # seconds (the test suite's)
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from memlens.config import load_study  # noqa: E402
from memlens.runner import run_study  # noqa: E402
from memlens.store import RunFile, StudyLayout, read_results  # noqa: E402
from memlens.store.records import TimingsRecord, TrainRecord  # noqa: E402

SHARED = Path(os.environ.get("MEMLENS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
ATTACKS = ["loss", "ref_ratio", "ref_llr", "zlib", "min_k", "min_k_pp", "ez_mia", "wbc"]
FAMILIES = ["rare_unigram", "rare_bigram", "random"]
POINTS = {"1pct": "1%", "0_1pct": "0.1%"}


def study(args, noise: list, seeds: list[int]):
    return load_study(raw={
        "name": "attacks-low-fpr", "out": str(args.out),
        "data": {"source": str(SHARED / "data" / "phee"), "subset": args.subset, "membership": "random",
                 "membership_unit": "record", "utility_split": None},
        "model": {"name_or_path": str(SHARED / "models" / "llama-tiny")},
        "grid": {"target_modules": [args.modules.split(",")], "rank": [args.rank], "seed": seeds,
                 "noise_multiplier": noise},
        "train": {"epochs": args.epochs, "batch_size": 16, "grad_accum": 4, "warmup_steps": 0,
                  "learning_rate": args.lr, **({"max_steps": args.max_steps} if args.max_steps else {})},
        "dp": {"target_epsilon": 8.0, "delta": 1e-5, "accountant": "prv", "audit_canaries": args.canaries,
               "audit_design": FAMILIES, "audit_attack": args.audit_attack},
        "mia": {"attacks": ATTACKS, "bootstrap": args.bootstrap, "bag_of_words_baseline": False},
        "extraction": {"enabled": False},
    })


def interval(rows: pd.DataFrame, col: str) -> str:
    """`mean [low, high]` over runs of a TPR column and its bootstrap interval's ends; the null's reason if null."""
    if col not in rows or rows[col].isna().all():
        note = rows[f"{col}_note"].dropna() if f"{col}_note" in rows else pd.Series(dtype=object)
        return f"n/a ({note.iloc[0]})" if len(note) else "n/a"
    return f"{rows[col].mean():.3f} [{rows[f'{col}_low'].mean():.3f}, {rows[f'{col}_high'].mean():.3f}]"


def tpr_table(mia: pd.DataFrame) -> pd.DataFrame:
    lines = []
    for attack in ATTACKS:
        rows = mia[mia.attack == attack]
        line = {"attack": attack}
        for point, label in POINTS.items():
            line[f"records {label}"] = interval(rows, f"tpr_at_{point}_fpr")
            for family in FAMILIES:
                line[f"{family} {label}"] = interval(rows, f"canary_{family}_tpr_at_{point}_fpr")
        records = rows.tpr_at_1pct_fpr.mean()
        best = max(rows[f"canary_{f}_tpr_at_1pct_fpr"].mean() for f in FAMILIES)
        line["best family / records at 1%"] = f"{best / records:.1f}x" if records > 0 else \
            ("inf (records 0)" if best > 0 else "n/a")
        lines.append(line)
    return pd.DataFrame(lines)


def bounds_table(privacy: pd.DataFrame, dp_runs: list[str]) -> pd.DataFrame:
    rows = []
    for run_id in dp_runs:
        records = privacy[(privacy.run_id == run_id) & (privacy.attack == "dp_audit")].iloc[0]
        canaries = privacy[(privacy.run_id == run_id) & (privacy.attack == "dp_audit_canaries")].iloc[0]
        rows.append({"run": run_id, "sigma": records.dp_noise_multiplier, "accountant eps": records.epsilon,
                     "canaries Steinke": canaries.eps_lower, "canaries GDP": canaries.eps_lower_gdp,
                     "canary guesses (correct)": f"{int(canaries.n_guesses)} ({int(canaries.n_correct)})",
                     "records Steinke": records.eps_lower, "records GDP": records.eps_lower_gdp})
    return pd.DataFrame(rows)


def stage_seconds(layout: StudyLayout, run_ids: list[str], stage: str) -> list[float]:
    return [TimingsRecord.read(layout.run_file(r, RunFile.TIMINGS)).root[stage].wall_s for r in run_ids
            if stage in TimingsRecord.read(layout.run_file(r, RunFile.TIMINGS)).root]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("memlens-out/attacks-low-fpr"))
    parser.add_argument("--subset", type=int, default=160, help="data.subset: records kept per PHEE split")
    parser.add_argument("--canaries", type=int, default=690, help="designed canaries (3 families)")
    parser.add_argument("--plain", type=int, default=2, help="seeds without DP")
    parser.add_argument("--dp", type=int, default=5, help="DP-SGD seeds at epsilon 8")
    parser.add_argument("--modules", default="q,k,v,o,gate,up,down")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--audit-attack", default="loss", help="the audit's score (chosen on a pilot seed, not "
                        "on these runs)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps per fine-tune (default: epochs)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="mia.bootstrap: resamples of the intervals")
    parser.add_argument("--quick", action="store_true", help="subset 80, 60 canaries, 1 + 1 seeds, 1 epoch")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes, seconds (the test suite runs it): "
                        "subset 24, 12 canaries, 1 + 1 seeds of 1 step, rank 1 on q, 20 resamples; figures meaningless")
    args = parser.parse_args(argv)
    if args.quick:
        args.subset, args.canaries, args.plain, args.dp, args.epochs = 80, 60, 1, 1, 1
    if args.smoke:
        args.subset, args.canaries, args.plain, args.dp, args.max_steps, args.bootstrap = 24, 12, 1, 1, 1, 20
        args.modules, args.rank = "q", 1
    shutil.rmtree(args.out, ignore_errors=True)
    layout = StudyLayout(args.out)
    start = time.perf_counter()
    if not 1 <= args.plain <= args.dp:
        parser.error("needs 1 <= --plain <= --dp (the plain seeds are trained with the first DP seeds)")
    # one study, two calls: its grid grows (dp.target_epsilon needs an `auto` cell in every call's grid)
    for noise, seeds in (([None, "auto"], range(args.plain)), (["auto"], range(args.plain, args.dp))):
        if len(seeds):
            summary = run_study(study(args, noise, list(seeds)), report=False, show_progress=False)
            assert summary.ok, [o.error for o in summary.failed]
    total = time.perf_counter() - start

    results = read_results(layout)
    mia = results[results.stage == "mia"]
    plain = mia[mia.noise_multiplier.isna()]
    dp_runs = sorted(mia[mia.noise_multiplier.notna()].run_id.unique())
    train = {r: TrainRecord.load(layout.run_file(r, RunFile.TRAIN)) for r in layout.finished_runs()}
    run0 = layout.finished_runs()[0]
    n_members = len(pd.read_parquet(layout.run_file(run0, RunFile.MEMBERS)))
    canaries = pd.read_parquet(layout.run_file(run0, RunFile.AUDIT_CANARIES))
    held_out = canaries[~canaries.is_member].family.value_counts().to_dict()
    training = f"max_steps {args.max_steps}" if args.max_steps else f"{args.epochs:g} epochs"
    print(f"\nllama-tiny [{args.modules}] r{args.rank}, {training}, lr {args.lr:g}; {n_members} members, "
          f"{plain.n_non_members.iloc[0]:.0f} non-members; {len(canaries)} canaries, held out per family {held_out}; "
          f"{plain.run_id.nunique()} plain run(s), {len(dp_runs)} DP run(s)\n")
    print("1. TPR at 1% / 0.1% FPR, plain runs (mean over runs [mean bootstrap interval])\n")
    print(tpr_table(plain).to_markdown(index=False))
    print("\n2. records, TPR at 1% FPR, plain runs, each run: "
          + "; ".join(f"{a} " + " / ".join(f"{v:.3f}" for v in plain[plain.attack == a].tpr_at_1pct_fpr)
                      for a in ("ref_ratio", "ez_mia", "wbc")))
    privacy = results[results.stage == "privacy"]
    bounds = bounds_table(privacy, dp_runs)
    print(f"\n3. DP runs (audit attack {args.audit_attack}, confidence 0.95, delta 1e-5)\n")
    print(bounds.to_markdown(index=False, floatfmt=".3f"))
    every = bounds[["canaries Steinke", "canaries GDP", "records Steinke", "records GDP"]]
    above = (every.to_numpy(float) > bounds["accountant eps"].to_numpy(float)[:, None]).sum()
    gdp_ge = np.mean(np.r_[bounds["canaries GDP"] >= bounds["canaries Steinke"],
                           bounds["records GDP"] >= bounds["records Steinke"]])
    print(f"\nbounds above the accountant's epsilon: {above} of {every.size}; GDP >= Steinke at equal guesses in "
          f"{gdp_ge:.0%} of the {every.size // 2} audits")
    if dp_runs:
        dp_mia = mia[mia.run_id.isin(dp_runs)]
        print("DP runs, TPR at 1% FPR (mean): " + "; ".join(
            f"{a} records {dp_mia[dp_mia.attack == a].tpr_at_1pct_fpr.mean():.3f}, best family "
            f"{max(dp_mia[dp_mia.attack == a][f'canary_{f}_tpr_at_1pct_fpr'].mean() for f in FAMILIES):.3f}"
            for a in ("loss", "ref_ratio", "ez_mia")))
    plain_ids = sorted(plain.run_id.unique())
    fine = {k: [train[r].wall_time_s for r in ids] for k, ids in (("plain", plain_ids), ("dp", dp_runs))}
    print(f"\n4. wall seconds: fine-tune per cell plain {np.mean(fine['plain']):.0f}"
          + (f", DP {np.mean(fine['dp']):.0f}" if fine["dp"] else "")
          + f"; membership stage per cell {np.mean(stage_seconds(layout, plain_ids + dp_runs, 'mia')):.0f}; "
          f"total {total:.0f} ({total / 60:.1f} min)")


if __name__ == "__main__":
    main()
