// moelab/reference/losses.h — the balancing losses and the router z-loss.
//
// Contract: plain C++ and Eigen on the CPU, written to be read; fast versions live in cuda/ and
// are checked against these. Each loss has a forward that returns its value and a backward that
// gives the gradient with respect to its differentiable input (probs, scores or logits), side by
// side; outputs first, then inputs, then sizes and coefficients. Templated on Scalar (float for the
// model, double for finite-difference checks and golden values), instantiated for both in
// losses.cpp. docs/losses.md has the equations, their sources and the numbers that show why the
// conventions differ.
//
// Shapes: T = tokens, E = experts, k = experts per token, L = layers, D = devices,
//         M = devices a token may be sent to (DeepSeek-V2 device-limited routing).
//
// Common rules, checked by every forward and backward (Error names the field, value and rule):
// - ids (T, k) are the routing decisions: the k distinct experts, in [0, E), that each token was
//   sent to. They are constants: no gradient flows through a selection. The losses do not check
//   that ids are the top-k of the probs (a biased or group-limited selection is not).
// - probs / scores / logits must be finite; E >= 1, k >= 1; coefficients finite and >= 0.
// - T = 0 (an empty batch) is valid: the loss is 0 and the gradient is empty (0, E). There is
//   nothing to balance, and a training step on an empty micro-batch must not fail or yield NaN
//   (the means over tokens, 0/0, are taken as 0).
// - A backward overwrites (resizes) its output; add it to the main loss's gradient yourself. It
//   gives d loss / d input, i.e. the upstream gradient of the loss is 1.
//
// Each forward emits events::losses with stats named after the loss ({"switch_aux", value}, ...)
// and the loss's own f and P: f_max, f_min, P_max, P_min (see each function for what f and P are).
// Nothing is computed for a null observer.
#pragma once

#include "reference/observer.h"
#include "reference/types.h"

#include <span>

namespace moelab {

// ---- 1. Switch Transformer aux loss, one layer (Fedus et al. 2022, eqs. 4-6) -------------------
// loss = alpha * E * sum_i f_i * P_i
//   f_i = (1 / (T k)) * #{(t, j) : ids[t, j] = i}   fraction of the T*k assignments sent to i
//   P_i = (1 / T) * sum_t probs[t, i]                mean router probability of expert i
// For k = 1 this is the paper exactly. For k > 1 f counts every slot and divides by T*k, so
// sum_i f_i = 1 for every k and the value at perfect balance (f_i = P_i = 1/E) stays alpha; it is
// also the per-layer term of MegaBlocks and equal to DeepSeek-V2's expert-level loss (below).
//   probs: (T, E) in, softmax of the router logits
//   ids:   (T, k) in
// Stats: switch_aux, f (fractions, sum 1), P.
template <typename Scalar>
Scalar switch_aux_loss_forward(const MatrixT<Scalar>& probs, const IndexMatrix& ids, double alpha,
                               Observer* observer = nullptr);

// dprobs[t, i] = alpha * E * f_i / T   (f is constant: it comes from the selection)
//   dprobs: (T, E) out, resized
template <typename Scalar>
void switch_aux_loss_backward(MatrixT<Scalar>& dprobs, const MatrixT<Scalar>& probs,
                              const IndexMatrix& ids, double alpha);

// ---- 2. Hugging Face load_balancing_loss_func (Mixtral, Qwen2-MoE, OLMoE in transformers) -------
// The router logits of all layers are concatenated along the rows (layer-major, as torch.cat in
// transformers): R = L*T rows, pooled; the layer boundaries do not matter.
// routing_weights = softmax(logits)                                        (R, E)
// tokens_per_expert[j, e] = (1 / R) * #{r : ids[r, j] = e}                 (k, E)
// router_prob_per_expert[e] = (1 / R) * sum_r routing_weights[r, e]        (E)
// loss = alpha * E * sum_{j, e} tokens_per_expert[j, e] * router_prob_per_expert[e]
// Each row of tokens_per_expert sums to 1, so the value at perfect balance is alpha * k, not
// alpha: it is k times the Switch loss of the pooled rows. alpha stands for the caller's
// router_aux_loss_coef. transformers takes ids = topk(softmax(logits)) inside the function; here
// they are an input, as for every loss. Without an attention mask (every row counts; the
// transformers variant with a padding mask is not implemented).
//   logits: (R, E) in, R = L*T
//   ids:    (R, k) in
// Stats: hf_aux, f[e] = sum_j tokens_per_expert[j, e] (sums to k), P = router_prob_per_expert.
template <typename Scalar>
Scalar hf_load_balancing_loss_forward(const MatrixT<Scalar>& logits, const IndexMatrix& ids,
                                      double alpha, Observer* observer = nullptr);

// dlogits = softmax_backward(softmax(logits), dweights),
//   dweights[r, e] = alpha * E * (sum_j tokens_per_expert[j, e]) / R
//   dlogits: (R, E) out, resized
template <typename Scalar>
void hf_load_balancing_loss_backward(MatrixT<Scalar>& dlogits, const MatrixT<Scalar>& logits,
                                     const IndexMatrix& ids, double alpha);

// ---- 3. MegaBlocks batched_load_balancing_loss (Gale et al. 2023, megablocks/layers/moe.py) -----
// Layers stacked along the rows (layer-major): layer l is rows [l*T, (l+1)*T).
// scale = E * alpha / (L * T * k)
// loss  = scale * sum_l sum_e tokens_per_expert[l, e] * (1 / T) sum_t probs_l[t, e]
//   tokens_per_expert[l, e] = #{(t, j) : ids_l[t, j] = e}   (counts, not fractions)
// = the mean over layers of the per-layer Switch loss above, so its value at perfect balance is
// alpha. Every layer has the same T (MegaBlocks asserts it too).
//   probs: (L*T, E) in
//   ids:   (L*T, k) in
// Stats: megablocks_aux, f = counts / (T k) and P per layer (max and min over layers and experts).
template <typename Scalar>
Scalar megablocks_load_balancing_loss_forward(const MatrixT<Scalar>& probs, const IndexMatrix& ids,
                                              Index num_layers, double alpha,
                                              Observer* observer = nullptr);

// dprobs[l*T + t, e] = scale * tokens_per_expert[l, e] / T
//   dprobs: (L*T, E) out, resized
template <typename Scalar>
void megablocks_load_balancing_loss_backward(MatrixT<Scalar>& dprobs, const MatrixT<Scalar>& probs,
                                             const IndexMatrix& ids, Index num_layers,
                                             double alpha);

// ---- 4. DeepSeek-V2 balance losses (DeepSeek-AI 2024, sec. 2.2.3) -----------------------------
// s = scores (T, E), the softmax over the routed experts. Experts live on D devices contiguously:
// device d holds experts [d*E/D, (d+1)*E/D).
//
// Expert-level: loss = alpha1 * sum_i f_i P_i,
//   f_i = E / (k T) * #{t : token t selects i},  P_i = (1/T) sum_t s_{i,t}
// (f_i is E times the Switch f_i, so this equals switch_aux_loss with alpha = alpha1.)
// At perfect balance f_i = 1, P_i = 1/E: the value is alpha1. Stats: expert_balance, f, P.
template <typename Scalar>
Scalar deepseek_v2_expert_balance_loss_forward(const MatrixT<Scalar>& scores,
                                               const IndexMatrix& ids, double alpha1,
                                               Observer* observer = nullptr);
// dscores[t, i] = alpha1 * f_i / T
template <typename Scalar>
void deepseek_v2_expert_balance_loss_backward(MatrixT<Scalar>& dscores,
                                              const MatrixT<Scalar>& scores, const IndexMatrix& ids,
                                              double alpha1);

// Device-level: loss = alpha2 * sum_d f'_d P'_d,
//   f'_d = mean of f_i over the experts of device d,  P'_d = sum of P_i over device d
// At perfect balance: alpha2. Stats: device_balance, f = f', P = P'.
template <typename Scalar>
Scalar deepseek_v2_device_balance_loss_forward(const MatrixT<Scalar>& scores,
                                               const IndexMatrix& ids, Index num_devices,
                                               double alpha2, Observer* observer = nullptr);
// dscores[t, i] = alpha2 * f'_{device(i)} / T
template <typename Scalar>
void deepseek_v2_device_balance_loss_backward(MatrixT<Scalar>& dscores,
                                              const MatrixT<Scalar>& scores, const IndexMatrix& ids,
                                              Index num_devices, double alpha2);

// Communication: loss = alpha3 * sum_d f''_d P''_d,
//   f''_d = D / (M T) * #{t : token t is sent to device d},  P''_d = sum of P_i over device d
// M = devices_per_token, in [1, D]; a token whose k experts span more than M devices is an error
// (the normalisation assumes at most M). At perfect balance (every token on exactly M devices,
// spread evenly): alpha3. Stats: comm_balance, f = f'', P = P''.
template <typename Scalar>
Scalar deepseek_v2_comm_balance_loss_forward(const MatrixT<Scalar>& scores, const IndexMatrix& ids,
                                             Index num_devices, Index devices_per_token,
                                             double alpha3, Observer* observer = nullptr);
// dscores[t, i] = alpha3 * f''_{device(i)} / T
template <typename Scalar>
void deepseek_v2_comm_balance_loss_backward(MatrixT<Scalar>& dscores, const MatrixT<Scalar>& scores,
                                            const IndexMatrix& ids, Index num_devices,
                                            Index devices_per_token, double alpha3);

// ---- 5. DeepSeek-V3 sequence-wise balance loss (DeepSeek-AI 2024, sec. 2.1.2, eqs. 17-20) -------
// The rows are split into sequences of the given lengths, in order (they must sum to T, and each
// must be >= 1: a sequence without tokens has no f or P). For a sequence of T_s tokens:
//   s'_{i,t} = s_{i,t} / sum_j s_{j,t}                  (eq. 19; s = sigmoid scores, >= 0)
//   P_i = (1 / T_s) sum_t s'_{i,t}                      (eq. 20)
//   f_i = E / (k T_s) * #{t : token t selects i}        (eq. 18)
//   L_s = alpha * sum_i f_i P_i                         (eq. 17)
// loss = mean over the sequences of L_s (the paper defines one sequence; we average, so that
// the loss does not grow with the number of sequences in a batch). At perfect balance: alpha.
//   scores: (T, E) in, sigmoid scores (each row must have a positive sum)
//   ids:    (T, k) in, the experts selected (with the aux-loss-free bias, if any: the paper's
//           eq. 18 writes top-k of s; what matters for balance is the selection actually made)
// Stats: sequence_balance, sequences (count), f, P (max and min over sequences and experts).
template <typename Scalar>
Scalar deepseek_v3_sequence_balance_loss_forward(const MatrixT<Scalar>& scores,
                                                 const IndexMatrix& ids,
                                                 std::span<const Index> sequence_lengths,
                                                 double alpha, Observer* observer = nullptr);

// Through the normalisation, with S_t = sum_j s_{j,t} and N = number of sequences:
//   dscores[t, j] = alpha / (N T_s S_t) * (f_j - sum_i f_i s'_{i,t})
template <typename Scalar>
void deepseek_v3_sequence_balance_loss_backward(MatrixT<Scalar>& dscores,
                                                const MatrixT<Scalar>& scores,
                                                const IndexMatrix& ids,
                                                std::span<const Index> sequence_lengths,
                                                double alpha);

// ---- 6. Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5) ----------------------------------------
// loss = z_loss_coef * (1/T) sum_t lse_t^2,  lse_t = log sum_e exp(logits[t, e])
// lse_t = m_t + log sum_e exp(logits[t, e] - m_t) with m_t = max_e logits[t, e]: every exp() is
// <= 1, so logits of 1000 do not overflow. ST-MoE uses z_loss_coef = 0.001.
//   logits: (T, E) in
// Stats: z_loss, lse_max, lse_mean (0 for T = 0).
template <typename Scalar>
Scalar router_z_loss_forward(const MatrixT<Scalar>& logits, double z_loss_coef,
                             Observer* observer = nullptr);

// dlogits[t, e] = z_loss_coef * 2 * lse_t * softmax(logits_t)_e / T
//   dlogits: (T, E) out, resized
template <typename Scalar>
void router_z_loss_backward(MatrixT<Scalar>& dlogits, const MatrixT<Scalar>& logits,
                            double z_loss_coef);

}  // namespace moelab
