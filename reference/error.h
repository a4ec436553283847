// moelab/reference/error.h — the one error type, and the rule for its messages.
//
// Every check of user input names the field, the value and the rule, e.g.
//   "top_k = 9: must not exceed num_experts = 8"
// so that the user can fix the input without reading the source.
#pragma once

#include <fmt/format.h>

#include <cstddef>
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

// "(rows, cols)" of a matrix, for messages.
template <typename M>
std::string shape_of(const M& m) {
  return fmt::format("({}, {})", m.rows(), m.cols());
}

// Throws "<field> = (r, c): must be <what> = (rows, cols)<note>" unless m is (rows, cols).
template <typename M>
void require_shape(const M& m, std::ptrdiff_t rows, std::ptrdiff_t cols, std::string_view field, std::string_view what,
                   std::string_view note = "") {
  if (m.rows() != rows || m.cols() != cols)
    fail(field, shape_of(m), fmt::format("must be {} = ({}, {}){}", what, rows, cols, note));
}

}  // namespace moelab
