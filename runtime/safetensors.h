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

// A model directory's weights in either of the forms HF writes (transformers' save_pretrained / from_pretrained):
//   single   <dir>/model.safetensors
//   sharded  <dir>/model.safetensors.index.json = {"metadata": {"total_size": <bytes>, ...}, "weight_map":
//            {tensor name: shard file name}}, the shards (model-00001-of-00003.safetensors, ...) beside it.
// When both are present the single file wins and the index is not read, as in transformers' from_pretrained
// (modeling_utils: model.safetensors is looked for before model.safetensors.index.json).
//
// The API is SafetensorsFile's (entries, find, read, read_as by tensor name); entries are sorted by name, so both
// forms of the same tensors list the same entries (begin/end stay offsets inside the entry's own file, file_of).
// Reading the sharded form validates, each error an InputError naming the index or shard file: the index's JSON
// syntax (a key repeated in an object included), its top level and weight_map (an object of strings naming at
// least one tensor), shard names (a relative path inside the directory: absolute paths, ".." components and empty
// names are refused), every shard as a SafetensorsFile (all of its checks), a shard that does not exist, a tensor
// the weight_map names that its shard does not hold, a tensor a shard holds that the weight_map maps to another
// shard (a tensor in two shards) or does not name at all, and metadata.total_size, when present, against the
// tensors' total byte count (HF's meaning: the sum of the tensors' data bytes, headers not counted).
class SafetensorsDir {
 public:
  explicit SafetensorsDir(std::string dir);
  // `path` a model directory (either form), or one .safetensors file read as the single form.
  static SafetensorsDir open(const std::string& path);

  const std::string& dir() const { return dir_; }
  bool sharded() const { return sharded_; }
  // The file that describes the weights: model.safetensors or model.safetensors.index.json.
  const std::string& path() const { return path_; }
  // The paths of the weights files read: the single file, or the shards sorted by name.
  std::vector<std::string> files() const;
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const SafetensorsEntry* find(const std::string& name) const;
  // The path of the file holding `name`; InputError if absent.
  const std::string& file_of(const std::string& name) const;
  Tensor read(const std::string& name) const;
  Tensor read_as(const std::string& name, DType dtype) const;

 private:
  SafetensorsDir() = default;
  void open_single(const std::string& path);  // the single form: one file holds every tensor
  const SafetensorsFile& holder(const std::string& name) const;

  std::string dir_, path_;
  bool sharded_ = false;
  std::vector<SafetensorsFile> files_;
  std::vector<SafetensorsEntry> entries_;  // sorted by name
  std::map<std::string, size_t> file_index_;  // tensor name -> index into files_
};

inline constexpr const char* kSafetensorsSingleName = "model.safetensors";
inline constexpr const char* kSafetensorsIndexName = "model.safetensors.index.json";
// transformers' default max_shard_size, "5GB" (decimal: 5 * 10^9 bytes).
inline constexpr int64_t kDefaultMaxShardBytes = 5'000'000'000;

// A shard budget as HF's max_shard_size spells it: a number with a unit KB, MB, GB or TB (decimal, 10^3 ... 10^12,
// case-insensitive, "5GB", "1.5GB", "500 MB") or a plain number of bytes. Must be > 0; InputError naming `what`.
int64_t parse_shard_size(const std::string& text, const std::string& what);

// The shards HF's splitter (huggingface_hub split_state_dict_into_shards_factory) makes of tensors of these byte
// sizes, in order: a tensor larger than the budget gets a shard of its own, at the point it is met; the others
// fill the current shard in order until the next one would take it past the budget. Returns the tensor indices of
// each shard. max_shard_bytes > 0.
std::vector<std::vector<size_t>> plan_shards(const std::vector<int64_t>& nbytes, int64_t max_shard_bytes);

// Writes `tensors` (host) as the weights of directory `dir` (created if needed), split by plan_shards: the single
// file model.safetensors when everything fits in one shard, else model-0000k-of-0000n.safetensors and the index
// (metadata {"total_size": data bytes}, weight_map sorted by name; HF also writes total_parameters, which is
// optional). Each file gets `metadata` in its header. The set replaces an earlier one atomically as far as a
// reader can tell: every shard is written under a temporary name first; then the shards are renamed into place and
// the index written last (temporary name, rename), and only then is what the earlier save left removed (its single
// file, which would otherwise win over the new index, or shards with another count). A crash before the index's
// rename leaves the earlier weights readable; if the earlier save was sharded with the same shard names, its index
// is removed before the first shard is replaced, so that a crash in between leaves no index (a clear error on
// load) rather than an index over a mix of old and new shards. Returns the names written (relative to dir): the
// single file, or the shards followed by the index.
std::vector<std::string> save_safetensors_dir(const std::string& dir,
                                              const std::vector<std::pair<std::string, Tensor>>& tensors,
                                              const std::map<std::string, std::string>& metadata = {},
                                              int64_t max_shard_bytes = kDefaultMaxShardBytes);

// Converts a host tensor between floating dtypes (F32, F64, BF16, F16), or between I32 and I64.
Tensor convert_host(const Tensor& src, DType dtype, const std::string& what);

// Writes `text` to `path` atomically (temporary name, then rename).
void write_file_atomic(const std::string& path, const std::string& text);

}  // namespace dpo
