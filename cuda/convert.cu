// moelab/cuda/convert.cu — float32 -> bf16 / fp16 / fp8 (e4m3, e5m2) on the GPU, as a ladder.
//
// What it shows. The simplest useful kernel: every element is read once (4 bytes) and written once
// (2 or 1 bytes), so the kernel is bound by memory bandwidth and the only question is how close
// to it a version gets. The ladder:
//   convert_kernel1  one element per thread, CUDA's scalar intrinsics (__float2bfloat16_rn,
//                    __float2half_rn, __nv_cvt_float_to_fp8). Obvious and correct.
//   convert_kernel2  four elements per thread: one 16-byte float4 load, two 2-wide packed
//                    conversions (__float22bfloat162_rn, __floats2half2_rn,
//                    __nv_cvt_float2_to_fp8x2; one cvt instruction converts two floats), one 8-byte
//                    (bf16/fp16) or 4-byte (fp8) store. A quarter of the memory instructions.
//   convert_kernel3  as 2, but fp8 *nonsaturating* also runs in hardware. PTX's cvt to fp8 exists
//                    only with .satfinite, so CUDA's __NV_NOSAT path is a software emulation (the
//                    float is widened to double and rounded with integer code: dozens of
//                    instructions per element, see `cuobjdump -sass`). Kernel 3 converts with
//                    .satfinite and then overwrites the elements that overflowed. Other formats
//                    and saturating fp8 are as in kernel 2.
// Why. Every MoE kernel that stores bf16/fp8 activations ends in this conversion, and it is where
// overflow and rounding conventions get lost; the reference (reference/numerics.h, encode()) is
// the definition and every version here must give its bits exactly. CUDA's conventions differ from
// the reference in places (NaN payloads; noted where it happens); there the kernel follows the
// reference.
//
// How to run. build/bin/moelab_convert_bench validates every version bit for bit against
// moelab::encode, then times them (GB/s): `moelab_convert_bench --iterations=0` only validates.
// tests/cuda/ holds the unit tests (test_cuda_device) and an independent CPU oracle of CUDA's own
// host conversions against the reference (test_cuda_host_oracle).
//
// Shapes: in (n,) float32; out (n,) uint16 (bf16, fp16) or uint8 (fp8) bit patterns.
#include "cuda/convert.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "reference/error.h"

namespace moelab::cuda {
namespace {

// check_cuda (device.h) under a short name.
void check(cudaError_t err, const char* what) { check_cuda(err, what); }

// -------------------------------------------------------------------------------------------------
// One element. The formats' limits, as float32 (exact):
constexpr float kBf16Max = 0x1.fep127f;  // 0x7F7F, 3.3895314e38
constexpr float kFp16Max = 65504.0f;     // 0x7BFF

template <Format F>
inline constexpr bool kIsFp8 = F == Format::fp8_e4m3 || F == Format::fp8_e5m2;
// The element type of the output on the device.
template <Format F>
using Out = std::conditional_t<kIsFp8<F>, std::uint8_t, std::uint16_t>;

template <Format F>
inline constexpr __nv_fp8_interpretation_t kFp8Kind = F == Format::fp8_e4m3 ? __NV_E4M3 : __NV_E5M2;
template <Overflow O>
inline constexpr __nv_saturation_t kFp8Saturation =
    O == Overflow::saturating ? __NV_SATFINITE : __NV_NOSAT;

// Saturating bf16/fp16: CUDA's conversions are IEEE (overflow -> inf), so clamp to +-max first;
// anything clamped then converts to max exactly. Comparisons are false for NaN, so NaN passes
// through (fminf/fmaxf would turn NaN into a number).
__device__ __forceinline__ float clamp_to_max(float x, float max) {
  return x > max ? max : (x < -max ? -max : x);
}

// fp8: __nv_cvt_float_to_fp8 runs in software for __NV_NOSAT (and for everything before sm_89) and
// as the hardware cvt.rn.satfinite for __NV_SATFINITE on sm_89+. The software path (cuda_fp8.hpp,
// CUDA 13; checked on the CPU by test_cuda_host_oracle) follows the reference in rounding,
// subnormals, ties at max, overflow and +-inf; the PTX ISA specifies the hardware path the same
// way (.satfinite: NaN stays NaN, |x| > max, inf included, gives +-max), and test_cuda_device
// checks it on a GPU.
// Where both differ from the reference: NaN becomes one canonical NaN (0x7F, the input's sign and
// payload dropped), where the reference keeps sign and top payload bits. That is the one allowed
// difference (convert.h), so the kernels make no fix-up for it.
template <Format F, Overflow O>
__device__ __forceinline__ Out<F> convert_one(float x) {
  if constexpr (F == Format::bf16) {
    if constexpr (O == Overflow::saturating) x = clamp_to_max(x, kBf16Max);
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  } else if constexpr (F == Format::fp16) {
    if constexpr (O == Overflow::saturating) x = clamp_to_max(x, kFp16Max);
    return __half_as_ushort(__float2half_rn(x));
  } else {
    return __nv_cvt_float_to_fp8(x, kFp8Saturation<O>, kFp8Kind<F>);
  }
}

// Two elements with one packed conversion: a in the low half (bits 0-15, or 0-7 for fp8).
template <Format F, Overflow O>
__device__ __forceinline__ std::uint32_t convert_two(float a, float b) {
  if constexpr (F == Format::bf16) {
    if constexpr (O == Overflow::saturating) {
      a = clamp_to_max(a, kBf16Max);
      b = clamp_to_max(b, kBf16Max);
    }
    const __nv_bfloat162 h = __float22bfloat162_rn(make_float2(a, b));
    return std::uint32_t{__bfloat16_as_ushort(h.x)} |
           (std::uint32_t{__bfloat16_as_ushort(h.y)} << 16);
  } else if constexpr (F == Format::fp16) {
    if constexpr (O == Overflow::saturating) {
      a = clamp_to_max(a, kFp16Max);
      b = clamp_to_max(b, kFp16Max);
    }
    const __half2 h = __floats2half2_rn(a, b);
    return std::uint32_t{__half_as_ushort(__low2half(h))} |
           (std::uint32_t{__half_as_ushort(__high2half(h))} << 16);
  } else {
    return __nv_cvt_float2_to_fp8x2(make_float2(a, b), kFp8Saturation<O>, kFp8Kind<F>);
  }
}

// Kernel 3's pair conversion: fp8 nonsaturating in hardware (sm_89+), everything else as kernel 2.
// Converts with .satfinite (one cvt for two floats), then replaces each element whose input
// overflows (+-inf included; never NaN, whose comparisons are false) by the nonsaturating result:
// S.1111.111 = NaN for e4m3 (OCP FP8 v1.0: E4M3 has no infinities), S.11111.00 = inf for e5m2.
// The sign is kept, as CUDA's own __NV_NOSAT path does. Overflow starts where the rounded value
// would exceed max:
//   e4m3: max 448 = 1.75*2^8, ulp 32; 464 is the tie between 448 (mantissa 110, even) and 480,
//         so it rounds to 448 and only |x| > 464 overflows.
//   e5m2: max 57344 = 1.75*2^15, ulp 8192; 61440 is the tie between 57344 (mantissa 11, odd) and
//         2^16 (even), so |x| >= 61440 overflows.
template <Format F, Overflow O>
__device__ __forceinline__ std::uint32_t convert_two_v3(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  if constexpr (kIsFp8<F> && O == Overflow::nonsaturating) {
    constexpr float threshold = F == Format::fp8_e4m3 ? 464.0f : 61440.0f;
    constexpr std::uint32_t overflowed = F == Format::fp8_e4m3 ? 0x7Fu : 0x7Cu;
    std::uint32_t r = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, kFp8Kind<F>);
    const bool a_over = F == Format::fp8_e4m3 ? fabsf(a) > threshold : fabsf(a) >= threshold;
    const bool b_over = F == Format::fp8_e4m3 ? fabsf(b) > threshold : fabsf(b) >= threshold;
    if (a_over) r = (r & 0xFF00u) | ((__float_as_uint(a) >> 24) & 0x80u) | overflowed;
    if (b_over) r = (r & 0x00FFu) | ((((__float_as_uint(b) >> 24) & 0x80u) | overflowed) << 8);
    return r;
  }
#endif
  return convert_two<F, O>(a, b);
}

// Four converted elements as one store: 8 bytes for bf16/fp16, 4 for fp8.
template <Format F>
using Packed4 = std::conditional_t<kIsFp8<F>, std::uint32_t, uint2>;

template <Format F>
__device__ __forceinline__ Packed4<F> pack4(std::uint32_t lo, std::uint32_t hi) {
  if constexpr (kIsFp8<F>) {
    return lo | (hi << 16);
  } else {
    return make_uint2(lo, hi);
  }
}

// -------------------------------------------------------------------------------------------------
// The kernels.

// Kernel 1: one element per thread.
template <Format F, Overflow O>
__global__ void convert_kernel1(Out<F>* out, const float* in, std::size_t n) {
  const std::size_t i = std::size_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i < n) out[i] = convert_one<F, O>(in[i]);
}

// Kernel 2: thread i converts elements 4i..4i+3 (one float4 load, one wide store). The last n % 4
// elements (at most 3) are converted one each by threads 0..2.
template <Format F, Overflow O>
__global__ void convert_kernel2(Out<F>* out, const float* in, std::size_t n) {
  const std::size_t i = std::size_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const std::size_t n4 = n / 4;
  if (i < n4) {
    const float4 v = reinterpret_cast<const float4*>(in)[i];
    reinterpret_cast<Packed4<F>*>(out)[i] =
        pack4<F>(convert_two<F, O>(v.x, v.y), convert_two<F, O>(v.z, v.w));
  }
  if (i < n - 4 * n4) out[4 * n4 + i] = convert_one<F, O>(in[4 * n4 + i]);
}

// Kernel 3: kernel 2 with fp8 nonsaturating done by the hardware cvt (convert_two_v3).
template <Format F, Overflow O>
__global__ void convert_kernel3(Out<F>* out, const float* in, std::size_t n) {
  const std::size_t i = std::size_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const std::size_t n4 = n / 4;
  if (i < n4) {
    const float4 v = reinterpret_cast<const float4*>(in)[i];
    reinterpret_cast<Packed4<F>*>(out)[i] =
        pack4<F>(convert_two_v3<F, O>(v.x, v.y), convert_two_v3<F, O>(v.z, v.w));
  }
  if (i < n - 4 * n4) {
    // The tail's single elements use the pair conversion with a dummy partner.
    out[4 * n4 + i] = static_cast<Out<F>>(convert_two_v3<F, O>(in[4 * n4 + i], 0.0f));
  }
}

// -------------------------------------------------------------------------------------------------
// Launchers and the dispatcher.

std::size_t ceil_div(std::size_t a, std::size_t b) { return (a + b - 1) / b; }

template <Format F, Overflow O>
void launch(int version, void* out_raw, const float* in, std::size_t n, int block_size) {
  Out<F>* out = static_cast<Out<F>*>(out_raw);
  // Threads needed: one per element (v1), or one per 4 elements and at least one per tail element.
  const std::size_t threads = version == 1 ? n : std::max(n / 4, n % 4);
  const std::size_t blocks = ceil_div(threads, static_cast<std::size_t>(block_size));
  require(blocks <= std::size_t{std::numeric_limits<int>::max()}, "n", n,
          "too many elements for one launch (more than 2^31 - 1 blocks)");
  const dim3 grid(static_cast<unsigned>(blocks));
  const dim3 block(static_cast<unsigned>(block_size));
  switch (version) {
    case 1: convert_kernel1<F, O><<<grid, block>>>(out, in, n); break;
    case 2: convert_kernel2<F, O><<<grid, block>>>(out, in, n); break;
    case 3: convert_kernel3<F, O><<<grid, block>>>(out, in, n); break;
    default: fail("version", version, "unreachable: checked by the caller");
  }
  check(cudaGetLastError(), version == 1   ? "convert_kernel1 launch"
                            : version == 2 ? "convert_kernel2 launch"
                                           : "convert_kernel3 launch");
}

template <Format F>
void launch(Overflow overflow, int version, void* out, const float* in, std::size_t n,
            int block_size) {
  if (overflow == Overflow::saturating) {
    launch<F, Overflow::saturating>(version, out, in, n, block_size);
  } else {
    launch<F, Overflow::nonsaturating>(version, out, in, n, block_size);
  }
}

// The checks every entry point makes before it touches the device.
void check_format_and_version(Format f, int version) {
  require(f != Format::fp32, "format", format_name(f),
          "is not a conversion target (choose bf16, fp16, fp8_e4m3 or fp8_e5m2)");
  require(version >= 1 && version <= kConvertVersions, "version", version,
          fmt::format("must be in [1, {}]", kConvertVersions));
}

}  // namespace

int device_bytes(Format f) {
  require(f != Format::fp32, "format", format_name(f),
          "is not a conversion target (choose bf16, fp16, fp8_e4m3 or fp8_e5m2)");
  return f == Format::bf16 || f == Format::fp16 ? 2 : 1;
}

void launch_convert(void* out, const float* in, std::size_t n, Format f, Overflow overflow,
                    int version, int block_size) {
  check_format_and_version(f, version);
  require(block_size >= 32 && block_size <= 1024 && block_size % 32 == 0, "block_size", block_size,
          "must be a multiple of 32 in [32, 1024]");
  if (n == 0) return;
  require(in != nullptr, "in", "null", "must point to n floats on the device");
  require(out != nullptr, "out", "null", "must point to n converted elements on the device");
  if (version >= 2) {
    const auto in_address = reinterpret_cast<std::uintptr_t>(in);
    const auto out_address = reinterpret_cast<std::uintptr_t>(out);
    require(in_address % 16 == 0, "in", fmt::format("{:#x}", in_address),
            "must be 16-byte aligned for the float4 loads of versions 2 and 3");
    require(out_address % (4 * device_bytes(f)) == 0, "out", fmt::format("{:#x}", out_address),
            fmt::format("must be {}-byte aligned for the wide stores of versions 2 and 3",
                        4 * device_bytes(f)));
  }
  switch (f) {
    case Format::bf16: launch<Format::bf16>(overflow, version, out, in, n, block_size); break;
    case Format::fp16: launch<Format::fp16>(overflow, version, out, in, n, block_size); break;
    case Format::fp8_e4m3:
      launch<Format::fp8_e4m3>(overflow, version, out, in, n, block_size);
      break;
    case Format::fp8_e5m2:
      launch<Format::fp8_e5m2>(overflow, version, out, in, n, block_size);
      break;
    case Format::fp32: break;  // rejected above
  }
}

std::vector<std::uint16_t> convert(std::span<const float> xs, Format f, Overflow overflow,
                                   int version) {
  check_format_and_version(f, version);
  if (xs.empty()) return {};
  const std::size_t n = xs.size();
  const std::size_t out_bytes = n * static_cast<std::size_t>(device_bytes(f));
  const DeviceBuffer<float> in(xs);
  DeviceBuffer<std::uint8_t> out(out_bytes);
  // Poison the output: an element a kernel forgets to write then fails the comparison instead of
  // passing with whatever an earlier run left in this memory.
  out.poison(0xA5);
  launch_convert(out.data(), in.data(), n, f, overflow, version);
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize after the kernel");

  std::vector<std::uint16_t> result(n);
  if (device_bytes(f) == 2) {
    check(cudaMemcpy(result.data(), out.data(), out_bytes, cudaMemcpyDeviceToHost),
          "cudaMemcpy(device to host)");
  } else {
    std::vector<std::uint8_t> bytes(n);
    check(cudaMemcpy(bytes.data(), out.data(), out_bytes, cudaMemcpyDeviceToHost),
          "cudaMemcpy(device to host)");
    for (std::size_t i = 0; i < n; ++i) result[i] = bytes[i];
  }
  return result;
}

}  // namespace moelab::cuda
