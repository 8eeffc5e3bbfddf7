// Tokenizers: text <-> token ids.
//
// The trainer sees a tokenizer only through the `Tokenizer` interface. Two implementations: `ByteTokenizer` (the
// demo's: ids 0..255 are the raw bytes of the UTF-8 text, id 256 is end-of-sequence (EOS); vocab_size 257), and
// `JsonTokenizer` (train/tokenizer_json.h: HF tokenizer.json files, byte-level and SentencePiece-style BPE).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace dpo {

class Tokenizer {
 public:
  virtual ~Tokenizer();
  // Any byte string is accepted; validating UTF-8 is the caller's business (the data loaders do it).
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  // EOS renders as nothing (it is skipped and decoding continues after it), so decode(encode(s) + [eos]) == s.
  // An id outside [0, vocab_size) throws dpo::Error.
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual int32_t eos_id() const = 0;  // -1: not known (a tokenizer.json whose EOS the model has not named yet)
  virtual std::string name() const = 0;
};

// ids 0..255 = bytes, 256 = EOS; vocab_size 257; name "byte". encode never produces EOS.
class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr int32_t kEos = 256;
  static constexpr int64_t kVocab = 257;

  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int64_t vocab_size() const override { return kVocab; }
  int32_t eos_id() const override { return kEos; }
  std::string name() const override { return "byte"; }
};

// "byte" -> ByteTokenizer; the path of a file -> JsonTokenizer (train/tokenizer_json.h; its EOS is set by the
// caller). Anything else throws InputError naming the key 'tokenizer'.
std::unique_ptr<Tokenizer> make_tokenizer(const std::string& name);

// Strict UTF-8 (RFC 3629): rejects overlong forms (C0 80, E0 80 80, F0 80 80 80), surrogates (ED A0 80 ..
// ED BF BF), code points above U+10FFFF (F4 90 80 80, F5..FF lead bytes), stray continuation bytes and
// sequences truncated by the end of the string.
bool valid_utf8(std::string_view s);
// Byte offset of the first byte of the first invalid sequence, or std::string_view::npos if s is valid.
size_t utf8_first_invalid(std::string_view s);

}  // namespace dpo
