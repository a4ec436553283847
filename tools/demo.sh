#!/usr/bin/env bash
# The main job (README): train the tiny MoE language model on the corpus that tools/setup.sh built
# (about 3.5 minutes on two cores), then show what its experts learned, block by block
# (docs/training.md). A second run finds the finished run and only shows it again.
# Usage: tools/demo.sh [RUN_DIR]   (default runs/tiny)
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/tiny}
if [ -e "$run/latest" ]; then
  build/bin/moelab train --resume "$run"
else
  build/bin/moelab train --out "$run"
fi
build/bin/moelab analyze --checkpoint "$run"
