// Tests of the trainer (reference/train.h): bit-identical resume, checkpoints and every load error,
// atomic checkpoint folders, learning on a simple byte source, the balance modes, the metrics as
// JSON lines, and the configuration's JSON. A model of C = 16 keeps every test fast.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "reference/files.h"
#include "reference/safetensors.h"
#include "reference/train.h"
#include "tests/testing.h"

namespace moelab {
namespace {

namespace fs = std::filesystem;
using testing::error_of;

// Two domains of repeating text: domain 0 cycles "the cat sat on the mat. ", domain 1 counts
// "0123456789". Sequence b of a batch is domain b % 2 at an offset drawn from (seed, step, b).
class RepeatingSource : public BatchSource {
 public:
  RepeatingSource(Index batch_size, Index seq_len, std::uint64_t seed)
      : B_(batch_size), T_(seq_len), seed_(seed) {}
  Batch train_batch(std::int64_t step) const override { return make(hash64(seed_) + static_cast<std::uint64_t>(step)); }
  Batch val_batch(std::int64_t index) const override { return make(hash64(~seed_) + static_cast<std::uint64_t>(index)); }
  std::vector<std::string> domain_names() const override { return {"text", "digits"}; }

 private:
  Batch make(std::uint64_t seed) const {
    static const std::string texts[] = {"the cat sat on the mat. ", "0123456789"};
    Rng rng(hash64(seed));
    Batch b;
    b.batch_size = B_;
    b.seq_len = T_;
    for (Index s = 0; s < B_; ++s) {
      const std::string& text = texts[s % 2];
      const std::size_t offset = rng.next_u64() % text.size();
      for (Index t = 0; t < T_; ++t) {
        b.inputs.push_back(static_cast<unsigned char>(text[(offset + static_cast<std::size_t>(t)) % text.size()]));
        b.targets.push_back(static_cast<unsigned char>(text[(offset + static_cast<std::size_t>(t) + 1) % text.size()]));
        b.domains.push_back(static_cast<std::int32_t>(s % 2));
      }
    }
    return b;
  }
  Index B_, T_;
  std::uint64_t seed_;
};

// The tiny model at C = 16: 2 blocks of 2 heads, `preset`'s routing with experts of H = 32.
ModelConfig small_model(std::string_view preset = "mixtral") {
  ModelConfig m = model_config(preset);
  m.hidden_size = 16;
  m.n_heads = 2;
  m.n_layers = 2;
  m.intermediate_size = 64;
  m.moe.routing.router.hidden_size = 16;
  m.moe.expert.hidden_size = 16;
  m.moe.expert.intermediate_size = 32;
  if (m.moe.shared.count > 0) m.moe.shared.intermediate_size = 32;
  if (m.moe_layout == MoeLayout::first_k_dense) m.first_k_dense_replace = 1;
  m.validate();
  return m;
}

TrainConfig small_config(std::string_view preset = "mixtral", BalanceMode balance = BalanceMode::preset) {
  TrainConfig c;
  c.model_name = std::string(preset);
  c.model = small_model(preset);
  c.balance = balance;
  c.bias_update_rate = 0.01;
  c.batch_size = 4;
  c.seq_len = 16;
  c.micro_batches = 2;
  c.steps = 6;
  c.seed = 7;
  c.adamw.lr = 1e-2;
  c.min_lr = 1e-3;
  c.warmup_steps = 2;
  c.eval_every = 0;
  c.eval_batches = 2;
  c.checkpoint_every = 0;
  return c;
}

// A fresh folder under the temporary directory, removed at the end of the test.
class TempDir {
 public:
  explicit TempDir(std::string_view name)
      : path_(fs::temp_directory_path() / fmt::format("moelab_test_train_{}_{}", name, ::getpid())) {
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

std::uint32_t bits(float v) {
  std::uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

// Every parameter, buffer and AdamW state of two trainers, bit for bit.
void expect_same_state(const Trainer& a, const Trainer& b) {
  const auto pa = model_parameters(a.params(), a.model_config());
  const auto pb = model_parameters(b.params(), b.model_config());
  ASSERT_EQ(pa.size(), pb.size());
  auto same = [](const ConstNamedParamT<float>& x, const ConstNamedParamT<float>& y) {
    return x.matrix != nullptr ? testing::bitwise_equal(*x.matrix, *y.matrix) : testing::bitwise_equal(*x.vector, *y.vector);
  };
  for (std::size_t k = 0; k < pa.size(); ++k) EXPECT_TRUE(same(pa[k], pb[k])) << pa[k].name;
  const auto ba = model_buffers(a.params(), a.model_config());
  const auto bb = model_buffers(b.params(), b.model_config());
  ASSERT_EQ(ba.size(), bb.size());
  for (std::size_t k = 0; k < ba.size(); ++k) EXPECT_TRUE(same(ba[k], bb[k])) << ba[k].name;
  const auto& sa = a.optimizer().state();
  const auto& sb = b.optimizer().state();
  ASSERT_EQ(sa.size(), sb.size());
  for (std::size_t k = 0; k < sa.size(); ++k) {
    EXPECT_EQ(sa[k].step, sb[k].step);
    ASSERT_EQ(sa[k].exp_avg.size(), sb[k].exp_avg.size());
    for (std::size_t i = 0; i < sa[k].exp_avg.size(); ++i) {
      ASSERT_EQ(bits(sa[k].exp_avg[i]), bits(sb[k].exp_avg[i])) << k;
      ASSERT_EQ(bits(sa[k].exp_avg_sq[i]), bits(sb[k].exp_avg_sq[i])) << k;
    }
  }
  EXPECT_EQ(a.steps_done(), b.steps_done());
}

// N steps straight == k steps, save, load into a fresh Trainer, N - k steps: losses and every bit
// of the state. Mixtral with the selection bias (aux_free), and Switch (input jitter: the router
// noise stream; capacity 1.0: token dropping) in every other block.
TEST(TrainResume, IsBitIdentical) {
  for (const TrainConfig& config : {small_config("mixtral", BalanceMode::aux_free), small_config("switch")}) {
    SCOPED_TRACE(config.model_name);
    const RepeatingSource data(config.batch_size, config.seq_len, 1);
    Trainer straight(config, data);
    std::vector<double> losses;
    while (!straight.done()) losses.push_back(straight.step().loss);

    TempDir dir("resume");
    std::vector<double> resumed;
    {
      Trainer first(config, data);
      for (int i = 0; i < 3; ++i) resumed.push_back(first.step().loss);
      first.save(dir.path() / "ckpt");
    }
    Trainer second(config, data);
    second.load(dir.path() / "ckpt");
    EXPECT_EQ(second.steps_done(), 3);
    while (!second.done()) resumed.push_back(second.step().loss);
    EXPECT_EQ(resumed, losses);  // exact doubles
    expect_same_state(straight, second);
    EXPECT_EQ(straight.evaluate().loss, second.evaluate().loss);
  }
}

// The thread count is not part of the configuration: 1 and 3 threads give the same bits.
TEST(TrainResume, ThreadCountDoesNotChangeTheBits) {
  TrainConfig config = small_config();
  config.micro_batches = 4;
  config.steps = 3;
  const RepeatingSource data(config.batch_size, config.seq_len, 2);
  Trainer one(config, data, {.threads = 1});
  Trainer three(config, data, {.threads = 3});
  while (!one.done()) EXPECT_EQ(one.step().loss, three.step().loss);
  expect_same_state(one, three);
  const EvalMetrics a = one.evaluate(), b = three.evaluate();
  EXPECT_EQ(a.loss, b.loss);
  EXPECT_EQ(a.domain_loss, b.domain_loss);
}

TEST(TrainCheckpoint, FilesHaveHuggingFaceNamesAndRoundTrip) {
  const TrainConfig config = small_config("mixtral", BalanceMode::aux_free);
  const RepeatingSource data(config.batch_size, config.seq_len, 3);
  Trainer trainer(config, data, {.moelab_version = "9.9.9"});
  trainer.step();
  trainer.step();
  TempDir dir("files");
  const fs::path ckpt = dir.path() / "ckpt";
  trainer.save(ckpt);
  for (const char* f : {"model.safetensors", "optimizer.safetensors", "config.json", "trainer_state.json"})
    EXPECT_TRUE(fs::is_regular_file(ckpt / f)) << f;
  for (const fs::directory_entry& e : fs::directory_iterator(dir.path()))  // no temporary left behind
    EXPECT_EQ(e.path().filename(), "ckpt");

  const TensorFile model = read_safetensors(ckpt / "model.safetensors");
  EXPECT_EQ(model.metadata.at("format"), "pt");
  for (const char* name : {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                           "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.7.down_proj.weight",
                           "model.layers.0.mlp.gate.e_score_correction_bias", "model.norm.weight", "lm_head.weight"})
    EXPECT_TRUE(model.tensors.contains(name)) << name;
  const Tensor& router = model.tensors.at("model.layers.1.mlp.gate.weight");
  EXPECT_EQ(router.dtype, DType::f32);
  EXPECT_EQ(router.shape, (std::vector<std::int64_t>{8, 16}));
  EXPECT_EQ(model.tensors.size(), model_parameters(trainer.params(), trainer.model_config()).size() + 2);
  const TensorFile optimizer = read_safetensors(ckpt / "optimizer.safetensors");
  EXPECT_EQ(optimizer.tensors.at("lm_head.weight.exp_avg_sq").shape, (std::vector<std::int64_t>{256, 16}));
  EXPECT_EQ(tensor_values(optimizer.tensors.at("lm_head.weight.step")), std::vector<double>{2});

  const std::vector<std::uint8_t> bytes = read_file(ckpt / "config.json");
  const Json saved = Json::parse(bytes.begin(), bytes.end());
  EXPECT_EQ(saved["moelab_version"], "9.9.9");
  EXPECT_EQ(saved["model"], to_json(trainer.model_config()));
  EXPECT_EQ(saved["model"]["moe"]["routing"]["use_selection_bias"], true);
  EXPECT_EQ(to_json(read_checkpoint_config(ckpt)), to_json(config));

  Trainer fresh(config, data);
  fresh.load(ckpt);
  expect_same_state(trainer, fresh);
  // Saving again over a checkpoint replaces it; over a folder of something else, refuses.
  fresh.step();
  fresh.save(ckpt);
  Trainer again(config, data);
  again.load(ckpt);
  EXPECT_EQ(again.steps_done(), 3);
  fs::create_directories(dir.path() / "precious");
  write_file_atomically(dir.path() / "precious" / "notes.txt", std::string_view("keep me"));
  EXPECT_NE(error_of([&] { again.save(dir.path() / "precious"); }).find("is not a moelab checkpoint"), std::string::npos);
  EXPECT_TRUE(fs::exists(dir.path() / "precious" / "notes.txt"));
}

// Rewrites trainer_state.json's fingerprints to match the files as they are now, so that a test can
// present a checkpoint whose files are consistent but wrong inside.
void refingerprint(const fs::path& ckpt) {
  const std::vector<std::uint8_t> bytes = read_file(ckpt / "trainer_state.json");
  Json state = Json::parse(bytes.begin(), bytes.end());
  for (const char* f : {"model.safetensors", "optimizer.safetensors", "config.json"}) {
    const std::vector<std::uint8_t> content = read_file(ckpt / f);
    state["files"][f]["bytes"] = content.size();
    state["files"][f]["fnv1a64"] = fnv1a64(content);
  }
  write_file_atomically(ckpt / "trainer_state.json", state.dump(2));
}

void edit_tensors(const fs::path& file, const std::function<void(TensorFile&)>& edit) {
  TensorFile t = read_safetensors(file);
  edit(t);
  write_safetensors(file, t);
}

TEST(TrainCheckpoint, EveryLoadErrorNamesTheProblemAndChangesNothing) {
  const TrainConfig config = small_config();
  const RepeatingSource data(config.batch_size, config.seq_len, 4);
  TempDir dir("errors");
  Trainer source(config, data);
  source.step();
  const fs::path good = dir.path() / "good";
  source.save(good);

  int n = 0;
  // Copies the good checkpoint, applies `damage`, loads it into a fresh trainer: the error must
  // contain `message`, and the trainer must be as it was.
  auto load_damaged = [&](const std::function<void(const fs::path&)>& damage, const std::string& message,
                          const TrainConfig& into = small_config()) {
    const fs::path copy = dir.path() / fmt::format("bad{}", n++);
    fs::copy(good, copy);
    damage(copy);
    Trainer trainer(into, data);
    Trainer untouched(into, data);
    const std::string error = error_of([&] { trainer.load(copy); });
    EXPECT_NE(error.find(message), std::string::npos) << "expected \"" << message << "\" in: " << error;
    expect_same_state(trainer, untouched);
  };
  load_damaged([](const fs::path& c) { fs::remove(c / "optimizer.safetensors"); },
               "optimizer.safetensors: missing (not a complete moelab checkpoint)");
  load_damaged([](const fs::path& c) { fs::remove(c / "trainer_state.json"); }, "trainer_state.json: missing");
  load_damaged([](const fs::path& c) { write_file_atomically(c / "trainer_state.json", std::string_view("{\"step\": ")); },
               "trainer_state.json: not valid JSON");
  load_damaged(
      [](const fs::path& c) {
        write_file_atomically(c / "config.json", std::string_view("[1, 2"));
        refingerprint(c);
      },
      "config.json: not valid JSON");
  load_damaged(
      [](const fs::path& c) {
        std::vector<std::uint8_t> bytes = read_file(c / "model.safetensors");
        bytes.back() ^= 1;  // one bit of the last tensor's data
        write_file_atomically(c / "model.safetensors", bytes);
      },
      "the file was changed or replaced after the checkpoint was written");
  load_damaged(
      [](const fs::path& c) {
        edit_tensors(c / "model.safetensors", [](TensorFile& t) {
          t.tensors["model.layers.0.mlp.gate.weight"] = tensor_from(MatrixD(MatrixD::Zero(8, 32)), DType::f32);
        });
        refingerprint(c);
      },
      "model.safetensors: tensor 'model.layers.0.mlp.gate.weight': shape [8, 32]: must be [8, 16]");
  load_damaged(
      [](const fs::path& c) {
        edit_tensors(c / "model.safetensors", [](TensorFile& t) {
          t.tensors["model.final_norm.weight"] = t.tensors.at("model.norm.weight");
          t.tensors.erase("model.norm.weight");
        });
        refingerprint(c);
      },
      "model.safetensors: tensor 'model.norm.weight' is missing");
  load_damaged(
      [](const fs::path& c) {
        edit_tensors(c / "model.safetensors",
                     [](TensorFile& t) { t.tensors["extra.weight"] = tensor_from(MatrixD(MatrixD::Zero(1, 1)), DType::f32); });
        refingerprint(c);
      },
      "tensor 'extra.weight' is not part of this model's checkpoint");
  load_damaged(
      [](const fs::path& c) {
        edit_tensors(c / "model.safetensors", [](TensorFile& t) {
          t.tensors["model.norm.weight"] = tensor_from(MatrixD(MatrixD::Ones(16, 1)), DType::bf16);
          t.tensors["model.norm.weight"].shape = {16};
        });
        refingerprint(c);
      },
      "tensor 'model.norm.weight': dtype BF16: must be F32");
  load_damaged(
      [](const fs::path& c) {
        edit_tensors(c / "optimizer.safetensors", [](TensorFile& t) {
          std::int64_t wrong = 5;
          std::memcpy(t.tensors.at("model.norm.weight.step").data.data(), &wrong, sizeof(wrong));
        });
        refingerprint(c);
      },
      "tensor 'model.norm.weight.step' = 5: must equal the checkpoint's step = 1");
  TrainConfig other_seed = small_config();
  other_seed.seed = 8;
  load_damaged([](const fs::path&) {}, "seed = 7: this trainer's seed is 8", other_seed);
  TrainConfig other_lr = small_config();
  other_lr.adamw.lr = 2e-2;
  load_damaged([](const fs::path&) {}, "config.json: train.adamw = ", other_lr);
  TrainConfig longer = small_config();  // steps may differ: training longer than planned
  longer.steps = 20;
  Trainer extended(longer, data);
  extended.load(good);
  EXPECT_EQ(extended.steps_done(), 1);

  Trainer trainer(config, data);
  EXPECT_NE(error_of([&] { trainer.load(dir.path() / "nothing"); }).find("no such checkpoint folder"), std::string::npos);
}

// A crash during a save leaves a .tmp folder (and maybe no `latest`): it is never taken for a checkpoint.
TEST(TrainCheckpoint, LeftoverTemporaryFoldersAreIgnored) {
  const TrainConfig config = small_config();
  const RepeatingSource data(config.batch_size, config.seq_len, 5);
  TempDir run("atomic");
  Trainer trainer(config, data);
  trainer.step();
  EXPECT_EQ(save_checkpoint(trainer, run.path()), run.path() / "step-000001");
  trainer.step();
  save_checkpoint(trainer, run.path());
  EXPECT_EQ(read_file(run.path() / "latest"), std::vector<std::uint8_t>({'s', 't', 'e', 'p', '-', '0', '0', '0', '0', '0', '2', '\n'}));
  // What a crashed save of step 3 leaves: a temporary folder, complete or not.
  fs::copy(run.path() / "step-000002", run.path() / ".step-000003.tmp.12345");
  fs::create_directories(run.path() / "step-000004.tmp");
  fs::create_directories(run.path() / "step-000005");  // empty: no trainer_state.json
  EXPECT_EQ(find_checkpoint(run.path()), run.path() / "step-000002");
  fs::remove(run.path() / "latest");
  EXPECT_EQ(find_checkpoint(run.path()), run.path() / "step-000002");
  EXPECT_EQ(find_checkpoint(run.path() / "step-000001"), run.path() / "step-000001");
  write_file_atomically(run.path() / "latest", std::string_view("step-000009\n"));
  EXPECT_NE(error_of([&] { find_checkpoint(run.path()); }).find("names no checkpoint folder"), std::string::npos);
  TempDir empty("empty");
  EXPECT_NE(error_of([&] { find_checkpoint(empty.path()); }).find("no checkpoint here"), std::string::npos);
}

// load_checkpoint_model: what moelab analyze and route use. From a run folder it takes the latest
// checkpoint and gives the trainer's parameters and selection biases bit for bit, and the model
// without router noise for inference.
TEST(TrainCheckpoint, LoadCheckpointModelGivesTheTrainedParameters) {
  const TrainConfig config = small_config("switch", BalanceMode::aux_free);  // switch: router jitter
  const RepeatingSource data(config.batch_size, config.seq_len, 6);
  TempDir run("model");
  Trainer trainer(config, data);
  trainer.step();
  save_checkpoint(trainer, run.path());
  trainer.step();
  save_checkpoint(trainer, run.path());

  const CheckpointModel m = load_checkpoint_model(run.path());
  EXPECT_EQ(m.path, run.path() / "step-000002");
  EXPECT_EQ(m.step, 2);
  EXPECT_EQ(to_json(m.config), to_json(config));
  EXPECT_EQ(to_json(m.model), to_json(trainer.model_config()));
  ASSERT_NE(m.model.moe.routing.router.noise, RouterNoise::none);
  ModelConfig quiet = m.model;
  quiet.moe.routing.router.noise = RouterNoise::none;
  EXPECT_EQ(to_json(m.eval_model), to_json(quiet));
  auto tensors = [](const ModelParams& p, const ModelConfig& c) {
    std::vector<ConstNamedParamT<float>> all = model_parameters(p, c);
    for (ConstNamedParamT<float>& t : model_buffers(p, c)) all.push_back(std::move(t));
    return all;
  };
  const auto loaded = tensors(m.params, m.model), trained = tensors(trainer.params(), trainer.model_config());
  ASSERT_EQ(loaded.size(), trained.size());
  for (std::size_t k = 0; k < loaded.size(); ++k) {
    EXPECT_EQ(loaded[k].name, trained[k].name);
    EXPECT_TRUE(loaded[k].matrix != nullptr ? testing::bitwise_equal(*loaded[k].matrix, *trained[k].matrix)
                                            : testing::bitwise_equal(*loaded[k].vector, *trained[k].vector))
        << loaded[k].name;
  }
  EXPECT_EQ(load_checkpoint_model(run.path() / "step-000001").step, 1);
  EXPECT_NE(error_of([&] { load_checkpoint_model(run.path() / "nothing"); }).find("nothing: no such folder"),
            std::string::npos);
}

// Regressions. (1) A step-N folder with more digits than an int64 holds made find_checkpoint throw
// std::out_of_range (std::stoll), which no caller catches: it is not a checkpoint folder. (2) A
// config.json that claims 2^39 blocks (the JSON reader takes integers up to 2^40) made
// ModelConfig::validate count them one by one, and would then have had the Trainer allocate them:
// now n_moe_layers is a formula, and read_checkpoint_config refuses a model that model.safetensors
// is too small to hold.
TEST(TrainCheckpoint, AbsurdFolderNamesAndConfigsAreErrors) {
  const TrainConfig config = small_config();
  const RepeatingSource data(config.batch_size, config.seq_len, 7);
  TempDir run("absurd");
  Trainer trainer(config, data);
  trainer.step();
  save_checkpoint(trainer, run.path());
  fs::remove(run.path() / "latest");
  fs::copy(run.path() / "step-000001", run.path() / "step-99999999999999999999999");
  EXPECT_EQ(find_checkpoint(run.path()), run.path() / "step-000001");

  const fs::path bad = run.path() / "step-000001";
  const std::vector<std::uint8_t> bytes = read_file(bad / "config.json");
  Json j = Json::parse(bytes.begin(), bytes.end());
  j["model"]["n_layers"] = std::int64_t{1} << 39;
  j["train"]["model"]["n_layers"] = std::int64_t{1} << 39;
  write_file_atomically(bad / "config.json", j.dump(2));
  refingerprint(bad);
  const std::string error = error_of([&] { load_checkpoint_model(bad); });
  EXPECT_NE(error.find("model.safetensors: "), std::string::npos) << error;
  EXPECT_NE(error.find("cannot hold the model of"), std::string::npos) << error;
  EXPECT_NE(error_of([&] { read_checkpoint_config(bad); }).find("cannot hold the model"), std::string::npos);

  fs::remove(bad / "model.safetensors");
  EXPECT_NE(error_of([&] { read_checkpoint_config(bad); }).find("model.safetensors: missing"), std::string::npos);
}

TEST(TrainLearning, LossFallsWellBelowTheUnigramBaselineOnRepeatingBytes) {
  TrainConfig config = small_config();
  config.steps = 60;
  config.warmup_steps = 5;
  const RepeatingSource data(config.batch_size, config.seq_len, 6);
  Trainer trainer(config, data);
  const EvalMetrics before = trainer.evaluate();
  EXPECT_NEAR(before.loss, std::log(256.0), 0.1);  // small random weights: nearly uniform over bytes
  std::vector<double> losses;
  while (!trainer.done()) losses.push_back(trainer.step().loss);
  const EvalMetrics after = trainer.evaluate();
  const double baseline = unigram_baseline(data, data.train_unigram(256), config.eval_batches);
  EXPECT_GT(baseline, 2.0);  // 21 distinct bytes, unevenly frequent
  EXPECT_LT(baseline, std::log(21.0) + 0.1);
  EXPECT_LT(after.loss, 0.5 * baseline) << "val loss " << after.loss << ", unigram " << baseline;
  EXPECT_LT(losses.back(), 0.3 * losses.front());
  ASSERT_EQ(after.domain_loss.size(), 2u);
  EXPECT_EQ(after.domain_tokens, (std::vector<std::int64_t>{64, 64}));
  EXPECT_EQ(after.routing.size(), 2u);  // both blocks are MoE (Mixtral)
  EXPECT_EQ(after.routing[0].sum(), 2.0 * 128);  // k = 2 pairs per token
  for (double s : after.specialisation) EXPECT_GE(s, 0.0);
  EXPECT_EQ(trainer.evaluate().loss, after.loss);  // deterministic
}

TEST(TrainBalance, ModesChangeWhatTheyShould) {
  const RepeatingSource data(4, 16, 7);
  auto run = [&](TrainConfig c, int steps) {
    c.steps = steps;
    auto trainer = std::make_unique<Trainer>(c, data);
    std::vector<StepMetrics> m;
    while (!trainer->done()) m.push_back(trainer->step());
    return std::make_pair(std::move(trainer), m);
  };
  {  // aux: Mixtral's aux loss is there, no bias
    auto [t, m] = run(small_config("mixtral", BalanceMode::aux), 2);
    EXPECT_GT(m[0].aux, 0.0);
    EXPECT_EQ(m[0].z, 0.0);
    EXPECT_TRUE(model_buffers(t->params(), t->model_config()).empty());
  }
  {  // none: no aux loss, no bias, and the z-loss override adds a z-loss
    TrainConfig c = small_config("mixtral", BalanceMode::none);
    c.z_loss_coef = 0.01;
    auto [t, m] = run(c, 2);
    for (const StepMetrics& s : m) {
      EXPECT_EQ(s.aux, 0.0);
      EXPECT_GT(s.z, 0.0);
    }
    EXPECT_EQ(t->model_config().moe.routing.aux_loss, AuxLoss::none);
  }
  {  // aux_free: the biases move by +-gamma from 0, no aux loss; Mixtral's gating on scores
    auto [t, m] = run(small_config("mixtral", BalanceMode::aux_free), 3);
    EXPECT_EQ(m[0].aux, 0.0);
    const ModelConfig& mc = t->model_config();
    EXPECT_TRUE(mc.moe.routing.use_selection_bias);
    EXPECT_EQ(mc.moe.routing.gating.kind, GateKind::selected_scores);
    EXPECT_TRUE(mc.moe.routing.gating.renormalize);
    const auto biases = model_buffers(t->params(), mc);
    ASSERT_EQ(biases.size(), 2u);
    for (const auto& b : biases) {
      EXPECT_GT(b.vector->cwiseAbs().maxCoeff(), 0.0f) << b.name;
      EXPECT_LE(b.vector->cwiseAbs().maxCoeff(), 3 * 0.01f + 1e-6f) << b.name;
    }
  }
  {  // a capacity factor drops tokens; the loads add up to the routed pairs of the step
    TrainConfig c = small_config("mixtral", BalanceMode::none);
    c.capacity_factor = 0.5;
    auto [t, m] = run(c, 1);
    EXPECT_GT(m[0].dropped_fraction, 0.0);
    EXPECT_GE(m[0].load_imbalance, 1.0);
    ASSERT_EQ(m[0].load.size(), 2u);
    std::int64_t pairs = 0;
    for (std::int64_t n : m[0].load[0]) pairs += n;
    EXPECT_EQ(pairs, 4 * 16 * 2);
  }
  EXPECT_NE(error_of([] { small_config("expert_choice", BalanceMode::aux).validate(); }).find("balance = aux"),
            std::string::npos);
  TrainConfig dense = small_config();
  dense.model = tiny_dense();
  dense.balance = BalanceMode::aux_free;
  EXPECT_NE(error_of([&] { dense.validate(); }).find("balance = aux_free: model mixtral has no MoE block"),
            std::string::npos);
}

// logit_rms and logit_max_abs are those of the router logits the step's forward passes reported
// (every MoE block, every micro-batch), and a dense model has none.
TEST(TrainMetrics, LogitMagnitudeIsThatOfTheStepsRouterLogits) {
  const RepeatingSource data(4, 16, 7);
  TrainConfig config = small_config("switch");  // MoE in block 1 only
  config.steps = 2;
  MemoryRecorder logits({events::router_logits});
  Trainer trainer(config, data, {.events = &logits});
  trainer.step();
  logits.clear();
  const StepMetrics m = trainer.step();
  ASSERT_EQ(logits.count(events::router_logits), 2u);  // one MoE block x 2 micro-batches
  double squares = 0, max_abs = 0;
  std::size_t n = 0;
  for (const RecordedEvent& e : logits.events())
    for (double z : e.values) {
      squares += z * z;
      max_abs = std::max(max_abs, std::abs(z));
      ++n;
    }
  ASSERT_EQ(n, 2u * 2 * 16 * static_cast<std::size_t>(config.model.moe.num_experts()));
  EXPECT_GT(m.logit_max_abs, 0.0);
  EXPECT_DOUBLE_EQ(m.logit_max_abs, max_abs);
  EXPECT_NEAR(m.logit_rms, std::sqrt(squares / static_cast<double>(n)), 1e-12 * m.logit_rms);
  EXPECT_LT(m.logit_rms, m.logit_max_abs);

  TrainConfig dense = small_config();
  dense.model = small_model("mixtral");
  dense.model.moe_layout = MoeLayout::dense;
  dense.steps = 1;
  Trainer d(dense, data);
  const StepMetrics md = d.step();
  EXPECT_EQ(md.logit_rms, 0.0);
  EXPECT_EQ(md.logit_max_abs, 0.0);
}

TEST(TrainMetrics, JsonLinesParseBackAndAResumedRunContinuesThem) {
  TrainConfig config = small_config();
  config.steps = 4;
  config.eval_every = 2;
  config.checkpoint_every = 3;
  const RepeatingSource data(config.batch_size, config.seq_len, 8);
  TempDir run("metrics");
  std::vector<StepMetrics> steps;
  std::vector<std::int64_t> evals;
  std::vector<fs::path> checkpoints;
  MemoryRecorder seen;
  double baseline = 0;
  {
    Trainer trainer(config, data);
    RunCallbacks cb;
    cb.on_start = [&](double b) { baseline = b; };
    cb.on_step = [&](const StepMetrics& m) { steps.push_back(m); };
    cb.on_eval = [&](const EvalMetrics& e) { evals.push_back(e.step); };
    cb.on_checkpoint = [&](const fs::path& p) { checkpoints.push_back(p); };
    run_training(trainer, run.path(), cb, &seen);
  }
  EXPECT_EQ(evals, (std::vector<std::int64_t>{2, 4}));
  EXPECT_EQ(checkpoints, (std::vector<fs::path>{run.path() / "step-000003", run.path() / "step-000004"}));
  EXPECT_EQ(find_checkpoint(run.path()), run.path() / "step-000004");
  const std::vector<RecordedEvent> lines = read_json_lines_file(run.path() / "metrics.jsonl");
  EXPECT_EQ(lines.size(), 6u);
  EXPECT_EQ(seen.size(), 6u);
  std::vector<RecordedEvent> train_lines;
  for (const RecordedEvent& e : lines) {
    if (e.name == events::train_step) train_lines.push_back(e);
    if (e.name == events::eval) {
      EXPECT_EQ(e.stat("unigram_baseline"), baseline);
      EXPECT_TRUE(e.has_stat("specialisation_1"));
      EXPECT_EQ(e.shape, (std::array<std::int64_t, 2>{2, 1}));  // loss of each domain
    }
  }
  ASSERT_EQ(train_lines.size(), 4u);
  for (std::size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(train_lines[i].step, static_cast<std::int64_t>(i));
    EXPECT_EQ(train_lines[i].stat("loss"), steps[i].loss);  // exact through the JSON
    EXPECT_EQ(train_lines[i].stat("grad_norm"), steps[i].grad_norm);
    EXPECT_EQ(train_lines[i].stat("tokens"), static_cast<double>((i + 1) * 64));
    EXPECT_EQ(train_lines[i].shape, (std::array<std::int64_t, 2>{2, 8}));  // load: 2 MoE blocks, 8 experts
    EXPECT_EQ(train_lines[i].values[3], static_cast<double>(steps[i].load[0][3]));
  }

  // Resume from step 3 (the metrics file already holds step 3 and the eval at 4: both are redone)
  // and train to 6: the history is the uninterrupted one.
  config.steps = 6;
  Trainer resumed(config, data);
  resumed.load(run.path() / "step-000003");
  std::vector<double> later;
  RunCallbacks cb;
  cb.on_step = [&](const StepMetrics& m) { later.push_back(m.loss); };
  run_training(resumed, run.path(), cb);
  EXPECT_EQ(later.size(), 3u);
  EXPECT_EQ(later[0], steps[3].loss);
  std::vector<std::int64_t> train_steps, eval_steps;
  for (const RecordedEvent& e : read_json_lines_file(run.path() / "metrics.jsonl"))
    (e.name == events::train_step ? train_steps : eval_steps).push_back(e.step);
  EXPECT_EQ(train_steps, (std::vector<std::int64_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(eval_steps, (std::vector<std::int64_t>{2, 4, 6}));
}

TEST(TrainConfigJson, RoundTripsAndReportsErrors) {
  TrainConfig c = small_config("deepseek_v3", BalanceMode::aux);
  c.z_loss_coef = 0.001;
  c.capacity_factor = 1.25;
  c.seed = std::uint64_t{1} << 63;
  const Json j = to_json(c);
  EXPECT_EQ(j["z_loss_coef"], 0.001);
  EXPECT_TRUE(to_json(default_train_config("tiny_moe"))["capacity_factor"].is_null());
  EXPECT_EQ(to_json(train_config_from_json(j)), j);
  const TrainConfig back = train_config_from_json(j);
  EXPECT_EQ(back.seed, c.seed);
  EXPECT_EQ(back.balance, BalanceMode::aux);
  EXPECT_FALSE(back.model_config().moe.routing.use_selection_bias);
  EXPECT_FALSE(back.model_config().moe.capacity.dropless);

  auto error_with = [&](const char* key, const Json& value) {
    Json bad = j;
    bad[key] = value;
    return error_of([&] { train_config_from_json(bad); });
  };
  EXPECT_EQ(error_with("batch_size", "4"), "train.batch_size = \"4\": must be an integer below 2^62");
  EXPECT_EQ(error_with("balance", "sideways"), "train.balance = \"sideways\": must be one of preset, aux, aux_free, none");
  EXPECT_EQ(error_with("colour", 1), "train.colour = 1: is not a known field");
  EXPECT_EQ(error_with("micro_batches", 3), "train: batch_size = 4: must be a multiple of micro_batches = 3");
  EXPECT_EQ(error_with("min_lr", 1.0), "train: min_lr = 1: must be in [0, adamw.lr = 0.01]");
  Json missing = j;
  missing.erase("steps");
  EXPECT_EQ(error_of([&] { train_config_from_json(missing); }), "train.steps = (missing): is required");
  TrainConfig v = small_config();
  v.steps = 0;
  EXPECT_EQ(error_of([&] { v.validate(); }), "steps = 0: must be positive");
  v = small_config();
  v.warmup_steps = 100;  // longer than the run: the warm-up is cut at steps
  EXPECT_EQ(v.lr_schedule().warmup_steps, 6);
  v.capacity_factor = 0.0;
  EXPECT_EQ(error_of([&] { v.validate(); }), "capacity_factor = 0: must be finite and > 0");
}

TEST(TrainData, UnigramBaselineAndBatchChecks) {
  // A source of the 4 bytes "abcd" in turn: its unigram is uniform, the baseline log 4.
  class Cycle : public BatchSource {
   public:
    Batch train_batch(std::int64_t) const override { return make(); }
    Batch val_batch(std::int64_t) const override { return make(); }
    Batch make() const {
      Batch b;
      b.batch_size = 2;
      b.seq_len = 8;
      for (int n = 0; n < 16; ++n) {
        b.inputs.push_back('a' + n % 4);
        b.targets.push_back('a' + (n + 1) % 4);
      }
      return b;
    }
  } cycle;
  const std::vector<double> p = cycle.train_unigram(256);
  EXPECT_NEAR(p['a'], (64 + 0.5) / (256 + 128), 1e-15);
  EXPECT_NEAR(unigram_baseline(cycle, p, 3), -std::log((64 + 0.5) / (256 + 128)), 1e-12);

  TrainConfig c = small_config();
  c.batch_size = 3;  // the source gives B = 2
  c.micro_batches = 1;
  Trainer trainer(c, cycle);
  EXPECT_EQ(error_of([&] { trainer.step(); }), "train_batch(0) shape = (2, 8): must be (B, T) = (3, 16)");
  EXPECT_EQ(trainer.steps_done(), 0);
}

// Trainer::set_balance / set_z_loss_coef (the viewer's live controls): a change before step s trains
// steps s.. exactly as a trainer configured that way would; a checkpoint records the new configuration
// and resumes bit-identically; an invalid change is an Error that changes nothing.
TEST(TrainLive, SetBalanceChangesTheTrajectoryFromTheNextStepOn) {
  const RepeatingSource data(4, 16, 7);
  // Switching to aux_free before step 0 is the same run as starting with aux_free.
  TrainConfig free = small_config("mixtral", BalanceMode::aux_free);
  TrainConfig preset = small_config("mixtral", BalanceMode::preset);
  preset.bias_update_rate = 0.5;  // replaced by the strength below
  Trainer a(free, data), b(preset, data);
  b.set_balance(BalanceMode::aux_free, free.bias_update_rate);
  EXPECT_EQ(b.config().balance, BalanceMode::aux_free);
  EXPECT_EQ(b.config().bias_update_rate, free.bias_update_rate);
  EXPECT_TRUE(b.model_config().moe.routing.use_selection_bias);
  for (int s = 0; s < 3; ++s) {
    const StepMetrics ma = a.step(), mb = b.step();
    EXPECT_EQ(ma.loss, mb.loss) << s;
    EXPECT_EQ(mb.aux, 0.0);
  }
  expect_same_state(a, b);

  // Mid-run: aux -> none removes the balance loss and the bias from the next step on.
  b.set_balance(BalanceMode::none);
  EXPECT_TRUE(model_buffers(b.params(), b.model_config()).empty());
  EXPECT_EQ(b.model_config().moe.routing.aux_loss, AuxLoss::none);
  EXPECT_EQ(b.step().aux, 0.0);
  b.set_balance(BalanceMode::aux, 0.5);  // Mixtral's loss at 25 times its 0.02
  EXPECT_EQ(b.model_config().moe.routing.aux_loss_coef, 0.5);
  const StepMetrics strong = b.step();
  EXPECT_GT(strong.aux, 0.0);
  b.set_z_loss_coef(0.01);
  EXPECT_EQ(b.model_config().moe.routing.z_loss_coef, 0.01);
  EXPECT_GT(b.step().z, 0.0);
  EXPECT_EQ(b.steps_done(), 6);

  // The checkpoint records the configuration as it is now; a trainer built from it resumes exactly.
  TempDir dir("live");
  b.save(dir.path() / "ckpt");
  const TrainConfig saved = read_checkpoint_config(dir.path() / "ckpt");
  EXPECT_EQ(saved.balance, BalanceMode::aux);
  EXPECT_EQ(saved.model.moe.routing.aux_loss_coef, 0.5);
  ASSERT_TRUE(saved.z_loss_coef.has_value());
  EXPECT_EQ(*saved.z_loss_coef, 0.01);
  Trainer c(saved, data);
  c.load(dir.path() / "ckpt");
  EXPECT_EQ(b.step().loss, c.step().loss);
  expect_same_state(b, c);

  // Invalid changes name the field and leave the trainer as it was.
  TrainConfig ec = small_config("expert_choice", BalanceMode::preset);
  Trainer d(ec, data);
  EXPECT_NE(error_of([&] { d.set_balance(BalanceMode::aux_free); }).find("balance = aux_free"), std::string::npos);
  EXPECT_EQ(d.config().balance, BalanceMode::preset);
  EXPECT_NE(error_of([&] { b.set_z_loss_coef(-1.0); }).find("z_loss_coef = -1"), std::string::npos);
  EXPECT_EQ(*b.config().z_loss_coef, 0.01);
  EXPECT_NE(error_of([&] { b.set_balance(BalanceMode::none, 0.1); }).find("strength = 0.1"), std::string::npos);
  EXPECT_EQ(b.config().balance, BalanceMode::aux);
}

}  // namespace
}  // namespace moelab
