// Tests of the viewer's non-GL library: the numbers every panel shows (viewer/panel_data.h), the
// session that trains in a worker thread and publishes snapshots (viewer/session.h), and the command
// line (viewer/options.h). No display needed. A model of C = 16 keeps them fast.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "reference/capacity.h"
#include "reference/error.h"
#include "reference/numerics.h"
#include "tests/testing.h"
#include "viewer/options.h"
#include "viewer/panel_data.h"
#include "viewer/session.h"

namespace moelab::viewer {
namespace {

namespace fs = std::filesystem;
using testing::error_of;

// The tiny model at C = 16: 2 blocks of 2 heads, Mixtral's routing (8 experts, top-2) with H = 32.
ModelConfig small_model() {
  ModelConfig m = model_config("mixtral");
  m.hidden_size = 16;
  m.n_heads = 2;
  m.n_layers = 2;
  m.moe.routing.router.hidden_size = 16;
  m.moe.expert.hidden_size = 16;
  m.moe.expert.intermediate_size = 32;
  m.validate();
  return m;
}

ModelParams small_params(const ModelConfig& m, std::uint64_t seed = 3) {
  Rng rng(seed);
  ModelParams p = init_model<float>(m, rng);
  // Larger router weights than init's 0.02, so that the routing is not a near-tie everywhere.
  for (BlockParamsT<float>& b : p.blocks) b.moe.routing.router.weight *= 20.0f;
  return p;
}

Batch text_batch(const std::string& text, Index B) {
  Batch b;
  b.batch_size = B;
  b.seq_len = static_cast<Index>(text.size());
  for (Index s = 0; s < B; ++s)
    for (char c : text) {
      b.inputs.push_back(static_cast<std::uint8_t>(c) ^ static_cast<int>(s));
      b.targets.push_back(0);
      b.domains.push_back(static_cast<std::int32_t>(s % 2));
    }
  return b;
}

// ---- Text -------------------------------------------------------------------------------------------

TEST(ViewerText, Utf8GlyphsSpanTheirBytesAndInvalidBytesStandAlone) {
  // "a", "é" (C3 A9), "中" (E4 B8 AD), a lone continuation byte, 0xFF, then a truncated "中".
  const std::vector<std::int32_t> bytes = {'a', 0xC3, 0xA9, 0xE4, 0xB8, 0xAD, 0x80, 0xFF, 0xE4, 0xB8};
  const std::vector<ByteGlyph> g = utf8_glyphs(bytes);
  ASSERT_EQ(g.size(), bytes.size());
  EXPECT_EQ(g[0].codepoint, 'a');
  EXPECT_EQ(g[0].length, 1);
  EXPECT_EQ(g[1].codepoint, 0xE9u);
  EXPECT_EQ(g[2].codepoint, 0xE9u);
  EXPECT_EQ(g[1].part, 0);
  EXPECT_EQ(g[2].part, 1);
  EXPECT_EQ(g[2].length, 2);
  for (int i = 3; i < 6; ++i) {
    EXPECT_EQ(g[static_cast<std::size_t>(i)].codepoint, 0x4E2Du);
    EXPECT_EQ(g[static_cast<std::size_t>(i)].part, i - 3);
    EXPECT_TRUE(g[static_cast<std::size_t>(i)].valid);
  }
  for (int i = 6; i < 10; ++i) EXPECT_FALSE(g[static_cast<std::size_t>(i)].valid) << i;
  // Overlong "/" (C0 AF) and a surrogate (ED A0 80) are not UTF-8.
  for (const std::vector<std::int32_t>& bad : {std::vector<std::int32_t>{0xC0, 0xAF}, {0xED, 0xA0, 0x80}})
    for (const ByteGlyph& x : utf8_glyphs(bad)) EXPECT_FALSE(x.valid);
  EXPECT_EQ(utf8_encode(0x4E2D), "\xE4\xB8\xAD");
  EXPECT_EQ(utf8_encode(0xE9), "\xC3\xA9");
  EXPECT_EQ(byte_label(0x1E), "0x1E");
  EXPECT_EQ(byte_label('\n'), "\\n");
  EXPECT_EQ(byte_label('q'), "q");
}

// ---- Numerics -------------------------------------------------------------------------------------

TEST(ViewerNumerics, ViewIsSoftmaxInFormatWithRoundingAndSpacing) {
  const std::vector<float> logits = {128.5f, 1.0f, 0.0f};
  const NumericsView v = numerics_view(logits, Format::bf16);
  ASSERT_EQ(v.rounded.size(), std::size(kAllFormats));
  EXPECT_EQ(v.rounded[0][0], 128.5f);  // fp32
  EXPECT_EQ(v.rounded[1][0], 128.0f);  // bf16: the tie goes to the even 128
  EXPECT_EQ(v.rounded[3][0], 128.0f);  // e4m3: spacing 32 near 128
  EXPECT_EQ(v.spacing[0], 1.0f);
  EXPECT_EQ(v.spacing[1], 0.0078125f);
  EXPECT_EQ(v.naive.overflow_count, 1);
  EXPECT_EQ(v.naive.nan_count, 1);
  EXPECT_TRUE(std::isnan(v.naive.probs[0]));
  EXPECT_FALSE(v.stable.overflowed());
  EXPECT_EQ(v.stable.probs[0], 1.0f);
  const LowpSoftmax ref = softmax_in_format(logits, Format::bf16, SoftmaxMethod::stable);
  EXPECT_EQ(v.stable.probs, ref.probs);
  const Json j = numerics_json(v);
  EXPECT_EQ(j["dtype"], "bf16");
  EXPECT_EQ(j["rounded_logits"][0].get<double>(), 128.0);
  EXPECT_EQ(j["naive"]["probs"][0], "nan");
  EXPECT_EQ(j["naive"]["sum"], "inf");
  EXPECT_EQ(j["stable"]["overflowed"], false);
  EXPECT_NE(error_of([] { numerics_view({}, Format::bf16); }).find("logits"), std::string::npos);
}

// ---- Routing ----------------------------------------------------------------------------------------

TEST(ViewerRouting, CollectorRebuildsTheLayersRoutingAndItsDrops) {
  ModelConfig m = small_model();
  m.moe.capacity.dropless = false;
  m.moe.capacity.capacity_factor = 0.5;  // drops pairs
  const ModelParams p = small_params(m);
  const Batch batch = text_batch("the cat sat on the mat; 12+30=42", 2);
  RoutingCollector collector;
  ModelOutput out;
  model_forward(out, batch.inputs, batch.batch_size, batch.seq_len, p, m, nullptr, &collector);
  const BatchRouting r = collector.assemble(batch, m, 7, true);
  EXPECT_EQ(r.step, 7);
  EXPECT_EQ(r.top_k, 2);
  EXPECT_EQ(r.num_experts, 8);
  ASSERT_EQ(r.layers.size(), 2u);
  const Index N = batch.batch_size * batch.seq_len;
  std::int64_t dropped_total = 0;
  for (std::size_t j = 0; j < 2; ++j) {
    const LayerRouting& l = r.layers[j];
    const LayerOutput& o = out.blocks[j].moe;
    ASSERT_EQ(static_cast<Index>(l.routes.size()), N);
    EXPECT_TRUE(testing::bitwise_equal(l.logits, o.routing.logits));
    std::int64_t pairs = 0;
    for (std::int64_t n : l.load) pairs += n;
    EXPECT_EQ(pairs, N * 2);
    for (Index t = 0; t < N; ++t)
      for (Index k = 0; k < 2; ++k) {
        const TokenRoute& x = l.routes[static_cast<std::size_t>(t)][static_cast<std::size_t>(k)];
        EXPECT_EQ(x.expert, o.routing.ids(t, k));
        EXPECT_EQ(x.gate, o.routing.gates(t, k));
        EXPECT_EQ(x.kept, o.keep(t, k) != 0) << "token " << t << " slot " << k;
      }
    EXPECT_EQ(l.dropped, o.dropped);
    for (std::int64_t d : l.dropped) dropped_total += d;
    EXPECT_EQ(l.capacity, static_cast<double>(expert_capacity(N, 2, 8, m.moe.capacity)));
  }
  EXPECT_GT(dropped_total, 0);
  // Events of another batch size do not fit: an Error, not garbage.
  Batch longer = text_batch("the cat sat on the mat; 12+30=42!", 2);
  EXPECT_NE(error_of([&] { collector.assemble(longer, m, 0, true); }).find("routing events of block 0 = 64 tokens"), std::string::npos);

  const BatchRouting text = route_text(without_router_noise(m), p, "héllo");
  EXPECT_EQ(text.batch.seq_len, 6);
  EXPECT_EQ(text.layers[0].routes.size(), 6u);
  EXPECT_NE(error_of([&] { route_text(m, p, ""); }).find("text"), std::string::npos);
  EXPECT_EQ(balanced_load(64, 2, 8), 16.0);
}

TEST(ViewerRouting, Bf16RouterFlipsOnlyNearTies) {
  const ModelConfig m = small_model();
  ModelParams p = small_params(m);
  // Block 0: experts 0, 1, 2 differ by less than bf16's spacing at 1.0 (2^-7); x = e_0 reads column 0.
  // fp32 picks {2, 1}; in bf16 all three are 1.0, and ties go to the lower id: {0, 1}.
  for (BlockParamsT<float>& b : p.blocks) {
    b.moe.routing.router.weight.setZero();
    for (Index e = 0; e < 8; ++e) b.moe.routing.router.weight(e, 0) = 0.1f * static_cast<float>(e) - 2.0f;
  }
  Matrix& w0 = p.blocks[0].moe.routing.router.weight;
  w0(0, 0) = 1.0f;
  w0(1, 0) = 1.0f + std::ldexp(1.0f, -12);
  w0(2, 0) = 1.0f + 3 * std::ldexp(1.0f, -12);
  Matrix x = Matrix::Zero(3, 16);
  x.col(0).setOnes();
  const std::vector<Matrix> ffn_in = {x, x};
  const std::vector<std::int32_t> bytes = {'a', 'b', 'c'};
  const RouterPrecision bf16 = router_precision(ffn_in, bytes, p, m, Format::bf16);
  EXPECT_EQ(bf16.tokens, 3);
  ASSERT_EQ(bf16.flipped.size(), 2u);
  EXPECT_EQ(bf16.flipped[0], 3);  // every token of block 0
  EXPECT_EQ(bf16.flipped[1], 0);  // 0.1 apart: no flip
  ASSERT_FALSE(bf16.examples.empty());
  EXPECT_EQ(bf16.examples[0].fp32, (std::vector<std::int32_t>{2, 1}));
  EXPECT_EQ(bf16.examples[0].low, (std::vector<std::int32_t>{0, 1}));
  EXPECT_NEAR(bf16.examples[0].margin, std::ldexp(1.0f, -12), 1e-7f);
  const RouterPrecision fp32 = router_precision(ffn_in, bytes, p, m, Format::fp32);
  EXPECT_EQ(fp32.flipped, (std::vector<Index>{0, 0}));
}

// ---- Specialisation and balance -------------------------------------------------------------------

TEST(ViewerSpecialisation, SharesEntropyAndVocabulary) {
  EvalMetrics e;
  e.step = 50;
  e.moe_layers = {0, 1};
  e.domain_tokens = {10, 5};
  // Domain 0's 10 tokens x 2 pairs all on experts 0 and 1; domain 1 spread over 0..4 evenly (2 each).
  MatrixD c = MatrixD::Zero(2, 8);
  c(0, 0) = 10;
  c(0, 1) = 10;
  for (int i = 0; i < 5; ++i) c(1, i) = 2;
  e.routing = {c, MatrixD::Constant(2, 8, 1.0)};
  e.specialisation = {0.5, 0.0};
  e.byte_specialisation = {1.5, 0.2};
  const DomainShare s = domain_share(e, 0, std::vector<std::string>{"en", "zh"}, 2);
  EXPECT_EQ(s.domains, (std::vector<std::string>{"en", "zh"}));
  EXPECT_DOUBLE_EQ(s.share(0, 0), 1.0);  // every English token has expert 0 among its two
  EXPECT_DOUBLE_EQ(s.share(1, 3), 0.4);
  EXPECT_DOUBLE_EQ(s.share.row(1).sum(), 2.0);  // rows sum to k
  EXPECT_DOUBLE_EQ(normalised_expert_entropy(MatrixD::Constant(3, 8, 2.0)), 1.0);
  MatrixD one = MatrixD::Zero(1, 8);
  one(0, 3) = 5;
  EXPECT_DOUBLE_EQ(normalised_expert_entropy(one), 0.0);
  const SpecialisationSeries series = specialisation_series(std::vector<EvalMetrics>{e, e});
  EXPECT_EQ(series.steps, (std::vector<double>{50, 50}));
  EXPECT_EQ(series.domain_mi[0], (std::vector<double>{0.5, 0.5}));
  EXPECT_EQ(series.byte_mi[1], (std::vector<double>{0.2, 0.2}));
  EXPECT_DOUBLE_EQ(series.entropy[1][0], 1.0);
  EXPECT_NE(error_of([&] { domain_share(e, 2, {}, 2); }).find("moe_index = 2"), std::string::npos);

  MatrixD bytes = MatrixD::Zero(256, 8);
  bytes('a', 0) = 9;  // letters: 9 pairs on expert 0, 1 on expert 1
  bytes('b', 1) = 1;
  bytes('7', 2) = 4;  // digits: all on expert 2
  const VocabularyView v = vocabulary_view(bytes, 3);
  EXPECT_DOUBLE_EQ(v.class_share(0, 0), 0.9);  // ByteClass::letter
  EXPECT_DOUBLE_EQ(v.class_share(1, 2), 1.0);  // ByteClass::digit
  EXPECT_DOUBLE_EQ(v.class_pairs[0], 10.0);
  ASSERT_EQ(v.experts[0].top.size(), 1u);
  EXPECT_EQ(v.experts[0].top[0].first, 'a');
  EXPECT_DOUBLE_EQ(v.experts[0].top[0].second, 1.0);
}

TEST(ViewerBalance, StepPointsAndLoadSeries) {
  StepMetrics m;
  m.step = 4;
  m.loss = 2.5;
  m.load = {{6, 2, 0, 0}, {2, 2, 2, 2}};
  const StepPoint p = step_point(m);
  EXPECT_EQ(p.step, 4);
  EXPECT_EQ(p.load_share[0], (std::vector<float>{0.75f, 0.25f, 0.0f, 0.0f}));
  StepPoint q = p;
  q.step = 5;
  q.load_share[1] = {1, 0, 0, 0};
  const std::vector<StepPoint> history = {p, q};
  const LoadSeries s = load_series(history, 1);
  EXPECT_EQ(s.steps, (std::vector<double>{4, 5}));
  EXPECT_EQ(s.share[0], (std::vector<double>{0.25, 1.0}));
  EXPECT_EQ(s.max_share, (std::vector<double>{0.25, 1.0}));
  const EntropySeries h = load_entropy_series(history);
  EXPECT_NEAR(h.entropy[1][0], 1.0, 1e-12);
  EXPECT_NEAR(h.entropy[1][1], 0.0, 1e-12);
}

TEST(ViewerBalance, RunHistoryComesBackFromMetricsJsonl) {
  const fs::path dir = fs::temp_directory_path() / fmt::format("moelab_viewer_history_{}", ::getpid());
  fs::create_directories(dir);
  MetricsLog log(dir / "metrics.jsonl");
  for (std::int64_t s = 0; s < 3; ++s) {
    StepMetrics m;
    m.step = s;
    m.loss = 3.0 - static_cast<double>(s);
    m.logit_rms = 0.5;
    m.load = {{3, 1}, {2, 2}};
    emit_metrics(log, m, (s + 1) * 100);
  }
  EvalMetrics e;
  e.step = 2;
  e.loss = 1.5;
  e.moe_layers = {0, 1};
  e.specialisation = {0.1, 0.2};
  e.byte_specialisation = {1.1, 1.2};
  emit_metrics(log, e, 4.0);
  log.flush();
  std::vector<StepPoint> history;
  std::vector<EvalMetrics> evals;
  read_run_history(dir / "metrics.jsonl", 2, history, evals);  // a checkpoint at step 2: steps 0 and 1
  ASSERT_EQ(history.size(), 2u);
  EXPECT_EQ(history[1].loss, 2.0);
  EXPECT_EQ(history[1].logit_rms, 0.5);
  EXPECT_EQ(history[0].load_share[0], (std::vector<float>{0.75f, 0.25f}));
  ASSERT_EQ(evals.size(), 1u);
  EXPECT_EQ(evals[0].moe_layers, (std::vector<int>{0, 1}));
  EXPECT_EQ(evals[0].byte_specialisation, (std::vector<double>{1.1, 1.2}));

  // A damaged line is an Error naming the file, the event and its step, not a crash.
  struct Case {
    std::string line, expected;
  };
  const std::string step = R"("name":"train_step","layer":-1,"step":0)";
  const std::string eval = R"("name":"eval","layer":-1,"step":0,"shape":[0,0],"values":[],"ids":[])";
  for (const Case& c : {
           Case{"{" + step + R"(,"shape":[2],"values":[1,2],"ids":[],"stats":{}})", "line 1: shape = [2]"},
           Case{"{" + step + R"(,"shape":[2,2],"values":[1,2,3],"ids":[],"stats":{}})", "values count = 3"},
           Case{"{" + step + R"(,"shape":[2,2],"values":[],"ids":[],"stats":{}})",
                "the train_step event of step 0: shape must be (MoE blocks, experts) and match its values"},
           Case{"{" + step + R"(,"shape":[1,2],"values":[1,"nan"],"ids":[],"stats":{}})", "load nan is not a count"},
           Case{"{" + step + R"(,"shape":[1,2],"values":[1,1e300],"ids":[],"stats":{}})", "is not a count"},
           Case{"{" + eval + R"(,"stats":{"specialisation_x":0.1}})", "stat \"specialisation_x\" must be"},
           Case{"{" + eval + R"(,"stats":{"byte_specialisation_99999999999":0.1}})", "byte_specialisation_<block>"},
       }) {
    {
      std::ofstream f(dir / "damaged.jsonl", std::ios::trunc);
      f << c.line << "\n";
    }
    history.clear();
    evals.clear();
    const std::string error = error_of([&] { read_run_history(dir / "damaged.jsonl", 5, history, evals); });
    EXPECT_NE(error.find((dir / "damaged.jsonl").string() + ": "), std::string::npos) << c.line << "\n" << error;
    EXPECT_NE(error.find(c.expected), std::string::npos) << c.line << "\n" << error;
  }
  fs::remove_all(dir);
}

// ---- Bit flip -------------------------------------------------------------------------------------------

TEST(ViewerSdc, AFlipThatIsOffChangesNothingAndBitsArePrinted) {
  const ModelConfig m = without_router_noise(small_model());
  const ModelParams p = small_params(m);
  Fault f;
  f.site = FaultSite::router_logits;
  f.format = Format::bf16;
  f.bit = 14;
  f.token = 2;
  f.col = 1;
  f.flip = false;
  const SdcView off = sdc_view(m, p, "int x;", f);
  EXPECT_EQ(off.changed_pairs, 0);
  EXPECT_EQ(off.stored_bits.size(), 16u);
  EXPECT_EQ(off.stored_bits, off.faulted_bits);
  f.flip = true;
  const SdcView on = sdc_view(m, p, "int x;", f);
  EXPECT_NE(on.stored_bits, on.faulted_bits);
  EXPECT_EQ(on.faulted_bits[1], '1');  // bit 14 of bf16 is the top exponent bit
  EXPECT_EQ(on.changed.size(), 2u);
  EXPECT_EQ(bit_string(0x3F80, 16), "0011111110000000");
  f.col = 8;
  EXPECT_NE(error_of([&] { sdc_view(m, p, "int x;", f); }).find("col = 8"), std::string::npos);
}

// ---- Session ---------------------------------------------------------------------------------------------

// The generated corpus (no system sources under an empty root): small and quick to build.
std::shared_ptr<const Corpus> generated_corpus() {
  const fs::path root = fs::temp_directory_path() / fmt::format("moelab_viewer_empty_root_{}", ::getpid());
  fs::create_directories(root);
  CorpusOptions o;
  o.root = root;
  o.max_domain_bytes = 64 * 1024;
  auto corpus = std::make_shared<const Corpus>(build_corpus(o));
  fs::remove_all(root);
  return corpus;
}

SessionSettings small_settings() {
  SessionSettings s;
  s.batch_size = 4;
  s.seq_len = 32;
  s.eval_every = 2;
  s.eval_batches = 1;
  s.analysis_sequences = 1;
  s.stop_at = 3;
  return s;
}

TEST(ViewerSession, TrainsInTheBackgroundAndPublishesImmutableSnapshots) {
  const auto corpus = generated_corpus();
  Session session(corpus, small_settings());
  const std::shared_ptr<const Snapshot> first = session.snapshot();
  ASSERT_NE(first, nullptr);
  EXPECT_EQ(first->steps_done, 0);
  EXPECT_FALSE(first->routing.trained);            // the inspection forward of step 0's batch
  EXPECT_EQ(first->routing.layers.size(), 4u);     // tiny_moe: every block is MoE
  ASSERT_EQ(first->evals.size(), 1u);              // evaluated at step 0
  EXPECT_EQ(first->evals[0].routing.size(), 4u);

  session.start();
  ASSERT_TRUE(session.wait_for([](const Snapshot& s) { return s.steps_done == 3 && !s.running; }, 120));
  const std::shared_ptr<const Snapshot> s = session.snapshot();
  EXPECT_GT(s->version, first->version);
  EXPECT_EQ(first->steps_done, 0);  // the old snapshot is untouched
  EXPECT_TRUE(s->routing.trained);
  EXPECT_EQ(s->routing.step, 2);    // the last step taken
  EXPECT_EQ(s->history.size(), 3u);
  EXPECT_EQ(s->history.back().step, 2);
  for (const LayerRouting& l : s->routing.layers) {
    std::int64_t pairs = 0;
    for (std::int64_t n : l.load) pairs += n;
    EXPECT_EQ(pairs, 4 * 32 * 2);
  }
  // The step's load as the trainer measured it is the load the events report.
  for (std::size_t j = 0; j < 4; ++j) {
    const std::vector<float>& share = s->history.back().load_share[j];
    EXPECT_FLOAT_EQ(share[0], static_cast<float>(s->routing.layers[j].load[0]) / 256.0f);
  }
  ASSERT_EQ(s->evals.size(), 2u);  // steps 0 and 2
  EXPECT_EQ(s->evals[1].step, 2);
  ASSERT_TRUE(s->precision.has_value());
  EXPECT_EQ(s->precision->tokens, 32);
  EXPECT_EQ(s->ffn_in.size(), 4u);
  EXPECT_EQ(s->byte_counts[0].rows(), 256);
  EXPECT_GT(s->unigram_baseline, 0.0);

  // Live changes reach the trainer between steps.
  session.set_balance(BalanceMode::none, std::nullopt);
  session.set_z_loss(0.01);
  ASSERT_TRUE(session.wait_for([](const Snapshot& x) { return x.config.balance == BalanceMode::none &&
                                                              x.model.moe.routing.z_loss_coef == 0.01; }, 60));
  session.set_stop_at(4);
  session.start();
  ASSERT_TRUE(session.wait_for([](const Snapshot& x) { return x.steps_done == 4 && !x.running; }, 120));
  EXPECT_EQ(session.snapshot()->history.back().aux, 0.0);
  EXPECT_GT(session.snapshot()->history.back().z, 0.0);

  // Save: RUN/step-000004 and RUN/latest, which a new session opens at step 4; a second save of the
  // same step refuses to replace it.
  const fs::path run = fs::temp_directory_path() / fmt::format("moelab_viewer_save_{}", ::getpid());
  fs::remove_all(run);
  session.save(run);
  ASSERT_TRUE(session.wait_for([](const Snapshot& x) { return !x.saved.empty(); }, 60));
  EXPECT_EQ(session.snapshot()->saved, (run / "step-000004").string());
  EXPECT_TRUE(session.snapshot()->error.empty()) << session.snapshot()->error;
  {
    Session reopened(corpus, small_settings(), run);
    EXPECT_EQ(reopened.snapshot()->steps_done, 4);
    EXPECT_EQ(reopened.snapshot()->config.balance, BalanceMode::none);  // the live change is recorded
  }
  session.save(run);
  ASSERT_TRUE(session.wait_for([](const Snapshot& x) { return !x.error.empty(); }, 60));
  EXPECT_NE(session.snapshot()->error.find("step-000004: exists already"), std::string::npos)
      << session.snapshot()->error;
  fs::remove_all(run);

  // An invalid command is reported, and changes nothing.
  session.set_balance(BalanceMode::none, 0.5);
  ASSERT_TRUE(session.wait_for([](const Snapshot& x) { return x.error.find("strength = 0.5") != std::string::npos; }, 60))
      << session.snapshot()->error;
  EXPECT_EQ(session.snapshot()->config.balance, BalanceMode::none);

  // Reset: a fresh run of another seed.
  SessionSettings other = small_settings();
  other.seed = 9;
  session.reset(other);
  ASSERT_TRUE(session.wait_for([](const Snapshot& x) { return x.steps_done == 0 && x.config.seed == 9; }, 60));
  EXPECT_TRUE(session.snapshot()->history.empty());
}

TEST(ViewerSession, BadSettingsAndCheckpointsAreErrors) {
  const auto corpus = generated_corpus();
  SessionSettings s = small_settings();
  s.model_name = "nonesuch";
  EXPECT_NE(error_of([&] { Session x(corpus, s); }).find("nonesuch"), std::string::npos);
  EXPECT_NE(error_of([&] { Session x(corpus, small_settings(), "/nonexistent/run"); }).find("/nonexistent/run"),
            std::string::npos);
}

// ---- Options ----------------------------------------------------------------------------------------------

TEST(ViewerOptionsTest, DefaultsAndErrorsNameTheFlag) {
  const ViewerOptions d = parse_viewer_options({});
  EXPECT_EQ(d.settings.model_name, "tiny_moe");
  EXPECT_EQ(d.width, 1280);
  EXPECT_EQ(d.panel, "routing");
  EXPECT_EQ(d.logits, (std::vector<float>{128.5f, 1.0f, 0.0f}));
  const ViewerOptions o = parse_viewer_options({"--screenshot", "x.png", "--frames", "5", "--panel", "numerics",
                                                "--size", "800x600", "--logits", "12,0", "--numerics-dtype", "fp16",
                                                "--train-steps", "3", "--balance", "aux_free", "--hover", "10,20"});
  EXPECT_EQ(o.frames, 5);
  EXPECT_EQ(o.width, 800);
  EXPECT_EQ(o.height, 600);
  EXPECT_EQ(o.numerics_dtype, Format::fp16);
  EXPECT_EQ(o.settings.stop_at, std::optional<std::int64_t>(3));
  EXPECT_EQ(o.settings.balance, BalanceMode::aux_free);
  EXPECT_EQ(o.hover, (std::optional<std::pair<int, int>>{{10, 20}}));
  auto err = [](std::vector<std::string> args) { return error_of([&] { parse_viewer_options(args); }); };
  EXPECT_NE(err({"--screenshot", "x.png"}).find("--frames = 0"), std::string::npos);
  EXPECT_NE(err({"--frames", "3"}).find("goes with --screenshot"), std::string::npos);
  EXPECT_NE(err({"--screenshot", "x.jpg", "--frames", "1"}).find("--screenshot = x.jpg"), std::string::npos);
  EXPECT_NE(err({"--panel", "bogus"}).find("--panel = \"bogus\""), std::string::npos);
  EXPECT_NE(err({"--size", "10x10"}).find("--size"), std::string::npos);
  EXPECT_NE(err({"--size", "wide"}).find("WIDTHxHEIGHT"), std::string::npos);
  EXPECT_NE(err({"--balance", "fair"}).find("balance = \"fair\""), std::string::npos);
  EXPECT_NE(err({"--logits", "1,x"}).find("item 2"), std::string::npos);
  EXPECT_NE(err({"--numerics-dtype", "fp64"}).find("--numerics-dtype"), std::string::npos);
  EXPECT_NE(err({"--model", "gpt5"}).find("gpt5"), std::string::npos);
  EXPECT_NE(err({"--no-such-flag"}).find("no-such-flag"), std::string::npos);
  EXPECT_NE(err({"--batch", "6", "--seq", "0"}).find("seq_len = 0"), std::string::npos);
  EXPECT_EQ(panel_index("sdc"), 5);
}

}  // namespace
}  // namespace moelab::viewer
