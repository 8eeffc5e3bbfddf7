#include "train/data.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <type_traits>
#include <utility>

#include "runtime/error.h"
#include "runtime/rng.h"

namespace dpo {

namespace {

using json = nlohmann::json;

// A malformed record: `reason` is the LoadStats key, `what` the message after "path:line: ".
struct Malformed {
  std::string reason, what;
};

[[noreturn]] void bad(const char* reason, std::string what) { throw Malformed{reason, std::move(what)}; }

std::string fld(const std::string& name) { return " (field '" + name + "')"; }

std::string num_text(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

// Which top-level field of a (possibly broken) JSON object line holds byte `pos`: a small scanner that tracks
// strings, nesting and whether the next string at depth 1 is a key. Used only to name the field in the
// invalid-UTF-8 message, since nlohmann-json refuses to parse such a line at all.
struct FieldAt {
  std::string key;       // the field whose value holds pos ("" if unknown)
  bool in_name = false;  // pos is inside a field name
};

FieldAt field_at(std::string_view s, size_t pos) {
  FieldAt r;
  int depth = 0;
  bool in_str = false, esc = false, is_key = false, expect_key = false;
  size_t start = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (i == pos) {
      if (in_str && is_key) r.in_name = true;
      return r;
    }
    if (in_str) {
      if (esc) {
        esc = false;
      } else if (c == '\\') {
        esc = true;
      } else if (c == '"') {
        in_str = false;
        if (is_key) r.key = std::string(s.substr(start, i - start));
      }
      continue;
    }
    switch (c) {
      case '"':
        in_str = true;
        is_key = depth == 1 && expect_key;
        start = i + 1;
        break;
      case '{':
      case '[':
        ++depth;
        if (depth == 1) expect_key = c == '{';
        break;
      case '}':
      case ']':
        --depth;
        break;
      case ',':
        if (depth == 1) expect_key = true;
        break;
      case ':':
        if (depth == 1) expect_key = false;
        break;
      default:
        break;
    }
  }
  return r;
}

// One sequence of a record: its text-form and token-id-form field names.
struct Role {
  const char* text;
  const char* ids;
};

std::vector<int32_t> parse_ids(const json& v, const std::string& key, int64_t vocab) {
  if (!v.is_array()) bad("wrong_type", std::string("expected an array of token ids, got ") + v.type_name() + fld(key));
  std::vector<int32_t> out;
  out.reserve(v.size());
  for (size_t k = 0; k < v.size(); ++k) {
    const json& e = v[k];
    if (!e.is_number_integer())
      bad("wrong_type", "element " + std::to_string(k) + " is " + (e.is_number() ? "a non-integer number" : e.type_name()) +
                            ", expected an integer token id" + fld(key));
    bool ok;
    std::string shown;
    int64_t id = 0;
    if (e.is_number_unsigned()) {
      const uint64_t u = e.get<uint64_t>();
      ok = u < static_cast<uint64_t>(vocab);
      shown = std::to_string(u);
      id = ok ? static_cast<int64_t>(u) : 0;
    } else {
      id = e.get<int64_t>();
      ok = id >= 0 && id < vocab;
      shown = std::to_string(id);
    }
    if (!ok)
      bad("id_out_of_range", "token id " + shown + " at index " + std::to_string(k) + " is outside [0, " +
                                 std::to_string(vocab) + ")" + fld(key));
    out.push_back(static_cast<int32_t>(id));
  }
  return out;
}

// The sequences of `roles` in order, from the text form or the token-id form; roles[0] is the prompt.
// Checks forms, presence, types, ids, UTF-8 and emptiness (prompt non-empty, completions non-empty before EOS).
// *eos: the EOS of the record's form (text: the tokenizer's; token ids: opt.ids_eos_id when set).
std::vector<std::vector<int32_t>> parse_sequences(const json& j, const std::vector<Role>& roles,
                                                  const Tokenizer& tok, const DataOptions& opt, int32_t* eos_out) {
  const char* text_seen = nullptr;
  const char* ids_seen = nullptr;
  for (const Role& r : roles) {
    if (!text_seen && j.contains(r.text)) text_seen = r.text;
    if (!ids_seen && j.contains(r.ids)) ids_seen = r.ids;
  }
  if (text_seen && ids_seen)
    bad("mixed_forms", std::string("record mixes the text form and the token-id form (fields '") + text_seen +
                           "' and '" + ids_seen + "')");
  if (!text_seen && !ids_seen) {
    std::string t, i;
    for (const Role& r : roles) {
      t += std::string(t.empty() ? "" : ", ") + "'" + r.text + "'";
      i += std::string(i.empty() ? "" : ", ") + "'" + r.ids + "'";
    }
    bad("no_form", "record has neither the text fields (" + t + ") nor the token-id fields (" + i + ")" +
                       fld(roles[0].text));
  }
  const bool text = text_seen != nullptr;
  const int64_t vocab = opt.vocab_size > 0 ? opt.vocab_size : tok.vocab_size();
  std::vector<std::vector<int32_t>> seqs;
  for (const Role& r : roles) {
    const std::string key = text ? r.text : r.ids;
    auto it = j.find(key);
    if (it == j.end()) bad("missing_field", "missing field" + fld(key));
    if (text) {
      if (!it->is_string()) bad("wrong_type", std::string("expected a string, got ") + it->type_name() + fld(key));
      const std::string& s = it->get_ref<const std::string&>();
      const size_t b = utf8_first_invalid(s);
      if (b != std::string::npos)
        bad("invalid_utf8", "invalid UTF-8 at byte " + std::to_string(b) + " of the string" + fld(key));
      seqs.push_back(tok.encode(s));
      for (size_t k = 0; k < seqs.back().size(); ++k)
        if (seqs.back()[k] >= vocab)
          bad("id_out_of_range", "the " + tok.name() + " tokenizer made token id " + std::to_string(seqs.back()[k]) +
                                     " (token " + std::to_string(k) + "), outside the model's vocabulary [0, " +
                                     std::to_string(vocab) + ")" + fld(key));
    } else {
      seqs.push_back(parse_ids(*it, key, vocab));
    }
  }
  const int32_t eos = text || opt.ids_eos_id < 0 ? tok.eos_id() : opt.ids_eos_id;
  if (opt.append_eos && eos < 0)
    throw InputError("no EOS id to append: the " + tok.name() + " tokenizer names none and neither the model's "
                     "config.json / generation_config.json nor the key 'eos_token_id' gives one");
  if (opt.append_eos && eos >= vocab)
    bad("id_out_of_range", "the EOS id " + std::to_string(eos) + " (the " + tok.name() +
                               " tokenizer's) is outside the model's vocabulary [0, " + std::to_string(vocab) +
                               "); token-id records end with the model's own EOS" + fld(text ? roles[1].text : roles[1].ids));
  *eos_out = eos;
  for (size_t k = 0; k < roles.size(); ++k) {
    const std::string key = text ? roles[k].text : roles[k].ids;
    const auto& s = seqs[k];
    if (k == 0 && s.empty())
      bad("empty_prompt", "empty prompt: the first completion token needs a preceding token" + fld(key));
    if (k > 0 && (s.empty() || (s.size() == 1 && s[0] == eos)))
      bad("empty_completion", "empty completion" + fld(key));
  }
  return seqs;
}

void append_eos(std::vector<int32_t>& c, int32_t eos) {
  if (c.empty() || c.back() != eos) c.push_back(eos);
}

enum class Cut { None, Truncated, Dropped };

// The truncation rules of data.h.
Cut truncate_record(std::vector<int32_t>& prompt, const std::vector<std::vector<int32_t>*>& comps,
                    const DataOptions& opt) {
  int64_t P = static_cast<int64_t>(prompt.size());
  if (opt.rule == TruncationRule::Trl1) {
    // TRL keeps a record iff len(prompt_ids) < max_length, then slices each prompt + completion to [:max_length].
    if (P >= opt.max_length) return Cut::Dropped;
    const int64_t keep = opt.max_length - P;  // >= 1
    bool cut = false;
    for (auto* c : comps)
      if (static_cast<int64_t>(c->size()) > keep) {
        c->resize(static_cast<size_t>(keep));
        cut = true;
      }
    return cut ? Cut::Truncated : Cut::None;
  }
  int64_t longest = 0;
  for (auto* c : comps) longest = std::max<int64_t>(longest, static_cast<int64_t>(c->size()));
  if (P + longest <= opt.max_length) return Cut::None;
  if (P > opt.max_prompt_length) {
    if (opt.truncation == TruncationMode::KeepEnd)
      prompt.erase(prompt.begin(), prompt.end() - opt.max_prompt_length);
    else
      prompt.resize(static_cast<size_t>(opt.max_prompt_length));
    P = opt.max_prompt_length;
  }
  if (P + longest > opt.max_length) {
    const int64_t keep = opt.max_length - P;  // >= 1 since max_prompt_length < max_length
    for (auto* c : comps)
      if (static_cast<int64_t>(c->size()) > keep) c->resize(static_cast<size_t>(keep));
  }
  return Cut::Truncated;
}

bool is_blank(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](char c) {
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v';
  });
}

// Reads `path` line by line; `parse(j, &cut)` turns one JSON object into a record (and says whether truncation cut
// or dropped it) or throws Malformed.
template <class Rec, class Parse>
std::vector<Rec> load_jsonl(const std::string& path, const DataOptions& opt, LoadStats* stats, Parse parse) {
  opt.validate();
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) throw InputError(path + ": cannot open data file (no such file)");
  if (std::filesystem::is_directory(path, ec)) throw InputError(path + ": cannot open data file (a directory)");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw InputError(path + ": cannot open data file");

  LoadStats st;
  std::vector<Rec> out;
  std::string line;
  int64_t lineno = 0;
  while (std::getline(f, line)) {
    ++lineno;
    if (lineno == 1 && line.rfind("\xEF\xBB\xBF", 0) == 0) line.erase(0, 3);
    if (is_blank(line)) continue;
    ++st.read;
    try {
      const size_t b = utf8_first_invalid(line);
      if (b != std::string::npos) {
        const FieldAt fa = field_at(line, b);
        std::string what = "invalid UTF-8 at byte " + std::to_string(b) + " of the line";
        if (fa.in_name)
          what += " (in a field name)";
        else if (!fa.key.empty())
          what += fld(fa.key);
        bad("invalid_utf8", what);
      }
      json j;
      // The keys seen so far in each open object (innermost last): a repeated key is refused, since JSON gives
      // it no meaning and nlohmann-json would silently keep the last value.
      std::vector<std::vector<std::string>> open_keys;
      const json::parser_callback_t dup_check = [&](int, json::parse_event_t ev, json& parsed) {
        if (ev == json::parse_event_t::object_start) {
          open_keys.emplace_back();
        } else if (ev == json::parse_event_t::object_end) {
          if (!open_keys.empty()) open_keys.pop_back();
        } else if (ev == json::parse_event_t::key && !open_keys.empty()) {
          const std::string k = parsed.get<std::string>();
          auto& seen = open_keys.back();
          if (std::find(seen.begin(), seen.end(), k) != seen.end())
            bad("duplicate_key", "duplicate key '" + k + "'" +
                                     (open_keys.size() > 1 ? " (in a nested object)" : " in the record"));
          seen.push_back(k);
        }
        return true;
      };
      try {
        j = json::parse(line, dup_check);
      } catch (const json::exception& e) {  // parse_error, or out_of_range for 1e999
        bad("bad_json", std::string("not valid JSON: ") + e.what());
      }
      if (!j.is_object()) bad("not_object", std::string("expected a JSON object, got ") + j.type_name());
      Cut cut = Cut::None;
      auto rec = parse(j, &cut);
      if (cut == Cut::Dropped) {
        ++st.dropped;
        continue;
      }
      out.push_back(std::move(rec));
      out.back().line = lineno;
      ++st.kept;
      if (cut == Cut::Truncated) ++st.truncated;
    } catch (const Malformed& m) {
      const std::string msg = path + ":" + std::to_string(lineno) + ": " + m.what;
      if (!opt.skip_malformed) throw InputError(msg);
      ++st.skipped;
      ++st.skipped_by_reason[m.reason];
    }
  }
  if (f.bad()) throw InputError(path + ": read error after line " + std::to_string(lineno));
  if (stats) *stats = st;
  if (out.empty()) {
    std::string why;
    if (st.read == 0) {
      why = "the file has no records";
    } else {
      why = std::to_string(st.read) + " records read";
      if (st.dropped > 0)
        why += ", " + std::to_string(st.dropped) + " dropped because the prompt alone has >= max_length (" +
               std::to_string(opt.max_length) + ") tokens (truncation: trl1, as TRL 1.x; raise max_length, or set "
               "truncation: legacy to cut such prompts to max_prompt_length instead)";
      if (st.skipped > 0) {
        why += ", " + std::to_string(st.skipped) + " skipped as malformed (";
        bool first = true;
        for (const auto& [reason, n] : st.skipped_by_reason) {
          why += std::string(first ? "" : ", ") + reason + ": " + std::to_string(n);
          first = false;
        }
        why += ")";
      }
    }
    throw InputError(path + ": no usable records: " + why);
  }
  return out;
}

double parse_score(const json& j, const char* key) {
  const json& v = j.at(key);
  if (!v.is_number()) bad("wrong_type", std::string("expected a number, got ") + v.type_name() + fld(key));
  const double x = v.get<double>();
  if (!std::isfinite(x)) bad("scores", "score is not finite" + fld(key));
  return x;
}

template <class W>
void fill_rows(Batch& b, const std::vector<std::pair<const std::vector<int32_t>*, const std::vector<int32_t>*>>& rows,
               int32_t pad_id) {
  const int64_t R = static_cast<int64_t>(rows.size()), T = b.T;
  int32_t* tok = b.tokens.data<int32_t>();
  int32_t* km = b.keymask.data<int32_t>();
  int32_t* tg = b.targets.data<int32_t>();
  W* w = b.weights.data<W>();
  for (int64_t r = 0; r < R; ++r) {
    const auto& p = *rows[r].first;
    const auto& c = *rows[r].second;
    const int64_t P = static_cast<int64_t>(p.size()), len = P + static_cast<int64_t>(c.size());
    int32_t* row = tok + r * T;
    for (int64_t t = 0; t < T; ++t) row[t] = t < P ? p[t] : t < len ? c[t - P] : pad_id;
    for (int64_t t = 0; t < T; ++t) {
      km[r * T + t] = t < len ? 1 : 0;
      const bool next_real = t + 1 < len;
      tg[r * T + t] = next_real ? row[t + 1] : -1;
      w[r * T + t] = (next_real && t + 1 >= P) ? W(1) : W(0);
    }
    b.completion_len[r] = len - P;
    b.tokens_total += len;
  }
}

Batch build_batch(const std::vector<std::pair<const std::vector<int32_t>*, const std::vector<int32_t>*>>& rows,
                  int64_t pairs, DType weight_dtype, int32_t pad_id) {
  if (weight_dtype != DType::F32 && weight_dtype != DType::F64)
    throw Error(std::string("make_batch: weight dtype must be F32 or F64, got ") + dtype_name(weight_dtype));
  if (pad_id < 0) throw Error("make_batch: pad_id " + std::to_string(pad_id) + " is negative");
  Batch b;
  b.pairs = pairs;
  for (const auto& [p, c] : rows) b.T = std::max<int64_t>(b.T, static_cast<int64_t>(p->size() + c->size()));
  const int64_t R = static_cast<int64_t>(rows.size());
  b.tokens = Tensor::host({R, b.T}, DType::I32);
  b.keymask = Tensor::host({R, b.T}, DType::I32);
  b.targets = Tensor::host({R, b.T}, DType::I32);
  b.weights = Tensor::host({R, b.T}, weight_dtype);
  b.completion_len.assign(static_cast<size_t>(R), 0);
  if (weight_dtype == DType::F32)
    fill_rows<float>(b, rows, pad_id);
  else
    fill_rows<double>(b, rows, pad_id);
  return b;
}

template <class Rec>
void check_indices(const std::vector<Rec>& data, const std::vector<int64_t>& indices, const char* fn) {
  if (indices.empty()) throw Error(std::string(fn) + ": no indices");
  const int64_t n = static_cast<int64_t>(data.size());
  for (int64_t i : indices)
    if (i < 0 || i >= n)
      throw Error(std::string(fn) + ": index " + std::to_string(i) + " outside [0, " + std::to_string(n) + ")");
}

void check_seqs(const std::vector<int32_t>& prompt, const std::vector<int32_t>& comp, int64_t index, const char* fn) {
  if (prompt.empty() || comp.empty())
    throw Error(std::string(fn) + ": record " + std::to_string(index) + " has an empty " +
                (prompt.empty() ? "prompt" : "completion"));
}

uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

void DataOptions::validate() const {
  if (max_length <= 0) throw InputError("data options: max_length must be > 0, got " + std::to_string(max_length));
  if (vocab_size < 0) throw InputError("data options: vocab_size must be >= 0, got " + std::to_string(vocab_size));
  if (ids_eos_id >= 0 && vocab_size > 0 && ids_eos_id >= vocab_size)
    throw InputError("data options: EOS id " + std::to_string(ids_eos_id) + " is outside the model's vocabulary [0, " +
                     std::to_string(vocab_size) + ")");
  if (pad_id < 0 || (vocab_size > 0 && pad_id >= vocab_size))
    throw InputError("data options: pad id " + std::to_string(pad_id) + " is outside the model's vocabulary [0, " +
                     std::to_string(vocab_size) + ")");
  if (rule == TruncationRule::Trl1) {
    if (truncation != TruncationMode::KeepStart)
      throw InputError("data options: truncation_mode keep_end is not supported with truncation: trl1 (use "
                       "keep_start, or truncation: legacy)");
    return;
  }
  if (max_prompt_length <= 0)
    throw InputError("data options: max_prompt_length must be > 0, got " + std::to_string(max_prompt_length));
  if (max_prompt_length >= max_length)
    throw InputError("data options: max_prompt_length (" + std::to_string(max_prompt_length) +
                     ") must be < max_length (" + std::to_string(max_length) + ")");
}

std::vector<PreferencePair> load_preferences(const std::string& path, const Tokenizer& tok, const DataOptions& opt,
                                             LoadStats* stats) {
  static const std::vector<Role> roles = {{"prompt", "prompt_ids"}, {"chosen", "chosen_ids"},
                                          {"rejected", "rejected_ids"}};
  int64_t with_scores = 0;
  auto parse = [&](const json& j, Cut* cut) {
    int32_t eos = -1;
    auto seqs = parse_sequences(j, roles, tok, opt, &eos);
    PreferencePair p;
    const bool hc = j.contains("score_chosen"), hr = j.contains("score_rejected");
    if (hc != hr)
      bad("scores", "score_chosen and score_rejected must be given together" +
                        fld(hc ? "score_rejected" : "score_chosen"));
    if (hc) {
      p.has_scores = true;
      p.score_chosen = parse_score(j, "score_chosen");
      p.score_rejected = parse_score(j, "score_rejected");
    }
    if (opt.require_score_gap) {
      if (!p.has_scores)
        bad("scores", "ODPO (odpo_alpha > 0) needs score_chosen and score_rejected in every record; this one has "
                      "neither");
      if (!(p.score_chosen > p.score_rejected))
        bad("scores", "ODPO (odpo_alpha > 0) needs score_chosen > score_rejected (its offset is log of the "
                      "difference), got score_chosen " + num_text(p.score_chosen) + ", score_rejected " +
                      num_text(p.score_rejected) + fld("score_chosen"));
      // The loss takes log(score_chosen - score_rejected) on the device, which cannot report an error: an
      // overflowing difference (both scores finite) is refused here, where the record's line is known.
      if (!std::isfinite(p.score_chosen - p.score_rejected))
        bad("scores", "ODPO (odpo_alpha > 0) needs a finite score_chosen - score_rejected, got score_chosen " +
                          num_text(p.score_chosen) + ", score_rejected " + num_text(p.score_rejected) +
                          " (the difference overflows)" + fld("score_chosen"));
    }
    p.prompt = std::move(seqs[0]);
    p.chosen = std::move(seqs[1]);
    p.rejected = std::move(seqs[2]);
    if (opt.append_eos) {
      append_eos(p.chosen, eos);
      append_eos(p.rejected, eos);
    }
    *cut = truncate_record(p.prompt, {&p.chosen, &p.rejected}, opt);
    if (p.has_scores && *cut != Cut::Dropped) ++with_scores;
    return p;
  };
  auto out = load_jsonl<PreferencePair>(path, opt, stats, parse);
  if (stats) stats->with_scores = with_scores;
  return out;
}

std::vector<SftExample> load_sft(const std::string& path, const Tokenizer& tok, const DataOptions& opt,
                                 LoadStats* stats) {
  static const std::vector<Role> roles = {{"prompt", "prompt_ids"}, {"completion", "completion_ids"}};
  auto parse = [&](const json& j, Cut* cut) {
    int32_t eos = -1;
    auto seqs = parse_sequences(j, roles, tok, opt, &eos);
    SftExample e;
    e.prompt = std::move(seqs[0]);
    e.completion = std::move(seqs[1]);
    if (opt.append_eos) append_eos(e.completion, eos);
    *cut = truncate_record(e.prompt, {&e.completion}, opt);
    return e;
  };
  return load_jsonl<SftExample>(path, opt, stats, parse);
}

Batch make_batch(const std::vector<PreferencePair>& data, const std::vector<int64_t>& indices, DType weight_dtype,
                 int32_t pad_id) {
  check_indices(data, indices, "make_batch");
  const int64_t P = static_cast<int64_t>(indices.size());
  std::vector<std::pair<const std::vector<int32_t>*, const std::vector<int32_t>*>> rows(2 * P);
  bool all_scores = true;
  for (int64_t i = 0; i < P; ++i) {
    const PreferencePair& p = data[indices[i]];
    check_seqs(p.prompt, p.chosen, indices[i], "make_batch");
    check_seqs(p.prompt, p.rejected, indices[i], "make_batch");
    rows[i] = {&p.prompt, &p.chosen};
    rows[P + i] = {&p.prompt, &p.rejected};
    all_scores = all_scores && p.has_scores;
  }
  Batch b = build_batch(rows, P, weight_dtype, pad_id);
  b.indices = indices;
  b.slots_used = b.tokens_total;
  b.has_scores = all_scores;
  if (all_scores) {
    for (int64_t i : indices) {
      b.score_chosen.push_back(data[i].score_chosen);
      b.score_rejected.push_back(data[i].score_rejected);
    }
  }
  return b;
}

Batch make_sft_batch(const std::vector<SftExample>& data, const std::vector<int64_t>& indices, DType weight_dtype,
                     int32_t pad_id) {
  check_indices(data, indices, "make_sft_batch");
  const int64_t P = static_cast<int64_t>(indices.size());
  std::vector<std::pair<const std::vector<int32_t>*, const std::vector<int32_t>*>> rows(P);
  for (int64_t i = 0; i < P; ++i) {
    const SftExample& e = data[indices[i]];
    check_seqs(e.prompt, e.completion, indices[i], "make_sft_batch");
    rows[i] = {&e.prompt, &e.completion};
  }
  Batch b = build_batch(rows, P, weight_dtype, pad_id);
  b.indices = indices;
  return b;
}

BatchLayout parse_batch_layout(const std::string& name) {
  if (name == "padded") return BatchLayout::Padded;
  if (name == "packed") return BatchLayout::Packed;
  if (name == "prefix_shared") return BatchLayout::PrefixShared;
  throw InputError("key 'batch_layout': unknown value '" + name + "'; valid: padded, packed, prefix_shared");
}

const char* batch_layout_name(BatchLayout l) {
  switch (l) {
    case BatchLayout::Padded: return "padded";
    case BatchLayout::Packed: return "packed";
    case BatchLayout::PrefixShared: return "prefix_shared";
  }
  return "?";
}

Batch make_layout_batch(const std::vector<PreferencePair>& data, const std::vector<int64_t>& indices,
                        BatchLayout layout, int64_t max_tokens_per_row, DType weight_dtype, int32_t pad_id) {
  if (layout == BatchLayout::Padded) return make_batch(data, indices, weight_dtype, pad_id);
  check_indices(data, indices, "make_layout_batch");
  if (max_tokens_per_row < 1)
    throw Error("make_layout_batch: max_tokens_per_row " + std::to_string(max_tokens_per_row) + " must be >= 1");
  if (weight_dtype != DType::F32 && weight_dtype != DType::F64)
    throw Error(std::string("make_layout_batch: weight dtype must be F32 or F64, got ") + dtype_name(weight_dtype));
  if (pad_id < 0) throw Error("make_layout_batch: pad_id " + std::to_string(pad_id) + " is negative");
  const bool shared = layout == BatchLayout::PrefixShared;
  const auto P = static_cast<int64_t>(indices.size());
  auto unit_len = [&](const PreferencePair& q) {
    const auto p = static_cast<int64_t>(q.prompt.size()), c = static_cast<int64_t>(q.chosen.size()),
               r = static_cast<int64_t>(q.rejected.size());
    return shared ? p + c + 1 + r : 2 * p + c + r;
  };
  // First fit, in the order of `indices`.
  std::vector<std::vector<int64_t>> rows;  // positions in `indices` of each row's pairs
  std::vector<int64_t> fill;
  for (int64_t i = 0; i < P; ++i) {
    const int64_t index = indices[static_cast<size_t>(i)];
    const PreferencePair& q = data[static_cast<size_t>(index)];
    check_seqs(q.prompt, q.chosen, index, "make_layout_batch");
    check_seqs(q.prompt, q.rejected, index, "make_layout_batch");
    const int64_t n = unit_len(q);
    size_t r = 0;
    while (r < rows.size() && fill[r] + n > max_tokens_per_row) ++r;
    if (r == rows.size()) {
      rows.emplace_back();
      fill.push_back(0);
    }
    rows[r].push_back(i);
    fill[r] += n;
  }
  Batch b;
  b.layout = layout;
  b.pairs = P;
  const auto R = static_cast<int64_t>(rows.size());
  for (int64_t f : fill) b.T = std::max(b.T, f);
  const int64_t T = b.T;
  b.tokens = Tensor::host({R, T}, DType::I32);
  b.keymask = Tensor::host({R, T}, DType::I32);
  b.targets = Tensor::host({R, T}, DType::I32);
  b.weights = Tensor::host({R, T}, weight_dtype);
  b.pos = Tensor::host({R, T}, DType::I32);
  b.span = Tensor::host({R, T, kSpanWidth}, DType::I32);
  int32_t* tok = b.tokens.data<int32_t>();
  int32_t* km = b.keymask.data<int32_t>();
  int32_t* tg = b.targets.data<int32_t>();
  int32_t* pos = b.pos.data<int32_t>();
  int32_t* sp = b.span.data<int32_t>();
  auto set_w = [&](int64_t slot, double v) {
    if (weight_dtype == DType::F32) b.weights.data<float>()[slot] = static_cast<float>(v);
    else b.weights.data<double>()[slot] = v;
  };
  for (int64_t slot = 0; slot < R * T; ++slot) {  // padding: sees itself only, never scored
    const auto t = static_cast<int32_t>(slot % T);
    tok[slot] = pad_id, km[slot] = 0, tg[slot] = -1, pos[slot] = 0;
    sp[slot * kSpanWidth + kSpanLo] = sp[slot * kSpanWidth + kSpanHoleLo] = sp[slot * kSpanWidth + kSpanHoleHi] = t;
    set_w(slot, 0.0);
  }
  b.seg.assign(static_cast<size_t>(4 * P), 0);
  b.completion_len.assign(static_cast<size_t>(2 * P), 0);
  // Writes tokens [first, first + n) of `seq` at slots [at, at + n) of `row`, positions pos0, pos0 + 1, ..., span
  // {lo, hole_lo, hole_hi} (hole_lo == hole_hi: no hole, written as the slot itself).
  auto put = [&](int64_t row, int64_t at, const std::vector<int32_t>& seq, int64_t first, int64_t n, int64_t pos0,
                 int64_t lo, int64_t hole_lo, int64_t hole_hi) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t t = at + j, slot = row * T + t;
      const bool hole = hole_lo < hole_hi;
      tok[slot] = seq[static_cast<size_t>(first + j)];
      km[slot] = 1;
      pos[slot] = static_cast<int32_t>(pos0 + j);
      sp[slot * kSpanWidth + kSpanLo] = static_cast<int32_t>(lo);
      sp[slot * kSpanWidth + kSpanHoleLo] = static_cast<int32_t>(hole ? hole_lo : t);
      sp[slot * kSpanWidth + kSpanHoleHi] = static_cast<int32_t>(hole ? hole_hi : t);
    }
  };
  // Sequence s is scored at slots [from, from + |comp|) of `row`, which predict comp's tokens (weight 1).
  auto score = [&](int64_t s, int64_t row, int64_t from, const std::vector<int32_t>& comp) {
    const auto n = static_cast<int64_t>(comp.size());
    for (int64_t j = 0; j < n; ++j) {
      const int64_t slot = row * T + from + j;
      tg[slot] = comp[static_cast<size_t>(j)];
      set_w(slot, 1.0);
    }
    b.seg[static_cast<size_t>(2 * s)] = row * T + from;
    b.seg[static_cast<size_t>(2 * s + 1)] = row * T + from + n;
    b.completion_len[static_cast<size_t>(s)] = n;
  };
  int64_t q = 0;  // batch order: row by row
  b.has_scores = true;
  for (int64_t row = 0; row < R; ++row) {
    int64_t at = 0;
    b.row_pairs.push_back(static_cast<int64_t>(rows[static_cast<size_t>(row)].size()));
    for (int64_t i : rows[static_cast<size_t>(row)]) {
      const int64_t index = indices[static_cast<size_t>(i)];
      const PreferencePair& x = data[static_cast<size_t>(index)];
      const auto p = static_cast<int64_t>(x.prompt.size()), c = static_cast<int64_t>(x.chosen.size()),
                 r = static_cast<int64_t>(x.rejected.size());
      b.indices.push_back(index);
      b.has_scores = b.has_scores && x.has_scores;
      b.score_chosen.push_back(x.score_chosen);
      b.score_rejected.push_back(x.score_rejected);
      b.tokens_total += 2 * p + c + r;
      if (shared) {
        // [prompt | chosen | dup | rejected]; dup and rejected hide [prompt_last, dup) (kernels/batch_layout.h).
        const int64_t s0 = at, d = at + p + c;
        put(row, s0, x.prompt, 0, p, 0, s0, 0, 0);
        put(row, s0 + p, x.chosen, 0, c, p, s0, 0, 0);
        put(row, d, x.prompt, p - 1, 1, p - 1, s0, s0 + p - 1, d);
        put(row, d + 1, x.rejected, 0, r, p, s0, s0 + p - 1, d);
        score(2 * q, row, s0 + p - 1, x.chosen);
        score(2 * q + 1, row, d, x.rejected);
        at += p + c + 1 + r;
      } else {
        // [prompt | chosen] [prompt | rejected], each a sequence of its own with positions from 0.
        const int64_t a = at, e = at + p + c;
        put(row, a, x.prompt, 0, p, 0, a, 0, 0);
        put(row, a + p, x.chosen, 0, c, p, a, 0, 0);
        put(row, e, x.prompt, 0, p, 0, e, 0, 0);
        put(row, e + p, x.rejected, 0, r, p, e, 0, 0);
        score(2 * q, row, a + p - 1, x.chosen);
        score(2 * q + 1, row, e + p - 1, x.rejected);
        at += 2 * p + c + r;
      }
      ++q;
    }
    b.slots_used += at;
  }
  if (!b.has_scores) b.score_chosen.clear(), b.score_rejected.clear();
  return b;
}

void apply_ld_alpha(Batch& b, double ld_alpha) {
  if (!(ld_alpha > 0 && ld_alpha <= 1))
    throw Error("apply_ld_alpha: ld_alpha must be in (0, 1], got " + std::to_string(ld_alpha));
  if (ld_alpha == 1) return;
  const int64_t P = b.pairs, T = b.T;
  const bool padded = b.layout == BatchLayout::Padded;
  DPO_ASSERT(padded ? b.weights.size(0) == 2 * P : static_cast<int64_t>(b.seg.size()) == 4 * P,
             "apply_ld_alpha: not a preference batch");
  auto run = [&](auto* w) {
    using W = std::remove_pointer_t<decltype(w)>;
    // Sequence s (0: chosen, 1: rejected of pair q) spans slots [lo, hi).
    auto range = [&](int64_t q, int s) -> std::pair<int64_t, int64_t> {
      if (padded) {
        const int64_t row = s == 0 ? q : P + q;
        return {row * T, (row + 1) * T};
      }
      const auto i = static_cast<size_t>(2 * (2 * q + s));
      return {b.seg[i], b.seg[i + 1]};
    };
    auto scored = [&](std::pair<int64_t, int64_t> r) {
      int64_t n = 0;
      for (int64_t i = r.first; i < r.second; ++i) n += w[i] != W(0) ? 1 : 0;
      return n;
    };
    for (int64_t q = 0; q < P; ++q) {
      const auto rc = range(q, 0), rr = range(q, 1);
      const int64_t shared = std::min(scored(rc), scored(rr));
      for (const auto& r : {rc, rr}) {
        int64_t k = 0;
        for (int64_t i = r.first; i < r.second; ++i) {
          if (w[i] == W(0)) continue;
          if (k++ >= shared) w[i] = static_cast<W>(static_cast<double>(w[i]) * ld_alpha);
        }
      }
    }
  };
  if (b.weights.dtype() == DType::F32) run(b.weights.data<float>());
  else run(b.weights.data<double>());
}

void pad_batch_columns(Batch& b, int64_t T, int32_t pad_id) {
  if (T < b.T) throw Error("pad_batch_columns: T " + std::to_string(T) + " is below the batch's " + std::to_string(b.T));
  if (pad_id < 0) throw Error("pad_batch_columns: pad_id " + std::to_string(pad_id) + " is negative");
  if (T == b.T) return;
  const int64_t R = b.tokens.size(0), T0 = b.T;
  auto widen = [&](const Tensor& src, auto fill) {
    using E = decltype(fill);
    Tensor dst = Tensor::host({R, T}, src.dtype());
    for (int64_t r = 0; r < R; ++r) {
      const E* a = src.data<E>() + r * T0;
      E* d = dst.data<E>() + r * T;
      std::copy(a, a + T0, d);
      std::fill(d + T0, d + T, fill);
    }
    return dst;
  };
  b.tokens = widen(b.tokens, int32_t{pad_id});
  b.keymask = widen(b.keymask, int32_t{0});
  b.targets = widen(b.targets, int32_t{-1});
  b.weights = b.weights.dtype() == DType::F32 ? widen(b.weights, 0.0f) : widen(b.weights, 0.0);
  b.T = T;
}

std::vector<int64_t> balanced_cuts(const std::vector<int64_t>& costs, int parts) {
  if (parts < 1) throw Error("balanced_cuts: parts must be >= 1, got " + std::to_string(parts));
  const auto n = static_cast<int64_t>(costs.size());
  int64_t lo = 0, hi = 0;
  for (int64_t c : costs) {
    if (c < 0) throw Error("balanced_cuts: a negative cost " + std::to_string(c));
    lo = std::max(lo, c);
    hi += c;
  }
  // The ranges a greedy left-to-right fill needs under bound m.
  auto ranges_for = [&](int64_t m) {
    int64_t k = 1, run = 0;
    for (int64_t c : costs) {
      if (run + c > m) ++k, run = 0;
      run += c;
    }
    return k;
  };
  while (lo < hi) {  // the smallest bound that `parts` ranges can keep
    const int64_t mid = lo + (hi - lo) / 2;
    if (ranges_for(mid) <= parts) hi = mid;
    else lo = mid + 1;
  }
  std::vector<int64_t> cuts{0};
  int64_t run = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (run + costs[static_cast<size_t>(i)] > lo && static_cast<int>(cuts.size()) < parts) cuts.push_back(i), run = 0;
    run += costs[static_cast<size_t>(i)];
  }
  while (static_cast<int>(cuts.size()) <= parts) cuts.push_back(n);
  return cuts;
}

int64_t micro_batch_cost(const std::vector<PreferencePair>& data, const std::vector<int64_t>& indices,
                         BatchLayout layout) {
  int64_t cost = 0, longest = 0;
  for (int64_t i : indices) {
    const PreferencePair& q = data[static_cast<size_t>(i)];
    const auto p = static_cast<int64_t>(q.prompt.size()), c = static_cast<int64_t>(q.chosen.size()),
               r = static_cast<int64_t>(q.rejected.size());
    longest = std::max(longest, p + std::max(c, r));
    cost += layout == BatchLayout::PrefixShared ? p + c + 1 + r : 2 * p + c + r;
  }
  return layout == BatchLayout::Padded ? 2 * static_cast<int64_t>(indices.size()) * longest : cost;
}

std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch) {
  if (n < 0) throw Error("epoch_order: n = " + std::to_string(n) + " is negative");
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[i] = i;
  Rng rng(mix64(seed ^ mix64(static_cast<uint64_t>(epoch) ^ 0x5851f42d4c957f2dull)));
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i + 1)));
    std::swap(v[i], v[j]);
  }
  return v;
}

}  // namespace dpo
