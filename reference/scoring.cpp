// moelab/reference/scoring.cpp — see scoring.h. T = tokens, E = experts.
#include "reference/scoring.h"

#include "reference/error.h"

#include <fmt/format.h>

#include <cmath>
#include <limits>
#include <span>
#include <type_traits>

namespace moelab {

template <typename Scalar>
void softmax_forward(MatrixT<Scalar>& probs, const MatrixT<Scalar>& logits, Observer* observer) {
  const Index T = logits.rows();
  const Index E = logits.cols();
  if (E < 1) fail("logits.cols()", E, "the number of experts E must be at least 1");
  // One NaN logit would turn its row into NaN; an infinite one makes l - max = inf - inf. A NaN or
  // an infinity makes the sum non-finite, so one vectorised sum screens the input and only then
  // (or when a sum of finite logits overflowed) are the elements searched one by one.
  if (!std::isfinite(logits.sum())) [[unlikely]] {
    for (Index t = 0; t < T; ++t) {
      for (Index e = 0; e < E; ++e) {
        if (!std::isfinite(logits(t, e))) {
          fail(fmt::format("logits[{},{}]", t, e), logits(t, e), "router logits must be finite");
        }
      }
    }
  }
  probs.resize(T, E);
  for (Index t = 0; t < T; ++t) {
    const Scalar max_logit = logits.row(t).maxCoeff();
    probs.row(t).array() = (logits.row(t).array() - max_logit).exp();  // (E) in [0, 1]
    probs.row(t) /= probs.row(t).sum();                                  // sum >= 1: no 0/0
  }

  emit(observer, [&](Observer& o) {
    // Per-token values in Scalar, their means over tokens in double; a mean over none is NaN.
    constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
    // p log p -> 0 as p -> 0; taking the log of max(p, tiny) gives 0 * finite = 0 at p = 0.
    constexpr Scalar kTiny = std::numeric_limits<Scalar>::denorm_min();
    double min = kNaN, max = kNaN, max_prob_mean = kNaN, entropy_mean = kNaN;
    if (T > 0) {
      min = static_cast<double>(probs.minCoeff());
      max = static_cast<double>(probs.maxCoeff());
      double max_prob_sum = 0.0;
      double entropy_sum = 0.0;  // sum_t H_t, H_t = -sum_e p_te log p_te (nats)
      for (Index t = 0; t < T; ++t) {
        max_prob_sum += static_cast<double>(probs.row(t).maxCoeff());
        entropy_sum -= static_cast<double>(
            (probs.row(t).array() * probs.row(t).array().max(kTiny).log()).sum());
      }
      max_prob_mean = max_prob_sum / static_cast<double>(T);
      entropy_mean = entropy_sum / static_cast<double>(T);
    }
    const Stat stats[] = {{"min", min},
                          {"max", max},
                          {"max_prob_mean", max_prob_mean},
                          {"entropy_mean", entropy_mean}};
    Event event{.name = events::scores, .shape = {T, E}, .stats = stats};
    const std::span<const Scalar> values(probs.data(), static_cast<std::size_t>(probs.size()));
    if constexpr (std::is_same_v<Scalar, float>) {
      event.f32 = values;
    } else {
      event.f64 = values;
    }
    o.on_event(event);
  });
}

template <typename Scalar>
void softmax_backward(MatrixT<Scalar>& dlogits, const MatrixT<Scalar>& probs,
                      const MatrixT<Scalar>& dprobs) {
  if (dprobs.rows() != probs.rows() || dprobs.cols() != probs.cols()) {
    fail("dprobs shape", fmt::format("({}, {})", dprobs.rows(), dprobs.cols()),
         fmt::format("must equal the probs shape ({}, {})", probs.rows(), probs.cols()));
  }
  const Index T = probs.rows();
  const Index E = probs.cols();
  dlogits.resize(T, E);
  for (Index t = 0; t < T; ++t) {
    const Scalar dot = dprobs.row(t).dot(probs.row(t));  // sum_j dp_tj p_tj
    dlogits.row(t).array() = probs.row(t).array() * (dprobs.row(t).array() - dot);
  }
}

template void softmax_forward<float>(Matrix&, const Matrix&, Observer*);
template void softmax_forward<double>(MatrixD&, const MatrixD&, Observer*);
template void softmax_backward<float>(Matrix&, const Matrix&, const Matrix&);
template void softmax_backward<double>(MatrixD&, const MatrixD&, const MatrixD&);

}  // namespace moelab
