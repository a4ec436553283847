// moelab/python/bind_numerics.cpp — reference/numerics.h: the low-precision formats, element-wise over
// arrays of any shape, and the softmax held in a format (docs/numerics.md).
#include <fmt/format.h>

#include <functional>

#include "python/bind.h"
#include "reference/numerics.h"

namespace moelab::python {
namespace {

Overflow overflow_of(bool saturate) { return saturate ? Overflow::saturating : Overflow::nonsaturating; }

// f applied to every element of x (a real array of any shape, or a scalar): an array of x's shape
// (a Python scalar for a 0-d input).
template <typename Out, typename F>
py::object elementwise_real(py::handle x, std::string_view name, F f) {
  std::vector<py::ssize_t> shape;
  const std::vector<float> in = values_arg(x, name, shape);
  std::vector<Out> out(in.size());
  for (std::size_t i = 0; i < in.size(); ++i) out[i] = f(in[i]);
  if (shape.empty()) return py::cast(out[0]);
  py::array a = give(std::move(out));
  return a.attr("reshape")(py::tuple(py::cast(shape)));
}

// The same for bit patterns (a non-negative integer array of any shape).
template <typename Out, typename F>
py::object elementwise_bits(py::handle bits, std::string_view name, F f) {
  const py::array a = array_arg(bits, name, Kind::integer);
  const auto c = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
  if (!c) throw py::error_already_set();
  std::vector<Out> out(static_cast<std::size_t>(c.size()));
  for (py::ssize_t i = 0; i < c.size(); ++i) {
    const std::int64_t b = c.data()[i];
    require(b >= 0 && b <= 0xFFFFFFFFll, fmt::format("{}[{}]", name, i), b, "must be a bit pattern in [0, 2^32)");
    out[static_cast<std::size_t>(i)] = f(static_cast<std::uint32_t>(b));
  }
  const std::vector<py::ssize_t> shape(c.shape(), c.shape() + c.ndim());
  if (shape.empty()) return py::cast(out[0]);
  py::array r = give(std::move(out));
  return r.attr("reshape")(py::tuple(py::cast(shape)));
}

py::dict info_dict(const FormatInfo& i) {
  return py::dict("name"_a = std::string(i.name), "bits"_a = i.bits, "exponent_bits"_a = i.exponent_bits,
                  "mantissa_bits"_a = i.mantissa_bits, "bias"_a = i.bias, "has_inf"_a = i.has_inf, "max"_a = i.max,
                  "min_normal"_a = i.min_normal, "min_subnormal"_a = i.min_subnormal, "epsilon"_a = i.epsilon,
                  "max_exp_input"_a = i.max_exp_input);
}

}  // namespace

void bind_numerics(py::module_& m) {
  m.def(
      "formats",
      [] {
        std::vector<std::string> names;
        for (Format f : kAllFormats) names.emplace_back(format_name(f));
        return names;
      },
      "The format names: fp32, bf16, fp16, fp8_e4m3, fp8_e5m2.");
  m.def(
      "format_info", [](const std::string& dtype) { return info_dict(format_info(parse_format(dtype))); }, "dtype"_a,
      "Facts about a format: name, bits, exponent_bits, mantissa_bits, bias, has_inf, max, min_normal, "
      "min_subnormal, epsilon, max_exp_input.");
  m.def(
      "round_to",
      [](py::handle x, const std::string& dtype, bool saturate) {
        const Format f = parse_format(dtype);
        return elementwise_real<float>(x, "x", [&](float v) { return round_to(v, f, overflow_of(saturate)); });
      },
      "x"_a, "dtype"_a, "saturate"_a = false,
      "x rounded to the nearest value of the format (round to nearest even), as float32 of x's shape. "
      "saturate: overflow to +-max instead of +-inf (NaN for fp8_e4m3).");
  m.def(
      "encode",
      [](py::handle x, const std::string& dtype, bool saturate) {
        const Format f = parse_format(dtype);
        return elementwise_real<std::uint32_t>(x, "x", [&](float v) { return encode(v, f, overflow_of(saturate)); });
      },
      "x"_a, "dtype"_a, "saturate"_a = false, "The bit pattern of x rounded to the format, as uint32 (low bits).");
  m.def(
      "decode",
      [](py::handle bits, const std::string& dtype) {
        const Format f = parse_format(dtype);
        return elementwise_bits<float>(bits, "bits", [&](std::uint32_t b) { return decode(b, f); });
      },
      "bits"_a, "dtype"_a, "The value (float32) of each bit pattern in the format.");
  m.def(
      "ulp",
      [](py::handle x, const std::string& dtype) {
        const Format f = parse_format(dtype);
        return elementwise_real<float>(x, "x", [&](float v) { return ulp(v, f); });
      },
      "x"_a, "dtype"_a, "Spacing of the format's values at x (Error for non-finite x).");
  m.def(
      "flip_bit",
      [](py::handle x, int bit, const std::string& dtype) {
        const Format f = parse_format(dtype);
        return elementwise_real<float>(x, "x", [&](float v) { return flip_bit_value(v, bit, f); });
      },
      "x"_a, "bit"_a, "dtype"_a,
      "x stored in the format with bit `bit` of its pattern inverted (bit 0 = last mantissa bit, "
      "bits - 1 = sign), as float32 of x's shape.");
  m.def(
      "flip_bit_pattern",
      [](py::handle bits, int bit, const std::string& dtype) {
        const Format f = parse_format(dtype);
        return elementwise_bits<std::uint32_t>(bits, "bits", [&](std::uint32_t b) { return flip_bit(b, bit, f); });
      },
      "bits"_a, "bit"_a, "dtype"_a, "The bit patterns with bit `bit` inverted.");
  m.def(
      "bit_class", [](int bit, const std::string& dtype) { return std::string(bit_class_name(bit_class(bit, parse_format(dtype)))); },
      "bit"_a, "dtype"_a, "\"sign\", \"exponent\" or \"mantissa\": what bit `bit` of the format is.");
  m.def(
      "decompose",
      [](py::handle bits, const std::string& dtype) {
        const Format f = parse_format(dtype);
        py::dict d;
        d["sign"] = elementwise_bits<std::uint32_t>(bits, "bits", [&](std::uint32_t b) { return decompose(b, f).sign; });
        d["exponent"] =
            elementwise_bits<std::uint32_t>(bits, "bits", [&](std::uint32_t b) { return decompose(b, f).exponent; });
        d["mantissa"] =
            elementwise_bits<std::uint32_t>(bits, "bits", [&](std::uint32_t b) { return decompose(b, f).mantissa; });
        return d;
      },
      "bits"_a, "dtype"_a, "The fields of each bit pattern: dict of uint32 arrays sign, exponent, mantissa.");
  m.def(
      "value_class",
      [](py::handle bits, const std::string& dtype) -> py::object {
        const Format f = parse_format(dtype);
        const py::array a = array_arg(bits, "bits", Kind::integer);
        py::object codes = elementwise_bits<std::int32_t>(
            bits, "bits", [&](std::uint32_t b) { return static_cast<std::int32_t>(classify(b, f)); });
        if (a.ndim() == 0)
          return py::str(std::string(value_class_name(static_cast<ValueClass>(codes.cast<std::int32_t>()))));
        py::list names;
        for (ValueClass c : {ValueClass::zero, ValueClass::subnormal, ValueClass::normal, ValueClass::infinite,
                             ValueClass::nan})
          names.append(std::string(value_class_name(c)));
        return py::module_::import("numpy").attr("array")(names)[codes];
      },
      "bits"_a, "dtype"_a,
      "\"zero\", \"subnormal\", \"normal\", \"infinite\" or \"nan\" for a pattern (an array of str for an array).");
  m.def(
      "softmax_in_format",
      [](py::handle logits, const std::string& dtype, const std::string& method) {
        const Format f = parse_format(dtype);
        SoftmaxMethod sm;
        if (method == "naive") {
          sm = SoftmaxMethod::naive;
        } else if (method == "stable") {
          sm = SoftmaxMethod::stable;
        } else {
          fail("method", fmt::format("\"{}\"", method), "must be \"naive\" or \"stable\"");
        }
        std::vector<py::ssize_t> shape;
        const std::vector<float> x = values_arg(logits, "logits", shape);
        require(shape.size() == 1, "logits", fmt::format("({} dimensions)", shape.size()), "must be 1-d (E)");
        LowpSoftmax s = softmax_in_format(x, f, sm);
        py::dict d;
        const bool overflowed = s.overflowed();
        d["logits"] = give(std::move(s.logits));
        d["shifted"] = give(std::move(s.shifted));
        d["exps"] = give(std::move(s.exps));
        d["sum"] = s.sum;
        d["probs"] = give(std::move(s.probs));
        d["overflow_count"] = s.overflow_count;
        d["nan_count"] = s.nan_count;
        d["overflowed"] = overflowed;
        return d;
      },
      "logits"_a, "dtype"_a, "method"_a = "stable",
      "Softmax of a 1-d vector with every intermediate held in the format (numerics.h). method: \"naive\" "
      "(exp(x_i) / sum exp(x_j)) or \"stable\" (x - max first). Returns logits, shifted, exps, probs (float32), "
      "sum, overflow_count, nan_count, overflowed.");
}

}  // namespace moelab::python
