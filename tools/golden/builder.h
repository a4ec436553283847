// moelab/tools/golden/builder.h — what the case makers share: storing inputs in the case dtype (and
// getting back exactly the values a kernel will see), expected tensors with their checks and
// tolerances, and layer parameters to and from named tensors.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "reference/layer.h"
#include "reference/random.h"
#include "reference/safetensors.h"
#include "reference/types.h"
#include "tools/golden/golden.h"

namespace moelab::golden {

// N(0, stddev^2) entries, drawn row-major from rng.
MatrixD normal(Rng& rng, Index rows, Index cols, double stddev = 1.0);

// One balance loss of losses.h by its golden name (switch, hf, megablocks, deepseek_v2_expert,
// deepseek_v2_device, deepseek_v2_comm, deepseek_v3_sequence, z_loss) and the sizes in `config`
// (num_layers, num_devices, devices_per_token, sequence_lengths): its value, and its gradient with
// respect to x (probs, scores or logits) in `grad`. The case maker (double) and the cpu
// implementation (float) call this one function.
template <typename Scalar>
Scalar loss_forward_backward(MatrixT<Scalar>& grad, const std::string& loss, const MatrixT<Scalar>& x,
                             const IndexMatrix& ids, double alpha, const Json& config);

// The tolerance of one expected tensor (docs/golden.md, "Tolerances"): a kernel in `format` may
// round `depth` times on the tensor's path, and sums at most `reduction` terms in float32.
struct Tol {
  int depth = 1;
  std::int64_t reduction = 1;
  Format format = Format::fp32;
};
// The coarser of two formats (the one with the larger unit roundoff).
Format coarser(Format a, Format b);

class Builder {
 public:
  explicit Builder(Case& c) : case_(c), format_(parse_format(c.dtype)) {}
  Format format() const { return format_; }

  // Stores values rounded to the case dtype and returns exactly what was stored, decoded.
  MatrixD input(const std::string& name, const MatrixD& values);
  VectorT<double> input_vector(const std::string& name, const VectorT<double>& values);
  // Stored in float32 whatever the case dtype (state a kernel keeps in float32: a balancing bias).
  VectorT<double> input_vector_f32(const std::string& name, const VectorT<double>& values);
  void input_ints(const std::string& name, const IndexMatrix& values);
  void input_ints(const std::string& name, std::span<const std::int64_t> values);
  void input_ints(const std::string& name, std::span<const std::int32_t> values);

  // Expected floating tensors, stored as F64, with an allclose check. The returned reference is
  // valid until the next check is added (the checks live in a growing vector).
  Check& allclose(const std::string& name, const MatrixD& ref, Tol tol, const std::string& rows = "all",
                  const std::string& align = "");
  Check& allclose(const std::string& name, const VectorT<double>& ref, Tol tol, const std::string& rows = "all");
  Check& allclose_scalar(const std::string& name, double ref, Tol tol);
  // Stored only: the values a topk_set check ranks (its `ranking`).
  void reference(const std::string& name, const MatrixD& values);
  // Integers, compared exactly.
  Check& exact(const std::string& name, const IndexMatrix& values, const std::string& rows = "all");
  Check& exact(const std::string& name, std::span<const std::int64_t> values, const std::string& rows = "all");
  Check& exact(const std::string& name, std::span<const std::int32_t> values, const std::string& rows = "all");
  // Ids compared as sets per row, near-ties (by `ranking`'s tolerance `tol`) ambiguous.
  Check& topk_set(const std::string& name, const IndexMatrix& ids, const std::string& ranking, const Check& tol,
                  bool transposed = false);
  Check& permutation(const std::string& row_token, std::span<const std::int32_t> tokens, const std::string& offsets);
  Check& bitwise(const std::string& name, Tensor tensor);

  void put(const std::string& name, Tensor tensor);

 private:
  Check& add_check(Check check);
  Case& case_;
  Format format_;
};

// Layer parameters as named tensors: param.router.weight, param.router.bias, param.selection_bias,
// param.experts.<e>.<w_gate|w_up|w_down|b_gate|b_up|b_down>, param.shared.<s>.<...>,
// param.shared_gate (HF names where a model has them: gate.weight, experts.<e>.gate_proj ...).
// Rounds every parameter to the case dtype in place (the selection bias to float32).
void put_layer_params(Builder& b, LayerParamsT<double>& params);
void put_expert_params(Builder& b, const std::string& prefix, ExpertParamsT<double>& params);
// Their gradients: grad.router.weight, grad.experts.<e>.w_up, ...
void put_layer_grads(Builder& b, const LayerGradsT<double>& grads, Tol tol);
void put_expert_grads(Builder& b, const std::string& prefix, const ExpertParamsT<double>& grads, Tol tol);

// Reading them back (the cpu implementation), as float32.
Matrix tensor_matrix_f(const TensorFile& file, const std::string& name);
LayerParamsT<float> get_layer_params(const TensorFile& file, const LayerConfig& config);
ExpertParamsT<float> get_expert_params(const TensorFile& file, const std::string& prefix, const ExpertConfig& config);

}  // namespace moelab::golden
