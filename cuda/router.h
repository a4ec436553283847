// moelab/cuda/router.h — the router on the GPU: logits GEMM fused with scoring, selection and
// gating, producing each token's expert ids and gates. A ladder of versions in router.cu.
//
// The same function as moelab::route_forward (reference/routing.h) for the token-choice
// conventions of the presets:
//   logits  = x W^T (+ b)                 fp32 accumulation; W in fp32 (router.dtype fp32) or bf16
//                                          (router.dtype bf16, and then the logits are rounded to
//                                          bf16 as the reference does); x in fp32 or bf16
//   scores  = softmax | sigmoid | sqrt_softplus (logits)
//   ids     = top-k of (scores + selection bias), or of the logits where the gates come from the
//             selected logits; group-limited and device-limited top-k (reference/selection.h);
//             ties go to the lower expert id, as in the reference
//   gates   = selected scores | softmax/sigmoid of the selected logits | ones, optionally
//             renormalised (+ eps) and scaled by routed_scaling_factor (reference/gating.h)
// Not supported (router_unsupported says which and why): expert choice, hash and table selection,
// router noise (training only), router dtype fp16, E > 1024 or k > 32.
//
// A plain C++ header: the tests and tools include it with g++.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "cuda/device.h"
#include "reference/numerics.h"
#include "reference/routing.h"

namespace moelab::cuda {

// "" if the CUDA router computes `config`, else why not ("selection = expert_choice: ...").
std::string router_unsupported(const RoutingConfig& config);

// 1: one thread per token: the whole dot products, scoring and selection in one thread. Obvious.
// 2: one warp per token: lanes split C for coalesced loads, warp-shuffle reductions and a warp top-k.
// 3: a block per tile of tokens: x and W tiles through shared memory, so W is read once per tile
//    of tokens instead of once per token; selection by one warp per token, E up to 1024.
inline constexpr int kRouterVersions = 3;

struct RouterArgs {
  const void* x = nullptr;               // (T, C) device, in x_dtype
  Format x_dtype = Format::bf16;         // fp32 (float) or bf16 (Bf16Bits)
  const void* weight = nullptr;          // (E, C) device: float if config.router.dtype is fp32, bf16 if bf16
  const float* bias = nullptr;           // (E) device, when config.router.use_bias; else null (ignored)
  const float* selection_bias = nullptr; // (E) device, when config.use_selection_bias; else null (ignored)
  float* logits = nullptr;               // (T, E) device out, optional (null: not stored)
  std::int32_t* ids = nullptr;           // (T, k) device out
  float* gates = nullptr;                // (T, k) device out
  std::int64_t tokens = 0;               // T (0 is valid: nothing is launched)
};

// Launches router version `version` on `stream`. Checks everything it can without touching the
// device (config.validate(), supported config, version, dtypes, tokens, non-null pointers where
// T > 0) and throws moelab::Error naming the field, the value and the rule; checks the launch.
// Asynchronous: errors inside the kernel surface at the next synchronising call. Capturable in a
// CUDA graph. Any C and any 4-byte-aligned pointers work; C % 8 == 0 with 16-byte-aligned x and
// weight gets the vectorised loads. Logits must be finite: the reference throws on a non-finite
// logit, the kernels do not look (a NaN logit gives unspecified ids).
void launch_router(const RouterArgs& args, const RoutingConfig& config, int version, cudaStream_t stream = nullptr);

}  // namespace moelab::cuda
