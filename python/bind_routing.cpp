// moelab/python/bind_routing.cpp — the routing of one layer (reference/routing.h) and each of its
// stages on its own: router.h, scoring.h, selection.h, gating.h, losses.h, balancing.h.
// Every function with `precision` runs the reference's float or double instantiation.
//
// Shapes: T = tokens, C = hidden size, E = experts, k = experts per token.
#include <fmt/format.h>

#include "python/bind.h"
#include "reference/balancing.h"
#include "reference/gating.h"
#include "reference/losses.h"
#include "reference/router.h"
#include "reference/routing.h"
#include "reference/scoring.h"
#include "reference/selection.h"

namespace moelab::python {
namespace {

// f(Scalar{}) with Scalar = double for precision "float64", else float.
template <typename F>
auto by_precision(const std::string& precision, F&& f) {
  return is_double(precision) ? f(double{}) : f(float{});
}

// The router parameters of `c`; omitted bias, noise weight and selection bias are zeros where the
// configuration has them.
template <typename S>
RoutingParamsT<S> routing_params(const RoutingConfig& c, py::handle weight, py::handle bias, py::handle noise_weight,
                                 py::handle selection_bias) {
  const Index E = c.num_experts(), C = c.router.hidden_size;
  RoutingParamsT<S> p;
  p.router.weight = matrix_arg<S>(weight, "router_weight", E, C, "(num_experts, hidden_size)");
  if (!bias.is_none()) {
    p.router.bias = vector_arg<S>(bias, "router_bias", E, "(num_experts)");
  } else if (c.router.use_bias) {
    p.router.bias = VectorT<S>::Zero(E);
  }
  if (!noise_weight.is_none()) {
    p.router.noise_weight = matrix_arg<S>(noise_weight, "noise_weight", E, C, "(num_experts, hidden_size)");
  } else if (c.router.noise == RouterNoise::noisy_topk) {
    p.router.noise_weight = MatrixT<S>::Zero(E, C);
  }
  if (!selection_bias.is_none()) {
    p.selection_bias = vector_arg<S>(selection_bias, "selection_bias", E, "(num_experts)");
  } else if (c.use_selection_bias) {
    p.selection_bias = VectorT<S>::Zero(E);
  }
  return p;
}

// The arguments route and route_backward share.
struct RouteArgs {
  py::object router_bias, noise_weight, selection_bias, token_ids, sequence_lengths;
  std::uint64_t seed = 0;
  bool train = false;
};

template <typename S>
struct Routed {
  RoutingConfig config;
  MatrixT<S> x;
  RoutingParamsT<S> params;
  std::vector<std::int32_t> token_ids;
  std::vector<Index> lengths;
  RoutingOutputT<S> out;
};

template <typename S>
void run_route(Routed<S>& r, py::handle x, py::handle weight, py::handle config, const RouteArgs& a, Observer* o) {
  r.config = routing_config_arg(config);
  if (!a.train) r.config.router.noise = RouterNoise::none;  // noise is for training only
  r.x = matrix_arg<S>(x, "x", -1, r.config.router.hidden_size, "(T, hidden_size)");
  r.params = routing_params<S>(r.config, weight, a.router_bias, a.noise_weight, a.selection_bias);
  if (!a.token_ids.is_none()) r.token_ids = ints_arg(a.token_ids, "token_ids", r.x.rows(), "(T)");
  r.lengths = lengths_arg(a.sequence_lengths, "sequence_lengths");
  Rng rng(a.seed);
  route_forward(r.out, r.x, r.token_ids, r.params, r.config, &rng, o, r.lengths);
}

template <typename S>
void put_router_grads(py::dict& d, RouterParamsT<S>& g, const std::string& prefix) {
  d[py::str(prefix + "weight")] = give(std::move(g.weight));
  if (g.bias.size() > 0) d[py::str(prefix + "bias")] = give(std::move(g.bias));
  if (g.noise_weight.size() > 0) d[py::str(prefix + "noise_weight")] = give(std::move(g.noise_weight));
}

GatingConfig gating_config(const std::string& kind, bool renormalize, double renorm_eps, double scaling) {
  GatingConfig g{.kind = parse_gate_kind(kind), .renormalize = renormalize, .renorm_eps = renorm_eps,
                 .routed_scaling_factor = scaling};
  g.validate();
  return g;
}

// One balance loss of losses.h by name: its value, and its gradient into `grad` when asked.
struct LossSizes {
  Index num_layers = 1, num_devices = 1, devices_per_token = 1;
  std::vector<Index> sequence_lengths;
};

template <typename S>
S aux_loss_impl(const std::string& kind, const MatrixT<S>& x, const IndexMatrix& ids, double coef,
                const LossSizes& s, Observer* o, MatrixT<S>* grad) {
  std::vector<Index> lengths = s.sequence_lengths;
  if (lengths.empty()) lengths.push_back(x.rows());
  if (kind == "switch") {
    if (grad) switch_aux_loss_backward(*grad, x, ids, coef);
    return switch_aux_loss_forward(x, ids, coef, o);
  }
  if (kind == "hf") {
    if (grad) hf_load_balancing_loss_backward(*grad, x, ids, coef);
    return hf_load_balancing_loss_forward(x, ids, coef, o);
  }
  if (kind == "megablocks") {
    if (grad) megablocks_load_balancing_loss_backward(*grad, x, ids, s.num_layers, coef);
    return megablocks_load_balancing_loss_forward(x, ids, s.num_layers, coef, o);
  }
  if (kind == "deepseek_v2_expert") {
    if (grad) deepseek_v2_expert_balance_loss_backward(*grad, x, ids, coef);
    return deepseek_v2_expert_balance_loss_forward(x, ids, coef, o);
  }
  if (kind == "deepseek_v2_device") {
    if (grad) deepseek_v2_device_balance_loss_backward(*grad, x, ids, s.num_devices, coef);
    return deepseek_v2_device_balance_loss_forward(x, ids, s.num_devices, coef, o);
  }
  if (kind == "deepseek_v2_comm") {
    if (grad) deepseek_v2_comm_balance_loss_backward(*grad, x, ids, s.num_devices, s.devices_per_token, coef);
    return deepseek_v2_comm_balance_loss_forward(x, ids, s.num_devices, s.devices_per_token, coef, o);
  }
  if (kind == "deepseek_v3_sequence") {
    if (grad) deepseek_v3_sequence_balance_loss_backward(*grad, x, ids, lengths, coef);
    return deepseek_v3_sequence_balance_loss_forward(x, ids, lengths, coef, o);
  }
  fail("kind", fmt::format("\"{}\"", kind),
       "must be switch, hf, megablocks, deepseek_v2_expert, deepseek_v2_device, deepseek_v2_comm or "
       "deepseek_v3_sequence");
}

}  // namespace

void bind_routing(py::module_& m) {
  // ---- route, route_backward ----------------------------------------------------------------------
  m.def(
      "route",
      [](py::handle x, py::handle router_weight, py::handle config, py::object router_bias, py::object noise_weight,
         py::object selection_bias, py::object token_ids, py::object sequence_lengths, std::uint64_t seed, bool train,
         bool record, py::object recorder, const std::string& precision) {
        const RouteArgs a{router_bias, noise_weight, selection_bias, token_ids, sequence_lengths, seed, train};
        Events events(record, recorder);
        return by_precision(precision, [&](auto tag) {
          Routed<decltype(tag)> r;
          run_route(r, x, router_weight, config, a, events.observer());
          py::dict d = routing_dict(std::move(r.out));
          events.put(d);
          return d;
        });
      },
      "x"_a, "router_weight"_a, "config"_a, py::kw_only(), "router_bias"_a = py::none(),
      "noise_weight"_a = py::none(), "selection_bias"_a = py::none(), "token_ids"_a = py::none(),
      "sequence_lengths"_a = py::none(), "seed"_a = 0, "train"_a = false, "record"_a = false,
      "recorder"_a = py::none(), "precision"_a = "float32",
      R"(Routes T tokens through one layer's router (routing.h): router -> scoring -> selection -> gating,
with the balance loss and z-loss. x (T, C), router_weight (E, C), config a LayerConfig or RoutingConfig
dict. train=False switches the router noise off (as `moelab route` without --train); train=True draws
it from Rng(seed). Returns logits (T, E), scores (T, E), ids (T, k) int32 (expert choice: (E, C) token
ids), gates, load (E) int64, aux_loss, z_loss, and events when record=True.)");
  m.def(
      "route_backward",
      [](py::handle dgates, py::handle x, py::handle router_weight, py::handle config, py::object router_bias,
         py::object noise_weight, py::object selection_bias, py::object token_ids, py::object sequence_lengths,
         std::uint64_t seed, bool train, double loss_scale, const std::string& precision) {
        const RouteArgs a{router_bias, noise_weight, selection_bias, token_ids, sequence_lengths, seed, train};
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          Routed<S> r;
          run_route(r, x, router_weight, config, a, nullptr);
          const MatrixT<S> dg = matrix_arg<S>(dgates, "dgates", r.out.gates.rows(), r.out.gates.cols(), "gates' shape");
          MatrixT<S> dx;
          RouterParamsT<S> grads;
          route_backward(dx, grads, dg, r.out, r.x, r.params, r.config, static_cast<S>(loss_scale), r.lengths);
          py::dict d;
          d["dx"] = give(std::move(dx));
          put_router_grads(d, grads, "router.");
          return d;
        });
      },
      "dgates"_a, "x"_a, "router_weight"_a, "config"_a, py::kw_only(), "router_bias"_a = py::none(),
      "noise_weight"_a = py::none(), "selection_bias"_a = py::none(), "token_ids"_a = py::none(),
      "sequence_lengths"_a = py::none(), "seed"_a = 0, "train"_a = false, "loss_scale"_a = 1.0,
      "precision"_a = "float32",
      R"(The gradient of sum(dgates * gates) + loss_scale * (aux_loss + z_loss) (routing.h route_backward): dx (T, C),
router.weight (E, C), and router.bias / router.noise_weight where the router has them. The forward is
recomputed from the same arguments as route().)");

  // ---- router ----------------------------------------------------------------------------------------
  auto router_setup = [](auto tag, py::handle x, py::handle weight, py::handle config, py::handle bias,
                         py::handle noise_weight, bool train) {
    using S = decltype(tag);
    RouterConfig c;
    if (config.is_none()) {
      const MatrixT<S> w = matrix_arg<S>(weight, "weight");
      c.num_experts = w.rows();
      c.hidden_size = w.cols();
      c.use_bias = !bias.is_none();
    } else {
      c = routing_config_arg(config).router;
    }
    if (!train) c.noise = RouterNoise::none;
    c.validate();
    RouterParamsT<S> p;
    p.weight = matrix_arg<S>(weight, "weight", c.num_experts, c.hidden_size, "(num_experts, hidden_size)");
    if (!bias.is_none()) p.bias = vector_arg<S>(bias, "bias", c.num_experts, "(num_experts)");
    else if (c.use_bias) p.bias = VectorT<S>::Zero(c.num_experts);
    if (!noise_weight.is_none())
      p.noise_weight = matrix_arg<S>(noise_weight, "noise_weight", c.num_experts, c.hidden_size, "(num_experts, hidden_size)");
    else if (c.noise == RouterNoise::noisy_topk)
      p.noise_weight = MatrixT<S>::Zero(c.num_experts, c.hidden_size);
    const MatrixT<S> xm = matrix_arg<S>(x, "x", -1, c.hidden_size, "(T, hidden_size)");
    return std::make_tuple(c, p, xm);
  };
  m.def(
      "router_forward",
      [router_setup](py::handle x, py::handle weight, py::handle config, py::object bias, py::object noise_weight,
                     std::uint64_t seed, bool train, py::object recorder, const std::string& precision) {
        Events events(false, recorder);
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          auto [c, p, xm] = router_setup(tag, x, weight, config, bias, noise_weight, train);
          MatrixT<S> logits;
          RouterCacheT<S> cache;
          Rng rng(seed);
          router_forward(logits, cache, xm, p, c, &rng, events.observer());
          py::dict d;
          d["logits"] = give(std::move(logits));
          d["input"] = give(std::move(cache.input));
          if (cache.jitter.size() > 0) d["jitter"] = give(std::move(cache.jitter));
          if (cache.noise.size() > 0) d["noise"] = give(std::move(cache.noise));
          if (cache.noise_logits.size() > 0) d["noise_logits"] = give(std::move(cache.noise_logits));
          return d;
        });
      },
      "x"_a, "weight"_a, "config"_a = py::none(), py::kw_only(), "bias"_a = py::none(), "noise_weight"_a = py::none(),
      "seed"_a = 0, "train"_a = false, "recorder"_a = py::none(), "precision"_a = "float32",
      R"(The router stage (router.h): logits = x W^T (+ b) (+ noise), in the config's dtype. config None: a plain
fp32 linear router. Returns logits (T, E), input (T, C: the x multiplied, after jitter and rounding), and
jitter / noise / noise_logits when used.)");
  m.def(
      "router_backward",
      [router_setup](py::handle dlogits, py::handle x, py::handle weight, py::handle config, py::object bias,
                     py::object noise_weight, std::uint64_t seed, bool train, const std::string& precision) {
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          auto [c, p, xm] = router_setup(tag, x, weight, config, bias, noise_weight, train);
          MatrixT<S> logits;
          RouterCacheT<S> cache;
          Rng rng(seed);
          router_forward(logits, cache, xm, p, c, &rng, nullptr);
          const MatrixT<S> dl = matrix_arg<S>(dlogits, "dlogits", logits.rows(), logits.cols(), "(T, num_experts)");
          MatrixT<S> dx;
          RouterParamsT<S> g;
          router_backward(dx, g, dl, cache, xm, p, c);
          py::dict d;
          d["dx"] = give(std::move(dx));
          put_router_grads(d, g, "");
          return d;
        });
      },
      "dlogits"_a, "x"_a, "weight"_a, "config"_a = py::none(), py::kw_only(), "bias"_a = py::none(),
      "noise_weight"_a = py::none(), "seed"_a = 0, "train"_a = false, "precision"_a = "float32",
      "The router's backward (router.h): dx, weight (and bias, noise_weight where used). The forward is recomputed.");

  // ---- scoring --------------------------------------------------------------------------------------
  m.def(
      "score",
      [](py::handle logits, const std::string& scoring, py::object recorder, const std::string& precision) {
        Events events(false, recorder);
        const Scoring s = parse_scoring(scoring);
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          MatrixT<S> scores;
          score_forward(scores, matrix_arg<S>(logits, "logits"), s, events.observer());
          return give(std::move(scores));
        });
      },
      "logits"_a, "scoring"_a = "softmax", "recorder"_a = py::none(), "precision"_a = "float32",
      "Expert scores (T, E) from logits (scoring.h): scoring \"softmax\" (row-wise), \"sigmoid\" or "
      "\"sqrt_softplus\".");
  m.def(
      "score_backward",
      [](py::handle dscores, py::handle logits, const std::string& scoring, const std::string& precision) {
        const Scoring s = parse_scoring(scoring);
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          const MatrixT<S> l = matrix_arg<S>(logits, "logits");
          MatrixT<S> scores, dlogits;
          score_forward(scores, l, s);
          score_backward(dlogits, l, scores, matrix_arg<S>(dscores, "dscores", l.rows(), l.cols(), "logits' shape"), s);
          return give(std::move(dlogits));
        });
      },
      "dscores"_a, "logits"_a, "scoring"_a = "softmax", "precision"_a = "float32",
      "dlogits (T, E) from dscores (scoring.h backward).");

  // ---- selection ------------------------------------------------------------------------------------
  m.def(
      "topk",
      [](py::handle scores, int k, py::object selection_bias, py::object recorder, const std::string& precision) {
        Events events(false, recorder);
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          const MatrixT<S> s = matrix_arg<S>(scores, "scores");
          VectorT<S> bias;
          if (!selection_bias.is_none()) bias = vector_arg<S>(selection_bias, "selection_bias", s.cols(), "(E)");
          IndexMatrix ids;
          topk_select(ids, s, k, selection_bias.is_none() ? nullptr : &bias, events.observer());
          return give(std::move(ids));
        });
      },
      "scores"_a, "k"_a, "selection_bias"_a = py::none(), "recorder"_a = py::none(), "precision"_a = "float32",
      "The k experts with the largest scores (+ selection_bias), best first, ties to the lower id: ids (T, k) "
      "int32 (selection.h topk_select).");
  m.def(
      "group_limited_topk",
      [](py::handle scores, int k, int n_group, int topk_group, const std::string& score, const std::string& mask,
         py::object selection_bias, py::object recorder, const std::string& precision) {
        Events events(false, recorder);
        const GroupLimit limit{.n_group = n_group, .topk_group = topk_group, .score = parse_group_score(score),
                               .mask = parse_group_mask(mask)};
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          const MatrixT<S> s = matrix_arg<S>(scores, "scores");
          VectorT<S> bias;
          if (!selection_bias.is_none()) bias = vector_arg<S>(selection_bias, "selection_bias", s.cols(), "(E)");
          IndexMatrix ids;
          group_limited_select(ids, s, k, limit, selection_bias.is_none() ? nullptr : &bias, events.observer());
          return give(std::move(ids));
        });
      },
      "scores"_a, "k"_a, "n_group"_a, "topk_group"_a, "score"_a = "top2_sum", "mask"_a = "neg_inf",
      "selection_bias"_a = py::none(), "recorder"_a = py::none(), "precision"_a = "float32",
      "Group-limited top-k (DeepSeek-V3 sec. 2.1.2): keep the topk_group best of n_group groups (score "
      "\"top2_sum\" or \"max\"), mask the others (\"neg_inf\" or \"zero\"), then top-k. ids (T, k).");
  m.def(
      "device_limited_topk",
      [](py::handle scores, int k, int num_devices, int topk_devices, py::object recorder, const std::string& precision) {
        Events events(false, recorder);
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          IndexMatrix ids;
          device_limited_select(ids, matrix_arg<S>(scores, "scores"), k, num_devices, topk_devices, events.observer());
          return give(std::move(ids));
        });
      },
      "scores"_a, "k"_a, "num_devices"_a, "topk_devices"_a, "recorder"_a = py::none(), "precision"_a = "float32",
      "DeepSeek-V2 device-limited routing: top-k among the experts of the topk_devices best devices. ids (T, k).");
  m.def("expert_choice_capacity", &expert_choice_capacity, "tokens"_a, "num_experts"_a, "capacity_factor"_a,
        "Tokens per expert for expert choice: C = ceil(T * capacity_factor / E), clamped to [0, T].");
  m.def(
      "expert_choice",
      [](py::handle scores, Index capacity, py::object recorder, const std::string& precision) {
        Events events(false, recorder);
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          IndexMatrix token_ids;
          expert_choice_select(token_ids, matrix_arg<S>(scores, "scores"), capacity, events.observer());
          return give(std::move(token_ids));
        });
      },
      "scores"_a, "capacity"_a, "recorder"_a = py::none(), "precision"_a = "float32",
      "Expert choice (Zhou et al. 2022): each expert takes its `capacity` best tokens. token ids (E, C) int32.");
  m.def(
      "hash_route",
      [](py::handle token_ids, int num_experts, std::uint64_t seed, py::object recorder) {
        Events events(false, recorder);
        IndexMatrix ids;
        hash_select(ids, ints_arg(token_ids, "token_ids"), num_experts, seed, events.observer());
        return give(std::move(ids));
      },
      "token_ids"_a, "num_experts"_a, "seed"_a = 0, "recorder"_a = py::none(),
      "Hash routing (Roller et al. 2021): ids (T, 1) = hash64(token_id ^ seed) mod E.");
  m.def(
      "make_hash_table",
      [](Index vocab_size, int num_experts, int k, std::uint64_t seed) {
        return give(make_hash_table(vocab_size, num_experts, k, seed));
      },
      "vocab_size"_a, "num_experts"_a, "k"_a, "seed"_a = 0,
      "A balanced random table (V, k) of distinct experts per row, for table_route.");
  m.def(
      "table_route",
      [](py::handle token_ids, py::handle table, int num_experts, py::object recorder) {
        Events events(false, recorder);
        IndexMatrix ids;
        table_select(ids, ints_arg(token_ids, "token_ids"), index_matrix_arg(table, "table"), num_experts,
                     events.observer());
        return give(std::move(ids));
      },
      "token_ids"_a, "table"_a, "num_experts"_a, "recorder"_a = py::none(),
      "Routing by a fixed table (DeepSeek-V4 tid2eid): ids (T, k) = table[token_ids].");
  m.def(
      "expert_load",
      [](py::handle ids, int num_experts) { return give(expert_load(index_matrix_arg(ids, "ids"), num_experts)); },
      "ids"_a, "num_experts"_a, "Token-expert pairs per expert: load (E) int64, summing to T * k.");

  // ---- gating ---------------------------------------------------------------------------------------
  m.def(
      "gate_weights",
      [](py::handle logits, py::handle scores, py::handle ids, const std::string& kind, bool renormalize,
         double renorm_eps, double routed_scaling_factor, py::object recorder, const std::string& precision) {
        Events events(false, recorder);
        const GatingConfig g = gating_config(kind, renormalize, renorm_eps, routed_scaling_factor);
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          const MatrixT<S> l = matrix_arg<S>(logits, "logits");
          MatrixT<S> gates;
          gating_forward(gates, l, matrix_arg<S>(scores, "scores", l.rows(), l.cols(), "logits' shape"),
                         index_matrix_arg(ids, "ids", l.rows(), -1, "(T, k)"), g, events.observer());
          return give(std::move(gates));
        });
      },
      "logits"_a, "scores"_a, "ids"_a, "kind"_a = "selected_scores", "renormalize"_a = false, "renorm_eps"_a = 0.0,
      "routed_scaling_factor"_a = 1.0, "recorder"_a = py::none(), "precision"_a = "float32",
      "Gate weights (T, k) of the selected experts (gating.h): kind selected_scores, softmax_of_selected_logits, "
      "sigmoid_of_selected_logits or ones; optional renormalisation; scaling.");
  m.def(
      "gate_weights_backward",
      [](py::handle dgates, py::handle logits, py::handle scores, py::handle ids, const std::string& kind,
         bool renormalize, double renorm_eps, double routed_scaling_factor, const std::string& precision) {
        const GatingConfig g = gating_config(kind, renormalize, renorm_eps, routed_scaling_factor);
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          const MatrixT<S> l = matrix_arg<S>(logits, "logits");
          const MatrixT<S> s = matrix_arg<S>(scores, "scores", l.rows(), l.cols(), "logits' shape");
          const IndexMatrix i = index_matrix_arg(ids, "ids", l.rows(), -1, "(T, k)");
          MatrixT<S> dlogits, dscores;
          gating_backward(dlogits, dscores, matrix_arg<S>(dgates, "dgates", i.rows(), i.cols(), "ids' shape"), l, s, i,
                          g);
          return py::dict("dlogits"_a = give(std::move(dlogits)), "dscores"_a = give(std::move(dscores)));
        });
      },
      "dgates"_a, "logits"_a, "scores"_a, "ids"_a, "kind"_a = "selected_scores", "renormalize"_a = false,
      "renorm_eps"_a = 0.0, "routed_scaling_factor"_a = 1.0, "precision"_a = "float32",
      "The gating backward (gating.h): dict dlogits, dscores (T, E).");

  // ---- losses ---------------------------------------------------------------------------------------
  m.def(
      "aux_loss",
      [](const std::string& kind, py::handle x, py::handle ids, double coef, Index num_layers, Index num_devices,
         Index devices_per_token, py::object sequence_lengths, py::object recorder, const std::string& precision) {
        Events events(false, recorder);
        const LossSizes sizes{num_layers, num_devices, devices_per_token, lengths_arg(sequence_lengths, "sequence_lengths")};
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          const MatrixT<S> xm = matrix_arg<S>(x, "x");
          return static_cast<double>(aux_loss_impl<S>(kind, xm, index_matrix_arg(ids, "ids", xm.rows(), -1, "(rows, k)"),
                                                      coef, sizes, events.observer(), nullptr));
        });
      },
      "kind"_a, "x"_a, "ids"_a, "coef"_a, py::kw_only(), "num_layers"_a = 1, "num_devices"_a = 1,
      "devices_per_token"_a = 1, "sequence_lengths"_a = py::none(), "recorder"_a = py::none(),
      "precision"_a = "float32",
      R"(A balance loss of losses.h: kind switch, hf, megablocks, deepseek_v2_expert, deepseek_v2_device,
deepseek_v2_comm, deepseek_v3_sequence. x: probs (switch, megablocks, deepseek_v2_*), sigmoid scores
(deepseek_v3_sequence) or logits (hf). ids (rows, k).)");
  m.def(
      "aux_loss_backward",
      [](const std::string& kind, py::handle x, py::handle ids, double coef, Index num_layers, Index num_devices,
         Index devices_per_token, py::object sequence_lengths, const std::string& precision) {
        const LossSizes sizes{num_layers, num_devices, devices_per_token, lengths_arg(sequence_lengths, "sequence_lengths")};
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          const MatrixT<S> xm = matrix_arg<S>(x, "x");
          MatrixT<S> grad;
          aux_loss_impl<S>(kind, xm, index_matrix_arg(ids, "ids", xm.rows(), -1, "(rows, k)"), coef, sizes, nullptr,
                           &grad);
          return give(std::move(grad));
        });
      },
      "kind"_a, "x"_a, "ids"_a, "coef"_a, py::kw_only(), "num_layers"_a = 1, "num_devices"_a = 1,
      "devices_per_token"_a = 1, "sequence_lengths"_a = py::none(), "precision"_a = "float32",
      "d loss / d x of a balance loss (x's shape).");
  m.def(
      "z_loss",
      [](py::handle logits, double coef, py::object recorder, const std::string& precision) {
        Events events(false, recorder);
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          return static_cast<double>(router_z_loss_forward(matrix_arg<S>(logits, "logits"), coef, events.observer()));
        });
      },
      "logits"_a, "coef"_a, "recorder"_a = py::none(), "precision"_a = "float32",
      "Router z-loss (ST-MoE eq. 5): coef * mean_t logsumexp(logits_t)^2.");
  m.def(
      "z_loss_backward",
      [](py::handle logits, double coef, const std::string& precision) {
        return by_precision(precision, [&](auto tag) {
          using S = decltype(tag);
          MatrixT<S> grad;
          router_z_loss_backward(grad, matrix_arg<S>(logits, "logits"), coef);
          return give(std::move(grad));
        });
      },
      "logits"_a, "coef"_a, "precision"_a = "float32", "d z_loss / d logits (T, E).");
  m.def(
      "bias_update",
      [](py::handle bias, py::handle load, double rate, py::object recorder) {
        Events events(false, recorder);
        BiasBalancer b;
        b.bias = vector_arg<float>(bias, "bias");
        b.gamma = rate;
        b.update(int64s_arg(load, "load", b.bias.size(), "(E)"), events.observer());
        return give(std::move(b.bias));
      },
      "bias"_a, "load"_a, "rate"_a, "recorder"_a = py::none(),
      "Auxiliary-loss-free balancing (DeepSeek-V3): the new bias b + rate * sign(mean(load) - load), float32 (E).");
}

}  // namespace moelab::python
