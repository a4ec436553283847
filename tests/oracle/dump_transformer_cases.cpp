// moelab/tests/oracle/dump_transformer_cases.cpp — cases of the dense transformer pieces and the
// optimiser for the independent PyTorch oracle (transformer_oracle.py).
//
//   moelab_dump_transformer_cases OUT_DIR
//
// Writes OUT_DIR/<name>.json, one file per case, and OUT_DIR/manifest.json listing them. Three
// kinds of case ("component"):
//   attention  causal multi-head self-attention with RoPE (reference/transformer.h) in double:
//              x, the four projections, dy; moelab's y, q and k after RoPE, v, the probabilities
//              and the gradients of sum(dy * y) with respect to x and every projection.
//   block      one pre-norm block of the model in double: ids -> embed_tokens -> h = x +
//              attention(input_layernorm(x)) -> norm -> lm_head -> cross-entropy with the targets;
//              moelab's logits, loss and the gradient of the loss with respect to every parameter.
//   adamw      a few training steps in float32 (reference/optim.h): the learning-rate schedule,
//              clip_grad_norm and AdamW on a weight matrix (decayed) and a vector (not decayed),
//              given each step's gradients; moelab's lr, norm, clipped gradients and parameters
//              after every step, and the final moments.
// Everything the oracle needs to recompute a case is in its file; seeds are written too, and the
// same build writes the same bytes.
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "reference/optim.h"
#include "reference/random.h"
#include "reference/recorder.h"
#include "reference/transformer.h"
#include "tests/oracle/case_writer.h"
#include "tests/testing.h"

namespace moelab {
namespace {

using Json = nlohmann::ordered_json;
using moelab::testing::random_matrix;
using VectorD = VectorT<double>;

AttentionParamsT<double> random_attention(Rng& rng, Index C, double sigma) {
  return {.q_proj = random_matrix(rng, C, C, sigma), .k_proj = random_matrix(rng, C, C, sigma),
          .v_proj = random_matrix(rng, C, C, sigma), .o_proj = random_matrix(rng, C, C, sigma)};
}

std::vector<std::int32_t> random_ids(Rng& rng, Index n, Index vocab_size) {
  std::vector<std::int32_t> ids(static_cast<std::size_t>(n));
  for (std::int32_t& id : ids) id = static_cast<std::int32_t>(rng.next_u64() % static_cast<std::uint64_t>(vocab_size));
  return ids;
}

// ---- attention -------------------------------------------------------------------------------------

struct AttentionCase {
  std::string name;
  Index B = 1, T = 1, C = 2, H = 1;  // batch, sequence length, hidden size, heads
  double theta = 10000.0;
  double weight_std = 0.5;
  std::uint64_t seed = 0;
  std::string description;
};

Json run_attention(const AttentionCase& c) {
  const AttentionConfig config{.hidden_size = c.C, .n_heads = c.H, .n_kv_heads = 0, .rope_theta = c.theta};
  Rng rng(c.seed);
  const AttentionParamsT<double> params = random_attention(rng, c.C, c.weight_std);
  const MatrixD x = random_matrix(rng, c.B * c.T, c.C);
  const MatrixD dy = random_matrix(rng, c.B * c.T, c.C);
  MatrixD y;
  AttentionCacheT<double> cache;
  attention_forward(y, cache, x, params, config, c.B, c.T);
  MatrixD dx;
  AttentionParamsT<double> grads;
  attention_backward(dx, grads, dy, cache, x, params, config, c.B, c.T);

  Json j;
  j["component"] = "attention";
  j["description"] = c.description;
  j["seed"] = c.seed;
  j["config"] = {
      {"batch_size", c.B}, {"seq_len", c.T}, {"hidden_size", c.C}, {"n_heads", c.H}, {"rope_theta", c.theta}};
  j["x"] = json_rows(x);
  j["q_proj"] = json_rows(params.q_proj);
  j["k_proj"] = json_rows(params.k_proj);
  j["v_proj"] = json_rows(params.v_proj);
  j["o_proj"] = json_rows(params.o_proj);
  j["dy"] = json_rows(dy);
  j["y"] = json_rows(y);
  j["q"] = json_rows(cache.q);
  j["k"] = json_rows(cache.k);
  j["v"] = json_rows(cache.v);
  j["probs"] = json_rows(cache.probs);
  j["dx"] = json_rows(dx);
  j["d_q_proj"] = json_rows(grads.q_proj);
  j["d_k_proj"] = json_rows(grads.k_proj);
  j["d_v_proj"] = json_rows(grads.v_proj);
  j["d_o_proj"] = json_rows(grads.o_proj);
  return j;
}

// ---- one pre-norm block ---------------------------------------------------------------------------

struct BlockCase {
  std::string name;
  Index B = 1, T = 1, C = 2, H = 1, V = 2;
  double theta = 10000.0;
  double eps = 1e-5;
  std::uint64_t seed = 0;
  std::string description;
};

Json run_block(const BlockCase& c) {
  const AttentionConfig config{.hidden_size = c.C, .n_heads = c.H, .n_kv_heads = 0, .rope_theta = c.theta};
  const RMSNormConfig norm{.eps = c.eps};
  Rng rng(c.seed);
  const MatrixD wte = random_matrix(rng, c.V, c.C);
  const VectorD norm1 = (random_matrix(rng, c.C, 1, 0.5).array() + 1.0).matrix();
  const AttentionParamsT<double> attention = random_attention(rng, c.C, 0.5);
  const VectorD norm2 = (random_matrix(rng, c.C, 1, 0.5).array() + 1.0).matrix();
  const MatrixD lm_head = random_matrix(rng, c.V, c.C, 0.5);
  const std::vector<std::int32_t> ids = random_ids(rng, c.B * c.T, c.V);
  const std::vector<std::int32_t> targets = random_ids(rng, c.B * c.T, c.V);

  MatrixD x;
  embedding_forward(x, ids, wte);
  MatrixD n1;
  RMSNormCacheT<double> n1_cache;
  rmsnorm_forward(n1, n1_cache, x, norm1, norm);
  MatrixD a;
  AttentionCacheT<double> a_cache;
  attention_forward(a, a_cache, n1, attention, config, c.B, c.T);
  const MatrixD h = x + a;
  MatrixD n2;
  RMSNormCacheT<double> n2_cache;
  rmsnorm_forward(n2, n2_cache, h, norm2, norm);
  MatrixD logits;
  linear_forward(logits, n2, lm_head);
  const double loss = cross_entropy_forward(logits, targets);

  MatrixD dlogits;
  cross_entropy_backward(dlogits, logits, targets);
  MatrixD dn2;
  MatrixD d_lm_head;
  linear_backward(dn2, d_lm_head, dlogits, n2, lm_head);
  MatrixD dh;
  VectorD d_norm2;
  rmsnorm_backward(dh, d_norm2, dn2, n2_cache, h, norm2);
  MatrixD dn1;
  AttentionParamsT<double> d_attention;
  attention_backward(dn1, d_attention, dh, a_cache, n1, attention, config, c.B, c.T);
  MatrixD dx;
  VectorD d_norm1;
  rmsnorm_backward(dx, d_norm1, dn1, n1_cache, x, norm1);
  dx += dh;
  MatrixD d_wte;
  embedding_backward(d_wte, dx, ids, c.V);

  Json j;
  j["component"] = "block";
  j["description"] = c.description;
  j["seed"] = c.seed;
  j["config"] = {{"batch_size", c.B}, {"seq_len", c.T},      {"hidden_size", c.C},  {"n_heads", c.H},
                 {"vocab_size", c.V}, {"rope_theta", c.theta}, {"rms_norm_eps", c.eps}};
  j["ids"] = ids;
  j["targets"] = targets;
  j["embed_tokens"] = json_rows(wte);
  j["input_layernorm"] = json_list(norm1);
  j["q_proj"] = json_rows(attention.q_proj);
  j["k_proj"] = json_rows(attention.k_proj);
  j["v_proj"] = json_rows(attention.v_proj);
  j["o_proj"] = json_rows(attention.o_proj);
  j["norm"] = json_list(norm2);
  j["lm_head"] = json_rows(lm_head);
  j["logits"] = json_rows(logits);
  j["loss"] = json_number(loss);
  j["d_embed_tokens"] = json_rows(d_wte);
  j["d_input_layernorm"] = json_list(d_norm1);
  j["d_q_proj"] = json_rows(d_attention.q_proj);
  j["d_k_proj"] = json_rows(d_attention.k_proj);
  j["d_v_proj"] = json_rows(d_attention.v_proj);
  j["d_o_proj"] = json_rows(d_attention.o_proj);
  j["d_norm"] = json_list(d_norm2);
  j["d_lm_head"] = json_rows(d_lm_head);
  return j;
}

// ---- AdamW, schedule and clipping -----------------------------------------------------------------

struct AdamWCase {
  std::string name;
  AdamWConfig adamw;
  LrScheduleConfig schedule;
  double max_norm = 1.0;
  std::vector<double> grad_std;  // one entry per step: the std of that step's gradients
  std::uint64_t seed = 0;
  std::string description;
};

Json run_adamw(const AdamWCase& c) {
  Rng rng(c.seed);
  MatrixT<float> w = random_matrix<float>(rng, 4, 5);
  VectorT<float> b = random_matrix<float>(rng, 5, 1).col(0);
  MatrixT<float> dw;
  VectorT<float> db;
  Json j;
  j["component"] = "adamw";
  j["description"] = c.description;
  j["seed"] = c.seed;
  j["config"] = {{"lr", c.adamw.lr},
                 {"beta1", c.adamw.beta1},
                 {"beta2", c.adamw.beta2},
                 {"eps", c.adamw.eps},
                 {"weight_decay", c.adamw.weight_decay},
                 {"schedule_lr", c.schedule.lr},
                 {"min_lr", c.schedule.min_lr},
                 {"warmup_steps", c.schedule.warmup_steps},
                 {"total_steps", c.schedule.total_steps},
                 {"max_norm", c.max_norm}};
  j["w"] = json_rows(w);  // the initial values; w is decayed, b is not
  j["b"] = json_list(b);
  AdamW adamw({ParamRef("w", w, dw, true), ParamRef("b", b, db, false)}, c.adamw);
  Json steps = Json::array();
  for (std::size_t s = 0; s < c.grad_std.size(); ++s) {
    dw = random_matrix<float>(rng, 4, 5, c.grad_std[s]);
    db = random_matrix<float>(rng, 5, 1, c.grad_std[s]).col(0);
    Json step;
    step["grad_w"] = json_rows(dw);
    step["grad_b"] = json_list(db);
    const double lr = learning_rate(c.schedule, static_cast<std::int64_t>(s));
    const double total_norm = clip_grad_norm(adamw.params(), c.max_norm);
    adamw.step(lr);
    step["lr"] = json_number(lr);
    step["total_norm"] = json_number(total_norm);
    step["clipped_w"] = json_rows(dw);
    step["clipped_b"] = json_list(db);
    step["w"] = json_rows(w);
    step["b"] = json_list(b);
    steps.push_back(step);
  }
  j["steps"] = steps;
  const auto as_json = [](const std::vector<float>& v) {
    Json list = Json::array();
    for (const float f : v) list.push_back(json_number(static_cast<double>(f)));
    return list;
  };
  j["exp_avg_w"] = as_json(adamw.state()[0].exp_avg);
  j["exp_avg_sq_w"] = as_json(adamw.state()[0].exp_avg_sq);
  j["exp_avg_b"] = as_json(adamw.state()[1].exp_avg);
  j["exp_avg_sq_b"] = as_json(adamw.state()[1].exp_avg_sq);
  j["step_count"] = adamw.state()[0].step;
  return j;
}

std::vector<oracle::NamedCase> named_cases() {
  std::vector<oracle::NamedCase> cases;
  const std::vector<AttentionCase> attention = {
      {.name = "attention.small", .B = 2, .T = 5, .C = 8, .H = 2, .theta = 10000.0, .weight_std = 0.5, .seed = 101,
       .description = "B = 2, T = 5, C = 8, 2 heads of D = 4, theta 10000"},
      {.name = "attention.wide", .B = 3, .T = 9, .C = 24, .H = 3, .theta = 500000.0, .weight_std = 0.3, .seed = 102,
       .description = "B = 3, T = 9, C = 24, 3 heads of D = 8, theta 500000 (Llama 3)"},
      {.name = "attention.sharp", .B = 1, .T = 12, .C = 16, .H = 4, .theta = 100.0, .weight_std = 1.5, .seed = 103,
       .description = "scores of order 100 (nearly one-hot softmax), theta 100 (fast rotations)"},
      {.name = "attention.one_token", .B = 4, .T = 1, .C = 8, .H = 1, .theta = 10000.0, .weight_std = 0.5, .seed = 104,
       .description = "T = 1: y = (x Wv^T) Wo^T"},
  };
  for (const AttentionCase& c : attention) cases.push_back({c.name, [c] { return run_attention(c); }});

  const std::vector<BlockCase> blocks = {
      {.name = "block.small", .B = 2, .T = 6, .C = 16, .H = 2, .V = 13, .theta = 10000.0, .eps = 1e-6, .seed = 201,
       .description = "embed -> input_layernorm -> attention + residual -> norm -> lm_head -> cross-entropy"},
      {.name = "block.bytes", .B = 2, .T = 8, .C = 16, .H = 4, .V = 256, .theta = 10000.0, .eps = 1e-5, .seed = 202,
       .description = "the same with the byte vocabulary (V = 256) and 4 heads of D = 4"},
  };
  for (const BlockCase& c : blocks) cases.push_back({c.name, [c] { return run_block(c); }});

  const std::vector<AdamWCase> adamw = {
      {.name = "adamw.schedule_clip",
       .adamw = {.lr = 1e-2, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1},
       .schedule = {.lr = 1e-2, .min_lr = 1e-3, .warmup_steps = 3, .total_steps = 8},
       .max_norm = 1.0,
       .grad_std = {0.1, 0.1, 2.0, 0.1, 0.01, 3.0, 0.1, 0.1},
       .seed = 301,
       .description = "8 steps: warm-up 3, cosine to 1e-3; steps 2 and 5 clipped (gradient norm ~9 and ~13)"},
      {.name = "adamw.torch_defaults",
       .adamw = {},
       .schedule = {.lr = 1e-3, .min_lr = 1e-3, .warmup_steps = 0, .total_steps = 5},
       .max_norm = 1e9,
       .grad_std = {1.0, 0.5, 1e-3, 1.0, 1e-4},
       .seed = 302,
       .description = "torch.optim.AdamW's defaults, constant lr 1e-3, no clipping; tiny gradients at steps 2, 4"},
  };
  for (const AdamWCase& c : adamw) cases.push_back({c.name, [c] { return run_adamw(c); }});
  return cases;
}

}  // namespace
}  // namespace moelab

int main(int argc, char** argv) {
  return moelab::oracle::dumper_main(argc, argv, "moelab_dump_transformer_cases", moelab::named_cases);
}
