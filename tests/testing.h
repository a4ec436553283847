// moelab/tests/testing.h — helpers shared by the test suites.
#pragma once

#include <algorithm>
#include <bit>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "reference/error.h"
#include "reference/random.h"
#include "reference/types.h"

namespace moelab::testing {

// The message of the moelab::Error that `f` throws, or "" if it throws none.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Small matrices written out in a test: int_rows({{0, 1}, {2, 0}}), rows_of({{0.5, 0.25}}).
template <typename Scalar>
MatrixT<Scalar> matrix_of(std::initializer_list<std::initializer_list<Scalar>> rows) {
  MatrixT<Scalar> m(static_cast<Index>(rows.size()), rows.size() == 0 ? 0 : static_cast<Index>(rows.begin()->size()));
  Index t = 0;
  for (const auto& row : rows) {
    require(static_cast<Index>(row.size()) == m.cols(), "row size", row.size(), "every row must have the same length");
    Index j = 0;
    for (Scalar v : row) m(t, j++) = v;
    ++t;
  }
  return m;
}
inline IndexMatrix int_rows(std::initializer_list<std::initializer_list<std::int32_t>> rows) {
  return matrix_of<std::int32_t>(rows);
}
inline MatrixD rows_of(std::initializer_list<std::initializer_list<double>> rows) { return matrix_of<double>(rows); }

// Same shape and the same bits in every element (-0.0 != 0.0; a NaN equals only itself).
template <typename Scalar>
bool bitwise_equal(const MatrixT<Scalar>& a, const MatrixT<Scalar>& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  using Bits = std::conditional_t<sizeof(Scalar) == 4, std::uint32_t, std::uint64_t>;
  for (Index i = 0; i < a.size(); ++i)
    if (std::bit_cast<Bits>(a.data()[i]) != std::bit_cast<Bits>(b.data()[i])) return false;
  return true;
}
template <typename Scalar>
bool bitwise_equal(const VectorT<Scalar>& a, const VectorT<Scalar>& b) {
  return bitwise_equal(MatrixT<Scalar>(a), MatrixT<Scalar>(b));
}

// A (rows, cols) matrix of N(0, sigma^2) values from `rng` (never zeros: they hide bugs).
template <typename Scalar = double>
MatrixT<Scalar> random_matrix(Rng& rng, Index rows, Index cols, double sigma = 1.0) {
  MatrixT<Scalar> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(sigma * rng.normal());
  return m;
}

// Central differences of a scalar function `loss()` with respect to every element of `x`, which
// `loss` reads by reference: d loss / d x_i ~ (loss(x + h e_i) - loss(x - h e_i)) / 2h. In double
// the error is O(h^2) truncation plus O(eps / h) rounding, both ~1e-10 relative at h = 1e-5.
template <typename Loss>
MatrixD numerical_gradient(Loss&& loss, MatrixD& x, double h = 1e-5) {
  MatrixD g(x.rows(), x.cols());
  for (Index i = 0; i < x.size(); ++i) {
    const double saved = x.data()[i];
    x.data()[i] = saved + h;
    const double up = loss();
    x.data()[i] = saved - h;
    const double down = loss();
    x.data()[i] = saved;
    g.data()[i] = (up - down) / (2 * h);
  }
  return g;
}

// max_i |a_i - b_i| / max_i max(|a_i|, |b_i|): the error relative to the gradient's scale. Not
// element by element: where the true gradient is exactly 0 (an input the loss does not depend on),
// central differences leave ~1e-11 of rounding noise that no per-element ratio can absorb. An
// error in any component above 1e-7 of the largest one still fails a 1e-7 bound.
inline double max_relative_error(const MatrixD& a, const MatrixD& b) {
  require(a.rows() == b.rows() && a.cols() == b.cols(), "shape",
          fmt::format("{}x{} vs {}x{}", a.rows(), a.cols(), b.rows(), b.cols()),
          "gradients to compare must have the same shape");
  if (a.size() == 0) return 0.0;
  const double scale = std::max(a.cwiseAbs().maxCoeff(), b.cwiseAbs().maxCoeff());
  const double error = (a - b).cwiseAbs().maxCoeff();
  return scale == 0.0 ? error : error / scale;
}

}  // namespace moelab::testing
