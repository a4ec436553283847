// `moelab numerics`: the low-precision formats, and a softmax computed in them.
//
//   moelab numerics                               table of every format
//   moelab numerics --dtype bf16                  that format only
//   moelab numerics --logits 128.5,1,0 --dtype bf16   naive and stable softmax side by side
//   moelab numerics --value 128.5 --dtype bf16    how a value is stored: bits, fields, spacing
#include <fmt/format.h>

#include <charconv>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "reference/error.h"
#include "reference/numerics.h"
#include "tools/commands.h"

namespace moelab::tools {
namespace {

using json = nlohmann::ordered_json;  // keys in the order written

struct NumericsOptions {
  std::string dtype;   // empty: every format (table, --value) or fp32 (--logits)
  std::string logits;  // comma-separated
  std::string value;
  bool json = false;
};

std::vector<Format> selected_formats(const std::string& dtype) {
  if (dtype.empty()) return {std::begin(kAllFormats), std::end(kAllFormats)};
  return {parse_format(dtype, "--dtype")};
}

json format_json(const FormatInfo& f) {
  return {{"name", f.name},
          {"bits", f.bits},
          {"exponent_bits", f.exponent_bits},
          {"mantissa_bits", f.mantissa_bits},
          {"bias", f.bias},
          {"has_inf", f.has_inf},
          {"max", f.max},
          {"min_normal", f.min_normal},
          {"min_subnormal", f.min_subnormal},
          {"epsilon", f.epsilon},
          {"max_exp_input", f.max_exp_input}};
}

void print_table(const std::vector<Format>& formats, bool as_json) {
  if (as_json) {
    json doc = {{"command", "numerics"}, {"formats", json::array()}};
    for (Format f : formats) doc["formats"].push_back(format_json(format_info(f)));
    fmt::print("{}\n", doc.dump(2));
    return;
  }
  fmt::print("{:<9} {:>4} {:>3} {:>4} {:>4}  {:>13} {:>13} {:>13} {:>11}  {:>3}  {}\n", "format", "bits", "exp",
             "man", "bias", "max", "min normal", "min subnormal", "epsilon", "inf", "largest x with finite exp(x)");
  for (Format f : formats) {
    const FormatInfo& i = format_info(f);
    fmt::print("{:<9} {:>4} {:>3} {:>4} {:>4}  {:>13.6g} {:>13.6g} {:>13.6g} {:>11.6g}  {:>3}  {:.4f}\n", i.name,
               i.bits, i.exponent_bits, i.mantissa_bits, i.bias, i.max, i.min_normal, i.min_subnormal, i.epsilon,
               i.has_inf ? "yes" : "no", i.max_exp_input);
  }
  fmt::print(
      "\nepsilon is the spacing just above 1.0; fp8_e4m3 (OCP E4M3FN) has no inf: overflow gives NaN.\n"
      "exp(x) beyond the last column rounds to inf (NaN in fp8_e4m3): a naive softmax of such a logit fails.\n");
}

std::string verdict(const LowpSoftmax& r) {
  if (!r.overflowed()) return "no overflow";
  return fmt::format("{} exponential(s) overflowed, {} probability(ies) NaN -> OVERFLOW", r.overflow_count,
                     r.nan_count);
}

void print_softmax(const std::vector<float>& logits, Format f, bool as_json) {
  const LowpSoftmax naive = softmax_in_format(logits, f, SoftmaxMethod::naive);
  const LowpSoftmax stable = softmax_in_format(logits, f, SoftmaxMethod::stable);
  if (as_json) {
    json doc = {{"command", "numerics"}};
    doc.update(softmax_in_format_json(logits, f, naive, stable));
    fmt::print("{}\n", doc.dump(2));
    return;
  }
  const FormatInfo& info = format_info(f);
  fmt::print("softmax of {} logits, every step in {} ({} exponent, {} mantissa bits; exp(x) overflows for x > {:.4f})\n\n",
             logits.size(), info.name, info.exponent_bits, info.mantissa_bits, info.max_exp_input);
  fmt::print("{:>5} {:>12} {:>12} | {:>12} {:>12} | {:>12} {:>12} {:>12}\n", "i", "logit",
             fmt::format("in {}", info.name), "naive exp", "naive p", "x - max", "stable exp", "stable p");
  for (std::size_t i = 0; i < logits.size(); ++i)
    fmt::print("{:>5} {:>12} {:>12} | {:>12} {:>12} | {:>12} {:>12} {:>12}\n", i, logits[i], naive.logits[i],
               naive.exps[i], naive.probs[i], stable.shifted[i], stable.exps[i], stable.probs[i]);
  fmt::print("{:>5} {:>12} {:>12} | {:>12} {:>12} | {:>12} {:>12} {:>12}\n\n", "sum", "", "", naive.sum, "", "",
             stable.sum, "");
  fmt::print("naive  (exp(x) / sum):             {}\n", verdict(naive));
  fmt::print("stable (exp(x - max) / sum):       {}\n", verdict(stable));
}

void print_value(const std::vector<float>& values, const std::vector<Format>& formats, bool as_json) {
  json doc = {{"command", "numerics"}, {"values", json::array()}};
  if (!as_json)
    fmt::print("{:>14} {:<9} {:>14} {:>10} {:>4} {:>8} {:>10} {:<9} {:>12}\n", "value", "format", "stored",
               "bits", "sign", "exponent", "mantissa", "class", "spacing");
  for (float x : values)
    for (Format f : formats) {
      const std::uint32_t bits = encode(x, f);
      const float stored = decode(bits, f);
      const Fields p = decompose(bits, f);
      const ValueClass c = classify(bits, f);
      const float spacing = std::isfinite(stored) ? ulp(stored, f) : NAN;
      if (as_json) {
        doc["values"].push_back({{"value", json_number(x)}, {"format", format_name(f)},
                                 {"stored", json_number(stored)}, {"bits", fmt::format("{:#x}", bits)},
                                 {"sign", p.sign}, {"exponent", p.exponent}, {"mantissa", p.mantissa},
                                 {"class", value_class_name(c)}, {"spacing", json_number(spacing)}});
      } else {
        fmt::print("{:>14} {:<9} {:>14} {:>#10x} {:>4} {:>8} {:>10} {:<9} {:>12}\n", x, format_name(f), stored,
                   bits, p.sign, p.exponent, p.mantissa, value_class_name(c), spacing);
      }
    }
  if (as_json) fmt::print("{}\n", doc.dump(2));
}

}  // namespace

void add_numerics_command(CLI::App& app) {
  auto options = std::make_shared<NumericsOptions>();
  CLI::App* cmd = app.add_subcommand("numerics", "Low-precision formats (bf16, fp16, fp8) and softmax overflow");
  cmd->add_option("--dtype", options->dtype, "fp32, bf16, fp16, fp8_e4m3 (e4m3, fp8) or fp8_e5m2 (e5m2)");
  CLI::Option* logits = cmd->add_option("--logits", options->logits, "comma-separated logits, e.g. 128.5,1,0");
  CLI::Option* value = cmd->add_option("--value", options->value, "comma-separated values to show as stored");
  logits->excludes(value);
  cmd->add_flag("--json", options->json, "print one JSON document instead of tables");
  cmd->callback([options, logits, value] {
    const NumericsOptions& o = *options;
    if (logits->count() > 0) {
      const Format f = o.dtype.empty() ? Format::fp32 : parse_format(o.dtype, "--dtype");
      print_softmax(parse_float32_list(o.logits, "--logits"), f, o.json);
    } else if (value->count() > 0) {
      print_value(parse_float32_list(o.value, "--value"), selected_formats(o.dtype), o.json);
    } else {
      print_table(selected_formats(o.dtype), o.json);
    }
  });
}

}  // namespace moelab::tools
