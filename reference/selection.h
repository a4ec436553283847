// moelab/reference/selection.h — the selection stage: scores -> the experts each token goes to.
//
// Contract: plain C++ and Eigen on the CPU, written to be read; fast versions live in cuda/ and
// are checked against these. Selection outputs ids only, so it has no gradient and no backward:
// the gradient reaches the router through the gate values (gating.h), never through the choice.
// Outputs first, then inputs. Templated on Scalar where scores come in, instantiated for float
// and double in selection.cpp.
//
// Shapes: T = tokens, E = experts, k = experts per token, C = tokens per expert (expert choice),
//         G = n_group (groups of E / G experts), V = vocabulary size (hash and table routing).
// T = 0 is valid everywhere (an empty batch); E must be at least 1.
//
// Determinism: every ranking breaks ties towards the lower id (expert, group or token), i.e. it
// equals a stable sort by descending score. Real kernels (torch.topk, CUDA radix selects) leave
// ties unspecified; we pin them so that results are reproducible and comparable bit for bit.
//
// Scores must be finite (a NaN has no order; an infinity would tie with the -inf mask of
// group-limited routing): an Error names the first bad element, e.g. "scores[2,5] = nan: ...".
//
// Events: every token-choice function emits events::topk_ids, (T, k) expert ids, then
// events::expert_load, (E, 1) tokens per expert as f64 values with the stats
//   max_over_mean  max_e load_e / mean_e load_e  (1 = perfectly balanced; NaN when T * k = 0)
//   empty_experts  the number of experts that received no token.
// expert_choice_select emits events::expert_choice_ids instead of topk_ids (the ids are tokens,
// and the shape is (E, C), so a reader of topk_ids must never mistake them for expert ids), then
// events::expert_load. Nothing is computed or allocated for events when the observer is null.
#pragma once

#include "reference/observer.h"
#include "reference/types.h"

#include <cstdint>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

namespace moelab {

// ---- token choice ------------------------------------------------------------------------------

// ids(t, :) = the k experts with the largest scores(t, e) + selection_bias(e), best first.
//   ids:            (T, k) out, resized
//   scores:         (T, E) in (softmax or sigmoid scores, or logits)
//   k:              1 <= k <= E
//   selection_bias: (E) in, or null. DeepSeek-V3's auxiliary-loss-free balancing bias (V3
//                   report sec. 2.1.2): it only decides which experts are chosen; gating reads
//                   the unbiased scores, so the bias never changes a gate value. Its type,
//                   std::type_identity_t<VectorT<Scalar>>, is VectorT<Scalar>, but takes no
//                   part in deducing Scalar, so a null bias can be plain nullptr:
//                   topk_select(ids, scores, k, nullptr, &recorder).
template <typename Scalar>
void topk_select(IndexMatrix& ids, const MatrixT<Scalar>& scores, int k,
                 const std::type_identity_t<VectorT<Scalar>>* selection_bias = nullptr,
                 Observer* observer = nullptr);

// How a group is scored before the best groups are kept.
enum class GroupScore {
  top2_sum,  // sum of the group's two largest biased scores (DeepSeek-V3, vLLM, Hugging Face)
  max,       // the group's largest biased score (DeepSeek-V2 group_limited_greedy; device routing)
};
// What the experts of groups that were not kept are replaced by before the final top-k.
enum class GroupMask {
  neg_inf,  // -inf: they can never be chosen (DeepSeek-V3 reference code, vLLM)
  zero,     // 0.0: Hugging Face's DeepseekV3 masked_fill(..., 0.0). Equal to neg_inf while the
            // chosen groups' biased scores are > 0; a negative bias can make them < 0, and then a
            // masked expert (0.0) is picked from a group that was not kept (test_selection.cpp).
};
std::string_view group_score_name(GroupScore score);  // "top2_sum", "max"
GroupScore parse_group_score(std::string_view name);  // throws Error naming "group.score"
std::string_view group_mask_name(GroupMask mask);     // "neg_inf", "zero"
GroupMask parse_group_mask(std::string_view name);    // throws Error naming "group.mask"

struct GroupLimit {
  int n_group = 1;     // G: experts split into G contiguous groups of E / G; must divide E
  int topk_group = 1;  // groups kept per token, 1 <= topk_group <= G
  GroupScore score = GroupScore::top2_sum;
  GroupMask mask = GroupMask::neg_inf;
};

// Group-limited top-k (DeepSeek-V3 report sec. 2.1.2, node-limited routing: a group is a node,
// scored by the sum of its top K_r / M = 8 / 4 = 2 scores; DeepSeek-V2's group_limited_greedy
// scores by the max): per token, score each group on the biased scores, keep the topk_group
// best groups (ties: lower group id), mask the experts of the others, then top-k over the masked
// biased scores exactly as topk_select.
//   ids: (T, k) out, resized; scores: (T, E) in; selection_bias: (E) in, or null.
// Rules: k <= topk_group * (E / G) (enough experts in the kept groups); E / G >= 2 for top2_sum.
template <typename Scalar>
void group_limited_select(IndexMatrix& ids, const MatrixT<Scalar>& scores, int k,
                          const GroupLimit& limit,
                          const std::type_identity_t<VectorT<Scalar>>* selection_bias = nullptr,
                          Observer* observer = nullptr);

// DeepSeek-V2 device-limited routing (V2 paper, "Device-Limited Routing"): the E experts live
// on num_devices (D) devices, E / D contiguous experts each; per token, keep the topk_devices (M)
// devices that hold the highest-scoring experts (device score = max), then top-k among their
// experts. It is group_limited_select with groups = devices, GroupScore::max and the -inf mask,
// and calls it (device names are checked first, so that error messages speak of devices).
//   ids: (T, k) out, resized; scores: (T, E) in.
template <typename Scalar>
void device_limited_select(IndexMatrix& ids, const MatrixT<Scalar>& scores, int k,
                           int num_devices, int topk_devices, Observer* observer = nullptr);

// ---- expert choice -----------------------------------------------------------------------------

// Tokens per expert for expert choice (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice
// Routing": k = n * c / e):
//   C = ceil(T * capacity_factor / E), clamped to [0, T].
// ceil, not floor: E * C >= T * capacity_factor, so the experts together have at least the slots
// the factor asks for, and any T > 0 gives every expert at least one token. The quotient is
// computed in double, and decimal factors are not exact in binary (1.1 is 1.1000000000000000888),
// so a quotient within a relative 4 * DBL_EPSILON of an integer (three roundings of eps / 2 each
// fit) is taken as that integer: T = 100, E = 10, factor 1.1 gives C = 11, not the 12 that a
// bare ceil(11.000000000000002) would give.
// Rules: tokens >= 0, num_experts >= 1, capacity_factor finite and > 0.
Index expert_choice_capacity(Index tokens, Index num_experts, double capacity_factor);

// token_ids(e, :) = the C tokens with the largest scores(:, e), best first (ties: lower token id).
// Every expert takes exactly C tokens; a token may be taken by several experts or by none.
//   token_ids: (E, C) out, resized
//   scores:    (T, E) in (Zhou et al. use softmax over experts, then top-C per expert)
//   capacity:  C, 0 <= C <= T (expert_choice_capacity)
template <typename Scalar>
void expert_choice_select(IndexMatrix& token_ids, const MatrixT<Scalar>& scores, Index capacity,
                          Observer* observer = nullptr);

// ---- routing by token id -----------------------------------------------------------------------

// Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models"), k = 1:
//   ids(t, 0) = hash64(token_ids[t] ^ seed) mod E    (hash64 = SplitMix64's mixer, random.h)
//   ids:       (T, 1) out, resized
//   token_ids: (T) in, each >= 0
// The mod's bias is (2^64 mod E) / 2^64 < E * 2^-64: invisible.
void hash_select(IndexMatrix& ids, std::span<const std::int32_t> token_ids, int num_experts,
                 std::uint64_t seed, Observer* observer = nullptr);

// Routing by a fixed table, as DeepSeek-V4's tid2eid (token id -> expert ids):
//   ids(t, :) = table(token_ids[t], :)
//   ids:       (T, k) out, resized
//   token_ids: (T) in, each in [0, V)
//   table:     (V, k) in, k >= 1; entries in [0, E) and distinct within a row (as top-k's are)
void table_select(IndexMatrix& ids, std::span<const std::int32_t> token_ids,
                  const IndexMatrix& table, int num_experts, Observer* observer = nullptr);

// A balanced random table for table_select: (V, k), each row k distinct experts. The rows are
// filled from a stream of seeded random permutations of [0, E), so every expert appears
// floor(V * k / E) or ceil(V * k / E) times (all of them once V * k >= E). Where a row straddles
// two permutations, the head of the next one is reordered to avoid the experts the row already
// has, which keeps each permutation whole and so keeps the balance.
// Rules: vocab_size >= 0, num_experts >= 1, 1 <= k <= num_experts.
IndexMatrix make_hash_table(Index vocab_size, int num_experts, int k, std::uint64_t seed);

// ---- load --------------------------------------------------------------------------------------

// load[e] = the number of (t, j) with ids(t, j) == e; sums to T * k.
//   ids: (T, k) in, entries in [0, num_experts) (throws Error naming the element otherwise)
std::vector<std::int64_t> expert_load(const IndexMatrix& ids, int num_experts);

// Delivers an (E, 1) load event named `name` (events::expert_load, events::dispatched) with stats
// max_over_mean (NaN for no tokens) and empty_experts.
void report_load(Observer& o, std::string_view name, const std::vector<std::int64_t>& load);

}  // namespace moelab
