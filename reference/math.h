// moelab/reference/math.h — the scalar functions several stages share, written once.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

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

// A capacity quotient such as 1.1 * 100 / 10 is 11.000000000000002 in double, and its ceiling 12.
// Three roundings (factor, product, quotient), each <= eps/2 relative, separate q from the decimal
// result: a q within 4 eps (relative) of a whole number is that number. Used by every capacity.
inline double snap_to_whole(double q) {
  const double nearest = std::round(q);
  return std::abs(q - nearest) <= 4 * std::numeric_limits<double>::epsilon() * q ? nearest : q;
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
