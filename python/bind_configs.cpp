// moelab/python/bind_configs.cpp — configurations as dicts (reference/config_json.h), the presets
// (presets.h), the model and training configurations (model.h, train.h) and the accounting of the
// published models (accounting.h, `moelab params`).
#include <fmt/format.h>

#include "python/bind.h"
#include "reference/accounting.h"
#include "reference/model.h"
#include "reference/presets.h"
#include "reference/train.h"

namespace moelab::python {
namespace {

py::dict preset_layer_dict(const PresetLayer& l) {
  return py::dict("activation"_a = std::string(activation_name(l.activation)),
                  "intermediate_size"_a = l.intermediate_size, "expert_bias"_a = l.expert_bias,
                  "capacity"_a = from_json(to_json(l.capacity)), "shared"_a = from_json(to_json(l.shared)),
                  "gate_placement"_a = std::string(gate_placement_name(l.gate_placement)));
}

// The overrides of preset(), applied to the struct before validation.
void apply_override(LayerConfig& c, const std::string& key, py::handle value) {
  auto get = [&]<typename T>(T*) -> T {
    try {
      return value.cast<T>();
    } catch (const py::cast_error&) {
      fail_arg(key, value, "has the wrong type");
    }
  };
  if (key == "hidden_size") {
    c.routing.router.hidden_size = c.expert.hidden_size = get(static_cast<Index*>(nullptr));
  } else if (key == "num_experts") {
    c.routing.router.num_experts = get(static_cast<Index*>(nullptr));
  } else if (key == "top_k") {
    c.routing.top_k = get(static_cast<int*>(nullptr));
  } else if (key == "intermediate_size") {
    c.expert.intermediate_size = get(static_cast<Index*>(nullptr));
  } else if (key == "activation") {
    c.expert.activation = parse_activation(get(static_cast<std::string*>(nullptr)));
  } else if (key == "dtype") {
    c.routing.router.dtype = parse_format(get(static_cast<std::string*>(nullptr)), "dtype");
  } else if (key == "noise") {
    c.routing.router.noise = parse_router_noise(get(static_cast<std::string*>(nullptr)));
  } else if (key == "capacity_factor") {
    c.capacity.capacity_factor = get(static_cast<double*>(nullptr));
    c.capacity.dropless = false;
  } else if (key == "dropless") {
    c.capacity.dropless = get(static_cast<bool*>(nullptr));
  } else if (key == "aux_loss") {
    c.routing.aux_loss = parse_aux_loss(get(static_cast<std::string*>(nullptr)));
  } else if (key == "aux_loss_coef") {
    c.routing.aux_loss_coef = get(static_cast<double*>(nullptr));
  } else if (key == "z_loss_coef") {
    c.routing.z_loss_coef = get(static_cast<double*>(nullptr));
  } else if (key == "use_selection_bias") {
    c.routing.use_selection_bias = get(static_cast<bool*>(nullptr));
  } else if (key == "shared_count") {
    c.shared.count = get(static_cast<int*>(nullptr));
  } else if (key == "shared_intermediate_size") {
    c.shared.intermediate_size = get(static_cast<Index*>(nullptr));
  } else {
    fail(key, shown(value),
         "is not an override of preset(); known: hidden_size, num_experts, top_k, intermediate_size, activation, "
         "dtype, noise, capacity_factor, dropless, aux_loss, aux_loss_coef, z_loss_coef, use_selection_bias, "
         "shared_count, shared_intermediate_size (or edit the returned dict)");
  }
}

py::dict part_dict(const Part& p) { return py::dict("total"_a = p.total, "active"_a = p.active); }

py::dict sizes_dict(const ModelSizes& m) {
  py::dict d;
  d["preset"] = std::string(m.preset);
  d["model"] = std::string(m.model);
  d["source"] = std::string(m.source);
  d["notes"] = std::string(m.notes);
  d["vocab_size"] = m.vocab_size;
  d["hidden_size"] = m.hidden_size;
  d["tie_word_embeddings"] = m.tie_word_embeddings;
  d["num_layers"] = m.num_layers;
  d["num_decoder_layers"] = m.num_decoder_layers;
  d["num_dense_layers"] = m.num_dense_layers;
  d["moe_layer_step"] = m.moe_layer_step;
  d["moe_layer_offset"] = m.moe_layer_offset;
  d["intermediate_size"] = m.intermediate_size;
  d["dense_gated"] = m.dense_gated;
  d["n_routed_experts"] = m.n_routed_experts;
  d["n_shared_experts"] = m.n_shared_experts;
  d["top_k"] = m.top_k;
  d["moe_intermediate_size"] = m.moe_intermediate_size;
  d["shared_intermediate_size"] = m.shared_intermediate_size;
  d["expert_gated"] = m.expert_gated;
  d["expert_bias"] = m.expert_bias;
  d["router_bias"] = m.router_bias;
  d["shared_expert_gate"] = m.shared_expert_gate;
  d["attention"] = std::string(attention_kind_name(m.attention));
  d["num_heads"] = m.num_heads;
  d["num_kv_heads"] = m.num_kv_heads;
  d["head_dim"] = m.head_dim;
  d["qkv_bias"] = m.qkv_bias;
  d["o_bias"] = m.o_bias;
  d["attention_sinks"] = m.attention_sinks;
  d["qk_norm"] = std::string(qk_norm_name(m.qk_norm));
  d["relative_attention_buckets"] = m.relative_attention_buckets;
  d["q_lora_rank"] = m.q_lora_rank;
  d["kv_lora_rank"] = m.kv_lora_rank;
  d["qk_nope_head_dim"] = m.qk_nope_head_dim;
  d["qk_rope_head_dim"] = m.qk_rope_head_dim;
  d["v_head_dim"] = m.v_head_dim;
  d["local_attention_layers"] = m.local_attention_layers;
  d["local_attention_window"] = m.local_attention_window;
  d["num_nextn_predict_layers"] = m.num_nextn_predict_layers;
  d["published"] = py::dict("total_params"_a = m.published.total_params,
                            "active_params"_a = m.published.active_params,
                            "active_counts_embedding"_a = m.published.active_counts_embedding,
                            "source"_a = std::string(m.published.source));
  return d;
}

py::dict accounting_dict(const Accounting& a) {
  py::dict d;
  d["total_params"] = a.total_params;
  d["active_params"] = a.active_params;
  d["active_params_with_embedding"] = a.active_params_with_embedding;
  d["moe_layers"] = a.moe_layers;
  d["dense_ffn_layers"] = a.dense_ffn_layers;
  d["attention_per_layer"] = a.attention_per_layer;
  d["dense_ffn_per_layer"] = a.dense_ffn_per_layer;
  d["expert_params"] = a.expert_params;
  d["shared_expert_params"] = a.shared_expert_params;
  d["router_per_layer"] = a.router_per_layer;
  d["embedding"] = part_dict(a.embedding);
  d["lm_head"] = part_dict(a.lm_head);
  d["attention"] = part_dict(a.attention);
  d["dense_ffn"] = part_dict(a.dense_ffn);
  d["routed_experts"] = part_dict(a.routed_experts);
  d["shared_experts"] = part_dict(a.shared_experts);
  d["routers"] = part_dict(a.routers);
  d["norms"] = part_dict(a.norms);
  d["mtp_params"] = a.mtp_params;
  d["mtp_stored_copies"] = a.mtp_stored_copies;
  d["flops_per_token"] = a.flops_per_token;
  d["context_length"] = a.context_length;
  d["attention_flops_per_token"] = a.attention_flops_per_token;
  d["bytes_bf16"] = a.bytes_bf16;
  d["bytes_fp8"] = a.bytes_fp8;
  d["bytes_int4"] = a.bytes_int4;
  d["bytes_int4_scaled"] = a.bytes_int4_scaled;
  return d;
}

// A preset name (the published model) or a ModelConfig dict (the tiny language model).
ModelSizes sizes_arg(py::handle model) {
  if (py::isinstance<py::str>(model)) return model_sizes(model.cast<std::string>());
  if (py::isinstance<py::dict>(model)) return model_sizes(model_config_from_json(json_arg(model, "model")));
  fail_arg("model", model, "must be a preset name or a ModelConfig dict");
}

}  // namespace

void bind_configs(py::module_& m) {
  m.def(
      "presets",
      [] {
        std::vector<std::string> names;
        for (const Preset& p : presets()) names.emplace_back(p.name);
        return names;
      },
      "The preset names (presets.h): published MoE routing conventions.");
  m.def(
      "preset_info",
      [](const std::string& name) {
        const Preset& p = find_preset(name);
        return py::dict("name"_a = std::string(p.name), "model"_a = std::string(p.model),
                        "source"_a = std::string(p.source), "convention"_a = std::string(p.convention),
                        "full"_a = from_json(to_json(p.full)), "tiny"_a = from_json(to_json(p.tiny)),
                        "layer"_a = preset_layer_dict(p.layer));
      },
      "name"_a, "A preset's model, source, convention and full and tiny RoutingConfig dicts (moelab presets --json).");
  m.def(
      "preset",
      [](const std::string& name, const std::string& size, py::kwargs overrides) {
        PresetSize s;
        if (size == "tiny") {
          s = PresetSize::tiny;
        } else if (size == "full") {
          s = PresetSize::full;
        } else {
          fail("size", fmt::format("\"{}\"", size), "must be \"tiny\" or \"full\"");
        }
        LayerConfig c = layer_config(find_preset(name), s);
        for (const auto& [key, value] : overrides) apply_override(c, key.cast<std::string>(), value);
        c.validate();
        // Read back as from a dict, so that the dict returned is exactly what the functions accept.
        return from_json(to_json(layer_config_from_json(to_json(c), "layer")));
      },
      "name"_a, "size"_a = "tiny",
      "The LayerConfig dict of a preset, size \"tiny\" (C = 16) or \"full\" (published sizes), with overrides "
      "(hidden_size, num_experts, top_k, intermediate_size, activation, dtype, noise, capacity_factor, dropless, "
      "aux_loss, aux_loss_coef, z_loss_coef, use_selection_bias, shared_count, shared_intermediate_size).");
  m.def(
      "validate_layer_config", [](py::handle config) { return from_json(to_json(layer_config_arg(config))); },
      "config"_a, "The LayerConfig dict read (strictly) and written back; Error naming the field if invalid.");
  m.def(
      "validate_routing_config", [](py::handle config) { return from_json(to_json(routing_config_arg(config))); },
      "config"_a, "The RoutingConfig dict read (strictly) and written back; Error naming the field if invalid.");
  m.def("model_configs", &model_config_names, "The named model configurations: tiny_moe, tiny_dense, every preset.");
  m.def(
      "model_config", [](const std::string& name) { return from_json(to_json(model_config(name))); }, "name"_a,
      "A ModelConfig dict of the tiny language model (model.h).");
  m.def(
      "validate_model_config",
      [](py::handle config) { return from_json(to_json(model_config_from_json(json_arg(config, "config")))); },
      "config"_a, "The ModelConfig dict read (strictly) and written back.");
  m.def(
      "default_train_config", [](const std::string& model) { return from_json(to_json(default_train_config(model))); },
      "model"_a = "tiny_moe", "The TrainConfig dict of train.h's defaults with that model.");
  m.def(
      "validate_train_config",
      [](py::handle config) { return from_json(to_json(train_config_from_json(json_arg(config, "config")))); },
      "config"_a, "The TrainConfig dict read (strictly) and written back.");

  m.def(
      "model_sizes", [](py::handle model) { return sizes_dict(sizes_arg(model)); }, "model"_a,
      "Every field of accounting.h's ModelSizes: a preset name (the published model) or a ModelConfig dict.");
  m.def(
      "account",
      [](py::handle model, std::int64_t context_length) { return accounting_dict(account(sizes_arg(model), context_length)); },
      "model"_a, "context_length"_a = 4096,
      "Parameters (total, active), FLOPs per token and weight memory of a model (accounting.h, moelab params).");
}

}  // namespace moelab::python
