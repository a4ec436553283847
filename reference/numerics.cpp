// moelab/reference/numerics.cpp — see numerics.h for the contract.
//
// One generic algorithm serves every format: a float32 is an integer significand times a power
// of two, the target format's spacing at that value is another power of two, and rounding is
// an integer shift with round-half-to-even. The formats differ only in their layout (Layout).
#include "reference/numerics.h"

#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <limits>
#include <string>

#include "reference/error.h"

namespace moelab {
namespace {

struct Layout {
  int bits;
  int exponent_bits;
  int mantissa_bits;
  int bias;
  bool has_inf;  // IEEE-like: the top exponent field holds inf and NaN only

  std::uint32_t exponent_all_ones() const { return (1u << exponent_bits) - 1; }
  std::uint32_t mantissa_all_ones() const { return (1u << mantissa_bits) - 1; }
  // The largest finite value's fields. OCP E4M3FN keeps the top exponent for finite values and
  // gives up only mantissa 111 there, for NaN (OCP 8-bit FP spec v1.0, table 1).
  std::uint32_t max_exponent_field() const { return has_inf ? exponent_all_ones() - 1 : exponent_all_ones(); }
  std::uint32_t max_mantissa_at_top() const { return has_inf ? mantissa_all_ones() : mantissa_all_ones() - 1; }
  int emin() const { return 1 - bias; }  // exponent of the smallest normal
};

Layout layout(Format f) {
  switch (f) {
    case Format::fp32: return {32, 8, 23, 127, true};
    case Format::bf16: return {16, 8, 7, 127, true};
    case Format::fp16: return {16, 5, 10, 15, true};
    case Format::fp8_e4m3: return {8, 4, 3, 7, false};
    case Format::fp8_e5m2: return {8, 5, 2, 15, true};
  }
  fail("format", static_cast<int>(f), "is not a known Format");
}

std::uint32_t pack(const Layout& l, std::uint32_t sign, std::uint32_t exponent, std::uint32_t mantissa) {
  return (sign << (l.bits - 1)) | (exponent << l.mantissa_bits) | mantissa;
}

std::uint32_t max_pattern(const Layout& l, std::uint32_t sign) {
  return pack(l, sign, l.max_exponent_field(), l.max_mantissa_at_top());
}

std::uint32_t inf_pattern(const Layout& l, std::uint32_t sign) { return pack(l, sign, l.exponent_all_ones(), 0); }

// NaN keeps its sign and the top mantissa bits of its payload; an empty payload gets the quiet bit.
std::uint32_t nan_pattern(const Layout& l, std::uint32_t sign, std::uint32_t float_mantissa) {
  if (!l.has_inf) return pack(l, sign, l.exponent_all_ones(), l.mantissa_all_ones());  // E4M3FN: one NaN
  std::uint32_t payload = float_mantissa >> (23 - l.mantissa_bits);
  if (payload == 0) payload = 1u << (l.mantissa_bits - 1);
  return pack(l, sign, l.exponent_all_ones(), payload);
}

std::uint32_t overflow_pattern(const Layout& l, std::uint32_t sign, Overflow overflow) {
  if (overflow == Overflow::saturating) return max_pattern(l, sign);
  return l.has_inf ? inf_pattern(l, sign) : nan_pattern(l, sign, 0);
}

// |x| = significand * 2^q exactly, with floor(log2|x|) = log2_floor (x finite, non-zero).
struct Unpacked {
  std::uint64_t significand;
  int q;
  int log2_floor;
};

Unpacked unpack_float(std::uint32_t float_bits) {
  const std::uint32_t e = (float_bits >> 23) & 0xFF;
  const std::uint32_t m = float_bits & 0x7FFFFF;
  if (e == 0) return {m, -149, static_cast<int>(std::bit_width(m)) - 1 - 149};  // float32 subnormal
  return {m | 0x800000u, static_cast<int>(e) - 150, static_cast<int>(e) - 127};
}

std::uint32_t encode_finite(std::uint32_t float_bits, const Layout& l, Overflow overflow) {
  const std::uint32_t sign = float_bits >> 31;
  if ((float_bits & 0x7FFFFFFF) == 0) return pack(l, sign, 0, 0);
  const Unpacked u = unpack_float(float_bits);

  // The spacing of the target at |x| is 2^(e - M), e = max(floor(log2|x|), emin).
  int e = std::max(u.log2_floor, l.emin());
  const int shift = (e - l.mantissa_bits) - u.q;  // > 0: every target is narrower than float32
  std::uint64_t n = 0;
  if (shift < 40) {  // beyond that |x| < a quarter of the spacing: it rounds to zero
    n = u.significand >> shift;
    const std::uint64_t rest = u.significand & ((std::uint64_t{1} << shift) - 1);
    const std::uint64_t half = std::uint64_t{1} << (shift - 1);
    if (rest > half || (rest == half && (n & 1))) ++n;  // round half to even
  }
  // |x| rounded = n * 2^(e - M), with n < 2^(M+1).
  if (n == 0) return pack(l, sign, 0, 0);
  if (n < (std::uint64_t{1} << l.mantissa_bits)) return pack(l, sign, 0, static_cast<std::uint32_t>(n));  // subnormal
  if (n == (std::uint64_t{1} << (l.mantissa_bits + 1))) {  // rounding carried into the next binade
    n >>= 1;
    ++e;
  }
  const std::int64_t exponent = static_cast<std::int64_t>(e) + l.bias;
  const std::uint32_t mantissa = static_cast<std::uint32_t>(n) - (1u << l.mantissa_bits);
  const std::int64_t max_exponent = l.max_exponent_field();
  const bool too_big = exponent > max_exponent || (exponent == max_exponent && mantissa > l.max_mantissa_at_top());
  if (too_big) return overflow_pattern(l, sign, overflow);
  return pack(l, sign, static_cast<std::uint32_t>(exponent), mantissa);
}

void check_width(std::uint32_t bits, Format f) {
  const int width = layout(f).bits;
  if (width < 32 && (bits >> width) != 0)
    fail("bits", fmt::format("{:#x}", bits), fmt::format("does not fit the {} bits of {}", width, format_name(f)));
}

// Largest float x with round_to(exp(x), f) finite, by bisection over the positive floats (exp is
// monotone, and so is rounding).
float find_max_exp_input(Format f) {
  auto finite = [f](std::uint32_t bits) { return std::isfinite(round_to(std::exp(std::bit_cast<float>(bits)), f)); };
  std::uint32_t lo = std::bit_cast<std::uint32_t>(0.0f);    // finite
  std::uint32_t hi = std::bit_cast<std::uint32_t>(128.0f);  // exp(128) overflows every format
  while (hi - lo > 1) {
    const std::uint32_t mid = lo + (hi - lo) / 2;
    (finite(mid) ? lo : hi) = mid;
  }
  return std::bit_cast<float>(lo);
}

FormatInfo make_info(Format f) {
  const Layout l = layout(f);
  FormatInfo info{};
  info.format = f;
  info.name = format_name(f);
  info.bits = l.bits;
  info.exponent_bits = l.exponent_bits;
  info.mantissa_bits = l.mantissa_bits;
  info.bias = l.bias;
  info.has_inf = l.has_inf;
  info.max = decode(max_pattern(l, 0), f);
  info.min_normal = std::ldexp(1.0f, l.emin());
  info.min_subnormal = std::ldexp(1.0f, l.emin() - l.mantissa_bits);
  info.epsilon = std::ldexp(1.0f, -l.mantissa_bits);
  info.max_exp_input = find_max_exp_input(f);
  return info;
}

}  // namespace

std::string_view format_name(Format f) {
  switch (f) {
    case Format::fp32: return "fp32";
    case Format::bf16: return "bf16";
    case Format::fp16: return "fp16";
    case Format::fp8_e4m3: return "fp8_e4m3";
    case Format::fp8_e5m2: return "fp8_e5m2";
  }
  fail("format", static_cast<int>(f), "is not a known Format");
}

const FormatInfo& format_info(Format f) {
  static const FormatInfo infos[] = {make_info(Format::fp32), make_info(Format::bf16), make_info(Format::fp16),
                                     make_info(Format::fp8_e4m3), make_info(Format::fp8_e5m2)};
  for (const FormatInfo& info : infos)
    if (info.format == f) return info;
  fail("format", static_cast<int>(f), "is not a known Format");
}

Format parse_format(std::string_view name, std::string_view field) {
  struct Alias {
    std::string_view name;
    Format format;
  };
  static constexpr Alias aliases[] = {
      {"fp32", Format::fp32},         {"float32", Format::fp32},     {"bf16", Format::bf16},
      {"bfloat16", Format::bf16},     {"fp16", Format::fp16},        {"float16", Format::fp16},
      {"fp8_e4m3", Format::fp8_e4m3}, {"e4m3", Format::fp8_e4m3},   {"fp8", Format::fp8_e4m3},
      {"fp8_e5m2", Format::fp8_e5m2}, {"e5m2", Format::fp8_e5m2}};
  for (const Alias& a : aliases)
    if (a.name == name) return a.format;
  fail(field, fmt::format("\"{}\"", name), "must be one of fp32, bf16, fp16, fp8_e4m3, fp8_e5m2");
}

std::vector<float> parse_float32_list(std::string_view text, std::string_view field) {
  std::vector<float> out;
  std::size_t start = 0;
  for (int item = 1;; ++item) {
    const std::size_t comma = text.find(',', start);
    std::string piece(text.substr(start, comma == std::string_view::npos ? std::string_view::npos : comma - start));
    piece.erase(0, piece.find_first_not_of(" \t"));
    piece.erase(piece.find_last_not_of(" \t") + 1);
    const char* begin = piece.data();
    if (!piece.empty() && piece[0] == '+') ++begin;
    float x = 0.0f;
    const auto [end, ec] = std::from_chars(begin, piece.data() + piece.size(), x);
    if (piece.empty() || ec != std::errc() || end != piece.data() + piece.size())
      fail(field, fmt::format("\"{}\"", text),
           piece.empty() ? fmt::format("item {} is empty; give numbers separated by commas", item)
                         : fmt::format("item {} (\"{}\") is not a float32 number", item, piece));
    out.push_back(x);
    if (comma == std::string_view::npos) return out;
    start = comma + 1;
  }
}

std::uint32_t encode(float x, Format f, Overflow overflow) {
  const Layout l = layout(f);
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
  const std::uint32_t sign = bits >> 31;
  if (std::isnan(x)) return f == Format::fp32 ? bits : nan_pattern(l, sign, bits & 0x7FFFFF);
  if (std::isinf(x)) {
    if (overflow == Overflow::saturating) return max_pattern(l, sign);
    return l.has_inf ? inf_pattern(l, sign) : nan_pattern(l, sign, 0);
  }
  if (f == Format::fp32) return bits;
  return encode_finite(bits, l, overflow);
}

float decode(std::uint32_t bits, Format f) {
  check_width(bits, f);
  if (f == Format::fp32) return std::bit_cast<float>(bits);
  const Layout l = layout(f);
  const Fields p = decompose(bits, f);
  const bool top = p.exponent == l.exponent_all_ones();
  if ((top && l.has_inf) || (top && p.mantissa == l.mantissa_all_ones())) {
    // inf or NaN: rebuild the float32 pattern, keeping the NaN payload in the top mantissa bits.
    return std::bit_cast<float>((p.sign << 31) | 0x7F800000u | (p.mantissa << (23 - l.mantissa_bits)));
  }
  const float magnitude =
      p.exponent == 0 ? std::ldexp(static_cast<float>(p.mantissa), l.emin() - l.mantissa_bits)
                      : std::ldexp(static_cast<float>((1u << l.mantissa_bits) | p.mantissa),
                                   static_cast<int>(p.exponent) - l.bias - l.mantissa_bits);
  return p.sign ? -magnitude : magnitude;
}

float round_to(float x, Format f, Overflow overflow) { return decode(encode(x, f, overflow), f); }

void round_to(std::span<float> xs, Format f, Overflow overflow) {
  for (float& x : xs) x = round_to(x, f, overflow);
}

Fields decompose(std::uint32_t bits, Format f) {
  check_width(bits, f);
  const Layout l = layout(f);
  return {bits >> (l.bits - 1), (bits >> l.mantissa_bits) & l.exponent_all_ones(), bits & l.mantissa_all_ones()};
}

std::uint32_t compose(Fields fields, Format f) {
  const Layout l = layout(f);
  require(fields.sign <= 1, "sign", fields.sign, "must be 0 or 1");
  require(fields.exponent <= l.exponent_all_ones(), "exponent", fields.exponent,
          fmt::format("must fit the {} exponent bits of {}", l.exponent_bits, format_name(f)));
  require(fields.mantissa <= l.mantissa_all_ones(), "mantissa", fields.mantissa,
          fmt::format("must fit the {} mantissa bits of {}", l.mantissa_bits, format_name(f)));
  return pack(l, fields.sign, fields.exponent, fields.mantissa);
}

ValueClass classify(std::uint32_t bits, Format f) {
  const Layout l = layout(f);
  const Fields p = decompose(bits, f);
  if (p.exponent == l.exponent_all_ones()) {
    if (l.has_inf) return p.mantissa == 0 ? ValueClass::infinite : ValueClass::nan;
    if (p.mantissa == l.mantissa_all_ones()) return ValueClass::nan;
  }
  if (p.exponent == 0) return p.mantissa == 0 ? ValueClass::zero : ValueClass::subnormal;
  return ValueClass::normal;
}

std::string_view value_class_name(ValueClass c) {
  switch (c) {
    case ValueClass::zero: return "zero";
    case ValueClass::subnormal: return "subnormal";
    case ValueClass::normal: return "normal";
    case ValueClass::infinite: return "infinite";
    case ValueClass::nan: return "nan";
  }
  return "?";
}

float ulp(float x, Format f) {
  require(std::isfinite(x), "x", x, "the spacing is defined for finite values only");
  const Layout l = layout(f);
  if (x == 0.0f) return std::ldexp(1.0f, l.emin() - l.mantissa_bits);
  int exponent = 0;
  std::frexp(x, &exponent);  // |x| = m * 2^exponent, m in [0.5, 1): floor(log2|x|) = exponent - 1
  return std::ldexp(1.0f, std::max(exponent - 1, l.emin()) - l.mantissa_bits);
}

BitClass bit_class(int bit, Format f) {
  const Layout l = layout(f);
  require(bit >= 0 && bit < l.bits, "bit", bit, fmt::format("must be in [0, {}) for {}", l.bits, format_name(f)));
  if (bit == l.bits - 1) return BitClass::sign;
  return bit >= l.mantissa_bits ? BitClass::exponent : BitClass::mantissa;
}

std::string_view bit_class_name(BitClass c) {
  switch (c) {
    case BitClass::sign: return "sign";
    case BitClass::exponent: return "exponent";
    case BitClass::mantissa: return "mantissa";
  }
  return "?";
}

std::uint32_t flip_bit(std::uint32_t bits, int bit, Format f) {
  bit_class(bit, f);  // validates the bit position
  check_width(bits, f);
  return bits ^ (1u << bit);
}

float flip_bit_value(float x, int bit, Format f) { return decode(flip_bit(encode(x, f), bit, f), f); }

std::string_view softmax_method_name(SoftmaxMethod m) { return m == SoftmaxMethod::naive ? "naive" : "stable"; }

LowpSoftmax softmax_in_format(std::span<const float> logits, Format f, SoftmaxMethod method) {
  require(!logits.empty(), "logits.size", 0, "softmax needs at least one logit");
  LowpSoftmax r;
  r.logits.assign(logits.begin(), logits.end());
  round_to(r.logits, f);

  float m = 0.0f;  // the stable method subtracts the largest logit; a NaN logit makes m NaN
  if (method == SoftmaxMethod::stable) {
    m = -std::numeric_limits<float>::infinity();
    for (float x : r.logits) m = (std::isnan(x) || std::isnan(m)) ? std::numeric_limits<float>::quiet_NaN() : std::max(m, x);
  }
  for (float x : r.logits) {
    const float d = method == SoftmaxMethod::stable ? round_to(x - m, f) : x;
    const float e = round_to(std::exp(d), f);
    if (!std::isnan(d) && !std::isfinite(e)) ++r.overflow_count;  // inf, or NaN in fp8_e4m3
    r.shifted.push_back(d);
    r.exps.push_back(e);
    r.sum = round_to(r.sum + e, f);  // accumulated in the format, one addition at a time
  }
  for (float e : r.exps) {
    const float p = round_to(e / r.sum, f);
    if (std::isnan(p)) ++r.nan_count;
    r.probs.push_back(p);
  }
  return r;
}

}  // namespace moelab
