// `moelab analyze`: what the routers of a trained checkpoint learned, after OLMoE's routing analysis
// (Muennighoff et al. 2024, sec. 5). The checkpoint's model reads N batches of the corpus (no
// router noise, no updates) and every MoE block's choices go through reference/analysis.h:
// domain x expert distribution, load and imbalance, dead experts, routing entropy, I(domain;
// expert) against shuffled domains, vocabulary specialisation, co-activated pairs; with --compare,
// router saturation (the share of each token's top-k that the other checkpoint also chooses).
//
//   moelab analyze --checkpoint DIR [--split val|train] [--batches N] [--corpus DIR] [--compare DIR2] [--json]
//
// DIR is a checkpoint (runs/x/step-002000) or a run folder (its latest checkpoint). The batches are
// the checkpoint's B x T windows drawn with the validation sampler's fixed seed, so val batch i is
// exactly the batch Trainer::evaluate measured, and --compare routes the same tokens through both.
#include <fmt/format.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "reference/analysis.h"
#include "reference/corpus.h"
#include "reference/error.h"
#include "reference/model.h"
#include "reference/train.h"
#include "tools/commands.h"

namespace moelab::tools {
namespace {

using json = nlohmann::ordered_json;

struct AnalyzeOptions {
  std::string checkpoint;
  std::string split = "val";
  std::optional<Index> batches;
  std::string corpus = "data/corpus";
  bool corpus_given = false;
  std::string compare;
  bool json = false;
};

std::vector<int> moe_blocks_of(const CheckpointModel& m, std::string_view flag) {
  std::vector<int> blocks;
  for (Index i = 0; i < m.model.n_layers; ++i)
    if (m.model.is_moe(i)) blocks.push_back(static_cast<int>(i));
  if (blocks.empty())
    fail(flag, m.path.string(), fmt::format("the model ({}) has no MoE block: nothing is routed", m.config.model_name));
  if (m.model.moe.routing.expert_choice())
    fail(flag, m.path.string(),
         "routes by expert choice, which gives each token a varying number of experts; the analysis needs "
         "token-choice routing (k experts per token)");
  return blocks;
}

// `text` cut into lines of at most `width` characters at spaces, each line after `indent`.
std::string wrapped(std::string_view text, std::size_t width, std::string_view indent) {
  std::string out, line;
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t end = text.find(' ', start);
    if (end == std::string_view::npos) end = text.size();
    const std::string_view word = text.substr(start, end - start);
    if (!line.empty() && line.size() + 1 + word.size() > width) {
      out += fmt::format("{}{}\n", indent, line);
      line.clear();
    }
    if (!word.empty()) line += (line.empty() ? "" : " ") + std::string(word);
    start = end + 1;
  }
  if (!line.empty()) out += fmt::format("{}{}\n", indent, line);
  return out;
}

// The OLMoE figure as a table: the share (%) of each domain's tokens that have expert e among their
// k (uniform: k / E), and the same over all tokens.
void print_domain_table(const LayerReport& r) {
  const DomainDistribution& d = *r.domains;
  std::size_t name_width = 6;
  for (const std::string& name : r.domain_names) name_width = std::max(name_width, name.size());
  fmt::print("  % of each domain's tokens routed to each expert (uniform {:.0f}%):\n",
             100.0 * static_cast<double>(r.top_k) / static_cast<double>(r.num_experts));
  std::string header = fmt::format("  {:<{}} ", "domain", name_width);
  for (Index e = 0; e < r.num_experts; ++e) header += fmt::format(" {:>4}", fmt::format("e{}", e));
  fmt::print("{}  {:>6}\n", header, "tokens");
  for (std::size_t i = 0; i < r.domain_names.size(); ++i) {
    if (d.tokens[i] == 0) continue;  // listed in the summary as a domain without tokens
    std::string row = fmt::format("  {:<{}} ", r.domain_names[i], name_width);
    for (Index e = 0; e < r.num_experts; ++e)
      row += fmt::format(" {:>4.0f}", 100.0 * d.token_share(static_cast<Index>(i), e));
    fmt::print("{}  {:>6}\n", row, d.tokens[i]);
  }
  std::string all = fmt::format("  {:<{}} ", "all", name_width);
  for (Index e = 0; e < r.num_experts; ++e)
    all +=
        fmt::format(" {:>4.0f}", 100.0 * static_cast<double>(r.top_k) * r.load.fraction[static_cast<std::size_t>(e)]);
  fmt::print("{}  {:>6}\n", all, r.tokens);
}

void run_analyze(const AnalyzeOptions& o) {
  require(o.split == "val" || o.split == "train", "--split", o.split, "must be val or train");
  const CheckpointModel model = load_checkpoint_model(o.checkpoint);
  const std::vector<int> blocks = moe_blocks_of(model, "--checkpoint");
  std::optional<CheckpointModel> other;
  if (!o.compare.empty()) {
    other = load_checkpoint_model(o.compare);
    const std::vector<int> other_blocks = moe_blocks_of(*other, "--compare");
    const Index k = model.model.moe.routing.top_k, E = model.model.moe.num_experts();
    const Index k2 = other->model.moe.routing.top_k, E2 = other->model.moe.num_experts();
    if (other_blocks != blocks || k2 != k || E2 != E)
      fail("--compare", other->path.string(),
           fmt::format("has MoE blocks [{}] with top-{} of {} experts; {} has [{}] with top-{} of {}: saturation "
                       "compares the same routers at two points of training",
                       fmt::join(other_blocks, ", "), k2, E2, model.path.string(), fmt::join(blocks, ", "), k, E));
  }

  const Index n_batches = o.batches.value_or(model.config.eval_batches);
  require(n_batches >= 1 && n_batches <= 10'000, "--batches", n_batches, "must be in [1, 10000]");
  const LoadedCorpus loaded = load_corpus_or_generated(o.corpus, o.corpus_given);
  const Split split = o.split == "val" ? Split::val : Split::train;
  const CorpusSampler sampler(loaded.corpus, split, model.config.batch_size, model.config.seq_len,
                              CorpusBatchSource::kValidationSeed);
  std::vector<Batch> batches;
  for (Index i = 0; i < n_batches; ++i) batches.push_back(sampler.batch(i));
  const TokenLabels labels = batch_labels(batches, sampler.domain_names());

  const std::vector<RoutingSample> samples = route_batches(model.eval_model, model.params, batches, blocks);
  std::vector<RoutingSample> reference;
  if (other) reference = route_batches(other->eval_model, other->params, batches, blocks);
  std::vector<LayerReport> reports;
  for (std::size_t j = 0; j < blocks.size(); ++j)
    reports.push_back(analyze_layer(samples[j], labels, AnalysisOptions{}, blocks[j], other ? &reference[j] : nullptr));
  const Index tokens = samples.front().tokens();

  if (o.json) {
    json doc = {{"command", "analyze"},
                {"checkpoint", model.path.string()},
                {"step", model.step},
                {"model", model.config.model_name}};
    doc["compare"] = other ? json{{"checkpoint", other->path.string()}, {"step", other->step}} : json(nullptr);
    doc["split"] = o.split;
    doc["batches"] = n_batches;
    doc["batch_size"] = model.config.batch_size;
    doc["seq_len"] = model.config.seq_len;
    doc["tokens"] = tokens;
    doc["corpus"] = {{"path", o.corpus},
                     {"fallback", loaded.fallback},
                     {"message", loaded.message},
                     {"domains", labels.domain_names}};
    doc["moe_layers"] = blocks;
    json layers = json::array();
    for (const LayerReport& r : reports) layers.push_back(to_json(r));
    doc["layers"] = std::move(layers);
    fmt::print("{}\n", doc.dump(2));
    return;
  }
  if (loaded.fallback) fmt::print("note: {}\n", loaded.message);
  fmt::print("checkpoint {} ({}, step {}): {} {} batches of {} x {} bytes = {} tokens, {} domains\n",
             model.path.string(), model.config.model_name, model.step, n_batches, o.split, model.config.batch_size,
             model.config.seq_len, tokens, labels.domain_names.size());
  if (other) fmt::print("router saturation against {} (step {})\n", other->path.string(), other->step);
  for (const LayerReport& r : reports) {
    fmt::print("\nblock {}: top-{} of {} experts\n", r.layer, r.top_k, r.num_experts);
    print_domain_table(r);
    fmt::print("{}", wrapped(summary_text(r), 100, "  "));
  }
}

}  // namespace

void add_analyze_command(CLI::App& app) {
  auto o = std::make_shared<AnalyzeOptions>();
  CLI::App* cmd = app.add_subcommand("analyze", "What the routers of a trained checkpoint learned (OLMoE's analysis)");
  cmd->add_option("--checkpoint", o->checkpoint, "a checkpoint folder, or a run folder (its latest)")->required();
  cmd->add_option("--split", o->split, "the corpus split to read: val (default) or train");
  cmd->add_option("--batches", o->batches, "batches of the checkpoint's B x T (default: its eval_batches)");
  cmd->add_option("--corpus", o->corpus, "corpus folder from `moelab corpus` (default data/corpus)");
  cmd->add_option("--compare", o->compare, "a second checkpoint of the same run: router saturation against it");
  cmd->add_flag("--json", o->json, "print one JSON document instead of tables");
  cmd->callback([o, cmd] {
    o->corpus_given = cmd->get_option("--corpus")->count() > 0;
    run_analyze(*o);
  });
}

}  // namespace moelab::tools
