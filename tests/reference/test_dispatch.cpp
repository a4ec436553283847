// Tests of reference/dispatch: the counting-sort plan, the permutation and its inverse, their
// backward passes (finite differences and the exact adjoint identity), the expert_load event and
// the error messages.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "reference/capacity.h"
#include "reference/dispatch.h"
#include "reference/recorder.h"
#include "reference/selection.h"
#include "tests/testing.h"

namespace moelab {
namespace {

using moelab::testing::error_of;
using moelab::testing::int_rows;
using moelab::testing::rows_of;
using moelab::testing::max_relative_error;
using moelab::testing::numerical_gradient;
using moelab::testing::random_matrix;

// Shape and values, so that a wrong shape fails the test instead of tripping Eigen's size assert.
template <typename Scalar>
::testing::AssertionResult same(const MatrixT<Scalar>& actual, const MatrixT<Scalar>& expected) {
  if (actual.rows() == expected.rows() && actual.cols() == expected.cols() && actual == expected) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "got (" << actual.rows() << ", " << actual.cols() << ")\n"
                                       << actual << "\nexpected (" << expected.rows() << ", "
                                       << expected.cols() << ")\n" << expected;
}

// Small integers in [-8, 8]: every product and sum below is exact in double, so identities that
// hold in exact arithmetic hold bit for bit.
MatrixD integer_matrix(Rng& rng, Index rows, Index cols) {
  MatrixD m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = std::floor(rng.uniform(-8.0, 9.0));
  return m;
}

// Token t's row of x is [10 t + 1, 10 t + 2], so a permuted row names its token.
MatrixD token_rows(Index T) {
  MatrixD x(T, 2);
  for (Index t = 0; t < T; ++t) x.row(t) << 10.0 * t + 1, 10.0 * t + 2;
  return x;
}

// The worked example of test_capacity.cpp: T = 4, k = 2, E = 3, and the keep mask of arrival
// order at capacity 2 (token 2 and pair (3, 1) dropped).
const IndexMatrix kIds = int_rows({{0, 1}, {0, 2}, {0, 1}, {1, 0}});
const IndexMatrix kKeep = int_rows({{1, 1}, {1, 1}, {0, 0}, {1, 0}});

// Kept pairs by expert, in pair order (t, then j):
//   e0: (0,0) (1,0)    e1: (0,1) (3,0)    e2: (1,1)
// counts [2, 2, 1], offsets [0, 2, 4, 5]. Note (0,1) comes before (3,0) in e1: pair order, not
// the slot-major order in which capacity offered them.
TEST(Dispatch, PlanOfTheWorkedExample) {
  Dispatch plan;
  dispatch_plan(plan, kIds, kKeep, 3);
  EXPECT_EQ(plan.num_experts, 3);
  EXPECT_EQ(plan.counts, (std::vector<std::int64_t>{2, 2, 1}));
  EXPECT_EQ(plan.offsets, (std::vector<std::int64_t>{0, 2, 4, 5}));
  EXPECT_EQ(plan.num_rows(), 5);
  EXPECT_EQ(plan.row_token, (std::vector<std::int32_t>{0, 1, 0, 3, 1}));
  EXPECT_EQ(plan.row_slot, (std::vector<std::int32_t>{0, 0, 1, 0, 1}));
  EXPECT_TRUE(same(plan.pair_row, int_rows({{0, 2}, {1, 4}, {-1, -1}, {3, -1}})));

  // Gather: rows of tokens 0, 1 | 0, 3 | 1.
  MatrixD permuted;
  permute_forward(permuted, token_rows(4), plan);
  MatrixD expected(5, 2);
  expected << 1, 2, 11, 12, 1, 2, 31, 32, 11, 12;
  EXPECT_TRUE(same(permuted, expected));

  // Back to pairs: row t*k + j is token t's row if (t, j) was kept, zeros if dropped.
  MatrixD per_pair;
  unpermute_forward(per_pair, permuted, plan);
  MatrixD pairs(8, 2);
  pairs << 1, 2, 1, 2, 11, 12, 11, 12, 0, 0, 0, 0, 31, 32, 0, 0;
  EXPECT_TRUE(same(per_pair, pairs));
}

// keep empty = every pair kept:
//   e0: (0,0) (1,0) (2,0) (3,1)    e1: (0,1) (2,1) (3,0)    e2: (1,1)
TEST(Dispatch, EmptyKeepKeepsEveryPair) {
  Dispatch plan;
  dispatch_plan(plan, kIds, IndexMatrix(), 3);
  EXPECT_EQ(plan.counts, (std::vector<std::int64_t>{4, 3, 1}));
  EXPECT_EQ(plan.offsets, (std::vector<std::int64_t>{0, 4, 7, 8}));
  EXPECT_EQ(plan.row_token, (std::vector<std::int32_t>{0, 1, 2, 3, 0, 2, 3, 1}));
  EXPECT_EQ(plan.row_slot, (std::vector<std::int32_t>{0, 0, 0, 1, 1, 1, 0, 1}));
  EXPECT_TRUE(same(plan.pair_row, int_rows({{0, 4}, {1, 7}, {2, 5}, {6, 3}})));
  Dispatch all_ones;
  dispatch_plan(all_ones, kIds, IndexMatrix::Ones(4, 2), 3);
  EXPECT_EQ(all_ones.row_token, plan.row_token);
  EXPECT_TRUE(same(all_ones.pair_row, plan.pair_row));
}

// A random routing with capacity dropping, and experts that receive nothing (the odd ones).
struct RandomCase {
  IndexMatrix ids;   // (T, k)
  IndexMatrix keep;  // (T, k)
  Index num_experts;
};
RandomCase random_case(std::uint64_t seed, Index T, int k, bool drop) {
  Rng rng(seed);
  const Index E = 6;
  const MatrixD scores = random_matrix(rng, T, E, 2.0);
  RandomCase c;
  topk_select(c.ids, scores, k);
  c.ids *= 2;  // experts 0, 2, ..., 10 of 12: the odd ones stay empty
  c.num_experts = 2 * E;
  MatrixD gates(T, k);
  for (Index t = 0; t < T; ++t)
    for (Index j = 0; j < k; ++j) gates(t, j) = scores(t, c.ids(t, j) / 2);
  const CapacityConfig config{.dropless = !drop, .capacity_factor = 1.5, .policy = DropPolicy::gate_priority};
  std::vector<std::int64_t> dropped;
  capacity_forward(c.keep, dropped, c.ids, gates, c.num_experts, config);
  return c;
}

TEST(Dispatch, CountsEqualSelectionExpertLoad) {
  Rng rng(23);
  const MatrixD scores = random_matrix(rng, 37, 8, 2.0);
  MemoryRecorder recorder({events::expert_load, events::dispatched});
  IndexMatrix ids;
  topk_select(ids, scores, 2, nullptr, &recorder);
  Dispatch plan;
  dispatch_plan(plan, ids, IndexMatrix(), 8, &recorder);
  EXPECT_EQ(plan.counts, expert_load(ids, 8));
  ASSERT_EQ(recorder.count(events::expert_load), 1u);  // selection's (before capacity)
  ASSERT_EQ(recorder.count(events::dispatched), 1u);   // dispatch's (after capacity)
  EXPECT_EQ(recorder.events()[0].values, recorder.events()[1].values);
  EXPECT_EQ(recorder.events()[0].stat("max_over_mean"), recorder.events()[1].stat("max_over_mean"));
}

// offsets are the exclusive prefix sum of counts; each expert's block holds exactly its pairs,
// in pair order; pair_row and (row_token, row_slot) are inverse maps; dropped pairs have no row.
TEST(Dispatch, PlanInvariants) {
  for (bool drop : {false, true}) {
    const RandomCase c = random_case(drop ? 5 : 6, 50, 3, drop);
    Dispatch plan;
    dispatch_plan(plan, c.ids, c.keep, c.num_experts);
    const auto E = static_cast<std::size_t>(c.num_experts);
    ASSERT_EQ(plan.counts.size(), E);
    ASSERT_EQ(plan.offsets.size(), E + 1);
    EXPECT_EQ(plan.offsets[0], 0);
    for (std::size_t e = 0; e < E; ++e) EXPECT_EQ(plan.offsets[e + 1] - plan.offsets[e], plan.counts[e]);
    EXPECT_EQ(plan.offsets[E], c.keep.sum());
    EXPECT_EQ(plan.num_rows(), c.keep.sum());
    EXPECT_EQ(plan.counts[1], 0);  // an empty expert: an empty block
    if (drop) {
      EXPECT_LT(c.keep.sum(), c.keep.size());  // capacity did drop something
    }
    const Index k = c.ids.cols();
    for (std::size_t e = 0; e < E; ++e) {
      for (auto r = plan.offsets[e]; r < plan.offsets[e + 1]; ++r) {
        const auto row = static_cast<std::size_t>(r);
        const std::int32_t t = plan.row_token[row], j = plan.row_slot[row];
        EXPECT_EQ(static_cast<std::size_t>(c.ids(t, j)), e);
        EXPECT_EQ(c.keep(t, j), 1);
        EXPECT_EQ(plan.pair_row(t, j), r);
        if (r > plan.offsets[e]) {  // strictly increasing pair index t*k + j within the block
          EXPECT_LT(plan.row_token[row - 1] * k + plan.row_slot[row - 1], t * k + j);
        }
      }
    }
    for (Index t = 0; t < c.ids.rows(); ++t)
      for (Index j = 0; j < k; ++j) EXPECT_EQ(plan.pair_row(t, j) == -1, c.keep(t, j) == 0);
  }
}

// Permute then unpermute gives each kept pair its token's row (zeros for dropped pairs), and
// unpermute is undone exactly by its transpose: U^T U = I on the permuted rows.
TEST(Dispatch, PermutationAndInverseComposeToIdentity) {
  const RandomCase c = random_case(9, 30, 2, true);
  Rng rng(4);
  const MatrixD x = random_matrix(rng, 30, 5);
  Dispatch plan;
  dispatch_plan(plan, c.ids, c.keep, c.num_experts);
  MatrixD permuted, per_pair;
  permute_forward(permuted, x, plan);
  unpermute_forward(per_pair, permuted, plan);
  ASSERT_EQ(per_pair.rows(), 60);
  for (Index t = 0; t < 30; ++t) {
    for (Index j = 0; j < 2; ++j) {
      const MatrixD expected = c.keep(t, j) == 1 ? MatrixD(x.row(t)) : MatrixD::Zero(1, 5);
      EXPECT_TRUE(same(MatrixD(per_pair.row(t * 2 + j)), expected)) << "pair (" << t << ", " << j << ")";
    }
  }
  MatrixD back;
  unpermute_backward(back, per_pair, plan);
  EXPECT_TRUE(same(back, permuted));
}

// Both maps are linear, so <A x, y> = <x, A^T y>; with small integers both sides are exact.
TEST(Dispatch, BackwardIsTheExactAdjoint) {
  for (bool drop : {false, true}) {
    const RandomCase c = random_case(drop ? 12 : 13, 25, 2, drop);
    Dispatch plan;
    dispatch_plan(plan, c.ids, c.keep, c.num_experts);
    Rng rng(31);
    const Index N = plan.num_rows(), C = 4;
    const MatrixD x = integer_matrix(rng, 25, C);
    const MatrixD y = integer_matrix(rng, N, C);
    MatrixD px, pty;
    permute_forward(px, x, plan);
    permute_backward(pty, y, plan);
    EXPECT_EQ((px.array() * y.array()).sum(), (x.array() * pty.array()).sum());
    EXPECT_NE((px.array() * y.array()).sum(), 0.0);  // not trivially 0 = 0

    const MatrixD z = integer_matrix(rng, N, C);
    const MatrixD w = integer_matrix(rng, 25 * 2, C);
    MatrixD uz, utw;
    unpermute_forward(uz, z, plan);
    unpermute_backward(utw, w, plan);
    EXPECT_EQ((uz.array() * w.array()).sum(), (z.array() * utw.array()).sum());
    EXPECT_NE((uz.array() * w.array()).sum(), 0.0);
  }
}

TEST(Dispatch, BackwardMatchesFiniteDifferences) {
  const RandomCase c = random_case(21, 12, 2, true);
  Dispatch plan;
  dispatch_plan(plan, c.ids, c.keep, c.num_experts);
  Rng rng(8);
  const Index N = plan.num_rows(), C = 3;

  MatrixD x = random_matrix(rng, 12, C);
  const MatrixD wp = random_matrix(rng, N, C);
  auto permute_loss = [&] {
    MatrixD permuted;
    permute_forward(permuted, x, plan);
    return (permuted.array() * wp.array()).sum();
  };
  MatrixD dx;
  permute_backward(dx, wp, plan);
  EXPECT_LT(max_relative_error(dx, numerical_gradient(permute_loss, x)), 1e-7);
  // A token with no kept pair gets exactly zero gradient.
  for (Index t = 0; t < 12; ++t) {
    if (c.keep.row(t).sum() == 0) {
      EXPECT_EQ(dx.row(t).cwiseAbs().maxCoeff(), 0.0);
    }
  }

  MatrixD z = random_matrix(rng, N, C);
  const MatrixD wu = random_matrix(rng, 12 * 2, C);
  auto unpermute_loss = [&] {
    MatrixD per_pair;
    unpermute_forward(per_pair, z, plan);
    return (per_pair.array() * wu.array()).sum();
  };
  MatrixD dz;
  unpermute_backward(dz, wu, plan);
  EXPECT_LT(max_relative_error(dz, numerical_gradient(unpermute_loss, z)), 1e-7);
}

// Backward passes accumulate: a token routed to k experts collects k gradients, and a caller may
// add into a gradient that already holds something.
TEST(Dispatch, BackwardAccumulates) {
  Dispatch plan;
  dispatch_plan(plan, kIds, IndexMatrix(), 3);
  const MatrixD ones = MatrixD::Ones(8, 2);
  MatrixD dx;
  permute_backward(dx, ones, plan);
  EXPECT_TRUE(same(dx, MatrixD(MatrixD::Constant(4, 2, 2.0))));  // every token sent to 2 experts
  permute_backward(dx, ones, plan);
  EXPECT_TRUE(same(dx, MatrixD(MatrixD::Constant(4, 2, 4.0))));
  MatrixD dout = MatrixD::Ones(8, 2);
  unpermute_backward(dout, ones, plan);
  EXPECT_TRUE(same(dout, MatrixD(MatrixD::Constant(8, 2, 2.0))));
}

TEST(Dispatch, EmptyBatchAndEverythingDropped) {
  MemoryRecorder recorder;
  Dispatch plan;
  dispatch_plan(plan, IndexMatrix(0, 2), IndexMatrix(), 4, &recorder);
  EXPECT_EQ(plan.counts, std::vector<std::int64_t>(4, 0));
  EXPECT_EQ(plan.offsets, std::vector<std::int64_t>(5, 0));
  EXPECT_EQ(plan.num_rows(), 0);
  const RecordedEvent e = recorder.last(events::dispatched);
  EXPECT_TRUE(std::isnan(e.stat("max_over_mean")));
  EXPECT_EQ(e.stat("empty_experts"), 4.0);
  MatrixD permuted, per_pair, dx, dout;
  permute_forward(permuted, MatrixD(0, 3), plan);
  EXPECT_EQ(permuted.rows(), 0);
  EXPECT_EQ(permuted.cols(), 3);
  unpermute_forward(per_pair, permuted, plan);
  EXPECT_EQ(per_pair.rows(), 0);
  permute_backward(dx, permuted, plan);
  unpermute_backward(dout, per_pair, plan);
  EXPECT_EQ(dx.size(), 0);
  EXPECT_EQ(dout.size(), 0);

  dispatch_plan(plan, kIds, IndexMatrix::Zero(4, 2), 3);  // every pair dropped
  EXPECT_EQ(plan.num_rows(), 0);
  EXPECT_TRUE(same(plan.pair_row, IndexMatrix(IndexMatrix::Constant(4, 2, -1))));
  permute_forward(permuted, token_rows(4), plan);
  unpermute_forward(per_pair, permuted, plan);
  EXPECT_TRUE(same(per_pair, MatrixD(MatrixD::Zero(8, 2))));
}

// counts [2, 2, 1]: mean 5 / 3, max_over_mean = 2 / (5 / 3) = 1.2.
TEST(Dispatch, EmitsDispatchedEvent) {
  MemoryRecorder recorder;
  Dispatch plan;
  dispatch_plan(plan, kIds, kKeep, 3, &recorder);
  const RecordedEvent e = recorder.last(events::dispatched);
  EXPECT_EQ(e.shape, (std::array<std::int64_t, 2>{3, 1}));
  EXPECT_EQ(e.values, (std::vector<double>{2, 2, 1}));
  EXPECT_NEAR(e.stat("max_over_mean"), 1.2, 1e-15);
  EXPECT_EQ(e.stat("empty_experts"), 0.0);
  dispatch_plan(plan, kIds, kKeep, 5, &recorder);  // experts 3 and 4 receive nothing
  EXPECT_EQ(recorder.last(events::dispatched).stat("empty_experts"), 2.0);
}

TEST(Dispatch, FloatMatchesDouble) {
  const RandomCase c = random_case(2, 20, 2, true);
  Dispatch plan;
  dispatch_plan(plan, c.ids, c.keep, c.num_experts);
  Rng rng(3);
  const MatrixD x = random_matrix(rng, 20, 4);
  const Matrix xf = x.cast<float>();
  MatrixD pd, ud;
  Matrix pf, uf, dxf, duf;
  permute_forward(pd, x, plan);
  permute_forward(pf, xf, plan);
  EXPECT_TRUE(same(pf, Matrix(pd.cast<float>())));  // a copy: exact
  unpermute_forward(ud, pd, plan);
  unpermute_forward(uf, pf, plan);
  EXPECT_TRUE(same(uf, Matrix(ud.cast<float>())));
  unpermute_backward(duf, uf, plan);
  EXPECT_TRUE(same(duf, pf));
  permute_backward(dxf, pf, plan);
  EXPECT_EQ(dxf.rows(), 20);
}

TEST(Dispatch, RejectsBadInput) {
  Dispatch plan;
  EXPECT_EQ(error_of([&] { dispatch_plan(plan, kIds, kKeep, 0); }), "num_experts = 0: must be at least 1");
  EXPECT_EQ(error_of([&] { dispatch_plan(plan, int_rows({{0, 1}, {2, 3}}), IndexMatrix(), 3); }),
            "ids[1,1] = 3: must be in [0, num_experts = 3)");
  EXPECT_EQ(error_of([&] { dispatch_plan(plan, int_rows({{-1, 1}}), IndexMatrix(), 3); }),
            "ids[0,0] = -1: must be in [0, num_experts = 3)");
  EXPECT_EQ(error_of([&] { dispatch_plan(plan, kIds, IndexMatrix::Ones(4, 1), 3); }),
            "keep shape = (4, 1): must equal the ids shape (4, 2), or be empty (every pair kept)");
  EXPECT_EQ(error_of([&] { dispatch_plan(plan, kIds, int_rows({{1, 2}, {1, 1}, {1, 1}, {1, 1}}), 3); }),
            "keep[0,1] = 2: must be 0 (dropped) or 1 (kept)");
  EXPECT_EQ(plan.num_experts, 0);  // a failed call leaves the plan untouched

  EXPECT_EQ(error_of([&] {
              MatrixD out;
              permute_forward(out, token_rows(4), plan);
            }),
            "plan.num_experts = 0: must be at least 1 (build the plan with dispatch_plan)");
  dispatch_plan(plan, kIds, kKeep, 3);
  MatrixD out;
  EXPECT_EQ(error_of([&] { permute_forward(out, token_rows(3), plan); }),
            "x.rows() = 3: must equal the plan's number of tokens T = 4");
  EXPECT_EQ(error_of([&] { permute_backward(out, MatrixD(4, 2), plan); }),
            "dpermuted.rows() = 4: must equal the plan's number of rows N = 5");
  MatrixD dx(4, 3);
  EXPECT_EQ(error_of([&] { permute_backward(dx, MatrixD(5, 2), plan); }), "dx shape = (4, 3): must be (T, C) = (4, 2)");
  EXPECT_EQ(error_of([&] { unpermute_forward(out, MatrixD(4, 2), plan); }),
            "expert_out.rows() = 4: must equal the plan's number of rows N = 5");
  EXPECT_EQ(error_of([&] { unpermute_backward(out, MatrixD(4, 2), plan); }),
            "dper_pair.rows() = 4: must equal T * k = 4 * 2 = 8");
  MatrixD dout(5, 3);
  EXPECT_EQ(error_of([&] { unpermute_backward(dout, MatrixD(8, 2), plan); }),
            "dexpert_out shape = (5, 3): must be (N, C) = (5, 2)");

  Dispatch damaged = plan;
  damaged.row_token[0] = 9;
  EXPECT_EQ(error_of([&] { permute_forward(out, token_rows(4), damaged); }),
            "plan row 0 = (token 9, slot 0): must be a pair of the (T, k) = (4, 2) plan whose pair_row is 0");
  damaged = plan;
  damaged.pair_row(2, 0) = 2;  // a dropped pair claims row 2, which belongs to (0, 1)
  EXPECT_EQ(error_of([&] { unpermute_forward(out, MatrixD(5, 2), damaged); }),
            "plan.pair_row = 6 entries other than -1: must have exactly N = 5 (one per row; -1 for a dropped pair)");
  damaged = plan;
  damaged.offsets.pop_back();
  EXPECT_EQ(error_of([&] { permute_forward(out, token_rows(4), damaged); }),
            "plan.offsets.size() = 3: must equal plan.num_experts + 1 = 4");
}

}  // namespace
}  // namespace moelab
