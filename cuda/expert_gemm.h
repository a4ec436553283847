// moelab/cuda/expert_gemm.h — the experts as grouped GEMMs in bf16 with fp32 accumulation:
// gate/up with SwiGLU fused into the epilogue, then down. A ladder of versions in expert_gemm.cu
// (versions 1 and 2, every GPU from sm_80) and expert_gemm_sm90.cu (version 3, Hopper only).
//
// For every expert e and each of its rows r in [offsets[e], offsets[e+1]):
//   a_r      = x[row_token[r]]                               (gathered: no permuted copy of x)
//   hidden_r = bf16( silu(s_r a_r Wg_e^T) * (s_r a_r Wu_e^T) ) s_r = row_scale[r], or 1 if null
//   out_r    = bf16( s'_r hidden_r Wd_e^T )                  s'_r = row_scale[r] of DownArgs, or 1
// the same function as moelab::expert_forward (reference/experts.h), swiglu without biases.
// row_scale on the gate/up GEMM is the gate on the expert's input (Llama 4: the expert sees g x;
// (g x) W^T = g (x W^T), so the scale is applied to the fp32 accumulators); on the down GEMM it is
// the gate on the output, applied in the epilogue instead of in the combine.
// Rows with row_token = -1 (padding) are skipped: their hidden and out rows are written as zeros.
// Rows in [offsets[E], rows) are not touched.
//
// Layouts (row-major, all device memory; Hugging Face's nn.Linear layout, K contiguous):
//   x          (T, C)           bf16
//   w_gate_up  (E, 2H, C)       bf16: rows [0, H) of expert e are gate_proj.weight, [H, 2H) up_proj.weight
//   hidden     (rows, H)        bf16
//   w_down     (E, C, H)        bf16: down_proj.weight
//   out        (rows, C)        bf16
// Alignment: C and H multiples of 8 (16-byte rows); pointers from cudaMalloc.
//
// A plain C++ header: the tests and tools include it with g++.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/device.h"

namespace moelab::cuda {

// 1: one thread per output element, fp32 FMA on CUDA cores. Obvious.
// 2: tensor cores through mma.sync (m16n8k16 bf16, fp32 accumulators): tiles in shared memory
//    loaded with cp.async in a 4-stage ring; ldmatrix fragments; SwiGLU in registers; the tile
//    height (16, 64 or 128 rows) picked from rows / num_experts (sm_80+).
// 3: Hopper: wgmma (a warpgroup per 64-row tile, B from shared memory), several pipeline stages
//    (sm_90a only; throws on other devices).
inline constexpr int kExpertGemmVersions = 3;

struct GateUpArgs {
  const Bf16Bits* x = nullptr;            // (T, C)
  const std::int32_t* row_token = nullptr;// (rows) token of each row, -1 = padding; null = row r is x's row r
  const std::int32_t* offsets = nullptr;  // (E + 1) expert e's rows are [offsets[e], offsets[e+1])
  const float* row_scale = nullptr;       // (rows) or null
  const Bf16Bits* w_gate_up = nullptr;    // (E, 2H, C)
  Bf16Bits* hidden = nullptr;             // (rows, H) out
  std::int64_t tokens = 0;                // T
  std::int64_t rows = 0;                  // the buffers' rows (>= offsets[E]); an upper bound is fine
  std::int64_t hidden_size = 0;           // C
  std::int64_t intermediate_size = 0;     // H
  int num_experts = 1;                    // E
};

struct DownArgs {
  const Bf16Bits* hidden = nullptr;       // (rows, H)
  const std::int32_t* row_token = nullptr;// (rows) as GateUpArgs (only -1 matters: padding rows give zeros)
  const std::int32_t* offsets = nullptr;  // (E + 1)
  const float* row_scale = nullptr;       // (rows) or null
  const Bf16Bits* w_down = nullptr;       // (E, C, H)
  Bf16Bits* out = nullptr;                // (rows, C) out
  std::int64_t rows = 0;
  std::int64_t hidden_size = 0;           // C
  std::int64_t intermediate_size = 0;     // H
  int num_experts = 1;
};

// Check the arguments (throw moelab::Error naming the field, the value and the rule; version 3 on
// a device that is not sm_90 included), launch on `stream` and check the launch. Asynchronous; no
// host synchronisation inside (the kernels read offsets on the device), so capturable in a graph.
void launch_gate_up(const GateUpArgs& args, int version, cudaStream_t stream = nullptr);
void launch_down(const DownArgs& args, int version, cudaStream_t stream = nullptr);

}  // namespace moelab::cuda
