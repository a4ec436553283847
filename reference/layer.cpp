// moelab/reference/layer.cpp — see layer.h. T = tokens, C = hidden, E = experts, N = kept rows.
#include "reference/layer.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <utility>

#include "reference/error.h"
#include "reference/math.h"

namespace moelab {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Expert choice: expert e's rows are its C chosen tokens, in the order chosen. A token's n-th row
// (across experts) is its slot n, so the plan has the same invariants as a token-choice plan
// (pair_row is (T, most experts any token got)). Token choice is planned by dispatch_plan.
void plan_expert_choice(Dispatch& plan, const IndexMatrix& token_ids, Index T, Index E) {
  const Index C = token_ids.cols();
  std::vector<std::int32_t> seen(static_cast<std::size_t>(T), 0);
  for (Index i = 0; i < token_ids.size(); ++i) ++seen[static_cast<std::size_t>(token_ids.data()[i])];
  const std::int32_t most = seen.empty() ? 1 : std::max(1, *std::max_element(seen.begin(), seen.end()));
  plan = Dispatch{};
  plan.num_experts = E;
  plan.counts.assign(static_cast<std::size_t>(E), C);
  for (Index e = 0; e <= E; ++e) plan.offsets.push_back(e * C);
  plan.pair_row = IndexMatrix::Constant(T, most, -1);
  std::fill(seen.begin(), seen.end(), 0);
  for (Index e = 0; e < E; ++e)
    for (Index c = 0; c < C; ++c) {
      const std::int32_t t = token_ids(e, c);
      const std::int32_t slot = seen[static_cast<std::size_t>(t)]++;
      plan.pair_row(t, slot) = static_cast<std::int32_t>(plan.row_token.size());
      plan.row_token.push_back(t);
      plan.row_slot.push_back(slot);
    }
}

// Where row r's gate lives in the gates matrix: (t, j) for token choice, (e, r - offsets[e]) for
// expert choice.
std::pair<Index, Index> gate_index(const Dispatch& plan, Index e, std::int64_t r, bool expert_choice) {
  if (expert_choice) return {e, r - plan.offsets[e]};
  return {plan.row_token[r], plan.row_slot[r]};
}

template <typename Scalar>
VectorT<Scalar> row_gates(const Dispatch& plan, const MatrixT<Scalar>& gates, bool expert_choice) {
  VectorT<Scalar> g(static_cast<Index>(plan.row_token.size()));
  for (Index e = 0; e < plan.num_experts; ++e)
    for (std::int64_t r = plan.offsets[e]; r < plan.offsets[e + 1]; ++r) {
      const auto [i, j] = gate_index(plan, e, r, expert_choice);
      g(r) = gates(i, j);
    }
  return g;
}

// Rows [offsets[e], offsets[e+1]) of m, as a copy (the expert stage takes a matrix).
template <typename Scalar>
MatrixT<Scalar> expert_rows(const MatrixT<Scalar>& m, const Dispatch& plan, Index e) {
  return m.middleRows(plan.offsets[e], plan.offsets[e + 1] - plan.offsets[e]);
}

// Expert e's rows of the plan, as a fault hook sees them.
FaultTarget rows_of(FaultSite site, const Dispatch& plan, Index e) {
  const std::size_t first = static_cast<std::size_t>(plan.offsets[e]);
  const std::size_t n = static_cast<std::size_t>(plan.offsets[e + 1] - plan.offsets[e]);
  return {.site = site,
          .expert = static_cast<int>(e),
          .row_token = std::span<const std::int32_t>(plan.row_token).subspan(first, n),
          .row_slot = std::span<const std::int32_t>(plan.row_slot).subspan(first, n)};
}

template <typename Scalar>
ExpertParamsT<Scalar> zeros_like(const ExpertParamsT<Scalar>& p) {
  ExpertParamsT<Scalar> z;
  z.w_gate = MatrixT<Scalar>::Zero(p.w_gate.rows(), p.w_gate.cols());
  z.w_up = MatrixT<Scalar>::Zero(p.w_up.rows(), p.w_up.cols());
  z.w_down = MatrixT<Scalar>::Zero(p.w_down.rows(), p.w_down.cols());
  z.b_gate = VectorT<Scalar>::Zero(p.b_gate.size());
  z.b_up = VectorT<Scalar>::Zero(p.b_up.size());
  z.b_down = VectorT<Scalar>::Zero(p.b_down.size());
  return z;
}

void require_param_counts(const LayerConfig& c, std::size_t experts, std::size_t shared, Index gate_rows,
                          Index gate_cols) {
  require(static_cast<Index>(experts) == c.num_experts(), "experts.size()", experts,
          fmt::format("must equal num_experts = {}", c.num_experts()));
  require(static_cast<int>(shared) == c.shared.count, "shared.size()", shared,
          fmt::format("must equal shared.count = {}", c.shared.count));
  if (c.shared.gated)
    require(gate_rows == 1 && gate_cols == c.hidden_size(), "shared_gate shape",
            fmt::format("({}, {})", gate_rows, gate_cols), fmt::format("must be (1, hidden_size) = (1, {})", c.hidden_size()));
}

}  // namespace

std::string_view gate_placement_name(GatePlacement placement) {
  return placement == GatePlacement::output ? "output" : "input";
}

GatePlacement parse_gate_placement(std::string_view name) {
  for (GatePlacement p : {GatePlacement::output, GatePlacement::input})
    if (gate_placement_name(p) == name) return p;
  fail("gate_placement", fmt::format("\"{}\"", name), "must be one of output, input");
}

ExpertConfig LayerConfig::shared_expert_config() const {
  ExpertConfig s = expert;
  s.intermediate_size = shared.intermediate_size;
  return s;
}

void LayerConfig::validate() const {
  routing.validate();
  expert.validate();
  capacity.validate();
  require(expert.hidden_size == hidden_size(), "expert.hidden_size", expert.hidden_size,
          fmt::format("must equal the router's hidden_size = {}", hidden_size()));
  require(shared.count >= 0, "shared.count", shared.count, "must be >= 0");
  if (shared.count > 0) shared_expert_config().validate();
  require(!shared.gated || shared.count > 0, "shared.gated", "true", "a shared-expert gate needs shared.count > 0");
  require(!routing.expert_choice() || capacity.dropless, "capacity.dropless", "false",
          "expert choice has its own capacity (capacity_factor of the routing); token dropping does not apply");
}

template <typename Scalar>
void combine_forward(MatrixT<Scalar>& y, const MatrixT<Scalar>& expert_out, const VectorT<Scalar>& row_weight,
                     std::span<const std::int32_t> row_token, Index tokens) {
  const Index N = expert_out.rows();
  require(row_weight.size() == N && static_cast<Index>(row_token.size()) == N, "row_weight, row_token sizes",
          fmt::format("({}, {})", row_weight.size(), row_token.size()),
          fmt::format("must both equal the rows of expert_out = {}", N));
  y = MatrixT<Scalar>::Zero(tokens, expert_out.cols());
  for (Index r = 0; r < N; ++r) {
    require(row_token[r] >= 0 && row_token[r] < tokens, fmt::format("row_token[{}]", r), row_token[r],
            fmt::format("must be a token in [0, {})", tokens));
    y.row(row_token[r]) += row_weight(r) * expert_out.row(r);
  }
}

template <typename Scalar>
void combine_backward(MatrixT<Scalar>& dexpert_out, VectorT<Scalar>& drow_weight, const MatrixT<Scalar>& dy,
                      const MatrixT<Scalar>& expert_out, const VectorT<Scalar>& row_weight,
                      std::span<const std::int32_t> row_token) {
  const Index N = expert_out.rows();
  dexpert_out.resize(N, expert_out.cols());
  drow_weight.resize(N);
  for (Index r = 0; r < N; ++r) {
    const Index t = row_token[r];
    dexpert_out.row(r) = row_weight(r) * dy.row(t);
    drow_weight(r) = dy.row(t).dot(expert_out.row(r));
  }
}

template <typename Scalar>
void moe_layer_forward(LayerOutputT<Scalar>& out, const MatrixT<Scalar>& x, std::span<const std::int32_t> token_ids,
                       const LayerParamsT<Scalar>& params, const LayerConfig& config, Rng* rng, Observer* observer,
                       std::span<const Index> sequence_lengths, FaultHook* faults) {
  config.validate();
  require_param_counts(config, params.experts.size(), params.shared.size(), params.shared_gate.rows(),
                       params.shared_gate.cols());
  const Index T = x.rows(), C = config.hidden_size(), E = config.num_experts();
  const bool ec = config.routing.expert_choice();

  Clock::time_point start = Clock::now();
  route_forward(out.routing, x, token_ids, params.routing, config.routing, rng, observer, sequence_lengths, faults);
  out.aux_loss = out.routing.aux_loss;
  out.z_loss = out.routing.z_loss;
  const double t_routing = seconds_since(start);

  start = Clock::now();
  if (ec) {
    out.keep.resize(0, 0);
    out.dropped.assign(static_cast<std::size_t>(E), 0);
    plan_expert_choice(out.plan, out.routing.ids, T, E);
  } else {
    capacity_forward(out.keep, out.dropped, out.routing.ids, out.routing.gates, E, config.capacity, observer);
    dispatch_plan(out.plan, out.routing.ids, out.keep, E, observer);
  }
  out.row_gate = row_gates(out.plan, out.routing.gates, ec);
  permute_forward(out.expert_in, x, out.plan);  // (N, C) gathered token rows
  if (config.gate_placement == GatePlacement::input) out.expert_in.array().colwise() *= out.row_gate.array();
  const double t_dispatch = seconds_since(start);

  start = Clock::now();
  out.expert_out.resize(out.expert_in.rows(), C);
  out.expert_cache.assign(static_cast<std::size_t>(E), ExpertCacheT<Scalar>{});
  for (Index e = 0; e < E; ++e) {
    MatrixT<Scalar> y_e;
    expert_forward(y_e, out.expert_cache[e], expert_rows(out.expert_in, out.plan, e), params.experts[e], config.expert,
                   observer);
    if (apply_fault_hook(faults, rows_of(FaultSite::expert_activations, out.plan, e), out.expert_cache[e].hidden))
      expert_down_projection(y_e, out.expert_cache[e].hidden, params.experts[e], config.expert);  // from the changed h
    out.expert_out.middleRows(out.plan.offsets[e], y_e.rows()) = y_e;
  }
  apply_fault_hook(faults, {.site = FaultSite::expert_outputs, .row_token = out.plan.row_token,
                            .row_slot = out.plan.row_slot}, out.expert_out);
  const double t_experts = seconds_since(start);

  // Combine: y_t = sum over t's rows r of (g_r) expert_out_r   (+ shared experts), in Scalar.
  start = Clock::now();
  const bool weigh = config.gate_placement == GatePlacement::output;
  combine_forward(out.y, out.expert_out, weigh ? out.row_gate : VectorT<Scalar>::Ones(out.expert_out.rows()), out.plan.row_token,
                  T);
  const ExpertConfig shared_config = config.shared_expert_config();
  out.shared_out.assign(static_cast<std::size_t>(config.shared.count), MatrixT<Scalar>{});
  out.shared_cache.assign(static_cast<std::size_t>(config.shared.count), ExpertCacheT<Scalar>{});
  MatrixT<Scalar> shared_sum = MatrixT<Scalar>::Zero(T, C);
  for (int s = 0; s < config.shared.count; ++s) {
    expert_forward(out.shared_out[s], out.shared_cache[s], x, params.shared[s], shared_config);
    shared_sum += out.shared_out[s];
  }
  if (config.shared.gated) {  // Qwen2-MoE: sigmoid(x w^T) * shared
    MatrixT<Scalar> gated;
    shared_gate_forward(gated, out.shared_gate_values, x, params.shared_gate, shared_sum);
    out.y += gated;
  } else {
    out.y += shared_sum;
  }
  apply_fault_hook(faults, {.site = FaultSite::combine_output}, out.y);
  const double t_combine = seconds_since(start);

  emit(observer, [&](Observer& o) {
    const Stat stats[] = {{"routing_seconds", t_routing},
                          {"dispatch_seconds", t_dispatch},
                          {"experts_seconds", t_experts},
                          {"combine_seconds", t_combine}};
    o.on_event(Event{.name = events::timing, .shape = {1, 1}, .stats = stats});
  });
}

template <typename Scalar>
void moe_layer_backward(LayerGradsT<Scalar>& grads, const MatrixT<Scalar>& dy, const LayerOutputT<Scalar>& out,
                        const MatrixT<Scalar>& x, const LayerParamsT<Scalar>& params, const LayerConfig& config,
                        Scalar loss_scale, std::span<const Index> sequence_lengths) {
  config.validate();
  const Index T = x.rows(), C = config.hidden_size(), E = config.num_experts();
  require(dy.rows() == T && dy.cols() == C, "dy shape", fmt::format("({}, {})", dy.rows(), dy.cols()),
          fmt::format("must equal the output shape ({}, {})", T, C));
  const bool ec = config.routing.expert_choice();
  const Index N = out.expert_out.rows();
  grads.dx = MatrixT<Scalar>::Zero(T, C);

  // Shared experts (and their gate).
  const ExpertConfig shared_config = config.shared_expert_config();
  MatrixT<Scalar> dshared_sum = dy;
  if (config.shared.gated) {
    MatrixT<Scalar> shared_sum = MatrixT<Scalar>::Zero(T, C);
    for (const MatrixT<Scalar>& s : out.shared_out) shared_sum += s;
    MatrixT<Scalar> dx_gate;
    shared_gate_backward(dx_gate, grads.shared_gate, dshared_sum, dy, out.shared_gate_values, x, params.shared_gate,
                         shared_sum);
    grads.dx += dx_gate;
  }
  grads.shared.assign(static_cast<std::size_t>(config.shared.count), ExpertParamsT<Scalar>{});
  for (int s = 0; s < config.shared.count; ++s) {
    MatrixT<Scalar> dx_s;
    expert_backward(dx_s, grads.shared[s], dshared_sum, out.shared_cache[s], x, params.shared[s], shared_config);
    grads.dx += dx_s;
  }

  // Combine: d expert_out_r = g_r dy_t (gate on the output) or dy_t; d g_r = <dy_t, expert_out_r>.
  MatrixT<Scalar> dexpert_out;
  VectorT<Scalar> drow_gate;
  const bool weigh = config.gate_placement == GatePlacement::output;
  combine_backward(dexpert_out, drow_gate, dy, out.expert_out, weigh ? out.row_gate : VectorT<Scalar>::Ones(N),
                   out.plan.row_token);

  // Experts.
  MatrixT<Scalar> dexpert_in(N, C);
  grads.experts.resize(static_cast<std::size_t>(E));
  for (Index e = 0; e < E; ++e) {
    MatrixT<Scalar> dx_e;
    expert_backward(dx_e, grads.experts[e], expert_rows(dexpert_out, out.plan, e), out.expert_cache[e],
                    expert_rows(out.expert_in, out.plan, e), params.experts[e], config.expert);
    if (grads.experts[e].w_up.size() == 0) grads.experts[e] = zeros_like(params.experts[e]);
    dexpert_in.middleRows(out.plan.offsets[e], dx_e.rows()) = dx_e;
  }

  // Gate on the input: expert_in_r = g_r x_t, so d g_r = <d expert_in_r, x_t> and dx_t += g_r d expert_in_r.
  if (config.gate_placement == GatePlacement::input) {
    for (Index r = 0; r < N; ++r) drow_gate(r) = dexpert_in.row(r).dot(x.row(out.plan.row_token[r]));
    dexpert_in.array().colwise() *= out.row_gate.array();
  }
  MatrixT<Scalar> dx_dispatch;
  permute_backward(dx_dispatch, dexpert_in, out.plan);
  grads.dx += dx_dispatch;

  // Gates back to the routing: dgates has the shape of gates; dropped pairs get 0.
  MatrixT<Scalar> dgates = MatrixT<Scalar>::Zero(out.routing.gates.rows(), out.routing.gates.cols());
  for (Index e = 0; e < E; ++e)
    for (std::int64_t r = out.plan.offsets[e]; r < out.plan.offsets[e + 1]; ++r) {
      const auto [i, j] = gate_index(out.plan, e, r, ec);
      dgates(i, j) += drow_gate(r);
    }
  MatrixT<Scalar> dx_routing;
  route_backward(dx_routing, grads.router, dgates, out.routing, x, params.routing, config.routing, loss_scale,
                 sequence_lengths);
  grads.dx += dx_routing;
}

template <typename Scalar>
LayerParamsT<Scalar> init_layer(const LayerConfig& config, Rng& rng, double init_std) {
  config.validate();
  const Index C = config.hidden_size(), E = config.num_experts();
  auto normal_matrix = [&](Index rows, Index cols, double std) {
    MatrixT<Scalar> m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(std * rng.normal());
    return m;
  };
  LayerParamsT<Scalar> p;
  p.routing.router.weight = normal_matrix(E, C, init_std);
  if (config.routing.router.use_bias) p.routing.router.bias = VectorT<Scalar>::Zero(E);
  if (config.routing.router.noise == RouterNoise::noisy_topk) p.routing.router.noise_weight = normal_matrix(E, C, init_std);
  if (config.routing.use_selection_bias) p.routing.selection_bias = VectorT<Scalar>::Zero(E);
  for (Index e = 0; e < E; ++e) p.experts.push_back(init_expert<Scalar>(config.expert, rng, init_std));
  for (int s = 0; s < config.shared.count; ++s)
    p.shared.push_back(init_expert<Scalar>(config.shared_expert_config(), rng, init_std));
  if (config.shared.gated) p.shared_gate = normal_matrix(1, C, init_std);
  return p;
}

LayerConfig segment_layer(const LayerConfig& config, int m) {
  require(m >= 1, "m", m, "the segmentation factor must be at least 1");
  LayerConfig s = config;
  s.expert = segmented_config(config.expert, m);  // throws if m does not divide H
  s.routing.router.num_experts *= m;
  s.routing.top_k *= m;
  s.validate();
  return s;
}

template <typename Scalar>
LayerParamsT<Scalar> upcycle(const ExpertParamsT<Scalar>& dense_ffn, const LayerConfig& config, Rng& rng,
                             double noise_std, double router_std) {
  require(std::isfinite(noise_std) && noise_std >= 0, "noise_std", noise_std, "must be finite and >= 0");
  LayerParamsT<Scalar> p = init_layer<Scalar>(config, rng, router_std);
  auto perturb = [&](MatrixT<Scalar>& m) {
    if (noise_std > 0)
      for (Index i = 0; i < m.size(); ++i) m.data()[i] += static_cast<Scalar>(noise_std * rng.normal());
  };
  for (ExpertParamsT<Scalar>& e : p.experts) {
    require(dense_ffn.w_up.rows() == e.w_up.rows() && dense_ffn.w_up.cols() == e.w_up.cols() &&
                dense_ffn.w_down.rows() == e.w_down.rows() && dense_ffn.w_gate.size() == e.w_gate.size(),
            "dense_ffn shape", fmt::format("w_up ({}, {})", dense_ffn.w_up.rows(), dense_ffn.w_up.cols()),
            fmt::format("must match the experts' (intermediate_size, hidden_size) = ({}, {})",
                        config.expert.intermediate_size, config.hidden_size()));
    e = dense_ffn;
    perturb(e.w_gate);
    perturb(e.w_up);
    perturb(e.w_down);
  }
  return p;
}

#define MOELAB_INSTANTIATE(Scalar)                                                                                 \
  template void moe_layer_forward<Scalar>(LayerOutputT<Scalar>&, const MatrixT<Scalar>&,                          \
                                          std::span<const std::int32_t>, const LayerParamsT<Scalar>&,             \
                                          const LayerConfig&, Rng*, Observer*, std::span<const Index>,            \
                                          FaultHook*);                                                            \
  template void moe_layer_backward<Scalar>(LayerGradsT<Scalar>&, const MatrixT<Scalar>&, const LayerOutputT<Scalar>&, \
                                           const MatrixT<Scalar>&, const LayerParamsT<Scalar>&, const LayerConfig&, \
                                           Scalar, std::span<const Index>);                                       \
  template void combine_forward<Scalar>(MatrixT<Scalar>&, const MatrixT<Scalar>&, const VectorT<Scalar>&,          \
                                        std::span<const std::int32_t>, Index);                                    \
  template void combine_backward<Scalar>(MatrixT<Scalar>&, VectorT<Scalar>&, const MatrixT<Scalar>&,              \
                                         const MatrixT<Scalar>&, const VectorT<Scalar>&,                          \
                                         std::span<const std::int32_t>);                                         \
  template LayerParamsT<Scalar> init_layer<Scalar>(const LayerConfig&, Rng&, double);                             \
  template LayerParamsT<Scalar> upcycle<Scalar>(const ExpertParamsT<Scalar>&, const LayerConfig&, Rng&, double, double);
MOELAB_INSTANTIATE(float)
MOELAB_INSTANTIATE(double)
#undef MOELAB_INSTANTIATE

}  // namespace moelab
