// moelab/viewer/options.h — the command line of moelab-viewer, parsed and checked without a display.
//
//   moelab-viewer                                   train tiny_moe live from scratch
//   moelab-viewer --checkpoint runs/tiny            open a trained checkpoint (and continue training it)
//   moelab-viewer --screenshot F.png --frames N [--panel NAME] [--size WxH] [--train-steps N]
//                 [--state-json FILE]               render N frames, write the window to F.png
//
// Bad input is an Error naming the flag, the value and the rule; main prints it and exits with 2.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "viewer/session.h"

namespace moelab::viewer {

// The panels, in the order of the tab bar; --panel takes these names.
inline constexpr std::string_view kPanelNames[] = {"routing", "specialisation", "balance",
                                                   "numerics", "training", "sdc"};
int panel_index(std::string_view name, std::string_view field = "--panel");  // Error for an unknown name

struct ViewerOptions {
  std::filesystem::path checkpoint;              // empty: train from scratch
  std::filesystem::path corpus = "data/corpus";
  SessionSettings settings;                      // --model, --balance, --seed, --batch, --seq, --schedule-steps
  std::optional<std::int64_t> train_steps;       // train this many steps (in all), then pause
  bool paused = false;                           // do not start training on launch
  std::filesystem::path screenshot;              // screenshot mode when set
  int frames = 0;                                // screenshot mode: frames to render (>= 1)
  std::string panel = "routing";
  int width = 1280, height = 800;
  std::filesystem::path state_json;              // what the frames did, for tests
  std::optional<std::pair<int, int>> hover;      // screenshot mode: the mouse there (else outside the window)
  std::optional<int> press;                      // screenshot mode: this key (GLFW code: ' ', '1'..'6') in the first frame
  std::vector<float> logits{128.5f, 1.0f, 0.0f}; // the numerics panel's starting logits
  Format numerics_dtype = Format::bf16;
  std::string text = "int main(void) { return 0; } // Привет, 世界";  // the routing and bit-flip panels' text
  bool help = false;
  std::string help_text;
};

// args without the program name. Throws Error naming the flag.
ViewerOptions parse_viewer_options(const std::vector<std::string>& args);

// "1280x800" -> (1280, 800); each in [320, 4096]. Error naming `field` otherwise.
std::pair<int, int> parse_size(std::string_view text, std::string_view field = "--size");
// "128.5,1,0" -> floats (1 to 64 of them). Error naming `field` otherwise.
std::vector<float> parse_logits(std::string_view text, std::string_view field = "--logits");

}  // namespace moelab::viewer
