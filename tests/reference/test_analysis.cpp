// Tests of reference/analysis: every metric on a small example worked by hand (balanced and
// all-to-one load, perfect specialisation and independence, vocabulary specialisation, co-activation,
// saturation), the report's JSON and text, and the error messages.
#include <gtest/gtest.h>

#include <cmath>
#include <numbers>
#include <string>
#include <vector>

#include "reference/analysis.h"
#include "reference/random.h"
#include "tests/testing.h"

namespace moelab {
namespace {

using moelab::testing::error_of;
using moelab::testing::int_rows;

RoutingSample sample_of(IndexMatrix ids, Index num_experts, Matrix gates = {}) {
  RoutingSample s;
  s.ids = std::move(ids);
  s.gates = std::move(gates);
  s.num_experts = num_experts;
  return s;
}

const double kLog2 = std::numbers::ln2;

// ---- Load ----------------------------------------------------------------------------------------

TEST(AnalysisLoad, PerfectlyBalancedHasJainOneCvZeroEntropyLogE) {
  // E = 4, k = 2: every expert gets 2 of the 8 assignments.
  const LoadStats s = load_stats(sample_of(int_rows({{0, 1}, {2, 3}, {1, 0}, {3, 2}}), 4));
  EXPECT_EQ(s.counts, (std::vector<std::int64_t>{2, 2, 2, 2}));
  EXPECT_EQ(s.fraction, (std::vector<double>{0.25, 0.25, 0.25, 0.25}));
  EXPECT_EQ(s.max_over_mean, 1.0);
  EXPECT_EQ(s.cv, 0.0);
  EXPECT_EQ(s.jain, 1.0);
  EXPECT_DOUBLE_EQ(s.entropy, std::log(4.0));
  EXPECT_DOUBLE_EQ(s.normalised_entropy, 1.0);
  EXPECT_TRUE(s.dead.empty());
  EXPECT_TRUE(s.nearly_dead.empty());
  EXPECT_FALSE(s.mean_gate_entropy.has_value());
}

TEST(AnalysisLoad, AllToOneHasJainOneOverEAndEMinusOneDeadExperts) {
  const LoadStats s = load_stats(sample_of(int_rows({{2}, {2}, {2}}), 4));
  EXPECT_EQ(s.counts, (std::vector<std::int64_t>{0, 0, 3, 0}));
  EXPECT_EQ(s.max_over_mean, 4.0);       // = E
  EXPECT_DOUBLE_EQ(s.cv, std::sqrt(3.0));  // = sqrt(E - 1): std = 3 sqrt(3) / 4, mean = 3 / 4
  EXPECT_DOUBLE_EQ(s.jain, 0.25);        // = 1 / E
  EXPECT_EQ(s.entropy, 0.0);
  EXPECT_EQ(s.normalised_entropy, 0.0);
  EXPECT_EQ(s.dead, (std::vector<std::int32_t>{0, 1, 3}));
  EXPECT_EQ(s.nearly_dead, (std::vector<std::int32_t>{0, 1, 3}));  // the dead are nearly dead too
}

TEST(AnalysisLoad, NearlyDeadIsBelowAShareOfTheBalancedLoad) {
  // Loads (9, 9, 1, 1) of 20: mean 5. Ratio 0.3 -> below 1.5: experts 2 and 3; ratio 0.1 -> below 0.5: none.
  IndexMatrix ids(20, 1);
  for (Index t = 0; t < 20; ++t) ids(t, 0) = t < 9 ? 0 : t < 18 ? 1 : t == 18 ? 2 : 3;
  const RoutingSample sample = sample_of(ids, 4);
  EXPECT_EQ(load_stats(sample, 0.3).nearly_dead, (std::vector<std::int32_t>{2, 3}));
  EXPECT_TRUE(load_stats(sample, 0.1).nearly_dead.empty());
  EXPECT_TRUE(load_stats(sample, 0.3).dead.empty());
  // Jain by hand: 20^2 / (4 (81 + 81 + 1 + 1)) = 400 / 656.
  EXPECT_DOUBLE_EQ(load_stats(sample).jain, 400.0 / 656.0);
  EXPECT_DOUBLE_EQ(load_stats(sample).max_over_mean, 9.0 / 5.0);
}

TEST(AnalysisLoad, MeanGateEntropyRenormalisesEachTokensGatesAndSkipsAllZeroRows) {
  const Matrix gates = testing::matrix_of<float>({{0.5F, 0.5F}, {1.0F, 0.0F}, {0.3F, 0.1F}, {0.0F, 0.0F}});
  const LoadStats s = load_stats(sample_of(int_rows({{0, 1}, {1, 0}, {0, 1}, {1, 0}}), 2, gates));
  ASSERT_TRUE(s.mean_gate_entropy.has_value());
  // Token 0: log 2; token 1: 0; token 2: (0.75, 0.25); token 3: all 0, left out.
  const double h2 = -(0.75 * std::log(0.75) + 0.25 * std::log(0.25));
  EXPECT_NEAR(*s.mean_gate_entropy, (kLog2 + 0.0 + h2) / 3.0, 1e-7);  // the gates are float
}

// ---- Domains and mutual information ---------------------------------------------------------------

TEST(AnalysisDomains, PerfectSpecialisationGivesTheIdentityAndMiLog2) {
  // Domain 0 always goes to expert 0, domain 1 to expert 1.
  const RoutingSample sample = sample_of(int_rows({{0}, {1}, {0}, {1}}), 2);
  const std::vector<std::int32_t> domains{0, 1, 0, 1};
  const DomainDistribution d = domain_expert_distribution(sample, domains, 2);
  EXPECT_TRUE(testing::bitwise_equal(d.fraction, MatrixD(MatrixD::Identity(2, 2))));
  EXPECT_TRUE(testing::bitwise_equal(d.token_share, MatrixD(MatrixD::Identity(2, 2))));
  EXPECT_EQ(d.tokens, (std::vector<std::int64_t>{2, 2}));
  EXPECT_TRUE(d.empty_domains.empty());

  const MutualInformation mi = mutual_information(sample, domains, 2);
  EXPECT_DOUBLE_EQ(mi.nats, kLog2);
  EXPECT_DOUBLE_EQ(mi.label_entropy, kLog2);
  EXPECT_DOUBLE_EQ(mi.expert_entropy, kLog2);
  EXPECT_DOUBLE_EQ(mi.normalised, 1.0);
}

TEST(AnalysisDomains, TopKRowsSumToOneAndTokenShareIsKTimesThat) {
  // k = 2 of E = 4: domain 0 -> {0, 1}, domain 1 -> {2, 3}: still MI = log 2, the full H(domain).
  const RoutingSample sample = sample_of(int_rows({{0, 1}, {2, 3}, {1, 0}, {3, 2}}), 4);
  const std::vector<std::int32_t> domains{0, 1, 0, 1};
  const DomainDistribution d = domain_expert_distribution(sample, domains, 3);  // domain 2: no tokens
  EXPECT_TRUE(testing::bitwise_equal(d.fraction, testing::rows_of({{0.5, 0.5, 0, 0}, {0, 0, 0.5, 0.5}, {0, 0, 0, 0}})));
  EXPECT_TRUE(testing::bitwise_equal(d.token_share, testing::rows_of({{1, 1, 0, 0}, {0, 0, 1, 1}, {0, 0, 0, 0}})));
  EXPECT_EQ(d.tokens, (std::vector<std::int64_t>{2, 2, 0}));
  EXPECT_EQ(d.empty_domains, (std::vector<std::int32_t>{2}));
  EXPECT_EQ(d.assignments(0, 0), 2);
  EXPECT_DOUBLE_EQ(mutual_information(sample, domains, 3).nats, kLog2);
}

TEST(AnalysisDomains, IndependenceInABalancedDesignGivesMiExactlyZero) {
  // Every (domain, expert) pair once: p(d, e) = p(d) p(e) = 1/4.
  const RoutingSample sample = sample_of(int_rows({{0}, {1}, {0}, {1}}), 2);
  const std::vector<std::int32_t> domains{0, 0, 1, 1};
  const MutualInformation mi = mutual_information(sample, domains, 2);
  EXPECT_EQ(mi.nats, 0.0);
  EXPECT_EQ(mi.normalised, 0.0);
  EXPECT_TRUE(testing::bitwise_equal(domain_expert_distribution(sample, domains, 2).fraction,
                                     testing::rows_of({{0.5, 0.5}, {0.5, 0.5}})));
}

TEST(AnalysisDomains, MiOfAPartialSpecialisationMatchesTheFormula) {
  // k = 1, E = 2: domain 0 -> (e0, e0, e0, e1), domain 1 -> (e1, e1). p(d) = (2/3, 1/3), p(e) = (1/2, 1/2).
  const RoutingSample sample = sample_of(int_rows({{0}, {0}, {0}, {1}, {1}, {1}}), 2);
  const std::vector<std::int32_t> domains{0, 0, 0, 0, 1, 1};
  const double expected = 0.5 * std::log(0.5 / (2.0 / 3 * 0.5)) + 1.0 / 6 * std::log((1.0 / 6) / (2.0 / 3 * 0.5)) +
                          1.0 / 3 * std::log((1.0 / 3) / (1.0 / 3 * 0.5));
  const MutualInformation mi = mutual_information(sample, domains, 2);
  EXPECT_NEAR(mi.nats, expected, 1e-15);
  const double h_domain = -(2.0 / 3 * std::log(2.0 / 3) + 1.0 / 3 * std::log(1.0 / 3));
  EXPECT_NEAR(mi.label_entropy, h_domain, 1e-15);
  EXPECT_NEAR(mi.normalised, expected / h_domain, 1e-15);
  // I = H(expert) - H(expert | domain) = log 2 - 2/3 H(3/4, 1/4).
  EXPECT_NEAR(mi.nats, kLog2 + 2.0 / 3 * (0.75 * std::log(0.75) + 0.25 * std::log(0.25)), 1e-15);
}

TEST(AnalysisDomains, PermutationBaselineIsNearZeroForIndependentLabelsAndFarBelowARealSpecialisation) {
  // Random experts and random domains: the plug-in MI is the small-sample bias, about
  // (D - 1)(E - 1) / (2N) = 3 * 7 / 4000 ~ 0.005 nats, and the shuffled labels show the same.
  Rng rng(7);
  const Index n = 2000;
  IndexMatrix ids(n, 1);
  std::vector<std::int32_t> domains(n);
  for (Index t = 0; t < n; ++t) {
    ids(t, 0) = static_cast<std::int32_t>(rng.next_u64() % 8);
    domains[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(rng.next_u64() % 4);
  }
  const RoutingSample random_sample = sample_of(ids, 8);
  const double observed = mutual_information(random_sample, domains, 4).nats;
  const PermutationBaseline b = mi_permutation_baseline(random_sample, domains, 4, 50, 123);
  EXPECT_EQ(b.permutations, 50);
  EXPECT_EQ(b.seed, 123u);
  EXPECT_GT(b.mean, 0.0);
  EXPECT_LT(b.mean, 0.01);
  EXPECT_LT(observed, 0.02);
  EXPECT_LT(std::abs(observed - b.mean), 4 * b.stddev);
  EXPECT_GT(b.p_value, 0.02);
  EXPECT_GE(b.max, b.mean);

  // Now every domain goes to its own pair of experts: I = log 4, and no shuffle comes close.
  for (Index t = 0; t < n; ++t) ids(t, 0) = 2 * domains[static_cast<std::size_t>(t)] + static_cast<std::int32_t>(t % 2);
  const RoutingSample specialised = sample_of(ids, 8);
  EXPECT_NEAR(mutual_information(specialised, domains, 4).normalised, 1.0, 1e-12);
  const PermutationBaseline s = mi_permutation_baseline(specialised, domains, 4, 50, 123);
  EXPECT_LT(s.max, 0.05);
  EXPECT_DOUBLE_EQ(s.p_value, 1.0 / 51.0);  // the smallest possible
}

TEST(AnalysisDomains, PermutationBaselineIsDeterministicInItsSeed) {
  const RoutingSample sample = sample_of(int_rows({{0}, {1}, {0}, {1}, {1}, {0}, {0}, {1}}), 2);
  const std::vector<std::int32_t> domains{0, 1, 0, 1, 0, 0, 1, 1};
  const PermutationBaseline a = mi_permutation_baseline(sample, domains, 2, 10, 5);
  const PermutationBaseline b = mi_permutation_baseline(sample, domains, 2, 10, 5);
  EXPECT_EQ(a.mean, b.mean);
  EXPECT_EQ(a.stddev, b.stddev);
  EXPECT_EQ(a.p_value, b.p_value);
  const PermutationBaseline one = mi_permutation_baseline(sample, domains, 2, 1, 5);
  EXPECT_EQ(one.stddev, 0.0);
  EXPECT_EQ(one.mean, one.max);
}

// ---- Bytes ---------------------------------------------------------------------------------------

TEST(AnalysisBytes, EveryByteFallsInItsClass) {
  EXPECT_EQ(byte_class('a'), ByteClass::letter);
  EXPECT_EQ(byte_class('Z'), ByteClass::letter);
  EXPECT_EQ(byte_class('0'), ByteClass::digit);
  EXPECT_EQ(byte_class('9'), ByteClass::digit);
  for (unsigned char c : {' ', '\t', '\n', '\v', '\f', '\r'}) EXPECT_EQ(byte_class(c), ByteClass::whitespace) << int(c);
  for (unsigned char c : {'!', '/', ':', '@', '[', '`', '{', '~'}) EXPECT_EQ(byte_class(c), ByteClass::punctuation) << c;
  for (int c : {0x00, 0x08, 0x0E, 0x1E, 0x1F, 0x7F}) EXPECT_EQ(byte_class(static_cast<std::uint8_t>(c)), ByteClass::control) << c;
  EXPECT_EQ(byte_class(0x80), ByteClass::utf8_continuation);
  EXPECT_EQ(byte_class(0xBF), ByteClass::utf8_continuation);
  EXPECT_EQ(byte_class(0xC0), ByteClass::utf8_lead);
  EXPECT_EQ(byte_class(0xE4), ByteClass::utf8_lead);  // the lead byte of most CJK characters
  EXPECT_EQ(byte_class(0xFF), ByteClass::utf8_lead);
  int counts[kNumByteClasses] = {};
  for (int b = 0; b < 256; ++b) ++counts[static_cast<int>(byte_class(static_cast<std::uint8_t>(b)))];
  EXPECT_EQ(counts[static_cast<int>(ByteClass::letter)], 52);
  EXPECT_EQ(counts[static_cast<int>(ByteClass::digit)], 10);
  EXPECT_EQ(counts[static_cast<int>(ByteClass::whitespace)], 6);
  EXPECT_EQ(counts[static_cast<int>(ByteClass::punctuation)], 94 - 62);
  EXPECT_EQ(counts[static_cast<int>(ByteClass::control)], 32 - 5 + 1);
  EXPECT_EQ(counts[static_cast<int>(ByteClass::utf8_continuation)], 64);
  EXPECT_EQ(counts[static_cast<int>(ByteClass::utf8_lead)], 64);
  EXPECT_EQ(byte_class_name(ByteClass::utf8_continuation), "utf8_continuation");
}

// 'a' x4, 'b' x2, ' ' x2 and '1' once, E = 3, k = 2.
struct VocabExample {
  RoutingSample sample = sample_of(int_rows({{0, 1}, {1, 0}, {0, 2}, {1, 2},  // 'a'
                                             {2, 0}, {2, 1},                  // 'b'
                                             {1, 2}, {1, 0},                  // ' '
                                             {1, 0}}),                        // '1'
                                   3);
  std::vector<std::int32_t> bytes{'a', 'a', 'a', 'a', 'b', 'b', ' ', ' ', '1'};
};

TEST(AnalysisBytes, VocabularySpecialisationCountsAnyOfTheKExperts) {
  const VocabExample x;
  const VocabularySpecialisation v = vocabulary_specialisation(x.sample, x.bytes, 2);
  EXPECT_DOUBLE_EQ(v.uniform, 2.0 / 3.0);  // k / E
  // 'a' goes to e0 3 times, e1 3 times, e2 twice: e0 (the lower id of the tie), 3/4.
  // 'b' goes to e2 both times; ' ' to e1 both times; '1' occurs once, fewer than min_count = 2.
  ASSERT_EQ(v.bytes.size(), 3u);
  EXPECT_EQ(v.bytes[0].byte, ' ');
  EXPECT_EQ(v.bytes[0].top_expert, 1);
  EXPECT_EQ(v.bytes[0].share, 1.0);
  EXPECT_EQ(v.bytes[1].byte, 'a');
  EXPECT_EQ(v.bytes[1].count, 4);
  EXPECT_EQ(v.bytes[1].top_expert, 0);
  EXPECT_EQ(v.bytes[1].share, 0.75);
  EXPECT_EQ(v.bytes[2].byte, 'b');
  EXPECT_EQ(v.bytes[2].top_expert, 2);
  EXPECT_EQ(v.bytes[2].share, 1.0);
  EXPECT_EQ(v.tokens, 8);
  EXPECT_DOUBLE_EQ(v.mean, (2 * 1.0 + 4 * 0.75 + 2 * 1.0) / 8);  // weighted by occurrences: 7/8
  ASSERT_EQ(v.classes.size(), static_cast<std::size_t>(kNumByteClasses));
  const ClassSpecialisation& letters = v.classes[static_cast<std::size_t>(ByteClass::letter)];
  EXPECT_EQ(letters.byte_values, 2);
  EXPECT_EQ(letters.tokens, 6);
  EXPECT_DOUBLE_EQ(letters.mean, 5.0 / 6.0);
  EXPECT_EQ(v.classes[static_cast<std::size_t>(ByteClass::whitespace)].mean, 1.0);
  const ClassSpecialisation& digits = v.classes[static_cast<std::size_t>(ByteClass::digit)];
  EXPECT_EQ(digits.byte_values, 0);  // '1' is below min_count
  EXPECT_EQ(digits.tokens, 0);
  EXPECT_EQ(digits.mean, 0.0);
  // With min_count 1, '1' joins with share 1.
  EXPECT_EQ(vocabulary_specialisation(x.sample, x.bytes, 1).bytes.size(), 4u);
}

TEST(AnalysisBytes, VocabularySpecialisationByFirstChoiceOnly) {
  const VocabExample x;
  const VocabularySpecialisation v = vocabulary_specialisation(x.sample, x.bytes, 2, VocabCounting::first_choice);
  EXPECT_DOUBLE_EQ(v.uniform, 1.0 / 3.0);
  // 'a' first choices: e0, e1, e0, e1: a tie, e0 with 2/4.
  EXPECT_EQ(v.bytes[1].top_expert, 0);
  EXPECT_EQ(v.bytes[1].share, 0.5);
  EXPECT_DOUBLE_EQ(v.mean, (2.0 + 2.0 + 2.0) / 8);
  EXPECT_DOUBLE_EQ(v.classes[static_cast<std::size_t>(ByteClass::letter)].mean, 4.0 / 6.0);
}

TEST(AnalysisBytes, ALayerThatRoutesByByteClassHasFullByteClassMiAndNoDomainMi) {
  // Letters to e0, digits to e1, in both domains alike.
  const RoutingSample sample = sample_of(int_rows({{0}, {1}, {0}, {1}}), 2);
  const std::vector<std::int32_t> bytes{'x', '7', 'y', '3'};
  const std::vector<std::int32_t> domains{0, 0, 1, 1};
  EXPECT_EQ(byte_class_labels(bytes), (std::vector<std::int32_t>{0, 1, 0, 1}));
  const MutualInformation by_class = mutual_information(sample, byte_class_labels(bytes), kNumByteClasses);
  EXPECT_DOUBLE_EQ(by_class.nats, kLog2);
  EXPECT_DOUBLE_EQ(by_class.normalised, 1.0);
  EXPECT_EQ(mutual_information(sample, domains, 2).nats, 0.0);
}

// ---- Co-activation and saturation -------------------------------------------------------------------

TEST(AnalysisCoactivation, ThreeTokensByHand) {
  // E = 3, k = 2: tokens {0, 1}, {0, 2}, {1, 0}. Expert 0 has 3 tokens, 2 of them also at e1 and 1
  // at e2; expert 1 has 2 tokens, both also at e0; expert 2 has 1, also at e0.
  const Coactivation c = coactivation(sample_of(int_rows({{0, 1}, {0, 2}, {1, 0}}), 3), 3);
  const MatrixT<std::int64_t> tokens = testing::matrix_of<std::int64_t>({{3, 2, 1}, {2, 2, 0}, {1, 0, 1}});
  EXPECT_TRUE(testing::bitwise_equal(c.tokens, tokens));
  EXPECT_TRUE(testing::bitwise_equal(c.share, testing::rows_of({{0, 2.0 / 3, 1.0 / 3}, {1, 0, 0}, {1, 0, 0}})));
  for (Index i = 0; i < 3; ++i) EXPECT_DOUBLE_EQ(c.share.row(i).sum(), 1.0);  // k - 1
  ASSERT_EQ(c.top_pairs.size(), 3u);                                           // of 4 non-zero pairs
  EXPECT_EQ(c.top_pairs[0].expert, 1);  // share 1, ties in (i, j) order
  EXPECT_EQ(c.top_pairs[0].other, 0);
  EXPECT_EQ(c.top_pairs[0].tokens, 2);
  EXPECT_EQ(c.top_pairs[1].expert, 2);
  EXPECT_EQ(c.top_pairs[1].other, 0);
  EXPECT_EQ(c.top_pairs[2].expert, 0);
  EXPECT_EQ(c.top_pairs[2].other, 1);
  EXPECT_DOUBLE_EQ(c.top_pairs[2].share, 2.0 / 3);
}

TEST(AnalysisCoactivation, TopOneHasNoPairsAndUnusedExpertsHaveZeroRows) {
  const Coactivation c = coactivation(sample_of(int_rows({{0}, {2}}), 4));
  EXPECT_TRUE(c.top_pairs.empty());
  EXPECT_EQ(c.share.cwiseAbs().sum(), 0.0);
  EXPECT_EQ(c.tokens(0, 0), 1);
  EXPECT_EQ(c.tokens(1, 1), 0);
}

TEST(AnalysisSaturation, IdenticalSamplesSaturateAndOrderDoesNotMatter) {
  const RoutingSample a = sample_of(int_rows({{0, 1}, {2, 3}, {0, 2}}), 4);
  const Saturation same = router_saturation(a, a);
  EXPECT_EQ(same.mean, 1.0);
  EXPECT_EQ(same.first_choice_agreement, 1.0);
  const Saturation swapped = router_saturation(a, sample_of(int_rows({{1, 0}, {3, 2}, {2, 0}}), 4));
  EXPECT_EQ(swapped.mean, 1.0);  // the same sets
  EXPECT_EQ(swapped.first_choice_agreement, 0.0);
}

TEST(AnalysisSaturation, PartialOverlapByHand) {
  // Overlaps 2, 1, 0 of k = 2: (2 + 1 + 0) / (3 * 2) = 1/2; first choices agree for token 1 only.
  const RoutingSample a = sample_of(int_rows({{0, 1}, {2, 3}, {0, 2}}), 4);
  const RoutingSample b = sample_of(int_rows({{1, 0}, {2, 0}, {3, 1}}), 4);
  const Saturation s = router_saturation(a, b);
  EXPECT_EQ(s.mean, 0.5);
  EXPECT_DOUBLE_EQ(s.first_choice_agreement, 1.0 / 3);
}

// ---- The report --------------------------------------------------------------------------------------

TEST(AnalysisReport, GathersEveryMetricAndWritesJsonAndText) {
  const RoutingSample sample = sample_of(int_rows({{0}, {1}, {0}, {1}}), 2);
  const RoutingSample reference = sample_of(int_rows({{0}, {1}, {1}, {1}}), 2);
  TokenLabels labels;
  labels.bytes = {'a', 0xE4, 'b', 0xE4};
  labels.domains = {0, 1, 0, 1};
  labels.domain_names = {"prose_en", "fortunes_zh"};
  AnalysisOptions options;
  options.min_byte_count = 1;
  options.permutations = 5;
  const LayerReport r = analyze_layer(sample, labels, options, 3, &reference);
  EXPECT_EQ(r.layer, 3);
  EXPECT_EQ(r.tokens, 4);
  EXPECT_EQ(r.load.jain, 1.0);
  ASSERT_TRUE(r.domain_mi && r.domain_mi_baseline && r.byte_class_mi && r.vocabulary && r.saturation && r.domains);
  EXPECT_DOUBLE_EQ(r.domain_mi->nats, kLog2);
  EXPECT_DOUBLE_EQ(r.byte_class_mi->nats, kLog2);  // letters to e0, lead bytes to e1
  EXPECT_EQ(r.vocabulary->mean, 1.0);
  EXPECT_EQ(r.saturation->mean, 0.75);

  const Json j = to_json(r);
  EXPECT_EQ(j["layer"], 3);
  EXPECT_EQ(j["num_experts"], 2);
  EXPECT_EQ(j["load"]["counts"], Json::array({2, 2}));
  EXPECT_EQ(j["load"]["jain"], 1.0);
  EXPECT_TRUE(j["load"]["mean_gate_entropy"].is_null());
  EXPECT_EQ(j["domain_names"][1], "fortunes_zh");
  EXPECT_EQ(j["domains"]["fraction"], Json::parse("[[1.0, 0.0], [0.0, 1.0]]"));
  EXPECT_EQ(j["domains"]["top_domain_per_expert"], Json::array({0, 1}));
  EXPECT_DOUBLE_EQ(j["domain_mi"]["nats"].get<double>(), kLog2);
  EXPECT_EQ(j["domain_mi_baseline"]["permutations"], 5);
  EXPECT_EQ(j["vocabulary"]["counting"], "top_k");
  EXPECT_EQ(j["vocabulary"]["classes"][static_cast<std::size_t>(ByteClass::utf8_lead)]["tokens"], 2);
  EXPECT_EQ(j["vocabulary"]["bytes"][2]["byte"], 0xE4);
  EXPECT_EQ(j["coactivation"]["top_pairs"], Json::array());
  EXPECT_EQ(j["saturation"]["mean"], 0.75);
  const std::vector<std::string> keys{"layer",     "tokens",        "top_k",     "num_experts",   "load",
                                      "domain_names", "domains",    "domain_mi", "domain_mi_baseline",
                                      "byte_class_mi", "vocabulary", "coactivation", "saturation"};
  std::vector<std::string> written;
  for (const auto& item : j.items()) written.push_back(item.key());
  EXPECT_EQ(written, keys);

  const std::string text = summary_text(r);
  EXPECT_NE(text.find("Layer 3: 4 tokens, top-1 of 2 experts."), std::string::npos) << text;
  EXPECT_NE(text.find("Jain 1.000"), std::string::npos) << text;
  EXPECT_NE(text.find("dead experts: none"), std::string::npos) << text;
  EXPECT_NE(text.find("I(domain; expert) = 0.6931 nats, 1.000 of H(domain)"), std::string::npos) << text;
  EXPECT_NE(text.find("e0 prose_en 100%, e1 fortunes_zh 100%."), std::string::npos) << text;
  EXPECT_NE(text.find("Router saturation against the reference: 0.750"), std::string::npos) << text;
  const std::vector<LayerReport> two{r, r};
  EXPECT_EQ(summary_text(two), text + "\n\n" + text);
}

TEST(AnalysisReport, PartsWithoutTheirLabelsAreNull) {
  const LayerReport r = analyze_layer(sample_of(int_rows({{0, 1}, {1, 0}}), 3), TokenLabels{});
  EXPECT_FALSE(r.domains || r.domain_mi || r.domain_mi_baseline || r.byte_class_mi || r.vocabulary || r.saturation);
  EXPECT_EQ(r.load.dead, (std::vector<std::int32_t>{2}));
  const Json j = to_json(r);
  for (const char* key : {"domains", "domain_mi", "domain_mi_baseline", "byte_class_mi", "vocabulary", "saturation"})
    EXPECT_TRUE(j[key].is_null()) << key;
  EXPECT_NE(summary_text(r).find("dead experts: e2"), std::string::npos) << summary_text(r);
  EXPECT_NE(summary_text(r).find("Most co-activated: e0->e1 1.00 e1->e0 1.00."), std::string::npos) << summary_text(r);
}

// ---- Errors ---------------------------------------------------------------------------------------------

TEST(AnalysisErrors, NameTheFieldTheValueAndTheRule) {
  const RoutingSample good = sample_of(int_rows({{0, 1}, {2, 3}}), 4);
  const std::vector<std::int32_t> domains{0, 1};
  EXPECT_EQ(error_of([] { load_stats(sample_of(int_rows({{0, 1}, {4, 3}}), 4)); }),
            "ids(1, 0) = 4: must be in [0, num_experts = 4)");
  EXPECT_EQ(error_of([] { load_stats(sample_of(int_rows({{0, -1}}), 4)); }),
            "ids(0, 1) = -1: must be in [0, num_experts = 4)");
  EXPECT_EQ(error_of([] { load_stats(sample_of(int_rows({{2, 2}}), 4)); }),
            "ids(0, 1) = 2: repeats ids(0, 0); a token's experts must be distinct");
  EXPECT_EQ(error_of([] { load_stats(sample_of(IndexMatrix(3, 0), 4)); }),
            "ids = (3, 0): k = 0: every token needs at least one expert");
  EXPECT_EQ(error_of([] { load_stats(sample_of(IndexMatrix(0, 2), 4)); }),
            "ids = (0, 2): must hold at least one token (N >= 1)");
  EXPECT_EQ(error_of([] { load_stats(sample_of(int_rows({{0, 1, 2}}), 2)); }),
            "ids = (1, 3): k = 3 must not exceed num_experts = 2");
  EXPECT_EQ(error_of([] { load_stats(sample_of(int_rows({{0}}), 0)); }), "num_experts = 0: must be at least 1");
  EXPECT_EQ(error_of([&] { load_stats(sample_of(good.ids, 4, Matrix::Ones(2, 1))); }),
            "gates = (2, 1): must be empty or the shape of ids, (2, 2)");
  EXPECT_EQ(error_of([&] { load_stats(sample_of(good.ids, 4, testing::matrix_of<float>({{0.5F, -0.5F}, {1, 0}}))); }),
            "gates(0, 1) = -0.5: must be finite and >= 0");
  EXPECT_EQ(error_of([&] { load_stats(good, 1.5); }),
            "nearly_dead_ratio = 1.5: must be in [0, 1] (a multiple of the balanced load)");

  EXPECT_EQ(error_of([&] { domain_expert_distribution(good, std::vector<std::int32_t>{0, 1, 0}, 2); }),
            "domains.size() = 3: must equal the tokens of ids, N = 2");
  EXPECT_EQ(error_of([&] { domain_expert_distribution(good, std::vector<std::int32_t>{0, -1}, 2); }),
            "domains[1] = -1: must be in [0, 2) (a domain id indexes the D domains)");
  EXPECT_EQ(error_of([&] { domain_expert_distribution(good, domains, 0); }), "num_domains = 0: must be at least 1");
  EXPECT_EQ(error_of([&] { mutual_information(good, std::vector<std::int32_t>{0, 2}, 2, "domains"); }),
            "domains[1] = 2: must be in [0, 2) (a label indexes the label values)");
  EXPECT_EQ(error_of([&] { mi_permutation_baseline(good, domains, 2, 0, 1); }),
            "permutations = 0: must be at least 1");
  EXPECT_EQ(error_of([&] { vocabulary_specialisation(good, std::vector<std::int32_t>{'a', 256}, 1); }),
            "bytes[1] = 256: must be in [0, 256) (a byte)");
  EXPECT_EQ(error_of([&] { vocabulary_specialisation(good, std::vector<std::int32_t>{'a', 'b'}, 0); }),
            "min_byte_count = 0: must be at least 1");
  EXPECT_EQ(error_of([] { byte_class_labels(std::vector<std::int32_t>{-3}); }), "bytes[0] = -3: must be in [0, 256) (a byte)");
  EXPECT_EQ(error_of([&] { coactivation(good, -1); }), "top_pairs = -1: must not be negative");

  EXPECT_EQ(error_of([&] { router_saturation(good, sample_of(int_rows({{0, 1}}), 4)); }),
            "b.ids = (1, 2): must be the shape of a.ids, (2, 2) (the same tokens, the same k)");
  EXPECT_EQ(error_of([&] { router_saturation(good, sample_of(good.ids, 5)); }),
            "b.num_experts = 5: must equal a.num_experts = 4 (the same layer of two checkpoints)");
  EXPECT_EQ(error_of([&] { router_saturation(good, sample_of(int_rows({{0, 1}, {2, 9}}), 4)); }),
            "b.ids(1, 1) = 9: must be in [0, num_experts = 4)");

  TokenLabels labels;
  labels.domains = {0, 1};
  EXPECT_EQ(error_of([&] { analyze_layer(good, labels); }),
            "domain_names.size() = 0: must name the domains that domains refers to");
  labels.domain_names = {"a", "b"};
  labels.domains = {0, -2};
  EXPECT_EQ(error_of([&] { analyze_layer(good, labels); }),
            "domains[1] = -2: must be in [0, 2) (a domain id indexes domain_names)");
  labels.domains = {0, 1};
  AnalysisOptions options;
  options.permutations = -1;
  EXPECT_EQ(error_of([&] { analyze_layer(good, labels, options); }),
            "permutations = -1: must not be negative (0 = no baseline)");
  const RoutingSample other = sample_of(int_rows({{0, 1}}), 4);
  EXPECT_EQ(error_of([&] { analyze_layer(good, labels, {}, 0, &other); }),
            "reference.ids = (1, 2): must be the shape of ids, (2, 2) (the same tokens, the same k)");
}

}  // namespace
}  // namespace moelab
