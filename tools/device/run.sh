#!/usr/bin/env bash
# Runs on a GPU machine (see docs/perf.md, "Method"): the CUDA tests, compute-sanitizer over them,
# the ladder benchmarks and `moelab bench --impl cuda`, from the executables tools/device/pack.sh
# put in .devcarry/. Logs go to $OUT (or out/ here). Usage: tools/device/run.sh [tests|sanitize|bench|all]...
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$PWD/.devcarry/lib:${LD_LIBRARY_PATH:-}
bin=.devcarry/bin
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader | tee "$out/device.txt"
status=0
run_tests() {
  for t in "$bin"/test_cuda_*; do
    echo "== $t"
    "$t" --gtest_brief=1 >"$out/$(basename "$t").log" 2>&1 || { status=1; echo "FAILED: $t"; }
    tail -4 "$out/$(basename "$t").log"
  done
}
run_sanitize() {
  for tool in memcheck racecheck; do
    for t in "$bin"/test_cuda_*; do
      [ "$(basename "$t")" = test_cuda_host_oracle ] && continue
      echo "== compute-sanitizer --tool $tool $t"
      compute-sanitizer --tool "$tool" --error-exitcode 3 "$t" --gtest_brief=1 \
        --gtest_filter="${SANITIZE_FILTER:--*ManyTokens*:*LargeT*:*16384*}" >"$out/sanitize_${tool}_$(basename "$t").log" 2>&1 \
        || { status=1; echo "SANITIZER FAILED: $tool $t"; tail -20 "$out/sanitize_${tool}_$(basename "$t").log"; }
      grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitize_${tool}_$(basename "$t").log" | tail -1
    done
  done
}
run_bench() {
  for b in "$bin"/moelab_*_bench; do
    echo "== $b"
    "$b" --json="$out/$(basename "$b").json" >"$out/$(basename "$b").log" 2>&1 || { status=1; echo "FAILED: $b"; }
    tail -30 "$out/$(basename "$b").log"
  done
}
for what in "${@:-all}"; do
  case $what in
    tests) run_tests ;;
    sanitize) run_sanitize ;;
    bench) run_bench ;;
    all) run_tests; run_sanitize; run_bench ;;
    *) echo "unknown: $what"; exit 2 ;;
  esac
done
exit $status
