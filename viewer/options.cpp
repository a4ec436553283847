// moelab/viewer/options.cpp — see options.h.
#include "viewer/options.h"

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <charconv>
#include <cmath>

#include "reference/error.h"
#include "reference/numerics.h"

namespace moelab::viewer {

int panel_index(std::string_view name, std::string_view field) {
  for (std::size_t i = 0; i < std::size(kPanelNames); ++i)
    if (kPanelNames[i] == name) return static_cast<int>(i);
  fail(field, fmt::format("\"{}\"", name),
       "must be one of routing, specialisation, balance, numerics, training, sdc");
}

std::pair<int, int> parse_size(std::string_view text, std::string_view field) {
  const std::size_t x = text.find('x');
  int w = 0, h = 0;
  bool ok = x != std::string_view::npos;
  if (ok) {
    const auto [pw, ew] = std::from_chars(text.data(), text.data() + x, w);
    const auto [ph, eh] = std::from_chars(text.data() + x + 1, text.data() + text.size(), h);
    ok = ew == std::errc() && eh == std::errc() && pw == text.data() + x && ph == text.data() + text.size();
  }
  require(ok, field, fmt::format("\"{}\"", text), "must be WIDTHxHEIGHT, e.g. 1280x800");
  require(w >= 320 && w <= 4096 && h >= 320 && h <= 4096, field, fmt::format("\"{}\"", text),
          "width and height must be in [320, 4096]");
  return {w, h};
}

std::vector<float> parse_logits(std::string_view text, std::string_view field) {
  std::vector<float> out = parse_float32_list(text, field);
  require(out.size() <= 64, field, fmt::format("({} numbers)", out.size()), "at most 64 logits");
  return out;
}

ViewerOptions parse_viewer_options(const std::vector<std::string>& args) {
  ViewerOptions o;
  CLI::App app{"moelab-viewer: watch a tiny MoE language model route, specialise and overflow, live",
               "moelab-viewer"};
  std::string balance = "preset", size, logits, dtype = "bf16", checkpoint, corpus = o.corpus.string(),
              screenshot, state_json;
  std::optional<std::int64_t> train_steps;
  std::optional<double> z_loss, capacity;
  app.add_option("--checkpoint", checkpoint, "a checkpoint (or run) folder from moelab train: open it, continue training");
  app.add_option("--corpus", corpus, "the corpus folder (default data/corpus; built in memory if absent)");
  app.add_option("--model", o.settings.model_name, "model configuration (tiny_moe, tiny_dense or a preset's name)");
  app.add_option("--balance", balance, "preset, aux, aux_free or none");
  app.add_option("--z-loss", z_loss, "router z-loss coefficient");
  app.add_option("--capacity-factor", capacity, "drop tokens at this capacity factor");
  app.add_option("--seed", o.settings.seed, "seed of the initial parameters and the batches");
  app.add_option("--batch", o.settings.batch_size, "sequences per step (default 16)");
  app.add_option("--seq", o.settings.seq_len, "bytes per sequence (default 128)");
  app.add_option("--schedule-steps", o.settings.steps, "length of the learning-rate schedule (default 2000)");
  app.add_option("--eval-every", o.settings.eval_every, "evaluate every this many steps (default 50)");
  app.add_option("--train-steps", train_steps, "train until this many steps are done, then pause");
  app.add_flag("--paused", o.paused, "do not start training on launch");
  app.add_option("--screenshot", screenshot, "render --frames frames and write the window to this PNG");
  app.add_option("--frames", o.frames, "screenshot mode: frames to render");
  app.add_option("--panel", o.panel, "the panel shown first: routing, specialisation, balance, numerics, training, sdc");
  app.add_option("--size", size, "window size WIDTHxHEIGHT (default 1280x800)");
  app.add_option("--state-json", state_json, "write what the frames did (frames, animation, steps, numbers) here");
  std::string hover;
  app.add_option("--hover", hover, "screenshot mode: put the mouse at X,Y (to show a tooltip)");
  std::string press;
  app.add_option("--press", press, "screenshot mode: press a key in the first frame: space, or 1-6 (a panel)");
  app.add_option("--logits", logits, "the numerics panel's logits, e.g. 128.5,1,0");
  app.add_option("--numerics-dtype", dtype, "the numerics panel's format (default bf16)");
  app.add_option("--text", o.text, "the text of the routing (own text) and bit-flip panels");
  try {
    std::vector<std::string> reversed(args.rbegin(), args.rend());
    app.parse(reversed);
  } catch (const CLI::CallForHelp&) {
    o.help = true;
    o.help_text = app.help();
    return o;
  } catch (const CLI::ParseError& e) {
    throw Error(fmt::format("{} (moelab-viewer --help lists the options)", e.what()));
  }
  o.checkpoint = checkpoint;
  o.corpus = corpus;
  o.screenshot = screenshot;
  o.state_json = state_json;
  o.settings.balance = parse_balance_mode(balance);
  o.settings.z_loss_coef = z_loss;
  o.settings.capacity_factor = capacity;
  o.train_steps = train_steps;
  o.settings.stop_at = train_steps;
  if (train_steps) require(*train_steps >= 0, "--train-steps", *train_steps, "must be >= 0");
  if (!size.empty()) std::tie(o.width, o.height) = parse_size(size);
  if (!logits.empty()) o.logits = parse_logits(logits);
  if (!hover.empty()) {
    const std::vector<float> xy = parse_logits(hover, "--hover");
    require(xy.size() == 2 && xy[0] >= 0 && xy[1] >= 0, "--hover", fmt::format("\"{}\"", hover),
            "must be X,Y: two pixel coordinates >= 0");
    o.hover = std::pair<int, int>(static_cast<int>(xy[0]), static_cast<int>(xy[1]));
  }
  if (!press.empty()) {
    require(press == "space" || (press.size() == 1 && press[0] >= '1' && press[0] < '1' + static_cast<int>(std::size(kPanelNames))),
            "--press", fmt::format("\"{}\"", press), "must be space or a panel's number, 1 to 6");
    o.press = press == "space" ? ' ' : press[0];  // the GLFW key codes of space and the digits are their ASCII codes
  }
  o.numerics_dtype = parse_format(dtype, "--numerics-dtype");
  panel_index(o.panel);
  if (!o.screenshot.empty()) {
    require(o.frames >= 1 && o.frames <= 100000, "--frames", o.frames, "must be in [1, 100000] with --screenshot");
    require(o.screenshot.extension() == ".png", "--screenshot", o.screenshot.string(), "must name a .png file");
  } else {
    require(o.frames == 0, "--frames", o.frames, "goes with --screenshot");
  }
  require(!o.text.empty() && o.text.size() <= 512, "--text", fmt::format("({} bytes)", o.text.size()),
          "must hold 1 to 512 bytes");
  if (o.checkpoint.empty()) o.settings.train_config();  // every setting checked here, before a window opens
  return o;
}

}  // namespace moelab::viewer
