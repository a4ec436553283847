// bench_observer — what the instrumentation costs (results in docs/perf.md).
//
// observer.h claims "zero cost when absent": with a null observer a stage pays one branch and
// computes no statistics. This measures softmax_forward<float> on router logits of T = 4096
// tokens and E = 64 experts five ways:
//   Baseline_InlineSoftmax          (d) a plain Eigen row softmax written here: no hook, no check
//   Baseline_InlineSoftmaxChecked   (e) the same plus softmax_forward's check of the input
//   Softmax_NullObserver            (a) softmax_forward(..., nullptr): the claim under test
//   Softmax_EmptyObserver           (b) an observer that ignores the event: statistics + a call
//   Softmax_MemoryRecorder          (c) a MemoryRecorder, cleared every iteration: + a copy
// Items are tokens (rows). Run (--benchmark_repetitions=5 --benchmark_report_aggregates_only=true
// gives the table in docs/perf.md):
//   build/bin/moelab_bench_observer --benchmark_repetitions=5
#include "reference/observer.h"
#include "reference/recorder.h"
#include "reference/scoring.h"
#include "reference/types.h"

#include <benchmark/benchmark.h>

#include <cmath>
#include <random>
#include <stdexcept>

namespace moelab {
namespace {

constexpr Index kTokens = 4096;
constexpr Index kExperts = 64;

Matrix make_logits() {
  std::mt19937 rng(20261123);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  Matrix logits(kTokens, kExperts);  // (T, E)
  for (Index i = 0; i < logits.size(); ++i) logits.data()[i] = normal(rng);
  return logits;
}

// The same mathematics as softmax_forward, with nothing around it.
void plain_softmax(Matrix& probs, const Matrix& logits) {
  for (Index t = 0; t < logits.rows(); ++t) {
    const float max_logit = logits.row(t).maxCoeff();
    probs.row(t).array() = (logits.row(t).array() - max_logit).exp();
    probs.row(t) /= probs.row(t).sum();
  }
}

// plain_softmax with softmax_forward's input check (the same screening sum), still no hook: the
// difference between this and Softmax_NullObserver is the hook alone.
void plain_softmax_checked(Matrix& probs, const Matrix& logits) {
  if (!std::isfinite(logits.sum())) throw std::invalid_argument("non-finite logits");
  plain_softmax(probs, logits);
}

class EmptyObserver : public Observer {
 public:
  void on_event(const Event& event) override { benchmark::DoNotOptimize(rows_ = event.shape[0]); }

 private:
  std::int64_t rows_ = 0;
};

template <typename Run>
void run(benchmark::State& state, Run&& softmax) {
  const Matrix logits = make_logits();
  Matrix probs(kTokens, kExperts);
  for (auto _ : state) {
    softmax(probs, logits);
    benchmark::DoNotOptimize(probs.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * kTokens);
}

void Baseline_InlineSoftmax(benchmark::State& state) {
  run(state, [](Matrix& probs, const Matrix& logits) { plain_softmax(probs, logits); });
}

void Baseline_InlineSoftmaxChecked(benchmark::State& state) {
  run(state, [](Matrix& probs, const Matrix& logits) { plain_softmax_checked(probs, logits); });
}

void Softmax_NullObserver(benchmark::State& state) {
  run(state, [](Matrix& probs, const Matrix& logits) { softmax_forward(probs, logits, nullptr); });
}

void Softmax_EmptyObserver(benchmark::State& state) {
  EmptyObserver observer;
  run(state, [&](Matrix& probs, const Matrix& logits) {
    softmax_forward(probs, logits, &observer);
  });
}

void Softmax_MemoryRecorder(benchmark::State& state) {
  MemoryRecorder recorder;
  run(state, [&](Matrix& probs, const Matrix& logits) {
    softmax_forward(probs, logits, &recorder);
    recorder.clear();
  });
}

BENCHMARK(Baseline_InlineSoftmax)->Unit(benchmark::kMicrosecond);
BENCHMARK(Baseline_InlineSoftmaxChecked)->Unit(benchmark::kMicrosecond);
BENCHMARK(Softmax_NullObserver)->Unit(benchmark::kMicrosecond);
BENCHMARK(Softmax_EmptyObserver)->Unit(benchmark::kMicrosecond);
BENCHMARK(Softmax_MemoryRecorder)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace moelab

BENCHMARK_MAIN();
