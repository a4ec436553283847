// moelab/tests/cuda/device_testing.h — what every CUDA test file shares: skipping without a GPU,
// and checking that bad arguments are refused with an error that names the field.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "cuda/device.h"
#include "reference/error.h"

// Skips the calling test, saying why, when there is no usable GPU.
#define SKIP_WITHOUT_DEVICE()                                                   \
  do {                                                                          \
    const ::moelab::cuda::DeviceStatus status_ = ::moelab::cuda::device_status(); \
    if (!status_.available) GTEST_SKIP() << status_.reason;                     \
  } while (false)

namespace moelab::cuda {

// Runs fn, which must throw moelab::Error whose message names `field`.
template <typename Fn>
void expect_error_naming(Fn fn, const std::string& field) {
  try {
    fn();
    ADD_FAILURE() << "no moelab::Error thrown; expected one naming " << field;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
  }
}

}  // namespace moelab::cuda
