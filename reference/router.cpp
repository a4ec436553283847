// moelab/reference/router.cpp — see router.h. T = tokens, C = channels, E = experts.
#include "reference/router.h"

#include "reference/error.h"
#include "reference/math.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

namespace moelab {
namespace {

template <typename Scalar>
void check_params(const RouterParamsT<Scalar>& params, const RouterConfig& config) {
  const Index C = config.hidden_size;
  const Index E = config.num_experts;
  require_shape(params.weight, E, C, "weight shape", "(num_experts, hidden_size)");
  if (config.use_bias) {
    require(params.bias.size() == E, "bias size", params.bias.size(),
            fmt::format("must equal num_experts = {} when use_bias", E));
  } else {
    require(params.bias.size() == 0, "bias size", params.bias.size(),
            "must be 0 when use_bias is false (set use_bias to add the bias)");
  }
  if (config.noise == RouterNoise::noisy_topk) {
    require_shape(params.noise_weight, E, C, "noise_weight shape", "(num_experts, hidden_size)",
                  " when noise = noisy_topk");
  }
}

// v rounded to f. For Scalar = double the value goes through float, which may double-round in
// rare ties (a double just off a tie of f rounds onto it in float, then ties to even); a value
// already in the format is exact. Doubles beyond float's range overflow every format anyway, and
// are mapped to inf here because converting them to float is undefined behaviour.
template <typename Scalar>
Scalar round_scalar(Scalar v, Format f) {
  if constexpr (std::is_same_v<Scalar, double>) {
    if (std::abs(v) > std::numeric_limits<float>::max()) {
      v = std::copysign(std::numeric_limits<double>::infinity(), v);
    }
  }
  return static_cast<Scalar>(round_to(static_cast<float>(v), f));
}

// Rounds every element of a matrix or vector to f; fp32 means "no emulated rounding".
template <typename Dense>
void round_in_place(Dense& m, Format f) {
  if (f == Format::fp32) return;
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = round_scalar(m.data()[i], f);
}

// The parameter as the forward multiplies it: `m` itself in fp32, else a rounded copy in storage.
template <typename Dense>
const Dense& in_format(const Dense& m, Format f, Dense& storage) {
  if (f == Format::fp32) return m;
  storage = m;
  round_in_place(storage, f);
  return storage;
}

// Reports non-finite elements of m (an events::numerics event), then throws for the first one
// unless allow_nonfinite. `name` is "x" or "logits".
template <typename Scalar>
void check_finite(const MatrixT<Scalar>& m, std::string_view name, std::string_view rule,
                  const RouterConfig& config, Observer* observer) {
  if (m.allFinite()) [[likely]] return;
  Index nan_count = 0;
  Index inf_count = 0;
  Index first = -1;
  for (Index i = 0; i < m.size(); ++i) {
    const Scalar v = m.data()[i];
    if (std::isfinite(v)) continue;
    (std::isnan(v) ? nan_count : inf_count) += 1;
    if (first < 0) first = i;
  }
  emit(observer, [&](Observer& o) {
    const Stat stats[] = {{"nonfinite_count", static_cast<double>(nan_count + inf_count)},
                          {"nan_count", static_cast<double>(nan_count)},
                          {"inf_count", static_cast<double>(inf_count)},
                          {"in_logits", name == "logits" ? 1.0 : 0.0}};
    o.on_event(Event{.name = events::numerics, .stats = stats});
  });
  if (!config.allow_nonfinite) {
    const Index t = first / m.cols();
    const Index c = first % m.cols();
    fail(fmt::format("{}[{},{}]", name, t, c), m(t, c),
         fmt::format("{} (allow_nonfinite propagates it)", rule));
  }
}

template <typename Scalar>
void emit_logits(Observer* observer, const MatrixT<Scalar>& logits, const RouterConfig& config) {
  emit(observer, [&](Observer& o) {
    // Sums in double; statistics over the finite logits, NaN when there are none.
    constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
    const double max_exp_input = static_cast<double>(format_info(config.dtype).max_exp_input);
    double min = std::numeric_limits<double>::infinity();
    double max = -min;
    double sum = 0.0;
    Index finite = 0;
    Index overflow = 0;  // exp(l) overflows dtype: a naive softmax in dtype gives inf / NaN
    for (Index i = 0; i < logits.size(); ++i) {
      const double v = static_cast<double>(logits.data()[i]);
      if (v > max_exp_input) ++overflow;  // +inf counts, NaN does not
      if (!std::isfinite(v)) continue;
      ++finite;
      min = std::min(min, v);
      max = std::max(max, v);
      sum += v;
    }
    double mean = kNaN;
    double std_dev = kNaN;
    if (finite > 0) {
      mean = sum / static_cast<double>(finite);
      double squares = 0.0;  // two passes: sum (v - mean)^2 does not cancel as E[v^2] - mean^2 does
      for (Index i = 0; i < logits.size(); ++i) {
        const double v = static_cast<double>(logits.data()[i]);
        if (std::isfinite(v)) squares += (v - mean) * (v - mean);
      }
      std_dev = std::sqrt(squares / static_cast<double>(finite));
    } else {
      min = max = kNaN;
    }
    const Stat stats[] = {{"min", min},
                          {"max", max},
                          {"mean", mean},
                          {"std", std_dev},
                          {"nonfinite_count", static_cast<double>(logits.size() - finite)},
                          {"naive_softmax_overflow_count", static_cast<double>(overflow)}};
    Event event{.name = events::router_logits, .shape = {logits.rows(), logits.cols()}, .stats = stats};
    set_values(event, logits.data(), static_cast<std::size_t>(logits.size()));
    o.on_event(event);
  });
}

}  // namespace

std::string_view router_noise_name(RouterNoise noise) {
  switch (noise) {
    case RouterNoise::none: return "none";
    case RouterNoise::noisy_topk: return "noisy_topk";
    case RouterNoise::jitter: return "jitter";
  }
  fail("noise", static_cast<int>(noise), "is not a known RouterNoise");
}

RouterNoise parse_router_noise(std::string_view name) {
  for (RouterNoise n : {RouterNoise::none, RouterNoise::noisy_topk, RouterNoise::jitter})
    if (router_noise_name(n) == name) return n;
  fail("noise", fmt::format("\"{}\"", name), "must be one of none, noisy_topk, jitter");
}

void RouterConfig::validate() const {
  require(hidden_size > 0, "hidden_size", hidden_size, "must be positive");
  require(num_experts > 0, "num_experts", num_experts, "must be positive");
  // eps < 1 keeps every multiplier positive; !(a && b) also rejects NaN.
  require(jitter_eps >= 0.0 && jitter_eps < 1.0, "jitter_eps", jitter_eps,
          "must lie in [0, 1) (the jitter multipliers U(1 - eps, 1 + eps) must stay positive)");
  require(dtype == Format::fp32 || dtype == Format::bf16 || dtype == Format::fp16, "dtype",
          format_name(dtype), "the router computes in fp32, bf16 or fp16");
}

template <typename Scalar>
void router_forward(MatrixT<Scalar>& logits, RouterCacheT<Scalar>& cache, const MatrixT<Scalar>& x,
                    const RouterParamsT<Scalar>& params, const RouterConfig& config, Rng* rng,
                    Observer* observer) {
  config.validate();
  check_params(params, config);
  const Index T = x.rows();
  const Index C = config.hidden_size;
  const Index E = config.num_experts;
  require(x.cols() == C, "x.cols()", x.cols(), fmt::format("must equal hidden_size = {}", C));
  if (config.noise != RouterNoise::none && rng == nullptr) {
    fail("rng", "null", fmt::format("noise = {} draws random numbers: pass an Rng",
                                    router_noise_name(config.noise)));
  }
  check_finite(x, "x", "router input must be finite", config, observer);

  // Switch Transformer's input jitter: x * U(1 - eps, 1 + eps), elementwise, row-major draws.
  if (config.noise == RouterNoise::jitter) {
    const double eps = config.jitter_eps;
    cache.jitter.resize(T, C);
    for (Index i = 0; i < cache.jitter.size(); ++i) {
      cache.jitter.data()[i] = static_cast<Scalar>(rng->uniform(1.0 - eps, 1.0 + eps));
    }
    cache.input = x.cwiseProduct(cache.jitter);
  } else {
    cache.jitter.resize(0, 0);
    cache.input = x;
  }
  round_in_place(cache.input, config.dtype);

  MatrixT<Scalar> weight_storage;
  const MatrixT<Scalar>& weight = in_format(params.weight, config.dtype, weight_storage);
  logits.resize(T, E);
  logits.noalias() = cache.input * weight.transpose();  // (T, C) (C, E)
  if (config.use_bias) {
    VectorT<Scalar> bias_storage;
    const VectorT<Scalar>& bias = in_format(params.bias, config.dtype, bias_storage);
    logits.rowwise() += bias.transpose();
  }

  // Shazeer et al. 2017, eq. 4: H(x)_i = (x W_g)_i + StandardNormal() * Softplus((x W_noise)_i).
  if (config.noise == RouterNoise::noisy_topk) {
    cache.noise.resize(T, E);
    for (Index i = 0; i < cache.noise.size(); ++i) {
      cache.noise.data()[i] = static_cast<Scalar>(rng->normal());
    }
    MatrixT<Scalar> noise_weight_storage;
    const MatrixT<Scalar>& noise_weight =
        in_format(params.noise_weight, config.dtype, noise_weight_storage);
    cache.noise_logits.resize(T, E);
    cache.noise_logits.noalias() = cache.input * noise_weight.transpose();  // (T, C) (C, E)
    for (Index i = 0; i < logits.size(); ++i) {
      logits.data()[i] += cache.noise.data()[i] * softplus(cache.noise_logits.data()[i]);
    }
  } else {
    cache.noise.resize(0, 0);
    cache.noise_logits.resize(0, 0);
  }
  round_in_place(logits, config.dtype);

  check_finite(logits, "logits",
               fmt::format("router logits must be finite in {}", format_name(config.dtype)), config,
               observer);
  emit_logits(observer, logits, config);
}

template <typename Scalar>
void router_backward(MatrixT<Scalar>& dx, RouterParamsT<Scalar>& dparams,
                     const MatrixT<Scalar>& dlogits, const RouterCacheT<Scalar>& cache,
                     const MatrixT<Scalar>& x, const RouterParamsT<Scalar>& params,
                     const RouterConfig& config) {
  config.validate();
  check_params(params, config);
  const Index T = x.rows();
  const Index C = config.hidden_size;
  const Index E = config.num_experts;
  require(x.cols() == C, "x.cols()", x.cols(), fmt::format("must equal hidden_size = {}", C));
  require_shape(dlogits, T, E, "dlogits shape", "(T, E)");
  constexpr std::string_view kFromForward = " (pass the cache of the router_forward that made the logits)";
  require_shape(cache.input, T, C, "cache.input shape", "(T, C)", kFromForward);
  if (config.noise == RouterNoise::jitter) {
    require_shape(cache.jitter, T, C, "cache.jitter shape", "(T, C)", kFromForward);
  }
  if (config.noise == RouterNoise::noisy_topk) {
    require_shape(cache.noise, T, E, "cache.noise shape", "(T, E)", kFromForward);
    require_shape(cache.noise_logits, T, E, "cache.noise_logits shape", "(T, E)", kFromForward);
  }

  // Straight-through: each rounding of the forward is the identity here, so the gradients use the
  // rounded values the forward multiplied (cache.input is already rounded).
  MatrixT<Scalar> weight_storage;
  const MatrixT<Scalar>& weight = in_format(params.weight, config.dtype, weight_storage);
  MatrixT<Scalar> dinput(T, C);                                  // d loss / d cache.input
  dinput.noalias() = dlogits * weight;                           // (T, E) (E, C)
  dparams.weight.resize(E, C);
  dparams.weight.noalias() = dlogits.transpose() * cache.input;  // (E, T) (T, C)
  if (config.use_bias) {
    dparams.bias = dlogits.colwise().sum().transpose();          // (E)
  } else {
    dparams.bias.resize(0);
  }

  if (config.noise == RouterNoise::noisy_topk) {
    // logits += noise * softplus(z), z = x_r W_noise_r^T:  dZ = G * noise * sigmoid(z).
    MatrixT<Scalar> dz(T, E);
    for (Index i = 0; i < dz.size(); ++i) {
      dz.data()[i] = dlogits.data()[i] * cache.noise.data()[i] * sigmoid(cache.noise_logits.data()[i]);
    }
    MatrixT<Scalar> noise_weight_storage;
    const MatrixT<Scalar>& noise_weight =
        in_format(params.noise_weight, config.dtype, noise_weight_storage);
    dinput.noalias() += dz * noise_weight;                                // (T, E) (E, C)
    dparams.noise_weight.resize(E, C);
    dparams.noise_weight.noalias() = dz.transpose() * cache.input;        // (E, T) (T, C)
  } else {
    // The noise path did not contribute: a zero gradient, shaped like the parameter.
    dparams.noise_weight.setZero(params.noise_weight.rows(), params.noise_weight.cols());
  }

  // input = x * jitter, with the multipliers held fixed (they are samples, not parameters).
  if (config.noise == RouterNoise::jitter) {
    dx = dinput.cwiseProduct(cache.jitter);
  } else {
    dx = std::move(dinput);
  }
}

template void router_forward<float>(Matrix&, RouterCache&, const Matrix&, const RouterParams&,
                                    const RouterConfig&, Rng*, Observer*);
template void router_forward<double>(MatrixD&, RouterCacheT<double>&, const MatrixD&,
                                     const RouterParamsT<double>&, const RouterConfig&, Rng*,
                                     Observer*);
template void router_backward<float>(Matrix&, RouterParams&, const Matrix&, const RouterCache&,
                                     const Matrix&, const RouterParams&, const RouterConfig&);
template void router_backward<double>(MatrixD&, RouterParamsT<double>&, const MatrixD&,
                                      const RouterCacheT<double>&, const MatrixD&,
                                      const RouterParamsT<double>&, const RouterConfig&);

}  // namespace moelab
