// Tests of reference/presets: every preset is valid, has its published sizes, and the conventions
// differ exactly where the papers say they do.
#include <gtest/gtest.h>

#include <set>

#include "reference/presets.h"
#include "tests/testing.h"

namespace moelab {
namespace {

using moelab::testing::error_of;

TEST(Presets, AllThirteenAreValidAndNamedOnce) {
  std::set<std::string_view> names;
  for (const Preset& p : presets()) {
    EXPECT_TRUE(names.insert(p.name).second) << p.name;
    EXPECT_NO_THROW(p.full.validate()) << p.name;
    EXPECT_NO_THROW(p.tiny.validate()) << p.name;
    EXPECT_FALSE(p.source.empty()) << p.name;
    EXPECT_FALSE(p.convention.empty()) << p.name;
    EXPECT_EQ(p.tiny.router.hidden_size, 16) << p.name;
    EXPECT_LE(p.tiny.num_experts(), 16) << p.name;
    // The tiny configuration keeps the conventions.
    EXPECT_EQ(p.tiny.scoring, p.full.scoring) << p.name;
    EXPECT_EQ(p.tiny.selection, p.full.selection) << p.name;
    EXPECT_EQ(p.tiny.gating.kind, p.full.gating.kind) << p.name;
    EXPECT_EQ(p.tiny.gating.renormalize, p.full.gating.renormalize) << p.name;
    EXPECT_EQ(p.tiny.gating.routed_scaling_factor, p.full.gating.routed_scaling_factor) << p.name;
    EXPECT_EQ(p.tiny.aux_loss, p.full.aux_loss) << p.name;
  }
  const std::set<std::string_view> expected = {"switch",      "gshard",      "mixtral", "qwen2_moe",     "qwen3_moe",
                                               "olmoe",       "deepseek_v2", "deepseek_v3", "llama4",    "gpt_oss",
                                               "expert_choice", "hash",      "gpu_mode_amd"};
  EXPECT_EQ(names, expected);
}

TEST(Presets, PublishedSizesAndConventions) {
  const RoutingConfig& v3 = find_preset("deepseek_v3").full;
  EXPECT_EQ(v3.router.hidden_size, 7168);
  EXPECT_EQ(v3.num_experts(), 256);
  EXPECT_EQ(v3.top_k, 8);
  EXPECT_EQ(v3.group.n_group, 8);
  EXPECT_EQ(v3.group.topk_group, 4);
  EXPECT_EQ(v3.scoring, Scoring::sigmoid);
  EXPECT_EQ(v3.gating.renorm_eps, 1e-20);
  EXPECT_EQ(v3.gating.routed_scaling_factor, 2.5);
  EXPECT_TRUE(v3.use_selection_bias);
  const RoutingConfig& v2 = find_preset("deepseek_v2").full;
  EXPECT_EQ(v2.num_experts(), 160);
  EXPECT_EQ(v2.top_k, 6);
  EXPECT_EQ(v2.topk_devices, 3);
  EXPECT_EQ(v2.gating.routed_scaling_factor, 16.0);
  EXPECT_FALSE(v2.gating.renormalize);
  const RoutingConfig& mixtral = find_preset("mixtral").full;
  EXPECT_EQ(mixtral.num_experts(), 8);
  EXPECT_EQ(mixtral.top_k, 2);
  EXPECT_EQ(mixtral.gating.kind, GateKind::softmax_of_selected_logits);
  EXPECT_FALSE(find_preset("qwen2_moe").full.gating.renormalize);  // norm_topk_prob = false
  EXPECT_TRUE(find_preset("qwen3_moe").full.gating.renormalize);   // norm_topk_prob = true
  EXPECT_FALSE(find_preset("olmoe").full.gating.renormalize);
  EXPECT_EQ(find_preset("olmoe").full.z_loss_coef, 0.001);
  EXPECT_EQ(find_preset("llama4").full.gating.kind, GateKind::sigmoid_of_selected_logits);
  EXPECT_TRUE(find_preset("gpt_oss").full.router.use_bias);
  EXPECT_EQ(find_preset("switch").full.top_k, 1);
  EXPECT_EQ(find_preset("switch").full.router.noise, RouterNoise::jitter);
}

// One token, the same logits, six conventions (E = 4, k = 2 where the preset allows):
//   logits [2, 1, 0, -1]; softmax = [0.6439, 0.2369, 0.0871, 0.0321]; sigmoid(2) = 0.8808
TEST(Presets, TheConventionsZooOnOneToken) {
  MatrixD logits(1, 4);
  logits << 2, 1, 0, -1;
  IndexMatrix ids(1, 2);
  ids << 0, 1;
  auto gates_of = [&](const char* name) {
    const RoutingConfig& c = find_preset(name).full;
    MatrixD scores, gates;
    score_forward(scores, logits, c.scoring);
    gating_forward(gates, logits, scores, ids, c.gating, nullptr);
    return gates;
  };
  const double e = std::exp(1.0);
  const double z = std::exp(2.0) + e + 1 + std::exp(-1.0);
  // OLMoE / Qwen2-MoE / GPU MODE: the softmax probabilities themselves.
  EXPECT_NEAR(gates_of("olmoe")(0, 0), std::exp(2.0) / z, 1e-15);
  EXPECT_NEAR(gates_of("qwen2_moe")(0, 1), e / z, 1e-15);
  EXPECT_NEAR(gates_of("gpu_mode_amd")(0, 0), std::exp(2.0) / z, 1e-15);
  // Qwen3 (renormalised) and Mixtral (softmax over the two): both e / (e + 1) = 0.7311.
  EXPECT_NEAR(gates_of("qwen3_moe")(0, 0), e / (e + 1), 1e-15);
  EXPECT_NEAR(gates_of("mixtral")(0, 0), e / (e + 1), 1e-15);
  // DeepSeek-V2: softmax times 16, not renormalised: 16 * 0.6439 = 10.30.
  EXPECT_NEAR(gates_of("deepseek_v2")(0, 0), 16 * std::exp(2.0) / z, 1e-13);
  // DeepSeek-V3: sigmoid, renormalised, times 2.5: 2.5 * 0.8808 / (0.8808 + 0.7311).
  const double s0 = 1 / (1 + std::exp(-2.0)), s1 = 1 / (1 + std::exp(-1.0));
  EXPECT_NEAR(gates_of("deepseek_v3")(0, 0), 2.5 * s0 / (s0 + s1 + 1e-20), 1e-14);
  // Llama 4: sigmoid of the logit, not renormalised.
  EXPECT_NEAR(gates_of("llama4")(0, 0), s0, 1e-15);
}

TEST(Presets, UnknownNameListsTheKnownOnes) {
  EXPECT_EQ(error_of([] { find_preset("mixtral8x22b"); }),
            "preset = \"mixtral8x22b\": is not a known preset; choose one of switch, gshard, mixtral, qwen2_moe, "
            "qwen3_moe, olmoe, deepseek_v2, deepseek_v3, llama4, gpt_oss, expert_choice, hash, gpu_mode_amd");
}

TEST(Presets, JsonHasEveryConventionField) {
  const nlohmann::ordered_json j = to_json(find_preset("deepseek_v3").full);
  EXPECT_EQ(j["num_experts"], 256);
  EXPECT_EQ(j["scoring"], "sigmoid");
  EXPECT_EQ(j["selection"], "group_limited");
  EXPECT_EQ(j["group"]["mask"], "neg_inf");
  EXPECT_EQ(j["gating"]["renorm_eps"], 1e-20);
  EXPECT_EQ(j["losses"]["aux_loss"], "deepseek_v3_sequence");
  EXPECT_EQ(j["losses"]["bias_update_rate"], 0.001);
}

}  // namespace
}  // namespace moelab
