// Tests of reference/config_json: every preset survives to_json -> from_json -> to_json unchanged
// (the JSON byte for byte, the structs field by field), a hand-written file reads as written, and
// every malformed file is an Error naming the field's full path, the value and the rule.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <bit>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "reference/config_json.h"
#include "reference/presets.h"
#include "reference/selection.h"
#include "tests/testing.h"

namespace moelab {
namespace {

using moelab::testing::error_of;
using ::testing::HasSubstr;

// ---- field-by-field equality ---------------------------------------------------------------------

// The names of the fields that differ, "" when none do. Doubles are compared bit for bit.
class Differences {
 public:
  template <typename T>
  void field(const T& a, const T& b, const char* name) {
    bool same = false;
    if constexpr (std::is_same_v<T, double>) {
      same = std::bit_cast<std::uint64_t>(a) == std::bit_cast<std::uint64_t>(b);
    } else {
      same = a == b;
    }
    if (!same) names_ += std::string(names_.empty() ? "" : ", ") + name;
  }
  void table(const IndexMatrix& a, const IndexMatrix& b, const char* name) {
    field(a.rows() == b.rows() && a.cols() == b.cols() && (a.size() == 0 || a == b), true, name);
  }
  const std::string& names() const { return names_; }

 private:
  std::string names_;
};

#define MOELAB_FIELD(d, a, b, member) (d).field((a).member, (b).member, #member)

std::string differences(const RoutingConfig& a, const RoutingConfig& b) {
  Differences d;
  MOELAB_FIELD(d, a, b, router.hidden_size);
  MOELAB_FIELD(d, a, b, router.num_experts);
  MOELAB_FIELD(d, a, b, router.use_bias);
  MOELAB_FIELD(d, a, b, router.dtype);
  MOELAB_FIELD(d, a, b, router.noise);
  MOELAB_FIELD(d, a, b, router.jitter_eps);
  MOELAB_FIELD(d, a, b, router.allow_nonfinite);  // not in the JSON: stays at its default
  MOELAB_FIELD(d, a, b, scoring);
  MOELAB_FIELD(d, a, b, selection);
  MOELAB_FIELD(d, a, b, top_k);
  MOELAB_FIELD(d, a, b, use_selection_bias);
  MOELAB_FIELD(d, a, b, group.n_group);
  MOELAB_FIELD(d, a, b, group.topk_group);
  MOELAB_FIELD(d, a, b, group.score);
  MOELAB_FIELD(d, a, b, group.mask);
  MOELAB_FIELD(d, a, b, num_devices);
  MOELAB_FIELD(d, a, b, topk_devices);
  MOELAB_FIELD(d, a, b, capacity_factor);
  MOELAB_FIELD(d, a, b, hash_seed);
  d.table(a.hash_table, b.hash_table, "hash_table");
  MOELAB_FIELD(d, a, b, gating.kind);
  MOELAB_FIELD(d, a, b, gating.renormalize);
  MOELAB_FIELD(d, a, b, gating.renorm_eps);
  MOELAB_FIELD(d, a, b, gating.routed_scaling_factor);
  MOELAB_FIELD(d, a, b, aux_loss);
  MOELAB_FIELD(d, a, b, aux_loss_coef);
  MOELAB_FIELD(d, a, b, device_loss_coef);
  MOELAB_FIELD(d, a, b, comm_loss_coef);
  MOELAB_FIELD(d, a, b, z_loss_coef);
  MOELAB_FIELD(d, a, b, bias_update_rate);
  return d.names();
}

std::string differences(const LayerConfig& a, const LayerConfig& b) {
  Differences d;
  MOELAB_FIELD(d, a, b, expert.hidden_size);
  MOELAB_FIELD(d, a, b, expert.intermediate_size);
  MOELAB_FIELD(d, a, b, expert.activation);
  MOELAB_FIELD(d, a, b, expert.use_bias);
  MOELAB_FIELD(d, a, b, expert.swiglu_limit);
  MOELAB_FIELD(d, a, b, expert.swiglu_alpha);
  MOELAB_FIELD(d, a, b, capacity.dropless);
  MOELAB_FIELD(d, a, b, capacity.capacity_factor);
  MOELAB_FIELD(d, a, b, capacity.rounding);
  MOELAB_FIELD(d, a, b, capacity.min_capacity);
  MOELAB_FIELD(d, a, b, capacity.policy);
  MOELAB_FIELD(d, a, b, shared.count);
  MOELAB_FIELD(d, a, b, shared.intermediate_size);
  MOELAB_FIELD(d, a, b, shared.gated);
  MOELAB_FIELD(d, a, b, gate_placement);
  const std::string routing = differences(a.routing, b.routing);
  return d.names() + (d.names().empty() || routing.empty() ? "" : ", ") + routing;
}

#undef MOELAB_FIELD

// ---- round trips ---------------------------------------------------------------------------------

TEST(ConfigJson, EveryPresetRoundTripsAtBothSizes) {
  int checked = 0;
  for (const Preset& p : presets()) {
    for (const PresetSize size : {PresetSize::full, PresetSize::tiny}) {
      const std::string what = std::string(p.name) + (size == PresetSize::full ? " full" : " tiny");
      const LayerConfig config = layer_config(p, size);
      const Json j = to_json(config);
      const LayerConfig back = layer_config_from_json(j);
      EXPECT_EQ(to_json(back).dump(), j.dump()) << what;
      EXPECT_EQ(differences(back, config), "") << what;
      // Each part on its own, with its default path.
      const RoutingConfig routing = routing_config_from_json(j["routing"]);
      EXPECT_EQ(differences(routing, config.routing), "") << what;
      EXPECT_EQ(to_json(routing).dump(), j["routing"].dump()) << what;
      EXPECT_EQ(to_json(expert_config_from_json(j["expert"])).dump(), j["expert"].dump()) << what;
      EXPECT_EQ(to_json(capacity_config_from_json(j["capacity"])).dump(), j["capacity"].dump()) << what;
      EXPECT_EQ(to_json(shared_experts_config_from_json(j["shared"])).dump(), j["shared"].dump()) << what;
      // Through text, as a file would go.
      EXPECT_EQ(to_json(layer_config_from_json(Json::parse(j.dump(2)))).dump(), j.dump()) << what;
      ++checked;
    }
  }
  EXPECT_EQ(checked, 26);
}

TEST(ConfigJson, LayerLayoutIsRoutingExpertCapacitySharedGatePlacement) {
  const LayerConfig config = layer_config(find_preset("qwen2_moe"), PresetSize::tiny);
  const Json j = to_json(config);
  std::vector<std::string> keys;
  for (const auto& item : j.items()) keys.push_back(item.key());
  EXPECT_EQ(keys, (std::vector<std::string>{"routing", "expert", "capacity", "shared", "gate_placement"}));
  EXPECT_EQ(j["routing"].dump(), to_json(config.routing).dump());
  EXPECT_EQ(j["expert"].dump(),
            R"({"hidden_size":16,"intermediate_size":32,"activation":"swiglu","use_bias":false,)"
            R"("swiglu_limit":7.0,"swiglu_alpha":1.702})");
  EXPECT_EQ(j["capacity"].dump(),
            R"({"dropless":true,"capacity_factor":1.0,"rounding":"ceil","min_capacity":0,"policy":"arrival_order"})");
  EXPECT_EQ(j["shared"].dump(), R"({"count":1,"intermediate_size":32,"gated":true})");
  EXPECT_EQ(j["gate_placement"], "output");
}

// No preset routes by table (DeepSeek-V4's tid2eid); a table config round-trips all the same.
TEST(ConfigJson, HashTableRoundTrips) {
  LayerConfig config = layer_config(find_preset("qwen3_moe"), PresetSize::tiny);  // E = 16, k = 4
  config.routing.selection = SelectionKind::table;
  config.routing.hash_table = make_hash_table(50, 16, 4, 7);
  ASSERT_NO_THROW(config.validate());
  const Json j = to_json(config);
  ASSERT_EQ(j["routing"]["hash_table"].size(), 50u);
  EXPECT_EQ(j["routing"]["hash_table"][0].size(), 4u);
  const LayerConfig back = layer_config_from_json(j);
  EXPECT_EQ(differences(back, config), "");
  EXPECT_EQ(to_json(back).dump(), j.dump());
}

TEST(ConfigJson, HandWrittenFileReadsAsWritten) {
  // Integers where numbers are expected (device_loss_coef, swiglu_limit) are fine; keys in any order.
  const Json j = Json::parse(R"({
    "gate_placement": "input",
    "routing": {
      "hidden_size": 64, "num_experts": 16,
      "router": {"use_bias": true, "dtype": "bf16", "noise": "none", "jitter_eps": 0.01},
      "scoring": "sigmoid", "selection": "group_limited", "top_k": 4, "use_selection_bias": true,
      "group": {"n_group": 4, "topk_group": 2, "score": "max", "mask": "zero"},
      "gating": {"kind": "selected_scores", "renormalize": true, "renorm_eps": 1e-20, "routed_scaling_factor": 2.5},
      "losses": {"aux_loss": "deepseek_v3_sequence", "aux_loss_coef": 0.0001, "device_loss_coef": 0,
                 "comm_loss_coef": 0, "z_loss_coef": 0.001, "bias_update_rate": 0.001}
    },
    "expert": {"hidden_size": 64, "intermediate_size": 32, "activation": "swiglu_clamped", "use_bias": true,
               "swiglu_limit": 7, "swiglu_alpha": 1.702},
    "capacity": {"dropless": false, "capacity_factor": 1.25, "rounding": "floor", "min_capacity": 4,
                 "policy": "gate_priority"},
    "shared": {"count": 1, "intermediate_size": 48, "gated": true}
  })");
  LayerConfig expected;
  expected.routing.router = {.hidden_size = 64, .num_experts = 16, .use_bias = true, .dtype = Format::bf16,
                             .noise = RouterNoise::none, .jitter_eps = 0.01};
  expected.routing.scoring = Scoring::sigmoid;
  expected.routing.selection = SelectionKind::group_limited;
  expected.routing.top_k = 4;
  expected.routing.use_selection_bias = true;
  expected.routing.group = {.n_group = 4, .topk_group = 2, .score = GroupScore::max, .mask = GroupMask::zero};
  expected.routing.gating = {.kind = GateKind::selected_scores, .renormalize = true, .renorm_eps = 1e-20,
                             .routed_scaling_factor = 2.5};
  expected.routing.aux_loss = AuxLoss::deepseek_v3_sequence;
  expected.routing.aux_loss_coef = 0.0001;
  expected.routing.z_loss_coef = 0.001;
  expected.routing.bias_update_rate = 0.001;
  expected.expert = {.hidden_size = 64, .intermediate_size = 32, .activation = Activation::swiglu_clamped,
                     .use_bias = true, .swiglu_limit = 7.0, .swiglu_alpha = 1.702};
  expected.capacity = {.dropless = false, .capacity_factor = 1.25, .rounding = CapacityRounding::floor,
                       .min_capacity = 4, .policy = DropPolicy::gate_priority};
  expected.shared = {.count = 1, .intermediate_size = 48, .gated = true};
  expected.gate_placement = GatePlacement::input;
  const LayerConfig read = layer_config_from_json(j);
  EXPECT_EQ(differences(read, expected), "");
  // Written back, it is in to_json's order, with the integers written as the doubles they are.
  const std::string back = to_json(read).dump();
  EXPECT_THAT(back, HasSubstr(R"("device_loss_coef":0.0)"));
  EXPECT_THAT(back, HasSubstr(R"("swiglu_limit":7.0)"));
  EXPECT_EQ(back.rfind(R"({"routing":)", 0), 0u);
}

TEST(ConfigJson, SelectionKeysOfEachSelectionRoundTrip) {
  // hash_seed is an unsigned 64-bit integer: the largest one survives.
  RoutingConfig hash = find_preset("hash").tiny;
  hash.hash_seed = std::numeric_limits<std::uint64_t>::max();
  EXPECT_EQ(routing_config_from_json(to_json(hash)).hash_seed, std::numeric_limits<std::uint64_t>::max());
  const RoutingConfig ec = find_preset("expert_choice").tiny;
  EXPECT_EQ(routing_config_from_json(to_json(ec)).capacity_factor, 2.0);
  const RoutingConfig v2 = find_preset("deepseek_v2").full;
  const RoutingConfig v2_back = routing_config_from_json(to_json(v2));
  EXPECT_EQ(v2_back.num_devices, 8);
  EXPECT_EQ(v2_back.topk_devices, 3);
}

// ---- errors: each names the full path, the value as JSON and the rule ----------------------------

Json tiny_json(std::string_view preset) { return to_json(layer_config(find_preset(preset), PresetSize::tiny)); }

// The message of reading a routing configuration after `edit`, with the default path "routing".
std::string routing_error(std::string_view preset, const std::function<void(Json&)>& edit) {
  Json j = tiny_json(preset)["routing"];
  edit(j);
  return error_of([&] { routing_config_from_json(j); });
}

std::string layer_error(std::string_view preset, const std::function<void(Json&)>& edit) {
  Json j = tiny_json(preset);
  edit(j);
  return error_of([&] { layer_config_from_json(j); });
}

TEST(ConfigJsonErrors, UnknownKey) {
  EXPECT_THAT(routing_error("deepseek_v3", [](Json& j) { j["gating"]["renorm_epsilon"] = 1e-20; }),
              HasSubstr("routing.gating.renorm_epsilon = 1e-20: is not a field of routing.gating (its fields: kind, "
                        "renormalize, renorm_eps, routed_scaling_factor)"));
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["router"]["allow_nonfinite"] = true; }),
              HasSubstr("routing.router.allow_nonfinite = true: is not a field of routing.router"));
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["topk"] = 2; }),
              HasSubstr("routing.topk = 2: is not a field of routing"));
  EXPECT_THAT(layer_error("mixtral", [](Json& j) { j["experts"] = 8; }),
              HasSubstr("layer.experts = 8: is not a field of layer (its fields: routing, expert, capacity, shared, "
                        "gate_placement)"));
  EXPECT_THAT(layer_error("mixtral", [](Json& j) { j["capacity"]["factor"] = "1.0"; }),
              HasSubstr(R"(layer.capacity.factor = "1.0": is not a field of layer.capacity)"));
  // A long value is shortened in the message.
  const std::string message = routing_error("mixtral", [](Json& j) { j["notes"] = std::string(500, 'x'); });
  EXPECT_THAT(message, HasSubstr("routing.notes = \"xxxx"));
  EXPECT_THAT(message, HasSubstr("...: is not a field of routing"));
  EXPECT_EQ(message.find(std::string(100, 'x')), std::string::npos);
}

TEST(ConfigJsonErrors, MissingKey) {
  EXPECT_EQ(routing_error("mixtral", [](Json& j) { j.erase("top_k"); }), "routing.top_k = (missing): is required");
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["router"].erase("dtype"); }),
              HasSubstr("routing.router.dtype = (missing): is required"));
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j.erase("losses"); }),
              HasSubstr("routing.losses = (missing): is required"));
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j.erase("selection"); }),
              HasSubstr("routing.selection = (missing): is required"));
  EXPECT_THAT(layer_error("mixtral", [](Json& j) { j.erase("gate_placement"); }),
              HasSubstr("layer.gate_placement = (missing): is required"));
  EXPECT_THAT(layer_error("mixtral", [](Json& j) { j["shared"].erase("gated"); }),
              HasSubstr("layer.shared.gated = (missing): is required"));
}

TEST(ConfigJsonErrors, WrongType) {
  // The example of config_json.h, word for word.
  EXPECT_EQ(routing_error("deepseek_v3", [](Json& j) { j["gating"]["renorm_eps"] = "a"; }),
            R"(routing.gating.renorm_eps = "a": must be a number)");
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["router"]["use_bias"] = 1; }),
              HasSubstr("routing.router.use_bias = 1: must be true or false"));
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["hidden_size"] = "16"; }),
              HasSubstr(R"(routing.hidden_size = "16": must be an integer)"));
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["router"] = Json::array(); }),
              HasSubstr("routing.router = []: must be an object"));
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["losses"]["z_loss_coef"] = nullptr; }),
              HasSubstr("routing.losses.z_loss_coef = null: must be a number"));
  EXPECT_THAT(layer_error("mixtral", [](Json& j) { j["capacity"]["dropless"] = "false"; }),
              HasSubstr(R"(layer.capacity.dropless = "false": must be true or false)"));
  EXPECT_THAT(error_of([] { routing_config_from_json(Json(3)); }), HasSubstr("routing = 3: must be an object"));
  EXPECT_THAT(error_of([] { layer_config_from_json(Json::array({1, 2}), "layers[3]"); }),
              HasSubstr("layers[3] = [1,2]: must be an object"));
  // Numbers must be finite (JSON has no NaN or infinity; a Json built in code can hold them).
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["router"]["jitter_eps"] = std::numeric_limits<double>::infinity(); }),
              HasSubstr("routing.router.jitter_eps = null: must be a finite number"));
}

TEST(ConfigJsonErrors, IntegersMustBeIntegers) {
  EXPECT_EQ(routing_error("mixtral", [](Json& j) { j["top_k"] = 2.5; }), "routing.top_k = 2.5: must be an integer");
  EXPECT_EQ(routing_error("mixtral", [](Json& j) { j["top_k"] = 2.0; }), "routing.top_k = 2.0: must be an integer");
  EXPECT_THAT(routing_error("deepseek_v3", [](Json& j) { j["group"]["n_group"] = true; }),
              HasSubstr("routing.group.n_group = true: must be an integer"));
  EXPECT_THAT(layer_error("olmoe", [](Json& j) { j["capacity"]["min_capacity"] = 1e3; }),
              HasSubstr("layer.capacity.min_capacity = 1000.0: must be an integer"));
}

TEST(ConfigJsonErrors, IntegersOutOfRange) {
  EXPECT_EQ(routing_error("mixtral", [](Json& j) { j["top_k"] = 3000000000; }),
            "routing.top_k = 3000000000: must be an integer in [-2147483648, 2147483647]");
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["top_k"] = -3000000000LL; }),
              HasSubstr("routing.top_k = -3000000000: must be an integer in [-2147483648, 2147483647]"));
  EXPECT_THAT(routing_error("deepseek_v2", [](Json& j) { j["devices"]["num_devices"] = 1LL << 40; }),
              HasSubstr("routing.devices.num_devices = 1099511627776: must be an integer in [-2147483648, 2147483647]"));
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["num_experts"] = std::numeric_limits<std::uint64_t>::max(); }),
              HasSubstr("routing.num_experts = 18446744073709551615: must be an integer in [-9223372036854775808, "
                        "9223372036854775807]"));
  EXPECT_THAT(routing_error("hash", [](Json& j) { j["hash_seed"] = -1; }),
              HasSubstr("routing.hash_seed = -1: must be an integer in [0, 18446744073709551615]"));
  // Read from text: a literal beyond 64 bits is a double, so "an integer" is the rule it breaks.
  Json j = tiny_json("mixtral")["routing"];
  std::string text = j.dump();
  text.replace(text.find(R"("top_k":2)"), 9, R"("top_k":99999999999999999999)");
  EXPECT_THAT(error_of([&] { routing_config_from_json(Json::parse(text)); }),
              HasSubstr("routing.top_k = 1e+20: must be an integer"));
}

TEST(ConfigJsonErrors, UnknownEnumName) {
  EXPECT_EQ(routing_error("mixtral", [](Json& j) { j["scoring"] = "softmaxx"; }),
            R"(routing.scoring = "softmaxx": must be one of softmax, sigmoid, sqrt_softplus)");
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["scoring"] = 0; }),
              HasSubstr("routing.scoring = 0: must be one of softmax, sigmoid, sqrt_softplus"));
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["selection"] = "top_k"; }),
              HasSubstr(R"(routing.selection = "top_k": must be one of topk, group_limited, device_limited, )"
                        "expert_choice, hash, table"));
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["router"]["dtype"] = "bfloat16"; }),
              HasSubstr(R"(routing.router.dtype = "bfloat16": must be one of fp32, bf16, fp16, fp8_e4m3, fp8_e5m2)"));
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["router"]["noise"] = "gaussian"; }),
              HasSubstr(R"(routing.router.noise = "gaussian": must be one of none, noisy_topk, jitter)"));
  EXPECT_THAT(routing_error("deepseek_v3", [](Json& j) { j["group"]["mask"] = "-inf"; }),
              HasSubstr(R"(routing.group.mask = "-inf": must be one of neg_inf, zero)"));
  EXPECT_THAT(routing_error("deepseek_v3", [](Json& j) { j["group"]["score"] = "sum"; }),
              HasSubstr(R"(routing.group.score = "sum": must be one of top2_sum, max)"));
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["gating"]["kind"] = "softmax"; }),
              HasSubstr(R"(routing.gating.kind = "softmax": must be one of selected_scores, )"
                        "softmax_of_selected_logits, sigmoid_of_selected_logits, ones"));
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["losses"]["aux_loss"] = "switch_transformer"; }),
              HasSubstr(R"(routing.losses.aux_loss = "switch_transformer": must be one of none, switch, )"));
  EXPECT_THAT(layer_error("mixtral", [](Json& j) { j["expert"]["activation"] = "silu"; }),
              HasSubstr(R"(layer.expert.activation = "silu": must be one of swiglu, gelu, relu, swiglu_clamped)"));
  EXPECT_THAT(layer_error("mixtral", [](Json& j) { j["capacity"]["rounding"] = "round"; }),
              HasSubstr(R"(layer.capacity.rounding = "round": must be one of ceil, floor, trunc_int)"));
  EXPECT_THAT(layer_error("mixtral", [](Json& j) { j["capacity"]["policy"] = "random"; }),
              HasSubstr(R"(layer.capacity.policy = "random": must be one of arrival_order, gate_priority)"));
  EXPECT_THAT(layer_error("mixtral", [](Json& j) { j["gate_placement"] = "both"; }),
              HasSubstr(R"(layer.gate_placement = "both": must be one of output, input)"));
}

TEST(ConfigJsonErrors, KeysOfOtherSelections) {
  // A key that another selection uses would be ignored: it is an error, naming both selections.
  EXPECT_EQ(routing_error("mixtral",
                          [](Json& j) { j["group"] = {{"n_group", 4}, {"topk_group", 2}, {"score", "max"}, {"mask", "zero"}}; }),
            R"(routing.group = {"n_group":4,"topk_group":2,"score":"max","mask":"zero"}: is used only with )"
            "selection = group_limited, and selection is topk");
  EXPECT_THAT(routing_error("deepseek_v3", [](Json& j) { j["selection"] = "topk"; }),
              HasSubstr("routing.group = {\"n_group\":4,\"topk_group\":2,\"score\":\"top2_sum\",\"mask\":\"neg_inf\"}: "
                        "is used only with selection = group_limited, and selection is topk"));
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["devices"] = {{"num_devices", 4}, {"topk_devices", 2}}; }),
              HasSubstr("is used only with selection = device_limited, and selection is topk"));
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["capacity_factor"] = 2.0; }),
              HasSubstr("routing.capacity_factor = 2.0: is used only with selection = expert_choice, and selection is topk"));
  EXPECT_THAT(routing_error("expert_choice", [](Json& j) { j["hash_seed"] = 1; }),
              HasSubstr("routing.hash_seed = 1: is used only with selection = hash, and selection is expert_choice"));
  EXPECT_THAT(routing_error("hash", [](Json& j) { j["hash_table"] = {{0}, {1}}; }),
              HasSubstr("routing.hash_table = [[0],[1]]: is used only with selection = table, and selection is hash"));
  // ... and the key of the selection in use is required.
  EXPECT_EQ(routing_error("deepseek_v3", [](Json& j) { j.erase("group"); }),
            "routing.group = (missing): is required when selection = group_limited");
  EXPECT_THAT(routing_error("deepseek_v2", [](Json& j) { j.erase("devices"); }),
              HasSubstr("routing.devices = (missing): is required when selection = device_limited"));
  EXPECT_THAT(routing_error("expert_choice", [](Json& j) { j.erase("capacity_factor"); }),
              HasSubstr("routing.capacity_factor = (missing): is required when selection = expert_choice"));
  EXPECT_THAT(routing_error("hash", [](Json& j) { j.erase("hash_seed"); }),
              HasSubstr("routing.hash_seed = (missing): is required when selection = hash"));
  EXPECT_THAT(routing_error("hash", [](Json& j) { j["selection"] = "table"; }),
              HasSubstr("routing.hash_seed = 24301: is used only with selection = hash, and selection is table"));
  EXPECT_THAT(routing_error("hash", [](Json& j) {
                j["selection"] = "table";
                j.erase("hash_seed");
              }),
              HasSubstr("routing.hash_table = (missing): is required when selection = table"));
  // The fields inside them are checked like any others.
  EXPECT_THAT(routing_error("deepseek_v3", [](Json& j) { j["group"].erase("mask"); }),
              HasSubstr("routing.group.mask = (missing): is required"));
  EXPECT_THAT(routing_error("deepseek_v2", [](Json& j) { j["devices"]["devices"] = 4; }),
              HasSubstr("routing.devices.devices = 4: is not a field of routing.devices (its fields: num_devices, "
                        "topk_devices)"));
}

TEST(ConfigJsonErrors, MalformedHashTable) {
  auto table_error = [](const Json& table) {
    Json j = tiny_json("hash")["routing"];
    j["selection"] = "table";
    j.erase("hash_seed");
    j["hash_table"] = table;
    return error_of([&] { routing_config_from_json(j); });
  };
  EXPECT_THAT(table_error(Json(3)), HasSubstr("routing.hash_table = 3: must be a list of rows, each a list of expert ids"));
  EXPECT_THAT(table_error(Json::array({Json::array({1}), 2})),
              HasSubstr("routing.hash_table[1] = 2: must be a list of rows, each a list of expert ids"));
  EXPECT_THAT(table_error(Json::array({Json::array({1}), Json::array({2, 3})})),
              HasSubstr("routing.hash_table[1] = [2,3]: must have 1 entries, as row 0 has"));
  EXPECT_THAT(table_error(Json::array({Json::array({1}), Json::array({2.5})})),
              HasSubstr("routing.hash_table[1][0] = 2.5: must be an integer"));
  EXPECT_THAT(table_error(Json::array({Json::array({1}), Json::array({1LL << 31})})),
              HasSubstr("routing.hash_table[1][0] = 2147483648: must be an integer in [-2147483648, 2147483647]"));
  // Entries outside [0, E) are the selection's rule (validate).
  EXPECT_THAT(table_error(Json::array({Json::array({1}), Json::array({8})})), HasSubstr("table[1,0] = 8"));
}

TEST(ConfigJsonErrors, ValidateRunsAfterReading) {
  // RoutingConfig::validate's messages, as they are.
  EXPECT_EQ(routing_error("mixtral", [](Json& j) { j["top_k"] = 9; }), "top_k = 9: must not exceed num_experts = 8");
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["router"]["jitter_eps"] = 1.5; }), HasSubstr("jitter_eps = 1.5"));
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["router"]["dtype"] = "fp8_e4m3"; }),
              HasSubstr("the router computes in fp32, bf16 or fp16"));
  EXPECT_THAT(routing_error("deepseek_v3", [](Json& j) { j["group"]["n_group"] = 3; }), HasSubstr("n_group = 3"));
  EXPECT_THAT(routing_error("mixtral", [](Json& j) { j["losses"]["aux_loss_coef"] = -1.0; }),
              HasSubstr("aux_loss_coef = -1: must be finite and >= 0"));
  // ExpertConfig::validate and CapacityConfig::validate, on their own and within a layer.
  EXPECT_THAT(layer_error("mixtral", [](Json& j) { j["expert"]["intermediate_size"] = 0; }),
              HasSubstr("intermediate_size = 0: must be positive"));
  EXPECT_THAT(error_of([] {
                Json j = tiny_json("mixtral")["capacity"];
                j["capacity_factor"] = 0.0;
                capacity_config_from_json(j);
              }),
              HasSubstr("capacity_factor = 0: must be finite and > 0"));
  // LayerConfig::validate: the rules between the parts.
  EXPECT_THAT(layer_error("mixtral", [](Json& j) { j["expert"]["hidden_size"] = 32; }),
              HasSubstr("expert.hidden_size = 32: must equal the router's hidden_size = 16"));
  EXPECT_THAT(layer_error("expert_choice", [](Json& j) { j["capacity"]["dropless"] = false; }),
              HasSubstr("capacity.dropless = false: expert choice has its own capacity"));
  // SharedExpertsConfig has no validate(); its reader checks its own rules, with the full path.
  EXPECT_THAT(layer_error("mixtral", [](Json& j) { j["shared"]["count"] = -1; }),
              HasSubstr("layer.shared.count = -1: must be >= 0"));
  EXPECT_THAT(layer_error("mixtral", [](Json& j) { j["shared"]["count"] = 1; }),
              HasSubstr("layer.shared.intermediate_size = 0: must be positive when count > 0"));
  EXPECT_THAT(layer_error("mixtral", [](Json& j) { j["shared"]["gated"] = true; }),
              HasSubstr("layer.shared.gated = true: a shared-expert gate needs count > 0"));
}

TEST(ConfigJsonErrors, PathPrefixesEveryField) {
  Json j = tiny_json("deepseek_v3");
  j["routing"]["group"]["topk_group"] = "2";
  EXPECT_EQ(error_of([&] { layer_config_from_json(j, "layers[3]"); }),
            R"(layers[3].routing.group.topk_group = "2": must be an integer)");
  j = tiny_json("deepseek_v3")["routing"];
  j["gating"]["renorm_eps"] = "a";
  EXPECT_EQ(error_of([&] { routing_config_from_json(j, ""); }), R"(gating.renorm_eps = "a": must be a number)");
}

// ---- the enum names the JSON uses ----------------------------------------------------------------

TEST(ConfigJson, EnumNamesParseBack) {
  for (GroupScore s : {GroupScore::top2_sum, GroupScore::max}) EXPECT_EQ(parse_group_score(group_score_name(s)), s);
  for (GroupMask m : {GroupMask::neg_inf, GroupMask::zero}) EXPECT_EQ(parse_group_mask(group_mask_name(m)), m);
  for (RouterNoise n : {RouterNoise::none, RouterNoise::noisy_topk, RouterNoise::jitter})
    EXPECT_EQ(parse_router_noise(router_noise_name(n)), n);
  for (GatePlacement p : {GatePlacement::output, GatePlacement::input})
    EXPECT_EQ(parse_gate_placement(gate_placement_name(p)), p);
  EXPECT_EQ(error_of([] { parse_group_score("sum"); }), R"(group.score = "sum": must be one of top2_sum, max)");
  EXPECT_EQ(error_of([] { parse_group_mask("-inf"); }), R"(group.mask = "-inf": must be one of neg_inf, zero)");
  EXPECT_EQ(error_of([] { parse_router_noise("gaussian"); }),
            R"(noise = "gaussian": must be one of none, noisy_topk, jitter)");
  EXPECT_EQ(error_of([] { parse_gate_placement("both"); }), R"(gate_placement = "both": must be one of output, input)");
}

}  // namespace
}  // namespace moelab
