// moelab/cuda/bench/dispatch_bench.cu — validate, then time, every version of the permutation
// (cuda/permute.cu) and the combine (cuda/combine.cu).
//
// What it shows. The two cheap stages around the expert GEMMs, at the shapes of four published
// MoE models and from decode (T = 1) to prefill (T = 16384):
//   shape           E    k   C
//   mixtral         8    2   4096
//   qwen3_30b_a3b   128  8   2048
//   olmoe           64   8   2048
//   deepseek_v3     256  8   7168
// The permutation moves a few bytes per pair and is bound by latency (launches, barriers) up to
// thousands of tokens: compare its µs, and its GB/s only at large T. The combine reads T k C bf16
// and writes T C: bound by memory bandwidth, so its GB/s is compared with --peak-gbs (default
// 3000, the device-to-device copy rate measured on an H100, bytes read + written).
//
// Validation first: every permutation version against moelab::dispatch_plan (every element of
// counts, offsets, row_token, row_gate, pair_row), on uniform and skewed (80% of pairs to expert 3)
// routing; every combine version (bf16 out) against the reference in double on up to 256 tokens
// spread over T, every channel, by the rule of tests/cuda/test_combine_device.cpp. Any failure
// exits 1 before timing.
//
// How it measures: moelab::cuda::time_graph (cuda/timing.h): launches captured in a CUDA graph,
// each rotation on its own buffers so that together they exceed twice the L2; median over replays.
// The replays are fewer (at least 3) where one launch is slow, so that each line takes about half
// a second.
//
// Usage: moelab_dispatch_bench [--iterations=N] [--tokens=LIST] [--row-align=A] [--peak-gbs=X]
//                              [--seed=S] [--json=FILE]
//   defaults: 50 replays, tokens 1,16,128,4096,16384, row_align 1, peak 3000 GB/s, seed 42
//   --iterations=0   validate only (ctest runs it so: CudaDispatchBench.validate)
//   --json=FILE      also write every timing as a JSON array of records
// Exit status: 0 all versions passed, 1 a version failed, 2 bad arguments, 77 no CUDA device.
#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cuda/combine.h"
#include "cuda/device.h"
#include "cuda/permute.h"
#include "cuda/timing.h"
#include "reference/dispatch.h"
#include "reference/error.h"
#include "reference/numerics.h"

namespace {

namespace mc = moelab::cuda;
using moelab::Index;
using moelab::IndexMatrix;

struct Shape {
  const char* name;
  int experts;
  int top_k;
  std::int64_t hidden;
};
constexpr Shape kShapes[] = {{"mixtral", 8, 2, 4096},
                             {"qwen3_30b_a3b", 128, 8, 2048},
                             {"olmoe", 64, 8, 2048},
                             {"deepseek_v3", 256, 8, 7168}};

enum class Routing { uniform, skewed };
const char* routing_name(Routing r) { return r == Routing::uniform ? "uniform" : "skewed"; }
constexpr Routing kRoutings[] = {Routing::uniform, Routing::skewed};

struct Options {
  int iterations = 50;
  std::vector<std::int64_t> tokens = {1, 16, 128, 4096, 16384};
  int row_align = 1;
  double peak_gbs = 3000;
  std::uint64_t seed = 42;
  std::string json;
};

void usage() {
  std::fprintf(stderr,
               "usage: moelab_dispatch_bench [--iterations=N] [--tokens=LIST] [--row-align=A] "
               "[--peak-gbs=X] [--seed=S] [--json=FILE]\n  --iterations=0 validates only\n");
}

bool parse_int(const std::string& s, long long lo, long long hi, long long& out) {
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || v < lo || v > hi) return false;
  out = v;
  return true;
}

// Parses --name=value arguments; false (after printing why) on anything else.
bool parse(int argc, char** argv, Options& opt) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const std::size_t eq = arg.find('=');
    const std::string name = arg.substr(0, eq);
    const std::string value = eq == std::string::npos ? "" : arg.substr(eq + 1);
    long long v = 0;
    bool ok = true;
    if (name == "--help" || name == "-h") {
      ok = false;
    } else if (name == "--iterations") {
      ok = parse_int(value, 0, 1'000'000, v);
      opt.iterations = static_cast<int>(v);
    } else if (name == "--row-align") {
      ok = parse_int(value, 1, 4096, v);
      opt.row_align = static_cast<int>(v);
    } else if (name == "--seed") {
      ok = parse_int(value, 0, (1ll << 62), v);
      opt.seed = static_cast<std::uint64_t>(v);
    } else if (name == "--peak-gbs") {
      char* end = nullptr;
      opt.peak_gbs = std::strtod(value.c_str(), &end);
      ok = !value.empty() && *end == '\0' && opt.peak_gbs > 0;
    } else if (name == "--json") {
      opt.json = value;
      ok = !value.empty();
    } else if (name == "--tokens") {
      opt.tokens.clear();
      std::stringstream list(value);
      std::string item;
      while (ok && std::getline(list, item, ',')) {
        ok = parse_int(item, 0, 1 << 20, v);
        opt.tokens.push_back(v);
      }
      ok = ok && !opt.tokens.empty();
    } else {
      ok = false;
    }
    if (!ok) {
      if (name != "--help" && name != "-h") std::fprintf(stderr, "%s: unknown option or bad value\n", arg.c_str());
      usage();
      return false;
    }
  }
  return true;
}

// ------------------------------------------------------------------------------------------------
// Inputs.

IndexMatrix make_ids(Index T, int k, int E, Routing routing, std::mt19937_64& rng) {
  IndexMatrix ids(T, k);
  std::vector<int> experts(static_cast<std::size_t>(E));
  std::iota(experts.begin(), experts.end(), 0);
  std::uniform_int_distribution<int> any(0, E - 1);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (Index t = 0; t < T; ++t) {
    for (int j = 0; j < k; ++j) {
      if (routing == Routing::skewed) {
        ids(t, j) = unit(rng) < 0.8 ? std::min(3, E - 1) : any(rng);
      } else {  // k distinct experts: a partial shuffle
        std::uniform_int_distribution<int> pick(j, E - 1);
        std::swap(experts[static_cast<std::size_t>(j)], experts[static_cast<std::size_t>(pick(rng))]);
        ids(t, j) = experts[static_cast<std::size_t>(j)];
      }
    }
  }
  return ids;
}

std::vector<float> make_gates(std::size_t n, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::vector<float> gates(n);
  for (float& g : gates) g = unit(rng);
  return gates;
}

std::vector<std::int32_t> flat(const IndexMatrix& ids) {
  return std::vector<std::int32_t>(ids.data(), ids.data() + ids.size());
}

// ------------------------------------------------------------------------------------------------
// Timing: graph replay with rotated buffer sets (cuda/timing.h).

struct Measured {
  double us = 0;
  int rotations = 0;
  int replays = 0;
};

// rotations = what the buffers ask for; fewer (and fewer replays) where one launch is slow, so
// that a measurement takes about half a second.
Measured measure(const std::function<void(cudaStream_t, int)>& launch, int rotations, int iterations) {
  const double probe_ms = mc::time_graph(launch, 1, 1, 1).median_ms;
  rotations = std::clamp(static_cast<int>(50.0 / std::max(probe_ms, 1e-6)), 1, rotations);
  const int replays =
      std::clamp(static_cast<int>(500.0 / (std::max(probe_ms, 1e-6) * rotations)), 3, std::max(iterations, 3));
  const mc::Timing t = mc::time_graph(launch, rotations, replays, 2);
  return {t.median_ms * 1e3, rotations, replays};
}

nlohmann::json results = nlohmann::json::array();

// ------------------------------------------------------------------------------------------------
// Permutation.

struct PermuteBuffers {
  mc::DeviceBuffer<std::int32_t> ids, counts, offsets, row_token, pair_row;
  mc::DeviceBuffer<float> gates, row_gate;
  mc::DeviceBuffer<std::uint8_t> workspace;
};

PermuteBuffers permute_buffers(const std::vector<std::int32_t>& ids, const std::vector<float>& gates,
                               int E, std::int64_t max_rows, std::size_t workspace) {
  PermuteBuffers b;
  b.ids = mc::DeviceBuffer<std::int32_t>(std::span<const std::int32_t>(ids));
  b.gates = mc::DeviceBuffer<float>(std::span<const float>(gates));
  b.counts = mc::DeviceBuffer<std::int32_t>(static_cast<std::size_t>(E));
  b.offsets = mc::DeviceBuffer<std::int32_t>(static_cast<std::size_t>(E) + 1);
  b.row_token = mc::DeviceBuffer<std::int32_t>(static_cast<std::size_t>(max_rows));
  b.row_gate = mc::DeviceBuffer<float>(static_cast<std::size_t>(max_rows));
  b.pair_row = mc::DeviceBuffer<std::int32_t>(ids.size());
  b.workspace = mc::DeviceBuffer<std::uint8_t>(workspace);
  return b;
}

mc::PermuteArgs permute_args(const PermuteBuffers& b, std::int64_t T, int k, int E, int row_align) {
  mc::PermuteArgs a;
  a.ids = b.ids.data();
  a.gates = b.gates.data();
  a.tokens = T;
  a.top_k = k;
  a.num_experts = E;
  a.row_align = row_align;
  a.counts = b.counts.data();
  a.offsets = b.offsets.data();
  a.row_token = b.row_token.data();
  a.row_gate = b.row_gate.data();
  a.pair_row = b.pair_row.data();
  a.workspace = b.workspace.data();
  return a;
}

template <typename T>
std::size_t count_mismatches(const char* name, const std::vector<T>& got, const std::vector<T>& want) {
  std::size_t bad = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0 && ++bad <= 3) {
      std::printf("    %s[%zu]: device %s, expected %s\n", name, i, std::to_string(got[i]).c_str(),
                  std::to_string(want[i]).c_str());
    }
  }
  return bad;
}

// Runs version v once and compares with the reference plan, padded by row_align. Returns mismatches.
std::size_t validate_permute(int v, const IndexMatrix& ids, const std::vector<float>& gates, int E,
                             int row_align) {
  const Index T = ids.rows();
  const int k = static_cast<int>(ids.cols());
  const std::int64_t max_rows = mc::permute_max_rows(T, k, E, row_align);
  moelab::Dispatch plan;
  moelab::dispatch_plan(plan, ids, IndexMatrix(), E);
  std::vector<std::int32_t> counts(plan.counts.begin(), plan.counts.end());
  std::vector<std::int32_t> offsets(static_cast<std::size_t>(E) + 1, 0);
  for (int e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + (counts[e] + row_align - 1) / row_align * row_align;
  std::vector<std::int32_t> row_token(static_cast<std::size_t>(max_rows), -1);
  std::vector<float> row_gate(static_cast<std::size_t>(max_rows), 0.0f);
  std::vector<std::int32_t> pair_row(static_cast<std::size_t>(T * k));
  for (Index t = 0; t < T; ++t) {
    for (int j = 0; j < k; ++j) {
      const int e = ids(t, j);
      const std::int32_t row = static_cast<std::int32_t>(offsets[e] + (plan.pair_row(t, j) - plan.offsets[e]));
      row_token[static_cast<std::size_t>(row)] = static_cast<std::int32_t>(t);
      row_gate[static_cast<std::size_t>(row)] = gates[static_cast<std::size_t>(t * k + j)];
      pair_row[static_cast<std::size_t>(t * k + j)] = row;
    }
  }
  PermuteBuffers b = permute_buffers(flat(ids), gates, E, max_rows, mc::permute_workspace_bytes(T, k, E, v));
  for (auto* buffer : {&b.counts, &b.offsets, &b.row_token, &b.pair_row}) buffer->poison(0xA5);
  b.row_gate.poison(0xA5);
  b.workspace.poison(0xA5);
  mc::launch_permute(permute_args(b, T, k, E, row_align), v);
  mc::check_cuda(cudaDeviceSynchronize(), "permute kernel");
  return count_mismatches("counts", b.counts.download(), counts) +
         count_mismatches("offsets", b.offsets.download(), offsets) +
         count_mismatches("row_token", b.row_token.download(), row_token) +
         count_mismatches("row_gate", b.row_gate.download(), row_gate) +
         count_mismatches("pair_row", b.pair_row.download(), pair_row);
}

int permute_launches(int version, std::int64_t pairs) {
  return version == 1 || pairs <= 2048 ? 1 : 3;
}

void time_permute(int v, const Shape& s, Routing routing, const IndexMatrix& ids, const std::vector<float>& gates,
                  const Options& opt, std::size_t l2_bytes) {
  const Index T = ids.rows();
  const int k = s.top_k;
  const std::int64_t max_rows = mc::permute_max_rows(T, k, s.experts, opt.row_align);
  const std::int64_t pairs = T * k;
  // Bytes moved: ids and gates read; pair_row, row_token, row_gate, counts, offsets written.
  const double bytes = pairs * 8.0 + pairs * 4.0 + max_rows * 8.0 + (2.0 * s.experts + 1) * 4;
  const std::size_t workspace = mc::permute_workspace_bytes(T, k, s.experts, v);
  const int rotations = mc::rotations_for(bytes + static_cast<double>(workspace), l2_bytes);
  std::vector<PermuteBuffers> sets;
  for (int i = 0; i < rotations; ++i)
    sets.push_back(permute_buffers(flat(ids), gates, s.experts, max_rows, workspace));
  const Measured m = measure(
      [&](cudaStream_t stream, int i) {
        mc::launch_permute(permute_args(sets[static_cast<std::size_t>(i)], T, k, s.experts, opt.row_align), v,
                           stream);
      },
      rotations, opt.iterations);
  const double gbs = bytes / (m.us * 1e-6) / 1e9;
  std::printf("permute_kernel%d  %-14s %-8s T %-6lld %10.2f us %8.1f GB/s  %d launch%s\n", v, s.name,
              routing_name(routing), static_cast<long long>(T), m.us, gbs, permute_launches(v, pairs),
              permute_launches(v, pairs) == 1 ? "" : "es");
  results.push_back({{"kernel", "permute"}, {"version", v}, {"shape", s.name}, {"routing", routing_name(routing)},
                     {"tokens", T}, {"experts", s.experts}, {"top_k", k}, {"row_align", opt.row_align},
                     {"us", m.us}, {"gbs", gbs}, {"launches", permute_launches(v, pairs)},
                     {"rotations", m.rotations}, {"replays", m.replays}});
}

// ------------------------------------------------------------------------------------------------
// Combine: y = sum_j gate_tj expert_out[pair_row[t, j]], bf16 out, pair_row from a uniform plan.
// expert_out holds `sets` rotations of (T k, C) rows; its values repeat a random pool of
// kPool bf16 (element i = pool[i % kPool]): the speed does not depend on the values, and the
// reference can read any element without a copy of gigabytes on the host.

constexpr std::size_t kPool = std::size_t{1} << 24;

struct CombineData {
  const std::vector<mc::Bf16Bits>& pool;  // (kPool), shared by every shape
  std::vector<std::int32_t> pair_row;
  std::vector<float> weight;
};

// Fills n bf16 on the device with pool[i % kPool].
void fill_from_pool(mc::Bf16Bits* dst, std::size_t n, const mc::DeviceBuffer<mc::Bf16Bits>& pool) {
  for (std::size_t done = 0; done < n; done += kPool) {
    const std::size_t count = std::min(kPool, n - done);
    mc::check_cuda(cudaMemcpy(dst + done, pool.data(), count * sizeof(mc::Bf16Bits), cudaMemcpyDeviceToDevice),
                   "cudaMemcpy (fill)");
  }
}

mc::CombineArgs combine_args(const mc::Bf16Bits* expert_out, const std::int32_t* pair_row, const float* weight,
                             mc::Bf16Bits* y, std::int64_t T, const Shape& s) {
  mc::CombineArgs a;
  a.expert_out = expert_out;
  a.pair_row = pair_row;
  a.pair_weight = weight;
  a.y = y;
  a.y_dtype = moelab::Format::bf16;
  a.tokens = T;
  a.hidden_size = s.hidden;
  a.top_k = s.top_k;
  return a;
}

// Compares y (bf16 bits) on up to 256 tokens spread over T with the reference in double: the
// correctly rounded value, or a neighbour where the exact value is within the fp32 error bound
// 2 (k + 2) 2^-24 sum |terms| of a rounding boundary.
std::size_t check_combine(const CombineData& d, const std::vector<mc::Bf16Bits>& y, std::int64_t T, const Shape& s) {
  const auto C = static_cast<std::size_t>(s.hidden);
  const auto k = static_cast<std::size_t>(s.top_k);
  const std::int64_t step = std::max<std::int64_t>(1, T / 256);
  std::size_t bad = 0;
  const auto bf16_of = [](double x) {  // nearest bf16, ties to even, without double rounding
    if (x == 0.0) return mc::Bf16Bits{0};
    const double quantum = std::ldexp(1.0, std::max(std::ilogb(x), -126) - 7);
    const float rounded = static_cast<float>(std::nearbyint(x / quantum) * quantum);
    return static_cast<mc::Bf16Bits>(std::bit_cast<std::uint32_t>(rounded) >> 16);
  };
  const auto value = [](mc::Bf16Bits b) { return static_cast<double>(moelab::decode(b, moelab::Format::bf16)); };
  for (std::int64_t t = 0; t < T; t += step) {
    for (std::size_t c = 0; c < C; ++c) {
      double exact = 0;
      double magnitude = 0;
      for (std::size_t j = 0; j < k; ++j) {
        const std::size_t p = static_cast<std::size_t>(t) * k + j;
        const std::size_t element = static_cast<std::size_t>(d.pair_row[p]) * C + c;
        const double term = d.weight[p] * value(d.pool[element % kPool]);
        exact += term;
        magnitude += std::abs(term);
      }
      const double bound = 2.0 * static_cast<double>(k + 2) * 0x1p-24 * magnitude;
      const mc::Bf16Bits got = y[static_cast<std::size_t>(t) * C + c];
      const bool ok = got == bf16_of(exact) ||
                      (value(bf16_of(exact - bound)) <= value(got) && value(got) <= value(bf16_of(exact + bound)));
      if (!ok && ++bad <= 3) {
        std::printf("    y[%lld, %zu]: device %.8g, expected %.8g (exact %.10g +- %.3g)\n", static_cast<long long>(t),
                    c, value(got), value(bf16_of(exact)), exact, bound);
      }
    }
  }
  return bad;
}

std::vector<mc::Bf16Bits> make_pool(std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> pool(kPool);
  for (float& x : pool) x = normal(rng);
  return mc::to_bf16(pool);
}

CombineData combine_data(const std::vector<mc::Bf16Bits>& pool, std::int64_t T, const Shape& s, std::mt19937_64& rng) {
  CombineData d{pool, {}, {}};
  const IndexMatrix ids = make_ids(T, s.top_k, s.experts, Routing::uniform, rng);
  moelab::Dispatch plan;
  moelab::dispatch_plan(plan, ids, IndexMatrix(), s.experts);
  d.pair_row.assign(plan.pair_row.data(), plan.pair_row.data() + plan.pair_row.size());
  d.weight = make_gates(d.pair_row.size(), rng);
  return d;
}

// Validates every version on set 0, then (iterations > 0) times each. Returns failures.
std::size_t run_combine(const std::vector<mc::Bf16Bits>& host_pool, const Shape& s, std::int64_t T,
                        const Options& opt, std::size_t l2_bytes, std::mt19937_64& rng) {
  if (T == 0) return 0;
  const CombineData d = combine_data(host_pool, T, s, rng);
  const std::size_t rows = d.pair_row.size();
  const auto C = static_cast<std::size_t>(s.hidden);
  const double bytes = static_cast<double>(rows * C * 2 + T * C * 2 + rows * 8);
  const int sets = opt.iterations == 0 ? 1 : mc::rotations_for(bytes, l2_bytes);
  const mc::DeviceBuffer<mc::Bf16Bits> pool{std::span<const mc::Bf16Bits>(d.pool)};
  mc::DeviceBuffer<mc::Bf16Bits> expert_out(static_cast<std::size_t>(sets) * rows * C);
  fill_from_pool(expert_out.data(), expert_out.size(), pool);
  const mc::DeviceBuffer<std::int32_t> pair_row{std::span<const std::int32_t>(d.pair_row)};
  const mc::DeviceBuffer<float> weight{std::span<const float>(d.weight)};
  mc::DeviceBuffer<mc::Bf16Bits> y(static_cast<std::size_t>(sets) * static_cast<std::size_t>(T) * C);

  std::size_t failures = 0;
  for (int v = 1; v <= mc::kCombineVersions; ++v) {
    y.poison(0xFF);
    mc::launch_combine(combine_args(expert_out.data(), pair_row.data(), weight.data(), y.data(), T, s), v);
    mc::check_cuda(cudaDeviceSynchronize(), "combine kernel");
    std::vector<mc::Bf16Bits> got(static_cast<std::size_t>(T) * C);
    mc::check_cuda(cudaMemcpy(got.data(), y.data(), got.size() * 2, cudaMemcpyDeviceToHost), "cudaMemcpy");
    const std::size_t bad = check_combine(d, got, T, s);
    if (bad != 0) {
      std::printf("combine_kernel%d %s T %lld: Failed (%zu wrong)\n", v, s.name, static_cast<long long>(T), bad);
    }
    failures += bad;
  }
  if (failures != 0 || opt.iterations == 0) return failures;

  for (int v = 1; v <= mc::kCombineVersions; ++v) {
    const Measured m = measure(
        [&](cudaStream_t stream, int i) {
          const std::size_t set = static_cast<std::size_t>(i);
          mc::launch_combine(combine_args(expert_out.data() + set * rows * C, pair_row.data(), weight.data(),
                                          y.data() + set * static_cast<std::size_t>(T) * C, T, s),
                             v, stream);
        },
        sets, opt.iterations);
    const double gbs = bytes / (m.us * 1e-6) / 1e9;
    std::printf("combine_kernel%d  %-14s T %-6lld k %d C %-5lld %10.2f us %8.1f GB/s %6.1f%% of peak\n", v, s.name,
                static_cast<long long>(T), s.top_k, static_cast<long long>(s.hidden), m.us, gbs,
                100.0 * gbs / opt.peak_gbs);
    results.push_back({{"kernel", "combine"}, {"version", v}, {"shape", s.name}, {"tokens", T},
                       {"top_k", s.top_k}, {"hidden", s.hidden}, {"y_dtype", "bf16"}, {"us", m.us},
                       {"gbs", gbs}, {"percent_of_peak", 100.0 * gbs / opt.peak_gbs},
                       {"rotations", m.rotations}, {"replays", m.replays}});
  }
  return 0;
}

int run(const Options& opt) {
  const mc::DeviceStatus status = mc::device_status();
  if (!status.available) {
    std::printf("%s\n", status.reason.c_str());
    return 77;
  }
  std::printf("device: %s (sm_%d, %d SMs, L2 %zu MB); row_align %d; seed %llu\n", status.name.c_str(), status.sm,
              status.multiprocessors, status.l2_bytes >> 20, opt.row_align,
              static_cast<unsigned long long>(opt.seed));
  std::mt19937_64 rng(opt.seed);

  // 1. Permutation: validate every version on every (shape, routing, T), then time.
  std::size_t failures = 0;
  std::printf("\npermutation (validated against moelab::dispatch_plan, then median us per call)\n");
  for (const Shape& s : kShapes) {
    for (const Routing routing : kRoutings) {
      for (const std::int64_t T : opt.tokens) {
        const IndexMatrix ids = make_ids(T, s.top_k, s.experts, routing, rng);
        const std::vector<float> gates = make_gates(static_cast<std::size_t>(ids.size()), rng);
        for (int v = 1; v <= mc::kPermuteVersions; ++v) {
          const std::size_t bad = validate_permute(v, ids, gates, s.experts, opt.row_align);
          if (bad != 0) {
            std::printf("permute_kernel%d %s %s T %lld: Failed (%zu wrong elements)\n", v, s.name,
                        routing_name(routing), static_cast<long long>(T), bad);
          }
          failures += bad;
        }
        if (failures == 0 && opt.iterations > 0) {
          for (int v = 1; v <= mc::kPermuteVersions; ++v) time_permute(v, s, routing, ids, gates, opt, status.l2_bytes);
        }
      }
    }
  }
  for (int v = 1; v <= mc::kPermuteVersions; ++v)
    std::printf("permute_kernel%d: %s\n", v, failures == 0 ? "Passed" : "Failed");
  if (failures != 0) return 1;

  // 2. Combine, bf16 out.
  std::printf("\ncombine, bf16 out (validated against the reference in double, then timed; peak %.0f GB/s)\n",
              opt.peak_gbs);
  const std::vector<mc::Bf16Bits> pool = make_pool(rng);
  for (const Shape& s : kShapes)
    for (const std::int64_t T : opt.tokens) failures += run_combine(pool, s, T, opt, status.l2_bytes, rng);
  for (int v = 1; v <= mc::kCombineVersions; ++v)
    std::printf("combine_kernel%d: %s\n", v, failures == 0 ? "Passed" : "Failed");
  if (failures != 0) return 1;

  if (!opt.json.empty()) {
    std::ofstream out(opt.json);
    out << results.dump(2) << "\n";
    if (!out) {
      std::fprintf(stderr, "could not write %s\n", opt.json.c_str());
      return 1;
    }
    std::printf("\nwrote %s\n", opt.json.c_str());
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
