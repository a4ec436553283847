// moelab/tests/cuda/test_convert_device.cpp — every kernel version of cuda/convert.cu against the
// reference moelab::encode, bit for bit.
//
// Each version x format x overflow mode converts fresh random inputs (seeded) of several sizes:
// 0, 1, 3 (only the tail path of the vectorised kernels), 4..31 (vectors plus tails), 64, and
// 1000003 (many blocks plus a tail). Inputs mix values across each format's range, random bit
// patterns, and the edge cases (ties, +-max, +-inf, NaN). For a NaN input only NaN-ness is
// compared (cuda/convert.h). Without a GPU these tests skip, except the argument checks, which
// must throw before the device is touched.
#include "cuda/convert.h"

#include <gtest/gtest.h>

#include "tests/cuda/device_testing.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "reference/error.h"
#include "reference/numerics.h"

namespace moelab::cuda {
namespace {

bool is_nan_bits(std::uint32_t b, Format f) {
  return classify(b, f) == ValueClass::nan;
}

// Inputs for format f: random values, a quarter of them random bit patterns and the rest with
// exponents across f's range and a little beyond; from 64 elements on, the edge cases at the
// start (the vectorised path) and, reversed, at the end (the tail path).
std::vector<float> make_inputs(std::size_t n, Format f, std::uint64_t seed) {
  const FormatInfo& info = format_info(f);
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float ulp_at_max = ulp(info.max, f);
  std::vector<float> edges = {
      1.0f, 0.0f, -0.0f, info.max, -info.max, info.max + ulp_at_max / 2,
      -(info.max + ulp_at_max / 2), std::nextafter(info.max + ulp_at_max / 2, 0.0f), inf, -inf,
      nan, -nan, std::bit_cast<float>(0x7F800001u), info.min_subnormal, -info.min_subnormal,
      info.min_subnormal / 2, 3 * info.min_subnormal / 2, info.min_normal, -info.min_normal,
      1.0f + info.epsilon / 2, 1.0f + 3 * info.epsilon / 2, std::bit_cast<float>(0x00000001u),
      std::bit_cast<float>(0x7F7FFFFFu), 2 * info.max, 1e-30f};
  std::vector<float> xs;
  xs.reserve(n);
  std::mt19937_64 rng(seed);
  const int lowest = std::ilogb(info.min_subnormal) - 2;
  const int highest = std::ilogb(info.max) + 2;
  std::uniform_int_distribution<int> exponent(lowest, highest);
  while (xs.size() < n) {
    const std::uint64_t r = rng();
    if ((r & 3) == 0) {
      xs.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(r >> 32)));
    } else {
      const double significand = 1.0 + static_cast<double>((r >> 8) & 0x7FFFFF) / 0x800000;
      const double value = std::ldexp(significand, exponent(rng));
      xs.push_back(static_cast<float>((r & 4) ? -value : value));
    }
  }
  if (n >= 64) {
    std::copy(edges.begin(), edges.end(), xs.begin());
    std::copy(edges.rbegin(), edges.rend(), xs.end() - static_cast<std::ptrdiff_t>(edges.size()));
  }
  return xs;
}

struct DeviceCase {
  int version;
  Format format;
  Overflow overflow;
};

std::string case_name(const testing::TestParamInfo<DeviceCase>& info) {
  return "v" + std::to_string(info.param.version) + "_" +
         std::string(format_name(info.param.format)) +
         (info.param.overflow == Overflow::saturating ? "_saturating" : "_nonsaturating");
}
// How gtest (and so ctest's test names) print a case.
void PrintTo(const DeviceCase& c, std::ostream* os) {
  *os << "v" << c.version << " " << format_name(c.format) << " "
      << (c.overflow == Overflow::saturating ? "saturating" : "nonsaturating");
}

std::vector<DeviceCase> all_cases() {
  std::vector<DeviceCase> cases;
  for (int v = 1; v <= kConvertVersions; ++v)
    for (Format f : {Format::bf16, Format::fp16, Format::fp8_e4m3, Format::fp8_e5m2})
      for (Overflow o : {Overflow::nonsaturating, Overflow::saturating}) cases.push_back({v, f, o});
  return cases;
}

class CudaConvert : public testing::TestWithParam<DeviceCase> {};

TEST_P(CudaConvert, MatchesReferenceBitForBit) {
  SKIP_WITHOUT_DEVICE();
  const auto [version, f, overflow] = GetParam();
  std::uint64_t seed = 1000 * static_cast<std::uint64_t>(version) +
                       10 * static_cast<std::uint64_t>(f) + static_cast<std::uint64_t>(overflow);
  constexpr std::size_t kSizes[] = {0, 1, 3, 4, 5, 7, 9, 31, 64, 1000003};
  for (const std::size_t n : kSizes) {
    SCOPED_TRACE("n = " + std::to_string(n) + ", seed = " + std::to_string(seed));
    const std::vector<float> xs = make_inputs(n, f, seed++);
    const std::vector<std::uint16_t> out = convert(xs, f, overflow, version);
    ASSERT_EQ(out.size(), n);
    std::size_t mismatches = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint32_t ref = encode(xs[i], f, overflow);
      const bool same = std::isnan(xs[i]) ? is_nan_bits(out[i], f) : out[i] == ref;
      if (!same && ++mismatches <= 10) {
        ADD_FAILURE() << "i = " << i << ", x = " << xs[i] << " (bits 0x" << std::hex
                      << std::bit_cast<std::uint32_t>(xs[i]) << "): device 0x" << out[i]
                      << ", reference 0x" << ref << std::dec;
      }
    }
    EXPECT_EQ(mismatches, 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(AllVersions, CudaConvert, testing::ValuesIn(all_cases()), case_name);

// The argument checks come before any CUDA call, so these run (and pass) without a GPU.
TEST(CudaConvertArguments, RejectsFp32) {
  const std::vector<float> xs = {1.0f, 2.0f};
  expect_error_naming([&] { convert(xs, Format::fp32, Overflow::nonsaturating, 1); }, "format");
  expect_error_naming([&] { convert(xs, Format::fp32, Overflow::nonsaturating, 1); }, "fp32");
}

TEST(CudaConvertArguments, RejectsVersionOutOfRange) {
  const std::vector<float> xs = {1.0f, 2.0f};
  expect_error_naming([&] { convert(xs, Format::bf16, Overflow::nonsaturating, 0); },
                      "version = 0");
  expect_error_naming(
      [&] { convert(xs, Format::bf16, Overflow::nonsaturating, kConvertVersions + 1); },
      "version = " + std::to_string(kConvertVersions + 1));
  expect_error_naming([&] { convert(xs, Format::fp8_e4m3, Overflow::saturating, -1); }, "version");
}

TEST(CudaConvertArguments, LaunchRejectsBadBlockSizeAndNullPointers) {
  expect_error_naming(
      [] { launch_convert(nullptr, nullptr, 8, Format::bf16, Overflow::nonsaturating, 1, 100); },
      "block_size = 100");
  expect_error_naming(
      [] { launch_convert(nullptr, nullptr, 8, Format::bf16, Overflow::nonsaturating, 1); },
      "in = null");
}

TEST(CudaConvertArguments, DeviceBytes) {
  EXPECT_EQ(device_bytes(Format::bf16), 2);
  EXPECT_EQ(device_bytes(Format::fp16), 2);
  EXPECT_EQ(device_bytes(Format::fp8_e4m3), 1);
  EXPECT_EQ(device_bytes(Format::fp8_e5m2), 1);
  expect_error_naming([] { device_bytes(Format::fp32); }, "format");
}

TEST(CudaConvertArguments, EmptyInputNeedsNoDevice) {
  EXPECT_TRUE(convert({}, Format::bf16, Overflow::nonsaturating, 1).empty());
}

// device_status() says either what it found or why nothing is usable.
TEST(CudaDeviceStatus, ReportsDeviceOrReason) {
  const DeviceStatus s = device_status();
  if (s.available) {
    EXPECT_TRUE(s.reason.empty()) << s.reason;
    EXPECT_FALSE(s.name.empty());
    EXPECT_GE(s.sm, 80) << s.name;  // the build targets sm_80 and sm_90a
  } else {
    EXPECT_EQ(s.reason.rfind("no CUDA device: ", 0), 0u) << s.reason;
    EXPECT_GT(s.reason.size(), std::string("no CUDA device: ").size()) << s.reason;
  }
}

// Without a GPU, convert() reports the CUDA error as a moelab::Error instead of crashing.
TEST(CudaDeviceStatus, ConvertWithoutDeviceThrowsError) {
  if (device_status().available) GTEST_SKIP() << "a CUDA device is present";
  const std::vector<float> xs = {1.0f};
  EXPECT_THROW(convert(xs, Format::bf16, Overflow::nonsaturating, 1), Error);
}

}  // namespace
}  // namespace moelab::cuda
