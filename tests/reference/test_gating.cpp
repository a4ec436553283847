// Tests of reference/gating and the scorings of reference/scoring it builds on.
#include <gtest/gtest.h>

#include <cmath>

#include "reference/gating.h"
#include "reference/recorder.h"
#include "reference/scoring.h"
#include "tests/testing.h"

namespace moelab {
namespace {

using moelab::testing::error_of;
using moelab::testing::max_relative_error;
using moelab::testing::numerical_gradient;
using moelab::testing::random_matrix;

MatrixD row(std::initializer_list<double> values) { return moelab::testing::rows_of({values}); }
IndexMatrix id_row(std::initializer_list<std::int32_t> values) { return moelab::testing::int_rows({values}); }

TEST(Gating, SelectedScoresAsQwenAndOlmoe) {
  const MatrixD scores = row({0.1, 0.6, 0.3});
  const MatrixD logits = row({0, 0, 0});  // unused by this kind
  MatrixD gates;
  gating_forward(gates, logits, scores, id_row({1, 2}), GatingConfig{}, nullptr);  // OLMoE: no renorm
  EXPECT_DOUBLE_EQ(gates(0, 0), 0.6);
  EXPECT_DOUBLE_EQ(gates(0, 1), 0.3);
  gating_forward(gates, logits, scores, id_row({1, 2}), GatingConfig{.renormalize = true}, nullptr);  // norm_topk_prob
  EXPECT_DOUBLE_EQ(gates(0, 0), 0.6 / 0.9);
  EXPECT_DOUBLE_EQ(gates(0, 1), 0.3 / 0.9);
}

// DeepSeek-V3: sigmoid scores of the selected, renormalised (+1e-20), times 2.5.
//   logits [0, ln 3, -ln 3] -> sigmoid [0.5, 0.75, 0.25]; ids [1, 0]: sum 1.25
//   g = 2.5 * [0.75, 0.5] / 1.25 = [1.5, 1.0]
TEST(Gating, DeepSeekV3SigmoidRenormalisedAndScaled) {
  const MatrixD logits = row({0, std::log(3.0), -std::log(3.0)});
  MatrixD scores, gates;
  sigmoid_forward(scores, logits);
  EXPECT_NEAR(scores(0, 1), 0.75, 1e-15);
  const GatingConfig v3{.renormalize = true, .renorm_eps = 1e-20, .routed_scaling_factor = 2.5};
  gating_forward(gates, logits, scores, id_row({1, 0}), v3, nullptr);
  EXPECT_NEAR(gates(0, 0), 1.5, 1e-15);
  EXPECT_NEAR(gates(0, 1), 1.0, 1e-15);
}

// Mixtral: top-k of the logits, then softmax over the k: logits [1, 3, 2, 0], ids [1, 2]
//   g = softmax([3, 2]) = [e / (e + 1), 1 / (e + 1)] = [0.7310586, 0.2689414]
TEST(Gating, MixtralSoftmaxOverSelectedLogits) {
  const MatrixD logits = row({1, 3, 2, 0});
  MatrixD scores, gates;
  softmax_forward(scores, logits);
  gating_forward(gates, logits, scores, id_row({1, 2}), GatingConfig{.kind = GateKind::softmax_of_selected_logits},
                 nullptr);
  EXPECT_NEAR(gates(0, 0), std::exp(1.0) / (std::exp(1.0) + 1), 1e-15);
  EXPECT_NEAR(gates(0, 1), 1 / (std::exp(1.0) + 1), 1e-15);
  // The same numbers as softmax over all experts, top-k, renormalised (Qwen3's norm_topk_prob):
  // the two conventions are one function, computed in a different order.
  MatrixD renormed;
  gating_forward(renormed, logits, scores, id_row({1, 2}), GatingConfig{.renormalize = true}, nullptr);
  EXPECT_NEAR(renormed(0, 0), gates(0, 0), 1e-15);
  EXPECT_NEAR(renormed(0, 1), gates(0, 1), 1e-15);
}

TEST(Gating, Llama4SigmoidOfSelectedLogitsAndHashOnes) {
  const MatrixD logits = row({0, std::log(3.0)});
  MatrixD scores, gates;
  softmax_forward(scores, logits);  // Llama 4 ignores the scores for its gate
  gating_forward(gates, logits, scores, id_row({1}), GatingConfig{.kind = GateKind::sigmoid_of_selected_logits},
                 nullptr);
  EXPECT_NEAR(gates(0, 0), 0.75, 1e-15);
  gating_forward(gates, logits, scores, id_row({0}), GatingConfig{.kind = GateKind::ones}, nullptr);
  EXPECT_EQ(gates(0, 0), 1.0);
}

TEST(Gating, RenormalisedGatesSumToTheScalingFactor) {
  Rng rng(3);
  const MatrixD logits = random_matrix(rng, 50, 16, 2.0);
  IndexMatrix ids(50, 4);
  for (Index t = 0; t < 50; ++t)
    for (Index j = 0; j < 4; ++j) ids(t, j) = static_cast<int>((t + 5 * j) % 16);
  for (Scoring s : {Scoring::softmax, Scoring::sigmoid, Scoring::sqrt_softplus}) {
    MatrixD scores, gates;
    score_forward(scores, logits, s);
    gating_forward(gates, logits, scores, ids, GatingConfig{.renormalize = true, .routed_scaling_factor = 2.5}, nullptr);
    for (Index t = 0; t < 50; ++t) EXPECT_NEAR(gates.row(t).sum(), 2.5, 1e-13) << scoring_name(s);
  }
}

// Scores: hand values and finite-difference checks of the three scorings.
TEST(Scoring, SigmoidAndSqrtSoftplusValues) {
  MatrixD s;
  sigmoid_forward(s, row({0, 2, -40}));
  EXPECT_DOUBLE_EQ(s(0, 0), 0.5);
  EXPECT_NEAR(s(0, 1), 0.8807970779778823, 1e-15);
  EXPECT_NEAR(s(0, 2), 4.248354255291589e-18, 1e-30);
  sqrt_softplus_forward(s, row({0, 1000, -800}));
  EXPECT_NEAR(s(0, 0), std::sqrt(std::log(2.0)), 1e-15);  // softplus(0) = ln 2
  EXPECT_NEAR(s(0, 1), std::sqrt(1000.0), 1e-12);         // softplus(l) -> l: no overflow
  EXPECT_EQ(s(0, 2), 0.0);                                  // underflows to 0 ...
  MatrixD d;
  sqrt_softplus_backward(d, row({-800}), row({1}));
  EXPECT_TRUE(std::isfinite(d(0, 0)));                      // ... and its gradient stays finite
  EXPECT_EQ(parse_scoring("sigmoid"), Scoring::sigmoid);
  EXPECT_EQ(error_of([] { parse_scoring("relu"); }), "scoring = \"relu\": must be one of softmax, sigmoid, sqrt_softplus");
  EXPECT_EQ(error_of([] {
              MatrixD out;
              sigmoid_forward(out, row({0, NAN}));
            }),
            "logits[0,1] = nan: router logits must be finite");
}

// Regression (found by the PyTorch oracle): Eigen's vectorised exp() returns one constant below
// about -88.7 in float, so experts at -100 and -95 tied at 2.94e-39; std::exp keeps them apart.
TEST(Scoring, SoftmaxUnderflowKeepsTheOrder) {
  Matrix logits(1, 8);
  logits << 0, -100, -95, -100, -100, -100, -100, -100;
  Matrix p;
  softmax_forward(p, logits);
  EXPECT_GT(p(0, 2), p(0, 1));
  EXPECT_NEAR(p(0, 2), std::exp(-95.0), 1e-43);  // a float subnormal, 5.5e-42
}

TEST(Scoring, BackwardMatchesFiniteDifferences) {
  Rng rng(11);
  for (Scoring s : {Scoring::softmax, Scoring::sigmoid, Scoring::sqrt_softplus}) {
    MatrixD logits = random_matrix(rng, 5, 7, 2.0);
    const MatrixD w = random_matrix(rng, 5, 7);
    auto loss = [&] {
      MatrixD scores;
      score_forward(scores, logits, s);
      return (scores.array() * w.array()).sum();
    };
    MatrixD scores, dlogits;
    score_forward(scores, logits, s);
    score_backward(dlogits, logits, scores, w, s);
    // Central differences at h = 1e-5 in double: O(h^2) ~ 1e-10 truncation, O(eps/h) ~ 1e-11 rounding.
    EXPECT_LT(max_relative_error(dlogits, numerical_gradient(loss, logits)), 1e-7) << scoring_name(s);
  }
}

// d(sum w * gates) / d logits, through scoring and gating, for every convention.
TEST(Gating, BackwardMatchesFiniteDifferences) {
  struct Case {
    Scoring scoring;
    GatingConfig gating;
  };
  const Case cases[] = {
      {Scoring::softmax, {}},                                                                  // OLMoE
      {Scoring::softmax, {.renormalize = true}},                                               // Qwen3
      {Scoring::softmax, {.kind = GateKind::softmax_of_selected_logits}},                      // Mixtral
      {Scoring::sigmoid, {.renormalize = true, .renorm_eps = 1e-20, .routed_scaling_factor = 2.5}},  // DeepSeek-V3
      {Scoring::sigmoid, {.kind = GateKind::sigmoid_of_selected_logits}},                      // Llama 4
      {Scoring::sqrt_softplus, {.renormalize = true, .routed_scaling_factor = 1.5}},           // DeepSeek-V4
      {Scoring::softmax, {.routed_scaling_factor = 16}},                                       // DeepSeek-V2
      {Scoring::softmax, {.kind = GateKind::ones}},                                            // hash
  };
  Rng rng(5);
  for (const Case& c : cases) {
    MatrixD logits = random_matrix(rng, 6, 8, 1.5);
    IndexMatrix ids(6, 3);
    for (Index t = 0; t < 6; ++t)
      for (Index j = 0; j < 3; ++j) ids(t, j) = static_cast<int>((2 * t + 3 * j) % 8);  // fixed selection
    const MatrixD w = random_matrix(rng, 6, 3);
    auto loss = [&] {
      MatrixD scores, gates;
      score_forward(scores, logits, c.scoring);
      gating_forward(gates, logits, scores, ids, c.gating, nullptr);
      return (gates.array() * w.array()).sum();
    };
    MatrixD scores, gates, dlogits, dscores, dlogits_from_scores;
    score_forward(scores, logits, c.scoring);
    gating_forward(gates, logits, scores, ids, c.gating, nullptr);
    gating_backward(dlogits, dscores, w, logits, scores, ids, c.gating);
    score_backward(dlogits_from_scores, logits, scores, dscores, c.scoring);
    dlogits += dlogits_from_scores;
    const MatrixD numeric = numerical_gradient(loss, logits);
    if (c.gating.kind == GateKind::ones) {
      EXPECT_EQ(dlogits.cwiseAbs().maxCoeff(), 0.0);
      EXPECT_EQ(numeric.cwiseAbs().maxCoeff(), 0.0);
    } else {
      EXPECT_LT(max_relative_error(dlogits, numeric), 1e-7) << gate_kind_name(c.gating.kind) << " " << scoring_name(c.scoring) << " renormalize " << c.gating.renormalize;
    }
  }
}

TEST(Gating, EmitsGatesEvent) {
  MemoryRecorder recorder;
  MatrixD gates;
  gating_forward(gates, row({0, 0, 0}), row({0.1, 0.6, 0.3}), id_row({1, 2}), GatingConfig{.renormalize = true},
                 &recorder);
  const RecordedEvent e = recorder.last(events::gates);
  EXPECT_EQ(e.shape, (std::array<std::int64_t, 2>{1, 2}));
  EXPECT_NEAR(e.values[0], 2.0 / 3.0, 1e-15);
  EXPECT_NEAR(e.stat("sum_mean"), 1.0, 1e-15);
}

TEST(Gating, RejectsBadInput) {
  const MatrixD logits = row({0, 1, 2}), scores = row({0.2, 0.3, 0.5});
  MatrixD gates;
  EXPECT_EQ(error_of([&] { gating_forward(gates, logits, scores, id_row({3}), GatingConfig{}, nullptr); }),
            "ids[0,0] = 3: must be an expert id in [0, 3)");
  EXPECT_EQ(error_of([&] { gating_forward(gates, logits, row({0.5, 0.5}), id_row({1}), GatingConfig{}, nullptr); }),
            "scores shape = (1, 2): must equal the logits shape (1, 3)");
  EXPECT_EQ(error_of([&] {
              gating_forward(gates, logits, scores, id_row({1}), GatingConfig{.routed_scaling_factor = 0}, nullptr);
            }),
            "routed_scaling_factor = 0: must be finite and > 0");
  EXPECT_EQ(error_of([&] {
              gating_forward(gates, logits, scores, id_row({1}), GatingConfig{.renorm_eps = -1}, nullptr);
            }),
            "renorm_eps = -1: must be finite and >= 0");
  EXPECT_EQ(error_of([] { parse_gate_kind("max"); }),
            "gate = \"max\": must be one of selected_scores, softmax_of_selected_logits, "
            "sigmoid_of_selected_logits, ones");
}

}  // namespace
}  // namespace moelab
