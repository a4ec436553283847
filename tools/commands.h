// moelab/tools/commands.h — the subcommands of the `moelab` command line.
//
// Each subcommand registers itself on the app. Every subcommand takes --json, and then prints one
// JSON document on stdout instead of tables. Bad input throws moelab::Error; main() prints it on
// one line and exits with code 2.
#pragma once

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>

#include "reference/corpus.h"
#include "reference/recorder.h"  // json_number

namespace moelab::tools {

void add_numerics_command(CLI::App& app);
void add_presets_command(CLI::App& app);
void add_route_command(CLI::App& app);
void add_params_command(CLI::App& app);
void add_layer_command(CLI::App& app);
void add_golden_command(CLI::App& app);
void add_check_command(CLI::App& app);
void add_corpus_command(CLI::App& app);
void add_train_command(CLI::App& app);
void add_bench_command(CLI::App& app);
void add_analyze_command(CLI::App& app);
void add_sdc_command(CLI::App& app);

// The corpus of `moelab train` and `moelab analyze` (defined in cmd_corpus.cpp): read_corpus(dir),
// or, when `dir` is the default (not given) and holds no manifest.json, the generated domains
// (build_corpus on an empty root: arithmetic, counting, embedded_en) with a message saying so.
struct LoadedCorpus {
  Corpus corpus;
  bool fallback = false;  // dir had no corpus
  std::string message;    // why, and how to build one; empty unless fallback
};
LoadedCorpus load_corpus_or_generated(const std::string& dir, bool dir_given);

// A byte as a reader recognises it (defined in cmd_route.cpp; `route` and `sdc --trace` print
// texts byte by byte): the character for printable ASCII, else a C escape ("\\n", "\\x1e").
std::string shown_byte(std::uint8_t b);

}  // namespace moelab::tools
