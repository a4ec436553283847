// moelab/reference/dispatch.h — the dispatch stage: token-expert pairs into expert-major order.
//
// Contract: plain C++ and Eigen on the CPU, written to be read; fast versions live in cuda/ and
// are checked against these. Outputs first, then inputs. Templated on Scalar where activations
// come in, instantiated for float and double in dispatch.cpp.
//
// Shapes: T = tokens, C = hidden size, E = experts, k = experts per token, N = kept pairs.
// A pair is (token t, slot j), sent to expert ids(t, j). T = 0 and experts with no pair are valid.
//
// Experts run on contiguous blocks of rows, so the kept pairs are permuted into expert-major
// order by a counting sort, the algorithm the CUDA version uses, written plainly:
//   1. histogram      counts[e]  = kept pairs with ids(t, j) == e
//   2. prefix sum     offsets[e] = counts[0] + ... + counts[e - 1]   (exclusive; offsets[E] = N)
//   3. scatter        each kept pair, in pair order (t, then j), takes the next row of its expert:
//                     r = cursor[e]++, cursor starting at offsets
// Within an expert, rows are therefore in pair order: deterministic and stable. (On a GPU the
// cursor becomes an atomic, whose order within an expert is arbitrary, or a scan per expert,
// which is stable; the reference fixes the stable order.)
//
// permute gathers token rows into that order, unpermute brings expert outputs back to the pairs.
// Both are linear and each backward is the transpose of its forward: the gather's is a
// scatter-add (a token sent to several experts collects several gradients), the un-permutation's
// a gather.
#pragma once

#include "reference/observer.h"
#include "reference/types.h"

#include <cstdint>
#include <vector>

namespace moelab {

struct Dispatch {
  Index num_experts = 0;
  std::vector<std::int64_t> counts;     // (E) kept pairs per expert
  std::vector<std::int64_t> offsets;    // (E+1) exclusive prefix sum: expert e's rows are
                                        //       [offsets[e], offsets[e+1]); offsets[E] = N
  std::vector<std::int32_t> row_token;  // (N) token of permuted row r
  std::vector<std::int32_t> row_slot;   // (N) slot j of permuted row r
  IndexMatrix pair_row;                 // (T, k) permuted row of pair (t, j), or -1 if dropped

  Index num_rows() const { return static_cast<Index>(row_token.size()); }  // N
};

// Builds the permutation.
//   plan:        out (every field replaced)
//   ids:         (T, k) in, expert ids in [0, num_experts)
//   keep:        (T, k) in, 0 (dropped) or 1 (kept), from capacity_forward; or empty (0 x 0) =
//                every pair kept
//   num_experts: E >= 1
// T * k must be below 2^31 (rows are numbered in int32).
// Emits events::expert_load, (E, 1) kept pairs per expert (counts) as f64 values, with the stats
//   max_over_mean  max_e counts[e] / mean_e counts[e] (1 = perfectly balanced; NaN when N = 0)
//   empty_experts  the number of experts with no kept pair.
// selection emits expert_load before capacity (pairs chosen); this one is after (pairs processed).
void dispatch_plan(Dispatch& plan, const IndexMatrix& ids, const IndexMatrix& keep, Index num_experts,
                   Observer* observer = nullptr);

// Gather: permuted.row(r) = x.row(row_token[r]).
//   permuted: (N, C) out, resized
//   x:        (T, C) in
template <typename Scalar>
void permute_forward(MatrixT<Scalar>& permuted, const MatrixT<Scalar>& x, const Dispatch& plan);

// The gather's transpose, a scatter-add: dx.row(row_token[r]) += dpermuted.row(r) for every r.
//   dx:         (T, C) accumulated (+=); resized and zeroed if empty
//   dpermuted:  (N, C) in
template <typename Scalar>
void permute_backward(MatrixT<Scalar>& dx, const MatrixT<Scalar>& dpermuted, const Dispatch& plan);

// The inverse permutation: per_pair, (T, k, C) flattened to (T*k, C), has
//   per_pair.row(t*k + j) = expert_out.row(pair_row(t, j)), or zeros if pair (t, j) was dropped.
//   per_pair:   (T*k, C) out, resized
//   expert_out: (N, C) in, the experts' outputs in permuted order
template <typename Scalar>
void unpermute_forward(MatrixT<Scalar>& per_pair, const MatrixT<Scalar>& expert_out, const Dispatch& plan);

// Its transpose, a gather: dexpert_out.row(r) += dper_pair.row(row_token[r]*k + row_slot[r]).
// Dropped pairs' gradients go nowhere.
//   dexpert_out: (N, C) accumulated (+=); resized and zeroed if empty
//   dper_pair:   (T*k, C) in
template <typename Scalar>
void unpermute_backward(MatrixT<Scalar>& dexpert_out, const MatrixT<Scalar>& dper_pair, const Dispatch& plan);

}  // namespace moelab
