// moelab/tools/golden/case_io.h — reading a case's inputs and wrapping an implementation's outputs,
// shared by the implementations `moelab check` runs (impl_cpu.cpp, impl_cuda.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "reference/error.h"
#include "reference/types.h"
#include "tools/golden/builder.h"
#include "tools/golden/golden.h"

namespace moelab::golden {

inline Tensor f64(const Matrix& m) { return tensor_from(MatrixD(m.cast<double>()), DType::f64); }
inline Tensor f64_vector(const VectorT<float>& v) {
  Tensor t = tensor_from(MatrixD(v.cast<double>()), DType::f64);
  t.shape = {v.size()};
  return t;
}
inline Tensor i64(const std::vector<std::int64_t>& v) { return tensor_from(std::span<const std::int64_t>(v)); }
inline Tensor i32(const std::vector<std::int32_t>& v) {
  const std::vector<std::int64_t> wide(v.begin(), v.end());
  return tensor_from(std::span<const std::int64_t>(wide), DType::i32);
}

inline const Tensor& tensor(const Case& c, const std::string& name) {
  const auto it = c.file.tensors.find(name);
  if (it == c.file.tensors.end()) fail("tensor", name, "is missing from case " + c.name);
  return it->second;
}
inline bool has(const Case& c, const std::string& name) { return c.file.tensors.contains(name); }
inline Matrix matrix(const Case& c, const std::string& name) { return tensor_matrix_f(c.file, name); }
inline VectorT<float> vector(const Case& c, const std::string& name) {
  const Matrix m = matrix(c, name);
  return Eigen::Map<const VectorT<float>>(m.data(), m.size());
}
inline std::vector<std::int32_t> ints32(const Case& c, const std::string& name) {
  std::vector<std::int32_t> v;
  for (double x : tensor_values(tensor(c, name))) v.push_back(static_cast<std::int32_t>(x));
  return v;
}
inline std::vector<std::int64_t> ints64(const Case& c, const std::string& name) {
  std::vector<std::int64_t> v;
  for (double x : tensor_values(tensor(c, name))) v.push_back(static_cast<std::int64_t>(x));
  return v;
}

}  // namespace moelab::golden
