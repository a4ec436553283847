// moelab/python/bind_layer.cpp — after routing: capacity (reference/capacity.h), dispatch
// (dispatch.h), the experts (experts.h), combine and the whole MoE layer (layer.h), forward and
// backward. Parameters are dicts named as the golden files name them, without "param."
// (python/API.md, "The MoE layer").
//
// Shapes: T = tokens, C = hidden size, E = experts, k = experts per token, H = expert width,
//         N = kept pairs (expert-major rows).
#include <fmt/format.h>

#include <set>

#include "python/bind.h"
#include "reference/capacity.h"
#include "reference/dispatch.h"
#include "reference/experts.h"
#include "reference/layer.h"

namespace moelab::python {
namespace {

template <typename F>
auto by_precision(const std::string& precision, F&& f) {
  return is_double(precision) ? f(double{}) : f(float{});
}

// ---- parameter dicts ---------------------------------------------------------------------------

// Reads tensors out of a params dict by name, remembering which names were used, so that a name
// the configuration has no tensor for (a typo, an expert too many) is an Error.
class ParamReader {
 public:
  ParamReader(py::handle params, std::string_view what) {
    if (!py::isinstance<py::dict>(params)) fail_arg("params", params, fmt::format("must be a dict ({})", what));
    dict_ = params.cast<py::dict>();
  }
  bool has(const std::string& name) const { return dict_.contains(py::str(name)); }
  template <typename S>
  MatrixT<S> matrix(const std::string& name, Index rows, Index cols, std::string_view what) {
    return matrix_arg<S>(get(name), fmt::format("params['{}']", name), rows, cols, what);
  }
  template <typename S>
  VectorT<S> vector(const std::string& name, Index n, std::string_view what) {
    return vector_arg<S>(get(name), fmt::format("params['{}']", name), n, what);
  }
  // Throws for a name that was never read.
  void finish() const {
    for (const auto& [key, value] : dict_) {
      const std::string k = py::str(key).cast<std::string>();
      if (!used_.contains(k))
        fail(fmt::format("params['{}']", k), "(given)", "is not a parameter of this configuration (see API.md, "
                                                        "\"The MoE layer\", for the names)");
    }
  }

 private:
  py::handle get(const std::string& name) {
    if (!has(name)) fail(fmt::format("params['{}']", name), "(missing)", "is required by the configuration");
    used_.insert(name);
    return dict_[py::str(name)];
  }
  py::dict dict_;
  std::set<std::string> used_;
};

// prefix "" (an expert alone) or "experts.3." / "shared.0.".
template <typename S>
ExpertParamsT<S> expert_params_from(ParamReader& r, const std::string& prefix, const ExpertConfig& c) {
  const Index C = c.hidden_size, H = c.intermediate_size;
  ExpertParamsT<S> p;
  if (is_gated(c.activation)) p.w_gate = r.matrix<S>(prefix + "w_gate", H, C, "(intermediate_size, hidden_size)");
  p.w_up = r.matrix<S>(prefix + "w_up", H, C, "(intermediate_size, hidden_size)");
  p.w_down = r.matrix<S>(prefix + "w_down", C, H, "(hidden_size, intermediate_size)");
  if (c.use_bias) {
    if (is_gated(c.activation)) p.b_gate = r.vector<S>(prefix + "b_gate", H, "(intermediate_size)");
    p.b_up = r.vector<S>(prefix + "b_up", H, "(intermediate_size)");
    p.b_down = r.vector<S>(prefix + "b_down", C, "(hidden_size)");
  }
  return p;
}

// Puts every non-empty tensor of an expert (parameters or gradients) under prefix + name.
template <typename S>
void put_expert(py::dict& d, const std::string& prefix, ExpertParamsT<S>&& p) {
  auto put_m = [&](const char* name, MatrixT<S>& m) {
    if (m.size() > 0) d[py::str(prefix + name)] = give(std::move(m));
  };
  auto put_v = [&](const char* name, VectorT<S>& v) {
    if (v.size() > 0) d[py::str(prefix + name)] = give(std::move(v));
  };
  put_m("w_gate", p.w_gate);
  put_m("w_up", p.w_up);
  put_m("w_down", p.w_down);
  put_v("b_gate", p.b_gate);
  put_v("b_up", p.b_up);
  put_v("b_down", p.b_down);
}

template <typename S>
LayerParamsT<S> layer_params_from(py::handle params, const LayerConfig& c) {
  ParamReader r(params, "layer parameters by name, as init_layer() returns them");
  const Index E = c.num_experts(), C = c.hidden_size();
  LayerParamsT<S> p;
  p.routing.router.weight = r.matrix<S>("router.weight", E, C, "(num_experts, hidden_size)");
  if (c.routing.router.use_bias) p.routing.router.bias = r.vector<S>("router.bias", E, "(num_experts)");
  if (c.routing.router.noise == RouterNoise::noisy_topk) {
    p.routing.router.noise_weight = r.has("router.noise_weight")
                                        ? r.matrix<S>("router.noise_weight", E, C, "(num_experts, hidden_size)")
                                        : MatrixT<S>::Zero(E, C);
  }
  if (c.routing.use_selection_bias)
    p.routing.selection_bias =
        r.has("selection_bias") ? r.vector<S>("selection_bias", E, "(num_experts)") : VectorT<S>::Zero(E);
  for (Index e = 0; e < E; ++e) p.experts.push_back(expert_params_from<S>(r, fmt::format("experts.{}.", e), c.expert));
  const ExpertConfig sc = c.shared_expert_config();
  for (int s = 0; s < c.shared.count; ++s) p.shared.push_back(expert_params_from<S>(r, fmt::format("shared.{}.", s), sc));
  if (c.shared.count > 0 && c.shared.gated) p.shared_gate = r.matrix<S>("shared_gate", 1, C, "(1, hidden_size)");
  r.finish();
  return p;
}

template <typename S>
py::dict layer_params_dict(LayerParamsT<S>&& p) {
  py::dict d;
  d["router.weight"] = give(std::move(p.routing.router.weight));
  if (p.routing.router.bias.size() > 0) d["router.bias"] = give(std::move(p.routing.router.bias));
  if (p.routing.router.noise_weight.size() > 0) d["router.noise_weight"] = give(std::move(p.routing.router.noise_weight));
  if (p.routing.selection_bias.size() > 0) d["selection_bias"] = give(std::move(p.routing.selection_bias));
  for (std::size_t e = 0; e < p.experts.size(); ++e) put_expert(d, fmt::format("experts.{}.", e), std::move(p.experts[e]));
  for (std::size_t s = 0; s < p.shared.size(); ++s) put_expert(d, fmt::format("shared.{}.", s), std::move(p.shared[s]));
  if (p.shared_gate.size() > 0) d["shared_gate"] = give(std::move(p.shared_gate));
  return d;
}

template <typename S>
ExpertParamsT<S> expert_params_arg(py::handle params, const ExpertConfig& c) {
  ParamReader r(params, "expert parameters w_gate, w_up, w_down (b_gate, b_up, b_down)");
  ExpertParamsT<S> p = expert_params_from<S>(r, "", c);
  r.finish();
  return p;
}

// ---- capacity and dispatch --------------------------------------------------------------------------

// A capacity dict (or a LayerConfig's "capacity"), missing keys from the defaults with dropless
// false, then the keyword fields.
CapacityConfig capacity_arg(py::handle config, const py::kwargs& fields) {
  Json j = to_json(CapacityConfig{.dropless = false});
  if (!config.is_none()) {
    if (!py::isinstance<py::dict>(config)) fail_arg("config", config, "must be a capacity dict or a LayerConfig dict");
    Json given = json_arg(config, "capacity");
    if (given.contains("routing") && given.contains("capacity")) given = given["capacity"];
    for (const auto& [key, value] : given.items()) j[key] = value;
  }
  for (const auto& [key, value] : fields) {
    const std::string k = key.cast<std::string>();
    j[k] = json_arg(value, k);
  }
  return capacity_config_from_json(j, "capacity");
}

py::dict plan_dict(Dispatch&& plan) {
  py::dict d;
  d["num_rows"] = plan.num_rows();
  d["counts"] = give(std::move(plan.counts));
  d["offsets"] = give(std::move(plan.offsets));
  d["row_token"] = give(std::move(plan.row_token));
  d["row_slot"] = give(std::move(plan.row_slot));
  d["pair_row"] = give(std::move(plan.pair_row));
  return d;
}

// A plan dict read back and checked, so that a hand-edited plan cannot index out of bounds.
Dispatch plan_arg(py::handle plan) {
  if (!py::isinstance<py::dict>(plan)) fail_arg("plan", plan, "must be the dict dispatch_plan() returned");
  const py::dict d = plan.cast<py::dict>();
  auto item = [&](const char* key) -> py::handle {
    if (!d.contains(key)) fail(fmt::format("plan['{}']", key), "(missing)", "is required (see dispatch_plan())");
    return d[key];
  };
  Dispatch p;
  p.counts = int64s_arg(item("counts"), "plan['counts']");
  p.num_experts = static_cast<Index>(p.counts.size());
  p.offsets = int64s_arg(item("offsets"), "plan['offsets']", p.num_experts + 1, "(num_experts + 1)");
  p.row_token = ints_arg(item("row_token"), "plan['row_token']");
  const Index N = static_cast<Index>(p.row_token.size());
  p.row_slot = ints_arg(item("row_slot"), "plan['row_slot']", N, "(num_rows)");
  p.pair_row = index_matrix_arg(item("pair_row"), "plan['pair_row']");
  const Index T = p.pair_row.rows(), k = p.pair_row.cols();
  require(p.num_experts >= 1, "plan['counts']", "(empty)", "must have one count per expert");
  require(p.offsets[0] == 0 && p.offsets[static_cast<std::size_t>(p.num_experts)] == N, "plan['offsets']",
          fmt::format("[{}, ..., {}]", p.offsets[0], p.offsets.back()), fmt::format("must run from 0 to num_rows = {}", N));
  for (Index e = 0; e < p.num_experts; ++e) {
    const auto i = static_cast<std::size_t>(e);
    require(p.offsets[i + 1] - p.offsets[i] == p.counts[i], fmt::format("plan['counts'][{}]", e), p.counts[i],
            "must equal offsets[e + 1] - offsets[e]");
  }
  for (Index r = 0; r < N; ++r) {
    const auto i = static_cast<std::size_t>(r);
    require(p.row_token[i] >= 0 && p.row_token[i] < T, fmt::format("plan['row_token'][{}]", r), p.row_token[i],
            fmt::format("must be in [0, T = {})", T));
    require(p.row_slot[i] >= 0 && p.row_slot[i] < k, fmt::format("plan['row_slot'][{}]", r), p.row_slot[i],
            fmt::format("must be in [0, k = {})", k));
  }
  for (Index i = 0; i < p.pair_row.size(); ++i)
    require(p.pair_row.data()[i] >= -1 && p.pair_row.data()[i] < N, fmt::format("plan['pair_row'] element {}", i),
            p.pair_row.data()[i], fmt::format("must be -1 or in [0, num_rows = {})", N));
  return p;
}

// ---- the layer --------------------------------------------------------------------------------------

struct LayerArgs {
  py::object token_ids, sequence_lengths;
  std::uint64_t seed = 0;
  bool train = false;
};

template <typename S>
struct Layered {
  LayerConfig config;
  MatrixT<S> x;
  LayerParamsT<S> params;
  std::vector<std::int32_t> token_ids;
  std::vector<Index> lengths;
  LayerOutputT<S> out;
};

template <typename S>
void run_layer(Layered<S>& l, py::handle x, py::handle params, py::handle config, const LayerArgs& a, Observer* o) {
  l.config = layer_config_arg(config);
  if (!a.train) l.config.routing.router.noise = RouterNoise::none;  // noise is for training only
  l.x = matrix_arg<S>(x, "x", -1, l.config.hidden_size(), "(T, hidden_size)");
  l.params = layer_params_from<S>(params, l.config);
  if (!a.token_ids.is_none()) l.token_ids = ints_arg(a.token_ids, "token_ids", l.x.rows(), "(T)");
  l.lengths = lengths_arg(a.sequence_lengths, "sequence_lengths");
  Rng rng(a.seed);
  moe_layer_forward(l.out, l.x, l.token_ids, l.params, l.config, &rng, o, l.lengths);
}

template <typename S>
py::dict layer_output_dict(LayerOutputT<S>&& out) {
  py::dict d;
  d["y"] = give(std::move(out.y));
  for (const auto& [key, value] : routing_dict(std::move(out.routing))) d[key] = value;  // aux_loss, z_loss too
  d["keep"] = give(std::move(out.keep));
  d["dropped"] = give(std::move(out.dropped));
  d["counts"] = give(std::move(out.plan.counts));
  d["offsets"] = give(std::move(out.plan.offsets));
  d["row_token"] = give(std::move(out.plan.row_token));
  d["row_slot"] = give(std::move(out.plan.row_slot));
  d["pair_row"] = give(std::move(out.plan.pair_row));
  d["row_gate"] = give(std::move(out.row_gate));
  d["expert_in"] = give(std::move(out.expert_in));
  d["expert_out"] = give(std::move(out.expert_out));
  py::list shared;
  for (MatrixT<S>& s : out.shared_out) shared.append(give(std::move(s)));
  d["shared_out"] = shared;
  d["shared_gate_values"] = give(std::move(out.shared_gate_values));
  return d;
}

}  // namespace

void bind_layer(py::module_& m) {
  // ---- capacity ---------------------------------------------------------------------------------------
  m.def(
      "capacity",
      [](Index tokens, int top_k, Index num_experts, py::object config, py::kwargs fields) {
        return expert_capacity(tokens, top_k, num_experts, capacity_arg(config, fields));
      },
      "tokens"_a, "top_k"_a, "num_experts"_a, "config"_a = py::none(),
      "Each expert's capacity (capacity.h): min(max(round(capacity_factor * T * k / E), min_capacity), T * k). "
      "config: a capacity dict (missing keys: dropless False, factor 1.0, rounding ceil, min_capacity 0, "
      "arrival_order); keywords override fields.");
  m.def(
      "round_capacity",
      [](double quotient, const std::string& rounding) {
        return round_capacity(quotient, parse_capacity_rounding(rounding));
      },
      "quotient"_a, "rounding"_a = "ceil",
      "A capacity quotient as a whole number (ceil, floor, trunc_int), snapping decimal factors (capacity.h).");
  m.def(
      "apply_capacity",
      [](py::handle ids, Index num_experts, py::object gates, py::object config, py::object recorder, py::kwargs fields) {
        Events events(false, recorder);
        const CapacityConfig c = capacity_arg(config, fields);
        const IndexMatrix i = index_matrix_arg(ids, "ids");
        const Matrix g = gates.is_none() ? Matrix() : matrix_arg<float>(gates, "gates", i.rows(), i.cols(), "ids' shape");
        IndexMatrix keep;
        std::vector<std::int64_t> dropped;
        capacity_forward(keep, dropped, i, g, num_experts, c, events.observer());
        py::dict d;
        d["keep"] = give(std::move(keep));
        d["dropped"] = give(std::move(dropped));
        d["capacity"] = c.dropless ? py::object(py::none())
                                   : py::object(py::int_(expert_capacity(i.rows(), static_cast<int>(i.cols()),
                                                                         num_experts, c)));
        return d;
      },
      "ids"_a, "num_experts"_a, "gates"_a = py::none(), "config"_a = py::none(), "recorder"_a = py::none(),
      "Which token-expert pairs each expert keeps (capacity.h capacity_forward): keep (T, k) int32, dropped (E) "
      "int64, capacity (None when dropless). gates are read by policy gate_priority.");
  m.def(
      "dispatch_plan",
      [](py::handle ids, Index num_experts, py::object keep, py::object recorder) {
        Events events(false, recorder);
        const IndexMatrix i = index_matrix_arg(ids, "ids");
        const IndexMatrix k = keep.is_none() ? IndexMatrix() : index_matrix_arg(keep, "keep", i.rows(), i.cols(), "ids' shape");
        Dispatch plan;
        dispatch_plan(plan, i, k, num_experts, events.observer());
        return plan_dict(std::move(plan));
      },
      "ids"_a, "num_experts"_a, "keep"_a = py::none(), "recorder"_a = py::none(),
      "The expert-major order of the kept pairs (dispatch.h, a counting sort): counts (E), offsets (E+1), "
      "row_token (N), row_slot (N), pair_row (T, k; -1 = dropped), num_rows.");
  m.def(
      "permute",
      [](py::handle x, py::handle plan, const std::string& precision) {
        const Dispatch p = plan_arg(plan);
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          MatrixT<S> out;
          permute_forward(out, matrix_arg<S>(x, "x", p.pair_row.rows(), -1, "(T, C), T = plan's tokens"), p);
          return give(std::move(out));
        });
      },
      "x"_a, "plan"_a, "precision"_a = "float32", "Gather (dispatch.h): row r = x[row_token[r]], (N, C).");
  m.def(
      "permute_backward",
      [](py::handle dpermuted, py::handle plan, Index tokens, const std::string& precision) {
        const Dispatch p = plan_arg(plan);
        require(tokens == p.pair_row.rows(), "tokens", tokens, fmt::format("must be the plan's T = {}", p.pair_row.rows()));
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          const MatrixT<S> dp = matrix_arg<S>(dpermuted, "dpermuted", p.num_rows(), -1, "(num_rows, C)");
          MatrixT<S> dx = MatrixT<S>::Zero(tokens, dp.cols());
          permute_backward(dx, dp, p);
          return give(std::move(dx));
        });
      },
      "dpermuted"_a, "plan"_a, "tokens"_a, "precision"_a = "float32",
      "The gather's transpose, a scatter-add: dx (T, C).");
  m.def(
      "unpermute",
      [](py::handle expert_out, py::handle plan, const std::string& precision) {
        const Dispatch p = plan_arg(plan);
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          MatrixT<S> per_pair;
          unpermute_forward(per_pair, matrix_arg<S>(expert_out, "expert_out", p.num_rows(), -1, "(num_rows, C)"), p);
          return give(std::move(per_pair));
        });
      },
      "expert_out"_a, "plan"_a, "precision"_a = "float32",
      "The inverse permutation: (T*k, C), row t*k + j = expert_out[pair_row[t, j]] (zeros if dropped).");
  m.def(
      "unpermute_backward",
      [](py::handle dper_pair, py::handle plan, const std::string& precision) {
        const Dispatch p = plan_arg(plan);
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          const MatrixT<S> dpp = matrix_arg<S>(dper_pair, "dper_pair", p.pair_row.size(), -1, "(T*k, C)");
          MatrixT<S> dout = MatrixT<S>::Zero(p.num_rows(), dpp.cols());
          unpermute_backward(dout, dpp, p);
          return give(std::move(dout));
        });
      },
      "dper_pair"_a, "plan"_a, "precision"_a = "float32", "The un-permutation's transpose: dexpert_out (N, C).");

  // ---- experts --------------------------------------------------------------------------------------
  m.def(
      "init_expert",
      [](py::handle config, std::uint64_t seed, double init_std) {
        Rng rng(seed);
        py::dict d;
        put_expert(d, "", init_expert<float>(expert_config_arg(config), rng, init_std));
        return d;
      },
      "config"_a, "seed"_a = 0, "init_std"_a = 0.02,
      "One expert's parameters (float32): weights ~ N(0, init_std^2) drawn from Rng(seed), biases zero.");
  m.def(
      "expert_forward",
      [](py::handle x, py::handle params, py::handle config, py::object recorder, const std::string& precision) {
        Events events(false, recorder);
        const ExpertConfig c = expert_config_arg(config);
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          MatrixT<S> y;
          ExpertCacheT<S> cache;
          expert_forward(y, cache, matrix_arg<S>(x, "x", -1, c.hidden_size, "(n, hidden_size)"),
                         expert_params_arg<S>(params, c), c, events.observer());
          return py::dict("y"_a = give(std::move(y)), "gate_pre"_a = give(std::move(cache.gate_pre)),
                          "up_pre"_a = give(std::move(cache.up_pre)), "hidden"_a = give(std::move(cache.hidden)));
        });
      },
      "x"_a, "params"_a, "config"_a, "recorder"_a = py::none(), "precision"_a = "float32",
      "One expert's FFN (experts.h; SwiGLU: Shazeer 2020): y (n, C), gate_pre, up_pre, hidden (n, H).");
  m.def(
      "expert_backward",
      [](py::handle dy, py::handle x, py::handle params, py::handle config, const std::string& precision) {
        const ExpertConfig c = expert_config_arg(config);
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          const MatrixT<S> xm = matrix_arg<S>(x, "x", -1, c.hidden_size, "(n, hidden_size)");
          const ExpertParamsT<S> p = expert_params_arg<S>(params, c);
          MatrixT<S> y, dx;
          ExpertCacheT<S> cache;
          expert_forward(y, cache, xm, p, c);
          ExpertParamsT<S> g;
          expert_backward(dx, g, matrix_arg<S>(dy, "dy", y.rows(), y.cols(), "(n, hidden_size)"), cache, xm, p, c);
          py::dict d;
          d["dx"] = give(std::move(dx));
          put_expert(d, "", std::move(g));
          return d;
        });
      },
      "dy"_a, "x"_a, "params"_a, "config"_a, "precision"_a = "float32",
      "One expert's backward (experts.h): dx (n, C) and the gradient of each parameter by name.");
  m.def(
      "segment_expert",
      [](py::handle params, py::handle config, int m_) {
        const ExpertConfig c = expert_config_arg(config);
        py::list l;
        for (ExpertParams& s : segment_expert(expert_params_arg<float>(params, c), c, m_)) {
          py::dict d;
          put_expert(d, "", std::move(s));
          l.append(d);
        }
        return l;
      },
      "params"_a, "config"_a, "m"_a,
      "Fine-grained segmentation (DeepSeekMoE sec. 3.1): m experts of width H / m whose outputs sum to the original's.");
  m.def(
      "combine_forward",
      [](py::handle expert_out, py::handle row_weight, py::handle row_token, Index tokens, const std::string& precision) {
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          const MatrixT<S> eo = matrix_arg<S>(expert_out, "expert_out");
          MatrixT<S> y;
          combine_forward(y, eo, vector_arg<S>(row_weight, "row_weight", eo.rows(), "(N)"),
                          ints_arg(row_token, "row_token", eo.rows(), "(N)"), tokens);
          return give(std::move(y));
        });
      },
      "expert_out"_a, "row_weight"_a, "row_token"_a, "tokens"_a, "precision"_a = "float32",
      "Combine (layer.h): y (T, C), y_t = sum over rows r of token t of row_weight_r * expert_out_r.");
  m.def(
      "combine_backward",
      [](py::handle dy, py::handle expert_out, py::handle row_weight, py::handle row_token, const std::string& precision) {
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          const MatrixT<S> eo = matrix_arg<S>(expert_out, "expert_out");
          const std::vector<std::int32_t> rt = ints_arg(row_token, "row_token", eo.rows(), "(N)");
          const MatrixT<S> dym = matrix_arg<S>(dy, "dy", -1, eo.cols(), "(T, C)");
          for (std::size_t r = 0; r < rt.size(); ++r)
            require(rt[r] >= 0 && rt[r] < dym.rows(), fmt::format("row_token[{}]", r), rt[r],
                    fmt::format("must be in [0, T = {})", dym.rows()));
          MatrixT<S> deo;
          VectorT<S> drw;
          combine_backward(deo, drw, dym, eo, vector_arg<S>(row_weight, "row_weight", eo.rows(), "(N)"), rt);
          return py::dict("dexpert_out"_a = give(std::move(deo)), "drow_weight"_a = give(std::move(drw)));
        });
      },
      "dy"_a, "expert_out"_a, "row_weight"_a, "row_token"_a, "precision"_a = "float32",
      "Combine's backward: dexpert_out (N, C), drow_weight (N).");

  // ---- the layer --------------------------------------------------------------------------------------
  m.def(
      "init_layer",
      [](py::handle config, std::uint64_t seed, double init_std) {
        Rng rng(seed);
        return layer_params_dict(init_layer<float>(layer_config_arg(config), rng, init_std));
      },
      "config"_a, "seed"_a = 0, "init_std"_a = 0.02,
      "Every parameter of the layer (float32) by name (router.weight, experts.0.w_gate, ...), as layer.h "
      "init_layer with Rng(seed).");
  m.def(
      "layer_forward",
      [](py::handle x, py::handle params, py::handle config, py::object token_ids, py::object sequence_lengths,
         std::uint64_t seed, bool train, bool record, py::object recorder, const std::string& precision) {
        const LayerArgs a{token_ids, sequence_lengths, seed, train};
        Events events(record, recorder);
        return by_precision(precision, [&](auto tag) {
          Layered<decltype(tag)> l;
          run_layer(l, x, params, config, a, events.observer());
          py::dict d = layer_output_dict(std::move(l.out));
          events.put(d);
          return d;
        });
      },
      "x"_a, "params"_a, "config"_a, py::kw_only(), "token_ids"_a = py::none(), "sequence_lengths"_a = py::none(),
      "seed"_a = 0, "train"_a = false, "record"_a = false, "recorder"_a = py::none(), "precision"_a = "float32",
      R"(One MoE layer forward (layer.h), without the residual: y (T, C), the routing (logits, scores, ids, gates,
load, aux_loss, z_loss), capacity (keep, dropped), dispatch (counts, offsets, row_token, row_slot, pair_row),
row_gate, expert_in, expert_out, shared_out, shared_gate_values, and events when record=True.)");
  m.def(
      "layer_backward",
      [](py::handle dy, py::handle x, py::handle params, py::handle config, py::object token_ids,
         py::object sequence_lengths, std::uint64_t seed, bool train, double loss_scale, const std::string& precision) {
        const LayerArgs a{token_ids, sequence_lengths, seed, train};
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          Layered<S> l;
          run_layer(l, x, params, config, a, nullptr);
          const MatrixT<S> dym = matrix_arg<S>(dy, "dy", l.out.y.rows(), l.out.y.cols(), "y's shape (T, hidden_size)");
          LayerGradsT<S> g;
          moe_layer_backward(g, dym, l.out, l.x, l.params, l.config, static_cast<S>(loss_scale), l.lengths);
          py::dict d;
          d["dx"] = give(std::move(g.dx));
          d["router.weight"] = give(std::move(g.router.weight));
          if (g.router.bias.size() > 0) d["router.bias"] = give(std::move(g.router.bias));
          if (g.router.noise_weight.size() > 0) d["router.noise_weight"] = give(std::move(g.router.noise_weight));
          for (std::size_t e = 0; e < g.experts.size(); ++e)
            put_expert(d, fmt::format("experts.{}.", e), std::move(g.experts[e]));
          for (std::size_t s = 0; s < g.shared.size(); ++s)
            put_expert(d, fmt::format("shared.{}.", s), std::move(g.shared[s]));
          if (g.shared_gate.size() > 0) d["shared_gate"] = give(std::move(g.shared_gate));
          return d;
        });
      },
      "dy"_a, "x"_a, "params"_a, "config"_a, py::kw_only(), "token_ids"_a = py::none(),
      "sequence_lengths"_a = py::none(), "seed"_a = 0, "train"_a = false, "loss_scale"_a = 1.0,
      "precision"_a = "float32",
      R"(The gradient of sum(dy * y) + loss_scale * (aux_loss + z_loss) (layer.h moe_layer_backward): dx (T, C) and
every trainable parameter by its params name. The forward is recomputed from the same arguments.)");
  m.def(
      "segment_layer", [](py::handle config, int m_) { return from_json(to_json(segment_layer(layer_config_arg(config), m_))); },
      "config"_a, "m"_a,
      "The LayerConfig with every expert split into m (DeepSeekMoE): m * E experts, m * k per token, H / m wide.");
  m.def(
      "upcycle",
      [](py::handle dense_params, py::handle config, std::uint64_t seed, double noise_std, double router_std) {
        const LayerConfig c = layer_config_arg(config);
        Rng rng(seed);
        return layer_params_dict(upcycle(expert_params_arg<float>(dense_params, c.expert), c, rng, noise_std, router_std));
      },
      "dense_params"_a, "config"_a, "seed"_a = 0, "noise_std"_a = 0.0, "router_std"_a = 0.02,
      "Sparse upcycling (Komatsuzaki et al. 2022): layer params whose experts are copies of a dense FFN.");
}

}  // namespace moelab::python
