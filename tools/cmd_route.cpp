// `moelab route`: route a seeded random batch with a preset's tiny configuration and show what
// happened: each token's experts and gates, the load per expert, the losses.
//
//   moelab route --preset deepseek_v3 --tokens 8 --seed 1 [--dtype bf16] [--train] [--json]
//
// Inputs: x ~ N(0, 1) of shape (T, C); router weights ~ N(0, 1/C), so logits are ~ N(0, 1);
// token ids uniform in [0, 256) (bytes, for hash routing); balancing bias zero. All from --seed.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "reference/error.h"
#include "reference/presets.h"
#include "reference/routing.h"
#include "tools/commands.h"

namespace moelab::tools {
namespace {

using json = nlohmann::ordered_json;

struct RouteOptions {
  std::string preset;
  Index tokens = 8;
  std::uint64_t seed = 0;
  std::string dtype = "fp32";
  bool train = false;
  bool json = false;
};

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

}  // namespace

void add_route_command(CLI::App& app) {
  auto o = std::make_shared<RouteOptions>();
  CLI::App* cmd = app.add_subcommand("route", "Route a seeded random batch with a preset's tiny configuration");
  cmd->add_option("--preset", o->preset, "a preset name (see moelab presets)")->required();
  cmd->add_option("--tokens", o->tokens, "number of tokens T (default 8)");
  cmd->add_option("--seed", o->seed, "seed of the inputs and weights (default 0)");
  cmd->add_option("--dtype", o->dtype, "router precision: fp32, bf16 or fp16 (default fp32)");
  cmd->add_flag("--train", o->train, "apply the preset's training noise (jitter, noisy top-k)");
  cmd->add_flag("--json", o->json, "print one JSON document instead of tables");
  cmd->callback([o] { print_route(*o); });
}

}  // namespace moelab::tools
