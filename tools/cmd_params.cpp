// `moelab params`: parameters, FLOPs and weight memory of a preset's full-size model, part by part,
// against the publisher's figures; and why "37B active" does not mean "fits on a small GPU".
//
//   moelab params --preset deepseek_v3 [--context 4096] [--json]
#include <fmt/format.h>

#include <string>
#include <vector>

#include "reference/accounting.h"
#include "reference/error.h"
#include "tools/commands.h"

namespace moelab::tools {
namespace {

using json = nlohmann::ordered_json;

constexpr double kCardBytes = 24e9;  // a 24 GB consumer GPU

struct ParamsOptions {
  std::string preset;
  std::int64_t context = 4096;
  bool json = false;
};

// 671026419200 -> "671,026,419,200"
std::string grouped(std::int64_t n) {
  std::string digits = std::to_string(n < 0 ? -n : n), out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return n < 0 ? "-" + out : out;
}

// 671026419200 -> "671.03B"
std::string short_count(double n) {
  if (n >= 1e12) return fmt::format("{:.2f}T", n / 1e12);
  if (n >= 1e9) return fmt::format("{:.2f}B", n / 1e9);
  if (n >= 1e6) return fmt::format("{:.2f}M", n / 1e6);
  if (n >= 1e3) return fmt::format("{:.2f}K", n / 1e3);
  return fmt::format("{:g}", n);
}

// 671e9 -> "671B", 116.83e9 -> "116.83B": a published figure as it was published.
std::string as_published(double n) { return fmt::format("{:g}B", n / 1e9); }

std::string gb(std::int64_t bytes) { return fmt::format("{:.1f} GB", static_cast<double>(bytes) / 1e9); }

std::string percent(std::int64_t part, std::int64_t whole) {
  return whole > 0 ? fmt::format("{:.2f}%", 100.0 * static_cast<double>(part) / static_cast<double>(whole)) : "-";
}

std::string signed_percent(double ours, double published) {
  return fmt::format("{:+.2f}%", 100.0 * (ours - published) / published);
}

struct Row {
  const char* name;
  const Part* part;
  std::string how;
};

std::vector<Row> rows(const ModelSizes& m, const Accounting& a) {
  const std::int64_t blocks = m.num_layers + 2 * m.num_decoder_layers;
  std::string attention = fmt::format("{} x {} ({})", blocks, grouped(a.attention_per_layer), attention_kind_name(m.attention));
  if (m.num_decoder_layers > 0) attention = fmt::format("{} self + {} cross blocks x {} + relative position biases",
                                                        m.num_layers + m.num_decoder_layers, m.num_decoder_layers,
                                                        grouped(a.attention_per_layer));
  return {
      {"embedding", &a.embedding,
       fmt::format("{} x {}{}", m.vocab_size, m.hidden_size,
                   m.tie_word_embeddings ? ", also the output head (tied)" : "; a lookup, so not active")},
      {"attention", &a.attention, attention},
      {"dense FFN", &a.dense_ffn, fmt::format("{} x {}", a.dense_ffn_layers, grouped(a.dense_ffn_per_layer))},
      {"routed experts", &a.routed_experts,
       fmt::format("{} x {} x {}; active {} x {}", a.moe_layers, m.n_routed_experts, grouped(a.expert_params),
                   a.moe_layers, m.top_k)},
      {"shared experts", &a.shared_experts,
       fmt::format("{} x {} x {}", a.moe_layers, m.n_shared_experts, grouped(a.shared_expert_params))},
      {"routers", &a.routers,
       fmt::format("{} x {}{}", a.moe_layers, grouped(a.router_per_layer), m.router_bias ? " (with bias)" : "")},
      {"norms", &a.norms, "RMSNorm weights"},
      {"lm_head", &a.lm_head, m.tie_word_embeddings ? "tied to the embedding" : fmt::format("{} x {}", m.hidden_size, m.vocab_size)},
  };
}

// Why the weights do (not) fit a 24 GB card: every expert must be resident, not only the active ones.
std::string memory_sentence(const ModelSizes& m, const Accounting& a) {
  const double total = static_cast<double>(a.total_params);
  if (static_cast<double>(a.bytes_bf16) <= kCardBytes)
    return fmt::format("{} parameters take {} in bf16: the weights fit a 24 GB card (the KV cache and activations "
                       "come on top).", short_count(total), gb(a.bytes_bf16));
  if (static_cast<double>(a.bytes_fp8) <= kCardBytes)
    return fmt::format("{} parameters take {} in fp8: the weights fit a 24 GB card in fp8, not in bf16 ({}).",
                       short_count(total), gb(a.bytes_fp8), gb(a.bytes_bf16));
  const std::string s = fmt::format(
      "A 24 GB card cannot hold {} in bf16 or fp8 even though only {} parameters are active per token{}: the router "
      "may send the next token to any of the {} experts of each of the {} MoE layers, so all {} parameters must be "
      "in memory (or be streamed in for every token). {} x 1 byte (fp8) = {}; ",
      m.model, short_count(static_cast<double>(a.active_params)),
      m.published.active_params > 0 ? fmt::format(" ({} as published)", as_published(m.published.active_params)) : "",
      m.n_routed_experts, a.moe_layers, short_count(total),
      short_count(total), gb(a.bytes_fp8));
  if (static_cast<double>(a.bytes_int4_scaled) <= kCardBytes)
    return s + fmt::format("in int4 it is {} ({} with scales) and fits, with little room left for the KV cache.",
                           gb(a.bytes_int4), gb(a.bytes_int4_scaled));
  if (static_cast<double>(a.bytes_int4) <= kCardBytes)
    return s + fmt::format("in int4 it is {} before its scales and {} with one 8-bit scale per 32 weights: just over "
                           "the card, before any KV cache.", gb(a.bytes_int4), gb(a.bytes_int4_scaled));
  return s + fmt::format("even int4 is ~{}, {:.1f}x the card.", gb(a.bytes_int4),
                         static_cast<double>(a.bytes_int4) / kCardBytes);
}

json part_json(const Part& p) { return {{"total", p.total}, {"active", p.active}}; }

json sizes_json(const ModelSizes& m) {
  return {{"vocab_size", m.vocab_size},
          {"hidden_size", m.hidden_size},
          {"tie_word_embeddings", m.tie_word_embeddings},
          {"num_layers", m.num_layers},
          {"num_decoder_layers", m.num_decoder_layers},
          {"num_dense_layers", m.num_dense_layers},
          {"moe_layer_step", m.moe_layer_step},
          {"moe_layer_offset", m.moe_layer_offset},
          {"intermediate_size", m.intermediate_size},
          {"dense_gated", m.dense_gated},
          {"n_routed_experts", m.n_routed_experts},
          {"n_shared_experts", m.n_shared_experts},
          {"top_k", m.top_k},
          {"moe_intermediate_size", m.moe_intermediate_size},
          {"shared_intermediate_size", m.shared_intermediate_size},
          {"expert_gated", m.expert_gated},
          {"expert_bias", m.expert_bias},
          {"router_bias", m.router_bias},
          {"shared_expert_gate", m.shared_expert_gate},
          {"attention", attention_kind_name(m.attention)},
          {"num_heads", m.num_heads},
          {"num_kv_heads", m.num_kv_heads},
          {"head_dim", m.head_dim},
          {"qkv_bias", m.qkv_bias},
          {"o_bias", m.o_bias},
          {"attention_sinks", m.attention_sinks},
          {"qk_norm", qk_norm_name(m.qk_norm)},
          {"relative_attention_buckets", m.relative_attention_buckets},
          {"q_lora_rank", m.q_lora_rank},
          {"kv_lora_rank", m.kv_lora_rank},
          {"qk_nope_head_dim", m.qk_nope_head_dim},
          {"qk_rope_head_dim", m.qk_rope_head_dim},
          {"v_head_dim", m.v_head_dim},
          {"local_attention_layers", m.local_attention_layers},
          {"local_attention_window", m.local_attention_window},
          {"num_nextn_predict_layers", m.num_nextn_predict_layers}};
}

void print_params(const ParamsOptions& o) {
  const ModelSizes m = model_sizes(o.preset);
  require(o.context >= 1, "--context", o.context, "must be at least 1");
  const Accounting a = account(m, o.context);
  const PublishedCounts& pub = m.published;
  const double pub_active_ours = static_cast<double>(pub.active_counts_embedding ? a.active_params_with_embedding
                                                                                 : a.active_params);
  if (o.json) {
    json doc = {{"command", "params"}, {"preset", m.preset}, {"model", m.model}, {"source", m.source},
                {"notes", m.notes},    {"sizes", sizes_json(m)}};
    doc["layers"] = {{"moe", a.moe_layers}, {"dense_ffn", a.dense_ffn_layers}};
    doc["per_unit"] = {{"attention_per_layer", a.attention_per_layer},
                       {"dense_ffn_per_layer", a.dense_ffn_per_layer},
                       {"expert_params", a.expert_params},
                       {"shared_expert_params", a.shared_expert_params},
                       {"router_per_layer", a.router_per_layer}};
    doc["parts"] = {{"embedding", part_json(a.embedding)},       {"lm_head", part_json(a.lm_head)},
                    {"attention", part_json(a.attention)},       {"dense_ffn", part_json(a.dense_ffn)},
                    {"routed_experts", part_json(a.routed_experts)}, {"shared_experts", part_json(a.shared_experts)},
                    {"routers", part_json(a.routers)},           {"norms", part_json(a.norms)}};
    doc["total_params"] = a.total_params;
    doc["active_params"] = a.active_params;
    doc["active_params_with_embedding"] = a.active_params_with_embedding;
    doc["mtp"] = {{"num_nextn_predict_layers", m.num_nextn_predict_layers},
                  {"params", a.mtp_params},
                  {"stored_copies", a.mtp_stored_copies},
                  {"checkpoint_params", a.total_params + a.mtp_params + a.mtp_stored_copies}};
    json published = nullptr;
    if (pub.total_params > 0)
      published = {{"total_params", json_number(pub.total_params)},
                   {"active_params", json_number(pub.active_params)},
                   {"active_counts_embedding", pub.active_counts_embedding},
                   {"source", pub.source},
                   {"total_rel_diff", json_number((static_cast<double>(a.total_params) - pub.total_params) / pub.total_params)},
                   {"active_rel_diff", json_number((pub_active_ours - pub.active_params) / pub.active_params)}};
    doc["published"] = published;
    doc["flops"] = {{"per_token", a.flops_per_token},
                    {"context_length", a.context_length},
                    {"attention_per_token", a.attention_flops_per_token},
                    {"note", "forward, 2 per multiply-add; per_token: products with the weights; attention_per_token: "
                             "q k^T and p v against context_length keys (a window in local-attention layers)"}};
    doc["memory_bytes"] = {{"bf16", a.bytes_bf16},
                           {"fp8", a.bytes_fp8},
                           {"int4", a.bytes_int4},
                           {"int4_with_scales", a.bytes_int4_scaled},
                           {"note", "all total_params in one format; int4_with_scales adds one 8-bit scale per 32 "
                                    "weights (MXFP4, 4.25 bits per weight)"}};
    doc["fits_24gb"] = {{"bf16", static_cast<double>(a.bytes_bf16) <= kCardBytes},
                        {"fp8", static_cast<double>(a.bytes_fp8) <= kCardBytes},
                        {"int4_with_scales", static_cast<double>(a.bytes_int4_scaled) <= kCardBytes}};
    doc["explanation"] = memory_sentence(m, a);
    fmt::print("{}\n", doc.dump(2));
    return;
  }

  fmt::print("{}: {}\n  {}\n  source: {}\n\n", m.preset, m.model, m.notes, m.source);
  fmt::print("{:<15} {:>17} {:>8} {:>17}  {}\n", "part", "params", "share", "active", "how");
  for (const Row& r : rows(m, a)) {
    if (r.part->total == 0) continue;
    fmt::print("{:<15} {:>17} {:>8} {:>17}  {}\n", r.name, grouped(r.part->total), percent(r.part->total, a.total_params),
               grouped(r.part->active), r.how);
  }
  fmt::print("{:<15} {:>17} {:>8} {:>17}  = {} total, {} active ({} of the total)\n\n", "total", grouped(a.total_params),
             "100.00%", grouped(a.active_params), short_count(static_cast<double>(a.total_params)),
             short_count(static_cast<double>(a.active_params)), percent(a.active_params, a.total_params));
  const bool notes = (!m.tie_word_embeddings && a.embedding.total > 0) || pub.total_params > 0 || a.mtp_params > 0;
  if (!m.tie_word_embeddings && a.embedding.total > 0)
    fmt::print("active with the embedding table (the convention of Mixtral, Qwen, OLMoE, Llama 4): {}\n",
               short_count(static_cast<double>(a.active_params_with_embedding)));
  if (pub.total_params > 0)
    fmt::print("published: {} total, {} active ({}): counted here {} ({}) and {} ({})\n  {}\n",
               as_published(pub.total_params), as_published(pub.active_params),
               pub.active_counts_embedding ? "with the embedding table" : "without the embedding table",
               short_count(static_cast<double>(a.total_params)),
               signed_percent(static_cast<double>(a.total_params), pub.total_params), short_count(pub_active_ours),
               signed_percent(pub_active_ours, pub.active_params), pub.source);
  if (a.mtp_params > 0)
    fmt::print("not in the total: the multi-token prediction module (num_nextn_predict_layers = {}), {} of its own "
               "plus {} of copies of the embedding and head: {} in the checkpoint\n",
               m.num_nextn_predict_layers, short_count(static_cast<double>(a.mtp_params)),
               short_count(static_cast<double>(a.mtp_stored_copies)),
               short_count(static_cast<double>(a.total_params + a.mtp_params + a.mtp_stored_copies)));
  fmt::print("{}forward FLOPs per token (2 per multiply-add): {:.2f} GFLOP in products with the weights",
             notes ? "\n" : "", static_cast<double>(a.flops_per_token) / 1e9);
  if (m.attention != AttentionKind::none)
    fmt::print(", + {:.2f} GFLOP for attention scores and context at {} tokens of context",
               static_cast<double>(a.attention_flops_per_token) / 1e9, a.context_length);
  fmt::print("\n");
  fmt::print("\nweights in memory: bf16 {}, fp8 {}, int4 {} ({} with one 8-bit scale per 32 weights)\n",
             gb(a.bytes_bf16), gb(a.bytes_fp8), gb(a.bytes_int4), gb(a.bytes_int4_scaled));
  fmt::print("{}\n", memory_sentence(m, a));
}

}  // namespace

void add_params_command(CLI::App& app) {
  auto o = std::make_shared<ParamsOptions>();
  CLI::App* cmd = app.add_subcommand("params", "Parameters, FLOPs and weight memory of a preset's full-size model");
  cmd->add_option("--preset", o->preset, "a preset name (see moelab presets)")->required();
  cmd->add_option("--context", o->context, "context length for the attention FLOPs (default 4096)");
  cmd->add_flag("--json", o->json, "print one JSON document instead of tables");
  cmd->callback([o] { print_params(*o); });
}

}  // namespace moelab::tools
