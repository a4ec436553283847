// moelab/cuda/permute.h — token-expert pairs into expert-major rows on the GPU: per-expert
// histogram, prefix sum, scatter. A ladder of versions in permute.cu.
//
// The same plan as moelab::dispatch_plan (reference/dispatch.h) with every pair kept (dropless):
// expert e's rows are [offsets[e], offsets[e] + counts[e]) and within an expert the rows are in
// pair order (token t, then slot j): deterministic, identical to the reference, at every version.
// Optionally each expert's block of rows is padded to a multiple of row_align (the GEMM's tile
// height), so that no GEMM tile straddles two experts; padding rows have row_token = -1.
//
// A plain C++ header: the tests and tools include it with g++.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda/device.h"

namespace moelab::cuda {

// 1: one thread block does everything in order (one thread scans and scatters). Obvious. 1 launch.
// 2: a parallel histogram per block, a scan over (expert, block), and a stable scatter in which
//    each pair finds its rank among the earlier pairs of its block with the same expert.
//    1 launch up to T k = 2048 pairs (decode), 3 launches above.
inline constexpr int kPermuteVersions = 2;
// The most experts the kernels take (their per-expert tables live in shared memory).
inline constexpr int kPermuteMaxExperts = 1024;

// The rows the buffers must hold: T k + E (row_align - 1). (Positive even for T = 0 when
// row_align > 1: those rows are all padding, row_token -1.) Throws moelab::Error on bad sizes.
std::int64_t permute_max_rows(std::int64_t tokens, int top_k, int num_experts, int row_align);
// Scratch bytes launch_permute needs for this problem and version (may be 0). It never decreases
// as tokens grows, so a workspace sized for the largest T serves every smaller T.
std::size_t permute_workspace_bytes(std::int64_t tokens, int top_k, int num_experts, int version);

struct PermuteArgs {
  const std::int32_t* ids = nullptr;  // (T, k) device, expert ids in [0, E) (out-of-range ids are a
                                      // precondition violation: the kernels skip them, never write out of bounds)
  const float* gates = nullptr;       // (T, k) device
  std::int64_t tokens = 0;            // T
  int top_k = 1;                      // k
  int num_experts = 1;                // E, in [1, kPermuteMaxExperts]
  int row_align = 1;                  // >= 1; 1 = no padding
  // Outputs, all device. Every element of every output is written (padding included).
  std::int32_t* counts = nullptr;     // (E) pairs per expert
  std::int32_t* offsets = nullptr;    // (E + 1) first row of each expert; offsets[E] = rows used
  std::int32_t* row_token = nullptr;  // (permute_max_rows) token of each row; -1 for padding and unused rows
  float* row_gate = nullptr;          // (permute_max_rows) gate of each row; 0 for padding and unused rows
  std::int32_t* pair_row = nullptr;   // (T, k) the row of pair (t, j)
  void* workspace = nullptr;          // permute_workspace_bytes(...) bytes, or null if that is 0
};

// Checks the arguments (throws moelab::Error naming the field), launches version `version` on
// `stream` and checks the launch. Asynchronous; capturable in a CUDA graph.
void launch_permute(const PermuteArgs& args, int version, cudaStream_t stream = nullptr);

}  // namespace moelab::cuda
