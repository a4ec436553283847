// moelab/cuda/bench/wgmma_probe.cu — one wgmma tile through the layout code of expert_gemm_sm90.cu,
// on known inputs, printing every wrong output element: the first thing to run when version 3 of
// the expert GEMMs fails on a GPU.
//
// What it checks (cuda/sm90.cuh holds the code and the three layout assumptions):
//   1. the 128-byte swizzle (swizzle128_offset) the GEMM writes its A rows in with cp.async,
//   2. the wgmma shared-memory descriptor (smem_desc_sw128) and the +32 bytes per k16 slice,
//   3. where the accumulators land (wgmma_acc_row / wgmma_acc_col), which the epilogue relies on,
//   and, in the TMA cases, the tensor map (make_tensor_map_bf16) that loads the GEMM's B tiles.
// One warpgroup loads A (64 x 64 bf16, K-major) and B (N x 64) into shared memory, runs ONE
// wgmma m64nNk16 on k16 slice `kk` of them (N = 64, and N = 256 as the GEMM does), and writes D
// (64 x N, fp32) back through the fragment mapping. Inputs are small integers, so D is exact.
//
// Two kinds of input per case:
//   pattern  A[m][k1] = m, A[m][k2] = 1, B[n][k1] = 256, B[n][k2] = n, every other element of the
//            slice 0 and the other three slices random: D[m][n] = 256 m + n, a different number
//            for every element, so a wrong value names the (m', n') it came from:
//            "the value of D[m'][n']" = a row/column mix-up (fragment mapping or descriptor stride);
//            a value that is not 256 m' + n' = a K mix-up (swizzle, descriptor start, wrong slice).
//   random   every element random in [-4, 4]: the general check.
// Cases: N in {64, 256} x B through st.shared or TMA x kk in {0, 1, 2, 3} x {pattern, random}.
//
// Usage: moelab_wgmma_probe [--verbose]   (--verbose prints every mismatch, not the first 8)
// Exit status: 0 all cases exact, 1 a case failed, 77 no sm_90 device (the ctest "skipped" code).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "cuda/device.h"
#include "cuda/sm90.cuh"
#include "reference/error.h"

namespace {

namespace mc = moelab::cuda;
namespace sm90 = moelab::cuda::sm90;
using bf16 = __nv_bfloat16;

constexpr int kM = 64;
constexpr int kK = sm90::kTileK;  // 64: one swizzled row; the wgmma reads the k16 slice kk of it

template <int N>
struct ProbeShared {
  alignas(1024) std::uint8_t a[kM * kK * 2];
  alignas(1024) std::uint8_t b[N * kK * 2];
  std::uint64_t bar;
};

// a (64, 64), b (N, 64) row-major bf16 in global memory; d (64, N) fp32. One block of 128 threads.
template <int N>
__global__ void probe_kernel(const bf16* a, const bf16* b, const __grid_constant__ CUtensorMap b_map, int use_tma,
                             int kk, float* d, int* misaligned) {
#if MOELAB_SM90A
  using namespace sm90;
  extern __shared__ std::uint8_t shared_raw[];
  const std::uint32_t misalignment = smem_addr(shared_raw) % 1024;
  auto& s = *reinterpret_cast<ProbeShared<N>*>(shared_raw + (misalignment == 0 ? 0 : 1024 - misalignment));
  const int t = threadIdx.x;
  if (t == 0) *misaligned = static_cast<int>(smem_addr(s.a) % 1024 + smem_addr(s.b) % 1024);

  // The GEMM's A path: 16-byte chunks into swizzle128_offset (here with ordinary stores).
  for (int c = t; c < kM * 8; c += 128) {
    const int row = c / 8;
    const int chunk = c % 8;
    *reinterpret_cast<uint4*>(s.a + swizzle128_offset(row, chunk)) =
        *reinterpret_cast<const uint4*>(a + row * kK + chunk * 8);
  }
  if (!use_tma) {
    for (int c = t; c < N * 8; c += 128) {
      const int row = c / 8;
      const int chunk = c % 8;
      *reinterpret_cast<uint4*>(s.b + swizzle128_offset(row, chunk)) =
          *reinterpret_cast<const uint4*>(b + row * kK + chunk * 8);
    }
  }
  fence_proxy_async_shared();  // ordinary stores -> visible to wgmma (async proxy)
  if (t == 0) {
    mbar_init(&s.bar, 1);
    fence_mbarrier_init();
  }
  __syncthreads();
  if (use_tma) {  // The GEMM's B path: one box of (N, 64) by the copy engine.
    if (t == 0) {
      mbar_arrive_expect_tx(&s.bar, N * kK * 2);
      tma_load_2d(s.b, &b_map, &s.bar, 0, 0);
    }
    mbar_wait(&s.bar, 0);
  }

  float acc[N / 2];
  for (int i = 0; i < N / 2; ++i) acc[i] = 0.0f;
  wgmma_fence();
  const std::uint64_t desc_a = smem_desc_sw128(smem_addr(s.a) + 32 * kk);
  const std::uint64_t desc_b = smem_desc_sw128(smem_addr(s.b) + 32 * kk);
  if constexpr (N == 64) wgmma_m64n64k16(acc, desc_a, desc_b, 1);
  else wgmma_m64n256k16(acc, desc_a, desc_b, 1);
  wgmma_commit();
  wgmma_wait<0>();
  for (int i = 0; i < N / 2; ++i) fence_operand(acc[i]);
  for (int i = 0; i < N / 2; ++i) d[wgmma_acc_row(t, i) * N + wgmma_acc_col(t, i)] = acc[i];
#else
  (void)a, (void)b, (void)b_map, (void)use_tma, (void)kk, (void)d, (void)misaligned;
#endif
}

void check(cudaError_t err, const char* what) { mc::check_cuda(err, what); }

struct Case {
  int n;
  bool tma;
  int kk;
  bool pattern;
};

// Builds A (64 x 64) and B (N x 64) as floats (exact small integers) and the expected D.
void make_inputs(const Case& c, std::mt19937& rng, std::vector<float>& a, std::vector<float>& b,
                 std::vector<float>& d) {
  std::uniform_int_distribution<int> small(-4, 4);
  a.assign(kM * kK, 0.0f);
  b.assign(static_cast<std::size_t>(c.n) * kK, 0.0f);
  for (float& x : a) x = static_cast<float>(small(rng));
  for (float& x : b) x = static_cast<float>(small(rng));
  const int k_begin = 16 * c.kk;
  if (c.pattern) {
    const int k1 = (5 * c.kk + 3) % 16;  // vary which positions carry the pattern
    const int k2 = (k1 + 9) % 16;
    for (int m = 0; m < kM; ++m)
      for (int k = 0; k < 16; ++k) a[m * kK + k_begin + k] = k == k1 ? static_cast<float>(m) : (k == k2 ? 1.0f : 0.0f);
    for (int n = 0; n < c.n; ++n)
      for (int k = 0; k < 16; ++k) b[n * kK + k_begin + k] = k == k1 ? 256.0f : (k == k2 ? static_cast<float>(n) : 0.0f);
  }
  d.assign(static_cast<std::size_t>(kM) * c.n, 0.0f);
  for (int m = 0; m < kM; ++m)
    for (int n = 0; n < c.n; ++n) {
      float sum = 0.0f;
      for (int k = k_begin; k < k_begin + 16; ++k) sum += a[m * kK + k] * b[n * kK + k];
      d[static_cast<std::size_t>(m) * c.n + n] = sum;
    }
}

template <int N>
std::vector<float> run_case(const Case& c, const std::vector<float>& a, const std::vector<float>& b, int& misaligned) {
  const std::vector<mc::Bf16Bits> a_bits = mc::to_bf16(a);  // small integers: exact
  const std::vector<mc::Bf16Bits> b_bits = mc::to_bf16(b);
  mc::DeviceBuffer<mc::Bf16Bits> a_dev{std::span<const mc::Bf16Bits>(a_bits)};
  mc::DeviceBuffer<mc::Bf16Bits> b_dev{std::span<const mc::Bf16Bits>(b_bits)};
  mc::DeviceBuffer<float> d_dev(static_cast<std::size_t>(kM) * N);
  mc::DeviceBuffer<int> misaligned_dev(1);
  d_dev.poison();
  const CUtensorMap map = sm90::make_tensor_map_bf16(b_dev.data(), N, kK, N);
  const std::size_t shared_bytes = sizeof(ProbeShared<N>) + 1024;
  check(cudaFuncSetAttribute(probe_kernel<N>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(shared_bytes)),
        "cudaFuncSetAttribute(probe_kernel)");
  probe_kernel<N><<<1, 128, shared_bytes>>>(reinterpret_cast<const bf16*>(a_dev.data()),
                                            reinterpret_cast<const bf16*>(b_dev.data()), map, c.tma ? 1 : 0, c.kk, d_dev.data(),
                                            misaligned_dev.data());
  mc::check_launch("probe_kernel");
  check(cudaDeviceSynchronize(), "probe_kernel");
  misaligned = misaligned_dev.download()[0];
  return d_dev.download();
}

// Compares and prints; returns the number of wrong elements.
int report(const Case& c, const std::vector<float>& expected, const std::vector<float>& got, bool verbose) {
  int wrong = 0;
  for (int m = 0; m < kM; ++m)
    for (int n = 0; n < c.n; ++n) {
      const float e = expected[static_cast<std::size_t>(m) * c.n + n];
      const float g = got[static_cast<std::size_t>(m) * c.n + n];
      if (e == g) continue;
      if (++wrong > 8 && !verbose) continue;
      std::printf("    D[%d][%d]: expected %g, got %g", m, n, static_cast<double>(e), static_cast<double>(g));
      if (c.pattern) {
        const long long v = static_cast<long long>(g);
        if (static_cast<float>(v) == g && v >= 0 && v < 256LL * kM && v % 256 < c.n)
          std::printf("  = 256*%lld + %lld: the value of D[%lld][%lld]", v / 256, v % 256, v / 256, v % 256);
        else
          std::printf("  (not 256 m + n: K elements mixed up)");
      }
      std::printf("\n");
    }
  return wrong;
}

int run(bool verbose) {
  const mc::DeviceStatus status = mc::device_status();
  if (!status.available) {
    std::printf("%s\n", status.reason.c_str());
    return 77;
  }
  if (status.sm != 90) {
    std::printf("%s is sm_%d: wgmma needs sm_90 (Hopper)\n", status.name.c_str(), status.sm);
    return 77;
  }
  std::printf("device: %s (sm_%d)\n", status.name.c_str(), status.sm);
  std::mt19937 rng(1234);
  int failed = 0;
  int cases = 0;
  for (const int n : {64, 256})
    for (const bool tma : {false, true})
      for (int kk = 0; kk < 4; ++kk)
        for (const bool pattern : {true, false}) {
          const Case c{n, tma, kk, pattern};
          std::vector<float> a;
          std::vector<float> b;
          std::vector<float> expected;
          make_inputs(c, rng, a, b, expected);
          int misaligned = 0;
          const std::vector<float> got =
              n == 64 ? run_case<64>(c, a, b, misaligned) : run_case<256>(c, a, b, misaligned);
          const int wrong = report(c, expected, got, verbose);
          ++cases;
          std::printf("wgmma m64n%dk16, B by %-9s, k16 slice %d, %-7s: %s", n, tma ? "TMA" : "st.shared", kk,
                      pattern ? "pattern" : "random", wrong == 0 ? "ok" : "FAILED");
          if (wrong > 0) std::printf(" (%d of %d elements wrong)", wrong, kM * n);
          if (misaligned != 0) std::printf(" [shared tiles not 1024-byte aligned!]");
          std::printf("\n");
          if (wrong > 0 || misaligned != 0) ++failed;
        }
  std::printf("%s: %d of %d cases failed\n", failed == 0 ? "Passed" : "Failed", failed, cases);
  return failed == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  bool verbose = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--verbose") == 0) {
      verbose = true;
    } else {
      std::fprintf(stderr, "usage: moelab_wgmma_probe [--verbose]\n");
      return 2;
    }
  }
  try {
    return run(verbose);
  } catch (const moelab::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
