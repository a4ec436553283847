// moelab/reference/experts.cpp — see experts.h. n = rows given to one expert, C = hidden size,
// H = intermediate size.
#include "reference/experts.h"

#include "reference/error.h"
#include "reference/math.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>
#include <string>

namespace moelab {
namespace {

constexpr std::string_view kGateOnly = "only the swiglu variants have a gate projection";

// A bias is present exactly when the config uses it: size `size` (named `what`) if `used`, else 0.
template <typename Scalar>
void require_bias(const VectorT<Scalar>& b, bool used, Index size, std::string_view field,
                  std::string_view what, const ExpertConfig& config) {
  if (used) {
    require(b.size() == size, field, b.size(), fmt::format("must equal {} = {} when use_bias", what, size));
  } else if (config.use_bias) {  // use_bias, but this activation has no such projection
    require(b.size() == 0, field, b.size(),
            fmt::format("must be 0 for activation = {} ({})", activation_name(config.activation), kGateOnly));
  } else {
    require(b.size() == 0, field, b.size(), "must be 0 when use_bias is false (set use_bias to add the bias)");
  }
}

template <typename Scalar>
void check_params(const ExpertParamsT<Scalar>& params, const ExpertConfig& config) {
  const Index C = config.hidden_size;
  const Index H = config.intermediate_size;
  const bool gated = is_gated(config.activation);
  if (gated) {
    require_shape(params.w_gate, H, C, "w_gate shape", "(intermediate_size, hidden_size)");
  } else if (params.w_gate.size() != 0) {
    fail("w_gate shape", shape_of(params.w_gate),
         fmt::format("must be (0, 0) for activation = {} ({})", activation_name(config.activation), kGateOnly));
  }
  require_shape(params.w_up, H, C, "w_up shape", "(intermediate_size, hidden_size)");
  require_shape(params.w_down, C, H, "w_down shape", "(hidden_size, intermediate_size)");
  require_bias(params.b_gate, config.use_bias && gated, H, "b_gate size", "intermediate_size", config);
  require_bias(params.b_up, config.use_bias, H, "b_up size", "intermediate_size", config);
  require_bias(params.b_down, config.use_bias, C, "b_down size", "hidden_size", config);
}

// ---- the activations and their derivatives, elementwise ----------------------------------------

// silu(z) = z sigmoid(z) (Hendrycks & Gimpel's SiLU, "swish" with beta = 1).
template <typename Scalar>
Scalar silu(Scalar z) {
  return z * sigmoid(z);
}
// silu'(z) = s + z s (1 - s) = s (1 + z (1 - s)), s = sigmoid(z).
template <typename Scalar>
Scalar silu_grad(Scalar z) {
  const Scalar s = sigmoid(z);
  return s * (Scalar(1) + z * (Scalar(1) - s));
}

// Exact GELU, z Phi(z) with Phi(z) = (1 + erf(z / sqrt 2)) / 2: the formula torch.nn.GELU() uses.
template <typename Scalar>
Scalar gelu_cdf(Scalar z) {
  return Scalar(0.5) * (Scalar(1) + std::erf(z / std::numbers::sqrt2_v<Scalar>));
}
template <typename Scalar>
Scalar gelu(Scalar z) {
  return z * gelu_cdf(z);
}
// gelu'(z) = Phi(z) + z phi(z), phi(z) = e^(-z^2 / 2) / sqrt(2 pi).
template <typename Scalar>
Scalar gelu_grad(Scalar z) {
  const Scalar inv_sqrt_2pi = std::numbers::inv_sqrtpi_v<Scalar> / std::numbers::sqrt2_v<Scalar>;
  return gelu_cdf(z) + z * inv_sqrt_2pi * std::exp(Scalar(-0.5) * z * z);
}

// relu'(0) = 0, as PyTorch (the gradient flows where the output is positive).
template <typename Scalar>
Scalar relu(Scalar z) {
  return z > Scalar(0) ? z : Scalar(0);
}
template <typename Scalar>
Scalar relu_grad(Scalar z) {
  return z > Scalar(0) ? Scalar(1) : Scalar(0);
}

// gpt-oss's gate activation: glu(z) = z sigmoid(alpha z); glu'(z) = s + alpha z s (1 - s).
template <typename Scalar>
Scalar glu(Scalar z, Scalar alpha) {
  return z * sigmoid(alpha * z);
}
template <typename Scalar>
Scalar glu_grad(Scalar z, Scalar alpha) {
  const Scalar s = sigmoid(alpha * z);
  return s + alpha * z * s * (Scalar(1) - s);
}

// Statistics of h for events::expert_hidden (see experts.h), summed in double.
template <typename Scalar>
void emit_hidden(Observer* observer, const ExpertCacheT<Scalar>& cache, const ExpertConfig& config) {
  emit(observer, [&](Observer& o) {
    const MatrixT<Scalar>& h = cache.hidden;
    double squares = 0.0;
    double abs_max = 0.0;
    Index zeros = 0;
    for (Index i = 0; i < h.size(); ++i) {
      const double v = static_cast<double>(h.data()[i]);
      squares += v * v;
      abs_max = std::max(abs_max, std::abs(v));
      zeros += v == 0.0;
    }
    Index gate_clamped = 0;
    Index up_clamped = 0;
    if (config.activation == Activation::swiglu_clamped) {
      const Scalar limit = static_cast<Scalar>(config.swiglu_limit);
      for (Index i = 0; i < h.size(); ++i) {
        gate_clamped += cache.gate_pre.data()[i] > limit;
        up_clamped += std::abs(cache.up_pre.data()[i]) > limit;
      }
    }
    constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
    const double count = static_cast<double>(h.size());
    const bool empty = h.size() == 0;
    const Stat stats[] = {{"rows", static_cast<double>(h.rows())},
                          {"hidden_rms", empty ? kNaN : std::sqrt(squares / count)},
                          {"hidden_abs_max", empty ? kNaN : abs_max},
                          {"zero_fraction", empty ? kNaN : static_cast<double>(zeros) / count},
                          {"gate_clamped", static_cast<double>(gate_clamped)},
                          {"up_clamped", static_cast<double>(up_clamped)}};
    o.on_event(Event{.name = events::expert_hidden, .stats = stats});
  });
}

}  // namespace

std::string_view activation_name(Activation activation) {
  switch (activation) {
    case Activation::swiglu: return "swiglu";
    case Activation::gelu: return "gelu";
    case Activation::relu: return "relu";
    case Activation::swiglu_clamped: return "swiglu_clamped";
  }
  fail("activation", static_cast<int>(activation), "is not a known Activation");
}

Activation parse_activation(std::string_view name) {
  for (const Activation a : {Activation::swiglu, Activation::gelu, Activation::relu, Activation::swiglu_clamped}) {
    if (activation_name(a) == name) return a;
  }
  fail("activation", fmt::format("\"{}\"", name), "must be one of swiglu, gelu, relu, swiglu_clamped");
}

bool is_gated(Activation activation) {
  return activation == Activation::swiglu || activation == Activation::swiglu_clamped;
}

void ExpertConfig::validate() const {
  require(hidden_size > 0, "hidden_size", hidden_size, "must be positive");
  require(intermediate_size > 0, "intermediate_size", intermediate_size, "must be positive");
  activation_name(activation);  // throws for a value outside the enum
  require(std::isfinite(swiglu_limit) && swiglu_limit > 0, "swiglu_limit", swiglu_limit,
          "must be finite and > 0");
  require(std::isfinite(swiglu_alpha) && swiglu_alpha > 0, "swiglu_alpha", swiglu_alpha,
          "must be finite and > 0");
}

template <typename Scalar>
void expert_forward(MatrixT<Scalar>& y, ExpertCacheT<Scalar>& cache, const MatrixT<Scalar>& x,
                    const ExpertParamsT<Scalar>& params, const ExpertConfig& config, Observer* observer) {
  config.validate();
  check_params(params, config);
  const Index n = x.rows();
  const Index C = config.hidden_size;
  const Index H = config.intermediate_size;
  require(x.cols() == C, "x.cols()", x.cols(), fmt::format("must equal hidden_size = {}", C));

  cache.up_pre.resize(n, H);
  cache.up_pre.noalias() = x * params.w_up.transpose();  // (n, C) (C, H)
  if (config.use_bias) cache.up_pre.rowwise() += params.b_up.transpose();
  if (is_gated(config.activation)) {
    cache.gate_pre.resize(n, H);
    cache.gate_pre.noalias() = x * params.w_gate.transpose();  // (n, C) (C, H)
    if (config.use_bias) cache.gate_pre.rowwise() += params.b_gate.transpose();
  } else {
    cache.gate_pre.resize(0, 0);
  }

  cache.hidden.resize(n, H);
  Scalar* h = cache.hidden.data();
  const Scalar* u = cache.up_pre.data();  // a, for gelu / relu
  const Scalar* g = cache.gate_pre.data();
  switch (config.activation) {
    case Activation::swiglu:
      for (Index i = 0; i < n * H; ++i) h[i] = silu(g[i]) * u[i];
      break;
    case Activation::gelu:
      for (Index i = 0; i < n * H; ++i) h[i] = gelu(u[i]);
      break;
    case Activation::relu:
      for (Index i = 0; i < n * H; ++i) h[i] = relu(u[i]);
      break;
    case Activation::swiglu_clamped: {
      const Scalar limit = static_cast<Scalar>(config.swiglu_limit);
      const Scalar alpha = static_cast<Scalar>(config.swiglu_alpha);
      for (Index i = 0; i < n * H; ++i) {
        h[i] = glu(std::min(g[i], limit), alpha) * (std::clamp(u[i], -limit, limit) + Scalar(1));
      }
      break;
    }
  }

  expert_down_projection(y, cache.hidden, params, config);
  emit_hidden(observer, cache, config);
}

template <typename Scalar>
void expert_down_projection(MatrixT<Scalar>& y, const MatrixT<Scalar>& hidden, const ExpertParamsT<Scalar>& params,
                            const ExpertConfig& config) {
  y.resize(hidden.rows(), config.hidden_size);
  y.noalias() = hidden * params.w_down.transpose();  // (n, H) (H, C)
  if (config.use_bias) y.rowwise() += params.b_down.transpose();
}

template <typename Scalar>
void expert_backward(MatrixT<Scalar>& dx, ExpertParamsT<Scalar>& dparams, const MatrixT<Scalar>& dy,
                     const ExpertCacheT<Scalar>& cache, const MatrixT<Scalar>& x,
                     const ExpertParamsT<Scalar>& params, const ExpertConfig& config) {
  config.validate();
  check_params(params, config);
  const Index n = x.rows();
  const Index C = config.hidden_size;
  const Index H = config.intermediate_size;
  const bool gated = is_gated(config.activation);
  require(x.cols() == C, "x.cols()", x.cols(), fmt::format("must equal hidden_size = {}", C));
  require_shape(dy, n, C, "dy shape", "(n, C)");
  constexpr std::string_view kFromForward = " (pass the cache of the expert_forward that made y)";
  if (gated) require_shape(cache.gate_pre, n, H, "cache.gate_pre shape", "(n, H)", kFromForward);
  require_shape(cache.up_pre, n, H, "cache.up_pre shape", "(n, H)", kFromForward);
  require_shape(cache.hidden, n, H, "cache.hidden shape", "(n, H)", kFromForward);

  // y = h Wd^T + bd
  dparams.w_down.resize(C, H);
  dparams.w_down.noalias() = dy.transpose() * cache.hidden;  // (C, n) (n, H)
  MatrixT<Scalar> dh(n, H);
  dh.noalias() = dy * params.w_down;                         // (n, C) (C, H)

  // Through the activation, elementwise: du = dL/d up_pre (a for gelu / relu), dg = dL/d gate_pre.
  MatrixT<Scalar> du(n, H);
  MatrixT<Scalar> dg(gated ? n : 0, gated ? H : 0);
  const Scalar* u = cache.up_pre.data();
  const Scalar* g = cache.gate_pre.data();
  switch (config.activation) {
    case Activation::swiglu:
      for (Index i = 0; i < n * H; ++i) {
        dg.data()[i] = dh.data()[i] * u[i] * silu_grad(g[i]);
        du.data()[i] = dh.data()[i] * silu(g[i]);
      }
      break;
    case Activation::gelu:
      for (Index i = 0; i < n * H; ++i) du.data()[i] = dh.data()[i] * gelu_grad(u[i]);
      break;
    case Activation::relu:
      for (Index i = 0; i < n * H; ++i) du.data()[i] = dh.data()[i] * relu_grad(u[i]);
      break;
    case Activation::swiglu_clamped: {
      // A clamp passes the gradient within its limits (limits included, as torch.clamp), else 0.
      const Scalar limit = static_cast<Scalar>(config.swiglu_limit);
      const Scalar alpha = static_cast<Scalar>(config.swiglu_alpha);
      for (Index i = 0; i < n * H; ++i) {
        const Scalar gc = std::min(g[i], limit);
        const Scalar uc = std::clamp(u[i], -limit, limit);
        const bool g_passes = g[i] <= limit;
        const bool u_passes = -limit <= u[i] && u[i] <= limit;
        dg.data()[i] = g_passes ? dh.data()[i] * (uc + Scalar(1)) * glu_grad(gc, alpha) : Scalar(0);
        du.data()[i] = u_passes ? dh.data()[i] * glu(gc, alpha) : Scalar(0);
      }
      break;
    }
  }

  // up_pre = x Wu^T + bu, gate_pre = x Wg^T + bg
  dparams.w_up.resize(H, C);
  dparams.w_up.noalias() = du.transpose() * x;  // (H, n) (n, C)
  dx.resize(n, C);
  dx.noalias() = du * params.w_up;              // (n, H) (H, C)
  if (gated) {
    dparams.w_gate.resize(H, C);
    dparams.w_gate.noalias() = dg.transpose() * x;  // (H, n) (n, C)
    dx.noalias() += dg * params.w_gate;             // (n, H) (H, C)
  } else {
    dparams.w_gate.resize(0, 0);
  }

  if (config.use_bias) {
    dparams.b_down = dy.colwise().sum().transpose();  // (C)
    dparams.b_up = du.colwise().sum().transpose();    // (H)
    if (gated) {
      dparams.b_gate = dg.colwise().sum().transpose();  // (H)
    } else {
      dparams.b_gate.resize(0);
    }
  } else {
    dparams.b_gate.resize(0);
    dparams.b_up.resize(0);
    dparams.b_down.resize(0);
  }
}

template <typename Scalar>
ExpertParamsT<Scalar> init_expert(const ExpertConfig& config, Rng& rng, double init_std) {
  config.validate();
  require(std::isfinite(init_std) && init_std >= 0, "init_std", init_std, "must be finite and >= 0");
  const Index C = config.hidden_size;
  const Index H = config.intermediate_size;
  const auto draw = [&](Index rows, Index cols) {  // row-major N(0, init_std^2)
    MatrixT<Scalar> m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(init_std * rng.normal());
    return m;
  };
  const bool gated = is_gated(config.activation);
  ExpertParamsT<Scalar> p;
  if (gated) p.w_gate = draw(H, C);
  p.w_up = draw(H, C);
  p.w_down = draw(C, H);
  if (config.use_bias) {
    if (gated) p.b_gate.setZero(H);
    p.b_up.setZero(H);
    p.b_down.setZero(C);
  }
  return p;
}

ExpertConfig segmented_config(const ExpertConfig& config, int m) {
  config.validate();
  require(m >= 1, "m", m, "the segmentation factor must be positive");
  if (config.intermediate_size % m != 0) {
    fail("intermediate_size", config.intermediate_size,
         fmt::format("not divisible by the segmentation factor m = {}", m));
  }
  ExpertConfig segmented = config;
  segmented.intermediate_size = config.intermediate_size / m;
  return segmented;
}

template <typename Scalar>
std::vector<ExpertParamsT<Scalar>> segment_expert(const ExpertParamsT<Scalar>& expert,
                                                  const ExpertConfig& config, int m) {
  const ExpertConfig segmented = segmented_config(config, m);
  check_params(expert, config);
  const Index C = config.hidden_size;
  const Index Hm = segmented.intermediate_size;  // H / m
  const bool gated = is_gated(config.activation);
  std::vector<ExpertParamsT<Scalar>> segments(static_cast<std::size_t>(m));
  for (int j = 0; j < m; ++j) {
    ExpertParamsT<Scalar>& s = segments[static_cast<std::size_t>(j)];
    const Index first = j * Hm;
    if (gated) s.w_gate = expert.w_gate.middleRows(first, Hm);  // (H/m, C)
    s.w_up = expert.w_up.middleRows(first, Hm);                 // (H/m, C)
    s.w_down = expert.w_down.middleCols(first, Hm);             // (C, H/m)
    if (config.use_bias) {
      if (gated) s.b_gate = expert.b_gate.segment(first, Hm);   // (H/m)
      s.b_up = expert.b_up.segment(first, Hm);                  // (H/m)
      // The outputs are summed, so the down bias counts once: segment 0 keeps it.
      if (j == 0) {
        s.b_down = expert.b_down;
      } else {
        s.b_down.setZero(C);
      }
    }
  }
  return segments;
}

std::int64_t expert_parameters(const ExpertConfig& config) {
  config.validate();
  const std::int64_t C = config.hidden_size;
  const std::int64_t H = config.intermediate_size;
  const bool gated = is_gated(config.activation);
  const std::int64_t weights = (gated ? 3 : 2) * C * H;
  const std::int64_t biases = config.use_bias ? (gated ? 2 : 1) * H + C : 0;
  return weights + biases;
}

std::int64_t expert_flops_per_token(const ExpertConfig& config) {
  config.validate();
  const std::int64_t C = config.hidden_size;
  const std::int64_t H = config.intermediate_size;
  return 2 * (is_gated(config.activation) ? 3 : 2) * C * H;  // one multiply-add per weight
}

template <typename Scalar>
void shared_gate_forward(MatrixT<Scalar>& y, VectorT<Scalar>& gate, const MatrixT<Scalar>& x,
                         const MatrixT<Scalar>& w, const MatrixT<Scalar>& shared_out) {
  const Index n = x.rows();
  const Index C = x.cols();
  require_shape(w, 1, C, "w shape", "(1, C)");
  require_shape(shared_out, n, C, "shared_out shape", "(n, C)");
  gate.resize(n);
  gate.noalias() = x * w.transpose();  // (n, C) (C, 1)
  for (Index t = 0; t < n; ++t) gate(t) = sigmoid(gate(t));
  y.resize(n, C);
  y.noalias() = gate.asDiagonal() * shared_out;  // row t scaled by gate_t
}

template <typename Scalar>
void shared_gate_backward(MatrixT<Scalar>& dx, MatrixT<Scalar>& dw, MatrixT<Scalar>& dshared_out,
                          const MatrixT<Scalar>& dy, const VectorT<Scalar>& gate, const MatrixT<Scalar>& x,
                          const MatrixT<Scalar>& w, const MatrixT<Scalar>& shared_out) {
  const Index n = x.rows();
  const Index C = x.cols();
  require_shape(w, 1, C, "w shape", "(1, C)");
  require_shape(shared_out, n, C, "shared_out shape", "(n, C)");
  require_shape(dy, n, C, "dy shape", "(n, C)");
  require(gate.size() == n, "gate size", gate.size(),
          fmt::format("must equal n = {} (pass the gate of the shared_gate_forward that made y)", n));
  dshared_out.resize(n, C);
  dshared_out.noalias() = gate.asDiagonal() * dy;
  // dL/dgate_t = dy_t . shared_out_t; sigmoid'(z) = gate (1 - gate).
  VectorT<Scalar> dz = dy.cwiseProduct(shared_out).rowwise().sum();  // (n)
  dz.array() *= gate.array() * (Scalar(1) - gate.array());
  dw.resize(1, C);
  dw.noalias() = dz.transpose() * x;  // (1, n) (n, C)
  dx.resize(n, C);
  dx.noalias() = dz * w;              // (n, 1) (1, C)
}

// ---- explicit instantiations --------------------------------------------------------------------

#define MOELAB_INSTANTIATE_EXPERTS(Scalar)                                                          \
  template void expert_forward<Scalar>(MatrixT<Scalar>&, ExpertCacheT<Scalar>&, const MatrixT<Scalar>&, \
                                       const ExpertParamsT<Scalar>&, const ExpertConfig&, Observer*); \
  template void expert_down_projection<Scalar>(MatrixT<Scalar>&, const MatrixT<Scalar>&,             \
                                               const ExpertParamsT<Scalar>&, const ExpertConfig&);  \
  template void expert_backward<Scalar>(MatrixT<Scalar>&, ExpertParamsT<Scalar>&, const MatrixT<Scalar>&, \
                                        const ExpertCacheT<Scalar>&, const MatrixT<Scalar>&,         \
                                        const ExpertParamsT<Scalar>&, const ExpertConfig&);          \
  template ExpertParamsT<Scalar> init_expert<Scalar>(const ExpertConfig&, Rng&, double);            \
  template std::vector<ExpertParamsT<Scalar>> segment_expert<Scalar>(const ExpertParamsT<Scalar>&,  \
                                                                     const ExpertConfig&, int);     \
  template void shared_gate_forward<Scalar>(MatrixT<Scalar>&, VectorT<Scalar>&, const MatrixT<Scalar>&, \
                                            const MatrixT<Scalar>&, const MatrixT<Scalar>&);         \
  template void shared_gate_backward<Scalar>(MatrixT<Scalar>&, MatrixT<Scalar>&, MatrixT<Scalar>&,  \
                                             const MatrixT<Scalar>&, const VectorT<Scalar>&,         \
                                             const MatrixT<Scalar>&, const MatrixT<Scalar>&,         \
                                             const MatrixT<Scalar>&);

MOELAB_INSTANTIATE_EXPERTS(float)
MOELAB_INSTANTIATE_EXPERTS(double)
#undef MOELAB_INSTANTIATE_EXPERTS

}  // namespace moelab
