// moelab/tools/golden/cases.cpp — the golden set: which cases exist, and writing them.
//
// Committed (small shapes, every preset and every component, a few MB): the `golden/` directory.
// Realistic (published widths, `moelab golden --realistic`, never committed): a few GB of
// parameters, with fewer experts than the model where memory requires (each says so).
#include "tools/golden/cases.h"

#include <fmt/format.h>

#include <cmath>

#include "reference/config_json.h"
#include "reference/error.h"
#include "reference/files.h"
#include "reference/presets.h"

#ifndef MOELAB_VERSION
#define MOELAB_VERSION "0.0.0"
#endif

namespace moelab::golden {

std::string_view moelab_version() { return MOELAB_VERSION; }

double unit_roundoff(Format format) { return std::ldexp(1.0, -(format_info(format).mantissa_bits + 1)); }

bool glob_match(std::string_view pattern, std::string_view name) {
  if (pattern.empty()) return true;
  // Iterative wildcard matching with one backtrack point for the last '*'.
  std::size_t p = 0, n = 0, star = std::string_view::npos, mark = 0;
  auto class_match = [&](std::size_t& q, char ch) {  // q at '['; leaves q after ']'
    const std::size_t close = pattern.find(']', q + 1);
    if (close == std::string_view::npos) return ch == '[' && (++q, true);
    bool negate = pattern[q + 1] == '!' || pattern[q + 1] == '^', hit = false;
    for (std::size_t i = q + 1 + (negate ? 1 : 0); i < close; ++i) {
      if (i + 2 < close && pattern[i + 1] == '-') {
        hit = hit || (pattern[i] <= ch && ch <= pattern[i + 2]);
        i += 2;
      } else {
        hit = hit || pattern[i] == ch;
      }
    }
    q = close + 1;
    return hit != negate;
  };
  while (n < name.size()) {
    if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      mark = n;
    } else if (p < pattern.size() && pattern[p] == '?') {
      ++p, ++n;
    } else if (p < pattern.size() && pattern[p] == '[') {
      std::size_t q = p;
      if (class_match(q, name[n])) {
        p = q, ++n;
      } else if (star != std::string_view::npos) {
        p = star + 1, n = ++mark;
      } else {
        return false;
      }
    } else if (p < pattern.size() && pattern[p] == name[n]) {
      ++p, ++n;
    } else if (star != std::string_view::npos) {
      p = star + 1, n = ++mark;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

namespace {

LayerConfig tiny_layer(std::string_view preset) {
  LayerConfig c = layer_config(find_preset(preset), PresetSize::tiny);
  c.routing.router.noise = RouterNoise::none;
  return c;
}

std::vector<Index> sequence_lengths(const RoutingConfig& c) {
  if (c.aux_loss == AuxLoss::deepseek_v3_sequence) return {6, 10};
  return {};
}

void add_preset_cases(std::vector<CaseSpec>& specs, std::uint64_t& seed) {
  for (const Preset& p : presets()) {
    const std::string name(p.name);
    const LayerConfig lc = layer_config(p, PresetSize::tiny);
    for (Format f : {Format::fp32, Format::bf16, Format::fp16}) {
      const std::string dtype(format_name(f));
      LayerCaseSpec r{.name = name + ".routing." + dtype,
                        .preset = name,
                        .description = fmt::format("{} routing (tiny sizes), {} inputs{}", p.model, dtype,
                                                   f == Format::fp32 ? ", forward and backward" : ", forward"),
                        .config = lc,
                        .dtype = f,
                        .backward = f == Format::fp32,
                        .sequence_lengths = sequence_lengths(lc.routing),
                        .seed = ++seed};
      specs.push_back({r.name, false, [r] { return make_routing_case(r); }});
    }
    for (Format f : {Format::fp32, Format::bf16}) {
      const std::string dtype(format_name(f));
      LayerCaseSpec l{.name = name + ".layer." + dtype,
                      .preset = name,
                      .description = fmt::format("the whole {} MoE layer (tiny sizes), {} inputs{}", p.model, dtype,
                                                 f == Format::fp32 ? ", forward and backward" : ", forward"),
                      .config = lc,
                      .dtype = f,
                      .backward = f == Format::fp32,
                      .sequence_lengths = sequence_lengths(lc.routing),
                      .seed = ++seed};
      specs.push_back({l.name, false, [l] { return make_layer_case(l); }});
    }
  }
  LayerCaseSpec amd{.name = "gpu_mode_amd.layer.fp16",
                    .preset = "gpu_mode_amd",
                    .description = "the GPU MODE AMD MoE problem's convention (softmax -> top-k, no renormalisation, "
                                   "one shared expert) in fp16, as its kernels consume it (tiny sizes)",
                    .config = layer_config(find_preset("gpu_mode_amd"), PresetSize::tiny),
                    .dtype = Format::fp16,
                    .backward = false,
                    .seed = ++seed};
  specs.push_back({amd.name, false, [amd] { return make_layer_case(amd); }});
}

void add_component_cases(std::vector<CaseSpec>& specs, std::uint64_t& seed) {
  for (Format f : {Format::bf16, Format::fp16, Format::fp8_e4m3, Format::fp8_e5m2}) {
    const std::uint64_t s = ++seed;
    specs.push_back({"numerics.encode." + std::string(format_name(f)), false, [f, s] { return make_encode_case(f, s); }});
    specs.push_back({"numerics.decode." + std::string(format_name(f)), false, [f] { return make_decode_case(f); }});
  }
  for (const std::string& loss : loss_names()) {
    const std::uint64_t s = ++seed;
    specs.push_back({"losses." + loss, false, [loss, s] { return make_loss_case(loss, s); }});
  }
  const std::uint64_t bias_seed = ++seed;
  specs.push_back({"balancing.bias_update", false, [bias_seed] { return make_bias_update_case(bias_seed); }});

  auto capacity = [&](const std::string& name, const std::string& description, CapacityConfig config,
                      bool skewed = false, Index tokens = 16, Index experts = 8) {
    CapacityCaseSpec spec{.name = "capacity." + name,
                          .description = description,
                          .capacity = config,
                          .tokens = tokens,
                          .num_experts = experts,
                          .skewed = skewed,
                          .seed = ++seed};
    specs.push_back({spec.name, false, [spec] { return make_capacity_case(spec); }});
  };
  capacity("arrival_order", "capacity factor 0.5 (ceil(0.5 * 32 / 8) = 2), arrival order (slot-major)",
           {.dropless = false, .capacity_factor = 0.5, .policy = DropPolicy::arrival_order});
  capacity("gate_priority", "capacity factor 0.5, batch prioritized routing (largest gate first)",
           {.dropless = false, .capacity_factor = 0.5, .policy = DropPolicy::gate_priority});
  capacity("floor_min_capacity", "capacity factor 0.3, floor (0.3 * 32 / 8 = 1.2 -> 1), raised to min_capacity 3",
           {.dropless = false, .capacity_factor = 0.3, .rounding = CapacityRounding::floor, .min_capacity = 3});
  capacity("decimal_factor", "capacity factor 1.1 with T k / E = 10: capacity 11 (1.1 * 100 / 10 is 11.000000000000002 "
           "in double)",
           {.dropless = false, .capacity_factor = 1.1, .policy = DropPolicy::gate_priority}, false, 50, 10);
  capacity("overflow", "every token's first choice is expert 0: capacity factor 1.0 drops most of them",
           {.dropless = false, .capacity_factor = 1.0, .policy = DropPolicy::arrival_order}, true);

  const std::uint64_t dispatch_seed = ++seed, combine_seed = ++seed, shared_seed = ++seed;
  specs.push_back({"dispatch.permute", false, [dispatch_seed] { return make_dispatch_case(dispatch_seed); }});
  specs.push_back({"combine.weighted_sum", false, [combine_seed] { return make_combine_case(combine_seed); }});
  specs.push_back({"shared_experts.sigmoid_gate", false, [shared_seed] { return make_shared_gate_case(shared_seed); }});

  auto experts = [&](const std::string& name, ExpertConfig config, Format f, bool backward, double scale = 1.0) {
    const std::uint64_t s = ++seed;
    const std::string full = "experts." + name + "." + std::string(format_name(f));
    specs.push_back({full, false, [=] { return make_experts_case(full, config, 12, f, backward, s, scale); }});
  };
  const ExpertConfig swiglu{.hidden_size = 16, .intermediate_size = 32, .activation = Activation::swiglu};
  experts("swiglu", swiglu, Format::fp32, true);
  experts("swiglu", swiglu, Format::bf16, false);
  experts("swiglu", swiglu, Format::fp8_e4m3, false);
  experts("gelu", {.hidden_size = 16, .intermediate_size = 32, .activation = Activation::gelu}, Format::fp32, true);
  experts("relu", {.hidden_size = 16, .intermediate_size = 32, .activation = Activation::relu}, Format::fp32, true);
  experts("swiglu_clamped",
          {.hidden_size = 16, .intermediate_size = 32, .activation = Activation::swiglu_clamped, .use_bias = true},
          Format::fp32, true, 4.0);
}

void add_adversarial_cases(std::vector<CaseSpec>& specs, std::uint64_t& seed) {
  auto routing = [&](LayerCaseSpec r) {
    r.seed = ++seed;
    specs.push_back({r.name, false, [r] { return make_routing_case(r); }});
  };
  auto layer = [&](LayerCaseSpec l) {
    l.seed = ++seed;
    specs.push_back({l.name, false, [l] { return make_layer_case(l); }});
  };
  routing({.name = "adversarial.ties",
           .preset = "mixtral",
           .description = "router rows 1 = 2 and 5 = 6: every token has exact ties in its logits; the reference "
                          "breaks them towards the lower id, a kernel may not (ambiguous, not failed)",
           .config = tiny_layer("mixtral"),
           .adjust = [](MatrixD&, LayerParamsT<double>& p) {
             p.routing.router.weight.row(2) = p.routing.router.weight.row(1);
             p.routing.router.weight.row(6) = p.routing.router.weight.row(5);
           }});
  for (Format f : {Format::bf16, Format::fp16}) {
    LayerConfig c = tiny_layer("qwen3_moe");
    c.routing.router.dtype = f;
    const double scale = f == Format::bf16 ? 60.0 : 12.0;  // logits ~ N(0, scale^2): exp() overflows f
    routing({.name = "adversarial.overflow." + std::string(format_name(f)),
             .preset = "qwen3_moe",
             .description = fmt::format("router logits ~ N(0, {}^2) in {}: a softmax that exponentiates without "
                                        "subtracting the max overflows {} (exp(x) is finite only below {:.4g})",
                                        scale, format_name(f), format_name(f), format_info(f).max_exp_input),
             .config = c,
             .dtype = f,
             .backward = false,
             .adjust = [scale](MatrixD&, LayerParamsT<double>& p) { p.routing.router.weight *= scale; }});
  }
  layer({.name = "adversarial.one_expert",
         .preset = "mixtral",
         .description = "every token is the same vector: all tokens choose the same two experts, six are empty",
         .config = tiny_layer("mixtral"),
         .adjust = [](MatrixD& x, LayerParamsT<double>&) { x.rowwise() = MatrixD(x.row(0)).row(0); }});
  layer({.name = "adversarial.empty_experts",
         .preset = "qwen3_moe",
         .description = "2 tokens for 16 experts with top-4: at least 8 experts get no token (zero gradients)",
         .config = tiny_layer("qwen3_moe"),
         .tokens = 2});
  LayerConfig capped = tiny_layer("mixtral");
  capped.capacity = {.dropless = false, .capacity_factor = 1.0, .policy = DropPolicy::gate_priority};
  layer({.name = "adversarial.capacity_overflow",
         .preset = "mixtral",
         .description = "router row 0 aligned with the tokens' mean: expert 0 is nearly everyone's first choice "
                        "and overflows its capacity (factor 1.0, gate priority); some tokens lose both experts",
         .config = capped,
         .adjust = [](MatrixD& x, LayerParamsT<double>& p) {
           x.rowwise() += MatrixD::Constant(1, x.cols(), 1.0).row(0);
           p.routing.router.weight.row(0).setConstant(0.2);  // logit ~ 3.2: first, but gates not saturated
         }});
}

void add_realistic_cases(std::vector<CaseSpec>& specs, std::uint64_t& seed) {
  LayerConfig mixtral = layer_config(find_preset("mixtral"), PresetSize::full);
  mixtral.routing.router.num_experts = 4;  // 4 x 3 x 4096 x 14336 parameters: 5.6 GB in double
  specs.push_back({"realistic.mixtral.layer.bf16", true, [mixtral, s = ++seed] {
                     return make_layer_case({.name = "realistic.mixtral.layer.bf16",
                                             .preset = "mixtral",
                                             .description = "Mixtral 8x7B's layer widths (4096 -> 14336, top-2) with 4 "
                                                            "of its 8 experts (memory), T = 64, bf16, forward",
                                             .config = mixtral,
                                             .tokens = 64,
                                             .dtype = Format::bf16,
                                             .backward = false,
                                             .seed = s});
                   }});
  const LayerConfig v3 = layer_config(find_preset("deepseek_v3"), PresetSize::full);
  specs.push_back({"realistic.deepseek_v3.routing.bf16", true, [v3, s = ++seed] {
                     return make_routing_case({.name = "realistic.deepseek_v3.routing.bf16",
                                               .preset = "deepseek_v3",
                                               .description = "DeepSeek-V3's full router: 7168 wide, 256 experts in 8 "
                                                              "groups, top-4 groups, top-8, T = 16, bf16, forward and "
                                                              "backward",
                                               .config = v3,
                                               .dtype = Format::bf16,
                                               .sequence_lengths = {16},
                                               .seed = s});
                   }});
  const ExpertConfig v3_expert{.hidden_size = 7168, .intermediate_size = 2048, .activation = Activation::swiglu};
  specs.push_back({"realistic.deepseek_v3.expert.bf16", true, [v3_expert, s = ++seed] {
                     return make_experts_case("realistic.deepseek_v3.expert.bf16", v3_expert, 16, Format::bf16, false, s);
                   }});
  LayerConfig amd = layer_config(find_preset("gpu_mode_amd"), PresetSize::full);
  amd.routing.router.num_experts = 8;  // the problem's smaller configurations; 32 do not fit in double here
  specs.push_back({"realistic.gpu_mode_amd.layer.fp16", true, [amd, s = ++seed] {
                     return make_layer_case({.name = "realistic.gpu_mode_amd.layer.fp16",
                                             .preset = "gpu_mode_amd",
                                             .description = "the GPU MODE AMD MoE problem: 7168 -> 2048 experts, top-4, "
                                                            "one shared expert, fp16, 8 routed experts, T = 64, forward",
                                             .config = amd,
                                             .tokens = 64,
                                             .dtype = Format::fp16,
                                             .backward = false,
                                             .seed = s});
                   }});
}

}  // namespace

const std::vector<CaseSpec>& case_specs() {
  static const std::vector<CaseSpec> specs = [] {
    std::vector<CaseSpec> all;
    std::uint64_t seed = 20261123;  // every case its own seed, in list order
    add_component_cases(all, seed);
    add_preset_cases(all, seed);
    add_adversarial_cases(all, seed);
    add_realistic_cases(all, seed);
    return all;
  }();
  return specs;
}

// ---- writing ------------------------------------------------------------------------------------------

namespace {

Json check_json(const Check& c) {
  Json j = {{"tensor", c.tensor}, {"compare", c.compare}};
  if (c.compare == "allclose") {
    j["atol"] = c.atol;
    j["rtol"] = c.rtol;
    j["nmse"] = c.nmse;
    j["depth"] = c.depth;
    j["reduction"] = c.reduction;
  }
  if (c.compare == "topk_set") {
    j["ranking"] = c.ranking;
    j["atol"] = c.atol;
    j["rtol"] = c.rtol;
    if (c.transposed) j["transposed"] = true;
  }
  if (c.compare == "permutation") j["offsets"] = c.offsets;
  if (c.compare == "allclose" || c.compare == "exact") j["rows"] = c.rows;
  if (!c.align.empty()) j["align"] = c.align;
  return j;
}

const char* kRule =
    "allclose: |out - ref| <= atol + rtol |ref| element-wise (NaN and inf never pass) and NMSE <= nmse, with "
    "rtol = 2 (depth u + sqrt(reduction) u_fp32), atol = rtol rms(ref), nmse = 2 (depth u^2 + reduction u_fp32^2); "
    "ids as sets per row, near-ties ambiguous; integers exact; conversions bitwise";
const char* kJustification =
    "A kernel that consumes these inputs exactly, accumulates in float32 and rounds to the case's format at most "
    "`depth` times on a tensor's path makes relative errors of at most u per rounding and about sqrt(K) u_fp32 "
    "for a K-term float32 sum (Higham and Mary 2019, probabilistic bound); the factor 2 is the margin. In fp32 "
    "cases every elementary operation rounds, not only stored intermediates: depth counts 4 per stage. Errors "
    "of near-zero elements come from cancellation among terms of the tensor's typical size, hence atol scales "
    "with rms(ref). NMSE of independent rounding errors is about depth u^2 / 3; the bound allows 6 times that.";

}  // namespace

Json manifest_entry(const Case& c) {
  Json tensors = Json::array();
  for (const auto& [name, t] : c.file.tensors)
    tensors.push_back({{"name", name}, {"dtype", dtype_name(t.dtype)}, {"shape", t.shape}});
  Json checks = Json::array();
  for (const Check& check : c.checks) checks.push_back(check_json(check));
  const Format f = parse_format(c.dtype);
  return {{"name", c.name},
          {"file", c.name + ".safetensors"},
          {"component", c.component},
          {"preset", c.preset},
          {"description", c.description},
          {"seed", c.seed},
          {"dtype", c.dtype},
          {"config", c.config},
          {"tensors", tensors},
          {"tolerance",
           {{"dtype", c.dtype},
            {"unit_roundoff", unit_roundoff(f)},
            {"rule", kRule},
            {"justification", kJustification},
            {"this_case", c.tolerance_note}}},
          {"checks", checks},
          {"moelab_version", moelab_version()}};
}

std::vector<std::string> write_golden(const std::filesystem::path& dir, std::string_view filter, bool realistic,
                                      const std::function<void(const Case&)>& progress) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) fail("--out", dir.string(), fmt::format("cannot create the directory ({})", ec.message()));
  Json unit = Json::object();
  for (Format f : kAllFormats) unit[std::string(format_name(f))] = unit_roundoff(f);
  Json manifest = {{"format_version", kFormatVersion},
                   {"moelab_version", moelab_version()},
                   {"unit_roundoff", unit},
                   {"cases", Json::array()}};
  std::vector<std::string> written;
  for (const CaseSpec& spec : case_specs()) {
    if (spec.realistic != realistic || !glob_match(filter, spec.name)) continue;
    Case c = spec.make();
    c.file.metadata = {{"format", "pt"}, {"moelab_case", c.name}, {"moelab_version", std::string(moelab_version())}};
    write_safetensors(dir / (c.name + ".safetensors"), c.file);
    manifest["cases"].push_back(manifest_entry(c));
    written.push_back(c.name);
    if (progress) progress(c);
  }
  if (written.empty()) fail("--filter", std::string(filter), "matches no case (moelab golden --list shows them)");
  write_file_atomically(dir / "manifest.json", manifest.dump(1) + "\n");
  return written;
}

}  // namespace moelab::golden
