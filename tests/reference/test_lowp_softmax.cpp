// Tests of softmax_in_format: naive vs stable softmax with every step rounded to a format.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "reference/error.h"
#include "reference/numerics.h"
#include "tests/testing.h"

namespace moelab {
namespace {

std::vector<double> softmax_double(const std::vector<float>& x) {
  double m = -INFINITY, sum = 0;
  for (float v : x) m = std::max(m, static_cast<double>(v));
  std::vector<double> p;
  for (float v : x) p.push_back(std::exp(v - m)), sum += p.back();
  for (double& v : p) v /= sum;
  return p;
}

// The lecture example: a router logit of 128.5 next to 1.0.
TEST(LowpSoftmax, NaiveOverflowsStableDoesNot) {
  const std::vector<float> logits = {128.5f, 1.0f};
  for (Format f : {Format::bf16, Format::fp32}) {
    const LowpSoftmax naive = softmax_in_format(logits, f, SoftmaxMethod::naive);
    EXPECT_EQ(naive.exps[0], INFINITY) << format_name(f);  // exp(128) > max of fp32 and bf16
    EXPECT_EQ(naive.sum, INFINITY);
    EXPECT_TRUE(std::isnan(naive.probs[0]));  // inf / inf
    EXPECT_EQ(naive.probs[1], 0.0f);          // e / inf
    EXPECT_EQ(naive.overflow_count, 1);
    EXPECT_EQ(naive.nan_count, 1);
    EXPECT_TRUE(naive.overflowed());

    const LowpSoftmax stable = softmax_in_format(logits, f, SoftmaxMethod::stable);
    EXPECT_EQ(stable.probs[0], 1.0f) << format_name(f);
    EXPECT_GE(stable.probs[1], 0.0f);
    EXPECT_LT(stable.probs[1], 1e-30f);  // exp(-127) underflows to 0 in both formats
    EXPECT_FALSE(stable.overflowed());
  }
  EXPECT_EQ(softmax_in_format(logits, Format::bf16, SoftmaxMethod::naive).logits[0], 128.0f);  // rounded first
  EXPECT_EQ(softmax_in_format(logits, Format::fp32, SoftmaxMethod::naive).logits[0], 128.5f);
}

TEST(LowpSoftmax, OverflowThresholdsFollowTheFormat) {
  // fp16: exp(11) = 59874 fits under 65504, exp(12) = 162755 does not.
  EXPECT_FALSE(softmax_in_format(std::vector<float>{11.0f, 0.0f}, Format::fp16, SoftmaxMethod::naive).overflowed());
  EXPECT_EQ(softmax_in_format(std::vector<float>{12.0f, 0.0f}, Format::fp16, SoftmaxMethod::naive).overflow_count, 1);
  // fp8 e4m3 has no inf: exp(7) = 1097 > 448 becomes NaN, counted as an overflow.
  const LowpSoftmax e4m3 = softmax_in_format(std::vector<float>{7.0f, 0.0f}, Format::fp8_e4m3, SoftmaxMethod::naive);
  EXPECT_TRUE(std::isnan(e4m3.exps[0]));
  EXPECT_EQ(e4m3.overflow_count, 1);
  EXPECT_EQ(e4m3.nan_count, 2);  // NaN sum poisons every probability
  EXPECT_FALSE(softmax_in_format(std::vector<float>{7.0f, 0.0f}, Format::fp8_e4m3, SoftmaxMethod::stable).overflowed());
}

// bf16, stable, logits [1, 2, 3], worked by hand (spacing 2^(e-7) in [2^e, 2^(e+1))):
//   d = [-2, -1, 0]
//   exp(-2) = 0.135335 -> 139 * 2^-10 = 0.1357421875 ; exp(-1) = 0.367879 -> 188 * 2^-9 = 0.3671875
//   sum: 0.1357421875 + 0.3671875 = 0.5029296875 -> 128.75 * 2^-8 rounds to 129 * 2^-8 = 0.50390625
//        0.50390625 + 1 = 1.50390625 = 192.5 * 2^-7: a tie, to even 192 * 2^-7 = 1.5
//   p = [0.0904948 -> 185 * 2^-11, 0.2447917 -> 251 * 2^-10, 0.6666667 -> 171 * 2^-8]
TEST(LowpSoftmax, HandWorkedBf16) {
  const LowpSoftmax r = softmax_in_format(std::vector<float>{1.0f, 2.0f, 3.0f}, Format::bf16, SoftmaxMethod::stable);
  EXPECT_EQ(r.exps, (std::vector<float>{0.1357421875f, 0.3671875f, 1.0f}));
  EXPECT_EQ(r.sum, 1.5f);
  EXPECT_EQ(r.probs, (std::vector<float>{0.09033203125f, 0.2451171875f, 0.66796875f}));
  // In fp32 the same computation is the textbook [0.0900306, 0.2447285, 0.6652410].
  const LowpSoftmax f = softmax_in_format(std::vector<float>{1.0f, 2.0f, 3.0f}, Format::fp32, SoftmaxMethod::stable);
  EXPECT_NEAR(f.probs[0], 0.0900306, 1e-7);
  EXPECT_NEAR(f.probs[1], 0.2447285, 1e-7);
  EXPECT_NEAR(f.probs[2], 0.6652410, 1e-7);
}

// Random logits: the stable result is within a few format epsilons of the exact softmax.
TEST(LowpSoftmax, StableIsAccurateToTheFormat) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (Format f : {Format::fp32, Format::bf16, Format::fp16}) {
    const double eps = format_info(f).epsilon;
    for (int trial = 0; trial < 200; ++trial) {
      std::vector<float> x(8);
      for (float& v : x) v = round_to(normal(rng), f);
      const LowpSoftmax r = softmax_in_format(x, f, SoftmaxMethod::stable);
      const std::vector<double> want = softmax_double(x);
      for (std::size_t i = 0; i < x.size(); ++i)  // error from rounding exp, the 8 additions and the division
        EXPECT_NEAR(r.probs[i], want[i], 12 * eps * want[i] + format_info(f).min_subnormal * 4) << format_name(f);
    }
  }
}

TEST(LowpSoftmax, RejectsAnEmptyList) {
  EXPECT_EQ(moelab::testing::error_of([] { softmax_in_format(std::vector<float>{}, Format::bf16, SoftmaxMethod::stable); }),
            "logits.size = 0: softmax needs at least one logit");
}

}  // namespace
}  // namespace moelab
