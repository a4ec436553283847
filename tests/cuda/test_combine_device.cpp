// moelab/tests/cuda/test_combine_device.cpp — every version of cuda/combine.cu, and the shared
// expert's gate, against the reference computed in double from the same bf16 inputs.
//
// The rule. The kernels sum n = k + 1 terms (k weighted expert rows and the gated shared row) in
// fp32, one rounding per multiply-add (two without contraction), so
//   |y_device - y_exact| <= bound = 2 (k + 2) 2^-24 sum_terms |term|        (fp32 output)
// and a bf16 output must be the correctly rounded (nearest-even) exact value, except where the
// exact value lies within `bound` of a rounding boundary: there the device may round either way,
// and those elements are counted and printed (a handful in millions; a bug makes thousands). The
// reference is the equation of moelab::combine_forward and moelab::shared_gate_forward written per
// pair in double; one test runs the reference functions themselves on a real dispatch plan.
// Outputs are poisoned (NaN) before every run. Without a GPU these tests skip, except the argument
// checks, which throw before the device is touched.
#include "cuda/combine.h"

#include <gtest/gtest.h>

#include "tests/cuda/device_testing.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "reference/dispatch.h"
#include "reference/error.h"
#include "reference/experts.h"
#include "reference/layer.h"
#include "reference/math.h"
#include "reference/numerics.h"

namespace moelab::cuda {
namespace {

constexpr double kU32 = 0x1p-24;  // fp32 unit roundoff

// x rounded to the nearest bf16 (ties to even), directly from the double: no double rounding
// through float. bf16 has 8 significant bits; below 2^-126 the quantum stays 2^-133 (subnormals).
Bf16Bits bf16_of(double x) {
  if (x == 0.0) return std::signbit(x) ? 0x8000 : 0x0000;
  const int e = std::max(std::ilogb(x), -126);
  const double quantum = std::ldexp(1.0, e - 7);
  const double rounded = std::nearbyint(x / quantum) * quantum;  // default mode: ties to even
  return static_cast<Bf16Bits>(std::bit_cast<std::uint32_t>(static_cast<float>(rounded)) >> 16);
}
// A bf16's value: its bits are the top half of a float's (exact; moelab::decode, inlined).
double bf16_value(Bf16Bits b) { return std::bit_cast<float>(std::uint32_t{b} << 16); }

// Random bf16 values, never zero: random sign and 7-bit mantissa, |x| in [2^(scale_log2 - 3),
// 2^(scale_log2 + 1)). Four from each 64-bit draw: the large cases need hundreds of millions.
std::vector<Bf16Bits> random_bf16(std::size_t n, int scale_log2, std::mt19937_64& rng) {
  std::vector<Bf16Bits> xs(n);
  for (std::size_t i = 0; i < n; i += 4) {
    std::uint64_t r = rng();
    for (std::size_t q = i; q < std::min(n, i + 4); ++q, r >>= 16) {
      const auto exponent = static_cast<std::uint32_t>(127 + scale_log2 - 3 + static_cast<int>((r >> 8) & 3));
      xs[q] = static_cast<Bf16Bits>((r & 0x8000) | (exponent << 7) | (r & 0x7F));
    }
  }
  return xs;
}
// round(log2(sqrt(C))): a weight of 2^-that keeps a length-C dot product of order 1.
int inverse_sqrt_log2(std::int64_t C) { return static_cast<int>(std::lround(0.5 * std::log2(static_cast<double>(C)))); }

std::vector<float> random_unit(std::size_t n, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::vector<float> xs(n);
  for (float& x : xs) x = unit(rng);
  return xs;
}

struct CombineCase {
  std::int64_t tokens, hidden;
  int top_k;
  bool weights, shared, gate;
};
std::string describe(const CombineCase& c) {
  std::ostringstream s;
  s << "T = " << c.tokens << ", C = " << c.hidden << ", k = " << c.top_k
    << (c.weights ? ", weights" : ", no weights") << (c.shared ? ", shared_out" : "")
    << (c.gate ? ", shared_gate" : "");
  return s.str();
}

// Host inputs of one case. Rows of expert_out: a random permutation of the T k pairs when that
// fits in 2^26 elements, else 2^26 / C rows that the pairs share; 1 pair in 8 is dropped (-1).
struct Inputs {
  std::int64_t rows = 0;
  std::vector<Bf16Bits> expert_out, shared_out;
  std::vector<std::int32_t> pair_row;
  std::vector<float> pair_weight, shared_gate;
};
Inputs make_inputs(const CombineCase& c, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  Inputs in;
  const std::int64_t pairs = c.tokens * c.top_k;
  const std::int64_t budget = (std::int64_t{1} << 26) / c.hidden;
  in.rows = std::min(pairs, budget);
  in.expert_out = random_bf16(static_cast<std::size_t>(in.rows * c.hidden), 0, rng);
  in.pair_row.resize(static_cast<std::size_t>(pairs));
  if (in.rows == pairs) {
    std::iota(in.pair_row.begin(), in.pair_row.end(), 0);
    std::shuffle(in.pair_row.begin(), in.pair_row.end(), rng);
  } else {
    std::uniform_int_distribution<std::int32_t> any(0, static_cast<std::int32_t>(in.rows - 1));
    for (std::int32_t& r : in.pair_row) r = any(rng);
  }
  for (std::size_t p = 0; p < in.pair_row.size(); ++p)
    if (rng() % 8 == 0) in.pair_row[p] = -1;
  if (c.weights) in.pair_weight = random_unit(static_cast<std::size_t>(pairs), rng);
  if (c.shared) in.shared_out = random_bf16(static_cast<std::size_t>(c.tokens * c.hidden), 0, rng);
  if (c.gate) in.shared_gate = random_unit(static_cast<std::size_t>(c.tokens), rng);
  return in;
}

// y_exact[t, c] in double, the bound of the device's fp32 error, and y_exact rounded to bf16.
struct Reference {
  std::vector<double> y, bound;
  std::vector<Bf16Bits> y_bf16;
};
Reference reference(const CombineCase& c, const Inputs& in) {
  Reference ref;
  const std::size_t n = static_cast<std::size_t>(c.tokens * c.hidden);
  ref.y.assign(n, 0.0);
  ref.bound.assign(n, 0.0);
  const double rule = 2.0 * (c.top_k + 2) * kU32;
  const auto C = static_cast<std::size_t>(c.hidden);
  for (std::size_t t = 0; t < static_cast<std::size_t>(c.tokens); ++t) {
    double* y = &ref.y[t * C];
    double* b = &ref.bound[t * C];
    for (std::size_t j = 0; j < static_cast<std::size_t>(c.top_k); ++j) {
      const std::size_t p = t * static_cast<std::size_t>(c.top_k) + j;
      const std::int32_t r = in.pair_row[p];
      if (r < 0) continue;
      const double w = c.weights ? in.pair_weight[p] : 1.0;
      const Bf16Bits* row = &in.expert_out[static_cast<std::size_t>(r) * C];
      for (std::size_t ch = 0; ch < C; ++ch) {
        const double term = w * bf16_value(row[ch]);
        y[ch] += term;
        b[ch] += std::abs(term);
      }
    }
    if (c.shared) {
      const double g = c.gate ? in.shared_gate[t] : 1.0;
      for (std::size_t ch = 0; ch < C; ++ch) {
        const double term = g * bf16_value(in.shared_out[t * C + ch]);
        y[ch] += term;
        b[ch] += std::abs(term);
      }
    }
    for (std::size_t ch = 0; ch < C; ++ch) b[ch] *= rule;
  }
  ref.y_bf16.resize(n);
  for (std::size_t i = 0; i < n; ++i) ref.y_bf16[i] = bf16_of(ref.y[i]);
  return ref;
}

// Runs the combine on the device; returns y as doubles (decoded from bf16 or fp32) and, for bf16,
// the bits.
struct DeviceResult {
  std::vector<double> y;
  std::vector<Bf16Bits> bits;
};
DeviceResult run_device(const CombineCase& c, const Inputs& in, int version, Format y_dtype) {
  const DeviceBuffer<Bf16Bits> expert_out{std::span<const Bf16Bits>(in.expert_out)};
  const DeviceBuffer<std::int32_t> pair_row{std::span<const std::int32_t>(in.pair_row)};
  const DeviceBuffer<float> pair_weight{std::span<const float>(in.pair_weight)};
  const DeviceBuffer<Bf16Bits> shared_out{std::span<const Bf16Bits>(in.shared_out)};
  const DeviceBuffer<float> shared_gate{std::span<const float>(in.shared_gate)};
  const std::size_t n = static_cast<std::size_t>(c.tokens * c.hidden);
  DeviceBuffer<std::uint8_t> y(n * (y_dtype == Format::bf16 ? 2 : 4));
  y.poison(0xFF);  // NaN in bf16 and fp32
  CombineArgs args;
  args.expert_out = expert_out.data();
  args.pair_row = pair_row.data();
  args.pair_weight = pair_weight.data();  // null when empty: weight 1
  args.shared_out = shared_out.data();
  args.shared_gate = shared_gate.data();
  args.y = y.data();
  args.y_dtype = y_dtype;
  args.tokens = c.tokens;
  args.hidden_size = c.hidden;
  args.top_k = c.top_k;
  launch_combine(args, version);
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize after launch_combine");
  const std::vector<std::uint8_t> bytes = y.download();
  DeviceResult out;
  out.y.resize(n);
  if (y_dtype == Format::bf16) {
    out.bits.resize(n);
    std::memcpy(out.bits.data(), bytes.data(), n * 2);
    for (std::size_t i = 0; i < n; ++i) out.y[i] = bf16_value(out.bits[i]);
  } else {
    std::vector<float> f(n);
    std::memcpy(f.data(), bytes.data(), n * 4);
    for (std::size_t i = 0; i < n; ++i) out.y[i] = f[i];
  }
  return out;
}

// Compares by the rule above. Returns the number of failures; counts near-boundary roundings.
// (Hundreds of millions of elements: the messages are built only for failures.)
std::size_t compare(const CombineCase& c, const Reference& ref, const DeviceResult& dev, Format y_dtype,
                    std::size_t& near_boundary) {
  std::size_t failures = 0;
  const auto C = static_cast<std::size_t>(c.hidden);
  for (std::size_t i = 0; i < ref.y.size(); ++i) {
    bool ok = false;
    if (y_dtype == Format::fp32) {
      ok = std::abs(dev.y[i] - ref.y[i]) <= ref.bound[i];
    } else {
      ok = dev.bits[i] == ref.y_bf16[i];
      if (!ok) {  // within the bound of a boundary: either neighbour is the device's right answer
        const double lo = bf16_value(bf16_of(ref.y[i] - ref.bound[i]));
        const double hi = bf16_value(bf16_of(ref.y[i] + ref.bound[i]));
        ok = lo <= dev.y[i] && dev.y[i] <= hi;
        if (ok) ++near_boundary;
      }
    }
    if (ok || ++failures > 8) continue;
    std::ostringstream want;
    if (y_dtype == Format::fp32) {
      want << ref.y[i] << " +- " << ref.bound[i];
    } else {
      want << "0x" << std::hex << ref.y_bf16[i] << std::dec << " = " << bf16_value(ref.y_bf16[i]) << " (exact "
           << ref.y[i] << " +- " << ref.bound[i] << ")";
    }
    ADD_FAILURE() << "y[t = " << i / C << ", c = " << i % C << "]: device " << dev.y[i] << ", expected "
                  << want.str();
  }
  if (failures > 8) ADD_FAILURE() << failures << " elements wrong in all";
  return failures;
}

struct Variant {
  int version;
  Format y_dtype;
};
std::vector<Variant> all_variants() {
  std::vector<Variant> vs;
  for (int v = 1; v <= kCombineVersions; ++v)
    for (const Format f : {Format::bf16, Format::fp32}) vs.push_back({v, f});
  return vs;
}

// Every version, bf16 and fp32 out, on every (T, C, k) with T in {1, 3, 1000, 16384}, C in {8, 64,
// 2048, 7168} (not 16384 x 7168: 117M outputs, a minute of host reference), k in {1, 2, 8}; with
// and without weights, shared_out and shared_gate (all six combinations for the smaller shapes,
// one per shape, in turn, for the larger); dropped pairs everywhere. Inputs and reference are built
// once per case and every variant checked against them.
TEST(CudaCombine, MatchesReferenceEveryVersion) {
  SKIP_WITHOUT_DEVICE();
  constexpr bool kOptions[6][3] = {{false, false, false}, {true, false, false}, {false, true, false},
                                   {true, true, false},   {false, true, true},  {true, true, true}};
  const std::vector<Variant> variants = all_variants();
  std::vector<std::size_t> near_boundary(variants.size(), 0);
  std::size_t elements = 0;
  int turn = 0;
  int failed_cases = 0;
  for (const std::int64_t T : {1, 3, 1000, 16384}) {
    for (const std::int64_t C : {8, 64, 2048, 7168}) {
      if (T == 16384 && C == 7168) continue;
      for (const int k : {1, 2, 8}) {
        const bool all_options = T * C <= (std::int64_t{1} << 21);
        for (int o = 0; o < 6; ++o) {
          if (!all_options && o != turn % 6) continue;
          const CombineCase c{T, C, k, kOptions[o][0], kOptions[o][1], kOptions[o][2]};
          const std::uint64_t seed = 1000003 * static_cast<std::uint64_t>(T) + 101 * static_cast<std::uint64_t>(C) +
                                     10 * static_cast<std::uint64_t>(k) + static_cast<std::uint64_t>(o);
          const Inputs in = make_inputs(c, seed);
          const Reference ref = reference(c, in);
          elements += ref.y.size();
          for (std::size_t v = 0; v < variants.size(); ++v) {
            const auto [version, y_dtype] = variants[v];
            SCOPED_TRACE("version " + std::to_string(version) + ", y " + std::string(format_name(y_dtype)) + ", " +
                         describe(c) + ", seed " + std::to_string(seed));
            const DeviceResult dev = run_device(c, in, version, y_dtype);
            if (compare(c, ref, dev, y_dtype, near_boundary[v]) != 0 && ++failed_cases >= 3) {
              FAIL() << "stopping after 3 failing cases";
            }
          }
        }
        ++turn;
      }
    }
  }
  for (std::size_t v = 0; v < variants.size(); ++v) {
    std::cout << "    version " << variants[v].version << ", " << format_name(variants[v].y_dtype) << ": "
              << elements << " outputs compared";
    if (variants[v].y_dtype == Format::bf16) {
      std::cout << "; " << near_boundary[v] << " rounded the other way within the error bound of a rounding boundary";
    }
    std::cout << "\n";
    EXPECT_LE(near_boundary[v], elements / 100) << "far more near-boundary roundings than expected";
  }
}

// sg_t = sigmoid(x_t . w) against the double reference, for C with and without the 16-byte path
// (C % 8 == 0, or not: 3, 100). The fp32 dot product's error is at most gamma_n sum |x_c w_c| with
// n = ceil(C / 32) + 6 (a lane's sequential sum, then 5 butterfly steps), and the sigmoid scales it
// by sg (1 - sg) <= 1/4; expf and the division add a few ulps.
TEST(CudaSharedGate, MatchesReference) {
  SKIP_WITHOUT_DEVICE();
  for (const std::int64_t T : {1, 3, 1000, 16384}) {
    for (const std::int64_t C : {3, 8, 64, 100, 2048, 7168}) {
      SCOPED_TRACE("T = " + std::to_string(T) + ", C = " + std::to_string(C));
      std::mt19937_64 rng(static_cast<std::uint64_t>(T * 10007 + C));
      // |w| ~ 1 / sqrt(C) keeps z = x . w of order 1: the sigmoid is not saturated.
      const std::vector<Bf16Bits> x = random_bf16(static_cast<std::size_t>(T * C), 0, rng);
      const std::vector<Bf16Bits> w = random_bf16(static_cast<std::size_t>(C), -inverse_sqrt_log2(C), rng);
      const DeviceBuffer<Bf16Bits> d_x{std::span<const Bf16Bits>(x)};
      const DeviceBuffer<Bf16Bits> d_w{std::span<const Bf16Bits>(w)};
      DeviceBuffer<float> d_sg(static_cast<std::size_t>(T));
      d_sg.poison(0xFF);
      launch_shared_gate(d_sg.data(), d_x.data(), d_w.data(), T, C);
      check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize after launch_shared_gate");
      const std::vector<float> sg = d_sg.download();
      const double n = std::ceil(static_cast<double>(C) / 32) + 6;
      std::size_t failures = 0;
      for (std::int64_t t = 0; t < T; ++t) {
        double z = 0;
        double magnitude = 0;
        for (std::int64_t c = 0; c < C; ++c) {
          const double term = bf16_value(x[static_cast<std::size_t>(t * C + c)]) * bf16_value(w[static_cast<std::size_t>(c)]);
          z += term;
          magnitude += std::abs(term);
        }
        const double want = sigmoid(z);
        const double tol = want * (1 - want) * n * kU32 * magnitude * 1.01 + 8 * kU32 * want;
        const double got = sg[static_cast<std::size_t>(t)];
        if (!(std::abs(got - want) <= tol) && ++failures <= 8) {
          ADD_FAILURE() << "sg[" << t << "]: device " << got << ", expected " << want << " +- " << tol
                        << " (z = " << z << ")";
        }
      }
      EXPECT_EQ(failures, 0u);
    }
  }
}

// End to end with the reference functions themselves: a real plan (dispatch_plan on uniform
// routing), expert outputs per row, the gates on the output, a gated
// shared expert whose gate comes from launch_shared_gate; the device combine against
// moelab::combine_forward + moelab::shared_gate_forward in double.
TEST(CudaCombineLayer, MatchesCombineForwardAndSharedGate) {
  SKIP_WITHOUT_DEVICE();
  const Index T = 1000;
  const int k = 8;
  const int E = 64;
  for (const Index C : {Index{64}, Index{2048}}) {
    SCOPED_TRACE("C = " + std::to_string(C));
    std::mt19937_64 rng(static_cast<std::uint64_t>(C));
    // Routing and gates.
    IndexMatrix ids(T, k);
    std::vector<int> experts(E);
    std::iota(experts.begin(), experts.end(), 0);
    for (Index t = 0; t < T; ++t) {
      std::shuffle(experts.begin(), experts.end(), rng);
      for (int j = 0; j < k; ++j) ids(t, j) = experts[static_cast<std::size_t>(j)];
    }
    const std::vector<float> gates = random_unit(static_cast<std::size_t>(T * k), rng);
    // The plan: the reference's (test_cuda_permute shows the device permutation gives the same).
    Dispatch plan;
    dispatch_plan(plan, ids, IndexMatrix(), E);
    const Index rows = plan.num_rows();
    const std::vector<std::int32_t> pair_row_host(plan.pair_row.data(), plan.pair_row.data() + plan.pair_row.size());
    const DeviceBuffer<std::int32_t> pair_row{std::span<const std::int32_t>(pair_row_host)};
    const DeviceBuffer<float> d_gates{std::span<const float>(gates)};
    // Expert outputs (one per row), the layer input and the shared expert, its gate weights.
    const std::vector<Bf16Bits> expert_out = random_bf16(static_cast<std::size_t>(rows * C), 0, rng);
    const std::vector<Bf16Bits> x = random_bf16(static_cast<std::size_t>(T * C), 0, rng);
    const std::vector<Bf16Bits> shared = random_bf16(static_cast<std::size_t>(T * C), 0, rng);
    const std::vector<Bf16Bits> w_sg = random_bf16(static_cast<std::size_t>(C), -inverse_sqrt_log2(C), rng);
    const DeviceBuffer<Bf16Bits> d_expert_out{std::span<const Bf16Bits>(expert_out)};
    const DeviceBuffer<Bf16Bits> d_x{std::span<const Bf16Bits>(x)};
    const DeviceBuffer<Bf16Bits> d_shared{std::span<const Bf16Bits>(shared)};
    const DeviceBuffer<Bf16Bits> d_w_sg{std::span<const Bf16Bits>(w_sg)};
    DeviceBuffer<float> d_sg(static_cast<std::size_t>(T));
    DeviceBuffer<float> d_y(static_cast<std::size_t>(T * C));
    d_sg.poison(0xFF);
    d_y.poison(0xFF);
    launch_shared_gate(d_sg.data(), d_x.data(), d_w_sg.data(), T, C);
    CombineArgs a;
    a.expert_out = d_expert_out.data();
    a.pair_row = pair_row.data();
    a.pair_weight = d_gates.data();
    a.shared_out = d_shared.data();
    a.shared_gate = d_sg.data();
    a.y = d_y.data();
    a.y_dtype = Format::fp32;
    a.tokens = T;
    a.hidden_size = C;
    a.top_k = k;
    launch_combine(a, 2);
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    const std::vector<float> y = d_y.download();
    const std::vector<float> sg = d_sg.download();

    // The reference, in double: rows in the plan's order, row weights = their gates.
    MatrixD out_rows(rows, C);
    VectorT<double> row_weight(rows);
    for (Index t = 0; t < T; ++t) {
      for (int j = 0; j < k; ++j) {
        const std::int32_t r = plan.pair_row(t, j);
        row_weight(r) = gates[static_cast<std::size_t>(t * k + j)];
        for (Index c = 0; c < C; ++c) out_rows(r, c) = bf16_value(expert_out[static_cast<std::size_t>(r * C + c)]);
      }
    }
    MatrixD y_ref;
    combine_forward(y_ref, out_rows, row_weight, plan.row_token, T);
    MatrixD xd(T, C), shared_d(T, C), w_d(1, C);
    for (Index t = 0; t < T; ++t) {
      for (Index c = 0; c < C; ++c) {
        xd(t, c) = bf16_value(x[static_cast<std::size_t>(t * C + c)]);
        shared_d(t, c) = bf16_value(shared[static_cast<std::size_t>(t * C + c)]);
      }
    }
    for (Index c = 0; c < C; ++c) w_d(0, c) = bf16_value(w_sg[static_cast<std::size_t>(c)]);
    MatrixD gated;
    VectorT<double> sg_ref;
    shared_gate_forward(gated, sg_ref, xd, w_d, shared_d);
    y_ref += gated;

    // The device's own gate is checked in CudaSharedGate; here its fp32 value feeds the combine,
    // so the bound covers the gate's error (|sg - sg_ref| <= 1e-5, scaled by |shared|) too.
    std::size_t failures = 0;
    for (Index t = 0; t < T; ++t) {
      EXPECT_NEAR(sg[static_cast<std::size_t>(t)], sg_ref(t), 1e-5) << "t = " << t;
      for (Index c = 0; c < C; ++c) {
        double magnitude = std::abs(sg_ref(t) * shared_d(t, c));
        for (int j = 0; j < k; ++j) {
          const std::int32_t r = plan.pair_row(t, j);
          magnitude += std::abs(row_weight(r) * out_rows(r, c));
        }
        const double tol = 2.0 * (k + 2) * kU32 * magnitude + 1e-5 * std::abs(shared_d(t, c));
        const double got = y[static_cast<std::size_t>(t * C + c)];
        if (!(std::abs(got - y_ref(t, c)) <= tol) && ++failures <= 8) {
          ADD_FAILURE() << "y[" << t << ", " << c << "]: device " << got << ", reference " << y_ref(t, c)
                        << " +- " << tol;
        }
      }
    }
    EXPECT_EQ(failures, 0u);
  }
}

// Fake (host) pointers, 16-byte aligned: the checks must refuse before anything dereferences them.
CombineArgs fake_args() {
  alignas(16) static Bf16Bits bf16[64];
  alignas(16) static std::int32_t i32[16];
  alignas(16) static float f32[64];
  CombineArgs a;
  a.expert_out = bf16;
  a.pair_row = i32;
  a.pair_weight = f32;
  a.y = f32;
  a.y_dtype = Format::bf16;
  a.tokens = 2;
  a.hidden_size = 16;
  a.top_k = 2;
  return a;
}

// Arguments no kernel can run with are refused before the device is touched (these run without a
// GPU).
TEST(CudaCombineArguments, RejectsBadArguments) {
  CombineArgs a = fake_args();
  a.top_k = 0;
  expect_error_naming([&] { launch_combine(a, 1); }, "top_k = 0");
  a = fake_args();
  a.hidden_size = 12;
  expect_error_naming([&] { launch_combine(a, 2); }, "hidden_size = 12");
  a.hidden_size = 0;
  expect_error_naming([&] { launch_combine(a, 1); }, "hidden_size = 0");
  a = fake_args();
  a.tokens = -1;
  expect_error_naming([&] { launch_combine(a, 1); }, "tokens = -1");
  a = fake_args();
  a.y_dtype = Format::fp16;
  expect_error_naming([&] { launch_combine(a, 1); }, "y_dtype = fp16");
  a = fake_args();
  expect_error_naming([&] { launch_combine(a, 0); }, "version = 0");
  expect_error_naming([&] { launch_combine(a, kCombineVersions + 1); },
                      "version = " + std::to_string(kCombineVersions + 1));
  a.shared_gate = static_cast<const float*>(a.pair_weight);  // a gate without shared_out
  expect_error_naming([&] { launch_combine(a, 1); }, "shared_gate");
}

TEST(CudaCombineArguments, RejectsNullAndMisalignedPointers) {
  CombineArgs a = fake_args();
  a.expert_out = nullptr;
  expect_error_naming([&] { launch_combine(a, 1); }, "expert_out = null");
  a = fake_args();
  a.pair_row = nullptr;
  expect_error_naming([&] { launch_combine(a, 2); }, "pair_row = null");
  a = fake_args();
  a.y = nullptr;
  expect_error_naming([&] { launch_combine(a, 2); }, "y = null");
  a = fake_args();
  a.expert_out += 1;  // 2-byte aligned: fine for version 1, not for version 2's 16-byte loads
  expect_error_naming([&] { launch_combine(a, 2); }, "expert_out");
  a = fake_args();
  a.y = static_cast<char*>(a.y) + 4;
  expect_error_naming([&] { launch_combine(a, 2); }, "16-byte");
}

TEST(CudaCombineArguments, EmptyNeedsNoDevice) {
  CombineArgs a;  // T = 0, all pointers null
  a.hidden_size = 8;
  launch_combine(a, 1);
  launch_combine(a, 2);
  launch_shared_gate(nullptr, nullptr, nullptr, 0, 8);
}

TEST(CudaSharedGateArguments, RejectsBadArguments) {
  alignas(16) static Bf16Bits bf16[16];
  static float f32[2];
  expect_error_naming([] { launch_shared_gate(f32, bf16, bf16, 2, 0); }, "hidden_size = 0");
  expect_error_naming([] { launch_shared_gate(f32, bf16, bf16, -1, 8); }, "tokens = -1");
  expect_error_naming([] { launch_shared_gate(nullptr, bf16, bf16, 2, 8); }, "sg = null");
  expect_error_naming([] { launch_shared_gate(f32, nullptr, bf16, 2, 8); }, "x = null");
  expect_error_naming([] { launch_shared_gate(f32, bf16, nullptr, 2, 8); }, "w = null");
}

}  // namespace
}  // namespace moelab::cuda
