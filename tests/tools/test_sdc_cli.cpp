// Tests of `moelab sdc`, run as a user runs it: the built binary on an initialised model
// (--checkpoint random) and a corpus of the generated domains (made by `moelab corpus` from an empty
// root, so the same on every machine): its JSON, its determinism, the control without flips, the
// trace of one flip, and its one-line errors.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "tests/tools/cli.h"

namespace {

namespace fs = std::filesystem;

using moelab_cli::CliResult;
CliResult moelab(const std::string& args) { return moelab_cli::run(args); }
nlohmann::json moelab_json(const std::string& args) { return moelab_cli::run_json(args); }

class SdcCli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("moelab_test_sdc_cli_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "empty_root");
    const CliResult corpus = moelab_cli::make_small_corpus(corpus_dir(), (dir_ / "empty_root").string());
    ASSERT_EQ(corpus.exit_code, 0) << corpus.out;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string corpus_dir() const { return (dir_ / "corpus").string(); }
  // A small study of the initialised tiny_moe: 1 x 16 validation bytes.
  std::string study(const std::string& more) const {
    return "sdc --checkpoint random --batch 1 --seq 16 --corpus " + corpus_dir() + " " + more;
  }

  fs::path dir_;
};

TEST_F(SdcCli, JsonHasEveryCellTheRatiosAndTheLockstepCost) {
  const std::string args = study(
      "--site router_logits,router_weights,expert_outputs,expert_weights --dtype bf16 --bits exponent,mantissa "
      "--trials 3 --lockstep --threads 1");
  const nlohmann::json doc = moelab_json(args);
  ASSERT_TRUE(doc.is_object());
  EXPECT_EQ(doc["command"], "sdc");
  EXPECT_EQ(doc["checkpoint"], "random");
  EXPECT_EQ(doc["model"], "tiny_moe");
  EXPECT_EQ(doc["tokens"], 16);
  EXPECT_EQ(doc["moe_layers"], (nlohmann::json{0, 1, 2, 3}));
  EXPECT_EQ(doc["flips"], 1);
  ASSERT_EQ(doc["cells"].size(), 4u * 2u);
  for (const nlohmann::json& cell : doc["cells"]) {
    EXPECT_EQ(cell["dtype"], "bf16");
    ASSERT_EQ(cell["trials"].size(), 3u);
    EXPECT_EQ(cell["summary"]["trials"], 3);
    const bool weight = cell["site"] == "router_weights" || cell["site"] == "expert_weights";
    EXPECT_EQ(cell["kind"], weight ? "weight" : "transient");
    for (const nlohmann::json& t : cell["trials"]) {
      EXPECT_EQ(t["site"], cell["site"]);
      EXPECT_EQ(t["bit_class"], cell["bits"]);
      EXPECT_TRUE(t["applied"].get<bool>());
      // Only the router's own transient faults can be seen by a second router.
      if (cell["site"] != "router_logits") {
        EXPECT_EQ(t["lockstep_detected"], false) << t.dump();
      }
    }
  }
  ASSERT_EQ(doc["ratios"].size(), 2u * 2u);  // bits x (transient, weight)
  EXPECT_EQ(doc["ratios"][0]["kind"], "transient");
  EXPECT_EQ(doc["lockstep_cost"]["router_flops_per_token"], 4 * 2 * 64 * 8);

  // The same seed gives the same document, whatever the thread count.
  const std::string two_threads = args.substr(0, args.size() - std::string("--threads 1").size()) + "--threads 2";
  EXPECT_EQ(moelab_json(two_threads), doc);
  const nlohmann::json other = moelab_json(args + " --seed 1");
  EXPECT_NE(other["cells"], doc["cells"]);
}

TEST_F(SdcCli, ZeroFlipsChangeNothing) {
  const nlohmann::json doc = moelab_json(study("--site all --bits exponent --dtype fp32,fp8_e4m3 --trials 2 --flips 0"));
  ASSERT_EQ(doc["cells"].size(), 8u * 2u);
  for (const nlohmann::json& cell : doc["cells"]) {
    EXPECT_EQ(cell["summary"]["effect"], 0) << cell["site"];
    EXPECT_EQ(cell["summary"]["logit_rel_error"]["max"], 0.0) << cell["site"];
    EXPECT_EQ(cell["summary"]["selections_changed"]["max"], 0.0) << cell["site"];
  }
}

TEST_F(SdcCli, TextShowsTheTableTheRatiosAndTheCost) {
  const CliResult r = moelab(study("--site router_logits,expert_outputs --dtype fp32 --bits sign --trials 2"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  for (const char* s : {"router_logits", "expert_outputs", "router / expert damage", "lockstep (the router computed "
                        "twice) costs 4096 FLOPs per token"})
    EXPECT_NE(r.out.find(s), std::string::npos) << s << " missing from\n" << r.out;
}

// One flip traced: the byte's own routing in the faulted block takes the flipped expert exactly
// when its logit was positive (it becomes 2^128 times larger), and the bytes before it cannot change
// (causal attention).
TEST_F(SdcCli, TraceShowsEveryBytesExpertsBeforeAndAfter) {
  const nlohmann::json doc = moelab_json(
      "sdc --checkpoint random --trace --site router_logits --dtype fp32 --bit 30 --text \"hello world\" --layer 1 "
      "--token 4 --col 6");
  ASSERT_TRUE(doc.is_object());
  EXPECT_EQ(doc["trace"], true);
  EXPECT_EQ(doc["fault"]["site"], "router_logits");
  EXPECT_EQ(doc["fault"]["bit_class"], "exponent");
  EXPECT_EQ(doc["fault"]["applied"], true);
  ASSERT_EQ(doc["tokens"].size(), 11u);
  const double value = doc["fault"]["value"].get<double>();
  const nlohmann::json& own = doc["tokens"][4]["layers"][1]["experts_after"];
  const bool took = std::find(own.begin(), own.end(), 6) != own.end();
  EXPECT_EQ(took, value > 0) << doc["tokens"][4].dump();
  for (int t = 0; t < 4; ++t)
    for (const nlohmann::json& layer : doc["tokens"][t]["layers"])
      EXPECT_EQ(layer["experts_after"], layer["experts_before"]) << t;
  const CliResult text = moelab(
      "sdc --checkpoint random --trace --site router_logits --dtype fp32 --bit 30 --text \"hello world\" --layer 1 "
      "--token 4 --col 6");
  ASSERT_EQ(text.exit_code, 0) << text.out;
  EXPECT_NE(text.out.find("<- faulted byte"), std::string::npos) << text.out;
}

TEST_F(SdcCli, BadInputIsOneLineNamingTheField) {
  const std::string trace = "sdc --checkpoint random --trace --site router_logits --dtype fp32 --text hi ";
  const struct {
    std::string args;
    std::string message;
  } cases[] = {
      {"sdc", "--checkpoint is required"},
      {"sdc --checkpoint " + (dir_ / "missing").string(), (dir_ / "missing").string() + ": no such folder"},
      {study("--site bogus"), "moelab sdc: error: --site = \"bogus\": must be one of router_input"},
      {study("--dtype fp64"), "--dtype = \"fp64\": must be one of"},
      {study("--dtype fp8_e4m3 --bits 9"), "--bits = 9: must be in [0, 8) for fp8_e4m3"},
      {study("--bits top"), "--bits = \"top\": must be sign, exponent, mantissa, any or a bit position"},
      {study("--trials 0"), "--trials = 0: must be in [1, 1000000]"},
      {study("--flips 2"), "--flips = 2: must be 1 (one bit flip per trial) or 0"},
      {study("--layer 7"), "--layer = 7: must be an MoE block of the model"},
      {study("--text hi"), "--text = (given): goes with --trace"},
      {"sdc --checkpoint random --preset nope", "--preset = \"nope\": is not a model configuration"},
      {"sdc --checkpoint random --preset tiny_dense", "--checkpoint = (a dense model): has no MoE block"},
      {trace, "--bit = (missing): --trace flips one bit"},
      {trace + "--bit 30 --col 8", "--col = 8: must be in [0, 8) for router_logits (the experts)"},
      {trace + "--bit 32", "--bit = 32: must be in [0, 32) for fp32"},
      {trace + "--bit 30 --trials 3", "--trials = (given): goes with the study"},
  };
  for (const auto& c : cases) {
    const CliResult r = moelab(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << ": " << r.out;
    EXPECT_NE(r.out.find(c.message), std::string::npos) << c.args << ": " << r.out;
    EXPECT_EQ(r.out.find('\n'), r.out.size() - 1) << "not one line: " << c.args << ": " << r.out;
  }
}

}  // namespace
