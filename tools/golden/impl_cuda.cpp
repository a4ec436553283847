// moelab/tools/golden/impl_cuda.cpp — `moelab check --impl cuda`: the CUDA kernels of cuda/ on a
// GPU, each at its newest version, on the cases they compute:
//   numerics.encode.*      cuda/convert.h (every format, both overflow modes)
//   routing.*              cuda/router.h: logits, ids, gates (not the scores, losses or load,
//                          which the CUDA forward does not produce), where router_unsupported
//                          accepts the configuration (not expert choice, hash, table; not an fp16 router)
//   layer.* in bf16        cuda/moe.h, the whole forward: routing, counts, offsets, row order,
//                          expert outputs, y. The CUDA experts compute in bf16, so fp32 and fp16
//                          layer cases are "not supported" rather than compared against a
//                          tolerance they were never meant to meet.
//   dispatch.*             cuda/permute.h when every pair is kept
//   experts.swiglu.bf16    cuda/expert_gemm.h, one expert over all rows
// Everything else is "not supported" (the backward has no kernel yet).
#include <fmt/format.h>

#include "reference/error.h"
#include "tools/golden/case_io.h"
#include "tools/golden/golden.h"

#ifdef MOELAB_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "cuda/convert.h"
#include "cuda/expert_gemm.h"
#include "cuda/moe.h"
#include "cuda/permute.h"
#include "cuda/router.h"
#include "reference/config_json.h"
#endif

namespace moelab::golden {

#ifdef MOELAB_HAVE_CUDA
namespace {

template <typename T>
std::span<const T> span_of(const MatrixT<T>& m) {
  return {m.data(), static_cast<std::size_t>(m.size())};
}
Tensor ids_tensor(const std::vector<std::int32_t>& ids, Index rows, Index cols) {
  return tensor_from(IndexMatrix(Eigen::Map<const IndexMatrix>(ids.data(), rows, cols)));
}
Matrix as_matrix(const std::vector<float>& v, Index rows, Index cols) {
  return Eigen::Map<const Matrix>(v.data(), rows, cols);
}

Produced run_numerics(const Case& c) {
  const Format f = parse_format(c.config.at("format").get<std::string>(), "config.format");
  std::vector<float> xs;
  for (double x : tensor_values(c.file.tensors.at("input.values"))) xs.push_back(static_cast<float>(x));
  Produced p;
  for (const char* name : {"output.bits", "output.bits_saturated"}) {
    if (!c.file.tensors.contains(name)) continue;
    const Overflow overflow = std::string(name) == "output.bits" ? Overflow::nonsaturating : Overflow::saturating;
    const std::vector<std::uint16_t> bits = cuda::convert(xs, f, overflow, cuda::kConvertVersions);
    Tensor t{.dtype = format_dtype(f), .shape = {static_cast<std::int64_t>(bits.size())}};
    const std::size_t w = dtype_size(t.dtype);
    for (std::uint16_t b : bits)
      for (std::size_t byte = 0; byte < w; ++byte) t.data.push_back((b >> (8 * byte)) & 0xFF);
    p[name] = std::move(t);
  }
  return p;
}

Produced run_routing(const Case& c) {
  const RoutingConfig rc = routing_config_from_json(c.config);
  if (const std::string why = cuda::router_unsupported(rc); !why.empty()) throw NotSupported(why);
  const Matrix x = matrix(c, "input.x");
  const Matrix w = matrix(c, "param.router.weight");
  const Index T = x.rows(), E = rc.num_experts();
  const int k = rc.top_k;
  // x goes in as float32: the case's values (rounded to its dtype) are exact there.
  const cuda::DeviceBuffer<float> x_device(span_of(x));
  cuda::DeviceBuffer<float> w_f32;
  cuda::DeviceBuffer<cuda::Bf16Bits> w_bf16;
  if (rc.router.dtype == Format::bf16) {
    w_bf16 = cuda::DeviceBuffer<cuda::Bf16Bits>(cuda::to_bf16(span_of(w)));
  } else {
    w_f32 = cuda::DeviceBuffer<float>(span_of(w));
  }
  cuda::DeviceBuffer<float> bias, selection_bias;
  if (rc.router.use_bias) bias = cuda::DeviceBuffer<float>(span_of(Matrix(vector(c, "param.router.bias"))));
  if (rc.use_selection_bias)
    selection_bias = cuda::DeviceBuffer<float>(span_of(Matrix(vector(c, "param.selection_bias"))));
  cuda::DeviceBuffer<float> logits(static_cast<std::size_t>(T * E)), gates(static_cast<std::size_t>(T * k));
  cuda::DeviceBuffer<std::int32_t> ids(static_cast<std::size_t>(T * k));
  logits.poison();
  gates.poison();
  ids.poison();
  cuda::launch_router({.x = x_device.data(),
                       .x_dtype = Format::fp32,
                       .weight = rc.router.dtype == Format::bf16 ? static_cast<const void*>(w_bf16.data())
                                                                 : static_cast<const void*>(w_f32.data()),
                       .bias = bias.data(),
                       .selection_bias = selection_bias.data(),
                       .logits = logits.data(),
                       .ids = ids.data(),
                       .gates = gates.data(),
                       .tokens = T},
                      rc, cuda::kRouterVersions);
  cuda::check_cuda(cudaDeviceSynchronize(), "launch_router");
  return {{"output.logits", f64(as_matrix(logits.download(), T, E))},
          {"output.topk_ids", ids_tensor(ids.download(), T, k)},
          {"output.gates", f64(as_matrix(gates.download(), T, k))}};
}

Produced run_layer(const Case& c) {
  if (c.dtype != "bf16")
    throw NotSupported(fmt::format("case dtype {}: the CUDA experts compute in bf16 (bf16 layer cases only)", c.dtype));
  const LayerConfig lc = layer_config_from_json(c.config);
  if (const std::string why = cuda::moe_unsupported(lc); !why.empty()) throw NotSupported(why);
  const LayerParamsT<float> params = get_layer_params(c.file, lc);
  const cuda::MoeResult r = cuda::moe_forward(lc, params, matrix(c, "input.x"), Format::fp32);
  return {{"output.logits", f64(r.logits)},
          {"output.topk_ids", tensor_from(r.ids)},
          {"output.gates", f64(r.gates)},
          {"output.counts", i64(r.counts)},
          {"output.offsets", i64(r.offsets)},
          {"output.row_token", i32(r.row_token)},
          {"output.expert_out", f64(r.expert_out)},
          {"output.y", f64(r.y)}};
}

Produced run_dispatch(const Case& c) {
  const IndexMatrix ids = matrix(c, "input.ids").cast<std::int32_t>();
  const IndexMatrix keep = matrix(c, "input.keep").cast<std::int32_t>();
  if (keep.size() > 0 && keep.minCoeff() == 0) throw NotSupported("dropped pairs: the CUDA permutation is dropless");
  const auto E = c.config.at("num_experts").get<int>();
  const auto T = ids.rows();
  const int k = static_cast<int>(ids.cols());
  const std::int64_t rows = cuda::permute_max_rows(T, k, E, 1);
  const cuda::DeviceBuffer<std::int32_t> ids_device(span_of(ids));
  const cuda::DeviceBuffer<float> gates(std::vector<float>(static_cast<std::size_t>(T * k), 1.0f));
  cuda::DeviceBuffer<std::int32_t> counts(static_cast<std::size_t>(E)), offsets(static_cast<std::size_t>(E + 1)),
      row_token(static_cast<std::size_t>(rows)), pair_row(static_cast<std::size_t>(T * k));
  cuda::DeviceBuffer<float> row_gate(static_cast<std::size_t>(rows));
  cuda::DeviceBuffer<std::uint8_t> workspace(cuda::permute_workspace_bytes(T, k, E, cuda::kPermuteVersions));
  cuda::launch_permute({.ids = ids_device.data(),
                        .gates = gates.data(),
                        .tokens = T,
                        .top_k = k,
                        .num_experts = E,
                        .row_align = 1,
                        .counts = counts.data(),
                        .offsets = offsets.data(),
                        .row_token = row_token.data(),
                        .row_gate = row_gate.data(),
                        .pair_row = pair_row.data(),
                        .workspace = workspace.size() > 0 ? workspace.data() : nullptr},
                       cuda::kPermuteVersions);
  cuda::check_cuda(cudaDeviceSynchronize(), "launch_permute");
  const std::vector<std::int32_t> c32 = counts.download(), o32 = offsets.download();
  return {{"output.counts", i64({c32.begin(), c32.end()})},
          {"output.offsets", i64({o32.begin(), o32.end()})},
          {"output.row_token", i32(row_token.download())}};
}

Produced run_experts(const Case& c) {
  const ExpertConfig ec = expert_config_from_json(c.config, "config");
  if (c.dtype != "bf16" || ec.activation != Activation::swiglu || ec.use_bias)
    throw NotSupported("the CUDA experts are SwiGLU in bf16 without biases");
  const ExpertParamsT<float> params = get_expert_params(c.file, "param.expert", ec);
  const Matrix x = matrix(c, "input.x");
  const Index n = x.rows(), C = ec.hidden_size, H = ec.intermediate_size;
  if (C % 8 != 0 || H % 8 != 0) throw NotSupported("C and H must be multiples of 8");
  Matrix gate_up(2 * H, C);
  gate_up << params.w_gate, params.w_up;
  const cuda::DeviceBuffer<cuda::Bf16Bits> x_device(cuda::to_bf16(span_of(x))),
      w_gate_up(cuda::to_bf16(span_of(gate_up))), w_down(cuda::to_bf16(span_of(params.w_down)));
  const cuda::DeviceBuffer<std::int32_t> offsets(std::vector<std::int32_t>{0, static_cast<std::int32_t>(n)});
  cuda::DeviceBuffer<cuda::Bf16Bits> hidden(static_cast<std::size_t>(n * H)), y(static_cast<std::size_t>(n * C));
  hidden.poison();
  y.poison();
  const int version = cuda::device_status().sm == 90 ? 3 : 2;
  cuda::launch_gate_up({.x = x_device.data(), .row_token = nullptr, .offsets = offsets.data(), .row_scale = nullptr,
                        .w_gate_up = w_gate_up.data(), .hidden = hidden.data(), .tokens = n, .rows = n,
                        .hidden_size = C, .intermediate_size = H, .num_experts = 1},
                       version);
  cuda::launch_down({.hidden = hidden.data(), .row_token = nullptr, .offsets = offsets.data(), .row_scale = nullptr,
                     .w_down = w_down.data(), .out = y.data(), .rows = n, .hidden_size = C,
                     .intermediate_size = H, .num_experts = 1},
                    version);
  cuda::check_cuda(cudaDeviceSynchronize(), "launch_gate_up, launch_down");
  return {{"output.y", f64(as_matrix(cuda::from_bf16(y.download()), n, C))}};
}

}  // namespace

Produced run_cuda(const Case& c) {
  static const cuda::DeviceStatus status = cuda::device_status();
  if (!status.available) fail("--impl", "cuda", status.reason);
  if (c.component == "numerics" && c.file.tensors.contains("input.values")) return run_numerics(c);
  if (c.component == "routing") return run_routing(c);
  if (c.component == "layer") return run_layer(c);
  if (c.component == "dispatch") return run_dispatch(c);
  if (c.component == "experts") return run_experts(c);
  throw NotSupported("no CUDA kernel for " + c.component + " yet");
}
#else
Produced run_cuda(const Case&) {
  fail("--impl", "cuda", "this moelab was built without CUDA (nvcc was not found; configure with -DMOELAB_CUDA=ON)");
}
#endif

}  // namespace moelab::golden
