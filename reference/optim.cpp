// moelab/reference/optim.cpp — see optim.h.
#include "reference/optim.h"

#include "reference/error.h"

#include <fmt/format.h>

#include <cmath>
#include <cstddef>
#include <numbers>
#include <set>
#include <utility>

namespace moelab {

// ---- Parameters ------------------------------------------------------------------------------------

ParamRef::ParamRef(std::string name, MatrixT<float>& value, MatrixT<float>& grad, bool weight_decay)
    : name_(std::move(name)), weight_decay_(weight_decay), matrix_value_(&value), matrix_grad_(&grad) {}

ParamRef::ParamRef(std::string name, VectorT<float>& value, VectorT<float>& grad, bool weight_decay)
    : name_(std::move(name)), weight_decay_(weight_decay), vector_value_(&value), vector_grad_(&grad) {}

std::span<float> ParamRef::value() const {
  if (matrix_value_ != nullptr)
    return {matrix_value_->data(), static_cast<std::size_t>(matrix_value_->size())};
  return {vector_value_->data(), static_cast<std::size_t>(vector_value_->size())};
}

std::span<float> ParamRef::grad() const {
  const std::span<float> g =
      matrix_grad_ != nullptr
          ? std::span<float>(matrix_grad_->data(), static_cast<std::size_t>(matrix_grad_->size()))
          : std::span<float>(vector_grad_->data(), static_cast<std::size_t>(vector_grad_->size()));
  const std::size_t size = value().size();
  require(g.size() == size, fmt::format("gradient size of {}", name_), g.size(),
          fmt::format("must equal the parameter's size = {} (run the backward before the step)", size));
  return g;
}

// ---- AdamW -----------------------------------------------------------------------------------------

void AdamWConfig::validate() const {
  require(std::isfinite(lr) && lr >= 0, "lr", lr, "must be finite and >= 0");
  require(beta1 >= 0 && beta1 < 1, "beta1", beta1, "must be in [0, 1)");
  require(beta2 >= 0 && beta2 < 1, "beta2", beta2, "must be in [0, 1)");
  require(std::isfinite(eps) && eps >= 0, "eps", eps, "must be finite and >= 0");
  require(std::isfinite(weight_decay) && weight_decay >= 0, "weight_decay", weight_decay, "must be finite and >= 0");
}

AdamW::AdamW(std::vector<ParamRef> params, const AdamWConfig& config) : params_(std::move(params)), config_(config) {
  config_.validate();
  std::set<std::string> names;
  for (const ParamRef& p : params_) {
    require(names.insert(p.name()).second, "parameter name", p.name(), "appears twice in the list");
    const std::size_t size = p.value().size();
    state_.push_back(AdamWState{.exp_avg = std::vector<float>(size, 0.0f),
                                .exp_avg_sq = std::vector<float>(size, 0.0f),
                                .step = 0});
  }
}

void AdamW::step() { step(config_.lr); }

void AdamW::step(double lr) {
  require(std::isfinite(lr) && lr >= 0, "lr", lr, "must be finite and >= 0");
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const ParamRef& param = params_[i];
    AdamWState& state = state_[i];
    const std::span<float> p = param.value();
    const std::span<const float> g = param.grad();
    require(state.exp_avg.size() == p.size() && state.exp_avg_sq.size() == p.size(),
            fmt::format("AdamW state size of {}", param.name()),
            fmt::format("({}, {})", state.exp_avg.size(), state.exp_avg_sq.size()),
            fmt::format("must equal the parameter's size = {}", p.size()));
    require(state.step >= 0, fmt::format("AdamW step of {}", param.name()), state.step, "must be >= 0");

    state.step += 1;
    const double t = static_cast<double>(state.step);
    // The scalars as PyTorch computes them (Python floats, i.e. double), rounded once to float.
    const float decay = static_cast<float>(1.0 - lr * config_.weight_decay);
    const float b1 = static_cast<float>(config_.beta1);
    const float b2 = static_cast<float>(config_.beta2);
    const float one_minus_b1 = static_cast<float>(1.0 - config_.beta1);
    const float one_minus_b2 = static_cast<float>(1.0 - config_.beta2);
    const float step_size = static_cast<float>(lr / (1.0 - std::pow(config_.beta1, t)));  // lr / (1 - b1^t)
    const float bias2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(config_.beta2, t)));
    const float eps = static_cast<float>(config_.eps);
    float* m = state.exp_avg.data();
    float* v = state.exp_avg_sq.data();
    for (std::size_t j = 0; j < p.size(); ++j) {
      if (param.weight_decay()) p[j] *= decay;
      m[j] = m[j] * b1 + one_minus_b1 * g[j];
      v[j] = v[j] * b2 + one_minus_b2 * g[j] * g[j];
      const float denom = std::sqrt(v[j]) / bias2_sqrt + eps;  // sqrt(v_hat) + eps
      p[j] += -step_size * m[j] / denom;                        // - lr m_hat / (sqrt(v_hat) + eps)
    }
  }
}

// ---- Learning-rate schedule ---------------------------------------------------------------------------

void LrScheduleConfig::validate() const {
  require(std::isfinite(lr) && lr > 0, "lr", lr, "must be finite and > 0");
  require(std::isfinite(min_lr) && min_lr >= 0 && min_lr <= lr, "min_lr", min_lr,
          fmt::format("must be in [0, lr = {}]", lr));
  require(total_steps >= 1, "total_steps", total_steps, "must be positive");
  require(warmup_steps >= 0 && warmup_steps <= total_steps, "warmup_steps", warmup_steps,
          fmt::format("must be in [0, total_steps = {}]", total_steps));
}

double learning_rate(const LrScheduleConfig& config, std::int64_t step) {
  config.validate();
  require(step >= 0, "step", step, "must be >= 0");
  if (step < config.warmup_steps)
    return config.lr * static_cast<double>(step + 1) / static_cast<double>(config.warmup_steps);
  if (step >= config.total_steps) return config.min_lr;
  const double ratio = static_cast<double>(step - config.warmup_steps) /
                       static_cast<double>(config.total_steps - config.warmup_steps);  // in [0, 1)
  const double coefficient = 0.5 * (1.0 + std::cos(std::numbers::pi * ratio));         // from 1 down towards 0
  return config.min_lr + coefficient * (config.lr - config.min_lr);
}

// ---- Gradient clipping ---------------------------------------------------------------------------------

double clip_grad_norm(std::span<const ParamRef> params, double max_norm) {
  require(max_norm > 0, "max_norm", max_norm, "must be > 0 (infinity: measure only)");
  double squares = 0.0;
  for (const ParamRef& param : params) {
    for (const float g : param.grad()) squares += static_cast<double>(g) * static_cast<double>(g);
  }
  const double total = std::sqrt(squares);
  if (!std::isfinite(total)) return total;  // the caller decides; nothing is scaled
  const double coef = max_norm / (total + 1e-6);
  if (coef < 1.0) {
    const float scale = static_cast<float>(coef);
    for (const ParamRef& param : params) {
      for (float& g : param.grad()) g *= scale;
    }
  }
  return total;
}

}  // namespace moelab
