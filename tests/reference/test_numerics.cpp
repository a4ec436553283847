// Tests of reference/numerics: bit-exact bf16 / fp16 / fp8 emulation.
//
// The conversions are checked against an independent formulation (Oracle below): the list of
// every finite value of a format, computed from the format's definition in double precision, and
// "round to nearest, ties to the even code" done by searching that list. It shares no code with
// the shift-and-round algorithm in numerics.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include <fmt/format.h>

#include "reference/error.h"
#include "reference/numerics.h"
#include "tests/testing.h"

namespace moelab {
namespace {

using moelab::testing::error_of;

constexpr Format kNarrowFormats[] = {Format::bf16, Format::fp16, Format::fp8_e4m3, Format::fp8_e5m2};
constexpr Overflow kOverflows[] = {Overflow::nonsaturating, Overflow::saturating};

std::uint32_t bits_of(float x) { return std::bit_cast<std::uint32_t>(x); }

// The formats' definitions, written out again: (width, exponent bits, mantissa bits, bias, inf?).
struct Spec {
  int bits, e, m, bias;
  bool has_inf;
};
Spec spec(Format f) {
  switch (f) {
    case Format::bf16: return {16, 8, 7, 127, true};
    case Format::fp16: return {16, 5, 10, 15, true};
    case Format::fp8_e4m3: return {8, 4, 3, 7, false};
    case Format::fp8_e5m2: return {8, 5, 2, 15, true};
    default: return {32, 8, 23, 127, true};
  }
}

bool is_nan_code(std::uint32_t code, const Spec& s) {
  const std::uint32_t exp = (code >> s.m) & ((1u << s.e) - 1), man = code & ((1u << s.m) - 1);
  if (s.has_inf) return exp == (1u << s.e) - 1 && man != 0;
  return exp == (1u << s.e) - 1 && man == (1u << s.m) - 1;  // OCP E4M3FN: S.1111.111 only
}
bool is_inf_code(std::uint32_t code, const Spec& s) {
  const std::uint32_t exp = (code >> s.m) & ((1u << s.e) - 1), man = code & ((1u << s.m) - 1);
  return s.has_inf && exp == (1u << s.e) - 1 && man == 0;
}

// Value of a non-negative, non-special code from the definition, in double.
double value_of(std::uint32_t code, const Spec& s) {
  const std::uint32_t exp = code >> s.m, man = code & ((1u << s.m) - 1);
  const double frac = static_cast<double>(man) / std::pow(2.0, s.m);
  if (exp == 0) return frac * std::pow(2.0, 1 - s.bias);
  return (1.0 + frac) * std::pow(2.0, static_cast<int>(exp) - s.bias);
}

class Oracle {
 public:
  explicit Oracle(Format f) : s_(spec(f)) {
    for (std::uint32_t code = 0; code < (1u << (s_.bits - 1)); ++code)
      if (!is_nan_code(code, s_) && !is_inf_code(code, s_)) values_.push_back({value_of(code, s_), code});
    // One virtual value past the max, the next step of the top binade: reaching it is overflow.
    const Entry top = values_.back();
    const double spacing = top.value - values_[values_.size() - 2].value;
    values_.push_back({top.value + spacing, top.code + 1});
  }

  struct Result {
    bool nan;
    std::uint32_t code;  // valid when !nan
  };

  Result encode(float x, Overflow overflow) const {
    if (std::isnan(x)) return {true, 0};
    const std::uint32_t sign = std::signbit(x) ? 1u << (s_.bits - 1) : 0u;
    const double a = std::fabs(static_cast<double>(x));
    const Entry* chosen = nullptr;
    if (!std::isinf(a)) {
      const auto it = std::lower_bound(values_.begin(), values_.end(), a,
                                       [](const Entry& e, double v) { return e.value < v; });
      if (it == values_.end()) {
        chosen = &values_.back();  // beyond the virtual value: certainly overflow
      } else if (it->value == a || it == values_.begin()) {
        chosen = &*it;
      } else {
        const Entry& lo = *(it - 1);
        const Entry& hi = *it;
        const double dlo = a - lo.value, dhi = hi.value - a;  // exact in double
        chosen = dlo < dhi ? &lo : dhi < dlo ? &hi : (lo.code % 2 == 0 ? &lo : &hi);
      }
    }
    const bool overflowed = chosen == nullptr || chosen == &values_.back();
    if (!overflowed) return {false, sign | chosen->code};
    if (overflow == Overflow::saturating) return {false, sign | values_[values_.size() - 2].code};
    if (!s_.has_inf) return {true, 0};
    return {false, sign | (((1u << s_.e) - 1) << s_.m)};  // inf
  }

  // Every finite non-negative value (without the virtual one).
  std::vector<double> finite_values() const {
    std::vector<double> v;
    for (std::size_t i = 0; i + 1 < values_.size(); ++i) v.push_back(values_[i].value);
    return v;
  }

 private:
  struct Entry {
    double value;
    std::uint32_t code;
  };
  Spec s_;
  std::vector<Entry> values_;
};

// Checks encode() against the oracle for one input; returns false (with a message) on mismatch.
::testing::AssertionResult agrees(const Oracle& oracle, float x, Format f, Overflow overflow) {
  const Oracle::Result want = oracle.encode(x, overflow);
  const std::uint32_t got = encode(x, f, overflow);
  const bool got_nan = classify(got, f) == ValueClass::nan;
  if (want.nan ? got_nan : (!got_nan && got == want.code)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << fmt::format(
             "{} {}: x = {} (bits {:#010x}) encodes to {:#x}, the oracle says {}", format_name(f),
             overflow == Overflow::saturating ? "saturating" : "nonsaturating", x, bits_of(x), got,
             want.nan ? std::string("NaN") : fmt::format("{:#x}", want.code));
}

TEST(Numerics, DecodeMatchesTheDefinitionForEveryPattern) {
  for (Format f : kNarrowFormats) {
    const Spec s = spec(f);
    for (std::uint32_t code = 0; code < (1u << s.bits); ++code) {
      const float v = decode(code, f);
      const std::uint32_t magnitude = code & ((1u << (s.bits - 1)) - 1);
      const bool negative = code >> (s.bits - 1);
      if (is_nan_code(magnitude, s)) {
        EXPECT_TRUE(std::isnan(v)) << std::hex << code;
        EXPECT_EQ(classify(code, f), ValueClass::nan);
      } else if (is_inf_code(magnitude, s)) {
        EXPECT_EQ(v, negative ? -INFINITY : INFINITY) << std::hex << code;
        EXPECT_EQ(classify(code, f), ValueClass::infinite);
      } else {
        EXPECT_EQ(static_cast<double>(v), (negative ? -1 : 1) * value_of(magnitude, s)) << std::hex << code;
        EXPECT_EQ(std::signbit(v), negative) << std::hex << code;  // -0 stays -0
      }
    }
  }
}

TEST(Numerics, EveryBitPatternRoundTrips) {
  for (Format f : kNarrowFormats) {
    const int width = spec(f).bits;
    for (std::uint32_t code = 0; code < (1u << width); ++code) {
      const float v = decode(code, f);
      ASSERT_EQ(encode(v, f), code) << format_name(f) << " pattern 0x" << std::hex << code << " value " << v;
      // A value of the format is represented exactly, so saturation changes nothing but +-inf.
      if (classify(code, f) != ValueClass::infinite) {
        ASSERT_EQ(encode(v, f, Overflow::saturating), code);
      }
    }
  }
}

TEST(Numerics, Fp32IsTheIdentity) {
  std::mt19937_64 rng(1);
  for (int i = 0; i < 100000; ++i) {
    const std::uint32_t b = static_cast<std::uint32_t>(rng());
    EXPECT_EQ(encode(decode(b, Format::fp32), Format::fp32), b);
  }
  EXPECT_EQ(round_to(INFINITY, Format::fp32, Overflow::saturating), std::numeric_limits<float>::max());
}

TEST(Numerics, HandWorkedExamples) {
  EXPECT_EQ(encode(1.0f, Format::bf16), 0x3F80u);
  EXPECT_EQ(round_to(128.5f, Format::bf16), 128.0f);  // tie between 128 (even) and 129
  EXPECT_EQ(round_to(129.5f, Format::bf16), 130.0f);  // tie between 129 (odd) and 130 (even)
  EXPECT_EQ(round_to(128.50001f, Format::bf16), 129.0f);
  EXPECT_EQ(encode(65504.0f, Format::fp16), 0x7BFFu);
  EXPECT_EQ(round_to(65519.0f, Format::fp16), 65504.0f);
  EXPECT_EQ(round_to(65520.0f, Format::fp16), INFINITY);  // halfway to 65536: ties to even = inf
  EXPECT_EQ(round_to(65520.0f, Format::fp16, Overflow::saturating), 65504.0f);
  EXPECT_EQ(round_to(std::ldexp(1.0f, -24), Format::fp16), std::ldexp(1.0f, -24));  // min subnormal
  EXPECT_EQ(round_to(std::ldexp(1.0f, -25), Format::fp16), 0.0f);  // half of it, ties to even zero
  EXPECT_EQ(round_to(std::ldexp(3.0f, -26), Format::fp16), std::ldexp(1.0f, -24));

  EXPECT_EQ(encode(448.0f, Format::fp8_e4m3), 0x7Eu);
  EXPECT_EQ(round_to(464.0f, Format::fp8_e4m3), 448.0f);  // 464 is halfway to 480 (the NaN code)
  EXPECT_TRUE(std::isnan(round_to(464.5f, Format::fp8_e4m3)));
  EXPECT_EQ(round_to(1e6f, Format::fp8_e4m3, Overflow::saturating), 448.0f);
  EXPECT_EQ(encode(-INFINITY, Format::fp8_e4m3), 0xFFu);  // no inf: NaN, sign kept
  EXPECT_EQ(encode(-INFINITY, Format::fp8_e4m3, Overflow::saturating), 0xFEu);  // -448
  EXPECT_EQ(encode(std::ldexp(1.0f, -9), Format::fp8_e4m3), 0x01u);  // min subnormal 2^-9
  EXPECT_EQ(encode(std::ldexp(1.0f, -10), Format::fp8_e4m3), 0x00u);

  EXPECT_EQ(encode(57344.0f, Format::fp8_e5m2), 0x7Bu);
  EXPECT_EQ(round_to(61440.0f, Format::fp8_e5m2), INFINITY);
  EXPECT_EQ(round_to(61439.0f, Format::fp8_e5m2), 57344.0f);
  EXPECT_EQ(encode(INFINITY, Format::fp8_e5m2), 0x7Cu);
  EXPECT_EQ(encode(-0.0f, Format::fp8_e5m2), 0x80u);

  EXPECT_EQ(encode(std::numeric_limits<float>::denorm_min(), Format::bf16), 0x0000u);
  EXPECT_EQ(encode(std::ldexp(1.0f, -133), Format::bf16), 0x0001u);  // bf16 has float32's subnormal range
  EXPECT_EQ(round_to(std::numeric_limits<float>::max(), Format::bf16), INFINITY);
}

TEST(Numerics, NaNKeepsSignAndPayload) {
  EXPECT_EQ(encode(std::bit_cast<float>(0xFFC00000u), Format::bf16), 0xFFC0u);
  EXPECT_EQ(encode(std::bit_cast<float>(0x7F800001u), Format::bf16), 0x7FC0u);  // payload only in low bits: quiet bit
  EXPECT_EQ(encode(std::bit_cast<float>(0x7FA00000u), Format::fp16), 0x7D00u);
  EXPECT_EQ(encode(NAN, Format::fp8_e4m3), 0x7Fu);
  EXPECT_EQ(encode(-NAN, Format::fp8_e5m2), 0xFEu);
  EXPECT_EQ(encode(NAN, Format::fp8_e4m3, Overflow::saturating), 0x7Fu);  // saturation never hides NaN
}

// Edge cases of every format: each value, its float32 neighbours, exact midpoints between
// consecutive values (the ties) and their neighbours, around zero, min normal and max.
TEST(Numerics, EveryValueItsNeighboursAndEveryTieAgreeWithTheOracle) {
  for (Format f : kNarrowFormats) {
    const Oracle oracle(f);
    const std::vector<double> v = oracle.finite_values();
    std::vector<float> probes = {0.0f, INFINITY, NAN, std::numeric_limits<float>::max(),
                                 std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min()};
    for (std::size_t i = 0; i < v.size(); ++i) {
      const float x = static_cast<float>(v[i]);
      probes.insert(probes.end(), {x, std::nextafter(x, 0.0f), std::nextafter(x, INFINITY)});
      const double next = i + 1 < v.size() ? v[i + 1] : 2 * v[i] - v[i - 1];  // past max: the virtual step
      const float mid = static_cast<float>((v[i] + next) / 2);                  // exact for narrow formats
      probes.insert(probes.end(), {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY)});
    }
    for (float x : probes)
      for (float signed_x : {x, -x})
        for (Overflow o : kOverflows) ASSERT_TRUE(agrees(oracle, signed_x, f, o));
  }
}

TEST(Numerics, RandomFloat32PatternsAgreeWithTheOracle) {
  std::mt19937_64 rng(20261123);
  for (Format f : kNarrowFormats) {
    const Oracle oracle(f);
    // 10^7 uniformly random bit patterns: every exponent, NaNs and infinities included.
    for (int i = 0; i < 10'000'000; ++i) {
      const float x = std::bit_cast<float>(static_cast<std::uint32_t>(rng()));
      ASSERT_TRUE(agrees(oracle, x, f, i % 2 ? Overflow::saturating : Overflow::nonsaturating));
    }
    // 10^6 values whose exponent lies in the format's range (where rounding does the real work).
    const FormatInfo& info = format_info(f);
    std::uniform_int_distribution<int> exponent(-info.bias - info.mantissa_bits - 2, info.bias + 2);
    for (int i = 0; i < 1'000'000; ++i) {
      const std::uint32_t mantissa = static_cast<std::uint32_t>(rng()) & 0x7FFFFFu;
      const float x = std::ldexp(std::bit_cast<float>(0x3F800000u | mantissa), exponent(rng));
      ASSERT_TRUE(agrees(oracle, i % 3 ? x : -x, f, i % 2 ? Overflow::saturating : Overflow::nonsaturating));
    }
  }
}

TEST(Numerics, FormatFacts) {
  const FormatInfo& fp32 = format_info(Format::fp32);
  EXPECT_EQ(fp32.max, std::numeric_limits<float>::max());
  EXPECT_EQ(fp32.min_normal, std::numeric_limits<float>::min());
  EXPECT_EQ(fp32.epsilon, std::numeric_limits<float>::epsilon());
  const FormatInfo& bf16 = format_info(Format::bf16);
  EXPECT_EQ(bf16.max, 0x1.FEp127f);
  EXPECT_EQ(bf16.min_normal, std::numeric_limits<float>::min());  // same exponent range as fp32
  EXPECT_EQ(bf16.epsilon, 0.0078125f);
  const FormatInfo& fp16 = format_info(Format::fp16);
  EXPECT_EQ(fp16.max, 65504.0f);
  EXPECT_EQ(fp16.min_normal, std::ldexp(1.0f, -14));
  EXPECT_EQ(fp16.min_subnormal, std::ldexp(1.0f, -24));
  const FormatInfo& e4m3 = format_info(Format::fp8_e4m3);
  EXPECT_EQ(e4m3.max, 448.0f);
  EXPECT_FALSE(e4m3.has_inf);
  EXPECT_EQ(e4m3.min_normal, std::ldexp(1.0f, -6));
  EXPECT_EQ(e4m3.min_subnormal, std::ldexp(1.0f, -9));
  const FormatInfo& e5m2 = format_info(Format::fp8_e5m2);
  EXPECT_EQ(e5m2.max, 57344.0f);
  EXPECT_EQ(e5m2.min_subnormal, std::ldexp(1.0f, -16));

  // The largest x with a finite exp(x): ln(max) roughly, 88.72 for fp32 and bf16, 11.09 for fp16.
  EXPECT_NEAR(fp32.max_exp_input, 88.72, 0.005);
  EXPECT_NEAR(bf16.max_exp_input, 88.72, 0.005);
  EXPECT_NEAR(fp16.max_exp_input, 11.09, 0.005);
  EXPECT_NEAR(e4m3.max_exp_input, std::log(464.0), 1e-5);  // values up to 464 still round to 448
  EXPECT_NEAR(e5m2.max_exp_input, std::log(61440.0), 1e-5);
  for (Format f : kAllFormats) {  // and it is exactly the boundary
    const float x = format_info(f).max_exp_input;
    EXPECT_TRUE(std::isfinite(round_to(std::exp(x), f))) << format_name(f);
    EXPECT_FALSE(std::isfinite(round_to(std::exp(std::nextafter(x, INFINITY)), f))) << format_name(f);
  }
}

TEST(Numerics, Ulp) {
  EXPECT_EQ(ulp(128.5f, Format::bf16), 1.0f);  // spacing 1.0 in [128, 256): 128.5 is a tie
  EXPECT_EQ(ulp(1.0f, Format::bf16), 0.0078125f);
  EXPECT_EQ(ulp(0.0f, Format::fp16), std::ldexp(1.0f, -24));
  EXPECT_EQ(ulp(1e-7f, Format::fp16), std::ldexp(1.0f, -24));  // subnormal range: constant spacing
  EXPECT_EQ(ulp(-448.0f, Format::fp8_e4m3), 32.0f);
  EXPECT_EQ(ulp(1.0f, Format::fp32), std::numeric_limits<float>::epsilon());
  EXPECT_THROW(ulp(INFINITY, Format::bf16), Error);
  // The spacing is the distance between consecutive values of the format.
  for (Format f : kNarrowFormats)
    for (float x : {0.3f, 1.0f, 3.7f, 100.0f})
      EXPECT_EQ(decode(encode(round_to(x, f), f) + 1, f) - round_to(x, f), ulp(round_to(x, f), f)) << format_name(f);
}

TEST(Numerics, Fields) {
  const Fields a = decompose(encode(128.5f, Format::bf16), Format::bf16);
  EXPECT_EQ(a.sign, 0u);
  EXPECT_EQ(a.exponent, 134u);  // 128 = 2^7, biased 7 + 127
  EXPECT_EQ(a.mantissa, 0u);
  const Fields b = decompose(encode(-1.5f, Format::fp16), Format::fp16);
  EXPECT_EQ(b.sign, 1u);
  EXPECT_EQ(b.exponent, 15u);
  EXPECT_EQ(b.mantissa, 512u);  // .1 binary in 10 bits
  EXPECT_EQ(compose(b, Format::fp16), encode(-1.5f, Format::fp16));
  EXPECT_EQ(classify(0x0001, Format::fp8_e5m2), ValueClass::subnormal);
  EXPECT_EQ(classify(0x0080, Format::fp8_e5m2), ValueClass::zero);
  EXPECT_EQ(classify(0x7E, Format::fp8_e4m3), ValueClass::normal);
  EXPECT_EQ(error_of([] { compose({0, 16, 0}, Format::fp8_e4m3); }),
            "exponent = 16: must fit the 4 exponent bits of fp8_e4m3");
  EXPECT_THROW(decode(0x100, Format::fp8_e5m2), Error);
}

TEST(Numerics, BitFlips) {
  EXPECT_EQ(flip_bit_value(1.0f, 15, Format::bf16), -1.0f);
  EXPECT_EQ(flip_bit_value(1.0f, 14, Format::bf16), INFINITY);  // 0x3F80 -> 0x7F80: the top exponent bit
  EXPECT_EQ(flip_bit_value(1.0f, 0, Format::bf16), 1.0078125f);
  EXPECT_EQ(flip_bit_value(1.0f, 6, Format::fp8_e4m3), 256.0f);  // 0x38 -> 0x78: exponent 7 -> 15
  EXPECT_EQ(flip_bit_value(1.0f, 30, Format::fp32), INFINITY);
  EXPECT_EQ(flip_bit_value(1.0f, 29, Format::fp32), std::ldexp(1.0f, -64));

  EXPECT_EQ(bit_class(15, Format::bf16), BitClass::sign);
  EXPECT_EQ(bit_class(7, Format::bf16), BitClass::exponent);
  EXPECT_EQ(bit_class(6, Format::bf16), BitClass::mantissa);
  EXPECT_EQ(bit_class(2, Format::fp8_e5m2), BitClass::exponent);
  EXPECT_EQ(bit_class(22, Format::fp32), BitClass::mantissa);

  for (Format f : kNarrowFormats) {
    const int width = spec(f).bits;
    for (std::uint32_t code = 0; code < (1u << width); code += 7)
      for (int bit = 0; bit < width; ++bit) {
        const std::uint32_t flipped = flip_bit(code, bit, f);
        EXPECT_EQ(std::popcount(flipped ^ code), 1);
        EXPECT_EQ(flip_bit(flipped, bit, f), code);
      }
  }
  EXPECT_EQ(error_of([] { flip_bit(0, 16, Format::bf16); }), "bit = 16: must be in [0, 16) for bf16");
  EXPECT_THROW(flip_bit(0, -1, Format::fp8_e4m3), Error);
  EXPECT_THROW(flip_bit(0x100, 0, Format::fp8_e4m3), Error);
}

TEST(Numerics, ParseFormat) {
  EXPECT_EQ(parse_format("bf16"), Format::bf16);
  EXPECT_EQ(parse_format("e4m3"), Format::fp8_e4m3);
  EXPECT_EQ(parse_format("fp8"), Format::fp8_e4m3);
  EXPECT_EQ(parse_format("fp8_e5m2"), Format::fp8_e5m2);
  for (Format f : kAllFormats) EXPECT_EQ(parse_format(format_name(f)), f);
  EXPECT_EQ(error_of([] { parse_format("fp12", "--dtype"); }),
            "--dtype = \"fp12\": must be one of fp32, bf16, fp16, fp8_e4m3, fp8_e5m2");
}

TEST(Numerics, ParseFloat32List) {
  const std::vector<float> v = parse_float32_list(" 128.5, +1,-0 ,1e-45,inf,-inf", "--logits");
  ASSERT_EQ(v.size(), 6u);
  EXPECT_EQ(v[0], 128.5f);
  EXPECT_EQ(v[1], 1.0f);
  EXPECT_TRUE(v[2] == 0.0f && std::signbit(v[2]));
  EXPECT_EQ(v[3], std::numeric_limits<float>::denorm_min());
  EXPECT_EQ(v[4], INFINITY);
  EXPECT_EQ(v[5], -INFINITY);
  EXPECT_TRUE(std::isnan(parse_float32_list("nan", "x")[0]));
  EXPECT_EQ(error_of([] { parse_float32_list("1,x", "--logits"); }),
            "--logits = \"1,x\": item 2 (\"x\") is not a float32 number");
  EXPECT_EQ(error_of([] { parse_float32_list("1,,2", "--logits"); }),
            "--logits = \"1,,2\": item 2 is empty; give numbers separated by commas");
  EXPECT_EQ(error_of([] { parse_float32_list("1e39", "--value"); }),
            "--value = \"1e39\": item 1 (\"1e39\") is not a float32 number");
}

}  // namespace
}  // namespace moelab
