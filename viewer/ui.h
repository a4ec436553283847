// moelab/viewer/ui.h — what the viewer's ImGui code shares: the UI state, the widgets every panel
// uses (help markers, charts, heatmaps, token glyphs) and one Show...Panel() per idea, as in
// imgui_demo.cpp. Index of the panels (one file each):
//   ShowRoutingPanel          panels_routing.cpp         tokens flow to their top-k experts, live
//   ShowSpecialisationPanel   panels_specialisation.cpp  domain x expert per block, MI over time
//   ShowBalancePanel          panels_balance.cpp         load per expert; switch the balancing live
//   ShowNumericsPanel         panels_numerics.cpp        bf16 softmax overflow, bf16 router flips, z-loss
//   ShowTrainingPanel         panels_training.cpp        loss curves, start / pause / reset, presets
//   ShowSdcPanel              panels_sdc.cpp             one bit flipped: which experts changed
// The numbers come from viewer/panel_data.h; these files only draw them.
#pragma once

#include <imgui.h>

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "viewer/options.h"
#include "viewer/panel_data.h"
#include "viewer/session.h"

namespace moelab::viewer {

struct UiState {
  Session* session = nullptr;
  const ViewerOptions* options = nullptr;
  std::shared_ptr<const Corpus> corpus;
  int panel = 0;                 // index into kPanelNames
  bool select_panel = true;      // select `panel`'s tab on the next frame
  std::vector<std::string> keys_handled;  // what the keyboard shortcuts did ("start", "pause", "panel sdc"), for --state-json
  std::int64_t frame = 0;
  double seconds = 0;            // animation clock: real time, or frame / 60 in screenshot mode
  float phase = 0;               // of the routing flows' animation, in [0, 1)
  double fps = 0;                // measured frames per second
  std::string font_note;

  // 1. routing
  int own_text = 0;              // 0: the live batch, 1: the text below
  char text[513] = {};
  int sequence = 0;
  int layer = 0;                 // MoE block index (0 .. L-1)
  int window_start = 0;
  int window = 24;
  std::int64_t routed_version = -1;
  std::string routed_text;
  std::optional<BatchRouting> text_routing;
  std::string text_error;
  int pinned_token = -1;         // of the live batch (row), for the numerics panel

  // 2. specialisation, 3. balance
  int spec_layer = 0;
  int balance_layer = 0;
  float aux_coef = 0.02f;
  float bias_rate = 0.001f;

  // 4. numerics
  std::vector<float> logits;
  int dtype = 1;                 // index into kAllFormats (bf16)
  int live_logits = 0;           // 0: the sliders, 1: a live token's router logits
  int live_layer = 0;
  int live_token = 0;
  float live_scale = 1.0f;
  float z_coef = 1e-3f;
  NumericsView numerics;         // what the panel showed last (for --state-json)

  // 5. training
  int model_index = 0;
  int seed = 0;
  int balance_mode = 0;
  int batch = 16;
  char save_dir[256] = "runs/viewer";

  // 6. bit flip
  char sdc_text[513] = {};
  int sdc_site = 2;              // kAllFaultSites: router_logits
  int sdc_format = 1;            // bf16
  int sdc_bit = 14;
  int sdc_layer = 0;
  int sdc_token = 4;
  int sdc_slot = 0;
  int sdc_col = 0;
  std::int64_t sdc_version = -1;
  std::string sdc_key;
  std::optional<SdcView> sdc;
  std::string sdc_error;
};

// ---- widgets.cpp ---------------------------------------------------------------------------------

// "(?)" that shows `text` in a tooltip while hovered: each panel explains its settings where they are.
void HelpMarker(const char* text);
// A line of wrapped, dimmed explanation.
void Explain(const char* text);
ImU32 ExpertColour(int expert, int experts, float alpha = 1.0f);
ImU32 HeatColour(double value);  // value in [0, 1], dark blue -> yellow
ImU32 SeriesColour(int i);

struct Series {
  std::string label;
  const std::vector<double>* x = nullptr;
  const std::vector<double>* y = nullptr;
  ImU32 colour = 0;
  float thickness = 1.5f;
  bool points = false;           // markers at each point (sparse series: evaluations)
};
struct HLine {
  double y = 0;
  std::string label;
  ImU32 colour = 0;
};
struct ChartStyle {
  const char* y_label = "";
  const char* x_label = "step";
  std::optional<double> y_min{}, y_max{};
  std::vector<HLine> hlines{};
  bool legend = true;
};
// A line chart of several series on one pair of axes, drawn with ImDrawList; hovering shows the
// values at the nearest x.
void LineChart(const char* id, ImVec2 size, std::span<const Series> series, const ChartStyle& style);

// A (rows, cols) heatmap with labels; `vmax` maps to the top colour; each cell prints its value with
// `format` where it fits; hovering a cell shows row, column and value.
void Heatmap(const char* id, const MatrixD& values, std::span<const std::string> rows, std::span<const std::string> cols,
             double vmax, const char* format, float cell_width, float cell_height);

// Loads DejaVu Sans (Latin, Greek, Cyrillic) and merges a CJK font (WenQuanYi Micro Hei or Noto
// Sans CJK) for the characters of the corpus and the common Chinese ones; returns what it found.
std::string LoadFonts(const Corpus* corpus, float size);
bool FontHas(std::uint32_t codepoint);
// What a token shows: its character on the first byte of a character the font can draw, "·" on the
// other bytes of it, the byte in hex otherwise (or a visible form of space, \n, \t).
std::string GlyphText(const ByteGlyph& glyph, std::uint8_t byte);
// A tooltip body: the token, its bytes, and its experts and gates in every MoE block.
void TokenTooltip(const BatchRouting& routing, Index token);

// ---- the panels ----------------------------------------------------------------------------------
void ShowRoutingPanel(UiState& ui, const Snapshot& snap);
void ShowSpecialisationPanel(UiState& ui, const Snapshot& snap);
void ShowBalancePanel(UiState& ui, const Snapshot& snap);
void ShowNumericsPanel(UiState& ui, const Snapshot& snap);
void ShowTrainingPanel(UiState& ui, const Snapshot& snap);
void ShowSdcPanel(UiState& ui, const Snapshot& snap);

// The controls every panel can reach: start / pause, steps, tokens/s, frames/s (top of the window).
void ShowStatusBar(UiState& ui, const Snapshot& snap);

}  // namespace moelab::viewer
