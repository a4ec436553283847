// moelab/reference/selection.cpp — see selection.h. T = tokens, E = experts, k = experts per token,
// C = tokens per expert, G = groups (or devices), S = E / G experts per group, V = vocabulary.
#include "reference/selection.h"

#include "reference/error.h"
#include "reference/math.h"
#include "reference/random.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <numeric>
#include <string_view>
#include <utility>

namespace moelab {
namespace {

// ---- validation --------------------------------------------------------------------------------

template <typename Scalar>
void require_experts(const MatrixT<Scalar>& scores) {
  require(scores.cols() >= 1, "scores.cols()", scores.cols(),
          "the number of experts E must be at least 1");
}

void require_top_k(int k, Index num_experts) {
  require(k >= 1, "top_k", k, "must be at least 1");
  if (k > num_experts) {
    fail("top_k", k, fmt::format("must not exceed num_experts = {}", num_experts));
  }
}

// A NaN or an infinity makes the sum non-finite, so one vectorised sum screens the input and only
// then (or when a sum of finite scores overflowed) are the elements searched one by one.
template <typename Scalar>
void require_finite_scores(const MatrixT<Scalar>& scores) {
  if (std::isfinite(scores.sum())) [[likely]] {
    return;
  }
  for (Index t = 0; t < scores.rows(); ++t) {
    for (Index e = 0; e < scores.cols(); ++e) {
      if (!std::isfinite(scores(t, e))) {
        fail(fmt::format("scores[{},{}]", t, e), scores(t, e),
             "must be finite (a NaN has no order to select by)");
      }
    }
  }
}

template <typename Scalar>
void require_bias(const VectorT<Scalar>* bias, Index num_experts) {
  if (bias == nullptr) return;
  if (bias->size() != num_experts) {
    fail("selection_bias size", bias->size(),
         fmt::format("must equal num_experts = {}", num_experts));
  }
  for (Index e = 0; e < bias->size(); ++e) {
    if (!std::isfinite((*bias)(e))) {
      fail(fmt::format("selection_bias[{}]", e), (*bias)(e), "must be finite");
    }
  }
}

// The rules of group-limited routing, in the caller's words (groups or devices).
void require_group_limit(int k, Index num_experts, int groups, int kept,
                         std::string_view groups_name, std::string_view kept_name,
                         std::string_view what) {
  require(groups >= 1, groups_name, groups, "must be at least 1");
  if (num_experts % groups != 0) {
    fail(groups_name, groups, fmt::format("must divide num_experts = {}", num_experts));
  }
  require(kept >= 1, kept_name, kept, "must be at least 1");
  if (kept > groups) {
    fail(kept_name, kept, fmt::format("must not exceed {} = {}", groups_name, groups));
  }
  const Index per_group = num_experts / groups;
  if (k > kept * per_group) {
    fail("top_k", k,
         fmt::format(
             "must not exceed {} * (num_experts / {}) = {} * {} = {}, the experts in the kept {}",
             kept_name, groups_name, kept, per_group, kept * per_group, what));
  }
}

// ---- ranking -----------------------------------------------------------------------------------

// out[0..n) = the positions of the n largest of values[0..size), largest first; equal values go
// to the lower position, which is what a stable sort by descending value gives. `order` is scratch.
template <typename Scalar>
void top_n(std::int32_t* out, const Scalar* values, Index size, Index n,
           std::vector<std::int32_t>& order) {
  order.resize(static_cast<std::size_t>(size));
  std::iota(order.begin(), order.end(), 0);
  const auto better = [values](std::int32_t a, std::int32_t b) {
    return values[a] > values[b] || (values[a] == values[b] && a < b);
  };
  std::partial_sort(order.begin(), order.begin() + n, order.end(), better);
  std::copy_n(order.begin(), n, out);
}

// ---- events ------------------------------------------------------------------------------------

}  // namespace

std::string_view group_score_name(GroupScore score) {
  switch (score) {
    case GroupScore::top2_sum: return "top2_sum";
    case GroupScore::max: return "max";
  }
  fail("group.score", static_cast<int>(score), "is not a known GroupScore");
}

GroupScore parse_group_score(std::string_view name) {
  for (GroupScore s : {GroupScore::top2_sum, GroupScore::max})
    if (group_score_name(s) == name) return s;
  fail("group.score", fmt::format("\"{}\"", name), "must be one of top2_sum, max");
}

std::string_view group_mask_name(GroupMask mask) {
  switch (mask) {
    case GroupMask::neg_inf: return "neg_inf";
    case GroupMask::zero: return "zero";
  }
  fail("group.mask", static_cast<int>(mask), "is not a known GroupMask");
}

GroupMask parse_group_mask(std::string_view name) {
  for (GroupMask m : {GroupMask::neg_inf, GroupMask::zero})
    if (group_mask_name(m) == name) return m;
  fail("group.mask", fmt::format("\"{}\"", name), "must be one of neg_inf, zero");
}

void report_load(Observer& o, std::string_view name, const std::vector<std::int64_t>& load) {
  const std::vector<double> values(load.begin(), load.end());
  const double total = std::accumulate(values.begin(), values.end(), 0.0);
  const double max = values.empty() ? 0.0 : *std::max_element(values.begin(), values.end());
  const double mean = total / static_cast<double>(values.size());
  const auto empty = std::count(load.begin(), load.end(), std::int64_t{0});
  const Stat stats[] = {
      {"max_over_mean", total > 0 ? max / mean : std::numeric_limits<double>::quiet_NaN()},
      {"empty_experts", static_cast<double>(empty)}};
  o.on_event(Event{.name = name,
                   .shape = {static_cast<std::int64_t>(load.size()), 1},
                   .f64 = values,
                   .stats = stats});
}

namespace {

// events::topk_ids (T, k), then events::expert_load (E, 1).
void emit_token_choice(Observer* observer, const IndexMatrix& ids, Index num_experts) {
  emit(observer, [&](Observer& o) {
    o.on_event(Event{.name = events::topk_ids,
                     .shape = {ids.rows(), ids.cols()},
                     .i32 = {ids.data(), static_cast<std::size_t>(ids.size())}});
    report_load(o, events::expert_load, expert_load(ids, static_cast<int>(num_experts)));
  });
}

}  // namespace

// ---- token choice ------------------------------------------------------------------------------

template <typename Scalar>
void topk_select(IndexMatrix& ids, const MatrixT<Scalar>& scores, int k,
                 const std::type_identity_t<VectorT<Scalar>>* selection_bias, Observer* observer) {
  require_experts(scores);
  const Index T = scores.rows();
  const Index E = scores.cols();
  require_top_k(k, E);
  require_bias(selection_bias, E);
  require_finite_scores(scores);

  ids.resize(T, k);
  std::vector<std::int32_t> order;                          // (E) scratch
  std::vector<Scalar> biased(static_cast<std::size_t>(E));  // (E) s_te + b_e
  for (Index t = 0; t < T; ++t) {
    const Scalar* row = scores.row(t).data();  // row-major: the row is contiguous
    if (selection_bias != nullptr) {
      for (Index e = 0; e < E; ++e) {
        biased[static_cast<std::size_t>(e)] = scores(t, e) + (*selection_bias)(e);
      }
      row = biased.data();
    }
    top_n(ids.row(t).data(), row, E, k, order);
  }
  emit_token_choice(observer, ids, E);
}

template <typename Scalar>
void group_limited_select(IndexMatrix& ids, const MatrixT<Scalar>& scores, int k,
                          const GroupLimit& limit,
                          const std::type_identity_t<VectorT<Scalar>>* selection_bias,
                          Observer* observer) {
  require_experts(scores);
  const Index T = scores.rows();
  const Index E = scores.cols();
  require_top_k(k, E);
  require_group_limit(k, E, limit.n_group, limit.topk_group, "n_group", "topk_group", "groups");
  const Index G = limit.n_group;
  const Index S = E / G;
  if (limit.score == GroupScore::top2_sum && S < 2) {
    fail("num_experts / n_group", S,
         fmt::format("GroupScore::top2_sum needs at least 2 experts per group (num_experts = {}, "
                     "n_group = {})",
                     E, G));
  }
  require_bias(selection_bias, E);
  require_finite_scores(scores);

  const Scalar mask_value =
      limit.mask == GroupMask::neg_inf ? -std::numeric_limits<Scalar>::infinity() : Scalar(0);
  ids.resize(T, k);
  std::vector<std::int32_t> order;                               // scratch
  std::vector<Scalar> biased(static_cast<std::size_t>(E));       // (E) s_te + b_e
  std::vector<Scalar> masked(static_cast<std::size_t>(E));       // (E) biased, or mask_value
  std::vector<Scalar> group_score(static_cast<std::size_t>(G));  // (G)
  std::vector<std::int32_t> kept(static_cast<std::size_t>(limit.topk_group));  // (topk_group)
  std::vector<bool> is_kept(static_cast<std::size_t>(G));                      // (G)
  for (Index t = 0; t < T; ++t) {
    for (Index e = 0; e < E; ++e) {
      biased[static_cast<std::size_t>(e)] =
          scores(t, e) + (selection_bias != nullptr ? (*selection_bias)(e) : Scalar(0));
    }
    for (Index g = 0; g < G; ++g) {
      const Scalar* group = biased.data() + g * S;               // (S)
      Scalar first = group[0];                                   // largest
      Scalar second = -std::numeric_limits<Scalar>::infinity();  // second largest
      for (Index i = 1; i < S; ++i) {
        if (group[i] > first) {
          second = first;
          first = group[i];
        } else if (group[i] > second) {
          second = group[i];
        }
      }
      group_score[static_cast<std::size_t>(g)] =
          limit.score == GroupScore::max ? first : first + second;
    }
    top_n(kept.data(), group_score.data(), G, limit.topk_group, order);
    std::fill(is_kept.begin(), is_kept.end(), false);
    for (const std::int32_t g : kept) is_kept[static_cast<std::size_t>(g)] = true;
    for (Index e = 0; e < E; ++e) {
      masked[static_cast<std::size_t>(e)] = is_kept[static_cast<std::size_t>(e / S)]
                                                ? biased[static_cast<std::size_t>(e)]
                                                : mask_value;
    }
    top_n(ids.row(t).data(), masked.data(), E, k, order);
  }
  emit_token_choice(observer, ids, E);
}

template <typename Scalar>
void device_limited_select(IndexMatrix& ids, const MatrixT<Scalar>& scores, int k, int num_devices,
                           int topk_devices, Observer* observer) {
  // Checked here first so that the messages speak of devices; then it is one mechanism.
  require_experts(scores);
  require_top_k(k, scores.cols());
  require_group_limit(k, scores.cols(), num_devices, topk_devices, "num_devices", "topk_devices",
                      "devices");
  const GroupLimit limit{.n_group = num_devices,
                         .topk_group = topk_devices,
                         .score = GroupScore::max,
                         .mask = GroupMask::neg_inf};
  group_limited_select<Scalar>(ids, scores, k, limit, nullptr, observer);
}

// ---- expert choice -----------------------------------------------------------------------------

Index expert_choice_capacity(Index tokens, Index num_experts, double capacity_factor) {
  require(tokens >= 0, "tokens", tokens, "must be non-negative");
  require(num_experts >= 1, "num_experts", num_experts, "must be at least 1");
  require(std::isfinite(capacity_factor) && capacity_factor > 0, "capacity_factor", capacity_factor,
          "must be finite and greater than 0");
  const double capacity = std::ceil(
      snap_to_whole(static_cast<double>(tokens) * capacity_factor / static_cast<double>(num_experts)));
  return capacity >= static_cast<double>(tokens) ? tokens : static_cast<Index>(capacity);
}

template <typename Scalar>
void expert_choice_select(IndexMatrix& token_ids, const MatrixT<Scalar>& scores, Index capacity,
                          Observer* observer) {
  require_experts(scores);
  const Index T = scores.rows();
  const Index E = scores.cols();
  require(capacity >= 0, "capacity", capacity, "must be non-negative");
  if (capacity > T) {
    fail("capacity", capacity, fmt::format("must not exceed the number of tokens T = {}", T));
  }
  require_finite_scores(scores);

  token_ids.resize(E, capacity);
  std::vector<std::int32_t> order;                          // (T) scratch
  std::vector<Scalar> column(static_cast<std::size_t>(T));  // (T) scores(:, e)
  for (Index e = 0; e < E; ++e) {
    for (Index t = 0; t < T; ++t) column[static_cast<std::size_t>(t)] = scores(t, e);
    top_n(token_ids.row(e).data(), column.data(), T, capacity, order);
  }

  emit(observer, [&](Observer& o) {
    std::vector<std::int64_t> experts_of_token(static_cast<std::size_t>(T), 0);  // (T)
    for (Index i = 0; i < token_ids.size(); ++i) {
      ++experts_of_token[static_cast<std::size_t>(token_ids.data()[i])];
    }
    const auto unrouted =
        std::count(experts_of_token.begin(), experts_of_token.end(), std::int64_t{0});
    const std::int64_t most =
        T > 0 ? *std::max_element(experts_of_token.begin(), experts_of_token.end()) : 0;
    const Stat stats[] = {{"unrouted_tokens", static_cast<double>(unrouted)},
                          {"max_experts_per_token", static_cast<double>(most)}};
    o.on_event(Event{.name = events::expert_choice_ids,
                     .shape = {E, capacity},
                     .i32 = {token_ids.data(), static_cast<std::size_t>(token_ids.size())},
                     .stats = stats});
    report_load(o, events::expert_load, std::vector<std::int64_t>(static_cast<std::size_t>(E), capacity));
  });
}

// ---- routing by token id -----------------------------------------------------------------------

void hash_select(IndexMatrix& ids, std::span<const std::int32_t> token_ids, int num_experts,
                 std::uint64_t seed, Observer* observer) {
  require(num_experts >= 1, "num_experts", num_experts, "must be at least 1");
  for (std::size_t t = 0; t < token_ids.size(); ++t) {
    if (token_ids[t] < 0) {
      fail(fmt::format("token_ids[{}]", t), token_ids[t], "must be non-negative");
    }
  }
  const auto T = static_cast<Index>(token_ids.size());
  ids.resize(T, 1);
  for (Index t = 0; t < T; ++t) {
    const auto token = static_cast<std::uint64_t>(token_ids[static_cast<std::size_t>(t)]);
    ids(t, 0) =
        static_cast<std::int32_t>(hash64(token ^ seed) % static_cast<std::uint64_t>(num_experts));
  }
  emit_token_choice(observer, ids, num_experts);
}

void table_select(IndexMatrix& ids, std::span<const std::int32_t> token_ids,
                  const IndexMatrix& table, int num_experts, Observer* observer) {
  require(num_experts >= 1, "num_experts", num_experts, "must be at least 1");
  const Index V = table.rows();
  const Index k = table.cols();
  require(k >= 1, "table.cols()", k, "k, the experts per token, must be at least 1");
  for (Index v = 0; v < V; ++v) {
    for (Index j = 0; j < k; ++j) {
      const std::int32_t expert = table(v, j);
      if (expert < 0 || expert >= num_experts) {
        fail(fmt::format("table[{},{}]", v, j), expert,
             fmt::format("must be in [0, num_experts = {})", num_experts));
      }
      for (Index i = 0; i < j; ++i) {
        if (table(v, i) == expert) {
          fail(fmt::format("table[{},{}]", v, j), expert,
               fmt::format("repeats table[{},{}]; the experts of a row must be distinct", v, i));
        }
      }
    }
  }
  for (std::size_t t = 0; t < token_ids.size(); ++t) {
    if (token_ids[t] < 0 || token_ids[t] >= V) {
      fail(fmt::format("token_ids[{}]", t), token_ids[t],
           fmt::format("must be in [0, V = table.rows() = {})", V));
    }
  }
  const auto T = static_cast<Index>(token_ids.size());
  ids.resize(T, k);
  for (Index t = 0; t < T; ++t) ids.row(t) = table.row(token_ids[static_cast<std::size_t>(t)]);
  emit_token_choice(observer, ids, num_experts);
}

IndexMatrix make_hash_table(Index vocab_size, int num_experts, int k, std::uint64_t seed) {
  require(vocab_size >= 0, "vocab_size", vocab_size, "must be non-negative");
  require(num_experts >= 1, "num_experts", num_experts, "must be at least 1");
  require_top_k(k, num_experts);

  const auto E = static_cast<std::size_t>(num_experts);
  IndexMatrix table(vocab_size, k);
  Rng rng(seed);
  std::vector<std::int32_t> perm(E);  // (E) the current permutation of [0, E)
  std::size_t next = E;               // its next unused position; E = used up
  for (Index v = 0; v < vocab_size; ++v) {
    for (Index j = 0; j < k; ++j) {
      if (next == E) {
        // Fisher-Yates; the modulo's bias is below E * 2^-64.
        std::iota(perm.begin(), perm.end(), 0);
        for (std::size_t i = E - 1; i > 0; --i) std::swap(perm[i], perm[rng.next_u64() % (i + 1)]);
        // The row already holds table(v, 0..j), from the previous permutation: move those experts
        // out of the head perm[0, k - j) that completes the row. Outside the head there are
        // E - (k - j) places and at most j of the row's experts, and k <= E, so a swap partner
        // always exists.
        const auto in_row = [&](std::int32_t expert) {
          for (Index i = 0; i < j; ++i) {
            if (table(v, i) == expert) return true;
          }
          return false;
        };
        const auto head = static_cast<std::size_t>(k - j);
        for (std::size_t i = 0; i < head; ++i) {
          if (!in_row(perm[i])) continue;
          std::size_t r = head;
          while (in_row(perm[r])) ++r;
          std::swap(perm[i], perm[r]);
        }
        next = 0;
      }
      table(v, j) = perm[next++];
    }
  }
  return table;
}

// ---- load --------------------------------------------------------------------------------------

std::vector<std::int64_t> expert_load(const IndexMatrix& ids, int num_experts) {
  require(num_experts >= 1, "num_experts", num_experts, "must be at least 1");
  std::vector<std::int64_t> load(static_cast<std::size_t>(num_experts), 0);  // (E)
  for (Index t = 0; t < ids.rows(); ++t) {
    for (Index j = 0; j < ids.cols(); ++j) {
      const std::int32_t e = ids(t, j);
      if (e < 0 || e >= num_experts) {
        fail(fmt::format("ids[{},{}]", t, j), e,
             fmt::format("must be in [0, num_experts = {})", num_experts));
      }
      ++load[static_cast<std::size_t>(e)];
    }
  }
  return load;
}

template void topk_select<float>(IndexMatrix&, const Matrix&, int, const Vector*, Observer*);
template void topk_select<double>(IndexMatrix&, const MatrixD&, int, const VectorT<double>*,
                                  Observer*);
template void group_limited_select<float>(IndexMatrix&, const Matrix&, int, const GroupLimit&,
                                          const Vector*, Observer*);
template void group_limited_select<double>(IndexMatrix&, const MatrixD&, int, const GroupLimit&,
                                           const VectorT<double>*, Observer*);
template void device_limited_select<float>(IndexMatrix&, const Matrix&, int, int, int, Observer*);
template void device_limited_select<double>(IndexMatrix&, const MatrixD&, int, int, int, Observer*);
template void expert_choice_select<float>(IndexMatrix&, const Matrix&, Index, Observer*);
template void expert_choice_select<double>(IndexMatrix&, const MatrixD&, Index, Observer*);

}  // namespace moelab
