// Tests of the optimiser pieces (reference/optim.h): parameter references, AdamW (hand-worked
// steps from the formula, a double-precision restatement over many steps), the learning-rate
// schedule at its landmarks, global-norm clipping, and every Error.
#include "reference/error.h"
#include "reference/optim.h"
#include "reference/random.h"
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
using moelab::testing::random_matrix;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr float kNaNf = std::numeric_limits<float>::quiet_NaN();
constexpr float kInff = std::numeric_limits<float>::infinity();

using MatrixF = MatrixT<float>;
using VectorF = VectorT<float>;

// --- parameters -------------------------------------------------------------------------------------

TEST(ParamRef, ViewsTheCurrentStorage) {
  MatrixF w = MatrixF::Ones(2, 3);
  MatrixF dw;  // empty until the backward runs
  const ParamRef ref("w", w, dw, true);
  EXPECT_EQ(ref.name(), "w");
  EXPECT_TRUE(ref.weight_decay());
  EXPECT_EQ(ref.value().data(), w.data());
  EXPECT_EQ(ref.value().size(), 6u);
  EXPECT_EQ(error_of([&] { ref.grad(); }),
            "gradient size of w = 0: must equal the parameter's size = 6 (run the backward before the step)");
  // A backward that move-assigns a fresh matrix: the reference follows it.
  dw = MatrixF::Constant(2, 3, 0.5f);
  EXPECT_EQ(ref.grad().data(), dw.data());
  EXPECT_EQ(ref.grad()[5], 0.5f);

  VectorF b = VectorF::Zero(4);
  VectorF db = VectorF::Ones(4);
  const ParamRef bias("b", b, db, false);
  EXPECT_FALSE(bias.weight_decay());
  EXPECT_EQ(bias.value().data(), b.data());
  EXPECT_EQ(bias.grad().size(), 4u);
}

// --- AdamW ------------------------------------------------------------------------------------------

TEST(AdamW, TwoStepsByHand) {
  // One scalar parameter p = 1, lr = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.01.
  // Step 1, g = 0.5:
  //   p = 1 (1 - 0.1 * 0.01) = 0.999
  //   m = 0.1 * 0.5 = 0.05,  v = 0.001 * 0.25 = 0.00025
  //   m_hat = 0.05 / (1 - 0.9) = 0.5,  v_hat = 0.00025 / (1 - 0.999) = 0.25,  sqrt(v_hat) = 0.5
  //   p = 0.999 - 0.1 * 0.5 / (0.5 + 1e-8) = 0.999 - 0.099999998 = 0.899000002
  // Step 2, g = -0.25:
  //   p = 0.899000002 * 0.999 = 0.898101001998
  //   m = 0.9 * 0.05 + 0.1 * (-0.25) = 0.02,  v = 0.999 * 0.00025 + 0.001 * 0.0625 = 0.00031225
  //   m_hat = 0.02 / (1 - 0.81) = 0.105263157894737,  v_hat = 0.00031225 / (1 - 0.998001) = 0.156203101550776
  //   sqrt(v_hat) = 0.395225380701667
  //   p = 0.898101001998 - 0.1 * 0.105263157894737 / (0.395225380701667 + 1e-8)
  //     = 0.898101001998 - 0.0266337032921536 = 0.871467298705846
  // In float32 each value carries a few roundings of 6e-8 relative (0.1f and 0.001f, the float
  // coefficients 1 - b1 and 1 - b2, are themselves 1.5e-8 and 4.7e-8 off): 2e-7 absolute for p,
  // 5e-7 relative for m and v.
  MatrixF p{{1.0f}};
  MatrixF g{{0.5f}};
  MatrixF q{{1.0f}};  // the same, without weight decay
  MatrixF gq{{0.5f}};
  AdamW adamw({ParamRef("p", p, g, true), ParamRef("q", q, gq, false)},
              AdamWConfig{.lr = 0.1, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01});
  adamw.step();
  EXPECT_NEAR(p(0, 0), 0.899000002, 2e-7);
  EXPECT_NEAR(q(0, 0), 1.0 - 0.099999998, 2e-7);  // no decay: 0.900000002
  EXPECT_NEAR(adamw.state()[0].exp_avg[0], 0.05, 2.5e-8);
  EXPECT_NEAR(adamw.state()[0].exp_avg_sq[0], 0.00025, 1.25e-10);
  EXPECT_EQ(adamw.state()[0].step, 1);
  g(0, 0) = -0.25f;
  adamw.step();
  EXPECT_NEAR(p(0, 0), 0.871467298705846, 2e-7);
  EXPECT_NEAR(adamw.state()[0].exp_avg[0], 0.02, 1e-8);
  EXPECT_NEAR(adamw.state()[0].exp_avg_sq[0], 0.00031225, 1.6e-10);
  EXPECT_EQ(adamw.state()[0].step, 2);
  EXPECT_EQ(adamw.state()[1].step, 2);
}

TEST(AdamW, MatchesTheFormulaInDoubleOverManySteps) {
  // The textbook form (p - lr wd p, m_hat, v_hat, p - lr m_hat / (sqrt(v_hat) + eps)) in double,
  // against the float implementation in PyTorch's evaluation order: ten steps on random gradients
  // with a different lr at every step (as under a schedule), weight decay on the matrix only.
  Rng rng(21);
  const AdamWConfig config{.lr = 1e-2, .beta1 = 0.8, .beta2 = 0.95, .eps = 1e-6, .weight_decay = 0.1};
  MatrixD w = random_matrix(rng, 3, 4);
  MatrixD b = random_matrix(rng, 4, 1);
  MatrixF wf = w.cast<float>();
  MatrixF dwf(3, 4);
  VectorF bf = b.col(0).cast<float>();
  VectorF dbf(4);
  w = wf.cast<double>();  // start from the same (float) values
  b = MatrixD(bf.cast<double>());
  AdamW adamw({ParamRef("w", wf, dwf, true), ParamRef("b", bf, dbf, false)}, config);
  MatrixD mw = MatrixD::Zero(3, 4), vw = MatrixD::Zero(3, 4), mb = MatrixD::Zero(4, 1), vb = MatrixD::Zero(4, 1);
  for (int t = 1; t <= 10; ++t) {
    const double lr = config.lr * (1.0 + 0.1 * t);
    const MatrixD gw = random_matrix(rng, 3, 4, t % 2 == 0 ? 1e-3 : 1.0).cast<float>().cast<double>();
    const MatrixD gb = random_matrix(rng, 4, 1).cast<float>().cast<double>();
    dwf = gw.cast<float>();
    dbf = gb.col(0).cast<float>();
    adamw.step(lr);
    const auto update = [&](MatrixD& p, MatrixD& m, MatrixD& v, const MatrixD& grad, bool decay) {
      if (decay) p -= lr * config.weight_decay * p;
      m = config.beta1 * m + (1 - config.beta1) * grad;
      v = config.beta2 * v + (1 - config.beta2) * grad.cwiseProduct(grad);
      const MatrixD m_hat = m / (1 - std::pow(config.beta1, t));
      const MatrixD v_hat = v / (1 - std::pow(config.beta2, t));
      p.array() -= lr * m_hat.array() / (v_hat.array().sqrt() + config.eps);
    };
    update(w, mw, vw, gw, true);
    update(b, mb, vb, gb, false);
    // Parameters of order 1 in float: a few roundings of 6e-8 per step, over ten steps.
    EXPECT_LT((wf.cast<double>() - w).cwiseAbs().maxCoeff(), 2e-6) << "step " << t;
    EXPECT_LT((MatrixD(bf.cast<double>()) - b).cwiseAbs().maxCoeff(), 2e-6) << "step " << t;
  }
}

TEST(AdamW, ZeroLearningRateMovesNothingButTheMoments) {
  MatrixF p{{1.5f, -2.0f}};
  MatrixF g{{0.5f, 0.25f}};
  const MatrixF before = p;
  AdamW adamw({ParamRef("p", p, g)}, AdamWConfig{});
  adamw.step(0.0);
  EXPECT_TRUE(bitwise_equal(p, before));
  EXPECT_EQ(adamw.state()[0].step, 1);
  EXPECT_NEAR(adamw.state()[0].exp_avg[1], 0.025, 1.25e-8);
}

TEST(AdamW, Errors) {
  const auto message = [](AdamWConfig config) { return error_of([&] { config.validate(); }); };
  EXPECT_EQ(message(AdamWConfig{}), "");
  EXPECT_EQ(message(AdamWConfig{.lr = -1}), "lr = -1: must be finite and >= 0");
  EXPECT_EQ(message(AdamWConfig{.lr = kNaN}), "lr = nan: must be finite and >= 0");
  EXPECT_EQ(message(AdamWConfig{.beta1 = 1}), "beta1 = 1: must be in [0, 1)");
  EXPECT_EQ(message(AdamWConfig{.beta1 = -0.1}), "beta1 = -0.1: must be in [0, 1)");
  EXPECT_EQ(message(AdamWConfig{.beta2 = 1.5}), "beta2 = 1.5: must be in [0, 1)");
  EXPECT_EQ(message(AdamWConfig{.beta2 = kNaN}), "beta2 = nan: must be in [0, 1)");
  EXPECT_EQ(message(AdamWConfig{.eps = -1e-8}), "eps = -1e-08: must be finite and >= 0");
  EXPECT_EQ(message(AdamWConfig{.weight_decay = kInf}), "weight_decay = inf: must be finite and >= 0");
  EXPECT_EQ(message(AdamWConfig{.weight_decay = -0.1}), "weight_decay = -0.1: must be finite and >= 0");

  MatrixF p = MatrixF::Ones(2, 3);
  MatrixF g;
  MatrixF q = MatrixF::Ones(1, 1);
  MatrixF gq = MatrixF::Ones(1, 1);
  EXPECT_EQ(error_of([&] { AdamW({ParamRef("p", p, g), ParamRef("p", q, gq)}, AdamWConfig{}); }),
            "parameter name = p: appears twice in the list");
  EXPECT_EQ(error_of([&] { AdamW({ParamRef("p", p, g)}, AdamWConfig{.beta1 = 2}); }), "beta1 = 2: must be in [0, 1)");
  AdamW adamw({ParamRef("p", p, g)}, AdamWConfig{});
  EXPECT_EQ(error_of([&] { adamw.step(); }),
            "gradient size of p = 0: must equal the parameter's size = 6 (run the backward before the step)");
  g = MatrixF::Ones(2, 3);
  EXPECT_EQ(error_of([&] { adamw.step(-1.0); }), "lr = -1: must be finite and >= 0");
  EXPECT_EQ(error_of([&] { adamw.step(kInf); }), "lr = inf: must be finite and >= 0");
  adamw.state()[0].exp_avg.resize(3);
  EXPECT_EQ(error_of([&] { adamw.step(); }), "AdamW state size of p = (3, 6): must equal the parameter's size = 6");
  adamw.state()[0].exp_avg.assign(6, 0.0f);
  EXPECT_EQ(error_of([&] { adamw.step(); }), "");
}

// --- learning-rate schedule -------------------------------------------------------------------------

TEST(LrSchedule, Landmarks) {
  // lr = 1e-3, min_lr = 1e-4, warm-up 10 steps, 110 steps in all (100 of cosine).
  const LrScheduleConfig config{.lr = 1e-3, .min_lr = 1e-4, .warmup_steps = 10, .total_steps = 110};
  EXPECT_DOUBLE_EQ(learning_rate(config, 0), 1e-4);   // 1e-3 * 1 / 10
  EXPECT_DOUBLE_EQ(learning_rate(config, 4), 5e-4);   // 1e-3 * 5 / 10
  EXPECT_DOUBLE_EQ(learning_rate(config, 9), 1e-3);   // warmup - 1: lr * 10 / 10
  EXPECT_DOUBLE_EQ(learning_rate(config, 10), 1e-3);  // warmup: the cosine at r = 0
  // The midpoint 10 + 100 / 2 = 60: r = 1/2, cos(pi / 2) = 0: (lr + min_lr) / 2.
  EXPECT_NEAR(learning_rate(config, 60), 5.5e-4, 1e-18);
  // The last step 109: r = 0.99, 1e-4 + (1 + cos(0.99 pi)) / 2 * 9e-4 = 1.0022204783542078e-4.
  EXPECT_NEAR(learning_rate(config, 109), 1.0022204783542078e-4, 1e-18);
  EXPECT_EQ(learning_rate(config, 110), 1e-4);   // the cosine's end, and after it
  EXPECT_EQ(learning_rate(config, 1000), 1e-4);
  for (std::int64_t s = 1; s < 10; ++s) EXPECT_GT(learning_rate(config, s), learning_rate(config, s - 1));
  for (std::int64_t s = 11; s < 120; ++s) EXPECT_LE(learning_rate(config, s), learning_rate(config, s - 1));

  // No warm-up: the cosine starts at lr at step 0. All warm-up: min_lr once it is over.
  EXPECT_EQ(learning_rate(LrScheduleConfig{.lr = 2e-3, .min_lr = 0, .warmup_steps = 0, .total_steps = 4}, 0), 2e-3);
  EXPECT_NEAR(learning_rate(LrScheduleConfig{.lr = 2e-3, .min_lr = 0, .warmup_steps = 0, .total_steps = 4}, 2), 1e-3,
              1e-18);
  const LrScheduleConfig all_warmup{.lr = 1.0, .min_lr = 0.5, .warmup_steps = 4, .total_steps = 4};
  EXPECT_EQ(learning_rate(all_warmup, 0), 0.25);
  EXPECT_EQ(learning_rate(all_warmup, 3), 1.0);
  EXPECT_EQ(learning_rate(all_warmup, 4), 0.5);
}

TEST(LrSchedule, Errors) {
  const auto message = [](LrScheduleConfig config) { return error_of([&] { config.validate(); }); };
  const LrScheduleConfig ok{.lr = 1e-3, .min_lr = 1e-4, .warmup_steps = 10, .total_steps = 110};
  EXPECT_EQ(message(ok), "");
  LrScheduleConfig c = ok;
  c.lr = 0;
  EXPECT_EQ(message(c), "lr = 0: must be finite and > 0");
  c.lr = kInf;
  EXPECT_EQ(message(c), "lr = inf: must be finite and > 0");
  c = ok;
  c.min_lr = 2e-3;
  EXPECT_EQ(message(c), "min_lr = 0.002: must be in [0, lr = 0.001]");
  c.min_lr = -1e-4;
  EXPECT_EQ(message(c), "min_lr = -0.0001: must be in [0, lr = 0.001]");
  c = ok;
  c.total_steps = 0;
  EXPECT_EQ(message(c), "total_steps = 0: must be positive");
  c = ok;
  c.warmup_steps = -1;
  EXPECT_EQ(message(c), "warmup_steps = -1: must be in [0, total_steps = 110]");
  c.warmup_steps = 111;
  EXPECT_EQ(message(c), "warmup_steps = 111: must be in [0, total_steps = 110]");
  EXPECT_EQ(error_of([&] { learning_rate(ok, -1); }), "step = -1: must be >= 0");
  EXPECT_EQ(error_of([&] { learning_rate(c, 0); }), "warmup_steps = 111: must be in [0, total_steps = 110]");
}

// --- gradient clipping ------------------------------------------------------------------------------

TEST(ClipGradNorm, HandWorked) {
  // g = [3, 4]: total = 5; max_norm 1: coef = 1 / (5 + 1e-6), g = [3, 4] / 5.000001
  // = [0.6, 0.8] / (1 + 2e-7) = [0.59999988, 0.79999984].
  MatrixF w = MatrixF::Zero(1, 2);
  MatrixF g{{3.0f, 4.0f}};
  std::vector<ParamRef> params = {ParamRef("w", w, g)};
  EXPECT_EQ(clip_grad_norm(params, 1.0), 5.0);
  EXPECT_EQ(g(0, 0), static_cast<float>(1.0 / (5.0 + 1e-6)) * 3.0f);
  EXPECT_NEAR(g(0, 0), 0.6 / (1 + 2e-7), 1e-7);
  EXPECT_NEAR(g(0, 1), 0.8 / (1 + 2e-7), 1e-7);
  EXPECT_NEAR(clip_grad_norm(params, 1.0), 1.0, 1e-6);  // now (about) at the limit

  // The norm is global: [3] and [4] in two parameters clip exactly as [3, 4].
  MatrixF a = MatrixF::Zero(1, 1);
  MatrixF ga{{3.0f}};
  VectorF b = VectorF::Zero(1);
  VectorF gb = VectorF::Constant(1, 4.0f);
  std::vector<ParamRef> two = {ParamRef("a", a, ga), ParamRef("b", b, gb, false)};
  EXPECT_EQ(clip_grad_norm(two, 1.0), 5.0);
  EXPECT_EQ(ga(0, 0), static_cast<float>(1.0 / (5.0 + 1e-6)) * 3.0f);
  EXPECT_EQ(gb(0), static_cast<float>(1.0 / (5.0 + 1e-6)) * 4.0f);

  // Below the limit nothing changes; infinity measures only.
  g << 3.0f, 4.0f;
  EXPECT_EQ(clip_grad_norm(params, 10.0), 5.0);
  EXPECT_EQ(g, (MatrixF{{3.0f, 4.0f}}));
  EXPECT_EQ(clip_grad_norm(params, kInf), 5.0);
  EXPECT_EQ(g, (MatrixF{{3.0f, 4.0f}}));
  // At exactly max_norm PyTorch's coef = 5 / 5.000001 < 1 still scales, by 1 - 2e-7: so do we.
  EXPECT_EQ(clip_grad_norm(params, 5.0), 5.0);
  EXPECT_EQ(g(0, 0), static_cast<float>(5.0 / (5.0 + 1e-6)) * 3.0f);
}

TEST(ClipGradNorm, NonFiniteIsReturnedAndNothingScaled) {
  MatrixF w = MatrixF::Zero(1, 3);
  MatrixF g{{kNaNf, 1.0f, 100.0f}};
  std::vector<ParamRef> params = {ParamRef("w", w, g)};
  EXPECT_TRUE(std::isnan(clip_grad_norm(params, 1.0)));
  EXPECT_EQ(g(0, 2), 100.0f);
  g(0, 0) = kInff;
  EXPECT_EQ(clip_grad_norm(params, 1.0), kInf);
  EXPECT_EQ(g(0, 2), 100.0f);
  EXPECT_EQ(g(0, 0), kInff);
  // Empty list: 0.
  EXPECT_EQ(clip_grad_norm(std::vector<ParamRef>{}, 1.0), 0.0);
}

TEST(ClipGradNorm, Errors) {
  MatrixF w = MatrixF::Zero(1, 2);
  MatrixF g;
  std::vector<ParamRef> params = {ParamRef("w", w, g)};
  EXPECT_EQ(error_of([&] { clip_grad_norm(params, 0.0); }), "max_norm = 0: must be > 0 (infinity: measure only)");
  EXPECT_EQ(error_of([&] { clip_grad_norm(params, -1.0); }), "max_norm = -1: must be > 0 (infinity: measure only)");
  EXPECT_EQ(error_of([&] { clip_grad_norm(params, kNaN); }), "max_norm = nan: must be > 0 (infinity: measure only)");
  EXPECT_EQ(error_of([&] { clip_grad_norm(params, 1.0); }),
            "gradient size of w = 0: must equal the parameter's size = 2 (run the backward before the step)");
}

}  // namespace
}  // namespace moelab
