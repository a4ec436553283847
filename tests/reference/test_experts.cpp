// Tests of the expert stage: the expert FFN (forward and backward), initialisation, fine-grained
// segmentation, parameter and FLOP counts, and the shared-expert sigmoid gate.
// n = rows given to one expert, C = hidden size, H = intermediate size.
#include "reference/error.h"
#include "reference/experts.h"
#include "reference/observer.h"
#include "reference/random.h"
#include "reference/recorder.h"
#include "reference/types.h"
#include "tests/testing.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
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
constexpr std::array kActivations = {Activation::swiglu, Activation::gelu, Activation::relu,
                                     Activation::swiglu_clamped};

// Central differences in double (tests/testing.h): truncation O(h^2) and rounding O(eps / h) are
// both ~1e-10 relative at h = 1e-5, so 1e-7 leaves three orders of margin, while a wrong term in a
// backward (a missing factor, a wrong sign, a transposed weight) is an O(1) error.
constexpr double kGradientTolerance = 1e-7;

ExpertConfig make_config(Index C, Index H, Activation activation = Activation::swiglu, bool use_bias = false) {
  return ExpertConfig{.hidden_size = C, .intermediate_size = H, .activation = activation, .use_bias = use_bias};
}



template <typename Scalar>
bool bitwise_equal(const ExpertParamsT<Scalar>& a, const ExpertParamsT<Scalar>& b) {
  return bitwise_equal(a.w_gate, b.w_gate) && bitwise_equal(a.w_up, b.w_up) && bitwise_equal(a.w_down, b.w_down) &&
         bitwise_equal(a.b_gate, b.b_gate) && bitwise_equal(a.b_up, b.b_up) && bitwise_equal(a.b_down, b.b_down);
}

// Random parameters shaped by config, biases random too (zeros hide bugs).
ExpertParamsT<double> random_params(Rng& rng, const ExpertConfig& config, double sigma) {
  const Index C = config.hidden_size;
  const Index H = config.intermediate_size;
  const bool gated = is_gated(config.activation);
  ExpertParamsT<double> p;
  if (gated) p.w_gate = random_matrix(rng, H, C, sigma);
  p.w_up = random_matrix(rng, H, C, sigma);
  p.w_down = random_matrix(rng, C, H, sigma);
  if (config.use_bias) {
    if (gated) p.b_gate = random_matrix(rng, H, 1, sigma).col(0);
    p.b_up = random_matrix(rng, H, 1, sigma).col(0);
    p.b_down = random_matrix(rng, C, 1, sigma).col(0);
  }
  return p;
}

ExpertParamsT<float> to_float(const ExpertParamsT<double>& p) {
  return {.w_gate = p.w_gate.cast<float>(), .w_up = p.w_up.cast<float>(), .w_down = p.w_down.cast<float>(),
          .b_gate = p.b_gate.cast<float>(), .b_up = p.b_up.cast<float>(), .b_down = p.b_down.cast<float>()};
}

template <typename Scalar>
std::int64_t parameter_count(const ExpertParamsT<Scalar>& p) {
  return p.w_gate.size() + p.w_up.size() + p.w_down.size() + p.b_gate.size() + p.b_up.size() + p.b_down.size();
}

MatrixD forward(const MatrixD& x, const ExpertParamsT<double>& params, const ExpertConfig& config) {
  MatrixD y;
  ExpertCacheT<double> cache;
  expert_forward(y, cache, x, params, config);
  return y;
}

// --- names ---------------------------------------------------------------------------------------

TEST(Experts, ActivationNames) {
  EXPECT_EQ(activation_name(Activation::swiglu), "swiglu");
  EXPECT_EQ(activation_name(Activation::gelu), "gelu");
  EXPECT_EQ(activation_name(Activation::relu), "relu");
  EXPECT_EQ(activation_name(Activation::swiglu_clamped), "swiglu_clamped");
  for (const Activation a : kActivations) EXPECT_EQ(parse_activation(activation_name(a)), a);
  const std::string rule = ": must be one of swiglu, gelu, relu, swiglu_clamped";
  EXPECT_EQ(error_of([] { parse_activation("geglu"); }), "activation = \"geglu\"" + rule);
  EXPECT_EQ(error_of([] { parse_activation("SwiGLU"); }), "activation = \"SwiGLU\"" + rule);  // exact names
  EXPECT_EQ(error_of([] { parse_activation(""); }), "activation = \"\"" + rule);
  EXPECT_EQ(error_of([] { activation_name(static_cast<Activation>(9)); }),
            "activation = 9: is not a known Activation");
  EXPECT_TRUE(is_gated(Activation::swiglu));
  EXPECT_TRUE(is_gated(Activation::swiglu_clamped));
  EXPECT_FALSE(is_gated(Activation::gelu));
  EXPECT_FALSE(is_gated(Activation::relu));
}

// --- the activations at known points -------------------------------------------------------------
// One intermediate unit (C = 2, H = 1) that reads the activation off: x = [a, b] with
// W_gate = [1 0], W_up = [0 1] (gated: g = a, u = b) or W_up = [1 0] (gelu/relu: pre-activation a),
// W_down = [1 0]^T, so y = [h, 0]; and with dy = [1, 0], dx = [dh/da, dh/db].
struct Unit {
  MatrixD y, dx;
};

Unit unit(Activation activation, double a, double b, double limit = 7.0, double alpha = 1.702) {
  ExpertConfig config = make_config(2, 1, activation);
  config.swiglu_limit = limit;
  config.swiglu_alpha = alpha;
  ExpertParamsT<double> params{.w_gate = {}, .w_up = MatrixD{{1, 0}}, .w_down = MatrixD{{1}, {0}},
                               .b_gate = {}, .b_up = {}, .b_down = {}};
  if (is_gated(activation)) {
    params.w_gate = MatrixD{{1, 0}};
    params.w_up = MatrixD{{0, 1}};
  }
  const MatrixD x{{a, b}};
  Unit out;
  ExpertCacheT<double> cache;
  ExpertParamsT<double> grads;
  expert_forward(out.y, cache, x, params, config);
  expert_backward(out.dx, grads, MatrixD{{1, 0}}, cache, x, params, config);
  return out;
}

// Reference values to 18 digits (mpmath, 30 digits):
//   silu(z) = z sigmoid(z):   silu(1) = 0.731058578630004879, silu(-1) = -0.268941421369995121,
//                             silu(2) = 1.76159415595576489, silu(-3) = -0.142277619532700343
//   silu'(z) = s (1 + z (1 - s)): silu'(0) = 1/2, silu'(1) = 0.927670511871486732,
//                             silu'(-1) = 0.0723294881285132682
//   gelu(z) = z Phi(z):       gelu(1) = Phi(1) = 0.841344746068542949, gelu(-1) = -0.158655253931457051,
//                             gelu(2) = 1.95449973610364159, gelu(-3) = -0.00404969409489028358
//   gelu'(z) = Phi(z) + z phi(z): gelu'(0) = 1/2, gelu'(1) = 1.0833154705876863,
//                             gelu'(-1) = -0.0833154705876862984
// The bound 1e-15 absolute is a few roundings of values below 2 (ulp(1) = 2.2e-16). gelu(-3)'s
// 1 + erf(-3 / sqrt 2) = 0.0027 cancels ~2.6 digits, relative 1e-13, but of a value of 4e-3.
TEST(Experts, SiluAndGeluAtKnownPoints) {
  constexpr double kTol = 1e-15;
  // silu: the gate is a, the up value b = 1 passes it through: y = silu(a), dh/da = silu'(a).
  EXPECT_EQ(unit(Activation::swiglu, 0, 1).y(0, 0), 0.0);
  EXPECT_NEAR(unit(Activation::swiglu, 1, 1).y(0, 0), 0.731058578630004879, kTol);
  EXPECT_NEAR(unit(Activation::swiglu, -1, 1).y(0, 0), -0.268941421369995121, kTol);
  EXPECT_NEAR(unit(Activation::swiglu, 2, 1).y(0, 0), 1.76159415595576489, kTol);
  EXPECT_NEAR(unit(Activation::swiglu, -3, 1).y(0, 0), -0.142277619532700343, kTol);
  EXPECT_EQ(unit(Activation::swiglu, 0, 1).dx(0, 0), 0.5);
  EXPECT_NEAR(unit(Activation::swiglu, 1, 1).dx(0, 0), 0.927670511871486732, kTol);
  EXPECT_NEAR(unit(Activation::swiglu, -1, 1).dx(0, 0), 0.0723294881285132682, kTol);
  // The product: y = silu(a) b, so dh/db = silu(a).
  EXPECT_NEAR(unit(Activation::swiglu, 1, -3).y(0, 0), -3 * 0.731058578630004879, 4 * kTol);
  EXPECT_NEAR(unit(Activation::swiglu, 1, -3).dx(0, 1), 0.731058578630004879, kTol);

  EXPECT_EQ(unit(Activation::gelu, 0, 5).y(0, 0), 0.0);
  EXPECT_NEAR(unit(Activation::gelu, 1, 5).y(0, 0), 0.841344746068542949, kTol);
  EXPECT_NEAR(unit(Activation::gelu, -1, 5).y(0, 0), -0.158655253931457051, kTol);
  EXPECT_NEAR(unit(Activation::gelu, 2, 5).y(0, 0), 1.95449973610364159, kTol);
  EXPECT_NEAR(unit(Activation::gelu, -3, 5).y(0, 0), -0.00404969409489028358, kTol);
  EXPECT_EQ(unit(Activation::gelu, 0, 5).dx(0, 0), 0.5);
  EXPECT_NEAR(unit(Activation::gelu, 1, 5).dx(0, 0), 1.0833154705876863, kTol);
  EXPECT_NEAR(unit(Activation::gelu, -1, 5).dx(0, 0), -0.0833154705876862984, kTol);
  EXPECT_EQ(unit(Activation::gelu, 1, 5).dx(0, 1), 0.0);  // b is not read
  // Not the tanh approximation, whose gelu(1) = 0.841191990...: they differ by 1.5e-4.
  EXPECT_GT(std::abs(unit(Activation::gelu, 1, 5).y(0, 0) - 0.8411919906082768), 1e-4);

  // relu, and relu'(0) = 0 (as PyTorch: the gradient flows where the output is positive).
  EXPECT_EQ(unit(Activation::relu, 1.5, 5).y(0, 0), 1.5);
  EXPECT_EQ(unit(Activation::relu, -1.5, 5).y(0, 0), 0.0);
  EXPECT_EQ(unit(Activation::relu, 1.5, 5).dx(0, 0), 1.0);
  EXPECT_EQ(unit(Activation::relu, -1.5, 5).dx(0, 0), 0.0);
  EXPECT_EQ(unit(Activation::relu, 0, 5).dx(0, 0), 0.0);
}

// --- hand-worked examples, C = 2, H = 2, n = 2 -----------------------------------------------------
// Shared by all four (sigma(z) = 1 / (1 + e^-z); sigma(-z) = 1 - sigma(z)):
//   x = [ 1  2 ]      W_down = [ 1   2   ]      y = h W_down^T:  y_t0 = h_t0 + 2 h_t1
//       [-1  1 ]               [-1   0.5 ]                       y_t1 = -h_t0 + h_t1 / 2
// Expected values below from mpmath at 30 digits; the bound 1e-14 covers the few roundings of
// values below 4 that the double computation makes (ulp(4) = 8.9e-16).
constexpr double kHandTol = 1e-14;
const MatrixD kHandX{{1, 2}, {-1, 1}};
const MatrixD kHandWDown{{1, 2}, {-1, 0.5}};

// The parameters of the hand-worked clamped-SwiGLU example (HandWorkedSwigluClamped).
ExpertParamsT<double> clamped_hand_params() {
  return {.w_gate = MatrixD{{0.5, 0.5}, {1, 0.5}},
          .w_up = MatrixD{{0.5, 0.25}, {0.25, 0.5}},
          .w_down = kHandWDown,
          .b_gate = VectorD{{0.5, -2.5}},
          .b_up = VectorD{{0.5, -0.75}},
          .b_down = VectorD{{0.5, -0.25}}};
}

// swiglu, no bias:
//   W_gate = [1 0; 1 -1]        g = x W_gate^T = [ 1 -1; -1 -2]
//   W_up = [0.5 0.25; -1 1]     u = x W_up^T   = [ 1  1; -0.25 2]
//   h = silu(g) u = [sigma(1), -sigma(-1); sigma(-1) / 4, -4 sigma(-2)]
//   y_00 = sigma(1) - 2 sigma(-1) = 3 sigma(1) - 2     = 0.19317573589001464
//   y_01 = -sigma(1) - sigma(-1) / 2 = -(sigma(1) + 1) / 2 = -0.86552928931500244
//   y_10 = sigma(-1) / 4 - 8 sigma(-2)                 = -0.88638802083444167
//   y_11 = -sigma(-1) / 4 - 2 sigma(-2)                = -0.30564119938673389
TEST(Experts, HandWorkedSwiglu) {
  const ExpertParamsT<double> params{.w_gate = MatrixD{{1, 0}, {1, -1}}, .w_up = MatrixD{{0.5, 0.25}, {-1, 1}},
                                     .w_down = kHandWDown, .b_gate = {}, .b_up = {}, .b_down = {}};
  MatrixD y(5, 5);  // wrong size on purpose: it is resized
  ExpertCacheT<double> cache;
  expert_forward(y, cache, kHandX, params, make_config(2, 2, Activation::swiglu));
  EXPECT_TRUE(bitwise_equal(cache.gate_pre, MatrixD{{1, -1}, {-1, -2}})) << cache.gate_pre;
  EXPECT_TRUE(bitwise_equal(cache.up_pre, MatrixD{{1, 1}, {-0.25, 2}})) << cache.up_pre;
  const MatrixD expected{{0.19317573589001464, -0.86552928931500244},
                         {-0.88638802083444167, -0.30564119938673389}};
  ASSERT_EQ(y.rows(), 2);
  ASSERT_EQ(y.cols(), 2);
  EXPECT_LT((y - expected).cwiseAbs().maxCoeff(), kHandTol) << y;
}

// gelu (exact, erf), no bias:
//   W_up = [1 0; 1 -1]          a = x W_up^T = [ 1 -1; -1 -2]
//   h = a Phi(a) = [Phi(1), -Phi(-1); -Phi(-1), -2 Phi(-2)]
//   y_00 = Phi(1) - 2 Phi(-1)   = 0.52403423820562885     y_01 = -Phi(1) - Phi(-1) / 2 = -0.92067237303427147
//   y_10 = -Phi(-1) - 4 Phi(-2) = -0.24965578172417388    y_11 = Phi(-1) - Phi(-2)     = 0.13590512198327784
TEST(Experts, HandWorkedGelu) {
  const ExpertParamsT<double> params{.w_gate = {}, .w_up = MatrixD{{1, 0}, {1, -1}}, .w_down = kHandWDown,
                                     .b_gate = {}, .b_up = {}, .b_down = {}};
  MatrixD y;
  ExpertCacheT<double> cache;
  expert_forward(y, cache, kHandX, params, make_config(2, 2, Activation::gelu));
  EXPECT_EQ(cache.gate_pre.size(), 0);
  EXPECT_TRUE(bitwise_equal(cache.up_pre, MatrixD{{1, -1}, {-1, -2}}));
  const MatrixD expected{{0.52403423820562885, -0.92067237303427147},
                         {-0.24965578172417388, 0.13590512198327784}};
  EXPECT_LT((y - expected).cwiseAbs().maxCoeff(), kHandTol) << y;
}

// relu with biases; every number is dyadic, so forward and backward are exact (compared bitwise).
//   W_up = [1 0.5; -1 0.25], b_up = [-1 1]   a = x W_up^T + b_up = [1 0.5; -1.5 2.25]
//   h = relu(a) = [1 0.5; 0 2.25]             b_down = [0.5 -0.25]
//   y = h W_down^T + b_down = [1 + 1 + 0.5, -1 + 0.25 - 0.25; 0 + 4.5 + 0.5, 0 + 1.125 - 0.25]
//     = [2.5 -1; 5 0.875]
// Backward with dy = [1 -1; 0.5 2]:
//   dh = dy W_down = [1 + 1, 2 - 0.5; 0.5 - 2, 1 + 1] = [2 1.5; -1.5 2]
//   da = dh [a > 0] = [2 1.5; 0 2]                      (a_10 = -1.5 is off)
//   dW_up = da^T x = [2 (1, 2); 1.5 (1, 2) + 2 (-1, 1)] = [2 4; -0.5 5],   db_up = [2 3.5]
//   dW_down = dy^T h = [(1, 0.5) + 0.5 (0, 2.25); -(1, 0.5) + 2 (0, 2.25)] = [1 1.625; -1 4]
//   db_down = [1.5 1]
//   dx = da W_up = [2 (1, 0.5) + 1.5 (-1, 0.25); 2 (-1, 0.25)] = [0.5 1.375; -2 0.5]
template <typename Scalar>
void hand_worked_relu() {
  using M = MatrixT<Scalar>;
  using V = VectorT<Scalar>;
  const ExpertParamsT<Scalar> params{.w_gate = {}, .w_up = M{{1, 0.5}, {-1, 0.25}},
                                     .w_down = kHandWDown.cast<Scalar>(), .b_gate = {}, .b_up = V{{-1, 1}},
                                     .b_down = V{{0.5, -0.25}}};
  const M x = kHandX.cast<Scalar>();
  const ExpertConfig config = make_config(2, 2, Activation::relu, true);
  M y, dx;
  ExpertCacheT<Scalar> cache;
  ExpertParamsT<Scalar> grads;
  expert_forward(y, cache, x, params, config);
  EXPECT_TRUE(bitwise_equal(cache.up_pre, M{{1, 0.5}, {-1.5, 2.25}})) << cache.up_pre;
  EXPECT_TRUE(bitwise_equal(cache.hidden, M{{1, 0.5}, {0, 2.25}})) << cache.hidden;
  EXPECT_TRUE(bitwise_equal(y, M{{2.5, -1}, {5, 0.875}})) << y;

  expert_backward(dx, grads, M{{1, -1}, {0.5, 2}}, cache, x, params, config);
  EXPECT_TRUE(bitwise_equal(grads.w_up, M{{2, 4}, {-0.5, 5}})) << grads.w_up;
  EXPECT_TRUE(bitwise_equal(grads.b_up, V{{2, 3.5}})) << grads.b_up;
  EXPECT_TRUE(bitwise_equal(grads.w_down, M{{1, 1.625}, {-1, 4}})) << grads.w_down;
  EXPECT_TRUE(bitwise_equal(grads.b_down, V{{1.5, 1}})) << grads.b_down;
  EXPECT_TRUE(bitwise_equal(dx, M{{0.5, 1.375}, {-2, 0.5}})) << dx;
  EXPECT_EQ(grads.w_gate.size(), 0);
  EXPECT_EQ(grads.b_gate.size(), 0);
}

TEST(Experts, HandWorkedReluWithBias) {
  hand_worked_relu<float>();
  hand_worked_relu<double>();
}

// swiglu_clamped (gpt-oss) with biases, limit = 1 and alpha = 2 so that the clamps act on small
// numbers and glu(z) = z sigma(2 z) meets sigma at 1, 2 and -6:
//   W_gate = [0.5 0.5; 1 0.5],  b_gate = [0.5 -2.5]    g = [2 -0.5; 0.5 -3]
//   W_up = [0.5 0.25; 0.25 0.5], b_up = [0.5 -0.75]    u = [1.5 0.5; 0.25 -0.5]
//   g clamped above at 1:   [1 -0.5; 0.5 -3]  (g_00 = 2 clamped; g_11 = -3 is not: no lower clamp)
//   u clamped to [-1, 1]:   [1 0.5; 0.25 -0.5] (u_00 = 1.5 clamped)
//   h = glu(g) (u + 1) = [2 sigma(2), -0.75 sigma(-1); 0.625 sigma(1), -1.5 sigma(-6)]
//   b_down = [0.5 -0.25]
//   y_00 = 2 sigma(2) - 1.5 sigma(-1) + 0.5      = 1.8581820239007722
//   y_01 = -2 sigma(2) - 0.375 sigma(-1) - 0.25  = -2.1124471889695131
//   y_10 = 0.625 sigma(1) - 3 sigma(-6) + 0.5    = 0.94949374217384873
//   y_11 = -0.625 sigma(1) - 0.75 sigma(-6) - 0.25 = -0.70876607901122913
TEST(Experts, HandWorkedSwigluClamped) {
  const ExpertParamsT<double> params = clamped_hand_params();
  ExpertConfig config = make_config(2, 2, Activation::swiglu_clamped, true);
  config.swiglu_limit = 1;
  config.swiglu_alpha = 2;
  MatrixD y;
  ExpertCacheT<double> cache;
  expert_forward(y, cache, kHandX, params, config);
  // The cache keeps the values before the clamps: the backward needs them to know what was clamped.
  EXPECT_TRUE(bitwise_equal(cache.gate_pre, MatrixD{{2, -0.5}, {0.5, -3}})) << cache.gate_pre;
  EXPECT_TRUE(bitwise_equal(cache.up_pre, MatrixD{{1.5, 0.5}, {0.25, -0.5}})) << cache.up_pre;
  const MatrixD expected{{1.8581820239007722, -2.1124471889695131},
                         {0.94949374217384873, -0.70876607901122913}};
  EXPECT_LT((y - expected).cwiseAbs().maxCoeff(), kHandTol) << y;

  // Row 0 alone: its clamped g_00 and u_00 pass no gradient, so with n = 1 the bias gradients
  // (the column sums of dg and du) are exactly 0 there, and not at the unclamped g_01, u_01.
  MatrixD y0, dx0;
  ExpertCacheT<double> cache0;
  ExpertParamsT<double> grads;
  const MatrixD x0 = kHandX.topRows(1);
  expert_forward(y0, cache0, x0, params, config);
  expert_backward(dx0, grads, MatrixD{{1, 1}}, cache0, x0, params, config);
  EXPECT_EQ(grads.b_gate(0), 0.0);
  EXPECT_EQ(grads.b_up(0), 0.0);
  EXPECT_NE(grads.b_gate(1), 0.0);
  EXPECT_NE(grads.b_up(1), 0.0);
  EXPECT_TRUE((grads.w_gate.row(0).array() == 0.0).all());
  EXPECT_TRUE((grads.w_up.row(0).array() == 0.0).all());
}

// --- the clamped variant clamps ----------------------------------------------------------------
// With gpt-oss's limit 7 and alpha 1.702, through the unit of SiluAndGeluAtKnownPoints (g = a,
// u = b, y = glu(min(a, 7)) (clamp(b, -7, 7) + 1)).
TEST(Experts, SwigluClampedClampsAndPassesNoGradientBeyondTheLimit) {
  const Activation act = Activation::swiglu_clamped;
  const auto glu = [](double z) { return z / (1 + std::exp(-1.702 * z)); };
  // Inside the limits: the formula itself.
  EXPECT_NEAR(unit(act, 0.5, 2).y(0, 0), glu(0.5) * 3, 1e-15);
  EXPECT_NEAR(unit(act, 6.5, -6.5).y(0, 0), glu(6.5) * -5.5, 1e-13);

  // The gate is clamped above: any a >= 7 gives the output of a = 7, bit for bit.
  const double at_limit = unit(act, 7, 0.5).y(0, 0);
  EXPECT_NEAR(at_limit, 6.9999531283033172 * 1.5, 1e-13);  // glu(7) from mpmath
  for (const double a : {7.5, 8.0, 100.0, 1e300}) {
    EXPECT_EQ(unit(act, a, 0.5).y(0, 0), at_limit) << a;
    EXPECT_EQ(unit(act, a, 0.5).dx(0, 0), 0.0) << a;  // no gradient through the clamp
    EXPECT_NE(unit(act, a, 0.5).dx(0, 1), 0.0) << a;  // but u still gets one: glu(7)
  }
  // ... and not below: glu(-8) differs from glu(-7), with a gradient.
  EXPECT_NE(unit(act, -8, 0.5).y(0, 0), unit(act, -7, 0.5).y(0, 0));
  EXPECT_NE(unit(act, -8, 0.5).dx(0, 0), 0.0);
  EXPECT_NEAR(unit(act, -8, 0).y(0, 0), -9.76642886573037821e-6, 1e-19);

  // The up value is clamped to [-7, 7] on both sides.
  const double up_high = unit(act, 0.5, 7).y(0, 0);
  const double up_low = unit(act, 0.5, -7).y(0, 0);
  EXPECT_NEAR(up_high, glu(0.5) * 8, 1e-15);
  EXPECT_NEAR(up_low, glu(0.5) * -6, 1e-15);
  for (const double b : {7.25, 50.0, 1e300}) {
    EXPECT_EQ(unit(act, 0.5, b).y(0, 0), up_high) << b;
    EXPECT_EQ(unit(act, 0.5, -b).y(0, 0), up_low) << b;
    EXPECT_EQ(unit(act, 0.5, b).dx(0, 1), 0.0) << b;
    EXPECT_EQ(unit(act, 0.5, -b).dx(0, 1), 0.0) << b;
    EXPECT_NE(unit(act, 0.5, b).dx(0, 0), 0.0) << b;  // the gate is unclamped: it still learns
  }
  // At the limits themselves the gradient passes (as torch.clamp): glu(0.5) for u, and for g
  // (u + 1) glu'(7) = 1.5 * 1.00007307913691101 (mpmath).
  EXPECT_NEAR(unit(act, 0.5, 7).dx(0, 1), glu(0.5), 1e-15);
  EXPECT_NEAR(unit(act, 0.5, -7).dx(0, 1), glu(0.5), 1e-15);
  EXPECT_NEAR(unit(act, 7, 0.5).dx(0, 0), 1.5 * 1.00007307913691101, 1e-14);

  // The plain swiglu has no clamp: a = 100 is silu(100) = 100 (to 1e-43).
  EXPECT_EQ(unit(Activation::swiglu, 100, 1).y(0, 0), 100.0);
  EXPECT_EQ(unit(Activation::swiglu, 100, 1).dx(0, 0), 1.0);
}

// --- finite differences --------------------------------------------------------------------------

// d loss / d v for a bias vector v, by central differences (numerical_gradient wants a matrix).
template <typename Loss>
MatrixD numerical_vector_gradient(Loss&& loss, VectorD& v) {
  MatrixD m = v;  // (size, 1)
  const MatrixD g = numerical_gradient(
      [&] {
        v = m.col(0);
        return loss();
      },
      m);
  v = m.col(0);
  return g;
}

void check_gradients(Activation activation, bool use_bias) {
  SCOPED_TRACE(fmt::format("{}, use_bias = {}", activation_name(activation), use_bias));
  const Index n = 5, C = 4, H = 6;
  ExpertConfig config = make_config(C, H, activation, use_bias);
  config.swiglu_limit = 1.0;  // pre-activations have std ~1.4: many are clamped, many are not
  config.swiglu_alpha = 1.702;
  Rng init(100 + 10 * static_cast<int>(activation) + use_bias);
  MatrixD x = random_matrix(init, n, C);
  ExpertParamsT<double> params = random_params(init, config, 0.7);
  const MatrixD G = random_matrix(init, n, C);

  MatrixD y, dx;
  ExpertCacheT<double> cache;
  ExpertParamsT<double> grads;
  expert_forward(y, cache, x, params, config);
  expert_backward(dx, grads, G, cache, x, params, config);

  // relu (at 0) and the clamps (at +-limit) have kinks, where central differences straddle two
  // slopes. A step h = 1e-5 of any input moves a pre-activation by at most h * max(|x|, |W|, 1)
  // < 1e-4, so every pre-activation must lie 1e-3 away from a kink; the seeds are chosen so.
  const double limit = config.swiglu_limit;
  for (Index i = 0; i < n * H; ++i) {
    const double u = cache.up_pre.data()[i];
    if (activation == Activation::relu) {
      ASSERT_GT(std::abs(u), 1e-3) << i;
    }
    if (activation == Activation::swiglu_clamped) {
      const double g = cache.gate_pre.data()[i];
      ASSERT_GT(std::abs(g - limit), 1e-3) << i;
      ASSERT_GT(std::abs(std::abs(u) - limit), 1e-3) << i;
    }
  }
  if (activation == Activation::swiglu_clamped) {  // not vacuous: both clamps act somewhere
    EXPECT_GT((cache.gate_pre.array() > limit).count(), 0);
    EXPECT_GT((cache.gate_pre.array() < limit).count(), 0);
    EXPECT_GT((cache.up_pre.array().abs() > limit).count(), 0);
    EXPECT_GT((cache.up_pre.array().abs() < limit).count(), 0);
  }
  if (activation == Activation::relu) {
    EXPECT_GT((cache.up_pre.array() < 0).count(), 0);
    EXPECT_GT((cache.up_pre.array() > 0).count(), 0);
  }

  const auto loss = [&] {
    MatrixD out;
    ExpertCacheT<double> c;
    expert_forward(out, c, x, params, config);
    return G.cwiseProduct(out).sum();
  };
  const auto check = [&](const MatrixD& analytic, const MatrixD& numeric, const char* name) {
    EXPECT_LT(max_relative_error(analytic, numeric), kGradientTolerance)
        << name << "\n" << analytic << "\nnumeric\n" << numeric;
    EXPECT_GT(analytic.norm(), 0.1) << name;
  };

  check(dx, numerical_gradient(loss, x), "dx");
  check(grads.w_up, numerical_gradient(loss, params.w_up), "dw_up");
  check(grads.w_down, numerical_gradient(loss, params.w_down), "dw_down");
  if (is_gated(activation)) {
    check(grads.w_gate, numerical_gradient(loss, params.w_gate), "dw_gate");
  } else {
    EXPECT_EQ(grads.w_gate.size(), 0);
  }
  if (use_bias) {
    check(MatrixD(grads.b_up), numerical_vector_gradient(loss, params.b_up), "db_up");
    check(MatrixD(grads.b_down), numerical_vector_gradient(loss, params.b_down), "db_down");
    if (is_gated(activation)) {
      check(MatrixD(grads.b_gate), numerical_vector_gradient(loss, params.b_gate), "db_gate");
    } else {
      EXPECT_EQ(grads.b_gate.size(), 0);
    }
  } else {
    EXPECT_EQ(grads.b_gate.size(), 0);
    EXPECT_EQ(grads.b_up.size(), 0);
    EXPECT_EQ(grads.b_down.size(), 0);
  }
}

TEST(Experts, BackwardMatchesFiniteDifferences) {
  for (const Activation activation : kActivations) {
    for (const bool use_bias : {false, true}) check_gradients(activation, use_bias);
  }
}

TEST(Experts, FloatAgreesWithDouble) {
  for (const Activation activation : kActivations) {
    SCOPED_TRACE(activation_name(activation));
    const Index n = 8, C = 16, H = 24;
    const ExpertConfig config = make_config(C, H, activation, true);
    Rng init(200);
    const MatrixD x = random_matrix(init, n, C);
    const ExpertParamsT<double> params = random_params(init, config, 0.3);
    const MatrixD G = random_matrix(init, n, C);
    MatrixD y, dx;
    ExpertCacheT<double> cache;
    ExpertParamsT<double> grads;
    expert_forward(y, cache, x, params, config);
    expert_backward(dx, grads, G, cache, x, params, config);

    Matrix y_f, dx_f;
    ExpertCache cache_f;
    ExpertParams grads_f;
    const ExpertParams params_f = to_float(params);
    const Matrix x_f = x.cast<float>();
    expert_forward(y_f, cache_f, x_f, params_f, config);
    expert_backward(dx_f, grads_f, Matrix(G.cast<float>()), cache_f, x_f, params_f, config);
    // Inputs rounded to float (relative 6e-8), then sums of 16 to 24 terms of size ~1 through
    // two products: ~1e-6.
    EXPECT_LT((y_f.cast<double>() - y).cwiseAbs().maxCoeff(), 1e-5);
    EXPECT_LT((dx_f.cast<double>() - dx).cwiseAbs().maxCoeff(), 1e-5);
    EXPECT_LT((grads_f.w_up.cast<double>() - grads.w_up).cwiseAbs().maxCoeff(), 1e-5);
    EXPECT_LT((grads_f.w_down.cast<double>() - grads.w_down).cwiseAbs().maxCoeff(), 1e-5);
    EXPECT_LT((grads_f.b_down.cast<double>() - grads.b_down).cwiseAbs().maxCoeff(), 1e-5);
    if (is_gated(activation)) {
      EXPECT_LT((grads_f.w_gate.cast<double>() - grads.w_gate).cwiseAbs().maxCoeff(), 1e-5);
    }
  }
}

// --- no rows ---------------------------------------------------------------------------------------

TEST(Experts, NoRowsIsValid) {  // an expert no token was routed to
  for (const Activation activation : kActivations) {
    for (const bool use_bias : {false, true}) {
      SCOPED_TRACE(fmt::format("{}, use_bias = {}", activation_name(activation), use_bias));
      const Index C = 3, H = 4;
      const ExpertConfig config = make_config(C, H, activation, use_bias);
      Rng init(300);
      const ExpertParamsT<double> params = random_params(init, config, 1.0);
      const MatrixD x(0, C);
      MatrixD y(2, 2), dx(2, 2);
      ExpertCacheT<double> cache;
      ExpertParamsT<double> grads;
      MemoryRecorder rec;
      expert_forward(y, cache, x, params, config, &rec);
      EXPECT_EQ(y.rows(), 0);
      EXPECT_EQ(y.cols(), C);
      EXPECT_EQ(cache.hidden.rows(), 0);
      EXPECT_EQ(cache.hidden.cols(), H);
      const RecordedEvent e = rec.last(events::expert_hidden);
      EXPECT_EQ(e.stat("rows"), 0);
      EXPECT_TRUE(std::isnan(e.stat("hidden_rms")));  // statistics of nothing

      expert_backward(dx, grads, MatrixD(0, C), cache, x, params, config);
      EXPECT_EQ(dx.rows(), 0);
      EXPECT_EQ(dx.cols(), C);
      // Zero gradients, shaped like the parameters.
      EXPECT_TRUE(bitwise_equal(grads.w_up, MatrixD(MatrixD::Zero(H, C))));
      EXPECT_TRUE(bitwise_equal(grads.w_down, MatrixD(MatrixD::Zero(C, H))));
      EXPECT_TRUE(bitwise_equal(grads.w_gate, MatrixD(MatrixD::Zero(params.w_gate.rows(), params.w_gate.cols()))));
      EXPECT_TRUE(bitwise_equal(grads.b_gate, VectorD(VectorD::Zero(params.b_gate.size()))));
      EXPECT_TRUE(bitwise_equal(grads.b_up, VectorD(VectorD::Zero(params.b_up.size()))));
      EXPECT_TRUE(bitwise_equal(grads.b_down, VectorD(VectorD::Zero(params.b_down.size()))));
    }
  }
}

// --- instrumentation -------------------------------------------------------------------------------

TEST(Experts, EmitsHiddenStatistics) {
  // The relu hand example: h = [1 0.5; 0 2.25].
  const ExpertParamsT<double> relu_params{.w_gate = {}, .w_up = MatrixD{{1, 0.5}, {-1, 0.25}}, .w_down = kHandWDown,
                                          .b_gate = {}, .b_up = VectorD{{-1, 1}}, .b_down = VectorD{{0.5, -0.25}}};
  MatrixD y, without;
  ExpertCacheT<double> cache;
  MemoryRecorder rec;
  expert_forward(y, cache, kHandX, relu_params, make_config(2, 2, Activation::relu, true), &rec);
  ASSERT_EQ(rec.size(), 1u);
  RecordedEvent e = rec.last(events::expert_hidden);
  EXPECT_EQ(e.stat("rows"), 2);
  EXPECT_EQ(e.stat("hidden_rms"), std::sqrt((1 + 0.25 + 0 + 5.0625) / 4));
  EXPECT_EQ(e.stat("hidden_abs_max"), 2.25);
  EXPECT_EQ(e.stat("zero_fraction"), 0.25);  // relu switched off one of four
  EXPECT_EQ(e.stat("gate_clamped"), 0);
  EXPECT_EQ(e.stat("up_clamped"), 0);
  expert_forward(without, cache, kHandX, relu_params, make_config(2, 2, Activation::relu, true), nullptr);
  EXPECT_TRUE(bitwise_equal(y, without));
  EXPECT_EQ(rec.size(), 1u);

  // The clamped hand example: g_00 = 2 > 1 and u_00 = 1.5 > 1 are the clamped ones.
  const ExpertParamsT<double> clamped_params = clamped_hand_params();
  ExpertConfig config = make_config(2, 2, Activation::swiglu_clamped, true);
  config.swiglu_limit = 1;
  config.swiglu_alpha = 2;
  expert_forward(y, cache, kHandX, clamped_params, config, &rec);
  e = rec.last(events::expert_hidden);
  EXPECT_EQ(e.stat("gate_clamped"), 1);
  EXPECT_EQ(e.stat("up_clamped"), 1);
  EXPECT_EQ(e.stat("zero_fraction"), 0);
}

// --- initialisation ---------------------------------------------------------------------------------

TEST(Experts, InitIsSeededAndShapedByTheConfig) {
  const ExpertConfig config = make_config(6, 10, Activation::swiglu_clamped, true);
  Rng a(42), b(42), c(43);
  const ExpertParamsT<double> first = init_expert<double>(config, a);
  EXPECT_TRUE(bitwise_equal(first, init_expert<double>(config, b)));   // same seed, same bits
  EXPECT_FALSE(bitwise_equal(first, init_expert<double>(config, c)));  // another seed
  EXPECT_FALSE(bitwise_equal(first, init_expert<double>(config, a)));  // the next expert on one Rng
  EXPECT_EQ(first.w_gate.rows(), 10);
  EXPECT_EQ(first.w_gate.cols(), 6);
  EXPECT_EQ(first.w_up.rows(), 10);
  EXPECT_EQ(first.w_up.cols(), 6);
  EXPECT_EQ(first.w_down.rows(), 6);
  EXPECT_EQ(first.w_down.cols(), 10);
  EXPECT_TRUE(bitwise_equal(first.b_gate, VectorD(VectorD::Zero(10))));
  EXPECT_TRUE(bitwise_equal(first.b_up, VectorD(VectorD::Zero(10))));
  EXPECT_TRUE(bitwise_equal(first.b_down, VectorD(VectorD::Zero(6))));
  EXPECT_EQ(parameter_count(first), expert_parameters(config));

  // The draws, in order: w_gate, w_up, w_down, each row-major, init_std * rng.normal().
  Rng replay(42);
  for (const MatrixD* m : {&first.w_gate, &first.w_up, &first.w_down}) {
    for (Index i = 0; i < m->size(); ++i) ASSERT_EQ(m->data()[i], 0.02 * replay.normal()) << i;
  }
  // Float: the same draws, rounded.
  Rng f(42);
  const ExpertParams first_f = init_expert<float>(config, f);
  EXPECT_TRUE(bitwise_equal(first_f, to_float(first)));

  // gelu / relu: two matrices, no gate; without use_bias, no biases.
  for (const Activation act : {Activation::gelu, Activation::relu}) {
    Rng r(42);
    const ExpertParamsT<double> p = init_expert<double>(make_config(6, 10, act), r, 0.5);
    EXPECT_EQ(p.w_gate.size(), 0);
    EXPECT_EQ(p.w_up.rows(), 10);
    EXPECT_EQ(p.w_down.rows(), 6);
    EXPECT_EQ(p.b_gate.size() + p.b_up.size() + p.b_down.size(), 0);
    EXPECT_EQ(p.w_up(0, 0), 0.5 * Rng(42).normal());  // the first draw: w_up comes first here
  }
  Rng z(1);
  const ExpertParamsT<double> zeros = init_expert<double>(config, z, 0.0);
  EXPECT_EQ(zeros.w_down.cwiseAbs().maxCoeff(), 0.0);

  Rng r(1);
  EXPECT_EQ(error_of([&] { init_expert<double>(config, r, -1.0); }), "init_std = -1: must be finite and >= 0");
  EXPECT_EQ(error_of([&] { init_expert<double>(config, r, kNaN); }), "init_std = nan: must be finite and >= 0");
  EXPECT_EQ(error_of([&] { init_expert<float>(make_config(0, 4), r); }), "hidden_size = 0: must be positive");
}

// Each matrix of a C = 128, H = 256 expert holds N = 32768 draws of N(0, sigma^2). For normal
// samples the sample mean has standard deviation sigma / sqrt(N) = sigma / 181 and the sample std
// sigma / sqrt(2 N) = sigma / 256; the fraction within one sigma (0.6827) has sqrt(p (1 - p) / N) =
// 0.0026. The bounds are 5 of those standard deviations (a correct generator fails one of them
// with probability < 1e-6 per seed; the seed is fixed, so the test is deterministic), and a
// uniform distribution of the same std (0.577 within one sigma) fails the last one.
TEST(Experts, InitHasTheRequestedStd) {
  for (const double sigma : {0.02, 0.5}) {
    SCOPED_TRACE(sigma);
    const ExpertConfig config = make_config(128, 256, Activation::swiglu);
    Rng rng(7);
    const ExpertParamsT<double> p = init_expert<double>(config, rng, sigma);
    for (const MatrixD* m : {&p.w_gate, &p.w_up, &p.w_down}) {
      const double N = static_cast<double>(m->size());
      ASSERT_EQ(N, 32768.0);
      const double mean = m->mean();
      const double std_dev = std::sqrt((m->array() - mean).square().sum() / N);
      const double within = static_cast<double>((m->array().abs() < sigma).count()) / N;
      EXPECT_LT(std::abs(mean), 5 * sigma / std::sqrt(N)) << mean;
      EXPECT_LT(std::abs(std_dev / sigma - 1), 5 / std::sqrt(2 * N)) << std_dev;
      EXPECT_LT(std::abs(within - 0.6826894921370859), 5 * std::sqrt(0.6827 * 0.3173 / N)) << within;
    }
  }
}

// --- fine-grained segmentation ------------------------------------------------------------------------

TEST(Experts, SegmentsSumToTheOriginalExpert) {
  const Index n = 7, C = 6, H = 12;
  for (const Activation activation : kActivations) {
    for (const bool use_bias : {false, true}) {
      SCOPED_TRACE(fmt::format("{}, use_bias = {}", activation_name(activation), use_bias));
      ExpertConfig config = make_config(C, H, activation, use_bias);
      config.swiglu_limit = 1.0;  // so that the clamps act in the segments too
      Rng init(400);
      const MatrixD x = random_matrix(init, n, C);
      const ExpertParamsT<double> expert = random_params(init, config, 0.6);
      const MatrixD y = forward(x, expert, config);

      for (const int m : {1, 2, 3, 4, 6, 12}) {
        SCOPED_TRACE(m);
        const ExpertConfig seg_config = segmented_config(config, m);
        const Index Hm = H / m;
        EXPECT_EQ(seg_config.intermediate_size, Hm);
        EXPECT_EQ(seg_config.hidden_size, C);
        EXPECT_EQ(seg_config.activation, activation);
        const std::vector<ExpertParamsT<double>> segments = segment_expert(expert, config, m);
        ASSERT_EQ(segments.size(), static_cast<std::size_t>(m));

        MatrixD sum = MatrixD::Zero(n, C);
        for (int j = 0; j < m; ++j) {
          const ExpertParamsT<double>& s = segments[static_cast<std::size_t>(j)];
          sum += forward(x, s, seg_config);  // validates the segment's shapes against seg_config
          // Segment j is rows [j H/m, (j+1) H/m) of the gate and up projections, columns of down.
          EXPECT_TRUE(bitwise_equal(s.w_up, MatrixD(expert.w_up.middleRows(j * Hm, Hm))));
          EXPECT_TRUE(bitwise_equal(s.w_down, MatrixD(expert.w_down.middleCols(j * Hm, Hm))));
          if (is_gated(activation)) {
            EXPECT_TRUE(bitwise_equal(s.w_gate, MatrixD(expert.w_gate.middleRows(j * Hm, Hm))));
          }
          if (use_bias) {  // the down bias is kept once
            EXPECT_TRUE(bitwise_equal(s.b_down, j == 0 ? expert.b_down : VectorD(VectorD::Zero(C))));
            EXPECT_TRUE(bitwise_equal(s.b_up, VectorD(expert.b_up.segment(j * Hm, Hm))));
          }
        }
        // Only the down projection's sums are split differently: rounding, values of size ~1.
        EXPECT_LT((sum - y).cwiseAbs().maxCoeff(), 1e-12) << m;
        if (m == 1) {
          EXPECT_TRUE(bitwise_equal(segments[0], expert));
        }
      }
    }
  }
}

// DeepSeekMoE: m experts of H / m hold the parameters of one expert of H, and k m active segments
// cost the FLOPs of k experts. A down bias is the one exception: each segment carries its own (C),
// so m segments have (m - 1) C more parameters (its FLOPs are not counted).
TEST(Experts, SegmentationKeepsParametersAndFlops) {
  for (const Activation activation : kActivations) {
    for (const bool use_bias : {false, true}) {
      SCOPED_TRACE(fmt::format("{}, use_bias = {}", activation_name(activation), use_bias));
      const ExpertConfig config = make_config(7168, 2048, activation, use_bias);
      for (const int m : {1, 2, 4, 8, 16, 2048}) {
        const ExpertConfig seg = segmented_config(config, m);
        EXPECT_EQ(m * expert_parameters(seg), expert_parameters(config) + (use_bias ? (m - 1) * 7168 : 0)) << m;
        for (const int k : {1, 2, 6, 8}) {
          EXPECT_EQ(k * m * expert_flops_per_token(seg), k * expert_flops_per_token(config)) << m << " " << k;
        }
      }
      // And the counts match the tensors segment_expert makes.
      const ExpertConfig small = make_config(4, 12, activation, use_bias);
      Rng rng(5);
      const std::vector<ExpertParamsT<double>> segments = segment_expert(init_expert<double>(small, rng), small, 3);
      std::int64_t total = 0;
      for (const ExpertParamsT<double>& s : segments) {
        EXPECT_EQ(parameter_count(s), expert_parameters(segmented_config(small, 3)));
        total += parameter_count(s);
      }
      EXPECT_EQ(total, expert_parameters(small) + (use_bias ? 2 * 4 : 0));
    }
  }
}

TEST(Experts, SegmentationErrors) {
  const ExpertConfig config = make_config(2048, 1408);  // DeepSeekMoE 16B / DeepSeek-V2-Lite's H
  EXPECT_EQ(error_of([&] { segmented_config(config, 3); }),
            "intermediate_size = 1408: not divisible by the segmentation factor m = 3");
  EXPECT_EQ(error_of([&] { segmented_config(config, 4); }), "");
  EXPECT_EQ(error_of([&] { segmented_config(config, 0); }), "m = 0: the segmentation factor must be positive");
  EXPECT_EQ(error_of([&] { segmented_config(config, -2); }), "m = -2: the segmentation factor must be positive");
  EXPECT_EQ(error_of([&] { segmented_config(config, 2816); }),
            "intermediate_size = 1408: not divisible by the segmentation factor m = 2816");
  EXPECT_EQ(error_of([&] { segmented_config(make_config(2, 0), 1); }), "intermediate_size = 0: must be positive");

  const ExpertConfig small = make_config(2, 6);
  Rng rng(1);
  ExpertParamsT<double> expert = init_expert<double>(small, rng);
  EXPECT_EQ(error_of([&] { segment_expert(expert, small, 4); }),
            "intermediate_size = 6: not divisible by the segmentation factor m = 4");
  expert.w_down.resize(6, 2);  // transposed
  EXPECT_EQ(error_of([&] { segment_expert(expert, small, 2); }),
            "w_down shape = (6, 2): must be (hidden_size, intermediate_size) = (2, 6)");
}

// --- parameter and FLOP counts -------------------------------------------------------------------

TEST(Experts, ParameterAndFlopCounts) {
  // C = 2, H = 2: swiglu 3 * 4 weights (+ b_gate 2, b_up 2, b_down 2); gelu 2 * 4 (+ 2 + 2).
  EXPECT_EQ(expert_parameters(make_config(2, 2, Activation::swiglu)), 12);
  EXPECT_EQ(expert_parameters(make_config(2, 2, Activation::swiglu, true)), 18);
  EXPECT_EQ(expert_parameters(make_config(2, 2, Activation::swiglu_clamped, true)), 18);
  EXPECT_EQ(expert_parameters(make_config(2, 2, Activation::gelu)), 8);
  EXPECT_EQ(expert_parameters(make_config(2, 2, Activation::relu, true)), 12);
  EXPECT_EQ(expert_flops_per_token(make_config(2, 2, Activation::swiglu)), 24);
  EXPECT_EQ(expert_flops_per_token(make_config(2, 2, Activation::swiglu, true)), 24);  // biases not counted
  EXPECT_EQ(expert_flops_per_token(make_config(2, 2, Activation::relu)), 16);

  // Published experts. DeepSeek-V3: C = 7168, moe_intermediate_size = 2048, SwiGLU:
  // 3 * 7168 * 2048 = 44,040,192 parameters (gate, up and down: not 2 * C * H).
  EXPECT_EQ(expert_parameters(make_config(7168, 2048)), 44'040'192);
  EXPECT_EQ(expert_flops_per_token(make_config(7168, 2048)), 88'080'384);
  // Mixtral 8x7B: C = 4096, H = 14336, SwiGLU.
  EXPECT_EQ(expert_parameters(make_config(4096, 14336)), 176'160'768);
  // gpt-oss-120b: C = H = 2880, clamped SwiGLU with biases: 3 C H + 2 H + C.
  EXPECT_EQ(expert_parameters(make_config(2880, 2880, Activation::swiglu_clamped, true)), 24'891'840);
  // Switch-Base: T5-Base's FFN, C = 768, d_ff = 3072, ReLU, no biases.
  EXPECT_EQ(expert_parameters(make_config(768, 3072, Activation::relu)), 4'718'592);

  // Counts exceed 32 bits without overflow.
  EXPECT_EQ(expert_parameters(make_config(65536, 65536)), 3LL * 65536 * 65536);
  EXPECT_EQ(error_of([] { expert_parameters(make_config(0, 2)); }), "hidden_size = 0: must be positive");
  EXPECT_EQ(error_of([] { expert_flops_per_token(make_config(2, -1)); }), "intermediate_size = -1: must be positive");
}

// --- bad input -------------------------------------------------------------------------------------

TEST(Experts, BadConfigNamesTheField) {
  ExpertConfig config = make_config(2, 3);
  EXPECT_EQ(error_of([&] { config.validate(); }), "");
  config.hidden_size = 0;
  EXPECT_EQ(error_of([&] { config.validate(); }), "hidden_size = 0: must be positive");
  config = make_config(2, -4);
  EXPECT_EQ(error_of([&] { config.validate(); }), "intermediate_size = -4: must be positive");
  config = make_config(2, 3, static_cast<Activation>(9));
  EXPECT_EQ(error_of([&] { config.validate(); }), "activation = 9: is not a known Activation");
  config = make_config(2, 3);
  config.swiglu_limit = 0;
  EXPECT_EQ(error_of([&] { config.validate(); }), "swiglu_limit = 0: must be finite and > 0");
  config.swiglu_limit = kInf;
  EXPECT_EQ(error_of([&] { config.validate(); }), "swiglu_limit = inf: must be finite and > 0");
  config = make_config(2, 3, Activation::relu);  // checked whatever the activation
  config.swiglu_alpha = -1.702;
  EXPECT_EQ(error_of([&] { config.validate(); }), "swiglu_alpha = -1.702: must be finite and > 0");
  config.swiglu_alpha = kNaN;
  EXPECT_EQ(error_of([&] { config.validate(); }), "swiglu_alpha = nan: must be finite and > 0");

  // expert_forward validates the config too.
  Rng rng(1);
  const ExpertParamsT<double> params = init_expert<double>(make_config(2, 3, Activation::relu), rng);
  MatrixD y;
  ExpertCacheT<double> cache;
  EXPECT_EQ(error_of([&] { expert_forward(y, cache, MatrixD(MatrixD::Ones(1, 2)), params, config); }),
            "swiglu_alpha = nan: must be finite and > 0");
}

TEST(Experts, BadParametersNameTheMatrixAndItsShape) {
  const ExpertConfig config = make_config(2, 3, Activation::swiglu, true);  // C = 2, H = 3
  Rng rng(1);
  const ExpertParamsT<double> good = init_expert<double>(config, rng);
  const MatrixD x = MatrixD::Ones(4, 2);
  MatrixD y;
  ExpertCacheT<double> cache;
  const auto run = [&](const ExpertParamsT<double>& p, const ExpertConfig& c) {
    return error_of([&] { expert_forward(y, cache, x, p, c); });
  };
  EXPECT_EQ(run(good, config), "");

  ExpertParamsT<double> bad = good;
  bad.w_gate = MatrixD::Ones(2, 3);  // transposed: (C, H)
  EXPECT_EQ(run(bad, config), "w_gate shape = (2, 3): must be (intermediate_size, hidden_size) = (3, 2)");
  bad = good;
  bad.w_up.resize(0, 0);
  EXPECT_EQ(run(bad, config), "w_up shape = (0, 0): must be (intermediate_size, hidden_size) = (3, 2)");
  bad = good;
  bad.w_down = MatrixD::Ones(3, 2);  // transposed: (H, C)
  EXPECT_EQ(run(bad, config), "w_down shape = (3, 2): must be (hidden_size, intermediate_size) = (2, 3)");

  // Biases: present exactly when use_bias.
  bad = good;
  bad.b_gate.resize(0);
  EXPECT_EQ(run(bad, config), "b_gate size = 0: must equal intermediate_size = 3 when use_bias");
  bad = good;
  bad.b_up = VectorD::Ones(2);
  EXPECT_EQ(run(bad, config), "b_up size = 2: must equal intermediate_size = 3 when use_bias");
  bad = good;
  bad.b_down = VectorD::Ones(3);
  EXPECT_EQ(run(bad, config), "b_down size = 3: must equal hidden_size = 2 when use_bias");
  const ExpertConfig no_bias = make_config(2, 3, Activation::swiglu, false);
  EXPECT_EQ(run(good, no_bias), "b_gate size = 3: must be 0 when use_bias is false (set use_bias to add the bias)");
  bad = good;
  bad.b_gate.resize(0);
  bad.b_up.resize(0);
  EXPECT_EQ(run(bad, no_bias), "b_down size = 2: must be 0 when use_bias is false (set use_bias to add the bias)");

  // gelu / relu have no gate projection.
  const ExpertConfig relu = make_config(2, 3, Activation::relu, true);
  EXPECT_EQ(run(good, relu),
            "w_gate shape = (3, 2): must be (0, 0) for activation = relu (only the swiglu variants have a gate "
            "projection)");
  bad = good;
  bad.w_gate.resize(0, 0);
  EXPECT_EQ(run(bad, relu),
            "b_gate size = 3: must be 0 for activation = relu (only the swiglu variants have a gate projection)");
  bad.b_gate.resize(0);
  EXPECT_EQ(run(bad, relu), "");
  EXPECT_EQ(run(good, make_config(2, 3, Activation::gelu, false)),
            "w_gate shape = (3, 2): must be (0, 0) for activation = gelu (only the swiglu variants have a gate "
            "projection)");

  // The input.
  EXPECT_EQ(error_of([&] { expert_forward(y, cache, MatrixD(MatrixD::Ones(4, 3)), good, config); }),
            "x.cols() = 3: must equal hidden_size = 2");
}

TEST(Experts, BadBackwardInputsNameTheField) {
  const ExpertConfig config = make_config(2, 3, Activation::swiglu_clamped, true);
  Rng rng(1);
  const ExpertParamsT<double> params = init_expert<double>(config, rng);
  const MatrixD x = MatrixD::Ones(4, 2);
  MatrixD y, dx;
  ExpertCacheT<double> cache;
  ExpertParamsT<double> grads;
  expert_forward(y, cache, x, params, config);
  const MatrixD dy = MatrixD::Ones(4, 2);
  const auto run = [&](const MatrixD& g, const ExpertCacheT<double>& c) {
    return error_of([&] { expert_backward(dx, grads, g, c, x, params, config); });
  };
  EXPECT_EQ(run(dy, cache), "");
  EXPECT_EQ(run(MatrixD::Ones(4, 3), cache), "dy shape = (4, 3): must be (n, C) = (4, 2)");
  EXPECT_EQ(run(MatrixD::Ones(3, 2), cache), "dy shape = (3, 2): must be (n, C) = (4, 2)");
  const std::string note = " (pass the cache of the expert_forward that made y)";
  EXPECT_EQ(run(dy, ExpertCacheT<double>{}), "cache.gate_pre shape = (0, 0): must be (n, H) = (4, 3)" + note);
  ExpertCacheT<double> bad = cache;
  bad.up_pre.resize(4, 2);
  EXPECT_EQ(run(dy, bad), "cache.up_pre shape = (4, 2): must be (n, H) = (4, 3)" + note);
  bad = cache;
  bad.hidden.resize(1, 3);
  EXPECT_EQ(run(dy, bad), "cache.hidden shape = (1, 3): must be (n, H) = (4, 3)" + note);
  EXPECT_EQ(error_of([&] { expert_backward(dx, grads, dy, cache, MatrixD(MatrixD::Ones(4, 3)), params, config); }),
            "x.cols() = 3: must equal hidden_size = 2");
}

// --- the shared expert's sigmoid gate (Qwen2-MoE) --------------------------------------------------

// x = [1 2; -1 2], w = [0.5 -0.25]:  z = x w^T = [0, -1],  gate = [1/2, sigma(-1)]
// shared_out = [2 -4; 1 3]:  y = [1 -2; sigma(-1), 3 sigma(-1)] = [1 -2; 0.268941421369995121 0.806824264109985363]
// Backward with dy = [1 1; 0 0]:  dshared_out = gate * dy = [0.5 0.5; 0 0]
//   dgate_0 = dy_0 . shared_out_0 = 2 - 4 = -2,  dz_0 = -2 * (1/2)(1/2) = -0.5,  dz_1 = 0
//   dw = dz^T x = -0.5 (1, 2) = [-0.5 -1],  dx = dz w = [-0.25 0.125; 0 -0]  (0 * -0.25 = -0)
TEST(Experts, SharedGateHandWorked) {
  const MatrixD x{{1, 2}, {-1, 2}};
  const MatrixD w{{0.5, -0.25}};
  const MatrixD shared_out{{2, -4}, {1, 3}};
  MatrixD y;
  VectorD gate;
  shared_gate_forward(y, gate, x, w, shared_out);
  ASSERT_EQ(gate.size(), 2);
  EXPECT_EQ(gate(0), 0.5);
  EXPECT_NEAR(gate(1), 0.268941421369995121, 1e-16);
  EXPECT_EQ(y(0, 0), 1.0);
  EXPECT_EQ(y(0, 1), -2.0);
  EXPECT_NEAR(y(1, 0), 0.268941421369995121, 1e-16);
  EXPECT_NEAR(y(1, 1), 0.806824264109985363, 2e-16);

  MatrixD dx, dw, dshared;
  shared_gate_backward(dx, dw, dshared, MatrixD{{1, 1}, {0, 0}}, gate, x, w, shared_out);
  EXPECT_TRUE(bitwise_equal(dshared, MatrixD{{0.5, 0.5}, {0, 0}})) << dshared;
  EXPECT_TRUE(bitwise_equal(dw, MatrixD{{-0.5, -1}})) << dw;
  EXPECT_TRUE(bitwise_equal(dx, MatrixD{{-0.25, 0.125}, {0, -0.0}})) << dx;
}

TEST(Experts, SharedGateBackwardMatchesFiniteDifferences) {
  const Index n = 5, C = 3;
  Rng init(500);
  MatrixD x = random_matrix(init, n, C);
  MatrixD w = random_matrix(init, 1, C);
  MatrixD shared_out = random_matrix(init, n, C);
  const MatrixD G = random_matrix(init, n, C);
  const auto loss = [&] {
    MatrixD y;
    VectorD gate;
    shared_gate_forward(y, gate, x, w, shared_out);
    return G.cwiseProduct(y).sum();
  };
  MatrixD y, dx, dw, dshared;
  VectorD gate;
  shared_gate_forward(y, gate, x, w, shared_out);
  shared_gate_backward(dx, dw, dshared, G, gate, x, w, shared_out);
  EXPECT_LT(max_relative_error(dx, numerical_gradient(loss, x)), kGradientTolerance) << dx;
  EXPECT_LT(max_relative_error(dw, numerical_gradient(loss, w)), kGradientTolerance) << dw;
  EXPECT_LT(max_relative_error(dshared, numerical_gradient(loss, shared_out)), kGradientTolerance) << dshared;
  EXPECT_GT(dx.norm(), 0.1);
  EXPECT_GT(dw.norm(), 0.1);
}

// A Qwen2-MoE shared expert end to end: y = sigmoid(x w^T) * FFN(x). x reaches y along two paths,
// so dx = (gate path) + expert_backward(dshared_out); checked against finite differences in x.
TEST(Experts, GatedSharedExpertBackwardMatchesFiniteDifferences) {
  const Index n = 4, C = 3, H = 5;
  const ExpertConfig config = make_config(C, H, Activation::swiglu);
  Rng init(600);
  MatrixD x = random_matrix(init, n, C);
  ExpertParamsT<double> params = random_params(init, config, 0.8);
  MatrixD w = random_matrix(init, 1, C);
  const MatrixD G = random_matrix(init, n, C);
  const auto loss = [&] {
    MatrixD shared, y;
    VectorD gate;
    ExpertCacheT<double> cache;
    expert_forward(shared, cache, x, params, config);
    shared_gate_forward(y, gate, x, w, shared);
    return G.cwiseProduct(y).sum();
  };
  MatrixD shared, y, dx_gate, dw, dshared, dx_expert;
  VectorD gate;
  ExpertCacheT<double> cache;
  ExpertParamsT<double> grads;
  expert_forward(shared, cache, x, params, config);
  shared_gate_forward(y, gate, x, w, shared);
  shared_gate_backward(dx_gate, dw, dshared, G, gate, x, w, shared);
  expert_backward(dx_expert, grads, dshared, cache, x, params, config);
  const MatrixD dx = dx_gate + dx_expert;
  EXPECT_LT(max_relative_error(dx, numerical_gradient(loss, x)), kGradientTolerance) << dx;
  EXPECT_LT(max_relative_error(dw, numerical_gradient(loss, w)), kGradientTolerance) << dw;
  EXPECT_LT(max_relative_error(grads.w_gate, numerical_gradient(loss, params.w_gate)), kGradientTolerance);
  EXPECT_GT(dx_gate.norm(), 0.01);  // both paths contribute
  EXPECT_GT(dx_expert.norm(), 0.01);
}

TEST(Experts, SharedGateShapesAndNoRows) {
  const MatrixD x = MatrixD::Ones(2, 2);
  const MatrixD w = MatrixD::Ones(1, 2);
  const MatrixD shared_out = MatrixD::Ones(2, 2);
  MatrixD y, dx, dw, dshared;
  VectorD gate;
  EXPECT_EQ(error_of([&] { shared_gate_forward(y, gate, x, MatrixD(MatrixD::Ones(2, 1)), shared_out); }),
            "w shape = (2, 1): must be (1, C) = (1, 2)");
  EXPECT_EQ(error_of([&] { shared_gate_forward(y, gate, x, w, MatrixD(MatrixD::Ones(3, 2))); }),
            "shared_out shape = (3, 2): must be (n, C) = (2, 2)");
  shared_gate_forward(y, gate, x, w, shared_out);
  const auto backward = [&](const MatrixD& dy, const VectorD& g) {
    return error_of([&] { shared_gate_backward(dx, dw, dshared, dy, g, x, w, shared_out); });
  };
  EXPECT_EQ(backward(shared_out, gate), "");
  EXPECT_EQ(backward(MatrixD::Ones(2, 3), gate), "dy shape = (2, 3): must be (n, C) = (2, 2)");
  EXPECT_EQ(backward(shared_out, VectorD::Ones(1)),
            "gate size = 1: must equal n = 2 (pass the gate of the shared_gate_forward that made y)");

  const MatrixD none(0, 2);
  shared_gate_forward(y, gate, none, w, none);
  EXPECT_EQ(y.rows(), 0);
  EXPECT_EQ(gate.size(), 0);
  shared_gate_backward(dx, dw, dshared, none, gate, none, w, none);
  EXPECT_EQ(dx.rows(), 0);
  EXPECT_TRUE(bitwise_equal(dw, MatrixD(MatrixD::Zero(1, 2))));
}

}  // namespace
}  // namespace moelab
