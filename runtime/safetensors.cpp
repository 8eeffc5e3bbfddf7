#include "runtime/safetensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

namespace dpo {

namespace {

using json = nlohmann::json;

[[noreturn]] void bad(const std::string& path, const std::string& what) {
  throw InputError(path + ": " + what);
}

// Largest header we accept. HF's own reader uses 100 MB.
constexpr int64_t kMaxHeader = 100'000'000;

float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// double -> bf16 with one rounding (to nearest even). Going through float with round-to-nearest would round twice
// (a double just above a bf16 tie can become a float exactly on the tie, then round to even, the wrong way). So
// the intermediate float is rounded to odd (truncate, then set the last bit when inexact): with 16 more bits than
// bf16, round-to-odd then round-to-nearest equals one round-to-nearest.
uint16_t f64_to_bf16(double v) {
  float f = static_cast<float>(v);
  if (std::isfinite(f) && static_cast<double>(f) != v) {
    if (std::fabs(static_cast<double>(f)) > std::fabs(v)) f = std::nextafter(f, 0.0f);
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    bits |= 1u;
    std::memcpy(&f, &bits, 4);
  }
  return f32_to_bf16(f);
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

double load_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F64: return static_cast<const double*>(p)[i];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return 0;
  }
}

bool is_float(DType t) { return t == DType::F32 || t == DType::F64 || t == DType::BF16 || t == DType::F16; }
bool is_int(DType t) { return t == DType::I32 || t == DType::I64; }

}  // namespace

Tensor convert_host(const Tensor& src, DType dtype, const std::string& what) {
  if (src.dtype() == dtype) {
    Tensor out = Tensor::host(src.shape(), dtype);
    std::memcpy(out.raw(), src.raw(), static_cast<size_t>(src.nbytes()));
    return out;
  }
  Tensor out = Tensor::host(src.shape(), dtype);
  const int64_t n = src.numel();
  if (is_float(src.dtype()) && (dtype == DType::F32 || dtype == DType::F64 || dtype == DType::BF16)) {
    for (int64_t i = 0; i < n; ++i) {
      double v = load_float(src.raw(), src.dtype(), i);
      if (dtype == DType::F32) out.data<float>()[i] = static_cast<float>(v);
      else if (dtype == DType::F64) out.data<double>()[i] = v;
      else static_cast<uint16_t*>(out.raw())[i] = f64_to_bf16(v);
    }
    return out;
  }
  if (is_int(src.dtype()) && is_int(dtype)) {
    for (int64_t i = 0; i < n; ++i) {
      int64_t v = src.dtype() == DType::I32 ? src.data<int32_t>()[i] : src.data<int64_t>()[i];
      if (dtype == DType::I32) {
        if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
          throw InputError(what + ": value " + std::to_string(v) + " at index " + std::to_string(i) +
                           " does not fit in I32");
        out.data<int32_t>()[i] = static_cast<int32_t>(v);
      } else {
        out.data<int64_t>()[i] = v;
      }
    }
    return out;
  }
  throw InputError(what + ": cannot convert dtype " + dtype_name(src.dtype()) + " to " + dtype_name(dtype));
}

SafetensorsFile::SafetensorsFile(std::string path) : path_(std::move(path)) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path_, ec)) bad(path_, "no such file");
  const int64_t file_size = static_cast<int64_t>(std::filesystem::file_size(path_, ec));
  if (ec) bad(path_, "cannot read file size: " + ec.message());
  std::ifstream f(path_, std::ios::binary);
  if (!f) bad(path_, "cannot open for reading");
  if (file_size < 8) bad(path_, "truncated: " + std::to_string(file_size) + " bytes, no 8-byte header length");
  uint64_t n = 0;
  unsigned char len_bytes[8];
  f.read(reinterpret_cast<char*>(len_bytes), 8);
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];  // little-endian
  if (n > static_cast<uint64_t>(kMaxHeader))
    bad(path_, "header length " + std::to_string(n) + " exceeds the " + std::to_string(kMaxHeader) + "-byte limit");
  if (static_cast<int64_t>(n) > file_size - 8)
    bad(path_, "truncated: header length " + std::to_string(n) + " but only " + std::to_string(file_size - 8) +
                   " bytes follow");
  std::string header(n, '\0');
  f.read(header.data(), static_cast<std::streamsize>(n));
  if (!f) bad(path_, "read error in header");
  data_start_ = 8 + static_cast<int64_t>(n);
  data_bytes_ = file_size - data_start_;

  json j;
  try {
    j = json::parse(header);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number such as 1e999
    bad(path_, std::string("header is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) bad(path_, "header is not a JSON object");

  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) bad(path_, "__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) bad(path_, "__metadata__." + m.key() + " is not a string");
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor '" + name + "'";
    if (!v.is_object()) bad(path_, where + ": entry is not an object");
    if (!v.contains("dtype") || !v["dtype"].is_string()) bad(path_, where + ": missing or non-string field 'dtype'");
    if (!v.contains("shape") || !v["shape"].is_array()) bad(path_, where + ": missing or non-array field 'shape'");
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2)
      bad(path_, where + ": field 'data_offsets' must be an array of two integers");
    SafetensorsEntry e;
    e.name = name;
    const std::string dt = v["dtype"].get<std::string>();
    if (!dtype_from_name(dt, &e.dtype)) bad(path_, where + ": unsupported dtype '" + dt + "'");
    int64_t numel = 1;
    for (const json& d : v["shape"]) {
      if (!d.is_number_unsigned()) bad(path_, where + ": field 'shape' holds a non-integer or negative dimension");
      const uint64_t dim = d.get<uint64_t>();
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max() / std::max<int64_t>(numel, 1) / 8))
        bad(path_, where + ": field 'shape' is too large");
      e.shape.push_back(static_cast<int64_t>(dim));
      numel *= static_cast<int64_t>(dim);
    }
    for (const json& o : v["data_offsets"])
      if (!o.is_number_unsigned()) bad(path_, where + ": field 'data_offsets' holds a non-integer or negative value");
    const uint64_t b = v["data_offsets"][0].get<uint64_t>(), en = v["data_offsets"][1].get<uint64_t>();
    if (b > en) bad(path_, where + ": data_offsets begin " + std::to_string(b) + " > end " + std::to_string(en));
    if (en > static_cast<uint64_t>(data_bytes_))
      bad(path_, where + ": truncated: data ends at byte " + std::to_string(en) + " but the data section has " +
                     std::to_string(data_bytes_) + " bytes");
    e.begin = static_cast<int64_t>(b);
    e.end = static_cast<int64_t>(en);
    if (e.end - e.begin != numel * dtype_size(e.dtype))
      bad(path_, where + ": " + std::to_string(e.end - e.begin) + " bytes for shape " + shape_str(e.shape) + " " +
                     dt + " (expected " + std::to_string(numel * dtype_size(e.dtype)) + ")");
    entries_.push_back(std::move(e));
  }
  // Overlapping tensors mean a corrupted header.
  std::vector<const SafetensorsEntry*> by_offset;
  for (const auto& e : entries_) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  // Compare each non-empty tensor with the non-empty one that reaches furthest before it (empty tensors occupy
  // no bytes, so they neither overlap nor hide an overlap).
  const SafetensorsEntry* reach = nullptr;
  for (const SafetensorsEntry* e : by_offset) {
    if (e->end == e->begin) continue;
    if (reach && e->begin < reach->end)
      bad(path_, "tensors '" + reach->name + "' and '" + e->name + "' overlap");
    if (!reach || e->end > reach->end) reach = e;
  }
}

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  for (const auto& e : entries_)
    if (e.name == name) return &e;
  return nullptr;
}

Tensor SafetensorsFile::read(const std::string& name) const {
  const SafetensorsEntry* e = find(name);
  if (!e) bad(path_, "tensor '" + name + "' not found");
  Tensor t = Tensor::host(e->shape, e->dtype);
  std::ifstream f(path_, std::ios::binary);
  if (!f) bad(path_, "cannot open for reading");
  f.seekg(data_start_ + e->begin);
  f.read(static_cast<char*>(t.raw()), static_cast<std::streamsize>(e->end - e->begin));
  if (!f) bad(path_, "tensor '" + name + "': read error (file changed or truncated while reading?)");
  return t;
}

Tensor SafetensorsFile::read_as(const std::string& name, DType dtype) const {
  Tensor raw = read(name);
  if (raw.dtype() == dtype) return raw;
  return convert_host(raw, dtype, path_ + ": tensor '" + name + "'");
}

SafetensorsDir::SafetensorsDir(std::string dir) : dir_(std::move(dir)) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir_, ec)) throw InputError(dir_ + ": not a model directory");
  const fs::path root(dir_);
  const fs::path single = root / kSafetensorsSingleName, index = root / kSafetensorsIndexName;
  const bool has_single = fs::exists(single, ec), has_index = fs::exists(index, ec);
  if (!has_single && !has_index)
    throw InputError(single.string() + ": no such file (and no " + kSafetensorsIndexName +
                     " of sharded weights either): the directory holds no model weights");
  if (has_single) {  // it wins over an index, as in transformers
    open_single(single.string());
    return;
  }

  sharded_ = true;
  path_ = index.string();
  auto bad_index = [&](const std::string& what) -> void { throw InputError(path_ + ": " + what); };
  std::ifstream in(index, std::ios::binary);
  if (!in) bad_index("cannot open for reading");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) bad_index("read error");
  json j;
  // A key repeated in an object is refused: nlohmann-json would keep the last value, so a tensor mapped to two
  // shards would be read from one of them silently.
  std::vector<std::set<std::string>> open_keys;
  const json::parser_callback_t dup_check = [&](int, json::parse_event_t ev, json& parsed) {
    if (ev == json::parse_event_t::object_start) {
      open_keys.emplace_back();
    } else if (ev == json::parse_event_t::object_end) {
      if (!open_keys.empty()) open_keys.pop_back();
    } else if (ev == json::parse_event_t::key && !open_keys.empty()) {
      const std::string k = parsed.get<std::string>();
      if (!open_keys.back().insert(k).second)
        bad_index("key '" + k + "' appears twice in one object" +
                  (open_keys.size() == 2 ? " (a tensor mapped twice in weight_map?)" : ""));
    }
    return true;
  };
  try {
    j = json::parse(text.str(), dup_check);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number such as 1e999
    bad_index(std::string("not valid JSON: ") + e.what());
  }
  if (!j.is_object()) bad_index("top level is not a JSON object");
  if (!j.contains("weight_map") || !j["weight_map"].is_object())
    bad_index("missing or non-object field 'weight_map'");
  const json& wm = j["weight_map"];
  if (wm.empty()) bad_index("field 'weight_map' names no tensors");

  std::map<std::string, std::string> shard_of;  // tensor -> shard name, as the index says
  std::map<std::string, size_t> shard_slot;     // shard name -> index into files_
  for (auto it = wm.begin(); it != wm.end(); ++it) {
    const std::string where = "weight_map['" + it.key() + "']";
    if (!it.value().is_string()) bad_index(where + " is " + it.value().dump() + ", not a shard file name");
    const std::string name = it.value().get<std::string>();
    if (!shard_slot.count(name)) {
      const fs::path rel(name);
      bool escapes = name.empty() || rel.is_absolute() || rel.has_root_directory() || rel.has_root_name();
      for (const auto& part : rel) escapes = escapes || part == "..";
      if (escapes)
        bad_index(where + " names shard '" + name +
                  "', which is not a file inside the directory (absolute paths and '..' are refused)");
      const fs::path shard = root / rel;
      if (!fs::is_regular_file(shard, ec))
        bad_index(where + " names shard '" + name + "', which does not exist (" + shard.string() + ")");
      shard_slot[name] = files_.size();
      files_.emplace_back(shard.string());  // validates the shard itself
    }
    shard_of[it.key()] = name;
  }
  int64_t total = 0;
  for (const auto& [name, slot] : shard_slot) {
    const SafetensorsFile& f = files_[slot];
    for (const auto& e : f.entries()) {
      auto it = shard_of.find(e.name);
      if (it == shard_of.end())
        bad_index("shard '" + name + "' holds tensor '" + e.name + "', which weight_map does not name");
      if (it->second != name)
        bad_index("tensor '" + e.name + "' is in two shards: '" + name + "' and '" + it->second +
                  "' (weight_map names '" + it->second + "')");
      total += e.end - e.begin;
    }
  }
  for (const auto& [tensor, name] : shard_of) {
    const SafetensorsEntry* e = files_[shard_slot.at(name)].find(tensor);
    if (!e) bad_index("weight_map maps tensor '" + tensor + "' to shard '" + name + "', which does not hold it");
    entries_.push_back(*e);
    file_index_[tensor] = shard_slot.at(name);
  }  // shard_of is a std::map: entries_ come out sorted by name
  if (j.contains("metadata") && !j["metadata"].is_null()) {
    const json& m = j["metadata"];
    if (!m.is_object()) bad_index("field 'metadata' is not an object");
    if (m.contains("total_size")) {
      const json& ts = m["total_size"];
      // An integer; some writers store it as a float with an integral value.
      const bool integral = ts.is_number_unsigned() ||
                            (ts.is_number_float() && ts.get<double>() >= 0 && ts.get<double>() < 9.0e18 &&
                             std::floor(ts.get<double>()) == ts.get<double>());
      if (!integral) bad_index("field 'metadata.total_size' is " + ts.dump() + ", not a byte count");
      const int64_t said = ts.is_number_unsigned() ? static_cast<int64_t>(ts.get<uint64_t>())
                                                   : static_cast<int64_t>(ts.get<double>());
      if (said != total)
        bad_index("field 'metadata.total_size' is " + std::to_string(said) + " but the shards' tensors hold " +
                  std::to_string(total) + " bytes");
    }
  }
}

SafetensorsDir SafetensorsDir::open(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) return SafetensorsDir(path);
  SafetensorsDir d;
  d.dir_ = std::filesystem::path(path).parent_path().string();
  d.open_single(path);
  return d;
}

void SafetensorsDir::open_single(const std::string& path) {
  path_ = path;
  files_.emplace_back(path);
  entries_ = files_[0].entries();
  for (const auto& e : entries_) file_index_[e.name] = 0;
  std::sort(entries_.begin(), entries_.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
}

std::vector<std::string> SafetensorsDir::files() const {
  std::vector<std::string> out;
  for (const auto& f : files_) out.push_back(f.path());
  std::sort(out.begin(), out.end());
  return out;
}

const SafetensorsEntry* SafetensorsDir::find(const std::string& name) const {
  auto it = std::lower_bound(entries_.begin(), entries_.end(), name,
                             [](const SafetensorsEntry& e, const std::string& n) { return e.name < n; });
  return it != entries_.end() && it->name == name ? &*it : nullptr;
}

const SafetensorsFile& SafetensorsDir::holder(const std::string& name) const {
  auto it = file_index_.find(name);
  if (it == file_index_.end()) bad(path_, "tensor '" + name + "' not found");
  return files_[it->second];
}

const std::string& SafetensorsDir::file_of(const std::string& name) const { return holder(name).path(); }

Tensor SafetensorsDir::read(const std::string& name) const { return holder(name).read(name); }

Tensor SafetensorsDir::read_as(const std::string& name, DType dtype) const { return holder(name).read_as(name, dtype); }

namespace {

std::string temp_name(const std::string& path) { return path + ".tmp." + std::to_string(::getpid()); }

void commit_file(std::FILE* f, const std::string& tmp, const std::string& path) {
  bool ok = std::fflush(f) == 0 && ::fsync(fileno(f)) == 0;
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) {
    std::remove(tmp.c_str());
    throw Error("writing " + tmp + " failed: " + std::strerror(errno));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Error("renaming " + tmp + " to " + path + " failed: " + std::strerror(errno));
  }
}

}  // namespace

void write_file_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = temp_name(path);
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw Error("cannot create " + tmp + ": " + std::strerror(errno));
  if (std::fwrite(text.data(), 1, text.size(), f) != text.size()) {
    std::fclose(f);
    std::remove(tmp.c_str());
    throw Error("writing " + tmp + " failed");
  }
  commit_file(f, tmp, path);
}

namespace {

// Writes the file of `tensors` under a temporary name beside `path` (flushed and synced to disk, closed) and
// returns that name; on failure nothing is left behind.
std::string write_safetensors_temporary(const std::string& path,
                                        const std::vector<std::pair<std::string, Tensor>>& tensors,
                                        const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  int64_t offset = 0;
  std::set<std::string> seen;
  for (const auto& [name, t] : tensors) {
    DPO_ASSERT(t.device().kind == DeviceKind::CPU, "save_safetensors takes host tensors: " + name);
    DPO_ASSERT(seen.insert(name).second, "duplicate tensor name " + name);
    header[name] = {{"dtype", dtype_name(t.dtype())},
                    {"shape", t.shape()},
                    {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string h = header.dump();
  // Pad the header with spaces so the data section starts 8-byte aligned, as HF's writer does.
  while ((8 + h.size()) % 8 != 0) h.push_back(' ');
  const std::string tmp = temp_name(path);
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw Error("cannot create " + tmp + ": " + std::strerror(errno));
  unsigned char len[8];
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
  bool ok = std::fwrite(len, 1, 8, f) == 8 && std::fwrite(h.data(), 1, h.size(), f) == h.size();
  for (const auto& [name, t] : tensors) {
    if (!ok) break;
    ok = std::fwrite(t.raw(), 1, static_cast<size_t>(t.nbytes()), f) == static_cast<size_t>(t.nbytes());
  }
  ok = ok && std::fflush(f) == 0 && ::fsync(fileno(f)) == 0;
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) {
    const int err = errno;
    std::remove(tmp.c_str());
    throw Error("writing " + tmp + " failed: " + std::strerror(err));
  }
  return tmp;
}

void rename_or_throw(const std::string& from, const std::string& to) {
  if (std::rename(from.c_str(), to.c_str()) != 0) {
    const int err = errno;
    std::remove(from.c_str());
    throw Error("renaming " + from + " to " + to + " failed: " + std::strerror(err));
  }
}

// Makes the renames and removals in `dir` durable (best effort: some file systems refuse fsync on a directory).
void sync_directory(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;
  (void)::fsync(fd);
  ::close(fd);
}

// HF's shard names: <prefix>-<5 digits>-of-<5 digits>.safetensors (the pattern transformers' save_pretrained
// removes stale shards by).
bool is_shard_name(const std::string& name) {
  static const std::regex re("model-[0-9]{5}-of-[0-9]{5}\\.safetensors");
  return std::regex_match(name, re);
}

std::string shard_name(size_t k, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", k + 1, n);
  return buf;
}

}  // namespace

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  rename_or_throw(write_safetensors_temporary(path, tensors, metadata), path);
}

int64_t parse_shard_size(const std::string& text, const std::string& what) {
  auto fail = [&]() -> int64_t {
    throw InputError(what + ": '" + text +
                     "' is not a shard size; expected a positive number of bytes or a number with a unit KB, MB, GB "
                     "or TB (\"5GB\", \"500MB\"), as HF's max_shard_size");
  };
  std::string t = text;
  while (!t.empty() && std::isspace(static_cast<unsigned char>(t.back()))) t.pop_back();
  while (!t.empty() && std::isspace(static_cast<unsigned char>(t.front()))) t.erase(t.begin());
  double mult = 1;
  if (t.size() > 2) {
    std::string unit = t.substr(t.size() - 2);
    for (char& ch : unit) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    const std::map<std::string, double> units = {{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12}};
    if (auto it = units.find(unit); it != units.end()) {
      mult = it->second;
      t = t.substr(0, t.size() - 2);
      while (!t.empty() && std::isspace(static_cast<unsigned char>(t.back()))) t.pop_back();
    }
  }
  // Digits, and with a unit one decimal point (HF parses the number before a unit as a float).
  if (t.empty() || std::count(t.begin(), t.end(), '.') > (mult > 1 ? 1 : 0)) return fail();
  for (char ch : t)
    if (!std::isdigit(static_cast<unsigned char>(ch)) && ch != '.') return fail();
  std::istringstream in(t);
  in.imbue(std::locale::classic());
  double v = 0;
  in >> v;
  if (!in || !in.eof()) return fail();
  const double bytes = std::floor(v * mult);  // HF: int(value * multiplier)
  if (!(bytes >= 1) || bytes > 9.0e18) return fail();
  return static_cast<int64_t>(bytes);
}

std::vector<std::vector<size_t>> plan_shards(const std::vector<int64_t>& nbytes, int64_t max_shard_bytes) {
  DPO_ASSERT(max_shard_bytes > 0, "plan_shards: max_shard_bytes must be positive");
  std::vector<std::vector<size_t>> shards;
  std::vector<size_t> current;
  int64_t current_bytes = 0;
  for (size_t i = 0; i < nbytes.size(); ++i) {
    if (nbytes[i] > max_shard_bytes) {  // on its own, placed where it is met (the current shard stays open)
      shards.push_back({i});
      continue;
    }
    if (current_bytes + nbytes[i] > max_shard_bytes) {
      shards.push_back(std::move(current));
      current.clear();
      current_bytes = 0;
    }
    current.push_back(i);
    current_bytes += nbytes[i];
  }
  if (!current.empty()) shards.push_back(std::move(current));
  return shards;
}

std::vector<std::string> save_safetensors_dir(const std::string& dir,
                                              const std::vector<std::pair<std::string, Tensor>>& tensors,
                                              const std::map<std::string, std::string>& metadata,
                                              int64_t max_shard_bytes) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw Error("cannot create directory " + dir + ": " + ec.message());
  const fs::path root(dir);
  std::vector<int64_t> sizes;
  for (const auto& nt : tensors) sizes.push_back(nt.second.nbytes());
  std::vector<std::vector<size_t>> plan = plan_shards(sizes, max_shard_bytes);
  // What an earlier save left that the new set replaces: removed once the new set is in place.
  auto remove_stale = [&](const std::set<std::string>& keep) {
    std::vector<fs::path> stale;
    for (const auto& e : fs::directory_iterator(root, ec)) {
      const std::string n = e.path().filename().string();
      if (keep.count(n)) continue;
      if (n == kSafetensorsSingleName || n == kSafetensorsIndexName || is_shard_name(n)) stale.push_back(e.path());
    }
    for (const auto& p : stale) {
      fs::remove(p, ec);
      if (ec) throw Error("cannot remove " + p.string() + " (left by an earlier save): " + ec.message());
    }
    sync_directory(dir);
  };

  if (plan.size() <= 1) {
    save_safetensors((root / kSafetensorsSingleName).string(), tensors, metadata);
    remove_stale({kSafetensorsSingleName});  // the single file wins over an index already, so this is tidying
    return {kSafetensorsSingleName};
  }

  const size_t n = plan.size();
  std::vector<std::string> names, temporaries;
  json weight_map = json::object();
  int64_t total = 0;
  try {
    for (size_t k = 0; k < n; ++k) {
      names.push_back(shard_name(k, n));
      std::vector<std::pair<std::string, Tensor>> part;
      for (size_t i : plan[k]) {
        part.push_back(tensors[i]);
        weight_map[tensors[i].first] = names.back();
        total += tensors[i].second.nbytes();
      }
      temporaries.push_back(write_safetensors_temporary((root / names.back()).string(), part, metadata));
    }
  } catch (...) {
    for (const auto& t : temporaries) std::remove(t.c_str());
    throw;
  }
  // An earlier index over shards of the same names must not be left pointing at a mix of old and new files.
  const fs::path index = root / kSafetensorsIndexName;
  bool replaces = false;
  for (const auto& nm : names) replaces = replaces || fs::exists(root / nm, ec);
  if (replaces && fs::exists(index, ec)) {
    fs::remove(index, ec);
    if (ec) {
      for (const auto& t : temporaries) std::remove(t.c_str());
      throw Error("cannot remove " + index.string() + " before replacing its shards: " + ec.message());
    }
    sync_directory(dir);
  }
  for (size_t k = 0; k < n; ++k) {
    if (std::rename(temporaries[k].c_str(), (root / names[k]).string().c_str()) != 0) {
      const int err = errno;
      for (size_t r = k; r < n; ++r) std::remove(temporaries[r].c_str());
      throw Error("renaming " + temporaries[k] + " to " + (root / names[k]).string() + " failed: " +
                  std::strerror(err));
    }
  }
  sync_directory(dir);
  const json idx = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  write_file_atomic(index.string(), idx.dump(2) + "\n");
  std::set<std::string> keep(names.begin(), names.end());
  keep.insert(kSafetensorsIndexName);
  remove_stale(keep);
  names.push_back(kSafetensorsIndexName);
  return names;
}

}  // namespace dpo
