// moelab/python/module.cpp — the `moelab` module: its exceptions, version, the Recorder and the Rng,
// and the topics of the other binding files (python/API.md).
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "python/bind.h"
#include "reference/random.h"
#include "reference/recorder.h"
#include "tools/golden/golden.h"

namespace moelab::python {
namespace {

// n draws of `draw`, as a float or a float64 array of `shape` filled row-major.
template <typename Draw>
py::object draws(py::handle shape, Draw draw) {
  if (shape.is_none()) return py::float_(draw());
  std::vector<py::ssize_t> dims;
  if (py::isinstance<py::int_>(shape)) {
    dims.push_back(shape.cast<py::ssize_t>());
  } else {
    try {
      dims = shape.cast<std::vector<py::ssize_t>>();
    } catch (const py::cast_error&) {
      fail_arg("shape", shape, "must be an int or a tuple of ints");
    }
  }
  py::ssize_t n = 1;
  for (py::ssize_t d : dims) {
    require(d >= 0, "shape", shown(shape), "dimensions must be >= 0");
    n *= d;
  }
  std::vector<double> values(static_cast<std::size_t>(n));
  for (double& v : values) v = draw();
  py::array a = give(std::move(values));
  return a.attr("reshape")(py::tuple(py::cast(dims)));
}

void bind_recorder(py::module_& m) {
  py::class_<Recorder>(m, "Recorder", R"(Keeps copies of the events of the stages it is given to (recorder.h
MemoryRecorder). Recorder(names=None): only events with these names, if given.
Pass it as recorder= to the routing, layer and training functions.)")
      .def(py::init([](py::object names) {
             std::vector<std::string> kept;
             if (!names.is_none()) {
               try {
                 kept = names.cast<std::vector<std::string>>();
               } catch (const py::cast_error&) {
                 fail_arg("names", names, "must be a list of event names, or None");
               }
             }
             return std::make_unique<Recorder>(std::move(kept));
           }),
           "names"_a = py::none())
      .def(
          "events",
          [](const Recorder& r, py::object name) {
            const std::vector<RecordedEvent> all = r.snapshot();
            if (name.is_none()) return event_list(all);
            const std::string n = name.cast<std::string>();
            py::list l;
            for (const RecordedEvent& e : all)
              if (e.name == n) l.append(event_dict(e));
            return l;
          },
          "name"_a = py::none(), "The recorded events as dicts (all, or those named `name`), in order.")
      .def("__len__", &Recorder::size)
      .def(
          "count", [](const Recorder& r, const std::string& name) { return r.count(name); }, "name"_a,
          "How many events named `name` were recorded.")
      .def(
          "last", [](const Recorder& r, const std::string& name) { return event_dict(r.last(name)); },
          "name"_a, "The latest event named `name` (Error if there is none).")
      .def("clear", &Recorder::clear, "Forgets every event.");

  m.def(
      "read_events",
      [](const std::string& path) { return event_list(read_json_lines_file(path)); }, "path"_a,
      "The events of a JSON-lines file (a run's metrics.jsonl) as a list of event dicts (recorder.h format).");
}

void bind_rng(py::module_& m) {
  py::class_<Rng>(m, "Rng", R"(The reference's SplitMix64 generator (reference/random.h): the same seed gives the
same numbers as in C++. Rng(seed).)")
      .def(py::init<std::uint64_t>(), "seed"_a)
      .def("next_u64", &Rng::next_u64, "The next 64-bit output, as an int.")
      .def(
          "uniform", [](Rng& r, py::object shape) { return draws(shape, [&] { return r.uniform(); }); },
          "shape"_a = py::none(), "Uniform in [0, 1): a float, or a float64 array of `shape` filled row-major.")
      .def(
          "normal", [](Rng& r, py::object shape) { return draws(shape, [&] { return r.normal(); }); },
          "shape"_a = py::none(),
          "Standard normal (Box-Muller, two uniforms per value): a float, or a float64 array of `shape`.");
  m.def("hash64", &hash64, "x"_a, "SplitMix64's mixer (the hash of hash routing).");
}

}  // namespace
}  // namespace moelab::python

PYBIND11_MODULE(moelab, m) {
  namespace mp = moelab::python;
  m.doc() = R"(moelab: an instrumented reference implementation of Mixture-of-Experts layers.

The C++ reference, golden values, tiny language model, training and analysis, for the course
notebooks. python/API.md (docs/python.md) documents every function; help(moelab.<name>) too.)";
  m.attr("__version__") = std::string(moelab::golden::moelab_version());

  // moelab::Error (bad input: the field, the value and the rule) is a ValueError.
  pybind11::register_exception<moelab::Error>(m, "Error", PyExc_ValueError);
  pybind11::register_exception<moelab::golden::NotSupported>(m, "NotSupported", PyExc_RuntimeError);

  mp::bind_recorder(m);
  mp::bind_rng(m);
  mp::bind_numerics(m);
  mp::bind_configs(m);
  mp::bind_routing(m);
  mp::bind_layer(m);
  mp::bind_golden(m);
  mp::bind_model(m);
  mp::bind_analysis(m);
}
