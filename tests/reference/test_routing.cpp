// Tests of reference/routing: the whole routing of a layer, forward and backward, per preset.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

#include "reference/presets.h"
#include "reference/recorder.h"
#include "reference/routing.h"
#include "tests/testing.h"

namespace moelab {
namespace {

using moelab::testing::error_of;
using moelab::testing::max_relative_error;
using moelab::testing::numerical_gradient;
using moelab::testing::random_matrix;

struct Inputs {
  MatrixD x;
  std::vector<std::int32_t> token_ids;
  RoutingParamsT<double> params;
};

Inputs random_inputs(const RoutingConfig& c, Index T, std::uint64_t seed) {
  Rng rng(seed);
  Inputs in;
  const Index C = c.router.hidden_size, E = c.num_experts();
  in.x = random_matrix(rng, T, C);
  in.params.router.weight = random_matrix(rng, E, C, 1.0 / std::sqrt(static_cast<double>(C)));
  if (c.router.use_bias) in.params.router.bias = random_matrix(rng, E, 1, 0.1);
  if (c.router.noise == RouterNoise::noisy_topk) in.params.router.noise_weight = random_matrix(rng, E, C, 0.1);
  if (c.use_selection_bias) in.params.selection_bias = random_matrix(rng, E, 1, 0.05);
  for (Index t = 0; t < T; ++t) in.token_ids.push_back(static_cast<std::int32_t>(rng.next_u64() % 256));
  return in;
}

// The loss sum(w * gates) + aux + z, as a function of x and the router weights: finite differences
// through every stage of every preset (noise drawn from the same seed at every evaluation).
TEST(Routing, BackwardMatchesFiniteDifferencesForEveryPreset) {
  for (const Preset& p : presets()) {
    const RoutingConfig& c = p.tiny;
    const Index T = 12;
    Inputs in = random_inputs(c, T, 42);
    RoutingOutputT<double> out;
    auto run = [&](RoutingOutputT<double>& o) {
      Rng noise(7);
      route_forward(o, in.x, in.token_ids, in.params, c, &noise);
    };
    run(out);
    Rng wrng(9);
    const MatrixD w = random_matrix(wrng, out.gates.rows(), out.gates.cols());
    const IndexMatrix ids = out.ids;
    auto loss = [&] {
      RoutingOutputT<double> o;
      run(o);
      EXPECT_EQ(o.ids, ids) << p.name << ": a finite-difference step changed the selection";
      return (o.gates.array() * w.array()).sum() + o.aux_loss + o.z_loss;
    };
    MatrixD dx;
    RouterParamsT<double> dparams;
    route_backward(dx, dparams, w, out, in.x, in.params, c);
    // Central differences at h = 1e-5 in double: O(h^2) truncation + O(eps/h) rounding ~ 1e-10 of
    // the gradient's scale; 1e-7 leaves room and still fails any wrong term.
    EXPECT_LT(max_relative_error(dx, numerical_gradient(loss, in.x)), 1e-7) << p.name << " dx";
    EXPECT_LT(max_relative_error(dparams.weight, numerical_gradient(loss, in.params.router.weight)), 1e-7)
        << p.name << " dW";
    if (c.router.use_bias) {
      MatrixD b = in.params.router.bias;  // (E, 1) as a matrix for numerical_gradient
      auto loss_b = [&] {
        in.params.router.bias = b;
        return loss();
      };
      const MatrixD numeric = numerical_gradient(loss_b, b);
      in.params.router.bias = b;
      EXPECT_LT(max_relative_error(MatrixD(dparams.bias), numeric), 1e-7) << p.name << " db";
    }
  }
}

// DeepSeek-V3: the balancing bias changes which experts are chosen, never the gate values.
TEST(Routing, SelectionBiasChangesChoiceNotGates) {
  const RoutingConfig c = find_preset("deepseek_v3").tiny;
  Inputs in = random_inputs(c, 64, 3);
  in.params.selection_bias.setZero();
  RoutingOutputT<double> unbiased, biased;
  route_forward(unbiased, in.x, {}, in.params, c, nullptr);
  in.params.selection_bias(0) = 10.0;  // expert 0 now wins every group-limited top-k
  route_forward(biased, in.x, {}, in.params, c, nullptr);
  EXPECT_EQ(biased.load[0], 64);
  EXPECT_NE(biased.ids, unbiased.ids);
  for (Index t = 0; t < 64; ++t) {  // gates = 2.5 * s[ids] / (sum s[ids] + 1e-20), unbiased s
    double sum = 0;
    for (Index j = 0; j < c.top_k; ++j) sum += biased.scores(t, biased.ids(t, j));
    for (Index j = 0; j < c.top_k; ++j)
      EXPECT_NEAR(biased.gates(t, j), 2.5 * biased.scores(t, biased.ids(t, j)) / (sum + 1e-20), 1e-14);
  }
}

TEST(Routing, InvariantsOfEveryPreset) {
  for (const Preset& p : presets()) {
    const RoutingConfig& c = p.tiny;
    const Inputs in = random_inputs(c, 40, 11);
    RoutingOutputT<double> out;
    Rng noise(1);
    route_forward(out, in.x, in.token_ids, in.params, c, &noise);
    const Index E = c.num_experts();
    const std::int64_t pairs = std::accumulate(out.load.begin(), out.load.end(), std::int64_t{0});
    if (c.expert_choice()) {
      const Index C = out.ids.cols();
      EXPECT_EQ(out.ids.rows(), E) << p.name;
      EXPECT_EQ(C, static_cast<Index>(std::ceil(40 * c.capacity_factor / static_cast<double>(E)))) << p.name;
      EXPECT_EQ(pairs, E * C) << p.name;  // every expert takes exactly C tokens
    } else {
      EXPECT_EQ(out.ids.rows(), 40) << p.name;
      EXPECT_EQ(out.ids.cols(), c.top_k) << p.name;
      EXPECT_EQ(pairs, 40 * c.top_k) << p.name;
      for (Index t = 0; t < 40; ++t) {
        for (Index j = 0; j < c.top_k; ++j)
          for (Index i = 0; i < j; ++i) EXPECT_NE(out.ids(t, i), out.ids(t, j)) << p.name << ": expert chosen twice";
        if (c.gating.renormalize) {
          EXPECT_NEAR(out.gates.row(t).sum(), c.gating.routed_scaling_factor, 1e-12) << p.name;
        }
      }
    }
    EXPECT_TRUE(out.gates.allFinite()) << p.name;
    EXPECT_GE(out.aux_loss, 0.0) << p.name;
    EXPECT_GE(out.z_loss, 0.0) << p.name;
  }
}

// Regression (found by the PyTorch oracle): Llama 4, Mixtral and gpt-oss take the top-k of the
// logits. sigmoid(40) and sigmoid(50) are both 1.0 in double, so ranking the scores picked expert 0.
TEST(Routing, GatesFromSelectedLogitsRankTheLogits) {
  RoutingConfig c = find_preset("llama4").tiny;  // E = 8, k = 1
  c.router.hidden_size = 1;
  RoutingParamsT<double> params;
  params.router.weight = MatrixD::Zero(8, 1);
  params.router.weight(0, 0) = 40;
  params.router.weight(1, 0) = 50;
  const MatrixD x = MatrixD::Ones(1, 1);
  RoutingOutputT<double> out;
  route_forward(out, x, {}, params, c, nullptr);
  EXPECT_EQ(out.scores(0, 0), out.scores(0, 1));  // saturated: the scores cannot tell them apart
  EXPECT_EQ(out.ids(0, 0), 1);                    // the logits can
}

TEST(Routing, EmitsTheEventsOfEveryStage) {
  const RoutingConfig c = find_preset("olmoe").tiny;
  const Inputs in = random_inputs(c, 10, 5);
  MemoryRecorder recorder;
  RoutingOutputT<double> out;
  route_forward(out, in.x, {}, in.params, c, nullptr, &recorder);
  for (std::string_view name : {events::router_logits, events::scores, events::topk_ids, events::gates,
                                events::expert_load, events::losses})
    EXPECT_GE(recorder.count(name), 1u) << name;
  const RecordedEvent gates = recorder.last(events::gates);
  EXPECT_EQ(gates.shape, (std::array<std::int64_t, 2>{10, c.top_k}));
  EXPECT_DOUBLE_EQ(gates.values[0], out.gates(0, 0));
  const RecordedEvent load = recorder.last(events::expert_load);
  EXPECT_EQ(load.shape, (std::array<std::int64_t, 2>{c.num_experts(), 1}));
}

TEST(Routing, RejectsBadConfigurationWithTheFieldNamed) {
  const RoutingConfig base = find_preset("qwen3_moe").tiny;  // E = 16, k = 4
  auto message = [&](auto change) {
    RoutingConfig c = base;
    change(c);
    return error_of([&] { c.validate(); });
  };
  EXPECT_EQ(message([](RoutingConfig& c) { c.top_k = 0; }), "top_k = 0: must be at least 1");
  EXPECT_EQ(message([](RoutingConfig& c) { c.top_k = 17; }), "top_k = 17: must not exceed num_experts = 16");
  EXPECT_NE(message([](RoutingConfig& c) {
              c.selection = SelectionKind::group_limited;
              c.group.n_group = 3;
            }).find("n_group = 3"),
            std::string::npos);
  EXPECT_NE(message([](RoutingConfig& c) {
              c.selection = SelectionKind::group_limited;
              c.group = {.n_group = 4, .topk_group = 5};
            }).find("topk_group = 5"),
            std::string::npos);
  EXPECT_NE(message([](RoutingConfig& c) {
              c.selection = SelectionKind::device_limited;
              c.num_devices = 4;
              c.topk_devices = 5;
            }).find("topk_devices = 5"),
            std::string::npos);
  EXPECT_NE(message([](RoutingConfig& c) {
              c.selection = SelectionKind::expert_choice;
              c.aux_loss = AuxLoss::none;
              c.capacity_factor = 0;
            }).find("capacity_factor = 0"),
            std::string::npos);
  EXPECT_EQ(message([](RoutingConfig& c) { c.z_loss_coef = -1; }), "z_loss_coef = -1: must be finite and >= 0");
  EXPECT_NE(message([](RoutingConfig& c) { c.router.num_experts = 0; }).find("num_experts = 0"), std::string::npos);
}

TEST(Routing, NaNInTheRouterInputIsAClearError) {
  const RoutingConfig c = find_preset("mixtral").tiny;
  Inputs in = random_inputs(c, 4, 1);
  in.x(2, 3) = NAN;
  RoutingOutputT<double> out;
  const std::string message = error_of([&] { route_forward(out, in.x, {}, in.params, c, nullptr); });
  EXPECT_NE(message.find("x[2,3] = nan"), std::string::npos) << message;
}

TEST(Routing, EmptyBatchIsValid) {
  for (const Preset& p : presets()) {
    const Inputs in = random_inputs(p.tiny, 0, 1);
    RoutingOutputT<double> out;
    Rng noise(1);
    route_forward(out, in.x, in.token_ids, in.params, p.tiny, &noise);
    EXPECT_EQ(out.logits.rows(), 0) << p.name;
    EXPECT_EQ(out.aux_loss, 0.0) << p.name;
    MatrixD dx;
    RouterParamsT<double> dparams;
    route_backward(dx, dparams, MatrixD(out.gates.rows(), out.gates.cols()), out, in.x, in.params, p.tiny);
    EXPECT_EQ(dx.rows(), 0) << p.name;
    EXPECT_EQ(dparams.weight.cwiseAbs().sum(), 0.0) << p.name;
  }
}

}  // namespace
}  // namespace moelab
