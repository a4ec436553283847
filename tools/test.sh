#!/usr/bin/env bash
# Runs every test of moelab on this machine, setting up first:
#   1. the default build (CUDA kernels compiled where nvcc exists; GPU tests skip without a GPU),
#   2. the same CPU suites built by Clang with AddressSanitizer + UndefinedBehaviorSanitizer,
#   3. 20 seconds of libFuzzer on each file loader (tools/fuzz.sh: the fuzzers of that same build).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh default
ctest --preset default
tools/setup.sh asan
ctest --preset asan
tools/fuzz.sh 20
