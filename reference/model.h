// moelab/reference/model.h — the tiny decoder-only language model: byte tokens, pre-RMSNorm blocks
// of causal attention with RoPE and a dense or MoE FFN, a final norm and an LM head; forward,
// loss, full backward, parameters under Hugging Face names, and the bias balancing step.
//
//   x_0 = embed_tokens[ids]                                      (N, C)
//   block i:  h   = x_i + attention(input_layernorm(x_i))        Llama's pre-norm residual block
//             x_i+1 = h + ffn_i(post_attention_layernorm(h))     ffn_i dense (SwiGLU) or MoE (layer.h)
//   logits = norm(x_L) lm_head^T                                 (N, V); lm_head = embed_tokens if tied
//   loss  = cross_entropy(logits, targets) + sum over MoE blocks of (aux_loss + z_loss)
//
// Contract: plain C++ and Eigen on the CPU, written to be read; it only strings together the
// components of transformer.h, experts.h and layer.h, each with its own backward. Templated on
// Scalar (float for training, double for finite-difference checks), instantiated for both.
//
// Shapes: B = batch (sequences), T = sequence length, N = B*T rows (sequence-major: row b*T + t),
//         C = hidden size, V = vocabulary, L = blocks, E = routed experts.
//
// The MoE layer's aux_loss and z_loss come with their coefficients applied (routing.h), so the
// total loss just adds them, once per MoE block: a coefficient is per layer, as in Switch
// Transformer ("added to the total model loss" for each layer) and DeepSeek. (Hugging Face's
// Mixtral computes one loss over all layers' router logits concatenated instead.)
//
// Routing that looks across the batch (expert choice; capacity with token dropping) makes a
// token's output depend on other tokens of the batch, later ones included: a known limitation of
// those routings in an autoregressive model (Zhou et al. 2022, sec. 6). The model allows them for
// study; token-choice dropless routing (every preset but switch, gshard, expert_choice) is causal.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "reference/accounting.h"
#include "reference/config_json.h"
#include "reference/experts.h"
#include "reference/fault_hook.h"
#include "reference/layer.h"
#include "reference/observer.h"
#include "reference/optim.h"
#include "reference/random.h"
#include "reference/transformer.h"
#include "reference/types.h"

namespace moelab {

// ---- Configuration -----------------------------------------------------------------------------

// Which blocks have an MoE FFN; the others have the dense one.
enum class MoeLayout {
  dense,          // no MoE block: the dense baseline
  all,            // every block (Mixtral, Qwen-MoE, OLMoE)
  every_other,    // odd blocks 1, 3, 5, ... (GShard, Switch; HF decoder_sparse_step = 2)
  first_k_dense,  // blocks [0, first_k_dense_replace) dense, the rest MoE (DeepSeek)
};
std::string_view moe_layout_name(MoeLayout layout);  // "dense", "all", "every_other", "first_k_dense"
MoeLayout parse_moe_layout(std::string_view name);   // throws Error naming "moe_layout"

struct ModelConfig {
  Index vocab_size = 256;          // V: byte-level tokens
  Index hidden_size = 0;           // C
  Index n_layers = 0;              // L blocks
  Index n_heads = 0;               // attention heads; head dim C / n_heads, even (RoPE)
  double rope_theta = 10000.0;
  double rms_eps = 1e-5;
  Index intermediate_size = 0;     // the dense FFN's width (dense blocks only)
  Activation ffn_activation = Activation::swiglu;  // the dense FFN's
  MoeLayout moe_layout = MoeLayout::all;
  Index first_k_dense_replace = 0;  // first_k_dense: this many dense blocks first (else 0)
  LayerConfig moe{};               // every MoE block's layer; unused when moe_layout = dense
  bool tie_embeddings = false;     // lm_head = embed_tokens (HF tie_word_embeddings)
  double init_std = 0.02;          // N(0, init_std^2) for every weight matrix (HF initializer_range)

  bool is_moe(Index layer) const;  // block `layer` has an MoE FFN
  Index n_moe_layers() const;
  AttentionConfig attention() const;
  RMSNormConfig norm() const;
  ExpertConfig dense_ffn() const;  // a dense FFN is exactly one expert of experts.h, without bias
  // Throws Error naming the field, the value and the rule, e.g. "n_heads = 3: hidden_size = 64
  // must be divisible by n_heads" or "moe.routing.hidden_size = 16: must equal hidden_size = 64".
  void validate() const;
};

// Named configurations. "tiny_moe" and "tiny_dense" have equal active FFN parameters per token
// (see model.cpp for the sizes and the arithmetic); any layer preset's name (presets.h: "mixtral",
// "deepseek_v3", "switch", ...) gives the tiny model with that preset's routing conventions, its
// tiny expert counts, expert widths scaled with the hidden size (H = 2C, as the tiny presets' 32 at
// C = 16) and the published model's layout of MoE blocks. Throws Error naming the unknown name and
// listing the known ones.
ModelConfig tiny_moe();    // = model_config("mixtral")
ModelConfig tiny_dense();
ModelConfig model_config(std::string_view name);
std::vector<std::string> model_config_names();  // "tiny_moe", "tiny_dense", then every preset

// Every field, named as in the struct; "moe" is null for the dense layout. Reading is strict, as
// config_json.h: unknown, missing or mistyped keys are Errors naming the field with `path` prefixed
// ("moe.routing.top_k = 9: ..."), then validate() checks the rules between fields.
Json to_json(const ModelConfig& config);
ModelConfig model_config_from_json(const Json& j, std::string_view path = "");

// The config as accounting.h counts models (parameters, active parameters, FLOPs). Exact for every
// named config; not counted: a noisy-top-k router's noise weights, biases of shared experts.
ModelSizes model_sizes(const ModelConfig& config);

// ---- Parameters ----------------------------------------------------------------------------------

template <typename Scalar>
struct BlockParamsT {
  VectorT<Scalar> attn_norm;       // (C) input_layernorm.weight
  AttentionParamsT<Scalar> attn;   // self_attn.{q,k,v,o}_proj.weight, each (C, C)
  VectorT<Scalar> ffn_norm;        // (C) post_attention_layernorm.weight
  ExpertParamsT<Scalar> dense;     // dense block: mlp.{gate,up,down}_proj.weight; empty in an MoE block
  LayerParamsT<Scalar> moe;        // MoE block: router, experts, shared experts; empty in a dense block
};

template <typename Scalar>
struct ModelParamsT {
  MatrixT<Scalar> embed_tokens;              // (V, C) model.embed_tokens.weight
  std::vector<BlockParamsT<Scalar>> blocks;  // (L) model.layers.{i}
  VectorT<Scalar> norm;                      // (C) model.norm.weight
  MatrixT<Scalar> lm_head;                   // (V, C) lm_head.weight; empty when tied
};

// The gradients have the parameters' layout; an MoE block's selection bias (state, not a
// parameter) stays empty in them.
template <typename Scalar>
using ModelGradsT = ModelParamsT<Scalar>;

using ModelParams = ModelParamsT<float>;
using ModelGrads = ModelGradsT<float>;

// Norm weights 1, selection biases and biases 0, every other tensor ~ N(0, init_std^2), drawn in
// the order embed_tokens, then per block attention (init_attention) and FFN (init_expert or
// init_layer), then lm_head. The same seed gives the same bits; float and double are the same draws.
template <typename Scalar>
ModelParamsT<Scalar> init_model(const ModelConfig& config, Rng& rng);

// One tensor of the model under its checkpoint name, viewed (not owned).
template <typename Matrix, typename Vector>
struct NamedTensor {
  std::string name;
  Matrix* matrix = nullptr;  // a weight matrix, or
  Vector* vector = nullptr;  // a norm weight, bias or selection bias: exactly one of the two is set
  bool weight_decay = true;  // false for norms and biases (and for the non-trainable state)
  Index size() const { return matrix != nullptr ? matrix->size() : vector->size(); }
};
template <typename Scalar>
using NamedParamT = NamedTensor<MatrixT<Scalar>, VectorT<Scalar>>;
template <typename Scalar>
using ConstNamedParamT = NamedTensor<const MatrixT<Scalar>, const VectorT<Scalar>>;

// Every trainable tensor, once, in this order (Hugging Face Llama / Mixtral / Qwen2-MoE names):
//   model.embed_tokens.weight
//   per block i, prefix model.layers.{i}:
//     .input_layernorm.weight  .self_attn.{q,k,v,o}_proj.weight  .post_attention_layernorm.weight
//     dense:  .mlp.{gate,up,down}_proj.weight             (gate_proj for gated activations only)
//     MoE:    .mlp.gate.weight (router, (E, C))  [.mlp.gate.bias]  [.mlp.gate.noise_weight]
//             .mlp.experts.{e}.{gate,up,down}_proj.weight  [.{gate,up,down}_proj.bias]
//             shared experts: .mlp.shared_expert.* (one, gated: Qwen2-MoE), .mlp.shared_experts.*
//             (one, ungated: DeepSeek), .mlp.shared_experts.{s}.* (several), then
//             [.mlp.shared_expert_gate.weight (1, C)]
//   model.norm.weight
//   lm_head.weight                                       (untied only)
// Norms and biases have weight_decay = false. The views stay valid while the vectors of `params`
// keep their sizes.
template <typename Scalar>
std::vector<NamedParamT<Scalar>> model_parameters(ModelParamsT<Scalar>& params, const ModelConfig& config);
template <typename Scalar>
std::vector<ConstNamedParamT<Scalar>> model_parameters(const ModelParamsT<Scalar>& params, const ModelConfig& config);

// The non-trainable state a checkpoint also holds: each MoE block's selection bias,
// model.layers.{i}.mlp.gate.e_score_correction_bias (E), when use_selection_bias (DeepSeek-V3).
template <typename Scalar>
std::vector<NamedParamT<Scalar>> model_buffers(ModelParamsT<Scalar>& params, const ModelConfig& config);
template <typename Scalar>
std::vector<ConstNamedParamT<Scalar>> model_buffers(const ModelParamsT<Scalar>& params, const ModelConfig& config);

// The optimiser's list: every parameter with its gradient, paired by name, with its decay flag.
// Shapes `grads` like `params` (zeros) first if it is not yet; from then on model_backward writes
// into the same Eigen objects, so the ParamRefs stay valid across steps.
std::vector<ParamRef> model_param_refs(ModelParams& params, ModelGrads& grads, const ModelConfig& config);

// ---- Forward, loss, backward -----------------------------------------------------------------

// Forwards every event to `inner` after setting its layer (if layer >= 0) and its step (if
// step >= 0); an event keeps the values it already has otherwise. model_forward wraps its observer
// in one per block, so every event of block i carries layer = i; a training loop can wrap its
// recorder in one with the step.
class StampingObserver : public Observer {
 public:
  StampingObserver(Observer& inner, int layer, std::int64_t step = -1)
      : inner_(inner), layer_(layer), step_(step) {}
  void on_event(const Event& event) override;

 private:
  Observer& inner_;
  int layer_;
  std::int64_t step_;
};

template <typename Scalar>
struct BlockCacheT {               // what the backward needs from block i, and what it did
  MatrixT<Scalar> x;               // (N, C) the residual stream entering the block
  MatrixT<Scalar> attn_in;         // (N, C) input_layernorm(x)
  RMSNormCacheT<Scalar> attn_norm;
  AttentionCacheT<Scalar> attn;
  MatrixT<Scalar> h;               // (N, C) x + attention(attn_in)
  MatrixT<Scalar> ffn_in;          // (N, C) post_attention_layernorm(h)
  RMSNormCacheT<Scalar> ffn_norm;
  ExpertCacheT<Scalar> dense;      // dense block
  LayerOutputT<Scalar> moe;        // MoE block: routing ids, gates, load, dropped, losses, caches
};

template <typename Scalar>
struct ModelOutputT {
  Index batch_size = 0;                     // B
  Index seq_len = 0;                        // T
  std::vector<std::int32_t> ids;            // (N) the input tokens
  std::vector<BlockCacheT<Scalar>> blocks;  // (L)
  MatrixT<Scalar> x;                        // (N, C) the residual stream after the last block
  RMSNormCacheT<Scalar> final_norm;
  MatrixT<Scalar> normed;                   // (N, C) model.norm(x): the head's input
  MatrixT<Scalar> logits;                   // (N, V)
  Scalar aux_loss = 0;                      // sum over the MoE blocks, coefficients applied
  Scalar z_loss = 0;                        // sum over the MoE blocks, coefficients applied
};

using ModelOutput = ModelOutputT<float>;

//   out:    out, overwritten (its buffers reused)
//   ids:    (N = B*T) in, sequence-major, each in [0, V) (else Error naming the position)
//   rng:    needed by routers with noise (switch's jitter) while training; may be null otherwise
//   faults: a fault hook (fault_hook.h), handed to the MoE layer of every block it acts_on; null by default
// Emits every MoE stage's events (and the dense FFN's expert_hidden) with layer = block index.
template <typename Scalar>
void model_forward(ModelOutputT<Scalar>& out, std::span<const std::int32_t> ids, Index batch_size, Index seq_len,
                   const ModelParamsT<Scalar>& params, const ModelConfig& config, Rng* rng = nullptr,
                   Observer* observer = nullptr, FaultHook* faults = nullptr);

template <typename Scalar>
struct ModelLossT {
  Scalar ce = 0;   // mean next-token cross-entropy (nats per token)
  Scalar aux = 0;  // balance losses of every MoE block, weighted
  Scalar z = 0;    // router z-losses of every MoE block, weighted
  Scalar total() const { return ce + aux + z; }
};
using ModelLoss = ModelLossT<float>;

// targets (N): the token that follows each input token (targets[n] = the id after ids[n]).
template <typename Scalar>
ModelLossT<Scalar> model_loss(const ModelOutputT<Scalar>& out, std::span<const std::int32_t> targets);

// The gradient of model_loss(out, targets).total() with respect to every parameter, by the chain
// rule through the blocks in reverse:
//   d normed = dlogits lm_head;  d x_L = norm'(d normed)
//   block i:  d h   = d x_i+1 + post_attention_layernorm'(ffn_i'(d x_i+1))   (ffn_i' adds aux + z)
//             d x_i = d h + input_layernorm'(attention'(d h))
//   d embed_tokens = scatter(d x_0) (+ dlogits^T normed when tied)
//   grads: out; shaped like params on first use, then written in place (see model_param_refs)
//   out:   in, from the model_forward with the same params and config
template <typename Scalar>
void model_backward(ModelGradsT<Scalar>& grads, const ModelOutputT<Scalar>& out, std::span<const std::int32_t> targets,
                    const ModelParamsT<Scalar>& params, const ModelConfig& config);

// Auxiliary-loss-free balancing (DeepSeek-V3), after an optimiser step: every MoE block with
// use_selection_bias moves its selection bias by BiasBalancer with gamma = bias_update_rate, from
// the load of the forward in `out`. Emits events::bias with layer = block index.
template <typename Scalar>
void model_update_bias(ModelParamsT<Scalar>& params, const ModelOutputT<Scalar>& out, const ModelConfig& config,
                       Observer* observer = nullptr);

}  // namespace moelab
