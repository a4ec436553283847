// moelab/cuda/expert_gemm_sm90.h — internal: version 3 of the expert GEMMs (Hopper wgmma), in
// expert_gemm_sm90.cu. Callers use launch_gate_up / launch_down (expert_gemm.h), which check the
// arguments and the device (sm_90) before calling these.
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/expert_gemm.h"

namespace moelab::cuda::detail {

void launch_gate_up_v3(const GateUpArgs& args, cudaStream_t stream);
void launch_down_v3(const DownArgs& args, cudaStream_t stream);

}  // namespace moelab::cuda::detail
