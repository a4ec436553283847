// moelab/cuda/bench/expert_gemm_bench.cu — validate, then time, every version of the expert GEMMs
// (cuda/expert_gemm.cu, cuda/expert_gemm_sm90.cu).
//
// What it shows. The grouped gate/up (SwiGLU fused) and down GEMMs of an MoE layer, for the
// shapes of four published models, from decode (T = 1) to long prefill (T = 16384):
//   mixtral        C 4096, H 14336, E   8, k 2   (Mixtral 8x7B)
//   deepseek_v3    C 7168, H  2048, E 256, k 8   (DeepSeek-V3, routed experts)
//   qwen3_30b_a3b  C 2048, H   768, E 128, k 8   (Qwen3-30B-A3B)
//   olmoe          C 2048, H  1024, E  64, k 8   (OLMoE-1B-7B)
// Routing is uniform: a fixed random assignment of k distinct experts per token (the same for
// every version), permuted as the reference dispatch_plan does. Per (shape, T, version) it prints
// the gate/up, down and total times, the useful rate 2 T k 3 C H / t, the effective bandwidth
// (the weights of the experts touched, 2 bytes each, plus the activations: x read, hidden written
// and read, out written), and the share of the roofline: roofline time / measured time, where
// roofline time = max(bytes / --peak-gbs, flops / --peak-tflops). At decode a kernel can only
// stream weights; at prefill it can only multiply: the roofline says which, and how close.
//
// First it validates every version on small problems against the CPU reference
// (moelab::expert_forward in double, per element within 2 bf16 ulps plus the fp32 accumulation
// slack, as tests/cuda/test_expert_gemm_device.cpp does). While timing, each version's output is
// compared on a sample of rows with the first version timed (versions must agree).
//
// How it measures: cuda/timing.h (graph replay). The graph holds several launches, each on its
// own copy of the weights where the experts touched fit in twice the L2, so that every launch
// reads its weights from DRAM as in a model. Version 1 is skipped where it would take more than
// --max-v1-seconds per launch (estimated from its flops).
//
// Usage: moelab_expert_gemm_bench [--iterations=N] [--shapes=mixtral,olmoe,...] [--tokens=1,16,...]
//          [--versions=1,2,3] [--peak-gbs=G] [--peak-tflops=F] [--max-v1-seconds=S] [--json=FILE]
//          [--seed=S]
//   defaults: 20 graph replays, every shape, tokens 1,16,128,4096,16384, every version,
//   3000 GB/s and 800 TFLOP/s (H100 SXM, measured: a device-to-device copy, and cuBLAS), 1 s, seed 42
//   --iterations=0   validate only (ctest runs it so: CudaExpertGemmBench.validate)
// Exit status: 0 all versions passed (and agreed), 1 a version failed, 2 bad arguments, 77 no CUDA
// device (the ctest "skipped" code).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/device.h"
#include "cuda/expert_gemm.h"
#include "cuda/timing.h"
#include "reference/dispatch.h"
#include "reference/error.h"
#include "reference/experts.h"
#include "reference/numerics.h"

namespace {

namespace mc = moelab::cuda;
using mc::Bf16Bits;
using mc::DeviceBuffer;

struct Shape {
  const char* name;
  std::int64_t C;
  std::int64_t H;
  int E;
  int k;
};
constexpr Shape kShapes[] = {
    {"mixtral", 4096, 14336, 8, 2},
    {"deepseek_v3", 7168, 2048, 256, 8},
    {"qwen3_30b_a3b", 2048, 768, 128, 8},
    {"olmoe", 2048, 1024, 64, 8},
};

struct Options {
  int iterations = 20;
  std::vector<std::string> shapes;  // empty = all
  std::vector<std::int64_t> tokens = {1, 16, 128, 4096, 16384};
  std::vector<int> versions;        // empty = all
  double peak_gbs = 3000;
  double peak_tflops = 800;
  double max_v1_seconds = 1.0;
  std::string json;
  std::uint64_t seed = 42;
};

void usage() {
  std::fprintf(stderr,
               "usage: moelab_expert_gemm_bench [--iterations=N] [--shapes=a,b] [--tokens=1,16,...] "
               "[--versions=1,2,3] [--peak-gbs=G] [--peak-tflops=F] [--max-v1-seconds=S] [--json=FILE] "
               "[--seed=S]\n  --iterations=0 validates only\n");
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> parts;
  std::stringstream in(s);
  for (std::string part; std::getline(in, part, ',');) parts.push_back(part);
  return parts;
}

bool parse_number(const std::string& s, double& out) {
  char* end = nullptr;
  out = std::strtod(s.c_str(), &end);
  return !s.empty() && *end == '\0' && std::isfinite(out);
}

// Parses --name=value arguments; false (after printing why) on anything else.
bool parse(int argc, char** argv, Options& opt) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const std::size_t eq = arg.find('=');
    const std::string name = arg.substr(0, eq);
    const std::string value = eq == std::string::npos ? "" : arg.substr(eq + 1);
    double v = 0;
    bool ok = true;
    if (name == "--help" || name == "-h") {
      ok = false;
    } else if (name == "--iterations") {
      ok = parse_number(value, v) && v >= 0 && v <= 100000 && v == std::floor(v);
      opt.iterations = static_cast<int>(v);
    } else if (name == "--shapes") {
      opt.shapes = split(value);
      for (const std::string& s : opt.shapes)
        ok = ok && std::any_of(std::begin(kShapes), std::end(kShapes), [&](const Shape& sh) { return s == sh.name; });
    } else if (name == "--tokens") {
      opt.tokens.clear();
      for (const std::string& s : split(value)) {
        ok = ok && parse_number(s, v) && v >= 1 && v <= (1 << 20) && v == std::floor(v);
        opt.tokens.push_back(static_cast<std::int64_t>(v));
      }
      ok = ok && !opt.tokens.empty();
    } else if (name == "--versions") {
      opt.versions.clear();
      for (const std::string& s : split(value)) {
        ok = ok && parse_number(s, v) && v >= 1 && v <= mc::kExpertGemmVersions && v == std::floor(v);
        opt.versions.push_back(static_cast<int>(v));
      }
      ok = ok && !opt.versions.empty();
    } else if (name == "--peak-gbs") {
      ok = parse_number(value, opt.peak_gbs) && opt.peak_gbs > 0;
    } else if (name == "--peak-tflops") {
      ok = parse_number(value, opt.peak_tflops) && opt.peak_tflops > 0;
    } else if (name == "--max-v1-seconds") {
      ok = parse_number(value, opt.max_v1_seconds) && opt.max_v1_seconds >= 0;
    } else if (name == "--json") {
      opt.json = value;
      ok = !value.empty();
    } else if (name == "--seed") {
      ok = parse_number(value, v) && v >= 0 && v == std::floor(v);
      opt.seed = static_cast<std::uint64_t>(v);
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr, "%s: unknown option or bad value\n", arg.c_str());
      usage();
      return false;
    }
  }
  if (opt.versions.empty())
    for (int v = 1; v <= mc::kExpertGemmVersions; ++v) opt.versions.push_back(v);
  return true;
}

// --- inputs ------------------------------------------------------------------------------------

// Uniform values in [-amplitude, amplitude), from a hash of the index (no host round trip: the
// largest weights, DeepSeek-V3's, are 22.5 GB).
__global__ void fill_uniform_kernel(__nv_bfloat16* p, std::size_t n, std::uint64_t seed, float amplitude) {
  const std::size_t stride = std::size_t{gridDim.x} * blockDim.x;
  for (std::size_t i = std::size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += stride) {
    std::uint64_t h = seed ^ (i * 0x9E3779B97F4A7C15ull);  // SplitMix64's finaliser
    h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ull;
    h = (h ^ (h >> 27)) * 0x94D049BB133111EBull;
    h ^= h >> 31;
    const float u = static_cast<float>(h >> 40) * 0x1.0p-24f;  // [0, 1)
    p[i] = __float2bfloat16_rn((2.0f * u - 1.0f) * amplitude);
  }
}

void fill_uniform(Bf16Bits* p, std::size_t n, std::uint64_t seed, double stddev) {
  fill_uniform_kernel<<<1024, 256>>>(reinterpret_cast<__nv_bfloat16*>(p), n, seed,
                                     static_cast<float>(std::sqrt(3.0) * stddev));
  mc::check_launch("fill_uniform_kernel");
}

// The permutation of a uniform routing: k distinct experts per token, drawn with a seeded engine.
moelab::Dispatch uniform_routing(std::int64_t T, int k, int E, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  moelab::IndexMatrix ids(T, k);
  std::vector<int> experts(static_cast<std::size_t>(E));
  for (moelab::Index t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) experts[static_cast<std::size_t>(e)] = e;
    for (int j = 0; j < k; ++j) {  // a partial Fisher-Yates shuffle
      std::uniform_int_distribution<int> pick(j, E - 1);
      std::swap(experts[static_cast<std::size_t>(j)], experts[static_cast<std::size_t>(pick(rng))]);
      ids(t, j) = experts[static_cast<std::size_t>(j)];
    }
  }
  moelab::Dispatch plan;
  moelab::dispatch_plan(plan, ids, moelab::IndexMatrix(), E);
  return plan;
}

// One problem on the device: inputs, permutation, outputs; `sets` copies of the weights.
struct DeviceProblem {
  std::int64_t T = 0, C = 0, H = 0, rows = 0;
  int E = 1;
  DeviceBuffer<Bf16Bits> x;
  std::vector<DeviceBuffer<Bf16Bits>> w_gate_up, w_down;
  DeviceBuffer<std::int32_t> offsets, row_token;
  DeviceBuffer<float> row_scale;
  DeviceBuffer<Bf16Bits> hidden, out;

  mc::GateUpArgs gate_up(int set) const {
    return {.x = x.data(), .row_token = row_token.data(), .offsets = offsets.data(),
            .row_scale = row_scale.data(), .w_gate_up = w_gate_up[static_cast<std::size_t>(set)].data(),
            .hidden = hidden.data(), .tokens = T, .rows = rows, .hidden_size = C, .intermediate_size = H,
            .num_experts = E};
  }
  mc::DownArgs down(int set) const {
    return {.hidden = hidden.data(), .row_token = row_token.data(), .offsets = offsets.data(),
            .row_scale = row_scale.data(), .w_down = w_down[static_cast<std::size_t>(set)].data(),
            .out = out.data(), .rows = rows, .hidden_size = C, .intermediate_size = H, .num_experts = E};
  }
};

double bf16_value(Bf16Bits b) { return moelab::decode(b, moelab::Format::bf16); }

// --- 1. validation against the reference -----------------------------------------------------------

double two_bf16_ulps(double v) {
  const double a = std::abs(v);
  return a < 0x1.0p-126 ? 0x1.0p-132 : 2 * std::ldexp(1.0, std::ilogb(a) - 7);
}

// Per-element check |got - ref| <= 2 ulp_bf16(ref) + K u_fp32 sum|terms| (x 1.1 |u| or |silu(g)|
// through SwiGLU), and the relative error of the whole matrix.
struct Check {
  std::int64_t failures = 0;
  double diff2 = 0, ref2 = 0;
  void add(double got, double ref, double tol, const char* what, std::int64_t r, std::int64_t c) {
    diff2 += (got - ref) * (got - ref);
    ref2 += ref * ref;
    if (!(std::abs(got - ref) <= tol) && ++failures <= 5)
      std::printf("    %s[%lld, %lld]: device %.6g, reference %.6g, tolerance %.3g\n", what,
                  static_cast<long long>(r), static_cast<long long>(c), got, ref, tol);
  }
  double relative() const { return std::sqrt(diff2 / std::max(ref2, 1e-300)); }
};

// Runs `version` on a routed problem (C, H, E, k, T, with row_scale on the down GEMM) and compares
// hidden with expert_forward's and out with the down projection of the device's hidden.
bool validate(int version, std::int64_t C, std::int64_t H, int E, int k, std::int64_t T, std::uint64_t seed) {
  const moelab::Dispatch plan = uniform_routing(T, k, E, seed);
  const std::int64_t rows = plan.num_rows();
  std::vector<std::int32_t> offsets(plan.offsets.begin(), plan.offsets.end());
  std::mt19937_64 rng(seed + 1);
  auto random_bits = [&](std::size_t n, double stddev) {
    std::uniform_real_distribution<float> u(static_cast<float>(-std::sqrt(3.0) * stddev),
                                            static_cast<float>(std::sqrt(3.0) * stddev));
    std::vector<Bf16Bits> bits(n);
    for (Bf16Bits& b : bits) b = static_cast<Bf16Bits>(moelab::encode(u(rng), moelab::Format::bf16));
    return bits;
  };
  const std::vector<Bf16Bits> x = random_bits(static_cast<std::size_t>(T * C), 1.0);
  const std::vector<Bf16Bits> wgu = random_bits(static_cast<std::size_t>(E * 2 * H * C), 1.0 / std::sqrt(double(C)));
  const std::vector<Bf16Bits> wd = random_bits(static_cast<std::size_t>(E * C * H), 1.0 / std::sqrt(double(H)));
  std::vector<float> scale(static_cast<std::size_t>(rows));
  std::uniform_real_distribution<float> s(0.25f, 2.0f);
  for (float& v : scale) v = s(rng);

  const DeviceBuffer<Bf16Bits> dx{std::span<const Bf16Bits>(x)}, dwgu{std::span<const Bf16Bits>(wgu)},
      dwd{std::span<const Bf16Bits>(wd)};
  const DeviceBuffer<std::int32_t> doff{std::span<const std::int32_t>(offsets)},
      dtok{std::span<const std::int32_t>(plan.row_token)};
  const DeviceBuffer<float> dscale{std::span<const float>(scale)};
  DeviceBuffer<Bf16Bits> hidden(static_cast<std::size_t>(rows * H)), out(static_cast<std::size_t>(rows * C));
  hidden.poison();
  out.poison();
  mc::launch_gate_up({.x = dx.data(), .row_token = dtok.data(), .offsets = doff.data(), .row_scale = nullptr,
                      .w_gate_up = dwgu.data(), .hidden = hidden.data(), .tokens = T, .rows = rows,
                      .hidden_size = C, .intermediate_size = H, .num_experts = E},
                     version);
  mc::launch_down({.hidden = hidden.data(), .row_token = dtok.data(), .offsets = doff.data(),
                   .row_scale = dscale.data(), .w_down = dwd.data(), .out = out.data(), .rows = rows,
                   .hidden_size = C, .intermediate_size = H, .num_experts = E},
                  version);
  mc::check_cuda(cudaDeviceSynchronize(), "expert GEMM kernels");
  const std::vector<Bf16Bits> h_dev = hidden.download();
  const std::vector<Bf16Bits> y_dev = out.download();

  Check hc, oc;
  const moelab::ExpertConfig config{.hidden_size = C, .intermediate_size = H};
  for (int e = 0; e < E; ++e) {
    const std::int64_t r0 = offsets[static_cast<std::size_t>(e)];
    const moelab::Index n = offsets[static_cast<std::size_t>(e) + 1] - r0;
    if (n == 0) continue;
    moelab::ExpertParamsT<double> p;
    p.w_gate.resize(H, C);
    p.w_up.resize(H, C);
    p.w_down.resize(C, H);
    const std::size_t gu = static_cast<std::size_t>(e * 2 * H * C);
    for (moelab::Index i = 0; i < H * C; ++i) {
      p.w_gate.data()[i] = bf16_value(wgu[gu + static_cast<std::size_t>(i)]);
      p.w_up.data()[i] = bf16_value(wgu[gu + static_cast<std::size_t>(H * C + i)]);
      p.w_down.data()[i] = bf16_value(wd[static_cast<std::size_t>(e * C * H + i)]);
    }
    moelab::MatrixD xe(n, C), he(n, H);
    for (moelab::Index i = 0; i < n; ++i) {
      const std::size_t t = static_cast<std::size_t>(plan.row_token[static_cast<std::size_t>(r0 + i)]);
      for (moelab::Index c = 0; c < C; ++c) xe(i, c) = bf16_value(x[t * static_cast<std::size_t>(C) + static_cast<std::size_t>(c)]);
      for (moelab::Index h = 0; h < H; ++h) he(i, h) = bf16_value(h_dev[static_cast<std::size_t>((r0 + i) * H + h)]);
    }
    moelab::MatrixD y;
    moelab::ExpertCacheT<double> cache;
    moelab::expert_forward(y, cache, xe, p, config);
    const moelab::MatrixD xa = xe.cwiseAbs();
    moelab::MatrixD sg, su, yd, sd;
    sg.noalias() = xa * p.w_gate.cwiseAbs().transpose();
    su.noalias() = xa * p.w_up.cwiseAbs().transpose();
    yd.noalias() = he * p.w_down.transpose();
    sd.noalias() = he.cwiseAbs() * p.w_down.cwiseAbs().transpose();
    for (moelab::Index i = 0; i < n; ++i) {
      for (moelab::Index h = 0; h < H; ++h) {
        const double g = cache.gate_pre(i, h), u = cache.up_pre(i, h);
        const double slack = double(C) * 0x1.0p-24 * (1.1 * std::abs(u) * sg(i, h) + std::abs(g / (1 + std::exp(-g))) * su(i, h));
        const double ref = cache.hidden(i, h);
        hc.add(bf16_value(h_dev[static_cast<std::size_t>((r0 + i) * H + h)]), ref, two_bf16_ulps(ref) + slack,
               "hidden", r0 + i, h);
      }
      const double sc = scale[static_cast<std::size_t>(r0 + i)];
      for (moelab::Index c = 0; c < C; ++c) {
        const double ref = sc * yd(i, c);
        oc.add(bf16_value(y_dev[static_cast<std::size_t>((r0 + i) * C + c)]), ref,
               two_bf16_ulps(ref) + double(H) * 0x1.0p-24 * sc * sd(i, c), "out", r0 + i, c);
      }
    }
  }
  const bool ok = hc.failures == 0 && oc.failures == 0 && hc.relative() < 5e-3 && oc.relative() < 5e-3;
  std::printf("  expert_gemm_kernel%d C %5lld H %5lld E %3d k %d T %5lld: %s  (hidden: %lld failures, rel %.2e; "
              "out: %lld failures, rel %.2e)\n",
              version, static_cast<long long>(C), static_cast<long long>(H), E, k, static_cast<long long>(T),
              ok ? "Passed" : "Failed", static_cast<long long>(hc.failures), hc.relative(),
              static_cast<long long>(oc.failures), oc.relative());
  return ok;
}

// --- 2. timing -------------------------------------------------------------------------------------

// A sample of out's rows (every stride-th, at most 256), to compare versions with each other.
std::vector<Bf16Bits> sample_rows(const DeviceProblem& p) {
  const std::int64_t n = std::min<std::int64_t>(p.rows, 256);
  const std::int64_t stride = p.rows / n;
  std::vector<Bf16Bits> host(static_cast<std::size_t>(n * p.C));
  const std::size_t row_bytes = static_cast<std::size_t>(p.C) * sizeof(Bf16Bits);
  mc::check_cuda(cudaMemcpy2D(host.data(), row_bytes, p.out.data(), row_bytes * static_cast<std::size_t>(stride),
                              row_bytes, static_cast<std::size_t>(n), cudaMemcpyDeviceToHost),
                 "cudaMemcpy2D (sample of out)");
  return host;
}

double relative_difference(const std::vector<Bf16Bits>& a, const std::vector<Bf16Bits>& b) {
  double d2 = 0, r2 = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = bf16_value(a[i]), y = bf16_value(b[i]);
    d2 += (x - y) * (x - y);
    r2 += y * y;
  }
  return std::sqrt(d2 / std::max(r2, 1e-300));
}

// Median time of one launch of `launch`: a graph of `launches` launches over the weight sets,
// replayed as often as fits in about half a second (at least 3, at most `iterations` times).
double time_launches(const std::function<void(cudaStream_t, int)>& launch, int sets, int iterations) {
  // A first estimate from one eager launch (after one that loads the module).
  cudaEvent_t start = nullptr, stop = nullptr;
  mc::check_cuda(cudaEventCreate(&start), "cudaEventCreate");
  mc::check_cuda(cudaEventCreate(&stop), "cudaEventCreate");
  launch(nullptr, 0);
  mc::check_cuda(cudaEventRecord(start), "cudaEventRecord");
  launch(nullptr, sets > 1 ? 1 : 0);
  mc::check_cuda(cudaEventRecord(stop), "cudaEventRecord");
  mc::check_cuda(cudaEventSynchronize(stop), "expert GEMM (first timing)");
  float first_ms = 0;
  mc::check_cuda(cudaEventElapsedTime(&first_ms, start, stop), "cudaEventElapsedTime");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  const double est_ms = std::max<double>(first_ms, 1e-3);
  if (est_ms > 200) return est_ms;  // too slow to repeat
  // Enough launches per graph that one replay is >= ~1 ms (event resolution, launch gaps).
  const int per_set = std::clamp(static_cast<int>(std::ceil(1.0 / (est_ms * sets))), 1, 64);
  const int launches = sets * per_set;
  const int replays = std::clamp(static_cast<int>(500.0 / (est_ms * launches)), 3, std::max(iterations, 3));
  const mc::Timing t = mc::time_graph([&](cudaStream_t s, int i) { launch(s, i % sets); }, launches, replays, 2);
  return t.median_ms;
}

struct Result {
  double gate_up_ms = 0, down_ms = 0;
};

int run(const Options& opt) {
  const mc::DeviceStatus status = mc::device_status();
  if (!status.available) {
    std::printf("%s\n", status.reason.c_str());
    return 77;
  }
  std::printf("device: %s (sm_%d, %d SMs, L2 %zu MB)\n", status.name.c_str(), status.sm, status.multiprocessors,
              status.l2_bytes >> 20);
  const auto runs = [&](int v) {
    return std::find(opt.versions.begin(), opt.versions.end(), v) != opt.versions.end() && (v != 3 || status.sm == 90);
  };

  // 1. Validate: decode-like (small tile), mid (medium tile), prefill with K and N tails (large).
  std::printf("\nvalidation against moelab::expert_forward (double), seed %llu:\n",
              static_cast<unsigned long long>(opt.seed));
  bool all_passed = true;
  for (const int v : opt.versions) {
    if (!runs(v)) {
      std::printf("  expert_gemm_kernel%d: skipped (version 3 needs an sm_90 device)\n", v);
      continue;
    }
    all_passed &= validate(v, 256, 256, 64, 8, 24, opt.seed);
    all_passed &= validate(v, 512, 384, 8, 2, 200, opt.seed + 1);
    all_passed &= validate(v, 264, 200, 4, 1, 1000, opt.seed + 2);
  }
  if (!all_passed) return 1;
  if (opt.iterations == 0) return 0;

  // 2. Time.
  std::printf("\nrooflines: %.0f GB/s, %.0f TFLOP/s; weights rotated over copies where the experts touched fit "
              "in 2x L2\n",
              opt.peak_gbs, opt.peak_tflops);
  std::printf("\n%-14s %6s %3s %11s %11s %11s %9s %8s %9s %s\n", "shape", "T", "v", "gate_up us", "down us",
              "total us", "TFLOP/s", "GB/s", "roofline", "");
  nlohmann::json records = nlohmann::json::array();
  bool all_agree = true;
  for (const Shape& shape : kShapes) {
    if (!opt.shapes.empty() && std::find(opt.shapes.begin(), opt.shapes.end(), shape.name) == opt.shapes.end())
      continue;
    const std::int64_t C = shape.C, H = shape.H;
    const int E = shape.E, k = shape.k;
    const double expert_bytes = 3.0 * double(C) * double(H) * 2;
    // Weight copies: enough that the experts touched at the smallest T exceed twice the L2,
    // as many as fit in half the free memory.
    std::size_t free_bytes = 0, total_bytes = 0;
    mc::check_cuda(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
    const std::int64_t min_t = *std::min_element(opt.tokens.begin(), opt.tokens.end());
    const double min_touched = std::min<double>(E, double(min_t) * k) * expert_bytes;
    const int fit = static_cast<int>(0.5 * double(free_bytes) / (E * expert_bytes));
    const int sets = std::max(1, std::min(mc::rotations_for(min_touched, status.l2_bytes, 16), fit));
    DeviceProblem p;
    p.C = C;
    p.H = H;
    p.E = E;
    for (int s = 0; s < sets; ++s) {
      p.w_gate_up.emplace_back(static_cast<std::size_t>(E * 2 * H * C));
      p.w_down.emplace_back(static_cast<std::size_t>(E * C * H));
      fill_uniform(p.w_gate_up.back().data(), p.w_gate_up.back().size(), opt.seed + 10 * s + 1, 1 / std::sqrt(double(C)));
      fill_uniform(p.w_down.back().data(), p.w_down.back().size(), opt.seed + 10 * s + 2, 1 / std::sqrt(double(H)));
    }
    for (const std::int64_t T : opt.tokens) {
      const moelab::Dispatch plan = uniform_routing(T, k, E, opt.seed + static_cast<std::uint64_t>(T));
      const std::vector<std::int32_t> offsets(plan.offsets.begin(), plan.offsets.end());
      const int touched = static_cast<int>(std::count_if(plan.counts.begin(), plan.counts.end(),
                                                         [](std::int64_t c) { return c > 0; }));
      p.T = T;
      p.rows = plan.num_rows();
      p.x = DeviceBuffer<Bf16Bits>(static_cast<std::size_t>(T * C));
      fill_uniform(p.x.data(), p.x.size(), opt.seed + 7, 1.0);
      p.offsets = DeviceBuffer<std::int32_t>(std::span<const std::int32_t>(offsets));
      p.row_token = DeviceBuffer<std::int32_t>(std::span<const std::int32_t>(plan.row_token));
      p.hidden = DeviceBuffer<Bf16Bits>(static_cast<std::size_t>(p.rows * H));
      p.out = DeviceBuffer<Bf16Bits>(static_cast<std::size_t>(p.rows * C));

      const double flops = 2.0 * double(T) * k * 3 * double(C) * double(H);
      const double bytes = touched * expert_bytes + 2.0 * double(T * C + 2 * p.rows * H + p.rows * C);
      const double roofline_s = std::max(bytes / (opt.peak_gbs * 1e9), flops / (opt.peak_tflops * 1e12));
      std::vector<Bf16Bits> baseline;
      int baseline_version = 0;
      for (const int v : opt.versions) {
        if (!runs(v)) continue;
        // Version 1 reaches about 0.4 TFLOP/s on an H100 (CUDA-core FMAs, every operand loaded).
        constexpr double kV1Rate = 0.4e12;
        if (v == 1 && flops / kV1Rate > opt.max_v1_seconds) {
          std::printf("%-14s %6lld %3d   skipped (about %.1f s per launch; --max-v1-seconds=%g)\n", shape.name,
                      static_cast<long long>(T), v, flops / kV1Rate, opt.max_v1_seconds);
          continue;
        }
        p.out.poison();
        Result r;
        r.gate_up_ms = time_launches([&](cudaStream_t s, int set) { mc::launch_gate_up(p.gate_up(set), v, s); },
                                     sets, opt.iterations);
        r.down_ms = time_launches([&](cudaStream_t s, int set) { mc::launch_down(p.down(set), v, s); }, sets,
                                  opt.iterations);
        mc::check_cuda(cudaDeviceSynchronize(), "expert GEMM kernels");
        const std::vector<Bf16Bits> sample = sample_rows(p);
        std::string agreement;
        if (baseline.empty()) {
          baseline = sample;
          baseline_version = v;
        } else {
          // Versions round the same sums accumulated in other orders, and down reads each
          // version's own hidden: they agree to about 1e-3.
          const double d = relative_difference(sample, baseline);
          const bool agree = d < 1e-2;
          all_agree &= agree;
          char text[96];
          std::snprintf(text, sizeof text, "%s v%d (rel %.1e)", agree ? "agrees with" : "DISAGREES with",
                        baseline_version, d);
          agreement = text;
        }
        const double total_s = (r.gate_up_ms + r.down_ms) * 1e-3;
        const double tflops = flops / total_s / 1e12;
        const double gbs = bytes / total_s / 1e9;
        const double share = roofline_s / total_s;
        std::printf("%-14s %6lld %3d %11.1f %11.1f %11.1f %9.1f %8.0f %8.1f%% %s\n", shape.name,
                    static_cast<long long>(T), v, r.gate_up_ms * 1e3, r.down_ms * 1e3, total_s * 1e6, tflops, gbs,
                    100 * share, agreement.c_str());
        std::fflush(stdout);
        records.push_back({{"shape", shape.name}, {"C", C}, {"H", H}, {"E", E}, {"k", k}, {"T", T},
                           {"rows", p.rows}, {"experts_touched", touched}, {"version", v},
                           {"gate_up_us", r.gate_up_ms * 1e3}, {"down_us", r.down_ms * 1e3},
                           {"total_us", total_s * 1e6}, {"tflops", tflops}, {"gbs", gbs},
                           {"roofline_fraction", share}, {"weight_sets", sets}});
      }
    }
  }
  if (!opt.json.empty()) {
    std::ofstream out(opt.json);
    out << nlohmann::json{{"device", status.name},
                          {"peak_gbs", opt.peak_gbs},
                          {"peak_tflops", opt.peak_tflops},
                          {"results", records}}
               .dump(2)
        << "\n";
    if (!out) {
      std::fprintf(stderr, "error: could not write %s\n", opt.json.c_str());
      return 1;
    }
  }
  return all_agree ? 0 : 1;
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
