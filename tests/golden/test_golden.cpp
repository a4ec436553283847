// Tests of the golden values (tools/golden/, golden/, docs/golden.md): the committed set is what
// `moelab golden` writes today, bit for bit; the float32 reference passes every case; the
// comparison fails wrong outputs, calls near-ties ambiguous and missing outputs not supported; and
// the loaders reject malformed manifests and files with a message that names the problem.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include "reference/files.h"
#include "tests/testing.h"
#include "tools/golden/golden.h"

namespace moelab::golden {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using moelab::testing::error_of;

const fs::path kCommitted = fs::path(MOELAB_SOURCE_DIR) / "golden";

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("moelab_test_golden_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

const CaseSpec& spec(const std::string& name) {
  for (const CaseSpec& s : case_specs())
    if (s.name == name) return s;
  throw std::runtime_error("no case " + name);
}

// A case as `moelab check` sees it: through the manifest entry and the file, not the in-memory Case.
Case reloaded(const std::string& name) {
  const fs::path dir = fresh_dir("reload");
  write_golden(dir, name, spec(name).realistic, nullptr);
  Manifest m = read_manifest(dir);
  EXPECT_EQ(m.cases.size(), 1u);
  Case c = m.cases.at(0);
  load_case(c, dir);
  fs::remove_all(dir);
  return c;
}

const CheckResult& result_of(const CaseResult& r, const std::string& tensor) {
  for (const CheckResult& k : r.checks)
    if (k.tensor == tensor) return k;
  throw std::runtime_error("no check of " + tensor);
}

Tensor scaled_element(Tensor t, std::int64_t index, double relative) {
  std::vector<double> v = tensor_values(t);
  v[static_cast<std::size_t>(index)] *= 1 + relative;
  Tensor out = tensor_from(std::span<const double>(v), t.dtype);
  out.shape = t.shape;
  return out;
}

// ---- the committed set --------------------------------------------------------------------------------

TEST(GoldenSet, CommittedFilesAreWhatMoelabGoldenWritesToday) {
  const fs::path dir = fresh_dir("fresh");
  const std::vector<std::string> names = write_golden(dir, "", false, nullptr);
  std::vector<std::string> problems;
  for (const std::string& file : [&] {
         std::vector<std::string> files{"manifest.json"};
         for (const std::string& n : names) files.push_back(n + ".safetensors");
         return files;
       }()) {
    if (!fs::exists(kCommitted / file)) {
      problems.push_back(file + " is missing from golden/");
    } else if (read_file(kCommitted / file) != read_file(dir / file)) {
      problems.push_back(file + " differs");
    }
  }
  for (const fs::directory_entry& e : fs::directory_iterator(kCommitted)) {
    const std::string file = e.path().filename().string();
    if (e.path().extension() == ".safetensors" && !fs::exists(dir / file)) problems.push_back(file + " is not generated any more");
  }
  EXPECT_TRUE(problems.empty()) << ::testing::PrintToString(problems)
                                << "\nregenerate with: build/bin/moelab golden --out golden";
  fs::remove_all(dir);
}

TEST(GoldenSet, TwoRunsWriteTheSameBytes) {
  const fs::path a = fresh_dir("a"), b = fresh_dir("b");
  write_golden(a, "*.layer.fp32", false, nullptr);
  write_golden(b, "*.layer.fp32", false, nullptr);
  for (const fs::directory_entry& e : fs::directory_iterator(a))
    EXPECT_EQ(read_file(e.path()), read_file(b / e.path().filename())) << e.path();
  fs::remove_all(a);
  fs::remove_all(b);
}

TEST(GoldenSet, IsSmallEnoughForTheRepository) {
  std::uintmax_t bytes = 0;
  for (const fs::directory_entry& e : fs::directory_iterator(kCommitted)) bytes += fs::file_size(e.path());
  EXPECT_LT(bytes, 8u << 20) << "the committed golden set should stay a few MB";
}

TEST(GoldenSet, CoversEveryPresetAndEveryComponent) {
  const Manifest m = read_manifest(kCommitted);
  std::set<std::string> components, presets;
  for (const Case& c : m.cases) {
    components.insert(c.component);
    presets.insert(c.preset);
  }
  for (const char* component : {"numerics", "routing", "losses", "balancing", "capacity", "dispatch", "combine",
                                "experts", "shared_experts", "layer"})
    EXPECT_TRUE(components.contains(component)) << component;
  for (const char* preset : {"switch", "gshard", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2",
                             "deepseek_v3", "llama4", "gpt_oss", "expert_choice", "hash", "gpu_mode_amd"})
    EXPECT_TRUE(presets.contains(preset)) << preset;
}

// The float32 reference against the float64 expected values, through files and manifest only.
TEST(GoldenSet, TheFloat32ReferencePassesEveryCommittedCase) {
  Manifest m = read_manifest(kCommitted);
  ASSERT_GT(m.cases.size(), 60u);
  for (Case& c : m.cases) {
    load_case(c, kCommitted);
    const CaseResult r = compare_case(c, run_cpu(c));
    std::string failures;
    for (const CheckResult& k : r.checks)
      if (k.verdict != Verdict::pass) failures += k.tensor + ": " + std::string(verdict_name(k.verdict)) + " " + k.message + "\n";
    // adversarial.overflow.*: float32 scores underflow to exact zeros that double tells apart, so
    // float32 may pick another expert at such a tie; ambiguous is then the right verdict.
    if (c.name.starts_with("adversarial.overflow.") && r.verdict == Verdict::ambiguous) continue;
    EXPECT_EQ(r.verdict, Verdict::pass) << c.name << "\n" << failures;
    EXPECT_LT(r.worst, 1.0) << c.name;
  }
}

// ---- tolerances -------------------------------------------------------------------------------------

TEST(GoldenTolerance, FollowsTheWrittenRule) {
  const Case c = reloaded("mixtral.layer.bf16");
  for (const Check& k : c.checks) {
    if (k.tensor != "output.y") continue;
    // Mixtral's router is bf16, so is the case: u = 2^-8; depth 5; K = H + k = 32 + 2.
    const double rtol = 2 * (5 * std::ldexp(1.0, -8) + std::sqrt(34.0) * std::ldexp(1.0, -24));
    EXPECT_EQ(k.depth, 5);
    EXPECT_EQ(k.reduction, 34);
    EXPECT_DOUBLE_EQ(k.rtol, rtol);
    EXPECT_DOUBLE_EQ(k.nmse, 2 * (5 * std::ldexp(1.0, -16) + 34 * std::ldexp(1.0, -48)));
    const std::vector<double> y = tensor_values(c.file.tensors.at("output.y"));
    double sq = 0;
    for (double v : y) sq += v * v;
    EXPECT_NEAR(k.atol, rtol * std::sqrt(sq / static_cast<double>(y.size())), 1e-15);
    return;
  }
  FAIL() << "no check of output.y";
}

TEST(GoldenTolerance, UnitRoundoffs) {
  EXPECT_EQ(unit_roundoff(Format::fp32), std::ldexp(1.0, -24));
  EXPECT_EQ(unit_roundoff(Format::bf16), std::ldexp(1.0, -8));
  EXPECT_EQ(unit_roundoff(Format::fp16), std::ldexp(1.0, -11));
  EXPECT_EQ(unit_roundoff(Format::fp8_e4m3), std::ldexp(1.0, -4));
  EXPECT_EQ(unit_roundoff(Format::fp8_e5m2), std::ldexp(1.0, -3));
}

// ---- the comparison ---------------------------------------------------------------------------------

TEST(GoldenCompare, AnElementBeyondItsToleranceFailsAndOneWithinPasses) {
  const Case c = reloaded("olmoe.layer.fp32");
  Produced p = run_cpu(c);
  const Check* y = nullptr;
  for (const Check& k : c.checks)
    if (k.tensor == "output.y") y = &k;
  ASSERT_NE(y, nullptr);
  const double ref = tensor_values(c.file.tensors.at("output.y"))[5];
  const double bound = y->atol + y->rtol * std::abs(ref);
  Produced wrong = p, close = p;
  wrong["output.y"] = scaled_element(c.file.tensors.at("output.y"), 5, 2 * bound / std::abs(ref));
  close["output.y"] = scaled_element(c.file.tensors.at("output.y"), 5, 0.5 * bound / std::abs(ref));
  const CaseResult bad = compare_case(c, wrong), good = compare_case(c, close);
  EXPECT_EQ(bad.verdict, Verdict::fail);
  EXPECT_EQ(result_of(bad, "output.y").verdict, Verdict::fail);
  EXPECT_THAT(result_of(bad, "output.y").message, HasSubstr("element (0, 5)"));
  EXPECT_NEAR(result_of(bad, "output.y").worst, 2.0, 0.01);
  EXPECT_EQ(good.verdict, Verdict::pass);
  EXPECT_NEAR(result_of(good, "output.y").worst, 0.5, 0.01);
}

TEST(GoldenCompare, NaNNeverPassesAndShapesMustMatch) {
  const Case c = reloaded("experts.swiglu.fp32");
  Produced p = run_cpu(c);
  std::vector<double> y = tensor_values(p["output.y"]);
  y[3] = std::nan("");
  Produced with_nan = p;
  with_nan["output.y"] = tensor_from(std::span<const double>(y), DType::f64);
  with_nan["output.y"].shape = p["output.y"].shape;
  EXPECT_EQ(result_of(compare_case(c, with_nan), "output.y").verdict, Verdict::fail);
  Produced flat = p;
  flat["output.y"].shape = {p["output.y"].numel()};
  EXPECT_THAT(result_of(compare_case(c, flat), "output.y").message, HasSubstr("shape"));
}

TEST(GoldenCompare, GatesAreMatchedByIdNotPosition) {
  const Case c = reloaded("qwen3_moe.routing.fp32");
  Produced p = run_cpu(c);
  // Reverse each token's k experts, ids and gates together: the same routing.
  auto reverse_rows = [](Tensor& t) {
    MatrixD m = tensor_matrix(t, "m");
    const MatrixD r = m.rowwise().reverse();
    const DType d = t.dtype;
    t = d == DType::f64 ? tensor_from(r, d) : tensor_from(IndexMatrix(r.cast<std::int32_t>()), d);
  };
  reverse_rows(p["output.topk_ids"]);
  reverse_rows(p["output.gates"]);
  EXPECT_EQ(compare_case(c, p).verdict, Verdict::pass);
  reverse_rows(p["output.gates"]);  // now the gates are at the wrong experts
  EXPECT_EQ(result_of(compare_case(c, p), "output.gates").verdict, Verdict::fail);
}

TEST(GoldenCompare, ADifferentExpertAtAnExactTieIsAmbiguousElsewhereAFailure) {
  const Case c = reloaded("adversarial.ties");
  const Produced p = run_cpu(c);
  const IndexMatrix ids = tensor_index_matrix(c.file.tensors.at("output.topk_ids"), "ids");
  // Find a token that chose expert 1 but not 2 (or 5 but not 6): the tie partner is as good.
  for (Index t = 0; t < ids.rows(); ++t)
    for (Index j = 0; j < ids.cols(); ++j) {
      const int a = ids(t, j), partner = a == 1 ? 2 : a == 5 ? 6 : -1;
      if (partner < 0 || (ids.row(t).array() == partner).any()) continue;
      IndexMatrix swapped = ids;
      swapped(t, j) = partner;
      Produced tie = p;
      tie["output.topk_ids"] = tensor_from(swapped);
      const CaseResult r = compare_case(c, tie);
      EXPECT_EQ(result_of(r, "output.topk_ids").verdict, Verdict::ambiguous);
      EXPECT_EQ(r.verdict, Verdict::ambiguous);
      EXPECT_EQ(result_of(r, "output.load").verdict, Verdict::ambiguous);  // depends on every token
      // The same token sent to an expert far from the boundary is a failure.
      IndexMatrix far = ids;
      int other = 0;
      while ((ids.row(t).array() == other).any() || other == partner) ++other;
      far(t, j) = other;
      Produced wrong = p;
      wrong["output.topk_ids"] = tensor_from(far);
      const CaseResult f = compare_case(c, wrong);
      if (result_of(f, "output.topk_ids").verdict != Verdict::ambiguous) {
        EXPECT_EQ(f.verdict, Verdict::fail);
        EXPECT_THAT(result_of(f, "output.topk_ids").message, HasSubstr("not a near-tie"));
      }
      return;
    }
  FAIL() << "no token chose exactly one expert of a tied pair";
}

TEST(GoldenCompare, PermutationAcceptsAnyOrderWithinAnExpertOnly) {
  const Case c = reloaded("dispatch.permute");
  Produced p = run_cpu(c);
  std::vector<double> offsets = tensor_values(p["output.offsets"]);
  std::vector<double> tokens = tensor_values(p["output.row_token"]);
  MatrixD permuted = tensor_matrix(p["output.permuted"], "permuted");
  std::size_t e = 0;
  while (offsets[e + 1] - offsets[e] < 2) ++e;
  const Index r0 = static_cast<Index>(offsets[e]), r1 = r0 + 1;
  std::swap(tokens[r0], tokens[r1]);
  permuted.row(r0).swap(permuted.row(r1));
  Produced reordered = p;
  reordered["output.row_token"] = tensor_from(std::span<const double>(tokens), DType::i32);
  reordered["output.permuted"] = tensor_from(permuted, DType::f64);
  EXPECT_EQ(compare_case(c, reordered).verdict, Verdict::pass);
  // Rows reordered but their values not: the permuted rows no longer match their tokens.
  Produced mismatched = reordered;
  mismatched["output.permuted"] = p["output.permuted"];
  EXPECT_EQ(result_of(compare_case(c, mismatched), "output.permuted").verdict, Verdict::fail);
  // A token moved into another expert's block.
  std::vector<double> moved = tensor_values(p["output.row_token"]);
  std::swap(moved[static_cast<std::size_t>(offsets[e])], moved[static_cast<std::size_t>(offsets[e + 1])]);
  Produced wrong = p;
  wrong["output.row_token"] = tensor_from(std::span<const double>(moved), DType::i32);
  EXPECT_EQ(result_of(compare_case(c, wrong), "output.row_token").verdict, Verdict::fail);
}

TEST(GoldenCompare, BitwiseTreatsEveryNaNAsEqual) {
  const Case c = reloaded("numerics.encode.bf16");
  Produced p = run_cpu(c);
  EXPECT_EQ(compare_case(c, p).verdict, Verdict::pass);
  const std::vector<double> xs = tensor_values(c.file.tensors.at("input.values"));
  const auto nan_at = static_cast<std::size_t>(std::find_if(xs.begin(), xs.end(), [](double x) { return std::isnan(x); }) - xs.begin());
  ASSERT_LT(nan_at, xs.size());
  Tensor& bits = p["output.bits"];
  bits.data[2 * nan_at] = 0x81;      // 0xFF81: another sign and payload, still a NaN
  bits.data[2 * nan_at + 1] = 0xFF;  // (exponent all ones, mantissa not zero)
  EXPECT_EQ(compare_case(c, p).verdict, Verdict::pass);
  bits.data[0] ^= 1;  // one ulp on the first (finite) value
  EXPECT_EQ(compare_case(c, p).verdict, Verdict::fail);
}

TEST(GoldenCompare, OutputsNotProducedAreNotSupported) {
  const Case c = reloaded("combine.weighted_sum");
  EXPECT_EQ(compare_case(c, {}).verdict, Verdict::not_supported);
  Produced only_y = run_cpu(c);
  only_y.erase("grad.expert_out");
  only_y.erase("grad.row_weight");
  const CaseResult r = compare_case(c, only_y);
  EXPECT_EQ(r.verdict, Verdict::pass);
  EXPECT_EQ(result_of(r, "grad.row_weight").verdict, Verdict::not_supported);
}

// ---- loaders ----------------------------------------------------------------------------------------

TEST(GoldenManifest, RejectsMalformedManifestsWithAClearMessage) {
  EXPECT_THAT(error_of([] { parse_manifest("[1, 2]", "m.json"); }), HasSubstr("must be a JSON object"));
  EXPECT_THAT(error_of([] { parse_manifest("{", "m.json"); }), HasSubstr("m.json"));
  EXPECT_THAT(error_of([] { parse_manifest(R"({"format_version": 2, "moelab_version": "x", "cases": []})", "m.json"); }),
              HasSubstr("format_version = 2: this moelab reads format version 1 only"));
  EXPECT_THAT(error_of([] { parse_manifest(R"({"format_version": 1, "cases": []})", "m.json"); }),
              HasSubstr("manifest.moelab_version = (missing): is required"));
  const std::string base =
      R"({"format_version": 1, "moelab_version": "0", "cases": [{"name": "a", "file": "a.safetensors",
      "component": "c", "preset": "", "description": "", "seed": 1, "dtype": "fp32", "config": {},
      "tensors": [{"name": "output.y", "dtype": "F64", "shape": [2]}], "checks": [CHECK]}]})";
  auto with = [&](const std::string& check) {
    std::string s = base;
    s.replace(s.find("CHECK"), 5, check);
    return s;
  };
  EXPECT_NO_THROW(parse_manifest(with(R"({"tensor": "output.y", "compare": "exact"})"), "m.json"));
  EXPECT_THAT(error_of([&] { parse_manifest(with(R"({"tensor": "output.y", "compare": "close"})"), "m.json"); }),
              HasSubstr("compare = close: must be one of"));
  EXPECT_THAT(
      error_of([&] {
        parse_manifest(with(R"({"tensor": "output.y", "compare": "allclose", "atol": -1, "rtol": 0, "nmse": 0, "depth": 1, "reduction": 1})"), "m.json");
      }),
      HasSubstr("atol = -1: must be finite and >= 0"));
  EXPECT_THAT(error_of([&] { parse_manifest(with(R"({"tensor": "output.z", "compare": "exact"})"), "m.json"); }),
              HasSubstr("output.z: names a tensor the case does not list"));
  std::string bad_file = with(R"({"tensor": "output.y", "compare": "exact"})");
  bad_file.replace(bad_file.find("a.safetensors"), 13, "../etc/passwd");
  EXPECT_THAT(error_of([&] { parse_manifest(bad_file, "m.json"); }), HasSubstr("must be a.safetensors"));
}

TEST(GoldenManifest, LoadCaseChecksTheFileAgainstTheManifest) {
  const fs::path dir = fresh_dir("load");
  write_golden(dir, "combine.weighted_sum", false, nullptr);
  Manifest m = read_manifest(dir);
  Case wrong_shape = m.cases.at(0);
  wrong_shape.file.tensors.at("output.y").shape = {3, 3};
  EXPECT_THAT(error_of([&] { load_case(wrong_shape, dir); }), HasSubstr("the manifest says F64 [3, 3]"));
  Case extra = m.cases.at(0);
  extra.file.tensors.erase("input.dy");
  EXPECT_THAT(error_of([&] { load_case(extra, dir); }), HasSubstr("input.dy: is not in the manifest"));
  std::ofstream(dir / "combine.weighted_sum.safetensors", std::ios::binary) << "garbage";
  Case truncated = m.cases.at(0);
  EXPECT_THAT(error_of([&] { load_case(truncated, dir); }), HasSubstr("combine.weighted_sum.safetensors"));
  fs::remove_all(dir);
}

TEST(GoldenNames, GlobMatching) {
  EXPECT_TRUE(glob_match("", "anything"));
  EXPECT_TRUE(glob_match("mixtral.*", "mixtral.layer.fp32"));
  EXPECT_FALSE(glob_match("mixtral.*", "qwen3_moe.layer.fp32"));
  EXPECT_TRUE(glob_match("*.layer.*", "deepseek_v3.layer.bf16"));
  EXPECT_TRUE(glob_match("numerics.encode.fp?", "numerics.encode.fp8_e4m3") == false);
  EXPECT_TRUE(glob_match("numerics.*.fp8_e[45]m[32]", "numerics.decode.fp8_e5m2"));
  EXPECT_FALSE(glob_match("numerics.*.fp8_e[!5]m2", "numerics.decode.fp8_e5m2"));
}

}  // namespace
}  // namespace moelab::golden
