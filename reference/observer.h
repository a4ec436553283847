// moelab/reference/observer.h — the one instrumentation path of moelab.
//
// Every stage reports what it did as named Events to an optional Observer. The names are those of
// the MoE intermediates (as ggml names them: ffn_moe_logits, ffn_moe_probs, ...), so the viewer,
// the notebooks, the CLI, the tests and the golden files all speak of the same things.
//
// Zero cost when absent: a stage calls
//   emit(observer, [&](Observer& o) { Stat s[] = {...}; o.on_event(Event{...}); });
// With a null observer the lambda is never called, so no statistic is computed and nothing is
// allocated; what remains is one predictable branch (reference/bench/bench_observer.cpp measures
// it). The lambda delivers the event itself so the buffers it builds outlive on_event().
//
// An Event only *views* the stage's buffers (spans); an observer that keeps it must copy
// (MemoryRecorder does). Shapes are row-major (rows, cols); a vector is (n, 1), a scalar (1, 1).
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string_view>
#include <type_traits>

namespace moelab {

// The event names. A stage may emit others, but these are the shared vocabulary.
namespace events {
inline constexpr std::string_view router_logits = "router_logits";  // (T, E) logits + statistics
inline constexpr std::string_view scores = "scores";                // (T, E) softmax / sigmoid
inline constexpr std::string_view topk_ids = "topk_ids";            // (T, k) chosen experts
// (E, C) the tokens each expert chose (expert choice), best first; stats unrouted_tokens (tokens
// no expert took: Zhou et al. 2022), max_experts_per_token.
inline constexpr std::string_view expert_choice_ids = "expert_choice_ids";
inline constexpr std::string_view gates = "gates";                  // (T, k) gate weights
inline constexpr std::string_view expert_load = "expert_load";      // (E, 1) pairs per expert chosen
inline constexpr std::string_view dispatched = "dispatched";        // (E, 1) rows per expert after capacity
inline constexpr std::string_view dropped = "dropped";              // (E, 1) dropped per expert
// One per expert_forward: statistics of the hidden activations h (n, H): rows, hidden_rms,
// hidden_abs_max, zero_fraction (exact zeros of h: relu's activation sparsity), and for
// swiglu_clamped gate_clamped / up_clamped (pre-activations strictly beyond the limits; 0 for the
// other activations). RMS, max and zero fraction are NaN when n = 0.
inline constexpr std::string_view expert_hidden = "expert_hidden";
inline constexpr std::string_view losses = "losses";                // statistics: aux, z, ...
inline constexpr std::string_view bias = "bias";                    // (E, 1) balancing bias
inline constexpr std::string_view numerics = "numerics";            // overflow / NaN counts
inline constexpr std::string_view timing = "timing";                // statistics: seconds
}  // namespace events

struct Stat {
  std::string_view key;
  double value;
};

// Built with designated initializers: Event{.name = events::scores, .shape = {T, E}, .f32 = ...}.
// Every member but `name` has a default, so -Wextra (missing-field-initializers) stays quiet about
// the members left out and still flags an Event built without a name.
struct Event {
  std::string_view name;                      // one of events::*
  int layer = -1;                             // -1 when not inside a model layer
  std::int64_t step = -1;                     // training step, -1 outside training
  std::array<std::int64_t, 2> shape{0, 0};    // of f32, f64 or i32 (whichever is non-empty)
  std::span<const float> f32{};               // row-major values (float32 stages)
  std::span<const double> f64{};              // row-major values (double stages: checks, golden)
  std::span<const std::int32_t> i32{};        // row-major ids
  std::span<const Stat> stats{};              // named scalars: min, max, overflow_count, ...
};

class Observer {
 public:
  virtual ~Observer() = default;
  virtual void on_event(const Event& event) = 0;
};

// Points event.f32 or event.f64 (whichever matches Scalar) at n row-major values.
template <typename Scalar>
void set_values(Event& event, const Scalar* data, std::size_t n) {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>);
  if constexpr (std::is_same_v<Scalar, float>) {
    event.f32 = std::span<const float>(data, n);
  } else {
    event.f64 = std::span<const double>(data, n);
  }
}

// Runs `deliver(*observer)` only when someone is listening.
template <typename Deliver>
inline void emit(Observer* observer, Deliver&& deliver) {
  if (observer != nullptr) [[unlikely]] deliver(*observer);
}

}  // namespace moelab
