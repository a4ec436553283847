// moelab/tests/cuda/test_router_device.cpp — every version of cuda/router.cu against the reference.
//
// Each case is a published routing convention (a preset of reference/presets.h, evaluated: noise
// off) or a variation of one that stresses a rule: bf16 and fp32 routers and activations, group
// masks, a negative selection bias under the zero mask, exact ties, large logits, 1024 experts.
// Every version routes fresh seeded random tokens for T in {0, 1, 7, 128, 1000, 16384}, with a
// hidden size per T (the preset's own for T = 1, smaller ones, some not multiples of 8 or 32, for
// more tokens, so the double-precision reference stays fast). Outputs are poisoned before every run
// and have poisoned guard elements after them. What is compared, for every element:
//   logits  within the float32 accumulation bound of the exact (double) value:
//           |l - l_exact| <= gamma_{C+2} (sum_c |x_c w_c| + |b|), gamma_n = n u / (1 - n u),
//           u = 2^-24 (Higham, "Accuracy and Stability", eq. 3.5: any order of summation); for a
//           bf16 router, l must be one of the bf16 roundings of values within that bound.
//   ids     (A) against route_forward<double> on the same inputs: equal, except where the device's
//           logits (within the bound above) can legitimately reorder candidates whose ranked
//           values are that close (near-ties: counted and required to be rare);
//           (B) against the reference selection applied in double to the device's own logits:
//           equal up to float32 scoring error (about 1e-5 relative, and float32 underflow of
//           tiny softmax scores), and with *exact* ties in id order. B is what checks the
//           tie-breaking and the group logic tightly.
//   gates   the reference gating (gating_forward<double>) of the device's ids, from the device's
//           logits (float32 rounding only) and from the reference's logits (plus the effect of
//           the logits' deviation).
// A run without stored logits must give bitwise the same ids and gates. Without a GPU the device
// tests skip; the argument checks run, because they throw before the device is touched.
#include "cuda/router.h"

#include <gtest/gtest.h>

#include "tests/cuda/device_testing.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iostream>
#include <limits>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "reference/error.h"
#include "reference/numerics.h"
#include "reference/presets.h"
#include "reference/random.h"
#include "reference/routing.h"

namespace moelab::cuda {
namespace {

constexpr double kU32 = 0x1p-24;   // float32 unit roundoff
constexpr int kGuard = 16;         // poisoned elements after every output
constexpr int kMaxReports = 8;     // mismatches printed per check

// ---- the cases --------------------------------------------------------------------------------

struct Case {
  std::string name;
  RoutingConfig config;            // hidden_size is set per token count
  Format x_dtype = Format::bf16;   // the activations on the device
  double logit_std = 1.0;          // the logits are about N(0, logit_std^2)
  double selection_bias_mean = 0;  // selection bias ~ N(mean, 0.05^2)
  bool duplicate_rows = false;     // expert 4i + 1 copies expert 4i (weights and biases): exact ties
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

RoutingConfig preset(std::string_view name) {
  RoutingConfig c = find_preset(name).full;
  c.router.noise = RouterNoise::none;  // evaluation: the CUDA router has no training-time noise
  return c;
}
RoutingConfig with_dtype(RoutingConfig c, Format dtype) {
  c.router.dtype = dtype;
  return c;
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  cases.push_back({.name = "mixtral", .config = preset("mixtral")});
  cases.push_back({.name = "mixtral_bf16_router_fp32_x",
                   .config = with_dtype(preset("mixtral"), Format::bf16),
                   .x_dtype = Format::fp32});
  cases.push_back({.name = "mixtral_large_logits", .config = preset("mixtral"), .logit_std = 40});
  cases.push_back({.name = "qwen3_moe", .config = preset("qwen3_moe"), .x_dtype = Format::fp32});
  cases.push_back({.name = "qwen3_moe_bf16_router", .config = with_dtype(preset("qwen3_moe"), Format::bf16)});
  cases.push_back({.name = "qwen3_moe_large_logits", .config = preset("qwen3_moe"), .logit_std = 40});
  cases.push_back({.name = "qwen3_moe_ties", .config = preset("qwen3_moe"), .duplicate_rows = true});
  cases.push_back({.name = "olmoe", .config = preset("olmoe")});
  cases.push_back({.name = "qwen2_moe", .config = preset("qwen2_moe"), .x_dtype = Format::fp32});
  cases.push_back({.name = "gpu_mode_amd", .config = preset("gpu_mode_amd")});
  cases.push_back({.name = "switch", .config = preset("switch")});
  {
    RoutingConfig c = preset("gshard");  // 2048 experts published; 1024 is the CUDA router's limit
    c.router.num_experts = 1024;
    cases.push_back({.name = "gshard_1024_experts", .config = c});
  }
  cases.push_back({.name = "deepseek_v2_device_limited", .config = preset("deepseek_v2")});
  {
    RoutingConfig c = preset("deepseek_v2");  // the model card's group_limited_greedy
    c.selection = SelectionKind::group_limited;
    c.group = {.n_group = 8, .topk_group = 3, .score = GroupScore::max, .mask = GroupMask::neg_inf};
    c.aux_loss = AuxLoss::none;  // the device and communication losses need device_limited
    c.device_loss_coef = c.comm_loss_coef = 0;
    cases.push_back({.name = "deepseek_v2_group_limited_greedy_bf16_router",
                     .config = with_dtype(c, Format::bf16),
                     .x_dtype = Format::fp32});
  }
  cases.push_back({.name = "deepseek_v3", .config = preset("deepseek_v3")});
  cases.push_back({.name = "deepseek_v3_bf16_router", .config = with_dtype(preset("deepseek_v3"), Format::bf16)});
  cases.push_back({.name = "deepseek_v3_fp32_x", .config = preset("deepseek_v3"), .x_dtype = Format::fp32});
  {
    RoutingConfig c = preset("deepseek_v3");  // Hugging Face's masked_fill(0.0) with a negative bias:
    c.group.mask = GroupMask::zero;           // biased scores of kept experts fall below the mask
    cases.push_back({.name = "deepseek_v3_zero_mask_negative_bias", .config = c, .selection_bias_mean = -0.8});
  }
  cases.push_back({.name = "deepseek_v3_ties", .config = preset("deepseek_v3"), .duplicate_rows = true});
  {
    RoutingConfig c = preset("deepseek_v3");  // DeepSeek-V4's scoring with V3's selection
    c.scoring = Scoring::sqrt_softplus;
    cases.push_back({.name = "sqrt_softplus_group_limited", .config = c});
  }
  cases.push_back({.name = "llama4", .config = preset("llama4")});
  cases.push_back({.name = "llama4_large_logits", .config = preset("llama4"), .logit_std = 40});
  cases.push_back({.name = "gpt_oss", .config = preset("gpt_oss")});
  cases.push_back({.name = "gpt_oss_bf16_router_fp32_x",
                   .config = with_dtype(preset("gpt_oss"), Format::bf16),
                   .x_dtype = Format::fp32});
  {
    RoutingConfig c = preset("olmoe");  // gates of ones, renormalised and scaled: 3 / k each
    c.gating = {.kind = GateKind::ones, .renormalize = true, .routed_scaling_factor = 3.0};
    cases.push_back({.name = "ones_renormalized_scaled", .config = c});
  }
  return cases;
}

std::string case_name(const testing::TestParamInfo<Case>& info) { return info.param.name; }

// The hidden size a run uses: the preset's own for one token; for more, sizes that keep the double
// reference fast and cover the kernels' paths: 1000 and 136 (multiples of 8: 16-byte loads, a
// partial step of 32), 203 (odd: element loads, unaligned rows), 48 (T = 16384).
Index hidden_for(std::int64_t T, Index full) {
  switch (T) {
    case 1: return full;
    case 7: return std::min<Index>(full, 1000);
    case 128: return 203;
    case 1000: return 136;
    default: return 48;
  }
}

// ---- inputs -------------------------------------------------------------------------------------

// The inputs exactly as the device sees them (bf16 ones as the floats they decode to).
struct Problem {
  Index T = 0, C = 0, E = 0;
  std::vector<float> x;               // (T, C)
  std::vector<Bf16Bits> x_bits;       // (T, C) when x is bf16
  std::vector<float> w;               // (E, C)
  std::vector<Bf16Bits> w_bits;       // (E, C) when the router is bf16
  std::vector<float> bias;            // (E) when use_bias
  std::vector<float> selection_bias;  // (E) when use_selection_bias
};

Problem make_problem(const Case& cs, const RoutingConfig& config, std::int64_t T, std::uint64_t seed) {
  Problem p;
  p.T = T;
  p.C = config.router.hidden_size;
  p.E = config.num_experts();
  Rng rng(seed);
  const auto normal = [&](double std_dev) { return static_cast<float>(std_dev * rng.normal()); };
  const bool dup = cs.duplicate_rows;
  const auto copy_of = [&](Index e) { return dup && e % 4 == 1; };  // expert 4i + 1 copies 4i

  p.x.resize(static_cast<std::size_t>(T * p.C));
  for (float& v : p.x) v = normal(1.0);
  if (cs.x_dtype == Format::bf16) {
    p.x_bits = to_bf16(p.x);
    p.x = from_bf16(p.x_bits);
  }
  // w ~ N(0, std^2 / C): each logit sums C products of variance std^2 / C.
  const double w_std = cs.logit_std / std::sqrt(static_cast<double>(p.C));
  p.w.resize(static_cast<std::size_t>(p.E * p.C));
  for (Index e = 0; e < p.E; ++e)
    for (Index c = 0; c < p.C; ++c)
      p.w[static_cast<std::size_t>(e * p.C + c)] =
          copy_of(e) ? p.w[static_cast<std::size_t>((e - 1) * p.C + c)] : normal(w_std);
  if (config.router.dtype == Format::bf16) {
    p.w_bits = to_bf16(p.w);
    p.w = from_bf16(p.w_bits);
  }
  const auto make_bias = [&](double mean, double std_dev) {
    std::vector<float> b(static_cast<std::size_t>(p.E));
    for (Index e = 0; e < p.E; ++e)
      b[static_cast<std::size_t>(e)] =
          copy_of(e) ? b[static_cast<std::size_t>(e - 1)] : static_cast<float>(mean) + normal(std_dev);
    return b;
  };
  if (config.router.use_bias) p.bias = make_bias(0.0, 0.5 * cs.logit_std);  // fp32: a bf16 router rounds it
  if (config.use_selection_bias) p.selection_bias = make_bias(cs.selection_bias_mean, 0.05);
  return p;
}

// ---- the reference ------------------------------------------------------------------------------

struct Reference {
  RoutingOutputT<double> out;  // route_forward<double>: logits, scores, ids, gates
  MatrixD exact;               // (T, E) x_r W_r^T + b_r in double, before rounding to the router dtype
  MatrixD magnitude;           // (T, E) sum_c |x_r,c w_r,ec| + |b_r,e|: the scale of the rounding error
};

RoutingParamsT<double> params_of(const Problem& p) {
  RoutingParamsT<double> params;
  params.router.weight = Eigen::Map<const Matrix>(p.w.data(), p.E, p.C).cast<double>();
  if (!p.bias.empty()) params.router.bias = Eigen::Map<const Vector>(p.bias.data(), p.E).cast<double>();
  if (!p.selection_bias.empty())
    params.selection_bias = Eigen::Map<const Vector>(p.selection_bias.data(), p.E).cast<double>();
  return params;
}

Reference reference(const Problem& p, const RoutingConfig& config) {
  Reference ref;
  const RoutingParamsT<double> params = params_of(p);
  const MatrixD x = Eigen::Map<const Matrix>(p.x.data(), p.T, p.C).cast<double>();
  route_forward<double>(ref.out, x, {}, params, config, nullptr);
  // What the router multiplies (reference/router.h): x and b rounded to a bf16 router's dtype.
  const Format f = config.router.dtype;
  const auto rounded = [f](double v) { return static_cast<double>(round_to(static_cast<float>(v), f)); };
  const MatrixD xr = f == Format::fp32 ? x : MatrixD(x.unaryExpr(rounded));
  ref.exact.noalias() = xr * params.router.weight.transpose();                      // (T, C) (C, E)
  ref.magnitude.noalias() = xr.cwiseAbs() * params.router.weight.cwiseAbs().transpose();
  if (config.router.use_bias) {
    const VectorT<double> b = f == Format::fp32 ? params.router.bias : VectorT<double>(params.router.bias.unaryExpr(rounded));
    ref.exact.rowwise() += b.transpose();
    ref.magnitude.rowwise() += b.cwiseAbs().transpose();
  }
  return ref;
}

// ---- running a version --------------------------------------------------------------------------

struct DeviceInputs {
  DeviceBuffer<float> x_f32;
  DeviceBuffer<Bf16Bits> x_bf16;
  DeviceBuffer<float> w_f32;
  DeviceBuffer<Bf16Bits> w_bf16;
  DeviceBuffer<float> bias, selection_bias;
  explicit DeviceInputs(const Problem& p) {
    if (!p.x_bits.empty()) {
      x_bf16 = DeviceBuffer<Bf16Bits>(std::span<const Bf16Bits>(p.x_bits));
    } else {
      x_f32 = DeviceBuffer<float>(std::span<const float>(p.x));
    }
    if (!p.w_bits.empty()) {
      w_bf16 = DeviceBuffer<Bf16Bits>(std::span<const Bf16Bits>(p.w_bits));
    } else {
      w_f32 = DeviceBuffer<float>(std::span<const float>(p.w));
    }
    if (!p.bias.empty()) bias = DeviceBuffer<float>(std::span<const float>(p.bias));
    if (!p.selection_bias.empty()) selection_bias = DeviceBuffer<float>(std::span<const float>(p.selection_bias));
  }
};

struct Outputs {  // host copies, guard elements included
  std::vector<float> logits;       // (T * E + kGuard), empty when not stored
  std::vector<std::int32_t> ids;   // (T * k + kGuard)
  std::vector<float> gates;        // (T * k + kGuard)
};

Outputs run_version(const DeviceInputs& in, const Problem& p, const RoutingConfig& config, int version,
                    bool store_logits) {
  const auto k = static_cast<std::size_t>(config.top_k);
  const auto T = static_cast<std::size_t>(p.T);
  DeviceBuffer<float> logits(store_logits ? T * static_cast<std::size_t>(p.E) + kGuard : 0);
  DeviceBuffer<std::int32_t> ids(T * k + kGuard);
  DeviceBuffer<float> gates(T * k + kGuard);
  logits.poison();  // NaN floats, id -1
  ids.poison();
  gates.poison();
  const RouterArgs args{.x = in.x_bf16.size() > 0 ? static_cast<const void*>(in.x_bf16.data())
                                                  : static_cast<const void*>(in.x_f32.data()),
                        .x_dtype = in.x_bf16.size() > 0 ? Format::bf16 : Format::fp32,
                        .weight = in.w_bf16.size() > 0 ? static_cast<const void*>(in.w_bf16.data())
                                                       : static_cast<const void*>(in.w_f32.data()),
                        .bias = in.bias.data(),
                        .selection_bias = in.selection_bias.data(),
                        .logits = store_logits ? logits.data() : nullptr,
                        .ids = ids.data(),
                        .gates = gates.data(),
                        .tokens = p.T};
  launch_router(args, config, version);
  check_cuda(cudaDeviceSynchronize(), "router kernel");
  return {logits.download(), ids.download(), gates.download()};
}

// ---- checking ids -------------------------------------------------------------------------------

bool ranks_logits(const RoutingConfig& c) {  // reference/routing.cpp's rule
  return c.gating.kind == GateKind::softmax_of_selected_logits || c.gating.kind == GateKind::sigmoid_of_selected_logits;
}

// What selection ranks, in double: the logits, or the scores plus the selection bias. (T, E)
MatrixD ranked_values(const MatrixD& logits, const MatrixD& scores, const RoutingConfig& c, const Problem& p) {
  if (ranks_logits(c)) return logits;
  MatrixD v = scores;
  if (c.use_selection_bias) {
    for (Index e = 0; e < p.E; ++e) v.col(e).array() += static_cast<double>(p.selection_bias[static_cast<std::size_t>(e)]);
  }
  return v;
}

// Whether `got` (k ids) is what a stable top-k could give on values v (E), each of which the
// device may have computed off by up to err[e]: distinct ids in range, no pair in an order that
// their values contradict by more than err[a] + err[b], and every exact tie (v equal, in double)
// in id order, lower first. The last rule is why an exact tie is never excused: equal values in
// double come from equal logits, which the device ranks as equal too. Says why not in *why.
bool consistent_topk(const std::vector<double>& v, const std::vector<double>& err, const std::int32_t* got, int k,
                     std::string* why) {
  const auto E = static_cast<std::int32_t>(v.size());
  std::vector<bool> chosen(v.size(), false);
  for (int j = 0; j < k; ++j) {
    if (got[j] < 0 || got[j] >= E || chosen[static_cast<std::size_t>(got[j])]) {
      *why = "slot " + std::to_string(j) + " holds id " + std::to_string(got[j]) + " (out of range or repeated)";
      return false;
    }
    chosen[static_cast<std::size_t>(got[j])] = true;
  }
  // a, ranked before b: b's value must not exceed a's by more than the two errors; a tie goes to a < b.
  const auto ordered = [&](std::int32_t a, std::int32_t b) {
    const auto ia = static_cast<std::size_t>(a), ib = static_cast<std::size_t>(b);
    return !(v[ib] - v[ia] > err[ia] + err[ib]) && !(v[ia] == v[ib] && a > b);
  };
  const auto describe = [&](std::int32_t e) {
    std::ostringstream s;
    s.precision(9);
    s << "expert " << e << " (value " << v[static_cast<std::size_t>(e)] << " +- " << err[static_cast<std::size_t>(e)]
      << ")";
    return s.str();
  };
  for (int j = 0; j < k; ++j) {
    for (int i = 0; i < j; ++i) {
      if (!ordered(got[i], got[j])) {
        *why = "slot " + std::to_string(i) + " = " + describe(got[i]) + " is ranked before slot " + std::to_string(j) +
               " = " + describe(got[j]);
        return false;
      }
    }
    for (std::int32_t e = 0; e < E; ++e) {
      if (chosen[static_cast<std::size_t>(e)] || ordered(got[j], e)) continue;
      *why = describe(e) + " was not chosen but ranks before slot " + std::to_string(j) + " = " + describe(got[j]);
      return false;
    }
  }
  return true;
}

// The selection's group limit in one form (device-limited = group-limited with max and -inf).
struct Groups {
  int G = 0, kept = 0;
  bool max_only = false;
  double mask = 0;
};
Groups groups_of(const RoutingConfig& c) {
  if (c.selection == SelectionKind::group_limited)
    return {c.group.n_group, c.group.topk_group, c.group.score == GroupScore::max,
            c.group.mask == GroupMask::neg_inf ? -std::numeric_limits<double>::infinity() : 0.0};
  if (c.selection == SelectionKind::device_limited)
    return {c.num_devices, c.topk_devices, true, -std::numeric_limits<double>::infinity()};
  return {};
}

// consistent_topk for group-limited selection: the groups kept must themselves be a consistent
// top-topk_group of the group scores (a group score's error: twice its members' largest), and
// `got` a consistent top-k of the values with the other groups masked (exactly). Groups near-tied
// at the boundary are tried each way.
bool consistent_selection(const std::vector<double>& v, const std::vector<double>& err, const std::int32_t* got, int k,
                          const Groups& g, std::string* why) {
  if (g.G == 0) return consistent_topk(v, err, got, k, why);
  const auto S = v.size() / static_cast<std::size_t>(g.G);
  const auto G = static_cast<std::size_t>(g.G);
  std::vector<double> score(G), score_err(G);
  for (std::size_t group = 0; group < G; ++group) {
    std::vector<double> members(v.begin() + static_cast<std::ptrdiff_t>(group * S),
                                v.begin() + static_cast<std::ptrdiff_t>((group + 1) * S));
    std::sort(members.begin(), members.end(), std::greater<>());
    score[group] = g.max_only || S < 2 ? members[0] : members[0] + members[1];
    score_err[group] = 2 * *std::max_element(err.begin() + static_cast<std::ptrdiff_t>(group * S),
                                             err.begin() + static_cast<std::ptrdiff_t>((group + 1) * S));
  }
  std::vector<std::size_t> order(G);
  for (std::size_t i = 0; i < G; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return score[a] > score[b]; });
  const std::size_t boundary = order[static_cast<std::size_t>(g.kept - 1)];
  // Groups that surely rank above the boundary group, and those that may rank either side of it.
  std::vector<std::size_t> sure, open;
  for (std::size_t group = 0; group < G; ++group) {
    const double margin = score[group] - score[boundary];
    const double tol = score_err[group] + score_err[boundary];
    if (margin > tol) {
      sure.push_back(group);
    } else if (-margin <= tol) {
      open.push_back(group);
    }
  }
  const int need = g.kept - static_cast<int>(sure.size());
  if (open.size() > 20) {
    *why = std::to_string(open.size()) + " groups are within the error of the kept boundary";
    return false;
  }
  std::string last_why = "no choice of kept groups is consistent with the group scores";
  for (std::uint32_t subset = 0; subset < (1u << open.size()); ++subset) {  // subsets of `open` of size need
    if (std::popcount(subset) != need) continue;
    std::vector<bool> kept(G, false);
    for (std::size_t group : sure) kept[group] = true;
    for (std::size_t i = 0; i < open.size(); ++i)
      if (subset & (1u << i)) kept[open[i]] = true;
    bool groups_ok = true;  // the kept groups against the dropped ones, as consistent_topk's rule
    for (std::size_t a = 0; a < G && groups_ok; ++a) {
      for (std::size_t b = 0; b < G && groups_ok; ++b) {
        if (!kept[a] || kept[b]) continue;
        groups_ok = !(score[b] - score[a] > score_err[a] + score_err[b]) && !(score[a] == score[b] && a > b);
      }
    }
    if (!groups_ok) continue;
    std::vector<double> masked = v, masked_err = err;
    for (std::size_t e = 0; e < masked.size(); ++e) {
      if (!kept[e / S]) masked[e] = g.mask, masked_err[e] = 0;
    }
    if (consistent_topk(masked, masked_err, got, k, &last_why)) return true;
  }
  *why = last_why;
  return false;
}

// ---- the checks ---------------------------------------------------------------------------------

struct Counts {
  std::int64_t near_ties_a = 0;  // tokens whose ids differ from the reference's, accepted as near-ties
  std::int64_t near_ties_b = 0;
  std::int64_t rounding_flips = 0;  // bf16 logits one rounding away from the reference's
};

// Reports a mismatch through gtest, at most kMaxReports per `count`.
void report(std::int64_t& count, const std::string& what) {
  if (++count <= kMaxReports) ADD_FAILURE() << what;
}

// logits: the float32 accumulation bound (see the top of this file).
void check_logits(const Outputs& o, const Reference& ref, const Problem& p, const RoutingConfig& config,
                  Counts& counts) {
  const double n = static_cast<double>(p.C + 2);
  const double gamma = n * kU32 / (1 - n * kU32);
  const bool bf16 = config.router.dtype == Format::bf16;
  std::int64_t bad = 0;
  for (Index t = 0; t < p.T; ++t) {
    for (Index e = 0; e < p.E; ++e) {
      const float got = o.logits[static_cast<std::size_t>(t * p.E + e)];
      const double exact = ref.exact(t, e);
      const double bound = gamma * ref.magnitude(t, e) + 1e-12 * std::abs(exact);
      bool ok = false;
      if (bf16) {
        const float lo = round_to(static_cast<float>(exact - bound), Format::bf16);
        const float hi = round_to(static_cast<float>(exact + bound), Format::bf16);
        ok = got >= lo && got <= hi;
        if (ok && static_cast<double>(got) != ref.out.logits(t, e)) ++counts.rounding_flips;
      } else {
        ok = std::abs(static_cast<double>(got) - exact) <= bound;
      }
      if (!ok) {
        std::ostringstream s;
        s.precision(9);
        s << "logits[" << t << "," << e << "] = " << got << ", reference " << ref.out.logits(t, e) << " (exact "
          << exact << ", accumulation bound " << bound << ")";
        report(bad, s.str());
      }
    }
  }
  EXPECT_EQ(bad, 0) << "logits outside the float32 accumulation bound";
}

// The largest |l_device - l_reference| of token t: how far the device's logits may move rankings.
double logit_deviation(const Outputs& o, const Reference& ref, Index t, Index E) {
  double d = 0;
  for (Index e = 0; e < E; ++e)
    d = std::max(d, std::abs(static_cast<double>(o.logits[static_cast<std::size_t>(t * E + e)]) - ref.out.logits(t, e)));
  return d;
}

// How far float32 scoring and bias addition can move the ranked value of expert e (score s,
// ranked value v): 1e-5 of the score (expf of arguments up to ~100 loses ~100 u; the softmax sum),
// float32 rounding of the biased sum, and underflow: a score below float32's normal range keeps
// only its absolute precision, 2^-149, and one below 2^-150 is 0, so scores that double still tells
// apart tie in float32 (the large-logit softmax cases; float32's reference ranks them so too).
// sqrt(softplus) takes the square root of that: sqrt(2^-148) ~ 4e-23. Zero when ranking by logits:
// they are the device's own.
double evaluation_error(const RoutingConfig& c, double s, double v) {
  if (ranks_logits(c)) return 0.0;
  const double underflow = c.scoring == Scoring::sqrt_softplus ? 4e-23 : 0x1p-148;
  return 1e-5 * std::abs(s) + 2e-7 * std::abs(v) + underflow;
}

// How far a deviation d of every logit of the token can move the ranked value of an expert with
// score s: the logit itself d; a softmax score by a factor e^(+-2d); sigmoid' <= 1/4 and
// sqrt(softplus)' <= 1/2 (both at most there, a little below).
double deviation_error(const RoutingConfig& c, double d, double s) {
  if (ranks_logits(c)) return d;
  switch (c.scoring) {
    case Scoring::softmax: return std::expm1(2 * d) * std::abs(s);
    case Scoring::sigmoid: return 0.25 * d;
    case Scoring::sqrt_softplus: return 0.5 * d;
  }
  return 0;
}

IndexMatrix ids_matrix(const Outputs& o, Index T, int k) {
  IndexMatrix ids(T, k);
  for (Index i = 0; i < T * k; ++i) ids.data()[i] = o.ids[static_cast<std::size_t>(i)];
  return ids;
}

// ids against the expected ids `want`, allowing near-ties: err(t, e) is how far the device may
// have computed token t's ranked value v(t, e) off.
void check_ids(const Outputs& o, const IndexMatrix& want, const MatrixD& v, const RoutingConfig& config,
               const std::function<double(Index, Index)>& err, std::int64_t& near_ties, const char* which) {
  const int k = config.top_k;
  const Groups groups = groups_of(config);
  std::int64_t bad = 0;
  std::vector<double> row(static_cast<std::size_t>(v.cols())), row_err(row.size());
  for (Index t = 0; t < v.rows(); ++t) {
    const std::int32_t* got = o.ids.data() + t * k;
    if (std::equal(got, got + k, want.row(t).data())) continue;
    for (Index e = 0; e < v.cols(); ++e) {
      row[static_cast<std::size_t>(e)] = v(t, e);
      row_err[static_cast<std::size_t>(e)] = err(t, e);
    }
    std::string why;
    if (consistent_selection(row, row_err, got, k, groups, &why)) {
      ++near_ties;
      continue;
    }
    std::ostringstream s;
    s << which << ": token " << t << ": ids [";
    for (int j = 0; j < k; ++j) s << (j ? " " : "") << got[j];
    s << "], expected [";
    for (int j = 0; j < k; ++j) s << (j ? " " : "") << want(t, j);
    s << "]: " << why;
    report(bad, s.str());
  }
  EXPECT_EQ(bad, 0) << which << ": ids that no near-tie explains";
}

// gates against gating_forward<double>(logits, scores, the device's ids): |g - e| <= rtol(t) |e| + atol.
void check_gates(const Outputs& o, const IndexMatrix& device_ids, const MatrixD& logits, const MatrixD& scores,
                 const RoutingConfig& config, const std::function<double(Index)>& rtol, const char* which) {
  const Index T = logits.rows(), E = logits.cols();
  const int k = config.top_k;
  IndexMatrix ids = device_ids;  // invalid rows (reported by check_ids) get harmless ids
  std::vector<bool> valid(static_cast<std::size_t>(T), true);
  for (Index t = 0; t < T; ++t) {
    for (int j = 0; j < k; ++j) {
      if (ids(t, j) < 0 || ids(t, j) >= E) valid[static_cast<std::size_t>(t)] = false;
    }
    if (!valid[static_cast<std::size_t>(t)])
      for (int j = 0; j < k; ++j) ids(t, j) = j;
  }
  MatrixD expected;
  gating_forward<double>(expected, logits, scores, ids, config.gating);
  const double atol = 1e-7 * config.gating.routed_scaling_factor;
  std::int64_t bad = 0;
  for (Index t = 0; t < T; ++t) {
    if (!valid[static_cast<std::size_t>(t)]) continue;
    for (int j = 0; j < k; ++j) {
      const float got = o.gates[static_cast<std::size_t>(t * k + j)];
      const double want = expected(t, j);
      if (std::abs(static_cast<double>(got) - want) <= rtol(t) * std::abs(want) + atol) continue;
      std::ostringstream s;
      s.precision(9);
      s << which << ": gates[" << t << "," << j << "] (expert " << ids(t, j) << ") = " << got << ", expected " << want
        << " (rtol " << rtol(t) << ")";
      report(bad, s.str());
    }
  }
  EXPECT_EQ(bad, 0) << which << ": gates outside the tolerance";
}

// Poisoned guard elements after each output must be untouched (no write past T rows).
void check_guards(const Outputs& o) {
  const auto untouched_f = [](const std::vector<float>& v) {
    return std::all_of(v.end() - kGuard, v.end(), [](float f) { return std::bit_cast<std::uint32_t>(f) == 0xFFFFFFFFu; });
  };
  EXPECT_TRUE(std::all_of(o.ids.end() - kGuard, o.ids.end(), [](std::int32_t i) { return i == -1; }))
      << "ids written past T * k";
  EXPECT_TRUE(untouched_f(o.gates)) << "gates written past T * k";
  if (!o.logits.empty()) {
    EXPECT_TRUE(untouched_f(o.logits)) << "logits written past T * E";
  }
}

// With duplicated experts (4i + 1 copies 4i), their logits must be bitwise equal, and the copy may
// only be chosen after the original (ties go to the lower id).
void check_duplicates(const Outputs& o, const Problem& p, int k) {
  std::int64_t bad = 0;
  for (Index t = 0; t < p.T; ++t) {
    for (Index a = 0; a + 1 < p.E; a += 4) {
      const float la = o.logits[static_cast<std::size_t>(t * p.E + a)];
      const float lb = o.logits[static_cast<std::size_t>(t * p.E + a + 1)];
      if (std::bit_cast<std::uint32_t>(la) != std::bit_cast<std::uint32_t>(lb)) {
        report(bad, "token " + std::to_string(t) + ": equal weight rows " + std::to_string(a) + ", " +
                        std::to_string(a + 1) + " gave different logits " + std::to_string(la) + ", " + std::to_string(lb));
      }
      const std::int32_t* ids = o.ids.data() + t * k;
      const auto at = [&](Index e) { return std::find(ids, ids + k, static_cast<std::int32_t>(e)) - ids; };
      if (at(a + 1) < k && at(a) > at(a + 1)) {
        report(bad, "token " + std::to_string(t) + ": expert " + std::to_string(a + 1) + " (slot " +
                        std::to_string(at(a + 1)) + ") chosen before its equal, lower expert " + std::to_string(a));
      }
    }
  }
  EXPECT_EQ(bad, 0) << "exact ties broken against the lower id";
}

// Everything above for one version's outputs.
void check_version(const Outputs& o, const Reference& ref, const Problem& p, const RoutingConfig& config,
                   Counts& counts) {
  const Index T = p.T, E = p.E;
  const int k = config.top_k;
  check_guards(o);
  check_logits(o, ref, p, config, counts);
  const bool finite = std::all_of(o.logits.begin(), o.logits.begin() + T * E, [](float f) { return std::isfinite(f); });
  ASSERT_TRUE(finite) << "non-finite logits (unwritten?): the remaining checks need them";
  const IndexMatrix device_ids = ids_matrix(o, T, k);

  // (A) the reference on the same inputs.
  const MatrixD& s_ref = ref.out.scores;
  const MatrixD v_ref = ranked_values(ref.out.logits, s_ref, config, p);
  std::vector<double> deviation(static_cast<std::size_t>(T));
  for (Index t = 0; t < T; ++t) deviation[static_cast<std::size_t>(t)] = logit_deviation(o, ref, t, E);
  const auto err_a = [&](Index t, Index e) {
    return deviation_error(config, deviation[static_cast<std::size_t>(t)], s_ref(t, e)) +
           evaluation_error(config, s_ref(t, e), v_ref(t, e)) + 1e-12 * std::abs(v_ref(t, e));
  };
  check_ids(o, ref.out.ids, v_ref, config, err_a, counts.near_ties_a, "(A) reference on the inputs");

  // (B) the reference selection on the device's own logits.
  const MatrixD l_dev = Eigen::Map<const Matrix>(o.logits.data(), T, E).cast<double>();
  MatrixD s_dev;
  score_forward<double>(s_dev, l_dev, config.scoring);
  const MatrixD v_dev = ranked_values(l_dev, s_dev, config, p);
  IndexMatrix want_b;
  const MatrixD& ranked_source = ranks_logits(config) ? l_dev : s_dev;
  const RoutingParamsT<double> params = params_of(p);
  const VectorT<double>* bias = config.use_selection_bias ? &params.selection_bias : nullptr;
  switch (config.selection) {
    case SelectionKind::topk: topk_select<double>(want_b, ranked_source, k, bias); break;
    case SelectionKind::group_limited: group_limited_select<double>(want_b, ranked_source, k, config.group, bias); break;
    case SelectionKind::device_limited:
      device_limited_select<double>(want_b, ranked_source, k, config.num_devices, config.topk_devices);
      break;
    default: FAIL() << "unsupported selection in a device case";
  }
  const auto err_b = [&](Index t, Index e) { return evaluation_error(config, s_dev(t, e), v_dev(t, e)); };
  check_ids(o, want_b, v_dev, config, err_b, counts.near_ties_b, "(B) reference on the device's logits");

  // Gates of the device's ids. Float32 gating: the softmax sums over E (E u), expf of arguments
  // up to ~100 (100 u), the renormalisation.
  const double rtol_b = 3e-5 + static_cast<double>(E) * kU32;
  check_gates(o, device_ids, l_dev, s_dev, config, [&](Index) { return rtol_b; }, "(B) gates from the device's logits");
  const auto rtol_a = [&](Index t) { return std::expm1(2.5 * deviation[static_cast<std::size_t>(t)]) + rtol_b; };
  check_gates(o, device_ids, ref.out.logits, s_ref, config, rtol_a, "(A) gates from the reference's logits");
}

// ---- the device tests ---------------------------------------------------------------------------

class CudaRouter : public testing::TestWithParam<Case> {};

// Every version, every token count: logits, ids and gates against the reference (see the top).
TEST_P(CudaRouter, MatchesReference) {
  SKIP_WITHOUT_DEVICE();
  const Case& cs = GetParam();
  constexpr std::int64_t kTokens[] = {0, 1, 7, 128, 1000, 16384};
  std::uint64_t seed = std::hash<std::string>{}(cs.name);
  for (const std::int64_t T : kTokens) {
    RoutingConfig config = cs.config;
    config.router.hidden_size = hidden_for(T, cs.config.router.hidden_size);
    const Problem p = make_problem(cs, config, T, ++seed);
    SCOPED_TRACE("T = " + std::to_string(T) + ", C = " + std::to_string(p.C) + ", seed " + std::to_string(seed));
    const DeviceInputs in(p);
    if (T == 0) {  // nothing is launched, nothing is written, no error
      for (int version = 1; version <= kRouterVersions; ++version) {
        const Outputs o = run_version(in, p, config, version, true);
        check_guards(o);
      }
      continue;
    }
    const Reference ref = reference(p, config);
    for (int version = 1; version <= kRouterVersions; ++version) {
      SCOPED_TRACE("router_kernel" + std::to_string(version));
      Counts counts;
      const Outputs o = run_version(in, p, config, version, true);
      check_version(o, ref, p, config, counts);
      if (cs.duplicate_rows) check_duplicates(o, p, config.top_k);
      // Near-ties must be rare: a systematic difference is a bug, not rounding.
      const std::int64_t allowed = 2 + T / 100;
      EXPECT_LE(counts.near_ties_a, allowed) << "too many near-ties against the reference on the inputs";
      EXPECT_LE(counts.near_ties_b, allowed) << "too many near-ties against the reference on the device's logits";
      if (counts.near_ties_a + counts.near_ties_b + counts.rounding_flips > 0) {
        std::cout << "  [" << cs.name << " T=" << T << " v" << version << "] near-ties: " << counts.near_ties_a
                  << " (A), " << counts.near_ties_b << " (B); bf16 logits one rounding off: " << counts.rounding_flips
                  << "\n";
      }
      // Without stored logits: the same ids and gates, bit for bit.
      const Outputs bare = run_version(in, p, config, version, false);
      EXPECT_EQ(bare.ids, o.ids) << "ids differ when the logits are not stored";
      EXPECT_TRUE(std::equal(bare.gates.begin(), bare.gates.end(), o.gates.begin(), [](float a, float b) {
        return std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b);
      })) << "gates differ when the logits are not stored";
      check_guards(bare);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Presets, CudaRouter, testing::ValuesIn(all_cases()), case_name);

// ---- argument checks: these throw before the device is touched, so they run without a GPU -------

// Pointers that are never dereferenced: every call below fails a check first.
const void* fake_input() { return reinterpret_cast<const void*>(std::uintptr_t{0x1000}); }
float* fake_floats() { return reinterpret_cast<float*>(std::uintptr_t{0x2000}); }
std::int32_t* fake_ids() { return reinterpret_cast<std::int32_t*>(std::uintptr_t{0x3000}); }

// The token-choice presets are supported (evaluated without noise); the rest say which field.
TEST(CudaRouterArguments, UnsupportedNamesTheField) {
  for (const char* name : {"switch", "gshard", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2",
                           "deepseek_v3", "llama4", "gpt_oss", "gpu_mode_amd"}) {
    RoutingConfig c = preset(name);
    if (c.num_experts() > 1024) c.router.num_experts = 1024;
    EXPECT_EQ(router_unsupported(c), "") << name;
  }
  const auto says = [](const RoutingConfig& c, const std::string& text) {
    const std::string why = router_unsupported(c);
    EXPECT_EQ(why.rfind(text, 0), 0u) << "expected \"" << text << "...\", got \"" << why << "\"";
  };
  says(find_preset("expert_choice").full, "selection = expert_choice");
  says(find_preset("hash").full, "selection = hash");
  RoutingConfig table = preset("mixtral");
  table.selection = SelectionKind::table;
  says(table, "selection = table");
  says(find_preset("switch").full, "router.noise = jitter");
  says(with_dtype(preset("qwen3_moe"), Format::fp16), "router.dtype = fp16");
  says(find_preset("gshard").full, "router.num_experts = 2048");
  RoutingConfig many = preset("olmoe");  // E = 64
  many.top_k = 33;
  says(many, "top_k = 33");
  RoutingConfig too_many = preset("mixtral");  // E = 8
  too_many.top_k = 9;
  says(too_many, "top_k = 9");
}

// launch_router refuses what router_unsupported names, and invalid configs by the reference's own rule.
TEST(CudaRouterArguments, LaunchRejectsUnsupportedConfigs) {
  const RouterArgs args{.tokens = 4};
  expect_error_naming([&] { launch_router(args, find_preset("expert_choice").full, 1); }, "selection = expert_choice");
  expect_error_naming([&] { launch_router(args, find_preset("hash").full, 2); }, "selection = hash");
  expect_error_naming([&] { launch_router(args, find_preset("switch").full, 3); }, "router.noise = jitter");
  expect_error_naming([&] { launch_router(args, with_dtype(preset("olmoe"), Format::fp16), 1); }, "router.dtype = fp16");
  expect_error_naming([&] { launch_router(args, find_preset("gshard").full, 1); }, "router.num_experts = 2048");
  RoutingConfig many = preset("olmoe");
  many.top_k = 40;
  expect_error_naming([&] { launch_router(args, many, 1); }, "top_k = 40");
  RoutingConfig too_many = preset("mixtral");
  too_many.top_k = 9;
  expect_error_naming([&] { launch_router(args, too_many, 1); }, "top_k = 9");
  RoutingConfig groups = preset("deepseek_v3");  // invalid: the reference's own rule
  groups.group.n_group = 7;
  expect_error_naming([&] { launch_router(args, groups, 1); }, "n_group = 7");
}

// Versions are 1 .. kRouterVersions.
TEST(CudaRouterArguments, RejectsVersionOutOfRange) {
  const RouterArgs args{.tokens = 4};
  const RoutingConfig c = preset("mixtral");
  expect_error_naming([&] { launch_router(args, c, 0); }, "version = 0");
  expect_error_naming([&] { launch_router(args, c, kRouterVersions + 1); },
                      "version = " + std::to_string(kRouterVersions + 1));
  expect_error_naming([&] { launch_router(args, c, -1); }, "version = -1");
}

// Every pointer the config needs is checked, and named, before anything is launched.
TEST(CudaRouterArguments, RejectsNullPointers) {
  const RouterArgs ok{.x = fake_input(), .weight = fake_input(), .ids = fake_ids(), .gates = fake_floats(), .tokens = 4};
  const RoutingConfig mixtral = preset("mixtral");
  RouterArgs a = ok;
  a.ids = nullptr;
  expect_error_naming([&] { launch_router(a, mixtral, 1); }, "ids = null");
  a = ok;
  a.gates = nullptr;
  expect_error_naming([&] { launch_router(a, mixtral, 2); }, "gates = null");
  a = ok;
  a.x = nullptr;
  a.ids = nullptr;
  expect_error_naming([&] { launch_router(a, mixtral, 3); }, "x = null");
  a = ok;
  a.weight = nullptr;
  a.ids = nullptr;
  expect_error_naming([&] { launch_router(a, mixtral, 1); }, "weight = null");
  a = ok;
  a.ids = nullptr;  // gpt-oss has a router bias: it is checked before the outputs
  expect_error_naming([&] { launch_router(a, preset("gpt_oss"), 1); }, "bias = null");
  expect_error_naming([&] { launch_router(a, preset("deepseek_v3"), 1); }, "selection_bias = null");
}

// x is fp32 or bf16; T is never negative.
TEST(CudaRouterArguments, RejectsBadDtypeAndTokens) {
  RouterArgs a{.x_dtype = Format::fp16, .tokens = 4};
  expect_error_naming([&] { launch_router(a, preset("mixtral"), 1); }, "x_dtype = fp16");
  a.x_dtype = Format::bf16;
  a.tokens = -1;
  expect_error_naming([&] { launch_router(a, preset("mixtral"), 1); }, "tokens = -1");
}

// T = 0 launches nothing, so it needs no pointers and no device.
TEST(CudaRouterArguments, ZeroTokensLaunchNothing) {
  for (int version = 1; version <= kRouterVersions; ++version)
    EXPECT_NO_THROW(launch_router(RouterArgs{}, preset("deepseek_v3"), version));
}

}  // namespace
}  // namespace moelab::cuda
