// moelab/python/bind_analysis.cpp — what the routers learned (reference/analysis.h, after OLMoE sec.
// 5; `moelab analyze`): load balance, domain and vocabulary specialisation, mutual information,
// co-activation and saturation, on a routing sample (ids (N, k), optional gates, E) or a whole model.
//
// Shapes: N = tokens, k = experts per token, E = experts, D = domains (labels).
#include <fmt/format.h>

#include "python/models.h"
#include "reference/analysis.h"

namespace moelab::python {
namespace {

RoutingSample sample_arg(py::handle ids, Index num_experts, py::handle gates, std::string_view name = "ids") {
  RoutingSample s;
  s.ids = index_matrix_arg(ids, name);
  if (!gates.is_none()) s.gates = matrix_arg<float>(gates, "gates", s.ids.rows(), s.ids.cols(), "ids' shape");
  s.num_experts = num_experts;
  return s;
}

VocabCounting counting_arg(const std::string& counting) {
  if (counting == "top_k") return VocabCounting::top_k;
  if (counting == "first_choice") return VocabCounting::first_choice;
  fail("counting", fmt::format("\"{}\"", counting), "must be \"top_k\" or \"first_choice\"");
}

py::dict load_dict(LoadStats&& l) {
  py::dict d;
  d["counts"] = give(std::move(l.counts));
  d["fraction"] = give(std::move(l.fraction));
  d["max_over_mean"] = l.max_over_mean;
  d["cv"] = l.cv;
  d["jain"] = l.jain;
  d["entropy"] = l.entropy;
  d["normalised_entropy"] = l.normalised_entropy;
  d["dead"] = l.dead;
  d["nearly_dead_ratio"] = l.nearly_dead_ratio;
  d["nearly_dead"] = l.nearly_dead;
  d["mean_gate_entropy"] = l.mean_gate_entropy ? py::object(py::float_(*l.mean_gate_entropy)) : py::object(py::none());
  return d;
}

py::dict domains_dict(DomainDistribution&& x) {
  py::dict d;
  d["assignments"] = give(std::move(x.assignments));
  d["fraction"] = give(std::move(x.fraction));
  d["token_share"] = give(std::move(x.token_share));
  d["tokens"] = give(std::move(x.tokens));
  d["empty_domains"] = x.empty_domains;
  return d;
}

py::dict mi_dict(const MutualInformation& m) {
  return py::dict("nats"_a = m.nats, "label_entropy"_a = m.label_entropy, "expert_entropy"_a = m.expert_entropy,
                  "normalised"_a = m.normalised);
}

py::dict baseline_dict(const PermutationBaseline& b) {
  return py::dict("permutations"_a = b.permutations, "seed"_a = b.seed, "mean"_a = b.mean, "stddev"_a = b.stddev,
                  "max"_a = b.max, "p_value"_a = b.p_value);
}

py::dict vocab_dict(const VocabularySpecialisation& v) {
  py::list bytes, classes;
  for (const ByteSpecialisation& b : v.bytes)
    bytes.append(py::dict("byte"_a = b.byte, "count"_a = b.count, "top_expert"_a = b.top_expert, "share"_a = b.share));
  for (const ClassSpecialisation& c : v.classes)
    classes.append(py::dict("byte_class"_a = std::string(byte_class_name(c.byte_class)), "byte_values"_a = c.byte_values,
                            "tokens"_a = c.tokens, "mean"_a = c.mean));
  return py::dict("counting"_a = std::string(vocab_counting_name(v.counting)), "min_count"_a = v.min_count,
                  "uniform"_a = v.uniform, "tokens"_a = v.tokens, "mean"_a = v.mean, "bytes"_a = bytes,
                  "classes"_a = classes);
}

py::dict coactivation_dict(Coactivation&& c) {
  py::list pairs;
  for (const ExpertPair& p : c.top_pairs)
    pairs.append(py::dict("expert"_a = p.expert, "other"_a = p.other, "tokens"_a = p.tokens, "share"_a = p.share));
  py::dict d;
  d["tokens"] = give(std::move(c.tokens));
  d["share"] = give(std::move(c.share));
  d["top_pairs"] = pairs;
  return d;
}

py::dict saturation_dict(const Saturation& s) {
  return py::dict("mean"_a = s.mean, "first_choice_agreement"_a = s.first_choice_agreement);
}

template <typename T, typename F>
py::object optional_dict(std::optional<T>& o, F f) {
  return o ? py::object(f(std::move(*o))) : py::object(py::none());
}

py::dict report_dict(LayerReport&& r) {
  const std::string summary = summary_text(r);
  py::dict d;
  d["layer"] = r.layer;
  d["tokens"] = r.tokens;
  d["top_k"] = r.top_k;
  d["num_experts"] = r.num_experts;
  d["load"] = load_dict(std::move(r.load));
  d["coactivation"] = coactivation_dict(std::move(r.coactivation));
  d["domain_names"] = r.domain_names;
  d["domains"] = optional_dict(r.domains, [](DomainDistribution&& x) { return domains_dict(std::move(x)); });
  d["domain_mi"] = optional_dict(r.domain_mi, [](MutualInformation&& x) { return mi_dict(x); });
  d["domain_mi_baseline"] = optional_dict(r.domain_mi_baseline, [](PermutationBaseline&& x) { return baseline_dict(x); });
  d["byte_class_mi"] = optional_dict(r.byte_class_mi, [](MutualInformation&& x) { return mi_dict(x); });
  d["vocabulary"] = optional_dict(r.vocabulary, [](VocabularySpecialisation&& x) { return vocab_dict(x); });
  d["saturation"] = optional_dict(r.saturation, [](Saturation&& x) { return saturation_dict(x); });
  d["summary"] = summary;
  return d;
}

AnalysisOptions options_arg(double nearly_dead_ratio, std::int64_t min_byte_count, const std::string& vocab_counting,
                            Index top_pairs, int permutations, std::uint64_t seed) {
  AnalysisOptions o{.nearly_dead_ratio = nearly_dead_ratio, .min_byte_count = min_byte_count,
                    .vocab_counting = counting_arg(vocab_counting), .top_pairs = top_pairs,
                    .permutations = permutations, .seed = seed};
  o.validate();
  return o;
}

std::vector<int> analysed_blocks(const ModelView& v, std::string_view name) {
  const std::vector<int> blocks = moe_blocks(v.eval_model);
  if (blocks.empty()) fail(name, "(a dense model)", "has no MoE block: nothing is routed");
  if (v.eval_model.moe.routing.expert_choice())
    fail(name, "(expert choice)",
         "routes by expert choice, which gives each token a varying number of experts; the analysis needs "
         "token-choice routing (k experts per token)");
  return blocks;
}

}  // namespace

void bind_analysis(py::module_& m) {
  m.def(
      "load_stats",
      [](py::handle ids, Index num_experts, py::object gates, double nearly_dead_ratio) {
        return load_dict(load_stats(sample_arg(ids, num_experts, gates), nearly_dead_ratio));
      },
      "ids"_a, "num_experts"_a, "gates"_a = py::none(), "nearly_dead_ratio"_a = 0.1,
      "Load balance of a routing sample (analysis.h): counts, fraction, max_over_mean, cv, jain, entropy, "
      "normalised_entropy, dead, nearly_dead, mean_gate_entropy.");
  m.def(
      "domain_expert_distribution",
      [](py::handle ids, Index num_experts, py::handle domains, Index num_domains) {
        const RoutingSample s = sample_arg(ids, num_experts, py::none());
        return domains_dict(domain_expert_distribution(s, ints_arg(domains, "domains", s.tokens(), "(N)"), num_domains));
      },
      "ids"_a, "num_experts"_a, "domains"_a, "num_domains"_a,
      "The OLMoE figure: assignments, fraction (rows sum to 1), token_share (D, E), tokens (D), empty_domains.");
  m.def(
      "mutual_information",
      [](py::handle ids, Index num_experts, py::handle labels, Index num_labels) {
        const RoutingSample s = sample_arg(ids, num_experts, py::none());
        return mi_dict(mutual_information(s, ints_arg(labels, "labels", s.tokens(), "(N)"), num_labels));
      },
      "ids"_a, "num_experts"_a, "labels"_a, "num_labels"_a,
      "I(label; expert) over the assignments, in nats (plug-in estimate): nats, label_entropy, expert_entropy, "
      "normalised.");
  m.def(
      "mi_permutation_baseline",
      [](py::handle ids, Index num_experts, py::handle labels, Index num_labels, int permutations, std::uint64_t seed) {
        const RoutingSample s = sample_arg(ids, num_experts, py::none());
        return baseline_dict(
            mi_permutation_baseline(s, ints_arg(labels, "labels", s.tokens(), "(N)"), num_labels, permutations, seed));
      },
      "ids"_a, "num_experts"_a, "labels"_a, "num_labels"_a, "permutations"_a = 20, "seed"_a = 0,
      "The MI after shuffling the labels: the plug-in estimator's bias on this data (mean, stddev, max, p_value).");
  m.def(
      "byte_class_labels", [](py::handle bytes) { return give(byte_class_labels(ints_arg(bytes, "bytes"))); }, "bytes"_a,
      "The class of every byte (letter, digit, whitespace, punctuation, control, utf8_continuation, utf8_lead) "
      "as int32 labels in [0, 7).");
  m.def(
      "byte_class_names",
      [] {
        std::vector<std::string> names;
        for (Index c = 0; c < kNumByteClasses; ++c) names.emplace_back(byte_class_name(static_cast<ByteClass>(c)));
        return names;
      },
      "The 7 byte class names, in label order.");
  m.def(
      "vocabulary_specialisation",
      [](py::handle ids, Index num_experts, py::handle bytes, std::int64_t min_count, const std::string& counting) {
        const RoutingSample s = sample_arg(ids, num_experts, py::none());
        return vocab_dict(
            vocabulary_specialisation(s, ints_arg(bytes, "bytes", s.tokens(), "(N)"), min_count, counting_arg(counting)));
      },
      "ids"_a, "num_experts"_a, "bytes"_a, "min_count"_a = 20, "counting"_a = "top_k",
      "OLMoE's vocabulary specialisation: per byte value its top expert and share, per byte class the mean.");
  m.def(
      "coactivation",
      [](py::handle ids, Index num_experts, Index top_pairs) {
        return coactivation_dict(coactivation(sample_arg(ids, num_experts, py::none()), top_pairs));
      },
      "ids"_a, "num_experts"_a, "top_pairs"_a = 10,
      "OLMoE co-activation: tokens (E, E) routed to both, share (E, E) (diagonal 0), top_pairs.");
  m.def(
      "router_saturation",
      [](py::handle ids_a, py::handle ids_b, Index num_experts) {
        return saturation_dict(router_saturation(sample_arg(ids_a, num_experts, py::none(), "ids_a"),
                                                 sample_arg(ids_b, num_experts, py::none(), "ids_b")));
      },
      "ids_a"_a, "ids_b"_a, "num_experts"_a,
      "Router saturation (OLMoE): mean share of a token's top-k kept between two checkpoints, first-choice agreement.");
  m.def(
      "analyze_layer",
      [](py::handle ids, Index num_experts, py::object gates, py::object bytes, py::object domains,
         py::object domain_names, py::object reference_ids, int layer, double nearly_dead_ratio,
         std::int64_t min_byte_count, const std::string& vocab_counting, Index top_pairs, int permutations,
         std::uint64_t seed) {
        const RoutingSample s = sample_arg(ids, num_experts, gates);
        TokenLabels labels;
        if (!bytes.is_none()) labels.bytes = ints_arg(bytes, "bytes", s.tokens(), "(N)");
        if (!domains.is_none()) {
          labels.domains = ints_arg(domains, "domains", s.tokens(), "(N)");
          require(!domain_names.is_none(), "domain_names", "None", "are required with domains (one name per domain id)");
        }
        if (!domain_names.is_none()) labels.domain_names = domain_names.cast<std::vector<std::string>>();
        std::optional<RoutingSample> ref;
        if (!reference_ids.is_none()) ref = sample_arg(reference_ids, num_experts, py::none(), "reference_ids");
        const AnalysisOptions o = options_arg(nearly_dead_ratio, min_byte_count, vocab_counting, top_pairs, permutations, seed);
        return report_dict(analyze_layer(s, labels, o, layer, ref ? &*ref : nullptr));
      },
      "ids"_a, "num_experts"_a, py::kw_only(), "gates"_a = py::none(), "bytes"_a = py::none(), "domains"_a = py::none(),
      "domain_names"_a = py::none(), "reference_ids"_a = py::none(), "layer"_a = 0, "nearly_dead_ratio"_a = 0.1,
      "min_byte_count"_a = 20, "vocab_counting"_a = "top_k", "top_pairs"_a = 10, "permutations"_a = 20, "seed"_a = 0,
      R"(Everything of analysis.h for one layer: load, coactivation, domains, domain_mi, domain_mi_baseline,
byte_class_mi, vocabulary, saturation (None where the labels were not given) and summary (text).)");
  m.def(
      "analyze_model",
      [](py::handle model, const std::string& corpus_dir, const std::string& split, py::object batches,
         py::object reference, py::object batch_size, py::object seq_len, double nearly_dead_ratio,
         std::int64_t min_byte_count, const std::string& vocab_counting, Index top_pairs, int permutations,
         std::uint64_t seed) {
        const ModelView v = model_view(model);
        const std::vector<int> blocks = analysed_blocks(v, "model");
        std::optional<ModelView> other;
        if (!reference.is_none()) {
          other = model_view(reference, "reference");
          const std::vector<int> other_blocks = analysed_blocks(*other, "reference");
          require(other_blocks == blocks && other->eval_model.moe.routing.top_k == v.eval_model.moe.routing.top_k &&
                      other->eval_model.moe.num_experts() == v.eval_model.moe.num_experts(),
                  "reference", "(a model)", "must have the same MoE blocks, top-k and experts as the model");
        }
        require(split == "val" || split == "train", "split", split, "must be val or train");
        const TrainConfig defaults;
        const TrainConfig& tc = v.config ? *v.config : defaults;
        const Index B = batch_size.is_none() ? tc.batch_size : batch_size.cast<Index>();
        const Index T = seq_len.is_none() ? tc.seq_len : seq_len.cast<Index>();
        const Index n = batches.is_none() ? (v.config ? tc.eval_batches : 1) : batches.cast<Index>();
        require(n >= 1 && n <= 10'000, "batches", n, "must be in [1, 10000]");
        const AnalysisOptions o = options_arg(nearly_dead_ratio, min_byte_count, vocab_counting, top_pairs, permutations, seed);
        const Corpus corpus = read_corpus(corpus_dir);
        const CorpusSampler sampler(corpus, split == "val" ? Split::val : Split::train, B, T,
                                    CorpusBatchSource::kValidationSeed);
        std::vector<Batch> bs;
        for (Index i = 0; i < n; ++i) bs.push_back(sampler.batch(i));
        const TokenLabels labels = batch_labels(bs, sampler.domain_names());
        std::vector<LayerReport> reports;
        {
          py::gil_scoped_release release;
          const std::vector<RoutingSample> samples = route_batches(v.eval_model, *v.params, bs, blocks);
          std::vector<RoutingSample> ref;
          if (other) ref = route_batches(other->eval_model, *other->params, bs, blocks);
          for (std::size_t j = 0; j < blocks.size(); ++j)
            reports.push_back(analyze_layer(samples[j], labels, o, blocks[j], other ? &ref[j] : nullptr));
        }
        py::list l;
        for (LayerReport& r : reports) l.append(report_dict(std::move(r)));
        return l;
      },
      "model"_a, "corpus_dir"_a = "data/corpus", "split"_a = "val", "batches"_a = py::none(),
      "reference"_a = py::none(), py::kw_only(), "batch_size"_a = py::none(), "seq_len"_a = py::none(),
      "nearly_dead_ratio"_a = 0.1, "min_byte_count"_a = 20, "vocab_counting"_a = "top_k", "top_pairs"_a = 10,
      "permutations"_a = 20, "seed"_a = 0,
      R"(`moelab analyze`: the model routes `batches` batches of the corpus split (the validation sampler's fixed
seed; B x T from its TrainConfig, or batch_size/seq_len), and every MoE block is analysed as analyze_layer
does. reference: another Model or Trainer (saturation). A list of analyze_layer dicts.)");
}

}  // namespace moelab::python
