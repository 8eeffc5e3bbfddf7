#include "train/tokenizer.h"

#include <filesystem>

#include "runtime/error.h"
#include "train/tokenizer_json.h"

namespace dpo {

Tokenizer::~Tokenizer() = default;

std::vector<int32_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size());
  for (char c : text) ids.push_back(static_cast<int32_t>(static_cast<unsigned char>(c)));
  return ids;
}

std::string ByteTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  out.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    if (id == kEos) continue;
    if (id < 0 || id >= kEos)
      throw Error("byte tokenizer: id " + std::to_string(id) + " at index " + std::to_string(i) +
                  " is outside the vocabulary [0, " + std::to_string(kVocab) + ")");
    out.push_back(static_cast<char>(static_cast<unsigned char>(id)));
  }
  return out;
}

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& name) {
  if (name == "byte") return std::make_unique<ByteTokenizer>();
  std::error_code ec;
  if (!std::filesystem::is_regular_file(name, ec))
    throw InputError("key 'tokenizer': '" + name + "' is neither \"byte\" nor a tokenizer.json file");
  return std::make_unique<JsonTokenizer>(name);
}

size_t utf8_first_invalid(std::string_view s) {
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c == 0xE0) {
      len = 3, lo = 0xA0;  // no overlongs
    } else if (c == 0xED) {
      len = 3, hi = 0x9F;  // no surrogates U+D800..U+DFFF
    } else if (c >= 0xE1 && c <= 0xEF) {
      len = 3;
    } else if (c == 0xF0) {
      len = 4, lo = 0x90;  // no overlongs
    } else if (c >= 0xF1 && c <= 0xF3) {
      len = 4;
    } else if (c == 0xF4) {
      len = 4, hi = 0x8F;  // <= U+10FFFF
    } else {
      return i;  // stray continuation byte, C0/C1 (always overlong), F5..FF
    }
    if (i + len > n) return i;  // truncated
    const unsigned char c1 = static_cast<unsigned char>(s[i + 1]);
    if (c1 < lo || c1 > hi) return i;
    for (size_t k = 2; k < len; ++k) {
      const unsigned char ck = static_cast<unsigned char>(s[i + k]);
      if (ck < 0x80 || ck > 0xBF) return i;
    }
    i += len;
  }
  return std::string_view::npos;
}

bool valid_utf8(std::string_view s) { return utf8_first_invalid(s) == std::string_view::npos; }

}  // namespace dpo
