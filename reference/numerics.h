// moelab/reference/numerics.h — bit-exact emulation of the low-precision formats MoE models use.
//
// Contract: plain C++ on the CPU, no intrinsics, written to be read. Values live in float32; a
// value "in format f" is a float32 that f can represent exactly, obtained by round_to(). The bit
// pattern of a value in f is a std::uint32_t holding f's bits in its low `bits` bits.
//
// Formats (sign bits . exponent bits . mantissa bits, bias):
//   fp32      1.8.23  bias 127  IEEE binary32
//   bf16      1.8.7   bias 127  the top 16 bits of fp32: same range, 3 significant digits
//   fp16      1.5.10  bias 15   IEEE binary16, max 65504
//   fp8_e4m3  1.4.3   bias 7    OCP E4M3FN: no infinities, max 448, NaN = S.1111.111 only
//   fp8_e5m2  1.5.2   bias 15   OCP E5M2: IEEE-like, max 57344, infinities and NaNs
//
// Rounding is round-to-nearest, ties to even, everywhere. Subnormals are kept (no flush to zero).
// Overflow (a value whose rounded magnitude exceeds the format's max):
//   nonsaturating (the IEEE behaviour, and the default): -> +-inf, or NaN for fp8_e4m3 (no inf);
//   saturating (fp8's "satfinite" mode; allowed for every format): -> +-max, also for +-inf input.
// NaN input gives NaN with its sign and the top mantissa bits of its payload (so every NaN bit
// pattern of a format round-trips); a payload that would become zero gets the quiet bit.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moelab {

enum class Format { fp32, bf16, fp16, fp8_e4m3, fp8_e5m2 };
enum class Overflow { nonsaturating, saturating };

inline constexpr Format kAllFormats[] = {Format::fp32, Format::bf16, Format::fp16,
                                         Format::fp8_e4m3, Format::fp8_e5m2};

// Facts about a format, as a student is told them. Values are exact (they are float32 numbers).
struct FormatInfo {
  Format format;
  std::string_view name;      // "bf16"
  int bits;                   // total width
  int exponent_bits;
  int mantissa_bits;          // stored (explicit) fraction bits
  int bias;
  bool has_inf;               // false for fp8_e4m3 (OCP E4M3FN)
  float max;                  // largest finite value
  float min_normal;           // 2^(1 - bias)
  float min_subnormal;        // 2^(1 - bias - mantissa_bits)
  float epsilon;              // 2^-mantissa_bits: spacing just above 1.0
  float max_exp_input;        // largest float32 x with round_to(exp(x), f) finite (exp in float32)
};

const FormatInfo& format_info(Format f);
std::string_view format_name(Format f);
// Accepts the names above and the aliases fp8 (e4m3), e4m3, e5m2, float32, bfloat16, float16;
// throws Error naming `field` otherwise.
Format parse_format(std::string_view name, std::string_view field = "dtype");
// "128.5, 1,-inf" -> {128.5, 1, -inf}: float32 numbers separated by commas (inf and nan accepted);
// Error naming `field`, the text and the bad item otherwise. The CLI's --logits and the viewer's.
std::vector<float> parse_float32_list(std::string_view text, std::string_view field);

// --- conversions -------------------------------------------------------------------------------
// The bit pattern of x rounded to f (round-to-nearest-even).
std::uint32_t encode(float x, Format f, Overflow overflow = Overflow::nonsaturating);
// The value of bit pattern `bits` in f (bits above f's width must be zero).
float decode(std::uint32_t bits, Format f);
// x rounded to the nearest value of f: decode(encode(x, f, overflow), f).
float round_to(float x, Format f, Overflow overflow = Overflow::nonsaturating);
void round_to(std::span<float> xs, Format f, Overflow overflow = Overflow::nonsaturating);

// --- the fields of a bit pattern -----------------------------------------------------------------
struct Fields {
  std::uint32_t sign;      // 0 or 1
  std::uint32_t exponent;  // biased exponent field
  std::uint32_t mantissa;  // stored fraction field
};
Fields decompose(std::uint32_t bits, Format f);
std::uint32_t compose(Fields fields, Format f);

enum class ValueClass { zero, subnormal, normal, infinite, nan };
ValueClass classify(std::uint32_t bits, Format f);
std::string_view value_class_name(ValueClass c);

// Spacing of f's values at x: 2^(max(floor(log2|x|), 1 - bias) - mantissa_bits). The spacing in
// [128, 256) is 1.0 in bf16, so 128.5 rounds to 128. Throws for non-finite x.
float ulp(float x, Format f);

// --- bit flips (the fault-injection primitive) -------------------------------------------------
// Bit 0 is the least significant mantissa bit; bit bits-1 is the sign.
enum class BitClass { sign, exponent, mantissa };
BitClass bit_class(int bit, Format f);
std::string_view bit_class_name(BitClass c);
// `bits` with bit `bit` inverted; throws Error if bit is outside [0, width).
std::uint32_t flip_bit(std::uint32_t bits, int bit, Format f);
// The value stored in f (x rounded to f), with bit `bit` of its pattern inverted.
float flip_bit_value(float x, int bit, Format f);

// --- softmax with every step held in a format ---------------------------------------------------
// naive:  p_i = exp(x_i) / sum_j exp(x_j)
// stable: p_i = exp(x_i - m) / sum_j exp(x_j - m), m = max_j x_j   (the same function, exactly)
// Each intermediate is rounded to the format where a kernel working in it would round it: the
// input logits, each difference x_i - m, each exponential, the running sum after every addition,
// and each quotient. exp and the arithmetic are done in float32 and then rounded.
enum class SoftmaxMethod { naive, stable };
std::string_view softmax_method_name(SoftmaxMethod m);

struct LowpSoftmax {
  std::vector<float> logits;   // the input rounded to the format
  std::vector<float> shifted;  // x_i - m (stable) or x_i (naive), in the format
  std::vector<float> exps;     // exp(shifted_i), in the format
  float sum = 0.0f;           // sum of exps, accumulated in the format
  std::vector<float> probs;   // in the format
  int overflow_count = 0;     // exponentials that overflowed (inf, or NaN in a format with no inf)
  int nan_count = 0;          // NaN probabilities
  bool overflowed() const { return overflow_count > 0 || nan_count > 0; }
};
LowpSoftmax softmax_in_format(std::span<const float> logits, Format f, SoftmaxMethod method);

}  // namespace moelab
