// Hugging Face tokenizer.json (the `tokenizers` library's format), BPE models only.
//
// Supported, as `tokenizers` 0.23 runs them (tests/test_tokenizer_json.cpp checks ids and decodings against
// tokenizers' own output, tests/fixtures/gen_tokenizers.py):
//   model          BPE: vocab, merges ("a b" strings or [a, b] pairs) applied by rank, ignore_merges (Llama 3),
//                  byte_fallback (<0xXX> tokens, Llama 2 / Mistral), unk_token and fuse_unk. dropout must be null
//                  or 0; continuing_subword_prefix and end_of_word_suffix must be null or empty.
//   added_tokens   split out of the text before normalization (normalized: false) or after it (normalized: true),
//                  leftmost-longest; lstrip / rstrip; `special` decides what decode(ids, Skip) drops.
//                  single_word: true is refused.
//   normalizer     NFC, NFD, NFKC, NFKD (utf8proc), Lowercase, Replace (String or Regex pattern), Prepend, Sequence.
//   pre_tokenizer  ByteLevel (add_prefix_space, use_regex with GPT-2's pattern), Split (String or Regex pattern,
//                  every behavior, invert), Metaspace (replacement, prepend_scheme always / first / never, split),
//                  Digits, Sequence.
//   decoder        ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence.
//   post_processor read and not applied: encode() is tokenizers' encode(text, add_special_tokens=False), so no
//                  BOS/EOS is added (the data loader appends EOS to completions itself).
// Regex patterns are Oniguruma's syntax in tokenizers; they are run with PCRE2 in UTF + UCP mode, with \s and \S
// widened to Oniguruma's whitespace set (which includes U+0085).
// Anything else -- another model type (WordPiece, Unigram, WordLevel), an unknown normalizer, pre-tokenizer or
// decoder type, a malformed field -- throws InputError naming the file and the JSON path of the part
// ("tok.json: model.type: unsupported model type 'Unigram' (supported: BPE)").
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "train/tokenizer.h"

namespace dpo {

// Which tokens decode() renders: all of them, or all but the added tokens marked special (tokenizers'
// skip_special_tokens).
enum class SpecialTokens { Keep, Skip };

class JsonTokenizer final : public Tokenizer {
 public:
  // Reads and checks `path`; InputError as described above.
  explicit JsonTokenizer(const std::string& path);
  ~JsonTokenizer() override;

  std::vector<int32_t> encode(std::string_view text) const override;
  // decode(ids) is decode(ids, SpecialTokens::Skip), so an EOS that is a special token renders as nothing.
  std::string decode(const std::vector<int32_t>& ids) const override;
  // tokenizers' decode(ids, skip_special_tokens): ids of no token (holes in the vocabulary) are skipped, as
  // tokenizers does; an id outside [0, vocab_size) throws dpo::Error.
  std::string decode(const std::vector<int32_t>& ids, SpecialTokens special) const;
  // One more than the largest id of the vocabulary and the added tokens.
  int64_t vocab_size() const override;
  // tokenizer.json does not say which token ends a sequence: it is the model's (config.json /
  // generation_config.json) or the eos_token_id key, set with set_eos_id; -1 until then.
  int32_t eos_id() const override;
  void set_eos_id(int32_t id);
  std::string name() const override;  // "tokenizer.json (<path>)"
  // The id of a token of the vocabulary or the added tokens, -1 if there is none.
  int32_t token_id(const std::string& token) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dpo
