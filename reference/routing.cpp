// moelab/reference/routing.cpp — see routing.h. T = tokens, E = experts, k = experts per token.
#include "reference/routing.h"

#include <fmt/format.h>

#include <cmath>

#include "reference/error.h"
#include "reference/losses.h"

namespace moelab {
namespace {

constexpr SelectionKind kSelectionKinds[] = {SelectionKind::topk,          SelectionKind::group_limited,
                                             SelectionKind::device_limited, SelectionKind::expert_choice,
                                             SelectionKind::hash,          SelectionKind::table};
constexpr AuxLoss kAuxLosses[] = {AuxLoss::none,       AuxLoss::switch_transformer, AuxLoss::hugging_face,
                                  AuxLoss::megablocks, AuxLoss::deepseek_v2,        AuxLoss::deepseek_v3_sequence};

template <typename Enum, std::size_t N, typename NameOf>
Enum parse_enum(std::string_view name, const Enum (&all)[N], NameOf name_of, std::string_view field) {
  std::string known;
  for (Enum e : all) {
    if (name_of(e) == name) return e;
    known += (known.empty() ? "" : ", ") + std::string(name_of(e));
  }
  fail(field, fmt::format("\"{}\"", name), "must be one of " + known);
}

void require_coef(double value, std::string_view field) {
  require(std::isfinite(value) && value >= 0, field, value, "must be finite and >= 0");
}

// The expert each (token, slot) went to, as token-choice ids, for the losses (expert choice has none).
template <typename Scalar>
void select(IndexMatrix& ids, const MatrixT<Scalar>& scores, std::span<const std::int32_t> token_ids,
            const VectorT<Scalar>* bias, const RoutingConfig& c, Observer* observer) {
  const int E = static_cast<int>(c.num_experts());
  switch (c.selection) {
    case SelectionKind::topk: return topk_select(ids, scores, c.top_k, bias, observer);
    case SelectionKind::group_limited: return group_limited_select(ids, scores, c.top_k, c.group, bias, observer);
    case SelectionKind::device_limited:
      return device_limited_select(ids, scores, c.top_k, c.num_devices, c.topk_devices, observer);
    case SelectionKind::expert_choice:
      return expert_choice_select(ids, scores, expert_choice_capacity(scores.rows(), E, c.capacity_factor), observer);
    case SelectionKind::hash:
      require(static_cast<Index>(token_ids.size()) == scores.rows(), "token_ids.size()", token_ids.size(),
              fmt::format("hash routing needs one token id per token (T = {})", scores.rows()));
      return hash_select(ids, token_ids, E, c.hash_seed, observer);
    case SelectionKind::table:
      require(static_cast<Index>(token_ids.size()) == scores.rows(), "token_ids.size()", token_ids.size(),
              fmt::format("table routing needs one token id per token (T = {})", scores.rows()));
      return table_select(ids, token_ids, c.hash_table, E, observer);
  }
}

// Mixtral, gpt-oss and Llama 4 take the top-k of the logits and compute the gates from the selected
// logits. softmax and sigmoid are monotone, so in exact arithmetic ranking the scores is the same;
// in floating point it is not: sigmoid saturates (sigmoid(40) = sigmoid(50) = 1 in float and
// double) and softmax underflows, and the tie then goes to the lower id where the model's code
// still tells the logits apart (found by the PyTorch oracle).
bool ranks_logits(const RoutingConfig& c) {
  return c.gating.kind == GateKind::softmax_of_selected_logits || c.gating.kind == GateKind::sigmoid_of_selected_logits;
}

}  // namespace

std::string_view selection_kind_name(SelectionKind kind) {
  switch (kind) {
    case SelectionKind::topk: return "topk";
    case SelectionKind::group_limited: return "group_limited";
    case SelectionKind::device_limited: return "device_limited";
    case SelectionKind::expert_choice: return "expert_choice";
    case SelectionKind::hash: return "hash";
    case SelectionKind::table: return "table";
  }
  fail("selection", static_cast<int>(kind), "is not a known SelectionKind");
}

SelectionKind parse_selection_kind(std::string_view name) {
  return parse_enum(name, kSelectionKinds, selection_kind_name, "selection");
}

std::string_view aux_loss_name(AuxLoss loss) {
  switch (loss) {
    case AuxLoss::none: return "none";
    case AuxLoss::switch_transformer: return "switch";
    case AuxLoss::hugging_face: return "hugging_face";
    case AuxLoss::megablocks: return "megablocks";
    case AuxLoss::deepseek_v2: return "deepseek_v2";
    case AuxLoss::deepseek_v3_sequence: return "deepseek_v3_sequence";
  }
  fail("aux_loss", static_cast<int>(loss), "is not a known AuxLoss");
}

AuxLoss parse_aux_loss(std::string_view name) { return parse_enum(name, kAuxLosses, aux_loss_name, "aux_loss"); }

void RoutingConfig::validate() const {
  router.validate();
  gating.validate();
  const Index E = num_experts();
  if (!expert_choice()) {
    require(top_k >= 1, "top_k", top_k, "must be at least 1");
    require(top_k <= E, "top_k", top_k, fmt::format("must not exceed num_experts = {}", E));
  }
  // The selection stage owns its rules: run it on an empty batch so that a bad n_group, topk_group,
  // device count or capacity factor is rejected now, by the same checks, with the same messages.
  const MatrixD no_scores(0, E);
  const VectorT<double> zero_bias = VectorT<double>::Zero(E);
  IndexMatrix ids;
  select(ids, no_scores, {}, use_selection_bias ? &zero_bias : nullptr, *this, nullptr);
  require(!ranks_logits(*this) || (selection == SelectionKind::topk && !use_selection_bias), "gating.kind",
          gate_kind_name(gating.kind), "gates from the selected logits go with plain top-k of the logits");
  if (expert_choice()) {
    require(gating.kind == GateKind::selected_scores && !gating.renormalize && gating.routed_scaling_factor == 1.0,
            "gating", gate_kind_name(gating.kind),
            "expert choice gates are the chosen scores, unscaled (Zhou et al. 2022 eq. 1)");
    require(aux_loss == AuxLoss::none, "aux_loss", aux_loss_name(aux_loss),
            "expert choice is balanced by construction: every expert takes exactly C tokens");
  }
  require(!use_selection_bias || selection == SelectionKind::topk || selection == SelectionKind::group_limited,
          "use_selection_bias", "true", "the balancing bias applies to topk and group_limited selection only");
  require(selection != SelectionKind::hash || top_k == 1, "top_k", top_k,
          "hash routing picks one expert per token (Roller et al. 2021); use table routing for k > 1");
  require(selection != SelectionKind::table || hash_table.cols() == top_k, "hash_table.cols()", hash_table.cols(),
          fmt::format("must equal top_k = {}", top_k));
  require_coef(aux_loss_coef, "aux_loss_coef");
  require_coef(device_loss_coef, "device_loss_coef");
  require_coef(comm_loss_coef, "comm_loss_coef");
  require_coef(z_loss_coef, "z_loss_coef");
  require_coef(bias_update_rate, "bias_update_rate");
  require(aux_loss == AuxLoss::deepseek_v2 || (device_loss_coef == 0 && comm_loss_coef == 0), "device_loss_coef",
          device_loss_coef, "device and communication balance losses belong to aux_loss = deepseek_v2");
  require(aux_loss != AuxLoss::deepseek_v2 || selection == SelectionKind::device_limited || (device_loss_coef == 0 && comm_loss_coef == 0),
          "selection", selection_kind_name(selection),
          "DeepSeek-V2's device and communication losses need device_limited selection (num_devices, topk_devices)");
}

namespace {

std::vector<Index> sequences_or_one(std::span<const Index> sequence_lengths, Index T) {
  if (!sequence_lengths.empty()) return {sequence_lengths.begin(), sequence_lengths.end()};
  return {T};
}

// The balance loss(es) and the z-loss of a token-choice routing, coefficients applied.
template <typename Scalar>
void add_losses(RoutingOutputT<Scalar>& out, const RoutingConfig& c, std::span<const Index> sequence_lengths,
                Observer* observer) {
  out.aux_loss = 0;
  out.z_loss = 0;
  if (out.logits.rows() == 0 || c.expert_choice()) return;  // nothing to balance
  const Index T = out.logits.rows();
  switch (c.aux_loss) {
    case AuxLoss::none: break;
    case AuxLoss::switch_transformer:
      out.aux_loss = switch_aux_loss_forward(out.scores, out.ids, c.aux_loss_coef, observer);
      break;
    case AuxLoss::hugging_face:
      out.aux_loss = hf_load_balancing_loss_forward(out.logits, out.ids, c.aux_loss_coef, observer);
      break;
    case AuxLoss::megablocks:
      out.aux_loss = megablocks_load_balancing_loss_forward(out.scores, out.ids, 1, c.aux_loss_coef, observer);
      break;
    case AuxLoss::deepseek_v2:
      out.aux_loss = deepseek_v2_expert_balance_loss_forward(out.scores, out.ids, c.aux_loss_coef, observer);
      if (c.device_loss_coef > 0)
        out.aux_loss += deepseek_v2_device_balance_loss_forward(out.scores, out.ids, c.num_devices,
                                                                c.device_loss_coef, observer);
      if (c.comm_loss_coef > 0)
        out.aux_loss += deepseek_v2_comm_balance_loss_forward(out.scores, out.ids, c.num_devices, c.topk_devices,
                                                              c.comm_loss_coef, observer);
      break;
    case AuxLoss::deepseek_v3_sequence: {
      const std::vector<Index> lengths = sequences_or_one(sequence_lengths, T);
      out.aux_loss = deepseek_v3_sequence_balance_loss_forward(out.scores, out.ids, lengths, c.aux_loss_coef, observer);
      break;
    }
  }
  if (c.z_loss_coef > 0) out.z_loss = router_z_loss_forward(out.logits, c.z_loss_coef, observer);
}

// Adds scale * d(losses) to dlogits and dscores (both (T, E)).
template <typename Scalar>
void add_loss_gradients(MatrixT<Scalar>& dlogits, MatrixT<Scalar>& dscores, const RoutingOutputT<Scalar>& out,
                        const RoutingConfig& c, Scalar scale, std::span<const Index> sequence_lengths) {
  if (out.logits.rows() == 0 || c.expert_choice()) return;
  const Index T = out.logits.rows();
  MatrixT<Scalar> g;
  switch (c.aux_loss) {
    case AuxLoss::none: break;
    case AuxLoss::switch_transformer:
      switch_aux_loss_backward(g, out.scores, out.ids, c.aux_loss_coef);
      dscores += scale * g;
      break;
    case AuxLoss::hugging_face:
      hf_load_balancing_loss_backward(g, out.logits, out.ids, c.aux_loss_coef);
      dlogits += scale * g;
      break;
    case AuxLoss::megablocks:
      megablocks_load_balancing_loss_backward(g, out.scores, out.ids, 1, c.aux_loss_coef);
      dscores += scale * g;
      break;
    case AuxLoss::deepseek_v2:
      deepseek_v2_expert_balance_loss_backward(g, out.scores, out.ids, c.aux_loss_coef);
      dscores += scale * g;
      if (c.device_loss_coef > 0) {
        deepseek_v2_device_balance_loss_backward(g, out.scores, out.ids, c.num_devices, c.device_loss_coef);
        dscores += scale * g;
      }
      if (c.comm_loss_coef > 0) {
        deepseek_v2_comm_balance_loss_backward(g, out.scores, out.ids, c.num_devices, c.topk_devices,
                                               c.comm_loss_coef);
        dscores += scale * g;
      }
      break;
    case AuxLoss::deepseek_v3_sequence: {
      const std::vector<Index> lengths = sequences_or_one(sequence_lengths, T);
      deepseek_v3_sequence_balance_loss_backward(g, out.scores, out.ids, lengths, c.aux_loss_coef);
      dscores += scale * g;
      break;
    }
  }
  if (c.z_loss_coef > 0) {
    router_z_loss_backward(g, out.logits, c.z_loss_coef);
    dlogits += scale * g;
  }
}

}  // namespace

template <typename Scalar>
void route_forward(RoutingOutputT<Scalar>& out, const MatrixT<Scalar>& x, std::span<const std::int32_t> token_ids,
                   const RoutingParamsT<Scalar>& params, const RoutingConfig& config, Rng* rng, Observer* observer,
                   std::span<const Index> sequence_lengths, FaultHook* faults) {
  config.validate();
  const Index E = config.num_experts();
  require(!config.use_selection_bias || params.selection_bias.size() == E, "selection_bias.size()",
          params.selection_bias.size(), fmt::format("must equal num_experts = {}", E));
  MatrixT<Scalar> x_router;  // the router's own copy of x, made only for a fault hook
  if (faults != nullptr) {
    x_router = x;
    apply_fault_hook(faults, {.site = FaultSite::router_input}, x_router);
  }
  router_forward(out.logits, out.router_cache, faults != nullptr ? x_router : x, params.router, config.router, rng,
                 observer);
  apply_fault_hook(faults, {.site = FaultSite::router_logits}, out.logits);
  score_forward(out.scores, out.logits, config.scoring, observer);
  select(out.ids, ranks_logits(config) ? out.logits : out.scores, token_ids,
         config.use_selection_bias ? &params.selection_bias : nullptr, config, observer);
  if (config.expert_choice()) {  // gate of (expert e, its c-th token) = that token's score for e
    out.gates.resize(out.ids.rows(), out.ids.cols());
    for (Index e = 0; e < out.ids.rows(); ++e)
      for (Index c = 0; c < out.ids.cols(); ++c) out.gates(e, c) = out.scores(out.ids(e, c), e);
    out.load.assign(static_cast<std::size_t>(E), out.ids.cols());
  } else {
    gating_forward(out.gates, out.logits, out.scores, out.ids, config.gating, observer);
    apply_fault_hook(faults, {.site = FaultSite::gate_values}, out.gates);
    out.load = expert_load(out.ids, static_cast<int>(E));
  }
  add_losses(out, config, sequence_lengths, observer);
}

template <typename Scalar>
void route_backward(MatrixT<Scalar>& dx, RouterParamsT<Scalar>& dparams, const MatrixT<Scalar>& dgates,
                    const RoutingOutputT<Scalar>& out, const MatrixT<Scalar>& x,
                    const RoutingParamsT<Scalar>& params, const RoutingConfig& config, Scalar loss_scale,
                    std::span<const Index> sequence_lengths) {
  config.validate();
  const Index T = out.logits.rows(), E = out.logits.cols();
  require(dgates.rows() == out.gates.rows() && dgates.cols() == out.gates.cols(), "dgates shape",
          fmt::format("({}, {})", dgates.rows(), dgates.cols()),
          fmt::format("must equal the gates shape ({}, {})", out.gates.rows(), out.gates.cols()));
  MatrixT<Scalar> dlogits = MatrixT<Scalar>::Zero(T, E);
  MatrixT<Scalar> dscores = MatrixT<Scalar>::Zero(T, E);
  if (config.expert_choice()) {
    for (Index e = 0; e < out.ids.rows(); ++e)
      for (Index c = 0; c < out.ids.cols(); ++c) dscores(out.ids(e, c), e) += dgates(e, c);
  } else {
    gating_backward(dlogits, dscores, dgates, out.logits, out.scores, out.ids, config.gating);
  }
  add_loss_gradients(dlogits, dscores, out, config, loss_scale, sequence_lengths);
  MatrixT<Scalar> dlogits_from_scores;
  score_backward(dlogits_from_scores, out.logits, out.scores, dscores, config.scoring);
  dlogits += dlogits_from_scores;
  router_backward(dx, dparams, dlogits, out.router_cache, x, params.router, config.router);
}

#define MOELAB_INSTANTIATE(Scalar)                                                                              \
  template void route_forward<Scalar>(RoutingOutputT<Scalar>&, const MatrixT<Scalar>&,                         \
                                      std::span<const std::int32_t>, const RoutingParamsT<Scalar>&,            \
                                      const RoutingConfig&, Rng*, Observer*, std::span<const Index>,           \
                                      FaultHook*);                                                             \
  template void route_backward<Scalar>(MatrixT<Scalar>&, RouterParamsT<Scalar>&, const MatrixT<Scalar>&,      \
                                       const RoutingOutputT<Scalar>&, const MatrixT<Scalar>&,                  \
                                       const RoutingParamsT<Scalar>&, const RoutingConfig&, Scalar,            \
                                       std::span<const Index>);
MOELAB_INSTANTIATE(float)
MOELAB_INSTANTIATE(double)
#undef MOELAB_INSTANTIATE

}  // namespace moelab
