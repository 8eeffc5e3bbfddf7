#include "train/hash.h"

#include <openssl/evp.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "runtime/error.h"
#include "runtime/safetensors.h"

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

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr const char* kChecksumsFormat = "dpo-checksums-1";

// The files of a checkpoint directory that dpo writes and reads back.
const char* const kCheckpointFiles[] = {"config.json", "model.safetensors", "optimizer.safetensors",
                                        "trainer_state.json", "generation_config.json", "ref_model.safetensors",
                                        "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                                        "special_tokens_map.json", "chat_template.jinja"};

}  // namespace

void write_checksums(const std::string& dir, const std::vector<std::string>& files) {
  json f = json::object();
  for (const auto& n : files) f[n] = sha256_file((fs::path(dir) / n).string());
  const json j = {{"format", kChecksumsFormat}, {"files", f}, {"sha256", sha256_string(f.dump())}};
  write_file_atomic((fs::path(dir) / kChecksumsFile).string(), j.dump(2) + "\n");
}

bool verify_checkpoint(const std::string& dir, CheckpointUse use) {
  if (!fs::is_directory(dir)) throw InputError(dir + ": not a checkpoint directory");
  const fs::path root(dir);
  const std::string manifest = (root / kChecksumsFile).string();
  if (!fs::exists(manifest)) {
    if (fs::exists(root / "trainer_state.json"))
      throw InputError(manifest + ": missing, but " + dir +
                       " holds trainer_state.json: a dpo training checkpoint whose files cannot be verified "
                       "(checksums.json deleted, or written by a dpo older than the checksum format)");
    return false;  // an external HF checkpoint
  }
  std::ifstream in(manifest);
  if (!in) throw InputError(manifest + ": cannot open");
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number such as 1e999
    throw InputError(manifest + ": not valid JSON (corrupted checksum list): " + e.what());
  }
  if (!j.is_object() || !j.contains("format") || j["format"] != kChecksumsFormat || !j.contains("files") ||
      !j["files"].is_object() || !j.contains("sha256") || !j["sha256"].is_string())
    throw InputError(manifest + ": not a \"" + kChecksumsFormat + "\" checksum list (corrupted?)");
  const json& files = j["files"];
  if (sha256_string(files.dump()) != j["sha256"].get<std::string>())
    throw InputError(manifest + ": its own SHA-256 does not match (corrupted or edited checksum list)");
  for (auto it = files.begin(); it != files.end(); ++it) {
    const std::string& n = it.key();
    if (!it.value().is_string() || n.empty() || n == "." || n == ".." || n.find('/') != std::string::npos ||
        n == kChecksumsFile)
      throw InputError(manifest + ": bad entry '" + n + "'");
  }
  // Every checkpoint file present must be listed (an entry removed never skips verification), and every file
  // this load reads must be listed (present or not).
  for (const char* n : kCheckpointFiles)
    if (!files.contains(n) && fs::exists(root / n))
      throw InputError((root / n).string() + ": present but not listed in " + manifest +
                       " (entries removed from the checksum list?)");
  // Weight shards (model-00001-of-00003.safetensors, ...) present must be listed too.
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string n = e.path().filename().string();
    if (n.rfind("model-", 0) == 0 && n.size() > 12 && n.compare(n.size() - 12, 12, ".safetensors") == 0 &&
        !files.contains(n))
      throw InputError(e.path().string() + ": present but not listed in " + manifest +
                       " (entries removed from the checksum list?)");
  }
  // The weights: model.safetensors, or the index of a sharded save (its shards are listed files, checked below).
  const bool sharded = !files.contains("model.safetensors") && files.contains("model.safetensors.index.json");
  std::vector<std::string> read = {"config.json", sharded ? "model.safetensors.index.json" : "model.safetensors"};
  if (use == CheckpointUse::Resume) read.insert(read.end(), {"trainer_state.json", "optimizer.safetensors"});
  for (const auto& n : read)
    if (!files.contains(n))
      throw InputError(manifest + ": no entry for '" + n + "' (" +
                       (use == CheckpointUse::Resume ? "a training checkpoint needs it" : "the model needs it") +
                       ")");
  // Every listed file, whatever this load reads: a directory that does not match its checksums is not used at all.
  for (auto it = files.begin(); it != files.end(); ++it) {
    const std::string path = (root / it.key()).string();
    if (!fs::exists(path)) throw InputError(path + ": listed in " + manifest + " but missing");
    if (sha256_file(path) != it.value().get<std::string>())
      throw InputError(path + ": SHA-256 does not match " + manifest + " (corrupted or modified checkpoint)");
  }
  return true;
}

}  // namespace dpo
