// moelab/reference/presets.h — published MoE routing conventions, by name.
//
// Each preset states its source (paper and model card) and the exact convention it follows: the
// order of scoring and top-k, renormalisation and its epsilon, where the scaling goes, the mask of
// group-limited routing, the balance loss and its coefficient. These small differences are exactly
// what implementations get wrong, so each is written down and tested. A preset has the published
// model's sizes (`full`) and a tiny configuration with the same conventions for tests and training.
#pragma once

#include <string_view>
#include <vector>

#include "reference/config_json.h"  // to_json(RoutingConfig), for `moelab presets --json` and the manifests
#include "reference/layer.h"
#include "reference/routing.h"

namespace moelab {

// What the layer adds to the routing, at the published size.
struct PresetLayer {
  Activation activation = Activation::swiglu;
  Index intermediate_size = 0;       // each routed expert's H
  bool expert_bias = false;          // gpt-oss
  CapacityConfig capacity{};         // dropless unless the model drops tokens
  SharedExpertsConfig shared{};
  GatePlacement gate_placement = GatePlacement::output;
};

enum class PresetSize { full, tiny };

struct Preset {
  std::string_view name;        // "deepseek_v3"
  std::string_view model;       // "DeepSeek-V3 (671B)"
  std::string_view source;      // paper and model card
  std::string_view convention;  // the routing convention, in words
  RoutingConfig full;           // the published sizes
  RoutingConfig tiny;           // same conventions, C = 16 and at most 16 experts
  PresetLayer layer;            // experts, capacity, shared experts, gate placement (full size)
};

// The whole layer of a preset. The tiny one has expert and shared intermediate size 32.
LayerConfig layer_config(const Preset& preset, PresetSize size);

const std::vector<Preset>& presets();
// Throws Error naming the preset and listing the known names.
const Preset& find_preset(std::string_view name);

}  // namespace moelab
