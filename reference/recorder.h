// moelab/reference/recorder.h — observers that keep events: in memory, or as JSON lines.
//
// An Event only views a stage's buffers; a RecordedEvent owns a copy, so it stays valid after the
// stage has moved on. The recorders are the one way events leave a stage: the viewer and the
// notebooks read a MemoryRecorder, the CLI writes JSON lines, the tests use both.
//
// JSON lines: one event per line, every key always present, in this order:
//   {"name":"scores","layer":-1,"step":-1,"shape":[2,3],"values":[...],"ids":[],"stats":{..}}
// - Empty arrays are written, not omitted: every line has the same schema, so a reader (jq, pandas,
//   read_json_lines) never needs defaults, and a missing key always means a damaged line.
// - values are doubles; float32 values are widened (exactly) and written as the shortest decimal
//   that reads back as the same double, so they narrow back to the same float bits. -0.0 and
//   subnormals are kept.
// - JSON has no NaN or infinity: they are written as the strings "nan", "inf", "-inf" (in values
//   and stats). Every NaN reads back as the quiet NaN (its sign and payload are not kept).
// - Blank lines are skipped; unknown keys are ignored (a newer writer may add some).
#pragma once

#include "reference/numerics.h"
#include "reference/observer.h"
#include "reference/types.h"

#include <nlohmann/json.hpp>

#include <array>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iosfwd>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace moelab {

// An owned copy of an Event.
struct RecordedEvent {
  std::string name;
  int layer = -1;
  std::int64_t step = -1;
  std::array<std::int64_t, 2> shape{0, 0};  // (rows, cols) of values or ids
  std::vector<double> values;               // (rows * cols) row-major, from f32 or f64; or empty
  std::vector<std::int32_t> ids;            // (rows * cols) row-major; or empty
  std::vector<std::pair<std::string, double>> stats;  // in the order the stage gave them

  // The first stat named `key`; throws Error naming the key (and the event) if there is none.
  double stat(std::string_view key) const;
  bool has_stat(std::string_view key) const;

  // Copies an Event. Throws Error if the event is malformed: an empty name, a negative shape, both
  // f32 and f64 given, or a non-empty array whose length is not rows * cols.
  static RecordedEvent from(const Event& event);
};

// Keeps copies of the events it is given, optionally only those with the given names.
// Thread-safe: a stage may record on one thread while the viewer takes snapshot()s on another.
class MemoryRecorder : public Observer {
 public:
  MemoryRecorder() = default;
  // Keeps only the events with these names; an empty list keeps everything.
  MemoryRecorder(std::initializer_list<std::string_view> names);

  void on_event(const Event& event) override;

  // The recorded events, by reference: only while no other thread records (tests, after a run).
  const std::vector<RecordedEvent>& events() const { return events_; }
  // A copy, safe to take while another thread records.
  std::vector<RecordedEvent> snapshot() const;
  std::size_t size() const;
  std::size_t count(std::string_view name) const;
  // The most recent event named `name`; throws Error if there is none.
  RecordedEvent last(std::string_view name) const;
  void clear();

 private:
  std::set<std::string, std::less<>> names_;  // empty = keep everything
  mutable std::mutex mutex_;
  std::vector<RecordedEvent> events_;
};

// JSON has no inf or NaN: a number as JSON, or the string "nan", "inf" or "-inf". Every JSON
// moelab writes (events, CLI output, golden manifests) uses this one rule.
nlohmann::ordered_json json_number(double value);

// The naive and the stable softmax of `logits` in `format` (numerics.h softmax_in_format, methods
// naive and stable) as JSON: {"dtype", "logits", "rounded_logits", "naive", "stable"}, each softmax
// {"shifted", "exps", "probs", "sum", "overflow_count", "nan_count", "overflowed"}. What `moelab
// numerics --json` prints and what the viewer's numerics panel shows (a test compares the two).
nlohmann::ordered_json softmax_in_format_json(const std::vector<float>& logits, Format format, const LowpSoftmax& naive,
                                              const LowpSoftmax& stable);

// A matrix as JSON, a list of rows; a vector as a flat list. Integers stay integers; floating-point
// values go through json_number.
template <typename Derived>
nlohmann::ordered_json json_list(const Eigen::DenseBase<Derived>& v) {
  nlohmann::ordered_json list = nlohmann::ordered_json::array();
  for (Index i = 0; i < v.size(); ++i) {
    if constexpr (std::is_integral_v<typename Derived::Scalar>) {
      list.push_back(v(i));
    } else {
      list.push_back(json_number(static_cast<double>(v(i))));
    }
  }
  return list;
}
template <typename Derived>
nlohmann::ordered_json json_rows(const Eigen::DenseBase<Derived>& m) {
  nlohmann::ordered_json rows = nlohmann::ordered_json::array();
  for (Index r = 0; r < m.rows(); ++r) rows.push_back(json_list(m.row(r)));
  return rows;
}

// One event as one line of JSON (without the newline), and back. from_json_line throws Error for
// malformed input, naming the problem (but not a line number: read_json_lines adds that).
std::string to_json_line(const RecordedEvent& event);
RecordedEvent from_json_line(std::string_view line);

// Writes each event as one line of JSON to a stream it does not own. Throws Error if the stream
// fails. Thread-safe (lines are never interleaved).
class JsonLinesWriter : public Observer {
 public:
  explicit JsonLinesWriter(std::ostream& out) : out_(out) {}
  void on_event(const Event& event) override;

 private:
  std::mutex mutex_;
  std::ostream& out_;
};

// Writes JSON lines to `path` atomically: into a temporary file beside it (".<name>.tmp.<pid>.<n>",
// same directory, so the rename cannot cross file systems), which close() flushes, syncs and
// renames onto `path`. Readers of `path` see the old file or the whole new one, never a part.
// Destroyed without close() (an exception unwound past it), it removes the temporary file and
// leaves whatever was at `path` untouched.
class JsonLinesFile : public Observer {
 public:
  // Throws Error naming the path if the temporary file cannot be created (no such directory, not
  // writable) or if `path` is a directory.
  explicit JsonLinesFile(std::filesystem::path path);
  ~JsonLinesFile() override;
  JsonLinesFile(const JsonLinesFile&) = delete;
  JsonLinesFile& operator=(const JsonLinesFile&) = delete;

  // Throws Error naming the path if writing fails or if the file is already closed.
  void on_event(const Event& event) override;
  // Publishes the file. Throws Error naming the path on failure (then nothing is published and the
  // temporary file is removed). A second call does nothing.
  void close();

  const std::filesystem::path& path() const { return path_; }
  const std::filesystem::path& temp_path() const { return temp_path_; }

 private:
  std::mutex mutex_;
  std::filesystem::path path_;
  std::filesystem::path temp_path_;
  std::ofstream out_;
  bool closed_ = false;
};

// Reads JSON lines back. Throws Error for malformed input: "line 3: <problem>" (and the path, for
// the file version). Never crashes, whatever the input.
std::vector<RecordedEvent> read_json_lines(std::istream& in);
std::vector<RecordedEvent> read_json_lines_file(const std::filesystem::path& path);

// Forwards each event to several observers (not owned), in order.
class FanOut : public Observer {
 public:
  FanOut() = default;
  // Throws Error if one of them is null.
  FanOut(std::initializer_list<Observer*> observers);
  // Not thread-safe: add observers before events start to flow.
  void add(Observer& observer) { observers_.push_back(&observer); }
  void on_event(const Event& event) override;

 private:
  std::vector<Observer*> observers_;
};

}  // namespace moelab
