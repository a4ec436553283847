// `moelab train`: trains the tiny byte-level language model (reference/train.h) on the corpus, with a
// progress bar, an evaluation line every eval_every steps, checkpoints and metrics in the run folder,
// and a summary against the unigram baseline at the end.
//
//   moelab train [--preset NAME] [--balance preset|aux|aux_free|none] [--z-loss W] [--capacity-factor C]
//                [--steps N] [--seed S] [--batch B] [--seq T] [--lr LR] [--micro-batches M] [--threads N]
//                [--eval-every N] [--checkpoint-every N] [--corpus DIR] [--out DIR] [--resume DIR] [--json]
//
// The run folder (--out, default runs/<preset>-<seed>) receives metrics.jsonl, step-N/ checkpoints
// and `latest`. --resume DIR (a run folder or a checkpoint) continues a run bit-identically: the
// configuration comes from the checkpoint; only --steps (to train longer), --eval-every,
// --checkpoint-every, --threads, --corpus, --out and --json may be given with it.
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <memory>
#include <numeric>
#include <optional>
#include <string>

#include "reference/accounting.h"
#include "reference/corpus.h"
#include "reference/error.h"
#include "reference/train.h"
#include "tools/commands.h"

#ifndef MOELAB_VERSION
#define MOELAB_VERSION "0.0.0"
#endif

namespace moelab::tools {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

struct TrainOptions {
  std::string preset = "tiny_moe";
  std::string balance = "preset";
  std::optional<double> z_loss;
  std::optional<double> capacity_factor;
  std::optional<std::int64_t> steps;
  std::optional<std::uint64_t> seed;
  std::optional<Index> batch;
  std::optional<Index> seq;
  std::optional<double> lr;
  std::optional<Index> micro_batches;
  std::optional<std::int64_t> eval_every;
  std::optional<std::int64_t> checkpoint_every;
  int threads = 0;
  std::string corpus = "data/corpus";
  bool corpus_given = false;
  std::string out;
  std::string resume;
  bool json = false;
  // Which options were on the command line (for --resume's rules).
  std::vector<std::string> given;
};

std::string duration_text(double seconds) {
  const auto s = static_cast<std::int64_t>(std::max(0.0, std::round(seconds)));
  if (s >= 3600) return fmt::format("{}h{:02d}m", s / 3600, (s / 60) % 60);
  if (s >= 60) return fmt::format("{}m{:02d}s", s / 60, s % 60);
  return fmt::format("{}s", s);
}

std::string rate_text(double tokens_per_second) {
  return tokens_per_second >= 1000 ? fmt::format("{:.1f}k", tokens_per_second / 1000)
                                   : fmt::format("{:.0f}", tokens_per_second);
}

bool given(const TrainOptions& o, std::string_view name) {
  return std::find(o.given.begin(), o.given.end(), name) != o.given.end();
}

TrainConfig fresh_config(const TrainOptions& o) {
  TrainConfig c = default_train_config(o.preset);
  try {
    c.balance = parse_balance_mode(o.balance);
  } catch (const Error&) {
    fail("--balance", o.balance, "must be one of preset, aux, aux_free, none");
  }
  c.z_loss_coef = o.z_loss;
  c.capacity_factor = o.capacity_factor;
  if (o.steps) c.steps = *o.steps;
  if (o.seed) c.seed = *o.seed;
  if (o.batch) c.batch_size = *o.batch;
  if (o.seq) c.seq_len = *o.seq;
  if (o.lr) {
    require(std::isfinite(*o.lr) && *o.lr > 0, "--lr", *o.lr, "must be finite and > 0");
    c.adamw.lr = *o.lr;
    c.min_lr = *o.lr / 10;
  }
  // An odd batch cannot be halved: one micro-batch then, unless asked otherwise.
  if (o.micro_batches) {
    c.micro_batches = *o.micro_batches;
  } else if (c.batch_size % c.micro_batches != 0) {
    c.micro_batches = 1;
  }
  return c;
}

std::string bits_list(const std::vector<double>& values) {
  std::string s;
  for (double v : values) s += fmt::format("{}{:.2f}", s.empty() ? "" : " ", v);
  return s;
}

void print_eval(const EvalMetrics& e, const TrainConfig& c, double baseline) {
  fmt::print("step {:>{}}/{}  val loss {:.4f} (unigram {:.4f})", e.step, fmt::formatted_size("{}", c.steps), c.steps,
             e.loss, baseline);
  if (!e.moe_layers.empty())
    fmt::print("  I(expert; domain) {}  I(expert; byte) {} bits", bits_list(e.specialisation),
               bits_list(e.byte_specialisation));
  fmt::print("\n");
  std::fflush(stdout);
}

void run_train(const TrainOptions& o) {
  const auto wall_start = std::chrono::steady_clock::now();
  // The configuration: from the checkpoint, or from the flags.
  TrainConfig config;
  std::optional<fs::path> checkpoint;
  fs::path out = o.out;
  if (!o.resume.empty()) {
    for (const char* flag : {"--preset", "--balance", "--z-loss", "--capacity-factor", "--seed", "--batch", "--seq",
                             "--lr", "--micro-batches"})
      require(!given(o, flag), flag, "(given)",
              "comes from the checkpoint with --resume; only --steps, --eval-every, --checkpoint-every, --threads, "
              "--corpus, --out and --json go with it");
    checkpoint = find_checkpoint(o.resume);
    config = read_checkpoint_config(*checkpoint);
    if (o.steps) config.steps = *o.steps;
    if (out.empty()) out = checkpoint->parent_path().empty() ? fs::path(".") : checkpoint->parent_path();
  } else {
    config = fresh_config(o);
    if (out.empty()) out = fs::path("runs") / fmt::format("{}-{}", config.model_name, config.seed);
    std::error_code ec;
    if (fs::exists(out / "latest", ec) || fs::exists(out / "metrics.jsonl", ec))
      fail("--out", out.string(),
           fmt::format("already holds a run; continue it with --resume {} or choose another --out", out.string()));
  }
  if (o.eval_every) config.eval_every = *o.eval_every;
  if (o.checkpoint_every) config.checkpoint_every = *o.checkpoint_every;
  require(o.threads >= 0 && o.threads <= 256, "--threads", o.threads, "must be in [0, 256] (0: every core)");
  try {
    config.validate();
  } catch (const Error& e) {
    throw Error(fmt::format("configuration: {}", e.what()));
  }

  const LoadedCorpus loaded = load_corpus_or_generated(o.corpus, o.corpus_given);
  const CorpusBatchSource data(loaded.corpus, config.batch_size, config.seq_len, config.seed);
  Trainer trainer(config, data, TrainerOptions{.threads = o.threads, .moelab_version = MOELAB_VERSION});
  std::optional<std::int64_t> resumed_from;
  if (checkpoint) {
    trainer.load(*checkpoint);
    resumed_from = trainer.steps_done();
  }
  const std::vector<std::string> domains = data.domain_names();
  const Accounting sizes = account(model_sizes(trainer.model_config()), config.seq_len);

  const bool tty = !o.json && ::isatty(STDERR_FILENO) == 1;
  if (!o.json) {
    if (loaded.fallback) fmt::print("note: {}\n", loaded.message);
    fmt::print("training {} ({} parameters, {} active per token) on {} domains: {}\n", config.model_name,
               sizes.total_params, sizes.active_params, domains.size(), fmt::join(domains, ", "));
    fmt::print("batch {} x {} bytes, {} steps, seed {}, balance {}, lr {:g} -> {:g}, {} thread(s); run folder {}\n",
               config.batch_size, config.seq_len, config.steps, config.seed, balance_mode_name(config.balance),
               config.adamw.lr, config.min_lr, std::min<Index>(trainer.threads(), config.micro_batches), out.string());
    if (resumed_from) fmt::print("resumed from {} at step {}\n", checkpoint->string(), *resumed_from);
    std::fflush(stdout);
  }

  double baseline = 0;
  double ema_seconds = 0;  // seconds per step, smoothed
  std::int64_t session_steps = 0;
  double session_seconds = 0;
  std::deque<double> recent_losses;  // of the last 50 steps
  std::optional<fs::path> last_checkpoint;
  RunCallbacks callbacks;
  callbacks.on_start = [&](double b) {
    baseline = b;
    if (o.json) return;
    fmt::print("unigram baseline (training byte frequencies on the validation bytes): {:.4f} nats/byte\n", b);
    std::fflush(stdout);
  };
  callbacks.on_step = [&](const StepMetrics& m) {
    ++session_steps;
    session_seconds += m.seconds;
    ema_seconds = session_steps == 1 ? m.seconds : 0.9 * ema_seconds + 0.1 * m.seconds;
    recent_losses.push_back(m.loss);
    if (recent_losses.size() > 50) recent_losses.pop_front();
    if (!tty) return;
    const std::int64_t done = m.step + 1;
    const double fraction = static_cast<double>(done) / static_cast<double>(config.steps);
    constexpr int kWidth = 20;
    const int filled = static_cast<int>(fraction * kWidth);
    const double tokens_per_second = static_cast<double>(config.batch_size * config.seq_len) / ema_seconds;
    fmt::print(stderr, "\r\033[K{:>{}}/{} [{}{}] {:3.0f}% | {} tok/s | loss {:.4f} | aux {:.4f} | imbalance {:.2f} | ETA {}",
               done, fmt::formatted_size("{}", config.steps), config.steps, std::string(filled, '#'),
               std::string(kWidth - filled, '.'), 100 * fraction, rate_text(tokens_per_second), m.loss, m.aux,
               m.load_imbalance, duration_text(ema_seconds * static_cast<double>(config.steps - done)));
    std::fflush(stderr);
  };
  callbacks.on_eval = [&](const EvalMetrics& e) {
    if (o.json) return;
    if (tty) fmt::print(stderr, "\r\033[K");
    print_eval(e, config, baseline);
  };
  callbacks.on_checkpoint = [&](const fs::path& path) { last_checkpoint = path; };

  const EvalMetrics final_eval = run_training(trainer, out, callbacks);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_start).count();
  // The mean of the last (up to) 50 steps of this run; none when it trained no step.
  const bool trained = !recent_losses.empty();
  const double train_loss = trained ? std::accumulate(recent_losses.begin(), recent_losses.end(), 0.0) /
                                          static_cast<double>(recent_losses.size())
                                    : 0.0;
  const double tokens_per_second =
      session_seconds > 0 ? static_cast<double>(session_steps * config.batch_size * config.seq_len) / session_seconds : 0;

  if (o.json) {
    json doc = {{"command", "train"}, {"model", config.model_name}, {"out", out.string()}};
    doc["checkpoint"] = last_checkpoint ? json(last_checkpoint->string()) : json(nullptr);
    doc["resumed_from"] = resumed_from ? json(*resumed_from) : json(nullptr);
    doc["corpus"] = {{"path", o.corpus}, {"fallback", loaded.fallback}, {"message", loaded.message}, {"domains", domains}};
    doc["config"] = to_json(config);
    doc["steps"] = trainer.steps_done();
    doc["steps_this_run"] = session_steps;
    doc["unigram_baseline"] = json_number(baseline);
    doc["train_loss"] = trained ? json_number(train_loss) : json(nullptr);
    doc["val_loss"] = json_number(final_eval.loss);
    json per_domain = json::object();
    for (std::size_t d = 0; d < final_eval.domain_loss.size(); ++d)
      per_domain[d < domains.size() ? domains[d] : fmt::format("domain {}", d)] = json_number(final_eval.domain_loss[d]);
    doc["val_loss_by_domain"] = per_domain;
    doc["moe_layers"] = final_eval.moe_layers;
    json spec = json::array();
    for (double s : final_eval.specialisation) spec.push_back(json_number(s));
    doc["specialisation_bits"] = spec;
    json byte_spec = json::array();
    for (double s : final_eval.byte_specialisation) byte_spec.push_back(json_number(s));
    doc["byte_specialisation_bits"] = byte_spec;
    json routing = json::array();  // per MoE block: (D, E) token-expert pairs of the validation bytes
    for (const MatrixD& counts : final_eval.routing) routing.push_back(json_rows(counts));
    doc["routing_by_domain"] = routing;
    doc["seconds"] = seconds;
    doc["tokens_per_second"] = json_number(tokens_per_second);
    doc["threads"] = std::min<Index>(trainer.threads(), config.micro_batches);
    fmt::print("{}\n", doc.dump(2));
    return;
  }
  if (tty) fmt::print(stderr, "\r\033[K");
  if (session_steps == 0) {
    fmt::print("\nnothing to train: the run already stands at step {} of {}\n", trainer.steps_done(), config.steps);
  } else {
    fmt::print("\ndone: {} steps in {} ({} tok/s while training)\n", trainer.steps_done(), duration_text(seconds),
               rate_text(tokens_per_second));
  }
  if (trained) fmt::print("train loss {:.4f} (mean of the last {} steps)\n", train_loss, recent_losses.size());
  fmt::print("val loss   {:.4f}   unigram baseline {:.4f}   ({:.1f}% of the baseline)\n", final_eval.loss, baseline,
             100 * final_eval.loss / baseline);
  fmt::print("val loss by domain:\n");
  for (std::size_t d = 0; d < final_eval.domain_loss.size(); ++d)
    fmt::print("  {:<16} {}\n", d < domains.size() ? domains[d] : fmt::format("domain {}", d),
               final_eval.domain_tokens[d] > 0 ? fmt::format("{:.4f}", final_eval.domain_loss[d])
                                               : std::string("- (not in the validation batches)"));
  if (last_checkpoint) fmt::print("checkpoint {}; metrics {}\n", last_checkpoint->string(), (out / "metrics.jsonl").string());
}

}  // namespace

void add_train_command(CLI::App& app) {
  auto o = std::make_shared<TrainOptions>();
  CLI::App* cmd = app.add_subcommand("train", "Train the tiny byte-level MoE language model on the corpus");
  cmd->add_option("--preset", o->preset, "model: tiny_moe (default), tiny_dense or a preset name (see moelab presets)");
  cmd->add_option("--balance", o->balance, "load balancing: preset (default: as the preset does), aux, aux_free, none");
  cmd->add_option("--z-loss", o->z_loss, "router z-loss coefficient of every MoE block");
  cmd->add_option("--capacity-factor", o->capacity_factor, "drop tokens beyond this capacity factor");
  cmd->add_option("--steps", o->steps, "training steps (default 2000)");
  cmd->add_option("--seed", o->seed, "seed of the initial weights, the batches and the router noise (default 0)");
  cmd->add_option("--batch", o->batch, "sequences per step B (default 16)");
  cmd->add_option("--seq", o->seq, "bytes per sequence T (default 128)");
  cmd->add_option("--lr", o->lr, "peak learning rate (default 3e-3; the cosine ends at lr / 10)");
  cmd->add_option("--micro-batches", o->micro_batches, "split each batch into M parts, run in parallel (default 2)");
  cmd->add_option("--threads", o->threads, "threads (default 0: every core); never changes the results");
  cmd->add_option("--eval-every", o->eval_every, "evaluate every N steps (default 100; 0: at the end only)");
  cmd->add_option("--checkpoint-every", o->checkpoint_every, "checkpoint every N steps (default 500; 0: at the end)");
  cmd->add_option("--corpus", o->corpus, "corpus folder from `moelab corpus` (default data/corpus)");
  cmd->add_option("--out", o->out, "run folder (default runs/<preset>-<seed>)");
  cmd->add_option("--resume", o->resume, "continue the run in this folder (or from this checkpoint)");
  cmd->add_flag("--json", o->json, "print one JSON document at the end instead of progress and tables");
  cmd->callback([o, cmd] {
    for (const CLI::Option* option : cmd->get_options())
      if (option->count() > 0) o->given.push_back(option->get_name());
    o->corpus_given = given(*o, "--corpus");
    run_train(*o);
  });
}

}  // namespace moelab::tools
