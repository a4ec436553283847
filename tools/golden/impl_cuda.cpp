// moelab/tools/golden/impl_cuda.cpp — `moelab check --impl cuda`: the CUDA kernels that exist so
// far (cuda/convert.h: float32 -> bf16/fp16/fp8, its newest version), on a GPU. Components without
// a kernel yet are "not supported"; the MoE kernels join here as the cuda/ ladders grow.
#include <fmt/format.h>

#include "reference/error.h"
#include "tools/golden/golden.h"

#ifdef MOELAB_HAVE_CUDA
#include "cuda/convert.h"
#endif

namespace moelab::golden {

#ifdef MOELAB_HAVE_CUDA
Produced run_cuda(const Case& c) {
  static const cuda::DeviceStatus status = cuda::device_status();
  if (!status.available) fail("--impl", "cuda", status.reason);
  if (c.component != "numerics" || !c.file.tensors.contains("input.values"))
    throw NotSupported("no CUDA kernel for " + c.component + " yet");
  const Format f = parse_format(c.config.at("format").get<std::string>(), "config.format");
  std::vector<float> xs;
  for (double x : tensor_values(c.file.tensors.at("input.values"))) xs.push_back(static_cast<float>(x));
  Produced p;
  for (const char* name : {"output.bits", "output.bits_saturated"}) {
    if (!c.file.tensors.contains(name)) continue;
    const Overflow overflow = std::string(name) == "output.bits" ? Overflow::nonsaturating : Overflow::saturating;
    const std::vector<std::uint16_t> bits = cuda::convert(xs, f, overflow, cuda::kConvertVersions);
    Tensor t{.dtype = format_dtype(f), .shape = {static_cast<std::int64_t>(bits.size())}};
    const std::size_t w = dtype_size(t.dtype);
    for (std::uint16_t b : bits)
      for (std::size_t byte = 0; byte < w; ++byte) t.data.push_back((b >> (8 * byte)) & 0xFF);
    p[name] = std::move(t);
  }
  return p;
}
#else
Produced run_cuda(const Case&) {
  fail("--impl", "cuda", "this moelab was built without CUDA (nvcc was not found; configure with -DMOELAB_CUDA=ON)");
}
#endif

}  // namespace moelab::golden
