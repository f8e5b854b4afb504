#!/usr/bin/env bash
# The four GPU benchmarks at the Llama-2-7B shape (random weights: nothing downloaded), in under 10 minutes,
# with a short table of the figures (GPU name first) printed and written to a file.
#
#   bash benchmarks/gpu-check.sh [--wheels DIR] [--shared DIR] [--python PY] [--out FILE] [--budget S]
#
#   --wheels DIR   install the Python packages memlens needs that are missing from this local wheel folder
#                  (pip --no-index --find-links DIR); without it, missing packages stop the check
#   --shared DIR   the project's fixtures (data/phee, models/llama-tiny, models/llama-small); default
#                  $MEMLENS_SHARED, then ./shared, then ../shared
#   --python PY    interpreter (default $PYTHON, else python3)
#   --out FILE     the table (default $OUT/gpu-check.txt when $OUT is set, else gpu-check.txt); each
#                  benchmark's full log goes next to it (gpu-check-<name>.log)
#   --budget S     seconds for the whole check (default 580); each benchmark gets its own limit within it
#   --cpu-test     exercise this script on a machine without a GPU: the same four benchmarks on CPU at the
#                  tiny shape (for testing the script itself; the figures mean nothing)
#
# memlens runs from src/ (PYTHONPATH=src), not installed. Exits 2 when no GPU is visible, 3 when packages
# are missing and cannot be installed, 1 when a benchmark failed or ran out of time (the table says which).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$(date +%s)
WHEELS="" SHARED_DIR="" PY="${PYTHON:-python3}" TABLE="" BUDGET=580 CPU_TEST=0
if [[ -n "${OUT:-}" ]]; then TABLE="$OUT/gpu-check.txt"; else TABLE="gpu-check.txt"; fi

usage() { sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
    --shared) SHARED_DIR="${2:?--shared needs a folder}"; shift 2 ;;
    --python) PY="${2:?--python needs an interpreter}"; shift 2 ;;
    --out) TABLE="${2:?--out needs a file}"; shift 2 ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift 2 ;;
    --cpu-test) CPU_TEST=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-check: unknown option $1 (see --help)" >&2; exit 64 ;;
  esac
done
say() { echo "gpu-check: $*" >&2; }

# ------------------------------------------------------------------------------------- a GPU, first
if [[ $CPU_TEST -eq 0 ]]; then
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    say "no NVIDIA GPU visible (nvidia-smi not found): this check needs a machine with an NVIDIA GPU; refusing to start."
    exit 2
  fi
  if ! GPUS=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1) || [[ -z "$GPUS" ]]; then
    say "no NVIDIA GPU visible (nvidia-smi: ${GPUS:-no GPU listed}); refusing to start."
    exit 2
  fi
else
  GPUS="none (--cpu-test: CPU, tiny shape; figures meaningless)"
fi
if ! command -v "$PY" >/dev/null 2>&1; then say "no Python interpreter '$PY' (use --python)"; exit 3; fi

# ------------------------------------------------------------------------------------- packages
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
missing_packages() {  # the [project] dependencies of pyproject.toml that are absent (or of a wrong version)
  "$PY" - "$REPO/pyproject.toml" <<'PYEOF'
import re, sys, tomllib
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:
    Requirement = None
for spec in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]:
    name = re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        print(spec)
        continue
    if Requirement is not None and not Requirement(spec).specifier.contains(version, prereleases=True):
        print(spec)
PYEOF
}
if ! MISSING=$(missing_packages); then say "could not read $REPO/pyproject.toml with $PY (Python >= 3.11 needed)"; exit 3; fi
if [[ -n "$MISSING" ]]; then
  say "missing Python packages memlens needs: $(echo $MISSING)"
  if [[ -z "$WHEELS" ]]; then
    say "give a local wheel folder with --wheels DIR to install them (pip --no-index --find-links DIR)"
    exit 3
  fi
  [[ -d "$WHEELS" ]] || { say "--wheels $WHEELS is not a folder"; exit 3; }
  mapfile -t REQS <<<"$MISSING"
  say "installing them from $WHEELS"
  if ! "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "${REQS[@]}"; then
    say "pip refused; retrying with --break-system-packages (an externally managed Python)"
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" --break-system-packages "${REQS[@]}" \
      || { say "could not install ${REQS[*]} from $WHEELS"; exit 3; }
  fi
  MISSING=$(missing_packages)
  [[ -z "$MISSING" ]] || { say "still missing after installing: $(echo $MISSING)"; exit 3; }
fi
if [[ $CPU_TEST -eq 0 ]]; then
  if ! TORCH=$("$PY" -c 'import torch, sys
ok = torch.cuda.is_available()
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name() if ok else "-")
sys.exit(0 if ok else 1)' 2>&1); then
    say "nvidia-smi sees a GPU but torch does not (torch.cuda.is_available() is False: $TORCH); a CUDA build of torch is needed; refusing to start."
    exit 2
  fi
else
  TORCH=$("$PY" -c 'import torch; print(torch.__version__, "cpu")')
fi

# ------------------------------------------------------------------------------------- fixtures
for candidate in "$SHARED_DIR" "${MEMLENS_SHARED:-}" "$REPO/shared" "$REPO/../shared"; do
  if [[ -n "$candidate" && -d "$candidate/data/phee" ]]; then SHARED_DIR="$(cd "$candidate" && pwd)"; break; fi
done
if [[ -z "$SHARED_DIR" || ! -d "$SHARED_DIR/data/phee" ]]; then
  say "no fixtures (data/phee, models/llama-tiny, models/llama-small) found: give --shared DIR"; exit 3
fi
export MEMLENS_SHARED="$SHARED_DIR"
# finetune_throughput.py reads ../shared next to the checkout
if [[ ! -e "$REPO/../shared" ]]; then
  ln -s "$SHARED_DIR" "$REPO/../shared" 2>/dev/null && say "linked $REPO/../shared -> $SHARED_DIR (finetune_throughput.py reads it)" \
    || say "warning: cannot link $REPO/../shared -> $SHARED_DIR; the fine-tune benchmark will not find its data"
fi

# ------------------------------------------------------------------------------------- the benchmarks
mkdir -p "$(dirname "$TABLE")"
LOGDIR="$(cd "$(dirname "$TABLE")" && pwd)"
FAILED=0
declare -A STATUS
run_step() {  # name limit command...: runs under `timeout`, within what is left of the budget
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) - 10 ))
  (( limit > left )) && limit=$left
  if (( limit < 20 )); then STATUS[$name]="skipped (budget spent)"; FAILED=1; return; fi
  say "$name: up to ${limit}s ..."
  local t0=$(date +%s) rc
  (cd "$REPO" && timeout --signal=INT --kill-after=20 "$limit" "$@") >"$LOGDIR/gpu-check-$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then STATUS[$name]="ok, ${took}s"
  elif (( rc == 124 || rc == 137 )); then STATUS[$name]="TIMED OUT at ${limit}s"; FAILED=1
  else STATUS[$name]="FAILED (exit $rc, ${took}s; see gpu-check-$name.log)"; FAILED=1; fi
}

if [[ $CPU_TEST -eq 0 ]]; then SHAPE=llama2-7b DTYPE=bf16; DEV=(--device cuda --shape $SHAPE)
else SHAPE=tiny DTYPE=fp32; DEV=(--device cpu --shape $SHAPE); fi
# fine-tune: 4 recipes x 1 repeat on a 320-record PHEE slice (5 optimizer steps of 64 records each)
run_step finetune 220 "$PY" benchmarks/finetune_throughput.py "${DEV[@]}" --records 320 --repeats 1 \
  --json "$LOGDIR/gpu-check-finetune.json"
# MIA scoring pass: every PHEE train + test record, 2 timed repeats after a warm-up, memlens vs plain forward
MIA_ARGS=(--repeats 2); [[ $CPU_TEST -eq 1 ]] && MIA_ARGS+=(--records 100)
run_step mia 150 "$PY" benchmarks/mia_throughput.py "${DEV[@]}" "${MIA_ARGS[@]}"
# greedy generation: batch 64, 32 new tokens, dynamic and static KV cache (3 repeats each after a warm-up)
run_step generation 80 "$PY" benchmarks/generation_throughput.py "${DEV[@]}" --repeats 3
# multi-adapter training (train.together): 8 rank-8 adapters on q,v in one pass vs one adapter alone, real tokens/s,
# the same micro-batches (64 PHEE records each, 16 x 4 per step, 3 steps)
# (and the LoRA update alone at the 7B width: each adapter's own matmuls vs ranks and tokens padded into one bmm)
run_step multi_adapter 110 "$PY" benchmarks/multi_adapter_throughput.py "${DEV[@]}" --parts adapters layouts \
  --adapters 8 --rank 8 --records 64 --max-steps 3

# ------------------------------------------------------------------------------------- the table
grab() { sed -n "$2" "$LOGDIR/gpu-check-$1.log" 2>/dev/null | head -1; }
FT=$("$PY" - "$LOGDIR/gpu-check-finetune.json" <<'PYEOF' 2>/dev/null
import json, sys
m = json.load(open(sys.argv[1]))["medians"]
print(f"packed {m['packed']:,.0f} real tok/s = {m['packed'] / m['study']:.2f}x the study recipe "
      f"({m['study']:,.0f}); length_grouped {m['length_grouped']:,.0f}; block mask {m['packed_block_mask']:,.0f}")
PYEOF
)
[[ -n "$FT" ]] || FT="$(grep -E '^  [a-z_]+ +repeat' "$LOGDIR/gpu-check-finetune.log" 2>/dev/null | sed 's/^ *//' | tr -s ' ' | paste -sd ';' -)"
SCORE=$(grab mia 's/.*scoring pass (memlens): *\([0-9.]*\) s = *\([0-9.]*\) GFLOP\/s = *\([0-9.]*%\) of peak.*/\3 of the matmul peak (\2 GFLOP\/s, \1 s)/p')
PLAIN=$(grab mia 's/^plain batched.*: \([0-9.]*\) s = *\([0-9.]*%\) of peak; ratio \([0-9.]*x\).*/\2 of peak (\1 s); memlens \3 faster/p')
PEAK=$(grab mia 's/.*matmul peak (same run): *\([0-9.]*\) GFLOP\/s.*/\1 GFLOP\/s/p')
RECS=$(grab mia 's/.*: \([0-9]* records ([0-9]* tokens)\).*/\1/p')
DYN=$(grab generation 's/^dynamic cache *: *\([0-9.]*\) s\/batch *\([0-9.]*\) sequences\/s *\([0-9]*\) new tok\/s.*/\2 seq\/s (\3 new tok\/s)/p')
STATIC=$(grab generation 's/^static cache *: *\([0-9.]*\) s\/batch *\([0-9.]*\) sequences\/s *\([0-9]*\) new tok\/s.*/\2 seq\/s (\3 new tok\/s)/p')
BOUND=$(grab generation 's/^decode bound.*: ~\([0-9]*\) sequences\/s.*/~\1 seq\/s/p')
ONE=$(grab multi_adapter 's/^  one adapter alone *: *\([0-9]*\) real tok\/s.*/\1 real tok\/s/p')
EIGHT=$(grab multi_adapter 's/^  8 adapters together *: *\([0-9]*\) real tok\/s.*/\1 real tok\/s/p')
MULTI=$(grab multi_adapter 's/^ratio: \([0-9.]*\) x.*/\1x/p')
LAYOUT=$(grab multi_adapter 's/^  mixed ranks[^:]*: \(.*\)/\1/p')
COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "?")
row() { printf '%-34s %s\n' "$1" "${2:--}"; }
{
  echo "memlens GPU check, $(date -u +%Y-%m-%dT%H:%MZ), commit $COMMIT$( [[ $CPU_TEST -eq 1 ]] && echo ', --cpu-test')"
  row "GPU" "$(echo "$GPUS" | head -1)$( (( $(echo "$GPUS" | wc -l) > 1 )) && echo " (+$(( $(echo "$GPUS" | wc -l) - 1 )) more)")"
  row "torch / CUDA" "$TORCH"
  row "fine-tune, $SHAPE [${STATUS[finetune]:-not run}]" ""
  row "  real tokens/s (target >= 12,000)" "$FT"
  row "MIA scoring, $SHAPE [${STATUS[mia]:-not run}]" "$RECS"
  row "  $DTYPE matmul peak" "$PEAK"
  row "  memlens pass (target >= 60%)" "$SCORE"
  row "  plain HF forward + log-softmax" "$PLAIN"
  row "generation, $SHAPE [${STATUS[generation]:-not run}]" "batch 64, 32 new tokens"
  row "  dynamic KV cache" "$DYN"
  row "  static KV cache" "$STATIC"
  row "  decode bound (weights/bandwidth)" "$BOUND"
  row "multi-adapter, $SHAPE [${STATUS[multi_adapter]:-not run}]" "q,v rank 8, 64 records each, 3 steps"
  row "  one adapter alone" "$ONE"
  row "  8 adapters together" "${EIGHT:+$EIGHT = ${MULTI:-?} the tokens/s of one alone}"
  row "  LoRA update, ranks 1-64" "$LAYOUT"
  row "wall time" "$(( $(date +%s) - START ))s (budget ${BUDGET}s); logs: $LOGDIR/gpu-check-*.log"
} | tee "$TABLE"
exit $FAILED
