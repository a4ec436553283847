// moelab/reference/gating.cpp — see gating.h. T = tokens, E = experts, k = selected per token.
#include "reference/gating.h"

#include <fmt/format.h>

#include <cmath>
#include <limits>

#include "reference/error.h"
#include "reference/math.h"

namespace moelab {
namespace {

void require_shapes(Index T, Index E, const IndexMatrix& ids, Index scores_rows, Index scores_cols) {
  require(scores_rows == T && scores_cols == E, "scores shape", fmt::format("({}, {})", scores_rows, scores_cols),
          fmt::format("must equal the logits shape ({}, {})", T, E));
  require(ids.rows() == T, "ids.rows()", ids.rows(), fmt::format("must equal the number of tokens T = {}", T));
  require(ids.cols() >= 1 && ids.cols() <= E, "ids.cols()", ids.cols(),
          fmt::format("the number of selected experts k must be in [1, E = {}]", E));
  for (Index t = 0; t < T; ++t)
    for (Index j = 0; j < ids.cols(); ++j)
      if (ids(t, j) < 0 || ids(t, j) >= E)
        fail(fmt::format("ids[{},{}]", t, j), ids(t, j), fmt::format("must be an expert id in [0, {})", E));
}

// The raw weights r (k) of token t, before renormalisation and scaling.
template <typename Scalar>
VectorT<Scalar> raw_weights(const MatrixT<Scalar>& logits, const MatrixT<Scalar>& scores, const IndexMatrix& ids,
                            Index t, GateKind kind) {
  const Index k = ids.cols();
  VectorT<Scalar> r(k);
  for (Index j = 0; j < k; ++j) {
    const Scalar l = logits(t, ids(t, j));
    switch (kind) {
      case GateKind::selected_scores: r(j) = scores(t, ids(t, j)); break;
      case GateKind::softmax_of_selected_logits: r(j) = l; break;  // exponentiated below
      case GateKind::sigmoid_of_selected_logits: r(j) = sigmoid(l); break;
      case GateKind::ones: r(j) = Scalar(1); break;
    }
  }
  if (kind == GateKind::softmax_of_selected_logits) {  // softmax over the k selected logits
    r = (r.array() - r.maxCoeff()).unaryExpr(StdExp{}).matrix();
    r /= r.sum();
  }
  return r;
}

}  // namespace

std::string_view gate_kind_name(GateKind kind) {
  switch (kind) {
    case GateKind::selected_scores: return "selected_scores";
    case GateKind::softmax_of_selected_logits: return "softmax_of_selected_logits";
    case GateKind::sigmoid_of_selected_logits: return "sigmoid_of_selected_logits";
    case GateKind::ones: return "ones";
  }
  fail("gate", static_cast<int>(kind), "is not a known GateKind");
}

GateKind parse_gate_kind(std::string_view name) {
  for (GateKind k : {GateKind::selected_scores, GateKind::softmax_of_selected_logits,
                     GateKind::sigmoid_of_selected_logits, GateKind::ones})
    if (gate_kind_name(k) == name) return k;
  fail("gate", fmt::format("\"{}\"", name),
       "must be one of selected_scores, softmax_of_selected_logits, sigmoid_of_selected_logits, ones");
}

void GatingConfig::validate() const {
  require(std::isfinite(renorm_eps) && renorm_eps >= 0, "renorm_eps", renorm_eps, "must be finite and >= 0");
  require(std::isfinite(routed_scaling_factor) && routed_scaling_factor > 0, "routed_scaling_factor",
          routed_scaling_factor, "must be finite and > 0");
  require(!(kind == GateKind::softmax_of_selected_logits && renormalize), "renormalize", "true",
          "softmax_of_selected_logits already sums to 1; renormalising it again is not a published convention");
}

template <typename Scalar>
void gating_forward(MatrixT<Scalar>& gates, const MatrixT<Scalar>& logits, const MatrixT<Scalar>& scores,
                    const IndexMatrix& ids, const GatingConfig& config, Observer* observer) {
  config.validate();
  const Index T = logits.rows(), E = logits.cols(), k = ids.cols();
  require_shapes(T, E, ids, scores.rows(), scores.cols());
  const Scalar c = static_cast<Scalar>(config.routed_scaling_factor);
  gates.resize(T, k);
  for (Index t = 0; t < T; ++t) {
    VectorT<Scalar> r = raw_weights(logits, scores, ids, t, config.kind);
    if (config.renormalize) r /= r.sum() + static_cast<Scalar>(config.renorm_eps);
    gates.row(t) = c * r.transpose();
  }
  emit(observer, [&](Observer& o) {
    constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
    const bool empty = T == 0;
    const Stat stats[] = {{"min", empty ? kNaN : static_cast<double>(gates.minCoeff())},
                          {"max", empty ? kNaN : static_cast<double>(gates.maxCoeff())},
                          {"sum_mean", empty ? kNaN : static_cast<double>(gates.sum()) / static_cast<double>(T)}};
    Event event{.name = events::gates, .shape = {T, k}, .stats = stats};
    set_values(event, gates.data(), static_cast<std::size_t>(gates.size()));
    o.on_event(event);
  });
}

template <typename Scalar>
void gating_backward(MatrixT<Scalar>& dlogits, MatrixT<Scalar>& dscores, const MatrixT<Scalar>& dgates,
                     const MatrixT<Scalar>& logits, const MatrixT<Scalar>& scores, const IndexMatrix& ids,
                     const GatingConfig& config) {
  config.validate();
  const Index T = logits.rows(), E = logits.cols(), k = ids.cols();
  require_shapes(T, E, ids, scores.rows(), scores.cols());
  require(dgates.rows() == T && dgates.cols() == k, "dgates shape", fmt::format("({}, {})", dgates.rows(), dgates.cols()),
          fmt::format("must equal the gates shape ({}, {})", T, k));
  for (MatrixT<Scalar>* grad : {&dlogits, &dscores}) {
    if (grad->size() == 0) grad->setZero(T, E);
    require(grad->rows() == T && grad->cols() == E, "accumulated gradient shape",
            fmt::format("({}, {})", grad->rows(), grad->cols()), fmt::format("must be (T, E) = ({}, {})", T, E));
  }
  const Scalar c = static_cast<Scalar>(config.routed_scaling_factor);
  for (Index t = 0; t < T; ++t) {
    const VectorT<Scalar> r = raw_weights(logits, scores, ids, t, config.kind);
    const VectorT<Scalar> dg = dgates.row(t).transpose();
    VectorT<Scalar> dr = c * dg;
    if (config.renormalize) {  // g = c r / (S + eps): dr_j = c (dg_j - <dg, r> / (S + eps)) / (S + eps)
      const Scalar denom = r.sum() + static_cast<Scalar>(config.renorm_eps);
      dr = (c / denom) * (dg.array() - dg.dot(r) / denom).matrix();
    }
    switch (config.kind) {
      case GateKind::selected_scores:
        for (Index j = 0; j < k; ++j) dscores(t, ids(t, j)) += dr(j);
        break;
      case GateKind::softmax_of_selected_logits: {  // softmax Jacobian over the k selected
        const Scalar dot = dr.dot(r);
        for (Index j = 0; j < k; ++j) dlogits(t, ids(t, j)) += r(j) * (dr(j) - dot);
        break;
      }
      case GateKind::sigmoid_of_selected_logits:
        for (Index j = 0; j < k; ++j) dlogits(t, ids(t, j)) += dr(j) * r(j) * (Scalar(1) - r(j));
        break;
      case GateKind::ones: break;
    }
  }
}

template void gating_forward<float>(Matrix&, const Matrix&, const Matrix&, const IndexMatrix&, const GatingConfig&,
                                    Observer*);
template void gating_forward<double>(MatrixD&, const MatrixD&, const MatrixD&, const IndexMatrix&,
                                     const GatingConfig&, Observer*);
template void gating_backward<float>(Matrix&, Matrix&, const Matrix&, const Matrix&, const Matrix&,
                                     const IndexMatrix&, const GatingConfig&);
template void gating_backward<double>(MatrixD&, MatrixD&, const MatrixD&, const MatrixD&, const MatrixD&,
                                      const IndexMatrix&, const GatingConfig&);

}  // namespace moelab
