// moelab/python/convert.cpp — the conversions of bind.h: arrays, JSON, events, observers.
#include <fmt/format.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "python/bind.h"

namespace moelab::python {

std::string shown(py::handle value) {
  std::string s = py::repr(value).cast<std::string>();
  constexpr std::size_t kMax = 60;
  if (s.size() > kMax) s = s.substr(0, kMax - 3) + "...";
  return s;
}

void fail_arg(std::string_view name, py::handle value, std::string_view rule) { fail(name, shown(value), rule); }

// ---- arrays in ---------------------------------------------------------------------------------

namespace {

std::string shape_text(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += fmt::format("{}{}", i ? ", " : "", a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

py::array require_ndim(py::handle obj, std::string_view name, Kind kind, py::ssize_t ndim) {
  py::array a = array_arg(obj, name, kind);
  if (a.ndim() != ndim)
    fail(name, fmt::format("shape {}", shape_text(a)),
         fmt::format("must be {}-d{}", ndim, kind == Kind::integer ? " (integers)" : ""));
  return a;
}

void require_dims(std::string_view name, Index got_rows, Index got_cols, Index rows, Index cols,
                  std::string_view what) {
  if ((rows >= 0 && got_rows != rows) || (cols >= 0 && got_cols != cols)) {
    const std::string r = rows >= 0 ? fmt::format("{}", rows) : "any";
    const std::string c = cols >= 0 ? fmt::format("{}", cols) : "any";
    fail(name, fmt::format("({}, {})", got_rows, got_cols),
         fmt::format("must be {}{}({}, {})", what, what.empty() ? "" : " = ", r, c));
  }
}

// The values as int64, checked to fit int32 when `narrow`.
std::vector<std::int64_t> integers(const py::array& a, std::string_view name, bool narrow) {
  const auto c = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
  if (!c) throw py::error_already_set();
  std::vector<std::int64_t> v(c.data(), c.data() + c.size());
  // Unsigned 64-bit values above int64's range wrap in the cast: compare against the original.
  if (a.dtype().kind() == 'u' && a.itemsize() == 8) {
    const auto u = py::array_t<std::uint64_t, py::array::c_style | py::array::forcecast>::ensure(a);
    for (py::ssize_t i = 0; i < u.size(); ++i)
      if (u.data()[i] > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        fail(fmt::format("{}[{}]", name, i), u.data()[i], "does not fit a 64-bit signed integer");
  }
  if (narrow)
    for (std::size_t i = 0; i < v.size(); ++i)
      if (v[i] < std::numeric_limits<std::int32_t>::min() || v[i] > std::numeric_limits<std::int32_t>::max())
        fail(fmt::format("{}[{}]", name, i), v[i], "does not fit a 32-bit integer");
  return v;
}

}  // namespace

py::array array_arg(py::handle obj, std::string_view name, Kind kind) {
  if (obj.is_none()) fail(name, "None", "an array is required");
  py::array a = py::array::ensure(obj);
  if (!a) {
    PyErr_Clear();
    fail_arg(name, obj, "is not an array of numbers");
  }
  const char k = a.dtype().kind();
  const bool ok = kind == Kind::real ? (k == 'f' || k == 'i' || k == 'u') : (k == 'i' || k == 'u');
  if (!ok)
    fail(name, fmt::format("array of dtype {}", py::str(a.dtype()).cast<std::string>()),
         kind == Kind::real ? "must hold real numbers (float32 preferred)"
                            : "must hold integers (ids, counts); float arrays are not accepted");
  return a;
}

template <typename Scalar>
MatrixT<Scalar> matrix_arg(py::handle obj, std::string_view name, Index rows, Index cols, std::string_view what) {
  const py::array a = require_ndim(obj, name, Kind::real, 2);
  const auto c = py::array_t<Scalar, py::array::c_style | py::array::forcecast>::ensure(a);
  if (!c) throw py::error_already_set();
  MatrixT<Scalar> m(c.shape(0), c.shape(1));
  if (m.size() > 0) std::memcpy(m.data(), c.data(), sizeof(Scalar) * static_cast<std::size_t>(m.size()));
  require_dims(name, m.rows(), m.cols(), rows, cols, what);
  return m;
}

template <typename Scalar>
VectorT<Scalar> vector_arg(py::handle obj, std::string_view name, Index n, std::string_view what) {
  const py::array a = require_ndim(obj, name, Kind::real, 1);
  const auto c = py::array_t<Scalar, py::array::c_style | py::array::forcecast>::ensure(a);
  if (!c) throw py::error_already_set();
  VectorT<Scalar> v(c.shape(0));
  if (v.size() > 0) std::memcpy(v.data(), c.data(), sizeof(Scalar) * static_cast<std::size_t>(v.size()));
  if (n >= 0 && v.size() != n)
    fail(name, fmt::format("({},)", v.size()), fmt::format("must be {}{}({},)", what, what.empty() ? "" : " = ", n));
  return v;
}

std::vector<float> values_arg(py::handle obj, std::string_view name, std::vector<py::ssize_t>& shape) {
  const py::array a = array_arg(obj, name, Kind::real);
  const auto c = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(a);
  if (!c) throw py::error_already_set();
  shape.assign(c.shape(), c.shape() + c.ndim());
  return std::vector<float>(c.data(), c.data() + c.size());
}

IndexMatrix index_matrix_arg(py::handle obj, std::string_view name, Index rows, Index cols, std::string_view what) {
  const py::array a = require_ndim(obj, name, Kind::integer, 2);
  const std::vector<std::int64_t> v = integers(a, name, true);
  IndexMatrix m(a.shape(0), a.shape(1));
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<std::int32_t>(v[static_cast<std::size_t>(i)]);
  require_dims(name, m.rows(), m.cols(), rows, cols, what);
  return m;
}

std::vector<std::int32_t> ints_arg(py::handle obj, std::string_view name, Index n, std::string_view what) {
  const py::array a = require_ndim(obj, name, Kind::integer, 1);
  const std::vector<std::int64_t> v = integers(a, name, true);
  if (n >= 0 && static_cast<Index>(v.size()) != n)
    fail(name, fmt::format("({},)", v.size()), fmt::format("must be {}{}({},)", what, what.empty() ? "" : " = ", n));
  return std::vector<std::int32_t>(v.begin(), v.end());
}

std::vector<std::int64_t> int64s_arg(py::handle obj, std::string_view name, Index n, std::string_view what) {
  const py::array a = require_ndim(obj, name, Kind::integer, 1);
  std::vector<std::int64_t> v = integers(a, name, false);
  if (n >= 0 && static_cast<Index>(v.size()) != n)
    fail(name, fmt::format("({},)", v.size()), fmt::format("must be {}{}({},)", what, what.empty() ? "" : " = ", n));
  return v;
}

std::vector<Index> lengths_arg(py::handle obj, std::string_view name) {
  if (obj.is_none()) return {};
  const std::vector<std::int64_t> v = int64s_arg(obj, name);
  return std::vector<Index>(v.begin(), v.end());
}

bool is_double(std::string_view precision) {
  if (precision == "float32") return false;
  if (precision == "float64") return true;
  fail("precision", fmt::format("\"{}\"", precision), "must be \"float32\" or \"float64\"");
}

template MatrixT<float> matrix_arg<float>(py::handle, std::string_view, Index, Index, std::string_view);
template MatrixT<double> matrix_arg<double>(py::handle, std::string_view, Index, Index, std::string_view);
template VectorT<float> vector_arg<float>(py::handle, std::string_view, Index, std::string_view);
template VectorT<double> vector_arg<double>(py::handle, std::string_view, Index, std::string_view);

// ---- arrays out --------------------------------------------------------------------------------

namespace {

// Moves `owner` to the heap, to be deleted by a capsule that the returned array keeps as its base.
template <typename Owner, typename T>
py::array view_of(Owner&& owner, std::vector<py::ssize_t> shape) {
  auto* held = new Owner(std::move(owner));
  py::capsule base(held, [](void* p) { delete static_cast<Owner*>(p); });
  std::vector<py::ssize_t> strides(shape.size());
  py::ssize_t stride = sizeof(T);
  for (std::size_t i = shape.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= shape[i];
  }
  return py::array(py::dtype::of<T>(), std::move(shape), std::move(strides), held->data(), base);
}

}  // namespace

template <typename Scalar>
py::array give(MatrixT<Scalar>&& m) {
  const std::vector<py::ssize_t> shape = {m.rows(), m.cols()};
  return view_of<MatrixT<Scalar>, Scalar>(std::move(m), shape);
}

template <typename Scalar>
py::array give(VectorT<Scalar>&& v) {
  const std::vector<py::ssize_t> shape = {v.size()};
  return view_of<VectorT<Scalar>, Scalar>(std::move(v), shape);
}

template <typename T>
py::array give(std::vector<T>&& v) {
  const std::vector<py::ssize_t> shape = {static_cast<py::ssize_t>(v.size())};
  return view_of<std::vector<T>, T>(std::move(v), shape);
}

template <typename T>
py::array give(std::vector<T>&& v, py::ssize_t rows, py::ssize_t cols) {
  require(rows * cols == static_cast<py::ssize_t>(v.size()), "shape", fmt::format("({}, {})", rows, cols),
          fmt::format("does not hold the {} values", v.size()));
  return view_of<std::vector<T>, T>(std::move(v), {rows, cols});
}

template py::array give<float>(MatrixT<float>&&);
template py::array give<double>(MatrixT<double>&&);
template py::array give<std::int32_t>(MatrixT<std::int32_t>&&);
template py::array give<std::int64_t>(MatrixT<std::int64_t>&&);
template py::array give<float>(VectorT<float>&&);
template py::array give<double>(VectorT<double>&&);
template py::array give<float>(std::vector<float>&&);
template py::array give<double>(std::vector<double>&&);
template py::array give<std::int32_t>(std::vector<std::int32_t>&&);
template py::array give<std::int64_t>(std::vector<std::int64_t>&&);
template py::array give<std::uint32_t>(std::vector<std::uint32_t>&&);
template py::array give<std::uint8_t>(std::vector<std::uint8_t>&&);
template py::array give<float>(std::vector<float>&&, py::ssize_t, py::ssize_t);
template py::array give<double>(std::vector<double>&&, py::ssize_t, py::ssize_t);
template py::array give<std::int32_t>(std::vector<std::int32_t>&&, py::ssize_t, py::ssize_t);
template py::array give<std::int64_t>(std::vector<std::int64_t>&&, py::ssize_t, py::ssize_t);

// ---- JSON ------------------------------------------------------------------------------------------

namespace {

Json json_value(py::handle obj, const std::string& path, int depth) {
  if (depth > 64) fail(path, "(nested deeper than 64)", "is not a configuration");
  if (obj.is_none()) return Json(nullptr);
  if (py::isinstance<py::bool_>(obj)) return Json(obj.cast<bool>());
  if (py::isinstance<py::int_>(obj)) {
    const auto v = obj.cast<py::int_>();
    if (PyLong_AsLongLong(v.ptr()) == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      const unsigned long long u = PyLong_AsUnsignedLongLong(v.ptr());
      if (PyErr_Occurred()) {
        PyErr_Clear();
        fail_arg(path, obj, "is an integer beyond 64 bits");
      }
      return Json(static_cast<std::uint64_t>(u));
    }
    return Json(static_cast<std::int64_t>(PyLong_AsLongLong(v.ptr())));
  }
  if (py::isinstance<py::float_>(obj)) return Json(obj.cast<double>());
  if (py::isinstance<py::str>(obj)) return Json(obj.cast<std::string>());
  if (py::isinstance<py::dict>(obj)) {
    Json j = Json::object();
    for (const auto& [key, value] : obj.cast<py::dict>()) {
      if (!py::isinstance<py::str>(key)) fail_arg(path + " key", key, "keys must be strings");
      const std::string k = key.cast<std::string>();
      j[k] = json_value(value, path.empty() ? k : path + "." + k, depth + 1);
    }
    return j;
  }
  if (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj)) {
    Json j = Json::array();
    std::size_t i = 0;
    for (const auto& item : obj) j.push_back(json_value(item, fmt::format("{}[{}]", path, i++), depth + 1));
    return j;
  }
  // numpy scalars and arrays: as their Python values.
  if (py::hasattr(obj, "tolist") && py::hasattr(obj, "dtype")) return json_value(obj.attr("tolist")(), path, depth);
  fail_arg(path, obj, "must be a dict, list, string, number, bool or None");
}

py::object from_json_impl(const Json& j, bool numbers) {
  switch (j.type()) {
    case Json::value_t::null: return py::none();
    case Json::value_t::boolean: return py::bool_(j.get<bool>());
    case Json::value_t::number_integer: return py::int_(j.get<std::int64_t>());
    case Json::value_t::number_unsigned: return py::int_(j.get<std::uint64_t>());
    case Json::value_t::number_float: return py::float_(j.get<double>());
    case Json::value_t::string: {
      const std::string& s = j.get_ref<const std::string&>();
      if (numbers) {
        if (s == "nan") return py::float_(std::numeric_limits<double>::quiet_NaN());
        if (s == "inf") return py::float_(std::numeric_limits<double>::infinity());
        if (s == "-inf") return py::float_(-std::numeric_limits<double>::infinity());
      }
      return py::str(s);
    }
    case Json::value_t::array: {
      py::list l;
      for (const Json& item : j) l.append(from_json_impl(item, numbers));
      return l;
    }
    case Json::value_t::object: {
      py::dict d;
      for (const auto& [key, value] : j.items()) d[py::str(key)] = from_json_impl(value, numbers);
      return d;
    }
    default: return py::none();  // binary and discarded values: never in moelab's JSON
  }
}

}  // namespace

Json json_arg(py::handle obj, std::string_view name) { return json_value(obj, std::string(name), 0); }
py::object from_json(const Json& j) { return from_json_impl(j, false); }
py::object from_json_numbers(const Json& j) { return from_json_impl(j, true); }

namespace {
Json config_object(py::handle config, std::string_view what) {
  if (!py::isinstance<py::dict>(config))
    fail_arg("config", config, fmt::format("must be a dict ({}; see moelab.preset())", what));
  return json_arg(config, "config");
}
}  // namespace

LayerConfig layer_config_arg(py::handle config) {
  return layer_config_from_json(config_object(config, "a LayerConfig"), "layer");
}

RoutingConfig routing_config_arg(py::handle config) {
  const Json j = config_object(config, "a LayerConfig or RoutingConfig");
  if (j.contains("routing")) return layer_config_from_json(j, "layer").routing;
  return routing_config_from_json(j, "routing");
}

ExpertConfig expert_config_arg(py::handle config) {
  const Json j = config_object(config, "an ExpertConfig or LayerConfig");
  if (j.contains("routing")) return layer_config_from_json(j, "layer").expert;
  return expert_config_from_json(j, "expert");
}

// ---- events ----------------------------------------------------------------------------------------

py::dict event_dict(const RecordedEvent& e) {
  py::dict d;
  d["name"] = e.name;
  d["layer"] = e.layer;
  d["step"] = e.step;
  const auto rows = static_cast<py::ssize_t>(e.shape[0]), cols = static_cast<py::ssize_t>(e.shape[1]);
  d["shape"] = py::make_tuple(rows, cols);
  if (!e.ids.empty()) {
    d["values"] = give(std::vector<std::int32_t>(e.ids), rows, cols);
  } else if (!e.values.empty()) {
    d["values"] = give(std::vector<double>(e.values), rows, cols);
  } else {
    d["values"] = give(std::vector<double>{}, 0, 0);
  }
  py::dict stats;
  for (const auto& [key, value] : e.stats) stats[py::str(key)] = value;
  d["stats"] = stats;
  return d;
}

py::list event_list(const std::vector<RecordedEvent>& events) {
  py::list l;
  for (const RecordedEvent& e : events) l.append(event_dict(e));
  return l;
}

Recorder* recorder_arg(py::handle recorder) {
  if (recorder.is_none()) return nullptr;
  try {
    return recorder.cast<Recorder*>();
  } catch (const py::cast_error&) {
    fail_arg("recorder", recorder, "must be a moelab.Recorder or None");
  }
}

Events::Events(bool record, py::handle recorder) : record_(record), user_(recorder_arg(recorder)) {
  if (record_ && user_ != nullptr) {
    fan_.add(local_);
    fan_.add(*user_);
    observer_ = &fan_;
  } else if (record_) {
    observer_ = &local_;
  } else {
    observer_ = user_;
  }
}

void Events::put(py::dict& out) const {
  if (record_) out["events"] = event_list(local_.events());
}

}  // namespace moelab::python
