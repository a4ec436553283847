// moelab/reference/sdc.cpp — see sdc.h. N = tokens of the batch, C = hidden, E = experts,
// k = experts per token, H = expert width.
#include "reference/sdc.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <thread>
#include <utility>

#include "reference/accounting.h"
#include "reference/error.h"
#include "reference/random.h"
#include "reference/transformer.h"

namespace moelab {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// gate_values, expert_activations and expert_outputs name a (token, slot) pair, not just a token.
bool uses_slot(FaultSite site) {
  return site == FaultSite::gate_values || site == FaultSite::expert_activations || site == FaultSite::expert_outputs;
}

// The columns of a token's row at a transient site (gate_values: the slot is the column, so 1).
Index site_columns(FaultSite site, const ModelConfig& c) {
  switch (site) {
    case FaultSite::router_input: return c.hidden_size;
    case FaultSite::router_logits: return c.moe.num_experts();
    case FaultSite::gate_values: return 1;
    case FaultSite::expert_activations: return c.moe.expert.intermediate_size;
    case FaultSite::expert_outputs: return c.hidden_size;
    case FaultSite::combine_output: return c.hidden_size;
    case FaultSite::router_weights:
    case FaultSite::expert_weights: break;
  }
  return 0;
}

std::string_view columns_meaning(FaultSite site) {
  switch (site) {
    case FaultSite::router_input: return "the hidden size";
    case FaultSite::router_logits: return "the experts";
    case FaultSite::gate_values: return "the gate of the slot: col must be 0";
    case FaultSite::expert_activations: return "the expert width";
    default: return "the hidden size";
  }
}

// (rows, cols) of the weight matrix a weight fault names.
std::pair<Index, Index> weight_shape(const Fault& f, const ModelConfig& c) {
  const Index C = c.hidden_size, E = c.moe.num_experts(), H = c.moe.expert.intermediate_size;
  if (f.site == FaultSite::router_weights) return {E, C};
  return f.matrix == ExpertMatrix::w_down ? std::pair<Index, Index>{C, H} : std::pair<Index, Index>{H, C};
}

std::vector<int> moe_blocks(const ModelConfig& c) {
  std::vector<int> blocks;
  for (Index i = 0; i < c.n_layers; ++i)
    if (c.is_moe(i)) blocks.push_back(static_cast<int>(i));
  return blocks;
}

// Row t of two (N, k) id matrices hold the same set of experts.
bool same_set(const IndexMatrix& a, const IndexMatrix& b, Index t) {
  std::vector<std::int32_t> x(a.row(t).data(), a.row(t).data() + a.cols());
  std::vector<std::int32_t> y(b.row(t).data(), b.row(t).data() + b.cols());
  std::sort(x.begin(), x.end());
  std::sort(y.begin(), y.end());
  return x == y;
}

// The same shape and the same bits (NaN == NaN if its bits are equal, 0.0 != -0.0): what a lockstep
// comparator checks.
template <typename M>
bool bitwise_equal(const M& a, const M& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  return a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(*a.data()) * static_cast<std::size_t>(a.size())) == 0;
}

// Block `layer` of a run got as far as its routing (a refused run stops somewhere).
bool routed(const ModelOutput& out, Index layer, Index tokens) {
  if (layer >= static_cast<Index>(out.blocks.size())) return false;
  const RoutingOutput& r = out.blocks[static_cast<std::size_t>(layer)].moe.routing;
  return r.ids.rows() == tokens && r.gates.rows() == tokens;
}

// f(i) for i in [0, n) on `threads` threads (worker w takes i = w, w + W, ...); each call writes
// only its own result, so the thread count changes nothing. The first worker's exception is rethrown.
void parallel_for(Index n, int threads, const std::function<void(Index)>& f) {
  if (threads <= 1 || n <= 1) {
    for (Index i = 0; i < n; ++i) f(i);
    return;
  }
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(threads));
  std::vector<std::thread> workers;
  for (int w = 0; w < threads; ++w)
    workers.emplace_back([&, w] {
      try {
        for (Index i = w; i < n; i += threads) f(i);
      } catch (...) {
        errors[static_cast<std::size_t>(w)] = std::current_exception();
      }
    });
  for (std::thread& t : workers) t.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
}

Spread spread_of(std::vector<double> values) {
  Spread s;
  std::erase_if(values, [](double v) { return !std::isfinite(v); });
  s.count = static_cast<Index>(values.size());
  if (values.empty()) {
    s.mean = s.median = s.max = kNaN;
    return s;
  }
  std::sort(values.begin(), values.end());
  double sum = 0;
  for (double v : values) sum += v;
  s.mean = sum / static_cast<double>(values.size());
  const std::size_t m = values.size() / 2;
  s.median = values.size() % 2 == 1 ? values[m] : (values[m - 1] + values[m]) / 2;
  s.max = values.back();
  return s;
}

double mean_of_finite(const std::vector<double>& values) { return spread_of(values).mean; }

// The seed of one trial: a function of (seed, site, format, bits, trial) only.
std::uint64_t trial_seed(std::uint64_t seed, FaultSite site, Format format, const BitChoice& bits, Index trial) {
  const std::uint64_t bits_key =
      bits.bit_class ? static_cast<std::uint64_t>(*bits.bit_class) : static_cast<std::uint64_t>(100 + bits.position);
  std::uint64_t h = hash64(seed ^ 0x736463ull);  // "sdc"
  for (std::uint64_t part : {static_cast<std::uint64_t>(site), static_cast<std::uint64_t>(format), bits_key,
                             static_cast<std::uint64_t>(trial)})
    h = hash64(h + part);
  return h;
}

}  // namespace

// ---- Sites and bits ----------------------------------------------------------------------------

std::string_view fault_site_name(FaultSite site) {
  switch (site) {
    case FaultSite::router_input: return "router_input";
    case FaultSite::router_weights: return "router_weights";
    case FaultSite::router_logits: return "router_logits";
    case FaultSite::gate_values: return "gate_values";
    case FaultSite::expert_weights: return "expert_weights";
    case FaultSite::expert_activations: return "expert_activations";
    case FaultSite::expert_outputs: return "expert_outputs";
    case FaultSite::combine_output: return "combine_output";
  }
  return "?";
}

FaultSite parse_fault_site(std::string_view name, std::string_view field) {
  std::string known;
  for (FaultSite s : kAllFaultSites) {
    if (fault_site_name(s) == name) return s;
    known += (known.empty() ? "" : ", ") + std::string(fault_site_name(s));
  }
  fail(field, fmt::format("\"{}\"", name), "must be one of " + known);
}

bool is_weight_site(FaultSite site) { return site == FaultSite::router_weights || site == FaultSite::expert_weights; }

bool is_router_site(FaultSite site) {
  return site == FaultSite::router_input || site == FaultSite::router_weights || site == FaultSite::router_logits ||
         site == FaultSite::gate_values;
}

bool is_expert_site(FaultSite site) {
  return site == FaultSite::expert_weights || site == FaultSite::expert_activations ||
         site == FaultSite::expert_outputs;
}

std::string_view expert_matrix_name(ExpertMatrix m) {
  switch (m) {
    case ExpertMatrix::w_gate: return "w_gate";
    case ExpertMatrix::w_up: return "w_up";
    case ExpertMatrix::w_down: return "w_down";
  }
  return "?";
}

ExpertMatrix parse_expert_matrix(std::string_view name, std::string_view field) {
  for (ExpertMatrix m : {ExpertMatrix::w_gate, ExpertMatrix::w_up, ExpertMatrix::w_down})
    if (expert_matrix_name(m) == name) return m;
  fail(field, fmt::format("\"{}\"", name), "must be one of w_gate, w_up, w_down");
}

std::string BitChoice::name() const {
  if (bit_class) return std::string(bit_class_name(*bit_class));
  return position < 0 ? "any" : fmt::format("bit {}", position);
}

BitChoice parse_bit_choice(std::string_view text, std::string_view field) {
  for (BitClass c : {BitClass::sign, BitClass::exponent, BitClass::mantissa})
    if (bit_class_name(c) == text) return BitChoice{c};
  if (text == "any") return BitChoice{};
  int position = -1;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), position);
  if (error != std::errc() || end != text.data() + text.size() || position < 0)
    fail(field, fmt::format("\"{}\"", text),
         "must be sign, exponent, mantissa, any or a bit position (0 = last mantissa bit)");
  return BitChoice{std::nullopt, position};
}

std::vector<int> bit_positions(const BitChoice& choice, Format f, std::string_view field) {
  const int width = format_info(f).bits;
  if (!choice.bit_class && choice.position >= 0) {
    require(choice.position < width, field, choice.position, fmt::format("must be in [0, {}) for {}", width, format_name(f)));
    return {choice.position};
  }
  std::vector<int> bits;
  for (int b = 0; b < width; ++b)
    if (!choice.bit_class || bit_class(b, f) == *choice.bit_class) bits.push_back(b);
  return bits;
}

// ---- One fault -----------------------------------------------------------------------------------

void Fault::validate(const ModelConfig& config, Index tokens) const {
  bit_class(bit, format);  // "bit = 40: must be in [0, 32) for fp32"
  std::string blocks;
  for (int b : moe_blocks(config)) blocks += (blocks.empty() ? "" : ", ") + std::to_string(b);
  require(layer >= 0 && layer < config.n_layers && config.is_moe(layer), "layer", layer,
          fmt::format("must be an MoE block ({})", blocks));
  const Index E = config.moe.num_experts(), k = config.moe.routing.top_k;
  if (!is_weight_site(site)) {
    require(token >= 0 && token < tokens, "token", token, fmt::format("must be in [0, {}) (the batch's tokens)", tokens));
    if (uses_slot(site)) require(slot >= 0 && slot < k, "slot", slot, fmt::format("must be in [0, top_k = {})", k));
    const Index cols = site_columns(site, config);
    require(col >= 0 && col < cols, "col", col,
            fmt::format("must be in [0, {}) for {} ({})", cols, fault_site_name(site), columns_meaning(site)));
    return;
  }
  if (site == FaultSite::expert_weights) {
    require(expert >= 0 && expert < E, "expert", expert, fmt::format("must be in [0, {})", E));
    require(matrix != ExpertMatrix::w_gate || is_gated(config.moe.expert.activation), "matrix", "w_gate",
            fmt::format("the experts' activation ({}) has no gate projection", activation_name(config.moe.expert.activation)));
  }
  const auto [rows, cols] = weight_shape(*this, config);
  require(row >= 0 && row < rows, "row", row, fmt::format("must be in [0, {})", rows));
  require(col >= 0 && col < cols, "col", col, fmt::format("must be in [0, {})", cols));
}

FaultRecord store_and_flip(float& v, Format format, int bit, bool flip) {
  FaultRecord r;
  r.applied = true;
  r.value = v;
  r.stored_bits = encode(v, format, Overflow::saturating);                    // v stored in the format
  r.faulted_bits = flip ? flip_bit(r.stored_bits, bit, format) : r.stored_bits;  // XOR 2^bit
  r.stored = decode(r.stored_bits, format);
  r.faulted = decode(r.faulted_bits, format);
  v = r.faulted;
  return r;
}

BitFlipInjector::BitFlipInjector(const Fault& fault, Observer* observer) : fault_(fault), observer_(observer) {
  require(!is_weight_site(fault.site), "site", fault_site_name(fault.site),
          "is a weight: inject_weight_fault changes the parameters (a hook sees intermediates only)");
}

bool BitFlipInjector::acts_on(Index layer) const { return layer == fault_.layer; }

bool BitFlipInjector::on_values(const FaultTarget& where, Map values) {
  if (record_.applied || where.site != fault_.site) return false;
  Index row = -1;
  if (where.row_token.empty()) {
    if (fault_.token < values.rows()) row = fault_.token;
  } else {
    for (std::size_t r = 0; r < where.row_token.size() && row < 0; ++r)
      if (where.row_token[r] == fault_.token && where.row_slot[r] == fault_.slot) row = static_cast<Index>(r);
  }
  if (row < 0) return false;  // another expert's rows, or a pair dropped by capacity
  const Index col = fault_.site == FaultSite::gate_values ? fault_.slot : fault_.col;
  require(col < values.cols(), "col", col, fmt::format("must be below the {} columns of {}", values.cols(), fault_site_name(fault_.site)));
  record_ = store_and_flip(values(row, col), fault_.format, fault_.bit, fault_.flip);
  record_.expert = where.expert;
  emit(observer_, [&](Observer& o) {
    const Stat stats[] = {{"site", static_cast<double>(fault_.site)},  {"bit", static_cast<double>(fault_.bit)},
                          {"layer", static_cast<double>(fault_.layer)}, {"token", static_cast<double>(fault_.token)},
                          {"slot", static_cast<double>(fault_.slot)},   {"expert", static_cast<double>(where.expert)},
                          {"row", static_cast<double>(row)},            {"col", static_cast<double>(col)},
                          {"value", record_.value},                     {"stored", record_.stored},
                          {"faulted", record_.faulted}};
    o.on_event(Event{.name = events::fault, .layer = static_cast<int>(fault_.layer), .stats = stats});
  });
  return true;
}

FaultRecord inject_weight_fault(ModelParams& params, const ModelConfig& config, const Fault& fault) {
  require(is_weight_site(fault.site), "site", fault_site_name(fault.site),
          "is an intermediate: BitFlipInjector changes it during the forward");
  fault.validate(config, 0);
  LayerParams& layer = params.blocks[static_cast<std::size_t>(fault.layer)].moe;
  if (fault.site == FaultSite::router_weights) {
    FaultRecord r = store_and_flip(layer.routing.router.weight(fault.row, fault.col), fault.format, fault.bit, fault.flip);
    r.expert = fault.row;  // row e of W_r scores expert e
    return r;
  }
  ExpertParams& e = layer.experts[static_cast<std::size_t>(fault.expert)];
  Matrix& m = fault.matrix == ExpertMatrix::w_gate ? e.w_gate : fault.matrix == ExpertMatrix::w_up ? e.w_up : e.w_down;
  FaultRecord r = store_and_flip(m(fault.row, fault.col), fault.format, fault.bit, fault.flip);
  r.expert = fault.expert;
  return r;
}

// ---- One run, and one trial -----------------------------------------------------------------------

double relative_l2_error(const Matrix& a, const Matrix& b) {
  require(a.rows() == b.rows() && a.cols() == b.cols(), "a shape", shape_of(a), fmt::format("must equal b's {}", shape_of(b)));
  double diff = 0, base = 0;
  for (Index i = 0; i < b.size(); ++i) {
    const double d = static_cast<double>(a.data()[i]) - static_cast<double>(b.data()[i]);
    diff += d * d;
    base += static_cast<double>(b.data()[i]) * static_cast<double>(b.data()[i]);
  }
  if (diff == 0) return 0;
  return std::sqrt(diff) / std::sqrt(base);
}

Index changed_selections(const IndexMatrix& before, const IndexMatrix& after) {
  require(before.rows() == after.rows() && before.cols() == after.cols(), "after shape", shape_of(after),
          fmt::format("must equal before's {}", shape_of(before)));
  Index changed = 0;
  for (Index t = 0; t < before.rows(); ++t) changed += same_set(before, after, t) ? 0 : 1;
  return changed;
}

FaultedRun run_with_fault(const ModelConfig& config, const ModelParams& params, const Batch& batch, const Fault& fault) {
  const Index N = batch.batch_size * batch.seq_len;
  fault.validate(config, N);
  FaultedRun run;
  ModelParams faulted_params;
  std::optional<BitFlipInjector> injector;
  if (is_weight_site(fault.site)) {
    faulted_params = params;
    run.record = inject_weight_fault(faulted_params, config, fault);
  } else {
    injector.emplace(fault);
  }
  try {
    model_forward(run.out, batch.inputs, batch.batch_size, batch.seq_len, injector ? params : faulted_params, config,
                  nullptr, nullptr, injector ? &*injector : nullptr);
  } catch (const Error& e) {
    run.refused = true;
    run.refusal = e.what();
  }
  if (injector) {
    run.record = injector->record();
    if (uses_slot(fault.site) && run.record.applied && routed(run.out, fault.layer, N))
      run.record.expert = run.out.blocks[static_cast<std::size_t>(fault.layer)].moe.routing.ids(fault.token, fault.slot);
  }
  return run;
}

TrialMetrics compare_runs(const FaultedRun& baseline, const FaultedRun& faulted, const Batch& batch,
                          const ModelConfig& config, const Fault& fault) {
  require(!baseline.refused, "baseline", baseline.refusal, "the baseline run must complete (it rounds, never flips)");
  TrialMetrics m;
  m.nonfinite = faulted.refused || !faulted.out.logits.allFinite();
  m.own_selection_changed = kNaN;
  if (faulted.refused) {
    m.selections_changed = m.layer_rel_error = m.logit_rel_error = m.loss_delta = kNaN;
    return m;
  }
  const Index N = batch.batch_size * batch.seq_len;
  const std::vector<int> blocks = moe_blocks(config);
  Index changed = 0;
  for (int b : blocks)
    changed += changed_selections(baseline.out.blocks[static_cast<std::size_t>(b)].moe.routing.ids,
                                  faulted.out.blocks[static_cast<std::size_t>(b)].moe.routing.ids);
  m.selections_changed = static_cast<double>(changed) / static_cast<double>(N * static_cast<Index>(blocks.size()));
  if (!is_weight_site(fault.site)) {
    const std::size_t L = static_cast<std::size_t>(fault.layer);
    m.own_selection_changed =
        same_set(baseline.out.blocks[L].moe.routing.ids, faulted.out.blocks[L].moe.routing.ids, fault.token) ? 0 : 1;
  }
  if (m.nonfinite) {
    m.layer_rel_error = m.logit_rel_error = m.loss_delta = kNaN;
    return m;
  }
  const std::size_t L = static_cast<std::size_t>(fault.layer);
  m.layer_rel_error = relative_l2_error(faulted.out.blocks[L].moe.y, baseline.out.blocks[L].moe.y);
  m.logit_rel_error = relative_l2_error(faulted.out.logits, baseline.out.logits);
  m.loss_delta = static_cast<double>(model_loss(faulted.out, batch.targets).ce) -
                 static_cast<double>(model_loss(baseline.out, batch.targets).ce);
  return m;
}

bool lockstep_detects(const ModelConfig& config, const ModelParams& params, const MatrixT<float>& x,
                      std::span<const std::int32_t> ids, Index batch_size, Index seq_len, const Fault& fault) {
  fault.validate(config, batch_size * seq_len);
  const RoutingParams& routing = params.blocks[static_cast<std::size_t>(fault.layer)].moe.routing;
  const std::vector<Index> lengths(static_cast<std::size_t>(batch_size), seq_len);
  // One copy of the router; a weight fault is already in `params`, which both copies read.
  auto copy = [&](bool flip) -> std::optional<RoutingOutput> {
    Fault f = fault;
    f.flip = flip;
    std::optional<BitFlipInjector> injector;
    if (!is_weight_site(fault.site)) injector.emplace(f);
    RoutingOutput r;
    try {
      route_forward(r, x, ids, routing, config.moe.routing, nullptr, nullptr, lengths, injector ? &*injector : nullptr);
    } catch (const Error&) {
      return std::nullopt;  // refused a NaN / inf
    }
    return r;
  };
  const std::optional<RoutingOutput> first = copy(fault.flip), second = copy(false);
  if (!first || !second) return first.has_value() != second.has_value();
  return !bitwise_equal(first->ids, second->ids) || !bitwise_equal(first->gates, second->gates);
}

// ---- The study -------------------------------------------------------------------------------------

void require_sdc_model(const ModelConfig& config, std::string_view field) {
  config.validate();
  if (moe_blocks(config).empty()) fail(field, "(a dense model)", "has no MoE block: nothing is routed");
  if (config.moe.routing.expert_choice())
    fail(field, "(expert choice)", "the lab needs token-choice routing (a token's k experts are its selection)");
}

void SdcConfig::validate(const ModelConfig& model) const {
  require(!sites.empty(), "sites", "(none)", "name at least one site");
  require(!formats.empty(), "formats", "(none)", "name at least one format");
  require(!bits.empty(), "bits", "(none)", "name at least one bit class or position");
  for (Format f : formats)
    for (const BitChoice& b : bits) bit_positions(b, f);
  require(trials >= 1 && trials <= 1'000'000, "trials", trials, "must be in [1, 1000000]");
  require(threads >= 1 && threads <= 256, "threads", threads, "must be in [1, 256]");
  if (layer) {
    Fault probe;
    probe.layer = *layer;
    probe.validate(model, 1);
  }
}

Fault sample_fault(const SdcConfig& config, FaultSite site, Format format, const BitChoice& bits, Index trial,
                   const ModelConfig& model, Index tokens) {
  Rng rng(trial_seed(config.seed, site, format, bits, trial));
  auto below = [&rng](Index n) { return static_cast<Index>(uniform_below(rng, static_cast<std::uint64_t>(n))); };
  Fault f;
  f.site = site;
  f.format = format;
  f.flip = config.flip;
  const std::vector<int> blocks = moe_blocks(model);
  f.layer = config.layer ? *config.layer : blocks[static_cast<std::size_t>(below(static_cast<Index>(blocks.size())))];
  const std::vector<int> positions = bit_positions(bits, format);
  f.bit = positions[static_cast<std::size_t>(below(static_cast<Index>(positions.size())))];
  if (!is_weight_site(site)) {
    f.token = below(tokens);
    if (uses_slot(site)) f.slot = below(model.moe.routing.top_k);
    f.col = below(site_columns(site, model));
    return f;
  }
  if (site == FaultSite::expert_weights) {  // every expert weight equally likely: each matrix has H C
    f.expert = below(model.moe.num_experts());
    const bool gated = is_gated(model.moe.expert.activation);
    const ExpertMatrix gated_three[] = {ExpertMatrix::w_gate, ExpertMatrix::w_up, ExpertMatrix::w_down};
    f.matrix = gated ? gated_three[below(3)] : (below(2) == 0 ? ExpertMatrix::w_up : ExpertMatrix::w_down);
  }
  const auto [rows, cols] = weight_shape(f, model);
  f.row = below(rows);
  f.col = below(cols);
  return f;
}

SdcSummary summarize(std::span<const SdcTrial> trials, FaultSite site, bool lockstep) {
  SdcSummary s;
  s.trials = static_cast<Index>(trials.size());
  std::vector<double> selections, layer, logits, loss, own;
  Index detected = 0, detected_effect = 0;
  for (const SdcTrial& t : trials) {
    const TrialMetrics& m = t.metrics;
    s.applied += t.record.applied ? 1 : 0;
    s.refused += t.refused ? 1 : 0;
    s.nonfinite += m.nonfinite ? 1 : 0;
    const bool effect = m.nonfinite || m.logit_rel_error > 0;
    s.effect += effect ? 1 : 0;
    selections.push_back(m.selections_changed);
    layer.push_back(m.layer_rel_error);
    logits.push_back(m.logit_rel_error);
    loss.push_back(m.loss_delta);
    own.push_back(m.own_selection_changed);
    const bool d = t.detected.value_or(false);
    detected += d ? 1 : 0;
    detected_effect += d && effect ? 1 : 0;
  }
  s.selections_changed = spread_of(selections);
  s.layer_rel_error = spread_of(layer);
  s.logit_rel_error = spread_of(logits);
  s.loss_delta = spread_of(loss);
  s.own_selection_changed = is_weight_site(site) ? kNaN : mean_of_finite(own);
  s.detected = lockstep ? s.rate(detected) : kNaN;
  s.detected_of_effect =
      lockstep && s.effect > 0 ? static_cast<double>(detected_effect) / static_cast<double>(s.effect) : kNaN;
  return s;
}

std::vector<SdcRatio> router_expert_ratios(std::span<const SdcCell> cells) {
  std::vector<SdcRatio> ratios;
  for (const SdcCell& cell : cells) {
    for (bool weight : {false, true}) {
      SdcRatio r{.format = cell.format, .bits = cell.bits.name(), .weight = weight};
      const bool seen = std::any_of(ratios.begin(), ratios.end(), [&](const SdcRatio& q) {
        return q.format == r.format && q.bits == r.bits && q.weight == r.weight;
      });
      if (seen) continue;
      std::vector<double> router_err, expert_err, router_sel, expert_sel;
      Index router_n = 0, expert_n = 0, router_nf = 0, expert_nf = 0;
      for (const SdcCell& c : cells) {
        if (c.format != r.format || c.bits.name() != r.bits || is_weight_site(c.site) != weight) continue;
        const bool router = is_router_site(c.site);
        if (!router && !is_expert_site(c.site)) continue;
        for (const SdcTrial& t : c.trials) {
          (router ? router_err : expert_err).push_back(t.metrics.logit_rel_error);
          (router ? router_sel : expert_sel).push_back(t.metrics.selections_changed);
          (router ? router_n : expert_n) += 1;
          (router ? router_nf : expert_nf) += t.metrics.nonfinite ? 1 : 0;
        }
      }
      if (router_n == 0 || expert_n == 0) continue;
      r.router_logit_error = mean_of_finite(router_err);
      r.expert_logit_error = mean_of_finite(expert_err);
      r.ratio = r.router_logit_error / r.expert_logit_error;  // NaN if either is NaN; inf if expert is 0
      r.router_nonfinite = static_cast<double>(router_nf) / static_cast<double>(router_n);
      r.expert_nonfinite = static_cast<double>(expert_nf) / static_cast<double>(expert_n);
      r.router_selection_changed = mean_of_finite(router_sel);
      r.expert_selection_changed = mean_of_finite(expert_sel);
      ratios.push_back(std::move(r));
    }
  }
  return ratios;
}

LockstepCost lockstep_cost(const ModelConfig& config, Index seq_len) {
  const Accounting a = account(model_sizes(config), seq_len);
  const double C = static_cast<double>(config.hidden_size), E = static_cast<double>(config.moe.num_experts());
  const double router = 2 * C * E;  // the logits GEMM, per token: 2 FLOPs per multiply-add
  const double experts = static_cast<double>(config.moe.routing.top_k * expert_flops_per_token(config.moe.expert));
  const double shared = config.moe.shared.count == 0 ? 0.0 : config.moe.shared.count *
                        static_cast<double>(expert_flops_per_token(config.moe.shared_expert_config()));
  LockstepCost c;
  c.router_flops_per_token = router * static_cast<double>(config.n_moe_layers());
  c.layer_flops_per_token = router + experts + shared;
  c.model_flops_per_token = static_cast<double>(a.flops_per_token + a.attention_flops_per_token);
  c.of_layer = router / c.layer_flops_per_token;
  c.of_model = c.router_flops_per_token / c.model_flops_per_token;
  return c;
}

SdcStudy run_sdc_study(const ModelConfig& model, const ModelParams& params, const Batch& batch, const SdcConfig& config) {
  require_sdc_model(model, "model");
  config.validate(model);
  const Index N = batch.batch_size * batch.seq_len;
  require(N >= 1 && static_cast<Index>(batch.inputs.size()) == N && static_cast<Index>(batch.targets.size()) == N,
          "batch", fmt::format("({} inputs, {} targets)", batch.inputs.size(), batch.targets.size()),
          fmt::format("must hold batch_size * seq_len = {} of each", N));
  SdcStudy study;
  study.moe_layers = moe_blocks(model);
  study.tokens = N;
  study.cost = lockstep_cost(model, batch.seq_len);

  FaultedRun clean;  // no fault at all: the baseline wherever storing in the format changes nothing
  model_forward(clean.out, batch.inputs, batch.batch_size, batch.seq_len, params, model);
  study.baseline_loss = static_cast<double>(model_loss(clean.out, batch.targets).ce);

  for (FaultSite site : config.sites)
    for (Format f : config.formats)
      for (const BitChoice& b : config.bits)
        study.cells.push_back(SdcCell{.site = site, .format = f, .bits = b,
                                      .trials = std::vector<SdcTrial>(static_cast<std::size_t>(config.trials))});

  const Index T = config.trials;
  parallel_for(static_cast<Index>(study.cells.size()) * T, config.threads, [&](Index i) {
    SdcCell& cell = study.cells[static_cast<std::size_t>(i / T)];
    SdcTrial& trial = cell.trials[static_cast<std::size_t>(i % T)];
    trial.fault = sample_fault(config, cell.site, cell.format, cell.bits, i % T, model, N);
    const FaultedRun faulted = run_with_fault(model, params, batch, trial.fault);
    trial.record = faulted.record;
    trial.refused = faulted.refused;
    // Storing left the value as it was (or there was no element): the baseline is the clean run.
    const bool unchanged = !faulted.record.applied ||
                           std::bit_cast<std::uint32_t>(faulted.record.stored) == std::bit_cast<std::uint32_t>(faulted.record.value);
    Fault rounded = trial.fault;
    rounded.flip = false;
    std::optional<FaultedRun> baseline;
    if (!unchanged) baseline = run_with_fault(model, params, batch, rounded);
    trial.metrics = compare_runs(baseline ? *baseline : clean, faulted, batch, model, trial.fault);
    if (config.lockstep) {
      const Matrix& x = clean.out.blocks[static_cast<std::size_t>(trial.fault.layer)].ffn_in;  // blocks before: unfaulted
      if (is_weight_site(trial.fault.site)) {
        ModelParams in_memory = params;
        inject_weight_fault(in_memory, model, trial.fault);
        trial.detected = lockstep_detects(model, in_memory, x, batch.inputs, batch.batch_size, batch.seq_len, trial.fault);
      } else {
        trial.detected = lockstep_detects(model, params, x, batch.inputs, batch.batch_size, batch.seq_len, trial.fault);
      }
    }
  });
  for (SdcCell& cell : study.cells) cell.summary = summarize(cell.trials, cell.site, config.lockstep);
  study.ratios = router_expert_ratios(study.cells);
  return study;
}

// ---- One flip, traced ------------------------------------------------------------------------------

RoutingTrace trace_fault(const ModelConfig& config, const ModelParams& params, const Batch& batch, const Fault& fault) {
  require_sdc_model(config, "model");
  const Index N = batch.batch_size * batch.seq_len;
  Fault rounded = fault;
  rounded.flip = false;
  const FaultedRun baseline = run_with_fault(config, params, batch, rounded);
  const FaultedRun faulted = run_with_fault(config, params, batch, fault);
  RoutingTrace trace{.fault = fault, .record = faulted.record, .refused = faulted.refused, .refusal = faulted.refusal};
  trace.moe_layers = moe_blocks(config);
  for (int b : trace.moe_layers) {
    const RoutingOutput& before = baseline.out.blocks[static_cast<std::size_t>(b)].moe.routing;
    trace.ids_before.push_back(before.ids);
    trace.gates_before.push_back(before.gates);
    const bool done = routed(faulted.out, b, N);
    const RoutingOutput& after = faulted.out.blocks[static_cast<std::size_t>(b)].moe.routing;
    trace.ids_after.push_back(done ? after.ids : IndexMatrix());
    trace.gates_after.push_back(done ? after.gates : Matrix());
  }
  trace.metrics = compare_runs(baseline, faulted, batch, config, fault);
  return trace;
}

}  // namespace moelab
