// moelab/viewer/main.cpp — moelab-viewer: watch a tiny MoE language model route, specialise and
// overflow while it trains (viewer/session.h runs the training on its own thread).
//
//   moelab-viewer [--checkpoint DIR] [--model NAME] [--balance MODE] [--seed N] ...
//   moelab-viewer --screenshot F.png --frames N [--panel NAME] [--size WxH] [--train-steps N] [--state-json F]
//
// The frame, as in Dear ImGui's example_glfw_opengl3:
//   1. poll the window's events          2. take the latest training snapshot (one pointer copy)
//   3. draw the status bar and the tab of the chosen panel (ui.h: one Show...Panel() per idea)
//   4. render; in screenshot mode check glGetError every frame (any error: exit code 3), and after
//      the last frame read the back buffer and write it as a PNG (temporary file, then rename).
// Exit codes: 0 done; 1 no display / no OpenGL; 2 bad input (a flag, a checkpoint); 3 a GL error.
#include <GLFW/glfw3.h>
#include <imgui.h>
#include <backends/imgui_impl_glfw.h>
#include <backends/imgui_impl_opengl3.h>
#include <stb_image_write.h>
#include <unistd.h>

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <thread>
#include <vector>

#include "reference/error.h"
#include "reference/files.h"
#include "viewer/ui.h"

namespace moelab::viewer {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr const char* kPanelTitles[] = {"1 Routing (live)",        "2 Specialisation per layer", "3 Load balancing",
                                        "4 Numerics: bf16 overflow", "5 Training",                "6 Bit flip (SDC)"};
constexpr int kPanels = static_cast<int>(std::size(kPanelTitles));
static_assert(std::size(kPanelTitles) == std::size(kPanelNames));

void draw_frame(UiState& ui, const Snapshot& snap) {
  const ImGuiViewport* vp = ImGui::GetMainViewport();
  ImGui::SetNextWindowPos(vp->Pos);
  ImGui::SetNextWindowSize(vp->Size);
  ImGui::Begin("moelab-viewer", nullptr,
               ImGuiWindowFlags_NoDecoration | ImGuiWindowFlags_NoMove | ImGuiWindowFlags_NoSavedSettings |
                   ImGuiWindowFlags_NoBringToFrontOnFocus | ImGuiWindowFlags_NoBackground);
  ShowStatusBar(ui, snap);
  const int wanted = ui.select_panel ? ui.panel : -1;  // read before a tab that is shown overwrites ui.panel
  if (ImGui::BeginTabBar("panels")) {
    for (int i = 0; i < kPanels; ++i) {
      const ImGuiTabItemFlags flags = i == wanted ? ImGuiTabItemFlags_SetSelected : 0;
      if (!ImGui::BeginTabItem(kPanelTitles[i], nullptr, flags)) continue;
      ui.panel = i;
      ImGui::BeginChild("panel");
      switch (i) {
        case 0: ShowRoutingPanel(ui, snap); break;
        case 1: ShowSpecialisationPanel(ui, snap); break;
        case 2: ShowBalancePanel(ui, snap); break;
        case 3: ShowNumericsPanel(ui, snap); break;
        case 4: ShowTrainingPanel(ui, snap); break;
        default: ShowSdcPanel(ui, snap); break;
      }
      ImGui::EndChild();
      ImGui::EndTabItem();
    }
    ImGui::EndTabBar();
  }
  // The tab bar applies a selection in the frame after it is asked for: keep asking until it shows.
  if (wanted < 0 || ui.panel == wanted) ui.select_panel = false;
  else ui.panel = wanted;
  ImGui::End();
}

// The window's pixels as a PNG, written atomically: a temporary file beside it, then renamed.
void write_png(const fs::path& path, int width, int height) {
  std::vector<unsigned char> pixels(static_cast<std::size_t>(width) * static_cast<std::size_t>(height) * 3);
  glReadBuffer(GL_BACK);
  glPixelStorei(GL_PACK_ALIGNMENT, 1);
  glReadPixels(0, 0, width, height, GL_RGB, GL_UNSIGNED_BYTE, pixels.data());
  stbi_flip_vertically_on_write(1);  // OpenGL's rows start at the bottom
  std::error_code ec;
  if (path.has_parent_path()) fs::create_directories(path.parent_path(), ec);
  const fs::path tmp = path.string() + fmt::format(".tmp.{}.png", ::getpid());
  if (stbi_write_png(tmp.c_str(), width, height, 3, pixels.data(), width * 3) == 0) {
    fs::remove(tmp, ec);
    throw Error(fmt::format("--screenshot = {}: cannot write the PNG (is the folder writable?)", path.string()));
  }
  fs::rename(tmp, path, ec);
  if (ec) throw Error(fmt::format("--screenshot = {}: cannot rename {} onto it: {}", path.string(), tmp.string(), ec.message()));
}

struct FrameLog {
  std::int64_t warmup_frames = 0;     // frames drawn while --train-steps were being trained
  double warmup_seconds = 0;
  std::int64_t frames = 0;            // the --frames frames
  double seconds = 0;
  std::int64_t steps_at_first = 0;    // steps done when the --frames frames began
  std::vector<double> phases;         // the flows' animation phase of every one of those frames
  int gl_errors = 0;
};

Json state_json(const UiState& ui, const Snapshot& snap, const FrameLog& log, const ViewerOptions& o) {
  Json j;
  j["panel"] = o.panel;
  j["panel_shown"] = kPanelNames[ui.panel];
  j["keys_handled"] = ui.keys_handled;
  j["size"] = {o.width, o.height};
  j["frames"] = log.frames;
  j["seconds"] = log.seconds;
  j["fps"] = log.seconds > 0 ? static_cast<double>(log.frames) / log.seconds : 0.0;
  j["warmup_frames"] = log.warmup_frames;
  j["fps_while_training"] = log.warmup_seconds > 0 ? Json(static_cast<double>(log.warmup_frames) / log.warmup_seconds)
                            : log.steps_at_first != snap.steps_done && log.seconds > 0
                                ? Json(static_cast<double>(log.frames) / log.seconds)
                                : Json(nullptr);
  j["phases"] = log.phases;
  j["steps_trained"] = snap.steps_done;
  j["steps_at_first_frame"] = log.steps_at_first;
  j["gl_errors"] = log.gl_errors;
  j["model"] = snap.config.model_name;
  j["source"] = snap.source;
  j["font"] = ui.font_note;
  // The numerics panel's numbers, as `moelab numerics --logits ... --dtype ... --json` prints them.
  j["numerics"] = numerics_json(ui.numerics.logits.empty() ? numerics_view(ui.logits, kAllFormats[ui.dtype]) : ui.numerics);
  const BatchRouting& r = snap.routing;
  Json routing = {{"step", r.step}, {"trained", r.trained}, {"tokens", r.batch.batch_size * r.batch.seq_len},
                  {"experts", r.num_experts}, {"top_k", r.top_k}, {"load", Json::array()}};
  for (const LayerRouting& l : r.layers) routing["load"].push_back(l.load);
  j["routing"] = routing;
  if (snap.precision) {
    j["router_bf16"] = {{"tokens", snap.precision->tokens}, {"layers", snap.precision->layers},
                        {"flipped", snap.precision->flipped}};
  }
  if (ui.sdc) {
    j["sdc"] = {{"changed_pairs", ui.sdc->changed_pairs}, {"refused", ui.sdc->trace.refused},
                {"logit_rel_error", json_number(ui.sdc->trace.metrics.logit_rel_error)}};
  }
  return j;
}

int run(int argc, char** argv) {
  // 1. Options, corpus and session: every bad input is reported before a window opens.
  ViewerOptions o;
  std::shared_ptr<const Corpus> corpus;
  std::unique_ptr<Session> session;
  try {
    o = parse_viewer_options(std::vector<std::string>(argv + 1, argv + argc));
    if (o.help) {
      std::fputs(o.help_text.c_str(), stdout);
      return 0;
    }
    std::string note;
    corpus = load_or_build_corpus(o.corpus, &note);
    if (!note.empty()) std::fprintf(stderr, "moelab-viewer: %s\n", note.c_str());
    session = std::make_unique<Session>(corpus, o.settings, o.checkpoint);
  } catch (const Error& e) {
    std::fprintf(stderr, "moelab-viewer: %s\n", e.what());
    return 2;
  }

  // 2. The window and Dear ImGui.
  glfwSetErrorCallback([](int code, const char* what) { std::fprintf(stderr, "moelab-viewer: GLFW error %d: %s\n", code, what); });
  if (glfwInit() == GLFW_FALSE) {
    std::fprintf(stderr, "moelab-viewer: no display (DISPLAY / WAYLAND_DISPLAY unset or unreachable). Run it on a "
                         "desktop, or headless under Xvfb: xvfb-run -a build/bin/moelab-viewer --screenshot F.png --frames 60\n");
    return 1;
  }
  glfwWindowHint(GLFW_CONTEXT_VERSION_MAJOR, 3);
  glfwWindowHint(GLFW_CONTEXT_VERSION_MINOR, 2);
  glfwWindowHint(GLFW_OPENGL_PROFILE, GLFW_OPENGL_CORE_PROFILE);
  glfwWindowHint(GLFW_OPENGL_FORWARD_COMPAT, GLFW_TRUE);
  const bool screenshot = !o.screenshot.empty();
  if (screenshot) glfwWindowHint(GLFW_RESIZABLE, GLFW_FALSE);
  GLFWwindow* window = glfwCreateWindow(o.width, o.height, "moelab-viewer", nullptr, nullptr);
  if (window == nullptr) {
    std::fprintf(stderr, "moelab-viewer: cannot open an OpenGL 3.2 window (Debian: libgl1-mesa-dri for Mesa's drivers)\n");
    glfwTerminate();
    return 1;
  }
  glfwMakeContextCurrent(window);
  glfwSwapInterval(screenshot ? 0 : 1);
  IMGUI_CHECKVERSION();
  ImGui::CreateContext();
  ImGui::GetIO().IniFilename = nullptr;  // no imgui.ini left in the working folder
  ImGui::StyleColorsDark();
  ImGui::GetStyle().FrameRounding = 3.0f;
  ImGui_ImplGlfw_InitForOpenGL(window, true);
  ImGui_ImplOpenGL3_Init("#version 150");

  UiState ui;
  ui.session = session.get();
  ui.options = &o;
  ui.corpus = corpus;
  ui.font_note = LoadFonts(corpus.get(), 17.0f);
  ui.panel = panel_index(o.panel);
  ui.logits = o.logits;
  for (int i = 0; i < 5; ++i)
    if (kAllFormats[i] == o.numerics_dtype) ui.dtype = i;
  std::snprintf(ui.text, sizeof(ui.text), "%s", o.text.c_str());
  std::snprintf(ui.sdc_text, sizeof(ui.sdc_text), "%s", o.text.c_str());
  ui.sdc_token = std::min<int>(4, static_cast<int>(o.text.size()) - 1);
  ui.model_index = 0;
  const std::vector<std::string> names = model_config_names();
  for (std::size_t i = 0; i < names.size(); ++i)
    if (names[i] == session->snapshot()->config.model_name) ui.model_index = static_cast<int>(i);
  ui.seed = static_cast<int>(o.settings.seed);
  ui.batch = static_cast<int>(o.settings.batch_size);
  if (!o.paused) session->start();

  // 3. The frames.
  FrameLog log;
  int exit_code = 0;
  const Clock::time_point start = Clock::now();
  Clock::time_point fps_mark = start;
  std::int64_t fps_frames = 0;
  bool measuring = !(screenshot && o.train_steps);  // with --train-steps the N frames begin once they are trained
  Clock::time_point measure_start = start;
  if (measuring) log.steps_at_first = session->snapshot()->steps_done;
  std::shared_ptr<const Snapshot> snap;
  while (glfwWindowShouldClose(window) == GLFW_FALSE) {
    const Clock::time_point frame_start = Clock::now();
    glfwPollEvents();
    snap = session->snapshot();
    if (screenshot && !measuring) {
      const bool trained = snap->steps_done >= *o.train_steps && !snap->running;
      if (trained || !snap->error.empty() || Clock::now() - start > std::chrono::minutes(5)) {
        log.warmup_seconds = std::chrono::duration<double>(Clock::now() - start).count();
        measuring = true;
        measure_start = Clock::now();
        log.steps_at_first = snap->steps_done;
      }
    }
    // The animation clock: real time, or exactly 1/60 s a frame in screenshot mode (reproducible).
    ui.seconds = screenshot ? static_cast<double>(log.frames) / 60.0 : std::chrono::duration<double>(Clock::now() - start).count();
    ui.phase = static_cast<float>(std::fmod(ui.seconds * 0.5, 1.0));
    ImGui_ImplOpenGL3_NewFrame();
    ImGui_ImplGlfw_NewFrame();
    // Screenshots are not hovered by wherever Xvfb left its pointer: only by --hover, if given.
    if (screenshot) ImGui::GetIO().MousePos = o.hover ? ImVec2(o.hover->first, o.hover->second) : ImVec2(-1e9f, -1e9f);
    if (screenshot && o.press) ImGui::GetIO().KeysDown[*o.press] = measuring && log.frames == 0;  // down for one frame
    ImGui::NewFrame();
    draw_frame(ui, *snap);
    ImGui::Render();
    int fb_w = 0, fb_h = 0;
    glfwGetFramebufferSize(window, &fb_w, &fb_h);
    glViewport(0, 0, fb_w, fb_h);
    // The window has no background of its own: the clear is it. Mesa's llvmpipe (Xvfb, no GPU) shades
    // every pixel on the CPU, so one full-screen pass less is ~20% of a frame there.
    const ImVec4 bg = ImGui::GetStyleColorVec4(ImGuiCol_WindowBg);
    glClearColor(bg.x, bg.y, bg.z, 1.0f);
    glClear(GL_COLOR_BUFFER_BIT);
    ImGui_ImplOpenGL3_RenderDrawData(ImGui::GetDrawData());
    ++ui.frame;
    ++fps_frames;
    const double since = std::chrono::duration<double>(Clock::now() - fps_mark).count();
    if (since >= 0.5) {
      ui.fps = static_cast<double>(fps_frames) / since;
      fps_frames = 0;
      fps_mark = Clock::now();
    }
    if (screenshot) {
      for (GLenum err = glGetError(); err != GL_NO_ERROR; err = glGetError()) {
        std::fprintf(stderr, "moelab-viewer: OpenGL error 0x%04X in frame %lld\n", err, static_cast<long long>(ui.frame));
        ++log.gl_errors;
        exit_code = 3;
      }
      if (!measuring) {
        ++log.warmup_frames;
      } else {
        log.phases.push_back(ui.phase);
        if (++log.frames >= o.frames) {
          log.seconds = std::chrono::duration<double>(Clock::now() - measure_start).count();
          try {
            write_png(o.screenshot, fb_w, fb_h);
          } catch (const Error& e) {
            std::fprintf(stderr, "moelab-viewer: %s\n", e.what());
            exit_code = 2;
          }
          glfwSwapBuffers(window);
          break;
        }
      }
    }
    glfwSwapBuffers(window);
    // At most 60 frames a second (Xvfb has no vsync): the time left goes to training.
    const Clock::time_point next = frame_start + std::chrono::microseconds(16667);
    if (Clock::now() < next) std::this_thread::sleep_until(next);
  }

  // 4. What the frames did.
  if (screenshot) {
    snap = session->snapshot();
    const double fps = log.seconds > 0 ? static_cast<double>(log.frames) / log.seconds : 0.0;
    std::printf("moelab-viewer: %s: %lld frames in %.2f s = %.1f frames/s (%s, step %lld -> %lld)", o.panel.c_str(),
                static_cast<long long>(log.frames), log.seconds, fps,
                snap->steps_done != log.steps_at_first ? "while training" : "training paused",
                static_cast<long long>(log.steps_at_first), static_cast<long long>(snap->steps_done));
    if (log.warmup_frames > 0)
      std::printf("; while training %lld steps first: %lld frames in %.2f s = %.1f frames/s",
                  static_cast<long long>(log.steps_at_first), static_cast<long long>(log.warmup_frames),
                  log.warmup_seconds, static_cast<double>(log.warmup_frames) / log.warmup_seconds);
    std::printf("\nmoelab-viewer: wrote %s\n", o.screenshot.c_str());
    if (!o.state_json.empty()) {
      try {
        write_file_atomically(o.state_json, state_json(ui, *snap, log, o).dump(2) + "\n");
      } catch (const Error& e) {
        std::fprintf(stderr, "moelab-viewer: --state-json: %s\n", e.what());
        exit_code = 2;
      }
    }
  }
  session.reset();  // stop the worker before the window goes
  ImGui_ImplOpenGL3_Shutdown();
  ImGui_ImplGlfw_Shutdown();
  ImGui::DestroyContext();
  glfwDestroyWindow(window);
  glfwTerminate();
  return exit_code;
}

}  // namespace
}  // namespace moelab::viewer

int main(int argc, char** argv) { return moelab::viewer::run(argc, argv); }
