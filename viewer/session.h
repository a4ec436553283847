// moelab/viewer/session.h — what the viewer drives: a model, the corpus and a Trainer (train.h)
// running in a worker thread, and the snapshots the UI draws from.
//
// Threads. Only the worker touches the Trainer. The UI sends commands (start, pause, reset, a new
// balancing mode, ...) that the worker applies between two steps, and reads the latest Snapshot:
// an immutable object behind a shared_ptr, swapped under a mutex after every step. Taking a
// snapshot copies one pointer, so the UI never waits for a step to finish.
//
// What a step publishes. The Trainer reports every stage's events of its step
// (TrainerOptions::events, micro-batches one after another); a RoutingCollector keeps the routing
// ones (logits, top-k, gates, load, bias) and assembles the step's BatchRouting. After the step the
// worker also
//   - runs the first `analysis_sequences` sequences of the batch forward (no noise) with the updated
//     parameters, for the router inputs (ffn_in) that the bf16-versus-fp32 comparison needs;
//   - every eval_every steps (and at step 0) evaluates on eval_batches validation batches
//     (Trainer::evaluate): the domain x expert tables and mutual information.
// Before the first step (and after a reset, or when a checkpoint is opened) the batch the next step
// will train on is routed by an inspection forward through the same collector, so that every panel
// has something to show before anything has trained.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "reference/corpus.h"
#include "reference/train.h"
#include "viewer/panel_data.h"

namespace moelab::viewer {

// What a fresh run starts from (the training panel's preset, seed and balance controls).
struct SessionSettings {
  std::string model_name = "tiny_moe";         // model_config_names()
  BalanceMode balance = BalanceMode::preset;
  std::optional<double> strength{};            // Trainer::set_balance's
  std::optional<double> z_loss_coef{};
  std::optional<double> capacity_factor{};     // token dropping (unset: the preset's, dropless for tiny_moe)
  std::uint64_t seed = 0;
  Index batch_size = 16;                       // B
  Index seq_len = 128;                         // T
  std::int64_t steps = 2000;                   // the learning-rate schedule's length (training goes on after it at min_lr)
  std::int64_t eval_every = 50;
  Index eval_batches = 4;
  Index analysis_sequences = 4;                // sequences of the batch for the bf16 router comparison
  std::optional<std::int64_t> stop_at{};       // pause when this many steps are done
  // The TrainConfig these give (Error naming the field if invalid).
  TrainConfig train_config() const;
};

// The state of the session after a step, as the UI draws it. Never changed once published.
struct Snapshot {
  std::int64_t version = 0;         // increases with every publication
  std::int64_t steps_done = 0;
  std::int64_t tokens_seen = 0;
  bool running = false;
  std::string source;               // "scratch" or the checkpoint folder
  std::string error;                // the last command's or step's Error, if any
  std::string saved;                // the checkpoint folder the last save wrote, if any
  TrainConfig config;               // as trained now (live changes included)
  ModelConfig model;                // config.model_config()
  ModelConfig eval_model;           // without router noise
  std::shared_ptr<const ModelParams> params;
  std::vector<std::string> domain_names;
  BatchRouting routing;             // the latest step's routing (or the inspection forward's)
  std::vector<Matrix> ffn_in;       // (L) router inputs of the first analysis_sequences sequences
  std::optional<RouterPrecision> precision;  // fp32 versus bf16 router on those
  std::vector<StepPoint> history;   // every step trained in this session
  std::vector<EvalMetrics> evals;   // every evaluation
  std::vector<MatrixD> byte_counts; // (L) (256, E) pairs by byte and expert, the last ~10 batches
  double recent_tokens_per_second = 0;  // mean over the last 10 steps
  double unigram_baseline = 0;      // nats per byte: a model that learnt only byte frequencies
};

class Session {
 public:
  // A run from scratch with `settings`, or (checkpoint non-empty) the checkpoint that find_checkpoint
  // picks in that folder, loaded and ready to continue. The corpus must outlive the session. Errors
  // (a bad setting, a bad checkpoint) are thrown here, before any thread starts.
  Session(std::shared_ptr<const Corpus> corpus, SessionSettings settings, std::filesystem::path checkpoint = {});
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  std::shared_ptr<const Snapshot> snapshot() const;

  // Commands: queued, applied by the worker between steps; an Error shows in Snapshot::error.
  void start();
  void pause();
  void reset(SessionSettings settings);  // a fresh run (the checkpoint, if any, is left)
  void reload_checkpoint();              // back to the checkpoint this session opened
  void set_balance(BalanceMode mode, std::optional<double> strength);
  void set_z_loss(std::optional<double> coef);
  void set_stop_at(std::optional<std::int64_t> steps);
  // Saves the trainer's state as RUN/step-N (train.h save_checkpoint: atomic, then RUN/latest), so
  // that `moelab analyze --checkpoint RUN` or `moelab-viewer --checkpoint RUN` opens it. Refuses
  // (Error naming the folder) to replace a step-N folder that exists: that is another run's, or
  // this one's saved already, and nothing the user made is overwritten.
  void save(std::filesystem::path run_dir);

  // Waits until `done(snapshot)` holds or `seconds` pass; true if it holds (tests, screenshot mode).
  bool wait_for(const std::function<bool(const Snapshot&)>& done, double seconds) const;

  const SessionSettings& initial_settings() const { return initial_; }
  const std::filesystem::path& checkpoint() const { return checkpoint_; }

 private:
  struct Run;  // the trainer and its data, owned by the worker
  void worker();
  void enqueue(std::function<void()> command);
  void build(const SessionSettings& settings, bool from_checkpoint);  // worker thread (and constructor)
  void train_one_step();
  void inspect();
  void publish(bool evaluate_now);

  std::shared_ptr<const Corpus> corpus_;
  SessionSettings initial_;
  std::filesystem::path checkpoint_;

  // Worker state.
  std::unique_ptr<Run> run_;
  SessionSettings settings_;
  bool running_ = false;
  std::string error_;
  std::string saved_;
  std::vector<StepPoint> history_;
  std::vector<EvalMetrics> evals_;
  std::vector<MatrixD> byte_counts_;
  BatchRouting routing_;
  std::int64_t version_ = 0;

  // Shared with the UI.
  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  std::vector<std::function<void()>> commands_;
  std::shared_ptr<const Snapshot> published_;
  bool quit_ = false;
  std::thread thread_;
};

// The history of the run a checkpoint belongs to, from its metrics.jsonl (train.h's MetricsLog): a
// StepPoint per train_step event of a step < steps_done, and an EvalMetrics per eval event of a
// step <= steps_done with its loss and mutual information (no routing tables: those are not
// logged). Nothing when the file does not exist; Error naming the line when it is damaged.
void read_run_history(const std::filesystem::path& metrics, std::int64_t steps_done, std::vector<StepPoint>& history,
                      std::vector<EvalMetrics>& evals);

// The corpus the viewer trains on: `dir` (data/corpus, as tools/setup.sh writes it) if it holds one;
// else built in memory from the system's packages as `moelab corpus` does (a note says so). Throws
// Error if `dir` holds a damaged corpus.
std::shared_ptr<const Corpus> load_or_build_corpus(const std::filesystem::path& dir, std::string* note);

}  // namespace moelab::viewer
