// moelab/cuda/permute.cu — token-expert pairs into expert-major rows (the dispatch plan), as a ladder.
//
// What it shows. The permutation is a counting sort of the T k pairs by expert:
//   1. histogram    counts[e]      = pairs with ids[t, j] == e
//   2. prefix sum   offsets[e + 1] = offsets[e] + round_up(counts[e], row_align)
//   3. scatter      pair (t, j) -> row offsets[e] + (its rank among the pairs of expert e)
// and the rank is where a GPU version can lose the reference's order: with an atomic cursor per
// expert the rows of an expert come out in whatever order the atomics happened to run, and a
// run-to-run different order means a different summation order downstream. Here every version
// gives the rank in pair order (t, then j), the order of moelab::dispatch_plan, so the plan is the
// reference's bit for bit (row_align = 1) and the same on every run. The ladder:
//   permute_kernel1   one block. All threads build the histogram (shared atomics: a sum, so their
//                     order does not matter) and fill every row with "empty"; then thread 0 scans
//                     and scatters the pairs one after another, exactly as the reference does.
//                     Obvious, 1 launch, and slow for many pairs (one thread walks them all).
//   permute_kernel2   the same plan in parallel, every step stable:
//     small problems (T k <= 2048 pairs; decode): 1 launch, one block. All ids are loaded at
//                     once, each round of 256 pairs ranks its pairs (stable_rank below), ranks
//                     stay in registers, then the block scans and scatters.
//     larger ones:    3 launches. A (histogram): each block ranks its chunk of pairs (stable
//                     ranks within the chunk, written to the workspace) and writes its per-expert
//                     counts; B (scan, one block): counts[e] = sum over blocks, the padded expert
//                     offsets, and each (expert, block)'s first row; C (scatter): one thread per
//                     pair puts it at row = first row of (its expert, its block) + its rank, and
//                     the same threads write the padding and unused rows.
//     These kernels are bound by latency, not bandwidth: each loads all it needs before its
//     first barrier or dependent step (a DRAM round trip is ~1 us; a barrier that waits on one
//     per round of 256 pairs, or per expert, costs more than all the arithmetic).
//     The stable rank of a pair p with expert e in a round of 256 pairs (8 warps) is
//        pairs of e in earlier rounds of the block         (running[e], shared)
//      + pairs of e in earlier warps of this round          (a (warp, expert) table in shared)
//      + pairs of e in lower lanes of this warp             popc(__match_any_sync(e) & lanes below)
//     No atomic decides a position, so the result is deterministic.
// The cost of determinism: the rank needs a warp match and two block barriers per 256 pairs, and
// the large path keeps the ranks in the workspace between kernels A and C (4 bytes written and
// read per pair). An atomic-cursor scatter would skip both, but its rows within an expert would
// come in arbitrary order. The launches (3 for large problems) are the same either way.
// Measured on an H100 (moelab_dispatch_bench, Mixtral / Qwen3 / OLMoE / DeepSeek-V3 shapes): at
// T = 1 kernel 1 takes 2-18 us, kernel 2 2.7-3.0 us (one launch: about the floor of a launch in
// a graph); at T = 128 (k = 8: 1024 pairs) 160-171 us against 5-7 us; at T = 16384 kernel 1 takes
// 5.5-22 ms (one thread walks 131072 pairs).
// Why. Every MoE layer runs this between the router and the expert GEMMs, once per layer and step:
// at decode (T = 1) it is pure latency, at prefill it touches a few MB. Padding each expert's rows
// to the GEMM's tile height (row_align) lets a grouped GEMM tile never straddle two experts.
//
// How to run. build/bin/moelab_dispatch_bench validates every version against moelab::dispatch_plan
// and then times them (µs per call and GB/s, for the shapes of Mixtral, Qwen3-30B-A3B, OLMoE and
// DeepSeek-V3); `moelab_dispatch_bench --iterations=0` only validates. Unit tests:
// tests/cuda/test_permute_device.cpp (test_cuda_permute).
//
// Shapes: T = tokens, k = experts per token, E = experts, N = T k pairs, a = row_align,
// R = permute_max_rows = N + E (a - 1). ids, gates, pair_row (T, k); counts (E); offsets (E + 1);
// row_token, row_gate (R). A pair's flat index p = t k + j is its place in pair order.
#include "cuda/permute.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "reference/error.h"

namespace moelab::cuda {
namespace {

constexpr int kThreads = 256;                            // threads of every kernel but B
constexpr int kWarps = kThreads / 32;                    // the rank table's rows
constexpr int kScanThreads = 1024;                       // kernel B
constexpr int kSmallRounds = 8;                          // rounds of the one-launch path
constexpr int kSmallPairs = kThreads * kSmallRounds;     // 2048: v2 runs in one launch up to here
constexpr int kChunkRounds = 4;                          // rounds loaded at once by kernel A
constexpr int kChunkPairs = kChunkRounds * kThreads;     // pairs per histogram block (at least)
constexpr int kMaxChunks = 1024;                         // histogram blocks (at most)
constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ constexpr int round_up(int n, int a) { return (n + a - 1) / a * a; }

// The expert of a pair, or -1 for an id outside [0, E) (a precondition violation: skipped).
__device__ __forceinline__ int expert_of(std::int32_t id, int num_experts) {
  return static_cast<unsigned>(id) < static_cast<unsigned>(num_experts) ? id : -1;
}

__device__ __forceinline__ void mark_empty(std::int32_t* row_token, float* row_gate, int row) {
  row_token[row] = -1;
  row_gate[row] = 0.0f;
}

// -------------------------------------------------------------------------------------------------
// Building blocks shared by the kernels.

// Rows that hold no pair: expert e's padding [offsets[e] + counts[e], offsets[e + 1]) and the
// unused rows [offsets[E], R). Index i covers padding row i % (a - 1) of expert i / (a - 1), and
// unused row offsets[E] + i; so i in [0, empty_row_span) covers every such row once.
__device__ void fill_empty_row(int i, const std::int32_t* counts, const std::int32_t* offsets,
                               int num_experts, int row_align, int max_rows,
                               std::int32_t* row_token, float* row_gate) {
  if (row_align > 1 && i < num_experts * (row_align - 1)) {
    const int e = i / (row_align - 1);
    const int row = offsets[e] + counts[e] + i % (row_align - 1);
    if (row < offsets[e + 1]) mark_empty(row_token, row_gate, row);
  }
  if (i < max_rows - offsets[num_experts]) mark_empty(row_token, row_gate, offsets[num_experts] + i);
}
__device__ int empty_row_span(int num_experts, int row_align, int max_rows, int used_rows) {
  return max(num_experts * (row_align - 1), max_rows - used_rows);
}

// The stable rank of this thread's pair (expert e, or -1 for none) among the pairs of the block's
// rounds so far with the same expert, in pair order (thread order within a round). Called by every
// thread of a kThreads block, once per round, in round order. running (E): pairs per expert in
// earlier rounds, updated here; warp_counts (kWarps, E): zero on entry and on return.
__device__ int stable_rank(int e, int* running, int* warp_counts, int num_experts) {
  const unsigned lane = threadIdx.x % 32;
  const unsigned warp = threadIdx.x / 32;
  const unsigned same = __match_any_sync(kFullMask, e);   // lanes of this warp with expert e
  const unsigned lower = same & ((1u << lane) - 1u);      // ... below this lane
  const bool leader = lower == 0;                         // the lowest lane speaks for the group
  if (e >= 0 && leader) warp_counts[warp * num_experts + e] = __popc(same);
  __syncthreads();
  int rank = 0;
  if (e >= 0) {
    rank = running[e] + __popc(lower);
    for (unsigned w = 0; w < warp; ++w) rank += warp_counts[w * num_experts + e];
  }
  __syncthreads();
  if (e >= 0 && leader) {
    warp_counts[warp * num_experts + e] = 0;
    atomicAdd(&running[e], __popc(same));  // a sum: the order of the adds does not matter
  }
  __syncwarp();  // the next round's leader of (warp, e) may be another lane
  return rank;
}

// The exclusive prefix sum of one value per thread over the block, in thread order (blockDim a
// multiple of 32, at most 1024); *total = the sum of all. scratch: 33 ints. Every thread must call.
__device__ int block_exclusive_scan(int value, int* scratch, int* total) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int warp = static_cast<int>(threadIdx.x / 32);
  int inclusive = value;  // within the warp
  for (int d = 1; d < 32; d *= 2) {
    const int v = __shfl_up_sync(kFullMask, inclusive, d);
    if (lane >= d) inclusive += v;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {  // scan of the warp totals
    const int warps = static_cast<int>(blockDim.x / 32);
    const int mine = lane < warps ? scratch[lane] : 0;
    int warp_inclusive = mine;
    for (int d = 1; d < 32; d *= 2) {
      const int v = __shfl_up_sync(kFullMask, warp_inclusive, d);
      if (lane >= d) warp_inclusive += v;
    }
    scratch[lane] = warp_inclusive - mine;
    if (lane == 31) scratch[32] = warp_inclusive;
  }
  __syncthreads();
  const int exclusive = scratch[warp] + inclusive - value;
  *total = scratch[32];
  __syncthreads();  // scratch is free again
  return exclusive;
}

// offsets[e] = sum_{e' < e} round_up(counts[e'], a) for e in [0, E], all in shared memory, by the
// whole block: each thread sums a run of experts, a block scan of the runs, each thread writes its
// run. scratch: 33 ints. Starts and ends with a barrier.
__device__ void scan_expert_offsets(int* offsets, const int* counts, int num_experts, int row_align,
                                    int* scratch) {
  __syncthreads();
  const int per_thread = (num_experts + static_cast<int>(blockDim.x) - 1) / static_cast<int>(blockDim.x);
  const int first = min(num_experts, static_cast<int>(threadIdx.x) * per_thread);
  const int last = min(num_experts, first + per_thread);
  int run = 0;
  for (int e = first; e < last; ++e) run += round_up(counts[e], row_align);
  int total = 0;
  int row = block_exclusive_scan(run, scratch, &total);
  for (int e = first; e < last; ++e) {
    offsets[e] = row;
    row += round_up(counts[e], row_align);
  }
  if (threadIdx.x == 0) offsets[num_experts] = total;
  __syncthreads();
}

// -------------------------------------------------------------------------------------------------
// Kernel 1: one block, the reference's loops. Shared: count (E), cursor (E).

__global__ void __launch_bounds__(kThreads)
permute_kernel1(const std::int32_t* ids, const float* gates, int n_pairs, int top_k, int num_experts,
                int row_align, int max_rows, std::int32_t* counts, std::int32_t* offsets,
                std::int32_t* row_token, float* row_gate, std::int32_t* pair_row) {
  extern __shared__ int shared[];
  int* count = shared;                // (E)
  int* cursor = shared + num_experts;  // (E) next free row of each expert
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) count[e] = 0;
  __syncthreads();
  // 1. histogram
  for (int p = threadIdx.x; p < n_pairs; p += blockDim.x) {
    const int e = expert_of(ids[p], num_experts);
    if (e >= 0) atomicAdd(&count[e], 1);
  }
  // Every row starts empty; the scatter below overwrites the rows that get a pair.
  for (int r = threadIdx.x; r < max_rows; r += blockDim.x) mark_empty(row_token, row_gate, r);
  __syncthreads();
  if (threadIdx.x != 0) return;
  // 2. prefix sum (padded)
  int row = 0;
  for (int e = 0; e < num_experts; ++e) {
    counts[e] = count[e];
    offsets[e] = row;
    cursor[e] = row;
    row += round_up(count[e], row_align);
  }
  offsets[num_experts] = row;
  // 3. scatter, in pair order
  for (int p = 0; p < n_pairs; ++p) {
    const int e = expert_of(ids[p], num_experts);
    if (e < 0) {
      pair_row[p] = -1;
      continue;
    }
    const int r = cursor[e]++;
    row_token[r] = p / top_k;
    row_gate[r] = gates[p];
    pair_row[p] = r;
  }
}

// -------------------------------------------------------------------------------------------------
// Kernel 2, small problems (n_pairs <= kSmallPairs): one block, one launch.
// Shared: running (E) = counts at the end, warp_counts (kWarps, E), row_offsets (E + 1).

__global__ void __launch_bounds__(kThreads)
permute_kernel2_small(const std::int32_t* ids, const float* gates, int n_pairs, int top_k,
                      int num_experts, int row_align, int max_rows, std::int32_t* counts,
                      std::int32_t* offsets, std::int32_t* row_token, float* row_gate,
                      std::int32_t* pair_row) {
  extern __shared__ int shared[];
  int* running = shared;                                   // (E)
  int* warp_counts = shared + num_experts;                 // (kWarps, E)
  int* row_offsets = shared + (kWarps + 1) * num_experts;  // (E + 1)
  __shared__ int scratch[33];
  for (int i = threadIdx.x; i < (kWarps + 1) * num_experts; i += kThreads) shared[i] = 0;
  __syncthreads();
  // 1. rank every pair within its expert (and so count them); ranks stay in registers. All ids
  // are loaded first: one memory latency, not one per round (the ranking's barriers would wait).
  int expert[kSmallRounds];
  int rank[kSmallRounds];
#pragma unroll
  for (int round = 0; round < kSmallRounds; ++round) {
    const int p = round * kThreads + static_cast<int>(threadIdx.x);
    expert[round] = p < n_pairs ? expert_of(ids[p], num_experts) : -1;
  }
#pragma unroll
  for (int round = 0; round < kSmallRounds; ++round) {
    rank[round] = 0;
    if (round * kThreads < n_pairs) {  // the same for the whole block: the barriers inside are safe
      rank[round] = stable_rank(expert[round], running, warp_counts, num_experts);
    }
  }
  // 2. prefix sum
  scan_expert_offsets(row_offsets, running, num_experts, row_align, scratch);
  for (int e = threadIdx.x; e < num_experts; e += kThreads) counts[e] = running[e];
  for (int e = threadIdx.x; e <= num_experts; e += kThreads) offsets[e] = row_offsets[e];
  // 3. scatter
#pragma unroll
  for (int round = 0; round < kSmallRounds; ++round) {
    const int p = round * kThreads + static_cast<int>(threadIdx.x);
    if (p >= n_pairs) continue;
    const int e = expert[round];
    if (e < 0) {
      pair_row[p] = -1;
      continue;
    }
    const int r = row_offsets[e] + rank[round];
    row_token[r] = p / top_k;
    row_gate[r] = gates[p];
    pair_row[p] = r;
  }
  const int span = empty_row_span(num_experts, row_align, max_rows, row_offsets[num_experts]);
  for (int i = threadIdx.x; i < span; i += kThreads) {
    fill_empty_row(i, running, row_offsets, num_experts, row_align, max_rows, row_token, row_gate);
  }
}

// -------------------------------------------------------------------------------------------------
// Kernel 2, larger problems: A (histogram and ranks), B (scan), C (scatter).
// Workspace: block_rows (blocks, E) int32: per (block, expert) count, then (after B) first row;
//            local_rank (N) int32: each pair's rank within (its block's chunk, its expert).

// A: block b ranks the pairs [b chunk, (b + 1) chunk). Shared: running (E), warp_counts (kWarps, E).
__global__ void __launch_bounds__(kThreads)
permute_kernel2_histogram(const std::int32_t* ids, int n_pairs, int num_experts, int chunk,
                          std::int32_t* block_rows, std::int32_t* local_rank) {
  extern __shared__ int shared[];
  int* running = shared;                    // (E)
  int* warp_counts = shared + num_experts;  // (kWarps, E)
  for (int i = threadIdx.x; i < (kWarps + 1) * num_experts; i += kThreads) shared[i] = 0;
  __syncthreads();
  const std::int64_t begin = std::int64_t{blockIdx.x} * chunk;
  // Groups of kChunkRounds rounds (chunk is a multiple), each group's ids loaded before its
  // ranking. The loop bounds are the same for the whole block: the barriers inside are safe.
  for (std::int64_t group = begin; group < begin + chunk && group < n_pairs; group += kChunkPairs) {
    int expert[kChunkRounds];
#pragma unroll
    for (int round = 0; round < kChunkRounds; ++round) {
      const std::int64_t p = group + round * kThreads + threadIdx.x;
      expert[round] = p < n_pairs ? expert_of(ids[p], num_experts) : -1;
    }
#pragma unroll
    for (int round = 0; round < kChunkRounds; ++round) {
      if (group + round * kThreads >= n_pairs) break;
      const int rank = stable_rank(expert[round], running, warp_counts, num_experts);
      if (expert[round] >= 0) local_rank[group + round * kThreads + threadIdx.x] = rank;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += kThreads) {
    block_rows[static_cast<int>(blockIdx.x) * num_experts + e] = running[e];
  }
}

// B: one block of kScanThreads. The (blocks, E) table is cut into S slices of consecutive blocks
// (S a power of two, at most 32, S E <= kScanThreads); thread t = s E + e sums expert e's counts in
// slice s: neighbouring threads read neighbouring experts (coalesced), kBatch loads in flight.
// Then each expert's S slice sums are scanned by S lanes of one warp (read back transposed from
// shared memory), which gives counts[e] and where each slice starts within its expert; the expert
// offsets follow; pass 2 rewrites each slice with its first rows.
// Shared: count (E), row_offsets (E + 1), slice (S, E).
constexpr int kBatch = 8;

__device__ int slices_for(int num_experts) {
  int slices = 1;
  while (slices < 32 && 2 * slices * num_experts <= kScanThreads) slices *= 2;
  return slices;
}

__global__ void __launch_bounds__(kScanThreads)
permute_kernel2_scan(std::int32_t* block_rows, int num_experts, int blocks, int row_align,
                     std::int32_t* counts, std::int32_t* offsets) {
  extern __shared__ int shared[];
  int* count = shared;                         // (E)
  int* row_offsets = shared + num_experts;     // (E + 1)
  int* slice = shared + 2 * num_experts + 1;   // (S, E)
  __shared__ int scratch[33];
  const int t = static_cast<int>(threadIdx.x);
  const int slices = slices_for(num_experts);
  const int length = (blocks + slices - 1) / slices;
  const bool active = t < slices * num_experts;
  const int e = t % num_experts;
  const int b_begin = min(blocks, (t / num_experts) * length);
  const int b_end = min(blocks, b_begin + length);
  // Pass 1: the slice's sum.
  int sum = 0;
  if (active) {
    for (int b0 = b_begin; b0 < b_end; b0 += kBatch) {
#pragma unroll
      for (int q = 0; q < kBatch; ++q) sum += b0 + q < b_end ? block_rows[(b0 + q) * num_experts + e] : 0;
    }
    slice[t] = sum;
  }
  __syncthreads();
  {  // Thread u = e' S + s' scans slice (s', e') among expert e''s S slices: S lanes of one warp.
    const int expert = t / slices;
    const int part = t % slices;  // = lane % S: the S lanes of an expert are one shuffle segment
    const int v = active ? slice[part * num_experts + expert] : 0;
    int inclusive = v;
    for (int d = 1; d < slices; d *= 2) {
      const int w = __shfl_up_sync(kFullMask, inclusive, d, slices);
      if (part >= d) inclusive += w;
    }
    __syncthreads();  // every read of slice[] before the writes
    if (active) {
      slice[part * num_experts + expert] = inclusive - v;  // where the slice starts in its expert
      if (part == slices - 1) count[expert] = inclusive;
    }
  }
  scan_expert_offsets(row_offsets, count, num_experts, row_align, scratch);
  for (int x = t; x < num_experts; x += kScanThreads) counts[x] = count[x];
  for (int x = t; x <= num_experts; x += kScanThreads) offsets[x] = row_offsets[x];
  // Pass 2: block_rows[b, e] = row_offsets[e] + sum_{b' < b} block_rows[b', e], slice by slice.
  if (!active) return;
  int next = row_offsets[e] + slice[t];
  for (int b0 = b_begin; b0 < b_end; b0 += kBatch) {
    int n[kBatch];
#pragma unroll
    for (int q = 0; q < kBatch; ++q) n[q] = b0 + q < b_end ? block_rows[(b0 + q) * num_experts + e] : 0;
#pragma unroll
    for (int q = 0; q < kBatch; ++q) {
      if (b0 + q < b_end) block_rows[(b0 + q) * num_experts + e] = next;
      next += n[q];
    }
  }
}

// C: thread i places pair i (if i < N) and empty row i (fill_empty_row). Grid: R threads (R >= N
// and R >= empty_row_span).
__global__ void __launch_bounds__(kThreads)
permute_kernel2_scatter(const std::int32_t* ids, const float* gates, int n_pairs, int top_k,
                        int num_experts, int row_align, int max_rows, int chunk,
                        const std::int32_t* block_rows, const std::int32_t* local_rank,
                        const std::int32_t* counts, const std::int32_t* offsets,
                        std::int32_t* row_token, float* row_gate, std::int32_t* pair_row) {
  const std::int64_t index = std::int64_t{blockIdx.x} * kThreads + threadIdx.x;
  if (index >= max_rows) return;
  const int i = static_cast<int>(index);
  if (i < n_pairs) {
    const int e = expert_of(ids[i], num_experts);
    if (e < 0) {
      pair_row[i] = -1;
    } else {
      const int r = block_rows[(i / chunk) * num_experts + e] + local_rank[i];
      row_token[r] = i / top_k;
      row_gate[r] = gates[i];
      pair_row[i] = r;
    }
  }
  fill_empty_row(i, counts, offsets, num_experts, row_align, max_rows, row_token, row_gate);
}

// -------------------------------------------------------------------------------------------------
// Host side.

// The histogram blocks of the large path: chunks of kChunkPairs pairs, grown (by whole multiples)
// so that there are at most kMaxChunks of them.
struct Chunking {
  int chunk = 0;
  int blocks = 0;
};
Chunking chunking(std::int64_t n_pairs) {
  const std::int64_t per_block = kChunkPairs * std::int64_t{kMaxChunks};
  const std::int64_t multiple = std::max<std::int64_t>(1, (n_pairs + per_block - 1) / per_block);
  const std::int64_t chunk = kChunkPairs * multiple;
  return {static_cast<int>(chunk), static_cast<int>((n_pairs + chunk - 1) / chunk)};
}

void check_sizes(std::int64_t tokens, int top_k, int num_experts, int row_align) {
  require(tokens >= 0, "tokens", tokens, "must be >= 0");
  require(top_k >= 1, "top_k", top_k, "must be >= 1");
  require(num_experts >= 1 && num_experts <= kPermuteMaxExperts, "num_experts", num_experts,
          fmt::format("must be in [1, {}]", kPermuteMaxExperts));
  require(row_align >= 1, "row_align", row_align, "must be >= 1 (1 = no padding)");
  constexpr std::int64_t int_max = std::numeric_limits<std::int32_t>::max();
  require(tokens <= int_max / top_k, "tokens * top_k", fmt::format("{} * {}", tokens, top_k),
          "must be below 2^31 (pairs and rows are numbered in int32)");
  const std::int64_t rows = tokens * top_k + std::int64_t{num_experts} * (row_align - 1);
  require(rows <= int_max, "permute_max_rows",
          fmt::format("{} * {} + {} * ({} - 1) = {}", tokens, top_k, num_experts, row_align, rows),
          "must be below 2^31 (rows are numbered in int32)");
}

void check_version(int version) {
  require(version >= 1 && version <= kPermuteVersions, "version", version,
          fmt::format("must be in [1, {}]", kPermuteVersions));
}

// Bytes of kernel 2's workspace: block_rows (blocks, E) + local_rank (N), or 0 on the small path.
// An upper bound that grows with N (blocks <= ceil(N / kChunkPairs)), so that a workspace sized for
// the largest T serves every smaller one.
std::size_t workspace_bytes_v2(std::int64_t n_pairs, int num_experts) {
  if (n_pairs <= kSmallPairs) return 0;
  const std::int64_t blocks =
      std::min<std::int64_t>((n_pairs + kChunkPairs - 1) / kChunkPairs, kMaxChunks);
  return static_cast<std::size_t>(num_experts * blocks + n_pairs) * sizeof(std::int32_t);
}

std::size_t ints_bytes(std::int64_t n) { return static_cast<std::size_t>(n) * sizeof(int); }

void launch_v1(const PermuteArgs& a, int n_pairs, int max_rows, cudaStream_t stream) {
  permute_kernel1<<<1, kThreads, ints_bytes(2 * a.num_experts), stream>>>(
      a.ids, a.gates, n_pairs, a.top_k, a.num_experts, a.row_align, max_rows, a.counts, a.offsets,
      a.row_token, a.row_gate, a.pair_row);
  check_launch("permute_kernel1");
}

void launch_v2(const PermuteArgs& a, int n_pairs, int max_rows, cudaStream_t stream) {
  const int E = a.num_experts;
  if (n_pairs <= kSmallPairs) {
    permute_kernel2_small<<<1, kThreads, ints_bytes((kWarps + 2) * E + 1), stream>>>(
        a.ids, a.gates, n_pairs, a.top_k, E, a.row_align, max_rows, a.counts, a.offsets,
        a.row_token, a.row_gate, a.pair_row);
    check_launch("permute_kernel2_small");
    return;
  }
  const Chunking c = chunking(n_pairs);
  auto* block_rows = static_cast<std::int32_t*>(a.workspace);
  std::int32_t* local_rank = block_rows + std::int64_t{E} * c.blocks;
  permute_kernel2_histogram<<<c.blocks, kThreads, ints_bytes((kWarps + 1) * E), stream>>>(
      a.ids, n_pairs, E, c.chunk, block_rows, local_rank);
  check_launch("permute_kernel2_histogram");
  permute_kernel2_scan<<<1, kScanThreads, ints_bytes(2 * E + 1 + kScanThreads + 1), stream>>>(
      block_rows, E, c.blocks, a.row_align, a.counts, a.offsets);
  check_launch("permute_kernel2_scan");
  const int grid = static_cast<int>((std::int64_t{max_rows} + kThreads - 1) / kThreads);
  permute_kernel2_scatter<<<grid, kThreads, 0, stream>>>(
      a.ids, a.gates, n_pairs, a.top_k, E, a.row_align, max_rows, c.chunk, block_rows,
      local_rank, a.counts, a.offsets, a.row_token, a.row_gate, a.pair_row);
  check_launch("permute_kernel2_scatter");
}

}  // namespace

std::int64_t permute_max_rows(std::int64_t tokens, int top_k, int num_experts, int row_align) {
  check_sizes(tokens, top_k, num_experts, row_align);
  return tokens * top_k + std::int64_t{num_experts} * (row_align - 1);
}

std::size_t permute_workspace_bytes(std::int64_t tokens, int top_k, int num_experts, int version) {
  check_version(version);
  check_sizes(tokens, top_k, num_experts, 1);
  return version == 2 ? workspace_bytes_v2(tokens * top_k, num_experts) : 0;
}

void launch_permute(const PermuteArgs& args, int version, cudaStream_t stream) {
  check_version(version);
  const std::int64_t max_rows =
      permute_max_rows(args.tokens, args.top_k, args.num_experts, args.row_align);
  const std::int64_t n_pairs = args.tokens * args.top_k;
  require(args.counts != nullptr, "counts", "null", "must point to num_experts int32 on the device");
  require(args.offsets != nullptr, "offsets", "null",
          "must point to num_experts + 1 int32 on the device");
  if (n_pairs > 0) {
    require(args.ids != nullptr, "ids", "null", "must point to (tokens, top_k) int32 on the device");
    require(args.gates != nullptr, "gates", "null",
            "must point to (tokens, top_k) floats on the device");
    require(args.pair_row != nullptr, "pair_row", "null",
            "must point to (tokens, top_k) int32 on the device");
  }
  if (max_rows > 0) {
    require(args.row_token != nullptr, "row_token", "null",
            fmt::format("must point to permute_max_rows = {} int32 on the device", max_rows));
    require(args.row_gate != nullptr, "row_gate", "null",
            fmt::format("must point to permute_max_rows = {} floats on the device", max_rows));
  }
  const std::size_t workspace = permute_workspace_bytes(args.tokens, args.top_k, args.num_experts, version);
  require(workspace == 0 || args.workspace != nullptr, "workspace", "null",
          fmt::format("must point to permute_workspace_bytes = {} bytes on the device", workspace));
  if (version == 1) {
    launch_v1(args, static_cast<int>(n_pairs), static_cast<int>(max_rows), stream);
  } else {
    launch_v2(args, static_cast<int>(n_pairs), static_cast<int>(max_rows), stream);
  }
}

}  // namespace moelab::cuda
