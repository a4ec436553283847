// moelab/tools/golden/builder.cpp — see builder.h.
#include "tools/golden/builder.h"

#include <fmt/format.h>

#include <cmath>

#include "reference/error.h"
#include "reference/losses.h"

namespace moelab::golden {
namespace {

double rms(const double* data, Index n) {
  double sum = 0;
  for (Index i = 0; i < n; ++i) sum += data[i] * data[i];
  return n == 0 ? 0.0 : std::sqrt(sum / static_cast<double>(n));
}

// docs/golden.md, "Tolerances": rtol = 2 (n u_d + sqrt(K) u_32), atol = rtol rms(ref),
// nmse = 2 (n u_d^2 + K u_32^2). `depth` counts the stored intermediates of a reduced-precision
// kernel; in float32 every elementary operation rounds, about 4 per such stage, so n = 4 depth.
void set_tolerance(Check& check, Tol tol, double ref_rms) {
  const double u = unit_roundoff(tol.format), u32 = unit_roundoff(Format::fp32);
  const double K = static_cast<double>(std::max<std::int64_t>(tol.reduction, 1));
  const int n = tol.format == Format::fp32 ? 4 * tol.depth : tol.depth;
  check.depth = n;
  check.reduction = tol.reduction;
  check.rtol = 2 * (n * u + std::sqrt(K) * u32);
  check.atol = check.rtol * ref_rms;
  check.nmse = 2 * (n * u * u + K * u32 * u32);
}

MatrixD column(const VectorT<double>& v) { return MatrixD(Eigen::Map<const MatrixD>(v.data(), v.size(), 1)); }

Tensor as_vector(Tensor t) {
  t.shape = {t.shape.empty() ? 1 : t.shape[0] * (t.shape.size() > 1 ? t.shape[1] : 1)};
  return t;
}

}  // namespace

MatrixD normal(Rng& rng, Index rows, Index cols, double stddev) {
  MatrixD m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = stddev * rng.normal();
  return m;
}

template <typename Scalar>
Scalar loss_forward_backward(MatrixT<Scalar>& grad, const std::string& loss, const MatrixT<Scalar>& x,
                             const IndexMatrix& ids, double alpha, const Json& config) {
  auto size = [&](const char* key) { return config.at(key).get<Index>(); };
  if (loss == "switch") {
    switch_aux_loss_backward(grad, x, ids, alpha);
    return switch_aux_loss_forward(x, ids, alpha);
  }
  if (loss == "hf") {
    hf_load_balancing_loss_backward(grad, x, ids, alpha);
    return hf_load_balancing_loss_forward(x, ids, alpha);
  }
  if (loss == "megablocks") {
    megablocks_load_balancing_loss_backward(grad, x, ids, size("num_layers"), alpha);
    return megablocks_load_balancing_loss_forward(x, ids, size("num_layers"), alpha);
  }
  if (loss == "deepseek_v2_expert") {
    deepseek_v2_expert_balance_loss_backward(grad, x, ids, alpha);
    return deepseek_v2_expert_balance_loss_forward(x, ids, alpha);
  }
  if (loss == "deepseek_v2_device") {
    deepseek_v2_device_balance_loss_backward(grad, x, ids, size("num_devices"), alpha);
    return deepseek_v2_device_balance_loss_forward(x, ids, size("num_devices"), alpha);
  }
  if (loss == "deepseek_v2_comm") {
    deepseek_v2_comm_balance_loss_backward(grad, x, ids, size("num_devices"), size("devices_per_token"), alpha);
    return deepseek_v2_comm_balance_loss_forward(x, ids, size("num_devices"), size("devices_per_token"), alpha);
  }
  if (loss == "deepseek_v3_sequence") {
    const std::vector<Index> lengths = config.at("sequence_lengths").get<std::vector<Index>>();
    deepseek_v3_sequence_balance_loss_backward(grad, x, ids, lengths, alpha);
    return deepseek_v3_sequence_balance_loss_forward(x, ids, lengths, alpha);
  }
  if (loss == "z_loss") {
    router_z_loss_backward(grad, x, alpha);
    return router_z_loss_forward(x, alpha);
  }
  fail("config.loss", loss, "is not a golden loss (switch, hf, megablocks, deepseek_v2_expert, deepseek_v2_device, "
                            "deepseek_v2_comm, deepseek_v3_sequence, z_loss)");
}
template float loss_forward_backward<float>(Matrix&, const std::string&, const Matrix&, const IndexMatrix&, double,
                                            const Json&);
template double loss_forward_backward<double>(MatrixD&, const std::string&, const MatrixD&, const IndexMatrix&, double,
                                              const Json&);

Format coarser(Format a, Format b) { return unit_roundoff(a) >= unit_roundoff(b) ? a : b; }

void Builder::put(const std::string& name, Tensor tensor) {
  require(!case_.file.tensors.contains(name), "tensor", name, "is stored twice in case " + case_.name);
  case_.file.tensors.emplace(name, std::move(tensor));
}

Check& Builder::add_check(Check check) {
  case_.checks.push_back(std::move(check));
  return case_.checks.back();
}

MatrixD Builder::input(const std::string& name, const MatrixD& values) {
  Tensor t = tensor_from(values, format_dtype(format_));
  MatrixD stored = tensor_matrix(t, name);
  put(name, std::move(t));
  return stored;
}

VectorT<double> Builder::input_vector(const std::string& name, const VectorT<double>& values) {
  Tensor t = as_vector(tensor_from(column(values), format_dtype(format_)));
  const std::vector<double> stored = tensor_values(t);
  put(name, std::move(t));
  return Eigen::Map<const VectorT<double>>(stored.data(), static_cast<Index>(stored.size()));
}

VectorT<double> Builder::input_vector_f32(const std::string& name, const VectorT<double>& values) {
  Tensor t = as_vector(tensor_from(column(values), DType::f32));
  const std::vector<double> stored = tensor_values(t);
  put(name, std::move(t));
  return Eigen::Map<const VectorT<double>>(stored.data(), static_cast<Index>(stored.size()));
}

void Builder::input_ints(const std::string& name, const IndexMatrix& values) { put(name, tensor_from(values)); }
void Builder::input_ints(const std::string& name, std::span<const std::int64_t> values) {
  put(name, tensor_from(values));
}
void Builder::input_ints(const std::string& name, std::span<const std::int32_t> values) {
  const std::vector<std::int64_t> wide(values.begin(), values.end());
  put(name, tensor_from(std::span<const std::int64_t>(wide), DType::i32));
}

Check& Builder::allclose(const std::string& name, const MatrixD& ref, Tol tol, const std::string& rows,
                         const std::string& align) {
  put(name, tensor_from(ref, DType::f64));
  Check c{.tensor = name, .compare = "allclose", .rows = rows, .align = align};
  set_tolerance(c, tol, rms(ref.data(), ref.size()));
  return add_check(std::move(c));
}

Check& Builder::allclose(const std::string& name, const VectorT<double>& ref, Tol tol, const std::string& rows) {
  put(name, as_vector(tensor_from(column(ref), DType::f64)));
  Check c{.tensor = name, .compare = "allclose", .rows = rows};
  set_tolerance(c, tol, rms(ref.data(), ref.size()));
  return add_check(std::move(c));
}

Check& Builder::allclose_scalar(const std::string& name, double ref, Tol tol) {
  put(name, scalar_tensor(ref));
  Check c{.tensor = name, .compare = "allclose"};
  set_tolerance(c, tol, std::abs(ref));
  return add_check(std::move(c));
}

void Builder::reference(const std::string& name, const MatrixD& values) { put(name, tensor_from(values, DType::f64)); }

Check& Builder::exact(const std::string& name, const IndexMatrix& values, const std::string& rows) {
  put(name, tensor_from(values));
  return add_check({.tensor = name, .compare = "exact", .rows = rows});
}
Check& Builder::exact(const std::string& name, std::span<const std::int64_t> values, const std::string& rows) {
  put(name, tensor_from(values));
  return add_check({.tensor = name, .compare = "exact", .rows = rows});
}
Check& Builder::exact(const std::string& name, std::span<const std::int32_t> values, const std::string& rows) {
  input_ints(name, values);
  return add_check({.tensor = name, .compare = "exact", .rows = rows});
}

Check& Builder::topk_set(const std::string& name, const IndexMatrix& ids, const std::string& ranking,
                         const Check& tol, bool transposed) {
  put(name, tensor_from(ids));
  return add_check({.tensor = name,
                    .compare = "topk_set",
                    .atol = tol.atol,
                    .rtol = tol.rtol,
                    .ranking = ranking,
                    .transposed = transposed});
}

Check& Builder::permutation(const std::string& row_token, std::span<const std::int32_t> tokens,
                            const std::string& offsets) {
  input_ints(row_token, tokens);
  return add_check({.tensor = row_token, .compare = "permutation", .offsets = offsets});
}

Check& Builder::bitwise(const std::string& name, Tensor tensor) {
  put(name, std::move(tensor));
  return add_check({.tensor = name, .compare = "bitwise"});
}

// ---- layer parameters ---------------------------------------------------------------------------------

namespace {

void put_matrix(Builder& b, const std::string& name, MatrixD& m) {
  if (m.size() > 0) m = b.input(name, m);
}
void put_vector(Builder& b, const std::string& name, VectorT<double>& v) {
  if (v.size() > 0) v = b.input_vector(name, v);
}

}  // namespace

void put_expert_params(Builder& b, const std::string& prefix, ExpertParamsT<double>& p) {
  put_matrix(b, prefix + ".w_gate", p.w_gate);
  put_matrix(b, prefix + ".w_up", p.w_up);
  put_matrix(b, prefix + ".w_down", p.w_down);
  put_vector(b, prefix + ".b_gate", p.b_gate);
  put_vector(b, prefix + ".b_up", p.b_up);
  put_vector(b, prefix + ".b_down", p.b_down);
}

void put_layer_params(Builder& b, LayerParamsT<double>& p) {
  put_matrix(b, "param.router.weight", p.routing.router.weight);
  put_vector(b, "param.router.bias", p.routing.router.bias);
  if (p.routing.selection_bias.size() > 0)
    p.routing.selection_bias = b.input_vector_f32("param.selection_bias", p.routing.selection_bias);
  for (std::size_t e = 0; e < p.experts.size(); ++e) put_expert_params(b, fmt::format("param.experts.{}", e), p.experts[e]);
  for (std::size_t s = 0; s < p.shared.size(); ++s) put_expert_params(b, fmt::format("param.shared.{}", s), p.shared[s]);
  put_matrix(b, "param.shared_gate", p.shared_gate);
}

void put_expert_grads(Builder& b, const std::string& prefix, const ExpertParamsT<double>& g, Tol tol) {
  auto matrix = [&](const char* name, const MatrixD& m) {
    if (m.size() > 0) b.allclose(prefix + "." + name, m, tol);
  };
  auto vector = [&](const char* name, const VectorT<double>& v) {
    if (v.size() > 0) b.allclose(prefix + "." + name, v, tol);
  };
  matrix("w_gate", g.w_gate);
  matrix("w_up", g.w_up);
  matrix("w_down", g.w_down);
  vector("b_gate", g.b_gate);
  vector("b_up", g.b_up);
  vector("b_down", g.b_down);
}

void put_layer_grads(Builder& b, const LayerGradsT<double>& g, Tol tol) {
  b.allclose("grad.router.weight", g.router.weight, tol);
  if (g.router.bias.size() > 0) b.allclose("grad.router.bias", g.router.bias, tol);
  for (std::size_t e = 0; e < g.experts.size(); ++e) put_expert_grads(b, fmt::format("grad.experts.{}", e), g.experts[e], tol);
  for (std::size_t s = 0; s < g.shared.size(); ++s) put_expert_grads(b, fmt::format("grad.shared.{}", s), g.shared[s], tol);
  if (g.shared_gate.size() > 0) b.allclose("grad.shared_gate", g.shared_gate, tol);
}

// ---- reading back -------------------------------------------------------------------------------------

Matrix tensor_matrix_f(const TensorFile& file, const std::string& name) {
  const auto it = file.tensors.find(name);
  if (it == file.tensors.end()) fail("tensor", name, "is missing from the case file");
  return tensor_matrix(it->second, name).cast<float>();
}

namespace {

VectorT<float> vector_f(const TensorFile& file, const std::string& name) {
  const Matrix m = tensor_matrix_f(file, name);
  return Eigen::Map<const VectorT<float>>(m.data(), m.size());
}

bool has(const TensorFile& file, const std::string& name) { return file.tensors.contains(name); }

}  // namespace

ExpertParamsT<float> get_expert_params(const TensorFile& file, const std::string& prefix, const ExpertConfig& config) {
  ExpertParamsT<float> p;
  if (is_gated(config.activation)) p.w_gate = tensor_matrix_f(file, prefix + ".w_gate");
  p.w_up = tensor_matrix_f(file, prefix + ".w_up");
  p.w_down = tensor_matrix_f(file, prefix + ".w_down");
  if (config.use_bias) {
    if (is_gated(config.activation)) p.b_gate = vector_f(file, prefix + ".b_gate");
    p.b_up = vector_f(file, prefix + ".b_up");
    p.b_down = vector_f(file, prefix + ".b_down");
  }
  return p;
}

LayerParamsT<float> get_layer_params(const TensorFile& file, const LayerConfig& config) {
  LayerParamsT<float> p;
  p.routing.router.weight = tensor_matrix_f(file, "param.router.weight");
  if (config.routing.router.use_bias) p.routing.router.bias = vector_f(file, "param.router.bias");
  if (config.routing.use_selection_bias) p.routing.selection_bias = vector_f(file, "param.selection_bias");
  for (Index e = 0; e < config.num_experts(); ++e)
    p.experts.push_back(get_expert_params(file, fmt::format("param.experts.{}", e), config.expert));
  for (int s = 0; s < config.shared.count; ++s)
    p.shared.push_back(get_expert_params(file, fmt::format("param.shared.{}", s), config.shared_expert_config()));
  if (has(file, "param.shared_gate")) p.shared_gate = tensor_matrix_f(file, "param.shared_gate");
  return p;
}

}  // namespace moelab::golden
