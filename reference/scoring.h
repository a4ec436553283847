// moelab/reference/scoring.h — the scoring stage: router logits -> expert scores.
//
// Contract: plain C++ and Eigen on the CPU, written to be read; fast versions live in cuda/ and
// are checked against these. Forward and backward sit side by side; outputs first, then inputs.
// Templated on Scalar (float for the model, double for finite-difference checks and golden
// values), instantiated for both in scoring.cpp.
//
// Shapes: T = tokens, E = experts. T = 0 is valid (an empty batch); E must be at least 1.
#pragma once

#include <string_view>

#include "reference/observer.h"
#include "reference/types.h"

namespace moelab {

// How router logits become expert scores.
enum class Scoring {
  softmax,        // Switch, GShard, Mixtral, Qwen, OLMoE, DeepSeek-V2
  sigmoid,        // DeepSeek-V3, Llama 4
  sqrt_softplus,  // DeepSeek-V4
};
std::string_view scoring_name(Scoring s);
Scoring parse_scoring(std::string_view name);  // throws Error naming "scoring"

// probs_te = exp(l_te - max_e l_t) / sum_e exp(l_te - max_e l_t)   (row-wise softmax; subtracting
// the row max changes nothing mathematically and keeps exp() <= 1, so it cannot overflow)
//   probs:  (T, E) out, resized
//   logits: (T, E) in; must be finite (throws Error naming the element otherwise)
// Emits events::scores: values (T, E), stats min, max, max_prob_mean (mean over tokens of the
// largest prob), entropy_mean (mean over tokens of -sum_e p log p, in nats). For T = 0 the
// stats are NaN (a mean of nothing).
template <typename Scalar>
void softmax_forward(MatrixT<Scalar>& probs, const MatrixT<Scalar>& logits,
                     Observer* observer = nullptr);

// dlogits_te = p_te * (dp_te - sum_j dp_tj p_tj)   (the softmax Jacobian diag(p) - p p^T applied
// to dprobs; it is symmetric, so no transpose)
//   dlogits: (T, E) out, resized
//   probs:   (T, E) in, from softmax_forward
//   dprobs:  (T, E) in, the gradient of the loss with respect to probs
template <typename Scalar>
void softmax_backward(MatrixT<Scalar>& dlogits, const MatrixT<Scalar>& probs,
                      const MatrixT<Scalar>& dprobs);

// scores_te = sigmoid(l_te) = 1 / (1 + exp(-l_te))   (elementwise; DeepSeek-V3 eq. 15)
// Emits events::scores with stats min, max, mean.
template <typename Scalar>
void sigmoid_forward(MatrixT<Scalar>& scores, const MatrixT<Scalar>& logits, Observer* observer = nullptr);
// dlogits = dscores * s * (1 - s)
template <typename Scalar>
void sigmoid_backward(MatrixT<Scalar>& dlogits, const MatrixT<Scalar>& scores, const MatrixT<Scalar>& dscores);

// scores_te = sqrt(softplus(l_te)) = sqrt(log(1 + exp(l_te)))   (elementwise; DeepSeek-V4's router)
// Emits events::scores with stats min, max, mean.
template <typename Scalar>
void sqrt_softplus_forward(MatrixT<Scalar>& scores, const MatrixT<Scalar>& logits, Observer* observer = nullptr);
// dlogits = dscores * sigmoid(l) / (2 sqrt(softplus(l)))   (-> dscores * exp(l/2) / 2 as l -> -inf)
template <typename Scalar>
void sqrt_softplus_backward(MatrixT<Scalar>& dlogits, const MatrixT<Scalar>& logits, const MatrixT<Scalar>& dscores);

// Dispatch on the scoring function. The backward takes both the logits and the scores, since
// softmax and sigmoid differentiate through their output and sqrt_softplus through its input.
template <typename Scalar>
void score_forward(MatrixT<Scalar>& scores, const MatrixT<Scalar>& logits, Scoring scoring,
                   Observer* observer = nullptr);
template <typename Scalar>
void score_backward(MatrixT<Scalar>& dlogits, const MatrixT<Scalar>& logits, const MatrixT<Scalar>& scores,
                    const MatrixT<Scalar>& dscores, Scoring scoring);

}  // namespace moelab
