// moelab/reference/balancing.h — auxiliary-loss-free load balancing (DeepSeek-V3).
//
// Contract: plain C++ and Eigen on the CPU, written to be read. Templated on Scalar (float for the
// model, double for golden values), instantiated for both in balancing.cpp.
//
// Shapes: E = experts.
//
// Every expert has a bias b_i that is added to its score for *selection only* (top-k of
// s_{i,t} + b_i, DeepSeek-V3 eq. 16); the gate values are still computed from the unbiased scores.
// After each training step the bias moves against the step's load (DeepSeek-V3 sec. 2.1.2; Wang et
// al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", Algorithm 1):
//
//   b_i <- b_i + gamma * sign(mean_load - load_i),   sign(0) = 0
//
// where load_i is the number of tokens the step sent to expert i. An overloaded expert becomes
// less attractive, an underloaded one more. The bias is not a parameter of the loss: it never
// receives a gradient, so there is no backward; update() is the whole of its "training".
#pragma once

#include "reference/observer.h"
#include "reference/types.h"

#include <cstdint>
#include <span>

namespace moelab {

template <typename Scalar>
struct BiasBalancerT {
  VectorT<Scalar> bias;  // (E) b_i, usually starting at 0; added to the scores for selection only
  double gamma = 0.001;  // bias update speed (DeepSeek-V3: 0.001, then 0 for the last 500B tokens)

  // One step: bias_i += gamma * sign(mean(load) - load_i). The sign is decided in integers
  // (sum(load) - E * load_i), so equal loads leave the bias bitwise unchanged and a mean that is
  // not representable (1/3) cannot tip it.
  //   load: (E) in, tokens sent to each expert this step (>= 0)
  // Throws Error naming the field if load.size() != E, E = 0, a load is negative, gamma is
  // negative or not finite, or a bias value is not finite.
  // Emits events::bias: values (E, 1) = the bias after the update; stats max_abs_bias (after),
  // load_imbalance = max load / mean load before the update (NaN when every load is 0), max_load,
  // mean_load.
  void update(std::span<const std::int64_t> load, Observer* observer = nullptr);
};

using BiasBalancer = BiasBalancerT<float>;
using BiasBalancerD = BiasBalancerT<double>;

}  // namespace moelab
