// moelab — the command line of the MoE reference implementation.
//
//   moelab numerics [--logits L --dtype D] [--value X] [--json]
//   moelab presets [--json]
//   moelab route --preset NAME [--tokens T] [--seed S] [--dtype fp32|bf16] [--json]
//   moelab route --checkpoint DIR --text TEXT [--dtype fp32|bf16] [--json]
//   moelab layer --preset NAME [--tokens T] [--seed S] [--capacity-factor F] [--json]
//   moelab params --preset NAME [--context L] [--json]
//   moelab golden --out DIR [--filter GLOB] [--realistic] [--list] [--json]
//   moelab check --golden DIR --impl cpu|cuda [--filter GLOB] [--verbose] [--json]
//   moelab corpus --out DIR [--max-domain-bytes N] [--val-percent P] [--seed S] [--json]
//   moelab train [--preset NAME] [--balance B] [--steps N] [--seed S] [--out DIR] [--resume DIR] [--json]
//   moelab bench --impl cuda [--shape S,...] [--tokens T,...] [--routing uniform|skewed] [--versions] [--json FILE]
//   moelab bench --model tiny_moe [--threads N] [--repeats R] [--json FILE]
//   moelab analyze --checkpoint DIR [--split val|train] [--batches N] [--compare DIR2] [--json]
//   moelab sdc --checkpoint DIR|random [--site S,...] [--bits B,...] [--dtype D,...] [--trials N] [--lockstep] [--json]
//   moelab sdc --checkpoint DIR|random --trace --site S --dtype D --bit N --text TEXT [--json]
//
// Exit codes: 0 success, 1 a check failed (moelab check) or `moelab bench --impl cuda` cannot run here,
// 2 bad input (one line on stderr naming the problem).
#include <fmt/format.h>

#include <cstdio>

#include "reference/error.h"
#include "tools/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"moelab: an instrumented reference implementation of Mixture-of-Experts layers", "moelab"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "moelab " MOELAB_VERSION);
  moelab::tools::add_numerics_command(app);
  moelab::tools::add_presets_command(app);
  moelab::tools::add_route_command(app);
  moelab::tools::add_params_command(app);
  moelab::tools::add_layer_command(app);
  moelab::tools::add_golden_command(app);
  moelab::tools::add_check_command(app);
  moelab::tools::add_corpus_command(app);
  moelab::tools::add_train_command(app);
  moelab::tools::add_bench_command(app);
  moelab::tools::add_analyze_command(app);
  moelab::tools::add_sdc_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::RuntimeError& e) {  // a command's own exit code (moelab check: 1 = a case failed)
    return e.get_exit_code();
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    fmt::print(stderr, "moelab: error: {} (see moelab --help)\n", e.what());
    return 2;
  } catch (const moelab::Error& e) {
    const std::vector<CLI::App*> used = app.get_subcommands();
    fmt::print(stderr, "moelab{}: error: {}\n", used.empty() ? "" : " " + used[0]->get_name(), e.what());
    return 2;
  }
  return 0;
}
