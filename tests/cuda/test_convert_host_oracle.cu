// moelab/tests/cuda/test_convert_host_oracle.cu — NVIDIA's conversions as an independent oracle
// for moelab::encode, run on the CPU (no GPU needed).
//
// cuda_bf16.h, cuda_fp16.h and cuda_fp8.h define __float2bfloat16_rn, __float2half_rn and
// __nv_cvt_float_to_fp8 for __host__ as well as __device__: plain C++ written by NVIDIA, with no
// code in common with reference/numerics.cpp. Both must agree bit for bit on
//   - every edge case: +-0, float subnormals, each format's min subnormal / min normal / max,
//     the ties just below the min subnormal and just above max, +-inf, NaNs;
//   - every value of each format, its float neighbours (nextafter up and down), and the midpoint
//     between it and the next value with *its* neighbours (where round-to-nearest-even decides);
//   - 10^7 random float32 bit patterns and 10^6 random floats whose exponent lies within the
//     format's range, per format and overflow mode (seeded std::mt19937_64).
// For a NaN input only NaN-ness is compared: CUDA returns one canonical NaN, the reference keeps
// the input's sign and payload (numerics.h).
// Overflow modes: fp8 nonsaturating = __NV_NOSAT, saturating = __NV_SATFINITE. CUDA has no
// saturating bf16/fp16 conversion; the expectation there is CUDA's IEEE result with +-inf replaced
// by +-max, which is the reference's rule (and not how the kernels do it: they clamp first).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "reference/numerics.h"

namespace moelab {
namespace {

// The formats as this test knows them: independent of the reference's format_info().
struct Layout {
  Format format;
  const char* name;
  int width;                  // bits
  int mantissa_bits;          // stored fraction bits
  int bias;
  std::uint32_t max_bits;     // largest finite value
  std::uint32_t sign_bit;
};
constexpr Layout kLayouts[] = {
    {Format::bf16, "bf16", 16, 7, 127, 0x7F7F, 0x8000},
    {Format::fp16, "fp16", 16, 10, 15, 0x7BFF, 0x8000},
    {Format::fp8_e4m3, "fp8_e4m3", 8, 3, 7, 0x7E, 0x80},  // OCP FP8 v1.0: max S.1111.110 = 448
    {Format::fp8_e5m2, "fp8_e5m2", 8, 2, 15, 0x7B, 0x80},  // max S.11110.11 = 57344
};

const Layout& layout(Format f) {
  for (const Layout& l : kLayouts)
    if (l.format == f) return l;
  throw std::logic_error("no layout");
}

bool is_nan_bits(std::uint32_t b, Format f) {
  switch (f) {
    case Format::bf16: return (b & 0x7FFF) > 0x7F80;
    case Format::fp16: return (b & 0x7FFF) > 0x7C00;
    case Format::fp8_e4m3: return (b & 0x7F) == 0x7F;  // E4M3FN: S.1111.111 is the only NaN
    case Format::fp8_e5m2: return (b & 0x7F) > 0x7C;
    case Format::fp32: break;
  }
  return false;
}

bool is_inf_bits(std::uint32_t b, Format f) {
  switch (f) {
    case Format::bf16: return (b & 0x7FFF) == 0x7F80;
    case Format::fp16: return (b & 0x7FFF) == 0x7C00;
    case Format::fp8_e5m2: return (b & 0x7F) == 0x7C;
    case Format::fp8_e4m3: case Format::fp32: break;  // E4M3FN has no infinities
  }
  return false;
}

// CUDA's host conversion of x to f.
std::uint32_t cuda_encode(float x, Format f, Overflow overflow) {
  const bool saturate = overflow == Overflow::saturating;
  std::uint32_t b = 0;
  switch (f) {
    case Format::bf16: b = __bfloat16_as_ushort(__float2bfloat16_rn(x)); break;
    case Format::fp16: b = __half_as_ushort(__float2half_rn(x)); break;
    case Format::fp8_e4m3:
      return __nv_cvt_float_to_fp8(x, saturate ? __NV_SATFINITE : __NV_NOSAT, __NV_E4M3);
    case Format::fp8_e5m2:
      return __nv_cvt_float_to_fp8(x, saturate ? __NV_SATFINITE : __NV_NOSAT, __NV_E5M2);
    case Format::fp32: throw std::logic_error("fp32 is not converted");
  }
  if (saturate && is_inf_bits(b, f)) b = (b & layout(f).sign_bit) | layout(f).max_bits;
  return b;
}

// The value of bit pattern b of f, by CUDA's conversions (fp8 -> half is exact, half -> float too).
float cuda_decode(std::uint32_t b, Format f) {
  switch (f) {
    case Format::bf16:
      return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(b)));
    case Format::fp16:
      return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
    case Format::fp8_e4m3:
    case Format::fp8_e5m2: {
      const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(b),
                                                   f == Format::fp8_e4m3 ? __NV_E4M3 : __NV_E5M2);
      return __half2float(__half(h));
    }
    case Format::fp32: break;
  }
  throw std::logic_error("fp32 is not decoded");
}

std::uint32_t bits_of(float x) { return std::bit_cast<std::uint32_t>(x); }
float float_of(std::uint32_t b) { return std::bit_cast<float>(b); }
float up(float x) { return std::nextafter(x, std::numeric_limits<float>::infinity()); }
float down(float x) { return std::nextafter(x, -std::numeric_limits<float>::infinity()); }
// (a + b) / 2, exact: it needs one bit more than the format has, which float32 has to spare.
float midpoint(float a, float b) {
  return static_cast<float>((static_cast<double>(a) + static_cast<double>(b)) / 2.0);
}

// Compares the reference with CUDA on many inputs; keeps the first mismatches for the report.
class Comparison {
 public:
  Comparison(Format f, Overflow overflow) : format_(f), overflow_(overflow) {}

  void check(float x) {
    ++checked_;
    const std::uint32_t ref = encode(x, format_, overflow_);
    const std::uint32_t cuda = cuda_encode(x, format_, overflow_);
    const bool same = std::isnan(x) ? is_nan_bits(ref, format_) && is_nan_bits(cuda, format_)
                                    : ref == cuda;
    if (same) return;
    if (mismatches_ < kKept) {
      char line[160];
      std::snprintf(line, sizeof line, "  x = 0x%08x (%.9g): reference 0x%0*x, CUDA 0x%0*x\n",
                    bits_of(x), static_cast<double>(x), layout(format_).width / 4, ref,
                    layout(format_).width / 4, cuda);
      report_ += line;
    }
    ++mismatches_;
  }
  void check_with_neighbours(float x) {
    check(x);
    check(up(x));
    check(down(x));
  }

  std::size_t checked() const { return checked_; }
  std::size_t mismatches() const { return mismatches_; }
  std::string report() const {
    return std::to_string(mismatches_) + " of " + std::to_string(checked_) + " inputs differ (" +
           layout(format_).name + ", " +
           (overflow_ == Overflow::saturating ? "saturating" : "nonsaturating") +
           "); the first:\n" + report_;
  }

 private:
  static constexpr std::size_t kKept = 20;
  Format format_;
  Overflow overflow_;
  std::size_t checked_ = 0;
  std::size_t mismatches_ = 0;
  std::string report_;
};

struct OracleCase {
  Format format;
  Overflow overflow;
};

std::string case_name(const testing::TestParamInfo<OracleCase>& info) {
  return std::string(layout(info.param.format).name) +
         (info.param.overflow == Overflow::saturating ? "_saturating" : "_nonsaturating");
}
// How gtest (and so ctest's test names) print a case.
void PrintTo(const OracleCase& c, std::ostream* os) {
  *os << layout(c.format).name << " "
      << (c.overflow == Overflow::saturating ? "saturating" : "nonsaturating");
}

class CudaHostOracle : public testing::TestWithParam<OracleCase> {
 protected:
  const Layout& fmt() const { return layout(GetParam().format); }
  Comparison comparison() const { return Comparison(GetParam().format, GetParam().overflow); }
  // An explicit seed per case, so a failure reproduces.
  std::uint64_t seed() const {
    return 0x6d6f656c6162ull + 16 * static_cast<std::uint64_t>(GetParam().format) +
           static_cast<std::uint64_t>(GetParam().overflow);
  }
};

// First, that the oracle is what this test thinks it is: a few values every student can check.
TEST(CudaHostOracleSelfCheck, KnownConversions) {
  EXPECT_EQ(cuda_encode(1.0f, Format::bf16, Overflow::nonsaturating), 0x3F80u);
  EXPECT_EQ(cuda_encode(1.0f, Format::fp16, Overflow::nonsaturating), 0x3C00u);
  EXPECT_EQ(cuda_encode(1.0f, Format::fp8_e4m3, Overflow::nonsaturating), 0x38u);
  EXPECT_EQ(cuda_encode(1.0f, Format::fp8_e5m2, Overflow::nonsaturating), 0x3Cu);
  EXPECT_EQ(cuda_encode(448.0f, Format::fp8_e4m3, Overflow::nonsaturating), 0x7Eu);
  EXPECT_EQ(cuda_encode(-57344.0f, Format::fp8_e5m2, Overflow::nonsaturating), 0xFBu);
  // 65520 is the tie between 65504 (odd mantissa) and 65536 (even): it rounds up, to inf.
  EXPECT_EQ(cuda_encode(65520.0f, Format::fp16, Overflow::nonsaturating), 0x7C00u);
  EXPECT_EQ(cuda_encode(65520.0f, Format::fp16, Overflow::saturating), 0x7BFFu);
  for (const Layout& l : kLayouts) {
    EXPECT_EQ(cuda_decode(l.max_bits, l.format),
              l.format == Format::bf16   ? 0x1.fep127f
              : l.format == Format::fp16 ? 65504.0f
              : l.format == Format::fp8_e4m3 ? 448.0f
                                             : 57344.0f)
        << l.name;
  }
}

TEST_P(CudaHostOracle, EdgeCases) {
  const Layout& l = fmt();
  const Format f = l.format;
  Comparison c = comparison();
  const float inf = std::numeric_limits<float>::infinity();
  const float max = cuda_decode(l.max_bits, f);
  const float below_max = cuda_decode(l.max_bits - 1, f);
  const float ulp_at_max = max - below_max;
  const float min_subnormal = cuda_decode(1, f);
  const float min_normal = cuda_decode(1u << l.mantissa_bits, f);
  ASSERT_EQ(min_subnormal, std::ldexp(1.0f, 1 - l.bias - l.mantissa_bits)) << l.name;
  ASSERT_EQ(min_normal, std::ldexp(1.0f, 1 - l.bias)) << l.name;

  std::vector<float> xs = {
      0.0f, 1.0f, 1.5f, 3.0f, 1.0f / 3.0f, 0.1f, 100.0f, 1e30f,
      float_of(0x00000001),  // float's min subnormal
      float_of(0x007FFFFF),  // float's max subnormal
      float_of(0x00800000),  // float's min normal
      float_of(0x7F7FFFFF),  // float's max
      inf,
      max, below_max, min_subnormal, min_normal, cuda_decode((1u << l.mantissa_bits) - 1, f),
      min_subnormal / 2,          // tie between 0 and min subnormal: -> 0 (even)
      3 * min_subnormal / 2,      // tie between 1 and 2 min subnormals: -> 2 (even)
      max + ulp_at_max / 2,       // tie between max and the next binade: overflow or not
      max + ulp_at_max,           // the value one past max
      2 * max,
  };
  for (const float x : std::vector<float>(xs)) xs.push_back(-x);
  for (const float x : xs) c.check_with_neighbours(x);

  const std::uint32_t nans[] = {0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF,
                                0xFFFFFFFF, 0x7FA00000, 0x7F802000, 0x7FE00000};
  for (const std::uint32_t b : nans) c.check(float_of(b));

  EXPECT_EQ(c.mismatches(), 0u) << c.report();
  EXPECT_GT(c.checked(), 100u);
}

TEST_P(CudaHostOracle, EveryValueNeighboursAndMidpoints) {
  const Layout& l = fmt();
  const Format f = l.format;
  Comparison c = comparison();
  for (std::uint32_t sign : {0u, l.sign_bit}) {
    // Magnitudes 0 .. max in increasing order; then the specials above max (inf, NaNs).
    for (std::uint32_t m = 0; m < l.sign_bit; ++m) {
      const float v = cuda_decode(sign | m, f);
      c.check_with_neighbours(v);
      if (m < l.max_bits) {
        c.check_with_neighbours(midpoint(v, cuda_decode(sign | (m + 1), f)));
      } else if (m == l.max_bits) {
        // The tie just above max, between max and where the next value would be.
        const float ulp = v - cuda_decode(sign | (m - 1), f);
        c.check_with_neighbours(v + ulp / 2);
      }
    }
  }
  EXPECT_EQ(c.mismatches(), 0u) << c.report();
  // Per sign: every pattern, every midpoint below max, the tie above max; 3 inputs each.
  EXPECT_EQ(c.checked(), 2 * 3 * (std::size_t{l.sign_bit} + l.max_bits + 1));
}

TEST_P(CudaHostOracle, RandomBitPatterns) {
  Comparison c = comparison();
  std::mt19937_64 rng(seed());
  for (int i = 0; i < 10'000'000; ++i) c.check(float_of(static_cast<std::uint32_t>(rng())));
  EXPECT_EQ(c.mismatches(), 0u) << c.report() << "seed " << seed();
  EXPECT_EQ(c.checked(), 10'000'000u);
}

TEST_P(CudaHostOracle, RandomValuesInFormatRange) {
  const Layout& l = fmt();
  Comparison c = comparison();
  std::mt19937_64 rng(seed() + 1);
  // Exponents from two below the min subnormal's to one above max's: underflow, subnormals,
  // normals and overflow all occur. Mantissa: 23 random bits. Below float's normal range the
  // value becomes a float subnormal (rounded by the cast from double), still a valid input.
  const int lowest = 1 - l.bias - l.mantissa_bits - 2;
  const int highest = std::ilogb(cuda_decode(l.max_bits, l.format)) + 1;
  std::uniform_int_distribution<int> exponent(lowest, highest);
  for (int i = 0; i < 1'000'000; ++i) {
    const std::uint64_t r = rng();
    const double significand = 1.0 + static_cast<double>(r & 0x7FFFFF) / 0x800000;
    const double value = std::ldexp(significand, exponent(rng));
    c.check(static_cast<float>((r >> 32 & 1) ? -value : value));
  }
  EXPECT_EQ(c.mismatches(), 0u) << c.report() << "seed " << seed() + 1;
  EXPECT_EQ(c.checked(), 1'000'000u);
}

INSTANTIATE_TEST_SUITE_P(
    Formats, CudaHostOracle,
    testing::Values(OracleCase{Format::bf16, Overflow::nonsaturating},
                    OracleCase{Format::bf16, Overflow::saturating},
                    OracleCase{Format::fp16, Overflow::nonsaturating},
                    OracleCase{Format::fp16, Overflow::saturating},
                    OracleCase{Format::fp8_e4m3, Overflow::nonsaturating},
                    OracleCase{Format::fp8_e4m3, Overflow::saturating},
                    OracleCase{Format::fp8_e5m2, Overflow::nonsaturating},
                    OracleCase{Format::fp8_e5m2, Overflow::saturating}),
    case_name);

}  // namespace
}  // namespace moelab
