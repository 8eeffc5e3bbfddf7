// SHA-256 (OpenSSL's EVP interface) for cache keys and checkpoint verification.
//
// Checkpoint checksums: every checkpoint directory dpo writes (`dpo init`, the trainer's step-<N>) holds
// checksums.json = {"format": "dpo-checksums-1", "files": {name: SHA-256, ...}, "sha256": SHA-256 of the "files"
// object's compact JSON}, over every other file of the directory (trainer_state.json included). A directory
// without checksums.json and without trainer_state.json is an external HF checkpoint, loaded unverified. These
// checksums catch corruption and accidental edits, not deliberate tampering (anyone can recompute them).
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

namespace dpo {

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(const void* data, size_t n);
  void update(const std::string& s) { update(s.data(), s.size()); }
  std::string hex();  // finalises; the object cannot be updated afterwards

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Hex digest of a whole file; throws InputError naming the file if it cannot be read.
std::string sha256_file(const std::string& path);
std::string sha256_string(const std::string& s);

inline constexpr const char* kChecksumsFile = "checksums.json";

// Writes dir/checksums.json (atomically) over `files` (names inside dir).
void write_checksums(const std::string& dir, const std::vector<std::string>& files);

// What a load reads from a checkpoint directory: the model (config.json, model.safetensors) or everything a
// resume reads (also trainer_state.json and optimizer.safetensors).
enum class CheckpointUse { Model, Resume };

// Verifies `dir` before a load. Returns true when it is one of our checkpoints and every listed file matches
// checksums.json; false for an external HF directory (neither checksums.json nor trainer_state.json).
// Throws InputError naming the file when: dir holds trainer_state.json but no checksums.json; checksums.json is
// unreadable, or its own checksum does not match; a file the load reads, or any of our checkpoint files present
// in dir, has no entry; a listed file is missing or its SHA-256 differs.
bool verify_checkpoint(const std::string& dir, CheckpointUse use);

}  // namespace dpo
