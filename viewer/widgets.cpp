// moelab/viewer/widgets.cpp — the widgets every panel uses (see ui.h): help markers, colours, line
// charts, heatmaps, fonts and token glyphs. All drawn with ImDrawList; no plotting library.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>

#include "reference/analysis.h"
#include "viewer/ui.h"

namespace moelab::viewer {

void HelpMarker(const char* text) {
  ImGui::SameLine();
  ImGui::TextDisabled("(?)");
  if (ImGui::IsItemHovered()) {
    ImGui::BeginTooltip();
    ImGui::PushTextWrapPos(ImGui::GetFontSize() * 34.0f);
    ImGui::TextUnformatted(text);
    ImGui::PopTextWrapPos();
    ImGui::EndTooltip();
  }
}

void Explain(const char* text) {
  ImGui::PushStyleColor(ImGuiCol_Text, ImGui::GetStyleColorVec4(ImGuiCol_TextDisabled));
  ImGui::TextWrapped("%s", text);
  ImGui::PopStyleColor();
}

ImU32 ExpertColour(int expert, int experts, float alpha) {
  // Ten well separated hues (Tableau 10), then evenly spaced hues for larger expert counts.
  static const ImU32 kTab10[] = {IM_COL32(31, 119, 180, 255), IM_COL32(255, 127, 14, 255), IM_COL32(44, 160, 44, 255),
                                 IM_COL32(214, 39, 40, 255),  IM_COL32(148, 103, 189, 255), IM_COL32(140, 86, 75, 255),
                                 IM_COL32(227, 119, 194, 255), IM_COL32(127, 127, 127, 255), IM_COL32(188, 189, 34, 255),
                                 IM_COL32(23, 190, 207, 255)};
  ImVec4 c;
  if (experts <= 10) {
    c = ImGui::ColorConvertU32ToFloat4(kTab10[expert % 10]);
  } else {
    float r = 0, g = 0, b = 0;
    ImGui::ColorConvertHSVtoRGB(static_cast<float>(expert) / static_cast<float>(experts), 0.65f, 0.9f, r, g, b);
    c = ImVec4(r, g, b, 1.0f);
  }
  c.w = alpha;
  return ImGui::ColorConvertFloat4ToU32(c);
}

ImU32 SeriesColour(int i) { return ExpertColour(i, 10); }

ImU32 HeatColour(double v) {
  // A viridis-like ramp through five stops.
  static const float kStops[5][3] = {{0.27f, 0.00f, 0.33f}, {0.23f, 0.32f, 0.55f}, {0.13f, 0.57f, 0.55f},
                                     {0.37f, 0.79f, 0.38f}, {0.99f, 0.91f, 0.14f}};
  if (!std::isfinite(v)) return IM_COL32(255, 0, 255, 255);
  const double x = std::clamp(v, 0.0, 1.0) * 4.0;
  const int i = std::min(3, static_cast<int>(x));
  const float f = static_cast<float>(x - i);
  float c[3];
  for (int k = 0; k < 3; ++k) c[k] = kStops[i][k] + f * (kStops[i + 1][k] - kStops[i][k]);
  return ImGui::ColorConvertFloat4ToU32(ImVec4(c[0], c[1], c[2], 1.0f));
}

// ---- Line chart -------------------------------------------------------------------------------------

void LineChart(const char* id, ImVec2 size, std::span<const Series> series, const ChartStyle& style) {
  ImGui::PushID(id);
  if (size.x <= 0) size.x = ImGui::GetContentRegionAvail().x;
  const ImVec2 p0 = ImGui::GetCursorScreenPos();
  ImGui::InvisibleButton("chart", size);
  const bool hovered = ImGui::IsItemHovered();
  ImDrawList* dl = ImGui::GetWindowDrawList();
  const ImVec2 p1(p0.x + size.x, p0.y + size.y);
  dl->AddRectFilled(p0, p1, IM_COL32(22, 24, 30, 255), 3.0f);
  const float left = 52, right = 10, top = 18, bottom = 20;
  const ImVec2 a(p0.x + left, p0.y + top), b(p1.x - right, p1.y - bottom);

  double x0 = std::numeric_limits<double>::infinity(), x1 = -x0, y0 = x0, y1 = -x0;
  for (const Series& s : series)
    for (std::size_t i = 0; i < s.x->size() && i < s.y->size(); ++i) {
      const double x = (*s.x)[i], y = (*s.y)[i];
      if (!std::isfinite(x) || !std::isfinite(y)) continue;
      x0 = std::min(x0, x);
      x1 = std::max(x1, x);
      y0 = std::min(y0, y);
      y1 = std::max(y1, y);
    }
  for (const HLine& h : style.hlines) {
    y0 = std::min(y0, h.y);
    y1 = std::max(y1, h.y);
  }
  const bool empty = !std::isfinite(x0);
  if (empty) {
    x0 = 0;
    x1 = 1;
    y0 = 0;
    y1 = 1;
  }
  if (style.y_min) y0 = *style.y_min;
  if (style.y_max) y1 = *style.y_max;
  if (x1 <= x0) x1 = x0 + 1;
  if (y1 <= y0) y1 = y0 + (y0 == 0 ? 1 : std::abs(y0) * 0.1);
  if (!style.y_max) y1 += 0.05 * (y1 - y0);
  auto X = [&](double x) { return a.x + static_cast<float>((x - x0) / (x1 - x0)) * (b.x - a.x); };
  auto Y = [&](double y) { return b.y - static_cast<float>((std::clamp(y, y0, y1) - y0) / (y1 - y0)) * (b.y - a.y); };

  const ImU32 grid = IM_COL32(60, 64, 76, 255), label = IM_COL32(170, 175, 185, 255);
  for (int i = 0; i <= 4; ++i) {
    const double y = y0 + (y1 - y0) * i / 4.0;
    dl->AddLine(ImVec2(a.x, Y(y)), ImVec2(b.x, Y(y)), grid);
    const std::string t = fmt::format("{:.3g}", y);
    dl->AddText(ImVec2(p0.x + 4, Y(y) - 7), label, t.c_str());
  }
  std::string previous;
  for (int i = 0; i <= 4; ++i) {
    const double x = x0 + (x1 - x0) * i / 4.0;
    const std::string t = fmt::format("{:.0f}", x);
    if (t == previous) continue;  // a short range: each whole step once
    previous = t;
    const float w = ImGui::CalcTextSize(t.c_str()).x;
    dl->AddText(ImVec2(std::clamp(X(x) - w / 2, a.x, b.x - w), b.y + 3), label, t.c_str());
  }
  dl->AddText(ImVec2(a.x + 4, p0.y + 2), label, style.y_label);
  dl->PushClipRect(a, ImVec2(b.x + 1, b.y + 1), true);
  for (const HLine& h : style.hlines) {
    const float y = Y(h.y);
    for (float x = a.x; x < b.x; x += 8) dl->AddLine(ImVec2(x, y), ImVec2(std::min(x + 4, b.x), y), h.colour, 1.5f);
    const float w = ImGui::CalcTextSize(h.label.c_str()).x;
    dl->AddText(ImVec2(b.x - w - 4, y - 16), h.colour, h.label.c_str());
  }
  std::vector<ImVec2> points;
  for (const Series& s : series) {
    const std::size_t n = std::min(s.x->size(), s.y->size());
    // One point per ~2 pixels is all a screen shows (and llvmpipe draws every vertex on the CPU).
    const std::size_t stride = std::max<std::size_t>(1, n / static_cast<std::size_t>(std::max(16.0f, (b.x - a.x) / 2)));
    points.clear();
    for (std::size_t i = 0; i < n; i = (i + stride < n || i == n - 1) ? i + stride : n - 1) {  // the last point always
      const double x = (*s.x)[i], y = (*s.y)[i];
      if (!std::isfinite(x) || !std::isfinite(y)) continue;
      points.emplace_back(X(x), Y(y));
      if (s.points) dl->AddCircleFilled(points.back(), 3.0f, s.colour);
    }
    if (points.size() >= 2) dl->AddPolyline(points.data(), static_cast<int>(points.size()), s.colour, 0, s.thickness);
  }
  dl->PopClipRect();
  if (style.legend) {
    float x = b.x;
    for (auto it = series.rbegin(); it != series.rend(); ++it) {
      const float w = ImGui::CalcTextSize(it->label.c_str()).x;
      x -= w + 18;
      dl->AddRectFilled(ImVec2(x, p0.y + 6), ImVec2(x + 10, p0.y + 14), it->colour);
      dl->AddText(ImVec2(x + 13, p0.y + 2), label, it->label.c_str());
    }
  }
  if (empty) dl->AddText(ImVec2(a.x + 10, (a.y + b.y) / 2), label, "no data yet: start training");
  if (hovered && !empty) {
    const double mx = x0 + (ImGui::GetIO().MousePos.x - a.x) / (b.x - a.x) * (x1 - x0);
    dl->AddLine(ImVec2(X(mx), a.y), ImVec2(X(mx), b.y), IM_COL32(255, 255, 255, 80));
    ImGui::BeginTooltip();
    ImGui::Text("%s %.0f", style.x_label, mx);
    for (const Series& s : series) {
      const std::size_t n = std::min(s.x->size(), s.y->size());
      if (n == 0) continue;
      const auto it = std::lower_bound(s.x->begin(), s.x->begin() + static_cast<std::ptrdiff_t>(n), mx);
      std::size_t i = static_cast<std::size_t>(std::min<std::ptrdiff_t>(it - s.x->begin(), static_cast<std::ptrdiff_t>(n) - 1));
      if (i > 0 && std::abs((*s.x)[i - 1] - mx) < std::abs((*s.x)[i] - mx)) --i;
      ImGui::TextColored(ImGui::ColorConvertU32ToFloat4(s.colour), "%s: %.4g (at %.0f)", s.label.c_str(), (*s.y)[i], (*s.x)[i]);
    }
    ImGui::EndTooltip();
  }
  ImGui::PopID();
}

// ---- Heatmap -------------------------------------------------------------------------------------------

void Heatmap(const char* id, const MatrixD& values, std::span<const std::string> rows, std::span<const std::string> cols,
             double vmax, const char* format, float cell_width, float cell_height) {
  ImGui::PushID(id);
  float label_width = 0;
  for (const std::string& r : rows) label_width = std::max(label_width, ImGui::CalcTextSize(r.c_str()).x);
  label_width += 8;
  const ImVec2 p0 = ImGui::GetCursorScreenPos();
  const float header = ImGui::GetTextLineHeight() + 4;
  const ImVec2 size(label_width + cell_width * static_cast<float>(values.cols()),
                    header + cell_height * static_cast<float>(values.rows()));
  ImGui::InvisibleButton("heatmap", size);
  const bool hovered = ImGui::IsItemHovered();
  ImDrawList* dl = ImGui::GetWindowDrawList();
  const ImU32 text = IM_COL32(220, 222, 228, 255);
  for (Index c = 0; c < values.cols(); ++c) {
    const char* name = static_cast<std::size_t>(c) < cols.size() ? cols[static_cast<std::size_t>(c)].c_str() : "";
    const float w = ImGui::CalcTextSize(name).x;
    const float x = p0.x + label_width + cell_width * static_cast<float>(c);
    dl->AddText(ImVec2(x + (cell_width - w) / 2, p0.y), ExpertColour(static_cast<int>(c), static_cast<int>(values.cols())), name);
  }
  const ImVec2 mouse = ImGui::GetIO().MousePos;
  for (Index r = 0; r < values.rows(); ++r) {
    const float y = p0.y + header + cell_height * static_cast<float>(r);
    if (static_cast<std::size_t>(r) < rows.size())
      dl->AddText(ImVec2(p0.x, y + (cell_height - ImGui::GetTextLineHeight()) / 2), text, rows[static_cast<std::size_t>(r)].c_str());
    for (Index c = 0; c < values.cols(); ++c) {
      const float x = p0.x + label_width + cell_width * static_cast<float>(c);
      const double v = values(r, c);
      const ImVec2 q0(x + 1, y + 1), q1(x + cell_width - 1, y + cell_height - 1);
      dl->AddRectFilled(q0, q1, HeatColour(vmax > 0 ? v / vmax : 0));
      const std::string s = fmt::format(fmt::runtime(format), v);
      const ImVec2 ts = ImGui::CalcTextSize(s.c_str());
      if (ts.x < cell_width - 2)
        dl->AddText(ImVec2(x + (cell_width - ts.x) / 2, y + (cell_height - ts.y) / 2),
                    v / vmax > 0.6 ? IM_COL32(20, 20, 20, 255) : IM_COL32(240, 240, 240, 255), s.c_str());
      if (hovered && mouse.x >= q0.x && mouse.x < q1.x && mouse.y >= q0.y && mouse.y < q1.y) {
        dl->AddRect(q0, q1, IM_COL32(255, 255, 255, 255), 0, 0, 2.0f);
        ImGui::SetTooltip("%s, %s: %.4f", static_cast<std::size_t>(r) < rows.size() ? rows[static_cast<std::size_t>(r)].c_str() : "",
                          static_cast<std::size_t>(c) < cols.size() ? cols[static_cast<std::size_t>(c)].c_str() : "", v);
      }
    }
  }
  ImGui::PopID();
}

// ---- Fonts and glyphs ------------------------------------------------------------------------------

namespace {

ImVector<ImWchar> g_latin_ranges, g_cjk_ranges;  // must live as long as the font atlas

const char* first_existing(std::initializer_list<const char*> paths) {
  std::error_code ec;
  for (const char* p : paths)
    if (std::filesystem::exists(p, ec)) return p;
  return nullptr;
}

}  // namespace

std::string LoadFonts(const Corpus* corpus, float size) {
  ImGuiIO& io = ImGui::GetIO();
  const char* latin = first_existing({"/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"});
  const char* cjk = first_existing({"/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
                                    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
                                    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc"});
  if (latin == nullptr && cjk == nullptr) {
    io.Fonts->AddFontDefault();
    return "no TTF font found (Debian: fonts-dejavu-core, fonts-wqy-microhei): ASCII only, other bytes in hex";
  }
  {
    ImFontGlyphRangesBuilder b;
    b.AddRanges(io.Fonts->GetGlyphRangesDefault());
    b.AddRanges(io.Fonts->GetGlyphRangesCyrillic());
    static const ImWchar kExtra[] = {0x0370, 0x03FF, 0x2000, 0x206F, 0x2190, 0x21FF, 0x2200, 0x22FF,
                                     0x2400, 0x243F, 0x2500, 0x25FF, 0};
    b.AddRanges(kExtra);
    b.BuildRanges(&g_latin_ranges);
  }
  ImFontConfig config;
  config.OversampleH = 2;
  config.OversampleV = 1;
  io.Fonts->AddFontFromFileTTF(latin != nullptr ? latin : cjk, size, &config, g_latin_ranges.Data);
  std::string note = fmt::format("fonts: {}", latin != nullptr ? latin : cjk);
  if (cjk != nullptr) {
    ImFontGlyphRangesBuilder b;
    b.AddRanges(io.Fonts->GetGlyphRangesChineseSimplifiedCommon());
    // Every character of the corpus (Chinese poems use many outside the common set).
    if (corpus != nullptr)
      for (const Document& d : corpus->documents)
        if (d.domain.find("zh") != std::string::npos) b.AddText(d.text.data(), d.text.data() + d.text.size());
    b.BuildRanges(&g_cjk_ranges);
    ImFontConfig merge;
    merge.MergeMode = true;
    merge.OversampleH = 1;
    merge.OversampleV = 1;
    io.Fonts->AddFontFromFileTTF(cjk, size, &merge, g_cjk_ranges.Data);
    note += fmt::format(" + {} (CJK)", cjk);
  }
  io.Fonts->TexDesiredWidth = 4096;
  return note;
}

bool FontHas(std::uint32_t cp) {
  if (cp > 0xFFFF) return false;  // ImWchar is 16 bits in Debian's build
  return ImGui::GetFont()->FindGlyphNoFallback(static_cast<ImWchar>(cp)) != nullptr;
}

std::string GlyphText(const ByteGlyph& g, std::uint8_t byte) {
  if (!g.valid) return fmt::format("{:02X}", byte);
  if (g.part > 0) return FontHas(g.codepoint) ? "\xC2\xB7" : fmt::format("{:02X}", byte);  // "·"
  if (g.length == 1) {
    if (byte == ' ') return FontHas(0x2423) ? "\xE2\x90\xA3" : "_";
    if (byte == '\n') return FontHas(0x21B5) ? "\xE2\x86\xB5" : "\\n";
    if (byte == '\t') return "\\t";
    if (byte < 0x20 || byte == 0x7F) return fmt::format("{:02X}", byte);
    return std::string(1, static_cast<char>(byte));
  }
  if (FontHas(g.codepoint)) return utf8_encode(g.codepoint);
  return fmt::format("{:02X}", byte);
}

void TokenTooltip(const BatchRouting& routing, Index token) {
  const std::vector<std::int32_t>& bytes = routing.batch.inputs;
  if (token < 0 || token >= static_cast<Index>(bytes.size())) return;
  const Index T = routing.batch.seq_len;
  const Index start = token - token % T;
  const std::vector<ByteGlyph> glyphs =
      utf8_glyphs(std::span<const std::int32_t>(bytes.data() + start, static_cast<std::size_t>(T)));
  const ByteGlyph& g = glyphs[static_cast<std::size_t>(token - start)];
  const std::uint8_t byte = static_cast<std::uint8_t>(bytes[static_cast<std::size_t>(token)]);
  ImGui::BeginTooltip();
  if (g.valid && g.codepoint >= 0x20 && g.codepoint != 0x7F) {
    ImGui::Text("token %lld (position %lld): byte 0x%02X of '%s' (U+%04X, byte %d of %d)", static_cast<long long>(token),
                static_cast<long long>(token - start), byte, utf8_encode(g.codepoint).c_str(), g.codepoint,
                g.part + 1, g.length);
  } else {
    ImGui::Text("token %lld (position %lld): byte 0x%02X %s", static_cast<long long>(token),
                static_cast<long long>(token - start), byte, byte_label(byte).c_str());
  }
  ImGui::Separator();
  for (const LayerRouting& l : routing.layers) {
    ImGui::Text("block %d:", l.layer);
    for (const TokenRoute& r : l.routes[static_cast<std::size_t>(token)]) {
      ImGui::SameLine();
      ImGui::TextColored(ImGui::ColorConvertU32ToFloat4(ExpertColour(r.expert, static_cast<int>(routing.num_experts))),
                         "expert %d (gate %.3f)%s", r.expert, r.gate, r.kept ? "" : " DROPPED");
    }
  }
  ImGui::EndTooltip();
}

}  // namespace moelab::viewer
