// Tests of the tiny language model (reference/model.h): the full backward by finite differences in
// double (dense and MoE blocks, aux and z losses, shared experts, biases, tied head), the named
// configurations' sizes (equal active parameters), parameter names, causality, a tiny overfit
// run with AdamW, layer-stamped events, bias balancing, the JSON config, and the Errors.
// B = batch, T = sequence length, N = B*T, C = hidden size, V = vocabulary, E = experts.
#include "reference/accounting.h"
#include "reference/error.h"
#include "reference/model.h"
#include "reference/optim.h"
#include "reference/presets.h"
#include "reference/random.h"
#include "reference/recorder.h"
#include "reference/types.h"
#include "tests/testing.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace moelab {
namespace {

using moelab::testing::error_of;

using VectorD = VectorT<double>;

std::vector<std::int32_t> random_ids(Rng& rng, std::size_t n, Index vocab_size) {
  std::vector<std::int32_t> ids(n);
  for (std::int32_t& id : ids) id = static_cast<std::int32_t>(rng.next_u64() % static_cast<std::uint64_t>(vocab_size));
  return ids;
}

// A model small enough for finite differences: V = 16, C = 8, 2 blocks of 2 heads, dense FFN 16,
// the preset's tiny routing with experts (and shared experts) of width 8.
ModelConfig small_config(std::string_view preset, MoeLayout layout, Index first_k_dense = 0) {
  ModelConfig c;
  c.vocab_size = 16;
  c.hidden_size = 8;
  c.n_layers = 2;
  c.n_heads = 2;
  c.intermediate_size = 16;
  c.moe_layout = layout;
  c.first_k_dense_replace = first_k_dense;
  c.init_std = 0.3;  // large enough that every nonlinearity is exercised
  c.moe = layer_config(find_preset(preset), PresetSize::tiny);
  c.moe.routing.router.hidden_size = c.hidden_size;
  c.moe.expert.hidden_size = c.hidden_size;
  c.moe.expert.intermediate_size = 8;
  if (c.moe.shared.count > 0) c.moe.shared.intermediate_size = 8;
  c.validate();
  return c;
}

// Norm weights and (selection) biases start at 1 and 0; random values test their gradients.
void randomise_state(ModelParamsT<double>& p, const ModelConfig& c, Rng& rng) {
  for (NamedParamT<double>& t : model_parameters(p, c))
    if (t.vector != nullptr)
      for (Index i = 0; i < t.size(); ++i) (*t.vector)(i) += 0.3 * rng.normal();
  for (NamedParamT<double>& t : model_buffers(p, c))
    for (Index i = 0; i < t.size(); ++i) (*t.vector)(i) = 0.2 * rng.normal();
}

double* data_of(const NamedParamT<double>& t) { return t.matrix != nullptr ? t.matrix->data() : t.vector->data(); }

// Every MoE block's routing decisions: ids and kept pairs (what top-k and capacity decide).
std::vector<IndexMatrix> decisions(const ModelOutputT<double>& out, const ModelConfig& c) {
  std::vector<IndexMatrix> d;
  for (Index i = 0; i < c.n_layers; ++i)
    if (c.is_moe(i)) {
      d.push_back(out.blocks[static_cast<std::size_t>(i)].moe.routing.ids);
      d.push_back(out.blocks[static_cast<std::size_t>(i)].moe.keep);
    }
  return d;
}

// --- 1. the full backward by finite differences --------------------------------------------------
//
// Central differences of the total loss (cross-entropy + aux + z) with h = 1e-6 for every entry of
// every parameter. Top-k selection (and capacity) are piecewise constant: a perturbation that
// changed a decision would measure a jump, not a derivative, so every perturbed forward's
// decisions are compared with the unperturbed ones and the test requires that none changed (the
// seeds are chosen so; h = 1e-6 moves a logit by ~1e-6). In double, rounding in the loss (~1e-15)
// over 2h gives ~1e-9 of noise, truncation O(h^2) less; a wrong term in a backward is O(1) of the
// gradient. The error is measured against max(the tensor's largest gradient, 0.01), so that a
// tensor whose true gradient is 0 (an expert no token chose) is held to the absolute noise.

constexpr double kStep = 1e-6;
constexpr double kTolerance = 1e-6;

void check_model_gradients(const ModelConfig& config, std::uint64_t seed) {
  Rng rng(seed);
  ModelParamsT<double> params = init_model<double>(config, rng);
  randomise_state(params, config, rng);
  const Index B = 2, T = 4;
  const std::vector<std::int32_t> ids = random_ids(rng, B * T, config.vocab_size);
  const std::vector<std::int32_t> targets = random_ids(rng, B * T, config.vocab_size);

  ModelOutputT<double> out;
  model_forward(out, ids, B, T, params, config);
  const ModelLossT<double> loss = model_loss(out, targets);
  EXPECT_GT(loss.ce, 1.0);
  if (config.moe.routing.aux_loss != AuxLoss::none) {
    EXPECT_GT(loss.aux, 1e-3) << "the aux loss must take part";
  }
  if (config.moe.routing.z_loss_coef > 0) {
    EXPECT_GT(loss.z, 1e-3) << "the z-loss must take part";
  }
  ModelGradsT<double> grads;
  model_backward(grads, out, targets, params, config);
  const std::vector<IndexMatrix> reference = decisions(out, config);

  int flips = 0;
  ModelOutputT<double> probe;
  const auto total = [&] {
    model_forward(probe, ids, B, T, params, config);
    if (decisions(probe, config) != reference) ++flips;
    return model_loss(probe, targets).total();
  };
  const std::vector<NamedParamT<double>> p = model_parameters(params, config);
  const std::vector<ConstNamedParamT<double>> g = model_parameters(std::as_const(grads), config);
  ASSERT_EQ(p.size(), g.size());
  for (std::size_t k = 0; k < p.size(); ++k) {
    ASSERT_EQ(p[k].name, g[k].name);
    ASSERT_EQ(p[k].size(), g[k].size()) << p[k].name;
    double* x = data_of(p[k]);
    const double* analytic = g[k].matrix != nullptr ? g[k].matrix->data() : g[k].vector->data();
    double error = 0, scale = 0.01;
    for (Index i = 0; i < p[k].size(); ++i) {
      const double saved = x[i];
      x[i] = saved + kStep;
      const double up = total();
      x[i] = saved - kStep;
      const double down = total();
      x[i] = saved;
      const double numeric = (up - down) / (2 * kStep);
      error = std::max(error, std::abs(numeric - analytic[i]));
      scale = std::max({scale, std::abs(numeric), std::abs(analytic[i])});
    }
    EXPECT_LT(error / scale, kTolerance) << p[k].name << ": error " << error << ", scale " << scale;
  }
  EXPECT_EQ(flips, 0) << "a perturbation changed a routing decision; pick another seed";
}

TEST(ModelGradients, DenseAndMoeBlocksWithAuxAndZLoss) {
  // Block 0 dense, block 1 MoE (OLMoE: softmax top-4 of 16, HF aux loss and z-loss, coefficients
  // raised so that both losses weigh in the gradient).
  ModelConfig c = small_config("olmoe", MoeLayout::every_other);
  c.moe.routing.aux_loss_coef = 0.1;
  c.moe.routing.z_loss_coef = 0.05;
  check_model_gradients(c, 1);
}

TEST(ModelGradients, DeepSeekV3FirstDenseTiedWithSharedExpertAndSelectionBias) {
  // Sigmoid scores, group-limited top-4 on scores + bias, scaled gates, sequence-wise balance loss
  // over the B sequences, one shared expert; the head is the embedding.
  ModelConfig c = small_config("deepseek_v3", MoeLayout::first_k_dense, 1);
  c.tie_embeddings = true;
  c.moe.routing.aux_loss_coef = 0.1;
  check_model_gradients(c, 2);
}

TEST(ModelGradients, Qwen2MoeGatedSharedExpertInEveryBlock) {
  ModelConfig c = small_config("qwen2_moe", MoeLayout::all);
  c.moe.routing.aux_loss_coef = 0.1;
  check_model_gradients(c, 3);
}

TEST(ModelGradients, GptOssBiasesAndLlama4GateOnInput) {
  check_model_gradients(small_config("gpt_oss", MoeLayout::all), 4);
  check_model_gradients(small_config("llama4", MoeLayout::all), 5);
}

// --- 2. the named configurations ---------------------------------------------------------------------

TEST(ModelConfigs, TinyMoeAndTinyDenseHaveEqualActiveParameters) {
  const ModelConfig moe = tiny_moe();
  const ModelConfig dense = tiny_dense();
  EXPECT_EQ(moe.n_moe_layers(), 4);
  EXPECT_EQ(dense.n_moe_layers(), 0);
  const Accounting m = account(model_sizes(moe));
  const Accounting d = account(model_sizes(dense));
  // Per block a token uses 2 experts * 3 C H = 2 * 3 * 64 * 128 weights, or one FFN of 3 C (2H).
  EXPECT_EQ(m.routed_experts.active, 4 * 2 * 3 * 64 * 128);
  EXPECT_EQ(d.dense_ffn.active, 4 * 3 * 64 * 256);
  EXPECT_EQ(m.routed_experts.active, d.dense_ffn.active);
  // Everything else a token uses is the same, but for the routers (C E per block).
  EXPECT_EQ(m.routers.active, 4 * 64 * 8);
  EXPECT_EQ(m.active_params - m.routers.active, d.active_params);
  EXPECT_EQ(m.flops_per_token - 2 * m.routers.active, d.flops_per_token);
  // The numbers model.cpp states.
  EXPECT_EQ(m.active_params, 281152);
  EXPECT_EQ(m.total_params, 887360);
  EXPECT_EQ(d.active_params, 279104);
  EXPECT_EQ(d.total_params, 295488);
}

TEST(ModelConfigs, NamesPresetsAndLayouts) {
  EXPECT_EQ(to_json(model_config("tiny_moe")), to_json(tiny_moe()));
  EXPECT_EQ(to_json(tiny_moe()), to_json(model_config("mixtral")));
  EXPECT_EQ(to_json(model_config("tiny_dense")), to_json(tiny_dense()));
  const std::vector<std::string> names = model_config_names();
  EXPECT_EQ(names.size(), 2 + presets().size());
  for (const std::string& name : names) {
    const ModelConfig c = model_config(name);
    EXPECT_EQ(c.hidden_size, 64) << name;
    if (c.moe_layout == MoeLayout::dense) continue;
    EXPECT_EQ(c.moe.hidden_size(), 64) << name;
    EXPECT_EQ(c.moe.expert.intermediate_size, 128) << name;  // the tiny presets' 32 at C = 16, scaled
  }
  const ModelConfig v3 = model_config("deepseek_v3");
  EXPECT_EQ(v3.moe_layout, MoeLayout::first_k_dense);
  EXPECT_FALSE(v3.is_moe(0));
  EXPECT_TRUE(v3.is_moe(1) && v3.is_moe(3));
  EXPECT_EQ(v3.moe.routing.num_experts(), 16);
  EXPECT_EQ(v3.moe.shared.intermediate_size, 128);
  const ModelConfig gshard = model_config("gshard");
  EXPECT_EQ(gshard.moe_layout, MoeLayout::every_other);
  EXPECT_FALSE(gshard.is_moe(0));
  EXPECT_TRUE(gshard.is_moe(1));
  EXPECT_FALSE(gshard.is_moe(2));
  EXPECT_EQ(gshard.n_moe_layers(), 2);
  EXPECT_EQ(error_of([] { model_config("mixtrel"); }).rfind("model = \"mixtrel\": is not a known model configuration; "
                                                             "choose one of tiny_moe, tiny_dense, switch, ",
                                                             0),
            0u);
}

// --- 3. parameter names -----------------------------------------------------------------------------

// Every tensor of the struct, whether listed or not: what "complete" is checked against.
template <typename Visit>
void every_tensor(ModelParams& p, Visit visit) {
  const auto expert = [&](ExpertParams& e) {
    visit(e.w_gate.data(), e.w_gate.size());
    visit(e.w_up.data(), e.w_up.size());
    visit(e.w_down.data(), e.w_down.size());
    visit(e.b_gate.data(), e.b_gate.size());
    visit(e.b_up.data(), e.b_up.size());
    visit(e.b_down.data(), e.b_down.size());
  };
  visit(p.embed_tokens.data(), p.embed_tokens.size());
  for (BlockParamsT<float>& b : p.blocks) {
    visit(b.attn_norm.data(), b.attn_norm.size());
    for (MatrixT<float>* m : {&b.attn.q_proj, &b.attn.k_proj, &b.attn.v_proj, &b.attn.o_proj})
      visit(m->data(), m->size());
    visit(b.ffn_norm.data(), b.ffn_norm.size());
    expert(b.dense);
    RouterParams& r = b.moe.routing.router;
    visit(r.weight.data(), r.weight.size());
    visit(r.bias.data(), r.bias.size());
    visit(r.noise_weight.data(), r.noise_weight.size());
    visit(b.moe.routing.selection_bias.data(), b.moe.routing.selection_bias.size());
    for (ExpertParams& e : b.moe.experts) expert(e);
    for (ExpertParams& e : b.moe.shared) expert(e);
    visit(b.moe.shared_gate.data(), b.moe.shared_gate.size());
  }
  visit(p.norm.data(), p.norm.size());
  visit(p.lm_head.data(), p.lm_head.size());
}

bool ends_with(std::string_view s, std::string_view end) { return s.size() >= end.size() && s.substr(s.size() - end.size()) == end; }

TEST(ModelParameters, NamesAreUniqueAndCompleteForEveryNamedConfig) {
  for (const std::string& name : model_config_names()) {
    SCOPED_TRACE(name);
    for (const bool tied : {false, true}) {
      ModelConfig c = model_config(name);
      c.tie_embeddings = tied;
      Rng rng(7);
      ModelParams p = init_model<float>(c, rng);
      std::vector<NamedParamT<float>> all = model_parameters(p, c);
      const std::vector<NamedParamT<float>> buffers = model_buffers(p, c);
      all.insert(all.end(), buffers.begin(), buffers.end());

      std::set<std::string> names;
      std::set<const float*> listed;
      std::int64_t listed_size = 0;
      for (const NamedParamT<float>& t : all) {
        EXPECT_TRUE(names.insert(t.name).second) << "listed twice: " << t.name;
        EXPECT_TRUE((t.matrix == nullptr) != (t.vector == nullptr)) << t.name;
        const float* data = t.matrix != nullptr ? t.matrix->data() : t.vector->data();
        EXPECT_GT(t.size(), 0) << t.name;
        EXPECT_TRUE(listed.insert(data).second) << "one tensor under two names: " << t.name;
        listed_size += t.size();
        const bool no_decay = ends_with(t.name, "norm.weight") || ends_with(t.name, "bias");
        EXPECT_EQ(t.weight_decay, !no_decay) << t.name;
      }
      // Complete: every non-empty tensor of the struct is listed, and the counts agree with accounting.h.
      std::int64_t struct_size = 0;
      every_tensor(p, [&](const float* data, Index size) {
        if (size == 0) return;
        struct_size += size;
        EXPECT_TRUE(listed.count(data) == 1) << "a tensor of " << size << " elements is not listed";
      });
      EXPECT_EQ(listed_size, struct_size);
      EXPECT_EQ(listed_size, account(model_sizes(c)).total_params);
      EXPECT_EQ(names.count("lm_head.weight"), tied ? 0u : 1u);
      EXPECT_EQ(all.front().name, "model.embed_tokens.weight");
    }
  }
}

TEST(ModelParameters, HuggingFaceNamesInOrder) {
  const ModelConfig dense = tiny_dense();
  Rng rng(1);
  ModelParams p = init_model<float>(dense, rng);
  std::vector<std::string> names;
  for (const ConstNamedParamT<float>& t : model_parameters(std::as_const(p), dense)) names.push_back(t.name);
  const std::vector<std::string> first = {"model.embed_tokens.weight",
                                          "model.layers.0.input_layernorm.weight",
                                          "model.layers.0.self_attn.q_proj.weight",
                                          "model.layers.0.self_attn.k_proj.weight",
                                          "model.layers.0.self_attn.v_proj.weight",
                                          "model.layers.0.self_attn.o_proj.weight",
                                          "model.layers.0.post_attention_layernorm.weight",
                                          "model.layers.0.mlp.gate_proj.weight",
                                          "model.layers.0.mlp.up_proj.weight",
                                          "model.layers.0.mlp.down_proj.weight",
                                          "model.layers.1.input_layernorm.weight"};
  ASSERT_GE(names.size(), first.size());
  EXPECT_EQ(std::vector<std::string>(names.begin(), names.begin() + static_cast<std::ptrdiff_t>(first.size())), first);
  EXPECT_EQ(names.size(), 1 + 4 * 9 + 2u);
  EXPECT_EQ(names[names.size() - 2], "model.norm.weight");
  EXPECT_EQ(names.back(), "lm_head.weight");

  // Shapes as Hugging Face stores them: nn.Linear(in, out).weight is (out, in).
  const ModelConfig moe = tiny_moe();
  ModelParams q = init_model<float>(moe, rng);
  for (const NamedParamT<float>& t : model_parameters(q, moe)) {
    if (t.name == "model.layers.2.mlp.gate.weight") {
      EXPECT_EQ(shape_of(*t.matrix), "(8, 64)");
    }
    if (t.name == "model.layers.2.mlp.experts.7.gate_proj.weight") {
      EXPECT_EQ(shape_of(*t.matrix), "(128, 64)");
    }
    if (t.name == "model.layers.2.mlp.experts.7.down_proj.weight") {
      EXPECT_EQ(shape_of(*t.matrix), "(64, 128)");
    }
  }

  const auto names_of = [](const char* config) {
    const ModelConfig c = model_config(config);
    Rng r(1);
    ModelParams params = init_model<float>(c, r);
    std::set<std::string> s;
    for (const NamedParamT<float>& t : model_parameters(params, c)) s.insert(t.name);
    for (const NamedParamT<float>& t : model_buffers(params, c)) s.insert("buffer " + t.name);
    return s;
  };
  const std::set<std::string> v3 = names_of("deepseek_v3");
  EXPECT_TRUE(v3.count("model.layers.0.mlp.up_proj.weight"));  // first_k_dense_replace = 1
  EXPECT_TRUE(v3.count("model.layers.1.mlp.experts.15.up_proj.weight"));
  EXPECT_TRUE(v3.count("model.layers.1.mlp.shared_experts.down_proj.weight"));
  EXPECT_TRUE(v3.count("buffer model.layers.3.mlp.gate.e_score_correction_bias"));
  EXPECT_FALSE(v3.count("buffer model.layers.0.mlp.gate.e_score_correction_bias"));
  const std::set<std::string> qwen = names_of("qwen2_moe");
  EXPECT_TRUE(qwen.count("model.layers.0.mlp.shared_expert.gate_proj.weight"));
  EXPECT_TRUE(qwen.count("model.layers.0.mlp.shared_expert_gate.weight"));
  const std::set<std::string> oss = names_of("gpt_oss");
  EXPECT_TRUE(oss.count("model.layers.0.mlp.gate.bias"));
  EXPECT_TRUE(oss.count("model.layers.0.mlp.experts.3.gate_proj.bias"));
  EXPECT_TRUE(oss.count("model.layers.0.mlp.experts.3.down_proj.bias"));
  const std::set<std::string> sw = names_of("switch");  // relu experts: up and down only
  EXPECT_TRUE(sw.count("model.layers.1.mlp.experts.0.up_proj.weight"));
  EXPECT_FALSE(sw.count("model.layers.1.mlp.experts.0.gate_proj.weight"));
  EXPECT_TRUE(sw.count("model.layers.0.mlp.gate_proj.weight"));  // the dense FFN of block 0 is SwiGLU
}

TEST(ModelParameters, TiedHeadIsTheEmbedding) {
  ModelConfig c = small_config("mixtral", MoeLayout::all);
  c.tie_embeddings = true;
  Rng rng(3);
  const ModelParamsT<double> p = init_model<double>(c, rng);
  EXPECT_EQ(p.lm_head.size(), 0);
  const std::vector<std::int32_t> ids = random_ids(rng, 6, c.vocab_size);
  ModelOutputT<double> out;
  model_forward(out, ids, 1, 6, p, c);
  const MatrixD expected = out.normed * p.embed_tokens.transpose();
  EXPECT_LT((out.logits - expected).cwiseAbs().maxCoeff(), 1e-12);
}

// --- 4. causality -------------------------------------------------------------------------------------

// Changing token t + 1 of one sequence leaves every logit at positions <= t (and of the other
// sequence) unchanged and changes the logits from t + 1 on. Bit for bit in the dense model; to
// rounding (1 ulp of the logits) with MoE blocks: the changed token may move to another expert,
// and an expert's product over a different number of rows may take another of Eigen's kernels,
// with another summation order.
void check_causal(const ModelConfig& c, double tolerance) {
  Rng rng(11);
  const ModelParams p = init_model<float>(c, rng);
  const Index B = 2, T = 12;
  std::vector<std::int32_t> ids = random_ids(rng, B * T, c.vocab_size);
  ModelOutput before, after;
  model_forward(before, ids, B, T, p, c);
  for (const Index t : {Index{0}, Index{5}, T - 2}) {
    std::vector<std::int32_t> changed = ids;
    changed[static_cast<std::size_t>(T + t + 1)] = (changed[static_cast<std::size_t>(T + t + 1)] + 1) % 256;
    model_forward(after, changed, B, T, p, c);
    const Matrix difference = (before.logits - after.logits).cwiseAbs();
    EXPECT_LE(difference.topRows(T + t + 1).maxCoeff(), tolerance) << "t = " << t;
    EXPECT_GT(difference.row(T + t + 1).maxCoeff(), 0.01) << "t = " << t;
  }
}

TEST(ModelCausality, LaterTokensDoNotChangeEarlierLogits) {
  check_causal(tiny_dense(), 0.0);
  check_causal(tiny_moe(), 1e-6);
  check_causal(model_config("deepseek_v3"), 1e-6);
}

// --- 5. training -------------------------------------------------------------------------------------

// AdamW on one fixed batch of text: the model memorises it. A small model (C = 32, block 0 dense,
// block 1 MoE with 4 experts top-2) so that 100 steps take well under a second.
TEST(ModelTraining, OverfitsOneBatch) {
  ModelConfig c = small_config("mixtral", MoeLayout::every_other);
  c.vocab_size = 256;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.init_std = 0.02;
  c.moe.routing.router.hidden_size = 32;
  c.moe.routing.router.num_experts = 4;
  c.moe.expert.hidden_size = 32;
  c.moe.expert.intermediate_size = 32;
  c.validate();
  const std::string text = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs";
  const Index B = 2, T = 32;
  std::vector<std::int32_t> ids, targets;
  for (Index b = 0; b < B; ++b)
    for (Index t = 0; t < T; ++t) {
      ids.push_back(static_cast<unsigned char>(text[static_cast<std::size_t>(b * T + t)]));
      targets.push_back(static_cast<unsigned char>(text[static_cast<std::size_t>(b * T + t + 1)]));
    }
  Rng rng(5);
  ModelParams params = init_model<float>(c, rng);
  ModelGrads grads;
  AdamW adamw(model_param_refs(params, grads, c), AdamWConfig{.lr = 1e-2, .weight_decay = 0.0});
  const void* expert_grad = &grads.blocks[1].moe.experts[0].w_up;
  ModelOutput out;
  float first = 0, last = 0;
  for (int step = 0; step < 100; ++step) {
    model_forward(out, ids, B, T, params, c);
    const ModelLoss loss = model_loss(out, targets);
    ASSERT_TRUE(std::isfinite(loss.total())) << "step " << step;
    if (step == 0) first = loss.ce;
    last = loss.ce;
    model_backward(grads, out, targets, params, c);
    clip_grad_norm(adamw.params(), 1.0);
    adamw.step();
    model_update_bias(params, out, c);
  }
  EXPECT_NEAR(first, std::log(256.0f), 0.1f);  // uniform over the bytes at init
  EXPECT_LT(last, 0.3f * first) << "first " << first << ", last " << last;
  EXPECT_EQ(expert_grad, &grads.blocks[1].moe.experts[0].w_up) << "the gradients must stay in place";
}

// --- 6. instrumentation and bias balancing ---------------------------------------------------------

TEST(ModelObserver, EventsOfBlockICarryLayerI) {
  const ModelConfig c = model_config("gshard");  // MoE in blocks 1 and 3, dense in 0 and 2
  Rng rng(2);
  const ModelParams p = init_model<float>(c, rng);
  const std::vector<std::int32_t> ids = random_ids(rng, 2 * 8, c.vocab_size);
  MemoryRecorder recorder;
  ModelOutput out;
  model_forward(out, ids, 2, 8, p, c, nullptr, &recorder);
  ASSERT_GT(recorder.size(), 0u);
  std::set<int> topk_layers, hidden_layers;
  for (const RecordedEvent& e : recorder.events()) {
    EXPECT_GE(e.layer, 0) << e.name;
    EXPECT_LT(e.layer, 4) << e.name;
    EXPECT_EQ(e.step, -1);
    if (e.name == events::topk_ids) {
      topk_layers.insert(e.layer);
      const IndexMatrix& expected = out.blocks[static_cast<std::size_t>(e.layer)].moe.routing.ids;
      EXPECT_EQ(e.ids, std::vector<std::int32_t>(expected.data(), expected.data() + expected.size()));
    }
    if (e.name == events::expert_hidden) hidden_layers.insert(e.layer);
  }
  EXPECT_EQ(topk_layers, (std::set<int>{1, 3}));
  EXPECT_EQ(hidden_layers, (std::set<int>{0, 1, 2, 3}));  // the dense FFN reports too

  // A training loop stamps its step around the model's layer stamps.
  MemoryRecorder stepped;
  StampingObserver step_stamp(stepped, -1, 42);
  model_forward(out, ids, 2, 8, p, c, nullptr, &step_stamp);
  ASSERT_EQ(stepped.size(), recorder.size());
  for (std::size_t k = 0; k < stepped.size(); ++k) {
    EXPECT_EQ(stepped.events()[k].step, 42);
    EXPECT_EQ(stepped.events()[k].layer, recorder.events()[k].layer);
  }
}

TEST(ModelBalancing, SelectionBiasMovesAgainstEachBlocksLoad) {
  const ModelConfig c = model_config("deepseek_v3");
  Rng rng(4);
  ModelParams p = init_model<float>(c, rng);
  const std::vector<std::int32_t> ids = random_ids(rng, 2 * 16, c.vocab_size);
  ModelOutput out;
  model_forward(out, ids, 2, 16, p, c);
  MemoryRecorder recorder;
  model_update_bias(p, out, c, &recorder);
  const float gamma = static_cast<float>(c.moe.routing.bias_update_rate);
  std::set<int> layers;
  for (const RecordedEvent& e : recorder.events()) layers.insert(e.layer);
  EXPECT_EQ(layers, (std::set<int>{1, 2, 3}));
  for (Index i = 1; i < 4; ++i) {
    const std::vector<std::int64_t>& load = out.blocks[static_cast<std::size_t>(i)].moe.routing.load;
    std::int64_t total = 0;
    for (std::int64_t n : load) total += n;
    const Vector& bias = p.blocks[static_cast<std::size_t>(i)].moe.routing.selection_bias;
    for (Index e = 0; e < 16; ++e) {
      const std::int64_t d = total - 16 * load[static_cast<std::size_t>(e)];  // sign(mean - load)
      EXPECT_EQ(bias(e), d > 0 ? gamma : d < 0 ? -gamma : 0.0f) << "layer " << i << " expert " << e;
    }
  }
  // A config without selection bias leaves everything as it was.
  const ModelConfig mixtral = tiny_moe();
  ModelParams q = init_model<float>(mixtral, rng);
  model_forward(out, ids, 2, 16, q, mixtral);
  model_update_bias(q, out, mixtral);
  EXPECT_EQ(q.blocks[0].moe.routing.selection_bias.size(), 0);
}

// --- 7. configuration: JSON and errors -----------------------------------------------------------

TEST(ModelConfigJson, EveryNamedConfigRoundTrips) {
  for (const std::string& name : model_config_names()) {
    ModelConfig c = model_config(name);
    const Json j = to_json(c);
    EXPECT_EQ(to_json(model_config_from_json(j)), j) << name;
    c.tie_embeddings = true;
    c.rope_theta = 500000.0;
    EXPECT_EQ(to_json(model_config_from_json(to_json(c))), to_json(c)) << name;
  }
  const Json dense = to_json(tiny_dense());
  EXPECT_TRUE(dense["moe"].is_null());
  EXPECT_EQ(dense["moe_layout"], "dense");
  EXPECT_EQ(to_json(model_config("deepseek_v3"))["first_k_dense_replace"], 1);
}

TEST(ModelConfigJson, Errors) {
  const Json good = to_json(tiny_moe());
  const auto read = [](const Json& j) { return error_of([&] { model_config_from_json(j); }); };
  const auto with = [&](const char* key, const Json& value) {
    Json j = good;
    j[key] = value;
    return j;
  };
  EXPECT_EQ(read(with("colour", 1)), "colour = 1: is not a field of the model configuration");
  Json missing = good;
  missing.erase("n_heads");
  EXPECT_EQ(read(missing), "n_heads = (missing): is required");
  EXPECT_EQ(read(with("hidden_size", "a")), "hidden_size = \"a\": must be an integer");
  EXPECT_EQ(read(with("n_layers", 2.5)), "n_layers = 2.5: must be an integer");
  EXPECT_EQ(read(with("n_layers", -1)), "n_layers = -1: must be >= 0");
  EXPECT_EQ(read(with("rms_eps", "x")), "rms_eps = \"x\": must be a finite number");
  EXPECT_EQ(read(with("tie_embeddings", 1)), "tie_embeddings = 1: must be true or false");
  EXPECT_EQ(read(with("moe_layout", "sideways")),
            "moe_layout = \"sideways\": must be one of dense, all, every_other, first_k_dense");
  EXPECT_EQ(read(with("ffn_activation", "tanh")).rfind("ffn_activation = \"tanh\": must be one of", 0), 0u);
  EXPECT_EQ(read(with("moe", nullptr)), "moe = null: is required when moe_layout = all");
  EXPECT_EQ(read(with("moe_layout", "dense")), "moe = (an object): must be null when moe_layout = dense");
  Json nested = good;
  nested["moe"]["routing"]["top_k"] = "x";
  EXPECT_EQ(read(nested), "moe.routing.top_k = \"x\": must be an integer");
  nested["moe"]["routing"]["top_k"] = 9;
  EXPECT_NE(read(nested).find("top_k = 9"), std::string::npos) << read(nested);
  EXPECT_EQ(error_of([&] { model_config_from_json(with("n_heads", "4"), "model"); }),
            "model.n_heads = \"4\": must be an integer");
  EXPECT_EQ(error_of([&] { model_config_from_json(Json::array(), "model"); }), "model = []: must be an object");
  // Rules between fields (validate).
  EXPECT_EQ(read(with("n_heads", 3)), "hidden_size = 64: must be divisible by n_heads = 3");
  EXPECT_EQ(read(with("hidden_size", 32)), "moe.routing.hidden_size = 64: must equal hidden_size = 32");
  EXPECT_EQ(read(with("first_k_dense_replace", 1)),
            "first_k_dense_replace = 1: is used only with moe_layout = first_k_dense (moe_layout is all); must be 0");
  Json first = with("moe_layout", "first_k_dense");
  first["first_k_dense_replace"] = 4;
  EXPECT_EQ(read(first), "first_k_dense_replace = 4: must be in [0, n_layers = 4)");
  EXPECT_EQ(read(with("rms_eps", 0.0)), "rms_eps = 0: must be finite and > 0");
  EXPECT_EQ(read(with("vocab_size", 0)), "vocab_size = 0: must be positive");
  Json no_ffn = to_json(tiny_dense());
  no_ffn["intermediate_size"] = 0;
  EXPECT_EQ(read(no_ffn).find("intermediate_size = 0"), 0u) << read(no_ffn);

  ModelConfig bad = tiny_moe();
  bad.moe.routing.top_k = 9;
  EXPECT_EQ(error_of([&] { bad.validate(); }).rfind("moe: top_k = 9", 0), 0u) << error_of([&] { bad.validate(); });
}

TEST(ModelErrors, InputsAndParameters) {
  const ModelConfig c = small_config("mixtral", MoeLayout::every_other);
  Rng rng(6);
  ModelParams p = init_model<float>(c, rng);
  ModelOutput out;
  const std::vector<std::int32_t> ids = {1, 2, 3, 4, 5, 6};
  EXPECT_EQ(error_of([&] { model_forward(out, ids, 2, 4, p, c); }),
            "ids size = 6: must equal batch_size * seq_len = 2 * 4 = 8");
  EXPECT_EQ(error_of([&] { model_forward(out, ids, 0, 6, p, c); }), "batch_size = 0: must be positive");
  EXPECT_EQ(error_of([&] { model_forward(out, std::vector<std::int32_t>{1, 16}, 1, 2, p, c); }),
            "ids[1] = 16: must be in [0, vocab_size = 16)");
  model_forward(out, ids, 2, 3, p, c);
  EXPECT_EQ(error_of([&] { model_loss(out, std::vector<std::int32_t>{1, 2}); }),
            "targets size = 2: must equal logits.rows() = 6");

  ModelParams wrong = p;
  wrong.blocks.pop_back();
  EXPECT_EQ(error_of([&] { model_forward(out, ids, 2, 3, wrong, c); }), "blocks.size() = 1: must equal n_layers = 2");
  wrong = p;
  wrong.blocks[1].moe.experts.pop_back();
  EXPECT_EQ(error_of([&] { model_forward(out, ids, 2, 3, wrong, c); }),
            "blocks[1].moe.experts.size() = 7: must equal num_experts = 8");
  wrong = p;
  wrong.embed_tokens.resize(8, 8);
  EXPECT_EQ(error_of([&] { model_forward(out, ids, 2, 3, wrong, c); }),
            "embed_tokens shape = (8, 8): must be (vocab_size, hidden_size) = (16, 8)");
  ModelConfig tied = c;
  tied.tie_embeddings = true;
  EXPECT_EQ(error_of([&] { model_forward(out, ids, 2, 3, p, tied); }),
            "lm_head shape = (16, 8): must be empty when tie_embeddings (the head is embed_tokens)");
  ModelConfig other = c;
  other.n_layers = 3;
  ModelGrads grads;
  EXPECT_EQ(error_of([&] { model_backward(grads, out, ids, init_model<float>(other, rng), other); }),
            "out.blocks.size() = 2: must equal n_layers = 3 (run model_forward with this config first)");
  EXPECT_EQ(error_of([] { parse_moe_layout("odd"); }),
            "moe_layout = \"odd\": must be one of dense, all, every_other, first_k_dense");
}

}  // namespace
}  // namespace moelab
