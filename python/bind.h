// moelab/python/bind.h — what the binding files of the `moelab` module share: numpy arrays to the
// reference's Eigen matrices and back, Python objects to JSON and back, events to dicts, and the
// reading of configuration and observer arguments. python/API.md is the contract.
//
// Arrays in: any array-like, copied into the owned matrix the reference takes (its functions take
// `const MatrixT<Scalar>&`, never a view). Float arguments take any real numeric dtype; id arguments
// integer dtypes only; a wrong dtype, rank or shape is an Error naming the argument.
// Arrays out: the result matrix is moved into a heap holder owned by a capsule that the ndarray keeps
// as its base, so nothing is copied (a.base is the capsule, a.flags.owndata is False).
//
// Shapes: T = tokens, C = hidden size, E = experts, k = experts per token.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "reference/config_json.h"
#include "reference/error.h"
#include "reference/layer.h"
#include "reference/observer.h"
#include "reference/recorder.h"
#include "reference/routing.h"
#include "reference/types.h"

namespace moelab::python {

namespace py = pybind11;
using namespace pybind11::literals;

// The topics, one source file each (bind_<topic>.cpp), called by module.cpp.
void bind_numerics(py::module_& m);
void bind_configs(py::module_& m);
void bind_routing(py::module_& m);
void bind_layer(py::module_& m);
void bind_golden(py::module_& m);
void bind_model(py::module_& m);
void bind_analysis(py::module_& m);

// ---- arrays in ---------------------------------------------------------------------------------

// np.asarray(obj) with its dtype checked: kind "float" accepts real numbers (float, int, uint),
// kind "int" integers only. Error naming `name` otherwise.
enum class Kind { real, integer };
py::array array_arg(py::handle obj, std::string_view name, Kind kind);

// A 2-d array as a row-major matrix (a copy). Error naming `name` unless 2-d; rows/cols >= 0 are
// checked too, `what` describing them ("(T, hidden_size)").
template <typename Scalar>
MatrixT<Scalar> matrix_arg(py::handle obj, std::string_view name, Index rows = -1, Index cols = -1,
                           std::string_view what = "");
// A 1-d array as a vector (a copy); n >= 0 is checked.
template <typename Scalar>
VectorT<Scalar> vector_arg(py::handle obj, std::string_view name, Index n = -1, std::string_view what = "");
// Any-rank real array as float32 values in row-major order, with its shape (numerics).
std::vector<float> values_arg(py::handle obj, std::string_view name, std::vector<py::ssize_t>& shape);

// Integer arrays: values must fit int32.
IndexMatrix index_matrix_arg(py::handle obj, std::string_view name, Index rows = -1, Index cols = -1,
                             std::string_view what = "");
std::vector<std::int32_t> ints_arg(py::handle obj, std::string_view name, Index n = -1, std::string_view what = "");
std::vector<std::int64_t> int64s_arg(py::handle obj, std::string_view name, Index n = -1,
                                     std::string_view what = "");
// None -> empty.
std::vector<Index> lengths_arg(py::handle obj, std::string_view name);

// "float32" or "float64"; Error naming "precision" otherwise.
bool is_double(std::string_view precision);

// ---- arrays out (no copy) -------------------------------------------------------------------------

template <typename Scalar>
py::array give(MatrixT<Scalar>&& m);
template <typename Scalar>
py::array give(VectorT<Scalar>&& v);
template <typename T>
py::array give(std::vector<T>&& v);
// A vector viewed as (rows, cols) (rows * cols == v.size()).
template <typename T>
py::array give(std::vector<T>&& v, py::ssize_t rows, py::ssize_t cols);
// Copies (for results the C++ side keeps).
template <typename Scalar>
py::array copy_out(const MatrixT<Scalar>& m) {
  return give(MatrixT<Scalar>(m));
}
template <typename Scalar>
py::array copy_out(const VectorT<Scalar>& v) {
  return give(VectorT<Scalar>(v));
}
template <typename T>
py::array copy_out(const std::vector<T>& v) {
  return give(std::vector<T>(v));
}

// route's result (no copy): logits, scores, ids, gates, load, aux_loss, z_loss; moe_layer's holds it too.
template <typename S>
py::dict routing_dict(RoutingOutputT<S>&& out) {
  py::dict d;
  d["logits"] = give(std::move(out.logits));
  d["scores"] = give(std::move(out.scores));
  d["ids"] = give(std::move(out.ids));
  d["gates"] = give(std::move(out.gates));
  d["load"] = give(std::move(out.load));
  d["aux_loss"] = static_cast<double>(out.aux_loss);
  d["z_loss"] = static_cast<double>(out.z_loss);
  return d;
}

// ---- JSON -------------------------------------------------------------------------------------------

// A Python value (dict with str keys, list, tuple, bool, int, float, str, None, numpy scalars and
// arrays) as JSON; Error naming the path of anything else.
Json json_arg(py::handle obj, std::string_view name);
// JSON as Python: objects -> dict, arrays -> list, numbers -> int/float; the strings "nan", "inf",
// "-inf" stay strings (configurations hold none).
py::object from_json(const Json& j);
// As from_json, but numbers written by json_number ("nan", "inf", "-inf") become floats.
py::object from_json_numbers(const Json& j);

// Configurations: a LayerConfig dict, or (routing) a RoutingConfig dict or a LayerConfig dict.
LayerConfig layer_config_arg(py::handle config);
RoutingConfig routing_config_arg(py::handle config);
ExpertConfig expert_config_arg(py::handle config);

// ---- events ------------------------------------------------------------------------------------------

py::dict event_dict(const RecordedEvent& e);
py::list event_list(const std::vector<RecordedEvent>& events);

// moelab.Recorder: a MemoryRecorder that keeps only the events named in a list given at run time
// (MemoryRecorder's own filter takes a braced list).
class Recorder : public MemoryRecorder {
 public:
  explicit Recorder(std::vector<std::string> names) : names_(names.begin(), names.end()) {}
  void on_event(const Event& event) override {
    if (names_.empty() || names_.contains(event.name)) MemoryRecorder::on_event(event);
  }

 private:
  std::set<std::string, std::less<>> names_;
};

// The observer of a call with `record` and `recorder` arguments: a local MemoryRecorder for record,
// the user's Recorder, both, or none (null).
class Events {
 public:
  Events(bool record, py::handle recorder);
  Observer* observer() { return observer_; }
  // Puts the local recorder's events under out["events"] when record was asked for.
  void put(py::dict& out) const;

 private:
  bool record_ = false;
  MemoryRecorder local_;
  Recorder* user_ = nullptr;
  FanOut fan_;
  Observer* observer_ = nullptr;
};

// The user's Recorder argument (None -> null); Error naming "recorder" for anything else.
Recorder* recorder_arg(py::handle recorder);

// ---- small helpers -------------------------------------------------------------------------------------

// Throws Error("<name> = <repr>: <rule>").
[[noreturn]] void fail_arg(std::string_view name, py::handle value, std::string_view rule);
std::string shown(py::handle value);  // repr(), shortened for messages

}  // namespace moelab::python
