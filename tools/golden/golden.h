// moelab/tools/golden/golden.h — golden values for kernel authors: the cases, their files and
// manifest, the comparison rules, and the implementations `moelab check` can run.
//
// A case is one safetensors file (inputs, parameters, expected outputs and gradients, computed in
// float64 by the reference from the exact values a kernel consumes) plus its manifest entry
// (component, preset, configuration, seed, dtype, tensor list, and one Check per expected tensor
// with its tolerance). docs/golden.md is the format's specification and the guide;
// golden/moelab_golden.py implements the same comparison in numpy for kernel authors.
//
//   write:  case_specs() -> make() -> Case -> write_case() + manifest.json     (moelab golden)
//   check:  read_manifest() -> load_case() -> run_cpu()/run_cuda() -> compare_case()  (moelab check)
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "reference/numerics.h"
#include "reference/safetensors.h"

namespace moelab::golden {

using Json = nlohmann::ordered_json;

inline constexpr int kFormatVersion = 1;
std::string_view moelab_version();  // the project version CMake knows, "0.1.0"

// Unit roundoff u = 2^-p of a format (p = mantissa bits + 1): round-to-nearest has relative error
// at most u in the normal range. Case dtypes are format names: fp32, bf16, fp16, fp8_e4m3, fp8_e5m2.
double unit_roundoff(Format format);

// How one expected tensor is compared (docs/golden.md, "Checks").
struct Check {
  std::string tensor{};            // "output.y"
  std::string compare{};           // allclose, exact, bitwise, topk_set, permutation
  double atol = 0, rtol = 0;     // allclose, topk_set (the near-tie resolution)
  double nmse = 0;               // allclose
  int depth = 0;                 // allclose: roundings to the dtype a kernel may make on the path
  std::int64_t reduction = 0;    // allclose: the longest float32 sum on the path
  std::string rows = "all";      // token, permuted, all
  std::string align{};             // allclose/exact on (T, k): match entries by these ids
  std::string ranking{};           // topk_set: the values the selection ranked
  bool transposed = false;       // topk_set: ranking is (candidates, rows)
  std::string offsets{};           // permutation: the expert blocks
};

struct Case {
  std::string name{};         // "mixtral.layer.bf16": [a-z0-9_.-]+, the file is <name>.safetensors
  std::string component{};    // numerics, routing, losses, balancing, capacity, dispatch, combine,
                            // experts, shared_experts, layer
  std::string preset{};       // "" where no preset applies
  std::string description{};  // one line
  std::string dtype{};        // of the inputs and parameters, a format name: fp32, bf16, fp16, fp8_e4m3, ...
  std::uint64_t seed = 0;
  Json config{};              // the component's full configuration (config_json.h for layers)
  TensorFile file{};
  std::vector<Check> checks{};
  std::string tolerance_note{};  // why the tolerances are what they are, for this case
};

struct CaseSpec {
  std::string name{};
  bool realistic = false;        // published widths: generated on demand, never committed
  std::function<Case()> make{};  // deterministic: the same bits on every run
};
const std::vector<CaseSpec>& case_specs();

// Shell-style glob (* ? [...]) on case names; "" matches everything.
bool glob_match(std::string_view pattern, std::string_view name);

// ---- files ----------------------------------------------------------------------------------------
Json manifest_entry(const Case& c);
// Writes the matching cases and dir/manifest.json, every file atomically; two runs write the same
// bytes. Returns the names written; progress (may be null) is called after each case.
std::vector<std::string> write_golden(const std::filesystem::path& dir, std::string_view filter, bool realistic,
                                      const std::function<void(const Case&)>& progress);

// The manifest, validated: format_version 1, every entry with its fields of the right types, known
// compare kinds, finite non-negative tolerances, file = name + ".safetensors". Error naming the
// file, the entry and the field otherwise.
struct Manifest {
  int format_version = 0;
  std::string moelab_version{};
  std::vector<Case> cases{};  // entries only: file is empty until load_case
};
Manifest parse_manifest(std::string_view text, std::string_view what);
Manifest read_manifest(const std::filesystem::path& dir);
// Reads the case's safetensors file and checks that it holds exactly the tensors the manifest lists,
// with their dtypes and shapes, and every tensor a check names.
void load_case(Case& entry, const std::filesystem::path& dir);

// ---- comparison -------------------------------------------------------------------------------------
enum class Verdict { pass, fail, ambiguous, not_supported };
std::string_view verdict_name(Verdict v);

struct CheckResult {
  std::string tensor{};
  Verdict verdict = Verdict::not_supported;
  double worst = 0;      // allclose: max |out - ref| / (atol + rtol |ref|); 1 = at the tolerance
  double nmse = 0;       // allclose
  std::string message{};   // what failed, where; what was ambiguous
};

struct CaseResult {
  std::string name{};
  Verdict verdict = Verdict::not_supported;
  double worst = 0, nmse = 0;  // over the allclose checks that ran
  std::string tolerance{};       // "rtol 2.3e-02" of the tightest allclose check, for the table
  std::vector<CheckResult> checks{};
};

using Produced = std::map<std::string, Tensor>;
// Compares what an implementation produced with the case's expected tensors (docs/golden.md).
CaseResult compare_case(const Case& c, const Produced& produced);

// ---- implementations --------------------------------------------------------------------------------
// Thrown by an implementation for a case it cannot run (reported "not supported").
struct NotSupported : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The reference in float32 (the model's precision) on the case's inputs, every output it has.
Produced run_cpu(const Case& c);
// The CUDA kernels that exist (cuda/): conversions. Throws Error if this build has no CUDA or no GPU
// is present; NotSupported for components without a kernel yet.
Produced run_cuda(const Case& c);

}  // namespace moelab::golden
