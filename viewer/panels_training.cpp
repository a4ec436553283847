// moelab/viewer/panels_training.cpp — panel 5, training: loss, aux loss and z-loss curves, tokens/s,
// and the run's controls (start, pause, reset with a model preset, balance preset and seed).
#include <fmt/format.h>

#include <algorithm>
#include <iterator>
#include <string>

#include "viewer/ui.h"

namespace moelab::viewer {

void ShowTrainingPanel(UiState& ui, const Snapshot& snap) {
  Explain("The tiny byte-level language model learns to predict the next byte of the corpus. Its loss is the "
          "cross-entropy in nats per byte plus, per MoE block, the balance (aux) loss and the router z-loss.");
  if (!ImGui::BeginTable("train", 2, ImGuiTableFlags_SizingStretchProp)) return;
  ImGui::TableSetupColumn("left", ImGuiTableColumnFlags_WidthStretch, 0.32f);
  ImGui::TableSetupColumn("right", ImGuiTableColumnFlags_WidthStretch, 0.68f);
  ImGui::TableNextRow();
  ImGui::TableNextColumn();

  ImGui::Text("model %s, from %s", snap.config.model_name.c_str(), snap.source.c_str());
  ImGui::Text("step %lld (schedule: %lld steps, then min lr)", static_cast<long long>(snap.steps_done),
              static_cast<long long>(snap.config.steps));
  ImGui::Text("tokens seen %.3g M, batch %lld x %lld bytes", static_cast<double>(snap.tokens_seen) / 1e6,
              static_cast<long long>(snap.config.batch_size), static_cast<long long>(snap.config.seq_len));
  ImGui::Text("%.0f tokens/s (last 10 steps)", snap.recent_tokens_per_second);
  HelpMarker("The trainer reports every stage's events to the viewer, so its two micro-batches run one after the "
             "other on one core; the other core draws the window. `moelab train` runs them in parallel (~2x).");
  if (!snap.history.empty()) ImGui::Text("train loss %.3f, lr %.2e", snap.history.back().loss, snap.history.back().lr);
  if (!snap.evals.empty())
    ImGui::Text("val loss %.3f at step %lld (unigram baseline %.2f)", snap.evals.back().loss,
                static_cast<long long>(snap.evals.back().step), snap.unigram_baseline);
  ImGui::Spacing();
  if (snap.running) {
    if (ImGui::Button("Pause", ImVec2(90, 0))) ui.session->pause();
  } else {
    if (ImGui::Button("Start", ImVec2(90, 0))) ui.session->start();
  }
  if (!ui.session->checkpoint().empty()) {
    ImGui::SameLine();
    if (ImGui::Button("Reload checkpoint")) ui.session->reload_checkpoint();
  }
  ImGui::SetNextItemWidth(180);
  ImGui::InputText("##save", ui.save_dir, sizeof(ui.save_dir));
  ImGui::SameLine();
  if (ImGui::Button("Save checkpoint")) ui.session->save(ui.save_dir);
  HelpMarker("Writes this run's state as FOLDER/step-N (an existing one is never replaced) and FOLDER/latest: open it "
             "again with `moelab-viewer --checkpoint FOLDER`, or analyse it with `moelab analyze --checkpoint FOLDER`.");
  if (!snap.saved.empty()) ImGui::TextDisabled("saved %s", snap.saved.c_str());
  ImGui::Separator();
  ImGui::TextUnformatted("A fresh run:");
  static const std::vector<std::string> models = model_config_names();
  ui.model_index = std::clamp(ui.model_index, 0, static_cast<int>(models.size()) - 1);
  ImGui::SetNextItemWidth(180);
  if (ImGui::BeginCombo("model", models[static_cast<std::size_t>(ui.model_index)].c_str())) {
    for (std::size_t i = 0; i < models.size(); ++i)
      if (ImGui::Selectable(models[i].c_str(), static_cast<int>(i) == ui.model_index)) ui.model_index = static_cast<int>(i);
    ImGui::EndCombo();
  }
  HelpMarker("tiny_moe: 4 blocks, 8 experts of 128, top-2, Mixtral's routing (281k active of 887k parameters). "
             "tiny_dense: the same active size without experts. Any preset name: that model's routing conventions at "
             "this size (switch and gshard drop tokens at capacity; deepseek_v3 uses the bias and sigmoid scores).");
  const char* balances[] = {"preset", "aux", "aux_free", "none"};
  ImGui::SetNextItemWidth(180);
  ImGui::Combo("balance", &ui.balance_mode, balances, 4);
  ImGui::SetNextItemWidth(180);
  ImGui::InputInt("seed", &ui.seed);
  ui.seed = std::max(ui.seed, 0);
  const char* batches[] = {"4", "8", "16"};
  int batch_index = ui.batch <= 4 ? 0 : ui.batch <= 8 ? 1 : 2;
  ImGui::SetNextItemWidth(180);
  if (ImGui::Combo("sequences per step", &batch_index, batches, 3)) ui.batch = 4 << batch_index;
  HelpMarker("Fewer sequences: faster steps, noisier load. The default is moelab train's 16 x 128 bytes.");
  if (ImGui::Button("Reset (fresh parameters)")) {
    SessionSettings s = ui.session->initial_settings();
    s.model_name = models[static_cast<std::size_t>(ui.model_index)];
    s.balance = parse_balance_mode(balances[ui.balance_mode]);
    s.strength.reset();
    s.seed = static_cast<std::uint64_t>(ui.seed);
    s.batch_size = ui.batch;
    s.stop_at.reset();
    ui.session->reset(s);
  }
  if (!snap.error.empty()) {
    ImGui::PushTextWrapPos();
    ImGui::TextColored(ImVec4(1, 0.4f, 0.4f, 1), "%s", snap.error.c_str());
    ImGui::PopTextWrapPos();
  }

  ImGui::TableNextColumn();
  std::vector<double> steps, loss, aux, z, tps, val_steps, val;
  for (const StepPoint& p : snap.history) {
    steps.push_back(static_cast<double>(p.step + 1));
    loss.push_back(p.loss);
    aux.push_back(p.aux);
    z.push_back(p.z);
    tps.push_back(p.tokens_per_second);
  }
  for (const EvalMetrics& e : snap.evals) {
    val_steps.push_back(static_cast<double>(e.step));
    val.push_back(e.loss);
  }
  const float h = (ImGui::GetContentRegionAvail().y - 3 * ImGui::GetTextLineHeightWithSpacing()) / 3;
  ImGui::TextUnformatted("cross-entropy, nats per byte");
  HelpMarker("Train: every step's batch. Validation: the same 4 held-out batches at every evaluation. The dashed line "
             "is what a model that only knows byte frequencies scores.");
  const Series losses[] = {Series{.label = "train", .x = &steps, .y = &loss, .colour = SeriesColour(0)},
                           Series{.label = "validation", .x = &val_steps, .y = &val, .colour = SeriesColour(1), .thickness = 2.0f, .points = true}};
  LineChart("loss", ImVec2(0, h), losses,
            ChartStyle{.y_label = "nats/byte", .y_min = 0.0,
                       .hlines = {HLine{snap.unigram_baseline, "unigram baseline", IM_COL32(200, 200, 200, 180)}}});
  ImGui::TextUnformatted("aux loss and z-loss (coefficients applied, summed over MoE blocks)");
  const Series small[] = {Series{.label = "aux", .x = &steps, .y = &aux, .colour = SeriesColour(2)},
                          Series{.label = "z", .x = &steps, .y = &z, .colour = SeriesColour(4)}};
  LineChart("aux", ImVec2(0, h), small, ChartStyle{.y_label = "loss", .y_min = 0.0});
  ImGui::TextUnformatted("tokens (bytes) per second");
  const Series speed[] = {Series{.label = "tokens/s", .x = &steps, .y = &tps, .colour = SeriesColour(9)}};
  LineChart("tps", ImVec2(0, h), speed, ChartStyle{.y_label = "tokens/s", .y_min = 0.0});
  ImGui::EndTable();
}

void ShowStatusBar(UiState& ui, const Snapshot& snap) {
  // Keys for the lecture hall (not while typing in a text field): Space starts or pauses training,
  // 1-6 choose a panel. Digits are the GLFW backend's key codes, which are their ASCII codes.
  if (!ImGui::GetIO().WantTextInput) {
    if (ImGui::IsKeyPressed(ImGui::GetKeyIndex(ImGuiKey_Space), false)) {
      if (snap.running) {
        ui.session->pause();
      } else {
        ui.session->start();
      }
      ui.keys_handled.emplace_back(snap.running ? "pause" : "start");
    }
    for (int i = 0; i < static_cast<int>(std::size(kPanelNames)); ++i)
      if (ImGui::IsKeyPressed('1' + i, false)) {
        ui.panel = i;
        ui.select_panel = true;
        ui.keys_handled.push_back("panel " + std::string(kPanelNames[i]));
      }
  }
  if (snap.running) {
    if (ImGui::Button("Pause", ImVec2(80, 0))) ui.session->pause();
  } else {
    if (ImGui::Button("Start", ImVec2(80, 0))) ui.session->start();
  }
  ImGui::SameLine();
  ImGui::Text("%s | step %lld | loss %.3f | %.0f tokens/s | balance %s | %.0f frames/s", snap.config.model_name.c_str(),
              static_cast<long long>(snap.steps_done), snap.history.empty() ? 0.0 : snap.history.back().loss,
              snap.recent_tokens_per_second, std::string(balance_mode_name(snap.config.balance)).c_str(), ui.fps);
  HelpMarker("moelab-viewer trains a tiny Mixture-of-Experts language model live (or continues a checkpoint). Each tab "
             "shows one idea; every (?) explains what you see. Training runs on its own thread: the window never "
             "waits for it. Keys: Space starts or pauses training, 1-6 choose a panel.");
  ImGui::SameLine();
  ImGui::TextDisabled("| %s", snap.source == "scratch" ? "from scratch" : "checkpoint");
}

}  // namespace moelab::viewer
