// moelab/reference/random.h — explicit, portable randomness.
//
// The same seed gives the same bits on every platform and compiler: the generators are written
// out here rather than taken from <random>, whose distributions (std::normal_distribution, ...)
// are implementation-defined. Nothing in moelab draws from a hidden global generator.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>

namespace moelab {

// SplitMix64's output function (Steele, Lea & Flood 2014): a bijective 64-bit mixer. Also the
// hash of hash routing (hash64(token_id ^ seed)).
constexpr std::uint64_t hash64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}

  // SplitMix64: the state advances by the golden-ratio constant and is mixed.
  std::uint64_t next_u64() {
    const std::uint64_t out = hash64(state_);
    state_ += 0x9E3779B97F4A7C15ull;
    return out;
  }
  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }
  // Uniform in [lo, hi).
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  // Standard normal by Box-Muller, one value per two uniforms (no cached second value, so the
  // n-th draw depends only on the seed and n). 1 - u keeps the log's argument in (0, 1].
  double normal() {
    const double u1 = 1.0 - uniform();
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
  }

 private:
  std::uint64_t state_;
};

}  // namespace moelab
