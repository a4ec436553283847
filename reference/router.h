// moelab/reference/router.h — the router stage: token activations -> router logits.
//
// Contract: plain C++ and Eigen on the CPU, written to be read; fast versions live in cuda/ and
// are checked against these. Forward and backward sit side by side; outputs first, then inputs.
// Templated on Scalar (float for the model, double for finite-difference checks and golden
// values), instantiated for both in router.cpp.
//
// Shapes: T = tokens, C = hidden size (channels), E = experts. T = 0 is valid (an empty batch).
//
//   logits = x W^T (+ b)                                  the linear router (gpt-oss adds b)
//   noisy top-k:  + N(0,1) * softplus(x W_noise^T)        Shazeer et al. 2017, eq. 4
//   jitter:       x <- x * U(1 - eps, 1 + eps) first      Switch Transformer (Fedus et al. 2021)
//
// Precision (config.dtype), where a bf16 model rounds:
//   fp32       no emulated rounding: everything is in Scalar (float, or double for checks).
//   bf16/fp16  x (after jitter), W, b and W_noise are rounded to the format; the products are
//              accumulated in Scalar (as tensor cores accumulate in fp32); the logits (after bias
//              and noise) are rounded to the format. The noise samples and softplus stay in Scalar.
//   fp8        rejected: routers keep a wider format (DeepSeek-V3's fp8 training keeps its MoE
//              gating modules in bf16/fp32).
// The backward treats every rounding as the identity (the straight-through estimator, as mixed-
// precision training does): the gradients use the rounded values the forward multiplied.
#pragma once

#include "reference/numerics.h"
#include "reference/observer.h"
#include "reference/random.h"
#include "reference/types.h"

#include <string_view>

namespace moelab {

enum class RouterNoise {
  none,        // evaluation, and most modern routers
  noisy_topk,  // Shazeer et al. 2017: H = x W_g + N(0,1) * softplus(x W_noise)
  jitter,      // Switch Transformer: multiplicative input jitter x * U(1 - eps, 1 + eps)
};
std::string_view router_noise_name(RouterNoise noise);  // "none", "noisy_topk", "jitter"
RouterNoise parse_router_noise(std::string_view name);  // throws Error naming "noise"

struct RouterConfig {
  Index hidden_size = 0;        // C
  Index num_experts = 0;        // E
  bool use_bias = false;        // gpt-oss: logits = x W^T + b
  Format dtype = Format::fp32;  // fp32, bf16 or fp16 (see the top of this file)
  RouterNoise noise = RouterNoise::none;  // training only: callers pass none at evaluation
  double jitter_eps = 1e-2;     // Switch Transformer: x * U(1 - eps, 1 + eps), elementwise
  bool allow_nonfinite = false; // the numerics lab may ask to propagate NaN/Inf instead of throwing
  // Throws Error naming field, value and rule: hidden_size <= 0, num_experts <= 0, jitter_eps
  // not in [0, 1) (checked whatever the noise), dtype fp8.
  void validate() const;
};

template <typename Scalar>
struct RouterParamsT {
  MatrixT<Scalar> weight;        // (E, C): nn.Linear(C, E).weight, "gate.weight" in HF checkpoints
  VectorT<Scalar> bias;          // (E) when use_bias, else empty (a bias without use_bias is an error)
  MatrixT<Scalar> noise_weight;  // (E, C) W_noise when noise == noisy_topk; otherwise ignored, so a
                                 // noisy-top-k model can be evaluated with noise = none
};

template <typename Scalar>
struct RouterCacheT {  // what the backward needs from the forward; empty members are unused
  MatrixT<Scalar> input;         // (T, C) the x actually multiplied: after jitter and rounding
  MatrixT<Scalar> jitter;        // (T, C) the multipliers, when noise == jitter
  MatrixT<Scalar> noise;         // (T, E) the N(0,1) samples, when noise == noisy_topk
  MatrixT<Scalar> noise_logits;  // (T, E) x W_noise^T before softplus, when noise == noisy_topk
};

using RouterParams = RouterParamsT<float>;
using RouterCache = RouterCacheT<float>;

// logits = x W^T (+ b) (+ N(0,1) * softplus(x W_noise^T)), x jittered first (see the top).
//   logits: (T, E) out, resized
//   cache:  out, overwritten (members not used by config.noise are emptied)
//   x:      (T, C) in; must be finite unless config.allow_nonfinite
//   rng:    required when config.noise != none (else Error naming "rng"); draws in row-major
//           order: T*C uniform() for jitter, T*E normal() for noisy top-k. Unused (may be null)
//           when noise == none.
// Non-finite values in x, or in the logits (e.g. an fp16 logit above 65504), are reported first
// as an events::numerics event (stats nonfinite_count, nan_count, inf_count, and in_logits: 0 for
// the input x, 1 for the logits), then throw Error naming the first element, unless
// config.allow_nonfinite, in which case they propagate.
// Emits events::router_logits once the logits are computed: values (T, E) and stats min, max,
// mean, std (population std; all four over the finite logits, NaN if there are none),
// nonfinite_count, and naive_softmax_overflow_count (logits above
// format_info(dtype).max_exp_input: those whose exp overflows dtype in a naive softmax).
template <typename Scalar>
void router_forward(MatrixT<Scalar>& logits, RouterCacheT<Scalar>& cache, const MatrixT<Scalar>& x,
                    const RouterParamsT<Scalar>& params, const RouterConfig& config, Rng* rng,
                    Observer* observer = nullptr);

// With G = dlogits, x_r = cache.input, W_r = W rounded to dtype (rounding is straight-through):
//   dparams.weight       = G^T x_r                                   (E, C)
//   dparams.bias         = sum_t G_t                                 (E) when use_bias, else empty
//   noisy top-k: dZ      = G * noise * sigmoid(noise_logits)         (d softplus(z)/dz = sigmoid(z))
//   dparams.noise_weight = dZ^T x_r                                  (E, C); zeros shaped like
//                                                                    params.noise_weight otherwise
//   dx = (G W_r + dZ W_noise_r) * jitter                             (T, C); no jitter factor
//                                                                    without jitter
//   dx:       (T, C) out, resized
//   dparams:  out, resized
//   dlogits:  (T, E) in, the gradient of the loss with respect to the logits
//   cache:    in, from the router_forward that made the logits (same config)
//   x, params: in, as given to that router_forward
template <typename Scalar>
void router_backward(MatrixT<Scalar>& dx, RouterParamsT<Scalar>& dparams,
                     const MatrixT<Scalar>& dlogits, const RouterCacheT<Scalar>& cache,
                     const MatrixT<Scalar>& x, const RouterParamsT<Scalar>& params,
                     const RouterConfig& config);

}  // namespace moelab
