// moelab/cuda/timing.h — how every benchmark in moelab times device work (docs/perf.md, "Method").
//
// The work is captured into one CUDA graph as `rotations` launches, each on its own set of
// buffers (launch(stream, i) for i = 0 .. rotations - 1), so that the graph touches more memory
// than L2 holds and every launch reads from DRAM as in a model (weights of small MoE layers fit in
// H100's 50 MB L2 otherwise). The graph is replayed a few times to warm up, then `replays` times,
// each between its own pair of events; the time of one launch is a replay's time / rotations.
// Graph replay also removes the gaps between launches that host-side launching would add.
//
// A plain C++ header: the tools include it with g++.
#pragma once

#include <cuda_runtime_api.h>

#include <functional>
#include <vector>

namespace moelab::cuda {

struct Timing {
  double median_ms = 0;  // one launch (a replay / rotations): the median over replays
  double min_ms = 0;
  double max_ms = 0;
  int replays = 0;
};

// launch(stream, rotation) must enqueue its work on `stream` only (it is captured, not run, while
// the graph is built) and must not synchronise. Throws moelab::Error on CUDA errors, naming the call.
Timing time_graph(const std::function<void(cudaStream_t, int)>& launch, int rotations, int replays = 50,
                  int warmup = 3);

// How many buffer sets to rotate so that they together exceed twice the L2 cache:
// ceil(2 * l2_bytes / bytes_per_set), at least 1 and at most max_sets.
int rotations_for(double bytes_per_set, std::size_t l2_bytes, int max_sets = 64);

}  // namespace moelab::cuda
