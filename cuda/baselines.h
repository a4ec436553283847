// moelab/cuda/baselines.h — what `moelab bench --impl cuda` measures our MoE layer against.
//
// Two kinds of yardstick, both through NVIDIA's own library, cuBLAS:
//   the device's peaks     measure_gemm_peak: one large dense bf16 GEMM (fp32 accumulation), the
//                          tensor-core rate an expert GEMM could reach at best;
//                          measure_copy_bandwidth: a device-to-device copy, the DRAM rate.
//                          Together they give each measurement its roofline:
//                          max(bytes / copy rate, flops / GEMM rate).
//   the experts, another way
//                          launch_experts_loop: what a framework without a grouped kernel does
//                          (Hugging Face's per-expert loop): per expert e, one cublasGemmEx for
//                          gate/up on its rows, one SwiGLU kernel over all rows, one cublasGemmEx
//                          for down. The rows must be gathered into a permuted copy first
//                          (launch_gather_rows); our GEMMs gather in their loads instead.
//                          GroupedExperts: the same two GEMMs as one cublasGemmGroupedBatchedEx
//                          call each (cuBLAS 12.5+; bf16 A/B/C with CUBLAS_COMPUTE_32F is in its
//                          table of supported types).
// And what the benchmark needs around them: seeded bf16 inputs drawn on the device (optionally
// with a common direction that skews the routing), weights drawn the same way, and a comparison
// of two bf16 buffers on the device (the check before the timing).
//
// Layouts as in cuda/expert_gemm.h (row-major, Hugging Face's nn.Linear, K contiguous):
//   xp (rows, C), w_gate_up (E, 2H, C), gate_up (rows, 2H), hidden (rows, H), w_down (E, C, H),
//   out (rows, C). cuBLAS is column-major: a row-major (M, K) matrix is a column-major (K, M) one,
//   so out_e = xp_e W_e^T is computed as out_e^T = W_e xp_e^T: cublasGemmEx(OP_T, OP_N, m = N,
//   n = rows_e, k = K, A = W_e (lda K), B = xp_e (ldb K), C = out_e (ldc N)) — the "TN" GEMM.
//
// A plain C++ header: the tools include it with g++.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/device.h"
#include "cuda/timing.h"
#include "reference/types.h"

namespace moelab::cuda {

// Throws moelab::Error("<what> = <status name>: <description>") unless status is CUBLAS_STATUS_SUCCESS.
void check_cublas(cublasStatus_t status, const char* what);

// A cuBLAS handle with a workspace of its own. cuBLAS must not allocate while a stream is being
// captured into a CUDA graph, so the workspace is given to it up front (cublasSetWorkspace).
class Cublas {
 public:
  Cublas();
  ~Cublas();
  Cublas(const Cublas&) = delete;
  Cublas& operator=(const Cublas&) = delete;
  // The handle, its work going to `stream` from now on.
  cublasHandle_t on(cudaStream_t stream);

 private:
  DeviceBuffer<std::uint8_t> workspace_;  // declared first: freed after the handle
  cublasHandle_t handle_ = nullptr;
};

// A peak rate and the measurement behind it.
struct PeakRate {
  double per_second = 0;  // flop/s (GEMM) or bytes/s (copy: bytes read + bytes written)
  double work = 0;        // flops or bytes of one launch
  Timing timing;          // one launch, median of graph replays
};

// C (n, n) = A (n, n) B (n, n)^T in bf16 with fp32 accumulation, A and B random: 2 n^3 flops.
PeakRate measure_gemm_peak(Cublas& blas, std::int64_t n = 8192, int replays = 30);
// cudaMemcpyAsync of `bytes` from one device buffer to another: 2 bytes of traffic per byte.
PeakRate measure_copy_bandwidth(std::size_t bytes = std::size_t{2} << 30, int replays = 30);

// ---- inputs -------------------------------------------------------------------------------------

// x (T, C) bf16 with x_tc = (z_tc + skew u_c) / sqrt(1 + skew^2): z_tc and u_c ~ U(-sqrt 3, sqrt 3)
// (variance 1) from counter-based hashes of (seed, t C + c) and (direction_seed, c). Every token
// shares the direction u, so the router's logit of expert e gains skew u . w_e / sqrt(1 + skew^2)
// for every token alike: the experts whose router row leans towards u win more often, and the
// routing skews as `skew` grows, whatever the router's weights are. skew = 0: plain random tokens.
// Each element keeps variance 1. Asynchronous on `stream`.
void fill_tokens(Bf16Bits* x, std::int64_t tokens, std::int64_t hidden_size, std::uint64_t seed, float skew,
                 std::uint64_t direction_seed, cudaStream_t stream = nullptr);
// n weights ~ U(-a, a), a = sqrt(3 / fan_in) (standard deviation 1 / sqrt(fan_in)), from a
// counter-based hash of (seed, index). Asynchronous on `stream`.
void fill_uniform(Bf16Bits* w, std::size_t n, Index fan_in, std::uint64_t seed, cudaStream_t stream = nullptr);
void fill_uniform(float* w, std::size_t n, Index fan_in, std::uint64_t seed, cudaStream_t stream = nullptr);

// ---- the check before the timing ------------------------------------------------------------------

struct Bf16Diff {
  double max_abs_diff = 0;  // max |got - ref| over the finite pairs
  double max_abs_ref = 0;   // max |ref|
  double rel_l2 = 0;        // ||got - ref||_2 / ||ref||_2 over the finite pairs (0 if ref is all zero)
  std::int64_t nonfinite = 0;  // pairs where got or ref is NaN or inf
};
// Compares n bf16 values on the device; ref = null compares with zeros (max_abs_diff is then
// max |got|). Synchronous: waits for the device.
Bf16Diff compare_bf16(const Bf16Bits* got, const Bf16Bits* ref, std::size_t n);

// ---- the experts with cuBLAS ----------------------------------------------------------------------

// xp[r] = x[row_token[r]] for r < rows; rows with row_token = -1 become zeros. C a multiple of 8.
void launch_gather_rows(Bf16Bits* xp, const Bf16Bits* x, const std::int32_t* row_token, std::int64_t rows,
                        std::int64_t hidden_size, cudaStream_t stream = nullptr);
// hidden[r, j] = bf16( silu(s_r g) * (s_r u) ), g = gate_up[r, j], u = gate_up[r, H + j] (the gate
// rows of w_gate_up come first), s_r = row_scale[r] or 1 (null). (s x) W^T = s (x W^T), so a gate
// on the expert's input (Llama 4) is applied here, after cuBLAS's GEMM. H a multiple of 8.
void launch_swiglu(Bf16Bits* hidden, const Bf16Bits* gate_up, const float* row_scale, std::int64_t rows,
                   std::int64_t intermediate_size, cudaStream_t stream = nullptr);

// One forward of the experts: rows in expert-major order, expert e's rows are
// [offsets[e], offsets[e + 1]) (known on the host: read back once, outside any timing).
struct ExpertsProblem {
  const Bf16Bits* xp = nullptr;         // (rows, C) the gathered inputs
  const Bf16Bits* w_gate_up = nullptr;  // (E, 2H, C)
  const Bf16Bits* w_down = nullptr;     // (E, C, H)
  const float* row_scale = nullptr;     // (rows) or null: the gate on the expert's input
  Bf16Bits* gate_up = nullptr;          // (rows, 2H) out of the first GEMM, bf16 (as a framework stores it)
  Bf16Bits* hidden = nullptr;           // (rows, H)
  Bf16Bits* out = nullptr;              // (rows, C)
  std::vector<std::int64_t> offsets;    // (E + 1) on the host
  std::int64_t hidden_size = 0;         // C
  std::int64_t intermediate_size = 0;   // H
  int num_experts() const { return static_cast<int>(offsets.size()) - 1; }
  std::int64_t rows() const { return offsets.empty() ? 0 : offsets.back(); }
};
// Throws moelab::Error naming the field unless the problem is consistent (offsets non-decreasing
// from 0, sizes multiples of 8, non-null buffers).
void validate(const ExpertsProblem& p);

// Per expert with rows: cublasGemmEx gate/up; then one launch_swiglu over all rows; then per
// expert cublasGemmEx down. 2 E' + 1 launches for E' experts with rows. Capturable.
void launch_experts_loop(Cublas& blas, const ExpertsProblem& p, cudaStream_t stream = nullptr);

// The same as two grouped GEMMs: one cublasGemmGroupedBatchedEx for gate/up (one group per expert
// with rows), launch_swiglu, one for down. Construction uploads the arrays of matrix pointers
// (synchronously: do it outside a capture); launch() is capturable.
class GroupedExperts {
 public:
  // "" if this build's cuBLAS has cublasGemmGroupedBatchedEx (12.5+), else why not.
  static std::string unsupported();
  explicit GroupedExperts(const ExpertsProblem& p);
  void launch(Cublas& blas, cudaStream_t stream = nullptr) const;

 private:
  // One grouped GEMM's arguments: the per-group arrays live on the host (cuBLAS reads them at the
  // call), the matrix pointers on the device.
  struct Gemm {
    std::vector<cublasOperation_t> trans_a, trans_b;
    std::vector<int> m, n, k, lda, ldb, ldc, group_size;
    std::vector<float> alpha, beta;
    DeviceBuffer<const void*> a, b;
    DeviceBuffer<void*> c;
  };
  void launch_gemm(cublasHandle_t handle, const Gemm& g) const;
  ExpertsProblem problem_;
  Gemm gate_up_, down_;
};

}  // namespace moelab::cuda
