// moelab/reference/transformer.cpp — see transformer.h. B = batch, T = sequence length, N = B*T,
// C = hidden size, V = vocabulary, H = heads, D = head dim.
#include "reference/transformer.h"

#include "reference/error.h"
#include "reference/math.h"

#include <fmt/format.h>

#include <cmath>
#include <cstddef>
#include <limits>
#include <string>
#include <utility>

namespace moelab {
namespace {

// Every id (or target) in [0, V): Error "ids[5] = 300: must be in [0, vocab_size = 256)".
void require_ids(std::span<const std::int32_t> ids, Index vocab_size, std::string_view what) {
  for (std::size_t n = 0; n < ids.size(); ++n) {
    if (ids[n] < 0 || ids[n] >= vocab_size)
      fail(fmt::format("{}[{}]", what, n), ids[n], fmt::format("must be in [0, vocab_size = {})", vocab_size));
  }
}

void require_batch(Index rows, Index batch_size, Index seq_len, std::string_view field) {
  require(batch_size >= 1, "batch_size", batch_size, "must be positive");
  require(seq_len >= 1, "seq_len", seq_len, "must be positive");
  require(rows == batch_size * seq_len, field, rows,
          fmt::format("must equal batch_size * seq_len = {} * {} = {} (sequence-major rows)", batch_size, seq_len,
                      batch_size * seq_len));
}

template <typename Scalar>
void check_params(const AttentionParamsT<Scalar>& params, Index C) {
  require_shape(params.q_proj, C, C, "q_proj shape", "(hidden_size, hidden_size)");
  require_shape(params.k_proj, C, C, "k_proj shape", "(hidden_size, hidden_size)");
  require_shape(params.v_proj, C, C, "v_proj shape", "(hidden_size, hidden_size)");
  require_shape(params.o_proj, C, C, "o_proj shape", "(hidden_size, hidden_size)");
}

// The (T, D) block of head h of sequence b in an (N, C) matrix.
template <typename Scalar>
Eigen::Block<MatrixT<Scalar>> head_block(MatrixT<Scalar>& m, Index b, Index h, Index T, Index D) {
  return m.block(b * T, h * D, T, D);
}
template <typename Scalar>
Eigen::Block<const MatrixT<Scalar>> head_block(const MatrixT<Scalar>& m, Index b, Index h, Index T, Index D) {
  return m.block(b * T, h * D, T, D);
}

// The rotation of every (x1, x2) pair by +angle (sign = 1) or -angle (sign = -1):
//   y1 = x1 cos - sign x2 sin,  y2 = x2 cos + sign x1 sin
template <typename Scalar>
void rope_rotate(MatrixT<Scalar>& y, const MatrixT<Scalar>& x, const RopeTableT<Scalar>& table, Index n_heads,
                 Scalar sign) {
  const Index T = table.cos.rows();
  const Index half = table.cos.cols();  // D/2
  const Index D = 2 * half;
  require(T >= 1 && half >= 1 && table.sin.rows() == T && table.sin.cols() == half, "rope table shape",
          fmt::format("cos {} sin {}", shape_of(table.cos), shape_of(table.sin)),
          "must be two equal (T, D/2) matrices with T, D/2 >= 1 (from rope_table)");
  require(n_heads >= 1, "n_heads", n_heads, "must be positive");
  require(x.cols() == n_heads * D, "x.cols()", x.cols(),
          fmt::format("must equal n_heads * head_dim = {} * {}", n_heads, D));
  require(x.rows() % T == 0, "x.rows()", x.rows(), fmt::format("must be a multiple of seq_len = {}", T));
  y.resize(x.rows(), x.cols());  // a no-op when y is x
  // Per sequence b and head h, x1 and x2 are (T, D/2) blocks aligned with the table's rows.
  MatrixT<Scalar> y1(T, half);
  MatrixT<Scalar> y2(T, half);
  for (Index b = 0; b < x.rows() / T; ++b) {
    for (Index h = 0; h < n_heads; ++h) {
      const Eigen::Block<const MatrixT<Scalar>> x1 = x.block(b * T, h * D, T, half);
      const Eigen::Block<const MatrixT<Scalar>> x2 = x.block(b * T, h * D + half, T, half);
      y1 = x1.cwiseProduct(table.cos) - sign * x2.cwiseProduct(table.sin);
      y2 = x2.cwiseProduct(table.cos) + sign * x1.cwiseProduct(table.sin);
      y.block(b * T, h * D, T, half) = y1;  // written after both are read: y may be x
      y.block(b * T, h * D + half, T, half) = y2;
    }
  }
}

}  // namespace

// ---- 1. Token embedding ------------------------------------------------------------------------------

template <typename Scalar>
void embedding_forward(MatrixT<Scalar>& x, std::span<const std::int32_t> ids, const MatrixT<Scalar>& wte) {
  require_ids(ids, wte.rows(), "ids");
  const Index N = static_cast<Index>(ids.size());
  x.resize(N, wte.cols());
  for (Index n = 0; n < N; ++n) x.row(n) = wte.row(ids[static_cast<std::size_t>(n)]);
}

template <typename Scalar>
void embedding_backward(MatrixT<Scalar>& dwte, const MatrixT<Scalar>& dx, std::span<const std::int32_t> ids,
                        Index vocab_size) {
  require(vocab_size >= 1, "vocab_size", vocab_size, "must be positive");
  require(dx.rows() == static_cast<Index>(ids.size()), "dx.rows()", dx.rows(),
          fmt::format("must equal the number of ids = {}", ids.size()));
  require_ids(ids, vocab_size, "ids");
  dwte.setZero(vocab_size, dx.cols());
  for (Index n = 0; n < dx.rows(); ++n) dwte.row(ids[static_cast<std::size_t>(n)]) += dx.row(n);
}

// ---- 2. RMSNorm ----------------------------------------------------------------------------------------

void RMSNormConfig::validate() const {
  require(std::isfinite(eps) && eps > 0, "eps", eps, "must be finite and > 0");
}

template <typename Scalar>
void rmsnorm_forward(MatrixT<Scalar>& y, RMSNormCacheT<Scalar>& cache, const MatrixT<Scalar>& x,
                     const VectorT<Scalar>& weight, const RMSNormConfig& config) {
  config.validate();
  const Index N = x.rows();
  const Index C = x.cols();
  require(C >= 1, "x.cols()", C, "must be positive");
  require(weight.size() == C, "weight size", weight.size(), fmt::format("must equal x.cols() = {}", C));
  const Scalar eps = static_cast<Scalar>(config.eps);
  cache.inv_rms.resize(N);
  y.resize(N, C);
  for (Index n = 0; n < N; ++n) {
    const Scalar mean_square = x.row(n).squaredNorm() / static_cast<Scalar>(C);
    const Scalar r = Scalar(1) / std::sqrt(mean_square + eps);
    cache.inv_rms(n) = r;
    y.row(n) = (x.row(n) * r).cwiseProduct(weight.transpose());
  }
}

template <typename Scalar>
void rmsnorm_backward(MatrixT<Scalar>& dx, VectorT<Scalar>& dweight, const MatrixT<Scalar>& dy,
                      const RMSNormCacheT<Scalar>& cache, const MatrixT<Scalar>& x, const VectorT<Scalar>& weight) {
  const Index N = x.rows();
  const Index C = x.cols();
  require(weight.size() == C, "weight size", weight.size(), fmt::format("must equal x.cols() = {}", C));
  require_shape(dy, N, C, "dy shape", "x's shape");
  require(cache.inv_rms.size() == N, "cache.inv_rms size", cache.inv_rms.size(),
          fmt::format("must equal x.rows() = {} (pass the cache of the rmsnorm_forward that made y)", N));
  dweight.setZero(C);
  dx.resize(N, C);
  VectorT<Scalar> xhat(C);
  VectorT<Scalar> g(C);
  for (Index n = 0; n < N; ++n) {
    const Scalar r = cache.inv_rms(n);
    xhat = x.row(n).transpose() * r;
    g = dy.row(n).transpose().cwiseProduct(weight);
    dweight += dy.row(n).transpose().cwiseProduct(xhat);
    const Scalar mean_gx = g.dot(xhat) / static_cast<Scalar>(C);
    dx.row(n) = (r * (g - mean_gx * xhat)).transpose();
  }
}

// ---- 3. Rotary position embeddings ------------------------------------------------------------------

template <typename Scalar>
RopeTableT<Scalar> rope_table(Index seq_len, Index head_dim, double theta) {
  require(seq_len >= 1, "seq_len", seq_len, "must be positive");
  require(head_dim >= 2 && head_dim % 2 == 0, "head_dim", head_dim, "must be even and >= 2 (RoPE rotates pairs)");
  require(std::isfinite(theta) && theta > 0, "rope_theta", theta, "must be finite and > 0");
  const Index half = head_dim / 2;
  RopeTableT<Scalar> table{MatrixT<Scalar>(seq_len, half), MatrixT<Scalar>(seq_len, half)};
  for (Index i = 0; i < half; ++i) {
    // theta^(-2i/D): RoFormer sec. 3.2.2, theta_i = 10000^(-2(i-1)/d) with i counted from 1
    const double frequency = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
    for (Index p = 0; p < seq_len; ++p) {
      const double angle = static_cast<double>(p) * frequency;
      table.cos(p, i) = static_cast<Scalar>(std::cos(angle));
      table.sin(p, i) = static_cast<Scalar>(std::sin(angle));
    }
  }
  return table;
}

template <typename Scalar>
void rope_forward(MatrixT<Scalar>& y, const MatrixT<Scalar>& x, const RopeTableT<Scalar>& table, Index n_heads) {
  rope_rotate(y, x, table, n_heads, Scalar(1));
}

template <typename Scalar>
void rope_backward(MatrixT<Scalar>& dx, const MatrixT<Scalar>& dy, const RopeTableT<Scalar>& table, Index n_heads) {
  rope_rotate(dx, dy, table, n_heads, Scalar(-1));
}

// ---- 4. Linear projection ---------------------------------------------------------------------------

template <typename Scalar>
void linear_forward(MatrixT<Scalar>& y, const MatrixT<Scalar>& x, const MatrixT<Scalar>& w) {
  require(x.cols() == w.cols(), "x.cols()", x.cols(),
          fmt::format("must equal w.cols() = {} (w is (out, in))", w.cols()));
  y.resize(x.rows(), w.rows());
  y.noalias() = x * w.transpose();  // (N, in) (in, out)
}

template <typename Scalar>
void linear_backward(MatrixT<Scalar>& dx, MatrixT<Scalar>& dw, const MatrixT<Scalar>& dy, const MatrixT<Scalar>& x,
                     const MatrixT<Scalar>& w) {
  require(x.cols() == w.cols(), "x.cols()", x.cols(),
          fmt::format("must equal w.cols() = {} (w is (out, in))", w.cols()));
  require_shape(dy, x.rows(), w.rows(), "dy shape", "(N, out)");
  dw.resize(w.rows(), w.cols());
  dw.noalias() = dy.transpose() * x;  // (out, N) (N, in)
  dx.resize(x.rows(), x.cols());
  dx.noalias() = dy * w;              // (N, out) (out, in)
}

// ---- 5. Causal multi-head self-attention ------------------------------------------------------------

void AttentionConfig::validate() const {
  require(hidden_size > 0, "hidden_size", hidden_size, "must be positive");
  require(n_heads > 0, "n_heads", n_heads, "must be positive");
  if (hidden_size % n_heads != 0)
    fail("hidden_size", hidden_size, fmt::format("must be divisible by n_heads = {}", n_heads));
  require(head_dim() % 2 == 0, "head_dim", head_dim(),
          fmt::format("= hidden_size / n_heads = {} / {} must be even (RoPE rotates pairs of features)", hidden_size,
                      n_heads));
  if (n_kv_heads != 0 && n_kv_heads != n_heads)
    fail("n_kv_heads", n_kv_heads,
         fmt::format("must be 0 or n_heads = {} (grouped-query attention is not implemented)", n_heads));
  require(std::isfinite(rope_theta) && rope_theta > 0, "rope_theta", rope_theta, "must be finite and > 0");
}

template <typename Scalar>
void attention_forward(MatrixT<Scalar>& y, AttentionCacheT<Scalar>& cache, const MatrixT<Scalar>& x,
                       const AttentionParamsT<Scalar>& params, const AttentionConfig& config, Index batch_size,
                       Index seq_len) {
  config.validate();
  const Index C = config.hidden_size;
  const Index H = config.n_heads;
  const Index D = config.head_dim();
  const Index B = batch_size;
  const Index T = seq_len;
  require(x.cols() == C, "x.cols()", x.cols(), fmt::format("must equal hidden_size = {}", C));
  require_batch(x.rows(), B, T, "x.rows()");
  check_params(params, C);

  cache.rope = rope_table<Scalar>(T, D, config.rope_theta);
  linear_forward(cache.q, x, params.q_proj);
  linear_forward(cache.k, x, params.k_proj);
  linear_forward(cache.v, x, params.v_proj);
  rope_forward(cache.q, cache.q, cache.rope, H);
  rope_forward(cache.k, cache.k, cache.rope, H);

  const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(D));
  cache.probs.resize(B * H * T, T);
  cache.context.resize(B * T, C);
  for (Index b = 0; b < B; ++b) {
    for (Index h = 0; h < H; ++h) {
      Eigen::Block<MatrixT<Scalar>> P = cache.probs.block((b * H + h) * T, 0, T, T);  // (T, T)
      P.noalias() = scale * (head_block(cache.q, b, h, T, D) * head_block(cache.k, b, h, T, D).transpose());
      // Causal softmax of row i over j in [0, i]; the masked scores j > i get probability 0.
      for (Index i = 0; i < T; ++i) {
        const Scalar m = P.row(i).head(i + 1).maxCoeff();
        P.row(i).head(i + 1) = (P.row(i).head(i + 1).array() - m).unaryExpr(StdExp{}).matrix();
        P.row(i).head(i + 1) /= P.row(i).head(i + 1).sum();
        P.row(i).tail(T - i - 1).setZero();
      }
      head_block(cache.context, b, h, T, D).noalias() = P * head_block(cache.v, b, h, T, D);  // (T, T) (T, D)
    }
  }
  linear_forward(y, cache.context, params.o_proj);
}

template <typename Scalar>
void attention_backward(MatrixT<Scalar>& dx, AttentionParamsT<Scalar>& dparams, const MatrixT<Scalar>& dy,
                        const AttentionCacheT<Scalar>& cache, const MatrixT<Scalar>& x,
                        const AttentionParamsT<Scalar>& params, const AttentionConfig& config, Index batch_size,
                        Index seq_len) {
  config.validate();
  const Index C = config.hidden_size;
  const Index H = config.n_heads;
  const Index D = config.head_dim();
  const Index B = batch_size;
  const Index T = seq_len;
  const Index N = B * T;
  require(x.cols() == C, "x.cols()", x.cols(), fmt::format("must equal hidden_size = {}", C));
  require_batch(x.rows(), B, T, "x.rows()");
  check_params(params, C);
  require_shape(dy, N, C, "dy shape", "(N, C)");
  constexpr std::string_view kFromForward = " (pass the cache of the attention_forward that made y)";
  require_shape(cache.q, N, C, "cache.q shape", "(N, C)", kFromForward);
  require_shape(cache.k, N, C, "cache.k shape", "(N, C)", kFromForward);
  require_shape(cache.v, N, C, "cache.v shape", "(N, C)", kFromForward);
  require_shape(cache.context, N, C, "cache.context shape", "(N, C)", kFromForward);
  require_shape(cache.probs, B * H * T, T, "cache.probs shape", "(B*H*T, T)", kFromForward);
  require_shape(cache.rope.cos, T, D / 2, "cache.rope.cos shape", "(T, D/2)", kFromForward);

  // y = context Wo^T
  MatrixT<Scalar> dcontext;
  linear_backward(dcontext, dparams.o_proj, dy, cache.context, params.o_proj);

  const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(D));
  MatrixT<Scalar> dq(N, C);  // with respect to q after RoPE
  MatrixT<Scalar> dk(N, C);  // with respect to k after RoPE
  MatrixT<Scalar> dv(N, C);
  MatrixT<Scalar> dS(T, T);  // dP, then dS in place
  for (Index b = 0; b < B; ++b) {
    for (Index h = 0; h < H; ++h) {
      const Eigen::Block<const MatrixT<Scalar>> P = cache.probs.block((b * H + h) * T, 0, T, T);  // (T, T)
      const Eigen::Block<const MatrixT<Scalar>> dC = head_block(std::as_const(dcontext), b, h, T, D);
      dS.noalias() = dC * head_block(cache.v, b, h, T, D).transpose();  // dP (T, D) (D, T)
      head_block(dv, b, h, T, D).noalias() = P.transpose() * dC;        // (T, T) (T, D)
      // Softmax backward per row: dS_ij = P_ij (dP_ij - sum_l P_il dP_il), then the 1/sqrt(D).
      for (Index i = 0; i < T; ++i) {
        const Scalar row_dot = P.row(i).dot(dS.row(i));
        dS.row(i) = scale * P.row(i).cwiseProduct((dS.row(i).array() - row_dot).matrix());
      }
      head_block(dq, b, h, T, D).noalias() = dS * head_block(cache.k, b, h, T, D);              // (T, T) (T, D)
      head_block(dk, b, h, T, D).noalias() = dS.transpose() * head_block(cache.q, b, h, T, D);  // (T, T) (T, D)
    }
  }

  // q = rope(x Wq^T), k = rope(x Wk^T), v = x Wv^T
  rope_backward(dq, dq, cache.rope, H);
  rope_backward(dk, dk, cache.rope, H);
  MatrixT<Scalar> dx_part;
  linear_backward(dx, dparams.q_proj, dq, x, params.q_proj);
  linear_backward(dx_part, dparams.k_proj, dk, x, params.k_proj);
  dx += dx_part;
  linear_backward(dx_part, dparams.v_proj, dv, x, params.v_proj);
  dx += dx_part;
}

template <typename Scalar>
AttentionParamsT<Scalar> init_attention(const AttentionConfig& config, Rng& rng, double init_std) {
  config.validate();
  require(std::isfinite(init_std) && init_std >= 0, "init_std", init_std, "must be finite and >= 0");
  const Index C = config.hidden_size;
  const auto draw = [&] {  // row-major N(0, init_std^2)
    MatrixT<Scalar> m(C, C);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(init_std * rng.normal());
    return m;
  };
  AttentionParamsT<Scalar> p;
  p.q_proj = draw();
  p.k_proj = draw();
  p.v_proj = draw();
  p.o_proj = draw();
  return p;
}

// ---- 6. Cross-entropy -----------------------------------------------------------------------------------

template <typename Scalar>
Scalar cross_entropy_forward(const MatrixT<Scalar>& logits, std::span<const std::int32_t> targets) {
  const Index N = logits.rows();
  const Index V = logits.cols();
  require(V >= 1, "logits.cols()", V, "must be positive (the vocabulary size)");
  require(static_cast<Index>(targets.size()) == N, "targets size", targets.size(),
          fmt::format("must equal logits.rows() = {}", N));
  require_ids(targets, V, "targets");
  if (N == 0) return Scalar(0);
  double sum = 0.0;
  for (Index n = 0; n < N; ++n) {
    const Scalar m = logits.row(n).maxCoeff();
    const Scalar lse = m + std::log((logits.row(n).array() - m).unaryExpr(StdExp{}).sum());  // the sum is in [1, V]
    sum += static_cast<double>(lse - logits(n, targets[static_cast<std::size_t>(n)]));
  }
  return static_cast<Scalar>(sum / static_cast<double>(N));
}

template <typename Scalar>
void cross_entropy_backward(MatrixT<Scalar>& dlogits, const MatrixT<Scalar>& logits,
                            std::span<const std::int32_t> targets, Scalar dloss) {
  const Index N = logits.rows();
  const Index V = logits.cols();
  require(V >= 1, "logits.cols()", V, "must be positive (the vocabulary size)");
  require(static_cast<Index>(targets.size()) == N, "targets size", targets.size(),
          fmt::format("must equal logits.rows() = {}", N));
  require_ids(targets, V, "targets");
  dlogits.resize(N, V);
  if (N == 0) return;
  const Scalar row_scale = dloss / static_cast<Scalar>(N);
  for (Index n = 0; n < N; ++n) {
    const Scalar m = logits.row(n).maxCoeff();
    dlogits.row(n) = (logits.row(n).array() - m).unaryExpr(StdExp{}).matrix();
    dlogits.row(n) *= row_scale / dlogits.row(n).sum();
    dlogits(n, targets[static_cast<std::size_t>(n)]) -= row_scale;
  }
}

// ---- explicit instantiations --------------------------------------------------------------------

#define MOELAB_INSTANTIATE_TRANSFORMER(Scalar)                                                                   \
  template void embedding_forward<Scalar>(MatrixT<Scalar>&, std::span<const std::int32_t>, const MatrixT<Scalar>&); \
  template void embedding_backward<Scalar>(MatrixT<Scalar>&, const MatrixT<Scalar>&, std::span<const std::int32_t>, \
                                           Index);                                                               \
  template void rmsnorm_forward<Scalar>(MatrixT<Scalar>&, RMSNormCacheT<Scalar>&, const MatrixT<Scalar>&,        \
                                        const VectorT<Scalar>&, const RMSNormConfig&);                          \
  template void rmsnorm_backward<Scalar>(MatrixT<Scalar>&, VectorT<Scalar>&, const MatrixT<Scalar>&,             \
                                         const RMSNormCacheT<Scalar>&, const MatrixT<Scalar>&,                   \
                                         const VectorT<Scalar>&);                                                \
  template RopeTableT<Scalar> rope_table<Scalar>(Index, Index, double);                                          \
  template void rope_forward<Scalar>(MatrixT<Scalar>&, const MatrixT<Scalar>&, const RopeTableT<Scalar>&, Index); \
  template void rope_backward<Scalar>(MatrixT<Scalar>&, const MatrixT<Scalar>&, const RopeTableT<Scalar>&, Index); \
  template void linear_forward<Scalar>(MatrixT<Scalar>&, const MatrixT<Scalar>&, const MatrixT<Scalar>&);        \
  template void linear_backward<Scalar>(MatrixT<Scalar>&, MatrixT<Scalar>&, const MatrixT<Scalar>&,              \
                                        const MatrixT<Scalar>&, const MatrixT<Scalar>&);                         \
  template void attention_forward<Scalar>(MatrixT<Scalar>&, AttentionCacheT<Scalar>&, const MatrixT<Scalar>&,    \
                                          const AttentionParamsT<Scalar>&, const AttentionConfig&, Index, Index); \
  template void attention_backward<Scalar>(MatrixT<Scalar>&, AttentionParamsT<Scalar>&, const MatrixT<Scalar>&,  \
                                           const AttentionCacheT<Scalar>&, const MatrixT<Scalar>&,               \
                                           const AttentionParamsT<Scalar>&, const AttentionConfig&, Index, Index); \
  template AttentionParamsT<Scalar> init_attention<Scalar>(const AttentionConfig&, Rng&, double);                \
  template Scalar cross_entropy_forward<Scalar>(const MatrixT<Scalar>&, std::span<const std::int32_t>);          \
  template void cross_entropy_backward<Scalar>(MatrixT<Scalar>&, const MatrixT<Scalar>&,                         \
                                               std::span<const std::int32_t>, Scalar);

MOELAB_INSTANTIATE_TRANSFORMER(float)
MOELAB_INSTANTIATE_TRANSFORMER(double)
#undef MOELAB_INSTANTIATE_TRANSFORMER

}  // namespace moelab
