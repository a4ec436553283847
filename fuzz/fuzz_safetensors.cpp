// moelab/fuzz/fuzz_safetensors.cpp — libFuzzer target for the safetensors reader.
//
// Contract checked on every input: parse_safetensors either returns or throws moelab::Error; any
// other outcome (a crash, another exception, an ASan or UBSan report, a hang) is a finding. A file
// it accepts must also survive a write: serialize_safetensors takes it, the bytes parse back to
// the same tensors, and writing those again gives the same bytes.
//
//   tools/fuzz.sh 60                              # builds the fuzzers of the "asan" preset and runs every fuzzer
//   build-asan/bin/fuzz_safetensors CORPUS_DIR    # by hand; libFuzzer's flags apply
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <vector>

#include "reference/error.h"
#include "reference/safetensors.h"

namespace {

[[noreturn]] void finding(const char* what) {
  std::fprintf(stderr, "fuzz_safetensors: %s\n", what);
  std::abort();
}

// Every way a caller reads an accepted tensor must also end in a value or an Error.
void read_every_way(const moelab::Tensor& tensor) {
  try {
    (void)moelab::tensor_values(tensor);
    (void)moelab::tensor_matrix(tensor, "t");
    (void)moelab::tensor_index_matrix(tensor, "t");
  } catch (const moelab::Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  moelab::TensorFile file;
  try {
    file = moelab::parse_safetensors(std::span(data, size), "fuzz input");
  } catch (const moelab::Error&) {
    return 0;  // rejected, as it should be for almost every input
  }
  for (const auto& entry : file.tensors) read_every_way(entry.second);

  std::vector<std::uint8_t> bytes;
  moelab::TensorFile back;
  try {
    bytes = moelab::serialize_safetensors(file);
    back = moelab::parse_safetensors(bytes, "re-serialized fuzz input");
  } catch (const moelab::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    finding("an accepted file could not be written and read back");
  }
  if (!(back == file)) finding("the re-serialized file parses to different tensors");
  if (moelab::serialize_safetensors(back) != bytes) finding("serializing twice gave different bytes");
  return 0;
}
