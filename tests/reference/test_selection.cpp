// Tests of the selection stage (top-k, group/device-limited, expert choice, hash and table
// routing, load). T = tokens, E = experts, k = experts per token, C = tokens per expert,
// G = groups, S = E / G experts per group, V = vocabulary size.
//
// Scores in the hand-worked examples are dyadic (0.75, 0.625, ...), so that they and their sums
// with a dyadic bias are exact in float and double and the expected ids hold in both.
#include "reference/error.h"
#include "reference/random.h"
#include "reference/recorder.h"
#include "reference/selection.h"
#include "reference/types.h"
#include "tests/testing.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <set>
#include <string>
#include <vector>

namespace moelab {
namespace {

using moelab::testing::error_of;
using moelab::testing::random_matrix;
using Ids = std::vector<std::int32_t>;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Builds a (rows, cols) matrix from row-major values.
template <typename Scalar = double>
MatrixT<Scalar> matrix(Index rows, Index cols, std::initializer_list<double> values) {
  MatrixT<Scalar> m(rows, cols);
  Index i = 0;
  for (const double v : values) m.data()[i++] = static_cast<Scalar>(v);
  EXPECT_EQ(i, rows * cols);
  return m;
}

template <typename Scalar = double>
VectorT<Scalar> vector(std::initializer_list<double> values) {
  VectorT<Scalar> v(static_cast<Index>(values.size()));
  Index i = 0;
  for (const double x : values) v(i++) = static_cast<Scalar>(x);
  return v;
}

Ids row_of(const IndexMatrix& m, Index r) {
  return Ids(m.row(r).data(), m.row(r).data() + m.cols());
}

// The definition, computed the slow way: the first n positions of a full stable sort by
// descending value (a stable sort keeps equal values in position order: ties to the lower id).
template <typename Scalar>
Ids stable_top(const std::vector<Scalar>& values, std::size_t n) {
  Ids order(values.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int32_t a, std::int32_t b) { return values[a] > values[b]; });
  order.resize(n);
  return order;
}

// Sigmoid scores (DeepSeek-V3's), in (0, 1).
template <typename Scalar>
MatrixT<Scalar> sigmoid_scores(Rng& rng, Index T, Index E) {
  const MatrixD logits = random_matrix<double>(rng, T, E, 2.0);
  return (1.0 / (1.0 + (-logits.array()).exp())).matrix().cast<Scalar>();
}

template <typename Scalar>
class Selection : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Selection, Scalars);

// ---- topk_select -------------------------------------------------------------------------------

// Row 0: scores [0.125, 0.5, 0.25, 0.375], k = 2: the largest is 0.5 (expert 1), then 0.375
//   (expert 3) -> [1, 3], best first.
// Row 1: [0.5, 0.125, 0.5, 0.25], k = 2: experts 0 and 2 tie at 0.5; the lower id comes first
//   -> [0, 2] (a stable sort by descending score gives the same).
// Row 2: [0.25, 0.25, 0.25, 0.25]: all tie -> [0, 1].
TYPED_TEST(Selection, TopKHandWorkedExample) {
  using Scalar = TypeParam;
  const MatrixT<Scalar> scores = matrix<Scalar>(3, 4,
                                                {0.125, 0.5, 0.25, 0.375,  //
                                                 0.5, 0.125, 0.5, 0.25,    //
                                                 0.25, 0.25, 0.25, 0.25});
  IndexMatrix ids(7, 7);  // wrong size on purpose: it is resized
  topk_select(ids, scores, 2);
  ASSERT_EQ(ids.rows(), 3);
  ASSERT_EQ(ids.cols(), 2);
  EXPECT_EQ(row_of(ids, 0), (Ids{1, 3}));
  EXPECT_EQ(row_of(ids, 1), (Ids{0, 2}));
  EXPECT_EQ(row_of(ids, 2), (Ids{0, 1}));

  topk_select(ids, scores, 4);  // k = E: a full ranking
  EXPECT_EQ(row_of(ids, 0), (Ids{1, 3, 2, 0}));
  EXPECT_EQ(row_of(ids, 1), (Ids{0, 2, 3, 1}));
  EXPECT_EQ(row_of(ids, 2), (Ids{0, 1, 2, 3}));
}

// Random rows against a full stable sort of each row, for every k, with and without a bias.
TYPED_TEST(Selection, TopKPicksTheKLargest) {
  using Scalar = TypeParam;
  Rng rng(11);
  const Index T = 50;
  const Index E = 12;
  const MatrixT<Scalar> scores = random_matrix<Scalar>(rng, T, E);
  const VectorT<Scalar> bias = random_matrix<Scalar>(rng, E, 1, 0.5);
  for (int k = 1; k <= E; ++k) {
    for (const VectorT<Scalar>* b : {static_cast<const VectorT<Scalar>*>(nullptr), &bias}) {
      IndexMatrix ids;
      topk_select(ids, scores, k, b);
      ASSERT_EQ(ids.rows(), T);
      ASSERT_EQ(ids.cols(), k);
      for (Index t = 0; t < T; ++t) {
        std::vector<Scalar> row(static_cast<std::size_t>(E));
        for (Index e = 0; e < E; ++e) row[e] = scores(t, e) + (b ? (*b)(e) : Scalar(0));
        EXPECT_EQ(row_of(ids, t), stable_top(row, static_cast<std::size_t>(k)))
            << "t = " << t << ", k = " << k << ", bias " << (b != nullptr);
      }
    }
  }
}

// Small integer scores in [0, 3] over 10 experts: every row has many exact ties, and the result
// must still equal the stable sort (ties to the lower id), in every position of the row.
TYPED_TEST(Selection, TopKTiesGoToTheLowerId) {
  using Scalar = TypeParam;
  Rng rng(12);
  const Index T = 40;
  const Index E = 10;
  MatrixT<Scalar> scores(T, E);
  for (Index i = 0; i < scores.size(); ++i) {
    scores.data()[i] = static_cast<Scalar>(rng.next_u64() % 4);
  }
  IndexMatrix ids;
  topk_select(ids, scores, 6);
  for (Index t = 0; t < T; ++t) {
    std::vector<Scalar> row(scores.row(t).data(), scores.row(t).data() + E);
    EXPECT_EQ(row_of(ids, t), stable_top(row, 6)) << t;
    for (Index j = 1; j < 6; ++j) {  // descending, and increasing ids within a tie
      const Scalar prev = scores(t, ids(t, j - 1));
      const Scalar cur = scores(t, ids(t, j));
      EXPECT_TRUE(prev > cur || (prev == cur && ids(t, j - 1) < ids(t, j))) << t << ", " << j;
    }
  }
  // The boundary tie: [0, 3, 1, 3, 3], k = 2 -> experts 1, 3, 4 tie at 3; the two lowest win.
  IndexMatrix boundary;
  topk_select(boundary, matrix<Scalar>(1, 5, {0, 3, 1, 3, 3}), 2);
  EXPECT_EQ(row_of(boundary, 0), (Ids{1, 3}));
}

// scores [0.5, 0.375, 0.25], bias [-0.25, 0, 0.25] (expert 0 was overloaded, expert 2 idle):
//   biased = [0.25, 0.375, 0.5]. k = 1: unbiased -> [0], biased -> [2]; k = 2: [0, 1] -> [2, 1].
// A bias of [-0.125, 0, 0] makes biased = [0.375, 0.375, 0.25]: a tie, and expert 0 keeps it.
TYPED_TEST(Selection, TopKBiasChangesTheSelection) {
  using Scalar = TypeParam;
  const MatrixT<Scalar> scores = matrix<Scalar>(1, 3, {0.5, 0.375, 0.25});
  const VectorT<Scalar> bias = vector<Scalar>({-0.25, 0, 0.25});
  IndexMatrix ids;
  topk_select(ids, scores, 1);
  EXPECT_EQ(row_of(ids, 0), (Ids{0}));
  topk_select(ids, scores, 1, &bias);
  EXPECT_EQ(row_of(ids, 0), (Ids{2}));
  topk_select(ids, scores, 2);
  EXPECT_EQ(row_of(ids, 0), (Ids{0, 1}));
  topk_select(ids, scores, 2, &bias);
  EXPECT_EQ(row_of(ids, 0), (Ids{2, 1}));
  const VectorT<Scalar> tie = vector<Scalar>({-0.125, 0, 0});
  topk_select(ids, scores, 1, &tie);
  EXPECT_EQ(row_of(ids, 0), (Ids{0}));
  // A bias that is the same for every expert changes nothing.
  const VectorT<Scalar> flat = vector<Scalar>({-0.5, -0.5, -0.5});
  topk_select(ids, scores, 2, &flat);
  EXPECT_EQ(row_of(ids, 0), (Ids{0, 1}));
}

// ---- group_limited_select ----------------------------------------------------------------------

// E = 8 sigmoid scores in G = 4 groups of S = 2, topk_group = 2, k = 3, top2_sum, -inf mask:
//   scores = [0.5, 0.25 | 0.75, 0.125 | 0.375, 0.625 | 0.875, 0.0625]
//   group scores (sum of each group's top 2) = [0.75, 0.875, 1.0, 0.9375] -> keep groups 2, 3
//   top 3 of experts 4..7 = [0.875 (6), 0.625 (5), 0.375 (4)] -> [6, 5, 4]
//   (plain top-3 would be [6, 2, 5]: expert 2, 0.75, is lost with its group.)
// With bias [0, 0, 0.25, 0, 0, 0, 0, 0] the biased scores of group 1 are [1.0, 0.125]:
//   group scores [0.75, 1.125, 1.0, 0.9375] -> keep groups 1, 2; top 3 of experts 2..5 by biased
//   score = [1.0 (2), 0.625 (5), 0.375 (4)] -> [2, 5, 4]: the bias also picks the groups.
TYPED_TEST(Selection, GroupLimitedHandWorkedExample) {
  using Scalar = TypeParam;
  const MatrixT<Scalar> scores =
      matrix<Scalar>(1, 8, {0.5, 0.25, 0.75, 0.125, 0.375, 0.625, 0.875, 0.0625});
  const GroupLimit limit{.n_group = 4, .topk_group = 2};
  IndexMatrix ids;
  group_limited_select(ids, scores, 3, limit);
  ASSERT_EQ(ids.rows(), 1);
  ASSERT_EQ(ids.cols(), 3);
  EXPECT_EQ(row_of(ids, 0), (Ids{6, 5, 4}));
  topk_select(ids, scores, 3);
  EXPECT_EQ(row_of(ids, 0), (Ids{6, 2, 5}));

  const VectorT<Scalar> bias = vector<Scalar>({0, 0, 0.25, 0, 0, 0, 0, 0});
  group_limited_select(ids, scores, 3, limit, &bias);
  EXPECT_EQ(row_of(ids, 0), (Ids{2, 5, 4}));

  // n_group = 1 (one group, kept): plain top-k.
  group_limited_select(ids, scores, 3, GroupLimit{});
  EXPECT_EQ(row_of(ids, 0), (Ids{6, 2, 5}));
}

// An independent oracle on random inputs: group scores from a full sort of each group, the kept
// groups from a stable sort of those, then a stable sort of the kept groups' experts. Checks that
// no expert of a dropped group is ever chosen (the -inf mask), for both group scores.
TYPED_TEST(Selection, GroupLimitedNeverPicksFromADroppedGroup) {
  using Scalar = TypeParam;
  Rng rng(21);
  const Index T = 60;
  const Index E = 16;
  const MatrixT<Scalar> scores = sigmoid_scores<Scalar>(rng, T, E);
  const VectorT<Scalar> bias = random_matrix<Scalar>(rng, E, 1, 0.3);
  for (const GroupScore score : {GroupScore::top2_sum, GroupScore::max}) {
    for (const int n_group : {2, 4, 8}) {
      const int topk_group = n_group / 2;
      const Index S = E / n_group;
      const int k = static_cast<int>(topk_group * S) - 1;
      const GroupLimit limit{.n_group = n_group, .topk_group = topk_group, .score = score};
      IndexMatrix ids;
      group_limited_select(ids, scores, k, limit, &bias);
      for (Index t = 0; t < T; ++t) {
        std::vector<Scalar> biased(static_cast<std::size_t>(E));
        for (Index e = 0; e < E; ++e) biased[e] = scores(t, e) + bias(e);
        std::vector<Scalar> group_score(static_cast<std::size_t>(n_group));
        for (int g = 0; g < n_group; ++g) {
          std::vector<Scalar> members(biased.begin() + g * S, biased.begin() + (g + 1) * S);
          std::sort(members.begin(), members.end(), std::greater<>());
          group_score[g] = score == GroupScore::max ? members[0] : members[0] + members[1];
        }
        const Ids kept = stable_top(group_score, static_cast<std::size_t>(topk_group));
        std::vector<Scalar> allowed(static_cast<std::size_t>(E),
                                    -std::numeric_limits<Scalar>::infinity());
        for (const std::int32_t g : kept) {
          for (Index e = g * S; e < (g + 1) * S; ++e) allowed[e] = biased[e];
        }
        EXPECT_EQ(row_of(ids, t), stable_top(allowed, static_cast<std::size_t>(k)))
            << "t = " << t << ", n_group = " << n_group;
        for (Index j = 0; j < k; ++j) {
          const std::int32_t group = static_cast<std::int32_t>(ids(t, j) / S);
          EXPECT_NE(std::find(kept.begin(), kept.end(), group), kept.end())
              << "t = " << t << ": expert " << ids(t, j) << " of dropped group " << group;
        }
      }
    }
  }
}

// When the 0.0 mask (Hugging Face's masked_fill(..., 0.0)) differs from -inf. E = 4 sigmoid
// scores in G = 2 groups of 2, topk_group = 1, k = 2, top2_sum:
//   scores = [0.75, 0.5 | 0.25, 0.125], all > 0 as sigmoids are
//   bias   = [-0.5, -0.625 | -0.5, -0.5]  (aux-loss-free balancing drives busy experts' bias < 0)
//   biased = [0.25, -0.125 | -0.25, -0.375]; group scores [0.125, -0.625] -> keep group 0.
//   -inf mask: [0.25, -0.125, -inf, -inf] -> [0, 1]
//   0.0 mask:  [0.25, -0.125, 0, 0]       -> [0, 2]: expert 2 (0 beats -0.125, and wins its tie
//              with expert 3 by the lower id) comes from group 1, which was not kept.
TYPED_TEST(Selection, GroupLimitedZeroMaskDiffersWhenBiasedScoresAreNegative) {
  using Scalar = TypeParam;
  const MatrixT<Scalar> scores = matrix<Scalar>(1, 4, {0.75, 0.5, 0.25, 0.125});
  const VectorT<Scalar> bias = vector<Scalar>({-0.5, -0.625, -0.5, -0.5});
  GroupLimit limit{.n_group = 2, .topk_group = 1, .mask = GroupMask::neg_inf};
  IndexMatrix ids_inf;
  group_limited_select(ids_inf, scores, 2, limit, &bias);
  EXPECT_EQ(row_of(ids_inf, 0), (Ids{0, 1}));
  limit.mask = GroupMask::zero;
  IndexMatrix ids_zero;
  group_limited_select(ids_zero, scores, 2, limit, &bias);
  EXPECT_EQ(row_of(ids_zero, 0), (Ids{0, 2}));

  // Without the bias every biased score is > 0 and both masks give [0, 1].
  group_limited_select(ids_zero, scores, 2, limit);
  EXPECT_EQ(row_of(ids_zero, 0), (Ids{0, 1}));

  // A bias of -1 everywhere (biased [-0.25, -0.5 | -0.75, -0.875], group 0 kept): with the 0.0
  // mask even the top-1 expert, 2, comes from the dropped group; with -inf it is expert 0.
  const VectorT<Scalar> minus_one = VectorT<Scalar>::Constant(4, Scalar(-1));
  group_limited_select(ids_zero, scores, 1, limit, &minus_one);
  EXPECT_EQ(row_of(ids_zero, 0), (Ids{2}));
  limit.mask = GroupMask::neg_inf;
  group_limited_select(ids_inf, scores, 1, limit, &minus_one);
  EXPECT_EQ(row_of(ids_inf, 0), (Ids{0}));
}

// With biased scores > 0 (sigmoid scores, a bias >= 0 or none) a kept expert always beats a
// masked one, so the two masks choose the same experts.
TYPED_TEST(Selection, GroupLimitedMasksAgreeWhenBiasedScoresArePositive) {
  using Scalar = TypeParam;
  Rng rng(22);
  const Index T = 200;
  const Index E = 32;
  const MatrixT<Scalar> scores = sigmoid_scores<Scalar>(rng, T, E);
  ASSERT_GT(scores.minCoeff(), Scalar(0));
  const VectorT<Scalar> bias = random_matrix<Scalar>(rng, E, 1, 0.2).cwiseAbs();
  for (const VectorT<Scalar>* b : {static_cast<const VectorT<Scalar>*>(nullptr), &bias}) {
    GroupLimit limit{.n_group = 8, .topk_group = 3, .mask = GroupMask::neg_inf};
    IndexMatrix ids_inf;
    group_limited_select(ids_inf, scores, 8, limit, b);
    limit.mask = GroupMask::zero;
    IndexMatrix ids_zero;
    group_limited_select(ids_zero, scores, 8, limit, b);
    EXPECT_EQ(ids_inf, ids_zero);
  }
  // ... and with a bias negative enough the masks disagree on some rows of the same input.
  const VectorT<Scalar> negative = VectorT<Scalar>::Constant(E, Scalar(-0.9));
  GroupLimit limit{.n_group = 8, .topk_group = 3, .mask = GroupMask::neg_inf};
  IndexMatrix ids_inf;
  group_limited_select(ids_inf, scores, 8, limit, &negative);
  limit.mask = GroupMask::zero;
  IndexMatrix ids_zero;
  group_limited_select(ids_zero, scores, 8, limit, &negative);
  EXPECT_NE(ids_inf, ids_zero);
}

// E = 4 in G = 2 groups of 2, topk_group = 1, k = 2:
//   scores = [0.875, 0.125 | 0.625, 0.5]
//   top2_sum: [1.0, 1.125] -> group 1 -> [2, 3]
//   max:      [0.875, 0.625] -> group 0 -> [0, 1]
//   (no group limit: [0, 2].) One strong expert wins by max; two good ones win by top2_sum.
TYPED_TEST(Selection, GroupScoreTop2SumAndMaxDiffer) {
  using Scalar = TypeParam;
  const MatrixT<Scalar> scores = matrix<Scalar>(1, 4, {0.875, 0.125, 0.625, 0.5});
  IndexMatrix ids;
  group_limited_select(ids, scores, 2,
                       GroupLimit{.n_group = 2, .topk_group = 1, .score = GroupScore::top2_sum});
  EXPECT_EQ(row_of(ids, 0), (Ids{2, 3}));
  group_limited_select(ids, scores, 2,
                       GroupLimit{.n_group = 2, .topk_group = 1, .score = GroupScore::max});
  EXPECT_EQ(row_of(ids, 0), (Ids{0, 1}));
  topk_select(ids, scores, 2);
  EXPECT_EQ(row_of(ids, 0), (Ids{0, 2}));

  // Equal group scores: [0.5, 0.25 | 0.25, 0.5] ties both ways; the lower group (0) is kept.
  const MatrixT<Scalar> tied = matrix<Scalar>(1, 4, {0.5, 0.25, 0.25, 0.5});
  for (const GroupScore score : {GroupScore::top2_sum, GroupScore::max}) {
    group_limited_select(ids, tied, 2, GroupLimit{.n_group = 2, .topk_group = 1, .score = score});
    EXPECT_EQ(row_of(ids, 0), (Ids{0, 1}));
  }
}

// ---- device_limited_select ---------------------------------------------------------------------

// DeepSeek-V2 style, E = 6 softmax scores (in sixteenths, summing to 1) on D = 3 devices of 2,
// M = 2 devices, k = 3:
//   scores = [1, 5 | 3, 2 | 4, 1] / 16; device scores (max) = [5, 3, 4] / 16 -> devices 0, 2
//   top 3 of experts {0, 1, 4, 5} = 5 (1), 4 (4), then 1/16 ties between 0 and 5 -> 0
//   -> [1, 4, 0]; without the device limit: [1, 4, 2].
TYPED_TEST(Selection, DeviceLimitedHandWorkedExample) {
  using Scalar = TypeParam;
  const MatrixT<Scalar> scores = (matrix<Scalar>(1, 6, {1, 5, 3, 2, 4, 1}) / Scalar(16)).eval();
  IndexMatrix ids;
  device_limited_select(ids, scores, 3, 3, 2);
  EXPECT_EQ(row_of(ids, 0), (Ids{1, 4, 0}));
  topk_select(ids, scores, 3);
  EXPECT_EQ(row_of(ids, 0), (Ids{1, 4, 2}));
  device_limited_select(ids, scores, 3, 3, 3);  // every device allowed: plain top-k
  EXPECT_EQ(row_of(ids, 0), (Ids{1, 4, 2}));
}

TYPED_TEST(Selection, DeviceLimitedEqualsGroupLimitedWithMax) {
  using Scalar = TypeParam;
  Rng rng(31);
  const Index E = 24;
  const MatrixT<Scalar> scores = random_matrix<Scalar>(rng, 100, E);
  for (const int D : {1, 2, 3, 4, 6, 8, 12, 24}) {
    for (int M = 1; M <= D; M += 2) {
      const int k = std::min<int>(6, static_cast<int>(M * (E / D)));
      IndexMatrix device_ids;
      device_limited_select(device_ids, scores, k, D, M);
      IndexMatrix group_ids;
      group_limited_select(group_ids, scores, k,
                           GroupLimit{.n_group = D, .topk_group = M, .score = GroupScore::max});
      EXPECT_EQ(device_ids, group_ids) << "D = " << D << ", M = " << M;
    }
  }
}

// ---- expert choice -----------------------------------------------------------------------------

// C = ceil(T * capacity_factor / E), clamped to [0, T]:
//   (8, 4, 1.0) -> 2;   (10, 4, 1.0) -> ceil(2.5) = 3;   (10, 4, 2.0) -> 5;
//   (100, 10, 1.1) -> 11: 100 * 1.1 / 10 is 11.000000000000002 in double (1.1 is not exact),
//   which a bare ceil would make 12; likewise (100, 2, 1.1) -> 55 and (100, 11, 1.1) -> 10;
//   (1000, 3, 0.301) -> ceil(100.33) = 101; (5, 2, 4.0) -> ceil(10) = 10 -> clamped to T = 5;
//   (0, 4, 2) -> 0; (3, 8, 0.5) -> ceil(0.1875) = 1: every expert takes at least one token.
TEST(ExpertChoice, CapacityHandWorked) {
  EXPECT_EQ(expert_choice_capacity(8, 4, 1.0), 2);
  EXPECT_EQ(expert_choice_capacity(10, 4, 1.0), 3);
  EXPECT_EQ(expert_choice_capacity(10, 4, 2.0), 5);
  ASSERT_GT(100 * 1.1 / 10, 11.0);  // the rounding the snap exists for
  EXPECT_EQ(expert_choice_capacity(100, 10, 1.1), 11);
  EXPECT_EQ(expert_choice_capacity(100, 2, 1.1), 55);
  EXPECT_EQ(expert_choice_capacity(100, 11, 1.1), 10);
  EXPECT_EQ(expert_choice_capacity(1000, 3, 0.3), 100);
  EXPECT_EQ(expert_choice_capacity(1000, 3, 0.301), 101);
  EXPECT_EQ(expert_choice_capacity(5, 2, 4.0), 5);
  EXPECT_EQ(expert_choice_capacity(0, 4, 2.0), 0);
  EXPECT_EQ(expert_choice_capacity(3, 8, 0.5), 1);
  EXPECT_EQ(expert_choice_capacity(7, 1, 1e300), 7);  // a huge factor: clamped to T
}

// T = 4 tokens, E = 2 experts, C = 2:
//   scores (T, E) = [0.9, 0.1;  0.6, 0.4;  0.7, 0.5;  0.2, 0.8]
//   expert 0's column [0.9, 0.6, 0.7, 0.2] -> tokens [0, 2]
//   expert 1's column [0.1, 0.4, 0.5, 0.8] -> tokens [3, 2]
//   Token 2 is taken twice and token 1 not at all: unrouted_tokens = 1, max_experts_per_token = 2.
TYPED_TEST(Selection, ExpertChoiceHandWorkedExample) {
  using Scalar = TypeParam;
  const MatrixT<Scalar> scores = matrix<Scalar>(4, 2, {0.9, 0.1, 0.6, 0.4, 0.7, 0.5, 0.2, 0.8});
  IndexMatrix token_ids(1, 1);
  MemoryRecorder rec;
  expert_choice_select(token_ids, scores, expert_choice_capacity(4, 2, 1.0), &rec);
  ASSERT_EQ(token_ids.rows(), 2);
  ASSERT_EQ(token_ids.cols(), 2);
  EXPECT_EQ(row_of(token_ids, 0), (Ids{0, 2}));
  EXPECT_EQ(row_of(token_ids, 1), (Ids{3, 2}));

  ASSERT_EQ(rec.size(), 2u);
  EXPECT_EQ(rec.count(events::topk_ids), 0u);  // token ids are never reported as expert ids
  const RecordedEvent ids = rec.last(events::expert_choice_ids);
  EXPECT_EQ(ids.shape, (std::array<std::int64_t, 2>{2, 2}));
  EXPECT_EQ(ids.ids, (Ids{0, 2, 3, 2}));
  EXPECT_EQ(ids.stat("unrouted_tokens"), 1.0);
  EXPECT_EQ(ids.stat("max_experts_per_token"), 2.0);
  const RecordedEvent load = rec.last(events::expert_load);
  EXPECT_EQ(load.shape, (std::array<std::int64_t, 2>{2, 1}));
  EXPECT_EQ(load.values, (std::vector<double>{2, 2}));
  EXPECT_EQ(load.stat("max_over_mean"), 1.0);
  EXPECT_EQ(load.stat("empty_experts"), 0.0);

  // Ties in a column go to the lower token id: a constant column, C = 3 -> [0, 1, 2].
  expert_choice_select(token_ids, matrix<Scalar>(5, 1, {0.5, 0.5, 0.5, 0.5, 0.5}), 3);
  EXPECT_EQ(row_of(token_ids, 0), (Ids{0, 1, 2}));
}

// Every expert takes exactly C distinct tokens, and they are the top C of its column.
TYPED_TEST(Selection, ExpertChoiceTakesTheTopCOfEachColumn) {
  using Scalar = TypeParam;
  Rng rng(41);
  const Index T = 64;
  const Index E = 8;
  MatrixT<Scalar> scores = random_matrix<Scalar>(rng, T, E);
  for (Index t = 0; t < T; t += 5) scores(t, 3) = Scalar(0.25);  // some exact ties
  for (const double factor : {0.5, 1.0, 2.0, 8.0}) {
    const Index C = expert_choice_capacity(T, E, factor);
    EXPECT_EQ(C, std::min<Index>(T, static_cast<Index>(std::ceil(T * factor / E))));
    IndexMatrix token_ids;
    expert_choice_select(token_ids, scores, C);
    ASSERT_EQ(token_ids.rows(), E);
    ASSERT_EQ(token_ids.cols(), C);
    for (Index e = 0; e < E; ++e) {
      std::vector<Scalar> column(static_cast<std::size_t>(T));
      for (Index t = 0; t < T; ++t) column[t] = scores(t, e);
      const Ids got = row_of(token_ids, e);
      EXPECT_EQ(got, stable_top(column, static_cast<std::size_t>(C))) << e;
      EXPECT_EQ(std::set<std::int32_t>(got.begin(), got.end()).size(), static_cast<std::size_t>(C));
    }
  }
}

// ---- hash and table routing --------------------------------------------------------------------

// hash64 = SplitMix64's mixer; hash64(0) = 0xE220A8397B1DCDAF is SplitMix64's well-known first
// output for seed 0. With E = 8, "mod 8" keeps the last 3 bits of the last hex pair:
//   token 0, seed 0:  hash64(0)  = 0x...CDAF, 0xAF = 1010 1111 -> 7
//   token 1, seed 0:  hash64(1)  = 0x910A2DEC89025CC1, 0xC1 = ...001 -> 1
//   token 2, seed 0:  hash64(2)  = 0x975835DE1C9756CE, 0xCE = ...110 -> 6
//   token 3, seed 0:  hash64(3)  = 0x1D0B14E4DB018FED, 0xED = ...101 -> 5
//   token 0, seed 42: hash64(42) = 0xBDD732262FEB6E95, 0x95 = ...101 -> 5
//   token 1, seed 42: hash64(43) = 0xBA69EC90EB4FEF88, 0x88 = ...000 -> 0
TEST(HashSelect, HandWorkedExample) {
  static_assert(hash64(0) == 0xE220A8397B1DCDAFull);
  static_assert(hash64(42) == 0xBDD732262FEB6E95ull);
  const std::vector<std::int32_t> tokens = {0, 1, 2, 3};
  IndexMatrix ids(9, 9);
  hash_select(ids, tokens, 8, 0);
  ASSERT_EQ(ids.rows(), 4);
  ASSERT_EQ(ids.cols(), 1);
  EXPECT_EQ(Ids(ids.data(), ids.data() + 4), (Ids{7, 1, 6, 5}));
  hash_select(ids, std::vector<std::int32_t>{0, 1}, 8, 42);
  EXPECT_EQ(Ids(ids.data(), ids.data() + 2), (Ids{5, 0}));
}

TEST(HashSelect, DeterministicInRangeAndSeeded) {
  std::vector<std::int32_t> tokens(5000);
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = static_cast<std::int32_t>(i * 7919 % 50000);  // 5000 distinct ids, scattered
  }
  const int E = 16;
  IndexMatrix a;
  IndexMatrix b;
  IndexMatrix c;
  hash_select(a, tokens, E, 1234);
  hash_select(b, tokens, E, 1234);
  hash_select(c, tokens, E, 0x9E3779B97F4A7C15ull);
  EXPECT_EQ(a, b);
  EXPECT_GE(a.minCoeff(), 0);
  EXPECT_LT(a.maxCoeff(), E);
  // The same token always goes to the same expert, whatever its position.
  IndexMatrix repeat;
  hash_select(repeat, std::vector<std::int32_t>{tokens[17], tokens[17]}, E, 1234);
  EXPECT_EQ(repeat(0, 0), a(17, 0));
  EXPECT_EQ(repeat(1, 0), a(17, 0));
  // Another seed is another assignment: an independent one agrees on a token with p = 1/16, so
  // ~312 of 5000; fewer than 500 (an 11-sigma margin, sd = sqrt(5000 * 1/16 * 15/16) = 17).
  const auto same = (a.array() == c.array()).count();
  EXPECT_LT(same, 500);
  EXPECT_GT(same, 150);
}

// Balance over the token ids 0..10^5 - 1 with E = 16. If the hash behaves as a uniform random
// map, the counts are multinomial and X = sum_e (n_e - N/E)^2 / (N/E) follows chi^2 with E - 1 =
// 15 degrees of freedom: mean 15, sd sqrt(30) = 5.5, and P(X > 50) = 1.2e-5. The test is
// deterministic (fixed ids and seeds), so the bound only has to be one a good hash passes and a
// biased one fails: an expert with 1% of the tokens too many (1000 of 6250 expected) alone adds
// 1000^2 / 6250 = 160. (Seeds 0 and 1 give the same X: XOR with 1 only swaps ids 2i and 2i + 1,
// which are all in the range; the assignment differs, the histogram does not.)
TEST(HashSelect, RoughlyBalancedOverManyTokenIds) {
  const std::int32_t N = 100000;
  const int E = 16;
  std::vector<std::int32_t> tokens(N);
  std::iota(tokens.begin(), tokens.end(), 0);
  for (const std::uint64_t seed :
       {std::uint64_t{0}, std::uint64_t{12345}, std::uint64_t{0xDEADBEEFCAFE}}) {
    IndexMatrix ids;
    hash_select(ids, tokens, E, seed);
    const std::vector<std::int64_t> load = expert_load(ids, E);
    const double expected = static_cast<double>(N) / E;
    double chi2 = 0;
    for (const std::int64_t n : load) chi2 += (n - expected) * (n - expected) / expected;
    EXPECT_LT(chi2, 50.0) << "seed " << seed;
    EXPECT_GT(*std::min_element(load.begin(), load.end()), 0);
  }
}

// table (V = 5, k = 2) = [[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]], tokens [4, 0, 4, 2]
//   -> ids = [[0, 2], [0, 1], [0, 2], [1, 2]]; load over E = 4: [3, 2, 3, 0].
TEST(TableSelect, HandWorkedExample) {
  IndexMatrix table(5, 2);
  table << 0, 1, 2, 3, 1, 2, 3, 0, 0, 2;
  IndexMatrix ids(1, 1);
  MemoryRecorder rec;
  table_select(ids, std::vector<std::int32_t>{4, 0, 4, 2}, table, 4, &rec);
  ASSERT_EQ(ids.rows(), 4);
  ASSERT_EQ(ids.cols(), 2);
  IndexMatrix expected(4, 2);
  expected << 0, 2, 0, 1, 0, 2, 1, 2;
  EXPECT_EQ(ids, expected);
  EXPECT_EQ(rec.last(events::topk_ids).ids, (Ids{0, 2, 0, 1, 0, 2, 1, 2}));
  EXPECT_EQ(rec.last(events::expert_load).values, (std::vector<double>{3, 2, 3, 0}));
}

TEST(MakeHashTable, RowsAreDistinctAndTheTableIsBalanced) {
  // (V, E, k): rows that straddle two permutations (5 % 3 != 0), k = E, V * k < E, and a big one.
  struct Case {
    Index V;
    int E;
    int k;
  };
  for (const Case c :
       {Case{100, 5, 3}, Case{7, 4, 4}, Case{3, 16, 2}, Case{1000, 64, 6}, Case{257, 8, 1}}) {
    const IndexMatrix table = make_hash_table(c.V, c.E, c.k, 99);
    ASSERT_EQ(table.rows(), c.V);
    ASSERT_EQ(table.cols(), c.k);
    std::vector<std::int64_t> count(static_cast<std::size_t>(c.E), 0);
    for (Index v = 0; v < c.V; ++v) {
      const Ids row = row_of(table, v);
      EXPECT_EQ(std::set<std::int32_t>(row.begin(), row.end()).size(), row.size())
          << "V = " << c.V << ", row " << v;
      for (const std::int32_t e : row) {
        ASSERT_GE(e, 0);
        ASSERT_LT(e, c.E);
        ++count[e];
      }
    }
    // Whole permutations: counts are floor(V k / E) or one more; every expert appears once
    // V k >= E, and none twice before that.
    const std::int64_t total = c.V * c.k;
    const auto [lo, hi] = std::minmax_element(count.begin(), count.end());
    EXPECT_EQ(*lo, total / c.E) << "V = " << c.V;
    EXPECT_LE(*hi - *lo, 1) << "V = " << c.V;
    EXPECT_EQ(std::accumulate(count.begin(), count.end(), std::int64_t{0}), total);
  }
  // Seeded: the same seed gives the same table, another seed another one.
  EXPECT_EQ(make_hash_table(50, 8, 2, 7), make_hash_table(50, 8, 2, 7));
  EXPECT_NE(make_hash_table(50, 8, 2, 7), make_hash_table(50, 8, 2, 8));
  EXPECT_EQ(make_hash_table(0, 8, 2, 7).rows(), 0);

  // A made table drives table_select.
  const IndexMatrix table = make_hash_table(256, 8, 2, 3);
  IndexMatrix ids;
  table_select(ids, std::vector<std::int32_t>{255, 0}, table, 8);
  EXPECT_EQ(row_of(ids, 0), row_of(table, 255));
  EXPECT_EQ(row_of(ids, 1), row_of(table, 0));
}

// ---- expert_load -------------------------------------------------------------------------------

TEST(ExpertLoad, CountsAndSumsToTk) {
  IndexMatrix ids(3, 2);
  ids << 0, 2,  //
      2, 1,     //
      0, 2;
  EXPECT_EQ(expert_load(ids, 4), (std::vector<std::int64_t>{2, 1, 3, 0}));

  Rng rng(51);
  const Matrix scores = random_matrix<float>(rng, 333, 10);
  IndexMatrix topk;
  topk_select(topk, scores, 3);
  const std::vector<std::int64_t> load = expert_load(topk, 10);
  EXPECT_EQ(std::accumulate(load.begin(), load.end(), std::int64_t{0}), 333 * 3);
  EXPECT_EQ(expert_load(IndexMatrix(0, 3), 5), (std::vector<std::int64_t>(5, 0)));
}

// ---- events ------------------------------------------------------------------------------------

// ids = top-2 of 3 tokens over E = 4: [[1, 3], [0, 2], [0, 1]] (the TopK hand-worked scores):
//   load = [2, 2, 1, 1]; mean = 3 * 2 / 4 = 1.5; max_over_mean = 2 / 1.5 = 4/3; no empty expert.
TYPED_TEST(Selection, EmitsTopkIdsAndExpertLoad) {
  using Scalar = TypeParam;
  const MatrixT<Scalar> scores = matrix<Scalar>(3, 4,
                                                {0.125, 0.5, 0.25, 0.375,  //
                                                 0.5, 0.125, 0.5, 0.25,    //
                                                 0.25, 0.25, 0.25, 0.25});
  IndexMatrix ids;
  MemoryRecorder rec;
  topk_select(ids, scores, 2, nullptr, &rec);
  ASSERT_EQ(rec.size(), 2u);
  EXPECT_EQ(rec.events()[0].name, events::topk_ids);
  EXPECT_EQ(rec.events()[1].name, events::expert_load);
  const RecordedEvent topk = rec.last(events::topk_ids);
  EXPECT_EQ(topk.shape, (std::array<std::int64_t, 2>{3, 2}));
  EXPECT_EQ(topk.ids, (Ids{1, 3, 0, 2, 0, 1}));
  EXPECT_TRUE(topk.values.empty());
  const RecordedEvent load = rec.last(events::expert_load);
  EXPECT_EQ(load.shape, (std::array<std::int64_t, 2>{4, 1}));
  EXPECT_EQ(load.values, (std::vector<double>{2, 2, 1, 1}));
  EXPECT_DOUBLE_EQ(load.stat("max_over_mean"), 4.0 / 3.0);
  EXPECT_EQ(load.stat("empty_experts"), 0.0);

  // Group- and device-limited selection report once (device_limited calls group_limited).
  MemoryRecorder rec_group;
  device_limited_select(ids, scores, 2, 2, 1, &rec_group);
  EXPECT_EQ(rec_group.count(events::topk_ids), 1u);
  EXPECT_EQ(rec_group.count(events::expert_load), 1u);
  // Devices [0, 1 | 2, 3], max: rows -> devices 0 ([1, 0]), 0 ([0, 1]), 0 (tie) ([0, 1]).
  EXPECT_EQ(rec_group.last(events::topk_ids).ids, (Ids{1, 0, 0, 1, 0, 1}));
  const RecordedEvent skewed = rec_group.last(events::expert_load);
  EXPECT_EQ(skewed.values, (std::vector<double>{3, 3, 0, 0}));
  EXPECT_DOUBLE_EQ(skewed.stat("max_over_mean"), 2.0);  // 3 / 1.5
  EXPECT_EQ(skewed.stat("empty_experts"), 2.0);

  MemoryRecorder rec_hash;
  hash_select(ids, std::vector<std::int32_t>{0, 1, 2, 3}, 8, 0, &rec_hash);
  EXPECT_EQ(rec_hash.last(events::topk_ids).ids, (Ids{7, 1, 6, 5}));
  EXPECT_EQ(rec_hash.last(events::expert_load).stat("empty_experts"), 4.0);
}

// ---- T = 0 -------------------------------------------------------------------------------------

TYPED_TEST(Selection, NoTokensIsValid) {
  using Scalar = TypeParam;
  const MatrixT<Scalar> scores(0, 8);
  const VectorT<Scalar> bias = VectorT<Scalar>::Zero(8);
  IndexMatrix ids(3, 3);
  MemoryRecorder rec;
  topk_select(ids, scores, 2, &bias, &rec);
  EXPECT_EQ(ids.rows(), 0);
  EXPECT_EQ(ids.cols(), 2);
  const RecordedEvent load = rec.last(events::expert_load);
  EXPECT_EQ(load.values, std::vector<double>(8, 0.0));
  EXPECT_TRUE(std::isnan(load.stat("max_over_mean")));  // a ratio to a mean of nothing
  EXPECT_EQ(load.stat("empty_experts"), 8.0);

  group_limited_select(ids, scores, 2, GroupLimit{.n_group = 4, .topk_group = 2}, &bias);
  EXPECT_EQ(ids.rows(), 0);
  device_limited_select(ids, scores, 2, 4, 2);
  EXPECT_EQ(ids.rows(), 0);
  EXPECT_EQ(expert_choice_capacity(0, 8, 1.25), 0);
  IndexMatrix token_ids(2, 2);
  MemoryRecorder rec_ec;
  expert_choice_select(token_ids, scores, 0, &rec_ec);
  EXPECT_EQ(token_ids.rows(), 8);
  EXPECT_EQ(token_ids.cols(), 0);
  EXPECT_EQ(rec_ec.last(events::expert_choice_ids).stat("unrouted_tokens"), 0.0);
  hash_select(ids, std::span<const std::int32_t>{}, 8, 1);
  EXPECT_EQ(ids.rows(), 0);
  EXPECT_EQ(ids.cols(), 1);
  table_select(ids, std::span<const std::int32_t>{}, make_hash_table(4, 8, 3, 1), 8);
  EXPECT_EQ(ids.rows(), 0);
  EXPECT_EQ(ids.cols(), 3);
}

// float and double choose the same on inputs that both represent exactly.
TEST(SelectionPrecision, FloatAndDoubleAgree) {
  Rng rng(61);
  const Matrix scores = random_matrix<float>(rng, 100, 16);
  const MatrixD scores_d = scores.cast<double>();
  IndexMatrix a;
  IndexMatrix b;
  group_limited_select(a, scores, 4, GroupLimit{.n_group = 4, .topk_group = 2});
  group_limited_select(b, scores_d, 4, GroupLimit{.n_group = 4, .topk_group = 2});
  EXPECT_EQ(a, b);
  expert_choice_select(a, scores, 12);
  expert_choice_select(b, scores_d, 12);
  EXPECT_EQ(a, b);
}

// ---- validation --------------------------------------------------------------------------------

// EXPECT that `f` throws an Error whose message contains each of `parts`.
template <typename F>
void expect_error(F&& f, std::initializer_list<std::string> parts) {
  const std::string message = error_of(f);
  EXPECT_FALSE(message.empty()) << "no error; expected: " << *parts.begin();
  for (const std::string& part : parts) {
    EXPECT_NE(message.find(part), std::string::npos) << "message: " << message;
  }
}

TEST(SelectionErrors, TopK) {
  const Matrix scores = Matrix::Constant(3, 8, 0.5f);
  IndexMatrix ids;
  expect_error([&] { topk_select(ids, scores, 0); }, {"top_k = 0: must be at least 1"});
  expect_error([&] { topk_select(ids, scores, 9); },
               {"top_k = 9: must not exceed num_experts = 8"});
  expect_error([&] { topk_select(ids, Matrix(3, 0), 1); },
               {"scores.cols() = 0: the number of experts E must be at least 1"});
  const Vector short_bias = Vector::Zero(7);
  expect_error([&] { topk_select(ids, scores, 2, &short_bias); },
               {"selection_bias size = 7: must equal num_experts = 8"});
  Vector nan_bias = Vector::Zero(8);
  nan_bias(2) = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { topk_select(ids, scores, 2, &nan_bias); },
               {"selection_bias[2] = nan: must be finite"});
  Matrix bad = scores;
  bad(1, 3) = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { topk_select(ids, bad, 2); }, {"scores[1,3] = nan: must be finite"});
  MatrixD bad_d = MatrixD::Zero(2, 2);
  bad_d(0, 1) = -std::numeric_limits<double>::infinity();
  expect_error([&] { topk_select(ids, bad_d, 1); }, {"scores[0,1] = -inf: must be finite"});
  // Finite scores whose sum overflows are valid.
  topk_select(ids, Matrix(Matrix::Constant(2, 4, 3e38f)), 1);
  EXPECT_EQ(ids(1, 0), 0);
}

TEST(SelectionErrors, GroupLimited) {
  const Matrix scores = Matrix::Constant(2, 8, 0.5f);
  IndexMatrix ids;
  const auto select = [&](int k, GroupLimit limit) {
    return [&, k, limit] { group_limited_select(ids, scores, k, limit); };
  };
  expect_error(select(2, {.n_group = 0, .topk_group = 1}), {"n_group = 0: must be at least 1"});
  expect_error(select(2, {.n_group = -2, .topk_group = 1}), {"n_group = -2: must be at least 1"});
  expect_error(select(2, {.n_group = 3, .topk_group = 1}),
               {"n_group = 3: must divide num_experts = 8"});
  expect_error(select(2, {.n_group = 4, .topk_group = 0}), {"topk_group = 0: must be at least 1"});
  expect_error(select(2, {.n_group = 4, .topk_group = 5}),
               {"topk_group = 5: must not exceed n_group = 4"});
  expect_error(select(5, {.n_group = 4, .topk_group = 2}),
               {"top_k = 5: must not exceed topk_group * (num_experts / n_group) = 2 * 2 = 4, "
                "the experts in the kept groups"});
  expect_error(select(9, {.n_group = 4, .topk_group = 2}),
               {"top_k = 9: must not exceed num_experts = 8"});
  expect_error(select(0, {.n_group = 4, .topk_group = 2}), {"top_k = 0: must be at least 1"});
  expect_error(select(2, {.n_group = 8, .topk_group = 2, .score = GroupScore::top2_sum}),
               {"num_experts / n_group = 1: GroupScore::top2_sum needs at least 2 experts per "
                "group (num_experts = 8, n_group = 8)"});
  // Groups of one are fine when scored by their max.
  group_limited_select(ids, scores, 2, {.n_group = 8, .topk_group = 2, .score = GroupScore::max});
  EXPECT_EQ(row_of(ids, 0), (Ids{0, 1}));

  const Vector bias = Vector::Zero(4);
  expect_error(
      [&] { group_limited_select(ids, scores, 2, {.n_group = 4, .topk_group = 2}, &bias); },
      {"selection_bias size = 4: must equal num_experts = 8"});
  Matrix bad = scores;
  bad(1, 6) = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { group_limited_select(ids, bad, 2, {.n_group = 4, .topk_group = 2}); },
               {"scores[1,6] = nan: must be finite"});
}

TEST(SelectionErrors, DeviceLimited) {
  const MatrixD scores = MatrixD::Constant(2, 8, 0.5);
  IndexMatrix ids;
  expect_error([&] { device_limited_select(ids, scores, 2, 0, 1); },
               {"num_devices = 0: must be at least 1"});
  expect_error([&] { device_limited_select(ids, scores, 2, 3, 1); },
               {"num_devices = 3: must divide num_experts = 8"});
  expect_error([&] { device_limited_select(ids, scores, 2, 4, 0); },
               {"topk_devices = 0: must be at least 1"});
  expect_error([&] { device_limited_select(ids, scores, 2, 4, 5); },
               {"topk_devices = 5: must not exceed num_devices = 4"});
  expect_error([&] { device_limited_select(ids, scores, 5, 4, 2); },
               {"top_k = 5: must not exceed topk_devices * (num_experts / num_devices) = 2 * 2 = "
                "4, the experts in the kept devices"});
  expect_error([&] { device_limited_select(ids, scores, 0, 4, 2); },
               {"top_k = 0: must be at least 1"});
  MatrixD bad = scores;
  bad(0, 7) = kNaN;
  expect_error([&] { device_limited_select(ids, bad, 2, 4, 2); },
               {"scores[0,7] = nan: must be finite"});
}

TEST(SelectionErrors, ExpertChoice) {
  expect_error([] { expert_choice_capacity(-1, 4, 1.0); }, {"tokens = -1: must be non-negative"});
  expect_error([] { expert_choice_capacity(8, 0, 1.0); }, {"num_experts = 0: must be at least 1"});
  expect_error([] { expert_choice_capacity(8, 4, 0.0); },
               {"capacity_factor = 0: must be finite and greater than 0"});
  expect_error([] { expert_choice_capacity(8, 4, -1.5); }, {"capacity_factor = -1.5"});
  expect_error([] { expert_choice_capacity(8, 4, kNaN); }, {"capacity_factor = nan"});
  expect_error([] { expert_choice_capacity(8, 4, std::numeric_limits<double>::infinity()); },
               {"capacity_factor = inf"});

  const Matrix scores = Matrix::Constant(4, 2, 0.5f);
  IndexMatrix token_ids;
  expect_error([&] { expert_choice_select(token_ids, scores, -1); },
               {"capacity = -1: must be non-negative"});
  expect_error([&] { expert_choice_select(token_ids, scores, 5); },
               {"capacity = 5: must not exceed the number of tokens T = 4"});
  expect_error([&] { expert_choice_select(token_ids, Matrix(4, 0), 1); }, {"scores.cols() = 0"});
  Matrix bad = scores;
  bad(3, 0) = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { expert_choice_select(token_ids, bad, 2); },
               {"scores[3,0] = nan: must be finite"});
  expert_choice_select(token_ids, scores, 4);  // C = T: every expert takes every token
  EXPECT_EQ(row_of(token_ids, 1), (Ids{0, 1, 2, 3}));
}

TEST(SelectionErrors, HashAndTable) {
  IndexMatrix ids;
  expect_error([&] { hash_select(ids, std::vector<std::int32_t>{1}, 0, 0); },
               {"num_experts = 0: must be at least 1"});
  expect_error([&] { hash_select(ids, std::vector<std::int32_t>{1}, -3, 0); },
               {"num_experts = -3: must be at least 1"});
  expect_error(
      [&] {
        hash_select(ids, std::vector<std::int32_t>{1, -1}, 8, 0);
      },
      {"token_ids[1] = -1: must be non-negative"});

  IndexMatrix table(5, 2);
  table << 0, 1, 2, 3, 1, 2, 3, 0, 0, 2;
  expect_error([&] { table_select(ids, std::vector<std::int32_t>{5}, table, 4); },
               {"token_ids[0] = 5: must be in [0, V = table.rows() = 5)"});
  expect_error(
      [&] {
        table_select(ids, std::vector<std::int32_t>{0, 1, -2}, table, 4);
      },
      {"token_ids[2] = -2: must be in [0, V = table.rows() = 5)"});
  expect_error([&] { table_select(ids, std::vector<std::int32_t>{0}, table, 3); },
               {"table[1,1] = 3: must be in [0, num_experts = 3)"});
  expect_error([&] { table_select(ids, std::vector<std::int32_t>{0}, table, 0); },
               {"num_experts = 0: must be at least 1"});
  IndexMatrix negative = table;
  negative(4, 0) = -1;
  expect_error([&] { table_select(ids, std::vector<std::int32_t>{0}, negative, 4); },
               {"table[4,0] = -1: must be in [0, num_experts = 4)"});
  IndexMatrix repeated = table;
  repeated(2, 1) = 1;
  expect_error([&] { table_select(ids, std::vector<std::int32_t>{0}, repeated, 4); },
               {"table[2,1] = 1: repeats table[2,0]; the experts of a row must be distinct"});
  expect_error([&] { table_select(ids, std::vector<std::int32_t>{0}, IndexMatrix(5, 0), 4); },
               {"table.cols() = 0: k, the experts per token, must be at least 1"});

  expect_error([] { make_hash_table(-1, 8, 2, 0); }, {"vocab_size = -1: must be non-negative"});
  expect_error([] { make_hash_table(10, 0, 2, 0); }, {"num_experts = 0: must be at least 1"});
  expect_error([] { make_hash_table(10, 8, 0, 0); }, {"top_k = 0: must be at least 1"});
  expect_error([] { make_hash_table(10, 8, 9, 0); },
               {"top_k = 9: must not exceed num_experts = 8"});
}

TEST(SelectionErrors, ExpertLoad) {
  IndexMatrix ids(2, 2);
  ids << 0, 1, 4, 2;
  expect_error([&] { expert_load(ids, 4); }, {"ids[1,0] = 4: must be in [0, num_experts = 4)"});
  ids(1, 0) = -1;
  expect_error([&] { expert_load(ids, 4); }, {"ids[1,0] = -1: must be in [0, num_experts = 4)"});
  expect_error([&] { expert_load(ids, 0); }, {"num_experts = 0: must be at least 1"});
}

}  // namespace
}  // namespace moelab
