// Tests of the dense transformer pieces (reference/transformer.h): embedding, RMSNorm, RoPE, the
// linear projection, causal multi-head attention and cross-entropy; each backward by finite
// differences in double, hand-worked values from the papers' formulas, invariants (causality,
// RoPE's relative positions), a composition of all of them, and every Error.
// B = batch, T = sequence length, N = B*T, C = hidden size, V = vocabulary, H = heads, D = head dim.
#include "reference/error.h"
#include "reference/random.h"
#include "reference/transformer.h"
#include "reference/types.h"
#include "tests/testing.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <string>
#include <vector>

namespace moelab {
namespace {

using moelab::testing::bitwise_equal;
using moelab::testing::error_of;
using moelab::testing::max_relative_error;
using moelab::testing::numerical_gradient;
using moelab::testing::random_matrix;

using VectorD = VectorT<double>;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// Central differences in double (tests/testing.h): truncation O(h^2) and rounding O(eps / h) are
// both ~1e-10 relative at h = 1e-5, so 1e-7 leaves three orders of margin, while a wrong term in a
// backward (a missing factor, a wrong sign, a transposed weight) is an O(1) error.
constexpr double kGradientTolerance = 1e-7;

// sum(dy * y): its gradient with respect to y is dy, so d/dinput = the backward of dy.
double dot(const MatrixD& a, const MatrixD& b) { return a.cwiseProduct(b).sum(); }

std::vector<std::int32_t> random_ids(Rng& rng, std::size_t n, std::int32_t vocab_size) {
  std::vector<std::int32_t> ids(n);
  for (std::int32_t& id : ids) id = static_cast<std::int32_t>(rng.next_u64() % static_cast<std::uint64_t>(vocab_size));
  return ids;
}

AttentionConfig attention_config(Index C, Index H, double theta = 10000.0) {
  return AttentionConfig{.hidden_size = C, .n_heads = H, .n_kv_heads = 0, .rope_theta = theta};
}

AttentionParamsT<double> random_attention(Rng& rng, Index C, double sigma) {
  return {.q_proj = random_matrix(rng, C, C, sigma), .k_proj = random_matrix(rng, C, C, sigma),
          .v_proj = random_matrix(rng, C, C, sigma), .o_proj = random_matrix(rng, C, C, sigma)};
}

MatrixD attention(const MatrixD& x, const AttentionParamsT<double>& params, const AttentionConfig& config, Index B,
                  Index T) {
  MatrixD y;
  AttentionCacheT<double> cache;
  attention_forward(y, cache, x, params, config, B, T);
  return y;
}

// --- 1. embedding ------------------------------------------------------------------------------------

TEST(Embedding, ForwardGathersRows) {
  const MatrixD wte{{1, 2}, {3, 4}, {5, 6}};  // (V = 3, C = 2)
  const std::vector<std::int32_t> ids = {2, 0, 2, 1};
  MatrixD x;
  embedding_forward(x, ids, wte);
  EXPECT_EQ(x, (MatrixD{{5, 6}, {1, 2}, {5, 6}, {3, 4}}));
}

TEST(Embedding, BackwardScatterAddsAndMatchesFiniteDifferences) {
  // Hand: id 2 appears twice, so its row gets both rows of dx; id 1 never appears: zeros.
  const MatrixD dx{{1, 2}, {10, 20}, {100, 200}};
  MatrixD dwte;
  embedding_backward(dwte, dx, std::vector<std::int32_t>{2, 0, 2}, 3);
  EXPECT_EQ(dwte, (MatrixD{{10, 20}, {0, 0}, {101, 202}}));

  Rng rng(1);
  const Index V = 7;
  const Index C = 5;
  MatrixD wte = random_matrix(rng, V, C);
  const std::vector<std::int32_t> ids = {3, 0, 3, 6, 1, 3, 0, 5};  // 2 and 4 unused
  const MatrixD dy = random_matrix(rng, static_cast<Index>(ids.size()), C);
  const auto loss = [&] {
    MatrixD x;
    embedding_forward(x, ids, wte);
    return dot(dy, x);
  };
  MatrixD grad;
  embedding_backward(grad, dy, ids, V);
  EXPECT_LT(max_relative_error(grad, numerical_gradient(loss, wte)), kGradientTolerance);
  EXPECT_EQ(grad.row(2), MatrixD(MatrixD::Zero(1, C)));
}

TEST(Embedding, IdsOutOfRangeAreErrors) {
  const MatrixD wte = MatrixD::Ones(4, 2);
  MatrixD x;
  EXPECT_EQ(error_of([&] { embedding_forward(x, std::vector<std::int32_t>{0, -1, 2}, wte); }),
            "ids[1] = -1: must be in [0, vocab_size = 4)");
  EXPECT_EQ(error_of([&] { embedding_forward(x, std::vector<std::int32_t>{0, 1, 2, 4}, wte); }),
            "ids[3] = 4: must be in [0, vocab_size = 4)");
  MatrixD dwte;
  const MatrixD dx2 = MatrixD::Ones(2, 2);
  const MatrixD dx3 = MatrixD::Ones(3, 2);
  EXPECT_EQ(error_of([&] { embedding_backward(dwte, dx2, std::vector<std::int32_t>{0, 9}, 4); }),
            "ids[1] = 9: must be in [0, vocab_size = 4)");
  EXPECT_EQ(error_of([&] { embedding_backward(dwte, dx3, std::vector<std::int32_t>{0, 1}, 4); }),
            "dx.rows() = 3: must equal the number of ids = 2");
  EXPECT_EQ(error_of([&] { embedding_backward(dwte, MatrixD(0, 2), std::vector<std::int32_t>{}, 0); }),
            "vocab_size = 0: must be positive");
}

// --- 2. RMSNorm --------------------------------------------------------------------------------------

TEST(RMSNorm, HandWorked) {
  // [3, 4]: mean of squares (9 + 16) / 2 = 12.5, y = [3, 4] / sqrt(12.5) = [0.8485..., 1.1313...].
  // eps = 1e-30 stands for 0 (validate wants eps > 0): 12.5 + 1e-30 is 12.5 in double.
  const MatrixD x{{3, 4}};
  MatrixD y;
  RMSNormCacheT<double> cache;
  rmsnorm_forward(y, cache, x, VectorD(VectorD::Ones(2)), RMSNormConfig{.eps = 1e-30});
  EXPECT_NEAR(y(0, 0), 0.848528137423857, 1e-15);
  EXPECT_NEAR(y(0, 1), 1.131370849898476, 1e-15);
  EXPECT_EQ(cache.inv_rms(0), 1 / std::sqrt(12.5));
  // The weight scales each feature: [2, -0.5] * y.
  rmsnorm_forward(y, cache, x, VectorD{{2, -0.5}}, RMSNormConfig{.eps = 1e-30});
  EXPECT_NEAR(y(0, 0), 2 * 0.848528137423857, 2e-15);
  EXPECT_NEAR(y(0, 1), -0.5 * 1.131370849898476, 1e-15);
  // eps inside the square root: 1 / sqrt(12.5 + 0.5) = 1 / sqrt(13).
  rmsnorm_forward(y, cache, x, VectorD(VectorD::Ones(2)), RMSNormConfig{.eps = 0.5});
  EXPECT_NEAR(y(0, 0), 3 / std::sqrt(13.0), 1e-15);
  // Each row on its own; an all-zero row gives 0 (eps > 0), not NaN.
  rmsnorm_forward(y, cache, MatrixD{{3, 4}, {0, 0}, {-6, 8}}, VectorD(VectorD::Ones(2)), RMSNormConfig{});
  EXPECT_EQ(y.row(1), MatrixD(MatrixD::Zero(1, 2)));
  EXPECT_NEAR(y(2, 0), -6 / std::sqrt(50 + 1e-5), 1e-15);
  EXPECT_NEAR(y(0, 1), 4 / std::sqrt(12.5 + 1e-5), 1e-15);
}

TEST(RMSNorm, BackwardMatchesFiniteDifferences) {
  Rng rng(2);
  const Index N = 5;
  const Index C = 6;
  // eps = 0.3 on rows of mean square ~1: the eps term is not negligible, so it is checked too.
  for (const double eps : {1e-5, 0.3}) {
    const RMSNormConfig config{.eps = eps};
    MatrixD x = random_matrix(rng, N, C);
    MatrixD w = random_matrix(rng, C, 1);  // the weight as a (C, 1) matrix for numerical_gradient
    const MatrixD dy = random_matrix(rng, N, C);
    const auto loss = [&] {
      MatrixD y;
      RMSNormCacheT<double> cache;
      rmsnorm_forward(y, cache, x, VectorD(w.col(0)), config);
      return dot(dy, y);
    };
    MatrixD y;
    RMSNormCacheT<double> cache;
    rmsnorm_forward(y, cache, x, VectorD(w.col(0)), config);
    MatrixD dx;
    VectorD dweight;
    rmsnorm_backward(dx, dweight, dy, cache, x, VectorD(w.col(0)));
    EXPECT_LT(max_relative_error(dx, numerical_gradient(loss, x)), kGradientTolerance) << "eps " << eps;
    EXPECT_LT(max_relative_error(MatrixD(dweight), numerical_gradient(loss, w)), kGradientTolerance) << "eps " << eps;
  }
}

TEST(RMSNorm, Errors) {
  EXPECT_EQ(error_of([] { RMSNormConfig{.eps = 0}.validate(); }), "eps = 0: must be finite and > 0");
  EXPECT_EQ(error_of([] { RMSNormConfig{.eps = -1e-6}.validate(); }), "eps = -1e-06: must be finite and > 0");
  EXPECT_EQ(error_of([] { RMSNormConfig{.eps = kNaN}.validate(); }), "eps = nan: must be finite and > 0");
  EXPECT_EQ(error_of([] { RMSNormConfig{.eps = kInf}.validate(); }), "eps = inf: must be finite and > 0");
  EXPECT_EQ(error_of([] { RMSNormConfig{}.validate(); }), "");
  const MatrixD x = MatrixD::Ones(2, 3);
  const MatrixD x4 = MatrixD::Ones(4, 3);
  const MatrixD dy3 = MatrixD::Ones(3, 3);
  const VectorD w2 = VectorD::Ones(2);
  const VectorD w = VectorD::Ones(3);
  MatrixD y;
  RMSNormCacheT<double> cache;
  EXPECT_EQ(error_of([&] { rmsnorm_forward(y, cache, x, w2, RMSNormConfig{}); }),
            "weight size = 2: must equal x.cols() = 3");
  EXPECT_EQ(error_of([&] { rmsnorm_forward(y, cache, x, w, RMSNormConfig{.eps = 0}); }),
            "eps = 0: must be finite and > 0");
  rmsnorm_forward(y, cache, x, w, RMSNormConfig{});
  MatrixD dx;
  VectorD dweight;
  EXPECT_EQ(error_of([&] { rmsnorm_backward(dx, dweight, dy3, cache, x, w); }),
            "dy shape = (3, 3): must be x's shape = (2, 3)");
  EXPECT_EQ(error_of([&] { rmsnorm_backward(dx, dweight, x4, cache, x4, w); }),
            "cache.inv_rms size = 2: must equal x.rows() = 4 (pass the cache of the rmsnorm_forward that made y)");
}

// --- 3. RoPE -------------------------------------------------------------------------------------------

TEST(Rope, TableAndHandValues) {
  // D = 4, theta = 10000: frequencies theta^(-0/4) = 1 and theta^(-2/4) = 1/100.
  const RopeTableT<double> table = rope_table<double>(4, 4, 10000.0);
  ASSERT_EQ(table.cos.rows(), 4);
  ASSERT_EQ(table.cos.cols(), 2);
  EXPECT_EQ(table.cos.row(0), MatrixD(MatrixD::Ones(1, 2)));   // position 0: angle 0
  EXPECT_EQ(table.sin.row(0), MatrixD(MatrixD::Zero(1, 2)));
  EXPECT_EQ(table.cos(3, 0), std::cos(3.0));          // position 3, pair 0: angle 3 * 1
  EXPECT_NEAR(table.sin(3, 1), std::sin(0.03), 1e-16);  // position 3, pair 1: angle 3 / 100

  // Two heads of D = 4, one sequence of T = 4. Row 3 (position 3): head 1 is [x1 | x2] =
  // [1, -1 | 2, 0.5] (features 4, 5 | 6, 7): pair 0 is (1, 2), angle 3 rad; pair 1 is (-1, 0.5),
  // angle 0.03 rad. cos 3 = -0.9899924966004454, sin 3 = 0.1411200080598672,
  // cos 0.03 = 0.9995500337489875, sin 0.03 = 0.02999550020249566:
  //   pair 0: [1 cos 3 - 2 sin 3,  2 cos 3 + 1 sin 3] = [-1.2722325127201798, -1.8388649851410236]
  //   pair 1: [-1 cos .03 - .5 sin .03,  .5 cos .03 + -1 sin .03] = [-1.0145477838502363, 0.46977951667199807]
  MatrixD x = MatrixD::Zero(4, 8);
  x.row(0) << 1, 2, 3, 4, 5, 6, 7, 8;
  x.row(3) << 0, 0, 0, 0, 1, -1, 2, 0.5;
  MatrixD y;
  rope_forward(y, x, table, 2);
  EXPECT_EQ(y.row(0), x.row(0));  // position 0 is the identity, exactly
  EXPECT_NEAR(y(3, 4), -1.2722325127201798, 1e-15);
  EXPECT_NEAR(y(3, 6), -1.8388649851410236, 1e-15);
  EXPECT_NEAR(y(3, 5), -1.0145477838502363, 1e-15);
  EXPECT_NEAR(y(3, 7), 0.46977951667199807, 1e-15);
  EXPECT_EQ(y.row(3).head(4), MatrixD(MatrixD::Zero(1, 4)));

  // Two sequences of T = 4 (N = 8): row 4 is position 0 again.
  MatrixD x2(8, 8);
  x2 << x, x;
  rope_forward(y, x2, table, 2);
  EXPECT_EQ(y.row(4), x.row(0));
  EXPECT_NEAR(y(7, 4), -1.2722325127201798, 1e-15);

  // theta is a config value: theta = 100, D = 4: pair 1's frequency is 100^(-1/2) = 0.1.
  EXPECT_NEAR(rope_table<double>(3, 4, 100.0).sin(2, 1), std::sin(0.2), 1e-16);
}

TEST(Rope, RotationPropertiesAndInPlace) {
  Rng rng(3);
  const Index T = 6;
  const Index H = 3;
  const Index D = 8;
  const RopeTableT<double> table = rope_table<double>(T, D, 10000.0);
  const MatrixD x = random_matrix(rng, 2 * T, H * D);
  MatrixD y;
  rope_forward(y, x, table, H);
  // A rotation keeps every pair's length, so every row's norm.
  for (Index n = 0; n < x.rows(); ++n) EXPECT_NEAR(y.row(n).norm(), x.row(n).norm(), 1e-14);
  // The backward rotates by -angle: it undoes the forward.
  MatrixD back;
  rope_backward(back, y, table, H);
  EXPECT_LT((back - x).cwiseAbs().maxCoeff(), 1e-15 * 8);
  // In place (y is x) gives the same bits as out of place.
  MatrixD in_place = x;
  rope_forward(in_place, in_place, table, H);
  EXPECT_TRUE(bitwise_equal(in_place, y));
  rope_backward(in_place, in_place, table, H);
  EXPECT_TRUE(bitwise_equal(in_place, back));

  // RoFormer's point (sec. 3.2): <rope(q) at p, rope(k) at s> depends only on p - s. The same q and
  // k at every position: the dot products are constant along each diagonal.
  MatrixD q(T, D);
  MatrixD k(T, D);
  const MatrixD q0 = random_matrix(rng, 1, D);
  const MatrixD k0 = random_matrix(rng, 1, D);
  for (Index t = 0; t < T; ++t) {
    q.row(t) = q0;
    k.row(t) = k0;
  }
  rope_forward(q, q, table, 1);
  rope_forward(k, k, table, 1);
  const MatrixD scores = q * k.transpose();  // (T, T)
  for (Index p = 1; p < T; ++p) {
    for (Index s = 1; s < T; ++s) EXPECT_NEAR(scores(p, s), scores(p - 1, s - 1), 1e-13) << p << " " << s;
  }
  EXPECT_GT(std::abs(scores(0, 0) - scores(1, 0)), 1e-3);  // but it does depend on p - s
}

TEST(Rope, BackwardMatchesFiniteDifferences) {
  Rng rng(4);
  const Index T = 5;
  const Index H = 2;
  const Index D = 6;
  const RopeTableT<double> table = rope_table<double>(T, D, 500.0);
  MatrixD x = random_matrix(rng, 2 * T, H * D);
  const MatrixD dy = random_matrix(rng, 2 * T, H * D);
  const auto loss = [&] {
    MatrixD y;
    rope_forward(y, x, table, H);
    return dot(dy, y);
  };
  MatrixD dx;
  rope_backward(dx, dy, table, H);
  EXPECT_LT(max_relative_error(dx, numerical_gradient(loss, x)), kGradientTolerance);
}

TEST(Rope, Errors) {
  EXPECT_EQ(error_of([] { rope_table<double>(0, 4, 1e4); }), "seq_len = 0: must be positive");
  const std::string pairs = ": must be even and >= 2 (RoPE rotates pairs)";
  EXPECT_EQ(error_of([] { rope_table<double>(3, 5, 1e4); }), "head_dim = 5" + pairs);
  EXPECT_EQ(error_of([] { rope_table<double>(3, 0, 1e4); }), "head_dim = 0" + pairs);
  EXPECT_EQ(error_of([] { rope_table<double>(3, 4, 0.0); }), "rope_theta = 0: must be finite and > 0");
  EXPECT_EQ(error_of([] { rope_table<double>(3, 4, kInf); }), "rope_theta = inf: must be finite and > 0");
  EXPECT_EQ(error_of([] { rope_table<double>(3, 4, kNaN); }), "rope_theta = nan: must be finite and > 0");
  const RopeTableT<double> table = rope_table<double>(3, 4, 1e4);
  const MatrixD x = MatrixD::Ones(3, 8);
  const MatrixD x4 = MatrixD::Ones(4, 8);
  const MatrixD x7 = MatrixD::Ones(3, 7);
  MatrixD y;
  EXPECT_EQ(error_of([&] { rope_forward(y, x7, table, 2); }), "x.cols() = 7: must equal n_heads * head_dim = 2 * 4");
  EXPECT_EQ(error_of([&] { rope_forward(y, x4, table, 2); }), "x.rows() = 4: must be a multiple of seq_len = 3");
  EXPECT_EQ(error_of([&] { rope_backward(y, x, table, 0); }), "n_heads = 0: must be positive");
  EXPECT_EQ(error_of([&] { rope_forward(y, x, RopeTableT<double>{}, 2); }),
            "rope table shape = cos (0, 0) sin (0, 0): must be two equal (T, D/2) matrices with T, D/2 >= 1 "
            "(from rope_table)");
}

// --- 4. linear ------------------------------------------------------------------------------------------

TEST(Linear, ForwardAndBackward) {
  // y = x W^T with W (out = 2, in = 3): y_0 = x . W_0, y_1 = x . W_1.
  MatrixD y;
  linear_forward(y, MatrixD{{1, 2, 3}}, MatrixD{{1, 0, 0}, {1, 1, 1}});
  EXPECT_EQ(y, (MatrixD{{1, 6}}));

  Rng rng(5);
  MatrixD x = random_matrix(rng, 4, 3);
  MatrixD w = random_matrix(rng, 5, 3);
  const MatrixD dy = random_matrix(rng, 4, 5);
  const auto loss = [&] {
    MatrixD out;
    linear_forward(out, x, w);
    return dot(dy, out);
  };
  MatrixD dx;
  MatrixD dw;
  linear_backward(dx, dw, dy, x, w);
  EXPECT_LT(max_relative_error(dx, numerical_gradient(loss, x)), kGradientTolerance);
  EXPECT_LT(max_relative_error(dw, numerical_gradient(loss, w)), kGradientTolerance);

  EXPECT_EQ(error_of([&] { linear_forward(y, MatrixD(MatrixD::Ones(2, 4)), w); }),
            "x.cols() = 4: must equal w.cols() = 3 (w is (out, in))");
  EXPECT_EQ(error_of([&] { linear_backward(dx, dw, MatrixD(MatrixD::Ones(4, 4)), x, w); }),
            "dy shape = (4, 4): must be (N, out) = (4, 5)");
}

// --- 5. attention ---------------------------------------------------------------------------------------

TEST(Attention, BackwardMatchesFiniteDifferences) {
  Rng rng(6);
  const Index B = 2;
  const Index T = 5;
  const Index C = 8;
  const AttentionConfig config = attention_config(C, 2);
  // Weights of std 0.5 on x ~ N(0, 1): scores of order 1, softmax far from uniform and from one-hot.
  MatrixD x = random_matrix(rng, B * T, C);
  AttentionParamsT<double> params = random_attention(rng, C, 0.5);
  const MatrixD dy = random_matrix(rng, B * T, C);
  const auto loss = [&] { return dot(dy, attention(x, params, config, B, T)); };

  MatrixD y;
  AttentionCacheT<double> cache;
  attention_forward(y, cache, x, params, config, B, T);
  MatrixD dx;
  AttentionParamsT<double> grads;
  attention_backward(dx, grads, dy, cache, x, params, config, B, T);
  EXPECT_LT(max_relative_error(dx, numerical_gradient(loss, x)), kGradientTolerance);
  EXPECT_LT(max_relative_error(grads.q_proj, numerical_gradient(loss, params.q_proj)), kGradientTolerance);
  EXPECT_LT(max_relative_error(grads.k_proj, numerical_gradient(loss, params.k_proj)), kGradientTolerance);
  EXPECT_LT(max_relative_error(grads.v_proj, numerical_gradient(loss, params.v_proj)), kGradientTolerance);
  EXPECT_LT(max_relative_error(grads.o_proj, numerical_gradient(loss, params.o_proj)), kGradientTolerance);
  // The softmax is not saturated (else the check would prove little): some probability is in (0.2, 0.8).
  bool spread = false;
  for (Index i = 0; i < cache.probs.size(); ++i) spread |= cache.probs.data()[i] > 0.2 && cache.probs.data()[i] < 0.8;
  EXPECT_TRUE(spread);
}

TEST(Attention, ProbabilitiesAreCausalAndNormalised) {
  Rng rng(7);
  const Index B = 2;
  const Index T = 6;
  const Index C = 12;
  const Index H = 3;
  MatrixD y;
  AttentionCacheT<double> cache;
  const AttentionParamsT<double> params = random_attention(rng, C, 0.5);
  attention_forward(y, cache, random_matrix(rng, B * T, C), params, attention_config(C, H), B, T);
  ASSERT_EQ(cache.probs.rows(), B * H * T);
  ASSERT_EQ(cache.probs.cols(), T);
  for (Index block = 0; block < B * H; ++block) {
    const MatrixD P = cache.probs.middleRows(block * T, T);
    EXPECT_EQ(P(0, 0), 1.0);  // the first token sees only itself
    for (Index i = 0; i < T; ++i) {
      EXPECT_NEAR(P.row(i).sum(), 1.0, 1e-15);
      for (Index j = i + 1; j < T; ++j) EXPECT_EQ(P(i, j), 0.0);
      for (Index j = 0; j <= i; ++j) EXPECT_GT(P(i, j), 0.0);
    }
  }
}

TEST(Attention, Causality) {
  // Changing token t + 1 of sequence 0 leaves outputs 0..t unchanged, exactly (their probabilities
  // of the later token are exact zeros), and all of sequence 1; output t + 1 changes.
  Rng rng(8);
  const Index B = 2;
  const Index T = 5;
  const Index C = 8;
  const AttentionConfig config = attention_config(C, 2);
  const AttentionParamsT<double> params = random_attention(rng, C, 0.5);
  const MatrixD x = random_matrix(rng, B * T, C);
  const MatrixD y = attention(x, params, config, B, T);
  for (Index t = 0; t + 1 < T; ++t) {
    MatrixD changed = x;
    changed.row(t + 1) = random_matrix(rng, 1, C);
    const MatrixD y_changed = attention(changed, params, config, B, T);
    EXPECT_TRUE(bitwise_equal(MatrixD(y_changed.topRows(t + 1)), MatrixD(y.topRows(t + 1)))) << "t = " << t;
    EXPECT_TRUE(bitwise_equal(MatrixD(y_changed.bottomRows(T)), MatrixD(y.bottomRows(T)))) << "t = " << t;
    EXPECT_GT((y_changed.row(t + 1) - y.row(t + 1)).cwiseAbs().maxCoeff(), 1e-3) << "t = " << t;
  }
}

TEST(Attention, OneTokenIsValueThenOutputProjection) {
  // T = 1: each token attends only to itself with probability exactly 1, so y = (x Wv^T) Wo^T
  // whatever q_proj, k_proj and RoPE (position 0) do.
  Rng rng(9);
  const Index B = 3;
  const Index C = 8;
  const AttentionParamsT<double> params = random_attention(rng, C, 0.5);
  const MatrixD x = random_matrix(rng, B, C);
  const MatrixD expected = (x * params.v_proj.transpose()) * params.o_proj.transpose();
  MatrixD y;
  AttentionCacheT<double> cache;
  attention_forward(y, cache, x, params, attention_config(C, 4), B, 1);
  EXPECT_LT((y - expected).cwiseAbs().maxCoeff(), 1e-14);
  EXPECT_EQ(cache.probs, MatrixD(MatrixD::Ones(B * 4, 1)));
}

TEST(Attention, ZeroQueriesAverageThePastValues) {
  // q_proj = 0: every score is 0, so token t attends uniformly to tokens 0..t:
  // context_t = (v_0 + ... + v_t) / (t + 1), a running mean of the values. o_proj = I shows it.
  Rng rng(10);
  const Index T = 4;
  const Index C = 4;
  AttentionParamsT<double> params = random_attention(rng, C, 0.5);
  params.q_proj.setZero();
  params.o_proj.setIdentity();
  const MatrixD x = random_matrix(rng, T, C);
  const MatrixD v = x * params.v_proj.transpose();
  const MatrixD y = attention(x, params, attention_config(C, 2), 1, T);
  for (Index t = 0; t < T; ++t) {
    const MatrixD mean = v.topRows(t + 1).colwise().sum() / static_cast<double>(t + 1);
    EXPECT_LT((y.row(t) - mean).cwiseAbs().maxCoeff(), 1e-15) << "t = " << t;
  }
}

TEST(Attention, LargeScoresStayFinite) {
  // Scores of order 1e4: exp without the max subtracted would overflow even double's 709.
  Rng rng(11);
  const Index T = 5;
  const Index C = 8;
  const AttentionParamsT<double> params = random_attention(rng, C, 30.0);
  MatrixD y;
  AttentionCacheT<double> cache;
  attention_forward(y, cache, random_matrix(rng, T, C), params, attention_config(C, 2), 1, T);
  EXPECT_TRUE(y.allFinite());
  EXPECT_TRUE(cache.probs.allFinite());
  EXPECT_GT(cache.probs.row(T - 1).maxCoeff(), 0.999);  // the last token's softmax is saturated
  MatrixT<float> yf;
  AttentionCacheT<float> cache_f;
  const AttentionParamsT<float> pf{params.q_proj.cast<float>(), params.k_proj.cast<float>(),
                                   params.v_proj.cast<float>(), params.o_proj.cast<float>()};
  attention_forward(yf, cache_f, random_matrix<float>(rng, T, C), pf, attention_config(C, 2), 1, T);
  EXPECT_TRUE(yf.allFinite());
}

TEST(Attention, FloatAgreesWithDouble) {
  Rng rng(12);
  const Index B = 2;
  const Index T = 7;
  const Index C = 16;
  const AttentionConfig config = attention_config(C, 4);
  const MatrixD x = random_matrix(rng, B * T, C);
  const AttentionParamsT<double> p = random_attention(rng, C, 0.3);
  const MatrixD dy = random_matrix(rng, B * T, C);
  const AttentionParamsT<float> pf{p.q_proj.cast<float>(), p.k_proj.cast<float>(), p.v_proj.cast<float>(),
                                   p.o_proj.cast<float>()};
  MatrixD y;
  MatrixD dx;
  AttentionCacheT<double> cache;
  AttentionParamsT<double> grads;
  attention_forward(y, cache, x, p, config, B, T);
  attention_backward(dx, grads, dy, cache, x, p, config, B, T);
  MatrixT<float> yf;
  MatrixT<float> dxf;
  AttentionCacheT<float> cache_f;
  AttentionParamsT<float> grads_f;
  attention_forward(yf, cache_f, MatrixT<float>(x.cast<float>()), pf, config, B, T);
  attention_backward(dxf, grads_f, MatrixT<float>(dy.cast<float>()), cache_f, MatrixT<float>(x.cast<float>()), pf,
                     config, B, T);
  // float's 6e-8 per rounding through chains of ~100 operations: 1e-5 of the largest value.
  EXPECT_LT(max_relative_error(yf.cast<double>(), y), 1e-5);
  EXPECT_LT(max_relative_error(dxf.cast<double>(), dx), 1e-5);
  EXPECT_LT(max_relative_error(grads_f.q_proj.cast<double>(), grads.q_proj), 1e-5);
  EXPECT_LT(max_relative_error(grads_f.o_proj.cast<double>(), grads.o_proj), 1e-5);
}

TEST(Attention, InitIsSeededAndShaped) {
  const AttentionConfig config = attention_config(8, 2);
  Rng a(42);
  Rng b(42);
  const AttentionParamsT<float> pf = init_attention<float>(config, a, 0.02);
  const AttentionParamsT<double> pd = init_attention<double>(config, b, 0.02);
  EXPECT_EQ(pf.q_proj.rows(), 8);
  EXPECT_EQ(pf.o_proj.cols(), 8);
  EXPECT_TRUE(bitwise_equal(pf.k_proj, MatrixT<float>(pd.k_proj.cast<float>())));  // same draws, rounded
  EXPECT_FALSE(bitwise_equal(pf.q_proj, pf.k_proj));
  EXPECT_NEAR(std::sqrt(pd.v_proj.squaredNorm() / 64.0), 0.02, 0.006);
  Rng c(1);
  EXPECT_EQ(error_of([&] { init_attention<double>(config, c, -1.0); }), "init_std = -1: must be finite and >= 0");
}

TEST(Attention, ConfigErrors) {
  const auto message = [](AttentionConfig config) { return error_of([&] { config.validate(); }); };
  EXPECT_EQ(message(attention_config(8, 2)), "");
  EXPECT_EQ(attention_config(8, 2).head_dim(), 4);
  EXPECT_EQ(message(attention_config(0, 2)), "hidden_size = 0: must be positive");
  EXPECT_EQ(message(attention_config(8, 0)), "n_heads = 0: must be positive");
  EXPECT_EQ(message(attention_config(8, -2)), "n_heads = -2: must be positive");
  EXPECT_EQ(message(attention_config(8, 3)), "hidden_size = 8: must be divisible by n_heads = 3");
  EXPECT_EQ(message(attention_config(6, 2)),
            "head_dim = 3: = hidden_size / n_heads = 6 / 2 must be even (RoPE rotates pairs of features)");
  EXPECT_EQ(message(attention_config(8, 2, 0.0)), "rope_theta = 0: must be finite and > 0");
  EXPECT_EQ(message(attention_config(8, 2, -1.0)), "rope_theta = -1: must be finite and > 0");
  EXPECT_EQ(message(attention_config(8, 2, kInf)), "rope_theta = inf: must be finite and > 0");
  EXPECT_EQ(message(attention_config(8, 2, kNaN)), "rope_theta = nan: must be finite and > 0");
  AttentionConfig gqa = attention_config(8, 2);
  gqa.n_kv_heads = 2;
  EXPECT_EQ(message(gqa), "");
  gqa.n_kv_heads = 1;
  EXPECT_EQ(message(gqa), "n_kv_heads = 1: must be 0 or n_heads = 2 (grouped-query attention is not implemented)");
}

TEST(Attention, InputErrors) {
  Rng rng(13);
  const Index C = 8;
  const AttentionConfig config = attention_config(C, 2);
  const AttentionParamsT<double> params = random_attention(rng, C, 0.5);
  const MatrixD x = random_matrix(rng, 6, C);
  MatrixD y;
  AttentionCacheT<double> cache;
  EXPECT_EQ(error_of([&] { attention_forward(y, cache, x, params, config, 2, 4); }),
            "x.rows() = 6: must equal batch_size * seq_len = 2 * 4 = 8 (sequence-major rows)");
  EXPECT_EQ(error_of([&] { attention_forward(y, cache, x, params, config, 0, 6); }),
            "batch_size = 0: must be positive");
  EXPECT_EQ(error_of([&] { attention_forward(y, cache, x, params, config, 6, 0); }), "seq_len = 0: must be positive");
  EXPECT_EQ(error_of([&] { attention_forward(y, cache, MatrixD(MatrixD::Ones(6, 4)), params, config, 2, 3); }),
            "x.cols() = 4: must equal hidden_size = 8");
  AttentionParamsT<double> bad = params;
  bad.k_proj = MatrixD::Ones(8, 4);
  EXPECT_EQ(error_of([&] { attention_forward(y, cache, x, bad, config, 2, 3); }),
            "k_proj shape = (8, 4): must be (hidden_size, hidden_size) = (8, 8)");
  EXPECT_EQ(error_of([&] { attention_forward(y, cache, x, params, attention_config(C, 3), 2, 3); }),
            "hidden_size = 8: must be divisible by n_heads = 3");

  attention_forward(y, cache, x, params, config, 2, 3);
  MatrixD dx;
  AttentionParamsT<double> grads;
  const MatrixD dy4 = MatrixD::Ones(6, 4);
  const MatrixD dy8 = MatrixD::Ones(6, 8);
  EXPECT_EQ(error_of([&] { attention_backward(dx, grads, dy4, cache, x, params, config, 2, 3); }),
            "dy shape = (6, 4): must be (N, C) = (6, 8)");
  EXPECT_EQ(error_of([&] { attention_backward(dx, grads, dy8, cache, x, params, config, 3, 2); }),
            "cache.probs shape = (12, 3): must be (B*H*T, T) = (12, 2) (pass the cache of the attention_forward that "
            "made y)");
  EXPECT_EQ(error_of([&] { attention_backward(dx, grads, y, cache, x, params, config, 2, 3); }), "");
}

// --- 6. cross-entropy -----------------------------------------------------------------------------------

TEST(CrossEntropy, HandWorked) {
  // Uniform logits: softmax = 1/V for every token, loss = -log(1/V) = log V, whatever the targets.
  const MatrixD uniform = MatrixD::Constant(3, 5, 0.7);
  EXPECT_NEAR(cross_entropy_forward(uniform, std::vector<std::int32_t>{0, 4, 2}), std::log(5.0), 1e-15);
  // V = 2, logits [0, log 3]: softmax = [1/4, 3/4]; target 1 gives -log(3/4), target 0 -log(1/4);
  // the mean of the two rows is (log(4/3) + log 4) / 2.
  const MatrixD logits{{0, std::log(3.0)}, {0, std::log(3.0)}};
  EXPECT_NEAR(cross_entropy_forward(logits, std::vector<std::int32_t>{1, 0}), (std::log(4.0 / 3) + std::log(4.0)) / 2,
              1e-15);
  // dlogits = (softmax - onehot) / N = ([1/4, 3/4] - [0, 1]) / 2 and ([1/4, 3/4] - [1, 0]) / 2.
  MatrixD dlogits;
  cross_entropy_backward(dlogits, logits, std::vector<std::int32_t>{1, 0});
  EXPECT_LT((dlogits - MatrixD{{0.125, -0.125}, {-0.375, 0.375}}).cwiseAbs().maxCoeff(), 1e-16);
  // Logits of 1000 do not overflow: [1000, 1000 + log 3] is the same as [0, log 3].
  const MatrixD large{{1000, 1000 + std::log(3.0)}};
  EXPECT_NEAR(cross_entropy_forward(large, std::vector<std::int32_t>{1}), std::log(4.0 / 3), 1e-12);
  cross_entropy_backward(dlogits, large, std::vector<std::int32_t>{1});
  EXPECT_NEAR(dlogits(0, 1), -0.25, 1e-12);
  // No tokens: 0 and an empty gradient.
  EXPECT_EQ(cross_entropy_forward(MatrixD(0, 4), std::vector<std::int32_t>{}), 0.0);
  cross_entropy_backward(dlogits, MatrixD(0, 4), std::vector<std::int32_t>{});
  EXPECT_EQ(dlogits.rows(), 0);
  EXPECT_EQ(dlogits.cols(), 4);
  // A NaN logit is not an error: the loss says it.
  EXPECT_TRUE(std::isnan(cross_entropy_forward(MatrixD{{0, kNaN}}, std::vector<std::int32_t>{0})));
}

TEST(CrossEntropy, BackwardMatchesFiniteDifferences) {
  Rng rng(14);
  const Index N = 6;
  const Index V = 7;
  const std::vector<std::int32_t> targets = random_ids(rng, N, V);
  for (const double dloss : {1.0, -2.5}) {
    MatrixD logits = random_matrix(rng, N, V, 2.0);
    const auto loss = [&] { return dloss * cross_entropy_forward(logits, targets); };
    MatrixD dlogits;
    cross_entropy_backward(dlogits, logits, targets, dloss);
    EXPECT_LT(max_relative_error(dlogits, numerical_gradient(loss, logits)), kGradientTolerance) << dloss;
    // Each row of softmax - onehot sums to 0.
    EXPECT_LT(dlogits.rowwise().sum().cwiseAbs().maxCoeff(), 1e-15);
  }
  // float against double.
  const MatrixD logits = random_matrix(rng, N, V, 3.0);
  const MatrixT<float> logits_f = logits.cast<float>();
  EXPECT_NEAR(cross_entropy_forward(logits_f, targets), cross_entropy_forward(logits, targets), 2e-6);
}

TEST(CrossEntropy, Errors) {
  const MatrixD logits = MatrixD::Zero(3, 4);
  MatrixD dlogits;
  EXPECT_EQ(error_of([&] { cross_entropy_forward(logits, std::vector<std::int32_t>{0, 4, 1}); }),
            "targets[1] = 4: must be in [0, vocab_size = 4)");
  EXPECT_EQ(error_of([&] { cross_entropy_forward(logits, std::vector<std::int32_t>{0, 1, -3}); }),
            "targets[2] = -3: must be in [0, vocab_size = 4)");
  EXPECT_EQ(error_of([&] { cross_entropy_backward(dlogits, logits, std::vector<std::int32_t>{0, 1, 7}); }),
            "targets[2] = 7: must be in [0, vocab_size = 4)");
  EXPECT_EQ(error_of([&] { cross_entropy_forward(logits, std::vector<std::int32_t>{0, 1}); }),
            "targets size = 2: must equal logits.rows() = 3");
  EXPECT_EQ(error_of([&] { cross_entropy_backward(dlogits, logits, std::vector<std::int32_t>{0}); }),
            "targets size = 1: must equal logits.rows() = 3");
  EXPECT_EQ(error_of([&] { cross_entropy_forward(MatrixD(2, 0), std::vector<std::int32_t>{0, 0}); }),
            "logits.cols() = 0: must be positive (the vocabulary size)");
}

// --- 7. the pieces together ------------------------------------------------------------------------------
// ids -> embedding -> h = x + attention(rmsnorm(x)) -> rmsnorm -> lm_head -> cross-entropy, one
// pre-norm block of the model, in double; the gradient of every parameter (and the residual's sum of
// two paths into dx) by finite differences.

struct Block {
  MatrixD wte;                        // (V, C)
  MatrixD norm1;                      // (C, 1) input_layernorm.weight
  AttentionParamsT<double> attention;
  MatrixD norm2;                      // (C, 1) norm.weight
  MatrixD lm_head;                    // (V, C)
};

struct BlockGrads {
  MatrixD wte, norm1, norm2, lm_head;
  AttentionParamsT<double> attention;
};

constexpr Index kB = 2, kT = 5, kC = 8, kV = 11;

double block_loss(const Block& p, std::span<const std::int32_t> ids, std::span<const std::int32_t> targets,
                  BlockGrads* grads) {
  const AttentionConfig config = attention_config(kC, 2);
  const RMSNormConfig norm{.eps = 1e-5};
  MatrixD x;
  embedding_forward(x, ids, p.wte);
  MatrixD n1;
  RMSNormCacheT<double> n1_cache;
  rmsnorm_forward(n1, n1_cache, x, VectorD(p.norm1.col(0)), norm);
  MatrixD a;
  AttentionCacheT<double> a_cache;
  attention_forward(a, a_cache, n1, p.attention, config, kB, kT);
  const MatrixD h = x + a;
  MatrixD n2;
  RMSNormCacheT<double> n2_cache;
  rmsnorm_forward(n2, n2_cache, h, VectorD(p.norm2.col(0)), norm);
  MatrixD logits;
  linear_forward(logits, n2, p.lm_head);
  const double loss = cross_entropy_forward(logits, targets);
  if (grads == nullptr) return loss;

  MatrixD dlogits;
  cross_entropy_backward(dlogits, logits, targets);
  MatrixD dn2;
  linear_backward(dn2, grads->lm_head, dlogits, n2, p.lm_head);
  MatrixD dh;
  VectorD dnorm;
  rmsnorm_backward(dh, dnorm, dn2, n2_cache, h, VectorD(p.norm2.col(0)));
  grads->norm2 = dnorm;
  MatrixD dn1;
  attention_backward(dn1, grads->attention, dh, a_cache, n1, p.attention, config, kB, kT);
  MatrixD dx;
  rmsnorm_backward(dx, dnorm, dn1, n1_cache, x, VectorD(p.norm1.col(0)));
  grads->norm1 = dnorm;
  dx += dh;  // the residual path
  embedding_backward(grads->wte, dx, ids, kV);
  return loss;
}

TEST(Composition, PreNormBlockMatchesFiniteDifferences) {
  Rng rng(15);
  Block p{.wte = random_matrix(rng, kV, kC), .norm1 = (random_matrix(rng, kC, 1, 0.5).array() + 1.0).matrix(),
          .attention = random_attention(rng, kC, 0.5), .norm2 = (random_matrix(rng, kC, 1, 0.5).array() + 1.0).matrix(),
          .lm_head = random_matrix(rng, kV, kC, 0.5)};
  const std::vector<std::int32_t> ids = random_ids(rng, kB * kT, kV);
  const std::vector<std::int32_t> targets = random_ids(rng, kB * kT, kV);
  BlockGrads g;
  const double loss = block_loss(p, ids, targets, &g);
  EXPECT_TRUE(std::isfinite(loss));
  const auto f = [&] { return block_loss(p, ids, targets, nullptr); };
  EXPECT_LT(max_relative_error(g.wte, numerical_gradient(f, p.wte)), kGradientTolerance);
  EXPECT_LT(max_relative_error(g.norm1, numerical_gradient(f, p.norm1)), kGradientTolerance);
  EXPECT_LT(max_relative_error(g.attention.q_proj, numerical_gradient(f, p.attention.q_proj)), kGradientTolerance);
  EXPECT_LT(max_relative_error(g.attention.k_proj, numerical_gradient(f, p.attention.k_proj)), kGradientTolerance);
  EXPECT_LT(max_relative_error(g.attention.v_proj, numerical_gradient(f, p.attention.v_proj)), kGradientTolerance);
  EXPECT_LT(max_relative_error(g.attention.o_proj, numerical_gradient(f, p.attention.o_proj)), kGradientTolerance);
  EXPECT_LT(max_relative_error(g.norm2, numerical_gradient(f, p.norm2)), kGradientTolerance);
  EXPECT_LT(max_relative_error(g.lm_head, numerical_gradient(f, p.lm_head)), kGradientTolerance);
}

}  // namespace
}  // namespace moelab
