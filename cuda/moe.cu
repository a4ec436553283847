// moelab/cuda/moe.cu — one MoE layer's forward on the GPU as one call (cuda/moe.h).
//
// What it shows. How the stages of reference/layer.cpp map onto kernels, and what each passes to
// the next: nothing but device buffers whose sizes the host knows in advance (dropless: T k rows),
// so the forward needs no synchronisation and a CUDA graph can hold it whole. Per forward:
//   launch_router      x -> logits, ids, gates                     (1 kernel)
//   launch_permute     ids, gates -> counts, offsets, row_token,   (1-3 kernels)
//                      row_gate, pair_row
//   launch_gate_up     x[row_token] -> hidden                      (1 kernel; the gather is in its loads)
//   launch_down        hidden -> expert_out                        (1 kernel)
//   shared experts     the same two GEMMs with all T rows, and the shared gate
//   launch_combine     expert_out, gates (+ shared) -> y           (1 kernel)
#include "cuda/moe.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/combine.h"
#include "cuda/expert_gemm.h"
#include "cuda/permute.h"
#include "cuda/router.h"
#include "reference/error.h"

namespace moelab::cuda {
namespace {

// offsets = {0, T} for the shared experts: one "expert" that takes every token. A kernel, not a
// host copy, so that it can sit inside a captured graph with T as a parameter.
__global__ void set_shared_offsets_kernel(std::int32_t* offsets, std::int32_t tokens) {
  offsets[0] = 0;
  offsets[1] = tokens;
}

// SplitMix64 (Steele, Lea and Flood 2014): a counter-based hash, so that weight i of tensor
// `stream` is the same whatever the launch configuration.
__device__ __forceinline__ std::uint64_t splitmix64(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// U(-a, a) from the top 24 bits of the hash of (seed, stream, i).
__device__ __forceinline__ float uniform_symmetric(std::uint64_t seed, std::uint64_t stream, std::uint64_t i,
                                                   float a) {
  const std::uint64_t h = splitmix64(seed ^ splitmix64(stream * 0x100000001B3ull + i));
  const float u = static_cast<float>(h >> 40) * 0x1.0p-24f;  // [0, 1)
  return a * (2.0f * u - 1.0f);
}

__global__ void fill_uniform_bf16_kernel(__nv_bfloat16* out, std::int64_t n, std::uint64_t seed, std::uint64_t stream,
                                         float a) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(uniform_symmetric(seed, stream, static_cast<std::uint64_t>(i), a));
}

__global__ void fill_uniform_f32_kernel(float* out, std::int64_t n, std::uint64_t seed, std::uint64_t stream, float a) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[i] = uniform_symmetric(seed, stream, static_cast<std::uint64_t>(i), a);
}

// Weights with standard deviation 1 / sqrt(fan_in): U(-a, a) has std a / sqrt(3).
float uniform_bound(Index fan_in) { return std::sqrt(3.0f / static_cast<float>(fan_in)); }

template <typename T>
void fill_uniform(DeviceBuffer<T>& buffer, std::uint64_t seed, std::uint64_t stream, Index fan_in) {
  if (buffer.size() == 0) return;
  const auto n = static_cast<std::int64_t>(buffer.size());
  const int blocks = static_cast<int>(std::min<std::int64_t>((n + 255) / 256, 4096));
  if constexpr (std::is_same_v<T, float>) {
    fill_uniform_f32_kernel<<<blocks, 256>>>(buffer.data(), n, seed, stream, uniform_bound(fan_in));
  } else {
    fill_uniform_bf16_kernel<<<blocks, 256>>>(reinterpret_cast<__nv_bfloat16*>(buffer.data()), n, seed, stream,
                                              uniform_bound(fan_in));
  }
  check_launch("fill_uniform");
}

// Appends the rows of m (rows, cols), converted to bf16, to out.
void append_bf16(std::vector<Bf16Bits>& out, const Matrix& m) {
  const std::vector<Bf16Bits> bits = to_bf16(std::span<const float>(m.data(), static_cast<std::size_t>(m.size())));
  out.insert(out.end(), bits.begin(), bits.end());
}

// The shared experts as one expert of width S Hs: gate rows of all, then up rows of all (2 S Hs, C),
// and down (C, S Hs) with the experts' columns side by side.
void concatenate_shared(const std::vector<ExpertParams>& shared, Matrix& gate_up, Matrix& down) {
  const Index C = shared.front().w_up.cols(), Hs = shared.front().w_up.rows();
  const auto S = static_cast<Index>(shared.size());
  gate_up.resize(2 * S * Hs, C);
  down.resize(C, S * Hs);
  for (Index s = 0; s < S; ++s) {
    gate_up.middleRows(s * Hs, Hs) = shared[static_cast<std::size_t>(s)].w_gate;
    gate_up.middleRows((S + s) * Hs, Hs) = shared[static_cast<std::size_t>(s)].w_up;
    down.middleCols(s * Hs, Hs) = shared[static_cast<std::size_t>(s)].w_down;
  }
}

std::vector<std::int64_t> widen(const std::vector<std::int32_t>& v) { return {v.begin(), v.end()}; }

}  // namespace

std::string moe_unsupported(const LayerConfig& config) {
  if (std::string why = router_unsupported(config.routing); !why.empty()) return why;
  if (!config.capacity.dropless)
    return "capacity.dropless = false: the CUDA layer is dropless (token dropping has no kernel yet)";
  if (config.expert.activation != Activation::swiglu)
    return fmt::format("expert.activation = {}: the CUDA experts fuse SwiGLU only",
                       activation_name(config.expert.activation));
  if (config.expert.use_bias) return "expert.use_bias = true: the CUDA experts have no biases";
  if (config.hidden_size() % 8 != 0)
    return fmt::format("hidden_size = {}: must be a multiple of 8 (16-byte bf16 rows)", config.hidden_size());
  if (config.expert.intermediate_size % 8 != 0)
    return fmt::format("expert.intermediate_size = {}: must be a multiple of 8", config.expert.intermediate_size);
  if (config.shared.count > 0 && config.shared.intermediate_size % 8 != 0)
    return fmt::format("shared.intermediate_size = {}: must be a multiple of 8", config.shared.intermediate_size);
  return "";
}

MoeLayer::MoeLayer(const LayerConfig& config, std::int64_t max_tokens) : config_(config), max_tokens_(max_tokens) {
  config.validate();
  if (const std::string why = moe_unsupported(config); !why.empty()) fail("config", "(layer)", why);
  require(max_tokens >= 1, "max_tokens", max_tokens, "must be at least 1");
  const DeviceStatus status = device_status();
  if (!status.available) fail("device", "cuda", status.reason);
  const Index C = config.hidden_size(), E = config.num_experts(), H = config.expert.intermediate_size;
  const int k = config.routing.top_k;
  shared_width_ = config.shared.count * config.shared.intermediate_size;
  max_rows_ = permute_max_rows(max_tokens, k, static_cast<int>(E), 1);
  const auto T = static_cast<std::size_t>(max_tokens);
  const auto rows = static_cast<std::size_t>(max_rows_);
  work_.ids = DeviceBuffer<std::int32_t>(T * k);
  work_.gates = DeviceBuffer<float>(T * k);
  work_.logits = DeviceBuffer<float>(T * E);
  work_.counts = DeviceBuffer<std::int32_t>(E);
  work_.offsets = DeviceBuffer<std::int32_t>(E + 1);
  work_.row_token = DeviceBuffer<std::int32_t>(rows);
  work_.row_gate = DeviceBuffer<float>(rows);
  work_.pair_row = DeviceBuffer<std::int32_t>(T * k);
  const std::size_t scratch = std::max(permute_workspace_bytes(max_tokens, k, static_cast<int>(E), 1),
                                       permute_workspace_bytes(max_tokens, k, static_cast<int>(E), 2));
  work_.permute_workspace = DeviceBuffer<std::uint8_t>(scratch);
  work_.hidden = DeviceBuffer<Bf16Bits>(rows * H);
  work_.expert_out = DeviceBuffer<Bf16Bits>(rows * C);
  if (shared_width_ > 0) {
    work_.shared_offsets = DeviceBuffer<std::int32_t>(2);
    work_.shared_hidden = DeviceBuffer<Bf16Bits>(T * shared_width_);
    work_.shared_out = DeviceBuffer<Bf16Bits>(T * C);
    if (config.shared.gated) work_.shared_gate = DeviceBuffer<float>(T);
  }
}

MoeLayer::MoeLayer(const LayerConfig& config, const LayerParams& params, std::int64_t max_tokens)
    : MoeLayer(config, max_tokens) {
  const Index C = config.hidden_size(), E = config.num_experts(), H = config.expert.intermediate_size;
  const RouterParams& router = params.routing.router;
  require_shape(router.weight, E, C, "params.routing.router.weight", "(E, C)");
  require(static_cast<Index>(params.experts.size()) == E, "params.experts", params.experts.size(),
          fmt::format("must hold num_experts = {} experts", E));
  if (config.routing.router.dtype == Format::bf16) {
    router_weight_bf16_ = DeviceBuffer<Bf16Bits>(
        to_bf16(std::span<const float>(router.weight.data(), static_cast<std::size_t>(router.weight.size()))));
  } else {
    router_weight_f32_ = DeviceBuffer<float>(
        std::span<const float>(router.weight.data(), static_cast<std::size_t>(router.weight.size())));
  }
  if (config.routing.router.use_bias)
    router_bias_ = DeviceBuffer<float>(std::span<const float>(router.bias.data(), static_cast<std::size_t>(E)));
  if (config.routing.use_selection_bias) {
    require(params.routing.selection_bias.size() == E, "params.routing.selection_bias",
            params.routing.selection_bias.size(), fmt::format("must hold num_experts = {} values", E));
    selection_bias_ = DeviceBuffer<float>(
        std::span<const float>(params.routing.selection_bias.data(), static_cast<std::size_t>(E)));
  }
  std::vector<Bf16Bits> gate_up, down;
  gate_up.reserve(static_cast<std::size_t>(E * 2 * H * C));
  down.reserve(static_cast<std::size_t>(E * C * H));
  for (const ExpertParams& expert : params.experts) {
    require_shape(expert.w_gate, H, C, "params.experts[].w_gate", "(H, C)");
    require_shape(expert.w_up, H, C, "params.experts[].w_up", "(H, C)");
    require_shape(expert.w_down, C, H, "params.experts[].w_down", "(C, H)");
    append_bf16(gate_up, expert.w_gate);
    append_bf16(gate_up, expert.w_up);
    append_bf16(down, expert.w_down);
  }
  w_gate_up_ = DeviceBuffer<Bf16Bits>(gate_up);
  w_down_ = DeviceBuffer<Bf16Bits>(down);
  if (shared_width_ > 0) {
    require(static_cast<int>(params.shared.size()) == config.shared.count, "params.shared", params.shared.size(),
            fmt::format("must hold shared.count = {} experts", config.shared.count));
    Matrix shared_gate_up, shared_down;
    concatenate_shared(params.shared, shared_gate_up, shared_down);
    std::vector<Bf16Bits> bits;
    append_bf16(bits, shared_gate_up);
    shared_gate_up_ = DeviceBuffer<Bf16Bits>(bits);
    bits.clear();
    append_bf16(bits, shared_down);
    shared_down_ = DeviceBuffer<Bf16Bits>(bits);
    if (config.shared.gated) {
      require_shape(params.shared_gate, 1, C, "params.shared_gate", "(1, C)");
      bits.clear();
      append_bf16(bits, params.shared_gate);
      shared_gate_weight_ = DeviceBuffer<Bf16Bits>(bits);
    }
  }
}

MoeLayer MoeLayer::random(const LayerConfig& config, std::int64_t max_tokens, std::uint64_t seed) {
  MoeLayer layer(config, max_tokens);
  const Index C = config.hidden_size(), E = config.num_experts(), H = config.expert.intermediate_size;
  const auto n = [](Index a, Index b, Index c = 1) { return static_cast<std::size_t>(a * b * c); };
  if (config.routing.router.dtype == Format::bf16) {
    layer.router_weight_bf16_ = DeviceBuffer<Bf16Bits>(n(E, C));
    fill_uniform(layer.router_weight_bf16_, seed, 1, C);
  } else {
    layer.router_weight_f32_ = DeviceBuffer<float>(n(E, C));
    fill_uniform(layer.router_weight_f32_, seed, 1, C);
  }
  if (config.routing.router.use_bias) {  // zero, as init_layer
    layer.router_bias_ = DeviceBuffer<float>(n(E, 1));
    check_cuda(cudaMemset(layer.router_bias_.data(), 0, layer.router_bias_.bytes()), "cudaMemset");
  }
  if (config.routing.use_selection_bias) {
    layer.selection_bias_ = DeviceBuffer<float>(n(E, 1));
    check_cuda(cudaMemset(layer.selection_bias_.data(), 0, layer.selection_bias_.bytes()), "cudaMemset");
  }
  layer.w_gate_up_ = DeviceBuffer<Bf16Bits>(n(E, 2 * H, C));
  fill_uniform(layer.w_gate_up_, seed, 2, C);
  layer.w_down_ = DeviceBuffer<Bf16Bits>(n(E, C, H));
  fill_uniform(layer.w_down_, seed, 3, H);
  if (layer.shared_width_ > 0) {
    layer.shared_gate_up_ = DeviceBuffer<Bf16Bits>(n(2 * layer.shared_width_, C));
    fill_uniform(layer.shared_gate_up_, seed, 4, C);
    layer.shared_down_ = DeviceBuffer<Bf16Bits>(n(C, layer.shared_width_));
    fill_uniform(layer.shared_down_, seed, 5, config.shared.intermediate_size);
    if (config.shared.gated) {
      layer.shared_gate_weight_ = DeviceBuffer<Bf16Bits>(n(C, 1));
      fill_uniform(layer.shared_gate_weight_, seed, 6, C);
    }
  }
  check_cuda(cudaDeviceSynchronize(), "MoeLayer::random");
  return layer;
}

int MoeLayer::gemm_version() const {
  if (versions.gemm != 0) return versions.gemm;
  static const int sm = device_status().sm;
  return sm == 90 ? 3 : 2;
}

std::size_t MoeLayer::weight_bytes() const {
  return router_weight_f32_.bytes() + router_weight_bf16_.bytes() + router_bias_.bytes() + w_gate_up_.bytes() +
         w_down_.bytes() + shared_gate_up_.bytes() + shared_down_.bytes() + shared_gate_weight_.bytes();
}

void MoeLayer::forward(void* y, Format y_dtype, const Bf16Bits* x, std::int64_t tokens, cudaStream_t stream) {
  require(tokens >= 0 && tokens <= max_tokens_, "tokens", tokens,
          fmt::format("must be in [0, max_tokens = {}]", max_tokens_));
  require(y_dtype == Format::bf16 || y_dtype == Format::fp32, "y_dtype", format_name(y_dtype),
          "must be bf16 or fp32");
  if (tokens == 0) return;
  require(x != nullptr && y != nullptr, "x, y", "null", "must point to (T, C) device memory");
  const LayerConfig& c = config_;
  const Index C = c.hidden_size(), H = c.expert.intermediate_size;
  const int E = static_cast<int>(c.num_experts()), k = c.routing.top_k;
  const bool gate_on_input = c.gate_placement == GatePlacement::input;
  Intermediates& w = work_;

  RouterArgs router{.x = x,
                    .x_dtype = Format::bf16,
                    .weight = c.routing.router.dtype == Format::bf16 ? static_cast<const void*>(router_weight_bf16_.data())
                                                                     : static_cast<const void*>(router_weight_f32_.data()),
                    .bias = router_bias_.data(),
                    .selection_bias = selection_bias_.data(),
                    .logits = w.logits.data(),
                    .ids = w.ids.data(),
                    .gates = w.gates.data(),
                    .tokens = tokens};
  launch_router(router, c.routing, versions.router, stream);

  const std::int64_t rows = permute_max_rows(tokens, k, E, 1);
  launch_permute({.ids = w.ids.data(),
                  .gates = w.gates.data(),
                  .tokens = tokens,
                  .top_k = k,
                  .num_experts = E,
                  .row_align = 1,
                  .counts = w.counts.data(),
                  .offsets = w.offsets.data(),
                  .row_token = w.row_token.data(),
                  .row_gate = w.row_gate.data(),
                  .pair_row = w.pair_row.data(),
                  .workspace = w.permute_workspace.size() > 0 ? w.permute_workspace.data() : nullptr},
                 versions.permute, stream);

  const int gemm = gemm_version();
  launch_gate_up({.x = x,
                  .row_token = w.row_token.data(),
                  .offsets = w.offsets.data(),
                  .row_scale = gate_on_input ? w.row_gate.data() : nullptr,
                  .w_gate_up = w_gate_up_.data(),
                  .hidden = w.hidden.data(),
                  .tokens = tokens,
                  .rows = rows,
                  .hidden_size = C,
                  .intermediate_size = H,
                  .num_experts = E},
                 gemm, stream);
  const bool gate_in_down = !gate_on_input && gate_in == GateIn::down_epilogue;
  launch_down({.hidden = w.hidden.data(),
               .row_token = w.row_token.data(),
               .offsets = w.offsets.data(),
               .row_scale = gate_in_down ? w.row_gate.data() : nullptr,
               .w_down = w_down_.data(),
               .out = w.expert_out.data(),
               .rows = rows,
               .hidden_size = C,
               .intermediate_size = H,
               .num_experts = E},
              gemm, stream);

  if (shared_width_ > 0) {
    set_shared_offsets_kernel<<<1, 1, 0, stream>>>(w.shared_offsets.data(), static_cast<std::int32_t>(tokens));
    check_launch("set_shared_offsets_kernel");
    launch_gate_up({.x = x,
                    .row_token = nullptr,
                    .offsets = w.shared_offsets.data(),
                    .row_scale = nullptr,
                    .w_gate_up = shared_gate_up_.data(),
                    .hidden = w.shared_hidden.data(),
                    .tokens = tokens,
                    .rows = tokens,
                    .hidden_size = C,
                    .intermediate_size = shared_width_,
                    .num_experts = 1},
                   gemm, stream);
    launch_down({.hidden = w.shared_hidden.data(),
                 .row_token = nullptr,
                 .offsets = w.shared_offsets.data(),
                 .row_scale = nullptr,
                 .w_down = shared_down_.data(),
                 .out = w.shared_out.data(),
                 .rows = tokens,
                 .hidden_size = C,
                 .intermediate_size = shared_width_,
                 .num_experts = 1},
                gemm, stream);
    if (c.shared.gated)
      launch_shared_gate(w.shared_gate.data(), x, shared_gate_weight_.data(), tokens, C, stream);
  }

  launch_combine({.expert_out = w.expert_out.data(),
                  .pair_row = w.pair_row.data(),
                  .pair_weight = gate_on_input || gate_in_down ? nullptr : w.gates.data(),
                  .shared_out = shared_width_ > 0 ? w.shared_out.data() : nullptr,
                  .shared_gate = c.shared.gated && shared_width_ > 0 ? w.shared_gate.data() : nullptr,
                  .y = y,
                  .y_dtype = y_dtype,
                  .tokens = tokens,
                  .hidden_size = C,
                  .top_k = k},
                 versions.combine, stream);
}

MoeResult moe_forward(const LayerConfig& config, const LayerParams& params, const Matrix& x, Format y_dtype,
                      const MoeVersions& versions) {
  const Index T = x.rows(), C = config.hidden_size(), E = config.num_experts();
  const int k = config.routing.top_k;
  require(x.cols() == C, "x", shape_of(x), fmt::format("must have hidden_size = {} columns", C));
  MoeResult r;
  if (T == 0) {
    r.y.setZero(0, C);
    r.ids.resize(0, k);
    r.gates.resize(0, k);
    r.logits.resize(0, E);
    r.counts.assign(static_cast<std::size_t>(E), 0);
    r.offsets.assign(static_cast<std::size_t>(E + 1), 0);
    r.expert_out.resize(0, C);
    return r;
  }
  MoeLayer layer(config, params, T);
  layer.versions = versions;
  const DeviceBuffer<Bf16Bits> x_device(to_bf16(std::span<const float>(x.data(), static_cast<std::size_t>(x.size()))));
  const std::size_t n = static_cast<std::size_t>(T * C);
  DeviceBuffer<float> y_f32(y_dtype == Format::fp32 ? n : 0);
  DeviceBuffer<Bf16Bits> y_bf16(y_dtype == Format::bf16 ? n : 0);
  y_f32.poison();
  y_bf16.poison();
  void* y = y_dtype == Format::fp32 ? static_cast<void*>(y_f32.data()) : static_cast<void*>(y_bf16.data());
  layer.forward(y, y_dtype, x_device.data(), T);
  check_cuda(cudaDeviceSynchronize(), "moe_forward");

  const auto& w = layer.intermediates();
  const std::vector<float> ys = y_dtype == Format::fp32 ? y_f32.download() : from_bf16(y_bf16.download());
  r.y = Eigen::Map<const Matrix>(ys.data(), T, C);
  const std::vector<std::int32_t> ids = w.ids.download();
  r.ids = Eigen::Map<const IndexMatrix>(ids.data(), T, k);
  const std::vector<float> gates = w.gates.download(), logits = w.logits.download();
  r.gates = Eigen::Map<const Matrix>(gates.data(), T, k);
  r.logits = Eigen::Map<const Matrix>(logits.data(), T, E);
  r.counts = widen(w.counts.download());
  r.offsets = widen(w.offsets.download());
  const auto N = static_cast<std::size_t>(r.offsets.back());
  std::vector<std::int32_t> row_token = w.row_token.download();
  row_token.resize(N);
  r.row_token = std::move(row_token);
  std::vector<Bf16Bits> out = w.expert_out.download();
  out.resize(N * static_cast<std::size_t>(C));
  const std::vector<float> outs = from_bf16(out);
  r.expert_out = Eigen::Map<const Matrix>(outs.data(), static_cast<Index>(N), C);
  return r;
}

}  // namespace moelab::cuda
