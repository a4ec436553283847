#!/usr/bin/env bash
# Fuzzes every file loader of moelab with libFuzzer, for SECONDS each (default 20):
#   1. configures the "asan" preset (Clang, ASan + UBSan, into build-asan/) and builds its fuzzers
#      and what they link, nothing else,
#   2. runs each fuzzer listed in build-asan/fuzz/fuzzers.txt on a copy of its seed corpus,
#      fuzz/corpus/<name without "fuzz_">/ (plus the golden files, for the safetensors reader),
#      with the dictionary fuzz/<name without "fuzz_">.dict where there is one.
# Exits non-zero if any fuzzer finds a crash, a sanitizer report, a leak or a hang; the input that
# triggered it is kept in build-asan/findings/<fuzzer>/ and the log in build-asan/logs/.
# Usage: tools/fuzz.sh [SECONDS]     (from any directory)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || ((seconds < 1)); then
  echo "usage: tools/fuzz.sh [SECONDS]   (SECONDS: a whole number >= 1, default 20)" >&2
  exit 2
fi

cmake --preset asan >/dev/null
cmake --build --preset fuzz

mapfile -t fuzzers < build-asan/fuzz/fuzzers.txt
if ((${#fuzzers[@]} == 0)); then
  echo "fuzz: no fuzzers are listed in build-asan/fuzz/fuzzers.txt" >&2
  exit 1
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/moelab-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p build-asan/logs

failed=()
for name in "${fuzzers[@]}"; do
  # The fuzzer grows its corpus in place: give it a copy, so the seeds in the tree stay as they are.
  corpus="$work/$name"
  mkdir -p "$corpus"
  seeds="fuzz/corpus/${name#fuzz_}"
  if [[ -d "$seeds" ]]; then find "$seeds" -maxdepth 1 -type f -exec cp {} "$corpus/" \;; fi
  case "$name" in
    fuzz_safetensors) if [[ -d golden ]]; then find golden -maxdepth 1 -name '*.safetensors' -exec cp {} "$corpus/" \;; fi ;;
  esac
  dict=()
  if [[ -f "fuzz/${name#fuzz_}.dict" ]]; then dict=(-dict="fuzz/${name#fuzz_}.dict"); fi
  # Long enough for the largest seed (libFuzzer would cut longer ones short), and at least 4 KiB.
  largest="$(find "$corpus" -type f -printf '%s\n' | sort -n | tail -n 1)"
  max_len=$((${largest:-0} > 4096 ? ${largest:-0} : 4096))
  findings="build-asan/findings/$name"
  mkdir -p "$findings"
  log="build-asan/logs/$name.log"
  echo "fuzz: $name for ${seconds}s on $(find "$corpus" -type f | wc -l) seeds ($seeds), -max_len=$max_len"
  # -timeout: a parser that spends 10 s on one input of a few KiB has a bug worth seeing.
  if "build-asan/bin/$name" -max_total_time="$seconds" -max_len="$max_len" -timeout=10 -print_final_stats=1 \
      "${dict[@]}" -artifact_prefix="$findings/" "$corpus" >"$log" 2>&1; then
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' "$log" |
      sed "s/^/fuzz:   /" || true
    grep -E '^(#[0-9]+ +DONE|Done [0-9]+ runs)' "$log" | tail -n 1 | sed "s/^/fuzz:   /" || true
  else
    echo "fuzz: $name FOUND A PROBLEM; the input is in $findings/, the end of $log:"
    tail -n 40 "$log"
    failed+=("$name")
  fi
done

if ((${#failed[@]})); then
  echo "fuzz: findings in ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: ${#fuzzers[@]} fuzzer(s), ${seconds}s each, no findings"
