#include "train/tokenizer_json.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <tuple>
#include <unordered_map>

#include "runtime/error.h"

namespace dpo {

namespace {

using json = nlohmann::json;

// ---- UTF-8 ------------------------------------------------------------------------------------------------------

// Length of the UTF-8 sequence starting at s[i] if it is well formed, else 1 (a stray byte counts as one
// character, as nothing in a validated text reaches that case).
size_t char_len(std::string_view s, size_t i) {
  const size_t rest = s.size() - i;
  const size_t bad = utf8_first_invalid(s.substr(i, std::min<size_t>(rest, 4)));
  const auto c = static_cast<unsigned char>(s[i]);
  const size_t len = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  return (bad == 0 || len > rest) ? 1 : len;
}

uint32_t code_point(std::string_view s, size_t i, size_t len) {
  const auto b = [&](size_t k) { return static_cast<uint32_t>(static_cast<unsigned char>(s[i + k])); };
  switch (len) {
    case 2: return (b(0) & 0x1F) << 6 | (b(1) & 0x3F);
    case 3: return (b(0) & 0x0F) << 12 | (b(1) & 0x3F) << 6 | (b(2) & 0x3F);
    case 4: return (b(0) & 0x07) << 18 | (b(1) & 0x3F) << 12 | (b(2) & 0x3F) << 6 | (b(3) & 0x3F);
    default: return b(0);
  }
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

const std::string kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// Rust's String::from_utf8_lossy, which tokenizers' decoders use: each maximal prefix of a valid sequence that
// is cut short, and each other invalid byte, becomes one U+FFFD (Unicode's "substitution of maximal subparts").
std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const size_t bad = utf8_first_invalid(s.substr(i));
    if (bad == std::string_view::npos) {
      out.append(s.substr(i));
      break;
    }
    out.append(s.substr(i, bad));
    i += bad;
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c == 0xE0) len = 3, lo = 0xA0;
    else if (c == 0xED) len = 3, hi = 0x9F;
    else if (c >= 0xE1 && c <= 0xEF) len = 3;
    else if (c == 0xF0) len = 4, lo = 0x90;
    else if (c >= 0xF1 && c <= 0xF3) len = 4;
    else if (c == 0xF4) len = 4, hi = 0x8F;
    size_t k = 1;  // the lead byte, then the continuation bytes that still fit
    while (len > 0 && k < len && i + k < s.size()) {
      const auto ck = static_cast<unsigned char>(s[i + k]);
      if (ck < (k == 1 ? lo : 0x80) || ck > (k == 1 ? hi : 0xBF)) break;
      ++k;
    }
    out += kReplacementChar;
    i += k;
  }
  return out;
}

// ---- byte-level alphabet (GPT-2's bytes_to_unicode) ----------------------------------------------------------------

// Printable bytes ('!'..'~', U+00A1..U+00AC, U+00AE..U+00FF) stand for themselves; the other 68 bytes, in order,
// for U+0100, U+0101, ...
struct ByteAlphabet {
  std::array<std::string, 256> to_str;
  std::unordered_map<uint32_t, unsigned char> from_cp;
  ByteAlphabet() {
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : next++;
      append_utf8(to_str[b], cp);
      from_cp[cp] = static_cast<unsigned char>(b);
    }
  }
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet a;
  return a;
}

// ---- regular expressions ------------------------------------------------------------------------------------------

// tokenizers compiles patterns with Oniguruma, whose \s is [\t-\r\x{85}] plus the separators (Z); PCRE2's \s
// under UCP leaves out U+0085. Everything else these files use (\p{L}, \p{N}, (?i:...), lookaheads, {m,n}) reads
// the same in both.
std::string onig_to_pcre2(const std::string& p) {
  static const std::string ws = "\\t-\\r\\x{85}\\p{Z}";
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char n = p[i + 1];
      if (n == 's') out += in_class ? ws : "[" + ws + "]";
      else if (n == 'S' && !in_class) out += "[^" + ws + "]";
      else out += p.substr(i, 2);
      ++i;
      continue;
    }
    if (c == '[' && !in_class) {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a literal member.
      if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
      if (i + 1 < p.size() && p[i + 1] == ']') out += p[++i];
      continue;
    }
    if (c == ']' && in_class) in_class = false;
    out += c;
  }
  return out;
}

class Regex {
 public:
  // `where` names the pattern in errors ("tok.json: pre_tokenizer.pattern.Regex").
  Regex(const std::string& onig_pattern, const std::string& where) {
    const std::string p = onig_to_pcre2(onig_pattern);
    int err = 0;
    PCRE2_SIZE off = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(p.data()), p.size(),
                                     PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &off, nullptr);
    if (!code) {
      std::array<PCRE2_UCHAR, 256> msg{};
      pcre2_get_error_message(err, msg.data(), msg.size());
      throw InputError(where + ": cannot compile the pattern " + json(onig_pattern).dump() + ": " +
                       reinterpret_cast<const char*>(msg.data()) + " at offset " + std::to_string(off));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter where JIT is unavailable
    code_.reset(code, pcre2_code_free);
  }

  // The non-empty matches, left to right, non-overlapping (as Oniguruma's find_iter, whose empty matches the
  // splitting code drops anyway).
  std::vector<std::pair<size_t, size_t>> find_all(std::string_view s) const {
    std::vector<std::pair<size_t, size_t>> out;
    std::unique_ptr<pcre2_match_data, void (*)(pcre2_match_data*)> md(
        pcre2_match_data_create_from_pattern(code_.get(), nullptr), pcre2_match_data_free);
    size_t at = 0;
    while (at <= s.size()) {
      const int rc = pcre2_match(code_.get(), reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), at, 0, md.get(),
                                 nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        std::array<PCRE2_UCHAR, 256> msg{};
        pcre2_get_error_message(rc, msg.data(), msg.size());
        throw Error(std::string("tokenizer: regex match failed: ") + reinterpret_cast<const char*>(msg.data()));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
      if (ov[1] == ov[0]) {  // empty: move on by one character
        if (ov[1] >= s.size()) break;
        at = ov[1] + char_len(s, ov[1]);
        continue;
      }
      out.emplace_back(ov[0], ov[1]);
      at = ov[1];
    }
    return out;
  }

 private:
  std::shared_ptr<pcre2_code> code_;
};

// A pattern of tokenizers' JSON: {"String": literal} or {"Regex": onig pattern}.
struct Pattern {
  std::string literal;
  std::shared_ptr<Regex> regex;  // null: literal

  std::vector<std::pair<size_t, size_t>> find_all(std::string_view s) const {
    if (regex) return regex->find_all(s);
    std::vector<std::pair<size_t, size_t>> out;
    if (literal.empty()) return out;
    for (size_t at = s.find(literal); at != std::string_view::npos; at = s.find(literal, at + literal.size()))
      out.emplace_back(at, at + literal.size());
    return out;
  }

  std::string replace_all(std::string_view s, const std::string& content) const {
    std::string out;
    size_t prev = 0;
    for (const auto& [a, b] : find_all(s)) {
      out.append(s.substr(prev, a - prev));
      out += content;
      prev = b;
    }
    out.append(s.substr(prev));
    return out;
  }
};

// ---- JSON access with the path of each part in errors -----------------------------------------------------------

struct Reader {
  std::string file;

  [[noreturn]] void fail(const std::string& jpath, const std::string& what) const {
    throw InputError(file + ": " + jpath + ": " + what);
  }
  const json& get(const json& obj, const std::string& key, const std::string& jpath) const {
    if (!obj.is_object()) fail(jpath, std::string("expected an object, got ") + obj.type_name());
    auto it = obj.find(key);
    if (it == obj.end()) fail(jpath + "." + key, "missing");
    return *it;
  }
  std::string str(const json& obj, const std::string& key, const std::string& jpath) const {
    const json& v = get(obj, key, jpath);
    if (!v.is_string()) fail(jpath + "." + key, std::string("expected a string, got ") + v.type_name());
    return v.get<std::string>();
  }
  bool flag(const json& obj, const std::string& key, const std::string& jpath, bool dflt) const {
    if (!obj.contains(key) || obj[key].is_null()) return dflt;
    if (!obj[key].is_boolean()) fail(jpath + "." + key, std::string("expected true or false, got ") + obj[key].dump());
    return obj[key].get<bool>();
  }
  int64_t integer(const json& obj, const std::string& key, const std::string& jpath) const {
    const json& v = get(obj, key, jpath);
    if (!v.is_number_integer()) fail(jpath + "." + key, std::string("expected an integer, got ") + v.dump());
    return v.get<int64_t>();
  }
  // The one character of `key` (Metaspace's replacement, Strip's content).
  std::string one_char(const json& obj, const std::string& key, const std::string& jpath) const {
    const std::string s = str(obj, key, jpath);
    if (s.empty() || char_len(s, 0) != s.size()) fail(jpath + "." + key, "expected one character, got " + json(s).dump());
    return s;
  }
  Pattern pattern(const json& obj, const std::string& key, const std::string& jpath) const {
    const json& p = get(obj, key, jpath);
    const std::string here = jpath + "." + key;
    if (p.is_object() && p.size() == 1 && p.contains("String") && p["String"].is_string())
      return Pattern{p["String"].get<std::string>(), nullptr};
    if (p.is_object() && p.size() == 1 && p.contains("Regex") && p["Regex"].is_string())
      return Pattern{"", std::make_shared<Regex>(p["Regex"].get<std::string>(), file + ": " + here + ".Regex")};
    fail(here, "expected {\"String\": ...} or {\"Regex\": ...}, got " + p.dump());
  }
  std::string type(const json& obj, const std::string& jpath) const { return str(obj, "type", jpath); }
  // Each element of a Sequence's list `key`, with its path.
  std::vector<std::pair<const json*, std::string>> list(const json& obj, const std::string& key,
                                                        const std::string& jpath) const {
    const json& v = get(obj, key, jpath);
    if (!v.is_array()) fail(jpath + "." + key, std::string("expected an array, got ") + v.type_name());
    std::vector<std::pair<const json*, std::string>> out;
    for (size_t i = 0; i < v.size(); ++i) out.emplace_back(&v[i], jpath + "." + key + "[" + std::to_string(i) + "]");
    return out;
  }
};

// ---- pieces of text ---------------------------------------------------------------------------------------------

// A piece of the text on its way to the model. `at_start`: the piece begins at offset 0 of the original text
// (Metaspace's prepend_scheme "first" looks at this). `id` >= 0: an added token, final.
struct Piece {
  std::string text;
  bool at_start = false;
  int32_t id = -1;
};

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

// tokenizers' NormalizedString::split: the pieces of `p` around `matches` (sorted, non-overlapping), empty
// pieces dropped.
void split_piece(const Piece& p, const std::vector<std::pair<size_t, size_t>>& matches, SplitBehavior behavior,
                 bool invert, std::vector<Piece>& out) {
  struct Seg {
    size_t a, b;
    bool match;
  };
  std::vector<Seg> segs;
  size_t prev = 0;
  for (const auto& [a, b] : matches) {
    if (prev != a) segs.push_back({prev, a, false});
    segs.push_back({a, b, true});
    prev = b;
  }
  if (prev != p.text.size() || segs.empty()) segs.push_back({prev, p.text.size(), false});
  if (invert)
    for (Seg& s : segs) s.match = !s.match;
  std::vector<Seg> kept;  // after the behavior; `match` now means "remove"
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::Isolated:
      for (Seg s : segs) kept.push_back({s.a, s.b, false});
      break;
    case SplitBehavior::Removed:
      kept = segs;
      break;
    case SplitBehavior::Contiguous:
      for (const Seg& s : segs) {
        if (s.match == previous_match && !kept.empty()) kept.back().b = s.b;
        else kept.push_back({s.a, s.b, false});
        previous_match = s.match;
      }
      break;
    case SplitBehavior::MergedWithPrevious:
      for (const Seg& s : segs) {
        if (s.match && !previous_match && !kept.empty()) kept.back().b = s.b;
        else kept.push_back({s.a, s.b, false});
        previous_match = s.match;
      }
      break;
    case SplitBehavior::MergedWithNext:
      for (auto it = segs.rbegin(); it != segs.rend(); ++it) {
        if (it->match && !previous_match && !kept.empty()) kept.back().a = it->a;
        else kept.push_back({it->a, it->b, false});
        previous_match = it->match;
      }
      std::reverse(kept.begin(), kept.end());
      break;
  }
  for (const Seg& s : kept)
    if (!s.match && s.b > s.a) out.push_back({p.text.substr(s.a, s.b - s.a), p.at_start && s.a == 0, -1});
}

// ---- normalizers ------------------------------------------------------------------------------------------------

struct NormStep {
  enum Kind { Unicode, Lowercase, Replace, Prepend } kind;
  int unicode_options = 0;  // Unicode: utf8proc_map options of the form (NFC, NFD, NFKC, NFKD)
  Pattern pattern;          // Replace
  std::string content;      // Replace, Prepend
};

// The code points of s; a byte that does not start a valid UTF-8 sequence becomes U+FFFD (the loaders validate
// text records, so this only matters for text that never reaches a loader).
std::vector<utf8proc_int32_t> code_points(const std::string& s) {
  std::vector<utf8proc_int32_t> cps;
  cps.reserve(s.size());
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(s.data());
  for (size_t i = 0; i < s.size();) {
    utf8proc_int32_t c = 0;
    const utf8proc_ssize_t n = utf8proc_iterate(p + i, static_cast<utf8proc_ssize_t>(s.size() - i), &c);
    if (n <= 0) {
      cps.push_back(0xFFFD);
      i += 1;
    } else {
      cps.push_back(c);
      i += static_cast<size_t>(n);
    }
  }
  return cps;
}

void append_utf8(std::string& out, utf8proc_int32_t c) {
  utf8proc_uint8_t b[4];
  const utf8proc_ssize_t n = utf8proc_encode_char(c, b);
  out.append(reinterpret_cast<const char*>(b), static_cast<size_t>(n));
}

std::string normalize_unicode(const std::string& s, int options) {
  std::string valid;
  for (const utf8proc_int32_t c : code_points(s)) append_utf8(valid, c);
  utf8proc_uint8_t* dst = nullptr;
  const utf8proc_ssize_t n =
      utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(valid.data()), static_cast<utf8proc_ssize_t>(valid.size()),
                   &dst, static_cast<utf8proc_option_t>(options));
  if (n < 0) throw Error(std::string("tokenizer: Unicode normalization failed: ") + utf8proc_errmsg(n));
  std::string r(reinterpret_cast<const char*>(dst), static_cast<size_t>(n));
  std::free(dst);
  return r;
}

// HF's Lowercase normalizer: each character's full lowercase mapping (Rust's char::to_lowercase, one character at
// a time, so no context: capital sigma always becomes U+03C3, never the final form). The one multi-character
// mapping is U+0130 (I with dot above) to "i" + U+0307; everything else is utf8proc's per-code-point mapping.
std::string lowercase(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (const utf8proc_int32_t c : code_points(s)) {
    if (c == 0x130)
      out += "i\xCC\x87";
    else
      append_utf8(out, utf8proc_tolower(c));
  }
  return out;
}

std::string apply_norm(const NormStep& n, const std::string& s) {
  switch (n.kind) {
    case NormStep::Unicode: return normalize_unicode(s, n.unicode_options);
    case NormStep::Lowercase: return lowercase(s);
    case NormStep::Replace: return n.pattern.replace_all(s, n.content);
    case NormStep::Prepend: return s.empty() ? s : n.content + s;
  }
  return s;
}

// ---- pre-tokenizers ---------------------------------------------------------------------------------------------

struct PreStep {
  enum Kind { ByteLevel, Split, Metaspace } kind;
  bool add_prefix_space = false, use_regex = false;  // ByteLevel
  Pattern pattern;                                   // Split
  SplitBehavior behavior = SplitBehavior::Isolated;  // Split
  bool invert = false;                               // Split
  std::string replacement;                           // Metaspace
  enum Prepend { Always, First, Never } prepend = Always;  // Metaspace
  bool split = true;                                        // Metaspace
};

// GPT-2's pre-tokenizer pattern, which ByteLevel with use_regex applies.
const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---- decoders ---------------------------------------------------------------------------------------------------

struct DecStep {
  enum Kind { ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace } kind;
  Pattern pattern;          // Replace
  std::string content;      // Replace; Strip, Metaspace: the character
  int64_t start = 0, stop = 0;  // Strip
  bool prepend_never = false;   // Metaspace
};

// "<0xAB>" -> 0xAB; -1 for any other token. tokenizers parses the two digits with u8::from_str_radix.
int byte_token(const std::string& t) {
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
  int v = 0;
  for (int k = 3; k < 5; ++k) {
    const char c = t[k];
    const int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
    if (d < 0) return -1;
    v = v * 16 + d;
  }
  return v;
}

void apply_dec(const DecStep& d, std::vector<std::string>& toks) {
  switch (d.kind) {
    case DecStep::ByteLevel: {
      const ByteAlphabet& ab = byte_alphabet();
      std::string bytes;
      for (const std::string& t : toks) {
        std::string mapped;
        bool all = true;
        for (size_t i = 0; i < t.size() && all;) {
          const size_t len = char_len(t, i);
          auto it = ab.from_cp.find(code_point(t, i, len));
          if (it == ab.from_cp.end()) all = false;
          else mapped += static_cast<char>(it->second);
          i += len;
        }
        bytes += all ? mapped : t;  // a token outside the alphabet (an added token) stands for its own bytes
      }
      toks = {utf8_lossy(bytes)};
      return;
    }
    case DecStep::Replace:
      for (std::string& t : toks) t = d.pattern.replace_all(t, d.content);
      return;
    case DecStep::ByteFallback: {
      std::vector<std::string> out;
      std::string pending;  // bytes of consecutive <0x..> tokens
      size_t n_pending = 0;
      auto flush = [&] {
        if (n_pending == 0) return;
        if (valid_utf8(pending)) {
          out.push_back(pending);
        } else {
          for (size_t k = 0; k < n_pending; ++k) out.push_back(kReplacementChar);
        }
        pending.clear();
        n_pending = 0;
      };
      for (const std::string& t : toks) {
        const int b = byte_token(t);
        if (b >= 0) {
          pending += static_cast<char>(b);
          ++n_pending;
        } else {
          flush();
          out.push_back(t);
        }
      }
      flush();
      toks = std::move(out);
      return;
    }
    case DecStep::Fuse: {
      std::string all;
      for (const std::string& t : toks) all += t;
      toks = {all};
      return;
    }
    case DecStep::Strip:
      for (std::string& t : toks) {
        std::vector<std::pair<size_t, size_t>> chars;  // (offset, length)
        for (size_t i = 0; i < t.size(); i += chars.back().second) chars.emplace_back(i, char_len(t, i));
        size_t cut_start = 0, cut_stop = 0;
        for (size_t k = 0; k < chars.size() && static_cast<int64_t>(k) < d.start; ++k) {
          if (t.compare(chars[k].first, chars[k].second, d.content) != 0) break;
          cut_start = k + 1;
        }
        for (size_t k = 0; k < chars.size() && static_cast<int64_t>(k) < d.stop; ++k) {
          const auto& c = chars[chars.size() - 1 - k];
          if (t.compare(c.first, c.second, d.content) != 0) break;
          cut_stop = k + 1;
        }
        if (cut_start + cut_stop >= chars.size()) {
          t.clear();
        } else {
          const size_t a = chars[cut_start].first;
          const size_t b = cut_stop == 0 ? t.size() : chars[chars.size() - cut_stop].first;
          t = t.substr(a, b - a);
        }
      }
      return;
    case DecStep::Metaspace:
      // tokenizers 0.23: every replacement character becomes a space, except in the first token (unless
      // prepend_scheme is "never"), where each one is dropped.
      for (size_t i = 0; i < toks.size(); ++i) {
        std::string r;
        const std::string& t = toks[i];
        for (size_t k = 0; k < t.size();) {
          const size_t len = char_len(t, k);
          if (t.compare(k, len, d.content) == 0) {
            if (i != 0 || d.prepend_never) r += ' ';
          } else {
            r.append(t, k, len);
          }
          k += len;
        }
        toks[i] = std::move(r);
      }
      return;
  }
}

struct AddedToken {
  std::string content;
  int32_t id;
  bool special, lstrip, rstrip, normalized;
};

// Unicode's White_Space property (PropList.txt; what Rust's char::is_whitespace tests).
bool is_white_space(std::string_view s, size_t i, size_t len) {
  const uint32_t c = static_cast<uint32_t>(code_point(s, i, len));
  return (c >= 0x9 && c <= 0xD) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
         c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

}  // namespace

struct JsonTokenizer::Impl {
  std::string path;
  std::unordered_map<std::string, int32_t> vocab;  // model vocabulary and added tokens
  std::vector<std::string> id_to_token;            // "" with has_token false: no token of that id
  std::vector<char> has_token, is_special;
  // merges: (left id, right id) -> (rank, merged id)
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;
  bool ignore_merges = false, byte_fallback = false, fuse_unk = false;
  int32_t unk_id = -1;
  std::array<int32_t, 256> byte_ids{};  // <0xXX> ids, -1 where absent
  std::vector<AddedToken> added;
  // The added tokens matched before / after normalization, by first byte: most positions of a text start no
  // added token (Llama 3's 256 all start with '<').
  std::array<std::vector<const AddedToken*>, 256> first_raw, first_norm;
  bool any_raw = false, any_norm = false;
  std::vector<NormStep> norm;
  std::vector<PreStep> pre;
  std::vector<DecStep> dec;
  bool has_decoder = false;
  int32_t eos = -1;
  // bpe()'s results for words of at most kCachedWordBytes, up to kCachedWords of them (then it starts over).
  static constexpr size_t kCachedWordBytes = 64, kCachedWords = size_t{1} << 18;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;
  mutable std::mutex cache_mutex;

  static uint64_t key(int32_t a, int32_t b) { return static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32 | static_cast<uint32_t>(b); }

  void read_norm(const Reader& rd, const json& n, const std::string& jp) {
    const std::string t = rd.type(n, jp);
    NormStep s{};
    if (t == "Sequence") {
      for (const auto& [e, p] : rd.list(n, "normalizers", jp)) read_norm(rd, *e, p);
      return;
    }
    if (t == "NFC" || t == "NFD" || t == "NFKC" || t == "NFKD") {
      s.kind = NormStep::Unicode;
      const int compat = t == "NFKC" || t == "NFKD" ? UTF8PROC_COMPAT : 0;
      s.unicode_options =
          UTF8PROC_STABLE | compat | (t == "NFC" || t == "NFKC" ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE);
    } else if (t == "Lowercase") {
      s.kind = NormStep::Lowercase;
    } else if (t == "Replace") {
      s.kind = NormStep::Replace;
      s.pattern = rd.pattern(n, "pattern", jp);
      s.content = rd.str(n, "content", jp);
    } else if (t == "Prepend") {
      s.kind = NormStep::Prepend;
      s.content = rd.str(n, "prepend", jp);
    } else {
      rd.fail(jp + ".type", "unsupported normalizer type '" + t +
                                "' (supported: NFC, NFD, NFKC, NFKD, Lowercase, Replace, Prepend, Sequence)");
    }
    norm.push_back(std::move(s));
  }

  void read_pre(const Reader& rd, const json& n, const std::string& jp) {
    const std::string t = rd.type(n, jp);
    PreStep s{};
    if (t == "Sequence") {
      for (const auto& [e, p] : rd.list(n, "pretokenizers", jp)) read_pre(rd, *e, p);
      return;
    }
    if (t == "ByteLevel") {
      s.kind = PreStep::ByteLevel;
      s.add_prefix_space = rd.flag(n, "add_prefix_space", jp, true);
      s.use_regex = rd.flag(n, "use_regex", jp, true);
      if (s.use_regex) s.pattern = Pattern{"", std::make_shared<Regex>(kGpt2Pattern, path + ": " + jp)};
    } else if (t == "Split") {
      s.kind = PreStep::Split;
      s.pattern = rd.pattern(n, "pattern", jp);
      const std::string b = rd.str(n, "behavior", jp);
      if (b == "Removed") s.behavior = SplitBehavior::Removed;
      else if (b == "Isolated") s.behavior = SplitBehavior::Isolated;
      else if (b == "MergedWithPrevious") s.behavior = SplitBehavior::MergedWithPrevious;
      else if (b == "MergedWithNext") s.behavior = SplitBehavior::MergedWithNext;
      else if (b == "Contiguous") s.behavior = SplitBehavior::Contiguous;
      else rd.fail(jp + ".behavior", "unknown behavior '" + b + "' (Removed, Isolated, MergedWithPrevious, "
                                     "MergedWithNext, Contiguous)");
      s.invert = rd.flag(n, "invert", jp, false);
    } else if (t == "Metaspace") {
      s.kind = PreStep::Metaspace;
      s.replacement = rd.one_char(n, "replacement", jp);
      s.split = rd.flag(n, "split", jp, true);
      if (n.contains("prepend_scheme")) {
        const std::string p = rd.str(n, "prepend_scheme", jp);
        if (p == "always") s.prepend = PreStep::Always;
        else if (p == "first") s.prepend = PreStep::First;
        else if (p == "never") s.prepend = PreStep::Never;
        else rd.fail(jp + ".prepend_scheme", "unknown value '" + p + "' (always, first, never)");
      } else {  // files written before prepend_scheme existed
        s.prepend = rd.flag(n, "add_prefix_space", jp, true) ? PreStep::Always : PreStep::Never;
      }
    } else if (t == "Digits") {
      // tokenizers splits on char::is_numeric, the general categories Nd, Nl and No.
      s.kind = PreStep::Split;
      s.pattern = Pattern{"", std::make_shared<Regex>("\\p{N}", path + ": " + jp)};
      s.behavior = rd.flag(n, "individual_digits", jp, false) ? SplitBehavior::Isolated : SplitBehavior::Contiguous;
    } else {
      rd.fail(jp + ".type", "unsupported pre-tokenizer type '" + t +
                                "' (supported: ByteLevel, Split, Metaspace, Digits, Sequence)");
    }
    pre.push_back(std::move(s));
  }

  void read_dec(const Reader& rd, const json& n, const std::string& jp) {
    const std::string t = rd.type(n, jp);
    DecStep s{};
    if (t == "Sequence") {
      for (const auto& [e, p] : rd.list(n, "decoders", jp)) read_dec(rd, *e, p);
      return;
    }
    if (t == "ByteLevel") {
      s.kind = DecStep::ByteLevel;
    } else if (t == "Replace") {
      s.kind = DecStep::Replace;
      s.pattern = rd.pattern(n, "pattern", jp);
      s.content = rd.str(n, "content", jp);
    } else if (t == "ByteFallback") {
      s.kind = DecStep::ByteFallback;
    } else if (t == "Fuse") {
      s.kind = DecStep::Fuse;
    } else if (t == "Strip") {
      s.kind = DecStep::Strip;
      s.content = rd.one_char(n, "content", jp);
      s.start = rd.integer(n, "start", jp);
      s.stop = rd.integer(n, "stop", jp);
      if (s.start < 0 || s.stop < 0) rd.fail(jp, "start and stop must be >= 0");
    } else if (t == "Metaspace") {
      s.kind = DecStep::Metaspace;
      s.content = rd.one_char(n, "replacement", jp);
      if (n.contains("prepend_scheme")) s.prepend_never = rd.str(n, "prepend_scheme", jp) == "never";
      else s.prepend_never = !rd.flag(n, "add_prefix_space", jp, true);
    } else {
      rd.fail(jp + ".type", "unsupported decoder type '" + t +
                                "' (supported: ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence)");
    }
    dec.push_back(std::move(s));
  }

  void read_model(const Reader& rd, const json& m) {
    const std::string jp = "model";
    if (!m.is_object()) rd.fail(jp, std::string("expected an object, got ") + m.type_name());
    const std::string t = m.contains("type") ? rd.type(m, jp) : (m.contains("merges") ? "BPE" : "");
    if (t != "BPE")
      rd.fail(jp + ".type", "unsupported model type '" + t + "' (supported: BPE; WordPiece, WordLevel and Unigram "
                            "tokenizers are not)");
    if (m.contains("dropout") && !m["dropout"].is_null() &&
        !(m["dropout"].is_number() && m["dropout"].get<double>() == 0.0))
      rd.fail(jp + ".dropout", "BPE dropout is not supported (got " + m["dropout"].dump() + "; expected null)");
    for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (m.contains(k) && !m[k].is_null() && !(m[k].is_string() && m[k].get<std::string>().empty()))
        rd.fail(jp + "." + k, "not supported (got " + m[k].dump() + "; expected null)");
    ignore_merges = rd.flag(m, "ignore_merges", jp, false);
    byte_fallback = rd.flag(m, "byte_fallback", jp, false);
    fuse_unk = rd.flag(m, "fuse_unk", jp, false);
    const json& v = rd.get(m, "vocab", jp);
    if (!v.is_object()) rd.fail(jp + ".vocab", std::string("expected an object, got ") + v.type_name());
    for (auto it = v.begin(); it != v.end(); ++it) {
      if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
          it.value().get<int64_t>() > std::numeric_limits<int32_t>::max())
        rd.fail(jp + ".vocab." + it.key(), "expected a non-negative 32-bit integer id, got " + it.value().dump());
      vocab[it.key()] = static_cast<int32_t>(it.value().get<int64_t>());
    }
    const json& ms = rd.get(m, "merges", jp);
    if (!ms.is_array()) rd.fail(jp + ".merges", std::string("expected an array, got ") + ms.type_name());
    for (size_t r = 0; r < ms.size(); ++r) {
      const json& e = ms[r];
      const std::string ep = jp + ".merges[" + std::to_string(r) + "]";
      std::string a, b;
      if (e.is_string()) {
        const std::string s = e.get<std::string>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
          rd.fail(ep, "expected \"left right\" (two tokens and one space), got " + e.dump());
        a = s.substr(0, sp), b = s.substr(sp + 1);
      } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
        a = e[0].get<std::string>(), b = e[1].get<std::string>();
      } else {
        rd.fail(ep, "expected \"left right\" or [\"left\", \"right\"], got " + e.dump());
      }
      auto ia = vocab.find(a), ib = vocab.find(b), im = vocab.find(a + b);
      if (ia == vocab.end() || ib == vocab.end() || im == vocab.end())
        rd.fail(ep, "merge " + e.dump() + ": token " +
                        json(ia == vocab.end() ? a : ib == vocab.end() ? b : a + b).dump() + " is not in model.vocab");
      merges.emplace(key(ia->second, ib->second), std::make_pair(static_cast<int32_t>(r), im->second));
    }
    if (m.contains("unk_token") && !m["unk_token"].is_null()) {
      const std::string u = rd.str(m, "unk_token", jp);
      auto it = vocab.find(u);
      if (it == vocab.end()) rd.fail(jp + ".unk_token", "token " + json(u).dump() + " is not in model.vocab");
      unk_id = it->second;
    }
  }

  void read(const std::string& file) {
    path = file;
    const Reader rd{file};
    std::ifstream f(file, std::ios::binary);
    if (!f) throw InputError(file + ": cannot open tokenizer file");
    std::stringstream buf;
    buf << f.rdbuf();
    json j;
    try {
      j = json::parse(buf.str());
    } catch (const json::exception& e) {
      throw InputError(file + ": not valid JSON: " + e.what());
    }
    if (!j.is_object()) throw InputError(file + ": top level is not a JSON object (a tokenizer.json file?)");
    read_model(rd, rd.get(j, "model", "$"));
    std::vector<std::pair<int32_t, std::string>> added_content;  // as written: decode renders this text
    if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
      for (const auto& [e, p] : rd.list(j, "added_tokens", "$")) {
        AddedToken a{};
        a.content = rd.str(*e, "content", p);
        const int64_t id = rd.integer(*e, "id", p);
        if (id < 0 || id > std::numeric_limits<int32_t>::max()) rd.fail(p + ".id", "out of range: " + std::to_string(id));
        a.id = static_cast<int32_t>(id);
        a.special = rd.flag(*e, "special", p, false);
        a.lstrip = rd.flag(*e, "lstrip", p, false);
        a.rstrip = rd.flag(*e, "rstrip", p, false);
        a.normalized = rd.flag(*e, "normalized", p, !a.special);
        if (rd.flag(*e, "single_word", p, false)) rd.fail(p + ".single_word", "single_word: true is not supported");
        if (a.content.empty()) rd.fail(p + ".content", "empty");
        added.push_back(a);
        added_content.emplace_back(a.id, a.content);
      }
    }
    if (j.contains("normalizer") && !j["normalizer"].is_null()) read_norm(rd, j["normalizer"], "normalizer");
    if (j.contains("pre_tokenizer") && !j["pre_tokenizer"].is_null()) read_pre(rd, j["pre_tokenizer"], "pre_tokenizer");
    if (j.contains("decoder") && !j["decoder"].is_null()) {
      read_dec(rd, j["decoder"], "decoder");
      has_decoder = true;
    }
    // Normalized added tokens are matched in normalized text, so their content is normalized too (as tokenizers
    // does when it builds its matcher).
    for (AddedToken& a : added)
      if (a.normalized)
        for (const NormStep& n : norm) a.content = apply_norm(n, a.content);
    std::sort(added.begin(), added.end(), [](const AddedToken& x, const AddedToken& y) { return x.id < y.id; });
    for (const AddedToken& a : added) {
      (a.normalized ? first_norm : first_raw)[static_cast<unsigned char>(a.content[0])].push_back(&a);
      (a.normalized ? any_norm : any_raw) = true;
    }

    int64_t n = 0;
    for (const auto& [t, id] : vocab) n = std::max<int64_t>(n, int64_t{id} + 1);
    for (const AddedToken& a : added) n = std::max<int64_t>(n, int64_t{a.id} + 1);
    id_to_token.assign(static_cast<size_t>(n), "");
    has_token.assign(static_cast<size_t>(n), 0);
    is_special.assign(static_cast<size_t>(n), 0);
    for (const auto& [t, id] : vocab) id_to_token[id] = t, has_token[id] = 1;
    for (const AddedToken& a : added) {
      has_token[a.id] = 1;
      is_special[a.id] = a.special ? 1 : 0;
    }
    for (const auto& [id, content] : added_content) {
      id_to_token[id] = content;
      vocab.emplace(content, id);
    }
    byte_ids.fill(-1);
    char name[8];
    for (int b = 0; b < 256; ++b) {
      std::snprintf(name, sizeof name, "<0x%02X>", b);
      auto it = vocab.find(name);
      if (it != vocab.end()) byte_ids[b] = it->second;
    }
  }

  // Splits the non-final pieces at the added tokens with normalized == `normalized`, leftmost-longest.
  std::vector<Piece> split_added(std::vector<Piece> in, bool normalized) const {
    const auto& by_first = normalized ? first_norm : first_raw;
    if (!(normalized ? any_norm : any_raw)) return in;
    std::vector<Piece> out;
    for (Piece& p : in) {
      if (p.id >= 0) {
        out.push_back(std::move(p));
        continue;
      }
      const std::string& s = p.text;
      size_t prev = 0;  // end of the last match
      for (size_t i = 0; i < s.size();) {
        const AddedToken* best = nullptr;
        for (const AddedToken* a : by_first[static_cast<unsigned char>(s[i])])
          if ((!best || a->content.size() > best->content.size()) && s.compare(i, a->content.size(), a->content) == 0)
            best = a;
        if (!best) {
          ++i;
          continue;
        }
        size_t a = i, b = i + best->content.size();
        if (best->lstrip)
          while (a > prev) {
            size_t k = a - 1;
            while (k > prev && (static_cast<unsigned char>(s[k]) & 0xC0) == 0x80) --k;
            if (!is_white_space(s, k, a - k)) break;
            a = k;
          }
        if (best->rstrip)
          while (b < s.size() && is_white_space(s, b, char_len(s, b))) b += char_len(s, b);
        if (a > prev) out.push_back({s.substr(prev, a - prev), p.at_start && prev == 0, -1});
        out.push_back({std::string(), false, best->id});
        prev = i = b;
      }
      if (prev < s.size()) out.push_back({s.substr(prev), p.at_start && prev == 0, -1});
    }
    return out;
  }

  void pre_tokenize(const PreStep& st, std::vector<Piece>& pieces) const {
    std::vector<Piece> out;
    for (Piece& p : pieces) {
      switch (st.kind) {
        case PreStep::ByteLevel: {
          if (st.add_prefix_space && p.text.rfind(' ', 0) != 0) p.text.insert(0, " ");
          std::vector<Piece> parts;
          if (st.use_regex) split_piece(p, st.pattern.find_all(p.text), SplitBehavior::Isolated, false, parts);
          else parts.push_back(p);
          const ByteAlphabet& ab = byte_alphabet();
          for (Piece& q : parts) {
            std::string m;
            for (char c : q.text) m += ab.to_str[static_cast<unsigned char>(c)];
            q.text = std::move(m);
            out.push_back(std::move(q));
          }
          break;
        }
        case PreStep::Split:
          split_piece(p, st.pattern.find_all(p.text), st.behavior, st.invert, out);
          break;
        case PreStep::Metaspace: {
          p.text = Pattern{" ", nullptr}.replace_all(p.text, st.replacement);
          const bool starts = p.text.rfind(st.replacement, 0) == 0;
          if (!starts && (st.prepend == PreStep::Always || (st.prepend == PreStep::First && p.at_start)))
            p.text.insert(0, st.replacement);
          if (st.split) split_piece(p, Pattern{st.replacement, nullptr}.find_all(p.text),
                                    SplitBehavior::MergedWithNext, false, out);
          else if (!p.text.empty()) out.push_back(std::move(p));
          break;
        }
      }
    }
    pieces = std::move(out);
  }

  // tokenizers' BPE::tokenize of one word: characters (or their byte tokens, or unk), then merges by rank, the
  // leftmost first among equal ranks.
  void bpe(const std::string& w, std::vector<int32_t>& ids) const {
    // Words repeat (tokenizers keeps the same kind of cache): short ones are looked up first.
    const bool cacheable = w.size() <= kCachedWordBytes;
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_mutex);
      auto it = cache.find(w);
      if (it != cache.end()) {
        ids.insert(ids.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    const size_t first = ids.size();
    bpe_uncached(w, ids);
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_mutex);
      if (cache.size() >= kCachedWords) cache.clear();
      cache.emplace(w, std::vector<int32_t>(ids.begin() + static_cast<std::ptrdiff_t>(first), ids.end()));
    }
  }

  void bpe_uncached(const std::string& w, std::vector<int32_t>& ids) const {
    if (ignore_merges) {
      auto it = vocab.find(w);
      if (it != vocab.end()) {
        ids.push_back(it->second);
        return;
      }
    }
    std::vector<int32_t> sym;
    bool unk_open = false;  // the last symbol is an unk that the next unknown character may join (fuse_unk)
    for (size_t i = 0; i < w.size();) {
      const size_t len = char_len(w, i);
      auto it = vocab.find(w.substr(i, len));
      if (it != vocab.end()) {
        sym.push_back(it->second);
        unk_open = false;
      } else {
        bool bytes = byte_fallback;
        for (size_t k = 0; k < len && bytes; ++k) bytes = byte_ids[static_cast<unsigned char>(w[i + k])] >= 0;
        if (bytes) {
          for (size_t k = 0; k < len; ++k) sym.push_back(byte_ids[static_cast<unsigned char>(w[i + k])]);
          unk_open = false;
        } else if (unk_id >= 0) {
          if (!(fuse_unk && unk_open)) sym.push_back(unk_id);
          unk_open = true;
        }  // no unk token: the character is dropped, as tokenizers does
      }
      i += len;
    }
    const int n = static_cast<int>(sym.size());
    std::vector<int> next(n), prev(n);
    std::vector<char> alive(n, 1);
    for (int i = 0; i < n; ++i) next[i] = i + 1 < n ? i + 1 : -1, prev[i] = i - 1;
    using Cand = std::tuple<int32_t, int, int32_t>;  // rank, left position, merged id
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> q;
    auto push = [&](int i) {
      if (i < 0 || next[i] < 0) return;
      auto it = merges.find(key(sym[i], sym[next[i]]));
      if (it != merges.end()) q.emplace(it->second.first, i, it->second.second);
    };
    for (int i = 0; i + 1 < n; ++i) push(i);
    while (!q.empty()) {
      const auto [rank, i, merged] = q.top();
      q.pop();
      if (!alive[i] || next[i] < 0) continue;
      auto it = merges.find(key(sym[i], sym[next[i]]));
      if (it == merges.end() || it->second.second != merged) continue;  // the pair changed since it was queued
      const int j = next[i];
      sym[i] = merged;
      alive[j] = 0;
      next[i] = next[j];
      if (next[j] >= 0) prev[next[j]] = i;
      push(prev[i]);
      push(i);
    }
    for (int i = 0; i < n; ++i)
      if (alive[i]) ids.push_back(sym[i]);
  }
};

JsonTokenizer::JsonTokenizer(const std::string& path) : impl_(std::make_unique<Impl>()) { impl_->read(path); }
JsonTokenizer::~JsonTokenizer() = default;

std::vector<int32_t> JsonTokenizer::encode(std::string_view text) const {
  const Impl& m = *impl_;
  std::vector<Piece> pieces;
  if (!text.empty()) pieces.push_back({std::string(text), true, -1});
  pieces = m.split_added(std::move(pieces), false);
  std::vector<Piece> normalized;
  for (Piece& p : pieces) {
    if (p.id < 0)
      for (const NormStep& n : m.norm) p.text = apply_norm(n, p.text);
    if (p.id >= 0 || !p.text.empty()) normalized.push_back(std::move(p));
  }
  pieces = m.split_added(std::move(normalized), true);
  std::vector<int32_t> ids;
  for (Piece& p : pieces) {
    if (p.id >= 0) {
      ids.push_back(p.id);
      continue;
    }
    std::vector<Piece> words{std::move(p)};
    for (const PreStep& st : m.pre) m.pre_tokenize(st, words);
    for (const Piece& w : words) m.bpe(w.text, ids);
  }
  return ids;
}

std::string JsonTokenizer::decode(const std::vector<int32_t>& ids) const { return decode(ids, SpecialTokens::Skip); }

std::string JsonTokenizer::decode(const std::vector<int32_t>& ids, SpecialTokens special) const {
  const Impl& m = *impl_;
  std::vector<std::string> toks;
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    if (id < 0 || id >= static_cast<int64_t>(m.id_to_token.size()))
      throw Error(name() + ": id " + std::to_string(id) + " at index " + std::to_string(i) +
                  " is outside the vocabulary [0, " + std::to_string(m.id_to_token.size()) + ")");
    if (!m.has_token[id] || (special == SpecialTokens::Skip && m.is_special[id])) continue;
    toks.push_back(m.id_to_token[id]);
  }
  if (!m.has_decoder) {
    std::string out;
    for (size_t i = 0; i < toks.size(); ++i) out += (i ? " " : "") + toks[i];
    return out;
  }
  for (const DecStep& d : m.dec) apply_dec(d, toks);
  std::string out;
  for (const std::string& t : toks) out += t;
  return out;
}

int64_t JsonTokenizer::vocab_size() const { return static_cast<int64_t>(impl_->id_to_token.size()); }
int32_t JsonTokenizer::eos_id() const { return impl_->eos; }

void JsonTokenizer::set_eos_id(int32_t id) {
  if (id < 0 || id >= vocab_size())
    throw InputError(name() + ": EOS id " + std::to_string(id) + " is outside its vocabulary [0, " +
                     std::to_string(vocab_size()) + ")");
  impl_->eos = id;
}

std::string JsonTokenizer::name() const { return "tokenizer.json (" + impl_->path + ")"; }

int32_t JsonTokenizer::token_id(const std::string& token) const {
  auto it = impl_->vocab.find(token);
  return it == impl_->vocab.end() ? -1 : it->second;
}

}  // namespace dpo
