// moelab/cuda/baselines.cu — the yardsticks of `moelab bench --impl cuda` (cuda/baselines.h): the
// device's peaks through cuBLAS and a copy, the experts computed with cuBLAS, and the small
// kernels around them (inputs, gather, SwiGLU, comparison).
//
// Nothing here is a ladder: these are the obvious ways to do each job with the vendor's library,
// so that the numbers of our kernels have something honest beside them.
#include "cuda/baselines.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "reference/error.h"

namespace moelab::cuda {
namespace {

constexpr std::size_t kCublasWorkspaceBytes = std::size_t{64} << 20;  // cuBLAS asks for 32 MiB on Hopper

// ---- counter-based random numbers -----------------------------------------------------------------

// SplitMix64 (Steele, Lea and Flood 2014): value i of a stream is the same whatever the launch shape.
__device__ __forceinline__ std::uint64_t splitmix64(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// U(-a, a) from the top 24 bits of the hash of (seed, i).
__device__ __forceinline__ float uniform_symmetric(std::uint64_t seed, std::uint64_t i, float a) {
  const std::uint64_t h = splitmix64(seed ^ splitmix64(i));
  const float u = static_cast<float>(h >> 40) * 0x1.0p-24f;  // [0, 1)
  return a * (2.0f * u - 1.0f);
}

constexpr float kSqrt3 = 1.7320508f;  // U(-sqrt 3, sqrt 3) has variance 1

int grid_for(std::int64_t n, int block = 256, std::int64_t max_blocks = 8192) {
  return static_cast<int>(std::clamp<std::int64_t>((n + block - 1) / block, 1, max_blocks));
}

__global__ void fill_tokens_kernel(__nv_bfloat16* x, std::int64_t n, std::int64_t hidden_size, std::uint64_t seed,
                                   float skew, float norm, std::uint64_t direction_seed) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const float z = uniform_symmetric(seed, static_cast<std::uint64_t>(i), kSqrt3);
    const float u = uniform_symmetric(direction_seed, static_cast<std::uint64_t>(i % hidden_size), kSqrt3);
    x[i] = __float2bfloat16_rn((z + skew * u) * norm);
  }
}

template <typename T>
__global__ void fill_uniform_kernel(T* w, std::int64_t n, std::uint64_t seed, float a) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const float v = uniform_symmetric(seed, static_cast<std::uint64_t>(i), a);
    if constexpr (std::is_same_v<T, float>) {
      w[i] = v;
    } else {
      w[i] = __float2bfloat16_rn(v);
    }
  }
}

// ---- comparison -------------------------------------------------------------------------------------

struct DiffSums {
  double sq_diff;
  double sq_ref;
  unsigned int max_diff_bits;  // non-negative floats order as their bit patterns
  unsigned int max_ref_bits;
  unsigned long long nonfinite;
};

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_down_sync(0xFFFFFFFFu, v, offset));
  return v;
}

// One partial sum per thread, reduced per warp, one atomic per warp. ref null: compared with 0.
__global__ void compare_bf16_kernel(DiffSums* sums, const __nv_bfloat16* got, const __nv_bfloat16* ref,
                                    std::int64_t n) {
  double sq_diff = 0, sq_ref = 0;
  float max_diff = 0, max_ref = 0;
  unsigned long long bad = 0;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const float g = __bfloat162float(got[i]);
    const float r = ref != nullptr ? __bfloat162float(ref[i]) : 0.0f;
    if (!isfinite(g) || !isfinite(r)) {
      ++bad;
      continue;
    }
    const float d = fabsf(g - r);
    sq_diff += static_cast<double>(d) * d;
    sq_ref += static_cast<double>(r) * r;
    max_diff = fmaxf(max_diff, d);
    max_ref = fmaxf(max_ref, fabsf(r));
  }
  sq_diff = warp_sum(sq_diff);
  sq_ref = warp_sum(sq_ref);
  max_diff = warp_max(max_diff);
  max_ref = warp_max(max_ref);
  for (int offset = 16; offset > 0; offset /= 2) bad += __shfl_down_sync(0xFFFFFFFFu, bad, offset);
  if ((threadIdx.x & 31) == 0) {
    atomicAdd(&sums->sq_diff, sq_diff);
    atomicAdd(&sums->sq_ref, sq_ref);
    atomicMax(&sums->max_diff_bits, __float_as_uint(max_diff));
    atomicMax(&sums->max_ref_bits, __float_as_uint(max_ref));
    atomicAdd(&sums->nonfinite, bad);
  }
}

// ---- gather and SwiGLU: 8 bf16 (16 bytes) per thread --------------------------------------------

__global__ void gather_rows_kernel(uint4* xp, const uint4* x, const std::int32_t* row_token, std::int64_t rows,
                                   std::int64_t chunks_per_row) {
  const std::int64_t n = rows * chunks_per_row;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / chunks_per_row, c = i % chunks_per_row;
    const std::int32_t t = row_token[r];
    xp[i] = t >= 0 ? x[t * chunks_per_row + c] : make_uint4(0, 0, 0, 0);
  }
}

__device__ __forceinline__ float silu(float a) { return a / (1.0f + __expf(-a)); }

__global__ void swiglu_kernel(uint4* hidden, const uint4* gate_up, const float* row_scale, std::int64_t rows,
                              std::int64_t chunks_per_row) {  // chunks of H
  const std::int64_t n = rows * chunks_per_row;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / chunks_per_row, c = i % chunks_per_row;
    const float s = row_scale != nullptr ? row_scale[r] : 1.0f;
    const uint4 g4 = gate_up[r * 2 * chunks_per_row + c];                   // gate: columns [0, H)
    const uint4 u4 = gate_up[r * 2 * chunks_per_row + chunks_per_row + c];  // up: columns [H, 2H)
    const auto* g = reinterpret_cast<const __nv_bfloat162*>(&g4);
    const auto* u = reinterpret_cast<const __nv_bfloat162*>(&u4);
    uint4 h4;
    auto* h = reinterpret_cast<__nv_bfloat162*>(&h4);
    for (int j = 0; j < 4; ++j) {
      const float2 gf = __bfloat1622float2(g[j]), uf = __bfloat1622float2(u[j]);
      h[j] = __floats2bfloat162_rn(silu(s * gf.x) * (s * uf.x), silu(s * gf.y) * (s * uf.y));
    }
    hidden[i] = h4;
  }
}

// out_e^T (N, rows_e) = W_e (N, K) xp_e^T in column-major terms (see the top of baselines.h).
void gemm_tn(cublasHandle_t handle, const Bf16Bits* w, const Bf16Bits* xp, Bf16Bits* out, std::int64_t n_out,
             std::int64_t rows, std::int64_t k, const char* what) {
  const float alpha = 1.0f, beta = 0.0f;
  check_cublas(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n_out), static_cast<int>(rows),
                            static_cast<int>(k), &alpha, w, CUDA_R_16BF, static_cast<int>(k), xp, CUDA_R_16BF,
                            static_cast<int>(k), &beta, out, CUDA_R_16BF, static_cast<int>(n_out),
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               what);
}

}  // namespace

void check_cublas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) fail(what, cublasGetStatusName(status), cublasGetStatusString(status));
}

Cublas::Cublas() : workspace_(kCublasWorkspaceBytes) {
  check_cublas(cublasCreate(&handle_), "cublasCreate");
  const cublasStatus_t status = cublasSetWorkspace(handle_, workspace_.data(), workspace_.bytes());
  if (status != CUBLAS_STATUS_SUCCESS) {
    cublasDestroy(handle_);
    check_cublas(status, "cublasSetWorkspace");
  }
}

Cublas::~Cublas() { cublasDestroy(handle_); }

cublasHandle_t Cublas::on(cudaStream_t stream) {
  check_cublas(cublasSetStream(handle_, stream), "cublasSetStream");
  return handle_;
}

PeakRate measure_gemm_peak(Cublas& blas, std::int64_t n, int replays) {
  require(n >= 16 && n % 8 == 0, "n", n, "must be a multiple of 8, at least 16");
  const auto elements = static_cast<std::size_t>(n * n);
  DeviceBuffer<Bf16Bits> a(elements), b(elements), c(elements);
  fill_uniform(a.data(), elements, n, 1);
  fill_uniform(b.data(), elements, n, 2);
  const auto launch = [&](cudaStream_t stream, int) {
    gemm_tn(blas.on(stream), a.data(), b.data(), c.data(), n, n, n, "cublasGemmEx (peak)");
  };
  launch(nullptr, 0);  // once outside the capture: cuBLAS picks and loads its kernel
  check_cuda(cudaDeviceSynchronize(), "cublasGemmEx (peak)");
  PeakRate peak;
  peak.work = 2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n);
  peak.timing = time_graph(launch, 1, replays);
  peak.per_second = peak.work / (peak.timing.median_ms * 1e-3);
  return peak;
}

PeakRate measure_copy_bandwidth(std::size_t bytes, int replays) {
  require(bytes >= 1, "bytes", bytes, "must be positive");
  DeviceBuffer<std::uint8_t> from(bytes), to(bytes);
  check_cuda(cudaMemset(from.data(), 0x3C, bytes), "cudaMemset");  // touch every page before timing
  check_cuda(cudaMemset(to.data(), 0, bytes), "cudaMemset");
  const auto launch = [&](cudaStream_t stream, int) {
    check_cuda(cudaMemcpyAsync(to.data(), from.data(), bytes, cudaMemcpyDeviceToDevice, stream), "cudaMemcpyAsync");
  };
  PeakRate peak;
  peak.work = 2.0 * static_cast<double>(bytes);
  peak.timing = time_graph(launch, 1, replays);
  peak.per_second = peak.work / (peak.timing.median_ms * 1e-3);
  return peak;
}

void fill_tokens(Bf16Bits* x, std::int64_t tokens, std::int64_t hidden_size, std::uint64_t seed, float skew,
                 std::uint64_t direction_seed, cudaStream_t stream) {
  require(tokens >= 0 && hidden_size >= 1, "tokens, hidden_size", fmt::format("{}, {}", tokens, hidden_size),
          "must be >= 0 and >= 1");
  require(std::isfinite(skew) && skew >= 0, "skew", skew, "must be a finite number >= 0");
  const std::int64_t n = tokens * hidden_size;
  if (n == 0) return;
  const float norm = 1.0f / std::sqrt(1.0f + skew * skew);
  fill_tokens_kernel<<<grid_for(n), 256, 0, stream>>>(reinterpret_cast<__nv_bfloat16*>(x), n, hidden_size, seed, skew,
                                                      norm, direction_seed);
  check_launch("fill_tokens_kernel");
}

void fill_uniform(Bf16Bits* w, std::size_t n, Index fan_in, std::uint64_t seed, cudaStream_t stream) {
  require(fan_in >= 1, "fan_in", fan_in, "must be at least 1");
  if (n == 0) return;
  const auto count = static_cast<std::int64_t>(n);
  fill_uniform_kernel<<<grid_for(count), 256, 0, stream>>>(reinterpret_cast<__nv_bfloat16*>(w), count, seed,
                                                           std::sqrt(3.0f / static_cast<float>(fan_in)));
  check_launch("fill_uniform_kernel (bf16)");
}

void fill_uniform(float* w, std::size_t n, Index fan_in, std::uint64_t seed, cudaStream_t stream) {
  require(fan_in >= 1, "fan_in", fan_in, "must be at least 1");
  if (n == 0) return;
  const auto count = static_cast<std::int64_t>(n);
  fill_uniform_kernel<<<grid_for(count), 256, 0, stream>>>(w, count, seed, std::sqrt(3.0f / static_cast<float>(fan_in)));
  check_launch("fill_uniform_kernel (fp32)");
}

Bf16Diff compare_bf16(const Bf16Bits* got, const Bf16Bits* ref, std::size_t n) {
  require(got != nullptr, "got", "null", "must point to device memory");
  Bf16Diff diff;
  if (n == 0) return diff;
  DeviceBuffer<DiffSums> sums(1);
  check_cuda(cudaMemset(sums.data(), 0, sizeof(DiffSums)), "cudaMemset");
  const auto count = static_cast<std::int64_t>(n);
  compare_bf16_kernel<<<grid_for(count, 256, 2048), 256>>>(sums.data(), reinterpret_cast<const __nv_bfloat16*>(got),
                                                           reinterpret_cast<const __nv_bfloat16*>(ref), count);
  check_launch("compare_bf16_kernel");
  const DiffSums s = sums.download()[0];
  diff.max_abs_diff = static_cast<double>(std::bit_cast<float>(s.max_diff_bits));
  diff.max_abs_ref = static_cast<double>(std::bit_cast<float>(s.max_ref_bits));
  diff.rel_l2 = s.sq_ref > 0 ? std::sqrt(s.sq_diff / s.sq_ref) : 0.0;
  diff.nonfinite = static_cast<std::int64_t>(s.nonfinite);
  return diff;
}

void launch_gather_rows(Bf16Bits* xp, const Bf16Bits* x, const std::int32_t* row_token, std::int64_t rows,
                        std::int64_t hidden_size, cudaStream_t stream) {
  require(hidden_size % 8 == 0 && hidden_size > 0, "hidden_size", hidden_size, "must be a positive multiple of 8");
  require(rows >= 0, "rows", rows, "must be >= 0");
  if (rows == 0) return;
  require(xp != nullptr && x != nullptr && row_token != nullptr, "xp, x, row_token", "null",
          "must point to device memory");
  const std::int64_t chunks = hidden_size / 8;
  gather_rows_kernel<<<grid_for(rows * chunks), 256, 0, stream>>>(
      reinterpret_cast<uint4*>(xp), reinterpret_cast<const uint4*>(x), row_token, rows, chunks);
  check_launch("gather_rows_kernel");
}

void launch_swiglu(Bf16Bits* hidden, const Bf16Bits* gate_up, const float* row_scale, std::int64_t rows,
                   std::int64_t intermediate_size, cudaStream_t stream) {
  require(intermediate_size % 8 == 0 && intermediate_size > 0, "intermediate_size", intermediate_size,
          "must be a positive multiple of 8");
  require(rows >= 0, "rows", rows, "must be >= 0");
  if (rows == 0) return;
  require(hidden != nullptr && gate_up != nullptr, "hidden, gate_up", "null", "must point to device memory");
  const std::int64_t chunks = intermediate_size / 8;
  swiglu_kernel<<<grid_for(rows * chunks), 256, 0, stream>>>(
      reinterpret_cast<uint4*>(hidden), reinterpret_cast<const uint4*>(gate_up), row_scale, rows, chunks);
  check_launch("swiglu_kernel");
}

void validate(const ExpertsProblem& p) {
  require(p.offsets.size() >= 2, "offsets", p.offsets.size(), "must hold E + 1 >= 2 values");
  require(p.offsets.front() == 0, "offsets[0]", p.offsets.front(), "must be 0");
  for (std::size_t e = 0; e + 1 < p.offsets.size(); ++e)
    if (p.offsets[e + 1] < p.offsets[e])
      fail(fmt::format("offsets[{}]", e + 1), p.offsets[e + 1], fmt::format("must be >= offsets[{}] = {}", e, p.offsets[e]));
  require(p.hidden_size > 0 && p.hidden_size % 8 == 0, "hidden_size", p.hidden_size, "must be a positive multiple of 8");
  require(p.intermediate_size > 0 && p.intermediate_size % 8 == 0, "intermediate_size", p.intermediate_size,
          "must be a positive multiple of 8");
  require(p.xp && p.w_gate_up && p.w_down && p.gate_up && p.hidden && p.out, "xp, w_gate_up, w_down, gate_up, hidden, out",
          "null", "must all point to device memory");
}

void launch_experts_loop(Cublas& blas, const ExpertsProblem& p, cudaStream_t stream) {
  validate(p);
  const std::int64_t C = p.hidden_size, H = p.intermediate_size;
  cublasHandle_t handle = blas.on(stream);
  for (int e = 0; e < p.num_experts(); ++e) {
    const std::int64_t first = p.offsets[e], rows = p.offsets[e + 1] - first;
    if (rows == 0) continue;
    gemm_tn(handle, p.w_gate_up + e * 2 * H * C, p.xp + first * C, p.gate_up + first * 2 * H, 2 * H, rows, C,
            "cublasGemmEx (gate/up)");
  }
  launch_swiglu(p.hidden, p.gate_up, p.row_scale, p.rows(), H, stream);
  for (int e = 0; e < p.num_experts(); ++e) {
    const std::int64_t first = p.offsets[e], rows = p.offsets[e + 1] - first;
    if (rows == 0) continue;
    gemm_tn(handle, p.w_down + e * C * H, p.hidden + first * H, p.out + first * C, C, rows, H, "cublasGemmEx (down)");
  }
}

#if CUBLAS_VERSION >= 120500
std::string GroupedExperts::unsupported() { return ""; }
#else
std::string GroupedExperts::unsupported() {
  return fmt::format("cublasGemmGroupedBatchedEx needs cuBLAS 12.5 or newer; this build has {}", CUBLAS_VERSION);
}
#endif

GroupedExperts::GroupedExperts(const ExpertsProblem& p) : problem_(p) {
  validate(p);
  if (const std::string why = unsupported(); !why.empty()) fail("GroupedExperts", "cuBLAS", why);
  const std::int64_t C = p.hidden_size, H = p.intermediate_size;
  // One group per expert with rows (a group's problems share m, n, k; experts' row counts differ).
  const auto add = [](Gemm& g, int m, int n, int k, const void* a, const void* b, void* c, std::vector<const void*>& as,
                      std::vector<const void*>& bs, std::vector<void*>& cs) {
    g.trans_a.push_back(CUBLAS_OP_T);
    g.trans_b.push_back(CUBLAS_OP_N);
    g.m.push_back(m);
    g.n.push_back(n);
    g.k.push_back(k);
    g.lda.push_back(k);
    g.ldb.push_back(k);
    g.ldc.push_back(m);
    g.group_size.push_back(1);
    g.alpha.push_back(1.0f);
    g.beta.push_back(0.0f);
    as.push_back(a);
    bs.push_back(b);
    cs.push_back(c);
  };
  std::vector<const void*> a1, b1, a2, b2;
  std::vector<void*> c1, c2;
  for (int e = 0; e < p.num_experts(); ++e) {
    const std::int64_t first = p.offsets[e], rows = p.offsets[e + 1] - first;
    if (rows == 0) continue;
    add(gate_up_, static_cast<int>(2 * H), static_cast<int>(rows), static_cast<int>(C), p.w_gate_up + e * 2 * H * C,
        p.xp + first * C, p.gate_up + first * 2 * H, a1, b1, c1);
    add(down_, static_cast<int>(C), static_cast<int>(rows), static_cast<int>(H), p.w_down + e * C * H,
        p.hidden + first * H, p.out + first * C, a2, b2, c2);
  }
  gate_up_.a = DeviceBuffer<const void*>(a1);
  gate_up_.b = DeviceBuffer<const void*>(b1);
  gate_up_.c = DeviceBuffer<void*>(c1);
  down_.a = DeviceBuffer<const void*>(a2);
  down_.b = DeviceBuffer<const void*>(b2);
  down_.c = DeviceBuffer<void*>(c2);
}

void GroupedExperts::launch_gemm(cublasHandle_t handle, const Gemm& g) const {
#if CUBLAS_VERSION >= 120500
  if (g.m.empty()) return;
  check_cublas(cublasGemmGroupedBatchedEx(handle, g.trans_a.data(), g.trans_b.data(), g.m.data(), g.n.data(),
                                          g.k.data(), g.alpha.data(), g.a.data(), CUDA_R_16BF, g.lda.data(),
                                          g.b.data(), CUDA_R_16BF, g.ldb.data(), g.beta.data(), g.c.data(),
                                          CUDA_R_16BF, g.ldc.data(), static_cast<int>(g.m.size()),
                                          g.group_size.data(), CUBLAS_COMPUTE_32F),
               "cublasGemmGroupedBatchedEx");
#else
  (void)handle;
  (void)g;
#endif
}

void GroupedExperts::launch(Cublas& blas, cudaStream_t stream) const {
  cublasHandle_t handle = blas.on(stream);
  launch_gemm(handle, gate_up_);
  launch_swiglu(problem_.hidden, problem_.gate_up, problem_.row_scale, problem_.rows(), problem_.intermediate_size,
                stream);
  launch_gemm(handle, down_);
}

}  // namespace moelab::cuda
