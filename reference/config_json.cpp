// moelab/reference/config_json.cpp — see config_json.h.
//
// Reading is strict, so that a hand-edited file never loads as something else:
// - every key of an object must be a field of it, and every field must be there;
// - the keys that to_json writes for one selection only (group, devices, capacity_factor,
//   hash_seed, hash_table) are required with that selection and an error with any other, where
//   they would otherwise be ignored without a word;
// - integers are JSON integers within the field's range (2.5 and 2.0 are not a top_k), other
//   numbers are finite, booleans are true or false, and enum values are their names;
// - every message names the full path of the field ("routing.gating.renorm_eps"), the value as
//   JSON (shortened) and the rule. The struct's validate() then checks the rules between fields.
// RouterConfig::allow_nonfinite is a switch of the numerics lab, not part of a configuration:
// to_json does not write it and the readers leave it at its default (false).
#include "reference/config_json.h"

#include <fmt/format.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "reference/error.h"
#include "reference/numerics.h"

namespace moelab {

// ---- writing ------------------------------------------------------------------------------------

Json to_json(const RoutingConfig& c) {
  Json j;
  j["hidden_size"] = c.router.hidden_size;
  j["num_experts"] = c.router.num_experts;
  j["router"] = {{"use_bias", c.router.use_bias},
                 {"dtype", format_name(c.router.dtype)},
                 {"noise", router_noise_name(c.router.noise)},
                 {"jitter_eps", c.router.jitter_eps}};
  j["scoring"] = scoring_name(c.scoring);
  j["selection"] = selection_kind_name(c.selection);
  j["top_k"] = c.top_k;
  j["use_selection_bias"] = c.use_selection_bias;
  if (c.selection == SelectionKind::group_limited)
    j["group"] = {{"n_group", c.group.n_group},
                  {"topk_group", c.group.topk_group},
                  {"score", group_score_name(c.group.score)},
                  {"mask", group_mask_name(c.group.mask)}};
  if (c.selection == SelectionKind::device_limited)
    j["devices"] = {{"num_devices", c.num_devices}, {"topk_devices", c.topk_devices}};
  if (c.selection == SelectionKind::expert_choice) j["capacity_factor"] = c.capacity_factor;
  if (c.selection == SelectionKind::hash) j["hash_seed"] = c.hash_seed;
  if (c.selection == SelectionKind::table) {
    Json table = Json::array();
    for (Index v = 0; v < c.hash_table.rows(); ++v) {
      Json row = Json::array();
      for (Index slot = 0; slot < c.hash_table.cols(); ++slot) row.push_back(c.hash_table(v, slot));
      table.push_back(row);
    }
    j["hash_table"] = table;
  }
  j["gating"] = {{"kind", gate_kind_name(c.gating.kind)},
                 {"renormalize", c.gating.renormalize},
                 {"renorm_eps", c.gating.renorm_eps},
                 {"routed_scaling_factor", c.gating.routed_scaling_factor}};
  j["losses"] = {{"aux_loss", aux_loss_name(c.aux_loss)},     {"aux_loss_coef", c.aux_loss_coef},
                 {"device_loss_coef", c.device_loss_coef},    {"comm_loss_coef", c.comm_loss_coef},
                 {"z_loss_coef", c.z_loss_coef},              {"bias_update_rate", c.bias_update_rate}};
  return j;
}

Json to_json(const ExpertConfig& c) {
  Json j;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["activation"] = activation_name(c.activation);
  j["use_bias"] = c.use_bias;
  j["swiglu_limit"] = c.swiglu_limit;
  j["swiglu_alpha"] = c.swiglu_alpha;
  return j;
}

Json to_json(const CapacityConfig& c) {
  Json j;
  j["dropless"] = c.dropless;
  j["capacity_factor"] = c.capacity_factor;
  j["rounding"] = capacity_rounding_name(c.rounding);
  j["min_capacity"] = c.min_capacity;
  j["policy"] = drop_policy_name(c.policy);
  return j;
}

Json to_json(const SharedExpertsConfig& c) {
  Json j;
  j["count"] = c.count;
  j["intermediate_size"] = c.intermediate_size;
  j["gated"] = c.gated;
  return j;
}

Json to_json(const LayerConfig& c) {
  Json j;
  j["routing"] = to_json(c.routing);
  j["expert"] = to_json(c.expert);
  j["capacity"] = to_json(c.capacity);
  j["shared"] = to_json(c.shared);
  j["gate_placement"] = gate_placement_name(c.gate_placement);
  return j;
}

// ---- reading ------------------------------------------------------------------------------------

namespace {

constexpr std::array kFormats = {Format::fp32, Format::bf16, Format::fp16, Format::fp8_e4m3, Format::fp8_e5m2};
constexpr std::array kNoises = {RouterNoise::none, RouterNoise::noisy_topk, RouterNoise::jitter};
constexpr std::array kScorings = {Scoring::softmax, Scoring::sigmoid, Scoring::sqrt_softplus};
constexpr std::array kSelections = {SelectionKind::topk,          SelectionKind::group_limited,
                                    SelectionKind::device_limited, SelectionKind::expert_choice,
                                    SelectionKind::hash,          SelectionKind::table};
constexpr std::array kGroupScores = {GroupScore::top2_sum, GroupScore::max};
constexpr std::array kGroupMasks = {GroupMask::neg_inf, GroupMask::zero};
constexpr std::array kGateKinds = {GateKind::selected_scores, GateKind::softmax_of_selected_logits,
                                   GateKind::sigmoid_of_selected_logits, GateKind::ones};
constexpr std::array kAuxLosses = {AuxLoss::none,       AuxLoss::switch_transformer, AuxLoss::hugging_face,
                                   AuxLoss::megablocks, AuxLoss::deepseek_v2,        AuxLoss::deepseek_v3_sequence};
constexpr std::array kActivations = {Activation::swiglu, Activation::gelu, Activation::relu,
                                     Activation::swiglu_clamped};
constexpr std::array kRoundings = {CapacityRounding::ceil, CapacityRounding::floor, CapacityRounding::trunc_int};
constexpr std::array kPolicies = {DropPolicy::arrival_order, DropPolicy::gate_priority};
constexpr std::array kPlacements = {GatePlacement::output, GatePlacement::input};

// The key that only one selection has, or "" (the others write nothing beyond the common fields).
std::string_view selection_key(SelectionKind s) {
  switch (s) {
    case SelectionKind::group_limited: return "group";
    case SelectionKind::device_limited: return "devices";
    case SelectionKind::expert_choice: return "capacity_factor";
    case SelectionKind::hash: return "hash_seed";
    case SelectionKind::table: return "hash_table";
    case SelectionKind::topk: return "";
  }
  return "";
}

std::string join(std::string_view path, std::string_view key) {
  return path.empty() ? std::string(key) : fmt::format("{}.{}", path, key);
}

// A value as JSON for a message, shortened: a hash table may have thousands of rows.
std::string shown(const Json& v) {
  constexpr std::size_t kMax = 100;
  std::string s = v.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (s.size() > kMax) s = s.substr(0, kMax - 3) + "...";
  return s;
}

constexpr std::string_view kMissing = "(missing)";

// One JSON object being read: its path, and the keys it may have.
class ObjectReader {
 public:
  ObjectReader(const Json& j, std::string path) : j_(j), path_(std::move(path)) {
    require(j_.is_object(), path_.empty() ? "(top level)" : path_, shown(j_), "must be an object");
  }

  // Every key must be one of `fields`; `misplaced` gives the rule for a key that is a field of the
  // object under other conditions ("" for a key that is no field at all).
  template <typename Misplaced>
  void allow(const std::vector<std::string_view>& fields, Misplaced misplaced) const {
    for (const auto& [key, value] : j_.items()) {
      bool known = false;
      for (std::string_view f : fields) known = known || f == key;
      if (known) continue;
      std::string rule = misplaced(key);
      if (rule.empty()) {
        std::string list;
        for (std::string_view f : fields) list += (list.empty() ? "" : ", ") + std::string(f);
        rule = fmt::format("is not a field of {} (its fields: {})", path_.empty() ? "the configuration" : path_, list);
      }
      fail(path(key), shown(value), rule);
    }
  }
  void allow(const std::vector<std::string_view>& fields) const {
    allow(fields, [](std::string_view) { return std::string(); });
  }

  std::string path(std::string_view key) const { return join(path_, key); }
  bool has(std::string_view key) const { return j_.contains(key); }
  const Json& at(std::string_view key, std::string_view rule = "is required") const {
    const auto it = j_.find(key);
    if (it == j_.end()) fail(path(key), kMissing, rule);
    return *it;
  }

  bool boolean(std::string_view key) const {
    const Json& v = at(key);
    require(v.is_boolean(), path(key), shown(v), "must be true or false");
    return v.get<bool>();
  }

  double number(std::string_view key) const {
    const Json& v = at(key);
    require(v.is_number(), path(key), shown(v), "must be a number");
    const double d = v.get<double>();
    require(std::isfinite(d), path(key), shown(v), "must be a finite number");
    return d;
  }

  template <typename Int>
  Int integer(std::string_view key) const {
    return integer_at<Int>(at(key), path(key));
  }

  template <typename Enum, std::size_t N, typename NameOf>
  Enum choice(std::string_view key, const std::array<Enum, N>& all, NameOf name_of) const {
    const Json& v = at(key);
    if (v.is_string()) {
      for (Enum e : all)
        if (name_of(e) == v.get_ref<const std::string&>()) return e;
    }
    std::string names;
    for (Enum e : all) names += (names.empty() ? "" : ", ") + std::string(name_of(e));
    fail(path(key), shown(v), "must be one of " + names);
  }

  // An integer of type Int: a JSON integer (not 2.5, not 2.0) within Int's range.
  template <typename Int>
  static Int integer_at(const Json& v, const std::string& path) {
    using Limits = std::numeric_limits<Int>;
    require(v.is_number_integer(), path, shown(v), "must be an integer");
    const std::string range = fmt::format("must be an integer in [{}, {}]", Limits::min(), Limits::max());
    if (v.is_number_unsigned()) {
      const auto u = v.get<std::uint64_t>();
      require(u <= static_cast<std::uint64_t>(Limits::max()), path, shown(v), range);
      return static_cast<Int>(u);
    }
    const auto s = v.get<std::int64_t>();
    if constexpr (Limits::is_signed) {
      require(s >= static_cast<std::int64_t>(Limits::min()) && s <= static_cast<std::int64_t>(Limits::max()), path,
              shown(v), range);
    } else {
      require(s >= 0, path, shown(v), range);
    }
    return static_cast<Int>(s);
  }

 private:
  const Json& j_;
  std::string path_;
};

// A (V, k) table of expert ids, written as V rows of k integers.
IndexMatrix table_at(const Json& v, const std::string& path) {
  constexpr std::string_view kRule = "must be a list of rows, each a list of expert ids";
  require(v.is_array(), path, shown(v), kRule);
  const Index rows = static_cast<Index>(v.size());
  Index cols = 0;
  for (Index r = 0; r < rows; ++r) {
    const Json& row = v[static_cast<std::size_t>(r)];
    const std::string row_path = fmt::format("{}[{}]", path, r);
    require(row.is_array(), row_path, shown(row), kRule);
    if (r == 0) cols = static_cast<Index>(row.size());
    require(static_cast<Index>(row.size()) == cols, row_path, shown(row),
            fmt::format("must have {} entries, as row 0 has", cols));
  }
  IndexMatrix table(rows, cols);
  for (Index r = 0; r < rows; ++r) {
    for (Index c = 0; c < cols; ++c) {
      table(r, c) = ObjectReader::integer_at<std::int32_t>(v[static_cast<std::size_t>(r)][static_cast<std::size_t>(c)],
                                                     fmt::format("{}[{}][{}]", path, r, c));
    }
  }
  return table;
}

}  // namespace

RoutingConfig routing_config_from_json(const Json& j, std::string_view path) {
  const ObjectReader f(j, std::string(path));
  RoutingConfig c;
  // The selection decides which keys may follow, so it is read first.
  c.selection = f.choice("selection", kSelections, selection_kind_name);
  std::vector<std::string_view> fields = {"hidden_size", "num_experts", "router",             "scoring",
                                          "selection",   "top_k",       "use_selection_bias"};
  const std::string_view own = selection_key(c.selection);
  if (!own.empty()) fields.push_back(own);
  fields.insert(fields.end(), {"gating", "losses"});
  f.allow(fields, [&](std::string_view key) {
    for (SelectionKind s : kSelections) {
      if (selection_key(s) == key)
        return fmt::format("is used only with selection = {}, and selection is {}", selection_kind_name(s),
                           selection_kind_name(c.selection));
    }
    return std::string();
  });

  c.router.hidden_size = f.integer<Index>("hidden_size");
  c.router.num_experts = f.integer<Index>("num_experts");
  {
    const ObjectReader r(f.at("router"), f.path("router"));
    r.allow({"use_bias", "dtype", "noise", "jitter_eps"});
    c.router.use_bias = r.boolean("use_bias");
    c.router.dtype = r.choice("dtype", kFormats, format_name);
    c.router.noise = r.choice("noise", kNoises, router_noise_name);
    c.router.jitter_eps = r.number("jitter_eps");
  }
  c.scoring = f.choice("scoring", kScorings, scoring_name);
  c.top_k = f.integer<int>("top_k");
  c.use_selection_bias = f.boolean("use_selection_bias");

  const std::string needed = fmt::format("is required when selection = {}", selection_kind_name(c.selection));
  switch (c.selection) {
    case SelectionKind::group_limited: {
      const ObjectReader g(f.at("group", needed), f.path("group"));
      g.allow({"n_group", "topk_group", "score", "mask"});
      c.group.n_group = g.integer<int>("n_group");
      c.group.topk_group = g.integer<int>("topk_group");
      c.group.score = g.choice("score", kGroupScores, group_score_name);
      c.group.mask = g.choice("mask", kGroupMasks, group_mask_name);
      break;
    }
    case SelectionKind::device_limited: {
      const ObjectReader d(f.at("devices", needed), f.path("devices"));
      d.allow({"num_devices", "topk_devices"});
      c.num_devices = d.integer<int>("num_devices");
      c.topk_devices = d.integer<int>("topk_devices");
      break;
    }
    case SelectionKind::expert_choice:
      f.at("capacity_factor", needed);
      c.capacity_factor = f.number("capacity_factor");
      break;
    case SelectionKind::hash:
      f.at("hash_seed", needed);
      c.hash_seed = f.integer<std::uint64_t>("hash_seed");
      break;
    case SelectionKind::table:
      c.hash_table = table_at(f.at("hash_table", needed), f.path("hash_table"));
      break;
    case SelectionKind::topk: break;
  }

  {
    const ObjectReader g(f.at("gating"), f.path("gating"));
    g.allow({"kind", "renormalize", "renorm_eps", "routed_scaling_factor"});
    c.gating.kind = g.choice("kind", kGateKinds, gate_kind_name);
    c.gating.renormalize = g.boolean("renormalize");
    c.gating.renorm_eps = g.number("renorm_eps");
    c.gating.routed_scaling_factor = g.number("routed_scaling_factor");
  }
  {
    const ObjectReader l(f.at("losses"), f.path("losses"));
    l.allow({"aux_loss", "aux_loss_coef", "device_loss_coef", "comm_loss_coef", "z_loss_coef", "bias_update_rate"});
    c.aux_loss = l.choice("aux_loss", kAuxLosses, aux_loss_name);
    c.aux_loss_coef = l.number("aux_loss_coef");
    c.device_loss_coef = l.number("device_loss_coef");
    c.comm_loss_coef = l.number("comm_loss_coef");
    c.z_loss_coef = l.number("z_loss_coef");
    c.bias_update_rate = l.number("bias_update_rate");
  }
  c.validate();
  return c;
}

ExpertConfig expert_config_from_json(const Json& j, std::string_view path) {
  const ObjectReader f(j, std::string(path));
  f.allow({"hidden_size", "intermediate_size", "activation", "use_bias", "swiglu_limit", "swiglu_alpha"});
  ExpertConfig c;
  c.hidden_size = f.integer<Index>("hidden_size");
  c.intermediate_size = f.integer<Index>("intermediate_size");
  c.activation = f.choice("activation", kActivations, activation_name);
  c.use_bias = f.boolean("use_bias");
  c.swiglu_limit = f.number("swiglu_limit");
  c.swiglu_alpha = f.number("swiglu_alpha");
  c.validate();
  return c;
}

CapacityConfig capacity_config_from_json(const Json& j, std::string_view path) {
  const ObjectReader f(j, std::string(path));
  f.allow({"dropless", "capacity_factor", "rounding", "min_capacity", "policy"});
  CapacityConfig c;
  c.dropless = f.boolean("dropless");
  c.capacity_factor = f.number("capacity_factor");
  c.rounding = f.choice("rounding", kRoundings, capacity_rounding_name);
  c.min_capacity = f.integer<Index>("min_capacity");
  c.policy = f.choice("policy", kPolicies, drop_policy_name);
  c.validate();
  return c;
}

SharedExpertsConfig shared_experts_config_from_json(const Json& j, std::string_view path) {
  const ObjectReader f(j, std::string(path));
  f.allow({"count", "intermediate_size", "gated"});
  SharedExpertsConfig c;
  c.count = f.integer<int>("count");
  c.intermediate_size = f.integer<Index>("intermediate_size");
  c.gated = f.boolean("gated");
  // SharedExpertsConfig has no validate() of its own (LayerConfig::validate checks it, with the
  // routed expert's config); these are its rules that need nothing else.
  require(c.count >= 0, f.path("count"), c.count, "must be >= 0");
  require(c.count == 0 || c.intermediate_size > 0, f.path("intermediate_size"), c.intermediate_size,
          "must be positive when count > 0");
  require(!c.gated || c.count > 0, f.path("gated"), "true", "a shared-expert gate needs count > 0");
  return c;
}

LayerConfig layer_config_from_json(const Json& j, std::string_view path) {
  const ObjectReader f(j, std::string(path));
  f.allow({"routing", "expert", "capacity", "shared", "gate_placement"});
  LayerConfig c;
  c.routing = routing_config_from_json(f.at("routing"), f.path("routing"));
  c.expert = expert_config_from_json(f.at("expert"), f.path("expert"));
  c.capacity = capacity_config_from_json(f.at("capacity"), f.path("capacity"));
  c.shared = shared_experts_config_from_json(f.at("shared"), f.path("shared"));
  c.gate_placement = f.choice("gate_placement", kPlacements, gate_placement_name);
  c.validate();
  return c;
}

}  // namespace moelab
