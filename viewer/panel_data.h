// moelab/viewer/panel_data.h — the numbers each panel of moelab-viewer shows, computed without a
// display: plain functions of the model, its parameters and the instrumentation events, so that
// the unit tests (tests/viewer/test_panel_data.cpp) check what a student sees.
//
// One section per panel, in the viewer's order:
//   1. routing          a batch's tokens as characters (UTF-8), each token's experts and gates per
//                       MoE block, which pairs capacity dropped, per-expert load and capacity
//   2. specialisation   domain x expert shares, mutual information and load entropy per block over
//                       time, which bytes go to which expert
//   3. load balancing   per-expert load share over the steps
//   4. numerics         a softmax in a narrow format (numerics.h), and the top-k choices that flip
//                       when the router runs in bf16 instead of fp32 on the live batch
//   5. training         (the StepMetrics and EvalMetrics of train.h, drawn as they are)
//   6. bit flip         trace_fault (sdc.h) on a text, per token and block: which experts changed
//
// Shapes: N = tokens, T = sequence length, k = experts per token, E = routed experts, D = domains,
//         L = MoE blocks (only the blocks with an MoE FFN are counted).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "reference/corpus.h"
#include "reference/model.h"
#include "reference/numerics.h"
#include "reference/sdc.h"
#include "reference/train.h"
#include "reference/types.h"

namespace moelab::viewer {

using Json = nlohmann::ordered_json;

// ---- Text: a byte-level model's tokens as characters -------------------------------------------

// What one token (one byte) shows. A character of n UTF-8 bytes is n tokens: the first carries the
// character (part 0, length n), the others are its continuation bytes (part 1 .. n-1). A byte that
// is not part of valid UTF-8 (a lone continuation byte, a truncated or overlong sequence) is its own
// glyph with valid = false: the viewer shows it in hex.
struct ByteGlyph {
  std::uint32_t codepoint = 0;  // of the character this byte belongs to (0 for an invalid byte)
  int length = 1;               // bytes of that character
  int part = 0;                 // this byte's index within the character
  bool valid = true;
};
std::vector<ByteGlyph> utf8_glyphs(std::span<const std::int32_t> bytes);
std::string utf8_encode(std::uint32_t codepoint);
// How a single byte is labelled where it cannot be drawn as a character: "0x1E" (the document
// separator), "\\n", "\\t", "␣" for the space.
std::string byte_label(std::uint8_t byte);
// The text's bytes as token ids (each 0..255).
std::vector<std::int32_t> text_bytes(std::string_view text);

// The model as evaluation and the viewer's forwards run it: no router noise.
ModelConfig without_router_noise(ModelConfig config);

// ---- 1. Routing ---------------------------------------------------------------------------------

// One token-expert pair as the routing panel draws it: a flow of thickness gate, or a dropped pair.
struct TokenRoute {
  std::int32_t expert = 0;
  float gate = 0;
  bool kept = true;  // false: capacity dropped the pair (the expert never saw the token)
};

// One MoE block's routing of a batch, from the events of a forward (micro-batches one after another).
struct LayerRouting {
  int layer = 0;                                      // the block's index in the model
  std::vector<std::vector<TokenRoute>> routes;        // (N) each token's pairs, first choice first
  Matrix logits;                                      // (N, E) router logits as the step computed them
  std::vector<std::int64_t> load;                     // (E) pairs chosen per expert, whole batch
  std::vector<std::int64_t> dropped;                  // (E) pairs capacity dropped, whole batch
  double capacity = 0;                                // per expert and micro-batch; +inf when dropless
  Index micro_tokens = 0;                             // tokens per micro-batch (capacity's T)
  std::vector<float> bias;                            // (E) selection bias after the step, or empty
};

// A batch and what the routers did with it.
struct BatchRouting {
  std::int64_t step = 0;      // the training step that routed it (or the next one, when inspected)
  bool trained = false;       // true: the events of Trainer::step; false: an inspection forward
  Batch batch;                // (B, T)
  Index num_experts = 0;      // E
  int top_k = 0;              // k (0 for expert choice)
  std::vector<LayerRouting> layers;  // (L)
};

// Collects the routing events of one or more forwards (a Trainer's step with TrainerOptions::events,
// or model_forward with an observer) into a BatchRouting. Events of block l arrive in micro-batch
// order: router_logits starts a micro-batch's part; topk_ids / expert_choice_ids, gates,
// expert_load, dropped and bias fill it. Not thread-safe: one forward at a time.
class RoutingCollector : public Observer {
 public:
  void on_event(const Event& event) override;
  void clear() { parts_.clear(); bias_.clear(); }
  // The collected events as a BatchRouting of `batch`. keep (which pairs were dropped) is
  // recomputed per micro-batch with capacity_forward from the ids and gates, exactly as the layer
  // decided it (capacity.h). Throws Error if the events do not fit the batch and the config.
  BatchRouting assemble(const Batch& batch, const ModelConfig& config, std::int64_t step, bool trained) const;

 private:
  struct Part {
    int layer = -1;
    Matrix logits{};                // (n, E)
    IndexMatrix ids{};              // (n, k) token choice, or (E, C) expert choice
    Matrix gates{};                 // same shape as ids
    bool expert_choice = false;
    std::vector<std::int64_t> load{};  // (E)
  };
  std::vector<Part> parts_;
  std::vector<std::pair<int, std::vector<float>>> bias_;  // (layer, bias) in arrival order
};

// Routes `text` (one sequence) through the model, as `moelab route --checkpoint --text` does: no
// router noise, the events collected. Error if the text is empty or longer than max_bytes.
BatchRouting route_text(const ModelConfig& eval_model, const ModelParams& params, std::string_view text,
                        Index max_bytes = 512);

// The capacity line of a load bar: pairs per expert at factor 1 for the whole batch,
// ceil(N k / E) (capacity.h's formula with T = N); the layer's real capacity, where it drops, is
// LayerRouting::capacity per micro-batch.
double balanced_load(Index tokens, int top_k, Index num_experts);

// ---- 2. Specialisation --------------------------------------------------------------------------

// The domain x expert table of one MoE block from EvalMetrics::routing: the share of each domain's
// tokens that have the expert among their k (OLMoE's figure; rows sum to k, uniform k / E).
struct DomainShare {
  int layer = 0;
  std::vector<std::string> domains;       // (D)
  MatrixD share;                          // (D, E)
  std::vector<std::int64_t> tokens;       // (D) tokens of each domain in the evaluation
};
DomainShare domain_share(const EvalMetrics& eval, std::size_t moe_index, std::span<const std::string> domain_names,
                         int top_k);

// Load entropy of a block, H(expert) / log E over its routed pairs (1: every expert equally used,
// 0: one expert takes everything), from a (D, E) or (V, E) count table.
double normalised_expert_entropy(const MatrixD& counts);

// Per MoE block, over the evaluations so far: I(domain; expert) and I(byte; expert) in bits (as
// EvalMetrics reports them) and the load entropy.
struct SpecialisationSeries {
  std::vector<double> steps;                   // (evaluations)
  std::vector<std::vector<double>> domain_mi;  // (L) (evaluations) bits
  std::vector<std::vector<double>> byte_mi;    // (L) (evaluations) bits
  std::vector<std::vector<double>> entropy;    // (L) (evaluations) in [0, 1]
};
SpecialisationSeries specialisation_series(std::span<const EvalMetrics> evals);

// Which bytes go where: byte x expert counts of routed pairs (any of the k), of one block.
struct ExpertBytes {
  std::int32_t expert = 0;
  std::vector<std::pair<std::int32_t, double>> top{};  // (byte, share of the byte's pairs that go to the expert), most pairs first
};
struct VocabularyView {
  MatrixD class_share;             // (kNumByteClasses, E): share of each byte class's pairs per expert (rows sum to 1)
  std::vector<double> class_pairs;  // (kNumByteClasses) pairs counted per class
  std::vector<ExpertBytes> experts;  // (E) each expert's most frequent bytes
};
//   counts: (256, E) pairs by input byte and expert
VocabularyView vocabulary_view(const MatrixD& counts, Index top_bytes = 8);
// Adds the batch's pairs of block `moe_index` to counts (256, E), after multiplying the old counts
// by `decay` (1: a plain sum; 0.9: roughly the last ten batches).
void accumulate_byte_counts(MatrixD& counts, const BatchRouting& routing, std::size_t moe_index, double decay);

// ---- 3. Load balancing --------------------------------------------------------------------------

// One point per training step, what the viewer keeps of a StepMetrics (the history of a run).
struct StepPoint {
  std::int64_t step = 0;
  double loss = 0, aux = 0, z = 0, lr = 0, grad_norm = 0, tokens_per_second = 0;
  double load_imbalance = 0, dropped_fraction = 0, logit_rms = 0, logit_max_abs = 0;
  std::vector<std::vector<float>> load_share{};  // (L) (E) each expert's share of the block's pairs
};
StepPoint step_point(const StepMetrics& m);

// Per expert of MoE block `moe_index`, its share of the block's pairs over the steps of `history`.
struct LoadSeries {
  std::vector<double> steps;
  std::vector<std::vector<double>> share;  // (E) (steps)
  std::vector<double> max_share;           // (steps) the busiest expert's share
};
LoadSeries load_series(std::span<const StepPoint> history, std::size_t moe_index);
// Per MoE block, the load entropy H(expert) / log E of every step's pairs (1 even, 0 all on one expert).
struct EntropySeries {
  std::vector<double> steps;
  std::vector<std::vector<double>> entropy;  // (L) (steps)
};
EntropySeries load_entropy_series(std::span<const StepPoint> history);

// ---- 4. Numerics --------------------------------------------------------------------------------

// Logits as stored in every format, the spacing of `format` near each, and the naive and stable
// softmax in `format` (numerics.h's softmax_in_format).
struct NumericsView {
  Format format = Format::bf16;
  std::vector<float> logits;                 // (n) as given
  std::vector<std::vector<float>> rounded;   // (formats of kAllFormats) (n) round_to(logit, f)
  std::vector<float> spacing;                // (n) ulp(round_to(logit, format), format); NaN where not finite
  LowpSoftmax naive;
  LowpSoftmax stable;
};
NumericsView numerics_view(std::span<const float> logits, Format format);
// What `moelab numerics --logits ... --dtype F --json` prints for the same logits (the same keys:
// dtype, logits, rounded_logits, naive, stable), plus "spacing"; non-finite numbers as strings.
Json numerics_json(const NumericsView& view);

// The top-k choices of the live batch with the router in fp32 and in a narrow format (router.h's
// dtype: inputs, weights and logits rounded, products accumulated in float32), per MoE block.
struct RouterFlip {
  int layer = 0;
  Index token = 0;                  // row of the routed batch
  std::int32_t byte = 0;
  std::vector<std::int32_t> fp32;   // the token's experts with the fp32 router, first choice first
  std::vector<std::int32_t> low;    // with the narrow router
  float margin = 0;                 // fp32: the k-th largest logit minus the (k+1)-th (how close the call was)
};
struct RouterPrecision {
  Format format = Format::bf16;
  Index tokens = 0;                    // per block
  std::vector<int> layers;             // (L)
  std::vector<Index> flipped;          // (L) tokens whose set of experts differs
  std::vector<double> mean_abs_logit_change;  // (L) mean |logit_low - logit_fp32|
  std::vector<RouterFlip> examples;    // the flips with the smallest margins first, at most max_examples
};
//   ffn_in: (L) the router inputs (N, C) of each MoE block (ModelOutput::blocks[l].ffn_in)
RouterPrecision router_precision(std::span<const Matrix> ffn_in, std::span<const std::int32_t> bytes,
                                 const ModelParams& params, const ModelConfig& config, Format format,
                                 Index max_examples = 12);

// ---- 6. Bit flip ------------------------------------------------------------------------------------

struct SdcView {
  RoutingTrace trace;
  std::vector<std::int32_t> bytes;                  // (T)
  std::vector<std::vector<bool>> changed;           // (L) (T) the token's set of experts changed
  Index changed_pairs = 0;                          // (token, block) pairs changed
  std::string stored_bits;                          // the stored value's bit pattern, sign first
  std::string faulted_bits;
};
// trace_fault on `text` as `moelab sdc --trace` runs it (the last byte's target is 0x1E). Throws
// Error naming the field for a bad fault or text.
SdcView sdc_view(const ModelConfig& eval_model, const ModelParams& params, std::string_view text, const Fault& fault);
std::string bit_string(std::uint32_t bits, int width);  // "0011111110000000", bit width-1 first

}  // namespace moelab::viewer
