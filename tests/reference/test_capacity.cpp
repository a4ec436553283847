// Tests of reference/capacity: the capacity formula and its roundings, the two drop policies,
// dropless, the dropped event and the error messages.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <vector>

#include "reference/capacity.h"
#include "reference/recorder.h"
#include "reference/selection.h"
#include "tests/testing.h"

namespace moelab {
namespace {

using moelab::testing::error_of;
using moelab::testing::int_rows;
using moelab::testing::rows_of;
using moelab::testing::random_matrix;

// Shape and values, so that a wrong shape fails the test instead of tripping Eigen's size assert.
::testing::AssertionResult same(const IndexMatrix& actual, const IndexMatrix& expected) {
  if (actual.rows() == expected.rows() && actual.cols() == expected.cols() && actual == expected) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "got (" << actual.rows() << ", " << actual.cols() << ")\n"
                                       << actual << "\nexpected (" << expected.rows() << ", "
                                       << expected.cols() << ")\n" << expected;
}

CapacityConfig capped(double factor, DropPolicy policy = DropPolicy::arrival_order,
                      CapacityRounding rounding = CapacityRounding::ceil, Index min_capacity = 0) {
  return CapacityConfig{.dropless = false,
                        .capacity_factor = factor,
                        .rounding = rounding,
                        .min_capacity = min_capacity,
                        .policy = policy};
}

// Switch-style numbers: T = 8 tokens, top-2, E = 8 experts, factor 1.25:
//   capacity_factor * T * k / E = 1.25 * 8 * 2 / 8 = 2.5  ->  ceil 3, floor 2, int(2.5) = 2.
TEST(Capacity, FormulaWithEachRounding) {
  EXPECT_EQ(expert_capacity(8, 2, 8, capped(1.25, DropPolicy::arrival_order, CapacityRounding::ceil)), 3);
  EXPECT_EQ(expert_capacity(8, 2, 8, capped(1.25, DropPolicy::arrival_order, CapacityRounding::floor)), 2);
  EXPECT_EQ(expert_capacity(8, 2, 8, capped(1.25, DropPolicy::arrival_order, CapacityRounding::trunc_int)), 2);
  for (CapacityRounding r : {CapacityRounding::ceil, CapacityRounding::floor, CapacityRounding::trunc_int}) {
    EXPECT_EQ(expert_capacity(8, 2, 8, capped(1.0, DropPolicy::arrival_order, r)), 2);  // 1 * 16 / 8
    EXPECT_EQ(expert_capacity(8, 2, 8, capped(1.25, DropPolicy::arrival_order, r, 4)), 4);  // min_capacity
    EXPECT_EQ(expert_capacity(8, 1, 8, capped(1.0, DropPolicy::arrival_order, r)), 1);  // Switch, k = 1
  }
  EXPECT_EQ(expert_capacity(10, 1, 4, capped(1.0)), 3);                                // 2.5 -> 3
  EXPECT_EQ(expert_capacity(10, 1, 4, capped(1.0, DropPolicy::arrival_order, CapacityRounding::floor)), 2);
  // dropless is ignored by the formula: it is capacity_forward that decides whether it applies.
  EXPECT_EQ(expert_capacity(8, 2, 8, CapacityConfig{.capacity_factor = 1.25}), 3);
}

// Decimal factors are not exact in binary; the quotient is snapped to the whole number it means,
// by the same rule as expert_choice_capacity.
TEST(Capacity, DecimalFactorsRoundToTheWholeNumberTheyMean) {
  // 1.1 * (50 * 2) / 10 is 11.000000000000002 in double: a bare ceil would give 12.
  EXPECT_GT(1.1 * 100.0 / 10.0, 11.0);
  EXPECT_EQ(expert_capacity(50, 2, 10, capped(1.1)), 11);
  // 0.7 * (45 * 2) / 7 is 8.999999999999998: a bare floor or int() would give 8.
  EXPECT_LT(0.7 * 90.0 / 7.0, 9.0);
  EXPECT_EQ(expert_capacity(45, 2, 7, capped(0.7, DropPolicy::arrival_order, CapacityRounding::floor)), 9);
  EXPECT_EQ(expert_capacity(45, 2, 7, capped(0.7, DropPolicy::arrival_order, CapacityRounding::trunc_int)), 9);
  EXPECT_EQ(expert_capacity(45, 2, 7, capped(0.7)), 9);
  EXPECT_EQ(round_capacity(11.000000000000002, CapacityRounding::ceil), 11.0);
  EXPECT_EQ(round_capacity(11.01, CapacityRounding::ceil), 12.0);  // a real fraction still rounds
  EXPECT_EQ(round_capacity(10.99, CapacityRounding::floor), 10.0);
  EXPECT_EQ(round_capacity(0.0, CapacityRounding::ceil), 0.0);
}

TEST(Capacity, AgreesWithExpertChoiceCapacityForOneExpertPerToken) {
  int compared = 0;
  for (double f : {0.3, 0.5, 0.7, 1.0, 1.1, 1.25, 1.4, 2.0, 2.3, 4.0}) {
    for (Index T = 0; T <= 60; ++T) {
      for (Index E = 1; E <= 12; ++E) {
        ASSERT_EQ(expert_capacity(T, 1, E, capped(f)), expert_choice_capacity(T, E, f))
            << "T = " << T << ", E = " << E << ", factor = " << f;
        ++compared;
      }
    }
  }
  EXPECT_EQ(compared, 10 * 61 * 12);
}

// No expert can receive more than T * k pairs, so the capacity is clamped there: it changes
// nothing that is kept, and a huge factor cannot overflow.
TEST(Capacity, ClampedToTheMostPairsAnExpertCanReceive) {
  EXPECT_EQ(expert_capacity(4, 2, 8, capped(100.0)), 8);    // 100 * 8 / 8 = 100 -> 8
  EXPECT_EQ(expert_capacity(4, 2, 8, capped(1e300)), 8);    // the quotient overflows to inf
  EXPECT_EQ(expert_capacity(4, 2, 8, capped(1.0, DropPolicy::arrival_order, CapacityRounding::ceil, 20)), 8);
  EXPECT_EQ(expert_capacity(0, 2, 8, capped(1.25, DropPolicy::arrival_order, CapacityRounding::ceil, 4)), 0);
}

// The worked example of both policies. T = 4, k = 2, E = 3, factor 0.75: capacity = 0.75 * 8 / 3 = 2.
//   token  ids     gates        largest gate
//     0    [0, 1]  [0.5, 0.3]   0.5
//     1    [0, 2]  [0.6, 0.2]   0.6
//     2    [0, 1]  [0.9, 0.05]  0.9
//     3    [1, 0]  [0.8, 0.1]   0.8
const IndexMatrix kIds = int_rows({{0, 1}, {0, 2}, {0, 1}, {1, 0}});
const MatrixD kGates = rows_of({{0.5, 0.3}, {0.6, 0.2}, {0.9, 0.05}, {0.8, 0.1}});

// Arrival order, slot-major. Slot 0 in token order: t0 -> e0 (1 of 2), t1 -> e0 (2 of 2),
// t2 -> e0 full: dropped, t3 -> e1 (1 of 2). Slot 1: t0 -> e1 (2 of 2), t1 -> e2 (1 of 2),
// t2 -> e1 full: dropped, t3 -> e0 full: dropped. Token 2, the most confident, loses both experts.
// (Token-major order, t0's pairs then t1's ..., would differ: t0 and t1 fill e0, t0 and t2 fill e1,
// and token 3 would lose both instead: keep [[1, 1], [1, 1], [0, 1], [0, 0]].)
TEST(Capacity, ArrivalOrderIsSlotMajor) {
  IndexMatrix keep;
  std::vector<std::int64_t> dropped;
  capacity_forward(keep, dropped, kIds, kGates, 3, capped(0.75));
  EXPECT_EQ(expert_capacity(4, 2, 3, capped(0.75)), 2);
  EXPECT_TRUE(same(keep, int_rows({{1, 1}, {1, 1}, {0, 0}, {1, 0}})));
  EXPECT_EQ(dropped, (std::vector<std::int64_t>{2, 1, 0}));  // e0: (t2,0), (t3,1); e1: (t2,1)
}

// Gate priority: tokens by largest gate, t2 (0.9), t3 (0.8), t1 (0.6), t0 (0.5), then slot-major.
// Slot 0: t2 -> e0 (1 of 2), t3 -> e1 (1 of 2), t1 -> e0 (2 of 2), t0 -> e0 full: dropped.
// Slot 1: t2 -> e1 (2 of 2), t3 -> e0 full: dropped, t1 -> e2 (1 of 2), t0 -> e1 full: dropped.
// Now the least confident token, 0, is the one that loses both experts. (Token-major in this
// order would give [[0, 0], [0, 1], [1, 1], [1, 1]].)
TEST(Capacity, GatePriorityKeepsTheMostConfidentTokens) {
  IndexMatrix keep;
  std::vector<std::int64_t> dropped;
  capacity_forward(keep, dropped, kIds, kGates, 3, capped(0.75, DropPolicy::gate_priority));
  EXPECT_TRUE(same(keep, int_rows({{0, 0}, {1, 1}, {1, 1}, {1, 0}})));
  EXPECT_EQ(dropped, (std::vector<std::int64_t>{2, 1, 0}));  // e0: (t0,0), (t3,1); e1: (t0,1)
}

// Three tokens for expert 0 with room for one (T = 3, k = 1, E = 3, factor 1: capacity 1).
// Gates [0.5, 0.7, 0.7]: arrival keeps token 0; gate priority keeps token 1 (ties: lower id).
TEST(Capacity, GatePriorityTiesGoToTheLowerToken) {
  const IndexMatrix ids = int_rows({{0}, {0}, {0}});
  const MatrixD gates = rows_of({{0.5}, {0.7}, {0.7}});
  IndexMatrix keep;
  std::vector<std::int64_t> dropped;
  capacity_forward(keep, dropped, ids, gates, 3, capped(1.0));
  EXPECT_TRUE(same(keep, int_rows({{1}, {0}, {0}})));
  capacity_forward(keep, dropped, ids, gates, 3, capped(1.0, DropPolicy::gate_priority));
  EXPECT_TRUE(same(keep, int_rows({{0}, {1}, {0}})));
  EXPECT_EQ(dropped, (std::vector<std::int64_t>{2, 0, 0}));

  // With every gate equal, gate priority is arrival order (a stable sort; an unstable one
  // reorders ties once there are more than a handful of tokens).
  Rng rng(2);
  IndexMatrix many;
  topk_select(many, random_matrix(rng, 60, 4), 2);
  IndexMatrix arrival;
  capacity_forward(arrival, dropped, many, MatrixD(), 4, capped(0.6));
  ASSERT_GT(std::accumulate(dropped.begin(), dropped.end(), std::int64_t{0}), 0);
  capacity_forward(keep, dropped, many, MatrixD(MatrixD::Constant(60, 2, 0.5)), 4,
                   capped(0.6, DropPolicy::gate_priority));
  EXPECT_TRUE(same(keep, arrival));
}

// Whatever the policy, an expert keeps min(load, capacity) pairs: dropped[e] = max(0, load[e] -
// capacity). With capacity >= the largest load nothing is dropped, exactly as dropless.
TEST(Capacity, DropsExactlyTheOverflowAndLargeCapacityIsDropless) {
  Rng rng(17);
  const Index T = 40, E = 8;
  const int k = 2;
  const MatrixD scores = random_matrix(rng, T, E, 2.0);
  IndexMatrix ids;
  topk_select(ids, scores, k);
  MatrixD gates(T, k);
  for (Index t = 0; t < T; ++t)
    for (Index j = 0; j < k; ++j) gates(t, j) = scores(t, ids(t, j));
  const std::vector<std::int64_t> load = expert_load(ids, static_cast<int>(E));
  const std::int64_t max_load = *std::max_element(load.begin(), load.end());
  ASSERT_GT(max_load, T * k / E);  // the random routing is unbalanced, so capacity matters

  IndexMatrix dropless_keep;
  std::vector<std::int64_t> dropless_dropped;
  capacity_forward(dropless_keep, dropless_dropped, ids, gates, E, CapacityConfig{});
  EXPECT_TRUE(same(dropless_keep, IndexMatrix::Ones(T, k)));
  EXPECT_EQ(dropless_dropped, std::vector<std::int64_t>(E, 0));

  for (DropPolicy policy : {DropPolicy::arrival_order, DropPolicy::gate_priority}) {
    // min_capacity sets the capacity exactly (the factor alone gives ceil(0.01 * 80 / 8) = 1).
    for (std::int64_t capacity = 1; capacity <= max_load + 1; ++capacity) {
      IndexMatrix keep;
      std::vector<std::int64_t> dropped;
      capacity_forward(keep, dropped, ids, gates, E,
                       capped(0.01, policy, CapacityRounding::ceil, capacity));
      for (Index e = 0; e < E; ++e) {
        const auto i = static_cast<std::size_t>(e);
        EXPECT_EQ(dropped[i], std::max<std::int64_t>(0, load[i] - capacity)) << drop_policy_name(policy);
        std::int64_t kept = 0;
        for (Index t = 0; t < T; ++t)
          for (Index j = 0; j < k; ++j) kept += ids(t, j) == e ? keep(t, j) : 0;
        EXPECT_EQ(kept, std::min(load[i], capacity)) << drop_policy_name(policy);
      }
      if (capacity >= max_load) {
        EXPECT_TRUE(same(keep, dropless_keep)) << drop_policy_name(policy);
      }
    }
    IndexMatrix keep;  // factor E: capacity = T * k, the largest there is
    std::vector<std::int64_t> dropped;
    capacity_forward(keep, dropped, ids, gates, E, capped(static_cast<double>(E), policy));
    EXPECT_TRUE(same(keep, dropless_keep));
    EXPECT_EQ(dropped, dropless_dropped);
  }
}

TEST(Capacity, EmitsDroppedEvent) {
  MemoryRecorder recorder;
  IndexMatrix keep;
  std::vector<std::int64_t> dropped;
  capacity_forward(keep, dropped, kIds, kGates, 3, capped(0.75), &recorder);
  RecordedEvent e = recorder.last(events::dropped);
  EXPECT_EQ(e.shape, (std::array<std::int64_t, 2>{3, 1}));
  EXPECT_EQ(e.values, (std::vector<double>{2, 1, 0}));
  EXPECT_EQ(e.stat("capacity"), 2.0);
  EXPECT_EQ(e.stat("dropped_pairs"), 3.0);
  EXPECT_EQ(e.stat("tokens_dropped_entirely"), 1.0);  // token 2

  capacity_forward(keep, dropped, kIds, kGates, 3, CapacityConfig{}, &recorder);
  e = recorder.last(events::dropped);
  EXPECT_EQ(e.values, (std::vector<double>{0, 0, 0}));
  EXPECT_EQ(e.stat("capacity"), std::numeric_limits<double>::infinity());  // dropless: no limit
  EXPECT_EQ(e.stat("dropped_pairs"), 0.0);
  EXPECT_EQ(e.stat("tokens_dropped_entirely"), 0.0);
  EXPECT_EQ(recorder.count(events::dropped), 2u);
}

TEST(Capacity, EmptyBatchAndFloatGates) {
  MemoryRecorder recorder;
  IndexMatrix keep;
  std::vector<std::int64_t> dropped;
  capacity_forward(keep, dropped, IndexMatrix(0, 2), Matrix(0, 2), 4,
                   capped(1.0, DropPolicy::gate_priority), &recorder);
  EXPECT_EQ(keep.rows(), 0);
  EXPECT_EQ(keep.cols(), 2);
  EXPECT_EQ(dropped, std::vector<std::int64_t>(4, 0));
  EXPECT_EQ(recorder.last(events::dropped).stat("capacity"), 0.0);
  EXPECT_EQ(recorder.last(events::dropped).stat("tokens_dropped_entirely"), 0.0);
  // The worked example with float gates: rounding to float keeps their order.
  capacity_forward(keep, dropped, kIds, Matrix(kGates.cast<float>()), 3, capped(0.75, DropPolicy::gate_priority));
  EXPECT_TRUE(same(keep, int_rows({{0, 0}, {1, 1}, {1, 1}, {1, 0}})));
  // arrival_order does not read the gates: they may be left empty.
  capacity_forward(keep, dropped, kIds, Matrix(), 3, capped(0.75));
  EXPECT_TRUE(same(keep, int_rows({{1, 1}, {1, 1}, {0, 0}, {1, 0}})));
}

TEST(Capacity, NamesRoundTrip) {
  for (CapacityRounding r : {CapacityRounding::ceil, CapacityRounding::floor, CapacityRounding::trunc_int})
    EXPECT_EQ(parse_capacity_rounding(capacity_rounding_name(r)), r);
  for (DropPolicy p : {DropPolicy::arrival_order, DropPolicy::gate_priority})
    EXPECT_EQ(parse_drop_policy(drop_policy_name(p)), p);
  EXPECT_EQ(drop_policy_name(DropPolicy::gate_priority), "gate_priority");
}

TEST(Capacity, RejectsBadInput) {
  IndexMatrix keep;
  std::vector<std::int64_t> dropped;
  const auto run = [&](const IndexMatrix& ids, const MatrixD& gates, Index E, const CapacityConfig& config) {
    return error_of([&] { capacity_forward(keep, dropped, ids, gates, E, config); });
  };
  EXPECT_EQ(run(kIds, kGates, 3, capped(0.0)), "capacity_factor = 0: must be finite and > 0");
  EXPECT_EQ(run(kIds, kGates, 3, capped(-1.5)), "capacity_factor = -1.5: must be finite and > 0");
  EXPECT_EQ(run(kIds, kGates, 3, capped(NAN)), "capacity_factor = nan: must be finite and > 0");
  EXPECT_EQ(run(kIds, kGates, 3, CapacityConfig{.capacity_factor = INFINITY}),
            "capacity_factor = inf: must be finite and > 0");  // checked even when dropless
  EXPECT_EQ(run(kIds, kGates, 3, capped(1.0, DropPolicy::arrival_order, CapacityRounding::ceil, -1)),
            "min_capacity = -1: must be >= 0");
  EXPECT_EQ(run(kIds, kGates, 0, capped(1.0)), "num_experts = 0: must be at least 1");
  EXPECT_EQ(run(int_rows({{0, 1}, {3, 0}}), rows_of({{1, 1}, {1, 1}}), 3, capped(1.0)),
            "ids[1,0] = 3: must be in [0, num_experts = 3)");
  EXPECT_EQ(run(int_rows({{0, -1}}), rows_of({{1, 1}}), 3, CapacityConfig{}),
            "ids[0,1] = -1: must be in [0, num_experts = 3)");
  EXPECT_EQ(run(IndexMatrix(2, 0), MatrixD(2, 0), 3, capped(1.0)),
            "ids.cols() = 0: k, the experts per token, must be at least 1");
  EXPECT_EQ(run(kIds, rows_of({{0.5, 0.3}}), 3, capped(1.0)), "gates shape = (1, 2): must equal the ids shape (4, 2)");
  EXPECT_EQ(run(kIds, MatrixD(), 3, capped(1.0, DropPolicy::gate_priority)),
            "gates shape = (0, 0): must equal the ids shape (4, 2)");
  MatrixD nan_gates = kGates;
  nan_gates(2, 1) = NAN;
  EXPECT_EQ(run(kIds, nan_gates, 3, capped(0.75, DropPolicy::gate_priority)),
            "gates[2,1] = nan: must be finite (gate_priority orders tokens by their largest gate)");
  EXPECT_EQ(run(kIds, nan_gates, 3, capped(0.75)), "");  // arrival_order does not read gates
  EXPECT_EQ(run(kIds, nan_gates, 3, CapacityConfig{.policy = DropPolicy::gate_priority}), "");  // nor does dropless

  EXPECT_EQ(error_of([] { expert_capacity(-1, 2, 8, capped(1.0)); }), "tokens = -1: must be non-negative");
  EXPECT_EQ(error_of([] { expert_capacity(8, 0, 8, capped(1.0)); }), "top_k = 0: must be at least 1");
  EXPECT_EQ(error_of([] { expert_capacity(8, 2, 0, capped(1.0)); }), "num_experts = 0: must be at least 1");
  EXPECT_EQ(error_of([] { round_capacity(-1.0, CapacityRounding::ceil); }), "capacity quotient = -1: must be >= 0");
  EXPECT_EQ(error_of([] { parse_capacity_rounding("round"); }),
            "rounding = \"round\": must be one of ceil, floor, trunc_int");
  EXPECT_EQ(error_of([] { parse_drop_policy("random"); }),
            "drop_policy = \"random\": must be one of arrival_order, gate_priority");
}

}  // namespace
}  // namespace moelab
