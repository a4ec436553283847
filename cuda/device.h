// moelab/cuda/device.h — what every kernel file and test shares: is there a GPU, CUDA errors as
// moelab::Error, and device memory that frees itself.
//
// A plain C++ header (the CUDA runtime's C API only): the tests and tools include it with g++.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace moelab::cuda {

// Whether a GPU that can run this build is present. Never throws.
struct DeviceStatus {
  bool available = false;
  std::string reason;  // why not available: "no CUDA device: <what CUDA said>"; empty if available
  std::string name;    // "NVIDIA H100 80GB HBM3"
  int sm = 0;          // compute capability as major*10 + minor: 90 for Hopper
  int multiprocessors = 0;
  std::size_t l2_bytes = 0;
};
DeviceStatus device_status();

// Throws moelab::Error("<what> = <cudaErrorName>: <description>") unless err is cudaSuccess.
void check_cuda(cudaError_t err, const char* what);
// check_cuda(cudaGetLastError(), what): call after every launch.
void check_launch(const char* what);

// bf16 values as their bit patterns on the host (the kernels read them as __nv_bfloat16).
using Bf16Bits = std::uint16_t;
// Round-to-nearest-even float32 -> bf16 bits and back (moelab::encode / decode, bf16).
std::vector<Bf16Bits> to_bf16(std::span<const float> xs);
std::vector<float> from_bf16(std::span<const Bf16Bits> bits);

// n elements of T in device memory, freed with the buffer (also when an error is thrown).
// Move-only. A zero-sized buffer holds no allocation and a null pointer.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t n) : n_(n) {
    if (n > 0) check_cuda(cudaMalloc(reinterpret_cast<void**>(&ptr_), n * sizeof(T)), "cudaMalloc");
  }
  explicit DeviceBuffer(std::span<const T> host) : DeviceBuffer(host.size()) { upload(host); }
  ~DeviceBuffer() { cudaFree(ptr_); }  // an error here goes unreported: destructors must not throw
  DeviceBuffer(DeviceBuffer&& other) noexcept : ptr_(other.ptr_), n_(other.n_) {
    other.ptr_ = nullptr;
    other.n_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      cudaFree(ptr_);
      ptr_ = other.ptr_;
      n_ = other.n_;
      other.ptr_ = nullptr;
      other.n_ = 0;
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* data() const { return ptr_; }
  std::size_t size() const { return n_; }
  std::size_t bytes() const { return n_ * sizeof(T); }

  // Synchronous copies; `host` must have size() elements.
  void upload(std::span<const T> host) {
    if (host.size() != n_) throw_size_mismatch(host.size());
    if (n_ > 0) check_cuda(cudaMemcpy(ptr_, host.data(), bytes(), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    if (n_ > 0) check_cuda(cudaMemcpy(host.data(), ptr_, bytes(), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return host;
  }
  // Fills every byte with `byte` (0xFF: float NaN, int32 -1, bf16 NaN), so that an element a kernel
  // failed to write cannot pass for a result. Tests poison every output before each run.
  void poison(unsigned char byte = 0xFF) {
    if (n_ > 0) check_cuda(cudaMemset(ptr_, byte, bytes()), "cudaMemset");
  }

 private:
  [[noreturn]] void throw_size_mismatch(std::size_t got) const;
  T* ptr_ = nullptr;
  std::size_t n_ = 0;
};

[[noreturn]] void throw_buffer_size_mismatch(std::size_t got, std::size_t expected);
template <typename T>
void DeviceBuffer<T>::throw_size_mismatch(std::size_t got) const {
  throw_buffer_size_mismatch(got, n_);
}

}  // namespace moelab::cuda
