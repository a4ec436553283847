// moelab/viewer/panels_balance.cpp — panel 3, load balancing: per-expert load share over the steps,
// the balancing method and its strength switched live (Trainer::set_balance), so that routing
// collapse can be made to happen and undone in front of a class; the aux-loss-free biases.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "viewer/ui.h"

namespace moelab::viewer {

void ShowBalancePanel(UiState& ui, const Snapshot& snap) {
  if (snap.model.moe_layout == MoeLayout::dense) {
    ImGui::TextWrapped("This model is dense: nothing to balance.");
    return;
  }
  const RoutingConfig& rc = snap.model.moe.routing;
  const int E = static_cast<int>(snap.model.moe.num_experts());
  const int L = static_cast<int>(snap.model.n_moe_layers());
  ui.balance_layer = std::clamp(ui.balance_layer, 0, L - 1);
  Explain("A router that is left alone collapses: the experts that happen to win early get trained more, win more, "
          "and the others starve. Two cures: an auxiliary loss that penalises uneven load (Switch, Mixtral), or "
          "DeepSeek-V3's bias, added to each expert's score for the choice only and moved after every step against "
          "that step's load. Switch them here while the model trains.");
  if (!ImGui::BeginTable("bal", 2, ImGuiTableFlags_SizingStretchProp)) return;
  ImGui::TableSetupColumn("left", ImGuiTableColumnFlags_WidthStretch, 0.36f);
  ImGui::TableSetupColumn("right", ImGuiTableColumnFlags_WidthStretch, 0.64f);
  ImGui::TableNextRow();
  ImGui::TableNextColumn();

  ImGui::Text("now: balance = %s", std::string(balance_mode_name(snap.config.balance)).c_str());
  ImGui::BulletText("balance loss: %s, coefficient %.4g", std::string(aux_loss_name(rc.aux_loss)).c_str(), rc.aux_loss_coef);
  ImGui::BulletText("selection bias: %s%s", rc.use_selection_bias ? "on, gamma = " : "off",
                    rc.use_selection_bias ? fmt::format("{:.4g}", rc.bias_update_rate).c_str() : "");
  ImGui::Spacing();
  ImGui::TextUnformatted("Switch live (applies from the next step):");
  HelpMarker("Trainer::set_balance: the parameters and AdamW's state stay, the loss and the routing rule change. The "
             "trajectory differs from that step on; a checkpoint saved afterwards records the new configuration.");
  if (ImGui::Button("none: let it collapse")) ui.session->set_balance(BalanceMode::none, std::nullopt);
  ImGui::SameLine();
  if (ImGui::Button("preset")) ui.session->set_balance(BalanceMode::preset, std::nullopt);
  ImGui::SetNextItemWidth(200);
  ImGui::SliderFloat("aux coefficient", &ui.aux_coef, 0.0f, 1.0f, "%.4f", ImGuiSliderFlags_Logarithmic);
  HelpMarker("alpha of the balance loss: Mixtral uses 0.02 (Hugging Face's loss: E * sum_i f_i P_i, f_i the share of "
             "tokens sent to expert i, P_i its mean router probability). Larger evens the load faster but fights the "
             "language-model loss.");
  if (ImGui::Button("apply aux: balance loss at this coefficient")) ui.session->set_balance(BalanceMode::aux, ui.aux_coef);
  ImGui::SetNextItemWidth(200);
  ImGui::SliderFloat("bias rate gamma", &ui.bias_rate, 0.0f, 0.1f, "%.4f", ImGuiSliderFlags_Logarithmic);
  HelpMarker("aux_free: after each step, b_i += gamma * sign(mean load - load_i) (DeepSeek-V3 sec. 2.1.2; 0.001 there). "
             "The bias only decides the choice; the gates still come from the unbiased scores.");
  if (ImGui::Button("apply aux_free: selection bias at this rate")) ui.session->set_balance(BalanceMode::aux_free, ui.bias_rate);
  if (!snap.error.empty()) ImGui::TextColored(ImVec4(1, 0.4f, 0.4f, 1), "%s", snap.error.c_str());

  ImGui::Spacing();
  ImGui::SetNextItemWidth(200);
  ImGui::SliderInt("MoE block##bal", &ui.balance_layer, 0, L - 1,
                   fmt::format("block {}", snap.routing.layers[static_cast<std::size_t>(ui.balance_layer)].layer).c_str());
  const LayerRouting& l = snap.routing.layers[static_cast<std::size_t>(ui.balance_layer)];
  ImGui::TextUnformatted("selection bias per expert (aux_free)");
  HelpMarker("Positive: the expert was underloaded and is being made more attractive; negative: overloaded.");
  const VectorT<float>& bias =
      snap.params->blocks[static_cast<std::size_t>(l.layer)].moe.routing.selection_bias;
  if (bias.size() == E) {
    const ImVec2 p0 = ImGui::GetCursorScreenPos();
    const float w = ImGui::GetContentRegionAvail().x - 10, h = 110;
    ImGui::Dummy(ImVec2(w, h));
    ImDrawList* dl = ImGui::GetWindowDrawList();
    const float max = std::max(1e-6f, bias.cwiseAbs().maxCoeff());
    const float mid = p0.y + h / 2, bw = w / static_cast<float>(E);
    dl->AddLine(ImVec2(p0.x, mid), ImVec2(p0.x + w, mid), IM_COL32(120, 120, 130, 255));
    for (int e = 0; e < E; ++e) {
      const float v = bias(e) / max * (h / 2 - 14);
      dl->AddRectFilled(ImVec2(p0.x + bw * e + 3, std::min(mid, mid - v)), ImVec2(p0.x + bw * (e + 1) - 3, std::max(mid, mid - v)),
                        ExpertColour(e, E));
      const std::string s = fmt::format("{:+.3f}", bias(e));
      dl->AddText(ImVec2(p0.x + bw * e + 2, v > 0 ? mid + 2 : mid - 16), IM_COL32(220, 220, 220, 255), s.c_str());
    }
  } else {
    ImGui::TextDisabled("(no bias: balance is not aux_free and the preset has none)");
  }

  ImGui::TableNextColumn();
  const LoadSeries s = load_series(snap.history, static_cast<std::size_t>(ui.balance_layer));
  std::vector<Series> series;
  for (std::size_t e = 0; e < s.share.size(); ++e)
    series.push_back(Series{.label = fmt::format("e{}", e), .x = &s.steps, .y = &s.share[e],
                            .colour = ExpertColour(static_cast<int>(e), E)});
  const float h = std::max(160.0f, (ImGui::GetContentRegionAvail().y - 30) * 0.6f);
  ImGui::Text("share of block %d's token-expert pairs per expert, every step", l.layer);
  HelpMarker("Even load is 1/E per expert. With top-k, one expert can take at most 1/k of the pairs (every token "
             "picking it): that is where a collapsed router ends.");
  const int k = std::max(1, rc.top_k);
  LineChart("load", ImVec2(0, h), series,
            ChartStyle{.y_label = "share", .y_min = 0.0,
                       .hlines = {HLine{1.0 / E, "even 1/E", IM_COL32(230, 230, 230, 200)},
                                  HLine{1.0 / k, fmt::format("limit 1/k = {:.2f}", 1.0 / k), IM_COL32(255, 90, 90, 220)}}});
  std::vector<double> steps, imbalance, dropped;
  for (const StepPoint& p : snap.history) {
    steps.push_back(static_cast<double>(p.step));
    imbalance.push_back(p.load_imbalance);
    dropped.push_back(p.dropped_fraction);
  }
  const Series imb[] = {Series{.label = "max / mean load (worst block)", .x = &steps, .y = &imbalance, .colour = SeriesColour(3)},
                        Series{.label = "dropped fraction", .x = &steps, .y = &dropped, .colour = SeriesColour(1)}};
  ImGui::TextUnformatted("imbalance over all blocks");
  HelpMarker("StepMetrics::load_imbalance: the largest max/mean load of any block in the step (1 = even; at most E/k, "
             "when every token chooses the same k experts); dropped fraction: pairs dropped by capacity (0 when dropless).");
  LineChart("imbalance", ImVec2(0, ImGui::GetContentRegionAvail().y - 4), imb,
            ChartStyle{.y_label = "", .y_min = 0.0, .hlines = {HLine{1.0, "even", IM_COL32(230, 230, 230, 160)}}});
  ImGui::EndTable();
}

}  // namespace moelab::viewer
