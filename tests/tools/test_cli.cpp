// Tests of the `moelab` command line, run as a user runs it: the built binary, its exit code,
// its stdout (JSON parsed and checked value by value) and its one-line errors.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

namespace {

struct CliResult {
  int exit_code;
  std::string out;  // stdout and stderr together
};

CliResult moelab(const std::string& args) {
  const std::string command = std::string(MOELAB_BINARY_DIR) + "/bin/moelab " + args + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return {-1, "popen failed"};
  std::string out;
  std::array<char, 4096> buffer{};
  while (std::fgets(buffer.data(), buffer.size(), pipe) != nullptr) out += buffer.data();
  const int status = pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

nlohmann::json moelab_json(const std::string& args) {
  const CliResult r = moelab(args + " --json");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  return nlohmann::json::parse(r.out);
}

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
  };
  for (const auto& c : cases) {
    const CliResult r = moelab(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << ": " << r.out;
    EXPECT_NE(r.out.find(c.message), std::string::npos) << c.args << ": " << r.out;
    EXPECT_EQ(r.out.find('\n'), r.out.size() - 1) << c.args << ": not one line: " << r.out;
  }
}

}  // namespace
