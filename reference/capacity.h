// moelab/reference/capacity.h — the capacity stage: which token-expert pairs an expert has room for.
//
// Contract: plain C++ on the CPU, written to be read; fast versions live in cuda/ and are checked
// against these. Outputs first, then inputs. Templated on Scalar where gates come in, instantiated
// for float and double in capacity.cpp.
//
// Shapes: T = tokens, E = experts, k = experts per token (token choice: ids and gates are (T, k)).
// A pair is (token t, slot j), sent to expert ids(t, j).
//
// Each expert processes at most `capacity` pairs (Switch Transformer eq. 3; GShard Algorithm 1):
//   capacity = round(capacity_factor * T * k / E)
// and the pairs beyond it are dropped. Dropless layers (MegaBlocks, Mixtral, DeepSeek, ...) have no
// capacity: every pair is kept. Codes differ in where k enters: Megatron-Core passes T * k as its
// num_tokens and DeepSpeed's top-2 passes 2 * capacity_factor (both this formula); Mesh
// TensorFlow's top-2 leaves k out, so its factor is twice the capacity_factor here.
//
// No backward: this stage only decides a mask. A dropped pair contributes nothing to the layer's
// output (the layer skips it, so its expert sees no input and its gate no gradient); a token all of
// whose pairs are dropped passes only through the residual and the shared experts. Zeroing the
// gradient of dropped pairs is the layer's job, not this stage's: the mask is piecewise constant
// in the gates (gate_priority), so no gradient flows through it.
//
// Expert choice routing (selection.h) has its capacity built in; this stage is for token choice.
#pragma once

#include "reference/observer.h"
#include "reference/types.h"

#include <cstdint>
#include <string_view>
#include <vector>

namespace moelab {

// How capacity_factor * T * k / E becomes a whole number of slots.
enum class CapacityRounding {
  ceil,       // ceil(...): DeepSpeed's _capacity and Megatron-Core's get_capacity (and the usual
              // reading of the papers' formula). E * capacity >= factor * T * k: at least the
              // slots the factor asks for.
  floor,      // floor(...): named for completeness.
  trunc_int,  // int(...): Mesh TensorFlow's min(S, int((S * capacity_factor) / E)), S = group
              // size. The quotient is >= 0, where truncation is floor: floor and trunc_int give
              // the same capacity for every valid input; two names so that a preset can say
              // which its source writes.
};
std::string_view capacity_rounding_name(CapacityRounding rounding);
CapacityRounding parse_capacity_rounding(std::string_view name);  // throws Error naming "rounding"

// Which pairs an expert keeps when more arrive than it has room for.
enum class DropPolicy {
  arrival_order,  // slot-major: all tokens' first choices in token order, then all second
                  // choices, ... (GShard, Mesh TensorFlow, ST-MoE code: earlier slots first)
  gate_priority,  // Batch Prioritized Routing (Riquelme et al. 2021, V-MoE): tokens ordered by
                  // their largest gate, descending (ties: lower token id), then slot-major
};
std::string_view drop_policy_name(DropPolicy policy);
DropPolicy parse_drop_policy(std::string_view name);  // throws Error naming "drop_policy"

struct CapacityConfig {
  bool dropless = true;          // no capacity: every pair kept (MegaBlocks, Mixtral, DeepSeek, ...)
  double capacity_factor = 1.0;  // capacity = round(capacity_factor * T * k / E)
  CapacityRounding rounding = CapacityRounding::ceil;
  Index min_capacity = 0;        // capacity is at least this (DeepSpeed's min_capacity, 4 in its
                                 // MoE layer; Megatron-Core's min_capacity); 0 = none
  DropPolicy policy = DropPolicy::arrival_order;
  // Throws Error naming the field: capacity_factor finite and > 0, min_capacity >= 0. Checked
  // even when dropless (where they are unused), so a malformed config never passes silently.
  void validate() const;
};

// Rounds a capacity quotient q >= 0 (capacity_factor * T * k / E, computed in double) to a whole
// number, returned as a double. Decimal factors are not exact in binary (1.1 is
// 1.1000000000000000888), so a q within a relative 4 * DBL_EPSILON of a whole number (three
// roundings of eps / 2 each fit) is taken as that number before rounding: factor 1.1, T = 50,
// k = 2, E = 10 gives q = 11.000000000000002 and capacity 11, not the 12 that a bare ceil gives;
// factor 0.7, T = 45, k = 2, E = 7 gives q = 8.999999999999998 and floor 9, not 8.
// This is the rule of selection.cpp's expert_choice_capacity, so both stages agree:
//   expert_choice_capacity(T, E, f) == min(round_capacity(T * f / E, ceil), T).
// Codes that compute the bare float (Mesh TensorFlow's int(...), DeepSpeed's torch.ceil) differ
// from this in those rare cases; what they meant is the whole number.
double round_capacity(double quotient, CapacityRounding rounding);

// The capacity of each expert:
//   capacity = min(max(round_capacity(capacity_factor * (T * k) / E, rounding), min_capacity), T * k)
// T * k is the most pairs one expert can receive, so the clamp never changes which pairs are kept;
// it bounds the buffers and keeps a huge factor from overflowing. config.dropless is ignored: this
// is the formula, and capacity_forward decides whether it applies.
// Rules: tokens >= 0, top_k >= 1, num_experts >= 1, config.validate().
Index expert_capacity(Index tokens, int top_k, Index num_experts, const CapacityConfig& config);

// keep(t, j) = 1 if pair (t, j) is kept, 0 if dropped. Pairs are offered to their experts in the
// policy's order and a pair is kept while its expert has fewer than `capacity` kept pairs (its
// position in the expert's queue is < capacity, DeepSpeed's `locations < capacity`). Dropless keeps
// everything.
//   keep:        (T, k) out, resized; 0 or 1
//   dropped:     (E) out, resized; dropped[e] = pairs of expert e that were dropped
//   ids:         (T, k) in, expert ids in [0, E) (top-k gives distinct ids per token; repeats are
//                allowed and count as separate pairs)
//   gates:       (T, k) in; read only by gate_priority (not dropless), where it must be finite.
//                May be empty (0 x 0) when it is not read.
//   num_experts: E >= 1
// Emits events::dropped, (E, 1) dropped pairs per expert as f64 values, with the stats
//   capacity                  the capacity (+inf when dropless)
//   dropped_pairs             sum_e dropped[e]
//   tokens_dropped_entirely   tokens all of whose k pairs were dropped (k >= 1)
template <typename Scalar>
void capacity_forward(IndexMatrix& keep, std::vector<std::int64_t>& dropped, const IndexMatrix& ids,
                      const MatrixT<Scalar>& gates, Index num_experts, const CapacityConfig& config,
                      Observer* observer = nullptr);

}  // namespace moelab
