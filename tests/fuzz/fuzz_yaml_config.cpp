// libFuzzer target: the YAML training configuration (train/config.cpp: parsing, types, validation) on arbitrary
// bytes, for DPO and SFT runs.
#include <cstdint>

#include "fuzz_common.h"
#include "runtime/error.h"
#include "train/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = dpo::fuzz::write_input("yaml", data, size);
  for (dpo::RunKind kind : {dpo::RunKind::Dpo, dpo::RunKind::Sft}) {
    try {
      dpo::TrainConfig cfg = dpo::load_train_config(path, {}, kind);
      dpo::to_yaml(cfg);
    } catch (const dpo::Error&) {
    }
  }
  return 0;
}
