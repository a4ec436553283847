// Tests of reference/safetensors and reference/files: every dtype round-trips; rounding is to
// nearest even, done once; a tiny file written out byte by byte pins the layout to the format's
// specification; writes are deterministic; every rule of the reader rejects with a message that
// names the file, the field and the rule; the atomic write leaves the old file whole when it fails.
// An independent reader (numpy, Debian's /usr/bin/python3) loads what we write, where it exists.
#include <fmt/ranges.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "reference/files.h"
#include "reference/safetensors.h"
#include "tests/testing.h"

namespace moelab {
namespace {

namespace fs = std::filesystem;
using moelab::testing::bitwise_equal;
using moelab::testing::error_of;
using moelab::testing::int_rows;
using moelab::testing::rows_of;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// `message` contains `part` (gtest alone has no HasSubstr; this prints both on failure).
::testing::AssertionResult mentions(const std::string& message, std::string_view part) {
  if (message.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "message: \"" << message << "\"\nlacks: \"" << part << "\"";
}

// Same bits, or both NaN (a NaN's payload is not part of any format's contract here).
::testing::AssertionResult same_values(const std::vector<double>& actual, const std::vector<double>& expected) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure() << actual.size() << " values, expected " << expected.size();
  }
  for (std::size_t i = 0; i < actual.size(); ++i) {
    const bool same = (std::isnan(actual[i]) && std::isnan(expected[i])) ||
                      std::bit_cast<std::uint64_t>(actual[i]) == std::bit_cast<std::uint64_t>(expected[i]);
    if (!same) return ::testing::AssertionFailure() << "value " << i << ": " << actual[i] << ", expected " << expected[i];
  }
  return ::testing::AssertionSuccess();
}

// The bytes of a file whose header is `header` (as given: not padded) and whose data buffer is
// `data_bytes` bytes 0, 1, 2, ...
std::vector<std::uint8_t> with_header(std::string_view header, std::size_t data_bytes = 0) {
  std::vector<std::uint8_t> bytes;
  for (int i = 0; i < 8; ++i) bytes.push_back(static_cast<std::uint8_t>(header.size() >> (8 * i)));
  bytes.insert(bytes.end(), header.begin(), header.end());
  for (std::size_t i = 0; i < data_bytes; ++i) bytes.push_back(static_cast<std::uint8_t>(i));
  return bytes;
}

std::string rejection(const std::vector<std::uint8_t>& bytes) {
  return error_of([&] { (void)parse_safetensors(bytes, "x.safetensors"); });
}

TensorFile round_trip(const TensorFile& file) { return parse_safetensors(serialize_safetensors(file), "round trip"); }

// The value a dtype stores for `v`, read back.
double stored(double v, DType dtype) { return tensor_values(scalar_tensor(v, dtype)).at(0); }

// --- dtypes --------------------------------------------------------------------------------------

TEST(SafetensorsDType, NamesSizesAndFormats) {
  const DType all[] = {DType::f64, DType::f32, DType::f16, DType::bf16, DType::f8_e4m3,
                       DType::f8_e5m2, DType::i64, DType::i32, DType::u8, DType::boolean};
  const std::string_view names[] = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "U8", "BOOL"};
  const std::size_t sizes[] = {8, 4, 2, 2, 1, 1, 8, 4, 1, 1};
  for (std::size_t i = 0; i < std::size(all); ++i) {
    EXPECT_EQ(dtype_name(all[i]), names[i]);
    EXPECT_EQ(parse_dtype(names[i]), all[i]);
    EXPECT_EQ(dtype_size(all[i]), sizes[i]);
    EXPECT_EQ(is_float(all[i]), i < 6) << names[i];
  }
  for (Format f : kAllFormats) EXPECT_EQ(dtype_format(format_dtype(f)), f);
  EXPECT_TRUE(mentions(error_of([] { (void)parse_dtype("F128"); }),
                       "dtype = \"F128\": unknown; the known dtypes are F64, F32, F16, BF16, F8_E4M3, F8_E5M2, "
                       "I64, I32, U8, BOOL"));
  EXPECT_TRUE(mentions(error_of([] { (void)dtype_format(DType::f64); }), "dtype = F64: has no moelab numerics format"));
  EXPECT_TRUE(mentions(error_of([] { (void)dtype_format(DType::i32); }), "dtype = I32"));
}

// A tensor of dtype U8 with this shape and no data: numel() reads the shape alone.
Tensor shaped(std::vector<std::int64_t> shape) {
  Tensor t;
  t.dtype = DType::u8;
  t.shape = std::move(shape);
  return t;
}

TEST(SafetensorsDType, Numel) {
  EXPECT_EQ(shaped({}).numel(), 1);
  EXPECT_EQ(shaped({2, 3}).numel(), 6);
  EXPECT_EQ(shaped({0, 5}).numel(), 0);
  EXPECT_TRUE(mentions(error_of([] { (void)shaped({2, -1}).numel(); }), "shape = [2, -1]"));
  EXPECT_TRUE(mentions(error_of([] { (void)shaped({1LL << 32, 1LL << 32}).numel(); }),
                       "shape = [4294967296, 4294967296]"));
}

// --- values in, values out -----------------------------------------------------------------------

// Values each dtype represents exactly: signed zeros, subnormals, the extremes, inf and NaN.
std::vector<double> exact_values(DType dtype) {
  switch (dtype) {
    case DType::f64: return {0.0, -0.0, 1.0, -2.5, 0.1, 4.9e-324, 1.7976931348623157e308, kInf, -kInf, kNaN};
    case DType::f32: return {0.0, -0.0, 1.0, -2.5, double{0.1f}, std::ldexp(1.0, -149), 3.4028234663852886e38, kInf, kNaN};
    case DType::bf16: return {0.0, -0.0, 1.0, -2.5, 1.0078125, std::ldexp(1.0, -133), std::ldexp(255.0, 120), -kInf, kNaN};
    case DType::f16: return {0.0, -0.0, 1.0, -2.5, 1.0009765625, std::ldexp(1.0, -24), 65504.0, kInf, kNaN};
    case DType::f8_e4m3: return {0.0, -0.0, 1.0, -2.5, 1.125, std::ldexp(1.0, -9), 448.0, -448.0, kNaN};
    case DType::f8_e5m2: return {0.0, -0.0, 1.0, -2.5, 1.25, std::ldexp(1.0, -16), 57344.0, kInf, kNaN};
    case DType::i64: return {0.0, 1.0, -5.0, 9007199254740992.0, -9223372036854775808.0};
    case DType::i32: return {0.0, 1.0, -5.0, 2147483647.0, -2147483648.0};
    case DType::u8: return {0.0, 1.0, 255.0};
    case DType::boolean: return {0.0, 1.0, 1.0, 0.0};
  }
  return {};
}

TEST(SafetensorsValues, EveryDTypeRoundTrips) {
  TensorFile file;
  file.metadata["format"] = "pt";
  for (DType dtype : {DType::f64, DType::f32, DType::f16, DType::bf16, DType::f8_e4m3, DType::f8_e5m2, DType::i64,
                      DType::i32, DType::u8, DType::boolean}) {
    file.tensors[std::string(dtype_name(dtype))] = tensor_from(std::span<const double>(exact_values(dtype)), dtype);
  }
  const TensorFile back = round_trip(file);
  EXPECT_EQ(back, file);
  for (const auto& [name, tensor] : back.tensors) {
    EXPECT_TRUE(same_values(tensor_values(tensor), exact_values(tensor.dtype))) << name;
  }
}

TEST(SafetensorsValues, BF16RoundsToNearestEven) {
  const double two_7 = std::ldexp(1.0, -7);  // the spacing of bf16 just above 1
  EXPECT_EQ(stored(1.0 + std::ldexp(1.0, -8), DType::bf16), 1.0);                 // tie: to even (down)
  EXPECT_EQ(stored(1.0 + 3 * std::ldexp(1.0, -9), DType::bf16), 1.0 + two_7);     // nearer the upper
  EXPECT_EQ(stored(1.0 + 3 * std::ldexp(1.0, -8), DType::bf16), 1.0 + 2 * two_7); // tie: to even (up)
  // Rounded once: through float first, this would become 1 + 2^-8 (a tie), then 1.
  EXPECT_EQ(stored(1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40), DType::bf16), 1.0 + two_7);
  EXPECT_EQ(stored(1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40), DType::f16), 1.0 + std::ldexp(1.0, -10));
  EXPECT_EQ(stored(1.0 + std::ldexp(1.0, -4) + std::ldexp(1.0, -40), DType::f8_e4m3), 1.125);
  // The same for int64 input, where double is the one rounding too many: 2^62 + 2^54 is a tie
  // between bf16 neighbours 2^62 and 2^62 + 2^55, and 2^62 + 2^54 + 1 lies above it.
  const std::int64_t big[] = {(1LL << 62) + (1LL << 54), (1LL << 62) + (1LL << 54) + 1};
  EXPECT_TRUE(same_values(tensor_values(tensor_from(std::span<const std::int64_t>(big), DType::bf16)),
                          {std::ldexp(1.0, 62), std::ldexp(1.0, 62) + std::ldexp(1.0, 55)}));
  // The bits, little-endian: bf16 1.0 is 0x3F80.
  EXPECT_EQ(scalar_tensor(1.0, DType::bf16).data, (std::vector<std::uint8_t>{0x80, 0x3F}));
}

TEST(SafetensorsValues, OverflowIsNeverSilentlyTheMax) {
  EXPECT_EQ(stored(1e39, DType::bf16), kInf);  // beyond bf16 and float alike
  EXPECT_EQ(stored(-1e300, DType::bf16), -kInf);
  EXPECT_EQ(stored(65520.0, DType::f16), kInf);  // the first value that rounds past 65504
  EXPECT_TRUE(std::isnan(stored(500.0, DType::f8_e4m3)));  // E4M3FN has no inf
  EXPECT_EQ(stored(1e6, DType::f8_e5m2), kInf);
  EXPECT_EQ(stored(1e39, DType::f32), kInf);
  EXPECT_EQ(stored(1e-300, DType::bf16), 0.0);
  EXPECT_TRUE(std::signbit(stored(-1e-300, DType::bf16)));
  EXPECT_EQ(stored(0.1, DType::f32), double{0.1f});
}

TEST(SafetensorsValues, IntegerDTypesTakeIntegersInRange) {
  EXPECT_TRUE(mentions(error_of([] { (void)tensor_from(rows_of({{1.0, 2.5}}), DType::i32); }),
                       "values(0, 1) = 2.5: dtype I32 holds integers in [-2147483648, 2147483647] only"));
  const auto rejects = [](double v, DType dtype) {
    return error_of([&] { (void)scalar_tensor(v, dtype); });
  };
  EXPECT_TRUE(mentions(rejects(2147483648.0, DType::i32), "value = 2147483648: dtype I32"));
  EXPECT_TRUE(mentions(rejects(256.0, DType::u8), "dtype U8 holds integers in [0, 255]"));
  EXPECT_TRUE(mentions(rejects(-1.0, DType::u8), "value = -1"));
  EXPECT_TRUE(mentions(rejects(2.0, DType::boolean), "dtype BOOL holds integers in [0, 1]"));
  EXPECT_TRUE(mentions(rejects(kNaN, DType::i64), "value = nan"));
  EXPECT_TRUE(mentions(rejects(9223372036854775808.0, DType::i64), "dtype I64"));
  EXPECT_EQ(stored(-9223372036854775808.0, DType::i64), -9223372036854775808.0);

  const std::int64_t too_big[] = {1, std::numeric_limits<std::int64_t>::max()};
  EXPECT_TRUE(mentions(error_of([&] { (void)tensor_from(std::span<const std::int64_t>(too_big), DType::i32); }),
                       "values[1] = 9223372036854775807: dtype I32"));
  // I64 keeps every int64, which a double would not: the bytes are the two's complement.
  const Tensor t = tensor_from(std::span<const std::int64_t>(too_big));
  EXPECT_EQ(t.dtype, DType::i64);
  EXPECT_EQ(t.data, (std::vector<std::uint8_t>{1, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F}));
}

// --- tensors as matrices -------------------------------------------------------------------------

TEST(SafetensorsMatrices, ShapesAndRanks) {
  const MatrixD m = rows_of({{1.0, 2.0, 3.0}, {4.0, 5.0, 6.0}});
  const Tensor t = tensor_from(m, DType::f32);
  EXPECT_EQ(t.shape, (std::vector<std::int64_t>{2, 3}));
  EXPECT_TRUE(bitwise_equal(tensor_matrix(t, "w"), m));

  const double v[] = {1.0, 2.0};
  EXPECT_TRUE(bitwise_equal(tensor_matrix(tensor_from(std::span<const double>(v), DType::f64), "v"), rows_of({{1.0}, {2.0}})));
  EXPECT_TRUE(bitwise_equal(tensor_matrix(scalar_tensor(0.5), "s"), rows_of({{0.5}})));

  Tensor cube = scalar_tensor(0.0, DType::u8);
  cube.shape = {1, 1, 1};
  EXPECT_TRUE(mentions(error_of([&] { (void)tensor_matrix(cube, "cube"); }),
                       "tensor 'cube': shape = [1, 1, 1]: must have 0, 1 or 2 dimensions"));
  Tensor short_data = t;
  short_data.data.pop_back();
  EXPECT_TRUE(mentions(error_of([&] { (void)tensor_matrix(short_data, "w"); }),
                       "tensor 'w': data = 23 bytes: dtype F32 and shape [2, 3] need 24"));
}

TEST(SafetensorsMatrices, IndexMatrices) {
  const IndexMatrix ids = int_rows({{0, 7}, {-3, 2147483647}});
  EXPECT_TRUE(bitwise_equal(tensor_index_matrix(tensor_from(ids), "ids"), ids));
  EXPECT_TRUE(bitwise_equal(tensor_index_matrix(tensor_from(ids, DType::i64), "ids"), ids));
  EXPECT_TRUE(bitwise_equal(tensor_index_matrix(tensor_from(int_rows({{1, 0}}), DType::boolean), "mask"), int_rows({{1, 0}})));
  EXPECT_TRUE(bitwise_equal(tensor_index_matrix(tensor_from(int_rows({{255}}), DType::u8), "u"), int_rows({{255}})));
  EXPECT_TRUE(mentions(error_of([] { (void)tensor_index_matrix(scalar_tensor(1.0), "ids"); }),
                       "tensor 'ids': dtype = F64: must be an integer dtype"));
  const std::int64_t wide[] = {0, 1LL << 31};
  EXPECT_TRUE(mentions(error_of([&] { (void)tensor_index_matrix(tensor_from(std::span<const std::int64_t>(wide)), "ids"); }),
                       "tensor 'ids': element 1 = 2147483648: must fit in int32"));
  Tensor flag = scalar_tensor(1.0, DType::boolean);
  flag.data[0] = 2;  // as a buggy writer might store true
  EXPECT_TRUE(mentions(error_of([&] { (void)tensor_matrix(flag, "flag"); }),
                       "tensor 'flag': element 0 = 2: a BOOL byte must be 0 or 1"));
}

// --- the layout ----------------------------------------------------------------------------------

// Written out by hand from the specification: N (little-endian u64), the JSON header with sorted
// keys ("__metadata__" sorts before lower-case names: '_' is 0x5F), padded with spaces to a
// multiple of 8, then each tensor's bytes by decreasing element size, then name (b: F32, a: BF16,
// c: U8), so that every tensor is aligned to its element size.
TEST(SafetensorsLayout, ATinyFileByteByByte) {
  TensorFile file;
  file.metadata["format"] = "pt";
  file.tensors["c"] = tensor_from(std::span<const std::int64_t>(std::vector<std::int64_t>{1, 2, 255}), DType::u8);
  file.tensors["b"] = tensor_from(std::span<const double>(std::vector<double>{1.0, -2.0}), DType::f32);
  file.tensors["a"] = tensor_from(std::span<const double>(std::vector<double>{1.0, 0.5}), DType::bf16);

  const std::string header =
      R"({"__metadata__":{"format":"pt"},)"
      R"("a":{"data_offsets":[8,12],"dtype":"BF16","shape":[2]},)"
      R"("b":{"data_offsets":[0,8],"dtype":"F32","shape":[2]},)"
      R"("c":{"data_offsets":[12,15],"dtype":"U8","shape":[3]}})";
  ASSERT_EQ(header.size(), 194u);
  std::vector<std::uint8_t> expected = {200, 0, 0, 0, 0, 0, 0, 0};  // 194 + 6 spaces
  expected.insert(expected.end(), header.begin(), header.end());
  expected.insert(expected.end(), 6, ' ');
  const std::uint8_t data[] = {
      0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0xC0,  // b: f32 1.0, -2.0
      0x80, 0x3F, 0x00, 0x3F,              // a: bf16 1.0, 0.5
      0x01, 0x02, 0xFF,                    // c: u8 1, 2, 255
  };
  expected.insert(expected.end(), std::begin(data), std::end(data));

  EXPECT_EQ(serialize_safetensors(file), expected);
  EXPECT_EQ(parse_safetensors(expected, "tiny"), file);
}

TEST(SafetensorsLayout, Deterministic) {
  const MatrixD m = rows_of({{0.1, -0.2}, {0.3, 1e-3}});
  TensorFile one;
  one.tensors["z.last"] = tensor_from(m, DType::f32);
  one.tensors["a.first"] = tensor_from(m, DType::bf16);
  one.metadata = {{"z", "1"}, {"a", "2"}};
  TensorFile two;  // the same content, built in another order
  two.metadata = {{"a", "2"}, {"z", "1"}};
  two.tensors["a.first"] = tensor_from(m, DType::bf16);
  two.tensors["z.last"] = tensor_from(m, DType::f32);
  const std::vector<std::uint8_t> bytes = serialize_safetensors(one);
  EXPECT_EQ(serialize_safetensors(one), bytes);
  EXPECT_EQ(serialize_safetensors(two), bytes);
  EXPECT_EQ(serialize_safetensors(round_trip(one)), bytes);
  EXPECT_EQ((8 + bytes[0]) % 8, 0);  // the data starts 8-byte aligned
}

TEST(SafetensorsLayout, ReaderAcceptsWhatOtherWritersDo) {
  // No padding, whitespace, tensors not in name order, an empty tensor, an empty file.
  const TensorFile file = parse_safetensors(
      with_header(R"( { "b" : {"dtype":"U8","shape":[2],"data_offsets":[0,2]},
                        "a" : {"dtype":"U8","shape":[1],"data_offsets":[2,3]},
                        "e" : {"dtype":"F32","shape":[0,3],"data_offsets":[3,3]} } )",
                  3),
      "other");
  EXPECT_EQ(file.tensors.at("b").data, (std::vector<std::uint8_t>{0, 1}));
  EXPECT_EQ(file.tensors.at("a").data, (std::vector<std::uint8_t>{2}));
  EXPECT_EQ(file.tensors.at("e").numel(), 0);
  EXPECT_EQ(parse_safetensors(with_header("{}"), "empty"), TensorFile{});
  EXPECT_EQ(serialize_safetensors(TensorFile{}), with_header("{}      "));
}

// --- what the reader rejects ---------------------------------------------------------------------

struct Rejection {
  const char* rule;
  std::vector<std::uint8_t> bytes;
  std::string message;  // a part of the message, after "x.safetensors: "
};

std::string f32_entry(std::string_view name, std::string_view offsets) {
  return fmt::format(R"("{}":{{"dtype":"F32","shape":[1],"data_offsets":{}}})", name, offsets);
}

std::vector<Rejection> rejections() {
  const std::vector<std::uint8_t> huge_n = {0x01, 0xE1, 0xF5, 0x05, 0, 0, 0, 0};  // 100000001
  const std::vector<std::uint8_t> max_n(8, 0xFF);
  const std::string entry_a = f32_entry("a", "[0,4]");
  return {
      {"empty file", {}, "file size = 0 bytes: must be at least 8 (the header's length)"},
      {"7 bytes", {1, 0, 0, 0, 0, 0, 0}, "file size = 7 bytes"},
      {"N above 100 MB", huge_n, "header length = 100000001: must not exceed 100000000 (100 MB)"},
      {"N = 2^64 - 1", max_n, "header length = 18446744073709551615: must not exceed"},
      {"N beyond the file", {10, 0, 0, 0, 0, 0, 0, 0, '{', '}', ' '}, "header length = 10: exceeds the 3 bytes"},
      {"not JSON", with_header("{oops"), "header: not valid JSON: parse error"},
      {"not UTF-8", with_header("{\"\xFF\":1}"), "header: not valid JSON"},
      {"a comment", with_header("{/**/}"), "header: not valid JSON"},
      {"not an object", with_header("[]"), "header = []: must be a JSON object"},
      {"duplicate key", with_header("{" + entry_a + "," + entry_a + "}", 4), "header: key \"a\" appears twice"},
      {"deep", with_header(std::string(100, '[') + std::string(100, ']')), "header: nested deeper than 64 levels"},
      {"empty name", with_header("{" + f32_entry("", "[0,4]") + "}", 4), "tensor name = \"\": must not be empty"},
      {"entry not an object", with_header(R"({"a":[1]})"),
       "tensor 'a': entry = [1]: must be an object with dtype, shape and data_offsets"},
      {"no dtype", with_header(R"({"a":{"shape":[],"data_offsets":[0,0]}})"), "tensor 'a': \"dtype\" is missing"},
      {"no shape", with_header(R"({"a":{"dtype":"U8","data_offsets":[0,0]}})"), "tensor 'a': \"shape\" is missing"},
      {"no offsets", with_header(R"({"a":{"dtype":"U8","shape":[0]}})"), "tensor 'a': \"data_offsets\" is missing"},
      {"extra field", with_header(R"({"a":{"dtype":"U8","shape":[],"data_offsets":[0,1],"x":0}})", 1),
       "tensor 'a': field = \"x\": not allowed: an entry has dtype, shape and data_offsets only"},
      {"unknown dtype", with_header(R"({"a":{"dtype":"F128","shape":[],"data_offsets":[0,16]}})", 16),
       "tensor 'a': dtype = \"F128\": unknown; the known dtypes are F64, F32, F16, BF16, F8_E4M3"},
      {"dtype not a string", with_header(R"({"a":{"dtype":4,"shape":[],"data_offsets":[0,4]}})", 4),
       "tensor 'a': dtype = 4: unknown"},
      {"negative dimension", with_header(R"({"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}})"),
       "tensor 'a': shape = [-1]: must be a list of non-negative integers"},
      {"fractional dimension", with_header(R"({"a":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}})", 1),
       "tensor 'a': shape = [1.0]: must be a list"},
      {"dimension beyond int64", with_header(R"({"a":{"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,0]}})"),
       "tensor 'a': shape = [9223372036854775808]: must be a list"},
      {"shape not a list", with_header(R"({"a":{"dtype":"U8","shape":"2","data_offsets":[0,2]}})", 2),
       "tensor 'a': shape = \"2\": must be a list"},
      {"element count overflows", with_header(R"({"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}})"),
       "tensor 'a': shape = [4294967296, 4294967296]: the size in bytes of dtype U8 overflows 64 bits"},
      {"byte count overflows", with_header(R"({"a":{"dtype":"F64","shape":[2147483648,2147483648],"data_offsets":[0,0]}})"),
       "tensor 'a': shape = [2147483648, 2147483648]: the size in bytes of dtype F64 overflows"},
      {"one offset", with_header("{" + f32_entry("a", "[4]") + "}", 4),
       "tensor 'a': data_offsets = [4]: must be [begin, end], two non-negative integers"},
      {"negative offset", with_header("{" + f32_entry("a", "[-4,0]") + "}", 4), "tensor 'a': data_offsets = [-4,0]: must be"},
      {"offsets not a list", with_header("{" + f32_entry("a", "{}") + "}", 4), "tensor 'a': data_offsets = {}: must be"},
      {"begin after end", with_header("{" + f32_entry("a", "[4,0]") + "}", 4),
       "tensor 'a': data_offsets = [4, 0]: begin must not exceed end"},
      {"end beyond the buffer", with_header("{" + f32_entry("a", "[4,8]") + "}", 4),
       "tensor 'a': data_offsets = [4, 8]: end exceeds the data buffer's 4 bytes"},
      {"end beyond everything", with_header("{" + f32_entry("a", "[18446744073709551611,18446744073709551615]") + "}", 4),
       "tensor 'a': data_offsets = [18446744073709551611, 18446744073709551615]: end exceeds"},
      {"wrong length", with_header(R"({"output.y":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})", 12),
       "tensor 'output.y': data_offsets = [0, 12]: 12 bytes, but dtype F32 and shape [2, 2] need 16"},
      {"overlap", with_header("{" + entry_a + "," + f32_entry("b", "[2,6]") + "}", 6),
       "tensor 'b': data_offsets = [2, 6]: overlaps tensor 'a' at [0, 4]"},
      {"empty tensor inside another", with_header("{" + entry_a + R"(,"e":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}})", 4),
       "tensor 'e': data_offsets = [2, 2]: overlaps tensor 'a'"},
      {"hole", with_header("{" + entry_a + "," + f32_entry("b", "[8,12]") + "}", 12),
       "tensor 'b': data_offsets = [8, 12]: leaves bytes [4, 8) of the data buffer unused"},
      {"hole at the start", with_header("{" + f32_entry("b", "[4,8]") + "}", 8), "leaves bytes [0, 4)"},
      {"trailing bytes", with_header("{" + entry_a + "}", 6),
       "data buffer = 6 bytes: the tensors cover only the first 4"},
      {"data but no tensors", with_header("{}", 3), "data buffer = 3 bytes: the tensors cover only the first 0"},
      {"metadata not an object", with_header(R"({"__metadata__":["a"]})"), "__metadata__ = [\"a\"]: must be an object of strings"},
      {"metadata value not a string", with_header(R"({"__metadata__":{"k":1}})"), "__metadata__ 'k' = 1: must be a string"},
  };
}

TEST(SafetensorsReader, RejectsEachBrokenRuleByName) {
  for (const Rejection& r : rejections()) {
    const std::string message = rejection(r.bytes);
    EXPECT_TRUE(mentions(message, "x.safetensors: ")) << r.rule;
    EXPECT_EQ(message.rfind("x.safetensors: ", 0), 0u) << r.rule << ": " << message;
    EXPECT_TRUE(mentions(message, r.message)) << r.rule;
  }
}

TEST(SafetensorsReader, TheHeaderExampleWordForWord) {
  EXPECT_EQ(error_of([] {
              (void)parse_safetensors(
                  with_header(R"({"output.y":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})", 12),
                  "golden/x.safetensors");
            }),
            "golden/x.safetensors: tensor 'output.y': data_offsets = [0, 12]: 12 bytes, but dtype F32 and shape "
            "[2, 2] need 16");
}

// Messages quote parts of the file, cut short and never as invalid UTF-8 (a CLI may put them in
// JSON): a long name is cut between characters, a bad byte is escaped.
TEST(SafetensorsReader, MessagesStayShortAndValidUtf8) {
  std::string name;
  for (int i = 0; i < 40; ++i) name += "\u00e9";  // 2 bytes each in UTF-8
  const std::string long_name = rejection(with_header("{" + f32_entry(name, "[0,8]") + "}", 8));
  EXPECT_TRUE(mentions(long_name, "tensor '" + name.substr(0, 56) + "...': data_offsets = [0, 8]: 8 bytes")) << long_name;
  const std::string bad_byte = rejection(with_header("{\"\xFF\":1}"));
  EXPECT_TRUE(mentions(bad_byte, "\\xFF")) << bad_byte;
  for (const std::string& message : {long_name, bad_byte}) {
    EXPECT_NO_THROW((void)nlohmann::json(message).dump()) << message;
  }
}

// Every prefix of a valid file is rejected (never read past its end), and so is every single-byte
// change that breaks it; a change that keeps it valid must still round-trip.
TEST(SafetensorsReader, SurvivesTruncationAndByteFlips) {
  TensorFile file;
  file.metadata["k"] = "v";
  file.tensors["w"] = tensor_from(rows_of({{1.0, -2.0}}), DType::bf16);
  file.tensors["ids"] = tensor_from(int_rows({{3, 4}}));
  const std::vector<std::uint8_t> bytes = serialize_safetensors(file);
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    EXPECT_NE(rejection(std::vector<std::uint8_t>(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n))), "")
        << n;
  }
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      std::vector<std::uint8_t> changed = bytes;
      changed[i] ^= static_cast<std::uint8_t>(1 << bit);
      try {
        const TensorFile parsed = parse_safetensors(changed, "flipped");
        EXPECT_EQ(round_trip(parsed), parsed) << "byte " << i << " bit " << bit;
      } catch (const Error&) {
      }
    }
  }
}

// --- what the writer rejects ---------------------------------------------------------------------

TEST(SafetensorsWriter, RejectsWhatNoReaderWouldAccept) {
  const auto writing = [](std::string name, Tensor t) {
    TensorFile file;
    file.tensors.emplace(std::move(name), std::move(t));
    return error_of([&] { (void)serialize_safetensors(file); });
  };
  Tensor bad = scalar_tensor(1.0, DType::f32);
  bad.shape = {2};
  EXPECT_TRUE(mentions(writing("w", bad), "tensor 'w': data = 4 bytes: dtype F32 and shape [2] need 8"));
  bad.shape = {-1};
  EXPECT_TRUE(mentions(writing("w", bad), "tensor 'w': shape = [-1]"));
  EXPECT_TRUE(mentions(writing("", scalar_tensor(1.0)), "tensor name = \"\": must not be empty"));
  EXPECT_TRUE(mentions(writing("__metadata__", scalar_tensor(1.0)), "tensor name = __metadata__: is reserved"));
  EXPECT_TRUE(mentions(writing("\xFF", scalar_tensor(1.0)), "tensor name = \"\\xFF\": must be valid UTF-8"));
  TensorFile file;
  file.metadata["k"] = "\xC3";
  EXPECT_TRUE(mentions(error_of([&] { (void)serialize_safetensors(file); }), "__metadata__ 'k'"));
}

// --- files ---------------------------------------------------------------------------------------

// A fresh directory per test (ctest runs tests in parallel processes), removed afterwards.
class FilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / fmt::format("moelab-{}-{}-{}", info->test_suite_name(), info->name(), ::getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::permissions(dir_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(dir_, ec);
  }
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const fs::directory_entry& e : fs::directory_iterator(dir_)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }
  std::string text(const fs::path& path) const {
    const std::vector<std::uint8_t> bytes = read_file(path);
    return {bytes.begin(), bytes.end()};
  }
  fs::path dir_;
};

TEST_F(FilesTest, WritesAndReplacesWholeFiles) {
  const fs::path path = dir_ / "a.bin";
  write_file_atomically(path, "old");
  EXPECT_EQ(text(path), "old");
  const std::vector<std::uint8_t> bytes = {0, 1, 0xFF, 0};
  write_file_atomically(path, std::span<const std::uint8_t>(bytes));
  EXPECT_EQ(read_file(path), bytes);
  write_file_atomically(path, "");
  EXPECT_TRUE(read_file(path).empty());
  EXPECT_EQ(entries(), std::vector<std::string>{"a.bin"});  // no temporary file left
}

TEST_F(FilesTest, AFailedWriteLeavesTheOldFileAndNoTemporary) {
  const fs::path missing = dir_ / "no" / "such" / "dir" / "a.bin";
  std::string message = error_of([&] { write_file_atomically(missing, "new"); });
  EXPECT_TRUE(mentions(message, "path = " + missing.string() + ": cannot create a temporary file beside it"));
  EXPECT_TRUE(mentions(message, "No such file or directory"));

  const fs::path sub = dir_ / "sub";
  fs::create_directory(sub);
  write_file_atomically(sub / "keep", "kept");
  message = error_of([&] { write_file_atomically(sub, "new"); });  // a directory in the way
  EXPECT_TRUE(mentions(message, "path = " + sub.string() + ": is a directory"));
  EXPECT_EQ(text(sub / "keep"), "kept");
  EXPECT_EQ(entries(), std::vector<std::string>{"sub"});

  EXPECT_TRUE(mentions(error_of([&] { write_file_atomically(dir_ / "", "x"); }), "must name a file"));
}

// A full disk, simulated with a file size limit: the write fails half way, after the temporary file
// exists. The limit and SIGXFSZ (whose default action kills the process) are restored afterwards.
TEST_F(FilesTest, AFullDiskLeavesTheOldFile) {
  const fs::path path = dir_ / "a.bin";
  write_file_atomically(path, "precious");
  rlimit saved{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved), 0);
  rlimit small = saved;
  small.rlim_cur = 1024;
  void (*old_handler)(int) = ::signal(SIGXFSZ, SIG_IGN);
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  const std::string message = error_of([&] { write_file_atomically(path, std::string(4096, 'x')); });
  ::setrlimit(RLIMIT_FSIZE, &saved);
  ::signal(SIGXFSZ, old_handler);
  EXPECT_TRUE(mentions(message, "path = " + path.string() + ": writing failed (File too large)"));
  EXPECT_EQ(text(path), "precious");
  EXPECT_EQ(entries(), std::vector<std::string>{"a.bin"});
}

TEST_F(FilesTest, AnUnwritableDirectoryLeavesTheOldFile) {
  if (::geteuid() == 0) GTEST_SKIP() << "root writes into read-only directories";
  const fs::path path = dir_ / "a.bin";
  write_file_atomically(path, "precious");
  fs::permissions(dir_, fs::perms::owner_read | fs::perms::owner_exec);
  const std::string message = error_of([&] { write_file_atomically(path, "new"); });
  fs::permissions(dir_, fs::perms::owner_all);
  EXPECT_TRUE(mentions(message, "cannot create a temporary file beside it (Permission denied)"));
  EXPECT_EQ(text(path), "precious");
}

TEST_F(FilesTest, ReadErrorsNameThePath) {
  EXPECT_TRUE(mentions(error_of([&] { (void)read_file(dir_ / "absent"); }),
                       "path = " + (dir_ / "absent").string() + ": no such file"));
  EXPECT_TRUE(mentions(error_of([&] { (void)read_file(dir_); }), "path = " + dir_.string() + ": is a directory"));
}

TEST_F(FilesTest, SafetensorsFiles) {
  TensorFile file;
  file.tensors["x"] = tensor_from(rows_of({{1.0, 2.0}}), DType::f16);
  const fs::path path = dir_ / "x.safetensors";
  write_safetensors(path, file);
  EXPECT_EQ(read_safetensors(path), file);
  EXPECT_EQ(read_file(path), serialize_safetensors(file));

  write_file_atomically(path, "short");
  EXPECT_TRUE(mentions(error_of([&] { (void)read_safetensors(path); }), path.string() + ": file size = 5 bytes"));
  file.tensors["x"].data.pop_back();
  EXPECT_TRUE(mentions(error_of([&] { write_safetensors(path, file); }),
                       path.string() + ": tensor 'x': data = 3 bytes: dtype F16 and shape [1, 2] need 4"));
  EXPECT_EQ(text(path), "short");
}

// --- an independent reader -----------------------------------------------------------------------

// numpy and the format's specification, nothing of ours: prints "name dtype shape v0 v1 ..." per
// tensor, with Python's repr of each value as a float (exact: the shortest round-tripping decimal).
constexpr const char* kNumpyReader = R"PY(
import json, math, struct, sys
import numpy as np

def fp8(code, e_bits, m_bits, bias, ieee):
    sign = -1.0 if code >> 7 else 1.0
    e, m = (code >> m_bits) & ((1 << e_bits) - 1), code & ((1 << m_bits) - 1)
    top = (1 << e_bits) - 1
    if e == top and ieee:
        v = math.inf if m == 0 else math.nan
    elif e == top and m == (1 << m_bits) - 1:
        v = math.nan
    elif e == 0:
        v = m / (1 << m_bits) * 2.0 ** (1 - bias)
    else:
        v = (1 + m / (1 << m_bits)) * 2.0 ** (e - bias)
    return math.copysign(v, sign)

data = open(sys.argv[1], "rb").read()
(n,) = struct.unpack("<Q", data[:8])
assert n % 8 == 0, "header length not a multiple of 8"
header = json.loads(data[8:8 + n].decode("utf-8"))
assert list(header) == sorted(header), "keys not sorted"
header.pop("__metadata__", None)
buffer = data[8 + n:]
storage = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "U8": "u1", "BOOL": "?"}
size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2}
order = sorted(header, key=lambda name: (-size.get(header[name]["dtype"], 1), name))
end_of_last = 0
for name in order:
    begin, end = header[name]["data_offsets"]
    assert begin == end_of_last, "data not laid out by decreasing element size, then name"
    assert begin % size.get(header[name]["dtype"], 1) == 0, "tensor not aligned to its element size"
    end_of_last = end
for name, entry in header.items():
    begin, end = entry["data_offsets"]
    raw, dtype = buffer[begin:end], entry["dtype"]
    if dtype == "BF16":
        values = (np.frombuffer(raw, "<u2").astype("<u4") << 16).view("<f4")
    elif dtype == "F8_E4M3":
        values = np.array([fp8(c, 4, 3, 7, False) for c in raw])
    elif dtype == "F8_E5M2":
        values = np.array([fp8(c, 5, 2, 15, True) for c in raw])
    else:
        values = np.frombuffer(raw, storage[dtype])
    values = values.reshape(entry["shape"])
    print(name, dtype, "x".join(map(str, values.shape)) or "scalar", *[repr(float(v)) for v in values.ravel()])
assert end_of_last == len(buffer), "bytes after the last tensor"
)PY";

TEST_F(FilesTest, NumpyReadsWhatWeWrite) {
  if (!fs::exists("/usr/bin/python3") || std::system("/usr/bin/python3 -c 'import numpy' 2>/dev/null") != 0) {
    GTEST_SKIP() << "needs Debian's /usr/bin/python3 with numpy (python3-numpy)";
  }
  TensorFile file;
  file.metadata["moelab"] = "test";
  for (DType dtype : {DType::f64, DType::f32, DType::f16, DType::bf16, DType::f8_e4m3, DType::f8_e5m2, DType::i64,
                      DType::i32, DType::u8, DType::boolean}) {
    const std::vector<double> v = exact_values(dtype);
    MatrixD m(1, static_cast<Index>(v.size()));
    for (Index i = 0; i < m.cols(); ++i) m(0, i) = v[static_cast<std::size_t>(i)];
    file.tensors["t." + std::string(dtype_name(dtype))] = tensor_from(m, dtype);
  }
  file.tensors["scalar"] = scalar_tensor(-0.375, DType::bf16);
  write_safetensors(dir_ / "all.safetensors", file);
  write_file_atomically(dir_ / "reader.py", kNumpyReader);
  const std::string command = fmt::format("/usr/bin/python3 {} {} > {} 2>&1", (dir_ / "reader.py").string(),
                                          (dir_ / "all.safetensors").string(), (dir_ / "out.txt").string());
  const int status = std::system(command.c_str());
  const std::string out = text(dir_ / "out.txt");
  ASSERT_EQ(status, 0) << out;

  std::istringstream lines(out);
  std::size_t seen = 0;
  for (const auto& [name, tensor] : file.tensors) {
    std::string line;
    ASSERT_TRUE(std::getline(lines, line)) << "no line for " << name << " in\n" << out;
    std::istringstream fields(line);
    std::string got_name, got_dtype, got_shape, word;
    fields >> got_name >> got_dtype >> got_shape;
    std::vector<double> got;
    while (fields >> word) got.push_back(std::strtod(word.c_str(), nullptr));
    EXPECT_EQ(got_name, name);
    EXPECT_EQ(got_dtype, dtype_name(tensor.dtype));
    EXPECT_EQ(got_shape, tensor.shape.empty() ? "scalar" : fmt::format("{}", fmt::join(tensor.shape, "x")));
    EXPECT_TRUE(same_values(got, tensor_values(tensor))) << name;
    ++seen;
  }
  EXPECT_EQ(seen, file.tensors.size());
}

}  // namespace
}  // namespace moelab
