// moelab/reference/transformer.h — the dense pieces of the tiny decoder-only language model around
// the MoE layers: token embedding, RMSNorm, rotary position embeddings, causal multi-head
// self-attention, the bias-free linear projection (the LM head) and the cross-entropy loss.
//
// Contract: plain C++ and Eigen on the CPU, written to be read; forward and backward side by side;
// outputs first, then inputs, then sizes. Templated on Scalar (float for training, double for
// finite-difference checks), instantiated for both in transformer.cpp. Every backward overwrites
// (resizes) its outputs: where a gradient has two sources (the residual stream, a tied embedding
// and head), the caller adds them.
//
// Shapes: B = batch (sequences), T = sequence length, N = B*T rows, C = hidden size (channels),
//         V = vocabulary size, H = attention heads (n_heads), D = head dim = C / H.
// A batch is laid out sequence-major: row n = b*T + t is token t of sequence b, so an (N, C)
// activation is B blocks of T rows, and the position of row n is n mod T.
//
// Weights are stored as in Hugging Face Llama checkpoints: nn.Linear(in, out).weight is (out, in),
// so every projection is x W^T; the names are Llama's (embed_tokens, input_layernorm, q_proj,
// k_proj, v_proj, o_proj, norm, lm_head).
#pragma once

#include "reference/random.h"
#include "reference/types.h"

#include <cstdint>
#include <span>

namespace moelab {

// ---- 1. Token embedding ---------------------------------------------------------------------------
// x[n] = wte[ids[n]]   (nn.Embedding; Llama's embed_tokens)
//   x:   (N, C) out, resized
//   ids: (N) in, each in [0, V) (else Error naming the position and the id: "ids[5] = 300: ...")
//   wte: (V, C) in
template <typename Scalar>
void embedding_forward(MatrixT<Scalar>& x, std::span<const std::int32_t> ids, const MatrixT<Scalar>& wte);

// dwte[v] = sum over the rows n with ids[n] = v of dx[n]   (scatter-add; rows of unseen ids are 0)
//   dwte: (V, C) out, resized and overwritten (a tied LM head's gradient is the caller's to add)
//   dx:   (N, C) in
//   ids:  (N) in, as for the forward
template <typename Scalar>
void embedding_backward(MatrixT<Scalar>& dwte, const MatrixT<Scalar>& dx, std::span<const std::int32_t> ids,
                        Index vocab_size);

// ---- 2. RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", eq. 4) ------------
// Per row, as Hugging Face's LlamaRMSNorm:
//   inv_rms = 1 / sqrt(mean_c x_c^2 + eps),   y = (x * inv_rms) * weight
struct RMSNormConfig {
  double eps = 1e-5;  // rms_norm_eps (Llama 2: 1e-5; Llama 1 and 3: 1e-6)
  // Throws Error naming field, value and rule: eps must be finite and > 0 (an all-zero row would
  // otherwise be 0 / 0).
  void validate() const;
};

template <typename Scalar>
struct RMSNormCacheT {
  VectorT<Scalar> inv_rms;  // (N) 1 / sqrt(mean(x^2) + eps) of each row
};

//   y:      (N, C) out, resized
//   cache:  out, overwritten
//   x:      (N, C) in
//   weight: (C) in
template <typename Scalar>
void rmsnorm_forward(MatrixT<Scalar>& y, RMSNormCacheT<Scalar>& cache, const MatrixT<Scalar>& x,
                     const VectorT<Scalar>& weight, const RMSNormConfig& config);

// With r = inv_rms (per row), xhat = x r and g = dy * weight:
//   dweight = sum_rows dy * xhat                           (C)
//   dx      = r (g - xhat mean_c(g * xhat))                (N, C)
// (d r / d x_c = -r^3 x_c / C, so the second term is the gradient through the row's rms.) eps is
// not needed again: it is inside the cached inv_rms.
template <typename Scalar>
void rmsnorm_backward(MatrixT<Scalar>& dx, VectorT<Scalar>& dweight, const MatrixT<Scalar>& dy,
                      const RMSNormCacheT<Scalar>& cache, const MatrixT<Scalar>& x,
                      const VectorT<Scalar>& weight);

// ---- 3. Rotary position embeddings (Su et al. 2021, RoFormer, sec. 3.4.2) --------------------------
// Hugging Face Llama's "rotate_half" convention: in each head of D features, feature i of the first
// half pairs with feature i + D/2 of the second half, and the pair of the token at position p turns
// by the angle p * theta^(-2i/D), i in [0, D/2):
//   x1 = x[:D/2], x2 = x[D/2:]
//   out = [x1 cos - x2 sin,  x2 cos + x1 sin]
// (The paper and Meta's original Llama code pair adjacent features (2i, 2i+1) instead; the two
// differ by a fixed permutation of q_proj's and k_proj's rows, which HF's conversion script applies.)
// The angles are computed in double and their cos and sin rounded once to Scalar; HF computes the
// angles in float32, which at position p differs by up to ~p * 6e-8 radians.
template <typename Scalar>
struct RopeTableT {
  MatrixT<Scalar> cos;  // (T, D/2) cos(p * theta^(-2i/D)) for position p, pair i
  MatrixT<Scalar> sin;  // (T, D/2)
};

// The table for positions 0..T-1. Error unless seq_len >= 1, head_dim even and >= 2, theta finite
// and > 0.
template <typename Scalar>
RopeTableT<Scalar> rope_table(Index seq_len, Index head_dim, double theta);

// Rotates every head of every row; the row n is at position n mod T (T = table rows).
//   y:     (N, H*D) out, resized; may be x (each pair is read before it is written)
//   x:     (N, H*D) in, N a multiple of T
template <typename Scalar>
void rope_forward(MatrixT<Scalar>& y, const MatrixT<Scalar>& x, const RopeTableT<Scalar>& table, Index n_heads);

// The rotation is orthogonal, so its transpose, the rotation by -angle, carries the gradient back:
//   dx = [dy1 cos + dy2 sin,  dy2 cos - dy1 sin]
//   dx: (N, H*D) out, resized; may be dy
template <typename Scalar>
void rope_backward(MatrixT<Scalar>& dx, const MatrixT<Scalar>& dy, const RopeTableT<Scalar>& table, Index n_heads);

// ---- 4. Linear projection without bias (nn.Linear(in, out, bias=False)) -------------------------------
// y = x W^T; the LM head (V, C) and the attention projections.
//   y: (N, out) out, resized;  x: (N, in) in;  w: (out, in) in
template <typename Scalar>
void linear_forward(MatrixT<Scalar>& y, const MatrixT<Scalar>& x, const MatrixT<Scalar>& w);

// dx = dy W (N, in),  dw = dy^T x (out, in)
template <typename Scalar>
void linear_backward(MatrixT<Scalar>& dx, MatrixT<Scalar>& dw, const MatrixT<Scalar>& dy, const MatrixT<Scalar>& x,
                     const MatrixT<Scalar>& w);

// ---- 5. Causal multi-head self-attention with RoPE (Vaswani et al. 2017, eq. 1; Llama) ------------
// For each sequence b and head h, with Q, K, V the (T, D) blocks of head h of sequence b:
//   q = rope(x Wq^T),  k = rope(x Wk^T),  v = x Wv^T                      (N, C) each
//   S = Q K^T / sqrt(D),  S[i, j] = -inf for j > i (causal)               (T, T)
//   P = softmax(S) per row (the row's max subtracted first)               (T, T)
//   context[b, h] = P V                                                   (T, D)
//   y = context Wo^T                                                      (N, C)
// Head h is columns [h D, (h+1) D) of q, k, v and context (HF's view(B, T, H, D)). No bias, no
// dropout, no attention mask beyond causality within each sequence: every sequence starts at
// position 0 and sees only itself.
struct AttentionConfig {
  Index hidden_size = 0;        // C
  Index n_heads = 0;            // H (num_attention_heads)
  Index n_kv_heads = 0;         // num_key_value_heads; 0 means H. Grouped-query attention (fewer
                                // key/value heads) is not implemented: 0 or H only.
  double rope_theta = 10000.0;  // RoPE base (Llama 2: 10000; Llama 3: 500000)
  Index head_dim() const { return n_heads > 0 ? hidden_size / n_heads : 0; }  // D
  // Throws Error naming field, value and rule: hidden_size and n_heads positive, hidden_size
  // divisible by n_heads, head_dim even (RoPE pairs features), n_kv_heads 0 or n_heads, rope_theta
  // finite and > 0.
  void validate() const;
};

template <typename Scalar>
struct AttentionParamsT {  // Hugging Face Llama layout: nn.Linear weights are (out, in)
  MatrixT<Scalar> q_proj;  // (C, C) self_attn.q_proj.weight
  MatrixT<Scalar> k_proj;  // (C, C) self_attn.k_proj.weight
  MatrixT<Scalar> v_proj;  // (C, C) self_attn.v_proj.weight
  MatrixT<Scalar> o_proj;  // (C, C) self_attn.o_proj.weight
};

template <typename Scalar>
struct AttentionCacheT {   // what the backward needs from the forward
  MatrixT<Scalar> q;       // (N, C) x Wq^T after RoPE
  MatrixT<Scalar> k;       // (N, C) x Wk^T after RoPE
  MatrixT<Scalar> v;       // (N, C) x Wv^T
  MatrixT<Scalar> probs;   // (B*H*T, T) = (B, H, T, T): P of (b, h) is rows [(b H + h) T, (b H + h + 1) T);
                           // zero above the diagonal
  MatrixT<Scalar> context; // (N, C) P V per head, the input of o_proj
  RopeTableT<Scalar> rope; // (T, D/2)
};

using AttentionParams = AttentionParamsT<float>;
using AttentionCache = AttentionCacheT<float>;

//   y:       (N, C) out, resized
//   cache:   out, overwritten
//   x:       (N, C) in, B sequences of T rows (N = B*T, else Error)
//   params:  in, each (C, C) (else Error naming the matrix)
template <typename Scalar>
void attention_forward(MatrixT<Scalar>& y, AttentionCacheT<Scalar>& cache, const MatrixT<Scalar>& x,
                       const AttentionParamsT<Scalar>& params, const AttentionConfig& config, Index batch_size,
                       Index seq_len);

// With G = dy and, per (b, h), dC the (T, D) block of dcontext:
//   dWo = G^T context,  dcontext = G Wo
//   dP = dC V^T,  dV = P^T dC
//   dS = P * (dP - rowsum(P * dP)) / sqrt(D)      (softmax backward; 0 above the diagonal, where P = 0)
//   dQ = dS K,  dK = dS^T Q                       (with respect to q, k after RoPE)
//   dq_lin = rope_backward(dq),  dk_lin = rope_backward(dk)
//   dWq = dq_lin^T x,  dWk = dk_lin^T x,  dWv = dv^T x
//   dx = dq_lin Wq + dk_lin Wk + dv Wv
//   dx:      (N, C) out, resized
//   dparams: out, every matrix (C, C), resized
//   dy:      (N, C) in
//   cache:   in, from the attention_forward that made y (same x, params, config, sizes)
template <typename Scalar>
void attention_backward(MatrixT<Scalar>& dx, AttentionParamsT<Scalar>& dparams, const MatrixT<Scalar>& dy,
                        const AttentionCacheT<Scalar>& cache, const MatrixT<Scalar>& x,
                        const AttentionParamsT<Scalar>& params, const AttentionConfig& config, Index batch_size,
                        Index seq_len);

// Seeded initialisation: every weight ~ N(0, init_std^2) (init_std = 0.02 is HF's
// initializer_range), drawn in the order q_proj, k_proj, v_proj, o_proj, each row-major. Float and
// double parameters are the same draws, rounded. (GPT-2 also scales o_proj by 1/sqrt(2 layers); that
// is the model's choice, not made here.) init_std must be finite and >= 0.
template <typename Scalar>
AttentionParamsT<Scalar> init_attention(const AttentionConfig& config, Rng& rng, double init_std = 0.02);

// ---- 6. Cross-entropy over the vocabulary --------------------------------------------------------------
// loss = (1/N) sum_n (lse_n - logits[n, targets[n]]),  lse_n = m_n + log sum_v exp(logits[n, v] - m_n),
// m_n = max_v logits[n, v] (every exp() <= 1: no overflow). As F.cross_entropy(logits, targets) with
// reduction "mean". The per-row terms are summed in double. N = 0 gives 0 (and an empty gradient),
// as every loss in moelab. Non-finite logits give a non-finite loss (not an Error): the training
// loop watches the loss. Targets outside [0, V): Error naming the position and the target.
//   logits:  (N, V) in
//   targets: (N) in
template <typename Scalar>
Scalar cross_entropy_forward(const MatrixT<Scalar>& logits, std::span<const std::int32_t> targets);

// dlogits[n] = dloss * (softmax(logits[n]) - onehot(targets[n])) / N
//   dlogits: (N, V) out, resized
//   dloss:   the upstream gradient of the loss (1 for the loss itself; a loss scale otherwise)
template <typename Scalar>
void cross_entropy_backward(MatrixT<Scalar>& dlogits, const MatrixT<Scalar>& logits,
                            std::span<const std::int32_t> targets, Scalar dloss = Scalar(1));

}  // namespace moelab
