// moelab/tests/oracle/dump_sdc_cases.cpp — bit-flip cases for the independent oracle sdc_oracle.py.
//
//   moelab_dump_sdc_cases OUT_DIR
//
// Writes OUT_DIR/flips.<format>.json for fp32, bf16 and fp16, and OUT_DIR/manifest.json. Each case
// is every bit position of every value of a seeded list (N(0, 1) scaled by 10^U(-6, 4), within the
// format's range, plus 0, -0, 1, 0.1, the format's max and a subnormal), with what the SDC lab's
// injector did to it (reference/sdc.h store_and_flip): the stored pattern, the faulted pattern and
// the faulted value as float32 bits. sdc_oracle.py recomputes them with PyTorch's and NumPy's own
// conversions and bit views (tensor.view(torch.int16), ndarray.view(np.uint16)) and XOR.
#include <bit>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "reference/numerics.h"
#include "reference/random.h"
#include "reference/sdc.h"
#include "tests/oracle/case_writer.h"

namespace moelab {
namespace {

using Json = nlohmann::ordered_json;

std::vector<float> values_for(Format f) {
  const FormatInfo& info = format_info(f);
  std::vector<float> values = {0.0f, -0.0f, 1.0f, 0.1f, -info.max, info.min_subnormal * 3};
  Rng rng(0x5dc0 + static_cast<std::uint64_t>(f));
  while (values.size() < 64) {
    const float v = static_cast<float>(rng.normal() * std::pow(10.0, rng.uniform(-6, 4)));
    if (std::abs(v) <= info.max) values.push_back(v);
  }
  return values;
}

Json flips(Format f) {
  Json rows = Json::array();  // [value bits, bit, stored bits, faulted bits, faulted value bits]
  for (float v : values_for(f))
    for (int bit = 0; bit < format_info(f).bits; ++bit) {
      float x = v;
      const FaultRecord r = store_and_flip(x, f, bit, true);
      rows.push_back({std::bit_cast<std::uint32_t>(v), bit, r.stored_bits, r.faulted_bits,
                      std::bit_cast<std::uint32_t>(r.faulted)});
    }
  return {{"format", format_name(f)},
          {"columns", {"value_f32_bits", "bit", "stored_bits", "faulted_bits", "faulted_f32_bits"}},
          {"rows", rows}};
}

}  // namespace
}  // namespace moelab

int main(int argc, char** argv) {
  return moelab::oracle::dumper_main(argc, argv, "moelab_dump_sdc_cases", [] {
    std::vector<moelab::oracle::NamedCase> cases;
    for (moelab::Format f : {moelab::Format::fp32, moelab::Format::bf16, moelab::Format::fp16})
      cases.push_back({"flips." + std::string(moelab::format_name(f)), [f] { return moelab::flips(f); }});
    return cases;
  });
}
