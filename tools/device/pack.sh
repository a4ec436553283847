#!/usr/bin/env bash
# Packs what a GPU machine needs to run moelab's CUDA tests and benchmarks without building:
# the test and bench executables of build/ (stripped) and the shared libraries from Debian that
# the other machine may lack (libfmt), into .devcarry/ (ignored by git). tools/device/run.sh runs
# them there. Usage: tools/device/pack.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
rm -rf .devcarry
mkdir -p .devcarry/bin .devcarry/lib
for f in "$build"/bin/test_cuda_* "$build"/bin/moelab_*_bench "$build"/bin/moelab_wgmma_probe "$build"/bin/moelab; do
  [ -x "$f" ] && cp "$f" .devcarry/bin/
done
strip .devcarry/bin/*
cp -L "$(ldconfig -p | awk '/libfmt.so.9 /{print $NF; exit}')" .devcarry/lib/
du -sh .devcarry
