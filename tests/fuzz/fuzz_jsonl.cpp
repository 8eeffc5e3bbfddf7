// libFuzzer target: the preference and SFT JSONL readers (train/data.cpp) on arbitrary bytes, with the byte
// tokenizer, small length limits (so truncation paths run) and both malformed-record policies (throw, skip+count).
#include <cstdint>

#include "fuzz_common.h"
#include "runtime/error.h"
#include "train/data.h"
#include "train/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = dpo::fuzz::write_input("jsonl", data, size);
  static const dpo::ByteTokenizer tok;
  for (bool skip : {false, true}) {
    dpo::DataOptions opt;
    opt.max_length = 24;
    opt.max_prompt_length = 8;
    opt.skip_malformed = skip;
    dpo::LoadStats stats;
    try {
      dpo::load_preferences(path, tok, opt, &stats);
    } catch (const dpo::Error&) {
    }
    try {
      dpo::load_sft(path, tok, opt, &stats);
    } catch (const dpo::Error&) {
    }
  }
  return 0;
}
