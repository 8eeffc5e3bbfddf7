// SHA-256 (OpenSSL's EVP interface) for cache keys and checkpoint verification.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

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

}  // namespace dpo
