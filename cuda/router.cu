// moelab/cuda/router.cu — the router on the GPU: logits GEMM + scoring + top-k + gating, as a ladder.
//
// What it shows. The router turns each token's activation x_t (C) into its k expert ids and gates:
//   l_te = x_t . W_e (+ b_e)                                 the logits: a (T, C) x (C, E) GEMM
//   s_te = softmax_e(l_t) | sigmoid(l_te) | sqrt(softplus(l_te))
//   ids  = top-k of s_t + selection bias (or of l_t), optionally group- or device-limited
//   g    = the selected scores (or softmax / sigmoid of the selected logits), renormalised, scaled
// Everything after the GEMM is per token and cheap (O(E k) per token), so the question of speed is
// the GEMM: 2 T C E flops over T C + E C inputs. At decode sizes (T small) it is bound by reading W
// once; at prefill sizes (T = 16384, DeepSeek-V3: C = 7168, E = 256: 60 GFLOP) by arithmetic, and
// then what matters is that W is read once per tile of tokens, not once per token. The ladder:
//   router_kernel1  one thread per token: the E dot products, scoring, selection and gating one
//                   after the other in one thread, the token's logits in local memory. Obvious.
//                   Neighbouring threads read x rows C elements apart (no coalescing), and every
//                   thread walks all of W.
//   router_kernel2  one warp per token: the 32 lanes split C with 16-byte loads (8 elements a
//                   lane), four experts at a time, and a shuffle reduction per logit; then the
//                   warp routes the token (route_token below): scoring with warp reductions and
//                   the top-k as k rounds of a warp argmax over E / 32 values per lane. Still
//                   reads all of W once per token.
//   router_kernel3  one block per tile of TM tokens: x and W go through shared memory in (TM, TK)
//                   and (TN, TK) tiles, and each thread accumulates a block of up to 4 x 4 logits
//                   in registers (a classic SIMT GEMM), so W is read once per TM tokens. The tile's
//                   logits stay in shared memory, where each warp then routes its tokens with the
//                   same route_token as kernel 2. TM, TN and TK follow E (the Tile3 configurations)
//                   so that one block holds all E logits of its tokens in shared memory, for E up
//                   to 1024, and so that small E still moves enough bytes per step.
// Why. The router decides which experts run; a different expert id is a different model output,
// so every version must pick exactly the reference's experts (reference/routing.h), with the
// reference's tie-breaking (equal values: the lower expert, or group, id first). The arithmetic is
// float32 throughout (expf, not __expf); the logits of a bf16 router are rounded to bf16 after the
// fp32 accumulation and the bias, as the reference does, so that the ranking sees the same values.
// Measured on an H100 (moelab_router_bench, graph replay, W and x from DRAM), median per launch:
//                                    T = 1               T = 16384
//   qwen3 (C 2048, E 128, bf16 W)    v1 7.6 ms  v2 277 us  v3 274 us    v1 21 ms  v2 773 us  v3 493 us
//   deepseek_v3 (C 7168, E 256, fp32 W)         v2 2.4 ms  v3 1.3 ms              v2 12.2 ms v3 2.9 ms
// v3 at T = 16384 on DeepSeek-V3 is 20 TFLOP/s, a third of the fp32 SIMT peak. Small T is slow in
// every version: one warp or one block cannot pull W from DRAM at more than a few GB/s. The next
// rungs: split the experts over blocks at small T (then a second pass selects), and the tensor
// cores for the GEMM (mma.sync on bf16 x and W) at large T.
//
// How to run. build/bin/moelab_router_bench validates every version against the reference, then
// times them on the published shapes (mixtral, qwen3, olmoe, deepseek_v3) with graph replay:
// `moelab_router_bench --iterations=0` only validates. tests/cuda/test_router_device.cpp checks
// every version against the reference for the presets, ties, large logits and odd sizes.
//
// Shapes: T = tokens, C = hidden size, E = experts, k = experts per token, G = groups, S = E / G.
//   x (T, C) fp32 or bf16; W (E, C) fp32 or bf16; b, selection bias (E) fp32;
//   logits (T, E) fp32; ids (T, k) int32; gates (T, k) fp32.
#include "cuda/router.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "reference/error.h"

namespace moelab::cuda {
namespace {

constexpr int kMaxExperts = 1024;  // E: route_token's per-lane loops and v3's shared memory
constexpr int kMaxTopK = 32;       // k: one selected expert per lane of a warp
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
using Bf16 = std::uint16_t;  // bf16 bit patterns (device.h's Bf16Bits)

// What the kernels need of the RoutingConfig and RouterArgs, flattened and passed by value.
struct Route {
  std::int64_t T = 0;
  int C = 0, E = 0, k = 0;
  Scoring scoring = Scoring::softmax;
  bool ranks_logits = false;  // the top-k ranks the logits (gates from the selected logits)
  GateKind gate = GateKind::selected_scores;
  bool renormalize = false;
  float renorm_eps = 0.0f;
  float scaling = 1.0f;       // routed_scaling_factor
  int n_group = 0;            // G; 0 = no group limit
  int topk_group = 0;         // groups kept
  bool group_max = false;     // group score = max (else the sum of the two largest)
  float mask_value = 0.0f;    // what the experts of dropped groups are ranked as: -inf or 0
  bool bf16_router = false;   // router.dtype bf16: x, b and the logits are rounded to bf16
  const float* bias = nullptr;            // (E) or null
  const float* selection_bias = nullptr;  // (E) or null
  float* logits = nullptr;                // (T, E) or null
  std::int32_t* ids = nullptr;            // (T, k)
  float* gates = nullptr;                 // (T, k)
};

// -------------------------------------------------------------------------------------------------
// Elements and loads.

__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(Bf16 v) { return __uint_as_float(std::uint32_t{v} << 16); }

// x as the router multiplies it: a bf16 router rounds an fp32 x to bf16 first (reference/router.h).
template <typename X, typename W>
__device__ __forceinline__ float x_value(X v) {
  if constexpr (std::is_same_v<X, float> && std::is_same_v<W, Bf16>) return round_bf16(v);
  return to_float(v);
}

// Eight consecutive elements, 16-byte aligned, as floats: two float4 loads or one uint4 of bf16s
// (bf16 -> float is exact: the bits shifted up by 16).
__device__ __forceinline__ void load8(const float* p, float (&out)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
  out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}
__device__ __forceinline__ void load8(const Bf16* p, float (&out)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const std::uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(words[i] << 16);              // the low half is the first element
    out[2 * i + 1] = __uint_as_float(words[i] & 0xFFFF0000u);
  }
}
// x[c .. c + 8) as the router multiplies it.
template <typename X, typename W>
__device__ __forceinline__ void load8_x(const X* p, float (&out)[8]) {
  load8(p, out);
  if constexpr (std::is_same_v<X, float> && std::is_same_v<W, Bf16>) {
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = round_bf16(out[i]);
  }
}

// l = acc + b, rounded to bf16 for a bf16 router (the bias is rounded too, as the reference does).
__device__ __forceinline__ float finish_logit(float acc, int e, const Route& r) {
  float l = acc;
  if (r.bias != nullptr) l += r.bf16_router ? round_bf16(r.bias[e]) : r.bias[e];
  return r.bf16_router ? round_bf16(l) : l;
}

// -------------------------------------------------------------------------------------------------
// Scoring: reference/scoring.h, in float32.

__device__ __forceinline__ float sigmoid(float l) { return 1.0f / (1.0f + expf(-l)); }

// s = exp(l - m) / z for softmax (m = the row max, z = sum_e exp(l_e - m)); elementwise otherwise.
__device__ __forceinline__ float score_of(float l, const Route& r, float m, float z) {
  switch (r.scoring) {
    case Scoring::softmax: return expf(l - m) / z;
    case Scoring::sigmoid: return sigmoid(l);
    case Scoring::sqrt_softplus: return sqrtf(fmaxf(l, 0.0f) + log1pf(expf(-fabsf(l))));
  }
  return 0.0f;
}

// What the top-k ranks for expert e: the logit, or the score plus the selection bias.
__device__ __forceinline__ float rank_value(float l, int e, const Route& r, float m, float z) {
  if (r.ranks_logits) return l;
  const float s = score_of(l, r, m, z);
  return r.selection_bias != nullptr ? s + r.selection_bias[e] : s;
}

// -------------------------------------------------------------------------------------------------
// Ranking. Every ranking is by value, larger first, equal values by id, lower first: the order of
// a stable sort by descending value (reference/selection.h). A Candidate with id < 0 is "none".
struct Candidate {
  float value;
  int id;
};

// a ranks before b.
__device__ __forceinline__ bool better(Candidate a, Candidate b) {
  return b.id < 0 || (a.id >= 0 && (a.value > b.value || (a.value == b.value && a.id < b.id)));
}
// a ranks after `last`, the previous round's winner (none: the first round, everything qualifies).
// k rounds of "the best after the last" give the top-k without marking or sorting anything.
__device__ __forceinline__ bool after(Candidate a, Candidate last) { return last.id < 0 || better(last, a); }

// A team of kLanes threads shares one token: 1 (kernel 1) or a warp of 32 (kernels 2 and 3). Each
// lane takes the elements lane, lane + kLanes, ...; the reductions combine the lanes (butterfly
// shuffles: every lane gets the result) and are the identity for a team of one.
template <int kLanes>
__device__ __forceinline__ float team_max(float v) {
  if constexpr (kLanes > 1) {
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  }
  return v;
}
template <int kLanes>
__device__ __forceinline__ float team_sum(float v) {
  if constexpr (kLanes > 1) {
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}
// The best candidate of the team. The order is total, so every lane ends with the same one.
template <int kLanes>
__device__ __forceinline__ Candidate team_best(Candidate c) {
  if constexpr (kLanes > 1) {
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset /= 2) {
      const Candidate other{__shfl_xor_sync(kFullMask, c.value, offset), __shfl_xor_sync(kFullMask, c.id, offset)};
      if (better(other, c)) c = other;
    }
  }
  return c;
}
template <int kLanes>
__device__ __forceinline__ void team_sync() {
  if constexpr (kLanes > 1) __syncwarp();
}

// A group's score from its S ranked values, exactly as reference/selection.cpp: the largest, or the
// sum of the two largest (DeepSeek-V3: top2_sum; V2's group_limited_greedy and devices: max).
__device__ float group_score(const float* v, int S, bool max_only) {
  float first = v[0];
  float second = -INFINITY;
  for (int i = 1; i < S; ++i) {
    const float x = v[i];
    if (x > first) {
      second = first;
      first = x;
    } else if (x > second) {
      second = x;
    }
  }
  return max_only ? first : first + second;
}

// Routes token t from its logits l (E): scores, selection, gates; writes ids[t, :] and gates[t, :].
// ws (E) is the team's scratch for the ranked values. All kLanes lanes must call it together.
template <int kLanes>
__device__ void route_token(const float* l, float* ws, std::int64_t t, const Route& r, int lane) {
  const int E = r.E;
  team_sync<kLanes>();  // the team's previous token may still be reading ws

  // 1. Softmax statistics, where the scores are softmax and used: m = max_e l_e, z = sum_e e^(l_e - m).
  float m = 0.0f;
  float z = 1.0f;
  if (!r.ranks_logits && r.scoring == Scoring::softmax) {
    float part = -INFINITY;
    for (int e = lane; e < E; e += kLanes) part = fmaxf(part, l[e]);
    m = team_max<kLanes>(part);
    part = 0.0f;
    for (int e = lane; e < E; e += kLanes) part += expf(l[e] - m);
    z = team_sum<kLanes>(part);
  }

  // 2. The values the top-k ranks.
  for (int e = lane; e < E; e += kLanes) ws[e] = rank_value(l[e], e, r, m, z);
  team_sync<kLanes>();

  // 3. Group-limited selection (DeepSeek-V3 sec. 2.1.2; V2 device-limited routing): keep the
  //    topk_group best groups, rank the experts of the others as mask_value. The kept groups are
  //    those that do not come after the last one kept, so nothing but that one needs storing.
  if (r.n_group > 0) {
    const int G = r.n_group;
    const int S = E / G;
    Candidate last_kept{0.0f, -1};
    for (int round = 0; round < r.topk_group; ++round) {
      Candidate best{0.0f, -1};
      for (int g = lane; g < G; g += kLanes) {
        const Candidate c{group_score(ws + g * S, S, r.group_max), g};
        if (after(c, last_kept) && better(c, best)) best = c;
      }
      last_kept = team_best<kLanes>(best);
    }
    // Group g is read and written by lane g % kLanes only, and every lane has passed the last
    // team_best (a shuffle of all lanes) before any writes.
    for (int g = lane; g < G; g += kLanes) {
      const Candidate c{group_score(ws + g * S, S, r.group_max), g};
      if (after(c, last_kept)) {
        for (int i = 0; i < S; ++i) ws[g * S + i] = r.mask_value;
      }
    }
    team_sync<kLanes>();
  }

  // 4. Top-k: k rounds of "the best after the last winner", ties to the lower id. The j-th winner
  //    is kept by lane j % kLanes, in slot j / kLanes.
  constexpr int kSlots = kMaxTopK / kLanes;
  int chosen[kSlots] = {};
  Candidate last{0.0f, -1};
  for (int j = 0; j < r.k; ++j) {
    Candidate best{0.0f, -1};
    for (int e = lane; e < E; e += kLanes) {
      const Candidate c{ws[e], e};
      if (after(c, last) && better(c, best)) best = c;
    }
    last = team_best<kLanes>(best);
    if (j % kLanes == lane) chosen[j / kLanes] = last.id;
  }

  // 5. Gates (reference/gating.h): raw weights, the softmax over the selected logits, the
  //    renormalisation r_j / (sum_i r_i + eps), then the routed scaling factor.
  float raw[kSlots] = {};
  float part_max = -INFINITY;
  for (int s = 0; s < kSlots; ++s) {
    if (lane + s * kLanes >= r.k) break;
    const float lj = l[chosen[s]];
    switch (r.gate) {
      case GateKind::selected_scores: raw[s] = score_of(lj, r, m, z); break;
      case GateKind::softmax_of_selected_logits: raw[s] = lj; part_max = fmaxf(part_max, lj); break;
      case GateKind::sigmoid_of_selected_logits: raw[s] = sigmoid(lj); break;
      case GateKind::ones: raw[s] = 1.0f; break;
    }
  }
  if (r.gate == GateKind::softmax_of_selected_logits) {
    const float mk = team_max<kLanes>(part_max);
    float part = 0.0f;
    for (int s = 0; s < kSlots; ++s) {
      if (lane + s * kLanes >= r.k) break;
      raw[s] = expf(raw[s] - mk);
      part += raw[s];
    }
    const float sum = team_sum<kLanes>(part);
    for (int s = 0; s < kSlots; ++s) raw[s] /= sum;
  }
  if (r.renormalize) {
    float part = 0.0f;
    for (int s = 0; s < kSlots; ++s) {
      if (lane + s * kLanes >= r.k) break;
      part += raw[s];
    }
    const float denominator = team_sum<kLanes>(part) + r.renorm_eps;
    for (int s = 0; s < kSlots; ++s) raw[s] /= denominator;
  }
  for (int s = 0; s < kSlots; ++s) {
    const int j = lane + s * kLanes;
    if (j >= r.k) break;
    r.ids[t * r.k + j] = chosen[s];
    r.gates[t * r.k + j] = r.scaling * raw[s];
  }
}

// -------------------------------------------------------------------------------------------------
// Kernel 1: one thread per token, everything in order.

constexpr int kThreads1 = 128;

template <typename X, typename W>
__global__ void __launch_bounds__(kThreads1)
    router_kernel1(const X* __restrict__ x, const W* __restrict__ w, Route r) {
  const std::int64_t t = std::int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (t >= r.T) return;
  float l[kMaxExperts];   // (E) the token's logits: local memory
  float ws[kMaxExperts];  // (E) route_token's scratch
  const X* xt = x + t * r.C;
  for (int e = 0; e < r.E; ++e) {
    const W* we = w + std::int64_t{e} * r.C;
    float acc = 0.0f;
    for (int c = 0; c < r.C; ++c) acc = fmaf(x_value<X, W>(xt[c]), to_float(we[c]), acc);
    l[e] = finish_logit(acc, e, r);
    if (r.logits != nullptr) r.logits[t * r.E + e] = l[e];
  }
  route_token<1>(l, ws, t, r, 0);
}

// -------------------------------------------------------------------------------------------------
// Kernel 2: one warp per token.

constexpr int kWarps2 = 4;  // tokens per block
constexpr int kExpertsAtOnce2 = 4;

// vec: C % 8 == 0 and x, W 16-byte aligned, so that lane loads 8 elements at c = 8 lane + 256 i.
template <typename X, typename W>
__global__ void __launch_bounds__(kWarps2 * kWarpSize)
    router_kernel2(const X* __restrict__ x, const W* __restrict__ w, Route r, bool vec) {
  extern __shared__ float4 smem2[];  // (warps, 2 E): each warp's logits and route_token scratch
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const std::int64_t t = std::int64_t{blockIdx.x} * kWarps2 + warp;
  if (t >= r.T) return;  // the whole warp: route_token needs all 32 lanes
  float* l = reinterpret_cast<float*>(smem2) + 2 * warp * r.E;
  float* ws = l + r.E;
  const X* xt = x + t * r.C;

  for (int e0 = 0; e0 < r.E; e0 += kExpertsAtOnce2) {
    float acc[kExpertsAtOnce2] = {};  // this lane's part of l[e0 + q]
    if (vec) {
      for (int c = 8 * lane; c < r.C; c += 8 * kWarpSize) {
        float xv[8];
        load8_x<X, W>(xt + c, xv);
#pragma unroll
        for (int q = 0; q < kExpertsAtOnce2; ++q) {
          if (e0 + q >= r.E) break;
          float wv[8];
          load8(w + std::int64_t{e0 + q} * r.C + c, wv);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[q] = fmaf(xv[i], wv[i], acc[q]);
        }
      }
    } else {
      for (int c = lane; c < r.C; c += kWarpSize) {
        const float xc = x_value<X, W>(xt[c]);
#pragma unroll
        for (int q = 0; q < kExpertsAtOnce2; ++q) {
          if (e0 + q >= r.E) break;
          acc[q] = fmaf(xc, to_float(w[std::int64_t{e0 + q} * r.C + c]), acc[q]);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kExpertsAtOnce2; ++q) {
      const float sum = team_sum<kWarpSize>(acc[q]);
      if (lane == q && e0 + q < r.E) l[e0 + q] = finish_logit(sum, e0 + q, r);
    }
  }
  __syncwarp();
  if (r.logits != nullptr) {
    for (int e = lane; e < r.E; e += kWarpSize) r.logits[t * r.E + e] = l[e];
  }
  route_token<kWarpSize>(l, ws, t, r, lane);
}

// -------------------------------------------------------------------------------------------------
// Kernel 3: a block per tile of TM tokens, x and W tiles through shared memory.
//
// The block computes its (TM, E) logits chunk by chunk of TN experts; each chunk accumulates over
// C in steps of TK in registers. Thread (tx, ty) owns tokens ty + kTokenThreads i (i < MR)
// and experts tx + kExpertThreads j (j < 4) of the chunk: strided, so that in a quarter warp the
// W rows read are consecutive and the x rows equal (no bank conflicts with the padded rows of
// kLd = TK + 4 floats). Every logit is one sequential fmaf chain over c, whoever computes it, so
// equal weight rows give bitwise equal logits (the ties the reference breaks by id stay ties).
// The tile loads for step i + 1 are issued to registers before step i is computed (register
// prefetch), and are written to shared memory after it: one buffer, two barriers a step.

constexpr int kThreads3 = 128;
constexpr int kWarps3 = kThreads3 / kWarpSize;

template <int TM_, int TN_, int TK_>
struct Tile3 {
  static constexpr int TM = TM_;                                 // tokens per block
  static constexpr int TN = TN_;                                 // experts per chunk
  static constexpr int TK = TK_;                                 // C per step
  static constexpr int kLd = TK + 4;                             // padded row of a shared tile
  static constexpr int kExpertThreads = TN / 4;                  // 4 experts each
  static constexpr int kTokenThreads = kThreads3 / kExpertThreads;
  static constexpr int MR = TM / kTokenThreads;                  // tokens each
  static constexpr int kXVectors = (TM * TK / 8 + kThreads3 - 1) / kThreads3;  // 8-element loads a thread
  static constexpr int kWVectors = (TN * TK / 8 + kThreads3 - 1) / kThreads3;
  static_assert(TN % 4 == 0 && TK % 8 == 0 && kThreads3 % kExpertThreads == 0 && TM % kTokenThreads == 0 &&
                MR >= 1);
  // Shared floats: the (TM, E) logits, then the GEMM tiles, which route_token's scratch
  // (kWarps3, E) replaces once the GEMM is done.
  static std::size_t shared_bytes(int E) {
    const std::size_t gemm = std::size_t{TM + TN} * kLd;
    const std::size_t scratch = std::size_t{kWarps3} * E;
    return sizeof(float) * (std::size_t{TM} * E + (gemm > scratch ? gemm : scratch));
  }
};
// E <= 8 (Mixtral) and E <= 32: 64 tokens a block, TK = 32. E <= 256: 32 tokens, 4 x 4 per thread,
// chunks of 64, TK = 32. E <= 1024: 8 tokens, so that the (8, E) logits fit (32 KB); 1 x 4 per thread.
// Every configuration stays within the 48 KB of dynamic shared memory a launch gets by default.
// Measured on an H100 at T = 16384, Mixtral's kernel 3 (288 us) is slower than kernel 2 (129 us):
// with E = 8 there is so little arithmetic per element that the block mostly waits for each step's
// loads. Deeper steps (TK = 128 for E <= 8) should put four times the bytes in flight per wait;
// that change compiles but has not yet run on a GPU, so these are the tiles that were checked.
using Tile3Small = Tile3<64, 8, 32>;
using Tile3Medium = Tile3<64, 32, 32>;
using Tile3Large = Tile3<32, 64, 32>;
using Tile3Huge = Tile3<8, 64, 32>;

// Loads rows [row0, row0 + ROWS) x columns [c0, c0 + TK) of a row-major (rows, C) matrix into
// registers, as floats: 8-element vectors where vec and the vector lies inside C, else element by
// element with zeros outside the matrix (the tails of T, E and C).
template <int ROWS, int TK, int kVectors, typename Src, typename Convert>
__device__ __forceinline__ void load_tile(float (&stage)[kVectors][8], const Src* src, std::int64_t row0,
                                          std::int64_t rows, int C, int c0, bool vec, Convert convert) {
  constexpr int kPerRow = TK / 8;  // vectors per row
#pragma unroll
  for (int s = 0; s < kVectors; ++s) {
    const int v = static_cast<int>(threadIdx.x) + s * kThreads3;
    if (v >= ROWS * kPerRow) break;
    const int row = v / kPerRow;
    const int c = c0 + (v % kPerRow) * 8;
    const std::int64_t grow = row0 + row;
    const Src* p = src + grow * C + c;
    if (grow < rows && vec && c < C) {  // vec: C % 8 == 0, so c < C means the whole vector is in
      load8(p, stage[s]);
#pragma unroll
      for (int i = 0; i < 8; ++i) stage[s][i] = convert(stage[s][i]);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) stage[s][i] = grow < rows && c + i < C ? convert(to_float(p[i])) : 0.0f;
    }
  }
}

// Stores what load_tile staged into a (ROWS, kLd) shared tile.
template <int ROWS, int TK, int kVectors, int kLd>
__device__ __forceinline__ void store_tile(float* tile, const float (&stage)[kVectors][8]) {
  constexpr int kPerRow = TK / 8;
#pragma unroll
  for (int s = 0; s < kVectors; ++s) {
    const int v = static_cast<int>(threadIdx.x) + s * kThreads3;
    if (v >= ROWS * kPerRow) break;
    float4* dst = reinterpret_cast<float4*>(tile + (v / kPerRow) * kLd + (v % kPerRow) * 8);
    dst[0] = make_float4(stage[s][0], stage[s][1], stage[s][2], stage[s][3]);
    dst[1] = make_float4(stage[s][4], stage[s][5], stage[s][6], stage[s][7]);
  }
}

template <typename Tile, typename X, typename W>
__global__ void __launch_bounds__(kThreads3)
    router_kernel3(const X* __restrict__ x, const W* __restrict__ w, Route r, bool vec) {
  constexpr int TM = Tile::TM, TN = Tile::TN, TK = Tile::TK, kLd = Tile::kLd, MR = Tile::MR;
  constexpr int kExpertThreads = Tile::kExpertThreads, kTokenThreads = Tile::kTokenThreads;
  extern __shared__ float4 smem3[];
  float* tile_logits = reinterpret_cast<float*>(smem3);  // (TM, E)
  float* xs = tile_logits + TM * r.E;                     // (TM, kLd) x tile
  float* wsm = xs + TM * kLd;                             // (TN, kLd) W tile
  float* scratch = xs;                                    // (kWarps3, E) after the GEMM

  const int tx = static_cast<int>(threadIdx.x) % kExpertThreads;
  const int ty = static_cast<int>(threadIdx.x) / kExpertThreads;
  const std::int64_t t0 = std::int64_t{blockIdx.x} * TM;
  const int steps = (r.C + TK - 1) / TK;      // along C, per chunk
  const int chunks = (r.E + TN - 1) / TN;     // of experts
  const int total = steps * chunks;
  const auto x_convert = [](float v) {
    if constexpr (std::is_same_v<X, float> && std::is_same_v<W, Bf16>) return round_bf16(v);
    return v;
  };
  const auto w_convert = [](float v) { return v; };

  float x_stage[Tile::kXVectors][8];
  float w_stage[Tile::kWVectors][8];
  float acc[MR][4] = {};
  load_tile<TM, TK>(x_stage, x, t0, r.T, r.C, 0, vec, x_convert);
  load_tile<TN, TK>(w_stage, w, 0, r.E, r.C, 0, vec, w_convert);
  for (int it = 0; it < total; ++it) {
    const int chunk = it / steps;
    const int step = it % steps;
    store_tile<TM, TK, Tile::kXVectors, kLd>(xs, x_stage);
    store_tile<TN, TK, Tile::kWVectors, kLd>(wsm, w_stage);
    __syncthreads();
    if (it + 1 < total) {  // prefetch the next step while this one is computed
      const int next_chunk = (it + 1) / steps;
      const int next_c0 = ((it + 1) % steps) * TK;
      load_tile<TM, TK>(x_stage, x, t0, r.T, r.C, next_c0, vec, x_convert);
      load_tile<TN, TK>(w_stage, w, std::int64_t{next_chunk} * TN, r.E, r.C, next_c0, vec, w_convert);
    }
#pragma unroll
    for (int kk = 0; kk < TK; kk += 4) {
      float4 a[MR];
      float4 b[4];
#pragma unroll
      for (int i = 0; i < MR; ++i) a[i] = *reinterpret_cast<const float4*>(xs + (ty + kTokenThreads * i) * kLd + kk);
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = *reinterpret_cast<const float4*>(wsm + (tx + kExpertThreads * j) * kLd + kk);
#pragma unroll
      for (int i = 0; i < MR; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // in order of c: the same fmaf chain for every logit
          acc[i][j] = fmaf(a[i].x, b[j].x, acc[i][j]);
          acc[i][j] = fmaf(a[i].y, b[j].y, acc[i][j]);
          acc[i][j] = fmaf(a[i].z, b[j].z, acc[i][j]);
          acc[i][j] = fmaf(a[i].w, b[j].w, acc[i][j]);
        }
      }
    }
    if (step == steps - 1) {  // the chunk's logits are complete
#pragma unroll
      for (int i = 0; i < MR; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int e = chunk * TN + tx + kExpertThreads * j;
          if (e < r.E) tile_logits[(ty + kTokenThreads * i) * r.E + e] = finish_logit(acc[i][j], e, r);
          acc[i][j] = 0.0f;
        }
      }
    }
    __syncthreads();
  }

  // Routing: warp w takes tokens w, w + kWarps3, ... of the tile.
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const std::int64_t left = r.T - t0;
  const int rows = left < TM ? static_cast<int>(left) : TM;
  float* ws = scratch + warp * r.E;
  for (int row = warp; row < rows; row += kWarps3) {
    const float* l = tile_logits + row * r.E;
    const std::int64_t t = t0 + row;
    if (r.logits != nullptr) {
      for (int e = lane; e < r.E; e += kWarpSize) r.logits[t * r.E + e] = l[e];
    }
    route_token<kWarpSize>(l, ws, t, r, lane);
  }
}

// -------------------------------------------------------------------------------------------------
// Launchers and the dispatcher.

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

template <typename Tile, typename X, typename W>
void launch3(const X* x, const W* w, const Route& r, bool vec, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(ceil_div(r.T, Tile::TM));
  router_kernel3<Tile, X, W><<<blocks, kThreads3, Tile::shared_bytes(r.E), stream>>>(x, w, r, vec);
}

template <typename X, typename W>
void launch_typed(int version, const void* x_raw, const void* w_raw, const Route& r, bool vec, cudaStream_t stream) {
  const X* x = static_cast<const X*>(x_raw);
  const W* w = static_cast<const W*>(w_raw);
  switch (version) {
    case 1:
      router_kernel1<X, W><<<static_cast<unsigned>(ceil_div(r.T, kThreads1)), kThreads1, 0, stream>>>(x, w, r);
      check_launch("router_kernel1");
      break;
    case 2: {
      const std::size_t shared = sizeof(float) * 2 * kWarps2 * static_cast<std::size_t>(r.E);
      router_kernel2<X, W><<<static_cast<unsigned>(ceil_div(r.T, kWarps2)), kWarps2 * kWarpSize, shared, stream>>>(
          x, w, r, vec);
      check_launch("router_kernel2");
      break;
    }
    case 3:
      if (r.E <= Tile3Small::TN) {
        launch3<Tile3Small>(x, w, r, vec, stream);
      } else if (r.E <= Tile3Medium::TN) {
        launch3<Tile3Medium>(x, w, r, vec, stream);
      } else if (r.E <= 256) {
        launch3<Tile3Large>(x, w, r, vec, stream);
      } else {
        launch3<Tile3Huge>(x, w, r, vec, stream);
      }
      check_launch("router_kernel3");
      break;
    default: fail("version", version, "unreachable: checked by launch_router");
  }
}

// The gates come from the selected logits, so the top-k ranks the logits (reference/routing.cpp).
bool ranks_logits(const RoutingConfig& c) {
  return c.gating.kind == GateKind::softmax_of_selected_logits || c.gating.kind == GateKind::sigmoid_of_selected_logits;
}

Route make_route(const RouterArgs& a, const RoutingConfig& c) {
  Route r;
  r.T = a.tokens;
  r.C = static_cast<int>(c.router.hidden_size);
  r.E = static_cast<int>(c.num_experts());
  r.k = c.top_k;
  r.scoring = c.scoring;
  r.ranks_logits = ranks_logits(c);
  r.gate = c.gating.kind;
  r.renormalize = c.gating.renormalize;
  r.renorm_eps = static_cast<float>(c.gating.renorm_eps);
  r.scaling = static_cast<float>(c.gating.routed_scaling_factor);
  if (c.selection == SelectionKind::group_limited) {
    r.n_group = c.group.n_group;
    r.topk_group = c.group.topk_group;
    r.group_max = c.group.score == GroupScore::max;
    r.mask_value = c.group.mask == GroupMask::neg_inf ? -std::numeric_limits<float>::infinity() : 0.0f;
  } else if (c.selection == SelectionKind::device_limited) {  // groups = devices, max, -inf
    r.n_group = c.num_devices;
    r.topk_group = c.topk_devices;
    r.group_max = true;
    r.mask_value = -std::numeric_limits<float>::infinity();
  }
  r.bf16_router = c.router.dtype == Format::bf16;
  r.bias = c.router.use_bias ? a.bias : nullptr;
  r.selection_bias = c.use_selection_bias ? a.selection_bias : nullptr;
  r.logits = a.logits;
  r.ids = a.ids;
  r.gates = a.gates;
  return r;
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace

std::string router_unsupported(const RoutingConfig& config) {
  const SelectionKind s = config.selection;
  if (s == SelectionKind::expert_choice || s == SelectionKind::hash || s == SelectionKind::table) {
    return fmt::format("selection = {}: the CUDA router does token-choice top-k (topk, group_limited, "
                       "device_limited) only",
                       selection_kind_name(s));
  }
  if (config.router.noise != RouterNoise::none) {
    return fmt::format("router.noise = {}: the CUDA router is for inference (noise is a training-time "
                       "perturbation; evaluate with noise = none)",
                       router_noise_name(config.router.noise));
  }
  if (config.router.dtype != Format::fp32 && config.router.dtype != Format::bf16) {
    return fmt::format("router.dtype = {}: the CUDA router computes in fp32 or bf16", format_name(config.router.dtype));
  }
  const Index E = config.num_experts();
  if (E < 1 || E > kMaxExperts) {
    return fmt::format("router.num_experts = {}: the CUDA router handles 1 to {} experts (one token's logits "
                       "live in shared memory)",
                       E, kMaxExperts);
  }
  if (config.top_k < 1 || config.top_k > kMaxTopK) {
    return fmt::format("top_k = {}: the CUDA router selects 1 to {} experts (one per lane of a warp)", config.top_k,
                       kMaxTopK);
  }
  if (config.top_k > E) return fmt::format("top_k = {}: must not exceed num_experts = {}", config.top_k, E);
  const Index C = config.router.hidden_size;
  if (C < 1 || C > std::numeric_limits<int>::max()) {
    return fmt::format("router.hidden_size = {}: the CUDA router handles 1 to 2^31 - 1 channels", C);
  }
  return "";
}

void launch_router(const RouterArgs& args, const RoutingConfig& config, int version, cudaStream_t stream) {
  config.validate();
  if (std::string why = router_unsupported(config); !why.empty()) throw Error(why);
  require(version >= 1 && version <= kRouterVersions, "version", version,
          fmt::format("must be in [1, {}]", kRouterVersions));
  require(args.x_dtype == Format::fp32 || args.x_dtype == Format::bf16, "x_dtype", format_name(args.x_dtype),
          "must be fp32 or bf16");
  require(args.tokens >= 0 && args.tokens <= std::numeric_limits<std::int32_t>::max(), "tokens", args.tokens,
          "must be in [0, 2^31 - 1]");
  if (args.tokens == 0) return;
  require(args.x != nullptr, "x", "null", "must point to (T, C) activations on the device");
  require(args.weight != nullptr, "weight", "null", "must point to the (E, C) router weight on the device");
  require(!config.router.use_bias || args.bias != nullptr, "bias", "null",
          "must point to (E) floats on the device when router.use_bias");
  require(!config.use_selection_bias || args.selection_bias != nullptr, "selection_bias", "null",
          "must point to (E) floats on the device when use_selection_bias");
  require(args.ids != nullptr, "ids", "null", "must point to (T, k) int32 on the device");
  require(args.gates != nullptr, "gates", "null", "must point to (T, k) floats on the device");

  const Route r = make_route(args, config);
  // 16-byte vector loads of whole rows: C a multiple of 8 and both matrices 16-byte aligned.
  const bool vec = r.C % 8 == 0 && aligned16(args.x) && aligned16(args.weight);
  const bool x_bf16 = args.x_dtype == Format::bf16;
  if (r.bf16_router) {
    if (x_bf16) {
      launch_typed<Bf16, Bf16>(version, args.x, args.weight, r, vec, stream);
    } else {
      launch_typed<float, Bf16>(version, args.x, args.weight, r, vec, stream);
    }
  } else {
    if (x_bf16) {
      launch_typed<Bf16, float>(version, args.x, args.weight, r, vec, stream);
    } else {
      launch_typed<float, float>(version, args.x, args.weight, r, vec, stream);
    }
  }
}

}  // namespace moelab::cuda
