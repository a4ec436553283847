// moelab/reference/analysis.h — what the routers of a trained model learned: per-layer statistics of
// their decisions, after OLMoE's routing analysis (Muennighoff et al. 2024, sec. 5: domain and
// vocabulary specialisation, co-activation, router saturation) plus the usual load-balance measures.
//
// Inputs are plain data, so that `moelab analyze`, the viewer and the notebooks share one
// implementation: a RoutingSample per MoE layer (the experts the router chose for N tokens, and
// optionally their gates) and labels of the same N tokens (their byte, their domain). From a model:
//   RoutingSample{out.blocks[i].moe.routing.ids, out.blocks[i].moe.routing.gates, E}   (token choice;
// expert choice's ids are (E, C) token ids and must be turned into per-token lists first).
//
// Shapes: N = tokens, k = experts per token, E = routed experts, D = domains (or labels of any kind).
//
// What is counted: the N * k token-expert assignments (t, ids(t, j)), i.e. what the router chose.
// A pair that capacity later dropped still counts: the analysis is of the router, not of the FFNs.
// Column 0 is the first choice (selection writes a token's experts in descending order of score).
//
// Conventions chosen where the papers leave room (each repeated where it is computed):
// - domain distribution: rows sum to 1 over assignments; OLMoE's figure plots k times that (the
//   share of the domain's tokens that have the expert among their k; uniform = k / E): token_share.
// - mutual information: over assignments, in nats, normalised by H(domain) (Theil's uncertainty
//   coefficient), not by min(H(domain), H(expert)): H(domain) is the same for every layer of one
//   sample, so the normalised values of different layers compare exactly as the nats do.
// - vocabulary specialisation: any of the k choices counts (OLMoE), or the first only (a parameter).
// - co-activation: the diagonal is 0, not the 1 the formula gives, so a heatmap's colours go to pairs.
// - ties (top expert of a byte, top domain of an expert) go to the lower id, as in selection.
//
// Every function validates its inputs and throws Error naming the field, the value and the rule,
// e.g. "ids(3, 1) = 8: must be in [0, num_experts = 8)" or "domains[2] = -1: must be in [0, 2) ...".
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "reference/types.h"

namespace moelab {

using Json = nlohmann::ordered_json;

// One layer's routing decisions for N tokens.
struct RoutingSample {
  IndexMatrix ids;        // (N, k) expert ids; row t: token t's k distinct experts, first choice first
  Matrix gates;           // (N, k) their gates (finite, >= 0), or empty when not known
  Index num_experts = 0;  // E

  Index tokens() const { return ids.rows(); }
  Index top_k() const { return ids.cols(); }
  // Throws Error unless E >= 1, N >= 1, k in [1, E], every id in [0, E) and distinct within its row,
  // and gates empty or (N, k) of finite values >= 0. `name` prefixes the fields ("b.ids(2, 0) = ...").
  void validate(std::string_view name = "") const;
};

// ---- Domain x expert distribution (the OLMoE figure) -------------------------------------------

struct DomainDistribution {
  MatrixT<std::int64_t> assignments;  // (D, E) n(d, e): assignments of domain d's tokens to expert e
  MatrixD fraction;                   // (D, E) n(d, e) / (k * tokens_d): rows sum to 1 (empty domain: 0)
  MatrixD token_share;                // (D, E) k * fraction: share of d's tokens routed to e (OLMoE; uniform k / E)
  std::vector<std::int64_t> tokens;   // (D) tokens of each domain
  std::vector<std::int32_t> empty_domains;  // domains without tokens: their rows are 0, not a distribution
};

//   domains: (N) domain ids in [0, num_domains)
DomainDistribution domain_expert_distribution(const RoutingSample& sample, std::span<const std::int32_t> domains,
                                              Index num_domains);

// ---- Load and balance --------------------------------------------------------------------------

// With x_e = assignments of expert e and mean = N k / E:
//   max_over_mean = max_e x_e / mean               1 balanced, E when one expert takes all
//   cv            = std(x) / mean (population std)  0 balanced, sqrt(E - 1) when one takes all
//   jain          = (sum x)^2 / (E sum x^2)          1 balanced, 1 / E when one takes all (Jain et al. 1984)
//   entropy       = -sum p_e log p_e, p_e = x_e / (N k), nats: log E balanced, 0 when one takes all
struct LoadStats {
  std::vector<std::int64_t> counts;   // (E) x_e; they sum to N k
  std::vector<double> fraction;       // (E) p_e
  double max_over_mean = 0;
  double cv = 0;
  double jain = 0;
  double entropy = 0;                 // nats
  double normalised_entropy = 0;      // entropy / log E (1 when E = 1)
  std::vector<std::int32_t> dead;     // experts with x_e = 0
  double nearly_dead_ratio = 0;       // the threshold, as a multiple of the balanced load mean
  std::vector<std::int32_t> nearly_dead;  // experts with x_e < nearly_dead_ratio * mean (the dead included)
  // Mean over tokens of the entropy of the token's gates renormalised to sum 1, in nats (in
  // [0, log k]; a token whose gates are all 0 is left out). Only the k chosen experts' gates are
  // known here, so this is the spread of the mixture, not the entropy of the full score distribution.
  std::optional<double> mean_gate_entropy;  // empty when the sample has no gates
};

//   nearly_dead_ratio: in [0, 1]; 0.1 = "below a tenth of its fair share"
LoadStats load_stats(const RoutingSample& sample, double nearly_dead_ratio = 0.1);

// ---- Mutual information between a token label and the expert ----------------------------------

// I(label; expert) from the joint counts over assignments, with the plug-in estimator:
//   p(l, e) = n(l, e) / (N k),  I = sum over n(l, e) > 0 of p(l, e) log(p(l, e) / (p(l) p(e)))
// p(l) = tokens_l / N, since every token has k assignments. I is in [0, min(H(label), H(expert))].
// The plug-in estimate is biased upwards on small samples: for independent label and expert it is
// about (L - 1)(E - 1) / (2 n) nats, not 0 (Miller 1955; n between N and N k here, as a token's k
// assignments are not independent). mi_permutation_baseline measures that bias on the data itself.
struct MutualInformation {
  double nats = 0;
  double label_entropy = 0;   // H(label), nats
  double expert_entropy = 0;  // H(expert), nats (= LoadStats::entropy)
  double normalised = 0;      // nats / H(label): the share of the label's entropy the expert explains; 0 if H(label) = 0
};

//   labels: (N) in [0, num_labels); `name` is the field the errors name ("domains", "labels", ...)
MutualInformation mutual_information(const RoutingSample& sample, std::span<const std::int32_t> labels,
                                     Index num_labels, std::string_view name = "labels");

// The same I after shuffling the labels among the tokens (Fisher-Yates, the j-th draw uniform in
// [0, i] by rejection from Rng(seed)), `permutations` times: the MI that label-free routing of these
// tokens would show. A real specialisation stands well above it.
struct PermutationBaseline {
  int permutations = 0;
  std::uint64_t seed = 0;
  double mean = 0;     // mean shuffled I, nats
  double stddev = 0;   // standard deviation over the permutations (n - 1; 0 for one permutation)
  double max = 0;
  double p_value = 0;  // (1 + #{shuffled I >= observed I}) / (1 + permutations)
};

PermutationBaseline mi_permutation_baseline(const RoutingSample& sample, std::span<const std::int32_t> labels,
                                            Index num_labels, int permutations, std::uint64_t seed,
                                            std::string_view name = "labels");

// ---- Byte classes and vocabulary specialisation -------------------------------------------------

// Every byte value falls in exactly one class:
//   letter A-Z a-z; digit 0-9; whitespace space \t \n \v \f \r; punctuation the other printable ASCII
//   (0x21-0x7E); control 0x00-0x1F but whitespace, and 0x7F (0x1E, the document separator, is one);
//   utf8_continuation 0x80-0xBF; utf8_lead 0xC0-0xFF (the first byte of a multi-byte character,
//   or a byte that never occurs in UTF-8: 0xC0, 0xC1, 0xF5-0xFF).
enum class ByteClass : std::int32_t { letter, digit, whitespace, punctuation, control, utf8_continuation, utf8_lead };
inline constexpr Index kNumByteClasses = 7;
ByteClass byte_class(std::uint8_t byte);
std::string_view byte_class_name(ByteClass c);  // "letter", "digit", ..., "utf8_lead"
// The class of every byte, as labels for mutual_information: "does this layer route by byte class?"
//   bytes: (N) in [0, 256)
std::vector<std::int32_t> byte_class_labels(std::span<const std::int32_t> bytes);

enum class VocabCounting {
  top_k,         // an occurrence counts for each of its k experts (OLMoE): share in [k / E, 1]
  first_choice,  // only for its first-choice expert: share in [1 / E, 1]
};
std::string_view vocab_counting_name(VocabCounting counting);  // "top_k", "first_choice"

struct ByteSpecialisation {
  std::int32_t byte = 0;
  std::int64_t count = 0;       // occurrences
  std::int32_t top_expert = 0;  // the expert most of them go to (the lower id on a tie)
  double share = 0;             // occurrences routed to top_expert / count
};

struct ClassSpecialisation {
  ByteClass byte_class = ByteClass::letter;
  Index byte_values = 0;    // byte values of the class with at least min_count occurrences
  std::int64_t tokens = 0;  // their occurrences
  double mean = 0;          // their shares weighted by occurrences (0 when tokens = 0)
};

struct VocabularySpecialisation {
  VocabCounting counting = VocabCounting::top_k;
  std::int64_t min_count = 0;
  // Every expert's share under perfectly uniform routing (k / E or 1 / E). The maximum over experts
  // of a finite sample lies above it even for random routing: the bias of a max, like MI's.
  double uniform = 0;
  std::vector<ByteSpecialisation> bytes;     // byte values with at least min_count occurrences, ascending
  std::int64_t tokens = 0;                   // their occurrences
  double mean = 0;                           // share weighted by occurrences (0 when tokens = 0)
  std::vector<ClassSpecialisation> classes;  // (kNumByteClasses) in ByteClass order
};

//   bytes: (N) in [0, 256);  min_count >= 1: rarer byte values are left out (a share of 1 from one
//   occurrence says nothing)
VocabularySpecialisation vocabulary_specialisation(const RoutingSample& sample, std::span<const std::int32_t> bytes,
                                                   std::int64_t min_count,
                                                   VocabCounting counting = VocabCounting::top_k);

// ---- Co-activation -------------------------------------------------------------------------------

// OLMoE: of the tokens routed to expert i, the share also routed to expert j.
//   share(i, j) = tokens(i, j) / tokens(i, i)   (i != j; a row is 0 for an expert without tokens)
// Not symmetric. A row of a used expert sums to k - 1 (each of its tokens has k - 1 other experts);
// with k = 1 everything is 0. The diagonal would be 1 by the formula; it is 0 here.
struct ExpertPair {
  std::int32_t expert = 0;  // i
  std::int32_t other = 0;   // j
  std::int64_t tokens = 0;  // tokens routed to both
  double share = 0;         // share(i, j)
};

struct Coactivation {
  MatrixT<std::int64_t> tokens;    // (E, E) tokens routed to both i and j; diagonal: tokens routed to i
  MatrixD share;                   // (E, E)
  std::vector<ExpertPair> top_pairs;  // ordered pairs with share > 0, by descending share, then (i, j)
};

//   top_pairs >= 0: how many pairs to list
Coactivation coactivation(const RoutingSample& sample, Index top_pairs = 10);

// ---- Router saturation ---------------------------------------------------------------------------

// The same N tokens routed by two checkpoints a and b (OLMoE: an intermediate one and the final):
//   mean = 1/N sum_t |topk_a(t) ∩ topk_b(t)| / k
// 1 when every token gets the same experts (in any order), about k / E for unrelated routers.
struct Saturation {
  double mean = 0;
  double first_choice_agreement = 0;  // share of tokens with the same first choice
};

// a and b must have the same shape and E; errors name "a.ids" / "b.ids".
Saturation router_saturation(const RoutingSample& a, const RoutingSample& b);

// ---- One layer's report ---------------------------------------------------------------------------

// Labels of the N tokens of a sample. Either vector may be empty: that analysis is then left out.
struct TokenLabels {
  std::vector<std::int32_t> bytes;        // (N) token ids in [0, 256)
  std::vector<std::int32_t> domains;      // (N) domain ids in [0, D)
  std::vector<std::string> domain_names;  // (D) a domain id indexes this
};

struct AnalysisOptions {
  double nearly_dead_ratio = 0.1;     // load_stats
  std::int64_t min_byte_count = 20;   // vocabulary_specialisation
  VocabCounting vocab_counting = VocabCounting::top_k;
  Index top_pairs = 10;               // coactivation
  int permutations = 20;              // domain MI baseline; 0 = none
  std::uint64_t seed = 0;             // of the permutations
  void validate() const;              // throws Error naming the field
};

struct LayerReport {
  int layer = 0;  // the block's index in the model
  Index tokens = 0;
  Index top_k = 0;
  Index num_experts = 0;
  LoadStats load{};
  Coactivation coactivation{};
  std::vector<std::string> domain_names;                  // (D), empty without domains
  std::optional<DomainDistribution> domains;              // with domains
  std::optional<MutualInformation> domain_mi;             // with domains
  std::optional<PermutationBaseline> domain_mi_baseline;  // with domains and permutations > 0
  std::optional<MutualInformation> byte_class_mi;         // with bytes
  std::optional<VocabularySpecialisation> vocabulary;     // with bytes
  std::optional<Saturation> saturation;                   // with a reference sample
};

// Everything above for one layer. `reference`, if given, is the same tokens routed by another
// checkpoint (the final one, for OLMoE's saturation curve); errors about it name "reference.ids".
LayerReport analyze_layer(const RoutingSample& sample, const TokenLabels& labels, const AnalysisOptions& options = {},
                          int layer = 0, const RoutingSample* reference = nullptr);

// Every field, named as in the structs; matrices as lists of rows; absent parts null.
Json to_json(const LayerReport& report);

// One paragraph per layer for people: balance, dead experts, MI against its baseline, vocabulary
// specialisation, the top domain of every expert, the top co-activated pairs, saturation.
std::string summary_text(const LayerReport& report);
std::string summary_text(std::span<const LayerReport> reports);  // paragraphs separated by blank lines

}  // namespace moelab
