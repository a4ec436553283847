// `moelab golden` and `moelab check`: the golden values for kernel authors (docs/golden.md).
//
//   moelab golden --out DIR [--filter GLOB] [--realistic] [--list] [--json]
//   moelab check --golden DIR --impl cpu|cuda [--filter GLOB] [--verbose] [--json]
//
// golden writes the cases (the committed set, or with --realistic the published widths) and
// DIR/manifest.json; two runs write the same bytes. check runs an implementation on every matching
// case and prints one row per case; it exits 1 if any case fails.
#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "reference/error.h"
#include "tools/commands.h"
#include "tools/golden/golden.h"

namespace moelab::tools {
namespace {

using json = nlohmann::ordered_json;

struct GoldenOptions {
  std::string out, filter;
  bool realistic = false, list = false, json = false;
};

void run_golden(const GoldenOptions& o) {
  if (o.list) {
    json doc = json::array();
    for (const golden::CaseSpec& s : golden::case_specs())
      if (golden::glob_match(o.filter, s.name)) doc.push_back({{"name", s.name}, {"realistic", s.realistic}});
    if (o.json) {
      fmt::print("{}\n", doc.dump(1));
    } else {
      for (const json& s : doc)
        fmt::print("{}{}\n", s["name"].get<std::string>(), s["realistic"].get<bool>() ? "  (realistic)" : "");
    }
    return;
  }
  require(!o.out.empty(), "--out", "(missing)", "is required (or --list)");
  const std::vector<std::string> written = golden::write_golden(o.out, o.filter, o.realistic, [&](const golden::Case& c) {
    if (!o.json) fmt::print("{:<44} {:<14} {}\n", c.name, c.component, c.description);
  });
  if (o.json) {
    fmt::print("{}\n", json{{"command", "golden"}, {"out", o.out}, {"cases", written}}.dump(1));
  } else {
    fmt::print("\n{} cases written to {}\n", written.size(), o.out);
  }
}

struct CheckOptions {
  std::string golden, impl = "cpu", filter;
  bool verbose = false, json = false;
};

int run_check(const CheckOptions& o) {
  require(o.impl == "cpu" || o.impl == "cuda", "--impl", o.impl, "must be cpu or cuda");
  golden::Manifest manifest = golden::read_manifest(o.golden);
  json rows = json::array();
  int counts[4] = {0, 0, 0, 0};
  if (!o.json)
    fmt::print("{:<44} {:>11} {:>10} {:>10}  {}\n", "case", "worst error", "NMSE", "tolerance", "verdict");
  bool any = false;
  for (golden::Case& c : manifest.cases) {
    if (!golden::glob_match(o.filter, c.name)) continue;
    any = true;
    golden::load_case(c, o.golden);
    golden::CaseResult r;
    try {
      r = golden::compare_case(c, o.impl == "cpu" ? golden::run_cpu(c) : golden::run_cuda(c));
    } catch (const golden::NotSupported& e) {
      r = {.name = c.name, .verdict = golden::Verdict::not_supported, .tolerance = "-"};
      r.checks.push_back({.tensor = "*", .verdict = golden::Verdict::not_supported, .message = e.what()});
    }
    ++counts[static_cast<int>(r.verdict)];
    json checks = json::array();
    for (const golden::CheckResult& k : r.checks)
      checks.push_back({{"tensor", k.tensor},
                        {"verdict", golden::verdict_name(k.verdict)},
                        {"worst", json_number(k.worst)},
                        {"nmse", json_number(k.nmse)},
                        {"message", k.message}});
    rows.push_back({{"case", r.name},
                    {"verdict", golden::verdict_name(r.verdict)},
                    {"worst", json_number(r.worst)},
                    {"nmse", json_number(r.nmse)},
                    {"tolerance", r.tolerance},
                    {"checks", checks}});
    if (o.json) continue;
    fmt::print("{:<44} {:>11.3g} {:>10.2g} {:>10}  {}\n", r.name, r.worst, r.nmse, r.tolerance,
               golden::verdict_name(r.verdict));
    for (const golden::CheckResult& k : r.checks)
      if (o.verbose || k.verdict == golden::Verdict::fail || (k.verdict != golden::Verdict::pass && !k.message.empty()))
        fmt::print("    {:<40} {:<13} {}\n", k.tensor, golden::verdict_name(k.verdict), k.message);
    std::fflush(stdout);  // each row as it is judged; an error on a later case comes after them
  }
  require(any, "--filter", o.filter, "matches no case in " + o.golden + "/manifest.json");
  const int passed = counts[0], failed = counts[1], ambiguous = counts[2], unsupported = counts[3];
  if (o.json) {
    fmt::print("{}\n", json{{"command", "check"},
                            {"impl", o.impl},
                            {"golden", o.golden},
                            {"passed", passed},
                            {"failed", failed},
                            {"ambiguous", ambiguous},
                            {"not_supported", unsupported},
                            {"cases", rows}}
                           .dump(1));
  } else {
    fmt::print("\n{}: {} passed, {} failed, {} ambiguous, {} not supported\n", o.impl, passed, failed, ambiguous,
               unsupported);
  }
  return failed > 0 ? 1 : 0;
}

}  // namespace

void add_golden_command(CLI::App& app) {
  auto o = std::make_shared<GoldenOptions>();
  CLI::App* cmd = app.add_subcommand("golden", "Write the golden values (inputs, expected outputs, tolerances)");
  cmd->add_option("--out", o->out, "directory to write the cases and manifest.json into");
  cmd->add_option("--filter", o->filter, "only cases whose name matches this glob (e.g. 'mixtral.*')");
  cmd->add_flag("--realistic", o->realistic, "the published widths instead of the committed small set (GBs)");
  cmd->add_flag("--list", o->list, "list the case names and write nothing");
  cmd->add_flag("--json", o->json, "print one JSON document");
  cmd->callback([o] { run_golden(*o); });
}

void add_check_command(CLI::App& app) {
  auto o = std::make_shared<CheckOptions>();
  CLI::App* cmd = app.add_subcommand("check", "Run an implementation against golden values; exit 1 on any failure");
  cmd->add_option("--golden", o->golden, "a directory written by moelab golden (e.g. golden/)")->required();
  cmd->add_option("--impl", o->impl, "cpu (the float32 reference) or cuda (the kernels of cuda/)");
  cmd->add_option("--filter", o->filter, "only cases whose name matches this glob");
  cmd->add_flag("--verbose", o->verbose, "one line per checked tensor");
  cmd->add_flag("--json", o->json, "print one JSON document");
  cmd->callback([o] {
    const int code = run_check(*o);
    if (code != 0) throw CLI::RuntimeError(code);
  });
}

}  // namespace moelab::tools
