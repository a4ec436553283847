// Tests of the `moelab` command line, run as a user runs it: the built binary, its exit code,
// its stdout (JSON parsed and checked value by value) and its one-line errors.
#include <gtest/gtest.h>

#include "tests/tools/cli.h"
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <unistd.h>
#include <nlohmann/json.hpp>
#include <string>

namespace {

using moelab_cli::CliResult;
CliResult moelab(const std::string& args) { return moelab_cli::run(args); }
nlohmann::json moelab_json(const std::string& args) { return moelab_cli::run_json(args); }


TEST(Cli, NumericsTableListsEveryFormat) {
  const CliResult r = moelab("numerics");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  for (const char* name : {"fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "65504", "448", "57344", "88.72"})
    EXPECT_NE(r.out.find(name), std::string::npos) << name << " missing from\n" << r.out;
}

TEST(Cli, NumericsJsonHasTheFacts) {
  const nlohmann::json doc = moelab_json("numerics");
  ASSERT_EQ(doc["formats"].size(), 5u);
  const nlohmann::json& fp16 = doc["formats"][2];
  EXPECT_EQ(fp16["name"], "fp16");
  EXPECT_EQ(fp16["max"], 65504.0);
  EXPECT_NEAR(fp16["max_exp_input"].get<double>(), 11.09, 0.005);
  EXPECT_EQ(doc["formats"][3]["has_inf"], false);
  EXPECT_EQ(moelab_json("numerics --dtype e5m2")["formats"][0]["max"], 57344.0);
}

TEST(Cli, NumericsSoftmaxOverflowInBf16) {
  const nlohmann::json doc = moelab_json("numerics --logits 128.5,1,0 --dtype bf16");
  EXPECT_EQ(doc["dtype"], "bf16");
  EXPECT_EQ(doc["rounded_logits"][0], 128.0);  // 128.5 rounds to 128 in bf16
  EXPECT_EQ(doc["naive"]["exps"][0], "inf");
  EXPECT_EQ(doc["naive"]["probs"][0], "nan");
  EXPECT_EQ(doc["naive"]["overflowed"], true);
  EXPECT_EQ(doc["stable"]["probs"][0], 1.0);
  EXPECT_EQ(doc["stable"]["probs"][1], 0.0);
  EXPECT_EQ(doc["stable"]["overflowed"], false);
  const CliResult text = moelab("numerics --logits 128.5,1,0 --dtype bf16");
  EXPECT_NE(text.out.find("OVERFLOW"), std::string::npos) << text.out;
}

TEST(Cli, NumericsValueShowsTheFields) {
  const nlohmann::json doc = moelab_json("numerics --value 128.5 --dtype bf16");
  const nlohmann::json& v = doc["values"][0];
  EXPECT_EQ(v["stored"], 128.0);
  EXPECT_EQ(v["bits"], "0x4300");
  EXPECT_EQ(v["exponent"], 134);
  EXPECT_EQ(v["spacing"], 1.0);
}

TEST(Cli, PresetsListsEveryPresetWithItsConvention) {
  const nlohmann::json doc = moelab_json("presets");
  ASSERT_EQ(doc["presets"].size(), 13u);
  const nlohmann::json& v3 = doc["presets"][7];
  EXPECT_EQ(v3["name"], "deepseek_v3");
  EXPECT_EQ(v3["full"]["num_experts"], 256);
  EXPECT_EQ(v3["full"]["gating"]["routed_scaling_factor"], 2.5);
  EXPECT_EQ(v3["tiny"]["num_experts"], 16);
  EXPECT_NE(v3["source"].get<std::string>().find("DeepSeek-V3"), std::string::npos);
  const CliResult text = moelab("presets");
  EXPECT_NE(text.out.find("softmax_of_selected_logits"), std::string::npos) << text.out;
}

TEST(Cli, RouteIsDeterministicAndConsistent) {
  const nlohmann::json a = moelab_json("route --preset mixtral --tokens 5 --seed 3");
  const nlohmann::json b = moelab_json("route --preset mixtral --tokens 5 --seed 3");
  EXPECT_EQ(a, b);  // the same seed, the same bits
  ASSERT_EQ(a["ids"].size(), 5u);
  ASSERT_EQ(a["ids"][0].size(), 2u);
  std::int64_t pairs = 0;
  for (const auto& load : a["load"]) pairs += load.get<std::int64_t>();
  EXPECT_EQ(pairs, 10);
  for (const auto& gates : a["gates"])  // Mixtral: softmax over the two selected logits
    EXPECT_NEAR(gates[0].get<double>() + gates[1].get<double>(), 1.0, 1e-6);
  EXPECT_NE(moelab_json("route --preset mixtral --tokens 5 --seed 4")["ids"], a["ids"]);
  const nlohmann::json bf16 = moelab_json("route --preset deepseek_v3 --tokens 4 --dtype bf16");
  EXPECT_EQ(bf16["config"]["router"]["dtype"], "bf16");
  EXPECT_GT(bf16["aux_loss"].get<double>(), 0.0);
}

TEST(Cli, LayerRunsForwardAndBackwardAndReportsDrops) {
  nlohmann::json dropless = moelab_json("layer --preset qwen2_moe --tokens 12 --seed 2");
  nlohmann::json again = moelab_json("layer --preset qwen2_moe --tokens 12 --seed 2");
  dropless.erase("timing");  // seconds differ from run to run; everything else is seeded
  again.erase("timing");
  EXPECT_EQ(dropless, again);
  EXPECT_EQ(dropless["config"]["shared_experts"], 1);
  EXPECT_EQ(dropless["config"]["shared_gated"], true);
  std::int64_t rows = 0, dropped = 0;
  for (const auto& n : dropless["load"]) rows += n.get<std::int64_t>();
  for (const auto& n : dropless["dropped"]) dropped += n.get<std::int64_t>();
  EXPECT_EQ(rows, 12 * 4);  // dropless: every token's 4 experts
  EXPECT_EQ(dropped, 0);
  EXPECT_GT(dropless["gradient_norms"]["router"].get<double>(), 0.0);
  EXPECT_GT(dropless["gradient_norms"]["shared_gate"].get<double>(), 0.0);
  const nlohmann::json capped = moelab_json("layer --preset qwen2_moe --tokens 12 --seed 2 --capacity-factor 0.5");
  rows = dropped = 0;
  for (const auto& n : capped["load"]) rows += n.get<std::int64_t>();
  for (const auto& n : capped["dropped"]) dropped += n.get<std::int64_t>();
  EXPECT_GT(dropped, 0);
  EXPECT_EQ(rows + dropped, 12 * 4);  // every pair is either computed or dropped
  const nlohmann::json llama4 = moelab_json("layer --preset llama4 --tokens 4");
  EXPECT_EQ(llama4["config"]["gate_placement"], "input");
}

TEST(Cli, BadInputIsOneLineAndExitCode2) {
  const struct {
    const char* args;
    const char* message;
  } cases[] = {
      {"numerics --dtype fp12", "moelab numerics: error: --dtype = \"fp12\": must be one of"},
      {"numerics --logits 1,,2", "item 2 is empty"},
      {"numerics --logits 1,x", "item 2 (\"x\") is not a float32 number"},
      {"numerics --logits ''", "item 1 is empty"},
      {"numerics --logits 1 --dtype int4", "--dtype = \"int4\""},
      {"numerics --bogus", "--bogus"},
      {"", "A subcommand is required"},
      {"route --preset nope", "preset = \"nope\": is not a known preset"},
      {"route", "--preset is required"},
      {"route --preset mixtral --tokens 0", "--tokens = 0: must be in [1, 1000000]"},
      {"route --preset mixtral --dtype fp8", "router"},
      {"layer --preset mixtral --capacity-factor 0", "capacity_factor = 0"},
      {"layer --preset mixtral --tokens 0", "--tokens = 0"},
  };
  for (const auto& c : cases) {
    const CliResult r = moelab(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << ": " << r.out;
    EXPECT_NE(r.out.find(c.message), std::string::npos) << c.args << ": " << r.out;
    EXPECT_EQ(r.out.find('\n'), r.out.size() - 1) << c.args << ": not one line: " << r.out;
  }
}

}  // namespace

TEST(Cli, ParamsCountsDeepSeekV3AndSaysWhyItDoesNotFitA24GBCard) {
  const nlohmann::json doc = moelab_json("params --preset deepseek_v3");
  EXPECT_EQ(doc["command"], "params");
  EXPECT_EQ(doc["preset"], "deepseek_v3");
  EXPECT_EQ(doc["total_params"].get<std::int64_t>(), 671'026'419'200);
  EXPECT_EQ(doc["active_params"].get<std::int64_t>(), 36'625'618'432);
  EXPECT_EQ(doc["per_unit"]["expert_params"].get<std::int64_t>(), 44'040'192);
  EXPECT_EQ(doc["layers"]["moe"], 58);
  EXPECT_EQ(doc["layers"]["dense_ffn"], 3);
  EXPECT_EQ(doc["parts"]["routed_experts"]["total"].get<std::int64_t>(), 58LL * 256 * 44'040'192);
  EXPECT_EQ(doc["parts"]["routed_experts"]["active"].get<std::int64_t>(), 58LL * 8 * 44'040'192);
  EXPECT_EQ(doc["sizes"]["q_lora_rank"], 1536);
  EXPECT_EQ(doc["sizes"]["attention"], "mla");
  EXPECT_EQ(doc["mtp"]["params"].get<std::int64_t>(), 11'610'068'224);
  EXPECT_EQ(doc["published"]["total_params"], 671e9);
  EXPECT_EQ(doc["memory_bytes"]["fp8"].get<std::int64_t>(), 671'026'419'200);
  EXPECT_EQ(doc["memory_bytes"]["int4"].get<std::int64_t>(), 335'513'209'600);
  EXPECT_EQ(doc["fits_24gb"]["int4_with_scales"], false);
  EXPECT_EQ(doc["flops"]["context_length"], 4096);
  const nlohmann::json longer = moelab_json("params --preset deepseek_v3 --context 8192");
  EXPECT_EQ(longer["flops"]["attention_per_token"].get<std::int64_t>(),
            2 * doc["flops"]["attention_per_token"].get<std::int64_t>());
  EXPECT_EQ(longer["flops"]["per_token"], doc["flops"]["per_token"]);
  const CliResult text = moelab("params --preset deepseek_v3");
  ASSERT_EQ(text.exit_code, 0) << text.out;
  for (const char* s : {"671,026,419,200", "58 x 256 x 44,040,192", "671.0 GB", "335.5 GB", "A 24 GB card cannot hold",
                        "multi-token prediction"})
    EXPECT_NE(text.out.find(s), std::string::npos) << s << " missing from\n" << text.out;
}

TEST(Cli, ParamsForEveryCountablePresetAndItsErrors) {
  const nlohmann::json mixtral = moelab_json("params --preset mixtral");
  EXPECT_EQ(mixtral["total_params"].get<std::int64_t>(), 46'702'792'704);
  EXPECT_EQ(mixtral["active_params_with_embedding"].get<std::int64_t>(), 12'879'925'248);
  EXPECT_EQ(mixtral["published"]["active_counts_embedding"], true);
  EXPECT_EQ(moelab_json("params --preset olmoe")["fits_24gb"]["bf16"], true);
  EXPECT_TRUE(moelab_json("params --preset gpu_mode_amd")["published"].is_null());
  for (const char* p : {"switch", "qwen2_moe", "qwen3_moe", "deepseek_v2", "llama4", "gpt_oss"}) {
    const CliResult r = moelab(std::string("params --preset ") + p);
    EXPECT_EQ(r.exit_code, 0) << p << ": " << r.out;
    EXPECT_NE(r.out.find("published:"), std::string::npos) << p << ": " << r.out;
  }
  const struct {
    const char* args;
    const char* message;
  } cases[] = {
      {"params --preset nope", "moelab params: error: preset = \"nope\": is not a known preset"},
      {"params --preset gshard", "preset = \"gshard\": has no published checkpoint"},
      {"params --preset hash --json", "preset = \"hash\": has no published checkpoint"},
      {"params", "--preset is required"},
      {"params --preset mixtral --context 0", "--context = 0: must be at least 1"},
  };
  for (const auto& c : cases) {
    const CliResult r = moelab(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << ": " << r.out;
    EXPECT_NE(r.out.find(c.message), std::string::npos) << c.args << ": " << r.out;
    EXPECT_EQ(r.out.find('\n'), r.out.size() - 1) << c.args << ": not one line: " << r.out;
  }
}

// `moelab golden` and `moelab check` as a kernel author runs them: write a subset, check the
// float32 reference against it (exit 0), break an expected value (exit 1, the tensor named), break a
// file (exit 2, one line).
TEST(Cli, GoldenWritesAndCheckJudges) {
  const std::string dir = "/tmp/moelab_test_cli_golden_" + std::to_string(::getpid());
  std::system(("rm -rf " + dir).c_str());
  const CliResult written = moelab("golden --out " + dir + " --filter 'losses.*'");
  ASSERT_EQ(written.exit_code, 0) << written.out;
  EXPECT_NE(written.out.find("8 cases written"), std::string::npos) << written.out;

  const nlohmann::json ok = moelab_json("check --golden " + dir + " --impl cpu");
  EXPECT_EQ(ok["passed"], 8);
  EXPECT_EQ(ok["failed"], 0);
  EXPECT_EQ(ok["cases"][0]["verdict"], "pass");
  EXPECT_LT(ok["cases"][0]["worst"].get<double>(), 1.0);

  // Tighten one tolerance to zero: the float32 loss cannot meet it.
  nlohmann::json manifest;
  std::ifstream(dir + "/manifest.json") >> manifest;
  for (nlohmann::json& check : manifest["cases"][0]["checks"])
    if (check["tensor"] == "output.loss") check["atol"] = check["rtol"] = 0.0;
  std::ofstream(dir + "/manifest.json") << manifest.dump();
  const CliResult failed = moelab("check --golden " + dir + " --impl cpu --filter " +
                                  manifest["cases"][0]["name"].get<std::string>());
  EXPECT_EQ(failed.exit_code, 1) << failed.out;
  EXPECT_NE(failed.out.find("output.loss"), std::string::npos) << failed.out;
  EXPECT_NE(failed.out.find("1 failed"), std::string::npos) << failed.out;

  std::ofstream(dir + "/" + manifest["cases"][1]["file"].get<std::string>(), std::ios::binary) << "not a file";
  const CliResult broken = moelab("check --golden " + dir + " --impl cpu");
  EXPECT_EQ(broken.exit_code, 2) << broken.out;
  const std::size_t error = broken.out.find("moelab check: error: ");
  ASSERT_NE(error, std::string::npos) << broken.out;  // after the rows of the cases before it
  EXPECT_NE(broken.out.find(".safetensors: header length", error), std::string::npos) << broken.out;
  EXPECT_EQ(broken.out.find('\n', error), broken.out.size() - 1) << "not one line: " << broken.out;

  const CliResult none = moelab("check --golden " + dir + " --filter 'nothing*'");
  EXPECT_EQ(none.exit_code, 2) << none.out;
  EXPECT_NE(none.out.find("--filter = nothing*: matches no case"), std::string::npos) << none.out;
  const CliResult impl = moelab("check --golden " + dir + " --impl tpu");
  EXPECT_NE(impl.out.find("--impl = tpu: must be cpu or cuda"), std::string::npos) << impl.out;
  std::system(("rm -rf " + dir).c_str());
}

TEST(Cli, CheckWithCudaNeedsAGpu) {
  // Without a GPU (or without CUDA in the build) --impl cuda stops with one line that says why; with
  // one, the conversion kernels pass their cases bit for bit.
  const CliResult r = moelab("check --golden " + std::string(MOELAB_SOURCE_DIR) + "/golden --impl cuda --filter 'numerics.encode.*'");
  if (r.exit_code == 0) {
    EXPECT_NE(r.out.find("4 passed"), std::string::npos) << r.out;
  } else {
    EXPECT_EQ(r.exit_code, 2) << r.out;
    EXPECT_NE(r.out.find("--impl = cuda"), std::string::npos) << r.out;
  }
}

// `moelab corpus` as tools/setup.sh runs it. Whatever this machine has installed (the fortunes
// packages, or nothing: then the generated domains), it writes a corpus whose files match the
// manifest, and a second run writes nothing.
TEST(Cli, CorpusWritesTheDomainsAndIsIdempotent) {
  const std::string dir = "/tmp/moelab_test_cli_corpus_" + std::to_string(::getpid());
  std::system(("rm -rf " + dir).c_str());
  const std::string args = "corpus --out " + dir + " --max-domain-bytes 65536";
  const nlohmann::json first = moelab_json(args);
  EXPECT_EQ(first["command"], "corpus");
  EXPECT_EQ(first["written"], true);
  const nlohmann::json& manifest = first["manifest"];
  EXPECT_EQ(manifest["format"], "moelab-corpus");
  EXPECT_EQ(manifest["val_percent"], 10);
  bool arithmetic = false;
  for (const auto& d : manifest["domains"]) {
    const std::int64_t train = d["bytes"]["train"].get<std::int64_t>(), val = d["bytes"]["val"].get<std::int64_t>();
    EXPECT_LE(train + val, 65536) << d["name"];
    EXPECT_GT(d["documents"]["train"].get<std::int64_t>(), 0) << d["name"];
    std::ifstream file(dir + "/" + d["files"]["train"]["path"].get<std::string>(), std::ios::binary | std::ios::ate);
    EXPECT_EQ(static_cast<std::int64_t>(file.tellg()), train) << d["name"];
    arithmetic = arithmetic || d["name"] == "arithmetic";
  }
  EXPECT_TRUE(arithmetic);
  if (manifest["fallback"] == true) {  // nothing installed: the generated domains only
    EXPECT_EQ(manifest["domains"][1]["name"], "counting");
  }
  std::ifstream on_disk(dir + "/manifest.json");
  EXPECT_EQ(nlohmann::json::parse(on_disk), manifest);

  const nlohmann::json second = moelab_json(args);
  EXPECT_EQ(second["written"], false);
  EXPECT_EQ(second["manifest"], manifest);
  const CliResult text = moelab(args);
  ASSERT_EQ(text.exit_code, 0) << text.out;
  for (const char* s : {"unchanged", "arithmetic", "train bytes", "total"})
    EXPECT_NE(text.out.find(s), std::string::npos) << s << " missing from\n" << text.out;

  const struct {
    const char* args;
    const char* message;
  } cases[] = {
      {"corpus", "--out is required"},
      {"corpus --out /tmp/x --val-percent 60", "moelab corpus: error: --val-percent = 60: must be in [0, 50]"},
      {"corpus --out /tmp/x --max-domain-bytes 10", "--max-domain-bytes = 10: must be in [1024, 1073741824]"},
      {"corpus --out /proc/moelab/corpus", "/proc/moelab"},
  };
  for (const auto& c : cases) {
    const CliResult r = moelab(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << ": " << r.out;
    EXPECT_NE(r.out.find(c.message), std::string::npos) << c.args << ": " << r.out;
    EXPECT_EQ(r.out.find('\n'), r.out.size() - 1) << c.args << ": not one line: " << r.out;
  }
  std::system(("rm -rf " + dir).c_str());
}

// `moelab train` end to end on whatever corpus is at hand (in the test folder: none, so the
// generated domains): a run folder with metrics and a checkpoint, a resumed run, and one-line errors.
TEST(Cli, TrainWritesARunAndResumesIt) {
  const std::string dir = "/tmp/moelab_test_cli_train_" + std::to_string(::getpid());
  std::system(("rm -rf " + dir).c_str());
  const nlohmann::json doc = moelab_json("train --steps 3 --batch 2 --seq 16 --out " + dir);
  EXPECT_EQ(doc["command"], "train");
  EXPECT_EQ(doc["model"], "tiny_moe");
  EXPECT_EQ(doc["steps"], 3);
  EXPECT_EQ(doc["checkpoint"], dir + "/step-000003");
  EXPECT_TRUE(doc["resumed_from"].is_null());
  EXPECT_GT(doc["unigram_baseline"].get<double>(), 0.0);
  EXPECT_GT(doc["val_loss"].get<double>(), 0.0);
  EXPECT_EQ(doc["config"]["batch_size"], 2);
  EXPECT_EQ(doc["specialisation_bits"].size(), 4u);  // tiny_moe: every block is MoE
  for (const char* f : {"/metrics.jsonl", "/latest", "/step-000003/model.safetensors", "/step-000003/optimizer.safetensors",
                        "/step-000003/config.json", "/step-000003/trainer_state.json"})
    EXPECT_TRUE(std::ifstream(dir + f).good()) << f;
  std::ifstream metrics(dir + "/metrics.jsonl");
  int lines = 0;
  for (std::string line; std::getline(metrics, line);) {
    const nlohmann::json j = nlohmann::json::parse(line);
    EXPECT_TRUE(j["name"] == "train_step" || j["name"] == "eval") << line;
    ++lines;
  }
  EXPECT_EQ(lines, 4);  // 3 steps and the evaluation after the last

  const nlohmann::json resumed = moelab_json("train --resume " + dir + " --steps 4");
  EXPECT_EQ(resumed["resumed_from"], 3);
  EXPECT_EQ(resumed["steps"], 4);
  EXPECT_EQ(resumed["steps_this_run"], 1);
  EXPECT_EQ(resumed["checkpoint"], dir + "/step-000004");

  const struct {
    std::string args;
    const char* message;
  } cases[] = {
      {"train --balance sideways", "moelab train: error: --balance = sideways: must be one of preset, aux, aux_free, none"},
      {"train --steps 0 --out " + dir + "_x", "steps = 0: must be positive"},
      {"train --preset tiny_dense --balance aux_free --out " + dir + "_x", "has no MoE block"},
      {"train --preset nonesuch", "is not a known model configuration"},
      {"train --steps 2 --out " + dir, "already holds a run"},
      {"train --resume " + dir + " --seed 3", "--seed = (given): comes from the checkpoint"},
      {"train --resume " + dir + "_nothing", "no such folder"},
      {"train --corpus " + dir + "_no_corpus --out " + dir + "_x", "manifest.json"},
      {"train --steps", "--steps"},
  };
  for (const auto& c : cases) {
    const CliResult r = moelab(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << ": " << r.out;
    EXPECT_NE(r.out.find(c.message), std::string::npos) << c.args << ": " << r.out;
    EXPECT_EQ(r.out.find('\n'), r.out.size() - 1) << c.args << ": not one line: " << r.out;
  }
  std::system(("rm -rf " + dir + " " + dir + "_x").c_str());
}
