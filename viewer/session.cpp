// moelab/viewer/session.cpp — see session.h.
#include "viewer/session.h"

#include <fmt/format.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <chrono>
#include <exception>

#include "reference/error.h"

namespace moelab::viewer {

namespace fs = std::filesystem;

TrainConfig SessionSettings::train_config() const {
  TrainConfig c = default_train_config(model_name);
  c.balance = balance;
  if (strength) {
    require(balance != BalanceMode::none, "strength", *strength, "balance = none has no strength to set");
    if (balance == BalanceMode::aux_free) {
      c.bias_update_rate = *strength;
    } else {
      c.model.moe.routing.aux_loss_coef = *strength;
    }
  }
  c.z_loss_coef = z_loss_coef;
  c.capacity_factor = capacity_factor;
  c.seed = seed;
  c.batch_size = batch_size;
  c.seq_len = seq_len;
  c.micro_batches = batch_size % 2 == 0 ? 2 : 1;  // as `moelab train`; the events then come per micro-batch
  c.steps = steps;
  c.eval_every = eval_every;
  c.eval_batches = eval_batches;
  c.checkpoint_every = 0;
  c.validate();
  return c;
}

struct Session::Run {
  TrainConfig config;
  std::string source;
  std::unique_ptr<CorpusBatchSource> data;
  RoutingCollector collector;           // the trainer's events go here: declared before the trainer
  std::unique_ptr<Trainer> trainer;
  double baseline = 0;
};

namespace {

double stat_or_nan(const RecordedEvent& e, std::string_view key) { return e.has_stat(key) ? e.stat(key) : NAN; }

// A damaged metrics.jsonl (edited by hand, truncated by a crash) is an Error naming the file, the
// event and its step, never a crash.
[[noreturn]] void damaged(const fs::path& metrics, const RecordedEvent& e, std::string_view what) {
  throw Error(fmt::format("{}: the {} event of step {}: {}", metrics.string(), e.name, e.step, what));
}

// train_step's values: the load of every MoE block, shape (L, E), counts of token-expert pairs.
std::vector<std::vector<std::int64_t>> load_of(const fs::path& metrics, const RecordedEvent& e) {
  if (e.shape.size() != 2 || e.shape[0] < 0 || e.shape[1] < 0 ||
      static_cast<std::size_t>(e.shape[0] * e.shape[1]) != e.values.size())
    damaged(metrics, e, "shape must be (MoE blocks, experts) and match its values");
  std::vector<std::vector<std::int64_t>> load(static_cast<std::size_t>(e.shape[0]));
  for (std::size_t i = 0; i < e.values.size(); ++i) {
    const double v = e.values[i];
    if (!(v >= 0 && v <= 9.0e15 && v == std::floor(v))) damaged(metrics, e, fmt::format("load {} is not a count", v));
    load[i / static_cast<std::size_t>(e.shape[1])].push_back(static_cast<std::int64_t>(v));
  }
  return load;
}

// eval's stats specialisation_<block> and byte_specialisation_<block>.
int block_of(const fs::path& metrics, const RecordedEvent& e, std::string_view key, std::string_view prefix) {
  const std::string_view digits = key.substr(prefix.size());
  int block = -1;
  const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), block);
  if (digits.empty() || ec != std::errc() || end != digits.data() + digits.size() || block < 0)
    damaged(metrics, e, fmt::format("stat \"{}\" must be {}<block>", key, prefix));
  return block;
}

}  // namespace

void read_run_history(const fs::path& metrics, std::int64_t steps_done, std::vector<StepPoint>& history,
                      std::vector<EvalMetrics>& evals) {
  std::error_code ec;
  if (!fs::is_regular_file(metrics, ec)) return;
  for (const RecordedEvent& e : read_json_lines_file(metrics)) {
    if (e.name == events::train_step && e.step < steps_done) {
      StepMetrics m{.step = e.step, .lr = stat_or_nan(e, "lr"), .loss = stat_or_nan(e, "loss"), .aux = stat_or_nan(e, "aux"),
                    .z = stat_or_nan(e, "z"), .grad_norm = stat_or_nan(e, "grad_norm"), .seconds = stat_or_nan(e, "seconds"),
                    .tokens_per_second = stat_or_nan(e, "tokens_per_second"),
                    .load_imbalance = stat_or_nan(e, "load_imbalance"), .dropped_fraction = stat_or_nan(e, "dropped_fraction"),
                    .logit_rms = stat_or_nan(e, "logit_rms"), .logit_max_abs = stat_or_nan(e, "logit_max_abs")};
      m.load = load_of(metrics, e);
      history.push_back(step_point(m));
    } else if (e.name == events::eval && e.step <= steps_done) {
      EvalMetrics m;
      m.step = e.step;
      m.loss = stat_or_nan(e, "loss");
      for (const auto& [key, value] : e.stats) {
        if (key.rfind("specialisation_", 0) == 0) {
          m.moe_layers.push_back(block_of(metrics, e, key, "specialisation_"));
          m.specialisation.push_back(value);
        } else if (key.rfind("byte_specialisation_", 0) == 0) {
          block_of(metrics, e, key, "byte_specialisation_");
          m.byte_specialisation.push_back(value);
        }
      }
      evals.push_back(std::move(m));
    }
  }
}

Session::Session(std::shared_ptr<const Corpus> corpus, SessionSettings settings, fs::path checkpoint)
    : corpus_(std::move(corpus)), initial_(settings), checkpoint_(std::move(checkpoint)), settings_(settings) {
  build(settings_, !checkpoint_.empty());  // throws here, on the caller's thread
  thread_ = std::thread([this] { worker(); });
}

Session::~Session() {
  {
    const std::lock_guard lock(mutex_);
    quit_ = true;
  }
  changed_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::shared_ptr<const Snapshot> Session::snapshot() const {
  const std::lock_guard lock(mutex_);
  return published_;
}

void Session::enqueue(std::function<void()> command) {
  {
    const std::lock_guard lock(mutex_);
    commands_.push_back(std::move(command));
  }
  changed_.notify_all();
}

void Session::start() {
  enqueue([this] { running_ = true; });
}
void Session::pause() {
  enqueue([this] { running_ = false; });
}
void Session::reset(SessionSettings settings) {
  enqueue([this, settings] {
    running_ = false;
    build(settings, false);
  });
}
void Session::reload_checkpoint() {
  enqueue([this] {
    require(!checkpoint_.empty(), "checkpoint", "(none)", "this session was not opened from a checkpoint");
    running_ = false;
    build(settings_, true);
  });
}
void Session::set_balance(BalanceMode mode, std::optional<double> strength) {
  enqueue([this, mode, strength] {
    run_->trainer->set_balance(mode, strength);
    settings_.balance = mode;
    settings_.strength = strength;
  });
}
void Session::set_z_loss(std::optional<double> coef) {
  enqueue([this, coef] {
    run_->trainer->set_z_loss_coef(coef);
    settings_.z_loss_coef = coef;
  });
}
void Session::set_stop_at(std::optional<std::int64_t> steps) {
  enqueue([this, steps] { settings_.stop_at = steps; });
}

void Session::save(fs::path run_dir) {
  enqueue([this, run_dir] {
    require(!run_dir.empty(), "save folder", "\"\"", "must name a folder");
    const fs::path path = checkpoint_path(run_dir, run_->trainer->steps_done());
    std::error_code ec;
    require(!fs::exists(path, ec), "save folder", path.string(),
            "exists already: choose another folder (a checkpoint is never replaced)");
    saved_ = save_checkpoint(*run_->trainer, run_dir).string();
  });
}

bool Session::wait_for(const std::function<bool(const Snapshot&)>& done, double seconds) const {
  std::unique_lock lock(mutex_);
  return changed_.wait_for(lock, std::chrono::duration<double>(seconds),
                           [&] { return published_ != nullptr && done(*published_); });
}

void Session::build(const SessionSettings& settings, bool from_checkpoint) {
  auto run = std::make_unique<Run>();
  fs::path path;
  if (from_checkpoint) {
    path = find_checkpoint(checkpoint_);
    run->config = read_checkpoint_config(path);
    // These four may differ from the checkpoint's (Trainer::load): the viewer evaluates more often,
    // on fewer batches, and saves nothing by itself.
    run->config.eval_every = settings.eval_every;
    run->config.eval_batches = settings.eval_batches;
    run->config.checkpoint_every = 0;
    run->source = path.string();
  } else {
    run->config = settings.train_config();
    run->source = "scratch";
  }
  run->data = std::make_unique<CorpusBatchSource>(*corpus_, run->config.batch_size, run->config.seq_len,
                                                  run->config.seed);
  run->trainer = std::make_unique<Trainer>(
      run->config, *run->data, TrainerOptions{.threads = 1, .events = &run->collector, .moelab_version = "viewer"});
  if (from_checkpoint) run->trainer->load(path);
  const std::vector<double> unigram = run->data->train_unigram(run->trainer->model_config().vocab_size);
  run->baseline = unigram_baseline(*run->data, unigram, run->config.eval_batches);

  run_ = std::move(run);
  settings_ = settings;
  if (from_checkpoint) {
    const TrainConfig& c = run_->trainer->config();
    settings_.model_name = c.model_name;
    settings_.balance = c.balance;
    settings_.seed = c.seed;
    settings_.batch_size = c.batch_size;
    settings_.seq_len = c.seq_len;
    settings_.steps = c.steps;
    settings_.z_loss_coef = c.z_loss_coef;
    settings_.capacity_factor = c.capacity_factor;
  }
  history_.clear();
  evals_.clear();
  byte_counts_.clear();
  error_.clear();
  if (from_checkpoint) read_run_history(path.parent_path() / "metrics.jsonl", run_->trainer->steps_done(), history_, evals_);
  inspect();
  publish(true);
}

void Session::inspect() {
  Run& r = *run_;
  const std::int64_t s = r.trainer->steps_done();
  const Batch batch = r.data->train_batch(s);
  r.collector.clear();
  ModelOutput out;
  const ModelConfig eval_model = without_router_noise(r.trainer->model_config());
  model_forward(out, batch.inputs, batch.batch_size, batch.seq_len, r.trainer->params(), eval_model, nullptr,
                &r.collector);
  routing_ = r.collector.assemble(batch, eval_model, s, false);
  for (std::size_t j = 0; j < routing_.layers.size(); ++j) {
    byte_counts_.resize(routing_.layers.size());
    accumulate_byte_counts(byte_counts_[j], routing_, j, 0.9);
  }
}

void Session::train_one_step() {
  Run& r = *run_;
  r.collector.clear();
  const StepMetrics m = r.trainer->step();
  routing_ = r.collector.assemble(r.data->train_batch(m.step), r.trainer->model_config(), m.step, true);
  byte_counts_.resize(routing_.layers.size());
  for (std::size_t j = 0; j < routing_.layers.size(); ++j) accumulate_byte_counts(byte_counts_[j], routing_, j, 0.9);
  history_.push_back(step_point(m));
  const std::int64_t every = r.trainer->config().eval_every;
  publish(every > 0 && r.trainer->steps_done() % every == 0);
}

void Session::publish(bool evaluate_now) {
  Run& r = *run_;
  if (evaluate_now) evals_.push_back(r.trainer->evaluate());
  auto snap = std::make_shared<Snapshot>();
  snap->version = ++version_;
  snap->steps_done = r.trainer->steps_done();
  snap->tokens_seen = snap->steps_done * r.config.batch_size * r.config.seq_len;
  snap->running = running_;
  snap->source = r.source;
  snap->error = error_;
  snap->saved = saved_;
  snap->config = r.trainer->config();
  snap->model = r.trainer->model_config();
  snap->eval_model = without_router_noise(snap->model);
  snap->params = std::make_shared<const ModelParams>(r.trainer->params());
  snap->domain_names = r.data->domain_names();
  snap->routing = routing_;
  snap->history = history_;
  snap->evals = evals_;
  snap->byte_counts = byte_counts_;
  snap->unigram_baseline = r.baseline;
  const std::size_t recent = std::min<std::size_t>(10, history_.size());
  for (std::size_t i = history_.size() - recent; i < history_.size(); ++i)
    snap->recent_tokens_per_second += history_[i].tokens_per_second / static_cast<double>(recent);

  // The router inputs of the first sequences, for the fp32 / bf16 comparison (numerics panel).
  if (snap->model.moe_layout != MoeLayout::dense && settings_.analysis_sequences > 0) {
    const Batch& b = routing_.batch;
    const Index B = std::min<Index>(settings_.analysis_sequences, b.batch_size);
    const std::span<const std::int32_t> ids(b.inputs.data(), static_cast<std::size_t>(B * b.seq_len));
    ModelOutput out;
    model_forward(out, ids, B, b.seq_len, *snap->params, snap->eval_model);
    for (Index i = 0; i < snap->model.n_layers; ++i)
      if (snap->model.is_moe(i)) snap->ffn_in.push_back(out.blocks[static_cast<std::size_t>(i)].ffn_in);
    try {
      snap->precision = router_precision(snap->ffn_in, ids, *snap->params, snap->eval_model, Format::bf16);
    } catch (const Error&) {
      snap->precision.reset();  // expert choice: no per-token top-k to compare
    }
  }
  {
    const std::lock_guard lock(mutex_);
    published_ = std::move(snap);
  }
  changed_.notify_all();
}

void Session::worker() {
  // Training yields to the window: on two cores, the frames come first (nice +10 for this thread only;
  // Linux gives each thread its own nice value).
  if (::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), 10) != 0) {
    // Not allowed (a container's limits): train at normal priority.
  }
  for (;;) {
    std::vector<std::function<void()>> commands;
    {
      std::unique_lock lock(mutex_);
      changed_.wait(lock, [&] { return quit_ || !commands_.empty() || running_; });
      if (quit_) return;
      commands.swap(commands_);
    }
    try {
      for (const std::function<void()>& c : commands) {
        try {
          c();
          error_.clear();
        } catch (const Error& e) {
          error_ = e.what();
        }
      }
      if (!commands.empty()) publish(false);
      if (!running_) continue;
      if (settings_.stop_at && run_->trainer->steps_done() >= *settings_.stop_at) {
        running_ = false;
        publish(false);
        continue;
      }
      train_one_step();
    } catch (const std::exception& e) {  // a diverged step, or anything else: stop and say so
      running_ = false;
      error_ = e.what();
      try {
        publish(false);
      } catch (const std::exception&) {
      }
    }
  }
}

std::shared_ptr<const Corpus> load_or_build_corpus(const fs::path& dir, std::string* note) {
  std::error_code ec;
  if (fs::exists(dir / "manifest.json", ec)) return std::make_shared<const Corpus>(read_corpus(dir));
  CorpusOptions options;
  options.moelab_version = "viewer";
  auto corpus = std::make_shared<const Corpus>(build_corpus(options));
  if (note != nullptr)
    *note = fmt::format("{} holds no corpus: built it in memory from the system's packages, as `moelab corpus` does "
                        "(tools/setup.sh writes it to data/corpus){}",
                        (dir / "manifest.json").string(), corpus->fallback ? "; " + corpus->notes.at(0) : "");
  return corpus;
}

}  // namespace moelab::viewer
