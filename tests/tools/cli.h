// moelab/tests/tools/cli.h — running the built `moelab` binary from a test, as a user runs it.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

namespace moelab_cli {  // not inside moelab: the tests call their runner moelab(), as a user types it

struct CliResult {
  int exit_code;
  std::string out;  // stdout and stderr together
};

// Runs build/bin/moelab with `args` through the shell; the exit code is -1 if it did not exit.
inline CliResult run(const std::string& args) {
  const std::string command = std::string(MOELAB_BINARY_DIR) + "/bin/moelab " + args + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return {-1, "popen failed"};
  std::string out;
  std::array<char, 4096> buffer{};
  while (std::fgets(buffer.data(), buffer.size(), pipe) != nullptr) out += buffer.data();
  const int status = pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

// `moelab args --json`, which must succeed; its output parsed (null if it failed).
inline nlohmann::json run_json(const std::string& args) {
  const CliResult r = run(args + " --json");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  return r.exit_code == 0 ? nlohmann::json::parse(r.out) : nlohmann::json();
}

// A small corpus of the generated domains only (an empty --root: no Debian files), 8 KiB per
// domain, written by `moelab corpus` into `out`. `empty_root` must be an existing empty folder.
// Returns the command's result; callers ASSERT its exit code.
inline CliResult make_small_corpus(const std::string& out, const std::string& empty_root) {
  return run("corpus --out " + out + " --root " + empty_root + " --max-domain-bytes 8192 --json");
}

}  // namespace moelab_cli
