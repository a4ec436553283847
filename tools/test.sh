#!/usr/bin/env bash
# Runs every test of moelab on this machine, setting up first:
#   1. the default build (CUDA kernels compiled where nvcc exists; GPU tests skip without a GPU):
#      the reference, the CLI, the PyTorch oracles, the Python module, the notebooks, the viewer,
#   2. the reference's suites built by Clang with AddressSanitizer + UndefinedBehaviorSanitizer
#      (in-process C++ only: tests/CMakeLists.txt says what stays in step 1),
#   3. 20 seconds of libFuzzer on each file loader (tools/fuzz.sh: the fuzzers of that same build).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh default
ctest --preset default
tools/setup.sh asan
ctest --preset asan
tools/fuzz.sh 20
