// moelab/python/models.h — the objects behind moelab.Model and moelab.Trainer, shared by the binding
// files that run a model (bind_model.cpp: forward, route_text, trace_fault; bind_analysis.cpp:
// analyze_model).
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <vector>

#include "python/bind.h"
#include "reference/corpus.h"
#include "reference/model.h"
#include "reference/train.h"

namespace moelab::python {

// moelab.Model: a model to run (a checkpoint, an initialised model, or a trainer's snapshot).
struct PyModel {
  std::optional<std::filesystem::path> path;  // the checkpoint folder, if loaded from one
  std::optional<TrainConfig> config;          // how it was trained, if it was
  ModelConfig model;                          // as trained
  ModelConfig eval_model;                     // `model` without router noise: what runs
  ModelParams params;
  std::int64_t step = 0;
};

// moelab.Trainer: train.h's Trainer with the corpus and batch source it reads (which must outlive it;
// members are destroyed in reverse order, the trainer first).
struct PyTrainer {
  Corpus corpus;
  std::unique_ptr<CorpusBatchSource> data;
  py::object recorder;  // keeps the Recorder the trainer's events go to alive
  std::unique_ptr<Trainer> trainer;
};

// What a function that runs a model needs, from a Model or a Trainer (Error naming `name` otherwise).
struct ModelView {
  ModelConfig eval_model;                 // the configuration that runs (no router noise)
  const ModelParams* params = nullptr;    // owned by the Model or Trainer, which must outlive the view
  std::optional<TrainConfig> config;
};
ModelView model_view(py::handle model, std::string_view name = "model");

// `config` with every router's noise off (evaluation).
ModelConfig without_noise(ModelConfig config);
// The indices of the MoE blocks.
std::vector<int> moe_blocks(const ModelConfig& config);

}  // namespace moelab::python
