// Tests of the scoring stage (softmax forward and backward). T = tokens, E = experts.
#include "reference/error.h"
#include "tests/testing.h"
#include "reference/recorder.h"
#include "reference/scoring.h"
#include "reference/types.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>
#include <random>
#include <string>

namespace moelab {
namespace {

template <typename Scalar>
MatrixT<Scalar> random_matrix(Index rows, Index cols, double scale, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, scale);
  MatrixT<Scalar> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(normal(rng));
  return m;
}

using moelab::testing::error_of;

// logits [1, 2, 3]: subtract the max -> [-2, -1, 0]; exp -> [e^-2, e^-1, 1]
//   = [0.1353352832366127, 0.36787944117144233, 1]; sum = 1.5032147244080551;
//   probs = [0.09003057317038046, 0.24472847105479764, 0.6652409557748218].
// Entropy -sum p ln p = 0.8323955818399389 nats (ln 3 = 1.0986 would be uniform).
constexpr double kP[] = {0.09003057317038046, 0.24472847105479764, 0.6652409557748218};
constexpr double kEntropy = 0.8323955818399389;

TEST(Softmax, HandWorkedExample) {
  MatrixD logits_d(1, 3);
  logits_d << 1.0, 2.0, 3.0;
  MatrixD probs_d;
  softmax_forward(probs_d, logits_d);
  ASSERT_EQ(probs_d.rows(), 1);
  ASSERT_EQ(probs_d.cols(), 3);
  for (int e = 0; e < 3; ++e) EXPECT_NEAR(probs_d(0, e), kP[e], 4e-16);  // a few double ulps

  // float: each step rounds once or twice, so a few float ulps (2^-24 ~ 6e-8 at 1).
  Matrix logits(1, 3);
  logits << 1.0f, 2.0f, 3.0f;
  Matrix probs(5, 5);  // wrong size on purpose: it is resized
  softmax_forward(probs, logits);
  ASSERT_EQ(probs.rows(), 1);
  ASSERT_EQ(probs.cols(), 3);
  for (int e = 0; e < 3; ++e) EXPECT_NEAR(probs(0, e), kP[e], 2e-7);
}

TEST(Softmax, RowsSumToOne) {
  const Matrix logits = random_matrix<float>(64, 16, 5.0, 1);
  Matrix probs;
  softmax_forward(probs, logits);
  for (Index t = 0; t < probs.rows(); ++t) {
    EXPECT_NEAR(probs.row(t).sum(), 1.0f, 16 * std::numeric_limits<float>::epsilon()) << t;
    EXPECT_GE(probs.row(t).minCoeff(), 0.0f);
  }
  const MatrixD logits_d = random_matrix<double>(64, 16, 5.0, 2);
  MatrixD probs_d;
  softmax_forward(probs_d, logits_d);
  for (Index t = 0; t < probs_d.rows(); ++t) {
    EXPECT_NEAR(probs_d.row(t).sum(), 1.0, 16 * std::numeric_limits<double>::epsilon()) << t;
  }
}

TEST(Softmax, InvariantToAddingAConstant) {
  // Small integers and a power-of-two shift: l + c and (l + c) - max are exact in float, so the
  // result must be bitwise the same.
  Matrix logits(3, 4);
  logits << 1, -2, 3, 0,  //
      -7, -7, -7, -7,     //
      12, 5, -3, 8;
  const Matrix shifted = (logits.array() + 1024.0f).matrix();
  Matrix probs;
  Matrix probs_shifted;
  softmax_forward(probs, logits);
  softmax_forward(probs_shifted, shifted);
  for (Index i = 0; i < probs.size(); ++i) {
    EXPECT_EQ(std::bit_cast<std::uint32_t>(probs.data()[i]),
              std::bit_cast<std::uint32_t>(probs_shifted.data()[i]))
        << i;
  }
  for (int e = 0; e < 4; ++e) EXPECT_EQ(probs(1, e), 0.25f);  // equal logits: uniform

  // Random logits and shift in double: equal up to the rounding of l + c (|c| ~ 100 -> ~1e-14).
  const MatrixD logits_d = random_matrix<double>(8, 6, 3.0, 3);
  const MatrixD shifted_d = (logits_d.array() + 123.456).matrix();
  MatrixD probs_d;
  MatrixD probs_shifted_d;
  softmax_forward(probs_d, logits_d);
  softmax_forward(probs_shifted_d, shifted_d);
  EXPECT_LT((probs_d - probs_shifted_d).cwiseAbs().maxCoeff(), 1e-12);
}

TEST(Softmax, LargeLogitsDoNotOverflow) {
  // exp(1000) overflows even double; with the max subtracted: [1, e^-1] / (1 + e^-1).
  Matrix logits(3, 2);
  logits << 1000.0f, 999.0f,  //
      -1000.0f, 0.0f,         //
      3e38f, -3e38f;          // l - max = -6e38 -> -inf in float -> exp = 0
  Matrix probs;
  softmax_forward(probs, logits);
  EXPECT_TRUE(probs.allFinite());
  EXPECT_NEAR(probs(0, 0), 0.7310585786300049, 1e-7);
  EXPECT_NEAR(probs(0, 1), 0.2689414213699951, 1e-7);
  EXPECT_EQ(probs(1, 0), 0.0f);  // e^-1000 underflows to 0, which is the right float answer
  EXPECT_EQ(probs(1, 1), 1.0f);
  EXPECT_EQ(probs(2, 0), 1.0f);
  EXPECT_EQ(probs(2, 1), 0.0f);

  // Finite logits whose sum overflows (the input screen's sum is inf) are still valid input.
  Matrix huge(2, 2);
  huge << 3e38f, 3e38f,  //
      3e38f, 2e38f;
  softmax_forward(probs, huge);
  EXPECT_EQ(probs(0, 0), 0.5f);
  EXPECT_EQ(probs(0, 1), 0.5f);
  EXPECT_EQ(probs(1, 0), 1.0f);  // e^(-1e38) = 0
  EXPECT_EQ(probs(1, 1), 0.0f);
}

// d/dlogits of L = sum(dprobs .* softmax(logits)), compared with central differences.
// Tolerance: with h = 1e-6 the truncation error is ~h^2 |L'''| / 6 ~ 1e-13, and the rounding
// error ~eps |L| / h ~ 2e-16 * 1 / 1e-6 = 2e-10 per entry, against entries of size ~0.1-1: a
// relative error (in the 2-norm) of ~1e-9. 1e-7 leaves a 100x margin; a wrong formula (missing
// the row-sum term, a sign) gives an error of order 1.
TEST(Softmax, BackwardMatchesFiniteDifferences) {
  const Index T = 5;
  const Index E = 7;
  const MatrixD logits = random_matrix<double>(T, E, 2.0, 4);
  const MatrixD dprobs = random_matrix<double>(T, E, 1.0, 5);
  MatrixD probs;
  softmax_forward(probs, logits);
  MatrixD dlogits;
  softmax_backward(dlogits, probs, dprobs);
  ASSERT_EQ(dlogits.rows(), T);
  ASSERT_EQ(dlogits.cols(), E);

  const auto loss = [&](const MatrixD& l) {
    MatrixD p;
    softmax_forward(p, l);
    return p.cwiseProduct(dprobs).sum();
  };
  const double h = 1e-6;
  MatrixD numeric(T, E);
  for (Index i = 0; i < logits.size(); ++i) {
    MatrixD plus = logits;
    MatrixD minus = logits;
    plus.data()[i] += h;
    minus.data()[i] -= h;
    numeric.data()[i] = (loss(plus) - loss(minus)) / (2 * h);
  }
  const double relative = (numeric - dlogits).norm() / dlogits.norm();
  EXPECT_LT(relative, 1e-7) << "numeric:\n" << numeric << "\nanalytic:\n" << dlogits;
  EXPECT_GT(dlogits.norm(), 0.1);  // not a vacuous comparison

  // Adding a constant to a row changes nothing, so each row of the gradient sums to zero.
  for (Index t = 0; t < T; ++t) EXPECT_NEAR(dlogits.row(t).sum(), 0.0, 1e-15);
}

TEST(Softmax, BackwardFloatAgreesWithDouble) {
  const MatrixD logits_d = random_matrix<double>(4, 8, 2.0, 6);
  const MatrixD dprobs_d = random_matrix<double>(4, 8, 1.0, 7);
  MatrixD probs_d;
  MatrixD dlogits_d;
  softmax_forward(probs_d, logits_d);
  softmax_backward(dlogits_d, probs_d, dprobs_d);
  const Matrix logits = logits_d.cast<float>();
  const Matrix dprobs = dprobs_d.cast<float>();
  Matrix probs;
  Matrix dlogits;
  softmax_forward(probs, logits);
  softmax_backward(dlogits, probs, dprobs);
  // The float inputs are the double ones rounded (rel. 6e-8); E = 8 terms per dot product.
  EXPECT_LT((dlogits.cast<double>() - dlogits_d).cwiseAbs().maxCoeff(), 1e-6);
}

TEST(Softmax, EmitsTheScoresEvent) {
  Matrix logits(2, 3);
  logits << 1, 2, 3,  //
      3, 2, 1;
  Matrix probs;
  MemoryRecorder rec;
  softmax_forward(probs, logits, &rec);
  ASSERT_EQ(rec.size(), 1u);
  const RecordedEvent e = rec.last(events::scores);
  EXPECT_EQ(e.shape, (std::array<std::int64_t, 2>{2, 3}));
  ASSERT_EQ(e.values.size(), 6u);
  for (Index i = 0; i < probs.size(); ++i) {
    EXPECT_EQ(e.values[static_cast<std::size_t>(i)], static_cast<double>(probs.data()[i])) << i;
  }
  EXPECT_TRUE(e.ids.empty());
  EXPECT_EQ(e.layer, -1);
  EXPECT_EQ(e.step, -1);
  // Both rows are permutations of the hand-worked example.
  EXPECT_NEAR(e.stat("min"), kP[0], 2e-7);
  EXPECT_NEAR(e.stat("max"), kP[2], 2e-7);
  EXPECT_NEAR(e.stat("max_prob_mean"), kP[2], 2e-7);
  EXPECT_NEAR(e.stat("entropy_mean"), kEntropy, 1e-6);

  // The double version reports double values, exactly.
  MatrixD logits_d(1, 3);
  logits_d << 1, 2, 3;
  MatrixD probs_d;
  MemoryRecorder rec_d;
  softmax_forward(probs_d, logits_d, &rec_d);
  const RecordedEvent ed = rec_d.last(events::scores);
  ASSERT_EQ(ed.values.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(ed.values[i], probs_d(0, i));
  EXPECT_NEAR(ed.stat("entropy_mean"), kEntropy, 1e-15);
}

TEST(Softmax, BadInputsNameTheField) {
  Matrix logits = Matrix::Zero(5, 4);
  Matrix probs;
  logits(3, 1) = std::numeric_limits<float>::quiet_NaN();
  std::string message = error_of([&] { softmax_forward(probs, logits); });
  EXPECT_NE(message.find("logits[3,1] = nan"), std::string::npos) << message;
  EXPECT_NE(message.find("must be finite"), std::string::npos) << message;

  logits(3, 1) = 0.0f;
  logits(4, 3) = std::numeric_limits<float>::infinity();
  message = error_of([&] { softmax_forward(probs, logits); });
  EXPECT_NE(message.find("logits[4,3] = inf"), std::string::npos) << message;

  MatrixD logits_d = MatrixD::Zero(2, 2);
  logits_d(0, 0) = -std::numeric_limits<double>::infinity();
  MatrixD probs_d;
  message = error_of([&] { softmax_forward(probs_d, logits_d); });
  EXPECT_NE(message.find("logits[0,0] = -inf"), std::string::npos) << message;

  message = error_of([&] { softmax_forward(probs, Matrix(3, 0)); });
  EXPECT_NE(message.find("logits.cols() = 0"), std::string::npos) << message;

  Matrix dlogits;
  message = error_of([&] { softmax_backward(dlogits, Matrix(2, 3), Matrix(2, 4)); });
  EXPECT_NE(message.find("dprobs shape = (2, 4)"), std::string::npos) << message;
  EXPECT_NE(message.find("(2, 3)"), std::string::npos) << message;
}

TEST(Softmax, NoTokensIsValid) {
  const Matrix logits(0, 8);
  Matrix probs(3, 3);
  MemoryRecorder rec;
  softmax_forward(probs, logits, &rec);
  EXPECT_EQ(probs.rows(), 0);
  EXPECT_EQ(probs.cols(), 8);
  const RecordedEvent e = rec.last(events::scores);
  EXPECT_EQ(e.shape, (std::array<std::int64_t, 2>{0, 8}));
  EXPECT_TRUE(e.values.empty());
  EXPECT_TRUE(std::isnan(e.stat("entropy_mean")));  // a mean over no tokens

  Matrix dlogits(2, 2);
  softmax_backward(dlogits, probs, Matrix(0, 8));
  EXPECT_EQ(dlogits.rows(), 0);
  EXPECT_EQ(dlogits.cols(), 8);
}

}  // namespace
}  // namespace moelab
