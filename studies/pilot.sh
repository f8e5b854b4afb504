#!/usr/bin/env bash
# The calibration pilot (studies/pilot-calibration.yaml): candidate recipes from the least to the most
# intense (5 epochs, batch 8, learning rate 1e-3, 3e-3, 1e-2), each in its own folder; prints each one's
# ref_ratio AUC of [v] rank 4 on the named splits and the one the rule picks.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-memlens-out/findings/pilot}
for lr in 0.001 0.003 0.01; do
  memlens -q run studies/pilot-calibration.yaml --out "$out/lr$lr" --set "train.learning_rate=$lr" --no-progress
done
python - "$out" <<'PY'
import sys
from pathlib import Path
import pandas as pd
rows = []
for folder in sorted(Path(sys.argv[1]).glob("lr*")):
    r = pd.read_parquet(folder / "results.parquet")
    r = r[(r.stage == "mia") & (r.attack == "ref_ratio")].iloc[0]
    rows.append((float(folder.name[2:]), r.auc, r.auc_ci_low, r.auc_ci_high))
for lr, auc, lo, hi in rows:
    print(f"learning rate {lr:g}: ref_ratio AUC {auc:.3f} (95% CI {lo:.3f}-{hi:.3f})")
inside = [row for row in rows if 0.75 <= row[1] <= 0.85]
pick = inside[0] if inside else min(rows, key=lambda row: abs(row[1] - 0.80))
print(f"picked: learning rate {pick[0]:g} ({'first in 0.75-0.85' if inside else 'none in 0.75-0.85: closest to 0.80'})")
PY
