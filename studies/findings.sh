#!/usr/bin/env bash
# The findings studies of issue #29, each into its own folder (memlens-out/findings/<model>):
#   studies/findings.sh MODEL   MODEL: llama-tiny, llama-small or gpt2-small
# 1. the grid of studies/findings-MODEL.yaml at the pilot's learning rate (4 matrix sets x ranks 1, 2, 4, 16 x
#    2 seeds x 2 record draws);
# 2. the matched-fit ladder into the same folder: rank 4, the same matrix sets and replicates, a rate about 3x
#    below and 3x above the pilot's (1e-3 and 1e-2 around 3e-3; 3e-4 and 3e-3 around llama-small's 1e-3). The runs
#    at the pilot's rate (from step 1) are its middle rung. llama-small and gpt2-small: seed 0 only (2 replicates,
#    the 2 record draws; what one 2-core session had room for), llama-tiny: both seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?model: llama-tiny, llama-small or gpt2-small}
memlens -q run "studies/findings-$model.yaml" --no-progress
case $model in
  llama-tiny) ladder="[0.001,0.01]" seeds="[0,1]" ;;
  llama-small) ladder="[0.0003,0.003]" seeds="[0]" ;;
  *) ladder="[0.001,0.01]" seeds="[0]" ;;
esac
memlens -q run "studies/findings-$model.yaml" --no-progress --set "grid.rank=[4]" --set "grid.learning_rate=$ladder" \
  --set "grid.seed=$seeds"
