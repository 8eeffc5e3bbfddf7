// The `dpo` command line. Exit codes: 0 success, 1 internal or library failure, 2 bad usage or bad input
// (flags, configs, data, checkpoints), with a message naming the file, line or key.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <filesystem>
#include <iostream>

#include "model/checkpoint.h"
#include "runtime/backend.h"

namespace {

constexpr const char* kVersion = "0.1.0";

int cmd_info(const std::string& dir) {
  auto be = dpo::make_cpu_backend();
  dpo::LoadReport report;
  auto model = dpo::load_gpt2_checkpoint(*be, dir, dpo::DType::F32, &report);
  const auto& c = model->config();
  std::printf("checkpoint   %s\n", dir.c_str());
  std::printf("model        gpt2\n");
  std::printf("n_layer      %lld\n", static_cast<long long>(c.n_layer));
  std::printf("n_head       %lld\n", static_cast<long long>(c.n_head));
  std::printf("n_embd       %lld\n", static_cast<long long>(c.n_embd));
  std::printf("vocab_size   %lld\n", static_cast<long long>(c.vocab_size));
  std::printf("n_positions  %lld\n", static_cast<long long>(c.max_seq_len));
  std::printf("parameters   %lld\n", static_cast<long long>(c.num_parameters()));
  for (const auto& n : report.ignored) std::printf("ignored      %s (buffer, not a parameter)\n", n.c_str());
  return 0;
}

int cmd_init(const std::string& out, const dpo::GPT2Config& cfg, uint64_t seed) {
  cfg.validate("dpo init");
  auto be = dpo::make_cpu_backend();
  dpo::GPT2 model(*be, cfg, dpo::DType::F32);
  dpo::Rng rng(seed);
  model.init_random(rng);
  dpo::save_gpt2_checkpoint(model, out);
  std::printf("wrote %s (GPT-2, %lld parameters, seed %llu)\n", out.c_str(),
              static_cast<long long>(cfg.num_parameters()), static_cast<unsigned long long>(seed));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"dpo: Direct Preference Optimization for GPT-2 models, in C++ and CUDA"};
  app.set_version_flag("--version", kVersion);
  app.require_subcommand(1);

  std::string info_dir;
  auto* info = app.add_subcommand("info", "Load and validate an HF-format GPT-2 checkpoint; print its shape");
  info->add_option("checkpoint", info_dir, "Directory with config.json and model.safetensors")->required();

  std::string init_out;
  dpo::GPT2Config cfg;
  uint64_t seed = 0;
  auto* init = app.add_subcommand("init", "Write a randomly initialised GPT-2 checkpoint in HF format");
  init->add_option("--out", init_out, "Output directory")->required();
  init->add_option("--n-layer", cfg.n_layer, "Transformer blocks")->capture_default_str();
  init->add_option("--n-head", cfg.n_head, "Attention heads")->capture_default_str();
  init->add_option("--n-embd", cfg.n_embd, "Width")->capture_default_str();
  init->add_option("--vocab-size", cfg.vocab_size, "Vocabulary size")->capture_default_str();
  init->add_option("--n-positions", cfg.max_seq_len, "Context length")->capture_default_str();
  init->add_option("--seed", seed, "RNG seed")->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }

  try {
    if (*info) return cmd_info(info_dir);
    if (*init) return cmd_init(init_out, cfg, seed);
  } catch (const dpo::InputError& e) {
    std::fprintf(stderr, "dpo: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dpo: internal error: %s\n", e.what());
    return 1;
  }
  return 0;
}
