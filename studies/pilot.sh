#!/usr/bin/env bash
# A calibration pilot: candidate recipes from the least to the most intense (5 epochs, batch 8, learning rate
# 1e-3, 3e-3, 1e-2), each in its own folder; prints each one's ref_ratio AUC of [v] rank 4 and the one the rule
# picks (the rule and the cell: studies/pilot-scale.yaml; the 2026 llama-tiny pilot: pilot-calibration.yaml).
#   studies/pilot.sh [MODEL] [OUT]   MODEL: llama-tiny (default), llama-small or gpt2-small
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-llama-tiny}
out=${2:-memlens-out/findings/pilot-$model}
study=studies/pilot-scale.yaml
for lr in 0.001 0.003 0.01; do
  memlens -q run "$study" --out "$out/lr$lr" --set "train.learning_rate=$lr" \
    --set "model.name_or_path=../shared/models/$model" --no-progress
done
python - "$out" <<'PY'
import sys
from pathlib import Path
import pandas as pd
rows = []
for folder in sorted(Path(sys.argv[1]).glob("lr*"), key=lambda p: float(p.name[2:])):
    r = pd.read_parquet(folder / "results.parquet")
    r = r[(r.stage == "mia") & (r.attack == "ref_ratio")].iloc[0]
    rows.append((float(folder.name[2:]), r.auc, r.auc_ci_low, r.auc_ci_high))
for lr, auc, lo, hi in rows:
    print(f"learning rate {lr:g}: ref_ratio AUC {auc:.3f} (95% CI {lo:.3f}-{hi:.3f})")
inside = [row for row in rows if 0.75 <= row[1] <= 0.85]
pick = inside[0] if inside else min(rows, key=lambda row: (abs(row[1] - 0.80), row[0]))
print(f"picked: learning rate {pick[0]:g} ({'first in 0.75-0.85' if inside else 'none in 0.75-0.85: closest to 0.80'})")
PY
