// moelab/reference/safetensors.cpp — see safetensors.h for the format and the reader's rules.
//
// The reader trusts nothing: every length and offset in the header is checked, with 64-bit
// arithmetic that cannot overflow, against the bytes actually given, before any byte is copied.
#include "reference/safetensors.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "reference/error.h"
#include "reference/files.h"

namespace moelab {
namespace {

// std::map objects: the header's keys come out sorted, byte-wise, as the format's readers expect
// nothing of but determinism needs.
using Json = nlohmann::json;

constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;  // the Rust reader's limit
// A header nests 3 deep ({ "t": { "shape": [ ] } }). Deeper input is rejected before it is built,
// which bounds the recursion of everything that walks the JSON (dump, destruction).
constexpr int kMaxDepth = 64;

// ---- dtypes -------------------------------------------------------------------------------------

struct DTypeInfo {
  DType dtype;
  std::string_view name;
  std::size_t size;
};
// In the order of the enum.
constexpr DTypeInfo kDTypes[] = {
    {DType::f64, "F64", 8},          {DType::f32, "F32", 4},         {DType::f16, "F16", 2},
    {DType::bf16, "BF16", 2},        {DType::f8_e4m3, "F8_E4M3", 1}, {DType::f8_e5m2, "F8_E5M2", 1},
    {DType::i64, "I64", 8},          {DType::i32, "I32", 4},         {DType::u8, "U8", 1},
    {DType::boolean, "BOOL", 1},
};

const DTypeInfo& info(DType dtype) {
  const auto i = static_cast<std::size_t>(dtype);
  if (i >= std::size(kDTypes)) fail("dtype", i, "is not a DType");
  return kDTypes[i];
}

std::string known_dtypes() {
  std::string names;
  for (const DTypeInfo& d : kDTypes) names += fmt::format("{}{}", names.empty() ? "" : ", ", d.name);
  return names;
}

// ---- sizes, with overflow checks ----------------------------------------------------------------

// The product of the dimensions (1 for a scalar); nullopt for a negative dimension or an overflow.
std::optional<std::int64_t> element_count(std::span<const std::int64_t> shape) {
  std::int64_t n = 1;
  for (std::int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return std::nullopt;
  }
  return n;
}

std::optional<std::int64_t> byte_count(std::span<const std::int64_t> shape, DType dtype) {
  const std::optional<std::int64_t> n = element_count(shape);
  std::int64_t bytes = 0;
  if (!n || __builtin_mul_overflow(*n, static_cast<std::int64_t>(dtype_size(dtype)), &bytes)) return std::nullopt;
  return bytes;
}

std::string shape_text(std::span<const std::int64_t> shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

// ---- little-endian bytes ------------------------------------------------------------------------

void put_le(std::vector<std::uint8_t>& out, std::uint64_t bits, std::size_t size) {
  for (std::size_t i = 0; i < size; ++i) out.push_back(static_cast<std::uint8_t>(bits >> (8 * i)));
}

std::uint64_t get_le(const std::uint8_t* p, std::size_t size) {
  std::uint64_t bits = 0;
  for (std::size_t i = 0; i < size; ++i) bits |= std::uint64_t{p[i]} << (8 * i);
  return bits;
}

// ---- values -> bytes ----------------------------------------------------------------------------

// The float nearest to v, except that an inexact result is rounded to odd (to the one of the two
// floats around v whose last bit is 1). Rounding that to bf16, f16 or fp8 (each has at least two
// fewer significant bits) then gives exactly v rounded to nearest even, as if done in one step
// (Boldo & Melquiond, "Emulation of FMA and correctly rounded sums", 2008). Plain double -> float
// -> bf16 would round twice: 1 + 2^-8 + 2^-40 would become 1 + 2^-8, a tie, then 1, instead of
// 1 + 2^-7.
float to_float_rounded_to_odd(double v) {
  const float f = static_cast<float>(v);
  if (std::isnan(v) || static_cast<double>(f) == v || (std::bit_cast<std::uint32_t>(f) & 1u) != 0) return f;
  const float toward = static_cast<double>(f) < v ? std::numeric_limits<float>::infinity()
                                                  : -std::numeric_limits<float>::infinity();
  return std::nextafter(f, toward);
}

// The same for an integer to double (needed above 2^53, where doubles are sparser than int64s).
double to_double_rounded_to_odd(std::int64_t v) {
  const double d = static_cast<double>(v);
  constexpr double k2to63 = 9223372036854775808.0;
  // d can be 2^63 (v near INT64_MAX), which does not convert back to int64.
  const bool above = d == k2to63 || static_cast<std::int64_t>(d) > v;
  const bool exact = d != k2to63 && static_cast<std::int64_t>(d) == v;
  if (exact || (std::bit_cast<std::uint64_t>(d) & 1u) != 0) return d;
  return std::nextafter(d, above ? -std::numeric_limits<double>::infinity() : std::numeric_limits<double>::infinity());
}

struct IntRange {
  std::int64_t lo, hi;
};
IntRange int_range(DType dtype) {
  switch (dtype) {
    case DType::i64: return {std::numeric_limits<std::int64_t>::min(), std::numeric_limits<std::int64_t>::max()};
    case DType::i32: return {std::numeric_limits<std::int32_t>::min(), std::numeric_limits<std::int32_t>::max()};
    case DType::u8: return {0, 255};
    case DType::boolean: return {0, 1};
    default: fail("dtype", dtype_name(dtype), "is not an integer dtype");
  }
}

// Appends the elements of a tensor being built; `Where` names element i for messages.
template <typename Where>
class Encoder {
 public:
  Encoder(Tensor& tensor, Where where) : tensor_(tensor), where_(where) {}

  void add(double v, std::int64_t i) {
    const DType dtype = tensor_.dtype;
    std::vector<std::uint8_t>& out = tensor_.data;
    switch (dtype) {
      case DType::f64: return put_le(out, std::bit_cast<std::uint64_t>(v), 8);
      case DType::f32: return put_le(out, std::bit_cast<std::uint32_t>(static_cast<float>(v)), 4);
      case DType::f16:
      case DType::bf16:
      case DType::f8_e4m3:
      case DType::f8_e5m2:
        return put_le(out, encode(to_float_rounded_to_odd(v), dtype_format(dtype), Overflow::nonsaturating),
                      dtype_size(dtype));
      default: break;
    }
    // An integer dtype: integer values only, checked before the conversion (which would be
    // undefined behaviour out of range). 2^63 is the first double above INT64_MAX.
    const IntRange r = int_range(dtype);
    if (!std::isfinite(v) || std::trunc(v) != v || v < -9223372036854775808.0 || v >= 9223372036854775808.0 ||
        static_cast<std::int64_t>(v) < r.lo || static_cast<std::int64_t>(v) > r.hi) {
      fail(where_(i), v, fmt::format("dtype {} holds integers in [{}, {}] only", dtype_name(dtype), r.lo, r.hi));
    }
    add_integer(static_cast<std::int64_t>(v), i);
  }

  void add(std::int64_t v, std::int64_t i) {
    const DType dtype = tensor_.dtype;
    if (dtype == DType::f64) return add(static_cast<double>(v), i);
    if (is_float(dtype)) return add(to_double_rounded_to_odd(v), i);
    add_integer(v, i);
  }

 private:
  void add_integer(std::int64_t v, std::int64_t i) {
    const DType dtype = tensor_.dtype;
    const IntRange r = int_range(dtype);
    if (v < r.lo || v > r.hi) {
      fail(where_(i), v, fmt::format("dtype {} holds integers in [{}, {}] only", dtype_name(dtype), r.lo, r.hi));
    }
    put_le(tensor_.data, static_cast<std::uint64_t>(v), dtype_size(dtype));  // two's complement
  }

  Tensor& tensor_;
  Where where_;
};

template <typename Values, typename Where>
Tensor encode_all(const Values& values, std::int64_t n, DType dtype, std::vector<std::int64_t> shape, Where where) {
  Tensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.data.reserve(static_cast<std::size_t>(n) * dtype_size(dtype));
  Encoder<Where> encoder(t, where);
  for (std::int64_t i = 0; i < n; ++i) encoder.add(values(i), i);
  return t;
}

// ---- bytes -> values ----------------------------------------------------------------------------

void require_data_size(const Tensor& t) {
  const std::optional<std::int64_t> need = byte_count(t.shape, t.dtype);
  if (!need) fail("shape", shape_text(t.shape), "must be non-negative dimensions whose product fits in int64");
  if (static_cast<std::uint64_t>(*need) != t.data.size()) {
    fail("data", fmt::format("{} bytes", t.data.size()),
         fmt::format("dtype {} and shape {} need {}", dtype_name(t.dtype), shape_text(t.shape), *need));
  }
}

std::int64_t integer_at(const Tensor& t, std::int64_t i) {
  const std::uint8_t* p = t.data.data() + i * static_cast<std::int64_t>(dtype_size(t.dtype));
  switch (t.dtype) {
    case DType::i64: return static_cast<std::int64_t>(get_le(p, 8));
    case DType::i32: return static_cast<std::int32_t>(static_cast<std::uint32_t>(get_le(p, 4)));
    case DType::u8: return p[0];
    case DType::boolean:
      // numpy would read 2 as True; a writer that stored 2 has a bug we would rather see.
      if (p[0] > 1) fail(fmt::format("element {}", i), int{p[0]}, "a BOOL byte must be 0 or 1");
      return p[0];
    default: fail("dtype", dtype_name(t.dtype), "is not an integer dtype");
  }
}

double value_at(const Tensor& t, std::int64_t i) {
  const std::size_t size = dtype_size(t.dtype);
  const std::uint8_t* p = t.data.data() + i * static_cast<std::int64_t>(size);
  switch (t.dtype) {
    case DType::f64: return std::bit_cast<double>(get_le(p, 8));
    case DType::f32: return std::bit_cast<float>(static_cast<std::uint32_t>(get_le(p, 4)));
    case DType::f16:
    case DType::bf16:
    case DType::f8_e4m3:
    case DType::f8_e5m2: return decode(static_cast<std::uint32_t>(get_le(p, size)), dtype_format(t.dtype));
    default: return static_cast<double>(integer_at(t, i));
  }
}

// (rows, cols) of a tensor seen as a matrix.
std::pair<Index, Index> matrix_shape(const Tensor& t, std::string_view name) {
  switch (t.shape.size()) {
    case 0: return {1, 1};
    case 1: return {t.shape[0], 1};
    case 2: return {t.shape[0], t.shape[1]};
    default:
      fail(fmt::format("tensor '{}': shape", name), shape_text(t.shape), "must have 0, 1 or 2 dimensions for a matrix");
  }
}

// Runs f, prefixing the message of an Error it throws with "tensor '<name>': ".
template <typename F>
auto naming(std::string_view name, F&& f) {
  try {
    return f();
  } catch (const Error& e) {
    throw Error(fmt::format("tensor '{}': {}", name, e.what()));
  }
}

// ---- the header ---------------------------------------------------------------------------------

// A name or a JSON value for a message, cut short: both come from the file and can be megabytes.
// The cut does not split a UTF-8 character, so the message stays valid UTF-8.
std::string cut(std::string s) {
  constexpr std::size_t kMax = 60;
  if (s.size() <= kMax) return s;
  std::size_t end = kMax - 3;
  while (end > 0 && (static_cast<unsigned char>(s[end]) & 0xC0) == 0x80) --end;  // a continuation byte
  return s.substr(0, end) + "...";
}

// nlohmann's syntax errors quote the bytes last read, which can be anything (invalid UTF-8
// included): all but printable ASCII as \xNN.
std::string printable(std::string_view s) {
  std::string out;
  for (const char c : s) {
    const auto byte = static_cast<unsigned char>(c);
    out += byte >= 0x20 && byte < 0x7F ? std::string(1, c) : fmt::format("\\x{:02X}", byte);
  }
  return out;
}
std::string brief(const Json& j) { return cut(j.dump(-1, ' ', false, Json::error_handler_t::replace)); }
std::string tensor_field(const std::string& name, std::string_view field) {
  return fmt::format("tensor '{}': {}", cut(name), field);
}

// Throws Error("<what>: <field> = <value>: <rule>").
template <typename T>
[[noreturn]] void reject(std::string_view what, std::string_view field, const T& value, std::string_view rule) {
  throw Error(fmt::format("{}: {} = {}: {}", what, field, value, rule));
}

// A first pass over the header that builds nothing and rejects what nlohmann's parser would
// accept quietly or at great cost: a key given twice in one object (last one wins there, but
// another reader may take the first: the same file would mean two things), and nesting deeper
// than kMaxDepth. Syntax errors, invalid UTF-8 included, are reported here too.
class HeaderCheck : public nlohmann::json_sax<Json> {
 public:
  std::string problem;

  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override {
    keys_.emplace_back();
    return deeper();
  }
  bool key(string_t& k) override {
    if (keys_.back().insert(k).second) return true;
    problem = fmt::format("key \"{}\" appears twice in one object", cut(k));
    return false;
  }
  bool end_object() override {
    keys_.pop_back();
    --depth_;
    return true;
  }
  bool start_array(std::size_t) override { return deeper(); }
  bool end_array() override {
    --depth_;
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) override {
    // "[json.exception.parse_error.101] parse error at line 1, column 5: ...": drop the bracket.
    const std::string text = e.what();
    const std::size_t end = text.find("] ");
    problem = "not valid JSON: " + printable(end == std::string::npos ? text : text.substr(end + 2));
    return false;
  }

 private:
  bool deeper() {
    if (++depth_ <= kMaxDepth) return true;
    problem = fmt::format("nested deeper than {} levels (a safetensors header needs 3)", kMaxDepth);
    return false;
  }
  int depth_ = 0;
  std::vector<std::set<std::string, std::less<>>> keys_;  // per object being read
};

Json parse_header(std::span<const std::uint8_t> text, std::string_view what) {
  HeaderCheck check;
  if (!Json::sax_parse(text.begin(), text.end(), &check) || !check.problem.empty()) {
    throw Error(fmt::format("{}: header: {}", what, check.problem.empty() ? "not valid JSON" : check.problem));
  }
  try {
    return Json::parse(text.begin(), text.end());
  } catch (const Json::exception& e) {  // not expected after the check above
    throw Error(fmt::format("{}: header: not valid JSON: {}", what, e.what()));
  }
}

// A non-negative JSON integer (3.0 is not one: writers keep the distinction).
std::optional<std::uint64_t> unsigned_of(const Json& j) {
  if (j.is_number_unsigned()) return j.get<std::uint64_t>();
  if (j.is_number_integer() && j.get<std::int64_t>() >= 0) return static_cast<std::uint64_t>(j.get<std::int64_t>());
  return std::nullopt;
}

std::map<std::string, std::string> parse_metadata(const Json& j, std::string_view what) {
  if (!j.is_object()) reject(what, "__metadata__", brief(j), "must be an object of strings");
  std::map<std::string, std::string> metadata;
  for (const auto& [key, value] : j.get_ref<const Json::object_t&>()) {
    if (!value.is_string()) reject(what, fmt::format("__metadata__ '{}'", cut(key)), brief(value), "must be a string");
    metadata.emplace(key, value.get<std::string>());
  }
  return metadata;
}

// Where a tensor's bytes lie in the data buffer.
struct Extent {
  std::uint64_t begin, end;
  const std::string* name;
};

// One header entry, checked and filled from `buffer`.
Tensor parse_entry(const std::string& name, const Json& entry, std::span<const std::uint8_t> buffer,
                   std::string_view what, Extent& extent) {
  if (name.empty()) reject(what, "tensor name", "\"\"", "must not be empty");
  if (!entry.is_object()) {
    reject(what, tensor_field(name, "entry"), brief(entry), "must be an object with dtype, shape and data_offsets");
  }
  for (const auto& [key, value] : entry.get_ref<const Json::object_t&>()) {
    if (key != "dtype" && key != "shape" && key != "data_offsets") {
      reject(what, tensor_field(name, "field"), fmt::format("\"{}\"", cut(key)),
             "not allowed: an entry has dtype, shape and data_offsets only");
    }
  }
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    if (!entry.contains(key)) {
      throw Error(fmt::format("{}: tensor '{}': \"{}\" is missing (an entry has dtype, shape and data_offsets)", what,
                              cut(name), key));
    }
  }

  Tensor t;
  const Json& dtype = entry.at("dtype");
  const auto known = std::find_if(std::begin(kDTypes), std::end(kDTypes), [&dtype](const DTypeInfo& d) {
    return dtype.is_string() && dtype.get_ref<const std::string&>() == d.name;
  });
  if (known == std::end(kDTypes)) {
    reject(what, tensor_field(name, "dtype"), brief(dtype), fmt::format("unknown; the known dtypes are {}", known_dtypes()));
  }
  t.dtype = known->dtype;

  const Json& shape = entry.at("shape");
  constexpr auto kMaxDim = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
  const bool shape_ok = shape.is_array() && std::all_of(shape.begin(), shape.end(), [](const Json& d) {
    const std::optional<std::uint64_t> n = unsigned_of(d);
    return n && *n <= kMaxDim;
  });
  if (!shape_ok) reject(what, tensor_field(name, "shape"), brief(shape), "must be a list of non-negative integers");
  for (const Json& d : shape) t.shape.push_back(static_cast<std::int64_t>(unsigned_of(d).value()));
  const std::optional<std::int64_t> need = byte_count(t.shape, t.dtype);
  if (!need) {
    reject(what, tensor_field(name, "shape"), shape_text(t.shape),
           fmt::format("the size in bytes of dtype {} overflows 64 bits", dtype_name(t.dtype)));
  }

  const Json& offsets = entry.at("data_offsets");
  const std::optional<std::uint64_t> begin = offsets.is_array() && offsets.size() == 2 ? unsigned_of(offsets[0]) : std::nullopt;
  const std::optional<std::uint64_t> end = offsets.is_array() && offsets.size() == 2 ? unsigned_of(offsets[1]) : std::nullopt;
  if (!begin || !end) {
    reject(what, tensor_field(name, "data_offsets"), brief(offsets), "must be [begin, end], two non-negative integers");
  }
  // (value_or: GCC 12 at -O2 cannot see that reject() does not return, and warns of *begin)
  const std::uint64_t first = begin.value_or(0), last = end.value_or(0);
  const std::string offsets_text = fmt::format("[{}, {}]", first, last);
  if (first > last) reject(what, tensor_field(name, "data_offsets"), offsets_text, "begin must not exceed end");
  if (last > buffer.size()) {
    reject(what, tensor_field(name, "data_offsets"), offsets_text,
           fmt::format("end exceeds the data buffer's {} bytes", buffer.size()));
  }
  if (last - first != static_cast<std::uint64_t>(*need)) {
    reject(what, tensor_field(name, "data_offsets"), offsets_text,
           fmt::format("{} bytes, but dtype {} and shape {} need {}", last - first, dtype_name(t.dtype),
                       shape_text(t.shape), *need));
  }
  t.data.assign(buffer.begin() + static_cast<std::ptrdiff_t>(first), buffer.begin() + static_cast<std::ptrdiff_t>(last));
  extent = {first, last, &name};
  return t;
}

// The tensors must cover the buffer exactly, in some order: no byte twice, none unused.
void require_cover(std::vector<Extent> extents, std::uint64_t buffer_size, std::string_view what) {
  std::sort(extents.begin(), extents.end(),
            [](const Extent& a, const Extent& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  std::uint64_t covered = 0;  // [0, covered) is covered
  const Extent* last = nullptr;
  for (const Extent& e : extents) {
    const std::string offsets_text = fmt::format("[{}, {}]", e.begin, e.end);
    if (e.begin < covered) {
      reject(what, tensor_field(*e.name, "data_offsets"), offsets_text,
             fmt::format("overlaps tensor '{}' at [{}, {}]", cut(*last->name), last->begin, last->end));
    }
    if (e.begin > covered) {
      reject(what, tensor_field(*e.name, "data_offsets"), offsets_text,
             fmt::format("leaves bytes [{}, {}) of the data buffer unused (the tensors must cover it exactly)",
                         covered, e.begin));
    }
    covered = e.end;
    last = &e;
  }
  if (covered != buffer_size) {
    reject(what, "data buffer", fmt::format("{} bytes", buffer_size),
           fmt::format("the tensors cover only the first {} (the tensors must cover it exactly)", covered));
  }
}

// Throws Error naming `field` if s is not UTF-8 (JSON text must be).
void require_utf8(const std::string& s, std::string_view field) {
  try {
    (void)Json(s).dump();
  } catch (const Json::type_error&) {
    fail(field, fmt::format("\"{}\"", printable(cut(s))), "must be valid UTF-8 (the header is JSON)");
  }
}

}  // namespace

// ---- dtypes -------------------------------------------------------------------------------------

std::string_view dtype_name(DType dtype) { return info(dtype).name; }
std::size_t dtype_size(DType dtype) { return info(dtype).size; }

DType parse_dtype(std::string_view name) {
  for (const DTypeInfo& d : kDTypes) {
    if (d.name == name) return d.dtype;
  }
  fail("dtype", fmt::format("\"{}\"", cut(std::string(name))), fmt::format("unknown; the known dtypes are {}", known_dtypes()));
}

bool is_float(DType dtype) {
  switch (dtype) {
    case DType::f64:
    case DType::f32:
    case DType::f16:
    case DType::bf16:
    case DType::f8_e4m3:
    case DType::f8_e5m2: return true;
    default: return false;
  }
}

Format dtype_format(DType dtype) {
  switch (dtype) {
    case DType::f32: return Format::fp32;
    case DType::bf16: return Format::bf16;
    case DType::f16: return Format::fp16;
    case DType::f8_e4m3: return Format::fp8_e4m3;
    case DType::f8_e5m2: return Format::fp8_e5m2;
    default: fail("dtype", dtype_name(dtype), "has no moelab numerics format (F32, BF16, F16, F8_E4M3 and F8_E5M2 do)");
  }
}

DType format_dtype(Format format) {
  switch (format) {
    case Format::fp32: return DType::f32;
    case Format::bf16: return DType::bf16;
    case Format::fp16: return DType::f16;
    case Format::fp8_e4m3: return DType::f8_e4m3;
    case Format::fp8_e5m2: return DType::f8_e5m2;
  }
  fail("format", static_cast<int>(format), "is not a Format");
}

std::int64_t Tensor::numel() const {
  const std::optional<std::int64_t> n = element_count(shape);
  if (!n) fail("shape", shape_text(shape), "must be non-negative dimensions whose product fits in int64");
  return *n;
}

// ---- the file -----------------------------------------------------------------------------------

std::vector<std::uint8_t> serialize_safetensors(const TensorFile& file) {
  // Data in order of decreasing element size, then name (as Hugging Face's writer): the buffer
  // starts 8-byte aligned, so every tensor stays aligned to its element size.
  std::vector<const std::pair<const std::string, Tensor>*> order;
  for (const auto& entry : file.tensors) order.push_back(&entry);
  std::stable_sort(order.begin(), order.end(),
                   [](const auto* a, const auto* b) { return dtype_size(a->second.dtype) > dtype_size(b->second.dtype); });
  Json header = Json::object();
  std::uint64_t offset = 0;
  for (const auto* entry : order) {
    const std::string& name = entry->first;
    const Tensor& tensor = entry->second;
    if (name.empty()) fail("tensor name", "\"\"", "must not be empty");
    if (name == "__metadata__") fail("tensor name", name, "is reserved for the metadata");
    require_utf8(name, "tensor name");
    naming(name, [&t = tensor] { require_data_size(t); });
    const std::uint64_t end = offset + tensor.data.size();
    header[name] = {{"dtype", std::string(dtype_name(tensor.dtype))}, {"shape", tensor.shape}, {"data_offsets", {offset, end}}};
    offset = end;
  }
  if (!file.metadata.empty()) {
    for (const auto& [key, value] : file.metadata) {
      require_utf8(key, "__metadata__ key");
      require_utf8(value, fmt::format("__metadata__ '{}'", cut(key)));
    }
    header["__metadata__"] = file.metadata;
  }
  std::string text = header.dump();
  // Spaces up to a multiple of 8, so that the data buffer starts 8-byte aligned.
  text.append((8 - text.size() % 8) % 8, ' ');
  if (text.size() > kMaxHeaderBytes) {
    fail("header", fmt::format("{} bytes", text.size()), "exceeds 100 MB, the limit of safetensors readers");
  }

  std::vector<std::uint8_t> bytes;
  bytes.reserve(8 + text.size() + offset);
  put_le(bytes, text.size(), 8);
  bytes.insert(bytes.end(), text.begin(), text.end());
  for (const auto* entry : order) bytes.insert(bytes.end(), entry->second.data.begin(), entry->second.data.end());
  return bytes;
}

TensorFile parse_safetensors(std::span<const std::uint8_t> bytes, std::string_view what) {
  if (bytes.size() < 8) {
    reject(what, "file size", fmt::format("{} bytes", bytes.size()), "must be at least 8 (the header's length)");
  }
  const std::uint64_t n = get_le(bytes.data(), 8);
  if (n > kMaxHeaderBytes) reject(what, "header length", n, "must not exceed 100000000 (100 MB)");
  if (n > bytes.size() - 8) {
    reject(what, "header length", n, fmt::format("exceeds the {} bytes that follow it", bytes.size() - 8));
  }
  const std::span<const std::uint8_t> buffer = bytes.subspan(8 + n);
  const Json header = parse_header(bytes.subspan(8, n), what);
  if (!header.is_object()) reject(what, "header", brief(header), "must be a JSON object");

  TensorFile file;
  std::vector<Extent> extents;
  for (const auto& [name, entry] : header.get_ref<const Json::object_t&>()) {
    if (name == "__metadata__") {
      file.metadata = parse_metadata(entry, what);
      continue;
    }
    Extent extent{};
    file.tensors.emplace(name, parse_entry(name, entry, buffer, what, extent));
    extents.push_back(extent);
  }
  require_cover(std::move(extents), buffer.size(), what);
  return file;
}

void write_safetensors(const std::filesystem::path& path, const TensorFile& file) {
  std::vector<std::uint8_t> bytes;
  try {
    bytes = serialize_safetensors(file);
  } catch (const Error& e) {
    throw Error(fmt::format("{}: {}", path.string(), e.what()));
  }
  write_file_atomically(path, bytes);
}

TensorFile read_safetensors(const std::filesystem::path& path) {
  return parse_safetensors(read_file(path), path.string());
}

// ---- conversions --------------------------------------------------------------------------------

Tensor tensor_from(const MatrixD& values, DType dtype) {
  const Index cols = values.cols();
  return encode_all([&values](std::int64_t i) { return values.data()[i]; }, values.size(), dtype,
                    {values.rows(), values.cols()},
                    [cols](std::int64_t i) { return fmt::format("values({}, {})", i / cols, i % cols); });
}

Tensor tensor_from(std::span<const double> values, DType dtype) {
  const auto n = static_cast<std::int64_t>(values.size());
  return encode_all([values](std::int64_t i) { return values[static_cast<std::size_t>(i)]; }, n, dtype, {n},
                    [](std::int64_t i) { return fmt::format("values[{}]", i); });
}

Tensor tensor_from(const IndexMatrix& values, DType dtype) {
  const Index cols = values.cols();
  return encode_all([&values](std::int64_t i) { return std::int64_t{values.data()[i]}; }, values.size(), dtype,
                    {values.rows(), values.cols()},
                    [cols](std::int64_t i) { return fmt::format("values({}, {})", i / cols, i % cols); });
}

Tensor tensor_from(std::span<const std::int64_t> values, DType dtype) {
  const auto n = static_cast<std::int64_t>(values.size());
  return encode_all([values](std::int64_t i) { return values[static_cast<std::size_t>(i)]; }, n, dtype, {n},
                    [](std::int64_t i) { return fmt::format("values[{}]", i); });
}

Tensor scalar_tensor(double value, DType dtype) {
  return encode_all([value](std::int64_t) { return value; }, 1, dtype, {}, [](std::int64_t) { return std::string("value"); });
}

std::vector<double> tensor_values(const Tensor& tensor) {
  require_data_size(tensor);
  const std::int64_t n = tensor.numel();
  std::vector<double> values(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) values[static_cast<std::size_t>(i)] = value_at(tensor, i);
  return values;
}

MatrixD tensor_matrix(const Tensor& tensor, std::string_view name) {
  const auto [rows, cols] = matrix_shape(tensor, name);
  const std::vector<double> values = naming(name, [&tensor] { return tensor_values(tensor); });
  MatrixD m(rows, cols);
  std::copy(values.begin(), values.end(), m.data());
  return m;
}

IndexMatrix tensor_index_matrix(const Tensor& tensor, std::string_view name) {
  if (is_float(tensor.dtype)) {
    fail(fmt::format("tensor '{}': dtype", name), dtype_name(tensor.dtype),
         "must be an integer dtype (I64, I32, U8, BOOL) for an index matrix");
  }
  const auto [rows, cols] = matrix_shape(tensor, name);
  naming(name, [&tensor] { require_data_size(tensor); });
  IndexMatrix m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) {
    const std::int64_t v = naming(name, [&tensor, i] { return integer_at(tensor, i); });
    if (v < std::numeric_limits<std::int32_t>::min() || v > std::numeric_limits<std::int32_t>::max()) {
      fail(fmt::format("tensor '{}': element {}", name, i), v, "must fit in int32, the element type of an index matrix");
    }
    m.data()[i] = static_cast<std::int32_t>(v);
  }
  return m;
}

}  // namespace moelab
