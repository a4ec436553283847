// moelab/tests/cuda/test_expert_gemm_device.cpp — every version of the expert GEMMs
// (cuda/expert_gemm.h) against moelab::expert_forward (reference/experts.h), in double.
//
// Each case routes T tokens to k of E experts on the host (uniform, skewed, or leaving experts
// empty), builds offsets and row_token as the reference dispatch_plan does, optionally pads every
// expert's block of rows to a multiple of `pad` (padding rows: row_token = -1) and appends rows
// past offsets[E] that no kernel may touch. Inputs are fresh seeded random bf16 values (x ~ U with
// unit variance, weights with variance 1/K so that the pre-activations are O(1) and SwiGLU's
// curve is exercised); hidden and out are poisoned (0xFFFF, a bf16 NaN) before every launch.
//
// The oracle: per expert, expert_forward<double> on the gathered rows (each scaled by row_scale,
// the gate on the expert's input), from the same bf16 values decoded exactly. hidden is compared
// with the reference's h. The down GEMM reads the device's own (bf16) hidden, so its reference is
// s'_r hidden_dev Wd^T in double, from that same hidden.
// Tolerance per element (llm.c's rule with the reasons written out):
//   |device - reference| <= 2 ulp_bf16(|reference|) + K u_fp32 (sum of |terms|) (x the derivative)
// 2 ulps: the device rounds once to bf16 (1/2 ulp) a value that is itself off by the fp32
// accumulation error, which is at most K u_fp32 times the sum of the absolute products (the
// classic bound gamma_K); through SwiGLU that error is multiplied by |silu'(g)| <= 1.1 and |u|, or
// by |silu(g)|. Besides every element, ||device - reference|| / ||reference|| is printed and must
// stay below 5e-3 (bf16 rounding alone gives about 1e-3).
// Every element is checked: padding rows must be zeros, rows >= offsets[E] must still hold the
// poison. The first mismatches are printed with row, column, expert, token, expected and got.
//
// Without a GPU the device tests skip; version 3 skips on devices other than sm_90. The argument
// checks at the end throw before any CUDA call and run everywhere.
#include "cuda/expert_gemm.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "tests/cuda/device_testing.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "reference/dispatch.h"
#include "reference/error.h"
#include "reference/experts.h"
#include "reference/numerics.h"
#include "reference/random.h"
#include "reference/types.h"

namespace moelab::cuda {
namespace {

enum class Routing { uniform, skewed, empty_experts };

struct Case {
  std::int64_t C;   // hidden_size
  std::int64_t H;   // intermediate_size
  int E;            // experts
  std::int64_t T;   // tokens
  int k;            // experts per token
  Routing routing;
  int pad = 0;            // pad each expert's rows to a multiple of pad (row_token -1); 0 = none
  bool scale = false;     // row_scale on both GEMMs (different values for each)
  bool identity = false;  // row_token null: row r is token r (shared expert / dense FFN)
  int extra = 3;          // rows past offsets[E], which must stay untouched
};

// The cases: each dimension of the brief at least once, and every tile shape of version 2 (the
// dispatcher picks it from rows / E: <= 24 small, <= 96 medium, else large), with K and N tails
// ((72, 200): neither a multiple of 32 nor of 64).
const Case kCases[] = {
    // (C, H)     E    T     k  routing                  pad  scale  identity
    {64, 128, 1, 1, 1, Routing::uniform, 0, false, true},          // dense decode, 1 row
    {64, 128, 1, 128, 1, Routing::uniform, 0, true, true},         // dense, identity rows
    {64, 128, 8, 5, 2, Routing::uniform, 0, true},                 // decode, small tile
    {64, 128, 8, 128, 2, Routing::skewed, 16, true},               // medium tile, padding
    {64, 128, 64, 128, 8, Routing::empty_experts, 8, false},       // many empty experts
    {64, 128, 256, 2000, 8, Routing::uniform, 128, true},          // 256 experts, heavy padding
    {256, 512, 8, 2000, 2, Routing::uniform, 0, true},             // prefill, large tile
    {256, 512, 64, 2000, 8, Routing::skewed, 0, false},            // skewed prefill
    {256, 512, 256, 128, 8, Routing::uniform, 16, true},           // 4 rows per expert
    {256, 512, 1, 2000, 1, Routing::uniform, 0, true, true},       // dense prefill
    {256, 512, 8, 5, 1, Routing::empty_experts, 0, false},         // most experts empty
    {2048, 768, 8, 128, 2, Routing::uniform, 0, true},             // qwen3-ish, medium tile
    {2048, 768, 64, 128, 8, Routing::skewed, 16, false},           // qwen3-ish, small tile
    {2048, 768, 8, 1, 8, Routing::uniform, 0, true},               // one token to every expert
    {2048, 768, 8, 2000, 1, Routing::uniform, 0, false},           // qwen3-ish prefill, large tile
    {72, 200, 8, 128, 2, Routing::uniform, 0, true},               // K and N tails, medium tile
    {72, 200, 1, 2000, 1, Routing::uniform, 0, true, true},        // tails, large tile, identity
    {72, 200, 64, 5, 8, Routing::empty_experts, 8, true},          // tails, small tile, padding
    {72, 200, 256, 2000, 1, Routing::skewed, 0, false},            // skewed: one expert ~ 300 rows
};

const char* routing_name(Routing r) {
  switch (r) {
    case Routing::uniform: return "uniform";
    case Routing::skewed: return "skewed";
    case Routing::empty_experts: return "empty";
  }
  return "?";
}

std::string case_label(const Case& c) {
  std::string s = "c" + std::to_string(c.C) + "_h" + std::to_string(c.H) + "_e" + std::to_string(c.E) +
                  "_t" + std::to_string(c.T) + "_k" + std::to_string(c.k) + "_" + routing_name(c.routing);
  if (c.pad > 0) s += "_pad" + std::to_string(c.pad);
  if (c.scale) s += "_scale";
  if (c.identity) s += "_identity";
  return s;
}

// --- the problem on the host -----------------------------------------------------------------------

struct HostProblem {
  Case c;
  std::int64_t rows = 0;                 // buffers' rows: offsets[E] + extra
  std::vector<std::int32_t> offsets;     // (E + 1)
  std::vector<std::int32_t> row_token;   // (rows); empty when identity (the kernels get null)
  std::vector<float> scale_up;           // (rows) gate/up row_scale, or empty
  std::vector<float> scale_down;         // (rows) down row_scale, or empty
  std::vector<Bf16Bits> x;               // (T, C)
  std::vector<Bf16Bits> w_gate_up;       // (E, 2H, C)
  std::vector<Bf16Bits> w_down;          // (E, C, H)
  std::vector<double> hidden_ref;        // (rows, H) the reference's h on real rows
  std::vector<double> hidden_slack;      // (rows, H) its accumulation slack

  std::int32_t token(std::int64_t r) const {
    return row_token.empty() ? static_cast<std::int32_t>(r) : row_token[static_cast<std::size_t>(r)];
  }
  std::int64_t used() const { return offsets.back(); }  // offsets[E]
  int expert_of(std::int64_t r) const {
    return static_cast<int>(std::upper_bound(offsets.begin(), offsets.end(), r) - offsets.begin()) - 1;
  }
};

// ids (T, k): k distinct experts per token.
IndexMatrix route(const Case& c, std::int64_t tokens, Rng& rng) {
  std::vector<double> weight(static_cast<std::size_t>(c.E), 1.0);
  if (c.routing == Routing::skewed) {  // Zipf-like: expert e chosen ~ 1 / (e + 1)^1.2
    for (int e = 0; e < c.E; ++e) weight[static_cast<std::size_t>(e)] = 1.0 / std::pow(e + 1.0, 1.2);
  } else if (c.routing == Routing::empty_experts) {  // only experts e % 4 == 1 (if enough of them)
    const int allowed = (c.E + 2) / 4;
    if (allowed >= c.k) {
      for (int e = 0; e < c.E; ++e) weight[static_cast<std::size_t>(e)] = e % 4 == 1 ? 1.0 : 0.0;
    }
  }
  IndexMatrix ids(tokens, c.k);
  for (Index t = 0; t < tokens; ++t) {
    std::vector<double> w = weight;
    for (int j = 0; j < c.k; ++j) {  // draw without replacement
      const double total = std::accumulate(w.begin(), w.end(), 0.0);
      double u = rng.uniform() * total;
      int e = 0;
      while (e < c.E - 1 && (u >= w[static_cast<std::size_t>(e)] || w[static_cast<std::size_t>(e)] == 0)) {
        u -= w[static_cast<std::size_t>(e)];
        ++e;
      }
      while (w[static_cast<std::size_t>(e)] == 0) --e;  // rounding at the end of the walk
      ids(t, j) = e;
      w[static_cast<std::size_t>(e)] = 0;
    }
  }
  return ids;
}

// Uniform with unit variance times `std`, rounded to bf16.
std::vector<Bf16Bits> random_bf16(std::size_t n, double std, Rng& rng) {
  std::vector<Bf16Bits> bits(n);
  const double a = std::sqrt(3.0) * std;
  for (Bf16Bits& b : bits) b = static_cast<Bf16Bits>(encode(static_cast<float>(rng.uniform(-a, a)), Format::bf16));
  return bits;
}

double bf16_value(Bf16Bits b) { return decode(b, Format::bf16); }

// The weights of expert e as the reference's double matrices: w_gate (H, C), w_up (H, C), w_down (C, H).
ExpertParamsT<double> expert_params(const HostProblem& p, int e) {
  const Index C = p.c.C;
  const Index H = p.c.H;
  ExpertParamsT<double> params;
  params.w_gate.resize(H, C);
  params.w_up.resize(H, C);
  params.w_down.resize(C, H);
  const std::size_t gu = static_cast<std::size_t>(e) * static_cast<std::size_t>(2 * H * C);
  for (Index n = 0; n < H; ++n) {
    for (Index ci = 0; ci < C; ++ci) {
      params.w_gate(n, ci) = bf16_value(p.w_gate_up[gu + static_cast<std::size_t>(n * C + ci)]);
      params.w_up(n, ci) = bf16_value(p.w_gate_up[gu + static_cast<std::size_t>((H + n) * C + ci)]);
    }
  }
  const std::size_t d = static_cast<std::size_t>(e) * static_cast<std::size_t>(C * H);
  for (Index ci = 0; ci < C; ++ci)
    for (Index h = 0; h < H; ++h) params.w_down(ci, h) = bf16_value(p.w_down[d + static_cast<std::size_t>(ci * H + h)]);
  return params;
}

// The real (non-padding) rows of expert e.
std::vector<std::int64_t> real_rows(const HostProblem& p, int e) {
  std::vector<std::int64_t> rows;
  for (std::int64_t r = p.offsets[static_cast<std::size_t>(e)]; r < p.offsets[static_cast<std::size_t>(e) + 1]; ++r)
    if (p.token(r) >= 0) rows.push_back(r);
  return rows;
}

constexpr double kUFp32 = 0x1.0p-24;

HostProblem make_problem(const Case& c, std::uint64_t seed) {
  HostProblem p;
  p.c = c;
  Rng rng(seed);
  const std::size_t E = static_cast<std::size_t>(c.E);

  // 1. Routing -> offsets, row_token (dispatch_plan), then padding and the extra rows.
  std::vector<std::int64_t> counts(E, 0);
  std::vector<std::int32_t> tokens_in_order;
  if (c.identity) {
    // Row r is token r: expert e takes a contiguous run of tokens; the last `extra` tokens go nowhere.
    const std::int64_t routed = std::max<std::int64_t>(c.T - c.extra, 1);
    const IndexMatrix ids = route(c, routed, rng);
    for (Index t = 0; t < routed; ++t) ++counts[static_cast<std::size_t>(ids(t, 0))];
  } else {
    const IndexMatrix ids = route(c, c.T, rng);
    Dispatch plan;
    dispatch_plan(plan, ids, IndexMatrix(), c.E);
    counts = plan.counts;
    tokens_in_order = plan.row_token;
  }
  p.offsets.assign(E + 1, 0);
  std::size_t next = 0;  // in tokens_in_order
  for (std::size_t e = 0; e < E; ++e) {
    const std::int64_t n = counts[e];
    const std::int64_t padded = c.pad > 0 ? (n + c.pad - 1) / c.pad * c.pad : n;
    p.offsets[e + 1] = static_cast<std::int32_t>(p.offsets[e] + padded);
    if (!c.identity) {
      for (std::int64_t i = 0; i < padded; ++i) p.row_token.push_back(i < n ? tokens_in_order[next++] : -1);
    }
  }
  if (c.identity) {
    p.rows = c.T;
  } else {
    p.rows = p.used() + c.extra;
    // Rows past offsets[E] name real tokens: a kernel that ignored offsets[E] would write them.
    for (int i = 0; i < c.extra; ++i) p.row_token.push_back(static_cast<std::int32_t>(i % c.T));
  }
  if (c.scale) {
    // Padding rows get NaN: their outputs must be zeros whatever their scale.
    for (std::int64_t r = 0; r < p.rows; ++r) {
      const bool padding = p.token(r) < 0;
      p.scale_up.push_back(padding ? std::numeric_limits<float>::quiet_NaN() : static_cast<float>(rng.uniform(0.25, 2.0)));
      p.scale_down.push_back(padding ? std::numeric_limits<float>::quiet_NaN() : static_cast<float>(rng.uniform(0.25, 2.0)));
    }
  }

  // 2. Inputs: pre-activations and outputs of order 1.
  p.x = random_bf16(static_cast<std::size_t>(c.T * c.C), 1.0, rng);
  p.w_gate_up = random_bf16(E * static_cast<std::size_t>(2 * c.H * c.C), 1.0 / std::sqrt(double(c.C)), rng);
  p.w_down = random_bf16(E * static_cast<std::size_t>(c.C * c.H), 1.0 / std::sqrt(double(c.H)), rng);

  // 3. The reference's hidden per expert, and the slack of an fp32 accumulation of C terms.
  const Index C = c.C;
  const Index H = c.H;
  p.hidden_ref.assign(static_cast<std::size_t>(p.rows * H), 0.0);
  p.hidden_slack.assign(static_cast<std::size_t>(p.rows * H), 0.0);
  const ExpertConfig config{.hidden_size = C, .intermediate_size = H, .activation = Activation::swiglu};
  for (int e = 0; e < c.E; ++e) {
    const std::vector<std::int64_t> rows = real_rows(p, e);
    if (rows.empty()) continue;
    const Index n = static_cast<Index>(rows.size());
    MatrixD xe(n, C);  // s_r x_t: the gate on the expert's input
    for (Index i = 0; i < n; ++i) {
      const std::int64_t r = rows[static_cast<std::size_t>(i)];
      const double s = c.scale ? p.scale_up[static_cast<std::size_t>(r)] : 1.0;
      const std::size_t t = static_cast<std::size_t>(p.token(r));
      for (Index ci = 0; ci < C; ++ci) xe(i, ci) = s * bf16_value(p.x[t * static_cast<std::size_t>(C) + static_cast<std::size_t>(ci)]);
    }
    const ExpertParamsT<double> params = expert_params(p, e);
    MatrixD y;
    ExpertCacheT<double> cache;
    expert_forward(y, cache, xe, params, config);
    const MatrixD xa = xe.cwiseAbs();
    MatrixD sum_g;  // sum_c |x_c wg_c|
    sum_g.noalias() = xa * params.w_gate.cwiseAbs().transpose();
    MatrixD sum_u;
    sum_u.noalias() = xa * params.w_up.cwiseAbs().transpose();
    for (Index i = 0; i < n; ++i) {
      const std::size_t base = static_cast<std::size_t>(rows[static_cast<std::size_t>(i)] * H);
      for (Index h = 0; h < H; ++h) {
        const double g = cache.gate_pre(i, h);
        const double u = cache.up_pre(i, h);
        const double silu_g = g / (1.0 + std::exp(-g));
        p.hidden_ref[base + static_cast<std::size_t>(h)] = cache.hidden(i, h);
        p.hidden_slack[base + static_cast<std::size_t>(h)] =
            double(C) * kUFp32 * (1.1 * std::abs(u) * sum_g(i, h) + std::abs(silu_g) * sum_u(i, h));
      }
    }
  }
  return p;
}

// Two ulps of bf16 at |v| (8 significant bits), the smallest subnormal's spacing near 0.
double two_bf16_ulps(double v) {
  const double a = std::abs(v);
  if (a < 0x1.0p-126) return 2 * 0x1.0p-133;
  return 2 * std::ldexp(1.0, std::ilogb(a) - 7);
}

// --- checking --------------------------------------------------------------------------------------

// Collects the comparison of one output matrix and prints its first failures.
struct Report {
  const char* what;
  std::int64_t checked = 0;
  std::int64_t failures = 0;
  double diff2 = 0;  // sum of squared differences over real rows
  double ref2 = 0;
  void fail(const std::string& message) {
    if (++failures <= 12) ADD_FAILURE() << what << message;
  }
  void compare(double got, double ref, double tol, std::int64_t r, std::int64_t col, int e, std::int32_t t) {
    ++checked;
    const double diff = got - ref;
    diff2 += diff * diff;
    ref2 += ref * ref;
    if (!(std::abs(diff) <= tol)) {  // NaN fails
      fail("[row " + std::to_string(r) + ", col " + std::to_string(col) + "] expert " + std::to_string(e) +
           ", token " + std::to_string(t) + ": device " + std::to_string(got) + ", reference " +
           std::to_string(ref) + ", |diff| " + std::to_string(std::abs(diff)) + " > tolerance " + std::to_string(tol));
    }
  }
  double relative() const { return ref2 > 0 ? std::sqrt(diff2 / ref2) : std::sqrt(diff2); }
  void finish() {
    std::printf("  %-7s %10lld elements compared, %lld failures, ||device - ref|| / ||ref|| = %.3e\n", what,
                static_cast<long long>(checked), static_cast<long long>(failures), relative());
    EXPECT_EQ(failures, 0) << what << ": " << failures << " of the elements failed (first ones above)";
    EXPECT_LT(relative(), 5e-3) << what << ": relative error of the whole matrix";
  }
};

constexpr Bf16Bits kPoison = 0xFFFF;  // DeviceBuffer::poison(0xFF): a bf16 NaN

// The rows that are not real (padding, and past offsets[E]) of a (rows, width) output.
void check_other_rows(const HostProblem& p, const std::vector<Bf16Bits>& got, std::int64_t width, Report& rep) {
  for (std::int64_t r = 0; r < p.rows; ++r) {
    const bool past = r >= p.used();
    if (!past && p.token(r) >= 0) continue;
    for (std::int64_t col = 0; col < width; ++col) {
      const Bf16Bits b = got[static_cast<std::size_t>(r * width + col)];
      if (past && b != kPoison) {
        rep.fail(fmt::format("[row {}, col {}]: row >= offsets[E] = {} was written ({:#06x}), must stay untouched",
                             r, col, p.used(), b));
      } else if (!past && (b & 0x7FFF) != 0) {
        rep.fail(fmt::format("[row {}, col {}] padding row (expert {}): device bits {:#06x}, must be zero", r, col,
                             p.expert_of(r), b));
      }
    }
  }
}

void check_hidden(const HostProblem& p, const std::vector<Bf16Bits>& got) {
  Report rep{"hidden"};
  const std::int64_t H = p.c.H;
  for (int e = 0; e < p.c.E; ++e) {
    for (const std::int64_t r : real_rows(p, e)) {
      for (std::int64_t h = 0; h < H; ++h) {
        const std::size_t i = static_cast<std::size_t>(r * H + h);
        const double ref = p.hidden_ref[i];
        rep.compare(bf16_value(got[i]), ref, two_bf16_ulps(ref) + p.hidden_slack[i], r, h, e, p.token(r));
      }
    }
  }
  check_other_rows(p, got, H, rep);
  rep.finish();
}

// out against s'_r hidden_in Wd^T in double, hidden_in being what the down GEMM read.
void check_out(const HostProblem& p, const std::vector<Bf16Bits>& hidden_in, const std::vector<Bf16Bits>& got) {
  Report rep{"out"};
  const Index C = p.c.C;
  const Index H = p.c.H;
  for (int e = 0; e < p.c.E; ++e) {
    const std::vector<std::int64_t> rows = real_rows(p, e);
    if (rows.empty()) continue;
    const Index n = static_cast<Index>(rows.size());
    MatrixD he(n, H);
    for (Index i = 0; i < n; ++i)
      for (Index h = 0; h < H; ++h)
        he(i, h) = bf16_value(hidden_in[static_cast<std::size_t>(rows[static_cast<std::size_t>(i)] * H + h)]);
    const ExpertParamsT<double> params = expert_params(p, e);
    MatrixD y;
    y.noalias() = he * params.w_down.transpose();
    MatrixD sum_abs;
    sum_abs.noalias() = he.cwiseAbs() * params.w_down.cwiseAbs().transpose();
    for (Index i = 0; i < n; ++i) {
      const std::int64_t r = rows[static_cast<std::size_t>(i)];
      const double s = p.c.scale ? p.scale_down[static_cast<std::size_t>(r)] : 1.0;
      for (Index ci = 0; ci < C; ++ci) {
        const double ref = s * y(i, ci);
        const double tol = two_bf16_ulps(ref) + double(H) * kUFp32 * s * sum_abs(i, ci);
        rep.compare(bf16_value(got[static_cast<std::size_t>(r * C + ci)]), ref, tol, r, ci, e, p.token(r));
      }
    }
  }
  check_other_rows(p, got, C, rep);
  rep.finish();
}

// --- the device tests ------------------------------------------------------------------------------

struct Param {
  int case_index;
  int version;
};

std::string param_name(const testing::TestParamInfo<Param>& info) {
  return "v" + std::to_string(info.param.version) + "_" + case_label(kCases[info.param.case_index]);
}
void PrintTo(const Param& p, std::ostream* os) { *os << "v" << p.version << " " << case_label(kCases[p.case_index]); }

std::vector<Param> all_params() {
  std::vector<Param> params;
  for (int v = 1; v <= kExpertGemmVersions; ++v)
    for (int i = 0; i < static_cast<int>(std::size(kCases)); ++i) params.push_back({i, v});
  return params;
}

// Skips version 3 unless the device is sm_90 (its wgmma code runs nowhere else).
#define SKIP_UNLESS_VERSION_RUNS(version)                                                             \
  do {                                                                                                \
    const DeviceStatus s_ = device_status();                                                          \
    if ((version) == 3 && s_.sm != 90)                                                                \
      GTEST_SKIP() << "version 3 (wgmma) needs an sm_90 device; this one is sm_" << s_.sm << " (" \
                   << s_.name << ")";                                                                 \
  } while (false)

class CudaExpertGemm : public testing::TestWithParam<Param> {};

// Both GEMMs of one version on one routed problem: hidden against expert_forward's h, out against
// the down projection of the device's hidden; padding rows zero, rows past offsets[E] untouched.
TEST_P(CudaExpertGemm, MatchesReference) {
  SKIP_WITHOUT_DEVICE();
  const auto [case_index, version] = GetParam();
  SKIP_UNLESS_VERSION_RUNS(version);
  const Case& c = kCases[case_index];
  const std::uint64_t seed = 1000 + static_cast<std::uint64_t>(case_index);
  SCOPED_TRACE("v" + std::to_string(version) + " " + case_label(c) + ", seed " + std::to_string(seed));
  const HostProblem p = make_problem(c, seed);
  std::printf("  rows %lld (offsets[E] = %lld), mean %.1f rows per expert\n", static_cast<long long>(p.rows),
              static_cast<long long>(p.used()), double(p.rows) / c.E);

  const DeviceBuffer<Bf16Bits> x(std::span<const Bf16Bits>(p.x));
  const DeviceBuffer<Bf16Bits> w_gate_up(std::span<const Bf16Bits>(p.w_gate_up));
  const DeviceBuffer<Bf16Bits> w_down(std::span<const Bf16Bits>(p.w_down));
  const DeviceBuffer<std::int32_t> offsets(std::span<const std::int32_t>(p.offsets));
  const DeviceBuffer<std::int32_t> row_token(std::span<const std::int32_t>(p.row_token));  // null if identity
  const DeviceBuffer<float> scale_up(std::span<const float>(p.scale_up));                  // null if no scale
  const DeviceBuffer<float> scale_down(std::span<const float>(p.scale_down));
  DeviceBuffer<Bf16Bits> hidden(static_cast<std::size_t>(p.rows * c.H));
  DeviceBuffer<Bf16Bits> out(static_cast<std::size_t>(p.rows * c.C));

  hidden.poison();
  launch_gate_up({.x = x.data(),
                  .row_token = row_token.data(),
                  .offsets = offsets.data(),
                  .row_scale = scale_up.data(),
                  .w_gate_up = w_gate_up.data(),
                  .hidden = hidden.data(),
                  .tokens = c.T,
                  .rows = p.rows,
                  .hidden_size = c.C,
                  .intermediate_size = c.H,
                  .num_experts = c.E},
                 version);
  check_cuda(cudaDeviceSynchronize(), "gate/up kernel");
  std::vector<Bf16Bits> hidden_dev = hidden.download();
  check_hidden(p, hidden_dev);

  // The down GEMM reads the device's hidden, with garbage in the padding rows (it must ignore
  // them) and the poison left in rows past offsets[E].
  Rng garbage(seed + 77);
  for (std::int64_t r = 0; r < p.used(); ++r) {
    if (p.token(r) >= 0) continue;
    for (std::int64_t h = 0; h < c.H; ++h)
      hidden_dev[static_cast<std::size_t>(r * c.H + h)] =
          static_cast<Bf16Bits>(encode(static_cast<float>(garbage.uniform(-100, 100)), Format::bf16));
  }
  hidden.upload(hidden_dev);
  out.poison();
  launch_down({.hidden = hidden.data(),
               .row_token = row_token.data(),
               .offsets = offsets.data(),
               .row_scale = scale_down.data(),
               .w_down = w_down.data(),
               .out = out.data(),
               .rows = p.rows,
               .hidden_size = c.C,
               .intermediate_size = c.H,
               .num_experts = c.E},
              version);
  check_cuda(cudaDeviceSynchronize(), "down kernel");
  check_out(p, hidden_dev, out.download());
}

INSTANTIATE_TEST_SUITE_P(AllVersions, CudaExpertGemm, testing::ValuesIn(all_params()), param_name);

// Every version computes the same function: on one problem, versions 2 and 3 agree with version 1
// to within a few bf16 ulps (they round the same fp32 sums, accumulated in other orders), and
// relaunching a version gives the same bits (no race: the output does not change between runs).
TEST(CudaExpertGemmVersions, AgreeAndRepeat) {
  SKIP_WITHOUT_DEVICE();
  const Case c{256, 512, 8, 300, 2, Routing::skewed, 0, true};
  const HostProblem p = make_problem(c, 4242);
  const DeviceBuffer<Bf16Bits> x(std::span<const Bf16Bits>(p.x));
  const DeviceBuffer<Bf16Bits> w_gate_up(std::span<const Bf16Bits>(p.w_gate_up));
  const DeviceBuffer<std::int32_t> offsets(std::span<const std::int32_t>(p.offsets));
  const DeviceBuffer<std::int32_t> row_token(std::span<const std::int32_t>(p.row_token));
  const DeviceBuffer<float> scale_up(std::span<const float>(p.scale_up));
  DeviceBuffer<Bf16Bits> hidden(static_cast<std::size_t>(p.rows * c.H));
  auto run = [&](int version) {
    hidden.poison();
    launch_gate_up({.x = x.data(), .row_token = row_token.data(), .offsets = offsets.data(),
                    .row_scale = scale_up.data(), .w_gate_up = w_gate_up.data(), .hidden = hidden.data(),
                    .tokens = c.T, .rows = p.rows, .hidden_size = c.C, .intermediate_size = c.H,
                    .num_experts = c.E},
                   version);
    check_cuda(cudaDeviceSynchronize(), "gate/up kernel");
    return hidden.download();
  };
  const std::vector<Bf16Bits> v1 = run(1);
  const int last = device_status().sm == 90 ? kExpertGemmVersions : 2;
  for (int v = 1; v <= last; ++v) {
    const std::vector<Bf16Bits> first = run(v);
    EXPECT_EQ(first, run(v)) << "version " << v << " gave different bits on a second run";
    std::int64_t far = 0;
    for (std::int64_t r = 0; r < p.used(); ++r) {
      for (std::int64_t h = 0; h < c.H; ++h) {
        const std::size_t i = static_cast<std::size_t>(r * c.H + h);
        const double a = bf16_value(v1[i]);
        const double b = bf16_value(first[i]);
        if (!(std::abs(a - b) <= 2 * two_bf16_ulps(a) + p.hidden_slack[i]) && ++far <= 5)
          ADD_FAILURE() << "version " << v << " vs 1 at [" << r << ", " << h << "]: " << b << " vs " << a;
      }
    }
    EXPECT_EQ(far, 0);
  }
}

// --- argument checks: before any CUDA call, so they run without a GPU --------------------------------

// Device-looking pointers that are never dereferenced (every case below throws first).
template <typename T>
T* fake(std::uintptr_t address = 0x10000) {
  return reinterpret_cast<T*>(address);
}

GateUpArgs valid_gate_up() {
  return {.x = fake<const Bf16Bits>(), .row_token = fake<const std::int32_t>(), .offsets = fake<const std::int32_t>(),
          .row_scale = nullptr, .w_gate_up = fake<const Bf16Bits>(), .hidden = fake<Bf16Bits>(), .tokens = 16,
          .rows = 32, .hidden_size = 64, .intermediate_size = 128, .num_experts = 8};
}
DownArgs valid_down() {
  return {.hidden = fake<const Bf16Bits>(), .row_token = fake<const std::int32_t>(), .offsets = fake<const std::int32_t>(),
          .row_scale = nullptr, .w_down = fake<const Bf16Bits>(), .out = fake<Bf16Bits>(), .rows = 32,
          .hidden_size = 64, .intermediate_size = 128, .num_experts = 8};
}

// The version must be one of the ladder's.
TEST(CudaExpertGemmArguments, RejectsVersionOutOfRange) {
  for (const int v : {0, -1, kExpertGemmVersions + 1}) {
    expect_error_naming([&] { launch_gate_up(valid_gate_up(), v); }, "version");
    expect_error_naming([&] { launch_down(valid_down(), v); }, "version");
  }
}

// C and H must be positive multiples of 8 (16-byte rows), E >= 1, rows and tokens >= 0.
TEST(CudaExpertGemmArguments, RejectsSizes) {
  for (const int v : {1, 2}) {
    GateUpArgs a = valid_gate_up();
    a.hidden_size = 60;
    expect_error_naming([&] { launch_gate_up(a, v); }, "hidden_size");
    a.hidden_size = 0;
    expect_error_naming([&] { launch_gate_up(a, v); }, "hidden_size");
    a = valid_gate_up();
    a.intermediate_size = 100;
    expect_error_naming([&] { launch_gate_up(a, v); }, "intermediate_size");
    a = valid_gate_up();
    a.num_experts = 0;
    expect_error_naming([&] { launch_gate_up(a, v); }, "num_experts");
    a = valid_gate_up();
    a.rows = -1;
    expect_error_naming([&] { launch_gate_up(a, v); }, "rows");
    a = valid_gate_up();
    a.tokens = -1;
    expect_error_naming([&] { launch_gate_up(a, v); }, "tokens");
    a = valid_gate_up();
    a.row_token = nullptr;  // identity rows: row r reads x's row r, so rows <= tokens
    expect_error_naming([&] { launch_gate_up(a, v); }, "rows");

    DownArgs d = valid_down();
    d.hidden_size = 12;
    expect_error_naming([&] { launch_down(d, v); }, "hidden_size");
    d = valid_down();
    d.intermediate_size = 4;
    expect_error_naming([&] { launch_down(d, v); }, "intermediate_size");
    d = valid_down();
    d.num_experts = -3;
    expect_error_naming([&] { launch_down(d, v); }, "num_experts");
  }
}

// Every buffer the kernels touch must be given.
TEST(CudaExpertGemmArguments, RejectsNullPointers) {
  for (const int v : {1, 2}) {
    GateUpArgs a = valid_gate_up();
    a.x = nullptr;
    expect_error_naming([&] { launch_gate_up(a, v); }, "x");
    a = valid_gate_up();
    a.offsets = nullptr;
    expect_error_naming([&] { launch_gate_up(a, v); }, "offsets");
    a = valid_gate_up();
    a.w_gate_up = nullptr;
    expect_error_naming([&] { launch_gate_up(a, v); }, "w_gate_up");
    a = valid_gate_up();
    a.hidden = nullptr;
    expect_error_naming([&] { launch_gate_up(a, v); }, "hidden");

    DownArgs d = valid_down();
    d.hidden = nullptr;
    expect_error_naming([&] { launch_down(d, v); }, "hidden");
    d = valid_down();
    d.offsets = nullptr;
    expect_error_naming([&] { launch_down(d, v); }, "offsets");
    d = valid_down();
    d.w_down = nullptr;
    expect_error_naming([&] { launch_down(d, v); }, "w_down");
    d = valid_down();
    d.out = nullptr;
    expect_error_naming([&] { launch_down(d, v); }, "out");
  }
}

// Versions 2 and 3 copy 16-byte chunks: the matrices must be 16-byte aligned.
TEST(CudaExpertGemmArguments, RejectsMisalignedForTensorCoreVersions) {
  GateUpArgs a = valid_gate_up();
  a.x = fake<const Bf16Bits>(0x10002);
  expect_error_naming([&] { launch_gate_up(a, 2); }, "x");
  DownArgs d = valid_down();
  d.w_down = fake<const Bf16Bits>(0x10008);
  expect_error_naming([&] { launch_down(d, 2); }, "w_down");
}

// No rows: nothing to do, nothing touched, no pointer needed (and no GPU).
TEST(CudaExpertGemmArguments, ZeroRowsIsANoOp) {
  for (int v = 1; v <= kExpertGemmVersions; ++v) {
    EXPECT_NO_THROW(launch_gate_up({.rows = 0, .hidden_size = 64, .intermediate_size = 64}, v));
    EXPECT_NO_THROW(launch_down({.rows = 0, .hidden_size = 64, .intermediate_size = 64}, v));
  }
}

// Version 3 is Hopper's wgmma: anywhere but sm_90 it throws, naming the version.
TEST(CudaExpertGemmArguments, Version3NeedsSm90) {
  const DeviceStatus status = device_status();
  if (status.available && status.sm == 90) GTEST_SKIP() << "this device is sm_90: version 3 runs here";
  expect_error_naming([&] { launch_gate_up(valid_gate_up(), 3); }, "version");
  expect_error_naming([&] { launch_down(valid_down(), 3); }, "version");
}

}  // namespace
}  // namespace moelab::cuda
