// moelab/reference/error.h — the one error type, and the rule for its messages.
//
// Every check of user input names the field, the value and the rule, e.g.
//   "top_k = 9: must not exceed num_experts = 8"
// so that the user can fix the input without reading the source.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <string_view>

namespace moelab {

class Error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// Throws Error("<field> = <value>: <rule>").
template <typename T>
[[noreturn]] void fail(std::string_view field, const T& value, std::string_view rule) {
  throw Error(fmt::format("{} = {}: {}", field, value, rule));
}

// Throws unless `ok`; the message is as for fail().
template <typename T>
void require(bool ok, std::string_view field, const T& value, std::string_view rule) {
  if (!ok) fail(field, value, rule);
}

}  // namespace moelab
