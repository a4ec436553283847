// moelab/cuda/expert_gemm.cu — the experts as grouped GEMMs (bf16 in, fp32 accumulation, bf16
// out): gate/up with SwiGLU fused into the epilogue, then down. Versions 1 and 2 and the
// dispatcher; version 3 (Hopper wgmma) is in expert_gemm_sm90.cu.
//
// What it shows. After permutation every expert e owns a block of rows [offsets[e], offsets[e+1])
// and the MoE layer's work is E independent GEMMs of different heights, run in one launch
// ("grouped GEMM"): per row r of expert e
//   hidden_r = bf16( silu(s_r g_r) * (s_r u_r) ),  g_r = x_t Wg_e^T,  u_r = x_t Wu_e^T,  t = row_token[r]
//   out_r    = bf16( s'_r hidden_r Wd_e^T )
// (cuda/expert_gemm.h has the contract; moelab::expert_forward, reference/experts.h, the maths.)
// Three things make it more than a GEMM: the A rows are gathered through row_token (no permuted
// copy of x is ever written); the tiles must not straddle two experts, whose row counts only the
// device knows (a launch cannot wait for the host to read them); and gate and up are two GEMMs
// whose results meet elementwise, so one block computes both and applies SwiGLU in registers.
//
// The ladder:
//   kernel 1 (expert_gemm_kernel1): one thread per output element. Block = one row, 256 columns;
//     each thread finds its expert by binary search on offsets, then runs the dot product(s) over
//     K (C for gate/up, two of them; H for down) in fp32 FMAs on the CUDA cores, SwiGLU, rounds.
//     Obvious and slow: every weight element is re-read from L1/L2 for every row, and a warp's 32
//     threads read 32 different weight rows (no coalescing).
//   kernel 2 (expert_gemm_kernel2): tensor cores through mma.sync.m16n8k16 (bf16 x bf16 + fp32),
//     every GPU from sm_80. A block computes a BM x BN tile; both operands are K-major (A = the
//     gathered rows, row-major; B = weight rows, nn.Linear's (out, in) layout is exactly mma's
//     "col" operand), so ldmatrix (no .trans) loads the fragments. Tiles go global -> shared
//     memory by cp.async (16 bytes, .cg: around L1) in a STAGES-deep ring, so the copies of tile
//     k + STAGES - 1 run while tile k is multiplied. Shared rows are padded by 16 bytes: the 8
//     row addresses of one ldmatrix phase then fall in 8 different 16-byte bank groups (no
//     conflicts). Gathering is free: the cp.async source of A's row i is x + row_token[r] C;
//     padding rows, rows past the expert's end and the K tail are zero-filled by cp.async with
//     src-size 0. For gate/up the B tile holds BN/2 gate rows and the BN/2 matching up rows, and
//     each warp owns the same columns of both, so SwiGLU is elementwise on its accumulators. The
//     epilogue stages the bf16 tile in shared memory and writes 16-byte coalesced rows.
//     Scheduling without the host: the grid has an upper bound of m-tiles,
//       M_tiles = floor((rows + min(E, rows) (BM - 1)) / BM) >= sum_e ceil(count_e / BM),
//     times the n-tiles; each block scans ceil(count_e / BM) over the experts (offsets read on
//     the device, a block-wide prefix sum) to learn which (expert, m-tile) it is, and blocks past
//     the total exit at once. Blocks are numbered in groups of 8 m-tiles, m fastest within a
//     group, so that the blocks resident together share weight and activation tiles in L2.
//     Three tile shapes, picked by the dispatcher from the mean rows per expert (rows / E, which
//     the host knows): BM = 16 for decode (1-24 rows per expert: the kernel is a stream over the
//     weights, and a taller tile would multiply mostly zeros), 64, and 128 for prefill.
//   kernel 3: Hopper wgmma (expert_gemm_sm90.cu, which explains itself).
//
// Why. In an MoE layer the expert GEMMs are almost all of the flops (3 C H multiply-adds per
// token and expert, against C E for the router) and, at decode, all of the bytes (every touched
// expert's weights are read once for a handful of rows).
//
// Predicted speed, Mixtral (C 4096, H 14336, E 8, k 2) at T = 4096 tokens on an H100 SXM (about
// 3.0 TB/s and, through cuBLAS, 800 bf16 TFLOP/s measured):
//   flops  = 2 T k 3 C H = 2.89e12;   bytes >= weights 3 E C H 2 = 2.82e9 + activations ~0.4e9.
//   Roofline: max(3.2e9 B / 3.0e12 B/s = 1.1 ms, 2.89e12 / 8e14 = 3.6 ms) = 3.6 ms: compute bound.
//   At decode (T = 1) the 2 experts touched are 0.70e9 bytes: 0.23 ms, bandwidth bound.
//   kernel 1: fp32 FMA on CUDA cores (67 TFLOP/s peak), but each FMA needs two loads from L1/L2
//     (nothing is reused from registers): predicted a few TFLOP/s, so about 1 s.
//     Measured (H100): 0.2-0.5 TFLOP/s, so about 7 s (the bench skips it); T = 1: 3.2 ms (7% of
//     the roofline: a warp's 32 threads read 32 weight rows, 2 bytes from each).
//   kernel 2: mma.sync reaches about 60-70% of the H100's dense bf16 peak in the best hand-written
//     kernels (wgmma is needed for the rest); predicted 300-450 TFLOP/s for this simple tile,
//     7-10 ms. Measured: 13 ms, 220 TFLOP/s (28% of the roofline; 200-225 TFLOP/s at every
//     prefill shape). At decode: T = 1 in 0.30 ms (78% of the roofline, 2.3 TB/s), T = 128 in
//     1.6 ms (58%); Qwen3-30B-A3B T = 128 in 0.46 ms (88%).
//   kernel 3: wgmma, asynchronous and twice mma.sync's rate per SM: measured 5.6 ms, 515 TFLOP/s.
// The bench (cuda/bench/expert_gemm_bench.cu) prints the measured numbers next to the roofline.
//
// How to run. build/bin/moelab_expert_gemm_bench validates every version against the reference,
// then times them for the shapes of Mixtral, DeepSeek-V3, Qwen3-30B-A3B and OLMoE
// (`--iterations=0` only validates). tests/cuda/test_expert_gemm_device.cpp (test_cuda_expert_gemm)
// checks every version on routed problems against moelab::expert_forward in double.
//
// Shapes (cuda/expert_gemm.h): x (T, C), w_gate_up (E, 2H, C), hidden (rows, H), w_down (E, C, H),
// out (rows, C), offsets (E + 1), row_token and row_scale (rows). K = the reduction (C for gate/up,
// H for down), N = the output columns (H for gate/up, C for down).
#include "cuda/expert_gemm.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cuda/expert_gemm_sm90.h"
#include "reference/error.h"

namespace moelab::cuda {
namespace {

using bf16 = __nv_bfloat16;

// The problem as both GEMMs see it: out = epilogue(A[rows] W_e^T), each row r of expert e.
struct Problem {
  const bf16* a = nullptr;                // gate/up: x (T, K = C), gathered; down: hidden (rows, K = H)
  const std::int32_t* row_token = nullptr;// (rows) or null (row r is A's row r)
  const std::int32_t* offsets = nullptr;  // (E + 1)
  const float* row_scale = nullptr;       // (rows) or null
  const bf16* w = nullptr;                // (E, W_rows, K): gate/up W_rows = 2N, down W_rows = N
  bf16* out = nullptr;                    // (rows, N)
  std::int64_t a_rows = 0;                // gate/up: T (tokens beyond are treated as padding)
  std::int64_t rows = 0;
  int K = 0;
  int N = 0;
  int E = 1;
  int m_tiles = 0;                        // kernel 2: the grid is m_tiles * n_tiles blocks
  int n_tiles = 0;
};

// Per-row codes in kernel 2's shared memory: a source row index >= 0, or one of these.
constexpr int kRowPadding = -1;  // row_token = -1: zero inputs, written as zeros
constexpr int kRowOutside = -2;  // past the expert's rows (another expert's, or past offsets[E])

// The row of A that row r reads, or kRowPadding. Gate/up gathers x's row row_token[r] (a token
// outside [0, T) is treated as padding: never read out of bounds); down reads hidden's row r.
template <bool kGateUp>
__device__ __forceinline__ std::int64_t source_row(const Problem& p, std::int64_t r) {
  const std::int64_t t = p.row_token != nullptr ? p.row_token[r] : r;
  if (t < 0) return kRowPadding;
  if constexpr (kGateUp) return t < p.a_rows ? t : kRowPadding;
  return r;
}

// silu(z) = z sigmoid(z) (Shazeer 2020). For z -> -inf, exp(-z) -> inf and the quotient -> -0.
__device__ __forceinline__ float silu(float z) { return z / (1.0f + __expf(-z)); }

// -------------------------------------------------------------------------------------------------
// Kernel 1: one thread per output element.

// The expert of row r: the largest e with offsets[e] <= r, given offsets[0] <= r < offsets[E]
// (binary search for the first offsets[i] > r, i in [0, E]).
__device__ __forceinline__ int find_expert(const std::int32_t* offsets, int E, std::int64_t r) {
  int lo = 0;
  int hi = E + 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (offsets[mid] > r) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo - 1;
}

// Block (blockIdx.x = row r, blockIdx.y = a group of 256 columns), thread = column n.
template <bool kGateUp>
__global__ void expert_gemm_kernel1(Problem p) {
  const std::int64_t r = blockIdx.x;
  const std::int64_t n = std::int64_t{blockIdx.y} * blockDim.x + threadIdx.x;
  if (n >= p.N || r >= p.rows || r >= p.offsets[p.E]) return;  // rows >= offsets[E]: untouched
  const int e = find_expert(p.offsets, p.E, r);
  if (e < 0) return;  // r < offsets[0]: belongs to no expert
  bf16* out = p.out + r * p.N + n;
  const std::int64_t src = source_row<kGateUp>(p, r);
  if (src < 0) {
    *out = __float2bfloat16_rn(0.0f);
    return;
  }
  const float s = p.row_scale != nullptr ? p.row_scale[r] : 1.0f;
  const bf16* a = p.a + src * p.K;
  const std::int64_t w_rows = kGateUp ? 2 * std::int64_t{p.N} : p.N;
  const bf16* w = p.w + (e * w_rows + n) * p.K;
  if constexpr (kGateUp) {
    const bf16* w_up = w + std::int64_t{p.N} * p.K;  // up_proj row n is row H + n
    float g = 0.0f;
    float u = 0.0f;
    for (int c = 0; c < p.K; ++c) {
      const float xc = __bfloat162float(a[c]);
      g = fmaf(xc, __bfloat162float(w[c]), g);
      u = fmaf(xc, __bfloat162float(w_up[c]), u);
    }
    *out = __float2bfloat16_rn(silu(s * g) * (s * u));
  } else {
    float y = 0.0f;
    for (int h = 0; h < p.K; ++h) y = fmaf(__bfloat162float(a[h]), __bfloat162float(w[h]), y);
    *out = __float2bfloat16_rn(s * y);
  }
}

// -------------------------------------------------------------------------------------------------
// Kernel 2: tensor cores (mma.sync), cp.async pipeline, tile scheduling on the device.

// A tile shape: BM rows x BN weight rows x BK, WARPS_M x WARPS_N warps each computing a
// (BM / WARPS_M) x (BN / WARPS_N) part as MT x NT mma tiles of 16 x 8, STAGES buffers in flight.
// For gate/up the BN weight rows are BN/2 gate rows and the BN/2 up rows of the same columns.
template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_;
  static constexpr int kWarpsM = WARPS_M_, kWarpsN = WARPS_N_, kStages = STAGES_;
  static constexpr int kMinBlocks = MIN_BLOCKS_;  // __launch_bounds__: blocks per SM to fit
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int WTM = BM / kWarpsM, WTN = BN / kWarpsN;  // a warp's part
  static constexpr int MT = WTM / 16, NT = WTN / 8;             // its mma tiles
  // Shared rows of BK + 8 elements: a row is 16 bytes longer than the data, so consecutive rows
  // start 16 bytes further along the 128-byte bank window and ldmatrix's 8 row reads never
  // collide (BK = 32: 80-byte rows; BK = 64: 144-byte rows; both multiples of 16 for cp.async).
  static constexpr int kStride = BK + 8;
  static constexpr int kStageElems = (BM + BN) * kStride;
  static constexpr int kChunks = BK / 8;  // 16-byte chunks per tile row
  static_assert(BM % (16 * kWarpsM) == 0 && BN % (8 * kWarpsN) == 0 && BK % 16 == 0);
  static_assert(NT % 2 == 0, "B fragments are loaded in pairs of n8 tiles (ldmatrix.x4)");
};

// Decode: 1-24 rows per expert; the weights are streamed once, so a short tile wastes little.
using TileSmall = Tile<16, 64, 64, 1, 4, 4, 4>;
// Tens of rows per expert.
using TileMedium = Tile<64, 128, 32, 2, 2, 4, 3>;
// Prefill: the classic 128 x 128 x 32 with 8 warps of 64 x 32. (4 warps of 64 x 64, which load
// fewer fragments per mma, measured no faster on an H100: 199-215 against 215-225 TFLOP/s.)
using TileLarge = Tile<128, 128, 32, 2, 4, 4, 2>;

// Output columns of one block: gate/up writes BN/2 hidden columns (gate and up of each).
template <class Cfg, bool kGateUp>
inline constexpr int kOutCols = kGateUp ? Cfg::BN / 2 : Cfg::BN;

template <class Cfg, bool kGateUp>
constexpr int shared_bytes() {
  const int pipeline = Cfg::kStages * Cfg::kStageElems * 2;
  const int epilogue = Cfg::BM * (kOutCols<Cfg, kGateUp> + 8) * 2;
  return pipeline > epilogue ? pipeline : epilogue;
}

__device__ __forceinline__ unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously, bypassing L1 (.cg). With src_bytes = 0 nothing is
// read and the 16 bytes are zero-filled (src must still be a valid address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)),
               "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most `pending` of this thread's committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
}

// Four 8x8 b16 matrices from shared memory; lanes 8i..8i+7 give the row addresses of matrix i,
// and register i of every lane receives matrix i's elements (row lane / 4, columns 2 (lane % 4)
// and 2 (lane % 4) + 1), the layout of mma's fragments.
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p)));
}

// d += a b for a 16 x 16 (row-major) by 16 x 8 (column-major) bf16 product in fp32.
// Fragments (g = lane / 4, q = lane % 4): a0 (g, 2q..2q+1), a1 (g+8, 2q..), a2 (g, 8+2q..),
// a3 (g+8, 8+2q..); b0 (k 2q..2q+1, n g), b1 (k 8+2q.., n g); d0, d1 (g, 2q..2q+1), d2, d3 (g+8, ..).
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const std::uint32_t (&a)[4],
                                               std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The block's (expert, m-tile within the expert), from its m-tile index mb among all experts'
// tiles in expert order: each thread sums ceil(count_e / BM) over a run of experts, a block-wide
// exclusive scan of those sums finds the thread whose run holds mb, and that thread walks its run.
// Returns false (for the whole block) when mb is past the last tile. Contains __syncthreads.
template <int kThreads, int BM>
__device__ bool find_tile(const std::int32_t* offsets, int E, int mb, int& expert, int& m_local) {
  __shared__ int warp_sum[kThreads / 32];
  __shared__ int found_expert;
  __shared__ int found_m;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int per_thread = (E + kThreads - 1) / kThreads;
  const int first = min(tid * per_thread, E);
  const int last = min(first + per_thread, E);
  auto tiles_of = [&](int e) {
    const int count = max(offsets[e + 1] - offsets[e], 0);
    return (count + BM - 1) / BM;
  };
  int mine = 0;
  for (int e = first; e < last; ++e) mine += tiles_of(e);
  int inclusive = mine;  // warp-inclusive scan (Hillis-Steele over shuffles)
  for (int d = 1; d < 32; d *= 2) {
    const int v = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += v;
  }
  if (lane == 31) warp_sum[warp] = inclusive;
  if (tid == 0) found_expert = -1;
  __syncthreads();
  int before = inclusive - mine;
  for (int w = 0; w < warp; ++w) before += warp_sum[w];
  if (mb >= before && mb < before + mine) {
    int acc = before;
    for (int e = first; e < last; ++e) {
      const int t = tiles_of(e);
      if (mb < acc + t) {
        found_expert = e;
        found_m = mb - acc;
        break;
      }
      acc += t;
    }
  }
  __syncthreads();
  expert = found_expert;
  m_local = found_m;
  return expert >= 0;
}

template <class Cfg, bool kGateUp>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks) expert_gemm_kernel2(Problem p) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, kStride = Cfg::kStride;
  constexpr int MT = Cfg::MT, NT = Cfg::NT, kThreads = Cfg::kThreads;
  constexpr int kOut = kOutCols<Cfg, kGateUp>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* smem = reinterpret_cast<bf16*>(smem_raw);
  __shared__ int row_src[BM];     // source row in A, kRowPadding or kRowOutside
  __shared__ float scale_of_row[BM];

  // 1. Which tile: blocks in groups of 8 m-tiles, m fastest within a group (the grouped order
  //    of Triton's matmul tutorial: the blocks resident together share A and B tiles in L2).
  constexpr int kGroup = 8;
  const int b = static_cast<int>(blockIdx.x);
  const int group = b / (kGroup * p.n_tiles);
  const int first_m = group * kGroup;
  const int group_m = min(p.m_tiles - first_m, kGroup);
  const int in_group = b - group * kGroup * p.n_tiles;
  const int mb = first_m + in_group % group_m;
  const int nb = in_group / group_m;
  int expert = 0;
  int m_local = 0;
  if (!find_tile<kThreads, BM>(p.offsets, p.E, mb, expert, m_local)) return;

  // 2. The tile's rows: [row0, row_end) belongs to this expert; the rest of the tile is outside.
  const std::int64_t row0 = std::int64_t{p.offsets[expert]} + std::int64_t{m_local} * BM;
  const std::int64_t row_end = min(std::int64_t{p.offsets[expert + 1]}, p.rows);
  const int tid = static_cast<int>(threadIdx.x);
  for (int i = tid; i < BM; i += kThreads) {
    const std::int64_t r = row0 + i;
    const bool inside = r < row_end;
    row_src[i] = inside ? static_cast<int>(source_row<kGateUp>(p, r)) : kRowOutside;
    scale_of_row[i] = inside && p.row_scale != nullptr ? p.row_scale[r] : 1.0f;
  }
  __syncthreads();

  // 3. The pipeline: stage s holds A (BM x BK) then B (BN x BK), rows kStride apart.
  const std::int64_t w_rows = kGateUp ? 2 * std::int64_t{p.N} : p.N;
  const bf16* w = p.w + std::int64_t{expert} * w_rows * p.K;
  const int k_tiles = (p.K + BK - 1) / BK;
  auto load_stage = [&](int stage, int kt) {
    bf16* as = smem + stage * Cfg::kStageElems;
    bf16* bs = as + BM * kStride;
    const int k0 = kt * BK;
    for (int id = tid; id < BM * Cfg::kChunks; id += kThreads) {
      const int i = id / Cfg::kChunks;
      const int k = k0 + (id % Cfg::kChunks) * 8;
      const int src = row_src[i];
      const bool ok = src >= 0 && k < p.K;  // K is a multiple of 8: a chunk is all in or all out
      cp_async_16(as + i * kStride + (id % Cfg::kChunks) * 8,
                  ok ? p.a + std::int64_t{src} * p.K + k : p.a, ok ? 16 : 0);
    }
    for (int id = tid; id < BN * Cfg::kChunks; id += kThreads) {
      const int i = id / Cfg::kChunks;
      const int k = k0 + (id % Cfg::kChunks) * 8;
      // Gate/up: tile rows [0, BN/2) are gate rows n, [BN/2, BN) the up rows H + n, same n.
      const int col = kGateUp ? nb * (BN / 2) + i % (BN / 2) : nb * BN + i;
      const std::int64_t wrow = kGateUp && i >= BN / 2 ? std::int64_t{p.N} + col : col;
      const bool ok = col < p.N && k < p.K;
      cp_async_16(bs + i * kStride + (id % Cfg::kChunks) * 8, ok ? w + wrow * p.K + k : w,
                  ok ? 16 : 0);
    }
  };

  const int lane = tid % 32;
  const int warp = tid / 32;
  const int wm = warp / Cfg::kWarpsN;
  const int wn = warp % Cfg::kWarpsN;
  // First shared row of the warp's n8 tile j in the B tile.
  auto b_row = [&](int j) {
    if constexpr (kGateUp) {
      constexpr int half = NT / 2;  // tiles [0, half) gate, [half, NT) up, of the same columns
      return (j < half ? 0 : BN / 2) + wn * (BN / 2 / Cfg::kWarpsN) + (j % half) * 8;
    } else {
      return wn * Cfg::WTN + j * 8;
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[mt][j][v] = 0.0f;

#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();  // one group per stage, empty or not, so the wait counts stay exact
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    // Tile kt has landed (at most STAGES - 2 younger groups pending), for every thread's copies;
    // and every warp is done with tile kt - 1, whose buffer the prefetch below overwrites.
    cp_async_wait<Cfg::kStages - 2>();
    __syncthreads();
    const int next = kt + Cfg::kStages - 1;
    if (next < k_tiles) load_stage(next % Cfg::kStages, next);
    cp_async_commit();

    const bf16* as = smem + (kt % Cfg::kStages) * Cfg::kStageElems;
    const bf16* bs = as + BM * kStride;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      std::uint32_t af[MT][4];
      std::uint32_t bfrag[NT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        // Matrices: rows 0-7 / 8-15 (lane % 16) x k 0-7 / 8-15 (lane / 16) = a0, a1, a2, a3.
        const int row = wm * Cfg::WTM + mt * 16 + lane % 16;
        ldmatrix_x4(af[mt], as + row * kStride + kk + (lane / 16) * 8);
      }
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        // Matrices: (tile j, k 0-7), (tile j, k 8-15), (tile j+1, k 0-7), (tile j+1, k 8-15).
        const int row = b_row(j + lane / 16) + lane % 8;
        std::uint32_t r[4];
        ldmatrix_x4(r, bs + row * kStride + kk + ((lane / 8) % 2) * 8);
        bfrag[j][0] = r[0];
        bfrag[j][1] = r[1];
        bfrag[j + 1][0] = r[2];
        bfrag[j + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_bf16_16816(acc[mt][j], af[mt], bfrag[j][0], bfrag[j][1]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's buffers become the output tile

  // 4. Epilogue: scale, SwiGLU (gate/up), round to bf16 into a shared tile (BM x kOut, rows
  //    padded by 16 bytes), then 16-byte coalesced stores of the rows inside the expert.
  constexpr int kOutStride = kOut + 8;
  bf16* cs = smem;
  const int g = lane / 4;
  const int q = lane % 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = wm * Cfg::WTM + mt * 16 + g + half * 8;
      const bool padding = row_src[i] < 0;  // padding rows are zeros whatever their scale
      const float s = scale_of_row[i];
      if constexpr (kGateUp) {
#pragma unroll
        for (int j = 0; j < NT / 2; ++j) {
          const float* gate = &acc[mt][j][2 * half];
          const float* up = &acc[mt][j + NT / 2][2 * half];
          const float h0 = padding ? 0.0f : silu(s * gate[0]) * (s * up[0]);
          const float h1 = padding ? 0.0f : silu(s * gate[1]) * (s * up[1]);
          const int col = wn * (kOut / Cfg::kWarpsN) + j * 8 + 2 * q;
          *reinterpret_cast<__nv_bfloat162*>(cs + i * kOutStride + col) = __floats2bfloat162_rn(h0, h1);
        }
      } else {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const float* y = &acc[mt][j][2 * half];
          const int col = wn * Cfg::WTN + j * 8 + 2 * q;
          *reinterpret_cast<__nv_bfloat162*>(cs + i * kOutStride + col) =
              __floats2bfloat162_rn(padding ? 0.0f : s * y[0], padding ? 0.0f : s * y[1]);
        }
      }
    }
  }
  __syncthreads();
  constexpr int kOutChunks = kOut / 8;
  for (int id = tid; id < BM * kOutChunks; id += kThreads) {
    const int i = id / kOutChunks;
    const int col = nb * kOut + (id % kOutChunks) * 8;
    if (row_src[i] == kRowOutside || col >= p.N) continue;  // N is a multiple of 8
    *reinterpret_cast<uint4*>(p.out + (row0 + i) * p.N + col) =
        *reinterpret_cast<const uint4*>(cs + i * kOutStride + (id % kOutChunks) * 8);
  }
}

// -------------------------------------------------------------------------------------------------
// Launchers and the dispatcher.

template <bool kGateUp>
void launch1(const Problem& p, cudaStream_t stream) {
  constexpr int kBlock = 256;
  const dim3 grid(static_cast<unsigned>(p.rows), static_cast<unsigned>((p.N + kBlock - 1) / kBlock));
  expert_gemm_kernel1<kGateUp><<<grid, kBlock, 0, stream>>>(p);
  check_launch(kGateUp ? "expert_gemm_kernel1 (gate/up) launch" : "expert_gemm_kernel1 (down) launch");
}

template <class Cfg, bool kGateUp>
void launch2_with(Problem p, cudaStream_t stream) {
  // An upper bound on sum_e ceil(count_e / BM): only nonempty experts (at most min(E, rows) of
  // them) add a partial tile, of at most (BM - 1) / BM.
  const std::int64_t partial = std::min<std::int64_t>(p.E, p.rows) * (Cfg::BM - 1);
  const std::int64_t m_tiles = (p.rows + partial) / Cfg::BM;
  const std::int64_t n_tiles = (p.N + kOutCols<Cfg, kGateUp> - 1) / kOutCols<Cfg, kGateUp>;
  require(m_tiles * n_tiles <= std::numeric_limits<int>::max(), "rows", p.rows,
          "too many tiles for one launch (more than 2^31 - 1 blocks)");
  p.m_tiles = static_cast<int>(m_tiles);
  p.n_tiles = static_cast<int>(n_tiles);
  constexpr int bytes = shared_bytes<Cfg, kGateUp>();
  auto* kernel = expert_gemm_kernel2<Cfg, kGateUp>;
  // Above 48 KB of dynamic shared memory a kernel must opt in (per kernel, per device).
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
             "cudaFuncSetAttribute(expert_gemm_kernel2, max dynamic shared memory)");
  kernel<<<static_cast<unsigned>(m_tiles * n_tiles), Cfg::kThreads, bytes, stream>>>(p);
  check_launch(kGateUp ? "expert_gemm_kernel2 (gate/up) launch" : "expert_gemm_kernel2 (down) launch");
}

// The tile from the mean rows per expert (the host knows rows and E, not the counts).
template <bool kGateUp>
void launch2(const Problem& p, cudaStream_t stream) {
  const std::int64_t per_expert = p.rows / p.E;
  if (per_expert <= 24) {
    launch2_with<TileSmall, kGateUp>(p, stream);
  } else if (per_expert <= 96) {
    launch2_with<TileMedium, kGateUp>(p, stream);
  } else {
    launch2_with<TileLarge, kGateUp>(p, stream);
  }
}

// The checks both GEMMs make before they touch the device.
void check_common(int version, std::int64_t C, std::int64_t H, std::int64_t rows, int E) {
  require(version >= 1 && version <= kExpertGemmVersions, "version", version,
          fmt::format("must be in [1, {}]", kExpertGemmVersions));
  require(E >= 1, "num_experts", E, "must be at least 1");
  constexpr std::int64_t kMaxWidth = std::int64_t{1} << 20;  // kernel 1's grid.y < 2^16
  require(C > 0 && C % 8 == 0 && C <= kMaxWidth, "hidden_size", C,
          "must be a positive multiple of 8 (16-byte rows), at most 2^20");
  require(H > 0 && H % 8 == 0 && H <= kMaxWidth, "intermediate_size", H,
          "must be a positive multiple of 8 (16-byte rows), at most 2^20");
  require(rows >= 0 && rows <= std::numeric_limits<std::int32_t>::max(), "rows", rows,
          "must be in [0, 2^31 - 1] (rows are numbered in int32)");
}

void require_pointer(const void* p, const char* field, int version, const char* what) {
  require(p != nullptr, field, "null", fmt::format("must point to {} on the device", what));
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  require(version == 1 || address % 16 == 0, field, fmt::format("{:#x}", address),
          "must be 16-byte aligned (versions 2 and 3 copy 16-byte chunks)");
}

// Version 3 runs only on sm_90 (the sm_90a code of wgmma runs on no other device).
void require_sm90_for_v3(int version) {
  if (version != 3) return;
  int device = 0;
  int major = 0;
  int minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    const cudaError_t err = cudaGetLastError();  // and reset it
    fail("version", version,
         fmt::format("needs an sm_90 (Hopper) device, and there is no usable CUDA device ({})",
                     cudaGetErrorString(err)));
  }
  require(major == 9 && minor == 0, "version", version,
          fmt::format("needs an sm_90 (Hopper) device for wgmma; the current device {} is sm_{}{} "
                      "(use version 2)",
                      device, major, minor));
}

}  // namespace

void launch_gate_up(const GateUpArgs& args, int version, cudaStream_t stream) {
  check_common(version, args.hidden_size, args.intermediate_size, args.rows, args.num_experts);
  require(args.tokens >= 0, "tokens", args.tokens, "must be >= 0");
  require(args.row_token != nullptr || args.rows <= args.tokens, "rows", args.rows,
          fmt::format("must not exceed tokens = {} when row_token is null (row r reads x's row r)",
                      args.tokens));
  if (args.rows == 0) return;
  if (args.tokens > 0) require_pointer(args.x, "x", version, "(tokens, hidden_size) bf16");
  require_pointer(args.offsets, "offsets", 1, "(num_experts + 1) int32");
  require_pointer(args.w_gate_up, "w_gate_up", version,
                  "(num_experts, 2 intermediate_size, hidden_size) bf16");
  require_pointer(args.hidden, "hidden", version, "(rows, intermediate_size) bf16");
  require_sm90_for_v3(version);
  if (version == 3) {
    detail::launch_gate_up_v3(args, stream);
    return;
  }
  Problem p;
  p.a = reinterpret_cast<const bf16*>(args.x);
  p.row_token = args.row_token;
  p.offsets = args.offsets;
  p.row_scale = args.row_scale;
  p.w = reinterpret_cast<const bf16*>(args.w_gate_up);
  p.out = reinterpret_cast<bf16*>(args.hidden);
  p.a_rows = args.tokens;
  p.rows = args.rows;
  p.K = static_cast<int>(args.hidden_size);
  p.N = static_cast<int>(args.intermediate_size);
  p.E = args.num_experts;
  if (p.a == nullptr) p.a = p.w;  // tokens = 0: every row is padding; cp.async needs some address
  if (version == 1) {
    launch1<true>(p, stream);
  } else {
    launch2<true>(p, stream);
  }
}

void launch_down(const DownArgs& args, int version, cudaStream_t stream) {
  check_common(version, args.hidden_size, args.intermediate_size, args.rows, args.num_experts);
  if (args.rows == 0) return;
  require_pointer(args.hidden, "hidden", version, "(rows, intermediate_size) bf16");
  require_pointer(args.offsets, "offsets", 1, "(num_experts + 1) int32");
  require_pointer(args.w_down, "w_down", version, "(num_experts, hidden_size, intermediate_size) bf16");
  require_pointer(args.out, "out", version, "(rows, hidden_size) bf16");
  require_sm90_for_v3(version);
  if (version == 3) {
    detail::launch_down_v3(args, stream);
    return;
  }
  Problem p;
  p.a = reinterpret_cast<const bf16*>(args.hidden);
  p.row_token = args.row_token;
  p.offsets = args.offsets;
  p.row_scale = args.row_scale;
  p.w = reinterpret_cast<const bf16*>(args.w_down);
  p.out = reinterpret_cast<bf16*>(args.out);
  p.a_rows = args.rows;
  p.rows = args.rows;
  p.K = static_cast<int>(args.intermediate_size);
  p.N = static_cast<int>(args.hidden_size);
  p.E = args.num_experts;
  if (version == 1) {
    launch1<false>(p, stream);
  } else {
    launch2<false>(p, stream);
  }
}

}  // namespace moelab::cuda
