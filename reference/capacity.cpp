// moelab/reference/capacity.cpp — see capacity.h. T = tokens, E = experts, k = experts per token.
#include "reference/capacity.h"

#include "reference/error.h"
#include "reference/math.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <numeric>

namespace moelab {
namespace {

void require_ids(const IndexMatrix& ids, Index num_experts) {
  for (Index t = 0; t < ids.rows(); ++t) {
    for (Index j = 0; j < ids.cols(); ++j) {
      if (ids(t, j) < 0 || ids(t, j) >= num_experts) {
        fail(fmt::format("ids[{},{}]", t, j), ids(t, j),
             fmt::format("must be in [0, num_experts = {})", num_experts));
      }
    }
  }
}

// gates must match ids wherever it is given, and be finite where it is read.
template <typename Scalar>
void require_gates(const MatrixT<Scalar>& gates, const IndexMatrix& ids, bool read) {
  if (gates.size() == 0 && !(read && ids.size() != 0)) return;
  if (gates.rows() != ids.rows() || gates.cols() != ids.cols()) {
    fail("gates shape", fmt::format("({}, {})", gates.rows(), gates.cols()),
         fmt::format("must equal the ids shape ({}, {})", ids.rows(), ids.cols()));
  }
  if (!read) return;
  for (Index t = 0; t < gates.rows(); ++t) {
    for (Index j = 0; j < gates.cols(); ++j) {
      if (!std::isfinite(gates(t, j))) {
        fail(fmt::format("gates[{},{}]", t, j), gates(t, j),
             "must be finite (gate_priority orders tokens by their largest gate)");
      }
    }
  }
}

// The order in which tokens offer their pairs: 0, 1, ..., T - 1 (arrival_order), or by largest
// gate, descending, ties to the lower token id (gate_priority: a stable sort).
template <typename Scalar>
std::vector<std::int32_t> token_order(const MatrixT<Scalar>& gates, Index T, DropPolicy policy) {
  std::vector<std::int32_t> order(static_cast<std::size_t>(T));  // (T)
  std::iota(order.begin(), order.end(), 0);
  if (policy == DropPolicy::gate_priority) {
    std::vector<Scalar> priority(static_cast<std::size_t>(T));  // (T) max_j gates(t, j)
    for (Index t = 0; t < T; ++t) priority[static_cast<std::size_t>(t)] = gates.row(t).maxCoeff();
    std::stable_sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) {
      return priority[static_cast<std::size_t>(a)] > priority[static_cast<std::size_t>(b)];
    });
  }
  return order;
}

}  // namespace

std::string_view capacity_rounding_name(CapacityRounding rounding) {
  switch (rounding) {
    case CapacityRounding::ceil: return "ceil";
    case CapacityRounding::floor: return "floor";
    case CapacityRounding::trunc_int: return "trunc_int";
  }
  fail("rounding", static_cast<int>(rounding), "is not a known CapacityRounding");
}

CapacityRounding parse_capacity_rounding(std::string_view name) {
  for (CapacityRounding r : {CapacityRounding::ceil, CapacityRounding::floor, CapacityRounding::trunc_int}) {
    if (capacity_rounding_name(r) == name) return r;
  }
  fail("rounding", fmt::format("\"{}\"", name), "must be one of ceil, floor, trunc_int");
}

std::string_view drop_policy_name(DropPolicy policy) {
  switch (policy) {
    case DropPolicy::arrival_order: return "arrival_order";
    case DropPolicy::gate_priority: return "gate_priority";
  }
  fail("drop_policy", static_cast<int>(policy), "is not a known DropPolicy");
}

DropPolicy parse_drop_policy(std::string_view name) {
  for (DropPolicy p : {DropPolicy::arrival_order, DropPolicy::gate_priority}) {
    if (drop_policy_name(p) == name) return p;
  }
  fail("drop_policy", fmt::format("\"{}\"", name), "must be one of arrival_order, gate_priority");
}

void CapacityConfig::validate() const {
  require(std::isfinite(capacity_factor) && capacity_factor > 0, "capacity_factor", capacity_factor,
          "must be finite and > 0");
  require(min_capacity >= 0, "min_capacity", min_capacity, "must be >= 0");
}

double round_capacity(double quotient, CapacityRounding rounding) {
  require(quotient >= 0, "capacity quotient", quotient, "must be >= 0");  // also rejects NaN
  const double q = snap_to_whole(quotient);
  switch (rounding) {
    case CapacityRounding::ceil: return std::ceil(q);
    case CapacityRounding::floor: return std::floor(q);
    case CapacityRounding::trunc_int: return std::trunc(q);
  }
  fail("rounding", static_cast<int>(rounding), "is not a known CapacityRounding");
}

Index expert_capacity(Index tokens, int top_k, Index num_experts, const CapacityConfig& config) {
  require(tokens >= 0, "tokens", tokens, "must be non-negative");
  require(top_k >= 1, "top_k", top_k, "must be at least 1");
  require(num_experts >= 1, "num_experts", num_experts, "must be at least 1");
  config.validate();
  // T * k is exact (an integer product), so the quotient has the same three roundings as
  // expert_choice_capacity's T * f / E, and for k = 1 the same bits.
  const Index pairs = tokens * top_k;
  const double quotient =
      config.capacity_factor * static_cast<double>(pairs) / static_cast<double>(num_experts);
  const double capacity =
      std::max(round_capacity(quotient, config.rounding), static_cast<double>(config.min_capacity));
  return capacity >= static_cast<double>(pairs) ? pairs : static_cast<Index>(capacity);
}

template <typename Scalar>
void capacity_forward(IndexMatrix& keep, std::vector<std::int64_t>& dropped, const IndexMatrix& ids,
                      const MatrixT<Scalar>& gates, Index num_experts, const CapacityConfig& config,
                      Observer* observer) {
  config.validate();
  require(num_experts >= 1, "num_experts", num_experts, "must be at least 1");
  const Index T = ids.rows();
  const Index k = ids.cols();
  require(k >= 1, "ids.cols()", k, "k, the experts per token, must be at least 1");
  require_ids(ids, num_experts);
  const bool reads_gates = !config.dropless && config.policy == DropPolicy::gate_priority;
  require_gates(gates, ids, reads_gates);

  keep.setOnes(T, k);
  dropped.assign(static_cast<std::size_t>(num_experts), 0);
  double capacity_stat = std::numeric_limits<double>::infinity();
  if (!config.dropless) {
    const Index capacity = expert_capacity(T, static_cast<int>(k), num_experts, config);
    const std::vector<std::int32_t> order = token_order(gates, T, config.policy);  // (T)
    std::vector<Index> fill(static_cast<std::size_t>(num_experts), 0);  // (E) pairs kept so far
    for (Index j = 0; j < k; ++j) {  // slot-major: every token's j-th choice before any (j+1)-th
      for (const std::int32_t t : order) {
        const auto e = static_cast<std::size_t>(ids(t, j));
        if (fill[e] < capacity) {
          ++fill[e];
        } else {
          keep(t, j) = 0;
          ++dropped[e];
        }
      }
    }
    capacity_stat = static_cast<double>(capacity);
  }

  emit(observer, [&](Observer& o) {
    const std::vector<double> values(dropped.begin(), dropped.end());  // (E)
    const double dropped_pairs = std::accumulate(values.begin(), values.end(), 0.0);
    Index dropped_entirely = 0;
    for (Index t = 0; t < T; ++t) dropped_entirely += keep.row(t).sum() == 0 ? 1 : 0;
    const Stat stats[] = {{"capacity", capacity_stat},
                          {"dropped_pairs", dropped_pairs},
                          {"tokens_dropped_entirely", static_cast<double>(dropped_entirely)}};
    o.on_event(Event{.name = events::dropped, .shape = {num_experts, 1}, .f64 = values, .stats = stats});
  });
}

template void capacity_forward<float>(IndexMatrix&, std::vector<std::int64_t>&, const IndexMatrix&,
                                      const Matrix&, Index, const CapacityConfig&, Observer*);
template void capacity_forward<double>(IndexMatrix&, std::vector<std::int64_t>&, const IndexMatrix&,
                                       const MatrixD&, Index, const CapacityConfig&, Observer*);

}  // namespace moelab
