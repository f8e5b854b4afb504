#!/usr/bin/env bash
# The third-round findings studies of issue #42, one after another, each into memlens-out/findings-draws/<name>:
#   studies/draws.sh [STEP ...]   STEP: llama-tiny, llama-small, gpt2-small, copies, recall, llama-tiny-alpha
#                                 (default: all, in the order below)
# A model step runs studies/draws-MODEL.yaml (4 matrix sets x 4 ranks x a 3-rate ladder x 5 record draws) and then
# its matched-fit extension into the same folder: rank 4, q/k at two rates above the ladder and v/o at two rates
# below it (the earlier round found v/o's held-out perplexity gain above q/k's at every rate of the ladder, so
# no common fit to compare at). Every step is resumable: rerun the same command after a kill.
# One torch thread (OMP_NUM_THREADS=1), so one core stays free for other work on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(llama-tiny recall copies llama-tiny-alpha llama-small gpt2-small)
for step in "${steps[@]}"; do
  case $step in
    llama-tiny | gpt2-small) up="[0.03,0.1]" down="[0.0001,0.0003]" ;;
    llama-small) up="[0.01,0.03]" down="[0.00003,0.0001]" ;;
    copies | recall | llama-tiny-alpha) memlens -q run "studies/draws-$step.yaml" --no-progress; continue ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
  memlens -q run "studies/draws-$step.yaml" --no-progress
  memlens -q run "studies/draws-$step.yaml" --no-progress --set "grid.rank=[4]" \
    --set "grid.target_modules=[[q],[k]]" --set "grid.learning_rate=$up"
  memlens -q run "studies/draws-$step.yaml" --no-progress --set "grid.rank=[4]" \
    --set "grid.target_modules=[[v],[o]]" --set "grid.learning_rate=$down"
done
