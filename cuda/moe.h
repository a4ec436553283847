// moelab/cuda/moe.h — one MoE layer's forward on the GPU, as one call: router -> permutation ->
// gate/up GEMM with SwiGLU -> down GEMM -> combine (+ shared experts).
//
// The same function as moelab::moe_layer_forward (reference/layer.h) for the token-choice, dropless
// layers of the presets, computed as a bf16 model computes it: activations and expert weights in
// bf16, every GEMM accumulated in fp32 on tensor cores, the router in fp32 or bf16 (its preset's
// dtype), the combine in fp32, y written in bf16 (or fp32). The stages are the ladders of cuda/:
//   router.h       logits + scoring + top-k + gating                       ids, gates (T, k)
//   permute.h      histogram, prefix sum, stable scatter                   offsets, row_token, pair_row
//   expert_gemm.h  hidden = SwiGLU(x[row_token] Wgu^T), out = hidden Wd^T  (rows, H), (rows, C)
//   combine.h      y_t = sum_j g_tj out[pair_row[t, j]] + shared_t
// Shared experts run as one more expert over all T tokens: S shared experts of width Hs are one
// expert of width S Hs (their gate/up rows and down columns concatenated), which is exact:
// sum_s Wd_s h_s = [Wd_1 ... Wd_S] [h_1; ...; h_S].
// No host synchronisation between the stages: every size is known on the host (dropless: T k rows),
// so a whole forward can be captured in a CUDA graph and replayed (MoeLayer::forward on a
// capturing stream).
//
// A plain C++ header: the tests and tools include it with g++.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "cuda/device.h"
#include "reference/layer.h"
#include "reference/types.h"

namespace moelab::cuda {

// "" if the CUDA layer computes `config`, else why not (first reason found): the router's (see
// router_unsupported), capacity (only dropless), activation (only swiglu), expert biases, sizes
// (C and H multiples of 8).
std::string moe_unsupported(const LayerConfig& config);

// Which version of each ladder a forward uses; the defaults are the fastest that run everywhere
// (expert GEMM version 3 needs sm_90: MoeLayer picks it on Hopper when gemm_version is 0 = auto).
struct MoeVersions {
  int router = 3;
  int permute = 2;
  int gemm = 0;  // 0: the fastest for this device (3 on sm_90, else 2)
  int combine = 2;
};

// Where the gate multiplies, for gate_placement output (the gate on the input is always applied in
// the gate/up GEMM's epilogue): in the combine (expert_out stays the expert's own output, as in the
// reference's LayerOutput::expert_out), or in the down GEMM's epilogue.
enum class GateIn { combine, down_epilogue };

// Device-side weights and workspace of one layer. Construction uploads the parameters, rounded to
// bf16 (router: to its dtype), and allocates the workspace for up to max_tokens tokens.
class MoeLayer {
 public:
  MoeLayer(const LayerConfig& config, const LayerParams& params, std::int64_t max_tokens);
  // Weights drawn on the device (for benchmarks at full model widths, where the host copy alone
  // would be tens of GB): every weight ~ U(-a, a) with a = sqrt(3) / sqrt(fan_in) (std 1/sqrt(fan_in)),
  // from a counter-based hash of (seed, tensor, index); router and selection bias as the init_layer.
  static MoeLayer random(const LayerConfig& config, std::int64_t max_tokens, std::uint64_t seed);

  // y (T, C) in y_dtype (bf16 or fp32) = the layer applied to x (T, C) bf16; device pointers.
  // T <= max_tokens. Asynchronous on `stream`; capturable in a CUDA graph.
  void forward(void* y, Format y_dtype, const Bf16Bits* x, std::int64_t tokens, cudaStream_t stream = nullptr);

  MoeVersions versions;
  GateIn gate_in = GateIn::combine;

  const LayerConfig& config() const { return config_; }
  std::int64_t max_tokens() const { return max_tokens_; }
  int gemm_version() const;  // versions.gemm resolved for this device

  // The intermediate results of the last forward, on the device (for tests, golden checks, the viewer).
  struct Intermediates {
    DeviceBuffer<std::int32_t> ids;        // (max_tokens, k)
    DeviceBuffer<float> gates;             // (max_tokens, k)
    DeviceBuffer<float> logits;            // (max_tokens, E)
    DeviceBuffer<std::int32_t> counts;     // (E)
    DeviceBuffer<std::int32_t> offsets;    // (E + 1)
    DeviceBuffer<std::int32_t> row_token;  // (max rows)
    DeviceBuffer<float> row_gate;          // (max rows)
    DeviceBuffer<std::int32_t> pair_row;   // (max_tokens, k)
    DeviceBuffer<std::uint8_t> permute_workspace;
    DeviceBuffer<Bf16Bits> hidden;         // (max rows, H)
    DeviceBuffer<Bf16Bits> expert_out;     // (max rows, C)
    DeviceBuffer<std::int32_t> shared_offsets;  // (2) = {0, T}
    DeviceBuffer<Bf16Bits> shared_hidden;  // (max_tokens, S Hs)
    DeviceBuffer<Bf16Bits> shared_out;     // (max_tokens, C)
    DeviceBuffer<float> shared_gate;       // (max_tokens) when the shared expert is gated
  };
  const Intermediates& intermediates() const { return work_; }

  // Bytes of weights on the device (router + routed + shared), for the benchmarks' accounting.
  std::size_t weight_bytes() const;
  // The device weights, for baselines that run the same layer another way (cuBLAS, PyTorch).
  const Bf16Bits* w_gate_up() const { return w_gate_up_.data(); }    // (E, 2H, C)
  const Bf16Bits* w_down() const { return w_down_.data(); }          // (E, C, H)

 private:
  MoeLayer(const LayerConfig& config, std::int64_t max_tokens);  // validates, allocates; no weights
  LayerConfig config_;
  std::int64_t max_tokens_ = 0;
  std::int64_t max_rows_ = 0;
  Index shared_width_ = 0;  // S Hs
  DeviceBuffer<float> router_weight_f32_;       // (E, C) when the router is fp32
  DeviceBuffer<Bf16Bits> router_weight_bf16_;   // (E, C) when the router is bf16
  DeviceBuffer<float> router_bias_;             // (E) or empty
  DeviceBuffer<float> selection_bias_;          // (E) or empty
  DeviceBuffer<Bf16Bits> w_gate_up_;            // (E, 2H, C)
  DeviceBuffer<Bf16Bits> w_down_;               // (E, C, H)
  DeviceBuffer<Bf16Bits> shared_gate_up_;       // (1, 2 S Hs, C)
  DeviceBuffer<Bf16Bits> shared_down_;          // (1, C, S Hs)
  DeviceBuffer<Bf16Bits> shared_gate_weight_;   // (C) when gated
  Intermediates work_;
};

// The host-side convenience the tests, `moelab check --impl cuda` and the notebooks use: uploads
// `params` and x (rounded to bf16), runs one forward and brings everything back.
struct MoeResult {
  Matrix y;               // (T, C), y_dtype values as float
  IndexMatrix ids;        // (T, k)
  Matrix gates;           // (T, k)
  Matrix logits;          // (T, E)
  std::vector<std::int64_t> counts, offsets;  // (E), (E + 1)
  std::vector<std::int32_t> row_token;        // (N)
  Matrix expert_out;      // (N, C): each row's expert output (before the gate when it is applied in the combine)
};
MoeResult moe_forward(const LayerConfig& config, const LayerParams& params, const Matrix& x,
                      Format y_dtype = Format::bf16, const MoeVersions& versions = {});

}  // namespace moelab::cuda
