// moelab/reference/fault_hook.h — the one fault-injection path of moelab: a hook that the MoE layer
// hands its intermediates to, so that the silent-data-corruption lab (sdc.h) can change one value.
//
// Like the Observer (observer.h) it is optional, null by default, and costs one predictable branch
// per site when absent. Unlike the Observer it may *change* the values: each site is handed over
// just after it is computed and before anything reads it, so a change there is what the rest of the
// model sees, as a corrupted register or buffer would be.
//
//   site                handed over by                                   values
//   router_input        route_forward: the router's own copy of x        (T, C)    row t = token t
//                       (the experts read x itself)
//   router_logits       route_forward: after the router, before scoring  (T, E)
//   gate_values         route_forward: after gating (token choice)       (T, k)
//   expert_activations  moe_layer_forward: expert e's h, after its       (n_e, H)  rows: e's pairs
//                       activation; the down projection is redone from the hook's h
//   expert_outputs      moe_layer_forward: before combine                (N, C)    rows: all pairs, expert-major
//   combine_output      moe_layer_forward: the layer's output y          (T, C)
// router_weights and expert_weights are parameters, not intermediates: a fault there is a change of
// the parameters themselves (sdc.h), and no hook is involved. The router_logits event of the
// Observer is emitted before the hook sees the logits (the router computed them correctly).
//
// model_forward passes its hook to the MoE layer of every block whose index acts_on() accepts.
// Fault injection runs on the float32 model; the double instantiations (checks, golden values)
// refuse a hook rather than ignore it.
#pragma once

#include <cstdint>
#include <span>
#include <type_traits>

#include "reference/error.h"
#include "reference/types.h"

namespace moelab {

enum class FaultSite {
  router_input,
  router_weights,
  router_logits,
  gate_values,
  expert_weights,
  expert_activations,
  expert_outputs,
  combine_output,
};

// Where the values handed to a hook sit: the site, and for rows that are token-expert pairs (the
// permuted rows of dispatch.h) the token and slot of each row.
struct FaultTarget {
  FaultSite site = FaultSite::router_logits;
  int expert = -1;                              // expert_activations: whose rows
  std::span<const std::int32_t> row_token{};    // (rows) token of each row; empty: row r is token r
  std::span<const std::int32_t> row_slot{};     // (rows) slot of each row among its token's experts
};

class FaultHook {
 public:
  virtual ~FaultHook() = default;
  // Whether the hook acts in block `layer` (asked once per block by model_forward).
  virtual bool acts_on(Index layer) const = 0;
  // `values`: row-major (rows, cols), as in the table above. Returns true if it changed any value.
  virtual bool on_values(const FaultTarget& where, Map values) = 0;
};

// Hands `values` to `hook` if there is one; true if the hook changed them.
template <typename Scalar>
bool apply_fault_hook(FaultHook* hook, const FaultTarget& where, MatrixT<Scalar>& values) {
  if (hook == nullptr) [[likely]] return false;
  if constexpr (std::is_same_v<Scalar, float>) {
    return hook->on_values(where, Map(values.data(), values.rows(), values.cols()));
  } else {
    fail("faults", "(a hook)", "fault injection runs on the float32 model; the double instantiation takes none");
  }
}

}  // namespace moelab
