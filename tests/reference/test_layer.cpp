// Tests of reference/layer: the whole MoE layer, forward and backward, for every preset.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

#include "reference/presets.h"
#include "reference/recorder.h"
#include "tests/testing.h"

namespace moelab {
namespace {

using moelab::testing::error_of;
using moelab::testing::max_relative_error;
using moelab::testing::numerical_gradient;
using moelab::testing::random_matrix;

struct Case {
  LayerConfig config;
  LayerParamsT<double> params;
  MatrixD x;
  std::vector<std::int32_t> token_ids;
};

Case make_case(const LayerConfig& config, Index T, std::uint64_t seed) {
  Rng rng(seed);
  Case c{config, init_layer<double>(config, rng, 0.3), random_matrix(rng, T, config.hidden_size()), {}};
  if (config.routing.use_selection_bias) c.params.routing.selection_bias = random_matrix(rng, config.num_experts(), 1, 0.05);
  for (ExpertParamsT<double>& e : c.params.experts) {  // non-zero biases, so their gradients are checked
    if (e.b_up.size() > 0) e.b_up = random_matrix(rng, e.b_up.size(), 1, 0.1);
    if (e.b_gate.size() > 0) e.b_gate = random_matrix(rng, e.b_gate.size(), 1, 0.1);
    if (e.b_down.size() > 0) e.b_down = random_matrix(rng, e.b_down.size(), 1, 0.1);
  }
  for (Index t = 0; t < T; ++t) c.token_ids.push_back(static_cast<std::int32_t>(rng.next_u64() % 256));
  return c;
}

double layer_loss(Case& c, const MatrixD& w, const IndexMatrix* expected_ids) {
  LayerOutputT<double> out;
  Rng noise(3);
  moe_layer_forward(out, c.x, c.token_ids, c.params, c.config, &noise);
  if (expected_ids != nullptr) {
    EXPECT_EQ(out.routing.ids, *expected_ids) << "a finite-difference step changed the selection";
  }
  return (out.y.array() * w.array()).sum() + out.aux_loss + out.z_loss;
}

// d(sum(w * y) + aux + z) against central differences, for x, the router, one routed expert and
// the shared experts, for every preset (capacity dropping, shared gates and gates on the input included).
void check_gradients(Case& c, const std::string& label) {
  LayerOutputT<double> out;
  Rng noise(3);
  moe_layer_forward(out, c.x, c.token_ids, c.params, c.config, &noise);
  Rng wrng(17);
  const MatrixD w = random_matrix(wrng, out.y.rows(), out.y.cols());
  const IndexMatrix ids = out.routing.ids;
  LayerGradsT<double> g;
  moe_layer_backward(g, w, out, c.x, c.params, c.config);
  auto loss = [&] { return layer_loss(c, w, &ids); };
  // Central differences at h = 1e-5 in double: ~1e-10 of the gradient's scale (tests/testing.h).
  EXPECT_LT(max_relative_error(g.dx, numerical_gradient(loss, c.x)), 1e-7) << label << " dx";
  EXPECT_LT(max_relative_error(g.router.weight, numerical_gradient(loss, c.params.routing.router.weight)), 1e-7)
      << label << " router";
  // The expert with the most rows, so its gradient is not trivially zero.
  const auto busiest = std::max_element(out.plan.counts.begin(), out.plan.counts.end()) - out.plan.counts.begin();
  ExpertParamsT<double>& e = c.params.experts[static_cast<std::size_t>(busiest)];
  const ExpertParamsT<double>& ge = g.experts[static_cast<std::size_t>(busiest)];
  EXPECT_LT(max_relative_error(ge.w_up, numerical_gradient(loss, e.w_up)), 1e-7) << label << " w_up";
  EXPECT_LT(max_relative_error(ge.w_down, numerical_gradient(loss, e.w_down)), 1e-7) << label << " w_down";
  if (e.w_gate.size() > 0) {
    EXPECT_LT(max_relative_error(ge.w_gate, numerical_gradient(loss, e.w_gate)), 1e-7) << label << " w_gate";
  }
  for (std::size_t s = 0; s < c.params.shared.size(); ++s) {
    EXPECT_LT(max_relative_error(g.shared[s].w_up, numerical_gradient(loss, c.params.shared[s].w_up)), 1e-7)
        << label << " shared w_up";
  }
  if (c.config.shared.gated) {
    EXPECT_LT(max_relative_error(g.shared_gate, numerical_gradient(loss, c.params.shared_gate)), 1e-7)
        << label << " shared gate";
  }
}

TEST(Layer, BackwardMatchesFiniteDifferencesForEveryPreset) {
  for (const Preset& p : presets()) {
    Case c = make_case(layer_config(p, PresetSize::tiny), 10, 5);
    check_gradients(c, std::string(p.name));
  }
}

TEST(Layer, BackwardWithCapacityDroppingAndBothPolicies) {
  for (DropPolicy policy : {DropPolicy::arrival_order, DropPolicy::gate_priority}) {
    LayerConfig config = layer_config(find_preset("qwen3_moe"), PresetSize::tiny);
    config.capacity = {.dropless = false, .capacity_factor = 0.5, .policy = policy};
    Case c = make_case(config, 16, 8);
    LayerOutputT<double> out;
    moe_layer_forward(out, c.x, c.token_ids, c.params, c.config, nullptr);
    ASSERT_GT(std::accumulate(out.dropped.begin(), out.dropped.end(), std::int64_t{0}), 0) << "nothing dropped";
    check_gradients(c, policy == DropPolicy::arrival_order ? "arrival_order" : "gate_priority");
  }
}

TEST(Layer, LargeCapacityEqualsDropless) {
  LayerConfig dropless = layer_config(find_preset("mixtral"), PresetSize::tiny);
  LayerConfig capped = dropless;
  capped.capacity = {.dropless = false, .capacity_factor = 100.0};
  Case a = make_case(dropless, 24, 2), b = make_case(capped, 24, 2);
  LayerOutputT<double> ya, yb;
  moe_layer_forward(ya, a.x, {}, a.params, dropless, nullptr);
  moe_layer_forward(yb, b.x, {}, b.params, capped, nullptr);
  EXPECT_EQ(ya.y, yb.y);  // the same arithmetic in the same order: bitwise
  EXPECT_EQ(std::accumulate(yb.dropped.begin(), yb.dropped.end(), std::int64_t{0}), 0);
}

// A token dropped by all of its experts passes through the shared experts only.
TEST(Layer, FullyDroppedTokenGetsOnlyTheSharedExperts) {
  LayerConfig config = layer_config(find_preset("deepseek_v3"), PresetSize::tiny);
  config.capacity = {.dropless = false, .capacity_factor = 0.1};  // capacity 1 per expert
  Case c = make_case(config, 32, 4);
  LayerOutputT<double> out;
  moe_layer_forward(out, c.x, {}, c.params, config, nullptr);
  int fully_dropped = 0;
  for (Index t = 0; t < 32; ++t) {
    if (out.keep.row(t).sum() != 0) continue;
    ++fully_dropped;
    MatrixD shared = MatrixD::Zero(1, config.hidden_size());
    for (const MatrixD& s : out.shared_out) shared += s.row(t);
    EXPECT_LT((out.y.row(t) - shared).cwiseAbs().maxCoeff(), 1e-15) << "token " << t;
  }
  EXPECT_GT(fully_dropped, 0);
}

TEST(Layer, LoadCountsAreWhatTheDispatchProduced) {
  const LayerConfig config = layer_config(find_preset("olmoe"), PresetSize::tiny);
  Case c = make_case(config, 40, 6);
  MemoryRecorder recorder;
  LayerOutputT<double> out;
  moe_layer_forward(out, c.x, {}, c.params, config, nullptr, &recorder);
  EXPECT_EQ(out.plan.counts, out.routing.load);  // dropless: every pair dispatched
  EXPECT_EQ(out.expert_out.rows(), 40 * config.routing.top_k);
  const RecordedEvent timing = recorder.last(events::timing);
  EXPECT_GE(timing.stat("experts_seconds"), 0.0);
  EXPECT_GE(recorder.count(events::dropped), 1u);
}

// Sparse upcycling: copies of the dense FFN and gates summing to 1 give the dense FFN exactly.
TEST(Layer, UpcycledLayerEqualsTheDenseFfnAtInitialisation) {
  for (const char* name : {"mixtral", "qwen3_moe", "deepseek_v3"}) {
    LayerConfig config = layer_config(find_preset(name), PresetSize::tiny);
    config.shared.count = 0;
    config.shared.gated = false;
    config.routing.gating.routed_scaling_factor = 1.0;  // gates sum to 1
    Rng rng(12);
    const ExpertParamsT<double> dense = init_expert<double>(config.expert, rng, 0.3);
    const LayerParamsT<double> params = upcycle(dense, config, rng);
    const MatrixD x = random_matrix(rng, 20, config.hidden_size());
    LayerOutputT<double> out;
    moe_layer_forward(out, x, {}, params, config, nullptr);
    MatrixD dense_y;
    ExpertCacheT<double> cache;
    expert_forward(dense_y, cache, x, dense, config.expert);
    EXPECT_LT((out.y - dense_y).cwiseAbs().maxCoeff(), 1e-13) << name;
    // With noise the experts differ, and so does the output.
    const LayerParamsT<double> noisy = upcycle(dense, config, rng, 0.01);
    moe_layer_forward(out, x, {}, noisy, config, nullptr);
    EXPECT_GT((out.y - dense_y).cwiseAbs().maxCoeff(), 1e-6) << name;
  }
}

// DeepSeekMoE fine-grained segmentation keeps the parameters and the FLOPs of the experts.
TEST(Layer, FineGrainedSegmentationKeepsParametersAndFlops) {
  const LayerConfig base = layer_config(find_preset("mixtral"), PresetSize::tiny);  // E = 8, k = 2, H = 32
  const LayerConfig fine = segment_layer(base, 4);
  EXPECT_EQ(fine.num_experts(), 32);
  EXPECT_EQ(fine.routing.top_k, 8);
  EXPECT_EQ(fine.expert.intermediate_size, base.expert.intermediate_size / 4);
  EXPECT_EQ(fine.num_experts() * expert_parameters(fine.expert), base.num_experts() * expert_parameters(base.expert));
  EXPECT_EQ(fine.routing.top_k * expert_flops_per_token(fine.expert),
            base.routing.top_k * expert_flops_per_token(base.expert));
  EXPECT_NE(error_of([&] { segment_layer(base, 3); }).find("not divisible"), std::string::npos);
}

TEST(Layer, RejectsBadInput) {
  const LayerConfig config = layer_config(find_preset("mixtral"), PresetSize::tiny);
  Case c = make_case(config, 4, 1);
  LayerOutputT<double> out;
  const MatrixD wrong_x = MatrixD::Ones(4, config.hidden_size() + 1);
  EXPECT_NE(error_of([&] { moe_layer_forward(out, wrong_x, {}, c.params, config, nullptr); }).find("x.cols()"),
            std::string::npos);
  LayerParamsT<double> missing = c.params;
  missing.experts.pop_back();
  EXPECT_EQ(error_of([&] { moe_layer_forward(out, c.x, {}, missing, config, nullptr); }),
            "experts.size() = 7: must equal num_experts = 8");
  LayerConfig zero = config;
  zero.routing.router.num_experts = 0;
  EXPECT_NE(error_of([&] { zero.validate(); }).find("num_experts = 0"), std::string::npos);
  LayerConfig mismatched = config;
  mismatched.expert.hidden_size = 7;
  EXPECT_EQ(error_of([&] { mismatched.validate(); }),
            fmt::format("expert.hidden_size = 7: must equal the router's hidden_size = {}", config.hidden_size()));
  EXPECT_NE(error_of([] { find_preset("nope"); }).find("preset = \"nope\""), std::string::npos);
}

TEST(Layer, EmptyBatchIsValid) {
  const LayerConfig config = layer_config(find_preset("qwen2_moe"), PresetSize::tiny);
  Case c = make_case(config, 0, 1);
  LayerOutputT<double> out;
  moe_layer_forward(out, c.x, {}, c.params, config, nullptr);
  EXPECT_EQ(out.y.rows(), 0);
  LayerGradsT<double> g;
  moe_layer_backward(g, MatrixD(0, config.hidden_size()), out, c.x, c.params, config);
  EXPECT_EQ(g.dx.rows(), 0);
}

}  // namespace
}  // namespace moelab
