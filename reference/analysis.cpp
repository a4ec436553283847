// moelab/reference/analysis.cpp — see analysis.h. Everything is counted in 64-bit integers first;
// ratios, logarithms and means are taken in double at the end, so that a hand-worked example
// (a balanced design, a perfect specialisation) gives its value exactly.
#include "reference/analysis.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <numeric>
#include <utility>

#include "reference/error.h"
#include "reference/random.h"
#include "reference/recorder.h"

namespace moelab {
namespace {

std::string prefixed(std::string_view name, std::string_view field) {
  return name.empty() ? std::string(field) : fmt::format("{}.{}", name, field);
}

// Labels must be one per token and in [0, num_labels). The message is built only on failure.
void check_labels(std::span<const std::int32_t> labels, Index tokens, Index num_labels, std::string_view name,
                  std::string_view meaning) {
  if (static_cast<Index>(labels.size()) != tokens)
    fail(fmt::format("{}.size()", name), labels.size(), fmt::format("must equal the tokens of ids, N = {}", tokens));
  for (std::size_t i = 0; i < labels.size(); ++i)
    if (labels[i] < 0 || labels[i] >= num_labels)
      fail(fmt::format("{}[{}]", name, i), labels[i], fmt::format("must be in [0, {}) ({})", num_labels, meaning));
}

// -sum p log p over counts / total (terms with count 0 are 0).
double entropy_of(std::span<const std::int64_t> counts, std::int64_t total) {
  double h = 0;
  for (std::int64_t c : counts) {
    if (c == 0) continue;
    const double p = static_cast<double>(c) / static_cast<double>(total);
    h -= p * std::log(p);
  }
  return h;
}

std::vector<std::int64_t> expert_counts(const RoutingSample& sample) {
  std::vector<std::int64_t> counts(static_cast<std::size_t>(sample.num_experts), 0);
  for (Index i = 0; i < sample.ids.size(); ++i) ++counts[static_cast<std::size_t>(sample.ids.data()[i])];
  return counts;
}

// MI from validated inputs (the permutation baseline calls it many times).
MutualInformation mi_of(const RoutingSample& sample, std::span<const std::int32_t> labels, Index num_labels) {
  const Index n = sample.tokens(), k = sample.top_k(), num_experts = sample.num_experts;
  MatrixT<std::int64_t> joint = MatrixT<std::int64_t>::Zero(num_labels, num_experts);
  std::vector<std::int64_t> label_tokens(static_cast<std::size_t>(num_labels), 0);
  for (Index t = 0; t < n; ++t) {
    const std::int32_t l = labels[static_cast<std::size_t>(t)];
    ++label_tokens[static_cast<std::size_t>(l)];
    for (Index j = 0; j < k; ++j) ++joint(l, sample.ids(t, j));
  }
  const std::vector<std::int64_t> load = expert_counts(sample);
  const double total = static_cast<double>(n * k);
  MutualInformation mi;
  // p(l, e) / (p(l) p(e)) = n(l, e) N k / (k tokens_l * n(e)): both products are exact integers in
  // double up to 2^53, so an independent cell gives a ratio of exactly 1 and adds exactly 0.
  for (Index l = 0; l < num_labels; ++l) {
    for (Index e = 0; e < num_experts; ++e) {
      const std::int64_t c = joint(l, e);
      if (c == 0) continue;
      const double ratio = (static_cast<double>(c) * total) /
                           (static_cast<double>(k * label_tokens[static_cast<std::size_t>(l)]) *
                            static_cast<double>(load[static_cast<std::size_t>(e)]));
      mi.nats += static_cast<double>(c) / total * std::log(ratio);
    }
  }
  mi.nats = std::max(mi.nats, 0.0);  // rounding can leave -1e-17 where the exact value is 0
  mi.label_entropy = entropy_of(label_tokens, n);
  mi.expert_entropy = entropy_of(load, n * k);
  mi.normalised = mi.label_entropy > 0 ? mi.nats / mi.label_entropy : 0.0;
  return mi;
}

// Uniform in [0, n), n >= 1, without modulo bias: 2^64 mod n values at the bottom are rejected, so
// the accepted range holds a whole number of copies of [0, n).
std::uint64_t uniform_index(Rng& rng, std::uint64_t n) {
  const std::uint64_t reject_below = (0 - n) % n;  // 2^64 mod n
  for (;;) {
    const std::uint64_t x = rng.next_u64();
    if (x >= reject_below) return x % n;
  }
}

}  // namespace

void RoutingSample::validate(std::string_view name) const {
  const std::string ids_name = prefixed(name, "ids");
  require(num_experts >= 1, prefixed(name, "num_experts"), num_experts, "must be at least 1");
  require(ids.rows() >= 1, ids_name, shape_of(ids), "must hold at least one token (N >= 1)");
  require(ids.cols() >= 1, ids_name, shape_of(ids), "k = 0: every token needs at least one expert");
  require(ids.cols() <= num_experts, ids_name, shape_of(ids),
          fmt::format("k = {} must not exceed num_experts = {}", ids.cols(), num_experts));
  for (Index t = 0; t < ids.rows(); ++t) {
    for (Index j = 0; j < ids.cols(); ++j) {
      const std::int32_t e = ids(t, j);
      if (e < 0 || e >= num_experts)
        fail(fmt::format("{}({}, {})", ids_name, t, j), e, fmt::format("must be in [0, num_experts = {})", num_experts));
      for (Index i = 0; i < j; ++i)
        if (ids(t, i) == e)
          fail(fmt::format("{}({}, {})", ids_name, t, j), e,
               fmt::format("repeats {}({}, {}); a token's experts must be distinct", ids_name, t, i));
    }
  }
  if (gates.size() == 0) return;
  if (gates.rows() != ids.rows() || gates.cols() != ids.cols())
    fail(prefixed(name, "gates"), shape_of(gates), fmt::format("must be empty or the shape of ids, {}", shape_of(ids)));
  for (Index t = 0; t < gates.rows(); ++t)
    for (Index j = 0; j < gates.cols(); ++j)
      if (!std::isfinite(gates(t, j)) || gates(t, j) < 0)
        fail(fmt::format("{}({}, {})", prefixed(name, "gates"), t, j), gates(t, j), "must be finite and >= 0");
}

// ---- Domain x expert distribution ----------------------------------------------------------------

DomainDistribution domain_expert_distribution(const RoutingSample& sample, std::span<const std::int32_t> domains,
                                              Index num_domains) {
  sample.validate();
  require(num_domains >= 1, "num_domains", num_domains, "must be at least 1");
  check_labels(domains, sample.tokens(), num_domains, "domains", "a domain id indexes the D domains");
  const Index k = sample.top_k();
  DomainDistribution out;
  out.assignments = MatrixT<std::int64_t>::Zero(num_domains, sample.num_experts);
  out.tokens.assign(static_cast<std::size_t>(num_domains), 0);
  for (Index t = 0; t < sample.tokens(); ++t) {
    const std::int32_t d = domains[static_cast<std::size_t>(t)];
    ++out.tokens[static_cast<std::size_t>(d)];
    for (Index j = 0; j < k; ++j) ++out.assignments(d, sample.ids(t, j));
  }
  out.fraction = MatrixD::Zero(num_domains, sample.num_experts);
  out.token_share = MatrixD::Zero(num_domains, sample.num_experts);
  for (Index d = 0; d < num_domains; ++d) {
    const std::int64_t tokens = out.tokens[static_cast<std::size_t>(d)];
    if (tokens == 0) {
      out.empty_domains.push_back(static_cast<std::int32_t>(d));
      continue;
    }
    for (Index e = 0; e < sample.num_experts; ++e) {
      const double n = static_cast<double>(out.assignments(d, e));
      out.fraction(d, e) = n / static_cast<double>(k * tokens);
      out.token_share(d, e) = n / static_cast<double>(tokens);
    }
  }
  return out;
}

// ---- Load and balance ----------------------------------------------------------------------------

LoadStats load_stats(const RoutingSample& sample, double nearly_dead_ratio) {
  sample.validate();
  require(nearly_dead_ratio >= 0 && nearly_dead_ratio <= 1, "nearly_dead_ratio", nearly_dead_ratio,
          "must be in [0, 1] (a multiple of the balanced load)");
  const Index num_experts = sample.num_experts;
  const std::int64_t total = sample.tokens() * sample.top_k();
  const double mean = static_cast<double>(total) / static_cast<double>(num_experts);
  LoadStats s;
  s.counts = expert_counts(sample);
  s.nearly_dead_ratio = nearly_dead_ratio;
  double sum_sq = 0, sum_dev_sq = 0;
  std::int64_t max_count = 0;
  for (Index e = 0; e < num_experts; ++e) {
    const std::int64_t c = s.counts[static_cast<std::size_t>(e)];
    const double x = static_cast<double>(c);
    s.fraction.push_back(x / static_cast<double>(total));
    sum_sq += x * x;
    sum_dev_sq += (x - mean) * (x - mean);
    max_count = std::max(max_count, c);
    if (c == 0) s.dead.push_back(static_cast<std::int32_t>(e));
    if (x < nearly_dead_ratio * mean) s.nearly_dead.push_back(static_cast<std::int32_t>(e));
  }
  const double e_count = static_cast<double>(num_experts);
  s.max_over_mean = static_cast<double>(max_count) / mean;
  s.cv = std::sqrt(sum_dev_sq / e_count) / mean;
  s.jain = static_cast<double>(total) * static_cast<double>(total) / (e_count * sum_sq);  // Jain et al. 1984, eq. 1
  s.entropy = entropy_of(s.counts, total);
  s.normalised_entropy = num_experts == 1 ? 1.0 : s.entropy / std::log(e_count);

  if (sample.gates.size() != 0) {
    double sum_h = 0;
    Index counted = 0;
    for (Index t = 0; t < sample.gates.rows(); ++t) {
      double z = 0;
      for (Index j = 0; j < sample.gates.cols(); ++j) z += static_cast<double>(sample.gates(t, j));
      if (z <= 0) continue;
      double h = 0;
      for (Index j = 0; j < sample.gates.cols(); ++j) {
        const double p = static_cast<double>(sample.gates(t, j)) / z;
        if (p > 0) h -= p * std::log(p);
      }
      sum_h += h;
      ++counted;
    }
    s.mean_gate_entropy = counted == 0 ? 0.0 : sum_h / static_cast<double>(counted);
  }
  return s;
}

// ---- Mutual information --------------------------------------------------------------------------

MutualInformation mutual_information(const RoutingSample& sample, std::span<const std::int32_t> labels,
                                     Index num_labels, std::string_view name) {
  sample.validate();
  require(num_labels >= 1, "num_labels", num_labels, "must be at least 1");
  check_labels(labels, sample.tokens(), num_labels, name, "a label indexes the label values");
  return mi_of(sample, labels, num_labels);
}

PermutationBaseline mi_permutation_baseline(const RoutingSample& sample, std::span<const std::int32_t> labels,
                                            Index num_labels, int permutations, std::uint64_t seed,
                                            std::string_view name) {
  const double observed = mutual_information(sample, labels, num_labels, name).nats;
  require(permutations >= 1, "permutations", permutations, "must be at least 1");
  PermutationBaseline b;
  b.permutations = permutations;
  b.seed = seed;
  Rng rng(seed);
  std::vector<std::int32_t> shuffled(labels.begin(), labels.end());
  std::vector<double> values;
  int at_least_observed = 0;
  for (int r = 0; r < permutations; ++r) {
    for (std::size_t i = shuffled.size() - 1; i > 0; --i)  // Fisher-Yates (Knuth vol. 2, 3.4.2 P)
      std::swap(shuffled[i], shuffled[uniform_index(rng, i + 1)]);
    values.push_back(mi_of(sample, shuffled, num_labels).nats);
    if (values.back() >= observed) ++at_least_observed;
  }
  const double count = static_cast<double>(permutations);
  b.mean = std::accumulate(values.begin(), values.end(), 0.0) / count;
  double dev_sq = 0;
  for (double v : values) dev_sq += (v - b.mean) * (v - b.mean);
  b.stddev = permutations > 1 ? std::sqrt(dev_sq / (count - 1)) : 0.0;
  b.max = *std::max_element(values.begin(), values.end());
  b.p_value = (1.0 + at_least_observed) / (1.0 + count);
  return b;
}

// ---- Byte classes and vocabulary specialisation ---------------------------------------------------

ByteClass byte_class(std::uint8_t byte) {
  if ((byte >= 'A' && byte <= 'Z') || (byte >= 'a' && byte <= 'z')) return ByteClass::letter;
  if (byte >= '0' && byte <= '9') return ByteClass::digit;
  if (byte == ' ' || (byte >= '\t' && byte <= '\r')) return ByteClass::whitespace;  // \t \n \v \f \r
  if (byte >= 0x21 && byte <= 0x7E) return ByteClass::punctuation;
  if (byte < 0x80) return ByteClass::control;
  if (byte < 0xC0) return ByteClass::utf8_continuation;  // 10xxxxxx
  return ByteClass::utf8_lead;
}

std::string_view byte_class_name(ByteClass c) {
  switch (c) {
    case ByteClass::letter: return "letter";
    case ByteClass::digit: return "digit";
    case ByteClass::whitespace: return "whitespace";
    case ByteClass::punctuation: return "punctuation";
    case ByteClass::control: return "control";
    case ByteClass::utf8_continuation: return "utf8_continuation";
    case ByteClass::utf8_lead: return "utf8_lead";
  }
  return "?";
}

std::vector<std::int32_t> byte_class_labels(std::span<const std::int32_t> bytes) {
  std::vector<std::int32_t> labels;
  labels.reserve(bytes.size());
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    if (bytes[i] < 0 || bytes[i] > 255) fail(fmt::format("bytes[{}]", i), bytes[i], "must be in [0, 256) (a byte)");
    labels.push_back(static_cast<std::int32_t>(byte_class(static_cast<std::uint8_t>(bytes[i]))));
  }
  return labels;
}

std::string_view vocab_counting_name(VocabCounting counting) {
  switch (counting) {
    case VocabCounting::top_k: return "top_k";
    case VocabCounting::first_choice: return "first_choice";
  }
  return "?";
}

VocabularySpecialisation vocabulary_specialisation(const RoutingSample& sample, std::span<const std::int32_t> bytes,
                                                   std::int64_t min_count, VocabCounting counting) {
  sample.validate();
  check_labels(bytes, sample.tokens(), 256, "bytes", "a byte");
  require(min_count >= 1, "min_byte_count", min_count, "must be at least 1");
  const Index num_experts = sample.num_experts;
  const Index columns = counting == VocabCounting::top_k ? sample.top_k() : 1;
  MatrixT<std::int64_t> routed = MatrixT<std::int64_t>::Zero(256, num_experts);  // (256, E)
  std::vector<std::int64_t> occurrences(256, 0);
  for (Index t = 0; t < sample.tokens(); ++t) {
    const std::int32_t b = bytes[static_cast<std::size_t>(t)];
    ++occurrences[static_cast<std::size_t>(b)];
    for (Index j = 0; j < columns; ++j) ++routed(b, sample.ids(t, j));
  }
  VocabularySpecialisation v;
  v.counting = counting;
  v.min_count = min_count;
  v.uniform = static_cast<double>(columns) / static_cast<double>(num_experts);
  std::vector<std::int64_t> top_routed(kNumByteClasses, 0);  // sum of the top experts' counts per class
  for (std::size_t i = 0; i < kNumByteClasses; ++i) v.classes.push_back({.byte_class = static_cast<ByteClass>(i)});
  std::int64_t all_top_routed = 0;
  for (std::int32_t b = 0; b < 256; ++b) {
    const std::int64_t count = occurrences[static_cast<std::size_t>(b)];
    if (count < min_count) continue;
    Index top = 0;
    for (Index e = 1; e < num_experts; ++e)
      if (routed(b, e) > routed(b, top)) top = e;  // strict: a tie keeps the lower id
    const std::int64_t n = routed(b, top);
    v.bytes.push_back({.byte = b, .count = count, .top_expert = static_cast<std::int32_t>(top),
                       .share = static_cast<double>(n) / static_cast<double>(count)});
    v.tokens += count;
    all_top_routed += n;
    const auto c = static_cast<std::size_t>(byte_class(static_cast<std::uint8_t>(b)));
    ++v.classes[c].byte_values;
    v.classes[c].tokens += count;
    top_routed[c] += n;
  }
  // Weighted by occurrences, sum_b count_b (n_b / count_b) / sum_b count_b = sum_b n_b / sum_b count_b.
  if (v.tokens > 0) v.mean = static_cast<double>(all_top_routed) / static_cast<double>(v.tokens);
  for (std::size_t c = 0; c < kNumByteClasses; ++c)
    if (v.classes[c].tokens > 0)
      v.classes[c].mean = static_cast<double>(top_routed[c]) / static_cast<double>(v.classes[c].tokens);
  return v;
}

// ---- Co-activation -------------------------------------------------------------------------------

Coactivation coactivation(const RoutingSample& sample, Index top_pairs) {
  sample.validate();
  require(top_pairs >= 0, "top_pairs", top_pairs, "must not be negative");
  const Index num_experts = sample.num_experts, k = sample.top_k();
  Coactivation c;
  c.tokens = MatrixT<std::int64_t>::Zero(num_experts, num_experts);
  for (Index t = 0; t < sample.tokens(); ++t)
    for (Index i = 0; i < k; ++i)
      for (Index j = 0; j < k; ++j) ++c.tokens(sample.ids(t, i), sample.ids(t, j));  // i = j: the diagonal
  c.share = MatrixD::Zero(num_experts, num_experts);
  std::vector<ExpertPair> pairs;
  for (Index i = 0; i < num_experts; ++i) {
    if (c.tokens(i, i) == 0) continue;
    for (Index j = 0; j < num_experts; ++j) {
      if (j == i || c.tokens(i, j) == 0) continue;
      c.share(i, j) = static_cast<double>(c.tokens(i, j)) / static_cast<double>(c.tokens(i, i));
      pairs.push_back({.expert = static_cast<std::int32_t>(i), .other = static_cast<std::int32_t>(j),
                       .tokens = c.tokens(i, j), .share = c.share(i, j)});
    }
  }
  // pairs is in (i, j) order already, so a stable sort by share breaks ties by (i, j).
  std::stable_sort(pairs.begin(), pairs.end(), [](const ExpertPair& a, const ExpertPair& b) { return a.share > b.share; });
  if (static_cast<Index>(pairs.size()) > top_pairs) pairs.resize(static_cast<std::size_t>(top_pairs));
  c.top_pairs = std::move(pairs);
  return c;
}

// ---- Router saturation ---------------------------------------------------------------------------

Saturation router_saturation(const RoutingSample& a, const RoutingSample& b) {
  a.validate("a");
  b.validate("b");
  require(b.num_experts == a.num_experts, "b.num_experts", b.num_experts,
          fmt::format("must equal a.num_experts = {} (the same layer of two checkpoints)", a.num_experts));
  if (b.ids.rows() != a.ids.rows() || b.ids.cols() != a.ids.cols())
    fail("b.ids", shape_of(b.ids), fmt::format("must be the shape of a.ids, {} (the same tokens, the same k)", shape_of(a.ids)));
  const Index n = a.tokens(), k = a.top_k();
  std::int64_t overlap = 0, same_first = 0;
  for (Index t = 0; t < n; ++t) {
    for (Index i = 0; i < k; ++i)
      for (Index j = 0; j < k; ++j) overlap += a.ids(t, i) == b.ids(t, j) ? 1 : 0;  // ids are distinct per row
    same_first += a.ids(t, 0) == b.ids(t, 0) ? 1 : 0;
  }
  return {.mean = static_cast<double>(overlap) / static_cast<double>(n * k),
          .first_choice_agreement = static_cast<double>(same_first) / static_cast<double>(n)};
}

// ---- One layer's report ----------------------------------------------------------------------------

void AnalysisOptions::validate() const {
  require(nearly_dead_ratio >= 0 && nearly_dead_ratio <= 1, "nearly_dead_ratio", nearly_dead_ratio,
          "must be in [0, 1] (a multiple of the balanced load)");
  require(min_byte_count >= 1, "min_byte_count", min_byte_count, "must be at least 1");
  require(top_pairs >= 0, "top_pairs", top_pairs, "must not be negative");
  require(permutations >= 0, "permutations", permutations, "must not be negative (0 = no baseline)");
}

LayerReport analyze_layer(const RoutingSample& sample, const TokenLabels& labels, const AnalysisOptions& options,
                          int layer, const RoutingSample* reference) {
  options.validate();
  sample.validate();
  LayerReport r;
  r.layer = layer;
  r.tokens = sample.tokens();
  r.top_k = sample.top_k();
  r.num_experts = sample.num_experts;
  r.load = load_stats(sample, options.nearly_dead_ratio);
  r.coactivation = coactivation(sample, options.top_pairs);
  if (!labels.domains.empty()) {
    const auto num_domains = static_cast<Index>(labels.domain_names.size());
    require(num_domains >= 1, "domain_names.size()", num_domains, "must name the domains that domains refers to");
    check_labels(labels.domains, r.tokens, num_domains, "domains", "a domain id indexes domain_names");
    r.domain_names = labels.domain_names;
    r.domains = domain_expert_distribution(sample, labels.domains, num_domains);
    r.domain_mi = mutual_information(sample, labels.domains, num_domains, "domains");
    if (options.permutations > 0)
      r.domain_mi_baseline =
          mi_permutation_baseline(sample, labels.domains, num_domains, options.permutations, options.seed, "domains");
  }
  if (!labels.bytes.empty()) {
    r.vocabulary = vocabulary_specialisation(sample, labels.bytes, options.min_byte_count, options.vocab_counting);
    r.byte_class_mi = mutual_information(sample, byte_class_labels(labels.bytes), kNumByteClasses, "byte classes");
  }
  if (reference != nullptr) {
    reference->validate("reference");
    require(reference->num_experts == sample.num_experts, "reference.num_experts", reference->num_experts,
            fmt::format("must equal num_experts = {} (the same layer of another checkpoint)", sample.num_experts));
    if (reference->ids.rows() != sample.ids.rows() || reference->ids.cols() != sample.ids.cols())
      fail("reference.ids", shape_of(reference->ids),
           fmt::format("must be the shape of ids, {} (the same tokens, the same k)", shape_of(sample.ids)));
    r.saturation = router_saturation(sample, *reference);
  }
  return r;
}

// ---- JSON and text -----------------------------------------------------------------------------------

namespace {

Json numbers(const std::vector<double>& values) {
  Json list = Json::array();
  for (double v : values) list.push_back(json_number(v));
  return list;
}

Json to_json(const MutualInformation& mi) {
  return {{"nats", json_number(mi.nats)},
          {"label_entropy", json_number(mi.label_entropy)},
          {"expert_entropy", json_number(mi.expert_entropy)},
          {"normalised", json_number(mi.normalised)}};
}

// The domain that sends the largest share of its tokens to expert e (lower id on a tie), or -1
// when no domain sends it any.
std::int32_t top_domain(const DomainDistribution& d, Index e) {
  std::int32_t top = -1;
  for (Index i = 0; i < d.token_share.rows(); ++i)
    if (d.token_share(i, e) > 0 && (top < 0 || d.token_share(i, e) > d.token_share(top, e)))
      top = static_cast<std::int32_t>(i);
  return top;
}

std::string id_list(const std::vector<std::int32_t>& ids) {
  if (ids.empty()) return "none";
  std::string s;
  for (std::int32_t e : ids) s += fmt::format("{}e{}", s.empty() ? "" : " ", e);
  return s;
}

}  // namespace

Json to_json(const LayerReport& r) {
  Json j = Json::object();
  j["layer"] = r.layer;
  j["tokens"] = r.tokens;
  j["top_k"] = r.top_k;
  j["num_experts"] = r.num_experts;
  const LoadStats& l = r.load;
  j["load"] = {{"counts", l.counts},
               {"fraction", numbers(l.fraction)},
               {"max_over_mean", json_number(l.max_over_mean)},
               {"cv", json_number(l.cv)},
               {"jain", json_number(l.jain)},
               {"entropy", json_number(l.entropy)},
               {"normalised_entropy", json_number(l.normalised_entropy)},
               {"dead", l.dead},
               {"nearly_dead_ratio", json_number(l.nearly_dead_ratio)},
               {"nearly_dead", l.nearly_dead},
               {"mean_gate_entropy", l.mean_gate_entropy ? json_number(*l.mean_gate_entropy) : Json(nullptr)}};
  j["domain_names"] = r.domain_names;
  if (r.domains) {
    const DomainDistribution& d = *r.domains;
    std::vector<std::int32_t> tops;
    for (Index e = 0; e < d.token_share.cols(); ++e) tops.push_back(top_domain(d, e));
    j["domains"] = {{"tokens", d.tokens},
                    {"empty_domains", d.empty_domains},
                    {"assignments", json_rows(d.assignments)},
                    {"fraction", json_rows(d.fraction)},
                    {"token_share", json_rows(d.token_share)},
                    {"top_domain_per_expert", tops}};
  } else {
    j["domains"] = nullptr;
  }
  j["domain_mi"] = r.domain_mi ? to_json(*r.domain_mi) : Json(nullptr);
  if (r.domain_mi_baseline) {
    const PermutationBaseline& b = *r.domain_mi_baseline;
    j["domain_mi_baseline"] = {{"permutations", b.permutations}, {"seed", b.seed},
                               {"mean", json_number(b.mean)},   {"stddev", json_number(b.stddev)},
                               {"max", json_number(b.max)},     {"p_value", json_number(b.p_value)}};
  } else {
    j["domain_mi_baseline"] = nullptr;
  }
  j["byte_class_mi"] = r.byte_class_mi ? to_json(*r.byte_class_mi) : Json(nullptr);
  if (r.vocabulary) {
    const VocabularySpecialisation& v = *r.vocabulary;
    Json bytes = Json::array();
    for (const ByteSpecialisation& b : v.bytes)
      bytes.push_back({{"byte", b.byte}, {"count", b.count}, {"top_expert", b.top_expert}, {"share", json_number(b.share)}});
    Json classes = Json::array();
    for (const ClassSpecialisation& c : v.classes)
      classes.push_back({{"byte_class", byte_class_name(c.byte_class)},
                         {"byte_values", c.byte_values},
                         {"tokens", c.tokens},
                         {"mean", json_number(c.mean)}});
    j["vocabulary"] = {{"counting", vocab_counting_name(v.counting)},
                       {"min_count", v.min_count},
                       {"uniform", json_number(v.uniform)},
                       {"tokens", v.tokens},
                       {"mean", json_number(v.mean)},
                       {"classes", std::move(classes)},
                       {"bytes", std::move(bytes)}};
  } else {
    j["vocabulary"] = nullptr;
  }
  Json pairs = Json::array();
  for (const ExpertPair& p : r.coactivation.top_pairs)
    pairs.push_back({{"expert", p.expert}, {"other", p.other}, {"tokens", p.tokens}, {"share", json_number(p.share)}});
  j["coactivation"] = {{"tokens", json_rows(r.coactivation.tokens)},
                       {"share", json_rows(r.coactivation.share)},
                       {"top_pairs", std::move(pairs)}};
  if (r.saturation) {
    j["saturation"] = {{"mean", json_number(r.saturation->mean)},
                       {"first_choice_agreement", json_number(r.saturation->first_choice_agreement)}};
  } else {
    j["saturation"] = nullptr;
  }
  return j;
}

std::string summary_text(const LayerReport& r) {
  std::string s;
  auto out = std::back_inserter(s);
  const LoadStats& l = r.load;
  fmt::format_to(out, "Layer {}: {} tokens, top-{} of {} experts. ", r.layer, r.tokens, r.top_k, r.num_experts);
  fmt::format_to(out, "Load: max/mean {:.2f}, CV {:.2f}, Jain {:.3f}, entropy {:.3f} nats ({:.3f} of log E); ",
                 l.max_over_mean, l.cv, l.jain, l.entropy, l.normalised_entropy);
  fmt::format_to(out, "dead experts: {}; below {:g} of the balanced load: {}", id_list(l.dead), l.nearly_dead_ratio,
                 id_list(l.nearly_dead));
  if (l.mean_gate_entropy)
    fmt::format_to(out, "; mean gate entropy {:.3f} nats (max log k = {:.3f})", *l.mean_gate_entropy,
                   std::log(static_cast<double>(r.top_k)));
  s += ".";
  if (r.domain_mi) {
    fmt::format_to(out, " I(domain; expert) = {:.4f} nats, {:.3f} of H(domain)", r.domain_mi->nats,
                   r.domain_mi->normalised);
    if (r.domain_mi_baseline)
      fmt::format_to(out, " (shuffled domains: {:.4f} ± {:.4f}, p = {:.3f})", r.domain_mi_baseline->mean,
                     r.domain_mi_baseline->stddev, r.domain_mi_baseline->p_value);
    s += ".";
  }
  if (r.byte_class_mi)
    fmt::format_to(out, " I(byte class; expert) = {:.4f} nats, {:.3f} of H(byte class).", r.byte_class_mi->nats,
                   r.byte_class_mi->normalised);
  if (r.vocabulary) {
    const VocabularySpecialisation& v = *r.vocabulary;
    if (v.tokens == 0) {
      fmt::format_to(out, " Vocabulary specialisation: no byte occurs at least {} times.", v.min_count);
    } else {
      fmt::format_to(out, " Vocabulary specialisation ({}) {:.3f} (uniform {:.3f}) over {} byte values seen at least {} times; by class:",
                     vocab_counting_name(v.counting), v.mean, v.uniform, v.bytes.size(), v.min_count);
      for (const ClassSpecialisation& c : v.classes)
        if (c.tokens > 0) fmt::format_to(out, " {} {:.3f}", byte_class_name(c.byte_class), c.mean);
      s += ".";
    }
  }
  if (r.domains) {
    fmt::format_to(out, " Top domain per expert (the share of that domain's tokens it gets; uniform {:.0f}%):",
                   100.0 * static_cast<double>(r.top_k) / static_cast<double>(r.num_experts));
    for (Index e = 0; e < r.num_experts; ++e) {
      const std::int32_t d = top_domain(*r.domains, e);
      if (d < 0)
        fmt::format_to(out, " e{} -", e);
      else
        fmt::format_to(out, " e{} {} {:.0f}%", e, r.domain_names[static_cast<std::size_t>(d)],
                       100.0 * r.domains->token_share(d, e));
      s += e + 1 < r.num_experts ? "," : ".";
    }
    if (!r.domains->empty_domains.empty()) {
      s += " Domains without tokens:";
      for (std::int32_t d : r.domains->empty_domains) fmt::format_to(out, " {}", r.domain_names[static_cast<std::size_t>(d)]);
      s += ".";
    }
  }
  if (!r.coactivation.top_pairs.empty()) {
    s += " Most co-activated:";
    for (const ExpertPair& p : r.coactivation.top_pairs)
      fmt::format_to(out, " e{}->e{} {:.2f}", p.expert, p.other, p.share);
    s += ".";
  }
  if (r.saturation)
    fmt::format_to(out, " Router saturation against the reference: {:.3f} (first choice {:.3f}).", r.saturation->mean,
                   r.saturation->first_choice_agreement);
  return s;
}

std::string summary_text(std::span<const LayerReport> reports) {
  std::string s;
  for (const LayerReport& r : reports) {
    if (!s.empty()) s += "\n\n";
    s += summary_text(r);
  }
  return s;
}

}  // namespace moelab
