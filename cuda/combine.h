// moelab/cuda/combine.h — the last stage on the GPU: each token's weighted sum of its k expert
// outputs, plus the shared experts, in fp32, written in the output dtype. A ladder in combine.cu.
//
//   y_t = sum_j w_tj out[pair_row[t, j]]  +  sg_t shared_t        (reference: combine_forward,
//                                                                   moelab::moe_layer_forward)
// w_tj = pair_weight[t, j] (the gates, when the gate is on the output) or 1 (null: on the input,
// or already applied by the down GEMM). pair_row = -1 skips the pair (a dropped pair). shared_t is
// the shared experts' output (null: none) and sg_t = sigmoid(x_t . w_sg) for Qwen2-MoE's gated
// shared expert (shared_gate null: 1). Gather by token: no atomics, deterministic.
// Also here: the shared-expert gate's logits, sg_t = sigmoid(x_t . w_sg).
//
// A plain C++ header: the tests and tools include it with g++.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/device.h"
#include "reference/numerics.h"

namespace moelab::cuda {

// 1: one thread per output element. Obvious.
// 2: one thread per 8 consecutive channels: 16-byte loads of bf16 rows, the token's k row indices
//    and weights read once per thread, fp32 sums, one 16-byte (bf16) or 32-byte (fp32) store.
inline constexpr int kCombineVersions = 2;

struct CombineArgs {
  const Bf16Bits* expert_out = nullptr;     // (rows, C)
  const std::int32_t* pair_row = nullptr;   // (T, k)
  const float* pair_weight = nullptr;       // (T, k) or null (= 1)
  const Bf16Bits* shared_out = nullptr;     // (T, C) or null
  const float* shared_gate = nullptr;       // (T) or null (= 1); needs shared_out
  void* y = nullptr;                        // (T, C) out, in y_dtype
  Format y_dtype = Format::bf16;            // bf16 (Bf16Bits) or fp32 (float)
  std::int64_t tokens = 0;                  // T
  std::int64_t hidden_size = 0;             // C, a multiple of 8
  int top_k = 1;                            // k
};

// Checks the arguments (throws moelab::Error naming the field), launches and checks the launch.
void launch_combine(const CombineArgs& args, int version, cudaStream_t stream = nullptr);

// sg_t = sigmoid(sum_c x_tc w_c) in fp32, one warp per token.  x: (T, C) bf16, w: (C) bf16, sg: (T).
void launch_shared_gate(float* sg, const Bf16Bits* x, const Bf16Bits* w, std::int64_t tokens,
                        std::int64_t hidden_size, cudaStream_t stream = nullptr);

}  // namespace moelab::cuda
