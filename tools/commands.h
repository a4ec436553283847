// moelab/tools/commands.h — the subcommands of the `moelab` command line.
//
// Each subcommand registers itself on the app. Every subcommand takes --json, and then prints one
// JSON document on stdout instead of tables. Bad input throws moelab::Error; main() prints it on
// one line and exits with code 2.
#pragma once

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

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

}  // namespace moelab::tools
