// moelab/reference/model.cpp — see model.h. B = batch, T = sequence length, N = B*T, C = hidden
// size, V = vocabulary, L = blocks, E = routed experts.
#include "reference/model.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <utility>

#include "reference/balancing.h"
#include "reference/error.h"
#include "reference/presets.h"

namespace moelab {

// ---- Configuration -----------------------------------------------------------------------------

namespace {

constexpr MoeLayout kLayouts[] = {MoeLayout::dense, MoeLayout::all, MoeLayout::every_other, MoeLayout::first_k_dense};

}  // namespace

std::string_view moe_layout_name(MoeLayout layout) {
  switch (layout) {
    case MoeLayout::dense: return "dense";
    case MoeLayout::all: return "all";
    case MoeLayout::every_other: return "every_other";
    case MoeLayout::first_k_dense: return "first_k_dense";
  }
  return "?";
}

MoeLayout parse_moe_layout(std::string_view name) {
  for (MoeLayout l : kLayouts)
    if (moe_layout_name(l) == name) return l;
  fail("moe_layout", fmt::format("\"{}\"", name), "must be one of dense, all, every_other, first_k_dense");
}

bool ModelConfig::is_moe(Index layer) const {
  switch (moe_layout) {
    case MoeLayout::dense: return false;
    case MoeLayout::all: return true;
    case MoeLayout::every_other: return layer % 2 == 1;
    case MoeLayout::first_k_dense: return layer >= first_k_dense_replace;
  }
  return false;
}

// Counted, not looped over: validate() asks before it checks anything, and a config read from a
// file may claim 2^40 blocks.
Index ModelConfig::n_moe_layers() const {
  if (n_layers <= 0) return 0;
  switch (moe_layout) {
    case MoeLayout::dense: return 0;
    case MoeLayout::all: return n_layers;
    case MoeLayout::every_other: return n_layers / 2;  // blocks 1, 3, 5, ...
    case MoeLayout::first_k_dense: return n_layers - std::clamp<Index>(first_k_dense_replace, 0, n_layers);
  }
  return 0;
}

AttentionConfig ModelConfig::attention() const {
  return AttentionConfig{.hidden_size = hidden_size, .n_heads = n_heads, .n_kv_heads = 0, .rope_theta = rope_theta};
}

RMSNormConfig ModelConfig::norm() const { return RMSNormConfig{.eps = rms_eps}; }

ExpertConfig ModelConfig::dense_ffn() const {
  return ExpertConfig{.hidden_size = hidden_size, .intermediate_size = intermediate_size, .activation = ffn_activation};
}

void ModelConfig::validate() const {
  require(vocab_size >= 1, "vocab_size", vocab_size, "must be positive");
  require(n_layers >= 1, "n_layers", n_layers, "must be positive");
  require(std::isfinite(rms_eps) && rms_eps > 0, "rms_eps", rms_eps, "must be finite and > 0");
  require(std::isfinite(init_std) && init_std >= 0, "init_std", init_std, "must be finite and >= 0");
  attention().validate();  // hidden_size, n_heads, head dim even, rope_theta
  if (moe_layout == MoeLayout::first_k_dense) {
    require(first_k_dense_replace >= 0 && first_k_dense_replace < n_layers, "first_k_dense_replace",
            first_k_dense_replace, fmt::format("must be in [0, n_layers = {})", n_layers));
  } else {
    require(first_k_dense_replace == 0, "first_k_dense_replace", first_k_dense_replace,
            fmt::format("is used only with moe_layout = first_k_dense (moe_layout is {}); must be 0",
                        moe_layout_name(moe_layout)));
  }
  if (n_moe_layers() < n_layers) {
    dense_ffn().validate();
  } else {
    require(intermediate_size >= 0, "intermediate_size", intermediate_size, "must be >= 0");
  }
  if (moe_layout == MoeLayout::dense) return;
  try {
    moe.validate();
  } catch (const Error& e) {
    throw Error(fmt::format("moe: {}", e.what()));
  }
  require(moe.hidden_size() == hidden_size, "moe.routing.hidden_size", moe.hidden_size(),
          fmt::format("must equal hidden_size = {}", hidden_size));
  if (moe.routing.selection == SelectionKind::table)
    require(moe.routing.hash_table.rows() == vocab_size, "moe.routing.hash_table rows", moe.routing.hash_table.rows(),
            fmt::format("must equal vocab_size = {} (one row per token id)", vocab_size));
}

// ---- Named configurations ------------------------------------------------------------------------
//
// Every named config is the same tiny model: C = 64, L = 4 blocks of 4 heads (head dim 16), V = 256
// bytes. Its FFNs are what differs:
//   tiny_moe   (Mixtral conventions) 8 experts of H = 128, top-2, in every block
//   tiny_dense one SwiGLU FFN of 2H = 256 in every block
// Per block, a token uses 2 * 3 C H = 2 * 3 * 64 * 128 = 49,152 expert weights in tiny_moe, and
// 3 C (2H) = 3 * 64 * 256 = 49,152 in tiny_dense: equal active FFN parameters; the MoE's router
// adds C E = 512 per block. Counted as accounting.h does (active: without the embedding table):
//   attention 4 * 4 C^2 = 65,536;  norms (2 L + 1) C = 576;  lm_head V C = 16,384;  embedding V C = 16,384
//   tiny_dense: FFN 4 * 49,152 = 196,608            active 279,104   total 295,488
//   tiny_moe:   experts 4 * 8 * 24,576 = 786,432 (4 * 2 * 24,576 = 196,608 active), routers 4 * 512 = 2,048
//                                                   active 281,152   total 887,360
// Why these sizes: a training step costs about 6 FLOPs per active parameter per token (forward 2,
// backward 4): 6 * 281k ~ 1.7 MFLOP per token, plus attention over the context (forward
// 4 * 2 * 2 C T = 0.13 MFLOP per token at T = 128). Measured on the development machine (one core
// of two, -O2, B * T = 2048 tokens, forward + backward + AdamW): tiny_moe ~12,000 tokens/s,
// tiny_dense ~11,000, the deepseek_v3 config ~7,000. So two cores train on a few million bytes
// of text in minutes, which is what it takes for the experts to specialise visibly (letters,
// digits, spaces, punctuation, ...). C = 128 would cost about four times as much per token.

namespace {

constexpr Index kHidden = 64;
constexpr Index kLayers = 4;
constexpr Index kHeads = 4;
constexpr Index kDenseIntermediate = 256;

ModelConfig tiny_base() {
  ModelConfig c;
  c.hidden_size = kHidden;
  c.n_layers = kLayers;
  c.n_heads = kHeads;
  c.intermediate_size = kDenseIntermediate;
  return c;
}

// The preset's tiny layer at the model's hidden size, every width scaled with it (the tiny
// presets' H = 32 at C = 16 becomes 128 at C = 64).
LayerConfig scaled_layer(const Preset& preset, Index hidden) {
  LayerConfig l = layer_config(preset, PresetSize::tiny);
  const Index C0 = l.hidden_size();
  l.routing.router.hidden_size = hidden;
  l.expert.hidden_size = hidden;
  l.expert.intermediate_size = l.expert.intermediate_size * hidden / C0;
  l.shared.intermediate_size = l.shared.intermediate_size * hidden / C0;
  return l;
}

// Where the published model puts its MoE blocks.
void set_layout(ModelConfig& c, std::string_view preset) {
  if (preset == "switch" || preset == "gshard" || preset == "expert_choice") {
    c.moe_layout = MoeLayout::every_other;  // "every other FFN layer" in all three papers
  } else if (preset == "deepseek_v2" || preset == "deepseek_v3") {
    c.moe_layout = MoeLayout::first_k_dense;  // first_k_dense_replace = 1 (V2), 3 (V3): 1 of 4 here
    c.first_k_dense_replace = 1;
  } else {
    c.moe_layout = MoeLayout::all;
  }
}

ModelConfig from_preset(const Preset& preset) {
  ModelConfig c = tiny_base();
  c.moe = scaled_layer(preset, c.hidden_size);
  set_layout(c, preset.name);
  c.validate();
  return c;
}

}  // namespace

ModelConfig tiny_moe() { return from_preset(find_preset("mixtral")); }

ModelConfig tiny_dense() {
  ModelConfig c = tiny_base();
  c.moe_layout = MoeLayout::dense;
  c.validate();
  return c;
}

std::vector<std::string> model_config_names() {
  std::vector<std::string> names = {"tiny_moe", "tiny_dense"};
  for (const Preset& p : presets()) names.emplace_back(p.name);
  return names;
}

ModelConfig model_config(std::string_view name) {
  if (name == "tiny_moe") return tiny_moe();
  if (name == "tiny_dense") return tiny_dense();
  for (const Preset& p : presets())
    if (p.name == name) return from_preset(p);
  std::string known;
  for (const std::string& n : model_config_names()) known += (known.empty() ? "" : ", ") + n;
  fail("model", fmt::format("\"{}\"", name), "is not a known model configuration; choose one of " + known);
}

ModelSizes model_sizes(const ModelConfig& c) {
  c.validate();
  ModelSizes m;
  m.vocab_size = c.vocab_size;
  m.hidden_size = c.hidden_size;
  m.tie_word_embeddings = c.tie_embeddings;
  m.num_layers = c.n_layers;
  m.num_dense_layers = c.moe_layout == MoeLayout::first_k_dense ? c.first_k_dense_replace : 0;
  m.moe_layer_step = c.moe_layout == MoeLayout::every_other ? 2 : 1;
  m.moe_layer_offset = c.moe_layout == MoeLayout::every_other ? 1 : 0;
  m.intermediate_size = c.intermediate_size;
  m.dense_gated = is_gated(c.ffn_activation);
  if (c.moe_layout != MoeLayout::dense) {
    m.n_routed_experts = c.moe.num_experts();
    m.n_shared_experts = c.moe.shared.count;
    m.top_k = c.moe.routing.top_k;
    m.moe_intermediate_size = c.moe.expert.intermediate_size;
    m.shared_intermediate_size = c.moe.shared.intermediate_size;
    m.expert_gated = is_gated(c.moe.expert.activation);
    m.expert_bias = c.moe.expert.use_bias;
    m.router_bias = c.moe.routing.router.use_bias || c.moe.routing.use_selection_bias;
    m.shared_expert_gate = c.moe.shared.gated;
  }
  m.num_heads = c.n_heads;
  m.num_kv_heads = c.n_heads;
  m.head_dim = c.attention().head_dim();
  return m;
}

// ---- JSON ------------------------------------------------------------------------------------------

Json to_json(const ModelConfig& c) {
  Json j;
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["n_layers"] = c.n_layers;
  j["n_heads"] = c.n_heads;
  j["rope_theta"] = c.rope_theta;
  j["rms_eps"] = c.rms_eps;
  j["intermediate_size"] = c.intermediate_size;
  j["ffn_activation"] = activation_name(c.ffn_activation);
  j["moe_layout"] = moe_layout_name(c.moe_layout);
  j["first_k_dense_replace"] = c.first_k_dense_replace;
  j["moe"] = c.moe_layout == MoeLayout::dense ? Json(nullptr) : to_json(c.moe);
  j["tie_embeddings"] = c.tie_embeddings;
  j["init_std"] = c.init_std;
  return j;
}

namespace {

// One JSON object read strictly: every key known, every field present and of its type.
class JsonFields {
 public:
  JsonFields(const Json& j, std::string_view path) : j_(j), path_(path) {
    require(j.is_object(), path_.empty() ? "(model configuration)" : path_, shown(j), "must be an object");
  }

  std::string path(std::string_view key) const {
    return path_.empty() ? std::string(key) : fmt::format("{}.{}", path_, key);
  }

  void allow(std::initializer_list<std::string_view> keys) const {
    for (const auto& [key, value] : j_.items()) {
      bool known = false;
      for (std::string_view k : keys) known = known || k == key;
      if (!known) fail(path(key), shown(value), "is not a field of the model configuration");
    }
  }

  const Json& at(std::string_view key) const {
    const auto it = j_.find(key);
    if (it == j_.end()) fail(path(key), "(missing)", "is required");
    return *it;
  }

  Index integer(std::string_view key) const {
    const Json& v = at(key);
    require(v.is_number_integer(), path(key), shown(v), "must be an integer");
    require(v.is_number_unsigned() || v.get<std::int64_t>() >= 0, path(key), shown(v), "must be >= 0");
    require(!v.is_number_unsigned() || v.get<std::uint64_t>() <= (std::uint64_t{1} << 40), path(key), shown(v),
            "must be at most 2^40");
    return v.get<Index>();
  }

  double number(std::string_view key) const {
    const Json& v = at(key);
    require(v.is_number() && std::isfinite(v.get<double>()), path(key), shown(v), "must be a finite number");
    return v.get<double>();
  }

  bool boolean(std::string_view key) const {
    const Json& v = at(key);
    require(v.is_boolean(), path(key), shown(v), "must be true or false");
    return v.get<bool>();
  }

  // A name that `parse` accepts; its Error is re-issued under this field's path.
  template <typename Parse>
  auto choice(std::string_view key, Parse parse) const {
    const Json& v = at(key);
    require(v.is_string(), path(key), shown(v), "must be a string");
    try {
      return parse(v.get<std::string>());
    } catch (const Error& e) {
      const std::string what = e.what();
      fail(path(key), shown(v), what.substr(what.find(": ") + 2));
    }
  }

 private:
  static std::string shown(const Json& v) {
    std::string s = v.dump(-1, ' ', false, Json::error_handler_t::replace);
    return s.size() > 60 ? s.substr(0, 57) + "..." : s;
  }

  const Json& j_;
  std::string path_;
};

}  // namespace

ModelConfig model_config_from_json(const Json& j, std::string_view path) {
  const JsonFields f(j, path);
  f.allow({"vocab_size", "hidden_size", "n_layers", "n_heads", "rope_theta", "rms_eps", "intermediate_size",
           "ffn_activation", "moe_layout", "first_k_dense_replace", "moe", "tie_embeddings", "init_std"});
  ModelConfig c;
  c.vocab_size = f.integer("vocab_size");
  c.hidden_size = f.integer("hidden_size");
  c.n_layers = f.integer("n_layers");
  c.n_heads = f.integer("n_heads");
  c.rope_theta = f.number("rope_theta");
  c.rms_eps = f.number("rms_eps");
  c.intermediate_size = f.integer("intermediate_size");
  c.ffn_activation = f.choice("ffn_activation", parse_activation);
  c.moe_layout = f.choice("moe_layout", parse_moe_layout);
  c.first_k_dense_replace = f.integer("first_k_dense_replace");
  const Json& moe = f.at("moe");
  if (c.moe_layout == MoeLayout::dense) {
    require(moe.is_null(), f.path("moe"), "(an object)", "must be null when moe_layout = dense");
  } else {
    require(!moe.is_null(), f.path("moe"), "null", fmt::format("is required when moe_layout = {}",
                                                              moe_layout_name(c.moe_layout)));
    c.moe = layer_config_from_json(moe, f.path("moe"));
  }
  c.tie_embeddings = f.boolean("tie_embeddings");
  c.init_std = f.number("init_std");
  c.validate();
  return c;
}

// ---- Parameters ----------------------------------------------------------------------------------

namespace {

// The vectors of `params` have the config's sizes (else Error naming them): visiting and the
// forward index into them.
template <typename Scalar>
void check_layout(const ModelParamsT<Scalar>& p, const ModelConfig& c) {
  require(static_cast<Index>(p.blocks.size()) == c.n_layers, "blocks.size()", p.blocks.size(),
          fmt::format("must equal n_layers = {}", c.n_layers));
  for (Index i = 0; i < c.n_layers; ++i) {
    if (!c.is_moe(i)) continue;
    const LayerParamsT<Scalar>& m = p.blocks[static_cast<std::size_t>(i)].moe;
    require(static_cast<Index>(m.experts.size()) == c.moe.num_experts(), fmt::format("blocks[{}].moe.experts.size()", i),
            m.experts.size(), fmt::format("must equal num_experts = {}", c.moe.num_experts()));
    require(static_cast<int>(m.shared.size()) == c.moe.shared.count, fmt::format("blocks[{}].moe.shared.size()", i),
            m.shared.size(), fmt::format("must equal shared.count = {}", c.moe.shared.count));
  }
}

template <typename Scalar>
MatrixT<Scalar> normal_matrix(Rng& rng, Index rows, Index cols, double std) {
  MatrixT<Scalar> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(std * rng.normal());
  return m;
}

// The prefix of shared expert s: Qwen2-MoE's one gated "shared_expert", DeepSeek's one
// "shared_experts" (its n shared experts are one MLP of n times the width), else numbered.
std::string shared_prefix(const std::string& mlp, const SharedExpertsConfig& shared, int s) {
  if (shared.count == 1) return mlp + (shared.gated ? ".shared_expert" : ".shared_experts");
  return fmt::format("{}.shared_experts.{}", mlp, s);
}

// Calls add(name, tensor, weight_decay) for every projection of one expert (or dense FFN), in
// state_dict order: gate_proj, up_proj, down_proj, each weight then bias.
template <typename Expert, typename Add>
void visit_expert(Expert& e, const std::string& prefix, const ExpertConfig& config, Add& add) {
  if (is_gated(config.activation)) {
    add(prefix + ".gate_proj.weight", e.w_gate, true);
    if (config.use_bias) add(prefix + ".gate_proj.bias", e.b_gate, false);
  }
  add(prefix + ".up_proj.weight", e.w_up, true);
  if (config.use_bias) add(prefix + ".up_proj.bias", e.b_up, false);
  add(prefix + ".down_proj.weight", e.w_down, true);
  if (config.use_bias) add(prefix + ".down_proj.bias", e.b_down, false);
}

template <typename Layer, typename Add>
void visit_moe(Layer& m, const std::string& mlp, const LayerConfig& config, Add& add) {
  add(mlp + ".gate.weight", m.routing.router.weight, true);
  if (config.routing.router.use_bias) add(mlp + ".gate.bias", m.routing.router.bias, false);
  if (config.routing.router.noise == RouterNoise::noisy_topk)
    add(mlp + ".gate.noise_weight", m.routing.router.noise_weight, true);
  for (Index e = 0; e < config.num_experts(); ++e)
    visit_expert(m.experts[static_cast<std::size_t>(e)], fmt::format("{}.experts.{}", mlp, e), config.expert, add);
  for (int s = 0; s < config.shared.count; ++s)
    visit_expert(m.shared[static_cast<std::size_t>(s)], shared_prefix(mlp, config.shared, s),
                 config.shared_expert_config(), add);
  if (config.shared.gated) add(mlp + ".shared_expert_gate.weight", m.shared_gate, true);
}

// Every trainable tensor of the model in the order of model.h; Params may be const.
template <typename Params, typename Add>
void visit_parameters(Params& p, const ModelConfig& c, Add& add) {
  check_layout(p, c);
  add("model.embed_tokens.weight", p.embed_tokens, true);
  for (Index i = 0; i < c.n_layers; ++i) {
    auto& b = p.blocks[static_cast<std::size_t>(i)];
    const std::string prefix = fmt::format("model.layers.{}", i);
    add(prefix + ".input_layernorm.weight", b.attn_norm, false);
    add(prefix + ".self_attn.q_proj.weight", b.attn.q_proj, true);
    add(prefix + ".self_attn.k_proj.weight", b.attn.k_proj, true);
    add(prefix + ".self_attn.v_proj.weight", b.attn.v_proj, true);
    add(prefix + ".self_attn.o_proj.weight", b.attn.o_proj, true);
    add(prefix + ".post_attention_layernorm.weight", b.ffn_norm, false);
    if (c.is_moe(i)) {
      visit_moe(b.moe, prefix + ".mlp", c.moe, add);
    } else {
      visit_expert(b.dense, prefix + ".mlp", c.dense_ffn(), add);
    }
  }
  add("model.norm.weight", p.norm, false);
  if (!c.tie_embeddings) add("lm_head.weight", p.lm_head, true);
}

template <typename Params, typename Add>
void visit_buffers(Params& p, const ModelConfig& c, Add& add) {
  check_layout(p, c);
  for (Index i = 0; i < c.n_layers; ++i)
    if (c.is_moe(i) && c.moe.routing.use_selection_bias)
      add(fmt::format("model.layers.{}.mlp.gate.e_score_correction_bias", i),
          p.blocks[static_cast<std::size_t>(i)].moe.routing.selection_bias, false);
}

// Collects what a visitor sees as NamedTensors (Named's pointers const where Params is).
template <typename Named, typename Params, typename Visit>
std::vector<Named> collect(Params& p, const ModelConfig& c, Visit visit) {
  std::vector<Named> list;
  auto add = [&list](std::string name, auto& tensor, bool decay) {
    Named n{.name = std::move(name), .weight_decay = decay};
    if constexpr (std::remove_cvref_t<decltype(tensor)>::ColsAtCompileTime == 1) {
      n.vector = &tensor;
    } else {
      n.matrix = &tensor;
    }
    list.push_back(std::move(n));
  };
  visit(p, c, add);
  return list;
}

template <typename Scalar>
ExpertParamsT<Scalar> zeros_like(const ExpertParamsT<Scalar>& p) {
  return {.w_gate = MatrixT<Scalar>::Zero(p.w_gate.rows(), p.w_gate.cols()),
          .w_up = MatrixT<Scalar>::Zero(p.w_up.rows(), p.w_up.cols()),
          .w_down = MatrixT<Scalar>::Zero(p.w_down.rows(), p.w_down.cols()),
          .b_gate = VectorT<Scalar>::Zero(p.b_gate.size()),
          .b_up = VectorT<Scalar>::Zero(p.b_up.size()),
          .b_down = VectorT<Scalar>::Zero(p.b_down.size())};
}

// Zero gradients in the parameters' layout (the selection bias, no parameter, left empty).
template <typename Scalar>
ModelGradsT<Scalar> zeros_like(const ModelParamsT<Scalar>& p) {
  auto zero = [](const auto& m) { return std::remove_cvref_t<decltype(m)>::Zero(m.rows(), m.cols()).eval(); };
  ModelGradsT<Scalar> g;
  g.embed_tokens = zero(p.embed_tokens);
  for (const BlockParamsT<Scalar>& b : p.blocks) {
    BlockParamsT<Scalar> z;
    z.attn_norm = zero(b.attn_norm);
    z.attn = {.q_proj = zero(b.attn.q_proj), .k_proj = zero(b.attn.k_proj), .v_proj = zero(b.attn.v_proj),
              .o_proj = zero(b.attn.o_proj)};
    z.ffn_norm = zero(b.ffn_norm);
    z.dense = zeros_like(b.dense);
    z.moe.routing.router = {.weight = zero(b.moe.routing.router.weight), .bias = zero(b.moe.routing.router.bias),
                            .noise_weight = zero(b.moe.routing.router.noise_weight)};
    for (const ExpertParamsT<Scalar>& e : b.moe.experts) z.moe.experts.push_back(zeros_like(e));
    for (const ExpertParamsT<Scalar>& e : b.moe.shared) z.moe.shared.push_back(zeros_like(e));
    z.moe.shared_gate = zero(b.moe.shared_gate);
    g.blocks.push_back(std::move(z));
  }
  g.norm = zero(p.norm);
  g.lm_head = zero(p.lm_head);
  return g;
}

// grads has params' vectors' sizes, so that writing into it keeps every Eigen object in place.
template <typename Scalar>
bool same_layout(const ModelGradsT<Scalar>& g, const ModelParamsT<Scalar>& p) {
  if (g.blocks.size() != p.blocks.size()) return false;
  for (std::size_t i = 0; i < p.blocks.size(); ++i)
    if (g.blocks[i].moe.experts.size() != p.blocks[i].moe.experts.size() ||
        g.blocks[i].moe.shared.size() != p.blocks[i].moe.shared.size())
      return false;
  return true;
}

}  // namespace

template <typename Scalar>
ModelParamsT<Scalar> init_model(const ModelConfig& config, Rng& rng) {
  config.validate();
  const Index C = config.hidden_size, V = config.vocab_size;
  const double std = config.init_std;
  ModelParamsT<Scalar> p;
  p.embed_tokens = normal_matrix<Scalar>(rng, V, C, std);
  for (Index i = 0; i < config.n_layers; ++i) {
    BlockParamsT<Scalar> b;
    b.attn_norm = VectorT<Scalar>::Ones(C);
    b.attn = init_attention<Scalar>(config.attention(), rng, std);
    b.ffn_norm = VectorT<Scalar>::Ones(C);
    if (config.is_moe(i)) {
      b.moe = init_layer<Scalar>(config.moe, rng, std);
    } else {
      b.dense = init_expert<Scalar>(config.dense_ffn(), rng, std);
    }
    p.blocks.push_back(std::move(b));
  }
  p.norm = VectorT<Scalar>::Ones(C);
  if (!config.tie_embeddings) p.lm_head = normal_matrix<Scalar>(rng, V, C, std);
  return p;
}

template <typename Scalar>
std::vector<NamedParamT<Scalar>> model_parameters(ModelParamsT<Scalar>& params, const ModelConfig& config) {
  return collect<NamedParamT<Scalar>>(params, config, [](auto& p, const ModelConfig& c, auto& add) {
    visit_parameters(p, c, add);
  });
}

template <typename Scalar>
std::vector<ConstNamedParamT<Scalar>> model_parameters(const ModelParamsT<Scalar>& params, const ModelConfig& config) {
  return collect<ConstNamedParamT<Scalar>>(params, config, [](auto& p, const ModelConfig& c, auto& add) {
    visit_parameters(p, c, add);
  });
}

template <typename Scalar>
std::vector<NamedParamT<Scalar>> model_buffers(ModelParamsT<Scalar>& params, const ModelConfig& config) {
  return collect<NamedParamT<Scalar>>(params, config, [](auto& p, const ModelConfig& c, auto& add) {
    visit_buffers(p, c, add);
  });
}

template <typename Scalar>
std::vector<ConstNamedParamT<Scalar>> model_buffers(const ModelParamsT<Scalar>& params, const ModelConfig& config) {
  return collect<ConstNamedParamT<Scalar>>(params, config, [](auto& p, const ModelConfig& c, auto& add) {
    visit_buffers(p, c, add);
  });
}

std::vector<ParamRef> model_param_refs(ModelParams& params, ModelGrads& grads, const ModelConfig& config) {
  if (!same_layout(grads, params)) grads = zeros_like(params);
  const std::vector<NamedParamT<float>> p = model_parameters(params, config);
  const std::vector<NamedParamT<float>> g = model_parameters(grads, config);
  std::vector<ParamRef> refs;
  for (std::size_t k = 0; k < p.size(); ++k) {
    if (p[k].matrix != nullptr) {
      refs.emplace_back(p[k].name, *p[k].matrix, *g[k].matrix, p[k].weight_decay);
    } else {
      refs.emplace_back(p[k].name, *p[k].vector, *g[k].vector, p[k].weight_decay);
    }
  }
  return refs;
}

// ---- Forward, loss, backward -----------------------------------------------------------------

void StampingObserver::on_event(const Event& event) {
  Event stamped = event;
  if (layer_ >= 0) stamped.layer = layer_;
  if (step_ >= 0) stamped.step = step_;
  inner_.on_event(stamped);
}

namespace {

// What every block needs besides its own parameters and cache.
struct BlockContext {
  const ModelConfig& config;
  Index batch_size;
  Index seq_len;
  std::span<const std::int32_t> ids;         // (N) for hash routing
  std::span<const Index> sequence_lengths;   // (B) each T, for sequence-wise balance losses
};

template <typename Scalar>
const MatrixT<Scalar>& head_weight(const ModelParamsT<Scalar>& p, const ModelConfig& c) {
  return c.tie_embeddings ? p.embed_tokens : p.lm_head;
}

template <typename Scalar>
void check_params(const ModelParamsT<Scalar>& p, const ModelConfig& c) {
  check_layout(p, c);
  require_shape(p.embed_tokens, c.vocab_size, c.hidden_size, "embed_tokens shape", "(vocab_size, hidden_size)");
  require(p.norm.size() == c.hidden_size, "norm size", p.norm.size(), fmt::format("must equal hidden_size = {}", c.hidden_size));
  if (c.tie_embeddings) {
    require(p.lm_head.size() == 0, "lm_head shape", shape_of(p.lm_head),
            "must be empty when tie_embeddings (the head is embed_tokens)");
  } else {
    require_shape(p.lm_head, c.vocab_size, c.hidden_size, "lm_head shape", "(vocab_size, hidden_size)");
  }
}

// The FFN half's function: dense SwiGLU, or the MoE layer (which keeps its routing in c.moe).
template <typename Scalar>
void ffn_forward(MatrixT<Scalar>& y, BlockCacheT<Scalar>& c, const BlockParamsT<Scalar>& p, const BlockContext& ctx,
                 Index layer, Rng* rng, Observer* observer, FaultHook* faults) {
  if (ctx.config.is_moe(layer)) {
    moe_layer_forward(c.moe, c.ffn_in, ctx.ids, p.moe, ctx.config.moe, rng, observer, ctx.sequence_lengths,
                      faults != nullptr && faults->acts_on(layer) ? faults : nullptr);
    y = c.moe.y;
  } else {
    expert_forward(y, c.dense, c.ffn_in, p.dense, ctx.config.dense_ffn(), observer);
  }
}

// y = h + ffn(post_attention_layernorm(h)),  h = x + attention(input_layernorm(x)),  x = c.x
template <typename Scalar>
void block_forward(MatrixT<Scalar>& y, BlockCacheT<Scalar>& c, const BlockParamsT<Scalar>& p, const BlockContext& ctx,
                   Index layer, Rng* rng, Observer* observer, FaultHook* faults) {
  const RMSNormConfig norm = ctx.config.norm();
  rmsnorm_forward(c.attn_in, c.attn_norm, c.x, p.attn_norm, norm);
  MatrixT<Scalar> attn_out;
  attention_forward(attn_out, c.attn, c.attn_in, p.attn, ctx.config.attention(), ctx.batch_size, ctx.seq_len);
  c.h = c.x + attn_out;
  rmsnorm_forward(c.ffn_in, c.ffn_norm, c.h, p.ffn_norm, norm);
  std::optional<StampingObserver> stamp;
  if (observer != nullptr) stamp.emplace(*observer, static_cast<int>(layer));
  MatrixT<Scalar> ffn_out;
  ffn_forward(ffn_out, c, p, ctx, layer, rng, stamp ? &*stamp : nullptr, faults);
  y = c.h + ffn_out;
}

// The MoE layer's gradients into the parameters' layout, element by element (no vector reallocates,
// so ParamRefs into grads stay valid).
template <typename Scalar>
void store_layer_grads(LayerParamsT<Scalar>& g, LayerGradsT<Scalar>& lg) {
  g.routing.router.weight = std::move(lg.router.weight);
  g.routing.router.bias = std::move(lg.router.bias);
  g.routing.router.noise_weight = std::move(lg.router.noise_weight);
  for (std::size_t e = 0; e < g.experts.size(); ++e) g.experts[e] = std::move(lg.experts[e]);
  for (std::size_t s = 0; s < g.shared.size(); ++s) g.shared[s] = std::move(lg.shared[s]);
  g.shared_gate = std::move(lg.shared_gate);
}

// dffn_in = ffn'(dy); the MoE layer adds the gradient of its aux + z losses (loss scale 1).
template <typename Scalar>
void ffn_backward(MatrixT<Scalar>& dffn_in, BlockParamsT<Scalar>& g, const MatrixT<Scalar>& dy,
                  const BlockCacheT<Scalar>& c, const BlockParamsT<Scalar>& p, const BlockContext& ctx, Index layer) {
  if (ctx.config.is_moe(layer)) {
    LayerGradsT<Scalar> lg;
    moe_layer_backward(lg, dy, c.moe, c.ffn_in, p.moe, ctx.config.moe, Scalar(1), ctx.sequence_lengths);
    dffn_in = std::move(lg.dx);
    store_layer_grads(g.moe, lg);
  } else {
    expert_backward(dffn_in, g.dense, dy, c.dense, c.ffn_in, p.dense, ctx.config.dense_ffn());
  }
}

// dx (in: d y, out: d x):  d h = d y + post_attention_layernorm'(ffn'(d y))
//                          d x = d h + input_layernorm'(attention'(d h))
template <typename Scalar>
void block_backward(MatrixT<Scalar>& dx, BlockParamsT<Scalar>& g, const BlockCacheT<Scalar>& c,
                    const BlockParamsT<Scalar>& p, const BlockContext& ctx, Index layer) {
  MatrixT<Scalar> dffn_in, dh_norm, dattn_in, dx_norm;
  ffn_backward(dffn_in, g, dx, c, p, ctx, layer);
  rmsnorm_backward(dh_norm, g.ffn_norm, dffn_in, c.ffn_norm, c.h, p.ffn_norm);
  const MatrixT<Scalar> dh = dx + dh_norm;
  attention_backward(dattn_in, g.attn, dh, c.attn, c.attn_in, p.attn, ctx.config.attention(), ctx.batch_size,
                     ctx.seq_len);
  rmsnorm_backward(dx_norm, g.attn_norm, dattn_in, c.attn_norm, c.x, p.attn_norm);
  dx = dh + dx_norm;
}

}  // namespace

template <typename Scalar>
void model_forward(ModelOutputT<Scalar>& out, std::span<const std::int32_t> ids, Index batch_size, Index seq_len,
                   const ModelParamsT<Scalar>& params, const ModelConfig& config, Rng* rng, Observer* observer,
                   FaultHook* faults) {
  config.validate();
  check_params(params, config);
  require(batch_size >= 1, "batch_size", batch_size, "must be positive");
  require(seq_len >= 1, "seq_len", seq_len, "must be positive");
  require(static_cast<Index>(ids.size()) == batch_size * seq_len, "ids size", ids.size(),
          fmt::format("must equal batch_size * seq_len = {} * {} = {}", batch_size, seq_len, batch_size * seq_len));
  out.batch_size = batch_size;
  out.seq_len = seq_len;
  out.ids.assign(ids.begin(), ids.end());
  out.blocks.resize(static_cast<std::size_t>(config.n_layers));
  const std::vector<Index> lengths(static_cast<std::size_t>(batch_size), seq_len);
  const BlockContext ctx{config, batch_size, seq_len, out.ids, lengths};

  // x_0 = embed_tokens[ids];  x_i+1 = block_i(x_i)
  MatrixT<Scalar> x;
  embedding_forward(x, ids, params.embed_tokens);
  out.aux_loss = out.z_loss = Scalar(0);
  for (Index i = 0; i < config.n_layers; ++i) {
    BlockCacheT<Scalar>& c = out.blocks[static_cast<std::size_t>(i)];
    c.x = std::move(x);
    block_forward(x, c, params.blocks[static_cast<std::size_t>(i)], ctx, i, rng, observer, faults);
    if (config.is_moe(i)) {
      out.aux_loss += c.moe.aux_loss;
      out.z_loss += c.moe.z_loss;
    }
  }
  // logits = norm(x_L) lm_head^T
  out.x = std::move(x);
  rmsnorm_forward(out.normed, out.final_norm, out.x, params.norm, config.norm());
  linear_forward(out.logits, out.normed, head_weight(params, config));
}

template <typename Scalar>
ModelLossT<Scalar> model_loss(const ModelOutputT<Scalar>& out, std::span<const std::int32_t> targets) {
  return {.ce = cross_entropy_forward(out.logits, targets), .aux = out.aux_loss, .z = out.z_loss};
}

template <typename Scalar>
void model_backward(ModelGradsT<Scalar>& grads, const ModelOutputT<Scalar>& out, std::span<const std::int32_t> targets,
                    const ModelParamsT<Scalar>& params, const ModelConfig& config) {
  config.validate();
  check_params(params, config);
  require(static_cast<Index>(out.blocks.size()) == config.n_layers, "out.blocks.size()", out.blocks.size(),
          fmt::format("must equal n_layers = {} (run model_forward with this config first)", config.n_layers));
  if (!same_layout(grads, params)) grads = zeros_like(params);
  const std::vector<Index> lengths(static_cast<std::size_t>(out.batch_size), out.seq_len);
  const BlockContext ctx{config, out.batch_size, out.seq_len, out.ids, lengths};

  // d logits = (softmax - onehot) / N;  d normed = d logits W_head;  d W_head = d logits^T normed
  MatrixT<Scalar> dlogits, dnormed, dhead, dx;
  cross_entropy_backward(dlogits, out.logits, targets);
  linear_backward(dnormed, dhead, dlogits, out.normed, head_weight(params, config));
  rmsnorm_backward(dx, grads.norm, dnormed, out.final_norm, out.x, params.norm);
  for (Index i = config.n_layers - 1; i >= 0; --i) {
    const std::size_t b = static_cast<std::size_t>(i);
    block_backward(dx, grads.blocks[b], out.blocks[b], params.blocks[b], ctx, i);
  }
  // d embed_tokens = scatter-add of d x_0 (+ the head's gradient when they are one matrix)
  embedding_backward(grads.embed_tokens, dx, out.ids, config.vocab_size);
  if (config.tie_embeddings) {
    grads.embed_tokens += dhead;
  } else {
    grads.lm_head = std::move(dhead);
  }
}

template <typename Scalar>
void model_update_bias(ModelParamsT<Scalar>& params, const ModelOutputT<Scalar>& out, const ModelConfig& config,
                       Observer* observer) {
  config.validate();
  check_layout(params, config);
  require(static_cast<Index>(out.blocks.size()) == config.n_layers, "out.blocks.size()", out.blocks.size(),
          fmt::format("must equal n_layers = {} (run model_forward with this config first)", config.n_layers));
  if (config.moe_layout == MoeLayout::dense || !config.moe.routing.use_selection_bias) return;
  for (Index i = 0; i < config.n_layers; ++i) {
    if (!config.is_moe(i)) continue;
    const std::size_t b = static_cast<std::size_t>(i);
    // b_e <- b_e + gamma sign(mean load - load_e)   (DeepSeek-V3 sec. 2.1.2)
    BiasBalancerT<Scalar> balancer{.bias = params.blocks[b].moe.routing.selection_bias,
                                   .gamma = config.moe.routing.bias_update_rate};
    std::optional<StampingObserver> stamp;
    if (observer != nullptr) stamp.emplace(*observer, static_cast<int>(i));
    balancer.update(out.blocks[b].moe.routing.load, stamp ? &*stamp : nullptr);
    params.blocks[b].moe.routing.selection_bias = std::move(balancer.bias);
  }
}

#define MOELAB_INSTANTIATE_MODEL(Scalar)                                                                           \
  template ModelParamsT<Scalar> init_model<Scalar>(const ModelConfig&, Rng&);                                     \
  template std::vector<NamedParamT<Scalar>> model_parameters<Scalar>(ModelParamsT<Scalar>&, const ModelConfig&); \
  template std::vector<ConstNamedParamT<Scalar>> model_parameters<Scalar>(const ModelParamsT<Scalar>&,            \
                                                                          const ModelConfig&);                    \
  template std::vector<NamedParamT<Scalar>> model_buffers<Scalar>(ModelParamsT<Scalar>&, const ModelConfig&);    \
  template std::vector<ConstNamedParamT<Scalar>> model_buffers<Scalar>(const ModelParamsT<Scalar>&,               \
                                                                       const ModelConfig&);                       \
  template void model_forward<Scalar>(ModelOutputT<Scalar>&, std::span<const std::int32_t>, Index, Index,        \
                                      const ModelParamsT<Scalar>&, const ModelConfig&, Rng*, Observer*,           \
                                      FaultHook*);                                                                \
  template ModelLossT<Scalar> model_loss<Scalar>(const ModelOutputT<Scalar>&, std::span<const std::int32_t>);    \
  template void model_backward<Scalar>(ModelGradsT<Scalar>&, const ModelOutputT<Scalar>&,                        \
                                       std::span<const std::int32_t>, const ModelParamsT<Scalar>&,               \
                                       const ModelConfig&);                                                       \
  template void model_update_bias<Scalar>(ModelParamsT<Scalar>&, const ModelOutputT<Scalar>&, const ModelConfig&, \
                                          Observer*);
MOELAB_INSTANTIATE_MODEL(float)
MOELAB_INSTANTIATE_MODEL(double)
#undef MOELAB_INSTANTIATE_MODEL

}  // namespace moelab
