// moelab/reference/losses.cpp — see losses.h. T = tokens, E = experts, k = experts per token,
// L = layers, D = devices, M = devices per token.
#include "reference/losses.h"

#include "reference/error.h"
#include "reference/math.h"
#include "reference/scoring.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

namespace moelab {
namespace {

// ---- checks shared by every loss ----------------------------------------------------------------

void require_coefficient(std::string_view name, double value) {
  require(std::isfinite(value) && value >= 0.0, name, value, "must be finite and >= 0");
}

// A NaN or an infinity makes the sum non-finite, so one vectorised sum screens the input; only
// then (or when a sum of finite values overflowed) are the elements searched one by one.
template <typename Scalar>
void require_finite(const MatrixT<Scalar>& x, std::string_view name) {
  if (std::isfinite(x.sum())) [[likely]]
    return;
  for (Index t = 0; t < x.rows(); ++t) {
    for (Index e = 0; e < x.cols(); ++e) {
      if (!std::isfinite(x(t, e)))
        fail(fmt::format("{}[{},{}]", name, t, e), x(t, e), "must be finite");
    }
  }
}

// x (T, E) finite with E >= 1; ids (T, k) with k >= 1 and each row k distinct experts in [0, E).
template <typename Scalar>
void require_routing(const MatrixT<Scalar>& x, std::string_view name, const IndexMatrix& ids) {
  const Index T = x.rows();
  const Index E = x.cols();
  if (E < 1) fail(fmt::format("{}.cols()", name), E, "the number of experts E must be at least 1");
  if (ids.rows() != T) {
    fail("ids.rows()", ids.rows(),
         fmt::format("must equal {}.rows() = {} (one row of expert ids per token)", name, T));
  }
  if (ids.cols() < 1) fail("ids.cols()", ids.cols(), "k (experts per token) must be at least 1");
  for (Index t = 0; t < T; ++t) {
    for (Index j = 0; j < ids.cols(); ++j) {
      const std::int32_t id = ids(t, j);
      if (id < 0 || id >= E) {
        fail(fmt::format("ids[{},{}]", t, j), id,
             fmt::format("expert ids must be in [0, E = {})", E));
      }
      for (Index before = 0; before < j; ++before) {
        if (ids(t, before) == id) {
          fail(fmt::format("ids[{},{}]", t, j), id,
               fmt::format("token {} already selected expert {} (ids[{},{}]); a token's k experts "
                           "must be distinct",
                           t, id, t, before));
        }
      }
    }
  }
  require_finite(x, name);
}

// Experts are split over D devices contiguously: device d holds experts [d*E/D, (d+1)*E/D).
void require_devices(Index E, Index num_devices) {
  require(num_devices >= 1, "num_devices", num_devices, "must be at least 1");
  require(E % num_devices == 0, "num_devices", num_devices,
          fmt::format("must divide the number of experts E = {} (each device holds E / D experts, "
                      "contiguously)",
                      E));
}

// ---- the two halves of every f_i * P_i ----------------------------------------------------------

// #{(t, j) : ids[t, j] = i} over the rows [begin, begin + T)   (E)
template <typename Scalar>
VectorT<Scalar> expert_counts(const IndexMatrix& ids, Index E, Index begin, Index T) {
  VectorT<Scalar> counts = VectorT<Scalar>::Zero(E);
  for (Index t = begin; t < begin + T; ++t) {
    for (Index j = 0; j < ids.cols(); ++j) counts(ids(t, j)) += Scalar(1);
  }
  return counts;
}

// (1 / T) sum_t x[t, i] over the rows [begin, begin + T); 0 when T = 0   (E)
template <typename Scalar>
VectorT<Scalar> token_means(const MatrixT<Scalar>& x, Index begin, Index T) {
  if (T == 0) return VectorT<Scalar>::Zero(x.cols());
  return x.middleRows(begin, T).colwise().sum().transpose() / static_cast<Scalar>(T);
}

// Sums over each device's E / D contiguous experts: out[d] = sum_{i in device d} v[i]   (D)
template <typename Scalar>
VectorT<Scalar> device_sums(const VectorT<Scalar>& v, Index num_devices) {
  const Index per_device = v.size() / num_devices;
  VectorT<Scalar> out(num_devices);
  for (Index d = 0; d < num_devices; ++d) out(d) = v.segment(d * per_device, per_device).sum();
  return out;
}

// events::losses with {name, value} and the extremes of the loss's f and P (0 when empty), plus
// any extra stats.
template <typename Scalar, typename F, typename P>
void emit_balance(Observer* observer, std::string_view name, Scalar value,
                  const Eigen::MatrixBase<F>& f, const Eigen::MatrixBase<P>& p,
                  std::span<const Stat> extra = {}) {
  emit(observer, [&](Observer& o) {
    const bool empty = f.size() == 0;
    std::vector<Stat> stats = {{name, static_cast<double>(value)},
                               {"f_max", empty ? 0.0 : static_cast<double>(f.maxCoeff())},
                               {"f_min", empty ? 0.0 : static_cast<double>(f.minCoeff())},
                               {"P_max", empty ? 0.0 : static_cast<double>(p.maxCoeff())},
                               {"P_min", empty ? 0.0 : static_cast<double>(p.minCoeff())}};
    stats.insert(stats.end(), extra.begin(), extra.end());
    o.on_event(Event{.name = events::losses, .stats = stats});
  });
}

}  // namespace

// ---- 1. Switch Transformer ----------------------------------------------------------------------

// f_i = #{(t, j) : ids[t, j] = i} / (T k): sums to 1 for every k (0 for T = 0)   (E)
template <typename Scalar>
static VectorT<Scalar> switch_fractions(const IndexMatrix& ids, Index E) {
  const Index T = ids.rows();
  VectorT<Scalar> f = expert_counts<Scalar>(ids, E, 0, T);
  if (T > 0) f /= static_cast<Scalar>(T * ids.cols());
  return f;
}

template <typename Scalar>
Scalar switch_aux_loss_forward(const MatrixT<Scalar>& probs, const IndexMatrix& ids, double alpha,
                               Observer* observer) {
  require_routing(probs, "probs", ids);
  require_coefficient("alpha", alpha);
  const Index T = probs.rows();
  const Index E = probs.cols();
  const VectorT<Scalar> f = switch_fractions<Scalar>(ids, E);                          // (E)
  const VectorT<Scalar> P = token_means(probs, 0, T);                                  // (E)
  const Scalar loss = static_cast<Scalar>(alpha) * static_cast<Scalar>(E) * f.dot(P);  // eq. 4
  emit_balance(observer, "switch_aux", loss, f, P);
  return loss;
}

template <typename Scalar>
void switch_aux_loss_backward(MatrixT<Scalar>& dprobs, const MatrixT<Scalar>& probs,
                              const IndexMatrix& ids, double alpha) {
  require_routing(probs, "probs", ids);
  require_coefficient("alpha", alpha);
  const Index T = probs.rows();
  const Index E = probs.cols();
  dprobs.resize(T, E);
  if (T == 0) return;
  const VectorT<Scalar> f = switch_fractions<Scalar>(ids, E);  // (E)
  // dP_i / dprobs[t, i] = 1 / T, the same for every token
  dprobs.rowwise() =
      (static_cast<Scalar>(alpha) * static_cast<Scalar>(E) / static_cast<Scalar>(T) * f)
          .transpose();
}

// ---- 2. Hugging Face load_balancing_loss_func ---------------------------------------------------

// tokens_per_expert[j, e] = #{r : ids[r, j] = e} / R: one row per slot j, each sums to 1   (k, E)
template <typename Scalar>
static MatrixT<Scalar> hf_tokens_per_expert(const IndexMatrix& ids, Index E) {
  const Index R = ids.rows();
  MatrixT<Scalar> tokens_per_expert = MatrixT<Scalar>::Zero(ids.cols(), E);
  for (Index r = 0; r < R; ++r) {
    for (Index j = 0; j < ids.cols(); ++j) tokens_per_expert(j, ids(r, j)) += Scalar(1);
  }
  if (R > 0) tokens_per_expert /= static_cast<Scalar>(R);
  return tokens_per_expert;
}

template <typename Scalar>
Scalar hf_load_balancing_loss_forward(const MatrixT<Scalar>& logits, const IndexMatrix& ids,
                                      double alpha, Observer* observer) {
  require_routing(logits, "logits", ids);
  require_coefficient("alpha", alpha);
  const Index R = logits.rows();
  const Index E = logits.cols();
  MatrixT<Scalar> routing_weights;  // (R, E)
  softmax_forward(routing_weights, logits);
  const MatrixT<Scalar> tokens_per_expert = hf_tokens_per_expert<Scalar>(ids, E);     // (k, E)
  const VectorT<Scalar> router_prob_per_expert = token_means(routing_weights, 0, R);  // (E)
  // sum_{j, e} tokens_per_expert[j, e] * router_prob_per_expert[e]: (k, E) x (E) -> (k), summed
  const VectorT<Scalar> per_slot = tokens_per_expert * router_prob_per_expert;  // (k)
  const Scalar loss = static_cast<Scalar>(alpha) * static_cast<Scalar>(E) * per_slot.sum();
  emit_balance(observer, "hf_aux", loss, tokens_per_expert.colwise().sum(), router_prob_per_expert);
  return loss;
}

template <typename Scalar>
void hf_load_balancing_loss_backward(MatrixT<Scalar>& dlogits, const MatrixT<Scalar>& logits,
                                     const IndexMatrix& ids, double alpha) {
  require_routing(logits, "logits", ids);
  require_coefficient("alpha", alpha);
  const Index R = logits.rows();
  const Index E = logits.cols();
  if (R == 0) {
    dlogits.resize(0, E);
    return;
  }
  MatrixT<Scalar> routing_weights;  // (R, E)
  softmax_forward(routing_weights, logits);
  // d loss / d routing_weights[r, e] = alpha * E * (sum_j tokens_per_expert[j, e]) / R
  const VectorT<Scalar> f = hf_tokens_per_expert<Scalar>(ids, E).colwise().sum().transpose();
  MatrixT<Scalar> dweights(R, E);
  dweights.rowwise() =
      (static_cast<Scalar>(alpha) * static_cast<Scalar>(E) / static_cast<Scalar>(R) * f)
          .transpose();
  softmax_backward(dlogits, routing_weights, dweights);
}

// ---- 3. MegaBlocks batched_load_balancing_loss --------------------------------------------------

// T per layer after checking that the R = L*T rows split into num_layers layers.
template <typename Scalar>
static Index megablocks_tokens_per_layer(const MatrixT<Scalar>& probs, Index num_layers) {
  require(num_layers >= 1, "num_layers", num_layers, "must be at least 1");
  require(probs.rows() % num_layers == 0, "probs.rows()", probs.rows(),
          fmt::format("must be a multiple of num_layers = {} (L layers of T tokens, stacked "
                      "layer-major)",
                      num_layers));
  return probs.rows() / num_layers;
}

template <typename Scalar>
Scalar megablocks_load_balancing_loss_forward(const MatrixT<Scalar>& probs, const IndexMatrix& ids,
                                              Index num_layers, double alpha, Observer* observer) {
  require_routing(probs, "probs", ids);
  require_coefficient("alpha", alpha);
  const Index L = num_layers;
  const Index T = megablocks_tokens_per_layer(probs, L);
  const Index E = probs.cols();
  const Index k = ids.cols();
  MatrixT<Scalar> tokens_per_expert(L, E);  // (L, E) counts
  MatrixT<Scalar> expert_scores(L, E);      // (L, E) mean over the layer's tokens of probs
  for (Index l = 0; l < L; ++l) {
    tokens_per_expert.row(l) = expert_counts<Scalar>(ids, E, l * T, T).transpose();
    expert_scores.row(l) = token_means(probs, l * T, T).transpose();
  }
  Scalar loss = 0;
  if (T > 0) {
    const Scalar scale =
        static_cast<Scalar>(E) * static_cast<Scalar>(alpha) / static_cast<Scalar>(L * T * k);
    loss = scale * tokens_per_expert.cwiseProduct(expert_scores).sum();
  }
  emit(observer, [&](Observer& o) {
    // Each layer's f in the Switch normalisation (counts / (T k)), so stats compare across losses.
    const MatrixT<Scalar> f = T > 0
                                  ? MatrixT<Scalar>(tokens_per_expert / static_cast<Scalar>(T * k))
                                  : MatrixT<Scalar>(tokens_per_expert);
    emit_balance(&o, "megablocks_aux", loss, f, expert_scores);
  });
  return loss;
}

template <typename Scalar>
void megablocks_load_balancing_loss_backward(MatrixT<Scalar>& dprobs, const MatrixT<Scalar>& probs,
                                             const IndexMatrix& ids, Index num_layers,
                                             double alpha) {
  require_routing(probs, "probs", ids);
  require_coefficient("alpha", alpha);
  const Index L = num_layers;
  const Index T = megablocks_tokens_per_layer(probs, L);
  const Index E = probs.cols();
  const Index k = ids.cols();
  dprobs.resize(L * T, E);
  if (T == 0) return;
  const Scalar scale =
      static_cast<Scalar>(E) * static_cast<Scalar>(alpha) / static_cast<Scalar>(L * T * k);
  for (Index l = 0; l < L; ++l) {
    // d mean_t probs_l[t, e] / d probs_l[t, e] = 1 / T
    const VectorT<Scalar> counts = expert_counts<Scalar>(ids, E, l * T, T);  // (E)
    dprobs.middleRows(l * T, T).rowwise() = (scale / static_cast<Scalar>(T) * counts).transpose();
  }
}

// ---- 4. DeepSeek-V2 -----------------------------------------------------------------------------

// f_i = E / (k T) * #{t : token t selects i}: 1 at perfect balance (0 for T = 0)   (E)
template <typename Scalar>
static VectorT<Scalar> deepseek_fractions(const IndexMatrix& ids, Index E, Index begin, Index T) {
  VectorT<Scalar> f = expert_counts<Scalar>(ids, E, begin, T);
  if (T > 0) f *= static_cast<Scalar>(E) / static_cast<Scalar>(ids.cols() * T);
  return f;
}

template <typename Scalar>
Scalar deepseek_v2_expert_balance_loss_forward(const MatrixT<Scalar>& scores,
                                               const IndexMatrix& ids, double alpha1,
                                               Observer* observer) {
  require_routing(scores, "scores", ids);
  require_coefficient("alpha1", alpha1);
  const Index T = scores.rows();
  const VectorT<Scalar> f = deepseek_fractions<Scalar>(ids, scores.cols(), 0, T);
  const VectorT<Scalar> P = token_means(scores, 0, T);
  const Scalar loss = static_cast<Scalar>(alpha1) * f.dot(P);
  emit_balance(observer, "expert_balance", loss, f, P);
  return loss;
}

template <typename Scalar>
void deepseek_v2_expert_balance_loss_backward(MatrixT<Scalar>& dscores,
                                              const MatrixT<Scalar>& scores, const IndexMatrix& ids,
                                              double alpha1) {
  require_routing(scores, "scores", ids);
  require_coefficient("alpha1", alpha1);
  const Index T = scores.rows();
  dscores.resize(T, scores.cols());
  if (T == 0) return;
  const VectorT<Scalar> f = deepseek_fractions<Scalar>(ids, scores.cols(), 0, T);
  dscores.rowwise() = (static_cast<Scalar>(alpha1) / static_cast<Scalar>(T) * f).transpose();
}

// f'_d = mean of f_i over device d's experts   (D)
template <typename Scalar>
static VectorT<Scalar> device_fractions(const IndexMatrix& ids, Index E, Index T, Index D) {
  const VectorT<Scalar> f = deepseek_fractions<Scalar>(ids, E, 0, T);
  return device_sums(f, D) / static_cast<Scalar>(E / D);
}

template <typename Scalar>
Scalar deepseek_v2_device_balance_loss_forward(const MatrixT<Scalar>& scores,
                                               const IndexMatrix& ids, Index num_devices,
                                               double alpha2, Observer* observer) {
  require_routing(scores, "scores", ids);
  require_devices(scores.cols(), num_devices);
  require_coefficient("alpha2", alpha2);
  const Index T = scores.rows();
  const VectorT<Scalar> f_dev = device_fractions<Scalar>(ids, scores.cols(), T, num_devices);
  const VectorT<Scalar> P_dev = device_sums(token_means(scores, 0, T), num_devices);
  const Scalar loss = static_cast<Scalar>(alpha2) * f_dev.dot(P_dev);
  emit_balance(observer, "device_balance", loss, f_dev, P_dev);
  return loss;
}

template <typename Scalar>
void deepseek_v2_device_balance_loss_backward(MatrixT<Scalar>& dscores,
                                              const MatrixT<Scalar>& scores, const IndexMatrix& ids,
                                              Index num_devices, double alpha2) {
  require_routing(scores, "scores", ids);
  require_devices(scores.cols(), num_devices);
  require_coefficient("alpha2", alpha2);
  const Index T = scores.rows();
  const Index E = scores.cols();
  dscores.resize(T, E);
  if (T == 0) return;
  const VectorT<Scalar> f_dev = device_fractions<Scalar>(ids, E, T, num_devices);
  // P'_d sums P_i over device d, so every expert i of device d gets f'_d / T
  const Index per_device = E / num_devices;
  for (Index i = 0; i < E; ++i) {
    dscores.col(i).setConstant(static_cast<Scalar>(alpha2) * f_dev(i / per_device) /
                               static_cast<Scalar>(T));
  }
}

// f''_d = D / (M T) * #{t : token t is sent to device d}   (D) — eq. 30. Checks that no token is
// sent to more than M devices.
template <typename Scalar>
static VectorT<Scalar> comm_fractions(const IndexMatrix& ids, Index E, Index T, Index D, Index M) {
  const Index per_device = E / D;
  VectorT<Scalar> f = VectorT<Scalar>::Zero(D);
  std::vector<char> sent(static_cast<std::size_t>(D));  // (D) token t reaches device d
  for (Index t = 0; t < T; ++t) {
    std::fill(sent.begin(), sent.end(), 0);
    Index devices = 0;
    for (Index j = 0; j < ids.cols(); ++j) {
      const Index d = ids(t, j) / per_device;
      if (!sent[static_cast<std::size_t>(d)]) {
        sent[static_cast<std::size_t>(d)] = 1;
        ++devices;
        f(d) += Scalar(1);
      }
    }
    if (devices > M) {
      const std::vector<std::int32_t> row(ids.row(t).begin(), ids.row(t).end());
      fail(fmt::format("ids[{},:]", t), fmt::format("[{}]", fmt::join(row, ", ")),
           fmt::format("token {} is sent to {} devices, more than devices_per_token M = {}", t,
                       devices, M));
    }
  }
  if (T > 0) f *= static_cast<Scalar>(D) / static_cast<Scalar>(M * T);
  return f;
}

static void require_devices_per_token(Index num_devices, Index devices_per_token) {
  require(devices_per_token >= 1 && devices_per_token <= num_devices, "devices_per_token",
          devices_per_token, fmt::format("must be in [1, num_devices = {}]", num_devices));
}

template <typename Scalar>
Scalar deepseek_v2_comm_balance_loss_forward(const MatrixT<Scalar>& scores, const IndexMatrix& ids,
                                             Index num_devices, Index devices_per_token,
                                             double alpha3, Observer* observer) {
  require_routing(scores, "scores", ids);
  require_devices(scores.cols(), num_devices);
  require_devices_per_token(num_devices, devices_per_token);
  require_coefficient("alpha3", alpha3);
  const Index T = scores.rows();
  const VectorT<Scalar> f_comm =
      comm_fractions<Scalar>(ids, scores.cols(), T, num_devices, devices_per_token);
  const VectorT<Scalar> P_comm = device_sums(token_means(scores, 0, T), num_devices);  // eq. 31
  const Scalar loss = static_cast<Scalar>(alpha3) * f_comm.dot(P_comm);
  emit_balance(observer, "comm_balance", loss, f_comm, P_comm);
  return loss;
}

template <typename Scalar>
void deepseek_v2_comm_balance_loss_backward(MatrixT<Scalar>& dscores, const MatrixT<Scalar>& scores,
                                            const IndexMatrix& ids, Index num_devices,
                                            Index devices_per_token, double alpha3) {
  require_routing(scores, "scores", ids);
  require_devices(scores.cols(), num_devices);
  require_devices_per_token(num_devices, devices_per_token);
  require_coefficient("alpha3", alpha3);
  const Index T = scores.rows();
  const Index E = scores.cols();
  const VectorT<Scalar> f_comm = comm_fractions<Scalar>(ids, E, T, num_devices, devices_per_token);
  dscores.resize(T, E);
  if (T == 0) return;
  const Index per_device = E / num_devices;
  for (Index i = 0; i < E; ++i) {
    dscores.col(i).setConstant(static_cast<Scalar>(alpha3) * f_comm(i / per_device) /
                               static_cast<Scalar>(T));
  }
}

// ---- 5. DeepSeek-V3 sequence-wise balance loss --------------------------------------------------

// Sigmoid scores: >= 0 with a positive sum per token (s' divides by it); lengths >= 1, summing
// to T.
template <typename Scalar>
static void require_sequences(const MatrixT<Scalar>& scores,
                              std::span<const Index> sequence_lengths) {
  for (Index t = 0; t < scores.rows(); ++t) {
    for (Index e = 0; e < scores.cols(); ++e) {
      if (scores(t, e) < 0) {
        fail(fmt::format("scores[{},{}]", t, e), scores(t, e),
             "sigmoid scores must be >= 0 (they are normalised per token: s' = s / sum_j s)");
      }
    }
    if (!(scores.row(t).sum() > 0)) {
      fail(fmt::format("sum of scores[{},:]", t), scores.row(t).sum(),
           "must be positive (s'_{i,t} = s_{i,t} / sum_j s_{j,t})");
    }
  }
  Index total = 0;
  for (std::size_t s = 0; s < sequence_lengths.size(); ++s) {
    require(sequence_lengths[s] >= 1, fmt::format("sequence_lengths[{}]", s), sequence_lengths[s],
            "every sequence must have at least one token (f and P are means over its tokens)");
    total += sequence_lengths[s];
  }
  require(total == scores.rows(), "sum of sequence_lengths", total,
          fmt::format("must equal scores.rows() = {} (T)", scores.rows()));
}

template <typename Scalar>
Scalar deepseek_v3_sequence_balance_loss_forward(const MatrixT<Scalar>& scores,
                                                 const IndexMatrix& ids,
                                                 std::span<const Index> sequence_lengths,
                                                 double alpha, Observer* observer) {
  require_routing(scores, "scores", ids);
  require_sequences(scores, sequence_lengths);
  require_coefficient("alpha", alpha);
  const Index E = scores.cols();
  const Index N = static_cast<Index>(sequence_lengths.size());
  MatrixT<Scalar> f(N, E);  // (N, E) eq. 18, one row per sequence
  MatrixT<Scalar> P(N, E);  // (N, E) eq. 20
  Scalar sum = 0;           // sum over sequences of L_s / alpha
  Index begin = 0;
  for (Index s = 0; s < N; ++s) {
    const Index T_s = sequence_lengths[static_cast<std::size_t>(s)];
    MatrixT<Scalar> normalised = scores.middleRows(begin, T_s);   // (T_s, E) s', eq. 19
    const VectorT<Scalar> row_sums = normalised.rowwise().sum();  // (T_s)
    normalised.array().colwise() /= row_sums.array();
    f.row(s) = deepseek_fractions<Scalar>(ids, E, begin, T_s).transpose();
    P.row(s) = token_means(normalised, 0, T_s).transpose();
    sum += f.row(s).dot(P.row(s));  // eq. 17 without alpha
    begin += T_s;
  }
  const Scalar loss = N > 0 ? static_cast<Scalar>(alpha) * sum / static_cast<Scalar>(N) : Scalar(0);
  const Stat extra[] = {{"sequences", static_cast<double>(N)}};
  emit_balance(observer, "sequence_balance", loss, f, P, extra);
  return loss;
}

template <typename Scalar>
void deepseek_v3_sequence_balance_loss_backward(MatrixT<Scalar>& dscores,
                                                const MatrixT<Scalar>& scores,
                                                const IndexMatrix& ids,
                                                std::span<const Index> sequence_lengths,
                                                double alpha) {
  require_routing(scores, "scores", ids);
  require_sequences(scores, sequence_lengths);
  require_coefficient("alpha", alpha);
  const Index E = scores.cols();
  const Index N = static_cast<Index>(sequence_lengths.size());
  dscores.resize(scores.rows(), E);
  Index begin = 0;
  for (Index s = 0; s < N; ++s) {
    const Index T_s = sequence_lengths[static_cast<std::size_t>(s)];
    const VectorT<Scalar> f = deepseek_fractions<Scalar>(ids, E, begin, T_s);  // (E)
    const Scalar scale = static_cast<Scalar>(alpha) / static_cast<Scalar>(N * T_s);
    for (Index t = begin; t < begin + T_s; ++t) {
      // L_s = alpha/T_s sum_i f_i s_{i,t}/S_t + ...; d(s_i/S)/ds_j = (delta_ij - s'_i) / S
      const Scalar S = scores.row(t).sum();
      const Scalar f_dot_normalised = scores.row(t).dot(f) / S;  // sum_i f_i s'_{i,t}
      dscores.row(t) = (scale / S) * (f.transpose().array() - f_dot_normalised).matrix();
    }
    begin += T_s;
  }
}

// ---- 6. Router z-loss ---------------------------------------------------------------------------

// lse_t = m_t + log sum_e exp(logits[t, e] - m_t), m_t = max_e logits[t, e]   (T)
template <typename Scalar>
static VectorT<Scalar> logsumexp_rows(const MatrixT<Scalar>& logits) {
  VectorT<Scalar> lse(logits.rows());
  for (Index t = 0; t < logits.rows(); ++t) {
    const Scalar m = logits.row(t).maxCoeff();
    lse(t) = m + std::log((logits.row(t).array() - m).unaryExpr(StdExp{}).sum());  // the sum is in [1, E]
  }
  return lse;
}

static void require_logits(Index E) {
  if (E < 1) fail("logits.cols()", E, "the number of experts E must be at least 1");
}

template <typename Scalar>
Scalar router_z_loss_forward(const MatrixT<Scalar>& logits, double z_loss_coef,
                             Observer* observer) {
  require_logits(logits.cols());
  require_finite(logits, "logits");
  require_coefficient("z_loss_coef", z_loss_coef);
  const Index T = logits.rows();
  const VectorT<Scalar> lse = logsumexp_rows(logits);  // (T)
  const Scalar loss =
      T > 0 ? static_cast<Scalar>(z_loss_coef) * lse.squaredNorm() / static_cast<Scalar>(T)
            : Scalar(0);
  emit(observer, [&](Observer& o) {
    const Stat stats[] = {{"z_loss", static_cast<double>(loss)},
                          {"lse_max", T > 0 ? static_cast<double>(lse.maxCoeff()) : 0.0},
                          {"lse_mean", T > 0 ? static_cast<double>(lse.mean()) : 0.0}};
    o.on_event(Event{.name = events::losses, .stats = stats});
  });
  return loss;
}

template <typename Scalar>
void router_z_loss_backward(MatrixT<Scalar>& dlogits, const MatrixT<Scalar>& logits,
                            double z_loss_coef) {
  require_logits(logits.cols());
  require_finite(logits, "logits");
  require_coefficient("z_loss_coef", z_loss_coef);
  const Index T = logits.rows();
  softmax_forward(dlogits, logits);  // d lse_t / d logits[t, e] = softmax(logits_t)_e
  if (T == 0) return;
  const VectorT<Scalar> lse = logsumexp_rows(logits);  // (T)
  const VectorT<Scalar> row_scale =
      (Scalar(2) * static_cast<Scalar>(z_loss_coef) / static_cast<Scalar>(T)) * lse;  // (T)
  dlogits.array().colwise() *= row_scale.array();
}

// ---- explicit instantiations --------------------------------------------------------------------

#define MOELAB_INSTANTIATE_LOSSES(Scalar)                                                         \
  template Scalar switch_aux_loss_forward<Scalar>(const MatrixT<Scalar>&, const IndexMatrix&,     \
                                                  double, Observer*);                             \
  template void switch_aux_loss_backward<Scalar>(MatrixT<Scalar>&, const MatrixT<Scalar>&,        \
                                                 const IndexMatrix&, double);                     \
  template Scalar hf_load_balancing_loss_forward<Scalar>(const MatrixT<Scalar>&,                  \
                                                         const IndexMatrix&, double, Observer*);  \
  template void hf_load_balancing_loss_backward<Scalar>(MatrixT<Scalar>&, const MatrixT<Scalar>&, \
                                                        const IndexMatrix&, double);              \
  template Scalar megablocks_load_balancing_loss_forward<Scalar>(                                 \
      const MatrixT<Scalar>&, const IndexMatrix&, Index, double, Observer*);                      \
  template void megablocks_load_balancing_loss_backward<Scalar>(                                  \
      MatrixT<Scalar>&, const MatrixT<Scalar>&, const IndexMatrix&, Index, double);               \
  template Scalar deepseek_v2_expert_balance_loss_forward<Scalar>(                                \
      const MatrixT<Scalar>&, const IndexMatrix&, double, Observer*);                             \
  template void deepseek_v2_expert_balance_loss_backward<Scalar>(                                 \
      MatrixT<Scalar>&, const MatrixT<Scalar>&, const IndexMatrix&, double);                      \
  template Scalar deepseek_v2_device_balance_loss_forward<Scalar>(                                \
      const MatrixT<Scalar>&, const IndexMatrix&, Index, double, Observer*);                      \
  template void deepseek_v2_device_balance_loss_backward<Scalar>(                                 \
      MatrixT<Scalar>&, const MatrixT<Scalar>&, const IndexMatrix&, Index, double);               \
  template Scalar deepseek_v2_comm_balance_loss_forward<Scalar>(                                  \
      const MatrixT<Scalar>&, const IndexMatrix&, Index, Index, double, Observer*);               \
  template void deepseek_v2_comm_balance_loss_backward<Scalar>(                                   \
      MatrixT<Scalar>&, const MatrixT<Scalar>&, const IndexMatrix&, Index, Index, double);        \
  template Scalar deepseek_v3_sequence_balance_loss_forward<Scalar>(                              \
      const MatrixT<Scalar>&, const IndexMatrix&, std::span<const Index>, double, Observer*);     \
  template void deepseek_v3_sequence_balance_loss_backward<Scalar>(                               \
      MatrixT<Scalar>&, const MatrixT<Scalar>&, const IndexMatrix&, std::span<const Index>,       \
      double);                                                                                    \
  template Scalar router_z_loss_forward<Scalar>(const MatrixT<Scalar>&, double, Observer*);       \
  template void router_z_loss_backward<Scalar>(MatrixT<Scalar>&, const MatrixT<Scalar>&, double);

MOELAB_INSTANTIATE_LOSSES(float)
MOELAB_INSTANTIATE_LOSSES(double)
#undef MOELAB_INSTANTIATE_LOSSES

}  // namespace moelab
