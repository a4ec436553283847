// Tests of `moelab bench`, run as a user runs it: the built binary, its exit code and its one-line
// errors. Bad input is refused (exit 2) before anything touches a GPU, so these run everywhere;
// where the bench cannot run (built without CUDA, no GPU) it says why on one line and exits 1; on
// a GPU, a small run writes its JSON. Speed itself is never asserted here.
#include <gtest/gtest.h>

#include "tests/tools/cli.h"
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

namespace {

using moelab_cli::CliResult;
CliResult moelab(const std::string& args) { return moelab_cli::run(args); }

// Each bad argument gives exit code 2 and one line naming the option, the value and the rule,
// whether or not this machine has a GPU or this build has CUDA.
TEST(BenchCli, BadInputIsOneLineAndExitCode2) {
  const struct {
    const char* args;
    const char* message;
  } cases[] = {
      {"bench", "moelab bench: error: --impl = (missing): is required unless --model is given: cuda"},
      {"bench --model tiny_moe --impl cuda", "--model = tiny_moe: cannot go with --impl"},
      {"bench --model tiny", "--model = tiny: must be one of tiny_moe, tiny_dense, switch"},
      {"bench --model tiny_moe --repeats 0", "--repeats = 0: must be in [1, 10000]"},
      {"bench --model tiny_moe --warmup -1", "--warmup = -1: must be in [0, 1000]"},
      {"bench --model tiny_moe --threads 1000", "--threads = 1000: must be in [0, 256]"},
      {"bench --impl tpu", "--impl = tpu: must be cuda"},
      {"bench --impl cuda --shape nope", "--shape = nope: must be mixtral, deepseek_v3, qwen3_30b_a3b, olmoe or a preset"},
      {"bench --impl cuda --shape olmoe,mixtra", "--shape = mixtra:"},
      {"bench --impl cuda --tokens 0", "--tokens = 0: must be in [1, 262144]"},
      {"bench --impl cuda --tokens 1,300000", "--tokens = 300000: must be in [1, 262144]"},
      {"bench --impl cuda --routing zipf", "--routing = zipf: must be uniform or skewed"},
      {"bench --impl cuda --replays 0", "--replays = 0: must be in [1, 10000]"},
      {"bench --impl cuda --tokens x", "--tokens"},  // CLI11's own parse error
  };
  for (const auto& c : cases) {
    const CliResult r = moelab(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << ": " << r.out;
    EXPECT_NE(r.out.find(c.message), std::string::npos) << c.args << ": " << r.out;
    EXPECT_EQ(r.out.find('\n'), r.out.size() - 1) << c.args << ": not one line: " << r.out;
  }
}

// A preset the CUDA layer does not compute (gpt-oss: clamped SwiGLU with expert biases) is bad
// input too, named as such — in a build with CUDA; without, the bench cannot run at all (exit 1).
TEST(BenchCli, UnsupportedShapeIsNamed) {
  const CliResult r = moelab("bench --impl cuda --shape gpt_oss");
  ASSERT_NE(r.exit_code, 0) << r.out;
  EXPECT_EQ(r.out.find('\n'), r.out.size() - 1) << "not one line: " << r.out;
  if (r.exit_code == 2) {
    EXPECT_NE(r.out.find("--shape = gpt_oss: the CUDA layer does not compute it"), std::string::npos) << r.out;
  } else {
    EXPECT_EQ(r.exit_code, 1) << r.out;
    EXPECT_NE(r.out.find("built without CUDA"), std::string::npos) << r.out;
  }
}

// Where the bench cannot run, one line says why, naming --impl, with exit code 1 (not ctest's 77:
// this is a user's command). With a GPU, a small run (one shape, T = 1, no baselines, 2 replays)
// writes a JSON document with the device, the peaks and a timed row.
TEST(BenchCli, WithoutAGpuSaysWhyElseWritesJson) {
  const std::string path = "/tmp/moelab_test_bench_" + std::to_string(::getpid()) + ".json";
  std::remove(path.c_str());
  const CliResult r = moelab("bench --impl cuda --shape olmoe --tokens 1 --replays 2 --no-baselines --json " + path);
  if (r.exit_code != 0) {
    EXPECT_EQ(r.exit_code, 1) << r.out;
    EXPECT_NE(r.out.find("moelab bench: error: --impl = cuda: "), std::string::npos) << r.out;
    EXPECT_TRUE(r.out.find("no CUDA device") != std::string::npos || r.out.find("built without CUDA") != std::string::npos)
        << r.out;
    EXPECT_EQ(r.out.find('\n'), r.out.size() - 1) << "not one line: " << r.out;
    std::ifstream missing(path);
    EXPECT_FALSE(missing.good()) << path << " was written by a run that could not measure";
    return;
  }
  std::ifstream in(path);
  ASSERT_TRUE(in.good()) << path << " missing; output:\n" << r.out;
  const nlohmann::json doc = nlohmann::json::parse(in);
  EXPECT_EQ(doc["command"], "bench");
  EXPECT_FALSE(doc["device"]["name"].get<std::string>().empty());
  EXPECT_GT(doc["peaks"]["gemm"]["tflops"].get<double>(), 1.0);
  EXPECT_GT(doc["peaks"]["copy"]["gbps"].get<double>(), 10.0);
  ASSERT_EQ(doc["shapes"].size(), 1u);
  const nlohmann::json& shape = doc["shapes"][0];
  EXPECT_EQ(shape["preset"], "olmoe");
  EXPECT_EQ(shape["config"]["num_experts"], 64);
  const nlohmann::json& row = shape["results"][0]["rows"][0];
  EXPECT_EQ(row["impl"], "ours");
  EXPECT_GT(row["timing"]["median_us"].get<double>(), 0.0);
  EXPECT_LE(row["load"]["distinct_experts"].get<double>(), 8.0);  // T = 1: k = 8 experts at most
  EXPECT_EQ(row["work"]["routed_flops"].get<double>(), 2.0 * 1 * 8 * 3 * 2048 * 1024);
  std::remove(path.c_str());
}


// --model runs anywhere: one timed train step of the tiny model and one MoE layer forward and
// backward, written as JSON with the sizes moelab train prints. Only that the times are there and
// positive is asserted, never how fast.
TEST(BenchCli, ModelBenchWritesItsMeasurements) {
  const std::string path = testing::TempDir() + "moelab_bench_model.json";
  std::remove(path.c_str());
  const CliResult r = moelab("bench --model tiny_moe --warmup 0 --repeats 1 --threads 1 --json " + path);
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("tiny_moe: 887360 parameters, 281152 active per token"), std::string::npos) << r.out;
  std::ifstream in(path);
  ASSERT_TRUE(in) << path;
  const nlohmann::json doc = nlohmann::json::parse(in);
  EXPECT_EQ(doc["model"], "tiny_moe");
  EXPECT_EQ(doc["threads"], 1);
  EXPECT_EQ(doc["train_step"]["tokens"], 16 * 128);
  EXPECT_GT(doc["train_step"]["tokens_per_second"].get<double>(), 0.0);
  EXPECT_EQ(doc["moe_layer"]["tokens"], 16 * 128 / 2);
  EXPECT_GT(doc["moe_layer"]["forward"]["median_seconds"].get<double>(), 0.0);
  EXPECT_GT(doc["moe_layer"]["forward_backward"]["median_seconds"].get<double>(),
            doc["moe_layer"]["forward"]["min_seconds"].get<double>() * 0.5);
  std::remove(path.c_str());
}

}  // namespace
