// moelab/viewer/panels_numerics.cpp — panel 4, numerics: logits rounded to fp32 / bf16 / fp16 / fp8,
// the naive softmax overflowing where the stable one does not (numerics.h softmax_in_format), the
// top-k choices that flip when the live router runs in bf16, and the z-loss keeping logits small.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "viewer/ui.h"

namespace moelab::viewer {

namespace {

ImVec4 value_colour(float v) {
  if (std::isnan(v)) return ImVec4(1.0f, 0.3f, 0.9f, 1.0f);
  if (std::isinf(v)) return ImVec4(1.0f, 0.35f, 0.35f, 1.0f);
  return ImGui::GetStyleColorVec4(ImGuiCol_Text);
}

void cell(float v) {
  ImGui::TableNextColumn();
  // printf writes inf/inf as "-nan" on x86 (the sign bit of the default NaN); the sign of a NaN means nothing.
  if (std::isnan(v))
    ImGui::TextColored(value_colour(v), "NaN");
  else
    ImGui::TextColored(value_colour(v), "%.6g", static_cast<double>(v));
}

// The logits the panel works on: the sliders', or the live router's for one token of the batch.
std::vector<float> chosen_logits(UiState& ui, const Snapshot& snap) {
  ImGui::RadioButton("my logits", &ui.live_logits, 0);
  ImGui::SameLine();
  const bool have_live = !snap.routing.layers.empty();
  if (have_live) ImGui::RadioButton("a live token's router logits", &ui.live_logits, 1);
  HelpMarker("The live router's logits: one token of the batch being trained on (click a token in the Routing panel to "
             "pin it), in one MoE block. The scale multiplies them: a large model's logits drift to hundreds unless "
             "something (the z-loss) holds them down.");
  if (!ui.live_logits || !have_live) {
    for (std::size_t i = 0; i < ui.logits.size(); ++i) {
      ImGui::PushID(static_cast<int>(i));
      ImGui::SetNextItemWidth(110);
      ImGui::DragFloat("##logit", &ui.logits[i], 0.25f, -1000.0f, 1000.0f, "%.4g");
      ImGui::PopID();
      ImGui::SameLine();
    }
    if (ImGui::Button("+") && ui.logits.size() < 16) ui.logits.push_back(0.0f);
    ImGui::SameLine();
    if (ImGui::Button("-") && ui.logits.size() > 1) ui.logits.pop_back();
    ImGui::TextDisabled("examples:");
    ImGui::SameLine();
    if (ImGui::SmallButton("128.5, 1, 0")) ui.logits = {128.5f, 1.0f, 0.0f};
    ImGui::SameLine();
    if (ImGui::SmallButton("12, 0 (fp16)")) ui.logits = {12.0f, 0.0f};
    ImGui::SameLine();
    if (ImGui::SmallButton("7, 0 (e4m3)")) ui.logits = {7.0f, 0.0f};
    ImGui::SameLine();
    if (ImGui::SmallButton("1, 2, 3")) ui.logits = {1.0f, 2.0f, 3.0f};
    return ui.logits;
  }
  const int L = static_cast<int>(snap.routing.layers.size());
  const int N = static_cast<int>(snap.routing.layers[0].logits.rows());
  if (ui.pinned_token >= 0 && ui.pinned_token < N) ui.live_token = ui.pinned_token;
  ui.live_layer = std::clamp(ui.live_layer, 0, L - 1);
  ui.live_token = std::clamp(ui.live_token, 0, N - 1);
  ImGui::SetNextItemWidth(150);
  ImGui::SliderInt("block##num", &ui.live_layer, 0, L - 1);
  ImGui::SameLine();
  ImGui::SetNextItemWidth(220);
  if (ImGui::SliderInt("token##num", &ui.live_token, 0, N - 1)) ui.pinned_token = -1;
  ImGui::SameLine();
  ImGui::SetNextItemWidth(180);
  ImGui::SliderFloat("x scale", &ui.live_scale, 1.0f, 100.0f, "%.1f", ImGuiSliderFlags_Logarithmic);
  const Matrix& z = snap.routing.layers[static_cast<std::size_t>(ui.live_layer)].logits;
  std::vector<float> v;
  for (Index e = 0; e < z.cols(); ++e) v.push_back(z(ui.live_token, e) * ui.live_scale);
  const std::uint8_t byte = static_cast<std::uint8_t>(snap.routing.batch.inputs[static_cast<std::size_t>(ui.live_token)]);
  ImGui::TextDisabled("token %d is byte 0x%02X '%s', step %lld", ui.live_token, byte, byte_label(byte).c_str(),
                      static_cast<long long>(snap.routing.step));
  return v;
}

// The two softmaxes as bars, side by side per logit; a NaN is a magenta bar to the top with "NaN".
void probability_bars(const NumericsView& v) {
  const ImVec2 p0 = ImGui::GetCursorScreenPos();
  const float w = ImGui::GetContentRegionAvail().x - 10;
  const float h = std::max(80.0f, std::min(220.0f, ImGui::GetContentRegionAvail().y - 30));
  ImGui::Dummy(ImVec2(w, h + 20));
  ImDrawList* dl = ImGui::GetWindowDrawList();
  const std::size_t n = v.logits.size();
  const float slot = w / static_cast<float>(n);
  dl->AddLine(ImVec2(p0.x, p0.y + h), ImVec2(p0.x + w, p0.y + h), IM_COL32(140, 140, 150, 255));
  for (std::size_t i = 0; i < n; ++i) {
    const float x = p0.x + slot * static_cast<float>(i);
    const float bw = std::min(40.0f, slot * 0.35f);
    auto bar = [&](float px, float p, ImU32 colour) {
      if (std::isnan(p)) {
        dl->AddRectFilled(ImVec2(px, p0.y + 14), ImVec2(px + bw, p0.y + h), IM_COL32(230, 70, 220, 120));
        dl->AddText(ImVec2(px + 2, p0.y), IM_COL32(255, 120, 240, 255), "NaN");
        return;
      }
      const float top = p0.y + h - std::clamp(p, 0.0f, 1.0f) * (h - 16);
      dl->AddRectFilled(ImVec2(px, top), ImVec2(px + bw, p0.y + h), colour);
    };
    bar(x + slot * 0.5f - bw - 2, v.naive.probs[i], IM_COL32(255, 120, 80, 255));
    bar(x + slot * 0.5f + 2, v.stable.probs[i], IM_COL32(80, 200, 120, 255));
    const std::string label = fmt::format("p{}", i);
    dl->AddText(ImVec2(x + slot * 0.5f - 8, p0.y + h + 2), IM_COL32(200, 200, 200, 255), label.c_str());
  }
  dl->AddText(ImVec2(p0.x + w - 190, p0.y), IM_COL32(255, 120, 80, 255), "naive");
  dl->AddText(ImVec2(p0.x + w - 120, p0.y), IM_COL32(80, 200, 120, 255), "stable");
}

}  // namespace

void ShowNumericsPanel(UiState& ui, const Snapshot& snap) {
  Explain("Routers turn logits into probabilities with exp. bf16 keeps float32's range but only 8 significant bits, "
          "and exp(x) overflows any format once x passes its limit (88.72 in fp32 and bf16, 11.09 in fp16). A naive "
          "softmax exp(x)/sum then gives inf/inf = NaN; the stable one subtracts the largest logit first and cannot "
          "overflow.");
  if (!ImGui::BeginTable("num", 2, ImGuiTableFlags_SizingStretchProp)) return;
  ImGui::TableSetupColumn("left", ImGuiTableColumnFlags_WidthStretch, 0.56f);
  ImGui::TableSetupColumn("right", ImGuiTableColumnFlags_WidthStretch, 0.44f);
  ImGui::TableNextRow();
  ImGui::TableNextColumn();

  const std::vector<float> logits = chosen_logits(ui, snap);
  ImGui::SetNextItemWidth(150);
  const char* names[] = {"fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2"};
  ImGui::Combo("softmax computed in", &ui.dtype, names, 5);
  const Format f = kAllFormats[ui.dtype];
  const FormatInfo& info = format_info(f);
  ImGui::TextDisabled("%s: %d exponent, %d mantissa bits; max %.6g; exp overflows above %.4f", std::string(info.name).c_str(), info.exponent_bits,
                      info.mantissa_bits, static_cast<double>(info.max), static_cast<double>(info.max_exp_input));
  ui.numerics = numerics_view(logits, f);
  const NumericsView& v = ui.numerics;

  ImGui::TextUnformatted("1. The logits as each format stores them");
  HelpMarker("round_to: round to nearest, ties to even. The last column is the spacing between neighbouring values "
             "of the chosen format near the logit (ulp): in bf16 it is 1.0 between 128 and 256, so 128.5 is stored "
             "as 128.");
  if (ImGui::BeginTable("rounded", 8, ImGuiTableFlags_Borders | ImGuiTableFlags_SizingFixedFit)) {
    for (const char* h : {"i", "logit", "fp32", "bf16", "fp16", "e4m3", "e5m2", "spacing"}) ImGui::TableSetupColumn(h);
    ImGui::TableHeadersRow();
    for (std::size_t i = 0; i < logits.size(); ++i) {
      ImGui::TableNextRow();
      ImGui::TableNextColumn();
      ImGui::Text("%zu", i);
      cell(v.logits[i]);
      for (std::size_t k = 0; k < 5; ++k) cell(v.rounded[k][i]);
      cell(v.spacing[i]);
    }
    ImGui::EndTable();
  }
  ImGui::Text("2. Softmax with every step in %s", std::string(info.name).c_str());
  HelpMarker("Every intermediate is rounded where a kernel working in the format would round it: the input, x - max, "
             "each exp, the running sum after every addition, each quotient (moelab numerics --logits ... --dtype).");
  if (ImGui::BeginTable("softmax", 6, ImGuiTableFlags_Borders | ImGuiTableFlags_SizingFixedFit)) {
    for (const char* h : {"i", "naive exp(x)", "naive p", "x - max", "stable exp", "stable p"}) ImGui::TableSetupColumn(h);
    ImGui::TableHeadersRow();
    for (std::size_t i = 0; i < logits.size(); ++i) {
      ImGui::TableNextRow();
      ImGui::TableNextColumn();
      ImGui::Text("%zu", i);
      cell(v.naive.exps[i]);
      cell(v.naive.probs[i]);
      cell(v.stable.shifted[i]);
      cell(v.stable.exps[i]);
      cell(v.stable.probs[i]);
    }
    ImGui::TableNextRow();
    ImGui::TableNextColumn();
    ImGui::TextUnformatted("sum");
    cell(v.naive.sum);
    ImGui::TableNextColumn();
    ImGui::TableNextColumn();
    cell(v.stable.sum);
    ImGui::EndTable();
  }
  auto verdict = [](const char* name, const LowpSoftmax& s) {
    if (s.overflowed()) {
      ImGui::TextColored(ImVec4(1, 0.35f, 0.35f, 1), "%s: %d exp overflowed, %d NaN probabilities -> OVERFLOW", name,
                         s.overflow_count, s.nan_count);
    } else {
      ImGui::TextColored(ImVec4(0.4f, 0.9f, 0.4f, 1), "%s: no overflow", name);
    }
  };
  verdict("naive  exp(x) / sum", v.naive);
  verdict("stable exp(x - max) / sum", v.stable);
  probability_bars(v);

  ImGui::TableNextColumn();
  ImGui::TextUnformatted("3. The live router in bf16 instead of fp32");
  HelpMarker("The router inputs of the batch (each MoE block's ffn_in, first sequences, after the latest step) go "
             "through the router twice: in fp32, and with inputs, weights and logits rounded to bf16 (router.h's "
             "dtype; products accumulated in float32). Counted: tokens whose set of top-k experts differs. A flip "
             "needs two logits closer than bf16's spacing: the margin column.");
  if (snap.precision) {
    const RouterPrecision& p = *snap.precision;
    Index total = 0;
    for (std::size_t j = 0; j < p.layers.size(); ++j) {
      ImGui::Text("block %d: %lld of %lld tokens change experts (mean |logit change| %.2e)", p.layers[j],
                  static_cast<long long>(p.flipped[j]), static_cast<long long>(p.tokens), p.mean_abs_logit_change[j]);
      total += p.flipped[j];
    }
    ImGui::Text("in all: %lld of %lld (token, block) choices flip", static_cast<long long>(total),
                static_cast<long long>(p.tokens * static_cast<Index>(p.layers.size())));
    if (!p.examples.empty() && ImGui::BeginTable("flips", 5, ImGuiTableFlags_Borders | ImGuiTableFlags_SizingFixedFit)) {
      for (const char* h : {"block", "token", "fp32 experts", "bf16 experts", "margin"}) ImGui::TableSetupColumn(h);
      ImGui::TableHeadersRow();
      for (std::size_t i = 0; i < p.examples.size() && i < 6; ++i) {
        const RouterFlip& x = p.examples[i];
        ImGui::TableNextRow();
        ImGui::TableNextColumn();
        ImGui::Text("%d", x.layer);
        ImGui::TableNextColumn();
        ImGui::Text("%lld '%s'", static_cast<long long>(x.token), byte_label(static_cast<std::uint8_t>(x.byte)).c_str());
        ImGui::TableNextColumn();
        ImGui::Text("%s", fmt::format("{}", fmt::join(x.fp32, ", ")).c_str());
        ImGui::TableNextColumn();
        ImGui::Text("%s", fmt::format("{}", fmt::join(x.low, ", ")).c_str());
        ImGui::TableNextColumn();
        ImGui::Text("%.2e", static_cast<double>(x.margin));
      }
      ImGui::EndTable();
    }
  } else {
    ImGui::TextDisabled("(not available for this model: expert choice or dense)");
  }

  ImGui::Spacing();
  ImGui::TextUnformatted("4. z-loss keeps the router's logits small");
  HelpMarker("ST-MoE's router z-loss adds coef * mean (log sum_e exp z_e)^2. Watch rms and max |z| of the live "
             "router logits (StepMetrics::logit_rms, logit_max_abs). At this size they stay far below bf16's 88.7 "
             "(docs/experiments.md); the z-loss mostly shifts them negative, which softmax ignores.");
  std::vector<double> steps, rms, max;
  for (const StepPoint& p : snap.history) {
    steps.push_back(static_cast<double>(p.step));
    rms.push_back(p.logit_rms);
    max.push_back(p.logit_max_abs);
  }
  const Series zs[] = {Series{.label = "rms z", .x = &steps, .y = &rms, .colour = SeriesColour(0)},
                       Series{.label = "max |z|", .x = &steps, .y = &max, .colour = SeriesColour(3)}};
  LineChart("zlogits", ImVec2(0, std::max(140.0f, ImGui::GetContentRegionAvail().y - 70)), zs,
            ChartStyle{.y_label = "router logits", .y_min = 0.0,
                       .hlines = {HLine{11.09, "fp16 exp overflows above 11.09", IM_COL32(255, 150, 60, 220)}}});
  const double coef = snap.model.moe_layout == MoeLayout::dense ? 0.0 : snap.model.moe.routing.z_loss_coef;
  ImGui::Text("z-loss coefficient now: %.4g", coef);
  ImGui::SetNextItemWidth(180);
  ImGui::SliderFloat("##zcoef", &ui.z_coef, 1e-5f, 1.0f, "%.5f", ImGuiSliderFlags_Logarithmic);
  ImGui::SameLine();
  if (ImGui::Button("apply z-loss")) ui.session->set_z_loss(ui.z_coef);
  ImGui::SameLine();
  if (ImGui::Button("no z-loss")) ui.session->set_z_loss(0.0);
  ImGui::EndTable();
}

}  // namespace moelab::viewer
