// moelab/reference/train.h — training the tiny language model of model.h: the configuration, a
// Trainer that owns parameters, gradients, AdamW and the step counter, deterministic evaluation,
// a unigram baseline, checkpoints that resume bit-identically, and the metrics as JSON lines.
//
// One step s (0-based) of a Trainer:
//   batch  = data.train_batch(s)                    (B, T) byte ids, next-byte targets, domains
//   lr     = learning_rate(schedule, s)             linear warm-up, cosine to min_lr (optim.h)
//   the batch is cut into M micro-batches of B/M sequences; for each, on its own thread if there
//   are threads to spare:  model_forward, model_loss, model_backward         (model.h)
//   grad   = mean over the micro-batches of their gradients, summed in micro-batch order
//   clip_grad_norm(grad, grad_clip); AdamW.step(lr)
//   aux_free: every MoE block's selection bias moves against the step's load (DeepSeek-V3)
// The loss of a micro-batch is cross-entropy + its MoE blocks' aux and z losses, as in
// data-parallel training where each device balances its own micro-batch. M is part of the
// configuration; the number of threads is not: any thread count gives the same bits.
//
// Determinism. Every random number is a function of (seed, step), never of what ran before:
//   initial parameters   init_model with Rng(stream_seed(seed, kInitStream, 0))
//   batch of step s      data.train_batch(s): the sampler's own function of (its seed, s)
//   router noise of step s, micro-batch m   Rng(stream_seed(seed, kNoiseStream, s * M + m))
// so a checkpoint needs only the step, the parameters, the selection biases and AdamW's state
// (all float32, stored exactly) to continue as if never interrupted: N steps straight and
// k steps, save, load into a fresh Trainer, N - k steps give the same bits (tested).
//
// Checkpoints. Trainer::save(DIR) writes a checkpoint directory:
//   DIR/model.safetensors      every parameter under its Hugging Face name (model_parameters) and
//                              the selection biases (model_buffers: ...mlp.gate.e_score_correction_bias),
//                              F32, metadata {"format": "pt"} as Hugging Face's writer puts it
//   DIR/optimizer.safetensors  per parameter "<name>.exp_avg", "<name>.exp_avg_sq" (F32, the
//                              parameter's shape) and "<name>.step" (I64 scalar): AdamW's state
//   DIR/config.json            {"format", "moelab_version", "model": to_json(the effective model
//                              config), "train": to_json(TrainConfig)}
//   DIR/trainer_state.json     step, tokens seen, seed, seconds trained, and the size and
//                              fingerprint of each of the three files above (written last)
// Atomicity: every file goes into a fresh sibling folder ".DIR.tmp.<pid>" (each file synced), which
// is then renamed onto DIR in one step (an existing checkpoint DIR is swapped out with Linux's
// renameat2(RENAME_EXCHANGE) and then removed). A crash leaves DIR as it was plus a .tmp folder
// that nothing reads: a checkpoint is either all there or not there at all. The fingerprints
// catch files changed or swapped by hand afterwards. In a run directory (run_training) the
// checkpoints are RUN/step-000500/, ... and RUN/latest (written atomically after the rename) names
// the newest; find_checkpoint(RUN) follows it, or takes the highest complete step-N folder.
//
// Trainer::load(DIR) checks every file, every name, dtype and shape, and the configuration, and
// changes nothing unless all of it is right; errors name the file and the problem, e.g.
//   "ckpt/model.safetensors: tensor 'model.layers.0.mlp.gate.weight': shape [8, 32]: must be [8, 64]"
//
// Shapes: B = batch size (sequences), T = sequence length, N = B*T tokens, V = vocabulary,
//         E = routed experts, D = domains.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "reference/analysis.h"
#include "reference/config_json.h"
#include "reference/corpus.h"
#include "reference/model.h"
#include "reference/observer.h"
#include "reference/optim.h"
#include "reference/recorder.h"
#include "reference/types.h"

namespace moelab {

// ---- Configuration -----------------------------------------------------------------------------

// How the MoE blocks are kept balanced. What it does to tiny_moe (default run, measured): with
// Mixtral's aux loss (preset = aux) the per-step load imbalance ends near 1.2 and the experts
// specialise on bytes (I(expert; byte) 1.76 bits in block 0) but hardly on domains (I(expert;
// domain) 0.02 - 0.03 bits, after 0.2 - 0.35 at step 100: the aux loss evens them out); with
// aux_free the imbalance ends near 1.6 and domains keep their experts (0.26 - 0.39 bits; Russian,
// Chinese and arithmetic each take mostly one or two experts), at val loss 1.86 instead of 1.84.
enum class BalanceMode {
  preset,    // as the model's preset does it (Mixtral: HF aux loss; DeepSeek-V3: bias + sequence loss)
  aux,       // the preset's balance loss only, no selection bias
  aux_free,  // DeepSeek-V3's selection bias moved by bias_update_rate, no balance loss
  none,      // neither: watch the router collapse
};
std::string_view balance_mode_name(BalanceMode mode);   // "preset", "aux", "aux_free", "none"
BalanceMode parse_balance_mode(std::string_view name);  // throws Error naming "balance"

// The defaults train tiny_moe on the corpus in a few minutes on two cores. Measured on the
// development machine (2 cores, idle, RelWithDebInfo): 2000 steps of 16 x 128 bytes (4.1M bytes)
// in 3m24s at 22.8k bytes/s (11.7k on one thread), validation loss 1.84 nats/byte against a
// unigram baseline of 4.17 (lr 3e-3 and 6e-3 do alike at 400 steps; 1.2e-2 a little worse).
struct TrainConfig {
  std::string model_name = "tiny_moe";  // a label (model_config's name) for messages and run folders
  ModelConfig model = tiny_moe();       // the architecture, before the three overrides below
  BalanceMode balance = BalanceMode::preset;
  double bias_update_rate = 0.001;           // aux_free: gamma (DeepSeek-V3's 0.001)
  std::optional<double> z_loss_coef{};       // every MoE block's router z-loss coefficient (ST-MoE)
  std::optional<double> capacity_factor{};   // token dropping at this capacity factor (else the preset's)

  Index batch_size = 16;     // B sequences per step
  Index seq_len = 128;       // T bytes per sequence
  Index micro_batches = 2;   // M: B/M sequences per forward/backward (the unit of parallelism)
  std::int64_t steps = 2000;
  std::uint64_t seed = 0;    // of the initial parameters, the batches and the router noise

  AdamWConfig adamw{.lr = 3e-3, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1};  // lr: the peak
  double min_lr = 3e-4;             // the cosine's end (nanoGPT: lr / 10)
  std::int64_t warmup_steps = 100;
  double grad_clip = 1.0;           // max global gradient norm; 0 = no clipping (the norm is still reported)

  std::int64_t eval_every = 100;        // evaluate after every this many steps (and after the last); 0 = last only
  Index eval_batches = 8;               // fixed validation batches of (B, T)
  std::int64_t checkpoint_every = 500;  // run_training: a checkpoint every this many steps (and at the end); 0 = end only

  // The model as trained: `model` with balance, z_loss_coef and capacity_factor applied. Where the
  // selection bias cannot go with gates from the selected logits (Mixtral, Llama 4 rank logits),
  // aux_free uses the equal gating on scores: softmax, top-k, renormalise (sigmoid, top-k).
  ModelConfig model_config() const;
  LrScheduleConfig lr_schedule() const;  // {adamw.lr, min_lr, warmup_steps, steps}
  // Throws Error naming the field, the value and the rule.
  void validate() const;
};

// The defaults with `model = model_config(name)`.
TrainConfig default_train_config(std::string_view model_name);

// Every field named as in the struct; the optionals are null when unset. Reading is strict (unknown,
// missing or mistyped keys are Errors naming the field, prefixed with `path`), then validate().
Json to_json(const TrainConfig& config);
TrainConfig train_config_from_json(const Json& j, std::string_view path = "train");

// ---- Data ------------------------------------------------------------------------------------------

// Where batches come from. train_batch(step) and val_batch(index) must depend only on their
// argument (and the source's fixed seed), never on earlier calls: that is what lets a resumed run
// see exactly the batches of an uninterrupted one. evaluate() calls val_batch from several threads
// at once. Batch is corpus.h's: inputs, targets (the next bytes) and domains (empty: all domain 0)
// are used; row_domain and row_offset are not.
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  virtual Batch train_batch(std::int64_t step) const = 0;
  virtual Batch val_batch(std::int64_t index) const = 0;
  // Names of the domain ids in Batch::domains; empty: domains are unnamed ("domain 0", ...).
  virtual std::vector<std::string> domain_names() const { return {}; }
  // The unigram distribution (V probabilities, all > 0) of the training bytes as training sees
  // them. This default: the targets of train_batch(0 .. 15), each count + 0.5 (Krichevsky-Trofimov).
  virtual std::vector<double> train_unigram(Index vocab_size) const;
};

// The corpus of corpus.h: training batches from the train split with the run's seed, validation
// batches from the val split with a fixed seed (kValidationSeed), so that runs of every seed are
// measured on the same validation bytes. train_unigram weighs the domains equally, as the sampler
// does: p(b) = mean over the train domains d of (count_d(b) + 0.5) / (bytes_d + V / 2).
class CorpusBatchSource : public BatchSource {
 public:
  static constexpr std::uint64_t kValidationSeed = 0x76616c6964617465ull;  // "validate"
  CorpusBatchSource(const Corpus& corpus, Index batch_size, Index seq_len, std::uint64_t seed);
  Batch train_batch(std::int64_t step) const override { return train_.batch(step); }
  Batch val_batch(std::int64_t index) const override { return val_.batch(index); }
  std::vector<std::string> domain_names() const override { return train_.domain_names(); }
  std::vector<double> train_unigram(Index vocab_size) const override;

 private:
  CorpusSampler train_;
  CorpusSampler val_;
};

// The unigram baseline: the mean cross-entropy (nats per byte) of `unigram` on the targets of
// val_batch(0 .. batches - 1), the same bytes evaluate() measures. A model that has learnt nothing
// but byte frequencies scores this; every context it uses shows as loss below it.
double unigram_baseline(const BatchSource& data, std::span<const double> unigram, Index batches);

// ---- The trainer ---------------------------------------------------------------------------------

struct StepMetrics {
  std::int64_t step = 0;         // the step taken, 0-based (the model has now had step + 1 updates)
  double lr = 0;
  double loss = 0;               // cross-entropy, nats per byte, mean over the micro-batches
  double aux = 0;                // balance losses (coefficients applied), summed over MoE blocks
  double z = 0;                  // router z-losses (coefficients applied), summed over MoE blocks
  double grad_norm = 0;          // global norm before clipping
  double seconds = 0;            // wall time of the step
  double tokens_per_second = 0;  // B*T / seconds
  std::vector<int> moe_layers{};                       // block index of each MoE block
  std::vector<std::vector<std::int64_t>> load{};       // (MoE blocks) (E) token-expert pairs per expert
  double load_imbalance = 0;     // max over MoE blocks of max load / mean load (1 = even; 0 dense)
  double dropped_fraction = 0;   // pairs dropped by capacity / pairs routed, over all MoE blocks
  // Router logits of every MoE block and micro-batch: sqrt(mean z^2) and max |z| (what z-loss
  // keeps small: Zoph et al. 2022, "ST-MoE"). 0 for a dense model.
  double logit_rms = 0;
  double logit_max_abs = 0;
};

struct EvalMetrics {
  std::int64_t step = 0;                  // steps taken when evaluated
  double loss = 0;                        // mean cross-entropy over eval_batches (B, T), nats per byte
  std::int64_t tokens = 0;
  std::vector<double> domain_loss{};      // (D) per domain id; NaN for a domain without tokens
  std::vector<std::int64_t> domain_tokens{};  // (D)
  std::vector<int> moe_layers{};          // block index of each MoE block
  std::vector<MatrixD> routing{};         // (MoE blocks) (D, E) token-expert pairs by domain and expert
  // (MoE blocks) mutual information I(domain; expert) in bits of a routed pair: 0 when every
  // domain is spread over the experts alike, up to min(log2 D, log2 E) when experts specialise.
  std::vector<double> specialisation{};
  // (MoE blocks) I(input byte; expert) in bits: how much the byte itself decides the expert
  // (OLMoE's vocabulary specialisation); up to log2 E. Plug-in estimates from eval_batches * B * T
  // tokens, biased upwards by about (bytes seen - 1)(E - 1) / (2 N ln 2) bits.
  std::vector<double> byte_specialisation{};
};

// How a Trainer runs; none of it changes a single bit of the results.
struct TrainerOptions {
  int threads = 0;                // 0: the hardware's, at most M
  Observer* events = nullptr;     // every stage's events of each training step (layer- and step-
                                  // stamped), for the viewer; micro-batches then run one after another
  std::string moelab_version{};   // written into checkpoints
};

class Trainer {
 public:
  // Validates the config; initialises the parameters from the seed. `data` must outlive the Trainer.
  Trainer(TrainConfig config, const BatchSource& data, TrainerOptions options = {});
  Trainer(const Trainer&) = delete;  // AdamW points into the parameters and gradients
  Trainer& operator=(const Trainer&) = delete;

  // One step as at the top of this file. Throws Error naming the step if the batch is malformed
  // or the loss or gradient norm is not finite (then nothing has changed).
  StepMetrics step();
  // Validation cross-entropy over val_batch(0 .. eval_batches - 1): no router noise, no updates;
  // the same parameters give the same bits.
  EvalMetrics evaluate() const;

  // See the top of this file. save throws Error naming the path on failure (DIR then unchanged);
  // load throws Error and leaves the trainer unchanged unless the checkpoint is complete, intact
  // and has this trainer's configuration (every field but steps, eval_every, eval_batches and
  // checkpoint_every, which do not change the trajectory).
  void save(const std::filesystem::path& dir) const;
  void load(const std::filesystem::path& dir);

  // Live changes (the viewer's balancing and z-loss controls, so that routing collapse can be made
  // to happen and undone mid-run). They change the configuration, and with it the trajectory, from
  // the next step() on; steps already taken are not redone. The parameters and AdamW's state stay;
  // a selection bias is created at 0 when the mode starts using one and dropped when it stops (a
  // fresh trainer of the new configuration holds the same buffers). A checkpoint saved afterwards
  // records the new configuration: resuming from it continues bit-identically, but re-running its
  // config.json from step 0 is not the run that made it (the change and its step are not recorded).
  //   set_balance: mode as in TrainConfig::balance; strength, when given, is the balance loss
  //     coefficient (model.moe.routing.aux_loss_coef) for preset and aux, bias_update_rate for
  //     aux_free, and must not be given for none.
  //   set_z_loss_coef: every MoE block's router z-loss coefficient (TrainConfig::z_loss_coef); unset:
  //     the preset's.
  // Both throw Error naming the field, the value and the rule, and change nothing, when the
  // configuration they give is invalid (e.g. aux_free with expert-choice selection).
  void set_balance(BalanceMode mode, std::optional<double> strength = {});
  void set_z_loss_coef(std::optional<double> coef);

  std::int64_t steps_done() const { return step_; }
  bool done() const { return step_ >= config_.steps; }
  double seconds_trained() const { return seconds_; }  // wall time of step(), saved in checkpoints
  const TrainConfig& config() const { return config_; }
  const ModelConfig& model_config() const { return model_; }  // config().model_config()
  const ModelParams& params() const { return params_; }
  const AdamW& optimizer() const { return adamw_; }
  const BatchSource& data() const { return data_; }
  int threads() const { return threads_; }

 private:
  TrainConfig config_;
  ModelConfig model_;       // as trained
  ModelConfig eval_model_;  // the same without router noise
  const BatchSource& data_;
  TrainerOptions options_;
  int threads_ = 1;
  ModelParams params_;
  ModelGrads grads_;                      // micro-batch 0's, then the mean
  std::vector<ModelGrads> micro_grads_;   // (M - 1) micro-batches 1 ..
  std::vector<ModelOutput> outputs_;      // (M)
  AdamW adamw_;
  std::int64_t step_ = 0;
  double seconds_ = 0;

  void reconfigure(TrainConfig next);  // set_balance, set_z_loss_coef: validate, then commit
};

// The seed of random stream `stream` at `index` (a step, or step * M + micro-batch).
inline constexpr std::uint64_t kInitStream = 0x696e6974ull;   // "init"
inline constexpr std::uint64_t kNoiseStream = 0x6e6f6973ull;  // "nois"
std::uint64_t stream_seed(std::uint64_t seed, std::uint64_t stream, std::uint64_t index);

// ---- Checkpoints in a run directory -------------------------------------------------------------

// The fingerprint trainer_state.json records of each file: FNV-1a (64 bits) of its bytes, as 16
// lower-case hex digits. It catches a file changed or swapped by hand, not an attacker.
std::string fnv1a64(std::span<const std::uint8_t> bytes);

// RUN/step-NNNNNN (at least six digits).
std::filesystem::path checkpoint_path(const std::filesystem::path& run_dir, std::int64_t step);
// Saves RUN/step-N for the trainer's step (replacing one that exists), then writes RUN/latest.
std::filesystem::path save_checkpoint(const Trainer& trainer, const std::filesystem::path& run_dir);
// DIR itself if it holds trainer_state.json; else the checkpoint that DIR/latest names; else the
// highest step-N folder of DIR (never a .tmp one). Throws Error naming DIR if there is none.
std::filesystem::path find_checkpoint(const std::filesystem::path& dir);
// The TrainConfig in a checkpoint's config.json, checked (for resuming: build the Trainer from it).
// The check includes that the checkpoint's model.safetensors is at least as large as the float32
// parameters of the model config.json describes, so that a damaged config.json is an Error rather
// than an attempt to allocate terabytes.
TrainConfig read_checkpoint_config(const std::filesystem::path& checkpoint_dir);

// A checkpoint's model, to use rather than to train (moelab analyze and route, the viewer, the
// notebooks): DIR as find_checkpoint takes it (a checkpoint, or a run folder: its latest), every
// file checked exactly as Trainer::load checks it.
struct CheckpointModel {
  std::filesystem::path path;  // the checkpoint folder that find_checkpoint chose
  TrainConfig config;          // as saved in config.json
  ModelConfig model;           // as trained: config.model_config()
  ModelConfig eval_model;      // `model` without router noise: what Trainer::evaluate runs
  ModelParams params;
  std::int64_t step = 0;       // steps trained
};
CheckpointModel load_checkpoint_model(const std::filesystem::path& dir);

// Every listed MoE block's choices for the tokens of `batches` (all of one shape (B, T)), one
// RoutingSample per block, rows in batch order: row i * B * T + n is token n of batch i. `config`
// runs as given (pass the eval model: no router noise); token-choice routing only (k per token).
// What `moelab analyze` and the Python module's analysis are computed from.
std::vector<RoutingSample> route_batches(const ModelConfig& config, const ModelParams& params,
                                         std::span<const Batch> batches, std::span<const int> blocks);
// The byte and the domain of every token of `batches`, in route_batches' row order.
TokenLabels batch_labels(std::span<const Batch> batches, std::vector<std::string> domain_names);

// ---- Metrics ----------------------------------------------------------------------------------------

namespace events {
// One per training step: values (MoE blocks, E) = StepMetrics::load; stats lr, loss, aux, z,
// grad_norm, seconds, tokens_per_second, load_imbalance, dropped_fraction, tokens (seen so far).
inline constexpr std::string_view train_step = "train_step";
// One per evaluation, step = steps taken: values (D, 1) = per-domain loss; stats loss, tokens,
// unigram_baseline (when known), then specialisation_<block> and byte_specialisation_<block> for
// each MoE block.
inline constexpr std::string_view eval = "eval";
}  // namespace events

void emit_metrics(Observer& observer, const StepMetrics& m, std::int64_t tokens_seen);
void emit_metrics(Observer& observer, const EvalMetrics& m, std::optional<double> baseline = {});

// The run's train_step and eval events as JSON lines (recorder.h's format) at `path`. They are
// kept in memory and flush() publishes them all through a JsonLinesFile: the file always holds
// whole lines, a prefix of the run, never a torn one. Other events are ignored.
class MetricsLog : public Observer {
 public:
  explicit MetricsLog(std::filesystem::path path) : path_(std::move(path)) {}
  void on_event(const Event& event) override;
  // A resumed run continues the history: keeps from the file at path (if any) the train_step
  // events of steps < steps_done and the eval events of steps <= steps_done.
  void keep_history(std::int64_t steps_done);
  void flush();
  const std::vector<RecordedEvent>& events() const { return events_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  std::vector<RecordedEvent> events_;
};

// ---- The loop -------------------------------------------------------------------------------------

struct RunCallbacks {
  std::function<void(double unigram_baseline)> on_start{};  // before the first step
  std::function<void(const StepMetrics&)> on_step{};
  std::function<void(const EvalMetrics&)> on_eval{};
  std::function<void(const std::filesystem::path&)> on_checkpoint{};
};

// Trains until trainer.done(): evaluates after every eval_every steps and after the last one,
// saves RUN/step-N every checkpoint_every steps and after the last one, and publishes
// RUN/metrics.jsonl (a MetricsLog continuing its history) after every evaluation and checkpoint.
// `observer` (may be null) gets the same train_step and eval events. A trainer that has resumed
// from a checkpoint of RUN continues where it stopped. Returns the last evaluation.
EvalMetrics run_training(Trainer& trainer, const std::filesystem::path& run_dir, const RunCallbacks& callbacks = {},
                         Observer* observer = nullptr);

}  // namespace moelab
