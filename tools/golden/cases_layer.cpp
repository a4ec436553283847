// moelab/tools/golden/cases_layer.cpp — golden cases of the routing and of whole MoE layers.
//
// Every value is computed by the reference in double from the inputs and parameters as stored
// (rounded to the case dtype), so a kernel that consumes exactly the stored bits is compared with
// the exact answer for those bits. Parameters: router and expert input projections ~ N(0, 1/C)
// (logits ~ N(0, 1) for x ~ N(0, 1)), down projections ~ N(0, 1/H) (outputs of order 1), every
// bias the layer has ~ N(0, 0.3^2), DeepSeek-V3's selection bias ~ N(0, 0.1^2).
#include "tools/golden/cases.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "reference/config_json.h"
#include "reference/layer.h"
#include "tools/golden/builder.h"

namespace moelab::golden {
namespace {

VectorT<double> normal_vector(Rng& rng, Index n, double stddev) {
  VectorT<double> v(n);
  for (Index i = 0; i < n; ++i) v(i) = stddev * rng.normal();
  return v;
}

void randomise_biases(ExpertParamsT<double>& p, Rng& rng) {
  if (p.b_gate.size() > 0) p.b_gate = normal_vector(rng, p.b_gate.size(), 0.3);
  if (p.b_up.size() > 0) p.b_up = normal_vector(rng, p.b_up.size(), 0.3);
  if (p.b_down.size() > 0) p.b_down = normal_vector(rng, p.b_down.size(), 0.3);
}

LayerParamsT<double> golden_params(const LayerConfig& lc, Rng& rng) {
  const double C = static_cast<double>(lc.hidden_size());
  LayerParamsT<double> p = init_layer<double>(lc, rng, 1.0 / std::sqrt(C));
  auto scale_down = [&](ExpertParamsT<double>& e) {
    e.w_down *= std::sqrt(C / static_cast<double>(e.w_down.cols()));
    randomise_biases(e, rng);
  };
  for (ExpertParamsT<double>& e : p.experts) scale_down(e);
  for (ExpertParamsT<double>& e : p.shared) scale_down(e);
  if (p.routing.router.bias.size() > 0) p.routing.router.bias = normal_vector(rng, lc.num_experts(), 0.3);
  if (p.routing.selection_bias.size() > 0) p.routing.selection_bias = normal_vector(rng, lc.num_experts(), 0.1);
  return p;
}

bool ranks_logits(const RoutingConfig& c) {
  return c.gating.kind == GateKind::softmax_of_selected_logits || c.gating.kind == GateKind::sigmoid_of_selected_logits;
}

bool ranked(const RoutingConfig& c) { return c.selection != SelectionKind::hash && c.selection != SelectionKind::table; }

// The values the selection ranked: the logits, or the scores plus the selection bias.
MatrixD ranking_values(const RoutingOutputT<double>& out, const RoutingConfig& c, const VectorT<double>& bias) {
  if (ranks_logits(c)) return out.logits;
  MatrixD r = out.scores;
  if (c.use_selection_bias) r.rowwise() += bias.transpose();
  return r;
}

bool has_losses(const RoutingConfig& c) {
  return (c.aux_loss != AuxLoss::none && (c.aux_loss_coef > 0 || c.device_loss_coef > 0 || c.comm_loss_coef > 0)) ||
         c.z_loss_coef > 0;
}

struct Tolerances {
  Tol logits, scores, gates, losses;
};

Tolerances routing_tolerances(const RoutingConfig& c, Format format, Index T) {
  const Format f = coarser(format, c.router.dtype);
  const Index C = c.router.hidden_size, E = c.num_experts();
  return {.logits = {1, C, f}, .scores = {2, C + E, f}, .gates = {3, C + E, f}, .losses = {3, T * E, f}};
}

// logits ... z_loss: what route_forward computes, with their checks. `coupled`: the gates of a token
// depend on other tokens (never for the routing itself; kept for symmetry with the layer).
void put_routing_outputs(Builder& b, const RoutingOutputT<double>& out, const RoutingConfig& c,
                         const VectorT<double>& selection_bias, const Tolerances& tol) {
  // Copies: the builder's list of checks grows below, which moves its elements.
  const Check logits = b.allclose("output.logits", out.logits, tol.logits, "token");
  const Check scores = b.allclose("output.scores", out.scores, tol.scores, "token");
  const bool ec = c.expert_choice();
  const std::string ids = ec ? "output.expert_choice_ids" : "output.topk_ids";
  if (ranked(c)) {
    b.reference("output.ranking", ranking_values(out, c, selection_bias));
    b.topk_set(ids, out.ids, "output.ranking", ranks_logits(c) ? logits : scores, ec);
  } else {
    b.exact(ids, out.ids, "token");
  }
  b.allclose("output.gates", out.gates, tol.gates, ec ? "all" : "token", ids);
  b.exact("output.load", out.load);
  if (c.aux_loss != AuxLoss::none) b.allclose_scalar("output.aux_loss", out.aux_loss, tol.losses);
  if (c.z_loss_coef > 0) b.allclose_scalar("output.z_loss", out.z_loss, tol.losses);
}

// Inputs common to the routing and the layer: x, token ids (hash and table routing), sequence
// lengths (DeepSeek-V3's sequence-wise loss).
struct RoutingInputs {
  MatrixD x;
  std::vector<std::int32_t> token_ids;
  std::vector<Index> sequence_lengths;
};

RoutingInputs put_routing_inputs(Builder& b, const RoutingConfig& c, const MatrixD& x, Rng& rng,
                                 const std::vector<Index>& sequence_lengths) {
  RoutingInputs in;
  in.x = b.input("input.x", x);
  if (!ranked(c)) {
    for (Index t = 0; t < x.rows(); ++t) {
      const std::uint64_t vocabulary = c.selection == SelectionKind::table ? c.hash_table.rows() : 1000;
      in.token_ids.push_back(static_cast<std::int32_t>(rng.next_u64() % vocabulary));
    }
    b.input_ints("input.token_ids", std::span<const std::int32_t>(in.token_ids));
  }
  if (c.aux_loss == AuxLoss::deepseek_v3_sequence && !sequence_lengths.empty()) {
    in.sequence_lengths = sequence_lengths;
    const std::vector<std::int64_t> lengths(sequence_lengths.begin(), sequence_lengths.end());
    b.input_ints("input.sequence_lengths", std::span<const std::int64_t>(lengths));
  }
  return in;
}

std::string with_noise_off(RoutingConfig& c) {
  if (c.router.noise == RouterNoise::none) return "";
  c.router.noise = RouterNoise::none;
  return " Router noise off (evaluation).";
}

}  // namespace

Case make_routing_case(const LayerCaseSpec& s) {
  RoutingConfig c = s.config.routing;
  Case out{.name = s.name,
           .component = "routing",
           .preset = s.preset,
           .description = s.description + with_noise_off(c),
           .dtype = std::string(format_name(s.dtype)),
           .seed = s.seed,
           .config = to_json(c)};
  Builder b(out);
  Rng rng(s.seed);
  const Index T = s.tokens, C = c.router.hidden_size, E = c.num_experts();
  LayerConfig lc;  // the router's parameters only: experts of width 1, no shared experts
  lc.routing = c;
  lc.expert = {.hidden_size = C, .intermediate_size = 1};
  LayerParamsT<double> p = golden_params(lc, rng);
  MatrixD x = normal(rng, T, C);
  if (s.adjust) s.adjust(x, p);
  RoutingParamsT<double>& params = p.routing;
  RoutingInputs in = put_routing_inputs(b, c, x, rng, s.sequence_lengths);
  params.router.weight = b.input("param.router.weight", params.router.weight);
  if (params.router.bias.size() > 0) params.router.bias = b.input_vector("param.router.bias", params.router.bias);
  if (params.selection_bias.size() > 0)
    params.selection_bias = b.input_vector_f32("param.selection_bias", params.selection_bias);

  RoutingOutputT<double> r;
  route_forward(r, in.x, in.token_ids, params, c, nullptr, nullptr, in.sequence_lengths);
  const Tolerances tol = routing_tolerances(c, s.dtype, T);
  put_routing_outputs(b, r, c, params.selection_bias, tol);
  if (s.backward) {  // loss = sum(dgates * gates) + aux + z: dgates in the order of the reference's ids
    const MatrixD dgates = b.input("input.dgates", normal(rng, r.gates.rows(), r.gates.cols()));
    MatrixD dx;
    RouterParamsT<double> dparams;
    route_backward(dx, dparams, dgates, r, in.x, params, c, 1.0, in.sequence_lengths);
    const Tol g{.depth = 5, .reduction = std::max(T, C + E), .format = tol.gates.format};
    b.allclose("grad.x", dx, g, has_losses(c) ? "all" : "token");
    b.allclose("grad.router.weight", dparams.weight, g);
    if (dparams.bias.size() > 0) b.allclose("grad.router.bias", dparams.bias, g);
  }
  out.tolerance_note = fmt::format(
      "routing in {} (case dtype {}, router dtype {}): logits depth 1, scores 2, gates and losses 3, gradients 5 "
      "roundings; reductions of C = {} and E = {} terms",
      format_name(tol.gates.format), out.dtype, format_name(c.router.dtype), C, E);
  return out;
}

Case make_layer_case(const LayerCaseSpec& s) {
  LayerConfig lc = s.config;
  Case out{.name = s.name,
           .component = "layer",
           .preset = s.preset,
           .description = s.description + with_noise_off(lc.routing),
           .dtype = std::string(format_name(s.dtype)),
           .seed = s.seed,
           .config = to_json(lc)};
  Builder b(out);
  Rng rng(s.seed);
  const RoutingConfig& c = lc.routing;
  const Index T = s.tokens, C = lc.hidden_size(), E = lc.num_experts(), H = lc.expert.intermediate_size;
  LayerParamsT<double> p = golden_params(lc, rng);
  MatrixD x = normal(rng, T, C);
  if (s.adjust) s.adjust(x, p);
  RoutingInputs in = put_routing_inputs(b, c, x, rng, s.sequence_lengths);
  put_layer_params(b, p);

  LayerOutputT<double> r;
  moe_layer_forward(r, in.x, in.token_ids, p, lc, nullptr, nullptr, in.sequence_lengths);
  const Tolerances tol = routing_tolerances(c, s.dtype, T);
  put_routing_outputs(b, r.routing, c, p.routing.selection_bias, tol);

  const bool ec = c.expert_choice();
  const bool coupled = ec || !lc.capacity.dropless;  // a token's output depends on other tokens' choices
  if (!ec && !lc.capacity.dropless) {
    b.exact("output.keep", r.keep).align = "output.topk_ids";
    b.exact("output.dropped", std::span<const std::int64_t>(r.dropped));
  }
  b.exact("output.counts", std::span<const std::int64_t>(r.plan.counts));
  b.exact("output.offsets", std::span<const std::int64_t>(r.plan.offsets));
  b.permutation("output.row_token", r.plan.row_token, "output.offsets");

  const Format f = tol.gates.format;  // the routing's format: everything downstream uses the gates
  const Index widest = std::max({C, H, lc.shared.intermediate_size});
  b.allclose("output.expert_out", r.expert_out, {3, widest, f}, "permuted");
  b.allclose("output.y", r.y, {5, widest + c.top_k + lc.shared.count, f}, coupled ? "all" : "token");
  if (s.backward) {
    const MatrixD dy = b.input("input.dy", normal(rng, T, C));
    LayerGradsT<double> g;
    moe_layer_backward(g, dy, r, in.x, p, lc, 1.0, in.sequence_lengths);
    const Tol gt{.depth = 6, .reduction = std::max({T * c.top_k, widest, E}), .format = f};
    b.allclose("grad.x", g.dx, gt, coupled || has_losses(c) ? "all" : "token");
    put_layer_grads(b, g, gt);
  }
  out.tolerance_note = fmt::format(
      "layer in {} (case dtype {}, router dtype {}): routing as its own cases; expert outputs depth 3, y 5, "
      "gradients 6 roundings; reductions up to {} terms",
      format_name(f), out.dtype, format_name(c.router.dtype), std::max(widest, T * c.top_k));
  return out;
}

}  // namespace moelab::golden
