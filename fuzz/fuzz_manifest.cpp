// libFuzzer target: the golden manifest loader (tools/golden/check.cpp, parse_manifest) on
// arbitrary bytes. moelab::Error is the only acceptable way to refuse an input; a crash, another
// exception or a sanitizer report is a finding. An accepted manifest is re-read through the
// writer's own entry format (manifest_entry) and must parse again.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "reference/error.h"
#include "tools/golden/golden.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const moelab::golden::Manifest m = moelab::golden::parse_manifest(text, "fuzz");
    moelab::golden::Json again = {{"format_version", m.format_version},
                                  {"moelab_version", m.moelab_version},
                                  {"cases", moelab::golden::Json::array()}};
    for (const moelab::golden::Case& c : m.cases) again["cases"].push_back(moelab::golden::manifest_entry(c));
    const moelab::golden::Manifest m2 = moelab::golden::parse_manifest(again.dump(), "fuzz (re-written)");
    if (m2.cases.size() != m.cases.size()) std::abort();
  } catch (const moelab::Error&) {
  }
  return 0;
}
