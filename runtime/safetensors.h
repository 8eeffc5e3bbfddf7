// The safetensors format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N,
// N bytes of JSON {"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
// then the data section. Offsets are relative to the data section.
//
// Reading validates everything before any tensor is used: header length against the file size, JSON syntax,
// every entry's dtype, shape, offsets, byte count and bounds, and overlaps. Every problem throws
// dpo::InputError naming the file and, where there is one, the tensor. Writing is atomic (temporary file in the
// same directory, then rename), so a crash never leaves a partial checkpoint under the final name.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "runtime/tensor.h"

namespace dpo {

struct SafetensorsEntry {
  std::string name;
  DType dtype;
  Shape shape;
  int64_t begin = 0;  // byte offsets in the data section
  int64_t end = 0;
};

class SafetensorsFile {
 public:
  explicit SafetensorsFile(std::string path);

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const SafetensorsEntry* find(const std::string& name) const;

  // The tensor as stored (host). Throws InputError if absent.
  Tensor read(const std::string& name) const;
  // Read and convert floating types (F32, F64, BF16, F16) to F32 or F64; integer types convert between I32/I64
  // (with a range check). Anything else throws InputError naming the tensor and both dtypes.
  Tensor read_as(const std::string& name, DType dtype) const;

 private:
  std::string path_;
  int64_t data_start_ = 0;
  int64_t data_bytes_ = 0;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Host tensors only. Names must be unique. Atomic: writes `path + ".tmp.<pid>"`, flushes, renames.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// Converts a host tensor between floating dtypes (F32, F64, BF16, F16), or between I32 and I64.
Tensor convert_host(const Tensor& src, DType dtype, const std::string& what);

// Writes `text` to `path` atomically (temporary name, then rename).
void write_file_atomic(const std::string& path, const std::string& text);

}  // namespace dpo
