// moelab/tests/oracle/dump_routing_cases.cpp — routing cases for the independent PyTorch oracle.
//
//   moelab_dump_routing_cases OUT_DIR
//
// Writes OUT_DIR/<preset>.<case>.json, one file per case, and OUT_DIR/manifest.json listing them.
// Each file holds the inputs (x, router weight and bias, selection bias, token ids, sequence
// lengths, the dgates matrix w), the configuration (to_json) and everything moelab computes from
// them in double: logits, scores, ids, gates, load, aux_loss, z_loss, and route_backward's dx,
// dweight, dbias for the loss sum(w * gates) + aux_loss + z_loss. routing_oracle.py recomputes all
// of it in PyTorch from the inputs and the configuration alone (README.md).
//
// Cases, for every preset's tiny configuration (and a few variants that cover conventions no
// preset uses: the MegaBlocks loss, the 0.0 group mask, the max group score, table routing,
// sqrt-softplus scores, bf16/fp16 routers, a decimal capacity factor):
//   random  x ~ N(0, 1), W ~ N(0, 1/C) (bias ~ N(0, 0.1^2), selection bias ~ N(0, 0.1^2))
//   large   W (and b) scaled so that max |logit| = 110: beyond 88.7, where exp overflows float
//   huge    max |logit| = 1000: exp overflows even double, so softmax probabilities underflow to
//           exact zeros and sigmoid scores saturate to exact 0 and 1
//   ties    x and W on coarse dyadic grids, so every logit is exact whatever the summation order,
//           with duplicated expert rows (identical logits and scores for every token), tied groups
//           or devices, duplicated tokens (expert choice) and repeated token ids (hash, table)
// Router noise (Switch's jitter) is off: these are evaluations. Noise sampling is not checked by
// the oracle; its gradient path is covered by the finite-difference tests of test_routing.cpp.
// Seeds are explicit and written into each file; the same build writes the same bytes.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "reference/presets.h"
#include "reference/recorder.h"
#include "tests/oracle/case_writer.h"
#include "reference/routing.h"
#include "reference/selection.h"
#include "tests/testing.h"

namespace moelab {
namespace {

using Json = nlohmann::ordered_json;
using moelab::testing::random_matrix;

enum class Kind { random, large, huge, ties };

const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::random: return "random";
    case Kind::large: return "large";
    case Kind::huge: return "huge";
    case Kind::ties: return "ties";
  }
  return "?";
}

const char* kind_description(Kind kind) {
  switch (kind) {
    case Kind::random: return "x ~ N(0,1), W ~ N(0,1/C)";
    case Kind::large: return "W scaled so that max |logit| = 110 (exp overflows float beyond 88.7)";
    case Kind::huge: return "W scaled so that max |logit| = 1000 (exp overflows double; probabilities underflow to 0)";
    case Kind::ties:
      return "dyadic x and W (exact logits) with duplicated expert rows, tied groups/devices, duplicated tokens "
             "and repeated token ids: exact ties, broken towards the lower id";
  }
  return "?";
}

struct Case {
  std::string file_stem;            // "<preset or variant>.<kind>"
  std::string preset;               // the preset whose tiny configuration it starts from
  std::string variant;              // "" for the preset itself, else what was changed
  Kind kind = Kind::random;
  RoutingConfig config;
  Index tokens = 32;                // T
  std::vector<Index> sequence_lengths;  // deepseek_v3_sequence loss only; empty = one sequence
  double selection_bias_shift = 0;  // added to every selection bias entry (the 0.0-mask variant)
  std::int32_t vocab_size = 1000;   // token ids in [0, V) for hash and table routing
  std::uint64_t seed = 0;
};

struct Inputs {
  MatrixD x;                            // (T, C)
  RoutingParamsT<double> params;        // weight (E, C), bias (E), selection_bias (E)
  std::vector<std::int32_t> token_ids;  // (T) hash and table routing only
};

bool uses_token_ids(const RoutingConfig& c) {
  return c.selection == SelectionKind::hash || c.selection == SelectionKind::table;
}

// Rounds every element to a multiple of 1 / denominator (a power of two): products and sums of such
// small dyadic numbers are exact in double, so a logit does not depend on the summation order.
template <typename Dense>
void to_grid(Dense& m, double denominator) {
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = std::round(m.data()[i] * denominator) / denominator;
}

// Scales W and b so that the largest |logit| is `target` (logits are linear in (W, b)).
void scale_logits(Inputs& in, double target) {
  MatrixD logits = in.x * in.params.router.weight.transpose();  // (T, E)
  if (in.params.router.bias.size() > 0) logits.rowwise() += in.params.router.bias.transpose();
  const double factor = target / logits.cwiseAbs().maxCoeff();
  in.params.router.weight *= factor;
  in.params.router.bias *= factor;
}

// Expert `to` becomes an exact copy of expert `from`: same weight row, bias and selection bias.
void copy_expert(Inputs& in, Index from, Index to) {
  in.params.router.weight.row(to) = in.params.router.weight.row(from);
  if (in.params.router.bias.size() > 0) in.params.router.bias(to) = in.params.router.bias(from);
  if (in.params.selection_bias.size() > 0) in.params.selection_bias(to) = in.params.selection_bias(from);
}

void make_ties(Inputs& in, const Case& c) {
  to_grid(in.x, 8);
  to_grid(in.params.router.weight, 64);
  to_grid(in.params.router.bias, 64);
  to_grid(in.params.selection_bias, 64);
  const RoutingConfig& rc = c.config;
  const Index E = rc.num_experts(), T = in.x.rows();
  switch (rc.selection) {
    case SelectionKind::group_limited:
    case SelectionKind::device_limited: {
      // Two whole groups (devices) tied, and one pair of tied experts inside a third.
      const Index groups = rc.selection == SelectionKind::group_limited ? rc.group.n_group : rc.num_devices;
      const Index S = E / groups;
      const Index copy_of_zero = rc.selection == SelectionKind::group_limited ? 1 : 2;  // adjacent, or not
      for (Index i = 0; i < S; ++i) copy_expert(in, i, copy_of_zero * S + i);
      const Index third = copy_of_zero == 1 ? 2 : 1;
      if (S >= 2) copy_expert(in, third * S, third * S + 1);
      break;
    }
    case SelectionKind::expert_choice:
      // Tokens tie for an expert's slots: duplicated token rows (adjacent and far apart).
      in.x.row(1) = in.x.row(0);
      in.x.row(T - 1) = in.x.row(3);
      in.x.row(10) = in.x.row(9);
      copy_expert(in, 0, 1);
      break;
    default:
      copy_expert(in, 0, 1);      // adjacent
      copy_expert(in, 2, E - 1);  // far apart: the copy has the higher id
      break;
  }
  if (uses_token_ids(rc)) {  // repeated ids, and the extremes of the range
    std::vector<std::int32_t>& ids = in.token_ids;
    for (std::size_t t = 0; t + 1 < ids.size(); t += 3) ids[t + 1] = ids[t];
    ids.front() = 0;
    ids.back() = rc.selection == SelectionKind::hash ? std::numeric_limits<std::int32_t>::max() : c.vocab_size - 1;
  }
}

Inputs make_inputs(const Case& c) {
  const RoutingConfig& rc = c.config;
  const Index T = c.tokens, C = rc.router.hidden_size, E = rc.num_experts();
  Rng rng(c.seed);
  Inputs in;
  in.x = random_matrix(rng, T, C);
  in.params.router.weight = random_matrix(rng, E, C, 1.0 / std::sqrt(static_cast<double>(C)));
  if (rc.router.use_bias) in.params.router.bias = random_matrix(rng, E, 1, 0.1);
  if (rc.use_selection_bias) {
    in.params.selection_bias = random_matrix(rng, E, 1, 0.1);
    in.params.selection_bias.array() += c.selection_bias_shift;
  }
  if (uses_token_ids(rc)) {
    for (Index t = 0; t < T; ++t)
      in.token_ids.push_back(static_cast<std::int32_t>(rng.next_u64() % static_cast<std::uint64_t>(c.vocab_size)));
  }
  switch (c.kind) {
    case Kind::random: break;
    case Kind::large: scale_logits(in, 110.0); break;
    case Kind::huge: scale_logits(in, 1000.0); break;
    case Kind::ties: make_ties(in, c); break;
  }
  return in;
}

// ---- JSON ----------------------------------------------------------------------------------------





Json run_case(const Case& c) {
  const RoutingConfig& rc = c.config;
  const Inputs in = make_inputs(c);
  RoutingOutputT<double> out;
  route_forward(out, in.x, in.token_ids, in.params, rc, nullptr, nullptr, c.sequence_lengths);
  Rng wrng(hash64(c.seed));
  const MatrixD w = random_matrix(wrng, out.gates.rows(), out.gates.cols());  // dgates
  MatrixD dx;
  RouterParamsT<double> dparams;
  route_backward(dx, dparams, w, out, in.x, in.params, rc, 1.0, c.sequence_lengths);

  Json j;
  j["preset"] = c.preset;
  j["case"] = kind_name(c.kind);
  j["variant"] = c.variant;
  j["description"] = kind_description(c.kind);
  j["seed"] = c.seed;
  j["config"] = to_json(rc);
  if (rc.selection == SelectionKind::table) j["hash_table"] = json_rows(rc.hash_table);  // not in to_json
  j["x"] = json_rows(in.x);
  j["weight"] = json_rows(in.params.router.weight);
  j["bias"] = json_list(in.params.router.bias);
  j["selection_bias"] = json_list(in.params.selection_bias);
  j["token_ids"] = in.token_ids;
  j["sequence_lengths"] = c.sequence_lengths;
  j["w"] = json_rows(w);
  j["logits"] = json_rows(out.logits);
  j["scores"] = json_rows(out.scores);
  j["ids"] = json_rows(out.ids);
  j["gates"] = json_rows(out.gates);
  j["load"] = out.load;
  j["aux_loss"] = json_number(out.aux_loss);
  j["z_loss"] = json_number(out.z_loss);
  j["dx"] = json_rows(dx);
  j["dweight"] = json_rows(dparams.weight);
  j["dbias"] = json_list(dparams.bias);
  return j;
}

// ---- the cases -----------------------------------------------------------------------------------

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  std::uint64_t seed = 1000;
  auto add = [&](const std::string& stem_prefix, const std::string& preset, const std::string& variant,
                 const RoutingConfig& config, std::initializer_list<Kind> kinds, auto&& adjust) {
    for (Kind kind : kinds) {
      Case c;
      c.file_stem = stem_prefix + "." + kind_name(kind);
      c.preset = preset;
      c.variant = variant;
      c.kind = kind;
      c.config = config;
      c.seed = ++seed;
      adjust(c);
      cases.push_back(std::move(c));
    }
  };
  const auto no_change = [](Case&) {};
  const auto all_kinds = {Kind::random, Kind::large, Kind::huge, Kind::ties};

  for (const Preset& p : presets()) {
    RoutingConfig config = p.tiny;
    std::string variant;
    if (config.router.noise != RouterNoise::none) {
      config.router.noise = RouterNoise::none;  // evaluation: see the top of the file
      variant = "router noise off (evaluation)";
    }
    const std::string name(p.name);
    add(name, name, variant, config, all_kinds, [&](Case& c) {
      if (config.aux_loss == AuxLoss::deepseek_v3_sequence) {  // several sequences, and the default
        if (c.kind == Kind::random) c.sequence_lengths = {12, 20};
        if (c.kind == Kind::large) c.sequence_lengths = {32};
        if (c.kind == Kind::ties) c.sequence_lengths = {8, 8, 16};
      }
      if (config.expert_choice() && c.kind == Kind::random) c.tokens = 30;  // C = ceil(60 / 8) = 8
    });
  }

  // Variants: conventions that no preset uses, so that the oracle covers every path.
  const RoutingConfig qwen3 = find_preset("qwen3_moe").tiny;
  const RoutingConfig v3 = find_preset("deepseek_v3").tiny;
  {
    RoutingConfig c = qwen3;
    c.aux_loss = AuxLoss::megablocks;
    c.aux_loss_coef = 0.01;
    add("qwen3_moe_megablocks", "qwen3_moe", "aux_loss megablocks, coef 0.01", c, {Kind::random, Kind::large},
        no_change);
  }
  {
    RoutingConfig c = v3;
    c.group.mask = GroupMask::zero;
    add("deepseek_v3_zero_mask", "deepseek_v3",
        "group mask 0.0 (Hugging Face's masked_fill), selection bias shifted by -0.6 so that the masked experts "
        "(0.0) can beat the kept ones (negative)",
        c, {Kind::random, Kind::ties}, [](Case& k) {
          k.selection_bias_shift = -0.6;
          k.sequence_lengths = {16, 16};
        });
  }
  {
    RoutingConfig c = v3;
    c.group.score = GroupScore::max;
    add("deepseek_v3_group_max", "deepseek_v3", "group score = max (DeepSeek-V2 group_limited_greedy)", c,
        {Kind::random, Kind::ties}, no_change);
  }
  {
    RoutingConfig c = v3;
    c.scoring = Scoring::sqrt_softplus;
    c.selection = SelectionKind::topk;
    c.gating.routed_scaling_factor = 1.5;
    add("sqrt_softplus_topk", "deepseek_v3",
        "sqrt(softplus) scores, plain top-k on scores + bias, renormalised, scaling 1.5", c,
        {Kind::random, Kind::large, Kind::ties}, [](Case& k) { k.sequence_lengths = {10, 22}; });
  }
  {
    RoutingConfig c = v3;
    c.scoring = Scoring::sqrt_softplus;
    c.selection = SelectionKind::table;
    c.use_selection_bias = false;
    c.gating.routed_scaling_factor = 1.5;
    c.hash_table = make_hash_table(64, static_cast<int>(c.num_experts()), c.top_k, 0x7AB1E);
    add("table", "deepseek_v3",
        "table routing (token id -> 4 experts, make_hash_table(64, 16, 4, 0x7AB1E)), sqrt(softplus) scores, "
        "renormalised, scaling 1.5",
        c, {Kind::random, Kind::ties}, [](Case& k) {
          k.vocab_size = 64;
          k.sequence_lengths = {32};
        });
  }
  {
    RoutingConfig c = find_preset("mixtral").tiny;
    c.router.dtype = Format::bf16;
    add("mixtral_bf16", "mixtral", "router in bf16 (x, W and the logits rounded; straight-through backward)", c,
        {Kind::random, Kind::ties}, no_change);
  }
  {
    RoutingConfig c = find_preset("olmoe").tiny;
    c.router.dtype = Format::fp16;
    add("olmoe_fp16", "olmoe", "router in fp16 (x, W and the logits rounded; straight-through backward)", c,
        {Kind::random, Kind::ties}, no_change);
  }
  {
    RoutingConfig c = find_preset("gpt_oss").tiny;
    c.router.dtype = Format::bf16;
    add("gpt_oss_bf16", "gpt_oss", "router in bf16, with its bias rounded too", c, {Kind::random}, no_change);
  }
  {
    RoutingConfig c = find_preset("expert_choice").tiny;
    c.capacity_factor = 1.1;
    add("expert_choice_cf1.1", "expert_choice",
        "capacity factor 1.1 with T = 80, E = 8: C = 80 * 1.1 / 8 = 11 exactly, though the double quotient is "
        "11.000000000000002",
        c, {Kind::random}, [](Case& k) { k.tokens = 80; });
  }
  return cases;
}

std::vector<oracle::NamedCase> named_cases() {
  std::vector<oracle::NamedCase> named;
  for (const Case& c : all_cases()) named.push_back({c.file_stem, [c] { return run_case(c); }});
  return named;
}

}  // namespace
}  // namespace moelab

int main(int argc, char** argv) {
  return moelab::oracle::dumper_main(argc, argv, "moelab_dump_routing_cases", moelab::named_cases);
}
