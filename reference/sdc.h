// moelab/reference/sdc.h — the silent-data-corruption lab: one bit flipped at a chosen site of the
// MoE model, and what it does to routing, the layer's output, the logits and the loss.
//
// The claim under test (docs/sdc.md): a flipped bit in an MoE router does on the order of 10,000
// times more damage than one elsewhere, because it changes which experts run, and low-precision
// formats make it worse.
//
// Fault model. The value v at the site is stored in a format f, one bit of that encoding is
// inverted, and the result is decoded back into the float32 computation:
//     faulted  = decode(encode(v, f) XOR 2^bit, f)          (bit 0 = last mantissa bit)
//     baseline = decode(encode(v, f), f)                    the same element, rounded, not flipped
// Every comparison is faulted run against baseline run, so the flip is measured alone, not the
// rounding, and with the flip off (Fault::flip = false) every metric is exactly zero. Storing
// saturates (a value beyond f's max becomes +-max, as fp8 kernels convert with satfinite), so the
// baseline is always finite; only the flip makes infinities and NaNs.
//
// Sites (fault_hook.h says where each is handed over):
//   transient, one element of one token in one MoE block for one forward (a faulty multiplier):
//     router_input (the router's copy of x), router_logits, gate_values, expert_activations (h),
//     expert_outputs, combine_output (the layer's y)
//   persistent, one element of a weight matrix for the whole batch (a memory fault):
//     router_weights (W_r, (E, C)), expert_weights (one routed expert's w_gate, w_up or w_down)
// Router sites: router_input, router_logits, gate_values, router_weights. Expert sites:
// expert_activations, expert_outputs, expert_weights. combine_output is neither (it is the layer's
// output itself), and shared experts and biases are not fault sites.
//
// Non-finite values. The reference refuses to route a NaN or an infinity (scoring.h, selection.h:
// a NaN has no order). A flip whose consequences reach a router as NaN/inf therefore ends its
// forward with an Error; that run is "refused", counted as non-finite (on hardware that does not
// check, it would give NaN outputs), and its error metrics are NaN.
//
// Shapes: B = batch (sequences), T = sequence length, N = B*T tokens, C = hidden, E = experts,
//         k = experts per token, H = expert width, V = vocabulary.
#pragma once

#include <cstdint>
#include <iterator>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "reference/corpus.h"
#include "reference/fault_hook.h"
#include "reference/model.h"
#include "reference/numerics.h"
#include "reference/observer.h"
#include "reference/types.h"

namespace moelab {

// ---- Sites and bits ----------------------------------------------------------------------------

inline constexpr FaultSite kAllFaultSites[] = {
    FaultSite::router_input,   FaultSite::router_weights,     FaultSite::router_logits,  FaultSite::gate_values,
    FaultSite::expert_weights, FaultSite::expert_activations, FaultSite::expert_outputs, FaultSite::combine_output};

std::string_view fault_site_name(FaultSite site);  // "router_logits", ...
// Throws Error naming `field` for an unknown name.
FaultSite parse_fault_site(std::string_view name, std::string_view field = "site");
bool is_weight_site(FaultSite site);  // router_weights, expert_weights: persistent
bool is_router_site(FaultSite site);
bool is_expert_site(FaultSite site);

enum class ExpertMatrix { w_gate, w_up, w_down };
std::string_view expert_matrix_name(ExpertMatrix m);
ExpertMatrix parse_expert_matrix(std::string_view name, std::string_view field = "matrix");

// Which bit a trial flips: one of a class (drawn uniformly among the class's positions in the
// format), one position, or any bit of the format (uniformly: a random hit on the stored word).
struct BitChoice {
  std::optional<BitClass> bit_class{};  // set: a class
  int position = -1;                    // else: this bit; -1 = any bit
  std::string name() const;             // "exponent", "bit 30", "any"
};
// "sign", "exponent", "mantissa", "any", or a bit position (a non-negative integer).
BitChoice parse_bit_choice(std::string_view text, std::string_view field = "bits");
// The positions a trial draws from in format f; throws Error naming `field` if a position does not
// exist in f.
std::vector<int> bit_positions(const BitChoice& choice, Format f, std::string_view field = "bits");

// ---- One fault -----------------------------------------------------------------------------------

struct Fault {
  FaultSite site = FaultSite::router_logits;
  Format format = Format::fp32;  // the value is stored in this format, then one bit of it flipped
  int bit = 0;                   // 0 = the last mantissa bit, width - 1 = the sign
  bool flip = true;              // false: the baseline (rounded, not flipped)
  Index layer = 0;               // the block, an MoE block
  Index token = 0;               // transient sites: the token (row of the batch, [0, N))
  Index slot = 0;                // gate_values, expert_activations, expert_outputs: the token's slot-th expert
  Index expert = 0;              // expert_weights: the expert
  ExpertMatrix matrix = ExpertMatrix::w_up;  // expert_weights: which of its matrices
  Index row = 0;                 // weight sites: the element's row
  Index col = 0;                 // its column: of the weight matrix, or of the token's row at a transient site
  // Throws Error naming the field, the value and the rule (e.g. "col = 9: must be in [0, 8) for
  // router_logits (the experts)").
  void validate(const ModelConfig& config, Index tokens) const;
};

// What an injection did ("where the flip went, what changed").
struct FaultRecord {
  bool applied = false;          // the element existed (a pair dropped by capacity has no row)
  Index expert = -1;             // the expert whose rows or weights held it; -1 at per-token sites
  float value = 0;               // the float32 value found there
  float stored = 0;              // in the format: the baseline's value
  float faulted = 0;             // after the flip (= stored when flip is false)
  std::uint32_t stored_bits = 0;   // encode(value, format)
  std::uint32_t faulted_bits = 0;  // stored_bits XOR 2^bit (or stored_bits)
};

// The primitive: v becomes the stored (flip = false) or faulted value; the record says which.
FaultRecord store_and_flip(float& v, Format format, int bit, bool flip);

namespace events {
// One per applied fault: stats site, bit, layer, token, slot, expert, row, col, value, stored, faulted.
inline constexpr std::string_view fault = "fault";
}  // namespace events

// A transient fault: a FaultHook that changes the one element `fault` names, at its site in its
// block, and records what it did. Emits events::fault to `observer` when it applies.
class BitFlipInjector : public FaultHook {
 public:
  explicit BitFlipInjector(const Fault& fault, Observer* observer = nullptr);
  bool acts_on(Index layer) const override;
  bool on_values(const FaultTarget& where, Map values) override;
  const FaultRecord& record() const { return record_; }

 private:
  Fault fault_;
  Observer* observer_;
  FaultRecord record_;
};

// A persistent fault: the weight element `fault` names, changed in `params`.
FaultRecord inject_weight_fault(ModelParams& params, const ModelConfig& config, const Fault& fault);

// ---- One run, and one trial -----------------------------------------------------------------------

// One forward of `batch` (B x T byte ids) with `fault` (flip or baseline), from fresh buffers.
struct FaultedRun {
  ModelOutput out;
  FaultRecord record;
  bool refused = false;  // an Error stopped the forward: a NaN/inf reached a router (see the top)
  std::string refusal;   // its message
};
FaultedRun run_with_fault(const ModelConfig& config, const ModelParams& params, const Batch& batch, const Fault& fault);

struct TrialMetrics {
  bool nonfinite = false;             // NaN/inf in the final logits, or the run was refused
  double selections_changed = 0;      // share of (token, MoE block) pairs whose top-k set changed
  double own_selection_changed = 0;   // transient: 1 if the faulted token's set in its block changed
                                      // (NaN at weight sites: no token is "the faulted one")
  double layer_rel_error = 0;         // ||y_f - y_b|| / ||y_b||, the faulted block's MoE output (N, C)
  double logit_rel_error = 0;         // ||z_f - z_b|| / ||z_b||, the final logits (N, V)
  double loss_delta = 0;              // mean cross-entropy faulted - baseline, nats per byte
};
// The two measures compare_runs builds on, for any matrices of the same shape:
//   relative_l2_error(a, b) = ||a - b||_F / ||b||_F, summed in double (0 when a = b, also for b = 0)
//   changed_selections(before, after) = the rows t (tokens) whose sets of ids differ, order-free
double relative_l2_error(const Matrix& a, const Matrix& b);
Index changed_selections(const IndexMatrix& before, const IndexMatrix& after);

// The metrics of `faulted` against `baseline` (same batch). The errors and loss_delta are NaN when
// nonfinite; the selections are NaN when the faulted run was refused.
TrialMetrics compare_runs(const FaultedRun& baseline, const FaultedRun& faulted, const Batch& batch,
                          const ModelConfig& config, const Fault& fault);

// Lockstep (dual modular redundancy of the router): block fault.layer's routing (router input,
// logits GEMM, scoring, top-k, gating) run twice on the block's input `x` ((N, C), from a run
// where the blocks before are unfaulted) with the parameters in memory `params` (faulted, for a
// weight site: both copies read the same memory). A transient fault hits copy 1 only. Detected:
// the copies' ids or gates differ in any bit, or one copy was refused and the other not.
bool lockstep_detects(const ModelConfig& config, const ModelParams& params, const MatrixT<float>& x,
                      std::span<const std::int32_t> ids, Index batch_size, Index seq_len, const Fault& fault);

// ---- The study -------------------------------------------------------------------------------------

struct SdcConfig {
  std::vector<FaultSite> sites{std::begin(kAllFaultSites), std::end(kAllFaultSites)};
  std::vector<Format> formats{Format::fp32, Format::bf16, Format::fp8_e4m3};
  std::vector<BitChoice> bits{BitChoice{BitClass::sign}, BitChoice{BitClass::exponent}, BitChoice{BitClass::mantissa}};
  Index trials = 100;              // per (site, format, bits)
  std::optional<Index> layer{};    // the MoE block faulted; else uniform among them, per trial
  bool flip = true;                // false: zero flips (every metric must be zero)
  bool lockstep = false;           // also run lockstep_detects per trial
  std::uint64_t seed = 0;
  int threads = 1;                 // never changes the results
  // Throws Error naming the field, the value and the rule.
  void validate(const ModelConfig& config) const;
};

struct SdcTrial {
  Fault fault;
  FaultRecord record;
  bool refused = false;
  TrialMetrics metrics;
  std::optional<bool> detected{};  // lockstep only
};

// Statistics over the trials where the metric is finite (count of them).
struct Spread {
  Index count = 0;
  double mean = 0, median = 0, max = 0;  // NaN when count = 0
};

struct SdcSummary {
  Index trials = 0;
  Index applied = 0;                 // trials whose element existed
  Index refused = 0;
  Index nonfinite = 0;               // refused ones included
  Index effect = 0;                  // the final logits changed at all, or turned non-finite
  Spread selections_changed, layer_rel_error, logit_rel_error, loss_delta;
  double own_selection_changed = 0;  // share of the finite transient trials (NaN at weight sites)
  double detected = 0;               // lockstep: share of the trials detected (NaN without lockstep)
  double detected_of_effect = 0;     // ... of the trials with an effect
  double rate(Index n) const { return trials > 0 ? static_cast<double>(n) / static_cast<double>(trials) : 0.0; }
};

struct SdcCell {
  FaultSite site = FaultSite::router_logits;
  Format format = Format::fp32;
  BitChoice bits{};
  std::vector<SdcTrial> trials{};
  SdcSummary summary{};
};

// Router damage over expert damage for one format and bit choice, transient and weight sites apart:
// the mean logit error of the router sites' trials (pooled) over the expert sites' (finite trials).
struct SdcRatio {
  Format format = Format::fp32;
  std::string bits;
  bool weight = false;              // router_weights / expert_weights; else the transient sites
  double router_logit_error = 0;    // mean over the router sites' finite trials
  double expert_logit_error = 0;
  double ratio = 0;                 // router / expert (NaN if either is missing, inf if expert is 0)
  double router_nonfinite = 0;      // share of the trials
  double expert_nonfinite = 0;
  double router_selection_changed = 0;  // mean share of (token, block) pairs
  double expert_selection_changed = 0;
};

// The extra cost of lockstep: the routers' logits GEMM once more, 2 C E FLOPs per token per MoE
// block, against the model's forward (accounting.h: matrix products and attention at context T).
struct LockstepCost {
  double router_flops_per_token = 0;  // all MoE blocks
  double layer_flops_per_token = 0;   // one MoE block: router + k experts (+ shared)
  double model_flops_per_token = 0;
  double of_layer = 0;                // router / layer
  double of_model = 0;                // routers / model
};
LockstepCost lockstep_cost(const ModelConfig& config, Index seq_len);

struct SdcStudy {
  std::vector<int> moe_layers;
  Index tokens = 0;
  double baseline_loss = 0;  // of the clean model on the batch, nats per byte
  std::vector<SdcCell> cells;  // sites x formats x bits, in that nesting order
  std::vector<SdcRatio> ratios;
  LockstepCost cost;
};

// The fault of trial `trial` of a cell: block uniform among the MoE blocks (or config.layer), the
// element uniform at the site (transient: token, then slot, then column; expert_weights: expert,
// matrix, row, column), the bit uniform among bit_positions. A pure function of (seed, site,
// format, bits, trial).
Fault sample_fault(const SdcConfig& config, FaultSite site, Format format, const BitChoice& bits, Index trial,
                   const ModelConfig& model, Index tokens);

// Every cell's trials (each a baseline and a faulted forward of the batch) and summaries, and the
// ratios. The model must route by token choice.
SdcStudy run_sdc_study(const ModelConfig& model, const ModelParams& params, const Batch& batch, const SdcConfig& config);

SdcSummary summarize(std::span<const SdcTrial> trials, FaultSite site, bool lockstep);
std::vector<SdcRatio> router_expert_ratios(std::span<const SdcCell> cells);

// ---- One flip, traced (for the viewer and the notebooks) -------------------------------------------

// Routing before (baseline) and after (faulted) one fault, per MoE block and token: what the viewer
// panel and the notebook section render, and `moelab sdc --trace` prints.
struct RoutingTrace {
  Fault fault;
  FaultRecord record;
  bool refused = false;
  std::string refusal;
  std::vector<int> moe_layers{};
  std::vector<IndexMatrix> ids_before{}, ids_after{};  // (MoE blocks) (N, k); after: empty for a block
  std::vector<Matrix> gates_before{}, gates_after{};   //   the refused run did not route
  TrialMetrics metrics{};
};
RoutingTrace trace_fault(const ModelConfig& config, const ModelParams& params, const Batch& batch, const Fault& fault);

// The model as the lab runs it: token choice required (Error naming `field` otherwise).
void require_sdc_model(const ModelConfig& config, std::string_view field);

}  // namespace moelab
