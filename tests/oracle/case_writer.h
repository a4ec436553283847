// moelab/tests/oracle/case_writer.h — what the oracle's case dumpers share: the layout of a case
// file and the writer of a directory of cases with its manifest.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <vector>

namespace moelab::oracle {

using Json = nlohmann::ordered_json;

// One top-level key per line, each value compact: small files that still read well in a diff.
inline std::string one_key_per_line(const Json& j) {
  std::string text = "{\n";
  for (auto it = j.begin(); it != j.end(); ++it) {
    text += "  " + Json(it.key()).dump() + ": " + it.value().dump();
    text += std::next(it) == j.end() ? "\n" : ",\n";
  }
  return text + "}\n";
}

struct NamedCase {
  std::string name;           // the file is <name>.json
  std::function<Json()> run;  // computes the case (inputs, moelab's outputs)
};

// Writes every case and dir/manifest.json; returns the exit code (0, or 1 with a message).
inline int write_cases(const std::filesystem::path& dir, const std::string& generator,
                       const std::vector<NamedCase>& cases) {
  std::filesystem::create_directories(dir);
  Json manifest = {{"generator", generator}, {"cases", Json::array()}};
  auto write = [&](const std::filesystem::path& path, const std::string& text) {
    std::ofstream out(path);
    out << text;
    if (out) return true;
    std::fprintf(stderr, "%s: cannot write %s\n", generator.c_str(), path.c_str());
    return false;
  };
  for (const NamedCase& c : cases) {
    Json j;
    try {
      j = c.run();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s: case %s: %s\n", generator.c_str(), c.name.c_str(), e.what());
      return 1;
    }
    const std::string file = c.name + ".json";
    if (!write(dir / file, one_key_per_line(j))) return 1;
    manifest["cases"].push_back(file);
  }
  if (!write(dir / "manifest.json", manifest.dump(1) + "\n")) return 1;
  std::printf("%s: %zu cases written to %s\n", generator.c_str(), cases.size(), dir.c_str());
  return 0;
}

// main() of a dumper: `GENERATOR OUT_DIR`.
inline int dumper_main(int argc, char** argv, const std::string& generator,
                       const std::function<std::vector<NamedCase>()>& cases) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", generator.c_str());
    return 2;
  }
  try {
    return write_cases(argv[1], generator, cases());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", generator.c_str(), e.what());
    return 1;
  }
}

}  // namespace moelab::oracle
