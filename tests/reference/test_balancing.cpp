// Tests of the auxiliary-loss-free bias update (reference/balancing.h). T = tokens, E = experts,
// k = experts per token.
#include "reference/balancing.h"

#include "reference/error.h"
#include "reference/random.h"
#include "reference/recorder.h"
#include "reference/types.h"
#include "tests/testing.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

namespace moelab {
namespace {

using moelab::testing::error_of;
using moelab::testing::random_matrix;

void expect_message(const std::string& message, std::initializer_list<std::string_view> parts) {
  EXPECT_FALSE(message.empty()) << "no moelab::Error thrown";
  for (const std::string_view part : parts) {
    EXPECT_NE(message.find(part), std::string::npos)
        << "missing \"" << part << "\" in: " << message;
  }
}

template <typename Scalar>
VectorT<Scalar> vec(std::initializer_list<Scalar> values) {
  VectorT<Scalar> v(static_cast<Index>(values.size()));
  Index i = 0;
  for (const Scalar x : values) v(i++) = x;
  return v;
}

// mean = 20 / 4 = 5: loads [10 2 5 3] -> sign(mean - load) = [-1 +1 0 +1]. gamma = 1/8 is exact in
// binary, so the results are exact in float and double alike.
template <typename Scalar>
void check_sign_semantics() {
  BiasBalancerT<Scalar> balancer{.bias = VectorT<Scalar>::Zero(4), .gamma = 0.125};
  const std::vector<std::int64_t> load{10, 2, 5, 3};
  balancer.update(load);
  EXPECT_EQ(balancer.bias, vec<Scalar>({-0.125, 0.125, 0.0, 0.125}));
  // mean = 8 / 4 = 2: [1 1 1 5] -> [+1 +1 +1 -1]; the updates accumulate.
  const std::vector<std::int64_t> second{1, 1, 1, 5};
  balancer.update(second);
  EXPECT_EQ(balancer.bias, vec<Scalar>({0.0, 0.25, 0.125, 0.0}));
}

TEST(BiasBalancer, SignSemantics) {
  check_sign_semantics<float>();
  check_sign_semantics<double>();
}

// The sign is decided in integers: mean = 4/3 is not representable, but [1 1 2] still gives
// exactly [+1 +1 -1], and a load equal to a fractional mean cannot occur.
TEST(BiasBalancer, NonIntegerMean) {
  BiasBalancerD balancer{.bias = VectorT<double>::Zero(3), .gamma = 0.5};
  const std::vector<std::int64_t> load{1, 1, 2};
  balancer.update(load);
  EXPECT_EQ(balancer.bias, vec<double>({0.5, 0.5, -0.5}));
  BiasBalancerD pair{.bias = VectorT<double>::Zero(2), .gamma = 0.5};
  const std::vector<std::int64_t> two{1, 2};  // mean 1.5
  pair.update(two);
  EXPECT_EQ(pair.bias, vec<double>({0.5, -0.5}));
}

// sign(0) = 0: equal loads (and all-zero loads, and gamma = 0) leave the bias bitwise unchanged.
TEST(BiasBalancer, EqualLoadsLeaveTheBiasUnchanged) {
  Rng rng(5);
  const Vector start = random_matrix<float>(rng, 6, 1, 0.1);
  BiasBalancer balancer{.bias = start, .gamma = 0.001};
  const std::vector<std::int64_t> equal(6, 7);
  const std::vector<std::int64_t> zero(6, 0);
  const std::vector<std::int64_t> skewed{1, 2, 3, 4, 5, 6};
  balancer.update(equal);
  balancer.update(zero);
  balancer.gamma = 0.0;
  balancer.update(skewed);
  for (Index i = 0; i < 6; ++i) {
    EXPECT_EQ(std::bit_cast<std::uint32_t>(balancer.bias(i)),
              std::bit_cast<std::uint32_t>(start(i)))
        << i;
  }
}

TEST(BiasBalancer, EmitsTheBiasEvent) {
  BiasBalancer balancer{.bias = Vector::Zero(4), .gamma = 0.125};
  MemoryRecorder rec;
  const std::vector<std::int64_t> load{10, 2, 5, 3};
  balancer.update(load, &rec);
  ASSERT_EQ(rec.size(), 1u);
  const RecordedEvent e = rec.last(events::bias);
  EXPECT_EQ(e.shape, (std::array<std::int64_t, 2>{4, 1}));
  EXPECT_EQ(e.values, (std::vector<double>{-0.125, 0.125, 0.0, 0.125}));  // after the update
  EXPECT_EQ(e.stat("max_abs_bias"), 0.125);
  EXPECT_EQ(e.stat("load_imbalance"), 2.0);  // max 10 / mean 5, before the update
  EXPECT_EQ(e.stat("max_load"), 10.0);
  EXPECT_EQ(e.stat("mean_load"), 5.0);

  const std::vector<std::int64_t> zero(4, 0);
  balancer.update(zero, &rec);
  EXPECT_TRUE(std::isnan(rec.last(events::bias).stat("load_imbalance")));  // 0 / 0

  BiasBalancerD balancer_d{.bias = VectorT<double>::Zero(2), .gamma = 0.1};
  MemoryRecorder rec_d;
  const std::vector<std::int64_t> two{3, 1};
  balancer_d.update(two, &rec_d);
  EXPECT_EQ(rec_d.last(events::bias).values, (std::vector<double>{-0.1, 0.1}));  // exactly
  EXPECT_EQ(rec_d.last(events::bias).stat("load_imbalance"), 1.5);
}

// ---- a simulation of aux-loss-free balancing ---------------------------------------------------

// The k largest of scores + bias per token, ties to the lower expert id (the selection stage's
// rule, written inline here so that this test does not depend on it).   (T, k)
IndexMatrix top_k(const Matrix& scores, const Vector& bias, Index k) {
  IndexMatrix ids(scores.rows(), k);
  std::vector<char> taken(static_cast<std::size_t>(scores.cols()));
  for (Index t = 0; t < scores.rows(); ++t) {
    std::fill(taken.begin(), taken.end(), 0);
    for (Index j = 0; j < k; ++j) {
      Index best = -1;
      for (Index e = 0; e < scores.cols(); ++e) {
        if (taken[static_cast<std::size_t>(e)]) continue;
        // strictly greater: on a tie the lower id, seen first, stays
        if (best < 0 || scores(t, e) + bias(e) > scores(t, best) + bias(best)) best = e;
      }
      taken[static_cast<std::size_t>(best)] = 1;
      ids(t, j) = static_cast<std::int32_t>(best);
    }
  }
  return ids;
}

// DeepSeek-V3's gates: the *unbiased* sigmoid scores of the selected experts, renormalised.
Matrix gates_of(const Matrix& scores, const IndexMatrix& ids) {
  Matrix gates(ids.rows(), ids.cols());
  for (Index t = 0; t < ids.rows(); ++t) {
    float sum = 0.0f;
    for (Index j = 0; j < ids.cols(); ++j) sum += scores(t, ids(t, j));
    for (Index j = 0; j < ids.cols(); ++j) gates(t, j) = scores(t, ids(t, j)) / sum;
  }
  return gates;
}

std::vector<std::int64_t> loads_of(const IndexMatrix& ids, Index E) {
  std::vector<std::int64_t> load(static_cast<std::size_t>(E), 0);
  for (Index i = 0; i < ids.size(); ++i) ++load[static_cast<std::size_t>(ids.data()[i])];
  return load;
}

double imbalance_of(const std::vector<std::int64_t>& load, Index assignments) {
  const double mean = static_cast<double>(assignments) / static_cast<double>(load.size());
  return static_cast<double>(*std::max_element(load.begin(), load.end())) / mean;
}

// Fixed, skewed sigmoid scores (the router does not learn here: only the bias moves). Expert 7's
// logits are 2 higher than expert 0's, so without a bias the loads are [13 41 56 68 130 188 252
// 276] of 1024 assignments: max / mean = 276 / 128 = 2.16. With gamma = 0.01 the bias settles
// within a few dozen steps into a 2-cycle whose loads stay within 10% of the mean (max / mean
// 1.055 and 1.094).
TEST(BiasBalancer, DrivesASkewedLoadTowardsBalance) {
  const Index T = 512, E = 8, k = 2;
  Rng rng(3);
  Matrix logits = random_matrix<float>(rng, T, E);
  for (Index e = 0; e < E; ++e) {
    logits.col(e).array() += 2.0f * (static_cast<float>(e) / static_cast<float>(E - 1) - 0.5f);
  }
  const Matrix scores = (1.0f / (1.0f + (-logits.array()).exp())).matrix();  // (T, E)

  const IndexMatrix unbiased_ids = top_k(scores, Vector::Zero(E), k);
  const Matrix unbiased_gates = gates_of(scores, unbiased_ids);
  const double initial = imbalance_of(loads_of(unbiased_ids, E), T * k);
  EXPECT_GT(initial, 2.0);

  BiasBalancer balancer{.bias = Vector::Zero(E), .gamma = 0.01};
  double worst_late = 0.0;  // max over the last 100 steps
  Index rerouted = 0;       // tokens whose selection the bias changed, at the last step
  for (int step = 0; step < 300; ++step) {
    const IndexMatrix ids = top_k(scores, balancer.bias, k);
    const Matrix gates = gates_of(scores, ids);
    // The bias changes which experts are chosen, never the gate of a chosen expert: a token whose
    // selection is unchanged has bitwise the gates it had without any bias, and every gate is the
    // unbiased score renormalised (never scores + bias).
    rerouted = 0;
    for (Index t = 0; t < T; ++t) {
      if (ids.row(t) == unbiased_ids.row(t)) {
        for (Index j = 0; j < k; ++j) {
          ASSERT_EQ(std::bit_cast<std::uint32_t>(gates(t, j)),
                    std::bit_cast<std::uint32_t>(unbiased_gates(t, j)))
              << "step " << step << " token " << t;
        }
      } else {
        ++rerouted;
      }
      ASSERT_NEAR(gates.row(t).sum(), 1.0f, 1e-6f);
    }
    const std::vector<std::int64_t> load = loads_of(ids, E);
    if (step >= 200) worst_late = std::max(worst_late, imbalance_of(load, T * k));
    balancer.update(load);
  }
  EXPECT_LT(worst_late, 1.1) << "initial " << initial;
  EXPECT_GT(rerouted, T / 10);  // the bias did act: the gate check above was not vacuous
  // The favoured experts (high ids) end with a negative bias, the neglected ones positive.
  EXPECT_GT(balancer.bias(0), 0.0f);
  EXPECT_LT(balancer.bias(E - 1), 0.0f);
}

// ---- validation --------------------------------------------------------------------------------

TEST(BiasBalancer, BadInputsNameTheField) {
  BiasBalancer balancer{.bias = Vector::Zero(3), .gamma = 0.001};
  const std::vector<std::int64_t> two{1, 2};
  expect_message(error_of([&] { balancer.update(two); }),
                 {"load.size() = 2: must equal bias.size() = 3 (one token count per expert)"});
  const std::vector<std::int64_t> negative{1, -4, 2};
  expect_message(error_of([&] { balancer.update(negative); }),
                 {"load[1] = -4: token counts must be >= 0"});
  const std::vector<std::int64_t> load{1, 2, 3};
  balancer.gamma = -0.001;
  expect_message(error_of([&] { balancer.update(load); }),
                 {"gamma = -0.001: must be finite and >= 0"});
  balancer.gamma = std::numeric_limits<double>::quiet_NaN();
  expect_message(error_of([&] { balancer.update(load); }),
                 {"gamma = nan: must be finite and >= 0"});
  balancer.gamma = 0.001;
  balancer.bias(2) = std::numeric_limits<float>::infinity();
  expect_message(error_of([&] { balancer.update(load); }), {"bias[2] = inf: must be finite"});

  BiasBalancer empty{};
  const std::vector<std::int64_t> none;
  expect_message(error_of([&] { empty.update(none); }),
                 {"bias.size() = 0: the bias needs one entry per expert (E >= 1)"});
}

}  // namespace
}  // namespace moelab
