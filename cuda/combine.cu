// moelab/cuda/combine.cu — the weighted combine of the experts' outputs (and the gated shared
// expert), as a ladder.
//
// What it shows. The last stage of an MoE layer gathers, for every token, its k expert output rows
// from the expert-major buffer and sums them:
//   y_t = sum_j w_tj out[pair_row[t, j]]  +  sg_t shared_t          (pair_row = -1: skipped)
// in fp32, rounded once to the output dtype (bf16 round-to-nearest-even, as moelab::encode). It is
// a gather by token, not a scatter-add by row: each output element is written by one thread, with
// no atomics, so the sum has one fixed order (j = 0 .. k-1, then the shared expert) and the result
// is the same bits on every run. It reads T k C bf16 and writes T C: bound by memory bandwidth.
// The ladder:
//   combine_kernel1  one thread per output element: k scalar 2-byte loads of scattered rows, and
//                    the row indices and weights read again by each of the C threads of a token.
//   combine_kernel2  one thread per 8 consecutive channels: one 16-byte load per row (8 bf16),
//                    the token's row indices and weights read once per 8 channels, up to 8 rows'
//                    loads in flight before the first add, one 16-byte (bf16) or 2 x 16-byte
//                    (fp32) store. Needs C a multiple of 8 (every model's is).
// Measured on an H100 (moelab_dispatch_bench, bf16 out): kernel 2 reaches 93-99.9% of a 3000 GB/s
// copy at T = 16384 (kernel 1: 29-65%); at T <= 16 both are launch-latency bound (2-5 us) and
// kernel 2 is 0.3-2 us slower (not the block size: 64-thread blocks measured the same).
// Also here: launch_shared_gate, sg_t = sigmoid(x_t . w) (Qwen2-MoE's shared_expert_gate, a
// Linear(C, 1)), one warp per token, fp32 sums, 16-byte loads where C % 8 == 0.
// Why. It is the stage where the gate weights meet the experts' outputs, and where a
// scatter-add with atomics would make the layer's output depend on thread timing.
//
// How to run. build/bin/moelab_dispatch_bench validates every version against the reference in
// double, then times them (µs, GB/s, % of a peak); `moelab_dispatch_bench --iterations=0` only
// validates. Unit tests: tests/cuda/test_combine_device.cpp (test_cuda_combine).
//
// Shapes: T = tokens, C = hidden size, k = experts per token. expert_out (rows, C) bf16;
// pair_row, pair_weight (T, k); shared_out (T, C) bf16; shared_gate (T); y (T, C) bf16 or fp32.
#include "cuda/combine.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "reference/error.h"

namespace moelab::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsInFlight = 8;  // kernel 2 issues this many rows' loads before adding
constexpr unsigned kFullMask = 0xffffffffu;

// bf16 bits -> float: the bf16 is the top half of the float (exact).
__device__ __forceinline__ float bf16_to_float(std::uint16_t bits) {
  return __uint_as_float(std::uint32_t{bits} << 16);
}
__device__ __forceinline__ float low_bf16(std::uint32_t word) { return __uint_as_float(word << 16); }
__device__ __forceinline__ float high_bf16(std::uint32_t word) {
  return __uint_as_float(word & 0xFFFF0000u);
}

// acc[0..8) += w * (8 bf16 in v), element 0 in the low half of v.x.
__device__ __forceinline__ void add8(float (&acc)[8], uint4 v, float w) {
  const std::uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc[2 * i] += w * low_bf16(words[i]);
    acc[2 * i + 1] += w * high_bf16(words[i]);
  }
}

__device__ __forceinline__ uint4 load8(const std::uint16_t* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// Two floats -> two bf16 (round-to-nearest-even) in one word, a in the low half.
__device__ __forceinline__ std::uint32_t pack_bf16(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return std::uint32_t{__bfloat16_as_ushort(h.x)} | (std::uint32_t{__bfloat16_as_ushort(h.y)} << 16);
}

// One output element in the output dtype.
__device__ __forceinline__ void store1(std::uint16_t* y, std::int64_t i, float v) {
  y[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
__device__ __forceinline__ void store1(float* y, std::int64_t i, float v) { y[i] = v; }

// Eight consecutive output elements: one 16-byte store (bf16) or two (fp32).
__device__ __forceinline__ void store8(std::uint16_t* y, std::int64_t i, const float (&v)[8]) {
  *reinterpret_cast<uint4*>(y + i) = make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]),
                                                pack_bf16(v[4], v[5]), pack_bf16(v[6], v[7]));
}
__device__ __forceinline__ void store8(float* y, std::int64_t i, const float (&v)[8]) {
  auto* out = reinterpret_cast<float4*>(y + i);
  out[0] = make_float4(v[0], v[1], v[2], v[3]);
  out[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// -------------------------------------------------------------------------------------------------
// The kernels. Out = std::uint16_t (bf16 bits) or float.

// Kernel 1: thread i computes y[t, c], i = t C + c.
template <typename Out>
__global__ void __launch_bounds__(kThreads)
combine_kernel1(Out* y, const std::uint16_t* expert_out, const std::int32_t* pair_row,
                const float* pair_weight, const std::uint16_t* shared_out, const float* shared_gate,
                std::int64_t tokens, std::int64_t hidden, int top_k) {
  const std::int64_t i = std::int64_t{blockIdx.x} * kThreads + threadIdx.x;
  if (i >= tokens * hidden) return;
  const std::int64_t t = i / hidden;
  const std::int64_t c = i - t * hidden;
  float acc = 0.0f;
  for (int j = 0; j < top_k; ++j) {
    const std::int32_t r = pair_row[t * top_k + j];
    if (r < 0) continue;  // a dropped pair
    const float w = pair_weight != nullptr ? pair_weight[t * top_k + j] : 1.0f;
    acc += w * bf16_to_float(expert_out[std::int64_t{r} * hidden + c]);
  }
  if (shared_out != nullptr) {
    const float g = shared_gate != nullptr ? shared_gate[t] : 1.0f;
    acc += g * bf16_to_float(shared_out[i]);
  }
  store1(y, i, acc);
}

// Kernel 2: thread i computes y[t, 8 q .. 8 q + 8), i = t (C / 8) + q.
template <typename Out>
__global__ void __launch_bounds__(kThreads)
combine_kernel2(Out* __restrict__ y, const std::uint16_t* __restrict__ expert_out,
                const std::int32_t* __restrict__ pair_row, const float* __restrict__ pair_weight,
                const std::uint16_t* __restrict__ shared_out, const float* __restrict__ shared_gate,
                std::int64_t tokens, std::int64_t hidden, int top_k) {
  const std::int64_t groups = hidden / 8;  // 8-channel groups per token
  const std::int64_t i = std::int64_t{blockIdx.x} * kThreads + threadIdx.x;
  if (i >= tokens * groups) return;
  const std::int64_t t = i / groups;
  const std::int64_t c = (i - t * groups) * 8;
  const std::int32_t* rows = pair_row + t * top_k;
  const float* weights = pair_weight != nullptr ? pair_weight + t * top_k : nullptr;
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int j0 = 0; j0 < top_k; j0 += kRowsInFlight) {
    // Load first (up to kRowsInFlight rows at once), then add: the loads overlap. A skipped slot
    // adds 0 * 0 = +0, which leaves the sum unchanged.
    uint4 v[kRowsInFlight];
    float w[kRowsInFlight];
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      const int j = j0 + u;
      const std::int32_t r = j < top_k ? rows[j] : -1;
      w[u] = r < 0 ? 0.0f : (weights != nullptr ? weights[j] : 1.0f);
      v[u] = r < 0 ? make_uint4(0, 0, 0, 0) : load8(expert_out + std::int64_t{r} * hidden + c);
    }
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) add8(acc, v[u], w[u]);
  }
  if (shared_out != nullptr) {
    const float g = shared_gate != nullptr ? shared_gate[t] : 1.0f;
    add8(acc, load8(shared_out + t * hidden + c), g);
  }
  store8(y, t * hidden + c, acc);
}

// sg[t] = sigmoid(x_t . w): warp per token; each lane sums its own channels (8 at a time with
// 16-byte loads when `vectorised`), then a butterfly sum over the warp.
__global__ void __launch_bounds__(kThreads)
shared_gate_kernel(float* sg, const std::uint16_t* __restrict__ x, const std::uint16_t* __restrict__ w,
                   std::int64_t tokens, std::int64_t hidden, bool vectorised) {
  const std::int64_t t = (std::int64_t{blockIdx.x} * kThreads + threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (t >= tokens) return;  // the whole warp: t is the same for its 32 lanes
  const std::uint16_t* xt = x + t * hidden;
  float acc = 0.0f;
  if (vectorised) {
    for (std::int64_t c = 8 * lane; c < hidden; c += 8 * 32) {
      const uint4 a = load8(xt + c);
      const uint4 b = load8(w + c);
      const std::uint32_t xa[4] = {a.x, a.y, a.z, a.w};
      const std::uint32_t wb[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        acc += low_bf16(xa[q]) * low_bf16(wb[q]);
        acc += high_bf16(xa[q]) * high_bf16(wb[q]);
      }
    }
  } else {
    for (std::int64_t c = lane; c < hidden; c += 32) acc += bf16_to_float(xt[c]) * bf16_to_float(w[c]);
  }
  for (int d = 16; d > 0; d /= 2) acc += __shfl_xor_sync(kFullMask, acc, d);
  if (lane == 0) sg[t] = 1.0f / (1.0f + expf(-acc));  // e^-z = inf gives 0, as moelab::sigmoid
}

// -------------------------------------------------------------------------------------------------
// Launchers.

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

unsigned grid_for(std::int64_t threads, const char* what) {
  const std::int64_t blocks = (threads + kThreads - 1) / kThreads;
  require(blocks <= std::numeric_limits<int>::max(), what, threads,
          "too many threads for one launch (more than 2^31 - 1 blocks)");
  return static_cast<unsigned>(blocks);
}

template <typename Out>
void launch_typed(const CombineArgs& a, int version, cudaStream_t stream) {
  Out* y = static_cast<Out*>(a.y);
  if (version == 1) {
    const unsigned grid = grid_for(a.tokens * a.hidden_size, "tokens * hidden_size");
    combine_kernel1<Out><<<grid, kThreads, 0, stream>>>(y, a.expert_out, a.pair_row, a.pair_weight,
                                                        a.shared_out, a.shared_gate, a.tokens,
                                                        a.hidden_size, a.top_k);
    check_launch("combine_kernel1");
  } else {
    const unsigned grid = grid_for(a.tokens * (a.hidden_size / 8), "tokens * hidden_size / 8");
    combine_kernel2<Out><<<grid, kThreads, 0, stream>>>(y, a.expert_out, a.pair_row, a.pair_weight,
                                                        a.shared_out, a.shared_gate, a.tokens,
                                                        a.hidden_size, a.top_k);
    check_launch("combine_kernel2");
  }
}

void check_combine(const CombineArgs& a, int version) {
  require(version >= 1 && version <= kCombineVersions, "version", version,
          fmt::format("must be in [1, {}]", kCombineVersions));
  require(a.y_dtype == Format::bf16 || a.y_dtype == Format::fp32, "y_dtype", format_name(a.y_dtype),
          "must be bf16 or fp32");
  require(a.tokens >= 0, "tokens", a.tokens, "must be >= 0");
  require(a.top_k >= 1, "top_k", a.top_k, "must be >= 1");
  require(a.hidden_size >= 8 && a.hidden_size % 8 == 0, "hidden_size", a.hidden_size,
          "must be a positive multiple of 8");
  require(a.shared_gate == nullptr || a.shared_out != nullptr, "shared_gate", "set",
          "needs shared_out (the gate scales the shared experts' output)");
  if (a.tokens == 0) return;
  require(a.expert_out != nullptr, "expert_out", "null", "must point to (rows, C) bf16 on the device");
  require(a.pair_row != nullptr, "pair_row", "null", "must point to (T, k) int32 on the device");
  require(a.y != nullptr, "y", "null", "must point to (T, C) outputs on the device");
  if (version == 2) {
    const auto address = [](const void* p) { return fmt::format("{:#x}", reinterpret_cast<std::uintptr_t>(p)); };
    require(aligned16(a.expert_out), "expert_out", address(a.expert_out),
            "must be 16-byte aligned for version 2's 16-byte loads");
    require(a.shared_out == nullptr || aligned16(a.shared_out), "shared_out", address(a.shared_out),
            "must be 16-byte aligned for version 2's 16-byte loads");
    require(aligned16(a.y), "y", address(a.y), "must be 16-byte aligned for version 2's 16-byte stores");
  }
}

}  // namespace

void launch_combine(const CombineArgs& args, int version, cudaStream_t stream) {
  check_combine(args, version);
  if (args.tokens == 0) return;
  if (args.y_dtype == Format::bf16) {
    launch_typed<std::uint16_t>(args, version, stream);
  } else {
    launch_typed<float>(args, version, stream);
  }
}

void launch_shared_gate(float* sg, const Bf16Bits* x, const Bf16Bits* w, std::int64_t tokens,
                        std::int64_t hidden_size, cudaStream_t stream) {
  require(tokens >= 0, "tokens", tokens, "must be >= 0");
  require(hidden_size >= 1, "hidden_size", hidden_size, "must be >= 1");
  if (tokens == 0) return;
  require(sg != nullptr, "sg", "null", "must point to (T) floats on the device");
  require(x != nullptr, "x", "null", "must point to (T, C) bf16 on the device");
  require(w != nullptr, "w", "null", "must point to (C) bf16 on the device");
  const bool vectorised = hidden_size % 8 == 0 && aligned16(x) && aligned16(w);
  const unsigned grid = grid_for(tokens * 32, "tokens * 32 (a warp per token)");
  shared_gate_kernel<<<grid, kThreads, 0, stream>>>(sg, x, w, tokens, hidden_size, vectorised);
  check_launch("shared_gate_kernel");
}

}  // namespace moelab::cuda
