// moelab/tools/golden/cases.h — the makers of golden cases, one per component, and the specs
// they take. case_specs() (cases.cpp) lists the committed and the realistic set.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "reference/layer.h"
#include "tools/golden/golden.h"

namespace moelab::golden {

// Edits x and the parameters before they are rounded and stored (adversarial cases).
using Adjust = std::function<void(MatrixD& x, LayerParamsT<double>& params)>;

// A routing case uses config.routing only; a layer case the whole layer.
struct LayerCaseSpec {
  std::string name{}, preset{}, description{};
  LayerConfig config{};
  Index tokens = 16;
  Format dtype = Format::fp32;
  bool backward = true;
  std::vector<Index> sequence_lengths{};
  std::uint64_t seed = 0;
  Adjust adjust{};
};
Case make_routing_case(const LayerCaseSpec& spec);
Case make_layer_case(const LayerCaseSpec& spec);

// cases_components.cpp
Case make_encode_case(Format format, std::uint64_t seed);   // float32 -> format bits, both overflow modes
Case make_decode_case(Format format);                       // every bit pattern -> float32
std::vector<std::string> loss_names();                      // switch, hf, megablocks, ...
Case make_loss_case(const std::string& loss, std::uint64_t seed);
Case make_bias_update_case(std::uint64_t seed);
struct CapacityCaseSpec {
  std::string name{}, description{};
  CapacityConfig capacity{};
  Index tokens = 16, num_experts = 8;
  int top_k = 2;
  bool skewed = false;   // every token's first choice is expert 0: overflow
  std::uint64_t seed = 0;
};
Case make_capacity_case(const CapacityCaseSpec& spec);
Case make_dispatch_case(std::uint64_t seed);
Case make_combine_case(std::uint64_t seed);
Case make_experts_case(const std::string& name, const ExpertConfig& config, Index rows, Format dtype, bool backward,
                       std::uint64_t seed, double input_scale = 1.0);
Case make_shared_gate_case(std::uint64_t seed);

}  // namespace moelab::golden
