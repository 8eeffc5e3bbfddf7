#include "runtime/safetensors.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

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

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  int64_t offset = 0;
  std::set<std::string> seen;
  for (const auto& [name, t] : tensors) {
    DPO_ASSERT(t.device().kind == DeviceKind::CPU, "save_safetensors takes host tensors: " + name);
    DPO_ASSERT(seen.insert(name).second, "duplicate tensor name " + name);
    header[name] = {{"dtype", dtype_name(t.dtype())}, {"shape", t.shape()}, {"data_offsets", {offset, offset + t.nbytes()}}};
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
  if (!ok) {
    std::fclose(f);
    std::remove(tmp.c_str());
    throw Error("writing " + tmp + " failed: " + std::strerror(errno));
  }
  commit_file(f, tmp, path);
}

}  // namespace dpo
