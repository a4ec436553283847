// moelab/reference/scoring.h — the scoring stage: router logits -> expert scores.
//
// Contract: plain C++ and Eigen on the CPU, written to be read; fast versions live in cuda/ and
// are checked against these. Forward and backward sit side by side; outputs first, then inputs.
// Templated on Scalar (float for the model, double for finite-difference checks and golden
// values), instantiated for both in scoring.cpp.
//
// Shapes: T = tokens, E = experts. T = 0 is valid (an empty batch); E must be at least 1.
#pragma once

#include "reference/observer.h"
#include "reference/types.h"

namespace moelab {

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

}  // namespace moelab
