#!/usr/bin/env bash
# Writes a screenshot of every panel of moelab-viewer (1280x800 PNGs, viewer_<panel>.png) with the
# viewer's screenshot mode under Xvfb: docs/img/ for docs/viewer.md, or RUN/screenshots/ for
# tools/demo.sh. The model is the trained checkpoint CHECKPOINT (a run folder, e.g. runs/tiny),
# continued for 6 steps so that every panel shows live training; without one, tiny_moe trained
# here from scratch for 40 steps. Prints each panel's frames per second.
# Usage: tools/viewer_screenshots.sh [OUT_DIR] [CHECKPOINT]      (defaults: docs/img runs/tiny)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/img}
checkpoint=${2:-runs/tiny}
viewer=${MOELAB_VIEWER:-build/bin/moelab-viewer}
[ -x "$viewer" ] || { echo "viewer_screenshots: $viewer is missing: build it (tools/setup.sh)" >&2; exit 1; }
command -v xvfb-run >/dev/null || { echo "viewer_screenshots: xvfb-run is missing (Debian: xvfb xauth)" >&2; exit 1; }
mkdir -p "$out"

if [ -e "$checkpoint/latest" ] || [ -e "$checkpoint/trainer_state.json" ]; then
  if [ -e "$checkpoint/latest" ]; then
    step=$(sed -e 's/^step-0*//' -e 's/^$/0/' "$checkpoint/latest")
  else
    step=$(sed -n 's/.*"step": *\([0-9]*\).*/\1/p' "$checkpoint/trainer_state.json" | head -n 1)
  fi
  source=(--checkpoint "$checkpoint" --train-steps $((step + 6)))
else
  echo "viewer_screenshots: no checkpoint at $checkpoint: training tiny_moe from scratch for 40 steps"
  source=(--train-steps 40 --eval-every 20)
fi

for panel in routing specialisation balance numerics training sdc; do
  extra=()
  # The routing panel with the mouse on a token: the tooltip with its experts in every block.
  [ "$panel" = routing ] && extra=(--hover 99,300)
  xvfb-run -a -s "-screen 0 1280x800x24" "$viewer" "${source[@]}" "${extra[@]}" --panel "$panel" \
    --size 1280x800 --frames 30 --screenshot "$out/viewer_$panel.png"
done
