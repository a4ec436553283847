// moelab/reference/scoring.cpp — see scoring.h. T = tokens, E = experts.
#include "reference/scoring.h"

#include <fmt/format.h>

#include <cmath>
#include <limits>

#include "reference/error.h"
#include "reference/math.h"

namespace moelab {
namespace {

// Router logits must be finite: one NaN turns its row into NaN, and an infinite logit makes
// l - max = inf - inf. A NaN or an infinity makes the sum non-finite, so one vectorised sum screens
// the input and only then are the elements searched one by one.
template <typename Scalar>
void require_finite_logits(const MatrixT<Scalar>& logits) {
  if (logits.cols() < 1) fail("logits.cols()", logits.cols(), "the number of experts E must be at least 1");
  if (std::isfinite(logits.sum())) [[likely]] return;
  for (Index t = 0; t < logits.rows(); ++t)
    for (Index e = 0; e < logits.cols(); ++e)
      if (!std::isfinite(logits(t, e)))
        fail(fmt::format("logits[{},{}]", t, e), logits(t, e), "router logits must be finite");
}

template <typename Scalar>
void require_same_shape(const MatrixT<Scalar>& grad, std::string_view grad_name, const MatrixT<Scalar>& like,
                        std::string_view like_name) {
  if (grad.rows() != like.rows() || grad.cols() != like.cols())
    fail(fmt::format("{} shape", grad_name), fmt::format("({}, {})", grad.rows(), grad.cols()),
         fmt::format("must equal the {} shape ({}, {})", like_name, like.rows(), like.cols()));
}

// The scores event of the elementwise scorings: values (T, E), stats min, max, mean.
template <typename Scalar>
void emit_elementwise_scores(Observer* observer, const MatrixT<Scalar>& scores) {
  emit(observer, [&](Observer& o) {
    constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
    const bool empty = scores.size() == 0;
    const Stat stats[] = {{"min", empty ? kNaN : static_cast<double>(scores.minCoeff())},
                          {"max", empty ? kNaN : static_cast<double>(scores.maxCoeff())},
                          {"mean", empty ? kNaN : static_cast<double>(scores.mean())}};
    Event event{.name = events::scores, .shape = {scores.rows(), scores.cols()}, .stats = stats};
    set_values(event, scores.data(), static_cast<std::size_t>(scores.size()));
    o.on_event(event);
  });
}

}  // namespace

std::string_view scoring_name(Scoring s) {
  switch (s) {
    case Scoring::softmax: return "softmax";
    case Scoring::sigmoid: return "sigmoid";
    case Scoring::sqrt_softplus: return "sqrt_softplus";
  }
  fail("scoring", static_cast<int>(s), "is not a known Scoring");
}

Scoring parse_scoring(std::string_view name) {
  for (Scoring s : {Scoring::softmax, Scoring::sigmoid, Scoring::sqrt_softplus})
    if (scoring_name(s) == name) return s;
  fail("scoring", fmt::format("\"{}\"", name), "must be one of softmax, sigmoid, sqrt_softplus");
}

template <typename Scalar>
void softmax_forward(MatrixT<Scalar>& probs, const MatrixT<Scalar>& logits, Observer* observer) {
  require_finite_logits(logits);
  const Index T = logits.rows();
  const Index E = logits.cols();
  probs.resize(T, E);
  for (Index t = 0; t < T; ++t) {
    const Scalar max_logit = logits.row(t).maxCoeff();
    probs.row(t).array() = (logits.row(t).array() - max_logit).unaryExpr(StdExp{});  // (E) in [0, 1]
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
        entropy_sum -= static_cast<double>((probs.row(t).array() * probs.row(t).array().max(kTiny).unaryExpr(StdLog{})).sum());
      }
      max_prob_mean = max_prob_sum / static_cast<double>(T);
      entropy_mean = entropy_sum / static_cast<double>(T);
    }
    const Stat stats[] = {
        {"min", min}, {"max", max}, {"max_prob_mean", max_prob_mean}, {"entropy_mean", entropy_mean}};
    Event event{.name = events::scores, .shape = {T, E}, .stats = stats};
    set_values(event, probs.data(), static_cast<std::size_t>(probs.size()));
    o.on_event(event);
  });
}

template <typename Scalar>
void softmax_backward(MatrixT<Scalar>& dlogits, const MatrixT<Scalar>& probs, const MatrixT<Scalar>& dprobs) {
  require_same_shape(dprobs, "dprobs", probs, "probs");
  const Index T = probs.rows();
  const Index E = probs.cols();
  dlogits.resize(T, E);
  for (Index t = 0; t < T; ++t) {
    const Scalar dot = dprobs.row(t).dot(probs.row(t));  // sum_j dp_tj p_tj
    dlogits.row(t).array() = probs.row(t).array() * (dprobs.row(t).array() - dot);
  }
}

template <typename Scalar>
void sigmoid_forward(MatrixT<Scalar>& scores, const MatrixT<Scalar>& logits, Observer* observer) {
  require_finite_logits(logits);
  scores = logits.unaryExpr([](Scalar l) { return sigmoid(l); });
  emit_elementwise_scores(observer, scores);
}

template <typename Scalar>
void sigmoid_backward(MatrixT<Scalar>& dlogits, const MatrixT<Scalar>& scores, const MatrixT<Scalar>& dscores) {
  require_same_shape(dscores, "dscores", scores, "scores");
  dlogits = (dscores.array() * scores.array() * (Scalar(1) - scores.array())).matrix();
}

template <typename Scalar>
void sqrt_softplus_forward(MatrixT<Scalar>& scores, const MatrixT<Scalar>& logits, Observer* observer) {
  require_finite_logits(logits);
  scores = logits.unaryExpr([](Scalar l) { return std::sqrt(softplus(l)); });
  emit_elementwise_scores(observer, scores);
}

template <typename Scalar>
void sqrt_softplus_backward(MatrixT<Scalar>& dlogits, const MatrixT<Scalar>& logits, const MatrixT<Scalar>& dscores) {
  require_same_shape(dscores, "dscores", logits, "logits");
  dlogits.resize(logits.rows(), logits.cols());
  for (Index i = 0; i < logits.size(); ++i) {
    const Scalar l = logits.data()[i];
    const Scalar root = std::sqrt(softplus(l));
    // Where softplus underflows to 0 the quotient is 0/0; its limit is exp(l/2) / 2.
    const Scalar slope = root > Scalar(0) ? sigmoid(l) / (Scalar(2) * root) : std::exp(l / 2) / 2;
    dlogits.data()[i] = dscores.data()[i] * slope;
  }
}

template <typename Scalar>
void score_forward(MatrixT<Scalar>& scores, const MatrixT<Scalar>& logits, Scoring scoring, Observer* observer) {
  switch (scoring) {
    case Scoring::softmax: return softmax_forward(scores, logits, observer);
    case Scoring::sigmoid: return sigmoid_forward(scores, logits, observer);
    case Scoring::sqrt_softplus: return sqrt_softplus_forward(scores, logits, observer);
  }
  fail("scoring", static_cast<int>(scoring), "is not a known Scoring");
}

template <typename Scalar>
void score_backward(MatrixT<Scalar>& dlogits, const MatrixT<Scalar>& logits, const MatrixT<Scalar>& scores,
                    const MatrixT<Scalar>& dscores, Scoring scoring) {
  switch (scoring) {
    case Scoring::softmax: return softmax_backward(dlogits, scores, dscores);
    case Scoring::sigmoid: return sigmoid_backward(dlogits, scores, dscores);
    case Scoring::sqrt_softplus: return sqrt_softplus_backward(dlogits, logits, dscores);
  }
  fail("scoring", static_cast<int>(scoring), "is not a known Scoring");
}

#define MOELAB_INSTANTIATE(Scalar)                                                                              \
  template void softmax_forward<Scalar>(MatrixT<Scalar>&, const MatrixT<Scalar>&, Observer*);                  \
  template void softmax_backward<Scalar>(MatrixT<Scalar>&, const MatrixT<Scalar>&, const MatrixT<Scalar>&);    \
  template void sigmoid_forward<Scalar>(MatrixT<Scalar>&, const MatrixT<Scalar>&, Observer*);                  \
  template void sigmoid_backward<Scalar>(MatrixT<Scalar>&, const MatrixT<Scalar>&, const MatrixT<Scalar>&);    \
  template void sqrt_softplus_forward<Scalar>(MatrixT<Scalar>&, const MatrixT<Scalar>&, Observer*);            \
  template void sqrt_softplus_backward<Scalar>(MatrixT<Scalar>&, const MatrixT<Scalar>&,                       \
                                               const MatrixT<Scalar>&);                                        \
  template void score_forward<Scalar>(MatrixT<Scalar>&, const MatrixT<Scalar>&, Scoring, Observer*);           \
  template void score_backward<Scalar>(MatrixT<Scalar>&, const MatrixT<Scalar>&, const MatrixT<Scalar>&,       \
                                       const MatrixT<Scalar>&, Scoring);
MOELAB_INSTANTIATE(float)
MOELAB_INSTANTIATE(double)
#undef MOELAB_INSTANTIATE

}  // namespace moelab
