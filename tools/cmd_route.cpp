// `moelab route`: route tokens and show what happened to each: its experts and gates.
//
//   moelab route --preset deepseek_v3 --tokens 8 --seed 1 [--dtype bf16] [--train] [--json]
//   moelab route --checkpoint DIR --text "int main(void)" [--dtype bf16] [--json]
//
// With --preset, a seeded random batch through one layer of the preset's tiny configuration, with
// the load per expert and the losses. Inputs: x ~ N(0, 1) of shape (T, C); router weights
// ~ N(0, 1/C), so logits are ~ N(0, 1); token ids uniform in [0, 256) (bytes, for hash routing);
// balancing bias zero. All from --seed.
//
// With --checkpoint (a checkpoint folder, or a run folder: its latest), the text's bytes as one
// sequence through the trained model (no router noise), and for every byte and every MoE block the
// experts it was routed to with their gates, first choice first. --dtype then emulates the routers
// of every block in that precision (default: as trained).
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "reference/error.h"
#include "reference/model.h"
#include "reference/presets.h"
#include "reference/routing.h"
#include "reference/train.h"
#include "tools/commands.h"

namespace moelab::tools {
namespace {

using json = nlohmann::ordered_json;

struct RouteOptions {
  std::string preset;
  std::string checkpoint;
  std::string text;
  Index tokens = 8;
  std::uint64_t seed = 0;
  std::string dtype = "fp32";
  bool train = false;
  bool json = false;
  std::vector<std::string> given;  // the options on the command line
};

bool given(const RouteOptions& o, std::string_view name) {
  return std::find(o.given.begin(), o.given.end(), name) != o.given.end();
}

struct Batch {
  Matrix x;
  std::vector<std::int32_t> token_ids;
  RoutingParams params;
};

Batch make_batch(const RoutingConfig& c, Index T, std::uint64_t seed) {
  Rng rng(seed);
  const Index C = c.router.hidden_size, E = c.num_experts();
  Batch b;
  b.x.resize(T, C);
  for (Index i = 0; i < b.x.size(); ++i) b.x.data()[i] = static_cast<float>(rng.normal());
  b.params.router.weight.resize(E, C);
  const double sigma = 1.0 / std::sqrt(static_cast<double>(C));
  for (Index i = 0; i < b.params.router.weight.size(); ++i)
    b.params.router.weight.data()[i] = static_cast<float>(sigma * rng.normal());
  if (c.router.use_bias) {
    b.params.router.bias.resize(E);
    for (Index e = 0; e < E; ++e) b.params.router.bias(e) = static_cast<float>(0.1 * rng.normal());
  }
  if (c.router.noise == RouterNoise::noisy_topk) b.params.router.noise_weight = Matrix::Zero(E, C);
  if (c.use_selection_bias) b.params.selection_bias = Vector::Zero(E);
  for (Index t = 0; t < T; ++t) b.token_ids.push_back(static_cast<std::int32_t>(rng.next_u64() % 256));
  return b;
}

void print_route(const RouteOptions& o) {
  const Preset& preset = find_preset(o.preset);
  require(o.tokens >= 1 && o.tokens <= 1'000'000, "--tokens", o.tokens, "must be in [1, 1000000]");
  RoutingConfig config = preset.tiny;
  config.router.dtype = parse_format(o.dtype, "--dtype");
  if (!o.train) config.router.noise = RouterNoise::none;  // noise is for training only
  const Batch batch = make_batch(config, o.tokens, o.seed);
  Rng noise_rng(o.seed ^ 0x9E3779B97F4A7C15ull);
  RoutingOutput out;
  route_forward(out, batch.x, batch.token_ids, batch.params, config, &noise_rng);

  const bool ec = config.expert_choice();
  if (o.json) {
    json doc = {{"command", "route"},       {"preset", preset.name},  {"tokens", o.tokens},
                {"seed", o.seed},           {"dtype", o.dtype},       {"train", o.train},
                {"config", to_json(config)}, {"token_ids", batch.token_ids}};
    doc["ids_layout"] = ec ? "(E, C): token ids chosen by each expert" : "(T, k): expert ids chosen by each token";
    doc["ids"] = json_rows(out.ids);
    doc["gates"] = json_rows(out.gates);
    doc["load"] = out.load;
    doc["aux_loss"] = json_number(out.aux_loss);
    doc["z_loss"] = json_number(out.z_loss);
    fmt::print("{}\n", doc.dump(2));
    return;
  }
  fmt::print("{}: {}\n{}\n\n", preset.name, preset.model, preset.convention);
  const std::string per = ec ? fmt::format("capacity C = {} tokens per expert", out.ids.cols())
                              : fmt::format("k = {} experts per token", config.top_k);
  fmt::print("tiny configuration: hidden size {}, E = {}, {}; {} tokens, seed {}, router in {}{}\n\n",
             config.router.hidden_size, config.num_experts(), per, o.tokens, o.seed, o.dtype,
             o.train ? ", training noise on" : "");
  fmt::print("{}\n", ec ? "expert  tokens (gate)" : " token  experts (gate)");
  for (Index r = 0; r < out.ids.rows(); ++r) {
    std::string line = fmt::format("{:>6} ", r);
    for (Index j = 0; j < out.ids.cols(); ++j) line += fmt::format(" {:>3} ({:.4f})", out.ids(r, j), out.gates(r, j));
    fmt::print("{}\n", line);
  }
  const std::int64_t max_load = std::max<std::int64_t>(1, *std::max_element(out.load.begin(), out.load.end()));
  fmt::print("\nexpert  load\n");
  for (std::size_t e = 0; e < out.load.size(); ++e)
    fmt::print("{:>6} {:>5}  {}\n", e, out.load[e], std::string(static_cast<std::size_t>(out.load[e] * 40 / max_load), '#'));
  fmt::print("\nlosses: aux ({} x {:g}) = {:.6g}, z-loss (x {:g}) = {:.6g}\n", aux_loss_name(config.aux_loss),
             config.aux_loss_coef, out.aux_loss, config.z_loss_coef, out.z_loss);
}

// ---- --checkpoint: a text through a trained model ------------------------------------------------

inline constexpr Index kMaxTextBytes = 4096;  // attention is (T, T): a page of text, not a book


// One token's experts in one MoE block, first choice first, with their gates; kept = false for a
// pair that capacity dropped (its expert never saw the token).
struct Choice {
  std::int32_t expert = 0;
  float gate = 0;
  bool kept = true;
};

// Per token t, the block's choices: row t of ids/gates for token choice; for expert choice, the
// experts whose selected tokens include t, in expert order.
std::vector<std::vector<Choice>> choices_of(const LayerOutput& layer, bool expert_choice, Index tokens) {
  const RoutingOutput& r = layer.routing;
  std::vector<std::vector<Choice>> per_token(static_cast<std::size_t>(tokens));
  for (Index i = 0; i < r.ids.rows(); ++i)
    for (Index j = 0; j < r.ids.cols(); ++j) {
      if (expert_choice) {
        const Index t = r.ids(i, j);
        if (t >= 0 && t < tokens)
          per_token[static_cast<std::size_t>(t)].push_back({static_cast<std::int32_t>(i), r.gates(i, j), true});
      } else {
        const bool kept = layer.keep.size() == 0 || layer.keep(i, j) != 0;
        per_token[static_cast<std::size_t>(i)].push_back({r.ids(i, j), r.gates(i, j), kept});
      }
    }
  return per_token;
}

void print_checkpoint_route(const RouteOptions& o) {
  for (const char* flag : {"--preset", "--tokens", "--seed", "--train"})
    require(!given(o, flag), flag, "(given)",
            "goes with --preset; with --checkpoint the model is the checkpoint's and the tokens are --text's bytes");
  require(!o.text.empty(), "--text", "\"\"", "must hold at least one byte (with --checkpoint, --text is required)");
  require(static_cast<Index>(o.text.size()) <= kMaxTextBytes, "--text", fmt::format("({} bytes)", o.text.size()),
          fmt::format("must be at most {} bytes", kMaxTextBytes));
  const CheckpointModel m = load_checkpoint_model(o.checkpoint);
  ModelConfig config = m.eval_model;
  if (given(o, "--dtype")) {
    config.moe.routing.router.dtype = parse_format(o.dtype, "--dtype");
    try {
      config.validate();
    } catch (const Error& e) {
      fail("--dtype", o.dtype, e.what());
    }
  }
  const std::string dtype(format_name(config.moe.routing.router.dtype));
  std::vector<int> blocks;
  for (Index i = 0; i < config.n_layers; ++i)
    if (config.is_moe(i)) blocks.push_back(static_cast<int>(i));
  if (blocks.empty())
    fail("--checkpoint", m.path.string(),
         fmt::format("the model ({}) has no MoE block: nothing is routed", m.config.model_name));

  const Index T = static_cast<Index>(o.text.size());
  std::vector<std::int32_t> ids;
  for (char c : o.text) ids.push_back(static_cast<std::uint8_t>(c));
  ModelOutput out;
  model_forward(out, ids, 1, T, m.params, config);
  const bool ec = config.moe.routing.expert_choice();
  std::vector<std::vector<std::vector<Choice>>> choices;  // (MoE blocks) (T) the token's choices
  for (int b : blocks) choices.push_back(choices_of(out.blocks[static_cast<std::size_t>(b)].moe, ec, T));
  const Index k = config.moe.routing.top_k, E = config.moe.num_experts();

  if (o.json) {
    json doc = {
        {"command", "route"}, {"checkpoint", m.path.string()}, {"step", m.step}, {"model", m.config.model_name}};
    doc["text"] = o.text;  // bytes that are not UTF-8 show as U+FFFD here (dump below); "bytes" has them all
    doc["bytes"] = ids;
    doc["moe_layers"] = blocks;
    doc["selection"] = ec ? "expert_choice" : "token_choice";
    doc["top_k"] = ec ? json(nullptr) : json(k);
    doc["num_experts"] = E;
    doc["dtype"] = dtype;
    json tokens = json::array();
    for (Index t = 0; t < T; ++t) {
      json layers = json::array();
      for (std::size_t j = 0; j < blocks.size(); ++j) {
        json experts = json::array(), gates = json::array(), kept = json::array();
        for (const Choice& c : choices[j][static_cast<std::size_t>(t)]) {
          experts.push_back(c.expert);
          gates.push_back(json_number(c.gate));
          kept.push_back(c.kept);
        }
        layers.push_back({{"layer", blocks[j]}, {"experts", experts}, {"gates", gates}, {"kept", kept}});
      }
      tokens.push_back({{"position", t},
                        {"byte", ids[static_cast<std::size_t>(t)]},
                        {"char", shown_byte(static_cast<std::uint8_t>(ids[static_cast<std::size_t>(t)]))},
                        {"layers", layers}});
    }
    doc["tokens"] = std::move(tokens);
    json load = json::array();
    for (int b : blocks) load.push_back(out.blocks[static_cast<std::size_t>(b)].moe.routing.load);
    doc["load"] = std::move(load);
    fmt::print("{}\n", doc.dump(2, ' ', false, json::error_handler_t::replace));
    return;
  }

  fmt::print("checkpoint {} ({}, step {}): {} bytes, MoE blocks {}: {}, router in {}\n", m.path.string(),
             m.config.model_name, m.step, T, fmt::join(blocks, ", "),
             ec ? fmt::format("expert choice among {} experts", E) : fmt::format("top-{} of {} experts", k, E), dtype);
  fmt::print("{}\n\n", ec ? "each block: the experts that chose the token (gate), in expert order"
                          : "each block: expert (gate), first choice first; * = dropped by capacity (the expert "
                            "never saw the token)");
  // Column width per block: the widest list of choices, so that the blocks line up.
  std::vector<std::size_t> width(blocks.size(), 0);
  std::vector<std::vector<std::string>> cells(blocks.size());
  for (std::size_t j = 0; j < blocks.size(); ++j)
    for (Index t = 0; t < T; ++t) {
      std::string cell;
      for (const Choice& c : choices[j][static_cast<std::size_t>(t)])
        cell += fmt::format("{}{:>2} ({:.3f}){}", cell.empty() ? "" : " ", c.expert, c.gate, c.kept ? "" : "*");
      if (cell.empty()) cell = "-";
      width[j] = std::max({width[j], cell.size(), fmt::formatted_size("block {}", blocks[j])});
      cells[j].push_back(std::move(cell));
    }
  std::string header = fmt::format("{:>5}  {:<6}", "pos", "byte");
  for (std::size_t j = 0; j < blocks.size(); ++j)
    header += fmt::format(" | {:<{}}", fmt::format("block {}", blocks[j]), width[j]);
  while (!header.empty() && header.back() == ' ') header.pop_back();
  fmt::print("{}\n", header);
  for (Index t = 0; t < T; ++t) {
    std::string line = fmt::format("{:>5}  {:<6}", t,
                                   "'" + shown_byte(static_cast<std::uint8_t>(ids[static_cast<std::size_t>(t)])) + "'");
    for (std::size_t j = 0; j < blocks.size(); ++j)
      line += fmt::format(" | {:<{}}", cells[j][static_cast<std::size_t>(t)], width[j]);
    while (!line.empty() && line.back() == ' ') line.pop_back();
    fmt::print("{}\n", line);
  }
}

void run_route(const RouteOptions& o) {
  if (!o.checkpoint.empty() && !o.preset.empty())
    fail("--checkpoint", o.checkpoint, "goes without --preset: route either a trained checkpoint or a preset's layer");
  if (!o.checkpoint.empty()) return print_checkpoint_route(o);
  if (o.preset.empty())
    throw Error(
        "--preset is required: route a preset's layer (--preset NAME) or a trained model (--checkpoint DIR --text "
        "TEXT)");
  require(!given(o, "--text"), "--text", o.text, "goes with --checkpoint (a preset's layer routes random vectors)");
  print_route(o);
}

}  // namespace

void add_route_command(CLI::App& app) {
  auto o = std::make_shared<RouteOptions>();
  CLI::App* cmd = app.add_subcommand(
      "route", "Route tokens: a seeded batch through a preset's layer, or a text through a checkpoint");
  cmd->add_option("--preset", o->preset, "a preset name (see moelab presets)");
  cmd->add_option("--checkpoint", o->checkpoint, "a checkpoint (or run) folder from moelab train; needs --text");
  cmd->add_option("--text", o->text, "with --checkpoint: the text whose bytes are routed");
  cmd->add_option("--tokens", o->tokens, "with --preset: number of tokens T (default 8)");
  cmd->add_option("--seed", o->seed, "with --preset: seed of the inputs and weights (default 0)");
  cmd->add_option("--dtype", o->dtype,
                  "router precision: fp32, bf16 or fp16 (default fp32; a checkpoint's: as trained)");
  cmd->add_flag("--train", o->train, "with --preset: apply the preset's training noise (jitter, noisy top-k)");
  cmd->add_flag("--json", o->json, "print one JSON document instead of tables");
  cmd->callback([o, cmd] {
    for (const CLI::Option* option : cmd->get_options())
      if (option->count() > 0) o->given.push_back(option->get_name());
    run_route(*o);
  });
}

std::string shown_byte(std::uint8_t b) {
  switch (b) {
    case '\n': return "\\n";
    case '\t': return "\\t";
    case '\r': return "\\r";
    case '\\': return "\\\\";
    default: break;
  }
  if (b >= 0x20 && b < 0x7f) return std::string(1, static_cast<char>(b));
  return fmt::format("\\x{:02x}", b);
}

}  // namespace moelab::tools
