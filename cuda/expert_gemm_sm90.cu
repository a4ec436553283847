// moelab/cuda/expert_gemm_sm90.cu — version 3 of the expert grouped GEMMs (expert_gemm.h): Hopper
// tensor cores through wgmma, a warp-specialised pipeline fed by cp.async (gathered rows) and the
// TMA copy engine (weights), a persistent grid that finds its tiles from the device offsets.
//
// What it shows. Versions 1 and 2 (expert_gemm.cu) run on any GPU from sm_80; on an H100 the
// mma.sync of version 2 reaches at most about two thirds of the tensor cores' rate, because one warp
// issues small synchronous MMAs from registers. Hopper's wgmma is issued by a warpgroup (4 warps)
// for a 64 x N x 16 product, reads both operands straight from shared memory through 64-bit matrix
// descriptors and runs asynchronously, so the issuing threads only wait when they need the result.
// Keeping it busy is the whole design:
//
//   warpgroup 0, the producer (40 registers): fills a ring of kStages = 4 shared-memory stages
//     - B (weights, K-major rows of W) by TMA: one thread issues cp.async.bulk.tensor per stage and
//       the copy engine writes it in the 128-byte swizzle, completing bytes on the stage's mbarrier;
//     - A (the expert's rows of x) by cp.async, 16 bytes per thread and instruction, gathered
//       through row_token (row r of the tile is x[row_token[r]]: a TMA box cannot gather), written
//       into the same swizzle by hand (sm90.cuh, swizzle128_offset); padding rows (-1), rows past
//       the expert's end and the K tail are zero-filled (cp.async with 0 source bytes). Each thread
//       waits for its own copies one stage later (cp.async.wait_group 1), fences them into the async
//       proxy (fence.proxy.async) and arrives on the stage's "full" mbarrier.
//   warpgroups 1 and 2, the consumers (232 registers): per stage, four
//     wgmma.mma_async m64n256k16 each (one k16 slice of the 64-wide stage), consumer c on rows
//     64c .. 64c+63 of the tile, all 256 columns: 128 fp32 accumulators per thread. They keep one
//     wgmma group in flight (wait_group 1) and hand the previous stage back on its "empty" mbarrier.
//     A consumer whose 64 rows all lie past the expert's end skips its wgmma (decode shapes, the
//     last m-tile of an expert) but keeps step with the ring.
//
// Tiles. BM = 128 rows x BN = 256 accumulator columns x BK = 64, 48 KB a stage (A 16 KB + B 32 KB),
// 192 KB for the ring. The gate/up GEMM computes hidden columns [n0, n0 + 128): the B tile holds the
// 128 gate rows n0.. of W (rows [0, H) of the expert) then the 128 up rows H + n0.., so that the
// accumulator columns j and j + 128 of the same thread are g and u of the same hidden column
// (sm90.cuh, layout 3: column j + 128 is register i + 64), and SwiGLU happens in registers:
//   h = silu(s g) (s u), s = row_scale (the scale multiplies the input: (s a) W^T = s (a W^T)),
// rounded to bf16 once. The down GEMM computes 256 columns of out: s' (hidden Wd^T).
// Rows past the expert's end and columns past N (H or C; boxes of W that reach into the next
// expert or past the tensor only feed accumulator columns that are not stored) are masked in the
// epilogue, padding rows are written as zeros, rows in [offsets[E], rows) are never touched.
//
// Scheduling without the host. Each block first turns the device offsets into a prefix over the
// experts of their m-tile counts, tiles_e = ceil(count_e / BM) (E <= 1024, in shared memory);
// tile t is then decoded by a binary search over the prefix. The grid is persistent:
// min(multiprocessors, an upper bound on the tiles) blocks, each walking t = blockIdx.x,
// + gridDim.x, ... up to the true count it found on the device, so no block is launched only to
// exit (decode shapes would otherwise spend a wave on empty tiles), and the producer runs into the
// next tile while the consumers still store the last one. Raster order: expert by expert, each
// expert's m-tiles in groups of at most 16, each group walked n-tile by n-tile with its m-tiles
// fastest, so the ~132 tiles running at once share one expert's weight tiles and a few A tiles.
//
// Measured (H100 80GB HBM3, 132 SMs, dense bf16 ~800 TFLOP/s, DRAM ~3.3 TB/s; medians of 20
// launches, the range over two runs on two machines; useful FLOPs 2 * valid rows * C * 2H and
// 2 * valid rows * H * C; routing skewed 1:2:3 over the experts, so the m-tiles at each expert's
// end are partly empty):
//   shape (tokens, top-k)                  gate/up                    down
//   mixtral  C 4096 H 14336 E 8   (4096, 2) 3.42-3.66 ms 526-563 TF/s  1.82-1.86 ms 518-528 TF/s
//   deepseek C 7168 H 2048 E 256  (4096, 8) 8.4-8.6 ms   224-228 TF/s  4.3-4.5 ms   216-222 TF/s
//   qwen3    C 2048 H 768 E 128   (4096, 8) 0.58-0.61 ms 339-354 TF/s  0.33-0.35 ms 297-317 TF/s
//   olmoe    C 2048 H 1024 E 64   (4096, 8) 0.61 ms      452 TF/s      0.34 ms      401-404 TF/s
//   deepseek decode (8, 8)                  1.06-1.19 ms (~60 experts' weights, ~3 TB/s)  0.53-0.57 ms
//   mixtral decode (4, 2)                   0.34-0.55 ms               0.18-0.28 ms
// Mixtral prefill as a whole (2.89 TFLOP): ~540 TFLOP/s, 65-70% of dense.
//
// How it got there (each step measured on mixtral prefill, gate/up): first version, m-tiles
// grouped 8 at a time regardless of experts: 3.70 ms, ncu: DRAM 51% busy, L2 hit rate 64% (the
// groups straddled experts, so two experts' weights competed for L2); expert-aware groups of 16:
// 3.42 ms, DRAM 24%, L2 hit 82%. Skipping the wgmma of empty 64-row halves: mixtral decode gate/up
// 0.51 -> 0.33 ms. Tried and dropped: a 256 x 128 tile (two 64-row blocks per consumer, so that an
// expert of <= 256 rows is one m-tile and its weights are read once): no faster on any prefill
// shape, twice slower on decode (half the weight bytes in flight per stage).
//
// What limits it now. Mixtral: tensor pipes ~60% busy, L2 ~68%; the rest is the gathered A path
// (cp.async through L1) and the epilogue (bf16 pairs stored straight from the fragments, the
// consumers idle meanwhile), and the down GEMM's 1088 tiles are 8.2 waves of 132. DeepSeek
// prefill (~128 rows per expert: one or two m-tiles each): DRAM 86% busy reading 25 GB where the
// weights are 15 GB; most likely the two m-tiles of an expert drift apart in time on the static
// persistent schedule, so the second one's weight reads miss L2 (not yet proven). Next rungs: a dynamic tile counter, or a cluster
// of two CTAs sharing each weight tile by TMA multicast; an smem-staged (TMA store) epilogue.
//
// How to run. The public launch_gate_up / launch_down (expert_gemm.cu) check the arguments and the
// device, then call these for version 3. build/bin/moelab_expert_gemm_bench validates and times
// every version; build/bin/moelab_wgmma_probe checks the layout code alone on one wgmma tile.
#include "cuda/expert_gemm_sm90.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "cuda/sm90.cuh"
#include "reference/error.h"

namespace moelab::cuda::detail {
namespace {

using bf16 = __nv_bfloat16;
using namespace sm90;

constexpr int kBM = 128;                         // rows per tile: two consumer warpgroups x 64
constexpr int kBN = 256;                         // accumulator columns per tile (wgmma N)
constexpr int kBK = sm90::kTileK;                // 64 bf16 = 128 bytes: one swizzled row
constexpr int kStages = 4;
constexpr int kConsumers = 2;                    // consumer warpgroups
constexpr int kThreads = 128 * (1 + kConsumers); // producer warpgroup + consumers
constexpr int kMaxExperts = 1024;
constexpr std::uint32_t kATileBytes = kBM * kBK * 2;  // 16 KB
constexpr std::uint32_t kBTileBytes = kBN * kBK * 2;  // 32 KB, the TMA bytes per stage

struct alignas(1024) Stage {  // 1024-byte aligned: the swizzle's period
  std::uint8_t a[kATileBytes];  // (BM, BK) rows of x or hidden, K-major, swizzled
  std::uint8_t b[kBTileBytes];  // (BN, BK) rows of W, K-major, swizzled
};

struct Shared {
  Stage stage[kStages];
  std::uint64_t full[kStages];    // A and B of the stage have landed (129 arrivals + TMA bytes)
  std::uint64_t empty[kStages];   // the consumers are done reading the stage (8 warp arrivals)
  long long row_src[kBM];         // the current tile's A rows: element offset of the source row, -1 = zeros
  int tile_prefix[kMaxExperts + 1];  // m-tiles of experts [0, e)
};
constexpr std::size_t kSharedBytes = sizeof(Shared) + 1024;  // + room to align the start to 1024

struct Problem {
  const bf16* a = nullptr;            // x (T, C) for gate/up, hidden (rows, H) for down
  const std::int32_t* row_token = nullptr;
  const std::int32_t* offsets = nullptr;
  const float* row_scale = nullptr;
  bf16* out = nullptr;                // hidden (rows, H) or out (rows, C)
  long long k = 0;                    // C for gate/up, H for down: A's row length
  long long n = 0;                    // output columns: H or C
  long long b_rows_per_expert = 0;    // 2H or C
  int num_experts = 1;
  int n_tiles = 0;                    // ceil(n / output columns per tile)
  int k_tiles = 0;                    // ceil(k / BK)
};

#if MOELAB_SM90A

constexpr int kProducerRegisters = 40;   // 128 * 40 + 256 * 232 = 64512 <= 65536 registers
constexpr int kConsumerRegisters = 232;
constexpr int kGroupM = 16;              // at most this many m-tiles per raster group
// 129 arrivals complete a full stage: the 128 producer threads (after their cp.async landed) and
// the TMA thread's expect_tx, whose bytes the copy engine then counts down.
constexpr std::uint32_t kFullArrivals = 128 + 1;
constexpr std::uint32_t kEmptyArrivals = 4 * kConsumers;  // one per consumer warp

// The tile's rows [row_begin, row_end) are rows of expert `expert`; its output columns start at n0.
struct Tile {
  int expert;
  long long row_begin;
  long long row_end;
  int n0;
};

// Tile t in raster order. Expert e owns tiles [prefix[e] n_tiles, prefix[e+1] n_tiles); inside an
// expert, its m_e m-tiles are cut into groups of at most kGroupM (as even as possible), and each
// group is walked n-tile by n-tile, its m-tiles fastest. The ~132 tiles running at once then
// share one expert's weights (each B tile read by up to 16 m-tiles while in L2) and few A tiles.
template <bool kGateUp>
__device__ Tile tile_at(int t, const Shared& s, const Problem& p) {
  constexpr int kOutColumns = kGateUp ? kBN / 2 : kBN;
  const int n_tiles = p.n_tiles;
  // The expert e with prefix[e] <= t / n_tiles < prefix[e + 1] (experts without rows have
  // prefix[e] = prefix[e + 1] and are skipped): invariant prefix[lo] <= q < prefix[hi].
  const int q = t / n_tiles;
  int lo = 0;
  int hi = p.num_experts;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (s.tile_prefix[mid] <= q) lo = mid; else hi = mid;
  }
  const int m_tiles = s.tile_prefix[lo + 1] - s.tile_prefix[lo];
  const int groups = (m_tiles + kGroupM - 1) / kGroupM;
  const int group_size = (m_tiles + groups - 1) / groups;
  const int u = t - s.tile_prefix[lo] * n_tiles;          // [0, m_tiles n_tiles)
  const int group = u / (group_size * n_tiles);
  const int first_m = group * group_size;
  const int group_m = min(m_tiles - first_m, group_size);  // the last group may be smaller
  const int in_group = u - first_m * n_tiles;              // [0, group_m n_tiles)
  const int m = first_m + in_group % group_m;
  const int n = in_group / group_m;
  const long long begin = p.offsets[lo];
  return Tile{lo, begin + static_cast<long long>(m) * kBM, p.offsets[lo + 1], n * kOutColumns};
}

// tile_prefix[e] = sum over experts e' < e of ceil(count_e' / BM); all threads, ends synchronised.
__device__ void compute_tile_prefix(Shared& s, const Problem& p) {
  const int experts = p.num_experts;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    const int count = max(p.offsets[e + 1] - p.offsets[e], 0);
    s.tile_prefix[e + 1] = (count + kBM - 1) / kBM;
  }
  if (threadIdx.x == 0) s.tile_prefix[0] = 0;
  __syncthreads();
  if (threadIdx.x < 32) {  // one warp scans, 32 experts per step
    const int lane = threadIdx.x;
    int carry = 0;
    for (int base = 1; base <= experts; base += 32) {
      const int e = base + lane;
      int v = e <= experts ? s.tile_prefix[e] : 0;
      for (int d = 1; d < 32; d *= 2) {
        const int up = __shfl_up_sync(0xFFFFFFFFu, v, d);
        if (lane >= d) v += up;
      }
      if (e <= experts) s.tile_prefix[e] = carry + v;
      carry += __shfl_sync(0xFFFFFFFFu, v, 31);
    }
  }
  __syncthreads();
}

// Warpgroup 0. Thread `tid` copies 16-byte chunk tid % 8 of rows tid / 8 + 16 i (i = 0..7) of each
// A stage: 8 threads cover one row's 128 bytes, so a warp reads 4 whole 128-byte row segments.
template <bool kGateUp>
__device__ void produce(Shared& s, const CUtensorMap* b_map, const Problem& p, int m_tiles) {
  const int tid = threadIdx.x;
  const int chunk = tid % 8;
  const int first_row = tid / 8;
  const int tiles = m_tiles * p.n_tiles;
  std::uint32_t it = 0;  // stages filled so far, over all tiles: stage it % kStages, round it / kStages
  for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
    const Tile tile = tile_at<kGateUp>(t, s, p);
    named_barrier_sync(1, 128);  // every producer is done reading the previous tile's row_src
    {
      const long long row = tile.row_begin + tid;  // tid < 128 = BM
      long long src = -1;
      if (row < tile.row_end) {
        const long long token = p.row_token != nullptr ? p.row_token[row] : row;
        if (token >= 0) src = (kGateUp ? token : row) * p.k;
      }
      s.row_src[tid] = src;
    }
    named_barrier_sync(1, 128);
    // Gate rows of W start at e * 2H + n0, up rows H further; down rows at e * C + n0.
    const int b_row = static_cast<int>(tile.expert * p.b_rows_per_expert + tile.n0);
    for (int kt = 0; kt < p.k_tiles; ++kt, ++it) {
      const std::uint32_t stage = it % kStages;
      mbar_wait(&s.empty[stage], ((it / kStages) & 1u) ^ 1u);
      Stage& st = s.stage[stage];
      const int k0 = kt * kBK;
      if (tid == 0) {
        mbar_arrive_expect_tx(&s.full[stage], kBTileBytes);
        if constexpr (kGateUp) {
          tma_load_2d(st.b, b_map, &s.full[stage], k0, b_row);                                   // gate
          tma_load_2d(st.b + kBTileBytes / 2, b_map, &s.full[stage], k0, b_row + static_cast<int>(p.n));  // up
        } else {
          tma_load_2d(st.b, b_map, &s.full[stage], k0, b_row);
        }
      }
      const long long k = k0 + chunk * 8;
      const std::uint32_t a_base = smem_addr(st.a);
#pragma unroll
      for (int i = 0; i < kBM / 16; ++i) {
        const int r = first_row + 16 * i;
        const long long src = s.row_src[r];
        const bool ok = src >= 0 && k < p.k;
        cp_async_16(a_base + sm90::swizzle128_offset(r, chunk), ok ? p.a + src + k : p.a, ok ? 16 : 0);
      }
      cp_async_commit();
      if (it > 0) {  // the previous stage's copies have landed: hand it to the consumers
        cp_async_wait<1>();
        fence_proxy_async_shared();
        mbar_arrive(&s.full[(it - 1) % kStages]);
      }
    }
  }
  if (it > 0) {
    cp_async_wait<0>();
    fence_proxy_async_shared();
    mbar_arrive(&s.full[(it - 1) % kStages]);
  }
}

__device__ __forceinline__ float silu(float z) { return z / (1.0f + expf(-z)); }

// The epilogue of consumer warpgroup `cw` (thread t of it): rows 64 cw + 16 (t / 32) + (t % 32) / 4
// and 8 below, columns 8 j + 2 (t % 4) + {0, 1} (sm90.cuh, layout 3), stored as bf16 pairs.
template <bool kGateUp>
__device__ void store_tile(const float (&acc)[128], const Tile& tile, const Problem& p, int cw, int t) {
  constexpr int kColumnBlocks = kGateUp ? 16 : 32;  // blocks of 8 output columns
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const long long row = tile.row_begin + 64 * cw + sm90::wgmma_acc_row(t, 2 * half);
    if (row >= tile.row_end) continue;
    const bool padding = p.row_token != nullptr && p.row_token[row] < 0;
    const float scale = p.row_scale != nullptr ? p.row_scale[row] : 1.0f;
    bf16* out_row = p.out + row * p.n;
#pragma unroll
    for (int j = 0; j < kColumnBlocks; ++j) {
      const int i = 4 * j + 2 * half;  // registers i, i + 1: columns col, col + 1 of this row
      const long long col = tile.n0 + sm90::wgmma_acc_col(t, i);
      if (col >= p.n) continue;  // n is even, so col + 1 < n too
      float v0;
      float v1;
      if constexpr (kGateUp) {  // h = silu(s g) (s u); the up column is 128 further: register + 64
        v0 = silu(scale * acc[i]) * (scale * acc[i + 64]);
        v1 = silu(scale * acc[i + 1]) * (scale * acc[i + 65]);
      } else {
        v0 = scale * acc[i];
        v1 = scale * acc[i + 1];
      }
      if (padding) v0 = v1 = 0.0f;
      *reinterpret_cast<__nv_bfloat162*>(out_row + col) = __floats2bfloat162_rn(v0, v1);
    }
  }
}

// One tile's loop over K for consumer warpgroup `cw`: acc += A[64 cw .., :] B^T, stage by stage;
// `it` counts the stages consumed over all tiles. kMma = false only keeps step with the pipeline:
// for a warpgroup whose 64 rows all lie past the expert's end (an expert's last m-tile, decode
// shapes). Two instantiations rather than an `if` around the wgmma: inside a branch ptxas cannot
// prove the warpgroup converged and serialises every wgmma (C7520).
template <bool kMma>
__device__ void mainloop(Shared& s, const Problem& p, int cw, std::uint32_t& it, float (&acc)[128]) {
  const int lane = threadIdx.x % 32;
  for (int kt = 0; kt < p.k_tiles; ++kt, ++it) {
    const std::uint32_t stage = it % kStages;
    mbar_wait(&s.full[stage], (it / kStages) & 1u);
    if constexpr (kMma) {
      const std::uint32_t a = smem_addr(s.stage[stage].a) + 64 * cw * sm90::kSwizzleRowBytes;
      const std::uint32_t b = smem_addr(s.stage[stage].b);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk)  // k16 slice kk: 32 bytes further into each row
        wgmma_m64n256k16(acc, sm90::smem_desc_sw128(a + 32 * kk), sm90::smem_desc_sw128(b + 32 * kk), 1);
      wgmma_commit();
      wgmma_wait<1>();  // the previous stage's wgmma have finished reading it
      if (kt > 0) {
        __syncwarp();
        if (lane == 0) mbar_arrive(&s.empty[(it - 1) % kStages]);
      }
    } else {
      __syncwarp();
      if (lane == 0) mbar_arrive(&s.empty[stage]);
    }
  }
  if constexpr (kMma) {
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < 128; ++i) fence_operand(acc[i]);
    if (p.k_tiles > 0) {
      __syncwarp();
      if (lane == 0) mbar_arrive(&s.empty[(it - 1) % kStages]);
    }
  }
}

// Warpgroups 1 and 2.
template <bool kGateUp>
__device__ void consume(Shared& s, const Problem& p, int m_tiles) {
  const int cw = threadIdx.x / 128 - 1;  // consumer 0 or 1: tile rows 64 cw ..
  const int tiles = m_tiles * p.n_tiles;
  float acc[128];
  std::uint32_t it = 0;
  for (int tile_index = blockIdx.x; tile_index < tiles; tile_index += gridDim.x) {
    const Tile tile = tile_at<kGateUp>(tile_index, s, p);
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
    if (tile.row_begin + 64 * cw < tile.row_end) {
      mainloop<true>(s, p, cw, it, acc);
      store_tile<kGateUp>(acc, tile, p, cw, threadIdx.x % 128);
    } else {
      mainloop<false>(s, p, cw, it, acc);
    }
  }
}

#endif  // MOELAB_SM90A

template <bool kGateUp>
__global__ void __launch_bounds__(kThreads, 1)
    expert_gemm_kernel3(const __grid_constant__ CUtensorMap b_map, const Problem p) {
#if MOELAB_SM90A
  extern __shared__ std::uint8_t shared_raw[];
  const std::uint32_t misalignment = smem_addr(shared_raw) % 1024;
  Shared& s = *reinterpret_cast<Shared*>(shared_raw + (misalignment == 0 ? 0 : 1024 - misalignment));

  if (threadIdx.x == 0) {
    prefetch_tensor_map(&b_map);
    for (int i = 0; i < kStages; ++i) {
      mbar_init(&s.full[i], kFullArrivals);
      mbar_init(&s.empty[i], kEmptyArrivals);
    }
    fence_mbarrier_init();
    fence_proxy_async_shared();
  }
  compute_tile_prefix(s, p);  // ends with __syncthreads, which also publishes the barriers
  const int m_tiles = s.tile_prefix[p.num_experts];

  if (threadIdx.x < 128) {
    setmaxnreg_dec<kProducerRegisters>();
    produce<kGateUp>(s, &b_map, p, m_tiles);
  } else {
    setmaxnreg_inc<kConsumerRegisters>();
    consume<kGateUp>(s, p, m_tiles);
  }
#endif
}

template <bool kGateUp>
void launch(const CUtensorMap& b_map, const Problem& p, long long rows, cudaStream_t stream, const char* what) {
  if (rows == 0 || p.n == 0 || p.k == 0) return;
  int device = 0;
  int multiprocessors = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute(multiprocessors)");
  // Sum over e of ceil(count_e / BM) <= rows / BM + E.
  const long long m_tiles_bound = (rows + kBM - 1) / kBM + p.num_experts;
  const long long blocks = std::min<long long>(multiprocessors, m_tiles_bound * p.n_tiles);
  const auto kernel = expert_gemm_kernel3<kGateUp>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(kSharedBytes)),
             "cudaFuncSetAttribute(expert_gemm_kernel3, max dynamic shared memory)");
  kernel<<<static_cast<unsigned>(std::max<long long>(blocks, 1)), kThreads, kSharedBytes, stream>>>(b_map, p);
  check_launch(what);
}

// Version 3's own limits, beyond the public checks. `weight_rows` = E * 2H or E * C.
void require_v3_limits(int num_experts, long long weight_rows, const char* weight_rows_name) {
  require(num_experts <= kMaxExperts, "num_experts", num_experts,
          "version 3 handles at most 1024 experts (its tile prefix lives in shared memory)");
  require(weight_rows < (1LL << 31), weight_rows_name, weight_rows,
          "version 3 addresses weight rows with the copy engine's 32-bit coordinates: must be below 2^31");
}

}  // namespace

void launch_gate_up_v3(const GateUpArgs& args, cudaStream_t stream) {
  const long long C = args.hidden_size;
  const long long H = args.intermediate_size;
  require_v3_limits(args.num_experts, args.num_experts * 2 * H, "num_experts * 2 * intermediate_size");
  Problem p;
  p.a = reinterpret_cast<const bf16*>(args.x);
  p.row_token = args.row_token;
  p.offsets = args.offsets;
  p.row_scale = args.row_scale;
  p.out = reinterpret_cast<bf16*>(args.hidden);
  p.k = C;
  p.n = H;
  p.b_rows_per_expert = 2 * H;
  p.num_experts = args.num_experts;
  p.n_tiles = static_cast<int>((H + kBN / 2 - 1) / (kBN / 2));
  p.k_tiles = static_cast<int>((C + kBK - 1) / kBK);
  if (args.rows == 0 || C == 0 || H == 0) return;
  // The gate and the up half are two boxes of BN / 2 rows each.
  const CUtensorMap b_map = sm90::make_tensor_map_bf16(args.w_gate_up, static_cast<std::uint64_t>(args.num_experts) * 2 * H,
                                                       static_cast<std::uint64_t>(C), kBN / 2);
  launch<true>(b_map, p, args.rows, stream, "expert_gemm_kernel3 (gate/up)");
}

void launch_down_v3(const DownArgs& args, cudaStream_t stream) {
  const long long C = args.hidden_size;
  const long long H = args.intermediate_size;
  require_v3_limits(args.num_experts, args.num_experts * C, "num_experts * hidden_size");
  Problem p;
  p.a = reinterpret_cast<const bf16*>(args.hidden);
  p.row_token = args.row_token;
  p.offsets = args.offsets;
  p.row_scale = args.row_scale;
  p.out = reinterpret_cast<bf16*>(args.out);
  p.k = H;
  p.n = C;
  p.b_rows_per_expert = C;
  p.num_experts = args.num_experts;
  p.n_tiles = static_cast<int>((C + kBN - 1) / kBN);
  p.k_tiles = static_cast<int>((H + kBK - 1) / kBK);
  if (args.rows == 0 || C == 0 || H == 0) return;
  const CUtensorMap b_map = sm90::make_tensor_map_bf16(args.w_down, static_cast<std::uint64_t>(args.num_experts) * C,
                                                       static_cast<std::uint64_t>(H), kBN);
  launch<false>(b_map, p, args.rows, stream, "expert_gemm_kernel3 (down)");
}

}  // namespace moelab::cuda::detail
