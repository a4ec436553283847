// moelab/tools/golden/cases_components.cpp — golden cases of the single stages: numerics
// conversions, balance losses, the bias update, capacity, dispatch, combine, experts and the shared
// expert gate. Each is computed by the reference in double from the stored inputs.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "reference/balancing.h"
#include "reference/capacity.h"
#include "reference/config_json.h"
#include "reference/dispatch.h"
#include "reference/error.h"
#include "reference/experts.h"
#include "reference/losses.h"
#include "reference/scoring.h"
#include "reference/selection.h"
#include "tools/golden/builder.h"
#include "tools/golden/cases.h"

namespace moelab::golden {
namespace {

Case start(const std::string& name, const std::string& component, const std::string& description, Format dtype,
           std::uint64_t seed, Json config) {
  return Case{.name = name,
              .component = component,
              .description = description,
              .dtype = std::string(format_name(dtype)),
              .seed = seed,
              .config = std::move(config)};
}

// A tensor of raw bit patterns (fp8 in the low byte, 16-bit formats in two little-endian bytes).
Tensor bits_tensor(std::span<const std::uint32_t> bits, Format format) {
  Tensor t{.dtype = format_dtype(format), .shape = {static_cast<std::int64_t>(bits.size())}};
  const std::size_t width = dtype_size(t.dtype);
  t.data.resize(bits.size() * width);
  for (std::size_t i = 0; i < bits.size(); ++i)
    for (std::size_t byte = 0; byte < width; ++byte) t.data[i * width + byte] = (bits[i] >> (8 * byte)) & 0xFF;
  return t;
}

Tensor float_tensor(std::span<const float> values) {
  Tensor t{.dtype = DType::f32, .shape = {static_cast<std::int64_t>(values.size())}};
  t.data.resize(values.size() * 4);
  std::memcpy(t.data.data(), values.data(), t.data.size());
  return t;
}

// Float32 inputs that exercise a conversion to `format`: zeros, infinities, NaN, the largest finite
// value and the ties around it, subnormals and their ties, ties to even near 1, and random values
// across the whole range (log-uniform magnitudes, both signs).
std::vector<float> conversion_inputs(Format format, Rng& rng) {
  const FormatInfo& info = format_info(format);
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> v = {0.0f, -0.0f, inf, -inf, std::numeric_limits<float>::quiet_NaN(), 1.0f, -1.0f};
  const float eps = info.epsilon, sub = info.min_subnormal;
  for (int k = 0; k <= 8; ++k) v.push_back(1.0f + static_cast<float>(k) * eps / 4);  // ties at k = 2, 6
  for (float s : {0.25f, 0.5f, 0.75f, 1.0f, 1.5f, 2.5f, 3.0f}) v.push_back(s * sub);
  v.push_back(info.min_normal);
  v.push_back(info.min_normal * (1 - eps / 2));  // the largest subnormal's neighbourhood
  // The overflow threshold max + ulp(max) / 2 is a tie: it rounds to even, which is overflow for
  // every format here (e4m3: 464 -> NaN, its max 448 has an odd mantissa). Its float32 neighbours
  // round to max and to overflow.
  const float threshold = info.max + ulp(info.max, format) / 2;
  for (float x : {info.max, std::nextafter(threshold, 0.0f), threshold, std::nextafter(threshold, inf), 2 * info.max})
    for (float sign : {1.0f, -1.0f}) v.push_back(sign * x);
  const double lo = std::log2(static_cast<double>(sub)) - 2, hi = std::log2(static_cast<double>(info.max)) + 1;
  for (int i = 0; i < 200; ++i) {
    const double magnitude = std::exp2(rng.uniform(lo, hi));
    v.push_back(static_cast<float>(rng.uniform() < 0.5 ? -magnitude : magnitude));
  }
  return v;
}

}  // namespace

// ---- numerics -------------------------------------------------------------------------------------------

Case make_encode_case(Format format, std::uint64_t seed) {
  const std::string name(format_name(format));
  Case c = start("numerics.encode." + name, "numerics",
                 fmt::format("float32 -> {} bits, round to nearest even; overflow to inf/NaN (nonsaturating){}",
                             name, format == Format::fp8_e4m3 || format == Format::fp8_e5m2
                                       ? " and to the largest finite value (saturating)"
                                       : ""),
                 Format::fp32, seed, Json{{"format", name}});
  Builder b(c);
  Rng rng(seed);
  const std::vector<float> values = conversion_inputs(format, rng);
  b.put("input.values", float_tensor(values));
  for (Overflow overflow : {Overflow::nonsaturating, Overflow::saturating}) {
    const bool saturating = overflow == Overflow::saturating;
    if (saturating && format != Format::fp8_e4m3 && format != Format::fp8_e5m2) break;
    std::vector<std::uint32_t> bits;
    for (float x : values) bits.push_back(encode(x, format, overflow));
    b.bitwise(saturating ? "output.bits_saturated" : "output.bits", bits_tensor(bits, format));
  }
  c.tolerance_note = "bit-exact: round to nearest even is a function; any NaN matches any NaN";
  return c;
}

Case make_decode_case(Format format) {
  const std::string name(format_name(format));
  const FormatInfo& info = format_info(format);
  Case c = start("numerics.decode." + name, "numerics", fmt::format("every {} bit pattern -> float32 (exact)", name),
                 format, 0, Json{{"format", name}});
  Builder b(c);
  std::vector<std::uint32_t> bits(std::size_t{1} << info.bits);
  std::vector<float> values(bits.size());
  for (std::uint32_t i = 0; i < bits.size(); ++i) {
    bits[i] = i;
    values[i] = decode(i, format);
  }
  b.put("input.bits", bits_tensor(bits, format));
  b.bitwise("output.values", float_tensor(values));
  c.tolerance_note = "bit-exact: every value of the format is a float32; any NaN matches any NaN";
  return c;
}

// ---- losses ---------------------------------------------------------------------------------------------

std::vector<std::string> loss_names() {
  return {"switch", "hf", "megablocks", "deepseek_v2_expert", "deepseek_v2_device", "deepseek_v2_comm",
          "deepseek_v3_sequence", "z_loss"};
}

Case make_loss_case(const std::string& loss, std::uint64_t seed) {
  constexpr Index T = 24, E = 8;
  constexpr int k = 2, L = 2, D = 4, M = 2;
  const std::vector<Index> lengths = {10, 14};
  const double alpha = 0.01;
  const bool on_logits = loss == "hf" || loss == "z_loss";
  const bool sigmoid = loss == "deepseek_v3_sequence";
  const std::string input = on_logits ? "input.logits" : sigmoid ? "input.scores" : "input.probs";
  Json config = {{"loss", loss}, {"alpha", alpha}, {"top_k", k}, {"input", input}};
  if (loss == "megablocks") config["num_layers"] = L;
  if (loss == "deepseek_v2_device" || loss == "deepseek_v2_comm") config["num_devices"] = D;
  if (loss == "deepseek_v2_comm") config["devices_per_token"] = M;
  if (sigmoid) config["sequence_lengths"] = lengths;
  Case c = start("losses." + loss, "losses",
                 fmt::format("the {} loss (losses.h) and its gradient, alpha {}, T = {}, E = {}, k = {}", loss,
                             alpha, T, E, k),
                 Format::fp32, seed, config);
  Builder b(c);
  Rng rng(seed);
  const MatrixD logits = normal(rng, T, E, 1.5);
  MatrixD scores = logits;
  if (sigmoid) sigmoid_forward(scores, logits);
  if (!sigmoid && !on_logits) softmax_forward(scores, logits);
  const MatrixD x = b.input(input, scores);
  IndexMatrix ids;
  if (loss == "deepseek_v2_comm") {
    device_limited_select(ids, x, k, D, M);
  } else {
    topk_select(ids, x, k);
  }
  b.input_ints("input.ids", ids);

  MatrixD grad;
  const double value = loss_forward_backward(grad, loss, x, ids, alpha, config);
  b.allclose_scalar("output.loss", value, {3, T * E, Format::fp32});
  b.allclose("grad." + input.substr(6), grad, {4, T * E, Format::fp32});
  c.tolerance_note = "float32: a sum over T E terms, a few roundings";
  return c;
}

// ---- balancing ----------------------------------------------------------------------------------------

Case make_bias_update_case(std::uint64_t seed) {
  constexpr Index E = 16;
  const double gamma = 0.001;
  Case c = start("balancing.bias_update", "balancing",
                 "DeepSeek-V3 aux-loss-free bias update b += gamma sign(mean load - load), loads with ties to the "
                 "mean (sign 0)",
                 Format::fp32, seed, Json{{"gamma", gamma}});
  Builder b(c);
  Rng rng(seed);
  BiasBalancerT<double> balancer{.bias = VectorT<double>::Zero(E), .gamma = gamma};
  VectorT<double> bias(E);
  for (Index e = 0; e < E; ++e) bias(e) = 0.01 * rng.normal();
  balancer.bias = b.input_vector("input.bias", bias);
  // Loads m + d_e and m - d_e in pairs: the mean is m exactly, and d_0 = 0 puts two loads on it.
  constexpr std::int64_t m = 8;
  std::vector<std::int64_t> load(E);
  for (Index e = 0; e < E / 2; ++e) {
    const std::int64_t d = e == 0 ? 0 : static_cast<std::int64_t>(rng.next_u64() % 17) - 8;
    load[e] = m + d;
    load[e + E / 2] = m - d;
  }
  b.input_ints("input.load", std::span<const std::int64_t>(load));
  balancer.update(load);
  b.allclose("output.bias", balancer.bias, {1, 1, Format::fp32});
  c.tolerance_note = "float32: one addition";
  return c;
}

// ---- capacity, dispatch, combine ------------------------------------------------------------------------

Case make_capacity_case(const CapacityCaseSpec& s) {
  Json config = {{"capacity", to_json(s.capacity)}, {"num_experts", s.num_experts}, {"top_k", s.top_k}};
  Case c = start(s.name, "capacity", s.description, Format::fp32, s.seed, config);
  Builder b(c);
  Rng rng(s.seed);
  MatrixD logits = normal(rng, s.tokens, s.num_experts);
  if (s.skewed) logits.col(0).array() += 10.0;
  MatrixD probs;
  softmax_forward(probs, logits);
  IndexMatrix ids;
  topk_select(ids, probs, s.top_k);
  MatrixD gates(s.tokens, s.top_k);
  for (Index t = 0; t < s.tokens; ++t)
    for (int j = 0; j < s.top_k; ++j) gates(t, j) = probs(t, ids(t, j));
  b.input_ints("input.ids", ids);
  gates = b.input("input.gates", gates);
  IndexMatrix keep;
  std::vector<std::int64_t> dropped;
  capacity_forward(keep, dropped, ids, gates, s.num_experts, s.capacity);
  const std::int64_t capacity = expert_capacity(s.tokens, s.top_k, s.num_experts, s.capacity);
  b.exact("output.capacity", std::span<const std::int64_t>(&capacity, 1));
  b.exact("output.keep", keep);
  b.exact("output.dropped", std::span<const std::int64_t>(dropped));
  c.tolerance_note = "exact: integers";
  return c;
}

Case make_dispatch_case(std::uint64_t seed) {
  constexpr Index T = 12, C = 8, E = 6;
  constexpr int k = 2;
  Case c = start("dispatch.permute", "dispatch",
                 "counting-sort dispatch of kept pairs into expert-major rows, the gather, and its transpose (a "
                 "scatter-add); expert 5 gets no pair, some pairs are dropped. input.dpermuted follows the "
                 "reference's row order (output.row_token)",
                 Format::fp32, seed, Json{{"num_experts", E}, {"top_k", k}});
  Builder b(c);
  Rng rng(seed);
  IndexMatrix ids(T, k), keep(T, k);
  for (Index t = 0; t < T; ++t) {
    ids(t, 0) = static_cast<std::int32_t>(rng.next_u64() % (E - 1));
    ids(t, 1) = static_cast<std::int32_t>((ids(t, 0) + 1 + rng.next_u64() % (E - 2)) % (E - 1));
    keep(t, 0) = 1;
    keep(t, 1) = rng.uniform() < 0.75 ? 1 : 0;
  }
  b.input_ints("input.ids", ids);
  b.input_ints("input.keep", keep);
  const MatrixD x = b.input("input.x", normal(rng, T, C));
  Dispatch plan;
  dispatch_plan(plan, ids, keep, E);
  MatrixD permuted;
  permute_forward(permuted, x, plan);
  b.exact("output.counts", std::span<const std::int64_t>(plan.counts));
  b.exact("output.offsets", std::span<const std::int64_t>(plan.offsets));
  b.permutation("output.row_token", plan.row_token, "output.offsets");
  b.allclose("output.permuted", permuted, {0, 1, Format::fp32}, "permuted");
  const MatrixD dpermuted = b.input("input.dpermuted", normal(rng, plan.num_rows(), C));
  MatrixD dx;
  permute_backward(dx, dpermuted, plan);
  b.allclose("grad.x", dx, {1, k, Format::fp32}, "token");
  c.tolerance_note = "the gather is exact; its transpose sums at most k rows";
  return c;
}

Case make_combine_case(std::uint64_t seed) {
  constexpr Index T = 10, C = 8, N = 17;
  Case c = start("combine.weighted_sum", "combine",
                 "y_t = sum over rows r of token t of row_weight_r expert_out_r; token 9 has no row (y = 0)",
                 Format::fp32, seed, Json{{"tokens", T}});
  Builder b(c);
  Rng rng(seed);
  std::vector<std::int32_t> row_token(N);
  for (Index r = 0; r < N; ++r) row_token[r] = static_cast<std::int32_t>(rng.next_u64() % (T - 1));
  b.input_ints("input.row_token", std::span<const std::int32_t>(row_token));
  VectorT<double> weight(N);
  for (Index r = 0; r < N; ++r) weight(r) = rng.uniform();
  weight = b.input_vector("input.row_weight", weight);
  const MatrixD expert_out = b.input("input.expert_out", normal(rng, N, C));
  MatrixD y;
  combine_forward(y, expert_out, weight, row_token, T);
  b.allclose("output.y", y, {2, N, Format::fp32}, "token");
  const MatrixD dy = b.input("input.dy", normal(rng, T, C));
  MatrixD dexpert_out;
  VectorT<double> dweight;
  combine_backward(dexpert_out, dweight, dy, expert_out, weight, row_token);
  b.allclose("grad.expert_out", dexpert_out, {1, 1, Format::fp32});
  b.allclose("grad.row_weight", dweight, {2, C, Format::fp32});
  c.tolerance_note = "float32: products and sums of a few terms";
  return c;
}

// ---- experts ------------------------------------------------------------------------------------------

Case make_experts_case(const std::string& name, const ExpertConfig& config, Index rows, Format dtype, bool backward,
                       std::uint64_t seed, double input_scale) {
  const Index C = config.hidden_size, H = config.intermediate_size;
  Case c = start(name, "experts",
                 fmt::format("one {} expert{} ({} -> {} -> {}) on {} rows{}", activation_name(config.activation),
                             config.use_bias ? " with biases" : "", C, H, C, rows,
                             input_scale != 1.0 ? fmt::format(", input projections x{}: the clamps are active",
                                                              input_scale)
                                                : ""),
                 dtype, seed, to_json(config));
  Builder b(c);
  Rng rng(seed);
  ExpertParamsT<double> p = init_expert<double>(config, rng, 1.0 / std::sqrt(static_cast<double>(C)));
  p.w_down *= std::sqrt(static_cast<double>(C) / static_cast<double>(H));
  p.w_gate *= input_scale;
  p.w_up *= input_scale;
  if (config.use_bias) {
    p.b_gate = input_scale * 0.3 * normal(rng, p.b_gate.size(), 1).col(0);
    p.b_up = input_scale * 0.3 * normal(rng, H, 1).col(0);
    p.b_down = 0.3 * normal(rng, C, 1).col(0);
  }
  const MatrixD x = b.input("input.x", normal(rng, rows, C));
  put_expert_params(b, "param.expert", p);
  MatrixD y;
  ExpertCacheT<double> cache;
  expert_forward(y, cache, x, p, config);
  b.allclose("output.y", y, {3, std::max(C, H), parse_format(c.dtype)}, "token");
  if (backward) {
    const MatrixD dy = b.input("input.dy", normal(rng, rows, C));
    MatrixD dx;
    ExpertParamsT<double> grads;
    expert_backward(dx, grads, dy, cache, x, p, config);
    const Tol tol{4, std::max({C, H, rows}), parse_format(c.dtype)};
    b.allclose("grad.x", dx, tol, "token");
    put_expert_grads(b, "grad.expert", grads, tol);
  }
  c.tolerance_note = fmt::format("{}: the hidden activation and the output may each be rounded; sums of up to {} terms",
                                 c.dtype, std::max(C, H));
  return c;
}

Case make_shared_gate_case(std::uint64_t seed) {
  constexpr Index T = 12, C = 16;
  Case c = start("shared_experts.sigmoid_gate", "shared_experts",
                 "Qwen2-MoE's shared expert gate: y_t = sigmoid(x_t . w) shared_out_t", Format::fp32, seed, Json::object());
  Builder b(c);
  Rng rng(seed);
  const MatrixD x = b.input("input.x", normal(rng, T, C));
  const MatrixD w = b.input("param.shared_gate", normal(rng, 1, C, 0.25));
  const MatrixD shared_out = b.input("input.shared_out", normal(rng, T, C));
  MatrixD y;
  VectorT<double> gate;
  shared_gate_forward(y, gate, x, w, shared_out);
  b.allclose("output.y", y, {2, C, Format::fp32}, "token");
  b.allclose("output.gate", gate, {1, C, Format::fp32}, "token");
  const MatrixD dy = b.input("input.dy", normal(rng, T, C));
  MatrixD dx, dw, dshared_out;
  shared_gate_backward(dx, dw, dshared_out, dy, gate, x, w, shared_out);
  b.allclose("grad.x", dx, {3, C, Format::fp32}, "token");
  b.allclose("grad.shared_gate", dw, {3, T * C, Format::fp32});
  b.allclose("grad.shared_out", dshared_out, {2, 1, Format::fp32}, "token");
  c.tolerance_note = "float32: one dot product of C terms and a sigmoid";
  return c;
}

}  // namespace moelab::golden
