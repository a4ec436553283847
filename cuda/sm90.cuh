// moelab/cuda/sm90.cuh — Hopper (sm_90a) PTX as small named functions: the 128-byte swizzled
// shared-memory layout and its wgmma matrix descriptor, wgmma itself and where its accumulators
// land, mbarriers, cp.async, the bulk tensor copy (TMA) and the host side of its tensor map.
//
// Shared by expert_gemm_sm90.cu (version 3 of the expert GEMMs) and bench/wgmma_probe.cu, so that
// the probe checks exactly the layout code the GEMM runs. Each layout fact is written once, here,
// with the rule it follows (PTX ISA 8.x, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate",
// "Tensor Memory Accelerator"); if a GPU test fails, these are the assumptions to check, one by one.
//
// The PTX needs sm_90a (wgmma, setmaxnreg) or sm_90 (mbarrier tx counts, TMA): the device
// functions exist only in the sm_90a pass (MOELAB_SM90A); kernels that use them guard their
// bodies with the same macro, so the sm_80 pass of the project's build compiles them empty.
#pragma once

#include <cuda.h>          // CUtensorMap and its enums (types only: the driver is reached at run time)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/device.h"
#include "reference/error.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOELAB_SM90A 1
#else
#define MOELAB_SM90A 0
#endif

namespace moelab::cuda::sm90 {

// -------------------------------------------------------------------------------------------------
// Layout 1: K-major tiles in the 128-byte swizzle.
//
// A tile of R rows (M or N) by 64 bf16 along K: each row is 128 bytes, 8 chunks of 16 bytes
// (chunk c = K elements 8c .. 8c+7). Rows are stored one after the other (row r at r * 128), and
// inside each group of 8 rows (a 1024-byte "atom") chunk c of row r is stored at chunk position
// c ^ (r mod 8). With the tile 1024-byte aligned this is the same as XOR-ing address bits [4:6]
// with bits [7:9], which is what both the TMA unit (CU_TENSOR_MAP_SWIZZLE_128B) and wgmma
// (descriptor swizzle mode 1) do: so one formula serves the cp.async writes, the TMA writes and
// the wgmma reads.
inline constexpr std::uint32_t kSwizzleRowBytes = 128;   // one row of the tile = the swizzle width
inline constexpr std::uint32_t kSwizzleAtomBytes = 1024; // 8 rows: the period of the pattern
inline constexpr int kTileK = 64;                        // bf16 per row

// Byte offset of chunk `chunk` (0..7) of row `row` from the start of the tile.
__host__ __device__ constexpr std::uint32_t swizzle128_offset(std::uint32_t row, std::uint32_t chunk) {
  return row * kSwizzleRowBytes + ((chunk ^ (row & 7u)) << 4);
}

// Layout 2: the wgmma shared-memory matrix descriptor (64 bits) of such a tile.
//   bits  0-13  start address >> 4 (the shared-window address; 18 bits of address, 16-byte units)
//   bits 16-29  leading-dimension byte offset >> 4: the step between core matrices along K. A
//               k16 step of bf16 (32 bytes) stays inside one 128-byte swizzled row, so the
//               hardware never uses it; 1 by convention.
//   bits 32-45  stride-dimension byte offset >> 4: from one 8-row group (core matrices along M or
//               N) to the next = 8 rows * 128 bytes = 1024 bytes -> 64.
//   bits 49-51  base offset: 0, the tile starts 1024-byte aligned.
//   bits 62-63  swizzle mode: 1 = 128-byte swizzle (2 = 64 B, 3 = 32 B, 0 = none).
// The k-th k16 slice of the 64-wide tile is addressed by moving the start address k * 32 bytes:
// the hardware applies the swizzle to the address it computes, so the slice's chunks 2k, 2k+1 of
// row r are read from positions (2k) ^ (r mod 8), (2k+1) ^ (r mod 8), where the writes put them.
__host__ __device__ constexpr std::uint64_t smem_desc_sw128(std::uint32_t smem_addr) {
  return static_cast<std::uint64_t>((smem_addr & 0x3FFFFu) >> 4) |
         (std::uint64_t{1} << 16) |
         (std::uint64_t{kSwizzleAtomBytes >> 4} << 32) |
         (std::uint64_t{1} << 62);
}

// Layout 3: where wgmma m64nNk16 with f32 accumulators puts D (64 x N) in the warpgroup's
// registers. Thread t (0..127) of the warpgroup, warp w = t / 32, lane l = t % 32, holds N / 2
// floats d[i]:
//   row(i) = 16 w + l / 4 + 8 ((i / 2) mod 2)       (each warp owns 16 rows, as in mma.sync m16n8)
//   col(i) = 8 (i / 4) + 2 (l mod 4) + (i mod 2)    (then N / 8 blocks of 8 columns)
// So d[4j + 0], d[4j + 1] are columns 8j + 2(l mod 4) + {0, 1} of row 16w + l/4, and d[4j + 2],
// d[4j + 3] the same columns 8 rows lower.
__host__ __device__ constexpr int wgmma_acc_row(int thread, int i) {
  return 16 * (thread / 32) + (thread % 32) / 4 + 8 * ((i / 2) % 2);
}
__host__ __device__ constexpr int wgmma_acc_col(int thread, int i) {
  return 8 * (i / 4) + 2 * (thread % 4) + (i % 2);
}

// -------------------------------------------------------------------------------------------------
// Device PTX (sm_90a pass only).
#if MOELAB_SM90A

__device__ __forceinline__ std::uint32_t smem_addr(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// --- wgmma ---------------------------------------------------------------------------------------
// wgmma.fence: orders this thread's earlier register accesses to the accumulators before the next
// wgmma (needed before the first wgmma and after the registers were written by ordinary code).
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N committed wgmma groups of this warpgroup are still running.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses to an accumulator register across the asynchronous
// wgmma (the register is "used and redefined" here, at this point of the program).
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// Eight accumulator registers d[i .. i+7] as read-write asm operands.
#define MOELAB_F8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), \
                     "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
// D (64 x 256, f32) += A (64 x 16, K-major, shared) * B (256 x 16, K-major, shared)^T.
// scale_d = 0 ignores D's old value (D = A B^T). imm-trans-a = imm-trans-b = 0: both K-major.
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], std::uint64_t desc_a, std::uint64_t desc_b,
                                                 int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
      : MOELAB_F8(0), MOELAB_F8(8), MOELAB_F8(16), MOELAB_F8(24), MOELAB_F8(32), MOELAB_F8(40),
        MOELAB_F8(48), MOELAB_F8(56), MOELAB_F8(64), MOELAB_F8(72), MOELAB_F8(80), MOELAB_F8(88),
        MOELAB_F8(96), MOELAB_F8(104), MOELAB_F8(112), MOELAB_F8(120)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d)
      : "memory");
}

// D (64 x 64, f32) += A (64 x 16) * B (64 x 16)^T, as above (the probe's instruction).
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], std::uint64_t desc_a, std::uint64_t desc_b,
                                                int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : MOELAB_F8(0), MOELAB_F8(8), MOELAB_F8(16), MOELAB_F8(24)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d)
      : "memory");
}
#undef MOELAB_F8

// --- registers per warpgroup ----------------------------------------------------------------------
// setmaxnreg: the producer warpgroup gives registers back, the consumers take them. Takes effect
// only with a register cap at kernel entry (__launch_bounds__(threads, 1)).
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }

// --- barriers and fences ---------------------------------------------------------------------------
// Named barrier `id` (1..15; 0 is __syncthreads) among `count` threads (a multiple of 32).
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
// Makes this thread's ordinary (generic-proxy) shared-memory writes, cp.async ones included once
// complete, visible to the async proxy (wgmma operand reads, TMA).
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// mbarrier: a 64-bit shared-memory object counting arrivals (and, for TMA, bytes) per phase.
__device__ __forceinline__ void mbar_init(std::uint64_t* bar, std::uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// After initialising: make the barriers visible to the other threads and to the async proxy.
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(std::uint64_t* bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(smem_addr(bar))
               : "memory");
}
// One arrival that also announces `bytes` still to come from the copy engine in this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(std::uint64_t* bar, std::uint32_t bytes) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(
                   smem_addr(bar)),
               "r"(bytes)
               : "memory");
}
// Waits until the phase with parity `parity` (0, 1, 0, ... for the 1st, 2nd, 3rd completion) has
// completed. A fresh barrier is in phase 0, so a wait for parity 1 returns at once.
__device__ __forceinline__ void mbar_wait(std::uint64_t* bar, std::uint32_t parity) {
  const std::uint32_t addr = smem_addr(bar);
  std::uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (done == 0);
}

// --- copies ------------------------------------------------------------------------------------------
// 16 bytes global -> shared, asynchronous, bypassing L1; src_bytes = 0 writes 16 zero bytes and
// reads nothing (src must still be a valid address).
__device__ __forceinline__ void cp_async_16(std::uint32_t dst, const void* src, std::uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// TMA: the box at coordinates (c0 = innermost, K; c1 = row) of the tensor map -> shared memory at
// dst (1024-byte aligned for the 128-byte swizzle), completing `bytes of the box` on bar's tx count.
// Out-of-range parts of the box are written as zeros and still counted.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, std::uint64_t* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
          smem_addr(dst)),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
      : "memory");
}
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<std::uint64_t>(map)) : "memory");
}

#endif  // MOELAB_SM90A

// -------------------------------------------------------------------------------------------------
// Host: the tensor map of a row-major bf16 matrix (rows x cols, cols contiguous, cols * 2 bytes a
// multiple of 16, base 16-byte aligned) read in boxes of box_rows x 64 columns (128 bytes, the
// swizzle width) in the 128-byte swizzle; boxes reaching past the matrix are zero-filled.
// cuTensorMapEncodeTiled is a driver function: reached through the runtime's entry-point query,
// so nothing links against libcuda. Throws moelab::Error on failure.
inline CUtensorMap make_tensor_map_bf16(const void* base, std::uint64_t rows, std::uint64_t cols,
                                        std::uint32_t box_rows) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    check_cuda(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found),
               "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    if (found != cudaDriverEntryPointSuccess || fn == nullptr)
      fail("cuTensorMapEncodeTiled", "not found", "the CUDA driver must provide it (CUDA 12.0 or newer)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  CUtensorMap map{};
  const cuuint64_t dims[2] = {cols, rows};                   // innermost first
  const cuuint64_t strides[1] = {cols * 2};                  // bytes from one row to the next
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kTileK), box_rows};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult result =
      encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box,
             element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (result != CUDA_SUCCESS)
    fail("cuTensorMapEncodeTiled", static_cast<int>(result),
         fmt::format("tensor map of ({}, {}) bf16 in boxes of ({}, {}) was refused", rows, cols, box_rows, kTileK));
  return map;
}

}  // namespace moelab::cuda::sm90
