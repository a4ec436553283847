// moelab/reference/optim.h — what trains the tiny model: AdamW, the learning-rate schedule and
// global-norm gradient clipping, each as PyTorch / nanoGPT define it.
//
// Contract: plain C++ on the CPU, written to be read. Master parameters, gradients and optimiser
// state are float32 (the model's), updated in place; the few scalar coefficients (bias
// corrections, the clipping norm) are computed in double, as Python computes them in PyTorch.
//
// Shapes: P = parameters in the list, size = elements of one parameter.
#pragma once

#include "reference/types.h"

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace moelab {

// ---- Parameters ------------------------------------------------------------------------------------
// One trainable matrix (or vector) and its gradient, named as in the checkpoint
// ("model.layers.0.self_attn.q_proj.weight"). It keeps pointers to the two Eigen objects, not to
// their data, and reads data() and size() at each use: a gradient that a backward resizes or
// move-assigns is still found. Both objects must outlive the ParamRef; their sizes must agree when
// it is used (Error naming the parameter otherwise).
class ParamRef {
 public:
  // weight_decay: false for norms and biases: AdamW then skips the decay term for this parameter
  // (nanoGPT decays every parameter of 2 or more dimensions, embeddings included, and no other).
  ParamRef(std::string name, MatrixT<float>& value, MatrixT<float>& grad, bool weight_decay = true);
  ParamRef(std::string name, VectorT<float>& value, VectorT<float>& grad, bool weight_decay = true);

  const std::string& name() const { return name_; }
  bool weight_decay() const { return weight_decay_; }
  std::span<float> value() const;  // (size) the parameter's elements, row-major, now
  std::span<float> grad() const;   // (size) its gradient's elements; Error if its size is not value's

 private:
  std::string name_;
  bool weight_decay_ = true;
  MatrixT<float>* matrix_value_ = nullptr;  // a matrix parameter: these two ...
  MatrixT<float>* matrix_grad_ = nullptr;
  VectorT<float>* vector_value_ = nullptr;  // ... or a vector parameter: these two
  VectorT<float>* vector_grad_ = nullptr;
};

// ---- AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", Algorithm 2) ---------
// As torch.optim.AdamW with amsgrad = False, maximize = False. Step t = 1, 2, ... of parameter p
// with gradient g, at learning rate lr:
//   p <- p (1 - lr wd)                                 decoupled weight decay (if the parameter has it)
//   m <- b1 m + (1 - b1) g
//   v <- b2 v + (1 - b2) g^2
//   p <- p - lr m_hat / (sqrt(v_hat) + eps),  m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t)
// evaluated in PyTorch's order (torch/optim/adamw.py, _single_tensor_adamw): step_size =
// lr / (1 - b1^t) and sqrt(1 - b2^t) in double, then per element in float32
// denom = sqrt(v) / sqrt(1 - b2^t) + eps and p += -step_size m / denom. The decay multiplies by
// (1 - lr wd) rather than subtracting lr wd p, as PyTorch does. Non-finite gradients are not
// checked: they make the parameter non-finite, as in PyTorch (clip_grad_norm returns a non-finite
// norm first: the training loop decides).
struct AdamWConfig {
  double lr = 1e-3;            // the learning rate of step(); step(lr) overrides it
  double beta1 = 0.9;          // b1
  double beta2 = 0.999;        // b2
  double eps = 1e-8;
  double weight_decay = 1e-2;  // wd (torch.optim.AdamW's default; nanoGPT uses 0.1)
  // Throws Error naming field, value and rule (PyTorch's rules, plus finiteness): lr, eps and
  // weight_decay finite and >= 0; beta1 and beta2 in [0, 1).
  void validate() const;
};

struct AdamWState {              // one parameter's; torch's state[p]
  std::vector<float> exp_avg;    // (size) m
  std::vector<float> exp_avg_sq; // (size) v
  std::int64_t step = 0;         // t, the steps taken so far
};

class AdamW {
 public:
  // Validates the config; every name must be distinct (Error naming the repeated one). The state
  // starts at m = v = 0, t = 0, sized from the parameters as they are now.
  AdamW(std::vector<ParamRef> params, const AdamWConfig& config);

  void step();           // one step of every parameter at config().lr
  void step(double lr);  // ... at this learning rate (the schedule's, below): finite and >= 0

  const std::vector<ParamRef>& params() const { return params_; }
  const AdamWConfig& config() const { return config_; }
  // (P) in the order of params(). Writable to resume from a checkpoint: each exp_avg and
  // exp_avg_sq must keep its parameter's size (step() checks).
  const std::vector<AdamWState>& state() const { return state_; }
  std::vector<AdamWState>& state() { return state_; }

 private:
  std::vector<ParamRef> params_;
  AdamWConfig config_;
  std::vector<AdamWState> state_;  // (P)
};

// ---- Learning-rate schedule (nanoGPT's get_lr: linear warm-up, then cosine decay) --------------------
// For step = 0, 1, 2, ... (the step about to be taken, 0-based):
//   step <  warmup_steps:          lr (step + 1) / warmup_steps        (reaches lr at step warmup - 1)
//   warmup_steps <= step < total:  min_lr + (1 + cos(pi r)) / 2 (lr - min_lr),
//                                  r = (step - warmup_steps) / (total_steps - warmup_steps)
//   step >= total_steps:           min_lr
// So step warmup_steps is at lr too, the midpoint warmup + (total - warmup) / 2 at (lr + min_lr) / 2,
// and the cosine would reach min_lr at step total_steps (nanoGPT's lr_decay_iters), the first step
// after training. The warm-up's first step is lr / warmup, not 0: every step moves the parameters
// (nanoGPT's newer get_lr uses (it + 1) / (warmup_iters + 1), its first version it / warmup_iters).
struct LrScheduleConfig {
  double lr = 1e-3;                // peak, after the warm-up
  double min_lr = 1e-4;            // at the end of the cosine (nanoGPT: lr / 10)
  std::int64_t warmup_steps = 0;   // 0: no warm-up, the cosine starts at step 0
  std::int64_t total_steps = 1;    // steps of training
  // Throws Error naming field, value and rule: lr finite and > 0; min_lr finite, in [0, lr];
  // total_steps >= 1; warmup_steps in [0, total_steps].
  void validate() const;
};

// lr at `step` (>= 0, else Error) as above; a pure function.
double learning_rate(const LrScheduleConfig& config, std::int64_t step);

// ---- Global-norm gradient clipping (torch.nn.utils.clip_grad_norm_, norm_type = 2) -----------------
// total = sqrt(sum over every parameter's gradient of g^2), summed in double;
// coef = max_norm / (total + 1e-6); if coef < 1 (total > max_norm - 1e-6, PyTorch's clamp of coef to
// at most 1), every gradient is multiplied by float(coef). Returns total, before clipping.
// A non-finite total (a NaN or inf gradient; squares of floats cannot overflow the double sum)
// scales nothing and is returned
// as it is: the caller decides (skip the step, stop). PyTorch would multiply by the NaN or 0 coef.
// max_norm must be > 0 (infinity: measure only, never scale); Error otherwise.
double clip_grad_norm(std::span<const ParamRef> params, double max_norm);

}  // namespace moelab
