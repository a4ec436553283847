// moelab/tools/golden/check.cpp — reading a golden set back and comparing an implementation's
// outputs with it (docs/golden.md, "Checks" and "Verdicts"). golden/moelab_golden.py implements the
// same rules in numpy.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <set>

#include "reference/error.h"
#include "reference/files.h"
#include "tools/golden/golden.h"

namespace moelab::golden {

std::string_view verdict_name(Verdict v) {
  switch (v) {
    case Verdict::pass: return "pass";
    case Verdict::fail: return "FAIL";
    case Verdict::ambiguous: return "ambiguous";
    case Verdict::not_supported: return "not supported";
  }
  return "?";
}

// ---- the manifest -------------------------------------------------------------------------------------

namespace {

const Json& field(const Json& j, const std::string& key, const std::string& where) {
  if (!j.is_object() || !j.contains(key)) fail(where + "." + key, "(missing)", "is required");
  return j.at(key);
}

std::string string_field(const Json& j, const std::string& key, const std::string& where) {
  const Json& v = field(j, key, where);
  if (!v.is_string()) fail(where + "." + key, v.dump(), "must be a string");
  return v.get<std::string>();
}

double number_field(const Json& j, const std::string& key, const std::string& where) {
  const Json& v = field(j, key, where);
  if (!v.is_number()) fail(where + "." + key, v.dump(), "must be a number");
  const double x = v.get<double>();
  if (!std::isfinite(x) || x < 0) fail(where + "." + key, v.dump(), "must be finite and >= 0");
  return x;
}

std::int64_t count_field(const Json& j, const std::string& key, const std::string& where) {
  const Json& v = field(j, key, where);
  if (!v.is_number_integer() || v.get<std::int64_t>() < 0 || v.get<std::int64_t>() > (std::int64_t{1} << 40))
    fail(where + "." + key, v.dump(), "must be an integer in [0, 2^40]");
  return v.get<std::int64_t>();
}

bool valid_name(const std::string& name) {
  return !name.empty() && std::all_of(name.begin(), name.end(), [](char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' ||
           ch == '-';
  });
}

Check parse_check(const Json& j, const std::string& where) {
  Check c;
  c.tensor = string_field(j, "tensor", where);
  c.compare = string_field(j, "compare", where);
  static const std::set<std::string> kinds = {"allclose", "exact", "bitwise", "topk_set", "permutation"};
  if (!kinds.contains(c.compare))
    fail(where + ".compare", c.compare, "must be one of allclose, exact, bitwise, topk_set, permutation");
  if (c.compare == "allclose" || c.compare == "topk_set") {
    c.atol = number_field(j, "atol", where);
    c.rtol = number_field(j, "rtol", where);
  }
  if (c.compare == "allclose") {
    c.nmse = number_field(j, "nmse", where);
    c.depth = static_cast<int>(std::min<std::int64_t>(count_field(j, "depth", where), 1 << 30));
    c.reduction = count_field(j, "reduction", where);
  }
  if (j.contains("rows")) {
    c.rows = string_field(j, "rows", where);
    if (c.rows != "token" && c.rows != "permuted" && c.rows != "all")
      fail(where + ".rows", c.rows, "must be token, permuted or all");
  }
  if (j.contains("align")) c.align = string_field(j, "align", where);
  if (c.compare == "topk_set") {
    c.ranking = string_field(j, "ranking", where);
    if (j.contains("transposed")) {
      if (!j.at("transposed").is_boolean()) fail(where + ".transposed", j.at("transposed").dump(), "must be a boolean");
      c.transposed = j.at("transposed").get<bool>();
    }
  }
  if (c.compare == "permutation") c.offsets = string_field(j, "offsets", where);
  return c;
}

std::vector<std::int64_t> parse_shape(const Json& j, const std::string& where) {
  if (!j.is_array()) fail(where, j.dump(), "must be a list of non-negative integers");
  std::vector<std::int64_t> shape;
  for (const Json& d : j) {
    if (!d.is_number_integer() || d.get<std::int64_t>() < 0) fail(where, j.dump(), "must be a list of non-negative integers");
    shape.push_back(d.get<std::int64_t>());
  }
  return shape;
}

}  // namespace

Manifest parse_manifest(std::string_view text, std::string_view what) {
  const std::string file(what);
  Json j = Json::parse(text, nullptr, false);
  if (j.is_discarded()) fail(file, "(not JSON)", "the manifest must be a JSON object");
  if (!j.is_object()) fail(file, j.type_name(), "the manifest must be a JSON object");
  try {
    Manifest m;
    const Json& version = field(j, "format_version", "manifest");
    if (!version.is_number_integer() || version.get<std::int64_t>() != kFormatVersion)
      fail("manifest.format_version", version.dump(),
           fmt::format("this moelab reads format version {} only", kFormatVersion));
    m.format_version = kFormatVersion;
    m.moelab_version = string_field(j, "moelab_version", "manifest");
    const Json& cases = field(j, "cases", "manifest");
    if (!cases.is_array()) fail("manifest.cases", cases.type_name(), "must be a list");
    std::set<std::string> names;
    for (std::size_t i = 0; i < cases.size(); ++i) {
      const Json& e = cases[i];
      std::string where = fmt::format("manifest.cases[{}]", i);
      if (!e.is_object()) fail(where, e.dump(), "must be an object");
      Case c;
      c.name = string_field(e, "name", where);
      if (!valid_name(c.name)) fail(where + ".name", c.name, "must be letters, digits, '.', '_' or '-'");
      if (!names.insert(c.name).second) fail(where + ".name", c.name, "appears twice");
      where = fmt::format("manifest case {}", c.name);
      if (string_field(e, "file", where) != c.name + ".safetensors")
        fail(where + ".file", e.at("file").dump(), fmt::format("must be {}.safetensors", c.name));
      c.component = string_field(e, "component", where);
      c.preset = string_field(e, "preset", where);
      c.description = string_field(e, "description", where);
      c.dtype = string_field(e, "dtype", where);
      parse_format(c.dtype, where + ".dtype");
      const Json& seed = field(e, "seed", where);
      if (!seed.is_number_unsigned()) fail(where + ".seed", seed.dump(), "must be a non-negative integer");
      c.seed = seed.get<std::uint64_t>();
      c.config = field(e, "config", where);
      if (!c.config.is_object()) fail(where + ".config", c.config.type_name(), "must be an object");
      const Json& tensors = field(e, "tensors", where);
      if (!tensors.is_array()) fail(where + ".tensors", tensors.type_name(), "must be a list");
      for (std::size_t t = 0; t < tensors.size(); ++t) {
        const std::string tw = fmt::format("{}.tensors[{}]", where, t);
        Tensor meta;
        meta.dtype = parse_dtype(string_field(tensors[t], "dtype", tw));
        meta.shape = parse_shape(field(tensors[t], "shape", tw), tw + ".shape");
        const std::string name = string_field(tensors[t], "name", tw);
        if (!c.file.tensors.emplace(name, std::move(meta)).second) fail(tw + ".name", name, "appears twice");
      }
      const Json& checks = field(e, "checks", where);
      if (!checks.is_array()) fail(where + ".checks", checks.type_name(), "must be a list");
      for (std::size_t k = 0; k < checks.size(); ++k) {
        Check check = parse_check(checks[k], fmt::format("{}.checks[{}]", where, k));
        for (const std::string* ref : {&check.tensor, &check.align, &check.ranking, &check.offsets})
          if (!ref->empty() && !c.file.tensors.contains(*ref))
            fail(fmt::format("{}.checks[{}]", where, k), *ref, "names a tensor the case does not list");
        c.checks.push_back(std::move(check));
      }
      m.cases.push_back(std::move(c));
    }
    return m;
  } catch (const nlohmann::json::exception& e) {
    fail(file, "(malformed)", e.what());
  } catch (const Error& e) {
    throw Error(file + ": " + e.what());
  }
}

Manifest read_manifest(const std::filesystem::path& dir) {
  const std::filesystem::path path = dir / "manifest.json";
  const std::vector<std::uint8_t> bytes = read_file(path);
  return parse_manifest(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()), path.string());
}

void load_case(Case& entry, const std::filesystem::path& dir) {
  const std::filesystem::path path = dir / (entry.name + ".safetensors");
  TensorFile file = read_safetensors(path);
  for (const auto& [name, meta] : entry.file.tensors) {
    const auto it = file.tensors.find(name);
    if (it == file.tensors.end()) fail(path.string() + ": tensor", name, "is in the manifest but not in the file");
    if (it->second.dtype != meta.dtype || it->second.shape != meta.shape)
      fail(path.string() + ": tensor " + name, fmt::format("{} {}", dtype_name(it->second.dtype), it->second.shape),
           fmt::format("the manifest says {} {}", dtype_name(meta.dtype), meta.shape));
  }
  for (const auto& [name, t] : file.tensors)
    if (!entry.file.tensors.contains(name)) fail(path.string() + ": tensor", name, "is not in the manifest");
  entry.file.tensors = std::move(file.tensors);
  entry.file.metadata = std::move(file.metadata);
}

// ---- comparison -------------------------------------------------------------------------------------

namespace {

struct Values {
  std::vector<double> v;
  std::vector<std::int64_t> shape;
  std::int64_t rows() const { return shape.empty() ? 1 : shape[0]; }
  std::int64_t cols() const {
    std::int64_t n = 1;
    for (std::size_t i = 1; i < shape.size(); ++i) n *= shape[i];
    return n;
  }
  double at(std::int64_t r, std::int64_t c) const { return v[static_cast<std::size_t>(r * cols() + c)]; }
};

Values values_of(const Tensor& t) { return {tensor_values(t), t.shape}; }

struct Context {
  const Case& c;
  const Produced& produced;
  std::set<std::int64_t> ambiguous_tokens{};
  const Tensor& expected(const std::string& name) const { return c.file.tensors.at(name); }
  const Tensor* output(const std::string& name) const {
    const auto it = produced.find(name);
    return it == produced.end() ? nullptr : &it->second;
  }
};

CheckResult result(const Check& check, Verdict v, std::string message = "") {
  return {.tensor = check.tensor, .verdict = v, .message = std::move(message)};
}

std::string shape_text(const std::vector<std::int64_t>& s) { return fmt::format("{}", s); }

bool near_tie(double a, double b, const Check& check) {
  return std::abs(a - b) <= check.atol + check.rtol * std::max(std::abs(a), std::abs(b));
}

CheckResult check_topk_set(Context& ctx, const Check& check, const Tensor& out) {
  const Values ref = values_of(ctx.expected(check.tensor)), got = values_of(out);
  if (got.shape != ref.shape)
    return result(check, Verdict::fail, fmt::format("shape {}, expected {}", shape_text(got.shape), shape_text(ref.shape)));
  const Values rank = values_of(ctx.expected(check.ranking));
  const std::int64_t candidates = check.transposed ? rank.rows() : rank.cols();
  auto r = [&](std::int64_t row, std::int64_t id) { return check.transposed ? rank.at(id, row) : rank.at(row, id); };
  std::int64_t ambiguous_rows = 0;
  for (std::int64_t row = 0; row < ref.rows(); ++row) {
    std::set<std::int64_t> a, b;
    for (std::int64_t j = 0; j < ref.cols(); ++j) {
      a.insert(static_cast<std::int64_t>(got.at(row, j)));
      b.insert(static_cast<std::int64_t>(ref.at(row, j)));
    }
    for (std::int64_t id : a)
      if (id < 0 || id >= candidates || a.size() != static_cast<std::size_t>(ref.cols()))
        return result(check, Verdict::fail,
                      fmt::format("row {}: ids {} are not {} distinct ids in [0, {})", row, std::vector(a.begin(), a.end()),
                                  ref.cols(), candidates));
    if (a == b) continue;
    std::vector<std::int64_t> only_got, only_ref;
    std::set_difference(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(only_got));
    std::set_difference(b.begin(), b.end(), a.begin(), a.end(), std::back_inserter(only_ref));
    for (std::int64_t x : only_got)
      for (std::int64_t y : only_ref)
        if (!near_tie(r(row, x), r(row, y), check))
          return result(check, Verdict::fail,
                        fmt::format("row {}: chose {} instead of {}, ranked {:.9g} against {:.9g}: not a near-tie", row,
                                    x, y, r(row, x), r(row, y)));
    ++ambiguous_rows;
    if (check.transposed) {
      ctx.ambiguous_tokens.insert(only_got.begin(), only_got.end());
      ctx.ambiguous_tokens.insert(only_ref.begin(), only_ref.end());
    } else {
      ctx.ambiguous_tokens.insert(row);
    }
  }
  if (ambiguous_rows == 0) return result(check, Verdict::pass);
  return result(check, Verdict::ambiguous, fmt::format("{} rows differ only at near-ties", ambiguous_rows));
}

// For each row of `out`, the reference row it is compared with (-1: left out, ambiguous).
struct RowMap {
  std::vector<std::int64_t> ref_row;
  std::string error;
};

std::vector<std::int64_t> ints(const Tensor& t) {
  std::vector<std::int64_t> v;
  for (double x : tensor_values(t)) v.push_back(static_cast<std::int64_t>(x));
  return v;
}

RowMap map_rows(const Context& ctx, const Check& check, std::int64_t rows) {
  RowMap m;
  m.ref_row.resize(static_cast<std::size_t>(rows));
  for (std::int64_t r = 0; r < rows; ++r) m.ref_row[r] = r;
  if (check.rows == "token") {
    for (std::int64_t t : ctx.ambiguous_tokens)
      if (t < rows) m.ref_row[t] = -1;
  } else if (check.rows == "permuted") {
    // Match (expert block, token) pairs: the implementation may order a block differently.
    const std::vector<std::int64_t> ref_token = ints(ctx.expected("output.row_token"));
    const std::vector<std::int64_t> ref_offsets = ints(ctx.expected("output.offsets"));
    const Tensor* t = ctx.output("output.row_token");
    const Tensor* o = ctx.output("output.offsets");
    const std::vector<std::int64_t> got_token = t ? ints(*t) : ref_token;
    const std::vector<std::int64_t> got_offsets = o ? ints(*o) : ref_offsets;
    std::map<std::pair<std::int64_t, std::int64_t>, std::int64_t> where;
    for (std::size_t e = 0; e + 1 < ref_offsets.size(); ++e)
      for (std::int64_t r = ref_offsets[e]; r < ref_offsets[e + 1]; ++r) where[{static_cast<std::int64_t>(e), ref_token[r]}] = r;
    for (std::size_t e = 0; e + 1 < got_offsets.size(); ++e)
      for (std::int64_t r = got_offsets[e]; r < got_offsets[e + 1] && r < rows; ++r) {
        if (r < 0 || static_cast<std::size_t>(r) >= got_token.size()) {
          m.error = fmt::format("offsets {} do not fit {} rows", got_offsets, rows);
          return m;
        }
        const auto it = where.find({static_cast<std::int64_t>(e), got_token[r]});
        if (ctx.ambiguous_tokens.contains(got_token[r])) {
          m.ref_row[r] = -1;
        } else if (it == where.end()) {
          m.error = fmt::format("row {} (expert {}, token {}) is not a reference row", r, e, got_token[r]);
          return m;
        } else {
          m.ref_row[r] = it->second;
        }
      }
  }
  return m;
}

// Column of the reference entry that `out` entry (row, j) is compared with, by id (align), or j.
std::int64_t aligned_column(const Context& ctx, const Check& check, std::int64_t ref_row, std::int64_t row, std::int64_t j,
                            std::string& error) {
  if (check.align.empty()) return j;
  const Values ref_ids = values_of(ctx.expected(check.align));
  const Tensor* got = ctx.output(check.align);
  const double id = got ? values_of(*got).at(row, j) : ref_ids.at(ref_row, j);
  for (std::int64_t k = 0; k < ref_ids.cols(); ++k)
    if (ref_ids.at(ref_row, k) == id) return k;
  error = fmt::format("row {}: id {} is not among the reference's", row, id);
  return -1;
}

CheckResult check_values(Context& ctx, const Check& check, const Tensor& out) {
  const Values ref = values_of(ctx.expected(check.tensor)), got = values_of(out);
  if (got.shape != ref.shape)
    return result(check, Verdict::fail, fmt::format("shape {}, expected {}", shape_text(got.shape), shape_text(ref.shape)));
  const bool any_ambiguous = !ctx.ambiguous_tokens.empty();
  if (check.rows == "all" && any_ambiguous)
    return result(check, Verdict::ambiguous, "depends on every token, and some tokens' experts are ambiguous");
  const RowMap map = map_rows(ctx, check, got.rows());
  if (!map.error.empty()) return result(check, Verdict::fail, map.error);
  const bool exact = check.compare == "exact";
  double worst = 0, err2 = 0, ref2 = 0, out2 = 0;
  std::string where;
  std::int64_t skipped = 0;
  for (std::int64_t r = 0; r < got.rows(); ++r) {
    const std::int64_t rr = map.ref_row[r];
    if (rr < 0) {
      ++skipped;
      continue;
    }
    for (std::int64_t j = 0; j < got.cols(); ++j) {
      std::string error;
      const std::int64_t k = aligned_column(ctx, check, rr, r, j, error);
      if (k < 0) return result(check, Verdict::fail, error);
      const double o = got.at(r, j), x = ref.at(rr, k);
      if (exact) {
        if (o != x) return result(check, Verdict::fail, fmt::format("element ({}, {}) is {}, expected {}", r, j, o, x));
        continue;
      }
      if (!std::isfinite(o))
        return result(check, Verdict::fail, fmt::format("element ({}, {}) is {}, expected {:.9g}", r, j, o, x));
      const double bound = check.atol + check.rtol * std::abs(x), e = std::abs(o - x);
      const double ratio = e == 0 ? 0 : bound == 0 ? std::numeric_limits<double>::infinity() : e / bound;
      if (ratio > worst) {
        worst = ratio;
        where = fmt::format("element ({}, {}): {:.9g}, expected {:.9g}", r, j, o, x);
      }
      err2 += e * e;
      ref2 += x * x;
      out2 += o * o;
    }
  }
  CheckResult res = result(check, Verdict::pass);
  res.worst = worst;
  res.nmse = ref2 > 0 ? err2 / ref2 : out2;
  if (worst > 1) {
    res.verdict = Verdict::fail;
    res.message = fmt::format("{} is {:.3g} tolerances off (atol {:.3g}, rtol {:.3g})", where, worst, check.atol, check.rtol);
  } else if (!exact && res.nmse > check.nmse) {
    res.verdict = Verdict::fail;
    res.message = fmt::format("NMSE {:.3g} exceeds {:.3g}", res.nmse, check.nmse);
  } else if (skipped > 0) {
    res.verdict = Verdict::ambiguous;
    res.message = fmt::format("{} rows of ambiguous tokens left out", skipped);
  }
  return res;
}

bool same_bits_or_nan(const Tensor& a, const Tensor& b, std::int64_t i) {
  const std::size_t w = dtype_size(a.dtype);
  if (std::memcmp(a.data.data() + i * w, b.data.data() + i * w, w) == 0) return true;
  if (!is_float(a.dtype)) return false;
  Tensor one_a{.dtype = a.dtype, .shape = {1}}, one_b{.dtype = b.dtype, .shape = {1}};
  one_a.data.assign(a.data.begin() + i * w, a.data.begin() + (i + 1) * w);
  one_b.data.assign(b.data.begin() + i * w, b.data.begin() + (i + 1) * w);
  return std::isnan(tensor_values(one_a)[0]) && std::isnan(tensor_values(one_b)[0]);
}

CheckResult check_bitwise(const Context& ctx, const Check& check, const Tensor& out) {
  const Tensor& ref = ctx.expected(check.tensor);
  if (out.dtype != ref.dtype || out.shape != ref.shape)
    return result(check, Verdict::fail,
                  fmt::format("{} {}, expected {} {}", dtype_name(out.dtype), shape_text(out.shape), dtype_name(ref.dtype),
                              shape_text(ref.shape)));
  std::int64_t mismatches = 0, first = -1;
  for (std::int64_t i = 0; i < ref.numel(); ++i)
    if (!same_bits_or_nan(out, ref, i)) {
      ++mismatches;
      if (first < 0) first = i;
    }
  if (mismatches == 0) return result(check, Verdict::pass);
  return result(check, Verdict::fail,
                fmt::format("{} of {} elements differ; first at {}: {} instead of {}", mismatches, ref.numel(), first,
                            tensor_values(out)[first], tensor_values(ref)[first]));
}

CheckResult check_permutation(const Context& ctx, const Check& check, const Tensor& out) {
  const std::vector<std::int64_t> ref_token = ints(ctx.expected(check.tensor));
  const std::vector<std::int64_t> ref_offsets = ints(ctx.expected(check.offsets));
  const Tensor* o = ctx.output(check.offsets);
  const std::vector<std::int64_t> got_token = ints(out);
  const std::vector<std::int64_t> got_offsets = o ? ints(*o) : ref_offsets;
  if (!ctx.ambiguous_tokens.empty()) return result(check, Verdict::ambiguous, "some tokens' experts are ambiguous");
  if (got_offsets != ref_offsets)
    return result(check, Verdict::fail, fmt::format("offsets {}, expected {}", got_offsets, ref_offsets));
  if (got_token.size() != ref_token.size())
    return result(check, Verdict::fail, fmt::format("{} rows, expected {}", got_token.size(), ref_token.size()));
  for (std::size_t e = 0; e + 1 < ref_offsets.size(); ++e) {
    std::vector<std::int64_t> a(got_token.begin() + ref_offsets[e], got_token.begin() + ref_offsets[e + 1]);
    std::vector<std::int64_t> b(ref_token.begin() + ref_offsets[e], ref_token.begin() + ref_offsets[e + 1]);
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    if (a != b) return result(check, Verdict::fail, fmt::format("expert {} holds tokens {}, expected {}", e, a, b));
  }
  return result(check, Verdict::pass);
}

}  // namespace

CaseResult compare_case(const Case& c, const Produced& produced) {
  Context ctx{.c = c, .produced = produced};
  CaseResult res{.name = c.name};
  std::map<std::size_t, CheckResult> by_index;
  // Selections first: their ambiguous tokens are left out of everything else.
  for (int pass = 0; pass < 2; ++pass)
    for (std::size_t i = 0; i < c.checks.size(); ++i) {
      const Check& check = c.checks[i];
      if ((check.compare == "topk_set") != (pass == 0)) continue;
      const Tensor* out = ctx.output(check.tensor);
      if (out == nullptr) {
        by_index[i] = result(check, Verdict::not_supported);
      } else if (check.compare == "topk_set") {
        by_index[i] = check_topk_set(ctx, check, *out);
      } else if (check.compare == "bitwise") {
        by_index[i] = check_bitwise(ctx, check, *out);
      } else if (check.compare == "permutation") {
        by_index[i] = check_permutation(ctx, check, *out);
      } else {
        by_index[i] = check_values(ctx, check, *out);
      }
    }
  bool any_ran = false, any_fail = false, any_ambiguous = false;
  double tightest = std::numeric_limits<double>::infinity();
  for (auto& [i, r] : by_index) {
    any_ran = any_ran || r.verdict != Verdict::not_supported;
    any_fail = any_fail || r.verdict == Verdict::fail;
    any_ambiguous = any_ambiguous || r.verdict == Verdict::ambiguous;
    if (c.checks[i].compare == "allclose" && r.verdict != Verdict::not_supported) {
      res.worst = std::max(res.worst, r.worst);
      res.nmse = std::max(res.nmse, r.nmse);
      tightest = std::min(tightest, c.checks[i].rtol);
    }
    res.checks.push_back(std::move(r));
  }
  res.verdict = any_fail ? Verdict::fail
                : any_ambiguous ? Verdict::ambiguous
                : any_ran       ? Verdict::pass
                                : Verdict::not_supported;
  res.tolerance = std::isfinite(tightest) ? fmt::format("rtol {:.2g}", tightest) : "exact";
  return res;
}

}  // namespace moelab::golden
