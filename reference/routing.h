// moelab/reference/routing.h — the routing of one MoE layer, stage by stage, forward and backward.
//
//   x --router--> logits --scoring--> scores --selection--> ids --gating--> gates
//                   |                   |  (+ selection bias, for choosing only)
//                   +--- z-loss         +--- balance loss (aux)
//
// One RoutingConfig describes every published convention; presets.h names the ones models use.
// Token choice (every selection but expert_choice): ids and gates are (T, k), token t's experts.
// Selection ranks the scores (+ bias), or the logits when the gates come from the selected logits
// (Mixtral, gpt-oss, Llama 4: their code takes the top-k of the logits, which saturated or
// underflowed scores can no longer tell apart).
// Expert choice: ids and gates are (E, C), expert e's tokens (Zhou et al. 2022).
//
// Shapes: T = tokens, C = hidden size, E = experts, k = experts per token.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "reference/fault_hook.h"
#include "reference/gating.h"
#include "reference/observer.h"
#include "reference/random.h"
#include "reference/router.h"
#include "reference/scoring.h"
#include "reference/selection.h"
#include "reference/types.h"

namespace moelab {

enum class SelectionKind { topk, group_limited, device_limited, expert_choice, hash, table };
std::string_view selection_kind_name(SelectionKind kind);
SelectionKind parse_selection_kind(std::string_view name);

// Which balance loss the layer adds (each is documented in losses.h and docs/losses.md).
enum class AuxLoss { none, switch_transformer, hugging_face, megablocks, deepseek_v2, deepseek_v3_sequence };
std::string_view aux_loss_name(AuxLoss loss);
AuxLoss parse_aux_loss(std::string_view name);

struct RoutingConfig {
  RouterConfig router;                   // hidden size, experts, bias, dtype, noise
  Scoring scoring = Scoring::softmax;
  SelectionKind selection = SelectionKind::topk;
  int top_k = 1;                         // k (token choice)
  bool use_selection_bias = false;       // DeepSeek-V3 aux-loss-free balancing: scores + b choose, never weigh
  GroupLimit group;                      // group_limited
  int num_devices = 1;                   // device_limited: D, experts spread evenly and contiguously
  int topk_devices = 1;                  //                 M, devices a token may reach
  double capacity_factor = 1.0;          // expert_choice: C = ceil(T * capacity_factor / E)
  std::uint64_t hash_seed = 0;           // hash
  IndexMatrix hash_table;                // table: (V, k) expert ids, DeepSeek-V4's tid2eid
  GatingConfig gating;
  AuxLoss aux_loss = AuxLoss::none;
  double aux_loss_coef = 0.0;            // alpha of the balance loss (expert-level for deepseek_v2)
  double device_loss_coef = 0.0;         // deepseek_v2: alpha2, device-level balance (needs num_devices)
  double comm_loss_coef = 0.0;           // deepseek_v2: alpha3, communication balance (needs topk_devices)
  double z_loss_coef = 0.0;              // ST-MoE router z-loss
  double bias_update_rate = 0.0;         // DeepSeek-V3 gamma (aux-loss-free balancing), used by BiasBalancer

  Index num_experts() const { return router.num_experts; }
  bool expert_choice() const { return selection == SelectionKind::expert_choice; }
  // Throws Error naming the field, the value and the rule for any inconsistency.
  void validate() const;
};

template <typename Scalar>
struct RoutingParamsT {
  RouterParamsT<Scalar> router;
  VectorT<Scalar> selection_bias;  // (E) when use_selection_bias: state, updated by BiasBalancer, no gradient
};

template <typename Scalar>
struct RoutingOutputT {
  MatrixT<Scalar> logits;            // (T, E)
  MatrixT<Scalar> scores;            // (T, E)
  IndexMatrix ids;                   // (T, k) expert ids, or (E, C) token ids for expert choice
  MatrixT<Scalar> gates;             // same shape as ids
  std::vector<std::int64_t> load;    // (E) token-expert pairs per expert
  Scalar aux_loss = 0;               // the balance loss(es), coefficients applied
  Scalar z_loss = 0;                 // the z-loss, coefficient applied
  RouterCacheT<Scalar> router_cache;
};

using RoutingParams = RoutingParamsT<float>;
using RoutingOutput = RoutingOutputT<float>;

// Routes T tokens. token_ids (T) are needed by hash and table selection only (may be empty
// otherwise); sequence_lengths (summing to T) by the deepseek_v3_sequence loss only (empty = one
// sequence). rng is needed when the router adds noise. `faults` (fault_hook.h; null by default) is
// handed the router's copy of x, the logits and the gates (token choice).
template <typename Scalar>
void route_forward(RoutingOutputT<Scalar>& out, const MatrixT<Scalar>& x, std::span<const std::int32_t> token_ids,
                   const RoutingParamsT<Scalar>& params, const RoutingConfig& config, Rng* rng,
                   Observer* observer = nullptr, std::span<const Index> sequence_lengths = {},
                   FaultHook* faults = nullptr);

// Backpropagates dgates (same shape as out.gates) and the losses (d aux_loss = d z_loss = 1 times
// loss_scale, i.e. the layer's total loss is sum(w * gates) + loss_scale * (aux + z)) to the
// router input and parameters. The selection bias gets no gradient.
template <typename Scalar>
void route_backward(MatrixT<Scalar>& dx, RouterParamsT<Scalar>& dparams, const MatrixT<Scalar>& dgates,
                    const RoutingOutputT<Scalar>& out, const MatrixT<Scalar>& x,
                    const RoutingParamsT<Scalar>& params, const RoutingConfig& config, Scalar loss_scale = 1,
                    std::span<const Index> sequence_lengths = {});

}  // namespace moelab
