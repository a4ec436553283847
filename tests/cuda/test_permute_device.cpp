// moelab/tests/cuda/test_permute_device.cpp — every version of cuda/permute.cu against the
// reference plan, moelab::dispatch_plan (every pair kept), element for element.
//
// The expected device plan follows from the reference's: counts are the same; offsets are padded,
//   offsets[e + 1] = offsets[e] + round_up(counts[e], row_align);
// the pair with reference row r in expert e's block goes to row offsets[e] + (r - ref_offsets[e])
// (the same rank within its expert, in pair order); every other row has row_token -1 and
// row_gate 0. With row_align = 1 the rows are the reference's exactly. Every element of counts,
// offsets, row_token, row_gate (bit for bit: it is a copy of the pair's gate) and pair_row is
// compared, on outputs poisoned before each run, and the first mismatches are printed with what
// they mean. Without a GPU these tests skip, except the argument checks, which throw before the
// device is touched.
#include "cuda/permute.h"

#include <gtest/gtest.h>

#include "tests/cuda/device_testing.h"

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "reference/dispatch.h"
#include "reference/error.h"

namespace moelab::cuda {
namespace {

// How the pairs are routed.
enum class Routing {
  uniform,     // each token: k distinct experts, uniformly
  skewed,      // 80% of pairs to expert 3 (min(3, E - 1)), the rest uniform; repeats allowed
  one_expert,  // every pair to expert E - 1
  sparse,      // uniform over the experts e with e % 3 == 1 only: many empty experts, expert 0 too
};
const char* routing_name(Routing r) {
  switch (r) {
    case Routing::uniform: return "uniform";
    case Routing::skewed: return "skewed";
    case Routing::one_expert: return "one_expert";
    case Routing::sparse: return "sparse";
  }
  return "?";
}
constexpr Routing kRoutings[] = {Routing::uniform, Routing::skewed, Routing::one_expert,
                                 Routing::sparse};

IndexMatrix make_ids(Index T, int k, int E, Routing routing, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  IndexMatrix ids(T, k);
  std::uniform_int_distribution<int> any(0, E - 1);
  std::vector<int> experts(static_cast<std::size_t>(E));
  std::iota(experts.begin(), experts.end(), 0);
  std::vector<int> sparse_experts;
  for (int e = 0; e < E; ++e)
    if (e % 3 == 1) sparse_experts.push_back(e);
  if (sparse_experts.empty()) sparse_experts.push_back(E - 1);
  std::uniform_int_distribution<std::size_t> any_sparse(0, sparse_experts.size() - 1);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (Index t = 0; t < T; ++t) {
    if (routing == Routing::uniform && k <= E) {  // k distinct experts: a partial shuffle
      for (int j = 0; j < k; ++j) {
        std::uniform_int_distribution<int> pick(j, E - 1);
        std::swap(experts[static_cast<std::size_t>(j)], experts[static_cast<std::size_t>(pick(rng))]);
        ids(t, j) = experts[static_cast<std::size_t>(j)];
      }
      continue;
    }
    for (int j = 0; j < k; ++j) {
      switch (routing) {
        case Routing::uniform: ids(t, j) = any(rng); break;
        case Routing::skewed: ids(t, j) = unit(rng) < 0.8 ? std::min(3, E - 1) : any(rng); break;
        case Routing::one_expert: ids(t, j) = E - 1; break;
        case Routing::sparse: ids(t, j) = sparse_experts[any_sparse(rng)]; break;
      }
    }
  }
  return ids;
}

// Gates: distinct random floats in (0, 1), so a row holding the wrong pair's gate shows.
std::vector<float> make_gates(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::vector<float> gates(n);
  for (float& g : gates) g = unit(rng);
  return gates;
}

// The plan the device must produce, from the reference plan.
struct Expected {
  std::vector<std::int32_t> counts, offsets, row_token, pair_row;
  std::vector<float> row_gate;
};

Expected expected_plan(const Dispatch& plan, const IndexMatrix& ids, const std::vector<float>& gates,
                       int E, int row_align, std::int64_t max_rows) {
  Expected x;
  x.counts.assign(plan.counts.begin(), plan.counts.end());
  x.offsets.assign(static_cast<std::size_t>(E) + 1, 0);
  for (int e = 0; e < E; ++e) {
    const std::int64_t padded = (plan.counts[e] + row_align - 1) / row_align * row_align;
    x.offsets[e + 1] = static_cast<std::int32_t>(x.offsets[e] + padded);
  }
  x.row_token.assign(static_cast<std::size_t>(max_rows), -1);
  x.row_gate.assign(static_cast<std::size_t>(max_rows), 0.0f);
  x.pair_row.assign(static_cast<std::size_t>(ids.size()), -1);
  const int k = static_cast<int>(ids.cols());
  for (Index t = 0; t < ids.rows(); ++t) {
    for (int j = 0; j < k; ++j) {
      const std::int32_t r = plan.pair_row(t, j);
      if (r < 0) continue;  // dropped (the out-of-range ids of one test)
      const int e = ids(t, j);
      const std::int32_t row = static_cast<std::int32_t>(x.offsets[e] + (r - plan.offsets[e]));
      const std::size_t p = static_cast<std::size_t>(t * k + j);
      x.row_token[static_cast<std::size_t>(row)] = static_cast<std::int32_t>(t);
      x.row_gate[static_cast<std::size_t>(row)] = gates[p];
      x.pair_row[p] = row;
    }
  }
  return x;
}

// The expert whose (padded) block holds row r, or E for rows past offsets[E]: for messages.
int expert_of_row(const std::vector<std::int32_t>& offsets, std::int64_t r) {
  const auto it = std::upper_bound(offsets.begin(), offsets.end(), r);
  return static_cast<int>(it - offsets.begin()) - 1;
}

// Compares one output array element by element; prints the first few mismatches with `describe`.
template <typename T, typename Describe>
std::size_t compare(const char* name, const std::vector<T>& got, const std::vector<T>& want,
                    Describe describe) {
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const bool same = std::memcmp(&got[i], &want[i], sizeof(T)) == 0;  // floats: bit for bit
    if (!same && ++mismatches <= 8) {
      ADD_FAILURE() << name << "[" << i << "]: device " << got[i] << ", expected " << want[i]
                    << describe(i);
    }
  }
  if (mismatches > 8) ADD_FAILURE() << name << ": " << mismatches << " mismatches in all";
  return mismatches;
}

struct Problem {
  Index tokens;
  int top_k;
  int experts;
  int row_align;
  Routing routing;
};

std::string describe(const Problem& p, std::uint64_t seed) {
  std::ostringstream s;
  s << "T = " << p.tokens << ", k = " << p.top_k << ", E = " << p.experts
    << ", row_align = " << p.row_align << ", routing " << routing_name(p.routing) << ", seed " << seed;
  return s.str();
}

// Runs version `version` on (ids, gates) and compares with the reference plan (dispatch_plan with
// keep: empty = all kept). Returns the number of mismatching elements.
std::size_t run_and_compare(int version, const Problem& prob, const IndexMatrix& ids,
                            const std::vector<float>& gates, const IndexMatrix& keep,
                            const IndexMatrix& ref_ids) {
  const Index T = prob.tokens;
  const int k = prob.top_k;
  const int E = prob.experts;
  const std::int64_t max_rows = permute_max_rows(T, k, E, prob.row_align);
  const std::size_t pairs = static_cast<std::size_t>(T * k);

  Dispatch plan;
  dispatch_plan(plan, ref_ids, keep, E);
  const Expected want = expected_plan(plan, ref_ids, gates, E, prob.row_align, max_rows);

  const std::vector<std::int32_t> ids_host(ids.data(), ids.data() + ids.size());
  DeviceBuffer<std::int32_t> d_ids{std::span<const std::int32_t>(ids_host)};
  DeviceBuffer<float> d_gates{std::span<const float>(gates)};
  DeviceBuffer<std::int32_t> counts(static_cast<std::size_t>(E));
  DeviceBuffer<std::int32_t> offsets(static_cast<std::size_t>(E) + 1);
  DeviceBuffer<std::int32_t> row_token(static_cast<std::size_t>(max_rows));
  DeviceBuffer<float> row_gate(static_cast<std::size_t>(max_rows));
  DeviceBuffer<std::int32_t> pair_row(pairs);
  DeviceBuffer<std::uint8_t> workspace(permute_workspace_bytes(T, k, E, version));
  // 0xA5 bytes: not -1, not 0, not a row: an element the kernel forgets cannot pass.
  for (auto* b : {&counts, &offsets, &row_token, &pair_row}) b->poison(0xA5);
  row_gate.poison(0xA5);
  workspace.poison(0xA5);  // the kernels must not rely on a zeroed workspace

  PermuteArgs args;
  args.ids = d_ids.data();
  args.gates = d_gates.data();
  args.tokens = T;
  args.top_k = k;
  args.num_experts = E;
  args.row_align = prob.row_align;
  args.counts = counts.data();
  args.offsets = offsets.data();
  args.row_token = row_token.data();
  args.row_gate = row_gate.data();
  args.pair_row = pair_row.data();
  args.workspace = workspace.data();
  launch_permute(args, version);
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize after launch_permute");

  const auto got_offsets = offsets.download();
  std::size_t bad = 0;
  bad += compare("counts", counts.download(), want.counts, [](std::size_t) { return std::string(); });
  bad += compare("offsets", got_offsets, want.offsets, [](std::size_t) { return std::string(); });
  const auto row_info = [&](std::size_t r) {
    const int e = expert_of_row(want.offsets, static_cast<std::int64_t>(r));
    std::ostringstream s;
    if (e >= E) {
      s << " (row past offsets[E] = " << want.offsets[static_cast<std::size_t>(E)] << ": unused)";
    } else {
      const std::int64_t rank = static_cast<std::int64_t>(r) - want.offsets[static_cast<std::size_t>(e)];
      s << " (expert " << e << "'s row " << rank << " of " << want.counts[static_cast<std::size_t>(e)]
        << (rank >= want.counts[static_cast<std::size_t>(e)] ? ": padding" : "") << ")";
    }
    return s.str();
  };
  bad += compare("row_token", row_token.download(), want.row_token, row_info);
  bad += compare("row_gate", row_gate.download(), want.row_gate, row_info);
  bad += compare("pair_row", pair_row.download(), want.pair_row, [&](std::size_t p) {
    std::ostringstream s;
    s << " (pair t = " << p / static_cast<std::size_t>(k) << ", j = " << p % static_cast<std::size_t>(k)
      << ", expert " << ids_host[p] << ")";
    return s.str();
  });
  return bad;
}

struct Shape {
  int version;
  int experts;
  int top_k;
};
std::string shape_name(const testing::TestParamInfo<Shape>& info) {
  return "v" + std::to_string(info.param.version) + "_E" + std::to_string(info.param.experts) + "_k" +
         std::to_string(info.param.top_k);
}
void PrintTo(const Shape& s, std::ostream* os) {
  *os << "v" << s.version << " E " << s.experts << " k " << s.top_k;
}
std::vector<Shape> all_shapes() {
  std::vector<Shape> shapes;
  for (int v = 1; v <= kPermuteVersions; ++v)
    for (const auto& [E, k] : {std::pair{8, 2}, {64, 8}, {256, 8}, {1, 1}, {128, 8}})
      shapes.push_back({v, E, k});
  return shapes;
}

class CudaPermute : public testing::TestWithParam<Shape> {};

// The device plan equals the reference's (padded as row_align asks) for every T, routing and
// row_align: T = 0 (only padding rows), T = 1, small odd T, the one-launch limit of kernel 2
// (T k = 2048 at T = 256, k = 8) and just past it, and several histogram blocks with a partial last
// one (4097, 16384).
TEST_P(CudaPermute, MatchesReferencePlan) {
  SKIP_WITHOUT_DEVICE();
  const auto [version, E, k] = GetParam();
  int failed_cases = 0;
  for (const Index T : {Index{0}, Index{1}, Index{5}, Index{128}, Index{256}, Index{257}, Index{1024},
                        Index{4097}, Index{16384}}) {
    for (const Routing routing : kRoutings) {
      for (const int row_align : {1, 16, 64, 128}) {
        const Problem prob{T, k, E, row_align, routing};
        const std::uint64_t seed = 7919 * static_cast<std::uint64_t>(T) + 31 * static_cast<std::uint64_t>(E) +
                                   static_cast<std::uint64_t>(routing);
        SCOPED_TRACE(describe(prob, seed) + ", version " + std::to_string(version));
        const IndexMatrix ids = make_ids(T, k, E, routing, seed);
        const std::vector<float> gates = make_gates(static_cast<std::size_t>(T * k), seed + 1);
        if (run_and_compare(version, prob, ids, gates, IndexMatrix(), ids) != 0 && ++failed_cases >= 3) {
          FAIL() << "stopping after 3 failing cases";
        }
      }
    }
  }
}

// Two runs give the same bits (no atomics decide a row): the second run on a freshly poisoned
// output, many blocks, the heavily contended skewed routing.
TEST_P(CudaPermute, Deterministic) {
  SKIP_WITHOUT_DEVICE();
  const auto [version, E, k] = GetParam();
  const Index T = 16384;
  const IndexMatrix ids = make_ids(T, k, E, Routing::skewed, 99);
  const std::vector<float> gates = make_gates(static_cast<std::size_t>(T * k), 100);
  for (int run = 0; run < 2; ++run) {
    SCOPED_TRACE("run " + std::to_string(run));
    EXPECT_EQ(run_and_compare(version, {T, k, E, 16, Routing::skewed}, ids, gates, IndexMatrix(), ids), 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(AllVersions, CudaPermute, testing::ValuesIn(all_shapes()), shape_name);

// Ids outside [0, E) break the precondition; the kernels must still write nothing out of bounds
// and place the valid pairs as the reference does with those pairs dropped (pair_row -1).
TEST(CudaPermuteOutOfRange, SkipsBadIds) {
  SKIP_WITHOUT_DEVICE();
  for (int version = 1; version <= kPermuteVersions; ++version) {
    for (const Index T : {Index{3}, Index{1000}}) {
      const int E = 16;
      const int k = 4;
      IndexMatrix ids = make_ids(T, k, E, Routing::uniform, 5);
      IndexMatrix keep = IndexMatrix::Ones(T, k);
      IndexMatrix ref_ids = ids;
      const std::int32_t bad[] = {-1, E, 1000000, -2147483647 - 1};
      for (Index t = 0; t < T; t += 2) {
        const int j = static_cast<int>(t % k);
        ids(t, j) = bad[(t / 2) % 4];
        keep(t, j) = 0;
        ref_ids(t, j) = 0;
      }
      const Problem prob{T, k, E, 16, Routing::uniform};
      SCOPED_TRACE(describe(prob, 5) + " with bad ids, version " + std::to_string(version));
      const std::vector<float> gates = make_gates(static_cast<std::size_t>(T * k), 6);
      EXPECT_EQ(run_and_compare(version, prob, ids, gates, keep, ref_ids), 0u);
    }
  }
}

// Arguments a kernel could not run with are refused before the device is touched (these run and
// pass without a GPU). The pointers are fake: nothing may dereference them.
PermuteArgs fake_args() {
  static std::int32_t i32[4];
  static float f32[4];
  PermuteArgs a;
  a.ids = i32;
  a.gates = f32;
  a.tokens = 2;
  a.top_k = 2;
  a.num_experts = 4;
  a.row_align = 1;
  a.counts = i32;
  a.offsets = i32;
  a.row_token = i32;
  a.row_gate = f32;
  a.pair_row = i32;
  a.workspace = nullptr;  // small: version 2 needs none
  return a;
}

TEST(CudaPermuteArguments, RejectsBadSizes) {
  PermuteArgs a = fake_args();
  a.top_k = 0;
  expect_error_naming([&] { launch_permute(a, 1); }, "top_k = 0");
  a = fake_args();
  a.tokens = -1;
  expect_error_naming([&] { launch_permute(a, 2); }, "tokens = -1");
  a = fake_args();
  a.num_experts = 0;
  expect_error_naming([&] { launch_permute(a, 1); }, "num_experts = 0");
  a.num_experts = kPermuteMaxExperts + 1;
  expect_error_naming([&] { launch_permute(a, 1); }, "num_experts");
  a = fake_args();
  a.row_align = 0;
  expect_error_naming([&] { launch_permute(a, 2); }, "row_align = 0");
  a = fake_args();
  a.tokens = std::int64_t{1} << 29;
  a.top_k = 8;  // 2^32 pairs
  expect_error_naming([&] { launch_permute(a, 2); }, "tokens * top_k");
  a = fake_args();
  a.tokens = (std::int64_t{1} << 31) / 8 - 1;
  a.top_k = 8;
  a.num_experts = 1024;
  a.row_align = 128;  // the pairs fit, the padded rows do not
  expect_error_naming([&] { launch_permute(a, 2); }, "permute_max_rows");
}

TEST(CudaPermuteArguments, RejectsBadVersion) {
  const PermuteArgs a = fake_args();
  expect_error_naming([&] { launch_permute(a, 0); }, "version = 0");
  expect_error_naming([&] { launch_permute(a, kPermuteVersions + 1); },
                      "version = " + std::to_string(kPermuteVersions + 1));
  expect_error_naming([] { permute_workspace_bytes(10, 2, 8, 3); }, "version = 3");
}

TEST(CudaPermuteArguments, RejectsNullPointers) {
  PermuteArgs a = fake_args();
  a.ids = nullptr;
  expect_error_naming([&] { launch_permute(a, 1); }, "ids = null");
  a = fake_args();
  a.gates = nullptr;
  expect_error_naming([&] { launch_permute(a, 2); }, "gates = null");
  a = fake_args();
  a.counts = nullptr;
  expect_error_naming([&] { launch_permute(a, 1); }, "counts = null");
  a = fake_args();
  a.offsets = nullptr;
  expect_error_naming([&] { launch_permute(a, 1); }, "offsets = null");
  a = fake_args();
  a.row_token = nullptr;
  expect_error_naming([&] { launch_permute(a, 2); }, "row_token = null");
  a = fake_args();
  a.row_gate = nullptr;
  expect_error_naming([&] { launch_permute(a, 2); }, "row_gate = null");
  a = fake_args();
  a.pair_row = nullptr;
  expect_error_naming([&] { launch_permute(a, 2); }, "pair_row = null");
  a = fake_args();
  a.tokens = 4096;  // past the one-launch path: version 2 needs its workspace
  expect_error_naming([&] { launch_permute(a, 2); }, "workspace = null");
}

// The sizes the caller allocates: R = T k + E (a - 1), also at T = 0; the workspace is 0 for
// version 1 and for version 2's one-launch path, and never shrinks as T grows.
TEST(CudaPermuteArguments, Sizes) {
  EXPECT_EQ(permute_max_rows(16384, 8, 256, 1), 131072);
  EXPECT_EQ(permute_max_rows(16384, 8, 256, 128), 131072 + 256 * 127);
  EXPECT_EQ(permute_max_rows(0, 8, 64, 16), 64 * 15);
  EXPECT_EQ(permute_max_rows(0, 1, 1, 1), 0);
  EXPECT_EQ(permute_workspace_bytes(16384, 8, 256, 1), 0u);
  EXPECT_EQ(permute_workspace_bytes(1, 8, 256, 2), 0u);
  std::size_t last = 0;
  for (std::int64_t T = 0; T <= (std::int64_t{1} << 22); T = T * 3 / 2 + 1) {
    const std::size_t bytes = permute_workspace_bytes(T, 8, 256, 2);
    EXPECT_GE(bytes, last) << "T = " << T;
    last = bytes;
  }
  EXPECT_GT(last, 0u);
}

}  // namespace
}  // namespace moelab::cuda
