// moelab/reference/recorder.cpp — see recorder.h for the JSON lines format.
#include "reference/recorder.h"

#include "reference/error.h"
#include "reference/files.h"

#include <fmt/format.h>

#include <cmath>
#include <istream>
#include <limits>
#include <nlohmann/json.hpp>
#include <ostream>
#include <system_error>

namespace moelab {
namespace {

// ordered_json keeps keys in insertion order, so every line has the same key order.
using Json = nlohmann::ordered_json;

std::string shape_text(const std::array<std::int64_t, 2>& shape) {
  return fmt::format("[{}, {}]", shape[0], shape[1]);
}

// The checks shared by RecordedEvent::from (what a stage emits) and from_json_line (what a file
// holds), so that everything a recorder writes can be read back.
void validate(const RecordedEvent& e) {
  if (e.name.empty()) fail("name", "\"\"", "every event needs a name");
  const auto where = [&e](std::string_view what) {
    return fmt::format("event \"{}\": {}", e.name, what);
  };
  const std::int64_t rows = e.shape[0];
  const std::int64_t cols = e.shape[1];
  if (e.layer < -1) fail(where("layer"), e.layer, "must be >= -1 (-1 = not inside a layer)");
  if (e.step < -1) fail(where("step"), e.step, "must be >= -1 (-1 = not training)");
  if (rows < 0 || cols < 0) fail(where("shape"), shape_text(e.shape), "must be non-negative");
  if (cols != 0 && rows > std::numeric_limits<std::int64_t>::max() / cols) {
    fail(where("shape"), shape_text(e.shape), "rows * cols overflows");
  }
  const auto count = static_cast<std::uint64_t>(rows * cols);
  const auto rule = [&] {
    return fmt::format("must be 0 or rows * cols = {} for shape {}", count, shape_text(e.shape));
  };
  if (!e.values.empty() && e.values.size() != count) {
    fail(where("values count"), e.values.size(), rule());
  }
  if (!e.ids.empty() && e.ids.size() != count) fail(where("ids count"), e.ids.size(), rule());
  std::set<std::string_view> keys;
  for (const auto& stat_pair : e.stats) {
    if (stat_pair.first.empty()) fail(where("stat key"), "\"\"", "must not be empty");
    if (!keys.insert(stat_pair.first).second) {
      fail(where("stat key"), stat_pair.first, "appears twice; keys must be unique");
    }
  }
}

// A JSON value for an error message, cut short: a values array can be megabytes.
std::string brief(const Json& j) {
  std::string s = j.dump(-1, ' ', false, Json::error_handler_t::replace);
  constexpr std::size_t kMax = 60;
  if (s.size() > kMax) s = s.substr(0, kMax - 3) + "...";
  return s;
}

const Json& field(const Json& object, const char* key) {
  const auto it = object.find(key);
  if (it == object.end()) throw Error(fmt::format("missing field \"{}\"", key));
  return *it;
}

// A number, or one of the strings "nan", "inf", "-inf". `what` names the field for errors.
template <typename What>
double number_from_json(const Json& j, What&& what) {
  if (j.is_number()) return j.get<double>();
  if (j.is_string()) {
    const std::string& s = j.get_ref<const std::string&>();
    if (s == "nan") return std::numeric_limits<double>::quiet_NaN();
    if (s == "inf") return std::numeric_limits<double>::infinity();
    if (s == "-inf") return -std::numeric_limits<double>::infinity();
  }
  fail(what(), brief(j), R"(must be a number or one of "nan", "inf", "-inf")");
}

// An integer in [lo, hi]; 3.0 is not an integer here (JSON writers keep the distinction).
template <typename What>
std::int64_t integer_from_json(const Json& j, std::int64_t lo, std::int64_t hi, What&& what) {
  if (j.is_number_unsigned()) {
    const auto u = j.get<std::uint64_t>();
    if (u <= static_cast<std::uint64_t>(hi)) return static_cast<std::int64_t>(u);
  } else if (j.is_number_integer()) {
    const auto v = j.get<std::int64_t>();
    if (v >= lo && v <= hi) return v;
  }
  fail(what(), brief(j), fmt::format("must be an integer in [{}, {}]", lo, hi));
}

template <typename T>
constexpr std::int64_t lowest() {
  return std::numeric_limits<T>::min();
}
template <typename T>
constexpr std::int64_t highest() {
  return std::numeric_limits<T>::max();
}

}  // namespace

nlohmann::ordered_json json_number(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  return v;
}

namespace {
nlohmann::ordered_json softmax_json(const LowpSoftmax& r) {
  nlohmann::ordered_json j = {{"shifted", nlohmann::ordered_json::array()},
                              {"exps", nlohmann::ordered_json::array()},
                              {"probs", nlohmann::ordered_json::array()}};
  for (std::size_t i = 0; i < r.probs.size(); ++i) {
    j["shifted"].push_back(json_number(r.shifted[i]));
    j["exps"].push_back(json_number(r.exps[i]));
    j["probs"].push_back(json_number(r.probs[i]));
  }
  j["sum"] = json_number(r.sum);
  j["overflow_count"] = r.overflow_count;
  j["nan_count"] = r.nan_count;
  j["overflowed"] = r.overflowed();
  return j;
}
}  // namespace

nlohmann::ordered_json softmax_in_format_json(const std::vector<float>& logits, Format format, const LowpSoftmax& naive,
                                              const LowpSoftmax& stable) {
  nlohmann::ordered_json doc = {{"dtype", format_name(format)},
                                {"logits", nlohmann::ordered_json::array()},
                                {"rounded_logits", nlohmann::ordered_json::array()}};
  for (std::size_t i = 0; i < logits.size(); ++i) {
    doc["logits"].push_back(json_number(logits[i]));
    doc["rounded_logits"].push_back(json_number(naive.logits[i]));
  }
  doc["naive"] = softmax_json(naive);
  doc["stable"] = softmax_json(stable);
  return doc;
}

// --- RecordedEvent ------------------------------------------------------------------------------

bool RecordedEvent::has_stat(std::string_view key) const {
  for (const auto& stat_pair : stats) {
    if (stat_pair.first == key) return true;
  }
  return false;
}

double RecordedEvent::stat(std::string_view key) const {
  for (const auto& stat_pair : stats) {
    if (stat_pair.first == key) return stat_pair.second;
  }
  std::string known;
  for (const auto& stat_pair : stats) known += (known.empty() ? "" : ", ") + stat_pair.first;
  fail(fmt::format("event \"{}\": stat", name), key,
       fmt::format("no such stat (it has: {})", known.empty() ? "none" : known));
}

RecordedEvent RecordedEvent::from(const Event& event) {
  RecordedEvent r;
  r.name = std::string(event.name);
  r.layer = event.layer;
  r.step = event.step;
  r.shape = event.shape;
  if (!event.f32.empty() && !event.f64.empty()) {
    fail(fmt::format("event \"{}\": f32 and f64", r.name), "both non-empty",
         "an event carries float32 or float64 values, not both");
  }
  // Widening float -> double is exact, so float bits survive the copy.
  if (!event.f32.empty()) r.values.assign(event.f32.begin(), event.f32.end());
  if (!event.f64.empty()) r.values.assign(event.f64.begin(), event.f64.end());
  r.ids.assign(event.i32.begin(), event.i32.end());
  r.stats.reserve(event.stats.size());
  for (const Stat& s : event.stats) r.stats.emplace_back(std::string(s.key), s.value);
  validate(r);
  return r;
}

// --- MemoryRecorder -----------------------------------------------------------------------------

MemoryRecorder::MemoryRecorder(std::initializer_list<std::string_view> names) {
  for (std::string_view n : names) names_.emplace(n);
}

void MemoryRecorder::on_event(const Event& event) {
  if (!names_.empty() && !names_.contains(event.name)) return;
  RecordedEvent copy = RecordedEvent::from(event);  // copy outside the lock
  const std::lock_guard<std::mutex> lock(mutex_);
  events_.push_back(std::move(copy));
}

std::vector<RecordedEvent> MemoryRecorder::snapshot() const {
  const std::lock_guard<std::mutex> lock(mutex_);
  return events_;
}

std::size_t MemoryRecorder::size() const {
  const std::lock_guard<std::mutex> lock(mutex_);
  return events_.size();
}

std::size_t MemoryRecorder::count(std::string_view name) const {
  const std::lock_guard<std::mutex> lock(mutex_);
  std::size_t n = 0;
  for (const RecordedEvent& e : events_) n += e.name == name ? 1 : 0;
  return n;
}

RecordedEvent MemoryRecorder::last(std::string_view name) const {
  const std::lock_guard<std::mutex> lock(mutex_);
  for (auto it = events_.rbegin(); it != events_.rend(); ++it) {
    if (it->name == name) return *it;
  }
  fail("event name", name, fmt::format("no such event was recorded ({} events in all)",
                                       events_.size()));
}

void MemoryRecorder::clear() {
  const std::lock_guard<std::mutex> lock(mutex_);
  events_.clear();
}

// --- JSON lines ---------------------------------------------------------------------------------

std::string to_json_line(const RecordedEvent& event) {
  Json values = Json::array();
  values.get_ref<Json::array_t&>().reserve(event.values.size());
  for (double v : event.values) values.push_back(json_number(v));
  Json stats = Json::object();
  for (const auto& [key, value] : event.stats) stats[key] = json_number(value);

  Json j = Json::object();
  j["name"] = event.name;
  j["layer"] = event.layer;
  j["step"] = event.step;
  j["shape"] = Json::array({event.shape[0], event.shape[1]});
  j["values"] = std::move(values);
  j["ids"] = event.ids;
  j["stats"] = std::move(stats);
  // nlohmann writes a double as the shortest decimal that reads back as the same double.
  return j.dump(-1, ' ', false, Json::error_handler_t::replace);
}

RecordedEvent from_json_line(std::string_view line) {
  Json j;
  try {
    j = Json::parse(line.begin(), line.end());
  } catch (const nlohmann::json::exception& e) {
    // "[json.exception.parse_error.101] parse error at line 1, column 5: <problem>": keep the
    // column and the problem (the line number is ours to give); drop the "[json.exception...]".
    std::string what = e.what();
    if (const std::size_t at = what.find("column"); at != std::string::npos) {
      what = what.substr(at);
    } else if (const std::size_t end = what.find("] "); end != std::string::npos) {
      what = what.substr(end + 2);
    }
    throw Error(fmt::format("not valid JSON: {}", what));
  }
  if (!j.is_object()) fail("event", brief(j), "must be a JSON object");

  RecordedEvent r;
  const Json& name = field(j, "name");
  if (!name.is_string()) fail("name", brief(name), "must be a string");
  r.name = name.get<std::string>();
  r.layer = static_cast<int>(integer_from_json(field(j, "layer"), lowest<int>(), highest<int>(),
                                               [] { return std::string("layer"); }));
  r.step = integer_from_json(field(j, "step"), lowest<std::int64_t>(), highest<std::int64_t>(),
                             [] { return std::string("step"); });

  const Json& shape = field(j, "shape");
  if (!shape.is_array() || shape.size() != 2) fail("shape", brief(shape), "must be [rows, cols]");
  for (std::size_t i = 0; i < 2; ++i) {
    r.shape[i] = integer_from_json(shape[i], 0, highest<std::int64_t>(),
                                   [i] { return fmt::format("shape[{}]", i); });
  }

  const Json& values = field(j, "values");
  if (!values.is_array()) fail("values", brief(values), "must be an array");
  r.values.reserve(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) {
    r.values.push_back(number_from_json(values[i], [i] { return fmt::format("values[{}]", i); }));
  }

  const Json& ids = field(j, "ids");
  if (!ids.is_array()) fail("ids", brief(ids), "must be an array");
  r.ids.reserve(ids.size());
  for (std::size_t i = 0; i < ids.size(); ++i) {
    r.ids.push_back(static_cast<std::int32_t>(
        integer_from_json(ids[i], lowest<std::int32_t>(), highest<std::int32_t>(),
                          [i] { return fmt::format("ids[{}]", i); })));
  }

  const Json& stats = field(j, "stats");
  if (!stats.is_object()) fail("stats", brief(stats), "must be an object");
  for (const auto& [key, value] : stats.items()) {
    r.stats.emplace_back(key, number_from_json(value, [&key = key] {
                           return fmt::format("stats[\"{}\"]", key);
                         }));
  }

  validate(r);
  return r;
}

std::vector<RecordedEvent> read_json_lines(std::istream& in) {
  std::vector<RecordedEvent> events;
  std::string line;
  std::int64_t number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank line
    try {
      events.push_back(from_json_line(line));
    } catch (const Error& e) {
      throw Error(fmt::format("line {}: {}", number, e.what()));
    }
  }
  if (in.bad()) throw Error(fmt::format("line {}: the stream failed while reading", number + 1));
  return events;
}

std::vector<RecordedEvent> read_json_lines_file(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) fail("path", path.string(), "no such file");
  if (std::filesystem::is_directory(path, ec)) fail("path", path.string(), "is a directory");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("path", path.string(), "cannot open for reading");
  try {
    return read_json_lines(in);
  } catch (const Error& e) {
    throw Error(fmt::format("{}: {}", path.string(), e.what()));
  }
}

// --- writers ------------------------------------------------------------------------------------

void JsonLinesWriter::on_event(const Event& event) {
  const std::string line = to_json_line(RecordedEvent::from(event));
  const std::lock_guard<std::mutex> lock(mutex_);
  out_ << line << '\n';
  if (!out_) throw Error(fmt::format("JSON lines stream: writing event \"{}\" failed", event.name));
}

JsonLinesFile::JsonLinesFile(std::filesystem::path path) : path_(std::move(path)) {
  temp_path_ = create_temp_file_beside(path_);
  out_.open(temp_path_, std::ios::binary | std::ios::trunc);
  if (!out_) {
    std::error_code ec;
    std::filesystem::remove(temp_path_, ec);
    fail("path", path_.string(), "cannot open the temporary file for writing");
  }
}

JsonLinesFile::~JsonLinesFile() {
  if (closed_) return;
  // Not closed: the output is incomplete. Drop it; whatever was at path_ stays.
  out_.close();
  std::error_code ec;
  std::filesystem::remove(temp_path_, ec);
}

void JsonLinesFile::on_event(const Event& event) {
  const std::string line = to_json_line(RecordedEvent::from(event));
  const std::lock_guard<std::mutex> lock(mutex_);
  if (closed_) fail("path", path_.string(), "the JSON lines file is closed; no more events");
  out_ << line << '\n';
  if (!out_) {
    fail("path", path_.string(), fmt::format("writing event \"{}\" failed", event.name));
  }
}

void JsonLinesFile::close() {
  const std::lock_guard<std::mutex> lock(mutex_);
  if (closed_) return;
  closed_ = true;
  out_.flush();
  const bool written = static_cast<bool>(out_);
  out_.close();
  if (!written || out_.fail()) {
    // Nothing is published: path_ stays as it was.
    std::error_code ec;
    std::filesystem::remove(temp_path_, ec);
    fail("path", path_.string(), "cannot publish the JSON lines file: writing failed");
  }
  publish_temp_file(temp_path_, path_);
}

// --- FanOut -------------------------------------------------------------------------------------

FanOut::FanOut(std::initializer_list<Observer*> observers) {
  for (Observer* o : observers) {
    if (o == nullptr) fail("FanOut observer", "null", "every observer must be non-null");
    observers_.push_back(o);
  }
}

void FanOut::on_event(const Event& event) {
  for (Observer* o : observers_) o->on_event(event);
}

}  // namespace moelab
