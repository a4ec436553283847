// moelab/tools/bench.h — `moelab bench`: what tools/cmd_bench.cpp (the command line, checks,
// output) hands to tools/bench_model.cpp (the CPU training step) and tools/bench_cuda.cpp (the
// measurements on the GPU; built only with CUDA).
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "reference/layer.h"
#include "reference/presets.h"

namespace moelab::tools {

// One benchmarked layer: a name on the command line and the preset's layer at its published size.
struct BenchShape {
  std::string name;         // as given: "qwen3_30b_a3b"
  const Preset* preset = nullptr;  // qwen3_moe
  LayerConfig config;       // layer_config(*preset, full), router noise off (inference)
};

// `moelab bench --impl cuda`: the MoE layer forward on the GPU.
struct CudaBenchOptions {
  std::vector<BenchShape> shapes;
  std::vector<Index> tokens;   // T values, each in [1, kMaxBenchTokens]
  bool skewed = false;         // --routing skewed
  int replays = 30;            // graph replays per measurement (fewer where one would take > 3 s)
  bool versions = false;       // also time the ladder's version combinations
  bool baselines = true;       // also time cuBLAS (per-expert loop, grouped GEMM)
  std::uint64_t seed = 0;
};
inline constexpr Index kMaxBenchTokens = 262'144;

// `moelab bench --model NAME`: the CPU reference's training step and MoE layer (bench_model.cpp).
struct ModelBenchOptions {
  std::string model = "tiny_moe";  // model_config's name
  int threads = 0;                 // of the train step (0: every core); the layer runs on one
  int warmup = 2;                  // untimed runs first
  int repeats = 10;                // timed runs: the median is reported
  std::uint64_t seed = 0;
};
// Measures, printing a table on stdout, and fills `doc` with everything measured.
void run_model_bench(const ModelBenchOptions& options, nlohmann::ordered_json& doc);

// "" if `moelab bench --impl cuda` can run here, else why not ("no CUDA device: ...").
std::string cuda_bench_unavailable();
// "" if the CUDA layer computes `config` (cuda::moe_unsupported), else why not. Never touches the device.
std::string cuda_layer_unsupported(const LayerConfig& config);
// Measures, printing the tables on stdout as it goes, and fills `doc` with everything measured.
// Returns false if a check before the timing failed (a baseline and our kernels disagree).
bool run_cuda_bench(const CudaBenchOptions& options, nlohmann::ordered_json& doc);

}  // namespace moelab::tools
