// moelab/reference/math.h — the scalar functions several stages share, written once.
#pragma once

#include <algorithm>
#include <cmath>

namespace moelab {

// sigmoid(z) = 1 / (1 + e^-z); e^-z = inf for very negative z gives 0, not NaN.
template <typename Scalar>
Scalar sigmoid(Scalar z) {
  return Scalar(1) / (Scalar(1) + std::exp(-z));
}

// softplus(z) = log(1 + e^z) = max(z, 0) + log1p(e^-|z|): e^-|z| <= 1 cannot overflow.
// Its derivative is sigmoid(z).
template <typename Scalar>
Scalar softplus(Scalar z) {
  return std::max(z, Scalar(0)) + std::log1p(std::exp(-std::abs(z)));
}

// e^v with std::exp, for Eigen's unaryExpr: `(row.array() - m).unaryExpr(StdExp{})`. The reference
// does not use Eigen's vectorised exp(): below its cut-off (about -88.7 in float, -709.4 in double)
// it returns one constant instead of the subnormal or zero that std::exp gives, so heavily
// suppressed experts all tie, and which lanes are vectorised depends on the build's SIMD flags
// (found by the PyTorch oracle, tests/oracle/). Likewise StdLog.
struct StdExp {
  template <typename Scalar>
  Scalar operator()(Scalar v) const {
    return std::exp(v);
  }
};
struct StdLog {
  template <typename Scalar>
  Scalar operator()(Scalar v) const {
    return std::log(v);
  }
};

}  // namespace moelab
