// moelab/reference/safetensors.h — the safetensors file format, written and read by hand.
//
// The format (https://github.com/huggingface/safetensors, "Format"):
//   8 bytes      N, the header's length, an unsigned 64-bit little-endian integer
//   N bytes      the header: a UTF-8 JSON object
//                  {"<tensor name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]},
//                   ..., "__metadata__": {"<key>": "<string value>", ...}}
//                padded at its end with spaces (0x20) to a multiple of 8 bytes
//   the rest     the data buffer: each tensor's bytes, row-major, little-endian, at [begin, end)
//                relative to the buffer's start
// Readers in every framework (PyTorch, JAX, numpy, Rust, C++) accept these files, and the Python
// helper golden/moelab_golden.py reads them with numpy alone.
//
// What the writer guarantees, so that two writes of the same tensors give the same bytes: tensors
// are laid out by decreasing element size, then in name order (std::map order, byte-wise), so that
// every tensor is aligned to its element size (as Hugging Face's writer does: some readers map the
// file and need it); keys in the header are sorted, numbers are written as integers, and the
// padding is spaces.
//
// What the reader rejects, each with an Error that names the file (the `what` argument), the field
// and the rule (e.g. "golden/x.safetensors: tensor 'output.y': data_offsets = [0, 12]: 12 bytes,
// but dtype F32 and shape [2, 2] need 16"):
//   - fewer than 8 bytes; a header length N beyond the file (or above 100 MB);
//   - a header that is not valid JSON, or not an object; a key given twice in one object (readers
//     would disagree on which counts); nesting deeper than 64 levels (a header needs 3);
//   - an empty tensor name; an entry that is not an object, lacks dtype / shape / data_offsets, or
//     has extra fields;
//   - an unknown dtype; a shape that is not a list of non-negative integers; element counts whose
//     product overflows;
//   - data_offsets that are not two integers begin <= end inside the buffer, whose length does
//     not match dtype and shape, that overlap another tensor's, or that leave holes (the tensors
//     must cover the buffer exactly, as the Rust reader requires);
//   - __metadata__ that is not an object of strings.
// It never crashes and never reads outside the input, whatever the bytes (a libFuzzer target,
// fuzz/fuzz_safetensors.cpp, checks this).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "reference/numerics.h"
#include "reference/types.h"

namespace moelab {

// The dtypes moelab writes, spelled as in the safetensors header.
enum class DType { f64, f32, f16, bf16, f8_e4m3, f8_e5m2, i64, i32, u8, boolean };
std::string_view dtype_name(DType dtype);  // "F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "U8", "BOOL"
DType parse_dtype(std::string_view name);  // throws Error naming "dtype" and listing the known names
std::size_t dtype_size(DType dtype);       // bytes per element: 8, 4, 2, 2, 1, 1, 8, 4, 1, 1
bool is_float(DType dtype);                // f64 ... f8_e5m2
// The moelab numerics format of a floating dtype (f32, bf16, f16, f8_*); throws for f64 and integers.
Format dtype_format(DType dtype);
DType format_dtype(Format format);         // fp32 -> f32, bf16 -> bf16, ...

struct Tensor {
  DType dtype = DType::f32;
  std::vector<std::int64_t> shape{};  // row-major; {} is a scalar (one element)
  std::vector<std::uint8_t> data{};   // numel() * dtype_size(dtype) bytes, little-endian
  std::int64_t numel() const;       // product of shape (1 for a scalar)
  friend bool operator==(const Tensor&, const Tensor&) = default;
};

struct TensorFile {
  std::map<std::string, std::string> metadata{};  // "__metadata__"
  std::map<std::string, Tensor> tensors{};        // by name
  friend bool operator==(const TensorFile&, const TensorFile&) = default;
};

// The file's bytes. Throws Error if a tensor's data size does not match its dtype and shape, a
// name is empty or "__metadata__", or a name or metadata string is not UTF-8. An empty metadata
// map writes no "__metadata__" entry.
std::vector<std::uint8_t> serialize_safetensors(const TensorFile& file);
// Parses and validates (see the top of this file). `what` names the input in messages.
TensorFile parse_safetensors(std::span<const std::uint8_t> bytes, std::string_view what);

// write_file_atomically(serialize_safetensors(file)); read_file + parse_safetensors.
void write_safetensors(const std::filesystem::path& path, const TensorFile& file);
TensorFile read_safetensors(const std::filesystem::path& path);

// ---- conversions between tensors and moelab's matrices -----------------------------------------
// Floating values are rounded to the dtype (round to nearest even, as numerics.h; f64 exact, f32 by
// the C++ conversion, bf16/f16/f8 by encode() of a float rounded to odd, so that the value is
// rounded once, not twice; fp8 non-saturating, so an out-of-range value becomes NaN (e4m3) or inf
// (e5m2), never silently the max). Integer dtypes take integer-valued input only and check the
// range (Error naming the element, e.g. "values(1, 2) = 2.5: ..."; the caller adds the tensor).
Tensor tensor_from(const MatrixD& values, DType dtype);                       // shape (rows, cols)
Tensor tensor_from(std::span<const double> values, DType dtype);             // shape (n)
Tensor tensor_from(const IndexMatrix& values, DType dtype = DType::i32);      // shape (rows, cols)
Tensor tensor_from(std::span<const std::int64_t> values, DType dtype = DType::i64);  // shape (n)
Tensor scalar_tensor(double value, DType dtype = DType::f64);                 // shape {}
// Every element as a double (exact for every dtype here but i64 beyond 2^53), in row-major order.
// Throws Error if the data size does not match dtype and shape, or a BOOL byte is not 0 or 1.
std::vector<double> tensor_values(const Tensor& tensor);
// A 2-d tensor as a matrix; a 1-d tensor of n elements as (n, 1); a scalar as (1, 1). Throws Error
// naming `name` for higher ranks.
MatrixD tensor_matrix(const Tensor& tensor, std::string_view name);
// Integer tensor as an IndexMatrix (same shape rules); Error for a floating tensor or a value
// outside int32 (IndexMatrix's element type).
IndexMatrix tensor_index_matrix(const Tensor& tensor, std::string_view name);

}  // namespace moelab
