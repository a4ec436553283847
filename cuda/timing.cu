// moelab/cuda/timing.cu — graph-replay timing with rotated buffers (cuda/timing.h).
#include "cuda/timing.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "cuda/device.h"
#include "reference/error.h"

namespace moelab::cuda {
namespace {

// Owns a stream, a graph, its executable and two events; frees them on every path out.
struct GraphResources {
  cudaStream_t stream = nullptr;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  ~GraphResources() {
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
    if (start) cudaEventDestroy(start);
    if (stop) cudaEventDestroy(stop);
    if (stream) cudaStreamDestroy(stream);
  }
};

}  // namespace

Timing time_graph(const std::function<void(cudaStream_t, int)>& launch, int rotations, int replays, int warmup) {
  require(rotations >= 1, "rotations", rotations, "must be at least 1");
  require(replays >= 1, "replays", replays, "must be at least 1");
  GraphResources r;
  check_cuda(cudaStreamCreateWithFlags(&r.stream, cudaStreamNonBlocking), "cudaStreamCreate");
  check_cuda(cudaStreamBeginCapture(r.stream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
  try {
    for (int i = 0; i < rotations; ++i) launch(r.stream, i);
  } catch (...) {
    cudaGraph_t broken = nullptr;
    cudaStreamEndCapture(r.stream, &broken);
    if (broken) cudaGraphDestroy(broken);
    throw;
  }
  check_cuda(cudaStreamEndCapture(r.stream, &r.graph), "cudaStreamEndCapture");
  check_cuda(cudaGraphInstantiate(&r.exec, r.graph, 0), "cudaGraphInstantiate");
  check_cuda(cudaEventCreate(&r.start), "cudaEventCreate");
  check_cuda(cudaEventCreate(&r.stop), "cudaEventCreate");
  for (int i = 0; i < warmup; ++i) check_cuda(cudaGraphLaunch(r.exec, r.stream), "cudaGraphLaunch (warm-up)");
  check_cuda(cudaStreamSynchronize(r.stream), "cudaStreamSynchronize (warm-up)");
  std::vector<double> ms(static_cast<std::size_t>(replays));
  for (double& t : ms) {
    check_cuda(cudaEventRecord(r.start, r.stream), "cudaEventRecord");
    check_cuda(cudaGraphLaunch(r.exec, r.stream), "cudaGraphLaunch");
    check_cuda(cudaEventRecord(r.stop, r.stream), "cudaEventRecord");
    check_cuda(cudaEventSynchronize(r.stop), "cudaEventSynchronize");
    float elapsed = 0;
    check_cuda(cudaEventElapsedTime(&elapsed, r.start, r.stop), "cudaEventElapsedTime");
    t = static_cast<double>(elapsed) / rotations;
  }
  std::sort(ms.begin(), ms.end());
  return {.median_ms = ms[ms.size() / 2], .min_ms = ms.front(), .max_ms = ms.back(), .replays = replays};
}

int rotations_for(double bytes_per_set, std::size_t l2_bytes, int max_sets) {
  if (bytes_per_set <= 0) return 1;
  const double sets = std::ceil(2.0 * static_cast<double>(l2_bytes) / bytes_per_set);
  return static_cast<int>(std::clamp(sets, 1.0, static_cast<double>(max_sets)));
}

}  // namespace moelab::cuda
