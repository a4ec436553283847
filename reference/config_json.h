// moelab/reference/config_json.h — configurations to JSON and back.
//
// The JSON is what `moelab presets --json`, `moelab route --json`, the golden manifests and the
// checkpoints' config.json carry: every field of the structs, named as in the structs. Reading it
// back validates it: an unknown key, a missing key, a value of the wrong type or outside its range
// is an Error that names the full path of the field and the rule, e.g.
//   "routing.gating.renorm_eps = \"a\": must be a number"
// and the struct's validate() then checks the rules between fields, with its own messages, e.g.
//   "top_k = 9: must not exceed num_experts = 8"  (RoutingConfig::validate names the struct's field)
// so a hand-edited file never loads as something else. to_json(from_json(j)) == j for every j
// that to_json wrote, and from_json(to_json(c)) equals c field by field (tested for every preset).
// The one field left out: RouterConfig::allow_nonfinite, a switch of the numerics lab rather than
// part of a configuration, is not written, and reading leaves it false.
#pragma once

#include <nlohmann/json.hpp>

#include <string_view>

#include "reference/capacity.h"
#include "reference/experts.h"
#include "reference/layer.h"
#include "reference/routing.h"

namespace moelab {

using Json = nlohmann::ordered_json;

Json to_json(const RoutingConfig& config);  // as presets.h has always written it
Json to_json(const ExpertConfig& config);
Json to_json(const CapacityConfig& config);
Json to_json(const SharedExpertsConfig& config);
Json to_json(const LayerConfig& config);    // {"routing", "expert", "capacity", "shared", "gate_placement"}

// `path` prefixes field names in messages ("routing", "layers[3].routing", ...). Each validates
// the result (config.validate()) before returning it.
RoutingConfig routing_config_from_json(const Json& j, std::string_view path = "routing");
ExpertConfig expert_config_from_json(const Json& j, std::string_view path = "expert");
CapacityConfig capacity_config_from_json(const Json& j, std::string_view path = "capacity");
SharedExpertsConfig shared_experts_config_from_json(const Json& j, std::string_view path = "shared");
LayerConfig layer_config_from_json(const Json& j, std::string_view path = "layer");

}  // namespace moelab
