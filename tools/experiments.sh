#!/usr/bin/env bash
# The four experiments of docs/experiments.md on the tiny byte-level MoE language model:
#   1. MoE vs dense at equal active parameters and equal tokens (two seeds each),
#   2. routing collapse: balance none / aux (the preset's) / aux_free,
#   3. router z-loss: logit magnitude with and without it (1e-3, ST-MoE's coefficient),
#   4. specialisation per layer: `moelab analyze` of the runs of 1 and 2.
# Seven training runs of 2000 steps (about 3.5 minutes each on two cores), then the report:
# tools/experiments_report.py prints the tables of docs/experiments.md and writes its plots.
# A finished run is kept and not trained again. Usage: tools/experiments.sh [OUT_DIR] (default runs/exp)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/exp}
moelab=${MOELAB:-build/bin/moelab}
mkdir -p "$out"

train() {  # NAME ARGS...: train into OUT/NAME, or resume it (a finished run only reloads)
  local name=$1
  shift
  if [ -e "$out/$name/latest" ]; then
    "$moelab" train --resume "$out/$name" --json >"$out/$name.json"
  else
    echo "experiments: training $name ($*)"
    "$moelab" train --out "$out/$name" "$@" --json >"$out/$name.json"
  fi
}

train moe_s0 --seed 0
train dense_s0 --preset tiny_dense --seed 0
train none --balance none
train aux_free --balance aux_free
train zloss --z-loss 1e-3
train moe_s1 --seed 1
train dense_s1 --preset tiny_dense --seed 1

for name in moe_s0 none aux_free zloss; do
  "$moelab" analyze --checkpoint "$out/$name" --json >"$out/analyze_$name.json"
done
/usr/bin/python3 tools/experiments_report.py "$out"
