// `moelab bench --model NAME`: the CPU reference training the tiny language model, timed.
//
// Two measurements, each the median of --repeats runs after --warmup untimed ones:
//   train step   Trainer::step() on the default batch (B x T bytes, M micro-batches in parallel on
//                --threads threads): forward, backward, gradient clipping, AdamW. Tokens/s = B T / t.
//   MoE layer    moe_layer_forward, then moe_layer_backward, of one MoE block of the model on the
//                tokens of one micro-batch (B T / M rows of x ~ N(0, 1)), on one thread: what each
//                thread of the train step runs once per MoE block.
// The bytes are uniform random (the data does not change the work: dropless routing, every expert
// computes what it is given). tools/bench_torch_model.py times the same model in PyTorch on the
// same machine; docs/perf.md has both side by side.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "reference/accounting.h"
#include "reference/error.h"
#include "reference/layer.h"
#include "reference/random.h"
#include "reference/train.h"
#include "tools/bench.h"

namespace moelab::tools {
namespace {

// Uniform random bytes: batch `index` of a stream seeded by `seed`.
class RandomBytes : public BatchSource {
 public:
  RandomBytes(Index batch_size, Index seq_len, std::uint64_t seed) : B_(batch_size), T_(seq_len), seed_(seed) {}
  Batch train_batch(std::int64_t step) const override { return batch(2 * static_cast<std::uint64_t>(step)); }
  Batch val_batch(std::int64_t index) const override { return batch(2 * static_cast<std::uint64_t>(index) + 1); }

 private:
  Batch batch(std::uint64_t index) const {
    Rng rng(stream_seed(seed_, 0, index));
    Batch b;
    b.batch_size = B_;
    b.seq_len = T_;
    b.inputs.resize(static_cast<std::size_t>(B_ * T_));
    b.targets.resize(b.inputs.size());
    for (std::size_t i = 0; i < b.inputs.size(); ++i) {
      b.inputs[i] = static_cast<std::int32_t>(rng.next_u64() % 256);
      b.targets[i] = static_cast<std::int32_t>(rng.next_u64() % 256);
    }
    b.domains.assign(b.inputs.size(), 0);
    return b;
  }
  Index B_, T_;
  std::uint64_t seed_;
};

template <typename F>
std::vector<double> time_runs(int warmup, int repeats, F&& f) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> seconds;
  for (int i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    f();
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return seconds;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

nlohmann::ordered_json timing_json(const std::vector<double>& seconds, double tokens) {
  const double t = median(seconds);
  return {{"median_seconds", t},
          {"min_seconds", *std::min_element(seconds.begin(), seconds.end())},
          {"max_seconds", *std::max_element(seconds.begin(), seconds.end())},
          {"repeats", seconds.size()},
          {"tokens", tokens},
          {"tokens_per_second", tokens / t}};
}

}  // namespace

void run_model_bench(const ModelBenchOptions& o, nlohmann::ordered_json& doc) {
  TrainConfig config = default_train_config(o.model);
  config.steps = o.warmup + o.repeats;
  config.seed = o.seed;
  const RandomBytes data(config.batch_size, config.seq_len, o.seed);
  Trainer trainer(config, data, TrainerOptions{.threads = o.threads});
  const ModelConfig& model = trainer.model_config();
  const Accounting sizes = account(model_sizes(model), config.seq_len);
  const double step_tokens = static_cast<double>(config.batch_size * config.seq_len);
  fmt::print("{}: {} parameters, {} active per token; batch {} x {} bytes in {} micro-batches, {} thread(s)\n",
             o.model, sizes.total_params, sizes.active_params, config.batch_size, config.seq_len,
             config.micro_batches, trainer.threads());

  const std::vector<double> step_seconds = time_runs(o.warmup, o.repeats, [&] { trainer.step(); });
  doc = {{"command", "bench"},
         {"model", o.model},
         {"parameters", sizes.total_params},
         {"active_parameters", sizes.active_params},
         {"batch_size", config.batch_size},
         {"seq_len", config.seq_len},
         {"micro_batches", config.micro_batches},
         {"threads", trainer.threads()},
         {"train_step", timing_json(step_seconds, step_tokens)}};
  fmt::print("train step        {:8.2f} ms  {:9.0f} tokens/s  (median of {}, min {:.2f} ms, max {:.2f} ms)\n",
             1e3 * median(step_seconds), step_tokens / median(step_seconds), o.repeats,
             1e3 * doc["train_step"]["min_seconds"].get<double>(), 1e3 * doc["train_step"]["max_seconds"].get<double>());

  if (model.moe_layout == MoeLayout::dense) return;
  const Index N = config.batch_size * config.seq_len / config.micro_batches;
  Rng rng(stream_seed(o.seed, 1, 0));
  const LayerParams params = init_layer<float>(model.moe, rng, model.init_std);
  Matrix x(N, model.hidden_size), dy(N, model.hidden_size);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(rng.normal());
  for (Index i = 0; i < dy.size(); ++i) dy.data()[i] = static_cast<float>(rng.normal());
  LayerOutput out;
  LayerGradsT<float> grads;
  const std::vector<double> forward =
      time_runs(o.warmup, o.repeats, [&] { moe_layer_forward(out, x, {}, params, model.moe, &rng); });
  const std::vector<double> both = time_runs(o.warmup, o.repeats, [&] {
    moe_layer_forward(out, x, {}, params, model.moe, &rng);
    moe_layer_backward(grads, dy, out, x, params, model.moe);
  });
  doc["moe_layer"] = {{"tokens", N},
                      {"threads", 1},
                      {"forward", timing_json(forward, static_cast<double>(N))},
                      {"forward_backward", timing_json(both, static_cast<double>(N))}};
  fmt::print("MoE layer fwd     {:8.3f} ms  {:9.0f} tokens/s  ({} tokens, one thread)\n", 1e3 * median(forward),
             static_cast<double>(N) / median(forward), N);
  fmt::print("MoE layer fwd+bwd {:8.3f} ms  {:9.0f} tokens/s\n", 1e3 * median(both),
             static_cast<double>(N) / median(both));
}

}  // namespace moelab::tools
