// moelab/viewer/panels_routing.cpp — panel 1, routing (live): the tokens of the batch being trained
// on (or your own text) flow to their top-k experts, with thickness = gate; per-expert load against
// the even share and the capacity; the whole sequence coloured by each block's first choice.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "viewer/ui.h"

namespace moelab::viewer {

namespace {

// A point of the cubic Bezier from p0 to p3 that leaves and arrives horizontally.
ImVec2 bezier(ImVec2 p0, ImVec2 p3, float t) {
  const float dx = (p3.x - p0.x) * 0.5f;
  const ImVec2 p1(p0.x + dx, p0.y), p2(p3.x - dx, p3.y);
  const float u = 1 - t;
  return ImVec2(u * u * u * p0.x + 3 * u * u * t * p1.x + 3 * u * t * t * p2.x + t * t * t * p3.x,
                u * u * u * p0.y + 3 * u * u * t * p1.y + 3 * u * t * t * p2.y + t * t * t * p3.y);
}

// The own text routed with the latest parameters; again when the text changes or every 2 s of training.
void route_own_text(UiState& ui, const Snapshot& snap) {
  const std::string text(ui.text);
  if (text == ui.routed_text && ui.text_routing && snap.version - ui.routed_version < 10) return;
  ui.routed_text = text;
  ui.routed_version = snap.version;
  try {
    ui.text_routing = route_text(snap.eval_model, *snap.params, text);
    ui.text_error.clear();
  } catch (const Error& e) {
    ui.text_routing.reset();
    ui.text_error = e.what();
  }
}

void flow_canvas(UiState& ui, const BatchRouting& r, Index seq, float height) {
  const int E = static_cast<int>(r.num_experts);
  const Index T = r.batch.seq_len;
  const LayerRouting& l = r.layers[static_cast<std::size_t>(ui.layer)];
  const Index first = seq * T;
  const std::vector<ByteGlyph> glyphs =
      utf8_glyphs(std::span<const std::int32_t>(r.batch.inputs.data() + first, static_cast<std::size_t>(T)));
  const int window = static_cast<int>(std::min<Index>(ui.window, T));
  ui.window_start = std::clamp(ui.window_start, 0, static_cast<int>(T) - window);

  const ImVec2 p0 = ImGui::GetCursorScreenPos();
  const float width = ImGui::GetContentRegionAvail().x;
  ImGui::InvisibleButton("flows", ImVec2(width, height));
  const bool hovered = ImGui::IsItemHovered();
  const bool clicked = ImGui::IsItemClicked();
  ImDrawList* dl = ImGui::GetWindowDrawList();
  dl->AddRectFilled(p0, ImVec2(p0.x + width, p0.y + height), IM_COL32(18, 20, 26, 255), 4.0f);
  const ImVec2 mouse = ImGui::GetIO().MousePos;

  // Token column.
  const float row = (height - 24) / static_cast<float>(window);
  const float tok_x = p0.x + 70, tok_w = 46;
  int hovered_row = -1;
  for (int i = 0; i < window; ++i) {
    const float y = p0.y + 18 + row * static_cast<float>(i);
    if (hovered && mouse.y >= y && mouse.y < y + row && mouse.x < tok_x + tok_w + 20) hovered_row = i;
  }
  // Expert column and load bars.
  const float ex_x = p0.x + width * 0.52f, ex_w = 84;
  const float ex_row = (height - 24) / static_cast<float>(E);
  auto expert_y = [&](int e) { return p0.y + 18 + ex_row * (static_cast<float>(e) + 0.5f); };
  std::int64_t max_load = 1;
  for (std::int64_t n : l.load) max_load = std::max(max_load, n);
  const Index N = r.batch.batch_size * T;
  const double even = balanced_load(N, r.top_k, r.num_experts);
  const double capacity = std::isfinite(l.capacity) ? l.capacity * static_cast<double>(N / std::max<Index>(1, l.micro_tokens)) : NAN;
  const double scale_max = std::max({static_cast<double>(max_load), even * 1.25, std::isfinite(capacity) ? capacity * 1.05 : 0.0});
  const float bar_x = ex_x + ex_w + 12, bar_w = p0.x + width - bar_x - 110;
  for (int e = 0; e < E; ++e) {
    const float y = expert_y(e);
    const float h = std::min(ex_row - 4, 34.0f);
    dl->AddRectFilled(ImVec2(ex_x, y - h / 2), ImVec2(ex_x + ex_w, y + h / 2), ExpertColour(e, E, 0.9f), 4.0f);
    const std::string name = fmt::format("expert {}", e);
    dl->AddText(ImVec2(ex_x + 8, y - 8), IM_COL32(255, 255, 255, 255), name.c_str());
    const std::int64_t load = l.load[static_cast<std::size_t>(e)];
    const float w = static_cast<float>(static_cast<double>(load) / scale_max) * bar_w;
    dl->AddRectFilled(ImVec2(bar_x, y - h / 3), ImVec2(bar_x + w, y + h / 3), ExpertColour(e, E, 0.55f), 2.0f);
    const std::int64_t dropped = l.dropped[static_cast<std::size_t>(e)];
    const std::string label = dropped > 0 ? fmt::format("{} pairs, {} dropped", load, dropped) : fmt::format("{} pairs", load);
    dl->AddText(ImVec2(bar_x + w + 6, y - 8), IM_COL32(200, 200, 210, 255), label.c_str());
  }
  const float even_x = bar_x + static_cast<float>(even / scale_max) * bar_w;
  dl->AddLine(ImVec2(even_x, p0.y + 12), ImVec2(even_x, p0.y + height - 6), IM_COL32(230, 230, 230, 160), 1.5f);
  dl->AddText(ImVec2(even_x - 30, p0.y + 1), IM_COL32(230, 230, 230, 200), "even share");
  if (std::isfinite(capacity)) {
    const float cap_x = bar_x + static_cast<float>(capacity / scale_max) * bar_w;
    dl->AddLine(ImVec2(cap_x, p0.y + 12), ImVec2(cap_x, p0.y + height - 6), IM_COL32(255, 80, 80, 230), 2.0f);
    dl->AddText(ImVec2(cap_x + 3, p0.y + 1), IM_COL32(255, 110, 110, 255), "capacity");
  }

  // Flows, then the tokens on top of them.
  const int focus = hovered_row;
  for (int i = 0; i < window; ++i) {
    const Index t = first + ui.window_start + i;
    const float y = p0.y + 18 + row * (static_cast<float>(i) + 0.5f);
    const ImVec2 from(tok_x + tok_w, y);
    for (std::size_t j = 0; j < l.routes[static_cast<std::size_t>(t)].size(); ++j) {
      const TokenRoute& p = l.routes[static_cast<std::size_t>(t)][j];
      const ImVec2 to(ex_x, expert_y(p.expert));
      const float alpha = focus < 0 ? 0.45f : (focus == i ? 0.95f : 0.08f);
      const float thick = 1.0f + p.gate * 9.0f;
      if (!p.kept) {  // a dropped pair: a thin red line that stops short of the expert, crossed out
        const ImVec2 end = bezier(from, to, 0.8f);
        dl->AddBezierCubic(from, ImVec2((from.x + to.x) / 2, from.y), ImVec2((from.x + to.x) / 2, to.y), to,
                           IM_COL32(255, 60, 60, static_cast<int>(alpha * 120)), 1.0f);
        dl->AddLine(ImVec2(end.x - 6, end.y - 6), ImVec2(end.x + 6, end.y + 6), IM_COL32(255, 60, 60, 255), 2.5f);
        dl->AddLine(ImVec2(end.x - 6, end.y + 6), ImVec2(end.x + 6, end.y - 6), IM_COL32(255, 60, 60, 255), 2.5f);
        continue;
      }
      dl->AddBezierCubic(from, ImVec2((from.x + to.x) / 2, from.y), ImVec2((from.x + to.x) / 2, to.y), to,
                         ExpertColour(p.expert, E, alpha), thick);
      // Particles travel along the flow; a larger gate carries larger ones.
      for (int k = 0; k < 3; ++k) {
        const float s = std::fmod(ui.phase + static_cast<float>(k) / 3.0f + static_cast<float>(j) * 0.17f, 1.0f);
        dl->AddCircleFilled(bezier(from, to, s), 1.5f + p.gate * 3.0f, IM_COL32(255, 255, 255, static_cast<int>(alpha * 230)));
      }
    }
  }
  for (int i = 0; i < window; ++i) {
    const Index pos = ui.window_start + i;
    const Index t = first + pos;
    const float y = p0.y + 18 + row * static_cast<float>(i);
    const std::uint8_t byte = static_cast<std::uint8_t>(r.batch.inputs[static_cast<std::size_t>(t)]);
    const ByteGlyph& g = glyphs[static_cast<std::size_t>(pos)];
    const bool pinned = ui.pinned_token == t;
    dl->AddRectFilled(ImVec2(tok_x, y + 1), ImVec2(tok_x + tok_w, y + row - 1),
                      focus == i ? IM_COL32(90, 96, 120, 255) : IM_COL32(48, 52, 64, 255), 3.0f);
    if (pinned) dl->AddRect(ImVec2(tok_x, y + 1), ImVec2(tok_x + tok_w, y + row - 1), IM_COL32(255, 220, 80, 255), 3.0f, 0, 2.0f);
    const std::string text = GlyphText(g, byte);
    const ImVec2 ts = ImGui::CalcTextSize(text.c_str());
    dl->AddText(ImVec2(tok_x + (tok_w - ts.x) / 2, y + (row - ts.y) / 2), IM_COL32(240, 240, 240, 255), text.c_str());
    const std::string index = fmt::format("{}", pos);
    dl->AddText(ImVec2(p0.x + 8, y + (row - ts.y) / 2), IM_COL32(120, 124, 136, 255), index.c_str());
    // A character of several bytes: a bracket joins its bytes.
    if (g.valid && g.length > 1) {
      const float bx = tok_x - 8;
      if (g.part == 0) dl->AddLine(ImVec2(bx, y + 3), ImVec2(bx + 5, y + 3), IM_COL32(200, 200, 120, 255), 1.5f);
      if (g.part == g.length - 1) dl->AddLine(ImVec2(bx, y + row - 3), ImVec2(bx + 5, y + row - 3), IM_COL32(200, 200, 120, 255), 1.5f);
      dl->AddLine(ImVec2(bx, y + (g.part == 0 ? 3 : 0)), ImVec2(bx, y + (g.part == g.length - 1 ? row - 3 : row)),
                  IM_COL32(200, 200, 120, 255), 1.5f);
    }
  }
  dl->AddText(ImVec2(tok_x - 6, p0.y + 1), IM_COL32(180, 180, 190, 255), "tokens (bytes)");
  dl->AddText(ImVec2(ex_x, p0.y + 1), IM_COL32(180, 180, 190, 255), fmt::format("block {}: experts", l.layer).c_str());
  if (focus >= 0) {
    TokenTooltip(r, first + ui.window_start + focus);
    if (clicked) ui.pinned_token = static_cast<int>(first + ui.window_start + focus);
  }
}

// The whole sequence, 64 bytes a line: the characters, and under each byte one colour bar per MoE
// block, the colour of its first-choice expert.
void sequence_strip(UiState& ui, const BatchRouting& r, Index seq) {
  const int E = static_cast<int>(r.num_experts);
  const Index T = r.batch.seq_len, first = seq * T;
  const std::vector<ByteGlyph> glyphs =
      utf8_glyphs(std::span<const std::int32_t>(r.batch.inputs.data() + first, static_cast<std::size_t>(T)));
  const int per_line = 64;
  const float width = ImGui::GetContentRegionAvail().x - 60;
  const float cell = std::min(width / per_line, 22.0f);
  const float text_h = ImGui::GetTextLineHeight() + 2, bar_h = 7;
  const int L = static_cast<int>(r.layers.size());
  const float line_h = text_h + bar_h * static_cast<float>(L) + 8;
  const int lines = static_cast<int>((T + per_line - 1) / per_line);
  const ImVec2 p0 = ImGui::GetCursorScreenPos();
  ImGui::InvisibleButton("strip", ImVec2(width + 60, line_h * static_cast<float>(lines)));
  const bool hovered = ImGui::IsItemHovered();
  const ImVec2 mouse = ImGui::GetIO().MousePos;
  ImDrawList* dl = ImGui::GetWindowDrawList();
  Index hover = -1;
  for (Index pos = 0; pos < T; ++pos) {
    const float x = p0.x + 60 + cell * static_cast<float>(pos % per_line);
    const float y = p0.y + line_h * static_cast<float>(pos / per_line);
    const Index t = first + pos;
    const ByteGlyph& g = glyphs[static_cast<std::size_t>(pos)];
    const std::uint8_t byte = static_cast<std::uint8_t>(r.batch.inputs[static_cast<std::size_t>(t)]);
    const bool in_window = pos >= ui.window_start && pos < ui.window_start + ui.window;
    if (in_window) dl->AddRectFilled(ImVec2(x, y), ImVec2(x + cell, y + text_h), IM_COL32(60, 64, 80, 255));
    if (g.part == 0) {
      std::string s = GlyphText(g, byte);
      if (g.length == 1 && s.size() > 1 && byte != ' ' && byte != '\n') s = "\xC2\xB7";  // hex does not fit a cell
      const ImVec2 ts = ImGui::CalcTextSize(s.c_str());
      const float span = cell * static_cast<float>(g.valid ? g.length : 1);  // a character spans its bytes
      dl->AddText(ImVec2(x + (span - ts.x) / 2, y + 1), IM_COL32(235, 235, 235, 255), s.c_str());
    }
    for (int j = 0; j < L; ++j) {
      const std::vector<TokenRoute>& routes = r.layers[static_cast<std::size_t>(j)].routes[static_cast<std::size_t>(t)];
      const float by = y + text_h + bar_h * static_cast<float>(j);
      if (!routes.empty())
        dl->AddRectFilled(ImVec2(x + 0.5f, by), ImVec2(x + cell - 0.5f, by + bar_h - 1), ExpertColour(routes[0].expert, E));
    }
    if (hovered && mouse.x >= x && mouse.x < x + cell && mouse.y >= y && mouse.y < y + line_h) hover = t;
  }
  // The first and the last block's rows are labelled; the last only where its label clears the first's.
  std::vector<int> labelled = {0};
  if (L > 1 && bar_h * static_cast<float>(L - 1) >= text_h) labelled.push_back(L - 1);
  for (int line = 0; line < lines; ++line)
    for (int j : labelled) {
      const std::string s = fmt::format("blk {}", r.layers[static_cast<std::size_t>(j)].layer);
      dl->AddText(ImVec2(p0.x, p0.y + line_h * static_cast<float>(line) + text_h + bar_h * static_cast<float>(j) - 4),
                  IM_COL32(150, 150, 160, 255), s.c_str());
    }
  if (hover >= 0) {
    TokenTooltip(r, hover);
    if (ImGui::IsItemClicked()) {
      ui.pinned_token = static_cast<int>(hover);
      ui.window_start = static_cast<int>(hover - first) - ui.window / 2;
    }
  }
}

}  // namespace

void ShowRoutingPanel(UiState& ui, const Snapshot& snap) {
  if (snap.model.moe_layout == MoeLayout::dense) {
    ImGui::TextWrapped("This model (%s) is dense: it has no router. Choose an MoE model in the Training panel.",
                       snap.config.model_name.c_str());
    return;
  }
  Explain("Each byte of text is a token. In every MoE block, the router scores all experts for each token and sends it "
          "to its top-k: the lines below, thicker for a larger gate (the weight of that expert's output). Hover a "
          "token to see its experts in every block; click one to pin it for the Numerics panel.");
  ImGui::RadioButton("the batch being trained on", &ui.own_text, 0);
  ImGui::SameLine();
  ImGui::RadioButton("my own text", &ui.own_text, 1);
  HelpMarker("The live batch is what the last training step routed (the trainer's own events: the routing that the "
             "gradient saw). Your own text is run forward with the current parameters, no router noise, as `moelab "
             "route --checkpoint --text` does; it changes as the model trains.");
  const BatchRouting* r = &snap.routing;
  Index seq = 0;
  if (ui.own_text) {
    ImGui::SetNextItemWidth(700);
    ImGui::InputText("text", ui.text, sizeof(ui.text));
    route_own_text(ui, snap);
    if (!ui.text_routing) {
      ImGui::TextColored(ImVec4(1, 0.4f, 0.4f, 1), "%s", ui.text_error.c_str());
      return;
    }
    r = &*ui.text_routing;
  } else {
    ImGui::SameLine(0, 30);
    ImGui::SetNextItemWidth(160);
    ImGui::SliderInt("sequence", &ui.sequence, 0, static_cast<int>(r->batch.batch_size) - 1);
    ui.sequence = std::clamp(ui.sequence, 0, static_cast<int>(r->batch.batch_size) - 1);
    seq = ui.sequence;
    const std::int32_t domain = r->batch.domains.empty() ? -1 : r->batch.domains[static_cast<std::size_t>(seq * r->batch.seq_len)];
    ImGui::SameLine();
    ImGui::TextDisabled("domain: %s, step %lld%s",
                        domain >= 0 && static_cast<std::size_t>(domain) < snap.domain_names.size()
                            ? snap.domain_names[static_cast<std::size_t>(domain)].c_str() : "?",
                        static_cast<long long>(r->step), r->trained ? "" : " (not trained yet: the batch step 0 will see)");
  }
  const int L = static_cast<int>(r->layers.size());
  ui.layer = std::clamp(ui.layer, 0, L - 1);
  ImGui::SetNextItemWidth(160);
  ImGui::SliderInt("MoE block", &ui.layer, 0, L - 1, fmt::format("block {}", r->layers[static_cast<std::size_t>(ui.layer)].layer).c_str());
  HelpMarker("Every block has its own router and its own experts. Early blocks tend to route by the byte itself; "
             "later ones by context.");
  ImGui::SameLine(0, 30);
  ImGui::SetNextItemWidth(260);
  ImGui::SliderInt("first token shown", &ui.window_start, 0, std::max(0, static_cast<int>(r->batch.seq_len) - ui.window));
  ImGui::SameLine(0, 30);
  ImGui::TextDisabled("top-%d of %lld experts", r->top_k, static_cast<long long>(r->num_experts));
  const SharedExpertsConfig& shared = snap.model.moe.shared;
  if (shared.count > 0) {
    ImGui::SameLine();
    ImGui::TextDisabled("+ %d shared%s, not drawn", shared.count, shared.gated ? " (gated)" : "");
    HelpMarker("Shared experts (DeepSeek, Qwen-MoE, Llama 4) take every token, with no router: each token's output is "
               "its routed experts' gated sum plus the shared experts' output (for Qwen-MoE scaled by a sigmoid gate of "
               "its own). They carry what every token needs, so the routed experts can specialise.");
  }
  HelpMarker("Load bars: token-expert pairs each expert received from the whole batch. The white line is the even "
             "share (N k / E); a red line is the capacity, where the layer drops tokens beyond it (switch, gshard, or "
             "--capacity-factor). A dropped pair is drawn red and crossed out: that expert never sees the token, which "
             "then only keeps its residual stream.");
  const float strip_h = (ImGui::GetTextLineHeight() + 2 + 7.0f * static_cast<float>(L) + 8) *
                        static_cast<float>((r->batch.seq_len + 63) / 64);
  const float flows_h = std::max(220.0f, ImGui::GetContentRegionAvail().y - strip_h - 40);
  flow_canvas(ui, *r, seq, flows_h);
  ImGui::TextDisabled("The whole sequence: under each byte, one bar per block in the colour of its first-choice expert "
                      "(multi-byte characters span their bytes; bytes the font lacks in hex):");
  sequence_strip(ui, *r, seq);
}

}  // namespace moelab::viewer
