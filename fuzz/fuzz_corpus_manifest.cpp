// moelab/fuzz/fuzz_corpus_manifest.cpp — libFuzzer target for the corpus reader (reference/corpus.h,
// read_corpus): data/corpus/manifest.json and the split files it lists are input to `moelab train`
// and `moelab analyze`, and a user may edit, truncate or replace them.
//
// The harness writes a small corpus of the generated domains (build_corpus on an empty root, 1 KiB
// per domain) into a folder of its own. The first byte of an input picks what the rest replaces
// (its value mod 2):
//   0  manifest.json          read_corpus of the folder with this manifest and the intact files
//   1  train/arithmetic.txt   read_corpus with the manifest's size, fingerprint and document count of
//                             that file made to match, so that the document checks are reached
// Contract: read_corpus returns or throws moelab::Error; any other outcome (a crash, another
// exception, an ASan or UBSan report, a hang, a leak) is a finding. An accepted corpus must give
// batches: a CorpusSampler of each split (Error only for a split too short) and its first batch,
// whose inputs and targets are bytes of that split.
//
// Seeds (fuzz/corpus/corpus_manifest/) come from this file: MOELAB_FUZZ_WRITE_SEEDS=fuzz/corpus/corpus_manifest
// build-asan/bin/fuzz_corpus_manifest writes them (the manifest and the file, intact and broken) and exits.
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "reference/corpus.h"
#include "reference/error.h"
#include "reference/files.h"

namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "fuzz_corpus_manifest: %s\n", what.c_str());
  std::abort();
}

void write(const fs::path& path, std::span<const std::uint8_t> bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!f) finding("cannot write " + path.string());
}
std::span<const std::uint8_t> as_bytes(std::string_view s) {
  return {reinterpret_cast<const std::uint8_t*>(s.data()), s.size()};
}

constexpr const char* kFuzzedFile = "train/arithmetic.txt";

struct Harness {
  fs::path root;
  std::vector<std::uint8_t> manifest;  // as write_corpus wrote it
  std::vector<std::uint8_t> file;      // kFuzzedFile as written

  Harness() : root(fs::temp_directory_path() / ("moelab-fuzz-corpus-" + std::to_string(::getpid()))) {
    fs::remove_all(root);
    fs::create_directories(root / "empty");
    moelab::CorpusOptions options;
    options.root = root / "empty";
    options.max_domain_bytes = moelab::CorpusOptions::kMinDomainBytes;
    options.max_document_bytes = moelab::CorpusOptions::kMinDocumentBytes;
    options.moelab_version = "fuzz";
    moelab::write_corpus(moelab::build_corpus(options), root / "corpus");
    manifest = moelab::read_file(root / "corpus" / "manifest.json");
    file = moelab::read_file(root / "corpus" / kFuzzedFile);
  }
  ~Harness() {
    std::error_code ec;
    fs::remove_all(root, ec);
  }

  // The manifest with kFuzzedFile's size, fingerprint and document count those of `bytes`.
  std::string manifest_for(std::span<const std::uint8_t> bytes) const {
    Json m = Json::parse(manifest.begin(), manifest.end());
    const std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    for (Json& d : m["domains"]) {
      if (d["name"] != "arithmetic") continue;
      d["bytes"]["train"] = bytes.size();
      d["documents"]["train"] = std::count(text.begin(), text.end(), moelab::kDocumentSeparator);
      d["files"]["train"]["fingerprint"] = fmt::format("{:016x}", moelab::hash_text(text));
    }
    return m.dump(2) + "\n";
  }

  void read(std::span<const std::uint8_t> new_manifest, std::span<const std::uint8_t> new_file) const {
    write(root / "corpus" / "manifest.json", new_manifest);
    write(root / "corpus" / kFuzzedFile, new_file);
    const moelab::Corpus corpus = moelab::read_corpus(root / "corpus");
    for (moelab::Split split : {moelab::Split::train, moelab::Split::val}) {
      std::string bytes;  // every byte of the split, to check the batch against
      for (const moelab::Document& d : corpus.documents)
        if (d.split == split) bytes += d.text + moelab::kDocumentSeparator;
      try {
        const moelab::CorpusSampler sampler(corpus, split, 2, 8, 1);
        const moelab::Batch b = sampler.batch(0);
        if (b.inputs.size() != 16 || b.targets.size() != 16 || b.domains.size() != 16)
          finding("a batch of the wrong size");
        for (std::size_t n = 0; n < 16; ++n)
          if (bytes.find(static_cast<char>(b.inputs[n])) == std::string::npos) finding("a batch byte not in its split");
      } catch (const moelab::Error&) {  // no domain of the split has 9 bytes
      }
    }
  }
};

const Harness& harness() {
  static const Harness h;
  return h;
}

void write_seeds(const fs::path& out) {
  const Harness& h = harness();
  fs::create_directories(out);
  auto seed = [&](const std::string& name, int mode, std::span<const std::uint8_t> content) {
    std::vector<std::uint8_t> bytes{static_cast<std::uint8_t>(mode)};
    bytes.insert(bytes.end(), content.begin(), content.end());
    write(out / name, bytes);
  };
  // The harness's folder (with its pid) is in "root", "missing" and "notes", which the reader takes
  // as they are: the seeds say /fuzz instead, so that writing them again changes nothing.
  std::string text(h.manifest.begin(), h.manifest.end());
  const std::string folder = h.root.string();
  for (std::size_t at = 0; (at = text.find(folder, at)) != std::string::npos;) text.replace(at, folder.size(), "/fuzz");
  const Json manifest = Json::parse(text);
  seed("manifest_valid", 0, as_bytes(text));
  Json m = manifest;
  m["domains"][0]["bytes"]["train"] = 3;
  seed("manifest_wrong_size", 0, as_bytes(m.dump(2)));
  m = manifest;
  m["domains"][1]["name"] = m["domains"][0]["name"];
  seed("manifest_domain_twice", 0, as_bytes(m.dump(2)));
  m = manifest;
  m["domains"][0]["files"]["train"]["path"] = "../manifest.json";
  seed("manifest_path_outside", 0, as_bytes(m.dump(2)));
  m = manifest;
  m["domains"] = Json::array();
  seed("manifest_no_domains", 0, as_bytes(m.dump(2)));
  seed("manifest_not_json", 0, as_bytes("{\"format\": \"moelab-corpus\", "));
  seed("manifest_number_overflow", 0, as_bytes("{\"format\": 1e999}"));  // out_of_range.406, not a parse_error

  seed("file_valid", 1, h.file);
  seed("file_no_final_separator", 1, std::span<const std::uint8_t>(h.file).first(h.file.size() - 1));
  seed("file_invalid_utf8", 1, as_bytes("1+1=2\x1e\xc3\x28\x1e"));
  seed("file_empty_document", 1, as_bytes("1+1=2\x1e\x1e"));
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* out = std::getenv("MOELAB_FUZZ_WRITE_SEEDS")) {
    write_seeds(out);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const Harness& h = harness();
  const std::span<const std::uint8_t> content(data + 1, size - 1);
  try {
    if (data[0] % 2 == 0) {
      h.read(content, h.file);
    } else {
      h.read(as_bytes(h.manifest_for(content)), content);
    }
  } catch (const moelab::Error&) {
  }
  return 0;
}
