#include "train/hash.h"

#include <openssl/evp.h>

#include <fstream>
#include <vector>

#include "runtime/error.h"

namespace dpo {

struct Sha256::Impl {
  EVP_MD_CTX* ctx = nullptr;
  bool done = false;
};

Sha256::Sha256() : impl_(std::make_unique<Impl>()) {
  impl_->ctx = EVP_MD_CTX_new();
  if (!impl_->ctx || EVP_DigestInit_ex(impl_->ctx, EVP_sha256(), nullptr) != 1)
    throw Error("OpenSSL: cannot initialise SHA-256");
}

Sha256::~Sha256() {
  if (impl_->ctx) EVP_MD_CTX_free(impl_->ctx);
}

void Sha256::update(const void* data, size_t n) {
  DPO_ASSERT(!impl_->done, "Sha256 updated after hex()");
  if (EVP_DigestUpdate(impl_->ctx, data, n) != 1) throw Error("OpenSSL: SHA-256 update failed");
}

std::string Sha256::hex() {
  DPO_ASSERT(!impl_->done, "Sha256::hex() called twice");
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(impl_->ctx, md, &len) != 1) throw Error("OpenSSL: SHA-256 final failed");
  impl_->done = true;
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < len; ++i) {
    out.push_back(digits[md[i] >> 4]);
    out.push_back(digits[md[i] & 15]);
  }
  return out;
}

std::string sha256_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw InputError(path + ": cannot open for reading");
  Sha256 h;
  std::vector<char> buf(1 << 20);
  while (f) {
    f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    if (f.gcount() > 0) h.update(buf.data(), static_cast<size_t>(f.gcount()));
  }
  if (f.bad()) throw InputError(path + ": read error");
  return h.hex();
}

std::string sha256_string(const std::string& s) {
  Sha256 h;
  h.update(s);
  return h.hex();
}

}  // namespace dpo
