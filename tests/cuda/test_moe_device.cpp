// moelab/tests/cuda/test_moe_device.cpp — the whole CUDA MoE forward (cuda/moe.h) against the
// reference layer (reference/layer.h), for every preset the CUDA layer supports.
//
// The reference runs in double on exactly the values the GPU reads: x and the expert weights
// rounded to bf16, the router weight to the router's dtype. The GPU rounds hidden and the expert
// outputs to bf16 on the way (a bf16 model does), so y is compared with a bf16 tolerance:
// |y - ref| <= rtol (|ref| + rms(ref)), rtol = 4 * 2^-8 (two roundings to bf16 on the path of
// every term, plus fp32 accumulation), and ||y - ref|| / ||ref|| < 1e-2. A token whose experts
// differ from the reference's (a near-tie decided the other way by a different summation order)
// is left out of the y comparison and counted; there may be at most 1 % of them.
// Without a GPU every test skips, except the ones that check errors raised before the device.
#include "cuda/moe.h"

#include <cuda_runtime_api.h>
#include <fmt/format.h>
#include <gtest/gtest.h>

#include "tests/cuda/device_testing.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "reference/error.h"
#include "reference/layer.h"
#include "reference/numerics.h"
#include "reference/presets.h"
#include "reference/random.h"

namespace moelab::cuda {
namespace {

// The preset's layer at its published conventions (E, k, groups, gates, shared experts), with
// hidden size C and intermediate sizes H so that the CPU reference stays fast.
LayerConfig sized(std::string_view preset, Index C, Index H) {
  LayerConfig lc = layer_config(find_preset(preset), PresetSize::full);
  lc.routing.router.hidden_size = C;
  lc.expert.hidden_size = C;
  lc.expert.intermediate_size = H;
  if (lc.shared.count > 0) lc.shared.intermediate_size = H;
  lc.routing.router.noise = RouterNoise::none;
  return lc;
}

Matrix round_to(const Matrix& m, Format f) {
  Matrix r = m;
  if (f != Format::fp32)
    for (Index i = 0; i < r.size(); ++i) r.data()[i] = moelab::round_to(r.data()[i], f);
  return r;
}

// The parameters as the GPU holds them: experts and shared gate in bf16, router in its dtype.
LayerParams as_on_device(const LayerParams& p, const LayerConfig& lc) {
  LayerParams q = p;
  q.routing.router.weight = round_to(p.routing.router.weight, lc.routing.router.dtype);
  for (auto* experts : {&q.experts, &q.shared})
    for (ExpertParams& e : *experts) {
      e.w_gate = round_to(e.w_gate, Format::bf16);
      e.w_up = round_to(e.w_up, Format::bf16);
      e.w_down = round_to(e.w_down, Format::bf16);
    }
  if (q.shared_gate.size() > 0) q.shared_gate = round_to(q.shared_gate, Format::bf16);
  return q;
}

LayerParamsT<double> to_double(const LayerParams& p) {
  LayerParamsT<double> d;
  d.routing.router.weight = p.routing.router.weight.cast<double>();
  d.routing.router.bias = p.routing.router.bias.cast<double>();
  d.routing.selection_bias = p.routing.selection_bias.cast<double>();
  auto expert = [](const ExpertParams& e) {
    ExpertParamsT<double> r;
    r.w_gate = e.w_gate.cast<double>();
    r.w_up = e.w_up.cast<double>();
    r.w_down = e.w_down.cast<double>();
    return r;
  };
  for (const ExpertParams& e : p.experts) d.experts.push_back(expert(e));
  for (const ExpertParams& e : p.shared) d.shared.push_back(expert(e));
  d.shared_gate = p.shared_gate.cast<double>();
  return d;
}

struct Problem {
  LayerConfig config;
  LayerParams params;  // as on the device
  Matrix x;            // bf16 values
};

Problem make_problem(const LayerConfig& lc, Index T, std::uint64_t seed) {
  Rng rng(seed);
  Problem p{.config = lc, .params = {}, .x = {}};
  LayerParams params = init_layer<float>(lc, rng, 1.0 / std::sqrt(static_cast<double>(lc.hidden_size())));
  if (lc.routing.use_selection_bias)
    for (Index e = 0; e < params.routing.selection_bias.size(); ++e)
      params.routing.selection_bias[e] = static_cast<float>(0.1 * rng.normal());
  if (lc.routing.router.use_bias)
    for (Index e = 0; e < params.routing.router.bias.size(); ++e)
      params.routing.router.bias[e] = static_cast<float>(0.3 * rng.normal());
  p.params = as_on_device(params, lc);
  Matrix x(T, lc.hidden_size());
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(rng.normal());
  p.x = round_to(x, Format::bf16);
  return p;
}

struct Comparison {
  Index mismatched_tokens = 0;
  double worst = 0;          // max |y - ref| / (rtol (|ref| + rms(ref)))
  double relative_norm = 0;  // ||y - ref|| / ||ref|| over the compared tokens
};

// Compares the GPU's layer with the reference; see the top of the file.
Comparison compare(const Problem& p, const MoeResult& got) {
  const LayerConfig& lc = p.config;
  LayerOutputT<double> ref;
  const MatrixD x = p.x.cast<double>();
  moe_layer_forward<double>(ref, x, {}, to_double(p.params), lc, nullptr);
  const Index T = x.rows(), k = lc.routing.top_k;
  EXPECT_EQ(got.ids.rows(), T);
  std::vector<bool> same(static_cast<std::size_t>(T), true);
  Comparison c;
  for (Index t = 0; t < T; ++t) {
    std::vector<int> a(got.ids.row(t).begin(), got.ids.row(t).end());
    std::vector<int> b(ref.routing.ids.row(t).begin(), ref.routing.ids.row(t).end());
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    if (a != b) {
      same[static_cast<std::size_t>(t)] = false;
      ++c.mismatched_tokens;
      continue;
    }
    for (Index j = 0; j < k; ++j) {  // same experts: the same gates, slot for slot where the order agrees
      if (got.ids(t, j) != ref.routing.ids(t, j)) continue;
      EXPECT_NEAR(got.gates(t, j), ref.routing.gates(t, j), 1e-4 * (1 + std::abs(ref.routing.gates(t, j))))
          << "token " << t << " slot " << j;
    }
  }
  const double rtol = 4.0 * std::ldexp(1.0, -8);
  double sum_sq = 0, err_sq = 0, n = 0;
  for (Index t = 0; t < T; ++t)
    if (same[static_cast<std::size_t>(t)]) {
      sum_sq += ref.y.row(t).squaredNorm();
      n += static_cast<double>(ref.y.cols());
    }
  const double rms = n > 0 ? std::sqrt(sum_sq / n) : 0;
  int reported = 0;
  for (Index t = 0; t < T; ++t) {
    if (!same[static_cast<std::size_t>(t)]) continue;
    for (Index i = 0; i < ref.y.cols(); ++i) {
      const double r = ref.y(t, i), g = got.y(t, i), d = std::abs(g - r);
      err_sq += d * d;
      const double ratio = d / (rtol * (std::abs(r) + rms));
      c.worst = std::max(c.worst, std::isnan(g) ? INFINITY : ratio);
      if ((ratio > 1 || std::isnan(g)) && reported++ < 5)
        ADD_FAILURE() << "y(" << t << ", " << i << ") = " << g << ", reference " << r << " (tolerance "
                      << rtol * (std::abs(r) + rms) << ")";
    }
  }
  c.relative_norm = sum_sq > 0 ? std::sqrt(err_sq / sum_sq) : 0;
  EXPECT_LT(c.relative_norm, 1e-2);
  EXPECT_LE(c.mismatched_tokens, std::max<Index>(1, T / 100)) << "tokens routed differently from the reference";
  return c;
}

// The presets whose layers the CUDA forward computes (moe_unsupported returns "").
std::vector<std::string> supported_presets() {
  std::vector<std::string> names;
  for (const Preset& preset : presets())
    if (moe_unsupported(sized(preset.name, 64, 64)).empty()) names.emplace_back(preset.name);
  return names;
}

// Which presets run is part of the contract: the token-choice, dropless SwiGLU ones.
TEST(CudaMoe, SupportsTheDroplessSwigluPresets) {
  const std::vector<std::string> names = supported_presets();
  for (const char* expected : {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "llama4"})
    EXPECT_NE(std::find(names.begin(), names.end(), expected), names.end()) << expected;
  // ... and says why for the others, naming the field.
  EXPECT_NE(moe_unsupported(sized("switch", 64, 64)).find("capacity"), std::string::npos)
      << moe_unsupported(sized("switch", 64, 64));
  EXPECT_NE(moe_unsupported(sized("expert_choice", 64, 64)).find("selection"), std::string::npos)
      << moe_unsupported(sized("expert_choice", 64, 64));
  EXPECT_NE(moe_unsupported(sized("gpt_oss", 64, 64)).find("expert"), std::string::npos)
      << moe_unsupported(sized("gpt_oss", 64, 64));
}

// Every supported preset at a few token counts (1: most experts empty; 33: not a multiple of any
// tile; 512: many rows per expert), with the default (fastest) versions.
TEST(CudaMoe, EveryPresetMatchesTheReference) {
  SKIP_WITHOUT_DEVICE();
  std::uint64_t seed = 100;
  for (const std::string& name : supported_presets())
    for (Index T : {1, 33, 512}) {
      SCOPED_TRACE(name + ", T = " + std::to_string(T));
      const Problem p = make_problem(sized(name, 256, 128), T, seed++);
      const Comparison c = compare(p, moe_forward(p.config, p.params, p.x, Format::fp32));
      std::printf("  %-12s T = %4lld: worst %.3f of tolerance, ||y - ref|| / ||ref|| = %.2e, %lld token(s) "
                  "routed differently\n",
                  name.c_str(), static_cast<long long>(T), c.worst, c.relative_norm,
                  static_cast<long long>(c.mismatched_tokens));
    }
}

// Each rung of every ladder gives the same layer: all versions 1 (the obvious kernels), each
// stage's versions swapped in one at a time, and bf16 output.
TEST(CudaMoe, EveryLadderVersionMatchesTheReference) {
  SKIP_WITHOUT_DEVICE();
  const int gemm_top = device_status().sm == 90 ? 3 : 2;
  std::vector<MoeVersions> combos = {{1, 1, 1, 1}, {1, 2, 2, 2}, {2, 2, 2, 2}, {3, 1, 2, 1}, {3, 2, gemm_top, 2}};
  for (const char* name : {"mixtral", "deepseek_v3", "qwen2_moe"})
    for (const MoeVersions& v : combos)
      for (Format y_dtype : {Format::fp32, Format::bf16}) {
        SCOPED_TRACE(fmt::format("{}, versions router {} permute {} gemm {} combine {}, y {}", name, v.router,
                                 v.permute, v.gemm, v.combine, format_name(y_dtype)));
        const Problem p = make_problem(sized(name, 128, 64), 200, 7);
        compare(p, moe_forward(p.config, p.params, p.x, y_dtype, v));
      }
}

// Realistic widths, many tokens: DeepSeek-V3's router (E = 256, k = 8, 8 groups keep 4) over
// 4096 tokens with C = 1024, H = 256, and Mixtral's (E = 8, k = 2) at T = 16384, C = 512.
TEST(CudaMoe, ManyTokensMatchTheReference) {
  SKIP_WITHOUT_DEVICE();
  {
    const Problem p = make_problem(sized("deepseek_v3", 1024, 256), 4096, 11);
    const Comparison c = compare(p, moe_forward(p.config, p.params, p.x, Format::bf16));
    std::printf("  deepseek_v3 T = 4096: worst %.3f, relative %.2e, %lld mismatched\n", c.worst, c.relative_norm,
                static_cast<long long>(c.mismatched_tokens));
  }
  {
    const Problem p = make_problem(sized("mixtral", 512, 256), 16384, 12);
    const Comparison c = compare(p, moe_forward(p.config, p.params, p.x, Format::bf16));
    std::printf("  mixtral T = 16384: worst %.3f, relative %.2e, %lld mismatched\n", c.worst, c.relative_norm,
                static_cast<long long>(c.mismatched_tokens));
  }
}

// Skewed routing: a selection bias that sends most tokens to experts 0 and 1 (DeepSeek-V3's bias
// is how aux-loss-free balancing steers load) still gives the reference's layer; many experts are
// empty and two hold almost every row.
TEST(CudaMoe, SkewedRoutingMatchesTheReference) {
  SKIP_WITHOUT_DEVICE();
  Problem p = make_problem(sized("deepseek_v3", 128, 64), 300, 13);
  p.params.routing.selection_bias.setConstant(-1.0f);
  p.params.routing.selection_bias.head(2).setConstant(2.0f);
  const MoeResult r = moe_forward(p.config, p.params, p.x, Format::fp32);
  EXPECT_GE(r.counts[0] + r.counts[1], 300 * 2 * 9 / 10);
  compare(p, r);
}

// A forward captured in a CUDA graph and replayed gives the same bits as a direct forward: the
// layer needs no host synchronisation between its stages.
TEST(CudaMoe, GraphReplayGivesTheSameBits) {
  SKIP_WITHOUT_DEVICE();
  const Problem p = make_problem(sized("qwen2_moe", 128, 64), 64, 17);
  MoeLayer layer(p.config, p.params, 64);
  const DeviceBuffer<Bf16Bits> x(to_bf16(std::span<const float>(p.x.data(), static_cast<std::size_t>(p.x.size()))));
  DeviceBuffer<Bf16Bits> direct(x.size()), replayed(x.size());
  direct.poison();
  replayed.poison();
  layer.forward(direct.data(), Format::bf16, x.data(), 64);
  check_cuda(cudaDeviceSynchronize(), "direct forward");
  cudaStream_t stream = nullptr;
  check_cuda(cudaStreamCreate(&stream), "cudaStreamCreate");
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  check_cuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "begin capture");
  layer.forward(replayed.data(), Format::bf16, x.data(), 64, stream);
  check_cuda(cudaStreamEndCapture(stream, &graph), "end capture");
  check_cuda(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  for (int i = 0; i < 3; ++i) check_cuda(cudaGraphLaunch(exec, stream), "graph launch");
  check_cuda(cudaStreamSynchronize(stream), "replay");
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  EXPECT_EQ(direct.download(), replayed.download());
}

// Errors raised before the device is touched (they run without a GPU too).
TEST(CudaMoe, UnsupportedConfigurationsAreRefusedWithTheReason) {
  LayerConfig lc = sized("mixtral", 60, 64);
  EXPECT_NE(moe_unsupported(lc).find("hidden_size = 60"), std::string::npos) << moe_unsupported(lc);
  lc = sized("mixtral", 64, 64);
  lc.expert.activation = Activation::gelu;
  EXPECT_NE(moe_unsupported(lc).find("activation = gelu"), std::string::npos) << moe_unsupported(lc);
  Rng rng(1);
  const LayerParams params = init_layer<float>(lc, rng);
  try {
    MoeLayer layer(lc, params, 4);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("activation"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moelab::cuda
