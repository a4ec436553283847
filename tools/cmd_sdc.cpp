// `moelab sdc`: the silent-data-corruption lab (reference/sdc.h, docs/sdc.md). One bit flipped per
// trial at a site of the MoE model, in a storage format, and what it did: expert selections, the
// layer's output, the logits, the loss, NaN/inf; and router damage over expert damage.
//
//   moelab sdc --checkpoint DIR|random [--preset NAME] [--site all|S,...] [--bits all|C,...|N,...]
//              [--dtype fp32,bf16,fp8_e4m3] [--trials N] [--layer L] [--flips 1|0] [--lockstep]
//              [--seed S] [--threads N] [--batch B] [--seq T] [--corpus DIR] [--json]
//   moelab sdc --checkpoint DIR|random --trace --site S --dtype D --bit N [--text TEXT] [--layer L]
//              [--token T] [--slot J] [--col C] [--expert E] [--matrix M] [--row R] [--flips 1|0] [--json]
//
// DIR is a checkpoint or a run folder (its latest); `random` is the model `moelab train --preset
// NAME --seed S` starts from (default tiny_moe), without router noise. The study reads the first
// validation batch of B x T bytes of the corpus (the checkpoint's T unless --seq; B = 4) with the
// validation sampler's fixed seed; --flips 0 runs the same trials without flipping (every metric
// must be zero). --trace runs one fault on --text's bytes (one sequence; the last byte's target is
// 0x1E, the corpus's end of document) and prints every byte's experts per MoE block, before -> after.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "reference/corpus.h"
#include "reference/error.h"
#include "reference/model.h"
#include "reference/sdc.h"
#include "reference/train.h"
#include "tools/commands.h"

namespace moelab::tools {
namespace {

using json = nlohmann::ordered_json;

inline constexpr Index kMaxTextBytes = 4096;

struct SdcOptions {
  std::string checkpoint;
  std::string preset = "tiny_moe";
  std::string sites = "all";
  std::string bits = "all";
  std::string dtypes = "fp32,bf16,fp8_e4m3";
  Index trials = 50;
  std::optional<Index> layer;
  int flips = 1;
  bool lockstep = false;
  std::uint64_t seed = 0;
  int threads = 0;
  Index batch = 4;
  std::optional<Index> seq;
  std::string corpus = "data/corpus";
  bool trace = false;
  std::string text;
  int bit = -1;
  Index token = 0, slot = 0, col = 0, expert = 0, row = 0;
  std::string matrix = "w_up";
  bool json = false;
  std::vector<std::string> given;  // the options on the command line
};

bool given(const SdcOptions& o, std::string_view name) {
  return std::find(o.given.begin(), o.given.end(), name) != o.given.end();
}

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> items;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t end = std::min(text.find(',', start), text.size());
    items.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  return items;
}

// The model under study and where it came from.
struct Subject {
  ModelConfig config;
  ModelParams params;
  std::string source;  // the checkpoint folder, or "random"
  std::string name;    // the model configuration's name
  std::int64_t step = 0;
  Index seq_len = 128;
};

Subject load_subject(const SdcOptions& o) {
  Subject s;
  if (o.checkpoint == "random") {
    const std::vector<std::string> names = model_config_names();
    if (std::find(names.begin(), names.end(), o.preset) == names.end())
      fail("--preset", fmt::format("\"{}\"", o.preset), "is not a model configuration: tiny_moe or a preset's name");
    s.config = model_config(o.preset);
    s.config.moe.routing.router.noise = RouterNoise::none;
    Rng rng(stream_seed(o.seed, kInitStream, 0));  // what `moelab train --seed S` starts from
    s.params = init_model<float>(s.config, rng);
    s.source = "random";
    s.name = o.preset;
  } else {
    require(!given(o, "--preset"), "--preset", o.preset, "goes with --checkpoint random (a checkpoint has its own model)");
    CheckpointModel m = load_checkpoint_model(o.checkpoint);
    s.config = m.eval_model;
    s.params = std::move(m.params);
    s.source = m.path.string();
    s.name = m.config.model_name;
    s.step = m.step;
    s.seq_len = m.config.seq_len;
  }
  require_sdc_model(s.config, "--checkpoint");
  return s;
}

json fault_json(const Fault& f, const FaultRecord& r) {
  json j = {{"site", fault_site_name(f.site)}, {"dtype", format_name(f.format)}, {"bit", f.bit},
            {"bit_class", bit_class_name(bit_class(f.bit, f.format))}, {"flip", f.flip}, {"layer", f.layer}};
  if (is_weight_site(f.site)) {
    if (f.site == FaultSite::expert_weights) {
      j["expert"] = f.expert;
      j["matrix"] = expert_matrix_name(f.matrix);
    }
    j["row"] = f.row;
  } else {
    j["token"] = f.token;
    j["slot"] = f.slot;
  }
  j["col"] = f.col;
  const int hex_digits = format_info(f.format).bits / 4;
  j["applied"] = r.applied;
  j["held_by_expert"] = r.expert;
  j["value"] = json_number(r.value);
  j["stored"] = json_number(r.stored);
  j["faulted"] = json_number(r.faulted);
  j["stored_bits"] = fmt::format("{:#0{}x}", r.stored_bits, hex_digits + 2);
  j["faulted_bits"] = fmt::format("{:#0{}x}", r.faulted_bits, hex_digits + 2);
  return j;
}

json metrics_json(const TrialMetrics& m) {
  return {{"nonfinite", m.nonfinite},
          {"selections_changed", json_number(m.selections_changed)},
          {"own_selection_changed", json_number(m.own_selection_changed)},
          {"layer_rel_error", json_number(m.layer_rel_error)},
          {"logit_rel_error", json_number(m.logit_rel_error)},
          {"loss_delta", json_number(m.loss_delta)}};
}

json spread_json(const Spread& s) {
  return {{"count", s.count}, {"mean", json_number(s.mean)}, {"median", json_number(s.median)}, {"max", json_number(s.max)}};
}

json summary_json(const SdcSummary& s) {
  return {{"trials", s.trials},
          {"applied", s.applied},
          {"refused", s.refused},
          {"nonfinite", s.nonfinite},
          {"nonfinite_rate", json_number(s.rate(s.nonfinite))},
          {"effect", s.effect},
          {"effect_rate", json_number(s.rate(s.effect))},
          {"selections_changed", spread_json(s.selections_changed)},
          {"own_selection_changed", json_number(s.own_selection_changed)},
          {"layer_rel_error", spread_json(s.layer_rel_error)},
          {"logit_rel_error", spread_json(s.logit_rel_error)},
          {"loss_delta", spread_json(s.loss_delta)},
          {"lockstep_detected", json_number(s.detected)},
          {"lockstep_detected_of_effect", json_number(s.detected_of_effect)}};
}

// A short number for the tables: 0 as "0", else three significant digits; NaN as "-".
std::string num(double v) {
  if (std::isnan(v)) return "-";
  if (v == 0) return "0";
  return fmt::format("{:.3g}", v);
}

std::string percent(double share) {
  if (std::isnan(share)) return "-";
  if (share == 0) return "0%";
  return fmt::format("{:.3g}%", 100 * share);
}

void print_study(const SdcOptions& o, const Subject& s, const SdcStudy& study, const SdcConfig& c, const Batch& batch,
                 const LoadedCorpus& corpus) {
  if (o.json) {
    json doc = {{"command", "sdc"}, {"checkpoint", s.source}, {"model", s.name}, {"step", s.step}};
    doc["tokens"] = study.tokens;
    doc["batch_size"] = batch.batch_size;
    doc["seq_len"] = batch.seq_len;
    doc["corpus"] = {{"path", o.corpus}, {"fallback", corpus.fallback}, {"message", corpus.message}};
    doc["moe_layers"] = study.moe_layers;
    doc["layer"] = c.layer ? json(*c.layer) : json(nullptr);
    doc["seed"] = c.seed;
    doc["flips"] = c.flip ? 1 : 0;
    doc["trials"] = c.trials;
    doc["lockstep"] = c.lockstep;
    doc["baseline_loss"] = json_number(study.baseline_loss);
    json cells = json::array();
    for (const SdcCell& cell : study.cells) {
      json trials = json::array();
      for (const SdcTrial& t : cell.trials) {
        json tj = fault_json(t.fault, t.record);
        tj["refused"] = t.refused;
        tj["metrics"] = metrics_json(t.metrics);
        tj["lockstep_detected"] = t.detected ? json(*t.detected) : json(nullptr);
        trials.push_back(std::move(tj));
      }
      cells.push_back({{"site", fault_site_name(cell.site)},
                       {"kind", is_weight_site(cell.site) ? "weight" : "transient"},
                       {"dtype", format_name(cell.format)},
                       {"bits", cell.bits.name()},
                       {"summary", summary_json(cell.summary)},
                       {"trials", std::move(trials)}});
    }
    doc["cells"] = std::move(cells);
    json ratios = json::array();
    for (const SdcRatio& r : study.ratios)
      ratios.push_back({{"dtype", format_name(r.format)},
                        {"bits", r.bits},
                        {"kind", r.weight ? "weight" : "transient"},
                        {"router_logit_error", json_number(r.router_logit_error)},
                        {"expert_logit_error", json_number(r.expert_logit_error)},
                        {"ratio", json_number(r.ratio)},
                        {"router_nonfinite_rate", json_number(r.router_nonfinite)},
                        {"expert_nonfinite_rate", json_number(r.expert_nonfinite)},
                        {"router_selections_changed", json_number(r.router_selection_changed)},
                        {"expert_selections_changed", json_number(r.expert_selection_changed)}});
    doc["ratios"] = std::move(ratios);
    doc["lockstep_cost"] = {{"router_flops_per_token", study.cost.router_flops_per_token},
                            {"layer_flops_per_token", study.cost.layer_flops_per_token},
                            {"model_flops_per_token", study.cost.model_flops_per_token},
                            {"of_layer", study.cost.of_layer},
                            {"of_model", study.cost.of_model}};
    fmt::print("{}\n", doc.dump(2));
    return;
  }
  if (corpus.fallback) fmt::print("note: {}\n", corpus.message);
  fmt::print("moelab sdc: {} ({}{}), {} x {} = {} validation bytes, MoE blocks {}; clean loss {:.4f} nats/byte\n",
             s.source, s.name, s.source == "random" ? fmt::format(", seed {}", c.seed) : fmt::format(", step {}", s.step),
             batch.batch_size, batch.seq_len, study.tokens, fmt::join(study.moe_layers, ", "), study.baseline_loss);
  fmt::print("{} per trial, {} trials per row, seed {}, block {}; errors relative L2 over the whole batch: mean / "
             "median / max of the finite trials\n\n",
             c.flip ? "one bit flip" : "NO flip (control)", c.trials, c.seed,
             c.layer ? std::to_string(*c.layer) : "uniform");
  std::string header = fmt::format("{:<19} {:<9} {:<9} {:>7} {:>7} {:>8} {:>8}  {:<28}  {:<28}  {:<19}", "site", "dtype",
                                   "bits", "effect", "nonfin", "sel.chg", "own sel", "layer error", "logit error",
                                   "dloss mean / max");
  if (c.lockstep) header += "  lockstep";
  fmt::print("{}\n", header);
  for (const SdcCell& cell : study.cells) {
    const SdcSummary& m = cell.summary;
    auto three = [](const Spread& sp) { return fmt::format("{} / {} / {}", num(sp.mean), num(sp.median), num(sp.max)); };
    std::string line = fmt::format("{:<19} {:<9} {:<9} {:>7} {:>7} {:>8} {:>8}  {:<28}  {:<28}  {:<19}",
                                   fault_site_name(cell.site), format_name(cell.format), cell.bits.name(),
                                   percent(m.rate(m.effect)), percent(m.rate(m.nonfinite)),
                                   percent(m.selections_changed.mean), percent(m.own_selection_changed),
                                   three(m.layer_rel_error), three(m.logit_rel_error),
                                   fmt::format("{} / {}", num(m.loss_delta.mean), num(m.loss_delta.max)));
    if (c.lockstep) line += fmt::format("  {}", percent(m.detected));
    while (!line.empty() && line.back() == ' ') line.pop_back();
    fmt::print("{}\n", line);
  }
  if (!study.ratios.empty()) {
    fmt::print("\nrouter / expert damage: mean relative logit error of the router sites' trials over the expert "
               "sites' (finite trials)\n");
    fmt::print("{:<9} {:<9} {:<10} {:>10} {:>10} {:>10}   {:<22} {:<22}\n", "dtype", "bits", "faults", "router",
               "expert", "ratio", "nonfin router/expert", "sel.chg router/expert");
    for (const SdcRatio& r : study.ratios)
      fmt::print("{:<9} {:<9} {:<10} {:>10} {:>10} {:>10}   {:<22} {:<22}\n", format_name(r.format), r.bits,
                 r.weight ? "weight" : "transient", num(r.router_logit_error), num(r.expert_logit_error), num(r.ratio),
                 fmt::format("{} / {}", percent(r.router_nonfinite), percent(r.expert_nonfinite)),
                 fmt::format("{} / {}", percent(r.router_selection_changed), percent(r.expert_selection_changed)));
  }
  fmt::print("\nlockstep (the router computed twice) costs {:.0f} FLOPs per token: {:.2f}% of an MoE block, {:.2f}% of "
             "the model's forward\n",
             study.cost.router_flops_per_token, 100 * study.cost.of_layer, 100 * study.cost.of_model);
}

// ---- --trace -----------------------------------------------------------------------------------------

std::string experts_of(const IndexMatrix& ids, Index t) {
  std::string s;
  for (Index j = 0; j < ids.cols(); ++j) s += fmt::format("{}{}", j == 0 ? "" : ",", ids(t, j));
  return s;
}

void run_trace(const SdcOptions& o, const Subject& s) {
  for (const char* flag : {"--trials", "--bits", "--lockstep", "--batch", "--seq", "--threads", "--corpus"})
    require(!given(o, flag), flag, "(given)", "goes with the study; --trace runs one fault on --text");
  require(given(o, "--bit"), "--bit", "(missing)", "--trace flips one bit: give its position (0 = last mantissa bit)");
  require(!o.text.empty(), "--text", "\"\"", "must hold at least one byte (with --trace, --text is required)");
  require(static_cast<Index>(o.text.size()) <= kMaxTextBytes, "--text", fmt::format("({} bytes)", o.text.size()),
          fmt::format("must be at most {} bytes", kMaxTextBytes));
  const std::vector<std::string> sites = split_list(o.sites), dtypes = split_list(o.dtypes);
  require(sites.size() == 1 && sites[0] != "all", "--site", o.sites, "--trace takes one site");
  require(dtypes.size() == 1, "--dtype", o.dtypes, "--trace takes one format");
  Fault f;
  f.site = parse_fault_site(sites[0], "--site");
  f.format = parse_format(dtypes[0], "--dtype");
  f.bit = o.bit;
  f.flip = o.flips == 1;
  std::vector<int> blocks;
  for (Index i = 0; i < s.config.n_layers; ++i)
    if (s.config.is_moe(i)) blocks.push_back(static_cast<int>(i));
  f.layer = o.layer.value_or(blocks.front());
  f.token = o.token;
  f.slot = o.slot;
  f.col = o.col;
  f.expert = o.expert;
  f.matrix = parse_expert_matrix(o.matrix, "--matrix");
  f.row = o.row;
  Batch batch;
  batch.batch_size = 1;
  batch.seq_len = static_cast<Index>(o.text.size());
  for (char ch : o.text) batch.inputs.push_back(static_cast<std::uint8_t>(ch));
  batch.targets.assign(batch.inputs.begin() + 1, batch.inputs.end());
  batch.targets.push_back(0x1E);
  try {
    f.validate(s.config, batch.seq_len);
  } catch (const Error& e) {
    throw Error(fmt::format("--{}", e.what()));  // the option's name: "--col = 9: ..."
  }
  const RoutingTrace trace = trace_fault(s.config, s.params, batch, f);
  const Index T = batch.seq_len;

  if (o.json) {
    json doc = {{"command", "sdc"}, {"trace", true}, {"checkpoint", s.source}, {"model", s.name}, {"step", s.step}};
    doc["text"] = o.text;
    doc["bytes"] = batch.inputs;
    doc["fault"] = fault_json(trace.fault, trace.record);
    doc["refused"] = trace.refused;
    doc["refusal"] = trace.refusal;
    doc["metrics"] = metrics_json(trace.metrics);
    doc["moe_layers"] = trace.moe_layers;
    json tokens = json::array();
    for (Index t = 0; t < T; ++t) {
      json layers = json::array();
      for (std::size_t j = 0; j < trace.moe_layers.size(); ++j) {
        const bool done = trace.ids_after[j].rows() == T;
        layers.push_back({{"layer", trace.moe_layers[j]},
                          {"experts_before", json_list(trace.ids_before[j].row(t))},
                          {"gates_before", json_list(trace.gates_before[j].row(t))},
                          {"experts_after", done ? json_list(trace.ids_after[j].row(t)) : json(nullptr)},
                          {"gates_after", done ? json_list(trace.gates_after[j].row(t)) : json(nullptr)}});
      }
      tokens.push_back({{"position", t},
                        {"byte", batch.inputs[static_cast<std::size_t>(t)]},
                        {"char", shown_byte(static_cast<std::uint8_t>(batch.inputs[static_cast<std::size_t>(t)]))},
                        {"layers", std::move(layers)}});
    }
    doc["tokens"] = std::move(tokens);
    fmt::print("{}\n", doc.dump(2, ' ', false, json::error_handler_t::replace));
    return;
  }

  const FaultRecord& r = trace.record;
  const int hex = format_info(f.format).bits / 4 + 2;
  fmt::print("moelab sdc --trace: {} ({}), {} bytes\n", s.source, s.name, T);
  std::string where = is_weight_site(f.site)
                          ? fmt::format("{}{}[{}, {}]", f.site == FaultSite::expert_weights ? fmt::format("expert {} ", f.expert) : "",
                                        f.site == FaultSite::expert_weights ? expert_matrix_name(f.matrix) : "W_r", f.row, f.col)
                          : fmt::format("byte {}{}, column {}", f.token,
                                        f.site == FaultSite::gate_values || f.site == FaultSite::expert_activations ||
                                                f.site == FaultSite::expert_outputs
                                            ? fmt::format(" slot {}", f.slot)
                                            : "",
                                        f.col);
  fmt::print("fault: {} in block {}, {}: {} bit {} ({}){}\n", fault_site_name(f.site), f.layer, where,
             format_name(f.format), f.bit, bit_class_name(bit_class(f.bit, f.format)), f.flip ? "" : " NOT flipped");
  if (r.applied) {
    fmt::print("       {} -> stored {} ({:#0{}x}) -> faulted {} ({:#0{}x}){}\n", r.value, r.stored, r.stored_bits, hex,
               r.faulted, r.faulted_bits, hex, r.expert >= 0 ? fmt::format(", expert {}", r.expert) : "");
  } else {
    fmt::print("       not applied: the pair was dropped by capacity\n");
  }
  if (trace.refused) fmt::print("the faulted forward was refused: {}\n", trace.refusal);
  const TrialMetrics& m = trace.metrics;
  fmt::print("selections changed {}, own {}, layer error {}, logit error {}, loss change {} nats/byte{}\n\n",
             percent(m.selections_changed), std::isnan(m.own_selection_changed) ? "-" : (m.own_selection_changed > 0 ? "yes" : "no"),
             num(m.layer_rel_error), num(m.logit_rel_error), num(m.loss_delta), m.nonfinite ? ", NON-FINITE" : "");
  fmt::print("experts per block, first choice first, before -> after (* = another set of experts, ~ = the same set "
             "reordered, ? = not routed: the run was refused)\n");
  std::vector<std::string> cells;
  std::size_t width = 0;
  for (Index t = 0; t < T; ++t)
    for (std::size_t j = 0; j < trace.moe_layers.size(); ++j) {
      const std::string before = experts_of(trace.ids_before[j], t);
      const bool done = trace.ids_after[j].rows() == T;
      const std::string after = done ? experts_of(trace.ids_after[j], t) : "?";
      std::string cell = before == after ? before : fmt::format("{} -> {}", before, after);
      if (done && before != after) {
        IndexMatrix one_row = trace.ids_before[j].row(t), other = trace.ids_after[j].row(t);
        cell += changed_selections(one_row, other) > 0 ? " *" : " ~";  // another set, or the same set reordered
      }
      width = std::max(width, cell.size());
      cells.push_back(std::move(cell));
    }
  std::string header = fmt::format("{:>5}  {:<6}", "pos", "byte");
  for (int b : trace.moe_layers) header += fmt::format(" | {:<{}}", fmt::format("block {}", b), width);
  fmt::print("{}\n", header);
  const std::size_t L = trace.moe_layers.size();
  for (Index t = 0; t < T; ++t) {
    std::string line = fmt::format("{:>5}  {:<6}", t, "'" + shown_byte(static_cast<std::uint8_t>(batch.inputs[static_cast<std::size_t>(t)])) + "'");
    for (std::size_t j = 0; j < L; ++j) line += fmt::format(" | {:<{}}", cells[static_cast<std::size_t>(t) * L + j], width);
    while (!line.empty() && line.back() == ' ') line.pop_back();
    fmt::print("{}{}\n", line, t == f.token && !is_weight_site(f.site) ? "   <- faulted byte" : "");
  }
}

// ---- the study -------------------------------------------------------------------------------------

void run_sdc(const SdcOptions& o) {
  require(!o.checkpoint.empty(), "--checkpoint", "\"\"", "name a checkpoint (or run) folder, or random");
  require(o.flips == 0 || o.flips == 1, "--flips", o.flips, "must be 1 (one bit flip per trial) or 0 (the control)");
  const Subject s = load_subject(o);
  if (o.trace) return run_trace(o, s);
  for (const char* flag : {"--text", "--bit", "--token", "--slot", "--col", "--expert", "--matrix", "--row"})
    require(!given(o, flag), flag, "(given)", "goes with --trace (the study draws its faults at random)");
  require(o.trials >= 1 && o.trials <= 1'000'000, "--trials", o.trials, "must be in [1, 1000000]");
  require(o.threads >= 0 && o.threads <= 256, "--threads", o.threads, "must be in [0, 256] (0: every core)");
  require(o.batch >= 1 && o.batch <= 256, "--batch", o.batch, "must be in [1, 256]");
  const Index seq_len = o.seq.value_or(s.seq_len);
  require(seq_len >= 1 && seq_len <= kMaxTextBytes, "--seq", seq_len, fmt::format("must be in [1, {}]", kMaxTextBytes));

  SdcConfig c;
  if (o.sites != "all") {
    c.sites.clear();
    for (const std::string& name : split_list(o.sites)) c.sites.push_back(parse_fault_site(name, "--site"));
  }
  c.formats.clear();
  for (const std::string& name : split_list(o.dtypes)) c.formats.push_back(parse_format(name, "--dtype"));
  if (o.bits != "all") {
    c.bits.clear();
    for (const std::string& b : split_list(o.bits)) c.bits.push_back(parse_bit_choice(b, "--bits"));
  }
  for (Format f : c.formats)
    for (const BitChoice& b : c.bits) bit_positions(b, f, "--bits");
  if (o.layer) {
    require(*o.layer >= 0 && *o.layer < s.config.n_layers && s.config.is_moe(*o.layer), "--layer", *o.layer,
            "must be an MoE block of the model");
    c.layer = o.layer;
  }
  c.trials = o.trials;
  c.flip = o.flips == 1;
  c.lockstep = o.lockstep;
  c.seed = o.seed;
  c.threads = o.threads > 0 ? o.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));

  const LoadedCorpus corpus = load_corpus_or_generated(o.corpus, given(o, "--corpus"));
  const CorpusSampler sampler(corpus.corpus, Split::val, o.batch, seq_len, CorpusBatchSource::kValidationSeed);
  const Batch batch = sampler.batch(0);
  const SdcStudy study = run_sdc_study(s.config, s.params, batch, c);
  print_study(o, s, study, c, batch, corpus);
}

}  // namespace

void add_sdc_command(CLI::App& app) {
  auto o = std::make_shared<SdcOptions>();
  CLI::App* cmd = app.add_subcommand(
      "sdc", "Silent data corruption: one bit flipped in the router or an expert, and what it does (docs/sdc.md)");
  cmd->add_option("--checkpoint", o->checkpoint, "a checkpoint (or run) folder, or random (an initialised model)")
      ->required();
  cmd->add_option("--preset", o->preset, "with --checkpoint random: the model configuration (default tiny_moe)");
  cmd->add_option("--site", o->sites,
                  "all (default) or a list of router_input, router_weights, router_logits, gate_values, "
                  "expert_weights, expert_activations, expert_outputs, combine_output");
  cmd->add_option("--bits", o->bits, "all (= sign,exponent,mantissa; default) or a list of sign, exponent, mantissa, any (a uniform bit) and bit positions");
  cmd->add_option("--dtype", o->dtypes, "the storage formats, a list (default fp32,bf16,fp8_e4m3)");
  cmd->add_option("--trials", o->trials, "trials per site, format and bits (default 50)");
  cmd->add_option("--layer", o->layer, "the MoE block to fault (default: uniform per trial; --trace: the first)");
  cmd->add_option("--flips", o->flips, "bit flips per trial: 1 (default) or 0 (the control: every metric is zero)");
  cmd->add_flag("--lockstep", o->lockstep, "also run each faulted block's router twice and compare (detection rate)");
  cmd->add_option("--seed", o->seed, "seed of the trials (and of the random model's initialisation); default 0");
  cmd->add_option("--threads", o->threads, "threads (default 0: every core); never changes the results");
  cmd->add_option("--batch", o->batch, "validation sequences (default 4)");
  cmd->add_option("--seq", o->seq, "bytes per sequence (default: the checkpoint's; random: 128)");
  cmd->add_option("--corpus", o->corpus, "corpus folder from `moelab corpus` (default data/corpus)");
  cmd->add_flag("--trace", o->trace, "one fault on --text: every byte's experts before -> after");
  cmd->add_option("--text", o->text, "with --trace: the text whose bytes are routed");
  cmd->add_option("--bit", o->bit, "with --trace: the bit to flip (0 = last mantissa bit)");
  cmd->add_option("--token", o->token, "with --trace: the faulted byte's position (default 0)");
  cmd->add_option("--slot", o->slot, "with --trace: which of the byte's experts (gate, activation, output sites)");
  cmd->add_option("--col", o->col, "with --trace: the column (channel, expert, feature) or weight column");
  cmd->add_option("--expert", o->expert, "with --trace --site expert_weights: the expert");
  cmd->add_option("--matrix", o->matrix, "with --trace --site expert_weights: w_gate, w_up (default) or w_down");
  cmd->add_option("--row", o->row, "with --trace at a weight site: the weight's row");
  cmd->add_flag("--json", o->json, "print one JSON document instead of tables");
  cmd->callback([o, cmd] {
    for (const CLI::Option* option : cmd->get_options())
      if (option->count() > 0) o->given.push_back(option->get_name());
    run_sdc(*o);
  });
}

}  // namespace moelab::tools
