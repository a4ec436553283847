// `moelab presets`: the published routing conventions moelab reproduces, side by side.
#include <fmt/format.h>

#include "reference/presets.h"
#include "tools/commands.h"

namespace moelab::tools {
namespace {

std::string gate_summary(const GatingConfig& g) {
  std::string s(gate_kind_name(g.kind));
  if (g.renormalize) s += g.renorm_eps > 0 ? fmt::format(", renorm +{:g}", g.renorm_eps) : ", renorm";
  if (g.routed_scaling_factor != 1.0) s += fmt::format(", x{:g}", g.routed_scaling_factor);
  return s;
}

nlohmann::ordered_json layer_json(const PresetLayer& l) {
  return {{"activation", activation_name(l.activation)},
          {"intermediate_size", l.intermediate_size},
          {"expert_bias", l.expert_bias},
          {"capacity", {{"dropless", l.capacity.dropless},
                        {"capacity_factor", l.capacity.capacity_factor},
                        {"policy", l.capacity.policy == DropPolicy::arrival_order ? "arrival_order" : "gate_priority"}}},
          {"shared", {{"count", l.shared.count},
                      {"intermediate_size", l.shared.intermediate_size},
                      {"gated", l.shared.gated}}},
          {"gate_placement", gate_placement_name(l.gate_placement)}};
}

void print_presets(bool as_json) {
  if (as_json) {
    nlohmann::ordered_json doc = {{"command", "presets"}, {"presets", nlohmann::ordered_json::array()}};
    for (const Preset& p : presets())
      doc["presets"].push_back({{"name", p.name},
                                {"model", p.model},
                                {"source", p.source},
                                {"convention", p.convention},
                                {"full", to_json(p.full)},
                                {"tiny", to_json(p.tiny)},
                                {"layer", layer_json(p.layer)}});
    fmt::print("{}\n", doc.dump(2));
    return;
  }
  fmt::print("{:<14} {:<14} {:<15} {:>8}  {:<42} {}\n", "preset", "scoring", "selection", "k / E", "gates",
             "balance");
  for (const Preset& p : presets()) {
    const RoutingConfig& c = p.full;
    std::string balance(aux_loss_name(c.aux_loss));
    if (c.aux_loss != AuxLoss::none) balance += fmt::format(" {:g}", c.aux_loss_coef);
    if (c.device_loss_coef > 0) balance += fmt::format(" / device {:g}", c.device_loss_coef);
    if (c.comm_loss_coef > 0) balance += fmt::format(" / comm {:g}", c.comm_loss_coef);
    if (c.z_loss_coef > 0) balance += fmt::format(", z-loss {:g}", c.z_loss_coef);
    if (c.use_selection_bias) balance += fmt::format(", bias gamma {:g}", c.bias_update_rate);
    fmt::print("{:<14} {:<14} {:<15} {:>8}  {:<42} {}\n", p.name, scoring_name(c.scoring),
               selection_kind_name(c.selection), fmt::format("{} / {}", c.top_k, c.num_experts()),
               gate_summary(c.gating), balance);
  }
  fmt::print("\n`moelab presets --json` gives each preset's source, convention and full and tiny configurations.\n");
}

}  // namespace

void add_presets_command(CLI::App& app) {
  auto as_json = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand("presets", "The published routing conventions (Switch ... DeepSeek-V3, Llama 4)");
  cmd->add_flag("--json", *as_json, "print one JSON document instead of a table");
  cmd->callback([as_json] { print_presets(*as_json); });
}

}  // namespace moelab::tools
