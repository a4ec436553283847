// moelab/reference/layer.h — one Mixture-of-Experts layer, forward and backward, stage by stage.
//
//   x -> routing (router, scoring, selection, gating, losses)  -> ids, gates       routing.h
//     -> capacity (which token-expert pairs are kept)          -> keep, dropped    capacity.h
//     -> dispatch (counting sort into expert-major rows)       -> plan, permuted   dispatch.h
//     -> experts  (each expert's FFN on its rows)              -> expert_out       experts.h
//     -> combine  y_t = sum over t's kept rows r of g_r * expert_out_r  + shared experts(x_t)
//
// Combine works per permuted row r: its token row_token[r] and its gate g_r. Token choice and
// expert choice differ only in how the rows are planned (pairs (t, j), or expert e's chosen
// tokens), so one combine serves both. Where the gate goes is a preset setting: on the expert's
// output (most models) or on its input (Llama 4: the expert sees g_r * x_t). Accumulation is in
// Scalar (float32 for the model, double for checks and golden values).
//
// The residual connection is the caller's: a token dropped by all its experts gets only the shared
// experts here (and its residual stream outside).
//
// Shapes: T = tokens, C = hidden size, E = routed experts, k = experts per token, N = kept rows.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "reference/capacity.h"
#include "reference/dispatch.h"
#include "reference/experts.h"
#include "reference/fault_hook.h"
#include "reference/observer.h"
#include "reference/random.h"
#include "reference/routing.h"
#include "reference/types.h"

namespace moelab {

enum class GatePlacement { output, input };
std::string_view gate_placement_name(GatePlacement placement);  // "output", "input"
GatePlacement parse_gate_placement(std::string_view name);      // throws Error naming "gate_placement"

struct SharedExpertsConfig {
  int count = 0;                // always-active experts beside the routed ones
  Index intermediate_size = 0;  // each shared expert's H
  bool gated = false;           // Qwen2-MoE: the shared output is scaled by sigmoid(x w^T)
};

struct LayerConfig {
  RoutingConfig routing;
  ExpertConfig expert;          // every routed expert; expert.hidden_size = routing.router.hidden_size
  CapacityConfig capacity;      // dropless by default
  SharedExpertsConfig shared;
  GatePlacement gate_placement = GatePlacement::output;
  Index hidden_size() const { return routing.router.hidden_size; }
  Index num_experts() const { return routing.num_experts(); }
  ExpertConfig shared_expert_config() const;  // the routed expert's, with the shared intermediate size
  void validate() const;  // throws Error naming the field, the value and the rule
};

template <typename Scalar>
struct LayerParamsT {
  RoutingParamsT<Scalar> routing;
  std::vector<ExpertParamsT<Scalar>> experts;  // (E)
  std::vector<ExpertParamsT<Scalar>> shared;   // (shared.count)
  MatrixT<Scalar> shared_gate;                 // (1, C) when shared.gated
};

template <typename Scalar>
struct LayerOutputT {
  MatrixT<Scalar> y;                         // (T, C) the layer's output (without the residual)
  RoutingOutputT<Scalar> routing;            // logits, scores, ids, gates, load, losses
  IndexMatrix keep;                          // (T, k) 1 = kept (token choice; empty for expert choice)
  std::vector<std::int64_t> dropped;         // (E) dropped pairs per expert
  Dispatch plan;                             // expert-major rows
  VectorT<Scalar> row_gate;                  // (N) gate of each row
  MatrixT<Scalar> expert_in;                 // (N, C) each row's input (g_r x_t where the gate is on the input)
  MatrixT<Scalar> expert_out;                // (N, C)
  std::vector<ExpertCacheT<Scalar>> expert_cache;  // (E)
  std::vector<MatrixT<Scalar>> shared_out;   // (shared.count) (T, C), before the shared gate
  std::vector<ExpertCacheT<Scalar>> shared_cache;
  VectorT<Scalar> shared_gate_values;        // (T) when shared.gated
  Scalar aux_loss = 0, z_loss = 0;           // from routing
};

template <typename Scalar>
struct LayerGradsT {
  MatrixT<Scalar> dx;                          // (T, C)
  RouterParamsT<Scalar> router;
  std::vector<ExpertParamsT<Scalar>> experts;  // (E), zeros for experts that got no rows
  std::vector<ExpertParamsT<Scalar>> shared;
  MatrixT<Scalar> shared_gate;                 // (1, C) when gated
};

using LayerParams = LayerParamsT<float>;
using LayerOutput = LayerOutputT<float>;

// Combine (the last stage, on its own for golden values and kernels): every permuted row r adds
// its expert output, weighted, to its token's output row:
//   y_t = sum over rows r with row_token[r] = t of row_weight_r expert_out_r
// row_weight is the gate (gate on the output) or 1 (gate on the input). Tokens without rows get 0.
//   y:          (T, C) out, resized
//   expert_out: (N, C) in
//   row_weight: (N) in
//   row_token:  (N) in, tokens in [0, T) (Error naming the row otherwise)
template <typename Scalar>
void combine_forward(MatrixT<Scalar>& y, const MatrixT<Scalar>& expert_out, const VectorT<Scalar>& row_weight,
                     std::span<const std::int32_t> row_token, Index tokens);
// dexpert_out_r = row_weight_r dy_t,  drow_weight_r = <dy_t, expert_out_r>   (t = row_token[r])
//   dexpert_out: (N, C) out, resized;  drow_weight: (N) out, resized;  dy: (T, C) in
template <typename Scalar>
void combine_backward(MatrixT<Scalar>& dexpert_out, VectorT<Scalar>& drow_weight, const MatrixT<Scalar>& dy,
                      const MatrixT<Scalar>& expert_out, const VectorT<Scalar>& row_weight,
                      std::span<const std::int32_t> row_token);

// token_ids, sequence_lengths and rng as for route_forward. Emits every stage's events, plus
// events::timing with the seconds of each stage. `faults` (fault_hook.h; null by default) is handed
// every intermediate that the table there lists, and route_forward's.
template <typename Scalar>
void moe_layer_forward(LayerOutputT<Scalar>& out, const MatrixT<Scalar>& x, std::span<const std::int32_t> token_ids,
                       const LayerParamsT<Scalar>& params, const LayerConfig& config, Rng* rng,
                       Observer* observer = nullptr, std::span<const Index> sequence_lengths = {},
                       FaultHook* faults = nullptr);

// The gradient of sum(dy * y) + loss_scale * (aux_loss + z_loss) with respect to x and every
// parameter (router, routed experts, shared experts, shared gate). The selection bias gets none.
template <typename Scalar>
void moe_layer_backward(LayerGradsT<Scalar>& grads, const MatrixT<Scalar>& dy, const LayerOutputT<Scalar>& out,
                        const MatrixT<Scalar>& x, const LayerParamsT<Scalar>& params, const LayerConfig& config,
                        Scalar loss_scale = 1, std::span<const Index> sequence_lengths = {});

// Seeded initialisation of every parameter: router and shared gate ~ N(0, init_std^2), experts as
// init_expert, router bias and selection bias zero.
template <typename Scalar>
LayerParamsT<Scalar> init_layer(const LayerConfig& config, Rng& rng, double init_std = 0.02);

// Sparse upcycling (Komatsuzaki et al. 2022): every routed expert starts as a copy of the dense FFN
// (plus N(0, noise_std^2) noise, 0 = exact copies), with a fresh router and fresh shared experts,
// both ~ N(0, router_std^2). With exact copies, no shared experts, no drops and gates that sum to 1, the
// layer computes the dense FFN exactly (tested).
// Fine-grained expert segmentation (DeepSeekMoE, Dai et al. 2024, sec. 3.1): every expert split
// into m of intermediate size H / m, with m times the experts and m times k, so parameters and
// FLOPs per token stay the same (the router grows: it scores m times the experts). Throws Error if
// m does not divide H, or if the routing's group / device counts no longer fit.
LayerConfig segment_layer(const LayerConfig& config, int m);

template <typename Scalar>
LayerParamsT<Scalar> upcycle(const ExpertParamsT<Scalar>& dense_ffn, const LayerConfig& config, Rng& rng,
                             double noise_std = 0.0, double router_std = 0.02);

}  // namespace moelab
