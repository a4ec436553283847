// Tests of the balancing losses and the router z-loss (reference/losses.h).
// T = tokens, E = experts, k = experts per token, L = layers, D = devices, M = devices per token.
#include "reference/losses.h"

#include "reference/error.h"
#include "reference/random.h"
#include "reference/recorder.h"
#include "reference/scoring.h"
#include "reference/types.h"
#include "tests/testing.h"

#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <numbers>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moelab {
namespace {

using moelab::testing::error_of;
using moelab::testing::max_relative_error;
using moelab::testing::numerical_gradient;
using moelab::testing::random_matrix;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
const double kLn2 = std::numbers::ln2;
const double kLn3 = std::log(3.0);

// Every part must occur in the message (an empty message means nothing was thrown).
void expect_message(const std::string& message, std::initializer_list<std::string_view> parts) {
  EXPECT_FALSE(message.empty()) << "no moelab::Error thrown";
  for (const std::string_view part : parts) {
    EXPECT_NE(message.find(part), std::string::npos)
        << "missing \"" << part << "\" in: " << message;
  }
}

IndexMatrix make_ids(Index rows, Index cols, std::initializer_list<std::int32_t> values) {
  IndexMatrix ids(rows, cols);
  Index i = 0;
  for (const std::int32_t v : values) ids.data()[i++] = v;
  return ids;
}

// k distinct experts per token, uniformly at random (partial Fisher-Yates). The losses do not need
// ids to be the top-k of the probs, and random ids reach every expert.
IndexMatrix random_ids(Rng& rng, Index T, Index E, Index k) {
  IndexMatrix ids(T, k);
  std::vector<std::int32_t> experts(static_cast<std::size_t>(E));
  for (Index t = 0; t < T; ++t) {
    for (Index e = 0; e < E; ++e)
      experts[static_cast<std::size_t>(e)] = static_cast<std::int32_t>(e);
    for (Index j = 0; j < k; ++j) {
      const Index pick = j + static_cast<Index>(rng.uniform() * static_cast<double>(E - j));
      std::swap(experts[static_cast<std::size_t>(j)], experts[static_cast<std::size_t>(pick)]);
      ids(t, j) = experts[static_cast<std::size_t>(j)];
    }
  }
  return ids;
}

MatrixD random_probs(Rng& rng, Index T, Index E) {
  MatrixD probs;
  softmax_forward(probs, random_matrix(rng, T, E, 1.5));
  return probs;
}

MatrixD sigmoid(const MatrixD& logits) { return (1.0 / (1.0 + (-logits.array()).exp())).matrix(); }

// ---- 1. Switch -------------------------------------------------------------------------------

// T = 4, E = 2, k = 1, alpha = 0.5.
//   probs = [.7 .3; .6 .4; .2 .8; .9 .1], ids = [0; 0; 1; 0]
//   f = [3/4, 1/4] (three tokens to expert 0), P = [(.7+.6+.2+.9)/4, (.3+.4+.8+.1)/4] = [.6, .4]
//   loss = alpha * E * (f . P) = 0.5 * 2 * (.45 + .1) = 0.55
//   dprobs[t, i] = alpha * E * f_i / T = 0.25 * [.75, .25] = [.1875, .0625] for every t
TEST(SwitchAuxLoss, HandWorkedK1) {
  MatrixD probs(4, 2);
  probs << 0.7, 0.3, 0.6, 0.4, 0.2, 0.8, 0.9, 0.1;
  const IndexMatrix ids = make_ids(4, 1, {0, 0, 1, 0});
  EXPECT_NEAR(switch_aux_loss_forward(probs, ids, 0.5), 0.55, 1e-15);
  MatrixD dprobs;
  switch_aux_loss_backward(dprobs, probs, ids, 0.5);
  ASSERT_EQ(dprobs.rows(), 4);
  ASSERT_EQ(dprobs.cols(), 2);
  for (Index t = 0; t < 4; ++t) {
    EXPECT_EQ(dprobs(t, 0), 0.1875) << t;  // exact: 0.5 * 2 / 4 * 3/4
    EXPECT_EQ(dprobs(t, 1), 0.0625) << t;
  }
  // float: a few roundings of values ~0.5.
  const Matrix probs_f = probs.cast<float>();
  EXPECT_NEAR(switch_aux_loss_forward(probs_f, ids, 0.5), 0.55f, 2e-7f);
}

// T = 2, E = 3, k = 2: f counts all T*k = 4 (token, slot) assignments.
//   probs = [.5 .3 .2; .4 .2 .4], ids = [0 1; 0 2]
//   f = [2, 1, 1] / 4 = [.5, .25, .25], P = [.45, .25, .3]
//   loss = 3 * (.225 + .0625 + .075) = 3 * .3625 = 1.0875
// Dividing by T instead (f sums to k = 2) would give 2 * 1.0875 = 2.175, HF's convention.
TEST(SwitchAuxLoss, HandWorkedK2CountsEverySlot) {
  MatrixD probs(2, 3);
  probs << 0.5, 0.3, 0.2, 0.4, 0.2, 0.4;
  const IndexMatrix ids = make_ids(2, 2, {0, 1, 0, 2});
  EXPECT_NEAR(switch_aux_loss_forward(probs, ids, 1.0), 1.0875, 1e-15);
}

// Uniform probs and every expert chosen equally often: f_i = P_i = 1/E, loss = alpha for every k.
TEST(SwitchAuxLoss, PerfectBalanceGivesAlpha) {
  const Index E = 4;
  for (const Index k : {1, 2, 4}) {
    const Index T = 8;
    const MatrixD probs = MatrixD::Constant(T, E, 0.25);
    IndexMatrix ids(T, k);
    for (Index t = 0; t < T; ++t) {
      for (Index j = 0; j < k; ++j) ids(t, j) = static_cast<std::int32_t>((t + j) % E);
    }
    EXPECT_NEAR(switch_aux_loss_forward(probs, ids, 0.01), 0.01, 1e-17) << "k = " << k;
    EXPECT_NEAR(megablocks_load_balancing_loss_forward(probs, ids, 2, 0.01), 0.01, 1e-17) << k;
  }
}

// ---- 2. Hugging Face ---------------------------------------------------------------------------

// Two layers of T = 2 tokens, pooled: R = 4 rows; E = 2, k = 1, alpha = 1.
//   logits = [ln3 0; 0 0 | 0 ln3; ln3 0] -> routing_weights = [.75 .25; .5 .5 | .25 .75; .75 .25]
//   ids = [0; 0 | 1; 0]      (the tie in row 1 goes to expert 0)
//   tokens_per_expert = [[3/4, 1/4]]                      (k, E) = (1, 2)
//   router_prob_per_expert = [2.25/4, 1.75/4] = [.5625, .4375]
//   loss = E * (3/4 * .5625 + 1/4 * .4375) = 2 * .53125 = 1.0625
// Backward: dweights[r] = alpha * E * [3/4, 1/4] / R = [.375, .125]; through the softmax,
// dlogits[r] = p_r * (dweights - p_r . dweights):
//   p = [.75 .25]: p.dw = .3125 -> [ .75 * .0625, .25 * -.1875] = [ .046875, -.046875]
//   p = [.5 .5]:   p.dw = .25   -> [ .0625, -.0625]
//   p = [.25 .75]: p.dw = .1875 -> [ .25 * .1875, .75 * -.0625] = [ .046875, -.046875]
TEST(HfLoadBalancingLoss, HandWorked) {
  MatrixD logits(4, 2);
  logits << kLn3, 0, 0, 0, 0, kLn3, kLn3, 0;
  const IndexMatrix ids = make_ids(4, 1, {0, 0, 1, 0});
  EXPECT_NEAR(hf_load_balancing_loss_forward(logits, ids, 1.0), 1.0625, 1e-15);
  MatrixD dlogits;
  hf_load_balancing_loss_backward(dlogits, logits, ids, 1.0);
  MatrixD expected(4, 2);
  expected << 0.046875, -0.046875, 0.0625, -0.0625, 0.046875, -0.046875, 0.046875, -0.046875;
  ASSERT_EQ(dlogits.rows(), 4);
  ASSERT_EQ(dlogits.cols(), 2);
  EXPECT_LT((dlogits - expected).cwiseAbs().maxCoeff(), 1e-16);
}

// tokens_per_expert has one row per slot, each summing to 1: at perfect balance the loss is
// alpha * k, not alpha. R = 3, E = 3, k = 2, uniform routing weights (logits 0):
//   tokens_per_expert = [[1/3 1/3 1/3]; [1/3 1/3 1/3]], router_prob_per_expert = [1/3 1/3 1/3]
//   loss = alpha * 3 * (6 * 1/9) = 2 alpha
TEST(HfLoadBalancingLoss, PerfectBalanceGivesAlphaTimesK) {
  const MatrixD logits = MatrixD::Zero(3, 3);
  const IndexMatrix ids = make_ids(3, 2, {0, 1, 1, 2, 2, 0});
  EXPECT_NEAR(hf_load_balancing_loss_forward(logits, ids, 0.01), 0.02, 1e-17);
  MatrixD probs;
  softmax_forward(probs, logits);
  EXPECT_NEAR(switch_aux_loss_forward(probs, ids, 0.01), 0.01, 1e-17);  // same input: alpha
  // k = 1 and k = 3 (E = 4): alpha * k.
  const MatrixD logits4 = MatrixD::Zero(4, 4);
  EXPECT_NEAR(hf_load_balancing_loss_forward(logits4, make_ids(4, 1, {0, 1, 2, 3}), 1.0), 1.0,
              1e-15);
  const IndexMatrix ids3 = make_ids(4, 3, {0, 1, 2, 1, 2, 3, 2, 3, 0, 3, 0, 1});
  EXPECT_NEAR(hf_load_balancing_loss_forward(logits4, ids3, 1.0), 3.0, 1e-15);
}

// On any input, HF = k * (Switch loss of the pooled rows), and MegaBlocks = the mean over layers
// of the per-layer Switch losses.
TEST(HfLoadBalancingLoss, IsKTimesSwitchOfThePooledRows) {
  Rng rng(11);
  const Index L = 3, T = 10, E = 6, k = 2;
  const MatrixD logits = random_matrix(rng, L * T, E, 2.0);
  const IndexMatrix ids = random_ids(rng, L * T, E, k);
  MatrixD probs;
  softmax_forward(probs, logits);
  const double hf = hf_load_balancing_loss_forward(logits, ids, 0.1);
  EXPECT_NEAR(hf, k * switch_aux_loss_forward(probs, ids, 0.1), 1e-14);

  double per_layer_sum = 0;
  for (Index l = 0; l < L; ++l) {
    const MatrixD layer_probs = probs.middleRows(l * T, T);
    const IndexMatrix layer_ids = ids.middleRows(l * T, T);
    per_layer_sum += switch_aux_loss_forward(layer_probs, layer_ids, 0.1);
  }
  EXPECT_NEAR(megablocks_load_balancing_loss_forward(probs, ids, L, 0.1), per_layer_sum / L, 1e-14);
}

// ---- 3. The lesson: one 2-layer input, three conventions, three numbers ------------------------

// L = 2 layers, T = 2 tokens per layer, E = 3, k = 2, alpha = 1 (ids are the top-2, no ties).
//   layer 0: probs [.5 .3 .2; .6 .3 .1], ids [0 1; 0 1]
//            counts [2 2 0], f = counts / (T k) = [.5 .5 0], P = [.55 .3 .15]
//            Switch_0 = 3 * (.275 + .15 + 0) = 1.275
//   layer 1: probs [.1 .2 .7; .25 .15 .6], ids [2 1; 2 0]
//            counts [1 1 2], f = [.25 .25 .5], P = [.175 .175 .65]
//            Switch_1 = 3 * (.04375 + .04375 + .325) = 1.2375
//   MegaBlocks: scale = E alpha / (L T k) = 3/8; sum_l counts . P = 1.7 + 1.65 = 3.35;
//            3.35 * 3/8 = 1.25625 = (Switch_0 + Switch_1) / 2
//   HF (pooled, R = 4): sum_j tokens_per_expert = counts / R = [3 3 2] / 4 = [.75 .75 .5],
//            router_prob_per_expert = [1.45 .95 1.6] / 4 = [.3625 .2375 .4]
//            HF = 3 * (.271875 + .178125 + .2) = 3 * .65 = 1.95
// Why they differ:
//   - HF is k = 2 times larger by convention (its minimum is alpha * k): 1.95 / 2 = 0.975;
//   - and it pools the layers before multiplying f by P. Layer 0 overloads experts 0 and 1,
//     layer 1 overloads expert 2; pooled, the imbalances cancel: 0.975 < 1 = the value at perfect
//     balance, while both layers are above it (1.275, 1.2375). A mean of products is not the
//     product of means: MegaBlocks (and per-layer Switch) see the imbalance, HF hides it.
//   - summing the per-layer Switch losses, as a model that adds each layer's aux loss does, gives
//     2.5125: L times MegaBlocks.
TEST(LoadBalancingConventions, SameInputThreeNumbers) {
  MatrixD probs(4, 3);
  probs << 0.5, 0.3, 0.2,  //
      0.6, 0.3, 0.1,       //
      0.1, 0.2, 0.7,       //
      0.25, 0.15, 0.6;
  const IndexMatrix ids = make_ids(4, 2, {0, 1, 0, 1, 2, 1, 2, 0});
  const MatrixD logits = probs.array().log().matrix();  // softmax(log p) = p, rows sum to 1

  const MatrixD probs0 = probs.topRows(2);
  const MatrixD probs1 = probs.bottomRows(2);
  const IndexMatrix ids0 = ids.topRows(2);
  const IndexMatrix ids1 = ids.bottomRows(2);
  const double switch0 = switch_aux_loss_forward(probs0, ids0, 1.0);
  const double switch1 = switch_aux_loss_forward(probs1, ids1, 1.0);
  const double megablocks = megablocks_load_balancing_loss_forward(probs, ids, 2, 1.0);
  const double hf = hf_load_balancing_loss_forward(logits, ids, 1.0);
  const double switch_pooled = switch_aux_loss_forward(probs, ids, 1.0);

  EXPECT_NEAR(switch0, 1.275, 1e-15);
  EXPECT_NEAR(switch1, 1.2375, 1e-15);
  EXPECT_NEAR(megablocks, 1.25625, 1e-15);
  EXPECT_NEAR(hf, 1.95, 1e-14);  // the logs and the softmax round: a few ulps
  EXPECT_NEAR(switch_pooled, 0.975, 1e-15);
  EXPECT_NEAR(switch0 + switch1, 2.5125, 1e-15);
}

// ---- 4. DeepSeek-V2 ----------------------------------------------------------------------------

// T = 2, E = 4, k = 2, D = 2 devices (experts {0,1} on device 0, {2,3} on device 1), M = 2.
//   scores = [.4 .3 .2 .1; .3 .1 .5 .1], ids = [0 1; 2 0]
//   expert:  f = E/(kT) * counts = 1 * [2 1 1 0], P = [.35 .2 .35 .1]
//            loss = .7 + .2 + .35 + 0 = 1.25;  dscores = f / T = [1 .5 .5 0]
//   device:  f' = [mean(2,1), mean(1,0)] = [1.5 .5], P' = [.55 .45]
//            loss = .825 + .225 = 1.05;        dscores = f'_device(i) / T = [.75 .75 .25 .25]
//   comm:    token 0 -> device {0}, token 1 -> devices {1, 0}: counts [2 1]
//            f'' = D/(MT) * counts = .5 * [2 1] = [1 .5], P'' = P' = [.55 .45]
//            loss = .55 + .225 = .775;         dscores = [.5 .5 .25 .25]
TEST(DeepSeekV2Losses, HandWorked) {
  MatrixD scores(2, 4);
  scores << 0.4, 0.3, 0.2, 0.1, 0.3, 0.1, 0.5, 0.1;
  const IndexMatrix ids = make_ids(2, 2, {0, 1, 2, 0});
  EXPECT_NEAR(deepseek_v2_expert_balance_loss_forward(scores, ids, 1.0), 1.25, 1e-15);
  EXPECT_NEAR(deepseek_v2_device_balance_loss_forward(scores, ids, 2, 1.0), 1.05, 1e-15);
  EXPECT_NEAR(deepseek_v2_comm_balance_loss_forward(scores, ids, 2, 2, 1.0), 0.775, 1e-15);
  // alpha scales linearly (DeepSeek-V2 used alpha1 = 0.003, alpha2 = 0.05, alpha3 = 0.02).
  EXPECT_NEAR(deepseek_v2_expert_balance_loss_forward(scores, ids, 0.003), 0.00375, 1e-17);

  MatrixD dexpert, ddevice, dcomm;
  deepseek_v2_expert_balance_loss_backward(dexpert, scores, ids, 1.0);
  deepseek_v2_device_balance_loss_backward(ddevice, scores, ids, 2, 1.0);
  deepseek_v2_comm_balance_loss_backward(dcomm, scores, ids, 2, 2, 1.0);
  const std::array<double, 4> expert{1.0, 0.5, 0.5, 0.0};
  const std::array<double, 4> device{0.75, 0.75, 0.25, 0.25};
  const std::array<double, 4> comm{0.5, 0.5, 0.25, 0.25};
  for (Index t = 0; t < 2; ++t) {
    for (Index i = 0; i < 4; ++i) {
      EXPECT_DOUBLE_EQ(dexpert(t, i), expert[static_cast<std::size_t>(i)]) << t << "," << i;
      EXPECT_DOUBLE_EQ(ddevice(t, i), device[static_cast<std::size_t>(i)]) << t << "," << i;
      EXPECT_DOUBLE_EQ(dcomm(t, i), comm[static_cast<std::size_t>(i)]) << t << "," << i;
    }
  }
}

// f_i = E/(kT) counts is E times the Switch fraction, so L_ExpBal(alpha1) = Switch(alpha1).
TEST(DeepSeekV2Losses, ExpertLevelEqualsSwitch) {
  Rng rng(21);
  const MatrixD scores = random_probs(rng, 16, 8);
  const IndexMatrix ids = random_ids(rng, 16, 8, 3);
  EXPECT_NEAR(deepseek_v2_expert_balance_loss_forward(scores, ids, 0.003),
              switch_aux_loss_forward(scores, ids, 0.003), 1e-17);
}

// T = 4, E = 4, D = 2, k = 2, M = 2, uniform scores, each token on both devices, every expert
// chosen twice: f = 1, f' = 1, f'' = D/(MT) * 4 = 1; P = 1/4, P' = P'' = 1/2: each loss = alpha.
TEST(DeepSeekV2Losses, PerfectBalanceGivesAlpha) {
  const MatrixD scores = MatrixD::Constant(4, 4, 0.25);
  const IndexMatrix ids = make_ids(4, 2, {0, 2, 1, 3, 2, 0, 3, 1});
  EXPECT_NEAR(deepseek_v2_expert_balance_loss_forward(scores, ids, 0.003), 0.003, 1e-17);
  EXPECT_NEAR(deepseek_v2_device_balance_loss_forward(scores, ids, 2, 0.05), 0.05, 1e-17);
  EXPECT_NEAR(deepseek_v2_comm_balance_loss_forward(scores, ids, 2, 2, 0.02), 0.02, 1e-17);
}

// ---- 5. DeepSeek-V3 sequence-wise --------------------------------------------------------------

// E = 2, k = 1, two sequences of 2 tokens, sigmoid-like scores (rows do not sum to 1), alpha = 1.
//   s = [.6 .2; .4 .1 | .1 .3; .8 .2] -> s' = [.75 .25; .8 .2 | .25 .75; .8 .2]
//   ids = [0; 0 | 1; 0]
//   sequence 0: f = E/(k T_s) counts = [2 0], P = [.775 .225] -> L_0 = 1.55
//   sequence 1: f = [1 1], P = [.525 .475]                   -> L_1 = 1.0
//   loss = (1.55 + 1.0) / 2 = 1.275
// As one sequence of 4: f = [1.5 .5], P = [.65 .35] -> 1.15: the batch looks more balanced than
// its sequences (sequence 0 sent everything to expert 0).
// Backward, token 0: scale = alpha / (N T_s) = 1/4, S_0 = .8, sum_i f_i s'_i = 2 * .75 = 1.5
//   dscores[0] = scale / S_0 * (f - 1.5) = .3125 * [.5, -1.5] = [.15625, -.46875]
TEST(DeepSeekV3SequenceBalanceLoss, HandWorked) {
  MatrixD scores(4, 2);
  scores << 0.6, 0.2, 0.4, 0.1, 0.1, 0.3, 0.8, 0.2;
  const IndexMatrix ids = make_ids(4, 1, {0, 0, 1, 0});
  const std::vector<Index> two{2, 2};
  const std::vector<Index> one{4};
  EXPECT_NEAR(deepseek_v3_sequence_balance_loss_forward(scores, ids, two, 1.0), 1.275, 1e-15);
  EXPECT_NEAR(deepseek_v3_sequence_balance_loss_forward(scores, ids, one, 1.0), 1.15, 1e-15);
  EXPECT_NEAR(deepseek_v3_sequence_balance_loss_forward(scores, ids, two, 1e-4), 1.275e-4, 1e-19);

  MatrixD dscores;
  deepseek_v3_sequence_balance_loss_backward(dscores, scores, ids, two, 1.0);
  ASSERT_EQ(dscores.rows(), 4);
  EXPECT_NEAR(dscores(0, 0), 0.15625, 1e-15);
  EXPECT_NEAR(dscores(0, 1), -0.46875, 1e-15);
  // Scaling a token's scores leaves s' unchanged: the gradient is orthogonal to the row.
  for (Index t = 0; t < 4; ++t) EXPECT_NEAR(dscores.row(t).dot(scores.row(t)), 0.0, 1e-16) << t;
}

// Scores equal within each token (any value: s' = 1/E) and each sequence balanced: loss = alpha.
TEST(DeepSeekV3SequenceBalanceLoss, PerfectBalanceGivesAlpha) {
  MatrixD scores(6, 3);
  scores << 0.3, 0.3, 0.3, 0.9, 0.9, 0.9, 0.5, 0.5, 0.5,  //
      0.2, 0.2, 0.2, 0.7, 0.7, 0.7, 0.1, 0.1, 0.1;
  const IndexMatrix ids = make_ids(6, 2, {0, 1, 1, 2, 2, 0, 2, 1, 0, 2, 1, 0});
  const std::vector<Index> lengths{3, 3};
  EXPECT_NEAR(deepseek_v3_sequence_balance_loss_forward(scores, ids, lengths, 1e-4), 1e-4, 1e-19);
}

// ---- 6. Router z-loss --------------------------------------------------------------------------

// logits = [0 0; ln3 0], coef = 1: lse = [ln 2, ln 4 = 2 ln 2]
//   loss = (ln²2 + 4 ln²2) / 2 = 2.5 ln²2 = 1.2011325347955035
//   dlogits[t] = 2 lse_t softmax_t / T: [ln2 * .5, ln2 * .5], [2 ln2 * .75, 2 ln2 * .25]
TEST(RouterZLoss, HandWorked) {
  MatrixD logits(2, 2);
  logits << 0, 0, kLn3, 0;
  EXPECT_NEAR(router_z_loss_forward(logits, 1.0), 1.2011325347955035, 1e-15);
  EXPECT_NEAR(router_z_loss_forward(logits, 0.001), 1.2011325347955035e-3, 1e-18);
  MatrixD dlogits;
  router_z_loss_backward(dlogits, logits, 1.0);
  MatrixD expected(2, 2);
  expected << 0.5 * kLn2, 0.5 * kLn2, 1.5 * kLn2, 0.5 * kLn2;
  EXPECT_LT((dlogits - expected).cwiseAbs().maxCoeff(), 1e-15);
}

// exp(1000) overflows even double; with the max subtracted each exp() is <= 1.
//   row [1000 1000]:  lse = 1000 + ln 2;   row [1000 -1000]: lse = 1000 + ln(1 + e^-2000) = 1000
TEST(RouterZLoss, LargeLogitsDoNotOverflow) {
  const double lse0 = 1000.0 + kLn2;
  const double expected = 0.001 * (lse0 * lse0 + 1000.0 * 1000.0) / 2;  // 1000.69...
  Matrix logits(2, 2);
  logits << 1000.0f, 1000.0f, 1000.0f, -1000.0f;
  const float loss = router_z_loss_forward(logits, 0.001);
  EXPECT_TRUE(std::isfinite(loss));
  EXPECT_NEAR(loss, expected, expected * 1e-6);  // lse in float: spacing 6e-5 at 1000
  Matrix dlogits;
  router_z_loss_backward(dlogits, logits, 0.001);
  EXPECT_TRUE(dlogits.allFinite());
  EXPECT_NEAR(dlogits(0, 0), 0.001 * lse0 / 2, 1e-6);  // 2 * lse * 0.5 / T
  EXPECT_NEAR(dlogits(1, 0), 0.001 * 1000.0, 1e-5);    // 2 * 1000 * 1 / 2
  EXPECT_EQ(dlogits(1, 1), 0.0f);                      // e^-2000 underflows to 0

  MatrixD logits_d(1, 3);
  logits_d << 1000.0, 1000.0, 1000.0;
  const double lse = 1000.0 + std::log(3.0);
  EXPECT_NEAR(router_z_loss_forward(logits_d, 1.0), lse * lse, 1e-9);
}

// ---- Gradients: central differences in double --------------------------------------------------
//
// numerical_gradient uses h = 1e-5. The losses are O(1) and their largest gradient entries
// O(0.01-1). Switch, MegaBlocks and the DeepSeek-V2 losses are linear in probs/scores (f is
// constant), so the central difference is exact up to rounding: eps * |loss| / h ~ 2e-16 / 1e-5
// = 2e-11 absolute. HF (through the softmax), V3 (through the normalisation) and z (lse^2) add a
// truncation error h^2 |f'''| / 6 ~ 1e-11. max_relative_error divides the largest absolute error
// by the largest gradient entry: measured 1e-10 (z, Switch) to 2e-9 (HF, whose largest entry is
// only ~0.01); the bound 1e-7 leaves a 50x margin. A wrong formula (a missing term of the softmax
// or normalisation Jacobian, a factor k or T) gives errors of order 1.
constexpr double kGradientBound = 1e-7;

TEST(LossGradients, MatchFiniteDifferences) {
  Rng rng(7);
  const Index T = 12, E = 8, k = 2;
  MatrixD probs = random_probs(rng, T, E);
  MatrixD logits = random_matrix(rng, T, E, 2.0);
  MatrixD scores = sigmoid(random_matrix(rng, T, E, 1.5));
  const IndexMatrix ids = random_ids(rng, T, E, k);
  MatrixD analytic;
  MatrixD numeric;

  switch_aux_loss_backward(analytic, probs, ids, 0.7);
  numeric = numerical_gradient([&] { return switch_aux_loss_forward(probs, ids, 0.7); }, probs);
  EXPECT_LT(max_relative_error(analytic, numeric), kGradientBound) << "switch";

  hf_load_balancing_loss_backward(analytic, logits, ids, 0.7);
  numeric =
      numerical_gradient([&] { return hf_load_balancing_loss_forward(logits, ids, 0.7); }, logits);
  EXPECT_LT(max_relative_error(analytic, numeric), kGradientBound) << "hf";
  EXPECT_GT(analytic.cwiseAbs().maxCoeff(), 1e-2);  // not a vacuous comparison

  megablocks_load_balancing_loss_backward(analytic, probs, ids, 3, 0.7);
  numeric = numerical_gradient(
      [&] { return megablocks_load_balancing_loss_forward(probs, ids, 3, 0.7); }, probs);
  EXPECT_LT(max_relative_error(analytic, numeric), kGradientBound) << "megablocks";

  deepseek_v2_expert_balance_loss_backward(analytic, probs, ids, 0.7);
  numeric = numerical_gradient(
      [&] { return deepseek_v2_expert_balance_loss_forward(probs, ids, 0.7); }, probs);
  EXPECT_LT(max_relative_error(analytic, numeric), kGradientBound) << "v2 expert";

  deepseek_v2_device_balance_loss_backward(analytic, probs, ids, 4, 0.7);
  numeric = numerical_gradient(
      [&] { return deepseek_v2_device_balance_loss_forward(probs, ids, 4, 0.7); }, probs);
  EXPECT_LT(max_relative_error(analytic, numeric), kGradientBound) << "v2 device";

  deepseek_v2_comm_balance_loss_backward(analytic, probs, ids, 4, 2, 0.7);
  numeric = numerical_gradient(
      [&] { return deepseek_v2_comm_balance_loss_forward(probs, ids, 4, 2, 0.7); }, probs);
  EXPECT_LT(max_relative_error(analytic, numeric), kGradientBound) << "v2 comm";

  const std::vector<Index> lengths{5, 3, 4};
  deepseek_v3_sequence_balance_loss_backward(analytic, scores, ids, lengths, 0.7);
  numeric = numerical_gradient(
      [&] { return deepseek_v3_sequence_balance_loss_forward(scores, ids, lengths, 0.7); }, scores);
  EXPECT_LT(max_relative_error(analytic, numeric), kGradientBound) << "v3 sequence";
  EXPECT_GT(analytic.cwiseAbs().maxCoeff(), 1e-2);

  router_z_loss_backward(analytic, logits, 0.7);
  numeric = numerical_gradient([&] { return router_z_loss_forward(logits, 0.7); }, logits);
  EXPECT_LT(max_relative_error(analytic, numeric), kGradientBound) << "z";
}

// The balance losses take probs/scores; chained with the scoring stage's softmax_backward they
// give the gradient with respect to the router logits.
TEST(LossGradients, ChainThroughSoftmaxToLogits) {
  Rng rng(8);
  const Index T = 10, E = 6;
  MatrixD logits = random_matrix(rng, T, E, 2.0);
  const IndexMatrix ids = random_ids(rng, T, E, 2);
  MatrixD probs, dprobs, dlogits;
  softmax_forward(probs, logits);
  switch_aux_loss_backward(dprobs, probs, ids, 1.0);
  softmax_backward(dlogits, probs, dprobs);
  const MatrixD numeric = numerical_gradient(
      [&] {
        MatrixD p;
        softmax_forward(p, logits);
        return switch_aux_loss_forward(p, ids, 1.0);
      },
      logits);
  EXPECT_LT(max_relative_error(dlogits, numeric), kGradientBound);
}

// ---- float and double agree --------------------------------------------------------------------

TEST(Losses, FloatAgreesWithDouble) {
  Rng rng(9);
  const Index T = 32, E = 8, k = 2;
  const MatrixD probs = random_probs(rng, T, E);
  const MatrixD logits = random_matrix(rng, T, E, 2.0);
  const MatrixD scores = sigmoid(random_matrix(rng, T, E));
  const IndexMatrix ids = random_ids(rng, T, E, k);
  const Matrix probs_f = probs.cast<float>();
  const Matrix logits_f = logits.cast<float>();
  const Matrix scores_f = scores.cast<float>();
  const std::vector<Index> lengths{16, 16};
  // Inputs rounded to float (rel. 6e-8) and sums of ~100 terms in float: rel. ~1e-6.
  const auto close = [](double f, double d) { return std::abs(f - d) <= 2e-6 * std::abs(d); };
  EXPECT_TRUE(
      close(switch_aux_loss_forward(probs_f, ids, 1.0), switch_aux_loss_forward(probs, ids, 1.0)));
  EXPECT_TRUE(close(hf_load_balancing_loss_forward(logits_f, ids, 1.0),
                    hf_load_balancing_loss_forward(logits, ids, 1.0)));
  EXPECT_TRUE(close(megablocks_load_balancing_loss_forward(probs_f, ids, 2, 1.0),
                    megablocks_load_balancing_loss_forward(probs, ids, 2, 1.0)));
  EXPECT_TRUE(close(deepseek_v2_device_balance_loss_forward(probs_f, ids, 2, 1.0),
                    deepseek_v2_device_balance_loss_forward(probs, ids, 2, 1.0)));
  EXPECT_TRUE(close(deepseek_v2_comm_balance_loss_forward(probs_f, ids, 4, 2, 1.0),
                    deepseek_v2_comm_balance_loss_forward(probs, ids, 4, 2, 1.0)));
  EXPECT_TRUE(close(deepseek_v3_sequence_balance_loss_forward(scores_f, ids, lengths, 1.0),
                    deepseek_v3_sequence_balance_loss_forward(scores, ids, lengths, 1.0)));
  EXPECT_TRUE(close(router_z_loss_forward(logits_f, 1.0), router_z_loss_forward(logits, 1.0)));

  Matrix grad_f;
  MatrixD grad_d;
  hf_load_balancing_loss_backward(grad_f, logits_f, ids, 1.0);
  hf_load_balancing_loss_backward(grad_d, logits, ids, 1.0);
  EXPECT_LT((grad_f.cast<double>() - grad_d).cwiseAbs().maxCoeff(), 1e-7);
  deepseek_v3_sequence_balance_loss_backward(grad_f, scores_f, ids, lengths, 1.0);
  deepseek_v3_sequence_balance_loss_backward(grad_d, scores, ids, lengths, 1.0);
  EXPECT_LT((grad_f.cast<double>() - grad_d).cwiseAbs().maxCoeff(), 1e-6);
}

// ---- events ------------------------------------------------------------------------------------

TEST(Losses, EmitTheLossesEvent) {
  MatrixD probs(4, 2);
  probs << 0.7, 0.3, 0.6, 0.4, 0.2, 0.8, 0.9, 0.1;
  const IndexMatrix ids = make_ids(4, 1, {0, 0, 1, 0});
  MemoryRecorder rec;
  const double loss = switch_aux_loss_forward(probs, ids, 0.5, &rec);
  ASSERT_EQ(rec.size(), 1u);
  RecordedEvent e = rec.last(events::losses);
  EXPECT_EQ(e.stat("switch_aux"), loss);
  EXPECT_EQ(e.stat("f_max"), 0.75);
  EXPECT_EQ(e.stat("f_min"), 0.25);
  EXPECT_NEAR(e.stat("P_max"), 0.6, 1e-15);
  EXPECT_NEAR(e.stat("P_min"), 0.4, 1e-15);
  EXPECT_TRUE(e.values.empty());

  // Each loss names its stat after itself.
  const MatrixD logits = probs.array().log().matrix();
  const std::vector<Index> lengths{2, 2};
  const std::vector<std::pair<std::string, double>> expected = {
      {"hf_aux", hf_load_balancing_loss_forward(logits, ids, 1.0, &rec)},
      {"megablocks_aux", megablocks_load_balancing_loss_forward(probs, ids, 2, 1.0, &rec)},
      {"expert_balance", deepseek_v2_expert_balance_loss_forward(probs, ids, 1.0, &rec)},
      {"device_balance", deepseek_v2_device_balance_loss_forward(probs, ids, 2, 1.0, &rec)},
      {"comm_balance", deepseek_v2_comm_balance_loss_forward(probs, ids, 2, 1, 1.0, &rec)},
      {"sequence_balance",
       deepseek_v3_sequence_balance_loss_forward(probs, ids, lengths, 1.0, &rec)},
      {"z_loss", router_z_loss_forward(probs, 1.0, &rec)}};
  ASSERT_EQ(rec.size(), 1u + expected.size());
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const RecordedEvent& event = rec.events()[i + 1];
    EXPECT_EQ(event.name, events::losses);
    EXPECT_EQ(event.stat(expected[i].first), expected[i].second) << expected[i].first;
    EXPECT_NE(expected[i].second, 0.0) << expected[i].first;
  }
  // HF's f sums to k (here 1); MegaBlocks' per-layer f: layer 0 [1, 0], layer 1 [.5, .5].
  EXPECT_EQ(rec.events()[1].stat("f_max"), 0.75);
  EXPECT_EQ(rec.events()[2].stat("f_max"), 1.0);
  EXPECT_EQ(rec.events()[2].stat("f_min"), 0.0);
  EXPECT_EQ(rec.events()[6].stat("sequences"), 2.0);
  // z-loss of probs taken as logits: the largest lse is row 3's, log(e^.9 + e^.1).
  EXPECT_NEAR(rec.events()[7].stat("lse_max"), std::log(std::exp(0.9) + std::exp(0.1)), 1e-15);
}

// ---- an empty batch ----------------------------------------------------------------------------

TEST(Losses, EmptyBatchIsZeroWithAnEmptyGradient) {
  const MatrixD x(0, 4);
  const IndexMatrix ids(0, 2);
  const std::vector<Index> none;
  MemoryRecorder rec;
  EXPECT_EQ(switch_aux_loss_forward(x, ids, 1.0, &rec), 0.0);
  EXPECT_EQ(hf_load_balancing_loss_forward(x, ids, 1.0, &rec), 0.0);
  EXPECT_EQ(megablocks_load_balancing_loss_forward(x, ids, 3, 1.0, &rec), 0.0);
  EXPECT_EQ(deepseek_v2_expert_balance_loss_forward(x, ids, 1.0, &rec), 0.0);
  EXPECT_EQ(deepseek_v2_device_balance_loss_forward(x, ids, 2, 1.0, &rec), 0.0);
  EXPECT_EQ(deepseek_v2_comm_balance_loss_forward(x, ids, 2, 1, 1.0, &rec), 0.0);
  EXPECT_EQ(deepseek_v3_sequence_balance_loss_forward(x, ids, none, 1.0, &rec), 0.0);
  EXPECT_EQ(router_z_loss_forward(x, 1.0, &rec), 0.0);
  EXPECT_EQ(rec.size(), 8u);
  for (const RecordedEvent& e : rec.events()) {
    for (const auto& [key, value] : e.stats) {
      if (key != "sequences") {
        EXPECT_EQ(value, 0.0) << key;  // no NaN from 0/0
      }
    }
  }

  std::vector<MatrixD> grads(8, MatrixD(3, 3));  // wrong sizes on purpose: they are resized
  switch_aux_loss_backward(grads[0], x, ids, 1.0);
  hf_load_balancing_loss_backward(grads[1], x, ids, 1.0);
  megablocks_load_balancing_loss_backward(grads[2], x, ids, 3, 1.0);
  deepseek_v2_expert_balance_loss_backward(grads[3], x, ids, 1.0);
  deepseek_v2_device_balance_loss_backward(grads[4], x, ids, 2, 1.0);
  deepseek_v2_comm_balance_loss_backward(grads[5], x, ids, 2, 1, 1.0);
  deepseek_v3_sequence_balance_loss_backward(grads[6], x, ids, none, 1.0);
  router_z_loss_backward(grads[7], x, 1.0);
  for (std::size_t i = 0; i < grads.size(); ++i) {
    EXPECT_EQ(grads[i].rows(), 0) << i;
    EXPECT_EQ(grads[i].cols(), 4) << i;
  }
}

// ---- validation --------------------------------------------------------------------------------

TEST(Losses, BadRoutingNamesTheField) {
  MatrixD probs(4, 2);
  probs << 0.7, 0.3, 0.6, 0.4, 0.2, 0.8, 0.9, 0.1;
  const IndexMatrix ids = make_ids(4, 1, {0, 0, 1, 0});
  MatrixD grad;

  expect_message(error_of([&] { switch_aux_loss_forward(MatrixD(4, 0), ids, 1.0); }),
                 {"probs.cols() = 0: the number of experts E must be at least 1"});
  expect_message(error_of([&] {
                   switch_aux_loss_forward(probs, make_ids(3, 1, {0, 1, 0}), 1.0);
                 }),
                 {"ids.rows() = 3: must equal probs.rows() = 4"});
  expect_message(error_of([&] { switch_aux_loss_forward(probs, IndexMatrix(4, 0), 1.0); }),
                 {"ids.cols() = 0: k (experts per token) must be at least 1"});
  expect_message(error_of([&] {
                   switch_aux_loss_forward(probs, make_ids(4, 1, {0, 0, 2, 0}), 1.0);
                 }),
                 {"ids[2,0] = 2: expert ids must be in [0, E = 2)"});
  expect_message(error_of([&] {
                   switch_aux_loss_forward(probs, make_ids(4, 1, {0, -1, 1, 0}), 1.0);
                 }),
                 {"ids[1,0] = -1: expert ids must be in [0, E = 2)"});
  expect_message(
      error_of([&] {
        switch_aux_loss_backward(grad, probs, make_ids(4, 2, {0, 1, 1, 1, 0, 1, 1, 0}), 1.0);
      }),
      {"ids[1,1] = 1: token 1 already selected expert 1 (ids[1,0])", "must be distinct"});
  // k > E cannot be distinct.
  expect_message(error_of([&] {
                   hf_load_balancing_loss_forward(
                       probs, make_ids(4, 3, {0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0}), 1.0);
                 }),
                 {"ids[0,2] = 0: token 0 already selected expert 0"});

  MatrixD bad = probs;
  bad(1, 1) = kNaN;
  expect_message(error_of([&] { switch_aux_loss_forward(bad, ids, 1.0); }),
                 {"probs[1,1] = nan: must be finite"});
  bad(1, 1) = std::numeric_limits<double>::infinity();
  expect_message(error_of([&] { megablocks_load_balancing_loss_backward(grad, bad, ids, 2, 1.0); }),
                 {"probs[1,1] = inf: must be finite"});
  expect_message(error_of([&] { hf_load_balancing_loss_backward(grad, bad, ids, 1.0); }),
                 {"logits[1,1] = inf: must be finite"});
  expect_message(error_of([&] { deepseek_v2_expert_balance_loss_forward(bad, ids, 1.0); }),
                 {"scores[1,1] = inf: must be finite"});
  Matrix bad_f = probs.cast<float>();
  bad_f(3, 0) = -std::numeric_limits<float>::infinity();
  expect_message(error_of([&] { router_z_loss_forward(bad_f, 1.0); }),
                 {"logits[3,0] = -inf: must be finite"});
}

TEST(Losses, BadCoefficientsNameTheField) {
  const MatrixD probs = MatrixD::Constant(2, 2, 0.5);
  const IndexMatrix ids = make_ids(2, 1, {0, 1});
  const std::vector<Index> lengths{2};
  MatrixD grad;
  expect_message(error_of([&] { switch_aux_loss_forward(probs, ids, -1.0); }),
                 {"alpha = -1: must be finite and >= 0"});
  expect_message(error_of([&] { switch_aux_loss_backward(grad, probs, ids, kNaN); }),
                 {"alpha = nan: must be finite and >= 0"});
  expect_message(error_of([&] { hf_load_balancing_loss_forward(probs, ids, -0.01); }),
                 {"alpha = -0.01"});
  expect_message(error_of([&] { megablocks_load_balancing_loss_forward(probs, ids, 1, -2.0); }),
                 {"alpha = -2"});
  expect_message(error_of([&] { deepseek_v2_expert_balance_loss_forward(probs, ids, -1.0); }),
                 {"alpha1 = -1"});
  expect_message(
      error_of([&] { deepseek_v2_device_balance_loss_backward(grad, probs, ids, 1, -1.0); }),
      {"alpha2 = -1"});
  expect_message(error_of([&] {
                   deepseek_v2_comm_balance_loss_forward(probs, ids, 1, 1,
                                                         std::numeric_limits<double>::infinity());
                 }),
                 {"alpha3 = inf: must be finite and >= 0"});
  expect_message(
      error_of([&] { deepseek_v3_sequence_balance_loss_forward(probs, ids, lengths, -1.0); }),
      {"alpha = -1"});
  expect_message(error_of([&] { router_z_loss_backward(grad, probs, -0.001); }),
                 {"z_loss_coef = -0.001: must be finite and >= 0"});
}

TEST(Losses, BadLayersDevicesAndSequencesNameTheField) {
  const MatrixD probs = MatrixD::Constant(5, 4, 0.25);
  const IndexMatrix ids = make_ids(5, 2, {0, 1, 2, 3, 0, 2, 1, 3, 3, 0});
  MatrixD grad;
  expect_message(error_of([&] { megablocks_load_balancing_loss_forward(probs, ids, 0, 1.0); }),
                 {"num_layers = 0: must be at least 1"});
  expect_message(error_of([&] { megablocks_load_balancing_loss_forward(probs, ids, 2, 1.0); }),
                 {"probs.rows() = 5: must be a multiple of num_layers = 2"});

  expect_message(error_of([&] { deepseek_v2_device_balance_loss_forward(probs, ids, 3, 1.0); }),
                 {"num_devices = 3: must divide the number of experts E = 4"});
  expect_message(error_of([&] { deepseek_v2_comm_balance_loss_forward(probs, ids, 0, 1, 1.0); }),
                 {"num_devices = 0: must be at least 1"});
  expect_message(error_of([&] { deepseek_v2_comm_balance_loss_forward(probs, ids, 2, 3, 1.0); }),
                 {"devices_per_token = 3: must be in [1, num_devices = 2]"});
  expect_message(
      error_of([&] { deepseek_v2_comm_balance_loss_backward(grad, probs, ids, 2, 0, 1.0); }),
      {"devices_per_token = 0: must be in [1, num_devices = 2]"});
  // Token 0 has experts 0 and 1, both on device 0; token 1 has experts 2 and 3, both on device 1;
  // token 2 has experts 0 (device 0) and 2 (device 1): two devices, but M = 1.
  expect_message(
      error_of([&] { deepseek_v2_comm_balance_loss_forward(probs, ids, 2, 1, 1.0); }),
      {"ids[2,:] = [0, 2]: token 2 is sent to 2 devices, more than devices_per_token M = 1"});

  const std::vector<Index> with_empty{3, 0, 2};
  const std::vector<Index> too_few{2, 2};
  expect_message(
      error_of([&] { deepseek_v3_sequence_balance_loss_forward(probs, ids, with_empty, 1.0); }),
      {"sequence_lengths[1] = 0: every sequence must have at least one token"});
  expect_message(
      error_of([&] { deepseek_v3_sequence_balance_loss_backward(grad, probs, ids, too_few, 1.0); }),
      {"sum of sequence_lengths = 4: must equal scores.rows() = 5 (T)"});
  const std::vector<Index> lengths{5};
  MatrixD negative = probs;
  negative(3, 2) = -0.5;
  expect_message(
      error_of([&] { deepseek_v3_sequence_balance_loss_forward(negative, ids, lengths, 1.0); }),
      {"scores[3,2] = -0.5: sigmoid scores must be >= 0"});
  MatrixD zero_row = probs;
  zero_row.row(4).setZero();
  expect_message(
      error_of([&] { deepseek_v3_sequence_balance_loss_forward(zero_row, ids, lengths, 1.0); }),
      {"sum of scores[4,:] = 0: must be positive"});
}

}  // namespace
}  // namespace moelab
