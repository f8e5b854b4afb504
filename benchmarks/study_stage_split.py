"""How a study's time splits between its stages, on a few of its cells, and what the whole grid would take.

Runs a study YAML (default: studies/phee-llama-tiny-cpu.yaml, full PHEE, llama-tiny) restricted to `--cells`
of its grid cells (the first matrix sets, at one rank, canary count and seed) through `run_study`, then prints
per cell the fine-tune, membership and extraction wall times the runner recorded (`runs/<id>/timings.json`;
a batched stage's time is shared among its cells), the membership and extraction stages as a share of the
fine-tune (the #16 target: at most 15% each), and the whole grid's projected wall time. The base model's
scores, computed once per study whatever its number of cells, are computed first and counted as one-time:
one-time costs (measured total minus the per-cell stages) plus the per-cell median times the grid's cells.
The projection is labelled as such; it is not a measurement of the whole grid.

    python benchmarks/study_stage_split.py                       # 2 cells of studies/phee-llama-tiny-cpu.yaml
    python benchmarks/study_stage_split.py --cells 4 --study studies/phee-llama-tiny-calibrated.yaml
    python benchmarks/study_stage_split.py --cells 1 --set data.subset=200 --set train.epochs=1
    python benchmarks/study_stage_split.py --smoke               # seconds: 1 cell, 24 records, 1 step (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from memlens.attacks.mia import prepare_base_cache  # noqa: E402
from memlens.config import load_study  # noqa: E402
from memlens.context import StudyContext  # noqa: E402
from memlens.runner import run_study  # noqa: E402
from memlens.store import StudyLayout  # noqa: E402

STAGES = ("finetune", "references", "mia", "extraction")
# --smoke: the study's code path at the smallest sizes (its figures mean nothing)
SMOKE = ["data.subset=24", "train.max_steps=1", "extraction.members=2", "extraction.non_members=2",
         "mia.bootstrap=20"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=REPO / "studies" / "phee-llama-tiny-cpu.yaml")
    parser.add_argument("--cells", type=int, default=2, help="grid cells to run (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="keep the study folder here (must be new)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the study, as `memlens run --set` (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes, seconds (the test suite runs it): "
                        f"1 cell, --set {' '.join(SMOKE)}; figures meaningless")
    args = parser.parse_args(argv)
    if args.smoke:
        args.cells, args.set = 1, SMOKE + args.set

    os.chdir(REPO)  # the study files' relative paths (../shared) resolve against the project root
    full = load_study(args.study, args.set)
    cells = full.cells()
    first = cells[0]  # the first cells' matrix sets, at the first cell's rank, canary copies and seed
    sets = list(dict.fromkeys(tuple(c.target_modules) for c in cells))[:args.cells]
    grid = full.grid.model_dump()
    grid.update(target_modules=sets, rank=[first.rank], canary_copies=[first.canary_copies], seed=[first.seed])
    tmp = None if args.out else tempfile.mkdtemp(prefix="stage-split-")
    out = args.out or Path(tmp) / "study"
    raw = full.model_dump(mode="json")
    raw.update(out=str(out), grid={**grid, "target_modules": [list(t) for t in grid["target_modules"]]})
    study = load_study(raw=raw)
    ran = study.cells()
    print(f"{args.study.name}: {len(ran)} of its {len(cells)} cells, load average {os.getloadavg()[0]:.1f}", flush=True)
    try:
        start = time.perf_counter()
        if study.mia.enabled:  # the base model's scores: once per study, whatever its number of cells
            prepare_base_cache(StudyContext(study))
        base_s = time.perf_counter() - start
        summary = run_study(study, report=False, show_progress=False)
        total = time.perf_counter() - start
        if summary.failed:
            raise RuntimeError(f"cells failed: {[o.run_id for o in summary.failed]}")
        layout = StudyLayout(study.out_dir)
        per_cell = {stage: [] for stage in STAGES}
        for run_id in layout.finished_runs():
            timings = json.loads((layout.run_dir(run_id) / "timings.json").read_text())
            for stage in STAGES:
                if stage in timings:
                    per_cell[stage].append(timings[stage]["wall_s"])
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    medians = {s: statistics.median(v) for s, v in per_cell.items() if v}
    print(f"\nper cell (median of {len(ran)}):")
    for stage, value in medians.items():
        share = f"  {value / medians['finetune']:6.1%} of the fine-tune" if stage != "finetune" else ""
        print(f"  {stage:11s} {value:7.1f} s{share}")
    once = total - sum(sum(v) for v in per_cell.values())
    projected = once + sum(medians.values()) * len(cells)
    print(f"  one-time     {once:7.1f} s  (measured total {total:.1f} s minus the per-cell stages; of which the base "
          f"model's scores {base_s:.1f} s)")
    print(f"projected whole grid ({len(cells)} cells): {projected / 60:.1f} min  (not measured: one-time costs + "
          f"{len(cells)} x the per-cell medians)")


if __name__ == "__main__":
    sys.exit(main())
