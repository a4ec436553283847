// moelab/fuzz/fuzz_checkpoint.cpp — libFuzzer target for the checkpoint loader (reference/train.h):
// the files of a checkpoint folder are untrusted input to `moelab train --resume`, `moelab analyze`
// and `moelab route --checkpoint`.
//
// The first byte of an input picks the file (its value mod 5), the rest is that file's content:
//   0  config.json            read_checkpoint_config of a folder holding it beside a 64 MiB (sparse)
//                             model.safetensors; an accepted config must survive to_json and back
//   1  trainer_state.json     Trainer::load of an otherwise intact checkpoint of a small model
//   2  model.safetensors      the same, with trainer_state.json's size and fingerprint of the file
//   3  optimizer.safetensors  made to match, so that the name, dtype and shape checks are reached
//   4  latest                 find_checkpoint of a run folder holding step-000001: it must name a
//                             folder with trainer_state.json
// Contract: each call returns or throws moelab::Error; any other outcome (a crash, another
// exception, an ASan or UBSan report, a hang, a leak) is a finding. The loader reads files, so the
// harness writes them into a folder of its own under the temporary directory.
//
// Seeds (fuzz/corpus/checkpoint/) come from this file: MOELAB_FUZZ_WRITE_SEEDS=fuzz/corpus/checkpoint
// build-asan/bin/fuzz_checkpoint writes them (the small checkpoint's files, intact and broken) and exits.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "reference/error.h"
#include "reference/files.h"
#include "reference/train.h"

namespace {

namespace fs = std::filesystem;
using moelab::Json;

[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "fuzz_checkpoint: %s\n", what.c_str());
  std::abort();
}

// The harness's model: 1 block of C = 8, 2 heads, V = 16, 4 experts of H = 8, top-2 (Mixtral's
// routing), so that a checkpoint is a few KiB.
moelab::TrainConfig small_config() {
  moelab::TrainConfig c;
  c.model_name = "fuzz";
  moelab::ModelConfig& m = c.model;
  m = moelab::tiny_moe();
  m.vocab_size = 16;
  m.hidden_size = 8;
  m.n_heads = 2;
  m.n_layers = 1;
  m.moe.routing.router.hidden_size = 8;
  m.moe.routing.router.num_experts = 4;
  m.moe.expert.hidden_size = 8;
  m.moe.expert.intermediate_size = 8;
  c.batch_size = 2;
  c.seq_len = 4;
  c.micro_batches = 1;
  c.steps = 1;
  c.eval_batches = 1;
  return c;
}

// The trainer never trains: no batch is ever asked for.
class NoData : public moelab::BatchSource {
 public:
  moelab::Batch train_batch(std::int64_t) const override { finding("train_batch called"); }
  moelab::Batch val_batch(std::int64_t) const override { finding("val_batch called"); }
};

void write(const fs::path& path, std::span<const std::uint8_t> bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!f) finding("cannot write " + path.string());
}
std::span<const std::uint8_t> as_bytes(std::string_view s) {
  return {reinterpret_cast<const std::uint8_t*>(s.data()), s.size()};
}

constexpr const char* kFiles[] = {"config.json", "trainer_state.json", "model.safetensors", "optimizer.safetensors"};

struct Harness {
  fs::path root;
  moelab::TrainConfig config = small_config();
  NoData data;
  std::vector<std::uint8_t> good[4];  // the intact checkpoint's files, in kFiles order

  Harness() : root(fs::temp_directory_path() / ("moelab-fuzz-checkpoint-" + std::to_string(::getpid()))) {
    fs::remove_all(root);
    fs::create_directories(root / "config");
    fs::create_directories(root / "case");
    moelab::Trainer trainer(config, data, {.threads = 1, .moelab_version = "fuzz"});
    trainer.save(root / "run" / "step-000001");
    for (int f = 0; f < 4; ++f) good[f] = moelab::read_file(root / "run" / "step-000001" / kFiles[f]);
    // For config.json alone: weights of any model up to 64 MiB, as a hole (no disk, no writing).
    std::ofstream(root / "config" / "model.safetensors").close();
    fs::resize_file(root / "config" / "model.safetensors", std::uintmax_t{64} << 20);
  }
  ~Harness() {
    std::error_code ec;
    fs::remove_all(root, ec);
  }

  // trainer_state.json of the intact checkpoint, with file `f`'s size and fingerprint those of `bytes`.
  std::string state_for(int f, std::span<const std::uint8_t> bytes) const {
    Json state = Json::parse(good[1].begin(), good[1].end());
    state["files"][kFiles[f]]["bytes"] = bytes.size();
    state["files"][kFiles[f]]["fnv1a64"] = moelab::fnv1a64(bytes);
    return state.dump(2) + "\n";
  }

  void config_json(std::span<const std::uint8_t> input) const {
    write(root / "config" / "config.json", input);
    const moelab::TrainConfig c = moelab::read_checkpoint_config(root / "config");
    const Json j = moelab::to_json(c);
    if (moelab::to_json(moelab::train_config_from_json(j)) != j) finding("an accepted config does not round-trip");
  }

  void load(int f, std::span<const std::uint8_t> input) const {
    const fs::path dir = root / "case";
    for (int g = 0; g < 4; ++g) write(dir / kFiles[g], g == f ? input : std::span<const std::uint8_t>(good[g]));
    if (f >= 2) write(dir / kFiles[1], as_bytes(state_for(f, input)));
    moelab::Trainer trainer(config, data, {.threads = 1});
    trainer.load(dir);
    if (trainer.steps_done() < 0) finding("a negative step was accepted");
  }

  void latest(std::span<const std::uint8_t> input) const {
    write(root / "run" / "latest", input);
    const fs::path found = moelab::find_checkpoint(root / "run");
    if (!fs::is_regular_file(found / "trainer_state.json")) finding("find_checkpoint named " + found.string());
  }
};

const Harness& harness() {
  static const Harness h;
  return h;
}

// The seeds: for each mode, the intact file and a few that break one rule each.
void write_seeds(const fs::path& out) {
  const Harness& h = harness();
  fs::create_directories(out);
  auto seed = [&](const std::string& name, int mode, std::span<const std::uint8_t> content) {
    std::vector<std::uint8_t> bytes{static_cast<std::uint8_t>(mode)};
    bytes.insert(bytes.end(), content.begin(), content.end());
    write(out / name, bytes);
  };
  const Json config = Json::parse(h.good[0].begin(), h.good[0].end());
  seed("config_valid", 0, h.good[0]);
  Json c = config;
  c["train"]["model"]["moe"]["routing"]["top_k"] = 9;
  c["model"]["moe"]["routing"]["top_k"] = 9;
  seed("config_top_k_too_large", 0, as_bytes(c.dump(2)));
  c = config;
  c["model"]["n_layers"] = std::int64_t{1} << 39;
  c["train"]["model"]["n_layers"] = std::int64_t{1} << 39;
  seed("config_absurd_layers", 0, as_bytes(c.dump(2)));
  c = config;
  c["train"]["unknown"] = 1;
  seed("config_unknown_key", 0, as_bytes(c.dump(2)));
  seed("config_not_json", 0, as_bytes("{\"format\": "));

  seed("state_valid", 1, h.good[1]);
  Json s = Json::parse(h.good[1].begin(), h.good[1].end());
  s["step"] = 5;
  seed("state_wrong_step", 1, as_bytes(s.dump(2)));
  s = Json::parse(h.good[1].begin(), h.good[1].end());
  s["files"]["model.safetensors"]["fnv1a64"] = "0000000000000000";
  seed("state_wrong_fingerprint", 1, as_bytes(s.dump(2)));

  seed("model_valid", 2, h.good[2]);
  seed("model_truncated", 2, std::span<const std::uint8_t>(h.good[2]).first(h.good[2].size() / 2));
  seed("optimizer_valid", 3, h.good[3]);

  seed("latest_valid", 4, as_bytes("step-000001\n"));
  seed("latest_elsewhere", 4, as_bytes("../run/step-000001"));
  seed("latest_missing", 4, as_bytes("step-000009\n"));
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
    switch (data[0] % 5) {
      case 0: h.config_json(content); break;
      case 1: h.load(1, content); break;
      case 2: h.load(2, content); break;
      case 3: h.load(3, content); break;
      case 4: h.latest(content); break;
    }
  } catch (const moelab::Error&) {
  }
  return 0;
}
