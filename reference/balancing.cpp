// moelab/reference/balancing.cpp — see balancing.h. E = experts.
#include "reference/balancing.h"

#include "reference/error.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace moelab {

template <typename Scalar>
void BiasBalancerT<Scalar>::update(std::span<const std::int64_t> load, Observer* observer) {
  const Index E = bias.size();
  require(E >= 1, "bias.size()", E, "the bias needs one entry per expert (E >= 1)");
  require(static_cast<Index>(load.size()) == E, "load.size()", load.size(),
          fmt::format("must equal bias.size() = {} (one token count per expert)", E));
  require(std::isfinite(gamma) && gamma >= 0.0, "gamma", gamma, "must be finite and >= 0");
  std::int64_t total = 0;
  for (Index i = 0; i < E; ++i) {
    const std::int64_t n = load[static_cast<std::size_t>(i)];
    require(n >= 0, fmt::format("load[{}]", i), n, "token counts must be >= 0");
    require(std::isfinite(bias(i)), fmt::format("bias[{}]", i), bias(i), "must be finite");
    total += n;
  }
  const std::int64_t max_load = *std::max_element(load.begin(), load.end());

  // sign(mean - load_i) = sign(total - E * load_i): exact in integers (token counts are far below
  // 2^63 / E), where a floating-point mean such as 4/3 would be rounded.
  const Scalar step = static_cast<Scalar>(gamma);
  for (Index i = 0; i < E; ++i) {
    const std::int64_t difference = total - E * load[static_cast<std::size_t>(i)];
    if (difference > 0) bias(i) += step;  // underloaded: more attractive
    if (difference < 0) bias(i) -= step;  // overloaded: less attractive
  }

  emit(observer, [&](Observer& o) {
    const double mean_load = static_cast<double>(total) / static_cast<double>(E);
    const double imbalance = total > 0 ? static_cast<double>(max_load) / mean_load
                                       : std::numeric_limits<double>::quiet_NaN();
    const Stat stats[] = {{"max_abs_bias", static_cast<double>(bias.cwiseAbs().maxCoeff())},
                          {"load_imbalance", imbalance},
                          {"max_load", static_cast<double>(max_load)},
                          {"mean_load", mean_load}};
    Event event{.name = events::bias, .shape = {E, 1}, .stats = stats};
    set_values(event, bias.data(), static_cast<std::size_t>(E));
    o.on_event(event);
  });
}

template struct BiasBalancerT<float>;
template struct BiasBalancerT<double>;

}  // namespace moelab
