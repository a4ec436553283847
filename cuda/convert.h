// moelab/cuda/convert.h — float32 -> bf16 / fp16 / fp8 conversion on the GPU.
//
// A plain C++ header (no CUDA types): the tests and tools include it with g++. The kernels are in
// convert.cu as a ladder of numbered versions; every version gives the same bits as the reference
// moelab::encode() (reference/numerics.h), which is the definition:
//   round-to-nearest-even; subnormals kept; overflow -> +-inf (bf16, fp16, e5m2) or NaN (e4m3) when
//   nonsaturating, -> +-max when saturating (also for +-inf input); NaN stays NaN.
// One difference is allowed: the NaN a kernel produces may have another sign or payload than the
// reference's (CUDA makes one canonical NaN). Tests compare NaN-ness, not bits, for NaN inputs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "cuda/device.h"
#include "reference/numerics.h"

namespace moelab::cuda {


// 1: one element per thread, scalar intrinsics.
// 2: four elements per thread: 16-byte loads, 2-wide packed conversions, one wide store.
// 3: as 2, but fp8 nonsaturating also uses the hardware conversion (sm_89+), fixing up overflow.
inline constexpr int kConvertVersions = 3;

// Converts xs to format f on the device with kernel version `version` (1..kConvertVersions) and
// returns the bit patterns (fp8 in the low 8 bits). Synchronous: allocates, copies, launches,
// copies back. Throws moelab::Error naming the field, value and rule on bad arguments (format fp32,
// version out of range; checked before the device is touched) and on CUDA errors (no device
// included). An empty xs gives an empty result without touching the device.
std::vector<std::uint16_t> convert(std::span<const float> xs, Format f, Overflow overflow,
                                   int version);

// --- the launch API, for benchmarks: device pointers, default stream, no synchronisation --------
// Bytes of one converted element on the device: 2 for bf16 and fp16, 1 for fp8. Throws for fp32.
int device_bytes(Format f);
// out (n * device_bytes(f) bytes) = in (n floats) converted by kernel `version` with `block_size`
// threads per block. Versions 2 and 3 need `in` 16-byte and `out` 4 * device_bytes(f)-byte
// aligned (cudaMalloc's pointers are). Checks the arguments and the launch (cudaGetLastError);
// errors during the kernel surface at the next synchronising call.
void launch_convert(void* out, const float* in, std::size_t n, Format f, Overflow overflow,
                    int version, int block_size = 256);

}  // namespace moelab::cuda
