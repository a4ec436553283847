#!/usr/bin/env bash
# The main job (README): train the tiny MoE language model on the corpus that tools/setup.sh built
# (about 3.5 minutes on two cores), then show what its experts learned, block by block
# (docs/training.md), then open the trained model in moelab-viewer (docs/viewer.md) where a display
# is available (DISPLAY or WAYLAND_DISPLAY set); without one, write a screenshot of each of the
# viewer's panels into RUN/screenshots/ (under xvfb-run). A second run finds the finished run and
# only shows it again.
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

# The viewer: a failure here (no OpenGL driver, say) is reported, but the run above stands.
viewer=build/bin/moelab-viewer
if [ ! -x "$viewer" ]; then
  echo "demo: $viewer was not built (Debian: libimgui-dev libglfw3-dev libstb-dev; tools/setup.sh installs them)"
elif [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]; then
  echo "demo: opening moelab-viewer on $run (paused: press Start to continue training; close the window to finish)"
  "$viewer" --checkpoint "$run" --paused || echo "demo: moelab-viewer failed (exit code $?)" >&2
elif command -v xvfb-run >/dev/null; then
  echo "demo: no display: writing a screenshot of each viewer panel into $run/screenshots/"
  tools/viewer_screenshots.sh "$run/screenshots" "$run" || echo "demo: the viewer's screenshots failed" >&2
else
  echo "demo: no display and no xvfb-run: open the viewer on a desktop with $viewer --checkpoint $run"
fi
