// `moelab bench`: how fast an MoE layer runs, and against what.
//
//   moelab bench --impl cuda [--shape mixtral,deepseek_v3,qwen3_30b_a3b,olmoe] [--tokens 1,16,128,4096,16384]
//                [--routing uniform|skewed] [--replays N] [--versions] [--no-baselines] [--json FILE] [--seed S]
//
// --impl cuda times the layer forward of cuda/moe.h at the published sizes of the models (weights
// drawn on the device), after measuring the device's peaks (a dense bf16 GEMM through cuBLAS, a
// device-to-device copy): per shape and T the median time of CUDA-graph replays, the useful
// TFLOP/s, the effective GB/s and the fraction of the roofline; with --versions the ladders'
// version combinations; with the baselines (default on) the experts and the layer with cuBLAS (a
// per-expert loop and the grouped GEMM) and the ratio of the times. docs/perf.md explains the
// method; tools/bench_cuda.cpp does the measuring.
//
//   moelab bench --model tiny_moe [--threads N] [--warmup W] [--repeats R] [--json FILE] [--seed S]
//
// --model times the CPU reference on the tiny language model (tools/bench_model.cpp): the median
// training step (tokens/s) and one MoE layer's forward and forward+backward;
// tools/bench_torch_model.py times the same in PyTorch.
//
// Exit codes: 0 measured; 1 --impl cuda cannot run here (built without CUDA, no GPU: one line on
// stderr says which) or a check before the timing failed; 2 bad input.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "reference/error.h"
#include "reference/files.h"
#include "reference/model.h"
#include "reference/presets.h"
#include "tools/bench.h"
#include "tools/commands.h"

namespace moelab::tools {
namespace {

using json = nlohmann::ordered_json;

struct BenchOptions {
  std::string impl;   // "cuda": the MoE layer forward on the GPU
  std::string model;  // or the CPU training step of this model (model_config's names)
  int threads = 0;
  int warmup = 2;
  int repeats = 10;
  std::vector<std::string> shapes{"mixtral", "deepseek_v3", "qwen3_30b_a3b", "olmoe"};
  std::vector<Index> tokens{1, 16, 128, 4096, 16384};
  std::string routing = "uniform";
  int replays = 30;
  bool versions = false;
  bool baselines = true;
  std::string json_path;
  std::uint64_t seed = 0;
};

// The shapes by model name; a preset name is accepted too (moelab presets lists them).
struct ShapeAlias {
  std::string_view name, preset;
};
constexpr ShapeAlias kShapeAliases[] = {
    {"mixtral", "mixtral"}, {"deepseek_v3", "deepseek_v3"}, {"qwen3_30b_a3b", "qwen3_moe"}, {"olmoe", "olmoe"}};

BenchShape resolve_shape(const std::string& name) {
  std::string_view preset_name = name;
  for (const ShapeAlias& a : kShapeAliases)
    if (a.name == name) preset_name = a.preset;
  const Preset* preset = nullptr;
  for (const Preset& p : presets())
    if (p.name == preset_name) preset = &p;
  if (preset == nullptr)
    fail("--shape", name, "must be mixtral, deepseek_v3, qwen3_30b_a3b, olmoe or a preset name (see moelab presets)");
  BenchShape shape{.name = name, .preset = preset, .config = layer_config(*preset, PresetSize::full)};
  shape.config.routing.router.noise = RouterNoise::none;  // inference: no training noise
  return shape;
}

// Prints "moelab bench: error: <message>" and leaves with exit code 1: the benchmark cannot run
// here, which is not bad input (exit 2) and not a skipped test (77 is ctest's, not a user's).
[[noreturn]] void cannot_run(const std::string& message) {
  fmt::print(stderr, "moelab bench: error: {}\n", message);
  throw CLI::RuntimeError(1);
}

void run_cuda(const BenchOptions& o) {
  CudaBenchOptions c;
  require(!o.shapes.empty(), "--shape", "(empty)", "names at least one shape");
  require(!o.tokens.empty(), "--tokens", "(empty)", "names at least one token count");
  for (const Index t : o.tokens)
    require(t >= 1 && t <= kMaxBenchTokens, "--tokens", t, fmt::format("must be in [1, {}]", kMaxBenchTokens));
  require(o.routing == "uniform" || o.routing == "skewed", "--routing", o.routing, "must be uniform or skewed");
  require(o.replays >= 1 && o.replays <= 10'000, "--replays", o.replays, "must be in [1, 10000]");
  for (const std::string& name : o.shapes) c.shapes.push_back(resolve_shape(name));
  c.tokens = o.tokens;
  c.skewed = o.routing == "skewed";
  c.replays = o.replays;
  c.versions = o.versions;
  c.baselines = o.baselines;
  c.seed = o.seed;
#ifdef MOELAB_HAVE_CUDA
  for (const BenchShape& s : c.shapes)
    if (const std::string why = cuda_layer_unsupported(s.config); !why.empty())
      fail("--shape", s.name, "the CUDA layer does not compute it: " + why);
  if (const std::string why = cuda_bench_unavailable(); !why.empty()) cannot_run("--impl = cuda: " + why);
  json doc;
  const bool checks_passed = run_cuda_bench(c, doc);
  if (!o.json_path.empty()) {
    write_file_atomically(o.json_path, doc.dump(1) + "\n");
    fmt::print("\nwrote {}\n", o.json_path);
  }
  if (!checks_passed) cannot_run("a check before the timing failed (see the lines marked FAILED above)");
#else
  cannot_run(
      "--impl = cuda: this moelab was built without CUDA (configure with -DMOELAB_CUDA=ON where nvcc is installed)");
#endif
}

void run_model(const BenchOptions& o) {
  const std::vector<std::string> names = model_config_names();
  require(std::find(names.begin(), names.end(), o.model) != names.end(), "--model", o.model,
          fmt::format("must be one of {}", fmt::join(names, ", ")));
  require(o.threads >= 0 && o.threads <= 256, "--threads", o.threads, "must be in [0, 256] (0: every core)");
  require(o.warmup >= 0 && o.warmup <= 1000, "--warmup", o.warmup, "must be in [0, 1000]");
  require(o.repeats >= 1 && o.repeats <= 10'000, "--repeats", o.repeats, "must be in [1, 10000]");
  json doc;
  run_model_bench({.model = o.model, .threads = o.threads, .warmup = o.warmup, .repeats = o.repeats, .seed = o.seed},
                  doc);
  if (!o.json_path.empty()) {
    write_file_atomically(o.json_path, doc.dump(1) + "\n");
    fmt::print("wrote {}\n", o.json_path);
  }
}

void run_bench(const BenchOptions& o) {
  // One mode per run: --impl cuda (the layer on the GPU) or --model NAME (the CPU training step).
  require(o.impl.empty() || o.model.empty(), "--model", o.model, "cannot go with --impl: one mode per run");
  if (!o.model.empty()) return run_model(o);
  require(!o.impl.empty(), "--impl", "(missing)",
          "is required unless --model is given: cuda (the MoE layer forward on the GPU)");
  require(o.impl == "cuda", "--impl", o.impl, "must be cuda (the MoE layer forward on the GPU)");
  run_cuda(o);
}

}  // namespace

void add_bench_command(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  CLI::App* cmd = app.add_subcommand("bench", "Time an MoE layer at the published sizes, with its roofline and baselines");
  cmd->add_option("--impl", o->impl, "what to time: cuda (the layer forward of cuda/moe.h on the GPU)");
  cmd->add_option("--model", o->model,
                  "or time the CPU reference training this model: tiny_moe, tiny_dense or a preset name (a train "
                  "step, and one MoE layer's forward and backward)");
  cmd->add_option("--threads", o->threads, "--model: threads of the train step (default 0: every core)");
  cmd->add_option("--warmup", o->warmup, "--model: untimed runs first (default 2)");
  cmd->add_option("--repeats", o->repeats, "--model: timed runs, the median is reported (default 10)");
  cmd->add_option("--shape", o->shapes,
                  "layers, comma-separated: mixtral, deepseek_v3, qwen3_30b_a3b, olmoe or preset names (default all four)")
      ->delimiter(',');
  cmd->add_option("--tokens", o->tokens, "token counts T, comma-separated (default 1,16,128,4096,16384)")->delimiter(',');
  cmd->add_option("--routing", o->routing,
                  "uniform (random tokens: near-uniform load) or skewed (a common direction in every token: the "
                  "busiest eighth of the experts get half of the pairs)");
  cmd->add_option("--replays", o->replays, "CUDA-graph replays per measurement, the median is reported (default 30)");
  cmd->add_flag("--versions", o->versions, "also time the ladders' version combinations (v1 everywhere, each stage's versions)");
  cmd->add_flag("--baselines,!--no-baselines", o->baselines,
                "time cuBLAS beside ours: a per-expert loop and the grouped GEMM (default on)");
  cmd->add_option("--json", o->json_path, "also write everything measured to this JSON file");
  cmd->add_option("--seed", o->seed, "seed of the weights and the tokens (default 0)");
  cmd->callback([o] { run_bench(*o); });
}

}  // namespace moelab::tools
