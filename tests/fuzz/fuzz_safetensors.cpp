// libFuzzer target: the safetensors reader (runtime/safetensors.cpp) on arbitrary bytes. Every tensor that opens is
// read as stored and converted to F32 (the paths checkpoints and HF models take), bounded to 1 MiB per tensor so a
// valid header naming a huge tensor does not exhaust the fuzzer's memory.
#include <cstdint>

#include "fuzz_common.h"
#include "runtime/error.h"
#include "runtime/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = dpo::fuzz::write_input("safetensors", data, size);
  try {
    dpo::SafetensorsFile f(path);
    for (const auto& e : f.entries()) {
      if (e.end - e.begin > (1 << 20)) continue;
      try {
        f.read(e.name);
        f.read_as(e.name, dpo::DType::F32);
      } catch (const dpo::Error&) {
      }
    }
  } catch (const dpo::Error&) {
  }
  return 0;
}
