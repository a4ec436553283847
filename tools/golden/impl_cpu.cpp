// moelab/tools/golden/impl_cpu.cpp — `moelab check --impl cpu`: the reference in float32 (the
// precision the model trains in) on each case's inputs, rebuilt from the manifest's configuration
// alone. Its results must pass every committed case: that is a test (tests/golden/).
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <cstring>

#include "reference/balancing.h"
#include "reference/capacity.h"
#include "reference/config_json.h"
#include "reference/dispatch.h"
#include "reference/error.h"
#include "reference/experts.h"
#include "reference/layer.h"
#include "reference/losses.h"
#include "tools/golden/builder.h"
#include "tools/golden/case_io.h"
#include "tools/golden/golden.h"

namespace moelab::golden {
namespace {

std::vector<Index> lengths(const Case& c) {
  if (!has(c, "input.sequence_lengths")) return {};
  const std::vector<std::int64_t> v = ints64(c, "input.sequence_lengths");
  return {v.begin(), v.end()};
}
template <typename T>
T config_value(const Case& c, const std::string& key) {
  if (!c.config.contains(key)) fail("config." + key, "(missing)", "is required for case " + c.name);
  return c.config.at(key).get<T>();
}

void put_routing(Produced& p, const RoutingOutputT<float>& r, const RoutingConfig& rc) {
  p["output.logits"] = f64(r.logits);
  p["output.scores"] = f64(r.scores);
  p[rc.expert_choice() ? "output.expert_choice_ids" : "output.topk_ids"] = tensor_from(r.ids);
  p["output.gates"] = f64(r.gates);
  p["output.load"] = i64(r.load);
  p["output.aux_loss"] = scalar_tensor(r.aux_loss);
  p["output.z_loss"] = scalar_tensor(r.z_loss);
}

void put_expert_grads(Produced& p, const std::string& prefix, const ExpertParamsT<float>& g) {
  auto put = [&](const char* name, const Matrix& m) {
    if (m.size() > 0) p[prefix + "." + name] = f64(m);
  };
  auto put_vector = [&](const char* name, const VectorT<float>& v) {
    if (v.size() > 0) p[prefix + "." + name] = f64_vector(v);
  };
  put("w_gate", g.w_gate);
  put("w_up", g.w_up);
  put("w_down", g.w_down);
  put_vector("b_gate", g.b_gate);
  put_vector("b_up", g.b_up);
  put_vector("b_down", g.b_down);
}

Produced run_routing(const Case& c) {
  const RoutingConfig rc = routing_config_from_json(c.config);
  RoutingParamsT<float> params;
  params.router.weight = matrix(c, "param.router.weight");
  if (rc.router.use_bias) params.router.bias = vector(c, "param.router.bias");
  if (rc.use_selection_bias) params.selection_bias = vector(c, "param.selection_bias");
  const Matrix x = matrix(c, "input.x");
  const std::vector<std::int32_t> token_ids = has(c, "input.token_ids") ? ints32(c, "input.token_ids") : std::vector<std::int32_t>{};
  const std::vector<Index> seq = lengths(c);
  RoutingOutputT<float> r;
  route_forward(r, x, token_ids, params, rc, nullptr, nullptr, seq);
  Produced p;
  put_routing(p, r, rc);
  if (has(c, "input.dgates")) {
    Matrix dx;
    RouterParamsT<float> dparams;
    route_backward(dx, dparams, matrix(c, "input.dgates"), r, x, params, rc, 1.0f, seq);
    p["grad.x"] = f64(dx);
    p["grad.router.weight"] = f64(dparams.weight);
    if (dparams.bias.size() > 0) p["grad.router.bias"] = f64_vector(dparams.bias);
  }
  return p;
}

Produced run_layer(const Case& c) {
  const LayerConfig lc = layer_config_from_json(c.config);
  const LayerParamsT<float> params = get_layer_params(c.file, lc);
  const Matrix x = matrix(c, "input.x");
  const std::vector<std::int32_t> token_ids = has(c, "input.token_ids") ? ints32(c, "input.token_ids") : std::vector<std::int32_t>{};
  const std::vector<Index> seq = lengths(c);
  LayerOutputT<float> r;
  moe_layer_forward(r, x, token_ids, params, lc, nullptr, nullptr, seq);
  Produced p;
  put_routing(p, r.routing, lc.routing);
  if (!lc.routing.expert_choice() && !lc.capacity.dropless) {
    p["output.keep"] = tensor_from(r.keep);
    p["output.dropped"] = i64(r.dropped);
  }
  p["output.counts"] = i64(r.plan.counts);
  p["output.offsets"] = i64(r.plan.offsets);
  p["output.row_token"] = i32(r.plan.row_token);
  p["output.expert_out"] = f64(r.expert_out);
  p["output.y"] = f64(r.y);
  if (has(c, "input.dy")) {
    LayerGradsT<float> g;
    moe_layer_backward(g, matrix(c, "input.dy"), r, x, params, lc, 1.0f, seq);
    p["grad.x"] = f64(g.dx);
    p["grad.router.weight"] = f64(g.router.weight);
    if (g.router.bias.size() > 0) p["grad.router.bias"] = f64_vector(g.router.bias);
    for (std::size_t e = 0; e < g.experts.size(); ++e) put_expert_grads(p, fmt::format("grad.experts.{}", e), g.experts[e]);
    for (std::size_t s = 0; s < g.shared.size(); ++s) put_expert_grads(p, fmt::format("grad.shared.{}", s), g.shared[s]);
    if (g.shared_gate.size() > 0) p["grad.shared_gate"] = f64(g.shared_gate);
  }
  return p;
}

Produced run_numerics(const Case& c) {
  const Format f = parse_format(config_value<std::string>(c, "format"), "config.format");
  Produced p;
  if (has(c, "input.values")) {
    const std::vector<double> xs = tensor_values(tensor(c, "input.values"));
    for (const char* name : {"output.bits", "output.bits_saturated"}) {
      if (!has(c, name)) continue;
      const Overflow overflow = std::string(name) == "output.bits" ? Overflow::nonsaturating : Overflow::saturating;
      Tensor t{.dtype = format_dtype(f), .shape = {static_cast<std::int64_t>(xs.size())}};
      const std::size_t w = dtype_size(t.dtype);
      for (double x : xs) {
        const std::uint32_t bits = encode(static_cast<float>(x), f, overflow);
        for (std::size_t byte = 0; byte < w; ++byte) t.data.push_back((bits >> (8 * byte)) & 0xFF);
      }
      p[name] = std::move(t);
    }
  } else {
    const Tensor& bits = tensor(c, "input.bits");
    const std::size_t w = dtype_size(bits.dtype);
    std::vector<float> values;
    for (std::int64_t i = 0; i < bits.numel(); ++i) {
      std::uint32_t b = 0;
      for (std::size_t byte = 0; byte < w; ++byte) b |= std::uint32_t{bits.data[i * w + byte]} << (8 * byte);
      values.push_back(decode(b, f));
    }
    Tensor t{.dtype = DType::f32, .shape = {bits.numel()}};
    t.data.resize(values.size() * 4);
    std::memcpy(t.data.data(), values.data(), t.data.size());
    p["output.values"] = std::move(t);
  }
  return p;
}

Produced run_loss(const Case& c) {
  const std::string loss = config_value<std::string>(c, "loss"), input = config_value<std::string>(c, "input");
  const double alpha = config_value<double>(c, "alpha");
  const Matrix x = matrix(c, input);
  const Matrix ids_f = matrix(c, "input.ids");
  const IndexMatrix ids = ids_f.cast<std::int32_t>();
  Matrix grad;
  const float value = loss_forward_backward(grad, loss, x, ids, alpha, c.config);
  return {{"output.loss", scalar_tensor(value)}, {"grad." + input.substr(6), f64(grad)}};
}

Produced run_balancing(const Case& c) {
  BiasBalancerT<float> b{.bias = vector(c, "input.bias"), .gamma = config_value<double>(c, "gamma")};
  b.update(ints64(c, "input.load"));
  return {{"output.bias", f64_vector(b.bias)}};
}

Produced run_capacity(const Case& c) {
  const CapacityConfig cc = capacity_config_from_json(c.config.at("capacity"), "config.capacity");
  const Index E = config_value<Index>(c, "num_experts");
  const IndexMatrix ids = matrix(c, "input.ids").cast<std::int32_t>();
  IndexMatrix keep;
  std::vector<std::int64_t> dropped;
  capacity_forward(keep, dropped, ids, matrix(c, "input.gates"), E, cc);
  const std::int64_t capacity = expert_capacity(ids.rows(), static_cast<int>(ids.cols()), E, cc);
  return {{"output.capacity", i64({capacity})}, {"output.keep", tensor_from(keep)}, {"output.dropped", i64(dropped)}};
}

Produced run_dispatch(const Case& c) {
  Dispatch plan;
  dispatch_plan(plan, matrix(c, "input.ids").cast<std::int32_t>(), matrix(c, "input.keep").cast<std::int32_t>(),
                config_value<Index>(c, "num_experts"));
  Matrix permuted, dx;
  permute_forward(permuted, matrix(c, "input.x"), plan);
  permute_backward(dx, matrix(c, "input.dpermuted"), plan);
  return {{"output.counts", i64(plan.counts)},
          {"output.offsets", i64(plan.offsets)},
          {"output.row_token", i32(plan.row_token)},
          {"output.permuted", f64(permuted)},
          {"grad.x", f64(dx)}};
}

Produced run_combine(const Case& c) {
  const std::vector<std::int32_t> row_token = ints32(c, "input.row_token");
  const VectorT<float> weight = vector(c, "input.row_weight");
  const Matrix expert_out = matrix(c, "input.expert_out");
  Matrix y, dexpert_out;
  VectorT<float> dweight;
  combine_forward(y, expert_out, weight, row_token, config_value<Index>(c, "tokens"));
  combine_backward(dexpert_out, dweight, matrix(c, "input.dy"), expert_out, weight, row_token);
  return {{"output.y", f64(y)}, {"grad.expert_out", f64(dexpert_out)}, {"grad.row_weight", f64_vector(dweight)}};
}

Produced run_experts(const Case& c) {
  const ExpertConfig ec = expert_config_from_json(c.config, "config");
  const ExpertParamsT<float> params = get_expert_params(c.file, "param.expert", ec);
  const Matrix x = matrix(c, "input.x");
  Matrix y;
  ExpertCacheT<float> cache;
  expert_forward(y, cache, x, params, ec);
  Produced p{{"output.y", f64(y)}};
  if (has(c, "input.dy")) {
    Matrix dx;
    ExpertParamsT<float> g;
    expert_backward(dx, g, matrix(c, "input.dy"), cache, x, params, ec);
    p["grad.x"] = f64(dx);
    put_expert_grads(p, "grad.expert", g);
  }
  return p;
}

Produced run_shared_gate(const Case& c) {
  const Matrix x = matrix(c, "input.x"), w = matrix(c, "param.shared_gate"), s = matrix(c, "input.shared_out");
  Matrix y, dx, dw, ds;
  VectorT<float> gate;
  shared_gate_forward(y, gate, x, w, s);
  shared_gate_backward(dx, dw, ds, matrix(c, "input.dy"), gate, x, w, s);
  return {{"output.y", f64(y)},
          {"output.gate", f64_vector(gate)},
          {"grad.x", f64(dx)},
          {"grad.shared_gate", f64(dw)},
          {"grad.shared_out", f64(ds)}};
}

}  // namespace

Produced run_cpu(const Case& c) {
  if (c.component == "routing") return run_routing(c);
  if (c.component == "layer") return run_layer(c);
  if (c.component == "numerics") return run_numerics(c);
  if (c.component == "losses") return run_loss(c);
  if (c.component == "balancing") return run_balancing(c);
  if (c.component == "capacity") return run_capacity(c);
  if (c.component == "dispatch") return run_dispatch(c);
  if (c.component == "combine") return run_combine(c);
  if (c.component == "experts") return run_experts(c);
  if (c.component == "shared_experts") return run_shared_gate(c);
  throw NotSupported("component " + c.component);
}

}  // namespace moelab::golden
