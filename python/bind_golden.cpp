// moelab/python/bind_golden.cpp — the golden values (tools/golden/golden.h, docs/golden.md): the
// manifest, a case's tensors as arrays, `moelab check` on an implementation, and the same comparison
// on arrays a student's own kernel produced.
#include <fmt/format.h>

#include <cstring>

#include "python/bind.h"
#include "reference/files.h"
#include "reference/safetensors.h"
#include "tools/golden/golden.h"

namespace moelab::python {
namespace {

namespace golden = moelab::golden;

Json manifest_json(const std::string& dir) {
  const std::vector<std::uint8_t> bytes = read_file(std::filesystem::path(dir) / "manifest.json");
  return Json::parse(bytes.begin(), bytes.end());  // read_manifest validated it first
}

golden::Case find_case(const std::string& dir, const std::string& name) {
  golden::Manifest manifest = golden::read_manifest(dir);
  for (golden::Case& c : manifest.cases)
    if (c.name == name) {
      golden::load_case(c, dir);
      return std::move(c);
    }
  fail("name", fmt::format("\"{}\"", name), fmt::format("is not a case of {}/manifest.json (see golden_cases())", dir));
}

py::dict raw_entry(const std::string& dir, const std::string& name) {
  const Json manifest = manifest_json(dir);
  for (const Json& e : manifest["cases"])
    if (e.value("name", "") == name) return from_json_numbers(e).cast<py::dict>();
  fail("name", fmt::format("\"{}\"", name), fmt::format("is not a case of {}/manifest.json", dir));
}

// A tensor as an array of its shape: floats of 32 bits or fewer as float32 (bf16, f16, fp8 hold
// their exact values), F64 as float64, integers as themselves.
py::array tensor_array(const Tensor& t) {
  py::array a;
  switch (t.dtype) {
    case DType::f64: a = give(tensor_values(t)); break;
    case DType::f32:
    case DType::f16:
    case DType::bf16:
    case DType::f8_e4m3:
    case DType::f8_e5m2: {
      const std::vector<double> v = tensor_values(t);
      a = give(std::vector<float>(v.begin(), v.end()));
      break;
    }
    case DType::i64: {
      std::vector<std::int64_t> v(static_cast<std::size_t>(t.numel()));
      if (!v.empty()) std::memcpy(v.data(), t.data.data(), t.data.size());
      a = give(std::move(v));
      break;
    }
    case DType::i32: {
      std::vector<std::int32_t> v(static_cast<std::size_t>(t.numel()));
      if (!v.empty()) std::memcpy(v.data(), t.data.data(), t.data.size());
      a = give(std::move(v));
      break;
    }
    case DType::u8:
    case DType::boolean: {
      a = give(std::vector<std::uint8_t>(t.data));
      if (t.dtype == DType::boolean) a = a.attr("view")(py::dtype("bool"));
      break;
    }
  }
  return a.attr("reshape")(py::tuple(py::cast(t.shape)));
}

py::dict result_dict(const golden::CaseResult& r) {
  py::list checks;
  for (const golden::CheckResult& k : r.checks)
    checks.append(py::dict("tensor"_a = k.tensor, "verdict"_a = std::string(golden::verdict_name(k.verdict)),
                           "worst"_a = k.worst, "nmse"_a = k.nmse, "message"_a = k.message));
  return py::dict("name"_a = r.name, "verdict"_a = std::string(golden::verdict_name(r.verdict)), "worst"_a = r.worst,
                  "nmse"_a = r.nmse, "tolerance"_a = r.tolerance, "checks"_a = checks);
}

golden::CaseResult run_case(golden::Case& c, const std::string& impl) {
  try {
    return golden::compare_case(c, impl == "cpu" ? golden::run_cpu(c) : golden::run_cuda(c));
  } catch (const golden::NotSupported& e) {
    golden::CaseResult r{.name = c.name, .verdict = golden::Verdict::not_supported, .tolerance = "-"};
    r.checks.push_back({.tensor = "*", .verdict = golden::Verdict::not_supported, .message = e.what()});
    return r;
  }
}

// One produced array as the Tensor compare_case reads: float64 values, int64 integers; for a
// bitwise check, the expected tensor's own dtype (integer arrays are then its bit patterns).
Tensor produced_tensor(const std::string& name, py::handle value, const Tensor& expected, bool bitwise) {
  const std::string field = fmt::format("produced['{}']", name);
  const py::array a = array_arg(value, field, Kind::real);
  std::vector<std::int64_t> shape(a.shape(), a.shape() + a.ndim());
  const bool integer = a.dtype().kind() != 'f';
  Tensor t;
  if (bitwise && integer && is_float(expected.dtype)) {
    const auto c = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
    const std::size_t w = dtype_size(expected.dtype);
    t.dtype = expected.dtype;
    t.data.resize(static_cast<std::size_t>(c.size()) * w);
    for (py::ssize_t i = 0; i < c.size(); ++i) {
      const std::int64_t bits = c.data()[i];
      require(bits >= 0 && (w >= 8 || bits < (std::int64_t{1} << (8 * w))), fmt::format("{}[{}]", field, i), bits,
              fmt::format("must be a {}-bit pattern of {}", 8 * w, dtype_name(expected.dtype)));
      for (std::size_t b = 0; b < w; ++b)
        t.data[static_cast<std::size_t>(i) * w + b] = static_cast<std::uint8_t>((bits >> (8 * b)) & 0xFF);
    }
  } else if (integer) {
    const auto c = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
    t = tensor_from(std::span<const std::int64_t>(c.data(), static_cast<std::size_t>(c.size())),
                    bitwise ? expected.dtype : DType::i64);
  } else {
    const auto c = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(a);
    t = tensor_from(std::span<const double>(c.data(), static_cast<std::size_t>(c.size())),
                    bitwise ? expected.dtype : DType::f64);
  }
  t.shape = std::move(shape);
  return t;
}

}  // namespace

void bind_golden(py::module_& m) {
  m.def(
      "golden_cases",
      [](const std::string& dir, const std::string& pattern) {
        golden::read_manifest(dir);  // validates
        const Json manifest = manifest_json(dir);
        py::list l;
        for (const Json& e : manifest["cases"])
          if (golden::glob_match(pattern, e.value("name", ""))) l.append(from_json_numbers(e));
        return l;
      },
      "dir"_a = "golden", "pattern"_a = "*",
      "The manifest entries (validated) of the golden cases whose names match the shell glob `pattern`.");
  m.def(
      "load_golden_case",
      [](const std::string& dir, const std::string& name) {
        const golden::Case c = find_case(dir, name);
        py::dict d = raw_entry(dir, name);
        py::dict tensors, inputs, params, expected;
        for (const auto& [tname, t] : c.file.tensors) {
          py::array a = tensor_array(t);
          tensors[py::str(tname)] = a;
          if (tname.starts_with("input.")) {
            inputs[py::str(tname.substr(6))] = a;
          } else if (tname.starts_with("param.")) {
            params[py::str(tname.substr(6))] = a;
          } else {
            expected[py::str(tname)] = a;
          }
        }
        d["tensors"] = tensors;
        d["inputs"] = inputs;
        d["params"] = params;
        d["expected"] = expected;
        return d;
      },
      "dir"_a, "name"_a,
      R"(A golden case: its manifest entry, and tensors (every tensor by full name), inputs ("input." stripped),
params ("param." stripped: a layer params dict), expected (output.* and grad.* by full name).)");
  m.def(
      "check_golden",
      [](const std::string& dir, const std::string& impl, const std::string& pattern) {
        require(impl == "cpu" || impl == "cuda", "impl", impl, "must be cpu or cuda");
        golden::Manifest manifest = golden::read_manifest(dir);
        py::list rows;
        bool any = false;
        for (golden::Case& c : manifest.cases) {
          if (!golden::glob_match(pattern, c.name)) continue;
          any = true;
          golden::CaseResult r;
          {
            py::gil_scoped_release release;
            golden::load_case(c, dir);
            r = run_case(c, impl);
          }
          rows.append(result_dict(r));
        }
        require(any, "pattern", pattern, fmt::format("matches no case in {}/manifest.json", dir));
        return rows;
      },
      "dir"_a = "golden", "impl"_a = "cpu", "pattern"_a = "*",
      R"(`moelab check`: runs an implementation ("cpu": the reference in float32, "cuda": the kernels) on every
matching case. One row per case: name, verdict (pass, fail, ambiguous, not_supported), worst, nmse, tolerance,
checks (tensor, verdict, worst, nmse, message).)");
  m.def(
      "check_golden_arrays",
      [](const std::string& dir, const std::string& name, py::dict produced) {
        const golden::Case c = find_case(dir, name);
        golden::Produced p;
        for (const auto& [key, value] : produced) {
          const std::string k = py::str(key).cast<std::string>();
          const auto it = c.file.tensors.find(k);
          if (it == c.file.tensors.end() || k.starts_with("input.") || k.starts_with("param.")) {
            std::string known;
            for (const auto& [tname, t] : c.file.tensors)
              if (!tname.starts_with("input.") && !tname.starts_with("param."))
                known += (known.empty() ? "" : ", ") + tname;
            fail(fmt::format("produced['{}']", k), "(given)",
                 fmt::format("is not an expected tensor of case {} (expected: {})", name, known));
          }
          bool bitwise = false;
          for (const golden::Check& check : c.checks)
            if (check.tensor == k && check.compare == "bitwise") bitwise = true;
          p[k] = produced_tensor(k, value, it->second, bitwise);
        }
        return result_dict(golden::compare_case(c, p));
      },
      "dir"_a, "name"_a, "produced"_a,
      R"(Checks your own arrays against a golden case exactly as `moelab check` does: produced maps expected tensor
names ("output.y", "grad.x", ...) to arrays. Tensors left out are "not supported". Returns one row as
check_golden does.)");
}

}  // namespace moelab::python
