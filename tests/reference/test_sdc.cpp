// Tests of the silent-data-corruption lab (reference/sdc.h, fault_hook.h): the injector flips
// exactly the requested bit (checked against numerics.h's encode / flip_bit / bit_class), each site
// receives exactly one changed element, the hook changes nothing when it does not flip, zero flips
// give zero metrics, the study is deterministic for a seed and a thread count, a hand-worked logit
// flip that hands a token to another expert, and lockstep that catches a transient router fault but
// not a weight fault. N = tokens, C = hidden, E = experts, k = experts per token.
#include "reference/sdc.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "reference/error.h"
#include "reference/layer.h"
#include "reference/model.h"
#include "reference/numerics.h"
#include "reference/random.h"
#include "reference/recorder.h"
#include "tests/testing.h"

namespace moelab {
namespace {

using moelab::testing::bitwise_equal;
using moelab::testing::error_of;

constexpr FaultSite kTransientSites[] = {FaultSite::router_input,       FaultSite::router_logits,
                                         FaultSite::gate_values,        FaultSite::expert_activations,
                                         FaultSite::expert_outputs,     FaultSite::combine_output};

std::uint32_t bits_of(float v) { return std::bit_cast<std::uint32_t>(v); }

// tiny_moe (C = 64, 4 MoE blocks of top-2 of 8 experts) initialised from a seed, and a batch of
// 2 x 8 random bytes with their next bytes as targets.
struct Subject {
  ModelConfig config = tiny_moe();
  ModelParams params;
  Batch batch;
  explicit Subject(std::uint64_t seed = 1) {
    Rng rng(seed);
    params = init_model<float>(config, rng);
    batch.batch_size = 2;
    batch.seq_len = 8;
    for (Index i = 0; i < 16; ++i) batch.inputs.push_back(static_cast<std::int32_t>(rng.next_u64() % 256));
    for (Index i = 0; i < 16; ++i) batch.targets.push_back(batch.inputs[static_cast<std::size_t>((i + 1) % 16)]);
  }
  Index tokens() const { return batch.batch_size * batch.seq_len; }
};

// ---- the primitive ---------------------------------------------------------------------------------

TEST(Sdc, StoreAndFlipFlipsExactlyTheRequestedBitOfTheStoredPattern) {
  const float values[] = {1.0f, -0.3f, 3.14159f, 1e-3f, 200.0f, -7.5e-6f, 0.0f};
  for (Format f : kAllFormats) {
    const FormatInfo& info = format_info(f);
    for (int bit = 0; bit < info.bits; ++bit) {
      for (float v : values) {
        float x = v;
        const FaultRecord r = store_and_flip(x, f, bit, true);
        EXPECT_TRUE(r.applied);
        EXPECT_EQ(bits_of(r.value), bits_of(v));
        EXPECT_EQ(r.stored_bits, encode(v, f, Overflow::saturating)) << format_name(f) << " " << v;
        EXPECT_EQ(r.faulted_bits, flip_bit(r.stored_bits, bit, f));
        const std::uint32_t x_or = r.stored_bits ^ r.faulted_bits;
        EXPECT_EQ(std::popcount(x_or), 1) << format_name(f) << " bit " << bit << " of " << v;
        EXPECT_EQ(x_or, 1u << bit);
        EXPECT_EQ(bits_of(r.stored), bits_of(decode(r.stored_bits, f)));
        EXPECT_EQ(bits_of(r.faulted), bits_of(decode(r.faulted_bits, f)));
        EXPECT_EQ(bits_of(x), bits_of(r.faulted));  // the value itself now holds the faulted one
        if (std::isfinite(r.faulted)) {
          EXPECT_EQ(encode(r.faulted, f), r.faulted_bits);  // the faulted value is that pattern of f
        } else {
          EXPECT_EQ(classify(r.faulted_bits, f) == ValueClass::nan, std::isnan(r.faulted));
        }
      }
      float y = 0.75f;
      const FaultRecord none = store_and_flip(y, f, bit, false);  // the baseline: stored, not flipped
      EXPECT_EQ(none.faulted_bits, none.stored_bits);
      EXPECT_EQ(bits_of(y), bits_of(round_to(0.75f, f)));
    }
  }
  // Saturating storage: 1000 is beyond fp8_e4m3's 448 and stays finite in the baseline.
  float big = 1000.0f;
  EXPECT_EQ(store_and_flip(big, Format::fp8_e4m3, 0, false).stored, 448.0f);
}

TEST(Sdc, BitClassesDrawExactlyTheirPositions) {
  for (Format f : kAllFormats) {
    const FormatInfo& info = format_info(f);
    const std::vector<int> sign = bit_positions(BitChoice{BitClass::sign}, f);
    const std::vector<int> exponent = bit_positions(BitChoice{BitClass::exponent}, f);
    const std::vector<int> mantissa = bit_positions(BitChoice{BitClass::mantissa}, f);
    EXPECT_EQ(sign, std::vector<int>{info.bits - 1});
    EXPECT_EQ(static_cast<int>(exponent.size()), info.exponent_bits);
    EXPECT_EQ(static_cast<int>(mantissa.size()), info.mantissa_bits);
    for (int b : exponent) EXPECT_EQ(bit_class(b, f), BitClass::exponent);
    for (int b : mantissa) EXPECT_EQ(bit_class(b, f), BitClass::mantissa);
    EXPECT_EQ(static_cast<int>(bit_positions(BitChoice{}, f).size()), info.bits);  // any
  }
  EXPECT_EQ(bit_positions(parse_bit_choice("30"), Format::fp32), std::vector<int>{30});
  EXPECT_EQ(parse_bit_choice("any").name(), "any");
  EXPECT_EQ(parse_bit_choice("exponent").name(), "exponent");
  EXPECT_EQ(error_of([] { bit_positions(parse_bit_choice("12"), Format::fp8_e4m3, "--bits"); }),
            "--bits = 12: must be in [0, 8) for fp8_e4m3");
  EXPECT_EQ(error_of([] { parse_bit_choice("top", "--bits"); }),
            "--bits = \"top\": must be sign, exponent, mantissa, any or a bit position (0 = last mantissa bit)");
  EXPECT_NE(error_of([] { parse_fault_site("router", "--site"); }).find("--site = \"router\": must be one of router_input"),
            std::string::npos);
}

// ---- the hook: exactly one element, and nothing else -------------------------------------------------

// Passes every site's values to a BitFlipInjector and counts, per site, the elements it changed.
class Spy : public FaultHook {
 public:
  explicit Spy(const Fault& fault) : inner_(fault) {}
  bool acts_on(Index layer) const override { return inner_.acts_on(layer); }
  bool on_values(const FaultTarget& where, Map values) override {
    const Matrix before = values;
    const bool changed = inner_.on_values(where, values);
    const Matrix after = values;
    int n = 0;
    for (Index i = 0; i < before.size(); ++i) n += bits_of(before.data()[i]) != bits_of(after.data()[i]) ? 1 : 0;
    changes[static_cast<std::size_t>(where.site)] += n;
    EXPECT_EQ(changed, n > 0);  // a flip always changes the bits it flips
    return changed;
  }
  const FaultRecord& record() const { return inner_.record(); }
  int changes[8] = {};

 private:
  BitFlipInjector inner_;
};

TEST(Sdc, EveryTransientSiteReceivesExactlyOneChangedElement) {
  const Subject s;
  ModelOutput clean;
  model_forward(clean, s.batch.inputs, 2, 8, s.params, s.config);
  for (FaultSite site : kTransientSites) {
    Fault f;
    f.site = site;
    f.format = Format::bf16;
    f.bit = 3;  // a mantissa bit: the run stays finite
    f.layer = 2;
    f.token = 11;
    f.slot = 1;
    f.col = site == FaultSite::gate_values ? 0 : 5;
    // A logit matters only if its expert is chosen (the gates are a softmax of the chosen logits).
    if (site == FaultSite::router_logits) f.col = clean.blocks[2].moe.routing.ids(11, 0);
    Spy spy(f);
    ModelOutput out;
    model_forward(out, s.batch.inputs, 2, 8, s.params, s.config, nullptr, nullptr, &spy);
    for (FaultSite other : kAllFaultSites)
      EXPECT_EQ(spy.changes[static_cast<std::size_t>(other)], other == site ? 1 : 0)
          << fault_site_name(site) << " changed " << fault_site_name(other);
    EXPECT_TRUE(spy.record().applied);
    EXPECT_EQ(spy.record().stored_bits ^ spy.record().faulted_bits, 1u << 3);
    // The blocks before the faulted one are untouched, bit for bit.
    for (std::size_t b = 0; b < 2; ++b) EXPECT_TRUE(bitwise_equal(out.blocks[b].moe.y, clean.blocks[b].moe.y));
    EXPECT_FALSE(bitwise_equal(out.logits, clean.logits)) << fault_site_name(site);
  }
}

TEST(Sdc, AHookThatDoesNotFlipChangesNoBit) {
  const Subject s;
  ModelOutput clean;
  model_forward(clean, s.batch.inputs, 2, 8, s.params, s.config);
  for (FaultSite site : kTransientSites) {
    Fault f;  // fp32, no flip: storing in fp32 is the identity
    f.site = site;
    f.flip = false;
    f.layer = 1;
    f.token = 4;
    BitFlipInjector hook(f);
    ModelOutput out;
    model_forward(out, s.batch.inputs, 2, 8, s.params, s.config, nullptr, nullptr, &hook);
    EXPECT_TRUE(hook.record().applied) << fault_site_name(site);
    EXPECT_TRUE(bitwise_equal(out.logits, clean.logits)) << fault_site_name(site);
    for (std::size_t b = 0; b < out.blocks.size(); ++b) {
      EXPECT_TRUE(bitwise_equal(out.blocks[b].moe.y, clean.blocks[b].moe.y));
      EXPECT_TRUE(bitwise_equal(out.blocks[b].moe.routing.ids, clean.blocks[b].moe.routing.ids));
    }
  }
}

TEST(Sdc, AWeightFaultChangesExactlyOneParameter) {
  const Subject s;
  for (FaultSite site : {FaultSite::router_weights, FaultSite::expert_weights}) {
    Fault f;
    f.site = site;
    f.format = Format::fp8_e4m3;
    f.bit = 6;
    f.layer = 3;
    f.expert = 5;
    f.matrix = ExpertMatrix::w_down;
    f.row = 7;
    f.col = site == FaultSite::router_weights ? 60 : 100;
    ModelParams faulted = s.params;
    const FaultRecord r = inject_weight_fault(faulted, s.config, f);
    EXPECT_EQ(r.expert, site == FaultSite::router_weights ? 7 : 5);
    EXPECT_EQ(r.stored_bits ^ r.faulted_bits, 1u << 6);
    const auto a = model_parameters(s.params, s.config);
    const auto b = model_parameters(faulted, s.config);
    int changed = 0;
    for (std::size_t k = 0; k < a.size(); ++k) {
      const float* x = a[k].matrix ? a[k].matrix->data() : a[k].vector->data();
      const float* y = b[k].matrix ? b[k].matrix->data() : b[k].vector->data();
      for (Index i = 0; i < a[k].size(); ++i) {
        if (bits_of(x[i]) == bits_of(y[i])) continue;
        ++changed;
        EXPECT_EQ(a[k].name, site == FaultSite::router_weights ? "model.layers.3.mlp.gate.weight"
                                                               : "model.layers.3.mlp.experts.5.down_proj.weight");
        EXPECT_EQ(bits_of(y[i]), bits_of(r.faulted));
      }
    }
    EXPECT_EQ(changed, 1) << fault_site_name(site);
  }
}

TEST(Sdc, FaultsOutsideTheModelAreErrorsNamingTheField) {
  const Subject s;
  Fault f;
  f.layer = 4;
  EXPECT_EQ(error_of([&] { f.validate(s.config, 16); }), "layer = 4: must be an MoE block (0, 1, 2, 3)");
  f.layer = 0;
  f.col = 8;
  EXPECT_EQ(error_of([&] { f.validate(s.config, 16); }),
            "col = 8: must be in [0, 8) for router_logits (the experts)");
  f.col = 0;
  f.token = 16;
  EXPECT_EQ(error_of([&] { f.validate(s.config, 16); }), "token = 16: must be in [0, 16) (the batch's tokens)");
  f.token = 0;
  f.bit = 32;
  EXPECT_EQ(error_of([&] { f.validate(s.config, 16); }), "bit = 32: must be in [0, 32) for fp32");
  f.bit = 0;
  f.site = FaultSite::gate_values;
  f.slot = 2;
  EXPECT_EQ(error_of([&] { f.validate(s.config, 16); }), "slot = 2: must be in [0, top_k = 2)");
  f.site = FaultSite::expert_weights;
  f.matrix = ExpertMatrix::w_down;
  f.row = 64;
  EXPECT_EQ(error_of([&] { f.validate(s.config, 16); }), "row = 64: must be in [0, 64)");
  ModelConfig dense = tiny_dense();
  EXPECT_EQ(error_of([&] { require_sdc_model(dense, "--checkpoint"); }),
            "--checkpoint = (a dense model): has no MoE block: nothing is routed");
}

// ---- a hand-worked flip --------------------------------------------------------------------------

// One MoE layer small enough to work by hand: C = 2, E = 3 ReLU experts of width 2, top-1 of the
// logits with Mixtral's gate (softmax over the one selected logit: exactly 1). Expert e computes
// FFN_e(x) = relu((e + 1) x) (w_up = (e + 1) I, w_down = I). Router rows w_0 = (1, 0),
// w_1 = (0.5, 0), w_2 = (0.25, 0), so token x_0 = (1, 2) has logits (1, 0.5, 0.25) and token
// x_1 = (2, 1) has (2, 1, 0.5): both go to expert 0, y = x.
//
// Flip bit 30 (the top exponent bit) of token 0's logit for expert 2: 0.25 = 2^-2 is 0x3E800000
// (biased exponent 125); with bit 30 set the exponent is 253 and the logit 2^126. Token 0 now goes
// to expert 2 with gate 1: y_0 = relu(3 x_0) = (3, 6). Token 1 is unchanged. So one of the two
// tokens changed its selection, and ||y_f - y_b|| / ||y_b|| = ||(2, 4)|| / ||(1, 2, 2, 1)||
// = sqrt(20) / sqrt(10) = sqrt(2).
TEST(Sdc, HandWorkedLogitExponentFlipHandsTheTokenToAnotherExpert) {
  LayerConfig c;
  c.routing.router = RouterConfig{.hidden_size = 2, .num_experts = 3};
  c.routing.top_k = 1;
  c.routing.gating = {.kind = GateKind::softmax_of_selected_logits};
  c.expert = {.hidden_size = 2, .intermediate_size = 2, .activation = Activation::relu};
  LayerParams p;
  p.routing.router.weight = moelab::testing::matrix_of<float>({{1, 0}, {0.5f, 0}, {0.25f, 0}});
  for (int e = 0; e < 3; ++e) {
    ExpertParams ex;
    ex.w_up = Matrix::Identity(2, 2) * static_cast<float>(e + 1);
    ex.w_down = Matrix::Identity(2, 2);
    p.experts.push_back(ex);
  }
  const Matrix x = moelab::testing::matrix_of<float>({{1, 2}, {2, 1}});

  LayerOutput base, faulted;
  moe_layer_forward(base, x, {}, p, c, nullptr);
  Fault f;
  f.site = FaultSite::router_logits;
  f.bit = 30;
  f.token = 0;
  f.col = 2;
  MemoryRecorder events({events::fault});
  BitFlipInjector hook(f, &events);
  moe_layer_forward(faulted, x, {}, p, c, nullptr, nullptr, {}, &hook);
  ASSERT_EQ(events.count(events::fault), 1u);  // where the flip went, what it changed
  const RecordedEvent e = events.last(events::fault);
  EXPECT_EQ(e.stat("site"), static_cast<double>(FaultSite::router_logits));
  EXPECT_EQ(e.stat("row"), 0.0);
  EXPECT_EQ(e.stat("col"), 2.0);
  EXPECT_EQ(e.stat("value"), 0.25);
  EXPECT_EQ(e.stat("faulted"), std::ldexp(1.0, 126));

  const FaultRecord& r = hook.record();
  EXPECT_EQ(r.value, 0.25f);
  EXPECT_EQ(r.stored_bits, 0x3E800000u);
  EXPECT_EQ(r.faulted_bits, 0x7E800000u);
  EXPECT_EQ(r.faulted, std::ldexp(1.0f, 126));
  EXPECT_EQ(base.routing.ids, moelab::testing::int_rows({{0}, {0}}));
  EXPECT_EQ(faulted.routing.ids, moelab::testing::int_rows({{2}, {0}}));
  EXPECT_EQ(faulted.routing.gates, moelab::testing::matrix_of<float>({{1}, {1}}));
  EXPECT_EQ(base.y, x);
  EXPECT_EQ(faulted.y, moelab::testing::matrix_of<float>({{3, 6}, {2, 1}}));
  EXPECT_EQ(changed_selections(base.routing.ids, faulted.routing.ids), 1);
  EXPECT_DOUBLE_EQ(relative_l2_error(faulted.y, base.y), std::sqrt(2.0));
  EXPECT_EQ(relative_l2_error(base.y, base.y), 0.0);

  // The same injector with the flip off only stores 0.25 in fp32: nothing changes.
  Fault g = f;
  g.flip = false;
  BitFlipInjector no_flip(g);
  LayerOutput again;
  moe_layer_forward(again, x, {}, p, c, nullptr, nullptr, {}, &no_flip);
  EXPECT_TRUE(no_flip.record().applied);
  EXPECT_EQ(again.routing.ids, base.routing.ids);
  EXPECT_EQ(again.y, base.y);
}

// The same flip in a whole model: compare_runs agrees with the runs' own outputs.
TEST(Sdc, ALogitExponentFlipInTheModelChangesThatTokensSelection) {
  const Subject s;
  ModelOutput clean;
  model_forward(clean, s.batch.inputs, 2, 8, s.params, s.config);
  // Token 5 in block 1: an expert it did not choose, with a positive logit below 2 (bit 30 clear:
  // setting it multiplies the logit by 2^128 and keeps it finite).
  const RoutingOutput& r = clean.blocks[1].moe.routing;
  Index expert = -1;
  for (Index e = 0; e < 8 && expert < 0; ++e)
    if (r.logits(5, e) > 0 && r.logits(5, e) < 1 && r.ids(5, 0) != e && r.ids(5, 1) != e) expert = e;
  ASSERT_GE(expert, 0);
  Fault f;
  f.site = FaultSite::router_logits;
  f.bit = 30;
  f.layer = 1;
  f.token = 5;
  f.col = expert;
  const FaultedRun faulted = run_with_fault(s.config, s.params, s.batch, f);
  Fault g = f;
  g.flip = false;
  const FaultedRun baseline = run_with_fault(s.config, s.params, s.batch, g);
  ASSERT_FALSE(faulted.refused) << faulted.refusal;
  EXPECT_EQ(bits_of(faulted.record.faulted), bits_of(r.logits(5, expert)) | (1u << 30));
  const IndexMatrix& after = faulted.out.blocks[1].moe.routing.ids;
  EXPECT_TRUE(after(5, 0) == expert || after(5, 1) == expert);  // the huge logit wins a slot

  const TrialMetrics m = compare_runs(baseline, faulted, s.batch, s.config, f);
  EXPECT_EQ(m.own_selection_changed, 1.0);
  Index changed = 0;
  for (std::size_t b = 0; b < 4; ++b)
    changed += changed_selections(baseline.out.blocks[b].moe.routing.ids, faulted.out.blocks[b].moe.routing.ids);
  EXPECT_GE(changed, 1);
  EXPECT_EQ(m.selections_changed, static_cast<double>(changed) / (16.0 * 4.0));
  EXPECT_EQ(m.layer_rel_error, relative_l2_error(faulted.out.blocks[1].moe.y, baseline.out.blocks[1].moe.y));
  EXPECT_GT(m.layer_rel_error, 0.0);
  EXPECT_EQ(m.logit_rel_error, relative_l2_error(faulted.out.logits, baseline.out.logits));
  EXPECT_EQ(m.loss_delta, static_cast<double>(model_loss(faulted.out, s.batch.targets).ce) -
                              static_cast<double>(model_loss(baseline.out, s.batch.targets).ce));
  EXPECT_FALSE(m.nonfinite);

  // The trace shows the same routing, block by block.
  const RoutingTrace trace = trace_fault(s.config, s.params, s.batch, f);
  ASSERT_EQ(trace.ids_after.size(), 4u);
  EXPECT_EQ(trace.ids_after[1], after);
  EXPECT_EQ(trace.ids_before[1], r.ids);
  EXPECT_EQ(trace.metrics.own_selection_changed, 1.0);
}

// A flip that makes a value infinite: the reference refuses to route it; the trial is non-finite
// and its errors are NaN, but nothing crashes.
TEST(Sdc, AFlipToInfinityIsCountedAsNonFinite) {
  const Subject s;
  Fault f;
  f.site = FaultSite::router_input;
  f.format = Format::bf16;
  f.bit = 14;  // top exponent bit of bf16: a value in [1, 2) becomes inf
  f.layer = 0;
  f.token = 3;
  ModelOutput clean;
  model_forward(clean, s.batch.inputs, 2, 8, s.params, s.config);
  Index col = -1;
  for (Index c = 0; c < 64 && col < 0; ++c) {
    const float v = round_to(clean.blocks[0].ffn_in(3, c), Format::bf16);
    if (std::abs(v) >= 1 && std::abs(v) < 2) col = c;
  }
  ASSERT_GE(col, 0);
  f.col = col;
  const FaultedRun faulted = run_with_fault(s.config, s.params, s.batch, f);
  EXPECT_FALSE(std::isfinite(faulted.record.faulted));  // inf, or NaN if the mantissa was not zero
  EXPECT_TRUE(faulted.refused);
  Fault g = f;
  g.flip = false;
  const TrialMetrics m = compare_runs(run_with_fault(s.config, s.params, s.batch, g), faulted, s.batch, s.config, f);
  EXPECT_TRUE(m.nonfinite);
  EXPECT_TRUE(std::isnan(m.logit_rel_error));
  EXPECT_TRUE(std::isnan(m.selections_changed));
}

// ---- lockstep ----------------------------------------------------------------------------------------

TEST(Sdc, LockstepDetectsATransientLogitFlipButNotARouterWeightFlip) {
  const Subject s;
  ModelOutput clean;
  model_forward(clean, s.batch.inputs, 2, 8, s.params, s.config);
  const Matrix& x = clean.blocks[2].ffn_in;
  Fault logit;
  logit.site = FaultSite::router_logits;
  logit.bit = 31;  // the sign: the token's logit for expert 3 changes sign, so its gates change
  logit.layer = 2;
  logit.token = 9;
  logit.col = clean.blocks[2].moe.routing.ids(9, 0);  // its first choice
  EXPECT_TRUE(lockstep_detects(s.config, s.params, x, s.batch.inputs, 2, 8, logit));
  Fault off = logit;
  off.flip = false;
  EXPECT_FALSE(lockstep_detects(s.config, s.params, x, s.batch.inputs, 2, 8, off));

  // A router weight flip that changes the routing, in memory: both copies read it, both agree.
  Fault weight;
  weight.site = FaultSite::router_weights;
  weight.bit = 31;
  weight.layer = 2;
  weight.row = clean.blocks[2].moe.routing.ids(0, 0);
  weight.col = 0;
  ModelParams in_memory = s.params;
  inject_weight_fault(in_memory, s.config, weight);
  const FaultedRun faulted = run_with_fault(s.config, s.params, s.batch, weight);
  EXPECT_FALSE(bitwise_equal(faulted.out.blocks[2].moe.routing.gates, clean.blocks[2].moe.routing.gates));
  EXPECT_FALSE(lockstep_detects(s.config, in_memory, x, s.batch.inputs, 2, 8, weight));

  // An expert-output fault is outside the duplicated router.
  Fault expert_out = logit;
  expert_out.site = FaultSite::expert_outputs;
  expert_out.col = 3;
  EXPECT_FALSE(lockstep_detects(s.config, s.params, x, s.batch.inputs, 2, 8, expert_out));

  const LockstepCost cost = lockstep_cost(s.config, 8);
  EXPECT_EQ(cost.router_flops_per_token, 4 * 2 * 64 * 8);  // 4 MoE blocks x 2 C E
  EXPECT_DOUBLE_EQ(cost.of_layer, 1024.0 / (1024.0 + 2 * 2 * 3 * 64 * 128));
}

// ---- the study -------------------------------------------------------------------------------------

SdcConfig small_study(bool flip) {
  SdcConfig c;
  c.trials = 2;
  c.flip = flip;
  c.lockstep = true;
  c.seed = 7;
  return c;
}

void expect_same(const SdcStudy& a, const SdcStudy& b) {
  ASSERT_EQ(a.cells.size(), b.cells.size());
  auto same = [](double x, double y) { return std::bit_cast<std::uint64_t>(x) == std::bit_cast<std::uint64_t>(y); };
  for (std::size_t i = 0; i < a.cells.size(); ++i)
    for (std::size_t t = 0; t < a.cells[i].trials.size(); ++t) {
      const SdcTrial& x = a.cells[i].trials[t];
      const SdcTrial& y = b.cells[i].trials[t];
      EXPECT_EQ(x.fault.layer, y.fault.layer);
      EXPECT_EQ(x.fault.token, y.fault.token);
      EXPECT_EQ(x.fault.bit, y.fault.bit);
      EXPECT_EQ(x.fault.col, y.fault.col);
      EXPECT_EQ(x.fault.row, y.fault.row);
      EXPECT_EQ(x.record.faulted_bits, y.record.faulted_bits);
      EXPECT_EQ(x.refused, y.refused);
      EXPECT_EQ(x.detected, y.detected);
      EXPECT_TRUE(same(x.metrics.selections_changed, y.metrics.selections_changed));
      EXPECT_TRUE(same(x.metrics.layer_rel_error, y.metrics.layer_rel_error));
      EXPECT_TRUE(same(x.metrics.logit_rel_error, y.metrics.logit_rel_error));
      EXPECT_TRUE(same(x.metrics.loss_delta, y.metrics.loss_delta));
    }
}

TEST(Sdc, ZeroFlipsGiveZeroForEveryMetric) {
  const Subject s;
  const SdcStudy study = run_sdc_study(s.config, s.params, s.batch, small_study(false));
  ASSERT_EQ(study.cells.size(), 8u * 3u * 3u);
  for (const SdcCell& cell : study.cells) {
    for (const SdcTrial& t : cell.trials) {
      EXPECT_TRUE(t.record.applied);
      EXPECT_EQ(t.record.stored_bits, t.record.faulted_bits);
      EXPECT_FALSE(t.metrics.nonfinite);
      EXPECT_EQ(t.metrics.selections_changed, 0.0);
      EXPECT_EQ(t.metrics.layer_rel_error, 0.0);
      EXPECT_EQ(t.metrics.logit_rel_error, 0.0);
      EXPECT_EQ(t.metrics.loss_delta, 0.0);
      if (is_weight_site(cell.site)) {
        EXPECT_TRUE(std::isnan(t.metrics.own_selection_changed));
      } else {
        EXPECT_EQ(t.metrics.own_selection_changed, 0.0);
      }
      EXPECT_EQ(t.detected, false);
    }
    EXPECT_EQ(cell.summary.effect, 0);
    EXPECT_EQ(cell.summary.nonfinite, 0);
    EXPECT_EQ(cell.summary.logit_rel_error.max, 0.0);
    EXPECT_EQ(cell.summary.detected, 0.0);
  }
  for (const SdcRatio& r : study.ratios) {
    EXPECT_EQ(r.router_logit_error, 0.0);
    EXPECT_TRUE(std::isnan(r.ratio));  // 0 / 0: no damage on either side
  }
}

TEST(Sdc, TheStudyIsDeterministicForASeedAndAnyThreadCount) {
  const Subject s;
  SdcConfig c = small_study(true);
  c.sites = {FaultSite::router_logits, FaultSite::router_weights, FaultSite::expert_outputs, FaultSite::expert_weights};
  c.formats = {Format::bf16, Format::fp8_e4m3};
  const SdcStudy a = run_sdc_study(s.config, s.params, s.batch, c);
  c.threads = 2;
  const SdcStudy b = run_sdc_study(s.config, s.params, s.batch, c);
  expect_same(a, b);
  // With the flip on, something happens somewhere; the ratios compare router and expert sites.
  Index effects = 0;
  for (const SdcCell& cell : a.cells) effects += cell.summary.effect;
  EXPECT_GT(effects, 0);
  EXPECT_EQ(a.ratios.size(), 2u * 3u * 2u);  // formats x bit classes x (transient, weight)
  // Another seed draws other faults.
  c.seed = 8;
  const SdcStudy d = run_sdc_study(s.config, s.params, s.batch, c);
  int different = 0;
  for (std::size_t i = 0; i < a.cells.size(); ++i)
    for (std::size_t t = 0; t < a.cells[i].trials.size(); ++t)
      different += a.cells[i].trials[t].fault.col != d.cells[i].trials[t].fault.col ? 1 : 0;
  EXPECT_GT(different, 0);
}

TEST(Sdc, SummariesCountAndSpreadTheTrials) {
  std::vector<SdcTrial> trials(4);
  trials[0].metrics = {.logit_rel_error = 0.0};
  trials[1].metrics = {.logit_rel_error = 0.5};
  trials[2].metrics = {.logit_rel_error = 0.1};
  trials[3].metrics.nonfinite = true;
  trials[3].metrics.logit_rel_error = std::numeric_limits<double>::quiet_NaN();
  for (SdcTrial& t : trials) t.record.applied = true;
  trials[1].detected = true;
  const SdcSummary s = summarize(trials, FaultSite::router_logits, true);
  EXPECT_EQ(s.trials, 4);
  EXPECT_EQ(s.nonfinite, 1);
  EXPECT_EQ(s.effect, 3);
  EXPECT_EQ(s.logit_rel_error.count, 3);
  EXPECT_DOUBLE_EQ(s.logit_rel_error.mean, 0.2);
  EXPECT_EQ(s.logit_rel_error.median, 0.1);
  EXPECT_EQ(s.logit_rel_error.max, 0.5);
  EXPECT_EQ(s.detected, 0.25);
  EXPECT_DOUBLE_EQ(s.detected_of_effect, 1.0 / 3.0);
}

}  // namespace
}  // namespace moelab
