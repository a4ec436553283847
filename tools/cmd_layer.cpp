// `moelab layer`: one MoE layer of a preset (tiny configuration), forward and backward, on a
// seeded random batch: the routing summary, drops, losses, time per stage and gradient norms.
//
//   moelab layer --preset qwen2_moe --tokens 32 --seed 1 [--capacity-factor 1.0] [--json]
//
// Inputs: x ~ N(0, 1) of shape (T, C); parameters from init_layer (N(0, 0.02^2)); dy ~ N(0, 1).
#include <fmt/format.h>

#include <cmath>
#include <numeric>
#include <optional>
#include <string>

#include "reference/error.h"
#include "reference/presets.h"
#include "reference/recorder.h"
#include "tools/commands.h"

namespace moelab::tools {
namespace {

using json = nlohmann::ordered_json;

struct LayerOptions {
  std::string preset;
  Index tokens = 16;
  std::uint64_t seed = 0;
  std::optional<double> capacity_factor;
  bool json = false;
};

Matrix normal_matrix(Rng& rng, Index rows, Index cols) {
  Matrix m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(rng.normal());
  return m;
}

double norm_of(const std::vector<ExpertParams>& experts) {
  double sq = 0;
  for (const ExpertParams& e : experts)
    sq += e.w_gate.squaredNorm() + e.w_up.squaredNorm() + e.w_down.squaredNorm() + e.b_gate.squaredNorm() +
          e.b_up.squaredNorm() + e.b_down.squaredNorm();
  return std::sqrt(sq);
}

void run_layer(const LayerOptions& o) {
  const Preset& preset = find_preset(o.preset);
  require(o.tokens >= 1 && o.tokens <= 100'000, "--tokens", o.tokens, "must be in [1, 100000]");
  LayerConfig config = layer_config(preset, PresetSize::tiny);
  config.routing.router.noise = RouterNoise::none;
  if (o.capacity_factor) {
    config.capacity.dropless = false;
    config.capacity.capacity_factor = *o.capacity_factor;
  }
  Rng rng(o.seed);
  const LayerParams params = init_layer<float>(config, rng);
  const Matrix x = normal_matrix(rng, o.tokens, config.hidden_size());
  std::vector<std::int32_t> token_ids;
  for (Index t = 0; t < o.tokens; ++t) token_ids.push_back(static_cast<std::int32_t>(rng.next_u64() % 256));
  const Matrix dy = normal_matrix(rng, o.tokens, config.hidden_size());

  MemoryRecorder recorder({events::timing});
  LayerOutput out;
  moe_layer_forward(out, x, token_ids, params, config, nullptr, &recorder);
  LayerGradsT<float> grads;
  moe_layer_backward(grads, dy, out, x, params, config);
  const RecordedEvent timing = recorder.last(events::timing);
  const std::int64_t dropped = std::accumulate(out.dropped.begin(), out.dropped.end(), std::int64_t{0});

  const json gradient_norms = {{"x", grads.dx.norm()},
                               {"router", grads.router.weight.norm()},
                               {"experts", norm_of(grads.experts)},
                               {"shared", norm_of(grads.shared)},
                               {"shared_gate", grads.shared_gate.norm()}};
  if (o.json) {
    json doc = {{"command", "layer"}, {"preset", preset.name}, {"tokens", o.tokens}, {"seed", o.seed}};
    doc["config"] = {{"routing", to_json(config.routing)},
                     {"activation", activation_name(config.expert.activation)},
                     {"intermediate_size", config.expert.intermediate_size},
                     {"dropless", config.capacity.dropless},
                     {"capacity_factor", config.capacity.capacity_factor},
                     {"shared_experts", config.shared.count},
                     {"shared_gated", config.shared.gated},
                     {"gate_placement", gate_placement_name(config.gate_placement)}};
    doc["load"] = out.plan.counts;
    doc["dropped"] = out.dropped;
    doc["aux_loss"] = json_number(out.aux_loss);
    doc["z_loss"] = json_number(out.z_loss);
    doc["output_norm"] = out.y.norm();
    doc["gradient_norms"] = gradient_norms;
    json seconds = json::object();
    for (const auto& [key, value] : timing.stats) seconds[key] = value;
    doc["timing"] = seconds;
    fmt::print("{}\n", doc.dump(2));
    return;
  }
  fmt::print("{}: {} (tiny: hidden {}, {} experts of {} {}, k = {}{})\n", preset.name, preset.model,
             config.hidden_size(), config.num_experts(), activation_name(config.expert.activation),
             config.expert.intermediate_size, config.routing.top_k,
             config.shared.count > 0 ? fmt::format(", {} shared{}", config.shared.count, config.shared.gated ? " (gated)" : "")
                                     : "");
  fmt::print("{} tokens, seed {}; gate on the expert {}; {}\n\n", o.tokens, o.seed,
             gate_placement_name(config.gate_placement),
             config.capacity.dropless ? std::string("dropless")
                                      : fmt::format("capacity factor {:g}", config.capacity.capacity_factor));
  fmt::print("expert  rows  dropped\n");
  for (Index e = 0; e < config.num_experts(); ++e)
    fmt::print("{:>6} {:>5} {:>8}\n", e, out.plan.counts[e], out.dropped[e]);
  fmt::print("\ndropped pairs {}; aux loss {:.6g}; z-loss {:.6g}; |y| {:.6g}\n", dropped, out.aux_loss, out.z_loss,
             out.y.norm());
  fmt::print("gradient norms: x {:.4g}, router {:.4g}, experts {:.4g}, shared {:.4g}\n", grads.dx.norm(),
             grads.router.weight.norm(), norm_of(grads.experts), norm_of(grads.shared));
  fmt::print("forward seconds: routing {:.3g}, dispatch {:.3g}, experts {:.3g}, combine {:.3g}\n",
             timing.stat("routing_seconds"), timing.stat("dispatch_seconds"), timing.stat("experts_seconds"),
             timing.stat("combine_seconds"));
}

}  // namespace

void add_layer_command(CLI::App& app) {
  auto o = std::make_shared<LayerOptions>();
  CLI::App* cmd = app.add_subcommand("layer", "One MoE layer of a preset, forward and backward, on a seeded batch");
  cmd->add_option("--preset", o->preset, "a preset name (see moelab presets)")->required();
  cmd->add_option("--tokens", o->tokens, "number of tokens T (default 16)");
  cmd->add_option("--seed", o->seed, "seed of the inputs and weights (default 0)");
  cmd->add_option("--capacity-factor", o->capacity_factor, "drop tokens beyond this capacity factor");
  cmd->add_flag("--json", o->json, "print one JSON document instead of tables");
  cmd->callback([o] { run_layer(*o); });
}

}  // namespace moelab::tools
