// moelab/tools/bench_cuda.cpp — `moelab bench --impl cuda`: the MoE layer forward of cuda/moe.h at
// the published sizes, against the device's peaks and against cuBLAS (tools/bench.h).
//
// Method (docs/perf.md, "Method"):
//   Peaks, once per run: a dense bf16 GEMM through cuBLAS (8192^3, fp32 accumulation) and a 2 GiB
//   device-to-device copy (bytes read + written), each the median of CUDA-graph replays.
//   Timing: cuda/timing.h — the work is captured in a CUDA graph as `rotations` launches, each on
//   its own x (and, where the layer's weights fit twice in L2, its own copy of the layer), so that
//   the graph touches more than twice the L2 and every launch reads from DRAM; median of replays.
//   Work per forward: useful flops = 2 T k 3 C H (the routed experts' three GEMMs; the shared
//   experts' 2 T 3 C S Hs and the router's 2 T C E are counted apart, and in the roofline);
//   bytes = the least DRAM traffic: the weights of the experts the routing actually touched (the
//   counts are read back once, outside the timing; mean over the rotations) + shared experts +
//   router + x + y (intermediates are not counted: a fused layer keeps them on chip).
//   Roofline time = max(bytes / copy rate, flops / GEMM rate); % roofline = roofline time / time.
//   Routing: uniform = random tokens (near-uniform load); skewed = every token shares one random
//   direction u, x = (z + s u) / sqrt(1 + s^2), with s found by bisection so that the busiest
//   eighth of the experts receive half of the pairs (or 4/5 of the most a top-k can give them,
//   where that is less: Mixtral's busiest expert of 8 gets 40% of the pairs, 80% of the tokens).
//   Baselines (cuda/baselines.h): our router and permutation, then the experts with cuBLAS (a
//   per-expert loop of cublasGemmEx, or cublasGemmGroupedBatchedEx) and our combine. They route
//   with router weights of their own, drawn as the layer's are (cuda/moe.h does not expose the
//   layer's router), with their own skew calibrated to the same target. "experts" rows time the
//   GEMMs + SwiGLU alone on the baselines' routing (cuBLAS's input already gathered: the gather
//   is counted in the layer rows; ours gathers inside its loads), and are checked against each
//   other before they are timed.
#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <functional>
#include <memory>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "cuda/baselines.h"
#include "cuda/combine.h"
#include "cuda/device.h"
#include "cuda/expert_gemm.h"
#include "cuda/moe.h"
#include "cuda/permute.h"
#include "cuda/router.h"
#include "cuda/timing.h"
#include "reference/error.h"
#include "tools/bench.h"

#ifndef MOELAB_VERSION
#define MOELAB_VERSION "0.0.0"
#endif

namespace moelab::tools {
namespace {

using json = nlohmann::ordered_json;
using cuda::Bf16Bits;
template <typename T>
using Buffer = cuda::DeviceBuffer<T>;
using Launch = std::function<void(cudaStream_t, int)>;

constexpr double kRowBudgetMs = 3000;     // replays are cut so that one measurement takes about this long
constexpr double kSlowForwardMs = 1000;   // a version combination slower than this per forward is not timed
constexpr Index kCalibrationTokens = 4096;  // tokens routed to calibrate the skew
constexpr double kCheckTolerance = 2e-2;  // relative L2 error allowed between our experts and cuBLAS's
constexpr std::int64_t kPeakGemmSize = 8192;
constexpr std::size_t kPeakCopyBytes = std::size_t{2} << 30;

// ---- small helpers ------------------------------------------------------------------------------

std::uint64_t mix(std::uint64_t a, std::uint64_t b) {  // SplitMix64 of a combined with b
  std::uint64_t z = a ^ (b + 0x9E3779B97F4A7C15ull + (a << 6) + (a >> 2));
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::string utc_now() {
  const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  gmtime_r(&now, &tm);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return text;
}

std::string versions_label(const cuda::MoeVersions& v, int gemm) {
  return fmt::format("r{} p{} g{} c{}", v.router, v.permute, gemm, v.combine);
}

// A stream of our own for the eager launches (the graphs bring their own).
struct Stream {
  cudaStream_t s = nullptr;
  Stream() { cuda::check_cuda(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"); }
  ~Stream() { cudaStreamDestroy(s); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
};

struct Events {
  cudaEvent_t start = nullptr, stop = nullptr;
  Events() {
    cuda::check_cuda(cudaEventCreate(&start), "cudaEventCreate");
    cuda::check_cuda(cudaEventCreate(&stop), "cudaEventCreate");
  }
  ~Events() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  Events(const Events&) = delete;
  Events& operator=(const Events&) = delete;
  double ms() const {
    float elapsed = 0;
    cuda::check_cuda(cudaEventSynchronize(stop), "cudaEventSynchronize");
    cuda::check_cuda(cudaEventElapsedTime(&elapsed, start, stop), "cudaEventElapsedTime");
    return elapsed;
  }
};

// ---- what is measured ---------------------------------------------------------------------------

struct Peaks {
  double flops_per_s = 0;  // dense bf16 GEMM
  double bytes_per_s = 0;  // device-to-device copy, read + written
};

// What one forward does, for the rates and the roofline.
struct Work {
  double routed_flops = 0;  // 2 T k 3 C H: the routed experts' GEMMs ("useful")
  double shared_flops = 0;  // 2 T 3 C S Hs
  double router_flops = 0;  // 2 T C E
  double bytes = 0;         // least DRAM traffic (see the top of this file)
  double flops() const { return routed_flops + shared_flops + router_flops; }
};

// The routing of the measured forwards, from their per-expert counts.
struct Load {
  double distinct = 0;       // experts with at least one row, mean over the rotations
  double max_over_mean = 0;  // the busiest expert's rows / the mean, worst rotation
};

Load load_of(const std::vector<std::vector<std::int32_t>>& counts) {
  Load load;
  for (const std::vector<std::int32_t>& c : counts) {
    const double total = std::accumulate(c.begin(), c.end(), 0.0);
    const double busiest = c.empty() ? 0 : *std::max_element(c.begin(), c.end());
    load.distinct += static_cast<double>(std::count_if(c.begin(), c.end(), [](std::int32_t n) { return n > 0; }));
    if (total > 0) load.max_over_mean = std::max(load.max_over_mean, busiest / (total / static_cast<double>(c.size())));
  }
  if (!counts.empty()) load.distinct /= static_cast<double>(counts.size());
  return load;
}

struct Measured {
  cuda::Timing timing;
  std::string skipped;  // why not timed ("" = timed)
  std::string note;     // how, where it is not the usual graph replay
  bool timed() const { return skipped.empty(); }
};

struct Row {
  std::string impl;      // "ours", "cuBLAS loop", ...
  std::string scope;     // "layer" or "experts"
  std::string versions;  // ours: "r3 p2 g3 c2"
  int rotations = 1;
  Work work;
  Load load;
  Measured m;
};

// Times `launch` over `rotations` buffer sets: first one eager launch of rotation 0 between
// events (the estimate; and a launch outside any capture, so that libraries load their kernels),
// skipped if slower than max_ms; then CUDA-graph replays (cuda/timing.h), as many as fit in
// kRowBudgetMs, at most `replays`. Where the work cannot be captured, eager launches between
// events instead, said in the note.
Measured measure(const Launch& launch, int rotations, int replays, cudaStream_t stream, double max_ms = 1e30) {
  Measured m;
  double once_ms = 0;
  try {
    Events ev;
    cuda::check_cuda(cudaEventRecord(ev.start, stream), "cudaEventRecord");
    launch(stream, 0);
    cuda::check_cuda(cudaEventRecord(ev.stop, stream), "cudaEventRecord");
    once_ms = ev.ms();
  } catch (const Error& e) {
    cudaGetLastError();
    m.skipped = e.what();
    return m;
  }
  if (once_ms > max_ms) {
    m.skipped = fmt::format("one forward took {:.0f} ms (> {:.0f} ms)", once_ms, max_ms);
    return m;
  }
  const double per_replay = std::max(once_ms, 1e-3) * rotations;
  const int n = std::clamp(static_cast<int>(kRowBudgetMs / per_replay), std::min(3, replays), replays);
  try {
    m.timing = cuda::time_graph(launch, rotations, n);
    return m;
  } catch (const Error& e) {
    cudaGetLastError();
    m.note = fmt::format("eager launches: graph capture failed ({})", e.what());
  }
  std::vector<double> ms;
  Events ev;
  for (int i = 0; i < n; ++i) {
    cuda::check_cuda(cudaEventRecord(ev.start, stream), "cudaEventRecord");
    for (int r = 0; r < rotations; ++r) launch(stream, r);
    cuda::check_cuda(cudaEventRecord(ev.stop, stream), "cudaEventRecord");
    ms.push_back(ev.ms() / rotations);
  }
  std::sort(ms.begin(), ms.end());
  m.timing = {.median_ms = ms[ms.size() / 2], .min_ms = ms.front(), .max_ms = ms.back(), .replays = n};
  return m;
}

// ---- output -------------------------------------------------------------------------------------

struct Derived {
  double us = 0, routed_tflops = 0, all_tflops = 0, gbps = 0, roofline_us = 0, efficiency = 0;
};

Derived derive(const Row& r, const Peaks& p) {
  Derived d;
  if (!r.m.timed()) return d;
  const double s = r.m.timing.median_ms * 1e-3;
  d.us = s * 1e6;
  d.routed_tflops = r.work.routed_flops / s * 1e-12;
  d.all_tflops = r.work.flops() / s * 1e-12;
  d.gbps = r.work.bytes / s * 1e-9;
  const double roofline_s = std::max(r.work.bytes / p.bytes_per_s, r.work.flops() / p.flops_per_s);
  d.roofline_us = roofline_s * 1e6;
  d.efficiency = roofline_s / s;
  return d;
}

void print_header() {
  fmt::print("{:>6}  {:<30} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}\n", "T", "impl", "us", "TFLOP/s", "(all)", "GB/s",
             "roofline", "experts", "max/mean");
}

void print_row(Index tokens, const Row& r, const Peaks& p) {
  std::string name = fmt::format("{} {}", r.impl, r.scope);
  if (!r.versions.empty()) name += " " + r.versions;
  if (!r.m.timed()) {
    fmt::print("{:>6}  {:<30} skipped: {}\n", tokens, name, r.m.skipped);
  } else {
    const Derived d = derive(r, p);
    fmt::print("{:>6}  {:<30} {:>10.1f} {:>8.1f} {:>8.1f} {:>8.0f} {:>7.1f}% {:>8.1f} {:>8.2f}\n", tokens, name, d.us,
               d.routed_tflops, d.all_tflops, d.gbps, 100 * d.efficiency, r.load.distinct, r.load.max_over_mean);
    if (!r.m.note.empty()) fmt::print("{:>6}  {:<30} note: {}\n", "", "", r.m.note);
  }
  std::fflush(stdout);
}

json row_json(const Row& r, const Peaks& p) {
  const Derived d = derive(r, p);
  json j = {{"impl", r.impl}, {"scope", r.scope}, {"versions", r.versions}, {"rotations", r.rotations}};
  j["work"] = {{"routed_flops", r.work.routed_flops},
               {"shared_flops", r.work.shared_flops},
               {"router_flops", r.work.router_flops},
               {"bytes", r.work.bytes}};
  j["load"] = {{"distinct_experts", r.load.distinct}, {"max_over_mean", r.load.max_over_mean}};
  if (!r.m.timed()) {
    j["skipped"] = r.m.skipped;
    return j;
  }
  j["timing"] = {{"median_us", d.us},
                 {"min_us", r.m.timing.min_ms * 1e3},
                 {"max_us", r.m.timing.max_ms * 1e3},
                 {"replays", r.m.timing.replays}};
  if (!r.m.note.empty()) j["note"] = r.m.note;
  j["tflops_routed"] = d.routed_tflops;
  j["tflops_all"] = d.all_tflops;
  j["gbps"] = d.gbps;
  j["roofline_us"] = d.roofline_us;
  j["efficiency"] = d.efficiency;
  return j;
}

// ---- one shape ----------------------------------------------------------------------------------

// The sizes of one layer, and the work of a forward from them.
struct Sizes {
  Index C = 0, E = 0, H = 0, shared_width = 0;
  int k = 1;
  bool gate_on_input = false;
  double expert_bytes = 0, shared_bytes = 0, router_bytes = 0;

  explicit Sizes(const LayerConfig& c)
      : C(c.hidden_size()),
        E(c.num_experts()),
        H(c.expert.intermediate_size),
        shared_width(c.shared.count * c.shared.intermediate_size),
        k(c.routing.top_k),
        gate_on_input(c.gate_placement == GatePlacement::input) {
    expert_bytes = 3.0 * static_cast<double>(C * H) * 2;
    shared_bytes = 3.0 * static_cast<double>(C * shared_width) * 2 + (c.shared.gated ? 2.0 * C : 0.0);
    router_bytes = static_cast<double>(E * C) * (c.routing.router.dtype == Format::bf16 ? 2 : 4) +
                   (c.routing.router.use_bias ? 4.0 * E : 0.0) + (c.routing.use_selection_bias ? 4.0 * E : 0.0);
  }
  Work layer(Index T, double distinct) const {
    const auto t = static_cast<double>(T);
    return {.routed_flops = 2 * t * k * 3 * static_cast<double>(C * H),
            .shared_flops = 2 * t * 3 * static_cast<double>(C * shared_width),
            .router_flops = 2 * t * static_cast<double>(C * E),
            .bytes = distinct * expert_bytes + shared_bytes + router_bytes + 2 * t * static_cast<double>(C) * 2};
  }
  Work experts(Index T, double distinct) const {  // x read, expert_out written
    const auto t = static_cast<double>(T);
    return {.routed_flops = 2 * t * k * 3 * static_cast<double>(C * H),
            .shared_flops = 0,
            .router_flops = 0,
            .bytes = distinct * expert_bytes + t * static_cast<double>(C) * 2 + t * k * static_cast<double>(C) * 2};
  }
};

// The busiest eighth of the experts (at least one) should get this share of the pairs.
double skew_target(const Sizes& s) {
  const double busiest = std::max<double>(1, std::ceil(static_cast<double>(s.E) / 8));
  return std::min(0.5, 0.8 * busiest / s.k);
}

double busiest_share(std::vector<std::int32_t> counts, Index E) {
  const auto busiest = static_cast<std::size_t>(std::max<double>(1, std::ceil(static_cast<double>(E) / 8)));
  std::sort(counts.begin(), counts.end(), std::greater<>());
  const double total = std::accumulate(counts.begin(), counts.end(), 0.0);
  return total > 0 ? std::accumulate(counts.begin(), counts.begin() + static_cast<std::ptrdiff_t>(busiest), 0.0) / total
                   : 0;
}

// The skew s (fill_tokens) at which counts_for(s) gives the busiest eighth `target` of the pairs:
// doubling, then bisection (the share grows with s). Caps at s = 64.
struct Skew {
  double s = 0, share = 0, max_over_mean = 0;
};
Skew calibrate_skew(const std::function<std::vector<std::int32_t>(float)>& counts_for, const Sizes& sizes) {
  const double target = skew_target(sizes);
  const auto evaluate = [&](double s) {
    const std::vector<std::int32_t> counts = counts_for(static_cast<float>(s));
    return Skew{.s = s, .share = busiest_share(counts, sizes.E), .max_over_mean = load_of({counts}).max_over_mean};
  };
  double lo = 0;
  Skew hi = evaluate(1);
  while (hi.share < target && hi.s < 64) {
    lo = hi.s;
    hi = evaluate(2 * hi.s);
  }
  if (hi.share < target) return hi;
  for (int i = 0; i < 12; ++i) {
    const Skew mid = evaluate((lo + hi.s) / 2);
    if (mid.share < target) {
      lo = mid.s;
    } else {
      hi = mid;
    }
  }
  return hi;
}

// Weights of the baselines' own: the router (cuda/moe.h keeps the layer's private) and the shared
// experts, drawn as MoeLayer::random draws them; the routed experts are the layer's.
struct BaselineWeights {
  Buffer<float> router_f32, router_bias, selection_bias;
  Buffer<Bf16Bits> router_bf16, shared_gate_up, shared_down, shared_gate;
};

// One rotation's buffers of the baselines: inputs, routing, cuBLAS's intermediates, outputs.
struct BaselineSet {
  Buffer<Bf16Bits> x, y;
  Buffer<float> logits, gates, row_gate, shared_gate;
  Buffer<std::int32_t> ids, counts, offsets, row_token, pair_row;
  Buffer<std::uint8_t> workspace;
  Buffer<Bf16Bits> xp, gate_up, hidden, out, out_ours;
  Buffer<Bf16Bits> shared_gate_up, shared_hidden, shared_out;
  std::vector<std::int32_t> counts_host;
  cuda::ExpertsProblem experts, shared;
  std::unique_ptr<cuda::GroupedExperts> grouped;
};

class ShapeBench {
 public:
  ShapeBench(const BenchShape& shape, const CudaBenchOptions& o, const Peaks& peaks, const cuda::DeviceStatus& device,
             cuda::Cublas& blas)
      : shape_(shape), o_(o), peaks_(peaks), device_(device), blas_(blas), sizes_(shape.config) {
    max_tokens_ = *std::max_element(o.tokens.begin(), o.tokens.end());
    if (o.skewed) max_tokens_ = std::max(max_tokens_, kCalibrationTokens);
    layers_.push_back(cuda::MoeLayer::random(shape.config, max_tokens_, o.seed));
    direction_seed_ = mix(o.seed, 0xD1EC7);
  }

  json run() {
    const LayerConfig& c = shape_.config;
    fmt::print("\n{} = {} ({}): C {}, {} experts of H {}, top-{}", shape_.name, shape_.preset->name,
               shape_.preset->model, sizes_.C, sizes_.E, sizes_.H, sizes_.k);
    if (c.shared.count > 0)
      fmt::print(", {} shared of {}{}", c.shared.count, c.shared.intermediate_size, c.shared.gated ? " (gated)" : "");
    fmt::print("; router {} {}; weights {:.2f} GB\n", format_name(c.routing.router.dtype), scoring_name(c.routing.scoring),
               static_cast<double>(layers_[0].weight_bytes()) * 1e-9);
    json doc = {{"name", shape_.name}, {"preset", shape_.preset->name}, {"model", shape_.preset->model}};
    doc["config"] = {{"hidden_size", sizes_.C},
                     {"num_experts", sizes_.E},
                     {"top_k", sizes_.k},
                     {"intermediate_size", sizes_.H},
                     {"shared_experts", c.shared.count},
                     {"shared_intermediate_size", c.shared.intermediate_size},
                     {"shared_gated", c.shared.gated},
                     {"router_dtype", format_name(c.routing.router.dtype)},
                     {"scoring", scoring_name(c.routing.scoring)},
                     {"gate_placement", gate_placement_name(c.gate_placement)}};
    doc["weight_bytes"] = layers_[0].weight_bytes();
    if (o_.skewed) doc["skew"] = calibrate_ours();
    if (o_.baselines) prepare_baselines(doc);
    print_header();
    json results = json::array();
    for (const Index T : o_.tokens) results.push_back(run_tokens(T));
    doc["instances"] = layers_.size();
    doc["results"] = std::move(results);
    return doc;
  }

  bool checks_passed() const { return checks_passed_; }

 private:
  cuda::MoeLayer& layer(int rotation) { return layers_[static_cast<std::size_t>(rotation) % layers_.size()]; }
  std::uint64_t token_seed(Index T, int rotation) const {
    return mix(mix(o_.seed, static_cast<std::uint64_t>(T)), static_cast<std::uint64_t>(rotation) + 1);
  }

  json skew_json(const Skew& s) const {
    return {{"s", s.s}, {"busiest_share", s.share}, {"target_share", skew_target(sizes_)},
            {"max_over_mean", s.max_over_mean}, {"calibration_tokens", kCalibrationTokens}};
  }

  void print_skew(const char* who, const Skew& s) const {
    fmt::print("routing skewed ({}): s = {:.3g}: the busiest {} of {} experts get {:.0f}% of the pairs (target {:.0f}%), "
               "max/mean {:.2f}, at T = {}\n",
               who, s.s, std::max<Index>(1, (sizes_.E + 7) / 8), sizes_.E, 100 * s.share, 100 * skew_target(sizes_),
               s.max_over_mean, kCalibrationTokens);
  }

  json calibrate_ours() {
    Buffer<Bf16Bits> x(static_cast<std::size_t>(kCalibrationTokens * sizes_.C)), y(x.size());
    const Skew s = calibrate_skew(
        [&](float skew) {
          cuda::fill_tokens(x.data(), kCalibrationTokens, sizes_.C, mix(o_.seed, 0xCA1), skew, direction_seed_);
          layers_[0].forward(y.data(), Format::bf16, x.data(), kCalibrationTokens);
          cuda::check_cuda(cudaDeviceSynchronize(), "MoeLayer::forward (calibration)");
          return layers_[0].intermediates().counts.download();
        },
        sizes_);
    skew_ = static_cast<float>(s.s);
    print_skew("ours", s);
    return skew_json(s);
  }

  // ---- our layer ----

  json run_tokens(Index T) {
    const auto n = static_cast<std::size_t>(T * sizes_.C);
    // Rotations: from the bytes one forward touches (rotation 0's routing).
    std::vector<Buffer<Bf16Bits>> x, y;
    x.emplace_back(n);
    y.emplace_back(n);
    cuda::fill_tokens(x[0].data(), T, sizes_.C, token_seed(T, 0), skew_, direction_seed_);
    layers_[0].forward(y[0].data(), Format::bf16, x[0].data(), T);
    cuda::check_cuda(cudaDeviceSynchronize(), "MoeLayer::forward");
    const double touched = sizes_.layer(T, load_of({layers_[0].intermediates().counts.download()}).distinct).bytes;
    const int rotations = cuda::rotations_for(touched, device_.l2_bytes);
    if (static_cast<double>(layers_[0].weight_bytes()) < 2.0 * static_cast<double>(device_.l2_bytes))
      while (layers_.size() < static_cast<std::size_t>(rotations))
        layers_.push_back(cuda::MoeLayer::random(shape_.config, max_tokens_, o_.seed));
    std::vector<std::vector<std::int32_t>> counts;
    for (int r = 0; r < rotations; ++r) {
      if (r > 0) {
        x.emplace_back(n);
        y.emplace_back(n);
        cuda::fill_tokens(x[r].data(), T, sizes_.C, token_seed(T, r), skew_, direction_seed_);
      }
      layer(r).forward(y[r].data(), Format::bf16, x[r].data(), T);
      cuda::check_cuda(cudaDeviceSynchronize(), "MoeLayer::forward");
      counts.push_back(layer(r).intermediates().counts.download());
    }
    const Load load = load_of(counts);
    json checks = json::array();
    const cuda::Bf16Diff y_stats = cuda::compare_bf16(y[0].data(), nullptr, n);
    checks.push_back(check_json("ours layer: y finite", y_stats, y_stats.nonfinite == 0 && y_stats.max_abs_diff > 0));

    std::vector<Row> rows;
    const auto ours = [&](cudaStream_t s, int r) { layer(r).forward(y[r].data(), Format::bf16, x[r].data(), T, s); };
    Row ours_row{.impl = "ours",
                 .scope = "layer",
                 .versions = versions_label(layers_[0].versions, layers_[0].gemm_version()),
                 .rotations = rotations,
                 .work = sizes_.layer(T, load.distinct),
                 .load = load,
                 .m = measure(ours, rotations, o_.replays, stream_.s)};
    print_row(T, ours_row, peaks_);
    rows.push_back(ours_row);
    if (o_.versions) time_versions(T, rotations, ours, load, rows);

    json ratios = json::object();
    if (o_.baselines) run_baselines(T, rotations, rows, checks, ratios, ours_row);

    json rows_json = json::array();
    for (const Row& r : rows) rows_json.push_back(row_json(r, peaks_));
    return {{"tokens", T}, {"rotations", rotations}, {"rows", rows_json}, {"ratios", ratios}, {"checks", checks}};
  }

  // The ladders at layer level: v1 everywhere, then one stage off the defaults at a time.
  void time_versions(Index T, int rotations, const Launch& ours, const Load& load, std::vector<Row>& rows) {
    const cuda::MoeVersions defaults;
    struct Combo {
      const char* name;
      cuda::MoeVersions v;
    };
    const Combo combos[] = {{"all v1", {1, 1, 1, 1}},
                            {"router v1", {1, defaults.permute, defaults.gemm, defaults.combine}},
                            {"router v2", {2, defaults.permute, defaults.gemm, defaults.combine}},
                            {"permute v1", {defaults.router, 1, defaults.gemm, defaults.combine}},
                            {"gemm v1", {defaults.router, defaults.permute, 1, defaults.combine}},
                            {"gemm v2", {defaults.router, defaults.permute, 2, defaults.combine}},
                            {"gemm v3", {defaults.router, defaults.permute, 3, defaults.combine}},
                            {"combine v1", {defaults.router, defaults.permute, defaults.gemm, 1}}};
    const int default_gemm = layers_[0].gemm_version();
    for (const Combo& combo : combos) {
      for (cuda::MoeLayer& l : layers_) l.versions = combo.v;
      const int gemm = layers_[0].gemm_version();
      const bool same_as_default = combo.v.router == defaults.router && combo.v.permute == defaults.permute &&
                                   gemm == default_gemm && combo.v.combine == defaults.combine;
      if (same_as_default) continue;  // the "ours" row
      Row row{.impl = "ours",
              .scope = "layer",
              .versions = versions_label(combo.v, gemm),
              .rotations = rotations,
              .work = sizes_.layer(T, load.distinct),
              .load = load,
              .m = {}};
      if (too_slow_.contains(combo.name)) {
        row.m.skipped = "slower than 1 s per forward at an earlier T";
      } else {
        row.m = measure(ours, rotations, o_.replays, stream_.s, kSlowForwardMs);
        if (row.m.skipped.starts_with("one forward took")) too_slow_.insert(combo.name);
      }
      print_row(T, row, peaks_);
      rows.push_back(row);
    }
    for (cuda::MoeLayer& l : layers_) l.versions = defaults;
  }

  // ---- the cuBLAS baselines ----

  void prepare_baselines(json& doc) {
    const LayerConfig& c = shape_.config;
    const auto EC = static_cast<std::size_t>(sizes_.E * sizes_.C);
    const std::uint64_t seed = mix(o_.seed, 0xBA5E);
    if (c.routing.router.dtype == Format::bf16) {
      weights_.router_bf16 = Buffer<Bf16Bits>(EC);
      cuda::fill_uniform(weights_.router_bf16.data(), EC, sizes_.C, mix(seed, 1));
    } else {
      weights_.router_f32 = Buffer<float>(EC);
      cuda::fill_uniform(weights_.router_f32.data(), EC, sizes_.C, mix(seed, 1));
    }
    const auto zeros = [](Buffer<float>& b, std::size_t count) {
      b = Buffer<float>(count);
      cuda::check_cuda(cudaMemset(b.data(), 0, b.bytes()), "cudaMemset");
    };
    if (c.routing.router.use_bias) zeros(weights_.router_bias, static_cast<std::size_t>(sizes_.E));
    if (c.routing.use_selection_bias) zeros(weights_.selection_bias, static_cast<std::size_t>(sizes_.E));
    if (sizes_.shared_width > 0) {
      const auto n = static_cast<std::size_t>(sizes_.C * sizes_.shared_width);
      weights_.shared_gate_up = Buffer<Bf16Bits>(2 * n);
      cuda::fill_uniform(weights_.shared_gate_up.data(), 2 * n, sizes_.C, mix(seed, 2));
      weights_.shared_down = Buffer<Bf16Bits>(n);
      cuda::fill_uniform(weights_.shared_down.data(), n, c.shared.intermediate_size, mix(seed, 3));
      if (c.shared.gated) {
        weights_.shared_gate = Buffer<Bf16Bits>(static_cast<std::size_t>(sizes_.C));
        cuda::fill_uniform(weights_.shared_gate.data(), static_cast<std::size_t>(sizes_.C), sizes_.C, mix(seed, 4));
      }
    }
    cuda::check_cuda(cudaDeviceSynchronize(), "baseline weights");
    if (o_.skewed) {
      BaselineSet set = make_set(kCalibrationTokens);
      const Skew s = calibrate_skew(
          [&](float skew) {
            cuda::fill_tokens(set.x.data(), kCalibrationTokens, sizes_.C, mix(o_.seed, 0xCA1), skew, direction_seed_);
            route(set, kCalibrationTokens, nullptr);
            return set.counts.download();
          },
          sizes_);
      baseline_skew_ = static_cast<float>(s.s);
      print_skew("cuBLAS baselines, their own router", s);
      doc["baseline_skew"] = skew_json(s);
    }
    if (const std::string why = cuda::GroupedExperts::unsupported(); !why.empty()) {
      grouped_unsupported_ = why;
      fmt::print("cuBLAS grouped GEMM: not supported: {}\n", why);
    }
  }

  BaselineSet make_set(Index T) const {
    const auto t = static_cast<std::size_t>(T), C = static_cast<std::size_t>(sizes_.C),
               H = static_cast<std::size_t>(sizes_.H), E = static_cast<std::size_t>(sizes_.E),
               k = static_cast<std::size_t>(sizes_.k), S = static_cast<std::size_t>(sizes_.shared_width);
    const std::size_t rows = static_cast<std::size_t>(cuda::permute_max_rows(T, sizes_.k, static_cast<int>(E), 1));
    const cuda::MoeVersions v;
    BaselineSet b;
    b.x = Buffer<Bf16Bits>(t * C);
    b.y = Buffer<Bf16Bits>(t * C);
    b.logits = Buffer<float>(t * E);
    b.gates = Buffer<float>(t * k);
    b.ids = Buffer<std::int32_t>(t * k);
    b.counts = Buffer<std::int32_t>(E);
    b.offsets = Buffer<std::int32_t>(E + 1);
    b.row_token = Buffer<std::int32_t>(rows);
    b.row_gate = Buffer<float>(rows);
    b.pair_row = Buffer<std::int32_t>(t * k);
    b.workspace = Buffer<std::uint8_t>(cuda::permute_workspace_bytes(T, sizes_.k, static_cast<int>(E), v.permute));
    b.xp = Buffer<Bf16Bits>(rows * C);
    b.gate_up = Buffer<Bf16Bits>(rows * 2 * H);
    b.hidden = Buffer<Bf16Bits>(rows * H);
    b.out = Buffer<Bf16Bits>(rows * C);
    b.out_ours = Buffer<Bf16Bits>(rows * C);
    if (S > 0) {
      b.shared_gate_up = Buffer<Bf16Bits>(t * 2 * S);
      b.shared_hidden = Buffer<Bf16Bits>(t * S);
      b.shared_out = Buffer<Bf16Bits>(t * C);
      if (shape_.config.shared.gated) b.shared_gate = Buffer<float>(t);
    }
    return b;
  }

  // Our router and permutation, on the baselines' own router weights.
  void route(BaselineSet& b, Index T, cudaStream_t stream) const {
    const LayerConfig& c = shape_.config;
    const cuda::MoeVersions v;
    const void* weight = c.routing.router.dtype == Format::bf16 ? static_cast<const void*>(weights_.router_bf16.data())
                                                                : static_cast<const void*>(weights_.router_f32.data());
    cuda::launch_router({.x = b.x.data(),
                         .x_dtype = Format::bf16,
                         .weight = weight,
                         .bias = weights_.router_bias.data(),
                         .selection_bias = weights_.selection_bias.data(),
                         .logits = b.logits.data(),
                         .ids = b.ids.data(),
                         .gates = b.gates.data(),
                         .tokens = T},
                        c.routing, v.router, stream);
    cuda::launch_permute({.ids = b.ids.data(),
                          .gates = b.gates.data(),
                          .tokens = T,
                          .top_k = sizes_.k,
                          .num_experts = static_cast<int>(sizes_.E),
                          .row_align = 1,
                          .counts = b.counts.data(),
                          .offsets = b.offsets.data(),
                          .row_token = b.row_token.data(),
                          .row_gate = b.row_gate.data(),
                          .pair_row = b.pair_row.data(),
                          .workspace = b.workspace.size() > 0 ? b.workspace.data() : nullptr},
                         v.permute, stream);
  }

  // Our expert GEMMs on the baselines' routing: the comparison for cuBLAS's expert part.
  void ours_experts(BaselineSet& b, int rotation, Index T, cudaStream_t stream) {
    const std::int64_t rows = cuda::permute_max_rows(T, sizes_.k, static_cast<int>(sizes_.E), 1);
    const int gemm = layers_[0].gemm_version();
    cuda::launch_gate_up({.x = b.x.data(),
                          .row_token = b.row_token.data(),
                          .offsets = b.offsets.data(),
                          .row_scale = sizes_.gate_on_input ? b.row_gate.data() : nullptr,
                          .w_gate_up = layer(rotation).w_gate_up(),
                          .hidden = b.hidden.data(),
                          .tokens = T,
                          .rows = rows,
                          .hidden_size = sizes_.C,
                          .intermediate_size = sizes_.H,
                          .num_experts = static_cast<int>(sizes_.E)},
                         gemm, stream);
    cuda::launch_down({.hidden = b.hidden.data(),
                       .row_token = b.row_token.data(),
                       .offsets = b.offsets.data(),
                       .row_scale = nullptr,
                       .w_down = layer(rotation).w_down(),
                       .out = b.out_ours.data(),
                       .rows = rows,
                       .hidden_size = sizes_.C,
                       .intermediate_size = sizes_.H,
                       .num_experts = static_cast<int>(sizes_.E)},
                      gemm, stream);
  }

  // The whole layer with cuBLAS experts: route, gather, experts, shared experts, combine.
  void cublas_layer(BaselineSet& b, Index T, bool grouped, cudaStream_t stream) {
    const cuda::MoeVersions v;
    route(b, T, stream);
    cuda::launch_gather_rows(b.xp.data(), b.x.data(), b.row_token.data(), b.experts.rows(), sizes_.C, stream);
    if (grouped) {
      b.grouped->launch(blas_, stream);
    } else {
      cuda::launch_experts_loop(blas_, b.experts, stream);
    }
    if (sizes_.shared_width > 0) {
      cuda::launch_experts_loop(blas_, b.shared, stream);
      if (shape_.config.shared.gated)
        cuda::launch_shared_gate(b.shared_gate.data(), b.x.data(), weights_.shared_gate.data(), T, sizes_.C, stream);
    }
    cuda::launch_combine({.expert_out = b.out.data(),
                          .pair_row = b.pair_row.data(),
                          .pair_weight = sizes_.gate_on_input ? nullptr : b.gates.data(),
                          .shared_out = sizes_.shared_width > 0 ? b.shared_out.data() : nullptr,
                          .shared_gate = b.shared_gate.size() > 0 ? b.shared_gate.data() : nullptr,
                          .y = b.y.data(),
                          .y_dtype = Format::bf16,
                          .tokens = T,
                          .hidden_size = sizes_.C,
                          .top_k = sizes_.k},
                         v.combine, stream);
  }

  json check_json(const std::string& what, const cuda::Bf16Diff& d, bool passed) {
    if (!passed) checks_passed_ = false;
    fmt::print("{:>6}  check {}: rel. L2 {:.2e}, max |diff| {:.3g} of max |ref| {:.3g}, {} non-finite: {}\n", "", what,
               d.rel_l2, d.max_abs_diff, d.max_abs_ref, d.nonfinite, passed ? "ok" : "FAILED");
    return {{"what", what},          {"rel_l2", d.rel_l2},         {"max_abs_diff", d.max_abs_diff},
            {"max_abs_ref", d.max_abs_ref}, {"nonfinite", d.nonfinite}, {"passed", passed}};
  }

  json compare_experts(const std::string& what, const BaselineSet& b) {
    const cuda::Bf16Diff d =
        cuda::compare_bf16(b.out.data(), b.out_ours.data(), static_cast<std::size_t>(b.experts.rows() * sizes_.C));
    return check_json(what, d, d.nonfinite == 0 && d.rel_l2 <= kCheckTolerance);
  }

  void run_baselines(Index T, int rotations, std::vector<Row>& rows, json& checks, json& ratios, const Row& ours_layer) {
    std::vector<BaselineSet> sets;
    std::vector<std::vector<std::int32_t>> counts;
    std::string grouped_error = grouped_unsupported_;
    for (int r = 0; r < rotations; ++r) {
      BaselineSet b = make_set(T);
      cuda::fill_tokens(b.x.data(), T, sizes_.C, token_seed(T, r), baseline_skew_, direction_seed_);
      route(b, T, nullptr);
      b.counts_host = b.counts.download();
      counts.push_back(b.counts_host);
      const std::vector<std::int32_t> offsets = b.offsets.download();
      b.experts = {.xp = b.xp.data(),
                   .w_gate_up = layer(r).w_gate_up(),
                   .w_down = layer(r).w_down(),
                   .row_scale = sizes_.gate_on_input ? b.row_gate.data() : nullptr,
                   .gate_up = b.gate_up.data(),
                   .hidden = b.hidden.data(),
                   .out = b.out.data(),
                   .offsets = {offsets.begin(), offsets.end()},
                   .hidden_size = sizes_.C,
                   .intermediate_size = sizes_.H};
      cuda::launch_gather_rows(b.xp.data(), b.x.data(), b.row_token.data(), b.experts.rows(), sizes_.C);
      if (sizes_.shared_width > 0)
        b.shared = {.xp = b.x.data(),
                    .w_gate_up = weights_.shared_gate_up.data(),
                    .w_down = weights_.shared_down.data(),
                    .row_scale = nullptr,
                    .gate_up = b.shared_gate_up.data(),
                    .hidden = b.shared_hidden.data(),
                    .out = b.shared_out.data(),
                    .offsets = {0, T},
                    .hidden_size = sizes_.C,
                    .intermediate_size = sizes_.shared_width};
      if (grouped_error.empty()) {
        try {
          b.grouped = std::make_unique<cuda::GroupedExperts>(b.experts);
        } catch (const Error& e) {
          grouped_error = e.what();
        }
      }
      sets.push_back(std::move(b));
    }
    cuda::check_cuda(cudaDeviceSynchronize(), "baseline routing");
    const Load load = load_of(counts);

    // The checks, on rotation 0: cuBLAS's experts against ours, then each layer's y is finite.
    BaselineSet& b0 = sets[0];
    b0.out_ours.poison();
    b0.out.poison();
    ours_experts(b0, 0, T, nullptr);
    cuda::launch_experts_loop(blas_, b0.experts);
    checks.push_back(compare_experts("cuBLAS loop experts vs ours", b0));
    if (grouped_error.empty()) {
      try {
        b0.out.poison();
        b0.grouped->launch(blas_);
        checks.push_back(compare_experts("cuBLAS grouped experts vs ours", b0));
      } catch (const Error& e) {
        cudaGetLastError();
        grouped_error = e.what();
      }
    }
    if (!grouped_error.empty()) fmt::print("{:>6}  cuBLAS grouped: not timed: {}\n", "", grouped_error);
    for (const bool grouped : {false, true}) {
      if (grouped && !grouped_error.empty()) continue;
      b0.y.poison();
      cublas_layer(b0, T, grouped, nullptr);
      const cuda::Bf16Diff d = cuda::compare_bf16(b0.y.data(), nullptr, b0.y.size());
      checks.push_back(check_json(grouped ? "cuBLAS grouped layer: y finite" : "cuBLAS loop layer: y finite", d,
                                  d.nonfinite == 0 && d.max_abs_diff > 0));
    }

    const Work experts_work = sizes_.experts(T, load.distinct);
    const Work layer_work = sizes_.layer(T, load.distinct);
    const auto add = [&](const char* impl, const char* scope, const Work& work, const Launch& launch,
                         const std::string& skipped = "") {
      Row row{.impl = impl, .scope = scope, .versions = "", .rotations = rotations, .work = work, .load = load, .m = {}};
      if (!skipped.empty()) {
        row.m.skipped = skipped;
      } else {
        row.m = measure(launch, rotations, o_.replays, stream_.s);
      }
      if (std::string(impl) == "ours") row.versions = versions_label(layers_[0].versions, layers_[0].gemm_version());
      print_row(T, row, peaks_);
      rows.push_back(row);
      return row;
    };
    const Row ours_e = add("ours", "experts", experts_work, [&](cudaStream_t s, int r) { ours_experts(sets[r], r, T, s); });
    const Row loop_e = add("cuBLAS loop", "experts", experts_work,
                           [&](cudaStream_t s, int r) { cuda::launch_experts_loop(blas_, sets[r].experts, s); });
    const Row grouped_e = add("cuBLAS grouped", "experts", experts_work,
                              [&](cudaStream_t s, int r) { sets[r].grouped->launch(blas_, s); }, grouped_error);
    const Row loop_l = add("cuBLAS loop", "layer", layer_work,
                           [&](cudaStream_t s, int r) { cublas_layer(sets[r], T, false, s); });
    const Row grouped_l = add("cuBLAS grouped", "layer", layer_work,
                              [&](cudaStream_t s, int r) { cublas_layer(sets[r], T, true, s); }, grouped_error);

    // time ours / time baseline: < 1 where ours is faster.
    const auto ratio = [](const Row& a, const Row& b) -> json {
      if (!a.m.timed() || !b.m.timed()) return nullptr;
      return a.m.timing.median_ms / b.m.timing.median_ms;
    };
    ratios = {{"layer_vs_cublas_loop", ratio(ours_layer, loop_l)},
              {"layer_vs_cublas_grouped", ratio(ours_layer, grouped_l)},
              {"experts_vs_cublas_loop", ratio(ours_e, loop_e)},
              {"experts_vs_cublas_grouped", ratio(ours_e, grouped_e)}};
    const auto show = [](const json& r) { return r.is_null() ? std::string("-") : fmt::format("{:.2f}", r.get<double>()); };
    fmt::print("{:>6}  time ours / cuBLAS (< 1: ours faster): layer {} (loop), {} (grouped); experts {} (loop), {} "
               "(grouped){}\n",
               "", show(ratios["layer_vs_cublas_loop"]), show(ratios["layer_vs_cublas_grouped"]),
               show(ratios["experts_vs_cublas_loop"]), show(ratios["experts_vs_cublas_grouped"]),
               o_.skewed ? " [layer rows: routing skewed apart, see the load columns]" : "");
    std::fflush(stdout);
  }

  const BenchShape& shape_;
  const CudaBenchOptions& o_;
  const Peaks& peaks_;
  const cuda::DeviceStatus& device_;
  cuda::Cublas& blas_;
  Sizes sizes_;
  Index max_tokens_ = 1;
  std::vector<cuda::MoeLayer> layers_;  // identical weights; several only where they fit twice in L2
  std::uint64_t direction_seed_ = 0;
  float skew_ = 0, baseline_skew_ = 0;
  BaselineWeights weights_;
  std::string grouped_unsupported_;
  std::set<std::string> too_slow_;  // version combinations slower than kSlowForwardMs at an earlier T
  bool checks_passed_ = true;
  Stream stream_;
};

}  // namespace

std::string cuda_bench_unavailable() { return cuda::device_status().reason; }

std::string cuda_layer_unsupported(const LayerConfig& config) { return cuda::moe_unsupported(config); }

bool run_cuda_bench(const CudaBenchOptions& o, json& doc) {
  const cuda::DeviceStatus device = cuda::device_status();
  require(device.available, "--impl", "cuda", device.reason);
  fmt::print("{} (sm_{}, {} SMs, L2 {} MB); moelab {}; {}\n", device.name, device.sm, device.multiprocessors,
             device.l2_bytes >> 20, MOELAB_VERSION, utc_now());
  std::fflush(stdout);

  cuda::Cublas blas;
  const cuda::PeakRate gemm = cuda::measure_gemm_peak(blas, kPeakGemmSize, o.replays);
  const cuda::PeakRate copy = cuda::measure_copy_bandwidth(kPeakCopyBytes, o.replays);
  const Peaks peaks{.flops_per_s = gemm.per_second, .bytes_per_s = copy.per_second};
  fmt::print("peak dense bf16 GEMM (cublasGemmEx {0}x{0}x{0}, fp32 accumulation): {1:.1f} TFLOP/s ({2:.3f} ms)\n",
             kPeakGemmSize, gemm.per_second * 1e-12, gemm.timing.median_ms);
  fmt::print("peak copy (cudaMemcpyAsync device to device, {:.1f} GiB read + written): {:.0f} GB/s ({:.3f} ms)\n",
             static_cast<double>(kPeakCopyBytes) / (1 << 30), copy.per_second * 1e-9, copy.timing.median_ms);
  fmt::print("columns: TFLOP/s = useful flops of the routed experts (2 T k 3 C H) per second; (all) adds the shared "
             "experts and the router; GB/s and roofline from the least traffic: touched experts' weights + shared + "
             "router + x + y (experts rows: + their output instead of y); experts = distinct experts touched; "
             "max/mean = busiest expert's load over the mean\n");
  std::fflush(stdout);

  doc = {{"command", "bench"}, {"impl", "cuda"}, {"moelab_version", MOELAB_VERSION}, {"date", utc_now()}};
  doc["device"] = {{"name", device.name},
                   {"sm", device.sm},
                   {"multiprocessors", device.multiprocessors},
                   {"l2_bytes", device.l2_bytes}};
  doc["options"] = {{"tokens", o.tokens},
                    {"routing", o.skewed ? "skewed" : "uniform"},
                    {"replays", o.replays},
                    {"versions", o.versions},
                    {"baselines", o.baselines},
                    {"seed", o.seed}};
  doc["peaks"] = {{"gemm",
                   {{"tflops", gemm.per_second * 1e-12},
                    {"median_ms", gemm.timing.median_ms},
                    {"m_n_k", kPeakGemmSize},
                    {"call", "cublasGemmEx bf16 in/out, CUBLAS_COMPUTE_32F"}}},
                  {"copy",
                   {{"gbps", copy.per_second * 1e-9},
                    {"median_ms", copy.timing.median_ms},
                    {"bytes_copied", kPeakCopyBytes},
                    {"counted", "bytes read + bytes written"}}}};
  doc["method"] = {
      {"timing", "median of CUDA-graph replays; each replay = `rotations` launches on their own x (and own layer "
                 "copies where the weights fit twice in L2); time per launch = replay / rotations"},
      {"tflops_routed", "2 T k 3 C H / time: the routed experts' GEMMs only"},
      {"tflops_all", "(routed + shared experts 2 T 3 C S Hs + router 2 T C E) / time"},
      {"bytes", "weights of the distinct experts touched (counts read back outside the timing) + shared experts + "
                "router + x + y; experts rows: touched experts + x + expert output"},
      {"roofline", "max(bytes / copy rate, flops / GEMM rate); efficiency = roofline time / time"},
      {"baselines", "our router, permutation and combine with cuBLAS experts (per-expert cublasGemmEx loop, or "
                    "cublasGemmGroupedBatchedEx); own router weights, same distribution; experts rows exclude "
                    "the gather (cuBLAS gets a gathered copy; ours gathers in its loads)"}};
  json shapes = json::array();
  bool passed = true;
  for (const BenchShape& shape : o.shapes) {
    ShapeBench bench(shape, o, peaks, device, blas);
    shapes.push_back(bench.run());
    passed = passed && bench.checks_passed();
  }
  doc["shapes"] = std::move(shapes);
  return passed;
}

}  // namespace moelab::tools
