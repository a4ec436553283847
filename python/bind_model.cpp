// moelab/python/bind_model.cpp — the tiny language model (reference/model.h), its training
// (train.h), checkpoints, the corpus (corpus.h), text through a model (`moelab route --checkpoint`)
// and one traced bit flip (sdc.h, `moelab sdc --trace`).
//
// Shapes: B = sequences, T = sequence length, N = B*T tokens, V = vocabulary, E = experts,
//         k = experts per token, D = domains.
#include <fmt/format.h>

#include <cmath>
#include <limits>

#include "python/models.h"
#include "reference/sdc.h"

namespace moelab::python {

ModelConfig without_noise(ModelConfig config) {
  config.moe.routing.router.noise = RouterNoise::none;
  return config;
}

std::vector<int> moe_blocks(const ModelConfig& config) {
  std::vector<int> blocks;
  for (Index i = 0; i < config.n_layers; ++i)
    if (config.is_moe(i)) blocks.push_back(static_cast<int>(i));
  return blocks;
}

ModelView model_view(py::handle model, std::string_view name) {
  ModelView v;
  if (py::isinstance<PyModel>(model)) {
    const PyModel& m = model.cast<const PyModel&>();
    v.eval_model = m.eval_model;
    v.params = &m.params;
    v.config = m.config;
  } else if (py::isinstance<PyTrainer>(model)) {
    const Trainer& t = *model.cast<const PyTrainer&>().trainer;
    v.eval_model = without_noise(t.model_config());
    v.params = &t.params();
    v.config = t.config();
  } else {
    fail_arg(name, model, "must be a moelab.Model or a moelab.Trainer");
  }
  return v;
}

namespace {

inline constexpr Index kMaxSeqLen = 4096;  // attention is (T, T) per head: a page of text, not a book

py::dict params_dict(const ModelParams& params, const ModelConfig& config) {
  py::dict d;
  auto put = [&](const auto& tensors) {
    for (const auto& t : tensors)
      d[py::str(t.name)] = t.matrix != nullptr ? copy_out(*t.matrix) : copy_out(*t.vector);
  };
  put(model_parameters(params, config));
  put(model_buffers(params, config));
  return d;
}

py::dict step_dict(StepMetrics&& m) {
  py::dict d;
  d["step"] = m.step;
  d["lr"] = m.lr;
  d["loss"] = m.loss;
  d["aux"] = m.aux;
  d["z"] = m.z;
  d["grad_norm"] = m.grad_norm;
  d["seconds"] = m.seconds;
  d["tokens_per_second"] = m.tokens_per_second;
  d["load_imbalance"] = m.load_imbalance;
  d["dropped_fraction"] = m.dropped_fraction;
  d["logit_rms"] = m.logit_rms;
  d["logit_max_abs"] = m.logit_max_abs;
  d["moe_layers"] = m.moe_layers;
  const auto blocks = static_cast<py::ssize_t>(m.load.size());
  const py::ssize_t E = blocks > 0 ? static_cast<py::ssize_t>(m.load[0].size()) : 0;
  std::vector<std::int64_t> load;
  for (const std::vector<std::int64_t>& l : m.load) load.insert(load.end(), l.begin(), l.end());
  d["load"] = give(std::move(load), blocks, E);
  return d;
}

py::dict eval_dict(EvalMetrics&& m, const std::vector<std::string>& domain_names) {
  py::dict d;
  d["step"] = m.step;
  d["loss"] = m.loss;
  d["tokens"] = m.tokens;
  d["domain_loss"] = give(std::move(m.domain_loss));
  d["domain_tokens"] = give(std::move(m.domain_tokens));
  d["domain_names"] = domain_names;
  d["moe_layers"] = m.moe_layers;
  py::list routing;
  for (MatrixD& r : m.routing) routing.append(give(std::move(r)));
  d["routing"] = routing;
  d["specialisation"] = m.specialisation;
  d["byte_specialisation"] = m.byte_specialisation;
  return d;
}

py::dict corpus_dict(const Corpus& c) {
  py::list domains;
  for (const DomainStats& s : c.domains)
    domains.append(py::dict("name"_a = s.name, "package"_a = s.package, "sources"_a = s.sources, "rule"_a = s.rule,
                            "source_files"_a = s.source_files, "available_bytes"_a = s.available_bytes,
                            "skipped_invalid"_a = s.skipped_invalid, "capped"_a = s.capped,
                            "documents"_a = std::vector<std::int64_t>(s.documents.begin(), s.documents.end()),
                            "bytes"_a = std::vector<std::int64_t>(s.bytes.begin(), s.bytes.end())));
  return py::dict("domains"_a = domains, "fallback"_a = c.fallback, "missing"_a = c.missing, "notes"_a = c.notes);
}

// The TrainConfig of Trainer(train_config, **overrides): the dict (or the defaults of
// overrides["model"] / ["model_name"]), with the overrides applied key by key (a dict value merged
// into its sub-dict; model="deepseek_v3" as that model's ModelConfig), then read strictly.
TrainConfig train_config_arg(py::handle train_config, const py::kwargs& overrides) {
  Json j;
  if (!train_config.is_none()) {
    if (!py::isinstance<py::dict>(train_config)) fail_arg("train_config", train_config, "must be a TrainConfig dict or None");
    j = json_arg(train_config, "train");
  } else {
    std::string name = "tiny_moe";
    if (overrides.contains("model_name")) name = py::str(overrides["model_name"]).cast<std::string>();
    if (overrides.contains("model") && py::isinstance<py::str>(overrides["model"]))
      name = overrides["model"].cast<std::string>();
    j = to_json(default_train_config(name));
  }
  for (const auto& [key, value] : overrides) {
    const std::string k = key.cast<std::string>();
    if (k == "model" && py::isinstance<py::str>(value)) {
      j["model"] = to_json(model_config(value.cast<std::string>()));
      if (!overrides.contains("model_name")) j["model_name"] = value.cast<std::string>();
      continue;
    }
    Json v = json_arg(value, k);
    if (v.is_object() && j.contains(k) && j[k].is_object()) {
      for (const auto& [sub, sv] : v.items()) j[k][sub] = sv;
    } else {
      j[k] = std::move(v);
    }
  }
  return train_config_from_json(j, "train");
}

// tokens as a (B, T) batch: a str (its UTF-8 bytes), bytes, or a 1-d / 2-d integer array.
std::vector<std::int32_t> tokens_arg(py::handle tokens, Index& B, Index& T) {
  std::vector<std::int32_t> ids;
  if (py::isinstance<py::str>(tokens) || py::isinstance<py::bytes>(tokens)) {
    const std::string s = py::isinstance<py::str>(tokens) ? tokens.cast<std::string>()
                                                          : std::string(tokens.cast<py::bytes>());
    for (char c : s) ids.push_back(static_cast<std::uint8_t>(c));
    B = 1;
    T = static_cast<Index>(ids.size());
  } else {
    const py::array a = array_arg(tokens, "tokens", Kind::integer);
    if (a.ndim() == 1) {
      ids = ints_arg(a, "tokens");
      B = 1;
      T = static_cast<Index>(ids.size());
    } else if (a.ndim() == 2) {
      const IndexMatrix m = index_matrix_arg(a, "tokens");
      B = m.rows();
      T = m.cols();
      ids.assign(m.data(), m.data() + m.size());
    } else {
      fail("tokens", fmt::format("({} dimensions)", a.ndim()), "must be a str, bytes, or a 1-d or 2-d integer array");
    }
  }
  require(B >= 1 && T >= 1, "tokens", fmt::format("({}, {})", B, T), "must hold at least one token");
  require(T <= kMaxSeqLen, "tokens", fmt::format("({} per sequence)", T),
          fmt::format("must be at most {} per sequence (attention is T x T)", kMaxSeqLen));
  return ids;
}

// The router dtype override of forward/route_text/analyze: every block's router in that format.
ModelConfig with_dtype(ModelConfig config, py::handle dtype) {
  if (dtype.is_none()) return config;
  const std::string d = dtype.cast<std::string>();
  config.moe.routing.router.dtype = parse_format(d, "dtype");
  try {
    config.validate();
  } catch (const Error& e) {
    fail("dtype", d, e.what());
  }
  return config;
}

struct Forward {
  ModelConfig config;
  std::vector<std::int32_t> ids;
  Index B = 0, T = 0;
  ModelOutput out;
};

// The results of a forward, moved out of f.out.
py::dict forward_dict(Forward& f) {
  py::dict d;
  const Index V = f.config.vocab_size;
  // Mean next-token cross-entropy over the positions that have a next token in their sequence.
  double ce = 0;
  Index counted = 0;
  for (Index b = 0; b < f.B; ++b)
    for (Index t = 0; t + 1 < f.T; ++t) {
      const Index n = b * f.T + t;
      const auto row = f.out.logits.row(n);
      const double mx = static_cast<double>(row.maxCoeff());
      double sum = 0;
      for (Index v = 0; v < V; ++v) sum += std::exp(static_cast<double>(row(v)) - mx);
      ce += mx + std::log(sum) - static_cast<double>(row(f.ids[static_cast<std::size_t>(n + 1)]));
      ++counted;
    }
  d["tokens"] = give(std::vector<std::int32_t>(f.ids), f.B, f.T);
  d["loss"] = counted > 0 ? ce / static_cast<double>(counted) : std::numeric_limits<double>::quiet_NaN();
  d["aux_loss"] = static_cast<double>(f.out.aux_loss);
  d["z_loss"] = static_cast<double>(f.out.z_loss);
  py::list blocks;
  for (int b : moe_blocks(f.config)) {
    LayerOutput& l = f.out.blocks[static_cast<std::size_t>(b)].moe;
    py::dict bd;
    bd["layer"] = b;
    bd["ids"] = give(std::move(l.routing.ids));
    bd["gates"] = give(std::move(l.routing.gates));
    bd["logits"] = give(std::move(l.routing.logits));
    bd["scores"] = give(std::move(l.routing.scores));
    bd["keep"] = give(std::move(l.keep));
    bd["load"] = give(std::move(l.routing.load));
    blocks.append(bd);
  }
  d["blocks"] = blocks;
  d["logits"] = give(std::move(f.out.logits));
  return d;
}

void run_forward(Forward& f, const ModelView& v, py::handle tokens, py::handle dtype, Observer* observer) {
  f.ids = tokens_arg(tokens, f.B, f.T);
  f.config = with_dtype(v.eval_model, dtype);
  model_forward(f.out, f.ids, f.B, f.T, *v.params, f.config, nullptr, observer);
}

py::dict forward(py::handle model, py::handle tokens, py::handle dtype, bool record) {
  const ModelView v = model_view(model);
  Events events(record, py::none());
  Forward f;
  run_forward(f, v, tokens, dtype, events.observer());
  py::dict d = forward_dict(f);
  events.put(d);
  return d;
}

py::dict fault_dict(const Fault& f) {
  return py::dict("site"_a = std::string(fault_site_name(f.site)), "dtype"_a = std::string(format_name(f.format)),
                  "bit"_a = f.bit, "flip"_a = f.flip, "layer"_a = f.layer, "token"_a = f.token, "slot"_a = f.slot,
                  "expert"_a = f.expert, "matrix"_a = std::string(expert_matrix_name(f.matrix)), "row"_a = f.row,
                  "col"_a = f.col);
}

}  // namespace

void bind_model(py::module_& m) {
  // ---- corpus ---------------------------------------------------------------------------------------
  m.def(
      "read_corpus", [](const std::string& dir) { return corpus_dict(read_corpus(dir)); }, "dir"_a = "data/corpus",
      "A written corpus (corpus.h), checked: domains (name, package, sources, rule, documents [train, val], bytes "
      "[train, val], ...), fallback, missing, notes.");
  m.def(
      "build_corpus",
      [](const std::string& out, const std::string& root, std::int64_t max_domain_bytes, std::int64_t max_document_bytes,
         int val_percent, std::uint64_t seed) {
        CorpusOptions o;
        o.root = root;
        o.max_domain_bytes = max_domain_bytes;
        o.max_document_bytes = max_document_bytes;
        o.val_percent = val_percent;
        o.seed = seed;
        o.moelab_version = MOELAB_VERSION;
        {
          py::gil_scoped_release release;
          write_corpus(build_corpus(o), out);
        }
        return corpus_dict(read_corpus(out));
      },
      "out"_a, "root"_a = "/", py::kw_only(), "max_domain_bytes"_a = std::int64_t{1} << 20,
      "max_document_bytes"_a = 8192, "val_percent"_a = 10, "seed"_a = 0,
      "Builds the corpus from the system under `root` and writes it to `out` (moelab corpus); an empty folder as "
      "root gives the generated domains only. Returns read_corpus(out).");

  // ---- Model --------------------------------------------------------------------------------------------
  py::class_<PyModel>(m, "Model", "A model to run: load_checkpoint(dir), init_model(config, seed) or Trainer.model().")
      .def_property_readonly(
          "config", [](const PyModel& s) -> py::object { return s.config ? from_json(to_json(*s.config)) : py::none(); },
          "The TrainConfig dict it was trained with (None for init_model).")
      .def_property_readonly(
          "model_config", [](const PyModel& s) { return from_json(to_json(s.model)); }, "The ModelConfig dict as trained.")
      .def_property_readonly(
          "eval_model_config", [](const PyModel& s) { return from_json(to_json(s.eval_model)); },
          "The ModelConfig dict that runs: without router noise.")
      .def_property_readonly(
          "path", [](const PyModel& s) -> py::object { return s.path ? py::object(py::str(s.path->string())) : py::object(py::none()); },
          "The checkpoint folder (None if not loaded from one).")
      .def_readonly("step", &PyModel::step, "Steps trained.")
      .def_property_readonly("moe_layers", [](const PyModel& s) { return moe_blocks(s.model); }, "The MoE blocks.")
      .def(
          "params", [](const PyModel& s) { return params_dict(s.params, s.model); },
          "Every parameter and buffer by Hugging Face name, float32 copies.")
      .def(
          "forward",
          [](py::object self, py::handle tokens, py::object dtype, bool record) {
            return forward(self, tokens, dtype, record);
          },
          "tokens"_a, "dtype"_a = py::none(), "record"_a = false, "As moelab.forward(model, ...).")
      .def("__repr__", [](const PyModel& s) {
        return fmt::format("<moelab.Model {}, step {}{}>", s.config ? s.config->model_name : std::string("(initialised)"),
                           s.step, s.path ? ", " + s.path->string() : std::string());
      });

  m.def(
      "load_checkpoint",
      [](const std::string& dir) {
        CheckpointModel c = load_checkpoint_model(dir);
        auto p = std::make_unique<PyModel>();
        p->path = c.path;
        p->config = c.config;
        p->model = c.model;
        p->eval_model = c.eval_model;
        p->params = std::move(c.params);
        p->step = c.step;
        return p;
      },
      "dir"_a,
      "A checkpoint's model (train.h load_checkpoint_model): a checkpoint folder, or a run folder (its latest); "
      "every file checked.");
  m.def(
      "init_model",
      [](py::handle config, std::uint64_t seed) {
        auto p = std::make_unique<PyModel>();
        p->model = py::isinstance<py::str>(config) ? model_config(config.cast<std::string>())
                                                   : model_config_from_json(json_arg(config, "config"));
        p->eval_model = without_noise(p->model);
        Rng rng(stream_seed(seed, kInitStream, 0));  // what training with this seed starts from
        p->params = init_model<float>(p->model, rng);
        return p;
      },
      "config"_a = "tiny_moe", "seed"_a = 0,
      "An initialised model (a model_config name or a ModelConfig dict), as training with `seed` starts from it.");

  // ---- Trainer ------------------------------------------------------------------------------------------
  py::class_<PyTrainer>(m, "Trainer", R"(Trains the tiny language model (train.h) on a corpus.
Trainer(train_config=None, corpus_dir="data/corpus", *, threads=0, recorder=None, **overrides).)")
      .def(py::init([](py::object train_config, const std::string& corpus_dir, int threads, py::object recorder,
                       py::kwargs overrides) {
             TrainConfig config = train_config_arg(train_config, overrides);
             auto t = std::make_unique<PyTrainer>();
             t->corpus = read_corpus(corpus_dir);
             t->data = std::make_unique<CorpusBatchSource>(t->corpus, config.batch_size, config.seq_len, config.seed);
             t->recorder = recorder;
             TrainerOptions options{.threads = threads, .events = recorder_arg(recorder), .moelab_version = MOELAB_VERSION};
             t->trainer = std::make_unique<Trainer>(std::move(config), *t->data, options);
             return t;
           }),
           "train_config"_a = py::none(), "corpus_dir"_a = "data/corpus", py::kw_only(), "threads"_a = 0,
           "recorder"_a = py::none())
      .def(
          "step",
          [](PyTrainer& t) {
            StepMetrics s;
            {
              py::gil_scoped_release release;
              s = t.trainer->step();
            }
            return step_dict(std::move(s));
          },
          "One training step: its metrics (StepMetrics), load as a (MoE blocks, E) int64 array.")
      .def(
          "train",
          [](PyTrainer& t, std::int64_t steps) {
            py::list l;
            for (std::int64_t i = 0; i < steps && !t.trainer->done(); ++i) {
              StepMetrics s;
              {
                py::gil_scoped_release release;
                s = t.trainer->step();
              }
              l.append(step_dict(std::move(s)));
            }
            return l;
          },
          "steps"_a, "`steps` steps (fewer if the configured steps are done): a list of step() dicts.")
      .def(
          "evaluate",
          [](const PyTrainer& t) {
            EvalMetrics e;
            {
              py::gil_scoped_release release;
              e = t.trainer->evaluate();
            }
            return eval_dict(std::move(e), t.data->domain_names());
          },
          "Validation loss per domain and routing per domain and expert (EvalMetrics).")
      .def(
          "unigram_baseline",
          [](const PyTrainer& t) {
            const Index V = t.trainer->model_config().vocab_size;
            return unigram_baseline(*t.data, t.data->train_unigram(V), t.trainer->config().eval_batches);
          },
          "Nats per byte of the unigram model on the validation bytes evaluate() measures.")
      .def_property_readonly("steps_done", [](const PyTrainer& t) { return t.trainer->steps_done(); })
      .def_property_readonly("done", [](const PyTrainer& t) { return t.trainer->done(); })
      .def_property_readonly("seconds_trained", [](const PyTrainer& t) { return t.trainer->seconds_trained(); })
      .def_property_readonly(
          "config", [](const PyTrainer& t) { return from_json(to_json(t.trainer->config())); }, "The TrainConfig dict.")
      .def_property_readonly(
          "model_config", [](const PyTrainer& t) { return from_json(to_json(t.trainer->model_config())); },
          "The ModelConfig dict as trained.")
      .def_property_readonly("domain_names", [](const PyTrainer& t) { return t.data->domain_names(); })
      .def(
          "params", [](const PyTrainer& t) { return params_dict(t.trainer->params(), t.trainer->model_config()); },
          "Every parameter and buffer by Hugging Face name, float32 copies.")
      .def(
          "save", [](const PyTrainer& t, const std::string& dir) { t.trainer->save(dir); }, "dir"_a,
          "Writes a checkpoint folder (train.h).")
      .def(
          "load", [](PyTrainer& t, const std::string& dir) { t.trainer->load(dir); }, "dir"_a,
          "Resumes from a checkpoint folder of the same configuration (bit-identical continuation).")
      .def(
          "model",
          [](const PyTrainer& t) {
            auto p = std::make_unique<PyModel>();
            p->config = t.trainer->config();
            p->model = t.trainer->model_config();
            p->eval_model = without_noise(p->model);
            p->params = t.trainer->params();
            p->step = t.trainer->steps_done();
            return p;
          },
          "A Model holding a copy of the current parameters.")
      .def("__repr__", [](const PyTrainer& t) {
        return fmt::format("<moelab.Trainer {}, step {} of {}>", t.trainer->config().model_name,
                           t.trainer->steps_done(), t.trainer->config().steps);
      });

  // ---- running a model ------------------------------------------------------------------------------------
  m.def("forward", &forward, "model"_a, "tokens"_a, "dtype"_a = py::none(), "record"_a = false,
        R"(The model on tokens (a str, bytes, a 1-d or (B, T) int array): tokens (B, T), logits (B*T, V), loss (mean
next-byte cross-entropy within each sequence), aux_loss, z_loss, blocks (per MoE block: layer, ids, gates,
logits, scores, keep, load), events when record=True. dtype: every router in that format. model: a Model or
a Trainer.)");
  m.def(
      "route_text",
      [](py::handle model, py::handle text, py::object dtype) {
        const ModelView v = model_view(model);
        if (!py::isinstance<py::str>(text) && !py::isinstance<py::bytes>(text)) fail_arg("text", text, "must be a str or bytes");
        require(!moe_blocks(v.eval_model).empty(), "model", "(dense)", "has no MoE block: nothing is routed");
        Forward f;
        run_forward(f, v, text, dtype, nullptr);
        py::dict r = forward_dict(f);
        const RoutingConfig& rc = f.config.moe.routing;
        py::dict d;
        d["bytes"] = give(std::vector<std::int32_t>(f.ids));
        d["moe_layers"] = moe_blocks(f.config);
        d["selection"] = rc.expert_choice() ? "expert_choice" : "token_choice";
        d["top_k"] = rc.expert_choice() ? py::object(py::none()) : py::object(py::int_(rc.top_k));
        d["num_experts"] = rc.num_experts();
        d["dtype"] = std::string(format_name(rc.router.dtype));
        d["blocks"] = r["blocks"];
        return d;
      },
      "model"_a, "text"_a, "dtype"_a = py::none(),
      "`moelab route --checkpoint DIR --text TEXT`: each byte's experts and gates in every MoE block.");

  // ---- silent data corruption -------------------------------------------------------------------------------
  m.def(
      "fault_sites",
      [] {
        std::vector<std::string> names;
        for (FaultSite s : kAllFaultSites) names.emplace_back(fault_site_name(s));
        return names;
      },
      "The fault sites of sdc.h.");
  m.def(
      "trace_fault",
      [](py::handle model, py::handle text, const std::string& site, const std::string& dtype, int bit,
         py::object layer, Index token, Index slot, Index col, Index expert, const std::string& matrix, Index row,
         bool flip) {
        const ModelView v = model_view(model);
        require_sdc_model(v.eval_model, "model");
        if (!py::isinstance<py::str>(text) && !py::isinstance<py::bytes>(text)) fail_arg("text", text, "must be a str or bytes");
        Batch batch;
        batch.batch_size = 1;
        batch.inputs = tokens_arg(text, batch.batch_size, batch.seq_len);
        batch.targets.assign(batch.inputs.begin() + 1, batch.inputs.end());
        batch.targets.push_back(0x1E);  // the document separator follows the text
        Fault f;
        f.site = parse_fault_site(site, "site");
        f.format = parse_format(dtype, "dtype");
        f.bit = bit;
        f.flip = flip;
        const std::vector<int> blocks = moe_blocks(v.eval_model);
        f.layer = layer.is_none() ? blocks.front() : layer.cast<Index>();
        f.token = token;
        f.slot = slot;
        f.col = col;
        f.expert = expert;
        f.matrix = parse_expert_matrix(matrix, "matrix");
        f.row = row;
        f.validate(v.eval_model, batch.seq_len);
        RoutingTrace t = trace_fault(v.eval_model, *v.params, batch, f);
        const FaultRecord& r = t.record;
        py::dict d;
        d["fault"] = fault_dict(t.fault);
        d["record"] = py::dict("applied"_a = r.applied, "expert"_a = r.expert, "value"_a = r.value,
                               "stored"_a = r.stored, "faulted"_a = r.faulted, "stored_bits"_a = r.stored_bits,
                               "faulted_bits"_a = r.faulted_bits);
        d["refused"] = t.refused;
        d["refusal"] = t.refusal;
        d["moe_layers"] = t.moe_layers;
        py::list ib, ia, gb, ga;
        for (IndexMatrix& i : t.ids_before) ib.append(give(std::move(i)));
        for (IndexMatrix& i : t.ids_after) ia.append(give(std::move(i)));
        for (Matrix& g : t.gates_before) gb.append(give(std::move(g)));
        for (Matrix& g : t.gates_after) ga.append(give(std::move(g)));
        d["ids_before"] = ib;
        d["ids_after"] = ia;
        d["gates_before"] = gb;
        d["gates_after"] = ga;
        const TrialMetrics& mt = t.metrics;
        d["metrics"] = py::dict("nonfinite"_a = mt.nonfinite, "selections_changed"_a = mt.selections_changed,
                                "own_selection_changed"_a = mt.own_selection_changed,
                                "layer_rel_error"_a = mt.layer_rel_error, "logit_rel_error"_a = mt.logit_rel_error,
                                "loss_delta"_a = mt.loss_delta);
        return d;
      },
      "model"_a, "text"_a, "site"_a, "dtype"_a = "fp32", "bit"_a = 0, py::kw_only(), "layer"_a = py::none(),
      "token"_a = 0, "slot"_a = 0, "col"_a = 0, "expert"_a = 0, "matrix"_a = "w_up", "row"_a = 0, "flip"_a = true,
      R"(One bit flipped at `site` (sdc.h trace_fault, `moelab sdc --trace`) while the text's bytes go through the
model: fault, record, refused, refusal, moe_layers, ids/gates before and after per MoE block, metrics.)");
}

}  // namespace moelab::python
