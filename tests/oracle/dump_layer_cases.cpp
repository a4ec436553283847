// moelab/tests/oracle/dump_layer_cases.cpp — whole-MoE-layer cases for the independent PyTorch oracle.
//
//   moelab_dump_layer_cases OUT_DIR
//
// Writes OUT_DIR/<name>.json, one file per case, and OUT_DIR/manifest.json listing them. Each file
// holds the layer's configuration (routing as to_json, plus the experts, capacity, shared experts
// and gate placement), the inputs (x, token ids, sequence lengths, dy), every parameter (router
// weight and bias, selection bias, each routed and shared expert's weights and biases, the shared
// gate) and everything moe_layer_forward / moe_layer_backward compute from them in double: logits,
// scores, ids, gates, load, the capacity, keep, dropped, y, aux_loss, z_loss, and the gradients of
// sum(dy * y) + aux_loss + z_loss with respect to x, the router, every expert, every shared expert
// and the shared gate. layer_oracle.py recomputes all of it in PyTorch from the inputs, the
// parameters and the configuration alone (README.md).
//
// Cases: every preset's tiny layer, and variants with capacity (heavy dropping under arrival order
// and under gate priority, on the same data; floor rounding; min_capacity; a decimal factor whose
// quotient is 11 in exact arithmetic but 11.000000000000002 in double; exact gate ties broken by
// token id) and with gpt-oss's clamps active. Parameters come from init_layer with std 0.3 (so routing is far from
// uniform and experts differ), then every bias the layer has (router bias, selection bias, expert
// biases) is drawn non-zero; x, dy ~ N(0, 1). Switch's router jitter is off (an evaluation).
// Seeds are explicit and written into each file; the same build writes the same bytes.
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "reference/capacity.h"
#include "reference/config_json.h"
#include "reference/experts.h"
#include "reference/layer.h"
#include "reference/presets.h"
#include "reference/recorder.h"
#include "tests/oracle/case_writer.h"
#include "tests/testing.h"

namespace moelab {
namespace {

using Json = nlohmann::ordered_json;
using moelab::testing::random_matrix;

constexpr double kInitStd = 0.3;       // init_layer's std: logits ~ N(0, 16 * 0.09) = N(0, 1.2^2)
constexpr double kBiasStd = 0.3;       // router and expert biases
constexpr double kSelectionBiasStd = 0.1;  // DeepSeek-V3's balancing bias, beside sigmoid scores in (0, 1)

struct Case {
  std::string name;                     // file stem
  std::string preset;                   // the preset whose tiny layer it starts from
  std::string variant;                  // "" for the preset itself, else what was changed
  LayerConfig config;
  Index tokens = 20;                    // T
  std::vector<Index> sequence_lengths;  // deepseek_v3_sequence loss only; empty = one sequence
  double expert_input_scale = 1.0;      // multiplies w_gate, w_up (and their biases): gpt-oss's clamps
  std::uint64_t seed = 0;
};

struct Inputs {
  MatrixD x;                             // (T, C)
  std::vector<std::int32_t> token_ids;   // (T) hash and table routing only
  LayerParamsT<double> params;
  MatrixD dy;                            // (T, C)
};

bool uses_token_ids(const RoutingConfig& c) {
  return c.selection == SelectionKind::hash || c.selection == SelectionKind::table;
}

void randomise_expert(ExpertParamsT<double>& p, Rng& rng, double input_scale) {
  auto fill = [&](VectorT<double>& b) {
    if (b.size() > 0) b = random_matrix(rng, b.size(), 1, kBiasStd);
  };
  fill(p.b_gate);
  fill(p.b_up);
  fill(p.b_down);
  p.w_gate *= input_scale;
  p.w_up *= input_scale;
  p.b_gate *= input_scale;
  p.b_up *= input_scale;
}

Inputs make_inputs(const Case& c) {
  const LayerConfig& lc = c.config;
  const Index T = c.tokens, C = lc.hidden_size(), E = lc.num_experts();
  Rng rng(c.seed);
  Inputs in;
  in.params = init_layer<double>(lc, rng, kInitStd);
  RoutingParamsT<double>& routing = in.params.routing;
  if (routing.router.bias.size() > 0) routing.router.bias = random_matrix(rng, E, 1, kBiasStd);
  if (routing.selection_bias.size() > 0) routing.selection_bias = random_matrix(rng, E, 1, kSelectionBiasStd);
  for (ExpertParamsT<double>& e : in.params.experts) randomise_expert(e, rng, c.expert_input_scale);
  for (ExpertParamsT<double>& s : in.params.shared) randomise_expert(s, rng, c.expert_input_scale);
  in.x = random_matrix(rng, T, C);
  in.dy = random_matrix(rng, T, C);
  if (uses_token_ids(lc.routing)) {
    for (Index t = 0; t < T; ++t) in.token_ids.push_back(static_cast<std::int32_t>(rng.next_u64() % 1000));
  }
  return in;
}

// ---- JSON ----------------------------------------------------------------------------------------

// One expert's parameters (or their gradients); unused ones are empty lists.
Json expert_json(const ExpertParamsT<double>& p) {
  Json j;
  j["w_gate"] = json_rows(p.w_gate);
  j["w_up"] = json_rows(p.w_up);
  j["w_down"] = json_rows(p.w_down);
  j["b_gate"] = json_list(p.b_gate);
  j["b_up"] = json_list(p.b_up);
  j["b_down"] = json_list(p.b_down);
  return j;
}

Json experts_json(const std::vector<ExpertParamsT<double>>& experts) {
  Json list = Json::array();
  for (const ExpertParamsT<double>& e : experts) list.push_back(expert_json(e));
  return list;
}

Json run_case(const Case& c) {
  const LayerConfig& lc = c.config;
  const Inputs in = make_inputs(c);
  LayerOutputT<double> out;
  moe_layer_forward(out, in.x, in.token_ids, in.params, lc, nullptr, nullptr, c.sequence_lengths);
  LayerGradsT<double> grads;
  moe_layer_backward(grads, in.dy, out, in.x, in.params, lc, 1.0, c.sequence_lengths);

  const bool token_choice = !lc.routing.expert_choice();
  Json j;
  j["name"] = c.name;
  j["preset"] = c.preset;
  j["variant"] = c.variant;
  j["seed"] = c.seed;
  j["init_std"] = kInitStd;
  j["config"] = to_json(lc);  // routing as to_json(RoutingConfig), expert, capacity, shared, gate_placement
  if (lc.routing.selection == SelectionKind::table) j["hash_table"] = json_rows(lc.routing.hash_table);
  // Inputs and parameters.
  j["x"] = json_rows(in.x);
  j["token_ids"] = in.token_ids;
  j["sequence_lengths"] = c.sequence_lengths;
  j["dy"] = json_rows(in.dy);
  j["weight"] = json_rows(in.params.routing.router.weight);
  j["bias"] = json_list(in.params.routing.router.bias);
  j["selection_bias"] = json_list(in.params.routing.selection_bias);
  j["experts"] = experts_json(in.params.experts);
  j["shared"] = experts_json(in.params.shared);
  j["shared_gate"] = json_rows(in.params.shared_gate);
  // moelab's forward.
  j["logits"] = json_rows(out.routing.logits);
  j["scores"] = json_rows(out.routing.scores);
  j["ids"] = json_rows(out.routing.ids);
  j["gates"] = json_rows(out.routing.gates);
  j["load"] = out.routing.load;
  if (token_choice && !lc.capacity.dropless) {
    j["capacity"] = expert_capacity(c.tokens, lc.routing.top_k, lc.num_experts(), lc.capacity);
  } else {
    j["capacity"] = nullptr;  // dropless, or expert choice (its capacity is the ids' width)
  }
  j["keep"] = json_rows(out.keep);
  j["dropped"] = out.dropped;
  j["y"] = json_rows(out.y);
  j["aux_loss"] = json_number(out.aux_loss);
  j["z_loss"] = json_number(out.z_loss);
  // moelab's backward.
  j["dx"] = json_rows(grads.dx);
  j["dweight"] = json_rows(grads.router.weight);
  j["dbias"] = json_list(grads.router.bias);
  j["d_experts"] = experts_json(grads.experts);
  j["d_shared"] = experts_json(grads.shared);
  j["d_shared_gate"] = json_rows(grads.shared_gate);
  return j;
}

// ---- the cases -----------------------------------------------------------------------------------

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  std::uint64_t seed = 5000;
  auto add = [&](const std::string& name, const std::string& preset, const std::string& variant,
                 const LayerConfig& config, Index tokens, std::vector<Index> sequence_lengths = {},
                 double expert_input_scale = 1.0, bool same_data_as_previous = false) {
    Case c;
    c.name = name;
    c.preset = preset;
    c.variant = variant;
    c.config = config;
    c.tokens = tokens;
    c.sequence_lengths = std::move(sequence_lengths);
    c.expert_input_scale = expert_input_scale;
    c.seed = same_data_as_previous ? seed : ++seed;  // the same seed draws the same x, dy and parameters
    cases.push_back(std::move(c));
  };
  auto tiny = [](std::string_view preset) { return layer_config(find_preset(preset), PresetSize::tiny); };
  auto capped = [](LayerConfig c, double factor, DropPolicy policy,
                   CapacityRounding rounding = CapacityRounding::ceil, Index min_capacity = 0) {
    c.capacity = {.dropless = false,
                  .capacity_factor = factor,
                  .rounding = rounding,
                  .min_capacity = min_capacity,
                  .policy = policy};
    return c;
  };

  // Every preset's tiny layer, as published (Switch: jitter off).
  for (const Preset& p : presets()) {
    LayerConfig config = layer_config(p, PresetSize::tiny);
    std::string variant;
    if (config.routing.router.noise != RouterNoise::none) {
      config.routing.router.noise = RouterNoise::none;
      variant = "router noise off (evaluation)";
    }
    const std::string name(p.name);
    std::vector<Index> lengths;
    if (config.routing.aux_loss == AuxLoss::deepseek_v3_sequence) lengths = {8, 12};
    add(name, name, variant, config, name == "switch" ? 24 : 20, lengths);
  }

  // gpt-oss with its clamps active: gate and up pre-activations ~ N(0, 4.8^2), so ~7% of the gates
  // lie above 7 and ~14% of the ups beyond +-7.
  add("gpt_oss_clamped", "gpt_oss", "w_gate, w_up and their biases x4: the clamps at 7 are active", tiny("gpt_oss"),
      20, {}, 4.0);

  // Capacity and dropping.
  add("mixtral_cf0.5_arrival", "mixtral", "capacity factor 0.5 (capacity 3 for 48 pairs on 8 experts), arrival order",
      capped(tiny("mixtral"), 0.5, DropPolicy::arrival_order), 24);
  add("mixtral_cf0.5_priority", "mixtral", "the same data, capacity 3, gate priority",
      capped(tiny("mixtral"), 0.5, DropPolicy::gate_priority), 24, {}, 1.0, true);
  add("qwen2_moe_cf0.75_priority_floor", "qwen2_moe",
      "capacity factor 0.75, floor rounding (0.75 * 88 / 12 = 5.5 -> 5), gate priority, gated shared expert",
      capped(tiny("qwen2_moe"), 0.75, DropPolicy::gate_priority, CapacityRounding::floor), 22);
  add("olmoe_cf0.25_min4", "olmoe", "capacity factor 0.25 (ceil 1.25 = 2) raised to min_capacity 4, arrival order",
      capped(tiny("olmoe"), 0.25, DropPolicy::arrival_order, CapacityRounding::ceil, 4), 20);
  add("deepseek_v3_cf1.1_priority", "deepseek_v3",
      "capacity factor 1.1 with T k / E = 10: capacity 11 (the double quotient is 11.000000000000002), gate "
      "priority on scaled gates",
      capped(tiny("deepseek_v3"), 1.1, DropPolicy::gate_priority), 40, {16, 24});
  add("llama4_cf0.5_priority", "llama4", "capacity factor 0.5 (capacity 2), gate priority, gate on the input",
      capped(tiny("llama4"), 0.5, DropPolicy::gate_priority), 24);
  add("hash_cf0.5_priority", "hash",
      "capacity factor 0.5 (capacity 2), gate priority: every gate is 1, so the exact ties go to the lower token id",
      capped(tiny("hash"), 0.5, DropPolicy::gate_priority), 24);
  add("switch_cf0.5_arrival", "switch", "capacity factor 0.5 (capacity 2), arrival order, router noise off",
      [&] {
        LayerConfig c = capped(tiny("switch"), 0.5, DropPolicy::arrival_order);
        c.routing.router.noise = RouterNoise::none;
        return c;
      }(),
      24);
  return cases;
}

std::vector<oracle::NamedCase> named_cases() {
  std::vector<oracle::NamedCase> named;
  for (const Case& c : all_cases()) named.push_back({c.name, [c] { return run_case(c); }});
  return named;
}

}  // namespace
}  // namespace moelab

int main(int argc, char** argv) {
  return moelab::oracle::dumper_main(argc, argv, "moelab_dump_layer_cases", moelab::named_cases);
}
