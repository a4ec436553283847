// moelab/cuda/device.cu — device detection, CUDA errors as moelab::Error, bf16 on the host.
#include "cuda/device.h"

#include <cuda_runtime.h>
#include <fmt/format.h>

#include <string>

#include "reference/error.h"
#include "reference/numerics.h"

namespace moelab::cuda {
namespace {

// The smallest kernel: if the runtime cannot find code for the device in this build (an sm_75
// card, or a future one without PTX to compile), asking for its attributes fails.
__global__ void probe_kernel() {}

}  // namespace

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) fail(what, cudaGetErrorName(err), cudaGetErrorString(err));
}

void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

void throw_buffer_size_mismatch(std::size_t got, std::size_t expected) {
  fail("host elements", got, fmt::format("must equal the device buffer's {} elements", expected));
}

std::vector<Bf16Bits> to_bf16(std::span<const float> xs) {
  std::vector<Bf16Bits> bits(xs.size());
  for (std::size_t i = 0; i < xs.size(); ++i) bits[i] = static_cast<Bf16Bits>(encode(xs[i], Format::bf16));
  return bits;
}

std::vector<float> from_bf16(std::span<const Bf16Bits> bits) {
  std::vector<float> xs(bits.size());
  for (std::size_t i = 0; i < bits.size(); ++i) xs[i] = decode(bits[i], Format::bf16);
  return xs;
}

DeviceStatus device_status() {
  DeviceStatus status;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    status.reason = std::string("no CUDA device: ") +
                    (err != cudaSuccess ? cudaGetErrorString(err) : "cudaGetDeviceCount found none");
    cudaGetLastError();  // reset the runtime's last error, so later calls do not report this one
    return status;
  }
  int device = 0;
  cudaDeviceProp prop{};
  err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaGetDeviceProperties(&prop, device);
  if (err != cudaSuccess) {
    status.reason = std::string("no CUDA device: ") + cudaGetErrorString(err);
    cudaGetLastError();
    return status;
  }
  status.name = prop.name;
  status.sm = prop.major * 10 + prop.minor;
  status.multiprocessors = prop.multiProcessorCount;
  status.l2_bytes = static_cast<std::size_t>(prop.l2CacheSize);
  // A device this build has no code for (sm_75, or a future one without PTX JIT) is not usable.
  cudaFuncAttributes attributes{};
  err = cudaFuncGetAttributes(&attributes, probe_kernel);
  if (err != cudaSuccess) {
    status.reason = fmt::format("no CUDA device: {} (sm_{}) cannot run this build: {}", status.name,
                                status.sm, cudaGetErrorString(err));
    cudaGetLastError();
    return status;
  }
  if (status.sm < 80) {
    status.reason = fmt::format("no CUDA device: {} is sm_{}; moelab's kernels need sm_80 or newer (bf16 "
                                "tensor cores)", status.name, status.sm);
    return status;
  }
  status.available = true;
  return status;
}

}  // namespace moelab::cuda
