// moelab/cuda/bench/router_bench.cu — validate, then time, every version of cuda/router.cu.
//
// What it shows. The router (logits GEMM + scoring + top-k + gating, cuda/router.cu) on the
// published shapes, version by version, from decode (T = 1) to prefill (T = 16384) sizes:
//   mixtral        C 4096, E   8, k 2, softmax of the selected logits,        bf16 weight
//   qwen3_30b_a3b  C 2048, E 128, k 8, softmax, renormalised,                 bf16 weight
//   olmoe          C 2048, E  64, k 8, softmax,                               bf16 weight
//   deepseek_v3    C 7168, E 256, k 8, sigmoid, bias, 4 of 8 groups, x 2.5,   fp32 weight
// with bf16 activations. First every version is checked against the reference (route_forward in
// double, at C = 256): the logits within the float32 accumulation bound, the ids equal to the
// reference selection on the device's logits except near-ties (counted, and required rare), the
// gates those of the reference gating of the device's ids. Then each is timed.
//
// How it measures. moelab::cuda::time_graph (cuda/timing.h, docs/perf.md): one CUDA graph holds
// launches on as many buffer sets as it takes to exceed twice the L2 cache, so W and x come from
// DRAM as in a model; the median over replays is reported. Per (shape, T, version):
//   GB/s      (x + W + ids + gates (+ logits with --store-logits=1)) bytes / time
//   GFLOP/s   2 T C E / time (the GEMM; scoring and selection are O(T E k))
//   roofline  max(bytes / peak bandwidth, flops / peak fp32 rate) / time, in percent of that
//             floor. The defaults: --peak-gbs=3000 (an H100's measured device-to-device copy
//             rate) and --peak-tflops=60 (the kernels use fp32 SIMT FMAs, not tensor cores; an
//             H100 SXM's fp32 peak is about 67 TFLOP/s at its boost clock).
// Version 1 (a thread per token) is skipped where C E > 2^20 (DeepSeek-V3: one thread's dot
// products alone are 1.8M dependent FMAs, tens of ms) or T C E > 2^32: it would take too long.
//
// Usage: moelab_router_bench [--iterations=N] [--shape=NAME] [--tokens=1,16,128,4096,16384]
//                            [--json=FILE] [--peak-gbs=G] [--peak-tflops=F] [--store-logits=0|1]
//                            [--seed=S]
//   defaults: 20 replays, every shape, those token counts, no JSON
//   --iterations=0   validate only (ctest runs it so: CudaRouterBench.validate)
// Exit status: 0 all versions passed, 1 a version failed, 2 bad arguments, 77 no CUDA device
// (the ctest "skipped" code).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "cuda/device.h"
#include "cuda/router.h"
#include "cuda/timing.h"
#include "reference/error.h"
#include "reference/numerics.h"
#include "reference/presets.h"
#include "reference/random.h"
#include "reference/routing.h"

namespace {

namespace mc = moelab::cuda;
using moelab::Format;
using moelab::Index;
using moelab::RoutingConfig;

struct Shape {
  const char* name;
  const char* preset;
  Format weight_dtype;  // the router's dtype
};
constexpr Shape kShapes[] = {{"mixtral", "mixtral", Format::bf16},
                             {"qwen3_30b_a3b", "qwen3_moe", Format::bf16},
                             {"olmoe", "olmoe", Format::bf16},
                             {"deepseek_v3", "deepseek_v3", Format::fp32}};

RoutingConfig config_of(const Shape& s) {
  RoutingConfig c = moelab::find_preset(s.preset).full;
  c.router.noise = moelab::RouterNoise::none;
  c.router.dtype = s.weight_dtype;
  return c;
}

struct Options {
  int iterations = 20;
  std::string shape;  // empty: all
  std::vector<std::int64_t> tokens = {1, 16, 128, 4096, 16384};
  std::string json;
  double peak_gbs = 3000;
  double peak_tflops = 60;
  bool store_logits = false;
  std::uint64_t seed = 42;
};

void usage() {
  std::fprintf(stderr,
               "usage: moelab_router_bench [--iterations=N] [--shape=NAME] [--tokens=T1,T2,...] [--json=FILE]\n"
               "                           [--peak-gbs=G] [--peak-tflops=F] [--store-logits=0|1] [--seed=S]\n"
               "  shapes: mixtral, qwen3_30b_a3b, olmoe, deepseek_v3; --iterations=0 validates only\n");
}

bool parse_u64(const std::string& s, unsigned long long& v) {
  if (s.empty() || s[0] == '-') return false;
  char* end = nullptr;
  v = std::strtoull(s.c_str(), &end, 10);
  return *end == '\0';
}

// Parses --name=value arguments; false (after printing why) on anything else.
bool parse(int argc, char** argv, Options& opt) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const std::size_t eq = arg.find('=');
    const std::string name = arg.substr(0, eq);
    const std::string value = eq == std::string::npos ? "" : arg.substr(eq + 1);
    unsigned long long v = 0;
    bool ok = true;
    if (name == "--iterations") {
      ok = parse_u64(value, v) && v <= 100000;
      opt.iterations = static_cast<int>(v);
    } else if (name == "--shape") {
      ok = std::any_of(std::begin(kShapes), std::end(kShapes), [&](const Shape& s) { return value == s.name; });
      opt.shape = value;
    } else if (name == "--tokens") {
      opt.tokens.clear();
      std::size_t start = 0;
      while (ok && start <= value.size()) {
        const std::size_t comma = std::min(value.find(',', start), value.size());
        ok = parse_u64(value.substr(start, comma - start), v) && v >= 1 && v <= (1u << 24);
        opt.tokens.push_back(static_cast<std::int64_t>(v));
        start = comma + 1;
      }
    } else if (name == "--json") {
      ok = !value.empty();
      opt.json = value;
    } else if (name == "--peak-gbs" || name == "--peak-tflops") {
      char* end = nullptr;
      const double d = std::strtod(value.c_str(), &end);
      ok = !value.empty() && *end == '\0' && d > 0 && std::isfinite(d);
      (name == "--peak-gbs" ? opt.peak_gbs : opt.peak_tflops) = d;
    } else if (name == "--store-logits") {
      ok = value == "0" || value == "1";
      opt.store_logits = value == "1";
    } else if (name == "--seed") {
      ok = parse_u64(value, v);
      opt.seed = v;
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr, "%s: unknown option or bad value\n", arg.c_str());
      usage();
      return false;
    }
  }
  return true;
}

// ---- device inputs ------------------------------------------------------------------------------

// Uniform values in [-scale, scale) from a hash of (seed, index): fills large buffers without a
// host round trip. Float or bf16 (bits) output.
__device__ float hashed_uniform(std::uint64_t seed, std::uint64_t i) {
  std::uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;  // SplitMix64's mixer
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * 0x1p-24f * 2.0f - 1.0f;
}
__global__ void fill_kernel(float* out, std::size_t n, std::uint64_t seed, float scale) {
  for (std::size_t i = std::size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x)
    out[i] = scale * hashed_uniform(seed, i);
}
__global__ void fill_kernel(std::uint16_t* out, std::size_t n, std::uint64_t seed, float scale) {
  for (std::size_t i = std::size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x)
    out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(scale * hashed_uniform(seed, i)));
}
template <typename T>
void fill(mc::DeviceBuffer<T>& buffer, std::uint64_t seed, float scale) {
  if (buffer.size() == 0) return;
  fill_kernel<<<1024, 256>>>(buffer.data(), buffer.size(), seed, scale);
  mc::check_launch("fill_kernel");
}

// One set of buffers for a launch: x bf16; W in the router's dtype; biases; outputs.
struct BufferSet {
  mc::DeviceBuffer<std::uint16_t> x;
  mc::DeviceBuffer<float> w_f32;
  mc::DeviceBuffer<std::uint16_t> w_bf16;
  mc::DeviceBuffer<float> bias, selection_bias, logits, gates;
  mc::DeviceBuffer<std::int32_t> ids;

  mc::RouterArgs args(std::int64_t T) const {
    return {.x = x.data(),
            .x_dtype = Format::bf16,
            .weight = w_bf16.size() > 0 ? static_cast<const void*>(w_bf16.data()) : static_cast<const void*>(w_f32.data()),
            .bias = bias.data(),
            .selection_bias = selection_bias.data(),
            .logits = logits.size() > 0 ? logits.data() : nullptr,
            .ids = ids.data(),
            .gates = gates.data(),
            .tokens = T};
  }
};

BufferSet make_set(const RoutingConfig& c, std::int64_t T, bool store_logits, std::uint64_t seed) {
  const auto C = static_cast<std::size_t>(c.router.hidden_size), E = static_cast<std::size_t>(c.num_experts());
  const auto k = static_cast<std::size_t>(c.top_k), n = static_cast<std::size_t>(T);
  BufferSet s;
  s.x = mc::DeviceBuffer<std::uint16_t>(n * C);
  fill(s.x, seed, 1.7f);  // about unit variance
  const float w_scale = 1.7f / std::sqrt(static_cast<float>(C));  // logits about N(0, 1)
  if (c.router.dtype == Format::bf16) {
    s.w_bf16 = mc::DeviceBuffer<std::uint16_t>(E * C);
    fill(s.w_bf16, seed + 1, w_scale);
  } else {
    s.w_f32 = mc::DeviceBuffer<float>(E * C);
    fill(s.w_f32, seed + 1, w_scale);
  }
  if (c.router.use_bias) {
    s.bias = mc::DeviceBuffer<float>(E);
    fill(s.bias, seed + 2, 0.5f);
  }
  if (c.use_selection_bias) {
    s.selection_bias = mc::DeviceBuffer<float>(E);
    fill(s.selection_bias, seed + 3, 0.05f);
  }
  if (store_logits) s.logits = mc::DeviceBuffer<float>(n * E);
  s.ids = mc::DeviceBuffer<std::int32_t>(n * k);
  s.gates = mc::DeviceBuffer<float>(n * k);
  return s;
}

// ---- validation ---------------------------------------------------------------------------------

// Checks version `version` on T tokens of shape c (at its hidden size) against the reference.
// Returns the number of failures (printing the first few) and adds the near-ties to *near_ties.
std::int64_t validate(const RoutingConfig& c, std::int64_t T, int version, std::uint64_t seed, std::int64_t* near_ties) {
  const Index C = c.router.hidden_size, E = c.num_experts();
  const int k = c.top_k;
  const bool bf16 = c.router.dtype == Format::bf16;
  moelab::Rng rng(seed);
  // Inputs on the host, rounded as the device holds them.
  std::vector<float> x(static_cast<std::size_t>(T * C)), w(static_cast<std::size_t>(E * C));
  for (float& v : x) v = static_cast<float>(rng.normal());
  for (float& v : w) v = static_cast<float>(rng.normal() / std::sqrt(static_cast<double>(C)));
  const std::vector<mc::Bf16Bits> x_bits = mc::to_bf16(x), w_bits = mc::to_bf16(w);
  x = mc::from_bf16(x_bits);
  if (bf16) w = mc::from_bf16(w_bits);
  std::vector<float> bias(static_cast<std::size_t>(E)), selection_bias(static_cast<std::size_t>(E));
  for (float& v : bias) v = static_cast<float>(0.5 * rng.normal());
  for (float& v : selection_bias) v = static_cast<float>(0.05 * rng.normal());

  const mc::DeviceBuffer<mc::Bf16Bits> x_d(x_bits);
  const mc::DeviceBuffer<float> w_f32(bf16 ? std::vector<float>{} : w);
  const mc::DeviceBuffer<mc::Bf16Bits> w_bf16(bf16 ? w_bits : std::vector<mc::Bf16Bits>{});
  const mc::DeviceBuffer<float> bias_d(c.router.use_bias ? bias : std::vector<float>{});
  const mc::DeviceBuffer<float> selection_bias_d(c.use_selection_bias ? selection_bias : std::vector<float>{});
  mc::DeviceBuffer<float> logits_d(static_cast<std::size_t>(T * E)), gates_d(static_cast<std::size_t>(T * k));
  mc::DeviceBuffer<std::int32_t> ids_d(static_cast<std::size_t>(T * k));
  logits_d.poison();
  gates_d.poison();
  ids_d.poison();
  mc::launch_router({.x = x_d.data(),
                     .x_dtype = Format::bf16,
                     .weight = bf16 ? static_cast<const void*>(w_bf16.data()) : static_cast<const void*>(w_f32.data()),
                     .bias = bias_d.data(),
                     .selection_bias = selection_bias_d.data(),
                     .logits = logits_d.data(),
                     .ids = ids_d.data(),
                     .gates = gates_d.data(),
                     .tokens = T},
                    c, version);
  mc::check_cuda(cudaDeviceSynchronize(), "router kernel");
  const std::vector<float> logits = logits_d.download(), gates = gates_d.download();
  const std::vector<std::int32_t> ids = ids_d.download();

  std::int64_t failures = 0;
  const auto fail = [&](const std::string& what) {
    if (++failures <= 5) std::printf("    %s\n", what.c_str());
  };
  // Logits: within gamma_{C+2} sum |x w| (+|b|) of the exact value (bf16: of its roundings).
  moelab::RoutingParamsT<double> params;
  params.router.weight = Eigen::Map<const moelab::Matrix>(w.data(), E, C).cast<double>();
  if (c.router.use_bias) params.router.bias = Eigen::Map<const moelab::Vector>(bias.data(), E).cast<double>();
  if (c.use_selection_bias)
    params.selection_bias = Eigen::Map<const moelab::Vector>(selection_bias.data(), E).cast<double>();
  const moelab::MatrixD xd = Eigen::Map<const moelab::Matrix>(x.data(), T, C).cast<double>();
  moelab::MatrixD exact = xd * params.router.weight.transpose();
  moelab::MatrixD magnitude = xd.cwiseAbs() * params.router.weight.cwiseAbs().transpose();
  if (c.router.use_bias) {
    const auto rounded = [&](double v) { return bf16 ? static_cast<double>(moelab::round_to(static_cast<float>(v), Format::bf16)) : v; };
    const moelab::VectorT<double> b = params.router.bias.unaryExpr(rounded);
    exact.rowwise() += b.transpose();
    magnitude.rowwise() += b.cwiseAbs().transpose();
  }
  const double n = static_cast<double>(C + 2), u = 0x1p-24, gamma = n * u / (1 - n * u);
  for (Index i = 0; i < T * E; ++i) {
    const float got = logits[static_cast<std::size_t>(i)];
    const double bound = gamma * magnitude.data()[i] + 1e-12 * std::abs(exact.data()[i]);
    const double lo = exact.data()[i] - bound, hi = exact.data()[i] + bound;
    const bool ok = bf16 ? got >= moelab::round_to(static_cast<float>(lo), Format::bf16) &&
                               got <= moelab::round_to(static_cast<float>(hi), Format::bf16)
                         : got >= lo && got <= hi;
    if (!ok) fail("logits[" + std::to_string(i / E) + "," + std::to_string(i % E) + "] = " + std::to_string(got) +
                  ", exact " + std::to_string(exact.data()[i]) + " +- " + std::to_string(bound));
  }
  if (failures > 0) return failures;

  // Ids: the reference's selection on the device's logits, in double.
  moelab::RoutingOutputT<double> ref;
  const moelab::MatrixD l = Eigen::Map<const moelab::Matrix>(logits.data(), T, E).cast<double>();
  moelab::score_forward<double>(ref.scores, l, c.scoring);
  const bool by_logits = c.gating.kind == moelab::GateKind::softmax_of_selected_logits ||
                         c.gating.kind == moelab::GateKind::sigmoid_of_selected_logits;
  const moelab::MatrixD& ranked = by_logits ? l : ref.scores;
  const moelab::VectorT<double>* sb = c.use_selection_bias ? &params.selection_bias : nullptr;
  if (c.selection == moelab::SelectionKind::group_limited) {
    moelab::group_limited_select<double>(ref.ids, ranked, k, c.group, sb);
  } else {
    moelab::topk_select<double>(ref.ids, ranked, k, sb);
  }
  moelab::IndexMatrix got_ids(T, k);
  for (Index t = 0; t < T; ++t) {
    bool exact_match = true, explained = true;
    for (int j = 0; j < k; ++j) {
      const std::int32_t a = ids[static_cast<std::size_t>(t * k + j)], b = ref.ids(t, j);
      got_ids(t, j) = a >= 0 && a < E ? a : 0;
      if (a == b) continue;
      exact_match = false;
      // A near-tie: the two candidates' ranked values agree to float32 scoring accuracy.
      const auto value = [&](std::int32_t e) {
        return ranked(t, e) + (sb != nullptr ? (*sb)(e) : 0.0);
      };
      explained = explained && a >= 0 && a < E && !by_logits &&
                  std::abs(value(a) - value(b)) <= 1e-5 * (std::abs(ranked(t, a)) + std::abs(ranked(t, b))) + 1e-7;
    }
    if (exact_match) continue;
    if (explained) {
      ++*near_ties;
    } else {
      fail("token " + std::to_string(t) + ": ids differ from the reference selection beyond a near-tie");
    }
  }
  // Gates: the reference gating of the device's ids, from the device's logits.
  moelab::gating_forward<double>(ref.gates, l, ref.scores, got_ids, c.gating);
  const double rtol = 3e-5 + static_cast<double>(E) * u, atol = 1e-7 * c.gating.routed_scaling_factor;
  for (Index i = 0; i < T * k; ++i) {
    const double want = ref.gates.data()[i];
    const float got = gates[static_cast<std::size_t>(i)];
    if (!(std::abs(got - want) <= rtol * std::abs(want) + atol))
      fail("gates[" + std::to_string(i / k) + "," + std::to_string(i % k) + "] = " + std::to_string(got) + ", reference " +
           std::to_string(want));
  }
  return failures;
}

// ---- the bench ----------------------------------------------------------------------------------

int run(const Options& opt) {
  const mc::DeviceStatus status = mc::device_status();
  if (!status.available) {
    std::printf("%s\n", status.reason.c_str());
    return 77;
  }
  std::printf("device: %s (sm_%d, %d SMs, L2 %zu MB)\n", status.name.c_str(), status.sm, status.multiprocessors,
              status.l2_bytes >> 20);
  std::vector<Shape> shapes;
  for (const Shape& s : kShapes)
    if (opt.shape.empty() || opt.shape == s.name) shapes.push_back(s);

  // 1. Validate every version on every shape, at C = 256 (the reference runs in double).
  bool all_passed = true;
  for (const Shape& s : shapes) {
    RoutingConfig c = config_of(s);
    c.router.hidden_size = 256;
    for (int v = 1; v <= mc::kRouterVersions; ++v) {
      std::int64_t failures = 0, near_ties = 0, tokens = 0;
      std::uint64_t seed = opt.seed;
      for (const std::int64_t T : {1, 77, 1000}) {
        failures += validate(c, T, v, seed++, &near_ties);
        tokens += T;
      }
      const bool passed = failures == 0 && near_ties <= 2 + tokens / 100;
      std::printf("router_kernel%d %-14s %s (C 256, T 1 + 77 + 1000, near-ties %lld)\n", v, s.name,
                  passed ? "Passed" : "Failed", static_cast<long long>(near_ties));
      all_passed = all_passed && passed;
    }
  }
  if (!all_passed) return 1;
  if (opt.iterations == 0) return 0;

  // 2. Time.
  std::printf("\n%-14s %6s %5s %5s %4s %3s %11s %9s %10s %9s\n", "shape", "T", "C", "E", "k", "v", "median us",
              "GB/s", "GFLOP/s", "roofline");
  nlohmann::json rows = nlohmann::json::array();
  for (const Shape& s : shapes) {
    const RoutingConfig c = config_of(s);
    const double C = static_cast<double>(c.router.hidden_size), E = static_cast<double>(c.num_experts());
    const double w_bytes = E * C * (c.router.dtype == Format::bf16 ? 2 : 4);
    for (const std::int64_t T : opt.tokens) {
      const double Td = static_cast<double>(T);
      const double bytes = Td * C * 2 + w_bytes + Td * c.top_k * 8 + (opt.store_logits ? Td * E * 4 : 0);
      const double flops = 2 * Td * C * E;
      const int rotations = mc::rotations_for(bytes, status.l2_bytes);
      std::vector<BufferSet> sets;
      for (int i = 0; i < rotations; ++i) sets.push_back(make_set(c, T, opt.store_logits, opt.seed + 16 * static_cast<std::uint64_t>(i)));
      mc::check_cuda(cudaDeviceSynchronize(), "filling the inputs");
      for (int v = 1; v <= mc::kRouterVersions; ++v) {
        if (v == 1 && (C * E > 0x1p20 || Td * C * E > 0x1p32)) {
          std::printf("%-14s %6lld %5.0f %5.0f %4d %3d %11s\n", s.name, static_cast<long long>(T), C, E, c.top_k, v,
                      "skipped");
          continue;
        }
        const mc::Timing timing = mc::time_graph(
            [&](cudaStream_t stream, int i) { mc::launch_router(sets[static_cast<std::size_t>(i)].args(T), c, v, stream); },
            rotations, opt.iterations);
        const double seconds = timing.median_ms * 1e-3;
        const double floor_s = std::max(bytes / (opt.peak_gbs * 1e9), flops / (opt.peak_tflops * 1e12));
        const double gbs = bytes / seconds / 1e9, gflops = flops / seconds / 1e9, roofline = 100 * floor_s / seconds;
        std::printf("%-14s %6lld %5.0f %5.0f %4d %3d %11.1f %9.0f %10.0f %8.1f%%\n", s.name, static_cast<long long>(T), C,
                    E, c.top_k, v, timing.median_ms * 1e3, gbs, gflops, roofline);
        rows.push_back({{"shape", s.name},
                        {"tokens", T},
                        {"hidden_size", c.router.hidden_size},
                        {"experts", c.num_experts()},
                        {"top_k", c.top_k},
                        {"weight_dtype", moelab::format_name(c.router.dtype)},
                        {"version", v},
                        {"median_us", timing.median_ms * 1e3},
                        {"min_us", timing.min_ms * 1e3},
                        {"max_us", timing.max_ms * 1e3},
                        {"replays", timing.replays},
                        {"rotations", rotations},
                        {"bytes", bytes},
                        {"flops", flops},
                        {"gb_per_s", gbs},
                        {"gflop_per_s", gflops},
                        {"roofline_percent", roofline},
                        {"device", status.name}});
      }
    }
  }
  if (!opt.json.empty()) {
    std::ofstream out(opt.json);
    out << rows.dump(2) << "\n";
    if (!out) {
      std::fprintf(stderr, "could not write %s\n", opt.json.c_str());
      return 1;
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  if (!parse(argc, argv, opt)) return 2;
  try {
    return run(opt);
  } catch (const moelab::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
