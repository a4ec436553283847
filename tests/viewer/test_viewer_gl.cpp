// Tests of moelab-viewer itself, run as a program under Xvfb (X virtual framebuffer, Mesa's llvmpipe):
// every panel renders its frames without an OpenGL error and its screenshot is not blank, the
// animation advances from frame to frame, the numerics panel shows what `moelab numerics --json`
// prints for the same logits, and bad input exits with code 2 before any window opens.
//
// The fixture starts one Xvfb on a free display (-displayfd: the server picks the number) for the
// whole suite. Without Xvfb the display tests skip with a message; tools/setup.sh installs it.
#include <gtest/gtest.h>
#include <signal.h>
#include <stb_image.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

struct Result {
  int code = -1;
  std::string output;
};

// Runs a shell command line, stdout and stderr together.
Result run(const std::string& command) {
  Result r;
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return r;
  char buffer[4096];
  std::size_t n = 0;
  while ((n = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0) r.output.append(buffer, n);
  const int status = ::pclose(pipe);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string find_xvfb() {
  for (const char* p : {"/usr/bin/Xvfb", "/usr/local/bin/Xvfb"})
    if (::access(p, X_OK) == 0) return p;
  return "";
}

fs::path scratch() {
  static const fs::path dir = fs::temp_directory_path() / fmt::format("moelab_test_viewer_{}", ::getpid());
  fs::create_directories(dir);
  return dir;
}

// The common flags: a small, quick run on the repository's corpus (built in memory if it is missing).
std::string viewer(const std::string& args) {
  return fmt::format("{} --corpus {}/data/corpus --batch 4 --seq 64 --eval-every 2 {}", MOELAB_VIEWER_BIN,
                     MOELAB_SOURCE_DIR, args);
}

Json read_json(const fs::path& path) {
  std::ifstream in(path);
  return Json::parse(in);
}

class ViewerDisplay : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string xvfb = find_xvfb();
    if (xvfb.empty()) {
      skip_reason_ = "Xvfb is not installed (Debian: apt-get install xvfb; tools/setup.sh installs it)";
      return;
    }
    int fds[2];
    if (::pipe(fds) != 0) {
      skip_reason_ = "pipe() failed";
      return;
    }
    pid_ = ::fork();
    if (pid_ == 0) {
      ::close(fds[0]);
      const std::string fd = std::to_string(fds[1]);
      ::execl(xvfb.c_str(), "Xvfb", "-displayfd", fd.c_str(), "-screen", "0", "1280x800x24", "-nolisten", "tcp",
              static_cast<char*>(nullptr));
      ::_exit(127);
    }
    ::close(fds[1]);
    std::string number;
    char c = 0;
    while (::read(fds[0], &c, 1) == 1 && c != '\n') number += c;
    ::close(fds[0]);
    if (number.empty()) {
      skip_reason_ = "Xvfb did not start (no display number on -displayfd)";
      return;
    }
    ::setenv("DISPLAY", (":" + number).c_str(), 1);
    ::unsetenv("WAYLAND_DISPLAY");
  }
  static void TearDownTestSuite() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      ::waitpid(pid_, nullptr, 0);
    }
    std::error_code ec;
    fs::remove_all(scratch(), ec);
  }
  void SetUp() override {
    if (!skip_reason_.empty()) GTEST_SKIP() << skip_reason_;
  }
  static inline pid_t pid_ = -1;
  static inline std::string skip_reason_;
};

// What the test asserts of a screenshot: the panel's region (below the tab bar) is not one flat
// colour. Colours are counted at 5 bits a channel; "background" is the most frequent one.
struct PixelStats {
  int width = 0, height = 0;
  std::size_t colours = 0;
  double non_background = 0;  // share of the region's pixels
};

PixelStats pixel_stats(const fs::path& png, int top) {
  PixelStats s;
  int channels = 0;
  unsigned char* data = stbi_load(png.c_str(), &s.width, &s.height, &channels, 3);
  if (data == nullptr) return s;
  std::map<std::uint32_t, std::size_t> counts;
  std::size_t total = 0;
  for (int y = top; y < s.height; ++y)
    for (int x = 0; x < s.width; ++x) {
      const unsigned char* p = data + 3 * (static_cast<std::size_t>(y) * static_cast<std::size_t>(s.width) + static_cast<std::size_t>(x));
      counts[(static_cast<std::uint32_t>(p[0] >> 3) << 10) | (static_cast<std::uint32_t>(p[1] >> 3) << 5) | (p[2] >> 3)] += 1;
      ++total;
    }
  stbi_image_free(data);
  std::size_t background = 0;
  for (const auto& [colour, n] : counts) background = std::max(background, n);
  s.colours = counts.size();
  s.non_background = total > 0 ? 1.0 - static_cast<double>(background) / static_cast<double>(total) : 0.0;
  return s;
}

// One panel for 8 frames after 2 training steps.
void expect_panel_renders(const std::string& panel) {
  const fs::path png = scratch() / (panel + ".png"), state = scratch() / (panel + ".json");
  const Result r = run(viewer(fmt::format("--screenshot {} --frames 8 --train-steps 2 --panel {} --size 960x640 "
                                          "--state-json {}", png.string(), panel, state.string())));
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("frames/s"), std::string::npos) << r.output;
  const Json j = read_json(state);
  EXPECT_EQ(j["panel"], panel);
  EXPECT_EQ(j["frames"], 8);
  EXPECT_EQ(j["gl_errors"], 0);
  EXPECT_EQ(j["steps_trained"], 2);
  EXPECT_GT(j["fps"].get<double>(), 0.0);
  // The animation clock moves on every frame (1/60 s a frame in screenshot mode).
  const std::vector<double> phases = j["phases"].get<std::vector<double>>();
  ASSERT_EQ(phases.size(), 8u);
  for (std::size_t i = 1; i < phases.size(); ++i) EXPECT_GT(phases[i], phases[i - 1]) << i;
  EXPECT_NEAR(phases[1] - phases[0], 0.5 / 60.0, 1e-6);
  // Trained steps show in the routing the panels draw.
  EXPECT_TRUE(j["routing"]["trained"].get<bool>());
  EXPECT_EQ(j["routing"]["tokens"], 4 * 64);
  const PixelStats s = pixel_stats(png, 80);
  EXPECT_EQ(s.width, 960);
  EXPECT_EQ(s.height, 640);
  EXPECT_GT(s.colours, 40u) << panel << ": the panel is (nearly) one flat colour";
  EXPECT_GT(s.non_background, 0.04) << panel << ": the panel is mostly background";
}

// Plain tests rather than a parameterised one: ctest then names them viewer.ViewerDisplay.RoutingPanel, ...
TEST_F(ViewerDisplay, RoutingPanel) { expect_panel_renders("routing"); }
TEST_F(ViewerDisplay, SpecialisationPanel) { expect_panel_renders("specialisation"); }
TEST_F(ViewerDisplay, BalancePanel) { expect_panel_renders("balance"); }
TEST_F(ViewerDisplay, NumericsPanel) { expect_panel_renders("numerics"); }
TEST_F(ViewerDisplay, TrainingPanel) { expect_panel_renders("training"); }
TEST_F(ViewerDisplay, SdcPanel) { expect_panel_renders("sdc"); }

// The numerics panel's numbers are those of `moelab numerics --logits L --dtype D --json`.
TEST_F(ViewerDisplay, NumericsPanelAgreesWithTheCommandLine) {
  for (const auto& [logits, dtype] : {std::pair<std::string, std::string>{"128.5,1,0", "bf16"}, {"12,0,-3.25", "fp16"},
                                      {"7,0", "fp8_e4m3"}, {"1,2,3", "bf16"}}) {
    const fs::path png = scratch() / "numerics_cli.png", state = scratch() / "numerics_cli.json";
    const Result v = run(viewer(fmt::format("--screenshot {} --frames 2 --paused --panel numerics --logits {} "
                                            "--numerics-dtype {} --state-json {}", png.string(), logits, dtype,
                                            state.string())));
    ASSERT_EQ(v.code, 0) << v.output;
    const Result cli = run(fmt::format("{} numerics --logits {} --dtype {} --json", MOELAB_CLI_BIN, logits, dtype));
    ASSERT_EQ(cli.code, 0) << cli.output;
    const Json want = Json::parse(cli.output);
    const Json got = read_json(state)["numerics"];
    for (const char* key : {"dtype", "logits", "rounded_logits", "naive", "stable"})
      EXPECT_EQ(got[key], want[key]) << logits << " " << dtype << " " << key << ":\n" << got[key].dump() << "\n" << want[key].dump();
  }
}

// The keyboard shortcuts: a digit chooses its panel, Space starts a paused run.
TEST_F(ViewerDisplay, KeysChooseAPanelAndStartTraining) {
  const fs::path png = scratch() / "keys.png", state = scratch() / "keys.json";
  Result r = run(viewer(fmt::format("--screenshot {} --frames 4 --paused --panel routing --press 6 --state-json {}",
                                    png.string(), state.string())));
  ASSERT_EQ(r.code, 0) << r.output;
  Json j = read_json(state);
  EXPECT_EQ(j["panel"], "routing");
  EXPECT_EQ(j["panel_shown"], "sdc");
  EXPECT_EQ(j["keys_handled"], Json::array({"panel sdc"}));

  r = run(viewer(fmt::format("--screenshot {} --frames 4 --paused --panel training --press space --state-json {}",
                             png.string(), state.string())));
  ASSERT_EQ(r.code, 0) << r.output;
  j = read_json(state);
  EXPECT_EQ(j["panel_shown"], "training");
  EXPECT_EQ(j["keys_handled"], Json::array({"start"}));
}

// Bad input: code 2 and a message naming the flag, before any window (no display needed).
TEST(ViewerCommandLine, BadInputExitsWithTwoAndNamesTheField) {
  const std::string bin = MOELAB_VIEWER_BIN;
  struct Case {
    std::string args, expected;
  };
  for (const Case& c : {Case{"--screenshot x.png --frames 0", "--frames = 0"}, Case{"--panel nowhere", "--panel"},
                        Case{"--size 5x5", "--size"}, Case{"--press 7", "--press = \"7\": must be space or a panel's number"}, Case{"--balance fair", "balance"},
                        Case{"--checkpoint /nonexistent/run", "/nonexistent/run"}, Case{"--bogus", "bogus"}}) {
    const Result r = run(fmt::format("env -u DISPLAY -u WAYLAND_DISPLAY {} {}", bin, c.args));
    EXPECT_EQ(r.code, 2) << c.args << ": " << r.output;
    EXPECT_NE(r.output.find(c.expected), std::string::npos) << c.args << ": " << r.output;
  }
  const Result help = run(bin + " --help");
  EXPECT_EQ(help.code, 0);
  EXPECT_NE(help.output.find("--screenshot"), std::string::npos);
  // No display at all: a clear message and code 1, not a crash.
  const Result none = run(fmt::format("env -u DISPLAY -u WAYLAND_DISPLAY {} --corpus {}/data/corpus --batch 4 --seq 64 --paused",
                                      bin, MOELAB_SOURCE_DIR));
  EXPECT_EQ(none.code, 1) << none.output;
  EXPECT_NE(none.output.find("no display"), std::string::npos) << none.output;
}

}  // namespace
