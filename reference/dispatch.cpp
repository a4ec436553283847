// moelab/reference/dispatch.cpp — see dispatch.h. T = tokens, C = hidden size, E = experts,
// k = experts per token, N = kept pairs.
#include "reference/dispatch.h"

#include "reference/error.h"
#include "reference/selection.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstddef>
#include <limits>
#include <numeric>
#include <string>

namespace moelab {
namespace {

std::string shape_of(Index rows, Index cols) { return fmt::format("({}, {})", rows, cols); }

void require_ids(const IndexMatrix& ids, Index num_experts) {
  for (Index t = 0; t < ids.rows(); ++t) {
    for (Index j = 0; j < ids.cols(); ++j) {
      if (ids(t, j) < 0 || ids(t, j) >= num_experts) {
        fail(fmt::format("ids[{},{}]", t, j), ids(t, j),
             fmt::format("must be in [0, num_experts = {})", num_experts));
      }
    }
  }
}

void require_keep(const IndexMatrix& keep, const IndexMatrix& ids) {
  if (keep.size() == 0) return;  // every pair kept
  if (keep.rows() != ids.rows() || keep.cols() != ids.cols()) {
    fail("keep shape", shape_of(keep.rows(), keep.cols()),
         fmt::format("must equal the ids shape {}, or be empty (every pair kept)",
                     shape_of(ids.rows(), ids.cols())));
  }
  for (Index t = 0; t < keep.rows(); ++t) {
    for (Index j = 0; j < keep.cols(); ++j) {
      if (keep(t, j) != 0 && keep(t, j) != 1) {
        fail(fmt::format("keep[{},{}]", t, j), keep(t, j), "must be 0 (dropped) or 1 (kept)");
      }
    }
  }
}

// A plan built by hand (or damaged) must not make the permutations read out of bounds: every row
// r names a pair (t, j) in range whose pair_row is r, and the other pairs are -1.
void require_plan(const Dispatch& plan) {
  const Index E = plan.num_experts;
  require(E >= 1, "plan.num_experts", E, "must be at least 1 (build the plan with dispatch_plan)");
  require(plan.counts.size() == static_cast<std::size_t>(E), "plan.counts.size()", plan.counts.size(),
          fmt::format("must equal plan.num_experts = {}", E));
  require(plan.offsets.size() == static_cast<std::size_t>(E + 1), "plan.offsets.size()",
          plan.offsets.size(), fmt::format("must equal plan.num_experts + 1 = {}", E + 1));
  const Index N = plan.num_rows();
  require(plan.offsets.front() == 0 && plan.offsets.back() == N, "plan.offsets",
          fmt::format("[{}, ..., {}]", plan.offsets.front(), plan.offsets.back()),
          fmt::format("must run from 0 to the number of rows N = {}", N));
  require(plan.row_slot.size() == plan.row_token.size(), "plan.row_slot.size()", plan.row_slot.size(),
          fmt::format("must equal plan.row_token.size() = {}", N));
  const Index T = plan.pair_row.rows();
  const Index k = plan.pair_row.cols();
  for (Index r = 0; r < N; ++r) {
    const std::int32_t t = plan.row_token[static_cast<std::size_t>(r)];
    const std::int32_t j = plan.row_slot[static_cast<std::size_t>(r)];
    if (t < 0 || t >= T || j < 0 || j >= k || plan.pair_row(t, j) != r) {
      fail(fmt::format("plan row {}", r), fmt::format("(token {}, slot {})", t, j),
           fmt::format("must be a pair of the (T, k) = ({}, {}) plan whose pair_row is {}", T, k, r));
    }
  }
  const auto kept = std::count_if(plan.pair_row.data(), plan.pair_row.data() + plan.pair_row.size(),
                                  [](std::int32_t r) { return r != -1; });
  require(kept == N, "plan.pair_row", fmt::format("{} entries other than -1", kept),
          fmt::format("must have exactly N = {} (one per row; -1 for a dropped pair)", N));
}

}  // namespace

void dispatch_plan(Dispatch& plan, const IndexMatrix& ids, const IndexMatrix& keep, Index num_experts,
                   Observer* observer) {
  require(num_experts >= 1, "num_experts", num_experts, "must be at least 1");
  const Index T = ids.rows();
  const Index k = ids.cols();
  require(T * k <= std::numeric_limits<std::int32_t>::max(), "ids.size()", T * k,
          "must be below 2^31 (rows are numbered in int32)");
  require_ids(ids, num_experts);
  require_keep(keep, ids);
  const bool keep_all = keep.size() == 0;
  const auto kept = [&](Index t, Index j) { return keep_all || keep(t, j) == 1; };
  const auto E = static_cast<std::size_t>(num_experts);

  // 1. histogram
  plan.num_experts = num_experts;
  plan.counts.assign(E, 0);
  for (Index t = 0; t < T; ++t) {
    for (Index j = 0; j < k; ++j) {
      if (kept(t, j)) ++plan.counts[static_cast<std::size_t>(ids(t, j))];
    }
  }
  // 2. exclusive prefix sum
  plan.offsets.assign(E + 1, 0);
  for (std::size_t e = 0; e < E; ++e) plan.offsets[e + 1] = plan.offsets[e] + plan.counts[e];
  // 3. scatter, in pair order
  const auto N = static_cast<std::size_t>(plan.offsets[E]);
  plan.row_token.resize(N);
  plan.row_slot.resize(N);
  plan.pair_row.resize(T, k);
  std::vector<std::int64_t> cursor(plan.offsets.begin(), plan.offsets.end() - 1);  // (E) next free row
  for (Index t = 0; t < T; ++t) {
    for (Index j = 0; j < k; ++j) {
      if (!kept(t, j)) {
        plan.pair_row(t, j) = -1;
        continue;
      }
      const auto r = static_cast<std::size_t>(cursor[static_cast<std::size_t>(ids(t, j))]++);
      plan.row_token[r] = static_cast<std::int32_t>(t);
      plan.row_slot[r] = static_cast<std::int32_t>(j);
      plan.pair_row(t, j) = static_cast<std::int32_t>(r);
    }
  }

  emit(observer, [&](Observer& o) { report_load(o, events::dispatched, plan.counts); });
}

template <typename Scalar>
void permute_forward(MatrixT<Scalar>& permuted, const MatrixT<Scalar>& x, const Dispatch& plan) {
  require_plan(plan);
  const Index T = plan.pair_row.rows();
  const Index N = plan.num_rows();
  require(x.rows() == T, "x.rows()", x.rows(), fmt::format("must equal the plan's number of tokens T = {}", T));
  permuted.resize(N, x.cols());
  for (Index r = 0; r < N; ++r) permuted.row(r) = x.row(plan.row_token[static_cast<std::size_t>(r)]);
}

template <typename Scalar>
void permute_backward(MatrixT<Scalar>& dx, const MatrixT<Scalar>& dpermuted, const Dispatch& plan) {
  require_plan(plan);
  const Index T = plan.pair_row.rows();
  const Index N = plan.num_rows();
  const Index C = dpermuted.cols();
  require(dpermuted.rows() == N, "dpermuted.rows()", dpermuted.rows(),
          fmt::format("must equal the plan's number of rows N = {}", N));
  if (dx.size() == 0) dx.setZero(T, C);
  require(dx.rows() == T && dx.cols() == C, "dx shape", shape_of(dx.rows(), dx.cols()),
          fmt::format("must be (T, C) = {}", shape_of(T, C)));
  for (Index r = 0; r < N; ++r) dx.row(plan.row_token[static_cast<std::size_t>(r)]) += dpermuted.row(r);
}

template <typename Scalar>
void unpermute_forward(MatrixT<Scalar>& per_pair, const MatrixT<Scalar>& expert_out, const Dispatch& plan) {
  require_plan(plan);
  const Index T = plan.pair_row.rows();
  const Index k = plan.pair_row.cols();
  const Index N = plan.num_rows();
  require(expert_out.rows() == N, "expert_out.rows()", expert_out.rows(),
          fmt::format("must equal the plan's number of rows N = {}", N));
  per_pair.resize(T * k, expert_out.cols());
  for (Index t = 0; t < T; ++t) {
    for (Index j = 0; j < k; ++j) {
      const std::int32_t r = plan.pair_row(t, j);
      if (r >= 0) {
        per_pair.row(t * k + j) = expert_out.row(r);
      } else {
        per_pair.row(t * k + j).setZero();  // a dropped pair contributes nothing
      }
    }
  }
}

template <typename Scalar>
void unpermute_backward(MatrixT<Scalar>& dexpert_out, const MatrixT<Scalar>& dper_pair, const Dispatch& plan) {
  require_plan(plan);
  const Index T = plan.pair_row.rows();
  const Index k = plan.pair_row.cols();
  const Index N = plan.num_rows();
  const Index C = dper_pair.cols();
  require(dper_pair.rows() == T * k, "dper_pair.rows()", dper_pair.rows(),
          fmt::format("must equal T * k = {} * {} = {}", T, k, T * k));
  if (dexpert_out.size() == 0) dexpert_out.setZero(N, C);
  require(dexpert_out.rows() == N && dexpert_out.cols() == C, "dexpert_out shape",
          shape_of(dexpert_out.rows(), dexpert_out.cols()), fmt::format("must be (N, C) = {}", shape_of(N, C)));
  for (Index r = 0; r < N; ++r) {
    const Index t = plan.row_token[static_cast<std::size_t>(r)];
    const Index j = plan.row_slot[static_cast<std::size_t>(r)];
    dexpert_out.row(r) += dper_pair.row(t * k + j);
  }
}

template void permute_forward<float>(Matrix&, const Matrix&, const Dispatch&);
template void permute_forward<double>(MatrixD&, const MatrixD&, const Dispatch&);
template void permute_backward<float>(Matrix&, const Matrix&, const Dispatch&);
template void permute_backward<double>(MatrixD&, const MatrixD&, const Dispatch&);
template void unpermute_forward<float>(Matrix&, const Matrix&, const Dispatch&);
template void unpermute_forward<double>(MatrixD&, const MatrixD&, const Dispatch&);
template void unpermute_backward<float>(Matrix&, const Matrix&, const Dispatch&);
template void unpermute_backward<double>(MatrixD&, const MatrixD&, const Dispatch&);

}  // namespace moelab
