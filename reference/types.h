// moelab/reference/types.h — the few type aliases every reference file uses.
//
// Activations are row-major `tokens x features` matrices (T = tokens, C = channels, E = experts).
// Never `auto` an Eigen expression: it keeps references and re-evaluates (or dangles). Name the
// type, and use `.noalias()` when a product goes into a fresh destination.
#pragma once

#include <Eigen/Core>
#include <cstdint>

namespace moelab {

using Index = Eigen::Index;

template <typename Scalar>
using MatrixT = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename Scalar>
using VectorT = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

using Matrix = MatrixT<float>;     // master values are float32
using MatrixD = MatrixT<double>;   // golden values and finite-difference checks
using Vector = VectorT<float>;
using IndexMatrix = MatrixT<std::int32_t>;  // expert ids, token ids

template <typename Scalar>
using MapT = Eigen::Map<MatrixT<Scalar>>;
template <typename Scalar>
using ConstMapT = Eigen::Map<const MatrixT<Scalar>>;
using Map = MapT<float>;
using ConstMap = ConstMapT<float>;

}  // namespace moelab
