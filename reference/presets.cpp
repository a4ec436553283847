// moelab/reference/presets.cpp — see presets.h. Sizes are the published models' (config.json of
// the model card where one exists); docs/presets.md gives the table and the sources.
#include "reference/presets.h"

#include <fmt/format.h>

#include "reference/error.h"

namespace moelab {
namespace {

constexpr Index kTinyHidden = 16;

RoutingConfig sized(RoutingConfig c, Index hidden, Index experts, int top_k) {
  c.router.hidden_size = hidden;
  c.router.num_experts = experts;
  c.top_k = top_k;
  return c;
}

// The conventions, written once; the sizes are applied by sized().
RoutingConfig softmax_topk(bool renormalize, AuxLoss loss, double coef) {
  RoutingConfig c;
  c.scoring = Scoring::softmax;
  c.gating = {.kind = GateKind::selected_scores, .renormalize = renormalize};
  c.aux_loss = loss;
  c.aux_loss_coef = coef;
  return c;
}

Preset switch_preset() {
  RoutingConfig c = softmax_topk(false, AuxLoss::switch_transformer, 0.01);
  c.router.noise = RouterNoise::jitter;
  c.router.jitter_eps = 0.01;
  return {"switch", "Switch Transformer (Switch-Base-128)",
          "Fedus, Zoph & Shazeer 2022, 'Switch Transformers', JMLR (eq. 4, sec. 2.4); google/switch-base-128",
          "softmax over all experts, top-1, gate = the top-1 probability (no renormalisation); "
          "multiplicative input jitter U(1-0.01, 1+0.01) while training; aux loss alpha = 0.01 per layer",
          sized(c, 768, 128, 1), sized(c, kTinyHidden, 8, 1),
          {.activation = Activation::relu, .intermediate_size = 3072, .capacity = {.dropless = false, .capacity_factor = 1.25}}};
}

Preset gshard_preset() {
  RoutingConfig c = softmax_topk(true, AuxLoss::switch_transformer, 0.01);
  return {"gshard", "GShard MoE Transformer (600B, top-2)",
          "Lepikhin et al. 2020, 'GShard', algorithm 1 (top-2 gating)",
          "softmax over all experts, top-2, the two gates renormalised g_i / (g_1 + g_2); balance loss "
          "alpha = 0.01 in the Switch form (GShard's random dispatch of the second expert is a capacity "
          "policy of the layer, not of routing)",
          sized(c, 1024, 2048, 2), sized(c, kTinyHidden, 8, 2),
          {.activation = Activation::relu, .intermediate_size = 8192, .capacity = {.dropless = false, .capacity_factor = 1.0}}};
}

Preset mixtral_preset() {
  RoutingConfig c;
  c.gating = {.kind = GateKind::softmax_of_selected_logits};
  c.aux_loss = AuxLoss::hugging_face;
  c.aux_loss_coef = 0.02;
  return {"mixtral", "Mixtral 8x7B", "Jiang et al. 2024, 'Mixtral of Experts' (eq. 1); mistralai/Mixtral-8x7B-v0.1",
          "top-2 of the logits, then softmax over the two selected logits (equal to softmax, top-k, "
          "renormalise); Hugging Face's aux loss, router_aux_loss_coef = 0.02",
          sized(c, 4096, 8, 2), sized(c, kTinyHidden, 8, 2),
          {.intermediate_size = 14336}};
}

Preset qwen2_moe_preset() {
  const RoutingConfig c = softmax_topk(false, AuxLoss::hugging_face, 0.001);
  return {"qwen2_moe", "Qwen1.5-MoE-A2.7B", "Qwen team 2024, Qwen1.5-MoE; Qwen/Qwen1.5-MoE-A2.7B (model_type qwen2_moe)",
          "softmax over all experts, top-4, norm_topk_prob = false (gates do not sum to 1); a shared "
          "expert with a sigmoid gate beside the routed ones; Hugging Face's aux loss, coef 0.001",
          sized(c, 2048, 60, 4), sized(c, kTinyHidden, 12, 4),
          {.intermediate_size = 1408, .shared = {.count = 1, .intermediate_size = 5632, .gated = true}}};
}

Preset qwen3_moe_preset() {
  const RoutingConfig c = softmax_topk(true, AuxLoss::hugging_face, 0.001);
  return {"qwen3_moe", "Qwen3-30B-A3B", "Qwen team 2025, 'Qwen3 Technical Report'; Qwen/Qwen3-30B-A3B",
          "softmax over all experts, top-8, norm_topk_prob = true (gates renormalised to sum to 1, no "
          "epsilon); Hugging Face's aux loss, coef 0.001",
          sized(c, 2048, 128, 8), sized(c, kTinyHidden, 16, 4),
          {.intermediate_size = 768}};
}

Preset olmoe_preset() {
  RoutingConfig c = softmax_topk(false, AuxLoss::hugging_face, 0.01);
  c.z_loss_coef = 0.001;
  return {"olmoe", "OLMoE-1B-7B", "Muennighoff et al. 2024, 'OLMoE'; allenai/OLMoE-1B-7B-0924",
          "softmax over all experts, top-8, no renormalisation; load balancing loss 0.01 and router "
          "z-loss 0.001",
          sized(c, 2048, 64, 8), sized(c, kTinyHidden, 16, 4),
          {.intermediate_size = 1024}};
}

Preset deepseek_v2_preset() {
  RoutingConfig c = softmax_topk(false, AuxLoss::deepseek_v2, 0.003);
  c.selection = SelectionKind::device_limited;
  c.num_devices = 8;
  c.topk_devices = 3;
  c.gating.routed_scaling_factor = 16.0;
  c.device_loss_coef = 0.05;
  c.comm_loss_coef = 0.02;
  RoutingConfig tiny = sized(c, kTinyHidden, 16, 4);
  tiny.num_devices = 4;
  tiny.topk_devices = 2;
  return {"deepseek_v2", "DeepSeek-V2 (236B)",
          "DeepSeek-AI 2024, 'DeepSeek-V2' (sec. 2.2.2 device-limited routing, 2.2.3 balance losses); deepseek-ai/DeepSeek-V2 "
          "(topk_method group_limited_greedy, n_group 8, topk_group 3)",
          "softmax over all experts; device-limited top-6: the M = 3 devices (of 8) holding the "
          "highest-scoring experts first; gates = scores times routed_scaling_factor 16, no "
          "renormalisation; expert-, device- and communication-balance losses 0.003 / 0.05 / 0.02",
          sized(c, 5120, 160, 6), tiny,
          {.intermediate_size = 1536, .shared = {.count = 2, .intermediate_size = 1536}}};
}

Preset deepseek_v3_preset() {
  RoutingConfig c;
  c.scoring = Scoring::sigmoid;
  c.selection = SelectionKind::group_limited;
  c.group = {.n_group = 8, .topk_group = 4, .score = GroupScore::top2_sum, .mask = GroupMask::neg_inf};
  c.use_selection_bias = true;
  c.gating = {.kind = GateKind::selected_scores, .renormalize = true, .renorm_eps = 1e-20,
              .routed_scaling_factor = 2.5};
  c.aux_loss = AuxLoss::deepseek_v3_sequence;
  c.aux_loss_coef = 0.0001;
  c.bias_update_rate = 0.001;
  RoutingConfig tiny = sized(c, kTinyHidden, 16, 4);
  tiny.group.n_group = 4;
  tiny.group.topk_group = 2;
  return {"deepseek_v3", "DeepSeek-V3 (671B)",
          "DeepSeek-AI 2024, 'DeepSeek-V3 Technical Report' (sec. 2.1.2, eqs. 12-20); deepseek-ai/DeepSeek-V3 "
          "(scoring_func sigmoid, topk_method noaux_tc, n_group 8, topk_group 4, routed_scaling_factor 2.5)",
          "sigmoid scores; top-8 chosen on scores + bias within the 4 best of 8 groups (group score = "
          "sum of its top-2 biased scores, other groups masked with -inf); gates = the unbiased "
          "scores of the chosen, renormalised with +1e-20, times 2.5; bias updated by "
          "gamma = 0.001 * sign(mean load - load); sequence-wise balance loss alpha = 0.0001",
          sized(c, 7168, 256, 8), tiny,
          {.intermediate_size = 2048, .shared = {.count = 1, .intermediate_size = 2048}}};
}

Preset llama4_preset() {
  RoutingConfig c;
  c.scoring = Scoring::sigmoid;
  c.gating = {.kind = GateKind::sigmoid_of_selected_logits};
  return {"llama4", "Llama 4 Scout (17B active, 16 experts)",
          "Meta 2025, Llama 4 model card; meta-llama/Llama-4-Scout-17B-16E (Llama4TextMoe)",
          "top-1 of the logits; gate = sigmoid of the selected logit, not renormalised; the gate "
          "scales the expert's input, not its output (a layer setting); a shared expert beside it",
          sized(c, 5120, 16, 1), sized(c, kTinyHidden, 8, 1),
          {.intermediate_size = 8192, .shared = {.count = 1, .intermediate_size = 8192}, .gate_placement = GatePlacement::input}};
}

Preset gpt_oss_preset() {
  RoutingConfig c;
  c.router.use_bias = true;
  c.gating = {.kind = GateKind::softmax_of_selected_logits};
  return {"gpt_oss", "gpt-oss-120b", "OpenAI 2025, 'gpt-oss-120b & gpt-oss-20b model card'; openai/gpt-oss-120b",
          "router with a bias (logits = x W^T + b); top-4 of the logits, softmax over the four",
          sized(c, 2880, 128, 4), sized(c, kTinyHidden, 16, 4),
          {.activation = Activation::swiglu_clamped, .intermediate_size = 2880, .expert_bias = true}};
}

Preset expert_choice_preset() {
  RoutingConfig c;
  c.selection = SelectionKind::expert_choice;
  c.capacity_factor = 2.0;
  return {"expert_choice", "Expert Choice (EC-CF2, 64 experts)",
          "Zhou et al. 2022, 'Mixture-of-Experts with Expert Choice Routing' (eq. 1, capacity factor 2)",
          "softmax over experts per token; each expert takes its top-C tokens, C = T * 2 / E; gate = "
          "the token's score for that expert; a token may get 0 or many experts",
          sized(c, 4096, 64, 2), sized(c, kTinyHidden, 8, 2),
          {.activation = Activation::gelu, .intermediate_size = 16384}};
}

Preset hash_preset() {
  RoutingConfig c;
  c.selection = SelectionKind::hash;
  c.hash_seed = 0x5EED;
  c.gating = {.kind = GateKind::ones};
  return {"hash", "Hash Layers (64 experts)",
          "Roller et al. 2021, 'Hash Layers For Large Sparse Models' (random hash of the token id)",
          "expert = hash(token id) mod E, fixed before training; k = 1, gate 1 (the expert's output "
          "is used as is); the router is not used for the choice",
          sized(c, 1024, 64, 1), sized(c, kTinyHidden, 8, 1),
          {.activation = Activation::relu, .intermediate_size = 4096}};
}

Preset gpu_mode_amd_preset() {
  const RoutingConfig c = softmax_topk(false, AuxLoss::none, 0.0);
  return {"gpu_mode_amd", "GPU MODE AMD MoE problem (fp16, 7168 -> 2048, top-4)",
          "GPU MODE reference kernels, the AMD developer challenge 2025 'amd-mixture-of-experts' problem "
          "(reference.py: d_hidden 7168, d_expert 2048, 1 shared expert, n_experts_per_token 4; up to 32 routed)",
          "softmax over all experts, top-4 of the probabilities (torch.topk), no renormalisation and no "
          "scaling; one shared expert of the same width; fp16 inputs and weights",
          sized(c, 7168, 32, 4), sized(c, kTinyHidden, 16, 4),
          {.intermediate_size = 2048, .shared = {.count = 1, .intermediate_size = 2048}}};
}

}  // namespace

const std::vector<Preset>& presets() {
  static const std::vector<Preset> all = {
      switch_preset(),      gshard_preset(),      mixtral_preset(), qwen2_moe_preset(),
      qwen3_moe_preset(),   olmoe_preset(),       deepseek_v2_preset(), deepseek_v3_preset(),
      llama4_preset(),      gpt_oss_preset(),     expert_choice_preset(), hash_preset(),
      gpu_mode_amd_preset()};
  return all;
}

LayerConfig layer_config(const Preset& preset, PresetSize size) {
  constexpr Index kTinyIntermediate = 32;
  const bool tiny = size == PresetSize::tiny;
  const PresetLayer& l = preset.layer;
  LayerConfig c;
  c.routing = tiny ? preset.tiny : preset.full;
  c.expert = {.hidden_size = c.routing.router.hidden_size,
              .intermediate_size = tiny ? kTinyIntermediate : l.intermediate_size,
              .activation = l.activation,
              .use_bias = l.expert_bias};
  c.capacity = l.capacity;
  c.shared = l.shared;
  if (tiny && c.shared.count > 0) c.shared.intermediate_size = kTinyIntermediate;
  c.gate_placement = l.gate_placement;
  return c;
}

const Preset& find_preset(std::string_view name) {
  std::string known;
  for (const Preset& p : presets()) {
    if (p.name == name) return p;
    known += known.empty() ? std::string(p.name) : ", " + std::string(p.name);
  }
  fail("preset", fmt::format("\"{}\"", name), "is not a known preset; choose one of " + known);
}

}  // namespace moelab
