// Tests of `moelab analyze` and `moelab route --checkpoint`, run as a user runs them: a tiny model
// trained for three steps by `moelab train` on a corpus of the generated domains (made by `moelab
// corpus` from an empty root, so the same on every machine), then the built binary's exit code, its
// JSON checked value by value against the library (reference/analysis.h, model.h) and its one-line
// errors. Each test trains its own run (about a second), since ctest runs every TEST on its own.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include "tests/tools/cli.h"
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <numeric>
#include <string>
#include <vector>

#include "reference/analysis.h"
#include "reference/corpus.h"
#include "reference/files.h"
#include "reference/model.h"
#include "reference/train.h"

namespace moelab {
namespace {

namespace fs = std::filesystem;

using moelab_cli::CliResult;
CliResult moelab(const std::string& args) { return moelab_cli::run(args); }
nlohmann::json moelab_json(const std::string& args) { return moelab_cli::run_json(args); }


// A corpus of the generated domains and a run of tiny_moe trained for 3 steps of 2 x 16 bytes,
// with checkpoints after every step: DIR/corpus, DIR/run/step-00000{1,2,3}, DIR/run/latest.
class CheckpointCli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("moelab_test_cli_checkpoint_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "empty_root");
    const CliResult corpus = moelab_cli::make_small_corpus(corpus_dir(), (dir_ / "empty_root").string());
    ASSERT_EQ(corpus.exit_code, 0) << corpus.out;
    const CliResult train = moelab("train --steps 3 --batch 2 --seq 16 --checkpoint-every 1 --corpus " + corpus_dir() +
                                   " --out " + run_dir() + " --json");
    ASSERT_EQ(train.exit_code, 0) << train.out;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string corpus_dir() const { return (dir_ / "corpus").string(); }
  std::string run_dir() const { return (dir_ / "run").string(); }
  std::string step_dir(int step) const { return (dir_ / "run" / ("step-00000" + std::to_string(step))).string(); }

  fs::path dir_;
};

double row_sum(const nlohmann::json& row) {
  double s = 0;
  for (const auto& v : row) s += v.get<double>();
  return s;
}

TEST_F(CheckpointCli, AnalyzeJsonHasOneReportPerMoeBlockAndTheLibrarysValues) {
  const nlohmann::json doc = moelab_json("analyze --checkpoint " + run_dir() + " --corpus " + corpus_dir());
  ASSERT_TRUE(doc.is_object());
  EXPECT_EQ(doc["command"], "analyze");
  EXPECT_EQ(doc["checkpoint"], step_dir(3));  // the run folder's latest
  EXPECT_EQ(doc["step"], 3);
  EXPECT_EQ(doc["model"], "tiny_moe");
  EXPECT_EQ(doc["split"], "val");
  EXPECT_EQ(doc["batches"], 8);  // the checkpoint's eval_batches
  EXPECT_EQ(doc["tokens"], 8 * 2 * 16);
  EXPECT_EQ(doc["compare"], nullptr);
  EXPECT_EQ(doc["corpus"]["domains"], (nlohmann::json{"arithmetic", "counting", "embedded_en"}));
  EXPECT_EQ(doc["moe_layers"], (nlohmann::json{0, 1, 2, 3}));  // tiny_moe: every block
  ASSERT_EQ(doc["layers"].size(), 4u);

  // The same analysis through the library: the checkpoint's model on the validation sampler's batches.
  const CheckpointModel m = load_checkpoint_model(run_dir());
  const Corpus corpus = read_corpus(corpus_dir());
  const CorpusSampler sampler(corpus, Split::val, 2, 16, CorpusBatchSource::kValidationSeed);
  const Index N = 8 * 2 * 16, k = 2, E = 8;
  std::vector<RoutingSample> samples(4, RoutingSample{IndexMatrix(N, k), Matrix(N, k), E});
  TokenLabels labels;
  labels.domain_names = sampler.domain_names();
  ModelOutput out;
  for (Index i = 0; i < 8; ++i) {
    const Batch b = sampler.batch(i);
    model_forward(out, b.inputs, 2, 16, m.params, m.eval_model);
    for (int layer = 0; layer < 4; ++layer) {
      samples[static_cast<std::size_t>(layer)].ids.middleRows(i * 32, 32) =
          out.blocks[static_cast<std::size_t>(layer)].moe.routing.ids;
      samples[static_cast<std::size_t>(layer)].gates.middleRows(i * 32, 32) =
          out.blocks[static_cast<std::size_t>(layer)].moe.routing.gates;
    }
    labels.bytes.insert(labels.bytes.end(), b.inputs.begin(), b.inputs.end());
    labels.domains.insert(labels.domains.end(), b.domains.begin(), b.domains.end());
  }

  for (int layer = 0; layer < 4; ++layer) {
    SCOPED_TRACE(layer);
    const nlohmann::json& j = doc["layers"][static_cast<std::size_t>(layer)];
    EXPECT_EQ(j["layer"], layer);
    EXPECT_EQ(j["tokens"], N);
    EXPECT_EQ(j["top_k"], k);
    EXPECT_EQ(j["num_experts"], E);
    // Load: the counts of the N k assignments, and what the library counts.
    const std::vector<std::int64_t> counts = j["load"]["counts"].get<std::vector<std::int64_t>>();
    ASSERT_EQ(counts.size(), static_cast<std::size_t>(E));
    EXPECT_EQ(std::accumulate(counts.begin(), counts.end(), std::int64_t{0}), N * k);
    const LayerReport expected = analyze_layer(samples[static_cast<std::size_t>(layer)], labels, {}, layer);
    EXPECT_EQ(counts, expected.load.counts);
    EXPECT_NEAR(row_sum(j["load"]["fraction"]), 1.0, 1e-12);
    EXPECT_DOUBLE_EQ(j["load"]["max_over_mean"].get<double>(), expected.load.max_over_mean);
    EXPECT_DOUBLE_EQ(j["load"]["jain"].get<double>(), expected.load.jain);
    // The domain x expert distribution: each domain with tokens is a distribution over experts.
    const nlohmann::json& d = j["domains"];
    ASSERT_EQ(d["fraction"].size(), 3u);
    std::int64_t tokens = 0;
    for (std::size_t domain = 0; domain < 3; ++domain) {
      const std::int64_t n = d["tokens"][domain].get<std::int64_t>();
      tokens += n;
      EXPECT_NEAR(row_sum(d["fraction"][domain]), n > 0 ? 1.0 : 0.0, 1e-12) << domain;
      EXPECT_NEAR(row_sum(d["token_share"][domain]), n > 0 ? 2.0 : 0.0, 1e-12) << domain;
    }
    EXPECT_EQ(tokens, N);
    // Mutual information with its permutation baseline, vocabulary specialisation, co-activation.
    const double mi = j["domain_mi"]["nats"].get<double>();
    EXPECT_DOUBLE_EQ(mi, expected.domain_mi->nats);
    EXPECT_GE(mi, 0.0);
    EXPECT_LE(mi, j["domain_mi"]["label_entropy"].get<double>() + 1e-12);
    EXPECT_EQ(j["domain_mi_baseline"]["permutations"], 20);
    EXPECT_DOUBLE_EQ(j["vocabulary"]["mean"].get<double>(), expected.vocabulary->mean);
    EXPECT_EQ(j["saturation"], nullptr);
  }
}

TEST_F(CheckpointCli, AnalyzeComparesCheckpointsAndReadsTheTrainSplit) {
  // A checkpoint against itself: every token keeps its experts.
  const nlohmann::json same = moelab_json("analyze --checkpoint " + step_dir(3) + " --compare " + run_dir() +
                                          " --batches 2 --corpus " + corpus_dir());
  ASSERT_TRUE(same.is_object());
  EXPECT_EQ(same["compare"]["checkpoint"], step_dir(3));
  EXPECT_EQ(same["tokens"], 2 * 2 * 16);
  for (const auto& layer : same["layers"]) {
    EXPECT_EQ(layer["saturation"]["mean"], 1.0);
    EXPECT_EQ(layer["saturation"]["first_choice_agreement"], 1.0);
  }
  // Step 1 against step 3: the library's router_saturation of the same tokens.
  const nlohmann::json early = moelab_json("analyze --checkpoint " + step_dir(1) + " --compare " + step_dir(3) +
                                           " --batches 1 --corpus " + corpus_dir());
  ASSERT_TRUE(early.is_object());
  EXPECT_EQ(early["step"], 1);
  EXPECT_EQ(early["compare"]["step"], 3);
  const Corpus corpus = read_corpus(corpus_dir());
  const Batch b = CorpusSampler(corpus, Split::val, 2, 16, CorpusBatchSource::kValidationSeed).batch(0);
  const CheckpointModel m1 = load_checkpoint_model(step_dir(1)), m3 = load_checkpoint_model(step_dir(3));
  ModelOutput o1, o3;
  model_forward(o1, b.inputs, 2, 16, m1.params, m1.eval_model);
  model_forward(o3, b.inputs, 2, 16, m3.params, m3.eval_model);
  for (std::size_t layer = 0; layer < 4; ++layer) {
    const Saturation s = router_saturation(RoutingSample{o1.blocks[layer].moe.routing.ids, {}, 8},
                                           RoutingSample{o3.blocks[layer].moe.routing.ids, {}, 8});
    EXPECT_DOUBLE_EQ(early["layers"][layer]["saturation"]["mean"].get<double>(), s.mean) << layer;
  }

  const nlohmann::json train =
      moelab_json("analyze --checkpoint " + run_dir() + " --split train --batches 3 --corpus " + corpus_dir());
  ASSERT_TRUE(train.is_object());
  EXPECT_EQ(train["split"], "train");
  EXPECT_EQ(train["tokens"], 3 * 2 * 16);
}

TEST_F(CheckpointCli, AnalyzeTextShowsTheTableAndTheSummaryOfEveryBlock) {
  const CliResult r =
      moelab("analyze --checkpoint " + run_dir() + " --corpus " + corpus_dir() + " --compare " + step_dir(2));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  for (const char* s : {"checkpoint ", "(tiny_moe, step 3): 8 val batches of 2 x 16 bytes = 256 tokens, 3 domains",
                        "block 0: top-2 of 8 experts", "block 3: top-2 of 8 experts", "(uniform 25%)", "arithmetic",
                        "counting", "embedded_en", "Load: max/mean", "Jain", "dead experts", "I(domain; expert)",
                        "shuffled domains", "Vocabulary specialisation", "Most co-activated", "Router saturation"})
    EXPECT_NE(r.out.find(s), std::string::npos) << s << " missing from\n" << r.out;
  // The "all" row of each block's table: the share of all tokens per expert; the shares sum to k = 2.
  std::size_t at = 0, rows = 0;
  while ((at = r.out.find("\n  all ", at)) != std::string::npos) {
    ++at;
    ++rows;
  }
  EXPECT_EQ(rows, 4u) << r.out;
}

TEST_F(CheckpointCli, RouteGivesTheForwardsExpertsAndGatesForEveryByte) {
  const std::string text = "a+b=c\n\xc3\xa9";  // ASCII, a line end, and the two bytes of UTF-8 "é"
  const nlohmann::json doc =
      moelab_json("route --checkpoint " + run_dir() + " --text \"$(printf 'a+b=c\\n\\303\\251')\"");
  ASSERT_TRUE(doc.is_object());
  EXPECT_EQ(doc["command"], "route");
  EXPECT_EQ(doc["checkpoint"], step_dir(3));
  EXPECT_EQ(doc["moe_layers"], (nlohmann::json{0, 1, 2, 3}));
  EXPECT_EQ(doc["top_k"], 2);
  EXPECT_EQ(doc["num_experts"], 8);
  EXPECT_EQ(doc["text"], "a+b=c\n\xc3\xa9");
  ASSERT_EQ(doc["tokens"].size(), text.size());

  const CheckpointModel m = load_checkpoint_model(run_dir());
  std::vector<std::int32_t> ids;
  for (char c : text) ids.push_back(static_cast<std::uint8_t>(c));
  ModelOutput out;
  model_forward(out, ids, 1, static_cast<Index>(ids.size()), m.params, m.eval_model);
  const char* shown[] = {"a", "+", "b", "=", "c", "\\n", "\\xc3", "\\xa9"};
  for (std::size_t t = 0; t < text.size(); ++t) {
    const nlohmann::json& token = doc["tokens"][t];
    EXPECT_EQ(token["position"], t);
    EXPECT_EQ(token["byte"], ids[t]);
    EXPECT_EQ(token["char"], shown[t]);
    ASSERT_EQ(token["layers"].size(), 4u);
    for (std::size_t layer = 0; layer < 4; ++layer) {
      const nlohmann::json& l = token["layers"][layer];
      const RoutingOutput& r = out.blocks[layer].moe.routing;
      EXPECT_EQ(l["layer"], layer);
      ASSERT_EQ(l["experts"].size(), 2u);
      ASSERT_EQ(l["gates"].size(), 2u);
      for (Index j = 0; j < 2; ++j) {
        EXPECT_EQ(l["experts"][j].get<int>(), r.ids(static_cast<Index>(t), j)) << t << " " << layer;
        // float -> double -> JSON -> double -> float: the same bits.
        EXPECT_EQ(static_cast<float>(l["gates"][j].get<double>()), r.gates(static_cast<Index>(t), j))
            << t << " " << layer;
        EXPECT_EQ(l["kept"][j], true);
      }
      EXPECT_NE(l["experts"][0], l["experts"][1]);
    }
  }
  for (std::size_t layer = 0; layer < 4; ++layer) {
    const std::vector<std::int64_t> load = doc["load"][layer].get<std::vector<std::int64_t>>();
    EXPECT_EQ(std::accumulate(load.begin(), load.end(), std::int64_t{0}), 2 * static_cast<std::int64_t>(text.size()));
  }

  // The table: a header, then one line per byte with k = 2 "expert (gate)" pairs per MoE block.
  const CliResult r = moelab("route --checkpoint " + step_dir(3) + " --text \"$(printf 'a+b=c\\n\\303\\251')\"");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const std::size_t header = r.out.find("  pos  byte");
  ASSERT_NE(header, std::string::npos) << r.out;
  std::vector<std::string> lines;
  for (std::size_t at = r.out.find('\n', header) + 1; at < r.out.size();) {
    const std::size_t end = r.out.find('\n', at);
    lines.push_back(r.out.substr(at, end - at));
    at = end + 1;
  }
  ASSERT_EQ(lines.size(), text.size()) << r.out;
  for (std::size_t t = 0; t < lines.size(); ++t) {
    EXPECT_NE(lines[t].find(std::string("'") + shown[t] + "'"), std::string::npos) << lines[t];
    std::size_t pairs = 0;
    for (std::size_t at = 0; (at = lines[t].find(" (0.", at)) != std::string::npos; ++at) ++pairs;
    for (std::size_t at = 0; (at = lines[t].find(" (1.", at)) != std::string::npos; ++at) ++pairs;
    EXPECT_EQ(pairs, 4u * 2u) << lines[t];
    const std::string first = fmt::format("{:>2} ({:.3f})", out.blocks[0].moe.routing.ids(static_cast<Index>(t), 0),
                                          out.blocks[0].moe.routing.gates(static_cast<Index>(t), 0));
    EXPECT_NE(lines[t].find(first), std::string::npos) << first << " missing from " << lines[t];
  }
}

TEST_F(CheckpointCli, BadCheckpointsAndFlagsAreOneLineErrors) {
  const fs::path broken = dir_ / "broken";
  fs::copy(step_dir(3), broken);
  fs::remove(broken / "model.safetensors");
  const fs::path empty = dir_ / "empty_root";  // an empty folder
  const std::string missing = (dir_ / "no_such_run").string();
  const struct {
    std::string args;
    std::string message;
  } cases[] = {
      {"analyze --checkpoint " + missing, "moelab analyze: error: " + missing + ": no such folder"},
      {"analyze --checkpoint " + empty.string(), empty.string() + ": no checkpoint here"},
      {"analyze --checkpoint " + broken.string(), (broken / "model.safetensors").string() + ": missing"},
      {"analyze --checkpoint " + run_dir() + " --compare " + missing, missing + ": no such folder"},
      {"analyze --checkpoint " + run_dir() + " --split test", "--split = test: must be val or train"},
      {"analyze --checkpoint " + run_dir() + " --batches 0 --corpus " + corpus_dir(),
       "--batches = 0: must be in [1, 10000]"},
      {"analyze --checkpoint " + run_dir() + " --corpus " + missing, "manifest.json"},
      {"analyze", "--checkpoint is required"},
      {"route --checkpoint " + missing + " --text hi", "moelab route: error: " + missing + ": no such folder"},
      {"route --checkpoint " + broken.string() + " --text hi", (broken / "model.safetensors").string() + ": missing"},
      {"route --checkpoint " + run_dir() + " --preset mixtral --text hi",
       "--checkpoint = " + run_dir() + ": goes without --preset"},
      {"route --checkpoint " + run_dir(), "--text = \"\": must hold at least one byte"},
      {"route --checkpoint " + run_dir() + " --text hi --tokens 3", "--tokens = (given): goes with --preset"},
      {"route --checkpoint " + run_dir() + " --text hi --dtype fp64", "--dtype = \"fp64\": must be one of"},
      {"route --preset mixtral --text hi", "--text = hi: goes with --checkpoint"},
      {"route", "--preset is required: route a preset's layer (--preset NAME) or a trained model (--checkpoint DIR"},
  };
  for (const auto& c : cases) {
    const CliResult r = moelab(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << ": " << r.out;
    EXPECT_NE(r.out.find(c.message), std::string::npos) << c.args << ": " << r.out;
    EXPECT_EQ(r.out.find('\n'), r.out.size() - 1) << "not one line: " << c.args << ": " << r.out;
  }
}

}  // namespace
}  // namespace moelab
