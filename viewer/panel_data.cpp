// moelab/viewer/panel_data.cpp — see panel_data.h. N = tokens, k = experts per token, E = experts,
// D = domains, L = MoE blocks.
#include "viewer/panel_data.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <set>

#include "reference/analysis.h"
#include "reference/capacity.h"
#include "reference/error.h"
#include "reference/recorder.h"
#include "reference/routing.h"

namespace moelab::viewer {

// ---- Text -----------------------------------------------------------------------------------------

std::vector<ByteGlyph> utf8_glyphs(std::span<const std::int32_t> bytes) {
  std::vector<ByteGlyph> out(bytes.size());
  auto byte_at = [&](std::size_t i) { return static_cast<std::uint32_t>(bytes[i]) & 0xFFu; };
  std::size_t i = 0;
  while (i < bytes.size()) {
    const std::uint32_t b = byte_at(i);
    int n = 0;
    std::uint32_t cp = 0, min = 0;
    if (b < 0x80) { n = 1; cp = b; }
    else if (b >= 0xC2 && b <= 0xDF) { n = 2; cp = b & 0x1F; min = 0x80; }
    else if (b >= 0xE0 && b <= 0xEF) { n = 3; cp = b & 0x0F; min = 0x800; }
    else if (b >= 0xF0 && b <= 0xF4) { n = 4; cp = b & 0x07; min = 0x10000; }
    bool ok = n > 0 && i + static_cast<std::size_t>(n) <= bytes.size();
    for (int j = 1; ok && j < n; ++j) {
      const std::uint32_t c = byte_at(i + static_cast<std::size_t>(j));
      ok = (c & 0xC0) == 0x80;
      cp = (cp << 6) | (c & 0x3F);
    }
    // Overlong forms, surrogates and values beyond U+10FFFF are not UTF-8 (RFC 3629).
    ok = ok && (n == 1 || cp >= min) && !(cp >= 0xD800 && cp <= 0xDFFF) && cp <= 0x10FFFF;
    if (!ok) {
      out[i] = ByteGlyph{.codepoint = 0, .length = 1, .part = 0, .valid = false};
      ++i;
      continue;
    }
    for (int j = 0; j < n; ++j) out[i + static_cast<std::size_t>(j)] = ByteGlyph{.codepoint = cp, .length = n, .part = j};
    i += static_cast<std::size_t>(n);
  }
  return out;
}

std::string utf8_encode(std::uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xF0 | (cp >> 18));
    s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

std::string byte_label(std::uint8_t byte) {
  if (byte == ' ') return "\xE2\x90\xA3";  // U+2423 OPEN BOX, the visible space
  if (byte == '\n') return "\\n";
  if (byte == '\t') return "\\t";
  if (byte > 0x20 && byte < 0x7F) return std::string(1, static_cast<char>(byte));
  return fmt::format("0x{:02X}", byte);
}

std::vector<std::int32_t> text_bytes(std::string_view text) {
  std::vector<std::int32_t> ids;
  ids.reserve(text.size());
  for (char c : text) ids.push_back(static_cast<std::uint8_t>(c));
  return ids;
}

ModelConfig without_router_noise(ModelConfig config) {
  config.moe.routing.router.noise = RouterNoise::none;
  return config;
}

// ---- 1. Routing ---------------------------------------------------------------------------------

namespace {

Matrix matrix_of(const RecordedEvent& e) {
  Matrix m(e.shape[0], e.shape[1]);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(e.values[static_cast<std::size_t>(i)]);
  return m;
}

IndexMatrix ids_of(const RecordedEvent& e) {
  IndexMatrix m(e.shape[0], e.shape[1]);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = e.ids[static_cast<std::size_t>(i)];
  return m;
}

}  // namespace

void RoutingCollector::on_event(const Event& event) {
  const std::string_view n = event.name;
  if (n == events::bias) {
    const RecordedEvent e = RecordedEvent::from(event);
    bias_.emplace_back(e.layer, std::vector<float>(e.values.begin(), e.values.end()));
    return;
  }
  if (n != events::router_logits && n != events::topk_ids && n != events::expert_choice_ids && n != events::gates &&
      n != events::expert_load)
    return;
  const RecordedEvent e = RecordedEvent::from(event);
  if (n == events::router_logits || parts_.empty() || parts_.back().layer != e.layer) {
    parts_.push_back(Part{.layer = e.layer});
  }
  Part& p = parts_.back();
  if (n == events::router_logits) {
    p.logits = matrix_of(e);
  } else if (n == events::topk_ids || n == events::expert_choice_ids) {
    p.ids = ids_of(e);
    p.expert_choice = n == events::expert_choice_ids;
  } else if (n == events::gates) {
    p.gates = matrix_of(e);
  } else {
    for (double v : e.values) p.load.push_back(static_cast<std::int64_t>(v));
  }
}

BatchRouting RoutingCollector::assemble(const Batch& batch, const ModelConfig& config, std::int64_t step,
                                        bool trained) const {
  BatchRouting r;
  r.step = step;
  r.trained = trained;
  r.batch = batch;
  if (config.moe_layout == MoeLayout::dense) return r;
  const Index E = config.moe.num_experts();
  const Index N = batch.batch_size * batch.seq_len;
  r.num_experts = E;
  r.top_k = config.moe.routing.expert_choice() ? 0 : config.moe.routing.top_k;
  for (Index i = 0; i < config.n_layers; ++i) {
    if (!config.is_moe(i)) continue;
    LayerRouting l;
    l.layer = static_cast<int>(i);
    l.routes.resize(static_cast<std::size_t>(N));
    l.logits.resize(N, E);
    l.load.assign(static_cast<std::size_t>(E), 0);
    l.dropped.assign(static_cast<std::size_t>(E), 0);
    l.capacity = std::numeric_limits<double>::infinity();
    Index offset = 0;
    for (const Part& p : parts_) {
      if (p.layer != l.layer) continue;
      const Index n = p.logits.rows();
      require(offset + n <= N && p.logits.cols() == E, fmt::format("router_logits of block {}", l.layer),
              shape_of(p.logits), fmt::format("must fit the batch of {} tokens and {} experts", N, E));
      l.logits.middleRows(offset, n) = p.logits;
      for (std::size_t e = 0; e < p.load.size() && e < l.load.size(); ++e) l.load[e] += p.load[e];
      if (p.expert_choice) {
        for (Index e = 0; e < p.ids.rows(); ++e)
          for (Index c = 0; c < p.ids.cols(); ++c) {
            const Index t = p.ids(e, c);
            if (t >= 0 && t < n)
              l.routes[static_cast<std::size_t>(offset + t)].push_back(
                  {static_cast<std::int32_t>(e), p.gates.size() > 0 ? p.gates(e, c) : 0.0f, true});
          }
      } else {
        require(p.ids.rows() == n, fmt::format("topk_ids of block {}", l.layer), shape_of(p.ids),
                fmt::format("must have the {} rows of its router_logits", n));
        IndexMatrix keep;
        std::vector<std::int64_t> dropped;
        capacity_forward(keep, dropped, p.ids, p.gates, E, config.moe.capacity);
        if (!config.moe.capacity.dropless)
          l.capacity = static_cast<double>(expert_capacity(n, config.moe.routing.top_k, E, config.moe.capacity));
        for (std::size_t e = 0; e < dropped.size() && e < l.dropped.size(); ++e) l.dropped[e] += dropped[e];
        for (Index t = 0; t < n; ++t)
          for (Index j = 0; j < p.ids.cols(); ++j)
            l.routes[static_cast<std::size_t>(offset + t)].push_back(
                {p.ids(t, j), p.gates.size() > 0 ? p.gates(t, j) : 0.0f, keep(t, j) != 0});
      }
      l.micro_tokens = n;
      offset += n;
    }
    require(offset == N, fmt::format("routing events of block {}", l.layer), fmt::format("{} tokens", offset),
            fmt::format("must cover the batch's {} tokens", N));
    for (const auto& [layer, bias] : bias_)
      if (layer == l.layer) l.bias = bias;
    r.layers.push_back(std::move(l));
  }
  return r;
}

namespace {
// One sequence of the text's bytes, each predicting the next; the last predicts the document separator.
Batch text_batch(std::string_view text) {
  Batch batch;
  batch.batch_size = 1;
  batch.seq_len = static_cast<Index>(text.size());
  batch.inputs = text_bytes(text);
  batch.targets.assign(batch.inputs.begin() + 1, batch.inputs.end());
  batch.targets.push_back(kDocumentSeparator);
  return batch;
}
}  // namespace

BatchRouting route_text(const ModelConfig& eval_model, const ModelParams& params, std::string_view text,
                        Index max_bytes) {
  require(!text.empty(), "text", "\"\"", "must hold at least one byte");
  require(static_cast<Index>(text.size()) <= max_bytes, "text", fmt::format("({} bytes)", text.size()),
          fmt::format("must be at most {} bytes", max_bytes));
  const Batch batch = text_batch(text);
  RoutingCollector collector;
  ModelOutput out;
  model_forward(out, batch.inputs, 1, batch.seq_len, params, eval_model, nullptr, &collector);
  return collector.assemble(batch, eval_model, -1, false);
}

double balanced_load(Index tokens, int top_k, Index num_experts) {
  if (num_experts <= 0) return 0;
  return std::ceil(static_cast<double>(tokens) * top_k / static_cast<double>(num_experts));
}

// ---- 2. Specialisation --------------------------------------------------------------------------

DomainShare domain_share(const EvalMetrics& eval, std::size_t moe_index, std::span<const std::string> domain_names,
                         int top_k) {
  require(moe_index < eval.routing.size(), "moe_index", moe_index,
          fmt::format("must be below the {} MoE blocks evaluated", eval.routing.size()));
  const MatrixD& counts = eval.routing[moe_index];
  DomainShare s;
  s.layer = moe_index < eval.moe_layers.size() ? eval.moe_layers[moe_index] : static_cast<int>(moe_index);
  s.share = MatrixD::Zero(counts.rows(), counts.cols());
  for (Index d = 0; d < counts.rows(); ++d) {
    const double pairs = counts.row(d).sum();
    // pairs = k * tokens of the domain (token choice), so pairs / tokens per expert = k * fraction.
    const std::int64_t tokens = d < static_cast<Index>(eval.domain_tokens.size()) ? eval.domain_tokens[static_cast<std::size_t>(d)] : 0;
    s.tokens.push_back(tokens);
    if (pairs > 0) s.share.row(d) = counts.row(d) * (static_cast<double>(std::max(top_k, 1)) / pairs);
    s.domains.push_back(d < static_cast<Index>(domain_names.size()) ? domain_names[static_cast<std::size_t>(d)]
                                                                    : fmt::format("domain {}", d));
  }
  return s;
}

double normalised_expert_entropy(const MatrixD& counts) {
  const Index E = counts.cols();
  const double total = counts.sum();
  if (E <= 1 || total <= 0) return E == 1 ? 1.0 : 0.0;
  double h = 0;
  for (Index e = 0; e < E; ++e) {
    const double p = counts.col(e).sum() / total;
    if (p > 0) h -= p * std::log(p);
  }
  return h / std::log(static_cast<double>(E));
}

SpecialisationSeries specialisation_series(std::span<const EvalMetrics> evals) {
  SpecialisationSeries s;
  for (const EvalMetrics& m : evals) {
    const std::size_t L = std::max(m.routing.size(), m.specialisation.size());
    if (s.domain_mi.size() < L) {
      s.domain_mi.resize(L);
      s.byte_mi.resize(L);
      s.entropy.resize(L);
    }
    s.steps.push_back(static_cast<double>(m.step));
    for (std::size_t j = 0; j < L; ++j) {
      s.domain_mi[j].push_back(j < m.specialisation.size() ? m.specialisation[j] : NAN);
      s.byte_mi[j].push_back(j < m.byte_specialisation.size() ? m.byte_specialisation[j] : NAN);
      s.entropy[j].push_back(j < m.routing.size() ? normalised_expert_entropy(m.routing[j]) : NAN);  // a logged eval has no table
    }
  }
  return s;
}

VocabularyView vocabulary_view(const MatrixD& counts, Index top_bytes) {
  require(counts.rows() == 256, "counts rows", counts.rows(), "must be 256 (one per byte)");
  const Index E = counts.cols();
  VocabularyView v;
  v.class_share = MatrixD::Zero(kNumByteClasses, E);
  v.class_pairs.assign(static_cast<std::size_t>(kNumByteClasses), 0.0);
  for (Index b = 0; b < 256; ++b) {
    const Index c = static_cast<Index>(byte_class(static_cast<std::uint8_t>(b)));
    v.class_share.row(c) += counts.row(b);
  }
  for (Index c = 0; c < kNumByteClasses; ++c) {
    const double total = v.class_share.row(c).sum();
    v.class_pairs[static_cast<std::size_t>(c)] = total;
    if (total > 0) v.class_share.row(c) /= total;
  }
  for (Index e = 0; e < E; ++e) {
    ExpertBytes x{.expert = static_cast<std::int32_t>(e)};
    std::vector<std::int32_t> order(256);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) { return counts(a, e) > counts(b, e); });
    for (Index i = 0; i < top_bytes && counts(order[static_cast<std::size_t>(i)], e) > 0; ++i) {
      const std::int32_t b = order[static_cast<std::size_t>(i)];
      x.top.emplace_back(b, counts(b, e) / counts.row(b).sum());
    }
    v.experts.push_back(std::move(x));
  }
  return v;
}

void accumulate_byte_counts(MatrixD& counts, const BatchRouting& routing, std::size_t moe_index, double decay) {
  require(moe_index < routing.layers.size(), "moe_index", moe_index,
          fmt::format("must be below the {} MoE blocks routed", routing.layers.size()));
  if (counts.rows() != 256 || counts.cols() != routing.num_experts) counts = MatrixD::Zero(256, routing.num_experts);
  counts *= decay;
  const LayerRouting& l = routing.layers[moe_index];
  for (std::size_t t = 0; t < l.routes.size() && t < routing.batch.inputs.size(); ++t)
    for (const TokenRoute& p : l.routes[t]) counts(routing.batch.inputs[t] & 0xFF, p.expert) += 1;
}

// ---- 3. Load balancing --------------------------------------------------------------------------

StepPoint step_point(const StepMetrics& m) {
  StepPoint p{.step = m.step, .loss = m.loss, .aux = m.aux, .z = m.z, .lr = m.lr, .grad_norm = m.grad_norm,
              .tokens_per_second = m.tokens_per_second, .load_imbalance = m.load_imbalance,
              .dropped_fraction = m.dropped_fraction, .logit_rms = m.logit_rms, .logit_max_abs = m.logit_max_abs};
  for (const std::vector<std::int64_t>& load : m.load) {
    const double total = static_cast<double>(std::accumulate(load.begin(), load.end(), std::int64_t{0}));
    std::vector<float> share;
    for (std::int64_t n : load) share.push_back(total > 0 ? static_cast<float>(static_cast<double>(n) / total) : 0.0f);
    p.load_share.push_back(std::move(share));
  }
  return p;
}

LoadSeries load_series(std::span<const StepPoint> history, std::size_t moe_index) {
  LoadSeries s;
  for (const StepPoint& p : history) {
    if (moe_index >= p.load_share.size()) continue;
    const std::vector<float>& share = p.load_share[moe_index];
    if (s.share.size() < share.size()) s.share.resize(share.size());
    s.steps.push_back(static_cast<double>(p.step));
    double max = 0;
    for (std::size_t e = 0; e < share.size(); ++e) {
      s.share[e].push_back(share[e]);
      max = std::max(max, static_cast<double>(share[e]));
    }
    s.max_share.push_back(max);
  }
  return s;
}

EntropySeries load_entropy_series(std::span<const StepPoint> history) {
  EntropySeries s;
  for (const StepPoint& p : history) {
    if (s.entropy.size() < p.load_share.size()) s.entropy.resize(p.load_share.size());
    s.steps.push_back(static_cast<double>(p.step));
    for (std::size_t j = 0; j < p.load_share.size(); ++j) {
      const std::vector<float>& share = p.load_share[j];
      double h = 0;
      for (float x : share)
        if (x > 0) h -= static_cast<double>(x) * std::log(static_cast<double>(x));
      s.entropy[j].push_back(share.size() > 1 ? h / std::log(static_cast<double>(share.size())) : 1.0);
    }
  }
  return s;
}

// ---- 4. Numerics --------------------------------------------------------------------------------

NumericsView numerics_view(std::span<const float> logits, Format format) {
  require(!logits.empty(), "logits", "(none)", "give at least one logit");
  NumericsView v;
  v.format = format;
  v.logits.assign(logits.begin(), logits.end());
  for (Format f : kAllFormats) {
    std::vector<float> r;
    for (float x : logits) r.push_back(round_to(x, f));
    v.rounded.push_back(std::move(r));
  }
  for (float x : logits) {
    const float stored = round_to(x, format);
    v.spacing.push_back(std::isfinite(stored) ? ulp(stored, format) : NAN);
  }
  v.naive = softmax_in_format(logits, format, SoftmaxMethod::naive);
  v.stable = softmax_in_format(logits, format, SoftmaxMethod::stable);
  return v;
}

Json numerics_json(const NumericsView& v) {
  Json doc = softmax_in_format_json(v.logits, v.format, v.naive, v.stable);
  doc["spacing"] = Json::array();
  for (float s : v.spacing) doc["spacing"].push_back(json_number(s));
  return doc;
}

namespace {

std::vector<std::int32_t> sorted_row(const IndexMatrix& ids, Index t) {
  std::vector<std::int32_t> s(ids.row(t).data(), ids.row(t).data() + ids.cols());
  std::sort(s.begin(), s.end());
  return s;
}

}  // namespace

RouterPrecision router_precision(std::span<const Matrix> ffn_in, std::span<const std::int32_t> bytes,
                                 const ModelParams& params, const ModelConfig& config, Format format,
                                 Index max_examples) {
  require(config.moe_layout != MoeLayout::dense, "model", "dense", "has no router to compare");
  require(!config.moe.routing.expert_choice(), "selection", "expert_choice",
          "the comparison is of each token's top-k (token choice)");
  RouterPrecision r;
  r.format = format;
  RoutingConfig high = config.moe.routing;
  high.router.noise = RouterNoise::none;
  high.router.dtype = Format::fp32;
  RoutingConfig low = high;
  low.router.dtype = format;
  low.validate();
  std::size_t j = 0;
  for (Index i = 0; i < config.n_layers; ++i) {
    if (!config.is_moe(i)) continue;
    require(j < ffn_in.size(), "ffn_in", ffn_in.size(), "must hold the router input of every MoE block");
    const Matrix& x = ffn_in[j++];
    const LayerParams& lp = params.blocks[static_cast<std::size_t>(i)].moe;
    RoutingOutput a, b;
    route_forward(a, x, bytes, lp.routing, high, nullptr);
    route_forward(b, x, bytes, lp.routing, low, nullptr);
    r.tokens = x.rows();
    r.layers.push_back(static_cast<int>(i));
    Index flipped = 0;
    r.mean_abs_logit_change.push_back(
        x.rows() > 0 ? static_cast<double>((a.logits - b.logits).cwiseAbs().mean()) : 0.0);
    for (Index t = 0; t < x.rows(); ++t) {
      if (sorted_row(a.ids, t) == sorted_row(b.ids, t)) continue;
      ++flipped;
      std::vector<float> z(a.logits.row(t).data(), a.logits.row(t).data() + a.logits.cols());
      std::sort(z.begin(), z.end(), std::greater<>());
      const std::size_t k = static_cast<std::size_t>(a.ids.cols());
      RouterFlip f{.layer = static_cast<int>(i), .token = t,
                   .byte = t < static_cast<Index>(bytes.size()) ? bytes[static_cast<std::size_t>(t)] : 0,
                   .fp32 = std::vector<std::int32_t>(a.ids.row(t).data(), a.ids.row(t).data() + a.ids.cols()),
                   .low = std::vector<std::int32_t>(b.ids.row(t).data(), b.ids.row(t).data() + b.ids.cols()),
                   .margin = k < z.size() ? z[k - 1] - z[k] : 0.0f};
      r.examples.push_back(std::move(f));
    }
    r.flipped.push_back(flipped);
  }
  std::stable_sort(r.examples.begin(), r.examples.end(),
                   [](const RouterFlip& p, const RouterFlip& q) { return p.margin < q.margin; });
  if (static_cast<Index>(r.examples.size()) > max_examples) r.examples.resize(static_cast<std::size_t>(max_examples));
  return r;
}

// ---- 6. Bit flip ------------------------------------------------------------------------------------

std::string bit_string(std::uint32_t bits, int width) {
  std::string s;
  for (int b = width - 1; b >= 0; --b) s += ((bits >> b) & 1u) != 0 ? '1' : '0';
  return s;
}

SdcView sdc_view(const ModelConfig& eval_model, const ModelParams& params, std::string_view text, const Fault& fault) {
  require_sdc_model(eval_model, "model");
  require(!text.empty(), "text", "\"\"", "must hold at least one byte");
  require(text.size() <= 512, "text", fmt::format("({} bytes)", text.size()), "must be at most 512 bytes");
  const Batch batch = text_batch(text);
  fault.validate(eval_model, batch.seq_len);
  SdcView v;
  v.trace = trace_fault(eval_model, params, batch, fault);
  v.bytes = batch.inputs;
  const int width = format_info(fault.format).bits;
  v.stored_bits = bit_string(v.trace.record.stored_bits, width);
  v.faulted_bits = bit_string(v.trace.record.faulted_bits, width);
  for (std::size_t j = 0; j < v.trace.moe_layers.size(); ++j) {
    std::vector<bool> changed(static_cast<std::size_t>(batch.seq_len), false);
    const IndexMatrix& before = v.trace.ids_before[j];
    const IndexMatrix& after = v.trace.ids_after[j];
    if (after.rows() == before.rows()) {
      for (Index t = 0; t < before.rows(); ++t) {
        changed[static_cast<std::size_t>(t)] = sorted_row(before, t) != sorted_row(after, t);
        v.changed_pairs += changed[static_cast<std::size_t>(t)] ? 1 : 0;
      }
    }
    v.changed.push_back(std::move(changed));
  }
  return v;
}

}  // namespace moelab::viewer
