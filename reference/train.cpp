// moelab/reference/train.cpp — see train.h. B = batch, T = sequence length, N = B*T, V = vocabulary,
// E = routed experts, D = domains, M = micro-batches.
#include "reference/train.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <map>
#include <set>
#include <system_error>
#include <thread>
#include <utility>

#include "reference/error.h"
#include "reference/files.h"
#include "reference/safetensors.h"

namespace moelab {

namespace fs = std::filesystem;

static_assert(std::endian::native == std::endian::little, "checkpoints store float32 as little-endian bytes");

// ---- Configuration -----------------------------------------------------------------------------

namespace {

constexpr BalanceMode kBalanceModes[] = {BalanceMode::preset, BalanceMode::aux, BalanceMode::aux_free,
                                         BalanceMode::none};

void no_balance_loss(RoutingConfig& r) {
  r.aux_loss = AuxLoss::none;
  r.aux_loss_coef = 0;
  r.device_loss_coef = 0;
  r.comm_loss_coef = 0;
}

}  // namespace

std::string_view balance_mode_name(BalanceMode mode) {
  switch (mode) {
    case BalanceMode::preset: return "preset";
    case BalanceMode::aux: return "aux";
    case BalanceMode::aux_free: return "aux_free";
    case BalanceMode::none: return "none";
  }
  return "?";
}

BalanceMode parse_balance_mode(std::string_view name) {
  for (BalanceMode m : kBalanceModes)
    if (balance_mode_name(m) == name) return m;
  fail("balance", fmt::format("\"{}\"", name), "must be one of preset, aux, aux_free, none");
}

ModelConfig TrainConfig::model_config() const {
  ModelConfig m = model;
  const std::string_view mode = balance_mode_name(balance);
  if (m.moe_layout == MoeLayout::dense) {
    require(balance == BalanceMode::preset || balance == BalanceMode::none, "balance", mode,
            fmt::format("model {} has no MoE block to balance; use preset or none", model_name));
    require(!z_loss_coef, "z_loss_coef", z_loss_coef.value_or(0),
            fmt::format("model {} has no router (no MoE block)", model_name));
    require(!capacity_factor, "capacity_factor", capacity_factor.value_or(0),
            fmt::format("model {} has no experts (no MoE block)", model_name));
    return m;
  }
  RoutingConfig& r = m.moe.routing;
  switch (balance) {
    case BalanceMode::preset: break;
    case BalanceMode::aux:
      require(r.aux_loss != AuxLoss::none, "balance", mode,
              fmt::format("the router of {} has no balance loss (aux_loss = none); use preset, aux_free or none",
                          model_name));
      r.use_selection_bias = false;
      r.bias_update_rate = 0;
      break;
    case BalanceMode::aux_free:
      require(r.selection == SelectionKind::topk || r.selection == SelectionKind::group_limited, "balance", mode,
              fmt::format("the selection bias needs topk or group_limited selection; {} uses {}", model_name,
                          selection_kind_name(r.selection)));
      no_balance_loss(r);
      r.use_selection_bias = true;
      r.bias_update_rate = bias_update_rate;
      // Top-k of the logits cannot take a bias on the scores: use the equal gating on the scores.
      // softmax over the selected logits = softmax over all, top-k, renormalise (Mixtral's docs);
      // sigmoid of the selected logits = the selected sigmoid scores (Llama 4).
      if (r.gating.kind == GateKind::softmax_of_selected_logits) {
        r.scoring = Scoring::softmax;
        r.gating.kind = GateKind::selected_scores;
        r.gating.renormalize = true;
        r.gating.renorm_eps = 0;
      } else if (r.gating.kind == GateKind::sigmoid_of_selected_logits) {
        r.scoring = Scoring::sigmoid;
        r.gating.kind = GateKind::selected_scores;
        r.gating.renormalize = false;
      }
      break;
    case BalanceMode::none:
      no_balance_loss(r);
      r.use_selection_bias = false;
      r.bias_update_rate = 0;
      break;
  }
  if (z_loss_coef) r.z_loss_coef = *z_loss_coef;
  if (capacity_factor) {
    if (r.expert_choice()) {
      r.capacity_factor = *capacity_factor;
    } else {
      m.moe.capacity.dropless = false;
      m.moe.capacity.capacity_factor = *capacity_factor;
    }
  }
  try {
    m.validate();
  } catch (const Error& e) {
    throw Error(fmt::format("balance = {}: the model it gives is invalid: {}", mode, e.what()));
  }
  return m;
}

LrScheduleConfig TrainConfig::lr_schedule() const {
  return {.lr = adamw.lr, .min_lr = min_lr, .warmup_steps = std::min(warmup_steps, steps), .total_steps = steps};
}

void TrainConfig::validate() const {
  try {
    model.validate();
  } catch (const Error& e) {
    throw Error(fmt::format("model: {}", e.what()));
  }
  require(std::isfinite(bias_update_rate) && bias_update_rate >= 0, "bias_update_rate", bias_update_rate,
          "must be finite and >= 0");
  if (z_loss_coef)
    require(std::isfinite(*z_loss_coef) && *z_loss_coef >= 0, "z_loss_coef", *z_loss_coef, "must be finite and >= 0");
  if (capacity_factor)
    require(std::isfinite(*capacity_factor) && *capacity_factor > 0, "capacity_factor", *capacity_factor,
            "must be finite and > 0");
  model_config();
  require(batch_size >= 1 && batch_size <= (1 << 16), "batch_size", batch_size, "must be in [1, 65536]");
  require(seq_len >= 1 && seq_len <= (1 << 20), "seq_len", seq_len, "must be in [1, 1048576]");
  require(micro_batches >= 1 && micro_batches <= batch_size, "micro_batches", micro_batches,
          fmt::format("must be in [1, batch_size = {}]", batch_size));
  require(batch_size % micro_batches == 0, "batch_size", batch_size,
          fmt::format("must be a multiple of micro_batches = {}", micro_batches));
  require(steps >= 1, "steps", steps, "must be positive");
  require(warmup_steps >= 0, "warmup_steps", warmup_steps, "must be >= 0");
  adamw.validate();
  require(std::isfinite(min_lr) && min_lr >= 0 && min_lr <= adamw.lr, "min_lr", min_lr,
          fmt::format("must be in [0, adamw.lr = {}]", adamw.lr));
  lr_schedule().validate();
  require(std::isfinite(grad_clip) && grad_clip >= 0, "grad_clip", grad_clip, "must be finite and >= 0 (0: no clipping)");
  require(eval_every >= 0, "eval_every", eval_every, "must be >= 0 (0: only after the last step)");
  require(eval_batches >= 1, "eval_batches", eval_batches, "must be positive");
  require(checkpoint_every >= 0, "checkpoint_every", checkpoint_every, "must be >= 0 (0: only after the last step)");
}

TrainConfig default_train_config(std::string_view model_name) {
  TrainConfig c;
  c.model_name = std::string(model_name);
  c.model = model_config(model_name);
  return c;
}

// ---- JSON ------------------------------------------------------------------------------------------

Json to_json(const TrainConfig& c) {
  Json j;
  j["model_name"] = c.model_name;
  j["model"] = to_json(c.model);
  j["balance"] = balance_mode_name(c.balance);
  j["bias_update_rate"] = c.bias_update_rate;
  j["z_loss_coef"] = c.z_loss_coef ? Json(*c.z_loss_coef) : Json(nullptr);
  j["capacity_factor"] = c.capacity_factor ? Json(*c.capacity_factor) : Json(nullptr);
  j["batch_size"] = c.batch_size;
  j["seq_len"] = c.seq_len;
  j["micro_batches"] = c.micro_batches;
  j["steps"] = c.steps;
  j["seed"] = c.seed;
  j["adamw"] = {{"lr", c.adamw.lr},
                {"beta1", c.adamw.beta1},
                {"beta2", c.adamw.beta2},
                {"eps", c.adamw.eps},
                {"weight_decay", c.adamw.weight_decay}};
  j["min_lr"] = c.min_lr;
  j["warmup_steps"] = c.warmup_steps;
  j["grad_clip"] = c.grad_clip;
  j["eval_every"] = c.eval_every;
  j["eval_batches"] = c.eval_batches;
  j["checkpoint_every"] = c.checkpoint_every;
  return j;
}

namespace {

std::string shown(const Json& v) {
  std::string s = v.dump(-1, ' ', false, Json::error_handler_t::replace);
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

// One JSON object read strictly: every key known, every field present and of its type.
class ObjectFields {
 public:
  ObjectFields(const Json& j, std::string path, std::initializer_list<std::string_view> keys) : j_(j), path_(std::move(path)) {
    require(j.is_object(), path_, shown(j), "must be an object");
    for (const auto& [key, value] : j.items()) {
      bool known = false;
      for (std::string_view k : keys) known = known || k == key;
      if (!known) fail(this->path(key), shown(value), "is not a known field");
    }
  }
  std::string path(std::string_view key) const { return path_.empty() ? std::string(key) : path_ + "." + std::string(key); }
  const Json& at(std::string_view key) const {
    const auto it = j_.find(key);
    if (it == j_.end()) fail(path(key), "(missing)", "is required");
    return *it;
  }
  std::int64_t integer(std::string_view key) const {
    const Json& v = at(key);
    require(v.is_number_integer() && (!v.is_number_unsigned() || v.get<std::uint64_t>() <= (std::uint64_t{1} << 62)),
            path(key), shown(v), "must be an integer below 2^62");
    return v.get<std::int64_t>();
  }
  std::uint64_t unsigned_integer(std::string_view key) const {
    const Json& v = at(key);
    require(v.is_number_unsigned() || (v.is_number_integer() && v.get<std::int64_t>() >= 0), path(key), shown(v),
            "must be an integer >= 0");
    return v.get<std::uint64_t>();
  }
  double number(std::string_view key) const {
    const Json& v = at(key);
    require(v.is_number() && std::isfinite(v.get<double>()), path(key), shown(v), "must be a finite number");
    return v.get<double>();
  }
  std::optional<double> optional_number(std::string_view key) const {
    if (at(key).is_null()) return std::nullopt;
    return number(key);
  }
  std::string string(std::string_view key) const {
    const Json& v = at(key);
    require(v.is_string(), path(key), shown(v), "must be a string");
    return v.get<std::string>();
  }
  template <typename Parse>
  auto choice(std::string_view key, Parse parse) const {
    const std::string s = string(key);
    try {
      return parse(s);
    } catch (const Error& e) {
      const std::string what = e.what();
      fail(path(key), shown(at(key)), what.substr(what.find(": ") + 2));
    }
  }

 private:
  const Json& j_;
  std::string path_;
};

}  // namespace

TrainConfig train_config_from_json(const Json& j, std::string_view path) {
  const ObjectFields f(j, std::string(path),
                 {"model_name", "model", "balance", "bias_update_rate", "z_loss_coef", "capacity_factor", "batch_size",
                  "seq_len", "micro_batches", "steps", "seed", "adamw", "min_lr", "warmup_steps", "grad_clip",
                  "eval_every", "eval_batches", "checkpoint_every"});
  TrainConfig c;
  c.model_name = f.string("model_name");
  c.model = model_config_from_json(f.at("model"), f.path("model"));
  c.balance = f.choice("balance", parse_balance_mode);
  c.bias_update_rate = f.number("bias_update_rate");
  c.z_loss_coef = f.optional_number("z_loss_coef");
  c.capacity_factor = f.optional_number("capacity_factor");
  c.batch_size = f.integer("batch_size");
  c.seq_len = f.integer("seq_len");
  c.micro_batches = f.integer("micro_batches");
  c.steps = f.integer("steps");
  c.seed = f.unsigned_integer("seed");
  const ObjectFields a(f.at("adamw"), f.path("adamw"), {"lr", "beta1", "beta2", "eps", "weight_decay"});
  c.adamw = {.lr = a.number("lr"),
             .beta1 = a.number("beta1"),
             .beta2 = a.number("beta2"),
             .eps = a.number("eps"),
             .weight_decay = a.number("weight_decay")};
  c.min_lr = f.number("min_lr");
  c.warmup_steps = f.integer("warmup_steps");
  c.grad_clip = f.number("grad_clip");
  c.eval_every = f.integer("eval_every");
  c.eval_batches = f.integer("eval_batches");
  c.checkpoint_every = f.integer("checkpoint_every");
  try {
    c.validate();
  } catch (const Error& e) {
    throw Error(fmt::format("{}: {}", path, e.what()));
  }
  return c;
}

// ---- Data ------------------------------------------------------------------------------------------

namespace {

// (count_b + 0.5) / (total + V / 2): the Krichevsky-Trofimov estimate, never 0.
std::vector<double> kt_estimate(const std::vector<double>& counts) {
  double total = 0;
  for (double c : counts) total += c;
  std::vector<double> p(counts.size());
  for (std::size_t b = 0; b < counts.size(); ++b)
    p[b] = (counts[b] + 0.5) / (total + 0.5 * static_cast<double>(counts.size()));
  return p;
}

void check_batch(const Batch& batch, Index B, Index T, Index V, std::string_view what, std::int64_t index) {
  const std::size_t N = static_cast<std::size_t>(B * T);
  const std::string field = fmt::format("{}({})", what, index);
  require(batch.batch_size == B && batch.seq_len == T, field + " shape",
          fmt::format("({}, {})", batch.batch_size, batch.seq_len), fmt::format("must be (B, T) = ({}, {})", B, T));
  require(batch.inputs.size() == N && batch.targets.size() == N, field + " size",
          fmt::format("{} inputs, {} targets", batch.inputs.size(), batch.targets.size()),
          fmt::format("must be B * T = {} each", N));
  require(batch.domains.empty() || batch.domains.size() == N, field + " domains size", batch.domains.size(),
          fmt::format("must be 0 or B * T = {}", N));
  for (std::size_t n = 0; n < N; ++n) {
    require(batch.targets[n] >= 0 && batch.targets[n] < V, fmt::format("{} targets[{}]", field, n), batch.targets[n],
            fmt::format("must be in [0, vocab_size = {})", V));
    require(batch.domains.empty() || batch.domains[n] >= 0, fmt::format("{} domains[{}]", field, n),
            batch.domains.empty() ? 0 : batch.domains[n], "must be >= 0");
  }
}

}  // namespace

std::vector<double> BatchSource::train_unigram(Index vocab_size) const {
  std::vector<double> counts(static_cast<std::size_t>(vocab_size), 0.0);
  for (std::int64_t s = 0; s < 16; ++s) {
    const Batch b = train_batch(s);
    for (std::int32_t t : b.targets) {
      require(t >= 0 && t < vocab_size, "train_batch target", t, fmt::format("must be in [0, {})", vocab_size));
      counts[static_cast<std::size_t>(t)] += 1;
    }
  }
  return kt_estimate(counts);
}

CorpusBatchSource::CorpusBatchSource(const Corpus& corpus, Index batch_size, Index seq_len, std::uint64_t seed)
    : train_(corpus, Split::train, batch_size, seq_len, seed),
      val_(corpus, Split::val, batch_size, seq_len, kValidationSeed) {}

std::vector<double> CorpusBatchSource::train_unigram(Index vocab_size) const {
  std::vector<double> p(static_cast<std::size_t>(vocab_size), 0.0);
  const std::vector<std::int32_t>& ids = train_.domain_ids();
  for (std::int32_t d : ids) {
    std::vector<double> counts(p.size(), 0.0);
    for (std::uint8_t byte : train_.stream(d))
      if (byte < p.size()) counts[byte] += 1;
    const std::vector<double> pd = kt_estimate(counts);
    for (std::size_t b = 0; b < p.size(); ++b) p[b] += pd[b] / static_cast<double>(ids.size());
  }
  return p;
}

double unigram_baseline(const BatchSource& data, std::span<const double> unigram, Index batches) {
  double sum = 0;
  std::int64_t n = 0;
  for (Index i = 0; i < batches; ++i) {
    const Batch b = data.val_batch(i);
    for (std::int32_t t : b.targets) {
      require(t >= 0 && static_cast<std::size_t>(t) < unigram.size(), "val_batch target", t,
              fmt::format("must be in [0, {})", unigram.size()));
      sum -= std::log(unigram[static_cast<std::size_t>(t)]);
      ++n;
    }
  }
  return n == 0 ? 0.0 : sum / static_cast<double>(n);
}

// ---- The trainer ---------------------------------------------------------------------------------

std::uint64_t stream_seed(std::uint64_t seed, std::uint64_t stream, std::uint64_t index) {
  return hash64(hash64(seed ^ hash64(stream)) + index);
}

namespace {

// f(i) for i in [0, n), spread over `threads` threads (worker w takes i = w, w + W, ...). Each
// call must touch only its own outputs; the caller combines them in index order, so the result
// does not depend on the thread count. An exception of a call is rethrown (the first worker's).
template <typename F>
void parallel_for(Index n, int threads, F&& f) {
  const Index W = std::min<Index>(std::max(threads, 1), n);
  if (W <= 1) {
    for (Index i = 0; i < n; ++i) f(i);
    return;
  }
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(W));
  auto work = [&](Index w) {
    try {
      for (Index i = w; i < n; i += W) f(i);
    } catch (...) {
      errors[static_cast<std::size_t>(w)] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  for (Index w = 1; w < W; ++w) pool.emplace_back(work, w);
  work(0);
  for (std::thread& t : pool) t.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
}

TrainConfig validated(TrainConfig c) {
  c.validate();
  return c;
}

ModelConfig without_noise(ModelConfig m) {
  m.moe.routing.router.noise = RouterNoise::none;
  return m;
}

ModelParams initial_params(const TrainConfig& c, const ModelConfig& m) {
  Rng rng(stream_seed(c.seed, kInitStream, 0));
  return init_model<float>(m, rng);
}

int choose_threads(int requested) {
  if (requested > 0) return requested;
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

std::vector<int> moe_blocks(const ModelConfig& m) {
  std::vector<int> blocks;
  for (Index i = 0; i < m.n_layers; ++i)
    if (m.is_moe(i)) blocks.push_back(static_cast<int>(i));
  return blocks;
}

// A NamedTensor's elements (row-major; const where the tensor is) and its shape.
template <typename Named>
auto elements(const Named& t) {
  using Element = std::remove_pointer_t<decltype(t.matrix->data())>;
  if (t.matrix != nullptr) return std::span<Element>(t.matrix->data(), static_cast<std::size_t>(t.matrix->size()));
  return std::span<Element>(t.vector->data(), static_cast<std::size_t>(t.vector->size()));
}
template <typename Named>
std::vector<std::int64_t> shape_of_tensor(const Named& t) {
  if (t.matrix != nullptr) return {t.matrix->rows(), t.matrix->cols()};
  return {t.vector->size()};
}

}  // namespace

Trainer::Trainer(TrainConfig config, const BatchSource& data, TrainerOptions options)
    : config_(validated(std::move(config))),
      model_(config_.model_config()),
      eval_model_(without_noise(model_)),
      data_(data),
      options_(std::move(options)),
      threads_(choose_threads(options_.threads)),
      params_(initial_params(config_, model_)),
      micro_grads_(static_cast<std::size_t>(config_.micro_batches - 1)),
      outputs_(static_cast<std::size_t>(config_.micro_batches)),
      adamw_(model_param_refs(params_, grads_, model_), config_.adamw) {
  Eigen::initParallel();
}

namespace {

// logit_rms and logit_max_abs of m over the router logits of every MoE block of every output.
void set_logit_magnitude(StepMetrics& m, const std::vector<ModelOutput>& outputs, const std::vector<int>& moe_layers) {
  double squares = 0;
  std::int64_t count = 0;
  for (const ModelOutput& out : outputs)
    for (int layer : moe_layers) {
      const Matrix& z = out.blocks[static_cast<std::size_t>(layer)].moe.routing.logits;
      squares += z.cast<double>().squaredNorm();
      count += z.size();
      if (z.size() > 0) m.logit_max_abs = std::max(m.logit_max_abs, static_cast<double>(z.cwiseAbs().maxCoeff()));
    }
  m.logit_rms = count > 0 ? std::sqrt(squares / static_cast<double>(count)) : 0.0;
}

}  // namespace

void Trainer::reconfigure(TrainConfig next) {
  next.validate();  // throws before anything changes
  const ModelConfig m = next.model_config();
  // Balance and z-loss never change the list of parameters, which AdamW points into.
  const std::size_t before = model_parameters(std::as_const(params_), model_).size();
  if (model_parameters(std::as_const(params_), m).size() != before)
    throw Error(fmt::format("balance = {}: changes the model's parameters; a live change may not",
                            balance_mode_name(next.balance)));
  for (Index i = 0; i < m.n_layers; ++i) {
    if (!m.is_moe(i)) continue;
    VectorT<float>& bias = params_.blocks[static_cast<std::size_t>(i)].moe.routing.selection_bias;
    if (!m.moe.routing.use_selection_bias) {
      bias.resize(0);
    } else if (!model_.moe.routing.use_selection_bias || bias.size() != m.moe.num_experts()) {
      bias = VectorT<float>::Zero(m.moe.num_experts());  // as init_layer starts it
    }
  }
  config_ = std::move(next);
  model_ = m;
  eval_model_ = without_noise(m);
}

void Trainer::set_balance(BalanceMode mode, std::optional<double> strength) {
  TrainConfig next = config_;
  next.balance = mode;
  if (strength) {
    require(mode != BalanceMode::none, "strength", *strength, "balance = none has no strength to set");
    require(std::isfinite(*strength) && *strength >= 0, "strength", *strength, "must be finite and >= 0");
    if (mode == BalanceMode::aux_free) {
      next.bias_update_rate = *strength;
    } else {
      next.model.moe.routing.aux_loss_coef = *strength;
    }
  }
  reconfigure(std::move(next));
}

void Trainer::set_z_loss_coef(std::optional<double> coef) {
  TrainConfig next = config_;
  next.z_loss_coef = coef;
  reconfigure(std::move(next));
}

StepMetrics Trainer::step() {
  const auto start = std::chrono::steady_clock::now();
  const std::int64_t s = step_;
  const Index B = config_.batch_size, T = config_.seq_len, M = config_.micro_batches;
  const Index Bm = B / M, Nm = Bm * T;
  const Batch batch = data_.train_batch(s);
  check_batch(batch, B, T, model_.vocab_size, "train_batch", s);
  const double lr = learning_rate(config_.lr_schedule(), s);

  // Forward and backward of each micro-batch into its own output and gradients.
  std::vector<ModelLoss> losses(static_cast<std::size_t>(M));
  auto micro_step = [&](Index m) {
    const std::size_t mi = static_cast<std::size_t>(m);
    const std::span<const std::int32_t> ids(batch.inputs.data() + m * Nm, static_cast<std::size_t>(Nm));
    const std::span<const std::int32_t> targets(batch.targets.data() + m * Nm, static_cast<std::size_t>(Nm));
    Rng noise(stream_seed(config_.seed, kNoiseStream, static_cast<std::uint64_t>(s * M + m)));
    std::optional<StampingObserver> stamp;
    if (options_.events != nullptr) stamp.emplace(*options_.events, -1, s);
    model_forward(outputs_[mi], ids, Bm, T, params_, model_, &noise, stamp ? &*stamp : nullptr);
    losses[mi] = model_loss(outputs_[mi], targets);
    model_backward(m == 0 ? grads_ : micro_grads_[mi - 1], outputs_[mi], targets, params_, model_);
  };
  parallel_for(M, options_.events != nullptr ? 1 : threads_, micro_step);

  StepMetrics r;
  r.step = s;
  r.lr = lr;
  for (const ModelLoss& l : losses) {
    r.loss += static_cast<double>(l.ce) / static_cast<double>(M);
    r.aux += static_cast<double>(l.aux) / static_cast<double>(M);
    r.z += static_cast<double>(l.z) / static_cast<double>(M);
  }
  if (!std::isfinite(r.loss + r.aux + r.z))
    throw Error(fmt::format("step {}: loss = {} (aux {}, z {}): not finite, the training diverged; nothing was "
                            "updated (try a lower learning rate)",
                            s, r.loss, r.aux, r.z));

  // grad = (g_0 + g_1 + ... + g_M-1) / M, summed in micro-batch order.
  if (M > 1) {
    const std::vector<NamedParamT<float>> total = model_parameters(grads_, model_);
    for (const ModelGrads& g : micro_grads_) {
      const std::vector<ConstNamedParamT<float>> part = model_parameters(g, model_);
      for (std::size_t k = 0; k < total.size(); ++k) {
        const std::span<float> dst = elements(total[k]);
        const float* src = part[k].matrix != nullptr ? part[k].matrix->data() : part[k].vector->data();
        for (std::size_t i = 0; i < dst.size(); ++i) dst[i] += src[i];
      }
    }
    const float scale = 1.0f / static_cast<float>(M);
    for (const NamedParamT<float>& t : total)
      for (float& v : elements(t)) v *= scale;
  }
  r.grad_norm = clip_grad_norm(adamw_.params(),
                               config_.grad_clip > 0 ? config_.grad_clip : std::numeric_limits<double>::infinity());
  if (!std::isfinite(r.grad_norm))
    throw Error(fmt::format("step {}: gradient norm = {}: not finite, the training diverged; nothing was updated "
                            "(try a lower learning rate)",
                            s, r.grad_norm));
  adamw_.step(lr);

  // The step's load per MoE block (summed over the micro-batches), and what capacity dropped.
  r.moe_layers = moe_blocks(model_);
  std::int64_t routed = 0, dropped = 0;
  ModelOutput load_only;  // for the bias update: the whole batch's load, as if one forward
  load_only.blocks.resize(static_cast<std::size_t>(model_.n_layers));
  for (int layer : r.moe_layers) {
    const std::size_t b = static_cast<std::size_t>(layer);
    std::vector<std::int64_t> load(static_cast<std::size_t>(model_.moe.num_experts()), 0);
    for (const ModelOutput& out : outputs_) {
      const LayerOutput& moe = out.blocks[b].moe;
      for (std::size_t e = 0; e < load.size() && e < moe.routing.load.size(); ++e) load[e] += moe.routing.load[e];
      for (std::int64_t d : moe.dropped) dropped += d;
    }
    std::int64_t sum = 0, max = 0;
    for (std::int64_t n : load) {
      sum += n;
      max = std::max(max, n);
    }
    routed += sum;
    if (sum > 0)
      r.load_imbalance = std::max(r.load_imbalance, static_cast<double>(max) * static_cast<double>(load.size()) /
                                                        static_cast<double>(sum));
    load_only.blocks[b].moe.routing.load = load;
    r.load.push_back(std::move(load));
  }
  r.dropped_fraction = routed > 0 ? static_cast<double>(dropped) / static_cast<double>(routed) : 0.0;
  set_logit_magnitude(r, outputs_, r.moe_layers);

  if (model_.moe_layout != MoeLayout::dense && model_.moe.routing.use_selection_bias) {
    std::optional<StampingObserver> stamp;
    if (options_.events != nullptr) stamp.emplace(*options_.events, -1, s);
    model_update_bias(params_, load_only, model_, stamp ? &*stamp : nullptr);
  }

  step_ += 1;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.tokens_per_second = r.seconds > 0 ? static_cast<double>(B * T) / r.seconds : 0.0;
  seconds_ += r.seconds;
  return r;
}

namespace {

// What one validation batch contributes; summed over batches in order.
struct BatchEval {
  double loss_sum = 0;
  std::int64_t tokens = 0;
  std::vector<double> domain_loss_sum;     // (D) grows to the largest domain id seen
  std::vector<std::int64_t> domain_tokens;
  std::vector<MatrixD> routing;            // (MoE blocks) (D, E)
  std::vector<MatrixD> byte_routing;       // (MoE blocks) (V, E) by input byte
};

void grow(BatchEval& r, std::size_t domains, Index experts) {
  if (r.domain_loss_sum.size() < domains) {
    r.domain_loss_sum.resize(domains, 0.0);
    r.domain_tokens.resize(domains, 0);
  }
  for (MatrixD& m : r.routing) {
    if (static_cast<std::size_t>(m.rows()) >= domains) continue;
    MatrixD bigger = MatrixD::Zero(static_cast<Index>(domains), experts);
    bigger.topRows(m.rows()) = m;
    m = std::move(bigger);
  }
}

// I(domain; expert) in bits of a (D, E) count table.
double mutual_information(const MatrixD& counts) {
  const double total = counts.sum();
  if (total <= 0) return 0.0;
  const VectorT<double> pd = counts.rowwise().sum() / total;
  const VectorT<double> pe = counts.colwise().sum().transpose() / total;
  double mi = 0;
  for (Index d = 0; d < counts.rows(); ++d)
    for (Index e = 0; e < counts.cols(); ++e) {
      const double p = counts(d, e) / total;
      if (p > 0) mi += p * std::log2(p / (pd(d) * pe(e)));
    }
  return std::max(mi, 0.0);
}

}  // namespace

EvalMetrics Trainer::evaluate() const {
  const Index B = config_.batch_size, T = config_.seq_len, V = model_.vocab_size;
  const Index E = model_.moe_layout == MoeLayout::dense ? 0 : model_.moe.num_experts();
  const std::vector<int> blocks = moe_blocks(model_);
  const Index n_batches = config_.eval_batches;
  std::vector<BatchEval> parts(static_cast<std::size_t>(n_batches));

  parallel_for(n_batches, threads_, [&](Index i) {
    const Batch batch = data_.val_batch(i);
    check_batch(batch, B, T, V, "val_batch", i);
    ModelOutput out;
    model_forward(out, batch.inputs, B, T, params_, eval_model_);
    BatchEval& r = parts[static_cast<std::size_t>(i)];
    r.routing.assign(blocks.size(), MatrixD::Zero(0, E));
    r.byte_routing.assign(blocks.size(), MatrixD::Zero(V, E));
    // Per-token cross-entropy in double: log sum exp(logits) - logits[target].
    for (Index n = 0; n < B * T; ++n) {
      const std::size_t domain = batch.domains.empty() ? 0 : static_cast<std::size_t>(batch.domains[static_cast<std::size_t>(n)]);
      grow(r, domain + 1, E);
      const float* row = out.logits.row(n).data();
      double max = row[0];
      for (Index v = 1; v < V; ++v) max = std::max(max, static_cast<double>(row[v]));
      double sum = 0;
      for (Index v = 0; v < V; ++v) sum += std::exp(static_cast<double>(row[v]) - max);
      const double ce = std::log(sum) + max - static_cast<double>(row[batch.targets[static_cast<std::size_t>(n)]]);
      r.loss_sum += ce;
      r.tokens += 1;
      r.domain_loss_sum[domain] += ce;
      r.domain_tokens[domain] += 1;
    }
    // Routed pairs by domain: token choice ids are (N, k) experts, expert choice (E, C) tokens.
    for (std::size_t j = 0; j < blocks.size(); ++j) {
      const RoutingOutput& routing = out.blocks[static_cast<std::size_t>(blocks[j])].moe.routing;
      auto count = [&](Index token, Index e) {
        const std::size_t t = static_cast<std::size_t>(token);
        r.routing[j](batch.domains.empty() ? Index{0} : static_cast<Index>(batch.domains[t]), e) += 1;
        r.byte_routing[j](batch.inputs[t], e) += 1;
      };
      if (model_.moe.routing.expert_choice()) {
        for (Index e = 0; e < routing.ids.rows(); ++e)
          for (Index c = 0; c < routing.ids.cols(); ++c)
            if (routing.ids(e, c) >= 0 && routing.ids(e, c) < B * T) count(routing.ids(e, c), e);
      } else {
        for (Index token = 0; token < routing.ids.rows(); ++token)
          for (Index c = 0; c < routing.ids.cols(); ++c)
            if (routing.ids(token, c) >= 0 && routing.ids(token, c) < E) count(token, routing.ids(token, c));
      }
    }
  });

  // Sum the batches in order.
  const std::vector<std::string> names = data_.domain_names();
  std::size_t D = names.size();
  for (const BatchEval& p : parts) D = std::max(D, p.domain_tokens.size());
  BatchEval total;
  total.routing.assign(blocks.size(), MatrixD::Zero(static_cast<Index>(D), E));
  total.byte_routing.assign(blocks.size(), MatrixD::Zero(V, E));
  grow(total, D, E);
  for (BatchEval& p : parts) {
    grow(p, D, E);
    total.loss_sum += p.loss_sum;
    total.tokens += p.tokens;
    for (std::size_t d = 0; d < D; ++d) {
      total.domain_loss_sum[d] += p.domain_loss_sum[d];
      total.domain_tokens[d] += p.domain_tokens[d];
    }
    for (std::size_t j = 0; j < blocks.size(); ++j) {
      total.routing[j] += p.routing[j];
      total.byte_routing[j] += p.byte_routing[j];
    }
  }

  EvalMetrics m;
  m.step = step_;
  m.tokens = total.tokens;
  m.loss = total.tokens > 0 ? total.loss_sum / static_cast<double>(total.tokens) : 0.0;
  for (std::size_t d = 0; d < D; ++d)
    m.domain_loss.push_back(total.domain_tokens[d] > 0
                                ? total.domain_loss_sum[d] / static_cast<double>(total.domain_tokens[d])
                                : std::numeric_limits<double>::quiet_NaN());
  m.domain_tokens = total.domain_tokens;
  m.moe_layers = blocks;
  m.routing = total.routing;
  for (const MatrixD& counts : m.routing) m.specialisation.push_back(mutual_information(counts));
  for (const MatrixD& counts : total.byte_routing) m.byte_specialisation.push_back(mutual_information(counts));
  return m;
}

// ---- Checkpoints ---------------------------------------------------------------------------------

namespace {

constexpr const char* kModelFile = "model.safetensors";
constexpr const char* kOptimizerFile = "optimizer.safetensors";
constexpr const char* kConfigFile = "config.json";
constexpr const char* kStateFile = "trainer_state.json";
constexpr const char* kCheckpointFormat = "moelab-checkpoint";
constexpr int kFormatVersion = 1;

std::string fingerprint(std::span<const std::uint8_t> bytes) { return fnv1a64(bytes); }

std::span<const std::uint8_t> as_bytes(std::string_view text) {
  return {reinterpret_cast<const std::uint8_t*>(text.data()), text.size()};
}

Tensor f32_tensor(std::span<const float> values, std::vector<std::int64_t> shape) {
  Tensor t{.dtype = DType::f32, .shape = std::move(shape)};
  t.data.resize(values.size() * sizeof(float));
  if (!values.empty()) std::memcpy(t.data.data(), values.data(), t.data.size());
  return t;
}

Tensor i64_scalar(std::int64_t value) {
  Tensor t{.dtype = DType::i64};
  t.data.resize(sizeof(value));
  std::memcpy(t.data.data(), &value, sizeof(value));
  return t;
}

std::string shape_text(const std::vector<std::int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

// The tensor `name` of `file`, checked to be F32 (or `dtype`) with `shape`.
const Tensor& expect_tensor(const TensorFile& file, const fs::path& path, const std::string& name,
                            const std::vector<std::int64_t>& shape, DType dtype = DType::f32) {
  const auto it = file.tensors.find(name);
  if (it == file.tensors.end())
    throw Error(fmt::format("{}: tensor '{}' is missing (a checkpoint of another model?)", path.string(), name));
  const Tensor& t = it->second;
  if (t.dtype != dtype)
    throw Error(fmt::format("{}: tensor '{}': dtype {}: must be {}", path.string(), name, dtype_name(t.dtype),
                            dtype_name(dtype)));
  if (t.shape != shape)
    throw Error(fmt::format("{}: tensor '{}': shape {}: must be {}", path.string(), name, shape_text(t.shape),
                            shape_text(shape)));
  return t;
}

void copy_floats(std::span<float> dst, const Tensor& t) {
  if (!dst.empty()) std::memcpy(dst.data(), t.data.data(), dst.size() * sizeof(float));
}

// Names in the file that the model does not have.
void reject_extra(const TensorFile& file, const fs::path& path, const std::set<std::string>& known) {
  for (const auto& [name, tensor] : file.tensors)
    if (!known.contains(name))
      throw Error(fmt::format("{}: tensor '{}' is not part of this model's checkpoint (a checkpoint of another "
                              "model?)",
                              path.string(), name));
}

Json parse_json_file(const fs::path& path, std::span<const std::uint8_t> bytes) {
  try {
    return Json::parse(bytes.begin(), bytes.end());
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("{}: not valid JSON: {}", path.string(), e.what()));
  }
}

std::vector<std::uint8_t> read_required(const fs::path& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec))
    throw Error(fmt::format("{}: missing (not a complete moelab checkpoint)", path.string()));
  return read_file(path);
}

// Syncs a directory, so that a rename inside it survives a crash.
void sync_directory(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

bool is_checkpoint(const fs::path& dir) {
  std::error_code ec;
  return fs::is_regular_file(dir / kStateFile, ec);
}

// The train config fields that may differ between a checkpoint and the trainer loading it.
bool may_differ(std::string_view key) {
  return key == "steps" || key == "eval_every" || key == "eval_batches" || key == "checkpoint_every";
}

// The config.json of a checkpoint: its train config, checked against its effective model.
TrainConfig parse_checkpoint_config(const fs::path& path, const Json& j) {
  try {
    const ObjectFields f(j, "", {"format", "format_version", "moelab_version", "model", "train"});
    require(f.string("format") == kCheckpointFormat, "format", shown(f.at("format")),
            fmt::format("must be \"{}\"", kCheckpointFormat));
    require(f.integer("format_version") == kFormatVersion, "format_version", f.integer("format_version"),
            fmt::format("must be {}", kFormatVersion));
    f.string("moelab_version");
    const TrainConfig train = train_config_from_json(f.at("train"), "train");
    const ModelConfig model = model_config_from_json(f.at("model"), "model");
    require(to_json(model) == to_json(train.model_config()), "model", "(the saved model config)",
            "must be train.model with the train config's balance, z_loss_coef and capacity_factor applied");
    return train;
  } catch (const Error& e) {
    throw Error(fmt::format("{}: {}", path.string(), e.what()));
  }
}

}  // namespace

std::string fnv1a64(std::span<const std::uint8_t> bytes) {
  std::uint64_t h = 0xcbf29ce484222325ull;  // FNV offset basis; the prime is 2^40 + 2^8 + 0xb3
  for (std::uint8_t b : bytes) h = (h ^ b) * 0x100000001b3ull;
  return fmt::format("{:016x}", h);
}

void Trainer::save(const fs::path& dir) const {
  require(!dir.filename().empty(), "checkpoint directory", dir.string(), "must name a folder (not end in /)");
  const fs::path parent = dir.parent_path().empty() ? fs::path(".") : dir.parent_path();
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) throw Error(fmt::format("{}: cannot create the folder: {}", parent.string(), ec.message()));
  if (fs::exists(dir, ec) && !is_checkpoint(dir) && !(fs::is_directory(dir, ec) && fs::is_empty(dir, ec)))
    throw Error(fmt::format("{}: exists and is not a moelab checkpoint; not replacing it", dir.string()));

  // The files, in memory first.
  TensorFile model_file;
  model_file.metadata = {{"format", "pt"}};
  for (const ConstNamedParamT<float>& t : model_parameters(params_, model_))
    model_file.tensors[t.name] = f32_tensor(elements(t), shape_of_tensor(t));
  for (const ConstNamedParamT<float>& t : model_buffers(params_, model_))
    model_file.tensors[t.name] = f32_tensor(elements(t), shape_of_tensor(t));
  TensorFile optimizer_file;
  optimizer_file.metadata = {{"optimizer", "AdamW"}, {"format", "moelab"}};
  const std::vector<ConstNamedParamT<float>> named = model_parameters(params_, model_);
  for (std::size_t k = 0; k < named.size(); ++k) {
    const AdamWState& st = adamw_.state()[k];
    optimizer_file.tensors[named[k].name + ".exp_avg"] = f32_tensor(st.exp_avg, shape_of_tensor(named[k]));
    optimizer_file.tensors[named[k].name + ".exp_avg_sq"] = f32_tensor(st.exp_avg_sq, shape_of_tensor(named[k]));
    optimizer_file.tensors[named[k].name + ".step"] = i64_scalar(st.step);
  }
  const std::vector<std::uint8_t> model_bytes = serialize_safetensors(model_file);
  const std::vector<std::uint8_t> optimizer_bytes = serialize_safetensors(optimizer_file);
  Json config;
  config["format"] = kCheckpointFormat;
  config["format_version"] = kFormatVersion;
  config["moelab_version"] = options_.moelab_version.empty() ? "unknown" : options_.moelab_version;
  config["model"] = to_json(model_);
  config["train"] = to_json(config_);
  const std::string config_text = config.dump(2) + "\n";
  Json state;
  state["format_version"] = kFormatVersion;
  state["step"] = step_;
  state["tokens_seen"] = step_ * config_.batch_size * config_.seq_len;
  state["seed"] = config_.seed;
  state["seconds_trained"] = seconds_;
  // Every random number is a function of (seed, step): no generator state to save.
  state["randomness"] = "init: Rng(stream_seed(seed, init, 0)); batch s: train_batch(s); router noise of step s, "
                        "micro-batch m: Rng(stream_seed(seed, noise, s * M + m))";
  state["files"] = {
      {kModelFile, {{"bytes", model_bytes.size()}, {"fnv1a64", fingerprint(model_bytes)}}},
      {kOptimizerFile, {{"bytes", optimizer_bytes.size()}, {"fnv1a64", fingerprint(optimizer_bytes)}}},
      {kConfigFile, {{"bytes", config_text.size()}, {"fnv1a64", fingerprint(as_bytes(config_text))}}}};

  // Into a fresh sibling folder, then one rename.
  const fs::path temp = parent / fmt::format(".{}.tmp.{}", dir.filename().string(), ::getpid());
  fs::remove_all(temp, ec);
  fs::create_directory(temp, ec);
  if (ec) throw Error(fmt::format("{}: cannot create the folder: {}", temp.string(), ec.message()));
  try {
    write_file_atomically(temp / kModelFile, model_bytes);
    write_file_atomically(temp / kOptimizerFile, optimizer_bytes);
    write_file_atomically(temp / kConfigFile, config_text);
    write_file_atomically(temp / kStateFile, state.dump(2) + "\n");
    sync_directory(temp);
    if (fs::exists(dir, ec)) {
      // Swap the two folders in one step where the file system can (Linux renameat2), else move
      // the old one aside first.
      if (::renameat2(AT_FDCWD, temp.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) != 0) {
        const fs::path old = parent / fmt::format(".{}.old.{}", dir.filename().string(), ::getpid());
        fs::remove_all(old, ec);
        fs::rename(dir, old);
        fs::rename(temp, dir);
        fs::remove_all(old, ec);
      }
    } else {
      fs::rename(temp, dir);
    }
  } catch (const fs::filesystem_error& e) {
    fs::remove_all(temp, ec);
    throw Error(fmt::format("{}: cannot write the checkpoint: {}", dir.string(), e.what()));
  } catch (...) {
    fs::remove_all(temp, ec);
    throw;
  }
  fs::remove_all(temp, ec);  // the old checkpoint, after an exchange
  sync_directory(parent);
}

void Trainer::load(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw Error(fmt::format("{}: no such checkpoint folder", dir.string()));
  const fs::path state_path = dir / kStateFile, config_path = dir / kConfigFile, model_path = dir / kModelFile,
                 optimizer_path = dir / kOptimizerFile;
  const std::vector<std::uint8_t> state_bytes = read_required(state_path);
  const std::vector<std::uint8_t> config_bytes = read_required(config_path);
  const std::vector<std::uint8_t> model_bytes = read_required(model_path);
  const std::vector<std::uint8_t> optimizer_bytes = read_required(optimizer_path);

  // trainer_state.json: the step, and the fingerprints of the other files.
  const Json state = parse_json_file(state_path, state_bytes);
  std::int64_t step = 0;
  double seconds = 0;
  try {
    const ObjectFields f(state, "", {"format_version", "step", "tokens_seen", "seed", "seconds_trained", "randomness", "files"});
    require(f.integer("format_version") == kFormatVersion, "format_version", f.integer("format_version"),
            fmt::format("must be {}", kFormatVersion));
    step = f.integer("step");
    require(step >= 0, "step", step, "must be >= 0");
    require(f.integer("tokens_seen") == step * config_.batch_size * config_.seq_len, "tokens_seen",
            f.integer("tokens_seen"), "must be step * batch_size * seq_len");
    require(f.unsigned_integer("seed") == config_.seed, "seed", f.unsigned_integer("seed"),
            fmt::format("this trainer's seed is {}", config_.seed));
    seconds = f.number("seconds_trained");
    f.string("randomness");
    const ObjectFields files(f.at("files"), "files", {kModelFile, kOptimizerFile, kConfigFile});
    const std::pair<const char*, const std::vector<std::uint8_t>*> checked[] = {
        {kModelFile, &model_bytes}, {kOptimizerFile, &optimizer_bytes}, {kConfigFile, &config_bytes}};
    for (const auto& [name, bytes] : checked) {
      const ObjectFields file(files.at(name), files.path(name), {"bytes", "fnv1a64"});
      if (file.integer("bytes") != static_cast<std::int64_t>(bytes->size()) || file.string("fnv1a64") != fingerprint(*bytes))
        throw Error(fmt::format("{}: {} bytes, fingerprint {}: the checkpoint recorded {} bytes, fingerprint {} (the "
                                "file was changed or replaced after the checkpoint was written)",
                                (dir / name).string(), bytes->size(), fingerprint(*bytes), file.integer("bytes"),
                                file.string("fnv1a64")));
    }
  } catch (const Error& e) {
    const std::string what = e.what();
    if (what.rfind(dir.string(), 0) == 0) throw;
    throw Error(fmt::format("{}: {}", state_path.string(), what));
  }

  // config.json: the same run (every field that shapes the trajectory).
  const TrainConfig saved = parse_checkpoint_config(config_path, parse_json_file(config_path, config_bytes));
  const Json mine = to_json(config_), theirs = to_json(saved);
  for (const auto& [key, value] : mine.items()) {
    if (may_differ(key) || theirs.at(key) == value) continue;
    throw Error(fmt::format("{}: train.{} = {}: this trainer has {} (a checkpoint of another configuration)",
                            config_path.string(), key, shown(theirs.at(key)), shown(value)));
  }

  // model.safetensors: every parameter and buffer, F32, of its shape; nothing else.
  const TensorFile model_file = parse_safetensors(model_bytes, model_path.string());
  std::vector<ConstNamedParamT<float>> tensors = model_parameters(std::as_const(params_), model_);
  for (ConstNamedParamT<float>& t : model_buffers(std::as_const(params_), model_)) tensors.push_back(std::move(t));
  std::set<std::string> known;
  std::vector<const Tensor*> values;
  for (const ConstNamedParamT<float>& t : tensors) {
    known.insert(t.name);
    values.push_back(&expect_tensor(model_file, model_path, t.name, shape_of_tensor(t)));
  }
  reject_extra(model_file, model_path, known);

  // optimizer.safetensors: AdamW's state of every parameter, at this step.
  const TensorFile optimizer_file = parse_safetensors(optimizer_bytes, optimizer_path.string());
  const std::vector<ConstNamedParamT<float>> named = model_parameters(std::as_const(params_), model_);
  std::set<std::string> known_state;
  std::vector<AdamWState> adam_state(named.size());
  for (std::size_t k = 0; k < named.size(); ++k) {
    const std::string& name = named[k].name;
    const std::vector<std::int64_t> shape = shape_of_tensor(named[k]);
    for (const char* suffix : {".exp_avg", ".exp_avg_sq", ".step"}) known_state.insert(name + suffix);
    const Tensor& m = expect_tensor(optimizer_file, optimizer_path, name + ".exp_avg", shape);
    const Tensor& v = expect_tensor(optimizer_file, optimizer_path, name + ".exp_avg_sq", shape);
    const Tensor& t = expect_tensor(optimizer_file, optimizer_path, name + ".step", {}, DType::i64);
    AdamWState& st = adam_state[k];
    st.exp_avg.resize(static_cast<std::size_t>(named[k].size()));
    st.exp_avg_sq.resize(st.exp_avg.size());
    copy_floats(st.exp_avg, m);
    copy_floats(st.exp_avg_sq, v);
    std::memcpy(&st.step, t.data.data(), sizeof(st.step));
    if (st.step != step)
      throw Error(fmt::format("{}: tensor '{}.step' = {}: must equal the checkpoint's step = {}", optimizer_path.string(),
                              name, st.step, step));
  }
  reject_extra(optimizer_file, optimizer_path, known_state);

  // Everything checked: commit, copying into the existing tensors (AdamW points at them).
  std::vector<NamedParamT<float>> targets = model_parameters(params_, model_);
  for (NamedParamT<float>& t : model_buffers(params_, model_)) targets.push_back(std::move(t));
  for (std::size_t k = 0; k < targets.size(); ++k) copy_floats(elements(targets[k]), *values[k]);
  adamw_.state() = std::move(adam_state);
  step_ = step;
  seconds_ = seconds;
}

fs::path checkpoint_path(const fs::path& run_dir, std::int64_t step) {
  return run_dir / fmt::format("step-{:06d}", step);
}

fs::path save_checkpoint(const Trainer& trainer, const fs::path& run_dir) {
  const fs::path path = checkpoint_path(run_dir, trainer.steps_done());
  trainer.save(path);
  write_file_atomically(run_dir / "latest", path.filename().string() + "\n");
  return path;
}

fs::path find_checkpoint(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw Error(fmt::format("{}: no such folder", dir.string()));
  if (is_checkpoint(dir)) return dir;
  if (fs::is_regular_file(dir / "latest", ec)) {
    const std::vector<std::uint8_t> bytes = read_file(dir / "latest");
    std::string name(bytes.begin(), bytes.end());
    while (!name.empty() && (name.back() == '\n' || name.back() == ' ' || name.back() == '\r')) name.pop_back();
    const fs::path path = dir / name;
    if (name.empty() || name.find('/') != std::string::npos || !is_checkpoint(path))
      throw Error(fmt::format("{}/latest = \"{}\": names no checkpoint folder of {}", dir.string(), name, dir.string()));
    return path;
  }
  // The highest complete step-N folder; the .step-N.tmp.<pid> folders of a crashed save never match.
  fs::path best;
  std::int64_t best_step = -1;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("step-", 0) != 0 || name.size() == 5) continue;
    if (!std::all_of(name.begin() + 5, name.end(), [](char c) { return c >= '0' && c <= '9'; })) continue;
    // More digits than an int64 holds: not a step of ours (std::stoll would throw out_of_range).
    if (name.size() > 5 + 18) continue;
    const std::int64_t step = std::stoll(name.substr(5));
    if (step > best_step && is_checkpoint(entry.path())) {
      best_step = step;
      best = entry.path();
    }
  }
  if (best_step < 0)
    throw Error(fmt::format("{}: no checkpoint here (no trainer_state.json, no latest, no step-N folder)", dir.string()));
  return best;
}

namespace {

// A lower bound of the bytes of the model's float32 parameters: the embedding, the attention
// projections, the FFN matrices (two per FFN, the gate of a gated one left out) and the routers;
// norms, biases and the head not counted. In double, because a config read from a file may
// describe an absurd model: the bound then is huge (or inf), never a wrapped-around int64.
double min_parameter_bytes(const ModelConfig& m) {
  const double V = static_cast<double>(m.vocab_size), C = static_cast<double>(m.hidden_size),
               L = static_cast<double>(m.n_layers), moe = static_cast<double>(m.n_moe_layers());
  double n = V * C + L * 4 * C * C + (L - moe) * 2 * C * static_cast<double>(m.intermediate_size);
  if (m.moe_layout != MoeLayout::dense) {
    const double E = static_cast<double>(m.moe.num_experts());
    n += moe * (E * C + E * 2 * C * static_cast<double>(m.moe.expert.intermediate_size) +
                static_cast<double>(m.moe.shared.count) * 2 * C * static_cast<double>(m.moe.shared.intermediate_size));
  }
  return 4 * n;
}

}  // namespace

TrainConfig read_checkpoint_config(const fs::path& checkpoint_dir) {
  const fs::path path = checkpoint_dir / kConfigFile;
  const std::vector<std::uint8_t> bytes = read_required(path);
  TrainConfig config = parse_checkpoint_config(path, parse_json_file(path, bytes));
  // Before anyone allocates the model config.json describes: the weights must be there.
  const fs::path model_path = checkpoint_dir / kModelFile;
  std::error_code ec;
  const bool present = fs::is_regular_file(model_path, ec);
  const std::uintmax_t model_bytes = present ? fs::file_size(model_path, ec) : 0;
  if (!present || ec)
    throw Error(fmt::format("{}: missing (not a complete moelab checkpoint)", model_path.string()));
  const double needed = min_parameter_bytes(config.model_config());
  if (!(needed <= static_cast<double>(model_bytes)))
    throw Error(fmt::format("{}: {} bytes cannot hold the model of {} (at least {:.4g} bytes of float32 parameters)",
                            model_path.string(), model_bytes, path.string(), needed));
  return config;
}

namespace {

// The BatchSource of a Trainer that only loads a checkpoint: it never trains or evaluates.
class NoBatches : public BatchSource {
 public:
  Batch train_batch(std::int64_t) const override { throw Error("a loaded checkpoint model has no training data"); }
  Batch val_batch(std::int64_t) const override { throw Error("a loaded checkpoint model has no validation data"); }
};

}  // namespace

CheckpointModel load_checkpoint_model(const fs::path& dir) {
  CheckpointModel m;
  m.path = find_checkpoint(dir);
  m.config = read_checkpoint_config(m.path);
  // Trainer::load is the one place that checks every file of a checkpoint; its AdamW state is
  // checked and then dropped with the trainer.
  const NoBatches none;
  Trainer trainer(m.config, none, TrainerOptions{.threads = 1});
  trainer.load(m.path);
  m.model = trainer.model_config();
  m.eval_model = without_noise(m.model);
  m.params = trainer.params();
  m.step = trainer.steps_done();
  return m;
}

// ---- Metrics ----------------------------------------------------------------------------------------

void emit_metrics(Observer& observer, const StepMetrics& m, std::int64_t tokens_seen) {
  const std::size_t E = m.load.empty() ? 0 : m.load[0].size();
  std::vector<double> load;
  for (const std::vector<std::int64_t>& l : m.load)
    for (std::int64_t n : l) load.push_back(static_cast<double>(n));
  const Stat stats[] = {{"lr", m.lr},
                        {"loss", m.loss},
                        {"aux", m.aux},
                        {"z", m.z},
                        {"grad_norm", m.grad_norm},
                        {"seconds", m.seconds},
                        {"tokens_per_second", m.tokens_per_second},
                        {"load_imbalance", m.load_imbalance},
                        {"dropped_fraction", m.dropped_fraction},
                        {"logit_rms", m.logit_rms},
                        {"logit_max_abs", m.logit_max_abs},
                        {"tokens", static_cast<double>(tokens_seen)}};
  observer.on_event(Event{.name = events::train_step,
                          .step = m.step,
                          .shape = {static_cast<std::int64_t>(m.load.size()), static_cast<std::int64_t>(E)},
                          .f64 = load,
                          .stats = stats});
}

void emit_metrics(Observer& observer, const EvalMetrics& m, std::optional<double> baseline) {
  std::vector<std::string> keys;  // the Stats view these names
  for (int layer : m.moe_layers) {
    keys.push_back(fmt::format("specialisation_{}", layer));
    keys.push_back(fmt::format("byte_specialisation_{}", layer));
  }
  std::vector<Stat> stats = {{"loss", m.loss}, {"tokens", static_cast<double>(m.tokens)}};
  if (baseline) stats.push_back({"unigram_baseline", *baseline});
  for (std::size_t j = 0; j < m.moe_layers.size() && j < m.specialisation.size() && j < m.byte_specialisation.size();
       ++j) {
    stats.push_back({keys[2 * j], m.specialisation[j]});
    stats.push_back({keys[2 * j + 1], m.byte_specialisation[j]});
  }
  observer.on_event(Event{.name = events::eval,
                          .step = m.step,
                          .shape = {static_cast<std::int64_t>(m.domain_loss.size()), 1},
                          .f64 = m.domain_loss,
                          .stats = stats});
}

void MetricsLog::on_event(const Event& event) {
  if (event.name == events::train_step || event.name == events::eval) events_.push_back(RecordedEvent::from(event));
}

void MetricsLog::keep_history(std::int64_t steps_done) {
  std::error_code ec;
  std::vector<RecordedEvent> kept;
  if (fs::exists(path_, ec)) {
    for (RecordedEvent& e : read_json_lines_file(path_)) {
      const bool keep = (e.name == events::train_step && e.step < steps_done) ||
                        (e.name == events::eval && e.step <= steps_done);
      if (keep) kept.push_back(std::move(e));
    }
  }
  for (RecordedEvent& e : events_) kept.push_back(std::move(e));
  events_ = std::move(kept);
}

void MetricsLog::flush() {
  JsonLinesFile file(path_);
  for (const RecordedEvent& e : events_) {
    std::vector<Stat> stats;
    for (const auto& [key, value] : e.stats) stats.push_back({key, value});
    file.on_event(Event{.name = e.name,
                        .layer = e.layer,
                        .step = e.step,
                        .shape = e.shape,
                        .f64 = e.values,
                        .i32 = e.ids,
                        .stats = stats});
  }
  file.close();
}

// ---- The loop -------------------------------------------------------------------------------------

EvalMetrics run_training(Trainer& trainer, const fs::path& run_dir, const RunCallbacks& callbacks, Observer* observer) {
  std::error_code ec;
  fs::create_directories(run_dir, ec);
  if (ec) throw Error(fmt::format("{}: cannot create the folder: {}", run_dir.string(), ec.message()));
  const TrainConfig& c = trainer.config();
  MetricsLog log(run_dir / "metrics.jsonl");
  log.keep_history(trainer.steps_done());
  FanOut metrics;
  metrics.add(log);
  if (observer != nullptr) metrics.add(*observer);

  const std::vector<double> unigram = trainer.data().train_unigram(trainer.model_config().vocab_size);
  const double baseline = unigram_baseline(trainer.data(), unigram, c.eval_batches);
  if (callbacks.on_start) callbacks.on_start(baseline);

  auto due = [&trainer](std::int64_t every) {
    return trainer.done() || (every > 0 && trainer.steps_done() % every == 0);
  };
  std::int64_t tokens = trainer.steps_done() * c.batch_size * c.seq_len;
  std::optional<EvalMetrics> last;
  while (!trainer.done()) {
    const StepMetrics m = trainer.step();
    tokens += c.batch_size * c.seq_len;
    emit_metrics(metrics, m, tokens);
    if (callbacks.on_step) callbacks.on_step(m);
    if (due(c.eval_every)) {
      last = trainer.evaluate();
      emit_metrics(metrics, *last, baseline);
      if (callbacks.on_eval) callbacks.on_eval(*last);
      log.flush();
    }
    if (due(c.checkpoint_every)) {
      const fs::path path = save_checkpoint(trainer, run_dir);
      log.flush();
      if (callbacks.on_checkpoint) callbacks.on_checkpoint(path);
    }
  }
  if (!last) {  // resumed after the last step: nothing to train, measure where it stands
    last = trainer.evaluate();
    if (callbacks.on_eval) callbacks.on_eval(*last);
  }
  log.flush();
  return *last;
}

TokenLabels batch_labels(std::span<const Batch> batches, std::vector<std::string> domain_names) {
  TokenLabels labels;
  labels.domain_names = std::move(domain_names);
  for (const Batch& b : batches) {
    labels.bytes.insert(labels.bytes.end(), b.inputs.begin(), b.inputs.end());
    labels.domains.insert(labels.domains.end(), b.domains.begin(), b.domains.end());
  }
  return labels;
}

std::vector<RoutingSample> route_batches(const ModelConfig& config, const ModelParams& params,
                                         std::span<const Batch> batches, std::span<const int> blocks) {
  if (batches.empty()) return std::vector<RoutingSample>(blocks.size());
  const Index B = batches.front().batch_size, T = batches.front().seq_len, N = B * T;
  const Index k = config.moe.routing.top_k, E = config.moe.num_experts();
  const Index rows = N * static_cast<Index>(batches.size());
  std::vector<RoutingSample> samples(blocks.size(), RoutingSample{IndexMatrix(rows, k), Matrix(rows, k), E});
  ModelOutput out;
  for (std::size_t i = 0; i < batches.size(); ++i) {
    model_forward(out, batches[i].inputs, B, T, params, config);
    for (std::size_t j = 0; j < blocks.size(); ++j) {
      const RoutingOutput& r = out.blocks[static_cast<std::size_t>(blocks[j])].moe.routing;
      samples[j].ids.middleRows(static_cast<Index>(i) * N, N) = r.ids;
      samples[j].gates.middleRows(static_cast<Index>(i) * N, N) = r.gates;
    }
  }
  return samples;
}

}  // namespace moelab
