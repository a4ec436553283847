// moelab/tests/testing.h — helpers shared by the test suites.
#pragma once

#include <string>

#include "reference/error.h"

namespace moelab::testing {

// The message of the moelab::Error that `f` throws, or "" if it throws none.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace moelab::testing
