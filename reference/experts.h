// moelab/reference/experts.h — the expert stage: the feed-forward network each expert applies to
// the rows it was given, fine-grained segmentation, and the sigmoid gate of shared experts.
//
// Contract: plain C++ and Eigen on the CPU, written to be read; fast versions (cuda/: grouped GEMM
// with the activation fused) are checked against these. Forward and backward sit side by side;
// outputs first, then inputs. Templated on Scalar (float for the model, double for finite-
// difference checks and golden values), instantiated for both in experts.cpp.
//
// Shapes: n = rows given to one expert (n = 0 is valid: an expert nobody chose), C = hidden size,
// H = the expert's intermediate size.
//
// Weights are stored as in Hugging Face checkpoints: nn.Linear(in, out).weight is (out, in), so
// every projection is x W^T.
//
//   swiglu          h = silu(x Wg^T (+ bg)) * (x Wu^T (+ bu))          silu(z) = z sigmoid(z)
//                   y = h Wd^T (+ bd)
//                   Shazeer 2020, "GLU Variants Improve Transformer"; Llama, Mixtral, Qwen, DeepSeek
//   gelu            h = gelu(x Wu^T (+ bu)),  y = h Wd^T (+ bd)
//                   exact GELU with erf: gelu(z) = z Phi(z) = z (1 + erf(z / sqrt 2)) / 2, as
//                   torch.nn.GELU() by default, not the tanh approximation (Switch, GShard era)
//   relu            h = relu(x Wu^T (+ bu)),  y = h Wd^T (+ bd)       relu'(0) = 0, as PyTorch
//   swiglu_clamped  g = min(x Wg^T + bg, limit)                        the gate is clamped above only
//                   u = clamp(x Wu^T + bu, -limit, limit)
//                   h = g sigmoid(alpha g) (u + 1),  y = h Wd^T + bd   gpt-oss (limit 7, alpha 1.702)
//                   The clamps pass the gradient where the value lies within the limits, limits
//                   included (as torch.clamp), and nothing beyond them. gpt-oss fuses gate and up
//                   into one interleaved projection: in the Hugging Face port gate_up_proj is (C, 2H)
//                   per expert, gate = its columns 0, 2, 4, ..., up = columns 1, 3, 5, ...; those
//                   halves, transposed, are w_gate and w_up here.
//
// Every activation acts elementwise on the H intermediate features, which is what makes
// fine-grained segmentation (segment_expert below) exact.
#pragma once

#include "reference/observer.h"
#include "reference/random.h"
#include "reference/types.h"

#include <cstdint>
#include <string_view>
#include <vector>

namespace moelab {

enum class Activation { swiglu, gelu, relu, swiglu_clamped };
std::string_view activation_name(Activation activation);  // "swiglu", "gelu", "relu", "swiglu_clamped"
Activation parse_activation(std::string_view name);       // throws Error naming "activation"

// True for the activations with a gate projection (swiglu, swiglu_clamped): three matrices, not two.
bool is_gated(Activation activation);

struct ExpertConfig {
  Index hidden_size = 0;         // C
  Index intermediate_size = 0;   // H (per expert; moe_intermediate_size in HF MoE configs)
  Activation activation = Activation::swiglu;
  bool use_bias = false;         // gpt-oss experts have biases
  double swiglu_limit = 7.0;     // swiglu_clamped: gate clamped to (-inf, limit], up to [-limit, limit]
  double swiglu_alpha = 1.702;   // swiglu_clamped: glu = gate * sigmoid(alpha * gate); out = (up + 1) * glu
  // Throws Error naming field, value and rule: hidden_size or intermediate_size <= 0, an unknown
  // activation, swiglu_limit or swiglu_alpha not finite and > 0 (both checked whatever the
  // activation, so a config is valid or not independently of which activation it names).
  void validate() const;
};

template <typename Scalar>
struct ExpertParamsT {           // Hugging Face layout: nn.Linear weights are (out, in)
  MatrixT<Scalar> w_gate;        // (H, C) gate_proj.weight; swiglu variants only, else empty
  MatrixT<Scalar> w_up;          // (H, C) up_proj.weight; for gelu/relu the first linear (fc1, w1)
  MatrixT<Scalar> w_down;        // (C, H) down_proj.weight (fc2, w2)
  VectorT<Scalar> b_gate;        // (H) when use_bias and gated, else empty
  VectorT<Scalar> b_up;          // (H) when use_bias, else empty
  VectorT<Scalar> b_down;        // (C) when use_bias, else empty
};

template <typename Scalar>
struct ExpertCacheT {            // what the backward needs from the forward
  MatrixT<Scalar> gate_pre;      // (n, H) x Wg^T (+ bg), before any clamp; empty for gelu/relu
  MatrixT<Scalar> up_pre;        // (n, H) x Wu^T (+ bu), before any clamp or activation
  MatrixT<Scalar> hidden;        // (n, H) h, the input of the down projection
};

using ExpertParams = ExpertParamsT<float>;
using ExpertCache = ExpertCacheT<float>;

// y = FFN(x) as at the top of this file.
//   y:      (n, C) out, resized
//   cache:  out, overwritten (gate_pre emptied for gelu/relu)
//   x:      (n, C) in
//   params: in, shaped as config says (else Error naming the matrix and its expected shape)
// Emits events::expert_hidden.
template <typename Scalar>
void expert_forward(MatrixT<Scalar>& y, ExpertCacheT<Scalar>& cache, const MatrixT<Scalar>& x,
                    const ExpertParamsT<Scalar>& params, const ExpertConfig& config,
                    Observer* observer = nullptr);

// The last step of expert_forward on its own: y = h Wd^T (+ bd). The MoE layer redoes it when a
// fault hook (fault_hook.h) has changed h.
//   y:      (n, C) out, resized
//   hidden: (n, H) in
template <typename Scalar>
void expert_down_projection(MatrixT<Scalar>& y, const MatrixT<Scalar>& hidden, const ExpertParamsT<Scalar>& params,
                            const ExpertConfig& config);

// With G = dy, dh = G Wd, and a, g, u the cached pre-activations:
//   dparams.w_down = G^T h                         (C, H)     dparams.b_down = sum_rows G    (C)
//   swiglu:          dg = dh * u * silu'(g),  du = dh * silu(g)
//                    silu'(g) = s (1 + g (1 - s)),  s = sigmoid(g)
//   gelu / relu:     du = dh * act'(a)
//                    gelu'(a) = Phi(a) + a phi(a),  phi(a) = e^(-a^2 / 2) / sqrt(2 pi)
//   swiglu_clamped:  dg = dh * (u_c + 1) * glu'(g_c) * [g <= limit]
//                    du = dh * glu(g_c) * [-limit <= u <= limit]
//                    glu'(z) = s + alpha z s (1 - s),  s = sigmoid(alpha z);  g_c, u_c clamped
//   dparams.w_gate = dg^T x,  dparams.w_up = du^T x  (H, C)     dparams.b_gate, b_up = sum_rows (H)
//   dx = dg Wg + du Wu                              (n, C)      (no dg term for gelu/relu)
// Parameters the config does not use come back empty, like their params.
//   dx:      (n, C) out, resized
//   dparams: out, resized
//   dy:      (n, C) in, the gradient of the loss with respect to y
//   cache:   in, from the expert_forward that made y (same x, params, config)
template <typename Scalar>
void expert_backward(MatrixT<Scalar>& dx, ExpertParamsT<Scalar>& dparams, const MatrixT<Scalar>& dy,
                     const ExpertCacheT<Scalar>& cache, const MatrixT<Scalar>& x,
                     const ExpertParamsT<Scalar>& params, const ExpertConfig& config);

// Seeded initialisation: every weight ~ N(0, init_std^2) (init_std = 0.02 is HF's
// initializer_range), every bias zero, shapes from the (validated) config. Draws (2 or 3) C H
// rng.normal() in the order w_gate (if gated), w_up, w_down, each row-major, so the same Rng state
// gives the same bits and consecutive calls on one Rng give different experts. Float and double
// parameters are the same draws, rounded. init_std must be finite and >= 0.
template <typename Scalar>
ExpertParamsT<Scalar> init_expert(const ExpertConfig& config, Rng& rng, double init_std = 0.02);

// Fine-grained expert segmentation (DeepSeekMoE, Dai et al. 2024, sec. 3.1): one expert of
// intermediate size H becomes m experts of size H / m. Segment j takes rows [j H/m, (j+1) H/m) of
// w_gate, w_up, b_gate, b_up and the same columns of w_down. Because the activation acts
// elementwise on H, sum_j FFN_j(x) = FFN(x) (up to rounding: the down projection's sums are split).
// The down bias must count once: segment 0 keeps b_down, the others get zeros (when use_bias).
// Throws Error if m < 1 or m does not divide H:
//   "intermediate_size = 1408: not divisible by the segmentation factor m = 3"
template <typename Scalar>
std::vector<ExpertParamsT<Scalar>> segment_expert(const ExpertParamsT<Scalar>& expert,
                                                  const ExpertConfig& config, int m);
ExpertConfig segmented_config(const ExpertConfig& config, int m);  // H / m; same errors

// Parameters of one expert: (3 if gated else 2) C H weights, plus when use_bias (2 H or H) + C.
std::int64_t expert_parameters(const ExpertConfig& config);
// Forward FLOPs per token of one expert: 2 FLOPs per multiply-add of its projections, so
// 2 (3 or 2) C H. Not counted: bias adds, the activation and the gating product (O(H) each,
// against O(C H)). The backward costs about twice this (dx and dW are one product each).
// Segmentation keeps it: k m segments of H / m cost as much as k experts of H.
std::int64_t expert_flops_per_token(const ExpertConfig& config);

// Shared experts (Qwen2-MoE, DeepSeek, Llama 4) are plain experts applied to every token. Qwen2-MoE
// scales its shared expert's output per token by a sigmoid gate, shared_expert_gate = nn.Linear(C, 1,
// bias=False):  y_t = sigmoid(x_t . w) shared_out_t.
//   y:          (n, C) out, resized
//   gate:       (n) out, sigmoid(x w^T), resized
//   x:          (n, C) in, the layer input (what the shared expert also reads)
//   w:          (1, C) in
//   shared_out: (n, C) in, the shared expert's output
template <typename Scalar>
void shared_gate_forward(MatrixT<Scalar>& y, VectorT<Scalar>& gate, const MatrixT<Scalar>& x,
                         const MatrixT<Scalar>& w, const MatrixT<Scalar>& shared_out);

// With z = x w^T, gate = sigmoid(z):
//   dshared_out = gate * dy (row t scaled by gate_t)                       (n, C)
//   dz_t = gate_t (1 - gate_t) sum_c dy_tc shared_out_tc                   (n)
//   dw = dz^T x  (1, C),   dx = dz w  (n, C)
// dx is the gate path only: the caller adds the shared expert's own dx (expert_backward on
// dshared_out). gate is the one shared_gate_forward returned.
template <typename Scalar>
void shared_gate_backward(MatrixT<Scalar>& dx, MatrixT<Scalar>& dw, MatrixT<Scalar>& dshared_out,
                          const MatrixT<Scalar>& dy, const VectorT<Scalar>& gate, const MatrixT<Scalar>& x,
                          const MatrixT<Scalar>& w, const MatrixT<Scalar>& shared_out);

}  // namespace moelab
