// Tests of the instrumentation core: emit(), RecordedEvent, MemoryRecorder, JSON lines (writer,
// atomic file, reader), FanOut.
#include "reference/error.h"
#include "tests/testing.h"
#include "reference/observer.h"
#include "reference/recorder.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace moelab {
namespace {

namespace fs = std::filesystem;

// Counts events and keeps nothing.
class CountingObserver : public Observer {
 public:
  void on_event(const Event&) override { ++calls; }
  int calls = 0;
};

void send_f32(Observer& o, std::string_view name, std::array<std::int64_t, 2> shape,
              std::span<const float> values, std::span<const Stat> stats = {}, int layer = -1,
              std::int64_t step = -1) {
  o.on_event(Event{.name = name, .layer = layer, .step = step, .shape = shape, .f32 = values,
                   .stats = stats});
}

using moelab::testing::error_of;

std::string slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A fresh directory per test (ctest runs tests in parallel processes), removed afterwards.
class TempDir : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           fmt::format("moelab-{}-{}-{}", info->test_suite_name(), info->name(), ::getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const fs::directory_entry& e : fs::directory_iterator(dir_)) {
      names.push_back(e.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    return names;
  }
  fs::path dir_;
};

// --- emit ----------------------------------------------------------------------------------------

TEST(Emit, NullObserverNeverCallsTheLambda) {
  int calls = 0;
  emit(nullptr, [&](Observer&) { ++calls; });
  EXPECT_EQ(calls, 0);

  CountingObserver counter;
  emit(&counter, [&](Observer& o) {
    ++calls;
    o.on_event(Event{.name = events::scores});
  });
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(counter.calls, 1);
}

// --- RecordedEvent / MemoryRecorder --------------------------------------------------------------

TEST(MemoryRecorder, CopiesAreOwned) {
  std::vector<float> values = {1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f};
  std::vector<std::int32_t> ids = {7, 8};
  std::string key = "max";
  std::string name = "router_logits";
  MemoryRecorder rec;
  {
    const Stat stats[] = {{key, 6.0}};
    rec.on_event(Event{.name = name, .layer = 2, .step = 9, .shape = {2, 3}, .f32 = values,
                       .stats = stats});
    rec.on_event(Event{.name = events::topk_ids, .shape = {2, 1}, .i32 = ids});
  }
  // Overwrite everything the events viewed.
  std::fill(values.begin(), values.end(), -1.0f);
  std::fill(ids.begin(), ids.end(), -1);
  key = "xxx";
  name = "xxxxxxxxxxxxx";

  ASSERT_EQ(rec.size(), 2u);
  const RecordedEvent& logits = rec.events()[0];
  EXPECT_EQ(logits.name, "router_logits");
  EXPECT_EQ(logits.layer, 2);
  EXPECT_EQ(logits.step, 9);
  EXPECT_EQ(logits.shape, (std::array<std::int64_t, 2>{2, 3}));
  EXPECT_EQ(logits.values, (std::vector<double>{1, 2, 3, 4, 5, 6}));
  EXPECT_TRUE(logits.ids.empty());
  ASSERT_EQ(logits.stats.size(), 1u);
  EXPECT_EQ(logits.stats[0].first, "max");
  EXPECT_EQ(logits.stat("max"), 6.0);
  const RecordedEvent& topk = rec.events()[1];
  EXPECT_EQ(topk.ids, (std::vector<std::int32_t>{7, 8}));
  EXPECT_TRUE(topk.values.empty());
}

TEST(MemoryRecorder, FilterKeepsOnlyTheNamedEvents) {
  MemoryRecorder rec{events::scores, events::gates};
  CountingObserver all;
  for (std::string_view name : {events::router_logits, events::scores, events::gates,
                                events::scores, events::losses}) {
    rec.on_event(Event{.name = name});
    all.on_event(Event{.name = name});
  }
  EXPECT_EQ(all.calls, 5);
  EXPECT_EQ(rec.size(), 3u);
  EXPECT_EQ(rec.count(events::scores), 2u);
  EXPECT_EQ(rec.count(events::gates), 1u);
  EXPECT_EQ(rec.count(events::router_logits), 0u);
  EXPECT_EQ(rec.count(events::losses), 0u);

  MemoryRecorder everything;  // no filter
  everything.on_event(Event{.name = events::losses});
  everything.on_event(Event{.name = "my_own_event"});
  EXPECT_EQ(everything.size(), 2u);
}

TEST(MemoryRecorder, LastCountAndClear) {
  MemoryRecorder rec;
  for (std::int64_t step = 0; step < 3; ++step) {
    rec.on_event(Event{.name = events::losses, .step = step});
    rec.on_event(Event{.name = events::bias, .step = 10 + step});
  }
  EXPECT_EQ(rec.count(events::losses), 3u);
  EXPECT_EQ(rec.last(events::losses).step, 2);
  EXPECT_EQ(rec.last(events::bias).step, 12);
  const std::string message = error_of([&] { (void)rec.last(events::gates); });
  EXPECT_NE(message.find("gates"), std::string::npos) << message;

  rec.clear();
  EXPECT_EQ(rec.size(), 0u);
  EXPECT_EQ(rec.count(events::losses), 0u);
  EXPECT_NE(error_of([&] { (void)rec.last(events::losses); }), "");
}

TEST(RecordedEvent, StatLookup) {
  MemoryRecorder rec;
  const Stat stats[] = {{"overflow_count", 3.0}, {"nan_count", 0.0}, {"max", -2.5}};
  rec.on_event(Event{.name = events::numerics, .stats = stats});
  const RecordedEvent e = rec.last(events::numerics);
  EXPECT_EQ(e.stat("overflow_count"), 3.0);
  EXPECT_EQ(e.stat("nan_count"), 0.0);
  EXPECT_EQ(e.stat("max"), -2.5);
  EXPECT_TRUE(e.has_stat("max"));
  EXPECT_FALSE(e.has_stat("min"));
  // Stats keep the order the stage gave them.
  ASSERT_EQ(e.stats.size(), 3u);
  EXPECT_EQ(e.stats[0].first, "overflow_count");
  EXPECT_EQ(e.stats[2].first, "max");

  const std::string message = error_of([&] { (void)e.stat("min"); });
  EXPECT_NE(message.find("min"), std::string::npos) << message;
  EXPECT_NE(message.find("numerics"), std::string::npos) << message;
}

TEST(RecordedEvent, MalformedEventsAreRejected) {
  const float f[] = {1, 2, 3};
  const double d[] = {1, 2, 3};
  const Stat twice[] = {{"a", 1.0}, {"a", 2.0}};
  struct Case {
    Event event;
    std::string expected;
  };
  const Case cases[] = {
      {Event{.name = ""}, "name"},
      {Event{.name = "x", .shape = {2, 2}, .f32 = f}, "values count = 3"},
      {Event{.name = "x", .shape = {1, 3}, .f32 = f, .f64 = d}, "f32 and f64"},
      {Event{.name = "x", .shape = {-1, 3}}, "shape"},
      {Event{.name = "x", .layer = -2}, "layer = -2"},
      {Event{.name = "x", .stats = twice}, "stat key = a"},
  };
  for (const Case& c : cases) {
    const std::string message = error_of([&] { (void)RecordedEvent::from(c.event); });
    EXPECT_NE(message.find(c.expected), std::string::npos)
        << "expected '" << c.expected << "' in '" << message << "'";
  }
}

TEST(MemoryRecorder, SnapshotsWhileAnotherThreadRecords) {
  MemoryRecorder rec;
  constexpr int kEvents = 2000;
  std::atomic<bool> done{false};
  std::thread stage([&] {
    const float value[] = {0.5f};
    for (int i = 0; i < kEvents; ++i) {
      rec.on_event(Event{.name = events::scores, .step = i, .shape = {1, 1}, .f32 = value});
    }
    done = true;
  });
  std::size_t previous = 0;
  while (!done) {
    const std::vector<RecordedEvent> snap = rec.snapshot();
    ASSERT_GE(snap.size(), previous);
    for (std::size_t i = 0; i < snap.size(); ++i) {
      ASSERT_EQ(snap[i].step, static_cast<std::int64_t>(i));  // complete, in order
    }
    previous = snap.size();
  }
  stage.join();
  EXPECT_EQ(rec.size(), static_cast<std::size_t>(kEvents));
}

// --- JSON lines -------------------------------------------------------------------------------

TEST(JsonLines, LineFormatIsStable) {
  std::ostringstream out;
  JsonLinesWriter writer(out);
  const float values[] = {0.5f, std::numeric_limits<float>::quiet_NaN(), -0.0f,
                          -std::numeric_limits<float>::infinity()};
  const std::int32_t ids[] = {3, 1, 0, 2};
  const Stat stats[] = {{"max", std::numeric_limits<double>::infinity()}, {"count", 2.0}};
  writer.on_event(Event{.name = events::gates, .layer = 1, .step = 40, .shape = {2, 2},
                        .f32 = values, .i32 = ids, .stats = stats});
  writer.on_event(Event{.name = events::losses});
  EXPECT_EQ(out.str(),
            R"({"name":"gates","layer":1,"step":40,"shape":[2,2],"values":[0.5,"nan",-0.0,"-inf"],)"
            R"("ids":[3,1,0,2],"stats":{"max":"inf","count":2.0}})"
            "\n"
            R"({"name":"losses","layer":-1,"step":-1,"shape":[0,0],)"
            R"("values":[],"ids":[],"stats":{}})"
            "\n");
}

TEST(JsonLines, WriterReportsAFailedStream) {
  std::ostringstream out;
  JsonLinesWriter writer(out);
  out.setstate(std::ios::badbit);  // as after a full disk
  const std::string message = error_of([&] { writer.on_event(Event{.name = events::gates}); });
  EXPECT_NE(message.find("gates"), std::string::npos) << message;
}

TEST(JsonLines, RoundTripIsBitExact) {
  using F = std::numeric_limits<float>;
  using D = std::numeric_limits<double>;
  const std::vector<float> floats = {
      0.1f, 1.0f / 3.0f, -0.0f, 0.0f, F::denorm_min(), -F::denorm_min(), 1e-40f /* subnormal */,
      F::min(), F::max(), -F::max(), F::epsilon(), std::nextafter(1.0f, 2.0f), 16777217.0f,
      F::infinity(), -F::infinity(), F::quiet_NaN()};
  const std::vector<double> doubles = {0.1,       -0.0,        D::denorm_min(), 2.5e-310,
                                       D::max(),  D::min(),    1.0 / 3.0,       D::infinity(),
                                       -D::infinity(), D::quiet_NaN()};
  const std::vector<std::int32_t> ids = {std::numeric_limits<std::int32_t>::min(), -1, 0,
                                         std::numeric_limits<std::int32_t>::max()};
  const Stat stats[] = {{"nan", D::quiet_NaN()}, {"inf", D::infinity()},
                        {"neg_inf", -D::infinity()}, {"tiny", D::denorm_min()}, {"neg_zero", -0.0}};

  std::stringstream stream;
  JsonLinesWriter writer(stream);
  writer.on_event(Event{.name = events::router_logits, .layer = 3, .step = 1234567890123,
                        .shape = {4, 4}, .f32 = floats, .stats = stats});
  writer.on_event(Event{.name = events::scores, .shape = {10, 1}, .f64 = doubles});
  writer.on_event(Event{.name = events::topk_ids, .shape = {2, 2}, .i32 = ids});

  const std::vector<RecordedEvent> back = read_json_lines(stream);
  ASSERT_EQ(back.size(), 3u);

  const RecordedEvent& f = back[0];
  EXPECT_EQ(f.name, "router_logits");
  EXPECT_EQ(f.layer, 3);
  EXPECT_EQ(f.step, 1234567890123);
  EXPECT_EQ(f.shape, (std::array<std::int64_t, 2>{4, 4}));
  ASSERT_EQ(f.values.size(), floats.size());
  for (std::size_t i = 0; i < floats.size(); ++i) {
    const float got = static_cast<float>(f.values[i]);
    if (std::isnan(floats[i])) {
      // Every NaN comes back as the quiet NaN.
      EXPECT_EQ(std::bit_cast<std::uint32_t>(got), 0x7fc00000u) << "at " << i;
    } else {
      EXPECT_EQ(std::bit_cast<std::uint32_t>(got), std::bit_cast<std::uint32_t>(floats[i]))
          << "at " << i << ": " << floats[i];
    }
  }
  ASSERT_EQ(f.stats.size(), 5u);
  EXPECT_TRUE(std::isnan(f.stat("nan")));
  EXPECT_EQ(f.stat("inf"), D::infinity());
  EXPECT_EQ(f.stat("neg_inf"), -D::infinity());
  EXPECT_EQ(f.stat("tiny"), D::denorm_min());
  EXPECT_EQ(std::bit_cast<std::uint64_t>(f.stat("neg_zero")), std::bit_cast<std::uint64_t>(-0.0));
  EXPECT_EQ(f.stats[3].first, "tiny");  // order kept

  const RecordedEvent& d = back[1];
  ASSERT_EQ(d.values.size(), doubles.size());
  for (std::size_t i = 0; i + 1 < doubles.size(); ++i) {
    EXPECT_EQ(std::bit_cast<std::uint64_t>(d.values[i]), std::bit_cast<std::uint64_t>(doubles[i]))
        << "at " << i << ": " << doubles[i];
  }
  EXPECT_TRUE(std::isnan(d.values.back()));

  EXPECT_EQ(back[2].ids, ids);
  EXPECT_TRUE(back[2].values.empty());
}

TEST(JsonLines, MalformedLinesNameTheLineAndTheProblem) {
  const std::string good =
      R"({"name":"scores","layer":0,"step":1,"shape":[1,2],"values":[0.25,0.75],"ids":[],)"
      R"("stats":{}})";
  struct Case {
    std::string line;
    std::vector<std::string> expected;  // substrings of the message
  };
  const std::vector<Case> cases = {
      {R"({"name":"scores",)", {"not valid JSON"}},
      {"[1, 2]", {"event = [1,2]", "must be a JSON object"}},
      {R"({"name":"scores","layer":0,"step":1,"shape":[1,2],"ids":[],"stats":{}})",
       {R"(missing field "values")"}},
      {R"({"name":3,"layer":0,"step":1,"shape":[1,2],"values":[0,1],"ids":[],"stats":{}})",
       {"name = 3", "must be a string"}},
      {R"({"name":"s","layer":"x","step":1,"shape":[1,2],"values":[0,1],"ids":[],"stats":{}})",
       {R"(layer = "x")", "integer"}},
      {R"({"name":"s","layer":1.5,"step":1,"shape":[1,2],"values":[0,1],"ids":[],"stats":{}})",
       {"layer = 1.5", "integer"}},
      {R"({"name":"s","layer":0,"step":1,"shape":[1,2,3],"values":[],"ids":[],"stats":{}})",
       {"shape = [1,2,3]", "[rows, cols]"}},
      {R"({"name":"s","layer":0,"step":1,"shape":[-1,2],"values":[],"ids":[],"stats":{}})",
       {"shape[0] = -1"}},
      {R"({"name":"s","layer":0,"step":1,"shape":[2,3],"values":[1,2,3,4,5],"ids":[],"stats":{}})",
       {"values count = 5", "rows * cols = 6"}},
      {R"({"name":"s","layer":0,"step":1,"shape":[1,2],"values":[1,"one"],"ids":[],"stats":{}})",
       {R"(values[1] = "one")", R"("nan", "inf", "-inf")"}},
      {R"({"name":"s","layer":0,"step":1,"shape":[1,1],"values":[],"ids":[2147483648],"stats":{}})",
       {"ids[0] = 2147483648"}},
      {R"({"name":"s","layer":0,"step":1,"shape":[1,2],"values":[0,1],"ids":[],"stats":[]})",
       {"stats = []", "must be an object"}},
      {R"({"name":"s","layer":0,"step":1,"shape":[1,2],"values":[0,1],"ids":[],)"
       R"("stats":{"a":null}})",
       {R"(stats["a"] = null)"}},
      {R"({"name":"s","layer":0,"step":1,"shape":[4611686018427387904,4],"values":[],)"
       R"("ids":[],"stats":{}})",
       {"overflows"}},
      {R"({"name":"s","layer":0,"step":1,"shape":[1,1],"values":[1e400],"ids":[],"stats":{}})",
       {"not valid JSON"}},
  };
  for (const Case& c : cases) {
    // The bad line is line 4: a good line, a blank line, a good line, then the bad one.
    std::istringstream in(good + "\n\n" + good + "\n" + c.line + "\n" + good + "\n");
    const std::string message = error_of([&] { (void)read_json_lines(in); });
    EXPECT_EQ(message.rfind("line 4: ", 0), 0u) << message;
    for (const std::string& part : c.expected) {
      EXPECT_NE(message.find(part), std::string::npos)
          << "expected '" << part << "' in '" << message << "'";
    }
  }
  std::istringstream fine(good + "\r\n   \n" + good);  // CRLF, blank lines, no final newline
  EXPECT_EQ(read_json_lines(fine).size(), 2u);
}

// Not a fuzzer (one will be pointed at read_json_lines), but the cheap part of one: every prefix
// and many byte mutations of a valid file either read or throw moelab::Error; nothing else.
TEST(JsonLines, DamagedInputThrowsErrorOnly) {
  const std::string good =
      R"({"name":"scores","layer":0,"step":1,"shape":[1,2],"values":[0.25,"nan"],"ids":[1,2],)"
      R"("stats":{"min":0.25,"max":"inf"}})"
      "\n";
  std::mt19937 rng(20261123);
  const std::string alphabet = "{}[]\",:0123456789.-eE+nafitrul \\\n\x01\xff";
  std::vector<std::string> inputs;
  for (std::size_t n = 0; n <= good.size(); ++n) inputs.push_back(good.substr(0, n));
  for (int i = 0; i < 3000; ++i) {
    std::string s = good;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < edits; ++k) {
      const std::size_t at = rng() % s.size();
      const char c = alphabet[rng() % alphabet.size()];
      switch (rng() % 3) {
        case 0: s[at] = c; break;
        case 1: s.insert(s.begin() + static_cast<std::ptrdiff_t>(at), c); break;
        default: s.erase(at, 1); break;
      }
      if (s.empty()) s = "x";
    }
    inputs.push_back(s);
  }
  int parsed = 0;
  int rejected = 0;
  for (const std::string& s : inputs) {
    std::istringstream in(s);
    try {
      (void)read_json_lines(in);
      ++parsed;
    } catch (const Error&) {
      ++rejected;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "not a moelab::Error: " << e.what() << " for input: " << s;
    }
  }
  EXPECT_GT(rejected, 1000);
  EXPECT_GT(parsed, 1);  // the empty prefix and the whole line at least
}

// --- the atomic file -----------------------------------------------------------------------------

using JsonLinesFileTest = TempDir;

TEST_F(JsonLinesFileTest, CloseCreatesTheWholeFile) {
  const fs::path path = dir_ / "events.jsonl";
  const float values[] = {0.25f, 0.75f};
  {
    JsonLinesFile file(path);
    send_f32(file, events::scores, {1, 2}, values, {}, 0, 1);
    send_f32(file, events::scores, {1, 2}, values, {}, 0, 2);
    EXPECT_FALSE(fs::exists(path));  // nothing published before close()
    EXPECT_TRUE(fs::exists(file.temp_path()));
    EXPECT_EQ(file.temp_path().parent_path(), dir_);
    file.close();
    file.close();  // a second close does nothing
    EXPECT_NE(error_of([&] { send_f32(file, events::scores, {1, 2}, values); }), "");
  }
  EXPECT_EQ(entries(), std::vector<std::string>{"events.jsonl"});  // no temporary file left
  const std::vector<RecordedEvent> back = read_json_lines_file(path);
  ASSERT_EQ(back.size(), 2u);
  EXPECT_EQ(back[1].step, 2);
  EXPECT_EQ(back[1].values, (std::vector<double>{0.25, 0.75}));
}

TEST_F(JsonLinesFileTest, CloseReplacesAnExistingFile) {
  const fs::path path = dir_ / "events.jsonl";
  std::ofstream(path) << "old content\n";
  JsonLinesFile file(path);
  file.on_event(Event{.name = events::losses});
  EXPECT_EQ(slurp(path), "old content\n");  // untouched until close()
  file.close();
  EXPECT_EQ(read_json_lines_file(path).at(0).name, "losses");
  EXPECT_EQ(entries(), std::vector<std::string>{"events.jsonl"});
}

TEST_F(JsonLinesFileTest, WithoutCloseAnExistingFileSurvives) {
  const fs::path path = dir_ / "events.jsonl";
  std::ofstream(path) << "precious\n";
  try {
    JsonLinesFile file(path);
    file.on_event(Event{.name = events::losses});
    throw std::runtime_error("the run failed");  // unwinds past the file without close()
  } catch (const std::runtime_error&) {
  }
  EXPECT_EQ(slurp(path), "precious\n");
  EXPECT_EQ(entries(), std::vector<std::string>{"events.jsonl"});

  { JsonLinesFile file(dir_ / "new.jsonl"); }  // nothing existed: nothing is created
  EXPECT_EQ(entries(), std::vector<std::string>{"events.jsonl"});
}

TEST_F(JsonLinesFileTest, ErrorsNameThePath) {
  const fs::path missing_dir = dir_ / "no" / "such" / "dir" / "events.jsonl";
  std::string message = error_of([&] { JsonLinesFile file(missing_dir); });
  EXPECT_NE(message.find(missing_dir.string()), std::string::npos) << message;

  message = error_of([&] { JsonLinesFile file(dir_); });
  EXPECT_NE(message.find("directory"), std::string::npos) << message;

  // The directory vanishes before close(): nothing can be published.
  const fs::path sub = dir_ / "sub";
  fs::create_directory(sub);
  const fs::path path = sub / "events.jsonl";
  JsonLinesFile file(path);
  file.on_event(Event{.name = events::losses});
  fs::remove_all(sub);
  message = error_of([&] { file.close(); });
  EXPECT_NE(message.find(path.string()), std::string::npos) << message;
  EXPECT_FALSE(fs::exists(sub));

  message = error_of([&] { (void)read_json_lines_file(dir_ / "absent.jsonl"); });
  EXPECT_NE(message.find("absent.jsonl"), std::string::npos) << message;

  const fs::path bad = dir_ / "bad.jsonl";
  std::ofstream(bad) << "\n{oops\n";
  message = error_of([&] { (void)read_json_lines_file(bad); });
  EXPECT_NE(message.find("bad.jsonl: line 2: not valid JSON"), std::string::npos) << message;
}

// --- FanOut --------------------------------------------------------------------------------------

TEST(FanOut, ReachesEveryObserverInOrder) {
  MemoryRecorder scores_only{events::scores};
  MemoryRecorder everything;
  CountingObserver counter;
  std::ostringstream out;
  JsonLinesWriter writer(out);
  FanOut fan{&scores_only, &everything};
  fan.add(counter);
  fan.add(writer);
  fan.on_event(Event{.name = events::scores});
  fan.on_event(Event{.name = events::gates});
  EXPECT_EQ(scores_only.size(), 1u);
  EXPECT_EQ(everything.size(), 2u);
  EXPECT_EQ(counter.calls, 2);
  std::istringstream in(out.str());
  EXPECT_EQ(read_json_lines(in).size(), 2u);

  EXPECT_NE(error_of([&] { FanOut bad{&counter, nullptr}; }), "");
}

}  // namespace
}  // namespace moelab
