// Tests of the router stage (forward and backward). T = tokens, C = channels, E = experts.
#include "reference/error.h"
#include "reference/numerics.h"
#include "reference/observer.h"
#include "reference/random.h"
#include "reference/recorder.h"
#include "reference/router.h"
#include "reference/types.h"
#include "tests/testing.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace moelab {
namespace {

using moelab::testing::bitwise_equal;

using moelab::testing::error_of;
using moelab::testing::max_relative_error;
using moelab::testing::numerical_gradient;
using moelab::testing::random_matrix;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

RouterConfig make_config(Index C, Index E, bool use_bias = false, RouterNoise noise = RouterNoise::none,
                         Format dtype = Format::fp32) {
  return RouterConfig{.hidden_size = C, .num_experts = E, .use_bias = use_bias, .dtype = dtype, .noise = noise};
}


Matrix rounded(Matrix m, Format f) {
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = round_to(m.data()[i], f);
  return m;
}

// --- the hand-worked example ---------------------------------------------------------------------
// C = 2, E = 3, T = 2, with a bias (gpt-oss). Every number is a small dyadic rational, so each
// product and sum is exact in float and the expected logits can be compared bitwise.
//   x = [ 1    2  ]    W = [ 0.5  -1   ]    b = [ 0.5  -0.25  1 ]
//       [-1    0.5]        [ 2     0.25]
//                          [-0.75  1.5 ]
// logits[t,e] = x_t . W_e + b_e:
//   t=0: 1*0.5 + 2*(-1) + 0.5 = -1;   1*2 + 2*0.25 - 0.25 = 2.25;    1*(-0.75) + 2*1.5 + 1 = 3.25
//   t=1: -0.5 - 0.5 + 0.5 = -0.5;     -2 + 0.125 - 0.25 = -2.125;    0.75 + 0.75 + 1 = 2.5
// Statistics of the six: min -2.125, max 3.25, sum 4.375, mean 35/48;
//   sum of squares 27.640625, variance 27.640625/6 - (35/48)^2 = 9389/2304, std sqrt(9389)/48.
template <typename Scalar>
struct HandExample {
  MatrixT<Scalar> x{{1, 2}, {-1, 0.5}};
  RouterParamsT<Scalar> params{
      .weight = MatrixT<Scalar>{{0.5, -1}, {2, 0.25}, {-0.75, 1.5}},
      .bias = VectorT<Scalar>{{0.5, -0.25, 1}},
      .noise_weight = {}};
  MatrixT<Scalar> expected{{-1, 2.25, 3.25}, {-0.5, -2.125, 2.5}};
  MatrixT<Scalar> expected_without_bias{{-1.5, 2.5, 2.25}, {-1, -1.875, 1.5}};  // minus b
};

TEST(Router, NoiseNames) {
  EXPECT_EQ(router_noise_name(RouterNoise::none), "none");
  EXPECT_EQ(router_noise_name(RouterNoise::noisy_topk), "noisy_topk");
  EXPECT_EQ(router_noise_name(RouterNoise::jitter), "jitter");
}

TEST(Router, HandWorkedExample) {
  {
    HandExample<float> ex;
    Matrix logits(7, 7);  // wrong size on purpose: it is resized
    RouterCache cache;
    router_forward(logits, cache, ex.x, ex.params, make_config(2, 3, true), nullptr);
    EXPECT_TRUE(bitwise_equal(logits, ex.expected)) << logits;
    EXPECT_TRUE(bitwise_equal(cache.input, ex.x));  // no jitter, no rounding: x itself
    EXPECT_EQ(cache.jitter.size(), 0);
    EXPECT_EQ(cache.noise.size(), 0);

    ex.params.bias.resize(0);
    router_forward(logits, cache, ex.x, ex.params, make_config(2, 3, false), nullptr);
    EXPECT_TRUE(bitwise_equal(logits, ex.expected_without_bias)) << logits;
  }
  {
    HandExample<double> ex;
    MatrixD logits;
    RouterCacheT<double> cache;
    router_forward(logits, cache, ex.x, ex.params, make_config(2, 3, true), nullptr);
    EXPECT_TRUE(bitwise_equal(logits, ex.expected)) << logits;
  }
}

// --- bf16 / fp16 -------------------------------------------------------------------------------
// A concrete case (C = 4, E = 3, T = 1) where bf16 (8 significant bits: 1 + 2^-7 follows 1) and
// fp32 differ, at each of the two rounding points:
//   x = [1 + 2^-8, 1, 1, 1]: x_0 is halfway between the bf16 values 1 and 1 + 2^-7 -> 1 (even).
//   W_0 = [3, 0, 0, 0]:        fp32 3 (1 + 2^-8) = 3.01171875;  bf16: 3 * 1 = 3.
//   W_1 = [0, 1, 2^-8, 0]:     fp32 and bf16 accumulate 1 + 2^-8 = 1.00390625, a bf16 tie:
//                              the bf16 logit rounds to 1 (the output rounding).
//   W_2 = [0, 1, 2^-8, 2^-8]:  1 + 2^-7 = 1.0078125 in both: the products are accumulated in fp32
//                              (a bf16 accumulator would round 1 + 2^-8 to 1 at each step and give 1).
TEST(Router, Bf16ConcreteCase) {
  constexpr double q = 1.0 / 256;  // 2^-8
  MatrixD x{{1 + q, 1, 1, 1}};
  RouterParamsT<double> params{.weight = MatrixD{{3, 0, 0, 0}, {0, 1, q, 0}, {0, 1, q, q}}, .bias = {}, .noise_weight = {}};
  const MatrixD fp32_expected{{3.01171875, 1.00390625, 1.0078125}};
  const MatrixD bf16_expected{{3, 1, 1.0078125}};

  MatrixD logits;
  RouterCacheT<double> cache;
  router_forward(logits, cache, x, params, make_config(4, 3), nullptr);
  EXPECT_TRUE(bitwise_equal(logits, fp32_expected)) << logits;
  router_forward(logits, cache, x, params, make_config(4, 3, false, RouterNoise::none, Format::bf16), nullptr);
  EXPECT_TRUE(bitwise_equal(logits, bf16_expected)) << logits;
  EXPECT_EQ(cache.input(0, 0), 1.0);  // the rounded x is what was multiplied

  // The same in float.
  Matrix logits_f;
  RouterCache cache_f;
  const RouterParams params_f{.weight = params.weight.cast<float>(), .bias = {}, .noise_weight = {}};
  router_forward(logits_f, cache_f, Matrix(x.cast<float>()), params_f,
                 make_config(4, 3, false, RouterNoise::none, Format::bf16), nullptr);
  EXPECT_TRUE(bitwise_equal(logits_f, Matrix(bf16_expected.cast<float>()))) << logits_f;
}

// In bf16 or fp16 mode the router is: round the inputs, the fp32 computation, round the output.
TEST(Router, LowPrecisionIsFp32OnRoundedInputsThenRounded) {
  for (const Format f : {Format::bf16, Format::fp16}) {
    SCOPED_TRACE(format_name(f));
    const Index T = 16, C = 32, E = 8;
    Rng init(11);
    const Matrix x = random_matrix<float>(init, T, C, 2.0);
    const RouterParams params{.weight = random_matrix<float>(init, E, C, 0.5),
                              .bias = random_matrix<float>(init, E, 1).col(0),
                              .noise_weight = {}};
    Matrix lowp;
    RouterCache cache;
    router_forward(lowp, cache, x, params, make_config(C, E, true, RouterNoise::none, f), nullptr);

    const RouterParams params_rounded{.weight = rounded(params.weight, f),
                                      .bias = Matrix(rounded(Matrix(params.bias), f)).col(0),
                                      .noise_weight = {}};
    Matrix fp32_on_rounded;
    router_forward(fp32_on_rounded, cache, rounded(x, f), params_rounded, make_config(C, E, true), nullptr);
    EXPECT_TRUE(bitwise_equal(lowp, rounded(fp32_on_rounded, f)));

    Matrix fp32;
    router_forward(fp32, cache, x, params, make_config(C, E, true), nullptr);
    Index differ = 0;
    for (Index i = 0; i < fp32.size(); ++i) differ += fp32.data()[i] != lowp.data()[i];
    EXPECT_GT(differ, fp32.size() / 2);  // random inputs: almost every logit changes
  }
}

// The backward treats each rounding as the identity: in bf16 it is the fp32 backward at the
// rounded x and W (the values the forward multiplied).
TEST(Router, LowPrecisionBackwardIsStraightThrough) {
  const Index T = 6, C = 5, E = 4;
  Rng init(12);
  const Matrix x = random_matrix<float>(init, T, C);
  const RouterParams params{.weight = random_matrix<float>(init, E, C), .bias = Vector::Ones(E), .noise_weight = {}};
  const Matrix dlogits = random_matrix<float>(init, T, E);
  const RouterConfig bf16 = make_config(C, E, true, RouterNoise::none, Format::bf16);
  Matrix logits, dx;
  RouterCache cache;
  RouterParams grads;
  router_forward(logits, cache, x, params, bf16, nullptr);
  router_backward(dx, grads, dlogits, cache, x, params, bf16);

  const Matrix x_r = rounded(x, Format::bf16);
  const RouterParams params_r{.weight = rounded(params.weight, Format::bf16), .bias = params.bias, .noise_weight = {}};
  const RouterConfig fp32 = make_config(C, E, true);
  Matrix dx_r;
  RouterCache cache_r;
  RouterParams grads_r;
  router_forward(logits, cache_r, x_r, params_r, fp32, nullptr);
  router_backward(dx_r, grads_r, dlogits, cache_r, x_r, params_r, fp32);
  EXPECT_TRUE(bitwise_equal(dx, dx_r));
  EXPECT_TRUE(bitwise_equal(grads.weight, grads_r.weight));
  EXPECT_TRUE(bitwise_equal(Matrix(grads.bias), Matrix(grads_r.bias)));
  EXPECT_FALSE(bitwise_equal(x, x_r));  // not vacuous: the rounding did change the inputs
}

// --- noise ---------------------------------------------------------------------------------------

TEST(Router, JitterMultipliers) {
  const Index T = 40, C = 8, E = 3;
  const double eps = 0.01;
  Rng init(21);
  const MatrixD x = random_matrix(init, T, C);
  const RouterParamsT<double> params{.weight = random_matrix(init, E, C), .bias = {}, .noise_weight = {}};
  RouterConfig config = make_config(C, E, false, RouterNoise::jitter);
  config.jitter_eps = eps;

  MatrixD logits;
  RouterCacheT<double> cache;
  Rng rng(7);
  router_forward(logits, cache, x, params, config, &rng);
  ASSERT_EQ(cache.jitter.rows(), T);
  ASSERT_EQ(cache.jitter.cols(), C);
  EXPECT_GE(cache.jitter.minCoeff(), 1 - eps);
  EXPECT_LT(cache.jitter.maxCoeff(), 1 + eps);
  EXPECT_GT(cache.jitter.maxCoeff() - cache.jitter.minCoeff(), eps);  // spread, not all ones
  // Drawn in row-major order: the n-th multiplier is the seed's n-th uniform(1 - eps, 1 + eps).
  Rng replay(7);
  for (Index i = 0; i < cache.jitter.size(); ++i) {
    ASSERT_EQ(cache.jitter.data()[i], replay.uniform(1 - eps, 1 + eps)) << i;
  }
  // x is jittered before the product: the jittered logits are the plain router on x * jitter.
  EXPECT_TRUE(bitwise_equal(cache.input, MatrixD(x.cwiseProduct(cache.jitter))));
  MatrixD plain;
  RouterCacheT<double> plain_cache;
  router_forward(plain, plain_cache, cache.input, params, make_config(C, E), nullptr);
  EXPECT_TRUE(bitwise_equal(logits, plain));

  // The same seed reproduces the bits; another seed does not.
  MatrixD again;
  RouterCacheT<double> cache_again;
  Rng same(7);
  router_forward(again, cache_again, x, params, config, &same);
  EXPECT_TRUE(bitwise_equal(again, logits));
  EXPECT_TRUE(bitwise_equal(cache_again.jitter, cache.jitter));
  Rng other(8);
  router_forward(again, cache_again, x, params, config, &other);
  EXPECT_FALSE(bitwise_equal(cache_again.jitter, cache.jitter));
  EXPECT_FALSE(bitwise_equal(again, logits));

  // eps = 0: every multiplier is exactly 1.
  config.jitter_eps = 0;
  router_forward(again, cache_again, x, params, config, &other);
  EXPECT_TRUE((cache_again.jitter.array() == 1.0).all());
  router_forward(plain, plain_cache, x, params, make_config(C, E), nullptr);
  EXPECT_TRUE(bitwise_equal(again, plain));

  // The float router draws the same uniforms, rounded to float: within [1 - eps, 1 + eps]
  // (a draw just below 1 + eps may round onto float(1 + eps)).
  const RouterParams params_f{.weight = params.weight.cast<float>(), .bias = {}, .noise_weight = {}};
  Matrix logits_f;
  RouterCache cache_f;
  Rng rng_f(7);
  config.jitter_eps = eps;
  router_forward(logits_f, cache_f, Matrix(x.cast<float>()), params_f, config, &rng_f);
  EXPECT_GE(cache_f.jitter.minCoeff(), static_cast<float>(1 - eps));
  EXPECT_LE(cache_f.jitter.maxCoeff(), static_cast<float>(1 + eps));
  EXPECT_TRUE(bitwise_equal(cache_f.jitter, Matrix(cache.jitter.cast<float>())));

  // A later call without noise empties the cache's jitter.
  router_forward(logits, cache, x, params, make_config(C, E), nullptr);
  EXPECT_EQ(cache.jitter.size(), 0);
}

// softplus(0) = ln(1 + e^0) = ln 2, so with W_noise = 0 the noise term is exactly N(0,1) * ln 2.
TEST(Router, NoisyTopKWithZeroNoiseWeight) {
  const Index T = 200, C = 4, E = 10;
  Rng init(31);
  const MatrixD x = random_matrix(init, T, C);
  const RouterParamsT<double> params{.weight = random_matrix(init, E, C),
                                     .bias = random_matrix(init, E, 1).col(0),
                                     .noise_weight = MatrixD::Zero(E, C)};
  const RouterConfig config = make_config(C, E, true, RouterNoise::noisy_topk);
  MatrixD noisy, clean;
  RouterCacheT<double> cache, clean_cache;
  Rng rng(5);
  router_forward(noisy, cache, x, params, config, &rng);
  router_forward(clean, clean_cache, x, params, make_config(C, E, true), nullptr);

  ASSERT_EQ(cache.noise.rows(), T);
  ASSERT_EQ(cache.noise.cols(), E);
  EXPECT_TRUE((cache.noise_logits.array() == 0.0).all());
  Rng replay(5);
  for (Index i = 0; i < noisy.size(); ++i) {
    ASSERT_EQ(cache.noise.data()[i], replay.normal()) << i;  // row-major draws
    ASSERT_EQ(noisy.data()[i], clean.data()[i] + cache.noise.data()[i] * std::log(2.0)) << i;
  }
  // The samples look like N(0, 1): over 2000 of them the mean is within ~4.5 standard errors
  // (0.022 each) of 0 and the standard deviation within a few percent of 1.
  const double mean = cache.noise.mean();
  const double sd = std::sqrt((cache.noise.array() - mean).square().mean());
  EXPECT_LT(std::abs(mean), 0.1);
  EXPECT_NEAR(sd, 1.0, 0.1);

  // float: the same exact relation, with ln 2 rounded to float.
  const RouterParams params_f{.weight = params.weight.cast<float>(), .bias = params.bias.cast<float>(),
                              .noise_weight = Matrix::Zero(E, C)};
  Matrix noisy_f, clean_f;
  RouterCache cache_f;
  Rng rng_f(5);
  router_forward(noisy_f, cache_f, Matrix(x.cast<float>()), params_f, config, &rng_f);
  router_forward(clean_f, cache_f, Matrix(x.cast<float>()), params_f, make_config(C, E, true), nullptr);
  Rng replay_f(5);
  for (Index i = 0; i < noisy_f.size(); ++i) {
    const float n = static_cast<float>(replay_f.normal());
    ASSERT_EQ(noisy_f.data()[i], clean_f.data()[i] + n * std::log(2.0f)) << i;
  }

  // The same seed reproduces the bits, another does not.
  MatrixD again;
  Rng same(5);
  router_forward(again, cache, x, params, config, &same);
  EXPECT_TRUE(bitwise_equal(again, noisy));
  Rng other(6);
  router_forward(again, cache, x, params, config, &other);
  EXPECT_FALSE(bitwise_equal(again, noisy));
}

// --- gradients -----------------------------------------------------------------------------------
// L = sum(G .* logits) for a fixed random G, so dL/dlogits = G. Every gradient of router_backward
// is compared with central differences (tests/testing.h, h = 1e-5). Noise is held fixed by
// reseeding the Rng for every evaluation: the same seed gives the same multipliers / samples, as
// the forward's cache records them.
// Tolerance: without noisy top-k the logits are linear in x, W and b, so central differences have
// no truncation error, only rounding: ~eps_double * |L| / h ~ 2e-16 * 10 / 1e-5 = 2e-10 absolute.
// With noisy top-k the truncation error is h^2/6 * |f'''| <= 2e-12 * |n| (|softplus'''| <= 0.1).
// max_relative_error divides by the gradient's largest entry, which is O(1) here (checked below),
// so the expected error is ~1e-10: 1e-7 leaves a margin of 1000x, while a wrong formula (a missing
// sigmoid, jitter factor or transpose) is off by 1e-2 to 1. (Measured: at most 1.6e-10.)
void check_gradients(RouterNoise noise, bool use_bias) {
  SCOPED_TRACE(fmt::format("noise = {}, use_bias = {}", router_noise_name(noise), use_bias));
  const Index T = 5, C = 4, E = 3;
  RouterConfig config = make_config(C, E, use_bias, noise);
  config.jitter_eps = 0.25;  // large, so that forgetting the jitter factor is a large error
  Rng init(41);
  MatrixD x = random_matrix(init, T, C);
  RouterParamsT<double> params{.weight = random_matrix(init, E, C), .bias = {}, .noise_weight = {}};
  if (use_bias) params.bias = random_matrix(init, E, 1).col(0);
  if (noise == RouterNoise::noisy_topk) params.noise_weight = random_matrix(init, E, C);
  const MatrixD G = random_matrix(init, T, E);
  constexpr std::uint64_t kNoiseSeed = 1234;

  const auto loss = [&] {
    MatrixD logits;
    RouterCacheT<double> cache;
    Rng rng(kNoiseSeed);
    router_forward(logits, cache, x, params, config, &rng);
    return G.cwiseProduct(logits).sum();
  };

  MatrixD logits, dx;
  RouterCacheT<double> cache;
  RouterParamsT<double> grads;
  Rng rng(kNoiseSeed);
  router_forward(logits, cache, x, params, config, &rng);
  router_backward(dx, grads, G, cache, x, params, config);
  constexpr double kTolerance = 1e-7;

  const MatrixD numeric_dx = numerical_gradient(loss, x);
  EXPECT_LT(max_relative_error(dx, numeric_dx), kTolerance) << "dx\n" << dx << "\nnumeric\n" << numeric_dx;
  EXPECT_GT(dx.norm(), 0.1);

  const MatrixD numeric_dw = numerical_gradient(loss, params.weight);
  EXPECT_LT(max_relative_error(grads.weight, numeric_dw), kTolerance) << "dW\n" << grads.weight;
  EXPECT_GT(grads.weight.norm(), 0.1);

  if (use_bias) {
    MatrixD b = params.bias;  // (E, 1)
    const auto loss_b = [&] {
      params.bias = b.col(0);
      return loss();
    };
    const MatrixD numeric_db = numerical_gradient(loss_b, b);
    params.bias = b.col(0);
    EXPECT_LT(max_relative_error(MatrixD(grads.bias), numeric_db), kTolerance) << "db\n" << grads.bias;
  } else {
    EXPECT_EQ(grads.bias.size(), 0);
  }

  if (noise == RouterNoise::noisy_topk) {
    const MatrixD numeric_dwn = numerical_gradient(loss, params.noise_weight);
    EXPECT_LT(max_relative_error(grads.noise_weight, numeric_dwn), kTolerance)
        << "dW_noise\n" << grads.noise_weight << "\nnumeric\n" << numeric_dwn;
    EXPECT_GT(grads.noise_weight.norm(), 0.1);
  } else {
    EXPECT_EQ(grads.noise_weight.size(), 0);
  }
}

TEST(Router, BackwardMatchesFiniteDifferences) {
  for (const RouterNoise noise : {RouterNoise::none, RouterNoise::jitter, RouterNoise::noisy_topk}) {
    for (const bool use_bias : {false, true}) check_gradients(noise, use_bias);
  }
}

// Evaluating a noisy-top-k model without noise: W_noise is ignored and its gradient is zero.
TEST(Router, NoiseWeightWithoutNoiseGetsZeroGradient) {
  const Index T = 3, C = 2, E = 4;
  Rng init(51);
  const MatrixD x = random_matrix(init, T, C);
  const RouterParamsT<double> params{.weight = random_matrix(init, E, C), .bias = {},
                                     .noise_weight = random_matrix(init, E, C)};
  MatrixD logits, dx;
  RouterCacheT<double> cache;
  RouterParamsT<double> grads;
  router_forward(logits, cache, x, params, make_config(C, E), nullptr);
  EXPECT_TRUE(bitwise_equal(logits, MatrixD(x * params.weight.transpose())));
  router_backward(dx, grads, MatrixD(MatrixD::Ones(T, E)), cache, x, params, make_config(C, E));
  EXPECT_EQ(grads.noise_weight.rows(), E);
  EXPECT_EQ(grads.noise_weight.cols(), C);
  EXPECT_TRUE((grads.noise_weight.array() == 0.0).all());
}

TEST(Router, FloatAgreesWithDouble) {
  const Index T = 8, C = 16, E = 6;
  Rng init(61);
  const MatrixD x = random_matrix(init, T, C);
  const RouterParamsT<double> params{.weight = random_matrix(init, E, C, 0.3),
                                     .bias = random_matrix(init, E, 1).col(0),
                                     .noise_weight = random_matrix(init, E, C, 0.3)};
  const MatrixD G = random_matrix(init, T, E);
  const RouterParams params_f{.weight = params.weight.cast<float>(), .bias = params.bias.cast<float>(),
                              .noise_weight = params.noise_weight.cast<float>()};
  const RouterConfig config = make_config(C, E, true, RouterNoise::noisy_topk);

  MatrixD logits, dx;
  RouterCacheT<double> cache;
  RouterParamsT<double> grads;
  Rng rng(3);
  router_forward(logits, cache, x, params, config, &rng);
  router_backward(dx, grads, G, cache, x, params, config);
  Matrix logits_f, dx_f;
  RouterCache cache_f;
  RouterParams grads_f;
  Rng rng_f(3);
  router_forward(logits_f, cache_f, Matrix(x.cast<float>()), params_f, config, &rng_f);
  router_backward(dx_f, grads_f, Matrix(G.cast<float>()), cache_f, Matrix(x.cast<float>()), params_f, config);
  // Inputs rounded to float (rel. 6e-8), sums of C = 16 or T = 8 terms of size ~1: ~1e-6.
  EXPECT_LT((logits_f.cast<double>() - logits).cwiseAbs().maxCoeff(), 1e-5);
  EXPECT_LT((dx_f.cast<double>() - dx).cwiseAbs().maxCoeff(), 1e-5);
  EXPECT_LT((grads_f.weight.cast<double>() - grads.weight).cwiseAbs().maxCoeff(), 1e-5);
  EXPECT_LT((grads_f.bias.cast<double>() - grads.bias).cwiseAbs().maxCoeff(), 1e-5);
  EXPECT_LT((grads_f.noise_weight.cast<double>() - grads.noise_weight).cwiseAbs().maxCoeff(), 1e-5);
}

// --- instrumentation -----------------------------------------------------------------------------

class CountingObserver : public Observer {
 public:
  void on_event(const Event& event) override { names.emplace_back(event.name); }
  std::vector<std::string> names;
};

TEST(Router, EmitsTheRouterLogitsEvent) {
  HandExample<float> ex;
  Matrix logits;
  RouterCache cache;
  MemoryRecorder rec;
  router_forward(logits, cache, ex.x, ex.params, make_config(2, 3, true), nullptr, &rec);
  ASSERT_EQ(rec.size(), 1u);
  const RecordedEvent e = rec.last(events::router_logits);
  EXPECT_EQ(e.shape, (std::array<std::int64_t, 2>{2, 3}));
  ASSERT_EQ(e.values.size(), 6u);
  for (Index i = 0; i < logits.size(); ++i) {
    EXPECT_EQ(e.values[static_cast<std::size_t>(i)], static_cast<double>(logits.data()[i])) << i;
  }
  EXPECT_EQ(e.stat("min"), -2.125);
  EXPECT_EQ(e.stat("max"), 3.25);
  EXPECT_DOUBLE_EQ(e.stat("mean"), 35.0 / 48);
  EXPECT_DOUBLE_EQ(e.stat("std"), std::sqrt(9389.0) / 48);
  EXPECT_EQ(e.stat("nonfinite_count"), 0);
  EXPECT_EQ(e.stat("naive_softmax_overflow_count"), 0);

  // The double router reports double values.
  HandExample<double> exd;
  MatrixD logits_d;
  RouterCacheT<double> cache_d;
  MemoryRecorder rec_d;
  router_forward(logits_d, cache_d, exd.x, exd.params, make_config(2, 3, true), nullptr, &rec_d);
  const RecordedEvent ed = rec_d.last(events::router_logits);
  ASSERT_EQ(ed.values.size(), 6u);
  for (std::size_t i = 0; i < 6; ++i) EXPECT_EQ(ed.values[i], logits_d.data()[i]);
  EXPECT_DOUBLE_EQ(ed.stat("std"), std::sqrt(9389.0) / 48);
}

// Logits 12, 8, -16: exp(12) = 162755 overflows fp16 (max 65504, max_exp_input ~11.09), not
// fp32 or bf16 (max_exp_input ~88.7). The count agrees with the naive fp16 softmax of numerics.h.
TEST(Router, CountsLogitsThatOverflowANaiveSoftmax) {
  const Matrix x{{4, 0}};
  const RouterParams params{.weight = Matrix{{3, 0}, {2, 0}, {-4, 0}}, .bias = {}, .noise_weight = {}};
  for (const Format f : {Format::fp32, Format::bf16, Format::fp16}) {
    SCOPED_TRACE(format_name(f));
    Matrix logits;
    RouterCache cache;
    MemoryRecorder rec;
    router_forward(logits, cache, x, params, make_config(2, 3, false, RouterNoise::none, f), nullptr, &rec);
    EXPECT_TRUE(bitwise_equal(logits, Matrix{{12, 8, -16}}));
    const double expected = f == Format::fp16 ? 1 : 0;
    EXPECT_EQ(rec.last(events::router_logits).stat("naive_softmax_overflow_count"), expected);
    const std::vector<float> row(logits.data(), logits.data() + logits.size());
    EXPECT_EQ(softmax_in_format(row, f, SoftmaxMethod::naive).overflow_count, expected);
  }
}

TEST(Router, NullObserverComputesNothing) {
  HandExample<float> ex;
  Matrix with, without;
  RouterCache cache;
  CountingObserver counter;
  router_forward(with, cache, ex.x, ex.params, make_config(2, 3, true), nullptr, &counter);
  EXPECT_EQ(counter.names, std::vector<std::string>{"router_logits"});  // one event per forward
  router_forward(without, cache, ex.x, ex.params, make_config(2, 3, true), nullptr, nullptr);
  EXPECT_TRUE(bitwise_equal(with, without));
  EXPECT_EQ(counter.names.size(), 1u);
}

TEST(Router, NoTokensIsValid) {
  const Index C = 3, E = 4;
  const MatrixD x(0, C);
  Rng init(71);
  const RouterParamsT<double> params{.weight = random_matrix(init, E, C), .bias = MatrixD::Ones(E, 1).col(0),
                                     .noise_weight = random_matrix(init, E, C)};
  for (const RouterNoise noise : {RouterNoise::none, RouterNoise::jitter, RouterNoise::noisy_topk}) {
    SCOPED_TRACE(router_noise_name(noise));
    const RouterConfig config = make_config(C, E, true, noise);
    MatrixD logits(2, 2), dx(2, 2);
    RouterCacheT<double> cache;
    RouterParamsT<double> grads;
    MemoryRecorder rec;
    Rng rng(1);
    router_forward(logits, cache, x, params, config, &rng, &rec);
    EXPECT_EQ(logits.rows(), 0);
    EXPECT_EQ(logits.cols(), E);
    const RecordedEvent e = rec.last(events::router_logits);
    EXPECT_EQ(e.shape, (std::array<std::int64_t, 2>{0, E}));
    EXPECT_TRUE(e.values.empty());
    EXPECT_TRUE(std::isnan(e.stat("mean")));  // statistics of nothing
    EXPECT_TRUE(std::isnan(e.stat("min")));
    EXPECT_EQ(e.stat("nonfinite_count"), 0);

    router_backward(dx, grads, MatrixD(0, E), cache, x, params, config);
    EXPECT_EQ(dx.rows(), 0);
    EXPECT_EQ(dx.cols(), C);
    EXPECT_TRUE(bitwise_equal(grads.weight, MatrixD(MatrixD::Zero(E, C))));
    EXPECT_TRUE(bitwise_equal(MatrixD(grads.bias), MatrixD(MatrixD::Zero(E, 1))));
  }
}

// --- non-finite values -------------------------------------------------------------------------

TEST(Router, NonFiniteInputThrowsAfterReportingIt) {
  const Index T = 5, C = 2, E = 3;
  Rng init(81);
  Matrix x = random_matrix<float>(init, T, C);
  const RouterParams params{.weight = random_matrix<float>(init, E, C), .bias = {}, .noise_weight = {}};
  x(3, 1) = std::numeric_limits<float>::quiet_NaN();
  Matrix logits;
  RouterCache cache;
  MemoryRecorder rec;
  EXPECT_EQ(error_of([&] { router_forward(logits, cache, x, params, make_config(C, E), nullptr, &rec); }),
            "x[3,1] = nan: router input must be finite (allow_nonfinite propagates it)");
  ASSERT_EQ(rec.size(), 1u);  // the numerics event, and no router_logits
  const RecordedEvent e = rec.last(events::numerics);
  EXPECT_EQ(e.stat("nonfinite_count"), 1);
  EXPECT_EQ(e.stat("nan_count"), 1);
  EXPECT_EQ(e.stat("inf_count"), 0);
  EXPECT_EQ(e.stat("in_logits"), 0);

  x(0, 1) = -std::numeric_limits<float>::infinity();  // the first one is named
  EXPECT_EQ(error_of([&] { router_forward(logits, cache, x, params, make_config(C, E), nullptr); }),
            "x[0,1] = -inf: router input must be finite (allow_nonfinite propagates it)");
}

TEST(Router, AllowNonfinitePropagatesNaN) {
  const Index T = 5, C = 2, E = 3;
  Rng init(81);
  Matrix x = random_matrix<float>(init, T, C);
  const RouterParams params{.weight = random_matrix<float>(init, E, C), .bias = {}, .noise_weight = {}};
  Matrix clean;
  RouterCache cache;
  router_forward(clean, cache, x, params, make_config(C, E), nullptr);

  x(3, 1) = std::numeric_limits<float>::quiet_NaN();
  RouterConfig config = make_config(C, E);
  config.allow_nonfinite = true;
  Matrix logits;
  MemoryRecorder rec;
  router_forward(logits, cache, x, params, config, nullptr, &rec);
  for (Index t = 0; t < T; ++t) {
    for (Index e = 0; e < E; ++e) {
      if (t == 3) {
        EXPECT_TRUE(std::isnan(logits(t, e))) << e;  // x[3,1] reaches every expert of token 3
      } else {
        EXPECT_EQ(logits(t, e), clean(t, e)) << t << "," << e;
      }
    }
  }
  ASSERT_EQ(rec.size(), 3u);  // numerics (input), numerics (logits), router_logits
  EXPECT_EQ(rec.events()[0].stat("in_logits"), 0);
  EXPECT_EQ(rec.events()[0].stat("nonfinite_count"), 1);
  EXPECT_EQ(rec.events()[1].stat("in_logits"), 1);
  EXPECT_EQ(rec.events()[1].stat("nonfinite_count"), E);
  const RecordedEvent e = rec.last(events::router_logits);
  EXPECT_EQ(e.stat("nonfinite_count"), E);
  EXPECT_EQ(e.stat("naive_softmax_overflow_count"), 0);  // NaN is not above anything
  // min and max are over the finite logits.
  double min = kInf, max = -kInf;
  for (Index i = 0; i < clean.size(); ++i) {
    if (i / E == 3) continue;
    min = std::min(min, static_cast<double>(clean.data()[i]));
    max = std::max(max, static_cast<double>(clean.data()[i]));
  }
  EXPECT_EQ(e.stat("min"), min);
  EXPECT_EQ(e.stat("max"), max);
}

// 300 * 300 = 90000 is above fp16's max 65504: the logit overflows to inf.
TEST(Router, Fp16LogitOverflow) {
  const Matrix x{{300}};
  const RouterParams params{.weight = Matrix{{300}, {-1}}, .bias = {}, .noise_weight = {}};
  RouterConfig config = make_config(1, 2, false, RouterNoise::none, Format::fp16);
  Matrix logits;
  RouterCache cache;
  MemoryRecorder rec;
  EXPECT_EQ(error_of([&] { router_forward(logits, cache, x, params, config, nullptr, &rec); }),
            "logits[0,0] = inf: router logits must be finite in fp16 (allow_nonfinite propagates it)");
  ASSERT_EQ(rec.size(), 1u);
  EXPECT_EQ(rec.last(events::numerics).stat("in_logits"), 1);
  EXPECT_EQ(rec.last(events::numerics).stat("inf_count"), 1);

  config.allow_nonfinite = true;
  rec.clear();
  router_forward(logits, cache, x, params, config, nullptr, &rec);
  EXPECT_EQ(logits(0, 0), std::numeric_limits<float>::infinity());
  EXPECT_EQ(logits(0, 1), -300.0f);
  const RecordedEvent e = rec.last(events::router_logits);
  EXPECT_EQ(e.stat("nonfinite_count"), 1);
  EXPECT_EQ(e.stat("naive_softmax_overflow_count"), 1);  // inf is above max_exp_input
  EXPECT_EQ(e.stat("max"), -300.0);                      // over the finite logits

  // bf16 has fp32's range: 90000 is finite there, rounded to a multiple of bf16's spacing in
  // [2^16, 2^17), 2^(16 - 7) = 512: 90000 / 512 = 175.8 -> 176 * 512 = 90112.
  config = make_config(1, 2, false, RouterNoise::none, Format::bf16);
  router_forward(logits, cache, x, params, config, nullptr);
  EXPECT_EQ(logits(0, 0), 90112.0f);
}

// --- bad input -----------------------------------------------------------------------------------

TEST(Router, BadConfigNamesTheField) {
  RouterConfig config = make_config(2, 3);
  EXPECT_EQ(error_of([&] { config.validate(); }), "");
  config.hidden_size = 0;
  EXPECT_EQ(error_of([&] { config.validate(); }), "hidden_size = 0: must be positive");
  config = make_config(2, -2);
  EXPECT_EQ(error_of([&] { config.validate(); }), "num_experts = -2: must be positive");
  config = make_config(2, 3);
  const std::string eps_rule =
      ": must lie in [0, 1) (the jitter multipliers U(1 - eps, 1 + eps) must stay positive)";
  config.jitter_eps = 1.0;
  EXPECT_EQ(error_of([&] { config.validate(); }), "jitter_eps = 1" + eps_rule);
  config.jitter_eps = -0.5;
  EXPECT_EQ(error_of([&] { config.validate(); }), "jitter_eps = -0.5" + eps_rule);
  config.jitter_eps = kNaN;
  EXPECT_EQ(error_of([&] { config.validate(); }), "jitter_eps = nan" + eps_rule);
  config = make_config(2, 3, false, RouterNoise::none, Format::fp8_e4m3);
  EXPECT_EQ(error_of([&] { config.validate(); }), "dtype = fp8_e4m3: the router computes in fp32, bf16 or fp16");
  config.dtype = Format::fp8_e5m2;
  EXPECT_NE(error_of([&] { config.validate(); }).find("dtype = fp8_e5m2"), std::string::npos);

  // router_forward validates the config too.
  HandExample<float> ex;
  Matrix logits;
  RouterCache cache;
  EXPECT_EQ(error_of([&] { router_forward(logits, cache, ex.x, ex.params, config, nullptr); }),
            "dtype = fp8_e5m2: the router computes in fp32, bf16 or fp16");
}

TEST(Router, BadInputsNameTheField) {
  HandExample<float> ex;
  Matrix logits;
  RouterCache cache;
  const auto forward = [&](const Matrix& x, const RouterParams& params, const RouterConfig& config, Rng* rng) {
    return error_of([&] { router_forward(logits, cache, x, params, config, rng); });
  };
  const RouterConfig config = make_config(2, 3, true);
  EXPECT_EQ(forward(ex.x, ex.params, config, nullptr), "");

  EXPECT_EQ(forward(Matrix::Ones(2, 3), ex.params, config, nullptr), "x.cols() = 3: must equal hidden_size = 2");

  RouterParams bad = ex.params;
  bad.weight = Matrix::Ones(2, 3);  // transposed: (C, E)
  EXPECT_EQ(forward(ex.x, bad, config, nullptr),
            "weight shape = (2, 3): must be (num_experts, hidden_size) = (3, 2)");

  bad = ex.params;
  bad.bias = Vector::Ones(2);
  EXPECT_EQ(forward(ex.x, bad, config, nullptr), "bias size = 2: must equal num_experts = 3 when use_bias");
  EXPECT_EQ(forward(ex.x, ex.params, make_config(2, 3, false), nullptr),
            "bias size = 3: must be 0 when use_bias is false (set use_bias to add the bias)");

  const RouterConfig noisy = make_config(2, 3, true, RouterNoise::noisy_topk);
  Rng rng(1);
  EXPECT_EQ(forward(ex.x, ex.params, noisy, &rng),
            "noise_weight shape = (0, 0): must be (num_experts, hidden_size) = (3, 2) when noise = noisy_topk");
  bad = ex.params;
  bad.noise_weight = Matrix::Zero(3, 2);
  EXPECT_EQ(forward(ex.x, bad, noisy, nullptr), "rng = null: noise = noisy_topk draws random numbers: pass an Rng");
  EXPECT_EQ(forward(ex.x, ex.params, make_config(2, 3, true, RouterNoise::jitter), nullptr),
            "rng = null: noise = jitter draws random numbers: pass an Rng");
}

TEST(Router, BadBackwardInputsNameTheField) {
  HandExample<double> ex;
  const RouterConfig config = make_config(2, 3, true);
  MatrixD logits, dx;
  RouterCacheT<double> cache;
  RouterParamsT<double> grads;
  router_forward(logits, cache, ex.x, ex.params, config, nullptr);
  const MatrixD dlogits = MatrixD::Ones(2, 3);
  const auto backward = [&](const MatrixD& g, const RouterCacheT<double>& c, const RouterParamsT<double>& p,
                            const RouterConfig& cfg) {
    return error_of([&] { router_backward(dx, grads, g, c, ex.x, p, cfg); });
  };
  EXPECT_EQ(backward(dlogits, cache, ex.params, config), "");
  EXPECT_EQ(backward(MatrixD::Ones(2, 4), cache, ex.params, config),
            "dlogits shape = (2, 4): must be (T, E) = (2, 3)");
  EXPECT_EQ(backward(MatrixD::Ones(3, 3), cache, ex.params, config),
            "dlogits shape = (3, 3): must be (T, E) = (2, 3)");
  const std::string note = " (pass the cache of the router_forward that made the logits)";
  EXPECT_EQ(backward(dlogits, RouterCacheT<double>{}, ex.params, config),
            "cache.input shape = (0, 0): must be (T, C) = (2, 2)" + note);
  EXPECT_EQ(backward(dlogits, cache, ex.params, make_config(2, 3, true, RouterNoise::jitter)),
            "cache.jitter shape = (0, 0): must be (T, C) = (2, 2)" + note);
  RouterParamsT<double> noisy_params = ex.params;
  noisy_params.noise_weight = MatrixD::Zero(3, 2);
  EXPECT_EQ(backward(dlogits, cache, noisy_params, make_config(2, 3, true, RouterNoise::noisy_topk)),
            "cache.noise shape = (0, 0): must be (T, E) = (2, 3)" + note);
  RouterParamsT<double> bad = ex.params;
  bad.bias.resize(0);
  EXPECT_EQ(backward(dlogits, cache, bad, config), "bias size = 0: must equal num_experts = 3 when use_bias");
  EXPECT_EQ(backward(dlogits, cache, ex.params, make_config(0, 3, true)), "hidden_size = 0: must be positive");
}

}  // namespace
}  // namespace moelab
