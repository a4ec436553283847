// Tests of reference/accounting: the parameter counts of the published models, tensor by tensor,
// against hand-worked figures (docs/accounting.md) and the publishers' own totals.
#include <gtest/gtest.h>

#include <cmath>

#include "reference/accounting.h"
#include "reference/presets.h"
#include "tests/testing.h"

namespace moelab {
namespace {

using moelab::testing::error_of;

TEST(Accounting, DeepSeekV3ExpertHas44MParameters) {
  const Accounting a = account(model_sizes("deepseek_v3"));
  // gate (7168 x 2048) + up (7168 x 2048) + down (2048 x 7168): 3 matrices, not 2, not 1.
  EXPECT_EQ(a.expert_params, 44'040'192);
  EXPECT_EQ(a.expert_params, 3LL * 7168 * 2048);
  EXPECT_EQ(a.shared_expert_params, 44'040'192);
}

TEST(Accounting, DeepSeekV3Is671BTotal37BActiveAndEveryPartAddsUp) {
  const Accounting a = account(model_sizes("deepseek_v3"));
  EXPECT_EQ(a.dense_ffn_layers, 3);
  EXPECT_EQ(a.moe_layers, 58);
  // docs/accounting.md, step by step.
  EXPECT_EQ(a.embedding.total, 129'280LL * 7168);  // 926,679,040
  EXPECT_EQ(a.embedding.active, 0);                // a lookup
  EXPECT_EQ(a.lm_head.total, 926'679'040);
  // MLA: q_a 7168x1536 + q_a_norm 1536 + q_b 1536x(128x192) + kv_a 7168x(512+64) + kv_a_norm 512
  //      + kv_b 512x(128x(128+128)) + o (128x128)x7168
  EXPECT_EQ(a.attention_per_layer, 11'010'048 + 1536 + 37'748'736 + 4'128'768 + 512 + 16'777'216 + 117'440'512);
  EXPECT_EQ(a.attention_per_layer, 187'107'328);
  EXPECT_EQ(a.attention.total, 61 * a.attention_per_layer);
  EXPECT_EQ(a.dense_ffn_per_layer, 3LL * 7168 * 18432);  // 396,361,728
  EXPECT_EQ(a.dense_ffn.total, 3 * a.dense_ffn_per_layer);
  EXPECT_EQ(a.routed_experts.total, 58LL * 256 * 44'040'192);
  EXPECT_EQ(a.routed_experts.active, 58LL * 8 * 44'040'192);
  EXPECT_EQ(a.shared_experts.total, 58LL * 44'040'192);
  EXPECT_EQ(a.router_per_layer, 256 * 7168 + 256);  // + e_score_correction_bias
  EXPECT_EQ(a.routers.total, 58 * a.router_per_layer);
  EXPECT_EQ(a.norms.total, 61 * 2 * 7168 + 7168);
  EXPECT_EQ(a.total_params, 671'026'419'200);
  EXPECT_EQ(a.active_params, 36'625'618'432);  // body and head, no embedding table
  EXPECT_EQ(a.active_params_with_embedding, a.active_params + a.embedding.total);
  // Total minus active (with the table) is exactly the idle routed experts.
  EXPECT_EQ(a.total_params - a.active_params_with_embedding, 58LL * (256 - 8) * 44'040'192);
  // The README's 671B and 37B: our counts round to them.
  EXPECT_NEAR(static_cast<double>(a.total_params), 671e9, 0.5e9);
  EXPECT_NEAR(static_cast<double>(a.active_params), 37e9, 0.5e9);
  // README_WEIGHTS.md's finer 36.7B: within 0.3% (it is 36.63B here; with the embedding table
  // 37.55B, which matches neither figure).
  EXPECT_NEAR(static_cast<double>(a.active_params), 36.7e9, 0.003 * 36.7e9);
}

TEST(Accounting, DeepSeekV3MultiTokenPredictionIsInTheCheckpointNotInThe671B) {
  const Accounting a = account(model_sizes("deepseek_v3"));
  // eh_proj (2C -> C) + enorm + hnorm + one MoE layer (attention, 256 + 1 experts, router, 2 norms)
  // + shared_head.norm.
  const std::int64_t moe_layer = 187'107'328 + 257LL * 44'040'192 + 256 * 7168 + 256 + 2 * 7168;
  EXPECT_EQ(a.mtp_params, 2LL * 7168 * 7168 + 2 * 7168 + moe_layer + 7168);
  EXPECT_EQ(a.mtp_params, 11'610'068'224);
  EXPECT_EQ(a.mtp_stored_copies, 2 * a.embedding.total);  // embed_tokens and shared_head.head copies
  // 671.0B + 11.6B + 1.9B = 684.5B in the safetensors files; with the fp8 block scales (one fp32
  // per 128 x 128 block, ~0.04B) Hugging Face shows 685B.
  const double stored = static_cast<double>(a.total_params + a.mtp_params + a.mtp_stored_copies);
  EXPECT_NEAR(stored, 684.5e9, 0.05e9);
  EXPECT_NEAR(static_cast<double>(a.mtp_params + a.mtp_stored_copies), 14e9, 0.6e9);  // the README's "14B"
}

TEST(Accounting, Mixtral) {
  const Accounting a = account(model_sizes("mixtral"));
  EXPECT_EQ(a.moe_layers, 32);
  EXPECT_EQ(a.dense_ffn_layers, 0);
  EXPECT_EQ(a.expert_params, 3LL * 4096 * 14336);                                // 176,160,768
  EXPECT_EQ(a.attention_per_layer, 4096LL * 4096 * 2 + 2LL * 4096 * 8 * 128);    // q, o + GQA k, v
  EXPECT_EQ(a.total_params, 46'702'792'704);
  EXPECT_EQ(a.active_params_with_embedding, 12'879'925'248);
  EXPECT_NEAR(static_cast<double>(a.total_params), 46.7e9, 0.05e9);
  EXPECT_NEAR(static_cast<double>(a.active_params_with_embedding), 12.9e9, 0.05e9);
  // The "8x7B" is not 56B: attention, embeddings and norms are shared by the experts.
  EXPECT_LT(a.total_params, 8 * 7'000'000'000LL);
  // FLOPs: every multiplied parameter twice; attention scores and context apart.
  const std::int64_t per_layer = 41'943'040 + 2 * 176'160'768 + 4096 * 8;
  EXPECT_EQ(a.flops_per_token, 2 * (32 * per_layer + 32000LL * 4096));
  EXPECT_EQ(a.context_length, 4096);
  EXPECT_EQ(a.attention_flops_per_token, 32LL * 4 * 32 * 128 * 4096);  // q k^T and p v, 2 FLOPs each
}

// The publishers' figures and how close our count must come. A published figure with n digits is
// matched when our count rounds to it: tolerance half a unit of its last digit. Exceptions say why.
TEST(Accounting, EveryCountablePresetMatchesItsPublishedFigures) {
  const struct {
    const char* preset;
    double total, total_tol, active, active_tol;
    bool active_counts_embedding;
  } cases[] = {
      {"mixtral", 46.7e9, 0.05e9, 12.9e9, 0.05e9, true},
      {"deepseek_v3", 671e9, 0.5e9, 37e9, 0.5e9, false},
      {"deepseek_v2", 236e9, 0.5e9, 21e9, 0.5e9, false},
      {"qwen2_moe", 14.3e9, 0.05e9, 2.7e9, 0.05e9, true},
      // Qwen truncates: 3.353B is published as 3.3B (one unit of the last digit).
      {"qwen3_moe", 30.5e9, 0.05e9, 3.3e9, 0.1e9, true},
      {"olmoe", 6.9e9, 0.05e9, 1.3e9, 0.05e9, true},
      // 109B includes the vision encoder and projector (~0.9B) that a text-only count leaves out.
      {"llama4", 109e9, 1.5e9, 17e9, 0.5e9, true},
      {"gpt_oss", 116.83e9, 0.005e9, 5.13e9, 0.005e9, false},
      // Active: T5-Base's 223M, which it is FLOP-matched to, plus the 12 routers (1.18M) T5 lacks.
      {"switch", 7.4e9, 0.05e9, 0.223e9, 0.0015e9, true},
  };
  for (const auto& c : cases) {
    const ModelSizes m = model_sizes(c.preset);
    EXPECT_EQ(m.published.total_params, c.total) << c.preset;
    EXPECT_EQ(m.published.active_params, c.active) << c.preset;
    EXPECT_EQ(m.published.active_counts_embedding, c.active_counts_embedding) << c.preset;
    EXPECT_FALSE(m.published.source.empty()) << c.preset;
    EXPECT_FALSE(m.source.empty()) << c.preset;
    const Accounting a = account(m);
    const double active = static_cast<double>(c.active_counts_embedding ? a.active_params_with_embedding
                                                                        : a.active_params);
    EXPECT_NEAR(static_cast<double>(a.total_params), c.total, c.total_tol) << c.preset;
    EXPECT_NEAR(active, c.active, c.active_tol) << c.preset;
  }
}

TEST(Accounting, PublishedBreakdownsOfGptOssAndQwen3) {
  const Accounting g = account(model_sizes("gpt_oss"));
  // gpt-oss model card: MLP 114.71B, attention 0.96B, embedding + unembedding 1.16B.
  EXPECT_NEAR(static_cast<double>(g.routed_experts.total + g.routers.total), 114.71e9, 0.005e9);
  EXPECT_NEAR(static_cast<double>(g.attention.total), 0.96e9, 0.005e9);
  EXPECT_NEAR(static_cast<double>(g.embedding.total + g.lm_head.total), 1.16e9, 0.005e9);
  EXPECT_EQ(g.expert_params, 2880LL * 5760 + 5760 + 2880LL * 2880 + 2880);  // gate_up, down, with biases
  // Its checkpoint, 60.8 GiB: expert matrices in MXFP4 (4 bits + one 8-bit scale per 32 weights),
  // everything else in bf16 — the int4-with-scales assumption of Accounting, checked.
  const std::int64_t expert_matrices = 36LL * 128 * 3 * 2880 * 2880;
  const double bytes = static_cast<double>(expert_matrices) * (4.0 + 8.0 / 32) / 8 +
                       2.0 * static_cast<double>(g.total_params - expert_matrices);
  EXPECT_NEAR(bytes / (1024.0 * 1024 * 1024), 60.8, 0.05);

  const Accounting q = account(model_sizes("qwen3_moe"));
  // Qwen3 model card: 29.9B non-embedding (without the embedding and the head).
  EXPECT_NEAR(static_cast<double>(q.total_params - q.embedding.total - q.lm_head.total), 29.9e9, 0.05e9);
}

TEST(Accounting, SwitchBaseIsT5BasePlusExpertsEveryOtherLayer) {
  const ModelSizes m = model_sizes("switch");
  for (std::int64_t i = 0; i < 12; ++i) EXPECT_EQ(is_moe_layer(m, i), i % 2 == 1) << i;
  const Accounting a = account(m);
  EXPECT_EQ(a.moe_layers, 12);  // 6 in the encoder, 6 in the decoder
  EXPECT_EQ(a.dense_ffn_layers, 12);
  EXPECT_EQ(a.expert_params, 2LL * 768 * 3072);  // ReLU: wi, wo
  EXPECT_EQ(a.lm_head.total, 0);                 // logits reuse the embedding
  EXPECT_EQ(a.embedding.active, a.embedding.total);
  // One token's path is T5-Base's (222,903,552 parameters) plus the 12 routers it passes.
  EXPECT_EQ(a.active_params, 222'903'552 + 12LL * 768 * 128);
  EXPECT_EQ(a.active_params, a.active_params_with_embedding);
  // The paper's series: Switch-Base with 16, 32, 64, 128, 256 experts at 1.1, 2.0, 3.8, 7.4, 14.7B.
  const struct {
    std::int64_t experts;
    double published;
  } series[] = {{16, 1.1e9}, {32, 2.0e9}, {64, 3.8e9}, {128, 7.4e9}, {256, 14.7e9}};
  for (const auto& s : series) {
    ModelSizes e = m;
    e.n_routed_experts = s.experts;
    EXPECT_NEAR(static_cast<double>(account(e).total_params), s.published, 0.05e9) << s.experts;
  }
}

TEST(Accounting, GpuModeAmdIsOneMoELayer) {
  const Accounting a = account(model_sizes("gpu_mode_amd"));
  EXPECT_EQ(a.moe_layers, 1);
  EXPECT_EQ(a.attention.total + a.embedding.total + a.lm_head.total + a.norms.total, 0);
  // 3 * 7168 * 2048 = 44,040,192 per expert; the router is 32 x 7168.
  EXPECT_EQ(a.total_params, 33LL * 44'040'192 + 32 * 7168);
  EXPECT_EQ(a.active_params, 5LL * 44'040'192 + 32 * 7168);
  EXPECT_EQ(a.flops_per_token, 2 * a.active_params);
  EXPECT_EQ(a.attention_flops_per_token, 0);
}

TEST(Accounting, FlopsAreTwicePerMultipliedParameter) {
  // Everything active but norms, biases and sinks is multiplied once per token.
  const Accounting v3 = account(model_sizes("deepseek_v3"));
  const std::int64_t not_multiplied = v3.norms.total + 61 * (1536 + 512) + 58 * 256;
  EXPECT_EQ(v3.flops_per_token, 2 * (v3.active_params - not_multiplied));
  // MLA scores (128 heads of 128 + 64) and context (128 heads of 128) against 4096 keys, 61 layers.
  EXPECT_EQ(v3.attention_flops_per_token, 61LL * (2 * 128 * 192 + 2 * 128 * 128) * 4096);
  // Local attention sees at most its window: gpt-oss's 18 sliding layers see 128 keys.
  const Accounting g = account(model_sizes("gpt_oss"), 100'000);
  EXPECT_EQ(g.attention_flops_per_token, 18LL * 4 * 64 * 64 * 100'000 + 18LL * 4 * 64 * 64 * 128);
}

TEST(Accounting, WeightMemoryIn16And8And4Bits) {
  const Accounting a = account(model_sizes("deepseek_v3"));
  EXPECT_EQ(a.bytes_bf16, 2 * a.total_params);
  EXPECT_EQ(a.bytes_fp8, a.total_params);  // 671 GB: no 24 GB card holds it, 37B active or not
  EXPECT_EQ(a.bytes_int4, a.total_params / 2);
  EXPECT_EQ(a.bytes_int4_scaled, a.total_params / 2 + a.total_params / 32);
  EXPECT_GT(a.bytes_int4, 13 * 24'000'000'000LL);  // even at 4 bits, ~14 cards of 24 GB
}

TEST(Accounting, FineGrainedSegmentationKeepsExpertParametersAndFlops) {
  // DeepSeekMoE: split each expert's hidden size by m, multiply E and k by m. Only the router grows.
  ModelSizes m = model_sizes("mixtral");
  const Accounting before = account(m);
  m.n_routed_experts *= 4;
  m.top_k *= 4;
  m.moe_intermediate_size /= 4;
  const Accounting after = account(m);
  EXPECT_EQ(after.routed_experts.total, before.routed_experts.total);
  EXPECT_EQ(after.routed_experts.active, before.routed_experts.active);
  EXPECT_EQ(after.routers.total - before.routers.total, 32LL * 4096 * (32 - 8));
  EXPECT_EQ(after.flops_per_token - before.flops_per_token, 2 * 32LL * 4096 * (32 - 8));
}

TEST(Accounting, PresetsWithoutACheckpointAndUnknownNamesAreErrors) {
  EXPECT_NE(error_of([] { model_sizes("nope"); }).find("preset = \"nope\": is not a known preset"), std::string::npos);
  for (const char* name : {"gshard", "expert_choice", "hash"}) {
    const std::string e = error_of([&] { model_sizes(name); });
    EXPECT_NE(e.find(std::string("preset = \"") + name + "\": has no published checkpoint"), std::string::npos) << e;
  }
  int countable = 0;
  for (const Preset& p : presets()) {
    if (error_of([&] { model_sizes(p.name); }).empty()) {
      ++countable;
      const ModelSizes m = model_sizes(p.name);
      EXPECT_EQ(m.preset, p.name);
      EXPECT_NO_THROW(m.validate()) << p.name;
      // The full sizes agree with the routing preset's.
      EXPECT_EQ(m.hidden_size, p.full.router.hidden_size) << p.name;
      EXPECT_EQ(m.n_routed_experts, p.full.num_experts()) << p.name;
      EXPECT_EQ(m.top_k, p.full.top_k) << p.name;
    }
  }
  EXPECT_EQ(countable, 10);
}

TEST(Accounting, InvalidSizesNameTheFieldAndTheRule) {
  ModelSizes m = model_sizes("mixtral");
  m.top_k = 9;
  EXPECT_NE(error_of([&] { account(m); }).find("top_k = 9: must be in [0, n_routed_experts = 8]"), std::string::npos);
  m = model_sizes("switch");
  m.moe_layer_offset = 2;
  EXPECT_NE(error_of([&] { account(m); }).find("moe_layer_offset = 2: must be in [0, moe_layer_step = 2)"),
            std::string::npos);
  m = model_sizes("mixtral");
  m.num_kv_heads = 5;
  EXPECT_NE(error_of([&] { account(m); }).find("num_kv_heads = 5: must divide num_heads = 32"), std::string::npos);
  m = model_sizes("deepseek_v3");
  m.num_dense_layers = 62;
  EXPECT_NE(error_of([&] { account(m); }).find("num_dense_layers = 62"), std::string::npos);
  EXPECT_NE(error_of([] { account(model_sizes("olmoe"), 0); }).find("context_length = 0"), std::string::npos);
}

}  // namespace
}  // namespace moelab
