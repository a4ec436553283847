// moelab/reference/accounting.cpp — see accounting.h. The sizes are the published config.json
// values (cited per model); docs/accounting.md walks through the counts.
#include "reference/accounting.h"

#include <fmt/format.h>

#include <algorithm>

#include "reference/error.h"
#include "reference/presets.h"

namespace moelab {

std::string_view attention_kind_name(AttentionKind kind) {
  switch (kind) {
    case AttentionKind::none: return "none";
    case AttentionKind::mha_gqa: return "mha_gqa";
    case AttentionKind::mla: return "mla";
  }
  return "?";
}

std::string_view qk_norm_name(QkNorm norm) {
  switch (norm) {
    case QkNorm::none: return "none";
    case QkNorm::per_head: return "per_head";
    case QkNorm::across_heads: return "across_heads";
  }
  return "?";
}

void ModelSizes::validate() const {
  require(hidden_size >= 1, "hidden_size", hidden_size, "must be at least 1");
  require(vocab_size >= 0, "vocab_size", vocab_size, "must not be negative");
  require(num_layers >= 1, "num_layers", num_layers, "must be at least 1");
  require(num_decoder_layers >= 0, "num_decoder_layers", num_decoder_layers, "must not be negative");
  require(num_dense_layers >= 0 && num_dense_layers <= num_layers, "num_dense_layers", num_dense_layers,
          fmt::format("must be in [0, num_layers = {}]", num_layers));
  require(moe_layer_step >= 1, "moe_layer_step", moe_layer_step, "must be at least 1");
  require(moe_layer_offset >= 0 && moe_layer_offset < moe_layer_step, "moe_layer_offset", moe_layer_offset,
          fmt::format("must be in [0, moe_layer_step = {})", moe_layer_step));
  require(n_routed_experts >= 0, "n_routed_experts", n_routed_experts, "must not be negative");
  require(n_shared_experts >= 0, "n_shared_experts", n_shared_experts, "must not be negative");
  require(top_k >= 0 && top_k <= n_routed_experts, "top_k", top_k,
          fmt::format("must be in [0, n_routed_experts = {}]", n_routed_experts));
  if (n_routed_experts > 0) {
    require(top_k >= 1, "top_k", top_k, "must be at least 1 when there are routed experts");
    require(moe_intermediate_size >= 1, "moe_intermediate_size", moe_intermediate_size,
            "must be at least 1 when there are routed experts");
  }
  if (n_shared_experts > 0)
    require(shared_intermediate_size >= 1, "shared_intermediate_size", shared_intermediate_size,
            "must be at least 1 when there are shared experts");
  require(intermediate_size >= 0, "intermediate_size", intermediate_size, "must not be negative");
  if (attention == AttentionKind::mha_gqa) {
    require(num_heads >= 1, "num_heads", num_heads, "must be at least 1");
    require(head_dim >= 1, "head_dim", head_dim, "must be at least 1");
    require(num_kv_heads >= 1 && num_heads % num_kv_heads == 0, "num_kv_heads", num_kv_heads,
            fmt::format("must divide num_heads = {}", num_heads));
  }
  if (attention == AttentionKind::mla) {
    require(num_heads >= 1, "num_heads", num_heads, "must be at least 1");
    require(q_lora_rank >= 0, "q_lora_rank", q_lora_rank, "must not be negative (0 = no q compression)");
    require(kv_lora_rank >= 1, "kv_lora_rank", kv_lora_rank, "must be at least 1 for MLA");
    require(qk_nope_head_dim >= 0 && qk_rope_head_dim >= 0 && qk_nope_head_dim + qk_rope_head_dim >= 1,
            "qk_nope_head_dim + qk_rope_head_dim", qk_nope_head_dim + qk_rope_head_dim, "must be at least 1 for MLA");
    require(v_head_dim >= 1, "v_head_dim", v_head_dim, "must be at least 1 for MLA");
  }
  if (attention == AttentionKind::none)
    require(num_decoder_layers == 0, "num_decoder_layers", num_decoder_layers,
            "must be 0 without attention (an encoder-decoder has attention)");
  require(local_attention_layers >= 0 && local_attention_layers <= num_layers + num_decoder_layers,
          "local_attention_layers", local_attention_layers, "must be in [0, the number of layers]");
  if (local_attention_layers > 0)
    require(local_attention_window >= 1, "local_attention_window", local_attention_window,
            "must be at least 1 when there are local attention layers");
  require(num_nextn_predict_layers >= 0, "num_nextn_predict_layers", num_nextn_predict_layers, "must not be negative");
  require(relative_attention_buckets >= 0, "relative_attention_buckets", relative_attention_buckets,
          "must not be negative");
}

bool is_moe_layer(const ModelSizes& m, std::int64_t layer) {
  return m.n_routed_experts > 0 && layer >= m.num_dense_layers && layer % m.moe_layer_step == m.moe_layer_offset;
}

std::int64_t num_moe_layers(const ModelSizes& m, std::int64_t layers) {
  std::int64_t n = 0;
  for (std::int64_t i = 0; i < layers; ++i) n += is_moe_layer(m, i) ? 1 : 0;
  return n;
}

namespace {

using std::int64_t;

// Parameters split by what a forward pass does with them: `matrix` ones are multiplied with the
// activations (2 FLOPs per parameter per token), `other` ones are biases, norm weights, sinks.
struct Count {
  int64_t matrix = 0;
  int64_t other = 0;
  int64_t all() const { return matrix + other; }
};

// One self-attention block (q, k, v, o and what belongs to them).
Count attention_block(const ModelSizes& m) {
  const int64_t C = m.hidden_size, H = m.num_heads;
  Count c;
  if (m.attention == AttentionKind::mha_gqa) {
    const int64_t d = m.head_dim, Hkv = m.num_kv_heads;
    c.matrix = C * H * d + 2 * C * Hkv * d + H * d * C;  // W_q, W_k, W_v, W_o
    if (m.qkv_bias) c.other += H * d + 2 * Hkv * d;
    if (m.o_bias) c.other += C;
    if (m.attention_sinks) c.other += H;
    if (m.qk_norm == QkNorm::per_head) c.other += 2 * d;
    if (m.qk_norm == QkNorm::across_heads) c.other += H * d + Hkv * d;
  } else if (m.attention == AttentionKind::mla) {
    // DeepSeek-V2 sec. 2.1.2-2.1.3: q = W_UQ norm(W_DQ x); [c_kv, k_rope] = W_DKV x;
    // [k_nope, v] = W_UKV norm(c_kv); out = W_O [heads].
    const int64_t qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
    if (m.q_lora_rank > 0) {
      c.matrix += C * m.q_lora_rank + m.q_lora_rank * H * qk;  // q_a_proj, q_b_proj
      c.other += m.q_lora_rank;                                // q_a_layernorm
    } else {
      c.matrix += C * H * qk;  // q_proj
    }
    c.matrix += C * (m.kv_lora_rank + m.qk_rope_head_dim);                     // kv_a_proj_with_mqa
    c.other += m.kv_lora_rank;                                                 // kv_a_layernorm
    c.matrix += m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim);      // kv_b_proj
    c.matrix += H * m.v_head_dim * C;                                          // o_proj
  }
  return c;
}

// q k^T and p v for one token against `keys` keys, 2 FLOPs per multiply-add.
int64_t attention_context_flops(const ModelSizes& m, int64_t keys) {
  if (m.attention == AttentionKind::mha_gqa) return 2 * m.num_heads * m.head_dim * keys * 2;
  if (m.attention == AttentionKind::mla)
    return 2 * m.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim) * keys + 2 * m.num_heads * m.v_head_dim * keys;
  return 0;
}

int64_t ffn_matrices(int64_t C, int64_t F, bool gated) { return (gated ? 3 : 2) * C * F; }

Count routed_expert(const ModelSizes& m) {
  Count c{ffn_matrices(m.hidden_size, m.moe_intermediate_size, m.expert_gated), 0};
  if (m.expert_bias) c.other = (m.expert_gated ? 2 : 1) * m.moe_intermediate_size + m.hidden_size;
  return c;
}

Count shared_expert(const ModelSizes& m) {
  if (m.n_shared_experts == 0) return {};
  Count c{ffn_matrices(m.hidden_size, m.shared_intermediate_size, m.expert_gated), 0};
  if (m.shared_expert_gate) c.matrix += m.hidden_size;  // Qwen2-MoE: sigmoid(x W_g), W_g (C, 1)
  return c;
}

Count router(const ModelSizes& m) {
  return {m.hidden_size * m.n_routed_experts, m.router_bias ? m.n_routed_experts : 0};
}

void add(Part& part, const Count& c, int64_t copies, int64_t active_copies, int64_t& flop_params) {
  part.total += copies * c.all();
  part.active += active_copies * c.all();
  flop_params += active_copies * c.matrix;
}

// ---------------------------------------------------------------------------------------------
// The published models. Values are the config.json fields of the Hugging Face model card named in
// `source` (field names in comments where ours differ).

ModelSizes mixtral() {
  ModelSizes m;
  m.preset = "mixtral";
  m.model = "mistralai/Mixtral-8x7B-v0.1";
  m.source = "https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json";
  m.notes = "32 layers, all MoE: 8 experts (num_local_experts), top-2, SwiGLU experts of 14336; GQA 32 heads / 8 kv "
            "heads of 128; no biases; untied head.";
  m.vocab_size = 32000;
  m.hidden_size = 4096;
  m.num_layers = 32;
  m.n_routed_experts = 8;
  m.top_k = 2;
  m.moe_intermediate_size = 14336;  // intermediate_size: every FFN is an expert
  m.num_heads = 32;
  m.num_kv_heads = 8;
  m.head_dim = 128;
  m.published = {46.7e9, 12.9e9, true,
                 "Mistral AI, 'Mixtral of experts' (blog, 11 Dec 2023): 46.7B total, 12.9B used per token"};
  return m;
}

// The DeepSeek-V3 layer: MLA attention, 256 routed + 1 shared SwiGLU experts of 2048.
ModelSizes deepseek_v3() {
  ModelSizes m;
  m.preset = "deepseek_v3";
  m.model = "deepseek-ai/DeepSeek-V3";
  m.source = "https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json";
  m.notes = "61 layers: the first 3 dense (first_k_dense_replace, intermediate 18432), 58 MoE with 256 routed + 1 "
            "shared expert of 2048 (moe_intermediate_size), top-8; MLA with 128 heads; the router's "
            "e_score_correction_bias (256 per layer) is counted. The multi-token prediction module "
            "(num_nextn_predict_layers = 1) is in the 685B checkpoint but not in the published 671B; it is "
            "counted apart (mtp).";
  m.vocab_size = 129280;
  m.hidden_size = 7168;
  m.num_layers = 61;
  m.num_dense_layers = 3;  // first_k_dense_replace
  m.intermediate_size = 18432;
  m.n_routed_experts = 256;
  m.n_shared_experts = 1;
  m.top_k = 8;  // num_experts_per_tok
  m.moe_intermediate_size = 2048;
  m.shared_intermediate_size = 2048;  // n_shared_experts * moe_intermediate_size
  m.router_bias = true;               // e_score_correction_bias
  m.attention = AttentionKind::mla;
  m.num_heads = 128;
  m.num_kv_heads = 128;
  m.q_lora_rank = 1536;
  m.kv_lora_rank = 512;
  m.qk_nope_head_dim = 128;
  m.qk_rope_head_dim = 64;
  m.v_head_dim = 128;
  m.num_nextn_predict_layers = 1;
  // The README's headline is 37B activated; README_WEIGHTS.md gives 36.7B "including 0.9B for
  // Embedding and 0.9B for the output Head". Counted from config.json, 36.6B is the count with the
  // head but without the embedding table and 37.5B with both (docs/accounting.md), so we read the
  // 36.7B as not counting the table.
  m.published = {671e9, 37e9, false,
                 "DeepSeek-AI, 'DeepSeek-V3 Technical Report' (arXiv:2412.19437) and README: 671B total, 37B "
                 "activated; README_WEIGHTS.md: 36.7B activated, 685B in the checkpoint with the 14B MTP module"};
  return m;
}

ModelSizes deepseek_v2() {
  ModelSizes m;
  m.preset = "deepseek_v2";
  m.model = "deepseek-ai/DeepSeek-V2";
  m.source = "https://huggingface.co/deepseek-ai/DeepSeek-V2/blob/main/config.json";
  m.notes = "60 layers: the first dense (intermediate 12288), 59 MoE with 160 routed + 2 shared experts of 1536, "
            "top-6; MLA with 128 heads (q_lora_rank 1536, kv_lora_rank 512); no router bias.";
  m.vocab_size = 102400;
  m.hidden_size = 5120;
  m.num_layers = 60;
  m.num_dense_layers = 1;
  m.intermediate_size = 12288;
  m.n_routed_experts = 160;
  m.n_shared_experts = 2;
  m.top_k = 6;
  m.moe_intermediate_size = 1536;
  m.shared_intermediate_size = 1536;
  m.attention = AttentionKind::mla;
  m.num_heads = 128;
  m.num_kv_heads = 128;
  m.q_lora_rank = 1536;
  m.kv_lora_rank = 512;
  m.qk_nope_head_dim = 128;
  m.qk_rope_head_dim = 64;
  m.v_head_dim = 128;
  m.published = {236e9, 21e9, false,
                 "DeepSeek-AI, 'DeepSeek-V2' (arXiv:2405.04434): 236B total, 21B activated for each token"};
  return m;
}

ModelSizes qwen2_moe() {
  ModelSizes m;
  m.preset = "qwen2_moe";
  m.model = "Qwen/Qwen1.5-MoE-A2.7B";
  m.source = "https://huggingface.co/Qwen/Qwen1.5-MoE-A2.7B/blob/main/config.json";
  m.notes = "24 layers, all MoE (decoder_sparse_step 1): 60 routed experts of 1408, top-4, plus one shared expert "
            "of 5632 (shared_expert_intermediate_size) with a sigmoid gate (C x 1); MHA 16 heads of 128 with "
            "q/k/v biases (Qwen2 attention); untied head.";
  m.vocab_size = 151936;
  m.hidden_size = 2048;
  m.num_layers = 24;
  m.n_routed_experts = 60;  // num_experts
  m.n_shared_experts = 1;
  m.top_k = 4;
  m.moe_intermediate_size = 1408;
  m.shared_intermediate_size = 5632;
  m.shared_expert_gate = true;
  m.num_heads = 16;
  m.num_kv_heads = 16;
  m.head_dim = 128;
  m.qkv_bias = true;
  m.published = {14.3e9, 2.7e9, true,
                 "Qwen team, 'Qwen1.5-MoE: Matching 7B Model Performance with 1/3 Activated Parameters' (blog, "
                 "Mar 2024): 14.3B total, 2.7B activated (2.0B without embedding and head)"};
  return m;
}

ModelSizes qwen3_moe() {
  ModelSizes m;
  m.preset = "qwen3_moe";
  m.model = "Qwen/Qwen3-30B-A3B";
  m.source = "https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json";
  m.notes = "48 layers, all MoE: 128 experts of 768, top-8, no shared expert; GQA 32 heads / 4 kv heads of 128 "
            "with per-head q/k RMSNorm; untied head.";
  m.vocab_size = 151936;
  m.hidden_size = 2048;
  m.num_layers = 48;
  m.n_routed_experts = 128;
  m.top_k = 8;
  m.moe_intermediate_size = 768;
  m.num_heads = 32;
  m.num_kv_heads = 4;
  m.head_dim = 128;
  m.qk_norm = QkNorm::per_head;
  m.published = {30.5e9, 3.3e9, true,
                 "Qwen/Qwen3-30B-A3B model card: 30.5B total, 3.3B activated, 29.9B non-embedding"};
  return m;
}

ModelSizes olmoe() {
  ModelSizes m;
  m.preset = "olmoe";
  m.model = "allenai/OLMoE-1B-7B-0924";
  m.source = "https://huggingface.co/allenai/OLMoE-1B-7B-0924/blob/main/config.json";
  m.notes = "16 layers, all MoE: 64 experts of 1024, top-8; MHA 16 heads of 128 with q/k RMSNorm over all heads "
            "(2048 wide); vocab 50304 (padded); untied head.";
  m.vocab_size = 50304;
  m.hidden_size = 2048;
  m.num_layers = 16;
  m.n_routed_experts = 64;
  m.top_k = 8;
  m.moe_intermediate_size = 1024;  // intermediate_size
  m.num_heads = 16;
  m.num_kv_heads = 16;
  m.head_dim = 128;
  m.qk_norm = QkNorm::across_heads;
  m.published = {6.9e9, 1.3e9, true, "Muennighoff et al. 2024, 'OLMoE' (arXiv:2409.02060): 6.9B total, 1.3B active"};
  return m;
}

ModelSizes llama4() {
  ModelSizes m;
  m.preset = "llama4";
  m.model = "meta-llama/Llama-4-Scout-17B-16E";
  m.source = "https://huggingface.co/meta-llama/Llama-4-Scout-17B-16E/blob/main/config.json (text_config)";
  m.notes = "The language model only: 48 layers, all MoE (interleave_moe_layer_step 1): 16 experts of 8192, top-1, "
            "plus one shared expert of 8192; GQA 40 heads / 8 kv heads of 128; q/k L2 norm without weights; "
            "untied head. The published 109B includes the vision encoder and projector (about 0.9B, not counted "
            "here). Chunked attention (8192) in 3 of 4 layers is taken as a window for the FLOPs (an upper bound).";
  m.vocab_size = 202048;
  m.hidden_size = 5120;
  m.num_layers = 48;
  m.intermediate_size = 16384;  // intermediate_size_mlp: dense layers, none in Scout
  m.n_routed_experts = 16;      // num_local_experts
  m.n_shared_experts = 1;
  m.top_k = 1;
  m.moe_intermediate_size = 8192;
  m.shared_intermediate_size = 8192;
  m.num_heads = 40;
  m.num_kv_heads = 8;
  m.head_dim = 128;
  m.local_attention_layers = 36;  // no_rope_layers: every 4th layer is global (NoPE), the rest chunked
  m.local_attention_window = 8192;
  m.published = {109e9, 17e9, true,
                 "meta-llama/Llama-4-Scout-17B-16E model card: 109B total (with the vision encoder), 17B active"};
  return m;
}

ModelSizes gpt_oss() {
  ModelSizes m;
  m.preset = "gpt_oss";
  m.model = "openai/gpt-oss-120b";
  m.source = "https://huggingface.co/openai/gpt-oss-120b/blob/main/config.json";
  m.notes = "36 layers, all MoE: 128 experts (num_local_experts) of 2880 with biases, top-4, router with a bias; "
            "GQA 64 heads / 8 kv heads of 64 with q/k/v/o biases and one sink per head; sliding window 128 in "
            "every other layer; untied head. The published checkpoint keeps the experts in MXFP4.";
  m.vocab_size = 201088;
  m.hidden_size = 2880;
  m.num_layers = 36;
  m.n_routed_experts = 128;
  m.top_k = 4;  // num_experts_per_tok
  m.moe_intermediate_size = 2880;
  m.expert_bias = true;
  m.router_bias = true;
  m.num_heads = 64;
  m.num_kv_heads = 8;
  m.head_dim = 64;
  m.qkv_bias = true;  // attention_bias
  m.o_bias = true;
  m.attention_sinks = true;
  m.local_attention_layers = 18;  // layer_types: sliding_attention, full_attention, ...
  m.local_attention_window = 128;
  m.published = {116.83e9, 5.13e9, false,
                 "OpenAI, 'gpt-oss-120b & gpt-oss-20b Model Card' (Aug 2025), table 1: 116.83B total, 5.13B "
                 "active (MLP 114.71B, attention 0.96B, embedding + unembedding 1.16B)"};
  return m;
}

ModelSizes switch_base() {
  ModelSizes m;
  m.preset = "switch";
  m.model = "google/switch-base-128";
  m.source = "https://huggingface.co/google/switch-base-128/blob/main/config.json; flaxformer switch_base.gin";
  m.notes = "Encoder-decoder (T5-Base with MoE): 12 encoder + 12 decoder layers, every other FFN (layers 1, 3, ..., "
            "11 of each stack: encoder/decoder_sparse_step 2) an MoE of 128 ReLU experts (wi, wo) of 3072, top-1; "
            "MHA 12 heads of 64, no biases, relative position bias (32 buckets) in each stack's first layer; "
            "decoder layers add cross-attention and a third norm; embedding shared by encoder, decoder and "
            "output logits. Active and FLOPs count one encoder token plus one decoder token.";
  m.vocab_size = 32128;
  m.hidden_size = 768;   // d_model
  m.num_layers = 12;
  m.num_decoder_layers = 12;
  m.moe_layer_step = 2;
  m.moe_layer_offset = 1;
  m.intermediate_size = 3072;  // d_ff
  m.dense_gated = false;
  m.n_routed_experts = 128;
  m.top_k = 1;
  m.moe_intermediate_size = 3072;
  m.expert_gated = false;
  m.num_heads = 12;
  m.num_kv_heads = 12;
  m.head_dim = 64;  // d_kv
  m.relative_attention_buckets = 32;
  m.tie_word_embeddings = true;  // "Switch Transformer Base re-uses the token embedder to compute output logits"
  // Written from the paper as we remember it (not re-checked against the PDF): its distillation
  // table lists Switch-Base with 16 ... 256 experts at 1.1, 2.0, 3.8, 7.4 and 14.7B parameters and
  // the dense T5-Base at 223M; this count reproduces the whole series (docs/accounting.md).
  m.published = {7.4e9, 0.223e9, true,
                 "Fedus, Zoph & Shazeer 2022, 'Switch Transformers' (JMLR), distillation table (sec. 5.1): "
                 "Switch-Base, 128 experts, 7.4B parameters; FLOP-matched to T5-Base, 223M"};
  return m;
}

ModelSizes gpu_mode_amd() {
  ModelSizes m;
  m.preset = "gpu_mode_amd";
  m.model = "GPU MODE AMD challenge MoE problem (one layer, its largest configuration)";
  m.source = "gpu-mode/reference-kernels, AMD developer challenge 2025 'amd-mixture-of-experts' (d_hidden 7168, "
             "d_expert 2048, 32 routed + 1 shared expert, top-4)";
  m.notes = "No full model exists: this is the one MoE layer the problem defines (router, 32 routed + 1 shared "
            "SwiGLU experts), without attention, embedding or head.";
  m.hidden_size = 7168;
  m.num_layers = 1;
  m.n_routed_experts = 32;
  m.n_shared_experts = 1;
  m.top_k = 4;
  m.moe_intermediate_size = 2048;
  m.shared_intermediate_size = 2048;
  m.attention = AttentionKind::none;
  return m;
}

}  // namespace

ModelSizes model_sizes(std::string_view preset) {
  const Preset& p = find_preset(preset);  // unknown names: the preset error
  if (p.name == "mixtral") return mixtral();
  if (p.name == "deepseek_v3") return deepseek_v3();
  if (p.name == "deepseek_v2") return deepseek_v2();
  if (p.name == "qwen2_moe") return qwen2_moe();
  if (p.name == "qwen3_moe") return qwen3_moe();
  if (p.name == "olmoe") return olmoe();
  if (p.name == "llama4") return llama4();
  if (p.name == "gpt_oss") return gpt_oss();
  if (p.name == "switch") return switch_base();
  if (p.name == "gpu_mode_amd") return gpu_mode_amd();
  const std::string name = fmt::format("\"{}\"", p.name);
  if (p.name == "gshard")
    fail("preset", name,
         "has no published checkpoint to count (GShard's 600B model was never released and its paper gives no "
         "config file); choose a preset of a released model");
  if (p.name == "expert_choice")
    fail("preset", name,
         "has no published checkpoint to count (the Expert Choice models of Zhou et al. 2022 were not released); "
         "choose a preset of a released model");
  if (p.name == "hash")
    fail("preset", name,
         "has no published checkpoint to count (Roller et al. 2021 released no Hash Layers model); choose a "
         "preset of a released model");
  fail("preset", name, "has no full-size model in reference/accounting.cpp");
}

Accounting account(const ModelSizes& m, std::int64_t context_length) {
  m.validate();
  require(context_length >= 1, "context_length", context_length, "must be at least 1");
  const int64_t C = m.hidden_size, V = m.vocab_size;
  const int64_t stacks[2] = {m.num_layers, m.num_decoder_layers};

  Accounting a;
  int64_t flop_params = 0;  // matrix parameters one token multiplies with
  const Count attn = attention_block(m), expert = routed_expert(m), shared = shared_expert(m), gate = router(m);
  const Count dense{ffn_matrices(C, m.intermediate_size, m.dense_gated), 0};
  a.attention_per_layer = attn.all();
  a.expert_params = expert.all();
  a.shared_expert_params = shared.all();
  a.router_per_layer = gate.all();

  for (int s = 0; s < 2; ++s) {
    const int64_t layers = stacks[s];
    if (layers == 0) continue;
    const int64_t moe = num_moe_layers(m, layers), dense_layers = layers - moe;
    a.moe_layers += moe;
    a.dense_ffn_layers += dense_layers;
    // Self-attention in every layer; the decoder of an encoder-decoder adds cross-attention.
    const int64_t blocks = m.attention == AttentionKind::none ? 0 : (s == 1 ? 2 * layers : layers);
    add(a.attention, attn, blocks, blocks, flop_params);
    const Count relative_bias{0, m.relative_attention_buckets * m.num_heads};
    add(a.attention, relative_bias, 1, 1, flop_params);
    add(a.dense_ffn, dense, dense_layers, dense_layers, flop_params);
    add(a.routed_experts, expert, moe * m.n_routed_experts, moe * m.top_k, flop_params);
    add(a.shared_experts, shared, moe * m.n_shared_experts, moe * m.n_shared_experts, flop_params);
    add(a.routers, gate, moe, moe, flop_params);
    // RMSNorm before attention and before the FFN (+ before cross-attention), and a final norm.
    // A lone MoE layer (gpu_mode_amd) has none: the problem defines none.
    if (m.attention != AttentionKind::none) {
      const Count norms{0, layers * (s == 1 ? 3 : 2) * C + C};
      add(a.norms, norms, 1, 1, flop_params);
    }
  }
  a.dense_ffn_per_layer = a.dense_ffn_layers > 0 ? dense.all() : 0;

  // Embedding: a lookup. The head: a product with every token. Tied, the one matrix is both.
  a.embedding.total = V * C;
  a.embedding.active = m.tie_word_embeddings ? V * C : 0;
  a.lm_head.total = m.tie_word_embeddings ? 0 : C * V;
  a.lm_head.active = a.lm_head.total;
  flop_params += C * V;

  const Part* parts[] = {&a.embedding, &a.lm_head, &a.attention, &a.dense_ffn,
                         &a.routed_experts, &a.shared_experts, &a.routers, &a.norms};
  for (const Part* p : parts) {
    a.total_params += p->total;
    a.active_params += p->active;
  }
  a.active_params_with_embedding = a.active_params + (m.tie_word_embeddings ? 0 : a.embedding.total);

  // DeepSeek-V3 MTP module (README_WEIGHTS.md): enorm, hnorm, eh_proj (2C -> C), one MoE layer
  // (attention, experts, router, 2 norms), shared_head.norm; its embed_tokens and shared_head.head
  // are copies of the main model's.
  if (m.num_nextn_predict_layers > 0) {
    const int64_t module = 2 * C + 2 * C * C + attn.all() + m.n_routed_experts * expert.all() +
                           m.n_shared_experts * shared.all() + gate.all() + 2 * C + C;
    a.mtp_params = m.num_nextn_predict_layers * module;
    a.mtp_stored_copies = m.num_nextn_predict_layers * 2 * V * C;
  }

  a.flops_per_token = 2 * flop_params;
  a.context_length = context_length;
  const int64_t all_layers = m.attention == AttentionKind::none ? 0 : m.num_layers + 2 * m.num_decoder_layers;
  const int64_t local = m.local_attention_layers, global = all_layers - local;
  a.attention_flops_per_token =
      global * attention_context_flops(m, context_length) +
      local * attention_context_flops(m, std::min(context_length, m.local_attention_window));

  const int64_t N = a.total_params;
  a.bytes_bf16 = 2 * N;
  a.bytes_fp8 = N;
  a.bytes_int4 = (N + 1) / 2;
  a.bytes_int4_scaled = a.bytes_int4 + (N + 31) / 32;
  return a;
}

}  // namespace moelab
