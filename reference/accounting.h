// moelab/reference/accounting.h — parameters, FLOPs and weight memory of the presets' full-size
// models, counted tensor by tensor from their published config.json.
//
// An MoE model is large and cheap at once: every expert must be stored, only k of them run per
// token. This file makes both numbers exact and shows where they come from: model_sizes() writes
// down a published model's config, account() counts every weight matrix, bias and norm it implies.
// docs/accounting.md walks through DeepSeek-V3 (671B total, 37B active) and Mixtral (46.7B/12.9B).
//
// Sizes: V = vocab_size, C = hidden_size, L = layers, E = routed experts, k = top_k,
//        F = dense intermediate size, f = expert intermediate size, H = heads, d = head_dim.
//
// Conventions (the ones the model cards use, see docs/accounting.md):
// - A weight matrix (in, out) has in * out parameters; a bias has out; an RMSNorm has its width.
// - "Active" parameters take part in computing one token: everything except the routed experts
//   the router did not pick and the input embedding table, of which a token reads one row (a
//   lookup, not a product; gpt-oss and DeepSeek count it this way). Mixtral, Qwen, OLMoE and
//   Llama 4 publish the count with the embedding table: that is active_params_with_embedding.
// - FLOPs are forward FLOPs per token of the matrix products, 2 per multiply-add; attention's
//   scores and context depend on the context length and are given apart.
#pragma once

#include <cstdint>
#include <string_view>

namespace moelab {

enum class AttentionKind { none, mha_gqa, mla };  // none: an MoE layer alone (gpu_mode_amd)
enum class QkNorm {
  none,         // or a norm without weights (Llama 4's L2 norm)
  per_head,     // RMSNorm(d) on q and on k, shared by the heads (Qwen3)
  across_heads  // RMSNorm(H * d) on q and RMSNorm(H_kv * d) on k (OLMoE)
};
std::string_view attention_kind_name(AttentionKind kind);
std::string_view qk_norm_name(QkNorm norm);

// A publisher's own figures, to compare with (0 = none published).
struct PublishedCounts {
  double total_params = 0;
  double active_params = 0;
  bool active_counts_embedding = false;  // the publisher's active count includes the embedding table
  std::string_view source;               // where the figures are stated
};

// Everything needed to count a published model. Field names follow the Hugging Face configs.
struct ModelSizes {
  std::string_view preset;  // "deepseek_v3"
  std::string_view model;   // "deepseek-ai/DeepSeek-V3"
  std::string_view source;  // the config file the sizes come from
  std::string_view notes;   // what is counted, what is left out, what is uncertain

  // Embedding and output head.
  std::int64_t vocab_size = 0;   // V
  std::int64_t hidden_size = 0;  // C
  bool tie_word_embeddings = false;

  // Layers. Layer i (0-based, in each stack) has an MoE FFN iff
  //   i >= num_dense_layers  and  i % moe_layer_step == moe_layer_offset,
  // else a dense FFN: DeepSeek's first_k_dense_replace = 3 is num_dense_layers = 3; Switch's
  // "every other layer" (encoder_sparse_step 2, sparse layers 1, 3, 5, ...) is step 2, offset 1.
  std::int64_t num_layers = 0;          // L: a decoder-only model's layers, or the encoder's
  std::int64_t num_decoder_layers = 0;  // encoder-decoder (T5, Switch): decoder layers (+ cross-attention)
  std::int64_t num_dense_layers = 0;
  std::int64_t moe_layer_step = 1;
  std::int64_t moe_layer_offset = 0;

  // Dense FFN (the layers that are not MoE).
  std::int64_t intermediate_size = 0;  // F
  bool dense_gated = true;             // SwiGLU: gate, up, down (3 matrices); else up, down (2)

  // MoE FFN.
  std::int64_t n_routed_experts = 0;          // E
  std::int64_t n_shared_experts = 0;          // always active
  std::int64_t top_k = 0;                     // k
  std::int64_t moe_intermediate_size = 0;     // f, of one routed expert
  std::int64_t shared_intermediate_size = 0;  // of one shared expert (Qwen1.5-MoE: 5632, not f)
  bool expert_gated = true;                   // 3 matrices per expert, else 2
  bool expert_bias = false;                   // gpt-oss: biases on gate/up and down
  bool router_bias = false;                   // gpt-oss: logits + b; DeepSeek-V3: e_score_correction_bias
  bool shared_expert_gate = false;            // Qwen2-MoE: sigmoid(x W), W of shape (C, 1)

  // Attention.
  AttentionKind attention = AttentionKind::mha_gqa;
  std::int64_t num_heads = 0;     // H
  std::int64_t num_kv_heads = 0;  // H_kv (grouped-query attention when < H)
  std::int64_t head_dim = 0;      // d
  bool qkv_bias = false;          // Qwen2, gpt-oss
  bool o_bias = false;            // gpt-oss
  bool attention_sinks = false;   // gpt-oss: one learned logit per head
  QkNorm qk_norm = QkNorm::none;
  std::int64_t relative_attention_buckets = 0;  // T5/Switch: (buckets, H) bias in each stack's first layer
  // Multi-head latent attention (DeepSeek-V2/V3); q_lora_rank 0 = q projected directly (V2-Lite).
  std::int64_t q_lora_rank = 0;
  std::int64_t kv_lora_rank = 0;
  std::int64_t qk_nope_head_dim = 0;
  std::int64_t qk_rope_head_dim = 0;
  std::int64_t v_head_dim = 0;
  // Layers whose attention sees at most a window of keys (FLOPs only; gpt-oss: sliding 128 in half
  // the layers; Llama 4: 8192-token chunks in 3 of 4 layers, counted as a window: an upper bound).
  std::int64_t local_attention_layers = 0;
  std::int64_t local_attention_window = 0;

  // DeepSeek-V3 multi-token prediction: modules in the checkpoint, not in the published total.
  std::int64_t num_nextn_predict_layers = 0;

  PublishedCounts published;

  // Throws Error naming the field, its value and the rule.
  void validate() const;
};

// The full-size model of a preset (presets.h). Throws Error for an unknown preset, and for the
// presets with no published checkpoint (gshard, expert_choice, hash), saying why.
ModelSizes model_sizes(std::string_view preset);

// Whether layer i of a stack has an MoE FFN, and how many layers of a stack of `layers` do.
bool is_moe_layer(const ModelSizes& m, std::int64_t layer);
std::int64_t num_moe_layers(const ModelSizes& m, std::int64_t layers);

// A part of the model: its parameters and how many of them one token uses.
struct Part {
  std::int64_t total = 0;
  std::int64_t active = 0;
};

struct Accounting {
  // Layer counts over all stacks.
  std::int64_t moe_layers = 0;
  std::int64_t dense_ffn_layers = 0;

  // One of each.
  std::int64_t attention_per_layer = 0;   // a self-attention block with its biases and q/k or latent norms
  std::int64_t dense_ffn_per_layer = 0;   // 3 C F (SwiGLU) or 2 C F
  std::int64_t expert_params = 0;         // one routed expert: 3 C f (+ biases)
  std::int64_t shared_expert_params = 0;  // one shared expert (+ its gate)
  std::int64_t router_per_layer = 0;      // C E (+ E)

  // The parts; they add up to total_params (and their .active to active_params).
  Part embedding;       // V C; active 0 (a lookup), unless tied: then it is the head as well
  Part lm_head;         // C V, 0 when tied
  Part attention;       // all layers' attention blocks (+ T5's relative position biases)
  Part dense_ffn;       // dense FFN layers
  Part routed_experts;  // total: moe_layers E expert_params; active: moe_layers k expert_params
  Part shared_experts;  // moe_layers n_shared shared_expert_params
  Part routers;         // moe_layers router_per_layer
  Part norms;           // the layers' RMSNorm weights and the final norm(s)

  std::int64_t total_params = 0;
  std::int64_t active_params = 0;                 // without the embedding table (see the top)
  std::int64_t active_params_with_embedding = 0;  // total_params minus the idle routed experts

  // Not in total_params: DeepSeek-V3's multi-token prediction module(s). mtp_params are its own
  // weights; the checkpoint also stores a copy of the embedding and of the head per module.
  std::int64_t mtp_params = 0;
  std::int64_t mtp_stored_copies = 0;

  // Forward FLOPs per token, 2 per multiply-add. Encoder-decoder: one encoder token plus one
  // decoder token (cross-attention's k, v projections counted once, as for equal lengths).
  std::int64_t flops_per_token = 0;            // matrix products with the weights
  std::int64_t context_length = 0;             // the context the next number assumes
  std::int64_t attention_flops_per_token = 0;  // q k^T and p v against context_length keys

  // Bytes to hold all total_params (no MTP) in one format, every tensor in it.
  std::int64_t bytes_bf16 = 0;         // 2 per parameter
  std::int64_t bytes_fp8 = 0;          // 1 (block scales, 128 x 128 fp32 in DeepSeek-V3's: +0.02%, ignored)
  std::int64_t bytes_int4 = 0;         // 1/2
  std::int64_t bytes_int4_scaled = 0;  // 1/2 + one 8-bit scale per 32 weights (MXFP4: 4.25 bits)
};

// Counts a model. Throws Error if `m` is invalid or context_length < 1.
Accounting account(const ModelSizes& m, std::int64_t context_length = 4096);

}  // namespace moelab
