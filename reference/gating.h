// moelab/reference/gating.h — the gating stage: the weights of the selected experts.
//
// Given a token's router logits l (E), its scores s (E) and its selected experts ids (k), the gate
// weights g (k) are built in three steps, each a published convention:
//   1. raw weights r_j, from one of
//        selected_scores             r_j = s[id_j]          softmax -> top-k (Switch, GShard, Qwen,
//                                                           OLMoE, DeepSeek-V2) or sigmoid (DeepSeek-V3)
//        softmax_of_selected_logits  r = softmax(l[ids])    top-k of logits, then softmax over the k
//                                                           (Mixtral, gpt-oss)
//        sigmoid_of_selected_logits  r_j = sigmoid(l[id_j]) (Llama 4)
//        ones                        r_j = 1                (hash layers)
//   2. optional renormalisation      r_j <- r_j / (sum_i r_i + renorm_eps)
//        (Qwen's norm_topk_prob, GShard's top-2; DeepSeek-V3 adds eps = 1e-20)
//   3. scaling                       g_j = routed_scaling_factor * r_j   (DeepSeek-V2: 16, V3: 2.5)
// The selection bias of auxiliary-loss-free balancing never enters here: gates read the unbiased
// scores, so the bias changes which experts run but never how much they count.
//
// Shapes: T = tokens, E = experts, k = selected experts per token.
#pragma once

#include <string_view>

#include "reference/observer.h"
#include "reference/types.h"

namespace moelab {

enum class GateKind { selected_scores, softmax_of_selected_logits, sigmoid_of_selected_logits, ones };
std::string_view gate_kind_name(GateKind kind);
GateKind parse_gate_kind(std::string_view name);  // throws Error naming "gate"

struct GatingConfig {
  GateKind kind = GateKind::selected_scores;
  bool renormalize = false;
  double renorm_eps = 0.0;             // added to the sum before dividing
  double routed_scaling_factor = 1.0;  // applied after renormalisation
  void validate() const;               // throws Error naming the field
};

// gates: (T, k) out. logits, scores: (T, E). ids: (T, k) in [0, E).
// Emits events::gates with values (T, k) and stats min, max, sum_mean (mean over tokens of the
// sum of a token's gates: 1 where they are renormalised, times the scaling factor).
template <typename Scalar>
void gating_forward(MatrixT<Scalar>& gates, const MatrixT<Scalar>& logits, const MatrixT<Scalar>& scores,
                    const IndexMatrix& ids, const GatingConfig& config, Observer* observer = nullptr);

// Accumulates (+=) into dlogits and dscores, both (T, E) and resized to zero if empty; which one
// receives the gradient depends on the kind (selected_scores: dscores; the *_of_selected_logits
// kinds: dlogits; ones: neither). The caller chains dscores through the scoring backward.
//   dg -> dr:  dr_j = c * (dg_j - sum_i dg_i r_i / (S + eps)) / (S + eps), S = sum_i r_i   (renormalised)
//              dr_j = c * dg_j                                                          (otherwise)
template <typename Scalar>
void gating_backward(MatrixT<Scalar>& dlogits, MatrixT<Scalar>& dscores, const MatrixT<Scalar>& dgates,
                     const MatrixT<Scalar>& logits, const MatrixT<Scalar>& scores, const IndexMatrix& ids,
                     const GatingConfig& config);

}  // namespace moelab
