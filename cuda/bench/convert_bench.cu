// moelab/cuda/bench/convert_bench.cu — validate, then time, every version of cuda/convert.cu.
//
// What it shows. The float32 -> bf16 / fp16 / fp8 conversion kernels (cuda/convert.cu) side by
// side: first each version is checked bit for bit against the reference moelab::encode on fresh
// random inputs plus edge cases (for NaN inputs, NaN-ness only); then each is timed and its
// effective bandwidth printed, bytes read + bytes written per second. The kernel is memory bound,
// so the number to compare it with is the GPU's peak memory bandwidth, printed too where the
// driver reports it.
//
// How it measures. Warm-up launches, then --iterations launches, each between its own pair of
// CUDA events; the median is reported (robust to the odd slow launch). One pass reads and writes
// far more than the L2 cache holds (64M elements by default = 256 MB in + 64-128 MB out; H100's
// L2 is 50 MB), and where --size is smaller, several buffer pairs are rotated so that together
// they exceed twice the L2: every launch streams from DRAM, as in a real model.
//
// Usage: moelab_convert_bench [--iterations=N] [--size=ELEMENTS] [--block-size=B] [--seed=S]
//   defaults: 100 iterations, 2^26 (64M) elements, 256 threads per block, seed 42
//   --iterations=0   validate only (ctest runs it so: CudaConvertBench.validate)
// Exit status: 0 all versions passed, 1 a version failed, 2 bad arguments, 77 no CUDA device
// (the ctest "skipped" code).
#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cuda/convert.h"
#include "reference/error.h"
#include "reference/numerics.h"

namespace {

using moelab::Format;
using moelab::Overflow;
namespace mc = moelab::cuda;

constexpr Format kFormats[] = {Format::bf16, Format::fp16, Format::fp8_e4m3, Format::fp8_e5m2};
constexpr Overflow kOverflows[] = {Overflow::nonsaturating, Overflow::saturating};

struct Options {
  int iterations = 100;
  std::size_t size = std::size_t{1} << 26;  // elements timed: 64M
  int block_size = 256;
  std::uint64_t seed = 42;
};

void usage() {
  std::fprintf(stderr,
               "usage: moelab_convert_bench [--iterations=N] [--size=ELEMENTS] [--block-size=B] "
               "[--seed=S]\n  --iterations=0 validates only\n");
}

// Parses --name=value arguments; false (after printing why) on anything else.
bool parse(int argc, char** argv, Options& opt) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const std::size_t eq = arg.find('=');
    const std::string name = arg.substr(0, eq);
    const std::string value = eq == std::string::npos ? "" : arg.substr(eq + 1);
    char* end = nullptr;
    const unsigned long long v = std::strtoull(value.c_str(), &end, 10);
    const bool numeric = !value.empty() && *end == '\0' && value[0] != '-';
    if (name == "--help" || name == "-h") {
      usage();
      return false;
    }
    if (!numeric) {
      std::fprintf(stderr, "%s: expected --name=<non-negative integer>\n", arg.c_str());
      usage();
      return false;
    }
    if (name == "--iterations" && v <= 1'000'000) {
      opt.iterations = static_cast<int>(v);
    } else if (name == "--size" && v >= 1 && v <= (1ull << 32)) {
      opt.size = static_cast<std::size_t>(v);
    } else if (name == "--block-size" && v >= 32 && v <= 1024 && v % 32 == 0) {
      opt.block_size = static_cast<int>(v);
    } else if (name == "--seed") {
      opt.seed = v;
    } else {
      std::fprintf(stderr, "%s: unknown option or value out of range\n", arg.c_str());
      usage();
      return false;
    }
  }
  return true;
}

// Exits with a message on a failed CUDA call (the bench has nothing to recover).
void check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  std::fprintf(stderr, "%s: %s (%s)\n", what, cudaGetErrorString(err), cudaGetErrorName(err));
  std::exit(1);
}

// Device memory, freed with its owner.
struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(std::size_t bytes) { check(cudaMalloc(&ptr, bytes), "cudaMalloc"); }
  DeviceBuffer(DeviceBuffer&& other) noexcept : ptr(std::exchange(other.ptr, nullptr)) {}
  DeviceBuffer& operator=(DeviceBuffer&&) = delete;
  ~DeviceBuffer() { cudaFree(ptr); }
};

// Random inputs for format f, never all zeros: three quarters with exponents across f's range and
// a little beyond (underflow, subnormals, normals, overflow), a quarter random bit patterns (NaNs,
// infinities, huge and tiny values). With `edges`, the edge cases go at both ends (the vectorised
// path sees them at the start, the tail path at the end).
std::vector<float> make_inputs(std::size_t n, Format f, std::uint64_t seed, bool edges) {
  const moelab::FormatInfo& info = moelab::format_info(f);
  std::mt19937_64 rng(seed);
  const int lowest = std::ilogb(info.min_subnormal) - 2;
  const int highest = std::ilogb(info.max) + 2;
  std::uniform_int_distribution<int> exponent(lowest, highest);
  std::vector<float> xs(n);
  for (float& x : xs) {
    const std::uint64_t r = rng();
    if ((r & 3) == 0) {
      x = std::bit_cast<float>(static_cast<std::uint32_t>(r >> 32));
    } else {
      const double significand = 1.0 + static_cast<double>((r >> 8) & 0x7FFFFF) / 0x800000;
      const double value = std::ldexp(significand, exponent(rng));
      x = static_cast<float>((r & 4) ? -value : value);
    }
  }
  if (edges) {
    const float inf = std::numeric_limits<float>::infinity();
    const float tie_above_max = info.max + moelab::ulp(info.max, f) / 2;
    const std::vector<float> special = {
        0.0f, -0.0f, 1.0f, info.max, -info.max, tie_above_max, -tie_above_max,
        std::nextafter(tie_above_max, 0.0f), std::nextafter(tie_above_max, inf), inf, -inf,
        std::numeric_limits<float>::quiet_NaN(), std::bit_cast<float>(0xFF800001u),
        info.min_subnormal, -info.min_subnormal, info.min_subnormal / 2,
        3 * info.min_subnormal / 2, info.min_normal, 1.0f + info.epsilon / 2,
        1.0f + 3 * info.epsilon / 2, std::bit_cast<float>(0x00000001u)};
    if (n >= 2 * special.size()) {
      std::copy(special.begin(), special.end(), xs.begin());
      const auto at_end = xs.end() - static_cast<std::ptrdiff_t>(special.size());
      std::copy(special.rbegin(), special.rend(), at_end);
    }
  }
  return xs;
}

bool is_nan_bits(std::uint32_t b, Format f) {
  return moelab::classify(b, f) == moelab::ValueClass::nan;
}

// Converts xs on the device with `version` and compares with `expected` (from moelab::encode).
// Returns the number of mismatches and prints the first few.
std::size_t validate(int version, const std::vector<float>& xs,
                     const std::vector<std::uint32_t>& expected, Format f, Overflow overflow,
                     int block_size) {
  const std::size_t n = xs.size();
  const std::size_t out_bytes = n * static_cast<std::size_t>(mc::device_bytes(f));
  DeviceBuffer in(n * sizeof(float));
  DeviceBuffer out(out_bytes);
  check(cudaMemcpy(in.ptr, xs.data(), n * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
  // Poison: an element the kernel does not write keeps 0xA5 bytes, not an earlier run's answer.
  check(cudaMemset(out.ptr, 0xA5, out_bytes), "cudaMemset");
  mc::launch_convert(out.ptr, static_cast<const float*>(in.ptr), n, f, overflow, version,
                     block_size);
  check(cudaDeviceSynchronize(), "convert kernel");
  std::vector<std::uint8_t> bytes(out_bytes);
  check(cudaMemcpy(bytes.data(), out.ptr, out_bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");

  const std::size_t width = static_cast<std::size_t>(mc::device_bytes(f));
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint32_t got = bytes[width * i];
    if (width == 2) got |= std::uint32_t{bytes[2 * i + 1]} << 8;  // little endian
    const bool same = std::isnan(xs[i]) ? is_nan_bits(got, f) : got == expected[i];
    if (!same && ++mismatches <= 5) {
      std::printf("    mismatch %s %s at %zu: x = %.9g (0x%08x): kernel 0x%x, reference 0x%x\n",
                  std::string(moelab::format_name(f)).c_str(),
                  overflow == Overflow::saturating ? "saturating" : "nonsaturating", i,
                  static_cast<double>(xs[i]), std::bit_cast<std::uint32_t>(xs[i]), got,
                  expected[i]);
    }
  }
  return mismatches;
}

int run(const Options& opt) {
  const mc::DeviceStatus status = mc::device_status();
  if (!status.available) {
    std::printf("%s\n", status.reason.c_str());
    return 77;
  }
  std::printf("device: %s (sm_%d)\n", status.name.c_str(), status.sm);

  // 1. Validate every version, format and overflow mode.
  const std::size_t check_size = (std::size_t{1} << 20) + 3;  // + 3: the tail path runs too
  std::vector<std::size_t> failures(mc::kConvertVersions + 1, 0);
  std::uint64_t seed = opt.seed;
  for (const Format f : kFormats) {
    const std::vector<float> xs = make_inputs(check_size, f, seed++, /*edges=*/true);
    for (const Overflow overflow : kOverflows) {
      std::vector<std::uint32_t> expected(xs.size());
      for (std::size_t i = 0; i < xs.size(); ++i) expected[i] = moelab::encode(xs[i], f, overflow);
      for (int v = 1; v <= mc::kConvertVersions; ++v)
        failures[v] += validate(v, xs, expected, f, overflow, opt.block_size);
    }
  }
  bool all_passed = true;
  for (int v = 1; v <= mc::kConvertVersions; ++v) {
    std::printf("convert_kernel%d: %s (4 formats x 2 overflow modes x %zu values, seed %llu)\n", v,
                failures[v] == 0 ? "Passed" : "Failed", check_size,
                static_cast<unsigned long long>(opt.seed));
    all_passed = all_passed && failures[v] == 0;
  }
  if (!all_passed) return 1;
  if (opt.iterations == 0) return 0;

  // 2. Time. Buffers rotate so that what one launch touches has left L2 before it comes round.
  int l2_bytes = 0;
  check(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, 0), "cudaDeviceGetAttribute");
  int memory_khz = 0;
  int bus_bits = 0;
  cudaDeviceGetAttribute(&memory_khz, cudaDevAttrMemoryClockRate, 0);
  cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, 0);
  cudaGetLastError();  // the two attributes are informative only
  const double peak_gbs = 2.0 * memory_khz * 1e3 * (bus_bits / 8) / 1e9;  // double data rate
  const std::size_t n = opt.size;
  const std::size_t pass_bytes = n * (sizeof(float) + 2);  // the largest output (bf16/fp16)
  const std::size_t rotate_bytes = 2 * static_cast<std::size_t>(l2_bytes);
  const std::size_t buffers =
      std::max<std::size_t>(1, (rotate_bytes + pass_bytes - 1) / pass_bytes);
  std::printf("\ntiming: %zu elements, %zu buffer pair(s), L2 %d MB, block size %d, median of %d\n",
              n, buffers, l2_bytes >> 20, opt.block_size, opt.iterations);
  if (peak_gbs > 0) std::printf("peak memory bandwidth (from the driver): %.0f GB/s\n", peak_gbs);

  std::vector<DeviceBuffer> ins;
  std::vector<DeviceBuffer> outs;
  ins.reserve(buffers);
  outs.reserve(buffers);
  {
    // Activation-like values (normal, sigma 4): every format converts them without special cases.
    std::mt19937_64 rng(opt.seed + 1000);
    std::normal_distribution<float> normal(0.0f, 4.0f);
    std::vector<float> xs(n);
    for (float& x : xs) x = normal(rng);
    for (std::size_t b = 0; b < buffers; ++b) {
      ins.emplace_back(n * sizeof(float));
      outs.emplace_back(n * 2);
      check(cudaMemcpy(ins.back().ptr, xs.data(), n * sizeof(float), cudaMemcpyHostToDevice),
            "cudaMemcpy");
    }
  }

  cudaEvent_t start = nullptr;
  cudaEvent_t stop = nullptr;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  std::printf("\n%-16s %-9s %-14s %10s %10s %8s\n", "kernel", "format", "overflow", "median us",
              "GB/s", "of peak");
  for (const Format f : kFormats) {
    for (const Overflow overflow : kOverflows) {
      const double bytes = static_cast<double>(n) * (sizeof(float) + mc::device_bytes(f));
      for (int v = 1; v <= mc::kConvertVersions; ++v) {
        std::size_t b = 0;
        auto launch = [&] {
          mc::launch_convert(outs[b].ptr, static_cast<const float*>(ins[b].ptr), n, f, overflow, v,
                             opt.block_size);
          b = (b + 1) % buffers;
        };
        for (int i = 0; i < 5; ++i) launch();  // warm-up
        std::vector<float> ms(static_cast<std::size_t>(opt.iterations));
        for (float& t : ms) {
          check(cudaEventRecord(start), "cudaEventRecord");
          launch();
          check(cudaEventRecord(stop), "cudaEventRecord");
          check(cudaEventSynchronize(stop), "cudaEventSynchronize");
          check(cudaEventElapsedTime(&t, start, stop), "cudaEventElapsedTime");
        }
        const auto middle = ms.begin() + static_cast<std::ptrdiff_t>(ms.size() / 2);
        std::nth_element(ms.begin(), middle, ms.end());
        const double median_s = ms[ms.size() / 2] * 1e-3;
        const double gbs = bytes / median_s / 1e9;
        std::printf("convert_kernel%-2d %-9s %-14s %10.1f %10.0f", v,
                    std::string(moelab::format_name(f)).c_str(),
                    overflow == Overflow::saturating ? "saturating" : "nonsaturating",
                    median_s * 1e6, gbs);
        if (peak_gbs > 0) std::printf(" %7.0f%%", 100.0 * gbs / peak_gbs);
        std::printf("\n");
      }
    }
  }
  check(cudaEventDestroy(start), "cudaEventDestroy");
  check(cudaEventDestroy(stop), "cudaEventDestroy");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  if (!parse(argc, argv, opt)) return 2;
  try {
    return run(opt);
  } catch (const moelab::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
