// moelab/viewer/panels_specialisation.cpp — panel 2, specialisation per layer: the domain x expert
// table of the latest evaluation (EvalMetrics::routing), mutual information and load entropy per
// block over time, and which bytes each expert takes.
#include <fmt/format.h>

#include <algorithm>

#include "reference/analysis.h"
#include "viewer/ui.h"

namespace moelab::viewer {

void ShowSpecialisationPanel(UiState& ui, const Snapshot& snap) {
  if (snap.evals.empty() || snap.evals.back().routing.empty()) {
    ImGui::TextWrapped("No evaluation of an MoE model yet (the session evaluates at step 0 and every %lld steps).",
                       static_cast<long long>(snap.config.eval_every));
    return;
  }
  const EvalMetrics& eval = snap.evals.back();
  const int L = static_cast<int>(eval.routing.size());
  const int k = snap.model.moe.routing.expert_choice() ? 1 : snap.model.moe.routing.top_k;
  const int E = static_cast<int>(snap.model.moe.num_experts());
  ui.spec_layer = std::clamp(ui.spec_layer, 0, L - 1);

  Explain("Do experts become specialists? The corpus has nine domains (languages, C headers, arithmetic, ...). After "
          "every evaluation, the table shows for each domain the share of its tokens that each expert received. "
          "A uniform router gives every cell k/E; a specialist expert lights up one row.");
  if (!ImGui::BeginTable("spec", 2, ImGuiTableFlags_SizingStretchProp)) return;
  ImGui::TableSetupColumn("left", ImGuiTableColumnFlags_WidthStretch, 0.52f);
  ImGui::TableSetupColumn("right", ImGuiTableColumnFlags_WidthStretch, 0.48f);
  ImGui::TableNextRow();
  ImGui::TableNextColumn();

  ImGui::SetNextItemWidth(200);
  ImGui::SliderInt("MoE block##spec", &ui.spec_layer, 0, L - 1,
                   fmt::format("block {}", eval.moe_layers[static_cast<std::size_t>(ui.spec_layer)]).c_str());
  ImGui::SameLine();
  ImGui::TextDisabled("evaluation at step %lld, %lld tokens", static_cast<long long>(eval.step),
                      static_cast<long long>(eval.tokens));
  HelpMarker("Rows: domains of the validation batches; columns: experts of this block. Cell = share of the domain's "
             "tokens that have this expert among their k choices (OLMoE's figure): rows sum to k. Colour scale: 0 to "
             "the largest cell. With the aux loss (Mixtral's preset) each batch is pushed towards even load, which "
             "also pushes against domain experts; switch the Load balancing panel to aux_free or none and watch the "
             "rows sharpen.");
  const DomainShare share = domain_share(eval, static_cast<std::size_t>(ui.spec_layer), snap.domain_names, k);
  std::vector<std::string> cols;
  for (int e = 0; e < E; ++e) cols.push_back(fmt::format("e{}", e));
  const float cell_w = std::min(52.0f, (ImGui::GetContentRegionAvail().x - 110) / static_cast<float>(E));
  Heatmap("domains", share.share, share.domains, cols, std::max(share.share.maxCoeff(), 1e-9), "{:.2f}", cell_w, 22);
  ImGui::Text("uniform: %.3f per cell;  I(domain; expert) = %.3f bits,  I(byte; expert) = %.3f bits", static_cast<double>(k) / E,
              eval.specialisation[static_cast<std::size_t>(ui.spec_layer)],
              eval.byte_specialisation[static_cast<std::size_t>(ui.spec_layer)]);

  ImGui::Spacing();
  ImGui::TextUnformatted("Vocabulary: which bytes go where");
  HelpMarker("From the routing of the last ~10 training batches of this block (counts decay by 0.9 a batch). Rows: "
             "classes of bytes (UTF-8 lead and continuation bytes are the non-ASCII characters: Chinese, Russian, "
             "accents). Cell = share of the class's token-expert pairs that went to the expert. Below: each expert's "
             "most frequent bytes and the share of that byte's pairs it took.");
  if (static_cast<std::size_t>(ui.spec_layer) < snap.byte_counts.size() &&
      snap.byte_counts[static_cast<std::size_t>(ui.spec_layer)].rows() == 256) {
    const VocabularyView v = vocabulary_view(snap.byte_counts[static_cast<std::size_t>(ui.spec_layer)], 6);
    std::vector<std::string> classes;
    for (Index c = 0; c < kNumByteClasses; ++c) classes.emplace_back(byte_class_name(static_cast<ByteClass>(c)));
    Heatmap("classes", v.class_share, classes, cols, std::max(v.class_share.maxCoeff(), 1e-9), "{:.2f}", cell_w, 19);
    for (const ExpertBytes& x : v.experts) {
      ImGui::TextColored(ImGui::ColorConvertU32ToFloat4(ExpertColour(x.expert, E)), "e%d:", x.expert);
      for (const auto& [byte, s] : x.top) {
        ImGui::SameLine();
        const std::vector<ByteGlyph> g = utf8_glyphs(std::span<const std::int32_t>(&byte, 1));
        ImGui::Text("%s %.0f%%", GlyphText(g[0], static_cast<std::uint8_t>(byte)).c_str(), 100 * s);
      }
    }
  }

  ImGui::TableNextColumn();
  const SpecialisationSeries s = specialisation_series(snap.evals);
  const float h = std::max(120.0f, (ImGui::GetContentRegionAvail().y - 3 * ImGui::GetFrameHeightWithSpacing() - 8) / 3);
  std::vector<Series> series;
  auto per_layer = [&](const std::vector<std::vector<double>>& values) {
    series.clear();
    for (std::size_t j = 0; j < values.size(); ++j)
      series.push_back(Series{.label = fmt::format("block {}", eval.moe_layers[j]), .x = &s.steps, .y = &values[j],
                              .colour = SeriesColour(static_cast<int>(j)), .thickness = j == static_cast<std::size_t>(ui.spec_layer) ? 3.0f : 1.5f,
                              .points = true});
  };
  ImGui::TextUnformatted("I(domain; expert), bits");
  HelpMarker("Mutual information between a token's domain and the expert it is routed to, per block: 0 when every "
             "domain is spread over the experts alike, up to log2(9) = 3.2 bits if each domain had its own expert.");
  per_layer(s.domain_mi);
  LineChart("domain_mi", ImVec2(0, h), series, ChartStyle{.y_label = "bits", .y_min = 0.0});
  ImGui::TextUnformatted("I(byte; expert), bits");
  HelpMarker("How much the input byte alone decides the expert (vocabulary specialisation), up to log2 E = 3 bits. "
             "Block 0 typically routes almost by the byte; later blocks by context.");
  per_layer(s.byte_mi);
  LineChart("byte_mi", ImVec2(0, h), series, ChartStyle{.y_label = "bits", .y_min = 0.0});
  ImGui::TextUnformatted("load entropy H(expert) / log E, every training step");
  HelpMarker("Of each step's token-expert pairs, per block. 1: every expert gets the same share; lower: some experts "
             "are favoured; 0: one expert takes everything (collapse: try balance = none in the Load balancing panel).");
  const EntropySeries es = load_entropy_series(snap.history);
  series.clear();
  for (std::size_t j = 0; j < es.entropy.size(); ++j)
    series.push_back(Series{.label = fmt::format("block {}", eval.moe_layers[j]), .x = &es.steps, .y = &es.entropy[j],
                            .colour = SeriesColour(static_cast<int>(j)),
                            .thickness = j == static_cast<std::size_t>(ui.spec_layer) ? 3.0f : 1.5f});
  LineChart("entropy", ImVec2(0, h), series, ChartStyle{.y_label = "normalised entropy", .y_max = 1.0});
  ImGui::EndTable();
}

}  // namespace moelab::viewer
